"""``python -m bench``: build the workloads, run every tool as its own process, print one table.

    python -m bench [--workloads a,b] [--tools x,y] [--repeat 3] [--skip-large] [--quick]
                    [--json results.json] [--markdown table.md]

For each workload: build (or reuse) the model under ``.cache/bench/``, measure the unfolded
model once (:func:`bench.metrics.baseline`), then for each tool run it ``--repeat`` times as a
child process (:mod:`bench.tools`) and measure its last output (:func:`bench.metrics.evaluate`).
The floor (``onnx.load`` + ``onnx.save``) always runs, since every ratio is taken against it.
Progress goes to stderr; the Markdown table (and the targets it can answer) to stdout.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import click

from bench import workloads as wl
from bench.report import UNFOLDED, Row, add_ratios, render_markdown, render_targets
from bench.tools import REPO_ROOT, TOOLS, measure

QUICK = ("tiny-resnet", "tiny-wide-ext", "mlp", "decoder", "conv3d")
PACKAGES = ("bnfold", "onnx", "onnxruntime", "onnxoptimizer", "onnxslim", "onnxsim", "numpy", "torch")


def _split(value: str | None, known, what: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _metrics(what: str, model: Path, folder: Path, runs: int, timeout: float) -> dict:
    """``bench.metrics`` in a child process; a dict, with ``error`` set when it failed."""
    cmd = [sys.executable, "-m", "bench.metrics", what, str(model), str(folder), str(runs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"measuring the output timed out after {timeout:g} s"}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        tail = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        return {"error": f"measuring the output failed: {tail[:160]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _log(msg: str) -> None:
    click.echo(msg, err=True)


# This process must stay small: a child started by fork/vfork + exec inherits its parent's
# RSS high-water mark in ru_maxrss (Linux keeps the pre-exec mm's peak). So the parent never
# loads a model (sizes come from stat) and the runner reports its own VmHWM as well.


def run_bench(workloads: list[str], tools: list[str], *, repeat: int, runs: int, cache: Path,
              timeout: float, keep_outputs: bool = False) -> tuple[list[Row], dict]:
    """Measure every (workload, tool); returns the rows and the run's environment notes."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = cache / "runs" / stamp
    env = {"date": stamp, "python": platform.python_version(), "cpus": os.cpu_count(),
           "load_start": os.getloadavg(), "versions": _versions(), "repeat": repeat,
           "latency_runs": runs, "command": " ".join(["python -m bench", *sys.argv[1:]])}
    rows: list[Row] = []
    for name in workloads:
        w = wl.lookup(name)
        t = time.perf_counter()
        try:
            src = wl.model_path(w, cache)
        except Exception as exc:  # noqa: BLE001 - a workload that cannot be built is a row
            rows.append(Row(name, UNFOLDED, ok=False, reason=f"build failed: {exc}"))
            continue
        _log(f"[{name}] model ready in {time.perf_counter() - t:.1f} s ({sum(f.stat().st_size for f in src.parent.iterdir() if f.is_file()) / 2**20:.0f} MiB)")
        base_dir = run_dir / name / "baseline"
        base = _metrics("baseline", src, base_dir, runs, timeout)
        if "error" in base:
            rows.append(Row(name, UNFOLDED, ok=False, reason=base["error"]))
        else:
            rows.append(Row(name, UNFOLDED, bn=(base["bn"], base["bn"]), nodes=(base["nodes"], base["nodes"]),
                            bytes=(base["bytes"], base["bytes"]), err_f64=base["err_f64"],
                            external_data=base["external_data"],
                            latency_ms={lv: (v, v) for lv, v in base["latency_ms"].items()}))
        for tool in tools:
            m = measure(tool, src, run_dir / name / tool, repeat=repeat, timeout=timeout)
            row = Row(name, tool, ok=m.ok, reason=m.reason, wall_s=m.wall_s,
                      walls=[r.wall_s for r in m.runs], peak_rss=m.peak_rss)
            if m.ok and "error" not in base:
                got = _metrics("evaluate", m.output, base_dir, runs, timeout)
                if "error" in got and "bn" not in got:
                    row.ok, row.reason = False, got["error"]
                else:
                    row.bn = (base["bn"], got["bn"])
                    row.nodes = (base["nodes"], got["nodes"])
                    row.bytes = (base["bytes"], got["bytes"])
                    row.external_data = got["external_data"]
                    if "error" in got:
                        row.ok, row.reason = False, got["error"]
                    else:
                        row.err_ref, row.err_f64 = got["err_ref"], got["err_f64"]
                        row.latency_ms = {lv: (base["latency_ms"][lv], v) for lv, v in got["latency_ms"].items()}
            _log(f"[{name}] {tool}: " + (f"{row.wall_s:.2f} s, {row.peak_rss / 2**20:.0f} MiB"
                                         if row.wall_s is not None else f"failed: {row.reason}"))
            rows.append(row)
            if not keep_outputs:
                shutil.rmtree(run_dir / name / tool, ignore_errors=True)
    env["load_end"] = os.getloadavg()
    add_ratios(rows)
    return rows, env


