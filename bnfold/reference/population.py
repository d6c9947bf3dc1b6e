"""Population statistics for BatchNormalization: Ioffe & Szegedy (2015), Algorithm 2.

The estimator. Over n training mini-batches b, each with m_b values per channel
(m_b = batch size × spatial positions), batch mean μ_b and BIASED batch variance
σ²_b = (1/m_b)·Σ(x − μ_b)²:

    E[x]   = Σ_b m_b·μ_b / Σ_b m_b
    Var[x] = Σ_b m_b·(m_b/(m_b − 1))·σ²_b / Σ_b m_b

With equal batch sizes these are the paper's E[x] = mean_b(μ_b) and
Var[x] = m/(m − 1)·mean_b(σ²_b); with unequal sizes each batch is weighted by its m_b and gets
its own correction.

Why m/(m − 1). For m i.i.d. values of variance v, E[σ²_b] = (m − 1)/m · v: the batch mean
is fitted to the same values, which removes one degree of freedom (Bessel). m/(m − 1)·σ²_b is
the unbiased sample variance, so every batch's term, and therefore their weighted average,
has expectation v. Without the factor a network evaluated on small batches (m = 16: −6 %)
gets a systematically too small variance and a too large BN scale. The estimate is the
average *within-batch* variance: it does not add the spread between batch means (for i.i.d.
batches both estimate the same Var[x]; under a drift they differ, and this is the one BN saw).

How it differs from what frameworks keep. torch and ONNX keep an exponential moving average
(see ``bnfold.reference.batchnorm``): torch ``new = 0.9·old + 0.1·current`` with an
unbiased current variance, ONNX training-mode BN ``new = momentum·old + (1 − momentum)·current``
with a biased one. A moving average weighs the last ~1/(1 − 0.9) = 10 batches, depends on the
initial value and on the order of the batches, and (ONNX) is biased by (m − 1)/m. The
Algorithm-2 estimate weighs every batch by its size, does not depend on order, and is unbiased.

Storage. Only sufficient statistics are kept, in float64: Σm, Σ m·μ and Σ m²/(m − 1)·σ².
Merging the statistics of several shards or processes is therefore a sum: the result equals
one pass over all batches (in any order) up to float64 rounding.
"""

from __future__ import annotations

import numbers
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from bnfold.reference._checks import (
    CHANNEL_AXIS,
    all_but_channel,
    as_float64,
    check_batch_size,
    check_min_rank,
    check_nonnegative,
    values_per_channel,
)
from bnfold.reference._standardize import moments

FORMAT = "bnfold.PopulationStats"
FORMAT_VERSION = 1
_STATE_KEYS = {"format_version", "num_channels", "num_batches", "count", "sum_m_mean", "sum_m_var_unbiased"}


def _check_finite(name: str, value: np.ndarray) -> None:
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{name} contains NaN or infinity; it would poison the population statistics")


def _as_int(name: str, value) -> int:
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} is {arr.tolist()!r} ({arr.dtype}), expected an integer scalar")
    return int(arr)


