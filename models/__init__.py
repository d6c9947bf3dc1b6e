"""bnfold's own model zoo: small, readable torch networks covering every BatchNorm pattern.

One module per architecture, each with ``INPUT_SHAPE`` (an example input, batch first) and
``build() -> torch.nn.Module``:

==========  ==============================================================================
resnet      ResNet-style bottleneck blocks (Conv→BN, 1×1/3×3/1×1, projection shortcut)
mobilenet   MobileNetV2-style inverted residuals: 1×1 expand, 3×3 depthwise, ReLU6, linear 1×1
mlp         MLP with BatchNorm1d (Gemm→BN) and a BN on the raw input (no producer to fold into)
decoder     decoder with grouped ConvTranspose2d (groups 4 and 2) → BatchNorm2d
conv3d      3-D conv net with BatchNorm3d
preact      pre-activation blocks: BN → 1×1 conv without padding (foldable forward) and
            BN → 3×3 conv with padding (not foldable forward)
==========  ==============================================================================

``python -m models.build`` trains each briefly on synthetic data, recalibrates its BN
statistics (Algorithm 2) and exports unfolded ONNX models to ``.cache/models``; see
:mod:`models.build`. Importing this package does not import torch.
"""

from __future__ import annotations

import importlib

NAMES: tuple[str, ...] = ("resnet", "mobilenet", "mlp", "decoder", "conv3d", "preact")


def definition(name: str):
    """The module defining model ``name`` (with ``INPUT_SHAPE`` and ``build()``)."""
    if name not in NAMES:
        raise KeyError(f"unknown model {name!r}; the zoo has {', '.join(NAMES)}")
    return importlib.import_module(f"models.{name}")


def build_model(name: str):
    """A freshly initialized (untrained) instance of model ``name``."""
    return definition(name).build()


def input_shape(name: str) -> tuple[int, ...]:
    return tuple(definition(name).INPUT_SHAPE)


__all__ = ["NAMES", "build_model", "definition", "input_shape"]
