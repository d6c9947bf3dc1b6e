"""``bnfold fold`` and ``bnfold inspect``: parse, call :mod:`bnfold.api`, render the report.

``inspect`` is a dry run of the very same passes (the folded model is thrown away), so what
it says can be folded is exactly what ``fold`` folds.
"""

from __future__ import annotations

import json

import click

from bnfold.api import fold, fold_file
from bnfold.cli import debug_option
from bnfold.cli.check import check_kwargs, progress_phases, validation_options
from bnfold.errors import UsageError, ValidationFailed
from bnfold.report import FoldReport, NodeReport
from bnfold.rounding import DEFAULT, STRATEGIES


def _pattern_options(f):
    f = click.option("--inputs-as-constants", is_flag=True,
                     help="Treat initializers that are also graph inputs as constants.")(f)
    f = click.option("--keep-unfoldable", is_flag=True,
                     help="Keep BN nodes that cannot be folded instead of rewriting them as Mul+Add.")(f)
    f = click.option("--only", default=None, metavar="A,B",
                     help="Run only these patterns: conv,convtranspose,gemm,matmul,chain,forward,rewrite.")(f)
    f = click.option("--skip", default="", metavar="A,B", help="Switch these patterns off.")(f)
    return f


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _where(e: NodeReport) -> str:
    return f"{e.node} ({e.op_type}{', in ' + e.graph if e.graph else ''})"


def render_summary(report: FoldReport, source: str, output: str | None) -> str:
    counts = report.counts()
    kinds = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in counts.items() if k.startswith("folded:"))
    lines = [
        f"{source}: {counts['found:BatchNormalization']} BatchNormalization nodes found"
        + (f" (+{extra} per-channel Mul/Add)" if (extra := counts["found"] - counts["found:BatchNormalization"]) else ""),
        f"  folded     {counts['folded']}" + (f"  ({kinds})" if kinds else ""),
        f"  rewritten  {counts['rewritten']}  (as Mul+Add)",
        f"  kept       {counts['kept']}",
        f"  nodes      {report.nodes_before} -> {report.nodes_after}",
        f"  size       {_size(report.bytes_before)} -> {_size(report.bytes_after)}",
    ]
    for e in report.rewritten():
        lines.append(f"rewritten {_where(e)}: {e.reason}")
    for e in report.kept():
        lines.append(f"kept {_where(e)}: {e.reason}")
    if output:
        lines.append(f"wrote {output}")
    return "\n".join(lines)


def render_inspect(report: FoldReport, source: str) -> str:
    lines = [f"{source}: {len(report.entries)} normalization nodes"]
    for e in report.entries:
        if e.action.value == "folded":
            verdict = f"can be folded into {e.target_kind} {e.target!r}"
        elif e.action.value == "rewritten":
            verdict = f"cannot be folded, would be rewritten as Mul+Add: {e.reason}"
        else:
            verdict = f"would be kept: {e.reason}"
        producer = e.producer or "(graph input/constant)"
        consumers = ", ".join(e.consumers) or "(none)"
        lines.append(f"  {_where(e)}: producer {producer}; consumers {consumers}; {verdict}")
    return "\n".join(lines)


@click.command("fold")
@click.argument("model", metavar="IN.onnx")
@click.option("-o", "--output", default=None, metavar="OUT.onnx",
              help="Output path (default: IN.folded.onnx next to the input).")
@click.option("--in-place", is_flag=True, help="Overwrite the input model.")
@_pattern_options
@click.option("--json", "as_json", is_flag=True, help="Print the report (and the check) as JSON.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check the folded model against the original with onnxruntime before writing it.")
@click.option("--force", is_flag=True,
              help="Write the folded model even if its check fails (the exit status is still 1).")
@click.option("--partial", is_flag=True,
              help="Write the model even if some BN cannot be folded because the input is unusable "
                   "for inference folding (training mode, non-constant or invalid parameters); "
                   "those BNs are kept.")
@click.option("--rounding", type=click.Choice(STRATEGIES), default=DEFAULT, show_default=True,
              help="How folded float16/bfloat16 weights are rounded: nearest (each within 1/2 ULP) or "
                   "compensated (each one of its two neighbours, chosen so that rounding errors cancel "
                   "along every output channel). float32/float64 always round to nearest.")
@validation_options
@debug_option
def fold_command(model, output, in_place, skip, only, keep_unfoldable, inputs_as_constants, as_json,
                 validate, force, partial, rounding, **params):
    """Fold every foldable BatchNormalization of IN.onnx, explain the rest, check the result.

    Exit status: 0 folded (and equivalent), 1 the folded model is not equivalent (nothing
    written unless --force), 2 bad input or usage (incl. a BN the input makes unfoldable,
    unless --partial).
    """
    if output and in_place:
        raise UsageError("--output and --in-place: give one or the other")
    check_options = check_kwargs(params)
    try:
        # a bar on a terminal only, for work that lasts (a big fold's writing, or the check)
        with progress_phases() as phase:
            result = fold_file(model, output, in_place=in_place, skip=skip, only=only,
                               keep_unfoldable=keep_unfoldable, inputs_as_constants=inputs_as_constants,
                               validate={**check_options, "progress": phase("validating")} if validate else False,
                               force=force, partial=partial, rounding=rounding, progress=phase("folding"))
    except ValidationFailed as exc:
        if exc.result is not None:
            _render(exc.result, model, as_json)
        raise
    _render(result, model, as_json)
    if result.check is not None and not result.check.passed:
        raise ValidationFailed(f"{model}: the folded model is not equivalent to the original; "
                               f"written anyway (--force) to {result.output}")


def _render(result, source: str, as_json: bool) -> None:
    output = str(result.output) if result.output else None
    if as_json:
        document = {**result.report.to_dict(), "output": output}
        if result.check is not None:
            document["check"] = result.check.to_dict()
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(render_summary(result.report, source, None))
    if result.check is not None:
        click.echo(result.check.format())
    click.echo(f"wrote {output}" if output else "nothing written")


@click.command("inspect")
@click.argument("model", metavar="IN.onnx")
@_pattern_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@debug_option
def inspect_command(model, skip, only, keep_unfoldable, inputs_as_constants, as_json):
    """List every normalization node, its neighbours and whether (and why) it can be folded.

    Writes nothing."""
    result = fold(model, skip=skip, only=only, keep_unfoldable=keep_unfoldable,
                  inputs_as_constants=inputs_as_constants)
    if as_json:
        click.echo(json.dumps(result.report.to_dict(), indent=2))
    else:
        click.echo(render_inspect(result.report, model))


COMMANDS = [fold_command, inspect_command]
