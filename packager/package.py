"""A package on disk: atomic writing, checksums, integrity-checked reading, golden data."""

from __future__ import annotations

import errno
import io
import math
import os
import shutil
import stat
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Collection, Iterator, Literal

import numpy as np

from packager.atomic import fsync_tree, publish_mode, replace_dir, sweep_stale, temp_prefix
from packager.errors import ExistsError, ExportError, InputError, IntegrityError, ManifestError, PackagerError
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


#: Replaces the measured free space of the destination's file system, in bytes (tests, and an
#: estimate known to be wrong: ``PACKAGER_FREE_BYTES=1e12`` skips the check). Documented in README.
FREE_BYTES_ENV = "PACKAGER_FREE_BYTES"
#: errno values that mean "the disk (or the user's quota) is full".
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How frameworks word a full disk when they lose the errno (C++ writers, converters' own errors).
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")
#: Below this many free bytes after a failed write, the failure is put down to the full disk:
#: torch's C++ zip writer reports only "file write failed" / "unexpected pos".
_NEARLY_FULL = 1 << 20


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB ({n:,} bytes)"


def free_bytes(folder: Path) -> int:
    """Free bytes for an unprivileged writer in ``folder``'s file system (``PACKAGER_FREE_BYTES`` overrides)."""
    forced = os.environ.get(FREE_BYTES_ENV, "").strip()
    if forced:
        try:
            return int(float(forced))
        except ValueError:
            raise InputError(f"environment variable {FREE_BYTES_ENV}", "is not a number of bytes", got=forced,
                             fix=f"unset it, or set it to an integer such as {FREE_BYTES_ENV}=1000000000") from None
    return shutil.disk_usage(folder).free


def check_free_space(folder: Path, needed: int, what: str = "this export") -> None:
    """Refuse to start writing ``needed`` bytes into ``folder`` when its file system has less free.

    Some writers cannot fail cleanly on a full disk (torch's TorchScript and ``.pt2`` zip writer
    aborts the whole process from a C++ destructor), so the space is checked before the first byte.

    Raises:
        InputError: Naming the folder, the free and the needed bytes (exit 2).
    """
    free = free_bytes(folder)
    if needed > free:
        raise InputError(f"output folder {str(folder)!r}", f"has too little free space for {what}",
                         expected=f"at least {_size(needed)} free (estimated from the model's parameters, "
                         "the formats and the golden data, with a margin)", got=f"{_size(free)} free",
                         fix=f"free some space there or choose an --out on a larger disk; if the estimate is "
                             f"wrong, {FREE_BYTES_ENV}=<bytes> replaces the measured free space")


def is_disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) comes from a full disk or quota.

    With ``folder``: also a failed write (an ``OSError``, a framework's own exception, an
    :class:`ExportError`) while ``folder``'s file system has (almost) no space left; never a
    verdict (parity, usage) or an interrupt.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in _DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    if folder is None or not isinstance(exc, Exception) or (isinstance(exc, PackagerError)
                                                            and not isinstance(exc, ExportError)):
        return False
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:
        return False


