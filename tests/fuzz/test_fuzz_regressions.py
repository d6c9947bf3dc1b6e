"""Regression tests for what the fuzzer and the property tests found (issue 6), each built by
hand so it does not depend on the fuzzer's seeds:

* an external-data entry that is not valid UTF-8 (protobuf hands back bytes): TypeError;
* a tensor whose raw_data does not match its shape (onnx.checker without full_check passes
  it): ValueError "cannot reshape" from deep inside a pass, exit 3;
* a tensor of an unknown data type (65): KeyError, exit 3;
* an "empty" tensor (a 0 among its dims) whose other dims overflow: NumPy's "array is too big";
* a graph input of element type 0 or 127: KeyError in validation, exit 3;
* an external tensor without a ``length`` whose file holds the wrong number of bytes;
* an external-data location with a NUL byte: ValueError from ``Path.resolve``;
* a model input bnfold cannot make random data for (float8), or that is not a tensor (a map):
  error lines that did not name the file;
* a MatMul + Add whose Add output has another consumer: the reason said "has other users or
  is a graph output" — now it says which.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import bnfold
from bnfold.modelio import save_model
from tests.reliability._models import assert_refused, conv_bn_model, write


def test_external_data_key_not_utf8(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(conv_bn_model(), path, external_data=True)
    data = path.read_bytes()
    assert data.count(b"offset") == 1
    write(path, data.replace(b"offset", b"o\x80fset"))
    assert_refused(tmp_path, ["fold", path], code=2, file=path,
                   problem=r"tensor 'conv\.W' has an external-data entry that is not valid UTF-8")


def test_raw_data_shorter_than_shape(tmp_path):
    model = conv_bn_model()
    w = model.graph.initializer[0]
    w.raw_data = w.raw_data[:-8]
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=2, file=src,
                   problem=r"tensor 'conv\.W' has 4600 bytes of data, its shape \[16, 8, 3, 3\] float32 needs 4608")


def test_dims_changed_under_the_data(tmp_path):
    model = conv_bn_model()
    model.graph.initializer[0].dims[0] = 17
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=2, file=src,
                   problem=r"tensor 'conv\.W' has 4608 bytes of data, its shape \[17, 8, 3, 3\] float32 needs 4896")


def test_typed_values_shorter_than_shape(tmp_path):
    model = conv_bn_model()
    scale = next(t for t in model.graph.initializer if t.name == "bn.scale")
    values = np.frombuffer(scale.raw_data, np.float32)
    scale.ClearField("raw_data")
    scale.float_data.extend(values[:-1].tolist())
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=2, file=src,
                   problem=r"tensor 'bn\.scale' has 15 values, its shape \[16\] needs 16")


def test_unknown_tensor_data_type(tmp_path):
    model = conv_bn_model()
    model.graph.initializer[1].data_type = 65
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=2, file=src, problem=r"tensor 'conv\.b' has unknown data type 65")


def test_random_inputs_error_names_the_model(tmp_path):
    model = conv_bn_model()
    model.graph.input.append(helper.make_tensor_value_info("flag", onnx.TensorProto.FLOAT8E4M3FN, [1]))
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=2, file=src,
                   problem=r"input 'flag' is float8_e4m3fn; bnfold cannot make random data of that type, .*")


def test_reason_names_what_else_a_bias_add_feeds(rng):
    from tests.converter.builders import matmul_bn

    model, _ = matmul_bn(with_add=True, rng=rng)
    model.graph.node.append(helper.make_node("Relu", ["hb"], ["aux"], name="aux"))
    model.graph.output.append(helper.make_tensor_value_info("aux", onnx.TensorProto.FLOAT, [None, None]))
    [entry] = bnfold.fold(model).report.entries
    assert entry.action.value == "rewritten"
    assert "the output of 'bias' feeds several nodes ['bn', 'aux']" in entry.reason


def test_non_tensor_input_error_names_the_model(tmp_path):
    model = conv_bn_model()
    map_type = helper.make_map_type_proto(onnx.TensorProto.INT64, helper.make_tensor_type_proto(1, [1]))
    model.graph.input.append(helper.make_value_info("table", map_type))
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=2, file=src,
                   problem=r"input 'table' is a map_type; bnfold check compares tensor inputs and outputs only")


def test_empty_tensor_with_an_impossible_shape(tmp_path):
    # a 0 among the dims makes it "empty", so no byte count is wrong, yet NumPy cannot shape it
    model = conv_bn_model()
    scale = next(t for t in model.graph.initializer if t.name == "bn.scale")
    scale.ClearField("raw_data")
    del scale.dims[:]
    scale.dims.extend([16, 0, 2174729453976, 24560602232, 582100701056])
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=2, file=src,
                   problem=r"tensor 'bn\.scale' has an impossible shape of rank 5 \(.* elements\)")


def test_graph_input_of_unknown_element_type(tmp_path):
    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.elem_type = 0
    src = write(tmp_path / "m.onnx", model)
    assert_refused(tmp_path, ["fold", src], code=2, file=src, problem=r"graph input 'x' has unknown element type 0")


def test_external_tensor_without_length_measured_by_its_file(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(conv_bn_model(), path, external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    w = model.graph.initializer[0]
    kept = [(e.key, e.value) for e in w.external_data if e.key != "length"]
    del w.external_data[:]
    for k, v in kept:
        w.external_data.add(key=k, value=v)
    w.dims[0] = 8  # the file holds 16 channels' worth
    write(path, model)
    assert_refused(tmp_path, ["fold", path], code=2, file=path,
                   problem=r"tensor 'conv\.W' has 4608 bytes of external data, its shape \[8, 8, 3, 3\] float32 "
                           r"needs 2304")


def test_external_data_location_with_a_nul_byte(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(conv_bn_model(), path, external_data=True)
    data = path.read_bytes()
    assert data.count(b"m.onnx.data") == 1
    write(path, data.replace(b"m.onnx.data", b"m.on\x00x.data"))
    assert_refused(tmp_path, ["fold", path, "--no-validate"], code=2, file=path,
                   problem=r"tensor 'conv\.W' external-data path 'm\.on\\x00x\.data' contains a NUL byte")
