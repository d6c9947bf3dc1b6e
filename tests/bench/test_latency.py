"""Latency is measured side by side: every model once per round, order rotated, medians; big
workloads split into groups that each hold the unfolded model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench import latency, metrics
from bench.tools import REPO_ROOT

GiB = 2**30


class FakeClock:
    """Time that passes only when a model runs: each call costs its model's time, times
    ``factor`` during round ``spike_round`` (a load spike)."""

    def __init__(self, cost: dict[str, float], *, warmup: int, spike_round: int | None = None, factor: float = 1.0):
        self.now, self.calls = 0.0, []
        self.cost, self.warmup, self.spike_round, self.factor = cost, warmup, spike_round, factor

    def __call__(self) -> float:
        return self.now

    def runner(self, name):
        def run():
            self.calls.append(name)
            timed = len(self.calls) - self.warmup * len(self.cost)  # 1-based among the timed calls
            rnd = (timed - 1) // len(self.cost) if timed > 0 else None
            self.now += self.cost[name] * (self.factor if rnd == self.spike_round else 1.0)
        return run

    def runs(self):
        return {n: self.runner(n) for n in self.cost}


def test_every_round_runs_every_model_once_in_rotated_order():
    clock = FakeClock({"u": 1.0, "a": 2.0, "b": 3.0}, warmup=2)
    times = latency.interleave(clock.runs(), rounds=4, warmup=2, clocks={"t": clock})["t"]
    assert clock.calls == ["u", "u", "a", "a", "b", "b",      # warm-up, not timed
                           "u", "a", "b", "a", "b", "u", "b", "u", "a", "u", "a", "b"]
    assert times == {"u": [1.0] * 4, "a": [2.0] * 4, "b": [3.0] * 4}


def test_a_load_spike_lands_on_every_model_and_the_medians_ignore_it():
    clock = FakeClock({"u": 0.010, "a": 0.008}, warmup=2, spike_round=1, factor=3.0)
    times = latency.interleave(clock.runs(), rounds=5, warmup=2, clocks={"t": clock})["t"]
    assert times["u"][1] == pytest.approx(0.030) and times["a"][1] == pytest.approx(0.024)
    assert [t for i, t in enumerate(times["u"]) if i != 1] == pytest.approx([0.010] * 4)
    med = {n: latency.summary_ms(t)["median_ms"] for n, t in times.items()}
    assert med == pytest.approx({"u": 10.0, "a": 8.0})


def test_summary_is_median_and_quartiles_in_ms():
    assert latency.summary_ms([0.001, 0.002, 0.003, 0.004, 0.010]) == pytest.approx(
        {"median_ms": 3.0, "p25_ms": 2.0, "p75_ms": 4.0})
    assert latency.summary_ms([0.005]) == {"median_ms": 5.0, "p25_ms": 5.0, "p75_ms": 5.0}


def test_groups_fit_the_memory_budget_and_each_holds_the_unfolded_model():
    sizes = {"(unfolded)": int(1.4 * GiB), **{t: int(1.4 * GiB) for t in "abcde"}}
    assert latency.plan_groups(sizes, "(unfolded)", budget=int(4.5 * GiB)) == [
        ["(unfolded)", "a", "b"], ["(unfolded)", "c", "d"], ["(unfolded)", "e"]]
    small = {"(unfolded)": 100, "a": 100, "b": 100}
    assert latency.plan_groups(small, "(unfolded)") == [["(unfolded)", "a", "b"]]
    # A model that alone exceeds the budget still gets measured, beside the unfolded one.
    assert latency.plan_groups({"(unfolded)": 5, "a": 10, "b": 1}, "(unfolded)", budget=8) == [
        ["(unfolded)", "a"], ["(unfolded)", "b"]]


def test_the_child_measures_every_model_and_reports_a_broken_one(tiny, tmp_path):
    metrics.baseline(tiny, tmp_path / "base", samples=1)
    twin = tmp_path / "twin.onnx"
    shutil.copy(tiny, twin)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    cmd = [sys.executable, "-m", "bench.latency", str(tmp_path / "base"), "3",
           f"(unfolded)={tiny}", f"floor={twin}", f"bad={broken}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    got = json.loads(proc.stdout)
    assert set(got) == {"(unfolded)", "floor", "bad"}
    assert got["bad"]["error"].startswith("onnxruntime (disable): ")
    for name in ("(unfolded)", "floor"):
        assert set(got[name]) == {"disable", "all"}
        for lv in ("disable", "all"):
            for s in (got[name][lv], got[name][lv]["wall"]):  # CPU time, wall time
                assert 0 < s["p25_ms"] <= s["median_ms"] <= s["p75_ms"] < 1000
    assert np.load(tmp_path / "base" / "latency_feeds.npz")["input"].shape == (1, 3, 8, 8)


def test_cpu_time_ignores_the_moments_another_process_has_the_core():
    # Two clocks on the same runs: 'wall' sees a spike of waiting, 'cpu' does not.
    state = {"wall": 0.0, "cpu": 0.0, "n": 0}

    def run():
        state["n"] += 1
        state["cpu"] += 0.004
        state["wall"] += 0.004 + (0.004 if state["n"] % 2 else 0.0)  # descheduled every other run

    times = latency.interleave({"m": run}, rounds=6, warmup=0,
                               clocks={"cpu": lambda: state["cpu"], "wall": lambda: state["wall"]})
    assert times["cpu"]["m"] == pytest.approx([0.004] * 6)
    assert sorted(times["wall"]["m"]) == pytest.approx([0.004] * 3 + [0.008] * 3)
