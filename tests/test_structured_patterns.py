"""Structured pruning on the patterns of issue 15, graphs built with onnx.helper: each pruned
model must equal the original with the same channels' activations set to zero.

The reference zeroes the removed channels where they are consumed: a 0/1 mask multiplies the
consumer's input (the next Conv's, Gemm's or MatMul's) in the ORIGINAL model. That is the exact
meaning of removal: a removed channel's bias or BatchNorm shift still makes it a constant before
the consumer, which zeroing the producing weights would not remove. Which channels went is read
back from the pruned model's 1-D parameters (biases, BatchNorm scales), which pruning only
slices, so the reference does not depend on the group finder it checks.
"""

import numpy as np
import onnx
import pytest
from graphs import make_model
from helpers import run
from onnx import TensorProto, helper, numpy_helper

from schemas import PruneParams
from workers.compress.prune import copy_model, prune_model
from workers.errors import UnsupportedModelError
from workers.graph import channels
from workers.graph.encoding import encode
from workers.graph.load import parse_model
from workers.graph.walk import attribute

RNG_SEED = 0


class Builder:
    """Nodes and random constants for one graph."""

    def __init__(self, seed: int = RNG_SEED) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def rand(self, name: str, *shape: int, scale: float = 0.5) -> str:
        return self.const(name, (scale * self.rng.standard_normal(shape)).astype(np.float32))

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def conv(self, name: str, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1) -> str:
        weight = self.rand(f"{name}_w", c_out, c_in // group, k, k)
        bias = self.rand(f"{name}_b", c_out)
        pads = [k // 2] * 4
        return self.node("Conv", [x, weight, bias], name, group=group, pads=pads)

    def bn(self, name: str, x: str, c: int) -> str:
        scale = self.const(f"{name}_scale", self.rng.uniform(0.5, 1.5, c).astype(np.float32))
        shift = self.rand(f"{name}_shift", c)
        mean = self.rand(f"{name}_mean", c)
        var = self.const(f"{name}_var", self.rng.uniform(0.5, 2.0, c).astype(np.float32))
        return self.node("BatchNormalization", [x, scale, shift, mean, var], name)

    def head(self, x: str, c: int, classes: int = 4) -> str:
        """GlobalAveragePool -> Flatten -> Gemm: the classifier head of a conv net."""
        pooled = self.node("GlobalAveragePool", [x], "pool")
        flat = self.node("Flatten", [pooled], "flat")
        weight, bias = self.rand("fc_w", c, classes), self.rand("fc_b", classes)
        return self.node("Gemm", [flat, weight, bias], "Y")

    def model(self, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "pattern", inputs, outputs, self.inits)
        return make_model(graph)


def image_input(shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)


def logits(classes: int = 4) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", classes])


def prune(model: onnx.ModelProto, sparsity: float = 0.5):
    outcome = prune_model(
        copy_model(model), PruneParams(granularity="structured", sparsity=sparsity)
    )
    data, _ = encode(outcome.model, "dense", outcome.pruned)
    onnx.checker.check_model(parse_model(data), full_check=True)
    return outcome, parse_model(data)


def tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def kept(original: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """0/1 per original entry of a 1-D parameter: 1 where the pruned model still has it."""
    keep = np.isin(original, pruned).astype(np.float32)
    assert keep.sum() == len(pruned), "pruning only slices: every survivor is an original value"
    return keep


def zero_at(
    model: onnx.ModelProto, where: list[tuple[str, int, int, np.ndarray]]
) -> onnx.ModelProto:
    """The original with node `name`'s input `index` multiplied by `mask` along `axis`: those
    channels' activations zeroed where that node consumes them."""
    zeroed = copy_model(model)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in [*inferred.input, *inferred.value_info, *inferred.output]
    }
    nodes = {node.name: node for node in zeroed.graph.node}
    extra = []
    for number, (name, index, axis, mask) in enumerate(where):
        node = nodes[name]
        shape = [1] * ranks[node.input[index]]
        shape[axis] = len(mask)
        mask_name, out = f"mask{number}", f"masked{number}"
        zeroed.graph.initializer.append(numpy_helper.from_array(mask.reshape(shape), mask_name))
        extra.append(helper.make_node("Mul", [node.input[index], mask_name], [out]))
        node.input[index] = out
    # Topological order: each mask right before the graph's nodes (they read earlier values).
    ordered = []
    for node in zeroed.graph.node:
        ordered += [m for m in extra if m.output[0] in node.input]
        ordered.append(node)
    del zeroed.graph.node[:]
    zeroed.graph.node.extend(ordered)
    return zeroed


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def assert_exact(original, pruned, reference, feeds) -> None:
    expected, actual = run(reference, feeds), run(pruned, feeds)
    before = run(original, feeds)
    for want, got, first in zip(expected, actual, before, strict=True):
        assert got.shape == first.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def images(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {"X": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


# -------------------------------------------------------------------------------- patterns


def residual_block() -> onnx.ModelProto:
    """stem Conv-BN-Relu -> [Conv-BN-Relu-Conv-BN] + stem -> Relu -> Conv -> head."""
    b = Builder()
    stem = b.node("Relu", [b.bn("bn0", b.conv("conv0", "X", 3, 8), 8)], "stem")
    inner = b.node("Relu", [b.bn("bn1", b.conv("conv1", stem, 8, 8), 8)], "inner")
    branch = b.bn("bn2", b.conv("conv2", inner, 8, 8), 8)
    out = b.node("Relu", [b.node("Add", [branch, stem], "sum")], "out")
    features = b.node("Relu", [b.conv("conv3", out, 8, 6, k=1)], "features")
    b.head(features, 6)
    return b.model([image_input(["N", 3, 8, 8])], [logits()])


def test_residual_block_with_batchnorm_couples_both_sides_of_the_add():
    model = residual_block()
    outcome, pruned = prune(model)
    before, after = tensors(model), tensors(pruned)
    stem = kept(before["bn0_scale"], after["bn0_scale"])
    inner = kept(before["bn1_scale"], after["bn1_scale"])
    features = kept(before["conv3_b"], after["conv3_b"])
    # the residual's two sides lose the same channels: conv0/bn0 rows and conv2/bn2 rows
    np.testing.assert_array_equal(after["bn2_scale"], before["bn2_scale"][stem == 1])
    assert after["conv2_w"].shape == (4, 4, 3, 3) and after["conv3_w"].shape == (3, 4, 1, 1)
    assert after["fc_w"].shape == (3, 4)
    reference = zero_at(
        model,
        [
            ("conv1", 0, 1, stem),
            ("conv3", 0, 1, stem),
            ("conv2", 0, 1, inner),
            ("Y", 0, 1, features),  # the Gemm: the pooled, flattened channels
        ],
    )
    assert_exact(model, pruned, reference, images((2, 3, 8, 8)))
    assert [g.kept for g in outcome.groups] == [4, 4, 3, 4]  # the Gemm feeds the output
    assert "graph output" in (outcome.groups[-1].note or "")


def depthwise_separable(multiplier: int = 1) -> onnx.ModelProto:
    """Conv -> Relu -> depthwise Conv -> BN -> Clip(0, 6) -> pointwise Conv -> HardSwish -> head."""
    b = Builder()
    x = b.node("Relu", [b.conv("conv0", "X", 3, 8)], "r0")
    dw = b.conv("dw", x, 8, 8 * multiplier, group=8)
    low, high = b.const("zero", np.float32(0)), b.const("six", np.float32(6))
    x = b.node("Clip", [b.bn("bn_dw", dw, 8 * multiplier), low, high], "clip")
    x = b.node("HardSwish", [b.conv("pw", x, 8 * multiplier, 10, k=1)], "hs")
    b.head(x, 10)
    return b.model([image_input(["N", 3, 8, 8])], [logits()])


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_separable_block_passes_the_cut_through_the_depthwise_conv(multiplier):
    model = depthwise_separable(multiplier)
    outcome, pruned = prune(model)
    before, after = tensors(model), tensors(pruned)
    dw_kept = kept(before["bn_dw_scale"], after["bn_dw_scale"])
    pw_kept = kept(before["pw_b"], after["pw_b"])
    conv0 = kept(before["conv0_b"], after["conv0_b"])
    # a depthwise channel goes with its input channel (and its multiplier's outputs)
    np.testing.assert_array_equal(dw_kept, np.repeat(conv0, multiplier))
    assert attribute(node_named(pruned, "dw"), "group", 1) == 4
    assert after["dw_w"].shape == (4 * multiplier, 1, 3, 3)
    reference = zero_at(model, [("pw", 0, 1, dw_kept), ("Y", 0, 1, pw_kept)])
    assert_exact(model, pruned, reference, images((2, 3, 8, 8)))
    assert {g.unit for g in outcome.groups} == {1}


def concat_and_split() -> onnx.ModelProto:
    """Two branches concatenated; the concat read whole by one conv and split again at the
    same boundary into two more; their outputs added: Concat and Split offsets, and a
    three-way coupling through the Adds."""
    b = Builder()
    a = b.node("Relu", [b.conv("conv_a", "X", 3, 4)], "a")
    c = b.node("Sigmoid", [b.conv("conv_b", "X", 3, 6)], "b")
    joined = b.node("Concat", [a, c], "joined", axis=1)
    mixed = b.node("Relu", [b.conv("mix", joined, 10, 5, k=1)], "mixed")
    sizes = b.const("sizes", np.array([4, 6], np.int64))
    b.nodes.append(
        helper.make_node("Split", [joined, sizes], ["p_in", "q_in"], name="split", axis=1)
    )
    p = b.conv("conv_p", "p_in", 4, 5, k=1)
    q = b.conv("conv_q", "q_in", 6, 5, k=1)
    total = b.node("Add", [b.node("Add", [p, q], "pq"), mixed], "sum")
    b.head(b.node("Relu", [b.conv("last", total, 5, 6, k=1)], "out"), 6)
    return b.model([image_input(["N", 3, 8, 8])], [logits()])


def test_concat_and_split_cut_each_branch_at_its_own_offset():
    model = concat_and_split()
    outcome, pruned = prune(model)
    before, after = tensors(model), tensors(pruned)
    a = kept(before["conv_a_b"], after["conv_a_b"])
    c = kept(before["conv_b_b"], after["conv_b_b"])
    added = kept(before["conv_p_b"], after["conv_p_b"])
    last = kept(before["last_b"], after["last_b"])
    np.testing.assert_array_equal(after["mix_b"], before["mix_b"][added == 1])
    assert after["mix_w"].shape == (2, 5, 1, 1)  # 2 of 4 and 3 of 6 concat channels left
    assert list(after["sizes_pruned"]) == [2, 3]
    reference = zero_at(
        model,
        [
            ("mix", 0, 1, np.concatenate([a, c])),
            ("conv_p", 0, 1, a),
            ("conv_q", 0, 1, c),
            ("last", 0, 1, added),
            ("Y", 0, 1, last),
        ],
    )
    assert_exact(model, pruned, reference, images((2, 3, 8, 8)))
    assert [g.note is None for g in outcome.groups] == [True] * 4 + [False]  # fc: output


def flatten_head() -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm: each channel owns its 8x8 block of the flattened row."""
    b = Builder()
    x = b.node("Relu", [b.conv("conv", "X", 1, 4)], "r")
    flat = b.node("Flatten", [x], "flat")
    b.node("Gemm", [flat, b.rand("fc_w", 3, 256), b.rand("fc_b", 3)], "Y", transB=1)
    return b.model([image_input(["N", 1, 8, 8])], [logits(3)])


def test_flatten_into_gemm_removes_each_channels_block_of_inputs():
    model = flatten_head()
    _, pruned = prune(model)
    before, after = tensors(model), tensors(pruned)
    channels = kept(before["conv_b"], after["conv_b"])
    assert after["fc_w"].shape == (3, 128)
    np.testing.assert_array_equal(after["fc_w"], before["fc_w"][:, np.repeat(channels, 64) == 1])
    reference = zero_at(model, [("Y", 0, 1, np.repeat(channels, 64))])
    assert_exact(model, pruned, reference, images((3, 1, 8, 8)))


def upsample_path() -> onnx.ModelProto:
    """Conv -> Resize(scales) -> Conv -> Resize(sizes, whose channel entry shrinks) -> Conv."""
    b = Builder()
    x = b.node("Relu", [b.conv("conv0", "X", 3, 6)], "r0")
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    x = b.node("Resize", [x, "", scales], "up0", mode="nearest")
    x = b.node("Relu", [b.conv("conv1", x, 6, 5)], "r1")
    sizes = b.const("up_sizes", np.array([1, 5, 32, 32], np.int64))
    x = b.node("Resize", [x, "", "", sizes], "up1", mode="linear")
    x = b.node("Relu", [b.conv("conv2", x, 5, 4)], "r2")
    b.head(x, 4)
    return b.model([image_input([1, 3, 8, 8])], [logits()])


def test_resize_passes_channels_and_its_sizes_shrink_with_them():
    model = upsample_path()
    _, pruned = prune(model)
    before, after = tensors(model), tensors(pruned)
    first = kept(before["conv0_b"], after["conv0_b"])
    second = kept(before["conv1_b"], after["conv1_b"])
    third = kept(before["conv2_b"], after["conv2_b"])
    assert list(after["up_sizes_pruned"]) == [1, int(second.sum()), 32, 32]
    where = [("conv1", 0, 1, first), ("conv2", 0, 1, second), ("Y", 0, 1, third)]
    reference = zero_at(model, where)
    assert_exact(model, pruned, reference, images((1, 3, 8, 8)))


def encoder_layer(width: int = 16, heads: int = 4, hidden: int = 32) -> onnx.ModelProto:
    """A post-norm transformer encoder layer as PyTorch exports it: Q, K, V MatMul + bias, a
    head split by Reshape (Q's target built at run time from Shape -> Gather -> Concat, the
    others constant) and Transpose, softmax attention, heads merged, output projection,
    residual + LayerNormalization; then a GELU feed-forward (Erf, reading its input twice)."""
    b = Builder()
    size = width // heads

    def project(name: str, x: str, fan_in: int, fan_out: int) -> str:
        product = b.node("MatMul", [x, b.rand(f"{name}_w", fan_in, fan_out)], f"{name}_mm")
        return b.node("Add", [product, b.rand(f"{name}_b", fan_out)], name)

    def split_heads(x: str, perm: list[int], target: str) -> str:
        return b.node(
            "Transpose", [b.node("Reshape", [x, target], f"{x}_heads")], f"{x}_t", perm=perm
        )

    q, k, v = (project(name, "X", width, width) for name in ("q", "k", "v"))
    shape = b.node("Shape", [q], "q_shape")
    pieces = []
    for axis in (0, 1):
        index = b.const(f"q_index{axis}", np.array(axis, np.int64))
        gathered = b.node("Gather", [shape, index], f"q_dim{axis}")
        axes = b.const(f"q_axes{axis}", np.array([0], np.int64))
        pieces.append(b.node("Unsqueeze", [gathered, axes], f"q_piece{axis}"))
    heads_piece = b.const("q_count", np.array([heads], np.int64))
    size_piece = b.const("q_size", np.array([size], np.int64))
    q_target = b.node("Concat", [*pieces, heads_piece, size_piece], "q_target", axis=0)
    k_target = b.const("k_target", np.array([0, 0, heads, size], np.int64))
    v_target = b.const("v_target", np.array([0, 0, heads, size], np.int64))
    qh = split_heads(q, [0, 2, 1, 3], q_target)  # [N, H, S, d]
    kt = split_heads(k, [0, 2, 3, 1], k_target)  # [N, H, d, S]
    vh = split_heads(v, [0, 2, 1, 3], v_target)
    scores = b.node(
        "Div", [b.node("MatMul", [qh, kt], "scores"), b.const("scale", np.float32(2))], "scaled"
    )
    weights = b.node("Softmax", [scores], "attention", axis=-1)
    context = b.node(
        "Transpose", [b.node("MatMul", [weights, vh], "context")], "context_t", perm=[0, 2, 1, 3]
    )
    merged = b.node(
        "Reshape", [context, b.const("merge_target", np.array([0, 0, width], np.int64))], "merged"
    )
    attended = project("o", merged, width, width)
    gamma, beta = (
        b.const("ln1_g", np.ones(width, np.float32)),
        b.const("ln1_b", np.zeros(width, np.float32)),
    )
    h = b.node(
        "LayerNormalization", [b.node("Add", [attended, "X"], "res1"), gamma, beta], "h", axis=-1
    )
    f = project("ffn1", h, width, hidden)
    erf = b.node(
        "Erf", [b.node("Div", [f, b.const("sqrt2", np.float32(np.sqrt(2)))], "f_div")], "f_erf"
    )
    gelu = b.node(
        "Mul",
        [
            b.node(
                "Mul", [f, b.node("Add", [erf, b.const("one", np.float32(1))], "f_add")], "f_mul"
            ),
            b.const("half", np.float32(0.5)),
        ],
        "gelu",
    )
    out = project("ffn2", gelu, hidden, width)
    gamma2, beta2 = (
        b.const("ln2_g", np.ones(width, np.float32)),
        b.const("ln2_b", np.zeros(width, np.float32)),
    )
    b.node("LayerNormalization", [b.node("Add", [out, h], "res2"), gamma2, beta2], "Y", axis=-1)
    sequence = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", "S", width])
    result = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", "S", width])
    return b.model([sequence], [result])


def test_encoder_layer_loses_whole_heads_and_feed_forward_neurons():
    model = encoder_layer()
    outcome, pruned = prune(model)
    before, after = tensors(model), tensors(pruned)
    heads = kept(before["q_b"], after["q_b"])
    assert (heads.reshape(4, 4) == heads.reshape(4, 4)[:, :1]).all(), "whole heads only"
    neurons = kept(before["ffn1_b"], after["ffn1_b"])
    shapes = {name: after[name].shape for name in ("q_w", "k_w", "v_w", "o_w", "ffn1_w", "ffn2_w")}
    assert shapes == {
        "q_w": (16, 8),
        "k_w": (16, 8),
        "v_w": (16, 8),
        "o_w": (8, 16),  # rows of the heads removed; its columns (the residual) stay
        "ffn1_w": (16, 16),
        "ffn2_w": (16, 16),
    }
    assert list(after["k_target_pruned"]) == [0, 0, 2, 4] and list(after["q_count_pruned"]) == [2]
    assert list(after["merge_target_pruned"]) == [0, 0, 8]
    units = {g.leading: (g.channels, g.kept, g.unit) for g in outcome.groups if g.note is None}
    assert units == {"q_w": (16, 8, 4), "ffn1_w": (32, 16, 1)}
    left = [g for g in outcome.groups if g.note is not None]
    assert {g.leading for g in left} == {"o_w", "ffn2_w"}
    notes = {g.leading: g.note or "" for g in left}
    # the residual dimension: the first layer's add reads the model input; the second's
    # reaches a LayerNormalization, which pruning across would not keep exact
    assert "graph input" in notes["o_w"]
    assert "LayerNormalization node 'h'" in notes["ffn2_w"] and "not exact" in notes["ffn2_w"]
    reference = zero_at(model, [("o_mm", 0, 2, heads), ("ffn2_mm", 0, 2, neurons)])
    feeds = {"X": np.random.default_rng(2).standard_normal((2, 5, 16)).astype(np.float32)}
    assert_exact(model, pruned, reference, feeds)


def test_global_scope_ranks_heads_and_neurons_on_one_scale():
    model = encoder_layer()
    params = PruneParams(granularity="structured", sparsity=0.5, scope="global")
    outcome = prune_model(copy_model(model), params)
    pruned = [g for g in outcome.groups if g.note is None]
    units = sum(g.channels // g.unit for g in pruned)
    removed = sum((g.channels - g.kept) // g.unit for g in pruned)
    assert units == 4 + 32 and removed == 18  # half of all units, wherever they are weakest
    cut = sum(g.kept < g.channels for g in pruned)
    assert f"removed from {cut} of the {len(pruned)} prunable" in outcome.notes[0]


def test_exclude_leaves_the_group_of_that_leading_weight_whole():
    model = residual_block()
    params = PruneParams(granularity="structured", sparsity=0.5, exclude=["^conv1_w$"])
    outcome = prune_model(copy_model(model), params)
    notes = {g.leading: g.note for g in outcome.groups}
    assert "include/exclude" in (notes["conv1_w"] or "")
    assert notes["conv0_w"] is None  # the residual group is pruned
    after = tensors(outcome.model)
    assert after["bn1_scale"].shape == (8,) and after["conv2_w"].shape == (4, 8, 3, 3)


def test_a_group_that_cannot_be_followed_is_left_whole_with_a_note_naming_the_node():
    b = Builder()
    x = b.node("Softmax", [b.conv("conv0", "X", 3, 8)], "attention_over_channels", axis=1)
    x = b.node("Relu", [b.conv("conv1", x, 8, 8)], "r1")
    b.head(x, 8)
    model = b.model([image_input(["N", 3, 8, 8])], [logits()])
    outcome, pruned = prune(model)
    notes = {g.leading: g.note for g in outcome.groups}
    assert notes["conv0_w"] == (
        "Softmax node 'attention_over_channels': it normalises over the channels"
    )
    assert notes["conv1_w"] is None
    assert tensors(pruned)["conv0_w"].shape == (8, 3, 3, 3)
    assert any("conv0_w" in note and "Softmax" in note for note in outcome.notes)
    assert all(len(note) <= 300 for note in outcome.notes)


def test_conv_transpose_output_and_input_channels():
    """Conv -> ConvTranspose (weight [C_in, C_out, k, k]) -> Relu -> head: the first group
    cuts the transposed conv's weight rows, the second its columns and bias."""
    b = Builder()
    x = b.node("Relu", [b.conv("conv0", "X", 3, 8)], "r0")
    weight, bias = b.rand("up_w", 8, 6, 2, 2), b.rand("up_b", 6)
    x = b.node("Relu", [b.node("ConvTranspose", [x, weight, bias], "up", strides=[2, 2])], "r1")
    b.head(x, 6)
    model = b.model([image_input(["N", 3, 8, 8])], [logits()])
    _, pruned = prune(model)
    before, after = tensors(model), tensors(pruned)
    first = kept(before["conv0_b"], after["conv0_b"])
    second = kept(before["up_b"], after["up_b"])
    assert after["up_w"].shape == (4, 3, 2, 2)
    reference = zero_at(model, [("up", 0, 1, first), ("Y", 0, 1, second)])
    assert_exact(model, pruned, reference, images((2, 3, 8, 8)))


def test_grouped_conv_loses_whole_groups_through_instance_norm_pad_and_pool():
    """Conv -> InstanceNormalization -> Pad (spatial) -> MaxPool -> Conv(group 4, 2 channels
    per group) -> Relu -> head: the unit is a whole conv group, its `group` count shrinks."""
    b = Builder()
    x = b.conv("conv0", "X", 3, 8)
    x = b.node("InstanceNormalization", [x, b.rand("in_scale", 8), b.rand("in_bias", 8)], "norm")
    pads = b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    x = b.node("MaxPool", [b.node("Pad", [x, pads], "padded")], "pooled", kernel_shape=[2, 2])
    x = b.node("Relu", [b.conv("grouped", x, 8, 8, group=4)], "r1")
    b.head(x, 8)
    model = b.model([image_input(["N", 3, 8, 8])], [logits()])
    outcome, pruned = prune(model)
    before, after = tensors(model), tensors(pruned)
    first = kept(before["conv0_b"], after["conv0_b"])
    second = kept(before["grouped_b"], after["grouped_b"])
    pairs = first.reshape(4, 2)
    assert (pairs == pairs[:, :1]).all() and pairs.sum() == 4, "whole conv groups of 2"
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(after["in_scale"], before["in_scale"][first == 1])
    assert after["grouped_w"].shape == (4, 2, 3, 3)
    assert attribute(node_named(pruned, "grouped"), "group", 1) == 2
    assert outcome.groups[0].unit == 2
    reference = zero_at(model, [("Y", 0, 1, second)])
    assert_exact(model, pruned, reference, images((2, 3, 8, 8)))


def test_a_rewrite_that_leaves_the_graph_inconsistent_is_refused(monkeypatch):
    # A rule that forgets the reader (the next conv's input slice) must not yield a model
    # onnxruntime cannot load: strict shape inference after the rewrite catches it, a 422.
    def forgetful(ctx, node, port, axis, span):
        return [channels.Link(channels.IN0, axis, span)]

    monkeypatch.setitem(channels.RULES, "Relu", forgetful)
    with pytest.raises(UnsupportedModelError, match="left the graph inconsistent"):
        prune(residual_block())


@pytest.mark.parametrize("weights_too", [False, True])
def test_shapes_an_export_recorded_for_every_tensor_do_not_block_the_cut(weights_too):
    """torch.onnx.export writes a value_info entry, with its shape, for nearly every tensor
    (YOLOv8n: 332), and PyTorch 2.10's exporter for initializers too. Those of the narrowed
    values and weights go stale; the check after the rewrite must not compare against them,
    and the pruned model must still be exact."""
    plain = residual_block()
    model = onnx.shape_inference.infer_shapes(plain)
    assert {info.name for info in model.graph.value_info} >= {"stem", "inner", "features"}
    if weights_too:
        model.graph.value_info.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in model.graph.initializer
        )
    _, pruned = prune(model)
    _, reference_pruned = prune(plain)
    assert tensors(pruned).keys() == tensors(reference_pruned).keys()
    for name, array in tensors(reference_pruned).items():
        np.testing.assert_array_equal(tensors(pruned)[name], array)
    feeds = images((2, 3, 8, 8))
    for got, want in zip(run(pruned, feeds), run(reference_pruned, feeds), strict=True):
        np.testing.assert_array_equal(got, want)
