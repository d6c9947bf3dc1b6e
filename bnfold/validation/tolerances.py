"""Default tolerances: derived from each dtype's machine epsilon and the model's widest dot product.

An element of the candidate output ``b`` passes against the reference ``a`` when

    |a − b| ≤ atol + rtol·|a|            (numpy.isclose, compared in float64)

and the defaults are

    k    = c(dtype) · √K
    rtol = k · eps(dtype)
    atol = k · eps(dtype) · scale,     scale = max |a| over the output (all samples), 1 if all zero

where ``K`` is the model's longest reduction: the largest fan-in (input channels per group ×
kernel size for Conv, the inner dimension for Gemm/MatMul) of any linear node of the main
graph, at least 16; a linear node whose weight shape is not known from an initializer counts
as 4096 (assume a wide network). ``c`` comes from :data:`EPS_MULTIPLIER`:

======== ============ ===== =========================================================
dtype    eps          c     e.g. K = 4608 (ResNet-50's 3×3×512 convs): k ≈ 68·c
======== ============ ===== =========================================================
float64  2.22e-16     16    rtol 2.4e-13, atol 2.4e-13 · max|ref|
float32  1.19e-7      16    rtol 1.3e-4,  atol 1.3e-4 · max|ref|
float16  9.77e-4      2     rtol 0.13,    atol 0.13 · max|ref|
bfloat16 7.81e-3      2     rtol 1.06,    atol 1.06 · max|ref| (bfloat16 cannot tell more)
integers, bool        —     exact (0, 0)
======== ============ ===== =========================================================

**Why atol scales with the output.** A network's rounding error is a fraction of the
*magnitude of its activations*, not of each element: near-zero outputs (after ReLUs, in
residual sums that cancel, small logits) carry the same absolute error as their neighbours.
A purely relative test fails them for nothing, and a fixed atol is wrong both ways (too loose
for outputs of size 1e-3, too tight for outputs of size 1e3).

**Why √K.** A fold changes the rounding of every weight by up to half an ulp and the order
in which the reference's Conv-then-BN and the candidate's folded Conv round. The error of a
length-K dot product with independent rounding errors grows like √K·eps (the probabilistic
rounding analysis of Higham & Mary, 2019), so wide layers need proportionally more room; a
constant k is either too tight for a ResNet-50 or blind in a narrow network.

**Measured** (onnxruntime 1.31 CPU, ORT_DISABLE_ALL, exactly folded copies, float64 fold
rounded once), ``max|a − b| / (eps · max|a|)`` for a correct fold:

* a ResNet-style stack of 50 Conv+BN layers (3×3, ReLU, residual Add every second layer,
  BN statistics calibrated on data; ``tests/validation/models.py``), float32, seeds 0–2.
  8 channels (K = 72, k = 136): correct fold 7–11, a weight 3 ulp off 6–10, one weight of
  layer 25 scaled by 1 + 1e-2: 1717–2078 (fails by > 10×). 16 channels (K = 144, k = 192):
  correct 9–11; the same change 141–398 (a weight of little influence there: caught on two
  of the three inputs), a weight of layer 10 instead 1366–2304. Sweeping the 1e-2 change over
  15 weights (layers 0, 10, 25, 40, 49) of each width with 3 samples, 26 of 30 fail, by up to
  60× the tolerance; the 4 that pass need 0.01–0.96 of it — their effect on the output is
  within a few times a correct fold's rounding, which no tolerance that passes correct folds
  of wide networks can separate. Fold errors proper (a wrong scale or epsilon for a whole
  channel) move every element of that channel and are caught with large margins.
* a ResNet-50 (torch definition, random init, BN statistics calibrated, 53 BN, K = 4608)
  folded by bnfold, float32, 8 inputs: 198–215 (onnxruntime's own Conv+BN fusion: 215);
  tolerance k = 1086, the largest element needing 1/7.6 of the default atol. In float16
  (same weights): 38 against k = 136; the float16 reference itself is that far from its
  float32 twin, so a float16 check catches fold errors of a few percent of the output scale
  and no finer, and a bfloat16 check only gross ones.

A network that amplifies rounding (a deep plain stack without residual connections can be
chaotic: there a correct float32 fold already moves the output by ~0.5 %) needs looser
tolerances: pass ``rtol``/``atol``; the report gives the tolerance that would have been
needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

#: dtype name → c in k = c·√K (rtol = k·eps, atol = k·eps·max|ref|); see the module docstring.
EPS_MULTIPLIER: dict[str, float] = {"float64": 16, "float32": 16, "float16": 2, "bfloat16": 2}
MIN_REDUCTION = 16
UNKNOWN_REDUCTION = 4096


@dataclass(frozen=True)
class Tolerance:
    """The tolerance one output is compared with: ``|a − b| ≤ atol + rtol·|a|``."""

    rtol: float
    atol: float
    source: str          # "default" (dtype × model table), "user", or "exact" (integer/bool)
    eps_multiple: float | None = None   # k of the default (None when exact)


def dtype_eps(dtype: np.dtype) -> float | None:
    """Machine epsilon of a floating dtype (bfloat16 included); None for non-float dtypes."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
    if np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return None


