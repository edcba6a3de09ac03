"""Accuracy budgets: how an optimised artifact (fp16, int8) is judged against the fp32 reference.

An fp16 or int8 artifact is not another evaluation of the same maths, so the judge's
elementwise noise rules (:mod:`packager.fidelity.judge`) would fail every correct one. It is
judged instead by the budget it was made under (``packager optimize --budget``), recorded in the
artifact's options and applied by the same judge everywhere (optimize, export parity, verify):

- ``cosine>=X``: the least cosine similarity of any row (axis 0) with the reference's row;
- ``top1>=X``: the share of rows whose arg-max class agrees (outputs shaped [rows, classes]);
- ``max_abs<=X``: the largest absolute difference of any element;
- ``rel<=X``: that difference relative to the output's scale (max |reference|).

Every float output must meet every criterion that applies to it, and at least one must apply
(``top1`` alone says nothing about an embedding). Integer and bool outputs must match exactly
(class ids, masks). NaN or Inf where the reference has none always fails. Numpy only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from packager.errors import UsageError
from packager.fidelity.metrics import OutputMetrics, looks_like_scores

#: criterion -> (comparison, what it measures).
CRITERIA = {"cosine": (">=", "least per-row cosine similarity"),
            "top1": (">=", "top-1 agreement over rows ([rows, classes] outputs)"),
            "max_abs": ("<=", "largest absolute difference"),
            "rel": ("<=", "largest absolute difference / the output's scale")}
#: Budgets ``packager optimize`` applies when none is given (the issue's targets).
#: Cosine cannot see a scale (an output 3x too large has cosine 1): a bound on the error relative
#: to the output's scale goes with it.
DEFAULT_BUDGETS = {"float16": "cosine>=0.999,rel<=0.05", "int8": "cosine>=0.99,top1>=0.99,rel<=0.25"}
#: A budget with more than this share used is reported as near failing.
NEAR_FAIL = 0.5

_TERM = re.compile(r"^\s*(cosine|top1|max_abs|rel)\s*(>=|<=)\s*([0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Budget:
    """Parsed ``cosine>=0.999,top1>=0.99,max_abs<=1e-2`` (each criterion at most once)."""

    terms: tuple[tuple[str, float], ...]

    @property
    def text(self) -> str:
        return ",".join(f"{name}{CRITERIA[name][0]}{value:g}" for name, value in self.terms)

    def __str__(self) -> str:
        return self.text


def parse_budget(text: str) -> Budget:
    """A budget from its text form.

    Raises:
        UsageError: An unknown criterion, the wrong comparison, a value out of range, a repeat.
    """
    terms: dict[str, float] = {}
    for part in [p for p in str(text).split(",") if p.strip()]:
        match = _TERM.match(part)
        if not match:
            raise UsageError(f"budget term {part.strip()!r}", "does not parse",
                             expected="cosine>=X, top1>=X, max_abs<=X or rel<=X, comma-separated",
                             got=text, fix="e.g. --budget 'cosine>=0.999,top1>=0.99'")
        name, op, raw = match.groups()
        if op != CRITERIA[name][0]:
            raise UsageError(f"budget term {part.strip()!r}", f"compares the wrong way: {name} is a "
                             f"{'floor' if CRITERIA[name][0] == '>=' else 'ceiling'}",
                             expected=f"{name}{CRITERIA[name][0]}X", got=part.strip())
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"budget term {part.strip()!r}", "has no number", got=raw) from None
        bounded = name in ("cosine", "top1")
        if not np.isfinite(value) or value < 0 or (bounded and value > 1):
            raise UsageError(f"budget term {part.strip()!r}", "is out of range",
                             expected="0..1" if bounded else ">= 0", got=value)
        if name in terms:
            raise UsageError(f"budget term {name!r}", "is given twice", got=text)
        terms[name] = value
    if not terms:
        raise UsageError("--budget", "is empty", expected="e.g. 'cosine>=0.999,top1>=0.99'", got=repr(text))
    return Budget(tuple(terms.items()))


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (axis 0) of two same-shaped float arrays (float64).
    Two all-zero rows agree (1.0); a zero row against a non-zero one does not (0.0)."""
    rows = reference.shape[0] if reference.ndim else 1
    r = np.asarray(reference, np.float64).reshape(rows, -1)
    g = np.asarray(candidate, np.float64).reshape(rows, -1)
    dots = np.einsum("ij,ij->i", r, g)
    norms = np.sqrt(np.einsum("ij,ij->i", r, r) * np.einsum("ij,ij->i", g, g))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    both_zero = (np.abs(r).max(axis=1, initial=0) == 0) & (np.abs(g).max(axis=1, initial=0) == 0)
    return np.where(both_zero, 1.0, cos)


