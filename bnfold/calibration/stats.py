"""The sufficient statistics of every calibrated BN of one model, and their statistics file.

One :class:`bnfold.reference.PopulationStats` per BN (Σm, Σm·μ, Σm²/(m−1)·σ² in float64), so
shards computed by separate processes or machines merge by addition into exactly the
single-run result (up to float64 rounding of the sums).

**File** (``--save-stats``): one ``.npz`` written atomically (temporary file + rename) with

* ``format`` = ``"bnfold.CalibrationStats"``, ``format_version`` = 1;
* ``fingerprint``: SHA-256 of the model with the calibrated BNs' mean/var values left out
  (the statistics a run collects do not depend on them, so a model keeps its fingerprint
  when it is re-calibrated), see :func:`model_fingerprint`;
* ``names``: the BN node names, in graph order;
* ``bn<i>.<key>`` for every key of BN i's ``PopulationStats.state_dict()``.

Merging refuses files of another model (fingerprint), another BN set or channel counts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import InputDataError
from bnfold.reference import PopulationStats

FORMAT = "bnfold.CalibrationStats"
FORMAT_VERSION = 1


def model_fingerprint(model: onnx.ModelProto, excluded: set[str]) -> str:
    """SHA-256 over the opsets, graph signature, nodes and initializers, leaving out the
    tensors named in ``excluded`` (initializers and the Constant nodes producing them)."""
    h = hashlib.sha256()
    for entry in model.opset_import:
        h.update(f"opset {entry.domain} {entry.version}\n".encode())
    graph = model.graph
    for v in (*graph.input, *graph.output):
        h.update(v.SerializeToString(deterministic=True))
    for node in graph.node:
        if node.op_type == "Constant" and any(o in excluded for o in node.output):
            h.update(f"constant {list(node.output)}\n".encode())
            continue
        h.update(node.SerializeToString(deterministic=True))
    for tensor in graph.initializer:
        if tensor.name in excluded:
            h.update(f"excluded {tensor.name}\n".encode())
            continue
        h.update(tensor.SerializeToString(deterministic=True))
    for function in model.functions:
        h.update(function.SerializeToString(deterministic=True))
    return h.hexdigest()


@dataclass
class CalibrationStats:
    """Per-BN Algorithm-2 sufficient statistics of one model (keyed by BN node name)."""

    fingerprint: str
    stats: dict[str, PopulationStats] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.stats)

    @property
    def num_batches(self) -> int:
        return max((s.num_batches for s in self.stats.values()), default=0)

    def merge(self, other: CalibrationStats, *, label: str = "statistics") -> CalibrationStats:
        """Add ``other``'s batches, in place; InputDataError if it is for another model or BN set."""
        if other.fingerprint != self.fingerprint:
            raise InputDataError(f"{label}: was computed for another model (fingerprint "
                                 f"{other.fingerprint[:12]}…, this model {self.fingerprint[:12]}…)")
        if other.names != self.names:
            raise InputDataError(f"{label}: is for the BatchNormalization nodes {list(other.names)}, "
                                 f"this model has {list(self.names)}")
        for name, mine in self.stats.items():
            theirs = other.stats[name]
            if theirs.num_channels != mine.num_channels:
                raise InputDataError(f"{label}: BatchNormalization {name!r} has {theirs.num_channels} channels, "
                                     f"this model {mine.num_channels}")
        for name, mine in self.stats.items():
            mine.merge(other.stats[name])
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics file atomically; returns the path."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format": np.asarray(FORMAT),
            "format_version": np.asarray(FORMAT_VERSION),
            "fingerprint": np.asarray(self.fingerprint),
            "names": np.asarray(list(self.names), dtype=str),
        }
        for i, stats in enumerate(self.stats.values()):
            for key, value in stats.state_dict().items():
                arrays[f"bn{i}.{key}"] = np.asarray(value)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read a file written by :meth:`save`; InputDataError (one line naming it) otherwise."""
        path = Path(path)
        if not path.is_file():
            raise InputDataError(f"{path}: no such statistics file")
        try:
            with np.load(path, allow_pickle=False) as data:
                state = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
            raise InputDataError(f"{path}: not a bnfold statistics file ({' '.join(str(exc).split())})") from exc
        if str(state.get("format", "")) != FORMAT:
            raise InputDataError(f"{path}: not a bnfold statistics file (no format {FORMAT!r})")
        if int(state.get("format_version", -1)) != FORMAT_VERSION:
            raise InputDataError(f"{path}: statistics format_version {state.get('format_version')}, "
                                 f"this bnfold reads {FORMAT_VERSION}")
        try:
            names = [str(n) for n in state["names"].reshape(-1)]
            stats = {}
            for i, name in enumerate(names):
                prefix = f"bn{i}."
                sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                stats[name] = PopulationStats.from_state_dict(sub)
            return cls(fingerprint=str(state["fingerprint"]), stats=stats)
        except (KeyError, ValueError) as exc:
            raise InputDataError(f"{path}: corrupt statistics file ({' '.join(str(exc).split())})") from exc
