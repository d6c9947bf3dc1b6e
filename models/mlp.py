"""MLP with BatchNorm1d: Linear → BN (a Gemm the BN folds into) and a BN on the raw input.

The input BN has no producer to fold into: the converter rewrites it as a per-feature
multiply and add.
"""

from torch import nn

INPUT_SHAPE = (8, 32)


def build() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(32),
        nn.Linear(32, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64, bias=False),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 10),
    )
