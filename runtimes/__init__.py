"""Runtime layer: load any artifact or package and run it on CPU or GPU.

``runtimes.load(path)`` returns a :class:`~runtimes.base.Runner`. Backends are imported only
when one is loaded, so importing this package costs no framework import.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal

from packager.errors import DependencyError, InputError, SignatureVerificationError, UsageError
from packager.signature import Signature
from runtimes.base import Runner, manifest_options
from runtimes.device import Device, parse_device

__all__ = ["Runner", "Device", "load", "parse_device", "RUNNERS", "FORMAT_RUNTIMES", "runner_class", "detect_format"]

#: runtime name -> "module:Class" (imported lazily).
RUNNERS: dict[str, str] = {
    "onnxruntime": "runtimes.onnxruntime:OnnxRuntimeRunner",
    "torchscript": "runtimes.torchscript:TorchScriptRunner",
    "torch_export": "runtimes.torch_export:TorchExportRunner",
    "tensorflow": "runtimes.tensorflow:TensorFlowRunner",
    "paddle_inference": "runtimes.paddle_inference:PaddleInferenceRunner",
    "paddle_jit": "runtimes.paddle_jit:PaddleJitRunner",
}

#: format -> runtimes that load it, preferred first.
FORMAT_RUNTIMES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime",),
    "torchscript": ("torchscript",),
    "torch_export": ("torch_export",),
    "saved_model": ("tensorflow",),
    "paddle_inference": ("paddle_inference", "paddle_jit"),
    "paddle_legacy": ("paddle_inference",),
    "paddle_static": ("paddle_inference",),
}

#: Which artifact a package runs when no format is asked for: ONNX first (lightest runtime).
FORMAT_PREFERENCE = ("onnx", "torchscript", "torch_export", "saved_model", "paddle_inference", "paddle_static",
                     "paddle_legacy")

#: pip extra that installs each runtime.
RUNTIME_EXTRAS = {"onnxruntime": "onnx", "torchscript": "torch", "torch_export": "torch", "tensorflow": "tensorflow",
                  "paddle_inference": "paddle", "paddle_jit": "paddle"}


def runner_class(runtime: str) -> type[Runner]:
    """The runner class registered for ``runtime`` (imports its module)."""
    if runtime not in RUNNERS:
        raise UsageError(f"runtime {runtime!r}", "is unknown", expected=", ".join(RUNNERS), got=runtime)
    module_name, cls_name = RUNNERS[runtime].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DependencyError(f"runtime {runtime!r}", f"cannot be imported ({exc})",
                              fix=f"pip install 'packager[{RUNTIME_EXTRAS.get(runtime, runtime)}]'") from exc
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
    by_suffix = {".onnx": "onnx", ".pt2": "torch_export", ".ts": "torchscript", ".torchscript": "torchscript",
                 ".pdmodel": "paddle_legacy", ".json": "paddle_inference", ".pdiparams": "paddle_inference"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix in (".pt", ".pth", ".jit"):
        return "torchscript"
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
    from packager.package import Package, is_package

    path = Path(path)
    if is_package(path):
        package = Package(path, verify=verify, public_key=public_key)
        manifest = package.manifest
        if format is None:
            available = [f for f in FORMAT_PREFERENCE if f in manifest.formats] or manifest.formats
            if runtime is not None:
                available = [f for f in available if runtime in FORMAT_RUNTIMES.get(f, ())]
            if not available:
                raise InputError(str(path), "has no artifact the requested runtime can load",
                                 expected=runtime, got=manifest.formats)
            format = available[0]
        try:
            artifact = manifest.artifact(format)
        except KeyError:
            raise InputError(f"format {format!r}", "is not in this package", expected=manifest.formats,
                             got=format, fix=f"pass one of --format {', '.join(manifest.formats)}") from None
        runtime = runtime or artifact.runtimes[0]
        if runtime not in artifact.runtimes:
            raise InputError(f"runtime {runtime!r}", f"cannot load the {format} artifact",
                             expected=artifact.runtimes, got=runtime)
        cls = runner_class(runtime)
        merged = {**manifest_options(artifact.options.get("runner", {})), **options}
        from packager.versions import warn_version_drift

        warn_version_drift(manifest, runtime)
        runner = cls(package.resolve(artifact.path), signature=manifest.signature, device=device, cast=cast, trust=trust,
                     **merged)
        runner._package = package  # keeps an unpacked archive's temporary folder alive with the runner
        return runner
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
    format = format or detect_format(path)
    if format not in FORMAT_RUNTIMES:
        raise UsageError(f"format {format!r}", "is unknown", expected=", ".join(FORMAT_RUNTIMES), got=format)
    runtime = runtime or FORMAT_RUNTIMES[format][0]
    return runner_class(runtime)(path, signature=signature, device=device, cast=cast, trust=trust, **options)
