"""``packager verify``: the fidelity engine's orchestration.

A verification checks every artifact x runtime x device cell of a package:

1. the contract first (ONNX graph declarations, then each run's output names, dtypes, ranks
   and dynamic axes) so a renamed output is never reported as a numeric error;
2. the golden case against the golden outputs (or the eager model with ``reference="eager"``);
3. a shape sweep (batch 1, an odd batch, the declared extremes of other dynamic dims) and
   batch consistency (row i of a batched run equals row i run alone);
4. per-output metrics judged by :class:`packager.fidelity.judge.Judge`, the rules export parity
   applies (the outputs' rounding noise recorded at export, relative to each output's scale),
   raised to a measured noise floor when the live reference is not deterministic.

Cases with new inputs need a live reference: the package's designated reference artifact (the
one closest to eager: TorchScript/torch.export, SavedModel, Paddle inference) once it passed
its own golden check, or the eager model. Each case records which reference it used.

:class:`Verification` runs these as one method per phase; :func:`verify` is its thin wrapper.
The report models live in :mod:`packager.fidelity.report` (re-exported here).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from packager import registry
from packager.errors import ContractError, InputError, PackagerError, TrustRequiredError, UsageError, did_you_mean
from packager.fidelity.contract import check_outputs, native_contract, onnx_contract
from packager.fidelity.judge import Judge, conversion_kind, judge_for
from packager.fidelity.metrics import OutputMetrics, noise_floor
from packager.fidelity.onnx_checks import Check
from packager.fidelity.report import (REPORT_VERSION, VERDICT_CODES, CaseResult, VerifyReport, VerifyRow, Worst,
                                      _worse, report_json_schema)
from packager.fidelity.sweep import Case, onnx_int_ranges, plan_cases, take_rows
from packager.manifest import Artifact
from packager.package import Package, load_npz
from packager.signature import Signature

#: Which artifact serves as the live reference, closest to eager first; ONNX only as a last resort.
REFERENCE_PREFERENCE = registry.REFERENCE_PREFERENCE
# The report models live in packager.fidelity.report (the renderers read them there); imported
# here, where they were defined before, so `from packager.verifying import VerifyReport` works.
__all__ = ["REFERENCE_PREFERENCE", "REPORT_VERSION", "VERDICT_CODES", "CaseResult", "Verification", "VerifyOptions",
           "VerifyReport", "VerifyRow", "Worst", "describe", "report_json_schema", "verify"]


# --- references -------------------------------------------------------------------------------
class _EagerReference:
    """The eager model rebuilt from its source with the exporter's own loader."""

    def __init__(self, package: Package, source: str | None, builder: str | None, state_key: str | None,
                 trust: bool) -> None:
        from packager.exporters import SourceOptions, exporter

        manifest = package.manifest
        if not trust:
            # The manifest's source path and builder are written by whoever wrote the package:
            # importing them would run the package's code (a shipped build.py, a pickled save).
            named = [flag for flag, mine, recorded in (("--source", source, manifest.source.path),
                                                        ("--builder", builder, manifest.source.builder))
                     if mine is None and recorded]
            if named:
                raise TrustRequiredError(
                    "--reference eager", f"would load {', '.join(named)} from the package's manifest "
                    f"({manifest.source.path!r}, builder {manifest.source.builder!r}): a package cannot choose "
                    "the code that judges it", expected="the source (and builder) named by you", got="none given",
                    fix=f"pass {' and '.join(named)} yourself, or --trust if you know where the package comes from")
        src = source or manifest.source.path
        if not src:
            raise UsageError("--reference eager", "needs the model's source, which the manifest does not record",
                             fix="pass --source CHECKPOINT (and --builder module:function for weights-only saves)")
        if not Path(src).exists():
            raise InputError(f"source {src!r}", "does not exist on this host",
                             fix="pass --source with the path of the training-time save here")
        self.fw = exporter(manifest.source.framework)
        recorded = manifest.extra.get("source_options", {})  # e.g. a SavedModel --signature
        self.loaded = self.fw.load_source(src, SourceOptions(builder=builder or manifest.source.builder,
                                                             state_key=state_key or recorded.get("state_key"),
                                                             signature_key=recorded.get("signature_key"),
                                                             trust=trust))
        self.names = manifest.signature.output_names
        self.label = f"eager {manifest.source.framework} ({Path(src).name})"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.fw.run_eager(self.loaded, dict(feeds))))


class _ArtifactReference:
    def __init__(self, row: VerifyRow, runner: Any) -> None:
        self.row = row
        self.runner = runner
        self.label = f"artifact {row.format} ({row.runtime}, {row.device})"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.run(feeds)


