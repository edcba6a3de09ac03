"""A package on disk: atomic writing, checksums, integrity-checked reading, golden data."""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Iterator

import numpy as np

from packager.errors import ExistsError, InputError, IntegrityError, ManifestError
from packager.manifest import MANIFEST_NAME, FileEntry, Manifest, load_manifest

GOLDEN_INPUTS = "golden/inputs.npz"
GOLDEN_OUTPUTS = "golden/outputs.npz"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: Path, target: Path) -> list[FileEntry]:
    """FileEntry for ``target`` (a file, or every file below a folder), relative to ``root``."""
    paths = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return [FileEntry(path=p.relative_to(root).as_posix(), sha256=sha256_file(p), size=p.stat().st_size)
            for p in paths]


def _fsync_tree(root: Path) -> None:
    # Flush file contents and directory entries so a crash after rename cannot expose
    # a package whose files are still empty in the page cache.
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_destination(dest: str | Path, overwrite: bool) -> Path:
    """Refuse an existing destination unless ``overwrite`` (raised before any work is done)."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise ExistsError(str(dest), "already exists", fix="pass --overwrite (overwrite=True) to replace it, "
                          "or choose another --out")
    if dest.exists() and not dest.is_dir():
        raise ExistsError(str(dest), "exists and is not a package folder", fix="choose another --out")
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST_NAME).exists():
        raise ExistsError(str(dest), "exists, is not empty and is not a package; refusing to replace it",
                          fix="choose another --out")
    return dest


def _umask() -> int:
    # Read without os.umask(), which would briefly change it for every thread.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def publish_mode(path: Path, *, folder: bool) -> None:
    """Give a temporary file/folder (created 0600/0700 by tempfile) the permissions a normal
    file/folder would get under the user's umask, before it is renamed into place."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def temp_prefix(dest: Path, kind: str = "tmp") -> str:
    """Name prefix of a temporary sibling of ``dest``: hidden, and tagged with host and PID so a
    later run can tell the leftovers of a killed process from a write still in progress."""
    return f".{dest.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def sweep_stale(dest: Path) -> list[Path]:
    """Delete temporary siblings of ``dest`` left by killed processes of this host.

    Only entries whose recorded PID no longer runs on this host are removed: a write in
    progress elsewhere (another process, another machine on a shared disk) is never touched.
    """
    host = socket.gethostname()
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{dest.name}.{kind}-{host}-"
        for entry in dest.parent.glob(f"{glob.escape(prefix)}*"):
            pid_text = entry.name[len(prefix):].split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class PackageWriter:
    """Builds a package in a temporary folder beside ``dest`` and renames it into place.

    An exception (or a kill) before :meth:`commit` leaves ``dest`` untouched: the temp folder
    is removed on exceptions and is a hidden ``.NAME.tmp-*`` sibling otherwise.
    """

    def __init__(self, dest: str | Path, *, overwrite: bool = False) -> None:
        self.dest = check_destination(dest, overwrite).absolute()
        self.overwrite = overwrite
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.dest)
        self.root = Path(tempfile.mkdtemp(prefix=temp_prefix(self.dest), dir=self.dest.parent))
        self._committed = False

    def __enter__(self) -> "PackageWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._committed:
            shutil.rmtree(self.root, ignore_errors=True)

    def path(self, relative: str) -> Path:
        """Absolute path inside the package being written (parents created)."""
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def files(self, relative: str) -> list[FileEntry]:
        return file_entries(self.root, self.root / relative)

    def write_npz(self, relative: str, arrays: dict[str, np.ndarray]) -> FileEntry:
        target = self.path(relative)
        with open(target, "wb") as fh:
            np.savez(fh, **arrays)
        return file_entries(self.root, target)[0]

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest, flush everything and move the package into place.

        With ``overwrite`` the old package is swapped out in one atomic step where the
        platform allows it (Linux ``renameat2(RENAME_EXCHANGE)``): readers and a kill at
        any moment see either the old or the new complete package, never neither.
        """
        (self.root / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        publish_mode(self.root, folder=True)
        _fsync_tree(self.root)
        if self.dest.exists():
            check_destination(self.dest, self.overwrite)
        replace_dir(self.root, self.dest, overwrite=self.overwrite)
        self._committed = True
        return self.dest


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)`` via libc; False where the call or flag is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):  # musl/old glibc without the wrapper
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    # ENOSYS: old kernel; EINVAL: the file system does not support the flag (some FUSE, NFS).
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


#: How the last :func:`replace_dir` moved a folder into place ("exchange", "noreplace", "rename").
last_replace_method: str = ""


def fsync_path(path: Path) -> None:
    """Flush a file's contents or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(src: Path, dest: Path, *, overwrite: bool = True) -> None:
    """Move folder ``src`` to ``dest`` (same file system), replacing a previous ``dest`` atomically.

    On Linux an existing ``dest`` is swapped with ``src`` in one ``RENAME_EXCHANGE`` and the
    old tree (now at ``src``) is deleted afterwards, so ``dest`` always holds a complete
    package. Elsewhere it falls back to two renames: for a moment there is no ``dest`` (but
    never a partial one) and the old tree waits in a hidden ``.NAME.old-*`` sibling.

    Raises:
        ExistsError: ``overwrite`` is false and ``dest`` exists (or appeared meanwhile).
    """
    global last_replace_method
    src, dest = Path(src), Path(dest)
    if dest.exists() and not overwrite:
        raise ExistsError(str(dest), "appeared while the package was being written", fix="pass --overwrite, "
                          "or choose another --out")
    if dest.exists():
        if _renameat2(src, dest, _RENAME_EXCHANGE):
            last_replace_method = "exchange"
            fsync_path(dest.parent)
            shutil.rmtree(src, ignore_errors=True)  # src now holds the old package
            return
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(dest, "old"), dir=dest.parent))
        os.rename(dest, old / "pkg")
        os.rename(src, dest)
        last_replace_method = "rename"
        fsync_path(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    # RENAME_NOREPLACE: a package another process committed meanwhile is never clobbered.
    try:
        if _renameat2(src, dest, _RENAME_NOREPLACE):
            last_replace_method = "noreplace"
        else:
            os.rename(src, dest)  # still refuses a non-empty dest (ENOTEMPTY)
            last_replace_method = "rename"
    except (FileExistsError, OSError) as exc:
        if not dest.exists():
            raise
        raise ExistsError(str(dest), f"appeared while the package was being written ({exc.strerror})",
                          fix="pass --overwrite, or choose another --out") from None
    fsync_path(dest.parent)


@dataclass(frozen=True)
class IntegrityReport:
    """What :meth:`Package.verify_integrity` checked."""

    files: int
    bytes: int
    seconds: float


class Package:
    """An exported package opened for reading.

    Args:
        root: The package folder, or a ``.tar.gz`` from ``packager pack`` (unpacked, with
            every safety check, into a temporary folder that lives as long as this object).
        verify: Check every listed file's size and SHA-256, and that no unlisted file sits
            beside them, before anything reads them.
    """

    def __init__(self, root: str | Path, *, verify: bool = True) -> None:
        from packager.archive import is_archive, open_archive

        #: What the user passed (folder or archive); ``root`` is where the files are.
        self.source = Path(root)
        self.root = self.source
        #: The temporary unpacked copy when ``root`` is an archive (deleted with this object).
        self.unpacked = None
        if is_archive(self.source):
            self.unpacked = open_archive(self.source)
            self.root = self.unpacked.root
        if not self.root.is_dir():
            raise InputError(str(self.root), "is not a package folder or archive",
                             expected="a folder with manifest.json, or a .tar.gz from 'packager pack'",
                             got="missing" if not self.root.exists() else "a file",
                             fix="pass the folder written by 'packager export' or the archive from 'packager pack'")
        self.manifest: Manifest = load_manifest(self.root)
        if verify:
            self.verify_integrity()

    def resolve(self, relative: str) -> Path:
        """Absolute path of a package-relative path; refuses paths that escape the package."""
        if "\x00" in relative or os.path.isabs(relative) or ".." in Path(relative).parts:
            raise ManifestError(f"{MANIFEST_NAME}: path {relative!r}", "escapes the package folder",
                                expected="a relative path inside the package", got=relative)
        return self.root / relative

    def verify_integrity(self, entries: list[FileEntry] | None = None) -> IntegrityReport:
        """Check every listed file (size, SHA-256) and that no unlisted file sits beside them.

        Runs before any framework sees a byte. "Beside them" means inside a folder that holds
        listed files (an artifact folder, ``golden/``): a file dropped there (say an ONNX
        external-data file, or extra SavedModel variables) could be read by a runtime.

        Raises:
            IntegrityError: Naming the first file that is missing, differs, is a link, or is unlisted.
        """
        try:
            return self._verify_integrity(entries)
        except OSError as exc:  # e.g. a name too long for this file system, a permission error
            raise IntegrityError(f"package file {exc.filename!r}", f"cannot be read ({exc.strerror})",
                                 fix="copy the whole package again, or re-export it") from None

    def _verify_integrity(self, entries: list[FileEntry] | None) -> IntegrityReport:
        started = time.perf_counter()
        entries = entries if entries is not None else self.manifest.all_files()
        listed = set()
        total = 0
        for entry in entries:
            try:
                total += self._check_file(entry)
            except OSError as exc:  # unreadable, name too long for this file system, ...
                raise IntegrityError(f"package file {entry.path!r}", f"cannot be read ({exc.strerror or exc})",
                                     expected="a readable file listed in manifest.json", got=type(exc).__name__,
                                     fix="copy the whole package again, or re-export it") from None
            listed.add(Path(entry.path).as_posix())
        self._check_unlisted(listed)
        return IntegrityReport(files=len(listed), bytes=total, seconds=time.perf_counter() - started)

    def _check_file(self, entry: FileEntry) -> int:
        """Check one listed file; return its size."""
        path = self.resolve(entry.path)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise IntegrityError(f"package file {entry.path!r}", "is not a regular file",
                                 expected="the file listed in manifest.json", got="a link or folder",
                                 fix="copy the whole package again (without links), or re-export it")
        if not path.is_file():
            raise IntegrityError(f"package file {entry.path!r}", "is missing",
                                 expected="the file listed in manifest.json", got="nothing",
                                 fix="copy the whole package again, or re-export it")
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"package file {entry.path!r}", "has the wrong size (modified or truncated)",
                                 expected=f"{entry.size} bytes", got=f"{size} bytes",
                                 fix="copy the whole package again, or re-export it")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise IntegrityError(f"package file {entry.path!r}", "fails its SHA-256 check (modified)",
                                 expected=entry.sha256[:16] + "…", got=digest[:16] + "…",
                                 fix="copy the whole package again, or re-export it")
        return size

    def _check_unlisted(self, listed: set[str]) -> None:
        # Folders holding listed files, by their first path component ("onnx", "golden").
        tops = {p.split("/", 1)[0] for p in listed if "/" in p}
        for top in sorted(tops):
            base = self.root / top
            if base.is_symlink():
                raise IntegrityError(f"package folder {top!r}", "is a link", expected="a real folder",
                                     got=f"a link to {os.readlink(base)!r}", fix="copy the package without links")
            for dirpath, dirnames, filenames in os.walk(base):
                for name in sorted(dirnames + filenames):
                    full = Path(dirpath) / name
                    rel = full.relative_to(self.root).as_posix()
                    if full.is_symlink():
                        raise IntegrityError(f"package file {rel!r}", "is a link, which packages never contain",
                                             expected="regular files only", got=f"a link to {os.readlink(full)!r}",
                                             fix="copy the package without links, or re-export it")
                    if name in filenames and rel not in listed:
                        raise IntegrityError(f"package file {rel!r}", "is not listed in manifest.json, but sits "
                                             "where the runtime reads files", expected="only listed files",
                                             got="an unlisted file",
                                             fix="remove the file, or re-export the package")

    def golden(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Golden inputs and reference outputs stored at export time."""
        golden = self.manifest.golden
        if golden is None:
            raise ManifestError(f"{self.root}", "has no golden data", fix="re-export the package")
        return load_npz(self.resolve(golden.inputs.path)), load_npz(self.resolve(golden.outputs.path))

    def artifacts(self) -> Iterator:
        return iter(self.manifest.artifacts)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(str(path), f"cannot be read as .npz ({exc})", fix="save it with numpy.savez") from None


def is_package(path: str | Path) -> bool:
    """True for a package folder (with ``manifest.json``) or a package archive (``.tar.gz``)."""
    from packager.archive import is_archive

    return (Path(path) / MANIFEST_NAME).is_file() or is_archive(path)
