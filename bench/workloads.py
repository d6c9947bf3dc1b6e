"""The benchmark's workload models, built with onnx.helper + NumPy, deterministic, cached.

Every workload is an *unfolded* inference graph (Conv/ConvTranspose/Gemm/MatMul → BN → …) at
opset 17 / IR 8, with seeded random weights whose scales keep activations O(1) through the
whole depth (He-initialised weights; BN variance ≈ the variance those weights produce, so each
BN is close to what calibration would give; small γ on the last BN of a residual branch), so
that the max-error columns of the bench measure rounding, not overflow.

Workloads (name → what it exercises):

* ``resnet50`` / ``resnet50-fp16``: ResNet-50-like (bottlenecks [3, 4, 6, 3], Conv→BN→Relu,
  53 BN, ~98 MiB in float32), and its float16 twin (the same random draws, rounded once).
* ``mobilenetv2``: MobileNetV2-like inverted residuals with depthwise (group = C) convolutions
  and Relu6 (Clip).
* ``mlp``: an MLP with BatchNorm1d after Gemm (transB 0 and 1) and after MatMul + Add.
* ``decoder``: a decoder of grouped ConvTranspose (groups 4, 2, 1) → BN → Relu.
* ``conv3d``: a 3-D conv net (one grouped Conv3d).
* ``wide-S`` / ``wide-M`` / ``wide-L``: a stack of 3×3 Conv(512→512)→BN→Relu layers, 8, 16
  and 32 of them (63, 135 and 280 MiB): three sizes to show how time and memory scale.
* ``wide-XL``: the same at width 1024 with 40 layers (1405 MiB = 1.47 GB), stored with
  external data. It is built by streaming each tensor to the data file as it is drawn, so
  building it needs about one layer of memory, not the model.

A built model lives in ``.cache/bench/<name>-v<BUILD_VERSION>/model.onnx`` (+ ``model.onnx.data``
for external data); the folder is written under a temporary name and renamed when complete, so
an interrupted build is rebuilt next time. Bump :data:`BUILD_VERSION` when a builder changes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BUILD_VERSION = 1
OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 loads IR ≤ 13; onnx 1.23 would default to 14
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"


class _Sink:
    """Where initializers go: into the model (``external=None``) or streamed to a data file."""

    def __init__(self, external: Path | None = None):
        self.external = external
        self._file = open(external, "wb") if external is not None else None  # noqa: SIM115
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        if self._file is None or array.nbytes < 1024:
            return numpy_helper.from_array(array, name)
        # Align every tensor to 4 KiB, like onnx's own writer, so readers can memory-map it.
        pad = -self.offset % 4096
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        self._file.write(data)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                        dims=list(array.shape), data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.external.name), ("offset", str(self.offset)),
                           ("length", str(len(data)))):
            t.external_data.add(key=key, value=value)
        self.offset += len(data)
        return t

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _Graph:
    """A tiny graph builder: each method appends nodes/initializers and returns the output name."""

    def __init__(self, dtype: np.dtype, seed: int, sink: _Sink):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.sink = sink
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0

    def _name(self, op: str) -> str:
        self._n += 1
        return f"{op.lower()}_{self._n}"

    def _init(self, name: str, array: np.ndarray) -> str:
        # Draws are float32 whatever the dtype: the fp16 twin is the fp32 model rounded once.
        self.inits.append(self.sink.tensor(name, array.astype(self.dtype)))
        return name

    def _normal(self, shape, std: float) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        name = self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int | tuple, *, stride=1, pad=None, group=1,
             bias=False, dims=2) -> str:
        ks = (k,) * dims if isinstance(k, int) else tuple(k)
        pads = [ki // 2 for ki in ks] * 2 if pad is None else [pad] * (2 * dims)
        fan_in = cin // group * int(np.prod(ks))
        w = self._init(self._name("W"), self._normal((cout, cin // group, *ks), np.sqrt(2.0 / fan_in)))
        inputs = [x, w]
        if bias:
            inputs.append(self._init(self._name("B"), self._normal((cout,), 0.05)))
        return self.node("Conv", inputs, kernel_shape=list(ks), strides=[stride] * dims, pads=pads,
                         group=group)

    def conv_transpose(self, x: str, cin: int, cout: int, k: int, *, stride=2, pad=1, group=1) -> str:
        fan_in = cin // group * k * k // (stride * stride)
        w = self._init(self._name("W"), self._normal((cin, cout // group, k, k), np.sqrt(2.0 / fan_in)))
        b = self._init(self._name("B"), self._normal((cout,), 0.05))
        return self.node("ConvTranspose", [x, w, b], kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4, group=group)

    def bn(self, x: str, c: int, *, gamma=(0.8, 1.2)) -> str:
        r = self.rng
        params = [
            r.uniform(*gamma, c).astype(np.float32),          # scale γ
            self._normal((c,), 0.1),                            # bias β
            self._normal((c,), 0.05),                           # mean
            r.uniform(0.8, 1.2, c).astype(np.float32),         # var
        ]
        names = [self._init(self._name(p), v) for p, v in zip(("gamma", "beta", "mean", "var"), params)]
        return self.node("BatchNormalization", [x, *names], epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def relu6(self, x: str) -> str:
        lo = self._init(self._name("zero"), np.zeros((), np.float32))
        hi = self._init(self._name("six"), np.full((), 6.0, np.float32))
        return self.node("Clip", [x, lo, hi])

    def gemm(self, x: str, fin: int, fout: int, *, trans_b=0, bias=True) -> str:
        shape = (fout, fin) if trans_b else (fin, fout)
        inputs = [x, self._init(self._name("W"), self._normal(shape, np.sqrt(2.0 / fin)))]
        if bias:
            inputs.append(self._init(self._name("B"), self._normal((fout,), 0.05)))
        return self.node("Gemm", inputs, transB=trans_b)

    def matmul_add(self, x: str, fin: int, fout: int) -> str:
        w = self._init(self._name("W"), self._normal((fin, fout), np.sqrt(2.0 / fin)))
        y = self.node("MatMul", [x, w])
        return self.node("Add", [y, self._init(self._name("B"), self._normal((fout,), 0.05))])

    def head(self, x: str, c: int, classes: int) -> str:
        x = self.node("GlobalAveragePool", [x])
        x = self.node("Flatten", [x], axis=1)
        return self.gemm(x, c, classes)

    def model(self, name: str, x_shape, y: str, y_shape) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes.append(helper.make_node("Identity", [y], ["output"], name="output_identity"))
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info("input", elem, list(x_shape))],
            [helper.make_tensor_value_info("output", elem, list(y_shape))], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                 ir_version=IR_VERSION, producer_name="bnfold-bench")


# ---------------------------------------------------------------------------------------------
# Builders: (dtype, sink) -> ModelProto


def resnet50(dtype=np.float32, sink: _Sink | None = None, *, size: int = 224) -> onnx.ModelProto:
    g = _Graph(dtype, seed=50, sink=sink or _Sink())
    x = g.relu(g.bn(g.conv("input", 3, 64, 7, stride=2), 64))
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        cout = width * 4
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            y = g.relu(g.bn(g.conv(x, cin, width, 1), width))
            y = g.relu(g.bn(g.conv(y, width, width, 3, stride=stride), width))
            y = g.bn(g.conv(y, width, cout, 1), cout, gamma=(0.2, 0.4))
            skip = g.bn(g.conv(x, cin, cout, 1, stride=stride), cout) if b == 0 else x
            x = g.relu(g.node("Add", [y, skip]))
            cin = cout
    return g.model("resnet50_like", [1, 3, size, size], g.head(x, 2048, 1000), [1, 1000])


def mobilenetv2(dtype=np.float32, sink: _Sink | None = None) -> onnx.ModelProto:
    g = _Graph(dtype, seed=2, sink=sink or _Sink())
    x = g.relu6(g.bn(g.conv("input", 3, 32, 3, stride=2), 32))
    cin = 32
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x
            if t != 1:
                y = g.relu6(g.bn(g.conv(y, cin, hidden, 1), hidden))
            y = g.relu6(g.bn(g.conv(y, hidden, hidden, 3, stride=stride, group=hidden), hidden))
            y = g.bn(g.conv(y, hidden, c, 1), c, gamma=(0.3, 0.6))
            x = g.node("Add", [x, y]) if (stride == 1 and cin == c) else y
            cin = c
    x = g.relu6(g.bn(g.conv(x, 320, 1280, 1), 1280))
    return g.model("mobilenetv2_like", [1, 3, 224, 224], g.head(x, 1280, 1000), [1, 1000])


def mlp(dtype=np.float32, sink: _Sink | None = None, *, batch: int = 32) -> onnx.ModelProto:
    g = _Graph(dtype, seed=1, sink=sink or _Sink())
    x = g.relu(g.bn(g.gemm("input", 512, 1024), 1024))
    x = g.relu(g.bn(g.gemm(x, 1024, 1024, trans_b=1), 1024))
    x = g.relu(g.bn(g.matmul_add(x, 1024, 1024), 1024))
    x = g.relu(g.bn(g.gemm(x, 1024, 512, bias=False), 512))
    y = g.gemm(x, 512, 10)
    return g.model("mlp_bn1d", [batch, 512], y, [batch, 10])


def decoder(dtype=np.float32, sink: _Sink | None = None) -> onnx.ModelProto:
    g = _Graph(dtype, seed=4, sink=sink or _Sink())
    x, c, hw = "input", 256, 8
    for cout, group in ((128, 4), (64, 2), (32, 1)):
        x = g.relu(g.bn(g.conv_transpose(x, c, cout, 4, group=group), cout))
        c, hw = cout, hw * 2
    y = g.node("Sigmoid", [g.conv(x, 32, 3, 3, bias=True)])
    return g.model("decoder_grouped_convtranspose", [1, 256, 8, 8], y, [1, 3, hw, hw])


def conv3d(dtype=np.float32, sink: _Sink | None = None) -> onnx.ModelProto:
    g = _Graph(dtype, seed=3, sink=sink or _Sink())
    x = g.relu(g.bn(g.conv("input", 3, 32, 3, dims=3), 32))
    x = g.relu(g.bn(g.conv(x, 32, 64, 3, stride=2, dims=3), 64))
    x = g.relu(g.bn(g.conv(x, 64, 64, 3, group=2, dims=3), 64))
    x = g.relu(g.bn(g.conv(x, 64, 128, 3, stride=2, dims=3, bias=True), 128))
    return g.model("conv3d_net", [1, 3, 16, 32, 32], g.head(x, 128, 10), [1, 10])


def wide(layers: int, width: int = 512, dtype=np.float32, sink: _Sink | None = None) -> onnx.ModelProto:
    g = _Graph(dtype, seed=7, sink=sink or _Sink())
    x = g.relu(g.bn(g.conv("input", 16, width, 3), width))
    for _ in range(layers - 1):
        x = g.relu(g.bn(g.conv(x, width, width, 3), width))
    return g.model(f"wide_{width}x{layers}", [1, 16, 4, 4], g.head(x, width, 10), [1, 10])


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    build: Callable[[_Sink], onnx.ModelProto]
    external_data: bool = False
    large: bool = False        # left out by --skip-large
    dtype: str = "float32"     # the model's float type (some tools run only on float16/bfloat16)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("resnet50", "ResNet-50-like fp32, 53 BN", lambda s: resnet50(np.float32, s)),
    Workload("resnet50-fp16", "ResNet-50-like fp16 twin", lambda s: resnet50(np.float16, s), dtype="float16"),
    Workload("mobilenetv2", "MobileNetV2-like, depthwise", lambda s: mobilenetv2(np.float32, s)),
    Workload("mlp", "MLP, Gemm/MatMul + BatchNorm1d", lambda s: mlp(np.float32, s)),
    Workload("decoder", "grouped ConvTranspose decoder", lambda s: decoder(np.float32, s)),
    Workload("conv3d", "3-D conv net", lambda s: conv3d(np.float32, s)),
    Workload("wide-S", "wide 512ch x 8 layers", lambda s: wide(8, sink=s)),
    Workload("wide-M", "wide 512ch x 16 layers", lambda s: wide(16, sink=s)),
    Workload("wide-L", "wide 512ch x 32 layers", lambda s: wide(32, sink=s)),
    Workload("wide-XL", "wide 1024ch x 40 layers, external data", lambda s: wide(40, 1024, sink=s),
             external_data=True, large=True),
]}

#: Small stand-ins for ``--quick`` and the harness tests (same shapes of graph, tiny tensors).
QUICK_WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("tiny-resnet", "ResNet-like, 3 BN", lambda s: _tiny_resnet(s)),
    Workload("tiny-resnet-fp16", "ResNet-like, 3 BN, float16", lambda s: _tiny_resnet(s, np.float16),
             dtype="float16"),
    Workload("tiny-wide-ext", "wide 32ch x 3, external data", lambda s: wide(3, 32, sink=s),
             external_data=True),
]}


def _tiny_resnet(sink: _Sink, dtype=np.float32) -> onnx.ModelProto:
    g = _Graph(dtype, seed=9, sink=sink)
    x = g.relu(g.bn(g.conv("input", 3, 8, 3), 8))
    y = g.relu(g.bn(g.conv(x, 8, 8, 3), 8))
    x = g.relu(g.node("Add", [g.bn(g.conv(y, 8, 8, 1), 8, gamma=(0.2, 0.4)), x]))
    return g.model("tiny_resnet", [1, 3, 8, 8], g.head(x, 8, 4), [1, 4])


def lookup(name: str) -> Workload:
    if name in WORKLOADS:
        return WORKLOADS[name]
    if name in QUICK_WORKLOADS:
        return QUICK_WORKLOADS[name]
    raise KeyError(name)


def model_path(workload: Workload, cache: Path = DEFAULT_CACHE) -> Path:
    """The cached model file of ``workload``, built first if missing."""
    folder = Path(cache) / f"{workload.name}-v{BUILD_VERSION}"
    path = folder / "model.onnx"
    if path.is_file():
        return path
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        sink = _Sink(staging / "model.onnx.data" if workload.external_data else None)
        try:
            model = workload.build(sink)
        finally:
            sink.close()
        onnx.save_model(model, str(staging / "model.onnx"))
        if folder.exists():  # a concurrent builder won; theirs is as good as ours
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path

