"""Build the zoo: train briefly, recalibrate (Algorithm 2), export unfolded ONNX, cache.

    python -m models.build [--out DIR] [--only NAME,...] [--force]

For each model: seed everything, run a few SGD steps on synthetic data (a fixed random linear
teacher's targets, so the weights and the BN moving averages move), re-estimate every BN's
population statistics with :func:`bnfold.torch.recalibrate`, and export with
:func:`bnfold.torch.export` (TorchScript exporter, BN nodes kept, batch axis dynamic, opset 17,
IR 8), checked against torch with onnxruntime. Per model it writes

* ``DIR/<name>.onnx``        -- the unfolded model (input ``input``, output ``output``),
* ``DIR/<name>.inputs.npz``  -- the example input the export was checked with (key ``input``),
* ``DIR/<name>.json``        -- input shape, BN count, definition hash, how the stats were made.

Caching: the JSON records the definition hash -- SHA-256 of the models/ sources and the torch
version. A model is rebuilt only when its files are missing, the hash changed, or ``--force``.
The JSON is written last, so a build interrupted half-way is simply rebuilt next time; every
file is written atomically and a lock file serialises concurrent builders of one folder.
Builds run single-threaded (same bits everywhere, no thread oversubscription on shared CPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import models

DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".cache" / "models"
OPSET = 17
TRAIN_STEPS = 5
CALIBRATION_BATCHES = 8
SEED = 0


@dataclass(frozen=True)
class BuiltModel:
    """One model of the cache: its files, and whether this call (re)built it."""

    name: str
    onnx_path: Path
    json_path: Path
    inputs_path: Path
    built: bool
    seconds: float
    num_batchnorm: int


def _definition_files() -> list[Path]:
    return sorted(Path(models.__file__).resolve().parent.glob("*.py"))


def definition_hash() -> str:
    """SHA-256 over the models/ sources (name and content) and the torch version."""
    import torch

    digest = hashlib.sha256(f"torch {torch.__version__}\n".encode())
    for path in _definition_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _paths(name: str, out: Path) -> tuple[Path, Path, Path]:
    return out / f"{name}.onnx", out / f"{name}.json", out / f"{name}.inputs.npz"


def _is_fresh(name: str, out: Path, digest: str) -> bool:
    onnx_path, json_path, inputs_path = _paths(name, out)
    if not (onnx_path.is_file() and json_path.is_file() and inputs_path.is_file()):
        return False
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("definition_hash") == digest


def _synthetic_batch(shape, generator):
    import torch

    # Per-channel offsets and scales, so the BN statistics are far from (0, 1).
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    offset = torch.linspace(-1.0, 2.0, channels).view(view)
    scale = torch.linspace(0.5, 3.0, channels).view(view)
    return torch.randn(shape, generator=generator) * scale + offset


def _train_and_calibrate(model, shape, generator):
    import torch

    from bnfold.torch import recalibrate

    batch_shape = (16,) + tuple(shape[1:])
    model.train()
    with torch.no_grad():
        out_features = model(_synthetic_batch(batch_shape, generator)).flatten(1).shape[1]
    in_features = int(torch.tensor(batch_shape[1:]).prod())
    teacher = torch.randn(in_features, out_features, generator=generator) / in_features**0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(TRAIN_STEPS):
        x = _synthetic_batch(batch_shape, generator)
        loss = torch.nn.functional.mse_loss(model(x).flatten(1), x.flatten(1) @ teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batches = [_synthetic_batch(batch_shape, generator) for _ in range(CALIBRATION_BATCHES)]
    report = recalibrate(model, batches, progress=False)
    model.eval()
    return report, batch_shape


def build_one(name: str, out: Path, digest: str) -> BuiltModel:
    """Build model ``name`` into ``out`` unconditionally (see the module docstring)."""
    import numpy as np
    import torch

    from bnfold.torch import export

    start = time.perf_counter()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = models.build_model(name)
    shape = models.input_shape(name)
    report, batch_shape = _train_and_calibrate(model, shape, generator)
    example = _synthetic_batch(shape, generator)

    onnx_path, json_path, inputs_path = _paths(name, out)
    dynamic = {"input": {0: "batch"}, "output": {0: "batch"}}
    result = export(
        model, example, onnx_path, opset=OPSET, input_names=["input"], output_names=["output"], dynamic_axes=dynamic
    )
    _write_atomically(inputs_path, lambda f: np.savez(f, input=example.numpy()))
    meta = {
        "name": name,
        "onnx": onnx_path.name,
        "inputs": inputs_path.name,
        "input_name": "input",
        "input_shape": list(shape),
        "dynamic_axes": {"input": [0], "output": [0]},
        "num_batchnorm": result.num_batchnorm_nodes,
        "opset": OPSET,
        "exporter": result.exporter,
        "max_abs_error_vs_torch": result.max_abs_error,
        "statistics": (
            f"Algorithm 2 (bnfold.torch.recalibrate) over {report.num_batches} synthetic batches "
            f"of shape {list(batch_shape)}, after {TRAIN_STEPS} SGD steps"
        ),
        "seed": SEED,
        "torch_version": torch.__version__,
        "definition_hash": digest,
    }
    _write_atomically(json_path, lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
    seconds = time.perf_counter() - start
    return BuiltModel(name, onnx_path, json_path, inputs_path, True, seconds, result.num_batchnorm_nodes)


def _write_atomically(path: Path, write) -> None:
    # Not mkstemp: its 0600 mode would stick to the published file; open() honours the umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _one_thread():
    # The models are tiny: one thread is as fast, builds the same bits on every machine, and
    # avoids OpenMP threads spinning against each other on a shared CPU (10x slower there).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _locked(out: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: builders may duplicate work, still atomic
        yield
        return
    with open(out / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_built(names=None, out: str | os.PathLike | None = None, *, force: bool = False, on_model=None) -> list[BuiltModel]:
    """Build the models that are missing or stale in ``out`` (all of them with ``force``).

    Args:
        names: model names (default: the whole zoo, ``models.NAMES``).
        out: cache folder, created if missing (default ``<repo>/.cache/models``).
        force: rebuild even when the cache is fresh.
        on_model: called with each :class:`BuiltModel` as soon as it is ready.

    Returns:
        One :class:`BuiltModel` per name, ``built=False`` for those taken from the cache.
    """
    names = list(models.NAMES if names is None else names)
    for name in names:
        models.definition(name)  # unknown names fail before anything is built
    out = Path(DEFAULT_OUT if out is None else out)
    out.mkdir(parents=True, exist_ok=True)
    digest = definition_hash()
    results = []
    with _locked(out):
        for name in names:
            if not force and _is_fresh(name, out, digest):
                onnx_path, json_path, inputs_path = _paths(name, out)
                meta = json.loads(json_path.read_text())
                built = BuiltModel(name, onnx_path, json_path, inputs_path, False, 0.0, meta["num_batchnorm"])
            else:
                with _one_thread():
                    built = build_one(name, out, digest)
            results.append(built)
            if on_model is not None:
                on_model(built)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="cache folder (default: %(default)s)")
    parser.add_argument("--only", default=None, help="comma-separated model names (default: all of " + ", ".join(models.NAMES) + ")")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is fresh")
    args = parser.parse_args(argv)
    names = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names or [] if n not in models.NAMES]
    if unknown:
        parser.error(f"--only: unknown model {', '.join(unknown)}; the zoo has {', '.join(models.NAMES)}")

    def line(b: BuiltModel) -> None:
        status = f"built in {b.seconds:.1f}s" if b.built else "up to date"
        print(f"{b.name:<10} {b.onnx_path}  {b.num_batchnorm} BatchNormalization  {status}", flush=True)

    ensure_built(names, args.out, force=args.force, on_model=line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
