"""``python -m bench``: build the workloads, run every tool as its own process, print one table.

    python -m bench [--workloads a,b] [--tools x,y] [--repeat 3] [--runs 20] [--samples 4]
                    [--skip-large] [--quick] [--json results.json] [--markdown table.md]

For each workload:

1. build (or reuse) the model under ``.cache/bench/``;
2. run the tools that apply to it (``bnfold-compensated`` only on float16/bfloat16) ``--repeat``
   times each, **interleaved round-robin** (:func:`bench.tools.measure_all`), one child process
   per run, keeping each tool's last output;
3. measure the unfolded model once (:func:`bench.metrics.baseline`: input samples, reference
   outputs, float64 evaluation) and each output's structure and errors
   (:func:`bench.metrics.evaluate`), in one child process;
4. measure the ORT latency of every output and of the unfolded model **side by side in one
   child process** (:mod:`bench.latency`; in groups when they would not fit in memory);
5. delete the outputs (unless ``--keep-outputs``).

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

from bench import latency
from bench import workloads as wl
from bench.metrics import DEFAULT_SAMPLES
from bench.report import UNFOLDED, Row, add_ratios, render_markdown, render_targets
from bench.tools import REPO_ROOT, TOOLS, measure_all

QUICK = ("tiny-resnet-fp16", "tiny-wide-ext", "mlp", "decoder", "conv3d")
PACKAGES = ("bnfold", "onnx", "onnxruntime", "onnxoptimizer", "onnxslim", "onnxsim", "numpy", "torch")


def _split(value: str | None, known, what: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _child(module: str, args: list, timeout: float, what: str) -> dict:
    """``python -m MODULE ARGS`` in a child process; its JSON, or ``{"error": …}`` when it failed."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{what} timed out after {timeout:g} s"}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        tail = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        return {"error": f"{what} failed: {tail[:160]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(src: Path, outputs: dict[str, Path], folder: Path, timeout: float,
             samples: int) -> tuple[dict, dict[str, dict]]:
    """The unfolded model's baseline and every output's evaluation (:mod:`bench.metrics`), in one
    child process; if that child dies, again with the baseline and each output in a child of
    its own, so a crashing output costs its own cell only."""
    pairs = [f"{name}={path}" for name, path in outputs.items()]
    got = _child("bench.metrics", ["measure", src, folder, samples, *pairs], timeout * (1 + len(outputs)),
                 "measuring the outputs")
    if "error" not in got:
        return got["baseline"], got["outputs"]
    base = _child("bench.metrics", ["baseline", src, folder, samples], timeout, "measuring the unfolded model")
    if "error" in base:
        return base, {}
    out = {}
    for name, pair in zip(outputs, pairs):
        one = _child("bench.metrics", ["evaluate", folder, pair], timeout, "measuring the output")
        out[name] = one.get(name, one)
    return base, out


def _warm_page_cache(src: Path) -> None:
    """Read the model's files once, so the first tool run does not pay for a cold cache alone."""
    for f in src.parent.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 22):
                    pass


