"""Reading uploaded data files (CSV with a header, or NPZ) into arrays, with clear errors.

The format is told by content, not by file name: an NPZ file is a zip archive.
"""

import csv
import math
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.vocabulary import Task
from workers.errors import InvalidDataError, cut_list


@dataclass(frozen=True)
class DataLimits:
    max_rows: int = 1_000_000
    max_columns: int = 10_000
    # Checked while reading: every cell is a Python string until it is parsed (about 60 bytes)
    max_cells: int = 2**24
    max_bytes: int = 2**31
    # A compressed NPZ past this many bytes in memory may be at most max_npz_expansion times
    # its file: a zip bomb (zeros deflate a thousandfold) costs a worker no more than that.
    npz_free_bytes: int = 2**26
    max_npz_expansion: int = 100


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared: dims None where symbolic, missing or negative (PaddlePaddle
    writes -1 for the batch); shape None when the model declares no shape at all."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Does an array of `shape` match the declaration (any size where a dim is symbolic)?"""
        if self.shape is None:
            return True
        return len(shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, shape, strict=True)
        )

    @property
    def described(self) -> str:
        if self.shape is None:
            return "no shape"
        return "[" + ", ".join("?" if dim is None else str(dim) for dim in self.shape) + "]"


@dataclass
class Table:
    """Feature arrays by name, and the labels when the file has them."""

    features: dict[str, np.ndarray]
    labels: np.ndarray | None
    columns: list[str]  # CSV header of the feature columns (empty for NPZ)

    @property
    def rows(self) -> int:
        return len(next(iter(self.features.values())))


