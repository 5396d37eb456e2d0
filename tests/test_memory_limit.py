"""CLIPPRUNE_WORKER_MEMORY_BYTES through the real service: a job that allocates past a worker's
limit ends `failed` with a problem naming the limit, no worker grows past it, and the service
stays ready and runs the next job."""

import signal

import numpy as np
import psutil
import pytest
from brokers import any_redis, drop_prefix, prefix, start_worker
from onnx import TensorProto, helper, numpy_helper
from server import accepted_id, finish_watching_memory, submit, wait_for

from service.runner import limit_memory, memory_limit
from service.settings import MIN_WORKER_MEMORY_BYTES, Settings, machine_memory_bytes

LIMIT = 3 * 2**29  # 1.5 GiB


def run_time_bomb() -> bytes:
    """X -> MatMul W -> Y, and a second output: ConstantOfShape of a size read from the data
    (the largest value of X, as int64). Nothing in the model says how large; eval data whose
    largest value is 2^31 makes it 8 GiB."""
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["Y"]),
        helper.make_node("ReduceMax", ["X"], ["largest"], keepdims=0),
        helper.make_node("Cast", ["largest"], ["size"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["size", "one_axis"], ["shape"]),
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["C"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("ReduceSum", ["C"], ["Z"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "bomb",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, []),
        ],
        [
            numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W"),
            numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def wide_csv(columns: int = 10_000, rows: int = 1_500) -> bytes:
    """Issue 14, Found 1: a 57 MiB CSV of 10,000 columns, which grows the parser past 1.5 GiB
    a little at a time (Python objects, not one large allocation)."""
    row = ",".join(["0.5"] * columns) + "\n"
    return (",".join(f"c{i}" for i in range(columns)) + "\n" + row * rows).encode()


BOMBS = {
    # the eval data sizes the model's second output: 8 GiB at once
    "shape-from-the-data": {
        "model": run_time_bomb(),
        "eval_data": b"X0,X1,X2,X3\n1,2,3,4\n5,6,7,2147483648\n",
    },
    "wide-csv": {"model": run_time_bomb(), "eval_data": wide_csv()},
}


def assert_names_the_limit(error: dict) -> None:
    assert error["status"] == 422 and error["title"] == "Out of memory", error
    assert "CLIPPRUNE_WORKER_MEMORY_BYTES" in error["detail"], error
    assert str(LIMIT) in error["detail"], error


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_job_past_the_limit_fails_naming_it_and_the_service_carries_on(
    make_server, digits_upload, bomb
):
    server = make_server(worker_memory_bytes=LIMIT)
    with server.client() as client:
        job_id = accepted_id(submit(client, "prune", BOMBS[bomb], {"sparsity": 0.5}))
        job, peak = finish_watching_memory(server, client, job_id)
        assert job["status"] == "failed", job
        assert_names_the_limit(job["error"])
        assert peak < LIMIT, peak
        assert client.get("/readyz").status_code == 200
        # every worker is there, each under the limit, and a normal job runs to its end
        assert len(server.job_processes()) == 2
        for process in server.job_processes():
            limits = process.rlimit(psutil.RLIMIT_DATA)
            assert limits == (LIMIT, LIMIT), limits
        normal = wait_for(
            client, accepted_id(submit(client, "prune", digits_upload, {"sparsity": 0.5}))
        )
        assert normal["status"] == "succeeded", normal


def big_model(mib: int) -> bytes:
    """X -> MatMul -> MatMul -> ... of zero 4096-wide weights, `mib` MiB in all (zeros: built
    in a moment, and the job is refused before it reads one)."""
    layers = mib * 2**20 // (4096 * 4096 * 4)
    weights = np.zeros((4096, 4096), np.float32)
    names = ["X", *(f"h{layer}" for layer in range(layers))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", [names[i], f"W{i}"], [names[i + 1]]) for i in range(layers)],
        "big",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4096])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [None, 4096])],
        [numpy_helper.from_array(weights, f"W{i}") for i in range(layers)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_too_large_for_a_worker_is_refused_at_once_saying_what_it_needs(
    make_server, digits_upload
):
    """Issue 18: a 448 MiB model needs over 2.5x its size to prune, past a 1 GiB limit: the
    job fails before the model is read (the worker never grows by its size), with a problem
    that says how much it needs and what to change; the service runs the next job."""
    server = make_server(worker_memory_bytes=2**30)
    model = big_model(448)
    with server.client() as client:
        job_id = accepted_id(submit(client, "prune", {"model": model}, {"sparsity": 0.5}))
        del model
        job, peak = finish_watching_memory(server, client, job_id)
        assert job["status"] == "failed", job
        error = job["error"]
        assert error["status"] == 422 and error["title"] == "Model refused", error
        assert "needs at least 1.24 GiB" in error["detail"], error
        assert "1.00 GiB (CLIPPRUNE_WORKER_MEMORY_BYTES)" in error["detail"], error
        assert "CLIPPRUNE_WORKERS" in error["detail"] and len(error["detail"]) <= 300, error
        assert peak < 448 * 2**20, peak
        assert client.get("/readyz").status_code == 200
        normal = wait_for(
            client, accepted_id(submit(client, "prune", digits_upload, {"sparsity": 0.5}))
        )
        assert normal["status"] == "succeeded", normal


def test_a_worker_aborted_by_native_code_is_reported_as_the_limit_and_replaced(
    make_server, digits_csv, digits_upload
):
    """Native code that cannot allocate (an uncaught std::bad_alloc) ends the process with
    abort(): SIGABRT, sent here for real to the worker running a long job."""
    server = make_server(worker_memory_bytes=LIMIT)
    with server.client() as client:
        params = {"model": {"hidden": [64]}, "epochs": 10_000}
        job_id = accepted_id(submit(client, "train", {"train_data": digits_csv}, params))
        wait_for(client, job_id, {"running"})
        server.job_process(job_id).send_signal(signal.SIGABRT)
        failed = wait_for(client, job_id)
        assert failed["status"] == "failed", failed
        assert_names_the_limit(failed["error"])
        assert "SIGABRT" in failed["error"]["detail"], failed["error"]
        assert client.get("/readyz").status_code == 200
        normal = wait_for(
            client, accepted_id(submit(client, "prune", digits_upload, {"sparsity": 0.5}))
        )
        assert normal["status"] == "succeeded", normal
        assert len(server.job_processes()) == 2


def test_the_default_is_a_share_of_the_machine_per_worker_with_a_floor():
    memory = machine_memory_bytes()
    assert Settings(workers=2).worker_memory_bytes == max(
        MIN_WORKER_MEMORY_BYTES, int(memory * 0.7 / 2)
    )
    assert Settings(workers=256).worker_memory_bytes == max(
        MIN_WORKER_MEMORY_BYTES, int(memory * 0.7 / 256)
    )
    assert Settings(workers=2, worker_memory_bytes=LIMIT).worker_memory_bytes == LIMIT


def test_the_limit_reads_back_in_the_process_that_set_it():
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        assert pool.apply(_limited_then_read, (LIMIT,)) == LIMIT


def _limited_then_read(limit: int) -> int | None:
    limit_memory(limit)
    return memory_limit()


def celery_settings(tmp_path, database_url: str) -> dict:
    """A Celery deployment of its own (a Redis and a key prefix) with workers under LIMIT."""
    return {
        "backend": "celery",
        "broker_url": any_redis(tmp_path).url,
        "broker_prefix": prefix(),
        "database_url": database_url,
        "worker_memory_bytes": LIMIT,
    }


def test_celery_pool_children_have_the_limit(tmp_path, postgres_url, make_server, digits_upload):
    settings = celery_settings(tmp_path, postgres_url)
    server = make_server(tmp_path / "data", **settings)
    worker = start_worker(tmp_path / "data", 2, **settings)
    try:
        children = worker.pool()
        assert len(children) == 2
        for child in children:
            assert child.rlimit(psutil.RLIMIT_DATA) == (LIMIT, LIMIT)
        # the parent, which only supervises, is not limited
        assert psutil.Process(worker.process.pid).rlimit(psutil.RLIMIT_DATA)[0] != LIMIT
        with server.client() as client:
            bomb = wait_for(
                client, accepted_id(submit(client, "prune", BOMBS["wide-csv"], {"sparsity": 0.5}))
            )
            assert bomb["status"] == "failed", bomb
            assert_names_the_limit(bomb["error"])
            normal = wait_for(
                client, accepted_id(submit(client, "prune", digits_upload, {"sparsity": 0.5}))
            )
            assert normal["status"] == "succeeded", normal
    finally:
        worker.stop()
        drop_prefix(settings["broker_url"], settings["broker_prefix"])
