"""Sufficient statistics of Algorithm 2 (Ioffe & Szegedy 2015), kept in torch in float64.

Over training mini-batches b of m_b values per channel (m_b = batch size × spatial positions),
with batch mean μ_b and biased batch variance σ²_b = (1/m_b)·Σ(x − μ_b)², SPEC §2 defines

    E[x]   = Σ_b m_b·μ_b / Σ_b m_b
    Var[x] = Σ_b m_b·(m_b/(m_b − 1))·σ²_b / Σ_b m_b

(each batch weighted by its m_b and unbiased with its own m_b/(m_b − 1); with equal batch sizes
this is the paper's E = mean_B(μ_B), Var = m/(m − 1)·mean_B(σ²_B)). Both are ratios of sums, so
four running sums carry everything:

    count       = Σ_b m_b
    num_batches = Σ_b 1
    sum_mean    = Σ_b m_b·μ_b                    (per channel)
    sum_var     = Σ_b m_b²/(m_b − 1)·σ²_b        (per channel)

Sums add: the statistics of the union of two sets of batches are the element-wise sum of
their sums. That is what makes merging across processes one ``all_reduce(SUM)`` and what
:meth:`PopulationMoments.merge_` does. The batch moments themselves are computed from the
layer's input cast to float64, so they do not depend on the precision of the forward pass.

This is the same estimator as :class:`bnfold.reference.PopulationStats` (the NumPy oracle),
written in torch so that it runs on the layer's device and under torch.distributed without a
NumPy round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from bnfold.errors import InputDataError


def batch_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(m, per-channel mean, per-channel biased variance) of a batch, channel axis 1, float64."""
    if x.dim() < 2:
        raise InputDataError(
            f"batch of shape {tuple(x.shape)}: BatchNorm needs (N, C, ...) with the channels on axis 1"
        )
    x64 = x.detach().to(torch.float64)
    dims = [0, *range(2, x.dim())]
    m = x.numel() // x.shape[1]
    var, mean = torch.var_mean(x64, dim=dims, correction=0)
    return m, mean, var


@dataclass
class PopulationMoments:
    """The four running sums of Algorithm 2 (module docstring), as float64 tensors.

    The tensors may be a layer's buffers: updates are in place, so they show in the layer.
    """

    count: torch.Tensor  # 0-d float64: Σ m_b
    num_batches: torch.Tensor  # 0-d int64
    sum_mean: torch.Tensor  # [C] float64: Σ m_b·μ_b
    sum_var: torch.Tensor  # [C] float64: Σ m_b²/(m_b − 1)·σ²_b

    @classmethod
    def zeros(cls, num_features: int, device: torch.device | str | None = None) -> "PopulationMoments":
        f64 = {"dtype": torch.float64, "device": device}
        return cls(
            count=torch.zeros((), **f64),
            num_batches=torch.zeros((), dtype=torch.int64, device=device),
            sum_mean=torch.zeros(num_features, **f64),
            sum_var=torch.zeros(num_features, **f64),
        )

    @property
    def num_features(self) -> int:
        return self.sum_mean.numel()

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate one batch (N, C, ...) in place."""
        m, mean, var = batch_moments(x)
        self.add_moments(m, mean, var)

    def add_moments(self, m: int, mean: torch.Tensor, var_biased: torch.Tensor) -> None:
        """Accumulate one batch given by its m, its mean and its biased variance (per channel)."""
        if m < 2:
            # m/(m − 1) is undefined: one value per channel carries no variance information.
            raise InputDataError(f"batch with m={m} value per channel: Algorithm 2 needs m >= 2")
        if mean.numel() != self.num_features:
            raise InputDataError(
                f"batch with {mean.numel()} channels: the statistics have {self.num_features}"
            )
        mean = mean.to(dtype=torch.float64, device=self.sum_mean.device)
        var_biased = var_biased.to(dtype=torch.float64, device=self.sum_var.device)
        self.count += m
        self.num_batches += 1
        self.sum_mean.add_(mean, alpha=m)
        self.sum_var.add_(var_biased, alpha=m * m / (m - 1))

    def merge_(self, other: "PopulationMoments") -> "PopulationMoments":
        """Add another set of sums (the union of both sets of batches), in place; returns self."""
        self.count += other.count.to(self.count.device)
        self.num_batches += other.num_batches.to(self.num_batches.device)
        self.sum_mean += other.sum_mean.to(self.sum_mean.device)
        self.sum_var += other.sum_var.to(self.sum_var.device)
        return self

    def reset_(self) -> None:
        for t in (self.count, self.num_batches, self.sum_mean, self.sum_var):
            t.zero_()

    def to_reference(self):
        """The same statistics as a :class:`bnfold.reference.PopulationStats` (NumPy, float64),
        e.g. to ``save()`` them or compare them with the oracle."""
        from bnfold.reference import PopulationStats
        from bnfold.reference.population import FORMAT_VERSION

        return PopulationStats.from_state_dict(
            {
                "format_version": FORMAT_VERSION,
                "num_channels": self.num_features,
                "num_batches": int(self.num_batches),
                "count": int(self.count),
                "sum_m_mean": self.sum_mean.detach().cpu().numpy().copy(),
                "sum_m_var_unbiased": self.sum_var.detach().cpu().numpy().copy(),
            }
        )

    @property
    def mean(self) -> torch.Tensor:
        """E[x] per channel, float64."""
        return self.sum_mean / self.count

    @property
    def var(self) -> torch.Tensor:
        """Unbiased population Var[x] per channel (Algorithm 2), float64."""
        return self.sum_var / self.count


def all_reduce_moments(moments: Sequence[PopulationMoments], group=None) -> None:
    """Sum the running sums of every rank in place, with one ``all_reduce`` for all layers.

    Every rank must pass the same layers in the same order (the same model). Afterwards every
    rank holds the statistics of the union of all ranks' batches.
    """
    import torch.distributed as dist

    if not moments:
        return
    device = moments[0].sum_mean.device
    # count and num_batches are exact in float64 far beyond any real dataset (2**53).
    flat = torch.cat(
        [
            torch.cat([mo.count.view(1), mo.num_batches.view(1).to(torch.float64), mo.sum_mean, mo.sum_var]).to(device)
            for mo in moments
        ]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for mo in moments:
        c = mo.num_features
        mo.count.copy_(flat[offset])
        mo.num_batches.copy_(flat[offset + 1].round().to(torch.int64))
        mo.sum_mean.copy_(flat[offset + 2 : offset + 2 + c])
        mo.sum_var.copy_(flat[offset + 2 + c : offset + 2 + 2 * c])
        offset += 2 + 2 * c