class PopulationStats:
    """Exact Algorithm-2 population mean and variance of one BN layer's C channels.

    Feed mini-batches with ``update(x)`` (or their moments with ``update_moments``), read
    ``mean`` and ``var``, combine shards with ``merge``, persist with ``save``/``load``.

    Args:
        num_channels: C, the length of the per-channel statistics.
    """

    def __init__(self, num_channels: int):
        if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral) or num_channels < 1:
            raise ValueError(f"num_channels={num_channels!r}, expected a positive integer")
        self._num_channels = int(num_channels)
        self._num_batches = 0
        self._count = 0
        self._sum_m_mean = np.zeros(self._num_channels)
        self._sum_m_var_unbiased = np.zeros(self._num_channels)

    @property
    def num_channels(self) -> int:
        return self._num_channels

    @property
    def num_batches(self) -> int:
        return self._num_batches

    @property
    def count(self) -> int:
        """Σ m over the batches seen: how many values per channel the estimate rests on."""
        return self._count

    def update(self, x) -> None:
        """Add one mini-batch x of shape (N, C, ...); its m = N·prod(spatial) must be >= 2."""
        x64 = as_float64("x", x)
        check_min_rank("x", x64, 2, "(N, C, ...) with channels on axis 1")
        if x64.shape[CHANNEL_AXIS] != self._num_channels:
            raise ValueError(
                f"x has shape {tuple(x64.shape)} with {x64.shape[CHANNEL_AXIS]} channels (axis 1), "
                f"expected {self._num_channels} = num_channels of this PopulationStats"
            )
        m = check_batch_size(values_per_channel(x64.shape), x64.shape)
        _check_finite("x", x64)
        mean, var = moments(x64, all_but_channel(x64.ndim))
        self._add(m, mean.reshape(-1), var.reshape(-1))

    def update_moments(self, m: int, batch_mean, batch_var) -> None:
        """Add one mini-batch given by its per-channel mean and BIASED variance over m values.

        For callers that compute the moments elsewhere (torch, onnxruntime).

        Args:
            m: values per channel in the batch, >= 2.
            batch_mean: shape (C,).
            batch_var: biased (divided by m) variance, shape (C,), non-negative.
        """
        m = check_batch_size(m)
        mean = as_float64("batch_mean", batch_mean)
        var = as_float64("batch_var", batch_var)
        for name, v in (("batch_mean", mean), ("batch_var", var)):
            if v.shape != (self._num_channels,):
                raise ValueError(
                    f"{name} has shape {tuple(v.shape)}, "
                    f"expected ({self._num_channels},) = num_channels of this PopulationStats"
                )
            _check_finite(name, v)
        check_nonnegative("batch_var", var)
        self._add(m, mean, var)

    def _add(self, m: int, mean: np.ndarray, var_biased: np.ndarray) -> None:
        self._num_batches += 1
        self._count += m
        self._sum_m_mean += m * mean
        # m · (m/(m−1)) · σ²: the batch's unbiased variance, weighted by its size.
        self._sum_m_var_unbiased += (m * m / (m - 1)) * var_biased

    def _check_not_empty(self) -> None:
        if self._num_batches == 0:
            raise ValueError(f"{self!r} has no batches: call update() or update_moments() first")

    @property
    def mean(self) -> np.ndarray:
        """E[x] = Σ m_b μ_b / Σ m_b, float64 of shape (C,)."""
        self._check_not_empty()
        return self._sum_m_mean / self._count

    @property
    def var(self) -> np.ndarray:
        """Var[x] = Σ m_b·(m_b/(m_b − 1))·σ²_b / Σ m_b, float64 of shape (C,)."""
        self._check_not_empty()
        return self._sum_m_var_unbiased / self._count

    def merge(self, other: PopulationStats) -> PopulationStats:
        """Add ``other``'s batches to these statistics, in place; returns self."""
        if not isinstance(other, PopulationStats):
            raise TypeError(f"cannot merge {type(other).__name__} into PopulationStats")
        if other.num_channels != self._num_channels:
            raise ValueError(
                f"cannot merge {other!r} into {self!r}: num_channels {other.num_channels} != {self._num_channels}"
            )
        # Read other's state before writing ours: s.merge(s) must double, not quadruple.
        state = other.state_dict()
        self._num_batches += state["num_batches"]
        self._count += state["count"]
        self._sum_m_mean += state["sum_m_mean"]
        self._sum_m_var_unbiased += state["sum_m_var_unbiased"]
        return self

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """The sufficient statistics (copies) and the format version; see ``from_state_dict``."""
        return {
            "format_version": FORMAT_VERSION,
            "num_channels": self._num_channels,
            "num_batches": self._num_batches,
            "count": self._count,
            "sum_m_mean": self._sum_m_mean.copy(),
            "sum_m_var_unbiased": self._sum_m_var_unbiased.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PopulationStats:
        """Rebuild from ``state_dict()``; a missing key or inconsistent value raises ValueError."""
        missing = sorted(_STATE_KEYS - set(state))
        if missing:
            raise ValueError(f"PopulationStats state is missing {', '.join(missing)}")
        version = _as_int("format_version", state["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"PopulationStats format_version is {version}, this bnfold reads {FORMAT_VERSION}")
        stats = cls(_as_int("num_channels", state["num_channels"]))
        num_batches = _as_int("num_batches", state["num_batches"])
        count = _as_int("count", state["count"])
        # Every batch has m >= 2, and no batch means no values.
        if num_batches < 0 or count < 2 * num_batches or (num_batches == 0 and count != 0):
            raise ValueError(f"PopulationStats state has count={count} for num_batches={num_batches}")
        sums = {}
        for name in ("sum_m_mean", "sum_m_var_unbiased"):
            v = as_float64(name, state[name])
            if v.shape != (stats.num_channels,):
                raise ValueError(f"{name} has shape {tuple(v.shape)}, expected ({stats.num_channels},) = num_channels")
            _check_finite(name, v)
            sums[name] = v
        check_nonnegative("sum_m_var_unbiased", sums["sum_m_var_unbiased"])
        stats._num_batches, stats._count = num_batches, count
        stats._sum_m_mean, stats._sum_m_var_unbiased = sums["sum_m_mean"], sums["sum_m_var_unbiased"]
        return stats

    def save(self, path) -> None:
        """Write an .npz file atomically (temporary file + rename); the path is used as given."""
        path = Path(path)
        arrays = {key: np.asarray(value) for key, value in self.state_dict().items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, format=np.asarray(FORMAT), **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path) -> PopulationStats:
        """Read a file written by ``save``.

        A missing file raises FileNotFoundError; a file that is not a valid PopulationStats
        .npz (other data, corrupt, another format version) raises ValueError naming the path.
        """
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an .npz archive")
            with data:
                state = {key: data[key] for key in data.files}
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a PopulationStats file ({exc})") from exc
        if "format" not in state or str(state["format"]) != FORMAT:
            raise ValueError(f"{path}: not a PopulationStats file (no format key {FORMAT!r})")
        try:
            return cls.from_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def __repr__(self) -> str:
        return (
            f"PopulationStats(num_channels={self._num_channels}, num_batches={self._num_batches}, "
            f"count={self._count})"
        )
