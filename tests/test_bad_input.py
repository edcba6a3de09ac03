"""Bad input and unlucky environments get one message and exit 2 (or 4), never exit 70 (issue 12, item 10).

The triggers covered elsewhere: float64 inputs, wrong channel count, a missing ``forward``
argument and a missing framework (tests/test_cli.py); a forged ``.npy`` header and ``.npz``
bombs (tests/test_security.py); a full disk (tests/test_exporting.py); a second concurrent
run (tests/test_batch_safety.py). This file covers the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import runtimes
from packager.errors import ManifestError, UsageError
from packager.manifest import MANIFEST_NAME
from runtimes.device import host_cuda_devices
from tests._integrity import copy_package, rehash
from tests.conftest import run_cli


@pytest.fixture
def pkg(mlp_onnx_package: Path, tmp_path: Path) -> Path:
    return copy_package(mlp_onnx_package, tmp_path / "pkg")


def _edit_manifest(package: Path, **artifact_options: object) -> None:
    path = package / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["artifacts"][0]["options"]["runner"] = artifact_options
    path.write_text(json.dumps(data))


def _assert_user_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, text
    assert "Traceback" not in text and "internal error" not in text
    for word in words:
        assert word in text, text


# --- a read-only output folder ---------------------------------------------------------
@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write into: permissions for a user, a read-only mount for root."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.parametrize("target", ["out.parquet", "outdir"])
def test_run_into_a_read_only_folder(pkg: Path, read_only_dir: Path, tmp_path: Path, target: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 16), np.float32))
    proc = run_cli("run", str(pkg), "-i", str(tmp_path / "x.npy"), "-o", str(read_only_dir / target), "-q")
    _assert_user_error(proc, 2, str(read_only_dir), "Fix:")


def test_pack_into_a_read_only_folder(pkg: Path, read_only_dir: Path) -> None:
    proc = run_cli("pack", str(pkg), "-o", str(read_only_dir / "pkg.tar.gz"))
    _assert_user_error(proc, 2, str(read_only_dir), "Fix:")


# --- bad runner options in a manifest ---------------------------------------------------
@pytest.mark.parametrize("options, words", [
    ({"intra_op_num_threads": "lots"}, ["intra_op_num_threads", "lots"]),
    ({"graph_optimization_level": "max"}, ["graph_optimization_level", "'all'"]),
    ({"providers": ["SomeProvider"]}, ["'providers' is not an option"]),
    ({"intra_op_num_threads": -5}, ["intra_op_num_threads"]),
])
def test_bad_runner_options_in_a_manifest(pkg: Path, tmp_path: Path, options: dict, words: list[str]) -> None:
    _edit_manifest(pkg, **options)
    rehash(pkg)
    with pytest.raises(ManifestError, match="manifest"):
        runtimes.load(pkg)
    np.save(tmp_path / "x.npy", np.zeros((4, 16), np.float32))
    _assert_user_error(run_cli("run", str(pkg), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.parquet")),
                       2, "manifest", *words)
    # verify judges each cell: the artifact does not load (exit 4), with the same message.
    _assert_user_error(run_cli("verify", str(pkg)), 4, "manifest", *words)


def test_runner_options_given_by_the_caller_parse_by_type(mlp_onnx_package: Path) -> None:
    with runtimes.load(mlp_onnx_package, intra_op_num_threads="2") as runner:  # strings: as from a CLI
        assert runner.options.intra_op_num_threads == 2
    with pytest.raises(UsageError, match="'intra_op_threads' is not an option"):
        runtimes.load(mlp_onnx_package, intra_op_threads=2)  # a typo is not silently ignored
    with pytest.raises(UsageError, match="graph_optimization_level"):
        runtimes.load(mlp_onnx_package, graph_optimization_level="fast")


# --- a deeply nested manifest -----------------------------------------------------------
def test_deeply_nested_manifest(pkg: Path) -> None:
    path = pkg / MANIFEST_NAME
    text = path.read_text().replace('"extra": {', '"extra": {"deep": ' + "[" * 100_000 + "]" * 100_000 + ",", 1)
    path.write_text(text)
    with pytest.raises(ManifestError, match="nested too deeply"):
        runtimes.load(pkg)
    _assert_user_error(run_cli("verify", str(pkg)), 2, "nested too deeply")


# --- bad golden data ----------------------------------------------------------------------
def _corrupt_crc(path: Path) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size - 1] ^= 0xFF  # last byte of the member: CRC no longer matches
    path.write_bytes(bytes(data))


def _bad_member(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", b"this is not an .npy file")


def _not_a_zip(path: Path) -> None:
    path.write_bytes(b"garbage" * 20)


@pytest.mark.parametrize("damage", [_corrupt_crc, _bad_member, _not_a_zip], ids=["crc", "member", "not_zip"])
def test_bad_golden_npz(pkg: Path, damage) -> None:
    damage(pkg / "golden" / "inputs.npz")
    rehash(pkg)  # an attacker (or a broken copy tool) with matching checksums
    _assert_user_error(run_cli("verify", str(pkg)), 2, "inputs.npz", "Fix:")


# --- bad Parquet shape metadata ----------------------------------------------------------
@pytest.mark.parametrize("meta", [b"not json", b"[-1]", b'["a"]', b"16", b"[" * 5000 + b"]" * 5000])
def test_bad_parquet_shape_metadata(mlp_onnx_package: Path, tmp_path: Path, meta: bytes) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    values = np.zeros((4, 16), np.float32).reshape(-1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values), 16)
    field = pa.field("x", column.type, metadata={b"packager.shape": meta})
    pq.write_table(pa.Table.from_arrays([column], schema=pa.schema([field])), tmp_path / "in.parquet")
    proc = run_cli("run", str(mlp_onnx_package), "-i", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "o.parquet"))
    _assert_user_error(proc, 2, "packager.shape", "column 'x'")
    assert not (tmp_path / "o.parquet").exists()


def test_a_missing_package_folder_copy_is_not_internal(tmp_path: Path, mlp_onnx_package: Path) -> None:
    """A package whose artifact was deleted after export: named, exit 2."""
    pkg = copy_package(mlp_onnx_package, tmp_path / "pkg")
    shutil.rmtree(pkg / "onnx")
    _assert_user_error(run_cli("verify", str(pkg)), 2, "onnx")


# --- what a newcomer trips on (issue 18) -------------------------------------------------
@pytest.mark.parametrize("name", ["mistyped.pt", "mistyped.pdparams", "jit/mistyped"])
def test_a_mistyped_source_says_it_does_not_exist(tmp_path: Path, name: str) -> None:
    proc = run_cli("export", name, "-o", "pkg", cwd=tmp_path)
    _assert_user_error(proc, 2, f"{name}: does not exist", str(tmp_path))
    assert "expected .pt" not in proc.stderr and "--framework" not in proc.stderr


@pytest.mark.skipif(host_cuda_devices() != 0,
                    reason="checks a host without any CUDA device")
@pytest.mark.parametrize("command", ["verify", "bench", "run"])
def test_cuda_on_a_host_without_a_gpu_is_one_message(pkg: Path, tmp_path: Path, command: str) -> None:
    args = [command, str(pkg), "--device", "cuda"]
    if command == "run":
        np.save(tmp_path / "x.npy", np.zeros((3, 16), np.float32))
        args += ["-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz")]
    proc = run_cli(*args)
    _assert_user_error(proc, 2, "device cuda:0: no CUDA device on this host", "0 CUDA devices", "--device cpu")
    text = proc.stdout + proc.stderr
    assert len(text.strip().splitlines()) == 1, text  # one message: no table of failed loads
    assert "load failed" not in text and "pip install" not in text and "onnxruntime-gpu" not in text


def test_typos_of_formats_runtimes_and_builders_get_did_you_mean(mlp_onnx_package: Path, tmp_path: Path) -> None:
    """Issue 13: 'did you mean' for formats, runtimes and builder functions (click already does
    it for commands and options); the runtime error also says what was given (it said None)."""
    proc = run_cli("verify", str(mlp_onnx_package), "--format", "onxx")
    assert proc.returncode == 2 and "did you mean 'onnx'?" in proc.stderr, proc.stderr
    proc = run_cli("verify", str(mlp_onnx_package), "--runtime", "onnxrutime")
    assert proc.returncode == 2 and "did you mean 'onnxruntime'?" in proc.stderr, proc.stderr
    assert "got ['onnxrutime']" in proc.stderr
    proc = run_cli("run", str(mlp_onnx_package), "-i", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz"),
                   "--format", "onnnx")
    assert proc.returncode == 2 and "did you mean 'onnx'?" in proc.stderr, proc.stderr
    proc = run_cli("expotr")
    assert proc.returncode == 2 and "Did you mean 'export'?" in proc.stderr, proc.stderr

    from packager.errors import UsageError
    from packager.exporters.pytorch import import_builder

    (tmp_path / "mymodels.py").write_text("def build_model():\n    return None\n")
    with pytest.raises(UsageError, match="did you mean 'build_model'"):
        import_builder(f"{tmp_path / 'mymodels.py'}:build_modle")
    import runtimes

    with pytest.raises(UsageError, match="did you mean 'onnxruntime'"):
        runtimes.load(mlp_onnx_package, runtime="onnxruntim")
