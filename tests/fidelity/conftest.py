"""Session fixtures of the mutation suite: correct packages, and a factory of broken ones."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

# Paddle's core library segfaults when it loads after TensorFlow's in the same process (the
# other order works): load it first when both are installed and TensorFlow is not loaded yet.
if "tensorflow" not in sys.modules and importlib.util.find_spec("paddle") and importlib.util.find_spec("tensorflow"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle  # noqa: F401

TORCH_FORMATS = ["torchscript", "onnx", "torch_export"]


@pytest.fixture(scope="session")
def fid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fidelity")


@pytest.fixture(scope="session")
def cnn(fid_dir: Path) -> tuple[Any, dict, Path]:
    """(correct TinyCNN, golden inputs, its package with every torch format)."""
    import packager
    from tests.fidelity import models as M

    model, example = M.trained_cnn(0), M.image_inputs(0)
    path = packager.export(model, example, out=fid_dir / "cnn_good", formats=TORCH_FORMATS).path
    return model, example, path


@pytest.fixture(scope="session")
def two_outputs(fid_dir: Path) -> tuple[Any, dict, Path]:
    import numpy as np

    import packager
    from tests.fidelity import models as M

    model = M.two_output_model(0)
    example = {"x": np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)}
    path = packager.export(model, example, out=fid_dir / "two_good", formats=TORCH_FORMATS,
                           output_names=["scores", "embedding"]).path
    return model, example, path


@pytest.fixture(scope="session")
def broken(fid_dir: Path) -> Callable[..., Path]:
    """``broken(name, good_package, model, example, **export_kwargs)``: a package with the
    broken model's artifacts and the correct model's golden data (built once per name)."""
    import packager
    from tests.fidelity.mutate import swap_artifacts

    cache: dict[str, Path] = {}

    def make(name: str, good: Path, model: Any, example: Any, **kwargs: Any) -> Path:
        if name not in cache:
            kwargs.setdefault("formats", TORCH_FORMATS)
            raw = packager.export(model, example, out=fid_dir / f"raw_{name}", allow_mismatch=True, **kwargs).path
            cache[name] = swap_artifacts(good, raw, fid_dir / f"mut_{name}")
        return cache[name]

    return make
