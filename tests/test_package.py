"""Integrity of packages on disk: checksums, missing/unlisted/linked files, --skip-integrity,
verify --integrity-only, atomic replacement and version drift (issue 7)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import packager.package as package_mod
from packager.atomic import umask
from packager.errors import ExitCode, IntegrityError, ManifestError, SchemaVersionError
from packager.manifest import MANIFEST_NAME, SCHEMA_VERSION
from packager.package import Package, PackageWriter
from tests._integrity import copy_package, edit_manifest, tiny_torch_package
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def onnx_pkg(session_dir: Path) -> Path:
    return tiny_torch_package(session_dir, ("onnx",))


@pytest.fixture
def pkg(onnx_pkg: Path, tmp_path: Path) -> Path:
    return copy_package(onnx_pkg, tmp_path / "pkg")


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


TAMPERS = {
    "modified": (lambda p: _flip_byte(p / "onnx/model.onnx"), "onnx/model.onnx", "SHA-256"),
    "truncated": (lambda p: (p / "onnx/model.onnx").write_bytes((p / "onnx/model.onnx").read_bytes()[:-10]),
                  "onnx/model.onnx", "wrong size"),
    "appended": (lambda p: open(p / "golden/outputs.npz", "ab").write(b"x"), "golden/outputs.npz", "wrong size"),
    "missing": (lambda p: (p / "golden/inputs.npz").unlink(), "golden/inputs.npz", "missing"),
    # An ONNX external-data file beside the model would be read by ONNX Runtime.
    "unlisted": (lambda p: (p / "onnx/model.onnx.data").write_bytes(b"\0" * 64), "onnx/model.onnx.data",
                 "not listed"),
    "unlisted_nested": (lambda p: (p / "onnx/sub").mkdir() or (p / "onnx/sub/x.bin").write_bytes(b"1"),
                        "onnx/sub/x.bin", "not listed"),
    "symlinked": (lambda p: ((p / "onnx/model.onnx").rename(p / "elsewhere.onnx"),
                             (p / "onnx/model.onnx").symlink_to(p / "elsewhere.onnx")), "onnx/model.onnx",
                  "not a regular file"),
    "folder_link": (lambda p: ((p / "golden").rename(p / "g2"), (p / "golden").symlink_to(p / "g2")), "golden",
                    "link"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_package_fails_closed_naming_the_file(pkg: Path, tamper: str) -> None:
    change, name, words = TAMPERS[tamper]
    change(pkg)
    with pytest.raises(IntegrityError) as info:
        Package(pkg)
    assert name in info.value.message and words in info.value.message
    assert info.value.exit_code == ExitCode.USAGE
    # The runtime layer refuses it the same way, before building a session.
    import runtimes

    with pytest.raises(IntegrityError):
        runtimes.load(pkg)


def test_intact_package_passes_and_reports_what_it_checked(pkg: Path) -> None:
    report = Package(pkg, verify=False).verify_integrity()
    listed = Package(pkg, verify=False).manifest.all_files()
    assert report.files == len(listed) and report.bytes == sum(f.size for f in listed)


def test_no_framework_byte_before_the_check(pkg: Path) -> None:
    """A tampered package is refused before onnxruntime is even imported."""
    _flip_byte(pkg / "onnx/model.onnx")
    code = ("import sys, runtimes\n"
            "from packager.errors import IntegrityError\n"
            f"try:\n    runtimes.load({str(pkg)!r})\nexcept IntegrityError as e:\n    print('refused', e.subject)\n"
            "print('onnxruntime' in sys.modules, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split("\n")[:2] == ["refused package file 'onnx/model.onnx'", "False False"], result.stderr


def test_cli_verify_integrity_only(pkg: Path) -> None:
    ok = run_cli("verify", "--integrity-only", str(pkg))
    assert ok.returncode == 0, ok.stderr
    assert "integrity OK" in ok.stdout
    (pkg / "onnx/model.onnx.data").write_bytes(b"planted")
    bad = run_cli("verify", "--integrity-only", str(pkg))
    assert bad.returncode == 2
    assert "onnx/model.onnx.data" in bad.stderr and "Traceback" not in bad.stderr


def test_integrity_only_imports_no_framework(pkg: Path) -> None:
    code = ("import sys\nfrom packager.cli import main\n"
            f"rc = main(['verify', '--integrity-only', {str(pkg)!r}])\n"
            "print(rc, sorted(m for m in ('torch', 'onnxruntime', 'tensorflow', 'paddle') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("0 []"), result.stdout + result.stderr


def test_skip_integrity_loads_and_says_so_loudly(pkg: Path, tmp_path: Path) -> None:
    import runtimes

    (pkg / "onnx/notes.txt").write_text("an unlisted file the runtime never reads")
    with pytest.raises(IntegrityError):
        runtimes.load(pkg)
    with runtimes.load(pkg, verify=False) as runner:
        assert runner.run({"x": np.zeros((2, 16), np.float32)})["output"].shape == (2, 4)
    np.savez(tmp_path / "in.npz", x=np.zeros((3, 16), np.float32))
    result = run_cli("run", str(pkg), "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"),
                     "--skip-integrity")
    assert "--skip-integrity" in result.stderr and "NOT" in result.stderr
    assert result.returncode == 0, result.stderr
    bench = ["bench", str(pkg), "--no-record", "-b", "1", "--min-time", "0.01"]
    assert run_cli(*bench).returncode == 2
    skipped = run_cli(*bench, "--skip-integrity")
    assert skipped.returncode == 0 and "NOT" in skipped.stderr, skipped.stderr


def test_paths_escaping_the_package_are_refused(pkg: Path) -> None:
    data = json.loads((pkg / MANIFEST_NAME).read_text())
    data["golden"]["inputs"]["path"] = "../outside.npz"
    (pkg / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="escapes the package"):
        Package(pkg)


def test_newer_schema_is_refused_with_both_versions(pkg: Path) -> None:
    edit_manifest(pkg, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError) as info:
        Package(pkg)
    assert f"<= {SCHEMA_VERSION}" in info.value.message and str(SCHEMA_VERSION + 1) in info.value.message
    result = run_cli("verify", "--integrity-only", str(pkg))
    assert result.returncode == 2 and "schema_version" in result.stderr and "upgrade packager" in result.stderr


def test_major_version_drift_warns_with_both_versions(pkg: Path) -> None:
    import onnxruntime

    import runtimes
    from packager.versions import VersionDriftWarning

    data = json.loads((pkg / MANIFEST_NAME).read_text())
    edit_manifest(pkg, versions={**data["versions"], "onnxruntime": "0.9.1"})
    with pytest.warns(VersionDriftWarning) as caught:
        runtimes.load(pkg).close()
    text = str(caught[0].message)
    assert "0.9.1" in text and onnxruntime.__version__ in text
    np.savez(pkg.parent / "in.npz", x=np.zeros((2, 16), np.float32))
    result = run_cli("run", str(pkg), "-i", str(pkg.parent / "in.npz"), "-o", str(pkg.parent / "out.npz"), "-q")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "0.9.1" in result.stderr and onnxruntime.__version__ in result.stderr
    # Same major (a minor/patch difference): silent.
    edit_manifest(pkg, versions={**data["versions"], "onnxruntime": onnxruntime.__version__.split(".")[0] + ".0.0"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", VersionDriftWarning)
        runtimes.load(pkg).close()


# --- atomic replacement -----------------------------------------------------------------------


def _dir_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / MANIFEST_NAME).write_text(text)
    (path / "payload.bin").write_bytes(text.encode() * 100)
    return path


def _tiny_manifest(writer: PackageWriter, payload: bytes) -> "Manifest":
    from packager.manifest import Artifact, Golden, Manifest, Source
    from packager.signature import Signature, TensorSpec

    writer.path("onnx/model.onnx").write_bytes(payload)
    return Manifest(name="t", packager_version="0", versions={},
                    source=Source(framework="torch", framework_version="2", kind="in_memory"),
                    signature=Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=("batch", 16))],
                                        outputs=[TensorSpec(name="y", dtype="float32", shape=("batch", 4))]),
                    artifacts=[Artifact(format="onnx", path="onnx/model.onnx", files=writer.files("onnx"),
                                        runtimes=["onnxruntime"])],
                    golden=Golden(inputs=writer.write_npz("golden/inputs.npz", {"x": np.zeros((1, 16))}),
                                  outputs=writer.write_npz("golden/outputs.npz", {"y": np.zeros((1, 4))}),
                                  reference="test"))


def test_writer_never_clobbers_a_package_that_appeared_meanwhile(tmp_path: Path) -> None:
    from packager.errors import ExistsError

    dest = tmp_path / "dest"
    with pytest.raises(ExistsError):
        with PackageWriter(dest) as writer:
            manifest = _tiny_manifest(writer, b"ours")
            _dir_with(dest, "theirs")  # another process commits first
            writer.commit(manifest)
    assert (dest / MANIFEST_NAME).read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # our temp folder is gone


def test_overwrite_export_keeps_a_complete_package(tmp_path: Path) -> None:
    dest = tmp_path / "pkg"
    for payload in (b"first" * 1000, b"second" * 1000):
        with PackageWriter(dest, overwrite=True) as writer:
            writer.commit(_tiny_manifest(writer, payload))
        assert Package(dest).resolve("onnx/model.onnx").read_bytes() == payload
        assert dest.stat().st_mode & 0o777 == 0o777 & ~umask()  # not tempfile's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_integrity_check_cost_per_megabyte(tmp_path: Path) -> None:
    """The check is hashing-bound: report the figure (MB/s) and keep it sane (> 50 MB/s)."""
    with PackageWriter(tmp_path / "big") as writer:
        path = writer.commit(_tiny_manifest(writer, os.urandom(32 * 1024 * 1024)))
    started = time.perf_counter()
    report = Package(path).verify_integrity()
    seconds = time.perf_counter() - started
    rate = report.bytes / 1e6 / seconds
    print(f"integrity check: {report.bytes / 1e6:.1f} MB in {seconds * 1000:.0f} ms = {rate:.0f} MB/s "
          f"({seconds * 1000 / (report.bytes / 1e6):.2f} ms per MB)")
    assert rate > 50


@pytest.fixture(scope="module")
def chunked_pkg(session_dir: Path) -> Path:
    """A package whose 4 MB ONNX file gets per-chunk digests."""
    import torch

    import packager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8)).eval()
    return packager.export(model, {"x": np.zeros((2, 1024), np.float32)}, out=session_dir / "chunked",
                           formats=["onnx"]).path


def test_large_files_get_chunk_digests_that_cover_every_byte(chunked_pkg: Path) -> None:
    from packager.digests import CHUNK_MIN, chunk_digests, chunk_size

    entry = next(f for f in Package(chunked_pkg).manifest.all_files() if f.path == "onnx/model.onnx")
    body = (chunked_pkg / entry.path).read_bytes()
    assert entry.chunks is not None and entry.chunks.size == chunk_size(len(body)) and entry.chunks.size >= CHUNK_MIN
    assert entry.chunks.sha256 == [hashlib.sha256(body[i:i + entry.chunks.size]).hexdigest()
                                   for i in range(0, len(body), entry.chunks.size)]
    assert entry.sha256 == hashlib.sha256(body).hexdigest()  # the whole-file digest stays, for sha256sum
    # From the file and from memory alike; small files keep the single digest.
    assert chunk_digests(body, len(body), entry.chunks.size) == entry.chunks.sha256
    assert all(f.chunks is None for f in Package(chunked_pkg).manifest.all_files() if f.size < 2 * CHUNK_MIN)
    assert chunk_size(2 * CHUNK_MIN - 1) is None and chunk_size(10 << 30) * 64 >= 10 << 30


@pytest.mark.parametrize("keep", [False, True])
def test_a_flipped_byte_in_any_chunk_fails_closed(chunked_pkg: Path, tmp_path: Path, keep: bool) -> None:
    pkg = copy_package(chunked_pkg, tmp_path / "pkg")
    entry = next(f for f in Package(pkg).manifest.all_files() if f.path == "onnx/model.onnx")
    last = entry.size - 1  # the last, shorter chunk too
    for offset in (0, entry.chunks.size + 7, last):
        _flip_byte(pkg / entry.path, offset)
        with pytest.raises(IntegrityError) as info:
            Package(pkg, verify=False).verify_integrity(keep=[entry.path] if keep else [])
        start = offset // entry.chunks.size * entry.chunks.size
        assert "onnx/model.onnx" in info.value.message and f"chunk at byte {start}" in info.value.message
        _flip_byte(pkg / entry.path, offset)  # restore
    opened = Package(pkg, verify=False)
    opened.verify_integrity(keep=[entry.path] if keep else [])
    assert opened.take_bytes(entry.path) == ((pkg / entry.path).read_bytes() if keep else None)
    assert opened.take_bytes("golden/inputs.npz") is None  # only what was asked for
    assert opened.take_bytes(entry.path) is None  # handed over once


def test_chunk_lists_that_do_not_cover_the_file_are_refused(chunked_pkg: Path, tmp_path: Path) -> None:
    pkg = copy_package(chunked_pkg, tmp_path / "pkg")
    data = json.loads((pkg / MANIFEST_NAME).read_text())
    data["artifacts"][0]["files"][0]["chunks"]["sha256"].pop()
    (pkg / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        Package(pkg)
    assert "chunks" in info.value.message and "cannot cover" in info.value.message


def test_schema_1_manifests_without_chunks_still_load(chunked_pkg: Path, tmp_path: Path) -> None:
    pkg = copy_package(chunked_pkg, tmp_path / "pkg")
    data = json.loads((pkg / MANIFEST_NAME).read_text())
    data["schema_version"] = 1
    for entry in data["artifacts"][0]["files"]:
        entry.pop("chunks")
    (pkg / MANIFEST_NAME).write_text(json.dumps(data))
    assert Package(pkg).manifest.schema_version == 1  # checked with the whole-file digest
    _flip_byte(pkg / "onnx/model.onnx", 1 << 20)
    with pytest.raises(IntegrityError, match="SHA-256"):
        Package(pkg)


def test_npz_from_memory_matches_np_load() -> None:
    """The in-memory reader of verified golden data gives what np.load gives, and refuses pickles."""
    import io

    from packager.errors import InputError
    from packager.package import load_npz

    arrays = {"x": np.random.default_rng(0).random((2, 3), np.float32), "ids": np.arange(5),
              "fortran": np.asfortranarray(np.ones((3, 4))), "flags": np.array([True, False]),
              "empty": np.zeros((0, 3)), "scalar": np.float32(3), "big_endian": np.arange(4, dtype=">i4")}
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, **arrays)
        got = load_npz("golden.npz", buf.getvalue())
        assert got.keys() == arrays.keys()
        for name, want in arrays.items():
            assert got[name].dtype == np.asarray(want).dtype and np.array_equal(got[name], want)
            assert got[name].flags.writeable
    buf = io.BytesIO()
    np.savez(buf, o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="Python objects"):
        load_npz("golden.npz", buf.getvalue())


# --- disk space (issue 12 item 7) --------------------------------------------------------------


def _dead_pid() -> int:
    """The PID of a process of this host that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    return int(proc.stdout)


