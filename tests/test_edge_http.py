"""HTTP at the edge, through a real server: metric labels from fixed sets whatever the request
line says, API keys compared as the bytes the client sent, If-None-Match as RFC 9110 reads it,
and HEAD on the model download."""

import hashlib
import re
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server import Server, accepted_id, submit, wait_for

KEY = "edge-key"
UNICODE_KEY = "clé-ü-日本"  # configured as text; clients send its UTF-8 bytes
MAX_METRICS_BYTES = 100_000


@pytest.fixture(scope="module")
def server_settings() -> dict[str, Any]:
    return {"api_keys": f"{KEY},{UNICODE_KEY}"}


@pytest.fixture(scope="module")
def keyed(server: Server) -> Iterator[httpx.Client]:
    with server.client(KEY) as client:
        yield client


@pytest.fixture(scope="module")
def model_job(keyed: httpx.Client, _mlp_classifier: Any) -> dict[str, Any]:
    """A succeeded prune job of KEY's, with its model's bytes and SHA-256."""
    job_id = accepted_id(
        submit(keyed, "prune", {"model": _mlp_classifier.SerializeToString()}, {"sparsity": 0.5})
    )
    assert wait_for(keyed, job_id)["status"] == "succeeded"
    model = keyed.get(f"/v1/jobs/{job_id}/model")
    assert model.status_code == 200
    digest = hashlib.sha256(model.content).hexdigest()
    assert model.headers["etag"] == f'"{digest}"'
    return {
        "id": job_id,
        "url": f"/v1/jobs/{job_id}/model",
        "content": model.content,
        "sha": digest,
    }


def assert_problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert len(response.text) < 300 and response.json()["status"] == status


# --- metrics: labels from fixed sets -------------------------------------------------------


def test_invented_methods_and_paths_keep_metrics_small(client: httpx.Client) -> None:
    """1,000 requests with invented methods (to a route and to invented paths), and invented
    paths with GET: every method outside the standard set is `other`, every path its route's
    template or `unmatched`, so /metrics stays small and names none of them."""
    before = len(client.get("/metrics").content)
    for i in range(1000):
        method = f"X{secrets.token_hex(6).upper()}{i}"
        path = "/livez" if i % 2 else f"/invented/{secrets.token_hex(8)}/{i}"
        response = client.request(method, path)
        assert response.status_code in {404, 405}, (method, path, response.status_code)
    for i in range(200):
        assert client.get(f"/v1/{secrets.token_hex(8)}?q={i}").status_code in {401, 404}
        assert client.request("PROPFIND", "/livez").status_code == 405  # WebDAV's: not ours
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert len(metrics.content) < MAX_METRICS_BYTES, len(metrics.content)
    assert len(metrics.content) < before + 10_000
    series = re.findall(r"^clipprune_http_requests_total\{(.*)\} ", metrics.text, re.M)
    methods = {re.search(r'method="([^"]*)"', labels).group(1) for labels in series}
    routes = {re.search(r'route="([^"]*)"', labels).group(1) for labels in series}
    assert "other" in methods and methods <= {"GET", "HEAD", "POST", "DELETE", "other"}
    assert "unmatched" in routes and all(
        route == "unmatched" or (route.startswith("/") and "invented" not in route)
        for route in routes
    ), routes
    assert "invented" not in metrics.text and not re.search(r"X[0-9A-F]{12}", metrics.text)


def test_job_routes_are_labelled_by_template(
    server: Server, keyed: httpx.Client, model_job: dict[str, Any]
) -> None:
    assert keyed.get(model_job["url"]).status_code == 200
    assert_problem(keyed.get(f"/v1/jobs/{'0' * 32}"), 404)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'route="/v1/jobs/{job_id}/model"' in metrics
    assert 'route="/v1/jobs/{job_id}"' in metrics
    assert model_job["id"] not in metrics and "0" * 32 not in metrics


# --- keys: compared as the header's bytes ---------------------------------------------------


def test_a_non_ascii_key_matches_the_utf8_bytes_a_client_sends(server: Server) -> None:
    utf8 = {"X-API-Key": UNICODE_KEY.encode()}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/v1/jobs", headers=utf8).status_code == 200
        # The same text in another encoding, a prefix, or the key plus a byte: other bytes.
        for sent in (
            "clé".encode("latin-1"),
            UNICODE_KEY.encode()[:-1],
            UNICODE_KEY.encode() + b"x",
            b"\xff\xfe",
        ):
            assert_problem(client.get("/v1/jobs", headers={"X-API-Key": sent}), 401)


