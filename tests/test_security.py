"""No code on load (issue 7): sources that unpickle need --trust; deployment artifacts never run
pickled code, even when an attacker also rewrote manifest.json so the checksums match.

Every hostile file here carries a real payload (``os.system("touch MARKER")``); each test
asserts the marker was never created, so a refusal that happened *after* running the payload
still fails."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from packager.errors import ExitCode, InputError, RuntimeLoadError
from packager.package import Package
from tests._integrity import copy_package, rehash, tiny_torch_package
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker puts in a pickle
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=2)


def _rezip(src: Path, dst: Path, suffix: str, body: bytes) -> None:
    """Copy zip ``src`` to ``dst`` replacing the member ending with ``suffix``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        hit = False
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(suffix):
                data, hit = body, True
            zout.writestr(item, data)
    assert hit, f"{src} has no member ending with {suffix}"


def _torch_save_zip(payload: bytes) -> bytes:
    """A torch.save-format zip whose data.pkl is ``payload``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


@pytest.fixture(scope="module")
def torch_pkg(session_dir: Path) -> Path:
    return tiny_torch_package(session_dir)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "pickled code ran"


# --- sources: --trust ---------------------------------------------------------------------------


def test_full_torch_model_needs_trust(tmp_path: Path) -> None:
    import torch

    from sample_models.torch_models import build_mlp

    torch.save(build_mlp(), tmp_path / "full.pt")
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 16), np.float32))
    args = ["export", str(tmp_path / "full.pt"), "--example-inputs", str(tmp_path / "in.npz"), "--formats", "onnx"]
    refused = run_cli(*args, "-o", str(tmp_path / "a"))
    assert refused.returncode == ExitCode.USAGE
    assert "--trust" in refused.stderr and "state_dict" in refused.stderr and "runs code" in refused.stderr
    assert not (tmp_path / "a").exists()
    trusted = run_cli(*args, "-o", str(tmp_path / "b"), "--trust", env={"PYTHONPATH": str(ROOT)})
    assert trusted.returncode == 0, trusted.stderr
    Package(tmp_path / "b")


def test_malicious_torch_pickle_is_refused_without_running(tmp_path: Path, marker: Path) -> None:
    (tmp_path / "evil.pt").write_bytes(_torch_save_zip(evil_pickle(marker)))
    result = run_cli("export", str(tmp_path / "evil.pt"), "--input-spec", "x:float32[batch,16]", "-o",
                     str(tmp_path / "out"))
    assert result.returncode == ExitCode.USAGE and "--trust" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_malicious_pt2_source_is_refused_without_running(torch_pkg: Path, tmp_path: Path, marker: Path) -> None:
    """torch.export.load unpickles example inputs with a weights_only=False fallback: without --trust
    packager forces weights_only on every torch.load inside it."""
    evil = tmp_path / "evil.pt2"
    _rezip(torch_pkg / "torch_export/model.pt2", evil, "sample_inputs/model.pt", _torch_save_zip(evil_pickle(marker)))
    result = run_cli("export", str(evil), "--input-spec", "x:float32[batch,16]", "--formats", "onnx", "-o",
                     str(tmp_path / "out"))
    assert result.returncode == ExitCode.USAGE and "--trust" in result.stderr, result.stderr
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def _child(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter (TF/Paddle stay out of the test process)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_keras_lambda_needs_trust(tmp_path: Path, marker: Path) -> None:
    pytest.importorskip("packager.exporters.tensorflow")
    if __import__("importlib").util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")
    made = _child(f"""
        import keras, numpy as np
        inp = keras.Input((4,), name="x")
        out = keras.layers.Lambda(lambda t: t * 2 + __import__("os").system("touch {marker}") * 0)(inp)
        keras.Model(inp, out).save("lambda.keras")
        np.savez("in.npz", x=np.zeros((2, 4), np.float32))
    """, tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    marker.unlink(missing_ok=True)  # building the model ran the lambda once, in our own process
    result = run_cli("export", str(tmp_path / "lambda.keras"), "--example-inputs", str(tmp_path / "in.npz"),
                     "-o", str(tmp_path / "out"))
    assert result.returncode == ExitCode.USAGE, result.stderr[-2000:]
    assert "--trust" in result.stderr and not (tmp_path / "out").exists()


def test_malicious_pdparams_is_refused_without_running(tmp_path: Path, marker: Path) -> None:
    pytest.importorskip("packager.exporters.paddle")
    if __import__("importlib").util.find_spec("paddle") is None:
        pytest.skip("paddle is not installed")
    (tmp_path / "evil.pdparams").write_bytes(evil_pickle(marker))
    result = run_cli("export", str(tmp_path / "evil.pdparams"), "--framework", "paddle", "--input-spec",
                     "x:float32[batch,16]", "-o", str(tmp_path / "out"))
    assert result.returncode == ExitCode.USAGE, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# --- deployment artifacts: never unpickle code --------------------------------------------------


def test_torch_export_artifact_with_pickled_code_is_refused(torch_pkg: Path, tmp_path: Path, marker: Path) -> None:
    import runtimes

    pkg = copy_package(torch_pkg, tmp_path / "pkg")
    target = pkg / "torch_export/model.pt2"
    _rezip(torch_pkg / "torch_export/model.pt2", target, "sample_inputs/model.pt",
           _torch_save_zip(evil_pickle(marker)))
    with pytest.raises(InputError, match="torch_export/model.pt2"):  # the checksum catches it first
        runtimes.load(pkg, format="torch_export")
    rehash(pkg)  # an attacker who can also rewrite manifest.json
    with pytest.raises(RuntimeLoadError, match="pickled Python objects") as info:
        runtimes.load(pkg, format="torch_export")
    assert info.value.exit_code == ExitCode.RUNTIME
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the guard is scoped to the load
    # The same through the CLI.
    result = run_cli("verify", str(pkg), "--format", "torch_export")
    assert result.returncode != ExitCode.OK and "Traceback" not in result.stderr


def test_torchscript_artifact_with_pickled_code_is_refused(torch_pkg: Path, tmp_path: Path, marker: Path) -> None:
    import runtimes

    pkg = copy_package(torch_pkg, tmp_path / "pkg")
    _rezip(torch_pkg / "torchscript/model.pt", pkg / "torchscript/model.pt", "/data.pkl", evil_pickle(marker))
    rehash(pkg)
    with pytest.raises(RuntimeLoadError):
        runtimes.load(pkg, format="torchscript")


def test_golden_npz_with_pickled_objects_is_refused(torch_pkg: Path, tmp_path: Path, marker: Path) -> None:
    pkg = copy_package(torch_pkg, tmp_path / "pkg")
    np.savez(pkg / "golden/inputs.npz", x=np.array([_Payload(marker)], dtype=object))
    rehash(pkg)
    with pytest.raises(InputError, match="npz"):
        Package(pkg).golden()
    result = run_cli("verify", str(pkg))
    assert result.returncode == ExitCode.USAGE and "Traceback" not in result.stderr, result.stderr


def test_genuine_artifacts_still_load_with_the_guard(torch_pkg: Path) -> None:
    import runtimes

    x = np.ones((2, 16), np.float32)
    outputs = []
    for fmt in ("onnx", "torchscript", "torch_export"):
        with runtimes.load(torch_pkg, format=fmt) as runner:
            outputs.append(runner.run({"x": x})["output"])
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], rtol=1e-5, atol=1e-6)


# --- decompression bombs in golden data (issue 12 item 9) ---------------------------------------
def _overlapping_npz(member: bytes, copies: int) -> bytes:
    """A zip whose directory lists ``copies`` entries that all point at one stored member: a
    ~2 MB file that declares ``copies`` x 1 MiB (what an attacker writes by hand)."""
    import struct
    import zlib

    crc, size, name = zlib.crc32(member), len(member), b"a.npy"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, size, size, len(name), 0) + name + member
    central = b""
    for i in range(copies):
        entry = f"o{i}.npy".encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, size, size, len(entry),
                               0, 0, 0, 0, 0, 0) + entry
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, copies, copies, len(central), len(local), 0)
    return local + central + end


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("attack", ["overlap", "duplicate", "forged_header"])
def test_golden_npz_bombs_are_refused_before_allocating(torch_pkg: Path, tmp_path: Path, attack: str) -> None:
    pkg = copy_package(torch_pkg, tmp_path / "pkg")
    target = pkg / "golden/outputs.npz"
    if attack == "overlap":  # 20,000 entries x 1 MiB from a 2 MB file: 21 GB if materialised
        target.write_bytes(_overlapping_npz(_npy(np.zeros(1 << 18, np.float32)), 20_000))
    elif attack == "duplicate":
        with zipfile.ZipFile(target, "w") as z, pytest.warns(UserWarning, match="Duplicate"):
            z.writestr("y.npy", _npy(np.zeros(4, np.float32)))
            z.writestr("y.npy", _npy(np.ones(4, np.float32)))
    else:  # a header declaring 2**40 floats over 16 bytes of data
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
        with zipfile.ZipFile(target, "w") as z:
            z.writestr("y.npy", buf.getvalue() + bytes(16))
    rehash(pkg)
    with pytest.raises(InputError, match="zip bomb|more than once|does not match the bytes"):
        Package(pkg).golden()
    # The CLI, under a 4 GiB address-space limit: refused with exit 2, never MemoryError/OOM.
    code = ("import resource,sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
            "from packager.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "verify", str(pkg)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PACKAGER_PARITY_IN_PROCESS": "1"})
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "golden/outputs.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_batch_input_npz_bomb_is_refused(mlp_onnx_package: Path, tmp_path: Path) -> None:
    bomb = tmp_path / "x.npz"
    bomb.write_bytes(_overlapping_npz(_npy(np.zeros((1 << 14, 16), np.float32)), 5_000))
    proc = run_cli("run", str(mlp_onnx_package), "-i", str(bomb), "-o", str(tmp_path / "y.npz"))
    assert proc.returncode == ExitCode.USAGE and "zip bomb" in proc.stderr, proc.stderr


def test_running_an_onnx_package_leaves_no_telemetry_files(mlp_onnx_package: Path, tmp_path: Path) -> None:
    """ONNX Runtime 1.31 writes a device id and a telemetry database under ~/.cache and a
    '.ses' file in TMPDIR unless ORT_DISABLE_TELEMETRY is set before it is imported: packager
    sets it (a user's own value wins), so a deployment host keeps no trace of the run."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "packager", "verify", str(mlp_onnx_package)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    left = sorted(str(p.relative_to(tmp_path)) for p in (*home.rglob("*"), *tmp.rglob("*")))
    assert left == []
