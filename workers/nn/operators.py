"""ONNX operators in NumPy: each a forward and its vector-Jacobian product side by side.

forward(inputs, attrs) -> (outputs, context): `inputs` in the node's order, None for an optional
input the node leaves out; `attrs` the node's attributes as Python values (tensors as arrays), plus
two keys the executor adds because a few operators depend on them: "opset" (the model's default
domain version) and "num_outputs" (how many outputs the node names).
vjp(context, output_grads) -> input_grads: one per input, None where an input takes no gradient
(shapes, indices, conditions). Broadcasting operators sum gradients back to each input's shape.

Errors an operator raises for an attribute value it does not implement are UnsupportedModelError
with a short phrase; the executor prefixes the node's name and op.
"""

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.errors import UnsupportedModelError

Array = np.ndarray
Inputs = Sequence[Array | None]
Grads = list[Array | None]
Attrs = dict[str, Any]
Forward = Callable[[Inputs, Attrs], tuple[list[Array], Any]]
Vjp = Callable[[Any, list[Array]], Grads]


@dataclass(frozen=True)
class Operator:
    forward: Forward
    vjp: Vjp | None = None  # None: no input of this operator takes a gradient


# TensorProto.DataType numbers (fixed by the ONNX spec) -> NumPy dtypes, for Cast.
ONNX_DTYPES: dict[int, type] = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}  # fmt: skip


def unbroadcast(grad: Array, shape: tuple[int, ...]) -> Array:
    """Sum `grad` over the axes broadcasting added or stretched, back to `shape`."""
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True) if stretched else grad


def optional(inputs: Inputs, index: int) -> Array | None:
    return inputs[index] if index < len(inputs) else None


def ints(values: Array | Sequence[int] | None) -> list[int] | None:
    return None if values is None else [int(v) for v in np.asarray(values).ravel()]


# ---- elementwise ------------------------------------------------------------------------------


def unary(
    function: Callable[[Array, Attrs], Array], derivative: Callable[[Array, Array, Attrs], Array]
) -> Operator:
    """An elementwise operator from y = f(x) and dy/dx given x and y."""

    def forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
        x = inputs[0]
        assert x is not None
        y = np.asarray(function(x, attrs), dtype=x.dtype)
        return [y], (x, y, attrs)

    def vjp(context: tuple[Array, Array, Attrs], grads: list[Array]) -> Grads:
        x, y, attrs = context
        return [(grads[0] * derivative(x, y, attrs)).astype(x.dtype, copy=False)]

    return Operator(forward, vjp)


def binary(
    function: Callable[[Array, Array], Array],
    d_first: Callable[[Array, Array, Array], Array],
    d_second: Callable[[Array, Array, Array], Array],
) -> Operator:
    """A broadcasting operator y = f(a, b) from its two partial derivatives given a, b, y."""

    def forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
        a, b = inputs[0], inputs[1]
        assert a is not None and b is not None
        y = np.asarray(function(a, b)).astype(np.result_type(a, b), copy=False)
        return [y], (a, b, y)

    def vjp(context: tuple[Array, Array, Array], grads: list[Array]) -> Grads:
        a, b, y = context
        g = grads[0]
        return [
            unbroadcast(g * d_first(a, b, y), a.shape).astype(a.dtype, copy=False),
            unbroadcast(g * d_second(a, b, y), b.shape).astype(b.dtype, copy=False),
        ]

    return Operator(forward, vjp)


def sigmoid(x: Array) -> Array:
    # exp of a non-positive number only: no overflow for large |x|
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)
# Maclaurin coefficients of erf(z) * sqrt(pi) / 2 in powers of z^2 (times z): below |z| = 0.5
# ten terms reach 1e-13, where 1 - erfc would lose float32's relative precision.
ERF_SERIES = tuple((-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(10))
ERF_SERIES_BELOW = 0.5
# Numerical Recipes' erfc (Chebyshev fit, relative error < 1.2e-7) for |z| >= 0.5, where
# erf > 0.52: erf = 1 - erfc is then within 2.3e-7 relative.
ERFC_COEFFICIENTS = (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
)  # fmt: skip


def erf(x: Array) -> Array:
    """erf without SciPy, in x's dtype over the whole array (no masked copies): a few dozen
    elementwise passes, where a per-element math.erf would cost a Python call each."""
    # the series is only taken below the threshold: clipping keeps its powers finite elsewhere
    near = np.clip(x, -ERF_SERIES_BELOW, ERF_SERIES_BELOW)
    near_squared = near * near
    series = np.zeros_like(x)
    for coefficient in reversed(ERF_SERIES):
        series = series * near_squared + coefficient
    squared = x * x
    magnitude = np.abs(x)
    t = 1 / (1 + 0.5 * magnitude)
    poly = np.zeros_like(x)
    for coefficient in reversed(ERFC_COEFFICIENTS):
        poly = poly * t + coefficient
    tail = np.sign(x) * (1 - t * np.exp(-squared + poly))
    return np.where(magnitude < ERF_SERIES_BELOW, TWO_OVER_SQRT_PI * near * series, tail)


def hard_sigmoid_gate(x: Array, alpha: float, beta: float) -> Array:
    """Where alpha x + beta lies strictly inside (0, 1): the slope of HardSigmoid is alpha."""
    z = alpha * x + beta
    return (z > 0) & (z < 1)


SELU_ALPHA = 1.67326319217681884765625  # the ONNX defaults, as float32 rounds them
SELU_GAMMA = 1.05070102214050292968750
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
GELU_CUBIC = 0.044715


def gelu_tanh_inner(x: Array) -> Array:
    return np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x))


# opset 20 Gelu's `approximate` -> (forward, derivative)
GELU_FORMS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "none": (
        lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
        lambda x: (
            0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        ),
    ),
    "tanh": (
        lambda x: 0.5 * x * (1 + gelu_tanh_inner(x)),
        lambda x: (
            0.5 * (1 + gelu_tanh_inner(x))
            + 0.5
            * x
            * (1 - gelu_tanh_inner(x) ** 2)
            * SQRT_2_OVER_PI
            * (1 + 3 * GELU_CUBIC * x * x)
        ),
    ),
}


def pow_exponent_grad(a: Array, b: Array, y: Array) -> Array:
    # d a^b / db = a^b log a, defined for a > 0 (zero elsewhere, as PyTorch does)
    positive = a > 0
    return np.where(positive, y * np.log(np.where(positive, a, 1)), 0)


