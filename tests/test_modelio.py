"""bnfold.modelio: every unreadable file is one ModelLoadError line naming the file; writes are
atomic and never clobber the input."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.errors import ModelLoadError, OutputError
from bnfold.modelio import StagedOutput, load_model, parse_model, save_model
from tests.ortutil import make_model, run


def _conv_model(channels: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "W")
    return make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, channels, 6, 6])],
        [w],
    )


def _external(tmp_path, name="m.onnx"):
    path = tmp_path / name
    save_model(_conv_model(), path, external_data=True)
    return path


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_bytes(b"\xff" * 64), "not an ONNX model"),
        (lambda p: p.write_bytes(_conv_model().SerializeToString()[:-7]), "not an ONNX model"),
        (lambda p: p.write_bytes(onnx.TensorProto(name="t").SerializeToString()), "not an ONNX model"),
    ],
    ids=["missing", "directory", "empty", "random-bytes", "truncated", "not-a-model"],
)
def test_unreadable_files_are_one_line_errors(tmp_path, setup, message):
    path = tmp_path / "bad.onnx"
    setup(path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_external_data_round_trip_stays_external_and_runs(tmp_path):
    path = _external(tmp_path)
    assert (tmp_path / "m.onnx.data").stat().st_size == 64 * 27 * 4
    assert path.stat().st_size < 1000
    model = load_model(path)
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(_conv_model(), {"x": x})[0])


def _set_location(path, location):
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize(
    "location, message",
    [
        ("../outside.data", "escapes the model's folder"),
        ("/etc/passwd", "absolute external-data path"),
        ("nope.data", "is missing"),
    ],
)
def test_hostile_or_missing_external_data_refused(tmp_path, location, message):
    path = _external(tmp_path)
    (tmp_path.parent / "outside.data").write_bytes(b"\0" * 10000)
    _set_location(path, location)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_symlink_out_of_folder_refused(tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    path = _external(inner)
    outside = tmp_path / "secret.data"
    os.replace(inner / "m.onnx.data", outside)
    os.symlink(outside, inner / "m.onnx.data")
    with pytest.raises(ModelLoadError, match="escapes the model's folder"):
        load_model(path)


def test_short_external_data_refused(tmp_path):
    path = _external(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="too short"):
        load_model(path)


def test_parse_model_rejects_message_without_graph():
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        parse_model(onnx.ModelProto(ir_version=8).SerializeToString(), name="x")


def test_save_refuses_missing_folder_and_input_clobber(tmp_path):
    model = _conv_model()
    with pytest.raises(OutputError, match="does not exist"):
        save_model(model, tmp_path / "missing" / "out.onnx")
    src = tmp_path / "in.onnx"
    save_model(model, src)
    before = src.read_bytes()
    with pytest.raises(OutputError, match="use --in-place"):
        save_model(_conv_model(8), src, src=src)
    assert src.read_bytes() == before
    save_model(_conv_model(8), src, src=src, in_place=True)
    assert src.read_bytes() != before


def test_save_refuses_read_only_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits; make the folder look read-only
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(folder) else real_access(p, m))
    try:
        with pytest.raises(OutputError, match="not writable"):
            save_model(_conv_model(), folder / "out.onnx")
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_failed_write_leaves_destination_and_folder_as_they_were(tmp_path, monkeypatch):
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"previous")

    def broken_replace(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OutputError, match="No space left on device"):
        save_model(_conv_model(), dst)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_rewriting_external_model_never_reuses_live_data_file(tmp_path):
    path = _external(tmp_path)
    old_data = (tmp_path / "m.onnx.data").read_bytes()
    seen = {}
    remove = StagedOutput._remove_replaced_data

    def spy(self, written):
        seen["old"], seen["written"] = (tmp_path / "m.onnx.data").read_bytes(), written
        remove(self, written)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StagedOutput, "_remove_replaced_data", spy)
        save_model(_conv_model(), path, external_data=True, src=path, in_place=True)
    # The old data file is untouched until the new model (pointing at its own file) is in place,
    # then removed: the model that used it is gone.
    assert seen["old"] == old_data and "m.onnx.data" not in seen["written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", *seen["written"]])
    model = load_model(path)
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(_conv_model(), {"x": x})[0])
