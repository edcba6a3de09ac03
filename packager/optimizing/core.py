"""``packager optimize``: fp16 and int8 artifacts added to a package under an accuracy budget.

What a run does, in order:

1. opens the package (checksums, signature) and picks the source artifact (``onnx`` or
   ``openvino``) and the optimised format the registry derives from it at that precision;
2. reads the calibration rows (``--calibration`` file or folder, as ``packager run`` reads data;
   ``random`` only when asked, with a warning) and computes their fp32 reference outputs with the
   package's reference artifact (the one ``verify`` prefers: closest to eager); the golden case is
   judged against the eager model's golden outputs;
3. fp16: marks every node whose fp32 values leave the fp16 range on those rows as kept in fp32;
4. converts (:mod:`packager.optimizing.onnx_fp16`, ``onnx_int8``, ``openvino_int8``), runs the
   candidate on every case and judges it by the budget (:mod:`packager.fidelity.budget`, through
   the one judge); when the budget is missed, compares the candidate's intermediate tensors with
   the fp32 graph's (:mod:`packager.optimizing.localize`), keeps the nodes that added the most
   error in full precision and tries again, up to ``max_tries``;
5. measures the speed-up over the source artifact on this host, and writes the package again
   with the new artifact (atomically: a copy with the artifact added is swapped in; the other
   artifacts' files are not touched), its manifest entry recording the budget, the figures,
   every node kept and why, the calibration data's digest and the tool versions.

A budget that cannot be met is :class:`~packager.errors.FidelityError` (exit 1) with the best
candidate's figures; nothing is written.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from packager.errors import FidelityError, InputError, UsageError
from packager.fidelity.budget import DEFAULT_BUDGETS, Budget, parse_budget
from packager.fidelity.judge import Judge, as_parity
from packager.fidelity.metrics import OutputMetrics
from packager.manifest import Artifact, Manifest, Parity
from packager.optimizing.plan import Made, Plan
from packager.package import Package, PackageWriter
from packager.registry import FORMAT_RUNTIMES, FORMATS, REFERENCE_PREFERENCE
from packager.steps import step

log = logging.getLogger("packager")

#: Precision spellings -> the registry's precision names.
PRECISIONS = {"fp16": "float16", "float16": "float16", "int8": "int8"}
#: fp32 values beyond this share of fp16's largest finite value (65504) keep their node in fp32.
FP16_HEADROOM = 0.5
FP16_MAX = 65504.0
#: Share of the changed nodes each budget-search round keeps in full precision (then doubled).
KEEP_SHARE = 0.05
#: Rows of the calibration data the localisation runs (every tensor of two graphs is kept in memory).
LOCALIZE_ROWS = 8


@dataclass
class Attempt:
    """One try of the budget search."""

    number: int
    kept: int
    passed: bool
    #: Largest share of the budget used by any output in any case (1.0: the edge).
    use: float
    figures: dict[str, dict[str, dict[str, float | None]]]
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"try": self.number, "nodes_kept": self.kept, "passed": self.passed,
                "budget_use": _finite(self.use), "figures": self.figures, "problems": self.problems}


@dataclass
class OptimizeResult:
    """What :func:`optimize` added to the package."""

    path: Path
    artifact: Artifact
    attempts: list[Attempt]
    notes: list[str]

    @property
    def passed(self) -> bool:
        return self.artifact.passed


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def target_format(precision: str, source: str) -> str:
    """The optimised format the registry derives from ``source`` at ``precision``."""
    wanted = PRECISIONS.get(str(precision).lower())
    if wanted is None:
        raise UsageError("--precision", "is not one packager optimises to", expected="fp16 or int8", got=precision)
    for name, record in FORMATS.items():
        if record.precision == wanted and source in record.derived_from:
            return name
    choices = sorted({s for r in FORMATS.values() if r.precision == wanted for s in r.derived_from})
    raise UsageError(f"--from {source}", f"has no {precision} variant", expected=choices, got=source)


def _converter(fmt: str) -> Any:
    import importlib

    module, _, function = str(FORMATS[fmt].converter).partition(":")
    return getattr(importlib.import_module(module), function)


# --- data -------------------------------------------------------------------------------------
def calibration_batches(calibration: str | Path | Mapping[str, np.ndarray] | None, manifest: Manifest, rows: int,
                        batch_size: int, seed: int, notes: list[str]) -> tuple[list[dict[str, np.ndarray]],
                                                                                dict[str, Any]]:
    """The calibration rows in batches, and their record (source, rows, SHA-256 of the bytes)."""
    signature = manifest.signature
    if calibration is None:
        return [], {}
    if isinstance(calibration, str) and calibration == "random":
        arrays = signature.example_inputs(seed=seed, sizes={"batch": rows})
        origin = f"random (seed {seed}, generated from the signature)"
        message = ("calibrating on generated random inputs (--calibration random): int8 scales and the budget's "
                   "figures then describe noise, not your data; pass real rows for a result to ship")
        log.warning("%s", message)
        notes.append(message)
    elif isinstance(calibration, Mapping):
        arrays = {k: np.asarray(v) for k, v in calibration.items()}
        origin = "in memory"
    else:
        from packager.batch.io import open_dataset

        dataset = open_dataset(calibration, signature)
        parts: dict[str, list[np.ndarray]] = {}
        taken = 0
        for chunk in dataset.iter_chunks(0, min(batch_size, rows), signature):
            if chunk.bad:
                row, why = next(iter(chunk.bad.items()))
                raise InputError(f"calibration row {chunk.start + row}", f"cannot be used: {why}",
                                 fix="fix or drop the row; every calibration row is used")
            for name, array in chunk.arrays.items():
                parts.setdefault(name, []).append(array[:rows - taken])
            taken += min(chunk.rows, rows - taken)
            if taken >= rows:
                break
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        origin = str(calibration)
    from runtimes.feeds import FeedValidator

    arrays = FeedValidator(signature.inputs, cast="safe")(arrays)
    total = int(next(iter(arrays.values())).shape[0]) if arrays else 0
    if total == 0:
        raise InputError(f"calibration data {origin}", "has no rows", fix="pass a file with at least one row")
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    batches = [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, total, batch_size)]
    return batches, {"source": origin, "rows": total, "sha256": digest.hexdigest(), "batch_size": batch_size}


def _run_batches(runner: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    outs: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for name, value in runner.run(batch).items():
            outs.setdefault(name, []).append(np.asarray(value))
    return {k: np.concatenate(v) if v[0].ndim else v[0] for k, v in outs.items()}


def reference_artifact(manifest: Manifest) -> Artifact:
    """The full-precision artifact that computes the calibration rows' reference outputs."""
    for fmt in REFERENCE_PREFERENCE:
        if fmt in manifest.formats and manifest.artifact(fmt).passed:
            return manifest.artifact(fmt)
    raise InputError("the package", "has no full-precision artifact that passed parity to judge against",
                     fix="re-export the package")


