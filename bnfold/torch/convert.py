"""Swap torch.nn BatchNorm1d/2d/3d for bnfold's, in place, sharing parameters and buffers.

The new layer takes over the old one's ``weight`` / ``bias`` Parameter objects and its running
buffers (the very tensors, not copies), so an optimizer built before the conversion keeps
updating the model's parameters, and device, dtype, ``requires_grad`` and train/eval state
carry over. Forward hooks registered on the old layer are not carried over.

``SyncBatchNorm`` is left in place: it has no fixed dimensionality to map to, and
:func:`bnfold.torch.recalibrate` re-estimates it (across ranks) as it is.
"""

from __future__ import annotations

from torch import nn

from bnfold.torch.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

# Exact types only: a subclass of torch.nn's (ours included) may carry behaviour we would drop.
_REPLACEMENTS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def _replacement(layer: nn.Module) -> nn.Module | None:
    cls = _REPLACEMENTS.get(type(layer))
    if cls is None:
        return None
    ref = layer.weight if layer.weight is not None else layer.running_mean
    new = cls(
        layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    # Share, do not copy: optimizers and other references keep pointing at live tensors.
    for name, param in layer._parameters.items():
        new._parameters[name] = param
    for name, buffer in layer._buffers.items():
        new._buffers[name] = buffer
    new.train(layer.training)
    return new


def convert_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every torch.nn ``BatchNorm1d/2d/3d`` in ``model`` by bnfold's, in place.

    Nested modules are converted too. The layers share the old layers' parameters and buffers
    (module docstring).

    Args:
        model: the module to convert. If it is itself a BatchNorm layer it cannot be replaced
            in place; the converted layer is returned instead.

    Returns:
        ``model`` (or the new layer when ``model`` was a bare BatchNorm layer).
    """
    root = _replacement(model)
    if root is not None:
        return root
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            new = None if child is None else _replacement(child)
            if new is not None:
                parent._modules[child_name] = new
    return model
