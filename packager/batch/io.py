"""Dataset readers and writers for ``packager run``.

Readers stream fixed-size chunks of rows without loading a whole dataset: ``.npy`` files are
memory-mapped, ``.npz`` members are read sequentially (stored or deflated), Parquet is read by
row group (``ParquetFile.iter_batches``). Every array handed out is batch-first; the pipeline
moves the batch axis where a model wants it elsewhere.

Writers are atomic: they write ``.NAME.tmp-*`` beside the target and ``os.replace`` it.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from packager.errors import InputError, UsageError
from packager.atomic import atomic_path, commit_file
from packager.signature import Signature, TensorSpec

#: Input file suffixes a dataset (or a shard of a dataset folder) may have.
SUFFIXES = (".npy", ".npz", ".parquet")
#: Parquet field-metadata key holding a tensor column's per-row shape (JSON list).
SHAPE_KEY = b"packager.shape"


@dataclass
class Chunk:
    """Consecutive rows of a dataset.

    Attributes:
        start: Global index of the first row.
        arrays: Input name to batch-first array (rows that failed reading hold filler values).
        ids: The id column's values for these rows, if an id column was asked for.
        bad: Local row index to the reason it cannot be used (null, wrong length, ...).
    """

    start: int
    arrays: dict[str, np.ndarray]
    ids: np.ndarray | None = None
    bad: dict[int, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        if self.arrays:
            return int(next(iter(self.arrays.values())).shape[0])
        return 0 if self.ids is None else len(self.ids)


def row_shape(spec: TensorSpec) -> tuple[int | str, ...]:
    """The spec's shape without its batch axis (axis 0 when the batch size is fixed)."""
    axis = spec.batch_axis if spec.batch_axis is not None else 0
    return tuple(d for i, d in enumerate(spec.shape) if i != axis)


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
class Source:
    """A readable dataset: one file. ``rows`` is known before reading (for ETA and resume)."""

    path: Path
    rows: int
    columns: list[str]

    def iter_chunks(self, start: int, chunk_rows: int) -> Iterator[Chunk]:
        """Chunks of at most ``chunk_rows`` rows from local row ``start`` (``Chunk.start`` is local)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What identifies the file's content for the resume journal (path, size, mtime)."""
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class NpySource(Source):
    """A single ``.npy`` array (single-input models), read chunk by chunk with plain reads.

    Reads rather than a memory map: mapped pages that were touched count in the process's
    resident memory until unmapped, so a mapped 4 GB file shows up as a 4 GB peak RSS.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        try:
            with open(path, "rb") as fh:
                stream = _NpyStream(fh, str(path))
                self.offset = fh.tell()
        except (ValueError, OSError) as exc:
            raise InputError(str(path), f"cannot be read as .npy ({exc})", fix="save it with numpy.save") from None
        self.shape, self.dtype, self.row_bytes = stream.shape, stream.dtype, stream.row_bytes
        self.rows = int(self.shape[0])
        self.columns = [name]

    def iter_chunks(self, start: int, chunk_rows: int) -> Iterator[Chunk]:
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.offset + start * self.row_bytes)
            stream = _NpyStream.__new__(_NpyStream)
            stream.fh, stream.shape, stream.dtype, stream.row_bytes = fh, self.shape, self.dtype, self.row_bytes
            for lo in range(start, self.rows, chunk_rows):
                yield Chunk(lo, {self.name: stream.read(min(chunk_rows, self.rows - lo))})


class _NpyStream:
    """Sequential reader of one C-ordered ``.npy`` stream (an ``.npz`` member, stored or deflated)."""

    def __init__(self, fh: BinaryIO, origin: str) -> None:
        self.fh = fh
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = reader(fh)
        if fortran and len(self.shape) > 1:
            raise InputError(origin, "is stored in Fortran order, which cannot be streamed",
                             fix="save it with np.ascontiguousarray(array)")
        if self.dtype.hasobject:
            raise InputError(origin, "holds Python objects (pickles), which are never loaded",
                             fix="save numeric arrays only")
        if not self.shape:
            raise InputError(origin, "holds a scalar, not rows", expected="an array with a batch axis",
                             got="0-D array")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, rows: int) -> np.ndarray:
        want = rows * self.row_bytes
        buf = bytearray(want)
        view = memoryview(buf)
        got = 0
        while got < want:
            n = self.fh.readinto(view[got:]) if hasattr(self.fh, "readinto") else None
            if n is None:
                data = self.fh.read(want - got)
                n = len(data)
                view[got:got + n] = data
            if not n:
                raise InputError("array data", "ends early (truncated file)", fix="write the file again")
            got += n
        return np.frombuffer(buf, dtype=self.dtype).reshape((rows, *self.shape[1:]))

    def skip(self, rows: int) -> None:
        remaining = rows * self.row_bytes
        while remaining:
            data = self.fh.read(min(remaining, 1 << 24))
            if not data:
                raise InputError("array data", "ends early (truncated file)", fix="write the file again")
            remaining -= len(data)


class NpzSource(Source):
    """An ``.npz`` whose keys are input names (and the id column); members are streamed."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.path = path
        self.names = list(names)
        try:
            with zipfile.ZipFile(path) as zf:
                from packager.package import check_npz_members

                check_npz_members(zf, path.stat().st_size, str(path))  # zip bombs, forged headers
                members = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
                missing = [n for n in self.names if n not in members]
                if missing:
                    raise InputError(str(path), f"has no array named {missing}", expected=self.names,
                                     got=sorted(members), fix="save the arrays with np.savez(path, name=array, ...)")
                self.members = {n: members[n] for n in self.names}
                rows = {}
                for name in self.names:
                    with zf.open(self.members[name]) as fh:
                        rows[name] = _NpyStream(fh, f"{path}:{name}").shape[0]
        except zipfile.BadZipFile as exc:
            raise InputError(str(path), f"is not a valid .npz ({exc})", fix="save it with numpy.savez") from None
        if len(set(rows.values())) > 1:
            raise InputError(str(path), "arrays have different numbers of rows",
                             expected="the same first dimension for every array", got=rows)
        self.rows = int(next(iter(rows.values()), 0))
        self.columns = self.names

    def iter_chunks(self, start: int, chunk_rows: int) -> Iterator[Chunk]:
        with zipfile.ZipFile(self.path) as zf:
            streams = {}
            handles = []
            try:
                for name in self.names:
                    fh = zf.open(self.members[name])
                    handles.append(fh)
                    streams[name] = _NpyStream(fh, f"{self.path}:{name}")
                    streams[name].skip(start)
                for lo in range(start, self.rows, chunk_rows):
                    n = min(chunk_rows, self.rows - lo)
                    yield Chunk(lo, {name: s.read(n) for name, s in streams.items()})
            finally:
                for fh in handles:
                    fh.close()


