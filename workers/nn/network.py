"""A multilayer perceptron in NumPy: forward and backward side by side.

Weights are [in, out] as in ONNX MatMul, biases [out]. The last layer's output goes through a
head that is paired with its loss, so the gradient at the logits stays simple:
softmax + cross-entropy, sigmoid + binary cross-entropy, identity + mean squared error; and
each head's distillation from a teacher's logits (Hinton et al. 2015), which fine-tuning blends
with it.
Inputs are standardised inside the model ((x - mean) * scale), so the exported ONNX file takes
raw features.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from schemas.vocabulary import Activation, Head

DTYPE = np.float32


def sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a negative number only: no overflow for large |z|
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class ActivationRule:
    """An activation's forward and its derivative, side by side.

    forward computes in z's own memory where the ufunc allows: forward keeps only each layer's
    output, never its pre-activation. grad is d activate(z) / dz from the output h alone."""

    forward: Callable[[np.ndarray], np.ndarray]
    grad: Callable[[np.ndarray], np.ndarray]


ACTIVATIONS: dict[Activation, ActivationRule] = {
    # h > 0 exactly where z > 0 (NaN stays NaN through max and fails both tests); a boolean
    # mask: multiplying by it keeps or zeroes
    "relu": ActivationRule(lambda z: np.maximum(z, 0, out=z), lambda h: h > 0),
    "tanh": ActivationRule(lambda z: np.tanh(z, out=z), lambda h: 1 - h * h),
    "sigmoid": ActivationRule(sigmoid, lambda h: h * (1 - h)),
    "identity": ActivationRule(lambda z: z, np.ones_like),
}


def softmax_loss(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Cross-entropy of class indices y [B]; gradient at the logits [B, k]."""
    batch = len(logits)
    log_p = log_softmax(logits)  # [B, k]
    loss = -float(np.mean(log_p[np.arange(batch), y]))
    dz = np.exp(log_p)
    dz[np.arange(batch), y] -= 1
    dz /= batch
    return loss, dz


def sigmoid_loss(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Binary cross-entropy of {0, 1} labels y [B] on one logit [B, 1]."""
    z = logits[:, 0]
    # BCE with logits, stable: max(z, 0) - z*y + log(1 + exp(-|z|))
    loss = float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
    dz = ((sigmoid(z) - y) / len(logits))[:, None].astype(logits.dtype, copy=False)
    return loss, dz


def squared_loss(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared error against targets y [B, out]."""
    diff = logits - y  # [B, out]
    return float(np.mean(diff * diff)), diff * (2 / diff.size)


Loss = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]  # (logits, y) -> value, d/dz
# (student, teacher, temperature) -> value, gradient at the student's output
Distillation = Callable[[np.ndarray, np.ndarray, float], tuple[float, np.ndarray]]


def mse_distillation(
    student: np.ndarray, teacher: np.ndarray, _: float
) -> tuple[float, np.ndarray]:
    """Mean squared error to the teacher's output: embeddings, feature maps, regressions."""
    return squared_loss(student, teacher)


def kl_distillation(
    student: np.ndarray, teacher: np.ndarray, temperature: float
) -> tuple[float, np.ndarray]:
    """KL(teacher || student) of the class scores [N, C] softened by `temperature`, times T²
    so the gradient's scale does not depend on T (Hinton et al. 2015)."""
    log_q = log_softmax(student / temperature)  # [N, C]
    log_p = log_softmax(teacher / temperature)
    p = np.exp(log_p)
    loss = float(np.sum(p * (log_p - log_q)) / len(student)) * temperature**2
    grad = (np.exp(log_q) - p) * (temperature / len(student))
    return loss, grad.astype(student.dtype, copy=False)


def binary_kl_distillation(
    student: np.ndarray, teacher: np.ndarray, temperature: float
) -> tuple[float, np.ndarray]:
    """kl_distillation of one logit z [N, 1]: a sigmoid is the softmax of the two logits (0, z),
    so the same KL of those two classes, and the gradient at z alone."""
    loss, grad = kl_distillation(
        two_class_logits(student), two_class_logits(teacher.astype(student.dtype)), temperature
    )
    return loss, grad[:, 1:]


