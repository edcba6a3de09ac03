"""The terminal summary of a verification (rich table + one line per failing case)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from packager.errors import cli_words
from packager.tables import print_table

if TYPE_CHECKING:
    from packager.fidelity.report import VerifyReport

_STYLE = {"pass": "green", "numeric": "red", "contract": "magenta", "runtime": "red"}


#: What the columns mean (also in docs/fidelity.md, "Reading the report").
LEGEND = ("max abs: largest |artifact - reference| of the worst output\n"
          "min atol: the smallest atol that would have passed with the rtol used\n"
          "tol use: max |err| / (atol + rtol x max|ref|); 1 = edge of failing, near > 0.5")


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def print_report(report: "VerifyReport", console: Console, title: str | None = None,
                 summary_only: bool = False) -> None:
    """Print the matrix, then every failing case and the notes (``summary_only``: the last line)."""
    if not summary_only:
        _print_details(report, console, title)
    verdict = ("PASS", "green") if report.passed else ("FAIL", "red")
    console.print(Text.assemble(verdict, "" if report.passed else f" (exit {report.exit_code})",
                                f": {len(report.rows)} cell(s), cases {', '.join(report.cases)}; live reference: "
                                f"{report.live_reference or 'none'}; {report.seconds:.2f} s"), highlight=False)


def _print_details(report: "VerifyReport", console: Console, title: str | None) -> None:
    rows = []
    for row in report.rows:
        style = _STYLE.get(row.verdict, "red")
        verdict = Text.assemble((row.verdict.upper(), style), (" (near)", "yellow") if row.passed and row.near_fail else "")
        worst = row.worst
        passed = sum(c.passed for c in row.cases)
        cell = row.format if row.runtime == row.format else f"{row.format} ({row.runtime})"
        # Text cells: output names, paths and messages are printed as they are, never as markup.
        rows.append([Text(f"{cell} {row.device}"), verdict,
                     Text(f"{worst.output} @ {worst.case}" if worst else "load failed" if row.error else ""),
                     _g(worst.max_abs if worst else None), _g(worst.min_atol if worst else None),
                     _g(worst.tolerance_use if worst else None), f"{passed}/{len(row.cases)}"])
    print_table(console, title or f"verify {report.package}",
                ("cell", "verdict", "worst output @ case", "max abs", "min atol", "tol use", "cases"), rows,
                right=("max abs", "min atol", "tol use", "cases"))
    console.print(Text(LEGEND, style="dim"), highlight=False, soft_wrap=False)
    for row in report.rows:
        cell = f"{row.format}/{row.runtime}/{row.device}"
        if row.conversion.startswith("budget:"):
            # An optimised artifact's "tol use" is its budget's: say which rule judged it.
            worst = row.worst
            figures = worst and next((o.tolerance_source for c in row.cases if c.case == worst.case
                                      for o in c.outputs if o.name == worst.output), None)
            console.print(Text.assemble((cell, "cyan"), f": judged by its accuracy budget {row.conversion[7:]} "
                                        "(packager optimize), not by fp32 tolerances"
                                        + (f"; worst case {worst.case}: {figures}" if figures else "")),
                          highlight=False, soft_wrap=True)
        if row.error:
            console.print(Text.assemble((cell, "red"), f": {cli_words(row.error)}"), highlight=False, soft_wrap=True)
        for problem in row.contract:
            console.print(Text.assemble((f"{cell} contract", "magenta"), f": {problem}"), highlight=False,
                          soft_wrap=True)
        for check in row.structure:
            if not check.passed:
                console.print(Text.assemble((f"{cell} {check.name}", "magenta"), f": {check.detail}"),
                              highlight=False, soft_wrap=True)
        for case in row.cases:
            if case.passed:
                continue
            lines = ([case.error] if case.error else []) + case.contract + [
                f"output {o.name!r}: {o.problem}" for o in case.outputs if not o.passed]
            for line in lines:
                console.print(Text.assemble((f"{cell} {case.case}", _STYLE.get(case.verdict, "red")),
                                            f" ({case.verdict}, reference: {case.reference}): {line}"),
                              highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(Text.assemble(("note", "yellow"), f": {note}"), highlight=False, soft_wrap=True)
