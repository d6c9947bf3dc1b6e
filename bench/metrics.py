"""What the bench measures about a model file: structure, size, error and onnxruntime latency.

Per workload, :func:`baseline` runs once on the *unfolded* model and stores in a folder:
seeded random inputs (``feeds.npz``), the unfolded model's onnxruntime CPU outputs with
``ORT_DISABLE_ALL`` (``ref.npz``: onnxruntime would otherwise fold BN itself and the reference
would already be folded), the float64 evaluation of the unfolded model (``f64.npz``, see
:mod:`bench.reference64`) and ``baseline.json`` (BN and node counts, bytes, the unfolded model's
own error vs float64, latencies). :func:`evaluate` then measures a tool's output against them.

Errors are max |a − b| over every element of every output, computed in float64 (fp16
outputs are upcast first); a NaN or an Inf in an output makes the error ``inf``.

Latency: median over ``runs`` timed ``session.run`` calls after two warm-up calls, with one
intra-op thread (the bench machine is shared; one thread is the least noisy measure), at two
graph-optimization levels: ``disable`` (what folding itself buys) and ``all`` (what a user
running onnxruntime with default settings sees; it also folds any BN left).

Both run in a child process (``python -m bench.metrics baseline|evaluate …``, JSON on stdout),
so a tool output that crashes onnxruntime costs one table cell, not the bench.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

LEVELS = ("disable", "all")


def count_ops(model: onnx.ModelProto) -> tuple[int, int]:
    """(BatchNormalization nodes, all nodes), subgraphs and functions included."""
    bn = nodes = 0

    def walk(graph_nodes):
        nonlocal bn, nodes
        for n in graph_nodes:
            nodes += 1
            bn += n.op_type == "BatchNormalization"
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return bn, nodes


def files_size(path: str | Path) -> int:
    """Bytes of the model file plus the external-data files it names."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in onnx.external_data_helper._get_all_tensors(model)
                 for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations
                                     if (path.parent / loc).is_file())


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t)
               for t in onnx.external_data_helper._get_all_tensors(model))


def _session(path: Path, level: str, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def random_feeds(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for every graph input (symbolic dims → 1)."""
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def max_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """max |a − b| over all outputs, in float64; inf if any value is NaN/Inf or shapes differ."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            return float("inf")
        d = np.abs(x - y)
        if d.size and not np.all(np.isfinite(d)):
            return float("inf")
        worst = max(worst, float(d.max()) if d.size else 0.0)
    return worst


def latency_ms(path: Path, feeds: dict[str, np.ndarray], level: str, runs: int, threads: int = 1) -> float:
    sess = _session(path, level, threads)
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _outputs(path: Path, feeds, names: list[str] | None = None) -> tuple[list[str], list[np.ndarray]]:
    sess = _session(path, "disable", threads=0)
    names = names or [o.name for o in sess.get_outputs()]
    return names, sess.run(names, feeds)


def _npz_list(path: Path, names: list[str]) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[n] for n in names]


def baseline(model_path: Path, folder: Path, *, runs: int = 10, seed: int = 0) -> dict:
    """Measure the unfolded model once; store inputs and reference outputs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    feeds = random_feeds(model_path, seed)
    np.savez(folder / "feeds.npz", **feeds)
    names, ref = _outputs(model_path, feeds)
    np.savez(folder / "ref.npz", **dict(zip(names, ref)))
    header = onnx.load(str(model_path), load_external_data=False)
    bn, nodes = count_ops(header)
    info = {"outputs": names, "bn": bn, "nodes": nodes, "bytes": files_size(model_path),
            "external_data": _uses_external_data(header)}
    del header
    try:
        from bench.reference64 import evaluate_float64

        f64 = evaluate_float64(onnx.load(str(model_path)), feeds)
        np.savez(folder / "f64.npz", **dict(zip(names, f64)))
        info["err_f64"] = max_error(ref, f64)
    except (ImportError, NotImplementedError) as exc:
        info["f64_unavailable"] = f"{type(exc).__name__}: {exc}"
        info["err_f64"] = None
    info["latency_ms"] = {lv: latency_ms(model_path, feeds, lv, runs) for lv in LEVELS}
    (folder / "baseline.json").write_text(json.dumps(info, indent=1))
    return info


def evaluate(model_path: Path, folder: Path, *, runs: int = 10) -> dict:
    """Measure a tool's output against the baseline stored in ``folder``."""
    info_base = json.loads((folder / "baseline.json").read_text())
    names = info_base["outputs"]
    with np.load(folder / "feeds.npz") as z:
        feeds = {k: z[k] for k in z.files}
    header = onnx.load(str(model_path), load_external_data=False)
    bn, nodes = count_ops(header)
    info: dict = {"bn": bn, "nodes": nodes, "bytes": files_size(model_path),
                  "external_data": _uses_external_data(header)}
    del header
    try:
        _, out = _outputs(model_path, feeds, names)
    except Exception as exc:  # noqa: BLE001 - a tool's broken output is a table cell
        info["error"] = f"onnxruntime cannot run the output: {' '.join(str(exc).split())[:160]}"
        return info
    info["err_ref"] = max_error(out, _npz_list(folder / "ref.npz", names))
    info["err_f64"] = (max_error(out, _npz_list(folder / "f64.npz", names))
                       if (folder / "f64.npz").is_file() else None)
    info["latency_ms"] = {lv: latency_ms(model_path, feeds, lv, runs) for lv in LEVELS}
    return info


def main(argv: list[str]) -> int:
    """``python -m bench.metrics baseline|evaluate MODEL FOLDER RUNS`` → JSON on stdout."""
    what, model, folder, runs = argv
    fn = {"baseline": baseline, "evaluate": evaluate}[what]
    print(json.dumps(fn(Path(model), Path(folder), runs=int(runs))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