class ParquetSource(Source):
    """A Parquet file: one column per input; tensors as (fixed-size) list columns."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        pq = _pq()
        self.path = path
        self.names = list(names)
        try:
            self.file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
            raise InputError(str(path), f"cannot be read as Parquet ({exc})") from None
        schema = self.file.schema_arrow
        missing = [n for n in self.names if n not in schema.names]
        if missing:
            raise InputError(str(path), f"has no column named {missing}", expected=self.names, got=schema.names,
                             fix="write one column per input, named like the signature's inputs")
        self.schema = schema
        self.meta_shapes = {}
        for name in self.names:
            meta = schema.field(name).metadata or {}
            if SHAPE_KEY in meta:
                self.meta_shapes[name] = meta_shape(meta[SHAPE_KEY], f"{path}: column {name!r}")
        self.rows = int(self.file.metadata.num_rows)
        self.columns = self.names

    def iter_chunks(self, start: int, chunk_rows: int) -> Iterator[Chunk]:
        meta = self.file.metadata
        groups, offset, skip = [], 0, 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if offset + n > start:
                if not groups:
                    skip = start - offset
                groups.append(i)
            offset += n
        if not groups:
            return
        pos = start
        pending: list[Any] = []
        pending_rows = 0
        for batch in self.file.iter_batches(batch_size=chunk_rows, row_groups=groups, columns=self.names,
                                            use_threads=False):
            if skip:
                cut = min(skip, batch.num_rows)
                batch = batch.slice(cut)
                skip -= cut
            if batch.num_rows == 0:
                continue
            pending.append(batch)
            pending_rows += batch.num_rows
            # iter_batches may hand out short batches at row-group ends; regroup to chunk_rows.
            while pending_rows >= chunk_rows:
                table = _pa().Table.from_batches(pending)
                head, rest = table.slice(0, chunk_rows), table.slice(chunk_rows)
                yield self._chunk(pos, head)
                pos += chunk_rows
                pending = rest.to_batches()
                pending_rows = rest.num_rows
        if pending_rows:
            yield self._chunk(pos, _pa().Table.from_batches(pending))

    def _chunk(self, start: int, table: Any) -> Chunk:
        return Chunk(start, {name: table.column(name) for name in self.names})


@dataclass
class Dataset:
    """An input dataset: one file or the sorted shards of a folder, read as one row sequence."""

    path: Path
    sources: list[Source]
    kind: str  # "npy", "npz" or "parquet"
    id_column: str | None = None

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)

    def identity(self) -> list[dict[str, Any]]:
        return [s.identity() for s in self.sources]

    def iter_chunks(self, start: int, chunk_rows: int, signature: Signature) -> Iterator[Chunk]:
        """Chunks of at most ``chunk_rows`` rows, beginning at global row ``start``.

        Chunks never span two shards, so a shard's last chunk may be short.
        """
        offset = 0
        specs = {s.name: s for s in signature.inputs}
        # Parquet is read in blocks of whole chunks (up to 64k rows / 8 MB): Arrow's per-call costs
        # then vanish, and splitting a converted block into chunks is free (numpy views).
        per_block = max(1, min(65536 // chunk_rows, (8 << 20) // max(1, chunk_rows * row_nbytes(signature))))
        for source in self.sources:
            if offset + source.rows <= start:
                offset += source.rows
                continue
            block = chunk_rows * per_block if isinstance(source, ParquetSource) else chunk_rows
            for chunk in source.iter_chunks(max(0, start - offset), block):
                chunk.start += offset
                chunk = _finish_chunk(chunk, specs, self.id_column, str(source.path),
                                      getattr(source, "meta_shapes", {}))
                yield from _split(chunk, chunk_rows)
            offset += source.rows


def _split(chunk: Chunk, rows: int) -> Iterator[Chunk]:
    """Consecutive pieces of at most ``rows`` rows (views, no copies)."""
    if chunk.rows <= rows:
        yield chunk
        return
    for lo in range(0, chunk.rows, rows):
        hi = lo + rows
        yield Chunk(chunk.start + lo, {k: v[lo:hi] for k, v in chunk.arrays.items()},
                    None if chunk.ids is None else chunk.ids[lo:hi],
                    {r - lo: why for r, why in chunk.bad.items() if lo <= r < hi})


def row_nbytes(signature: Signature) -> int:
    """Bytes of one input row (dynamic dimensions at their example size)."""
    total = 0
    for spec in signature.inputs:
        size = 1
        for dim in row_shape(spec):
            size *= dim if isinstance(dim, int) else signature.dim(dim).example_size(dim)
        total += size * (2 if spec.dtype == "bfloat16" else np.dtype(spec.dtype).itemsize)
    return total


def _finish_chunk(chunk: Chunk, specs: dict[str, TensorSpec], id_column: str | None, origin: str,
                  meta_shapes: dict[str, list[int]]) -> Chunk:
    """Turn Arrow columns into arrays (marking bad rows) and split off the id column."""
    bad: dict[int, str] = {}
    arrays: dict[str, np.ndarray] = {}
    ids = None
    for name, column in chunk.arrays.items():
        if name == id_column:
            ids = column if isinstance(column, np.ndarray) else _arrow_ids(column)
            continue
        if isinstance(column, np.ndarray):
            arrays[name] = column
        else:
            arrays[name] = arrow_to_array(column, specs[name], bad, f"{origin}: column {name!r}",
                                          meta_shapes.get(name))
    return Chunk(chunk.start, arrays, ids, bad)


def _arrow_ids(column: Any) -> np.ndarray:
    values = np.asarray(column.to_numpy(zero_copy_only=False))
    # Strings come back as objects; np.save would pickle those, so make them fixed-width unicode.
    return values.astype(str) if values.dtype == object else values


def arrow_to_array(column: Any, spec: TensorSpec, bad: dict[int, str], origin: str,
                   meta_shape: list[int] | None = None) -> np.ndarray:
    """A (chunked) Arrow column of ``spec`` as a batch-first array; unusable rows go to ``bad``.

    Tensors are (possibly nested) list or fixed-size-list columns flattened in C order. Rows
    whose element count does not fit the signature's shape, or that hold nulls, are recorded
    in ``bad`` and filled with zeros, so their neighbours still run.

    Args:
        column: The Arrow column.
        spec: The input's spec (dtype and shape).
        bad: Local row index -> reason; filled in place.
        origin: Text naming the file and column, for messages.
        meta_shape: Per-row shape stored in the field's metadata (by :func:`to_arrow_table`).
    """
    pa, pc = _pa(), _pc()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    if spec.dtype == "bfloat16":
        raise InputError(origin, "bfloat16 tensors cannot be read from Parquet", fix="store them as float32")
    dtype = np.dtype(spec.dtype)
    shape = list(row_shape(spec))
    if column.null_count:
        for i in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)):
            bad.setdefault(int(i), "value is null")
    is_list = (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
               or pa.types.is_fixed_size_list(column.type))
    if not shape:  # one scalar per row
        if is_list:
            raise InputError(origin, "holds lists but the input is one scalar per row", expected=spec.shape_str(),
                             got=str(column.type))
        values = column.fill_null(0) if column.null_count else column
        return _as_dtype(values.to_numpy(zero_copy_only=False), dtype, origin)
    if not is_list:
        raise InputError(origin, "is not a list column but the input is a tensor",
                         expected=f"a list of {spec.dtype} values per row (shape {spec.shape_str()})",
                         got=str(column.type), fix="store each row's tensor as a (fixed-size) list, flattened in "
                         "C order")
    fast = _fixed_size_values(column, pa)
    if fast is not None:  # fixed-size lists without nulls: no per-row bookkeeping at all
        sizes, flat = fast
        per_row = _resolve_row_shape(shape, meta_shape, np.full(n, int(np.prod(sizes)), np.int64), bad, origin)
        if int(np.prod(per_row, dtype=np.int64)) == int(np.prod(sizes, dtype=np.int64)):
            return _as_dtype(flat.to_numpy(zero_copy_only=False), dtype, origin).reshape((n, *per_row))
    # Flatten every nesting level, remembering which row each scalar came from.
    flat = column
    row_index = np.arange(n)
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        lens = pc.list_value_length(flat).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        row_index = np.repeat(row_index, lens)
        flat = flat.flatten()
    counts = np.bincount(row_index, minlength=n).astype(np.int64)
    per_row = _resolve_row_shape(shape, meta_shape, counts, bad, origin)
    size = int(np.prod(per_row, dtype=np.int64))
    if flat.null_count:
        for r in np.unique(row_index[flat.is_null().to_numpy(zero_copy_only=False)]):
            bad.setdefault(int(r), "tensor holds a null element")
        flat = flat.fill_null(0)
    scalars = _as_dtype(flat.to_numpy(zero_copy_only=False), dtype, origin)
    wrong = np.flatnonzero(counts != size)
    if len(wrong) == 0:
        return scalars.reshape((n, *per_row))
    for r in wrong:
        bad.setdefault(int(r), f"wrong shape: row holds {int(counts[r])} values but shape {list(per_row)} "
                       f"needs {size}")
    out = np.zeros((n, size), dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for r in np.flatnonzero(counts == size):
        out[r] = scalars[starts[r]:starts[r] + size]
    return out.reshape((n, *per_row))


def _fixed_size_values(column: Any, pa: Any) -> tuple[list[int], Any] | None:
    """(list sizes per level, flat values) when every level is a null-free fixed-size list."""
    sizes = []
    cur = column
    while pa.types.is_fixed_size_list(cur.type):
        if cur.null_count:
            return None
        sizes.append(cur.type.list_size)
        cur = cur.flatten()  # honours the array's offset, unlike .values
    if pa.types.is_list(cur.type) or pa.types.is_large_list(cur.type) or cur.null_count:
        return None
    return sizes, cur


def meta_shape(raw: bytes | str, origin: str) -> list[int]:
    """A column's per-row shape from its Parquet field metadata (written by :func:`to_arrow_table`).

    The file may come from anyone: the value must be a short JSON list of dimension sizes.

    Raises:
        InputError: It is not (exit 2).
    """
    try:
        shape = json.loads(raw)
    except (ValueError, RecursionError):
        shape = None
    if (not isinstance(shape, list) or len(shape) > 32
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        raise InputError(origin, f"has field metadata {SHAPE_KEY.decode()!r} that is not a per-row shape",
                         expected="a JSON list of at most 32 sizes, e.g. [3, 224, 224]",
                         got=text[:80] + ("..." if len(text) > 80 else ""),
                         fix="write the file with packager's writer (to_arrow_table), or drop that field metadata")
    return shape


def _resolve_row_shape(shape: list[int | str], meta_shape: list[int] | None, counts: np.ndarray,
                       bad: dict[int, str], origin: str) -> tuple[int, ...]:
    """Concrete per-row shape: fixed dims from the signature; one dynamic dim from the length."""
    if meta_shape is not None and len(meta_shape) == len(shape):
        return tuple(int(d) for d in meta_shape)
    dynamic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    fixed = int(np.prod([d for d in shape if isinstance(d, int)], dtype=np.int64))
    if not dynamic:
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]
    if len(dynamic) > 1:
        raise InputError(origin, "has several dynamic dimensions, so its rows' shapes are ambiguous",
                         expected=f"one dynamic dimension in {shape}", got=len(dynamic),
                         fix="store it as .npy/.npz instead of Parquet")
    good = [int(c) for i, c in enumerate(counts) if i not in bad and c > 0]
    if not good:
        return tuple(1 if isinstance(d, str) else d for d in shape)  # type: ignore[misc]
    # The chunk's rows must share one size; the most common length wins, others are rejected.
    values, freq = np.unique(good, return_counts=True)
    total = int(values[np.argmax(freq)])
    if total % max(fixed, 1):
        return tuple(1 if isinstance(d, str) else d for d in shape)  # type: ignore[misc]
    out = list(shape)
    out[dynamic[0]] = total // max(fixed, 1)
    return tuple(int(d) for d in out)  # type: ignore[arg-type]


def _as_dtype(values: np.ndarray, dtype: np.dtype, origin: str) -> np.ndarray:
    """Values as read; a dtype other than the signature's is left for the runner's cast policy.

    The runner's FeedValidator applies ``--cast strict|safe`` with its own message and fix, so
    Parquet columns follow exactly the same dtype rules as arrays from ``.npy``/``.npz``.
    """
    return values


def _require_regular(path: Path) -> None:
    """Refuse FIFOs, sockets and devices: reading them blocks forever or never ends (row counts are unknown)."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a regular file is fine
    except OSError as exc:
        raise InputError(str(path), f"cannot be read ({exc.strerror})", fix="pass a readable file") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise InputError(str(path), f"is {kind}, not a regular file", expected="a regular .npy, .npz or .parquet "
                         "file (its size and row count are read before the run starts)", got=kind,
                         fix="write the data to a file first (e.g. cat PIPE > data.npz) and pass that file")


