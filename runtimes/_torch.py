"""Helpers shared by the TorchScript and torch.export runners."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator

import numpy as np

from packager.errors import ExportError, require
from runtimes.base import Runner
from runtimes.device import Device, require_gpu


_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_weights_only_lock = threading.RLock()


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force every ``torch.load`` inside the block to ``weights_only=True``.

    ``torch.export.load`` unpickles parts of a ``.pt2`` with ``weights_only=False`` (pickled
    weights/constants, and a silent fallback for example inputs), i.e. it can run code from
    the file. torch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at every call and then overrides even
    an explicit ``weights_only=False``; that is the only switch that reaches those calls.
    The variable is process-wide, so it is set under a lock and restored afterwards.
    """
    with _weights_only_lock:
        previous = os.environ.get(_WEIGHTS_ONLY_ENV)
        os.environ[_WEIGHTS_ONLY_ENV] = "1"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(_WEIGHTS_ONLY_ENV, None)
            else:
                os.environ[_WEIGHTS_ONLY_ENV] = previous


def is_unpickling_refusal(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) is torch refusing a pickled global under weights_only."""
    import pickle

    while exc is not None:
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def torch_device(device: Device) -> Any:
    """The torch.device for ``device``; a missing GPU is an error."""
    torch = require("torch", purpose="run TorchScript and torch.export artifacts")
    if device.is_cuda:
        require_gpu(device, torch.cuda.device_count() if torch.cuda.is_available() else 0, "torch",
                    "install a CUDA build of torch")
        return torch.device("cuda", device.index)
    return torch.device("cpu")


def flatten(output: Any) -> list[Any]:
    """Tensors of a (nested) tuple/list/dict output, in order."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in flatten(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in flatten(v)]
    from torch.utils import _pytree as pytree

    if type(output) in pytree.SUPPORTED_NODES:  # a model's own output class (e.g. a registered dataclass)
        return [t for v in pytree.tree_leaves(output) for t in flatten(v)]
    raise ExportError("model output", "is not a tensor, tuple, list or dict of tensors", got=type(output).__name__)


class ModuleCaller:
    """Calls a torch module with numpy feeds; the per-call path does no imports or lookups."""

    def __init__(self, module: Any, device: Any, names: list[str]) -> None:
        import torch

        self.module = module
        self.names = names
        self.on_cpu = device.type == "cpu"
        self.device = device
        self.inference_mode = torch.inference_mode
        self.from_numpy = torch.from_numpy
        self.tensor_type = torch.Tensor

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from_numpy = self.from_numpy
        try:
            with self.inference_mode():
                if self.on_cpu:  # from_numpy shares memory: no copy on the hot path
                    output = self.module(*[from_numpy(a) for a in feeds.values()])
                else:
                    output = self.module(*[from_numpy(a).to(self.device, non_blocking=True) for a in feeds.values()])
        except Exception as exc:  # TorchScript raises RuntimeError with the interpreter's trace
            from packager.errors import RuntimeLoadError

            lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            raise RuntimeLoadError(f"torch module ({shapes})", f"failed to run: {lines[-1] if lines else exc}",
                                   fix="check that the inputs fit the signature; an axis baked to the export size "
                                       "by tracing needs --torchscript-mode script or torch_export") from exc
        if type(output) is self.tensor_type or isinstance(output, self.tensor_type):
            return {self.names[0]: output.numpy() if self.on_cpu else output.cpu().numpy()}
        outputs = flatten(output)
        if self.on_cpu:
            return {n: t.numpy() for n, t in zip(self.names, outputs)}
        return {n: t.cpu().numpy() for n, t in zip(self.names, outputs)}


class TorchModuleRunner(Runner):
    """Shared per-call path of the TorchScript and torch.export runners.

    Subclasses load ``self.module`` and ``self._device`` in ``_load``. A loaded module keeps no
    per-call Python state, so one instance may be shared by threads (tests/test_concurrency.py).
    """

    def _ready(self) -> None:
        self._call = ModuleCaller(self.module, self._device, self.signature.output_names)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._call(feeds)

    def _close(self) -> None:
        self.module = None
        self._call = None
