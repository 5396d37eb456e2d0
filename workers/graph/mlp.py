"""Reading an ONNX MLP into the NumPy network, and writing trained weights back in place.

The graph must be an MLP chain as scikit-learn (skl2onnx) and clipprune itself write it:

    X -> [Cast | Sub/Mul/Div/Add by a constant]* -> [MatMul|Gemm (+ Add bias) -> activation]*
      -> head (Softmax | Sigmoid | none) -> label and probability plumbing

Any node outside that shape is refused by name: fine-tuning a graph we only half understand
would return a model that silently computes something else.
"""

from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from schemas.vocabulary import Activation, Head
from workers.errors import InvalidDataError, UnsupportedModelError
from workers.graph.export import ACTIVATION_OPS
from workers.graph.walk import attribute
from workers.graph.walk import readers as value_readers
from workers.graph.weights import WeightSlot, find_weights
from workers.nn.network import DTYPE, Network

OP_ACTIVATIONS: dict[str, Activation] = {op: name for name, op in ACTIVATION_OPS.items()}
# The elementwise preprocessing a converter puts before the first layer (standardisation).
PREFIX_OPS = {"Sub": np.subtract, "Add": np.add, "Mul": np.multiply, "Div": np.divide}
# What converters put after the head to turn scores into labels and probabilities.
PLUMBING_OPS = frozenset(
    {
        "ArgMax", "ZipMap", "ArrayFeatureExtractor", "Reshape", "Cast", "Identity", "Concat",
        "Gather", "Flatten", "Squeeze", "Unsqueeze", "Sub", "Normalizer",
    }
)  # fmt: skip


@dataclass
class _Layer:
    weight: WeightSlot
    transposed: bool  # Gemm with transB=1 stores [out, in]
    bias: WeightSlot | None = None
    activation: Activation = "identity"

    def read_weight(self) -> np.ndarray:
        """[in, out], whatever the layout in the graph."""
        weight = self.weight.read()
        return (weight.T if self.transposed else weight).astype(DTYPE)

    def read_bias(self, width: int) -> np.ndarray:
        if self.bias is None:
            return np.zeros(width, DTYPE)
        return self.bias.read().astype(DTYPE).reshape(-1)


@dataclass
class OnnxMlp:
    """An MLP found in an ONNX graph: its NumPy twin and where each tensor lives in the graph."""

    network: Network
    layers: list[_Layer]
    input_name: str
    prefix: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (op, constant)
    classes: np.ndarray | None = None

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """The graph's own preprocessing (standardisation and such) applied to raw features."""
        x = x.astype(DTYPE)
        for op, constant in self.prefix:
            x = PREFIX_OPS[op](x, constant)
        return x

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Labels as the network's loss wants them: class indices, or float targets [N, k]."""
        if self.network.head == "identity":
            if labels.dtype.kind not in "biuf":
                raise InvalidDataError("the model is a regressor; its labels must be numbers")
            return labels.astype(DTYPE).reshape(len(labels), -1)
        classes = self.classes
        if classes is None:
            classes = np.arange(max(2, len(self.network.biases[-1])))
        lookup = {str(value): index for index, value in enumerate(classes.tolist())}
        keys = [
            str(int(v)) if isinstance(v, float) and v == int(v) else str(v) for v in labels.tolist()
        ]
        unknown = sorted({key for key in keys if key not in lookup})
        if unknown:
            raise InvalidDataError(
                f"labels {', '.join(unknown[:5])} are not among the model's classes "
                + ", ".join(map(str, classes.tolist()))
            )
        indices = np.array([lookup[key] for key in keys], dtype=np.int64)
        return indices.astype(DTYPE) if self.network.head == "sigmoid" else indices

    def write_back(self) -> None:
        for layer, w, b in zip(self.layers, self.network.weights, self.network.biases, strict=True):
            layer.weight.write(w.T if layer.transposed else w)
            if layer.bias is not None:
                layer.bias.write(b.reshape(layer.bias.shape))


def _refuse(node: NodeProto, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"fine-tuning needs an MLP graph (MatMul/Gemm layers with Add biases and Relu, Tanh or "
        f"Sigmoid, then a Softmax, Sigmoid or no head); {node.op_type} node {node.name!r} "
        f"{why}"
    )


