"""One root exception with typed leaves, each carrying its documented exit code.

Every error a user can cause is raised as a :class:`PackagerError` whose message names the
subject, what is wrong, what was expected vs received, and how to fix it. The CLI prints
that message (no traceback unless ``--debug``) and exits with :attr:`PackagerError.exit_code`.
"""

from __future__ import annotations

import difflib
import errno
import re
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Documented process exit codes (README, "Exit codes")."""

    OK = 0
    FIDELITY = 1  # numeric mismatch between an artifact and its reference
    USAGE = 2  # bad usage or bad input (files, feeds, manifests, devices)
    CONTRACT = 3  # names / dtypes / ranks / dynamic axes differ from the signature
    RUNTIME = 4  # an artifact failed to export, load or run
    INTERNAL = 70  # a bug in packager itself (EX_SOFTWARE)


class PackagerError(Exception):
    """Root of every error packager raises on purpose.

    Args:
        subject: What the message is about ("input 'x'", "manifest.json", "format onnx").
        problem: What is wrong, in a short phrase.
        expected: What was expected, if it helps.
        got: What was received instead.
        fix: What the user can do about it.
        details: Extra text (e.g. a captured converter log), shown with ``--debug`` and kept
            in reports.
    """

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(
        self,
        subject: str,
        problem: str,
        *,
        expected: Any = None,
        got: Any = None,
        fix: str | None = None,
        details: str | None = None,
    ) -> None:
        self.subject = subject
        self.problem = problem
        self.expected = expected
        self.got = got
        self.fix = fix
        self.details = details
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [f"{self.subject}: {self.problem}"]
        if self.expected is not None and self.got is not None:
            parts.append(f"expected {self.expected}, got {self.got}")
        elif self.expected is not None:
            parts.append(f"expected {self.expected}")
        elif self.got is not None:
            parts.append(f"got {self.got}")
        text = " | ".join(parts)
        if self.fix:
            text += f". Fix: {self.fix}"
        return text

    @property
    def cli_message(self) -> str:
        """:attr:`message` as the command line prints it: fixes name flags (``--overwrite``),
        not the API's keywords (``overwrite=True``); see :func:`cli_words`."""
        return cli_words(self.message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "exit_code": int(self.exit_code),
            "subject": self.subject,
            "problem": self.problem,
            "expected": None if self.expected is None else str(self.expected),
            "got": None if self.got is None else str(self.got),
            "fix": self.fix,
        }


#: API wording in fixes -> what a command-line user types. Messages name both where both exist
#: ("pass --overwrite (overwrite=True)"); the CLI shows the flag alone.
_CLI_WORDS = (
    (re.compile(r" \((?:API: )?[a-z_]+=(?:True|False)\)"), ""),
    (re.compile(r"\bsignature_key=NAME \(--signature NAME\)"), "--signature NAME"),
    (re.compile(r", or options=\{\.\.\.\} in the API"), ""),
)


def cli_words(text: str) -> str:
    """``text`` with API keyword fixes (``overwrite=True``) replaced by their CLI flags."""
    for pattern, replacement in _CLI_WORDS:
        text = pattern.sub(replacement, text)
    return text


class UsageError(PackagerError):
    """Bad command-line or API usage (conflicting or missing options)."""


class InputError(PackagerError):
    """A file or value given by the user cannot be used."""


class FeedError(InputError):
    """Runtime feeds do not match the signature (names, dtypes, ranks, dimensions)."""


class SignatureError(InputError):
    """An ``--input-spec`` or signature cannot be parsed or is inconsistent."""


class ManifestError(InputError):
    """``manifest.json`` is missing, unreadable or fails validation."""


class SchemaVersionError(ManifestError):
    """The manifest comes from a newer schema than this packager knows."""


class IntegrityError(InputError):
    """A package file is missing, unlisted or its SHA-256 differs from the manifest."""


class SignatureVerificationError(IntegrityError):
    """A package's signature (``model.sig``) is missing, made with another key, or no longer matches its files."""


class SourceError(InputError):
    """A training-time save cannot be loaded as a model."""


class TrustRequiredError(SourceError):
    """Loading the source would run pickled code; it needs an explicit ``--trust``."""


class DependencyError(InputError):
    """An optional framework or runtime is not installed."""


class DeviceError(InputError):
    """The requested device is absent or its execution provider failed to load."""


class ExistsError(UsageError):
    """The destination exists and ``--overwrite`` was not given."""


class ExportError(PackagerError):
    """A format could not be produced from the model."""

    exit_code = ExitCode.RUNTIME


class RuntimeLoadError(PackagerError):
    """An artifact could not be loaded or run by its runtime."""

    exit_code = ExitCode.RUNTIME


class UnsafeArtifactError(RuntimeLoadError):
    """An artifact holds pickled code, file-touching operators or custom-op libraries (needs ``--trust``)."""


class ContractError(PackagerError):
    """An artifact's outputs do not match the signature (names, dtypes, ranks, axes)."""

    exit_code = ExitCode.CONTRACT


class FidelityError(PackagerError):
    """An artifact's outputs differ numerically from the reference beyond tolerance."""

    exit_code = ExitCode.FIDELITY


def did_you_mean(given: Any, choices: Any) -> str:
    """``"did you mean 'onnx'? "`` for the closest choice to each typo in ``given`` (one name or
    several), or ``""``: the start of a fix for an unknown format, runtime or builder."""
    names = [given] if isinstance(given, str) else list(given or [])
    options = [str(c) for c in choices]
    close = [m[0] for name in names for m in [difflib.get_close_matches(str(name), options, n=1, cutoff=0.6)] if m]
    return f"did you mean {', '.join(repr(c) for c in dict.fromkeys(close))}? " if close else ""


def require(module: str, *, purpose: str) -> Any:
    """Import an optional dependency, or raise a :class:`DependencyError` with the fix.

    Args:
        module: Module to import (``"onnxruntime"``); the pip extra that installs it is
            looked up in :data:`packager.registry.MODULE_EXTRAS`.
        purpose: What it is needed for, for the message.
    """
    import importlib

    from packager.registry import install_fix

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"module {module!r}",
            f"is needed to {purpose} but cannot be imported ({exc})",
            fix=install_fix(module),
        ) from exc


#: errno -> what the user can do, for OS errors that are the user's environment, not a bug.
_OS_FIXES = {
    errno.EROFS: "choose a location on a writable file system (-o/--output)",
    errno.EACCES: "choose a location you may write to (-o/--output), or fix its permissions",
    errno.EPERM: "choose a location you may write to (-o/--output), or fix its permissions",
    errno.ENOSPC: "free disk space, or choose a location on another disk (-o/--output)",
    errno.EDQUOT: "free space within your quota, or choose another location (-o/--output)",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ENOTDIR: "a parent of that path is a file: choose another path",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
}


def from_os_error(exc: OSError) -> PackagerError | None:
    """The user-facing error for an OS error the environment caused (read-only folder, full
    disk, permissions), or None when it is not one of those (then it is a bug to report)."""
    fix = _OS_FIXES.get(exc.errno or -1)
    if fix is None:
        return None
    where = exc.filename if exc.filename is not None else "a file packager writes"
    return UsageError(f"path {str(where)!r}", f"cannot be used: {exc.strerror or exc}", fix=fix)