# --- the run ----------------------------------------------------------------------------------
@dataclass
class _Run:
    package: Package
    manifest: Manifest
    source: Artifact
    target: str
    runtime: str
    budget: Budget
    method: str
    cases: list[tuple[str, list[dict[str, np.ndarray]], dict[str, np.ndarray]]]
    calibration: tuple[dict[str, np.ndarray], ...]
    notes: list[str]
    reduce_range: bool = False
    judge: Judge = field(default_factory=Judge)

    @property
    def kind(self) -> str:
        return f"budget:{self.budget}"

    def candidate(self, folder: Path, made: Made) -> Any:
        from runtimes import select

        return select(folder / made.path, self.target, self.runtime, signature=self.manifest.signature,
                      public_key=False).open("cpu", "safe")

    def judge_candidate(self, number: int, kept: int, folder: Path, made: Made) -> tuple[Attempt, list[OutputMetrics]]:
        figures: dict[str, dict[str, dict[str, float | None]]] = {}
        problems: list[str] = []
        worst: list[OutputMetrics] = []
        use = 0.0
        with self.candidate(folder, made) as runner:
            for name, batches, reference in self.cases:
                got = _run_batches(runner, batches)
                outputs = self.judge.compare(reference, got, self.kind).outputs
                for out in outputs:
                    figures.setdefault(name, {})[out.name] = {"cosine": _finite(out.cosine),
                                                              "top1": _finite(out.top1_agreement),
                                                              "max_abs": _finite(out.max_abs),
                                                              "rel": _finite((out.max_abs or 0) / out.scale)
                                                              if out.scale else None}
                    use = max(use, out.tolerance_use if out.tolerance_use is not None else float("inf"))
                    if not out.passed:
                        problems.append(f"{name} rows, output {out.name!r}: {out.problem}")
                if not worst or any(not o.passed for o in outputs):
                    worst = outputs
        return Attempt(number, kept, not problems, use, figures, problems), worst


