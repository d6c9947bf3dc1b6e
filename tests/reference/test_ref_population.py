"""PopulationStats: Algorithm 2's m/(m − 1), unbiasedness, merging, persistence, bad input."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.reference import PopulationStats, batch_norm_training


def test_equal_batch_sizes_by_hand():
    # m = 2 each. batch 1: [0, 2] → μ 1, σ² 1; batch 2: [4, 8] → μ 6, σ² 4.
    # E = mean(1, 6) = 3.5;  Var = 2/1 · mean(1, 4) = 5  (the biased mean would be 2.5)
    stats = PopulationStats(1)
    stats.update(np.array([[0.0], [2.0]]))
    stats.update(np.array([[4.0], [8.0]]))
    np.testing.assert_array_equal(stats.mean, [3.5])
    np.testing.assert_array_equal(stats.var, [5.0])
    assert (stats.num_batches, stats.count) == (2, 4)


def test_unequal_batch_sizes_by_hand():
    # batch 1: [0, 2], m 2, μ 1, σ² 1;  batch 2: [1, 1, 3, 3], m 4, μ 2, σ² 1.
    # E = (2·1 + 4·2)/6 = 5/3;  Var = (2·(2/1)·1 + 4·(4/3)·1)/6 = (4 + 16/3)/6 = 14/9
    stats = PopulationStats(1)
    stats.update(np.array([0.0, 2.0]).reshape(1, 1, 2))
    stats.update(np.array([1.0, 1.0, 3.0, 3.0]).reshape(2, 1, 2))
    np.testing.assert_allclose(stats.mean, [5 / 3], rtol=1e-15)
    np.testing.assert_allclose(stats.var, [14 / 9], rtol=1e-15)
    assert (stats.num_batches, stats.count) == (2, 6)


def test_update_moments_equals_update(rng):
    by_data, by_moments = PopulationStats(3), PopulationStats(3)
    for n in (2, 5, 3):
        x = rng.normal(size=(n, 3, 4))
        by_data.update(x)
        _, mean, var = batch_norm_training(x, np.ones(3), np.zeros(3))
        by_moments.update_moments(n * 4, mean, var)
    np.testing.assert_allclose(by_moments.mean, by_data.mean, rtol=1e-14)
    np.testing.assert_allclose(by_moments.var, by_data.var, rtol=1e-14)
    assert by_moments.count == by_data.count == 40


def _estimates(rng, batch_sizes, mu, v, repetitions):
    """Per repetition and channel: Algorithm 2's (mean, var) and the biased pooled variance."""
    c = mu.size
    ours_mean, ours_var, biased_var = [], [], []
    for _ in range(repetitions):
        stats = PopulationStats(c)
        sum_m_biased = np.zeros(c)
        for n in batch_sizes:
            x = mu[None, :, None] + np.sqrt(v)[None, :, None] * rng.normal(size=(n, c, 2))
            stats.update(x)
            sum_m_biased += n * 2 * x.var(axis=(0, 2))
        ours_mean.append(stats.mean)
        ours_var.append(stats.var)
        biased_var.append(sum_m_biased / stats.count)
    return np.array(ours_mean), np.array(ours_var), np.array(biased_var)


@pytest.mark.parametrize("batch_sizes", [[2] * 10, [1, 2, 3, 1, 2, 3, 1, 2, 3]], ids=["equal-m4", "unequal-m2,4,6"])
def test_variance_estimate_is_unbiased_on_iid_normal_data(rng, batch_sizes):
    """The Algorithm-2 estimate, averaged over K·C independent runs, is within 4 standard errors.

    Data: i.i.d. N(μ_c, v_c) values, m_b = 2·N_b per batch. For normal data the unbiased batch
    variance has variance 2v²/(m_b − 1), so one estimate Var̂ = Σ m_b·s²_b / Σ m_b has
    Var(Var̂/v) = 2·Σ m_b²/(m_b − 1) / (Σ m_b)²; the mean of K·C such ratios has standard error
    SE = √(that / (K·C)) (0.017 and 0.018 here). Bound: |mean(Var̂/v) − 1| < 4·SE. The biased estimator
    Σ m_b·σ²_b / Σ m_b has expectation 1 − n/Σm_b = 0.75 here (m = 4, and 2, 4, 6), 14–15 SE
    away, and must FAIL the same bound: the test can tell the two apart. The mean estimate is
    checked the same way, SE = 1/√(K·C·Σ m_b).
    """
    repetitions, c = 40, 6
    mu, v = rng.uniform(-5, 5, c), rng.uniform(0.5, 4, c)
    ours_mean, ours_var, biased_var = _estimates(rng, batch_sizes, mu, v, repetitions)
    m = 2 * np.array(batch_sizes)
    se_var = np.sqrt(2 * np.sum(m**2 / (m - 1)) / m.sum() ** 2 / (repetitions * c))
    assert abs(np.mean(ours_var / v) - 1) < 4 * se_var
    assert abs(np.mean(biased_var / v) - 1) > 4 * se_var
    np.testing.assert_allclose(np.mean(biased_var / v), 1 - len(m) / m.sum(), atol=4 * se_var)
    se_mean = 1 / np.sqrt(repetitions * c * m.sum())
    assert abs(np.mean((ours_mean - mu) / np.sqrt(v))) < 4 * se_mean


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    batch_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=8),
    data=st.data(),
)
def test_merge_in_any_order_equals_one_pass(seed, batch_sizes, data):
    """Random batches, randomly partitioned into shards (some empty), merged in random order."""
    rng = np.random.default_rng(seed)
    loc = rng.uniform(1, 5, 3)[None, :, None]
    batches = [loc + rng.uniform(0.1, 3) * rng.normal(size=(n, 3, 2)) for n in batch_sizes]
    one_pass = PopulationStats(3)
    for x in batches:
        one_pass.update(x)

    num_shards = data.draw(st.integers(1, len(batches) + 1), label="num_shards")
    owner = data.draw(st.lists(st.integers(0, num_shards - 1), min_size=len(batches), max_size=len(batches)))
    shards = [PopulationStats(3) for _ in range(num_shards)]
    for x, i in zip(batches, owner):
        shards[i].update(x)
    order = data.draw(st.permutations(range(num_shards)), label="order")
    merged = shards[order[0]]
    for i in order[1:]:
        assert merged.merge(shards[i]) is merged

    assert (merged.num_batches, merged.count) == (one_pass.num_batches, one_pass.count)
    np.testing.assert_allclose(merged.mean, one_pass.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var, one_pass.var, rtol=1e-12)


