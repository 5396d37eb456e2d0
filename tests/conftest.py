"""Real models for the tests: scikit-learn estimators converted by skl2onnx, and hand-built
graphs for the layouts converters write (Gemm with transB, Conv, Constant nodes, subgraphs)."""

import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes, load_digits, load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor

from workers.compress.prune import copy_model


def _fit(estimator, features, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(features, labels)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    features, labels = load_digits(return_X_y=True)
    return (features / 16.0).astype(np.float32), labels


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
    return to_onnx(_fit(mlp, features, target), features[:1]), features, target


@pytest.fixture
def mlp_regressor(_mlp_regressor) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model, features, target = _mlp_regressor
    return copy_model(model), features, target


@pytest.fixture(scope="session")
def _logistic() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    features, labels = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    model = _fit(LogisticRegression(max_iter=500), features, labels)
    return to_onnx(model, features[:1]), features, labels


@pytest.fixture
def logistic(_logistic) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model, features, labels = _logistic
    return copy_model(model), features, labels


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
    return model, (x_train, y_train), (x_test, y_test)


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
    from server import free_port

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
