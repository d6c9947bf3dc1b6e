"""``bnfold check`` through CliRunner: exit codes 0/1/2, the table, JSON and JUnit files."""

import io
import json
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

from bnfold.cli import cli
from bnfold.cli.check import check_kwargs, parse_dims, progress_bar, progress_phases
from bnfold.errors import UsageError
from bnfold.validation import providers as P
from tests.validation.models import conv_bn


@pytest.fixture
def models(tmp_path):
    paths = {}
    for name, model in [("ref", conv_bn(folded=False)), ("ok", conv_bn(folded=True)),
                        ("bad", conv_bn(folded=True, bn_scale=1.01))]:
        paths[name] = tmp_path / f"{name}.onnx"
        paths[name].write_bytes(model.SerializeToString())
    return paths


def invoke(*args):
    return CliRunner().invoke(cli, ["check", *map(str, args)])


def test_equivalent_exits_0_with_a_table(models):
    result = invoke(models["ref"], models["ok"], "--samples", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("provider"))
    assert header.split() == ["provider", "output", "max", "abs", "max", "rel", "err/rms", "failing", "rtol",
                              "atol", "needed", "atol", "result"]
    row = next(line for line in lines if line.startswith("cpu "))
    assert row.split()[1] == "y" and row.split()[-1] == "PASS" and "0/288 (0%)" in row
    assert lines[-1].startswith("PASS: equivalent on cpu (1 output(s), 2 sample(s)")


def test_not_equivalent_exits_1_and_writes_json_and_junit(models, tmp_path):
    result = invoke(models["ref"], models["bad"], "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml")
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1].startswith("FAIL: output 'y' on cpu: ")

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and data["candidate"] == str(models["bad"])
    (comparison,) = data["comparisons"]
    (out,) = comparison["outputs"]
    assert out["output"] == "y" and out["passed"] is False
    assert out["max_abs_error"] > out["atol"] > 0 and out["failing"] > 0
    assert out["needed_atol"] > out["atol"]
    assert data["baseline_note"].startswith("not applicable")

    root = ET.parse(tmp_path / "r.xml").getroot()
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "1")
    case = suite.find("testcase")
    assert (case.get("classname"), case.get("name")) == ("bnfold.check.cpu", "y")
    props = {p.get("name"): p.get("value") for p in case.find("properties")}
    assert float(props["max_abs_error"]) == pytest.approx(out["max_abs_error"])
    assert float(props["atol"]) == pytest.approx(out["atol"])
    assert "elements out of tolerance; max abs error" in case.find("failure").get("message")
    assert not list(tmp_path.glob(".*.tmp"))                  # atomic writes leave no temp file


def test_json_to_stdout_keeps_the_table_on_stderr(models):
    result = CliRunner().invoke(cli, ["check", str(models["ref"]), str(models["ok"]), "--json", "-"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["passed"] is True and data["comparisons"][0]["outputs"][0]["max_abs_error"] >= 0
    assert "PASS: equivalent on cpu" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["{ref}", "{missing}"], "missing.onnx: no such file"),
    (["{ref}", "{ok}", "--providers", "gpu"], "--providers: unknown execution provider 'gpu'"),
    (["{ref}", "{ok}", "--dim", "batch"], "--dim 'batch': expected NAME=SIZE with a positive integer size"),
    (["{ref}", "{ok}", "--dim", "H=4"], "--dim H: no input has a dimension named 'H' (dynamic dimensions: none)"),
    (["{ref}", "{ok}", "--inputs", "{npz}"], "input 'x' expects float32 [1, 3, 6, 6], got float64 [1, 3, 6, 6]"),
    (["{ref}", "{ok}", "--providers", "cpu,cuda"], "provider 'cuda': CUDAExecutionProvider is not available"),
])
def test_usage_and_input_errors_exit_2_with_one_line(models, tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(P, "available_providers", lambda: ["CPUExecutionProvider"])
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 3, 6, 6)))
    names = {**{k: str(v) for k, v in models.items()}, "missing": str(tmp_path / "missing.onnx"),
             "npz": str(tmp_path / "d.npz")}
    result = CliRunner().invoke(cli, ["check", *[a.format(**names) for a in args]])
    assert result.exit_code == 2
    assert result.stderr.startswith("bnfold: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_provider_allowed_is_reported_as_skipped(models, monkeypatch):
    monkeypatch.setattr(P, "available_providers", lambda: ["CPUExecutionProvider"])
    result = invoke(models["ref"], models["ok"], "--providers", "cpu,cuda", "--allow-missing-providers")
    assert result.exit_code == 0
    assert "skipped provider cuda: CUDAExecutionProvider is not available" in result.output


def test_bad_click_values_exit_2(models):
    assert invoke(models["ref"], models["ok"], "--samples", "0").exit_code == 2
    assert invoke(models["ref"], models["ok"], "--ort-opt-level", "max").exit_code == 2


def test_user_tolerance_flags_decide(models):
    assert invoke(models["ref"], models["bad"]).exit_code == 1
    result = invoke(models["ref"], models["bad"], "--rtol", "0.05", "--atol", "0.05", "--json", "-")
    assert result.exit_code == 0
    out = json.loads(result.stdout)["comparisons"][0]["outputs"][0]
    assert (out["rtol"], out["atol"], out["tolerance_source"]) == (0.05, 0.05, "user")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar() as progress:
        assert progress is None
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar("checking", delay_s=0.0) as progress:
        for done in range(1, 4):
            progress(done, 4)
    assert "checking" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    with progress_bar("checking", delay_s=60.0) as progress:   # a short check stays quiet
        for done in range(1, 5):
            progress(done, 4)
    assert quiet.getvalue() == ""


def test_progress_phases_draw_one_bar_each_and_never_reopen_one(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_phases() as phase:
        assert phase("folding") is None                                   # not a terminal: no bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_phases(delay_s=0.0) as phase:
        folding, validating = phase("folding"), phase("validating")
        folding(30, 100)
        folding(60, 100)
        validating(1, 4)                                                  # closes the folding bar
        validating(2, 4)
        folding(100, 100)                                                 # late "done": ignored
        validating(3, 4)
    text = terminal.getvalue()
    assert text.count("folding") >= 1 and text.count("validating") >= 1
    assert text.rindex("folding") < text.index("validating")              # nothing drawn after
    assert "60%" in text and "100%" not in text.split("validating")[0]    # a bar starts at what was done
    assert "75%" in text


def test_check_kwargs_for_other_commands():
    params = {"inputs": None, "providers": "cpu, cuda", "rtol": 1e-3, "atol": None, "samples": 2, "seed": 5,
              "dim": ("batch=4",), "ort_opt_level": "BASIC", "allow_missing_providers": True, "force": True}
    kwargs = check_kwargs(params)
    assert params == {"force": True}                                   # only its own options popped
    assert kwargs == {"inputs": None, "providers": ["cpu", "cuda"], "rtol": 1e-3, "atol": None, "samples": 2,
                      "seed": 5, "dims": {"batch": 4}, "ort_opt_level": "basic", "allow_missing_providers": True}
    with pytest.raises(UsageError):
        parse_dims(["batch=-1"])
