"""The inputs a check feeds both models: seeded random data or the user's own files.

**Signature.** A model's inputs are its graph inputs that are not initializers (IR < 4 models
list initializers as inputs; those keep their stored values). Each has an element type and a
shape whose dimensions are numbers, symbolic names (``"batch"``) or unknown.

**Dynamic dimensions.** A symbolic dimension takes its size from ``dims`` (``{"batch": 8}``,
``--dim batch=8``); the same name gets the same size in every input. Otherwise a dynamic first
axis is 1 (it is the batch axis in almost every model, and 1 is the cheapest valid batch) and
any other dynamic axis is 8 (big enough for a 3×3 convolution with stride 2 to keep a spatial
extent, small enough to stay fast). A symbol shared by several inputs takes the default of the
place it first appears, in graph order. A ``dims`` name that no input uses is a usage error
(a typo would otherwise be silently ignored).

**Random values** (numpy ``default_rng(seed)``, drawn sample by sample, input by input in
graph order, so a seed reproduces the exact data):

* floating types: standard normal, N(0, 1), rounded once to the input dtype — the range of
  normalized images and activations, both signs, so every ReLU and BN branch is exercised;
* integer types: uniform on {0, …, 7} — integer inputs are indices, lengths or shape values
  in practice; small non-negative values are valid for any gather/embedding table of 8 rows
  or more and never produce huge shapes (give real data with ``inputs`` otherwise);
* bool: fair coin.

**User files.**

* ``.npz`` (``numpy.savez``): one array per input, keyed by the input's name. An array whose
  rank is the input's rank is one sample; an array with one extra *leading* axis holds
  several samples (``x[i]`` is sample ``i``), and every input must then have the same count.
* A folder in onnx's test-data layout: ``input_0.pb``, ``input_1.pb``, … (serialized
  TensorProto, one sample), or ``test_data_set_0/``, ``test_data_set_1/``, … each holding such
  files (one sample per folder). A tensor's ``name`` field picks its input; unnamed tensors
  go by position (``input_i`` is the i-th non-initializer graph input).

User data must match the model exactly: every input present, no unknown name, the exact
dtype (nothing is cast silently) and the model's rank and fixed dimensions; otherwise an
:class:`~bnfold.errors.InputDataError` names the input, what the model expects and what was
given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import InputDataError, UnsupportedModelError, UsageError

DEFAULT_BATCH_DIM = 1
DEFAULT_OTHER_DIM = 8
INT_HIGH = 8  # random integers are drawn from {0, ..., INT_HIGH - 1}

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, element type, and shape (None: rank unknown)."""

    name: str
    elem_type: int
    shape: tuple[Dim, ...] | None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def type_name(self) -> str:
        return "bfloat16" if self.dtype == np.dtype(ml_dtypes.bfloat16) else self.dtype.name

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.type_name} of any shape"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.type_name} [{dims}]"


def _spec(value_info: onnx.ValueInfoProto, what: str) -> TensorSpec:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        raise UnsupportedModelError(
            f"{what} {value_info.name!r} is a {kind or 'value of unknown type'}; bnfold check "
            "compares tensor inputs and outputs only"
        )
    tt = value_info.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    return TensorSpec(value_info.name, tt.elem_type, shape)


def model_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    initialized = {t.name for t in model.graph.initializer} | {
        t.values.name for t in model.graph.sparse_initializer
    }
    return [_spec(v, "input") for v in model.graph.input if v.name not in initialized]


def model_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(v, "output") for v in model.graph.output]


def _symbolic_names(specs: list[TensorSpec]) -> set[str]:
    return {d for s in specs if s.shape for d in s.shape if isinstance(d, str)}


