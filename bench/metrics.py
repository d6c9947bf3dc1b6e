"""What the bench measures about a model file: structure, size and error (latency: :mod:`bench.latency`).

Per workload, :func:`baseline` runs once on the *unfolded* model and stores in a folder: the
seeded random input samples (``feeds_<i>.npz``), the unfolded model's onnxruntime CPU outputs
with ``ORT_DISABLE_ALL`` (``ref_<i>.npz``: onnxruntime would otherwise fold BN itself and the
reference would already be folded), its float64 evaluation (``f64_<i>.npz``, see
:mod:`bench.reference64`), the one-sample input the latency phase uses (``latency_feeds.npz``)
and ``baseline.json`` (BN and node counts, bytes, the unfolded model's own error vs float64).
:func:`evaluate` then measures a tool's output against them.

Samples: ``samples`` seeded standard-normal draws (sample *i* drawn with seed *i*, symbolic
dims → 1). When every graph input has a symbolic first (batch) dimension the samples are
stacked along it and run as one batch; otherwise they run one by one. Either way the values
are the same, and every error is the max over all samples.

Errors are max |a − b| over every element of every output, computed in float64 (fp16
outputs are upcast first); a NaN or an Inf in an output makes the error ``inf``:

* ``err_ref``: the output run in onnxruntime vs the unfolded model run in onnxruntime;
* ``err_f64``: the output run in onnxruntime vs the float64 evaluation of the unfolded model
  (on float32 models this is dominated by onnxruntime's own float32 accumulation);
* ``fold_err``: the *float64 evaluation of the output* vs that of the unfolded model — what
  the fold did to the function, free of runtime noise (``fold_err_reason`` says why it is
  missing when the evaluator cannot run the output).

Both run in a child process (``python -m bench.metrics measure|baseline|evaluate …``, JSON on
stdout): the bench measures the unfolded model and all outputs of a workload in one child
(torch's import alone takes ~2 s) and, should that child die (a tool output that crashes
onnxruntime), again with the baseline and each output in a child of its own, so a broken
output costs one table cell, not the bench.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx

DEFAULT_SAMPLES = 4


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


def session(path: Path, level: str = "disable", threads: int = 1):
    """An onnxruntime CPU session at ``level`` (disable/basic/extended/all)."""
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


_session = session  # the name earlier code used


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def random_feeds(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for every graph input (symbolic dims → 1)."""
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in _graph_inputs(model):
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def batch_is_symbolic(path: Path) -> bool:
    """Every graph input has a symbolic (or unknown) first dimension: samples can be stacked."""
    model = onnx.load(str(path), load_external_data=False)
    inputs = _graph_inputs(model)
    return bool(inputs) and all(
        len(vi.type.tensor_type.shape.dim) > 0 and not vi.type.tensor_type.shape.dim[0].HasField("dim_value")
        for vi in inputs)


def sample_feeds(path: Path, samples: int = DEFAULT_SAMPLES) -> list[dict[str, np.ndarray]]:
    """``samples`` seeded draws (seed i for sample i): one stacked batch when the batch dim is
    symbolic, else one feed dict per sample. The values are the same either way."""
    draws = [random_feeds(path, seed) for seed in range(samples)]
    if samples > 1 and batch_is_symbolic(path):
        return [{name: np.concatenate([d[name] for d in draws], axis=0) for name in draws[0]}]
    return draws


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


