"""A model whose forward returns its own output class, registered as a pytree node here only.

Only the exporting test process imports this module (as only a training process imports
``transformers``, whose ``ModelOutput`` classes are pytree nodes): the export-parity worker,
``packager verify`` and ``runtimes.load`` in a fresh process never do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

SERIALIZED_NAME = "tests._pytree_output.PairOutput"


@dataclass
class PairOutput:
    logits: torch.Tensor
    features: torch.Tensor


pytree.register_dataclass(PairOutput, serialized_type_name=SERIALIZED_NAME)


class PairModel(torch.nn.Module):
    """``x[batch, 8] -> PairOutput(logits[batch, 3], features[batch, 5])``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> PairOutput:
        features = torch.tanh(self.body(x))
        return PairOutput(logits=self.head(features), features=features)


def program_with_class_output(example: torch.Tensor) -> "torch.export.ExportedProgram":
    """A torch.export program whose output spec keeps :class:`PairOutput` (what torch_export
    wrote before it flattened outputs): it deserialises only where this module is imported."""
    torch.manual_seed(0)
    return torch.export.export(PairModel().eval(), (example,),
                               dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
