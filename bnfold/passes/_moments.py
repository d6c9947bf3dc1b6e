"""Expected per-channel mean and variance of a graph's tensors, for compensated rounding.

Compensated rounding (:mod:`bnfold.rounding`) cancels a folded layer's rounding error for the
inputs the layer will see; it needs E[x] and Var[x] of each input channel. Two sources:

* **the BN statistics**, when they describe the activations (a trained or calibrated model):
  a BatchNormalization's statistics *are* the population mean and variance of its input,
  and its output has mean β and variance γ² per channel;
* **propagation through the weights**, when they do not (a model whose statistics were never
  estimated: random, or the initial mean 0 / var 1 — like the bench's ResNet-50-like, whose
  activation means are 2-5 where its statistics say ~0): from a standard-normal graph input
  (what validation feeds), a Conv/ConvTranspose/Gemm/MatMul maps the means linearly (every
  tap of a channel sees the channel's mean; zero padding is left out) and the variances as
  for independent inputs, a BN is the affine map s·x + t of what reaches it.

Which one: one pass reads the statistics and, for the first 8 BNs the layer before
predicts (``_VOTES``), checks the running mean against that one-layer prediction
(:func:`_agrees`); when most disagree, the pass is redone by propagation. Measured on the
bench's models, calibrated statistics are within 0.4 of the threshold and uncalibrated ones
2-20 times beyond it. Between linear layers, per channel, treating each channel as Gaussian
and the operands of an Add as independent:

* Relu(x), Clip(x, lo, hi) with constant bounds: the clipped-Gaussian moments;
* MaxPool of kernel size n: the moments of (the clip of) the max of n independent draws
  (:func:`max_clipped`), an upper estimate: neighbouring positions are correlated; with the
  statistics, the mean is solved from the BNs after the linear nodes that read the output
  instead, when they determine it consistently (:func:`_from_consumers`);
* Add(x, y): means and variances add; Add/Mul with a scalar constant: shift / scale;
* GlobalAveragePool, AveragePool, Flatten after a GlobalAveragePool, Identity, Dropout:
  the mean is kept (so is the variance: the positions' correlation is unknown).

A graph input that feeds a linear node and nothing determines is propagated as N(0, 1) but
left out of the table: the layer reading it is rounded for "the same mean along the fan-in"
(:class:`~bnfold.rounding.InputStats` with no mean), which also covers a zero mean. Anything
else these rules do not reach (Concat, Sigmoid, …) is unknown (the same fallback), unless
solved from its consumers. Computed once per graph body, at its first float16/bfloat16 fold,
before that fold edits the graph: a fold renames the folded node's output to the BN's output
name, whose moments are those of the folded output, so the table stays true while the passes
edit the graph. The estimates only steer which of two neighbouring values a weight takes;
they never change what is computed beyond that. Cost on the ResNet-50-like float16: ~0.1 s
(one float32 pass over the weights, in cache-sized blocks), with single-threaded BLAS.
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


# z grid for the quadrature of a maximum of Gaussians (|z| > 9: probability below 1e-18)
_Z = np.linspace(-9.0, 9.0, 721)
_DZ = _Z[1] - _Z[0]


def max_clipped(mean: np.ndarray, var: np.ndarray, n: int, lo: float, hi: float) -> Moments:
    """Mean and variance of clip(max(X_1 … X_n), lo, hi), X_i ~ N(mean, var) independent.

    MaxPool of a Relu: max_i relu(x_i) = relu(max_i x_i). The density of the maximum of n
    standard normals is n·φ(z)·Φ(z)^(n−1); the moments are a quadrature over z, per channel."""
    weight = n * _phi(_Z) * _cdf(_Z) ** (n - 1) * _DZ
    weight /= weight.sum()
    x = np.clip(mean[:, None] + np.sqrt(np.maximum(var, 0.0))[:, None] * _Z[None, :], lo, hi)
    e1 = x @ weight
    e2 = (x * x) @ weight
    return e1, np.maximum(e2 - e1 * e1, 0.0)


def _agrees(forward: np.ndarray, stated: Moments) -> bool:
    """Whether a BN's running mean is the mean the layer before it predicts (``forward``,
    from the statistics of the BN before): within half its own size plus a tenth of a
    standard deviation, root-mean-square over the channels. A trained or calibrated model
    passes this (~1 % apart), a model whose statistics were never estimated (random, or the
    initial mean 0 / var 1) fails it."""
    mean, var = stated
    gap = float(np.sqrt(np.mean((forward - mean) ** 2)))
    return gap <= 0.5 * float(np.sqrt(np.mean(mean ** 2))) + 0.1 * float(np.sqrt(np.mean(var)))


def _products(a: np.ndarray, m: np.ndarray, v: np.ndarray, *, rows: bool) -> Moments:
    """(a·m, (a∘a)·v) over the rows of a 2-D weight view (``rows``: one result per row, m and v
    per column; else per column, m and v per row), in float32 blocks that stay in cache: the
    weights are converted once, with no weight-sized temporaries."""
    step = max(1, (1 << 16) // max(1, a.shape[1]))
    m, v = m.astype(np.float32), v.astype(np.float32)
    if rows:
        mean, var = np.empty(a.shape[0]), np.empty(a.shape[0])
    else:
        mean, var = np.zeros(a.shape[1]), np.zeros(a.shape[1])
    for lo in range(0, a.shape[0], step):
        block = a[lo:lo + step].astype(np.float32)
        if rows:
            mean[lo:lo + step] = block @ m
            np.square(block, out=block)
            var[lo:lo + step] = block @ v
        else:
            mean += m[lo:lo + step] @ block
            np.square(block, out=block)
            var += v[lo:lo + step] @ block
    return mean, var


def _linear_forward(ctx, node, known: Moments) -> Moments | None:
    """(mean, var) per output channel of a Conv/ConvTranspose/Gemm/MatMul with constant weights
    whose input has per-channel moments ``known``: the mean is linear (every tap of a channel
    sees its mean: border padding aside, exact), the variance assumes independent inputs.
    Estimates, computed in float32."""
    ix = ctx.index
    w = ix.constant(node.input[1])
    if w is None or (w.dtype.kind != "f" and w.dtype.name != "bfloat16"):
        return None
    m, v = known
    op = node.op_type
    groups = int(attr(node, "group", 1))
    bias = ix.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    bias = None if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if op == "Conv" and w.ndim >= 3:  # W [C_out, C_in/g, k…]
        c_out, c_in_g, taps = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
        if c_in_g * groups != m.shape[0] or c_out % groups:
            return None
        if groups == 1:  # every tap of a channel sees its mean: m repeated over the taps
            mean, var = _products(w.reshape(c_out, -1), np.repeat(m, taps), np.repeat(v, taps), rows=True)
        else:
            blocks = np.asarray(w, dtype=np.float32).reshape(groups, c_out // groups, c_in_g, taps)
            mean = np.einsum("gojt,gj->go", blocks, m.reshape(groups, c_in_g)).reshape(-1)
            var = np.einsum("gojt,gojt,gj->go", blocks, blocks, v.reshape(groups, c_in_g)).reshape(-1)
    elif op == "ConvTranspose" and w.ndim >= 3:  # W [C_in, C_out/g, k…]
        c_in, c_out_g = w.shape[0], w.shape[1]
        if c_in != m.shape[0] or c_in % groups:
            return None
        # an output position sums 1/∏strides of the taps
        stride = float(np.prod(attr(node, "strides", [1])))
        blocks = np.asarray(w, dtype=np.float32).reshape(groups, c_in // groups, c_out_g, -1)
        mean = np.einsum("giot,gi->go", blocks, m.reshape(groups, -1)).reshape(-1) / stride
        var = np.einsum("giot,giot,gi->go", blocks, blocks, v.reshape(groups, -1)).reshape(-1) / stride
    elif op == "Gemm" and w.ndim == 2 and not attr(node, "transA", 0):
        trans = bool(attr(node, "transB", 0))
        if w.shape[1 if trans else 0] != m.shape[0]:
            return None
        alpha = float(attr(node, "alpha", 1.0))
        mean, var = _products(w, m, v, rows=trans)
        mean, var = alpha * mean, alpha * alpha * var
        bias = None if bias is None else float(attr(node, "beta", 1.0)) * bias
    elif op == "MatMul" and w.ndim == 2 and ix.rank(node.input[0]) == 2 and w.shape[0] == m.shape[0]:
        mean, var = _products(w, m, v, rows=False)
        bias = None
    else:
        return None
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    if bias is not None:
        if bias.size not in (1, mean.shape[0]):
            return None  # a Gemm C that is not per feature: unknown
        mean = mean + bias
    return mean, var


def channel_moments(ctx) -> dict[str, Moments]:
    """{tensor name: (mean, var) per channel} for every tensor the rules above reach."""
    table, votes = _propagate(ctx, anchored=True)
    if 2 * sum(votes) < len(votes):  # most statistics do not describe the activations
        table, _ = _propagate(ctx, anchored=False)
    return table


# BNs whose statistics are checked against the prediction of the layer before them: enough
# for a clear majority, and the first ones are the cheapest to predict (the thin early layers)
_VOTES = 8


def _propagate(ctx, *, anchored: bool) -> tuple[dict[str, Moments], list[bool]]:
    """One pass over the nodes in order. ``anchored``: every BN's input takes the BN's own
    statistics (and its output β, γ²), and ``votes`` records, for the first BNs whose input
    the layer before predicts, whether the statistics agree with that prediction (the pass
    stops early when most do not). Not anchored: a BN is the affine map s·x + t of the
    moments propagated to it, from a standard-normal graph input."""
    ix = ctx.index
    table: dict[str, Moments] = {}
    clips: dict[str, tuple[Moments, float, float]] = {}  # output of Relu/Clip: the Gaussian clipped
    weak: set[str] = set()  # estimates that a consistent solve from the consumers' statistics replaces
    votes: list[bool] = []
    tried: set[str] = set()  # names already solved for (once each: an SVD per try)
    assumed: set[str] = set()  # graph inputs taken as standard normal

    def source(name: str, width: int) -> Moments | None:
        """The moments of ``name`` as the data input of a linear node reading ``width`` channels."""
        if anchored and (name not in table or name in weak) and name not in tried:
            tried.add(name)
            solved = _from_consumers(ctx, name)
            if solved is not None and solved[0].shape[0] == width:
                # the solve gives the mean only; keep a propagated variance when there is one
                known = table.get(name)
                table[name] = (solved[0], known[1] if known is not None else solved[1])
                weak.discard(name)
        if name not in table and name in ix.inputs and ix.constant(name) is None:
            # nothing known of a graph input: propagate a standard normal (what validation
            # feeds), but leave it out of the table (see the end)
            table[name] = (np.zeros(width), np.ones(width))
            weak.add(name)
            assumed.add(name)
        return table.get(name)

    for node in ix.nodes:
        if node.domain not in ("", "ai.onnx") or not node.input or not node.output:
            continue
        op, out = node.op_type, node.output[0]
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            if anchored and len(votes) >= _VOTES and _feeds_only_bn(ctx, out):
                continue  # the BN's statistics will stand for this output: no need to predict it
            width = _input_width(ctx, node)
            known = source(node.input[0], width) if width else None
            if known is not None and known[0].shape[0] == width:
                forward = _linear_forward(ctx, node, known)
                if forward is not None:
                    table[out] = forward
            continue
        known = table.get(node.input[0])
        if op == "BatchNormalization":
            affine, _ = bn_affine_or_reason(ctx, node)
            if affine is None:
                continue
            gamma, beta, mean, var = (np.asarray(ix.constant(n), dtype=np.float64) for n in node.input[1:5])
            if known is not None and known[0].shape != mean.shape:
                known = None
            if anchored or known is None:
                if known is not None and node.input[0] not in weak and len(votes) < _VOTES:
                    votes.append(_agrees(known[0], (mean, var)))
                    if len(votes) == _VOTES and 2 * sum(votes) < len(votes):
                        return table, votes
                table[node.input[0]] = (mean, var)
                weak.discard(node.input[0])
                table[out] = (beta, gamma * gamma)
            else:
                s = affine[0]
                table[out] = (s * (known[0] - mean) + beta, s * s * known[1])
        elif known is None:
            continue
        elif op in ("Relu", "Clip"):
            lo, hi = 0.0, math.inf
            if op == "Clip" and ctx.opset < 11:
                lo, hi = attr(node, "min", -math.inf), attr(node, "max", math.inf)
            elif op == "Clip":
                lo = _scalar(ix, node.input[1]) if len(node.input) > 1 and node.input[1] else -math.inf
                hi = _scalar(ix, node.input[2]) if len(node.input) > 2 and node.input[2] else math.inf
            if lo is not None and hi is not None:
                table[out] = clipped(*known, float(lo), float(hi))
                clips[out] = (known, float(lo), float(hi))
        elif op == "MaxPool" and not any(node.output[1:]):  # no Indices output
            # independent positions: an upper estimate (neighbouring positions are correlated)
            n = int(np.prod(attr(node, "kernel_shape", [1])))
            base, lo, hi = clips.get(node.input[0], (known, -math.inf, math.inf))
            table[out] = max_clipped(*base, n, lo, hi)
            weak.add(out)
        elif op in ("GlobalAveragePool", "AveragePool", "Identity", "Dropout") or (
                op == "Flatten" and attr(node, "axis", 1) == 1 and ix.producer_of(node.input[0]) is not None
                and ix.producer_of(node.input[0]).op_type == "GlobalAveragePool"):
            # pooling keeps a channel's mean; its variance over samples shrinks by an unknown
            # factor (the positions' correlation), kept as is
            table[out] = known
        elif op in ("Add", "Mul") and len(node.input) == 2:
            other = table.get(node.input[1])
            c = _scalar(ix, node.input[1])
            if op == "Add" and other is not None and other[0].shape == known[0].shape:
                table[out] = (known[0] + other[0], known[1] + other[1])
            elif c is not None:
                table[out] = (known[0] + c, known[1]) if op == "Add" else (known[0] * c, known[1] * c * c)
    if anchored:
        for node in ix.nodes:  # inputs nothing above reaches (Concat, …)
            if (node.op_type in ("Conv", "Gemm", "MatMul") and node.input and node.input[0] not in table
                    and node.input[0] not in tried):
                tried.add(node.input[0])
                solved = _from_consumers(ctx, node.input[0])
                if solved is not None:
                    table[node.input[0]] = solved
    for name in assumed & weak:
        # a layer reading the graph input itself is rounded for "the same mean on every
        # position of its fan-in" (rounding.InputStats()), which also covers zero-mean inputs
        del table[name]
    return table, votes


def _feeds_only_bn(ctx, name: str) -> bool:
    ix = ctx.index
    consumers = ix.consumers_of(name)
    return bool(consumers) and not ix.is_output(name) and all(
        ctx.is_bn(c) and c.input[0] == name and bn_affine_or_reason(ctx, c)[0] is not None for c in consumers)


def _input_width(ctx, node) -> int | None:
    """Channels of the data input a Conv/ConvTranspose/Gemm/MatMul's weights read."""
    shape = ctx.index.weight_shape(node.input[1])
    if shape is None or len(shape) < 2:
        return None
    if node.op_type == "Conv":
        return shape[1] * int(attr(node, "group", 1))
    if node.op_type == "Gemm":
        return shape[1] if attr(node, "transB", 0) else shape[0]
    return shape[0]


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
    if (known is None or int(np.max(channel)) >= known[0].shape[0]
            or not (np.isfinite(known[0]).all() and np.isfinite(known[1]).all())):
        return rounding_.InputStats()
    offset = None
    if bias is not None:
        exact = np.asarray(bias, dtype=np.float64).reshape(-1)
        offset = round_once(exact, dtype).astype(np.float64) - exact
    return rounding_.InputStats(mean=scale * known[0][channel], var=scale * scale * known[1][channel], offset=offset)
