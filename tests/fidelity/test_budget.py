"""Accuracy budgets (packager.fidelity.budget) through the one judge: what an optimised artifact
is judged by in optimize, export parity and verify."""

from __future__ import annotations

import numpy as np
import pytest

from packager.errors import UsageError
from packager.fidelity.budget import parse_budget, row_cosines
from packager.fidelity.judge import Judge


def _scores(rng: np.random.Generator, rows: int = 64, classes: int = 10) -> np.ndarray:
    return rng.standard_normal((rows, classes)).astype(np.float32) * 3


@pytest.mark.parametrize("text, why", [
    ("cosine<=0.9", "compares the wrong way"), ("top1>=1.5", "out of range"), ("cosine>=0.9,cosine>=0.8", "twice"),
    ("l2>=0.1", "does not parse"), ("", "is empty"), ("max_abs<=-1", "out of range"),
])
def test_bad_budget_is_a_usage_error(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_budget(text)


def test_budget_text_round_trips() -> None:
    budget = parse_budget(" cosine >= 0.999 , top1>=0.99,max_abs<=1e-2 ")
    assert str(budget) == "cosine>=0.999,top1>=0.99,max_abs<=0.01"
    assert parse_budget(str(budget)) == budget


def test_row_cosines_zero_rows() -> None:
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    got = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    assert row_cosines(ref, got) == pytest.approx([1.0, 2 ** -0.5, 0.0])


def test_budget_passes_small_noise_and_fails_a_flipped_class(rng: np.random.Generator) -> None:
    ref = _scores(rng)
    noisy = ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-3
    verdict = Judge().compare({"y": ref}, {"y": noisy}, "budget:cosine>=0.999,top1>=0.99").outputs[0]
    assert verdict.passed and "budget cosine>=0.999,top1>=0.99" in verdict.tolerance_source
    # Elementwise fp32 tolerances would fail the same figures: the budget is what decides.
    assert not Judge().compare({"y": ref}, {"y": noisy}, "native").outputs[0].passed

    flipped = ref.copy()
    flipped[0] = -flipped[0]  # one row of 64 changes its class: top-1 63/64 < 0.99, cosine -1
    out = Judge().compare({"y": ref}, {"y": flipped}, "budget:top1>=0.99").outputs[0]
    assert not out.passed and "top1 0.984375 misses the budget top1>=0.99" in out.problem


def test_nan_fails_whatever_the_budget(rng: np.random.Generator) -> None:
    ref = _scores(rng)
    got = ref.copy()
    got[3, 2] = np.nan
    out = Judge().compare({"y": ref}, {"y": got}, "budget:max_abs<=1e9").outputs[0]
    assert not out.passed and "NaN/Inf differ" in out.problem


def test_integer_outputs_stay_exact(rng: np.random.Generator) -> None:
    ids = rng.integers(0, 10, 64)
    other = ids.copy()
    other[5] = (other[5] + 1) % 10
    assert Judge().compare({"c": ids}, {"c": ids}, "budget:cosine>=0.9").outputs[0].passed
    assert not Judge().compare({"c": ids}, {"c": other}, "budget:cosine>=0.9").outputs[0].passed


def test_top1_alone_does_not_apply_to_an_embedding(rng: np.random.Generator) -> None:
    emb = rng.standard_normal((4, 8, 16)).astype(np.float32)
    out = Judge().compare({"e": emb}, {"e": emb}, "budget:top1>=0.99").outputs[0]
    assert not out.passed and "no criterion" in out.problem


def test_top1_miss_says_whether_the_flips_are_near_ties(rng: np.random.Generator) -> None:
    ref = _scores(rng)
    ref[:4, 0], ref[:4, 1] = 10.0, 9.999  # four rows whose two best classes nearly tie
    ties = ref + rng.uniform(-0.01, 0.01, ref.shape).astype(np.float32)  # an error of about 0.01 on every row
    ties[:4, 0], ties[:4, 1] = 9.99, 10.0  # ... which swaps the near ties
    out = Judge().compare({"y": ref}, {"y": ties}, "budget:top1>=0.99").outputs[0]
    assert not out.passed and "4 of 64 rows changed class (rows 0, 1, 2, 3)" in out.problem
    assert "all 4 are near ties" in out.problem and "judge by cosine/rel" in out.problem

    confident = ties.copy()
    confident[:4] = ref[:4]
    confident[5] = -confident[5]  # a row the reference separates clearly, turned around
    out = Judge().compare({"y": ref}, {"y": confident}, "budget:top1>=0.99").outputs[0]
    assert not out.passed and "1 of 64 rows changed class (rows 5)" in out.problem
    assert "1 of them are not near ties" in out.problem and "keep more nodes" in out.problem
