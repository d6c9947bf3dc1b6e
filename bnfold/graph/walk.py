"""Walking nested graph bodies: subgraph attributes of If/Loop/Scan (any node, in fact) and
the names a subgraph takes from its enclosing scopes."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) for every graph-valued attribute of ``node``."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(attr.graphs):
                yield f"{attr.name}[{k}]", g


def free_names(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of ``node`` use without defining them (outer-scope references)."""
    found: set[str] = set()
    for _, graph in subgraphs(node):
        found |= _graph_free_names(graph)
    return found


def _graph_free_names(graph: onnx.GraphProto) -> set[str]:
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        used |= free_names(node)
        defined.update(o for o in node.output if o)
    used.update(v.name for v in graph.output)
    return used - defined


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in the model (graphs, subgraphs, functions)."""
    names: set[str] = set()

    def visit_nodes(nodes):
        for node in nodes:
            names.update(node.input)
            names.update(node.output)
            if node.name:
                names.add(node.name)
            for _, g in subgraphs(node):
                visit_graph(g)

    def visit_graph(graph):
        names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
        names.update(t.name for t in graph.initializer)
        visit_nodes(graph.node)

    visit_graph(model.graph)
    for f in model.functions:
        names.update(f.input)
        names.update(f.output)
        visit_nodes(f.node)
    names.discard("")
    return names