def two_class_logits(z: np.ndarray) -> np.ndarray:
    """A sigmoid's one logit [N, 1] as the two logits (0, z) [N, 2] whose softmax it is."""
    return np.hstack([np.zeros_like(z), z])


def distilled_loss(
    task: Loss,
    distillation: Distillation,
    teacher: np.ndarray,
    temperature: float,
    alpha: float,
    logits: np.ndarray,
    y: np.ndarray,
) -> tuple[float, np.ndarray]:
    """(1 - alpha) distillation from the teacher's logits + alpha the task loss on labels y, the
    value and its gradient at the logits, as the graph path's Distiller weighs them."""
    soft, d_soft = distillation(logits, teacher, temperature)
    if alpha == 0:  # distillation alone: y are placeholders, their loss would weigh nothing
        return soft, d_soft
    hard, d_hard = task(logits, y)
    d_soft *= 1 - alpha  # both are fresh arrays: blend in place
    d_soft += alpha * d_hard
    return (1 - alpha) * soft + alpha * hard, d_soft


def r2(predicted: np.ndarray, y: np.ndarray) -> float:
    total = float(np.sum((y - y.mean(axis=0)) ** 2))
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else 0.0


@dataclass(frozen=True)
class HeadRule:
    """What the last layer's logits become, the loss paired with it (so the gradient at the
    logits stays simple), and the validation score on logits."""

    output: Callable[[np.ndarray], np.ndarray]
    loss: Loss
    score: Callable[[np.ndarray, np.ndarray], float]
    metric: str  # the name of `score` in reports
    distillation: Distillation  # learning a teacher's logits: softened classes, or its values


HEADS: dict[Head, HeadRule] = {
    "softmax": HeadRule(
        lambda z: np.exp(log_softmax(z)),
        softmax_loss,
        lambda z, y: float(np.mean(np.argmax(z, axis=1) == y)),
        "accuracy",
        kl_distillation,
    ),
    "sigmoid": HeadRule(
        sigmoid,
        sigmoid_loss,
        lambda z, y: float(np.mean((z[:, 0] > 0) == (y > 0.5))),
        "accuracy",
        binary_kl_distillation,
    ),
    "identity": HeadRule(lambda z: z, squared_loss, r2, "r2", mse_distillation),
}


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
            h = (
                ACTIVATIONS[self.activations[layer]].forward(z)
                if layer < len(self.activations)
                else z
            )
        return h, inputs

    def output(self, logits: np.ndarray) -> np.ndarray:
        return HEADS[self.head].output(logits)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Head outputs (probabilities or values) for raw features x: [N, out]."""
        logits, _ = self.forward(self.standardise(x))
        return self.output(logits)

    def loss_and_grads(
        self, x: np.ndarray, y: np.ndarray, loss_of: Loss | None = None
    ) -> tuple[float, list[np.ndarray]]:
        """Mean loss on the standardised batch and its gradients, in `params` order.

        y: class indices [B] for softmax, {0, 1} [B] for sigmoid, targets [B, out] for identity.
        loss_of: the loss at the logits; the head's own by default.
        """
        logits, inputs = self.forward(x)
        loss, dz = (loss_of or HEADS[self.head].loss)(logits, y)
        grads: list[np.ndarray] = []
        for layer in reversed(range(len(self.weights))):
            grads.append(dz.sum(axis=0))  # db [out]
            grads.append(inputs[layer].T @ dz)  # dW [in, out]
            if layer:
                dz = dz @ self.weights[layer].T  # [B, in]: gradient at this layer's input
                # inputs[layer] is the previous layer's activation, kept from forward
                dz *= ACTIVATIONS[self.activations[layer - 1]].grad(inputs[layer])
        grads.reverse()  # W0, b0, W1, b1, ...
        return loss, grads

    @staticmethod
    def weight_grads(grads: list[np.ndarray]) -> list[np.ndarray]:
        """The weight matrices' gradients among `grads` (in `params` order), as views."""
        return grads[::2]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        """The head's validation metric (accuracy, or r2 for regression) on standardised x."""
        logits, _ = self.forward(x)
        return HEADS[self.head].score(logits, y)


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