def disk_full_error(folder: Path, exc: BaseException) -> InputError:
    """The exit-2 error for a write that ran out of space in ``folder``."""
    try:
        free = _size(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    return InputError(f"output folder {str(folder)!r}", "ran out of disk space while the package was written; "
                      "nothing was written and the partial files were removed",
                      expected="enough free space for the package", got=f"{free} free, and: {str(exc)[:300]}",
                      fix="free some space there or choose an --out on a larger disk, then export again")


class PackageWriter:
    """Builds a package in a temporary folder beside ``dest`` and renames it into place.

    An exception (or a kill) before :meth:`commit` leaves ``dest`` untouched: the temp folder
    is removed on exceptions and is a hidden ``.NAME.tmp-*`` sibling otherwise, which the next
    writer into the same folder deletes once its process is gone (:func:`sweep_stale`).

    Args:
        dest: The package folder to create.
        overwrite: Replace an existing package at ``dest`` (at commit, atomically).
        reserve: Bytes the package is expected to need: refused before anything is written when
            the file system has less free (:func:`check_free_space`).
    """

    def __init__(self, dest: str | Path, *, overwrite: bool = False, reserve: int = 0) -> None:
        self.dest = check_destination(dest, overwrite).absolute()
        self.overwrite = overwrite
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        # Sweep first: a killed export's leftovers may be what fills the disk.
        sweep_stale(self.dest, any_name=True)
        if reserve:
            check_free_space(self.dest.parent, reserve)
        self.root = Path(tempfile.mkdtemp(prefix=temp_prefix(self.dest), dir=self.dest.parent))
        self._committed = False

    def __enter__(self) -> "PackageWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        full = exc is not None and not self._committed and is_disk_full(exc, self.root)
        if not self._committed:
            shutil.rmtree(self.root, ignore_errors=True)
        if full and not isinstance(exc, InputError):
            # A full disk is the user's to fix (exit 2), whatever layer noticed it.
            raise disk_full_error(self.dest.parent, exc) from exc

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
        fsync_tree(self.root)
        if self.dest.exists():
            check_destination(self.dest, self.overwrite)
        replace_dir(self.root, self.dest, overwrite=self.overwrite)
        self._committed = True
        return self.dest


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
        public_key: PEM public key: check the package's signature (``model.sig``, see
            :mod:`packager.signing`) first, even before the manifest is read and whatever
            ``verify`` says. Default: ``$PACKAGER_PUBLIC_KEY`` if set; ``False``: no check.
    """

    def __init__(self, root: str | Path, *, verify: bool = True,
                 public_key: str | os.PathLike[str] | Literal[False] | None = None) -> None:
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
        from packager.signing import resolve_public_key, verify_signature

        #: The public key the signature was checked with (None: not checked).
        self.public_key = resolve_public_key(public_key)
        if self.public_key is not None:
            verify_signature(self.root, self.public_key)
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
        # Folders holding listed files, by their first path component ("onnx", "golden"). Files at
        # the top level (a README, the signature model.sig) are not read by runtimes and are allowed.
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


#: Deflate cannot expand more than about 1032:1; a zip that declares more is lying.
NPZ_MAX_EXPANSION = 1100


def check_npz_members(archive: zipfile.ZipFile, size: int, subject: str) -> None:
    """Refuse an ``.npz`` whose directory could make a reader allocate far more than the file
    holds (a decompression bomb): duplicate names, members that overlap (20,000 entries
    pointing at one 1 MiB member), unknown compression, or more declared bytes than the file
    can hold. Each member's ``.npy`` header must also declare exactly the bytes it stores.

    Raises:
        InputError: The first problem found (exit 2), before any array is materialised.
    """
    infos = archive.infolist()
    fix = "write the file again with numpy.savez; an .npz from an untrusted source may be an attack"
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(subject, f"lists member {dup!r} more than once (a zip bomb or a damaged file)", fix=fix)
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < end:
            raise InputError(subject, f"member {info.filename!r} overlaps the member before it (a zip bomb)", fix=fix)
        end = info.header_offset + 30 + len(info.orig_filename.encode()) + info.compress_size
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(subject, f"member {info.filename!r} uses zip compression {info.compress_type}",
                             expected="stored or deflate (numpy.savez / savez_compressed)", got=info.compress_type,
                             fix=fix)
    if end > size:
        raise InputError(subject, "lists members beyond the end of the file", expected=f"<= {size} bytes",
                         got=f"{end} bytes", fix=fix)
    declared = sum(i.file_size for i in infos)
    if declared > NPZ_MAX_EXPANSION * max(size, 1):
        raise InputError(subject, "declares more data than any .npz of its size can hold (a decompression bomb)",
                         expected=f"<= {NPZ_MAX_EXPANSION} x {size} bytes", got=f"{declared} bytes", fix=fix)
    for info in infos:
        if not info.filename.endswith(".npy"):
            continue
        with archive.open(info) as member:
            try:
                version = np.lib.format.read_magic(member)
                shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)(member)
            except (ValueError, EOFError) as exc:
                raise InputError(subject, f"member {info.filename!r} has no valid .npy header ({exc})",
                                 fix=fix) from None
            if not dtype.hasobject and member.tell() + math.prod(shape) * dtype.itemsize != info.file_size:
                raise InputError(subject, f"member {info.filename!r}: its header declares shape {shape} of "
                                 f"{dtype}, which does not match the bytes it holds",
                                 expected=f"{info.file_size - member.tell()} bytes of data",
                                 got=f"{math.prod(shape) * dtype.itemsize} bytes", fix=fix)


def load_npz(path: str | Path, data: bytes | bytearray | None = None) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` (no pickles), from ``data`` when its content is in memory.

    The zip directory and every ``.npy`` header are checked first (:func:`check_npz_members`),
    so a forged file is refused before anything is allocated.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as archive:
            check_npz_members(archive, len(data) if data is not None else os.path.getsize(path), str(path))
        if data is not None:
            arrays = _stored_npz(data)
            if arrays is not None:
                return arrays
        with np.load(io.BytesIO(data) if data is not None else path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
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
