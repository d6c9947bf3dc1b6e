"""recalibrate under torch.distributed: 2 CPU processes (gloo) equal one process on all batches."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from torch import nn  # noqa: E402

from bnfold.torch import BatchNorm2d, recalibrate  # noqa: E402

WORLD_SIZE = 2
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# The sums are float64 in both cases; float32 activations differ only in the summation order
# of the all_reduce versus one process, and the result is rounded once to float32.
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}


def _model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), BatchNorm2d(3)
    ).to(dtype)
    return model


def _all_batches(dtype):
    g = torch.Generator().manual_seed(1)
    # Unequal batch sizes, so the ranks see different m and different numbers of values.
    return [(torch.randn(3 + b % 4, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype) for b in range(7)]


def _statistics(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in (model[1], model[4])]


def _worker(rank, store_dir, out_dir):
    torch.set_num_threads(1)  # two ranks on a shared CPU: no OpenMP oversubscription
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for name, dtype in DTYPES.items():
            model = _model(dtype)
            report = recalibrate(model, _all_batches(dtype)[rank::WORLD_SIZE], progress=False)
            results[name] = {"stats": _statistics(model), "report": report.to_dict(), "world_size": report.world_size}
        # A rank without any batch still joins the collective and ends with rank 0's statistics.
        model = _model(torch.float64)
        recalibrate(model, _all_batches(torch.float64)[:2] if rank == 0 else [], progress=False)
        results["rank0-only"] = _statistics(model)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_union(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    for name, dtype in DTYPES.items():
        model = _model(dtype)
        single = recalibrate(model, _all_batches(dtype), progress=False)
        expected = _statistics(model)
        for rank, results in enumerate(ranks):
            got = results[name]
            assert got["world_size"] == WORLD_SIZE
            # Per-layer counts are those of the union; num_batches is this rank's own.
            assert [l["count"] for l in got["report"]["layers"]] == [l.count for l in single.layers]
            assert [l["num_batches"] for l in got["report"]["layers"]] == [7, 7]
            assert got["report"]["num_batches"] == (4 if rank == 0 else 3)
            for (mean, var), (want_mean, want_var) in zip(got["stats"], expected):
                assert mean.dtype == dtype
                np.testing.assert_allclose(mean.numpy(), want_mean.numpy(), rtol=TOLERANCE[name], atol=TOLERANCE[name])
                np.testing.assert_allclose(var.numpy(), want_var.numpy(), rtol=TOLERANCE[name])

    model = _model(torch.float64)
    recalibrate(model, _all_batches(torch.float64)[:2], progress=False)
    for results in ranks:
        for (mean, var), (want_mean, want_var) in zip(results["rank0-only"], _statistics(model)):
            np.testing.assert_allclose(mean.numpy(), want_mean.numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(var.numpy(), want_var.numpy(), rtol=1e-12)
