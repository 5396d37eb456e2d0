"""Fixtures for the tests: real models (scikit-learn estimators converted by skl2onnx), the
digits as arrays and as an upload, PostgreSQL, and the service over HTTP (at the end)."""

import io
import os
import subprocess
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from server import Server, free_port, start_server
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes, load_digits, load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor

from workers.compress.prune import copy_model


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays, read-only: a session fixture's data is shared by every test that asks for
    it, so a test that changed it in place would change what the tests after it see. Writing
    into one raises instead."""
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _fit(estimator, features, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(features, labels)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    features, labels = load_digits(return_X_y=True)
    return _frozen((features / 16.0).astype(np.float32), labels)


# Tests get a copy_model of each: pruning works on the model it is given, in place, and the
# models below are trained once per session.


@pytest.fixture(scope="session")
def _mlp_classifier(digits) -> onnx.ModelProto:
    features, labels = digits
    mlp = MLPClassifier(hidden_layer_sizes=(48, 24), max_iter=150, random_state=0)
    return to_onnx(_fit(mlp, features[:1200], labels[:1200]), features[:1])


@pytest.fixture
def mlp_classifier(_mlp_classifier) -> onnx.ModelProto:
    """64-48-24-10 digits MLP: two hidden layers, so structured pruning has a chain."""
    return copy_model(_mlp_classifier)


@pytest.fixture(scope="session")
def _mlp_regressor() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    features, target = load_diabetes(return_X_y=True)
    features = (features / features.std(axis=0)).astype(np.float32)
    target = (target - target.mean()) / target.std()
    mlp = MLPRegressor(hidden_layer_sizes=(32,), max_iter=300, random_state=0)
    return to_onnx(_fit(mlp, features, target), features[:1]), *_frozen(features, target)


@pytest.fixture
def mlp_regressor(_mlp_regressor) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model, features, target = _mlp_regressor
    return copy_model(model), features, target


@pytest.fixture(scope="session")
def _logistic() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    features, labels = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    model = _fit(LogisticRegression(max_iter=500), features, labels)
    return to_onnx(model, features[:1]), *_frozen(features, labels)


@pytest.fixture
def logistic(_logistic) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model, features, labels = _logistic
    return copy_model(model), features, labels


@pytest.fixture(scope="session")
def digits_csv(digits) -> bytes:
    """Every digits row as an upload: a header line (p0..p63, digit), the label last."""
    features, labels = digits
    rows = "\n".join(",".join(f"{v:g}" for v in row) for row in np.c_[features, labels])
    return (",".join([f"p{i}" for i in range(64)] + ["digit"]) + "\n" + rows).encode()


@pytest.fixture(scope="session")
def digits_upload(_mlp_classifier, digits) -> dict[str, bytes]:
    """A prune submit's files: the digits MLP, and its held-out rows (1200 on) as eval data."""
    features, labels = digits
    csv = io.StringIO()
    header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
    np.savetxt(
        csv, np.c_[features[1200:], labels[1200:]], delimiter=",", header=header, comments=""
    )
    return {"model": _mlp_classifier.SerializeToString(), "eval_data": csv.getvalue().encode()}


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "input").mkdir()
    return tmp_path


@pytest.fixture(scope="session")
def _digits_300_100(digits):
    """The 64-300-100-10 digits MLP of the Deep Compression / LeNet-300-100 lineage, with its
    train and held-out splits (70/30)."""
    features, labels = digits
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0
    )
    mlp = MLPClassifier(hidden_layer_sizes=(300, 100), max_iter=300, random_state=0)
    model = to_onnx(_fit(mlp, x_train, y_train), x_train[:1])
    return model, _frozen(x_train, y_train), _frozen(x_test, y_test)


@pytest.fixture
def digits_300_100(_digits_300_100):
    model, train, test = _digits_300_100
    return copy_model(model), train, test


POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> Iterator[str]:
    """The machine's PostgreSQL on 127.0.0.1:5432 when it answers; else a temporary cluster
    when the binaries exist (and we are not root, which initdb refuses); else a skip that says
    why, which CI=true turns into a failure."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    try:
        engine = create_engine(POSTGRES, connect_args={"connect_timeout": 2})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        yield POSTGRES
        return
    except OperationalError:
        pass
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not binaries or os.geteuid() == 0:
        from brokers import skip_or_fail

        skip_or_fail("PostgreSQL does not answer on 127.0.0.1:5432 and no temporary one can start")
    bin_dir, port = binaries[-1], free_port()
    data = tmp_path_factory.mktemp("pg")
    subprocess.run(
        [bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [bin_dir / "pg_ctl", "-D", data, "-w", "-o", f"-p {port} -h 127.0.0.1 -k {data}", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True
        )


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A schema of our own in PostgreSQL, dropped afterwards."""
    import secrets

    from sqlalchemy import create_engine, text

    schema = f"clipprune_test_{secrets.token_hex(4)}"
    admin = create_engine(postgres_server)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{postgres_server}?options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


# --- the service over HTTP ------------------------------------------------------------------
# Every HTTP test talks to a real uvicorn process (tests/server.py) and submits jobs through
# server.submit. A module shares one `server`; a module that needs other settings overrides
# `server_settings`. A test that starts, stops, kills or restarts servers itself, or needs
# one of its own, asks `make_server`.


@pytest.fixture(scope="module")
def server_settings() -> dict[str, Any]:
    """Settings of the module's `server`, as CLIPPRUNE_<NAME> without the prefix (api_keys,
    job_timeout_s, max_upload_bytes, database_url, backend...). A module overrides this
    fixture to ask for its own."""
    return {}


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    server_settings: dict[str, Any],
) -> Iterator[Server]:
    """One service for the whole module, stopped after its last test."""
    data_dir = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]) / "data"
    server = start_server(data_dir, **server_settings)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """A client of the module's `server`, without a key."""
    with server.client() as client:
        yield client


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Servers of this test's own: make_server(**settings) starts one on data_dir (default
    tmp_path/data, so a second call after a stop is a restart on the same data), under the
    command `wrap` if given. Every one started is stopped when the test ends, whatever state
    the test left it in."""
    started: list[Server] = []

    def make(data_dir: Path | None = None, wrap: Sequence[str] = (), **settings: Any) -> Server:
        server = start_server(data_dir or tmp_path / "data", wrap, **settings)
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.stop()