def resolve_tolerance(dtype: np.dtype, scale: float, *, reduction: int = UNKNOWN_REDUCTION,
                      rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The tolerance for an output of ``dtype`` whose reference has ``max|ref| == scale``, in a
    model whose longest reduction is ``reduction``.

    User values replace the defaults one by one (a given ``atol`` is absolute, in the
    output's units). Integer and bool outputs are compared exactly unless the user says
    otherwise.
    """
    dtype = np.dtype(dtype)
    name = "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.name
    eps = dtype_eps(dtype)
    k = None
    if eps is None:
        default_rtol, default_atol, source = 0.0, 0.0, "exact"
    else:
        k = EPS_MULTIPLIER.get(name, 16) * math.sqrt(max(int(reduction), MIN_REDUCTION))
        default_rtol = k * eps
        default_atol = k * eps * (scale if scale > 0 and np.isfinite(scale) else 1.0)
        source = "default"
    if rtol is not None or atol is not None:
        source = "user"
    return Tolerance(
        rtol=float(default_rtol if rtol is None else rtol),
        atol=float(default_atol if atol is None else atol),
        source=source,
        eps_multiple=k,
    )


def max_reduction_length(*models: onnx.ModelProto) -> int:
    """The longest dot product of any Conv/ConvTranspose/Gemm/MatMul of the models' main
    graphs, from the shapes of initializer weights (external data need not be loaded). A linear
    node whose weight shape is unknown counts as :data:`UNKNOWN_REDUCTION`; a model without
    linear nodes gets :data:`MIN_REDUCTION`."""
    best = MIN_REDUCTION
    for model in models:
        graph = model.graph
        dims = {t.name: list(t.dims) for t in graph.initializer}
        for node in graph.node:
            if node.op_type in _LINEAR:
                best = max(best, _reduction(node, dims) or UNKNOWN_REDUCTION)
    return best


_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _reduction(node: onnx.NodeProto, dims: dict[str, list[int]]) -> int | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input)
    if node.op_type == "Conv" and len(inputs) > 1 and inputs[1] in dims:
        w = dims[inputs[1]]
        return math.prod(w[1:]) if len(w) >= 2 else None
    if node.op_type == "ConvTranspose" and len(inputs) > 1 and inputs[1] in dims:
        w = dims[inputs[1]]
        group = int(attrs.get("group", 1)) or 1
        return (w[0] // group) * math.prod(w[2:]) if len(w) >= 2 else None
    if node.op_type == "Gemm" and len(inputs) > 1:
        if inputs[1] in dims and len(dims[inputs[1]]) == 2:
            b = dims[inputs[1]]
            return b[1] if attrs.get("transB", 0) else b[0]
        if inputs[0] in dims and len(dims[inputs[0]]) == 2:
            a = dims[inputs[0]]
            return a[0] if attrs.get("transA", 0) else a[1]
    if node.op_type == "MatMul" and len(inputs) > 1:
        if inputs[1] in dims and len(dims[inputs[1]]) >= 2:
            return dims[inputs[1]][-2]
        if inputs[0] in dims and len(dims[inputs[0]]) >= 1:
            return dims[inputs[0]][-1]
    return None
