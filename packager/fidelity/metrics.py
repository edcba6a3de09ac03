"""Per-output comparison figures and the tolerances they are judged with.

Everything here is numpy only: it runs for every output of every cell, so it must stay cheap
next to the inference it judges (one float64 pass over each array).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict

#: (atol, rtol) per output dtype for a *converted* artifact (ONNX from torch/TF/Paddle): a
#: converter reorders reductions and fuses ops, so fp32 outputs move by ~1e-6..1e-5; 1e-4
#: absorbs that without hiding a wrong weight (a 1e-3 relative weight change moves outputs by ~1e-3).
CONVERTED: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-6),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
#: A *native* artifact (TorchScript, torch.export, SavedModel) runs the framework's own kernels:
#: errors stay at float rounding, so the bound is 10x tighter. Paddle Inference is not in this
#: list: its IR passes fuse conv+BN and FC with oneDNN kernels, a rewrite like a conversion.
NATIVE: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-5, 1e-5),
    "float16": (5e-3, 5e-3),
    "bfloat16": (3e-2, 3e-2),
}
#: An artifact the exporter declared as reduced precision (``options.precision``) is judged
#: with the tolerances of that precision, whatever dtype its outputs are.
REDUCED = {"float16": CONVERTED["float16"], "bfloat16": CONVERTED["bfloat16"]}
#: Formats whose runtime executes the framework's own graph (no conversion).
NATIVE_FORMATS = frozenset({"torchscript", "torch_export", "saved_model"})
#: A cell whose worst element uses more than this share of its tolerance is "near failing".
NEAR_FAIL = 0.5


class Tolerance(BaseModel):
    """The tolerance one output is judged with and where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    atol: float
    rtol: float
    source: str  # "default float32/converted", "--atol", "noise floor 3e-6", ...


def conversion_kind(fmt: str | None, options: Mapping[str, Any] | None = None) -> str:
    """``reduced:<dtype>``, ``native`` or ``converted`` for an artifact format and its options."""
    precision = str((options or {}).get("precision", "") or "")
    if precision in REDUCED:
        return f"reduced:{precision}"
    if fmt in NATIVE_FORMATS:
        return "native"
    return "converted"


def default_tolerance(dtype: str, kind: str = "converted") -> tuple[float, float]:
    """(atol, rtol) for outputs of ``dtype`` from an artifact of conversion ``kind``.

    Integers and bools must match exactly whatever the conversion.
    """
    if kind.startswith("reduced:") and dtype.startswith(("float", "bfloat")):
        return REDUCED[kind.split(":", 1)[1]]
    table = NATIVE if kind == "native" else CONVERTED
    return table.get(dtype, (0.0, 0.0))


def _pick(value: float | Mapping[str, float] | None, name: str) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    if name in value:
        return float(value[name])
    return float(value["*"]) if "*" in value else None


