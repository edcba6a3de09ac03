"""Export parity in a fresh process, as a deployment host loads the package.

The exporting process has the model's code imported (its library registers pytree classes,
custom operators, Keras objects...). An artifact that loads only because of that passes an
in-process check and then fails ``verify``/``run`` on every other host. So export parity runs
here: one worker process per export (start-up cost is paid once for all artifacts) that
imports ``packager``, ``runtimes`` and the runtimes' frameworks and nothing else:

- ``sys.path`` is the interpreter's installed packages: Python runs with ``-E -P`` (no
  ``PYTHONPATH``, not the current folder, not the builder's or the user's script folder);
  the folder holding ``packager`` itself is added only when it is not installed;
- arrays travel as ``.npz`` files in the temporary package folder (the golden data is read
  from the very files that ship), verdicts come back as JSON lines, one per artifact;
- each artifact is judged by :func:`packager.exporting.check_parity`, the code in-process
  parity and ``verify`` use (:mod:`packager.fidelity.judge`);
- a worker that dies (a framework aborting in C++) fails the artifact it was on, and a new
  worker finishes the others.

``PACKAGER_PARITY_IN_PROCESS=1`` (or ``export(..., isolate=False)``) checks in the exporting
process instead: faster, for tests; it cannot catch an artifact that needs the model's code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from packager.manifest import Artifact, OutputNoise, Parity
from packager.signature import Signature

log = logging.getLogger("packager")

#: ``1``: export parity in the exporting process (faster; misses artifacts that need the model's code).
IN_PROCESS_ENV = "PACKAGER_PARITY_IN_PROCESS"
#: Seconds one worker may run before the artifact it is on fails (default :data:`DEFAULT_TIMEOUT`).
TIMEOUT_ENV = "PACKAGER_PARITY_TIMEOUT"
DEFAULT_TIMEOUT = 3600.0
#: Folder of the request, case files, results and log, inside the temporary package folder.
WORK_DIR = ".parity"
REQUEST = "request.json"
RESULTS = "results.jsonl"
WORKER_LOG = "worker.log"
#: Lines of the worker's log quoted when it dies.
LOG_TAIL = 15
#: What the message adds when an artifact fails only a fresh process can show.
FRESH = ("does not load or run without the model's code (checked in a fresh process that never imported it, "
         "as a deployment host loads the package): ")
SELF_CONTAINED = (" (an artifact must load without the model's library: plain tensor outputs, no classes or "
                  "custom operators that library registers)")

#: Run as ``python -E -P -c BOOT ROOT REQUEST INDEX...``: ``packager`` from the installed packages,
#: or from ROOT (the folder holding the parent's ``packager``) when it is not installed.
_BOOT = ("import importlib.util, os, sys\n"
         "root = sys.argv[1]\n"
         "spec = importlib.util.find_spec('packager')\n"
         "if spec is None or os.path.dirname(os.path.dirname(spec.origin or '')) != root:\n"
         "    sys.path.insert(0, root)\n"
         "from packager.fidelity.isolated import main\n"
         "sys.exit(main(sys.argv[2:]))\n")


def in_process_requested() -> bool:
    """Whether ``PACKAGER_PARITY_IN_PROCESS`` asks for in-process parity."""
    return os.environ.get(IN_PROCESS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class IsolatedRun:
    """What the worker(s) returned for one export."""

    parities: list[Parity]
    #: Top-level modules the (last) worker had imported when it finished: the proof that the
    #: model's code and other frameworks stayed out.
    modules: list[str] = field(default_factory=list)
    workers: int = 0
    seconds: float = 0.0


def worker_command() -> list[str]:
    """The worker's command line, up to the request path."""
    import packager

    root = str(Path(packager.__file__).resolve().parents[1])
    flags = ["-E", "-P"] + (["-s"] if sys.flags.no_user_site else [])
    return [sys.executable, *flags, "-c", _BOOT, root]


def _timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path.name


