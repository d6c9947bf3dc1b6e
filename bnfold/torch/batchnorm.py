"""Drop-in torch BatchNorm layers that also accumulate the exact population statistics.

``BatchNorm1d/2d/3d`` subclass torch.nn's. In training mode ``forward`` *is* torch's forward
(outputs, gradients, moving average and ``num_batches_tracked`` are bit-identical); after it,
the layer adds the batch's m, mean and biased variance, computed from its input in float64, to
four running sums (:mod:`bnfold.torch.moments`). :meth:`apply_population_stats` writes the
Algorithm-2 estimate

    running_mean ← E[x] = Σ m_b·μ_b / Σ m_b,   running_var ← Var[x] = Σ m_b²/(m_b−1)·σ²_b / Σ m_b

over the moving average that torch keeps. The accumulation costs one extra float64 pass over
the layer's input per training step (no gradient, no extra memory kept). Until that call the layer's running statistics are
torch's exponential moving average (momentum on the unbiased batch variance), so a model
trained with these layers behaves exactly like one trained with torch.nn's.

The sums cover every training-mode forward since construction or the last
:meth:`reset_population_stats`. Algorithm 2 means the statistics of the *final* network: after
training, reset, run batches in training mode without optimizer steps, then apply (or use
:func:`bnfold.torch.recalibrate`, which does exactly that for any model).

The sums are non-persistent buffers: they follow ``.to(device)`` but are not in the
``state_dict``, so state dicts load both ways between these layers and torch.nn's. They stay
float64 under ``.half()`` / ``.to(dtype)`` -- only their device follows the module.
"""

from __future__ import annotations

import torch
from torch import nn

from bnfold.errors import InputDataError, UnsupportedModelError
from bnfold.torch.moments import PopulationMoments

_SUM_BUFFERS = ("population_count", "population_num_batches", "population_sum_mean", "population_sum_var")


class _PopulationStatsMixin:
    """Adds the Algorithm-2 sums to a torch.nn ``_BatchNorm`` subclass."""

    #: Set to False to stop accumulating (recalibrate does, to leave a layer's own sums alone).
    collect_population_stats: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device = self.weight.device if self.weight is not None else kwargs.get("device")
        zeros = PopulationMoments.zeros(self.num_features, device=device)
        self.register_buffer("population_count", zeros.count, persistent=False)
        self.register_buffer("population_num_batches", zeros.num_batches, persistent=False)
        self.register_buffer("population_sum_mean", zeros.sum_mean, persistent=False)
        self.register_buffer("population_sum_var", zeros.sum_var, persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = super().forward(input)  # raises on bad input before anything is accumulated
        if self.training and self.collect_population_stats:
            with torch.no_grad():
                self.population_moments().add_batch(input)
        return output

    def population_moments(self) -> PopulationMoments:
        """The layer's running sums; the tensors are the buffers (in-place updates show here)."""
        return PopulationMoments(
            count=self.population_count,
            num_batches=self.population_num_batches,
            sum_mean=self.population_sum_mean,
            sum_var=self.population_sum_var,
        )

    def reset_population_stats(self) -> None:
        """Forget every accumulated batch (the moving average is left alone)."""
        self.population_moments().reset_()

    def apply_population_stats(self) -> None:
        """Write the Algorithm-2 E[x] and Var[x] into ``running_mean`` / ``running_var``.

        Computed in float64, rounded once to the buffers' dtype. ``num_batches_tracked`` and
        the accumulated sums are left as they are.

        Raises:
            InputDataError: no training-mode batch has been accumulated.
            UnsupportedModelError: the layer has no running statistics
                (``track_running_stats=False``).
        """
        if self.running_mean is None or self.running_var is None:
            raise UnsupportedModelError(
                f"{type(self).__name__}({self.num_features}): track_running_stats=False, "
                "there are no running statistics to write"
            )
        moments = self.population_moments()
        if int(moments.num_batches) == 0:
            raise InputDataError(
                f"{type(self).__name__}({self.num_features}): no training-mode batch accumulated; "
                "run forward in training mode first"
            )
        with torch.no_grad():
            self.running_mean.copy_(moments.mean.to(self.running_mean.device))
            self.running_var.copy_(moments.var.to(self.running_var.device))

    def _apply(self, fn, recurse=True):
        # torch's .half()/.double()/.to(dtype) would cast the float64 sums too; keep them
        # float64 and let only their device follow the module.
        sums = {name: self._buffers.pop(name) for name in _SUM_BUFFERS}
        try:
            result = super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(sums)
            raise
        for name, tensor in sums.items():
            self._buffers[name] = tensor.to(device=fn(tensor).device)
        return result


class BatchNorm1d(_PopulationStatsMixin, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` that also accumulates Algorithm-2 population statistics."""


class BatchNorm2d(_PopulationStatsMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` that also accumulates Algorithm-2 population statistics."""


class BatchNorm3d(_PopulationStatsMixin, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` that also accumulates Algorithm-2 population statistics."""


def _population_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _PopulationStatsMixin)]


def apply_population_stats(model: nn.Module) -> list[str]:
    """Call :meth:`~BatchNorm2d.apply_population_stats` on every bnfold BN layer of ``model``.

    Layers that never saw a training batch, or have no running statistics, are left alone.

    Args:
        model: any module; only bnfold's BatchNorm layers inside it are touched.

    Returns:
        The qualified names of the layers whose running statistics were written.
    """
    applied = []
    for name, layer in _population_layers(model):
        if layer.running_mean is not None and int(layer.population_num_batches) > 0:
            layer.apply_population_stats()
            applied.append(name)
    return applied


def reset_population_stats(model: nn.Module) -> None:
    """Reset the accumulated sums of every bnfold BN layer of ``model``."""
    for _, layer in _population_layers(model):
        layer.reset_population_stats()
