"""The job stage of scripts/docker-smoke.sh: a prune and a train job through a running stack.

Makes a digits MLP with scikit-learn and skl2onnx, submits a prune job (model, eval and train
CSVs: 80% pruned, then fine-tuned with clipped gradients) and a train job (train and eval CSVs)
to the API, polls both to `succeeded`, downloads each model, checks its SHA-256 against the ETag
and the report, loads it in onnxruntime, scores it on the eval CSV and checks that the report's
numbers agree and are sane. Exits 1 with a line that says which check failed. Runs with the
project's .venv (test extras: httpx, scikit-learn, skl2onnx).
"""

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

TERMINAL = {"succeeded", "failed", "canceled"}
# 80% of each layer pruned, then the survivors fine-tuned with clipped gradients.
PRUNE_PARAMS = {"sparsity": 0.8, "fine_tune": {"epochs": 10, "learning_rate": 0.003}}
TRAIN_PARAMS = {"model": {"type": "mlp", "hidden": [32]}, "epochs": 15, "seed": 0}


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def make_inputs(workdir: Path) -> dict[str, Path]:
    """A 64-64-10 digits MLP as ONNX, and the 70/30 split as CSVs (label column last)."""
    workdir.mkdir(parents=True, exist_ok=True)
    features, labels = load_digits(return_X_y=True)
    features = (features / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=0)
        mlp.fit(x_train, y_train)
    paths = {
        "model": workdir / "digits_mlp.onnx",
        "train": workdir / "digits_train.csv",
        "eval": workdir / "digits_eval.csv",
    }
    paths["model"].write_bytes(to_onnx(mlp, x_train[:1]).SerializeToString())
    header = ",".join([f"pixel{i}" for i in range(64)] + ["digit"])
    for name, x, y in (("train", x_train, y_train), ("eval", x_test, y_test)):
        np.savetxt(paths[name], np.c_[x, y], delimiter=",", header=header, comments="", fmt="%g")
    return paths


