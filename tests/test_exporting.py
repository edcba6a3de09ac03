"""Export orchestration (packager/exporting.py): parity judged in a fresh process, as the
deployment host will (issue 11 item 5), and the free-space estimate (issue 12 item 7)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import packager
from packager.errors import ExitCode, RuntimeLoadError
from packager.fidelity import isolated
from packager.package import GOLDEN_INPUTS, GOLDEN_OUTPUTS, Package

torch = pytest.importorskip("torch")

#: What the worker must never import: the model's code (this test package, the helper module),
#: and frameworks that no runtime of the package needs.
MODEL_CODE = ("tests", "sample_models", "transformers")


def _x(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 8)).astype(np.float32)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_class_output_model_exports_and_verifies_without_its_code(tmp_path: Path) -> None:
    """A forward returning its own pytree-registered output class (as every Hugging Face model
    does with ModelOutput): export passes with parity judged in a fresh process, and the package
    verifies in another process that never imported the class's module."""
    from tests._pytree_output import PairModel

    torch.manual_seed(0)
    result = packager.export(PairModel().eval(), {"x": _x()}, out=tmp_path / "pkg",
                             formats=["torch_export"])
    assert result.passed and [o.name for o in result.manifest.signature.outputs] == ["output_0", "output_1"]
    code = (f"import sys\nfrom packager.cli import main\nrc = main(['verify', {str(result.path)!r}])\n"
            f"print('RC', rc, sorted(m for m in {MODEL_CODE!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert "RC 0 []" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def class_output_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``.pt2`` whose output spec keeps the class (torch_export before it flattened outputs)."""
    from tests._pytree_output import program_with_class_output

    path = tmp_path_factory.mktemp("pt2") / "class_output.pt2"
    torch.export.save(program_with_class_output(torch.from_numpy(_x())), str(path))
    return path


def test_artifact_that_needs_the_models_code_fails_export(class_output_pt2: Path, tmp_path: Path) -> None:
    """Re-exporting that program writes a .pt2 that loads only where the class is registered:
    the fresh-process parity refuses it (exit 4, nothing written) and names the cause."""
    with pytest.raises(RuntimeLoadError) as info:
        packager.export(class_output_pt2, {"x": _x()}, out=tmp_path / "pkg", formats=["torch_export"])
    message = info.value.message
    assert info.value.exit_code == ExitCode.RUNTIME
    assert "does not load or run without the model's code" in message and "fresh process" in message
    assert "tests._pytree_output.PairOutput in pytree is not registered" in message  # the cause, not "see above"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no package, no temp folder


@pytest.mark.parametrize("opt_out", ["param", "env"])
def test_in_process_parity_is_blind_to_it(class_output_pt2: Path, tmp_path: Path, opt_out: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the default is a fresh process: judged in the exporting process (where the class is
    registered), the same artifact passes; only the opt-out (for speed) does this."""
    if opt_out == "env":
        monkeypatch.setenv(isolated.IN_PROCESS_ENV, "1")
    result = packager.export(class_output_pt2, {"x": _x()}, out=tmp_path / "pkg", formats=["torch_export"],
                             isolate=False if opt_out == "param" else None)
    assert result.passed


@pytest.fixture(scope="module")
def mlp_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    out = tmp_path_factory.mktemp("mlp") / "pkg"
    return packager.export(model, {"x": _x()}, out=out, formats=["onnx", "torch_export"]).path


@pytest.mark.parametrize("formats, framework", [(["onnx"], None), (["onnx", "torch_export"], "torch")])
def test_worker_imports_only_the_runtimes(mlp_package: Path, tmp_path: Path, formats: list[str],
                                          framework: str | None) -> None:
    """One worker judges every artifact; it imports packager, runtimes and the runtimes'
    frameworks, never the model's code nor another framework (no torch for ONNX alone)."""
    root = shutil.copytree(mlp_package, tmp_path / "pkg")
    manifest = Package(root).manifest
    artifacts = [a.model_copy(update={"parity": []}) for a in manifest.artifacts if a.format in formats]
    run = isolated.run_isolated(root, artifacts, manifest.signature, (GOLDEN_INPUTS, GOLDEN_OUTPUTS),
                                noise=manifest.golden.noise)
    assert run.workers == 1 and [p.passed for p in run.parities] == [True] * len(formats)
    assert {"packager", "runtimes", "onnxruntime"} <= set(run.modules)
    unwanted = set(MODEL_CODE) | {"tensorflow", "keras", "paddle"} | ({"torch"} - {framework})
    assert not unwanted & set(run.modules), run.modules
    assert not (root / isolated.WORK_DIR).exists()
    # The same verdicts as the export's own parity.
    assert [p.outputs for p in run.parities] == [a.parity[0].outputs for a in manifest.artifacts
                                                 if a.format in formats]


def test_worker_sys_path_is_only_the_installed_packages(tmp_path: Path) -> None:
    """Not the current folder, not PYTHONPATH (where a user's model code or builder lives)."""
    code_dir = tmp_path / "user_code"
    code_dir.mkdir()
    command = isolated.worker_command()
    flags = command[1:command.index("-c")]
    proc = subprocess.run([sys.executable, *flags, "-c", "import json, sys; print(json.dumps(sys.path))"],
                          capture_output=True, text=True, cwd=code_dir, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(code_dir)})
    paths = json.loads(proc.stdout)
    assert str(code_dir) not in paths and "" not in paths and os.getcwd() not in paths


def test_a_dead_worker_fails_its_artifact_and_the_rest_are_still_judged(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies (here: stopped by the timeout before it could import anything)
    fails the artifact it was on; a new worker takes each remaining one; exit 4."""
    monkeypatch.setenv(isolated.TIMEOUT_ENV, "0.001")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).eval()
    with pytest.raises(RuntimeLoadError) as info:
        packager.export(model, {"x": _x()}, out=tmp_path / "pkg", formats=["torchscript", "onnx"])
    message = info.value.message
    assert message.count("was stopped after") == 2 and "torchscript (torchscript)" in message
    assert "onnx (onnxruntime)" in message and isolated.TIMEOUT_ENV in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _kill_first_child(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first child process of this one, as soon as it appears."""
    me = str(os.getpid())
    while not stop.is_set() and not killed:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                os.kill(int(stat.parent.name), signal.SIGKILL)
                killed.append(int(stat.parent.name))
                return
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_killed_worker_fails_its_artifact_and_a_new_one_judges_the_rest(mlp_package: Path,
                                                                          tmp_path: Path) -> None:
    """A worker killed mid-way (as a framework aborting in C++ would end it) fails the artifact
    it was on, naming the signal; a second worker judges the remaining artifact normally."""
    root = shutil.copytree(mlp_package, tmp_path / "pkg")
    manifest = Package(root).manifest
    artifacts = [a.model_copy(update={"parity": []}) for a in manifest.artifacts]
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_child, args=(stop, killed))
    killer.start()
    try:
        run = isolated.run_isolated(root, artifacts, manifest.signature, (GOLDEN_INPUTS, GOLDEN_OUTPUTS),
                                    noise=manifest.golden.noise)
    finally:
        stop.set()
        killer.join()
    assert killed and run.workers == 2
    first, second = run.parities
    assert not first.passed and "killed by SIGKILL" in first.error and "without the model's code" in first.error
    assert second.passed and second.outputs == manifest.artifacts[1].parity[0].outputs


def test_size_estimate_covers_the_package(tmp_path: Path) -> None:
    """The free-space estimate is at least what the formats and golden data really take, and
    not wildly more (weights x formats x 1.25 + 1 MiB per format + the golden data twice)."""
    from packager.exporters import LoadedModel
    from packager.exporting import estimate_package_bytes, model_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8)).eval()
    loaded = LoadedModel(model=model, kind="in_memory", framework="torch")
    assert model_bytes(loaded) == (1024 * 512 + 512 + 512 * 8 + 8) * 4
    example = {"x": np.ones((2, 1024), np.float32)}
    formats = ["onnx", "torchscript"]
    result = packager.export(model, example, out=tmp_path / "pkg", formats=formats, isolate=False)
    written = sum(f.size for f in result.manifest.all_files())
    estimate = estimate_package_bytes(loaded, formats, Package(result.path).golden())
    assert written < estimate < 1.3 * written + len(formats) * (1 << 20), (written, estimate)


