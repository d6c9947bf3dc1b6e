"""Input data: seeded random inputs per dtype, dynamic dims, .npz and .pb loading, and the
exact one-line errors for user data that does not match the model."""

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InputDataError, UsageError
from bnfold.validation.inputs import TensorSpec, load_inputs, model_inputs, random_inputs
from tests.ortutil import make_model
from tests.validation.models import conv_bn, gather_mask_model

SPECS = [
    TensorSpec("f32", TensorProto.FLOAT, ("batch", 3)),
    TensorSpec("f16", TensorProto.FLOAT16, ("batch", "seq")),
    TensorSpec("bf16", TensorProto.BFLOAT16, (2,)),
    TensorSpec("i64", TensorProto.INT64, (None, 4)),
    TensorSpec("u8", TensorProto.UINT8, (1000,)),
    TensorSpec("b", TensorProto.BOOL, (1000,)),
]


def test_random_inputs_dtypes_shapes_and_ranges():
    feeds = random_inputs(SPECS, samples=2, seed=3, dims={"seq": 5})
    assert len(feeds) == 2
    f = feeds[0]
    assert f["f32"].dtype == np.float32 and f["f32"].shape == (1, 3)      # dynamic first axis → 1
    assert f["f16"].dtype == np.float16 and f["f16"].shape == (1, 5)      # --dim seq=5
    assert f["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert f["i64"].shape == (1, 4)                                       # unnamed first axis → 1
    assert f["u8"].dtype == np.uint8 and set(np.unique(f["u8"])) == set(range(8))
    assert f["b"].dtype == np.bool_ and 400 < f["b"].sum() < 600
    assert not np.array_equal(feeds[0]["u8"], feeds[1]["u8"])              # samples differ


def test_random_inputs_are_reproducible_and_seeded():
    a = random_inputs(SPECS, seed=7)[0]["f32"]
    assert np.array_equal(a, random_inputs(SPECS, seed=7)[0]["f32"])
    assert not np.array_equal(a, random_inputs(SPECS, seed=8)[0]["f32"])


def test_default_dims_and_shared_symbols():
    specs = [TensorSpec("a", TensorProto.FLOAT, ("N", "C", "H")), TensorSpec("b", TensorProto.FLOAT, ("H",))]
    f = random_inputs(specs)[0]
    assert f["a"].shape == (1, 8, 8) and f["b"].shape == (8,)
    f = random_inputs(specs, dims={"N": 4, "H": 3})[0]
    assert f["a"].shape == (4, 8, 3) and f["b"].shape == (3,)


def test_unknown_or_bad_dim_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^--dim btach: no input has a dimension named 'btach' "
                                         r"\(dynamic dimensions: batch, seq\)$"):
        random_inputs(SPECS, dims={"btach": 8})
    with pytest.raises(UsageError, match=r"^--dim batch=0: the size must be a positive integer$"):
        random_inputs(SPECS, dims={"batch": 0})


def test_string_input_needs_user_data():
    with pytest.raises(InputDataError, match=r"^input 's' is object; bnfold cannot make random data"):
        random_inputs([TensorSpec("s", TensorProto.STRING, (2,))])


def test_initializers_listed_as_inputs_are_not_inputs():
    init = numpy_helper.from_array(np.ones(2, np.float32), "w")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                        helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [init])
    assert [s.name for s in model_inputs(model)] == ["x"]


# --- .npz ------------------------------------------------------------------------------------

@pytest.fixture
def specs():
    return model_inputs(conv_bn(folded=False, dynamic=True))   # x: float32 [N, 3, H, W]


