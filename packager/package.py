"""A package on disk: atomic writing, checksums, integrity-checked reading, golden data."""

from __future__ import annotations

import ctypes
import errno
import glob
import io
import math
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Collection, Iterator

import numpy as np

from packager.errors import ExistsError, InputError, IntegrityError, ManifestError
from packager.digests import Span, chunk_digests, chunk_size, digest_spans, sha256_file, spans_of
from packager.manifest import MANIFEST_NAME, Chunks, FileEntry, Manifest, load_manifest

GOLDEN_INPUTS = "golden/inputs.npz"
GOLDEN_OUTPUTS = "golden/outputs.npz"
#: ``verify_integrity(keep=...)`` keeps verified files up to this size in memory, this many bytes in all.
KEEP_FILE_LIMIT = 64 << 20
KEEP_TOTAL_LIMIT = 256 << 20


def file_entry(root: Path, path: Path) -> FileEntry:
    """FileEntry of one file (path relative to ``root``), with per-chunk digests when it is large."""
    size = path.stat().st_size
    chunk = chunk_size(size)
    chunks = Chunks(size=chunk, sha256=chunk_digests(path, size, chunk)) if chunk else None
    return FileEntry(path=path.relative_to(root).as_posix(), sha256=sha256_file(path), size=size, chunks=chunks)


