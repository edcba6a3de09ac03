"""A model whose forward returns its own output class, registered as a torch pytree node, like a
Hugging Face ``ModelOutput``. Only the exporting process imports this module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree


@dataclass
class Scores:
    logits: torch.Tensor
    pooled: torch.Tensor


pytree.register_dataclass(Scores)


class ScoresModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> Scores:
        logits = self.linear(x)
        return Scores(logits=logits, pooled=logits.mean(dim=1))
