"""The NumPy reference normalization runtime: the oracle bnfold is tested against.

Float64 inside; results in the input's float dtype unless ``dtype=`` says otherwise (integer
inputs give float64); channel axis 1. Forward (inference and training mode) and closed-form
backward for BatchNorm, LayerNorm, InstanceNorm and GroupNorm; the folded affine map of an
inference BN; the two frameworks' running-statistics updates; and the exact Algorithm-2
population estimator. Bad arguments raise ValueError naming the argument and the problem.
No torch, no onnxruntime: this package must stay an independent check of both.
"""

from bnfold.reference.batchnorm import (
    batch_norm_backward,
    batch_norm_inference,
    batch_norm_training,
    fold_params,
    update_running_stats_onnx,
    update_running_stats_torch,
)
from bnfold.reference.groupnorm import group_norm, group_norm_backward
from bnfold.reference.instancenorm import instance_norm, instance_norm_backward
from bnfold.reference.layernorm import layer_norm, layer_norm_backward
from bnfold.reference.population import PopulationStats

__all__ = [
    "PopulationStats",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_norm_training",
    "fold_params",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "update_running_stats_onnx",
    "update_running_stats_torch",
]