def test_writer_sweeps_dead_exports_of_any_name_and_keeps_live_ones(tmp_path: Path) -> None:
    """An export killed by a full disk leaves a hidden temp folder filling it: the next writer
    into the folder removes it, whatever package it was for, once its process is gone."""
    import socket

    host = socket.gethostname()
    dead = tmp_path / f".other.tmp-{host}-{_dead_pid()}-abcd1234"
    dead.mkdir()
    (dead / "weights.bin").write_bytes(b"\0" * 4096)
    dead_file = tmp_path / f".archive.tar.gz.tmp-{host}-{_dead_pid()}-x1"  # a killed 'pack'
    dead_file.write_bytes(b"partial")
    live = tmp_path / f".busy.tmp-{host}-{os.getppid()}-abcd1234"  # a write in progress
    remote = tmp_path / f".shared.tmp-another-host-{_dead_pid()}-abcd1234"  # a PID of another machine
    for folder in (live, remote):
        folder.mkdir()
    with PackageWriter(tmp_path / "pkg"):
        assert not dead.exists() and not dead_file.exists()
        assert live.exists() and remote.exists()


def test_free_space_is_checked_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from packager.errors import InputError

    monkeypatch.setenv(package_mod.FREE_BYTES_ENV, "1000")
    with pytest.raises(InputError) as info:
        PackageWriter(tmp_path / "pkg", reserve=5_000_000)
    message = info.value.message
    assert info.value.exit_code == ExitCode.USAGE
    assert str(tmp_path) in message and "1,000 bytes" in message and "5,000,000 bytes" in message
    assert package_mod.FREE_BYTES_ENV in message  # the way out when the estimate is wrong
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(package_mod.FREE_BYTES_ENV, "lots")
    with pytest.raises(InputError, match="not a number of bytes"):
        PackageWriter(tmp_path / "pkg", reserve=1)


