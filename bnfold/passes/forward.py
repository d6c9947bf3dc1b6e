"""BN → Conv: fold a BN into the Conv that FOLLOWS it.

conv(s·x + t) = conv'(x) with W'[o, j] = W[o, j]·s[c] and b'[o] = b[o] + Σ_{j,k} W[o, j, k]·t[c],
c = (o // (C_out/g))·(C_in/g) + j (the global input channel of local channel j in o's group).
Exact only when the Conv does not pad: a zero-padded border would see t where it should see
0. So: no pads (all zero) and auto_pad NOTSET or VALID; the BN output feeds that Conv's
input X and nothing else and is not a graph output. Never into a ConvTranspose: its border
outputs sum different numbers of inputs, so the shift t·ΣW is not uniform.
"""

from __future__ import annotations

from bnfold.numerics import conv_rows, fold_forward_conv, forward_channel_map, round_checked
from bnfold.numerics import PrecisionRefused
from bnfold.passes._affine import attr, bn_affine_or_reason
from bnfold.passes._moments import input_stats
from bnfold.passes._weights import constant_input, folded_name, required_weight
from bnfold.report import Action

KIND = "Conv (following)"


def _conv_reason(ctx, bn, conv) -> str | None:
    ix = ctx.index
    name = f"Conv {ix.node_name(conv)!r}"
    if conv.input[0] != bn.output[0] or list(conv.input).count(bn.output[0]) != 1:
        return f"its output is not only the data input X of the following {name}"
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return f"the following {name} pads (auto_pad={auto_pad}): zero padding would see t, not 0"
    pads = attr(conv, "pads", None)
    if pads and any(int(p) != 0 for p in pads):
        return f"the following {name} pads (pads={list(pads)}): zero padding would see t, not 0"
    w, reason = required_weight(ctx, conv, 1, "weight W")
    if reason:
        return reason
    b, reason = constant_input(ctx, conv, 2, "bias B")
    return reason


class ForwardPass:
    name = "forward"

    def run(self, ctx) -> bool:
        ix = ctx.index
        changed = False
        for bn in list(ix.nodes):
            if not ctx.is_bn(bn) or not ix.alive(bn):
                continue
            out = bn.output[0]
            consumers = ix.consumers_of(out)
            if ix.is_output(out):
                ctx.refuse(bn, "forward", "its output is a graph output")
                continue
            if len(consumers) != 1:
                ctx.refuse(bn, "forward", f"its output feeds {len(consumers)} nodes")
                continue
            conv = consumers[0]
            if conv.op_type == "ConvTranspose":
                ctx.refuse(bn, "forward", "the following node is a ConvTranspose (never folded forward: its border "
                                          "outputs sum different numbers of inputs)")
                continue
            if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
                ctx.refuse(bn, "forward", f"its output feeds {conv.op_type} {ix.node_name(conv)!r}, not a Conv")
                continue
            affine, reason = bn_affine_or_reason(ctx, bn)
            reason = reason or _conv_reason(ctx, bn, conv)
            if reason:
                ctx.refuse(bn, "forward", reason)
                continue
            groups = int(attr(conv, "group", 1))
            w = ix.constant(conv.input[1])
            if w.shape[1] * groups != affine[0].shape[0]:
                ctx.refuse(bn, "forward", f"has {affine[0].shape[0]} channels but Conv {ix.node_name(conv)!r} "
                                          f"reads {w.shape[1] * groups}")
                continue
            b, _ = constant_input(ctx, conv, 2, "bias B")
            w64, b64 = fold_forward_conv(w, b, *affine, groups=groups)
            # after the fold the Conv reads the BN's input, whose moments are the BN's statistics
            channel = forward_channel_map(w.shape, groups).reshape(w.shape[:2] + (1,) * (w.ndim - 2))
            stats = input_stats(ctx, bn.input[0], channel, b64, w.dtype)
            name = ix.node_name(conv)
            try:
                w_new = round_checked(w64, w.dtype, what=f"weights of Conv {name!r}", rows=conv_rows,
                                      rounding=ctx.rounding, stats=stats)
                b_new = round_checked(b64, w.dtype, what=f"bias of Conv {name!r}")
            except PrecisionRefused as exc:
                ctx.refuse(bn, "forward", str(exc))
                continue
            ix.write_input(conv, 1, w_new, folded_name(ctx, conv, 1, "W"))
            ix.write_input(conv, 2, b_new, folded_name(ctx, conv, 2, "B"))
            ix.set_input(conv, 0, bn.input[0])
            ix.remove_nodes([bn])
            ctx.record(bn, Action.FOLDED, target_kind=KIND, target=name)
            changed = True
        return changed


PASS = ForwardPass()