def run_isolated(root: Path, artifacts: Sequence[Artifact], signature: Signature,
                 golden: tuple[str, str], extra_cases: Sequence[tuple[Mapping[str, np.ndarray],
                                                                      Mapping[str, np.ndarray]]] = (),
                 atol: Any = None, rtol: Any = None, noise: Mapping[str, OutputNoise] | None = None,
                 device: str = "cpu") -> IsolatedRun:
    """Judge every artifact of the package being written in ``root`` in one fresh process.

    Args:
        root: The (temporary) package folder; artifact paths are relative to it.
        artifacts: The artifacts, parity not yet filled.
        golden: Package-relative paths of the golden inputs and reference outputs (case 0).
        extra_cases: More (inputs, reference) cases, e.g. at other dynamic sizes.
        atol, rtol, noise, device: As for :func:`packager.exporting.check_parity`.

    Returns:
        One :class:`Parity` per artifact, in order; an artifact that fails in the worker (load,
        run, a crash, a timeout) gets a failing one whose error says so.
    """
    started = time.perf_counter()
    work = root / WORK_DIR
    work.mkdir(exist_ok=True)
    cases = [{"inputs": golden[0], "reference": golden[1]}]
    for i, (inputs, reference) in enumerate(extra_cases, start=1):
        cases.append({"inputs": f"{WORK_DIR}/" + _save_npz(work / f"case-{i}-inputs.npz", inputs),
                      "reference": f"{WORK_DIR}/" + _save_npz(work / f"case-{i}-reference.npz", reference)})
    request = {"artifacts": [a.model_dump(mode="json") for a in artifacts],
               "signature": signature.model_dump(mode="json"), "cases": cases, "atol": atol, "rtol": rtol,
               "noise": {k: v.model_dump(mode="json") for k, v in (noise or {}).items()}, "device": device}
    (work / REQUEST).write_text(json.dumps(request), encoding="utf-8")
    results: dict[int, Parity] = {}
    modules: list[str] = []
    pending = list(range(len(artifacts)))
    workers = 0
    try:
        while pending:
            workers += 1
            done, modules, failure = _one_worker(work, pending)
            results.update(done)
            pending = [i for i in pending if i not in results]
            if pending and not failure:  # e.g. a framework calling exit(0) from C++
                failure = "the worker process exited without a verdict for it"
            if pending:
                # The worker died on the first artifact it had not answered: that one fails,
                # with what it printed meanwhile (a C++ abort's message), and a new worker
                # takes the rest.
                index = pending.pop(0)
                tail = _tail(work / f"artifact-{index}.log") or _tail(work / WORKER_LOG)
                results[index] = Parity(runtime=artifacts[index].runtimes[0], device=device, passed=False,
                                        error=FRESH + failure + (f": {tail}" if tail else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for parity in results.values():
        if parity.error and not parity.error.startswith(FRESH):
            parity.error = FRESH + parity.error + SELF_CONTAINED
    seconds = time.perf_counter() - started
    log.debug("export parity in %d fresh process(es): %.1f s; modules: %s", workers, seconds, ", ".join(modules))
    return IsolatedRun(parities=[results[i] for i in range(len(artifacts))], modules=modules, workers=workers,
                       seconds=seconds)


def _one_worker(work: Path, indices: list[int]) -> tuple[dict[int, Parity], list[str], str | None]:
    """Run one worker on ``indices``: (verdicts it wrote, its modules, why it failed or None)."""
    results_path = work / RESULTS
    results_path.unlink(missing_ok=True)
    log_path = work / WORKER_LOG
    failure = None
    with open(log_path, "wb") as log_file:
        try:
            proc = subprocess.run([*worker_command(), str(work / REQUEST), *map(str, indices)], cwd=work,
                                  stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                  timeout=_timeout(), check=False)
            if proc.returncode:
                failure = f"the worker process {_describe(proc.returncode)} while loading or running it"
        except subprocess.TimeoutExpired:
            failure = f"the worker process was stopped after {_timeout():g} s ({TIMEOUT_ENV}) on it"
    done: dict[int, Parity] = {}
    modules: list[str] = []
    if results_path.exists():
        for line in results_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a crash cut short
                continue
            if "parity" in record:
                done[int(record["index"])] = Parity.model_validate(record["parity"])
            modules = record.get("modules", modules)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if text.strip():
        log.debug("parity worker log:\n%s", text[-20000:])
    return done, modules, failure


def _tail(path: Path) -> str:
    """The last non-empty lines of a log, on one line."""
    if not path.exists():
        return ""
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return " / ".join(lines[-LOG_TAIL:])[-2000:]


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


# --- the worker side --------------------------------------------------------------------------


#: A line that ends a Python traceback, ``SomeError: message``, maybe behind a log prefix
#: (torch's ``W1204 04:07:46.539000 24449 torch/export/__init__.py:348] ``).
_EXCEPTION_LINE = re.compile(r"(?:^|\] )\s*((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception): \S.*)$")


def _logged_causes(text: str) -> list[str]:
    """Exceptions a framework printed (logged with their traceback) and then replaced with a
    vaguer one: ``torch.export.load`` logs "Deserializing X in pytree is not registered" and
    raises "check the warnings above"."""
    causes: list[str] = []
    for line in text.splitlines():
        found = _EXCEPTION_LINE.search(line.rstrip())
        if found and found.group(1)[:500] not in causes:
            causes.append(found.group(1)[:500])
    return causes[-2:]


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send this process's stderr (Python and C++ alike) to ``path`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as capture:
            os.dup2(capture.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _judge_one(check_parity: Any, root: Path, artifact: Artifact, signature: Signature,
               cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]], request: dict[str, Any],
               noise: dict[str, OutputNoise], capture: Path) -> Parity:
    """One artifact's parity; what the framework printed meanwhile goes on to the worker's log,
    and the exceptions it only printed are added to a failure as its cause."""
    device = request["device"]
    with _stderr_to(capture):
        try:
            parity = check_parity(root / artifact.path, artifact, signature, cases[0][0], cases[0][1],
                                  request["atol"], request["rtol"], device=device, extra_cases=cases[1:],
                                  noise=noise)
        except Exception as exc:  # a framework's own error escaping the runner: the artifact fails
            parity = Parity(runtime=artifact.runtimes[0], device=device, passed=False,
                            error=f"{type(exc).__name__}: {str(exc)[:1000]}")
    text = capture.read_text(encoding="utf-8", errors="replace")
    sys.stderr.write(text)
    causes = [c for c in _logged_causes(text) if c not in (parity.error or "")]
    if parity.error and causes:
        parity.error += " | cause: " + "; ".join(causes)
    return parity


def imported_packages() -> list[str]:
    """Top-level non-standard-library modules this process has imported."""
    tops = {name.split(".")[0] for name in list(sys.modules)}
    return sorted(t for t in tops - set(sys.stdlib_module_names) if not t.startswith("_"))


def _exit_with_parent() -> None:
    """Stop when the exporting process is gone (killed): nobody waits for the verdicts, and its
    temporary folder, where this process reads and writes, is deleted by the next export."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    """Worker entry point: ``REQUEST INDEX...``; appends one JSON line per artifact to ``RESULTS``."""
    _exit_with_parent()
    from packager.exporting import check_parity
    from packager.package import load_npz

    request_path = Path(argv[0])
    work = request_path.parent
    root = work.parent
    request = json.loads(request_path.read_text(encoding="utf-8"))
    signature = Signature.model_validate(request["signature"])
    noise = {k: OutputNoise.model_validate(v) for k, v in request["noise"].items()}
    cases = [(load_npz(root / c["inputs"]), load_npz(root / c["reference"])) for c in request["cases"]]
    with open(work / RESULTS, "a", encoding="utf-8") as out:
        for index in map(int, argv[1:]):
            artifact = Artifact.model_validate(request["artifacts"][index])
            parity = _judge_one(check_parity, root, artifact, signature, cases, request, noise,
                                work / f"artifact-{index}.log")
            out.write(json.dumps({"index": index, "parity": parity.model_dump(mode="json")}) + "\n")
            out.flush()  # what is written survives a later crash
        out.write(json.dumps({"modules": imported_packages()}) + "\n")
    return 0


if __name__ == "__main__":  # python -m packager.fidelity.isolated REQUEST INDEX...
    sys.exit(main(sys.argv[1:]))
