"""Export a torch model to ONNX keeping one BatchNormalization node per BN layer.

Exporter and settings (torch 2.13): the TorchScript exporter,
``torch.onnx.export(..., dynamo=False, training=TrainingMode.EVAL, do_constant_folding=False)``.
It is deprecated in favour of the dynamo exporter but still present in 2.13; with constant
folding off it keeps every BN as a ``BatchNormalization`` node (constant folding fuses Conv+BN
in eval mode). ``exporter="dynamo"`` uses ``torch.onnx.export(..., dynamo=True, optimize=False)``
instead: its default ``optimize=True`` runs onnxscript's rewriter, which folds Conv+BN itself
(and writes IR version 10); ``optimize=False`` keeps the BN nodes.

Two repairs make the result a plain model the converter and onnxruntime 1.31 accept:

* The TorchScript exporter de-duplicates equal initializers and routes the copies through
  ``Identity`` nodes (a fresh BN's weight and running_var are both ones): such an Identity
  is replaced by an initializer of its own, so every BN parameter is an initializer.
* The IR version is capped at 10, or the lowest the opset allows above that (onnx 1.23 may
  write 14; onnxruntime 1.31 loads up to 13).

The model is exported in eval mode; every module's train/eval flag is restored afterwards.
``validate=True`` runs the exported model with onnxruntime (CPU, graph optimizations off) on
``args`` against torch's eval output, and with ``fold=True`` also checks the folded model
against the unfolded one with :func:`bnfold.check`. The file is written atomically and only
once everything passed.
"""

from __future__ import annotations

import io
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.errors import OutputError, UsageError, ValidationFailed

MAX_IR_VERSION = 10  # onnx 1.23 may write 14, onnxruntime 1.31 loads up to 13; 10 covers opset ≤ 22
EXPORTERS = ("torchscript", "dynamo")

# Element-wise |onnxruntime − torch| ≤ atol + rtol·max|torch| per output, by torch dtype.
_TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-6), torch.float16: (1e-2, 1e-3), torch.bfloat16: (4e-2, 1e-2)}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and checked.

    ``num_batchnorm_nodes`` counts BatchNormalization nodes in the written file (after folding
    when ``fold=True``); ``num_batchnorm_exported`` counts them in the unfolded export.
    ``max_abs_error`` is the largest |onnxruntime − torch| over the outputs (None when not
    validated). ``fold_report`` / ``check_report`` are bnfold's reports when folding.
    """

    path: Path
    exporter: str
    opset: int
    num_batchnorm_layers: int
    num_batchnorm_exported: int
    num_batchnorm_nodes: int
    max_abs_error: float | None = None
    fold_report: Any = None
    check_report: Any = None


def export(
    model: nn.Module,
    args: Any,
    path: str | os.PathLike,
    *,
    fold: bool = False,
    validate: bool = True,
    opset: int = 17,
    exporter: str = "torchscript",
    fold_options: dict[str, Any] | None = None,
    **export_options: Any,
) -> ExportResult:
    """Export ``model`` to ONNX with its BatchNorm layers kept as nodes (module docstring).

    Args:
        model: the torch module; exported in eval mode, its modes restored afterwards.
        args: example input: a tensor or a tuple of positional inputs.
        path: destination .onnx file; its folder must exist. Written atomically.
        fold: fold the BN nodes with :func:`bnfold.fold` and write the folded model.
        validate: check the export against torch with onnxruntime, and the folded model
            against the unfolded one with :func:`bnfold.check`.
        opset: ONNX opset to export to.
        exporter: ``"torchscript"`` (default) or ``"dynamo"``.
        fold_options: keyword arguments for :func:`bnfold.fold`.
        **export_options: passed to ``torch.onnx.export`` (``input_names``, ``dynamic_axes``...).

    Returns:
        An :class:`ExportResult`.

    Raises:
        OutputError: the destination folder does not exist.
        ValidationFailed: onnxruntime disagrees with torch, or the folded model with the
            unfolded one; nothing is written then.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"export: exporter={exporter!r}; expected one of {', '.join(EXPORTERS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist")
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)

    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        proto = _export_proto(model, args, opset, exporter, export_options)
        with torch.no_grad():
            expected = _flatten(model(*args)) if validate else None
    finally:
        for module, flag in training.items():
            module.training = flag
    _materialize_identity_initializers(proto)
    _cap_ir_version(proto)

    num_exported = _count_batchnorm(proto)
    max_abs_error = _check_against_torch(proto, args, expected, path) if validate else None

    final, fold_report, check_report = proto, None, None
    if fold:
        import bnfold  # the converter and onnxruntime validation load on first use

        folded = bnfold.fold(proto, **(fold_options or {}))
        final, fold_report = folded.model, folded.report
        if validate:
            feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(proto.graph.input, _tensors(args))}
            check_report = bnfold.check(proto, final, inputs=feeds, providers=("cpu",))
            if not check_report.passed:
                raise ValidationFailed(f"{path}: the folded model does not match the exported one; nothing written")

    _save_atomically(final, path)
    layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return ExportResult(
        path=path,
        exporter=exporter,
        opset=opset,
        num_batchnorm_layers=layers,
        num_batchnorm_exported=num_exported,
        num_batchnorm_nodes=_count_batchnorm(final),
        max_abs_error=max_abs_error,
        fold_report=fold_report,
        check_report=check_report,
    )


