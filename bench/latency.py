"""onnxruntime CPU latency of a workload's models, measured side by side in one process.

On a shared machine the same model measured twice, a minute apart, differs by ±30 %; a
comparison between outputs measured at different moments is decided by the load, not by
the graphs. So all the models of a workload (the unfolded model and every tool's output)
are measured in **one** child process, interleaved, per graph-optimization level:

1. create a session for every model (one intra-op thread), then warm each up (``WARMUP``
   runs);
2. run ``rounds`` rounds; in each round every model runs once, in an order rotated by one
   per round (so no model always follows the same neighbour);
3. report each model's median (and quartiles) over the rounds, of the process CPU time of
   each run (see :data:`CLOCKS`; the wall-time medians are reported beside it).

A load spike then lands on every model of the round alike. Levels: ``disable`` (what folding
itself buys) and ``all`` (what a user with default settings sees; it also folds any BN left).
Sessions of one level are freed before the next level's are created.

Memory: a session holds about the model's size (more while it is created and at ``all``),
so :func:`plan_groups` splits a workload whose models together exceed ``GROUP_BYTES`` into
groups measured one after the other, each with the unfolded model in it (the anchor): within a
group, models are compared directly; across groups, each relative to its group's unfolded
model. Only wide-XL (1.4 GB per model) needs this.

``python -m bench.latency FOLDER ROUNDS NAME=MODEL …`` (inputs from ``FOLDER/latency_feeds.npz``,
see :mod:`bench.metrics`) prints ``{name: {level: {"median_ms", "p25_ms", "p75_ms", "wall": {…the
same…}}} or {"error": …}}`` as JSON (CPU time; wall time under ``wall``).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

LEVELS = ("disable", "all")
WARMUP = 2
#: Sum of model file sizes measured in one group (see module doc): 4.5 GiB = three 1.4 GB models.
GROUP_BYTES = int(4.5 * 2**30)


def plan_groups(sizes: dict[str, int], anchor: str, budget: int = GROUP_BYTES) -> list[list[str]]:
    """Split the models ``sizes`` (name → bytes, in order) into groups of at most ``budget``
    bytes, each starting with ``anchor``; a group holds at least one model besides the anchor."""
    others = [n for n in sizes if n != anchor]
    groups: list[list[str]] = []
    current: list[str] = []
    used = sizes[anchor]
    for name in others:
        if current and used + sizes[name] > budget:
            groups.append([anchor, *current])
            current, used = [], sizes[anchor]
        current.append(name)
        used += sizes[name]
    groups.append([anchor, *current])
    return groups


#: The clocks every run is timed with: wall time, and the CPU time of this process. With one
#: intra-op thread onnxruntime computes on the calling thread, so the CPU time is what the run
#: costs; wall time also counts the moments another process had the core (on this shared
#: 2-core machine, at load ~5, a 4 ms run then takes 4 or 8 ms at random; its CPU time stays 4).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def interleave(runs: dict[str, Callable[[], object]], rounds: int, *, warmup: int = WARMUP,
               clocks: dict[str, Callable[[], float]] | None = None) -> dict[str, dict[str, list[float]]]:
    """Warm every callable up, then time ``rounds`` rounds of one call each, rotating the order.

    Returns clock → name → the ``rounds`` durations (seconds), in round order.
    """
    clocks = CLOCKS if clocks is None else clocks
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    times = {c: {n: [] for n in names} for c in clocks}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            start = {c: clock() for c, clock in clocks.items()}
            runs[name]()
            for c, clock in clocks.items():
                times[c][name].append(clock() - start[c])
    return times


def summary_ms(durations: list[float]) -> dict[str, float]:
    """Median and quartiles of ``durations`` (seconds), in milliseconds."""
    ms = sorted(d * 1e3 for d in durations)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "p25_ms": q1, "p75_ms": q3}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def measure(models: dict[str, Path], feeds: dict, rounds: int, levels=LEVELS) -> dict[str, dict]:
    """Latency of every model at every level, interleaved (see module doc)."""
    from bench.metrics import session

    out: dict[str, dict] = {name: {} for name in models}
    for level in levels:
        sessions = {}
        for name, path in models.items():
            if "error" in out[name]:
                continue
            try:
                sessions[name] = session(Path(path), level, threads=1)
                sessions[name].run(None, feeds)  # fails here, not in the middle of a round
            except Exception as exc:  # noqa: BLE001 - one broken model is one cell
                sessions.pop(name, None)
                out[name] = {"error": f"onnxruntime ({level}): {_one_line(exc)}"}
        timed = interleave({n: (lambda s: lambda: s.run(None, feeds))(s) for n, s in sessions.items()}, rounds)
        for name in sessions:
            out[name][level] = {**summary_ms(timed["cpu"][name]), "wall": summary_ms(timed["wall"][name])}
        sessions.clear()  # free this level's sessions before the next level creates its own
        gc.collect()
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3 or any("=" not in a for a in argv[2:]):
        print("usage: python -m bench.latency FOLDER ROUNDS NAME=MODEL …", file=sys.stderr)
        return 2
    from bench.metrics import load_latency_feeds

    folder, rounds = Path(argv[0]), int(argv[1])
    models = dict(a.split("=", 1) for a in argv[2:])
    print(json.dumps(measure({k: Path(v) for k, v in models.items()}, load_latency_feeds(folder), rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
