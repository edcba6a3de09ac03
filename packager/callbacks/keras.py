"""A Keras callback that exports and verifies a package during or after training.

Usage::

    from packager.callbacks.keras import PackagerCallback

    model.fit(x, y, epochs=10, validation_data=(vx, vy),
              callbacks=[PackagerCallback("pkg/", example_inputs={"image": vx[:4]}, monitor="val_loss")])

With ``monitor`` the package is refreshed whenever the metric improves (like ``ModelCheckpoint``
with ``save_best_only=True``); without it, once at the end of training. Each attempt goes through
:func:`packager.callbacks.export_verified`: a failed export or verification is reported in the
training logs and never stops training nor replaces the last good package.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from packager.callbacks import CallbackVerdict, export_verified
from runtimes._tf import import_keras

keras = import_keras()
log = logging.getLogger("packager.callbacks.keras")

#: Key added to the epoch logs (and so to ``History``) when an export was attempted: 1.0 = verified.
LOG_KEY = "packager_verified"


class PackagerCallback(keras.callbacks.Callback):
    """Export and verify a package when ``monitor`` improves, or at the end of training.

    Args:
        out: Package folder kept up to date (replaced only by a verified package).
        example_inputs: Inputs for tracing and golden data (dict of arrays, or a path); optional
            for functional models, whose input signature is known.
        monitor: Metric in the epoch logs (``"val_loss"``); ``None`` exports at the end only.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (``max`` for accuracy/AUC-like names).
        min_delta: Smallest change that counts as an improvement.
        at_end: Also export at the end of training (default: only when ``monitor`` is None, so
            the best package is not replaced by the last epoch's).
        verbose: Print each verdict (``1``) or only log it (``0``).
        **export_kwargs: Passed to :func:`packager.export` (formats, input_spec, atol, ...).
    """

    def __init__(self, out: str | Path, example_inputs: Any = None, *, monitor: str | None = None,
                 mode: str = "auto", min_delta: float = 0.0, at_end: bool | None = None, verbose: int = 1,
                 **export_kwargs: Any) -> None:
        super().__init__()
        from packager.errors import UsageError

        if mode not in ("auto", "min", "max"):
            raise UsageError("PackagerCallback mode", "is unknown", expected="auto, min or max", got=mode)
        self.out = Path(out)
        self.example_inputs = example_inputs
        self.monitor = monitor
        if mode == "auto":
            mode = "max" if monitor and any(k in monitor for k in ("acc", "auc", "precision", "recall", "f1")) \
                else "min"
        self.mode = mode
        self.min_delta = abs(min_delta)
        self.at_end = monitor is None if at_end is None else at_end
        self.verbose = verbose
        self.export_kwargs = export_kwargs
        self.best: float | None = None
        #: (epoch or None for the end of training, verdict) of every attempt.
        self.verdicts: list[tuple[int | None, CallbackVerdict]] = []
        self._warned = False

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _export(self, when: str, epoch: int | None) -> CallbackVerdict:
        kwargs = {"example_inputs": self.example_inputs, **self.export_kwargs}
        verdict = export_verified(self.model, self.out, **kwargs)
        self.verdicts.append((epoch, verdict))
        text = f"packager: {when}: {'OK' if verdict.ok else 'FAILED'} - {verdict.message}"
        (log.info if verdict.ok else log.warning)(text)
        if self.verbose:
            print(text, flush=True)
        return verdict

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.monitor is None or logs is None:
            return
        value = logs.get(self.monitor)
        if value is None:
            if not self._warned:
                self._warned = True
                msg = (f"packager: metric {self.monitor!r} is not in the epoch logs (have {sorted(logs)}); "
                       "nothing exported")
                log.warning(msg)
                if self.verbose:
                    print(msg, flush=True)
            return
        value = float(value)
        if not self._improved(value):
            return
        previous = self.best
        # The best value moves even when the export fails: a worse later epoch must not be
        # exported just because this one could not be.
        self.best = value
        change = f"{self.monitor} improved from {previous:.5g} to {value:.5g}" if previous is not None else \
            f"{self.monitor}={value:.5g}"
        verdict = self._export(f"epoch {epoch + 1}: {change}", epoch)
        logs[LOG_KEY] = 1.0 if verdict.ok else 0.0

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.at_end:
            verdict = self._export("end of training", None)
            if logs is not None:
                logs[LOG_KEY] = 1.0 if verdict.ok else 0.0
