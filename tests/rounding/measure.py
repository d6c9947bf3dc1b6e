"""Measure how folding float16 models affects their error against a float64 evaluation.

    .venv/bin/python -m tests.rounding.measure [--seeds 5] [--workloads resnet50-fp16,...] [--no-peers]

For each workload — the bench's ``resnet50-fp16`` and float16 twins of its ``mobilenetv2``,
``decoder`` and ``mlp`` builders, built here into ``.cache/rounding/``, each as built (random
BN statistics, which do not describe the activations random inputs produce) and as ``…+cal``
(statistics re-estimated with ``bnfold.calibration`` on 4 other seeded input batches: like a
trained model, its BN statistics describe its activations) — and each variant —
the unfolded model, bnfold with ``rounding="nearest"`` and ``"compensated"``, and the peers
(onnxoptimizer, onnxslim, onnxsim, onnxruntime basic, each run as the bench runs them) — it prints,
as the median over ``--seeds`` seeded standard-normal inputs:

* ``max|err|``: max |output − float64 evaluation of the unfolded model| with the variant run
  in onnxruntime CPU (ORT_DISABLE_ALL): what the bench's "max error vs float64" column shows;
* ``rms err``: the root-mean-square of the same difference (less dominated by the final fp16
  rounding of the output, which alone is up to ½ ULP of the largest output);
* ``(worst)``: the largest ``max|err|`` over the seeds;
* ``fold err``: max |float64 evaluation of the variant − float64 evaluation of the unfolded
  model|: the error that the folded *weights* cause, without any runtime rounding (left
  blank for a variant with an op the float64 evaluator lacks). onnxruntime's CPU provider
  runs these float16 graphs in float32 between casts, so ``max|err|`` is about this plus
  the output's own float16 rounding (the unfolded model's ``max|err|`` is that rounding alone);

and, for compensated vs nearest, on how many seeds each metric improved. All eight
workloads, 5 seeds, peers included: ~10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from bench.metrics import max_error, random_feeds
from bench.reference64 import evaluate_float64
from bench.workloads import WORKLOADS, decoder, mlp, mobilenetv2, model_path

import bnfold

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "rounding"
TWINS = {"mobilenetv2-fp16": mobilenetv2, "decoder-fp16": decoder, "mlp-fp16": mlp}
DEFAULT_WORKLOADS = tuple(f"{n}{c}" for n in ("resnet50-fp16", "mobilenetv2-fp16", "decoder-fp16", "mlp-fp16")
                          for c in ("", "+cal"))
CALIBRATION_SEED = 1000  # the evaluation seeds are 0 … seeds-1: other draws of the same distribution
PEERS = ("onnxoptimizer", "onnxslim", "onnxsim", "ort-basic")


def _save(model: onnx.ModelProto, path: Path) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)


def workload_path(name: str) -> Path:
    """The model file of ``name`` (``…+cal``: its BN statistics re-estimated, see module doc)."""
    if name.endswith("+cal"):
        path = CACHE / f"{name}.onnx"
        if not path.is_file():
            from bnfold.calibration import calibrate

            src = workload_path(name[: -len("+cal")])
            batches = [random_feeds(src, CALIBRATION_SEED + i) for i in range(4)]
            _save(calibrate(src, batches, validate=False).model, path)
        return path
    if name in WORKLOADS:
        return model_path(WORKLOADS[name])
    path = CACHE / f"{name}.onnx"
    if not path.is_file():
        _save(TWINS[name](np.float16), path)
    return path


def run_ort(model: onnx.ModelProto | Path, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def rms_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    d = np.concatenate([(np.asarray(x, np.float64) - np.asarray(y, np.float64)).ravel() for x, y in zip(a, b)])
    return float(np.sqrt(np.mean(d * d)))


def variants(src: Path, workdir: Path, peers: bool) -> dict[str, onnx.ModelProto | Path]:
    out: dict[str, onnx.ModelProto | Path] = {"unfolded": src}
    for rounding in ("nearest", "compensated"):
        out[f"bnfold {rounding}"] = bnfold.fold(src, rounding=rounding).model
    for tool in PEERS if peers else ():
        dst = workdir / f"{src.stem}.{tool}.onnx"
        proc = subprocess.run([sys.executable, "-m", "bench.run_tool", tool, str(src), str(dst)],
                              capture_output=True, text=True)
        if proc.returncode == 0 and dst.is_file():
            out[tool] = dst
        else:
            print(f"  {tool}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return out


def bn_count(model: onnx.ModelProto | Path) -> int:
    if isinstance(model, Path):
        model = onnx.load(str(model))
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def measure(name: str, seeds: int, peers: bool) -> dict[str, dict[str, list[float]]]:
    src = workload_path(name)
    unfolded = onnx.load(str(src))
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = variants(src, Path(tmp), peers)
        no_float64: set[str] = set()
        for seed in range(seeds):
            feeds = random_feeds(src, seed)
            f64 = evaluate_float64(unfolded, feeds)
            for label, model in models.items():
                out = run_ort(model, feeds)
                row = results.setdefault(label, {"max": [], "rms": [], "fold": [], "bn": [bn_count(model)]})
                row["max"].append(max_error(out, f64))
                row["rms"].append(rms_error(out, f64))
                if label != "unfolded" and label not in no_float64:
                    try:
                        loaded = onnx.load(str(model)) if isinstance(model, Path) else model
                        row["fold"].append(max_error(evaluate_float64(loaded, feeds), f64))
                    except NotImplementedError:  # an op the float64 evaluator lacks
                        no_float64.add(label)
    return results


def report(name: str, results: dict[str, dict[str, list[float]]], seeds: int) -> str:
    lines = [f"{name} ({seeds} seeds, medians)",
             f"  {'variant':<22}{'BN left':>8}{'max|err|':>11}{'(worst)':>11}{'rms err':>11}{'fold err':>11}"]
    for label, row in results.items():
        fold = f"{statistics.median(row['fold']):11.3e}" if len(row["fold"]) == len(row["max"]) else f"{'':>11}"
        lines.append(f"  {label:<22}{row['bn'][0]:8d}{statistics.median(row['max']):11.3e}{max(row['max']):11.3e}"
                     f"{statistics.median(row['rms']):11.3e}{fold}")
    near, comp = results["bnfold nearest"], results["bnfold compensated"]
    for metric in ("max", "rms", "fold"):
        ratios = [c / n for c, n in zip(comp[metric], near[metric]) if n > 0]
        if ratios:
            better = sum(r < 1 for r in ratios)
            lines.append(f"  compensated/nearest {metric:>4}: median ratio {statistics.median(ratios):.3f}, "
                         f"better on {better}/{len(ratios)} seeds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args(argv)
    for name in args.workloads.split(","):
        print(report(name, measure(name, args.seeds, not args.no_peers), args.seeds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
