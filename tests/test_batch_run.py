"""``packager run`` end to end on real runtimes: formats, ids, bad rows, padding, errors, lazy imports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import runtimes
from packager.batch import RunConfig, run_dataset
from packager.batch.sink import OUTPUT_FORMATS
from packager.errors import DeviceError, ExistsError, FeedError, InputError, RuntimeLoadError, UsageError
from tests.conftest import run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _reference(package: Path, x: np.ndarray) -> np.ndarray:
    with runtimes.load(package) as runner:
        (name,) = runner.signature.output_names
        return runner.run({runner.signature.input_names[0]: x})[name]


def _read_output(path: Path) -> dict[str, np.ndarray]:
    from packager.batch.io import arrow_table_to_arrays

    if path.is_dir():
        parts = [_read_output(p) for p in sorted(path.iterdir())]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if path.suffix == ".parquet":
        return arrow_table_to_arrays(pq.read_table(path))
    if path.suffix == ".npy":
        return {"output": np.load(path)}
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 1000 rows (16 features, ids 'r0'..) as .npy, .npz, Parquet and a folder of Parquet shards."""
    from packager.batch.io import to_arrow_table

    root = tmp_path_factory.mktemp("batchdata")
    x = np.random.default_rng(3).standard_normal((1000, 16)).astype(np.float32)
    ids = np.array([f"r{i}" for i in range(1000)])
    np.save(root / "x.npy", x)
    np.savez(root / "x.npz", x=x, id=ids)
    pq.write_table(to_arrow_table({"id": ids, "x": x}), root / "x.parquet", row_group_size=300)
    (root / "shards").mkdir()
    for i, lo in enumerate(range(0, 1000, 400)):
        pq.write_table(to_arrow_table({"id": ids[lo:lo + 400], "x": x[lo:lo + 400]}),
                       root / "shards" / f"part-{i:03d}.parquet")
    return {"root": root, "npy": root / "x.npy", "npz": root / "x.npz", "parquet": root / "x.parquet",
            "dir": root / "shards"}


@pytest.mark.parametrize("source,target", [("npy", "out.npz"), ("npz", "out.parquet"), ("parquet", "out.npy"),
                                           ("dir", "outdir/"), ("parquet", "out.npz"), ("npy", "outdir2/")])
def test_every_format_gives_the_runtime_outputs_in_input_order(mlp_onnx_package: Path, data: dict[str, Path],
                                                               tmp_path: Path, source: str, target: str) -> None:
    x = np.load(data["npy"])
    expected = _reference(mlp_onnx_package, x)
    out = tmp_path / target
    config = RunConfig(batch_size=96, shard_rows=250, id_column=None)
    summary = run_dataset(mlp_onnx_package, data[source], str(out), config=config)
    assert summary.rows == summary.written == 1000 and summary.rejected == 0
    got = _read_output(Path(summary.output))
    np.testing.assert_allclose(got["output"], expected, rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.glob(".*")), "temp files or journal left behind"
    if target.endswith("/"):
        assert len(list(Path(summary.output).iterdir())) == 4  # 1000 rows / 250 rows per shard


def test_id_column_is_carried_through_npz_and_parquet(mlp_onnx_package: Path, data: dict[str, Path],
                                                      tmp_path: Path) -> None:
    for source, target in (("npz", "o.npz"), ("dir", "o.parquet")):
        summary = run_dataset(mlp_onnx_package, data[source], tmp_path / target,
                              config=RunConfig(id_column="id", batch_size=128))
        got = _read_output(Path(summary.output))
        assert list(got["id"]) == [f"r{i}" for i in range(1000)]


