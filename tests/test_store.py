"""The job store on SQLite and on a real PostgreSQL: the same code, the same guarantees."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from service.store import JobStore, new_job_id


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    else:
        store = JobStore(request.getfixturevalue("postgres_url"))
        yield store
        store.engine.dispose()


def test_lifecycle_and_check_and_set(store):
    job_id = new_job_id()
    store.create(job_id, "owner-a", "prune", {"sparsity": 0.5})
    assert store.get(job_id, owner="owner-b") is None
    assert store.queued(10) == [job_id]
    assert store.claim(job_id, "run-1") and not store.claim(job_id, "run-2")  # only one gets it
    store.progress(job_id, "run-2", "ignored", 0.9)  # not the claim's run: no effect
    store.progress(job_id, "run-1", "pruning", 0.4)
    row = store.get(job_id, owner="owner-a")
    assert (row.status, row.stage, row.progress, row.attempts) == ("running", "pruning", 0.4, 1)
    assert not store.succeed(job_id, "run-2")
    assert store.succeed(job_id, "run-1") and not store.fail(job_id, {"detail": "late"})
    row = store.get(job_id)
    assert row.status == "succeeded" and row.error is None and row.finished_at >= row.started_at
    assert not store.cancel(job_id)  # finished jobs stay as they ended


def test_concurrent_claims_give_each_job_to_exactly_one_worker(store):
    ids = [new_job_id() for _ in range(20)]
    for job_id in ids:
        store.create(job_id, "o", "train", {})

    def claim_all(index: int) -> list[str]:
        return [job_id for job_id in ids if store.claim(job_id, f"run-{index}")]

    with ThreadPoolExecutor(4) as pool:
        claimed = [job_id for batch in pool.map(claim_all, range(4)) for job_id in batch]
    assert sorted(claimed) == sorted(ids)


def test_pages_are_newest_first_per_owner(store):
    ids = [new_job_id() for _ in range(5)]
    for job_id in ids:
        store.create(job_id, "me", "prune", {})
    store.create(new_job_id(), "someone-else", "prune", {})
    first = store.page("me", 3, None)
    rest = store.page("me", 3, (first[-1].created_at, first[-1].id))
    assert [row.id for row in first + rest] == ids[::-1]
    assert store.count("queued") == 6
