"""Device strings: ``cpu``, ``cuda`` or ``cuda:N``. Never a silent CPU fallback."""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass

from packager.errors import DeviceError, UsageError

_DEVICE = re.compile(r"^(cpu|cuda|gpu)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """A parsed device."""

    kind: str  # "cpu" or "cuda"
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_device(text: str | Device) -> Device:
    """Parse ``"cpu" | "cuda" | "cuda:N"`` (``gpu`` is accepted as ``cuda``)."""
    if isinstance(text, Device):
        return text
    match = _DEVICE.match(str(text).strip().lower())
    if not match:
        raise UsageError(f"device {text!r}", "is not a device name", expected="cpu, cuda or cuda:N", got=text)
    kind = "cpu" if match[1] == "cpu" else "cuda"
    if kind == "cpu" and match[2] not in (None, "0"):
        raise UsageError(f"device {text!r}", "cpu takes no index", expected="cpu", got=text)
    return Device(kind, int(match[2] or 0))


def require_gpu(device: Device, available: int, runtime: str, hint: str) -> None:
    """Raise when ``device`` asks for a GPU index the runtime cannot see.

    Args:
        device: The requested device.
        available: How many GPUs the runtime sees.
        runtime: Runtime name for the message.
        hint: What to install or check.
    """
    if device.is_cuda and device.index >= available:
        raise DeviceError(
            f"device {device}", f"is not available to {runtime}",
            expected=f"a visible CUDA GPU with index {device.index}", got=f"{available} CUDA device(s)",
            fix=f"run with --device cpu, or {hint}")


def host_cuda_devices() -> int | None:
    """NVIDIA GPUs this host has, read without importing a framework (None: cannot tell).

    Linux: the driver's ``/dev/nvidiaN`` nodes and ``/proc/driver/nvidia/gpus``; WSL (``/dev/dxg``)
    and other systems answer None, and the runtimes then decide per device.
    """
    if not sys.platform.startswith("linux") or os.path.exists("/dev/dxg"):
        return None
    nodes = [p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)]
    gpus = glob.glob("/proc/driver/nvidia/gpus/*")
    return max(len(nodes), len(gpus))


def require_cuda_host(devices: "list[str] | tuple[str, ...]") -> None:
    """Refuse ``cuda[:N]`` devices at once (one message, exit 2) when the host has no CUDA device
    at all, before anything loads: the cause is the host, not a runtime build to install."""
    wanted = [parse_device(d) for d in devices]
    cuda = [d for d in wanted if d.is_cuda]
    if not cuda or host_cuda_devices() != 0:
        return
    raise DeviceError(f"device {cuda[0]}", "no CUDA device on this host",
                      expected=f"a CUDA GPU with index {cuda[0].index}", got="0 CUDA devices",
                      fix="use --device cpu, or run on a host with an NVIDIA GPU and its driver")
