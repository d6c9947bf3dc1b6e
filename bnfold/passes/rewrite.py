"""Every BN still left after folding: one Mul by s and one Add of t (SPEC §2), or kept.

s and t are reshaped to [C, 1, …, 1] so they broadcast against axis 1 of the input's rank
(for rank 2, [C] broadcasts over the last axis, which is axis 1). An opset ≤ 8 ``spatial=0``
BN with per-position statistics [C, D1, …] is no per-channel map (nothing can absorb it) but
still an elementwise affine one: rewritten with s, t of that shape. The reason the BN could
not be folded is kept in the report. A BN that is not a fixed affine map (training mode,
non-constant parameters, …) is kept as it is, with that reason; with ``keep_unfoldable``
(or the ``rewrite`` pattern switched off) every left-over BN is kept.
"""

from __future__ import annotations

from onnx import helper

from bnfold.numerics import FLOAT_DTYPES, PrecisionRefused, round_checked
from bnfold.passes._affine import bn_affine_or_reason, per_position_affine, unusable_hint
from bnfold.passes._context import LINEAR_OPS
from bnfold.report import Action

_PATTERN_OF = {"Conv": "conv", "ConvTranspose": "convtranspose", "Gemm": "gemm", "MatMul": "matmul"}


def not_folded_reason(ctx, bn) -> str:
    """Why no fold took this BN, from what each pattern recorded."""
    ix = ctx.index
    reasons = dict(ctx.refusals.get(id(bn), {}))
    producer = ix.producer_of(bn.input[0])
    backward = None
    for pattern in ("conv", "convtranspose", "gemm", "matmul"):
        if pattern in reasons:
            backward = reasons.pop(pattern)
    if backward is None:
        if producer is None:
            backward = f"its input {bn.input[0]!r} is not produced by a node (graph input or constant)"
        elif producer.op_type in LINEAR_OPS and _PATTERN_OF[producer.op_type] not in ctx.enabled:
            backward = f"folding into {producer.op_type} is switched off (pattern {_PATTERN_OF[producer.op_type]!r})"
        else:
            backward = (f"its input comes from {producer.op_type} {ix.node_name(producer)!r}, "
                        "not Conv/ConvTranspose/Gemm/MatMul")
    parts = [f"no fold into the producer: {backward}"]
    if "forward" in reasons:
        parts.append(f"no fold into a following Conv: {reasons['forward']}")
    elif "forward" not in ctx.enabled:
        parts.append("forward folding is switched off")
    return "; ".join(parts)


class RewritePass:
    name = "rewrite"

    def run(self, ctx) -> bool:
        ix = ctx.index
        changed = False
        for bn in list(ix.nodes):
            if not ctx.is_bn(bn):
                continue
            affine, reason = bn_affine_or_reason(ctx, bn)
            per_position = per_position_affine(ctx, bn) if reason else None
            if reason and per_position is None:
                # Every reason bn_affine_or_reason gives is about the input itself: blocking.
                ctx.record(bn, Action.KEPT, reason=reason, blocking=True, hint=unusable_hint(ctx, bn))
                continue
            why = reason or not_folded_reason(ctx, bn)
            if ctx.keep_unfoldable or "rewrite" not in ctx.enabled:
                option = "keep_unfoldable" if ctx.keep_unfoldable else "the rewrite pattern is switched off"
                ctx.record(bn, Action.KEPT, reason=f"{why}; kept as BatchNormalization ({option})")
                continue
            if ctx.opset < 7:
                ctx.record(bn, Action.KEPT, reason=f"{why}; not rewritten: opset {ctx.opset} Mul/Add use legacy "
                                                   "broadcasting (opset < 7)")
                continue
            x = bn.input[0]
            rank = ix.rank(x)
            elem = ix.elem_type(bn.output[0]) or ix.elem_type(x)
            if rank is None:
                ctx.record(bn, Action.KEPT, reason=f"{why}; cannot rewrite as Mul+Add: the input's rank is unknown")
                continue
            dtype = helper.tensor_dtype_to_np_dtype(elem) if elem else None
            if dtype not in FLOAT_DTYPES:
                ctx.record(bn, Action.KEPT, reason=f"{why}; cannot rewrite as Mul+Add: the input's dtype is "
                                                   f"{'unknown' if dtype is None else dtype}")
                continue
            name = ix.node_name(bn)
            shape = (-1,) + (1,) * (rank - 2)
            if per_position is not None:  # spatial=0: s, t are [C, D1, …], broadcast as they are
                affine, shape = per_position, per_position[0].shape
            try:
                s = round_checked(affine[0], dtype, what=f"scale of {name!r}").reshape(shape)
                t = round_checked(affine[1], dtype, what=f"shift of {name!r}").reshape(shape)
            except PrecisionRefused as exc:
                ctx.record(bn, Action.KEPT, reason=f"{why}; cannot rewrite as Mul+Add: {exc}")
                continue
            s_name = ix.add_constant(s, f"{name}_scale", before=bn)
            t_name = ix.add_constant(t, f"{name}_shift", before=bn)
            scaled = ix.names.fresh(f"{bn.output[0]}_scaled")
            mul = helper.make_node("Mul", [x, s_name], [scaled], name=ix.names.fresh(f"{name}_mul"))
            add = helper.make_node("Add", [scaled, t_name], [bn.output[0]], name=ix.names.fresh(f"{name}_add"))
            ctx.record(bn, Action.REWRITTEN, target_kind="Mul+Add", reason=why)
            ix.replace_node(bn, [mul, add])
            changed = True
        return changed


PASS = RewritePass()
