"""``import bnfold`` never imports torch; ``import bnfold.torch`` without torch says what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # models/ is a top-level package of the checkout


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_import_bnfold_does_not_import_torch():
    done = _run("import sys, bnfold; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_missing_torch_names_the_extra():
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed.
    done = _run(
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import bnfold.torch\nexcept ImportError as exc:\n    print(type(exc).__name__, '|', exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "ImportError | bnfold.torch needs torch: pip install torch==2.13.0 && pip install bnfold[torch]"
    )


def test_models_package_does_not_import_torch():
    pytest.importorskip("torch")
    done = _run("import sys, models; print('torch' in sys.modules, models.NAMES)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False ('resnet', 'mobilenet', 'mlp', 'decoder', 'conv3d', 'preact')"
