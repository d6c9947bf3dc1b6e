"""Nothing lost: a fold killed before, during or after its write, a write that fails part-way,
and ``--in-place`` killed mid-write all leave the destination as it was (absent, or the
previous file byte for byte) or complete — never a partial model.

The large model (~200 MB float32, 12 Conv → BN pairs) is built once per session; each fold of
it runs in a real subprocess (``python -m bnfold fold``) that is SIGKILLed at a chosen moment,
found by polling for the hidden staging folder ``.<name>.*.tmp`` and the model file inside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold.modelio
from bnfold.errors import OutputError
from bnfold.modelio import remove_stale_staging, save_model
from tests.reliability._models import conv_bn_model, snapshot, write

CHANNELS, KERNEL, LAYERS = 512, 4, 12  # 12 × 512·512·4·4 float32 = 201 MB
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="session")
def large_model(tmp_path_factory) -> Path:
    rng = np.random.default_rng(6)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        inits.append(numpy_helper.from_array(
            rng.standard_normal((CHANNELS, CHANNELS, KERNEL, KERNEL), dtype=np.float32), f"W{i}"))
        for k, v in (("s", rng.uniform(0.5, 2, CHANNELS)), ("b", rng.normal(0, 1, CHANNELS)),
                     ("m", rng.normal(0, 1, CHANNELS)), ("v", rng.uniform(0.5, 2, CHANNELS))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{k}"))
        nodes.append(helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], pads=[1, 1, 2, 2], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{k}" for k in "sbmv"],
                                      [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    shape = [1, CHANNELS, 4, 4]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", 1, shape)],
                              [helper.make_tensor_value_info(x, 1, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path_factory.mktemp("large") / "large.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _staging(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.tmp"))


def _fold_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnfold", "fold", *map(str, args), "--no-validate"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    proc.kill()
    raise AssertionError("the fold never reached the moment to kill it")


def _is_complete_fold(path: Path) -> bool:
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return [n.op_type for n in model.graph.node] == ["Conv"] * LAYERS


def _moments(folder: Path, name: str):
    started = time.monotonic()
    staged = lambda: [s / name for s in _staging(folder, name) if (s / name).exists()]  # noqa: E731
    return {
        "before the write (0.2 s in)": lambda: time.monotonic() - started > 0.2,
        "staging folder appears": lambda: bool(_staging(folder, name)),
        "staged model file appears": lambda: bool(staged()),
        "staged model file half written": lambda: any(p.stat().st_size > 100e6 for p in staged() if p.exists()),
    }


def test_kill_at_several_moments_leaves_destination_intact(tmp_path, large_model):
    dst = tmp_path / "out.onnx"
    previous = write(dst, conv_bn_model()).read_bytes()  # a previous, valid output
    killed_mid_write = 0
    for moment in ["before the write (0.2 s in)", "staging folder appears", "staged model file appears",
                   "staged model file half written"]:
        proc = _fold_process(large_model, "-o", dst)
        ready = _moments(tmp_path, dst.name)[moment]
        killed = _kill_when(proc, ready)
        data = dst.read_bytes()
        # as it was, or (the kill landed just after the rename) the whole new model: never partial
        assert data == previous or _is_complete_fold(dst), moment
        killed_mid_write += killed and bool(_staging(tmp_path, dst.name)) and data == previous
        previous = data
    assert killed_mid_write >= 2, "no kill landed while a staging folder existed"
    # after: a run left to finish replaces it with the complete fold, leftovers notwithstanding
    proc = _fold_process(large_model, "-o", dst)
    assert proc.wait() == 0, proc.stderr.read()
    assert _is_complete_fold(dst)
    assert large_model.stat().st_size > 190e6  # the input was never touched


def test_in_place_killed_mid_write_keeps_input_valid(tmp_path, large_model):
    src = tmp_path / "model.onnx"
    src.write_bytes(large_model.read_bytes())
    original = src.stat().st_size
    for moment in ["staging folder appears", "staged model file appears"]:
        proc = _fold_process(src, "--in-place")
        killed = _kill_when(proc, _moments(tmp_path, src.name)[moment])
        assert killed, moment
        # still the original model, complete and loadable
        assert src.stat().st_size == original
        model = onnx.load(str(src))
        assert [n.op_type for n in model.graph.node] == ["Conv", "BatchNormalization"] * LAYERS
    proc = _fold_process(src, "--in-place")
    assert proc.wait() == 0, proc.stderr.read()
    assert _is_complete_fold(src)


def test_write_failing_part_way_leaves_nothing(tmp_path, monkeypatch):
    """The writer raises ENOSPC after 1000 bytes: OutputError, previous file intact, no leftovers."""
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"previous")

    class ShortWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:1000])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_open = open
    monkeypatch.setattr(bnfold.modelio, "open",
                        lambda p, mode="r", *a, **k: ShortWriter(real_open(p, mode, *a, **k)) if "w" in mode
                        else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(OutputError, match=r"out\.onnx: write failed: No space left on device"):
        save_model(conv_bn_model(), dst)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_file_size_limit_in_a_subprocess_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE below the model's size: the write fails with EFBIG part-way (SIGXFSZ ignored,
    as a shell's ``ulimit -f`` with a trap would), the CLI says so in one line, exit 2."""
    src = write(tmp_path / "m.onnx", conv_bn_model())
    limit = src.stat().st_size // 2
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from bnfold.cli import main\n"
            f"main(['fold', {str(src)!r}, '--no-validate'])\n")
    before = snapshot(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"bnfold: error: {tmp_path / 'm.folded.onnx'}: write failed: File too large"
    assert snapshot(tmp_path) == before


def test_stale_staging_folders_are_removed_on_the_next_write(tmp_path):
    dst = tmp_path / "out.onnx"
    old, fresh = tmp_path / ".out.onnx.abcd1234.tmp", tmp_path / ".out.onnx.efgh5678.tmp"
    other, lookalike = tmp_path / ".other.onnx.abcd.tmp", tmp_path / ".out.onnx.file.tmp"
    for folder in (old, fresh, other):
        folder.mkdir()
        (folder / "out.onnx").write_bytes(b"partial")
    lookalike.write_bytes(b"a file, not a staging folder")
    two_hours_ago = time.time() - 7200
    for path in (old, other, lookalike):
        os.utime(path, (two_hours_ago, two_hours_ago))
    save_model(conv_bn_model(), dst)
    # only the old staging folder of THIS destination goes; a live writer's fresh one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".out.onnx.efgh5678.tmp", ".other.onnx.abcd.tmp", ".out.onnx.file.tmp", "out.onnx"])
    assert remove_stale_staging(tmp_path, "out.onnx", max_age=0) == [fresh]


def test_symlinked_staging_lookalike_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    link = tmp_path / ".out.onnx.evil.tmp"
    os.symlink(victim, link)
    os.utime(link, (0, 0), follow_symlinks=False)
    assert remove_stale_staging(tmp_path, "out.onnx", max_age=0) == []
    assert (victim / "keep.txt").read_text() == "precious"
