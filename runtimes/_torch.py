"""Helpers shared by the TorchScript and torch.export runners."""

from __future__ import annotations

from typing import Any

import numpy as np

from packager.errors import ExportError, require
from runtimes.device import Device, require_gpu


def torch_device(device: Device) -> Any:
    """The torch.device for ``device``; a missing GPU is an error."""
    torch = require("torch", extra="torch", purpose="run TorchScript and torch.export artifacts")
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
    raise ExportError("model output", "is not a tensor, tuple, list or dict of tensors", got=type(output).__name__)


def run_module(module: Any, feeds: dict[str, np.ndarray], device: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Call ``module`` with feeds (in order) on ``device``; outputs back as numpy."""
    import torch

    on_cpu = device.type == "cpu"
    with torch.inference_mode():
        # from_numpy shares memory on CPU: no copy on the hot path.
        args = [torch.from_numpy(a) if on_cpu else torch.from_numpy(a).to(device, non_blocking=True)
                for a in feeds.values()]
        outputs = flatten(module(*args))
    return {n: (t.numpy() if on_cpu else t.cpu().numpy()) for n, t in zip(names, outputs)}
