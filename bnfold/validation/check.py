"""``check``: run two models on the same inputs on each requested provider and compare.

The steps, each delegated: read both models' graphs (a file's skeleton only, from a memory
map: :mod:`bnfold.stream.source`), check that their signatures match, resolve the providers
(:mod:`.providers`), build the inputs (:mod:`.inputs`), run both models on every provider
(:mod:`.sessions`), compare every output (:mod:`.compare`), and collect a
:class:`~bnfold.validation.report.CheckReport`.

Memory: a model given as a path is loaded by onnxruntime from the file (external data
mapped, not copied), and on each provider the reference runs every sample and is released
before the candidate's session is built, so at most one session is alive at a time; the
outputs are kept, the weights are not.

The reference must load and run: if it does not, there is nothing to check against and the
error is raised (exit 2). A candidate that onnxruntime cannot load or run fails the check
(exit 1) with the reason in the report: a folded model that does not run is not the same
function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.errors import (
    BnfoldError, InputDataError, ModelLoadError, ProviderError, UnsupportedModelError, UsageError,
)
from bnfold.stream.source import open_model
from bnfold.validation.compare import compare_output
from bnfold.validation.inputs import (
    TensorSpec, check_inputs, load_inputs, model_inputs, model_outputs, random_inputs,
)
from bnfold.validation.providers import Provider, SkippedProvider, resolve_providers
from bnfold.validation.report import CheckReport, Comparison
from bnfold.validation.sessions import ModelSource, Runner, opt_level, ort_message
from bnfold.validation.tolerances import max_reduction_length

ModelLike = onnx.ModelProto | str | os.PathLike
Progress = Callable[[int, int], None]


def check(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    inputs=None,
    providers=("cpu",),
    rtol: float | None = None,
    atol: float | None = None,
    samples: int = 1,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    allow_missing_providers: bool = False,
    ort_opt_level: str = "disable",
    progress: Progress | None = None,
) -> CheckReport:
    """Prove (or refute) that ``candidate`` computes the same function as ``reference``.

    Args:
        reference: the original model (ModelProto or path).
        candidate: the model to check, e.g. the folded one (ModelProto or path).
        inputs: None for seeded random inputs; a ``.npz`` path or an onnx test-data folder;
            a mapping input name → array (one sample) or a list of such mappings.
        providers: short (``"cpu"``, ``"cuda"``, ``"tensorrt"``...) or full EP names, or a
            comma-separated string.
        rtol: relative tolerance for every output; None for the per-dtype default.
        atol: absolute tolerance for every output (output units); None for the default,
            which scales with each output's magnitude.
        samples: how many random samples (ignored with user inputs: the data decides).
        seed: seed of the random inputs.
        dims: sizes of symbolic dimensions, e.g. ``{"batch": 8}``.
        allow_missing_providers: report a provider this onnxruntime lacks as skipped
            instead of raising ProviderError.
        ort_opt_level: onnxruntime graph optimizations for both models: "disable"
            (default, so onnxruntime does not fold BN in the reference itself), "basic",
            "extended" or "all".
        progress: called as ``progress(done, total)`` after every model run.

    Returns:
        The report; ``report.passed`` is the verdict.
    """
    started = time.perf_counter()
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise UsageError(f"--samples: must be a positive integer, got {samples!r}")
    opt_level(ort_opt_level)  # validate before any work
    ref = _source(reference, "reference")
    cand = _source(candidate, "candidate")
    in_specs, out_specs = _matching_signature(ref, cand)
    run_on, skipped = resolve_providers(providers, allow_missing=allow_missing_providers)
    reduction = max_reduction_length(ref.graph, cand.graph)
    tolerance = dict(rtol=rtol, atol=atol, reduction=reduction)

    if inputs is None:
        try:
            feeds = random_inputs(in_specs, samples=int(samples), seed=int(seed), dims=dict(dims or {}))
        except InputDataError as exc:  # name the model the inputs were made for (one line, SPEC §4)
            raise InputDataError(f"{ref.label}: {exc}") from exc
        source = f"random (seed {seed})"
    else:
        feeds, source = _user_inputs(inputs, in_specs)
    user_data = inputs is not None

    total = 2 * len(run_on) * len(feeds)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    comparisons: list[Comparison] = []
    reference_outputs: dict[str, list[dict[str, np.ndarray]]] = {}
    ran: list[Provider] = []
    for provider in run_on:
        t0 = time.perf_counter()
        ref_runner = _reference_runner(ref, provider, ort_opt_level)
        session_providers = ref_runner.providers()
        if provider.ep not in session_providers:
            ref_runner.close()
            # onnxruntime falls back to the CPU EP, with a mere warning, when a listed EP fails to
            # initialize (missing CUDA/cuDNN libraries, no device): that run would not be on it.
            reason = (f"onnxruntime could not initialize {provider.ep} (the session fell back to "
                      f"{', '.join(session_providers)})")
            if not allow_missing_providers:
                raise ProviderError(f"provider {provider.name!r}: {reason}; fix the installation or "
                                    "pass --allow-missing-providers")
            skipped.append(SkippedProvider(name=provider.name, ep=provider.ep, reason=reason))
            for _ in range(2 * len(feeds)):
                step()
            continue
        ran.append(provider)
        ref_values = []
        try:
            for i, feed in enumerate(feeds):
                ref_values.append(_run_reference(ref_runner, ref, provider, feed, i, user_data))
                step()
        finally:
            # One session at a time: the reference's weights are released before the
            # candidate's are loaded, so a check needs about one model's memory, not two.
            ref_runner.close()
        reference_outputs[provider.name] = ref_values
        comparisons.append(_fold_comparison(cand, provider, ort_opt_level, feeds, ref_values,
                                            out_specs, tolerance, step, t0, session_providers))

    baselines, note = _baselines(ran, reference_outputs, out_specs, tolerance)
    return CheckReport(
        reference=ref.label, candidate=cand.label, comparisons=comparisons, baselines=baselines,
        skipped=skipped, baseline_note=note, samples=len(feeds),
        seed=None if user_data else int(seed), input_source=source,
        inputs={s.name: {"dtype": s.type_name, "shape": list(feeds[0][s.name].shape)} for s in in_specs},
        ort_opt_level=str(ort_opt_level).lower(), onnxruntime_version=ort.__version__,
        reduction=reduction,
        seconds=time.perf_counter() - started,
    )


def _source(model: ModelLike, role: str) -> ModelSource:
    if isinstance(model, onnx.ModelProto):
        return ModelSource(label=f"{role} (in memory)", graph=model)
    if isinstance(model, (str, os.PathLike)):
        # The check needs the graph (signature, weight shapes), never the weights: read the
        # file's skeleton from a memory map (the payloads stay on disk) and let onnxruntime
        # load the model from its path.
        path = Path(model)
        with open_model(path, check=False) as skeleton:
            return ModelSource(label=str(path), graph=skeleton.model, path=str(path))
    raise UsageError(f"{role}: expected an onnx.ModelProto or a path, got {type(model).__name__}")


def _matching_signature(ref: ModelSource, cand: ModelSource) -> tuple[list[TensorSpec], list[TensorSpec]]:
    signatures = []
    for source in (ref, cand):
        try:
            signatures.append((model_inputs(source.graph), model_outputs(source.graph)))
        except UnsupportedModelError as exc:  # name the model (one line, SPEC §4)
            raise UnsupportedModelError(f"{source.label}: {exc}") from exc
    (ref_in, ref_out), (cand_in, cand_out) = signatures
    what = f"{ref.label} and {cand.label} cannot be compared"
    for kind, a, b in (("inputs", ref_in, cand_in), ("outputs", ref_out, cand_out)):
        names_a, names_b = [s.name for s in a], [s.name for s in b]
        if sorted(names_a) != sorted(names_b):
            raise UsageError(f"{what}: their {kind} differ ({', '.join(names_a) or 'none'} vs "
                             f"{', '.join(names_b) or 'none'})")
        by_name = {s.name: s for s in b}
        for sa in a:
            sb = by_name[sa.name]
            if sa.elem_type != sb.elem_type:
                raise UsageError(f"{what}: {kind[:-1]} {sa.name!r} is {sa.type_name} in the reference "
                                 f"but {sb.type_name} in the candidate")
            if sa.shape is not None and sb.shape is not None and len(sa.shape) != len(sb.shape):
                raise UsageError(f"{what}: {kind[:-1]} {sa.name!r} has rank {len(sa.shape)} in the "
                                 f"reference but {len(sb.shape)} in the candidate")
    if not ref_out:
        raise UsageError(f"{ref.label}: the model has no outputs to compare")
    return ref_in, ref_out


def _user_inputs(inputs, specs: list[TensorSpec]) -> tuple[list[dict[str, np.ndarray]], str]:
    if isinstance(inputs, (str, os.PathLike)):
        return load_inputs(inputs, specs), str(inputs)
    if isinstance(inputs, Mapping):
        feeds = [{k: np.asarray(v) for k, v in inputs.items()}]
    elif isinstance(inputs, (list, tuple)) and all(isinstance(x, Mapping) for x in inputs) and inputs:
        feeds = [{k: np.asarray(v) for k, v in x.items()} for x in inputs]
    else:
        raise UsageError("inputs: expected a .npz path, a test-data folder, a mapping name → array "
                         f"or a list of such mappings, got {type(inputs).__name__}")
    check_inputs(feeds, specs, source="inputs")
    return feeds, "arrays (in memory)"


def _reference_runner(ref: ModelSource, provider: Provider, level: str) -> Runner:
    try:
        return Runner(ref, provider, level)
    except BnfoldError:
        raise
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise ModelLoadError(f"{ref.label}: onnxruntime cannot load it on {provider.name}: "
                             f"{ort_message(exc)}") from exc


def _run_reference(runner: Runner, ref: ModelSource, provider: Provider, feed, i: int,
                   user_data: bool) -> dict[str, np.ndarray]:
    try:
        return runner.run(feed)
    except Exception as exc:
        error = InputDataError if user_data else ModelLoadError
        raise error(f"{ref.label}: onnxruntime failed to run it on {provider.name} (sample {i}): "
                    f"{ort_message(exc)}") from exc


def _fold_comparison(cand: ModelSource, provider: Provider, level: str, feeds, ref_values,
                     out_specs, tolerance: dict, step, t0: float,
                     ref_providers: tuple[str, ...]) -> Comparison:
    base = dict(kind="fold", provider=provider.name, ep=provider.ep, options=dict(provider.options),
                reference=f"reference@{provider.name}", candidate=f"candidate@{provider.name}")
    try:
        runner = Runner(cand, provider, level)
    except Exception as exc:
        for _ in feeds:
            step()
        return Comparison(**base, error=f"{cand.label}: onnxruntime cannot load it on "
                                        f"{provider.name}: {ort_message(exc)}",
                          session_providers=ref_providers, seconds=time.perf_counter() - t0)
    cand_values = []
    try:
        for i, feed in enumerate(feeds):
            try:
                cand_values.append(runner.run(feed))
            except Exception as exc:
                return Comparison(**base, error=f"{cand.label}: onnxruntime failed to run it on "
                                                f"{provider.name} (sample {i}): {ort_message(exc)}",
                                  session_providers=runner.providers(), seconds=time.perf_counter() - t0)
            step()
        session_providers = runner.providers()
    finally:
        runner.close()
    outputs = tuple(
        compare_output(spec.name, [r[spec.name] for r in ref_values], [c[spec.name] for c in cand_values],
                       **tolerance)
        for spec in out_specs
    )
    return Comparison(**base, outputs=outputs, session_providers=session_providers,
                      seconds=time.perf_counter() - t0)


def _baselines(run_on: list[Provider], reference_outputs, out_specs, tolerance: dict):
    if len(run_on) < 2:
        only = run_on[0].name if run_on else "none"
        return [], (f"not applicable: only one provider ran ({only}); request several "
                    "(e.g. --providers cpu,cuda) to see execution-provider noise")
    first = run_on[0]
    baselines = []
    for provider in run_on[1:]:
        a, b = reference_outputs[first.name], reference_outputs[provider.name]
        outputs = tuple(
            compare_output(spec.name, [r[spec.name] for r in a], [c[spec.name] for c in b], **tolerance)
            for spec in out_specs
        )
        baselines.append(Comparison(kind="baseline", provider=provider.name, ep=provider.ep,
                                    options=dict(provider.options), reference=f"reference@{first.name}",
                                    candidate=f"reference@{provider.name}", outputs=outputs))
    return baselines, None