ELEMENTWISE: dict[str, Operator] = {
    "Add": binary(np.add, lambda a, b, y: 1, lambda a, b, y: 1),
    "Sub": binary(np.subtract, lambda a, b, y: 1, lambda a, b, y: -1),
    "Mul": binary(np.multiply, lambda a, b, y: b, lambda a, b, y: a),
    "Div": binary(np.divide, lambda a, b, y: 1 / b, lambda a, b, y: -y / b),
    "Pow": binary(np.power, lambda a, b, y: b * np.power(a, b - 1), pow_exponent_grad),
    "Neg": unary(lambda x, _: -x, lambda x, y, _: -1),
    "Abs": unary(lambda x, _: np.abs(x), lambda x, y, _: np.sign(x)),
    "Sqrt": unary(lambda x, _: np.sqrt(x), lambda x, y, _: 0.5 / y),
    "Reciprocal": unary(lambda x, _: 1 / x, lambda x, y, _: -y * y),
    "Exp": unary(lambda x, _: np.exp(x), lambda x, y, _: y),
    "Log": unary(lambda x, _: np.log(x), lambda x, y, _: 1 / x),
    "Relu": unary(lambda x, _: np.maximum(x, 0), lambda x, y, _: x > 0),
    "LeakyRelu": unary(
        lambda x, a: np.where(x > 0, x, a.get("alpha", 0.01) * x),
        lambda x, y, a: np.where(x > 0, 1, a.get("alpha", 0.01)),
    ),
    "Sigmoid": unary(lambda x, _: sigmoid(x), lambda x, y, _: y * (1 - y)),
    "HardSigmoid": unary(
        lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
        lambda x, y, a: (
            a.get("alpha", 0.2) * hard_sigmoid_gate(x, a.get("alpha", 0.2), a.get("beta", 0.5))
        ),
    ),
    # x * HardSigmoid(x) with alpha 1/6, beta 1/2
    "HardSwish": unary(
        lambda x, _: x * np.clip(x / 6 + 0.5, 0, 1),
        lambda x, y, _: np.clip(x / 6 + 0.5, 0, 1) + x / 6 * hard_sigmoid_gate(x, 1 / 6, 0.5),
    ),
    "Tanh": unary(lambda x, _: np.tanh(x), lambda x, y, _: 1 - y * y),
    "Erf": unary(lambda x, _: erf(x), lambda x, y, _: TWO_OVER_SQRT_PI * np.exp(-x * x)),
    "Sin": unary(lambda x, _: np.sin(x), lambda x, y, _: np.cos(x)),
    "Cos": unary(lambda x, _: np.cos(x), lambda x, y, _: -np.sin(x)),
    "Elu": unary(
        lambda x, a: np.where(x > 0, x, a.get("alpha", 1.0) * np.expm1(np.minimum(x, 0))),
        lambda x, y, a: np.where(x > 0, 1, y + a.get("alpha", 1.0)),
    ),
    "Selu": unary(
        lambda x, a: (
            a.get("gamma", SELU_GAMMA)
            * np.where(x > 0, x, a.get("alpha", SELU_ALPHA) * np.expm1(np.minimum(x, 0)))
        ),
        lambda x, y, a: (
            a.get("gamma", SELU_GAMMA)
            * np.where(x > 0, 1, a.get("alpha", SELU_ALPHA) * np.exp(np.minimum(x, 0)))
        ),
    ),
    "PRelu": binary(
        lambda x, slope: np.where(x > 0, x, slope * x),
        lambda x, slope, y: np.where(x > 0, 1, slope),
        lambda x, slope, y: np.where(x > 0, 0, x),
    ),
    "Softplus": unary(lambda x, _: np.logaddexp(0, x), lambda x, y, _: sigmoid(x)),
    "Gelu": unary(
        lambda x, a: GELU_FORMS[a.get("approximate", "none")][0](x),
        lambda x, y, a: GELU_FORMS[a.get("approximate", "none")][1](x),
    ),
}


# ---- Clip, Where, Cast, Expand -----------------------------------------------------------------


def clip_bounds(inputs: Inputs, attrs: Attrs) -> tuple[Any, Any]:
    """min and max: attributes before opset 11, optional inputs since."""
    if attrs["opset"] < 11:
        return attrs.get("min"), attrs.get("max")
    low, high = optional(inputs, 1), optional(inputs, 2)
    return (None if low is None else low.item()), (None if high is None else high.item())


def clip_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    low, high = clip_bounds(inputs, attrs)
    y = x
    if low is not None:
        y = np.maximum(y, np.asarray(low, x.dtype))
    if high is not None:
        y = np.minimum(y, np.asarray(high, x.dtype))
    # the gradient passes where the input was inside the bounds (inclusive, as PyTorch)
    inside = np.ones(x.shape, bool)
    if low is not None:
        inside &= x >= low
    if high is not None:
        inside &= x <= high
    return [np.array(y, copy=True)], (inside, len(inputs))


def clip_vjp(context: tuple[Array, int], grads: list[Array]) -> Grads:
    inside, count = context
    return [grads[0] * inside, *[None] * (count - 1)]


def where_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    condition, a, b = inputs
    assert condition is not None and a is not None and b is not None
    return [np.where(condition, a, b)], (condition, a.shape, b.shape)


def where_vjp(context: tuple[Array, tuple[int, ...], tuple[int, ...]], grads: list[Array]) -> Grads:
    condition, a_shape, b_shape = context
    g = grads[0]
    return [
        None,
        unbroadcast(np.where(condition, g, 0), a_shape),
        unbroadcast(np.where(condition, 0, g), b_shape),
    ]


def cast_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    to = ONNX_DTYPES.get(attrs["to"])
    if to is None:
        raise UnsupportedModelError(f"Cast to ONNX type {attrs['to']} is not supported")
    return [x.astype(to)], x.dtype


def cast_vjp(dtype: np.dtype, grads: list[Array]) -> Grads:
    # only a float-to-float cast carries a gradient
    floating = np.issubdtype(dtype, np.floating) and np.issubdtype(grads[0].dtype, np.floating)
    return [grads[0].astype(dtype) if floating else None]


def expand_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x, shape = inputs[0], ints(inputs[1])
    assert x is not None and shape is not None
    out = np.broadcast_shapes(x.shape, tuple(shape))
    return [np.broadcast_to(x, out).copy()], x.shape


SELECTION: dict[str, Operator] = {
    "Clip": Operator(clip_forward, clip_vjp),
    "Where": Operator(where_forward, where_vjp),
    "Cast": Operator(cast_forward, cast_vjp),
    "Expand": Operator(expand_forward, lambda shape, grads: [unbroadcast(grads[0], shape), None]),
}


# ---- matrix products ---------------------------------------------------------------------------


def swap(x: Array) -> Array:
    return np.swapaxes(x, -1, -2)


def matmul_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    a, b = inputs[0], inputs[1]
    assert a is not None and b is not None
    # NumPy's 1-D rules: a vector a is [1, k] and b is [k, 1], their added axis dropped after
    a2 = a[None] if a.ndim == 1 else a  # [..., n, k]
    b2 = b[:, None] if b.ndim == 1 else b  # [..., k, m]
    return [np.matmul(a, b)], (a2, b2, a.shape, b.shape)


def matmul_vjp(context: tuple[Array, Array, tuple, tuple], grads: list[Array]) -> Grads:
    a2, b2, a_shape, b_shape = context
    g = grads[0]
    if len(b_shape) == 1:
        g = g[..., None]
    if len(a_shape) == 1:
        g = np.expand_dims(g, -2)  # [..., n, m]
    da = unbroadcast(np.matmul(g, swap(b2)), a2.shape).reshape(a_shape)
    db = unbroadcast(np.matmul(swap(a2), g), b2.shape).reshape(b_shape)
    return [da, db]


def gemm_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    a, b, c = inputs[0], inputs[1], optional(inputs, 2)
    assert a is not None and b is not None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    a2 = a.T if attrs.get("transA", 0) else a  # [n, k]
    b2 = b.T if attrs.get("transB", 0) else b  # [k, m]
    y = (alpha * (a2 @ b2)).astype(a.dtype, copy=False)
    if c is not None:
        y = y + beta * c
    return [y.astype(a.dtype, copy=False)], (a2, b2, c, attrs, len(inputs))


