"""The `clipprune` command line: the same job code as the service, run on local files."""

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from schemas.params import PruneParams, TrainParams
from schemas.report import Report
from workers import jobs
from workers.errors import InputError

P = TypeVar("P", bound=BaseModel)
PARAM_FLAG = "param:"  # the dest prefix of the flags that set a params key
# tqdm's set_description puts ": " after the stage itself; one in the format doubled it.
BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}"


class UsageError(Exception):
    """A problem with the command line itself."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipprune",
        description="Make ONNX models smaller: magnitude pruning and gradient-clipped training.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="prune an ONNX model")
    prune.add_argument("model", type=Path, help="the ONNX model to prune")
    prune.add_argument("-o", "--output", type=Path, required=True, help="where to write it")
    prune.add_argument("--eval-data", type=Path, help="CSV or NPZ to measure accuracy on")
    prune.add_argument("--train-data", type=Path, help="CSV or NPZ to fine-tune on")
    _add_output_flags(prune)
    _add_params_flags(prune, PruneParams)

    train = commands.add_parser("train", help="train a model on a data set, with clipped gradients")
    train.add_argument("data", type=Path, help="CSV (label column last, or --label) or NPZ")
    train.add_argument("-o", "--output", type=Path, required=True, help="where to write the ONNX")
    train.add_argument("--eval-data", type=Path, help="CSV or NPZ to measure accuracy on")
    _add_output_flags(train)
    _add_params_flags(train, TrainParams)

    serve = commands.add_parser("serve", help="run the REST service (settings: CLIPPRUNE_*)")
    serve.add_argument("--host", help="bind address (CLIPPRUNE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (CLIPPRUNE_PORT, default 8000)")
    commands.add_parser(
        "worker", help="run a Celery worker for CLIPPRUNE_BACKEND=celery (CLIPPRUNE_BROKER_URL)"
    )
    commands.add_parser(
        "ping-worker", help="exit 0 if this host's Celery worker answers (a container healthcheck)"
    )
    return parser


def _add_output_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--report", type=Path, help="write the report JSON to this file")
    command.add_argument("--json", action="store_true", help="print the report JSON to stdout")


def _add_params_flags(command: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """A flag for each key of `model` that holds one value, with the schema's description as
    its help; keys holding an object are set through --params."""
    nested = [name for name, field in model.model_fields.items() if _flag_type(field) is None]
    group = command.add_argument_group(
        f"{model.__name__} (each flag overrides the same key of --params)"
    )
    group.add_argument(
        "--params",
        default="{}",
        help=f"{model.__name__} as a JSON object: every key, and the only way to set "
        + ", ".join(nested),
    )
    for name, field in model.model_fields.items():
        kind = _flag_type(field)
        if kind is None:
            continue
        flag = "--" + name.replace("_", "-")
        options: dict[str, Any] = {"dest": PARAM_FLAG + name, "help": _flag_help(field)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            options.update(action="append", metavar="REGEX")
            options["help"] += " Repeat the flag for more."
        elif isinstance(kind, tuple):
            options["choices"] = kind
        else:
            options.update(type=kind, metavar=name.upper())
        group.add_argument(flag, **options)


def _flag_type(field: FieldInfo) -> type | tuple[str, ...] | None:
    """What a flag for `field` parses: bool, list (repeated), a Literal's choices, int, float
    or str; None for an object, which only --params can give."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, UnionType):  # `X | None`: None is the flag not given
        arms = [arm for arm in get_args(annotation) if arm is not type(None)]
        if len(arms) != 1:
            return None
        annotation = arms[0]
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) is list and get_args(annotation) == (str,):
        return list
    return annotation if annotation in (bool, int, float, str) else None


def _flag_help(field: FieldInfo) -> str:
    default = field.default
    shown = "" if default is None or default is PydanticUndefined else f" (default {default})"
    return (field.description or "").replace("%", "%%") + shown


def _json_params(text: str) -> dict[str, Any]:
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--params is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise UsageError("--params must be a JSON object")
    return params


def _params(args: argparse.Namespace, model: type[P]) -> P:
    """--params with each flag given put over its key, validated as the service does."""
    params = _json_params(args.params)
    for name, value in vars(args).items():
        if name.startswith(PARAM_FLAG) and value is not None:
            params[name.removeprefix(PARAM_FLAG)] = value
    return model.model_validate(params)


