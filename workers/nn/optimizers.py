"""Optimizers that update parameters in place.

Every update is computed in the parameters' own dtype (float32), as PyTorch and optax do, and
written through preallocated scratch buffers: the training hot path allocates nothing.
The optimizer's state for all parameters lives in one flat array per quantity, with a view per
parameter. Each update is subtracted from a parameter right after it is computed, while it is
still in cache; Adam, with ten passes, runs them block by block so each block stays in cache.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from schemas.vocabulary import Optimizer

MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Elements per block of Adam's passes: four float32 blocks (m~, v~, g, scratch) of 512 KiB fit
# a 2 MiB L2 cache; smaller blocks pay NumPy's call overhead more often than they save.
BLOCK = 1 << 17


def flat_zeros(params: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One zeroed array [sum of sizes] and a view of it shaped as each parameter."""
    flat = np.zeros(sum(p.size for p in params), np.result_type(*params))
    ends = np.cumsum([p.size for p in params])
    views = [flat[end - p.size : end].reshape(p.shape) for p, end in zip(params, ends, strict=True)]
    return flat, views


class Step(ABC):
    """One optimizer step: call it with the parameters and their gradients to update in place.

    Each optimizer computes its update into `self.scratch` (viewed per parameter as
    `self.scratches`) and subtracts it from the parameters. weight_decay adds weight_decay * w
    to the gradient of each weight matrix (not biases), after clipping, as PyTorch's optimizers
    do.
    """

    def __init__(
        self, params: Sequence[np.ndarray], learning_rate: float, weight_decay: float = 0.0
    ) -> None:
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        # a flat array [all parameters] per quantity, and views of it shaped as the parameters
        self.scratch, self.scratches = flat_zeros(params)  # the update, subtracted from params
        self.count = 0

    def __call__(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        self.count += 1
        if self.weight_decay:
            decay = self.weight_decay
            grads = [g + decay * p if p.ndim > 1 else g for p, g in zip(params, grads, strict=True)]
        self.apply(params, grads)

    @abstractmethod
    def apply(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        """Subtract this optimizer's update for `grads` from `params`, in place."""


class Sgd(Step):
    """p -= lr * g"""

    def apply(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        for p, g, scratch in zip(params, grads, self.scratches, strict=True):
            np.multiply(g, self.learning_rate, out=scratch)
            p -= scratch


class Momentum(Step):
    """v = 0.9 v + g;  p -= lr * v"""

    def __init__(
        self, params: Sequence[np.ndarray], learning_rate: float, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, learning_rate, weight_decay)
        self.velocity, self.velocities = flat_zeros(params)

    def apply(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        self.velocity *= MOMENTUM
        for p, g, v, scratch in zip(params, grads, self.velocities, self.scratches, strict=True):
            v += g
            np.multiply(v, self.learning_rate, out=scratch)
            p -= scratch


class Adam(Step):
    """m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g*g;
    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    The moments are kept without their (1 - beta) factors: m~ = m / (1 - b1) = b1 m~ + g and
    v~ = v / (1 - b2) = b2 v~ + g*g, so each takes two passes instead of three. The factors
    come back in the one scalar step size, and eps is divided by sqrt(1 - b2) to sit where it
    did: m / (sqrt(v) + eps) = (1 - b1) / sqrt(1 - b2) * m~ / (sqrt(v~) + eps / sqrt(1 - b2)).
    Ten passes where the textbook order takes twelve; the result differs from it
    only in float32 rounding (tests/test_training_golden.py bounds how much)."""

    def __init__(
        self, params: Sequence[np.ndarray], learning_rate: float, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, learning_rate, weight_decay)
        _, self.firsts = flat_zeros(params)  # m~ per parameter, views of one flat array
        _, self.seconds = flat_zeros(params)  # v~

    def apply(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        """All ten passes, the subtraction from the parameters included, run over one block
        of BLOCK elements before the next: the block's m~, v~, g, scratch and parameters stay
        in the core's cache between passes, where ten passes over whole arrays would each
        stream them from memory again (2.15-2.23 -> 1.81-1.88 ms a step on the training
        benchmark's 536k parameters, best of 7 x 300 steps; the subtraction moved into the
        loop took the Adam call from 943-973 to 846-892 us, medians of 400). Each element sees
        the same operations in the same order either way: the result is bit for bit the same.
        The scratch holds g*g, then the denominator, then the update, so the step touches no
        fourth flat array of state."""
        beta1, beta2 = ADAM_BETAS
        # bias corrections (Kingma & Ba, end of section 2) and the moments' missing factors in
        # one Python float, so the update stays in the parameters' dtype
        correction = math.sqrt(1 - beta2**self.count) / (1 - beta1**self.count)
        step = self.learning_rate * correction * (1 - beta1) / math.sqrt(1 - beta2)
        eps = ADAM_EPS / math.sqrt(1 - beta2)
        state = zip(params, grads, self.firsts, self.seconds, self.scratches, strict=True)
        for p, g, m, v, scratch in state:
            # a weight read transposed (Gemm transB=1) has no flat view in g's order: it takes
            # its update whole, after the blocks
            flat = p.reshape(-1) if p.flags.c_contiguous else None
            g, m, v, s = g.reshape(-1), m.reshape(-1), v.reshape(-1), scratch.reshape(-1)
            for start in range(0, g.size, BLOCK):
                block = slice(start, start + BLOCK)
                gb, mb, vb, sb = g[block], m[block], v[block], s[block]
                mb *= beta1
                mb += gb
                vb *= beta2
                np.multiply(gb, gb, out=sb)
                vb += sb
                np.sqrt(vb, out=sb)
                sb += eps
                np.divide(mb, sb, out=sb)
                sb *= step
                if flat is not None:
                    flat[block] -= sb
            if flat is None:
                p -= scratch


OPTIMIZERS: dict[Optimizer, type[Step]] = {"sgd": Sgd, "momentum": Momentum, "adam": Adam}
