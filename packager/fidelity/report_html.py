"""``--html``: one self-contained page (inline CSS, PNGs as ``data:`` URIs) readable offline.

Every report opens with two overview figures drawn from the per-output metrics of every cell
(so a passing report has pictures too): tolerance use per cell and output, and the spread of
the error per cell. Failing and near-failing outputs then get element-level plots, drawn from the
arrays :mod:`packager.verifying` keeps for them. Every figure is a ``<figure>`` whose
``<figcaption>`` says what is plotted and how to read it. The page references nothing outside
itself (no scripts, fonts, stylesheets or images by URL).

matplotlib is imported here only, and only when a report is rendered.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from packager.atomic import atomic_path, commit_file
from packager.errors import require
from packager.fidelity.metrics import NEAR_FAIL

if TYPE_CHECKING:
    from packager.fidelity.metrics import OutputMetrics
    from packager.fidelity.report import VerifyReport, VerifyRow

#: Points drawn per scatter/histogram: enough to show the error's shape, small enough for a page.
MAX_POINTS = 20_000
#: Element-level plots per page, worst first: past this a page gets slow to open, and the worst
#: outputs already show what is wrong (the rest are listed by name).
MAX_DETAIL_PLOTS = 24
#: Outputs (heat map columns) and lines per cell (distribution panel) drawn: the ones with the
#: highest tolerance use. Past these a figure's labels overlap and its pixels outgrow the page.
MAX_OUTPUTS = 30
MAX_LINES = 40
#: Tolerance-use bins of the overview colours: upper bound, colour, legend label. Binned rather
#: than a continuous scale so that "failing" (> 1) and "near" (> NEAR_FAIL) read at a glance.
BINS: tuple[tuple[float, str, str], ...] = (
    (1e-3, "#1b7837", "< 0.001"),
    (1e-2, "#5aae61", "0.001-0.01"),
    (1e-1, "#a6dba0", "0.01-0.1"),
    (NEAR_FAIL, "#d9f0d3", f"0.1-{NEAR_FAIL:g}"),
    (1.0, "#fdb863", f"{NEAR_FAIL:g}-1 near"),
    (10.0, "#d6604d", "1-10 FAIL"),
    (math.inf, "#67001f", "> 10 FAIL"),
)
_NO_VALUE = "#d0d0d0"  # cells with no numeric comparison (load failure, contract, integer-only)
_DPI = 80

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}
.pass{color:#17702a;font-weight:bold}.fail{color:#b00020;font-weight:bold}.warn{color:#a15c00}
figure{margin:1.5em 0;padding:0.5em;border:1px solid #e4e4e4;max-width:1000px}
figure img{max-width:100%;display:block}figcaption{font-size:13px;line-height:1.45;margin-top:0.5em}
td{max-width:28em;overflow-wrap:break-word}.wide{overflow-x:auto}td.problem{min-width:24em}
code{background:#f6f6f6;padding:1px 3px}dt{font-weight:bold;margin-top:0.4em}dd{margin-left:1.5em}
"""


# --- small helpers ----------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return html.escape(str(value))


def _cell(row: "VerifyRow") -> str:
    return f"{row.format} / {row.runtime} / {row.device}"


def _plain(text: str) -> str:
    """Text for a matplotlib label: a ``$`` in an output name would start mathtext."""
    return text.replace("$", r"\$")


def _allowed(out: "OutputMetrics") -> float | None:
    """The bound every element of this output had to stay within: ``atol + rtol x scale``."""
    if out.atol is None or out.rtol is None or out.scale is None:
        return None
    return out.atol + out.rtol * out.scale


def _bin(use: float) -> int:
    return next(i for i, (upper, _, _) in enumerate(BINS) if use <= upper or i == len(BINS) - 1)


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure without pyplot: no global state, no backend switch, no window."""
    require("matplotlib", purpose="draw the plots of the HTML report")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)  # Figure.savefig uses the Agg canvas by default
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Figures:
    """Numbers the page's figures and writes each as ``<figure>`` with image, alt and caption."""

    def __init__(self) -> None:
        self.count = 0

    def html(self, png: str, alt: str, title: str, caption: str, fig_id: str | None = None) -> str:
        self.count += 1
        ident = fig_id or f"figure-{self.count}"
        return (f"<figure id='{html.escape(ident)}'><img alt='{html.escape(alt)}' src='data:image/png;base64,{png}'>"
                f"<figcaption><b>Figure {self.count}. {html.escape(title)}</b> {caption}</figcaption></figure>")


