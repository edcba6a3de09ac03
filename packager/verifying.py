"""``packager verify``: re-run the golden check of every artifact with its runtime on this host.

The fidelity engine (contract checks, shape sweeps, metrics, reports) grows from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from packager.errors import ExitCode, PackagerError
from packager.manifest import Parity
from packager.package import Package


@dataclass
class VerifyRow:
    """One artifact x runtime x device cell."""

    format: str
    parity: Parity
    exit_code: ExitCode = ExitCode.OK

    @property
    def passed(self) -> bool:
        return self.parity.passed


@dataclass
class VerifyReport:
    """Result of :func:`verify`; truthy when every cell passed."""

    package: str
    rows: list[VerifyRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> ExitCode:
        """Worst exit code over the rows (runtime failure > contract > numeric)."""
        codes = [r.exit_code for r in self.rows if not r.passed]
        for code in (ExitCode.RUNTIME, ExitCode.CONTRACT, ExitCode.FIDELITY):
            if code in codes:
                return code
        return ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {"package": self.package, "passed": self.passed, "exit_code": int(self.exit_code),
                "rows": [{"format": r.format, **r.parity.model_dump()} for r in self.rows]}


def verify(path: str | Path, *, formats: Iterable[str] | None = None, runtimes: Iterable[str] | None = None,
           devices: Iterable[str] = ("cpu",), atol: float | Mapping[str, float] | None = None,
           rtol: float | Mapping[str, float] | None = None) -> VerifyReport:
    """Run every artifact's runtimes on the golden inputs and compare with the golden outputs.

    Args:
        path: Package folder.
        formats: Only these formats (default: all in the package).
        runtimes: Only these runtimes (default: every runtime each artifact lists).
        devices: Devices to run on.
        atol: Absolute tolerance override (one, or per output).
        rtol: Relative tolerance override.
    """
    from packager.compare import compare_outputs
    from runtimes import runner_class

    package = Package(path)
    inputs, reference = package.golden()
    report = VerifyReport(package=str(path))
    wanted = set(formats) if formats else None
    wanted_rt = set(runtimes) if runtimes else None
    for artifact in package.manifest.artifacts:
        if wanted and artifact.format not in wanted:
            continue
        for runtime in artifact.runtimes:
            if wanted_rt and runtime not in wanted_rt:
                continue
            for device in devices:
                try:
                    with runner_class(runtime)(package.resolve(artifact.path), signature=package.manifest.signature,
                                               device=device, **artifact.options.get("runner", {})) as runner:
                        got = runner.run(inputs)
                        notes = list(runner.notes)
                except PackagerError as exc:
                    report.rows.append(VerifyRow(artifact.format, Parity(runtime=runtime, device=str(device),
                                                                         passed=False, error=exc.message),
                                                 ExitCode.RUNTIME))
                    continue
                results = compare_outputs(reference, got, atol=atol, rtol=rtol)
                passed = all(r.passed for r in results)
                report.rows.append(VerifyRow(artifact.format, Parity(runtime=runtime, device=str(device),
                                                                     passed=passed, outputs=results, notes=notes),
                                             ExitCode.OK if passed else ExitCode.FIDELITY))
    return report