def gemm_vjp(context: tuple[Array, Array, Array | None, Attrs, int], grads: list[Array]) -> Grads:
    a2, b2, c, attrs, count = context
    g = grads[0]  # [n, m]
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    da = alpha * (g @ b2.T)  # [n, k]
    db = alpha * (a2.T @ g)  # [k, m]
    result: Grads = [
        da.T if attrs.get("transA", 0) else da,
        db.T if attrs.get("transB", 0) else db,
    ]
    if count > 2:
        result.append(None if c is None else beta * unbroadcast(g, c.shape))
    return [r if r is None else r.astype(a2.dtype, copy=False) for r in result]


def einsum_terms(equation: str) -> tuple[list[str], str]:
    """The operands' subscripts and the output's; implicit output: the letters used once,
    sorted. Ellipses and repeated letters in one operand (diagonals) are not supported."""
    equation = equation.replace(" ", "")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if "." in equation or any(len(set(term)) != len(term) for term in terms):
        raise UnsupportedModelError(f"Einsum {equation!r} with an ellipsis or a diagonal")
    if "->" not in equation:
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return terms, output


def einsum_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    terms, output = einsum_terms(attrs["equation"])
    operands = [x for x in inputs if x is not None]
    y = np.einsum(f"{','.join(terms)}->{output}", *operands)
    return [np.asarray(y, operands[0].dtype)], (operands, terms, output)


def einsum_vjp(context: tuple[list[Array], list[str], str], grads: list[Array]) -> Grads:
    operands, terms, output = context
    result: Grads = []
    for index, (x, term) in enumerate(zip(operands, terms, strict=True)):
        others = [t for i, t in enumerate(terms) if i != index]
        # letters only this operand has were summed away: their gradient is broadcast back
        reachable = "".join(c for c in term if c in output or any(c in t for t in others))
        spec = ",".join([output, *others]) + "->" + reachable
        partial = np.einsum(spec, grads[0], *[o for i, o in enumerate(operands) if i != index])
        shape = [x.shape[i] if c in reachable else 1 for i, c in enumerate(term)]
        result.append(np.broadcast_to(partial.reshape(shape), x.shape).astype(x.dtype))
    return result


# ---- windows: Conv and pooling -----------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Where a kernel lands on padded input: per spatial axis begin and end padding (end padding
    includes any ceil_mode overhang), output size, stride and dilation."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begins: tuple[int, ...]
    ends: tuple[int, ...]
    overhang: tuple[int, ...]  # the part of `ends` that ceil_mode added
    out: tuple[int, ...]

    def offsets(self) -> list[tuple[slice, ...]]:
        """One slice per kernel offset, picking that offset's input for every output position."""
        return [
            tuple(
                slice(k * d, k * d + s * (n - 1) + 1, s)
                for k, d, s, n in zip(offset, self.dilations, self.strides, self.out, strict=True)
            )
            for offset in itertools.product(*(range(k) for k in self.kernel))
        ]

    def pad_widths(self) -> list[tuple[int, int]]:
        return [(0, 0), (0, 0), *zip(self.begins, self.ends, strict=True)]


