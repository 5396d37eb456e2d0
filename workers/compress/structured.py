"""Structured pruning: whole hidden neurons removed from MatMul/Gemm chains, so matrices shrink.

A neuron can go only when the graph is a chain we fully understand:

    MatMul|Gemm(W1) -> [Add|Sub|Mul|Div(per-neuron constant) | activation]* -> MatMul|Gemm(W2)

Removing neuron j deletes column j of W1 (its inputs), entry j of every per-neuron constant on the
way, and row j of W2 (its outputs). The result computes exactly what the dense model computes with
neuron j's outgoing row of W2 zeroed. Anything else (a branch, a graph output, a shared weight, an
unknown op between the layers) leaves that layer alone, and a model with no such chain at all is
refused rather than rewritten into something broken.
"""

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto

from schemas.vocabulary import Scope
from workers.errors import UnsupportedModelError, one_line
from workers.graph.walk import attribute, iter_graphs, readers
from workers.graph.weights import WeightSlot, find_weights
from workers.nn.masks import magnitude_masks

# Ops that act on each neuron on its own, so a neuron's value never mixes with another's.
UNARY_PER_NEURON = frozenset(
    {
        "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh", "Sigmoid", "HardSigmoid",
        "HardSwish", "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Cast", "Abs", "Neg",
    }
)  # fmt: skip
BINARY_PER_NEURON = frozenset({"Add", "Sub", "Mul", "Div"})


@dataclass
class _Cut:
    """Where a layer's neuron axis runs through one tensor."""

    slot: WeightSlot
    axis: int


@dataclass
class NeuronLayer:
    """A hidden layer whose neurons can be removed: W1's output axis and everything that follows."""

    producer: _Cut  # W1, the neuron's incoming weights
    consumer: _Cut  # W2, the neuron's outgoing weights
    per_neuron: list[_Cut] = field(default_factory=list)  # biases and scales on the way
    values: list[str] = field(
        default_factory=list
    )  # intermediate value names (their shapes change)

    @property
    def width(self) -> int:
        return self.producer.slot.shape[self.producer.axis]

    def neuron_rms(self) -> np.ndarray:
        """Root-mean-square of each neuron's incoming weights: [width]. RMS rather than the
        norm so that layers of different fan-in rank on one scale (global scope)."""
        weights = self.producer.slot.read().astype(np.float64)
        other = 1 - self.producer.axis
        return np.sqrt(np.mean(weights**2, axis=other))


