"""Dynamic batching by rows: requests with the same non-batch shapes and dtypes are merged up to
``max_batch`` rows or ``max_delay`` seconds, run once, and split back by each request's rows.

Rules (docs/serving.md): rows are counted, not requests; only identical non-batch shapes and
dtypes merge; a request larger than ``max_batch`` runs alone, never split; the queue is bounded
(:class:`QueueFull`, HTTP 503); if a merged run fails, its requests are run again one by one, so
a bad request fails alone and never takes the batch with it. Without batching evidence
(packager/serving/evidence.py) every request runs alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from packager.signature import Signature


class QueueFull(Exception):
    """The request queue holds ``max_queue`` requests already."""


@dataclass
class _Item:
    feeds: dict[str, np.ndarray]
    rows: int
    #: What must be equal for two requests to merge: every input's dtype and non-batch shape.
    key: tuple[Any, ...]
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What one runtime call did (for the metrics)."""

    requests: int
    rows: int
    queue_seconds: list[float]
    run_seconds: float


class Batcher:
    """A bounded queue drained by worker threads that call ``run`` once per merged batch.

    Args:
        run: The runner's ``run`` (validated feeds in, named outputs out).
        signature: The package signature (batch axes of outputs, to split results).
        batching: Merge requests (only with batching evidence).
        max_batch: Most rows in one merged run.
        max_delay: Seconds the oldest request may wait for others to join it.
        max_queue: Most requests waiting; more get :class:`QueueFull`.
        workers: Threads calling ``run`` (more than one only for thread-safe runners).
        observe: Called with each batch's :class:`BatchStats`.
    """

    def __init__(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], signature: Signature, *,
                 batching: bool, max_batch: int, max_delay: float, max_queue: int, workers: int = 1,
                 observe: Callable[[BatchStats], None] | None = None) -> None:
        self._run = run
        self.batching = batching and max_batch > 1
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._observe = observe
        self._out_axes = {s.name: s.batch_axis for s in signature.outputs}
        self._items: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"packager-batcher-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        return len(self._items)

    def submit(self, feeds: dict[str, np.ndarray]) -> Future:
        """Queue one request's validated feeds; its future gets the outputs for its rows.

        Raises:
            QueueFull: ``max_queue`` requests are waiting already.
        """
        first = next(iter(feeds.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
        item = _Item(feeds, rows, key)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is stopping")
            if len(self._items) >= self.max_queue:
                raise QueueFull(f"{len(self._items)} requests are waiting (--max-queue {self.max_queue})")
            self._items.append(item)
            self._cond.notify()
        return item.future

    def stop(self) -> None:
        """Finish every queued request, then stop the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    # --- worker -------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._execute(batch)

    def _collect(self) -> list[_Item] | None:
        with self._cond:
            while not self._items:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._items.popleft()
            batch, rows = [first], first.rows
            if not self.batching or rows >= self.max_batch:
                return batch
            deadline = first.queued + self.max_delay
            while True:
                i = 0
                while i < len(self._items) and rows < self.max_batch:
                    item = self._items[i]
                    if item.key == first.key and rows + item.rows <= self.max_batch:
                        del self._items[i]
                        batch.append(item)
                        rows += item.rows
                    else:
                        i += 1
                remaining = deadline - time.monotonic()
                if rows >= self.max_batch or remaining <= 0 or self._stopping:
                    return batch
                self._cond.wait(remaining)

    def _execute(self, batch: list[_Item]) -> None:
        start = time.monotonic()
        waits = [start - item.queued for item in batch]
        if len(batch) == 1:
            self._settle(batch[0])
        else:
            feeds = {name: np.concatenate([item.feeds[name] for item in batch]) for name in batch[0].feeds}
            try:
                outputs = self._run(feeds)
            except BaseException:
                # One bad request must not fail the others: run each alone, each gets its own answer.
                for item in batch:
                    self._settle(item)
            else:
                total = sum(item.rows for item in batch)
                if all(a.ndim and a.shape[self._out_axes.get(n) or 0] == total for n, a in outputs.items()):
                    self._split(batch, outputs)
                else:  # the outputs' batch axis does not hold the rows: never guess how to split them
                    for item in batch:
                        self._settle(item)
        if self._observe is not None:
            self._observe(BatchStats(len(batch), sum(i.rows for i in batch), waits, time.monotonic() - start))

    def _settle(self, item: _Item) -> None:
        try:
            item.future.set_result(self._run(item.feeds))
        except BaseException as exc:
            item.future.set_exception(exc)

    def _split(self, batch: list[_Item], outputs: dict[str, np.ndarray]) -> None:
        bounds = np.cumsum([item.rows for item in batch])[:-1]
        parts = {name: np.split(array, bounds, axis=self._out_axes.get(name) or 0)
                 for name, array in outputs.items()}
        for i, item in enumerate(batch):
            item.future.set_result({name: pieces[i] for name, pieces in parts.items()})
