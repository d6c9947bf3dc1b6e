"""check() end to end on small models with hand-folded twins: the issue's list of cases."""

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

from bnfold import check
from bnfold.errors import InputDataError, ModelLoadError, UsageError
from bnfold.testing import assert_equivalent
from tests.ortutil import bfloat16_scale_model, make_model
from tests.validation.models import (
    conv_bn, gather_mask_model, nudge_weight_ulps, resnet_stack, scale_weight, sqrt_model, stack_model,
)


@pytest.fixture(scope="module")
def stack():
    """The 50-layer ResNet-style Conv+BN stack of the tolerance docstring, float32."""
    params = resnet_stack(layers=50)
    return params, stack_model(params, folded=False)


def test_correct_fold_of_a_50_layer_stack_passes(stack):
    params, reference = stack
    report = check(reference, stack_model(params, folded=True), samples=3)
    assert report.passed, report.format()
    (o,) = report.comparisons[0].outputs
    assert 0 < o.max_abs_error < o.tolerance.atol / 4      # a real margin, not a near miss


def test_weight_nudged_by_a_few_ulp_passes(stack):
    params, reference = stack
    report = check(reference, stack_model(params, folded=True, perturb=nudge_weight_ulps(25, 3)), samples=3)
    assert report.passed, report.format()


def test_weight_off_by_one_percent_fails_and_points_to_the_output(stack):
    params, reference = stack
    report = check(reference, stack_model(params, folded=True, perturb=scale_weight(25, 1.01)), samples=3)
    assert not report.passed
    (c, o), = report.failures()
    assert (c.provider, o.output) == ("cpu", "y")
    assert o.max_abs_error > 5 * o.tolerance.atol                # clearly, not marginally, out
    assert o.needed_atol == pytest.approx(o.max_abs_error, rel=0.05)
    assert o.failing > 0 and 0 < o.failing_fraction < 1
    verdict = report.verdict()
    assert verdict.startswith("FAIL: output 'y' on cpu: ")
    assert f"max abs error {o.max_abs_error:.2e}" in verdict
    assert f"worst at sample {o.worst.sample} index [" in verdict
    with pytest.raises(AssertionError, match=r"(?s)models are not equivalent.*FAIL: output 'y' on cpu"):
        assert_equivalent(reference, stack_model(params, folded=True, perturb=scale_weight(25, 1.01)), samples=3)


def test_wrong_bn_scale_fails_on_a_single_layer():
    report = check(conv_bn(folded=False), conv_bn(folded=True, bn_scale=1.001))
    assert not report.passed
    assert check(conv_bn(folded=False), conv_bn(folded=True)).passed


@pytest.mark.parametrize("dims, shape", [(None, [1, 3, 8, 8]), ({"N": 3, "H": 5, "W": 7}, [3, 3, 5, 7])])
def test_dynamic_dims(dims, shape):
    report = check(conv_bn(folded=False, dynamic=True), conv_bn(folded=True, dynamic=True), dims=dims)
    assert report.passed and report.inputs == {"x": {"dtype": "float32", "shape": shape}}
    (o,) = report.comparisons[0].outputs
    assert o.shape == (shape[0], 4, shape[2], shape[3])


def test_integer_and_bool_inputs_and_multiple_outputs():
    report = check(gather_mask_model(), gather_mask_model(), samples=2, dims={"B": 6})
    assert report.passed
    assert report.inputs == {"idx": {"dtype": "int64", "shape": [6]}, "mask": {"dtype": "bool", "shape": [6]}}
    rows, kept = report.comparisons[0].outputs
    assert (rows.output, kept.output) == ("rows", "kept")
    assert kept.tolerance.source == "exact" and kept.elements == 12
    broken = check(gather_mask_model(), gather_mask_model(broken=True), samples=2, dims={"B": 6})
    rows, kept = broken.comparisons[0].outputs
    assert not broken.passed and not rows.passed and kept.passed          # only the changed output fails
    assert [o.output for _, o in broken.failures()] == ["rows"]


def test_user_arrays_and_npz(tmp_path):
    feeds = [{"idx": np.array([7, 0], np.int64), "mask": np.array([True, True])}]
    report = check(gather_mask_model(), gather_mask_model(broken=True), inputs=feeds)
    (c, rows), = report.failures()
    assert rows.max_abs_error == pytest.approx(0.5 * 23)                 # table[7, 2] = 23, ×1.5 vs ×1
    assert report.seed is None and report.samples == 1
    np.savez(tmp_path / "d.npz", idx=np.zeros((4, 3), np.int64), mask=np.ones((4, 3), bool))
    report = check(gather_mask_model(), gather_mask_model(), inputs=tmp_path / "d.npz", samples=99)
    assert report.passed and report.samples == 4 and report.input_source == str(tmp_path / "d.npz")
    np.savez(tmp_path / "bad.npz", idx=np.zeros(3, np.int32), mask=np.ones(3, bool))
    with pytest.raises(InputDataError, match=r"input 'idx' expects int64 \[B\], got int32 \[3\]$"):
        check(gather_mask_model(), gather_mask_model(), inputs=tmp_path / "bad.npz")


