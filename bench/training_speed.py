"""Training speed: the NumPy MLP against the machine's own sgemm rate, and the MLP, a small CNN
and a transformer encoder layer against the same loops in PyTorch (CPU, when it is installed;
it is not a dependency), all measured in this run.

Run: .venv/bin/python bench/training_speed.py [--threads N]
(--threads limits NumPy's BLAS, and PyTorch, to N threads; default: the threads BLAS has.)

MLP 784-512-256-10, batch 128, 10,000 synthetic samples, one epoch, Adam, global_norm clipping.
Baselines: one large float32 np.matmul (the sgemm rate), and the same loop with clipping off.
Targets: clipping overhead <= 5% of step time (issue 7); training FLOP rate >= 0.60 of sgemm
(issue 18; issue 7 asked 0.70) and the MLP epoch at most 1.0x the same loop in PyTorch.

What the FLOP rate can reach here, measured in the same run: the epoch's matmuls alone (same
shapes and layouts, stand-in values), the ceiling of any loop on this BLAS; what 0.60 of sgemm
then leaves a step for everything else; and the least time a clipped Adam step needs just to
move its state (m, v and the weights read and written once, in place) and read the gradients.
PyTorch's rate on the same FLOP count too.

FLOPs are the matmul multiply-adds the epoch actually computes (2 per multiply-add), nothing
else: per sample, forward 2 * in * out per layer, backward 2 * in * out per layer for the weight
gradient and again for the gradient at the layer's input, except the first layer, whose input
gradient nobody needs and the loop does not compute. The epoch's validation forward pass over
256 samples is computed inside the timed run, so it counts too. Bias adds, activations, softmax,
clipping and the optimizer are work without counted FLOPs. (The usual 6 * weights * samples
would credit the first layer's input gradient, a quarter of the FLOPs here, which is never
computed.)

Graph fine-tuning (issue 17, informational): a CNN (Conv 1->8 3x3, Relu, Conv 8->16 3x3, Relu,
Flatten, Gemm to 10; scikit-learn's 8x8 digits, batch 64) and a post-norm transformer encoder
layer (seq 32, d 64, 4 heads, Relu FFN 128, LayerNormalization; batch 16), each pruned to 50% and
trained by the step fine_tune_graph takes: the NumPy executor's forward and backward, distillation
from the unpruned model (KL at temperature 2 on the CNN's logits, mean squared error on the
layer's output), masks, global-norm clipping at 1.0, Adam. PyTorch runs the same layers from the
same starting weights (nn.Conv2d/nn.Linear; nn.TransformerEncoderLayer, dropout 0, batch_first),
the same loss, masks, clip_grad_norm_ and torch.optim.Adam, with torch.set_num_threads set to
the BLAS threads NumPy uses. Both print their first step's loss: equal losses show the two loops
compute the same thing.
"""

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_info, threadpool_limits

from schemas.params import ClipParams, PruneParams
from workers.compress.finetune import distiller
from workers.compress.prune import copy_model, prune_model
from workers.graph.executor import Executor
from workers.nn.clipping import clip_gradients
from workers.nn.fit import FitSettings, History, fit
from workers.nn.network import initialise
from workers.nn.optimizers import OPTIMIZERS

SIZES = [784, 512, 256, 10]
BATCH, SAMPLES, REPEATS = 128, 10_000, 7
VALIDATION = 256  # samples scored after the epoch
STEPS = -(-SAMPLES // BATCH)  # optimizer steps in the epoch
LEARNING_RATE, CLIP = 1e-3, ClipParams(mode="global_norm", threshold=1.0)
TEMPERATURE = 2.0  # the distillation temperature fine-tuning uses by default
GRAPH_STEPS, GRAPH_REPEATS = 20, 7  # graph loops: the best of 7 runs of 20 steps each
SEQ, D, HEADS, FFN = 32, 64, 4, 128


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def sgemm_runner() -> Callable[[], float]:
    """One 2048^3 float32 matmul's rate (FLOP/s) per call."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ b  # warm up the BLAS threads
    return lambda: 2 * 2048**3 / best_of(1, lambda: a @ b)


def blas_threads() -> int:
    """The threads NumPy's BLAS runs matmuls with: PyTorch gets as many."""
    return max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")


def load_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(blas_threads())
    return torch


# ---- the MLP: fit() against a PyTorch loop over the same batches ------------------------------


def mlp_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SAMPLES, SIZES[0])).astype(np.float32)
    return x, rng.integers(0, SIZES[-1], SAMPLES)