def test_npz_one_sample_and_stacked_samples(tmp_path, specs):
    one = np.zeros((2, 3, 4, 4), np.float32)
    np.savez(tmp_path / "one.npz", x=one)
    assert [f["x"].shape for f in load_inputs(tmp_path / "one.npz", specs)] == [(2, 3, 4, 4)]
    many = np.arange(5 * 2 * 3 * 4 * 4, dtype=np.float32).reshape(5, 2, 3, 4, 4)
    np.savez(tmp_path / "many.npz", x=many)
    feeds = load_inputs(tmp_path / "many.npz", specs)
    assert len(feeds) == 5 and np.array_equal(feeds[3]["x"], many[3])


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((1, 3, 4, 4), np.float32)}, "'y' is not an input of the model (inputs: x)"),
    ({}, "no data for input 'x' (given: nothing)"),
    ({"x": np.zeros((1, 4, 4, 4), np.float32)},
     "input 'x' expects float32 [N, 3, H, W], got float32 [1, 4, 4, 4]"),
    ({"x": np.zeros((1, 3, 4), np.float32)},
     "input 'x' expects float32 [N, 3, H, W] (or a leading sample axis), got float32 [1, 3, 4]"),
    ({"x": np.zeros((1, 3, 4, 4), np.float64)},
     "input 'x' expects float32 [N, 3, H, W], got float64 [1, 3, 4, 4]"),
])
def test_npz_wrong_name_shape_dtype(tmp_path, specs, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputDataError) as info:
        load_inputs(path, specs)
    assert str(info.value) == f"{path}: {message}"


def test_npz_errors_on_unreadable_or_missing_file(tmp_path, specs):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputDataError, match=r"bad\.npz: "):
        load_inputs(bad, specs)
    with pytest.raises(InputDataError, match=r"missing\.npz: no such file or folder$"):
        load_inputs(tmp_path / "missing.npz", specs)


def test_npz_sample_counts_must_agree(tmp_path):
    specs = model_inputs(gather_mask_model())
    np.savez(tmp_path / "d.npz", idx=np.zeros((3, 2), np.int64), mask=np.zeros((4, 2), bool))
    with pytest.raises(InputDataError, match=r"inputs have different sample counts: \{'idx': 3, 'mask': 4\}"):
        load_inputs(tmp_path / "d.npz", specs)


# --- onnx test-data folders --------------------------------------------------------------------

def _write_pb(path, array, name=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(numpy_helper.from_array(array, name).SerializeToString())


def test_pb_folder_single_sample_by_position_and_by_name(tmp_path):
    specs = model_inputs(gather_mask_model())          # idx (int64 [B]), mask (bool [B])
    _write_pb(tmp_path / "input_0.pb", np.array([1, 2], np.int64))
    _write_pb(tmp_path / "input_1.pb", np.array([True, False]), name="mask")
    (feed,) = load_inputs(tmp_path, specs)
    assert feed["idx"].tolist() == [1, 2] and feed["mask"].tolist() == [True, False]


def test_pb_test_data_sets_are_samples(tmp_path):
    specs = model_inputs(gather_mask_model())
    for i in range(3):
        _write_pb(tmp_path / f"test_data_set_{i}" / "input_0.pb", np.array([i], np.int64))
        _write_pb(tmp_path / f"test_data_set_{i}" / "input_1.pb", np.array([True]))
    feeds = load_inputs(tmp_path, specs)
    assert [f["idx"].tolist() for f in feeds] == [[0], [1], [2]]


def test_pb_folder_errors(tmp_path):
    specs = model_inputs(gather_mask_model())
    with pytest.raises(InputDataError, match=r"no input_\*\.pb files and no test_data_set_\* folders$"):
        load_inputs(tmp_path, specs)
    _write_pb(tmp_path / "input_0.pb", np.array([1], np.int32))
    _write_pb(tmp_path / "input_1.pb", np.array([True]))
    with pytest.raises(InputDataError) as info:
        load_inputs(tmp_path, specs)
    assert str(info.value) == f"{tmp_path}: input 'idx' expects int64 [B], got int32 [1]"
    (tmp_path / "input_1.pb").write_bytes(b"\xff\xff\xff")
    with pytest.raises(InputDataError, match=r"input_1\.pb: not a serialized ONNX TensorProto"):
        load_inputs(tmp_path, specs)