def optimize(package: str | Path, *, precision: str, source: str = "onnx", method: str | None = None,
             calibration: str | Path | Mapping[str, np.ndarray] | None = None, budget: str | None = None,
             max_tries: int = 4, calibration_rows: int = 256, batch_size: int = 32, overwrite: bool = False,
             seed: int = 0, measure_speed: bool = True, reduce_range: bool = False) -> OptimizeResult:
    """Add an fp16 or int8 artifact to a package, judged against the fp32 reference by a budget.

    Args:
        package: Package folder.
        precision: ``fp16`` or ``int8``.
        source: The artifact to optimise: ``onnx`` (fp16, int8) or ``openvino`` (int8, NNCF).
        method: int8: ``dynamic`` (no calibration) or ``static`` (default when calibration data
            is given; OpenVINO is static only).
        calibration: Rows to calibrate and judge on: an .npz/.npy/.parquet file or folder (as
            ``packager run`` reads), a dict of arrays, or ``"random"`` (generated, with a warning).
            Without it the golden rows alone are judged.
        budget: e.g. ``"cosine>=0.999,top1>=0.99,max_abs<=1e-2"`` (default:
            :data:`~packager.fidelity.budget.DEFAULT_BUDGETS`).
        max_tries: Conversions tried, each keeping more of the costliest nodes in full precision.
        calibration_rows: The most calibration rows read.
        batch_size: Rows per runtime call (and per calibration batch).
        overwrite: Replace an optimised artifact of the same format already in the package.
        seed: Seed of ``calibration="random"``.
        measure_speed: Time the new artifact against its source on this host (recorded).
        reduce_range: int8 ONNX: 7-bit weights, which cannot saturate ONNX Runtime's uint8 x int8
            kernels on x86 hosts without VNNI (:class:`~packager.optimizing.plan.Plan`).

    Raises:
        FidelityError: No candidate met the budget (exit 1; the best one's figures; nothing written).
        UsageError, InputError: Bad options, a missing source artifact, unusable calibration data.
    """
    from packager.archive import is_archive

    if is_archive(Path(package)):
        raise UsageError(str(package), "is an archive; optimize adds an artifact to a package folder",
                         fix="unpack it (tar -xzf) or optimise the folder before 'packager pack'")
    if max_tries < 1 or calibration_rows < 1 or batch_size < 1:
        raise UsageError("--max-tries, --calibration-rows and --batch-size", "must be at least 1",
                         got=[max_tries, calibration_rows, batch_size])
    target = target_format(precision, source)
    wanted = FORMATS[target].precision or ""
    pkg = Package(package)
    manifest = pkg.manifest
    if source not in manifest.formats:
        raise InputError(f"{source} artifact", "is not in this package", expected=source, got=manifest.formats,
                         fix=f"export with --formats including {source}, then optimise it")
    if target in manifest.formats and not overwrite:
        raise UsageError(f"{target} artifact", "is already in this package", fix="pass --overwrite to replace it")
    method = method or ("fp16" if wanted == "float16" else "static" if calibration is not None or
                        source == "openvino" else "dynamic")
    allowed = ("fp16",) if wanted == "float16" else ("static",) if source == "openvino" else ("dynamic", "static")
    if method not in allowed:
        raise UsageError(f"--method {method}", f"does not apply to {target}", expected=", ".join(allowed), got=method)
    if method == "static" and calibration is None:
        raise UsageError("--method static", "needs calibration data",
                         fix="pass --calibration data.npz (your rows), or --calibration random (generated, a warning)")
    spent = parse_budget(budget or DEFAULT_BUDGETS[wanted])
    notes: list[str] = []
    batches, calib_record = calibration_batches(calibration, manifest, calibration_rows, batch_size, seed, notes)
    golden_in, golden_out = pkg.golden()
    ref_art = reference_artifact(manifest)
    cases: list[tuple[str, list[dict[str, np.ndarray]], dict[str, np.ndarray]]] = [("golden", [golden_in], golden_out)]
    if batches:
        from runtimes import select_artifact

        with step("optimize", "calibration reference"), \
                select_artifact(pkg, ref_art, ref_art.runtimes[0]).open("cpu", "safe") as runner:
            cases.append(("calibration", batches, _run_batches(runner, batches)))
    else:
        notes.append("no calibration data: judged on the golden rows only (pass --calibration for a verdict on "
                     "your data)")
    run = _Run(pkg, manifest, manifest.artifact(source), target, FORMAT_RUNTIMES[target][0], spent, method, cases,
               tuple(batches), notes, reduce_range=reduce_range)
    with tempfile.TemporaryDirectory(prefix=".packager-optimize-") as scratch:
        best_dir, best_made, best, attempts, worst = _search(run, Path(scratch), max_tries)
        if not best.passed:
            raise FidelityError(f"{target} of {manifest.name}", f"misses the budget {spent} after {len(attempts)} "
                                f"tr{'y' if len(attempts) == 1 else 'ies'}; best candidate ({best.kept} nodes kept in "
                                f"full precision): {'; '.join(best.problems[:4])}",
                                fix="loosen --budget, give more --max-tries, use --method static with real "
                                    "--calibration rows, or ship the fp32 artifact")
        with step("optimize", "speed"):
            speed = _speed(run, best_dir, best_made, batches or [golden_in]) if measure_speed else None
        artifact = _artifact(run, best_made, best, attempts, worst, calib_record, speed, ref_art)
        with step("optimize", "write package"):
            path = _write(pkg, manifest, artifact, best_dir, notes)
    return OptimizeResult(path=path, artifact=artifact, attempts=attempts, notes=notes)


