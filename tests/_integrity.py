"""Helpers shared by the trust-and-integrity tests (issue 7): packages to tamper with, crafted tars."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Iterable

from packager.manifest import MANIFEST_NAME


def tiny_torch_package(root: Path, formats: tuple[str, ...] = ("onnx", "torchscript", "torch_export")) -> Path:
    """A TinyMLP (16 -> 4) package with the given torch formats, built once under ``root``."""
    dest = root / ("tiny_" + "_".join(formats))
    if (dest / MANIFEST_NAME).is_file():
        return dest
    import packager
    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=3)
    return packager.export(model, example, out=dest, formats=list(formats)).path


def copy_package(src: Path, dst: Path) -> Path:
    """A private copy of a package folder to tamper with."""
    shutil.copytree(src, dst)
    return dst


def rehash(package: Path) -> None:
    """Recompute every listed file's size and SHA-256: what an attacker who can also edit
    manifest.json would do (integrity checks cannot catch that; loaders must stay safe)."""
    path = package / MANIFEST_NAME
    data = json.loads(path.read_text())
    entries = [f for a in data["artifacts"] for f in a["files"]]
    if data.get("golden"):
        entries += [data["golden"]["inputs"], data["golden"]["outputs"]]
    for entry in entries:
        body = (package / entry["path"]).read_bytes()
        entry["sha256"], entry["size"] = hashlib.sha256(body).hexdigest(), len(body)
        if entry.get("chunks"):
            step = entry["chunks"]["size"]
            entry["chunks"]["sha256"] = [hashlib.sha256(body[i:i + step]).hexdigest()
                                         for i in range(0, max(len(body), 1), step)]
    path.write_text(json.dumps(data, indent=2))


def edit_manifest(package: Path, **changes: object) -> dict:
    """Set top-level manifest fields (manifest.json is not itself checksummed)."""
    path = package / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))
    return data


def make_tar(path: Path, members: Iterable[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    """Write a tar whose members are given as (TarInfo, payload or None)."""
    with tarfile.open(path, mode) as tar:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "", size: int = 0) -> tarfile.TarInfo:
    """A TarInfo of the given type (regular file, link, device, FIFO...)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size
    info.mode = 0o644
    return info


def package_members(package: Path, top: str = "pkg") -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members of a genuine package (to embed a hostile member among them)."""
    out = []
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        out.append((member(f"{top}/{path.relative_to(package).as_posix()}"), path.read_bytes()))
    return out


def tree(folder: Path) -> list[str]:
    """Every path below ``folder`` (hidden ones included), for "nothing left behind" checks."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
