"""Data files a caller might send, and the message each bad one gets."""

from pathlib import Path

import numpy as np
import pytest

from workers.errors import InvalidDataError
from workers.evaluate.data import is_classification, read_table

GOOD_ROWS = "\n".join(f"{i},{i * 2},{i % 2}" for i in range(12))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


def test_a_good_csv_with_the_label_last_or_named(tmp_path):
    path = write(tmp_path, "a,b,label\n" + GOOD_ROWS)
    table = read_table(path, None)
    assert table.features[""].shape == (12, 2) and table.labels.tolist()[:3] == [0, 1, 0]
    named = read_table(path, "a")
    assert named.columns == ["b", "label"] and named.labels[5] == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "header line and at least one data row"),
        ("a,b,label\n", "header line and at least one data row"),
        ("a,b,label\n1,2,0\n1,2\n" + GOOD_ROWS, "line 3 has 2 fields but the header has 3"),
        ("a,b,label\n1,x,0\n" + GOOD_ROWS, "column 'b', line 2: 'x' is not a number"),
        ("a,b,label\n1,nan,0\n" + GOOD_ROWS, "column 'b', line 2: 'nan' is not finite"),
        ("a,b,label\ninf,1,0\n" + GOOD_ROWS, "column 'a', line 2: 'inf' is not finite"),
        ("a,b,label\n1,2,0\n", "1 rows is too few to train on"),
    ],
)
def test_bad_csv_files(tmp_path, text, message):
    with pytest.raises(InvalidDataError, match=message.replace("(", r"\(")):
        read_table(write(tmp_path, text), None)


def test_a_missing_label_column_names_the_columns(tmp_path):
    with pytest.raises(
        InvalidDataError, match=r"'target' is not in the header; columns: a, b, label"
    ):
        read_table(write(tmp_path, "a,b,label\n" + GOOD_ROWS), "target")


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.array([{"a": 1}] * 12, dtype=object), y=np.zeros(12))
    with pytest.raises(InvalidDataError, match=r"objects \(pickles\), which are refused"):
        read_table(path, None)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((12, 2))}, "needs arrays X and y"),
        ({"X": np.zeros((12, 2)), "y": np.zeros(11)}, "X must be"),
        ({"X": np.full((12, 2), np.nan), "y": np.zeros(12)}, "NaN or infinite"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(InvalidDataError, match=message):
        read_table(path, None)


def test_a_truncated_npz_is_a_clear_error(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.zeros((12, 2)), y=np.zeros(12))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InvalidDataError, match="not a readable NPZ file"):
        read_table(path, None)


def test_task_detection():
    assert is_classification(np.array([0.0, 1.0, 2.0, 1.0]), "auto")
    assert is_classification(np.array(["cat", "dog"]), "auto")
    assert not is_classification(np.array([0.5, 1.5, 2.0]), "auto")
    assert not is_classification(np.arange(100.0), "auto")  # too many distinct values
    assert not is_classification(np.array([0.0, 1.0]), "regression")


def _npz_with_header(path: Path, shape: tuple[int, ...]) -> None:
    """An NPZ whose one member declares `shape` but carries almost no data."""
    import io
    import zipfile

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X.npy", buffer.getvalue() + b"\0" * 64)
        archive.writestr("y.npy", buffer.getvalue())


def test_an_npz_declaring_terabytes_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.npz"
    _npz_with_header(path, (1_000_000, 1_000_000))
    with pytest.raises(InvalidDataError, match="would take 16000000000000 bytes"):
        read_table(path, None)


def test_an_npz_member_that_is_not_an_array_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X.txt", b"hello")
    with pytest.raises(InvalidDataError, match=r"'X\.txt' in the NPZ file is not an array"):
        read_table(path, None)


def test_an_npz_with_no_rows_is_refused(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, X=np.zeros((0, 3)), y=np.zeros(0))
    with pytest.raises(InvalidDataError, match=r"needs 1\.\."):
        read_table(path, None)
