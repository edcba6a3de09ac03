"""torch.export runner (``.pt2`` via ``torch.export.load``), CPU or CUDA."""

from __future__ import annotations

import numpy as np

from packager.errors import RuntimeLoadError
from runtimes._torch import run_module, torch_device
from runtimes.base import Runner


class TorchExportRunner(Runner):
    """Runs an ExportedProgram's module."""

    runtime = "torch_export"
    formats = ("torch_export",)

    def _load(self) -> None:
        import torch

        self._device = torch_device(self.device)
        try:
            program = torch.export.load(str(self.path))
            self.module = program.module().to(self._device)
        except Exception as exc:
            raise RuntimeLoadError(f"torch.export file {str(self.path)!r}", f"cannot be loaded: {exc}") from exc

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_module(self.module, feeds, self._device, self.signature.output_names)

    def _close(self) -> None:
        self.module = None
