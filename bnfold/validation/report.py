"""The result of a check, as data: the CLI table, the JSON file, the JUnit XML and
``assert_equivalent``'s message are all renderings of one :class:`CheckReport`.

Two kinds of comparison:

* ``fold`` — per provider P: the reference model on P against the candidate on P. These
  decide ``CheckReport.passed``.
* ``baseline`` — per provider P after the first: the *reference* model on the first provider
  against the reference model on P. This is execution-provider noise (different kernels,
  different summation orders), shown so a user can tell it from fold error; it never fails
  the check. With a single provider it is not applicable, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bnfold.validation.compare import OutputComparison
from bnfold.validation.providers import SkippedProvider


@dataclass(frozen=True)
class Comparison:
    """One model pair on one provider: every output's figures, or why it could not run."""

    kind: str                         # "fold" or "baseline"
    provider: str                     # short name: "cpu", "cuda", ...
    ep: str                           # full onnxruntime EP name
    options: dict[str, str]           # provider options bnfold set
    reference: str                    # e.g. "reference@cpu"
    candidate: str                    # e.g. "candidate@cpu" or "reference@cuda"
    outputs: tuple[OutputComparison, ...] = ()
    error: str | None = None          # the candidate could not be loaded or run
    session_providers: tuple[str, ...] = ()   # what onnxruntime actually registered
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.outputs) and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "provider": self.provider, "execution_provider": self.ep,
            "provider_options": dict(self.options), "reference": self.reference,
            "candidate": self.candidate, "passed": self.passed, "error": self.error,
            "session_providers": list(self.session_providers), "seconds": self.seconds,
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass
class CheckReport:
    """Everything a check measured. ``passed`` is the verdict a CI job gates on."""

    reference: str
    candidate: str
    comparisons: list[Comparison]
    baselines: list[Comparison] = field(default_factory=list)
    skipped: list[SkippedProvider] = field(default_factory=list)
    baseline_note: str | None = None
    samples: int = 1
    seed: int | None = 0
    input_source: str = "random"
    inputs: dict[str, dict] = field(default_factory=dict)
    ort_opt_level: str = "disable"
    onnxruntime_version: str = ""
    reduction: int = 0          # K of the default tolerances (the longest dot product)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        # A check that compared nothing (every provider skipped) proves nothing: not passed.
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def failures(self) -> list[tuple[Comparison, OutputComparison | None]]:
        """The failed fold comparisons: (comparison, output) pairs; output None = run error."""
        out = []
        for c in self.comparisons:
            if c.error is not None:
                out.append((c, None))
            out.extend((c, o) for o in c.outputs if not o.passed)
        return out

    def verdict(self) -> str:
        """One line: PASS/FAIL, where and how big."""
        from bnfold.validation.render import verdict_line
        return verdict_line(self)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "verdict": self.verdict(),
            "reference": self.reference,
            "candidate": self.candidate,
            "samples": self.samples,
            "seed": self.seed,
            "input_source": self.input_source,
            "inputs": self.inputs,
            "ort_opt_level": self.ort_opt_level,
            "onnxruntime_version": self.onnxruntime_version,
            "reduction_length": self.reduction,
            "seconds": self.seconds,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "baselines": [c.to_dict() for c in self.baselines],
            "baseline_note": self.baseline_note,
            "skipped_providers": [
                {"provider": s.name, "execution_provider": s.ep, "reason": s.reason} for s in self.skipped
            ],
        }

    def format(self) -> str:
        """The human table and the verdict (what ``bnfold check`` prints)."""
        from bnfold.validation.render import format_report
        return format_report(self)

    def __str__(self) -> str:
        return self.format()
