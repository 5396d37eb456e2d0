"""Every closed set of names clipprune uses, defined once.

Each vocabulary is implemented by a registry (a dict from name to function or class) in the
layer that does the work; `tests/test_architecture.py` checks that the two match exactly, so
adding a name here without its implementation (or the reverse) fails the suite. The CLI takes
its choices from these same Literals.
"""

from typing import Literal

# Training: workers/nn
ClipMode = Literal["none", "value", "norm", "global_norm", "adaptive"]  # nn/clipping.py CLIPPERS
Optimizer = Literal["sgd", "momentum", "adam"]  # nn/optimizers.py OPTIMIZERS
HiddenActivation = Literal["relu", "tanh", "sigmoid"]  # what a caller may ask for in an MLP
Activation = Literal[HiddenActivation, "identity"]  # nn/network.py ACTIVATIONS
# The output head a network trains with, paired with its loss: nn/network.py HEADS
Head = Literal["softmax", "sigmoid", "identity"]
ModelType = Literal["linear", "logistic", "softmax", "mlp"]  # jobs/train.py ARCHITECTURES
PruneSchedule = Literal["one_shot", "gradual"]

# Pruning: workers/nn/masks.py and workers/compress
Scope = Literal["layer", "global"]  # nn/masks.py SCOPES
Granularity = Literal["unstructured", "structured"]  # compress/prune.py GRANULARITIES
# How weights are ranked for pruning: compress/criteria.py CRITERIA (single weights) and
# UNIT_CRITERIA (structured units). activation is Wanda's |w| · ‖x‖₂ on calibration inputs (the
# eval_data); for units, the output error their removal leaves in the layers reading them.
Criterion = Literal["magnitude", "activation"]

# Output files: workers/graph/encoding.py ENCODERS. "auto" (PruneParams.encoding) tries those
# that can shrink the model and keeps the smallest file that meets the bound.
Encoding = Literal["dense", "sparse", "int8", "float16"]
EncodingChoice = Literal["auto", Encoding]

# Evaluation: workers/evaluate
Task = Literal["auto", "classification", "regression"]  # evaluate/metrics.py TASKS
# How an output is scored: evaluate/metrics.py METRICS. accuracy and r2 score against labels;
# the others score the compressed model's output against the original's on the same inputs.
Metric = Literal[
    "accuracy", "r2", "top1_agreement", "cosine", "relative_error", "mse", "exact_match"
]
# PruneParams.metric: "auto" picks per output (evaluate/metrics.py says how, the report why).
MetricChoice = Literal["auto", Metric]

# Jobs and the service
JobKind = Literal["prune", "train"]  # workers/jobs JOB_KINDS
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
Backend = Literal["local", "celery"]  # service/app.py BACKENDS
