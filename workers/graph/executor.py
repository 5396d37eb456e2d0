"""Running an ONNX graph in NumPy, forward and backward, with the operators of workers.nn.

The graph's float initializers and float Constant nodes are its parameters, held by name in
`parameters` (update the arrays there in place to train). forward(feeds) runs the nodes in
topological order and keeps each node's context; backward(output_grads) walks the same nodes in
reverse, accumulating vector-Jacobian products, and returns d loss / d parameter for every
parameter.
"""

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import AttributeProto, ModelProto, NodeProto, helper, numpy_helper

from workers.errors import UnsupportedModelError, cut_list, one_line
from workers.nn.operators import OPERATORS, Attrs, Operator

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
FLOAT_ONNX_TYPES = frozenset({1, 10, 11, 16})  # float, float16, double, bfloat16


@dataclass(frozen=True)
class Step:
    """One node, ready to run: its operator, value names ("" for an absent optional input) and
    attributes as Python values."""

    label: str  # the node's name, or its op and position when it has none
    op_type: str
    operator: Operator
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Attrs


@dataclass
class Record:
    """What backward needs from one forward step."""

    step: Step
    context: Any
    outputs: list[tuple[tuple[int, ...], np.dtype]]  # shape and dtype of each output


def node_label(node: NodeProto, index: int) -> str:
    return node.name or f"{node.op_type} #{index}"


def attribute_value(attr: AttributeProto, float_dtype: np.dtype | None) -> Any:
    """An attribute as a Python value: strings decoded, tensors as arrays (floats in
    `float_dtype` when given, so a float64 run stays float64 through constants)."""
    if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS, AttributeProto.SPARSE_TENSOR):
        raise UnsupportedModelError(f"attribute {attr.name} holds a graph or a sparse tensor")
    value = helper.get_attribute_value(attr)
    if attr.type == AttributeProto.TENSOR:
        return as_float(numpy_helper.to_array(value), float_dtype)
    if attr.type == AttributeProto.STRING:
        return value.decode()
    if attr.type == AttributeProto.STRINGS:
        return [v.decode() for v in value]
    return value


def as_float(array: np.ndarray, float_dtype: np.dtype | None) -> np.ndarray:
    if float_dtype is None or not np.issubdtype(array.dtype, np.floating):
        return array
    return array.astype(float_dtype)


def writable(array: np.ndarray) -> np.ndarray:
    # numpy_helper.to_array may return a read-only view of the tensor's bytes
    return array if array.flags.writeable else array.copy()


def step_attrs(node: NodeProto, opset: int, float_dtype: np.dtype | None) -> Attrs:
    attrs = {attr.name: attribute_value(attr, float_dtype) for attr in node.attribute}
    if float_dtype is not None and node.op_type == "Cast" and attrs["to"] in FLOAT_ONNX_TYPES:
        attrs["to"] = helper.np_dtype_to_tensor_dtype(np.dtype(float_dtype))
    return {**attrs, "opset": opset, "num_outputs": len(node.output)}


def topological(nodes: list[NodeProto], available: set[str]) -> list[int]:
    """Node positions in an order where every input is made before it is read (Kahn, keeping
    the file's order among nodes that are ready together)."""
    makers = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    dependants: dict[int, list[int]] = defaultdict(list)
    for index, node in enumerate(nodes):
        for name in {n for n in node.input if n and n not in available and n in makers}:
            waiting[index] += 1
            dependants[makers[name]].append(index)
    ready = deque(index for index, count in enumerate(waiting) if count == 0)
    order = []
    while ready:
        index = ready.popleft()
        order.append(index)
        for after in dependants[index]:
            waiting[after] -= 1
            if waiting[after] == 0:
                ready.append(after)
    if len(order) != len(nodes):
        raise UnsupportedModelError("the graph has a cycle: its nodes cannot be ordered")
    return order


def float_constant(node: NodeProto) -> bool:
    """A Constant node whose one attribute is a float tensor `value`: a weight by another name."""
    return (
        node.op_type == "Constant"
        and node.domain in DEFAULT_DOMAINS
        and len(node.attribute) == 1
        and node.attribute[0].name == "value"
        and node.attribute[0].t.data_type in FLOAT_ONNX_TYPES
    )


