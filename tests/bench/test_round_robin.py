"""A workload's tools run interleaved round-robin; tools that apply only to float16 models
run only there."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench import tools
from bench.__main__ import main as bench_main
from bench.report import UNFOLDED


def test_every_repetition_runs_every_tool_once_rotated():
    assert tools.round_robin(["floor", "bnfold", "ort"], 4) == [
        ["floor", "bnfold", "ort"], ["bnfold", "ort", "floor"], ["ort", "floor", "bnfold"],
        ["floor", "bnfold", "ort"]]
    assert tools.round_robin([], 3) == []


@pytest.fixture
def fake_runs(monkeypatch):
    """run_once replaced: records the order, writes the output, 'fails' where told to."""
    calls, fail_at = [], {}

    def run_once(tool, src, dst, *, timeout):
        calls.append((tool, dst.parent.name))
        dst.parent.mkdir(parents=True, exist_ok=True)
        ok = fail_at.get(tool) != len([c for c in calls if c[0] == tool]) - 1
        if ok:
            dst.write_text(tool)
        wall = {"floor": 1.0, "bnfold": 0.5, "peer": 2.0}[tool] + 0.1 * len(calls)
        return tools.RunResult(ok, wall, 100, 0 if ok else 1, None if ok else "boom")

    monkeypatch.setattr(tools, "run_once", run_once)
    return calls, fail_at


def test_runs_are_interleaved_and_each_tool_keeps_its_last_output(fake_runs, tmp_path):
    calls, fail_at = fake_runs
    fail_at["peer"] = 1  # the peer's second run fails: it is not run a third time
    found = tools.measure_all(["floor", "bnfold", "peer"], tmp_path / "in.onnx", tmp_path, repeat=3)
    assert calls == [("floor", "run0"), ("bnfold", "run0"), ("peer", "run0"),
                     ("bnfold", "run1"), ("peer", "run1"), ("floor", "run1"),
                     ("floor", "run2"), ("bnfold", "run2")]
    # medians of the walls of each tool's own runs (1.0/0.5/2.0 + 0.1 per call so far)
    assert found["floor"].wall_s == pytest.approx(1.6) and found["bnfold"].wall_s == pytest.approx(0.9)
    assert [r.ok for r in found["peer"].runs] == [True, False]
    assert (found["peer"].ok, found["peer"].wall_s, found["peer"].output, found["peer"].reason) == (
        False, None, None, "boom")
    assert found["floor"].output == tmp_path / "floor" / "run2" / "out.onnx"
    # one output per tool on disk: earlier runs' folders are gone
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/run*")) == [
        "bnfold/run2", "floor/run2", "peer/run1"]


def test_compensated_rounding_runs_only_on_float16_and_bfloat16():
    t = tools.TOOLS["bnfold-compensated"]
    assert [t.runs_on(d) for d in ("float16", "bfloat16", "float32", "float64")] == [True, True, False, False]
    assert all(tools.TOOLS[n].runs_on("float32") for n in tools.TOOLS if n != "bnfold-compensated")


def test_command_runs_the_fp16_only_tool_where_it_applies(cache, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(bench_main, [
        "--workloads", "tiny-resnet,tiny-resnet-fp16", "--tools", "bnfold,bnfold-compensated", "--repeat", "2",
        "--runs", "3", "--samples", "2", "--cache", str(cache), "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(r["workload"], r["tool"]): r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == sorted([("tiny-resnet", t) for t in (UNFOLDED, "floor", "bnfold")]
                                  + [("tiny-resnet-fp16", t) for t in (UNFOLDED, "floor", "bnfold",
                                                                       "bnfold-compensated")])
    comp, floor = rows["tiny-resnet-fp16", "bnfold-compensated"], rows["tiny-resnet-fp16", "floor"]
    assert comp["ok"] and comp["bn"] == [3, 0] and len(comp["walls"]) == 2 and comp["samples"] == 2
    assert floor["fold_err"] == 0.0 and floor["err_ref"] == 0.0
    assert 0 < comp["fold_err"] < 1e-2  # float16 weights: the fold changed the function a little
    # every output and the unfolded model were timed side by side, in one group
    for r in rows.values():
        assert r["latency_group"] == 0 and set(r["latency_ms"]) == set(r["latency_wall_ms"]) == {"disable", "all"}
    unfolded = rows["tiny-resnet-fp16", UNFOLDED]["latency_ms"]["all"][0]
    assert all(r["latency_ms"]["all"][0] == unfolded for (w, _), r in rows.items() if w == "tiny-resnet-fp16")
    assert "bnfold fold --no-validate --rounding compensated" in result.stdout
    assert "--rounding compensated" not in "".join(ln for ln in result.stdout.splitlines()
                                                   if ln.startswith("| tiny-resnet |"))