def test_export_parity_opens_its_runners_through_the_selection(tmp_path: Path, monkeypatch) -> None:
    """Export parity picks and opens each artifact as every other caller does (runtimes.select)."""
    import runtimes

    chosen: list[tuple[str, str]] = []
    real = runtimes.select

    def select(*args, **kwargs):
        selection = real(*args, **kwargs)
        chosen.append((selection.format, selection.runtime.name))
        return selection

    monkeypatch.setattr(runtimes, "select", select)
    # A deploy host's required key is for loading packages: it does not refuse the exporter's own artifacts.
    monkeypatch.setenv("PACKAGER_PUBLIC_KEY", str(tmp_path / "deploy-key.pem"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    result = packager.export(model, {"x": np.ones((2, 4), np.float32)}, out=tmp_path / "pkg",
                             formats=["onnx", "torchscript"], isolate=False)
    assert result.passed
    assert chosen == [("onnx", "onnxruntime"), ("torchscript", "torchscript")]


def _strided(stride: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, kernel_size=stride, stride=stride), torch.nn.ReLU()).eval()


def test_a_strided_output_axis_is_found_dynamic(tmp_path: Path) -> None:
    """Width 32 -> 33 leaves a stride-8 output at 4 columns, so one +1 run called that axis
    fixed and verify's sweep then refused the package export had accepted (PP-OCRv4's
    recogniser: width / 8). The second run doubles the non-batch sizes first."""
    example = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 32)).astype(np.float32)}
    result = packager.export(_strided(8), example, out=tmp_path / "p", formats=["onnx"],
                             input_spec=["x:float32[batch,3,16,w=8..128]"])
    shape = result.manifest.signature.outputs[0].shape
    assert shape[0] == "batch" and isinstance(shape[3], str), shape
    assert packager.verify(result.path).passed  # the sweep runs w=8 and w=128


def test_sizes_the_model_refuses_fall_back_to_doubling_then_the_batch(tmp_path: Path) -> None:
    """A CNN that takes only multiples of its stride refuses h+1; doubled sizes it takes."""
    import torch

    class Blocks(torch.nn.Module):  # refuses any size that is not a multiple of 4
        def forward(self, x):
            b, c, h, w = x.shape
            return x.reshape(b, c, h // 4, 4, w // 4, 4).mean(dim=(3, 5))

    example = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 12)).astype(np.float32)}
    result = packager.export(Blocks(), example, out=tmp_path / "p", formats=["onnx"],
                             input_spec=["x:float32[batch,3,h,w]"])
    shape = result.manifest.signature.outputs[0].shape
    assert shape[0] == "batch" and all(isinstance(d, str) for d in shape[2:]), shape

    class OnlyEight(torch.nn.Module):  # takes h = w = 8 only: every other size is refused
        def forward(self, x):
            return x.reshape(x.shape[0], 3, 8, 8).sum(dim=1)

    ex = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    result = packager.export(OnlyEight(), ex, out=tmp_path / "q", formats=["onnx"], input_spec=["x:float32[batch,3,h,w]"])
    assert result.manifest.signature.outputs[0].shape == ("batch", 8, 8)  # the batch alone was accepted