def _export_proto(model, args, opset, exporter, export_options):
    import onnx

    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated on every call; we chose it on purpose.
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*will be removed.*")
        if exporter == "torchscript":
            buffer = io.BytesIO()
            torch.onnx.export(
                model,
                args,
                buffer,
                dynamo=False,
                opset_version=opset,
                training=torch.onnx.TrainingMode.EVAL,
                do_constant_folding=False,  # folding would fuse Conv+BN: that is bnfold's job
                **export_options,
            )
            return onnx.load_from_string(buffer.getvalue())
        program = torch.onnx.export(model, args, dynamo=True, optimize=False, opset_version=opset, **export_options)
        return program.model_proto


def _materialize_identity_initializers(proto) -> None:
    """Replace Identity(initializer) nodes by initializers named after their outputs."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    keep = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.input else None
        if source in inits and source not in graph_inputs and node.output[0] not in inits:
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[source]), node.output[0])
            graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _cap_ir_version(proto) -> None:
    """Lower the IR version to MAX_IR_VERSION, never below what the model's opsets require."""
    import onnx

    required = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    proto.ir_version = max(required, min(proto.ir_version, MAX_IR_VERSION))


def _count_batchnorm(proto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in proto.graph.node)


def _flatten(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    flat = []
    for item in output:
        flat.extend(_flatten(item))
    return flat


def _tensors(args) -> list[torch.Tensor]:
    # The exporters turn tensor arguments into graph inputs, in order; other arguments are constants.
    return [a for a in args if isinstance(a, torch.Tensor)]


def _check_against_torch(proto, args, expected, path) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # onnxruntime folds Conv+BN at its default level: the check must see the exported graph.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), _tensors(args))}
    outputs = session.run(None, feeds)
    worst = 0.0
    for index, (got, want) in enumerate(zip(outputs, expected)):
        want_np = want.detach().cpu().to(torch.float64).numpy()
        err = float(np.max(np.abs(got.astype(np.float64) - want_np))) if want_np.size else 0.0
        rtol, atol = _TOLERANCES.get(want.dtype, (1e-4, 1e-6))
        bound = atol + rtol * (float(np.max(np.abs(want_np))) if want_np.size else 0.0)
        if not err <= bound:  # NaN fails too
            raise ValidationFailed(
                f"{path}: output {index} of the exported model differs from torch by {err:.3g} (allowed {bound:.3g})"
            )
        worst = max(worst, err)
    return worst


def _save_atomically(proto, path: Path) -> None:
    import onnx

    # A unique name next to the target (same file system: os.replace is atomic). Not mkstemp:
    # its 0600 mode would stick to the published file; open() honours the umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