def test_merge_with_itself_doubles_the_weight(rng):
    stats = PopulationStats(2)
    stats.update(rng.normal(size=(3, 2)))
    mean, var = stats.mean, stats.var
    stats.merge(stats)
    assert (stats.num_batches, stats.count) == (2, 6)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(stats.var, var, rtol=1e-15)


def _filled(rng) -> PopulationStats:
    stats = PopulationStats(3)
    for n in (2, 3):
        stats.update(rng.normal(size=(n, 3, 2)))
    return stats


def _assert_same(a: PopulationStats, b: PopulationStats):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


@pytest.mark.parametrize("name", ["stats.npz", "stats.bin"])
def test_save_load_round_trip(rng, tmp_path, name):
    stats = _filled(rng)
    path = tmp_path / name
    stats.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the path as given, no temp left
    loaded = PopulationStats.load(path)
    _assert_same(loaded, stats)
    np.testing.assert_array_equal(loaded.var, stats.var)
    assert repr(loaded) == "PopulationStats(num_channels=3, num_batches=2, count=10)"


def test_state_dict_round_trip_and_copies(rng):
    stats = _filled(rng)
    state = stats.state_dict()
    state["sum_m_mean"][:] = 0  # a copy: mutating it leaves the stats alone
    assert np.all(stats.mean != 0)
    _assert_same(PopulationStats.from_state_dict(stats.state_dict()), stats)


def test_save_overwrites_atomically(rng, tmp_path):
    path = tmp_path / "stats.npz"
    PopulationStats(3).save(path)
    stats = _filled(rng)
    stats.save(path)
    _assert_same(PopulationStats.load(path), stats)


def _write_npz(path, **changes):
    state = {k: np.asarray(v) for k, v in PopulationStats(3).state_dict().items()}
    state["format"] = np.asarray("bnfold.PopulationStats")
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    with open(path, "wb") as f:
        np.savez(f, **state)


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (lambda p: p.write_bytes(b"not a zip file at all"), "not a PopulationStats file"),
        (lambda p: np.save(open(p, "wb"), np.zeros(3)), "an .npy array, not an .npz archive"),
        (lambda p: _write_npz(p, format=None), "no format key 'bnfold.PopulationStats'"),
        (lambda p: _write_npz(p, format=np.asarray("something.else")), "no format key"),
        (lambda p: _write_npz(p, format_version=np.asarray(2)), "format_version is 2, this bnfold reads 1"),
        (lambda p: _write_npz(p, count=None), "state is missing count"),
        (lambda p: _write_npz(p, sum_m_mean=np.zeros(4)), "sum_m_mean has shape (4,), expected (3,)"),
        (lambda p: _write_npz(p, num_batches=np.asarray(2), count=np.asarray(3)), "count=3 for num_batches=2"),
        (lambda p: _write_npz(p, count=np.asarray(2.5)), "count is 2.5 (float64), expected an integer scalar"),
    ],
    ids=["garbage", "npy", "no-format", "other-format", "version", "missing-key", "shape", "count", "float-count"],
)
def test_load_refuses_wrong_files_naming_the_path(tmp_path, write, reason):
    path = tmp_path / "stats.npz"
    write(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(reason)):
        PopulationStats.load(path)


def test_load_refuses_a_truncated_file(rng, tmp_path):
    path = tmp_path / "stats.npz"
    _filled(rng).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a PopulationStats file")):
        PopulationStats.load(path)


def test_load_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        PopulationStats.load(tmp_path / "absent.npz")
