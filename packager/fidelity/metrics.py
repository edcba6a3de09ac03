"""Per-output comparison figures for a given :class:`Tolerance` (chosen by :mod:`packager.fidelity.judge`).

Everything here is numpy only: it runs for every output of every cell, so it must stay cheap
next to the inference it judges (one float64 pass over each array).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict

#: A cell whose worst element uses more than this share of its tolerance is "near failing".
NEAR_FAIL = 0.5


class Tolerance(BaseModel):
    """The tolerance one output is judged with and where it came from.

    An element passes when ``|candidate - reference| <= atol + rtol * scale``, where ``scale``
    is the output's scale in that case (max |reference| over its finite elements), not the
    element's own magnitude: rounding errors of fp32 arithmetic are relative to the magnitudes
    that were summed, so an element near zero in an output of scale 50 carries the rounding of
    50, not of its own value. :mod:`packager.fidelity.judge` picks the values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    atol: float
    rtol: float
    source: str  # "noise 4.5e-07 (float64) x16", "--atol", "noise floor 3e-6", ...


class OutputMetrics(BaseModel):
    """Every figure for one output of one case. Errors are candidate minus reference."""

    model_config = ConfigDict(extra="forbid")

    name: str
    passed: bool
    #: ``pass``, ``numeric`` (values differ) or ``contract`` (missing, shape, dtype).
    verdict: str
    problem: str | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    reference_dtype: str | None = None
    atol: float | None = None
    rtol: float | None = None
    tolerance_source: str | None = None
    elements: int = 0
    max_abs: float | None = None
    mean_abs: float | None = None
    max_rel: float | None = None
    p99_rel: float | None = None
    out_of_tolerance: float | None = None  # fraction of elements
    cosine: float | None = None
    #: max |reference| over the finite elements: what ``rtol`` is relative to.
    scale: float | None = None
    #: ``max |err| / (atol + rtol x scale)``: 1.0 is the edge of failing.
    tolerance_use: float | None = None
    near_fail: bool = False
    #: Smallest atol that would have passed with this rtol, and smallest rtol with this atol.
    min_atol: float | None = None
    min_rtol: float | None = None
    top1_agreement: float | None = None
    topk_agreement: float | None = None
    k: int | None = None
    nan_reference: int = 0
    nan_candidate: int = 0
    inf_reference: int = 0
    inf_candidate: int = 0
    #: Set when the reference cannot tell a right artifact from a wrong one: it is constant (or
    #: all zero), or so nearly constant that a constant output would pass. Not a failure.
    degenerate: str | None = None


def _p99(rel: np.ndarray, finite: bool = False) -> float:
    """99th percentile (nearest rank) of the finite relative errors; partition, not a sort.
    ``finite``: the caller knows every value is finite."""
    finite = rel if finite or np.isfinite(rel).all() else rel[np.isfinite(rel)]
    if not finite.size:
        return float(rel.max()) if rel.size else 0.0
    k = min(finite.size - 1, int(np.ceil(0.99 * finite.size)) - 1)
    return float(np.partition(finite, k)[k])


def _metrics(**fields: Any) -> OutputMetrics:
    # Validated construction: pydantic-core's validator is faster than model_construct here.
    return OutputMetrics(**fields)


def looks_like_scores(ref: np.ndarray) -> bool:
    """Class scores: a float [batch, classes] array with 2..100000 classes."""
    return ref.ndim == 2 and ref.dtype.kind == "f" and 2 <= ref.shape[1] <= 100_000 and ref.shape[0] >= 1


