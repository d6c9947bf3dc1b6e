"""The statistics graph: a copy of the model in which every BN normalizes with its batch statistics.

**Which BNs.** Every BatchNormalization of the main graph is *calibrated*: its mean and
variance inputs must be constants (initializers or Constant nodes, see
:class:`bnfold.graph.GraphIndex`), it must be in inference mode, and (opset ≤ 8) per channel.
Anything else is refused with an :class:`~bnfold.errors.UnsupportedModelError`: a
training-mode BN already normalizes with batch statistics and has no population statistics
to re-estimate; statistics that are graph inputs or computed values cannot be written back;
``spatial=0`` keeps per-position statistics, not per-channel ones. A BN inside a subgraph of
If/Loop/Scan or a model-local function is *skipped* (reported with its reason, statistics
left as they are): rewriting control flow to export per-iteration moments is not done, and
such a BN keeps normalizing with its stored statistics while the others are collected.

**The rewrite (explicit decomposition, not ``training_mode=1``).** Each calibrated BN
``Y = BN(X, γ, β, E, Var)`` is replaced by ::

    X3   = Reshape(X, [0, 0, -1])                  # [N, C, L], L = spatial size (1 for rank 2)
    X64  = Cast(X3, DOUBLE)
    μ    = ReduceMean(X64, axes=[0, 2])            # [1, C, 1]   batch mean
    D    = X64 − μ
    σ²   = ReduceMean(D·D, axes=[0, 2])            # [1, C, 1]   BIASED batch variance, two-pass
    Y    = Reshape(Cast(D · (γ / √(σ² + ε)) + β, T), Shape(X))

and μ, σ² and ``Shape(X3)`` (so m = N·L per channel comes from the actual batch) become extra
graph outputs. The downstream layers therefore see the activations they see in
training-mode normalization (precise BN), and the moments are float64 two-pass moments of the
activations as the model's dtype holds them — not E[x²] − E[x]², which cancels
catastrophically when |mean| ≫ std.

Why not BatchNormalization with ``training_mode=1, momentum=0`` (whose running outputs are
the batch mean and the biased batch variance in onnxruntime 1.31): it exists only from opset
14, onnxruntime implements it for float/double only and computes the moments in the model's
dtype, and its running-variance convention has changed between versions. The decomposition
uses ops every opset ≥ 7 has (ReduceMean's ``axes`` become an input at opset 18, handled),
works for float16/bfloat16/float/double activations, and each step can be read in the graph.
The normalization is computed in float64 and rounded once to the activation dtype, which can
differ from a float32 framework's training-mode output in the last bit; that is far below
the sampling noise of any statistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from bnfold.errors import UnsupportedModelError
from bnfold.graph import GraphIndex, NameSet, all_names, subgraphs

MIN_OPSET = 7  # numpy-style broadcasting of Add/Sub/Mul/Div; before it needs broadcast=1 attributes
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclass(frozen=True)
class BatchNormSite:
    """One calibrated BN of the main graph and the graph outputs that expose its moments."""

    name: str                 # unique node name (synthetic when the node has none)
    position: int             # index in model.graph.node
    num_channels: int
    epsilon: float
    old_mean: np.ndarray      # stored statistics, float64
    old_var: np.ndarray
    mean_output: str = ""     # output names in the statistics model
    var_output: str = ""
    shape_output: str = ""


@dataclass(frozen=True)
class SkippedBatchNorm:
    """A BN calibrate does not touch, and why."""

    name: str
    graph: str
    reason: str


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def main_index(model: onnx.ModelProto) -> GraphIndex:
    """A GraphIndex over the main graph, with onnx shape inference as the fallback for types."""
    cache: dict = {}

    def inferred() -> dict:
        if "types" not in cache:
            cache["types"] = {}
            try:
                graph = onnx.shape_inference.infer_shapes(model).graph
            except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
                return cache["types"]
            for v in (*graph.input, *graph.output, *graph.value_info):
                cache["types"].setdefault(v.name, v.type)
        return cache["types"]

    return GraphIndex(model.graph, path="", names=NameSet(all_names(model)), ir_version=model.ir_version,
                      inferred=inferred)


def _nested_batchnorms(model: onnx.ModelProto) -> list[SkippedBatchNorm]:
    """BNs inside subgraphs (If/Loop/Scan bodies) and model-local functions: skipped."""
    found: list[SkippedBatchNorm] = []
    why = "calibrate re-estimates main-graph BatchNormalization nodes only; its statistics are left as they are"

    def visit(nodes, where: str, reason: str) -> None:
        for k, node in enumerate(nodes):
            if where and _is_bn(node):  # where == "": the main graph, calibrated, not skipped
                found.append(SkippedBatchNorm(node.name or f"BatchNormalization_{k}", where, reason))
            for attr_name, graph in subgraphs(node):
                inner = f"{where + '/' if where else ''}{node.name or node.op_type}/{attr_name}"
                visit(graph.node, inner, f"inside a subgraph ({inner}): {why}")

    visit(model.graph.node, "", "")
    for function in model.functions:
        where = f"function:{function.domain}.{function.name}"
        visit(function.node, where, f"inside the model-local function {function.name!r}: {why}")
    return found


def find_batchnorms(model: onnx.ModelProto, *, source: str) -> tuple[list[BatchNormSite], list[SkippedBatchNorm]]:
    """The calibrated BNs of the main graph and the skipped nested ones; refusals raise.

    Raises:
        UnsupportedModelError: opset < 7, no BatchNormalization, a BN in training mode, with
            non-constant or non-per-channel statistics (one line naming ``source`` and the node).
    """
    opset = default_opset(model)
    index = main_index(model)
    sites: list[BatchNormSite] = []
    used_names: set[str] = set()
    for position, node in enumerate(model.graph.node):
        if not _is_bn(node):
            continue
        name = index.node_name(node)
        if name in used_names:  # node names need not be unique; stats files key on them
            name = f"{name}#{position}"
        used_names.add(name)
        where = f"{source}: BatchNormalization {name!r}"
        if opset < MIN_OPSET:
            raise UnsupportedModelError(f"{where}: opset {opset} is not supported by calibrate "
                                        f"(needs opset >= {MIN_OPSET})")
        reason = _training_mode(node, opset)
        if reason:
            raise UnsupportedModelError(f"{where}: is in training mode ({reason}); it normalizes with batch "
                                        "statistics and has no population statistics to re-estimate")
        if len(node.input) < 5 or not all(node.input[:5]):
            raise UnsupportedModelError(f"{where}: has inputs {list(node.input)}, expected X, scale, B, mean, var")
        if opset <= 8 and attr(node, "spatial", 1) == 0:
            raise UnsupportedModelError(f"{where}: spatial=0 keeps per-position statistics; calibrate "
                                        "estimates per-channel statistics only")
        values = []
        for label, slot in (("mean", 3), ("var", 4)):
            value = index.constant(node.input[slot])
            if value is None:
                raise UnsupportedModelError(f"{where}: its {label} is not a constant "
                                            f"({index.why_not_constant(node.input[slot])}); calibrate "
                                            "writes the statistics into constants")
            if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
                raise UnsupportedModelError(f"{where}: its {label} has dtype {value.dtype}, expected a float type")
            values.append(value)
        mean, var = values
        if mean.ndim != 1 or mean.shape != var.shape:
            raise UnsupportedModelError(f"{where}: mean/var have shapes {list(mean.shape)}/{list(var.shape)}, "
                                        "expected two per-channel vectors [C]")
        sites.append(BatchNormSite(
            name=name, position=position, num_channels=int(mean.shape[0]),
            epsilon=float(attr(node, "epsilon", 1e-5)),
            old_mean=mean.astype(np.float64), old_var=var.astype(np.float64),
        ))
    skipped = _nested_batchnorms(model)
    if not sites:
        what = f" ({len(skipped)} in subgraphs or functions, which calibrate skips)" if skipped else ""
        raise UnsupportedModelError(f"{source}: no BatchNormalization in the main graph to calibrate{what}")
    return sites, skipped


def _training_mode(node: onnx.NodeProto, opset: int) -> str | None:
    if opset >= 14 and attr(node, "training_mode", 0) == 1:
        return "training_mode=1"
    if opset <= 6 and attr(node, "is_test", 0) == 0:
        return "is_test=0"
    extra = [o for o in node.output[1:] if o]
    if extra and opset < 14:
        return f"opset {opset} with the training-mode outputs {extra}"
    return None


def build_stats_model(model: onnx.ModelProto, sites: list[BatchNormSite]) -> tuple[onnx.ModelProto, list[BatchNormSite]]:
    """A copy of ``model`` with each site rewritten as in the module docstring.

    Returns the statistics model and the sites with their output names filled in.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = default_opset(out)
    names = NameSet(all_names(out))
    index = main_index(out)
    graph = out.graph
    nodes = list(graph.node)
    replacement: dict[int, list[onnx.NodeProto]] = {}
    filled: list[BatchNormSite] = []

    def const(base: str, value: np.ndarray) -> str:
        name = names.fresh(base)
        graph.initializer.append(onnx.numpy_helper.from_array(value, name))
        if out.ir_version < 4:  # IR < 4: every initializer is also a graph input
            graph.input.append(helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                                             value.shape))
        return name

    reshape3 = const("calib_shape_n_c_rest", np.array([0, 0, -1], dtype=np.int64))
    per_channel = const("calib_shape_1_c_1", np.array([1, -1, 1], dtype=np.int64))
    axes = const("calib_axes_0_2", np.array([0, 2], dtype=np.int64)) if opset >= 18 else None

    for site in sites:
        node = nodes[site.position]
        x, scale, bias = node.input[0], node.input[1], node.input[2]
        elem = index.elem_type(x)
        if elem not in _FLOAT_TYPES:
            raise UnsupportedModelError(
                f"BatchNormalization {site.name!r}: the element type of its input {x!r} is "
                f"{'unknown' if not elem else TensorProto.DataType.Name(elem)}; calibrate needs a float input "
                "whose type the model declares or onnx shape inference finds")
        p = f"calib_{site.name}".replace("/", "_")
        n = {k: names.fresh(f"{p}_{k}") for k in
             ("x3", "x64", "mean", "d", "sq", "var", "var_eps", "std", "g64", "g3", "b64", "b3", "k", "dk",
              "y64", "y3", "shape_x", "shape3")}
        eps = const(f"{p}_epsilon", np.array(site.epsilon, dtype=np.float64))

        def make(op, inputs, outputs, **attrs):
            return helper.make_node(op, inputs, outputs, name=names.fresh(f"{p}_{op}"), **attrs)

        def reduce_mean(src, dst):
            if axes is not None:
                return make("ReduceMean", [src, axes], [dst], keepdims=1)
            return make("ReduceMean", [src], [dst], axes=[0, 2], keepdims=1)

        replacement[site.position] = [
            make("Reshape", [x, reshape3], [n["x3"]]),
            make("Cast", [n["x3"]], [n["x64"]], to=TensorProto.DOUBLE),
            reduce_mean(n["x64"], n["mean"]),
            make("Sub", [n["x64"], n["mean"]], [n["d"]]),
            make("Mul", [n["d"], n["d"]], [n["sq"]]),
            reduce_mean(n["sq"], n["var"]),
            make("Add", [n["var"], eps], [n["var_eps"]]),
            make("Sqrt", [n["var_eps"]], [n["std"]]),
            make("Cast", [scale], [n["g64"]], to=TensorProto.DOUBLE),
            make("Reshape", [n["g64"], per_channel], [n["g3"]]),
            make("Cast", [bias], [n["b64"]], to=TensorProto.DOUBLE),
            make("Reshape", [n["b64"], per_channel], [n["b3"]]),
            make("Div", [n["g3"], n["std"]], [n["k"]]),
            make("Mul", [n["d"], n["k"]], [n["dk"]]),
            make("Add", [n["dk"], n["b3"]], [n["y64"]]),
            make("Cast", [n["y64"]], [n["y3"]], to=elem),
            make("Shape", [x], [n["shape_x"]]),
            make("Reshape", [n["y3"], n["shape_x"]], [node.output[0]]),
            make("Shape", [n["x3"]], [n["shape3"]]),
        ]
        graph.output.extend([
            helper.make_tensor_value_info(n["mean"], TensorProto.DOUBLE, [1, site.num_channels, 1]),
            helper.make_tensor_value_info(n["var"], TensorProto.DOUBLE, [1, site.num_channels, 1]),
            helper.make_tensor_value_info(n["shape3"], TensorProto.INT64, [3]),
        ])
        filled.append(BatchNormSite(**{**site.__dict__, "mean_output": n["mean"], "var_output": n["var"],
                                       "shape_output": n["shape3"]}))

    rebuilt: list[onnx.NodeProto] = []
    for position, node in enumerate(nodes):
        rebuilt.extend(replacement.get(position, [node]))
    graph.ClearField("node")
    graph.node.extend(rebuilt)
    return out, filled
