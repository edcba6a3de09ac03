"""TorchScript runner (``torch.jit.load``), CPU or CUDA."""

from __future__ import annotations

import numpy as np

from packager.errors import RuntimeLoadError
from runtimes._torch import ModuleCaller, torch_device
from runtimes.base import Runner


class TorchScriptRunner(Runner):
    """Runs a TorchScript archive. Calls are serialised (modules hold per-call state).

    Options:
        num_threads: torch intra-op threads (process-wide).
    """

    runtime = "torchscript"
    formats = ("torchscript",)
    # Inference through a loaded TorchScript module keeps no per-call Python state; the graph
    # executor guards its own caches. Proven by tests/test_concurrency.py (8 threads x 1,000 calls).
    thread_safe = True

    def _load(self) -> None:
        self._device = torch_device(self.device)  # first: a missing torch becomes a DependencyError
        import torch

        if self.options.get("num_threads"):
            torch.set_num_threads(int(self.options["num_threads"]))
        try:
            self.module = torch.jit.load(str(self.path), map_location=self._device).eval()
        except Exception as exc:
            raise RuntimeLoadError(f"TorchScript file {str(self.path)!r}", f"cannot be loaded: {exc}") from exc

    def _ready(self) -> None:
        self._call = ModuleCaller(self.module, self._device, self.signature.output_names)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._call(feeds)

    def _close(self) -> None:
        self.module = None
        self._call = None