# --- overview: tolerance use per cell and output ------------------------------------------------
def _worst_use(row: "VerifyRow", output: str) -> tuple[float | None, str]:
    """Highest tolerance use of ``output`` over the cell's cases, and the case (or why none)."""
    best: tuple[float, str] | None = None
    problem = ""
    for case in row.cases:
        for out in case.outputs:
            if out.name != output:
                continue
            if out.tolerance_use is None:
                problem = problem or out.verdict
                continue
            if best is None or out.tolerance_use > best[0]:
                best = (out.tolerance_use, case.case)
    if best is None:
        return None, problem or (row.verdict if not row.passed else "not compared")
    return best


def _outputs(report: "VerifyReport") -> tuple[list[str], int]:
    """The outputs the heat map shows (in signature order) and how many there are in all."""
    names: dict[str, float] = {}
    for row in report.rows:
        for case in row.cases:
            for out in case.outputs:
                use = out.tolerance_use if out.tolerance_use is not None else (-1.0 if out.passed else math.inf)
                names[out.name] = max(names.get(out.name, -math.inf), use)
    shown = set(sorted(names, key=lambda n: -names[n])[:MAX_OUTPUTS])
    return [n for n in names if n in shown], len(names)


def heatmap_png(report: "VerifyReport") -> str:
    """Figure: worst tolerance use of every output in every cell, binned colours (cells as rows
    and outputs as columns; swapped when there are many more outputs, so labels stay readable)."""
    outputs = _outputs(report)[0] or ["(no output compared)"]
    rows = report.rows
    grid = np.full((len(rows), len(outputs)), np.nan)
    notes = np.full(grid.shape, "", dtype=object)
    for i, row in enumerate(rows):
        for j, name in enumerate(outputs):
            use, where = _worst_use(row, name)
            if use is None:
                notes[i, j] = where
            else:
                grid[i, j] = _bin(use)
                notes[i, j] = f"{use:.2g}\n{where}"
    cell_labels = [_plain(f"{_cell(r)} ({r.verdict})") for r in rows]
    output_labels = [_plain(str(o)) for o in outputs]
    across, down, x_name = output_labels, cell_labels, "output"
    if len(outputs) > max(6, len(rows)):
        grid, notes, across, down, x_name = grid.T, notes.T, cell_labels, output_labels, "cell"
    # Wide enough for the labels and the colour bar even with a single column.
    fig = _figure(min(max(7.0, 3.6 + 1.7 * len(across)), 30.0), min(max(2.4, 1.2 + 0.5 * len(down)), 30.0))
    from matplotlib.colors import BoundaryNorm, ListedColormap  # after _figure's require: a clear error

    ax = fig.add_subplot()
    cmap = ListedColormap([c for _, c, _ in BINS]).with_extremes(bad=_NO_VALUE)
    norm = BoundaryNorm(np.arange(len(BINS) + 1) - 0.5, len(BINS))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for (i, j), text in np.ndenumerate(notes):
        dark = not np.isnan(grid[i, j]) and (grid[i, j] <= 0 or grid[i, j] >= 5)
        ax.text(j, i, _plain(text), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(across)), across, fontsize=9, rotation=20 if x_name == "cell" else 0,
                  ha="right" if x_name == "cell" else "center")
    ax.set_yticks(range(len(down)), down, fontsize=9)
    ax.set_xlabel(x_name)
    ax.set_title("worst tolerance use over the cases", fontsize=10)
    bar = fig.colorbar(image, ax=ax, ticks=range(len(BINS)), fraction=0.05, pad=0.02)
    bar.ax.set_yticklabels([label for _, _, label in BINS], fontsize=8)
    fig.tight_layout()
    return _png(fig)


