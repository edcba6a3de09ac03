"""torch.export runner (``.pt2`` via ``torch.export.load``), CPU or CUDA."""

from __future__ import annotations

from packager.errors import RuntimeLoadError, UnsafeArtifactError
from runtimes._graphscan import exported_program_findings, pt2_findings, refuse
from runtimes._torch import TorchModuleRunner, is_unpickling_refusal, torch_device, weights_only_loads


class TorchExportRunner(TorchModuleRunner):
    """Runs an ExportedProgram's module."""

    runtime = "torch_export"

    def _load(self) -> None:
        self._device = torch_device(self.device)  # first: a missing torch becomes a DependencyError
        import torch

        subject = f"torch.export file {str(self.path)!r}"
        if not self.trust:  # before torch opens it: loading unpickles and exec()s parts of a .pt2
            refuse(subject, pt2_findings(self.path))
        try:
            # A deployment artifact must not run pickled code: see weights_only_loads.
            with weights_only_loads():
                program = torch.export.load(str(self.path))
            if not self.trust:
                refuse(subject, exported_program_findings(program))
            self.module = program.module().to(self._device)
        except UnsafeArtifactError:
            raise
        except Exception as exc:
            if is_unpickling_refusal(exc):
                raise RuntimeLoadError(f"torch.export file {str(self.path)!r}", "contains pickled Python objects "
                                       "that would run code when loaded; refused",
                                       fix="re-export the model with 'packager export' (plain tensor weights); "
                                           "never load .pt2 files from untrusted sources outside packager") from None
            raise RuntimeLoadError(f"torch.export file {str(self.path)!r}", f"cannot be loaded: {exc}") from exc
