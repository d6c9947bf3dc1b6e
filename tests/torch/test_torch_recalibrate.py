"""recalibrate: precise BN for any model, checked against the reference runtime."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnfold.errors import InputDataError, UnsupportedModelError, UsageError  # noqa: E402
from bnfold.reference import PopulationStats, batch_norm_inference, batch_norm_training  # noqa: E402
from bnfold.torch import BatchNorm1d, recalibrate  # noqa: E402
from bnfold.torch._progress import Progress  # noqa: E402

F_IN, HIDDEN = 5, 6


def _model(ours: bool = False):
    torch.manual_seed(0)
    bn = BatchNorm1d if ours else nn.BatchNorm1d
    model = nn.Sequential(
        nn.Linear(F_IN, HIDDEN), nn.Dropout(0.5), bn(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), bn(HIDDEN)
    )
    with torch.no_grad():
        for layer in (model[2], model[5]):
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
    return model


def _batches(n=6, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8 + b, F_IN, generator=g, dtype=dtype) * 2 + 1) for b in range(n)]


def _oracle(model, batches):
    """Population stats of both BN inputs, computed with the reference runtime in float64:
    Dropout is the identity (eval), the first BN normalizes with its batch's statistics."""
    first, second = PopulationStats(HIDDEN), PopulationStats(HIDDEN)
    w1, b1 = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    w2, b2 = model[4].weight.detach().double().numpy(), model[4].bias.detach().double().numpy()
    for x in batches:
        h = x.double().numpy() @ w1.T + b1
        first.update(h)
        gamma, beta = model[2].weight.detach().numpy(), model[2].bias.detach().numpy()
        y = batch_norm_training(h, gamma, beta, model[2].eps)[0]
        second.update(np.maximum(y, 0) @ w2.T + b2)
    return first, second


@pytest.mark.parametrize("ours", [False, True], ids=["torch.nn", "bnfold"])
def test_statistics_equal_reference_and_eval_matches_reference_inference(ours):
    model = _model(ours)
    batches = _batches()
    first, second = _oracle(model, batches)
    report = recalibrate(model, batches, progress=False)

    assert report.num_batches == len(batches) and report.world_size == 1
    assert [(r.name, r.num_batches, r.count, r.skipped) for r in report.layers] == [
        ("2", 6, first.count, None),
        ("5", 6, second.count, None),
    ]
    # float32 model: activations carry float32 rounding, the written statistics one more.
    for layer, oracle in ((model[2], first), (model[5], second)):
        np.testing.assert_allclose(layer.running_mean.numpy(), oracle.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.numpy(), oracle.var, rtol=1e-5)
    assert report.layers[0].mean_change == pytest.approx(np.abs(first.mean).max(), rel=1e-5)  # from 0

    # Eval mode: every BN is the inference map of the reference runtime with these statistics.
    seen = {}
    hooks = [model[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out))) for i in (2, 5)]
    model.eval()
    model(_batches(1, seed=9)[0])
    for hook in hooks:
        hook.remove()
    for i, (x, y) in seen.items():
        bn = model[i]
        want = batch_norm_inference(
            x.detach().numpy(), bn.weight.detach().numpy(), bn.bias.detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy(), bn.eps
        )
        np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_parameters_bit_equal_modes_and_counters_restored():
    model = _model(ours=True)
    model.train()
    model[1].eval()  # mixed state must come back as it was
    model(_batches(1)[0])  # the layers' own sums and num_batches_tracked move
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    own_sums = model[2].population_sum_var.clone()
    tracked = int(model[2].num_batches_tracked)

    recalibrate(model, _batches(), progress=False)

    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert p.grad is None
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert int(model[2].num_batches_tracked) == tracked == 1
    assert torch.equal(model[2].population_sum_var, own_sums)  # recalibrate uses its own sums
    assert model[2].collect_population_stats is True


class _KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _model()

    def forward(self, features, scale=1.0):
        return self.inner(features * scale)


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict"])
def test_batch_forms_and_max_batches(form):
    batches = _batches()
    wrap = {
        "tensor": lambda x: x,
        "tuple": lambda x: (x, torch.zeros(len(x))),
        "list": lambda x: [x],
        "dict": lambda x: {"features": x, "scale": 1.0},
    }[form]
    model = _KeywordModel() if form == "dict" else _model()
    inner = model.inner if form == "dict" else model
    first, _ = _oracle(inner, batches[:3])
    report = recalibrate(model, (wrap(x) for x in batches), max_batches=3, progress=False)
    assert report.num_batches == 3 and report.layers[0].num_batches == 3
    np.testing.assert_allclose(inner[2].running_var.numpy(), first.var, rtol=1e-5)


def test_unreached_and_untracked_layers_are_skipped_with_a_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.BatchNorm1d(3)
            self.unused = nn.BatchNorm1d(3)
            self.untracked = nn.BatchNorm1d(3, track_running_stats=False)

        def forward(self, x):
            return self.untracked(self.used(x))

    model = Branchy()
    report = recalibrate(model, [torch.randn(4, 3)], progress=False)
    assert [(r.name, r.skipped) for r in report.skipped] == [
        ("unused", "no batch reached this layer"),
        ("untracked", "track_running_stats=False: no running statistics to write"),
    ]
    assert [r.name for r in report.recalibrated] == ["used"]
    assert torch.equal(model.unused.running_var, torch.ones(3))
    assert report.to_dict()["layers"][1]["skipped"] == "no batch reached this layer"


def test_errors_name_the_problem():
    with pytest.raises(InputDataError, match=r"^recalibrate: batches yielded no batch$"):
        recalibrate(_model(), [], progress=False)
    with pytest.raises(UnsupportedModelError, match=r"^recalibrate: Linear has no BatchNorm layer$"):
        recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)
    with pytest.raises(InputDataError, match=r"^recalibrate: batch of type str; expected a tensor"):
        recalibrate(_model(), ["x"], progress=False)
    with pytest.raises(UsageError, match=r"^recalibrate: max_batches=0; expected a positive count or None$"):
        recalibrate(_model(), _batches(), max_batches=0, progress=False)
    model = _model()
    with pytest.raises(InputDataError, match=r"^batch with m=1 value per channel: Algorithm 2 needs m >= 2$"):
        recalibrate(model, [torch.randn(1, F_IN)], progress=False)
    assert model[0].training and model[1].training  # restored after the failure


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    terminal, pipe = _Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        with Progress("recalibrate", 4, stream=stream) as bar:
            for _ in range(4):
                bar.advance()
    assert pipe.getvalue() == ""
    assert terminal.getvalue().endswith("\rrecalibrate [########################] 4/4\n")
    silent = _Terminal()
    with Progress("recalibrate", 4, enabled=False, stream=silent) as bar:
        bar.advance()
    assert silent.getvalue() == ""


def test_sync_batchnorm_outside_distributed_is_recalibrated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.SyncBatchNorm(3))
    batches = [torch.randn(4, 2, 3, 3) for _ in range(3)]
    oracle = PopulationStats(3)
    with torch.no_grad():
        for x in batches:
            oracle.update(model[0](x).numpy())
    recalibrate(model, batches, progress=False)
    np.testing.assert_allclose(model[1].running_mean.numpy(), oracle.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model[1].running_var.numpy(), oracle.var, rtol=1e-6)