def file_entries(root: Path, target: Path) -> list[FileEntry]:
    """FileEntry for ``target`` (a file, or every file below a folder), relative to ``root``."""
    paths = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return [file_entry(root, p) for p in paths]


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
        self._bytes: dict[str, bytearray] = {}
        if verify:
            self.verify_integrity()

    def resolve(self, relative: str) -> Path:
        """Absolute path of a package-relative path; refuses paths that escape the package."""
        if "\x00" in relative or os.path.isabs(relative) or ".." in relative.split("/"):
            raise ManifestError(f"{MANIFEST_NAME}: path {relative!r}", "escapes the package folder",
                                expected="a relative path inside the package", got=relative)
        return self.root / relative

    def verify_integrity(self, entries: list[FileEntry] | None = None, *,
                         keep: Collection[str] = ()) -> IntegrityReport:
        """Check every listed file (size, SHA-256) and that no unlisted file sits beside them.

        Runs before any framework sees a byte. "Beside them" means inside a folder that holds
        listed files (an artifact folder, ``golden/``): a file dropped there (say an ONNX
        external-data file, or extra SavedModel variables) could be read by a runtime.

        Args:
            entries: Only these files (default: every listed file).
            keep: Files whose verified content stays in memory for :meth:`take_bytes` (up to
                ``KEEP_FILE_LIMIT`` each, ``KEEP_TOTAL_LIMIT`` in all): what the caller then
                parses is exactly what was hashed, and no file is read twice.

        Raises:
            IntegrityError: Naming the first file that is missing, differs, is a link, or is unlisted.
        """
        try:
            return self._verify_integrity(entries, set(keep))
        except OSError as exc:  # e.g. a name too long for this file system, a permission error
            raise IntegrityError(f"package file {exc.filename!r}", f"cannot be read ({exc.strerror})",
                                 fix="copy the whole package again, or re-export it") from None

    def _verify_integrity(self, entries: list[FileEntry] | None, keep: set[str]) -> IntegrityReport:
        started = time.perf_counter()
        entries = entries if entries is not None else self.manifest.all_files()
        listed: set[str] = set()
        total = kept = 0
        # Every file's type and size first, then all digests at once on every core.
        work: list[tuple[FileEntry, bytearray | None, int]] = []
        spans: list[Span] = []
        for entry in entries:
            try:
                self._check_file(entry)
            except OSError as exc:  # unreadable, name too long for this file system, ...
                raise IntegrityError(f"package file {entry.path!r}", f"cannot be read ({exc.strerror or exc})",
                                     expected="a readable file listed in manifest.json", got=type(exc).__name__,
                                     fix="copy the whole package again, or re-export it") from None
            kept_here = entry.path in keep and entry.size <= KEEP_FILE_LIMIT and kept + entry.size <= KEEP_TOTAL_LIMIT
            data = bytearray(entry.size) if kept_here else None  # filled by the hashing threads
            parts = spans_of(self.resolve(entry.path), entry.size, entry.chunks.size if entry.chunks else None,
                             into=memoryview(data) if data is not None else None)
            work.append((entry, data, len(parts)))
            spans += parts
            total += entry.size
            kept += entry.size if kept_here else 0
            listed.add(Path(entry.path).as_posix())
        try:
            digests = iter(digest_spans(spans))
        except OSError as exc:
            raise IntegrityError(f"package file {exc.filename or '(one of the listed files)'!r}",
                                 f"cannot be read ({exc.strerror or exc})", expected="a readable file",
                                 got=type(exc).__name__, fix="copy the whole package again, or re-export it") from None
        for entry, data, count in work:
            got = [next(digests) for _ in range(count)]
            want = entry.chunks.sha256 if entry.chunks else [entry.sha256]
            bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            if bad is not None:
                where = f" in the chunk at byte {bad * entry.chunks.size}" if entry.chunks else ""
                raise IntegrityError(f"package file {entry.path!r}", f"fails its SHA-256 check (modified{where})",
                                     expected=want[bad][:16] + "…", got=got[bad][:16] + "…",
                                     fix="copy the whole package again, or re-export it")
            if data is not None:
                self._bytes[entry.path] = data
        self._check_unlisted(listed)
        return IntegrityReport(files=len(listed), bytes=total, seconds=time.perf_counter() - started)

    def _check_file(self, entry: FileEntry) -> None:
        """Check one listed file's type and size."""
        path = self.resolve(entry.path)
        try:
            info = os.lstat(path)  # one call: type, size, and no link followed
        except (FileNotFoundError, NotADirectoryError):
            raise IntegrityError(f"package file {entry.path!r}", "is missing",
                                 expected="the file listed in manifest.json", got="nothing",
                                 fix="copy the whole package again, or re-export it") from None
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"package file {entry.path!r}", "is not a regular file",
                                 expected="the file listed in manifest.json", got="a link or folder",
                                 fix="copy the whole package again (without links), or re-export it")
        if info.st_size != entry.size:
            raise IntegrityError(f"package file {entry.path!r}", "has the wrong size (modified or truncated)",
                                 expected=f"{entry.size} bytes", got=f"{info.st_size} bytes",
                                 fix="copy the whole package again, or re-export it")

    def _check_unlisted(self, listed: set[str]) -> None:
        # Folders holding listed files, by their first path component ("onnx", "golden").
        tops = {p.split("/", 1)[0] for p in listed if "/" in p}
        for top in sorted(tops):
            base = self.root / top
            if base.is_symlink():
                raise IntegrityError(f"package folder {top!r}", "is a link", expected="a real folder",
                                     got=f"a link to {os.readlink(base)!r}", fix="copy the package without links")
            folders = [top]
            while folders:
                folder = folders.pop()
                with os.scandir(self.root / folder) as found:
                    entries = sorted(found, key=lambda e: e.name)
                for item in entries:
                    rel = f"{folder}/{item.name}"
                    if item.is_symlink():
                        raise IntegrityError(f"package file {rel!r}", "is a link, which packages never contain",
                                             expected="regular files only", got=f"a link to {os.readlink(item.path)!r}",
                                             fix="copy the package without links, or re-export it")
                    if item.is_dir():
                        folders.append(rel)
                    elif rel not in listed:
                        raise IntegrityError(f"package file {rel!r}", "is not listed in manifest.json, but sits "
                                             "where the runtime reads files", expected="only listed files",
                                             got="an unlisted file",
                                             fix="remove the file, or re-export the package")

    def take_bytes(self, relative: str) -> bytes | bytearray | None:
        """Hand over the verified in-memory copy of a file (``verify_integrity(keep=...)``), or None; the
        package lets go of it, so that it is freed as soon as the caller is done."""
        return self._bytes.pop(relative, None)

    def golden(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Golden inputs and reference outputs stored at export time."""
        golden = self.manifest.golden
        if golden is None:
            raise ManifestError(f"{self.root}", "has no golden data", fix="re-export the package")
        return tuple(load_npz(self.resolve(f.path), data=self.take_bytes(f.path))  # type: ignore[return-value]
                     for f in (golden.inputs, golden.outputs))

    def artifacts(self) -> Iterator:
        return iter(self.manifest.artifacts)


def load_npz(path: str | Path, data: bytes | bytearray | None = None) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` (no pickles), from ``data`` when its content is in memory."""
    try:
        if data is not None:
            arrays = _stored_npz(data)
            if arrays is not None:
                return arrays
        with np.load(io.BytesIO(data) if data is not None else path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(str(path), f"cannot be read as .npz ({exc})", fix="save it with numpy.savez") from None


def _stored_npz(data: bytes | bytearray) -> dict[str, np.ndarray] | None:
    """The arrays of an uncompressed ``.npz`` (what ``np.savez`` writes) already in memory and
    verified, or None for anything else (compressed members: ``np.load`` reads those).

    ``np.load`` re-reads each member through ``zipfile``, whose CRC-32 pass costs more than the
    arrays themselves here; the package's SHA-256 has already covered every byte.
    """
    arrays = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                return None
            at = info.header_offset  # the local header: 30 bytes, then the name and an extra field
            if data[at:at + 4] != b"PK\x03\x04":
                raise ValueError(f"member {info.filename!r} has no local header")
            start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30],
                                                                                                 "little")
            member = io.BytesIO(data[start:start + min(info.file_size, 1 << 16)])
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(member)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename!r} holds Python objects (pickles are refused)")
            count = math.prod(shape)
            if member.tell() + count * dtype.itemsize != info.file_size:
                raise ValueError(f"member {info.filename!r}: its header does not match its size")
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=start + member.tell())
            # A copy: callers get writable arrays, as from np.load.
            arrays[info.filename[:-4]] = flat.reshape(shape, order="F" if fortran else "C").copy()
    return arrays


def is_package(path: str | Path) -> bool:
    """True for a package folder (with ``manifest.json``) or a package archive (``.tar.gz``)."""
    from packager.archive import is_archive

    return (Path(path) / MANIFEST_NAME).is_file() or is_archive(path)
