"""The report's facts about the files, each read once: equal to what a whole parse, and a hash
and a gzip apart, give."""

import hashlib
from pathlib import Path

from onnx import ModelProto, helper

from workers.graph.load import opsets
from workers.jobs.report import file_report, gzip_size, model_header


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
