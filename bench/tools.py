"""The tools the bench compares, and how one run of one tool is measured.

A run is one child process, ``python -m bench.run_tool TOOL IN OUT`` (see
:mod:`bench.run_tool`), started by this process and reaped with ``os.wait4``, whose resource
usage is that child's alone; the wall time runs from spawn to exit. Peak memory is the
runner's own VmHWM (the high-water RSS of the tool process, imports included), which the
runner writes on its way out; ``ru_maxrss`` is only the fallback for a runner that died
without writing it, because on Linux a child started by fork/vfork + exec inherits the
parent's high-water mark in ``ru_maxrss``. Nothing else runs in the child, so the two numbers are what a user running
the tool sees.

A run fails when the child exits non-zero, is killed (signal, timeout) or writes no output;
the failure is data (:class:`RunResult` with a one-line ``reason``), never an exception.

The ``repeat`` runs of a workload's tools are interleaved round-robin (:func:`measure_all`):
run 1 of every tool, then run 2 of every tool (the order rotated), … — so a load spike on this
shared machine lands on all tools alike instead of shifting one tool's median.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Tool:
    name: str
    label: str          # what the table shows
    dtypes: tuple[str, ...] | None = None  # runs only on workloads of these dtypes (None: all)

    def runs_on(self, dtype: str) -> bool:
        return self.dtypes is None or dtype in self.dtypes


TOOLS: dict[str, Tool] = {t.name: t for t in [
    Tool("floor", "onnx.load+onnx.save (floor)"),
    Tool("bnfold", "bnfold fold --no-validate"),
    Tool("bnfold-validate", "bnfold fold (+ validation)"),
    Tool("bnfold-compensated", "bnfold fold --no-validate --rounding compensated", dtypes=("float16", "bfloat16")),
    Tool("onnxoptimizer", "onnxoptimizer fuse_bn_into_conv"),
    Tool("onnxslim", "onnxslim"),
    Tool("onnxsim", "onnxsim"),
    Tool("ort-basic", "onnxruntime basic"),
    Tool("ort-extended", "onnxruntime extended"),
]}


@dataclass
class RunResult:
    ok: bool
    wall_s: float
    peak_rss: int                   # bytes
    returncode: int
    reason: str | None = None       # one line, when not ok


@dataclass
class Measurement:
    """``repeat`` runs of one tool on one model: medians, every run, the output of the last."""

    tool: str
    runs: list[RunResult] = field(default_factory=list)
    output: Path | None = None

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    @property
    def reason(self) -> str | None:
        return next((r.reason for r in self.runs if not r.ok), None)

    @property
    def wall_s(self) -> float | None:
        return statistics.median(r.wall_s for r in self.runs) if self.ok else None

    @property
    def peak_rss(self) -> int | None:
        return int(statistics.median(r.peak_rss for r in self.runs)) if self.ok else None


def _last_line(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_once(tool: str, src: Path, dst: Path, *, timeout: float = 1800) -> RunResult:
    """One child process running ``tool`` on ``src`` into ``dst`` (its folder is created)."""
    dst = Path(dst).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    out_log, err_log = dst.parent / "stdout.log", dst.parent / "stderr.log"
    cmd = [sys.executable, "-m", "bench.run_tool", tool, str(Path(src).resolve()), str(dst)]
    timed_out = threading.Event()
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        start = time.perf_counter()
        rss_file = dst.parent / "peak_rss"
        rss_file.unlink(missing_ok=True)
        env = {**os.environ, "BENCH_PEAK_RSS_FILE": str(rss_file)}
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env)

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped here; keep Popen from waiting on a pid that is gone
    try:
        rss = int(rss_file.read_text())
    except (OSError, ValueError):
        rss = usage.ru_maxrss * 1024  # Linux reports KiB; includes the parent's peak (see above)
    reason = None
    if timed_out.is_set():
        reason = f"timed out after {timeout:g} s"
    elif code < 0:
        reason = f"killed by {signal.Signals(-code).name}"
    elif code != 0:
        reason = _last_line(err_log) or _last_line(out_log) or f"exit status {code}"
    elif not dst.is_file():
        reason = "exited 0 but wrote no output"
    return RunResult(reason is None, wall, rss, code, _one_line(reason) if reason else None)


def round_robin(tools: list[str], repeat: int) -> list[list[str]]:
    """The order of the runs: repetition ``r`` runs every tool once, the list rotated by ``r``,
    so every tool samples the same stretch of machine load and takes every position."""
    n = len(tools)
    return [tools[r % n:] + tools[:r % n] for r in range(repeat)] if n else []


def measure_all(tools: list[str], src: Path, workdir: Path, *, repeat: int = 3, timeout: float = 1800,
                log=None) -> dict[str, Measurement]:
    """Run every tool ``repeat`` times, interleaved (:func:`round_robin`); keep each tool's last output.

    A tool stops at its first failure (its later turns are skipped). Run ``r`` of a tool writes
    into ``workdir/<tool>/run<r>/``; its previous run's folder is removed first, so the
    workload needs disk for one output per tool. ``log(tool, rep, result)`` is called after
    each run.
    """
    import shutil

    found = {t: Measurement(t) for t in tools}
    for rep, order in enumerate(round_robin(list(tools), repeat)):
        for tool in order:
            m = found[tool]
            if m.runs and not m.runs[-1].ok:
                continue
            if m.output is not None:
                shutil.rmtree(m.output.parent, ignore_errors=True)
                m.output = None
            folder = Path(workdir) / tool / f"run{rep}"
            shutil.rmtree(folder, ignore_errors=True)
            result = run_once(tool, src, folder / "out.onnx", timeout=timeout)
            m.runs.append(result)
            if result.ok:
                m.output = folder / "out.onnx"
            if log is not None:
                log(tool, rep, result)
    return found


def measure(tool: str, src: Path, workdir: Path, *, repeat: int = 3, timeout: float = 1800) -> Measurement:
    """Run one tool ``repeat`` times (stopping at the first failure); keep the last output."""
    return measure_all([tool], src, workdir, repeat=repeat, timeout=timeout)[tool]
