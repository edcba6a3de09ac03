"""Version drift: warn when a package runs under a different major framework/runtime version.

The manifest records, at export time, the framework version and the version of every
runtime an artifact lists (``manifest.versions``). A different *major* version on the
loading host is the usual cause of load failures and silent numeric changes, so it is
reported with both versions. Versions are read from installed distributions' metadata:
checking costs no framework import.
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from dataclasses import dataclass

from packager.manifest import Manifest
from packager.registry import distribution_of



class VersionDriftWarning(UserWarning):
    """A package was exported with a different major version of a framework or runtime."""


@dataclass(frozen=True)
class Drift:
    """One framework/runtime whose major version differs between export and this host."""

    key: str
    exported: str
    installed: str

    def __str__(self) -> str:
        return (f"{self.key}: package exported with {self.exported}, this host has {self.installed} "
                f"(different major version; re-run 'packager verify' on this host, or re-export)")


def installed_version(key: str) -> str | None:
    """Installed version of a framework/runtime key (GPU builds included), or None if absent."""
    dist = distribution_of(key)
    for name in (dist, f"{dist}-gpu", f"{dist}_gpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def major(version: str) -> int | None:
    """Leading integer of a version string ("2.13.0+cpu" -> 2), None if there is none."""
    match = re.match(r"\s*v?(\d+)", version)
    return int(match.group(1)) if match else None


def version_drift(manifest: Manifest, keys: list[str] | None = None) -> list[Drift]:
    """Frameworks/runtimes (default: all in ``manifest.versions``) whose major version differs here."""
    drifts = []
    for key in keys if keys is not None else list(manifest.versions):
        exported = manifest.versions.get(key)
        if exported is None:
            continue
        installed = installed_version(key)
        if installed is None:
            continue  # not installed: loading fails later with a DependencyError naming the fix
        a, b = major(exported), major(installed)
        if a is not None and b is not None and a != b:
            drifts.append(Drift(key, exported, installed))
    return drifts


def warn_version_drift(manifest: Manifest, runtime: str | None = None) -> list[Drift]:
    """Warn (``VersionDriftWarning``) for each major-version difference relevant to ``runtime``.

    Args:
        manifest: The package's manifest.
        runtime: The runtime about to load an artifact; None checks every recorded version.
    """
    # Only the runtime matters at load time: an ONNX artifact does not care which torch exported it.
    drifts = version_drift(manifest, None if runtime is None else [runtime])
    for drift in drifts:
        warnings.warn(f"package {manifest.name!r}: {drift}", VersionDriftWarning, stacklevel=3)
    return drifts