# --- overview: error distribution per cell ------------------------------------------------------
def _ratios(row: "VerifyRow") -> tuple[list[tuple[str, float, float]], int]:
    """(case / output, mean |err| / allowed, max |err| / allowed) for the compared outputs with
    the highest tolerance use (at most MAX_LINES, in case order), and how many were compared."""
    items = []
    for case in row.cases:
        for out in case.outputs:
            bound = _allowed(out)
            if bound is None or out.max_abs is None or out.mean_abs is None:
                continue
            if bound > 0:
                mean, peak = out.mean_abs / bound, out.max_abs / bound
            else:  # exact match required (integer outputs, --atol 0 --rtol 0)
                mean, peak = (0.0 if out.mean_abs == 0 else math.inf), (0.0 if out.max_abs == 0 else math.inf)
            items.append((f"{case.case} / {out.name}", mean, peak))
    shown = set(sorted(range(len(items)), key=lambda i: -items[i][2])[:MAX_LINES])
    return [item for i, item in enumerate(items) if i in shown], len(items)


def distribution_png(report: "VerifyReport") -> str:
    """Figure: per cell, for every case x output, the mean-to-max |err| range in units of its allowed bound."""
    counted = [_ratios(row) for row in report.rows]
    per_row = [items for items, _ in counted]
    finite = [v for items in per_row for _, a, b in items for v in (a, b) if 0 < v < math.inf]
    lo = max(min(finite) / 3, 1e-9) if finite else 1e-4
    hi = max(max(finite) * 3, 3.0) if finite else 3.0
    heights = [max(len(items), 1) * 0.24 + 0.55 for items in per_row] or [1.0]
    fig = _figure(10, sum(heights) + 0.8)
    axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, row, (items, total) in zip(axes, report.rows, counted):
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.axvline(NEAR_FAIL, color="#e08214", linestyle=":", linewidth=1)
        ax.axvline(1.0, color="#b2182b", linestyle="--", linewidth=1)
        more = f" ({len(items)} of {total} lines: the highest)" if total > len(items) else ""
        ax.set_title(_plain(f"{_cell(row)}: {row.verdict.upper()}{more}"), fontsize=9, loc="left")
        if not items:
            ax.set_yticks([])
            ax.text(0.5, 0.5, f"no output compared ({row.verdict})", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            continue
        for y, (label, mean, peak) in enumerate(items):
            a, b = min(max(mean, lo), hi), min(max(peak, lo), hi)
            colour = BINS[_bin(peak)][1]
            ax.plot([a, b], [y, y], color="#777", linewidth=2, solid_capstyle="butt")
            ax.plot([a], [y], marker="|", color="#333", markersize=8)
            ax.plot([b], [y], marker="o", color=colour, markeredgecolor="#333", markersize=6)
        ax.set_yticks(range(len(items)), [_plain(label) for label, _, _ in items], fontsize=7)
        ax.set_ylim(len(items) - 0.5, -0.5)
    axes[-1].set_xlabel("|err| / allowed   (allowed = atol + rtol x scale; 1 = edge of failing)")
    fig.tight_layout()
    return _png(fig)


# --- details: failing and near-failing outputs --------------------------------------------------
def detail_png(ref: np.ndarray, got: np.ndarray, title: str, allowed: float | None) -> str:
    """Figure: histogram of element |err| (log x, the allowed bound as a line), signed error vs
    reference (+-allowed), and candidate vs reference."""
    r = np.asarray(ref, np.float64).ravel()
    g = np.asarray(got, np.float64).ravel()
    if r.size > MAX_POINTS:
        idx = np.random.default_rng(0).choice(r.size, MAX_POINTS, replace=False)  # seeded: same page each run
        r, g = r[idx], g[idx]
    finite = np.isfinite(r) & np.isfinite(g)
    r, g = r[finite], g[finite]
    err = np.abs(g - r)
    fig = _figure(13, 3.8)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    positive = err[err > 0]
    zeros = int(err.size - positive.size)  # exact matches: a log axis cannot show them, the title does
    if positive.size:
        low, high = positive.min(), positive.max()
        if allowed:
            low, high = min(low, allowed), max(high, allowed)
        bins = np.logspace(np.log10(low), np.log10(high) + 1e-9, 40)
        ax1.hist(positive, bins=bins, color="#4c72b0")
        ax1.set_xscale("log")
    else:
        ax1.text(0.5, 0.5, "all errors are 0", ha="center", transform=ax1.transAxes)
    if allowed is not None and allowed > 0 and positive.size:
        ax1.axvline(allowed, color="#b00020", linestyle="--", label=f"allowed {allowed:.3g}")
        ax1.legend(fontsize=8)
    ax1.set_title("|candidate - reference| per element" + (f" ({zeros} exactly 0, not drawn)" if zeros and
                                                           positive.size else ""), fontsize=10)
    ax1.set_xlabel("absolute error")
    ax1.set_ylabel("elements")
    ax1.yaxis.get_major_locator().set_params(integer=True)  # element counts: whole numbers
    beyond = err > allowed if allowed is not None else np.zeros(err.shape, bool)
    # Signed error against the reference value: shows where (large or small values, one sign)
    # the artifact errs, at a scale where a near-failing error is visible (unlike the diagonal).
    for ax, y, name in ((ax2, g - r, "candidate - reference"), (ax3, g, "candidate")):
        if (~beyond).any():
            ax.scatter(r[~beyond], y[~beyond], s=9, alpha=0.6, color="#dd8452", label="within allowed")
        if beyond.any():
            ax.scatter(r[beyond], y[beyond], s=10, alpha=0.8, color="#b00020", label="beyond allowed")
        ax.set_xlabel("reference")
        ax.set_ylabel(name)
        if r.size:
            ax.legend(fontsize=8, loc="upper left")
    if allowed is not None and allowed > 0:
        for sign in (1, -1):
            ax2.axhline(sign * allowed, color="#b00020", linestyle="--", linewidth=0.8)
    ax2.set_title("signed error vs reference (dashed: +-allowed)", fontsize=10)
    if r.size:
        lo, hi = float(min(r.min(), g.min())), float(max(r.max(), g.max()))
        ax3.plot([lo, hi], [lo, hi], color="#555", linewidth=0.8)
    ax3.set_title("candidate vs reference (diagonal = equal)", fontsize=10)
    fig.suptitle(_plain(title), fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _metrics(row: "VerifyRow", case_name: str, output: str) -> "OutputMetrics | None":
    return next((o for c in row.cases if c.case == case_name for o in c.outputs if o.name == output), None)


def _details(report: "VerifyReport") -> list[tuple[float, "VerifyRow", str, str]]:
    """Every kept (failing or near-failing) output, worst tolerance use first."""
    found = []
    for row in report.rows:
        for case_name, output in row._arrays:
            out = _metrics(row, case_name, output)
            use = out.tolerance_use if out and out.tolerance_use is not None else math.inf
            found.append((use, row, case_name, output))
    found.sort(key=lambda item: -item[0])
    return found


# --- captions ---------------------------------------------------------------------------------
_HEATMAP_CAPTION = (
    "One row per artifact x runtime x device cell (its verdict in brackets), one column per output "
    "(the other way round when there are many more outputs than cells). "
    "Each square shows that output's highest <i>tolerance use</i> over the cell's cases, "
    "<code>max |err| / (atol + rtol x scale)</code> with <code>scale</code> = max |reference|, and the case "
    "it came from. 1 is the edge of failing: below {near} the output is comfortably within its tolerance "
    "(greens, darker = further from it), {near} to 1 is <i>near failing</i> (orange), above 1 it failed "
    "(reds). Grey: no numeric comparison, with the reason (the cell failed to load or run, a contract "
    "problem, or the output is not in that cell).")
_DISTRIBUTION_CAPTION = (
    "One panel per cell, one line per case and output, on a log scale in units of the bound every element "
    "had to stay within (<code>allowed = atol + rtol x scale</code>). The bar runs from the mean |err| "
    "(tick) to the largest |err| (dot, coloured like Figure 1); the dotted line is the near-failing mark "
    "({near}), the dashed line the edge of failing (1). A dot right of the dashed line is an output with at "
    "least one element out of tolerance; a long bar means a few elements err much more than the typical "
    "one. Values at the left or right edge are clipped there (0 or infinite errors).")
_DETAIL_CAPTION = (
    "Every element of output <code>{output}</code> in case <code>{case}</code> of cell {cell}{sampled}. "
    "Left: how many elements have each absolute error (log scale; exact matches are not counted); the "
    "dashed line is the allowed bound <code>atol + rtol x scale</code> = {allowed}, and every element "
    "right of it is out of tolerance. Middle: the signed error of each element against its reference "
    "value, between the dashed lines at +-allowed when within tolerance; it shows whether the error "
    "grows with the value or has one sign. Right: candidate value against reference value per element; "
    "points on the diagonal agree. Red points are beyond the allowed bound. Tolerance use {use}, "
    "{out_of} of the elements out of tolerance.")
_TERMS = (
    ("cell", "one artifact (format) loaded by one runtime on one device."),
    ("case", "one set of inputs: the golden inputs, other batch sizes, swept dynamic sizes, random or "
             "your inputs; each records its reference."),
    ("|err|", "|candidate - reference| per element."),
    ("allowed", "atol + rtol x scale, scale = max |reference| of the output in that case: an element "
                "passes when |err| &lt;= allowed."),
    ("tolerance use", "max |err| / allowed; 1 is the edge of failing, above "
                      f"{NEAR_FAIL:g} a passing output is marked near failing."),
)


# --- the page ---------------------------------------------------------------------------------
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


def _cases_html(row: "VerifyRow") -> Iterable[str]:
    # 19 columns do not fit a page: the table scrolls sideways, and the problem text keeps a
    # readable width instead of being squeezed into a column one word wide.
    yield "<div class='wide'><table><tr>" + "".join(f"<th>{h}</th>" for h in (
        "case", "inputs", "reference", "verdict", "output", "max abs", "mean abs", "max rel", "p99 rel",
        "out of tol", "cosine", "top-1", "top-k", "atol", "rtol", "min atol", "min rtol", "NaN/Inf ref|cand",
        "problem")) + "</tr>"
    for case in row.cases:
        for out in case.outputs or [None]:
            verdict_cls = "pass" if case.passed else "fail"
            head = ("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in (case.case, case.inputs, case.reference))
                    + f"<td class='{verdict_cls}'>{html.escape(case.verdict)}</td>")
            if out is None:
                problem = case.error or "; ".join(case.contract) or ""
                yield head + "<td>-</td>" * 14 + f"<td class='problem'>{_fmt(problem)}</td></tr>"
                continue
            special = f"{out.nan_reference}/{out.inf_reference} | {out.nan_candidate}/{out.inf_candidate}"
            yield head + "".join(f"<td>{_fmt(v)}</td>" for v in (
                out.name, out.max_abs, out.mean_abs, out.max_rel, out.p99_rel, out.out_of_tolerance, out.cosine,
                out.top1_agreement, out.topk_agreement, out.atol, out.rtol, out.min_atol, out.min_rtol, special)) + (
                f"<td class='problem'>{_fmt('; '.join(filter(None, [out.problem, *case.contract])))}</td></tr>")
    yield "</table></div>"


def _overview(report: "VerifyReport", figures: _Figures) -> list[str]:
    parts = ["<h2>Overview</h2>"]
    if not report.rows:
        return parts + ["<p>No cell was verified: nothing to draw.</p>"]
    near = f"{NEAR_FAIL:g}"
    shown, total = _outputs(report)
    more = (f" Only the {len(shown)} of {total} outputs with the highest tolerance use are drawn; the tables "
            "below have every one." if total > len(shown) else "")
    parts.append(figures.html(heatmap_png(report), "heat map of tolerance use per cell and output",
                              "Tolerance use per cell and output.", _HEATMAP_CAPTION.format(near=near) + more,
                              "figure-tolerance-use"))
    parts.append(figures.html(distribution_png(report), "error range per case and output, one panel per cell",
                              "Error distribution per cell.", _DISTRIBUTION_CAPTION.format(near=near)
                              + f" A cell with more than {MAX_LINES} lines shows those with the largest error.",
                              "figure-error-distribution"))
    parts.append("<dl>" + "".join(f"<dt>{html.escape(t)}</dt><dd>{d}</dd>" for t, d in _TERMS) + "</dl>")
    return parts


def _detail_html(row: "VerifyRow", case_name: str, output: str, figures: _Figures) -> str:
    ref, got = row._arrays[(case_name, output)]
    out = _metrics(row, case_name, output)
    allowed = _allowed(out) if out else None
    state = "near failing" if out and out.passed else "failing"
    title = f"{_cell(row)}, case {case_name}, output {output!r}: {state}"
    png = detail_png(ref, got, title, allowed)
    size = int(np.size(ref))
    caption = _DETAIL_CAPTION.format(
        output=html.escape(output), case=html.escape(case_name), cell=html.escape(_cell(row)),
        sampled=f" ({MAX_POINTS} of its {size} elements, drawn at random with a fixed seed)" if size > MAX_POINTS
        else "", allowed=_fmt(allowed), use=_fmt(out.tolerance_use if out else None),
        out_of="-" if out is None or out.out_of_tolerance is None else f"{100 * out.out_of_tolerance:.3g} %")
    return figures.html(png, f"error histogram and scatter of {title}", f"{title}.", caption)


def render(report: "VerifyReport") -> str:
    """The report as one HTML page: overview figures, the matrix, every cell's cases, then
    element-level plots of the failing and near-failing outputs (worst first)."""
    status = "PASS" if report.passed else "FAIL"
    figures = _Figures()
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>packager verify {html.escape(report.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>packager verify: {html.escape(report.name)} "
             f"<span class='{'pass' if report.passed else 'fail'}'>{status}</span> (exit {report.exit_code})</h1>",
             f"<p>package <code>{html.escape(report.package)}</code>; reference <b>{html.escape(report.reference)}</b>"
             f"; live reference for new inputs: {_fmt(report.live_reference)}; cases: "
             f"{html.escape(', '.join(report.cases))}; {report.seconds:.2f} s</p>",
             f"<p class='meta'>verified on {html.escape(report.host)} at {html.escape(report.created)}; versions: "
             + html.escape(", ".join(f"{k} {v}" for k, v in sorted(report.versions.items())) or "not recorded")
             + "</p>"]
    if report.notes:
        parts.append("<ul>" + "".join(f"<li class='warn'>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts += _overview(report, figures)
    parts.append("<h2>Matrix</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in (
        "format", "runtime", "device", "conversion", "verdict", "worst output", "case", "max abs", "max rel",
        "min atol to pass", "tolerance use", "references", "error")) + "</tr>")
    parts += [_row_html(r) for r in report.rows]
    parts.append("</table>")
    for row in report.rows:
        parts.append(f"<h2>{html.escape(_cell(row))}: "
                     f"<span class='{'pass' if row.passed else 'fail'}'>{row.verdict.upper()}</span></h2>")
        problems = list(row.contract) + [f"{c.name}: {c.detail}" for c in row.structure if not c.passed]
        if row.error:
            problems.insert(0, row.error)
        if problems:
            parts.append("<ul>" + "".join(f"<li class='fail'>{html.escape(p)}</li>" for p in problems) + "</ul>")
        parts += _cases_html(row)
    details = _details(report)
    if details:
        parts.append("<h2>Failing and near-failing outputs</h2>")
        for _, row, case_name, output in details[:MAX_DETAIL_PLOTS]:
            parts.append(_detail_html(row, case_name, output, figures))
        rest = details[MAX_DETAIL_PLOTS:]
        if rest:
            parts.append(f"<p>{len(rest)} more not drawn (see the tables above): " + html.escape(", ".join(
                f"{_cell(r)} {c} {o}" for _, r, c, o in rest)) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: "VerifyReport", path: str | Path) -> Path:
    """Write the HTML report (atomically: a reader never sees half a page)."""
    path = Path(path)
    page = render(report)
    tmp = atomic_path(path)
    try:
        tmp.write_text(page, encoding="utf-8")
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