def test_cli_export_refuses_a_disk_without_room(tmp_path: Path) -> None:
    """From the command line: exit 2, the folder and both figures, no traceback, nothing written."""
    import torch

    from sample_models.torch_models import build_mlp

    torch.save(build_mlp().state_dict(), tmp_path / "w.pth")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("export", str(tmp_path / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
                   "--input-spec", "x:float32[batch,16]", "--formats", "onnx,torchscript", "--out", str(out / "pkg"),
                   env={package_mod.FREE_BYTES_ENV: "4096"})
    assert proc.returncode == 2, proc.stderr
    assert "too little free space" in proc.stderr and "4,096 bytes" in proc.stderr and str(out) in proc.stderr
    assert "Traceback" not in proc.stderr and list(out.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs (needs root: skipped where mounting is not permitted)."""
    import shutil

    mount = tmp_path / "small"
    mount.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=60)


#: 4.2 MB of float32 weights: more than the 2 MiB disk holds.
BIG_MODEL = "torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8)).eval()"


def _big_model():
    import torch

    torch.manual_seed(0)
    return eval(BIG_MODEL, {"torch": torch})


def _export_big(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Export the big model to TorchScript from the CLI's entry point in a subprocess: on a full
    disk torch's writer may abort the process, which must not take the test session with it."""
    script = (f"import sys, numpy as np, torch, packager\n"
              f"torch.manual_seed(0)\nmodel = {BIG_MODEL}\n"
              f"try:\n    packager.export(model, {{'x': np.zeros((2, 1024), np.float32)}}, out={str(out)!r}, "
              "formats=['torchscript'])\n"
              "except packager.errors.PackagerError as exc:\n    print(exc.message, file=sys.stderr)\n"
              "    sys.exit(int(exc.exit_code))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_small_disk_is_refused_before_the_first_byte(small_disk: Path) -> None:
    """TorchScript's writer aborts the process on a full disk: the check must come first."""
    proc = _export_big(small_disk / "pkg")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "too little free space" in proc.stderr and str(small_disk) in proc.stderr
    assert list(small_disk.iterdir()) == []


def test_disk_filling_up_during_export_is_exit_2_and_leaves_nothing(small_disk: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """When the estimate is overridden (or another writer fills the disk meanwhile), a write
    that fails with ENOSPC becomes a clear exit-2 error and the partial package is removed."""
    import packager
    from packager.errors import InputError

    monkeypatch.setenv(package_mod.FREE_BYTES_ENV, str(10 ** 12))
    with pytest.raises(InputError) as info:
        packager.export(_big_model(), {"x": np.zeros((2, 1024), np.float32)}, out=small_disk / "pkg",
                        formats=["onnx"])
    assert "ran out of disk space" in info.value.message and str(small_disk) in info.value.message
    assert list(small_disk.iterdir()) == []


def test_export_aborted_by_a_full_disk_is_swept_by_the_next_one(small_disk: Path) -> None:
    """torch's C++ writer aborts the process (SIGABRT) on a full disk, leaving its temp folder;
    the next export into the same folder, even to another name, removes it and succeeds."""
    import signal

    import packager

    proc = _export_big(small_disk / "big", env={package_mod.FREE_BYTES_ENV: str(10 ** 12)})
    assert proc.returncode in (-signal.SIGABRT, 2), proc.stderr[-2000:]
    if proc.returncode == 2:  # caught (the writer no longer aborts): a clear message, nothing left
        assert "disk space" in proc.stderr and list(small_disk.iterdir()) == []
    else:
        assert [p.name.split(".tmp-")[0] for p in small_disk.iterdir()] == [".big"]
    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=1)
    packager.export(model, example, out=small_disk / "tiny", formats=["torchscript"], isolate=False)
    assert sorted(p.name for p in small_disk.iterdir()) == ["tiny"]