def _describe(error: ValidationError) -> str:
    """The service's wording of the same problems, suggestions for misspelled keys included."""
    from service.problems import field_problems  # FastAPI's import time, on errors only

    model = PruneParams if error.title == PruneParams.__name__ else TrainParams
    problems = field_problems(list(error.errors()), prefix="params", model=model)
    return "invalid parameters: " + "; ".join(f"{p.field}: {p.message}" for p in problems)


@contextmanager
def _progress_bar() -> Iterator[jobs.Progress]:
    if not sys.stderr.isatty():
        yield jobs.no_progress
        return
    from tqdm import tqdm

    with tqdm(total=100, file=sys.stderr, leave=False, bar_format=BAR_FORMAT) as bar:

        def update(stage: str, fraction: float) -> None:
            bar.set_description(stage)
            bar.update(round(fraction * 100) - bar.n)

        yield update


def _stage_inputs(job_dir: Path, files: dict[str, Path | None]) -> None:
    inputs = job_dir / jobs.INPUT_DIR
    inputs.mkdir()
    for name, source in files.items():
        if source is None:
            continue
        if not source.is_file():
            raise UsageError(f"{source}: no such file")
        (inputs / name).symlink_to(source.resolve())


def _run(
    args: argparse.Namespace,
    source: Path,
    files: dict[str, Path | None],
    job: Callable[..., Report],
) -> None:
    """Run a job entry point in a temporary job directory, as the service would."""
    with tempfile.TemporaryDirectory(prefix="clipprune-") as tmp:
        job_dir = Path(tmp)
        _stage_inputs(job_dir, files)
        with _progress_bar() as progress:
            report = job(job_dir, progress)
        shutil.move(job_dir / jobs.MODEL_OUT, args.output)
    text = report.model_dump_json(indent=2)
    if args.report:
        args.report.write_text(text + "\n")
    if args.json:
        print(text)
    print(summary(source.name, report), file=sys.stderr)


def summary(name: str, report: Report) -> str:
    """One line a person reads after a run: bytes before and after, and the metric."""
    size = report.size
    line = f"{name} {size.original_bytes:,} → {size.compressed_bytes:,} bytes ({size.ratio:.1f}x), "
    accuracy = report.accuracy
    if accuracy is None:
        return line + "accuracy not measured"
    return line + f"{accuracy.metric} {accuracy.original:.4f} → {accuracy.compressed:.4f}"


def _prune(args: argparse.Namespace) -> None:
    params = _params(args, PruneParams)
    files = {
        jobs.MODEL_IN: args.model,
        jobs.EVAL_DATA: args.eval_data,
        jobs.TRAIN_DATA: args.train_data,
    }
    _run(
        args,
        args.model,
        files,
        lambda job_dir, progress: jobs.run_prune_job(job_dir, params, progress),
    )


def _train(args: argparse.Namespace) -> None:
    params = _params(args, TrainParams)
    files = {jobs.TRAIN_DATA: args.data, jobs.EVAL_DATA: args.eval_data}
    _run(
        args,
        args.output,
        files,
        lambda job_dir, progress: jobs.run_train_job(job_dir, params, progress),
    )


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    overrides = {key: getattr(args, key) for key in ("host", "port") if getattr(args, key)}
    settings = Settings(**overrides)
    # One process: the app's own worker processes do the compute.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
    )


def _worker(args: argparse.Namespace) -> None:
    from service.celery_app import run_worker
    from service.settings import Settings
    from service.store import JobStore

    settings = Settings()
    # The database at the newest schema before any job is taken, as `serve` has it at start
    # (service/migrations: under a lock, so workers starting with the API migrate it once).
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    JobStore(settings.database).engine.dispose()
    run_worker(settings)


def _ping_worker(args: argparse.Namespace) -> int:
    from service.celery_app import ping_worker
    from service.settings import Settings

    return 0 if ping_worker(Settings()) else 1


# command -> what runs it; None or a number is the exit status
COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "prune": _prune,
    "train": _train,
    "serve": _serve,
    "worker": _worker,
    "ping-worker": _ping_worker,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = COMMANDS[args.command](args)
    except ValidationError as exc:
        print(f"clipprune: error: {_describe(exc)}", file=sys.stderr)
        return 2
    except (InputError, UsageError, OSError) as exc:
        print(f"clipprune: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("clipprune: error: out of memory; try a smaller model or data set", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug in clipprune: still one line, and a non-zero exit
        print(f"clipprune: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