def window(spatial: tuple[int, ...], kernel: tuple[int, ...], attrs: Attrs) -> Window:
    """The window geometry of a Conv or pool node: explicit pads, auto_pad and ceil_mode."""
    rank = len(spatial)
    strides = tuple(attrs.get("strides") or [1] * rank)
    dilations = tuple(attrs.get("dilations") or [1] * rank)
    pads = attrs.get("pads") or [0] * (2 * rank)
    begins, ends = list(pads[:rank]), list(pads[rank:])
    spans = [d * (k - 1) + 1 for d, k in zip(dilations, kernel, strict=True)]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for axis in range(rank):
            out = -(-spatial[axis] // strides[axis])
            total = max((out - 1) * strides[axis] + spans[axis] - spatial[axis], 0)
            small, large = total // 2, total - total // 2
            begins[axis], ends[axis] = (
                (small, large) if auto_pad == "SAME_UPPER" else (large, small)
            )
    elif auto_pad == "VALID":
        begins, ends = [0] * rank, [0] * rank
    out, overhang = [], []
    for axis in range(rank):
        room = spatial[axis] + begins[axis] + ends[axis] - spans[axis]
        if attrs.get("ceil_mode", 0):
            size = -(-room // strides[axis]) + 1
            # a window that would start in the end padding is dropped (PyTorch, onnxruntime)
            if (size - 1) * strides[axis] >= spatial[axis] + begins[axis]:
                size -= 1
        else:
            size = room // strides[axis] + 1
        overhang.append(max((size - 1) * strides[axis] - room, 0))
        ends[axis] += overhang[-1]
        out.append(size)
    return Window(
        tuple(kernel), strides, dilations, tuple(begins), tuple(ends), tuple(overhang), tuple(out)
    )


def gather_windows(padded: Array, geometry: Window) -> Array:
    """[N, C, *S] padded -> [N, C, K, *out], K = prod(kernel): im2col, one copy per offset."""
    return np.stack([padded[(..., *offset)] for offset in geometry.offsets()], axis=2)


def scatter_windows(columns: Array, geometry: Window, padded_shape: tuple[int, ...]) -> Array:
    """The adjoint of gather_windows: [N, C, K, *out] summed back onto [N, C, *S] padded."""
    padded = np.zeros(padded_shape, columns.dtype)
    for index, offset in enumerate(geometry.offsets()):
        padded[(..., *offset)] += columns[:, :, index]
    return padded


def unpad(padded: Array, geometry: Window, spatial: tuple[int, ...]) -> Array:
    return padded[(..., *(slice(b, b + n) for b, n in zip(geometry.begins, spatial, strict=True)))]


def conv_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x, w, b = inputs[0], inputs[1], optional(inputs, 2)  # [N, C, *S], [M, C/g, *kernel], [M]
    assert x is not None and w is not None
    groups = attrs.get("group", 1)
    geometry = window(x.shape[2:], w.shape[2:], attrs)
    padded = np.pad(x, geometry.pad_widths())
    batch = x.shape[0]
    columns = gather_windows(padded, geometry).reshape(
        batch, groups, -1, math.prod(geometry.out)
    )  # [N, g, C/g * K, L]
    kernels = w.reshape(1, groups, w.shape[0] // groups, -1)  # [1, g, M/g, C/g * K]
    y = np.matmul(kernels, columns).reshape(batch, w.shape[0], *geometry.out)  # [N, M, *out]
    if b is not None:
        y += b.reshape(-1, *[1] * len(geometry.out))
    context = (columns, w, geometry, x.shape, padded.shape, len(inputs))
    return [y], context


def conv_vjp(context: tuple[Array, Array, Window, tuple, tuple, int], grads: list[Array]) -> Grads:
    columns, w, geometry, x_shape, padded_shape, count = context
    batch, groups, depth, length = columns.shape
    g = grads[0].reshape(batch, groups, -1, length)  # [N, g, M/g, L]
    per_group = g.shape[2]
    # dW: one matmul per group over every sample and position at once
    g_rows = g.transpose(1, 2, 0, 3).reshape(groups, per_group, batch * length)
    column_rows = columns.transpose(1, 2, 0, 3).reshape(groups, depth, batch * length)
    dw = np.matmul(g_rows, swap(column_rows)).reshape(w.shape)
    kernels = w.reshape(1, groups, per_group, depth)
    d_columns = np.matmul(swap(kernels), g)  # [N, g, C/g * K, L]
    d_columns = d_columns.reshape(batch, x_shape[1], -1, *geometry.out)
    dx = unpad(scatter_windows(d_columns, geometry, padded_shape), geometry, x_shape[2:])
    result: Grads = [dx, dw]
    if count > 2:
        result.append(grads[0].sum(axis=(0, *range(2, grads[0].ndim))))
    return result


def transposed_window(spatial: tuple[int, ...], kernel: tuple[int, ...], attrs: Attrs) -> Window:
    """ConvTranspose as the adjoint of a Conv: the Conv whose input is the full (uncropped)
    output and whose output positions are the ConvTranspose's input positions."""
    if attrs.get("output_shape") or attrs.get("auto_pad", "NOTSET") != "NOTSET":
        raise UnsupportedModelError("ConvTranspose with output_shape or auto_pad is not supported")
    rank = len(spatial)
    return Window(
        kernel,
        tuple(attrs.get("strides") or [1] * rank),
        tuple(attrs.get("dilations") or [1] * rank),
        (0,) * rank,
        (0,) * rank,
        (0,) * rank,
        spatial,
    )


def transposed_crop(attrs: Attrs, full: tuple[int, ...]) -> tuple[slice, ...]:
    """The part of the full output a ConvTranspose returns: pads cut from both ends."""
    rank = len(full)
    pads = attrs.get("pads") or [0] * (2 * rank)
    return tuple(slice(b, n - e) for b, e, n in zip(pads[:rank], pads[rank:], full, strict=True))


def conv_transpose_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x, w, b = inputs[0], inputs[1], optional(inputs, 2)  # [N, C, *S], [C, M/g, *kernel], [M]
    assert x is not None and w is not None
    groups = attrs.get("group", 1)
    geometry = transposed_window(x.shape[2:], w.shape[2:], attrs)
    extra = attrs.get("output_padding") or [0] * len(geometry.out)
    full = tuple(
        s * (n - 1) + d * (k - 1) + 1 + p
        for s, n, d, k, p in zip(
            geometry.strides, geometry.out, geometry.dilations, geometry.kernel, extra, strict=True
        )
    )
    batch, channels = x.shape[:2]
    rows = x.reshape(batch, groups, channels // groups, -1)  # [N, g, C/g, L]
    kernels = w.reshape(1, groups, channels // groups, -1)  # [1, g, C/g, M/g * K]
    columns = np.matmul(swap(kernels), rows)  # [N, g, M/g * K, L]
    outputs = w.shape[1] * groups
    columns = columns.reshape(batch, outputs, -1, *geometry.out)  # [N, M, K, *S]
    crop = transposed_crop(attrs, full)
    y = scatter_windows(columns, geometry, (batch, outputs, *full))[(..., *crop)]
    if b is not None:
        y = y + b.reshape(-1, *[1] * len(full))
    return [y], (rows, w, geometry, (batch, outputs, *full), crop, len(inputs))


def conv_transpose_vjp(
    context: tuple[Array, Array, Window, tuple, tuple, int], grads: list[Array]
) -> Grads:
    rows, w, geometry, full_shape, crop, count = context
    batch, groups, per_group, length = rows.shape
    g_full = np.zeros(full_shape, grads[0].dtype)
    g_full[(..., *crop)] = grads[0]
    g_columns = gather_windows(g_full, geometry).reshape(batch, groups, -1, length)
    kernels = w.reshape(1, groups, per_group, -1)  # [1, g, C/g, M/g * K]
    dx = np.matmul(kernels, g_columns).reshape(batch, groups * per_group, *geometry.out)
    # dW: every sample and position in one matmul per group
    x_rows = rows.transpose(1, 2, 0, 3).reshape(groups, per_group, batch * length)
    g_rows = g_columns.transpose(1, 2, 0, 3).reshape(groups, -1, batch * length)
    dw = np.matmul(x_rows, swap(g_rows)).reshape(w.shape)
    result: Grads = [dx, dw]
    if count > 2:
        result.append(grads[0].sum(axis=(0, *range(2, grads[0].ndim))))
    return result


def max_pool_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]  # [N, C, *S]
    assert x is not None
    if attrs.get("storage_order", 0):
        raise UnsupportedModelError("MaxPool storage_order 1 is not supported")
    geometry = window(x.shape[2:], tuple(attrs["kernel_shape"]), attrs)
    padded = np.pad(x, geometry.pad_widths(), constant_values=-np.inf)
    columns = gather_windows(padded, geometry)  # [N, C, K, *out]
    winner = columns.argmax(axis=2)  # [N, C, *out]
    y = np.take_along_axis(columns, winner[:, :, None], axis=2)[:, :, 0]
    return [y], (winner, geometry, x.shape, padded.shape)


def max_pool_vjp(context: tuple[Array, Window, tuple, tuple], grads: list[Array]) -> Grads:
    winner, geometry, x_shape, padded_shape = context
    offsets = np.arange(math.prod(geometry.kernel)).reshape(1, 1, -1, *[1] * (winner.ndim - 2))
    chosen = winner[:, :, None] == offsets  # [N, C, K, *out]: the gradient goes to each maximum
    columns = np.where(chosen, grads[0][:, :, None], 0).astype(grads[0].dtype)
    return [unpad(scatter_windows(columns, geometry, padded_shape), geometry, x_shape[2:])]


def average_pool_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]  # [N, C, *S]
    assert x is not None
    geometry = window(x.shape[2:], tuple(attrs["kernel_shape"]), attrs)
    padded = np.pad(x, geometry.pad_widths())
    # the divisor counts input cells, and explicit padding under count_include_pad (never the
    # ceil_mode overhang)
    explicit = [
        (b, e - o)
        for b, e, o in zip(geometry.begins, geometry.ends, geometry.overhang, strict=True)
    ]
    cells = np.pad(
        np.ones((1, 1, *x.shape[2:]), x.dtype),
        [(0, 0), (0, 0), *explicit],
        constant_values=attrs.get("count_include_pad", 0),
    )
    cells = np.pad(cells, [(0, 0), (0, 0), *[(0, o) for o in geometry.overhang]])
    counts = gather_windows(cells, geometry).sum(axis=2)  # [1, 1, *out]
    y = gather_windows(padded, geometry).sum(axis=2) / counts  # [N, C, *out]
    return [y.astype(x.dtype, copy=False)], (counts, geometry, x.shape, padded.shape)


def average_pool_vjp(context: tuple[Array, Window, tuple, tuple], grads: list[Array]) -> Grads:
    counts, geometry, x_shape, padded_shape = context
    share = (grads[0] / counts)[:, :, None]  # [N, C, 1, *out]
    columns = np.broadcast_to(
        share, (*share.shape[:2], math.prod(geometry.kernel), *share.shape[3:])
    )
    return [unpad(scatter_windows(columns, geometry, padded_shape), geometry, x_shape[2:])]


def global_average_pool_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]  # [N, C, *S]
    assert x is not None
    return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)], x.shape


def global_average_pool_vjp(shape: tuple[int, ...], grads: list[Array]) -> Grads:
    return [np.broadcast_to(grads[0] / math.prod(shape[2:]), shape).copy()]


