"""The ``verify`` report: its models, what the renderers read and the JSON schema.

:mod:`packager.verifying` fills them; the renderers (:mod:`~packager.fidelity.report_text`,
:mod:`~packager.fidelity.report_junit`, :mod:`~packager.fidelity.report_html`) read them from
here, so a renderer never imports the orchestrator. Verdicts are the judge's
(:mod:`packager.fidelity.judge`); this module only orders them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, computed_field

from packager.errors import ExitCode
from packager.fidelity.metrics import OutputMetrics
from packager.fidelity.onnx_checks import Check
from packager.manifest import OutputParity, Parity

REPORT_VERSION = 1
#: verdict -> exit code; the report's code is the worst over its cells (runtime > contract > numeric).
VERDICT_CODES = {"pass": ExitCode.OK, "numeric": ExitCode.FIDELITY, "contract": ExitCode.CONTRACT,
                 "runtime": ExitCode.RUNTIME}
_SEVERITY = ("pass", "numeric", "contract", "runtime")


def _host() -> str:
    import platform

    return f"{platform.node()} ({platform.system()} {platform.machine()}, Python {platform.python_version()})"


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _worse(a: str, b: str) -> str:
    """The more severe of two verdicts (pass < numeric < contract < runtime)."""
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
    host: str = Field(default_factory=lambda: _host(), description="Host name, OS and machine that verified.")
    created: str = Field(default_factory=lambda: _now(), description="When it was verified (UTC, ISO 8601).")

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
