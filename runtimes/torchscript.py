"""TorchScript runner (``torch.jit.load``), CPU or CUDA."""

from __future__ import annotations

from pydantic import NonNegativeInt

from packager.errors import RuntimeLoadError
from runtimes._graphscan import refuse, torchscript_module_findings, torchscript_source_findings
from runtimes._torch import TorchModuleRunner, torch_device
from runtimes.base import RunnerOptions


class TorchScriptRunner(TorchModuleRunner):
    """Runs a TorchScript archive; one instance may be shared by threads.

    Options:
        num_threads: torch intra-op threads (process-wide).
    """

    class Options(RunnerOptions):
        num_threads: NonNegativeInt = 0  # 0: leave torch's setting

    runtime = "torchscript"

    def _load(self) -> None:
        self._device = torch_device(self.device)  # first: a missing torch becomes a DependencyError
        import torch

        if self.options.num_threads:
            torch.set_num_threads(self.options.num_threads)
        subject = f"TorchScript file {str(self.path)!r}"
        if not self.trust:  # before loading: torch.jit.load runs a module's __setstate__ code
            refuse(subject, torchscript_source_findings(self.path))
        try:
            self.module = torch.jit.load(str(self.path), map_location=self._device).eval()
        except Exception as exc:
            raise RuntimeLoadError(subject, f"cannot be loaded: {exc}") from exc
        if not self.trust:
            refuse(subject, torchscript_module_findings(self.module))
