"""``--html``: one self-contained page (inline CSS, base64 PNGs) readable offline.

matplotlib is imported here only, and only when a report is written.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packager.errors import require

if TYPE_CHECKING:
    from packager.verifying import VerifyReport, VerifyRow

#: Points drawn per scatter/histogram: enough to show the error's shape, small enough for a page.
MAX_POINTS = 20_000
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}
.pass{color:#17702a;font-weight:bold}.fail{color:#b00020;font-weight:bold}.warn{color:#a15c00}
img{max-width:900px;border:1px solid #eee}code{background:#f6f6f6;padding:1px 3px}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return html.escape(str(value))


def _png(ref: np.ndarray, got: np.ndarray, title: str, atol: float | None, rtol: float | None) -> str:
    require("matplotlib", purpose="draw the plots of the HTML report")
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never a window
    import matplotlib.pyplot as plt

    r = np.asarray(ref, np.float64).ravel()
    g = np.asarray(got, np.float64).ravel()
    if r.size > MAX_POINTS:
        idx = np.random.default_rng(0).choice(r.size, MAX_POINTS, replace=False)
        r, g = r[idx], g[idx]
    finite = np.isfinite(r) & np.isfinite(g)
    r, g = r[finite], g[finite]
    err = np.abs(g - r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    positive = err[err > 0]
    if positive.size:
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, 40)
        ax1.hist(positive, bins=bins, color="#4c72b0")
        ax1.set_xscale("log")
    else:
        ax1.text(0.5, 0.5, "all errors are 0", ha="center", transform=ax1.transAxes)
    if atol is not None and atol > 0:
        ax1.axvline(atol, color="#b00020", linestyle="--", label=f"atol {atol:g}")
        ax1.legend()
    ax1.set_title("|candidate - reference|")
    ax1.set_xlabel("absolute error")
    ax1.set_ylabel("elements")
    ax2.scatter(r, g, s=4, alpha=0.5, color="#dd8452")
    if r.size:
        lo, hi = float(min(r.min(), g.min())), float(max(r.max(), g.max()))
        ax2.plot([lo, hi], [lo, hi], color="#555", linewidth=0.8)
    ax2.set_title("candidate vs reference")
    ax2.set_xlabel("reference")
    ax2.set_ylabel("candidate")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _row_html(row: "VerifyRow") -> str:
    cls = "pass" if row.passed else "fail"
    worst = row.worst
    refs = sorted({c.reference for c in row.cases})
    return ("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in (row.format, row.runtime, row.device, row.conversion))
            + f'<td class="{cls}">{row.verdict.upper()}{" (near)" if row.passed and row.near_fail else ""}</td>'
            + "".join(f"<td>{_fmt(v)}</td>" for v in (
                worst.output if worst else None, worst.case if worst else None, worst.max_abs if worst else None,
                worst.max_rel if worst else None, worst.min_atol if worst else None,
                worst.tolerance_use if worst else None, "; ".join(refs), row.error))
            + "</tr>")


def render(report: "VerifyReport") -> str:
    """The report as one HTML page."""
    status = "PASS" if report.passed else "FAIL"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>packager verify {html.escape(report.name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>packager verify: {html.escape(report.name)} "
             f"<span class='{'pass' if report.passed else 'fail'}'>{status}</span> (exit {report.exit_code})</h1>",
             f"<p>package <code>{html.escape(report.package)}</code>; reference <b>{html.escape(report.reference)}</b>"
             f"; live reference for new inputs: {_fmt(report.live_reference)}; cases: "
             f"{html.escape(', '.join(report.cases))}; {report.seconds:.2f} s</p>"]
    if report.notes:
        parts.append("<ul>" + "".join(f"<li class='warn'>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Matrix</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in (
        "format", "runtime", "device", "conversion", "verdict", "worst output", "case", "max abs", "max rel",
        "min atol to pass", "tolerance use", "references", "error")) + "</tr>")
    parts += [_row_html(r) for r in report.rows]
    parts.append("</table>")
    for row in report.rows:
        parts.append(f"<h2>{html.escape(row.format)} / {html.escape(row.runtime)} / {html.escape(row.device)}: "
                     f"<span class='{'pass' if row.passed else 'fail'}'>{row.verdict.upper()}</span></h2>")
        problems = list(row.contract) + [f"{c.name}: {c.detail}" for c in row.structure if not c.passed]
        if row.error:
            problems.insert(0, row.error)
        if problems:
            parts.append("<ul>" + "".join(f"<li class='fail'>{html.escape(p)}</li>" for p in problems) + "</ul>")
        parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in (
            "case", "inputs", "reference", "verdict", "output", "max abs", "mean abs", "max rel", "p99 rel",
            "out of tol", "cosine", "top-1", "top-k", "atol", "rtol", "min atol", "min rtol", "NaN/Inf ref|cand",
            "problem")) + "</tr>")
        for case in row.cases:
            lines = case.outputs or [None]
            for out in lines:
                verdict_cls = "pass" if case.passed else "fail"
                cells = [case.case, case.inputs, case.reference]
                parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in cells)
                             + f"<td class='{verdict_cls}'>{case.verdict}</td>")
                if out is None:
                    problem = case.error or "; ".join(case.contract) or ""
                    parts.append("<td>-</td>" * 14 + f"<td>{_fmt(problem)}</td></tr>")
                    continue
                special = f"{out.nan_reference}/{out.inf_reference} | {out.nan_candidate}/{out.inf_candidate}"
                parts.append("".join(f"<td>{_fmt(v)}</td>" for v in (
                    out.name, out.max_abs, out.mean_abs, out.max_rel, out.p99_rel, out.out_of_tolerance, out.cosine,
                    out.top1_agreement, out.topk_agreement, out.atol, out.rtol, out.min_atol, out.min_rtol, special,
                    "; ".join(filter(None, [out.problem, *case.contract]))))
                    + "</tr>")
        parts.append("</table>")
        for (case_name, output), (ref, got) in row._arrays.items():
            out = next((o for c in row.cases if c.case == case_name for o in c.outputs if o.name == output), None)
            title = f"{row.format}/{row.runtime}/{row.device} {case_name} output {output!r}"
            png = _png(ref, got, title, out.atol if out else None, out.rtol if out else None)
            parts.append(f"<h3>{html.escape(title)} ({'near failing' if out and out.passed else 'failing'})</h3>"
                         f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: "VerifyReport", path: str | Path) -> Path:
    """Write the HTML report."""
    path = Path(path)
    path.write_text(render(report), encoding="utf-8")
    return path
