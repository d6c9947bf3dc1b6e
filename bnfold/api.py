"""The Python API: a model (or a path) in, a :class:`~bnfold.report.FoldResult` out.

``fold`` never prints, never exits and never mutates the model it is given: it works on a
copy (a loaded file is its own copy). Each graph body — the main graph, every subgraph of
If/Loop/Scan (innermost first, so a parent sees its subgraphs' final references), every
model-local function — gets its own :class:`~bnfold.graph.GraphIndex` and runs the passes of
:mod:`bnfold.passes`. The IR version, opset imports, names, doc strings and metadata are
never touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx

from bnfold import rounding as rounding_
from bnfold.errors import ModelLoadError, UsageError, ValidationFailed
from bnfold.graph import GraphIndex, NameSet, all_names, subgraphs
from bnfold.modelio import load_model
from bnfold.passes import FINAL_PASSES, FOLD_PASSES, PATTERNS
from bnfold.passes._context import FoldContext
from bnfold.report import FoldReport, FoldResult

_MAX_ROUNDS = 64


def parse_patterns(value: str | Iterable[str] | None, *, option: str) -> frozenset[str] | None:
    """Pattern names from "a,b" or an iterable; UsageError naming the valid ones otherwise."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    unknown = [n for n in names if n not in PATTERNS]
    if unknown:
        raise UsageError(f"{option}: unknown pattern {', '.join(map(repr, unknown))}; valid: {', '.join(PATTERNS)}")
    return frozenset(names)


def fold(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    skip: str | Iterable[str] = (),
    only: str | Iterable[str] | None = None,
    keep_unfoldable: bool = False,
    inputs_as_constants: bool = False,
    validate: bool | Mapping = False,
    rounding: str = rounding_.DEFAULT,
) -> FoldResult:
    """Fold every foldable normalization node of ``model``; explain the rest.

    Args:
        model: an ``onnx.ModelProto`` (not modified) or the path of an ``.onnx`` file.
        skip: pattern names to switch off ("gemm,forward" or an iterable); see
            ``bnfold.passes.PATTERNS``.
        only: if given, only these patterns run (minus ``skip``).
        keep_unfoldable: keep BN nodes that cannot be folded instead of rewriting them as
            one Mul and one Add.
        inputs_as_constants: treat initializers that are also graph inputs as constants
            (onnxruntime lets a caller override them, so by default they are not).
        validate: run :func:`bnfold.check` of the folded model against the original and
            record it in ``result.check``: True for the defaults, or a mapping of ``check``
            keyword arguments (``providers``, ``samples``, ``rtol``...). A failed check is
            recorded, not raised (``result.check.passed``).
        rounding: how folded float16/bfloat16 weights are rounded: ``"nearest"`` (each
            within ½ ULP) or ``"compensated"`` (each one of its two neighbours, chosen so
            that the rounding errors cancel along every output channel; see
            :mod:`bnfold.rounding`). float32/float64 always round to nearest.

    Returns:
        FoldResult with the folded model and the report (one entry per normalization node).
    """
    enabled = enabled_patterns(skip, only)
    if isinstance(model, onnx.ModelProto):
        original = model
        work = onnx.ModelProto()
        work.CopyFrom(model)
        pristine = lambda: original  # noqa: E731
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        work = load_model(path)
        pristine = lambda: load_model(path)  # noqa: E731
    else:
        raise TypeError(f"fold: expected an onnx.ModelProto or a path, got {type(model).__name__}")
    result = _fold_owned(work, pristine, enabled, keep_unfoldable=keep_unfoldable,
                         inputs_as_constants=inputs_as_constants, rounding=parse_rounding(rounding))
    if validate:
        reference = model if isinstance(model, onnx.ModelProto) else Path(model)
        result.check = run_check(reference, result.model, validate)
    return result


def run_check(reference, candidate: onnx.ModelProto, validate: bool | Mapping):
    """``bnfold.check(reference, candidate, **options)``; ``validate`` is True or the options."""
    from bnfold.validation import check  # onnxruntime is loaded only when a check runs

    options = {} if validate is True else dict(validate)
    report = check(reference, candidate, **options)
    report.candidate = "the folded model (in memory, before writing)"
    return report


def parse_rounding(value: str) -> str:
    """A :mod:`bnfold.rounding` strategy name, or UsageError naming the valid ones."""
    try:
        return rounding_.check_strategy(str(value).strip().lower())
    except ValueError as exc:
        raise UsageError(f"rounding: {exc}") from None


