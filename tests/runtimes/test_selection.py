"""runtimes.select: one choice of artifact, runtime and options that every caller reads (issue 13, item 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtimes
from packager.errors import InputError, UsageError
from packager.manifest import MANIFEST_NAME
from packager.package import Package
from packager.versions import VersionDriftWarning
from tests._integrity import copy_package, tiny_torch_package
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def torch_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_torch_package(tmp_path_factory.mktemp("selection"))


def test_select_chooses_like_load_without_loading(torch_pkg: Path) -> None:
    chosen = runtimes.select(torch_pkg)
    assert (chosen.format, chosen.runtime.name) == ("onnx", "onnxruntime")
    assert chosen.signature == Package(torch_pkg).manifest.signature
    assert chosen.path == (torch_pkg / "onnx" / "model.onnx").resolve()
    ts = runtimes.select(torch_pkg, runtime="torchscript")
    assert (ts.format, ts.runtime.name, ts.artifact.format) == ("torchscript", "torchscript", "torchscript")
    with ts.open() as runner:
        assert runner.runtime == "torchscript" and runner.signature == ts.signature


def test_selecting_imports_no_framework(torch_pkg: Path) -> None:
    """Choosing a TorchScript artifact reads the manifest only: torch is imported when it opens."""
    code = ("import sys, runtimes; s = runtimes.select(sys.argv[1], runtime='torchscript'); "
            "print(s.format, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(torch_pkg)], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["torchscript", "False"]


def test_select_refuses_what_no_artifact_offers(torch_pkg: Path) -> None:
    with pytest.raises(InputError, match="not in this package"):
        runtimes.select(torch_pkg, format="saved_model")
    with pytest.raises(InputError, match="no artifact the requested runtime can load"):
        runtimes.select(torch_pkg, runtime="tensorflow")
    with pytest.raises(UsageError, match="'threads' is not an option"):
        runtimes.select(torch_pkg, threads=2)  # onnxruntime's option is intra_op_num_threads


def test_version_drift_warns_on_every_path(torch_pkg: Path, tmp_path: Path) -> None:
    """load, verify, bench and run all open through a Selection, so all of them warn."""
    import packager
    from packager.bench import bench

    pkg = copy_package(torch_pkg, tmp_path / "pkg")
    data = json.loads((pkg / MANIFEST_NAME).read_text())
    data["versions"]["onnxruntime"] = "0.9.1"
    (pkg / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.warns(VersionDriftWarning, match="0.9.1"):
        runtimes.load(pkg).close()
    with pytest.warns(VersionDriftWarning, match="0.9.1"):
        packager.verify(pkg, formats=["onnx"])
    with pytest.warns(VersionDriftWarning, match="0.9.1"):
        bench(pkg, formats=["onnx"], batch_sizes=[1], min_time=0.0, max_iters=2, warmup=0, record=False)
    np.save(tmp_path / "x.npy", np.zeros((3, 16), np.float32))
    proc = run_cli("run", str(pkg), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.npy"), "-q")
    assert proc.returncode == 0 and "0.9.1" in proc.stderr, proc.stderr
