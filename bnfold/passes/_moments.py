"""Expected per-channel mean and variance of a graph's tensors, read off its BatchNormalizations.

Compensated rounding (:mod:`bnfold.rounding`) cancels a folded layer's rounding error for the
inputs the layer will see; it needs E[x] and Var[x] of each input channel. A graph with BN
states them: a BatchNormalization's statistics *are* the population mean and variance of its
input, and its output has mean β and variance γ² per channel (that is what normalization
means). From there, per channel and treating each channel as Gaussian and the two operands of
an Add as independent:

* Relu(x), Clip(x, lo, hi) with constant bounds: the clipped-Gaussian moments;
* Add(x, y): means and variances add; Add/Mul with a scalar constant: shift / scale;
* Identity, Dropout (inference): unchanged.

A tensor these rules do not reach (a graph input, MaxPool, Concat, …) but that feeds
Conv/Gemm/MatMul → BN gets its mean from those BNs' statistics, solved backwards
(:func:`_from_consumers`). Anything else is unknown, and compensated rounding then assumes
only that the mean is the same on every position of the fan-in. Computed once per
graph body, at its first float16/bfloat16 fold, before that fold edits the graph: a fold renames the folded node's output
to the BN's output name, whose moments (β, γ²) are those of the folded output, so the table
stays true while the passes edit the graph. The estimates only steer which of two
neighbouring values a weight takes; they never change what is computed beyond that.
"""

from __future__ import annotations

import math

import numpy as np

from bnfold import rounding as rounding_
from bnfold.numerics import round_once
from bnfold.passes._affine import attr, bn_affine_or_reason
from bnfold.rounding import InputStats

Moments = tuple[np.ndarray, np.ndarray]  # (mean [C], var [C]) along axis 1

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2)))


