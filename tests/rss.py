"""Peak memory of one ``bnfold.fold_file`` call, measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CODE = """\
import json, sys
import bnfold.cli, bnfold.stream.foldfile, bnfold.validation
hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
base = hwm()
r = bnfold.fold_file(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
print(json.dumps([hwm() - base, r.report.counts()['folded'], None if r.check is None else r.check.passed]))
"""


def fold_file_rss_growth(src: Path, dst: Path, **options) -> tuple[int, int, bool | None]:
    """(growth of peak RSS in bytes, BNs folded, check passed or None) of
    ``bnfold.fold_file(src, dst, **options)`` in a new Python process, its imports excluded.

    VmHWM, not ``ru_maxrss``: an exec'ed child's ru_maxrss includes its parent's (pytest's) peak.
    """
    out = subprocess.run([sys.executable, "-c", _CODE, str(src), str(dst), json.dumps(options)],
                         capture_output=True, text=True, cwd=REPO, check=True)
    growth, folded, passed = json.loads(out.stdout.strip().splitlines()[-1])
    return growth, folded, passed
