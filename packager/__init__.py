"""packager: export trained models to verified deployment packages, and run them.

The public API is imported lazily so ``import packager`` (and ``packager --help``) costs no
framework import.
"""

from __future__ import annotations

from typing import Any

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
