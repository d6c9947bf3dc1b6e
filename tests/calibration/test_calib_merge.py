"""Statistics files: shards computed separately merge into exactly the single-run result."""

from __future__ import annotations

import numpy as np
import pytest

import bnfold
from bnfold.calibration import CalibrationStats
from bnfold.errors import InputDataError
from bnfold.reference import PopulationStats
from tests.calibration._models import bn_stats, chain_batches, single_bn, two_bn_chain


def test_merged_shards_equal_one_run(tmp_path):
    model, _ = two_bn_chain()
    batches = chain_batches(n=7)
    single = bnfold.calibrate(model, batches)
    bnfold.calibrate(model, batches[:3]).stats.save(tmp_path / "a.stats")
    bnfold.calibrate(model, batches[3:5]).stats.save(tmp_path / "b.stats")
    # the third shard is merged together with data of this run
    merged = bnfold.calibrate(model, batches[5:], merge=[tmp_path / "a.stats", tmp_path / "b.stats"])
    assert merged.report.merged == [str(tmp_path / "a.stats"), str(tmp_path / "b.stats")]
    for name in ("bn1", "bn2"):
        one, many = single.stats.stats[name], merged.stats.stats[name]
        assert (many.num_batches, many.count) == (one.num_batches, one.count) == (7, one.count)
        np.testing.assert_allclose(many.mean, one.mean, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(many.var, one.var, rtol=1e-14)
        for a, b in zip(bn_stats(merged.model, name), bn_stats(single.model, name)):
            np.testing.assert_array_max_ulp(a, b, maxulp=1)


def test_merge_only_from_files_and_round_trip(tmp_path):
    model, _ = two_bn_chain()
    batches = chain_batches(n=4)
    single = bnfold.calibrate(model, batches)
    for i, b in enumerate(batches):
        bnfold.calibrate(model, [b]).stats.save(tmp_path / f"{i}.stats")
    merged = bnfold.calibrate(model, merge=sorted(tmp_path.glob("*.stats")))
    assert merged.report.num_batches == 0
    loaded = CalibrationStats.load(tmp_path / "0.stats")
    assert loaded.names == ("bn1", "bn2") and loaded.fingerprint == single.stats.fingerprint
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(merged.stats.stats[name].var, single.stats.stats[name].var, rtol=1e-14)


def test_fingerprint_ignores_the_stored_statistics_only(tmp_path):
    model, _ = two_bn_chain()
    once = bnfold.calibrate(model, chain_batches(n=2))
    again = bnfold.calibrate(once.model, chain_batches(n=2))  # other stored statistics, same network
    assert again.stats.fingerprint == once.stats.fingerprint
    other, _ = two_bn_chain(rng=np.random.default_rng(5))  # other weights
    assert bnfold.calibrate(other, chain_batches(n=1)).stats.fingerprint != once.stats.fingerprint


def test_merging_statistics_of_another_model_is_refused(tmp_path):
    model, _ = two_bn_chain()
    bnfold.calibrate(model, chain_batches(n=2)).stats.save(tmp_path / "chain.stats")
    with pytest.raises(InputDataError, match=r"chain\.stats: was computed for another model"):
        bnfold.calibrate(single_bn(), merge=[tmp_path / "chain.stats"])
    (tmp_path / "junk.stats").write_bytes(b"not a zip")
    with pytest.raises(InputDataError, match=r"junk\.stats: not a bnfold statistics file"):
        bnfold.calibrate(model, merge=[tmp_path / "junk.stats"])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputDataError, match=r"other\.npz: not a bnfold statistics file"):
        bnfold.calibrate(model, merge=[tmp_path / "other.npz"])
    with pytest.raises(InputDataError, match=r"missing\.stats: no such statistics file"):
        bnfold.calibrate(model, merge=[tmp_path / "missing.stats"])


def test_merge_refuses_another_bn_set():
    a = CalibrationStats("f", {"bn1": PopulationStats(3)})
    b = CalibrationStats("f", {"bn2": PopulationStats(3)})
    with pytest.raises(InputDataError, match=r"is for the BatchNormalization nodes \['bn2'\]"):
        a.merge(b, label="b.stats")