def max_error_samples(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    """:func:`max_error` over several samples (one list of outputs per sample): the max."""
    return max(max_error(x, y) for x, y in zip(a, b, strict=True))


def _outputs(path: Path, samples: list[dict],
             names: list[str] | None = None) -> tuple[list[str], list[list[np.ndarray]]]:
    sess = session(path, "disable", threads=0)
    names = names or [o.name for o in sess.get_outputs()]
    return names, [sess.run(names, feeds) for feeds in samples]


def _save_samples(folder: Path, stem: str, names: list[str], values: list[list[np.ndarray]]) -> None:
    for i, outs in enumerate(values):
        np.savez(folder / f"{stem}_{i}.npz", **dict(zip(names, outs)))


def _load_samples(folder: Path, stem: str, count: int, names: list[str] | None = None) -> list:
    out = []
    for i in range(count):
        with np.load(folder / f"{stem}_{i}.npz") as z:
            out.append({k: z[k] for k in z.files} if names is None else [z[n] for n in names])
    return out


def load_latency_feeds(folder: Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / "latency_feeds.npz") as z:
        return {k: z[k] for k in z.files}


def _float64(model_path: Path, samples: list[dict], names: list[str]) -> list[list[np.ndarray]]:
    from bench.reference64 import evaluate_float64_samples

    return evaluate_float64_samples(onnx.load(str(model_path)), samples, names)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return "torch is not installed"
    return " ".join(str(exc).split()).removeprefix("float64 reference: ")[:120]


def baseline(model_path: Path, folder: Path, *, samples: int = DEFAULT_SAMPLES) -> dict:
    """Measure the unfolded model once; store inputs and reference outputs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    feeds = sample_feeds(model_path, samples)
    for i, f in enumerate(feeds):
        np.savez(folder / f"feeds_{i}.npz", **f)
    np.savez(folder / "latency_feeds.npz", **random_feeds(model_path, 0))
    names, ref = _outputs(model_path, feeds)
    _save_samples(folder, "ref", names, ref)
    header = onnx.load(str(model_path), load_external_data=False)
    bn, nodes = count_ops(header)
    info = {"outputs": names, "feed_sets": len(feeds), "samples": samples, "batched": len(feeds) < samples,
            "bn": bn, "nodes": nodes, "bytes": files_size(model_path), "external_data": _uses_external_data(header)}
    del header
    try:
        f64 = _float64(model_path, feeds, names)
        _save_samples(folder, "f64", names, f64)
        info["err_f64"] = max_error_samples(ref, f64)
    except (ImportError, NotImplementedError) as exc:
        info["f64_unavailable"] = _why(exc)
        info["err_f64"] = None
    (folder / "baseline.json").write_text(json.dumps(info, indent=1))
    return info


def evaluate(model_path: Path, folder: Path) -> dict:
    """Measure a tool's output against the baseline stored in ``folder``."""
    base = json.loads((folder / "baseline.json").read_text())
    names = base["outputs"]
    feeds = _load_samples(folder, "feeds", base["feed_sets"])
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
    info["err_ref"] = max_error_samples(out, _load_samples(folder, "ref", len(feeds), names))
    if base.get("err_f64") is None:
        info["err_f64"] = info["fold_err"] = None
        info["fold_err_reason"] = f"no float64 reference: {base.get('f64_unavailable', 'unknown')}"
        return info
    f64 = _load_samples(folder, "f64", len(feeds), names)
    info["err_f64"] = max_error_samples(out, f64)
    del out
    try:
        info["fold_err"] = max_error_samples(_float64(model_path, feeds, names), f64)
    except (ImportError, NotImplementedError) as exc:
        info["fold_err"], info["fold_err_reason"] = None, _why(exc)
    return info


def evaluate_many(folder: Path, models: dict[str, Path]) -> dict[str, dict]:
    """:func:`evaluate` for several outputs in this one process (torch and onnxruntime are
    imported once); an output whose evaluation raises gets ``{"error": …}``."""
    out = {}
    for name, path in models.items():
        try:
            out[name] = evaluate(Path(path), Path(folder))
        except Exception as exc:  # noqa: BLE001 - one broken output is one cell
            msg = " ".join(str(exc).split())[:120]
            out[name] = {"error": f"measuring the output failed: {type(exc).__name__}: {msg}"}
    return out


USAGE = ("usage: python -m bench.metrics baseline MODEL FOLDER SAMPLES | evaluate FOLDER NAME=OUT … "
         "| measure MODEL FOLDER SAMPLES NAME=OUT …")


def _pairs(args: list[str]) -> dict[str, str] | None:
    return dict(a.split("=", 1) for a in args) if all("=" in a for a in args) else None


def main(argv: list[str]) -> int:
    """JSON on stdout: ``baseline MODEL FOLDER SAMPLES`` → the baseline; ``evaluate FOLDER
    NAME=OUT …`` → ``{name: evaluation}``; ``measure MODEL FOLDER SAMPLES NAME=OUT …`` → both,
    ``{"baseline": …, "outputs": {name: evaluation}}``, in one process (one torch import)."""
    what, args = (argv[0], argv[1:]) if argv else ("", [])
    if what == "baseline" and len(args) == 3:
        info = baseline(Path(args[0]), Path(args[1]), samples=int(args[2]))
    elif what == "evaluate" and len(args) >= 2 and _pairs(args[1:]) is not None:
        info = evaluate_many(Path(args[0]), _pairs(args[1:]))
    elif what == "measure" and len(args) >= 3 and _pairs(args[3:]) is not None:
        base = baseline(Path(args[0]), Path(args[1]), samples=int(args[2]))
        info = {"baseline": base, "outputs": evaluate_many(Path(args[1]), _pairs(args[3:]))}
    else:
        print(USAGE, file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
