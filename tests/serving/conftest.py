"""Serving fixtures: real packages, and a real `packager serve` process on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest


@dataclass
class Server:
    """A running ``packager serve`` subprocess."""

    process: subprocess.Popen
    url: str
    line: str

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        """SIGTERM, then the exit code and what it printed on stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            rc = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return rc, self.process.stderr.read()


def start_server(package: Path, *args: str) -> Server:
    """Start ``packager serve PACKAGE --port 0 ARGS`` and wait for its "serving ... at URL" line.

    The server is ready when it prints the line: the model is loaded and the socket listens."""
    process = subprocess.Popen([sys.executable, "-m", "packager", "serve", str(package), "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in process.stderr:  # blocks until the line or the process's end
        lines.append(line)
        if line.startswith("serving "):
            url = line.split(" at ", 1)[1].split("/v2/", 1)[0]
            return Server(process, url, line)
    process.wait(timeout=60)
    raise AssertionError(f"packager serve exited {process.returncode}: {''.join(lines)}")


@pytest.fixture(scope="module")
def batch_dependent_package(session_dir: Path) -> Path:
    """A model whose rows depend on the other rows of the batch (it centres by the batch mean):
    exported honestly, its golden case passes, and batch consistency must fail."""
    import torch

    import packager

    class BatchCentred(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x - x.mean(dim=0, keepdim=True))

    torch.manual_seed(0)
    model = BatchCentred().eval()
    x = torch.randn(4, 8)
    dest = session_dir / "batch_centred"
    if not dest.exists():
        packager.export(model, {"x": x}, out=dest, formats=["onnx"])
    return dest


@pytest.fixture(scope="module")
def cnn_server(torch_cnn_package: Path) -> Iterator[Server]:
    """The sample CNN's ONNX artifact behind `packager serve` (batching evidence: passes)."""
    server = start_server(torch_cnn_package, "--max-delay-ms", "2")
    yield server
    server.stop()