class _ChainFinder:
    def __init__(self, model: ModelProto, candidates: list[WeightSlot]) -> None:
        self.candidates = {slot.name for slot in candidates}
        everything = find_weights(model, include=[".*"])
        self.by_name = {slot.name: slot for slot in everything}
        self.graphs = [graph for graph, _ in iter_graphs(model.graph)]
        self.readers = {id(graph): readers(graph) for graph in self.graphs}
        self.all_readers: dict[str, int] = defaultdict(int)
        for graph in self.graphs:
            for name, nodes in self.readers[id(graph)].items():
                self.all_readers[name] += len(nodes)
        # An initializer listed as a graph input is a default the caller may override with a
        # tensor of the old shape: never slice one.
        self.overridable = {value.name for graph in self.graphs for value in graph.input}
        self.skipped: dict[str, str] = {}

    def _owned(self, name: str) -> WeightSlot | None:
        """The constant `name` if exactly one node anywhere reads it (safe to slice)."""
        slot = self.by_name.get(name)
        if slot is None or self.all_readers[name] != 1 or name in self.overridable:
            return None
        return slot

    def layers(self) -> list[NeuronLayer]:
        found = []
        for graph in self.graphs:
            outputs = {value.name for value in graph.output}
            for node in graph.node:
                slot = self.by_name.get(node.input[1]) if len(node.input) > 1 else None
                if slot is None or slot.name not in self.candidates:
                    continue
                if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                    self._skip(
                        slot, f"it feeds {node.op_type}; only MatMul/Gemm neurons are removed"
                    )
                    continue
                layer = self._chain_from(node, slot, graph, outputs)
                if layer is not None:
                    found.append(layer)
        return found

    def _skip(self, slot: WeightSlot, reason: str) -> None:
        self.skipped.setdefault(slot.name, reason)

    def _chain_from(
        self, node: NodeProto, w1: WeightSlot, graph: GraphProto, outputs: set[str]
    ) -> NeuronLayer | None:
        if len(w1.shape) != 2 or self._owned(w1.name) is None:
            self._skip(w1, "not a 2-D weight read by exactly one node (nor a graph input)")
            return None
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            self._skip(w1, "Gemm with transA=1")
            return None
        out_axis = 0 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 1
        layer = NeuronLayer(producer=_Cut(w1, out_axis), consumer=_Cut(w1, 0))
        width = w1.shape[out_axis]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        if has_bias and not self._per_neuron(node.input[2], width, layer):
            self._skip(w1, f"Gemm bias {node.input[2]!r} is not a per-neuron constant")
            return None
        graph_readers = self.readers[id(graph)]
        value = node.output[0]
        while True:
            if value in outputs or len(graph_readers.get(value, [])) != 1:
                self._skip(w1, f"its output {value!r} is a graph output or read by several nodes")
                return None
            layer.values.append(value)
            nxt = graph_readers[value][0]
            if nxt.op_type in ("MatMul", "Gemm") and nxt.input[0] == value:
                return self._close(nxt, w1, width, layer)
            if nxt.op_type in UNARY_PER_NEURON and nxt.input[0] == value:
                value = nxt.output[0]
                continue
            if nxt.op_type in BINARY_PER_NEURON and len(nxt.input) == 2:
                other = nxt.input[1] if nxt.input[0] == value else nxt.input[0]
                if self._per_neuron(other, width, layer):
                    value = nxt.output[0]
                    continue
            self._skip(w1, f"{nxt.op_type} node {nxt.name!r} follows it")
            return None

    def _close(
        self, node: NodeProto, w1: WeightSlot, width: int, layer: NeuronLayer
    ) -> NeuronLayer | None:
        w2 = self._owned(node.input[1]) if len(node.input) > 1 else None
        if w2 is None or len(w2.shape) != 2:
            name = node.input[1] if len(node.input) > 1 else "?"
            why = "is not a 2-D constant read once (nor a graph input)"
            self._skip(w1, f"the next layer's weight {name!r} {why}")
            return None
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            self._skip(w1, "the next Gemm has transA=1")
            return None
        in_axis = 1 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 0
        if w2.shape[in_axis] != width:
            self._skip(w1, f"the next weight {w2.name!r} has shape {list(w2.shape)}")
            return None
        layer.consumer = _Cut(w2, in_axis)
        return layer

    def _per_neuron(self, name: str, width: int, layer: NeuronLayer) -> bool:
        slot = self.by_name.get(name)
        if slot is None:
            return False
        size = int(np.prod(slot.shape))
        if size == 1:
            return True  # a scalar broadcasts the same to every neuron: nothing to slice
        if slot.shape[-1] != width or size != width or self._owned(name) is None:
            return False
        layer.per_neuron.append(_Cut(slot, len(slot.shape) - 1))
        return True


def _drop_value_info(model: ModelProto, names: set[str]) -> None:
    """Shapes recorded for the chain's values are stale once the chain narrows."""
    for graph, _ in iter_graphs(model.graph):
        kept = [info for info in graph.value_info if info.name not in names]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def prune_neurons(
    model: ModelProto,
    candidates: list[WeightSlot],
    *,
    sparsity: float | None,
    threshold: float | None,
    scope: Scope,
) -> tuple[list[NeuronLayer], dict[str, str]]:
    """Remove the weakest hidden neurons in place. Returns the layers cut and, by weight name,
    why each other candidate was left as it was."""
    finder = _ChainFinder(model, candidates)
    layers = finder.layers()
    if not layers:
        first = next(iter(finder.skipped.items()), None)
        why = f" ({first[0]}: {one_line(first[1], 100)})" if first else ""
        raise UnsupportedModelError(
            "structured pruning found no hidden layer it can remove neurons from safely (it "
            f"needs MatMul/Gemm layers feeding the next through per-neuron ops){why}; use "
            "granularity=unstructured"
        )
    scores = [layer.neuron_rms() for layer in layers]
    keep_masks = magnitude_masks(
        scores,
        sparsity=sparsity,
        threshold=threshold,
        scope=scope,
    )
    cuts: dict[int, list[tuple[WeightSlot, int, np.ndarray]]] = defaultdict(list)
    for layer, score, keep in zip(layers, scores, keep_masks, strict=True):
        if not keep.any():  # a layer of width 0 is not a model: keep its strongest neuron
            keep[np.argmax(score)] = True
        kept = np.flatnonzero(keep)
        for cut in [layer.producer, layer.consumer, *layer.per_neuron]:
            cuts[id(cut.slot.holder)].append((cut.slot, cut.axis, kept))
    for operations in cuts.values():
        slot = operations[0][0]
        array = slot.read()
        for _, axis, kept in operations:
            array = np.take(array, kept, axis=axis)
        slot.write(array)
    _drop_value_info(model, {value for layer in layers for value in layer.values})
    return layers, finder.skipped
