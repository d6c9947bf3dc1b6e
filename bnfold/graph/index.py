"""A small, mutable index over ONE graph body (a GraphProto or a FunctionProto).

It answers what the passes ask — who produces a name, who consumes it (subgraphs that use
a name from this scope count as consumers), is it a constant and what is its value, what
is its element type and rank — and performs the few edits they need: write a folded
weight, remove or insert nodes, rename an output. Nothing is converted to NumPy unless a
pass asks for that value, and a tensor is replaced in place (same slot, new TensorProto)
only when the node being folded is its sole user; otherwise a copy is written under a
fresh name, so a weight shared by several nodes is never changed under another user.

Constants follow onnxruntime: an initializer that is also a graph input can be overridden
at run time, so it is a constant only when the model's IR version is < 4 or the caller
says ``inputs_as_constants``. A name a subgraph takes from an enclosing scope is resolved
there; a name defined in more than one enclosing scope is ambiguous and not a constant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from bnfold.graph.constants import EVALUABLE_OPS, constant_node_value, evaluate, make_tensor, tensor_value
from bnfold.graph.walk import free_names, subgraphs

# Ops whose first output has its first input's rank and element type.
_SAME_SHAPE_OPS = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Identity", "Dropout", "Elu", "Selu",
     "HardSigmoid", "HardSwish", "Softplus", "BatchNormalization", "Neg", "Abs", "Exp", "Sqrt"}
)


class NameSet:
    """Every name used anywhere in the model, so generated names never collide or shadow."""

    def __init__(self, names: Iterable[str] = ()):
        self._used = set(names)

    def add(self, name: str) -> None:
        self._used.add(name)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name


class GraphIndex:
    """Producers, consumers, constants and types of one graph body; the edits passes make.

    ``outer`` is the index of the enclosing graph (for subgraphs); ``inferred`` a lazy map of
    onnx-shape-inferred types, consulted only when nothing local tells a rank or dtype.
    Edits keep the producer/consumer maps current; :meth:`finalize` writes the body back.
    """

    def __init__(
        self,
        proto: onnx.GraphProto | onnx.FunctionProto,
        *,
        path: str,
        names: NameSet,
        ir_version: int,
        inputs_as_constants: bool = False,
        outer: GraphIndex | None = None,
        inferred: Callable[[], dict[str, onnx.TypeProto]] | None = None,
        tensors=None,
    ):
        self.proto = proto
        # Streamed folds (bnfold.stream): reads external/placeholder tensors and builds folded
        # ones (``load(tensor)``, ``make(name, value)``). None: external data is not a constant.
        self.tensors = tensors
        self.path = path
        self.names = names
        self.outer = outer
        self.is_function = isinstance(proto, onnx.FunctionProto)
        self.inputs_as_constants = inputs_as_constants
        self.ir_version = ir_version
        self._inferred = inferred
        self.nodes: list[onnx.NodeProto] = list(proto.node)
        self._synthetic = {id(n): f"{n.op_type}_{i}" for i, n in enumerate(self.nodes) if not n.name}
        self._order = {id(n): i for i, n in enumerate(self.nodes)}
        # Nodes carrying subgraphs (never created by a pass): their outer-scope references.
        self._with_subgraphs = {id(n) for n in self.nodes if any(True for _ in subgraphs(n))}
        self._free: dict[int, list[str]] = {}
        if self.is_function:
            self.initializers: dict[str, onnx.TensorProto] = {}
            self.inputs = set(proto.input)
            self.outputs = list(proto.output)
            self.value_types: dict[str, onnx.TypeProto] = {}
        else:
            self.initializers = {t.name: t for t in proto.initializer}
            self.inputs = {v.name for v in proto.input}
            self.outputs = [v.name for v in proto.output]
            self.value_types = {v.name: v.type for v in (*proto.input, *proto.output, *proto.value_info)}
        self.output_set = set(self.outputs)
        self.maybe_dead: set[str] = set()
        self.removed_names: set[str] = set()
        self.rescan_subgraphs()

    # ---- structure -------------------------------------------------------------------
    def rescan_subgraphs(self) -> None:
        """Recompute the outer-scope names of subgraphs (after they were processed)."""
        self._free = {id(n): sorted(free_names(n)) for n in self.nodes if id(n) in self._with_subgraphs}
        self.refresh()

    def refresh(self) -> None:
        """Rebuild producer/consumer maps after an edit (cheap: one pass over the nodes)."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self._const_cache: dict[str, np.ndarray | None] = {}
        for node in self.nodes:
            self._link(node)

    def _uses(self, node: onnx.NodeProto) -> list[str]:
        used = [n for n in node.input if n]
        if id(node) in self._with_subgraphs:
            used += self._free.get(id(node), [])
        return list(dict.fromkeys(used))

    def _link(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if name:
                self.producer[name] = node
        for name in self._uses(node):
            self.consumers.setdefault(name, []).append(node)

    def _unlink(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if name and self.producer.get(name) is node:
                del self.producer[name]
        for name in self._uses(node):
            users = [c for c in self.consumers.get(name, []) if c is not node]
            if users:
                self.consumers[name] = users
            else:
                self.consumers.pop(name, None)

    def node_name(self, node: onnx.NodeProto) -> str:
        return node.name or self._synthetic.get(id(node)) or f"{node.op_type}_{id(node)}"

    def position(self, node: onnx.NodeProto) -> int:
        """Index of ``node`` in the working list, by identity (protobuf == compares contents)."""
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise ValueError(f"node {self.node_name(node)!r} is not in graph {self.path!r}")

    def alive(self, node: onnx.NodeProto) -> bool:
        return any(n is node for n in self.nodes)

    def order_of(self, node: onnx.NodeProto) -> int:
        return self._order.get(id(node), len(self._order))

    def producer_of(self, name: str) -> onnx.NodeProto | None:
        return self.producer.get(name)

    def consumers_of(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def is_output(self, name: str) -> bool:
        return name in self.output_set

    def defines(self, name: str) -> bool:
        return name in self.producer or name in self.inputs or name in self.initializers

    # ---- constants -------------------------------------------------------------------
    def _outer_scope(self, name: str) -> tuple[GraphIndex | None, str | None]:
        """The enclosing scope that defines ``name``, or (None, reason)."""
        found = []
        scope = self.outer
        while scope is not None:
            if scope.defines(name):
                found.append(scope)
            scope = scope.outer
        if len(found) > 1:
            return None, f"outer-scope name {name!r} is defined in several enclosing scopes (ambiguous)"
        return (found[0], None) if found else (None, None)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant (see module docstring), else None."""
        if name in self._const_cache:
            return self._const_cache[name]
        value = self._constant(name)
        self._const_cache[name] = value
        return value

    def _constant(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.initializers:
            if name in self.inputs and not (self.ir_version < 4 or self.inputs_as_constants):
                return None
            if self.initializers[name].data_location == onnx.TensorProto.EXTERNAL:
                # its bytes were not loaded, unless a streamed fold can read them
                return None if self.tensors is None else self.tensors.load(self.initializers[name])
            return tensor_value(self.initializers[name])
        node = self.producer.get(name)
        if node is not None:
            if node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type == "Constant":
                return constant_node_value(node)
            if node.op_type in EVALUABLE_OPS and node.output[0] == name:
                values = [self.constant(i) for i in node.input if i]
                if any(v is None for v in values):
                    return None
                try:
                    return evaluate(node, values)
                except (ValueError, TypeError, IndexError):
                    return None
            return None
        if name in self.inputs:
            return None
        scope, _ = self._outer_scope(name)
        return scope.constant(name) if scope is not None else None

    def why_not_constant(self, name: str) -> str:
        """A human reason ``name`` is not a constant (call when :meth:`constant` gave None)."""
        if not name:
            return "is absent"
        if (name in self.initializers and self.tensors is None
                and self.initializers[name].data_location == onnx.TensorProto.EXTERNAL):
            return f"{name!r} is stored in external data that was not loaded (pass the model's path instead)"
        if name in self.initializers and name in self.inputs:
            return (f"{name!r} is an initializer that is also a graph input (overridable at run time; "
                    "use inputs_as_constants to treat it as a constant)")
        node = self.producer.get(name)
        if node is not None:
            return f"{name!r} is computed by {node.op_type} {self.node_name(node)!r}"
        if name in self.inputs:
            return f"{name!r} is a {'function' if self.is_function else 'graph'} input"
        scope, reason = self._outer_scope(name)
        if reason:
            return reason
        if scope is not None:
            return f"outer-scope {scope.why_not_constant(name)}"
        return f"{name!r} is not defined"

    # ---- types -----------------------------------------------------------------------
    def _type(self, name: str) -> onnx.TypeProto | None:
        t = self.value_types.get(name)
        if t is not None and t.HasField("tensor_type"):
            return t
        if self._inferred is not None:
            t = self._inferred().get(name)
            if t is not None and t.HasField("tensor_type"):
                return t
        return None

    def elem_type(self, name: str) -> int | None:
        """TensorProto element type of ``name``; None when it cannot be known."""
        t = self.value_types.get(name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            return t.tensor_type.elem_type
        if name in self.initializers:
            return self.initializers[name].data_type
        node = self.producer.get(name)
        if node is not None and node.output[0] == name:
            if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
                found = self.elem_type(node.input[1])
                if found:
                    return found
            if node.op_type in _SAME_SHAPE_OPS or node.op_type in ("Mul", "Add"):
                found = self.elem_type(node.input[0])
                if found:
                    return found
            if node.op_type == "Constant":
                value = self.constant(name)
                if value is not None:
                    return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        elif node is None and name not in self.inputs:
            scope, _ = self._outer_scope(name)
            if scope is not None:
                return scope.elem_type(name)
        t = self._type(name)
        return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else None

    def rank(self, name: str) -> int | None:
        """Rank of ``name``; None when it cannot be known."""
        t = self.value_types.get(name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
            return len(t.tensor_type.shape.dim)
        if name in self.initializers:
            return len(self.initializers[name].dims)
        node = self.producer.get(name)
        if node is not None and node.output[0] == name:
            op = node.op_type
            if op in ("Conv", "ConvTranspose") and len(node.input) > 1:
                found = self.rank(node.input[1])
                if found:
                    return found
            if op == "Gemm":
                return 2
            if op == "MatMul":
                ra, rb = self.rank(node.input[0]), self.rank(node.input[1])
                if ra is not None and rb is not None:
                    if ra >= 2 and rb >= 2:
                        return max(ra, rb)
                    if ra == 1 and rb >= 2:
                        return rb - 1
                    if rb == 1:
                        return ra - 1
            if op in _SAME_SHAPE_OPS:
                found = self.rank(node.input[0])
                if found is not None:
                    return found
            if op == "Constant":
                value = self.constant(name)
                if value is not None:
                    return value.ndim
        elif node is None and name not in self.inputs:
            scope, _ = self._outer_scope(name)
            if scope is not None:
                return scope.rank(name)
        t = self._type(name)
        if t is not None and t.tensor_type.HasField("shape"):
            return len(t.tensor_type.shape.dim)
        return None

    def static_shape(self, name: str) -> list[int | None] | None:
        """Known dimensions of ``name`` (None per symbolic dim), or None when even the rank is unknown."""
        t = self._type(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]

    def weight_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a constant without converting an initializer to NumPy."""
        if name in self.initializers and self.constant_is_initializer(name):
            return tuple(self.initializers[name].dims)
        value = self.constant(name)
        return None if value is None else value.shape

    def constant_is_initializer(self, name: str) -> bool:
        return name in self.initializers and (
            name not in self.inputs or self.ir_version < 4 or self.inputs_as_constants
        )

    # ---- edits -----------------------------------------------------------------------
    def _sole_user(self, node: onnx.NodeProto, name: str) -> bool:
        return (
            name in self.initializers
            and (name not in self.inputs or self.ir_version < 4)
            and name not in self.output_set
            and self.consumers_of(name) == [node]
            and list(node.input).count(name) == 1
        )

    def write_input(self, node: onnx.NodeProto, slot: int, value: np.ndarray, base: str) -> None:
        """Make input ``slot`` of ``node`` the constant ``value`` (see module docstring)."""
        name = node.input[slot] if slot < len(node.input) else ""
        if name and self._sole_user(node, name):
            self.initializers[name].CopyFrom(self._make_tensor(name, value))
            self._const_cache.pop(name, None)
            return
        new = self.names.fresh(base)
        tensor = self._make_tensor(new, value)
        if self.is_function:
            const = onnx.helper.make_node("Constant", [], [new], name=self.names.fresh(f"{new}_const"), value=tensor)
            self.insert_before(node, [const])
        else:
            self._add_initializer(tensor)
        self.set_input(node, slot, new)

    def add_constant(self, value: np.ndarray, base: str, before: onnx.NodeProto) -> str:
        """A new constant tensor (initializer, or Constant node in a function body)."""
        new = self.names.fresh(base)
        tensor = self._make_tensor(new, value)
        if self.is_function:
            const = onnx.helper.make_node("Constant", [], [new], name=self.names.fresh(f"{new}_const"), value=tensor)
            self.insert_before(before, [const])
        else:
            self._add_initializer(tensor)
        return new

    def _make_tensor(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        # Only main-graph initializers may be placeholders (the streamed writer splices them).
        if self.tensors is not None and not self.is_function and self.outer is None:
            return self.tensors.make(name, value)
        return make_tensor(name, value)

    def _add_initializer(self, tensor: onnx.TensorProto) -> None:
        added = self.proto.initializer.add()
        added.CopyFrom(tensor)
        self.initializers[tensor.name] = added
        if self.ir_version < 4:
            # IR < 4: every initializer must also be declared as a graph input.
            self.proto.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
            self.inputs.add(tensor.name)

    def set_input(self, node: onnx.NodeProto, slot: int, name: str) -> None:
        """Rewire input ``slot`` of ``node`` (appending empty optional inputs as needed)."""
        self._unlink(node)
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        node.input[slot] = name
        self._link(node)
        if old:
            self.maybe_dead.add(old)

    def insert_before(self, ref: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        at = self.position(ref)
        self.nodes[at:at] = new
        for node in new:
            self._link(node)

    def remove_nodes(self, nodes: Iterable[onnx.NodeProto]) -> None:
        gone = {id(n) for n in nodes}
        for node in self.nodes:
            if id(node) in gone:
                self._unlink(node)
                self.removed_names.update(o for o in node.output if o)
                self.maybe_dead.update(i for i in node.input if i)
        self.nodes = [n for n in self.nodes if id(n) not in gone]
        # an output name taken over by a surviving node (a renamed output) keeps its producer
        for node in self.nodes:
            for o in node.output:
                if o and o not in self.producer:
                    self.producer[o] = node

    def replace_node(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        at = self.position(old)
        self._unlink(old)
        self.removed_names.update(o for o in old.output if o)
        self.maybe_dead.update(i for i in old.input if i)
        self.nodes[at : at + 1] = new
        for node in new:
            self._link(node)

    def rename_output(self, node: onnx.NodeProto, slot: int, new_name: str) -> None:
        self._unlink(node)
        self.removed_names.add(node.output[slot])
        node.output[slot] = new_name
        self._link(node)

    # ---- write back ------------------------------------------------------------------
    def finalize(self) -> None:
        """Drop what the edits left dead, then write the node list back into the proto."""
        self.refresh()
        work = list(self.maybe_dead)
        dead_nodes: set[int] = set()
        while work:
            name = work.pop()
            if name in self.output_set or self.consumers_of(name):
                continue
            node = self.producer.get(name)
            if node is None or id(node) in dead_nodes:
                continue
            if node.op_type != "Constant" and node.op_type not in EVALUABLE_OPS:
                continue
            if any(o in self.output_set or self.consumers_of(o) for o in node.output if o):
                continue
            dead_nodes.add(id(node))
            for i in node.input:
                if i:
                    self.consumers[i] = [c for c in self.consumers.get(i, []) if c is not node]
                    work.append(i)
        if dead_nodes:
            self.remove_nodes([n for n in self.nodes if id(n) in dead_nodes])
            self.refresh()
        present = set(self.inputs) | self.output_set
        for node in self.nodes:
            present.update(node.output)
            present.update(node.input)
        if not self.is_function:
            # IR < 4 declares every initializer as an input too: those are not user inputs.
            removable = (lambda n: True) if self.ir_version < 4 else (lambda n: n not in self.inputs)
            drop = [i for i, t in enumerate(self.proto.initializer)
                    if t.name not in self.consumers and removable(t.name) and t.name not in self.output_set]
            dropped = {self.proto.initializer[i].name for i in drop}
            for i in reversed(drop):
                del self.proto.initializer[i]
            if self.ir_version < 4 and dropped:
                for i in reversed([i for i, v in enumerate(self.proto.input) if v.name in dropped]):
                    del self.proto.input[i]
            gone = self.removed_names - present
            drop = [i for i, v in enumerate(self.proto.value_info) if v.name in gone]
            for i in reversed(drop):
                del self.proto.value_info[i]
        staged = onnx.GraphProto()
        staged.node.extend(self.nodes)
        self.proto.ClearField("node")
        self.proto.node.extend(staged.node)