def epoch_runner(mode: str) -> Callable[[], tuple[float, float]]:
    x, y = mlp_data()
    settings = FitSettings(
        epochs=1,
        batch_size=BATCH,
        learning_rate=LEARNING_RATE,
        optimizer="adam",
        clip=ClipParams(mode=mode, threshold=CLIP.threshold),
    )

    def one_epoch() -> tuple[float, float]:
        """Seconds to train a fresh network for one epoch, and its mean loss; drawing its
        initial weights (10 ms of float64 normals, not training) happens before the clock."""
        network = initialise(SIZES, ["relu", "relu"], "softmax", np.random.default_rng(0))
        started = time.perf_counter()
        history = fit(
            network, x, y, x[:VALIDATION], y[:VALIDATION], settings, np.random.default_rng(0)
        )
        return time.perf_counter() - started, history.loss[0]

    return one_epoch


def torch_epoch_runner(torch: Any) -> Callable[[], tuple[float, float]]:
    """The same epoch in PyTorch: the same initial weights, batch order, loss, clipping,
    optimizer and validation pass."""
    x_np, y_np = mlp_data()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    order = torch.from_numpy(np.random.default_rng(0).permutation(SAMPLES))

    def one_epoch() -> tuple[float, float]:
        start = initialise(SIZES, ["relu", "relu"], "softmax", np.random.default_rng(0))
        layers = [torch.nn.Linear(i, o) for i, o in itertools.pairwise(SIZES)]
        with torch.no_grad():
            for layer, w, b in zip(layers, start.weights, start.biases, strict=True):
                layer.weight.copy_(torch.from_numpy(w.T.copy()))
                layer.bias.copy_(torch.from_numpy(b))
        model = torch.nn.Sequential(
            layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2]
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        losses = []
        started = time.perf_counter()
        for batch in order.split(BATCH):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP.threshold)
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            (model(x[:VALIDATION]).argmax(1) == y[:VALIDATION]).float().mean().item()
        return time.perf_counter() - started, float(np.mean(losses))

    return one_epoch


