"""bnfold.torch BatchNorm layers: torch-identical training, exact Algorithm-2 statistics."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnfold.errors import InputDataError, UnsupportedModelError  # noqa: E402
from bnfold.reference import PopulationStats, update_running_stats_torch  # noqa: E402
from bnfold.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d, apply_population_stats, reset_population_stats  # noqa: E402

C = 3
# (ours, torch.nn's, spatial shape of one sample); BatchNorm1d also takes (N, C) -- see below.
LAYERS = {
    "1d-NC": (BatchNorm1d, nn.BatchNorm1d, ()),
    "1d-NCL": (BatchNorm1d, nn.BatchNorm1d, (5,)),
    "2d": (BatchNorm2d, nn.BatchNorm2d, (4, 3)),
    "3d": (BatchNorm3d, nn.BatchNorm3d, (2, 3, 2)),
}
BATCH_SIZES = (4, 7, 2, 5)  # unequal: each batch gets its own m and m/(m-1)


def _batches(spatial, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    offset = torch.tensor([1.0, -2.0, 0.5]).view((1, C) + (1,) * len(spatial))
    return [(torch.randn((n, C) + spatial, generator=g) * 3 + offset).to(dtype) for n in BATCH_SIZES]


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_population_stats_equal_reference(kind, dtype):
    ours_cls, _, spatial = LAYERS[kind]
    layer = ours_cls(C, dtype=dtype).train()
    oracle = PopulationStats(C)
    batches = _batches(spatial, dtype)
    for x in batches:
        layer(x)
        oracle.update(x.numpy())

    moments = layer.population_moments()
    assert int(moments.num_batches) == oracle.num_batches == len(BATCH_SIZES)
    assert int(moments.count) == oracle.count
    np.testing.assert_allclose(moments.mean.numpy(), oracle.mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(moments.var.numpy(), oracle.var, rtol=1e-12, atol=0)

    layer.apply_population_stats()
    assert layer.running_mean.dtype == dtype  # rounded once to the buffer's dtype
    # Rounded once from float64: at most one ULP of the buffer's dtype from the oracle.
    rtol = 1e-12 if dtype == torch.float64 else 2.0**-23
    np.testing.assert_allclose(layer.running_mean.numpy(), oracle.mean, rtol=rtol, atol=0)
    np.testing.assert_allclose(layer.running_var.numpy(), oracle.var, rtol=rtol, atol=0)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_mode_bit_identical_to_torch(kind, momentum):
    ours_cls, torch_cls, spatial = LAYERS[kind]
    torch.manual_seed(1)
    theirs = torch_cls(C, momentum=momentum)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.uniform_(-1, 1)
    ours = ours_cls(C, momentum=momentum)
    ours.load_state_dict(theirs.state_dict())
    for x in _batches(spatial):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert torch.equal(ya, yb)
        (ya * ya).sum().backward()
        (yb * yb).sum().backward()
        assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ours.weight.grad, theirs.weight.grad)
    # The moving average keeps running as torch's does.
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == len(BATCH_SIZES)
    ours.eval(), theirs.eval()
    x = _batches(spatial, seed=5)[0]
    assert torch.equal(ours(x), theirs(x))


def test_state_dict_loads_both_ways():
    theirs = nn.BatchNorm2d(C)
    theirs.train()(_batches((4, 3))[0])
    ours = BatchNorm2d(C)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours(_batches((4, 3), seed=2)[0])  # moves the moving average
    back = nn.BatchNorm2d(C)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 2


def test_sums_stay_float64_when_the_module_is_cast():
    layer = BatchNorm2d(C).half()
    assert layer.weight.dtype == torch.float16
    assert layer.population_sum_mean.dtype == layer.population_sum_var.dtype == torch.float64
    layer.double().float()
    assert layer.population_count.dtype == torch.float64
    assert "population_sum_var" not in layer.state_dict()


def test_eval_mode_and_collect_off_do_not_accumulate():
    layer = BatchNorm1d(C)
    layer.eval()(_batches(())[0])
    layer.train()
    layer.collect_population_stats = False
    layer(_batches(())[0])
    assert int(layer.population_num_batches) == 0


def test_apply_without_batches_names_the_problem():
    with pytest.raises(InputDataError, match=r"^BatchNorm2d\(3\): no training-mode batch accumulated; run forward in training mode first$"):
        BatchNorm2d(C).apply_population_stats()


def test_apply_without_running_stats_names_the_problem():
    layer = BatchNorm2d(C, track_running_stats=False)
    layer(_batches((4, 3))[0])
    with pytest.raises(UnsupportedModelError, match=r"track_running_stats=False, there are no running statistics to write$"):
        layer.apply_population_stats()


def test_model_level_apply_and_reset():
    model = nn.Sequential(BatchNorm1d(C), nn.Linear(C, C), BatchNorm1d(C), BatchNorm1d(C, track_running_stats=False))
    model.train()
    for x in _batches(()):
        model(x)
    assert apply_population_stats(model) == ["0", "2"]
    oracle = PopulationStats(C)
    for x in _batches(()):
        oracle.update(x.numpy())
    np.testing.assert_allclose(model[0].running_var.numpy(), oracle.var, rtol=1e-6)
    reset_population_stats(model)
    assert all(int(m.population_num_batches) == 0 for m in model if isinstance(m, BatchNorm1d))


def test_few_batches_moving_average_lags_algorithm2_does_not():
    """i.i.d. N(3, 4²) data, 5 batches, momentum 0.1: the moving average keeps 0.9**5 = 59 %
    of its initial (0, 1); Algorithm 2 estimates the population the batches were drawn from."""
    true_mean, true_var, n, momentum = 3.0, 16.0, 5, 0.1
    g = torch.Generator().manual_seed(0)
    layer = BatchNorm2d(C, momentum=momentum).train()
    batches = [torch.randn(32, C, 8, 8, generator=g) * true_var**0.5 + true_mean for _ in range(n)]
    for x in batches:
        layer(x)
    ema_mean, ema_var = layer.running_mean.clone(), layer.running_var.clone()
    layer.apply_population_stats()

    pooled = torch.cat(batches).double()
    pooled_mean, pooled_var = pooled.mean((0, 2, 3)).numpy(), pooled.var((0, 2, 3)).numpy()
    keep = (1 - momentum) ** n  # weight left on the initial running_mean=0, running_var=1
    # m = 32·64 = 2048 values per batch: one batch's mean is off by ~0.09, its variance by ~3 %.
    np.testing.assert_allclose(ema_mean.numpy(), (1 - keep) * true_mean, atol=0.15)  # 1.23
    np.testing.assert_allclose(ema_var.numpy(), keep * 1.0 + (1 - keep) * true_var, rtol=0.05)  # 7.14
    # Algorithm 2: E is exactly the pooled mean; Var the average within-batch unbiased variance,
    # which for i.i.d. batches is the pooled variance up to sampling (1.4 %/√5 between batches).
    np.testing.assert_allclose(layer.running_mean.numpy(), pooled_mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), pooled_var, rtol=0.01)
    np.testing.assert_allclose(layer.running_mean.numpy(), true_mean, atol=4 * (true_var / (n * 2048)) ** 0.5)
    np.testing.assert_allclose(layer.running_var.numpy(), true_var, rtol=0.04)
    assert float((layer.running_mean - ema_mean).abs().min()) > 1.5
    assert float((layer.running_var - ema_var).abs().min()) > 7


def test_drifting_input_moving_average_follows_recent_batches():
    """Batch means drift linearly 0 → 2 over 20 batches: the moving average weighs the last
    ~10 batches (ends near 1.18), Algorithm 2 weighs all equally (the mean of the drift, 1.0)."""
    g = torch.Generator().manual_seed(0)
    drift = np.linspace(0.0, 2.0, 20)
    layer = BatchNorm1d(C, dtype=torch.float64).train()
    running_mean, running_var = np.zeros(C), np.ones(C)
    for mu in drift:
        x = torch.randn(64, C, 16, generator=g, dtype=torch.float64) + mu
        layer(x)
        xn = x.numpy()
        running_mean, running_var = update_running_stats_torch(
            running_mean, running_var, xn.mean((0, 2)), xn.var((0, 2)), xn.shape[0] * xn.shape[2], momentum=0.1
        )
    # Our layer's moving average is torch's recursion, checked against the reference runtime's.
    np.testing.assert_allclose(layer.running_mean.numpy(), running_mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), running_var, rtol=1e-12)
    ema_mean = layer.running_mean.numpy().copy()
    layer.apply_population_stats()
    np.testing.assert_allclose(layer.running_mean.numpy(), drift.mean(), atol=0.02)  # 1024 values/batch
    np.testing.assert_allclose(layer.running_var.numpy(), 1.0, rtol=0.03)  # within-batch variance
    # EMA of the drift itself (initial running_mean 0): Σ_b 0.1·0.9**(19 − b)·μ_b = 1.18.
    expected_ema = sum(0.1 * 0.9 ** (len(drift) - 1 - b) * mu for b, mu in enumerate(drift))
    assert abs(expected_ema - 1.18) < 0.005
    # One batch's mean is off by ~1/32; the EMA rests on ~10 batches, Algorithm 2 on 20.
    np.testing.assert_allclose(ema_mean, expected_ema, atol=0.03)
    np.testing.assert_allclose(ema_mean - layer.running_mean.numpy(), expected_ema - drift.mean(), atol=0.04)
