"""Peak memory of ``bnfold.calibrate`` for 10 vs 1,000 batches: it must not grow with the count.

    .venv/bin/python -m tests.calibration.measure_memory [--batches 10,1000] [--batch-size 16]

Each measurement runs in a fresh child process; its peak resident set size comes from
``os.wait4`` (the child's own ``ru_maxrss``, the figure ``resource.getrusage(RUSAGE_CHILDREN)``
reports for a single child). Sources: a folder of ``.npz`` files (one batch each, 16×3×32×32
float32 = 192 KiB, so holding 1,000 of them would add ~190 MiB) and a generator producing the
batches on the fly. ``peak_rss_mib`` is importable for tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32

_CHILD = r"""
import sys
import numpy as np
import onnx
import bnfold
model = onnx.load(sys.argv[1])
kind, n, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "folder":
    data = sys.argv[5]
else:
    rng = np.random.default_rng(0)
    data = ({"x": rng.standard_normal((batch, 3, %d, %d)).astype(np.float32)} for _ in range(n))
result = bnfold.calibrate(model, data, max_batches=n)
assert result.report.num_batches == n, result.report.num_batches
""" % (SIZE, SIZE)


def _model(path: Path) -> Path:
    from tests.calibration._models import two_bn_chain

    onnx.save(two_bn_chain(size=SIZE)[0], path)
    return path


def write_folder(folder: Path, n: int, batch: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.savez(folder / f"batch{i:05d}.npz", x=rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32))
    return folder


def peak_rss_mib(model: Path, kind: str, n: int, batch: int, folder: Path | None = None) -> float:
    """Peak RSS (MiB) of a child process that calibrates ``model`` on ``n`` batches."""
    args = [sys.executable, "-c", _CHILD, str(model), kind, str(n), str(batch), str(folder or "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    err = child.stderr.read().decode()
    child.stderr.close()
    if status != 0:
        raise RuntimeError(f"child failed ({status}): {err[-2000:]}")
    return usage.ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="10,1000")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = _model(tmp / "m.onnx")
        folder = write_folder(tmp / "data", max(counts), args.batch_size)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"batches of {args.batch_size}x3x{SIZE}x{SIZE} float32; folder of {max(counts)} .npz files, {size:.0f} MiB")
        for kind in ("folder", "generator"):
            for n in counts:
                peak = peak_rss_mib(model, kind, n, args.batch_size, folder if kind == "folder" else None)
                print(f"{kind:<9} {n:>6} batches: peak RSS {peak:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