WINDOWED: dict[str, Operator] = {
    "Conv": Operator(conv_forward, conv_vjp),
    "ConvTranspose": Operator(conv_transpose_forward, conv_transpose_vjp),
    "MaxPool": Operator(max_pool_forward, max_pool_vjp),
    "AveragePool": Operator(average_pool_forward, average_pool_vjp),
    "GlobalAveragePool": Operator(global_average_pool_forward, global_average_pool_vjp),
}


# ---- normalisation and softmax -----------------------------------------------------------------


def softmax_axes(x: Array, attrs: Attrs) -> tuple[int, ...]:
    """Before opset 13 the input is flattened to 2-D at `axis` (default 1): the softmax spans
    every axis from there; since 13 it runs along `axis` (default -1) alone."""
    if attrs["opset"] < 13:
        return tuple(range(attrs.get("axis", 1) % x.ndim, x.ndim))
    return (attrs.get("axis", -1) % x.ndim,)


def log_softmax_of(x: Array, axes: tuple[int, ...]) -> Array:
    shifted = x - x.max(axis=axes, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axes, keepdims=True))


def softmax_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    axes = softmax_axes(x, attrs)
    y = np.exp(log_softmax_of(x, axes))
    return [y], (y, axes)


def softmax_vjp(context: tuple[Array, tuple[int, ...]], grads: list[Array]) -> Grads:
    y, axes = context
    g = grads[0]
    return [y * (g - (g * y).sum(axis=axes, keepdims=True))]


def log_softmax_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    axes = softmax_axes(x, attrs)
    y = log_softmax_of(x, axes)
    return [y], (y, axes)


def log_softmax_vjp(context: tuple[Array, tuple[int, ...]], grads: list[Array]) -> Grads:
    y, axes = context
    g = grads[0]
    return [g - np.exp(y) * g.sum(axis=axes, keepdims=True)]


def normalise(x: Array, axes: tuple[int, ...], epsilon: float) -> tuple[Array, Array]:
    """(x - mean) / sqrt(var + eps) over `axes`, and the inverse deviation [.., 1 on axes]."""
    centred = x - x.mean(axis=axes, keepdims=True)
    inverse = 1 / np.sqrt((centred * centred).mean(axis=axes, keepdims=True) + epsilon)
    return centred * inverse, inverse


def normalised_input_grad(
    d_normal: Array, normal: Array, inverse: Array, axes: tuple[int, ...]
) -> Array:
    """d x from d normal: inv/D * (D dn - sum dn - n sum(dn n)), since the mean and the
    variance both depend on x."""
    size = math.prod(normal.shape[a] for a in axes)
    return (inverse / size) * (
        size * d_normal
        - d_normal.sum(axis=axes, keepdims=True)
        - normal * (d_normal * normal).sum(axis=axes, keepdims=True)
    )


def layer_norm_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x, scale, bias = inputs[0], inputs[1], optional(inputs, 2)  # [..., *D], [*D], [*D]
    assert x is not None and scale is not None
    axes = tuple(range(attrs.get("axis", -1) % x.ndim, x.ndim))
    normal, inverse = normalise(x, axes, attrs.get("epsilon", 1e-5))
    y = normal * scale + (0 if bias is None else bias)
    return [y.astype(x.dtype, copy=False)], (normal, inverse, scale, axes, bias is not None)


def layer_norm_vjp(context: tuple[Array, Array, Array, tuple, bool], grads: list[Array]) -> Grads:
    normal, inverse, scale, axes, has_bias = context
    g = grads[0]
    dx = normalised_input_grad(g * scale, normal, inverse, axes)
    result: Grads = [dx, unbroadcast(g * normal, scale.shape)]
    if has_bias:
        result.append(unbroadcast(g, scale.shape))
    return result


def channel_view(v: Array, ndim: int) -> Array:
    """[C] -> [1, C, 1, ...] to broadcast against [N, C, *S]."""
    return v.reshape(1, -1, *[1] * (ndim - 2))


def instance_norm_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x, scale, bias = inputs  # [N, C, *S], [C], [C]
    assert x is not None and scale is not None and bias is not None
    axes = tuple(range(2, x.ndim))  # each sample's channel on its own
    normal, inverse = normalise(x, axes, attrs.get("epsilon", 1e-5))
    y = normal * channel_view(scale, x.ndim) + channel_view(bias, x.ndim)
    return [y.astype(x.dtype, copy=False)], (normal, inverse, scale, axes)


def instance_norm_vjp(context: tuple[Array, Array, Array, tuple], grads: list[Array]) -> Grads:
    normal, inverse, scale, axes = context
    g = grads[0]
    others = (0, *axes)
    dx = normalised_input_grad(g * channel_view(scale, g.ndim), normal, inverse, axes)
    return [dx, (g * normal).sum(axis=others), g.sum(axis=others)]


def batch_norm_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    # inference form: running mean and variance are inputs, not batch statistics
    if attrs.get("training_mode", 0):
        raise UnsupportedModelError("BatchNormalization training_mode 1 is not supported")
    x, scale, bias, mean, var = inputs  # [N, C, *S], then four [C]
    assert x is not None and scale is not None and bias is not None
    assert mean is not None and var is not None
    inverse = 1 / np.sqrt(var + attrs.get("epsilon", 1e-5))  # [C]
    centred = x - channel_view(mean, x.ndim)
    y = centred * channel_view(scale * inverse, x.ndim) + channel_view(bias, x.ndim)
    return [y.astype(x.dtype, copy=False)], (centred, scale, inverse)


def batch_norm_vjp(context: tuple[Array, Array, Array], grads: list[Array]) -> Grads:
    centred, scale, inverse = context
    g = grads[0]
    ndim = g.ndim
    others = (0, *range(2, ndim))
    g_sum = g.sum(axis=others)  # [C]
    g_centred = (g * centred).sum(axis=others)  # [C]
    return [
        g * channel_view(scale * inverse, ndim),
        g_centred * inverse,
        g_sum,
        -g_sum * scale * inverse,
        -0.5 * g_centred * scale * inverse**3,
    ]


NORMALISATION: dict[str, Operator] = {
    "Softmax": Operator(softmax_forward, softmax_vjp),
    "LogSoftmax": Operator(log_softmax_forward, log_softmax_vjp),
    "LayerNormalization": Operator(layer_norm_forward, layer_norm_vjp),
    "BatchNormalization": Operator(batch_norm_forward, batch_norm_vjp),
    "InstanceNormalization": Operator(instance_norm_forward, instance_norm_vjp),
}


# ---- reductions --------------------------------------------------------------------------------


def reduce_axes(x: Array, inputs: Inputs, attrs: Attrs) -> tuple[int, ...]:
    """The axes: an attribute in older opsets, an optional input in newer (ReduceSum 13,
    ReduceMean 18); none given means all, or none under noop_with_empty_axes."""
    given = ints(optional(inputs, 1))
    if given is None:
        given = attrs.get("axes")
    if not given:
        return () if attrs.get("noop_with_empty_axes", 0) else tuple(range(x.ndim))
    return tuple(sorted(a % x.ndim for a in given))


