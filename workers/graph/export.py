"""A trained NumPy network as an ONNX model that takes raw features.

Graph: X -> Sub(mean) -> Mul(scale) -> [MatMul -> Add -> activation]* -> MatMul -> Add -> head.
Classifiers output `label` (the original class values) and `probabilities` [N, classes];
regressors output `prediction` [N, targets]. The file is deterministic: same weights, same bytes.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from schemas.vocabulary import HiddenActivation
from workers.nn.network import Network

# onnxruntime refuses IR versions newer than it knows; 8 with opset 17 loads in every
# onnxruntime since 1.13 and in what scikit-learn's toolchain produces.
IR_VERSION = 8
OPSET = 17
# The ONNX operator of each hidden activation ("identity" adds no node).
ACTIVATION_OPS: dict[HiddenActivation, str] = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def to_onnx(network: Network, classes: np.ndarray | None, name: str = "clipprune") -> bytes:
    features = network.weights[0].shape[0]
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(network.mean, "input_mean"),
        numpy_helper.from_array(network.scale, "input_scale"),
    ]
    nodes += [
        helper.make_node("Sub", ["X", "input_mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "input_scale"], ["standardised"]),
    ]
    value = "standardised"
    for layer, (w, b) in enumerate(zip(network.weights, network.biases, strict=True)):
        inits += [numpy_helper.from_array(w, f"W{layer}"), numpy_helper.from_array(b, f"b{layer}")]
        nodes += [
            helper.make_node("MatMul", [value, f"W{layer}"], [f"matmul{layer}"]),
            helper.make_node("Add", [f"matmul{layer}", f"b{layer}"], [f"logits{layer}"]),
        ]
        value = f"logits{layer}"
        activation = network.activations[layer] if layer < len(network.activations) else None
        if activation is not None and activation != "identity":
            op = ACTIVATION_OPS[activation]
            nodes.append(helper.make_node(op, [value], [f"hidden{layer}"]))
            value = f"hidden{layer}"

    outputs = []
    if classes is None:
        nodes.append(helper.make_node("Identity", [value], ["prediction"]))
        outputs.append(
            helper.make_tensor_value_info(
                "prediction", TensorProto.FLOAT, ["N", len(network.biases[-1])]
            )
        )
    else:
        if network.head == "sigmoid":  # one logit: P(class 1); make [1 - p, p]
            inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
            nodes += [
                helper.make_node("Sigmoid", [value], ["positive"]),
                helper.make_node("Sub", ["one", "positive"], ["negative"]),
                helper.make_node("Concat", ["negative", "positive"], ["probabilities"], axis=1),
            ]
        else:
            nodes.append(helper.make_node("Softmax", [value], ["probabilities"], axis=1))
        if classes.dtype.kind == "U":
            label_type = TensorProto.STRING
            class_tensor = helper.make_tensor(
                "classes", label_type, [len(classes)], [c.encode() for c in classes]
            )
        else:
            label_type = TensorProto.INT64
            class_tensor = numpy_helper.from_array(classes.astype(np.int64), "classes")
        inits.append(class_tensor)
        nodes += [
            helper.make_node("ArgMax", ["probabilities"], ["class_index"], axis=1, keepdims=0),
            helper.make_node("Gather", ["classes", "class_index"], ["label"], axis=0),
        ]
        outputs += [
            helper.make_tensor_value_info("label", label_type, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)]),
        ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", features])],
        outputs,
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="clipprune"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()
