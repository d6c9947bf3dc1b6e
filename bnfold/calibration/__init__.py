"""Re-estimate the BatchNormalization statistics of an ONNX model from data (precise BN).

``calibrate(model, batches, ...) -> CalibrationResult``: every BN of the main graph gets the
Ioffe & Szegedy Algorithm-2 population mean and variance of its input *as the network sees it
in training-mode normalization*, computed with onnxruntime alone. The parts:

* :mod:`.data` -- batch sources (.npz, folder of .npz, mapping, iterable), streamed;
* :mod:`.graph` -- the statistics model (each BN normalizes with, and exposes, batch moments);
* :mod:`.stats` -- per-BN sufficient statistics, the statistics file, merging shards;
* :mod:`.calibrate` -- the run, and writing E and Var into the model's constants;
* :mod:`.report` -- per-BN report and the result object.
"""

from bnfold.calibration.calibrate import apply_stats, calibrate, collect
from bnfold.calibration.report import BatchNormCalibration, CalibrationReport, CalibrationResult
from bnfold.calibration.stats import CalibrationStats, model_fingerprint

__all__ = [
    "BatchNormCalibration", "CalibrationReport", "CalibrationResult", "CalibrationStats",
    "apply_stats", "calibrate", "collect", "model_fingerprint",
]