def reduction(mean: bool) -> Operator:
    def forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
        x = inputs[0]
        assert x is not None
        axes = reduce_axes(x, inputs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        y = x.mean(axis=axes, keepdims=keep) if mean else x.sum(axis=axes, keepdims=keep)
        return [np.asarray(y, x.dtype)], (x.shape, axes, len(inputs))

    def vjp(context: tuple[tuple[int, ...], tuple[int, ...], int], grads: list[Array]) -> Grads:
        shape, axes, count = context
        g = np.expand_dims(grads[0], axes) if grads[0].ndim < len(shape) else grads[0]
        if mean:
            g = g / math.prod(shape[a] for a in axes)
        return [np.broadcast_to(g, shape).copy(), *[None] * (count - 1)]

    return Operator(forward, vjp)


def reduce_l2_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    axes = reduce_axes(x, inputs, attrs)
    norm = np.sqrt((x * x).sum(axis=axes, keepdims=True))
    y = norm if attrs.get("keepdims", 1) else np.squeeze(norm, axis=axes)
    return [y], (x, norm, axes, len(inputs))


def reduce_l2_vjp(context: tuple[Array, Array, tuple[int, ...], int], grads: list[Array]) -> Grads:
    x, norm, axes, count = context
    g = np.expand_dims(grads[0], axes) if grads[0].ndim < x.ndim else grads[0]
    # d ||x|| / dx = x / ||x||; a zero norm has no direction, its subgradient 0 is taken
    direction = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return [g * direction, *[None] * (count - 1)]


def reduce_sum_square_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    axes = reduce_axes(x, inputs, attrs)
    y = (x * x).sum(axis=axes, keepdims=bool(attrs.get("keepdims", 1)))
    return [np.asarray(y, x.dtype)], (x, axes, len(inputs))


def reduce_sum_square_vjp(context: tuple[Array, tuple[int, ...], int], grads: list[Array]) -> Grads:
    x, axes, count = context
    g = np.expand_dims(grads[0], axes) if grads[0].ndim < x.ndim else grads[0]
    return [2 * g * x, *[None] * (count - 1)]


def reduce_prod_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    axes = reduce_axes(x, inputs, attrs)
    y = x.prod(axis=axes, keepdims=bool(attrs.get("keepdims", 1)))
    return [np.asarray(y, x.dtype)], (x, axes, len(inputs))


def reduce_prod_vjp(context: tuple[Array, tuple[int, ...], int], grads: list[Array]) -> Grads:
    x, axes, count = context
    g = np.expand_dims(grads[0], axes) if grads[0].ndim < x.ndim else grads[0]
    # the product of every other element, from exclusive prefix and suffix products (y / x
    # would divide by zero)
    kept = [a for a in range(x.ndim) if a not in axes]
    moved = np.moveaxis(x, axes, range(len(kept), x.ndim))  # [*kept, *reduced]
    rows = moved.reshape(*moved.shape[: len(kept)], -1)  # [*kept, R]
    ones = np.ones_like(rows[..., :1])
    prefix = np.cumprod(np.concatenate([ones, rows[..., :-1]], axis=-1), axis=-1)
    suffix = np.cumprod(np.concatenate([ones, rows[..., :0:-1]], axis=-1), axis=-1)[..., ::-1]
    others = np.moveaxis((prefix * suffix).reshape(moved.shape), range(len(kept), x.ndim), axes)
    return [g * others, *[None] * (count - 1)]


REDUCTIONS: dict[str, Operator] = {
    "ReduceL2": Operator(reduce_l2_forward, reduce_l2_vjp),
    "ReduceSumSquare": Operator(reduce_sum_square_forward, reduce_sum_square_vjp),
    "ReduceProd": Operator(reduce_prod_forward, reduce_prod_vjp),
    "ReduceMean": reduction(mean=True),
    "ReduceSum": reduction(mean=False),
}


# ---- shapes: reshapes, slices and joins --------------------------------------------------------


def reshaped(shape_of: Callable[[Array, Inputs, Attrs], tuple[int, ...]]) -> Operator:
    """An operator that only changes the shape: its gradient is reshaped back."""

    def forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
        x = inputs[0]
        assert x is not None
        return [x.reshape(shape_of(x, inputs, attrs))], (x.shape, len(inputs))

    def vjp(context: tuple[tuple[int, ...], int], grads: list[Array]) -> Grads:
        shape, count = context
        return [grads[0].reshape(shape), *[None] * (count - 1)]

    return Operator(forward, vjp)


def reshape_shape(x: Array, inputs: Inputs, attrs: Attrs) -> tuple[int, ...]:
    shape = ints(inputs[1])
    assert shape is not None
    # 0 copies the input's size at that position (unless allowzero); -1 is inferred by NumPy
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if n == 0 else n for i, n in enumerate(shape)]
    return tuple(shape)


def flatten_shape(x: Array, inputs: Inputs, attrs: Attrs) -> tuple[int, ...]:
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis  # in [-rank, rank]: -1 keeps the last axis apart
    return math.prod(x.shape[:axis]), math.prod(x.shape[axis:])