def is_npz(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def read_csv(path: Path, label: str | None, limits: DataLimits = DataLimits()) -> Table:
    """A CSV with a header; `label` names the label column (None: the last column).

    Pass label="" for a file with no label column.
    """
    if path.stat().st_size > limits.max_bytes:
        raise InvalidDataError(f"the file is larger than {limits.max_bytes} bytes")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        try:
            rows = _bounded_rows(csv.reader(handle), limits)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InvalidDataError(f"not a readable UTF-8 CSV file: {exc}") from exc
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise InvalidDataError("the CSV file needs a header line and at least one data row")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if len(header) > limits.max_columns:
        raise InvalidDataError(f"{len(header)} columns; the limit is {limits.max_columns}")
    if len(body) > limits.max_rows:
        raise InvalidDataError(f"{len(body)} rows; the limit is {limits.max_rows}")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise InvalidDataError(
                f"line {number} has {len(row)} fields but the header has {len(header)}"
            )
    if label == "":
        label_index = None
    elif label is None:
        label_index = len(header) - 1
    elif label in header:
        label_index = header.index(label)
    else:
        raise InvalidDataError(
            f"label column {label!r} is not in the header; columns: {', '.join(header)}"
        )
    feature_index = [i for i in range(len(header)) if i != label_index]
    if not feature_index:
        raise InvalidDataError("the CSV file has no feature columns besides the label")
    cells = np.array(body, dtype=object)
    features = _numeric(cells[:, feature_index], [header[i] for i in feature_index])
    labels = None
    if label_index is not None:
        raw = cells[:, label_index]
        try:
            labels = _numeric(raw[:, None], [header[label_index]])[:, 0]
        except InvalidDataError:
            labels = np.array([str(value).strip() for value in raw])  # class names
    return Table({"": features}, labels, [header[i] for i in feature_index])


def _bounded_rows(reader: Iterator[list[str]], limits: DataLimits) -> list[list[str]]:
    """The rows, refused as soon as they hold more cells than the cap: a file of many short
    cells would otherwise cost tens of times its size before any count is checked."""
    rows, cells = [], 0
    for row in reader:
        cells += len(row)
        if cells > limits.max_cells:
            raise InvalidDataError(
                f"the CSV holds more than {limits.max_cells} cells (rows x columns, "
                f"{len(row)} columns in line {len(rows) + 1}); send fewer rows or columns"
            )
        rows.append(row)
    return rows


def _numeric(cells: np.ndarray, names: list[str]) -> np.ndarray:
    try:
        values = cells.astype(np.float64)
    except ValueError:
        for column, name in enumerate(names):
            for row, cell in enumerate(cells[:, column]):
                try:
                    float(cell)
                except ValueError:
                    raise InvalidDataError(
                        f"column {name!r}, line {row + 2}: {cell!r} is not a number"
                    ) from None
        raise
    bad = ~np.isfinite(values)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise InvalidDataError(
            f"column {names[column]!r}, line {row + 2}: {cells[row, column]!r} is not finite "
            "(NaN or infinity); remove or impute it"
        )
    return values


def _npz_headers(path: Path, limits: DataLimits) -> None:
    """Read each member's .npy header and refuse what would not fit, before any data is
    decompressed: a few hundred bytes can declare terabytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            total = 0
            for member in members:
                if not member.filename.endswith(".npy"):
                    raise InvalidDataError(f"{member.filename!r} in the NPZ file is not an array")
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(handle)
                if dtype.hasobject:
                    raise InvalidDataError(
                        f"array {member.filename[:-4]!r} holds objects (pickles), which are "
                        "refused; save numeric arrays"
                    )
                total += math.prod(shape) * dtype.itemsize
    except InvalidDataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidDataError(f"not a readable NPZ file: {exc}") from exc
    if total > limits.max_bytes:
        raise InvalidDataError(
            f"the NPZ arrays would take {total} bytes in memory; the limit is {limits.max_bytes}"
        )
    size = path.stat().st_size
    if total > max(limits.npz_free_bytes, limits.max_npz_expansion * size):
        raise InvalidDataError(
            f"the NPZ arrays would take {total} bytes in memory, {total // size} times the "
            f"{size}-byte file; past {limits.npz_free_bytes} bytes the limit is "
            f"{limits.max_npz_expansion} times: send the arrays uncompressed (numpy.savez)"
        )


def read_npz(path: Path, limits: DataLimits = DataLimits()) -> dict[str, np.ndarray]:
    _npz_headers(path, limits)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidDataError(f"not a readable NPZ file: {exc}") from exc
    if not arrays:
        raise InvalidDataError("the NPZ file holds no arrays")
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf" and not (name == "y" and array.dtype.kind == "U"):
            raise InvalidDataError(f"array {name!r} has dtype {array.dtype}; use numbers")
        if array.ndim and not 1 <= len(array) <= limits.max_rows:
            raise InvalidDataError(
                f"array {name!r} has shape {list(array.shape)}; its first axis needs "
                f"1..{limits.max_rows} entries"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidDataError(f"array {name!r} holds NaN or infinite values")
    return arrays


MIN_ROWS = 10
MAX_CLASSES_AUTO = 20  # integer labels with at most this many values are taken as classes


def read_table(path: Path, label: str | None, limits: DataLimits = DataLimits()) -> Table:
    """Training data: a CSV with a header, or an NPZ with X [N, features] and y [N]."""
    if is_npz(path):
        arrays = read_npz(path, limits)
        if "X" not in arrays or "y" not in arrays:
            raise InvalidDataError(
                f"the NPZ file needs arrays X and y; it has {', '.join(sorted(arrays))}"
            )
        features, labels = arrays["X"], arrays["y"]
        if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
            raise InvalidDataError(
                f"X must be [rows, features] and y [rows]; got X {list(features.shape)}, "
                f"y {list(labels.shape)}"
            )
        table = Table({"": features.astype(np.float64)}, labels, [])
    else:
        table = read_csv(path, label, limits)
    if table.rows < MIN_ROWS:
        raise InvalidDataError(
            f"{table.rows} rows is too few to train on; send at least {MIN_ROWS}"
        )
    return table


def _labels_look_like_classes(labels: np.ndarray) -> bool:
    """String labels, or integer-valued labels with few distinct values."""
    if labels.dtype.kind in "US":
        return True
    integral = bool(np.all(np.asarray(labels, dtype=np.float64) % 1 == 0))
    return integral and len(np.unique(labels)) <= MAX_CLASSES_AUTO


# task -> labels -> train a classifier?
LABEL_TASKS: dict[Task, Callable[[np.ndarray], bool]] = {
    "auto": _labels_look_like_classes,
    "classification": lambda labels: True,
    "regression": lambda labels: False,
}


def is_classification(labels: np.ndarray, task: Task) -> bool:
    return LABEL_TASKS[task](labels)


@dataclass
class EvalData:
    """Inputs for a model as onnxruntime takes them: one feed per run, and labels when the file
    has them, concatenated over the runs along their first axis (the samples)."""

    runs: list[dict[str, np.ndarray]]
    labels: np.ndarray | None

    def stacked(self, name: str) -> np.ndarray:
        """Input `name` of every run, joined along the first axis: a batch-first input as one."""
        return np.concatenate([run[name] for run in self.runs])


def load_eval_data(path: Path, inputs: list[InputSpec], label: str | None) -> EvalData:
    """Feeds for the model from a CSV (one 2-D input) or an NPZ (arrays named after inputs)."""
    if is_npz(path):
        return _npz_feeds(read_npz(path), inputs)
    if len(inputs) != 1:
        raise InvalidDataError(
            f"the model has {len(inputs)} inputs; a CSV feeds only one, send an NPZ file"
        )
    spec = inputs[0]
    if spec.shape is not None and len(spec.shape) != 2:
        raise InvalidDataError(
            f"input {spec.name!r} has shape {spec.described}; a CSV feeds [rows, features] "
            "only: send an NPZ file with arrays shaped as the model declares"
        )
    width = spec.shape[-1] if spec.shape else None
    if label is None and width is not None:
        table = read_csv(path, "")
        columns = table.features[""].shape[1]
        if columns == width + 1:
            table = read_csv(path, None)
        elif columns != width:
            raise InvalidDataError(
                f"the CSV has {columns} columns but input {spec.name!r} takes {width} "
                "features (plus an optional label column last)"
            )
    else:
        table = read_csv(path, label)
    features = _conform(table.features[""], spec)
    return EvalData([{spec.name: features}], table.labels)


def _npz_feeds(arrays: dict[str, np.ndarray], inputs: list[InputSpec]) -> EvalData:
    """Arrays shaped as the model declares its inputs are one run; with one more leading axis,
    shared by every input, they are that many runs."""
    if all(spec.name in arrays for spec in inputs):
        given = {spec.name: arrays[spec.name] for spec in inputs}
    elif len(inputs) == 1 and "X" in arrays:
        given = {inputs[0].name: arrays["X"]}
    else:
        raise InvalidDataError(
            cut_list(
                "the NPZ file needs arrays named after the model's inputs (",
                [spec.name for spec in inputs],
                ") or X for a one-input model, plus y for labels",
            )
        )
    layouts = {spec.name: _layout(given[spec.name], spec) for spec in inputs}
    if len(set(layouts.values())) > 1:
        raise InvalidDataError(
            "the NPZ arrays disagree on runs: "
            + ", ".join(f"{name} {_describe(runs)}" for name, runs in layouts.items())
            + "; give every input one leading axis of runs, or none"
        )
    runs = next(iter(layouts.values()), None)  # a model without inputs runs once
    labels = arrays.get("y")
    if runs is None:
        feeds = [{spec.name: _conform(given[spec.name], spec) for spec in inputs}]
    else:
        feeds = [
            {spec.name: _conform(given[spec.name][index], spec) for spec in inputs}
            for index in range(runs)
        ]
        if labels is not None:
            if labels.ndim == 0 or len(labels) != runs:
                raise InvalidDataError(
                    f"y has shape {list(labels.shape)}; with {runs} runs it needs a leading "
                    f"axis of {runs}"
                )
            labels = labels.reshape(-1, *labels.shape[2:])
    return EvalData(feeds, labels)


def _layout(array: np.ndarray, spec: InputSpec) -> int | None:
    """None when `array` is shaped as the input declares (one run); the number of runs when it
    has one more leading axis; else a refusal naming both shapes."""
    if spec.shape is None or spec.fits(array.shape):
        return None
    if array.ndim == len(spec.shape) + 1 and spec.fits(array.shape[1:]):
        return int(array.shape[0])
    raise InvalidDataError(
        f"data for input {spec.name!r} has shape {list(array.shape)}; the model declares "
        f"{spec.described} (a leading axis of runs may be added)"
    )


def _describe(runs: int | None) -> str:
    return "one run" if runs is None else f"{runs} runs"


def _conform(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    array = np.asarray(array)  # one run of a scalar input is a NumPy scalar, not an array
    if spec.shape is not None and not spec.fits(array.shape):
        raise InvalidDataError(
            f"data for input {spec.name!r} has shape {list(array.shape)}; the model declares "
            f"{spec.described}"
        )
    if spec.dtype.kind in "iu" and array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise InvalidDataError(f"input {spec.name!r} takes integers; the data has fractions")
    if spec.dtype.kind == "b" and array.dtype.kind != "b" and not np.isin(array, (0, 1)).all():
        raise InvalidDataError(f"input {spec.name!r} takes booleans; the data has other values")
    return array.astype(spec.dtype)
