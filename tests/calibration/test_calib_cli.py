"""``bnfold calibrate`` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.calibration import CalibrationStats
from bnfold.cli import cli
from tests.calibration._models import bn_stats, chain_batches, two_bn_chain


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(two_bn_chain()[0], path)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.concatenate([b["x"] for b in chain_batches(n=4, sizes=[4, 4, 4, 4])]))
    return path


def test_calibrate_writes_the_model_and_prints_how_far_the_statistics_moved(src, data, tmp_path):
    out = tmp_path / "o.onnx"
    res = invoke("calibrate", src, "--data", data, "-o", out, "--batch-size", 4)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"{src}: 2 BatchNormalization nodes calibrated from 4 batches"
    assert lines[1].split() == ["BatchNormalization", "batches", "count", "max|ΔE|", "max|ΔVar|/Var"]
    assert [line.split()[:3] for line in lines[2:4]] == [["bn1", "4", "576"], ["bn2", "4", "576"]]
    assert lines[-1] == f"wrote {out}"
    written = onnx.load(out)
    mean, var = bn_stats(written, "bn1")
    assert not np.array_equal(mean, bn_stats(onnx.load(src), "bn1")[0])
    assert float(lines[2].split()[3]) == pytest.approx(
        np.max(np.abs(mean.astype(np.float64) - bn_stats(onnx.load(src), "bn1")[0])), rel=1e-2)


def test_default_output_in_place_and_never_over_the_input(src, data):
    before = src.read_bytes()
    res = invoke("calibrate", src, "--data", data, "-o", src)
    assert res.exit_code == 2
    assert res.output.strip() == f"bnfold: error: {src}: is the input model; refusing to overwrite it (use --in-place)"
    assert src.read_bytes() == before
    assert invoke("calibrate", src, "--data", data).exit_code == 0
    assert src.with_name("m.calibrated.onnx").is_file()
    assert invoke("calibrate", src, "--data", data, "--in-place").exit_code == 0
    assert src.read_bytes() != before


def test_fold_produces_a_folded_validated_model(src, data, tmp_path):
    out = tmp_path / "folded.onnx"
    res = invoke("calibrate", src, "--data", data, "--batch-size", 8, "-o", out, "--fold", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["check"]["passed"] is True
    assert doc["fold"]["counts"]["folded"] == 2
    assert doc["num_batches"] == 2 and [layer["count"] for layer in doc["layers"]] == [576, 576]
    model = onnx.load(out)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)


def test_save_stats_and_merge_equal_one_run(src, tmp_path):
    batches = chain_batches(n=4, sizes=[4, 4, 4, 4])
    np.savez(tmp_path / "all.npz", x=np.stack([b["x"] for b in batches]))
    np.savez(tmp_path / "a.npz", x=np.stack([b["x"] for b in batches[:1]]))
    np.savez(tmp_path / "b.npz", x=np.stack([b["x"] for b in batches[1:]]))
    assert invoke("calibrate", src, "--data", tmp_path / "all.npz", "-o", tmp_path / "one.onnx").exit_code == 0
    for shard in ("a", "b"):
        res = invoke("calibrate", src, "--data", tmp_path / f"{shard}.npz", "-o", tmp_path / f"{shard}.onnx",
                     "--save-stats", tmp_path / f"{shard}.stats")
        assert res.exit_code == 0, res.output
        assert f"saved statistics to {tmp_path / f'{shard}.stats'}" in res.output
    res = invoke("calibrate", src, "--merge", tmp_path / "a.stats", tmp_path / "b.stats", "-o", tmp_path / "merged.onnx")
    assert res.exit_code == 0, res.output
    assert "calibrated from 0 batches, 2 statistics files merged" in res.output.splitlines()[0]
    one, merged = onnx.load(tmp_path / "one.onnx"), onnx.load(tmp_path / "merged.onnx")
    for name in ("bn1", "bn2"):
        for a, b in zip(bn_stats(merged, name), bn_stats(one, name)):
            np.testing.assert_array_max_ulp(a, b, maxulp=1)
    assert CalibrationStats.load(tmp_path / "a.stats").num_batches == 1


@pytest.mark.parametrize("args, message", [
    ([], "give --data DATA (or --merge STATS...)"),
    (["extra.stats"], "unexpected arguments extra.stats: statistics files follow --merge"),
    (["--merge"], "--merge: give the statistics files to merge, e.g. --merge a.stats b.stats"),
])
def test_usage_errors_exit_2(src, args, message):
    res = invoke("calibrate", src, *args)
    assert res.exit_code == 2
    assert res.output.strip() == f"bnfold: error: {message}"


def test_bad_input_is_one_line_exit_2_nothing_written(src, tmp_path):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 6, 6), np.float64))
    out = tmp_path / "o.onnx"
    res = invoke("calibrate", src, "--data", tmp_path / "wrong.npz", "-o", out)
    assert res.exit_code == 2
    assert res.output.strip() == (f"bnfold: error: {tmp_path / 'wrong.npz'}: input 'x' expects float32 "
                                  "[N, 3, 6, 6], got float64 [4, 3, 6, 6]")
    assert not out.exists()
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 3, 6, 6), np.float32))
    res = invoke("calibrate", src, "--data", tmp_path / "one.npz", "-o", out, "--save-stats", tmp_path / "no/s.stats")
    assert res.exit_code == 2 and "folder" in res.output and "does not exist" in res.output
    res = invoke("calibrate", tmp_path / "missing.onnx", "--data", tmp_path / "one.npz")
    assert res.exit_code == 2 and res.output.strip() == f"bnfold: error: {tmp_path / 'missing.onnx'}: no such file"
    assert not out.exists()