def concrete_shape(spec: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
    """The shape random data for ``spec`` gets (see "Dynamic dimensions" above); ``dims`` must
    already hold every symbol's size (:func:`default_dims` fills the defaults)."""
    if spec.shape is None:
        raise InputDataError(
            f"input {spec.name!r} has no shape in the model; give input data with --inputs"
        )
    out = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and d in dims:
            out.append(int(dims[d]))
        else:
            out.append(DEFAULT_BATCH_DIM if axis == 0 else DEFAULT_OTHER_DIM)
    return tuple(out)


def default_dims(specs: list[TensorSpec], dims: dict[str, int]) -> dict[str, int]:
    """``dims`` plus a default for every other symbol, decided where it first appears (first
    axis → 1, else 8), so a symbol shared by several inputs gets one size."""
    out = dict(dims)
    for spec in specs:
        for axis, d in enumerate(spec.shape or ()):
            if isinstance(d, str) and d not in out:
                out[d] = DEFAULT_BATCH_DIM if axis == 0 else DEFAULT_OTHER_DIM
    return out


def check_dims(dims: dict[str, int] | None, specs: list[TensorSpec]) -> dict[str, int]:
    """Validate user ``dims``: positive sizes, names that some input uses."""
    dims = dict(dims or {})
    known = _symbolic_names(specs)
    for name, size in dims.items():
        if name not in known:
            names = ", ".join(sorted(known)) or "none"
            raise UsageError(f"--dim {name}: no input has a dimension named {name!r} "
                             f"(dynamic dimensions: {names})")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise UsageError(f"--dim {name}={size}: the size must be a positive integer")
    return dims


def random_inputs(specs: list[TensorSpec], *, samples: int = 1, seed: int = 0,
                  dims: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """``samples`` feeds of seeded random data for ``specs`` (see the module docstring)."""
    dims = default_dims(specs, check_dims(dims, specs))
    shapes = {s.name: concrete_shape(s, dims) for s in specs}
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        feed = {}
        for spec in specs:
            feed[spec.name] = _random_array(rng, spec, shapes[spec.name])
        feeds.append(feed)
    return feeds


def _random_array(rng: np.random.Generator, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    dtype = spec.dtype
    if dtype == np.dtype(ml_dtypes.bfloat16) or np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    raise InputDataError(
        f"input {spec.name!r} is {spec.type_name}; bnfold cannot make random data of that type, "
        "give input data with --inputs"
    )


# --- user data -------------------------------------------------------------------------------

def load_inputs(path: str | os.PathLike, specs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
    """Samples from a ``.npz`` file or an onnx test-data folder, checked against ``specs``."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"{path}: no such file or folder")
    samples = _load_folder(path, specs) if path.is_dir() else _load_npz(path, specs)
    check_inputs(samples, specs, source=str(path))
    return samples


def _load_npz(path: Path, specs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InputDataError(f"{path}: cannot read as .npz: {' '.join(str(exc).split())}") from exc
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise InputDataError(f"{path}: not an .npz file ({type(exc).__name__}: {exc})") from exc
    _check_names(path, arrays, specs)
    counts = {}
    for spec in specs:
        arr = arrays[spec.name]
        rank = None if spec.shape is None else len(spec.shape)
        if rank is not None and arr.ndim == rank + 1:
            counts[spec.name] = arr.shape[0]
        elif rank is None or arr.ndim == rank:
            counts[spec.name] = None  # one sample
        else:
            raise InputDataError(
                f"{path}: input {spec.name!r} expects {spec.describe()} (or a leading sample axis), "
                f"got {arr.dtype} {list(arr.shape)}"
            )
    stacked = {n: c for n, c in counts.items() if c is not None}
    if stacked and len(stacked) != len(counts):
        single = sorted(n for n, c in counts.items() if c is None)
        raise InputDataError(f"{path}: inputs {sorted(stacked)} have a sample axis but {single} do not")
    if len(set(stacked.values())) > 1:
        raise InputDataError(f"{path}: inputs have different sample counts: {stacked}")
    if not stacked:
        return [{s.name: arrays[s.name] for s in specs}]
    n = next(iter(stacked.values()))
    if n == 0:
        raise InputDataError(f"{path}: the sample axis is empty (0 samples)")
    return [{s.name: arrays[s.name][i] for s in specs} for i in range(n)]


def _check_names(source, given: dict, specs: list[TensorSpec]) -> None:
    expected = [s.name for s in specs]
    for name in given:
        if name not in expected:
            raise InputDataError(f"{source}: {name!r} is not an input of the model "
                                 f"(inputs: {', '.join(expected)})")
    for name in expected:
        if name not in given:
            raise InputDataError(f"{source}: no data for input {name!r} "
                                 f"(given: {', '.join(given) or 'nothing'})")


_PB = re.compile(r"input_(\d+)\.pb$")


def _load_folder(path: Path, specs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
    if any(_PB.match(p.name) for p in path.iterdir()):
        folders = [path]
    else:
        folders = sorted((p for p in path.iterdir() if p.is_dir() and p.name.startswith("test_data_set_")),
                         key=lambda p: (len(p.name), p.name))
    if not folders:
        raise InputDataError(f"{path}: no input_*.pb files and no test_data_set_* folders")
    return [_load_pb_sample(folder, specs) for folder in folders]


def _load_pb_sample(folder: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    files = sorted((p for p in folder.iterdir() if _PB.match(p.name)),
                   key=lambda p: int(_PB.match(p.name).group(1)))
    if not files:
        raise InputDataError(f"{folder}: no input_*.pb files")
    names = [s.name for s in specs]
    sample: dict[str, np.ndarray] = {}
    for f in files:
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(f.read_bytes())
            array = numpy_helper.to_array(tensor)
        except Exception as exc:  # protobuf DecodeError, unsupported types
            raise InputDataError(f"{f}: not a serialized ONNX TensorProto ({exc})") from exc
        position = int(_PB.match(f.name).group(1))
        if tensor.name:
            name = tensor.name
        elif position < len(names):
            name = names[position]
        else:
            raise InputDataError(f"{f}: the model has only {len(names)} inputs")
        sample[name] = array
    _check_names(folder, sample, specs)
    return sample


def check_inputs(samples: list[dict[str, np.ndarray]], specs: list[TensorSpec], *, source: str) -> None:
    """Every sample feeds every input with the exact dtype and a shape the model accepts."""
    for i, sample in enumerate(samples):
        where = f"{source}" + (f" (sample {i})" if len(samples) > 1 else "")
        _check_names(where, sample, specs)
        symbols: dict[str, int] = {}
        for spec in specs:
            arr = np.asarray(sample[spec.name])
            if arr.dtype != spec.dtype:
                raise InputDataError(f"{where}: input {spec.name!r} expects {spec.describe()}, "
                                     f"got {_name(arr.dtype)} {list(arr.shape)}")
            if spec.shape is None:
                continue
            bad = arr.ndim != len(spec.shape)
            for d, n in zip(spec.shape, arr.shape):
                if isinstance(d, int) and d > 0 and d != n:
                    bad = True
                elif isinstance(d, str):
                    if symbols.setdefault(d, n) != n:
                        raise InputDataError(
                            f"{where}: input {spec.name!r} dimension {d!r} is {n}, but another input "
                            f"has {d!r} = {symbols[d]}")
            if bad:
                raise InputDataError(f"{where}: input {spec.name!r} expects {spec.describe()}, "
                                     f"got {_name(arr.dtype)} {list(arr.shape)}")


def _name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name
