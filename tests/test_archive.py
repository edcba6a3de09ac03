"""Package archives: ``packager pack``, every command accepting a .tar.gz, and hostile archives
(absolute paths, '..', links, devices, bombs) refused with nothing left behind (issue 7)."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from packager.archive import UnpackedArchive
from packager.packing import pack, unpack
from packager.errors import ExistsError, InputError, IntegrityError
from packager.atomic import umask as _umask
from packager.package import Package
from tests._integrity import copy_package, make_tar, member, package_members, tiny_torch_package, tree
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def onnx_pkg(session_dir: Path) -> Path:
    return tiny_torch_package(session_dir, ("onnx",))


@pytest.fixture(scope="module")
def archive(onnx_pkg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack(onnx_pkg, tmp_path_factory.mktemp("arch") / "model.tar.gz").path


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Route tempfile (where archives are unpacked for loading) to a folder we can inspect."""
    folder = tmp_path / "systmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# --- pack -----------------------------------------------------------------------------------


def test_pack_roundtrip_is_reproducible(onnx_pkg: Path, archive: Path, tmp_path: Path) -> None:
    again = pack(onnx_pkg, tmp_path / "again.tar.gz").path
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(archive.read_bytes()).digest()
    out = unpack(archive, tmp_path / "unpacked")
    assert Package(out).manifest == Package(onnx_pkg).manifest
    # Readable like any file/folder under the umask, not 0600/0700 from tempfile.
    assert again.stat().st_mode & 0o777 == 0o666 & ~_umask() and out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert sorted(tree(out)) == sorted(tree(onnx_pkg))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert all(n.startswith(f"{onnx_pkg.name}/") for n in names) and f"{onnx_pkg.name}/manifest.json" in names


def test_pack_refuses_a_damaged_package_and_writes_nothing(onnx_pkg: Path, tmp_path: Path) -> None:
    pkg = copy_package(onnx_pkg, tmp_path / "pkg")
    (pkg / "onnx/model.onnx.data").write_bytes(b"planted")
    with pytest.raises(IntegrityError, match="model.onnx.data"):
        pack(pkg, tmp_path / "out.tar.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_pack_cli_and_overwrite(onnx_pkg: Path, tmp_path: Path) -> None:
    target = tmp_path / "m.tar.gz"
    first = run_cli("pack", str(onnx_pkg), "-o", str(target))
    assert first.returncode == 0 and "packed" in first.stdout, first.stderr
    again = run_cli("pack", str(onnx_pkg), "-o", str(target))
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert run_cli("pack", str(onnx_pkg), "-o", str(target), "--overwrite").returncode == 0
    bad_name = run_cli("pack", str(onnx_pkg), "-o", str(tmp_path / "m.zip"))
    assert bad_name.returncode == 2 and ".tar.gz" in bad_name.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tar.gz"]


# --- every command accepts an archive -------------------------------------------------------


def test_commands_accept_an_archive(archive: Path, tmp_path: Path) -> None:
    assert run_cli("verify", "--integrity-only", str(archive)).returncode == 0
    inspect = run_cli("inspect", str(archive))
    assert inspect.returncode == 0 and "signature" in inspect.stdout
    verify = run_cli("verify", str(archive))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    np.savez(tmp_path / "in.npz", x=np.ones((5, 16), np.float32))
    run = run_cli("run", str(archive), "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"))
    assert run.returncode == 0, run.stderr
    assert np.load(tmp_path / "out.npz")["output"].shape == (5, 4)
    bench = run_cli("bench", str(archive), "--no-record", "-b", "1", "--min-time", "0.01")
    assert bench.returncode == 0, bench.stderr


def test_loaded_archive_is_cleaned_up_with_its_runner(archive: Path, onnx_pkg: Path, private_tmp: Path) -> None:
    import runtimes

    x = np.ones((2, 16), np.float32)
    with runtimes.load(onnx_pkg) as runner:
        expected = runner.run({"x": x})["output"]
    runner = runtimes.load(archive)
    assert len(list(private_tmp.iterdir())) == 1  # the unpacked copy lives while the runner does
    np.testing.assert_array_equal(runner.run({"x": x})["output"], expected)
    runner.close()
    del runner
    gc.collect()
    assert list(private_tmp.iterdir()) == []