def _search(run: _Run, scratch: Path, max_tries: int) -> tuple[Path, Made, Attempt, list[Attempt], list[OutputMetrics]]:
    """Convert, judge, keep the costliest nodes in full precision, again; the best try."""
    convert = _converter(run.target)
    src = run.package.resolve(run.source.path)
    keep: dict[str, str] = _overflow_nodes(src, run) if run.method == "fp16" else {}
    attempts: list[Attempt] = []
    best: tuple[Path, Made, Attempt, list[OutputMetrics]] | None = None
    share = KEEP_SHARE
    for number in range(1, max_tries + 1):
        folder = scratch / f"try{number}"
        folder.mkdir()
        plan = Plan(method=run.method, keep=tuple(keep), reasons=dict(keep), calibration=run.calibration,
                    reduce_range=run.reduce_range,
                    work=scratch)
        with step("optimize", f"try {number}"):
            made = convert(src, folder, plan)
        if not made.changed and attempts:
            run.notes.append(f"try {number} would keep every node in full precision: the search stopped at the "
                             f"best of {len(attempts)} tries")
            break
        if not made.changed:
            raise FidelityError(f"{run.target} of {run.manifest.name}",
                                f"{'converted' if run.method == 'fp16' else 'quantised'} no node: the artifact would "
                                f"be the fp32 model under a {run.target} name",
                                fix="this model has no operator the tool optimises (int8: Conv, MatMul, Gemm...), "
                                    "or every one was kept; ship the fp32 artifact")
        made.record["kept"] = [{"node": n, "why": why} for n, why in keep.items()]
        with step("optimize", f"judge try {number}"):
            attempt, outputs = run.judge_candidate(number, len(keep), folder, made)
        attempts.append(attempt)
        log.info("optimize try %d: %d nodes kept, budget use %.3g, %s", number, len(keep), attempt.use,
                 "pass" if attempt.passed else "miss")
        if best is None or attempt.use < best[2].use:
            best = (folder, made, attempt, outputs)
        if attempt.passed or number == max_tries:
            break
        added = _costliest(run, src, folder, made, keep, share)
        if not added:
            run.notes.append(f"try {number} missed the budget and no node could be named as the cost "
                             f"({'OpenVINO IR is not localised' if run.target.startswith('openvino') else 'no matching tensors'})")
            break
        keep.update(added)
        share *= 2
    assert best is not None
    return best[0], best[1], best[2], attempts, best[3]


