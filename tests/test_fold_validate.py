"""fold + validation wired together: the API records the check, fold_file and `bnfold fold`
write nothing when it fails (unless forced), and the CLI's exit status says so. fold_file folds
by streaming into the staging folder and checks the staged files from disk, one onnxruntime
session at a time, before renaming them into place."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import bnfold
import bnfold.api
import bnfold.modelio
from bnfold.cli import cli
from bnfold.errors import ValidationFailed
from tests.ortutil import make_model
from tests.rss import fold_file_rss_growth


def _conv_bn(rng) -> onnx.ModelProto:
    c = 8
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.2, 2, c).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c, 8, 8])],
        inits,
    )


@pytest.fixture
def model_path(tmp_path, rng):
    path = tmp_path / "m.onnx"
    path.write_bytes(_conv_bn(rng).SerializeToString())
    return path


def test_fold_validate_records_a_passing_check(rng):
    result = bnfold.fold(_conv_bn(rng), validate={"samples": 3, "dims": {"batch": 2}})
    assert result.check.passed
    comparison = result.check.comparisons[0]
    assert 0 < comparison.outputs[0].max_abs_error < 1e-5
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_fold_without_validate_has_no_check(rng):
    assert bnfold.fold(_conv_bn(rng)).check is None


def test_fold_file_writes_nothing_when_the_check_fails(model_path):
    out = model_path.with_name("out.onnx")
    with pytest.raises(ValidationFailed, match=r"m\.onnx: the folded model is not equivalent .*nothing written") as info:
        bnfold.fold_file(model_path, out, validate={"rtol": 0.0, "atol": 0.0})
    assert not out.exists()
    assert info.value.result.check.passed is False
    assert info.value.result.report.counts()["folded"] == 1


def test_fold_file_force_writes_a_failing_fold(model_path):
    out = model_path.with_name("out.onnx")
    result = bnfold.fold_file(model_path, out, validate={"rtol": 0.0, "atol": 0.0}, force=True)
    assert out.exists() and result.output == out and not result.check.passed


def test_cli_fold_validates_by_default(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--samples", "2", "--dim", "batch=3"])
    assert result.exit_code == 0, result.output
    assert "PASS: equivalent on cpu (1 output(s), 2 sample(s)" in result.output
    assert result.output.rstrip().endswith(f"wrote {model_path.with_name('m.folded.onnx')}")
    assert model_path.with_name("m.folded.onnx").exists()


def test_cli_fold_failing_check_exit_1_nothing_written(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--rtol", "0", "--atol", "0"])
    assert result.exit_code == 1
    assert "FAIL: output 'y' on cpu" in result.stdout
    assert "nothing written" in result.stdout
    assert result.stderr.strip().startswith(f"bnfold: error: {model_path}: the folded model is not equivalent")
    assert not model_path.with_name("m.folded.onnx").exists()


def test_cli_fold_force_writes_and_still_exits_1(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--rtol", "0", "--atol", "0", "--force"])
    assert result.exit_code == 1
    assert "written anyway (--force)" in result.stderr
    assert model_path.with_name("m.folded.onnx").exists()


def test_cli_fold_no_validate_skips_the_check(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--no-validate", "--rtol", "0", "--atol", "0"])
    assert result.exit_code == 0
    assert "PASS" not in result.output and "FAIL" not in result.output


def test_cli_fold_json_carries_the_check(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--json"])
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["check"]["passed"] is True
    assert document["counts"]["folded"] == 1
    assert document["output"] == str(model_path.with_name("m.folded.onnx"))


def test_cli_fold_missing_provider_is_exit_2_and_writes_nothing(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--providers", "cpu,cuda"])
    assert result.exit_code == 2
    assert "cuda" in result.stderr.lower()
    assert not model_path.with_name("m.folded.onnx").exists()


# --- the validating fold_file works from files: fold streamed into the staging folder, check
# the staged files with one onnxruntime session at a time, rename into place only if it passed.

def _wide(layers: int, width: int, rng) -> onnx.ModelProto:
    """Conv(3×3) + BN layers of ``width`` channels on a 4×4 input: almost all weights."""
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.05, (width, width, 3, 3)).astype(np.float32), f"w{i}"))
        for p, v in zip("sbmv", (rng.uniform(0.5, 1.5, width), rng.normal(0, 0.1, width),
                                 rng.normal(0, 0.1, width), rng.uniform(0.5, 2, width))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"y{i}"],
                                   name=f"bn{i}")]
        x = f"y{i}"
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width, 4, 4])],
                      [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width, 4, 4])], inits)


def _save(model: onnx.ModelProto, path, *, external: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)
    return path


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def sessions(monkeypatch):
    """Every onnxruntime session built: (what from: a path, or "<bytes>"; sessions alive then)."""
    built, alive = [], weakref.WeakSet()
    original = onnxruntime.InferenceSession

    class Logged(original):
        def __init__(self, model, *args, **kwargs):
            built.append((model if isinstance(model, str) else "<bytes>", len(alive)))
            super().__init__(model, *args, **kwargs)
            alive.add(self)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Logged)
    return built


@pytest.fixture
def no_whole_model_loads(monkeypatch):
    """Fail the test if anything parses a model file with its weights into Python."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a whole model was loaded: {args[:1]}")

    for module, name in ((onnx, "load"), (onnx, "load_model"), (onnx.external_data_helper, "load_external_data_for_model"),
                         (bnfold.modelio, "load_model"), (bnfold.api, "load_model")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("external", [False, True])
def test_fold_file_checks_the_staged_files_one_session_at_a_time(tmp_path, rng, sessions, no_whole_model_loads,
                                                                 external):
    src = _save(_wide(3, 16, rng), tmp_path / "src" / "m.onnx", external=external)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    result = bnfold.fold_file(src, out, validate={"samples": 2})
    assert result.check.passed and result.output == out
    assert result.report.counts()["folded"] == 3
    (ref, ref_alive), (cand, cand_alive) = sessions
    assert ref == str(src) and ref_alive == 0
    # the candidate is the staged file, read by onnxruntime from disk, built after the reference was released
    staged = Path(cand)
    assert staged.name == "m.onnx" and staged.parent.parent == out.parent and staged.parent.name.startswith(".m.onnx.")
    assert cand_alive == 0
    assert _files(out.parent) == (["m.onnx", "m.onnx.data"] if external else ["m.onnx"])  # staging folder gone
    assert result.report.bytes_before == sum(p.stat().st_size for p in src.parent.iterdir())
    assert result.report.bytes_after == sum(p.stat().st_size for p in out.parent.iterdir())


def test_fold_file_check_reports_what_checking_the_folded_model_reports(tmp_path, rng):
    src = _save(_wide(2, 8, rng), tmp_path / "m.onnx", external=False)
    options = {"samples": 3, "seed": 7}
    result = bnfold.fold_file(src, tmp_path / "out.onnx", validate=options)
    expected = bnfold.check(src, bnfold.fold(src).model, **options)

    def figures(report):
        d = report.to_dict()
        for key in ("seconds", "candidate"):
            d.pop(key)
        for c in d["comparisons"]:
            c.pop("seconds")
        return d

    assert figures(result.check) == figures(expected)
    assert result.check.comparisons[0].outputs[0].max_abs_error > 0  # a real fold was compared
    assert result.check.candidate == "the folded model (staged, before writing)"


def test_fold_file_external_data_failing_check_writes_nothing_force_writes_both(tmp_path, rng):
    src = _save(_wide(2, 16, rng), tmp_path / "src" / "m.onnx", external=True)
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    with pytest.raises(ValidationFailed, match=r"not equivalent .*; nothing written$") as info:
        bnfold.fold_file(src, out, validate={"rtol": 0.0, "atol": 0.0})
    assert _files(out.parent) == []  # no model, no data, no staging folder
    failed = info.value.result
    assert not failed.check.passed and failed.output is None
    assert failed.report.bytes_before == sum(len(b) for b in before.values())
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before
    result = bnfold.fold_file(src, out, validate={"rtol": 0.0, "atol": 0.0}, force=True)
    assert not result.check.passed and result.output == out
    assert _files(out.parent) == ["m.onnx", "m.onnx.data"]
    assert len(onnx.load(out).graph.node) == 2  # loads with its data: two Conv, no BN


def test_fold_file_in_place_with_validation(tmp_path, rng):
    src = _save(_wide(2, 8, rng), tmp_path / "m.onnx", external=False)
    original = src.read_bytes()
    with pytest.raises(ValidationFailed):
        bnfold.fold_file(src, in_place=True, validate={"rtol": 0.0, "atol": 0.0})
    assert src.read_bytes() == original and _files(tmp_path) == ["m.onnx"]
    result = bnfold.fold_file(src, in_place=True, validate=True)
    assert result.check.passed and result.output == src
    assert [n.op_type for n in onnx.load(src).graph.node] == ["Conv", "Conv"]


@pytest.mark.parametrize("flags", [[], ["--force"]])
def test_cli_fold_source_onnxruntime_cannot_load_is_exit_2_nothing_written(tmp_path, rng, flags):
    model = _conv_bn(rng)
    model.ir_version = 14  # onnx's checker accepts it; onnxruntime 1.31 loads IR <= 13
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    result = CliRunner().invoke(cli, ["fold", str(src), *flags])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"bnfold: error: {src}: onnxruntime cannot load it on cpu: ")
    assert _files(tmp_path) == ["m.onnx"]


def test_cli_fold_failing_check_reports_the_sizes(model_path):
    result = CliRunner().invoke(cli, ["fold", str(model_path), "--rtol", "0", "--atol", "0", "--json"])
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["output"] is None and document["check"]["passed"] is False
    assert document["bytes_before"] == model_path.stat().st_size
    assert 0 < document["bytes_after"] < document["bytes_before"]  # what would have been written


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_validating_fold_of_an_external_data_model_needs_about_one_model_of_memory(tmp_path, rng):
    """Peak RSS growth of fold_file(validate=True) on a 72 MiB external-data model: under 2× its
    size (measured 1.4×: onnxruntime maps the weights of one session at a time, plus ~30 MiB of
    its own); loading the model, folding in memory and checking from serialized protos took
    6×."""
    src = _save(_wide(8, 512, rng), tmp_path / "src" / "wide.onnx", external=True)
    size = sum(p.stat().st_size for p in src.parent.iterdir())
    (tmp_path / "out").mkdir()
    growth, _, passed = fold_file_rss_growth(src, tmp_path / "out" / "w.onnx", validate=True)
    assert passed
    assert growth < 2 * size, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
