"""Resume: a run killed at any point restarts with the same arguments and writes every row once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from packager.batch import RunConfig, run_dataset
from packager.batch.core import ChunkRunner
from packager.batch.journal import Journal
from packager.errors import UsageError

pq = pytest.importorskip("pyarrow.parquet")

ROWS = 60_000
BAD = [5, 12_345, 40_001, ROWS - 1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    from packager.batch.io import to_arrow_table

    root = tmp_path_factory.mktemp("resume")
    x = np.random.default_rng(7).standard_normal((ROWS, 16)).astype(np.float32)
    x[BAD, 3] = np.nan
    pq.write_table(to_arrow_table({"id": np.arange(ROWS), "x": x}), root / "in.parquet", row_group_size=7_000)
    return root / "in.parquet", x


def _args(package: Path, source: Path, out: Path) -> list[str]:
    ids = ["--id-column", "id"] if out.suffix != ".npy" else []  # a .npy output holds one array
    return [sys.executable, "-m", "packager", "run", str(package), "-i", str(source), "-o", str(out), *ids,
            "--on-error", "skip", "--batch-size", "500", "--shard-rows", "1500", "-q", "--json"]


def _check(out: Path, x: np.ndarray, reference: np.ndarray) -> None:
    good = np.setdiff1d(np.arange(ROWS), BAD)
    if out.suffix == ".npy":  # written in place: rows appended, header patched at the end
        y = np.load(out)
    else:
        with np.load(out) as data:
            ids, y = data["id"], data["output"]
        np.testing.assert_array_equal(ids, good)  # every good row exactly once, in input order
    np.testing.assert_array_equal(y, reference[good])  # bit-identical: same batches as an uninterrupted run
    rejects = [json.loads(line) for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == BAD
    if out.suffix != ".npy":
        assert [r["id"] for r in rejects] == BAD
    assert not list(out.parent.glob(f".{out.name}*")), "journal or temp files left behind"


def _crash_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """Fault injection: the batch after the first ``batches`` dies like a Ctrl-C."""
    original = ChunkRunner.run_chunk
    calls = {"n": 0}

    def crash(self, chunk):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return original(self, chunk)

    monkeypatch.setattr(ChunkRunner, "run_chunk", crash)


@pytest.mark.parametrize("name", ["out.npz", "out.npy"])
def test_sigkill_at_random_points_then_resume_gives_every_row_once(mlp_onnx_package: Path, dataset, tmp_path: Path,
                                                                   name: str) -> None:
    source, x = dataset
    ref_out = tmp_path / "ref.npz"
    proc = subprocess.run(_args(mlp_onnx_package, source, ref_out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(ref_out) as data:
        reference = np.zeros((ROWS, 4), np.float32)
        reference[data["id"]] = data["output"]

    out = tmp_path / name
    rng = random.Random(1234)
    journal = out.parent / f".{out.name}.parts" / "journal.jsonl"
    total_shards = -(-ROWS // 1500)

    def shards() -> int:
        try:
            return sum('"shard"' in line for line in journal.read_text().splitlines())
        except OSError:
            return 0

    partial = []
    stdout = None
    for attempt in range(6):
        child = subprocess.Popen(_args(mlp_onnx_package, source, out), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        if attempt == 0:
            time.sleep(rng.uniform(0.0, 0.4))  # anywhere during start-up
        else:
            # A random shard count to reach, then a random slice of time: lands anywhere in a shard's
            # write, its journal append, or (for the last attempts) the final assembly.
            target = rng.randint(min(shards() + 1, total_shards), total_shards)
            deadline = time.monotonic() + 120
            while shards() < target and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
        if child.poll() is not None:
            stdout, stderr = child.communicate()
            parts = journal.parent
            state = sorted(str(p.relative_to(parts)) for p in parts.rglob("*")) if parts.exists() else "no parts"
            assert child.returncode == 0, (stderr, partial, state)
            break  # it finished before the kill
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        partial.append(shards())
        if out.exists() and not journal.parent.exists():
            break  # the kill landed after the run had finished: nothing left to resume
    if stdout is None and (journal.parent.exists() or not out.exists()):  # something left to resume
        final = subprocess.run(_args(mlp_onnx_package, source, out), capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr
        stdout = final.stdout
    if stdout is not None:
        summary = json.loads(stdout)
        assert summary["written"] == ROWS - len(BAD) and summary["rejected"] == len(BAD)
        assert summary["resumed_from"] > 0, partial
    assert any(0 < n for n in partial), f"no kill landed mid-run (journalled shards after kills: {partial})"
    _check(out, x, reference)


def test_interrupted_run_resumes_from_the_last_shard(mlp_onnx_package: Path, dataset, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    source, x = dataset
    config = RunConfig(batch_size=500, shard_rows=1500, id_column="id", on_error="skip")
    reference = run_dataset(mlp_onnx_package, source, tmp_path / "ref.npz", config=config)
    with np.load(reference.output) as data:
        ref = np.zeros((ROWS, 4), np.float32)
        ref[data["id"]] = data["output"]

    out = tmp_path / "out.npz"
    _crash_after(monkeypatch, 25)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(mlp_onnx_package, source, out, config=config)
    monkeypatch.undo()
    assert not out.exists()
    journal = out.parent / f".{out.name}.parts" / "journal.jsonl"
    with open(journal, "a") as fh:
        fh.write('{"shard": 99, "start": ')  # a torn line from a kill mid-append
    summary = run_dataset(mlp_onnx_package, source, out, config=config)
    assert summary.resumed_from > 0 and summary.resumed_from % 1500 == 0
    _check(out, x, ref)


def test_kill_after_the_final_rename_finishes_cleanly(mlp_onnx_package: Path, dataset, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = dataset
    out = tmp_path / "dir_out"
    config = RunConfig(batch_size=4000, shard_rows=20_000, id_column="id", on_error="skip")

    def die(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "mark_done", die)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(mlp_onnx_package, source, out, config=config)
    monkeypatch.undo()
    assert out.is_dir() and len(list(out.iterdir())) == 3
    summary = run_dataset(mlp_onnx_package, source, out, config=config)
    assert any("already complete" in n for n in summary.notes)
    assert summary.written == ROWS - len(BAD)
    assert not (tmp_path / ".dir_out.parts").exists()


def test_other_arguments_do_not_resume_someone_elses_shards(mlp_onnx_package: Path, dataset, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = dataset
    out = tmp_path / "o.parquet"
    config = RunConfig(batch_size=1000, shard_rows=5000, on_error="skip")
    _crash_after(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(mlp_onnx_package, source, out, config=config)
    monkeypatch.undo()
    other = RunConfig(batch_size=2000, shard_rows=5000, on_error="skip")
    with pytest.raises(UsageError, match="unfinished run with different arguments"):
        run_dataset(mlp_onnx_package, source, out, config=other)
    other.overwrite = True
    summary = run_dataset(mlp_onnx_package, source, out, config=other)
    assert summary.resumed_from == 0 and summary.written == ROWS - len(BAD)


def test_small_outputs_are_cut_into_shards_by_time_so_a_kill_loses_bounded_work(tmp_path: Path) -> None:
    """A classifier writes a few bytes a row: cutting shards by output size alone (32 MB) would
    keep millions of rows in memory, all lost to a kill. With no --shard-rows, a shard is also
    cut once SHARD_SECONDS of work are buffered (the clock is driven here, not slept on)."""
    from packager.batch.core import ChunkResult
    from packager.batch.sink import SHARD_BYTES, SHARD_SECONDS, OutputSink, resolve_output

    now = [0.0]
    out = resolve_output(tmp_path / "o.npz", None, "npz", "raise")
    journal = Journal(out.path, {"case": "time cut"})
    journal.open(overwrite=False)
    sink = OutputSink(out, journal, shard_rows=None, clock=lambda: now[0])
    logits = np.zeros((100, 10), np.float32)  # 4 kB a chunk: SHARD_BYTES is far away
    assert 50 * logits.nbytes < SHARD_BYTES
    for i in range(50):
        now[0] += SHARD_SECONDS / 10  # each chunk takes a tenth of the interval
        sink.add(ChunkResult(i * 100, 100, {"logits": logits}))
    assert [e.rows for e in journal.entries] == [1000] * 5  # one shard per SHARD_SECONDS of work
    sink.finalize()
    journal.close()
    with np.load(out.path) as data:
        assert data["logits"].shape == (5000, 10)
