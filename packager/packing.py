"""Writing packages for distribution: ``pack`` (a reproducible ``.tar.gz``), ``unpack`` to a
folder, and ``sign`` (OpenSSF Model Signing). Tooling above the package-format core: it opens
packages to check them first, while the core's readers (:mod:`packager.archive`,
:mod:`packager.signing`) never import it, so the core has no import cycle.

Packing writes only ``manifest.json`` and the files the manifest lists (plus, for a signed
package, ``model.sig`` and the other files it covers), after checking them, in a reproducible
order with fixed metadata, to a temporary file that is renamed into place: a kill leaves no
archive or the previous one.
"""

from __future__ import annotations

import gzip
import os
import secrets
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packager.archive import extract, is_archive
from packager.atomic import fsync_path, publish_mode, replace_dir, sweep_stale, temp_prefix
from packager.errors import ExistsError, InputError
from packager.manifest import MANIFEST_NAME
from packager.package import Package, check_destination
from packager.signing import _hashing, _key_file, _model_signing, is_signed, package_files, signature_path


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` wrote."""

    path: Path
    files: int
    bytes: int


def pack(package: str | Path, out: str | Path, *, overwrite: bool = False) -> PackResult:
    """Write a verified package folder as a reproducible ``.tar.gz``.

    The archive holds ``manifest.json`` and the files it lists; for a signed package (with
    ``model.sig``) also the signature and every other file it covers.

    Args:
        package: Package folder (its integrity is checked first; a damaged package is not packed).
        out: Archive to write (``.tar.gz`` or ``.tgz``).
        overwrite: Replace an existing archive (atomically).

    Raises:
        IntegrityError: The package fails its checksums.
        ExistsError: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if not out.name.lower().endswith((".tar.gz", ".tgz")):
        raise InputError(f"--out {str(out)!r}", "is not a .tar.gz name", expected="NAME.tar.gz or NAME.tgz",
                         got=out.name, fix=f"use -o {out.name}.tar.gz")
    if out.exists() and (not overwrite or not out.is_file()):
        raise ExistsError(str(out), "already exists" if out.is_file() else "exists and is not a file",
                          fix="pass --overwrite to replace it, or choose another -o")
    pkg = Package(package)  # fails closed on any integrity problem before a byte is archived
    if pkg.unpacked is not None:
        top = pkg.root.name
    else:
        top = Path(package).resolve().name
    top = top if top not in ("", ".", "..") else pkg.manifest.name
    listed = {e.path for e in pkg.manifest.all_files()}
    if is_signed(pkg.root):
        # The signature covers every file of the folder: the archive carries them all, so that it
        # still verifies once unpacked ('packager verify model.tar.gz --public-key pub.pem').
        listed |= set(package_files(pkg.root)) - {MANIFEST_NAME}
    paths = [MANIFEST_NAME] + sorted(listed)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(out), dir=out.parent)
    tmp = Path(tmp_name)
    total = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            # mtime=0 and an empty file name in the gzip header: same package, same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for rel in paths:
                        src = pkg.resolve(rel)
                        info = tarfile.TarInfo(f"{top}/{rel}")
                        info.size = src.stat().st_size
                        info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
                        with open(src, "rb") as fh:
                            tar.addfile(info, fh)
                        total += info.size
            raw.flush()
            os.fsync(raw.fileno())
        publish_mode(tmp, folder=False)
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                # link() fails if out appeared meanwhile: another writer's archive is never clobbered.
                os.link(tmp, out)
            except FileExistsError:
                raise ExistsError(str(out), "already exists", fix="pass --overwrite to replace it") from None
            except OSError:  # no hard links on this file system: check, then rename
                if out.exists():
                    raise ExistsError(str(out), "already exists", fix="pass --overwrite to replace it") from None
                os.replace(tmp, out)
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    return PackResult(path=out, files=len(paths), bytes=total)


def unpack(archive: str | Path, dest: str | Path, *, overwrite: bool = False, max_bytes: int | None = None,
           max_files: int | None = None) -> Path:
    """Unpack a package archive to the folder ``dest`` and check its integrity.

    Extracts beside ``dest`` and renames into place only after every check passed; a
    refused archive leaves nothing behind.

    Raises:
        IntegrityError: An unsafe member, a limit exceeded, or a checksum mismatch.
        ExistsError: ``dest`` exists and ``overwrite`` is false.
    """
    dest = check_destination(dest, overwrite).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)
    work = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=dest.parent))
    try:
        root = extract(archive, work, max_bytes=max_bytes, max_files=max_files)
        Package(root)  # checksums and unlisted files, before the package becomes visible
        publish_mode(root, folder=True)
        if root != work:
            # Move the package folder up so ``work`` itself becomes the package.
            staged = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=dest.parent))
            staged.rmdir()
            os.rename(root, staged)
            shutil.rmtree(work)
            work = staged
        replace_dir(work, dest, overwrite=overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def sign(package_dir: str | os.PathLike[str], key: str | os.PathLike[str], *, overwrite: bool = False,
         password: str | None = None) -> Path:
    """Sign every file of a package folder with an elliptic-curve private key (PEM).

    The package's integrity is checked first (a damaged package is not signed). The signature is
    written to a hidden temporary file and moved to ``package_dir/model.sig`` in one step.

    Args:
        package_dir: Package folder (not an archive: sign the folder, then ``packager pack`` it).
        key: PEM private key (P-256, P-384 or P-521).
        overwrite: Replace an existing signature.
        password: Password of an encrypted private key.

    Returns:
        The signature file.

    Raises:
        ExistsError: A signature exists and ``overwrite`` is false.
        InputError: The key cannot be used, or the path is not a package folder.
        IntegrityError: The package fails its checksums.
    """
    root = Path(package_dir)
    if is_archive(root):
        raise InputError(str(root), "is an archive; only package folders are signed",
                         fix="sign the package folder, then pack it: packager sign PKG --key KEY && "
                             "packager pack PKG -o FILE.tar.gz (the archive keeps the signature)")
    sig = signature_path(root)
    if (sig.exists() or sig.is_symlink()) and not overwrite:
        raise ExistsError(str(sig), "already exists", fix="pass --overwrite (overwrite=True) to sign again")
    key_path = _key_file(key, "private key", "--key")
    Package(root, public_key=False)  # checksums and unlisted files: never sign a damaged package
    ms = _model_signing()
    try:
        config = ms.signing.Config().use_elliptic_key_signer(private_key=key_path, password=password)
    except Exception as exc:  # bad PEM, a public key, RSA, an unsupported curve, a missing password
        raise InputError(f"private key {str(key_path)!r}", "cannot be used to sign",
                         expected="a PEM elliptic-curve private key (P-256, P-384 or P-521)",
                         got=f"{type(exc).__name__}: {exc}",
                         fix="create one with: openssl ecparam -name prime256v1 -genkey -noout -out key.pem") from None
    config.set_hashing_config(_hashing(ms))
    sweep_stale(sig)  # a killed signer's temporary file would otherwise be signed too
    # Not created before hashing (so it is not hashed); the library writes it after signing.
    tmp = root / f"{temp_prefix(sig)}{secrets.token_hex(4)}"
    try:
        try:
            config.sign(root, tmp)
        except ValueError as exc:  # e.g. a link in the package
            raise InputError(f"package {str(root)!r}", f"cannot be signed ({exc})",
                             fix="copy the package without links, or re-export it") from None
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, sig)
        else:
            try:
                os.link(tmp, sig)  # fails if a signature appeared meanwhile
            except FileExistsError:
                raise ExistsError(str(sig), "already exists", fix="pass --overwrite to sign again") from None
            except OSError:  # no hard links on this file system
                if sig.exists():
                    raise ExistsError(str(sig), "already exists", fix="pass --overwrite to sign again") from None
                os.replace(tmp, sig)
        fsync_path(root)
    finally:
        tmp.unlink(missing_ok=True)
    return sig
