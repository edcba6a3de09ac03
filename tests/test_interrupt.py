"""SIGKILL at random moments: ``packager export`` / ``packager pack`` / the commit itself leave
either no package or the previous complete one at the destination, never a partial one (issue 7).

Kill times are stratified over the command's measured duration (trial i of n is killed at a
random point of the i-th slice), so every phase (imports, export, hashing, commit) is hit.
The default run is sized for a busy 2-core machine; ``-m slow`` runs many more trials.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from packager.errors import PackagerError
from packager.manifest import MANIFEST_NAME
from packager.atomic import sweep_stale
from packager.package import Package
from tests._integrity import copy_package, edit_manifest, rehash, tiny_torch_package

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _kill_at(cmd: list[str], delay: float, cwd: Path) -> tuple[int, float]:
    """Start ``cmd``, SIGKILL it after ``delay`` s (unless it finished); return (rc, elapsed)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode, time.perf_counter() - started


def _delays(trials: int, duration: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    span = duration * 1.3  # a few trials finish: the last moments (rename, fsync) are covered too
    return [span * (i + rng.random()) / trials for i in range(trials)]


def _check_destination(dest: Path, allowed: dict[str, str]) -> str:
    """Classify what a kill left at ``dest``: 'absent' or the name of a complete version."""
    if not dest.exists():
        assert "absent" in allowed, f"{dest} vanished although a previous version existed"
        return "absent"
    digest = _tree_digest(dest) if dest.is_dir() else _sha(dest)
    for name, expected in allowed.items():
        if digest == expected:
            if dest.is_dir():
                Package(dest)  # complete and self-consistent
            return name
    raise AssertionError(f"{dest} holds a partial or unknown package")


def _run_trials(cmd: list[str], dest: Path, cwd: Path, versions: dict[str, str], previous: Path | None,
                trials: int, duration: float, seed: int) -> Counter:
    outcomes: Counter = Counter()
    for i, delay in enumerate(_delays(trials, duration, seed)):
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        with_previous = previous is not None and i % 2 == 0
        if with_previous:
            if previous.is_dir():
                shutil.copytree(previous, dest)
            else:
                dest.write_bytes(previous.read_bytes())
        allowed = {"new": versions["new"]}
        allowed.update({"old": versions["old"]} if with_previous else {"absent": ""})
        rc, _ = _kill_at(cmd, delay, cwd)
        outcome = _check_destination(dest, allowed)
        outcomes[f"{'killed' if rc == -signal.SIGKILL else 'finished'}:{outcome}"] += 1
        if rc != -signal.SIGKILL:
            assert rc == 0 and outcome == "new"
    return outcomes


# --- packager pack ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_package(session_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ONNX package plus a 12 MB listed file, so packing takes long enough to be killed mid-way."""
    base = tmp_path_factory.mktemp("big")
    pkg = copy_package(tiny_torch_package(session_dir, ("onnx",)), base / "pkg")
    (pkg / "onnx/padding.bin").write_bytes(np.random.default_rng(0).bytes(12 * 1024 * 1024))
    import json

    data = json.loads((pkg / MANIFEST_NAME).read_text())
    data["artifacts"][0]["files"].append({"path": "onnx/padding.bin", "sha256": "0" * 64, "size": 0})
    (pkg / MANIFEST_NAME).write_text(json.dumps(data))
    rehash(pkg)
    Package(pkg)
    return pkg


def _pack_trials(big_package: Path, tmp_path: Path, trials: int, seed: int) -> Counter:
    from packager.packing import pack

    old = pack(_small(big_package, tmp_path), tmp_path / "old.tar.gz").path
    new = pack(big_package, tmp_path / "new.tar.gz").path
    versions = {"old": _sha(old), "new": _sha(new)}
    dest = tmp_path / "work" / "model.tar.gz"
    dest.parent.mkdir()
    cmd = [sys.executable, "-m", "packager", "pack", str(big_package), "-o", str(dest), "--overwrite"]
    durations = []
    for _ in range(2):  # the slower of two runs: the first may be slowed by cold caches, or not
        started = time.perf_counter()
        assert subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0
        durations.append(time.perf_counter() - started)
    duration = max(durations)
    assert _sha(dest) == versions["new"]
    outcomes = _run_trials(cmd, dest, tmp_path, versions, old, trials, duration, seed)
    leftovers = [p.name for p in dest.parent.iterdir() if p.name != dest.name]
    print(f"pack: {trials} trials over {duration:.2f} s: {dict(outcomes)}; {len(leftovers)} temp leftovers")
    # The next run sweeps the leftovers of killed processes.
    assert subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]
    return outcomes


def _small(big_package: Path, tmp_path: Path) -> Path:
    small = copy_package(big_package, tmp_path / "small")
    (small / "onnx/padding.bin").write_bytes(b"previous version")
    rehash(small)
    return small


def test_sigkill_pack(big_package: Path, tmp_path: Path) -> None:
    outcomes = _pack_trials(big_package, tmp_path, trials=24, seed=1)
    assert sum(outcomes.values()) == 24 and any(k.startswith("killed") for k in outcomes)


