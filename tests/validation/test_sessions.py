"""How check() uses onnxruntime: models on disk are loaded by onnxruntime from their path (the
weights never pass through Python), and on each provider the reference session is released
before the candidate's is built, so at most one session is alive at a time."""

from __future__ import annotations

import weakref

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import check
from bnfold.errors import ModelLoadError
from bnfold.modelio import save_model
from bnfold.validation.check import _source
from tests.ortutil import bfloat16_scale_model, make_model
from tests.validation.models import conv_bn, resnet_stack, scale_weight, stack_model


class SessionLog:
    """Every InferenceSession built: what it was built from, and how many were alive then."""

    def __init__(self):
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.built: list[tuple[str, int]] = []   # (path, or "<bytes>"; sessions alive at the time)

    def sources(self) -> list[str]:
        return [s for s, _ in self.built]

    def most_alive(self) -> int:
        return max(n for _, n in self.built)


@pytest.fixture
def sessions(monkeypatch) -> SessionLog:
    log = SessionLog()
    original = onnxruntime.InferenceSession

    class Logged(original):
        def __init__(self, model, *args, **kwargs):
            log.built.append((model if isinstance(model, str) else "<bytes>", len(log.alive)))
            super().__init__(model, *args, **kwargs)
            log.alive.add(self)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Logged)
    return log


@pytest.fixture
def files(tmp_path):
    """A 4-layer Conv+BN stack and its correct fold, as one-file models."""
    params = resnet_stack(layers=4, channels=16)
    ref = save_model(stack_model(params, folded=False, channels=16), tmp_path / "ref.onnx")
    cand = save_model(stack_model(params, folded=True, channels=16), tmp_path / "cand.onnx")
    return ref, cand


def test_files_are_run_from_their_paths_one_session_at_a_time(files, sessions):
    ref, cand = files
    report = check(ref, cand, samples=3)
    assert report.passed
    assert sessions.built == [(str(ref), 0), (str(cand), 0)]
    assert len(sessions.alive) == 0


def test_external_data_files_too(tmp_path, sessions):
    params = resnet_stack(layers=4, channels=16)
    ref = save_model(stack_model(params, folded=False, channels=16), tmp_path / "ref.onnx", external_data=True)
    cand = save_model(stack_model(params, folded=True, channels=16, perturb=scale_weight(1, 1.5)),
                      tmp_path / "cand.onnx", external_data=True)
    report = check(ref, cand)
    assert not report.passed and report.failures()[0][1].output == "y"
    assert sessions.built == [(str(ref), 0), (str(cand), 0)]


def test_models_in_memory_are_serialized_and_also_run_one_at_a_time(sessions):
    report = check(conv_bn(folded=False), conv_bn(folded=True), samples=2)
    assert report.passed
    assert sessions.built == [("<bytes>", 0), ("<bytes>", 0)]


def test_a_file_is_read_as_a_skeleton_without_its_weights(files):
    ref, _ = files
    skeleton = _source(ref, "reference").graph
    weights = [t for t in skeleton.graph.initializer if t.name.startswith("W")]
    assert len(weights) == 4 and all(list(t.dims) == [16, 16, 3, 3] for t in weights)
    assert all(not t.raw_data and t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert ref.stat().st_size > 4 * 16 * 16 * 9 * 4 > skeleton.ByteSize()


def test_candidate_file_onnxruntime_rejects_fails_after_the_reference_is_released(files, tmp_path, sessions):
    ref, cand = files
    model = onnx.load(cand)
    model.ir_version = 99  # onnxruntime 1.31 loads IR versions up to 13
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    report = check(ref, bad)
    (c, o), = report.failures()
    assert o is None and c.error.startswith(f"{bad}: onnxruntime cannot load it on cpu: ")
    assert c.session_providers == ("CPUExecutionProvider",)
    assert sessions.sources() == [str(ref), str(bad)] and sessions.most_alive() == 0
    with pytest.raises(ModelLoadError, match=rf"^{bad}: onnxruntime cannot load it on cpu: "):
        check(bad, ref)


def test_reference_session_is_released_when_a_reference_run_fails(tmp_path, sessions):
    # Reshape to 5 elements: loads, but fails on the 8 elements the default dims give.
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
                       [numpy_helper.from_array(np.array([5], np.int64), "shape")])
    path = save_model(model, tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match=r"onnxruntime failed to run it on cpu \(sample 0\)"):
        check(path, path, dims={"n": 8})
    assert sessions.sources() == [str(path)]
    assert len(sessions.alive) == 0


def test_bfloat16_outputs_of_an_external_data_file(tmp_path, sessions):
    model = lambda k: bfloat16_scale_model(k, [16, 16], k_shape=[16, 16])  # noqa: E731
    ref = save_model(model(1.0), tmp_path / "ref.onnx", external_data=True)
    cand = save_model(model(1.5), tmp_path / "cand.onnx", external_data=True)
    (o,) = check(ref, cand).comparisons[0].outputs
    assert o.dtype == "bfloat16" and not o.passed and o.max_abs_error > 0.1
    # bfloat16 outputs need a Cast appended: that graph edit goes through bytes, still one at a time
    assert sessions.built == [("<bytes>", 0), ("<bytes>", 0)]