def matmuls_runner() -> Callable[[], float]:
    """Seconds for the epoch's matmuls alone, the same shapes and operand layouts as fit()'s
    (forward, weight and input gradients per batch, the validation forward), on stand-in
    values: the time no loop built on this BLAS can beat, whatever else it does faster."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(shape, dtype=np.float32) for shape in itertools.pairwise(SIZES)]
    batches = [min(BATCH, SAMPLES - start) for start in range(0, SAMPLES, BATCH)]
    inputs = {
        rows: [rng.standard_normal((rows, size), dtype=np.float32) for size in SIZES]
        for rows in {*batches, VALIDATION}
    }

    def step(rows: int, backward: bool) -> None:
        values = inputs[rows]
        for layer, w in enumerate(weights):
            values[layer] @ w  # [B, in] @ [in, out]
        if backward:
            for layer in reversed(range(len(weights))):
                values[layer].T @ values[layer + 1]  # dW: [in, B] @ [B, out]
                if layer:
                    values[layer + 1] @ weights[layer].T  # dz: [B, out] @ [out, in]

    def epoch() -> float:
        started = time.perf_counter()
        for rows in batches:
            step(rows, backward=True)
        step(VALIDATION, backward=False)
        return time.perf_counter() - started

    return epoch


def state_traffic_runner() -> Callable[[], float]:
    """Seconds to read and write back, in place, three float32 arrays of the MLP's parameter
    count, and to read a fourth: the memory traffic of Adam's state (m, v and the weights) and
    of the gradients, which every clipped Adam step must move."""
    count = sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(SIZES))
    *state, grads = [np.ones(count, np.float32) for _ in range(4)]
    evict = np.zeros(8 << 20, np.float32)  # 32 MiB: the matmuls between steps evict the state

    def traffic() -> float:
        np.add(evict, 1, out=evict)
        started = time.perf_counter()
        for array in state:
            np.multiply(array, 1, out=array)
        np.vdot(grads, grads)
        return time.perf_counter() - started

    return traffic


def step_parts() -> dict[str, float]:
    """Seconds per step of each part of fit()'s step, timed apart over one epoch: the batch's
    rows gathered, forward and backward, clipping, the Adam step."""
    x, y = mlp_data()
    network = initialise(SIZES, ["relu", "relu"], "softmax", np.random.default_rng(0))
    params = network.params
    adam = OPTIMIZERS["adam"](params, LEARNING_RATE)
    spent = dict.fromkeys(["gather", "forward and backward", "clipping", "Adam"], 0.0)
    order = np.random.default_rng(0).permutation(SAMPLES)
    for batch in np.split(order, range(BATCH, SAMPLES, BATCH)):
        marks = [time.perf_counter()]
        rows, labels = x[batch], y[batch]
        marks.append(time.perf_counter())
        _, grads = network.loss_and_grads(rows, labels)
        marks.append(time.perf_counter())
        out = [g.view() for g in grads]
        clipped, _ = clip_gradients(grads, CLIP.mode, CLIP.threshold, params, out=out)
        marks.append(time.perf_counter())
        adam(params, clipped)
        marks.append(time.perf_counter())
        for part, (start, end) in zip(spent, itertools.pairwise(marks), strict=True):
            spent[part] += end - start
    return {part: seconds / STEPS for part, seconds in spent.items()}


def epoch_flops() -> int:
    """Matmul FLOPs of one epoch as the loop computes them (see the module docstring)."""
    layers = [fan_in * fan_out for fan_in, fan_out in itertools.pairwise(SIZES)]
    forward = 2 * sum(layers)  # per sample: h @ W
    weight_grads = 2 * sum(layers)  # h.T @ dz
    input_grads = 2 * sum(layers[1:])  # dz @ W.T, not for the first layer
    return (forward + weight_grads + input_grads) * SAMPLES + forward * VALIDATION


# ---- graphs for fine_tune_graph's step: a CNN and a transformer encoder layer -----------------


def onnx_model(nodes: list[NodeProto], x_shape: list, weights: dict[str, np.ndarray]) -> ModelProto:
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, name) for name, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """PyTorch's default initialisation of Conv2d and Linear: U(-1/sqrt(fan_in), ...)."""
    bound = 1 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def cnn(rng: np.random.Generator) -> ModelProto:
    weights = {
        "c1.w": uniform(rng, (8, 1, 3, 3), 9),
        "c1.b": uniform(rng, (8,), 9),
        "c2.w": uniform(rng, (16, 8, 3, 3), 72),
        "c2.b": uniform(rng, (16,), 72),
        "fc.w": uniform(rng, (10, 16 * 64), 16 * 64),  # transB=1: [out, in] as nn.Linear
        "fc.b": uniform(rng, (10,), 16 * 64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1),
    ]
    return onnx_model(nodes, ["N", 1, 8, 8], weights)


def torch_cnn(torch: Any, values: dict[str, np.ndarray]) -> Any:
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )
    names = {"0.weight": "c1.w", "0.bias": "c1.b", "2.weight": "c2.w", "2.bias": "c2.b"}
    names |= {"5.weight": "fc.w", "5.bias": "fc.b"}
    model.load_state_dict({key: torch.from_numpy(values[name]) for key, name in names.items()})
    return model


def linear(name: str, x: str, out: str) -> list[NodeProto]:
    """x @ W + b with W [in, out], as PyTorch exports nn.Linear."""
    return [
        helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.mm"]),
        helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [out]),
    ]


