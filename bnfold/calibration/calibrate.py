"""``calibrate``: re-estimate every BN's population statistics from data, with onnxruntime alone.

The steps: find the BNs (:mod:`.graph`; refusals raise), build the statistics model in which
every BN normalizes with its batch statistics and exposes its batch mean, biased batch
variance and m (precise BN, as during training), run it on onnxruntime's CPU provider with
graph optimizations off, one batch at a time (:mod:`.data`), and accumulate each BN's moments
with ``PopulationStats.update_moments`` (:mod:`.stats`). Statistics files of other shards are
merged in. Then E = Σ m·μ / Σ m and Var = Σ m·(m/(m−1))·σ² / Σ m (Ioffe & Szegedy,
Algorithm 2; SPEC §2) are written into each BN's mean/var constants, rounded once from
float64 to the constant's dtype; a constant shared with another node (or another slot of
the same BN) is copied first, a Constant-node parameter is replaced by a new initializer.

Precision: onnxruntime computes the moments in float64 from the activations as the model's
dtype holds them (two-pass), the sums are float64, so the result is the float64 statistic of
those activations rounded once to the model's dtype (0.5 ULP of float32 for a float32 model).

Optionally the calibrated model is folded with :func:`bnfold.fold` and, with ``validate``,
checked against the calibrated unfolded model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from bnfold.calibration.data import open_batches
from bnfold.calibration.graph import BatchNormSite, build_stats_model, find_batchnorms, main_index
from bnfold.calibration.report import BatchNormCalibration, CalibrationReport, CalibrationResult
from bnfold.calibration.stats import CalibrationStats, model_fingerprint
from bnfold.errors import InputDataError, UsageError
from bnfold.modelio import load_model
from bnfold.reference import PopulationStats

Progress = Callable[[int, "int | None"], None]


def calibrate(
    model: onnx.ModelProto | str | os.PathLike,
    batches=None,
    *,
    merge: Iterable[str | os.PathLike | CalibrationStats] = (),
    batch_size: int | None = None,
    max_batches: int | None = None,
    fold: bool = False,
    validate: bool | Mapping = True,
    fold_options: Mapping | None = None,
    progress: Progress | None = None,
) -> CalibrationResult:
    """Re-estimate the population statistics of every BatchNormalization of ``model``.

    Args:
        model: an ``onnx.ModelProto`` (not modified) or the path of an ``.onnx`` file.
        batches: the data: an ``.npz`` path, a folder of ``.npz`` files, a mapping input
            name → array, or any iterable of such mappings (one batch each); see
            :mod:`bnfold.calibration.data`. None when only merging statistics files.
        merge: statistics files (or :class:`CalibrationStats`) of other shards of the same
            model to add to the statistics collected here.
        batch_size: cut ``.npz`` arrays into batches of this many samples.
        max_batches: stop after this many batches.
        fold: fold the calibrated model with :func:`bnfold.fold`.
        validate: with ``fold``, check the folded model against the calibrated unfolded one
            (True, or a mapping of :func:`bnfold.check` options; default inputs: the first
            batch). The check is recorded in ``result.check``, not raised.
        fold_options: keyword arguments for :func:`bnfold.fold`.
        progress: called as ``progress(done, total)`` after every batch (total None when
            the source cannot tell).

    Returns:
        CalibrationResult: the new model, the per-BN report, the statistics and, when
        folded, the fold result.

    Raises:
        UnsupportedModelError: no BN, a BN in training mode, statistics that are not constants.
        InputDataError: data that does not match the model, a batch with m = 1 value per
            channel, no batch at all, statistics files of another model.
        UsageError: neither data nor statistics files, bad batch_size/max_batches.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, (int, np.integer))
                                    or max_batches < 1):
        raise UsageError(f"max_batches={max_batches!r}: expected a positive integer")
    merge = list(merge)
    if batches is None and not merge:
        raise UsageError("calibrate: give data (batches) or statistics files to merge")
    work, source = _own_copy(model)
    sites, skipped = find_batchnorms(work, source=source)
    excluded = {work.graph.node[s.position].input[k] for s in sites for k in (3, 4)}
    stats = CalibrationStats(model_fingerprint(work, excluded),
                             {s.name: PopulationStats(s.num_channels) for s in sites})
    seen, first = 0, None
    if batches is not None:
        seen, first = collect(work, sites, batches, stats, source=source, batch_size=batch_size,
                              max_batches=max_batches, progress=progress)
    merged = []
    for item in merge:
        if isinstance(item, CalibrationStats):
            stats.merge(item, label="statistics")
            merged.append("(in memory)")
        else:
            stats.merge(CalibrationStats.load(item), label=str(item))
            merged.append(str(item))
    empty = [name for name, s in stats.stats.items() if s.num_batches == 0]
    if empty:
        raise InputDataError(f"{source}: no batch reached BatchNormalization {empty[0]!r}: nothing to estimate from")

    calibrated, layers = apply_stats(work, sites, stats)
    layers += [BatchNormCalibration(s.name, s.graph, 0, 0, 0.0, 0.0, s.reason) for s in skipped]
    report = CalibrationReport(source=source, num_batches=seen, layers=layers, merged=merged,
                               fingerprint=stats.fingerprint)
    result = CalibrationResult(model=calibrated, calibrated=calibrated, report=report, stats=stats)
    if fold:
        from bnfold.api import fold as fold_model

        check_options: bool | dict = False
        if validate:
            check_options = {} if validate is True else dict(validate)
            if first is not None:
                check_options.setdefault("inputs", first)  # data of the model's own distribution
            check_options = check_options or True
        result.fold = fold_model(calibrated, validate=check_options, **dict(fold_options or {}))
        result.model = result.fold.model
    return result


