"""Every operator of the NumPy executor, one node at a time: forward against onnxruntime in
float32, and the gradient of every differentiable input against central finite differences in
float64.

Each case is a one-node model made with onnx.helper. For onnxruntime the inputs are graph inputs;
for the gradient check they are initializers (the executor's parameters) of a float64 copy, so
the check goes through the executor's attribute handling and opset rules as a real model does.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

from workers.errors import UnsupportedModelError
from workers.graph.executor import Executor
from workers.nn.operators import OPERATORS

RNG = np.random.default_rng(17)
FD_STEP = 1e-6


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def positive(*shape: int) -> np.ndarray:
    return RNG.uniform(0.5, 2.0, shape)


def i64(values: Any) -> np.ndarray:
    return np.array(values, np.int64)


def f64(values: Any) -> np.ndarray:
    return np.array(values, np.float64)


@dataclass(frozen=True)
class Case:
    op: str
    inputs: tuple[np.ndarray | None, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    outputs: int = 1
    fixed: tuple[int, ...] = ()  # float inputs that take no gradient (bounds, fill values, scales)


def case(
    op: str,
    *inputs: np.ndarray | None,
    opset: int = 17,
    outputs: int = 1,
    fixed: tuple[int, ...] = (),
    label: str = "",
    **attrs: Any,
) -> Any:
    name = f"{op}-{label}" if label else op
    return pytest.param(Case(op, inputs, attrs, opset, outputs, fixed), id=name)


CASES = [
    # elementwise, with broadcasting
    case("Add", normal(2, 3, 4), normal(3, 1), label="broadcast"),
    case("Add", normal(2, 3), normal(2, 3)),
    case("Sub", normal(2, 1, 4), normal(3, 4), label="broadcast"),
    case("Mul", normal(2, 3, 4), normal(4), label="broadcast"),
    case("Div", normal(2, 3), positive(1, 3), label="broadcast"),
    case("Pow", positive(2, 3), normal(2, 3)),
    case("Pow", positive(3, 4), f64(2.0), label="scalar"),
    case("Neg", normal(2, 3)),
    case("Abs", normal(2, 3)),
    case("Sqrt", positive(2, 3)),
    case("Reciprocal", positive(2, 3)),
    case("Exp", normal(2, 3)),
    case("Log", positive(2, 3)),
    case("Relu", normal(3, 4)),
    case("LeakyRelu", normal(3, 4), alpha=0.1),
    case("Sigmoid", 4 * normal(3, 4)),
    case("HardSigmoid", 4 * normal(3, 4)),
    case("HardSigmoid", 4 * normal(3, 4), alpha=0.3, beta=0.4, label="alpha-beta"),
    case("HardSwish", 4 * normal(3, 4)),
    case("Tanh", normal(3, 4)),
    case("Erf", f64([-4.0, -3.1, -2.9, -1.0, -1e-3, 0.0, 2e-4, 0.7, 2.99, 3.5, 6.0])),
    case("Erf", 2 * normal(3, 4), label="random"),
    case("Erf", f64([-40.0, -9.0, 12.0, 30.0]), label="far-tails"),  # no overflow warnings
    # selection and types
    case("Clip", normal(3, 4), opset=6, min=-0.5, max=0.5, label="attributes"),
    case("Clip", normal(3, 4), f64(-0.5), f64(0.5), opset=13, fixed=(1, 2), label="inputs"),
    case("Clip", normal(3, 4), None, f64(0.3), opset=13, fixed=(2,), label="max-only"),
    case("Where", RNG.random((2, 3)) > 0.5, normal(2, 3), normal(1, 3)),
    case("Cast", normal(2, 3), to=TensorProto.FLOAT),
    case("Cast", 3 * normal(2, 3), to=TensorProto.INT64, label="to-int"),
    case("Expand", normal(3, 1), i64([2, 3, 4])),
    # products
    case("MatMul", normal(2, 3, 4), normal(4, 5)),
    case("MatMul", normal(2, 1, 3, 4), normal(3, 4, 2), label="batched-broadcast"),
    case("MatMul", normal(4), normal(2, 4, 3), label="vector-first"),
    case("MatMul", normal(2, 3, 4), normal(4), label="vector-second"),
    case("Gemm", normal(3, 4), normal(4, 5), normal(5)),
    case(
        "Gemm",
        normal(4, 3),
        normal(4, 5),
        normal(1, 5),
        transA=1,
        alpha=0.5,
        beta=2.0,
        label="transA-alpha-beta",
    ),
    case("Gemm", normal(3, 4), normal(5, 4), transB=1, label="transB-no-C"),
    case("Gemm", normal(4, 3), normal(5, 4), normal(3, 5), transA=1, transB=1, label="both"),
    case("Einsum", normal(2, 3, 4), normal(2, 4, 5), opset=12, equation="bij,bjk->bik"),
    case(
        "Einsum",
        normal(2, 2, 3, 4),
        normal(2, 2, 5, 4),
        opset=12,
        equation="bhqd,bhkd->bhqk",
        label="attention",
    ),
    case("Einsum", normal(3, 4), opset=12, equation="ij->j", label="summed-away"),
    case("Einsum", normal(3, 4), normal(4, 2), opset=12, equation="ij, jk", label="implicit"),
    # windows
    case("Conv", normal(2, 3, 5, 5), normal(4, 3, 3, 3), normal(4)),
    case(
        "Conv",
        normal(2, 3, 6, 6),
        normal(4, 3, 3, 3),
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        label="stride-pad",
    ),
    case("Conv", normal(1, 4, 5, 5), normal(6, 2, 3, 3), normal(6), group=2, label="groups"),
    case(
        "Conv",
        normal(1, 4, 6, 6),
        normal(4, 1, 3, 3),
        group=4,
        pads=[1, 1, 1, 1],
        label="depthwise",
    ),
    case(
        "Conv",
        normal(1, 2, 7, 7),
        normal(3, 2, 3, 2),
        dilations=[2, 2],
        pads=[2, 1, 2, 1],
        label="dilation",
    ),
    case("Conv", normal(1, 2, 6, 5), normal(3, 2, 2, 3), pads=[0, 1, 1, 0], label="asymmetric"),
    case(
        "Conv",
        normal(1, 2, 5, 5),
        normal(3, 2, 3, 3),
        strides=[2, 2],
        auto_pad="SAME_UPPER",
        label="same-upper",
    ),
    case("Conv", normal(2, 3, 7), normal(2, 3, 3), normal(2), strides=[2], label="1d"),
    case("ConvTranspose", normal(2, 3, 3, 3), normal(3, 2, 3, 3), normal(2), strides=[2, 2]),
    case(
        "ConvTranspose",
        normal(1, 2, 3, 4),
        normal(2, 3, 3, 3),
        strides=[2, 2],
        pads=[1, 1, 1, 0],
        output_padding=[1, 1],
        label="pads-output-padding",
    ),
    case(
        "ConvTranspose",
        normal(1, 4, 3, 3),
        normal(4, 3, 2, 2),
        normal(6),
        group=2,
        dilations=[2, 2],
        label="groups-dilation",
    ),
    case("ConvTranspose", normal(2, 3, 5), normal(3, 2, 4), strides=[3], label="1d"),
    case("MaxPool", normal(2, 3, 4, 4), kernel_shape=[2, 2], strides=[2, 2]),
    case(
        "MaxPool",
        normal(1, 2, 5, 5),
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        label="pads",
    ),
    case(
        "MaxPool",
        normal(1, 2, 5, 5),
        kernel_shape=[2, 2],
        strides=[2, 2],
        ceil_mode=1,
        label="ceil",
    ),
    case("MaxPool", normal(1, 2, 6, 6), kernel_shape=[2, 2], dilations=[2, 2], label="dilation"),
    case("AveragePool", normal(2, 3, 4, 4), kernel_shape=[2, 2], strides=[2, 2]),
    case(
        "AveragePool",
        normal(1, 2, 5, 5),
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        label="pads-excluded",
    ),
    case(
        "AveragePool",
        normal(1, 2, 5, 5),
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        count_include_pad=1,
        label="pads-included",
    ),
    case(
        "AveragePool",
        normal(1, 2, 5, 5),
        kernel_shape=[2, 2],
        strides=[2, 2],
        ceil_mode=1,
        label="ceil",
    ),
    case("GlobalAveragePool", normal(2, 3, 4, 5)),
    # normalisation
    case("Softmax", normal(2, 3, 4), opset=13),
    case("Softmax", normal(2, 3, 4), opset=13, axis=1, label="axis"),
    case("Softmax", normal(2, 3, 4), opset=11, label="opset11-flattened"),
    case("LogSoftmax", normal(2, 3, 4), opset=13),
    case("LogSoftmax", normal(2, 3, 4), opset=11, label="opset11-flattened"),
    case("LayerNormalization", normal(2, 3, 4), normal(4), normal(4)),
    case(
        "LayerNormalization",
        normal(2, 3, 4),
        normal(3, 4),
        axis=-2,
        epsilon=1e-3,
        label="two-axes-no-bias",
    ),
    case(
        "BatchNormalization",
        normal(2, 3, 4, 4),
        normal(3),
        normal(3),
        normal(3),
        positive(3),
        opset=15,
        epsilon=1e-3,
    ),
    # reductions
    case("ReduceMean", normal(2, 3, 4), opset=13, axes=[1]),
    case("ReduceMean", normal(2, 3, 4), i64([-1]), opset=18, keepdims=0, label="axes-input"),
    case("ReduceMean", normal(2, 3, 4), opset=13, keepdims=0, label="all"),
    case("ReduceSum", normal(2, 3, 4), opset=11, axes=[0, 2], label="axes-attribute"),
    case("ReduceSum", normal(2, 3, 4), i64([1]), opset=13, keepdims=0, label="axes-input"),
    case("ReduceSum", normal(2, 3), opset=13, noop_with_empty_axes=1, label="noop"),
    # shapes
    case("Reshape", normal(2, 3, 4), i64([0, -1])),
    case("Reshape", normal(2, 3, 4), i64([4, 6]), label="explicit"),
    case("Transpose", normal(2, 3, 4, 5), perm=[0, 2, 1, 3]),
    case("Transpose", normal(2, 3, 4), label="reversed"),
    case("Flatten", normal(2, 3, 4)),
    case("Flatten", normal(2, 3, 4), axis=0, label="axis0"),
    case("Flatten", normal(2, 3, 4), axis=-1, label="negative"),
    case("Squeeze", normal(2, 1, 3, 1), opset=11, axes=[1], label="attribute"),
    case("Squeeze", normal(2, 1, 3, 1), i64([-1]), opset=13, label="input"),
    case("Squeeze", normal(2, 1, 3, 1), opset=13, label="all"),
    case("Unsqueeze", normal(2, 3), opset=11, axes=[0, 3], label="attribute"),
    case("Unsqueeze", normal(2, 3), i64([-1]), opset=13, label="input"),
    case("Concat", normal(2, 1, 3), normal(2, 2, 3), normal(2, 3, 3), axis=1),
    case("Split", normal(2, 3, 4), i64([1, 2]), opset=13, outputs=2, axis=1, label="input"),
    case("Split", normal(2, 3, 4), opset=11, outputs=2, axis=-1, split=[1, 3], label="attribute"),
    case("Split", normal(2, 4), opset=13, outputs=2, axis=1, label="equal"),
    case("Split", normal(2, 7), opset=18, outputs=3, axis=1, num_outputs=3, label="uneven"),
    case("Slice", normal(3, 4, 5), i64([1, 0]), i64([3, -1]), i64([0, 2]), opset=13),
    case(
        "Slice",
        normal(3, 5),
        i64([-1]),
        i64([-1000]),
        i64([1]),
        i64([-2]),
        opset=13,
        label="negative-step",
    ),
    case("Slice", normal(3, 4), opset=9, starts=[1, 1], ends=[100, 3], label="attributes"),
    case("Gather", normal(10, 4), i64([[1, 3, 3], [0, 9, -1]]), label="embedding"),
    case("Gather", normal(2, 5, 3), i64([4, 0, 4]), axis=1, label="axis1"),
    case("Gather", normal(2, 5, 3), i64(2), axis=1, label="scalar-index"),
    case("Pad", normal(1, 2, 3, 3), i64([0, 0, 1, 2, 0, 0, 2, 1]), f64(0.5), opset=13, fixed=(2,)),
    case("Pad", normal(1, 2, 3, 3), i64([0, 0, -1, 1, 0, 0, 1, -1]), opset=13, label="crop"),
    case("Pad", normal(2, 3), opset=10, pads=[1, 0, 0, 2], value=1.5, label="attributes"),
    case("Pad", normal(1, 2, 3, 3), i64([1, 1, 1, 1]), None, i64([2, 3]), opset=18, label="axes"),
    case(
        "Resize",
        normal(1, 2, 3, 3),
        None,
        f64([1, 1, 2, 2]),
        opset=13,
        fixed=(2,),
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
        label="pytorch",
    ),
    case(
        "Resize",
        normal(1, 2, 3, 4),
        None,
        None,
        i64([1, 2, 5, 7]),
        opset=13,
        label="sizes-half-pixel",
    ),
    case("Resize", normal(1, 2, 3, 3), f64([1, 1, 2, 3]), opset=10, fixed=(1,), label="opset10"),
    # variadic, comparisons, masks and positions
    case("Max", normal(2, 3), normal(3), normal(2, 1)),
    case("Min", normal(2, 3), normal(2, 3)),
    case("Sum", normal(2, 3), normal(3), normal(1, 3)),
    case("ReduceMax", normal(2, 3, 4), opset=13, axes=[1]),
    case("ReduceMax", normal(2, 3, 4), i64([-1]), opset=18, keepdims=0, label="axes-input"),
    case("Equal", i64([[1, 2], [3, 4]]), i64([1, 4])),
    case("Less", normal(2, 3), normal(3)),
    case("Greater", normal(2, 3), normal(2, 1)),
    case("Not", RNG.random((2, 3)) > 0.5),
    case("And", RNG.random((2, 3)) > 0.5, RNG.random(3) > 0.5),
    case("Or", RNG.random((2, 3)) > 0.5, RNG.random((2, 3)) > 0.5),
    case("Range", i64(1), i64(10), i64(3)),
    case("Range", f64(0.5), f64(2.0), f64(0.25), fixed=(0, 1, 2), label="float"),
    case("Tile", normal(2, 3), i64([2, 1])),
    case("Tile", normal(2, 1, 3), i64([1, 3, 2]), label="3d"),
    case("Trilu", normal(2, 4, 4), opset=14),
    case("Trilu", normal(4, 5), i64(-1), opset=14, upper=0, label="lower-k"),
    case("Softplus", 3 * normal(3, 4)),
    case("Elu", 2 * normal(3, 4)),
    case("Elu", 2 * normal(3, 4), alpha=0.5, label="alpha"),
    case("Selu", 2 * normal(3, 4)),
    case("PRelu", normal(2, 3, 4, 4), positive(3, 1, 1) / 4),
    case("PRelu", normal(3, 4), f64([0.2]), label="scalar-slope"),
    case("ReduceL2", normal(2, 3, 4), opset=13, axes=[-1]),
    case("ReduceL2", normal(2, 3, 4), i64([1]), opset=18, keepdims=0, label="axes-input"),
    case("ReduceSumSquare", normal(2, 3, 4), opset=13, axes=[0, 2]),
    case("ReduceProd", normal(2, 3, 4), opset=13, axes=[1, 2]),
    case("ReduceProd", normal(2, 3), opset=13, keepdims=0, label="all"),
    case("ReduceProd", f64([[1.5, 0.0, -2.0], [0.0, 3.0, 0.0]]), opset=13, axes=[1], label="zeros"),
    case("OneHot", i64([[0, 2], [-1, 1]]), i64(3), f64([0.5, 2.0]), fixed=(2,)),
    case("OneHot", i64([1, 0, 3]), i64(4), i64([0, 1]), axis=0, label="axis0"),
    case("Sign", normal(3, 4)),
    case("Floor", 3 * normal(3, 4)),
    case("Ceil", 3 * normal(3, 4)),
    # at the halves the finite difference spans the jump: only the forward is checked
    case("Round", f64([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.2, -0.7]), fixed=(0,)),
    case("Sin", 3 * normal(3, 4)),
    case("Cos", 3 * normal(3, 4)),
    case("ArgMax", normal(3, 4), axis=1),
    case(
        "ArgMax",
        i64([[1, 3, 3], [2, 2, 0]]),
        axis=-1,
        keepdims=0,
        select_last_index=1,
        label="last-tie",
    ),
    case("InstanceNormalization", normal(2, 3, 4, 5), positive(3), normal(3), epsilon=1e-3),
    case("Gelu", 2 * normal(3, 4), opset=20),
    case("Gelu", 2 * normal(3, 4), opset=20, approximate="tanh", label="tanh"),
    # values and pass-throughs
    case("Shape", normal(2, 3, 4)),
    case("Shape", normal(2, 3, 4), opset=15, start=1, label="start"),
    case("Constant", value=np.arange(6, dtype=np.float32).reshape(2, 3)),
    case("Constant", opset=13, value_ints=[1, 2, 3], label="ints"),
    case("Constant", opset=13, value_float=2.5, label="float"),
    case("ConstantOfShape", i64([2, 3]), value=np.array([1.5], np.float32)),
    case("ConstantOfShape", i64([2, 3]), label="default"),
    case("Identity", normal(2, 3)),
    case("Dropout", normal(2, 3), opset=13),
    case("Dropout", normal(2, 3), opset=13, outputs=2, label="mask"),
    case(
        "Dropout",
        normal(2, 3),
        f64(0.3),
        np.array(False),
        opset=13,
        fixed=(1,),
        label="inputs-not-training",
    ),
]


def attribute(value: Any) -> Any:
    return numpy_helper.from_array(value) if isinstance(value, np.ndarray) else value


def one_node_model(c: Case, dtype: type, as_initializers: bool) -> ModelProto:
    """The case as a model: float inputs in `dtype`, as graph inputs or as initializers."""
    names = [f"x{i}" if x is not None else "" for i, x in enumerate(c.inputs)]
    arrays = {
        name: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x
        for name, x in zip(names, c.inputs, strict=True)
        if x is not None
    }
    outputs = [f"y{i}" for i in range(c.outputs)]
    node = helper.make_node(c.op, names, outputs, **{k: attribute(v) for k, v in c.attrs.items()})
    graph_inputs = [
        helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
        )
        for name, array in arrays.items()
    ]
    initializers = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    # output element types from the executor itself; onnxruntime checks them against its own
    probe = helper.make_graph([node], c.op, [], [], initializer=initializers)
    probe_model = helper.make_model(probe, opset_imports=[helper.make_opsetid("", c.opset)])
    probe_model.graph.output.extend(
        [helper.make_value_info(o, helper.TypeProto()) for o in outputs]
    )
    produced = Executor(probe_model).forward({}, record=False)
    graph = helper.make_graph(
        [node],
        c.op,
        [] if as_initializers else graph_inputs,
        [
            helper.make_tensor_value_info(
                o, helper.np_dtype_to_tensor_dtype(produced[o].dtype), None
            )
            for o in outputs
        ],
        initializer=initializers if as_initializers else [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", c.opset)], ir_version=8)


def feeds_of(c: Case, dtype: type) -> dict[str, np.ndarray]:
    return {
        f"x{i}": x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x
        for i, x in enumerate(c.inputs)
        if x is not None
    }


@pytest.mark.parametrize("c", CASES)
def test_forward_matches_onnxruntime(c: Case) -> None:
    model = one_node_model(c, np.float32, as_initializers=False)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds_of(c, np.float32))
    ours = Executor(model).forward(feeds_of(c, np.float32), record=False)
    for name, want in zip(ours, expected, strict=True):
        got = ours[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)


def weighted_loss(outputs: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> float:
    return float(sum(np.sum(outputs[name] * w) for name, w in weights.items()))


@pytest.mark.parametrize("c", CASES)
def test_gradient_matches_finite_differences(c: Case) -> None:
    executor = Executor(one_node_model(c, np.float64, as_initializers=True), np.float64)
    outputs = executor.forward({})
    # a random linear functional of the float outputs: its gradient covers every output element
    weights = {
        name: RNG.standard_normal(y.shape)
        for name, y in outputs.items()
        if np.issubdtype(y.dtype, np.floating)
    }
    analytic = executor.backward(weights)
    checked = [
        f"x{i}"
        for i, x in enumerate(c.inputs)
        if x is not None and np.issubdtype(x.dtype, np.floating) and i not in c.fixed
    ]
    if not weights:
        assert not any(np.any(analytic[name]) for name in checked)
        return
    for name in checked:
        parameter = executor.parameters[name]
        numeric = np.zeros_like(parameter)
        for index in np.ndindex(parameter.shape):
            saved = parameter[index]
            parameter[index] = saved + FD_STEP
            up = weighted_loss(executor.forward({}, record=False), weights)
            parameter[index] = saved - FD_STEP
            down = weighted_loss(executor.forward({}, record=False), weights)
            parameter[index] = saved
            numeric[index] = (up - down) / (2 * FD_STEP)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_every_operator_in_the_registry_has_a_case() -> None:
    tested = {param.values[0].op for param in CASES}
    assert set(OPERATORS) == tested


def refusal(node: Any) -> str:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedModelError) as raised:
        Executor(model).forward({"x": np.ones((1, 1, 2, 2), np.float32)})
    message = str(raised.value)
    assert len(message) < 300
    return message


def test_an_operator_outside_the_registry_is_refused_by_name() -> None:
    message = refusal(helper.make_node("Celu", ["x"], ["y"], name="celu_7"))
    assert "Celu" in message and "celu_7" in message


def test_dropout_in_training_mode_is_refused() -> None:
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x", "", "training"], ["y"], name="drop_3")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(True), "training")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedModelError, match=r"Dropout node 'drop_3'.*training"):
        Executor(model).forward({"x": np.ones(2, np.float32)})


def test_an_unsupported_attribute_value_is_refused_with_the_node() -> None:
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up_1", mode="linear")
    message = refusal(node)
    assert "Resize" in message and "up_1" in message and "linear" in message


def test_an_einsum_with_an_ellipsis_is_refused_with_the_node() -> None:
    node = helper.make_node("Einsum", ["x"], ["y"], name="swap_2", equation="...ij->...ji")
    message = refusal(node)
    assert "Einsum" in message and "swap_2" in message and "ellipsis" in message