def encoder_layer(rng: np.random.Generator) -> ModelProto:
    """nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0, batch_first=True) as ONNX: self
    attention, residual, LayerNorm, Relu FFN, residual, LayerNorm."""
    sizes = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "ff1": (D, FFN), "ff2": (FFN, D)}
    weights = {}
    for name, (fan_in, fan_out) in sizes.items():
        weights[f"{name}.w"] = uniform(rng, (fan_in, fan_out), fan_in)
        weights[f"{name}.b"] = uniform(rng, (fan_out,), fan_in)
    for norm in ("ln1", "ln2"):
        weights[f"{norm}.scale"] = rng.uniform(0.8, 1.2, D).astype(np.float32)
        weights[f"{norm}.bias"] = rng.uniform(-0.1, 0.1, D).astype(np.float32)
    weights["scale"] = np.array(1 / np.sqrt(D // HEADS), np.float32)
    weights["heads"] = np.array([0, 0, HEADS, D // HEADS], np.int64)  # 0 keeps the input's size
    weights["merged"] = np.array([0, 0, D], np.int64)
    split = [
        node
        for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3]))
        for node in (
            *linear(name, "x", f"{name}.out"),
            helper.make_node("Reshape", [f"{name}.out", "heads"], [f"{name}.split"]),
            helper.make_node("Transpose", [f"{name}.split"], [f"{name}.h"], perm=perm),
        )
    ]
    nodes = [
        *split,
        helper.make_node("MatMul", ["q.h", "k.h"], ["scores.raw"]),  # [B, H, T, T]
        helper.make_node("Mul", ["scores.raw", "scale"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attention"], axis=-1),
        helper.make_node("MatMul", ["attention", "v.h"], ["context.h"]),
        helper.make_node("Transpose", ["context.h"], ["context.t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context.t", "merged"], ["context"]),
        *linear("o", "context", "attended"),
        helper.make_node("Add", ["x", "attended"], ["residual1"]),
        helper.make_node(
            "LayerNormalization", ["residual1", "ln1.scale", "ln1.bias"], ["n1"], axis=-1
        ),
        *linear("ff1", "n1", "ff.pre"),
        helper.make_node("Relu", ["ff.pre"], ["ff.act"]),
        *linear("ff2", "ff.act", "ff.out"),
        helper.make_node("Add", ["n1", "ff.out"], ["residual2"]),
        helper.make_node(
            "LayerNormalization", ["residual2", "ln2.scale", "ln2.bias"], ["y"], axis=-1
        ),
    ]
    return onnx_model(nodes, ["N", SEQ, D], weights)


def torch_encoder_layer(torch: Any, values: dict[str, np.ndarray]) -> Any:
    layer = torch.nn.TransformerEncoderLayer(
        D, HEADS, FFN, dropout=0.0, activation="relu", batch_first=True
    )

    def t(name: str) -> Any:  # [in, out] MatMul weights are nn.Linear's [out, in] transposed
        return torch.from_numpy(np.ascontiguousarray(values[name].T))

    state = {
        "self_attn.in_proj_weight": torch.cat([t("q.w"), t("k.w"), t("v.w")]),
        "self_attn.in_proj_bias": torch.from_numpy(
            np.concatenate([values["q.b"], values["k.b"], values["v.b"]])
        ),
        "self_attn.out_proj.weight": t("o.w"),
        "self_attn.out_proj.bias": torch.from_numpy(values["o.b"]),
        "linear1.weight": t("ff1.w"),
        "linear1.bias": torch.from_numpy(values["ff1.b"]),
        "linear2.weight": t("ff2.w"),
        "linear2.bias": torch.from_numpy(values["ff2.b"]),
        "norm1.weight": torch.from_numpy(values["ln1.scale"]),
        "norm1.bias": torch.from_numpy(values["ln1.bias"]),
        "norm2.weight": torch.from_numpy(values["ln2.scale"]),
        "norm2.bias": torch.from_numpy(values["ln2.bias"]),
    }
    layer.load_state_dict(state)
    return layer


def kl_loss(torch: Any, student: Any, teacher: Any) -> Any:
    """KL(teacher || student) at TEMPERATURE, times T², as kl_distillation computes it."""
    log_softmax = torch.nn.functional.log_softmax
    log_q, log_p = log_softmax(student / TEMPERATURE, 1), log_softmax(teacher / TEMPERATURE, 1)
    return (
        torch.nn.functional.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        * TEMPERATURE**2
    )


def mse_loss(torch: Any, student: Any, teacher: Any) -> Any:
    return torch.nn.functional.mse_loss(student, teacher)


@dataclass
class GraphCase:
    name: str
    model: ModelProto
    x: np.ndarray  # the training inputs, batched in order
    batch: int
    torch_model: Callable[[Any, dict[str, np.ndarray]], Any]
    torch_loss: Callable[[Any, Any, Any], Any]


def graph_cases() -> list[GraphCase]:
    digits = load_digits().images.astype(np.float32)[:, None] / 16  # [1797, 1, 8, 8]
    sequences = np.random.default_rng(1).standard_normal((256, SEQ, D)).astype(np.float32)
    rng = np.random.default_rng(0)
    return [
        GraphCase("CNN", cnn(rng), digits, 64, torch_cnn, kl_loss),
        GraphCase("transformer", encoder_layer(rng), sequences, 16, torch_encoder_layer, mse_loss),
    ]


def batches(case: GraphCase) -> itertools.cycle:
    """The full batches of the training inputs, in order, again and again."""
    full = len(case.x) // case.batch
    return itertools.cycle([slice(i * case.batch, (i + 1) * case.batch) for i in range(full)])


def numpy_steps(
    case: GraphCase, teacher: dict[str, np.ndarray]
) -> tuple[Callable[[int], float], dict[str, np.ndarray]]:
    """A runner of n fine-tuning steps as fine_tune_graph takes them towards the `teacher`'s
    outputs (returning the first step's loss), and the pruned starting weights."""
    outcome = prune_model(copy_model(case.model), PruneParams(sparsity=0.5))
    student = distiller(outcome, teacher, None, TEMPERATURE, 0.0)
    start = {name: value.copy() for name, value in student.executor.parameters.items()}
    params = student.params
    step = OPTIMIZERS["adam"](params, LEARNING_RATE)
    order, history = batches(case), History()

    def run(steps: int) -> float:
        losses = []
        for _ in range(steps):
            rows = next(order)
            loss, norm, grads, clipped = student.clipped_grads(
                {"x": case.x[rows]}, {"y": teacher["y"][rows]}, None, CLIP
            )
            history.record_step(loss, norm, grads, clipped, 0, "bench", "")
            step(params, clipped)
            student.apply_masks(params)
            losses.append(loss)
        return losses[0]

    return run, start


def torch_steps(
    torch: Any, case: GraphCase, teacher: dict[str, np.ndarray], start: dict[str, np.ndarray]
) -> Callable[[int], float]:
    """The same steps in PyTorch, from the same pruned weights, holding the same zeros."""
    model = case.torch_model(torch, start)
    params = list(model.parameters())
    masks = [(p != 0).float() if p.dim() > 1 else None for p in params]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    x, teacher_y = torch.from_numpy(case.x), torch.from_numpy(teacher["y"])
    order = batches(case)

    def run(steps: int) -> float:
        losses = []
        for _ in range(steps):
            rows = next(order)
            optimizer.zero_grad()
            loss = case.torch_loss(torch, model(x[rows]), teacher_y[rows])
            loss.backward()
            for p, mask in zip(params, masks, strict=True):
                if mask is not None:
                    p.grad.mul_(mask)
            torch.nn.utils.clip_grad_norm_(params, CLIP.threshold)
            optimizer.step()
            with torch.no_grad():
                for p, mask in zip(params, masks, strict=True):
                    if mask is not None:
                        p.mul_(mask)
            losses.append(loss.item())
        return losses[0]

    return run


def time_steps(run: Callable[[int], float]) -> float:
    """Seconds per step over GRAPH_STEPS steps."""
    started = time.perf_counter()
    run(GRAPH_STEPS)
    return (time.perf_counter() - started) / GRAPH_STEPS


# ---- the report --------------------------------------------------------------------------------


def row(what: str, baseline: float, figure: float, ratio: float, target: str) -> None:
    print(
        f"{what:<34} {baseline:>12.{precision(baseline)}f} {figure:>12.{precision(figure)}f} "
        f"{ratio:>8.3f}  {target}"
    )


def precision(value: float) -> int:
    return 1 if value >= 10 else 3


def mlp_rows(torch: Any) -> None:
    flops = epoch_flops()
    sgemm = sgemm_runner()
    # Alternate the loops and the baseline and keep each one's best, so a noisy neighbour hurts
    # all alike: a baseline measured apart, in a slow moment, would flatter the ratio.
    runs = {mode: epoch_runner(mode) for mode in ("none", "global_norm")}
    if torch is not None:
        runs["torch"] = torch_epoch_runner(torch)
    best = {name: (float("inf"), 0.0) for name in runs}
    rate = 0.0
    matmuls, traffic = matmuls_runner(), state_traffic_runner()
    matmul_time = traffic_time = float("inf")
    parts = dict.fromkeys(step_parts(), float("inf"))
    for _ in range(REPEATS):
        rate = max(rate, sgemm())
        matmul_time = min(matmul_time, matmuls())
        traffic_time = min(traffic_time, *(traffic() for _ in range(STEPS)))
        parts = {
            part: min(best, now)
            for (part, best), now in zip(parts.items(), step_parts().values(), strict=True)
        }
        for name, run in runs.items():
            best[name] = min(best[name], run())
    plain, clipped = best["none"][0], best["global_norm"][0]
    achieved = flops / clipped
    share = achieved / rate
    overhead = clipped / plain - 1
    print(f"{'':<34} {'baseline':>12} {'figure':>12} {'ratio':>8}  target")
    row(
        "training FLOP rate (GFLOP/s)",
        rate / 1e9,
        achieved / 1e9,
        share,
        f">= 0.60 {'PASS' if share >= 0.6 else 'MISS'}",  # issue 18 (issue 7 asked 0.70)
    )
    row(
        "epoch with clipping (s)",
        plain,
        clipped,
        1 + overhead,
        f"<= 1.05 {'PASS' if overhead <= 0.05 else 'MISS'}",
    )
    ceiling_rows(flops, rate, matmul_time, traffic_time, parts)
    if torch is None:
        print("MLP: PyTorch not installed, no comparison (informational)")
        return
    torch_time = best["torch"][0]
    row(
        "PyTorch FLOP rate (GFLOP/s)",
        rate / 1e9,
        flops / torch_time / 1e9,
        flops / torch_time / rate,
        "informational: the same count",
    )
    ratio = clipped / torch_time
    row(
        "MLP epoch vs PyTorch (s)",
        torch_time,
        clipped,
        ratio,
        f"<= 1.00 {'PASS' if ratio <= 1.0 else 'MISS'}",
    )
    print(
        f"  same loop: epoch loss NumPy {best['global_norm'][1]:.5f}, "
        f"PyTorch {best['torch'][1]:.5f}"
    )


def ceiling_rows(
    flops: int, rate: float, matmul_time: float, traffic_time: float, parts: dict[str, float]
) -> None:
    """What 0.60 of sgemm leaves a step for everything but its matmuls, against the least
    time Adam needs to move its state, and where the step's time goes."""
    row(
        "matmuls alone (GFLOP/s)",
        rate / 1e9,
        flops / matmul_time / 1e9,
        flops / matmul_time / rate,
        "the ceiling of any loop on this BLAS",
    )
    left = (flops / (0.6 * rate) - matmul_time) / STEPS
    print(
        f"  0.60 leaves {left * 1e6:.0f} us a step for all but the matmuls (bias, activations, "
        f"loss, clipping, Adam); only moving Adam's state (read and written once) and reading "
        f"the gradients takes {traffic_time * 1e6:.0f} us"
    )
    spent = ", ".join(f"{part} {seconds * 1e6:.0f}" for part, seconds in parts.items())
    print(
        f"  a step's parts (us, best of {REPEATS} epochs): {spent}; matmuls alone "
        f"{matmul_time / STEPS * 1e6:.0f}"
    )


def graph_rows(torch: Any) -> None:
    for case in graph_cases():
        teacher = Executor(case.model).forward({"x": case.x}, record=False)
        numpy_run, start = numpy_steps(case, teacher)
        first = numpy_run(1)  # also warms up
        if torch is None:
            numpy_time = min(time_steps(numpy_run) for _ in range(GRAPH_REPEATS))
            print(f"{case.name + ' step (ms)':<34} {'':>12} {numpy_time * 1e3:>12.3f}")
            print(f"{case.name}: PyTorch not installed, no comparison (informational)")
            continue
        torch_run = torch_steps(torch, case, teacher, start)
        torch_first = torch_run(1)
        numpy_time = torch_time = float("inf")
        for _ in range(GRAPH_REPEATS):  # alternated, so a noisy neighbour hurts both alike
            numpy_time = min(numpy_time, time_steps(numpy_run))
            torch_time = min(torch_time, time_steps(torch_run))
        row(
            f"{case.name} step vs PyTorch (ms)",
            torch_time * 1e3,
            numpy_time * 1e3,
            numpy_time / torch_time,
            "informational",
        )
        print(f"  same step: first loss NumPy {first:.5f}, PyTorch {torch_first:.5f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, help="BLAS (and PyTorch) threads")
    threads = parser.parse_args().threads
    with threadpool_limits(limits=threads, user_api="blas"):
        torch = load_torch()
        same = "" if torch is None else ", PyTorch threads the same"
        print(f"BLAS threads {blas_threads()}{same}")
        mlp_rows(torch)
        graph_rows(torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