def figures(reference: np.ndarray, candidate: np.ndarray, scale: float, max_abs: float) -> dict[str, float]:
    """Each criterion's value for one output (``top1`` only for class scores)."""
    values = {"cosine": float(row_cosines(reference, candidate).min()) if reference.size else 1.0,
              "max_abs": float(max_abs),
              "rel": float(max_abs / scale) if scale > 0 else (0.0 if max_abs == 0 else float("inf"))}
    if looks_like_scores(reference):
        values["top1"] = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return values


#: A flipped row whose reference margin (top-1 minus runner-up) is below this many times the
#: artifact's typical error (the median over all rows of a row's largest error) is a near tie: any
#: approximation of that size flips some such rows, so the miss says more about the rows than about
#: the artifact. (A row's own error cannot be the yardstick: any flip needs an error of half the margin.)
NEAR_TIE = 2.0


def explain_top1(reference: np.ndarray, candidate: np.ndarray) -> str:
    """Why rows of [rows, classes] scores changed class: how many, and their reference margins
    against the artifact's typical error (near ties vs confident answers changed)."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(candidate, np.float64)
    flipped = np.flatnonzero(ref.argmax(axis=1) != got.argmax(axis=1))
    if not flipped.size:
        return ""
    top2 = np.sort(ref[flipped], axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    typical = float(np.median(np.abs(got - ref).max(axis=1)))
    ties = int(np.sum(margins < NEAR_TIE * typical))
    text = (f"{flipped.size} of {ref.shape[0]} rows changed class (rows {', '.join(map(str, flipped[:8]))}"
            f"{', ...' if flipped.size > 8 else ''}); their reference margins (top-1 minus runner-up) are "
            f"{np.median(margins):.3g} median, {margins.max():.3g} max, against a typical row error of {typical:.3g}")
    if ties == flipped.size:
        return text + (f"; all {ties} are near ties (margin < {NEAR_TIE:g}x the typical error): the reference "
                       "barely separates those classes on these rows (an untrained model or ambiguous inputs), "
                       "so calibrate and judge on real data, or judge by cosine/rel")
    return text + (f"; {flipped.size - ties} of them are not near ties (margin >= {NEAR_TIE:g}x the typical "
                   "error): the artifact changes confident answers, keep more nodes in full precision")


def _use(name: str, bound: float, value: float) -> float:
    """Share of the budget used: 1.0 is the edge of failing."""
    if CRITERIA[name][0] == ">=":
        room = 1.0 - bound
        return (1.0 - value) / room if room > 0 else (0.0 if value >= bound else float("inf"))
    return value / bound if bound > 0 else (0.0 if value == 0 else float("inf"))


def apply_budget(metrics: OutputMetrics, budget: Budget, reference: np.ndarray, candidate: np.ndarray) -> OutputMetrics:
    """The verdict of one output's elementwise figures under ``budget`` (a copy of ``metrics``).

    Contract verdicts (shape, dtype, missing) and integer outputs (exact) keep their verdict;
    special values (NaN/Inf) where they do not match fail whatever the budget says.
    """
    if metrics.verdict == "contract" or np.asarray(reference).dtype.kind not in "fc":
        return metrics
    ref, got = np.asarray(reference), np.asarray(candidate)
    specials = (metrics.nan_candidate != metrics.nan_reference) or (metrics.inf_candidate != metrics.inf_reference)
    values = figures(ref, got, metrics.scale or 0.0, metrics.max_abs or 0.0)
    applied = [(name, bound) for name, bound in budget.terms if name in values]
    problems, parts, uses = [], [], []
    for name, bound in applied:
        value, use = values[name], _use(name, bound, values[name])
        uses.append(use)
        parts.append(f"{name} {value:.6g} {CRITERIA[name][0]} {bound:g}")
        if use > 1.0:
            problems.append(f"{name} {value:.6g} misses the budget {name}{CRITERIA[name][0]}{bound:g}"
                            + (f": {explain_top1(ref, got)}" if name == "top1" else ""))
    if not applied:
        problems.append(f"no criterion of the budget {budget} applies to this output (top1 needs [rows, classes] "
                        "scores): add cosine, max_abs or rel")
    if specials:
        problems.append(f"NaN/Inf differ (reference {metrics.nan_reference} NaN, {metrics.inf_reference} Inf; "
                        f"candidate {metrics.nan_candidate} NaN, {metrics.inf_candidate} Inf)")
    use = max(uses, default=float("inf"))
    passed = not problems
    source = f"budget {budget} ({', '.join(parts) or 'none applies'})"
    return metrics.model_copy(update=dict(
        passed=passed, verdict="pass" if passed else "numeric", problem="; ".join(problems) or None,
        tolerance_source=source, tolerance_use=use, near_fail=passed and use > NEAR_FAIL, atol=None, rtol=None,
        min_atol=None, min_rtol=None, out_of_tolerance=None, cosine=values["cosine"],
        top1_agreement=values.get("top1", metrics.top1_agreement), degenerate=metrics.degenerate))
