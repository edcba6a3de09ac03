"""``packager bench``: real timings, a record outside the package, and ``--runtime auto``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from packager.batch import RunConfig, run_dataset
from packager.bench import bench, load_record, record_path
from packager.errors import UsageError
from packager.package import Package
from tests.conftest import run_cli


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PACKAGER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bench_reports_percentiles_and_records_outside_the_package(mlp_onnx_package: Path, cache: Path) -> None:
    before = sorted(p.relative_to(mlp_onnx_package) for p in mlp_onnx_package.rglob("*"))
    report = bench(mlp_onnx_package, batch_sizes=[1, 64], min_time=0.05, max_iters=200)
    assert [(r.format, r.runtime, r.device, r.batch_size) for r in report.rows] == [
        ("onnx", "onnxruntime", "cpu", 1), ("onnx", "onnxruntime", "cpu", 64)]
    for row in report.rows:
        assert row.error is None and row.iterations >= 5
        assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms
        assert row.rows_per_s > 0
        # rows/s comes from the statistic the table shows (the median, p50), not from a mean
        # (p50_ms is rounded to 1e-4 ms, rows/s to 0.1)
        median_ms = row.batch_size * 1e3 / row.rows_per_s
        assert abs(median_ms - row.p50_ms) <= 5e-5 + 1e-3 * row.p50_ms
        assert row.spread == pytest.approx(row.p90_ms / row.p50_ms, abs=1e-3)
    assert report.fastest["cpu"]["runtime"] == "onnxruntime" and report.fastest["cpu"]["batch_size"] == 64
    path = Path(report.record_path)
    assert path == record_path(mlp_onnx_package) and path.is_relative_to(cache)
    assert load_record(mlp_onnx_package)["fastest"]["cpu"]["format"] == "onnx"
    # the package is untouched: same files, and its integrity check still passes
    assert sorted(p.relative_to(mlp_onnx_package) for p in mlp_onnx_package.rglob("*")) == before
    Package(mlp_onnx_package, verify=True)
    with pytest.raises(UsageError):
        bench(mlp_onnx_package, formats=["torchscript"])


def test_runs_that_vary_too_much_are_flagged() -> None:
    from packager.bench import UNSTABLE_SPREAD, BenchRow

    steady = BenchRow("onnx", "onnxruntime", "cpu", 1, p50_ms=1.0, p90_ms=1.1, spread=1.1)
    noisy = BenchRow("onnx", "onnxruntime", "cpu", 1, p50_ms=1.0, p90_ms=2.0, spread=2.0)
    assert not steady.unstable and noisy.unstable and UNSTABLE_SPREAD == 1.5


def test_absent_device_is_an_error_row_not_a_crash(mlp_onnx_package: Path, cache: Path) -> None:
    report = bench(mlp_onnx_package, devices=["cpu", "cuda"], batch_sizes=[8], min_time=0.01, record=False)
    errors = {r.device: r.error for r in report.rows}
    assert errors["cpu"] is None and errors["cuda"] and "cuda" in errors["cuda"].lower()
    assert report.record_path is None and load_record(mlp_onnx_package) is None


@pytest.mark.torch
def test_runtime_auto_uses_the_recorded_fastest(torch_cnn_package: Path, cache: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    summary = run_dataset(torch_cnn_package, tmp_path / "x.npy", tmp_path / "a.npz", runtime="auto")
    assert summary.runtime == "onnxruntime" and "no benchmark" in summary.notes[0]
    report = bench(torch_cnn_package, runtimes=["onnxruntime", "torchscript"], batch_sizes=[8], min_time=0.05)
    best = report.fastest["cpu"]
    summary = run_dataset(torch_cnn_package, tmp_path / "x.npy", tmp_path / "b.npz", runtime="auto")
    assert (summary.runtime, summary.format) == (best["runtime"], best["format"])
    assert "--runtime auto chose" in summary.notes[0]
    # A record naming the other runtime is followed too: the choice comes from the record.
    path = Path(report.record_path)
    data = json.loads(path.read_text())
    other = "torchscript" if best["runtime"] == "onnxruntime" else "onnxruntime"
    data["fastest"]["cpu"].update(runtime=other, format="torchscript" if other == "torchscript" else "onnx")
    path.write_text(json.dumps(data))
    summary = run_dataset(torch_cnn_package, tmp_path / "x.npy", tmp_path / "c.npz", runtime="auto",
                          config=RunConfig(batch_size=8))
    assert summary.runtime == other


def test_cli_bench_table_and_json(mlp_onnx_package: Path, tmp_path: Path) -> None:
    env = {"PACKAGER_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
    proc = run_cli("bench", str(mlp_onnx_package), "-b", "1,16", "--min-time", "0.05", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [r["batch_size"] for r in data["rows"]] == [1, 16] and data["fastest"]["cpu"]["runtime"] == "onnxruntime"
    table = run_cli("bench", str(mlp_onnx_package), "-b", "4", "--min-time", "0.02", "--no-record", env=env)
    assert table.returncode == 0 and "p99 ms" in table.stdout and "fastest on cpu" in table.stdout
    bad = run_cli("bench", str(mlp_onnx_package), "-b", "x", env=env)
    assert bad.returncode == 2 and "not an integer" in bad.stderr
