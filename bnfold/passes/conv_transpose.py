"""ConvTranspose → BN: W [C_in, C_out/g, k…]; W[i, j] feeds output channel
o = (i // (C_in/g))·(C_out/g) + j, so it is scaled by s[o]; b' = s·b + t.

Grouped transposed convolutions are where tools get this wrong (scaling W[:, o] as if
g = 1 mixes the groups' channels): the channel map lives in ``numerics``.
"""

from __future__ import annotations

import numpy as np

from bnfold.numerics import conv_transpose_rows, fold_conv_transpose, round_checked
from bnfold.passes._affine import Linear, LinearPass, attr
from bnfold.passes._moments import input_stats
from bnfold.rounding import NEAREST, round_rows
from bnfold.passes._weights import constant_input, folded_name, required_weight


class ConvTransposeLinear(Linear):
    kind = "ConvTranspose"
    op_type = "ConvTranspose"
    pattern = "convtranspose"

    def check(self, ctx, node):
        w, reason = required_weight(ctx, node, 1, "weight W")
        if reason:
            return reason
        groups = int(attr(node, "group", 1))
        if w.ndim < 3 or groups < 1 or w.shape[0] % groups:
            return f"weight W of ConvTranspose {ctx.index.node_name(node)!r} of shape {list(w.shape)} does not fit group={groups}"
        b, reason = constant_input(ctx, node, 2, "bias B")
        if reason is None and b is not None and b.dtype != w.dtype:
            reason = f"bias B of ConvTranspose {ctx.index.node_name(node)!r} has dtype {b.dtype}, W has {w.dtype}"
        return reason

    def geometry(self, ctx, node):
        shape = ctx.index.weight_shape(node.input[1])
        return len(shape), shape[1] * int(attr(node, "group", 1)), 1

    def apply(self, ctx, node, affine):
        ix = ctx.index
        name = ix.node_name(node)
        groups = int(attr(node, "group", 1))
        w = ix.constant(node.input[1])
        b, _ = constant_input(ctx, node, 2, "bias B")
        w64, b64 = fold_conv_transpose(w, b, *affine, groups=groups)
        channel = np.arange(w.shape[0]).reshape((-1,) + (1,) * (w.ndim - 1))  # W[i] reads input channel i
        stats = input_stats(ctx, node.input[0], channel, b64, w.dtype)
        phases = tap_phases(w.shape[2:], attr(node, "strides"), attr(node, "dilations"))
        w_new = round_checked(w64, w.dtype, what=f"weights of ConvTranspose {name!r}",
                              rows=lambda a: conv_transpose_rows(a, groups),
                              rounding=ctx.rounding if len(phases) == 1 else NEAREST, stats=stats)
        if len(phases) > 1:
            # A strided ConvTranspose: each output position sees one phase's taps only, so the
            # errors must cancel within each (output channel, phase) (bnfold.rounding).
            for taps in phases:
                w_new = round_rows(w64, w_new, lambda a, taps=taps: conv_transpose_rows(
                    a.reshape(a.shape[:2] + (-1,))[:, :, taps], groups), ctx.rounding, stats)
        b_new = round_checked(b64, w.dtype, what=f"bias of ConvTranspose {name!r}")
        ix.write_input(node, 1, w_new, folded_name(ctx, node, 1, "W"))
        ix.write_input(node, 2, b_new, folded_name(ctx, node, 2, "B"))
        return node.output[0]


def tap_phases(kernel_shape, strides, dilations) -> list[np.ndarray]:
    """The kernel taps (flat indices) that reach the same output positions, one array per phase.

    Output position p of a ConvTranspose receives input i through tap k when
    p = i·stride + k·dilation − pad, so only the taps with k·dilation ≡ p + pad (mod stride)
    reach it: taps fall into phases by (k·dilation) mod stride, per spatial axis.
    """
    dims = len(kernel_shape)
    strides = list(strides or [1] * dims)
    dilations = list(dilations or [1] * dims)
    grids = np.meshgrid(*[np.arange(k) for k in kernel_shape], indexing="ij")
    key = np.zeros(grids[0].shape, dtype=np.int64) if dims else np.zeros((), dtype=np.int64)
    for g, s, d in zip(grids, strides, dilations):
        key = key * max(int(s), 1) + (g * int(d)) % max(int(s), 1)
    flat = key.reshape(-1)
    return [np.flatnonzero(flat == v) for v in np.unique(flat)]


LINEAR = ConvTransposeLinear()


PASS = LinearPass("convtranspose", LINEAR)