def resolve_tolerance(name: str, dtype: str, kind: str, atol: float | Mapping[str, float] | None = None,
                      rtol: float | Mapping[str, float] | None = None, floor: float = 0.0) -> Tolerance:
    """The tolerance for output ``name``: per-output override, global override, dtype default.

    Args:
        name: Output name.
        dtype: The reference's dtype name.
        kind: Conversion kind (:func:`conversion_kind`).
        atol: One absolute tolerance, or per output name (``"*"`` = all others).
        rtol: Same for the relative tolerance.
        floor: Noise floor of a non-deterministic reference (max abs difference between two
            reference runs); the absolute tolerance is raised to twice it.
    """
    d_atol, d_rtol = default_tolerance(dtype, kind)
    a, r = _pick(atol, name), _pick(rtol, name)
    parts = []
    if a is None and r is None:
        parts.append(f"default {dtype}/{kind}")
    else:
        parts.append(", ".join(p for p in (f"atol {a:g}" if a is not None else "",
                                           f"rtol {r:g}" if r is not None else "") if p) + " given")
    a = d_atol if a is None else a
    r = d_rtol if r is None else r
    if floor > 0 and 2 * floor > a:
        a = 2 * floor
        parts.append(f"noise floor {floor:.3g}")
    return Tolerance(atol=float(a), rtol=float(r), source="; ".join(parts))


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
    #: ``max |err| / (atol + rtol |ref|)``: 1.0 is the edge of failing.
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
    per figure whatever the number of segments (each call costs microseconds even on 10 values)."""
    if not all(sizes):  # reduceat cannot reduce empty segments: figure them one by one
        out: list[dict[str, Any]] = []
        at = 0
        for size in sizes:
            out += _figures(r[at:at + size], g[at:at + size], [size], tol) if size else [dict(
                n_in_out=0, max_abs=0.0, mean_abs=0.0, max_rel=0.0, p99_rel=0.0, min_atol=0.0, min_rtol=0.0,
                cosine=1.0, tolerance_use=0.0)]
            at += size
        return out
    diff = np.abs(g - r)
    absr = np.abs(r)
    scaled = tol.rtol * absr
    bound = scaled + tol.atol
    starts = np.cumsum([0, *sizes[:-1]])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = diff / absr  # inf where the reference is 0 and the candidate is not
        if absr.min() == 0:
            rel[(absr == 0) & (diff == 0)] = 0.0
        use = diff / (bound if tol.atol > 0 else np.maximum(bound, np.finfo(np.float64).tiny))
        n_in_out = np.add.reduceat(diff > bound, starts, dtype=np.intp)
        max_abs = np.maximum.reduceat(diff, starts)
        mean_abs = np.add.reduceat(diff, starts) / sizes
        max_rel = np.maximum.reduceat(rel, starts)
        min_atol = np.maximum(np.maximum.reduceat(diff - scaled, starts), 0.0)
        tolerance_use = np.maximum.reduceat(use, starts)
        norms = np.sqrt(np.add.reduceat(r * r, starts) * np.add.reduceat(g * g, starts))
        dots = np.add.reduceat(r * g, starts)
    figures = []
    for i, (start, size) in enumerate(zip(starts.tolist(), sizes)):
        end = start + size
        if max_abs[i] <= tol.atol:  # no element needs any rtol
            min_rtol = 0.0
        else:
            d, a = diff[start:end], absr[start:end]
            over = d > tol.atol
            with np.errstate(over="ignore"):
                min_rtol = float("inf") if (a[over] == 0).any() else float(np.max((d[over] - tol.atol) / a[over]))
        norm = float(norms[i])
        figures.append(dict(
            n_in_out=int(n_in_out[i]), max_abs=float(max_abs[i]), mean_abs=float(mean_abs[i]),
            max_rel=float(max_rel[i]), p99_rel=_p99(rel[start:end], finite=bool(max_rel[i] < np.inf)),
            min_atol=float(min_atol[i]), min_rtol=min_rtol, tolerance_use=float(tolerance_use[i]),
            cosine=float(dots[i] / norm) if norm > 0 else (1.0 if max_abs[i] == 0 else 0.0)))
    return figures


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
    if n_in_out:
        problems = [*problems, f"{n_in_out} of {n} elements exceed atol {tol.atol:g} + rtol {tol.rtol:g} x |ref| "
                    f"(max abs error {figures['max_abs']:.3g}; would pass with atol {figures['min_atol']:.3g})"]
    top1, topk, k = scores
    return _metrics(
        **_base(name, ref, got, tol), passed=passed, verdict="pass" if passed else "numeric",
        problem="; ".join(problems) or None, elements=n, out_of_tolerance=n_out / max(n, 1),
        near_fail=passed and figures["tolerance_use"] > NEAR_FAIL, top1_agreement=top1, topk_agreement=topk, k=k,
        **{"nan_reference": 0, "nan_candidate": 0, "inf_reference": 0, "inf_candidate": 0, **counts}, **figures)


@dataclass
class Judged:
    """The outcome of comparing all outputs of one case."""

    outputs: list[OutputMetrics]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


def compare_all(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], kind: str,
                atol: float | Mapping[str, float] | None = None, rtol: float | Mapping[str, float] | None = None,
                floors: Mapping[str, float] | None = None) -> Judged:
    """Compare every reference output with the candidate's output of the same name.

    A reference output the candidate lacks, or a candidate output the reference lacks, is a
    ``contract`` verdict.
    """
    return compare_cases([(reference, candidate, kind)], atol, rtol, floors)[0]


def compare_cases(cases: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], str]],
                  atol: float | Mapping[str, float] | None = None, rtol: float | Mapping[str, float] | None = None,
                  floors: Mapping[str, float] | None = None) -> list[Judged]:
    """:func:`compare_all` for many ``(reference, candidate, conversion kind)`` cases, the
    figures of all of them computed together (:func:`compare_many`)."""
    plans: list[list[int | OutputMetrics]] = []
    items: list[tuple[str, Any, Any, Tolerance]] = []
    for reference, candidate, kind in cases:
        plan: list[int | OutputMetrics] = []
        for name, ref in reference.items():
            ref_dtype = np.asarray(ref).dtype.name
            tol = resolve_tolerance(name, ref_dtype, kind, atol, rtol, (floors or {}).get(name, 0.0))
            if name not in candidate:
                plan.append(_metrics(name=name, passed=False, verdict="contract", atol=tol.atol, rtol=tol.rtol,
                                     tolerance_source=tol.source, reference_dtype=ref_dtype,
                                     problem=f"output missing from the candidate (it has {sorted(candidate)})"))
                continue
            plan.append(len(items))
            items.append((name, ref, candidate[name], tol))
        for name in candidate:
            if name not in reference:
                plan.append(_metrics(name=name, passed=False, verdict="contract",
                                     problem="output is not in the reference"))
        plans.append(plan)
    computed = compare_many(items)
    return [Judged([computed[x] if isinstance(x, int) else x for x in plan]) for plan in plans]


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
