"""Where ``bnfold fold`` spends its time: ``python -m bench.profile [WORKLOAD] [--top N]``.

Runs ``python -m cProfile -m bnfold fold --no-validate`` in a fresh process (as the bench's
``bnfold`` row runs it, imports included) on a workload (default ``resnet50``) and prints the top functions by
cumulative and by own time (paths shortened to the package).
"""

from __future__ import annotations

import argparse
import io
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.tools import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("workload", nargs="?", default="resnet50")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--save", metavar="FILE.prof", help="Also keep the raw cProfile data.")
    args = parser.parse_args(argv)

    from bench import workloads

    src = workloads.model_path(workloads.lookup(args.workload))
    with tempfile.TemporaryDirectory(prefix="bnfold-profile.") as tmp:
        # A fresh process, like the bench's bnfold row: imports count.
        from bench.run_tool import _bnfold_fold_flags

        flags = ["--no-validate"] if "--no-validate" in _bnfold_fold_flags() else []
        prof = Path(args.save or Path(tmp) / "fold.prof")
        cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "bnfold", "fold", str(src),
               "-o", str(Path(tmp) / "out.onnx"), *flags]
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL, cwd=REPO_ROOT).returncode
        stats_source = pstats.Stats(str(prof))
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        stats_source.stream = out
        stats_source.sort_stats(key).print_stats(args.top)
        print(f"== {args.workload}: top {args.top} by {key} (fold exit status {code}) ==")
        text = out.getvalue().split("\n", 3)[-1].strip("\n")
        for prefix in sorted({p for p in sys.path if p.endswith("-packages")} | {str(REPO_ROOT)}, key=len,
                             reverse=True):
            text = text.replace(prefix + "/", "")
        print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