def test_a_non_ascii_keys_jobs_are_its_own(
    server: Server, keyed: httpx.Client, model_job: dict[str, Any], _mlp_classifier: Any
) -> None:
    with httpx.Client(
        base_url=server.url, timeout=60, headers={"X-API-Key": UNICODE_KEY.encode()}
    ) as unicode_client:
        job_id = accepted_id(
            submit(
                unicode_client,
                "prune",
                {"model": _mlp_classifier.SerializeToString()},
                {"sparsity": 0.5},
            )
        )
        assert unicode_client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert_problem(unicode_client.get(model_job["url"]), 404)
        assert unicode_client.head(model_job["url"]).status_code == 404
        assert_problem(keyed.get(f"/v1/jobs/{job_id}"), 404)
        ids = [job["id"] for job in unicode_client.get("/v1/jobs").json()["items"]]
        assert ids == [job_id]
        assert unicode_client.delete(f"/v1/jobs/{job_id}").status_code == 204


# --- If-None-Match (RFC 9110 §13.1.2) ------------------------------------------------------

NOT_MODIFIED = [
    "*",
    '"{sha}"',
    'W/"{sha}"',
    '"other", W/"{sha}"',
    '"a,b" , "{sha}"',  # a comma inside a tag is part of it
    ', "x",, "{sha}"',  # empty list elements
    'W/"x",W/"{sha}",W/"y"',
]
MODIFIED = [
    '"other"',
    'W/"other"',
    "{sha}",  # unquoted: not an entity-tag
    '"{sha}',  # unterminated
    'w/"{sha}"',  # W/ is case-sensitive
    '"{sha}" junk',
    '"{sha}x"',
    "",
]


@pytest.mark.parametrize("value", NOT_MODIFIED)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_if_none_match_forms_give_304(
    keyed: httpx.Client, model_job: dict[str, Any], value: str, method: str
) -> None:
    response = keyed.request(
        method, model_job["url"], headers={"If-None-Match": value.format(sha=model_job["sha"])}
    )
    assert response.status_code == 304, value
    assert response.headers["etag"] == f'"{model_job["sha"]}"' and response.content == b""


@pytest.mark.parametrize("value", MODIFIED)
def test_if_none_match_that_names_no_current_tag_gives_the_model(
    keyed: httpx.Client, model_job: dict[str, Any], value: str
) -> None:
    response = keyed.get(
        model_job["url"], headers={"If-None-Match": value.format(sha=model_job["sha"])}
    )
    assert response.status_code == 200, value
    assert response.content == model_job["content"]


def test_if_none_match_on_several_header_lines(
    keyed: httpx.Client, model_job: dict[str, Any]
) -> None:
    sha = model_job["sha"]
    lines = [("If-None-Match", '"x"'), ("If-None-Match", f'W/"{sha}"')]
    assert keyed.get(model_job["url"], headers=lines).status_code == 304
    lines = [("If-None-Match", '"x"'), ("If-None-Match", '"y"')]
    assert keyed.get(model_job["url"], headers=lines).status_code == 200


def test_if_none_match_does_not_hide_a_problem(keyed: httpx.Client, server: Server) -> None:
    """Preconditions apply to a model that exists: another key's job or none is still a 404."""
    assert_problem(keyed.get(f"/v1/jobs/{'a' * 32}/model", headers={"If-None-Match": "*"}), 404)
    with server.client() as anonymous:
        assert_problem(anonymous.get(f"/v1/jobs/{'a' * 32}/model"), 401)


# --- HEAD on the download -----------------------------------------------------------------


def test_head_on_the_model_has_the_gets_headers_and_no_body(
    keyed: httpx.Client, model_job: dict[str, Any]
) -> None:
    got = keyed.get(model_job["url"])
    head = keyed.head(model_job["url"])
    assert head.status_code == 200 and head.content == b""
    for name in ("content-type", "content-length", "etag", "content-disposition"):
        assert head.headers[name] == got.headers[name], name
    assert int(head.headers["content-length"]) == len(model_job["content"])


def test_head_answers_the_gets_problems(
    server: Server, keyed: httpx.Client, _mlp_classifier: Any
) -> None:
    missing = keyed.head(f"/v1/jobs/{'b' * 32}/model")
    assert missing.status_code == 404 and missing.content == b""
    assert missing.headers["content-type"] == "application/problem+json"
    with server.client() as anonymous:
        assert anonymous.head(f"/v1/jobs/{'b' * 32}/model").status_code == 401
    failed = accepted_id(submit(keyed, "prune", {"model": b"not onnx"}, {"sparsity": 0.5}))
    assert wait_for(keyed, failed)["status"] == "failed"
    assert keyed.head(f"/v1/jobs/{failed}/model").status_code == 410
