"""Which artifact of a package (or which bare artifact) runs, on which runtime, with which options.

:func:`select` makes that choice once; :meth:`Selection.open` loads the runner. Every caller
(``runtimes.load``, ``verify``, export parity, ``bench``, the batch pipeline and its Ray
actors) reads the same :class:`Selection` instead of re-deriving the choice, so the manifest
is read once per run, options are checked once and version-drift warnings fire on every path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from packager.errors import InputError, SignatureVerificationError, UsageError, did_you_mean
from packager.registry import FORMAT_PREFERENCE, FORMAT_RUNTIMES, RUNTIMES, RuntimeRecord
from packager.signature import Signature

if TYPE_CHECKING:
    from packager.manifest import Artifact, Manifest
    from packager.package import Package
    from runtimes.base import Runner
    from runtimes.device import Device


@dataclass
class Selection:
    """One artifact, the runtime that loads it and its options: what :func:`select` chose."""

    #: The artifact file or folder the runner loads.
    path: Path
    format: str
    runtime: RuntimeRecord
    #: The package's signature; None for a bare artifact (its runner reads its own).
    signature: Signature | None
    #: The manifest's runner options (checked) merged with the caller's (the caller's win).
    options: dict[str, Any] = field(default_factory=dict)
    #: The package and its manifest entry; None for a bare artifact.
    package: Package | None = None
    artifact: Artifact | None = None

    @property
    def manifest(self) -> Manifest | None:
        return self.package.manifest if self.package is not None else None

    @property
    def model_bytes(self) -> int:
        """Size of the selected artifact (all its files), 0 if unknown."""
        if self.artifact is not None:
            return sum(f.size for f in self.artifact.files)
        return self.path.stat().st_size if self.path.is_file() else 0

    def runner_class(self) -> type[Runner]:
        from runtimes import runner_class

        return runner_class(self.runtime.name)

    def open(self, device: str | Device = "cpu", cast: str = "strict", *, trust: bool | None = None,
             **options: Any) -> Runner:
        """Load the selected artifact on ``device`` and return its runner.

        Args:
            device: ``"cpu"`` or ``"cuda[:N]"``.
            cast: ``"strict"`` dtype checks, or ``"safe"`` to allow lossless casts.
            trust: Load graphs that run code or touch files (see :func:`runtimes.load`).
            **options: Runtime options on top of the selection's.
        """
        cls = self.runner_class()
        if self.manifest is not None:
            from packager.versions import warn_version_drift

            warn_version_drift(self.manifest, self.runtime.name)
        runner = cls(self.path, signature=self.signature, device=device, cast=cast, trust=trust,
                     **{**self.options, **options})
        if self.package is not None:
            runner._package = self.package  # keeps an unpacked archive's temporary folder alive with the runner
        return runner


def select(path: str | Path | Package, format: str | None = None, runtime: str | None = None, *,
           verify: bool = True, signature: Signature | None = None,
           public_key: str | os.PathLike[str] | Literal[False] | None = None, **options: Any) -> Selection:
    """Choose the artifact and runtime :func:`runtimes.load` would load, without loading it.

    Args:
        path: A package folder or archive, an opened :class:`~packager.package.Package`, or a
            bare artifact file/folder.
        format: Artifact format (default: the first of ONNX, TorchScript, ... the package has).
        runtime: Runtime (default: the artifact's first).
        verify: Check package checksums and unlisted files (packages opened here only).
        signature: Signature for a bare artifact (packages carry their own).
        public_key: Required signature key (see :func:`runtimes.load`).
        **options: Runtime options, checked against the runtime's declared options.

    Raises:
        InputError: No artifact fits the request; ManifestError: the manifest's options are bad;
        UsageError: an unknown format, runtime or option.
    """
    from packager.package import Package, is_package

    if isinstance(path, Package) or is_package(path):
        package = path if isinstance(path, Package) else Package(path, verify=verify, public_key=public_key)
        return _from_package(package, format, runtime, options)
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "does not exist", fix="check the path")
    from packager.signing import PUBLIC_KEY_ENV, resolve_public_key

    key = resolve_public_key(public_key)
    if key is not None:
        raise SignatureVerificationError(str(path), "is a bare artifact, which carries no signature, but a signed "
                                         f"package is required (public key {str(key)!r})",
                                         expected="a signed package folder or archive", got="a bare artifact",
                                         fix=f"load the signed package instead; unset {PUBLIC_KEY_ENV} / drop "
                                             "public_key only for artifacts you trust")
    from runtimes import detect_format

    format = format or detect_format(path)
    if format not in FORMAT_RUNTIMES:
        raise UsageError(f"format {format!r}", "is unknown", expected=", ".join(FORMAT_RUNTIMES), got=format)
    record = _runtime(runtime or FORMAT_RUNTIMES[format][0], format)
    return Selection(path, format, record, signature, _checked(record, options))


def select_artifact(package: Package, artifact: Artifact, runtime: str, *, signature: Signature | None = None,
                    **options: Any) -> Selection:
    """The selection of one given artifact of an opened package on one of its runtimes
    (``signature``: the manifest's, refined by the caller, e.g. with input value ranges)."""
    from runtimes.base import manifest_options

    if runtime not in artifact.runtimes:
        raise InputError(f"runtime {runtime!r}", f"cannot load the {artifact.format} artifact",
                         expected=artifact.runtimes, got=runtime)
    record = _runtime(runtime, artifact.format)
    from runtimes import runner_class

    merged = {**manifest_options(artifact, runner_class(runtime)), **_checked(record, options)}
    return Selection(package.resolve(artifact.path), artifact.format, record,
                     signature or package.manifest.signature, merged, package, artifact)


def _from_package(package: Package, format: str | None, runtime: str | None, options: dict[str, Any]) -> Selection:
    manifest = package.manifest
    if format is None:
        available = [f for f in FORMAT_PREFERENCE if f in manifest.formats] or manifest.formats
        if runtime is not None:
            _known(runtime)  # a typo is "unknown, did you mean", not "no artifact it can load"
            available = [f for f in available if runtime in manifest.artifact(f).runtimes]
        if not available:
            raise InputError(str(package.root), "has no artifact the requested runtime can load",
                             expected=runtime, got=manifest.formats)
        format = available[0]
    try:
        artifact = manifest.artifact(format)
    except KeyError:
        raise InputError(f"format {format!r}", "is not in this package", expected=manifest.formats,
                         got=format, fix=f"{did_you_mean(format, manifest.formats)}pass one of --format "
                                        f"{', '.join(manifest.formats)}") from None
    return select_artifact(package, artifact, runtime or artifact.runtimes[0], **options)


def _known(name: str) -> RuntimeRecord:
    if name not in RUNTIMES:
        raise UsageError(f"runtime {name!r}", "is unknown", expected=", ".join(RUNTIMES), got=name,
                         fix=f"{did_you_mean(name, RUNTIMES)}pass --runtime with one of the expected names")
    return RUNTIMES[name]


def _runtime(name: str, format: str) -> RuntimeRecord:
    record = _known(name)
    if format not in record.formats:
        raise UsageError(f"runtime {name!r}", f"cannot load the {format} format",
                         expected=", ".join(FORMAT_RUNTIMES.get(format, ())) or "a known format", got=name)
    return record


def _checked(record: RuntimeRecord, options: dict[str, Any]) -> dict[str, Any]:
    """The caller's options, checked now (a typo fails before any file is read)."""
    from runtimes import runner_class

    runner_class(record.name).parse_options(options)
    return dict(options)
