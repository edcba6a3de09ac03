"""Finding the model weights inside a training checkpoint: one rule for torch and Paddle."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from packager.errors import SourceError


def _optimizer_key(key: Any) -> bool:
    """Keys that hold optimizer state, not weights ("optimizer", "optim_state", "opt")."""
    name = str(key).lower()
    return "optim" in name or name == "opt" or name.startswith("opt_")


def find_state(ckpt: dict, path: Path, state_key: str | None, *, keys: Sequence[str],
               is_state_dict: Callable[[Any], bool], clean: Callable[[dict], dict] = dict,
               values: str = "tensor") -> tuple[dict, str]:
    """The model state_dict inside a checkpoint dict, and the key it was found under.

    Args:
        ckpt: The loaded checkpoint.
        path: Where it was read from (for messages).
        state_key: A dotted key the user named (``--state-key``), else None: the first of
            ``keys`` that holds a state_dict, else the only non-optimizer entry that does.
        keys: The usual names of the weights entry, most common first.
        is_state_dict: Whether a value is a state_dict of this framework.
        clean: Turns the found state_dict into the one to load (e.g. drops bookkeeping keys).
        values: What a state_dict maps names to, for messages ("tensor", "array").

    Raises:
        SourceError: The named key is missing or holds no state_dict, or no unambiguous one exists.
    """
    if state_key is not None:
        node: Any = ckpt
        for part in state_key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise SourceError(f"checkpoint {str(path)!r}", f"has no key {state_key!r}", expected=state_key,
                                  got=sorted(map(str, ckpt)), fix="pass a --state-key it has")
            node = node[part]
        if not is_state_dict(node):
            raise SourceError(f"checkpoint key {state_key!r}", f"does not hold a state_dict (name -> {values})",
                              got=type(node).__name__, fix="pass the key of the model weights")
        return clean(node), state_key
    for key in keys:
        if is_state_dict(ckpt.get(key)):
            return clean(ckpt[key]), key
    candidates = [k for k, v in ckpt.items() if is_state_dict(v) and not _optimizer_key(k)]
    if len(candidates) == 1:
        return clean(ckpt[candidates[0]]), str(candidates[0])
    raise SourceError(f"checkpoint {str(path)!r}", "holds no unambiguous model state_dict",
                      expected=f"one of the keys {list(keys)}", got=sorted(map(str, ckpt)),
                      fix="pass --state-key KEY naming the model weights")
