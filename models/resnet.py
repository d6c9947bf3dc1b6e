"""ResNet-style network with bottleneck blocks (He et al. 2016): every BN follows a Conv.

Bottleneck: 1×1 reduce → 3×3 → 1×1 expand, each Conv(bias=False) → BN, ReLU after the first
two, the sum, and after the sum; the shortcut is a strided 1×1 Conv → BN when the shape changes.
"""

from torch import nn

INPUT_SHAPE = (2, 3, 32, 32)


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv = nn.Conv2d(mid_channels, mid_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.expand = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        y = self.relu(self.bn1(self.reduce(x)))
        y = self.relu(self.bn2(self.conv(y)))
        y = self.bn3(self.expand(y))
        return self.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 16, 64, stride=2), Bottleneck(64, 16, 64))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def build() -> nn.Module:
    return ResNet()