def _topk(refs: np.ndarray, gots: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row of [rows, classes] scores: whether the top-1 classes agree, and the share of the
    reference's top-k classes the candidate also ranks in its top-k."""
    classes = refs.shape[1]
    k = min(5, classes - 1) if classes > 2 else 1
    # Both sides in one array: each numpy call below then runs once instead of twice.
    both = np.stack((refs, gots))
    top1 = both.argmax(axis=2)
    top = np.argpartition(np.negative(both, out=both), k - 1, axis=2)[:, :, :k]
    overlap = np.count_nonzero(top[0][:, :, None] == top[1][:, None, :], axis=(1, 2)) / k
    return top1[0] == top1[1], overlap, k


def _base(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """The fields every comparison result carries: what was compared, and with which tolerance."""
    return dict(name=name, shape=list(got.shape), dtype=got.dtype.name, reference_dtype=ref.dtype.name,
                atol=tol.atol, rtol=tol.rtol, tolerance_source=tol.source)


def _early(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> OutputMetrics | None:
    """The result of comparisons that need no float figures: shape or dtype mismatches (a
    contract verdict) and integer/bool outputs (exact match, the figures are counts)."""
    base = _base(name, ref, got, tol)
    if ref.shape != got.shape:
        return _metrics(passed=False, verdict="contract", **base,
                        problem=f"shape {list(got.shape)} differs from the reference {list(ref.shape)}")
    if ref.dtype.kind != got.dtype.kind and not (ref.dtype.kind in "fc" and got.dtype.kind in "fc"):
        return _metrics(passed=False, verdict="contract", **base,
                        problem=f"dtype {got.dtype.name} differs from the reference {ref.dtype.name}")
    if ref.dtype.kind in "fc" and got.dtype.kind in "fc":
        return None
    wrong = ref != got
    n_wrong = int(wrong.sum())
    max_abs = float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max()) if ref.size else 0.0
    passed = n_wrong == 0 if tol.atol == 0 else max_abs <= tol.atol
    mean_abs = float(np.abs(ref.astype(np.float64) - got).mean()) if ref.size else 0.0
    use = (0.0 if n_wrong == 0 else float("inf")) if tol.atol == 0 else max_abs / tol.atol
    return _metrics(passed=passed, verdict="pass" if passed else "numeric", **base, elements=int(ref.size),
                    max_abs=max_abs, mean_abs=mean_abs, out_of_tolerance=n_wrong / max(ref.size, 1),
                    min_atol=max_abs, min_rtol=None, tolerance_use=use,
                    degenerate=(f"reference output {name!r} is constant: parity is not informative"
                                if ref.size and (ref == ref.flat[0]).all() else None),
                    problem=None if passed else f"{n_wrong} of {ref.size} elements differ")


def _special(ref64: np.ndarray, got64: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int], int, list[str]]:
    """The finite elements of both sides, NaN/Inf counts, the mismatched specials and what is wrong."""
    nan_r, nan_g = np.isnan(ref64), np.isnan(got64)
    inf_r, inf_g = np.isinf(ref64), np.isinf(got64)
    counts = dict(nan_reference=int(nan_r.sum()), nan_candidate=int(nan_g.sum()),
                  inf_reference=int(inf_r.sum()), inf_candidate=int(inf_g.sum()))
    problems = []
    special_bad = nan_r != nan_g
    if special_bad.any():
        problems.append(f"NaN positions differ (reference {counts['nan_reference']}, candidate "
                        f"{counts['nan_candidate']})")
    inf_bad = (inf_r | inf_g) & ~(nan_r | nan_g) & ~((inf_r & inf_g) & (np.sign(ref64) == np.sign(got64)))
    if inf_bad.any():
        problems.append(f"Inf positions or signs differ at {int(inf_bad.sum())} elements")
    finite = ~(nan_r | nan_g | inf_r | inf_g)
    return ref64[finite], got64[finite], counts, int((special_bad | inf_bad).sum()), problems


def _figures(r: np.ndarray, g: np.ndarray, sizes: list[int], tol: Tolerance) -> list[dict[str, Any]]:
    """Every float figure of each segment of the 1-D float64 arrays ``r`` (reference) and ``g``
    (candidate), ``sizes`` long each, computed over the whole arrays at once: one numpy call
    per figure whatever the number of segments (each call costs microseconds even on 10 values).
    Each segment is one output of one case, with its own scale (max |reference|)."""
    if not all(sizes):  # reduceat cannot reduce empty segments: figure them one by one
        out: list[dict[str, Any]] = []
        at = 0
        for size in sizes:
            out += _figures(r[at:at + size], g[at:at + size], [size], tol) if size else [dict(
                n_in_out=0, max_abs=0.0, mean_abs=0.0, max_rel=0.0, p99_rel=0.0, min_atol=0.0, min_rtol=0.0,
                cosine=1.0, tolerance_use=0.0, scale=0.0, spread=0.0)]
            at += size
        return out
    diff = np.abs(g - r)
    absr = np.abs(r)
    starts = np.cumsum([0, *sizes[:-1]])
    scale = np.maximum.reduceat(absr, starts)
    bound = tol.atol + tol.rtol * scale  # one bound per segment
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = diff / absr  # inf where the reference is 0 and the candidate is not
        if absr.min() == 0:
            rel[(absr == 0) & (diff == 0)] = 0.0
        n_in_out = np.add.reduceat(diff > np.repeat(bound, sizes), starts, dtype=np.intp)
        max_abs = np.maximum.reduceat(diff, starts)
        mean_abs = np.add.reduceat(diff, starts) / sizes
        max_rel = np.maximum.reduceat(rel, starts)
        # The reference's spread around its mean: how far a constant output would be off.
        means = np.add.reduceat(r, starts) / sizes
        spread = np.maximum(np.maximum.reduceat(r, starts) - means, means - np.minimum.reduceat(r, starts))
        norms = np.sqrt(np.add.reduceat(r * r, starts) * np.add.reduceat(g * g, starts))
        dots = np.add.reduceat(r * g, starts)
    figures = []
    for i, size in enumerate(sizes):
        a, b, s = float(max_abs[i]), float(bound[i]), float(scale[i])
        norm = float(norms[i])
        figures.append(dict(
            n_in_out=int(n_in_out[i]), max_abs=a, mean_abs=float(mean_abs[i]),
            max_rel=float(max_rel[i]), p99_rel=_p99(rel[starts[i]:starts[i] + size], finite=bool(max_rel[i] < np.inf)),
            min_atol=max(a - tol.rtol * s, 0.0),
            min_rtol=0.0 if a <= tol.atol else (float("inf") if s == 0 else (a - tol.atol) / s),
            tolerance_use=a / b if b > 0 else (0.0 if a == 0 else float("inf")),
            cosine=float(dots[i] / norm) if norm > 0 else (1.0 if a == 0 else 0.0), scale=s,
            spread=float(spread[i])))
    return figures


def degenerate_note(name: str, spread: float, scale: float, bound: float) -> str | None:
    """Why a reference output proves nothing, or None: it is all zero, constant, or so nearly
    constant that an artifact returning its mean would pass."""
    if scale == 0:
        return f"reference output {name!r} is all zero: parity is not informative"
    if spread == 0:
        return f"reference output {name!r} is constant: parity is not informative"
    if spread <= bound:
        return (f"reference output {name!r} is nearly constant (spread {spread:.3g} within the tolerance "
                f"{bound:.3g}): parity is not informative")
    return None


def compare_metrics(name: str, reference: np.ndarray, candidate: np.ndarray, tol: Tolerance) -> OutputMetrics:
    """Compare one output and compute every figure.

    Shapes and dtype kinds must agree before numbers are compared (otherwise the verdict is
    ``contract``). NaN positions and Inf positions/signs must match.
    """
    return compare_many([(name, reference, candidate, tol)])[0]


def compare_many(items: list[tuple[str, Any, Any, Tolerance]]) -> list[OutputMetrics]:
    """:func:`compare_metrics` for many ``(name, reference, candidate, tolerance)`` at once.

    Float comparisons that share a tolerance and a row shape are figured in one pass over their
    concatenation; one with a NaN or Inf on either side is figured alone, with its masks.
    """
    results: list[OutputMetrics | None] = [None] * len(items)
    groups: dict[tuple[Any, ...], list[int]] = {}
    arrays = []
    for i, (name, reference, candidate, tol) in enumerate(items):
        ref, got = np.asarray(reference), np.asarray(candidate)
        arrays.append((ref, got))
        results[i] = _early(name, ref, got, tol)
        if results[i] is None:
            groups.setdefault((tol.atol, tol.rtol, tol.source, ref.shape[1:], looks_like_scores(ref)), []).append(i)
    for members in groups.values():
        refs = [arrays[i][0].reshape(-1) for i in members]
        gots = [arrays[i][1].reshape(-1) for i in members]
        r = np.concatenate(refs, dtype=np.float64, casting="unsafe") if len(refs) > 1 else refs[0].astype(np.float64)
        g = np.concatenate(gots, dtype=np.float64, casting="unsafe") if len(gots) > 1 else gots[0].astype(np.float64)
        # Fast path, the usual case: a NaN or Inf on either side makes the difference, and so its
        # sum, non-finite (a sum that merely overflows takes the exact path below, no harm done).
        with np.errstate(invalid="ignore", over="ignore"):
            all_finite = bool(np.isfinite((g - r).sum()))
        if all_finite:
            sizes = [x.size for x in refs]
            scores = _group_topk(r, g, arrays[members[0]][0], sizes)
            tol = items[members[0]][3]
            for j, (i, figures) in enumerate(zip(members, _figures(r, g, sizes, tol))):
                results[i] = _float_result(items[i][0], *arrays[i], tol, figures, scores[j], {}, 0, [])
            continue
        if len(members) > 1:  # some element is NaN or Inf: figure each comparison alone
            for i in members:
                results[i] = compare_many([items[i]])[0]
            continue
        for i in members:  # on its finite part, with NaN/Inf masks
            ref, got = arrays[i]
            fr, fg, counts, bad, problems = _special(ref.astype(np.float64).reshape(-1),
                                                     got.astype(np.float64).reshape(-1))
            results[i] = _float_result(items[i][0], ref, got, items[i][3], _figures(fr, fg, [fr.size], items[i][3])[0],
                                       (None, None, None), counts, bad, problems)
    return results  # type: ignore[return-value]


def _group_topk(r: np.ndarray, g: np.ndarray, first: np.ndarray, sizes: list[int]) -> list[tuple[Any, Any, Any]]:
    """Top-1/top-k agreement of each comparison of a group whose outputs look like class scores."""
    if not looks_like_scores(first):
        return [(None, None, None)] * len(sizes)
    classes = first.shape[1]
    agree1, overlap, k = _topk(r.reshape(-1, classes), g.reshape(-1, classes))
    out, row = [], 0
    for size in sizes:
        rows = size // classes
        out.append((float(agree1[row:row + rows].mean()), float(overlap[row:row + rows].mean()), k))
        row += rows
    return out


def _float_result(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance, figures: dict[str, Any],
                  scores: tuple[Any, Any, Any], counts: dict[str, int], special_bad: int,
                  problems: list[str]) -> OutputMetrics:
    n = int(ref.size)
    n_in_out = figures.pop("n_in_out")
    n_out = n_in_out + special_bad
    passed = n_out == 0
    spread = figures.pop("spread")
    if n_in_out:
        problems = [*problems, f"{n_in_out} of {n} elements exceed atol {tol.atol:.3g} + rtol {tol.rtol:.3g} x "
                    f"scale {figures['scale']:.3g} (max abs error {figures['max_abs']:.3g}; would pass with atol "
                    f"{figures['min_atol']:.3g} or rtol {figures['min_rtol']:.3g}; tolerance from "
                    f"{tol.source})"]
    top1, topk, k = scores
    return _metrics(
        **_base(name, ref, got, tol), passed=passed, verdict="pass" if passed else "numeric",
        problem="; ".join(problems) or None, elements=n, out_of_tolerance=n_out / max(n, 1),
        near_fail=passed and figures["tolerance_use"] > NEAR_FAIL, top1_agreement=top1, topk_agreement=topk, k=k,
        degenerate=degenerate_note(name, spread, figures["scale"], tol.atol + tol.rtol * figures["scale"]),
        **{"nan_reference": 0, "nan_candidate": 0, "inf_reference": 0, "inf_candidate": 0, **counts}, **figures)


def noise_floor(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference per output between two runs of the same reference on the same inputs."""
    floors = {}
    for name, a in first.items():
        b = second.get(name)
        if b is None or np.shape(a) != np.shape(b) or np.asarray(a).dtype.kind not in "fc":
            continue
        d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        d = d[np.isfinite(d)]
        floors[name] = float(d.max()) if d.size else 0.0
    return floors
