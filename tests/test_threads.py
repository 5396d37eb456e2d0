"""CLIPPRUNE_WORKER_THREADS: each worker process caps its math libraries' thread pools, so the
workers together never run more threads than the machine has cores; the job log says what a
job ran with (threadpoolctl's own report, read inside the worker)."""

import json

import psutil
from server import accepted_id, submit, wait_for

from service.entry import HUGE_PAGES_TUNABLE
from service.settings import Settings, machine_cores


def job_logs(log_text: str) -> list[dict]:
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    return [line for line in lines if line["message"].startswith("job started")]


def test_each_worker_runs_its_jobs_with_the_threads_it_was_given(make_server, digits_upload):
    server = make_server(workers=2, worker_threads=1)
    with server.client() as client:
        job = wait_for(
            client, accepted_id(submit(client, "prune", digits_upload, {"sparsity": 0.5}))
        )
        assert job["status"] == "succeeded", job
    (started,) = [line for line in job_logs(server.log.read_text()) if line["job_id"] == job["id"]]
    assert started["message"] == "job started (math threads: openblas 1)", started


def test_the_default_shares_the_cores_between_the_workers():
    cores = machine_cores()
    assert Settings(workers=1).worker_threads == cores
    assert Settings(workers=2).worker_threads == max(1, cores // 2)
    assert Settings(workers=4 * cores).worker_threads == 1
    assert Settings(workers=2, worker_threads=3).worker_threads == 3


def test_the_service_and_its_workers_put_large_blocks_on_huge_pages(make_server, digits_upload):
    """The command line starts itself again with glibc's hugetlb tunable (service/entry.py), and
    the workers the service forks inherit it; an operator's own GLIBC_TUNABLES would stand."""
    server = make_server(workers=1)
    with server.client() as client:  # a job run: the worker exists
        job = wait_for(
            client, accepted_id(submit(client, "prune", digits_upload, {"sparsity": 0.5}))
        )
        assert job["status"] == "succeeded", job
    processes = [psutil.Process(server.process.pid), *server.job_processes()]
    assert len(processes) == 2
    for process in processes:
        assert process.environ().get("GLIBC_TUNABLES") == HUGE_PAGES_TUNABLE
