"""3-D conv net with BatchNorm3d (video / volumetric shape: N, C, D, H, W)."""

from torch import nn

INPUT_SHAPE = (2, 1, 8, 16, 16)


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        nn.Conv3d(8, 16, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm3d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