def given_axes(inputs: Inputs, attrs: Attrs) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, an input since."""
    from_input = ints(optional(inputs, 1))
    return from_input if from_input is not None else attrs.get("axes")


def squeeze_shape(x: Array, inputs: Inputs, attrs: Attrs) -> tuple[int, ...]:
    axes = given_axes(inputs, attrs)
    drop = {a % x.ndim for a in axes} if axes else {i for i, n in enumerate(x.shape) if n == 1}
    return tuple(n for i, n in enumerate(x.shape) if i not in drop)


def unsqueeze_shape(x: Array, inputs: Inputs, attrs: Attrs) -> tuple[int, ...]:
    axes = given_axes(inputs, attrs) or []
    rank = x.ndim + len(axes)
    return np.expand_dims(np.empty(x.shape, bool), tuple(a % rank for a in axes)).shape


def transpose_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    perm = attrs.get("perm") or list(reversed(range(x.ndim)))
    return [np.ascontiguousarray(x.transpose(perm))], perm


def transpose_vjp(perm: list[int], grads: list[Array]) -> Grads:
    return [grads[0].transpose(np.argsort(perm))]


def concat_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    axis = attrs["axis"]
    present = [x for x in inputs if x is not None]
    return [np.concatenate(present, axis=axis)], (axis, [x.shape[axis] for x in present])


def concat_vjp(context: tuple[int, list[int]], grads: list[Array]) -> Grads:
    axis, sizes = context
    return list(np.split(grads[0], np.cumsum(sizes)[:-1], axis=axis))


def split_sizes(x: Array, inputs: Inputs, attrs: Attrs, axis: int) -> list[int]:
    """Sizes from the `split` input (opset 13+) or attribute; otherwise equal parts, the last
    smaller when num_outputs does not divide the axis (opset 18)."""
    sizes = ints(optional(inputs, 1))
    if sizes is None:
        sizes = attrs.get("split")
    if sizes:
        return list(sizes)
    parts = attrs["num_outputs"]
    size = -(-x.shape[axis] // parts)
    return [size] * (parts - 1) + [x.shape[axis] - size * (parts - 1)]


def split_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    axis = attrs.get("axis", 0) % x.ndim
    sizes = split_sizes(x, inputs, attrs, axis)
    parts = np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    return [np.ascontiguousarray(p) for p in parts], (axis, len(inputs))


def split_vjp(context: tuple[int, int], grads: list[Array]) -> Grads:
    axis, count = context
    return [np.concatenate(grads, axis=axis), *[None] * (count - 1)]


def slices_of(x: Array, inputs: Inputs, attrs: Attrs) -> tuple[slice, ...]:
    """Slice's starts/ends/axes: attributes before opset 10, inputs (with steps) since. ONNX
    clamps out-of-range starts and ends exactly as Python slices do."""
    if attrs["opset"] < 10:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes, steps = ints(optional(inputs, 3)), ints(optional(inputs, 4))
    assert starts is not None and ends is not None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    chosen = [slice(None)] * x.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        chosen[axis % x.ndim] = slice(start, end, step)
    return tuple(chosen)


def slice_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    chosen = slices_of(x, inputs, attrs)
    return [x[chosen].copy()], (x.shape, chosen, len(inputs))


def slice_vjp(context: tuple[tuple[int, ...], tuple[slice, ...], int], grads: list[Array]) -> Grads:
    shape, chosen, count = context
    dx = np.zeros(shape, grads[0].dtype)
    dx[chosen] = grads[0]
    return [dx, *[None] * (count - 1)]


def gather_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x, indices = inputs[0], inputs[1]
    assert x is not None and indices is not None
    axis = attrs.get("axis", 0) % x.ndim
    return [np.take(x, indices, axis=axis)], (x.shape, indices, axis)


def gather_vjp(context: tuple[tuple[int, ...], Array, int], grads: list[Array]) -> Grads:
    shape, indices, axis = context
    dx = np.zeros(shape, grads[0].dtype)
    # an embedding row taken several times sums its gradients: scatter-add
    index_axes = list(range(axis, axis + indices.ndim))
    np.add.at(
        np.moveaxis(dx, axis, 0),
        np.where(indices < 0, indices + shape[axis], indices),
        np.moveaxis(grads[0], index_axes, list(range(indices.ndim))),
    )
    return [dx, None]


def pad_amounts(x: Array, inputs: Inputs, attrs: Attrs) -> tuple[list[int], list[int], Any]:
    """Begin and end padding per axis (negative crops) and the fill value: attributes before
    opset 11, inputs since (with `axes` since 18)."""
    if attrs.get("mode", "constant") != "constant":
        raise UnsupportedModelError(f"Pad mode {attrs['mode']} is not supported (constant only)")
    if attrs["opset"] < 11:
        pads, value, axes = attrs["pads"], attrs.get("value", 0.0), None
    else:
        pads = ints(inputs[1])
        fill = optional(inputs, 2)
        value = 0 if fill is None else fill.item()
        axes = ints(optional(inputs, 3))
    assert pads is not None
    axes = [a % x.ndim for a in axes] if axes else list(range(x.ndim))
    begins, ends = [0] * x.ndim, [0] * x.ndim
    for index, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[index], pads[index + len(axes)]
    return begins, ends, value


def kept_region(
    shape: tuple[int, ...], begins: list[int], ends: list[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of the input that survives padding, as slices of the input and of the output."""
    source, target = [], []
    for n, begin, end in zip(shape, begins, ends, strict=True):
        first, last = max(-begin, 0), n - max(-end, 0)
        source.append(slice(first, last))
        target.append(slice(max(begin, 0), max(begin, 0) + last - first))
    return tuple(source), tuple(target)


def pad_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    begins, ends, value = pad_amounts(x, inputs, attrs)
    out = [n + b + e for n, b, e in zip(x.shape, begins, ends, strict=True)]
    y = np.full(out, value, x.dtype)
    source, target = kept_region(x.shape, begins, ends)
    y[target] = x[source]
    return [y], (x.shape, source, target, len(inputs))


def pad_vjp(context: tuple[tuple[int, ...], tuple, tuple, int], grads: list[Array]) -> Grads:
    shape, source, target, count = context
    dx = np.zeros(shape, grads[0].dtype)
    dx[source] = grads[0][target]
    return [dx, *[None] * (count - 1)]


# Resize: where output position o along an axis samples the input, before rounding, given the
# input size, output size and scale.
RESIZE_COORDINATES: dict[str, Callable[[Array, int, int, float], Array]] = {
    "half_pixel": lambda o, n_in, n_out, s: (o + 0.5) / s - 0.5,
    "asymmetric": lambda o, n_in, n_out, s: o / s,
    "align_corners": lambda o, n_in, n_out, s: o * (n_in - 1) / max(n_out - 1, 1),
    "pytorch_half_pixel": lambda o, n_in, n_out, s: (o + 0.5) / s - 0.5 if n_out > 1 else 0 * o,
    "tf_half_pixel_for_nearest": lambda o, n_in, n_out, s: (o + 0.5) / s,
}
NEAREST_ROUNDING: dict[str, Callable[[Array], Array]] = {
    "round_prefer_floor": lambda c: np.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: np.floor(c + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
}


def resize_plan(x: Array, inputs: Inputs, attrs: Attrs) -> list[Array]:
    """Per axis, the input index each output position copies (nearest neighbour)."""
    mode = attrs.get("mode", "nearest")
    coordinates = attrs.get("coordinate_transformation_mode", "half_pixel")
    rounding = attrs.get("nearest_mode", "round_prefer_floor")
    if mode != "nearest" or coordinates not in RESIZE_COORDINATES or attrs.get("axes"):
        raise UnsupportedModelError(
            f"Resize mode {mode} with {coordinates} is not supported (nearest only, no axes)"
        )
    # opset 10: Resize(X, scales); opset 11+: Resize(X, roi, scales, sizes)
    scales_input = inputs[1] if attrs["opset"] < 11 else optional(inputs, 2)
    sizes = ints(optional(inputs, 3)) if attrs["opset"] >= 11 else None
    if sizes:
        scales = [n_out / n_in for n_out, n_in in zip(sizes, x.shape, strict=True)]
    else:
        assert scales_input is not None
        scales = [float(s) for s in scales_input]
        sizes = [math.floor(n * s) for n, s in zip(x.shape, scales, strict=True)]
    plan = []
    for n_in, n_out, scale in zip(x.shape, sizes, scales, strict=True):
        where = RESIZE_COORDINATES[coordinates](
            np.arange(n_out, dtype=np.float64), n_in, n_out, scale
        )
        plan.append(np.clip(NEAREST_ROUNDING[rounding](where), 0, n_in - 1).astype(np.int64))
    return plan


def resize_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    plan = resize_plan(x, inputs, attrs)
    return [x[np.ix_(*plan)]], (x.shape, plan, len(inputs))


def resize_vjp(context: tuple[tuple[int, ...], list[Array], int], grads: list[Array]) -> Grads:
    shape, plan, count = context
    dx = np.zeros(shape, grads[0].dtype)
    np.add.at(dx, np.ix_(*plan), grads[0])
    return [dx, *[None] * (count - 1)]


SHAPES: dict[str, Operator] = {
    "Reshape": reshaped(reshape_shape),
    "Flatten": reshaped(flatten_shape),
    "Squeeze": reshaped(squeeze_shape),
    "Unsqueeze": reshaped(unsqueeze_shape),
    "Transpose": Operator(transpose_forward, transpose_vjp),
    "Concat": Operator(concat_forward, concat_vjp),
    "Split": Operator(split_forward, split_vjp),
    "Slice": Operator(slice_forward, slice_vjp),
    "Gather": Operator(gather_forward, gather_vjp),
    "Pad": Operator(pad_forward, pad_vjp),
    "Resize": Operator(resize_forward, resize_vjp),
}


# ---- variadic, comparisons and masks: what attention masks and position ids are built from ---


def variadic(weight: Callable[[Array, Array], Array], ufunc: np.ufunc) -> Operator:
    """Max, Min, Sum over any number of broadcasting inputs; each input's gradient is the
    output's times weight(input, output), summed back to the input's shape."""

    def forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
        present = [x for x in inputs if x is not None]
        y = ufunc.reduce(np.broadcast_arrays(*present)).astype(present[0].dtype, copy=False)
        return [y], (present, y)

    def vjp(context: tuple[list[Array], Array], grads: list[Array]) -> Grads:
        present, y = context
        return [unbroadcast(grads[0] * weight(x, y), x.shape).astype(x.dtype) for x in present]

    return Operator(forward, vjp)


def compare(function: Callable[..., Array]) -> Operator:
    """A result no gradient flows through: booleans, and piecewise-constant values."""

    def forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
        return [np.asarray(function(*inputs))], None

    return Operator(forward)


def argmax_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    axis = attrs.get("axis", 0) % x.ndim
    # select_last_index: the last of tied maxima, found as the first in the reversed axis
    flipped = np.flip(x, axis) if attrs.get("select_last_index", 0) else x
    index = np.argmax(flipped, axis=axis, keepdims=bool(attrs.get("keepdims", 1)))
    if attrs.get("select_last_index", 0):
        index = x.shape[axis] - 1 - index
    return [index.astype(np.int64)], None


def one_hot_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    indices, depth, values = inputs  # [*I], scalar, [off, on]
    assert indices is not None and depth is not None and values is not None
    size = int(depth.item())
    wrapped = np.where(indices < 0, indices + size, indices).astype(np.int64)
    hot = np.expand_dims(wrapped, -1) == np.arange(size)  # [*I, depth]
    hot = np.moveaxis(hot, -1, attrs.get("axis", -1) % hot.ndim)
    return [np.where(hot, values[1], values[0]).astype(values.dtype)], None


def range_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    start, limit, delta = inputs
    assert start is not None and limit is not None and delta is not None
    return [np.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)], None