def open_dataset(path: str | Path, signature: Signature, id_column: str | None = None) -> Dataset:
    """Open a ``.npy``/``.npz``/``.parquet`` file or a folder of such shards.

    Raises:
        InputError: The path is missing, of an unknown kind, mixes kinds, or lacks an input.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "does not exist", fix="pass an existing .npy, .npz or .parquet file, "
                         "or a folder of them")
    if path.is_dir():
        candidates = [p for p in path.iterdir() if p.suffix in SUFFIXES and not p.name.startswith((".", "_"))
                      and not p.is_dir()]
        for candidate in candidates:
            _require_regular(candidate)
        files = sorted(candidates)
        if not files:
            raise InputError(str(path), "holds no dataset shards", expected=f"files ending in {', '.join(SUFFIXES)}",
                             got="none", fix="point --input at a file or a folder of shards")
        kinds = {p.suffix for p in files}
        if len(kinds) > 1:
            raise InputError(str(path), "mixes shard formats", expected="one of .npy, .npz, .parquet",
                             got=sorted(kinds), fix="keep one format per folder")
    else:
        _require_regular(path)
        files = [path]
        if path.suffix not in SUFFIXES:
            raise InputError(str(path), "has an unsupported format", expected=", ".join(SUFFIXES),
                             got=path.suffix or "no suffix")
    kind = files[0].suffix[1:]
    names = signature.input_names + ([id_column] if id_column else [])
    sources: list[Source] = []
    for file in files:
        if kind == "npy":
            if len(signature.inputs) != 1:
                raise InputError(str(file), "is one array but the model has several inputs",
                                 expected=signature.input_names, got="one .npy array",
                                 fix="pass an .npz whose keys are the input names, or Parquet")
            if id_column:
                raise UsageError("--id-column", "needs a dataset with named columns", expected=".npz or Parquet",
                                 got=".npy", fix="drop --id-column or store the ids in an .npz/Parquet input")
            sources.append(NpySource(file, signature.inputs[0].name))
        elif kind == "npz":
            sources.append(NpzSource(file, names))
        else:
            sources.append(ParquetSource(file, names))
    return Dataset(path, sources, kind, id_column)


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------
def to_arrow_table(arrays: dict[str, np.ndarray]) -> Any:
    """Arrow table from batch-first arrays: tensors become fixed-size lists with their shape in metadata."""
    pa = _pa()
    fields, columns = [], []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.ndim <= 1:
            col = pa.array(arr)
            fields.append(pa.field(name, col.type))
        else:
            size = int(np.prod(arr.shape[1:], dtype=np.int64))
            col = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), size)
            fields.append(pa.field(name, col.type, metadata={SHAPE_KEY: json.dumps(list(arr.shape[1:]))}))
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def arrow_table_to_arrays(table: Any) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_arrow_table`: shapes from field metadata, else from the list sizes."""
    pa = _pa()
    out = {}
    for fld in table.schema:
        col = table.column(fld.name)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        meta = fld.metadata or {}
        n = len(col)
        if pa.types.is_fixed_size_list(col.type):
            sizes = []
            while pa.types.is_fixed_size_list(col.type):
                sizes.append(col.type.list_size)
                col = col.flatten()
            shape = meta_shape(meta[SHAPE_KEY], f"column {fld.name!r}") if SHAPE_KEY in meta else sizes
            out[fld.name] = col.to_numpy(zero_copy_only=False).reshape((n, *shape))
        else:
            values = np.asarray(col.to_numpy(zero_copy_only=False))
            out[fld.name] = values.astype(str) if values.dtype == object else values
    return out


