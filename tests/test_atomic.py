"""Atomic publishing (packager/atomic.py): exchange, the two-rename fallback, no-replace."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

import packager.atomic as atomic_mod
from packager.atomic import replace_dir
from packager.manifest import MANIFEST_NAME


def _dir_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / MANIFEST_NAME).write_text(text)
    (path / "payload.bin").write_bytes(text.encode() * 100)
    return path


def test_replace_dir_swaps_atomically(tmp_path: Path) -> None:
    dest = _dir_with(tmp_path / "dest", "old")
    new = _dir_with(tmp_path / ".dest.tmp-1", "new")
    replace_dir(new, dest)
    assert (dest / MANIFEST_NAME).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # the old tree is gone
    if sys.platform.startswith("linux"):
        assert atomic_mod.last_replace_method == "exchange"


def test_replace_dir_fallback_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic_mod, "_renameat2", lambda *a: False)  # e.g. macOS, or NFS
    dest = _dir_with(tmp_path / "dest", "old")
    replace_dir(_dir_with(tmp_path / ".dest.tmp-1", "new"), dest)
    assert (dest / MANIFEST_NAME).read_text() == "new" and atomic_mod.last_replace_method == "rename"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    replace_dir(_dir_with(tmp_path / ".other.tmp-1", "first"), tmp_path / "other")
    assert (tmp_path / "other" / MANIFEST_NAME).read_text() == "first"


def test_replace_dir_fallback_keeps_the_old_package_when_the_second_rename_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-rename fallback moved the old package aside, then lost it in the caller's
    temp-folder cleanup when moving the new one in failed (here: the source vanished)."""
    monkeypatch.setattr(atomic_mod, "_renameat2", lambda *a: False)
    dest = _dir_with(tmp_path / "dest", "old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / ".dest.tmp-gone", dest)
    assert (dest / MANIFEST_NAME).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # no hidden .old-* left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RENAME_EXCHANGE is Linux-only")
def test_readers_never_see_a_missing_package_during_overwrite(tmp_path: Path) -> None:
    """200 overwrites while a reader polls: the destination's manifest is always there."""
    dest = _dir_with(tmp_path / "dest", "v0")
    stop = threading.Event()
    misses: list[int] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                (dest / MANIFEST_NAME).read_text()
                reads[0] += 1
            except FileNotFoundError:
                misses.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            replace_dir(_dir_with(tmp_path / f".dest.tmp-{i}", f"v{i + 1}"), dest)
    finally:
        stop.set()
        thread.join()
    assert not misses and reads[0] > 0
    assert (dest / MANIFEST_NAME).read_text() == "v200"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_noreplace_rename_refuses_an_existing_destination(tmp_path: Path) -> None:
    dest = _dir_with(tmp_path / "dest", "theirs")
    with pytest.raises(FileExistsError):
        atomic_mod._renameat2(_dir_with(tmp_path / "src", "ours"), dest, atomic_mod._RENAME_NOREPLACE)
    assert (dest / MANIFEST_NAME).read_text() == "theirs"
