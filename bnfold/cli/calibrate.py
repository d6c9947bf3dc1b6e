"""``bnfold calibrate``: re-estimate BN statistics from data (precise BN), optionally fold.

    bnfold calibrate IN.onnx --data DATA -o OUT.onnx [--fold] [--batch-size N] [--max-batches N]
                     [--save-stats FILE] [--json]
    bnfold calibrate IN.onnx --merge A.stats B.stats ... -o OUT.onnx [--data DATA]

Every flag maps to an argument of :func:`bnfold.calibration.calibrate`. Exit status: 0
written, 1 the folded model failed its check (nothing written), 2 bad input or usage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from bnfold.cli import debug_option
from bnfold.cli.check import progress_bar
from bnfold.cli.fold import render_summary
from bnfold.errors import OutputError, UsageError, ValidationFailed
from bnfold.modelio import load_model, save_model, uses_external_data


def default_output_path(src: str | os.PathLike) -> Path:
    src = Path(src)
    return src.with_name(f"{src.stem}.calibrated{src.suffix or '.onnx'}")


def _check_destination(path: Path, src: Path | None, in_place: bool, what: str) -> None:
    # Refuse before the (possibly long) run what save_model would refuse after it.
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write {what}: folder {folder} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: cannot write {what}: is a directory")
    if src is not None and not in_place and path.exists() and os.path.samefile(src, path):
        raise OutputError(f"{path}: is the input model; refusing to overwrite it (use --in-place)")


@click.command("calibrate")
@click.argument("model", metavar="IN.onnx")
@click.argument("stats_files", nargs=-1, metavar="[STATS...]")
@click.option("--data", default=None, metavar="FILE|DIR",
              help="Calibration data: an .npz (input name → array, batch axis first; a further leading "
                   "axis holds ready-made batches) or a folder of .npz files.")
@click.option("-o", "--output", default=None, metavar="OUT.onnx",
              help="Output path (default: IN.calibrated.onnx next to the input).")
@click.option("--in-place", is_flag=True, help="Overwrite the input model.")
@click.option("--merge", "merge", is_flag=True,
              help="The STATS arguments after the model are statistics files (--save-stats) of shards "
                   "of the same model; merge them (with --data's batches, if given).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Cut the .npz arrays into batches of this many samples (default: one batch per array).")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="Stop after this many batches.")
@click.option("--save-stats", type=click.Path(), default=None, metavar="FILE",
              help="Save the accumulated sufficient statistics (.npz) for merging later.")
@click.option("--fold", "fold", is_flag=True,
              help="Fold the calibrated model (as bnfold fold) and write the folded model.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="With --fold: check the folded model against the calibrated one (inputs: the first batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@debug_option
def calibrate_command(model, stats_files, data, output, in_place, merge, batch_size, max_batches, save_stats,
                      fold, validate, as_json):
    """Re-estimate the population statistics of every BatchNormalization of IN.onnx from data.

    Each BN normalizes with its batch statistics while they are collected, as in training
    (precise BN); E and Var follow Ioffe & Szegedy's Algorithm 2. Exit status: 0 written,
    1 the folded model is not equivalent (nothing written), 2 bad input or usage.
    """
    if stats_files and not merge:
        raise UsageError(f"unexpected arguments {' '.join(stats_files)}: statistics files follow --merge")
    if merge and not stats_files:
        raise UsageError("--merge: give the statistics files to merge, e.g. --merge a.stats b.stats")
    if data is None and not merge:
        raise UsageError("give --data DATA (or --merge STATS...)")
    if output and in_place:
        raise UsageError("--output and --in-place: give one or the other")
    src = Path(model)
    header = load_model(src, load_external_data=False)
    external = uses_external_data(header)
    dst = src if in_place else Path(output) if output else default_output_path(src)
    _check_destination(dst, src if src.exists() else None, in_place, "the model")
    if save_stats:
        _check_destination(Path(save_stats), None, False, "the statistics")

    from bnfold.calibration import calibrate  # loads onnxruntime: only when this command runs

    with progress_bar("calibrating") as bar:
        progress = None if bar is None else (lambda done, total: bar(done, total) if total else None)
        result = calibrate(src, data, merge=stats_files, batch_size=batch_size, max_batches=max_batches,
                           fold=fold, validate=validate, progress=progress)
    if save_stats:
        result.stats.save(save_stats)
    check = result.check
    if check is not None and not check.passed:
        _render(result, model, as_json, None)
        raise ValidationFailed(f"{model}: the folded model is not equivalent to the calibrated one "
                               f"({check.verdict().removeprefix('FAIL: ')}); nothing written")
    written = save_model(result.model, dst, external_data=True if external else None, src=src, in_place=in_place)
    _render(result, model, as_json, written, save_stats)


def _render(result, source: str, as_json: bool, written, save_stats=None) -> None:
    if as_json:
        document = {**result.report.to_dict(), "output": str(written) if written else None,
                    "stats": str(save_stats) if save_stats else None}
        if result.fold is not None:
            document["fold"] = result.fold.report.to_dict()
            if result.check is not None:
                document["check"] = result.check.to_dict()
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(result.report.format())
    if result.fold is not None:
        click.echo(render_summary(result.fold.report, source, None))
        if result.check is not None:
            click.echo(result.check.format())
    if save_stats:
        click.echo(f"saved statistics to {save_stats}")
    click.echo(f"wrote {written}" if written else "nothing written")


COMMANDS = [calibrate_command]