def write_arrays(path: Path, arrays: dict[str, np.ndarray], fmt: str, compress: bool = True) -> None:
    """Write batch-first arrays as ``npz`` (uncompressed) or ``parquet`` to ``path`` atomically.

    ``compress=False`` writes uncompressed Parquet (temporary shards that are read back once).
    """
    tmp = atomic_path(path)
    try:
        if fmt == "npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        elif fmt == "parquet":
            _pq().write_table(to_arrow_table(arrays), tmp, **({} if compress else {"compression": "NONE"}))
        elif fmt == "npy":
            (value,) = arrays.values()
            with open(tmp, "wb") as fh:
                np.save(fh, value)
        else:  # pragma: no cover - formats are checked by the CLI
            raise UsageError("output format", "is unknown", expected="npz, parquet or npy", got=fmt)
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read a shard written by :func:`write_arrays`."""
    if path.suffix == ".parquet":
        return arrow_table_to_arrays(_pq().read_table(path))
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class StreamingNpzWriter:
    """Writes an ``.npz`` whose arrays arrive in row blocks, holding one block at a time.

    numpy's savez needs whole arrays; here each member is a ZIP64 entry written in order:
    the ``.npy`` header carries the final row count, then the rows are appended.
    """

    def __init__(self, path: Path) -> None:
        self.zf = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write_member(self, name: str, rows: int, row_shape: tuple[int, ...], dtype: np.dtype,
                     blocks: Iterator[np.ndarray]) -> None:
        with self.zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": (rows, *row_shape)}
            np.lib.format.write_array_header_2_0(fh, header)
            written = 0
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                _write_block(fh, block)
                written += block.shape[0]
            if written != rows:  # pragma: no cover - guarded by the journal's counts
                raise RuntimeError(f"npz member {name}: wrote {written} rows, header says {rows}")

    def close(self) -> None:
        self.zf.close()


def _write_block(fh: Any, block: np.ndarray) -> None:
    if block.size:  # a zero-size view cannot be cast to bytes (and has none to write)
        fh.write(memoryview(block.reshape(-1)).cast("B"))


def _pa() -> Any:
    from packager.errors import require

    return require("pyarrow", purpose="read and write Parquet")


def _pc() -> Any:
    _pa()
    import pyarrow.compute as pc

    return pc


def _pq() -> Any:
    _pa()
    import pyarrow.parquet as pq

    return pq
