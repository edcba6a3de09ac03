"""The terminal summary of a verification (rich table + one line per failing case)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from packager.verifying import VerifyReport

_STYLE = {"pass": "green", "numeric": "red", "contract": "magenta", "runtime": "red"}


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def print_report(report: "VerifyReport", console: Console, title: str | None = None) -> None:
    """Print the matrix, then every failing case and the notes."""
    table = Table(title=title or f"verify {report.package}")
    for col in ("cell", "verdict", "worst output @ case", "max abs", "min atol", "tol use", "cases"):
        table.add_column(col, overflow="fold")
    for row in report.rows:
        style = _STYLE.get(row.verdict, "red")
        verdict = f"[{style}]{row.verdict.upper()}[/]" + (" [yellow](near)[/]" if row.passed and row.near_fail else "")
        worst = row.worst
        passed = sum(c.passed for c in row.cases)
        cell = row.format if row.runtime == row.format else f"{row.format} ({row.runtime})"
        table.add_row(f"{cell} {row.device}", verdict,
                      f"{worst.output} @ {worst.case}" if worst else "load failed" if row.error else "",
                      _g(worst.max_abs if worst else None), _g(worst.min_atol if worst else None),
                      _g(worst.tolerance_use if worst else None),
                      f"{passed}/{len(row.cases)}")
    console.print(table)
    for row in report.rows:
        cell = f"{row.format}/{row.runtime}/{row.device}"
        if row.error:
            console.print(f"[red]{cell}[/]: {row.error}", highlight=False, soft_wrap=True)
        for problem in row.contract:
            console.print(f"[magenta]{cell} contract[/]: {problem}", highlight=False, soft_wrap=True)
        for check in row.structure:
            if not check.passed:
                console.print(f"[magenta]{cell} {check.name}[/]: {check.detail}", highlight=False, soft_wrap=True)
        for case in row.cases:
            if case.passed:
                continue
            lines = ([case.error] if case.error else []) + case.contract + [
                f"output {o.name!r}: {o.problem}" for o in case.outputs if not o.passed]
            for line in lines:
                console.print(f"[{_STYLE.get(case.verdict, 'red')}]{cell} {case.case}[/] ({case.verdict}, "
                              f"reference: {case.reference}): {line}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"[yellow]note[/]: {note}", highlight=False, soft_wrap=True)
    verdict = "[green]PASS[/]" if report.passed else f"[red]FAIL[/] (exit {report.exit_code})"
    console.print(f"{verdict}: {len(report.rows)} cell(s), cases {', '.join(report.cases)}; live reference: "
                  f"{report.live_reference or 'none'}; {report.seconds:.2f} s", highlight=False)
