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
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, computed_field

from packager import registry
from packager.errors import (ContractError, ExitCode, InputError, PackagerError, TrustRequiredError, UsageError,
                             did_you_mean)
from packager.fidelity.contract import check_outputs, native_contract, onnx_contract
from packager.fidelity.judge import Judge, conversion_kind, judge_for
from packager.fidelity.metrics import OutputMetrics, noise_floor
from packager.fidelity.onnx_checks import Check
from packager.fidelity.sweep import Case, onnx_int_ranges, plan_cases, take_rows
from packager.manifest import OutputParity, Parity
from packager.package import Package, load_npz
from packager.signature import Signature

REPORT_VERSION = 1
#: Which artifact serves as the live reference, closest to eager first; ONNX only as a last resort.
REFERENCE_PREFERENCE = registry.REFERENCE_PREFERENCE
#: verdict -> exit code; the report's code is the worst over its cells (runtime > contract > numeric).
VERDICT_CODES = {"pass": ExitCode.OK, "numeric": ExitCode.FIDELITY, "contract": ExitCode.CONTRACT,
                 "runtime": ExitCode.RUNTIME}
_SEVERITY = ("pass", "numeric", "contract", "runtime")


def _worse(a: str, b: str) -> str:
    return a if _SEVERITY.index(a) >= _SEVERITY.index(b) else b


class CaseResult(BaseModel):
    """One case (inputs) run by one cell."""

    model_config = ConfigDict(extra="forbid")

    case: str
    inputs: dict[str, list[int]] = Field(default_factory=dict, description="Input shapes.")
    reference: str = Field(description="What produced the reference outputs for this case.")
    verdict: str = Field(description="pass, numeric, contract, runtime, or skipped.")
    passed: bool
    outputs: list[OutputMetrics] = Field(default_factory=list)
    contract: list[str] = Field(default_factory=list)
    error: str | None = None
    notes: list[str] = Field(default_factory=list)


class Worst(BaseModel):
    """The figures of the output closest to (or furthest past) its tolerance in a cell."""

    output: str
    case: str
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance_use: float | None = None
    min_atol: float | None = None
    min_rtol: float | None = None


