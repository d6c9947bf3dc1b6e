"""The benchmark harness on tiny workloads: runs are measured, failures are rows, ratios and
the table are right. The real tools' runs are exercised by ``python -m bench --quick``."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bench import metrics, report, tools, workloads
from bench.__main__ import main as bench_main
from bench.reference64 import evaluate_float64
from bench.report import UNFOLDED, Row
from tests.ortutil import run


# --- workloads ---------------------------------------------------------------------------


def test_workloads_are_deterministic_and_cached(cache, tiny, tmp_path):
    again = workloads.model_path(workloads.lookup("tiny-resnet"), tmp_path)
    assert again.read_bytes() == tiny.read_bytes()
    mtime = tiny.stat().st_mtime_ns
    assert workloads.model_path(workloads.lookup("tiny-resnet"), cache) == tiny
    assert tiny.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_external_data_workload_streams_its_tensors_out(tiny_ext):
    model = onnx.load(str(tiny_ext), load_external_data=False)
    external = [t for t in model.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    # The three Conv weights and the 32×10 Gemm weight; the 128-byte BN vectors stay inline.
    assert [t.name for t in external] == ["w_1", "w_9", "w_17", "w_27"]
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in external]
    assert all(o % 4096 == 0 for o in offsets)
    onnx.checker.check_model(str(tiny_ext))  # readable, and the data file is long enough


def test_resnet50_like_has_the_real_shape():
    model = workloads.resnet50(size=32)
    bn, nodes = metrics.count_ops(model)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert bn == 53
    assert 25.4e6 < params < 25.7e6  # torchvision's ResNet-50: 25.56 M
    fp16 = workloads.resnet50(np.float16, size=32)
    w32, w16 = (onnx.numpy_helper.to_array(m.graph.initializer[0]) for m in (model, fp16))
    np.testing.assert_array_equal(w16, w32.astype(np.float16))  # the twin is the fp32 rounded once


# --- float64 reference and metrics --------------------------------------------------------


def test_float64_reference_matches_onnxruntime(tiny):
    model = onnx.load(str(tiny))
    feeds = metrics.random_feeds(tiny)
    (ours,) = evaluate_float64(model, feeds)
    (ort,) = run(model, feeds)
    assert ours.dtype == np.float64
    err = np.abs(ours - ort).max()
    assert 0 < err < 1e-5 * np.abs(ours).max()  # float32 rounding, nothing more


@pytest.mark.parametrize(("a", "b", "want"), [
    ([np.array([1.0, 2.0], np.float32)], [np.array([1.0, 2.5], np.float32)], 0.5),
    ([np.array([1.0], np.float16), np.array([3.0])], [np.array([1.0]), np.array([1.0])], 2.0),
    ([np.array([np.nan])], [np.array([0.0])], math.inf),
    ([np.zeros((2, 2))], [np.zeros(4)], math.inf),
])
def test_max_error(a, b, want):
    assert metrics.max_error(a, b) == want


def test_baseline_and_evaluate_measure_a_model_against_itself(tiny, tmp_path):
    base = metrics.baseline(tiny, tmp_path, samples=3)
    assert (base["bn"], base["nodes"], base["external_data"]) == (3, 14, False)
    assert (base["samples"], base["feed_sets"], base["batched"]) == (3, 3, False)  # batch dim fixed at 1
    assert 0 < base["err_f64"] < 1e-5
    got = metrics.evaluate(tiny, tmp_path)
    assert got["err_ref"] == 0.0
    assert got["err_f64"] == base["err_f64"]
    assert got["fold_err"] == 0.0  # the same graph evaluated in float64 twice


# --- one tool run -------------------------------------------------------------------------


def test_floor_run_is_measured(tiny, tmp_path):
    r = tools.run_once("floor", tiny, tmp_path / "out.onnx")
    assert r.ok and r.reason is None and r.returncode == 0
    assert 0.05 < r.wall_s < 60
    assert 20e6 < r.peak_rss < 2e9  # a python process with onnx imported, in bytes
    assert onnx.load(str(tmp_path / "out.onnx")) == onnx.load(str(tiny))


def test_peak_rss_is_the_tools_not_the_parents(tiny, tmp_path):
    # A child started by fork/vfork + exec inherits the parent's high-water mark in
    # ru_maxrss; the bench must report the tool's own peak however big the bench process is.
    ballast = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    r = tools.run_once("floor", tiny, tmp_path / "out.onnx")
    assert r.ok and r.peak_rss < 200 * 2**20 < ballast.nbytes


def test_floor_keeps_external_data_external(tiny_ext, tmp_path):
    assert tools.run_once("floor", tiny_ext, tmp_path / "out.onnx").ok
    # Conv weights 32×16×3×3 and 2 × 32×32×3×3, Gemm 32×10, float32, packed by onnx.save.
    assert (tmp_path / "out.onnx.data").stat().st_size == (32 * 16 * 9 + 2 * 32 * 32 * 9 + 320) * 4


@pytest.mark.parametrize(("tool", "reason"), [
    ("_fail", "RuntimeError: deliberate failure on model.onnx"),
    ("_crash", "killed by SIGSEGV"),
    ("_silent", "exited 0 but wrote no output"),
])
def test_a_failing_tool_is_a_result_not_an_exception(tiny, tmp_path, tool, reason):
    r = tools.run_once(tool, tiny, tmp_path / "out.onnx")
    assert not r.ok
    assert r.reason == reason


def test_timeout_is_reported(tiny, tmp_path):
    r = tools.run_once("floor", tiny, tmp_path / "out.onnx", timeout=0.01)
    assert (r.ok, r.reason) == (False, "timed out after 0.01 s")


def test_measure_stops_at_the_first_failure(tiny, tmp_path):
    m = tools.measure("_fail", tiny, tmp_path, repeat=3)
    assert len(m.runs) == 1 and not m.ok and m.output is None and m.wall_s is None


# --- ratios and the table -----------------------------------------------------------------


def _rows():
    return [
        Row("w", UNFOLDED, bn=(4, 4), nodes=(10, 10), bytes=(2_000_000, 2_000_000), err_f64=1e-6,
            latency_ms={"disable": (2.0, 2.0), "all": (1.0, 1.0)}),
        Row("w", "floor", wall_s=2.0, peak_rss=100 * 2**20, bn=(4, 4), nodes=(10, 10),
            bytes=(2_000_000, 2_000_000), err_ref=0.0, err_f64=1e-6,
            latency_ms={"disable": (2.0, 2.1), "all": (1.0, 1.0)}),
        Row("w", "bnfold", wall_s=1.5, peak_rss=50 * 2**20, bn=(4, 0), nodes=(10, 6),
            bytes=(2_000_000, 19 * 2**20 // 10), external_data=True, err_ref=2e-7, err_f64=1.5e-6,
            fold_err=3e-8, latency_ms={"disable": (2.0, 1.5), "all": (1.0, 0.9)}),
        Row("w", "onnxsim", ok=False, reason="ValueError: bad | thing"),
        Row("v", "bnfold", wall_s=1.0, peak_rss=1),  # no floor in workload v: no ratios
    ]


def test_ratios_are_taken_against_the_same_workloads_floor():
    rows = _rows()
    report.add_ratios(rows)
    floor, bn, sim, other = rows[1], rows[2], rows[3], rows[4]
    assert (floor.time_ratio, floor.rss_ratio) == (1.0, 1.0)
    assert (bn.time_ratio, bn.rss_ratio) == (0.75, 0.5)
    assert (sim.time_ratio, other.time_ratio) == (None, None)


def test_table_renders_every_row():
    rows = _rows()
    report.add_ratios(rows)
    lines = report.render_markdown(rows, {"bnfold": "bnfold fold"}).splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(ln.count(" | ") == len(report.COLUMNS) - 1 for ln in lines if ln.startswith("| "))
    assert lines[4] == ("| w | bnfold fold | 1.50 (0.75×) | 50.0 (0.50×) | 4 → 0 | 10 → 6 | 1.9 ext | 2e-07 | "
                        "1.5e-06 | 3e-08 | 2.00 → 1.50 | 1.00 → 0.90 |")
    assert lines[5].startswith("| w | onnxsim | failed: ValueError: bad \\| thing | — |")


def test_fold_error_cell_says_why_it_is_missing():
    row = Row("w", "ort-extended", wall_s=1.0, peak_rss=1, err_ref=0.0, err_f64=1e-6,
              fold_err_reason="op com.microsoft.Foo is not supported")
    line = report.render_markdown([row]).splitlines()[2]
    assert line.split(" | ")[9] == "n/a: op com.microsoft.Foo is not supported"


def test_targets_report_measured_ratios():
    rows = [Row("resnet50", "floor", wall_s=1.0, peak_rss=10), Row("resnet50", "bnfold", wall_s=0.7, peak_rss=10),
            Row("resnet50", "ort-basic", wall_s=0.5, peak_rss=10)]
    report.add_ratios(rows)
    got = {t: (m, v) for t, m, v in report.targets(rows)}
    assert got["ResNet-50 fp32: bnfold ≤ 0.8 × floor"] == ("0.70×", "met")
    assert got["ResNet-50 fp32: bnfold ≤ 1.0 × ORT basic"] == ("1.40×", "not met")


def test_scaling_fits_a_line_through_the_three_wide_sizes():
    rows = [Row(w, "bnfold", wall_s=0.5 + 2.0 * gb, peak_rss=int(1e8 + 1.5 * gb * 1e9), bytes=(int(gb * 1e9), 0))
            for w, gb in (("wide-S", 0.1), ("wide-M", 0.2), ("wide-L", 0.4))]
    (target, measured, verdict), = report.targets(rows)
    assert target == "linear scaling (bnfold, wide S/M/L)"
    assert measured == "time ≈ 0.50 s + 2.00 s/GB (worst point 0% off the line); peak RSS ≈ 100 MB + 1.50 × model size (0% off)"
    assert verdict == "linear"
    rows[1].wall_s *= 2  # a kink in the middle
    assert report.targets(rows)[0][2] == "not linear"


def _fp16_rows():
    return [Row("resnet50-fp16", "bnfold", wall_s=1, bn=(53, 0), nodes=(176, 123), err_f64=0.02, fold_err=0.004,
                samples=4, dtype="float16"),
            Row("resnet50-fp16", "bnfold-compensated", wall_s=1, bn=(53, 0), nodes=(176, 123), err_f64=0.012,
                fold_err=0.001, samples=4, dtype="float16"),
            Row("resnet50-fp16", "onnxslim", wall_s=1, bn=(53, 0), nodes=(176, 122), err_f64=0.05, fold_err=0.006,
                dtype="float16"),
            Row("resnet50-fp16", "onnxsim", wall_s=1, bn=(53, 0), nodes=(176, 122), err_f64=0.03, fold_err=0.008,
                dtype="float16"),
            Row("resnet50-fp16", "ort-basic", wall_s=1, bn=(53, 53), nodes=(176, 176), err_f64=0.001,
                dtype="float16"),
            # BN gone, but computed at run time by 477 new nodes: not a fold into constants
            Row("resnet50-fp16", "onnxoptimizer", wall_s=1, bn=(53, 0), nodes=(176, 653), err_f64=0.001,
                fold_err=0.0, dtype="float16")]


def test_fp16_precision_is_decided_on_the_ort_run_with_the_fold_error_beside_it():
    got = report.targets(_fp16_rows())
    assert got == [
        ("resnet50-fp16: error vs float64 ≤ 0.5 × best peer that folds as many BN (decided on the ORT run)",
         "ORT run, max of 4 samples: 0.02 vs 0.03 (onnxsim, 0.67×); "
         "fold error (float64 eval): 0.004 vs 0.006 (onnxslim, 0.67×)", "not met"),
        ("resnet50-fp16: bnfold --rounding compensated: error vs float64 ≤ 0.5 × best peer that folds as many "
         "BN (decided on the ORT run)",
         "ORT run, max of 4 samples: 0.012 vs 0.03 (onnxsim, 0.40×); "
         "fold error (float64 eval): 0.001 vs 0.006 (onnxslim, 0.17×)", "met"),
    ]


def test_fp32_precision_is_decided_on_the_fold_error():
    # The ORT run says 1.33× (runtime accumulation noise); the fold itself is the better one.
    rows = [Row("mobilenetv2", "bnfold", wall_s=1, bn=(53, 0), nodes=(176, 123), err_f64=1.07e-5, fold_err=1e-7,
                samples=4, dtype="float32"),
            Row("mobilenetv2", "onnxslim", wall_s=1, bn=(53, 0), nodes=(176, 122), err_f64=8.04e-6, fold_err=4e-7,
                dtype="float32"),
            Row("mobilenetv2", "ort-extended", wall_s=1, bn=(53, 0), nodes=(176, 89), err_f64=8.04e-6,
                fold_err_reason="op com.microsoft.Foo is not supported", dtype="float32")]
    (target, measured, verdict), = report.targets(rows)
    assert target == ("mobilenetv2: error vs float64 ≤ 1 × best peer that folds as many BN (decided on the "
                      "fold error, float64 eval)")
    assert measured == ("fold error: 1e-07 vs 4e-07 (onnxslim, 0.25×); "
                        "ORT run, max of 4 samples: 1.07e-05 vs 8.04e-06 (onnxslim, 1.33×)")
    assert verdict == "met"
    rows[0].fold_err = 5e-7
    assert report.targets(rows)[0][2] == "not met"
    # A peer that folded only some BN changed the function less: not a comparison.
    rows.append(Row("mobilenetv2", "onnxsim", wall_s=1, bn=(53, 2), nodes=(176, 124), err_f64=1e-6, fold_err=1e-9))
    assert report.targets(rows)[0][1].startswith("fold error: 5e-07 vs 4e-07 (onnxslim, 1.25×)")
    rows[0].fold_err, rows[0].fold_err_reason = None, "op Foo is not supported"
    assert report.targets(rows)[0][1:] == (
        "fold error: n/a: op Foo is not supported; ORT run, max of 4 samples: 1.07e-05 vs 8.04e-06 (onnxslim, 1.33×)",
        "n/a")


def test_latency_target_compares_within_a_group_or_relative_to_the_unfolded_model():
    def row(tool, group, before, after):
        return Row("wide-XL", tool, wall_s=1, bn=(40, 0), nodes=(124, 84), latency_group=group,
                   latency_ms={"all": (before, after)})

    rows = [row("bnfold", 0, 280.0, 200.0), row("onnxslim", 0, 280.0, 210.0)]
    assert report.targets(rows)[-1] == ("wide-XL: ORT latency of the output ≤ best peer's (onnxslim)",
                                        "200.00 vs 210.00 ms (0.95×)", "met")
    # onnxsim measured in another group, while the machine was slower: 250 ms of 350 for the
    # unfolded model there is a bigger saving than 200 of 280.
    rows.append(row("onnxsim", 1, 350.0, 230.0))
    target, measured, verdict = report.targets(rows)[-1]
    assert target == "wide-XL: ORT latency of the output ≤ best peer's (onnxsim)"
    assert measured == "200.00 vs 230.00 ms (1.09×, each relative to the unfolded model measured beside it)"
    assert verdict == "not met"
    # The noise floor: the same graph measured side by side (the floor's output is the unfolded model).
    rows += [row(UNFOLDED, 0, 280.0, 280.0), row("floor", 0, 280.0, 294.0), row("bnfold-validate", 0, 280.0, 210.0)]
    assert report.targets(rows)[-1][1:] == ("200.00 vs 230.00 ms (1.09×, each relative to the unfolded model measured "
                                            "beside it; identical graphs differ by 5% here)", "not met")
    # An excess no larger than what identical graphs differ by is a tie, not a loss.
    rows[-2].latency_ms = {"all": (280.0, 308.0)}                       # identical graphs: 10% apart
    assert report.targets(rows)[-1][2] == "within noise (≤ 10%)"


def test_latency_verdict_bands():
    assert report._latency_verdict(0.97, None) == "met"
    assert report._latency_verdict(1.0, 0.0) == "met"
    assert report._latency_verdict(1.04, 0.05) == "within noise (≤ 5%)"
    assert report._latency_verdict(1.06, 0.05) == "not met"
    assert report._latency_verdict(1.01, None) == "not met"


# --- the command --------------------------------------------------------------------------


def test_command_runs_and_reports_a_failing_tool_as_a_row(cache, tmp_path, monkeypatch):
    # _fail is a test-only tool: let the CLI accept it for this run.
    monkeypatch.setitem(tools.TOOLS, "_fail", tools.Tool("_fail", "always fails"))
    out = tmp_path / "r.json"
    result = CliRunner().invoke(bench_main, [
        "--workloads", "tiny-resnet", "--tools", "_fail", "--repeat", "1", "--runs", "1",
        "--cache", str(cache), "--json", str(out)])
    assert result.exit_code == 0, result.output
    table = [ln for ln in result.stdout.splitlines() if ln.startswith("| tiny-resnet")]
    assert [ln.split(" | ")[1] for ln in table] == [UNFOLDED, "onnx.load+onnx.save (floor)", "always fails"]
    assert "failed: RuntimeError: deliberate failure on model.onnx" in table[2]
    data = json.loads(out.read_text())
    floor = data["rows"][1]
    assert floor["tool"] == "floor" and floor["ok"] and floor["time_ratio"] == 1.0
    assert floor["bn"] == [3, 3] and floor["err_ref"] == 0.0


def test_unknown_workload_is_a_usage_error():
    result = CliRunner().invoke(bench_main, ["--workloads", "nope"])
    assert result.exit_code == 2
    assert "unknown workload nope" in result.output


def test_runner_usage(capsys):
    from bench import run_tool

    assert run_tool.main(["nope", "a", "b"]) == 2
    assert "usage: python -m bench.run_tool" in capsys.readouterr().err
