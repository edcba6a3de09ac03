"""What ``packager optimize`` asks an optimiser for (:class:`Plan`) and what it gets back
(:class:`Made`): the contract of the converters the registry names for optimised formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Plan:
    """One attempt: how to optimise, and which nodes to leave as they are."""

    #: ``fp16``: the fp16 conversion; ``dynamic`` / ``static``: int8 quantisation.
    method: str
    #: Node names kept in full precision (fp16: ``node_block_list``; int8: ``nodes_to_exclude``
    #: or NNCF's ignored scope), each with why in :attr:`reasons`.
    keep: tuple[str, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)
    #: Calibration batches (static int8 statistics); empty when the method needs none.
    calibration: tuple[dict[str, np.ndarray], ...] = ()
    #: int8: per-channel weight scales.
    per_channel: bool = True
    #: int8 ONNX: 7-bit weights. ONNX Runtime's x86 kernels without VNNI multiply uint8 by int8
    #: with VPMADDUBSW, whose int16 pair sums can saturate for 8-bit weights (255 x 127 x 2 >
    #: 32767); 7-bit weights cannot, at a cost in accuracy (measured: BERT's static int8 pooler
    #: top-1 1.0 -> 0.97). Off by default; the record says which, and ``packager verify`` on the
    #: deployment host judges what that host computes.
    reduce_range: bool = False
    #: Scratch folder for intermediate files (deleted after the run).
    work: Path | None = None


@dataclass
class Made:
    """One optimised artifact, written into its folder."""

    #: The file the runtime loads, relative to the artifact's folder.
    path: str
    #: Nodes that were converted or quantised (names of the reference graph).
    changed: list[str]
    #: The full-precision graph whose node names ``Plan.keep`` refers to (the localisation's reference).
    reference: Path | None = None
    #: What the tool did, for the manifest (tool version, counts).
    record: dict[str, Any] = field(default_factory=dict)