def _measure_latency(name: str, base_dir: Path, src: Path, base: dict, rows: dict[str, Row],
                     outputs: dict[str, Path], runs: int, timeout: float) -> list[list[str]]:
    """Latency of the unfolded model and every output, side by side (:mod:`bench.latency`);
    fills ``latency_ms`` of ``rows`` (tool → row, the unfolded row included). Returns the groups."""
    sizes = {UNFOLDED: base["bytes"], **{t: rows[t].bytes[1] for t in outputs}}
    paths = {UNFOLDED: src, **outputs}
    groups = latency.plan_groups(sizes, UNFOLDED)
    for gi, group in enumerate(groups):
        if len(groups) > 1:
            _log(f"[{name}] latency group {gi + 1}/{len(groups)}: {', '.join(group)}")
        got = _child("bench.latency", [base_dir, runs, *(f"{n}={paths[n]}" for n in group)], timeout,
                     "measuring latency")
        anchor = got.get(UNFOLDED, {}) if "error" not in got else {}
        for n in group:
            row, res = rows[n], (got.get(n, {}) if "error" not in got else got)
            if n == UNFOLDED and gi > 0:
                continue  # the unfolded row shows its first group's figures
            row.latency_group = gi
            if "error" in res:
                row.latency_reason = res["error"]
                continue
            for lv in latency.LEVELS:
                if lv in res and lv in anchor:
                    row.latency_ms[lv] = (anchor[lv]["median_ms"], res[lv]["median_ms"])
                    row.latency_iqr_ms[lv] = (res[lv]["p25_ms"], res[lv]["p75_ms"])
                    row.latency_wall_ms[lv] = (anchor[lv]["wall"]["median_ms"], res[lv]["wall"]["median_ms"])
    return groups


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
              timeout: float, keep_outputs: bool = False, samples: int = DEFAULT_SAMPLES) -> tuple[list[Row], dict]:
    """Measure every (workload, tool); returns the rows and the run's environment notes."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = cache / "runs" / stamp
    env = {"date": stamp, "python": platform.python_version(), "cpus": os.cpu_count(),
           "load_start": os.getloadavg(), "versions": _versions(), "repeat": repeat,
           "latency_runs": runs, "samples": samples, "latency_groups": {},
           "command": " ".join(["python -m bench", *sys.argv[1:]])}
    rows: list[Row] = []
    for name in workloads:
        w = wl.lookup(name)
        t = time.perf_counter()
        try:
            src = wl.model_path(w, cache)
        except Exception as exc:  # noqa: BLE001 - a workload that cannot be built is a row
            rows.append(Row(name, UNFOLDED, ok=False, reason=f"build failed: {exc}", dtype=w.dtype))
            continue
        _log(f"[{name}] model ready in {time.perf_counter() - t:.1f} s ({sum(f.stat().st_size for f in src.parent.iterdir() if f.is_file()) / 2**20:.0f} MiB)")
        base_dir = run_dir / name / "baseline"
        here = [tool for tool in tools if TOOLS[tool].runs_on(w.dtype)]
        _warm_page_cache(src)

        def log(tool, rep, r, name=name):
            _log(f"[{name}] {tool} run {rep + 1}/{repeat}: "
                 + (f"{r.wall_s:.2f} s, {r.peak_rss / 2**20:.0f} MiB" if r.ok else f"failed: {r.reason}"))

        found = measure_all(here, src, run_dir / name, repeat=repeat, timeout=timeout, log=log)
        base, evaluated = _measure(src, {t: m.output for t, m in found.items() if m.ok}, base_dir, timeout,
                                   samples)
        if "error" in base:
            unfolded = Row(name, UNFOLDED, ok=False, reason=base["error"], dtype=w.dtype)
        else:
            unfolded = Row(name, UNFOLDED, bn=(base["bn"], base["bn"]), nodes=(base["nodes"], base["nodes"]),
                           bytes=(base["bytes"], base["bytes"]), err_f64=base["err_f64"],
                           samples=base["samples"], dtype=w.dtype, external_data=base["external_data"])
        rows.append(unfolded)
        by_tool: dict[str, Row] = {UNFOLDED: unfolded}
        outputs: dict[str, Path] = {}
        for tool in here:
            m = found[tool]
            row = Row(name, tool, ok=m.ok, reason=m.reason, wall_s=m.wall_s,
                      walls=[r.wall_s for r in m.runs], peak_rss=m.peak_rss, dtype=w.dtype)
            got = evaluated.get(tool)
            if got is not None:
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
                        row.fold_err, row.fold_err_reason = got["fold_err"], got.get("fold_err_reason")
                        row.samples = base["samples"]
                        outputs[tool] = m.output
            by_tool[tool] = row
            rows.append(row)
        if "error" not in base:
            groups = _measure_latency(name, base_dir, src, base, by_tool, outputs, runs, timeout)
            if len(groups) > 1:
                env["latency_groups"][name] = groups
        for tool in here:
            r = by_tool[tool]
            _log(f"[{name}] {tool}: " + (f"{r.wall_s:.2f} s, {r.peak_rss / 2**20:.0f} MiB; max err vs unfolded "
                                         f"{r.err_ref}, vs float64 {r.err_f64}, fold {r.fold_err}"
                                         if r.ok else f"failed: {r.reason}"))
            if not keep_outputs:
                shutil.rmtree(run_dir / name / tool, ignore_errors=True)
    env["load_end"] = os.getloadavg()
    add_ratios(rows)
    return rows, env


def render(rows: list[Row], env: dict) -> str:
    labels = {name: t.label for name, t in TOOLS.items()}
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    samples = env.get("samples", 1)
    head = [
        f"Run {env['date']} — `{env['command']}`",
        f"{env['cpus']} CPUs, load average {env['load_start'][0]:.1f} at start, "
        f"{env['load_end'][0]:.1f} at end; wall time and peak RSS: median of {env['repeat']} whole-process "
        f"runs per tool, the tools of a workload interleaved round-robin; ORT latency: CPU time per run "
        f"(1 intra-op thread), median of {env['latency_runs']} interleaved rounds (every output of a workload "
        f"and the unfolded model in one process, each run once per round; wall-time medians in the JSON); "
        f"errors: max over {samples} seeded input sample{'s' if samples != 1 else ''}.",
    ]
    for name, groups in env.get("latency_groups", {}).items():
        head.append(f"{name}: ORT latency measured in {len(groups)} groups (memory), each with the unfolded "
                    f"model: {'; '.join(', '.join(g[1:]) for g in groups)}.")
    head += [versions, "", render_markdown(rows, labels)]
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
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Interleaved rounds of onnxruntime runs per latency figure (each model once per round).")
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
              help="Seeded input samples the errors are the max over.")
@click.option("--skip-large", is_flag=True, help="Leave out the ≥ 1.4 GB external-data workload.")
@click.option("--quick", is_flag=True, help="Smoke run: tiny workloads, --repeat 1, --runs 5.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the raw numbers (every run) as JSON here.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the table here.")
@click.option("--cache", type=click.Path(file_okay=False), default=str(wl.DEFAULT_CACHE), show_default=True,
              help="Where built models and run folders live.")
@click.option("--timeout", type=float, default=1800, show_default=True, help="Seconds per tool run.")
@click.option("--keep-outputs", is_flag=True, help="Keep every tool's output model.")
def main(workloads, tools, repeat, runs, samples, skip_large, quick, json_path, md_path, cache, timeout,
         keep_outputs):
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
        repeat, runs = 1, 5
    rows, env = run_bench(chosen, tool_names, repeat=repeat, runs=runs, cache=Path(cache).absolute(),
                          timeout=timeout, keep_outputs=keep_outputs, samples=samples)
    text = render(rows, env)
    click.echo(text)
    if md_path:
        Path(md_path).write_text(text + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps({"env": env, "rows": [r.to_dict() for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