def _localize_feeds(run: _Run) -> dict[str, np.ndarray]:
    """A few rows to localise on: the calibration data's first rows, else the golden ones."""
    if run.calibration:
        return {k: v[:LOCALIZE_ROWS] for k, v in run.calibration[0].items()}
    return run.cases[0][1][0]


def _overflow_nodes(src: Path, run: _Run) -> dict[str, str]:
    """Nodes that read or write fp32 values beyond fp16's range (with headroom) on the
    localisation rows: the node that makes a large value and every node that reads it compute in
    fp32, so the value is never stored as fp16 (a kept producer alone would hand its consumer an
    fp16 Inf)."""
    from onnx import numpy_helper

    from packager.optimizing.localize import load_model, run_all

    model = load_model(src)
    feeds = _localize_feeds(run)
    values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values.update(feeds)
    values.update(run_all(model, feeds))
    tops: dict[str, float] = {}
    for name, value in values.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and value.size:
            tops[name] = float(np.abs(value[np.isfinite(value)]).max(initial=0.0))
    keep = {}
    for node in model.graph.node:
        big = [(t, tops[t]) for t in [*node.input, *node.output] if tops.get(t, 0.0) > FP16_HEADROOM * FP16_MAX]
        if big:
            tensor, top = max(big, key=lambda kv: kv[1])
            role = "writes" if tensor in node.output else "reads"
            keep[node.name or node.output[0]] = (f"{role} {tensor!r} with fp32 values up to {top:.3g}: beyond the "
                                                 "fp16 range (65504) with headroom")
    return keep


def _costliest(run: _Run, src: Path, folder: Path, made: Made, keep: dict[str, str], share: float) -> dict[str, str]:
    """The changed nodes that added the most error, to keep in full precision next try."""
    if not run.target.startswith("onnx"):
        return {}
    from packager.optimizing.localize import load_model, localize, owners

    reference = load_model(made.reference or src)
    found = localize(reference, load_model(folder / made.path), _localize_feeds(run))
    count = max(1, int(math.ceil(len(made.changed) * share)))
    if run.method == "fp16":
        return {n.node: f"added 1-cosine {n.gain:.3g} ({n.op}), the costliest after {len(keep)} kept"
                for n in found.costliest(count, set(keep))}
    # int8: only the nodes the quantiser changed can be excluded from it (QDQ quantises Add,
    # MaxPool... too); the error a node after one adds (a Relu it fused) is charged to it.
    owner = owners(reference, set(made.changed))
    ops = {n.name or n.output[0]: n.op_type for n in reference.graph.node}
    cost: dict[str, float] = {}
    for n in found.nodes:
        if n.gain > 0 and owner.get(n.node) and owner[n.node] not in keep:
            cost[owner[n.node]] = cost.get(owner[n.node], 0.0) + n.gain
    ranked = sorted(cost.items(), key=lambda kv: -kv[1])[:count]
    return {name: f"added 1-cosine {gain:.3g} ({ops.get(name, '?')} and the nodes after it up to the next quantised "
                  f"one), the costliest after {len(keep)} kept" for name, gain in ranked}


