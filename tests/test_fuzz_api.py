"""Fuzz the HTTP API from its own OpenAPI document with schemathesis, against a real server.

Every operation the running service publishes at /openapi.json gets generated requests, valid
(positive) and invalid (negative), with a valid API key, sent over TCP to a uvicorn process.
Every response must be no 5xx, with a documented status code and content type and a body that
validates against the documented schema; an invalid request must be refused with a 4xx. So the
document has to tell the truth about the problem answers too: clients are generated from it.

Bounded for CI: a fixed number of cases per operation, derandomized (the same cases on every
run), a deadline per case and a short job time limit on the server.
"""

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.parameters import ParameterLocation
from server import Server, accepted_id, submit, wait_for

from service.app import create_app
from service.settings import Settings

KEY = "fuzz-key"
MAX_EXAMPLES = 40  # per operation and test: about 30 s for the whole file on 2 cores
REQUEST_TIMEOUT_S = 20
FILE_FIELDS = frozenset({"model", "eval_data", "train_data"})
# Params a submit accepts, swapped into some valid cases: a `params` string fuzzed from its
# schema (any string) is almost never a valid PruneParams, and then the fuzzed files would
# only ever meet the 400, never the worker that parses them.
VALID_PARAMS = {
    "/v1/jobs/prune": [{"sparsity": 0.5}, {"threshold": 0.01, "encoding": "sparse"}],
    "/v1/jobs/train": [{"epochs": 1}, {"model": {"type": "linear"}, "epochs": 1}],
}
# Collected from the app's own document at import, so each operation is a test of its own
# and a new route is fuzzed without anyone adding it here.
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, item in create_app(Settings()).openapi()["paths"].items()
    for method in item
]


def rejects_invalid_requests(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """schemathesis' negative_data_rejection, less the negations a request cannot carry: a file
    part "violating" `format: binary` is still bytes, as any file may be; a form field made an
    empty array is no part at all; an unknown query parameter is ignored (schemathesis excuses
    it alone, not next to one of the others)."""
    mutations = getattr(case.meta.phase.data, "mutations", ()) if case.meta else ()
    body = case.body if isinstance(case.body, dict) else {}

    def carried(mutation: Any) -> bool:
        file_format = mutation.keywords == ("format",) and mutation.parameter in FILE_FIELDS
        in_body = mutation.parameter_location is ParameterLocation.BODY
        not_sent = in_body and mutation.parameter in body and body[mutation.parameter] == []
        extra_query = mutation.keywords == ("additionalProperties",) and not in_body
        return not (file_format or not_sent or extra_query)

    if mutations and not any(carried(mutation) for mutation in mutations):
        return None
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    rejects_invalid_requests,
    ignored_auth,  # where the document says a key is needed, no key or a wrong one is a 401
]


@pytest.fixture(scope="module")
def server_settings() -> dict[str, Any]:
    # A short job time limit: a fuzzed job whose data happens to parse cannot hold a worker.
    return {"api_keys": f"{KEY},other-key", "job_timeout_s": 10}


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(KEY) as client:
        yield client


@pytest.fixture(scope="module")
def jobs(client: httpx.Client, _mlp_classifier: Any) -> dict[str, str]:
    """Real jobs for the job routes, which a fuzzed id only ever finds absent: a succeeded job
    (200 with the model, the report, the page) and a failed one (410 for its results)."""
    ids = {}
    for status, model in (("succeeded", _mlp_classifier.SerializeToString()), ("failed", b"x")):
        job = accepted_id(submit(client, "prune", {"model": model}, {"sparsity": 0.5}))
        assert wait_for(client, job)["status"] == status
        ids[status] = job
    return ids


@pytest.fixture(scope="module")
def api_schema(server: Server) -> schemathesis.BaseSchema:
    """The document as the running server serves it."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    # The key is not a parameter to fuzz: every case sends the valid one, so a case "missing"
    # it would be called invalid and then sent valid. ignored_auth probes without it instead.
    schema.config.generation.update(with_security_parameters=False)
    return schema


def test_every_problem_answer_is_documented_as_a_problem(server: Server) -> None:
    """What each route can answer besides success, and as what: application/problem+json
    with the Problem schema, the only media type the service sends them in."""
    document = httpx.get(f"{server.url}/openapi.json").json()
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    # The key is a declared security scheme: Swagger UI can send it, clients know to.
    schemes = document["components"].get("securitySchemes", {})
    keyed = [name for name, scheme in schemes.items() if scheme.get("name") == "X-API-Key"]
    assert [schemes[name] for name in keyed] == [
        {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    ]
    missing = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            expected = set()
            if path.startswith("/v1/"):
                expected |= {"401", "422"}  # no key or a wrong one; a bad query or form
            if "{job_id}" in path:
                expected.add("404")
            if method == "post":  # bad params or form, too large, not multipart, queue full
                expected |= {"400", "413", "415", "429"}
            assert expected <= set(responses), (method, path, sorted(responses))
            if path.startswith("/v1/") and {keyed[0]: []} not in operation.get("security", []):
                missing.append(f"{method.upper()} {path}")
            for code, response in responses.items():
                if code.startswith("4"):
                    assert response["content"] == problem, (method, path, code)
    assert not missing, f"operations that do not say they need the key: {missing}"
    ready = document["paths"]["/readyz"]["get"]["responses"]
    assert ready["503"]["content"] == ready["200"]["content"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_response_is_documented(
    label: str,
    api_schema: schemathesis.BaseSchema,
    server: Server,
    client: httpx.Client,
    jobs: dict[str, str],
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is missing from the served document"
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )
    accepted: list[str] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same cases on every run and machine: a CI failure reproduces
        database=None,  # nothing replayed from an earlier run's failures either
        deadline=timedelta(seconds=15),  # one request (two for DELETE); a job ends in ms
        # No health check suppressed: generation is quick and the cases are not filtered.
    )
    @given(case=cases, data=st.data())
    def fuzz(case: schemathesis.Case, data: st.DataObject) -> None:
        assert case.meta is not None
        positive = case.meta.generation.mode is GenerationMode.POSITIVE
        submits = positive and isinstance(case.body, dict) and case.path in VALID_PARAMS
        if submits and data.draw(st.booleans(), label="valid params"):
            params = data.draw(st.sampled_from(VALID_PARAMS[case.path]), label="params")
            case.body["params"] = json.dumps(params)
        if "job_id" in case.path_parameters and positive:
            # A real job's id, or a fresh one to delete (its worker is stopped), or the fuzz's.
            if case.method == "DELETE":
                fresh = submit(client, "prune", {"model": b"x"}, {"sparsity": 0.5})
                real = [accepted_id(fresh)]
            else:
                real = list(jobs.values())
            choice = data.draw(st.sampled_from([None, *real]), label="job id")
            if choice is not None:
                case.path_parameters["job_id"] = choice
        response = case.call_and_validate(
            base_url=server.url,
            headers={"X-API-Key": KEY},
            checks=CHECKS,
            timeout=REQUEST_TIMEOUT_S,
        )
        if case.method == "POST" and response.status_code in (200, 202):
            accepted.append(response.json()["id"])

    fuzz()
    # Fuzzed files that got past the form reached a worker: each job ends with its cause (a
    # 422 for an unreadable model or data set), never a crash or a worker that died.
    for job_id in accepted:
        job = wait_for(client, job_id, timeout=60)
        assert job["status"] in ("succeeded", "failed"), job
        if job["status"] == "failed":
            assert job["error"]["status"] == 422, job["error"]
    if label.startswith("POST"):
        assert accepted, "no fuzzed upload got past the form: the worker never saw one"
