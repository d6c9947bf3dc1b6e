"""Peak memory does not grow with the number of batches (see measure_memory.py for the figures)."""

from __future__ import annotations

import pytest

from tests.calibration.measure_memory import _model, peak_rss_mib, write_folder

# Holding 1,000 batches of 16×3×32×32 float32 would add ~190 MiB; measured growth 10 → 1,000
# batches: 0.3-0.4 MiB (allocator noise). The margin absorbs allocator and import differences.
MARGIN_MIB = 32


def test_peak_memory_of_1000_generated_batches_is_that_of_10(tmp_path):
    model = _model(tmp_path / "m.onnx")
    few = peak_rss_mib(model, "generator", 10, 16)
    many = peak_rss_mib(model, "generator", 1000, 16)
    assert many <= few + MARGIN_MIB, (few, many)


@pytest.mark.slow
def test_peak_memory_of_a_folder_of_1000_npz_files_is_that_of_10(tmp_path):
    model = _model(tmp_path / "m.onnx")
    folder = write_folder(tmp_path / "data", 1000, 16)
    few = peak_rss_mib(model, "folder", 10, 16, folder)
    many = peak_rss_mib(model, "folder", 1000, 16, folder)
    assert many <= few + MARGIN_MIB, (few, many)
