"""Tiny Paddle models for the mutation suite (Paddle part): a correct CNN and broken variants.

Paddle is channels-first: the correct signature is ``x: float32[batch,3,8,8]``.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import paddle
    from paddle import nn
    from paddle.nn import functional as F

IMAGE = (3, 8, 8)
CLASSES = 5


class TinyCNN(nn.Layer):
    """Conv-BN-ReLU, Dropout, linear head; ``kind`` picks a broken variant.

    Kinds: ``good``, ``dropout`` (a random mask: what survives of a Dropout left training),
    ``batchnorm`` (batch statistics), ``fixed_batch`` (reshape to the export batch 4),
    ``channels_last`` (expects NHWC).
    """

    def __init__(self, kind: str = "good") -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2D(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2D(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6 * 4 * 4, CLASSES)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.kind == "channels_last":
            x = paddle.transpose(x, [0, 3, 1, 2])
        h = self.conv(x)
        if self.kind == "batchnorm":
            mean = h.mean(axis=[0, 2, 3], keepdim=True)
            var = ((h - mean) ** 2).mean(axis=[0, 2, 3], keepdim=True)
            h = (h - mean) / paddle.sqrt(var + 1e-5) * self.bn.weight.reshape([1, -1, 1, 1]) + \
                self.bn.bias.reshape([1, -1, 1, 1])
        else:
            h = self.bn(h)
        h = F.max_pool2d(F.relu(h), 2)
        h = paddle.reshape(h, [4, -1]) if self.kind == "fixed_batch" else paddle.flatten(h, 1)
        if self.kind == "dropout":
            h = h * (paddle.rand(h.shape) > 0.5).astype(h.dtype) * 2.0
        else:
            h = self.drop(h)
        return self.head(h)


def trained(seed: int = 0) -> TinyCNN:
    """The correct model, seeded, with non-trivial BatchNorm statistics, in eval mode."""
    paddle.seed(seed)
    model = TinyCNN()
    rng = np.random.default_rng(seed)
    model.bn._mean.set_value(rng.uniform(-0.5, 0.5, 6).astype("float32"))
    model.bn._variance.set_value(rng.uniform(0.5, 2.0, 6).astype("float32"))
    model.bn.weight.set_value(rng.uniform(0.5, 1.5, 6).astype("float32"))
    model.head.weight.set_value(model.head.weight.numpy() * 4.0)
    model.eval()
    return model


def broken(kind: str, good: TinyCNN) -> nn.Layer:
    """A broken variant carrying the correct model's weights."""
    if kind == "weight":
        model = copy.deepcopy(good)
        model.conv.weight.set_value(model.conv.weight.numpy() * (1.0 + 1e-3))
    else:
        model = TinyCNN(kind)
        model.set_state_dict(good.state_dict())
    model.eval()
    return model


def image_inputs(seed: int = 0, batch: int = 4, channels_last: bool = False) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((batch, *IMAGE)).astype(np.float32)
    return {"x": np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if channels_last else x}


def float16_weights(good: nn.Layer) -> nn.Layer:
    """The model with every parameter cast to float16 and back: the artifact a float16 cast
    produces, run in float32 (Paddle's CPU kernels have no float16 conv to run it natively)."""
    model = copy.deepcopy(good)
    for param in model.parameters():
        param.set_value(param.numpy().astype(np.float16).astype(np.float32))
    model.eval()
    return model


class TwoOutputs(nn.Layer):
    """Outputs ``scores`` and ``embedding``; ``drop=True`` loses the second."""

    def __init__(self, drop: bool = False) -> None:
        super().__init__()
        self.drop = drop
        self.a = nn.Linear(12, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: paddle.Tensor):  # type: ignore[no-untyped-def]
        h = paddle.tanh(self.a(x))
        return self.b(h) if self.drop else (self.b(h), h)
