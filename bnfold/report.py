"""What a fold did to every normalization node: data for the CLI table, ``--json`` and tests.

One :class:`NodeReport` per normalization node found (BatchNormalization, and the per-channel
Mul/Add nodes of a chain that was folded), whether folded into a neighbour, rewritten as one
Mul + one Add, or kept, with the reason for anything not folded. Skips are data, never prints.
"""

from __future__ import annotations

import enum
from pathlib import Path
from dataclasses import dataclass, field

import onnx


class Action(str, enum.Enum):
    FOLDED = "folded"  # merged into a neighbouring linear node's weights/bias
    REWRITTEN = "rewritten"  # replaced by one Mul + one Add with s, t (no foldable neighbour)
    KEPT = "kept"  # left as it was; `reason` says why


@dataclass(frozen=True)
class NodeReport:
    node: str
    op_type: str
    graph: str
    action: Action
    target_kind: str | None
    target: str | None
    reason: str | None
    producer: str | None = None
    consumers: tuple[str, ...] = ()
    # KEPT because the INPUT is unusable for inference folding (training mode, parameters
    # that are not constants, NaN/inf, negative variance, mismatched shapes), as opposed to
    # kept on request or for want of a neighbour. ``fold_file``/``bnfold fold`` refuse such a
    # model unless asked for a partial fold. ``hint`` names the option that would help.
    blocking: bool = False
    hint: str | None = None

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "graph": self.graph,
            "action": self.action.value,
            "target_kind": self.target_kind,
            "target": self.target,
            "reason": self.reason,
            "producer": self.producer,
            "consumers": list(self.consumers),
            "blocking": self.blocking,
            "hint": self.hint,
        }


@dataclass
class FoldReport:
    entries: list[NodeReport] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def folded(self) -> list[NodeReport]:
        return [e for e in self.entries if e.action is Action.FOLDED]

    def rewritten(self) -> list[NodeReport]:
        return [e for e in self.entries if e.action is Action.REWRITTEN]

    def kept(self) -> list[NodeReport]:
        return [e for e in self.entries if e.action is Action.KEPT]

    def blocking(self) -> list[NodeReport]:
        """Entries kept because the input model is unusable for inference folding."""
        return [e for e in self.entries if e.blocking]

    def counts(self) -> dict[str, int]:
        """``found`` = folded + rewritten + kept (every entry, chain Mul/Add included);
        ``found:BatchNormalization`` the BN nodes alone; ``folded:<kind>`` per target kind."""
        counts = {
            "found": len(self.entries),
            "found:BatchNormalization": sum(1 for e in self.entries if e.op_type == "BatchNormalization"),
            "folded": len(self.folded()),
            "rewritten": len(self.rewritten()),
            "kept": len(self.kept()),
        }
        for e in self.folded():
            key = f"folded:{e.target_kind}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "counts": self.counts(),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "entries": [e.to_dict() for e in self.entries],
        }


@dataclass
class FoldResult:
    model: onnx.ModelProto
    report: FoldReport
    check: object | None = None  # filled by validation (bnfold.validation.CheckReport)
    output: Path | None = None  # where fold_file wrote the model
