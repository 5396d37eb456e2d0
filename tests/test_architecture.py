"""The layout holds: imports point one way between the layers, and every vocabulary has exactly
its registry.

Layers (README, Layout): schemas <- workers.errors <- nn <- graph <- compress <- jobs, with
evaluate used by compress and jobs; service imports only the job entry points, file names and
errors. Imports are read from the source (ast), so a lazy import inside a function counts too.
"""

import ast
from pathlib import Path
from typing import get_args

import pytest

from schemas import vocabulary
from service import app as service_app
from workers import jobs
from workers.compress import criteria as compress_criteria
from workers.compress import prune as compress_prune
from workers.evaluate import data as evaluate_data
from workers.evaluate import metrics
from workers.graph import encoding, export
from workers.jobs import train as jobs_train
from workers.nn import clipping, masks, network, optimizers

ROOT = Path(__file__).resolve().parent.parent

# What each package may import from this project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "workers": set(),  # the package file itself; every module of workers sits in a layer below
    "workers.errors": {"schemas"},
    "workers.nn": {"schemas", "workers.errors"},
    "workers.graph": {"schemas", "workers.errors", "workers.nn"},
    "workers.evaluate": {"schemas", "workers.errors"},
    "workers.compress": {
        "schemas",
        "workers.errors",
        "workers.nn",
        "workers.graph",
        "workers.evaluate",
    },
    "workers.jobs": {
        "schemas",
        "workers.errors",
        "workers.nn",
        "workers.graph",
        "workers.evaluate",
        "workers.compress",
    },
    "service": {"schemas", "workers.errors", "workers.jobs"},
}
# Third-party packages a layer must not import: nn is NumPy only; workers have no HTTP.
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "workers.nn": {"onnx", "onnxruntime"},
    "workers": {"fastapi", "starlette", "sqlalchemy", "celery", "service"},
}
PROJECT = ("schemas", "workers", "service")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every name the file imports, absolute: `from a.b import c` gives a.b.c, which is a
    module or an attribute of a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def layer_of(module: str) -> str | None:
    """The longest ALLOWED key that `module` sits in."""
    candidates = [key for key in ALLOWED if module == key or module.startswith(key + ".")]
    return max(candidates, key=len) if candidates else None


def sources() -> list[Path]:
    return sorted(path for package in PROJECT for path in (ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """The project modules a file imports (names that are attributes are cut to their module)."""
    modules = set()
    for name in project_imports(path):
        if name.split(".")[0] not in PROJECT:
            continue
        while name and not (
            (ROOT / name.replace(".", "/")).with_suffix(".py").exists()
            or (ROOT / name.replace(".", "/") / "__init__.py").exists()
        ):
            name = name.rpartition(".")[0]
        modules.add(name)
    return modules


def test_imports_point_one_way_between_the_layers():
    wrong = []
    for path in sources():
        here = module_name(path)
        layer = layer_of(here)
        assert layer is not None, f"{here} is in no layer of ALLOWED"
        for target in imported_modules(path):
            target_layer = layer_of(target)
            if target_layer is None or target_layer == layer:
                continue
            if target_layer not in ALLOWED[layer]:
                wrong.append(f"{here} imports {target} ({layer} may not import {target_layer})")
    assert not wrong, "\n".join(wrong)


def test_the_numpy_layer_and_the_workers_import_no_forbidden_package():
    wrong = []
    for path in sources():
        here = module_name(path)
        for prefix, forbidden in FORBIDDEN_THIRD_PARTY.items():
            if here == prefix or here.startswith(prefix + "."):
                for name in project_imports(path):
                    if name.split(".")[0] in forbidden:
                        wrong.append(f"{here} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_form_a_cycle():
    graph = {module_name(path): imported_modules(path) for path in sources()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in graph.get(module, set()):
            if target == module or target not in graph:
                continue
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] if target in trail else trail
                pytest.fail("import cycle: " + " -> ".join([*cycle, target]))
            if target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


# (vocabulary Literal, its registry): the registry's keys must be exactly the Literal's values.
REGISTRIES = [
    (vocabulary.ClipMode, clipping.CLIPPERS),
    (vocabulary.Optimizer, optimizers.OPTIMIZERS),
    (vocabulary.Activation, network.ACTIVATIONS),
    (vocabulary.HiddenActivation, export.ACTIVATION_OPS),
    (vocabulary.Head, network.HEADS),
    (vocabulary.ModelType, jobs_train.ARCHITECTURES),
    (vocabulary.Scope, masks.SCOPES),
    (vocabulary.Granularity, compress_prune.GRANULARITIES),
    (vocabulary.Criterion, compress_criteria.CRITERIA),
    (vocabulary.Criterion, compress_criteria.UNIT_CRITERIA),
    (vocabulary.Encoding, encoding.ENCODERS),
    (vocabulary.Task, metrics.TASKS),
    (vocabulary.Task, evaluate_data.LABEL_TASKS),
    (vocabulary.Metric, metrics.METRICS),
    (vocabulary.JobKind, jobs.JOB_KINDS),
    (vocabulary.Backend, service_app.BACKENDS),
]


def vocabulary_name(names: object) -> str:
    return next(name for name, value in vars(vocabulary).items() if value is names)


@pytest.mark.parametrize(
    ("names", "registry"),
    REGISTRIES,
    ids=[f"{vocabulary_name(names)}-{index}" for index, (names, _) in enumerate(REGISTRIES)],
)
def test_every_vocabulary_name_has_its_registry_entry_and_no_more(names, registry):
    assert set(get_args(names)) == set(registry)


def test_every_vocabulary_with_an_implementation_is_checked():
    """A Literal in schemas/vocabulary.py is either checked above or named here as a plain
    value with no implementation to choose (a job's status, a training schedule), or a choice
    that adds "auto" to a checked vocabulary."""
    plain = {"JobStatus", "PruneSchedule", "EncodingChoice", "MetricChoice"}
    checked = {
        name
        for name, value in vars(vocabulary).items()
        if any(value is names for names, _ in REGISTRIES)
    }
    literals = {
        name for name, value in vars(vocabulary).items() if get_args(value) and name[0].isupper()
    }
    assert literals - plain == checked


def test_an_unknown_name_raises_instead_of_falling_to_a_default():
    with pytest.raises(KeyError):
        clipping.clip_gradients([], "clip_everything", 1.0)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        list(masks.magnitude_masks([], sparsity=0.5, scope="everywhere"))  # type: ignore[arg-type]
