"""Issue 6: every bad input of the list is one line ``bnfold: error: FILE: problem`` on
stderr, a documented exit status (2: bad input or usage), nothing written, the input
byte-identical afterwards. One test per kind of bad input, through the CLI."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.modelio import save_model
from tests.reliability._models import (
    C_OUT, assert_refused, conv_bn_model, invoke, set_initializer, snapshot, write,
)

BAD_INPUT = 2


@pytest.fixture
def model():
    return conv_bn_model()


# ---- the file itself -------------------------------------------------------------------------

def test_missing_path(tmp_path):
    src = tmp_path / "nope.onnx"
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src, problem="no such file")


def test_directory(tmp_path):
    src = tmp_path / "model.onnx"
    src.mkdir()
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"is a directory, expected an \.onnx file")


def test_empty_file(tmp_path):
    src = write(tmp_path / "m.onnx", b"")
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"is empty \(0 bytes\), not an ONNX model")


def test_random_bytes(tmp_path):
    src = write(tmp_path / "m.onnx", np.random.default_rng(6).bytes(4096))
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"not an ONNX model \(protobuf parse failed: .*\)")


def test_truncated_model(tmp_path, model):
    data = model.SerializeToString()
    src = write(tmp_path / "m.onnx", data[: len(data) - 11])
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"not an ONNX model \(protobuf parse failed: .*\)")


def test_protobuf_that_is_not_a_model(tmp_path):
    tensor = numpy_helper.from_array(np.arange(100, dtype=np.float32), "t")
    src = write(tmp_path / "m.onnx", tensor.SerializeToString())
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"(not an ONNX model \(.*\)|is a protobuf message but not an ONNX model .*)")


@pytest.mark.parametrize("flags", [[], ["--no-validate"]], ids=["validated", "streamed"])
def test_model_that_fails_onnx_checker(tmp_path, model, flags):
    model.graph.node[0].input[0] = "undefined_tensor"  # Conv reads a name nothing defines
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src, *flags], code=BAD_INPUT, file=src,
                   problem=r"fails onnx\.checker: .*'undefined_tensor'.*")


@pytest.mark.parametrize("flags", [[], ["--no-validate"]], ids=["validated", "streamed"])
def test_model_with_an_operator_its_opset_lacks(tmp_path, model, flags):
    model.graph.node[-1].op_type = "Reluu"  # only the checker's schema registry knows this is wrong
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src, *flags], code=BAD_INPUT, file=src,
                   problem=r"fails onnx\.checker: .*Reluu.*")


def test_unknown_operator_domain_declared(tmp_path, model):
    model.opset_import.append(helper.make_opsetid("com.example.custom", 1))
    model.graph.node[0].domain = "com.example.custom"
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"node 'conv' \(Conv\) uses operator domain 'com\.example\.custom', which onnxruntime "
                           r"does not implement and the model does not define as a function")


def test_unknown_operator_domain_undeclared(tmp_path, model):
    model.graph.node[0].domain = "com.example.custom"
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"node 'conv' \(Conv\) uses operator domain 'com\.example\.custom', which onnxruntime "
                           r"does not implement and the model does not define as a function")


def test_opset_older_than_batchnormalization_7(tmp_path, model):
    model.opset_import[0].version = 6
    model.ir_version = 3
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"opset 6 is older than BatchNormalization-7 \(opset 7\); convert it first .*")


# ---- BatchNormalization the input makes unfoldable ---------------------------------------------

def _blocking(tmp_path, model, problem, *extra):
    src = write(tmp_path / "m.onnx", model)
    return assert_refused(
        tmp_path, ["fold", src, *extra], code=BAD_INPUT, file=src,
        problem=r"BatchNormalization 'bn' cannot be folded: " + problem
                + r"; nothing written \((--inputs-as-constants treats such parameters as constants; )?"
                  r"--partial writes the model with it kept\)")


def test_bn_parameters_with_wrong_rank(tmp_path, model):
    for name in ("bn.scale", "bn.B", "bn.mean", "bn.var"):
        model = set_initializer(model, name, np.ones((C_OUT, 1)))
    _blocking(tmp_path, model, r"parameters have shapes \[\(16, 1\), \(16, 1\), \(16, 1\), \(16, 1\)\], "
                               r"expected 1-D per-channel vectors")


def test_bn_parameters_with_different_lengths(tmp_path, model):
    model = set_initializer(model, "bn.var", np.ones(C_OUT - 3))
    _blocking(tmp_path, model, r"parameters have different lengths \[16, 16, 16, 13\]")


def test_bn_channel_count_differs_from_producer(tmp_path, model):
    for name in ("bn.scale", "bn.B", "bn.mean", "bn.var"):
        model = set_initializer(model, name, np.ones(C_OUT - 4))
    model.graph.value_info.clear()  # no declared shape: the count comes from the Conv weight
    _blocking(tmp_path, model, r"has 12 channels but its input 'h' has 16")


@pytest.mark.parametrize("name, value, shown", [("bn.var", np.nan, "nan"), ("bn.mean", np.nan, "nan"),
                                                ("bn.scale", np.inf, "inf"), ("bn.B", -np.inf, "-inf")])
def test_bn_parameter_nan_or_inf(tmp_path, model, name, value, shown):
    values = np.ones(C_OUT)
    values[5] = value
    model = set_initializer(model, name, values)
    label = {"bn.var": "var", "bn.mean": "mean", "bn.scale": "scale", "bn.B": "bias"}[name]
    _blocking(tmp_path, model, rf"parameter {label} is not finite \({shown} in channel 5\)")


def test_bn_negative_variance(tmp_path, model):
    values = np.ones(C_OUT)
    values[3] = -0.25
    _blocking(tmp_path, set_initializer(model, "bn.var", values),
              r"parameter var is negative \(-0\.25 in channel 3\)")


def test_bn_in_training_mode_with_unused_extra_outputs(tmp_path, model):
    bn = model.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["running_mean", "running_var"])  # declared, consumed by nothing
    _blocking(tmp_path, model, r"training_mode=1: a training-mode BatchNormalization normalizes with batch "
                               r"statistics, it is not a fixed affine map \(never folded\)")


def test_bn_parameter_is_a_graph_input(tmp_path, model):
    params = {t.name: t for t in model.graph.initializer}
    gamma = params["bn.scale"]
    model.graph.initializer.remove(gamma)
    model.graph.input.append(helper.make_tensor_value_info("bn.scale", onnx.TensorProto.FLOAT, [C_OUT]))
    _blocking(tmp_path, model, r"parameter scale is not a constant: 'bn\.scale' is a graph input")


def test_bn_parameter_is_an_overridable_initializer(tmp_path, model):
    # An initializer that is also a graph input: a caller may override it at run time.
    model.graph.input.append(helper.make_tensor_value_info("bn.mean", onnx.TensorProto.FLOAT, [C_OUT]))
    result = _blocking(tmp_path, model, r"parameter mean is not a constant: 'bn\.mean' is an initializer that "
                                        r"is also a graph input .*")
    assert "--inputs-as-constants treats such parameters as constants" in result.stderr
    # ... and the option named in the message does fold it.
    ok = invoke("fold", tmp_path / "m.onnx", "--inputs-as-constants")
    assert ok.exit_code == 0, ok.stderr
    assert onnx.load(str(tmp_path / "m.folded.onnx")).graph.node[0].op_type == "Conv"


# ---- external data -----------------------------------------------------------------------------

def _external(folder, model):
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    save_model(model, path, external_data=True)
    assert (folder / "m.onnx.data").is_file()
    return path


def _set_location(path, location):
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def test_external_data_missing(tmp_path, model):
    src = _external(tmp_path / "m", model)
    os.remove(tmp_path / "m" / "m.onnx.data")
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"tensor 'conv\.W' external-data file 'm\.onnx\.data' is missing")


def test_external_data_too_short(tmp_path, model):
    src = _external(tmp_path / "m", model)
    data = tmp_path / "m" / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"tensor 'conv\.W' external data 'm\.onnx\.data' is too short "
                           r"\(needs bytes 0\.\.4608, file has 1000\)")


def test_external_data_location_dotdot(tmp_path, model):
    src = _external(tmp_path / "m", model)
    os.replace(tmp_path / "m" / "m.onnx.data", tmp_path / "outside.data")
    _set_location(src, "../outside.data")
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"tensor 'conv\.W' external-data path '\.\./outside\.data' escapes the model's folder")


def test_external_data_location_absolute(tmp_path, model):
    src = _external(tmp_path / "m", model)
    _set_location(src, str(tmp_path / "m" / "m.onnx.data"))
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"tensor 'conv\.W' has an absolute external-data path '.*'; only paths inside "
                           r"the model's folder are allowed")


def test_external_data_symlink_out_of_folder(tmp_path, model):
    src = _external(tmp_path / "m", model)
    os.replace(tmp_path / "m" / "m.onnx.data", tmp_path / "secret.data")
    os.symlink(tmp_path / "secret.data", tmp_path / "m" / "m.onnx.data")
    assert_refused(tmp_path, ["fold", src], code=BAD_INPUT, file=src,
                   problem=r"tensor 'conv\.W' external-data path 'm\.onnx\.data' escapes the model's folder")


# ---- where the output goes ---------------------------------------------------------------------

def test_output_in_missing_folder(tmp_path, model):
    src = write(tmp_path / "m.onnx", model)
    dst = tmp_path / "missing" / "out.onnx"
    assert_refused(tmp_path, ["fold", src, "-o", dst], code=BAD_INPUT, file=dst,
                   problem=rf"cannot write: folder {tmp_path / 'missing'} does not exist")


def test_output_in_read_only_folder(tmp_path, model, monkeypatch):
    src = write(tmp_path / "m.onnx", model)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits; make the folder look read-only
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(folder) else real_access(p, m))
    try:
        assert_refused(tmp_path, ["fold", src, "-o", folder / "out.onnx"], code=BAD_INPUT,
                       file=folder / "out.onnx", problem=rf"cannot write: folder {folder} is not writable")
    finally:
        folder.chmod(0o755)


def test_output_equal_to_input_without_in_place(tmp_path, model):
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src, "-o", src], code=BAD_INPUT, file=src,
                   problem=r"is the input model; refusing to overwrite it \(use --in-place\)")


def test_output_equal_to_input_through_another_spelling(tmp_path, model):
    src = write(tmp_path / "m.onnx", model)
    (tmp_path / "sub").mkdir()
    other = tmp_path / "sub" / ".." / "m.onnx"
    assert_refused(tmp_path, ["fold", src, "-o", other], code=BAD_INPUT, file=other,
                   problem=r"is the input model; refusing to overwrite it \(use --in-place\)")


# ---- .npz inputs that do not match the model ---------------------------------------------------

@pytest.mark.parametrize("arrays, problem", [
    ({"x_wrong": np.zeros((2, 8, 7, 7), np.float32)}, r"'x_wrong' is not an input of the model.*"),
    ({"x": np.zeros((2, 8, 5, 5), np.float32)}, r"input 'x' expects .*"),
    ({"x": np.zeros((2, 8, 7, 7), np.int64)}, r"input 'x' expects .*"),
], ids=["wrong-name", "wrong-shape", "wrong-dtype"])
def test_npz_inputs_that_do_not_match(tmp_path, model, arrays, problem):
    src = write(tmp_path / "m.onnx", model)
    npz = tmp_path / "in.npz"
    np.savez(npz, **arrays)
    assert_refused(tmp_path, ["fold", src, "--inputs", npz], code=BAD_INPUT, file=npz, problem=problem)


def test_debug_shows_a_traceback_instead(tmp_path):
    src = write(tmp_path / "m.onnx", b"")
    before = snapshot(tmp_path)
    result = invoke("fold", src, "--debug")
    assert result.exception is not None and type(result.exception).__name__ == "ModelLoadError"
    assert snapshot(tmp_path) == before
