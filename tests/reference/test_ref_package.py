"""The reference package stays independent of what it checks, and its demo runs."""

import ast
import re
from pathlib import Path

import bnfold.reference
from bnfold.reference import demo

PACKAGE_DIR = Path(bnfold.reference.__file__).parent
ALLOWED_TOP_LEVEL = {"__future__", "numbers", "os", "tempfile", "zipfile", "pathlib", "numpy", "bnfold"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return names


def test_reference_imports_neither_torch_nor_onnxruntime():
    """An oracle that imported torch or onnxruntime could not be an independent check of them."""
    files = sorted(PACKAGE_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imported_modules(path):
            assert name.split(".")[0] in ALLOWED_TOP_LEVEL, f"{path.name} imports {name}"
            if name.startswith("bnfold"):
                assert name.startswith("bnfold.reference"), f"{path.name} imports {name}"


def test_public_names_are_exported():
    assert sorted(bnfold.reference.__all__) == sorted(
        [
            "PopulationStats", "batch_norm_backward", "batch_norm_inference", "batch_norm_training", "fold_params",
            "group_norm", "group_norm_backward", "instance_norm", "instance_norm_backward", "layer_norm",
            "layer_norm_backward", "update_running_stats_onnx", "update_running_stats_torch",
        ]
    )
    assert all(callable(getattr(bnfold.reference, name)) for name in bnfold.reference.__all__)


def test_demo_prints_a_real_example(capsys):
    demo.main()
    out = capsys.readouterr().out
    residual = float(re.search(r"max \|s·x \+ t − batch_norm_inference\(x\)\| = (\S+)", out).group(1))
    assert residual < 1e-12

    def row(label):
        line = next(l for l in out.splitlines() if l.strip().startswith(label))
        return [float(v) for v in line[40:].split()]

    true_var, alg2, uncorrected = row("true Var[x]"), row("Algorithm 2, m/(m-1)"), row("mean(σ²_B) without")
    assert true_var == [4.0, 0.25, 1.0]
    # m = 8: the uncorrected average is 7/8 of the corrected one, channel by channel.
    for a, u in zip(alg2, uncorrected):
        assert abs(u / a - 7 / 8) < 1e-3