def tile_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x, repeats = inputs[0], ints(inputs[1])
    assert x is not None and repeats is not None
    return [np.tile(x, repeats)], (x.shape, repeats)


def tile_vjp(context: tuple[tuple[int, ...], list[int]], grads: list[Array]) -> Grads:
    shape, repeats = context
    # [r0 * s0, r1 * s1, ...] -> [r0, s0, r1, s1, ...], summed over the repeat axes
    interleaved = [n for pair in zip(repeats, shape, strict=True) for n in pair]
    summed = grads[0].reshape(interleaved).sum(axis=tuple(range(0, 2 * len(shape), 2)))
    return [summed, None]


def trilu_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x, k = inputs[0], optional(inputs, 1)
    assert x is not None
    diagonal = 0 if k is None else int(k)
    keep = np.triu if attrs.get("upper", 1) else np.tril
    return [keep(x, diagonal)], (keep, diagonal, len(inputs))


def trilu_vjp(context: tuple[Callable[[Array, int], Array], int, int], grads: list[Array]) -> Grads:
    keep, diagonal, count = context
    return [keep(grads[0], diagonal), *[None] * (count - 1)]


def reduce_max_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    axes = reduce_axes(x, inputs, attrs)
    kept = x.max(axis=axes, keepdims=True)
    # tied maxima share the gradient equally
    winners = x == kept
    share = winners / winners.sum(axis=axes, keepdims=True)
    y = kept if attrs.get("keepdims", 1) else np.squeeze(kept, axis=axes)
    return [y], (share.astype(x.dtype), axes, len(inputs))


def reduce_max_vjp(context: tuple[Array, tuple[int, ...], int], grads: list[Array]) -> Grads:
    share, axes, count = context
    g = np.expand_dims(grads[0], axes) if grads[0].ndim < share.ndim else grads[0]
    return [g * share, *[None] * (count - 1)]


MASKS: dict[str, Operator] = {
    # ties (probability zero on real data) pass the gradient to every input holding the extreme
    "Max": variadic(lambda x, y: x == y, np.maximum),
    "Min": variadic(lambda x, y: x == y, np.minimum),
    "Sum": variadic(lambda x, y: 1, np.add),
    "ReduceMax": Operator(reduce_max_forward, reduce_max_vjp),
    "Equal": compare(np.equal),
    "Less": compare(np.less),
    "Greater": compare(np.greater),
    "Not": compare(np.logical_not),
    "And": compare(np.logical_and),
    "Or": compare(np.logical_or),
    # piecewise constant: their gradient is zero wherever it exists, so none flows
    "Sign": compare(np.sign),
    "Floor": compare(np.floor),
    "Ceil": compare(np.ceil),
    "Round": compare(np.round),  # half to even, as ONNX
    "Range": Operator(range_forward),
    "OneHot": Operator(one_hot_forward),
    "ArgMax": Operator(argmax_forward),
    "Tile": Operator(tile_forward, tile_vjp),
    "Trilu": Operator(trilu_forward, trilu_vjp),
}


# ---- values without gradients, and the pass-throughs -------------------------------------------


def shape_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    start, end = attrs.get("start", 0), attrs.get("end")
    return [np.array(x.shape[start:end], np.int64)], None


CONSTANT_ATTRIBUTES: dict[str, type | None] = {
    "value": None,  # a tensor, already an array with its own dtype
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def constant_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    # exactly one of these attributes holds the value
    for name, dtype in CONSTANT_ATTRIBUTES.items():
        if name in attrs:
            return [np.array(attrs[name], dtype=dtype)], None
    raise UnsupportedModelError("Constant without a value, value_float(s) or value_int(s)")


def constant_of_shape_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    shape = ints(inputs[0])
    assert shape is not None
    value = attrs.get("value", np.zeros(1, np.float32))
    return [np.full(shape, value.ravel()[0], value.dtype)], None


def identity_forward(inputs: Inputs, attrs: Attrs) -> tuple[list[Array], Any]:
    x = inputs[0]
    assert x is not None
    # Dropout in inference passes x through; its optional mask output keeps every element.
    # Training mode (an attribute before opset 12, an input since) would drop at random.
    training = optional(inputs, 2)
    if attrs.get("is_test", 1) == 0 or (training is not None and bool(training)):
        raise UnsupportedModelError("Dropout in training mode is not supported (inference only)")
    masks = [np.ones(x.shape, bool)] * (attrs["num_outputs"] - 1)
    return [x, *masks], len(inputs)


def identity_vjp(count: int, grads: list[Array]) -> Grads:
    return [grads[0], *[None] * (count - 1)]


VALUES: dict[str, Operator] = {
    "Shape": Operator(shape_forward),
    "Constant": Operator(constant_forward),
    "ConstantOfShape": Operator(constant_of_shape_forward),
    "Identity": Operator(identity_forward, identity_vjp),
    "Dropout": Operator(identity_forward, identity_vjp),
}


OPERATORS: dict[str, Operator] = {
    **ELEMENTWISE,
    **SELECTION,
    "MatMul": Operator(matmul_forward, matmul_vjp),
    "Gemm": Operator(gemm_forward, gemm_vjp),
    "Einsum": Operator(einsum_forward, einsum_vjp),
    **WINDOWED,
    **NORMALISATION,
    **REDUCTIONS,
    **SHAPES,
    **MASKS,
    **VALUES,
}
