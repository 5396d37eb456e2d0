"""A real clipprune service in a real uvicorn process on a free local port, for the tests."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

FINISHED = {"succeeded", "failed", "canceled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    def client(self, key: str | None = None, timeout: float = 60) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def job_process(self, job_id: str) -> psutil.Process:
        """The worker process running `job_id`, as its job row's claim records it."""
        with sqlite3.connect(self.data_dir / "clipprune.db") as db:
            (worker,) = db.execute(
                "SELECT worker FROM clipprune_jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return psutil.Process(int(worker.split(":")[1]))  # "host:pid:nonce"

    def job_processes(self) -> list[psutil.Process]:
        """The worker processes: children of the forkserver, grandchildren of uvicorn."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "forkserver" in " ".join(child.parent().cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        stop_gracefully(self.process)


def stop_gracefully(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as an orchestrator stops a container; SIGKILL if it has not ended in 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_server(data_dir: Path, wrap: Sequence[str] = (), **settings: Any) -> Server:
    """`wrap`: a command the server runs under (it must exec it), e.g. one that gives it a
    mount namespace of its own."""
    port = free_port()
    env = {
        **os.environ,
        "CLIPPRUNE_DATA_DIR": str(data_dir),
        "CLIPPRUNE_WORKERS": "2",
        **{f"CLIPPRUNE_{key.upper()}": str(value) for key, value in settings.items()},
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"server-{port}.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [*wrap, sys.executable, "-m", "service.entry", "serve", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=sink,
        )
    server = Server(f"http://127.0.0.1:{port}", process, data_dir, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not get ready: {log.read_text()[-2000:]}")


def submit(
    client: httpx.Client,
    kind: str,
    files: Mapping[str, bytes],
    params: Mapping[str, Any] | None = None,
    wait: float = 0,
) -> httpx.Response:
    """POST /v1/jobs/{kind} (prune or train) as a client of the API does: each file a part
    under its field name (model, eval_data, train_data), params as JSON (None: no params
    part, the defaults). With `wait`, the answer comes when the job has ended (200) or after
    that many seconds (202). The response as it is: the test asserts what it expects."""
    return client.post(
        f"/v1/jobs/{kind}",
        params={"wait": wait},
        files={name: (name, data) for name, data in files.items()},
        data=None if params is None else {"params": json.dumps(params)},
    )


def accepted_id(response: httpx.Response) -> str:
    """The id of the job a submit queued; anything but a 202 fails the test with the answer."""
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for(
    client: httpx.Client, job_id: str, statuses: set[str] = FINISHED, timeout: float = 120
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def metrics_with(client: httpx.Client, line: str, timeout: float = 10) -> str:
    """/metrics once it holds `line`, or as it is after `timeout`: a job's counter moves when
    the dispatcher reaps its process, a tick after the job has ended."""
    deadline = time.monotonic() + timeout
    metrics = client.get("/metrics").text
    while line not in metrics and time.monotonic() < deadline:
        time.sleep(0.05)
        metrics = client.get("/metrics").text
    return metrics


def finish_watching_memory(
    server: Server, client: httpx.Client, job_id: str, within_s: float = 60
) -> tuple[dict[str, Any], int]:
    """The job once it ends (within `within_s`, else the test fails), and the largest RSS of
    any worker process seen meanwhile, sampled every 50 ms."""
    started, peak = time.monotonic(), 0
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in {
        "succeeded",
        "failed",
    }:
        assert time.monotonic() - started < within_s, job
        for process in server.job_processes():
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.Error:  # a worker that ended between the listing and the reading
                continue
        time.sleep(0.05)
    return job, peak
