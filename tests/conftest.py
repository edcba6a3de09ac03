"""Shared fixtures: trained sample models and exported packages, built once per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GLOG_minloglevel", "2")
# Export parity in a fresh process costs a Python start and a framework import per export
# (~5 s, some hundred exports here). Tests of other features judge in process; the tests that
# are the evidence for isolation (ISOLATED below) run it as users get it, by default.
os.environ.setdefault("PACKAGER_PARITY_IN_PROCESS", "1")
ISOLATED = ("tests/test_exporting.py", "tests/zoo/", "tests/exporters/test_binding.py")


def _has_gpu() -> bool:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


HAS_GPU = _has_gpu()

# paddle 3.3 imported after TensorFlow 2.21 segfaults the process. Product code orders the
# imports in runtimes._tf.import_tf; some tests import keras directly, so the session does too.
if importlib.util.find_spec("paddle") and importlib.util.find_spec("tensorflow"):
    from runtimes._paddle import paddle_module

    paddle_module()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def torch_cnn():
    """(trained SmallCNN in eval mode, example inputs)."""
    from sample_models.torch_models import train_cnn

    return train_cnn(seed=0, steps=10)


@pytest.fixture(scope="session")
def torch_transformer():
    from sample_models.torch_models import train_transformer

    return train_transformer(seed=0, steps=10)


@pytest.fixture(scope="session")
def torch_cnn_package(torch_cnn, session_dir: Path) -> Path:
    """A package with every torch format, exported from the in-memory CNN."""
    import packager

    model, example = torch_cnn
    return packager.export(model, example, out=session_dir / "torch_cnn").path


@pytest.fixture(scope="session")
def torch_transformer_package(torch_transformer, session_dir: Path) -> Path:
    import packager

    model, _ = torch_transformer
    return packager.export(model, out=session_dir / "torch_transformer",
                           input_spec=["ids:int64[batch,seq=1..64]@0:100"]).path


@pytest.fixture(scope="session")
def mlp_onnx_package(session_dir: Path) -> Path:
    """A tiny ONNX-only package (fast to load in every test that needs a runner)."""
    import packager
    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=5)
    return packager.export(model, example, out=session_dir / "mlp_onnx", formats=["onnx"]).path


@pytest.fixture(scope="session")
def keras_cnn():
    """(trained Keras CNN with BatchNorm and Dropout, example inputs {"image": [4,16,16,3]})."""
    pytest.importorskip("tensorflow")
    from sample_models.tf_models import train_cnn

    return train_cnn(seed=0, epochs=2, n=128)


@pytest.fixture(scope="session")
def keras_two_tower():
    """(trained two-input/two-output Keras model, example inputs {"image", "tabular"})."""
    pytest.importorskip("tensorflow")
    from sample_models.tf_models import train_two_tower

    return train_two_tower(seed=0, epochs=2, n=128)


@pytest.fixture(scope="session")
def keras_cnn_package(keras_cnn, session_dir: Path) -> Path:
    """A SavedModel + ONNX package exported from the in-memory Keras CNN."""
    import packager

    model, example = keras_cnn
    return packager.export(model, example, out=session_dir / "keras_cnn").path


@pytest.fixture(scope="session")
def keras_two_tower_package(keras_two_tower, session_dir: Path) -> Path:
    import packager

    model, example = keras_two_tower
    return packager.export(model, example, out=session_dir / "keras_two_tower").path


@pytest.fixture(scope="session")
def torch_openvino_package(torch_transformer, session_dir: Path) -> Path:
    """The sample transformer (dynamic batch, bounded seq=1..64) as ONNX + the OpenVINO IR converted from it."""
    pytest.importorskip("openvino")
    import packager

    model, _ = torch_transformer
    return packager.export(model, out=session_dir / "torch_openvino", formats=["openvino"],
                           input_spec=["ids:int64[batch,seq=1..64]@0:100"]).path


@pytest.fixture(scope="session")
def keras_tflite_package(keras_two_tower, session_dir: Path) -> Path:
    """The two-input/two-output Keras model as SavedModel + the TFLite flatbuffer converted from it."""
    pytest.importorskip("ai_edge_litert")
    import packager

    model, example = keras_two_tower
    return packager.export(model, example, out=session_dir / "keras_tflite", formats=["tflite"]).path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m packager ARGS`` in a subprocess (the real CLI, real exit codes)."""
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "packager", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=600)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _isolated_parity(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Export parity as users get it (a fresh process) in the tests that are its evidence."""
    path = Path(str(request.node.path)).as_posix()
    if any(part in path for part in ISOLATED):
        monkeypatch.delenv("PACKAGER_PARITY_IN_PROCESS", raising=False)