def enabled_patterns(skip, only) -> frozenset[str]:
    skipped = parse_patterns(skip, option="skip") or frozenset()
    selected = parse_patterns(only, option="only")
    return (frozenset(PATTERNS) if selected is None else selected) - skipped


def _fold_owned(work: onnx.ModelProto, pristine, enabled: frozenset[str], *, keep_unfoldable: bool,
                inputs_as_constants: bool, measure: bool = True, rounding: str = rounding_.DEFAULT,
                tensors=None) -> FoldResult:
    """Fold ``work`` in place (the caller owns it); ``pristine()`` gives the unfolded model.

    ``measure=False`` leaves the byte sizes to the caller (ByteSize() costs a serialization).
    ``tensors``: the streamed fold's tensor store (``bnfold.stream.store``), else None.
    """
    report = FoldReport(nodes_before=count_nodes(work), bytes_before=work.ByteSize() if measure else 0)
    entries = []
    names = NameSet(all_names(work))
    inferred = _LazyTypes(pristine)
    opset = default_opset(work.opset_import)
    common = dict(names=names, ir_version=work.ir_version, inputs_as_constants=inputs_as_constants, inferred=inferred,
                  tensors=tensors)

    def process(body, path: str, outer: GraphIndex | None, body_opset: int) -> None:
        index = GraphIndex(body, path=path, outer=outer, **common)
        for node in index.nodes:
            for attr_name, graph in subgraphs(node):
                prefix = f"{path}/" if path else ""
                process(graph, f"{prefix}{index.node_name(node)}/{attr_name}", index, body_opset)
        index.rescan_subgraphs()
        ctx = FoldContext(index, body_opset, enabled, keep_unfoldable, rounding=rounding)
        for _ in range(_MAX_ROUNDS):
            changed = False
            for p in FOLD_PASSES:
                if p.name in enabled:
                    changed |= p.run(ctx)
            if not changed:
                break
        for p in FINAL_PASSES:
            p.run(ctx)  # rewrite, or keep with a reason: it reports every BN left
        index.finalize()
        entries.extend((path, order, e) for order, e in ctx.entries)

    process(work.graph, "", None, opset)
    for function in work.functions:
        f_opset = default_opset(function.opset_import) or opset
        process(function, f"function:{function.domain}.{function.name}", None, f_opset)

    # Report order: main graph first, then subgraphs and functions, each in node order.
    report.entries = [e for _, _, e in sorted(entries, key=lambda x: (x[0] != "", x[0], x[1]))]
    report.nodes_after = count_nodes(work)
    report.bytes_after = work.ByteSize() if measure else 0
    return FoldResult(model=work, report=report)


def default_output_path(src: str | os.PathLike) -> Path:
    """``<stem>.folded.onnx`` next to ``src``."""
    src = Path(src)
    return src.with_name(f"{src.stem}.folded{src.suffix or '.onnx'}")


