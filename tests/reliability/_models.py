"""Small models and helpers for the reliability tests: a valid Conv → BN model and ways to
break it, and one assertion that a refused run wrote nothing and touched nothing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold.cli import cli
from tests.converter.builders import conv_bn

C_OUT = 16  # conv.W is 16·8·3·3 float32 = 4608 bytes, over save_model's 1 KiB external threshold


def conv_bn_model(seed: int = 0) -> onnx.ModelProto:
    """x[2, 8, 7, 7] → Conv("conv", 16 channels) → BatchNormalization("bn") → y."""
    model, _ = conv_bn(c_in=8, c_out=C_OUT, rng=np.random.default_rng(seed))
    return model


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 8, 7, 7)).astype(np.float32)}


def set_initializer(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` replaced by ``value`` (float32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
            return out
    raise KeyError(name)


def bn_params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("bn.")}


def write(path: Path, model_or_bytes) -> Path:
    data = model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
    path.write_bytes(data)
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (recursively, hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def assert_refused(folder: Path, args, *, code: int, problem: str, file: Path | str | None = None):
    """Run ``bnfold ARGS``; assert one stderr line ``bnfold: error: FILE: PROBLEM`` (``problem``
    is a regular expression), the exit status, nothing written and nothing changed under
    ``folder``. Returns the CLI result."""
    before = snapshot(folder)
    result = invoke(*args)
    line = result.stderr.strip()
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert "\n" not in line and "Traceback" not in result.output
    prefix = re.escape(f"bnfold: error: {file}: ") if file is not None else r"bnfold: error: "
    assert re.fullmatch(prefix + problem, line), line
    assert snapshot(folder) == before, "the refused run changed the folder"
    return result