def _speed(run: _Run, folder: Path, made: Made, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Median latency of the source artifact and the new one on the same batch, this host."""
    import platform

    from packager.bench import _time_calls
    from runtimes import select_artifact

    feeds = batches[0]
    rows = int(next(iter(feeds.values())).shape[0])
    with select_artifact(run.package, run.source, run.source.runtimes[0]).open("cpu", "safe") as fp32:
        base = float(np.median(_time_calls(fp32, feeds, 0.5, 200, 3)))
    with run.candidate(folder, made) as candidate:
        new = float(np.median(_time_calls(candidate, feeds, 0.5, 200, 3)))
    return {"host": platform.node(), "batch_size": rows, f"{run.source.format}_ms": round(base * 1e3, 4),
            f"{run.target}_ms": round(new * 1e3, 4), "speedup": round(base / new, 3) if new > 0 else None,
            "how": "median of >= 5 timed calls after 3 warm-up calls, one runner each, same batch"}


def _artifact(run: _Run, made: Made, best: Attempt, attempts: list[Attempt], outputs: list[OutputMetrics],
              calibration: dict[str, Any], speed: dict[str, Any] | None, reference: Artifact) -> Artifact:
    record = {**made.record, "precision": FORMATS[run.target].precision, "from": run.source.format,
              "method": run.method, "budget": str(run.budget), "calibration": calibration or None,
              "reference": {"golden": run.manifest.golden.reference if run.manifest.golden else None,
                            "calibration": f"artifact {reference.format} ({reference.runtimes[0]})"
                            if calibration else None},
              "nodes_changed": len(made.changed), "changed_nodes": made.changed, "figures": best.figures,
              "tries": [a.to_dict() for a in attempts], "speed": speed}
    parity = Parity(runtime=run.runtime, device="cpu", passed=best.passed, outputs=[as_parity(o) for o in outputs],
                    notes=[f"judged by the budget {run.budget} against the fp32 reference, not by fp32 tolerances"])
    return Artifact(format=run.target, path=f"{run.target}/{made.path}", files=[], runtimes=[run.runtime],
                    options={"budget": str(run.budget), "optimization": record}, parity=[parity])


def _link_or_copy(src: Path, dst: Path) -> None:
    # Published package files are read-only and never rewritten in place: a hard link is a safe
    # copy that costs no space; another file system gets a real copy.
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write(pkg: Package, manifest: Manifest, artifact: Artifact, folder: Path, notes: list[str]) -> Path:
    """The package again, with ``artifact`` added (or replacing one of its format), swapped in atomically."""
    from packager.signing import SIGNATURE_NAME

    kept = [a for a in manifest.artifacts if a.format != artifact.format]
    files = [f for a in kept for f in a.files] + ([manifest.golden.inputs, manifest.golden.outputs]
                                                  if manifest.golden else [])
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    with PackageWriter(pkg.root, overwrite=True, reserve=size) as writer:
        for entry in files:
            _link_or_copy(pkg.resolve(entry.path), writer.root / entry.path)
        dest = writer.path(artifact.format)
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        artifact.files = writer.files(artifact.format)
        if (pkg.root / SIGNATURE_NAME).exists():
            notes.append(f"the package's signature ({SIGNATURE_NAME}) did not cover the new artifact and was "
                         "removed: sign the package again (packager sign)")
        updated = manifest.model_copy(update={"artifacts": [*kept, artifact]})
        started = time.perf_counter()
        path = writer.commit(updated)
        log.debug("package rewritten in %.2f s", time.perf_counter() - started)
    return path


__all__ = ["OptimizeResult", "Attempt", "optimize", "target_format", "calibration_batches"]