def default_opset(model: ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def refuse_unknown(nodes: list[NodeProto]) -> None:
    unknown = [
        f"{node.op_type} ({node_label(node, index)})"
        for index, node in enumerate(nodes)
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in OPERATORS
    ]
    if unknown:
        raise UnsupportedModelError(
            cut_list("the NumPy executor has no operator for ", unknown, "; fine-tuning needs all")
        )


class Executor:
    """An ONNX graph as NumPy: forward, then backward to the parameters' gradients.

    `float_dtype` runs every float tensor (parameters, feeds, constants, casts) in that dtype,
    for float64 checks; by default each keeps the model's own.
    """

    def __init__(self, model: ModelProto, float_dtype: type | None = None) -> None:
        graph = model.graph
        if graph.sparse_initializer:
            raise UnsupportedModelError("the graph has sparse initializers: densify it first")
        self.float_dtype = None if float_dtype is None else np.dtype(float_dtype)
        refuse_unknown(list(graph.node))
        # Paddle and some TF exports keep their weights in Constant nodes, not initializers
        weights = {node.output[0]: node for node in graph.node if float_constant(node)}
        nodes = [node for node in graph.node if not float_constant(node)]
        initial = {
            **{t.name: numpy_helper.to_array(t) for t in graph.initializer},
            **{name: numpy_helper.to_array(node.attribute[0].t) for name, node in weights.items()},
        }
        # float tensors are the parameters; integer ones are shapes, axes and indices.
        # Training updates these in place: each must own writable memory.
        self.parameters = {
            name: writable(as_float(array, self.float_dtype))
            for name, array in initial.items()
            if np.issubdtype(array.dtype, np.floating)
        }
        self.constants = {n: a for n, a in initial.items() if n not in self.parameters}
        self.output_names = [value.name for value in graph.output]
        available = set(initial) | {value.name for value in graph.input}
        opset = default_opset(model)
        self.steps = [
            Step(
                node_label(nodes[i], i),
                nodes[i].op_type,
                OPERATORS[nodes[i].op_type],
                tuple(nodes[i].input),
                tuple(nodes[i].output),
                self._attrs(nodes[i], i, opset),
            )
            for i in topological(nodes, available)
        ]
        self.needs_grad = self._needing_gradients()
        self.last_use = self._last_uses()
        self.tape: list[Record] = []

    def _attrs(self, node: NodeProto, index: int, opset: int) -> Attrs:
        try:
            return step_attrs(node, opset, self.float_dtype)
        except UnsupportedModelError as error:
            raise self._refusal(node.op_type, node_label(node, index), error) from error

    @staticmethod
    def _refusal(op_type: str, label: str, error: Exception) -> UnsupportedModelError:
        return UnsupportedModelError(one_line(f"{op_type} node {label!r}: {error}"))

    def _needing_gradients(self) -> set[str]:
        """Values that depend on a parameter: the only ones backward computes gradients for."""
        needed = set(self.parameters)
        for step in self.steps:
            if step.operator.vjp is not None and needed.intersection(step.inputs):
                needed.update(step.outputs)
        return needed

    def _last_uses(self) -> dict[str, int]:
        """The position of the last step that reads each value, so forward can drop it after."""
        last = {}
        for position, step in enumerate(self.steps):
            for name in step.inputs:
                last[name] = position
        return last

    def forward(self, feeds: dict[str, np.ndarray], record: bool = True) -> dict[str, np.ndarray]:
        """The graph's outputs for `feeds` (by input name). With `record`, the contexts backward
        needs are kept until the next forward or backward."""
        values: dict[str, np.ndarray] = {
            **self.constants,
            **self.parameters,
            **{name: as_float(np.asarray(a), self.float_dtype) for name, a in feeds.items()},
        }
        keep = set(self.output_names) | set(self.parameters) | set(self.constants)
        self.tape = []
        for position, step in enumerate(self.steps):
            inputs = [values[name] if name else None for name in step.inputs]
            try:
                outputs, context = step.operator.forward(inputs, step.attrs)
            except UnsupportedModelError as error:
                raise self._refusal(step.op_type, step.label, error) from error
            self._check_outputs(step, outputs)
            for name, output in zip(step.outputs, outputs, strict=False):
                if name:
                    values[name] = output
            if record:
                shapes = [(o.shape, o.dtype) for o in outputs]
                self.tape.append(Record(step, context, shapes))
            for name in step.inputs:
                if self.last_use.get(name) == position and name not in keep:
                    values.pop(name, None)
        return {name: values[name] for name in self.output_names}

    def _check_outputs(self, step: Step, outputs: list[np.ndarray]) -> None:
        missing = [name for name in step.outputs[len(outputs) :] if name]
        if missing:
            raise UnsupportedModelError(
                one_line(
                    f"{step.op_type} node {step.label!r}: output {missing[0]!r} is not computed"
                    " by the NumPy executor (only the first"
                    f" {len(outputs)} output{'s' if len(outputs) > 1 else ''})"
                )
            )

    def backward(self, output_grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """d loss / d parameter for every parameter (zeros where the loss does not depend on
        it), given d loss / d output for the outputs the loss reads. Uses up the tape."""
        grads: dict[str, np.ndarray] = {
            name: as_float(np.asarray(g), self.float_dtype) for name, g in output_grads.items()
        }
        tape, self.tape = self.tape, []
        while tape:
            record = tape.pop()
            step = record.step
            reaching = [grads.pop(name, None) if name else None for name in step.outputs]
            if (
                step.operator.vjp is None
                or all(g is None for g in reaching)
                or not self.needs_grad.intersection(step.inputs)
            ):
                continue
            filled = [
                np.zeros(shape, dtype) if g is None else g
                for g, (shape, dtype) in zip(reaching, record.outputs, strict=False)
            ]
            input_grads = step.operator.vjp(record.context, filled)
            for name, g in zip(step.inputs, input_grads, strict=False):
                if g is not None and name in self.needs_grad:
                    grads[name] = g if name not in grads else grads[name] + g
        return {
            name: grads.get(name, np.zeros_like(value)) for name, value in self.parameters.items()
        }
