"""Runtime layer: load any artifact or package and run it on CPU or GPU.

``runtimes.load(path)`` returns a :class:`~runtimes.base.Runner`. Backends are imported only
when one is loaded, so importing this package costs no framework import.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal

from packager.errors import DependencyError, InputError, UsageError
from packager.registry import FORMAT_PREFERENCE, FORMAT_RUNTIMES, RUNTIMES, SUFFIX_FORMATS, install_fix
from packager.signature import Signature
from runtimes.base import Runner
from runtimes.device import Device, parse_device
from runtimes.selection import Selection, select, select_artifact

__all__ = ["Runner", "Device", "Selection", "load", "select", "select_artifact", "parse_device", "RUNNERS",
           "FORMAT_RUNTIMES", "FORMAT_PREFERENCE", "runner_class", "detect_format"]

#: runtime name -> "module:Class" (imported lazily); derived from packager/registry.py.
RUNNERS: dict[str, str] = {name: record.runner for name, record in RUNTIMES.items()}


def runner_class(runtime: str) -> type[Runner]:
    """The runner class registered for ``runtime`` (imports its module)."""
    if runtime not in RUNNERS:
        raise UsageError(f"runtime {runtime!r}", "is unknown", expected=", ".join(RUNNERS), got=runtime)
    module_name, cls_name = RUNNERS[runtime].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DependencyError(f"runtime {runtime!r}", f"cannot be imported ({exc})",
                              fix=install_fix(RUNTIMES[runtime].module)) from exc
    return getattr(module, cls_name)


def detect_format(path: str | Path) -> str:
    """Guess the format of a bare artifact from its file name or folder contents."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "saved_model"
        names = {p.suffix for p in path.iterdir()}
        if ".pdiparams" in names:
            return "paddle_legacy" if ".pdmodel" in names else "paddle_inference"
    suffix = path.suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    raise InputError(str(path), "is not a recognised artifact", expected="a package folder, .onnx, .pt (TorchScript), "
                     ".pt2, a SavedModel folder or a Paddle inference model", got=path.suffix or "a folder",
                     fix="pass format=... explicitly")


def load(path: str | Path, format: str | None = None, device: str | Device = "cpu", *, runtime: str | None = None,
         cast: str = "strict", verify: bool = True, signature: Signature | None = None, trust: bool | None = None,
         public_key: str | os.PathLike[str] | Literal[False] | None = None, **options: Any) -> Runner:
    """Load a package (picking an artifact) or a bare artifact, and return its runner.

    Args:
        path: A package folder (with ``manifest.json``), a package archive (``.tar.gz``) or an
            artifact file/folder.
        format: Artifact format to use (default: the first of ONNX, TorchScript, ... the package has).
        device: ``"cpu"`` or ``"cuda[:N]"``.
        runtime: Runtime to use when the format has several (default: the first registered).
        cast: ``"strict"`` dtype checks, or ``"safe"`` to allow lossless casts.
        verify: Check package checksums and unlisted files before loading (packages only).
            ``False`` skips that check (a modified file then reaches the framework).
        signature: Signature for a bare artifact (packages carry their own).
        trust: Load graphs that run code or touch files (``.pt2`` pickles, ``aten::from_file``,
            ``ReadFile``, custom-op domains...); default: refused (``PACKAGER_TRUST=1``: trusted).
        public_key: PEM public key: the package's signature (``model.sig``) must verify with it,
            checked before anything else (also with ``verify=False``); a bare artifact is then
            refused. Default: ``$PACKAGER_PUBLIC_KEY`` if set, else no check; ``False``: no check.
        **options: Runtime-specific options.
    """
    selection = select(path, format, runtime, verify=verify, signature=signature, public_key=public_key, **options)
    return selection.open(device, cast, trust=trust)
