"""Optimizers that update parameters in place (no copies on the training hot path)."""

from collections.abc import Sequence

import numpy as np

from schemas.params import Optimizer

MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Step:
    """One optimizer: call it with the parameters and their gradients to update in place.

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
        self.count = 0

    def __call__(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        self.count += 1
        for index, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.weight_decay and p.ndim > 1:
                g = g + self.weight_decay * p
            if self.kind == "sgd":
                p -= self.learning_rate * g
            elif self.kind == "momentum":
                v = self.velocity[index]
                v *= MOMENTUM
                v += g
                p -= self.learning_rate * v
            else:
                self._adam(p, g, self.velocity[index], self.second[index])

    def _adam(self, p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray) -> None:
        beta1, beta2 = ADAM_BETAS
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        # bias corrections folded into the step size, as in Kingma & Ba's Algorithm 1 note
        step = self.learning_rate * np.sqrt(1 - beta2**self.count) / (1 - beta1**self.count)
        p -= step * m / (np.sqrt(v) + ADAM_EPS)
