"""Decoder with grouped ConvTranspose2d → BatchNorm2d (groups > 1).

A grouped transposed convolution's weight is [C_in, C_out/g, k, k]: output channel of
W[i, j] is (i // (C_in/g))·(C_out/g) + j, the fold other tools get wrong. Groups 4 (with bias)
and 2 (without), each doubling the resolution, then a 3×3 Conv → BN and a 1×1 Conv to 3 channels.
"""

from torch import nn

INPUT_SHAPE = (2, 16, 4, 4)


def build() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1, groups=4),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, groups=2, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 3, 1),
        nn.Tanh(),
    )
