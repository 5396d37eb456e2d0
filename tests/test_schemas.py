import pytest
from pydantic import ValidationError

from schemas import ClipParams, PruneParams, TrainParams


def message(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return " ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.value.errors())


@pytest.mark.parametrize("value", [1.5, 1.0, -0.1])
def test_sparsity_outside_zero_to_one_is_refused_naming_the_field(value):
    with pytest.raises(ValidationError) as exc:
        PruneParams(sparsity=value)
    assert "sparsity" in message(exc)


@pytest.mark.parametrize(
    "fields",
    [{}, {"sparsity": 0.5, "threshold": 0.1}, {"threshold": 0.1, "max_accuracy_drop": 0.01}],
)
def test_exactly_one_pruning_target(fields):
    with pytest.raises(ValidationError, match="exactly one of sparsity, threshold"):
        PruneParams(**fields)


def test_regexes_must_compile():
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        PruneParams(sparsity=0.5, include=["coef(["])


def test_unknown_keys_are_refused_not_ignored():
    with pytest.raises(ValidationError) as exc:
        PruneParams.model_validate({"sparsity": 0.5, "sparsty": 0.9})
    assert "sparsty" in message(exc)


def test_defaults_and_contract_names():
    params = PruneParams(sparsity=0.5)
    assert (params.scope, params.granularity, params.encoding) == ("layer", "unstructured", "dense")
    assert ClipParams(mode="value", threshold=0.5).threshold == 0.5
    with pytest.raises(ValidationError):
        ClipParams(mode="value", threshold=0)
    train = TrainParams.model_validate({"model": {"type": "mlp", "hidden": [32, 16]}})
    assert train.clip.mode == "global_norm" and train.model.hidden == [32, 16]
    with pytest.raises(ValidationError, match="hidden"):
        TrainParams.model_validate({"model": {"hidden": [0]}})
