"""``paddle.Model.fit`` callback: export and verify a package after training or on improvement.

    from packager.callbacks.paddle import PackagerCallback
    model.fit(train, eval_data=val, epochs=10,
              callbacks=[PackagerCallback("pkg", input_spec=["x:float32[batch,3,32,32]"], monitor="acc")])

Each export goes through :func:`packager.callbacks.export_verified`: a failed export or
verification is logged and kept in :attr:`PackagerCallback.history`, never raised into the
training loop, and never replaces the last good package.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable

from packager.callbacks import CallbackVerdict, export_verified
from packager.errors import require

# The callback subclasses paddle's: this module needs paddle at import (a clear error if absent).
paddle = require("paddle", purpose="use the Paddle training callback")

log = logging.getLogger("packager.callbacks.paddle")


class PackagerCallback(paddle.callbacks.Callback):
    """Export ``model.network`` into ``out`` at the end of training, or whenever ``monitor`` improves.

    Args:
        out: Package folder to keep up to date.
        example_inputs: Example inputs (array, tuple, dict or .npz path) — or use ``input_spec``.
        input_spec: Input specs, e.g. ``["x:float32[batch,3,32,32]"]``.
        formats: Formats to write (default: the Paddle exporter's defaults).
        monitor: Metric name in the eval logs (``"acc"``, ``"loss"``); None exports at train end only.
        mode: ``"max"``, ``"min"`` or ``"auto"`` (``min`` for names containing "loss").
        min_delta: Smallest change that counts as an improvement.
        export_at_end: Also export at the end of training (when no monitored export happened
            or ``monitor`` is None).
        **export_kwargs: Passed on to :func:`packager.export` (atol, opset, name, ...).
    """

    def __init__(self, out: str | Path, *, example_inputs: Any = None, input_spec: Iterable[str] | str | None = None,
                 formats: Iterable[str] | str | None = None, monitor: str | None = None, mode: str = "auto",
                 min_delta: float = 0.0, export_at_end: bool = True, **export_kwargs: Any) -> None:
        super().__init__()
        if mode not in ("auto", "min", "max"):
            from packager.errors import UsageError

            raise UsageError("mode", "is unknown", expected="auto, min or max", got=mode)
        self.out = Path(out)
        self.monitor = monitor
        self.mode = ("min" if monitor and "loss" in monitor else "max") if mode == "auto" else mode
        self.min_delta = abs(min_delta)
        self.export_at_end = export_at_end
        self.export_kwargs = {"example_inputs": example_inputs, "input_spec": input_spec, "formats": formats,
                              "framework": "paddle", **export_kwargs}
        self.best: float | None = None
        #: (trigger, verdict) of every export attempt, oldest first.
        self.history: list[tuple[str, CallbackVerdict]] = []
        self._exported_on_improvement = False

    # --- hooks ------------------------------------------------------------------------------
    def on_eval_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.monitor is None:
            return
        value = _scalar((logs or {}).get(self.monitor))
        if value is None:
            log.warning("packager callback: metric %r not in eval logs %s", self.monitor, sorted(logs or {}))
            return
        if self._improved(value):
            self.best = value
            verdict = self._export(f"{self.monitor}={value:.4g}")
            self._exported_on_improvement = self._exported_on_improvement or verdict.ok

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.export_at_end and (self.monitor is None or not self._exported_on_improvement):
            self._export("train end")

    # --- helpers ----------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def _export(self, trigger: str) -> CallbackVerdict:
        network = self.model.network
        was_training = network.training
        try:
            verdict = export_verified(network, self.out, **self.export_kwargs)
        finally:
            # export puts the network in eval mode; training goes on where it was.
            network.train() if was_training else network.eval()
        self.history.append((trigger, verdict))
        (log.info if verdict.ok else log.warning)("packager callback (%s): %s", trigger, verdict.message)
        return verdict


def _scalar(value: Any) -> float | None:
    """A metric as a float (Paddle logs lists like ``[0.5]`` for losses)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number
