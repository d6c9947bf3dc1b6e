"""Gemm → BN: Y = α·A·B̃ + β_g·C with features on axis 1 of Y.

s·Y + t = α·A·(B̃·diag(s)) + (s·β_g·C + t): scale the output-feature columns of B̃ (rows of
B when transB=1), and replace C by s·(β_g·C) + t broadcast like C against [F] (absent or
scalar → [F]; [F]; [1,F]; [M,1] or [M,F] → [M,F]) with β_g set to 1. α and transA are
untouched.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from bnfold.numerics import column_rows, conv_rows, fold_gemm, round_checked
from bnfold.passes._affine import Linear, LinearPass, attr
from bnfold.passes._moments import input_stats
from bnfold.passes._weights import constant_input, folded_name, required_weight


class GemmLinear(Linear):
    kind = "Gemm"
    op_type = "Gemm"
    pattern = "gemm"

    def check(self, ctx, node):
        b, reason = required_weight(ctx, node, 1, "B", rank=2)
        if reason:
            return reason
        c, reason = constant_input(ctx, node, 2, "C")
        if reason is None and c is not None and c.dtype != b.dtype:
            reason = f"C of Gemm {ctx.index.node_name(node)!r} has dtype {c.dtype}, B has {b.dtype}"
        return reason

    def geometry(self, ctx, node):
        shape = ctx.index.weight_shape(node.input[1])
        return 2, shape[0] if attr(node, "transB", 0) else shape[1], 1

    def apply(self, ctx, node, affine):
        ix = ctx.index
        name = ix.node_name(node)
        trans_b = bool(attr(node, "transB", 0))
        b = ix.constant(node.input[1])
        c, _ = constant_input(ctx, node, 2, "C")
        b64, c64 = fold_gemm(b, c, *affine, trans_b=trans_b, beta=float(attr(node, "beta", 1.0)))
        # input feature k of A (axis 1 unless transA) multiplies B[k, :] (B[:, k] with transB)
        channel = np.arange(b.shape[1 if trans_b else 0]).reshape((1, -1) if trans_b else (-1, 1))
        data = None if attr(node, "transA", 0) else node.input[0]
        per_feature = c64 if c64.size == affine[0].shape[0] else None  # an [M, F] C is not per channel
        # α·A·B̃: the weights multiply α·x, so α scales the input statistics
        stats = input_stats(ctx, data, channel, per_feature, b.dtype, scale=float(attr(node, "alpha", 1.0)))
        b_new = round_checked(b64, b.dtype, what=f"B of Gemm {name!r}", rows=conv_rows if trans_b else column_rows,
                              rounding=ctx.rounding, stats=stats)
        c_new = round_checked(c64, b.dtype, what=f"C of Gemm {name!r}")
        ix.write_input(node, 1, b_new, folded_name(ctx, node, 1, "B"))
        ix.write_input(node, 2, c_new, folded_name(ctx, node, 2, "C"))
        kept = [a for a in node.attribute if a.name != "beta"]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("beta", 1.0))
        return node.output[0]


LINEAR = GemmLinear()


PASS = LinearPass("gemm", LINEAR)
