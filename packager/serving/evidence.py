"""Whether merging requests into one batch is safe for an artifact: the evidence, not a guess.

Two things must hold: every input and output has its batch axis first (what a Triton
``max_batch_size > 0`` config and a row-merging server both assume), and ``verify``'s batch
consistency case passes on this host: each row of a batched run equals that row run alone,
judged by packager/fidelity/judge.py with the package's noise record. A model with BatchNorm in
training mode, or a batch axis baked to a constant, fails it, and its requests are then run one
at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packager.signature import Signature

#: Name of verify's case that runs a batch and each of its rows alone.
CONSISTENCY_CASE = "batch consistency"


@dataclass(frozen=True)
class BatchingEvidence:
    """The verdict on merging rows of several requests into one run."""

    #: True: requests may be merged (batch axis first everywhere, and batch consistency passed).
    safe: bool
    #: Why, in a phrase fit for a config comment or a log line.
    why: str


def batch_axis_problem(signature: Signature) -> str | None:
    """Why requests cannot be merged by rows, from the signature alone (None: they can)."""
    for kind, specs in (("input", signature.inputs), ("output", signature.outputs)):
        for spec in specs:
            if spec.batch_axis is None:
                return f"{kind} {spec.name!r} has no batch axis ({spec.shape_str()})"
            if spec.batch_axis != 0:
                return f"{kind} {spec.name!r} has its batch axis at {spec.batch_axis}, not first ({spec.shape_str()})"
    if not signature.outputs:
        return "the signature lists no outputs"
    return None


def batching_evidence(package: str | Path, fmt: str, runtime: str, device: str = "cpu",
                      signature: Signature | None = None) -> BatchingEvidence:
    """Run ``verify``'s batch consistency on one artifact x runtime x device of ``package``.

    Args:
        package: Package folder or archive.
        fmt: Artifact format.
        runtime: Runtime that will serve it.
        device: Device it will be served on.
        signature: The package's signature (read from the package when omitted).
    """
    from packager.verifying import verify

    if signature is None:
        from packager.package import Package

        signature = Package(package).manifest.signature
    problem = batch_axis_problem(signature)
    if problem is not None:
        return BatchingEvidence(False, problem)
    report = verify(package, formats=[fmt], runtimes=[runtime], devices=[device], reference="golden",
                    sweep=True, structure=False)
    row = next((r for r in report.rows if r.format == fmt and r.runtime == runtime), None)
    if row is None:
        return BatchingEvidence(False, f"verify did not run {fmt} on {runtime}")
    if row.error:
        return BatchingEvidence(False, f"{fmt} on {runtime} failed to load or run: {row.error}")
    case = next((c for c in row.cases if c.case == CONSISTENCY_CASE), None)
    if case is None:
        return BatchingEvidence(False, "batch consistency was not checked (the golden inputs have one row?)")
    if case.verdict == "skipped":
        return BatchingEvidence(False, "batch consistency could not be checked: " + "; ".join(case.notes or ["skipped"]))
    if not case.passed:
        worst = max((o.max_abs for o in case.outputs if o.max_abs is not None), default=None)
        figure = f" (max abs difference {worst:.3g})" if worst is not None else ""
        return BatchingEvidence(False, f"batch consistency failed{figure}: row i of a batched run differs from "
                                       "row i run alone" + (f" ({case.error})" if case.error else ""))
    worst = max((o.max_abs for o in case.outputs if o.max_abs is not None), default=0.0)
    return BatchingEvidence(True, f"batch consistency passed on {runtime}/{device} (rows batched vs alone: "
                                  f"max abs difference {worst:.3g})")
