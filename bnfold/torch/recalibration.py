"""Precise BN: re-estimate every BatchNorm of a model from data with Algorithm 2.

For every ``_BatchNorm`` module (torch.nn's BatchNorm1d/2d/3d, SyncBatchNorm, bnfold's), a
forward pre-hook adds each batch's m, mean and biased variance (float64) to fresh running sums
(:mod:`bnfold.torch.moments`) while the model runs the batches with

* the BN layers in training mode, so every layer normalizes with the statistics of the current
  batch and the layers after it see the activations they see in training;
* every other module in eval mode (Dropout off, so the statistics are those of inference
  activations);
* ``torch.no_grad()``: no gradients, no parameter change, no optimizer involved.

The running statistics and ``num_batches_tracked`` that those training-mode forwards update
are restored afterwards (also when a batch fails), and so is every module's train/eval flag;
bnfold layers' own accumulated sums are left untouched.

Then, if torch.distributed is initialized, the sums are all-reduced (SUM) across ranks in one
collective, so every rank writes the statistics of the union of all ranks' batches (a rank
without batches still takes part). Finally E[x] and Var[x] are written into each layer's
``running_mean`` / ``running_var`` (float64, rounded once to the buffers' dtype).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
from torch import nn

from bnfold.errors import InputDataError, UnsupportedModelError, UsageError
from bnfold.torch._progress import Progress
from bnfold.torch.batchnorm import _PopulationStatsMixin
from bnfold.torch.moments import PopulationMoments, all_reduce_moments

_BatchNorm = nn.modules.batchnorm._BatchNorm
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class LayerRecalibration:
    """What recalibrate did to one BN layer.

    ``skipped`` is None when the running statistics were written, else the reason they were not.
    ``mean_change`` = max |E_new − E_old|; ``var_change`` = max |Var_new / Var_old − 1|.
    """

    name: str
    num_batches: int
    count: int
    mean_change: float
    var_change: float
    skipped: str | None = None


@dataclass(frozen=True)
class RecalibrationReport:
    """Result of :func:`recalibrate`: batches run on this rank, world size, one entry per BN."""

    num_batches: int
    world_size: int
    layers: tuple[LayerRecalibration, ...]

    @property
    def recalibrated(self) -> tuple[LayerRecalibration, ...]:
        return tuple(layer for layer in self.layers if layer.skipped is None)

    @property
    def skipped(self) -> tuple[LayerRecalibration, ...]:
        return tuple(layer for layer in self.layers if layer.skipped is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_batches": self.num_batches,
            "world_size": self.world_size,
            "layers": [asdict(layer) for layer in self.layers],
        }


def _call(model: nn.Module, batch: Any, device: torch.device | None) -> None:
    def to(value):
        if device is not None and isinstance(value, torch.Tensor):
            return value.to(device)
        return value

    if isinstance(batch, torch.Tensor):
        model(to(batch))
    elif isinstance(batch, (tuple, list)) and batch:
        model(to(batch[0]))  # (input, target, ...) as a DataLoader yields it
    elif isinstance(batch, dict):
        model(**{k: to(v) for k, v in batch.items()})
    else:
        raise InputDataError(
            f"recalibrate: batch of type {type(batch).__name__}; expected a tensor, "
            "a non-empty tuple/list (first element = input) or a dict of keyword arguments"
        )


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _layer_device(layer: nn.Module, model: nn.Module) -> torch.device:
    for tensor in (layer.running_mean, layer.weight):
        if tensor is not None:
            return tensor.device
    return _model_device(model) or torch.device("cpu")


def _distributed_world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> RecalibrationReport:
    """Re-estimate the population statistics of every BatchNorm in ``model`` (precise BN).

    See the module docstring for exactly what runs in which mode. Tensors in the batches are
    moved to the device of the model's first parameter.

    Args:
        model: any torch module containing BatchNorm layers (torch.nn's or bnfold's).
        batches: an iterable of batches: tensors, tuples/lists whose first element is the
            input (as a DataLoader yields ``(x, y)``), or dicts passed as keyword arguments.
        max_batches: stop after this many batches (all of them when None).
        progress: show a progress bar on stderr when stderr is a terminal.

    Returns:
        A :class:`RecalibrationReport` (per layer: batches, values per channel, how far the
        statistics moved, or why a layer was skipped).

    Raises:
        UnsupportedModelError: the model has no BatchNorm layer.
        InputDataError: no batch was given, or a batch has an unusable type or shape.
        UsageError: ``max_batches`` is not positive.
    """
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"recalibrate: max_batches={max_batches}; expected a positive count or None")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not layers:
        raise UnsupportedModelError(f"recalibrate: {type(model).__name__} has no BatchNorm layer")

    training = {module: module.training for module in model.modules()}
    collecting = {m: m.collect_population_stats for _, m in layers if isinstance(m, _PopulationStatsMixin)}
    # Training-mode forwards move the running statistics and num_batches_tracked: snapshot
    # them, so a failed run leaves the model as it was and a skipped layer keeps its own.
    saved = {
        m: {name: getattr(m, name).clone() for name in _RUNNING if getattr(m, name, None) is not None} for _, m in layers
    }
    sums = {m: PopulationMoments.zeros(m.num_features, device=_layer_device(m, model)) for _, m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: sums[mod].add_batch(args[0])) for _, m in layers]

    try:
        # Whole model in eval mode, then only the BN layers back to training-mode normalization.
        model.eval()
        for _, m in layers:
            m.training = True
        for m in collecting:
            m.collect_population_stats = False
        total = max_batches
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)  # type: ignore[arg-type]
        device = _model_device(model)
        seen = 0
        with torch.no_grad(), Progress("recalibrate", total, enabled=progress) as bar:
            for batch in batches:
                _call(model, batch, device)
                seen += 1
                bar.advance()
                if max_batches is not None and seen >= max_batches:
                    break
    finally:
        for hook in hooks:
            hook.remove()
        for module, flag in training.items():
            module.training = flag
        for m, flag in collecting.items():
            m.collect_population_stats = flag
        with torch.no_grad():
            for m, buffers in saved.items():
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)

    world_size = _distributed_world_size()
    if world_size > 1:
        # Every rank holds the same layers in the same order (same model): one collective.
        # A rank without batches still takes part (raising first would hang the others).
        all_reduce_moments([sums[m] for _, m in layers])
        if all(int(sums[m].num_batches) == 0 for _, m in layers):
            raise InputDataError(f"recalibrate: no batch on any of the {world_size} ranks")
    elif seen == 0:
        raise InputDataError("recalibrate: batches yielded no batch")

    results = []
    with torch.no_grad():
        for name, m in layers:
            results.append(_write(name or type(model).__name__, m, sums[m]))
    return RecalibrationReport(num_batches=seen, world_size=world_size, layers=tuple(results))


def _write(name: str, layer: nn.Module, moments: PopulationMoments) -> LayerRecalibration:
    num_batches, count = int(moments.num_batches), int(moments.count)
    if layer.running_mean is None or layer.running_var is None:
        return LayerRecalibration(name, num_batches, count, 0.0, 0.0, "track_running_stats=False: no running statistics to write")
    if num_batches == 0:
        return LayerRecalibration(name, 0, 0, 0.0, 0.0, "no batch reached this layer")
    old_mean = layer.running_mean.to(torch.float64)
    old_var = layer.running_var.to(torch.float64)
    layer.running_mean.copy_(moments.mean.to(layer.running_mean.device))
    layer.running_var.copy_(moments.var.to(layer.running_var.device))
    mean_change = (layer.running_mean.to(torch.float64) - old_mean).abs().max().item()
    var_change = (layer.running_var.to(torch.float64) / old_var - 1).abs().max().item()
    return LayerRecalibration(name, num_batches, count, mean_change, var_change)
