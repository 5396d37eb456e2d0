"""Optimizers that update parameters in place.

Every update is computed in the parameters' own dtype (float32), as PyTorch and optax do, and
written through preallocated scratch buffers: the training hot path allocates nothing.
"""

import math
from collections.abc import Sequence

import numpy as np

from schemas.params import Optimizer

MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Step:
    """One optimizer: call it with the parameters and their gradients to update in place.

    sgd:      p -= lr * g
    momentum: v = 0.9 v + g;  p -= lr * v
    adam:     m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g*g;
              p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    weight_decay adds weight_decay * w to the gradient of each weight matrix (not biases),
    after clipping, as PyTorch's optimizers do.
    """

    def __init__(
        self,
        kind: Optimizer,
        params: Sequence[np.ndarray],
        learning_rate: float,
        weight_decay: float = 0.0,
    ) -> None:
        self.kind = kind
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.velocity = [np.zeros_like(p) for p in params] if kind != "sgd" else []
        self.second = [np.zeros_like(p) for p in params] if kind == "adam" else []
        self.scratch = [np.empty_like(p) for p in params]
        self.roots = [np.empty_like(p) for p in params] if kind == "adam" else []
        self.count = 0

    def __call__(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        self.count += 1
        beta1, beta2 = ADAM_BETAS
        # bias corrections folded into the step size (Kingma & Ba, end of section 2); a Python
        # float, so the update stays in the parameters' dtype
        adam_step = self.learning_rate * math.sqrt(1 - beta2**self.count) / (1 - beta1**self.count)
        for index, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.weight_decay and p.ndim > 1:
                g = g + self.weight_decay * p
            scratch = self.scratch[index]
            if self.kind == "sgd":
                np.multiply(g, self.learning_rate, out=scratch)
            elif self.kind == "momentum":
                v = self.velocity[index]
                v *= MOMENTUM
                v += g
                np.multiply(v, self.learning_rate, out=scratch)
            else:
                m, v, root = self.velocity[index], self.second[index], self.roots[index]
                m *= beta1
                np.multiply(g, 1 - beta1, out=scratch)
                m += scratch
                v *= beta2
                np.multiply(g, g, out=scratch)
                scratch *= 1 - beta2
                v += scratch
                np.sqrt(v, out=root)
                root += ADAM_EPS
                np.multiply(m, adam_step, out=scratch)
                scratch /= root
            p -= scratch