# --- helpers ----------------------------------------------------------------------------------
def _load_user_inputs(inputs: str | Path | Mapping[str, np.ndarray], signature: Signature) -> dict[str, np.ndarray]:
    from runtimes.feeds import FeedValidator

    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if not path.is_file():
            raise InputError(str(path), "does not exist", fix="pass an .npz whose keys are the input names")
        data = load_npz(path)
    else:
        data = {k: np.asarray(v) for k, v in inputs.items()}
    return FeedValidator(signature.inputs, cast="safe")(data)


def _parse_ranges(ranges: Mapping[str, tuple[float, float]] | None, signature: Signature) -> Signature:
    if not ranges:
        return signature
    specs = []
    for spec in signature.inputs:
        if spec.name in ranges:
            low, high = ranges[spec.name]
            if not low < high:
                raise UsageError(f"input range of {spec.name!r}", "is empty", expected="LOW < HIGH",
                                 got=f"{low}:{high}")
            spec = spec.model_copy(update={"value_range": (float(low), float(high))})
        specs.append(spec)
    unknown = sorted(set(ranges) - set(signature.input_names))
    if unknown:
        raise UsageError(f"input range(s) for {unknown}", "name no input", expected=signature.input_names)
    return signature.model_copy(update={"inputs": specs})


