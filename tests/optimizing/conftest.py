"""Packages to optimise: built once per session, copied per test (optimize rewrites the package)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest


def outlier_rows(rows: int, seed: int) -> np.ndarray:
    """Inputs whose feature 0 is ~1000x the others: one per-tensor int8 scale for them all rounds
    features 1..15 to zero, so quantising the first layer's input destroys it."""
    x = np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)
    x[:, 0] *= 1000
    return x


@pytest.fixture(scope="session")
def outlier_package(session_dir: Path) -> Path:
    """An MLP (16 -> 64 -> 64 -> 10) whose first layer reads ``outlier_rows``, as an ONNX package."""
    import torch

    import packager

    torch.manual_seed(0)

    class OutlierMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(16, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)
            with torch.no_grad():  # the outlier feature's weights are small: the fp32 layer is well scaled
                self.a.weight[:, 0] *= 1e-3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    model = OutlierMLP().eval()
    return packager.export(model, {"x": outlier_rows(4, 1)}, out=session_dir / "outlier_mlp", formats=["onnx"]).path


@pytest.fixture(scope="session")
def outlier_calibration(session_dir: Path) -> Path:
    path = session_dir / "outlier_calib.npz"
    np.savez(path, x=outlier_rows(128, 2))
    return path


@pytest.fixture(scope="session")
def cnn_calibration(session_dir: Path) -> Path:
    """Rows like the sample CNN's training data (standard normal images)."""
    path = session_dir / "cnn_calib.npz"
    np.savez(path, x=np.random.default_rng(3).standard_normal((64, 3, 32, 32)).astype(np.float32))
    return path


@pytest.fixture
def copy_of(tmp_path: Path):
    def copy(package: Path) -> Path:
        return Path(shutil.copytree(package, tmp_path / package.name))

    return copy