def read_mlp(model: ModelProto) -> OnnxMlp:
    """The MLP in `model`, or UnsupportedModelError naming the first node that does not fit.

    Every node must be accounted for: part of the chain from the input to the head, a
    Constant, or label/probability plumbing after the head. A graph that computes anything
    else would be fine-tuned as something it is not.
    """
    graph = model.graph
    constants = {slot.name: slot for slot in find_weights(model, include=[".*"])}
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value.name for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"fine-tuning needs a model with one input; this one has {len(inputs)}"
        )
    readers = value_readers(graph)
    outputs = {value.name for value in graph.output}

    chain: list[NodeProto] = []
    mlp_layers: list[_Layer] = []
    prefix: list[tuple[str, np.ndarray]] = []
    head: Head = "identity"
    value = inputs[0]
    bias_may_follow = False
    while value not in outputs and len(readers[value]) == 1:
        node = readers[value][0]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            break
        second = node.input[1] if len(node.input) > 1 else ""
        constant = constants.get(second) if node.input[0] == value else None
        if op == "Identity" or (op == "Cast" and attribute(node, "to", 0) == TensorProto.FLOAT):
            pass
        elif op in ("MatMul", "Gemm") and constant is not None:
            if op == "Gemm" and (
                attribute(node, "alpha", 1.0) != 1 or attribute(node, "beta", 1.0) != 1
            ):
                raise _refuse(node, "has alpha or beta other than 1")
            if op == "Gemm" and attribute(node, "transA", 0):
                raise _refuse(node, "has transA=1")
            layer = _Layer(constant, transposed=op == "Gemm" and bool(attribute(node, "transB", 0)))
            has_c = op == "Gemm" and len(node.input) > 2 and bool(node.input[2])
            if has_c:
                layer.bias = constants.get(node.input[2])
                if layer.bias is None:
                    raise _refuse(node, "has a bias that is not a constant")
            mlp_layers.append(layer)
            bias_may_follow = not has_c
            chain.append(node)
            value = node.output[0]
            continue
        elif op == "Add" and bias_may_follow and constant is not None:
            mlp_layers[-1].bias = constant
        elif op in PREFIX_OPS and not mlp_layers and constant is not None:
            prefix.append((op, constant.read().astype(DTYPE)))
        elif op in OP_ACTIVATIONS and mlp_layers and mlp_layers[-1].activation == "identity":
            mlp_layers[-1].activation = OP_ACTIVATIONS[op]
        elif op == "Softmax" and mlp_layers and attribute(node, "axis", -1) in (1, -1):
            head = "softmax"
            chain.append(node)
            value = node.output[0]
            break
        else:
            break
        bias_may_follow = False
        chain.append(node)
        value = node.output[0]
    if not mlp_layers:
        stop = readers[value][0] if readers[value] else None
        if stop is not None:
            raise _refuse(stop, "stands where the first MatMul/Gemm layer should be")
        raise UnsupportedModelError("fine-tuning found no MatMul/Gemm layer after the model input")
    _check_only_plumbing_follows(graph, chain, value, readers, constants)
    if head == "identity" and mlp_layers[-1].activation == "sigmoid":
        head = "sigmoid"
        mlp_layers[-1].activation = "identity"
    if mlp_layers[-1].activation != "identity":
        raise UnsupportedModelError(
            f"the last layer ends in {mlp_layers[-1].activation}, not a head clipprune can train "
            "(softmax, sigmoid with one output, or none)"
        )
    weights = [layer.read_weight() for layer in mlp_layers]
    biases = [layer.read_bias(w.shape[1]) for layer, w in zip(mlp_layers, weights, strict=True)]
    if head == "sigmoid" and weights[-1].shape[1] != 1:
        raise UnsupportedModelError("a sigmoid head must have one output to fine-tune")
    network = Network(weights, biases, [layer.activation for layer in mlp_layers[:-1]], head)
    return OnnxMlp(network, mlp_layers, inputs[0], prefix, _classes(model, head))


def _check_only_plumbing_follows(
    graph: GraphProto,
    chain: list[NodeProto],
    head_output: str,
    readers: dict[str, list[NodeProto]],
    constants: dict[str, WeightSlot],
) -> None:
    """Everything after the head only turns scores into labels and probabilities."""
    after: list[NodeProto] = []
    frontier = [head_output]
    seen: set[int] = set()
    while frontier:
        for node in readers[frontier.pop()]:
            if id(node) not in seen:
                seen.add(id(node))
                after.append(node)
                frontier.extend(node.output)
    accounted = {id(node) for node in chain} | seen
    for node in graph.node:
        if id(node) not in accounted and node.op_type != "Constant":
            raise _refuse(node, "is not part of the MLP chain")
    for node in after:
        if node.op_type not in PLUMBING_OPS or node.domain not in ("", "ai.onnx", "ai.onnx.ml"):
            raise _refuse(node, "comes after the layers and changes the outputs")
        if node.op_type == "Sub":  # only 1 - p, which makes [1 - p, p] for a binary classifier
            one = constants.get(node.input[0])
            if one is None or one.read().size != 1 or float(one.read().ravel()[0]) != 1.0:
                raise _refuse(node, "comes after the layers and changes the outputs")


def _classes(model: ModelProto, head: Head) -> np.ndarray | None:
    """The class values a converter stored for its label output, if it stored any."""
    if head == "identity":
        return None
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("ArrayFeatureExtractor", "Gather") and node.input[0] in tensors:
            classes = numpy_helper.to_array(tensors[node.input[0]])
            if classes.dtype == object:  # string tensors arrive as bytes
                classes = np.array([c.decode() if isinstance(c, bytes) else c for c in classes])
            return classes
    return None
