"""``packager run`` safety (issue 12 items 5, 6, 11): one writer per output, nothing stale left by
killed runs, refused path clashes and non-regular inputs, an honest progress log, Ctrl-C.

Every test drives real ``python -m packager run`` processes and kills or interrupts them at
moments fixed by observable state, never by sleeping:

* ``--progress-log FIFO``: the progress log is opened after the output lock is taken and the
  journal is written, and opening a FIFO for writing blocks until someone reads it. A run
  given a FIFO nobody reads therefore stops, holding its lock and its parts folder, for as
  long as the test wants.
* ``RLIMIT_FSIZE``: with ``SIGXFSZ`` at its default action, the kernel kills the process the
  moment it writes past the limit, i.e. in the middle of writing the first shard.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import runtimes
from packager.batch import RunConfig, run_dataset
from packager.batch.lock import OutputLock, lock_path
from packager.errors import InputError, UsageError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def _cmd(package: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "packager", "run", str(package), "-i", str(source), "-o", str(out), *extra]


def _env(**extra: str) -> dict[str, str]:
    # ONNX Runtime 1.31 keeps a telemetry database under ~/.cache and a '.ses' file in TMPDIR:
    # off, so that RLIMIT_FSIZE hits packager's own writes and TMPDIR holds only packager's files.
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "ORT_DISABLE_TELEMETRY": "1",
            **extra}


def _unpacked(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.iterdir() if p.name.startswith("packager-unpacked-"))


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_orphans():
    """A failing assertion must not leave a run blocked on its FIFO behind: kill what is still running."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _start(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=kwargs.pop("env", _env()), **kwargs)
    _STARTED.append(proc)
    return proc


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          env=kwargs.pop("env", _env()), **kwargs)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` until true; fail (with the child's stderr) if the child exits first or 60 s pass."""
    deadline = time.monotonic() + 60
    while not condition():
        if proc.poll() is not None:
            _, stderr = proc.communicate()
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {stderr}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _parts(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def _journal_exists(out: Path) -> Callable[[], bool]:
    return lambda: (_parts(out) / "journal.jsonl").is_file()


def _shards(out: Path) -> int:
    try:
        return sum('"shard"' in line for line in (_parts(out) / "journal.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _reference(package: Path, x: np.ndarray) -> np.ndarray:
    with runtimes.load(package) as runner:
        return runner.run({"x": x})["output"]


def _drain(fifo: Path, proc: subprocess.Popen) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Let a run blocked on its ``--progress-log`` FIFO go on: read the FIFO until the run ends."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        chunks = []
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    records = [json.loads(line) for line in b"".join(chunks).decode().splitlines()]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), records


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("safety")
    rng = np.random.default_rng(11)
    a = rng.standard_normal((3000, 16)).astype(np.float32)
    b = (rng.standard_normal((2000, 16)) + 5).astype(np.float32)
    np.save(root / "a.npy", a)
    np.save(root / "b.npy", b)
    big = rng.standard_normal((200_000, 16)).astype(np.float32)
    np.save(root / "big.npy", big)
    return {"root": root, "a": root / "a.npy", "b": root / "b.npy", "big": root / "big.npy", "xa": a, "xb": b,
            "xbig": big}


# --- item 5: one writer per output -------------------------------------------------------------


def test_second_writer_is_refused_while_the_first_holds_the_output(mlp_onnx_package: Path, inputs, tmp_path: Path
                                                                   ) -> None:
    out = tmp_path / "preds.npz"
    fifo = tmp_path / "progress.fifo"
    os.mkfifo(fifo)
    first = _start(_cmd(mlp_onnx_package, inputs["a"], out, "--batch-size", "100", "--shard-rows", "500",
                        "--progress-log", str(fifo), "-q"))
    # The journal exists (header only, no finished shard: what the second run used to delete), and the
    # first run now waits on its progress log, holding the lock.
    _wait_for(_journal_exists(out), first, "the first run's journal appeared")
    header = json.loads((_parts(out) / "journal.jsonl").read_text().splitlines()[0])
    lock = json.loads(lock_path(out).read_text())
    assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()

    second = _run(_cmd(mlp_onnx_package, inputs["b"], out, "--batch-size", "100", "-q"))
    assert second.returncode == 2, second.stderr
    message = " ".join(second.stderr.split())
    assert str(out) in message and f"pid {first.pid}" in message and socket.gethostname() in message
    assert "another 'packager run'" in message and "Fix:" in message and "Traceback" not in message
    # The live run's parts were not touched.
    assert json.loads((_parts(out) / "journal.jsonl").read_text().splitlines()[0]) == header
    # Even --overwrite does not take another live run's output.
    forced = _run(_cmd(mlp_onnx_package, inputs["b"], out, "--overwrite", "-q"))
    assert forced.returncode == 2 and f"pid {first.pid}" in " ".join(forced.stderr.split())

    done, records = _drain(fifo, first)
    assert done.returncode == 0, done.stderr
    assert records[-1]["event"] == "done" and records[-1]["rows"] == 3000
    with np.load(out) as data:  # the first run's rows only
        np.testing.assert_allclose(data["output"], _reference(mlp_onnx_package, inputs["xa"]), rtol=1e-6, atol=1e-6)
    assert not lock_path(out).exists() and not _parts(out).exists()
    # Once the first run is over, the output is free again.
    again = _run(_cmd(mlp_onnx_package, inputs["b"], out, "--overwrite", "-q"))
    assert again.returncode == 0, again.stderr
    assert np.load(out)["output"].shape == (2000, 4)


def test_a_killed_runs_lock_is_taken_over_and_the_run_resumes(mlp_onnx_package: Path, inputs, tmp_path: Path
                                                              ) -> None:
    out = tmp_path / "preds.npz"
    fifo = tmp_path / "progress.fifo"
    os.mkfifo(fifo)
    args = ["--batch-size", "100", "--shard-rows", "500"]
    first = _start(_cmd(mlp_onnx_package, inputs["a"], out, *args, "--progress-log", str(fifo)))
    _wait_for(_journal_exists(out), first, "the first run's journal appeared")
    _kill(first)
    assert json.loads(lock_path(out).read_text())["pid"] == first.pid  # a stale lock file: dead holder

    log = tmp_path / "progress.jsonl"
    second = _run(_cmd(mlp_onnx_package, inputs["a"], out, *args, "--progress-log", str(log)))
    assert second.returncode == 0, second.stderr
    assert f"took over the lock of a run that is gone (pid {first.pid}" in " ".join(second.stderr.split())
    np.testing.assert_allclose(np.load(out)["output"], _reference(mlp_onnx_package, inputs["xa"]), rtol=1e-6,
                               atol=1e-6)
    assert not lock_path(out).exists() and not _parts(out).exists()


def test_lock_in_process_refuses_a_second_holder_and_survives_a_deleted_file(tmp_path: Path) -> None:
    out = tmp_path / "o.npz"
    with OutputLock(out) as held:
        with pytest.raises(UsageError, match=f"pid {os.getpid()}") as info:
            OutputLock(out).acquire()
        assert info.value.exit_code == 2 and str(out) in str(info.value)
        assert held.path.exists()
    assert not lock_path(out).exists()
    # A lock file left by a dead process (no flock on it) is simply taken over.
    lock_path(out).write_text(json.dumps({"host": socket.gethostname(), "pid": 999_999_999}))
    taken = OutputLock(out).acquire()
    assert taken.previous == {"host": socket.gethostname(), "pid": 999_999_999}
    assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    taken.release()
    assert not lock_path(out).exists()


# --- item 6: nothing stale after kills; refused clashes ---------------------------------------------


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


# Python ignores SIGXFSZ at start-up (writes then fail with EFBIG); restore the default action so
# that the kernel kills the process the moment a write crosses RLIMIT_FSIZE.
_DIE_ON_FSIZE = ("import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
                 "from packager.cli import main; sys.exit(main(sys.argv[1:]))")


def test_folder_output_killed_mid_shard_leaves_no_temp_file_in_the_final_folder(mlp_onnx_package: Path, inputs,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "preds"
    args = ["run", str(mlp_onnx_package), "-i", str(inputs["a"]), "-o", f"{out}/", "--batch-size", "500",
            "--shard-rows", "1500", "-q"]
    # A shard here is 1500 rows x 4 float32 = 24 KB: the kill lands inside the first shard's write.
    killed = subprocess.run([sys.executable, "-c", _DIE_ON_FSIZE, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=TIMEOUT, env=_env(), preexec_fn=_limit_file_size(16 * 1024))
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr
    leftovers = list((_parts(out) / "data").glob(".part-*.tmp-*"))
    assert leftovers, f"the kill did not land in a shard write: {sorted(map(str, tmp_path.rglob('*')))}"
    assert not out.exists()

    resumed = _run([sys.executable, "-m", "packager", *args])
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.npz", "part-000001.npz"]
    got = np.concatenate([np.load(p)["output"] for p in sorted(out.iterdir())])
    np.testing.assert_allclose(got, _reference(mlp_onnx_package, inputs["xa"]), rtol=1e-6, atol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    again = _run([sys.executable, "-m", "packager", *args, "--overwrite"])  # the folder is replaceable
    assert again.returncode == 0, again.stderr


def test_killed_archive_runs_leave_no_unpacked_copy(mlp_onnx_package: Path, inputs, tmp_path: Path) -> None:
    from packager.packing import pack

    archive = pack(mlp_onnx_package, tmp_path / "model.tar.gz").path
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    env = _env(TMPDIR=str(tmp))
    fifo = tmp_path / "progress.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "o.npz"
    first = _start(_cmd(archive, inputs["a"], out, "--progress-log", str(fifo), "-q"), env=env)
    _wait_for(_journal_exists(out), first, "the first run's journal appeared")
    (live,) = _unpacked(tmp)
    assert live.name.startswith(f"packager-unpacked-{socket.gethostname()}-{first.pid}-")

    # Another run meanwhile: the live run's copy is left alone, its own copy is removed when it ends.
    other = _run(_cmd(archive, inputs["b"], tmp_path / "other.npz", "-q"), env=env)
    assert other.returncode == 0, other.stderr
    assert _unpacked(tmp) == [live]

    _kill(first)
    assert live.is_dir()  # the copy a SIGKILL leaves behind...
    resumed = _run(_cmd(archive, inputs["a"], out, "-q"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert _unpacked(tmp) == []  # ...is swept by the next run from an archive
    np.testing.assert_allclose(np.load(out)["output"], _reference(mlp_onnx_package, inputs["xa"]), rtol=1e-6,
                               atol=1e-6)


def test_output_overlapping_the_input_is_refused(mlp_onnx_package: Path, inputs, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "part-0.npy", inputs["xa"][:1000])
    np.save(shards / "part-1.npy", inputs["xa"][1000:])
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    proc = _run(_cmd(mlp_onnx_package, shards, shards, "--overwrite", "-q"))
    assert proc.returncode == 2 and "is the input" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    link = tmp_path / "link"
    link.symlink_to(shards, target_is_directory=True)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=inputs["xa"][:10])
    cases = [(shards, link, "is the input"), (shards, shards / "preds.npz", "inside the input folder"),
             (shards / "part-0.npy", f"{shards}/", "holds the input"), (npz, npz, "is the input")]
    for source, target, match in cases:
        with pytest.raises(UsageError, match=match) as info:
            run_dataset(mlp_onnx_package, source, target, config=RunConfig(overwrite=True))
        assert info.value.exit_code == 2
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before


def test_rejects_clashing_with_the_output_or_input_is_refused(mlp_onnx_package: Path, inputs, tmp_path: Path
                                                              ) -> None:
    out = tmp_path / "o.npz"
    proc = _run(_cmd(mlp_onnx_package, inputs["a"], out, "--on-error", "skip", "--rejects", str(out), "-q"))
    assert proc.returncode == 2 and "--rejects" in proc.stderr and "is the output" in proc.stderr
    assert not out.exists()
    for rejects, target, match in ((tmp_path / "dir" / "r.jsonl", f"{tmp_path / 'dir'}/", "inside the output"),
                                   (inputs["a"], out, "is the input")):
        with pytest.raises(UsageError, match=match):
            run_dataset(mlp_onnx_package, inputs["a"], target, config=RunConfig(on_error="skip", rejects=rejects,
                                                                                overwrite=True))
    assert inputs["a"].stat().st_size > 0 and np.load(inputs["a"]).shape == (3000, 16)


def test_fifo_input_is_refused_not_read_forever(mlp_onnx_package: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "x.npy"
    os.mkfifo(fifo)
    proc = _run(_cmd(mlp_onnx_package, fifo, tmp_path / "o.npz", "-q"))
    assert proc.returncode == 2 and "FIFO" in proc.stderr and "not a regular file" in proc.stderr
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", np.zeros((4, 16), np.float32))
    os.mkfifo(shards / "b.npy")
    with pytest.raises(InputError, match="FIFO"):
        run_dataset(mlp_onnx_package, shards, tmp_path / "p.npz")


# --- item 11: the progress log tells the truth; Ctrl-C ----------------------------------------------


def test_failed_run_logs_failed_not_done(mlp_onnx_package: Path, tmp_path: Path) -> None:
    x = np.ones((40, 16), np.float32)
    x[33, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    log = tmp_path / "log.jsonl"
    proc = _run(_cmd(mlp_onnx_package, tmp_path / "x.npy", tmp_path / "o.npz", "--batch-size", "8",
                     "--progress-log", str(log), "-q"))
    assert proc.returncode == 2
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records if r["event"] != "progress"] == ["failed"]
    assert records[-1]["exit_code"] == 2 and "row 33" in records[-1]["error"]
    # A run refused before it starts (here: the output exists) says so too.
    (tmp_path / "taken.npz").write_text("x")
    proc = _run(_cmd(mlp_onnx_package, tmp_path / "x.npy", tmp_path / "taken.npz", "--progress-log", str(log), "-q"))
    assert proc.returncode == 2
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "failed" and "already exists" in last["error"]


def test_every_line_of_the_progress_stream_is_json_even_when_onnxruntime_fails(tmp_path: Path) -> None:
    from tests.test_batch_run import _gather_model

    model = _gather_model(tmp_path / "gather.onnx")
    ids = np.random.default_rng(0).integers(0, 10, (200, 4))
    ids[[3, 17, 150]] = 42  # ONNX Runtime fails on these (and used to print coloured error lines)
    np.save(tmp_path / "ids.npy", ids)
    proc = _run(_cmd(model, tmp_path / "ids.npy", tmp_path / "o.npz", "--on-error", "skip", "--batch-size", "32",
                     "--quiet", "--progress-log", "-", "--json"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert records[-1]["event"] == "done" and records[-1]["rejected"] == 3
    assert json.loads(proc.stdout)["rejected"] == 3  # stdout: the --json summary only


def test_sigint_prints_the_message_exits_130_and_the_run_resumes(mlp_onnx_package: Path, inputs, tmp_path: Path
                                                                 ) -> None:
    out = tmp_path / "o.npy"
    log = tmp_path / "log.jsonl"
    args = ["--batch-size", "50", "--shard-rows", "200", "--progress-log", str(log), "-q", "--json"]
    proc = _start(_cmd(mlp_onnx_package, inputs["big"], out, *args))
    _wait_for(lambda: _shards(out) >= 1, proc, "the first shard was journalled")  # ~1000 shards still to go
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr
    assert "interrupted; nothing was left half-written" in stderr and "Aborted" not in stderr
    assert "Traceback" not in stderr and stdout == ""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["event"] == "interrupted" and "done" not in [r["event"] for r in records]
    assert not out.exists() and _shards(out) >= 1 and not lock_path(out).exists()
    # The line says how much was kept and how to go on; the log's last event says the same.
    kept = re.search(r"(\d+) of 200000 rows are saved in finished shards; run the same command again to resume "
                     r"from row (\d+)", stderr)
    assert kept and kept[1] == kept[2] and int(kept[1]) >= 200 and int(kept[1]) % 200 == 0, stderr
    assert records[-1]["saved"] == int(kept[1])

    resumed = _run(_cmd(mlp_onnx_package, inputs["big"], out, *args))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from"] == int(kept[1]) and summary["written"] == 200_000
    np.testing.assert_allclose(np.load(out), _reference(mlp_onnx_package, inputs["xbig"]), rtol=1e-5, atol=1e-5)
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "done"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
