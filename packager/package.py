"""A package on disk: atomic writing, checksums, integrity-checked reading, golden data."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
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


class PackageWriter:
    """Builds a package in a temporary folder beside ``dest`` and renames it into place.

    An exception (or a kill) before :meth:`commit` leaves ``dest`` untouched: the temp folder
    is removed on exceptions and is a hidden ``.NAME.tmp-*`` sibling otherwise.
    """

    def __init__(self, dest: str | Path, *, overwrite: bool = False) -> None:
        self.dest = check_destination(dest, overwrite).absolute()
        self.overwrite = overwrite
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
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
        """Write the manifest, flush everything and move the package into place."""
        (self.root / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        _fsync_tree(self.root)
        old = None
        if self.dest.exists():
            check_destination(self.dest, self.overwrite)
            old = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.old-", dir=self.dest.parent))
            os.rename(self.dest, old / "pkg")
        os.rename(self.root, self.dest)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest


class Package:
    """An exported package opened for reading.

    Args:
        root: The package folder.
        verify: Check every listed file's size and SHA-256 before anything reads it.
    """

    def __init__(self, root: str | Path, *, verify: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(str(self.root), "is not a package folder", expected="a folder with manifest.json",
                             got="missing" if not self.root.exists() else "a file",
                             fix="pass the folder written by 'packager export'")
        self.manifest: Manifest = load_manifest(self.root)
        if verify:
            self.verify_integrity()

    def resolve(self, relative: str) -> Path:
        """Absolute path of a package-relative path; refuses paths that escape the package."""
        if os.path.isabs(relative) or ".." in Path(relative).parts:
            raise ManifestError(f"{MANIFEST_NAME}: path {relative!r}", "escapes the package folder",
                                expected="a relative path inside the package", got=relative)
        return self.root / relative

    def verify_integrity(self, entries: list[FileEntry] | None = None) -> None:
        """Check that every listed file exists with its recorded size and SHA-256.

        Raises:
            IntegrityError: Naming the first file that is missing or differs.
        """
        for entry in entries if entries is not None else self.manifest.all_files():
            path = self.resolve(entry.path)
            if not path.is_file() or path.is_symlink():
                raise IntegrityError(f"package file {entry.path!r}", "is missing" if not path.exists()
                                     else "is not a regular file", expected="the file listed in manifest.json",
                                     got="nothing" if not path.exists() else "a link or folder",
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
    return (Path(path) / MANIFEST_NAME).is_file()
