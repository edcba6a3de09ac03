"""PyTorch samples: a CNN with BatchNorm and Dropout, a Transformer encoder over token ids, a tiny MLP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

VOCAB = 100
NUM_CLASSES = 10


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2, Dropout, linear head; input ``x: float32[batch,3,32,32]``."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(32 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.features(x), 1)))


class TinyTransformer(nn.Module):
    """Token embedding + positional embedding, one encoder layer, mean pool; ``ids: int64[batch,seq]``."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, max_len: int = 64,
                 num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.1, batch_first=True)
        # nested tensors are a fast path that tracing and export cannot follow
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        hidden = self.encoder(self.embed(ids) + self.pos(positions))
        return self.head(hidden.mean(dim=1))


class TinyMLP(nn.Module):
    """16 -> 32 -> 4, for runner-overhead benchmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoHeads(nn.Module):
    """Two inputs, dict of two outputs: checks names survive every format."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.a(image.flatten(1)))
        return {"scores": h, "aux": self.b(extra) + h[:, :2]}


def build_cnn() -> SmallCNN:
    """Builder for ``--builder sample_models.torch_models:build_cnn``."""
    return SmallCNN()


def build_transformer() -> TinyTransformer:
    return TinyTransformer()


def build_mlp() -> TinyMLP:
    return TinyMLP()


def build_two_heads() -> TwoHeads:
    return TwoHeads()


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float = 1e-2) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def train_cnn(seed: int = 0, steps: int = 30) -> tuple[SmallCNN, dict[str, np.ndarray]]:
    """Train the CNN for ``steps`` steps on synthetic images (label = brightest channel)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randn(16, 3, 32, 32, generator=g)
        y = x.mean(dim=(2, 3)).argmax(dim=1) * 3
        batches.append((x, y))
    model = _train(build_cnn(), batches)
    example = torch.randn(4, 3, 32, 32, generator=g).numpy()
    return model, {"x": example}


def train_transformer(seed: int = 0, steps: int = 30) -> tuple[TinyTransformer, dict[str, np.ndarray]]:
    """Train on synthetic sequences (label = most frequent token bucket) of varying length."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        seq = 8 + (step % 4) * 4
        ids = torch.randint(0, VOCAB, (16, seq), generator=g)
        y = (ids // 25).mode(dim=1).values
        batches.append((ids, y))
    model = _train(build_transformer(), batches, lr=3e-3)
    example = torch.randint(0, VOCAB, (4, 12), generator=g).numpy()
    return model, {"ids": example}


def train_mlp(seed: int = 0, steps: int = 20) -> tuple[TinyMLP, dict[str, np.ndarray]]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    batches = [(x := torch.randn(32, 16, generator=g), (x[:, :4].argmax(dim=1))) for _ in range(steps)]
    model = _train(build_mlp(), batches)
    return model, {"x": torch.randn(4, 16, generator=g).numpy()}


def demo_cnn(work: Path) -> dict:
    """Train the CNN, save a training checkpoint dict as a user would, export from it."""
    model, example = train_cnn()
    optimizer = torch.optim.Adam(model.parameters())
    ckpt = work / "cnn_checkpoint.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "epoch": 3}, ckpt)
    np.savez(work / "example.npz", **example)
    return {"source": ckpt, "builder": "sample_models.torch_models:build_cnn",
            "example_inputs": work / "example.npz"}


def demo_transformer(work: Path) -> dict:
    """Train the Transformer, save its state_dict, export with a dynamic sequence axis."""
    model, _ = train_transformer()
    path = work / "transformer_state.pt"
    torch.save(model.state_dict(), path)
    return {"source": path, "builder": "sample_models.torch_models:build_transformer",
            "input_spec": [f"ids:int64[batch,seq=1..64]@0:{VOCAB}"]}
