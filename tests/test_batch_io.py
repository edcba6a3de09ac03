"""Dataset readers/writers of ``packager run``: streaming, Parquet tensors, bad rows, npz streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packager.batch.core import default_batch_size, fixed_batch_size
from packager.batch.io import (SHAPE_KEY, StreamingNpzWriter, arrow_table_to_arrays, arrow_to_array, open_dataset,
                               to_arrow_table)
from packager.errors import InputError, UsageError
from packager.signature import Signature, TensorSpec

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SIG = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=("batch", 2, 3))],
                outputs=[TensorSpec(name="y", dtype="float32", shape=("batch", 4))])
SIG2 = Signature(inputs=[TensorSpec(name="a", dtype="float32", shape=("batch", 3)),
                         TensorSpec(name="b", dtype="int64", shape=("batch",))])


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, 3)).astype(np.float32)


def _collect(ds, sig: Signature, start: int = 0, chunk: int = 7) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    starts = []
    for c in ds.iter_chunks(start, chunk, sig):
        starts.append(c.start)
        assert not c.bad
        for k, v in c.arrays.items():
            assert v.shape[0] <= chunk
            parts.setdefault(k, []).append(v)
    assert starts == sorted(starts) and (not starts or starts[0] == start)
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.mark.parametrize("start", [0, 5, 14, 49, 50])
def test_npy_npz_parquet_and_folders_read_the_same_rows(tmp_path: Path, start: int) -> None:
    x = _rows(50)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    np.savez_compressed(tmp_path / "xc.npz", x=x)
    pq.write_table(to_arrow_table({"x": x}), tmp_path / "x.parquet", row_group_size=8)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (lo, hi) in enumerate([(0, 13), (13, 13), (13, 40), (40, 50)]):  # includes an empty shard
        pq.write_table(to_arrow_table({"x": x[lo:hi]}), shards / f"part-{i}.parquet", row_group_size=5)
    for path in ("x.npy", "x.npz", "xc.npz", "x.parquet", "shards"):
        ds = open_dataset(tmp_path / path, SIG)
        assert ds.rows == 50
        got = _collect(ds, SIG, start)
        np.testing.assert_array_equal(got.get("x", np.zeros((0, 2, 3), np.float32)), x[start:], err_msg=path)


def test_parquet_variable_lists_nulls_and_wrong_lengths_mark_only_those_rows(tmp_path: Path) -> None:
    x = _rows(6).reshape(6, -1)
    rows = [list(r) for r in x]
    rows[1] = rows[1][:4]  # wrong length
    rows[3] = None  # null row
    rows[4] = [None] + rows[4][1:]  # null element
    table = pa.table({"x": pa.array(rows, type=pa.list_(pa.float32())), "id": [f"r{i}" for i in range(6)]})
    pq.write_table(table, tmp_path / "bad.parquet")
    ds = open_dataset(tmp_path / "bad.parquet", SIG, id_column="id")
    (chunk,) = list(ds.iter_chunks(0, 100, SIG))
    assert sorted(chunk.bad) == [1, 3, 4]
    assert "wrong shape" in chunk.bad[1] and "null" in chunk.bad[3] and "null" in chunk.bad[4]
    for r in (0, 2, 5):
        np.testing.assert_array_equal(chunk.arrays["x"][r], x[r].reshape(2, 3))
    assert list(chunk.ids) == [f"r{i}" for i in range(6)]


def test_parquet_shape_from_metadata_and_scalar_columns(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.arange(4, dtype=np.int64)
    table = to_arrow_table({"a": a, "b": b})
    assert json.loads(table.schema.field("a").metadata[SHAPE_KEY]) == [3]
    back = arrow_table_to_arrays(table)
    np.testing.assert_array_equal(back["a"], a)
    np.testing.assert_array_equal(back["b"], b)
    bad: dict[int, str] = {}
    seq = TensorSpec(name="s", dtype="int64", shape=("batch", "seq"))
    col = pa.array([[1, 2, 3], [4, 5, 6], [7, 8]], type=pa.list_(pa.int64()))
    arr = arrow_to_array(col, seq, bad, "s")  # one dynamic dim: length from the rows
    assert arr.shape == (3, 3) and list(bad) == [2]


def test_wrong_column_dtype_and_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": pa.array([[1.0, 2.0, 3.0]], type=pa.list_(pa.float64())),
                             "b": pa.array([1.5])}), tmp_path / "t.parquet")
    ds = open_dataset(tmp_path / "t.parquet", SIG2)
    (chunk,) = ds.iter_chunks(0, 10, SIG2)  # dtypes pass through: the runner's --cast policy decides
    assert chunk.arrays["a"].dtype == np.float64 and chunk.arrays["b"].dtype == np.float64
    np.savez(tmp_path / "t.npz", a=np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match=r"no array named \['b'\]"):
        open_dataset(tmp_path / "t.npz", SIG2)
    with pytest.raises(InputError, match="several inputs"):
        np.save(tmp_path / "t.npy", np.zeros((2, 3)))
        open_dataset(tmp_path / "t.npy", SIG2)
    with pytest.raises(UsageError, match="named columns"):
        open_dataset(tmp_path / "t.npy", SIG, id_column="id")
    with pytest.raises(InputError, match="does not exist"):
        open_dataset(tmp_path / "nope.npy", SIG)
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a.npy", np.zeros((1, 2, 3), np.float32))
    pq.write_table(to_arrow_table({"x": _rows(1)}), tmp_path / "mixed" / "b.parquet")
    with pytest.raises(InputError, match="mixes shard formats"):
        open_dataset(tmp_path / "mixed", SIG)


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, 9), min_size=0, max_size=6), width=st.integers(1, 4))
def test_streaming_npz_writer_matches_numpy(tmp_path_factory: pytest.TempPathFactory, rows: list[int],
                                            width: int) -> None:
    path = tmp_path_factory.mktemp("npz") / "out.npz"
    blocks = [np.random.default_rng(i).standard_normal((n, width)).astype(np.float32) for i, n in enumerate(rows)]
    writer = StreamingNpzWriter(path)
    writer.write_member("y", sum(rows), (width,), np.dtype(np.float32), iter(blocks))
    writer.write_member("id", sum(rows), (), np.dtype(np.int64), iter([np.arange(sum(rows))]))
    writer.close()
    with np.load(path) as data:
        expected = np.concatenate(blocks) if blocks else np.zeros((0, width), np.float32)
        np.testing.assert_array_equal(data["y"], expected)
        np.testing.assert_array_equal(data["id"], np.arange(sum(rows)))


def test_default_batch_size_follows_signature_and_model_size() -> None:
    small = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=("batch", 16))])
    image = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=("batch", 3, 224, 224))])
    seq = Signature(inputs=[TensorSpec(name="ids", dtype="int64", shape=("batch", "seq"))])
    fixed = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=(8, 16))])
    assert default_batch_size(small) == 4096
    assert default_batch_size(image) == 1  # 600 KB per row
    assert default_batch_size(small, model_bytes=300 << 20) == 32
    assert default_batch_size(seq) <= 512
    assert fixed_batch_size(fixed) == 8 and default_batch_size(fixed) == 8
    assert fixed_batch_size(small) is None
