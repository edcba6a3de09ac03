"""Feed validation against a signature, compiled once per runner so each call is cheap."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from packager.errors import FeedError
from packager.signature import TensorSpec

#: ``strict``: dtypes must match exactly. ``safe``: lossless casts (numpy "safe") are applied.
CAST_POLICIES = ("strict", "safe")


class FeedValidator:
    """Checks names, dtypes, ranks and fixed dimensions of feeds.

    Args:
        specs: Input specs in the order the runtime wants them.
        cast: ``"strict"`` (default) or ``"safe"`` (lossless casts only).
    """

    def __init__(self, specs: list[TensorSpec], cast: str = "strict") -> None:
        if cast not in CAST_POLICIES:
            raise FeedError("cast policy", "is unknown", expected=" or ".join(CAST_POLICIES), got=cast)
        self.specs = specs
        self.cast = cast
        self.names = [s.name for s in specs]
        self._name_set = frozenset(self.names)
        # (name, numpy dtype, rank, ((axis, size), ...)) precomputed: the hot path only compares.
        self._checks = [
            (s.name, _np_dtype(s.dtype), len(s.shape), tuple((i, d) for i, d in enumerate(s.shape) if isinstance(d, int)),
             s)
            for s in specs
        ]

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate ``feeds``; return them as arrays in signature order.

        Raises:
            FeedError: Naming the input, what was expected, what was received, and the fix.
        """
        if type(feeds) is not dict and not isinstance(feeds, Mapping):
            raise FeedError("feeds", "must be a dict of input name to array", expected="dict[str, np.ndarray]",
                            got=type(feeds).__name__, fix=f"pass {{{', '.join(repr(n) + ': array' for n in self.names)}}}")
        if feeds.keys() != self._name_set:
            self._name_error(feeds)
        changed = type(feeds) is not dict
        out: dict[str, np.ndarray] = {}
        for name, dtype, rank, fixed, spec in self._checks:
            value = feeds[name]
            if type(value) is not np.ndarray:
                value = _as_array(name, value)
                changed = True
            # Builtin numpy dtypes are singletons: the identity test is the cheap common case.
            if value.dtype is not dtype and value.dtype != dtype:
                value = self._cast(spec, dtype, value)
                changed = True
            shape = value.shape
            if len(shape) != rank:
                raise FeedError(f"input {name!r}", "has the wrong rank", expected=f"{rank}-D {spec.shape_str()}",
                                got=f"{value.ndim}-D {list(shape)}",
                                fix=_rank_fix(value.ndim, rank))
            for axis, size in fixed:
                if shape[axis] != size:
                    raise FeedError(f"input {name!r}", f"dimension {axis} has the wrong size",
                                    expected=f"{size} (shape {spec.shape_str()})", got=f"{shape[axis]} "
                                    f"(shape {list(shape)})", fix="resize or transpose the array to the "
                                    "signature's shape (is the layout NCHW vs NHWC?)")
            out[name] = value
        # Hand the caller's dict through untouched when nothing was converted: no copy per call.
        if changed or (len(out) > 1 and list(feeds) != self.names):
            return out  # in signature order: positional runtimes (torch) rely on it
        return feeds  # type: ignore[return-value]

    def _name_error(self, feeds: Mapping[str, Any]) -> None:
        missing = [n for n in self.names if n not in feeds]
        unknown = [n for n in feeds if n not in self._name_set]
        problem = []
        if missing:
            problem.append(f"missing {missing}")
        if unknown:
            problem.append(f"unknown {unknown}")
        raise FeedError("feeds", "input names do not match the signature: " + ", ".join(problem),
                        expected=self.names, got=list(feeds), fix=f"pass exactly the inputs {self.names}")

    def _cast(self, spec: TensorSpec, dtype: np.dtype, value: np.ndarray) -> np.ndarray:
        if value.dtype.byteorder not in "=|" and value.dtype.newbyteorder("=") == dtype:
            # Same type in the other byte order (e.g. '>f4' from a big-endian file): swapping is
            # exact, and "expected float32, got float32" would be no message at all.
            return value.astype(dtype)
        if self.cast == "safe" and np.can_cast(value.dtype, dtype, casting="safe"):
            return value.astype(dtype)
        lossless = np.can_cast(value.dtype, dtype, casting="safe")
        hint = (f"convert with array.astype(np.{dtype.name})" +
                (" or allow lossless casts (cast='safe', --cast safe)" if lossless else
                 f"; {value.dtype.name} -> {dtype.name} may lose information, so it is never cast implicitly"))
        raise FeedError(f"input {spec.name!r}", "has the wrong dtype", expected=dtype.name, got=value.dtype.name,
                        fix=hint)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # only where a signature uses bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _as_array(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "__array__") or isinstance(value, (list, tuple, int, float, bool)):
        try:
            return np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged nested lists, objects failing __array__
            raise FeedError(f"input {name!r}", f"cannot be made into an array ({exc})",
                            expected="a rectangular numpy array", got=type(value).__name__,
                            fix="pass a numpy array with one length per axis") from None
    raise FeedError(f"input {name!r}", "is not an array", expected="numpy.ndarray", got=type(value).__name__,
                    fix="pass a numpy array (np.asarray(...))")


def _rank_fix(got: int, want: int) -> str:
    if got == want - 1:
        return "add the batch axis: array[None] (np.expand_dims(array, 0))"
    if got == want + 1:
        return "remove the extra axis (array.squeeze(axis)) or check the layout"
    return "reshape the array to the signature's shape"
