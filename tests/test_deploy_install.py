"""A deployment host needs only ``pip install packager`` to check and run an ONNX package (issue 13, item 6).

Installs the project from a clean copy of its tracked files into a new virtual environment
(the package registry, with constraints.txt), then verifies, runs and packs a package there:
no torch, TensorFlow or Paddle may be pulled in.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "tensorflow", "paddlepaddle", "tf2onnx", "paddle2onnx", "pyarrow", "ray")

pytestmark = pytest.mark.slow


def _site_bytes(env: Path) -> int:
    site = next((env / "lib").glob("python3*/site-packages"))
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())


def test_core_install_verifies_and_runs_an_onnx_package(mlp_onnx_package: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(src)],
                             capture_output=True, text=True)
    if install.returncode != 0 and "No matching distribution" in install.stderr + install.stdout:
        pytest.skip("no package registry reachable from this host")
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    assert not [f for f in FRAMEWORKS if f"\n{f}==" in "\n" + listed]
    cli = env / "bin" / "packager"
    verify = subprocess.run([str(cli), "verify", str(mlp_onnx_package)], capture_output=True, text=True)
    assert verify.returncode == 0 and "PASS" in verify.stdout, verify.stdout + verify.stderr
    np.save(tmp_path / "x.npy", np.zeros((5, 16), np.float32))
    run = subprocess.run([str(cli), "run", str(mlp_onnx_package), "-i", str(tmp_path / "x.npy"), "-o",
                          str(tmp_path / "y.npy"), "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert np.load(tmp_path / "y.npy").shape == (5, 4)
    archive = tmp_path / "pkg.tar.gz"
    assert subprocess.run([str(cli), "pack", str(mlp_onnx_package), "-o", str(archive)],
                          capture_output=True).returncode == 0
    assert subprocess.run([str(cli), "verify", str(archive)], capture_output=True).returncode == 0
    # An export needs its framework: said, with the extra to install (exit 2).
    (tmp_path / "model.pt").write_bytes(b"not read: torch is missing")
    export = subprocess.run([str(cli), "export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "pkg2")], capture_output=True, text=True)
    assert export.returncode == 2 and "packager[torch]" in export.stderr, export.stderr
    print(f"core install: {_site_bytes(env) / 1e6:.0f} MB in site-packages", file=sys.stderr)
