"""The report's facts about the files, each read once: equal to what a whole parse, and a hash
and a gzip apart, give."""

import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from onnx import ModelProto, helper

from workers.graph.load import opsets
from workers.graph.wire import model_header
from workers.jobs import report
from workers.jobs.report import (
    GZIP_CHUNK,
    Beside,
    file_report,
    gzip_size,
    job_threads,
)


def _model_with_everything(mlp_classifier: ModelProto) -> ModelProto:
    """The MLP with top-level fields of every wire type around its graph."""
    model = ModelProto()
    model.CopyFrom(mlp_classifier)
    model.producer_name, model.doc_string, model.model_version = "tests", "d" * 300, 2**40
    helper.set_model_props(model, {"key": "value"})
    body = [helper.make_node("Relu", ["x"], ["y"])]
    opset = [helper.make_opsetid("", 17)]
    model.functions.append(helper.make_function("local", "relu", ["x"], ["y"], body, opset))
    return model


def test_the_header_is_the_model_without_its_graph(tmp_path: Path, mlp_classifier):
    model = _model_with_everything(mlp_classifier)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    expected = ModelProto()
    expected.CopyFrom(model)
    expected.ClearField("graph")
    assert model_header(path) == expected
    assert model_header(path.read_bytes()) == expected


def test_file_report_matches_hashing_and_gzipping_each_file_apart(tmp_path: Path, mlp_classifier):
    original, compressed = tmp_path / "original.onnx", tmp_path / "compressed.onnx"
    original.write_bytes(mlp_classifier.SerializeToString())
    compressed.write_bytes(_model_with_everything(mlp_classifier).SerializeToString())
    for source in (compressed, compressed.read_bytes()):
        size, facts = file_report(original, source, params=10, nonzero=4)
        data = compressed.read_bytes()
        assert size.compressed_bytes == len(data)
        assert size.original_gzip_bytes == gzip_size(original)
        assert size.compressed_gzip_bytes == gzip_size(data)  # hashed on the same read
        assert facts.model_sha256 == hashlib.sha256(data).hexdigest()
        assert facts.ir_version == mlp_classifier.ir_version
        assert facts.opsets == opsets(mlp_classifier)
        assert facts.checker == "passed"


def _thread_name() -> str:
    return threading.current_thread().name


def test_beside_runs_on_a_second_thread_only_when_the_job_may_use_two(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as a service worker given one thread
    with Beside() as beside:
        ran = beside.submit(_thread_name)
        assert ran() == threading.current_thread().name  # put off, then run here
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with Beside() as beside:
        first, second = beside.submit(_thread_name), beside.submit(_thread_name)
        assert first() == second() != threading.current_thread().name


def test_the_command_line_may_use_every_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert job_threads() == len(os.sched_getaffinity(0))


def _counted(pieces: Callable, reads: list[int]) -> Callable[..., Iterator[bytes]]:
    def counted(model):
        for piece in pieces(model):
            reads.append(len(piece))
            yield piece

    return counted


def test_a_gzip_beside_the_job_waits_while_the_job_holds_the_turn(tmp_path: Path, monkeypatch):
    """Between pieces: the job prunes holding the turn, and no 16 MB piece is read meanwhile."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    path = tmp_path / "data"
    path.write_bytes(os.urandom(3 * GZIP_CHUNK // 2))  # two pieces
    reads: list[int] = []
    monkeypatch.setattr(report, "pieces", _counted(report.pieces, reads))
    with Beside() as beside:
        with beside.turn:
            size = beside.submit(functools.partial(gzip_size, path, turn=beside.turn))
            time.sleep(0.2)
            assert reads == []  # nothing read while the turn was held
        assert size() == gzip_size(path)
