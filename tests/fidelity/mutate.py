"""Building broken packages: a broken model's artifacts inside a package whose golden data come
from the correct model, with the manifest's checksums rewritten by the package module's helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from packager.manifest import MANIFEST_NAME, load_manifest
from packager.package import file_entries


def swap_artifacts(good: Path, broken: Path, dest: Path, formats: list[str] | None = None,
                   options: dict[str, dict[str, Any]] | None = None) -> Path:
    """Copy ``good`` to ``dest`` and replace its artifacts by ``broken``'s (checksums rewritten).

    Args:
        good: Package exported from the correct model (its golden data and signature are kept).
        broken: Package exported from the broken model.
        dest: Where the mixed package goes (replaced).
        formats: Formats to swap (default: every format both packages have).
        options: Extra artifact options per format (e.g. a declared precision).
    """
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(good, dest)
    manifest = load_manifest(dest)
    source = load_manifest(broken)
    for art in manifest.artifacts:
        if formats is not None and art.format not in formats:
            continue
        try:
            other = source.artifact(art.format)
        except KeyError:
            continue
        shutil.rmtree(dest / art.format, ignore_errors=True)
        shutil.copytree(broken / art.format, dest / art.format)
        art.path = other.path
        art.files = file_entries(dest, dest / art.format)
        art.options = {**other.options, **(options or {}).get(art.format, {})}
    (dest / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return dest


def edit_onnx(package: Path, edit: Callable[[Any], None], dest: Path) -> Path:
    """Copy ``package`` to ``dest``, apply ``edit`` to its ONNX model, rewrite the checksums."""
    import onnx

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(package, dest)
    manifest = load_manifest(dest)
    art = manifest.artifact("onnx")
    model = onnx.load(str(dest / art.path))
    edit(model)
    onnx.save(model, str(dest / art.path))
    art.files = file_entries(dest, dest / art.format)
    (dest / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return dest


def set_option(package: Path, fmt: str, **options: Any) -> Path:
    """Add artifact options in place (e.g. ``precision="float16"``); the manifest is not hashed."""
    data = json.loads((package / MANIFEST_NAME).read_text())
    for art in data["artifacts"]:
        if art["format"] == fmt:
            art["options"].update(options)
    (package / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    return package


def onnx_rename_output(model: Any, old: str, new: str) -> None:
    """Rename a graph output (its producer's output and every consumer's input with it)."""
    for node in model.graph.node:
        for names in (node.output, node.input):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    for value in model.graph.output:
        if value.name == old:
            value.name = new


def onnx_drop_output(model: Any, name: str) -> None:
    """Remove a graph output."""
    keep = [v for v in model.graph.output if v.name != name]
    del model.graph.output[:]
    model.graph.output.extend(keep)
