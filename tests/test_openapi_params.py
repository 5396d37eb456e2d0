"""Swagger UI shows the params keys beside the field, with an example that validates, so
trying an endpoint needs no reading elsewhere."""

import json

import pytest

from schemas.params import PruneParams, TrainParams


@pytest.mark.parametrize(("kind", "model"), [("prune", PruneParams), ("train", TrainParams)])
def test_the_params_field_lists_every_key_and_a_valid_example(client, kind, model):
    document = client.get("/openapi.json").json()
    body = document["paths"][f"/v1/jobs/{kind}"]["post"]["requestBody"]
    params = body["content"]["multipart/form-data"]["schema"]["properties"]["params"]
    description = params["description"]
    for name, field in model.model_fields.items():
        assert f"- `{name}` (default `" in description, name
        assert " ".join(field.description.split()) in description, name
    assert model.model_validate(json.loads(params["example"]))
