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

# Output files: workers/graph/encoding.py ENCODERS
Encoding = Literal["dense", "sparse", "int8"]

# Evaluation: workers/evaluate
Task = Literal["auto", "classification", "regression"]  # evaluate/metrics.py TASKS
# What the report's accuracy section measures: evaluate/metrics.py METRICS. "agreement" is
# used when there are no labels: the share of samples where the compressed model answers as
# the original does.
Metric = Literal["accuracy", "r2", "agreement"]

# Jobs and the service
JobKind = Literal["prune", "train"]  # workers/jobs JOB_KINDS
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
Backend = Literal["local", "celery"]  # service/app.py BACKENDS
