"""Real Redis and Celery workers for the distributed-backend tests.

The machine's Redis on 127.0.0.1:6379 is used when it answers (with a key prefix of our own);
otherwise a redis-server is started if the binary exists. Under CI=true nothing is skipped.
"""

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis
from server import free_port, stop_gracefully

MACHINE_REDIS = "redis://127.0.0.1:6379/0"


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run these tests")
    pytest.skip(reason)


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes] | None  # None: the machine's own Redis
    directory: Path

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def start(self) -> None:
        """(Re)start a Redis we own on the same port, as empty as a restarted cache is."""
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")


def own_redis(directory: Path) -> RedisServer:
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed")
    port = free_port()
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, None, directory)
    server.start()
    return server


def any_redis(directory: Path) -> RedisServer:
    try:
        redis.Redis.from_url(MACHINE_REDIS, socket_connect_timeout=1).ping()
        return RedisServer(MACHINE_REDIS, 6379, None, directory)
    except redis.RedisError:
        return own_redis(directory)


def prefix() -> str:
    return f"clipprune-test-{secrets.token_hex(4)}:"


def drop_prefix(url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{key_prefix}*"):
        client.delete(key)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path
    settings: dict[str, str]

    def pool(self) -> list[psutil.Process]:
        """The prefork children that run the jobs."""
        return psutil.Process(self.process.pid).children()

    def stop(self) -> None:
        stop_gracefully(self.process)


def start_worker(data_dir: Path, concurrency: int, **settings: str) -> Worker:
    env = {
        **os.environ,
        "CLIPPRUNE_DATA_DIR": str(data_dir),
        "CLIPPRUNE_WORKERS": str(concurrency),
        **{f"CLIPPRUNE_{key.upper()}": str(value) for key, value in settings.items()},
    }
    log = data_dir.parent / f"worker-{secrets.token_hex(3)}.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"], env=env, stdout=sink, stderr=sink
        )
    worker = Worker(
        process, log, {"workers": str(concurrency), **{k: str(v) for k, v in settings.items()}}
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited: {log.read_text()[-3000:]}")
        if "ready." in log.read_text():
            return worker
        time.sleep(0.1)
    worker.stop()
    raise RuntimeError(f"worker did not get ready: {log.read_text()[-3000:]}")
