"""Pre-activation blocks where BatchNorm comes *before* a convolution.

Block: out = x + conv3x3(bn2(relu(conv1x1(bn1(x))))).

* ``bn1 → conv1x1`` (no padding, the BN output's only consumer): foldable *forward* into the
  conv, W'[o, c] = W[o, c]·s[c], b' = b + Σ W[o, c]·t[c]. bn1's input is the block input (a
  residual sum), so it has no producer to fold backward into.
* ``relu → bn2 → conv3x3 (padding 1)``: not foldable forward -- the zero padding would see
  t where it must see 0 -- and a ReLU is no producer: it stays a per-channel multiply and add.
"""

import torch
from torch import nn

INPUT_SHAPE = (2, 3, 16, 16)


class PreActBlock(nn.Module):
    def __init__(self, channels: int, mid_channels: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, mid_channels, 1)  # no padding: forward fold is exact
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, channels, 3, padding=1)  # padding: forward fold is not

    def forward(self, x):
        y = torch.relu(self.conv1(self.bn1(x)))
        return x + self.conv2(self.bn2(y))


class PreActNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(PreActBlock(16, 8), PreActBlock(16, 8))
        self.final_bn = nn.BatchNorm2d(16)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.final_bn(self.blocks(self.stem(x))))


def build() -> nn.Module:
    return PreActNet()