class VerifyRow(BaseModel):
    """One artifact x runtime x device cell of the matrix."""

    model_config = ConfigDict(extra="forbid")

    format: str
    runtime: str
    device: str
    conversion: str = Field(description="native, converted or reduced:<dtype>; only a declared reduced "
                            "precision changes the tolerance (one rule set for every format).")
    verdict: str = "pass"
    error: str | None = Field(None, description="Load or run failure of the artifact in this cell.")
    contract: list[str] = Field(default_factory=list, description="Static contract problems (ONNX graph).")
    structure: list[Check] = Field(default_factory=list, description="ONNX structural checks.")
    cases: list[CaseResult] = Field(default_factory=list)
    worst: Worst | None = None
    near_fail: bool = False
    notes: list[str] = Field(default_factory=list)
    seconds: float = 0.0
    #: (case, output) -> (reference, candidate) for failing or near-failing outputs (HTML plots).
    _arrays: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = PrivateAttr(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exit_code(self) -> int:
        return int(VERDICT_CODES[self.verdict])

    @property
    def parity(self) -> Parity:
        """The golden case as a manifest :class:`Parity` (the foundation's row shape)."""
        golden = next((c for c in self.cases if c.case == "golden"), None)
        outs = [OutputParity(name=o.name, passed=o.passed, max_abs=o.max_abs, max_rel=o.max_rel, atol=o.atol,
                             rtol=o.rtol, problem=o.problem) for o in (golden.outputs if golden else [])]
        return Parity(runtime=self.runtime, device=self.device, passed=self.passed, outputs=outs,
                      error=self.error or (golden.error if golden else None), notes=self.notes)


class VerifyReport(BaseModel):
    """Result of :func:`verify`; truthy when every cell passed. ``to_dict`` is the JSON report."""

    model_config = ConfigDict(extra="forbid")

    report_version: int = REPORT_VERSION
    package: str
    name: str = ""
    reference: str = Field("golden", description="golden (+ designated artifact) or eager.")
    live_reference: str | None = Field(None, description="What judged the cases with new inputs.")
    noise_floor: dict[str, float] = Field(default_factory=dict, description="Per output, when the live "
                                          "reference differed between two runs on the same inputs.")
    deterministic: bool | None = None
    cases: list[str] = Field(default_factory=list)
    rows: list[VerifyRow] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    seconds: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exit_code(self) -> int:
        """Worst exit code over the rows (runtime failure > contract > numeric)."""
        codes = {r.exit_code for r in self.rows if not r.passed}
        for code in (ExitCode.RUNTIME, ExitCode.CONTRACT, ExitCode.FIDELITY):
            if int(code) in codes:
                return int(code)
        return int(ExitCode.OK)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """Every figure, JSON-ready (non-finite floats become null)."""
        return json.loads(self.model_dump_json())


def report_json_schema() -> dict[str, Any]:
    """JSON Schema of the ``--json`` report."""
    schema = VerifyReport.model_json_schema(mode="serialization")
    schema["$id"] = f"https://packager.dev/schema/verify-report-v{REPORT_VERSION}.json"
    return schema


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
def verify(path: str | Path, *, formats: Iterable[str] | None = None, runtimes: Iterable[str] | None = None,
           devices: Iterable[str] = ("cpu",), atol: float | Mapping[str, float] | None = None,
           rtol: float | Mapping[str, float] | None = None, reference: str = "auto",
           source: str | Path | None = None, builder: str | None = None, state_key: str | None = None,
           trust: bool = False, inputs: str | Path | Mapping[str, np.ndarray] | None = None, sweep: bool = True,
           random: bool = False, seed: int = 0, input_ranges: Mapping[str, tuple[float, float]] | None = None,
           structure: bool = True) -> VerifyReport:
    """Verify every artifact x runtime x device cell of a package.

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
    from runtimes import parse_device, select_artifact

    start = time.perf_counter()
    # The ONNX graphs and golden data are parsed from the very bytes that were hashed.
    package = Package(path, verify=False)
    manifest = package.manifest
    package.verify_integrity(keep=[a.path for a in manifest.artifacts if a.format == "onnx"] +
                             ([manifest.golden.inputs.path, manifest.golden.outputs.path] if manifest.golden else []))
    signature = _parse_ranges(input_ranges, manifest.signature)
    device_list = [str(parse_device(d)) for d in devices]
    if not device_list:
        raise UsageError("--device", "lists no device", expected="cpu, cuda or cuda:N")
    eager = None
    if reference == "eager":
        eager = _EagerReference(package, str(source) if source else None, builder, state_key, trust)
    elif reference not in ("auto", "golden") and reference not in manifest.formats:
        raise UsageError(f"--reference {reference!r}", "is neither auto, golden, eager nor a format of this package",
                         expected=["auto", "golden", "eager", *manifest.formats], got=reference)
    if manifest.golden is None and eager is None:
        raise UsageError(str(path), "has no golden data to verify against",
                         fix="re-export the package, or pass --reference eager --source CHECKPOINT")
    golden_in, golden_out = package.golden() if manifest.golden else ({}, {})
    if not golden_in:
        golden_in = signature.example_inputs(seed=seed)
    wanted = list(formats) if formats else None
    unknown = [f for f in wanted or [] if f not in manifest.formats]
    if unknown:
        raise UsageError(f"format(s) {unknown}", "are not in this package", expected=manifest.formats, got=unknown,
                         fix=f"{did_you_mean(unknown, manifest.formats)}pass --format with names from the expected list")
    wanted_rt = set(runtimes) if runtimes else None

    report = VerifyReport(package=str(path), name=manifest.name, reference="eager" if eager else "golden")
    # Static checks per artifact (shared by its runtime/device cells), and int ranges from ONNX.
    static: dict[str, tuple[list[str], list[Check]]] = {}
    for art in manifest.artifacts:
        if wanted and art.format not in wanted:
            continue
        if art.format == "onnx":
            from packager.fidelity.onnx_checks import load_light, structural_checks

            file = package.resolve(art.path)
            try:
                light = load_light(file, package.take_bytes(art.path))
            except Exception as exc:
                static[art.format] = ([], [Check(name="onnx.load", passed=False, severity="runtime",
                                                 detail=str(exc).splitlines()[0][:300])])
                continue
            static[art.format] = (onnx_contract(light.model, signature),
                                  structural_checks(file, light) if structure else [])
            extra = {k: v for k, v in onnx_int_ranges(light.model, signature).items()
                     if k not in (input_ranges or {})}
            if extra:
                signature = _parse_ranges(extra, signature)
                report.notes.append(f"value ranges read from the ONNX embedding tables: {extra}")
            del light  # the parsed file's memory goes back before runtimes load it
    for spec in signature.inputs:
        if spec.dtype.startswith(("int", "uint")) and spec.value_range is None and sweep:
            report.notes.append(f"integer input {spec.name!r} has no declared value range; generated values are "
                                "0 or 1 (pass --input-range NAME:LOW:HIGH)")

    user = _load_user_inputs(inputs, signature) if inputs is not None else None
    cases = plan_cases(signature, golden_in, golden_out, sweep=sweep, user_inputs=user, random_case=random, seed=seed)
    if eager is not None:
        for case in cases:  # every case is judged against a fresh eager run
            case.reference, case.reference_label = None, ""
    report.cases = [c.name for c in cases]
    report.notes += cases[0].notes  # sweep notes concern the whole package, not one case
    cases[0].notes = []

    # Phase 1: load every cell and judge the golden case (the contract first).
    cells: list[tuple[VerifyRow, Any, Any]] = []
    try:
        for art in manifest.artifacts:
            if wanted and art.format not in wanted:
                continue
            for runtime in art.runtimes:
                if wanted_rt and runtime not in wanted_rt:
                    continue
                for device in device_list:
                    row = VerifyRow(format=art.format, runtime=runtime, device=device,
                                    conversion=conversion_kind(art.format, art.options))
                    row.contract, row.structure = static.get(art.format, ([], []))
                    cell_start = time.perf_counter()
                    runner = None
                    try:
                        runner = select_artifact(package, art, runtime, signature=signature).open(device)
                        row.notes += list(runner.notes)
                        if art.format != "onnx":  # ONNX graphs were checked in detail above
                            row.contract = row.contract + _native_problems(runner, signature)
                    except Exception as exc:  # runners may leak their backend's own exceptions
                        row.error = f"failed to load: {describe(exc)}"
                    row.seconds = time.perf_counter() - cell_start
                    cells.append((row, runner, art))
                    report.rows.append(row)
        if wanted_rt and not cells:
            known = sorted({r for a in manifest.artifacts for r in a.runtimes})
            raise UsageError(f"runtime(s) {sorted(wanted_rt)}", "load no artifact of this package",
                             expected=known, got=sorted(wanted_rt),
                             fix=f"{did_you_mean(sorted(wanted_rt), known)}pass --runtime with names from the expected list")

        live: Any = eager
        judge = judge_for(manifest, atol, rtol)
        golden_ref = cases[0].reference
        if eager is not None:
            try:
                golden_ref, judge.floors = _run_reference_twice(eager, cases[0].inputs, report)
            except PackagerError:
                raise
            except Exception as exc:
                raise InputError(eager.label, f"failed on the golden inputs ({describe(exc)})",
                                 fix="check --source and --builder") from exc
            cases[0].reference, cases[0].reference_label = golden_ref, eager.label
        # Every run first, every comparison after: ONNX Runtime's worker threads spin for a while
        # after each run, and Python work interleaved with runs would compete with them.
        golden_got: dict[int, Any] = {}
        for row, runner, _art in cells:
            if runner is not None:
                t0 = time.perf_counter()
                golden_got[id(row)] = _attempt(runner, cases[0].inputs)
                row.seconds += time.perf_counter() - t0
        # The golden verdicts are needed now only to pick a live reference artifact; otherwise
        # the numbers are judged after every run, with the other cases.
        needs_live = [c for c in cases[1:] if c.reference is None]
        pick_live = live is None and bool(needs_live) and reference != "golden"
        deferred: dict[int, VerifyRow] = {}
        for row, runner, _art in cells:
            if runner is not None:
                if pick_live or isinstance(golden_got[id(row)], BaseException):
                    row.cases.append(_run_case(cases[0], golden_ref, cases[0].reference_label, golden_got[id(row)],
                                               row, signature, judge))
                else:
                    deferred[id(row)] = row

        # Phase 2: the live reference for cases with new inputs.
        if pick_live:
            live = _pick_reference(cells, reference, report)
        report.live_reference = live.label if live is not None else None
        live_outputs: dict[str, dict[str, np.ndarray] | str] = {}
        for i, case in enumerate(needs_live):
            if live is None:
                continue
            try:
                if i == 0 and eager is None:  # the first run pair also measures the noise floor
                    live_outputs[case.name], judge.floors = _run_reference_twice(live, case.inputs, report)
                    continue
                live_outputs[case.name] = live.run(case.inputs)
            except Exception as exc:
                live_outputs[case.name] = f"none: the reference failed on these inputs ({describe(exc)})"

        # Phase 3: the sweep, user and random cases, then batch consistency (runs now, judged below).
        pending: list[tuple[VerifyRow, Case, Any, str, Any]] = []
        consistency: list[tuple[VerifyRow, Case, Any, list[Any]]] = []
        base = next((c for c in cases if c.consistency), None) if sweep else None
        for row, runner, _art in cells:
            if runner is None or id(row) not in deferred and (not row.cases or row.cases[0].verdict == "runtime"):
                continue
            t0 = time.perf_counter()
            outcomes = {cases[0].name: golden_got[id(row)]}
            for case in cases[1:]:
                if case.reference is not None:
                    ref, label = case.reference, case.reference_label
                elif isinstance(live, _ArtifactReference) and live.row is row:
                    ref, label = None, "none: this artifact is the live reference (contract only)"
                elif live is None:
                    ref, label = None, "none: no live reference (contract only; pass --reference eager)"
                elif isinstance(live_outputs.get(case.name), str):
                    ref, label = None, str(live_outputs[case.name])
                else:
                    ref, label = live_outputs[case.name], live.label  # type: ignore[assignment]
                outcomes[case.name] = _attempt(runner, case.inputs)
                pending.append((row, case, ref, label, outcomes[case.name]))
            if base is not None:
                batched = outcomes[base.name]
                rows = range(_batch_size(base, signature)) if not isinstance(batched, BaseException) else range(0)
                singles = [_attempt(runner, take_rows(signature, base.inputs, [i])) for i in rows]
                consistency.append((row, base, batched, singles))
            row.seconds += time.perf_counter() - t0
    finally:
        for _row, runner, _art in cells:
            if runner is not None:
                runner.close()
    judging = _Judging(judge)
    for row in deferred.values():
        row.cases.insert(0, _run_case(cases[0], golden_ref, cases[0].reference_label, golden_got[id(row)], row,
                                      signature, judge, judging))
    for row, case, ref, label, outcome in pending:
        row.cases.append(_run_case(case, ref, label, outcome, row, signature, judge, judging))
    for row, case, batched, singles in consistency:
        row.cases.append(_consistency(case, batched, singles, row, signature, judge, judging))
    judging.finish()
    for row in report.rows:
        _finish(row)
    report.notes += _degenerate(report)
    report.versions = _versions()
    report.seconds = time.perf_counter() - start
    return report


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


def _pick_reference(cells: list[tuple[VerifyRow, Any, Any]], reference: str,
                    report: VerifyReport) -> _ArtifactReference | None:
    order = [reference] if reference not in ("auto", "golden") else list(REFERENCE_PREFERENCE)
    ok = [(row, runner) for row, runner, _ in cells
          if runner is not None and row.cases and row.cases[0].passed and not row.contract]
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
