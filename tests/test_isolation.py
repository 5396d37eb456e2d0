"""Keys isolate jobs: another key's job is absent (404, exactly as a job that never was), a
request without a valid key is a 401, and job ids cannot be guessed."""

import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.routing import iter_route_contexts
from server import Server, submit, wait_for

from service import routes, store
from service.app import create_app
from service.settings import Settings

KEY_A, KEY_B = "key-a", "key-b"
PROBLEM = "application/problem+json"
# Long enough to still be running when every route has been tried on it.
LONG_TRAIN = {"model": {"hidden": [1024, 1024]}, "epochs": 10000}


def route_table() -> list[tuple[str, str]]:
    """(method, path template) of every route, from the app's own route table: a route added
    later is covered by the tests below without anyone listing it here."""
    found = []
    # An included router is one node of app.routes (FastAPI >= 0.137); iter_route_contexts()
    # is FastAPI's public way to its routes, with their full paths.
    for route in iter_route_contexts(create_app(Settings()).routes):
        if route.path and route.methods:
            # HEAD answers as GET does, without the body these tests read
            found += [(method, route.path) for method in sorted(route.methods - {"HEAD"})]
    return found


JOB_ROUTES = [(method, path) for method, path in route_table() if "{" in path]  # a job id
KEYED_ROUTES = [(method, path) for method, path in route_table() if path.startswith("/v1/")]


def test_the_routes_are_found() -> None:
    # A discovery that found nothing would make the tests below pass on nothing.
    assert {
        ("GET", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/{job_id}/model"),
        ("GET", "/v1/jobs/{job_id}/report"),
        ("GET", "/v1/jobs/{job_id}/report.html"),
        ("DELETE", "/v1/jobs/{job_id}"),
    } <= set(JOB_ROUTES)
    assert {("POST", "/v1/jobs/prune"), ("POST", "/v1/jobs/train")} <= set(KEYED_ROUTES)
    assert all(path.startswith("/v1/jobs/{job_id}") for _, path in JOB_ROUTES)


def url(template: str, job_id: str) -> str:
    return re.sub(r"\{[^}]+\}", job_id, template)  # every path parameter: the job id


@pytest.fixture(scope="module")
def server_settings() -> dict[str, Any]:
    return {"api_keys": f"{KEY_A},{KEY_B}"}


@pytest.fixture(scope="module")
def a_jobs(server: Server, _mlp_classifier: Any, digits_csv: bytes) -> Iterator[dict[str, str]]:
    """Key A's jobs: one succeeded (every result exists), one still running."""
    with server.client(KEY_A) as a:
        model = {"model": _mlp_classifier.SerializeToString()}
        done = submit(a, "prune", model, {"sparsity": 0.5}, wait=30).json()
        assert done["status"] == "succeeded", done
        running = submit(a, "train", {"train_data": digits_csv}, LONG_TRAIN).json()
        wait_for(a, running["id"], {"running"})
        yield {"succeeded": done["id"], "running": running["id"]}
        a.delete(f"/v1/jobs/{running['id']}")  # its worker is stopped, not left training


@pytest.mark.parametrize(("method", "template"), JOB_ROUTES)
@pytest.mark.parametrize("state", ["succeeded", "running"])
def test_another_keys_job_is_absent(
    server: Server, a_jobs: dict[str, str], state: str, method: str, template: str
) -> None:
    job_id = a_jobs[state]
    never = store.new_job_id()
    with server.client(KEY_B) as b, server.client(KEY_A) as a:
        response = b.request(method, url(template, job_id))
        # 404, not 403 (or 409 for a running job's results): that would tell B the job exists
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == PROBLEM
        absent = b.request(method, url(template, never))
        assert response.json() == json.loads(absent.text.replace(never, job_id))
        # and B's request changed nothing: A still has the job, not canceled
        mine = a.get(f"/v1/jobs/{job_id}")
        assert mine.status_code == 200 and mine.json()["status"] == state


@pytest.mark.parametrize(("method", "template"), KEYED_ROUTES)
@pytest.mark.parametrize(
    # none, empty, unknown, and a valid key's prefix and extension (no partial match)
    "headers",
    [{}, {"X-API-Key": ""}, {"X-API-Key": "key-c"}, {"X-API-Key": "key-"}, {"X-API-Key": "key-ab"}],
)
def test_no_valid_key_is_401(
    server: Server, a_jobs: dict[str, str], headers: dict[str, str], method: str, template: str
) -> None:
    for job_id in (a_jobs["succeeded"], store.new_job_id()):
        response = httpx.request(method, server.url + url(template, job_id), headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["status"] == 401
        assert response.headers["www-authenticate"] == "X-API-Key"


def test_listing_shows_only_the_callers_jobs(server: Server, a_jobs: dict[str, str]) -> None:
    with server.client(KEY_A) as a, server.client(KEY_B) as b:
        assert {job["id"] for job in a.get("/v1/jobs").json()["items"]} == set(a_jobs.values())
        assert b.get("/v1/jobs").json() == {"items": [], "next": None}


def test_job_ids_are_128_random_bits_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = []
    token_bytes = secrets.token_bytes

    def counting(nbytes: int | None = None) -> bytes:
        drawn.append(nbytes)
        return token_bytes(nbytes)

    # token_hex and token_urlsafe draw through token_bytes, from the OS CSPRNG: an id made any
    # other way (random, uuid1, a counter, the clock) draws nothing here, or too little.
    monkeypatch.setattr(secrets, "token_bytes", counting)
    ids = [store.new_job_id() for _ in range(1000)]
    monkeypatch.undo()
    assert len(drawn) == 1000 and all(n is not None and n >= 16 for n in drawn)
    assert len(set(ids)) == 1000
    assert all(routes.JOB_ID.fullmatch(job_id) for job_id in ids)  # what the routes accept
    assert all(re.fullmatch(r"[0-9a-f]{32}", job_id) for job_id in ids)
    # Every one of the 128 bits takes both values across the 1000 ids: none is fixed (a
    # prefix, a version nibble, a timestamp); a bit stuck by chance is a 2**-999 event.
    bits = np.array([[int(c, 16) >> s & 1 for c in job_id for s in (3, 2, 1, 0)] for job_id in ids])
    assert bits.shape == (1000, 128)
    assert (bits.min(axis=0) == 0).all() and (bits.max(axis=0) == 1).all()
