"""packager: export trained models to verified deployment packages, and run them.

The public API is imported lazily so ``import packager`` (and ``packager --help``) costs no
framework import.
"""

from __future__ import annotations

import os
from typing import Any

# Before anything imports onnxruntime (which reads it once, at import): ONNX Runtime 1.31
# otherwise writes a device id and a telemetry database under ~/.cache and a ``.ses`` file in
# TMPDIR on every host that runs a package. A user who sets the variable keeps their value.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# paddle2onnx's constant folding goes through Polygraphy, which would pip-install
# onnx-graphsurgeon at run time; it is a declared dependency instead.
os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")

__version__ = "0.1.0"
__all__ = ["export", "verify", "load", "Package", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "export":
        from packager.exporting import export

        return export
    if name == "verify":
        from packager.verifying import verify

        return verify
    if name == "load":
        from runtimes import load

        return load
    if name == "Package":
        from packager.package import Package

        return Package
    raise AttributeError(f"module 'packager' has no attribute {name!r}")
