"""Reading package archives (written by :func:`packager.packing.pack`): safe, bounded unpacking.

An archive is a gzip-compressed tar of one package folder (``NAME/manifest.json``,
``NAME/onnx/model.onnx``, ...). Packing writes only ``manifest.json`` and the files the
manifest lists (plus, for a signed package, ``model.sig`` and the other files it covers),
after checking them, in a reproducible order with fixed metadata, to a temporary file that
is renamed into place: a kill leaves no archive or the previous one.

Unpacking reads the tar as a stream and refuses, before writing the member, absolute
paths, ``..``, links, device files and FIFOs, and archives whose file count or unpacked
size exceeds a limit (decompression bombs). It extracts into a temporary folder that is
deleted on any refusal, so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from packager.errors import InputError, IntegrityError
from packager.manifest import MANIFEST_NAME

#: Archive names every command accepts in place of a package folder.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
#: Default limits on what one archive may unpack to (override per call or with the
#: environment variables PACKAGER_MAX_UNPACKED_BYTES / PACKAGER_MAX_UNPACKED_FILES).
MAX_UNPACKED_BYTES = 64 * 1024**3
MAX_UNPACKED_FILES = 10_000

_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, zlib.error, OSError)
try:  # lzma is optional in some Python builds
    import lzma

    _DECOMPRESS_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    pass


def is_archive(path: str | Path) -> bool:
    """True when ``path`` is a file named like a package archive (``.tar.gz``, ``.tgz``, ``.tar``)."""
    path = Path(path)
    return path.name.lower().endswith(ARCHIVE_SUFFIXES) and path.is_file()


def _limit(value: int | None, env: str, default: int) -> int:
    if value is not None:
        return value
    text = os.environ.get(env)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {env}", "is not an integer", got=text) from None


def _refuse(archive: Path, member: str, problem: str, *, expected: str, got: str) -> IntegrityError:
    return IntegrityError(f"archive {str(archive)!r}: member {member!r}", problem, expected=expected, got=got,
                          fix="nothing was unpacked; only unpack archives written by 'packager pack' from a "
                              "source you trust")


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    pure = PurePosixPath(name)
    if "\x00" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise _refuse(archive, name, "has an absolute path", expected="a path relative to the archive", got=name)
    if ".." in pure.parts or ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise _refuse(archive, name, "climbs out of the archive with '..'", expected="a path inside the archive",
                      got=name)
    if member.issym() or member.islnk():
        target = member.linkname
        joined = PurePosixPath(name).parent / target if member.issym() else PurePosixPath(target)
        outside = target.startswith("/") or ".." in joined.parts
        raise _refuse(archive, name, ("is a link pointing outside the archive" if outside else
                                      "is a link; packages hold regular files only"),
                      expected="a regular file", got=f"a {'symbolic' if member.issym() else 'hard'} link to {target!r}")
    if member.ischr() or member.isblk() or member.isfifo():
        kind = "character device" if member.ischr() else "block device" if member.isblk() else "FIFO"
        raise _refuse(archive, name, f"is a {kind}", expected="a regular file or folder", got=kind)
    if not (member.isreg() or member.isdir()):
        raise _refuse(archive, name, "is not a regular file or folder", got=f"tar type {member.type!r}")


def _find_root(folder: Path, archive: Path) -> Path:
    if (folder / MANIFEST_NAME).is_file():
        return folder
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST_NAME).is_file():
        return entries[0]
    raise InputError(str(archive), "holds no package", expected="one folder with manifest.json",
                     got=sorted(p.name for p in entries)[:5],
                     fix="make archives with 'packager pack PKG -o FILE.tar.gz'")


def extract(archive: str | Path, into: str | Path, *, max_bytes: int | None = None,
            max_files: int | None = None) -> Path:
    """Extract ``archive`` into the existing empty folder ``into``; return the package root in it.

    Every member is checked before it is written. On a refusal the caller removes ``into``
    (see :func:`unpack` and :func:`open_archive`, which do).

    Raises:
        IntegrityError: A member is unsafe or a limit is exceeded (naming the member and limit).
        InputError: The file is not a readable tar archive or holds no package.
    """
    archive, into = Path(archive), Path(into)
    max_bytes = _limit(max_bytes, "PACKAGER_MAX_UNPACKED_BYTES", MAX_UNPACKED_BYTES)
    max_files = _limit(max_files, "PACKAGER_MAX_UNPACKED_FILES", MAX_UNPACKED_FILES)
    count = total = 0
    try:
        # Stream mode ("r|*"): one pass, members checked as their headers arrive, so a bomb is
        # refused after reading at most the limit, never after inflating all of it.
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                _check_member(archive, member)
                count += 1
                if count > max_files:
                    raise IntegrityError(f"archive {str(archive)!r}", "holds too many files (decompression bomb?)",
                                         expected=f"at most {max_files} files", got=f"more than {max_files}",
                                         fix="raise PACKAGER_MAX_UNPACKED_FILES if you trust this archive")
                total += member.size if member.isreg() else 0
                if total > max_bytes:
                    raise IntegrityError(f"archive {str(archive)!r}", "unpacks to more bytes than allowed "
                                         "(decompression bomb?)", expected=f"at most {max_bytes} bytes",
                                         got=f"at least {total} bytes (at member {member.name!r})",
                                         fix="raise PACKAGER_MAX_UNPACKED_BYTES if you trust this archive")
                # The "data" filter re-checks paths and strips unsafe modes: a second, independent guard.
                tar.extract(member, into, filter="data", set_attrs=member.isreg())
    except IntegrityError:
        raise
    except tarfile.FilterError as exc:
        raise IntegrityError(f"archive {str(archive)!r}", f"has an unsafe member ({exc})",
                             fix="only unpack archives written by 'packager pack'") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError(f"folder {str(into)!r}", f"has no space left to unpack {archive.name}",
                             fix="free space, or point TMPDIR at a larger disk") from None
        raise InputError(str(archive), f"is not a readable package archive ({type(exc).__name__}: {exc})",
                         expected="a .tar.gz written by 'packager pack'",
                         fix="copy the archive again (it may be truncated)") from None
    except _DECOMPRESS_ERRORS as exc:
        raise InputError(str(archive), f"is not a readable package archive ({type(exc).__name__}: {exc})",
                         expected="a .tar.gz written by 'packager pack'",
                         fix="copy the archive again (it may be truncated)") from None
    return _find_root(into, archive)


class UnpackedArchive:
    """A package archive unpacked into a private temporary folder, removed by :meth:`cleanup`
    (or when this object is garbage-collected, or at interpreter exit).

    Args:
        archive: The ``.tar.gz``.
        max_bytes: Unpacked-size limit (default :data:`MAX_UNPACKED_BYTES`).
        max_files: File-count limit (default :data:`MAX_UNPACKED_FILES`).
    """

    def __init__(self, archive: str | Path, *, max_bytes: int | None = None, max_files: int | None = None) -> None:
        self.archive = Path(archive)
        self._tmp = tempfile.TemporaryDirectory(prefix="packager-unpacked-")
        try:
            self.root: Path = extract(self.archive, self._tmp.name, max_bytes=max_bytes, max_files=max_files)
        except BaseException:
            self._tmp.cleanup()
            raise

    def cleanup(self) -> None:
        """Delete the unpacked files."""
        self._tmp.cleanup()


def open_archive(archive: str | Path, **limits: int | None) -> UnpackedArchive:
    """Unpack ``archive`` into a private temporary folder (see :class:`UnpackedArchive`)."""
    return UnpackedArchive(archive, **limits)