def clipped(mean: np.ndarray, var: np.ndarray, lo: float, hi: float) -> Moments:
    """Mean and variance of clip(X, lo, hi) for X ~ N(mean, var) (lo may be -inf, hi +inf)."""
    s = np.sqrt(np.maximum(var, 0.0))
    safe = np.where(s > 0, s, 1.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        alpha = np.where(s > 0, (lo - mean) / safe, np.where(mean >= lo, -np.inf, np.inf))
        beta = np.where(s > 0, (hi - mean) / safe, np.where(mean <= hi, np.inf, -np.inf))
        ca, cb, pa, pb = _cdf(alpha), _cdf(beta), _phi(alpha), _phi(beta)
        apa = np.where(np.isfinite(alpha), alpha * pa, 0.0)
        bpb = np.where(np.isfinite(beta), beta * pb, 0.0)
        inside = cb - ca
        m1 = mean * inside + s * (pa - pb)
        m2 = mean * mean * inside + 2 * mean * s * (pa - pb) + s * s * (inside + apa - bpb)
        lo_part = np.where(ca > 0, lo * ca, 0.0) if np.isfinite(lo) else 0.0
        hi_part = np.where(cb < 1, hi * (1 - cb), 0.0) if np.isfinite(hi) else 0.0
        lo_sq = np.where(ca > 0, lo * lo * ca, 0.0) if np.isfinite(lo) else 0.0
        hi_sq = np.where(cb < 1, hi * hi * (1 - cb), 0.0) if np.isfinite(hi) else 0.0
    e1 = m1 + lo_part + hi_part
    e2 = m2 + lo_sq + hi_sq
    return e1, np.maximum(e2 - e1 * e1, 0.0)


def _scalar(ix, name: str) -> float | None:
    value = ix.constant(name) if name else None
    if value is None or value.size != 1:
        return None
    return float(np.asarray(value, dtype=np.float64).reshape(()))


def channel_moments(ctx) -> dict[str, Moments]:
    """{tensor name: (mean, var) per channel} for every tensor the rules above reach."""
    ix = ctx.index
    table: dict[str, Moments] = {}
    for node in ix.nodes:
        if node.domain not in ("", "ai.onnx") or not node.input or not node.output:
            continue
        op, out = node.op_type, node.output[0]
        known = table.get(node.input[0])
        if op == "BatchNormalization":
            affine, _ = bn_affine_or_reason(ctx, node)
            if affine is None:
                continue
            gamma, beta, mean, var = (np.asarray(ix.constant(n), dtype=np.float64) for n in node.input[1:5])
            table.setdefault(node.input[0], (mean, var))
            table[out] = (beta, gamma * gamma)
        elif known is None:
            continue
        elif op == "Relu":
            table[out] = clipped(*known, 0.0, math.inf)
        elif op == "Clip":
            if ctx.opset < 11:
                lo, hi = attr(node, "min", -math.inf), attr(node, "max", math.inf)
            else:
                lo = _scalar(ix, node.input[1]) if len(node.input) > 1 and node.input[1] else -math.inf
                hi = _scalar(ix, node.input[2]) if len(node.input) > 2 and node.input[2] else math.inf
            if lo is not None and hi is not None:
                table[out] = clipped(*known, float(lo), float(hi))
        elif op in ("Identity", "Dropout"):
            table[out] = known
        elif op in ("Add", "Mul") and len(node.input) == 2:
            other = table.get(node.input[1])
            c = _scalar(ix, node.input[1])
            if op == "Add" and other is not None and other[0].shape == known[0].shape:
                table[out] = (known[0] + other[0], known[1] + other[1])
            elif c is not None:
                table[out] = (known[0] + c, known[1]) if op == "Add" else (known[0] * c, known[1] * c * c)
    for node in ix.nodes:  # inputs nothing above reaches (graph inputs, MaxPool, Concat, …)
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input and node.input[0] not in table:
            solved = _from_consumers(ctx, node.input[0])
            if solved is not None:
                table[node.input[0]] = solved
    return table


def _consumer_equations(ctx, node, name: str):
    """(A, rhs) with E[BN input] = A·μ + bias for a Conv/Gemm/MatMul reading ``name`` whose
    output goes only to an inference BN; None when the node is not such a consumer."""
    ix = ctx.index
    consumers = ix.consumers_of(node.output[0])
    if (node.domain not in ("", "ai.onnx") or node.input[0] != name or len(consumers) != 1
            or ix.is_output(node.output[0]) or not ctx.is_bn(consumers[0])):
        return None
    bn = consumers[0]
    if bn_affine_or_reason(ctx, bn)[0] is None:
        return None
    w = ix.constant(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.dtype.kind not in "f" and w.dtype.name != "bfloat16":
        return None
    w = np.asarray(w, dtype=np.float64)
    bias = ix.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv" and w.ndim >= 3:
        groups = int(attr(node, "group", 1))
        c_out, c_in_g = w.shape[0], w.shape[1]
        summed = w.reshape(c_out, c_in_g, -1).sum(axis=2)  # every tap sees the channel's mean
        a = np.zeros((c_out, c_in_g * groups))
        for g in range(groups):
            rows = slice(g * (c_out // groups), (g + 1) * (c_out // groups))
            a[rows, g * c_in_g:(g + 1) * c_in_g] = summed[rows]
    elif node.op_type == "Gemm" and w.ndim == 2 and not attr(node, "transA", 0):
        a = float(attr(node, "alpha", 1.0)) * (w if attr(node, "transB", 0) else w.T)
        bias = None if bias is None else float(attr(node, "beta", 1.0)) * np.asarray(bias, dtype=np.float64)
    elif node.op_type == "MatMul" and w.ndim == 2 and ix.rank(name) == 2:
        a, bias = w.T, None
    else:
        return None
    mean = np.asarray(ix.constant(bn.input[3]), dtype=np.float64)
    b = np.zeros(a.shape[0]) if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (a.shape[0],))
    if mean.shape != (a.shape[0],) or b.shape != (a.shape[0],):
        return None
    return a, mean - b


def _from_consumers(ctx, name: str, tolerance: float = 0.05) -> Moments | None:
    """E[x] per channel of ``name`` solved from the BN statistics *after* the linear nodes that
    read it: each such BN's running mean is E[W·x + b] = W_Σ·E[x] + b (W_Σ: the weights summed
    over the kernel taps), one equation per output channel. Accepted only when the stacked
    system determines E[x] (full column rank) and is consistent (relative residual below
    ``tolerance``: statistics that do not describe the activations are not used). The variance
    is not determined; E[x]² stands in for it (a post-ReLU activation has var ≈ 2·E[x]²)."""
    equations = [e for e in (_consumer_equations(ctx, n, name) for n in ctx.index.consumers_of(name)) if e]
    widths = {a.shape[1] for a, _ in equations}
    if not equations or len(widths) != 1:
        return None
    a = np.concatenate([a for a, _ in equations])
    rhs = np.concatenate([r for _, r in equations])
    if a.shape[0] < a.shape[1] or not np.isfinite(a).all() or not np.isfinite(rhs).all():
        return None
    # Least squares through the normal equations, after checking the conditioning with the
    # singular values (numpy's lstsq costs ~0.3 s here, SVD values + solve ~2 ms).
    singular = np.linalg.svd(a, compute_uv=False)
    if singular[-1] <= 1e-6 * singular[0]:
        return None
    mean = np.linalg.solve(a.T @ a, a.T @ rhs)
    if np.linalg.norm(a @ mean - rhs) > tolerance * np.linalg.norm(rhs):
        return None
    return mean, mean * mean


def input_stats(ctx, data: str | None, channel: np.ndarray, bias, dtype, *, scale: float = 1.0) -> InputStats | None:
    """The :class:`~bnfold.rounding.InputStats` for folding into a node that reads ``data``.

    Args:
        ctx: the FoldContext (its ``rounding`` and ``moments``).
        data: the name of the node's data input (None: its channel axis is not the weights'
            input axis, nothing is known).
        channel: integer array broadcastable to the weight's shape: the input channel (the
            channel axis of ``data``) each weight multiplies.
        bias: the exact float64 folded bias, one value per output channel, or None (a bias
            that is not per channel, like Gemm's [M, F] C); its round-to-nearest error is
            compensated by the weights.
        dtype: the weight's dtype.
        scale: a factor the node applies to the product (Gemm's α).

    Returns None when the rounding strategy does not apply to ``dtype`` (nothing to compute).
    """
    if not rounding_.applies(ctx.rounding, dtype):
        return None
    if ctx.moments is None:
        # Here, at the first half-precision fold of this graph body, the graph is still as
        # loaded (unless layers of another dtype were folded first: their BNs are then gone
        # and inputs they described fall back to "unknown").
        ctx.moments = channel_moments(ctx)
    known = ctx.moments.get(data) if data else None
    if known is None or int(np.max(channel)) >= known[0].shape[0]:
        return rounding_.InputStats()
    offset = None
    if bias is not None:
        exact = np.asarray(bias, dtype=np.float64).reshape(-1)
        offset = round_once(exact, dtype).astype(np.float64) - exact
    return rounding_.InputStats(mean=scale * known[0][channel], var=scale * scale * known[1][channel], offset=offset)
