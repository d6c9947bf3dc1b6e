"""Batch sources: .npz (stream of samples or stacked batches), folders, mappings, iterables."""

from __future__ import annotations

import numpy as np
import pytest

import bnfold
from bnfold.calibration.data import _open_npz, open_batches
from bnfold.errors import InputDataError, UsageError
from bnfold.reference import PopulationStats
from bnfold.validation.inputs import model_inputs
from tests.calibration._models import single_bn


def _samples(rng, n=10):
    return (rng.normal(0, 1, (n, 3, 5, 5)) * 2 + 1).astype(np.float32)


def _oracle(chunks):
    s = PopulationStats(3)
    for c in chunks:
        s.update(c)
    return s


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_npz_cut_into_batches_with_a_partial_last_batch(tmp_path, rng, compressed):
    x = _samples(rng, 10)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", x=x)
    # stored members are memory-mapped (a batch is read when it is cut), compressed ones read whole
    assert isinstance(_open_npz(tmp_path / "d.npz")["x"], np.memmap) is not compressed
    result = bnfold.calibrate(single_bn(), tmp_path / "d.npz", batch_size=4)
    oracle = _oracle([x[0:4], x[4:8], x[8:10]])  # last batch of 2 samples, weighted by its m
    ours = result.stats.stats["bn"]
    assert (ours.num_batches, ours.count) == (3, 250)
    np.testing.assert_allclose(ours.var, oracle.var, rtol=1e-13)
    whole = bnfold.calibrate(single_bn(), tmp_path / "d.npz")  # no batch_size: one batch
    assert whole.stats.stats["bn"].num_batches == 1


def test_stacked_npz_folder_mapping_and_generator_agree(tmp_path, rng):
    chunks = [_samples(rng, 4) for _ in range(3)]
    np.savez(tmp_path / "stacked.npz", x=np.stack(chunks))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, c in enumerate(chunks):
        np.savez(folder / f"part{i:02d}.npz", x=c)
    (folder / "README.txt").write_text("ignored")
    oracle = _oracle(chunks)
    sources = {
        "stacked": (tmp_path / "stacked.npz", None),
        "folder": (folder, None),
        "folder-split": (folder, 2),
        "mapping": ({"x": np.concatenate(chunks)}, 4),
        "generator": ((({"x": c} for c in chunks)), None),
        "list": ([{"x": c} for c in chunks], None),
    }
    for label, (data, batch_size) in sources.items():
        ours = bnfold.calibrate(single_bn(), data, batch_size=batch_size).stats.stats["bn"]
        assert ours.count == oracle.count, label
        assert ours.num_batches == (6 if label == "folder-split" else 3), label
        np.testing.assert_allclose(ours.mean, oracle.mean, rtol=1e-13, atol=1e-14, err_msg=label)
        if label != "folder-split":
            np.testing.assert_allclose(ours.var, oracle.var, rtol=1e-13, err_msg=label)


def test_totals_max_batches_and_progress(tmp_path, rng):
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", x=_samples(rng, 5))
    specs = model_inputs(single_bn())
    assert open_batches(folder, specs).total == 3
    assert open_batches(folder, specs, batch_size=2).total == 9
    calls = []
    result = bnfold.calibrate(single_bn(), folder, batch_size=2, max_batches=4,
                              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.report.num_batches == result.stats.stats["bn"].num_batches == 4
    generated = []
    bnfold.calibrate(single_bn(), ({"x": _samples(rng, 2)} for _ in range(3)),
                     progress=lambda done, total: generated.append((done, total)))
    assert generated == [(1, None), (2, None), (3, None)]
    pulled = []

    def stream():
        for i in range(10):
            pulled.append(i)
            yield {"x": _samples(rng, 2)}

    bnfold.calibrate(single_bn(), stream(), max_batches=2)
    assert pulled == [0, 1]  # max_batches stops before pulling another batch


def test_bad_sources(tmp_path, rng):
    specs = model_inputs(single_bn())
    with pytest.raises(InputDataError, match=r"nothing\.npz: no such file or folder"):
        open_batches(tmp_path / "nothing.npz", specs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match=r"empty: no \.npz files in this folder"):
        open_batches(tmp_path / "empty", specs)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(InputDataError, match=r"bad\.npz: cannot read as \.npz"):
        open_batches(tmp_path / "bad.npz", specs)
    np.savez(tmp_path / "stacked.npz", x=np.zeros((2, 4, 3, 5, 5), np.float32))
    with pytest.raises(UsageError, match=r"already hold batches"):
        open_batches(tmp_path / "stacked.npz", specs, batch_size=2)
    np.savez(tmp_path / "flat.npz", x=np.zeros((3, 5), np.float32))
    with pytest.raises(InputDataError, match=r"flat\.npz: input 'x' expects float32 \[N, 3, 5, 5\] \(or a leading "
                                             r"axis of batches\), got float32 \[3, 5\]"):
        open_batches(tmp_path / "flat.npz", specs)
    with pytest.raises(UsageError, match="batch_size=0"):
        open_batches({"x": _samples(rng)}, specs, batch_size=0)
    with pytest.raises(InputDataError, match="calibration data of type int"):
        open_batches(3, specs)