# --- hostile archives -----------------------------------------------------------------------

HOSTILE = {
    "absolute": ([(member("/tmp/evil.txt"), b"x")], "absolute path"),
    "dotdot": ([(member("pkg/../../evil.txt"), b"x")], "'..'"),
    "symlink_out": ([(member("pkg/onnx/model.onnx", tarfile.SYMTYPE, link="/etc/passwd"), None)],
                    "link pointing outside"),
    "symlink_up": ([(member("pkg/onnx/model.onnx", tarfile.SYMTYPE, link="../../../x"), None)],
                   "link pointing outside"),
    "hardlink_out": ([(member("pkg/onnx/model.onnx", tarfile.LNKTYPE, link="/etc/passwd"), None)],
                     "link pointing outside"),
    "symlink_in": ([(member("pkg/onnx/model2.onnx", tarfile.SYMTYPE, link="model.onnx"), None)], "link"),
    "chardev": ([(member("pkg/null", tarfile.CHRTYPE), None)], "character device"),
    "blockdev": ([(member("pkg/sda", tarfile.BLKTYPE), None)], "block device"),
    "fifo": ([(member("pkg/pipe", tarfile.FIFOTYPE), None)], "FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("where", ["first", "last"])
def test_hostile_member_is_refused_and_nothing_is_left(case: str, where: str, onnx_pkg: Path, tmp_path: Path,
                                                       private_tmp: Path) -> None:
    hostile, words = HOSTILE[case]
    genuine = package_members(onnx_pkg)
    evil = make_tar(tmp_path / "evil.tar.gz", hostile + genuine if where == "first" else genuine + hostile)
    dest = tmp_path / "out" / "pkg"
    with pytest.raises(IntegrityError) as info:
        unpack(evil, dest)
    assert words in info.value.message and hostile[0][0].name in info.value.message
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == []
    # The same archive handed to any command: refused, exit 2, no unpacked copy left in TMPDIR.
    with pytest.raises(IntegrityError):
        Package(evil)
    assert list(private_tmp.iterdir()) == []
    assert not Path("/tmp/evil.txt").exists() or Path("/tmp/evil.txt").stat().st_mtime < time.time() - 600


def test_hostile_archive_cli_exit_code(tmp_path: Path) -> None:
    evil = make_tar(tmp_path / "evil.tar.gz", [(member("pkg/../../evil.txt"), b"x")])
    for args in (["verify", "--integrity-only"], ["verify"], ["inspect"]):
        result = run_cli(*args, str(evil))
        assert result.returncode == 2, (args, result.stderr)
        assert "'..'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path.parent / "evil.txt").exists()


def _bomb(path: Path, size: int) -> Path:
    """One member of ``size`` zero bytes: a few KB compressed, ``size`` unpacked."""

    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.left = n

        def readable(self) -> bool:
            return True

        def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
            n = min(len(buf), self.left)
            buf[:n] = bytes(n)
            self.left -= n
            return n

    info = member("pkg/onnx/model.onnx")
    info.size = size
    with gzip.open(path, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        tar.addfile(info, io.BufferedReader(Zeros(size)))
    return path


def test_decompression_bomb_by_size_is_refused_before_inflating(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.tar.gz", 64 * 1024 * 1024)
    assert bomb.stat().st_size < 200 * 1024
    started = time.perf_counter()
    with pytest.raises(IntegrityError, match="more bytes than allowed") as info:
        unpack(bomb, tmp_path / "out", max_bytes=8 * 1024 * 1024)
    assert "8388608" in info.value.message
    assert time.perf_counter() - started < 2  # refused at the header, not after inflating 64 MB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tar.gz"]


def test_decompression_bomb_by_count_is_refused(tmp_path: Path) -> None:
    many = make_tar(tmp_path / "many.tar.gz", [(member(f"pkg/f{i}"), b"") for i in range(101)])
    with pytest.raises(IntegrityError, match="too many files"):
        unpack(many, tmp_path / "out", max_files=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.tar.gz"]


def test_default_file_limit_and_env_override(tmp_path: Path) -> None:
    from packager.archive import MAX_UNPACKED_FILES

    many = make_tar(tmp_path / "many.tar.gz", [(member(f"pkg/f{i}"), b"") for i in range(MAX_UNPACKED_FILES + 1)])
    with pytest.raises(IntegrityError, match=f"at most {MAX_UNPACKED_FILES} files"):
        unpack(many, tmp_path / "out")
    bomb = _bomb(tmp_path / "bomb.tar.gz", 4 * 1024 * 1024)
    result = run_cli("verify", "--integrity-only", str(bomb), env={"PACKAGER_MAX_UNPACKED_BYTES": "1000000"})
    assert result.returncode == 2 and "PACKAGER_MAX_UNPACKED_BYTES" in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no_package"])
def test_unreadable_archives_are_input_errors(damage: str, archive: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    body = archive.read_bytes()
    bad.write_bytes({"truncated": body[: len(body) // 2], "garbage": os.urandom(4096), "empty": b"",
                     "no_package": b""}[damage])
    if damage == "no_package":
        make_tar(bad, [(member("readme.txt"), b"hello")])
    with pytest.raises(InputError):
        unpack(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]
    result = run_cli("verify", "--integrity-only", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_tampered_file_inside_a_genuine_archive_fails_its_checksum(onnx_pkg: Path, tmp_path: Path) -> None:
    members = package_members(onnx_pkg)
    members = [(info, payload[:-1] + bytes([payload[-1] ^ 1]) if info.name.endswith("model.onnx") else payload)
               for info, payload in members]
    evil = make_tar(tmp_path / "t.tar.gz", members)
    with pytest.raises(IntegrityError, match="onnx/model.onnx"):
        unpack(evil, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tar.gz"]


def test_unpack_exists_and_overwrite(archive: Path, tmp_path: Path) -> None:
    dest = unpack(archive, tmp_path / "pkg")
    with pytest.raises(ExistsError):
        unpack(archive, dest)
    assert unpack(archive, dest, overwrite=True) == dest
    assert Package(dest).manifest.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_unpacked_archive_object(archive: Path) -> None:
    unpacked = UnpackedArchive(archive)
    root = unpacked.root
    assert (root / "manifest.json").is_file()
    unpacked.cleanup()
    assert not root.exists()


# --- fuzzed archives ------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.lists(st.sampled_from(["pkg", "..", ".", "", "/", "a", "b.onnx", "manifest.json", "onnx", "C:",
                                   "\\..", "x" * 300]), min_size=1, max_size=5).map("/".join)
_kinds = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                          tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(_names, _kinds, _names, st.binary(max_size=64)), min_size=1, max_size=6))
def test_fuzzed_archives_never_escape_or_crash(entries: list, tmp_path: Path) -> None:
    import shutil
    import uuid

    work = tmp_path / uuid.uuid4().hex
    (work / "in").mkdir(parents=True)
    members = []
    for name, kind, link, payload in entries:
        info = member(name, kind, link=link)
        members.append((info, payload if kind in (tarfile.REGTYPE, tarfile.CONTTYPE) else None))
    archive = make_tar(work / "a.tar.gz", members)
    try:
        unpack(archive, work / "in" / "pkg", max_files=4)
    except InputError as exc:  # IntegrityError is an InputError: exit code 2
        assert exc.exit_code == 2
        assert tree(work / "in") == []  # nothing left behind
    else:  # only a genuine package could unpack; these never are one
        raise AssertionError("a fuzzed archive was accepted as a package")
    finally:
        outside = sorted(p.name for p in work.iterdir())
        shutil.rmtree(work)
    assert outside == ["a.tar.gz", "in"]  # nothing written beside the destination either
    assert list(tmp_path.iterdir()) == []  # nor further up