class _Judging:
    """Numeric comparisons queued while the cases run and figured together at the end
    (:meth:`Judge.compare_cases`): one numpy pass per figure over all cases instead of one per case."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self.queue: list[tuple[CaseResult, VerifyRow, Mapping[str, np.ndarray], Mapping[str, np.ndarray],
                               str | None]] = []

    def add(self, result: CaseResult, row: VerifyRow, reference: Mapping[str, np.ndarray],
            got: Mapping[str, np.ndarray], note_if_failed: str | None = None) -> CaseResult:
        self.queue.append((result, row, reference, got, note_if_failed))
        return result

    def finish(self) -> None:
        judged = self.judge.compare_cases([(ref, got, row.conversion, row.device)
                                           for _, row, ref, got, _ in self.queue])
        for (result, row, ref, got, note), outcome in zip(self.queue, judged):
            _settle(result, outcome.outputs)
            if note and not result.passed:
                result.notes.append(note)
            _keep(row, result, ref, got)
        self.queue = []


def _settle(result: CaseResult, outputs: list[OutputMetrics]) -> None:
    """Give a case its figures and the verdict they make with its contract problems."""
    verdict = "contract" if result.contract else "pass"
    for out in outputs:
        if not out.passed:
            verdict = _worse(verdict, "contract" if out.verdict == "contract" else "numeric")
    result.outputs, result.verdict, result.passed = outputs, verdict, verdict == "pass"


def _judge(case: Case, reference: Mapping[str, np.ndarray], ref_label: str, got: Mapping[str, np.ndarray],
           signature: Signature, row: VerifyRow, judge: Judge,
           judging: _Judging | None = None, note_if_failed: str | None = None) -> CaseResult:
    """The case's result: its contract problems now, its figures now or, with ``judging``, once
    :meth:`_Judging.finish` runs."""
    contract = check_outputs(signature, got, case.inputs)
    result = CaseResult(case=case.name, inputs=case.shapes(), reference=ref_label, verdict="pass", passed=True,
                        contract=contract, notes=list(case.notes))
    if judging is not None:
        return judging.add(result, row, reference, got, note_if_failed)
    _settle(result, judge.compare(reference, got, row.conversion, row.device).outputs)
    if note_if_failed and not result.passed:
        result.notes.append(note_if_failed)
    _keep(row, result, reference, got)
    return result


def _consistency(case: Case, batched: Any, singles: list[Any], row: VerifyRow, signature: Signature, judge: Judge,
                 judging: _Judging | None = None) -> CaseResult:
    """Row i of the batched outputs against sample i run alone (batch-dependent bugs)."""
    label = "same artifact, each row run alone"
    if isinstance(batched, BaseException):
        return CaseResult(case="batch consistency", inputs=case.shapes(), reference=label, verdict="skipped",
                          passed=True, notes=[f"the batched run failed ({describe(batched)}); see {case.name}"])
    failed = next((s for s in singles if isinstance(s, BaseException)), None)
    if failed is not None:
        return CaseResult(case="batch consistency", inputs=case.shapes(), reference=label, verdict="contract",
                          passed=False, error=f"fails at batch 1: {describe(failed)}")
    outs = {s.name: s for s in signature.outputs}
    stacked = {}
    for name in singles[0] if singles else {}:
        parts = [single[name] for single in singles]
        axis = outs[name].batch_axis if name in outs else 0
        stacked[name] = parts[0] if axis is None else np.concatenate(parts, axis=axis)
    # The noise floor applies here too: a non-deterministic model differs from itself.
    return _judge(Case("batch consistency", case.inputs), dict(batched), label, stacked, signature, row, judge,
                  judging, note_if_failed="row i of a batched run differs from row i run alone: the artifact "
                  "depends on the batch (BatchNorm/Dropout in training mode, a batch axis baked to a constant?)")


#: Case name of the call-order check (see :func:`_call_order`).
CALL_ORDER = "call order"


def _call_order(first: Mapping[str, Any], second: Mapping[str, Any], order: list[str], row: VerifyRow,
                judge: Judge, judging: _Judging | None = None) -> CaseResult:
    """Every case's outputs on a fresh runner that ran the cases smallest first, against the same
    artifact's outputs in the sweep's order. Runtimes that cache kernels per input shape can
    return outputs that depend on the shapes run before (seen: OpenVINO's CPU plugin after a
    first call with seq=1), which no single order of cases shows."""
    label = f"same artifact, a fresh runner, smallest case first ({', '.join(order)})"
    names = [n for n in order if not isinstance(first.get(n, ValueError()), BaseException)]
    failed = next((n for n in names if isinstance(second[n], BaseException)), None)
    if failed is not None:
        return CaseResult(case=CALL_ORDER, reference=label, verdict="runtime", passed=False,
                          error=f"{failed} fails on a fresh runner that ran {', '.join(order[:order.index(failed)])} "
                                f"first ({describe(second[failed])}), and runs in the sweep's order")
    if not names:
        return CaseResult(case=CALL_ORDER, reference=label, verdict="skipped", passed=True,
                          notes=["every case failed in the sweep; see them"])
    # All cases as one comparison per output: one verdict for the check, its worst element named.
    ref = {o: np.concatenate([np.ravel(first[n][o]) for n in names]) for o in first[names[0]]}
    got = {o: np.concatenate([np.ravel(second[n][o]) for n in names if o in second[n]]) for o in ref}
    result = CaseResult(case=CALL_ORDER, reference=label, verdict="pass", passed=True)
    note = ("the same inputs give other outputs on a fresh runner that ran the smallest case first: the artifact's "
            "outputs depend on the shapes run before (a runtime's per-shape kernel cache?)")
    if judging is not None:
        return judging.add(result, row, ref, got, note)
    _settle(result, judge.compare(ref, got, row.conversion, row.device).outputs)
    if not result.passed:
        result.notes.append(note)
    return result


def _native_problems(runner: Any, signature: Signature) -> list[str]:
    # Runners that can read the artifact's own signature (SavedModel, Paddle programs) expose
    # it as _native_signature; TorchScript and torch.export cannot, and raise.
    try:
        native = runner._native_signature()
    except Exception:
        return []
    return native_contract(native, signature)


def _degenerate(report: VerifyReport) -> list[str]:
    """Once per output: a golden reference that cannot tell a right artifact from a wrong one
    (constant, all zero). Not a failure: the numbers are still judged, they just prove little."""
    notes = (o.degenerate for r in report.rows for c in r.cases if c.case == "golden" for o in c.outputs)
    return [n for n in dict.fromkeys(notes) if n and n not in report.notes]


def _finish(row: VerifyRow) -> None:
    if row.contract and not row.error:
        # The artifact's own declarations already contradict the signature: a run that then
        # fails on the golden inputs fails because of that, and is reported as the contract.
        for case in row.cases:
            if case.verdict == "runtime":
                case.verdict = "contract"
    for case in row.cases:
        if case.verdict != "skipped":
            row.verdict = _worse(row.verdict, case.verdict)
    if row.contract:
        row.verdict = _worse(row.verdict, "contract")
    for check in row.structure:
        if not check.passed:
            row.verdict = _worse(row.verdict, "runtime" if check.severity == "runtime" else "contract")
    if row.error:
        row.verdict = "runtime"
    best: tuple[float, Worst] | None = None
    for case in row.cases:
        for out in case.outputs:
            score = out.tolerance_use if out.tolerance_use is not None else (float("inf") if not out.passed else -1)
            if best is None or score > best[0]:
                best = (score, Worst(output=out.name, case=case.case, max_abs=out.max_abs, max_rel=out.max_rel,
                                     tolerance_use=out.tolerance_use, min_atol=out.min_atol, min_rtol=out.min_rtol))
            row.near_fail = row.near_fail or out.near_fail
    row.worst = best[1] if best else None


# --- the engine -------------------------------------------------------------------------------
@dataclass
class _Cell:
    """One artifact x runtime x device cell while it runs: its row, its runner and its runs."""

    row: VerifyRow
    runner: Any
    artifact: Artifact
    #: The golden run's outputs, or the exception it raised.
    golden: Any = None
    #: The golden case is judged at the end, with the other cases (not needed to pick a reference).
    deferred: bool = False


@dataclass(frozen=True)
class VerifyOptions:
    """What :func:`verify` was asked to do (its keyword arguments, documented there)."""

    formats: Iterable[str] | None = None
    runtimes: Iterable[str] | None = None
    devices: Iterable[str] = ("cpu",)
    atol: float | Mapping[str, float] | None = None
    rtol: float | Mapping[str, float] | None = None
    reference: str = "auto"
    source: str | Path | None = None
    builder: str | None = None
    state_key: str | None = None
    trust: bool = False
    inputs: str | Path | Mapping[str, np.ndarray] | None = None
    sweep: bool = True
    random: bool = False
    seed: int = 0
    input_ranges: Mapping[str, tuple[float, float]] | None = None
    structure: bool = True


class Verification:
    """One verification of a package, phase by phase (:attr:`PHASES`, in that order).

    Constructing it opens the package and checks the options (bad ones raise before any
    runner loads); :meth:`run` runs the phases and returns the report. Each phase reads and
    writes the state on ``self`` (cells, cases, judge, live reference, queued runs).
    """

    #: The phases :meth:`run` calls, in order (the runners close between ``sweep`` and ``judge``).
    PHASES = ("static_checks", "load_cells", "golden", "live_reference", "sweep", "judge", "finish")

    def __init__(self, path: str | Path, options: VerifyOptions = VerifyOptions()) -> None:
        self.start = time.perf_counter()
        self.path, self.options = path, options
        self._open_package()
        self._check_options()
        self.report = VerifyReport(package=str(path), name=self.manifest.name,
                                   reference="eager" if self.eager else "golden")
        self.static: dict[str, tuple[list[str], list[Check]]] = {}
        self.cases: list[Case] = []
        self.cells: list[_Cell] = []
        #: The one judge (:mod:`packager.fidelity.judge`): tolerances, noise record, noise floors.
        self.rules: Judge = judge_for(self.manifest, options.atol, options.rtol)
        self.golden_ref: Mapping[str, np.ndarray] | None = None
        self.live: Any = self.eager
        self.live_outputs: dict[str, dict[str, np.ndarray] | str] = {}
        #: Runs done, judged in :meth:`judge`: (row, case, reference, its label, outcome).
        self.pending: list[tuple[VerifyRow, Case, Any, str, Any]] = []
        #: Batch-consistency runs: (row, batched case, batched outcome, one outcome per row).
        self.consistency: list[tuple[VerifyRow, Case, Any, list[Any]]] = []
        #: Call-order runs: (row, outcome per case in the sweep's order, on a fresh runner smallest
        #: case first, that order).
        self.call_order: list[tuple[VerifyRow, dict[str, Any], dict[str, Any], list[str]]] = []

    def run(self) -> VerifyReport:
        """Run every phase and return the report."""
        from packager.steps import step

        with step("verify", "static checks"):
            self.static_checks()
        try:
            with step("verify", "load cells"):
                self.load_cells()
            with step("verify", "golden"):
                self.golden()
            with step("verify", "live reference"):
                self.live_reference()
            with step("verify", "sweep"):
                self.sweep()
        finally:
            self.close()
        self.judge()
        return self.finish()

    # --- setup ----------------------------------------------------------------------------
    def _open_package(self) -> None:
        from runtimes import parse_device

        # The ONNX graphs and golden data are parsed from the very bytes that were hashed.
        self.package = package = Package(self.path, verify=False)
        self.manifest = manifest = package.manifest
        package.verify_integrity(keep=[a.path for a in manifest.artifacts if a.format in registry.ONNX_FORMATS] +
                                 ([manifest.golden.inputs.path, manifest.golden.outputs.path]
                                  if manifest.golden else []))
        self.signature = _parse_ranges(self.options.input_ranges, manifest.signature)
        self.devices = [str(parse_device(d)) for d in self.options.devices]
        if not self.devices:
            raise UsageError("--device", "lists no device", expected="cpu, cuda or cuda:N")

    def _check_options(self) -> None:
        opts, manifest = self.options, self.manifest
        self.eager = None
        if opts.reference == "eager":
            self.eager = _EagerReference(self.package, str(opts.source) if opts.source else None, opts.builder,
                                         opts.state_key, opts.trust)
        elif opts.reference not in ("auto", "golden") and opts.reference not in manifest.formats:
            raise UsageError(f"--reference {opts.reference!r}", "is neither auto, golden, eager nor a format of "
                             "this package", expected=["auto", "golden", "eager", *manifest.formats],
                             got=opts.reference)
        if manifest.golden is None and self.eager is None:
            raise UsageError(str(self.path), "has no golden data to verify against",
                             fix="re-export the package, or pass --reference eager --source CHECKPOINT")
        self.golden_in, self.golden_out = self.package.golden() if manifest.golden else ({}, {})
        if not self.golden_in:
            self.golden_in = self.signature.example_inputs(seed=opts.seed)
        self.wanted = list(opts.formats) if opts.formats else None
        unknown = [f for f in self.wanted or [] if f not in manifest.formats]
        if unknown:
            raise UsageError(f"format(s) {unknown}", "are not in this package", expected=manifest.formats,
                             got=unknown, fix=f"{did_you_mean(unknown, manifest.formats)}pass --format with names "
                             "from the expected list")
        self.wanted_rt = set(opts.runtimes) if opts.runtimes else None

    def _artifacts(self) -> list[Artifact]:
        return [a for a in self.manifest.artifacts if not self.wanted or a.format in self.wanted]

    # --- phases ---------------------------------------------------------------------------
    def static_checks(self) -> None:
        """Per artifact (shared by its runtime/device cells): the ONNX graph's contract and
        structure, and int value ranges read from it; then plan the cases."""
        for art in self._artifacts():
            if art.format in registry.ONNX_FORMATS:
                self._check_onnx(art)
        for spec in self.signature.inputs:
            if spec.dtype.startswith(("int", "uint")) and spec.value_range is None and self.options.sweep:
                self.report.notes.append(f"integer input {spec.name!r} has no declared value range; generated "
                                         "values are 0 or 1 (pass --input-range NAME:LOW:HIGH)")
        self._plan()

    def _check_onnx(self, art: Artifact) -> None:
        from packager.fidelity.onnx_checks import load_light, structural_checks

        file = self.package.resolve(art.path)
        try:
            light = load_light(file, self.package.take_bytes(art.path))
        except Exception as exc:
            self.static[art.format] = ([], [Check(name="onnx.load", passed=False, severity="runtime",
                                                  detail=str(exc).splitlines()[0][:300])])
            return
        self.static[art.format] = (onnx_contract(light.model, self.signature),
                                   structural_checks(file, light) if self.options.structure else [])
        extra = {k: v for k, v in onnx_int_ranges(light.model, self.signature).items()
                 if k not in (self.options.input_ranges or {})}
        if extra:
            self.signature = _parse_ranges(extra, self.signature)
            self.report.notes.append(f"value ranges read from the ONNX embedding tables: {extra}")
        del light  # the parsed file's memory goes back before runtimes load it

    def _plan(self) -> None:
        opts = self.options
        user = _load_user_inputs(opts.inputs, self.signature) if opts.inputs is not None else None
        cases = plan_cases(self.signature, self.golden_in, self.golden_out, sweep=opts.sweep, user_inputs=user,
                           random_case=opts.random, seed=opts.seed)
        if self.eager is not None:
            for case in cases:  # every case is judged against a fresh eager run
                case.reference, case.reference_label = None, ""
        self.report.cases = [c.name for c in cases]
        self.report.notes += cases[0].notes  # sweep notes concern the whole package, not one case
        cases[0].notes = []
        self.cases = cases

    def load_cells(self) -> None:
        """Open every artifact x runtime x device cell (a load failure is that cell's error)."""
        for art in self._artifacts():
            for runtime in art.runtimes:
                if self.wanted_rt and runtime not in self.wanted_rt:
                    continue
                for device in self.devices:
                    self.cells.append(self._load_cell(art, runtime, device))
                    self.report.rows.append(self.cells[-1].row)
        if self.wanted_rt and not self.cells:
            known = sorted({r for a in self.manifest.artifacts for r in a.runtimes})
            wanted = sorted(self.wanted_rt)
            raise UsageError(f"runtime(s) {wanted}", "load no artifact of this package", expected=known, got=wanted,
                             fix=f"{did_you_mean(wanted, known)}pass --runtime with names from the expected list")

    def _load_cell(self, art: Artifact, runtime: str, device: str) -> _Cell:
        from runtimes import select_artifact

        row = VerifyRow(format=art.format, runtime=runtime, device=device,
                        conversion=conversion_kind(art.format, art.options))
        row.contract, row.structure = self.static.get(art.format, ([], []))
        if row.conversion.startswith("budget:"):
            row.notes.append(f"an optimised artifact: judged by its accuracy budget {art.options['budget']} "
                             "(packager optimize), not by fp32 elementwise tolerances")
        cell_start = time.perf_counter()
        runner = None
        try:
            runner = select_artifact(self.package, art, runtime, signature=self.signature).open(device)
            row.notes += list(runner.notes)
            if art.format not in registry.ONNX_FORMATS:  # ONNX graphs were checked in detail above
                row.contract = row.contract + _native_problems(runner, self.signature)
        except Exception as exc:  # runners may leak their backend's own exceptions
            row.error = f"failed to load: {describe(exc)}"
        row.seconds = time.perf_counter() - cell_start
        return _Cell(row, runner, art)

    def golden(self) -> None:
        """Run the golden case on every cell; judge it now where the live reference is to be
        picked from the cells (or the run failed), else later with the other cases."""
        golden = self.cases[0]
        self.golden_ref = golden.reference
        if self.eager is not None:
            self._eager_golden(golden)
        # Every run first, every comparison after: ONNX Runtime's worker threads spin for a while
        # after each run, and Python work interleaved with runs would compete with them.
        for cell in self._running():
            t0 = time.perf_counter()
            cell.golden = _attempt(cell.runner, golden.inputs)
            cell.row.seconds += time.perf_counter() - t0
        for cell in self._running():
            if self._picks_live() or isinstance(cell.golden, BaseException):
                cell.row.cases.append(_run_case(golden, self.golden_ref, golden.reference_label, cell.golden,
                                                cell.row, self.signature, self.rules))
            else:
                cell.deferred = True

    def _eager_golden(self, golden: Case) -> None:
        assert self.eager is not None
        try:
            self.golden_ref, self.rules.floors = _run_reference_twice(self.eager, golden.inputs, self.report)
        except PackagerError:
            raise
        except Exception as exc:
            raise InputError(self.eager.label, f"failed on the golden inputs ({describe(exc)})",
                             fix="check --source and --builder") from exc
        golden.reference, golden.reference_label = self.golden_ref, self.eager.label

    def _running(self) -> list[_Cell]:
        return [c for c in self.cells if c.runner is not None]

    def _needs_live(self) -> list[Case]:
        return [c for c in self.cases[1:] if c.reference is None]

    def _picks_live(self) -> bool:
        """A live reference artifact is to be picked from the cells (by their golden verdicts)."""
        return self.eager is None and bool(self._needs_live()) and self.options.reference != "golden"

    def live_reference(self) -> None:
        """Pick the live reference for cases with new inputs and run it on them (the first
        pair of runs also measures its noise floor)."""
        if self._picks_live():
            self.live = _pick_reference(self.cells, self.options.reference, self.report)
        self.report.live_reference = self.live.label if self.live is not None else None
        if self.live is None:
            return
        for i, case in enumerate(self._needs_live()):
            try:
                if i == 0 and self.eager is None:
                    self.live_outputs[case.name], self.rules.floors = _run_reference_twice(self.live, case.inputs,
                                                                                          self.report)
                    continue
                self.live_outputs[case.name] = self.live.run(case.inputs)
            except Exception as exc:
                self.live_outputs[case.name] = f"none: the reference failed on these inputs ({describe(exc)})"

    def sweep(self) -> None:
        """Run the sweep, user and random cases, then batch consistency, on every cell whose
        golden run did not fail (runs now, judged in :meth:`judge`)."""
        base = next((c for c in self.cases if c.consistency), None) if self.options.sweep else None
        for cell in self._running():
            if cell.deferred or cell.row.cases and cell.row.cases[0].verdict != "runtime":
                t0 = time.perf_counter()
                self._sweep_cell(cell, base)
                cell.row.seconds += time.perf_counter() - t0

    def _sweep_cell(self, cell: _Cell, base: Case | None) -> None:
        outcomes = {self.cases[0].name: cell.golden}
        for case in self.cases[1:]:
            ref, label = self._reference_for(case, cell)
            outcomes[case.name] = _attempt(cell.runner, case.inputs)
            self.pending.append((cell.row, case, ref, label, outcomes[case.name]))
        if base is not None:
            batched = outcomes[base.name]
            rows = range(_batch_size(base, self.signature)) if not isinstance(batched, BaseException) else range(0)
            singles = [_attempt(cell.runner, take_rows(self.signature, base.inputs, [i])) for i in rows]
            self.consistency.append((cell.row, base, batched, singles))
        if self.options.sweep and len({str(c.shapes()) for c in self.cases}) > 1:
            self._call_order_cell(cell, outcomes)

    def _call_order_cell(self, cell: _Cell, outcomes: dict[str, Any]) -> None:
        """Run every case again on a fresh runner, smallest inputs first (see :func:`_call_order`)."""
        from runtimes import select_artifact

        order = [c.name for c in sorted(self.cases, key=lambda c: sum(v.size for v in c.inputs.values()))]
        by_name = {c.name: c for c in self.cases}
        try:
            fresh = select_artifact(self.package, cell.artifact, cell.row.runtime,
                                    signature=self.signature).open(cell.row.device)
        except Exception as exc:  # loaded once already: a second load failing is worth saying
            cell.row.cases.append(CaseResult(case=CALL_ORDER, reference="a fresh runner", verdict="runtime",
                                             passed=False, error=f"a second runner failed to load: {describe(exc)}"))
            return
        try:
            again = {name: _attempt(fresh, by_name[name].inputs) for name in order}
        finally:
            fresh.close()
        self.call_order.append((cell.row, outcomes, again, order))

    def _reference_for(self, case: Case, cell: _Cell) -> tuple[Mapping[str, np.ndarray] | None, str]:
        """What judges ``case`` on ``cell``, and its label (``None``: the contract only)."""
        if case.reference is not None:
            return case.reference, case.reference_label
        if isinstance(self.live, _ArtifactReference) and self.live.row is cell.row:
            return None, "none: this artifact is the live reference (contract only)"
        if self.live is None:
            return None, "none: no live reference (contract only; pass --reference eager)"
        outputs = self.live_outputs.get(case.name)
        if isinstance(outputs, str):
            return None, outputs
        return outputs, self.live.label

    def close(self) -> None:
        """Close every runner opened (also after a failed phase)."""
        for cell in self._running():
            cell.runner.close()

    def judge(self) -> None:
        """Judge every queued run (:class:`_Judging`: one numpy pass per figure over all cases)."""
        judge, signature, golden = self.rules, self.signature, self.cases[0]
        judging = _Judging(judge)
        for cell in self.cells:
            if cell.deferred:
                cell.row.cases.insert(0, _run_case(golden, self.golden_ref, golden.reference_label, cell.golden,
                                                   cell.row, signature, judge, judging))
        for row, case, ref, label, outcome in self.pending:
            row.cases.append(_run_case(case, ref, label, outcome, row, signature, judge, judging))
        for row, case, batched, singles in self.consistency:
            row.cases.append(_consistency(case, batched, singles, row, signature, judge, judging))
        for row, first, again, order in self.call_order:
            row.cases.append(_call_order(first, again, order, row, judge, judging))
        judging.finish()

    def finish(self) -> VerifyReport:
        """Each row's verdict and worst output, the report's notes, versions and time."""
        for row in self.report.rows:
            _finish(row)
        self.report.notes += _degenerate(self.report)
        self.report.versions = _versions()
        self.report.seconds = time.perf_counter() - self.start
        return self.report


def verify(path: str | Path, *, formats: Iterable[str] | None = None, runtimes: Iterable[str] | None = None,
           devices: Iterable[str] = ("cpu",), atol: float | Mapping[str, float] | None = None,
           rtol: float | Mapping[str, float] | None = None, reference: str = "auto",
           source: str | Path | None = None, builder: str | None = None, state_key: str | None = None,
           trust: bool = False, inputs: str | Path | Mapping[str, np.ndarray] | None = None, sweep: bool = True,
           random: bool = False, seed: int = 0, input_ranges: Mapping[str, tuple[float, float]] | None = None,
           structure: bool = True) -> VerifyReport:
    """Verify every artifact x runtime x device cell of a package (:class:`Verification`).

    Args:
        path: Package folder.
        formats: Only these formats (default: all in the package).
        runtimes: Only these runtimes (default: every runtime each artifact lists).
        devices: Devices to run on (``cpu``, ``cuda``, ``cuda:N``); an absent GPU is a per-cell error.
        atol: Absolute tolerance override: one, or per output name (``"*"`` for the rest).
        rtol: Relative tolerance override.
        reference: ``auto`` (golden data, plus the designated reference artifact for new inputs),
            ``golden`` (golden data only), ``eager`` (re-run the eager model from ``source``), or
            a format name to designate as the reference artifact.
        source: Training-time save for ``reference="eager"`` (default: the manifest's path).
        builder: ``module:function`` building the architecture for weights-only sources.
        state_key: Key of the weights inside a checkpoint dict.
        trust: Allow a pickled source.
        inputs: The user's own inputs (.npz path or dict), judged against the live reference.
        sweep: Run the shape sweep and batch consistency (else the golden case only).
        random: Add a case of seeded random inputs at the golden sizes.
        seed: Seed for generated inputs.
        input_ranges: ``{input: (low, high)}`` value ranges for generated inputs.
        structure: Run the ONNX structural checks.

    Raises:
        UsageError, InputError: Bad options, a missing source, unreadable inputs (exit 2).
    """
    options = VerifyOptions(formats=formats, runtimes=runtimes, devices=devices, atol=atol, rtol=rtol,
                            reference=reference, source=source, builder=builder, state_key=state_key, trust=trust,
                            inputs=inputs, sweep=sweep, random=random, seed=seed, input_ranges=input_ranges,
                            structure=structure)
    return Verification(path, options).run()


def _run_reference_twice(ref: Any, feeds: Mapping[str, np.ndarray],
                         report: VerifyReport) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Run the live reference twice on the same inputs; a difference is its noise floor."""
    first = ref.run(feeds)
    second = ref.run(feeds)
    floors = {k: v for k, v in noise_floor(first, second).items() if v > 0}
    report.deterministic = not floors
    report.noise_floor = floors
    if floors:
        report.notes.append(f"the reference ({ref.label}) is not deterministic: two runs on the same inputs differ "
                            f"by up to {max(floors.values()):.3g}; outputs are judged against that floor")
    return first, floors


def _pick_reference(cells: list[_Cell], reference: str, report: VerifyReport) -> _ArtifactReference | None:
    """The first cell of the preferred format (CPU first) that passed its own golden check."""
    order = [reference] if reference not in ("auto", "golden") else list(REFERENCE_PREFERENCE)
    ok = [(c.row, c.runner) for c in cells
          if c.runner is not None and c.row.cases and c.row.cases[0].passed and not c.row.contract]
    for fmt in order:
        for row, runner in sorted(ok, key=lambda rr: rr[0].device != "cpu"):
            if row.format == fmt:
                return _ArtifactReference(row, runner)
    if reference not in ("auto", "golden"):
        report.notes.append(f"the requested reference artifact {reference!r} did not pass its own golden check; "
                            "cases with new inputs are judged on the contract only")
    return None


def _attempt(runner: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | Exception:
    """One run: its outputs, or the exception it raised (judged later)."""
    try:
        return runner.run(feeds)
    except Exception as exc:  # runners may leak their backend's own exceptions
        return exc


def _batch_size(case: Case, signature: Signature) -> int:
    spec = next(s for s in signature.inputs if s.batch_axis is not None)
    return int(case.inputs[spec.name].shape[spec.batch_axis])  # type: ignore[index]


def _run_case(case: Case, reference: Mapping[str, np.ndarray] | None, label: str, got: Any, row: VerifyRow,
              signature: Signature, judge: Judge,
              judging: _Judging | None = None) -> CaseResult:
    """Judge one case's outcome (outputs, or the exception the run raised)."""
    if isinstance(got, BaseException):
        exc = got
        # Failing only on a new shape means a dynamic axis the signature promises is not
        # honoured, and failing on the golden inputs with a shape error means the artifact does
        # not accept the signature's shapes (layout swapped, axis fixed): both are contract
        # failures. Any other failure on the golden inputs is a broken artifact.
        text = describe(exc)
        if case.name != "golden":
            verdict, problem = "contract", f"runs at the golden shapes but fails at {case.name} {case.shapes()}: {text}"
        elif isinstance(exc, ContractError):  # the runner itself found names/outputs that differ
            verdict, problem = "contract", text
        elif _SHAPE_ERROR.search(text):
            verdict, problem = "contract", f"rejects inputs of the signature's shapes {case.shapes()}: {text}"
        else:
            verdict, problem = "runtime", f"failed to run: {text}"
        return CaseResult(case=case.name, inputs=case.shapes(), reference=label, verdict=verdict, passed=False,
                          error=problem)
    if reference is None:
        contract = check_outputs(signature, got, case.inputs)
        return CaseResult(case=case.name, inputs=case.shapes(), reference=label,
                          verdict="contract" if contract else "pass", passed=not contract, contract=contract,
                          notes=list(case.notes))
    return _judge(case, reference, label, got, signature, row, judge, judging)


def _keep(row: VerifyRow, result: CaseResult, reference: Mapping[str, np.ndarray],
          got: Mapping[str, np.ndarray]) -> None:
    # Only references to arrays already in memory: plotting them later costs nothing here.
    for out in result.outputs:
        if (not out.passed or out.near_fail) and out.name in reference and out.name in got:
            if np.shape(reference[out.name]) == np.shape(got[out.name]):
                row._arrays[(result.case, out.name)] = (np.asarray(reference[out.name]), np.asarray(got[out.name]))


#: Backend error texts that mean "these input shapes do not fit the graph".
_SHAPE_ERROR = re.compile(r"shape|channels|size mismatch|dimension|rank|Expected input at|cannot be multiplied|"
                          r"Guard failed: \S+\.size\(\)|Got invalid dimensions", re.IGNORECASE)


def describe(exc: BaseException) -> str:
    """One line about an exception: a PackagerError's message, else the backend's last line
    (TorchScript puts the cause after its serialized traceback)."""
    if isinstance(exc, PackagerError):
        return exc.message
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    name = type(exc).__name__
    return (text if text.startswith(name) else f"{name}: {text}")[:400]


def _versions() -> dict[str, str]:
    # Module attributes, not importlib.metadata: reading dist metadata costs milliseconds per
    # package, and only modules this verification imported anyway are listed.
    import sys

    from packager import __version__

    versions = {"packager": __version__}
    for name in ("numpy", "onnx", "onnxruntime", "torch", "tensorflow", "paddle"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "__version__", None), str):
            versions[name] = module.__version__
    return versions
