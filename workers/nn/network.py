"""A multilayer perceptron in NumPy: forward and backward side by side.

Weights are [in, out] as in ONNX MatMul, biases [out]. The last layer's output goes through a
head that is paired with its loss, so the gradient at the logits stays simple:
softmax + cross-entropy, sigmoid + binary cross-entropy, identity + mean squared error.
Inputs are standardised inside the model ((x - mean) * scale), so the exported ONNX file takes
raw features.
"""

import itertools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Activation = Literal["relu", "tanh", "sigmoid", "identity"]
Head = Literal["softmax", "sigmoid", "identity"]

DTYPE = np.float32


def activate(z: np.ndarray, kind: Activation) -> np.ndarray:
    """The activation of z, computed in z's own memory where the ufunc allows: forward keeps
    only each layer's output, never its pre-activation."""
    if kind == "relu":
        return np.maximum(z, 0, out=z)
    if kind == "tanh":
        return np.tanh(z, out=z)
    if kind == "sigmoid":
        return sigmoid(z)
    return z


def activation_grad(h: np.ndarray, kind: Activation) -> np.ndarray:
    """d activate(z) / dz from the output h = activate(z): for relu h > 0 exactly where z > 0
    (NaN stays NaN through max and fails both tests), so z need not be kept."""
    if kind == "relu":
        return h > 0  # a mask: multiplying by it keeps or zeroes
    if kind == "tanh":
        return 1 - h * h
    if kind == "sigmoid":
        return h * (1 - h)
    return np.ones_like(h)


def sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a negative number only: no overflow for large |z|
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass
class Network:
    weights: list[np.ndarray]  # [in, out] per layer
    biases: list[np.ndarray]  # [out] per layer
    activations: list[Activation]  # one per hidden layer: len(weights) - 1
    head: Head
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0, DTYPE))  # [features]
    scale: np.ndarray = field(default_factory=lambda: np.ones(0, DTYPE))  # [features]

    @property
    def params(self) -> list[np.ndarray]:
        """W0, b0, W1, b1, ...: the order of gradients, optimizer state and masks."""
        return [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]

    def standardise(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(DTYPE, copy=False)
        if not self.mean.size:
            return x
        return (x - self.mean) * self.scale

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [B, out] of the standardised batch x, with each layer's input kept for
        backward (a hidden layer's input is the previous layer's activation)."""
        inputs = []
        h = x
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            inputs.append(h)  # [B, in]
            z = h @ w  # [B, out]
            z += b  # in place: the same one rounding as h @ w + b, without a second array
            h = activate(z, self.activations[layer]) if layer < len(self.activations) else z
        return h, inputs

    def output(self, logits: np.ndarray) -> np.ndarray:
        if self.head == "softmax":
            return np.exp(log_softmax(logits))
        if self.head == "sigmoid":
            return sigmoid(logits)
        return logits

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Head outputs (probabilities or values) for raw features x: [N, out]."""
        logits, _ = self.forward(self.standardise(x))
        return self.output(logits)

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Mean loss on the standardised batch and its gradients, in `params` order.

        y: class indices [B] for softmax, {0, 1} [B] for sigmoid, targets [B, out] for identity.
        """
        logits, inputs = self.forward(x)
        batch = len(x)
        if self.head == "softmax":
            log_p = log_softmax(logits)  # [B, k]
            loss = -float(np.mean(log_p[np.arange(batch), y]))
            dz = np.exp(log_p)
            dz[np.arange(batch), y] -= 1
            dz /= batch
        elif self.head == "sigmoid":
            z = logits[:, 0]
            # BCE with logits, stable: max(z, 0) - z*y + log(1 + exp(-|z|))
            loss = float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
            dz = ((sigmoid(z) - y) / batch)[:, None].astype(logits.dtype, copy=False)
        else:
            diff = logits - y  # [B, out]
            loss = float(np.mean(diff * diff))
            dz = diff * (2 / diff.size)
        grads: list[np.ndarray] = []
        for layer in reversed(range(len(self.weights))):
            grads.append(dz.sum(axis=0))  # db [out]
            grads.append(inputs[layer].T @ dz)  # dW [in, out]
            if layer:
                dz = dz @ self.weights[layer].T  # [B, in]: gradient at this layer's input
                # inputs[layer] is the previous layer's activation, kept from forward
                dz *= activation_grad(inputs[layer], self.activations[layer - 1])
        grads.reverse()  # W0, b0, W1, b1, ...
        return loss, grads


def initialise(
    sizes: list[int], activations: list[Activation], head: Head, rng: np.random.Generator
) -> Network:
    """He initialisation for relu layers, Glorot for the rest; zero biases."""
    weights, biases = [], []
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        relu = layer < len(activations) and activations[layer] == "relu"
        std = np.sqrt(2.0 / fan_in) if relu else np.sqrt(2.0 / (fan_in + fan_out))
        weights.append((rng.standard_normal((fan_in, fan_out)) * std).astype(DTYPE))
        biases.append(np.zeros(fan_out, DTYPE))
    return Network(weights, biases, activations, head)