def render(rows: list[Row], env: dict) -> str:
    labels = {name: t.label for name, t in TOOLS.items()}
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    head = [
        f"Run {env['date']} — `{env['command']}`",
        f"{env['cpus']} CPUs, load average {env['load_start'][0]:.1f} at start, "
        f"{env['load_end'][0]:.1f} at end; wall time and peak RSS: median of {env['repeat']} whole-process "
        f"runs; ORT latency: median of {env['latency_runs']} runs, 1 thread.",
        versions,
        "",
        render_markdown(rows, labels),
    ]
    t = render_targets(rows)
    if t:
        head += ["", t]
    return "\n".join(head)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workloads", default=None, metavar="A,B",
              help=f"Workloads to run (default: all): {', '.join(wl.WORKLOADS)}; tiny ones for --quick: "
                   f"{', '.join(wl.QUICK_WORKLOADS)}.")
@click.option("--tools", default=None, metavar="X,Y",
              help=f"Tools to run (default: all; the floor always runs): {', '.join(TOOLS)}.")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per (workload, tool); the table shows medians.")
@click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed onnxruntime runs per latency figure.")
@click.option("--skip-large", is_flag=True, help="Leave out the ≥ 1.4 GB external-data workload.")
@click.option("--quick", is_flag=True, help="Smoke run: tiny workloads, --repeat 1, --runs 3.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the raw numbers (every run) as JSON here.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the table here.")
@click.option("--cache", type=click.Path(file_okay=False), default=str(wl.DEFAULT_CACHE), show_default=True,
              help="Where built models and run folders live.")
@click.option("--timeout", type=float, default=1800, show_default=True, help="Seconds per tool run.")
@click.option("--keep-outputs", is_flag=True, help="Keep every tool's output model.")
def main(workloads, tools, repeat, runs, skip_large, quick, json_path, md_path, cache, timeout, keep_outputs):
    """Benchmark bnfold against the load+save floor and its peers (issue 8)."""
    known = [*wl.WORKLOADS, *wl.QUICK_WORKLOADS]
    chosen = _split(workloads, known, "workload")
    if chosen is None:
        chosen = list(QUICK) if quick else [n for n, w in wl.WORKLOADS.items() if not (skip_large and w.large)]
    elif skip_large:
        chosen = [n for n in chosen if not wl.lookup(n).large]
    tool_names = _split(tools, list(TOOLS), "tool") or list(TOOLS)
    if "floor" not in tool_names:
        tool_names.insert(0, "floor")
    if quick:
        repeat, runs = 1, 3
    rows, env = run_bench(chosen, tool_names, repeat=repeat, runs=runs, cache=Path(cache).absolute(),
                          timeout=timeout, keep_outputs=keep_outputs)
    text = render(rows, env)
    click.echo(text)
    if md_path:
        Path(md_path).write_text(text + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps({"env": env, "rows": [r.to_dict() for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
