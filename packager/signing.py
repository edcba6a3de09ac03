"""Signed packages: a detached OpenSSF Model Signing signature over every file of a package.

``packager.packing.sign(PKG, key.pem)`` writes ``PKG/model.sig`` (:data:`SIGNATURE_NAME`), a Sigstore bundle made
with the `model-signing <https://pypi.org/project/model-signing/>`_ library and an elliptic-curve
private key (P-256, P-384 or P-521, PEM). It covers every regular file under the package folder
(``manifest.json``, the artifacts, the golden data and any other file there, such as verify
reports) except the signature itself: SHA-256 of each file, by path, signed as one payload.

``verify_signature(PKG, pub.pem)`` re-hashes the folder and checks it against the signed payload
with the public key; any difference (a changed, added or removed file, another key, a damaged or
missing signature) raises :class:`~packager.errors.SignatureVerificationError` (exit 2).

Loading checks the signature first whenever a public key is in effect: ``public_key=`` in
``runtimes.load`` / :class:`~packager.package.Package`, ``--public-key`` on the command line, or
the environment variable :data:`PUBLIC_KEY_ENV` (``PACKAGER_PUBLIC_KEY``) for a deployment that
requires signed packages everywhere. The library is imported only then (``pip install
'packager[sign]'``).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any, Literal, Union

from packager.errors import InputError, IntegrityError, SignatureVerificationError, require

#: Name of the detached signature, at the top level of the package folder.
SIGNATURE_NAME = "model.sig"
#: Environment variable naming the public key every package load must verify against.
PUBLIC_KEY_ENV = "PACKAGER_PUBLIC_KEY"

#: A key file, or ``False`` for "no signature check, even when PACKAGER_PUBLIC_KEY is set".
KeyArg = Union[str, "os.PathLike[str]", Literal[False], None]

_FIX_TAMPERED = ("do not use this package; get it again from its publisher, or sign it again with 'packager sign' "
                 "if you changed it on purpose")


def _model_signing() -> Any:
    return require("model_signing", purpose="sign packages and verify their signatures")


def resolve_public_key(public_key: KeyArg = None) -> Path | None:
    """The public key in effect: ``public_key``, else ``$PACKAGER_PUBLIC_KEY``; None when neither
    (or when ``public_key`` is False)."""
    if public_key is False:
        return None
    if public_key is not None:
        return Path(public_key)
    value = os.environ.get(PUBLIC_KEY_ENV, "").strip()
    return Path(value) if value else None


def _key_file(path: str | os.PathLike[str], what: str, flag: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r}", "does not exist" if not path.exists() else "is not a file",
                         expected=f"a PEM file with an elliptic-curve {what}",
                         got="nothing" if not path.exists() else "a folder", fix=f"check {flag}"
                         + (f" (or ${PUBLIC_KEY_ENV})" if "public" in what else ""))
    return path


def _hashing(ms: Any) -> Any:
    # Every file but the signature, git files included (the library leaves .git* out by default).
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)


def _is_sign_temp(name: str) -> bool:
    return name.startswith(f".{SIGNATURE_NAME}.tmp-")


def signature_path(package_dir: str | os.PathLike[str]) -> Path:
    """Where the signature of ``package_dir`` lives."""
    return Path(package_dir) / SIGNATURE_NAME


def is_signed(package_dir: str | os.PathLike[str]) -> bool:
    """Whether ``package_dir`` holds a signature file (not whether it verifies)."""
    sig = signature_path(package_dir)
    return sig.is_file() and not sig.is_symlink()


def package_files(package_dir: str | os.PathLike[str]) -> list[str]:
    """Every regular file under ``package_dir`` (POSIX paths relative to it, sorted): what a
    signature covers, plus the signature itself. Leftovers of an interrupted ``sign`` are skipped.

    Raises:
        IntegrityError: A link is found (packages never contain links; signing refuses them too).
    """
    root = Path(package_dir)
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise IntegrityError(f"package file {rel!r}", "is a link, which packages never contain",
                                     expected="regular files only", got=f"a link to {os.readlink(full)!r}",
                                     fix="copy the package without links")
            if name in files and not (dirpath == str(root) and _is_sign_temp(name)):
                found.append(rel)
    return sorted(found)


def verify_signature(package_dir: str | os.PathLike[str], public_key: str | os.PathLike[str]) -> None:
    """Check a package's signature with ``public_key`` (PEM): every file must be exactly as signed.

    Args:
        package_dir: Package folder, or an archive from ``packager pack`` (unpacked first).
        public_key: PEM public key matching the signer's private key.

    Raises:
        SignatureVerificationError: No signature, another key, a damaged signature, or a file
            changed, added or removed since signing (naming the file), exit 2.
        InputError: The public key file is missing or unusable.
    """
    from packager.archive import is_archive, open_archive

    root = Path(package_dir)
    if is_archive(root):
        unpacked = open_archive(root)
        try:
            verify_signature(unpacked.root, public_key)
        finally:
            unpacked.cleanup()
        return
    if not root.is_dir():
        raise InputError(str(root), "is not a package folder or archive", got="missing" if not root.exists()
                         else "a file", fix="pass the folder written by 'packager export' or its archive")
    key_path = _key_file(public_key, "public key", "--public-key")
    sig = signature_path(root)
    if not is_signed(root):
        raise SignatureVerificationError(f"package {str(root)!r}", f"has no signature ({SIGNATURE_NAME}), but one is "
                                         f"required (public key {str(key_path)!r})",
                                         expected=f"{SIGNATURE_NAME} at the top of the package", got="a link"
                                         if sig.is_symlink() else "nothing",
                                         fix="get the signed package from its publisher, or sign it with "
                                             f"'packager sign PKG --key KEY'; unset {PUBLIC_KEY_ENV} / drop "
                                             "--public-key only for packages you trust unsigned")
    ms = _model_signing()
    try:
        config = ms.verifying.Config().use_elliptic_key_verifier(public_key=key_path)
    except Exception as exc:
        raise InputError(f"public key {str(key_path)!r}", "cannot be used to verify",
                         expected="a PEM elliptic-curve public key (P-256, P-384 or P-521)",
                         got=f"{type(exc).__name__}: {exc}",
                         fix="export it with: openssl ec -in key.pem -pubout -out pub.pem") from None
    config.set_hashing_config(_hashing(ms))
    try:
        config.verify(root, sig)
    except Exception as exc:  # fail closed on anything the library raises
        raise _explain(exc, root, sig, key_path) from None


def _explain(exc: Exception, root: Path, sig: Path, key: Path) -> SignatureVerificationError:
    """Turn the library's exception into one message naming the file or the key."""
    text = str(exc)
    if type(exc).__name__ == "InvalidSignature":
        return SignatureVerificationError(f"signature {str(sig)!r}", f"does not verify with public key {str(key)!r} "
                                          "(made with another key, or the signature file was altered)",
                                          fix=_FIX_TAMPERED)
    if text.startswith("Key mismatch"):
        return SignatureVerificationError(f"signature {str(sig)!r}", "was made with another key than public key "
                                          f"{str(key)!r}", fix="check that it is the publisher's public key; if it "
                                          "is, someone else re-signed the package: do not use it, get it again from "
                                          "its publisher")
    changes = _changed_files(text, root.name)
    if changes:
        (kind, first), rest = changes[0], changes[1:]
        also = f" (also {', '.join(f'{k} {p!r}' for k, p in rest[:5])}{' ...' if len(rest) > 5 else ''})" if rest \
            else ""
        return SignatureVerificationError(f"package file {first!r}", f"was {kind} after the package was signed"
                                          f"{also}", fix=_FIX_TAMPERED)
    return SignatureVerificationError(f"signature {str(sig)!r}", f"does not verify ({type(exc).__name__}: "
                                      f"{text[:300]})", fix=_FIX_TAMPERED)


def _changed_files(text: str, model_name: str) -> list[tuple[str, str]]:
    """("changed" | "added" | "removed", path) from model-signing's "Signature mismatch: [...]"."""
    prefix = "Signature mismatch: "
    if not text.startswith(prefix):
        return []
    try:
        items = ast.literal_eval(text[len(prefix):])
    except (ValueError, SyntaxError):
        items = [text[len(prefix):]]
    if isinstance(items, str):
        items = [items]
    changes: list[tuple[str, str]] = []
    for item in items if isinstance(items, (list, tuple)) else []:
        item = str(item)
        hashed = re.match(r"Hash mismatch for '(.*?)': Expected ", item, re.S)
        if hashed:
            changes.append(("changed", hashed.group(1)))
            continue
        for lead, kind in (("Extra files found in model", "added"), ("Missing files in model", "removed")):
            if item.startswith(lead):
                known = f"{lead} '{model_name}': "
                names = item[len(known):] if item.startswith(known) else item.split("': ", 1)[-1]
                changes += [(kind, n) for n in names.split(", ") if n]
    order = {"changed": 0, "removed": 1, "added": 2}
    return sorted(changes, key=lambda c: order[c[0]])
