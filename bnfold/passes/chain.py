"""Linear node → Mul(per-channel constant) → Add(per-channel constant) …, without a BN first.

The Caffe2 export style (onnx's own light_* models) writes an affine layer as Mul + Add after
a Conv; a per-channel Mul or Add alone after a linear node folds too. Per-channel means "by
broadcasting against the feature axis", see :mod:`bnfold.passes._affine`. Chains that START
with a BN are folded by the BN's pattern (conv, gemm, …), which absorbs the Mul/Add after it.
"""

from __future__ import annotations

from bnfold.passes import conv, conv_transpose, gemm, matmul
from bnfold.passes._affine import fold_chain, gate

_LINEARS = {p.LINEAR.op_type: p.LINEAR for p in (conv, conv_transpose, gemm, matmul)}


class ChainPass:
    name = "chain"

    def run(self, ctx) -> bool:
        ix = ctx.index
        changed = False
        for node in list(ix.nodes):
            if node.op_type not in ("Mul", "Add") or node.domain not in ("", "ai.onnx") or not ix.alive(node):
                continue
            for name in node.input:
                producer = ix.producer_of(name)
                if producer is None or producer.op_type not in _LINEARS or producer.domain not in ("", "ai.onnx"):
                    continue
                linear = _LINEARS[producer.op_type]
                if fold_chain(ctx, linear, producer, node, gate(ctx, linear)):
                    changed = True
                break
        return changed


PASS = ChainPass()
