"""A short, real run of the reference runtime: ``python -m bnfold.reference.demo``.

Data with known per-channel population mean and variance goes through training-mode BN in
small batches (m = 8 values per channel). The Algorithm-2 estimate is compared with torch's
moving average, with the uncorrected average of batch variances, and with the truth; then the
folded affine map s·x + t of the estimated statistics is checked against BN inference.
"""

from __future__ import annotations

import numpy as np

from bnfold.reference import (
    PopulationStats,
    batch_norm_inference,
    batch_norm_training,
    fold_params,
    update_running_stats_torch,
)

TRUE_MEAN = np.array([2.0, -1.0, 0.5])
TRUE_VAR = np.array([4.0, 0.25, 1.0])
BATCH_SHAPE = (4, 3, 2)  # N = 4 samples, C = 3 channels, 2 positions: m = 8 per channel
NUM_BATCHES = 200


def _row(label: str, values: np.ndarray) -> str:
    return f"  {label:<38}" + "".join(f"{v:>10.4f}" for v in values)


def main() -> None:
    rng = np.random.default_rng(0)
    scale, bias = np.array([1.5, 0.5, 1.0]), np.array([0.1, 0.0, -0.2])

    def batch() -> np.ndarray:
        z = rng.normal(size=BATCH_SHAPE)
        return TRUE_MEAN[None, :, None] + np.sqrt(TRUE_VAR)[None, :, None] * z

    x = batch()
    y, batch_mean, batch_var = batch_norm_training(x, scale, bias)
    print(f"One training batch x{BATCH_SHAPE} through batch_norm_training (3 channels):")
    print(_row("batch mean", batch_mean))
    print(_row("batch variance (biased, /m)", batch_var))
    print(_row("y mean per channel (= bias)", y.mean(axis=(0, 2))))

    stats = PopulationStats(3)
    running_mean, running_var = np.zeros(3), np.ones(3)  # torch's initial buffers
    uncorrected = np.zeros(3)
    for _ in range(NUM_BATCHES):
        x = batch()
        _, batch_mean, batch_var = batch_norm_training(x, scale, bias)
        stats.update(x)
        m = x.size // 3
        running_mean, running_var = update_running_stats_torch(running_mean, running_var, batch_mean, batch_var, m)
        uncorrected += batch_var / NUM_BATCHES

    print(f"\nPopulation variance after {NUM_BATCHES} batches of m = 8 values per channel:")
    print(_row("true Var[x]", TRUE_VAR))
    print(_row("Algorithm 2, m/(m-1)·mean(σ²_B)", stats.var))
    print(_row("mean(σ²_B) without m/(m-1)", uncorrected))
    print(_row("torch moving average (momentum 0.1)", running_var))
    print("Population mean:")
    print(_row("true E[x]", TRUE_MEAN))
    print(_row("Algorithm 2, mean(μ_B)", stats.mean))
    print(_row("torch moving average (momentum 0.1)", running_mean))
    print(f"  {stats!r}")

    s, t = fold_params(scale, bias, stats.mean, stats.var)
    x = batch()
    folded = s[None, :, None] * x + t[None, :, None]
    reference = batch_norm_inference(x, scale, bias, stats.mean, stats.var)
    print("\nFolded inference map y = s·x + t from the Algorithm-2 statistics:")
    print(_row("s = γ/√(Var + ε)", s))
    print(_row("t = β − s·E", t))
    print(f"  max |s·x + t − batch_norm_inference(x)| = {np.abs(folded - reference).max():.2e}")


if __name__ == "__main__":
    main()
