"""The row batcher's rules, driven by a plain function in place of a runner (the batcher's
contract is any callable from feeds to outputs; the server tests run it on real runtimes).
Every case is made deterministic by its sizes, not by timing: a batch is closed by reaching
``max_batch`` rows, and the delay is long enough never to be what closes it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from packager.serving.batcher import Batcher, QueueFull
from packager.signature import Signature, TensorSpec

SIGNATURE = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=("batch", 2))],
                      outputs=[TensorSpec(name="y", dtype="float32", shape=("batch", 2))])


class Recorder:
    """Doubles its input; refuses any row holding a negative number; records each call's rows."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, feeds: dict) -> dict:
        with self.lock:
            self.calls.append(len(feeds["x"]))
        if (feeds["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": feeds["x"] * 2}


def _rows(start: int, n: int) -> dict:
    return {"x": np.arange(start, start + 2 * n, dtype=np.float32).reshape(n, 2)}


def test_requests_merge_up_to_max_batch_rows_and_get_their_own_rows() -> None:
    run = Recorder()
    batcher = Batcher(run, SIGNATURE, batching=True, max_batch=6, max_delay=60, max_queue=16)
    try:
        futures = [batcher.submit(_rows(10 * i, 2)) for i in range(6)]  # 12 rows: two full batches of 6
        for i, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(timeout=30)["y"], _rows(10 * i, 2)["x"] * 2)
        assert run.calls == [6, 6]
    finally:
        batcher.stop()


def test_a_request_that_breaks_the_merged_run_fails_alone() -> None:
    run = Recorder()
    batcher = Batcher(run, SIGNATURE, batching=True, max_batch=4, max_delay=60, max_queue=16)
    try:
        good, bad, also_good = batcher.submit(_rows(0, 1)), batcher.submit({"x": -np.ones((2, 2), np.float32)}), \
            batcher.submit(_rows(4, 1))
        np.testing.assert_array_equal(good.result(timeout=30)["y"], _rows(0, 1)["x"] * 2)
        np.testing.assert_array_equal(also_good.result(timeout=30)["y"], _rows(4, 1)["x"] * 2)
        with pytest.raises(ValueError, match="negative"):
            bad.result(timeout=30)
        assert run.calls == [4, 1, 2, 1]  # the merged run, then each request alone
    finally:
        batcher.stop()


def test_only_identical_non_batch_shapes_and_dtypes_merge() -> None:
    run = Recorder()
    batcher = Batcher(run, SIGNATURE, batching=True, max_batch=2, max_delay=60, max_queue=16)
    try:
        a = batcher.submit(_rows(0, 1))
        other = batcher.submit({"x": np.zeros((1, 2), np.float64)})  # another dtype: never merged with a
        b = batcher.submit(_rows(2, 1))
        other2 = batcher.submit({"x": np.ones((1, 2), np.float64)})
        wide = batcher.submit({"x": np.zeros((2, 3), np.float32)})  # 2 rows: a full batch alone
        for future in (a, b, other, other2, wide):
            future.result(timeout=30)
        assert a.result()["y"].dtype == np.float32 and other.result()["y"].dtype == np.float64
        np.testing.assert_array_equal(other2.result()["y"], np.full((1, 2), 2.0))
        assert run.calls == [2, 2, 2]  # {a, b}, {other, other2}, {wide}
    finally:
        batcher.stop()


def test_without_batching_every_request_runs_alone() -> None:
    run = Recorder()
    batcher = Batcher(run, SIGNATURE, batching=False, max_batch=32, max_delay=60, max_queue=16)
    try:
        futures = [batcher.submit(_rows(i, 3)) for i in range(4)]
        for future in futures:
            future.result(timeout=30)
        assert run.calls == [3, 3, 3, 3]
    finally:
        batcher.stop()


def test_the_queue_is_bounded_and_stop_finishes_what_was_queued() -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(feeds: dict) -> dict:
        entered.set()
        release.wait(30)
        return {"y": feeds["x"]}

    batcher = Batcher(slow, SIGNATURE, batching=False, max_batch=1, max_delay=0, max_queue=1)
    first = batcher.submit(_rows(0, 1))
    assert entered.wait(30)  # the worker holds the first request: the queue is empty
    second = batcher.submit(_rows(2, 1))
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        batcher.submit(_rows(4, 1))
    release.set()
    batcher.stop()
    assert first.done() and second.done() and second.result()["y"].shape == (1, 2)
    with pytest.raises(QueueFull, match="stopping"):
        batcher.submit(_rows(6, 1))
