"""Walking an ONNX model: its graphs and the subgraphs inside If/Loop/Scan nodes, who reads
each value, and a node's attributes."""

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, helper


def node_subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    """The graphs a node holds as attributes: If's branches, Loop's and Scan's bodies."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_graphs(graph: GraphProto, depth: int = 0) -> Iterator[tuple[GraphProto, int]]:
    """The graph and every subgraph below it, with their depth."""
    yield graph, depth
    for node in graph.node:
        for sub in node_subgraphs(node):
            yield from iter_graphs(sub, depth + 1)


def readers(graph: GraphProto) -> dict[str, list[NodeProto]]:
    """The nodes of `graph` that read each value; a node whose subgraphs read a name from
    outside counts as its reader."""
    found: dict[str, list[NodeProto]] = defaultdict(list)
    for node in graph.node:
        names = set(node.input)
        for sub in node_subgraphs(node):
            for inner, _ in iter_graphs(sub):
                for inner_node in inner.node:
                    names.update(inner_node.input)
        for name in names:
            if name:
                found[name].append(node)
    return found


def attribute(node: NodeProto, name: str, default: Any) -> Any:
    """The value of the node's attribute `name`, or `default` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def drop_unused_initializers(model: ModelProto) -> int:
    """Remove the main graph's initializers that no node in any graph reads and that are
    neither graph inputs nor outputs; how many went. onnxruntime would drop them too, but
    only after spending seconds per ten thousand of them on every session."""
    graph = model.graph
    read = {name for inner, _ in iter_graphs(graph) for node in inner.node for name in node.input}
    kept = {value.name for value in [*graph.input, *graph.output]} | read
    used = [tensor for tensor in graph.initializer if tensor.name in kept]
    dropped = len(graph.initializer) - len(used)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(used)
    return dropped