def test_nan_in_both_at_the_same_place_is_equal_elsewhere_fails():
    # x ~ N(0, 1): Sqrt gives NaN for negative entries in both models.
    assert check(sqrt_model(), sqrt_model(), seed=1).passed
    report = check(sqrt_model(), sqrt_model(offset=1e-30), seed=1)   # same NaNs, tiny finite change
    assert report.passed
    report = check(sqrt_model(), sqrt_model(offset=10.0), seed=1)    # candidate has no NaN at all
    (o,) = report.comparisons[0].outputs
    assert not o.passed and o.nonfinite_mismatches > 0 and o.needed_atol == float("inf")


def test_signature_mismatch_is_a_usage_error():
    other = make_model([helper.make_node("Identity", ["x"], ["z"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 6, 6])])
    with pytest.raises(UsageError) as info:
        check(conv_bn(folded=False), other)
    assert str(info.value) == ("reference (in memory) and candidate (in memory) cannot be compared: "
                               "their outputs differ (y vs z)")
    half = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3, 6, 6])])
    with pytest.raises(UsageError, match=r"output 'y' is float32 in the reference but float16 in the candidate$"):
        check(conv_bn(folded=False), half)


def test_candidate_that_onnxruntime_rejects_fails_the_check():
    broken = conv_bn(folded=True)
    broken.graph.node[0].op_type = "NoSuchOp"
    report = check(conv_bn(folded=False), broken)
    assert not report.passed
    (c, o), = report.failures()
    assert o is None and c.error.startswith("candidate (in memory): onnxruntime cannot load it on cpu: ")
    with pytest.raises(ModelLoadError, match=r"^reference \(in memory\): onnxruntime cannot load it on cpu: "):
        check(broken, conv_bn(folded=True))


def test_paths_are_loaded_and_unreadable_ones_are_errors(tmp_path):
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    ref.write_bytes(conv_bn(folded=False).SerializeToString())
    cand.write_bytes(conv_bn(folded=True).SerializeToString())
    report = check(ref, str(cand))
    assert report.passed and (report.reference, report.candidate) == (str(ref), str(cand))
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match=r"junk\.onnx: not an ONNX model"):
        check(ref, tmp_path / "junk.onnx")


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_ort_opt_levels(level):
    report = check(conv_bn(folded=False), conv_bn(folded=True), ort_opt_level=level)
    assert report.passed and report.ort_opt_level == level


@pytest.mark.parametrize("kwargs, message", [
    ({"ort_opt_level": "max"}, "--ort-opt-level: unknown level 'max'; use one of disable, basic, extended, all"),
    ({"samples": 0}, "--samples: must be a positive integer, got 0"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(UsageError) as info:
        check(conv_bn(folded=False), conv_bn(folded=True), **kwargs)
    assert str(info.value) == message


def test_progress_is_reported_per_model_run():
    calls = []
    check(conv_bn(folded=False), conv_bn(folded=True), samples=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]


def test_bfloat16_inputs_and_outputs():
    model = lambda k: bfloat16_scale_model(k, [4, 4])  # noqa: E731
    report = check(model(1.0), model(1.0 + 2.0 ** -9))   # below bfloat16's resolution after rounding
    (o,) = report.comparisons[0].outputs
    assert report.passed and o.dtype == "bfloat16"
    report = check(model(1.0), model(1.5))
    assert not report.passed
    assert report.inputs["x"]["dtype"] == "bfloat16"
    feed = {"x": np.ones((4, 4), ml_dtypes.bfloat16)}
    (o,) = check(model(1.0), model(1.5), inputs=feed).comparisons[0].outputs
    assert o.max_abs_error == 0.5


def test_external_data_models_run_from_their_path(tmp_path):
    from bnfold.modelio import save_model, uses_external_data
    params = resnet_stack(layers=4, channels=16)
    ref = save_model(stack_model(params, folded=False, channels=16), tmp_path / "ref.onnx", external_data=True)
    cand = save_model(stack_model(params, folded=True, channels=16, perturb=scale_weight(1, 1.5)),
                      tmp_path / "cand.onnx", external_data=True)
    assert uses_external_data(__import__("onnx").load(str(ref), load_external_data=False))
    assert check(ref, ref).passed
    report = check(ref, cand)
    assert not report.passed and report.failures()[0][1].output == "y"