def _own_copy(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        work = onnx.ModelProto()
        work.CopyFrom(model)
        return work, "model"
    if isinstance(model, (str, os.PathLike)):
        return load_model(Path(model)), str(model)
    raise TypeError(f"calibrate: expected an onnx.ModelProto or a path, got {type(model).__name__}")


def collect(model: onnx.ModelProto, sites: list[BatchNormSite], batches, stats: CalibrationStats, *,
            source: str, batch_size: int | None = None, max_batches: int | None = None,
            progress: Progress | None = None) -> tuple[int, dict | None]:
    """Run the statistics model on every batch and add each BN's moments to ``stats``.

    Returns the number of batches run and the first batch (for validating a fold).
    """
    from bnfold.validation.inputs import check_inputs, model_inputs

    specs = model_inputs(model)
    data = open_batches(batches, specs, batch_size=batch_size)
    stats_model, sites = build_stats_model(model, sites)
    session = _session(stats_model, source)
    fetch = [name for s in sites for name in (s.mean_output, s.var_output, s.shape_output)]
    total = data.total if max_batches is None else (max_batches if data.total is None else min(data.total, max_batches))
    seen, first = 0, None
    for batch in data:
        check_inputs([batch.feed], specs, source=batch.label)
        values = dict(zip(fetch, _run(session, fetch, batch.feed, batch.label)))
        moments = []
        for s in sites:
            n, _, spatial = (int(v) for v in values[s.shape_output])
            m = n * spatial
            if m < 2:
                raise InputDataError(
                    f"{batch.label}: BatchNormalization {s.name!r} sees m = {m} value per channel "
                    f"(batch {n} × spatial size {spatial}); a batch variance needs m >= 2, use larger batches")
            moments.append((s, m, values[s.mean_output].reshape(-1), values[s.var_output].reshape(-1)))
        for s, m, mean, var in moments:
            stats.stats[s.name].update_moments(m, mean, np.maximum(var, 0.0))
        if first is None:
            first = batch.feed
        seen += 1
        if progress is not None:
            progress(seen, total)
        if max_batches is not None and seen >= max_batches:
            break  # before pulling another batch out of a generator
    if seen == 0:
        raise InputDataError(f"{data.label}: yielded no batch")
    return seen, first


def _session(stats_model: onnx.ModelProto, source: str):
    import onnxruntime as ort

    from bnfold.errors import UnsupportedModelError
    from bnfold.validation.sessions import ort_message

    opts = ort.SessionOptions()
    # Off, as for every reference run: the statistics model must compute what it says.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(stats_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UnsupportedModelError(f"{source}: onnxruntime cannot load the statistics model: {ort_message(exc)}") from exc


def _run(session, fetch: list[str], feed: dict[str, np.ndarray], label: str) -> list[np.ndarray]:
    import ml_dtypes
    import onnxruntime as ort

    from bnfold.validation.sessions import ort_message

    bf16 = np.dtype(ml_dtypes.bfloat16)
    ort_feed = {k: (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(v).view(np.uint16),
                                                                    onnx.TensorProto.BFLOAT16)
                    if v.dtype == bf16 else v) for k, v in feed.items()}
    try:
        return session.run(fetch, ort_feed)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputDataError(f"{label}: onnxruntime cannot run the model on this batch: {ort_message(exc)}") from exc


def apply_stats(model: onnx.ModelProto, sites: list[BatchNormSite],
                stats: CalibrationStats) -> tuple[onnx.ModelProto, list[BatchNormCalibration]]:
    """A copy of ``model`` with E and Var of every site written into its constants."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = main_index(out)
    layers = []
    for site in sites:
        node = index.nodes[site.position]
        population = stats.stats[site.name]
        written = []
        for slot, value, label in ((3, population.mean, "mean"), (4, population.var, "var")):
            dtype = index.constant(node.input[slot]).dtype
            new = value.astype(dtype)
            index.write_input(node, slot, new, base=f"{site.name}_{label}_calibrated".replace("/", "_"))
            written.append(new.astype(np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):  # a stored variance of 0: inf
            var_change = float(np.max(np.abs(written[1] / site.old_var - 1)))
        layers.append(BatchNormCalibration(
            name=site.name, graph="", num_batches=population.num_batches, count=population.count,
            mean_change=float(np.max(np.abs(written[0] - site.old_mean))),
            var_change=var_change,
        ))
    index.finalize()
    _record_estimator(out, stats)
    return out, layers


METADATA_KEY = "bnfold.statistics"


def _record_estimator(model: onnx.ModelProto, stats: CalibrationStats) -> None:
    # SPEC §2: document which estimator produced a model's statistics.
    counts = sorted({s.count for s in stats.stats.values()})
    text = (f"Ioffe & Szegedy Algorithm 2 (precise BN, unbiased m/(m-1)) by bnfold calibrate over "
            f"{stats.num_batches} batches, {counts[0]}" + (f"-{counts[-1]}" if len(counts) > 1 else "")
            + " values per channel")
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key == METADATA_KEY:
            del model.metadata_props[i]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, text