def wait_ready(client: httpx.Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    body: Any = None
    while time.monotonic() < deadline:
        try:
            response = client.get("/readyz")
            body = response.json()
            if response.status_code == 200:
                print(f"  /readyz: {body['checks']}")
                return
        except httpx.HTTPError as exc:
            body = repr(exc)
        time.sleep(1)
    raise CheckFailed(f"/readyz not 200 within {timeout_s:.0f} s; last answer: {body}")


def submit(client: httpx.Client, kind: str, files: dict[str, Path], params: dict) -> str:
    opened = {name: (path.name, path.read_bytes()) for name, path in files.items()}
    response = client.post(f"/v1/jobs/{kind}", files=opened, data={"params": json.dumps(params)})
    status = response.status_code
    check(status == 202, f"{kind}: submit answered {status}: {response.text}")
    job = response.json()
    check(response.headers.get("location") == f"/v1/jobs/{job['id']}", f"{kind}: bad Location")
    print(f"  {kind} job {job['id']} {job['status']}")
    return job["id"]


def wait_finished(client: httpx.Client, job_ids: list[str], timeout_s: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    seen: dict[str, tuple] = {}
    jobs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if jobs.get(job_id, {}).get("status") in TERMINAL:
                continue
            job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            jobs[job_id] = job
            state = (job["status"], job["stage"])
            if seen.get(job_id) != state:
                seen[job_id] = state
                print(f"  {job['kind']} job {job_id}: {job['status']} {job['stage'] or ''}")
        if all(job.get("status") in TERMINAL for job in jobs.values()) and len(jobs) == len(
            job_ids
        ):
            return jobs
        time.sleep(0.5)
    raise CheckFailed(f"jobs not finished within {timeout_s:.0f} s: {seen}")


def fetch_model(client: httpx.Client, job_id: str, workdir: Path) -> tuple[Path, dict]:
    response = client.get(f"/v1/jobs/{job_id}/model").raise_for_status()
    data = response.content
    digest = hashlib.sha256(data).hexdigest()
    etag = response.headers.get("etag", "").strip('"')
    check(etag == digest, f"{job_id}: ETag {etag!r} is not the model's SHA-256 {digest}")
    report = client.get(f"/v1/jobs/{job_id}/report").raise_for_status().json()
    check(report["onnx"]["model_sha256"] == digest, f"{job_id}: report's model_sha256 differs")
    check(report["onnx"]["checker"] == "passed", f"{job_id}: checker: {report['onnx']['checker']}")
    page = client.get(f"/v1/jobs/{job_id}/report.html")
    check(page.status_code == 200 and job_id in page.text, f"{job_id}: report.html is not its page")
    path = workdir / f"{job_id}.onnx"
    path.write_bytes(data)
    return path, report


def accuracy_in_onnxruntime(model: Path, eval_csv: Path) -> float:
    table = np.loadtxt(eval_csv, delimiter=",", skiprows=1, dtype=np.float32)
    features, labels = table[:, :-1], table[:, -1].astype(np.int64)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [output.name for output in session.get_outputs()]
    predicted = session.run([outputs[0]], {name: features})[0]
    return float(np.mean(np.asarray(predicted).astype(np.int64).ravel() == labels))


def check_prune(report: dict, measured: float) -> None:
    size, accuracy = report["size"], report["accuracy"]
    print(
        f"  prune: sparsity {size['sparsity']:.3f}, gzip {size['original_gzip_bytes']} -> "
        f"{size['compressed_gzip_bytes']} bytes, accuracy {accuracy['original']:.3f} -> "
        f"{accuracy['compressed']:.3f} (onnxruntime here: {measured:.3f})"
    )
    check(0.75 <= size["sparsity"] <= 0.85, f"prune: sparsity {size['sparsity']} is not about 0.8")
    check(
        size["compressed_gzip_bytes"] < size["original_gzip_bytes"],
        "prune: gzip of the pruned model is not smaller",
    )
    check(accuracy["metric"] == "accuracy", f"prune: metric {accuracy['metric']}")
    check(accuracy["original"] >= 0.9, f"prune: original accuracy {accuracy['original']}")
    check(accuracy["compressed"] >= 0.9, f"prune: fine-tuned accuracy {accuracy['compressed']}")
    check(
        abs(accuracy["compressed"] - measured) <= 0.01,
        f"prune: report says {accuracy['compressed']}, onnxruntime here {measured}",
    )


def check_train(report: dict, measured: float) -> None:
    accuracy, training = report["accuracy"], report["training"]
    losses = training["loss"]
    print(
        f"  train: {len(losses)} epochs, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"accuracy {accuracy['compressed']:.3f} (onnxruntime here: {measured:.3f}), "
        f"clipped {training['clip']['clipped_fraction']:.2f} of steps"
    )
    check(len(losses) == TRAIN_PARAMS["epochs"], f"train: {len(losses)} epochs of loss")
    check(losses[-1] < losses[0], "train: loss did not fall")
    check(accuracy["compressed"] >= 0.85, f"train: accuracy {accuracy['compressed']}")
    check(
        abs(accuracy["compressed"] - measured) <= 0.01,
        f"train: report says {accuracy['compressed']}, onnxruntime here {measured}",
    )


def run(url: str, key: str | None, workdir: Path, timeout_s: float, ids_file: Path | None) -> None:
    paths = make_inputs(workdir)
    headers = {"X-API-Key": key} if key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        wait_ready(client, timeout_s=60)
        check(client.get("/metrics").status_code == 200, "/metrics is not 200")
        prune_files = {
            "model": paths["model"],
            "eval_data": paths["eval"],
            "train_data": paths["train"],
        }
        prune_id = submit(client, "prune", prune_files, PRUNE_PARAMS)
        train_files = {"train_data": paths["train"], "eval_data": paths["eval"]}
        train_id = submit(client, "train", train_files, TRAIN_PARAMS)
        if ids_file:
            ids_file.write_text(f"prune {prune_id}\ntrain {train_id}\n")
        jobs = wait_finished(client, [prune_id, train_id], timeout_s)
        for job in jobs.values():
            check(job["status"] == "succeeded", f"{job['kind']} job {job['id']}: {job}")
        listed = {job["id"] for job in client.get("/v1/jobs").raise_for_status().json()["items"]}
        check({prune_id, train_id} <= listed, "GET /v1/jobs does not list both jobs")
        model, report = fetch_model(client, prune_id, workdir)
        check_prune(report, accuracy_in_onnxruntime(model, paths["eval"]))
        model, report = fetch_model(client, train_id, workdir)
        check_train(report, accuracy_in_onnxruntime(model, paths["eval"]))
        anonymous = httpx.get(f"{url}/v1/jobs/{prune_id}", timeout=10)
        if key:
            check(anonymous.status_code == 401, f"no key answered {anonymous.status_code}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the API, e.g. http://127.0.0.1:8000")
    parser.add_argument("--key", help="an API key (X-API-Key)")
    parser.add_argument("--workdir", type=Path, required=True, help="where models and CSVs go")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the jobs")
    parser.add_argument("--ids-file", type=Path, help="write 'kind id' lines here")
    args = parser.parse_args()
    try:
        run(args.url, args.key, args.workdir, args.timeout, args.ids_file)
    except (CheckFailed, httpx.HTTPError) as exc:
        print(f"docker-smoke jobs: {exc}", file=sys.stderr)
        return 1
    print("  jobs: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
