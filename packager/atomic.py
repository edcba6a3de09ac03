"""Atomic publishing: a temp sibling of the destination, fsync, then exchange or rename.

Every writer of packager goes through here (packages, archives, signatures, batch outputs,
callbacks): temporaries are hidden siblings (``.NAME.tmp-HOST-PID-*`` for folders and archives,
``.NAME.tmp-*`` for batch files) on the destination's file system, flushed before they are
renamed into place, and the leftovers of killed processes are swept by PID.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from packager.errors import ExistsError


def fsync_tree(root: Path) -> None:
    """Flush every file and folder entry under ``root``."""
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


def umask() -> int:
    """The process umask."""
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
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def temp_prefix(dest: Path, kind: str = "tmp") -> str:
    """Name prefix of a temporary sibling of ``dest``: hidden, and tagged with host and PID so a
    later run can tell the leftovers of a killed process from a write still in progress."""
    return f".{dest.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def sweep_stale(dest: Path, *, any_name: bool = False) -> list[Path]:
    """Delete temporary siblings of ``dest`` left by killed processes of this host.

    Only entries whose recorded PID no longer runs on this host are removed: a write in
    progress elsewhere (another process, another machine on a shared disk) is never touched.
    ``any_name``: also those of other destinations in the same folder (an export killed by a
    full disk, or aborted inside a framework's C++ writer, leaves ``.OTHER.tmp-HOST-PID-*``
    filling the disk that the next export to a new name needs).
    """
    host = socket.gethostname()
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{dest.name}.{kind}-{host}-"
        pattern = f".*.{kind}-{glob.escape(host)}-*" if any_name else f"{glob.escape(prefix)}*"
        for entry in dest.parent.glob(pattern):
            pid_text = entry.name.rsplit(f".{kind}-{host}-", 1)[-1].split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or pid_alive(int(pid_text)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


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
        try:
            os.rename(src, dest)
        except BaseException:
            # Put the previous package back before anything cleans up: the caller's temp
            # folder (and ``old``) must never be the only copy of the last good package.
            os.rename(old / "pkg", dest)
            shutil.rmtree(old, ignore_errors=True)
            raise
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


def atomic_path(target: Path, tmp_dir: Path | None = None) -> Path:
    """A fresh temp path beside ``target`` (or in ``tmp_dir`` on the same filesystem), for ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=tmp_dir or target.parent)
    # What open() would give under the umask (mkstemp alone gives 0600).
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    return Path(tmp)


def commit_file(tmp: Path, target: Path) -> None:
    """Flush ``tmp`` and rename it onto ``target`` (then flush the folder entry)."""
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)