@pytest.mark.slow
def test_sigkill_pack_many(big_package: Path, tmp_path: Path) -> None:
    _pack_trials(big_package, tmp_path, trials=100, seed=2)


# --- packager export ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state_dict + example inputs: the lightest real CLI export (ONNX only, builder from sample_models)."""
    import torch

    from sample_models.torch_models import train_mlp

    work = tmp_path_factory.mktemp("export_src")
    model, example = train_mlp(steps=2)
    torch.save(model.state_dict(), work / "weights.pt")
    np.savez(work / "in.npz", **example)
    return work


def _export_trials(work: Path, tmp_path: Path, trials: int, seed: int) -> Counter:
    dest = tmp_path / "out" / "pkg"
    cmd = [sys.executable, "-m", "packager", "export", str(work / "weights.pt"), "--builder",
           "sample_models.torch_models:build_mlp", "--example-inputs", str(work / "in.npz"), "--formats", "onnx",
           "-o", str(dest), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    duration = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    # The "previous" package: a complete export renamed (manifest.json itself is not checksummed).
    shutil.copytree(dest, tmp_path / "old")
    edit_manifest(tmp_path / "old", name="previous")
    # Exports embed a creation time: a complete new package is recognised by passing its integrity
    # check with this run's manifest name instead of by digest.
    outcomes: Counter = Counter()
    for i, delay in enumerate(_delays(trials, duration, seed)):
        shutil.rmtree(dest, ignore_errors=True)
        with_previous = i % 2 == 0
        if with_previous:
            shutil.copytree(tmp_path / "old", dest)
        rc, _ = _kill_at(cmd, delay, tmp_path)
        if not dest.exists():
            assert not with_previous, "the previous package vanished"
            outcome = "absent"
        else:
            try:
                name = Package(dest).manifest.name
            except PackagerError as exc:  # pragma: no cover - the failure this test exists to catch
                raise AssertionError(f"partial package left at {dest}: {exc.message}") from None
            outcome = "old" if name == "previous" else "new"
            assert name in ("previous", "pkg")
            assert with_previous or outcome == "new"
        outcomes[f"{'killed' if rc == -signal.SIGKILL else 'finished'}:{outcome}"] += 1
    leftovers = [p.name for p in dest.parent.iterdir() if p.name != dest.name]
    print(f"export: {trials} trials over {duration:.2f} s: {dict(outcomes)}; {len(leftovers)} temp leftovers")
    return outcomes


def test_sigkill_export(export_source: Path, tmp_path: Path) -> None:
    outcomes = _export_trials(export_source, tmp_path, trials=4, seed=3)
    assert sum(outcomes.values()) == 4


@pytest.mark.slow
def test_sigkill_export_many(export_source: Path, tmp_path: Path) -> None:
    _export_trials(export_source, tmp_path, trials=40, seed=4)


# --- the commit window itself -------------------------------------------------------------------

_HAMMER = textwrap.dedent('''
    import sys
    import numpy as np
    from packager.manifest import Artifact, Golden, Manifest, Source
    from packager.package import PackageWriter
    from packager.signature import Signature, TensorSpec

    dest = sys.argv[1]
    sig = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=("batch", 4))],
                    outputs=[TensorSpec(name="y", dtype="float32", shape=("batch", 4))])
    i = 0
    while True:
        i += 1
        with PackageWriter(dest, overwrite=True) as w:
            w.path("onnx/model.onnx").write_bytes(bytes([i % 251]) * (200_000 + i))
            m = Manifest(name=f"v{i}", packager_version="0", versions={}, signature=sig,
                         source=Source(framework="torch", framework_version="2", kind="in_memory"),
                         artifacts=[Artifact(format="onnx", path="onnx/model.onnx", files=w.files("onnx"),
                                             runtimes=["onnxruntime"])],
                         golden=Golden(inputs=w.write_npz("golden/inputs.npz", {"x": np.zeros((1, 4))}),
                                       outputs=w.write_npz("golden/outputs.npz", {"y": np.full((1, 4), i)}),
                                       reference="hammer"))
            w.commit(m)
''')


def _commit_trials(tmp_path: Path, trials: int, seed: int) -> Counter:
    script = tmp_path / "hammer.py"
    script.write_text(_HAMMER)
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    dest = tmp_path / "out" / "pkg"
    for _ in range(trials):
        rc, _ = _kill_at([sys.executable, str(script), str(dest)], 0.6 + rng.random() * 0.8, tmp_path)
        assert rc == -signal.SIGKILL
        if dest.exists():
            Package(dest)  # never partial
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
    sweep_stale(dest)
    assert [p.name for p in dest.parent.iterdir()] == ["pkg"]  # every leftover was from a dead process
    print(f"commit hammer: {trials} kills: {dict(outcomes)}")
    return outcomes


def test_sigkill_during_commits(tmp_path: Path) -> None:
    """A writer overwriting the same package in a loop, killed at random: always a complete package."""
    outcomes = _commit_trials(tmp_path, trials=16, seed=5)
    assert outcomes["complete"] >= 1


@pytest.mark.slow
def test_sigkill_during_commits_many(tmp_path: Path) -> None:
    _commit_trials(tmp_path, trials=100, seed=6)
