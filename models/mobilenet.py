"""MobileNetV2-style network (Sandler et al. 2018): depthwise separable inverted residuals.

Inverted residual: 1×1 expand Conv → BN → ReLU6, 3×3 depthwise Conv (groups = channels) → BN
→ ReLU6, 1×1 linear projection Conv → BN (no activation), plus the input when stride is 1 and
the channel count is unchanged.
"""

from torch import nn

INPUT_SHAPE = (2, 3, 32, 32)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True):
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu6:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            conv_bn(in_channels, hidden, 1),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),  # depthwise
            conv_bn(hidden, out_channels, 1, relu6=False),  # linear bottleneck
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, stride=2),
            InvertedResidual(16, 16, 1, expansion=1),
            InvertedResidual(16, 24, 2, expansion=4),
            InvertedResidual(24, 24, 1, expansion=4),
            conv_bn(24, 64, 1),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build() -> nn.Module:
    return MobileNetV2()
