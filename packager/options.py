"""Options declared with types, for runners and exporters alike.

Values given as strings (``--option torchscript_freeze=false``, a manifest's runner options)
parse by the declared type, a bad value is an error naming the option, and an unknown option
is refused with the closest spelling (a typo must not be ignored).
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from packager.errors import UsageError


class TypedOptions(BaseModel):
    """Base of every declared option set: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


T = TypeVar("T", bound=TypedOptions)


def parse_options(declared: type[T], given: Mapping[str, Any] | None, *, subject: str, owner: str,
                  fix_suffix: str = "") -> T:
    """Validate ``given`` against ``declared``.

    Args:
        declared: The option set.
        given: Option name to value.
        subject: What the message is about ("torch exporter options").
        owner: Who refuses an unknown key ("the torch exporter", "this runtime").
        fix_suffix: Appended to the fix (where options are given).

    Raises:
        UsageError: An unknown option or a value of the wrong type (exit 2), naming the
            accepted options with their types and defaults.
    """
    given = dict(given or {})
    try:
        return declared.model_validate(given)
    except ValidationError as exc:
        fields = declared.model_fields
        problems, hints = [], []
        for error in exc.errors():
            name = ".".join(str(p) for p in error.get("loc", ())) or "options"
            if error.get("type") == "extra_forbidden":
                problems.append(f"{name!r} is not an option of {owner}")
                close = difflib.get_close_matches(name, list(fields), n=1)
                if close:
                    hints.append(f"spell it {close[0]!r}")
            else:
                problems.append(f"{name!r}: {error.get('msg', 'invalid')} (got {error.get('input')!r})")
        accepted = ", ".join(f"{k} ({type_name(f.annotation)}, default {f.default!r})"
                             for k, f in fields.items()) or "none"
        raise UsageError(subject, f"are not valid: {'; '.join(problems)}", expected=f"options {accepted}",
                         got=given, fix=", or ".join(hints + ["fix or drop the option"]) + fix_suffix) from None


def type_name(annotation: Any) -> str:
    """``bool``, ``trace|script``, ``str | None``: how an option's type reads in a message."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) if a is not type(None) else "None" for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
