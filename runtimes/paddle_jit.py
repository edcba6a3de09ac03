"""``paddle.jit.load`` runner: runs a ``paddle.jit.save`` model as a TranslatedLayer (dygraph).

Useful to check an artifact with the same executor training code uses; Paddle Inference is
the deployment runtime. Calls are serialised by the base class (a layer holds per-call state).
"""

from __future__ import annotations

import numpy as np
from pydantic import PositiveInt

from packager.errors import RuntimeLoadError
from packager.signature import Signature
from runtimes._paddle import (check_gpu, check_program, flatten, paddle_module, quiet, read_program_signature,
                              resolve_model_files)
from runtimes.base import Runner, RunnerOptions


class PaddleJitRunner(Runner):
    """Runs a PIR (``.json``) or legacy (``.pdmodel``) ``paddle.jit.save`` model with ``paddle.jit.load``.

    Options:
        threads: Accepted for symmetry with paddle_inference and not used (Paddle's dygraph
            thread count is process-wide).
    """

    class Options(RunnerOptions):
        threads: PositiveInt = 1

    runtime = "paddle_jit"

    def _load(self) -> None:
        paddle = paddle_module()
        check_gpu(self.device, "paddle.jit.load")
        self.files = resolve_model_files(self.path)
        check_program(self.files, self.trust)
        if self.files.program == "v1":
            raise RuntimeLoadError(f"model {str(self.path)!r}", "is a Paddle 1.x folder, which paddle.jit.load "
                                   "cannot read", fix="use the paddle_inference runtime")
        self._place = (paddle.CUDAPlace(self.device.index) if self.device.is_cuda else paddle.CPUPlace())
        try:
            with quiet():
                if self.files.program == "legacy":
                    with paddle.pir_utils.DygraphOldIrGuard():
                        self.layer = paddle.jit.load(str(self.files.prefix))
                else:
                    self.layer = paddle.jit.load(str(self.files.prefix))
            self.layer.eval()
        except Exception as exc:
            raise RuntimeLoadError(f"Paddle model {str(self.path)!r}", f"paddle.jit.load failed: "
                                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                                   fix="use the paddle_inference runtime, or re-save with paddle.jit.save") from exc

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paddle = paddle_module()
        with paddle.no_grad():
            args = [paddle.to_tensor(a, place=self._place) for a in feeds.values()]
            if self.files.program == "legacy":
                with paddle.pir_utils.DygraphOldIrGuard():
                    out = self.layer(*args)
            else:
                out = self.layer(*args)
        outputs = flatten(out)
        return {n: np.asarray(t.numpy()) for n, t in zip(self.signature.output_names or
                                                           [f"output_{i}" for i in range(len(outputs))], outputs)}

    def _close(self) -> None:
        self.layer = None

    def _native_signature(self) -> Signature:
        return read_program_signature(self.files)
