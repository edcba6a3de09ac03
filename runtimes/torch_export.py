"""torch.export runner (``.pt2`` via ``torch.export.load``), CPU or CUDA."""

from __future__ import annotations

from packager.errors import RuntimeLoadError
from runtimes._torch import TorchModuleRunner, is_unpickling_refusal, torch_device, weights_only_loads


class TorchExportRunner(TorchModuleRunner):
    """Runs an ExportedProgram's module."""

    runtime = "torch_export"
    formats = ("torch_export",)

    def _load(self) -> None:
        self._device = torch_device(self.device)  # first: a missing torch becomes a DependencyError
        import torch

        try:
            # A deployment artifact must not run pickled code: see weights_only_loads.
            with weights_only_loads():
                program = torch.export.load(str(self.path))
            self.module = program.module().to(self._device)
        except Exception as exc:
            if is_unpickling_refusal(exc):
                raise RuntimeLoadError(f"torch.export file {str(self.path)!r}", "contains pickled Python objects "
                                       "that would run code when loaded; refused",
                                       fix="re-export the model with 'packager export' (plain tensor weights); "
                                           "never load .pt2 files from untrusted sources outside packager") from None
            raise RuntimeLoadError(f"torch.export file {str(self.path)!r}", f"cannot be loaded: {exc}") from exc
