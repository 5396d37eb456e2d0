"""The `clipprune` command line: the same job code as the service, run on local files."""

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from schemas.params import PruneParams, TrainParams
from schemas.report import Report
from schemas.vocabulary import EncodingChoice, Granularity, MetricChoice, Scope
from workers import jobs
from workers.errors import InputError


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
    prune.add_argument("--params", default="{}", help="PruneParams as a JSON object")
    target = prune.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="fraction of weights to zero, in [0, 1)")
    target.add_argument("--threshold", type=float, help="zero every weight with |w| <= this")
    prune.add_argument("--scope", choices=get_args(Scope))
    prune.add_argument("--granularity", choices=get_args(Granularity))
    prune.add_argument("--encoding", choices=get_args(EncodingChoice))
    prune.add_argument("--metric", choices=get_args(MetricChoice))
    prune.add_argument("--eval-data", type=Path, help="CSV or NPZ to measure accuracy on")
    prune.add_argument("--train-data", type=Path, help="CSV or NPZ to fine-tune on")
    prune.add_argument("--report", type=Path, help="write the report here, not to stdout")

    train = commands.add_parser("train", help="train a model on a data set, with clipped gradients")
    train.add_argument("data", type=Path, help="CSV (label column last, or --params label) or NPZ")
    train.add_argument("-o", "--output", type=Path, required=True, help="where to write the ONNX")
    train.add_argument("--params", default="{}", help="TrainParams as a JSON object")
    train.add_argument("--eval-data", type=Path, help="CSV or NPZ to measure accuracy on")
    train.add_argument("--report", type=Path, help="write the report here, not to stdout")

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


def _json_params(text: str) -> dict[str, Any]:
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--params is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise UsageError("--params must be a JSON object")
    return params


def _prune_params(args: argparse.Namespace) -> PruneParams:
    params = _json_params(args.params)
    for flag in ("sparsity", "threshold", "scope", "granularity", "encoding", "metric"):
        if getattr(args, flag) is not None:
            params[flag] = getattr(args, flag)
    return PruneParams.model_validate(params)


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

    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
    with tqdm(total=100, file=sys.stderr, leave=False, bar_format=bar_format) as bar:

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
    args: argparse.Namespace, files: dict[str, Path | None], job: Callable[..., Report]
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
    else:
        print(text)


def _prune(args: argparse.Namespace) -> None:
    params = _prune_params(args)
    files = {
        jobs.MODEL_IN: args.model,
        jobs.EVAL_DATA: args.eval_data,
        jobs.TRAIN_DATA: args.train_data,
    }
    _run(args, files, lambda job_dir, progress: jobs.run_prune_job(job_dir, params, progress))


def _train(args: argparse.Namespace) -> None:
    params = TrainParams.model_validate(_json_params(args.params))
    files = {jobs.TRAIN_DATA: args.data, jobs.EVAL_DATA: args.eval_data}
    _run(args, files, lambda job_dir, progress: jobs.run_train_job(job_dir, params, progress))


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
