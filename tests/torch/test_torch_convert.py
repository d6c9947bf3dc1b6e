"""convert_batchnorm: in place, nested, sharing parameters and buffers, keeping modes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnfold.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm  # noqa: E402


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False, momentum=None)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.BatchNorm1d(6, eps=1e-3),
    ).to(dtype)
    model.train()
    model(torch.randn(5, 3, 6, 6, dtype=dtype))  # non-trivial running statistics
    model[2][2].eval()  # a mixed train/eval state must survive
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converts_nested_layers_sharing_tensors(dtype):
    model = _model(dtype)
    old = {name: m for name, m in model.named_modules()}
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    model.eval()
    expected = model(x)
    model.train(), model[2][2].eval()

    assert convert_batchnorm(model) is model
    assert type(model[1]) is BatchNorm2d and type(model[2][2]) is BatchNorm2d and type(model[6]) is BatchNorm1d
    assert model[0] is old["0"]  # other modules untouched
    for name, p in model.named_parameters():
        assert p is params[name], name  # the very Parameter objects: optimizers keep working
    for name, b in model.named_buffers():
        if not name.split(".")[-1].startswith("population_"):
            assert b is buffers[name], name
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert (model[2][2].affine, model[2][2].momentum, model[6].eps) == (False, None, 1e-3)
    assert model[1].population_sum_mean.dtype == torch.float64

    model.eval()
    assert torch.equal(model(x), expected)
    # The optimizer built before the conversion still trains the converted model.
    model.train()
    before = model[1].weight.detach().clone()
    model(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, before)
    assert int(model[1].population_num_batches) == 1


def test_root_layer_is_returned_and_converted_layers_are_kept():
    bn = nn.BatchNorm3d(2).eval()
    new = convert_batchnorm(bn)
    assert type(new) is BatchNorm3d and new.weight is bn.weight and not new.training
    model = nn.Sequential(new)
    assert convert_batchnorm(model)[0] is new  # already ours: left alone


def test_sync_batchnorm_is_left_in_place():
    model = nn.Sequential(nn.SyncBatchNorm(3))
    convert_batchnorm(model)
    assert type(model[0]) is nn.SyncBatchNorm
