"""The streamed path's plumbing: wire walk, errors, atomic writes, imports, memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
from bnfold import modelio
from bnfold.modelio import load_model
from bnfold.stream import source as source_mod
from bnfold.stream import wire
from bnfold.stream.source import build_skeleton, open_model
from tests.converter import builders as B
from tests.rss import fold_file_rss_growth
from tests.stream._compare import save

REPO = Path(__file__).resolve().parents[2]


def test_wire_walks_a_model_like_protobuf(tmp_path):
    model, _ = B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16)
    data = model.SerializeToString()
    numbers = [f.number for f in wire.fields(data)]
    assert numbers == [f.number for f, _ in model.ListFields()]  # ir_version, graph, opset_import: once each
    graph = next(f for f in wire.fields(data) if f.number == wire.MODEL_GRAPH)
    inner = [f.number for f in wire.fields(data, graph.value, graph.end)]
    assert inner.count(wire.GRAPH_INITIALIZER) == len(model.graph.initializer)
    assert inner.count(1) == len(model.graph.node)
    rebuilt = b"".join(data[f.start:f.end] for f in wire.fields(data))
    assert rebuilt == data
    with pytest.raises(wire.WireError):
        list(wire.fields(data[:-3]))


@pytest.mark.parametrize("v", [0, 1, 127, 128, 300, 2**31, 2**63 - 1])
def test_varint_roundtrip(v):
    encoded = wire.varint(v)
    assert wire.read_varint(encoded, 0, len(encoded)) == (v, len(encoded))


def test_skeleton_keeps_metadata_and_points_into_the_file(tmp_path):
    model, _ = B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16)
    src = save(model, tmp_path / "m.onnx")
    with open_model(src) as source:
        assert source.placeholders == 1 and not source.external  # the 4.6 kB weight only
        (w,) = [t for t in source.model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        original = {t.name: t for t in model.graph.initializer}[w.name]
        assert list(w.dims) == list(original.dims) and w.data_type == original.data_type
        view = source.array(w)
        assert not view.flags.writeable
        np.testing.assert_array_equal(view, onnx.numpy_helper.to_array(original))
        info = source_mod.external_info(w)
        assert src.read_bytes()[int(info["offset"]):][:int(info["length"])] == original.raw_data


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, os.urandom(4096), b"\x0a\xff\xff\xff\xff\x0f"])
def test_bad_files_give_load_model_s_line(content, tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(bnfold.BnfoldError) as expected:
        load_model(path, load_external_data=False, check=True)
    with pytest.raises(type(expected.value)) as got:
        bnfold.fold_file(path, tmp_path / "out.onnx")
    assert str(got.value) == str(expected.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_truncated_model_is_refused_and_nothing_written(tmp_path):
    model, _ = B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16)
    data = model.SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(bnfold.ModelLoadError, match="cut.onnx"):
        bnfold.fold_file(path, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.onnx"]


@pytest.mark.parametrize("external", [False, True])
def test_blocking_bn_writes_nothing_and_partial_writes(external, tmp_path):
    model, _ = B.bn_training()
    src = save(model, tmp_path / "src" / "m.onnx", external=external, threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(bnfold.UnsupportedModelError, match="nothing written"):
        bnfold.fold_file(src, out / "m.onnx")
    assert list(out.iterdir()) == []  # no staging folder left behind either
    result = bnfold.fold_file(src, out / "m.onnx", partial=True)
    assert result.report.counts()["kept"] == 1 and (out / "m.onnx").is_file()


def test_output_errors_before_anything_is_written(tmp_path):
    model, _ = B.conv_bn()
    src = save(model, tmp_path / "m.onnx")
    before = src.read_bytes()
    with pytest.raises(bnfold.OutputError, match="is the input model"):
        bnfold.fold_file(src, src)
    with pytest.raises(bnfold.OutputError, match="does not exist"):
        bnfold.fold_file(src, tmp_path / "missing" / "o.onnx")
    assert src.read_bytes() == before
    bnfold.fold_file(src, src, in_place=True)  # the source is mapped while its replacement is renamed in
    assert [n.op_type for n in onnx.load(src).graph.node] == ["Conv"]


def _locations(path):
    return {e.value for t in onnx.load(path, load_external_data=False).graph.initializer
            for e in t.external_data if e.key == "location"}


def test_data_of_the_model_being_replaced_is_never_written_over_then_removed(tmp_path, monkeypatch):
    model, _ = B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16)
    src = save(model, tmp_path / "src" / "m.onnx", external=True, threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    first = bnfold.fold_file(src, out / "m.onnx")
    assert _locations(out / "m.onnx") == {"m.onnx.data"}
    old_data = (out / "m.onnx.data").read_bytes()
    folded = [onnx.numpy_helper.to_array(t) for t in onnx.load(out / "m.onnx").graph.initializer]
    seen = {}
    remove = modelio.StagedOutput._remove_replaced_data

    def spy(self, written):
        # the new model is in place; the replaced model's data is still there, bytes unchanged
        seen["old"] = (out / "m.onnx.data").read_bytes()
        seen["new"] = _locations(out / "m.onnx")
        remove(self, written)

    monkeypatch.setattr(modelio.StagedOutput, "_remove_replaced_data", spy)
    second = bnfold.fold_file(src, out / "m.onnx")
    assert seen["old"] == old_data and "m.onnx.data" not in seen["new"] and len(seen["new"]) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(["m.onnx", *seen["new"]])  # the old one removed
    assert first.report.to_dict()["entries"] == second.report.to_dict()["entries"]
    # Every later write alternates between the two names: nothing piles up.
    for _ in range(3):
        bnfold.fold_file(src, out / "m.onnx", validate=True)
        names = sorted(p.name for p in out.iterdir())
        assert len(names) == 2 and _locations(out / "m.onnx") == set(names) - {"m.onnx"}
        for want, t in zip(folded, onnx.load(out / "m.onnx").graph.initializer, strict=True):
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), want)


def test_data_files_that_are_not_ours_or_belong_to_the_input_are_kept(tmp_path):
    def model():
        return B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16)[0]

    folder = tmp_path / "m"
    folder.mkdir()
    # the input's data is named like the output's: it must be neither written over nor removed
    src = folder / "in.onnx"
    onnx.save(model(), src, save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    src_data = (folder / "out.onnx.data").read_bytes()
    bnfold.fold_file(src, folder / "out.onnx")
    bnfold.fold_file(src, folder / "out.onnx")
    assert (folder / "out.onnx.data").read_bytes() == src_data
    assert "out.onnx.data" not in _locations(folder / "out.onnx")
    # a data file with a name of the user's own, used by the replaced model, is left alone
    other = tmp_path / "o"
    other.mkdir()
    onnx.save(model(), other / "out.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    bnfold.fold_file(save(model(), tmp_path / "s" / "m.onnx", external=True, threshold=0), other / "out.onnx")
    assert (other / "weights.bin").is_file()


@pytest.mark.parametrize("external", [False, True])
def test_progress_reports_payload_bytes(external, tmp_path):
    model, _ = B.conv_bn(2, 1, True, np.float32, 17, c_in=8, c_out=16)
    # one file: only the 4.6 kB weight is a placeholder; external: every tensor is in the data file
    total = (16 * 8 * 3 * 3 * 4 if not external else
             sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer))
    src = save(model, tmp_path / "src" / "m.onnx", external=external, threshold=0)
    calls = []
    bnfold.fold_file(src, tmp_path / "o.onnx", progress=lambda done, total: calls.append((done, total)))
    assert calls and {t for _, t in calls} == {total}
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == total


def test_opt_level_names_match_the_validation_module():
    from bnfold.cli.check import OPT_LEVEL_NAMES
    from bnfold.validation.sessions import OPT_LEVELS

    assert tuple(OPT_LEVELS) == OPT_LEVEL_NAMES


def test_fold_no_validate_never_imports_onnxruntime(tmp_path):
    model, _ = B.conv_bn()
    src = save(model, tmp_path / "m.onnx")
    code = ("import sys\nfrom bnfold.cli import main\ntry:\n    main(['fold', sys.argv[1], '--no-validate'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _wide(layers: int, width: int) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.normal(0, 0.05, (width, width, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        for p, v in zip("sbmv", (rng.uniform(0.5, 1.5, width), rng.normal(0, 0.1, width), rng.normal(0, 0.1, width),
                                 rng.uniform(0.5, 2, width))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", 1, [1, width, 4, 4])],
                              [helper.make_tensor_value_info(x, 1, [1, width, 4, 4])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for VmHWM")
def test_external_data_fold_stays_far_below_the_model_size_in_memory(tmp_path):
    """Peak RSS growth of a streamed fold of a 113 MB external-data model: < 0.4 × its size
    (measured 26 MiB; 126 MiB when the source pages are not released after each fold)."""
    src = save(_wide(12, 512), tmp_path / "src" / "wide.onnx", external=True)
    size = sum(p.stat().st_size for p in src.parent.iterdir())
    (tmp_path / "out").mkdir()
    growth, folded, _ = fold_file_rss_growth(src, tmp_path / "out" / "w.onnx")
    assert folded == 12
    assert growth < 0.4 * size, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