def test_skip_writes_bad_rows_to_rejects_and_keeps_the_good_ones(mlp_onnx_package: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    x[7, 2] = np.nan
    x[128, 0] = np.inf  # first row of the second batch
    x[299, 15] = np.nan  # last row
    rows = [list(r) for r in x]
    rows[50] = rows[50][:3]  # wrong shape
    rows[51] = None  # null
    table = pa.table({"id": np.arange(300) * 10, "x": pa.array(rows, type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=64)
    out = tmp_path / "out.npz"
    summary = run_dataset(mlp_onnx_package, tmp_path / "in.parquet", out,
                          config=RunConfig(batch_size=128, on_error="skip", id_column="id"))
    bad = [7, 50, 51, 128, 299]
    assert summary.rejected == 5 and summary.written == 295
    rejects = [json.loads(line) for line in Path(summary.rejects).read_text().splitlines()]
    assert [r["row"] for r in rejects] == bad
    assert [r["id"] for r in rejects] == [b * 10 for b in bad]
    assert "NaN" in rejects[0]["reason"] and "wrong shape" in rejects[1]["reason"] and "null" in rejects[2]["reason"]
    good = np.setdiff1d(np.arange(300), bad)
    got = _read_output(out)
    np.testing.assert_array_equal(got["id"], good * 10)
    np.testing.assert_allclose(got["output"], _reference(mlp_onnx_package, x[good]), rtol=1e-6, atol=1e-6)
    # --allow-nan lets the NaN rows through: only the unreadable rows are rejected
    summary = run_dataset(mlp_onnx_package, tmp_path / "in.parquet", tmp_path / "nan.npz",
                          config=RunConfig(batch_size=128, on_error="skip", allow_nan=True))
    assert summary.rejected == 2


def test_fail_names_the_first_bad_row(mlp_onnx_package: Path, tmp_path: Path) -> None:
    x = np.ones((40, 16), np.float32)
    x[33, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(InputError, match="row 33.*NaN") as info:
        run_dataset(mlp_onnx_package, tmp_path / "x.npy", tmp_path / "o.npz", config=RunConfig(batch_size=8))
    assert "--on-error skip" in str(info.value)
    assert not (tmp_path / "o.npz").exists()


def _gather_model(path: Path) -> Path:
    """ids:int64[batch,4] -> sum of rows of a 10-row table: ids >= 10 make ONNX Runtime fail."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["g"], axis=0),
         helper.make_node("ReduceSum", ["g", "axes"], ["out"], keepdims=0)], "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_rows_failing_inside_the_runtime_are_isolated(tmp_path: Path) -> None:
    model = _gather_model(tmp_path / "gather.onnx")
    ids = np.random.default_rng(0).integers(0, 10, (100, 4))
    ids[[3, 17, 64]] = 42
    np.save(tmp_path / "ids.npy", ids)
    summary = run_dataset(model, tmp_path / "ids.npy", tmp_path / "o.npz",
                          config=RunConfig(batch_size=32, on_error="skip"))
    assert summary.rejected == 3
    rejects = [json.loads(line) for line in Path(summary.rejects).read_text().splitlines()]
    assert [r["row"] for r in rejects] == [3, 17, 64]
    assert all("inference failed" in r["reason"] for r in rejects)
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    good = np.setdiff1d(np.arange(100), [3, 17, 64])
    np.testing.assert_allclose(_read_output(tmp_path / "o.npz")["out"], table[ids[good]].sum(axis=1))
    with pytest.raises(RuntimeLoadError, match="rows 0..31"):
        run_dataset(model, tmp_path / "ids.npy", tmp_path / "f.npz", config=RunConfig(batch_size=32))


def _fixed_model(path: Path, batch: int) -> tuple[Path, np.ndarray, np.ndarray]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((16, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path, w, b


def test_fixed_batch_artifacts_get_padded_batches_and_padding_is_dropped(tmp_path: Path) -> None:
    model, w, b = _fixed_model(tmp_path / "fixed.onnx", 8)
    x = np.random.default_rng(2).standard_normal((21, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for batch_size in (None, 10):
        out = tmp_path / f"o{batch_size}.npz"
        summary = run_dataset(model, tmp_path / "x.npy", out, config=RunConfig(batch_size=batch_size))
        assert summary.batch_size == (8 if batch_size is None else 16)
        got = _read_output(out)["y"]
        assert got.shape == (21, 4)
        np.testing.assert_allclose(got, x @ w + b, rtol=1e-5, atol=1e-5)
    assert any("multiple" in n for n in summary.notes)


def test_dataset_level_problems_are_errors_not_rejects(mlp_onnx_package: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "f64.npy", np.zeros((10, 16)))
    with pytest.raises(FeedError, match="wrong dtype"):
        run_dataset(mlp_onnx_package, tmp_path / "f64.npy", tmp_path / "o.npz",
                    config=RunConfig(on_error="skip"))
    with pytest.raises(FeedError, match="may lose information"):  # float64 -> float32 is never implicit
        run_dataset(mlp_onnx_package, tmp_path / "f64.npy", tmp_path / "o.npz", cast="safe")
    np.save(tmp_path / "wide.npy", np.zeros((10, 17), np.float32))
    with pytest.raises(FeedError, match="dimension 1"):
        run_dataset(mlp_onnx_package, tmp_path / "wide.npy", tmp_path / "o.npz")
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), np.float32))
    summary = run_dataset(mlp_onnx_package, tmp_path / "empty.npy", tmp_path / "e.npz")
    assert summary.rows == 0 and _read_output(tmp_path / "e.npz")["output"].shape == (0, 4)


def test_existing_output_needs_overwrite_and_bad_options_are_usage_errors(mlp_onnx_package: Path,
                                                                          data: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "o.npz"
    out.write_text("precious")
    with pytest.raises(ExistsError):
        run_dataset(mlp_onnx_package, data["npy"], out)
    assert out.read_text() == "precious"
    run_dataset(mlp_onnx_package, data["npy"], out, config=RunConfig(overwrite=True))
    assert _read_output(out)["output"].shape == (1000, 4)
    for config, match in ((RunConfig(on_error="ignore"), "--on-error"), (RunConfig(batch_size=0), "--batch-size"),
                          (RunConfig(engine="spark"), "--engine"), (RunConfig(output_format="csv"), "format"),
                          (RunConfig(id_column="output"), "id-column")):
        with pytest.raises(UsageError, match=match):
            run_dataset(mlp_onnx_package, data["npz"], tmp_path / "x.npz", config=config)
    with pytest.raises(UsageError, match="suffix disagrees"):
        run_dataset(mlp_onnx_package, data["npy"], tmp_path / "x.npz", config=RunConfig(output_format="parquet"))
    with pytest.raises(DeviceError):
        run_dataset(mlp_onnx_package, data["npy"], tmp_path / "x.npz", device="cuda")
    assert set(OUTPUT_FORMATS) == {"npz", "parquet", "npy"}


def test_threads_give_the_same_output(mlp_onnx_package: Path, data: dict[str, Path], tmp_path: Path) -> None:
    one = run_dataset(mlp_onnx_package, data["npy"], tmp_path / "a.npz", config=RunConfig(batch_size=64))
    two = run_dataset(mlp_onnx_package, data["npy"], tmp_path / "b.npz", config=RunConfig(batch_size=64, threads=3))
    np.testing.assert_array_equal(_read_output(Path(one.output))["output"], _read_output(Path(two.output))["output"])


def test_cli_run_progress_log_summary_and_exit_codes(mlp_onnx_package: Path, data: dict[str, Path],
                                                     tmp_path: Path) -> None:
    log = tmp_path / "progress.jsonl"
    out = tmp_path / "o.parquet"
    proc = run_cli("run", str(mlp_onnx_package), "-i", str(data["dir"]), "-o", str(out), "--id-column", "id",
                   "--progress-log", str(log), "--json", "--batch-size", "100")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["written"] == 1000 and summary["output"] == str(out)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["event"] == "done" and records[-1]["rows"] == 1000
    assert {"rows_per_s", "eta_s", "total"} <= set(records[0])
    again = run_cli("run", str(mlp_onnx_package), "-i", str(data["npy"]), "-o", str(out), "-q")
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    gpu = run_cli("run", str(mlp_onnx_package), "-i", str(data["npy"]), "-o", str(tmp_path / "g.npz"),
                  "--device", "cuda")
    assert gpu.returncode == 2 and "cuda" in gpu.stderr.lower() and "Traceback" not in gpu.stderr


_PROBE = """
import json, sys
from packager.cli import main
rc = main(sys.argv[1:])
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorflow', 'paddle', 'ray', 'pyarrow'})
print(json.dumps({'rc': rc, 'heavy': heavy}))
"""


def test_onnx_run_imports_no_framework_nor_ray_nor_pyarrow(mlp_onnx_package: Path, data: dict[str, Path],
                                                           tmp_path: Path) -> None:
    import subprocess

    def probe(*args: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = probe("run", str(mlp_onnx_package), "-i", str(data["npz"]), "-o", str(tmp_path / "o.npz"), "-q")
    assert result == {"rc": 0, "heavy": []}
    assert probe("--help")["heavy"] == []
    parquet = probe("run", str(mlp_onnx_package), "-i", str(data["parquet"]), "-o", str(tmp_path / "p.npz"), "-q")
    assert parquet == {"rc": 0, "heavy": ["pyarrow"]}


@pytest.mark.gpu
def test_cuda_run_matches_cpu(mlp_onnx_package: Path, data: dict[str, Path], tmp_path: Path) -> None:
    cpu = run_dataset(mlp_onnx_package, data["npy"], tmp_path / "c.npz")
    gpu = run_dataset(mlp_onnx_package, data["npy"], tmp_path / "g.npz", device="cuda")
    assert gpu.device == "cuda:0"
    np.testing.assert_allclose(_read_output(tmp_path / "g.npz")["output"], _read_output(tmp_path / "c.npz")["output"],
                               rtol=1e-3, atol=1e-4)


def test_quiet_run_still_says_what_it_wrote_and_rejected(mlp_onnx_package: Path, tmp_path: Path) -> None:
    """-q removes progress, not the one-line summary; --json (machine output) drops it (issue 18)."""
    x = np.zeros((10, 16), np.float32)
    x[[2, 7], 3] = np.nan  # two rows the run rejects
    np.save(tmp_path / "x.npy", x)
    proc = run_cli("run", str(mlp_onnx_package), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz"),
                   "-q", "--on-error", "skip")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote 8 of 10 rows to "), proc.stderr
    assert "2 rejected (see " in lines[0] and proc.stdout == ""
    machine = run_cli("run", str(mlp_onnx_package), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "z.npz"),
                      "-q", "--on-error", "skip", "--json")
    assert machine.returncode == 0 and machine.stderr.strip() == "", machine.stderr
    assert json.loads(machine.stdout)["rejected"] == 2
