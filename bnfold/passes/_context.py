"""State shared by the passes over one graph body: the index, the options, the report."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from bnfold.graph import GraphIndex
from bnfold.report import Action, NodeReport

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class FoldContext:
    index: GraphIndex
    opset: int
    enabled: frozenset[str]
    keep_unfoldable: bool = False
    rounding: str = "nearest"  # bnfold.rounding strategy for folded float16/bfloat16 weights
    entries: list[tuple[int, NodeReport]] = field(default_factory=list)
    # why a BN was not folded, per pattern that looked at it: id(node) -> {pattern: reason}
    refusals: dict[int, dict[str, str]] = field(default_factory=dict)
    neighbours: dict[int, tuple[str | None, tuple[str, ...]]] = field(default_factory=dict)
    # per-channel (mean, var) of tensors for compensated rounding; computed by
    # passes._moments.input_stats at the first half-precision fold (None until then)
    moments: dict | None = None

    def __post_init__(self) -> None:
        # Producer and consumers as they were before any edit: what the report shows.
        ix = self.index
        for node in ix.nodes:
            if node.op_type in ("BatchNormalization", "Mul", "Add") and node.input:
                producer = ix.producer_of(node.input[0])
                if node.op_type != "BatchNormalization":
                    producer = next((ix.producer_of(i) for i in node.input
                                     if ix.producer_of(i) is not None and ix.producer_of(i).op_type in LINEAR_OPS),
                                    producer)
                consumers = tuple(ix.node_name(c) for c in ix.consumers_of(node.output[0]))
                self.neighbours[id(node)] = (None if producer is None else ix.node_name(producer), consumers)

    def is_bn(self, node: onnx.NodeProto) -> bool:
        return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")

    def refuse(self, node: onnx.NodeProto, pattern: str, reason: str) -> None:
        self.refusals.setdefault(id(node), {})[pattern] = reason

    def record(self, node: onnx.NodeProto, action: Action, *, target_kind: str | None = None,
               target: str | None = None, reason: str | None = None, blocking: bool = False,
               hint: str | None = None) -> None:
        producer, consumers = self.neighbours.get(id(node), (None, ()))
        entry = NodeReport(
            node=self.index.node_name(node), op_type=node.op_type, graph=self.index.path, action=action,
            target_kind=target_kind, target=target, reason=reason, producer=producer, consumers=consumers,
            blocking=blocking, hint=hint,
        )
        self.entries.append((self.index.order_of(node), entry))
