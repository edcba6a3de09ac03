"""A restricted unpickler for weight files (``.pdparams``, ``.pdopt``, plain ``.pkl`` state dicts).

Pickle runs code: any global a file names is imported and called. Like torch's
``weights_only=True``, :func:`safe_load` admits only what weights need — numpy arrays, dtypes
and scalars, the tuples Paddle uses to carry tensors (``(name, ndarray)``), ``OrderedDict``
and plain containers/scalars — and refuses everything else *before* importing it. Callers
turn :class:`UnsafePickleError` into a message that names the global and asks for ``--trust``.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path
from typing import IO, Any, Iterable

#: (module, name) pairs a weights file may reference. numpy moved ``core`` to ``_core`` in 2.0:
#: both spellings appear in real files depending on the numpy that wrote them.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("builtins", "tuple"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "bytes"),
    ("builtins", "str"),
    # protocol 2 encodes bytes as _codecs.encode(str, "latin1"); it only builds bytes.
    ("_codecs", "encode"),
})
#: numpy 2 pickles some dtypes by their DType class (numpy.dtypes.Float32DType, ...).
SAFE_MODULE_PREFIXES: tuple[str, ...] = ("numpy.dtypes",)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allowed set.

    Attributes:
        module: Module of the refused global.
        name: Its name.
    """

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name
        super().__init__(f"refused global {module}.{name}: not an array, dtype or plain container")


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` admits only :data:`SAFE_GLOBALS` (plus ``extra``).

    Args:
        file: Binary file object to read.
        extra: Further ``(module, name)`` pairs to admit.
    """

    def __init__(self, file: IO[bytes], extra: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(file)
        self._allowed = SAFE_GLOBALS | frozenset(extra)

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 writes Python 2 names (__builtin__.set): check what they map to (the
        # mapping holds only Python 2 names, so Python 3 names pass through unchanged).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self._allowed or (module.startswith(SAFE_MODULE_PREFIXES) and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafePickleError(module, name)

    def persistent_load(self, pid: Any) -> Any:
        # torch-style persistent ids would load storages through arbitrary code paths.
        raise pickle.UnpicklingError("persistent ids are not supported by the restricted unpickler")


def safe_loads(data: bytes, extra: Iterable[tuple[str, str]] = ()) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    Raises:
        UnsafePickleError: The data references a global that is not allowed.
        pickle.UnpicklingError: The data is not a valid pickle.
    """
    return RestrictedUnpickler(io.BytesIO(data), extra).load()


def safe_load(path: str | Path, extra: Iterable[tuple[str, str]] = ()) -> Any:
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler` (see :func:`safe_loads`)."""
    with open(path, "rb") as handle:
        return RestrictedUnpickler(handle, extra).load()


def is_pickle(path: str | Path) -> bool:
    """Whether ``path`` starts like a pickle (protocol 2+ header)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