def fold_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, *, in_place: bool = False,
              validate: bool | Mapping = False, force: bool = False, partial: bool = False,
              **options) -> FoldResult:
    """Fold the model in ``src`` and write it atomically to ``dst``.

    Args:
        src: the input ``.onnx`` file; never overwritten unless ``in_place``.
        dst: the output path; default ``<stem>.folded.onnx`` next to ``src`` (``src`` itself
            with ``in_place``). Tensors stay in external data if the source used it.
        in_place: allow writing over ``src``.
        validate: check the folded model against ``src`` (True, or a mapping of
            :func:`bnfold.check` options) before anything is written.
        force: write the folded model even if its check failed (``result.check.passed``
            tells); without it a failed check raises ValidationFailed and writes nothing.
        partial: write the model even when some BN cannot be folded because the input is
            unusable for inference folding (``result.report.blocking()``: training mode,
            parameters that are not constants, NaN/inf, negative variance, mismatched
            shapes); those BNs are kept. Without it such a model raises
            UnsupportedModelError and nothing is written.
        **options: as for :func:`fold`, plus ``progress(done, total)`` (bytes; called while
            the folded model is written).

    The file is folded by :mod:`bnfold.stream`: memory-mapped, only the tensors a fold
    touches are read, and the output is written by streaming into a staging folder (same
    report, same bytes as :func:`fold`); ``result.model`` keeps its big tensors in the
    written file(s), as external-data references (``onnx.load(result.output)`` reads them).
    With ``validate`` the staged files are checked against ``src`` (:func:`check_staged`)
    before they are renamed into place.

    Returns:
        FoldResult; ``result.output`` is the written path.

    Raises:
        ModelLoadError: the file is unreadable or fails ``onnx.checker`` (no full check).
        UnsupportedModelError: opset < 7, an operator domain onnxruntime does not implement,
            or (without ``partial``) a BN the input makes unfoldable.
        ValidationFailed: the check failed and ``force`` is false; ``exc.result`` holds the
            FoldResult with its check report.
    """
    src = Path(src)
    if dst is None:
        dst = src if in_place else default_output_path(src)
    enabled = enabled_patterns(options.pop("skip", ()), options.pop("only", None))
    progress = options.pop("progress", None)
    unknown = set(options) - {"keep_unfoldable", "inputs_as_constants", "rounding"}
    if unknown:
        raise TypeError(f"fold_file() got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    rounding = parse_rounding(options.get("rounding", rounding_.DEFAULT))  # a bad option before any I/O
    # Nothing needs the whole model in memory: fold straight from a memory map of the file and
    # write by streaming into the staging folder (bnfold.stream); same report, same bytes. The
    # check, if any, runs on the staged files before they are renamed into place.
    from bnfold.stream.foldfile import fold_file_streamed

    def check_before_commit(staged: Path, result: FoldResult) -> None:
        result.check = check_staged(src, staged, validate)
        if not result.check.passed and not force:
            raise ValidationFailed(
                f"{src}: the folded model is not equivalent to the original "
                f"({result.check.verdict().removeprefix('FAIL: ')}); nothing written",
                result=result,
            )

    return fold_file_streamed(src, Path(dst), enabled, in_place=in_place, partial=partial, progress=progress,
                              before_commit=check_before_commit if validate else None,
                              keep_unfoldable=bool(options.get("keep_unfoldable", False)),
                              inputs_as_constants=bool(options.get("inputs_as_constants", False)),
                              rounding=rounding)


def check_staged(src: Path, staged: Path, validate: bool | Mapping):
    """``bnfold.check(src, staged, **options)`` of a folded model written to the staging folder.

    Both models are read by onnxruntime from their files (it maps external data itself), one
    session at a time, so the check needs about one model's worth of memory, not three: the
    exact bytes that will be renamed into place are the ones checked.
    """
    from bnfold.validation import check  # onnxruntime is loaded only when a check runs

    options = {} if validate is True else dict(validate)
    report = check(src, staged, **options)
    report.candidate = "the folded model (staged, before writing)"
    return report


def blocking_message(src, blocking) -> str:
    """One line: the first BN the input makes unfoldable, why, and what would help."""
    first = blocking[0]
    where = f"BatchNormalization {first.node!r}" + (f" (in {first.graph})" if first.graph else "")
    more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
    hint = ("--inputs-as-constants treats such parameters as constants; "
            if any(e.hint == "inputs_as_constants" for e in blocking) else "")
    return (f"{src}: {where} cannot be folded{more}: {first.reason}; nothing written "
            f"({hint}--partial writes the model with it kept)")


def default_opset(opset_import) -> int:
    for entry in opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def count_nodes(model: onnx.ModelProto) -> int:
    def count(nodes) -> int:
        return sum(1 + sum(count(g.node) for _, g in subgraphs(n)) for n in nodes)

    return count(model.graph.node) + sum(count(f.node) for f in model.functions)


class _LazyTypes:
    """Types from onnx shape inference of the ORIGINAL model, computed only if a pass needs
    a rank or dtype nothing else tells (most graphs never pay for it)."""

    def __init__(self, pristine):
        self._pristine = pristine
        self._types: dict[str, onnx.TypeProto] | None = None

    def __call__(self) -> dict[str, onnx.TypeProto]:
        if self._types is None:
            self._types = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self._pristine())
            except (onnx.shape_inference.InferenceError, ModelLoadError, ValueError, RuntimeError):
                return self._types
            self._collect(inferred.graph)
        return self._types

    def _collect(self, graph: onnx.GraphProto) -> None:
        for v in (*graph.input, *graph.output, *graph.value_info):
            self._types.setdefault(v.name, v.type)
        for node in graph.node:
            for _, g in subgraphs(node):
                self._collect(g)
