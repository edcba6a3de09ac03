"""Tiny torch models for the mutation suite: a correct one and deliberately broken variants.

Each broken variant reproduces one real export bug; the suite exports it, swaps its artifacts
into a package whose golden data come from the correct model, and checks the verdict.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IMAGE = (3, 8, 8)
CLASSES = 5


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, Dropout, linear head over ``x: float32[batch,3,8,8]``; returns class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6 * 4 * 4, CLASSES)

    def body(self, x: torch.Tensor, bn_training: bool = False, drop_training: bool = False) -> torch.Tensor:
        h = self.conv(x)
        h = F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                         training=bn_training, momentum=0.0, eps=self.bn.eps)
        h = F.max_pool2d(F.relu(h), 2)
        h = F.dropout(h.flatten(1), 0.5, training=drop_training)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DropoutTraining(TinyCNN):
    """Dropout left in training mode, baked into the graph as a random mask.

    ``F.dropout(training=True)`` is not enough: the ONNX exporter and ONNX Runtime both drop a
    Dropout node at inference; a random mask is what survives (custom dropout, a model traced
    in train mode).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)
        mask = (torch.rand_like(h) > 0.5).to(h.dtype)
        return self.head(h * mask * 2.0)


class BatchNormTraining(TinyCNN):
    """BatchNorm left in training mode: normalises with the batch's statistics.

    Written out (not ``F.batch_norm(training=True)``) because the ONNX exporter rewrites a
    training-mode BatchNorm of an eval model to inference mode; a graph computing batch
    statistics is what a model exported in training mode carries.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        h = (h - mean) / torch.sqrt(var + self.bn.eps) * self.bn.weight.view(1, -1, 1, 1) + self.bn.bias.view(1, -1, 1, 1)
        h = F.max_pool2d(F.relu(h), 2)
        return self.head(h.flatten(1))


class FixedBatch(TinyCNN):
    """A batch axis baked to the export batch (``reshape(4, -1)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.head(h.reshape(4, -1))


class ChannelsLast(TinyCNN):
    """Expects NHWC input where the signature says NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 3, 1, 2))


class Float16(nn.Module):
    """The model cast to float16 inside, float32 at the boundary."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


class TwoOutputs(nn.Module):
    """Two named outputs: ``scores`` and ``embedding``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.a(x))
        return self.b(h), h


class DropsOutput(TwoOutputs):
    """Returns only the first output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def trained_cnn(seed: int = 0) -> TinyCNN:
    """A TinyCNN with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = TinyCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
        model.head.weight.mul_(4.0)  # scores of order 1, so a 1e-3 weight error is visible
    return model.eval()


def variant(cls: type[nn.Module], good: nn.Module) -> nn.Module:
    """A broken variant carrying the correct model's weights."""
    model = cls()
    model.load_state_dict(good.state_dict())
    return model.eval()


def perturbed(good: nn.Module, tensor: str = "conv.weight", rel: float = 1e-3) -> nn.Module:
    """A copy whose one weight tensor is scaled by ``1 + rel``."""
    model = copy.deepcopy(good)
    with torch.no_grad():
        dict(model.named_parameters())[tensor].mul_(1.0 + rel)
    return model.eval()


def image_inputs(seed: int = 0, batch: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, *IMAGE)).astype(np.float32)}


def two_output_model(seed: int = 0) -> TwoOutputs:
    torch.manual_seed(seed)
    return TwoOutputs().eval()


class Noisy(nn.Module):
    """A sequence model whose output carries run-to-run noise (a non-deterministic kernel)."""

    def __init__(self, noise: float = 1e-3) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x).mean(dim=1)
        return y + self.noise * torch.rand_like(y)


def build_noisy() -> Noisy:
    """Builder for ``--builder tests.fidelity.models:build_noisy``."""
    torch.manual_seed(0)
    return Noisy()


class TwoHeads(nn.Module):
    """Two outputs of the same shape (``a`` and ``b``, [batch, 3]): a swap keeps every contract."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return self.a(h), self.b(h)


class SwappedHeads(TwoHeads):
    """Returns the heads in the wrong order (a converter or a wrapper mixing outputs up)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = super().forward(x)
        return b, a


class ZeroHead(nn.Module):
    """A real output and an all-zero one (an untrained head initialised to zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 3)
        self.dead = nn.Linear(12, 4)
        with torch.no_grad():
            self.dead.weight.zero_()
            self.dead.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.dead(x)


def fp16_rounded(good: nn.Module) -> nn.Module:
    """A copy whose weights went through float16 and back: still float32, 11 bits of mantissa."""
    model = copy.deepcopy(good)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


class TwoInputs(nn.Module):
    """``forward(a, b)`` over two inputs of the same shape: a positional mix-up keeps every contract."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fa = nn.Linear(6, 3)
        self.fb = nn.Linear(6, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fa(a) - 2 * self.fb(b)


class InputsSwapped(TwoInputs):
    """The same weights with the inputs bound the wrong way round (what a positional binding of
    ``{"b": ..., "a": ...}`` computed)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return super().forward(b, a)
