"""``packager run --engine ray`` on a local two-CPU Ray instance: the same output, row for row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from packager.batch import RunConfig, run_dataset
from packager.batch.core import ChunkRunner
from packager.errors import DeviceError, InputError, UsageError
from tests.conftest import run_cli

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.slow  # a Ray instance takes seconds to start


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with two CPUs for every test here (the engine reuses it)."""
    from packager.batch.ray_engine import RUNTIME_ENV

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env=RUNTIME_ENV)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list[int]]:
    """3000 rows in three Parquet shards, with an id column and four bad rows."""
    import pyarrow as pa

    from packager.batch.io import to_arrow_table

    root = tmp_path_factory.mktemp("rayshards")
    x = np.random.default_rng(11).standard_normal((3000, 16)).astype(np.float32)
    bad = [0, 999, 1000, 2500]
    x[[0, 999, 2500], 5] = np.nan
    ids = np.arange(3000) + 100_000
    (root / "in").mkdir()
    for i, lo in enumerate(range(0, 3000, 1000)):
        table = to_arrow_table({"id": ids[lo:lo + 1000], "x": x[lo:lo + 1000]})
        if lo == 1000:  # a row with the wrong length: read-time rejection in the actor
            rows = [list(r) for r in x[lo:lo + 1000]]
            rows[0] = rows[0][:7]
            table = pa.table({"id": ids[lo:lo + 1000], "x": pa.array(rows, type=pa.list_(pa.float32()))})
        pq.write_table(table, root / "in" / f"part-{i}.parquet", row_group_size=250)
    np.save(root / "x.npy", np.nan_to_num(x))
    return root, x, bad


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_ray_matches_local_row_for_row_with_ids_and_rejects(local_ray, mlp_onnx_package: Path, shards,
                                                            tmp_path: Path) -> None:
    root, _, bad = shards
    config = dict(batch_size=200, on_error="skip", id_column="id")
    local = run_dataset(mlp_onnx_package, root / "in", tmp_path / "local.npz", config=RunConfig(**config))
    remote = run_dataset(mlp_onnx_package, root / "in", tmp_path / "ray.npz",
                         config=RunConfig(engine="ray", num_workers=2, **config))
    assert remote.engine == "ray" and remote.written == local.written == 3000 - len(bad)
    a, b = _load(local.output), _load(remote.output)
    np.testing.assert_array_equal(a["id"], b["id"])
    np.testing.assert_allclose(a["output"], b["output"], rtol=1e-5, atol=1e-6)
    ra = [json.loads(line) for line in Path(local.rejects).read_text().splitlines()]
    rb = [json.loads(line) for line in Path(remote.rejects).read_text().splitlines()]
    assert [r["row"] for r in rb] == bad and [r["id"] for r in rb] == [b + 100_000 for b in bad]
    assert [r["row"] for r in ra] == [r["row"] for r in rb]


def test_ray_npy_input_and_fail_mode_name_the_global_row(local_ray, mlp_onnx_package: Path, shards,
                                                         tmp_path: Path) -> None:
    root, x, _ = shards
    local = run_dataset(mlp_onnx_package, root / "x.npy", tmp_path / "l.parquet", config=RunConfig(batch_size=512))
    remote = run_dataset(mlp_onnx_package, root / "x.npy", tmp_path / "r.parquet",
                         config=RunConfig(batch_size=512, engine="ray", num_workers=1))
    pa_local, pa_ray = pq.read_table(local.output), pq.read_table(remote.output)
    assert pa_local.num_rows == pa_ray.num_rows == 3000
    np.testing.assert_allclose(np.stack(pa_local["output"].to_numpy(zero_copy_only=False)),
                               np.stack(pa_ray["output"].to_numpy(zero_copy_only=False)), rtol=1e-5, atol=1e-6)
    bad = np.nan_to_num(x)
    bad[1234, 0] = np.nan
    np.savez_compressed(tmp_path / "bad.npz", x=bad)  # .npz: read by the actors with the local readers
    with pytest.raises(InputError, match="row 1234:"):
        run_dataset(mlp_onnx_package, tmp_path / "bad.npz", tmp_path / "f.npz",
                    config=RunConfig(engine="ray", num_workers=1, batch_size=500))


def test_a_local_run_killed_midway_resumes_on_ray(local_ray, mlp_onnx_package: Path, shards, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, _, bad = shards
    config = dict(batch_size=250, shard_rows=500, on_error="skip", id_column="id")
    original = ChunkRunner.run_chunk
    calls = {"n": 0}

    def crash(self, chunk):  # fault injection: die after 7 batches (1750 rows; 3 shards journalled)
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return original(self, chunk)

    out = tmp_path / "o.npz"
    monkeypatch.setattr(ChunkRunner, "run_chunk", crash)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(mlp_onnx_package, root / "in", out, config=RunConfig(**config))
    monkeypatch.undo()
    summary = run_dataset(mlp_onnx_package, root / "in", out, config=RunConfig(engine="ray", num_workers=1, **config))
    assert summary.resumed_from == 1500  # the middle of the second shard file
    good = np.setdiff1d(np.arange(3000), bad) + 100_000
    np.testing.assert_array_equal(_load(str(out))["id"], good)


def test_ray_usage_errors(local_ray, mlp_onnx_package: Path, shards, tmp_path: Path) -> None:
    root, x, _ = shards
    with pytest.raises(DeviceError, match="no GPU"):
        run_dataset(mlp_onnx_package, root / "in", tmp_path / "g.npz", device="cuda",
                    config=RunConfig(engine="ray"))
    with pytest.raises(UsageError, match="--num-workers"):
        run_dataset(mlp_onnx_package, root / "in", tmp_path / "w.npz", config=RunConfig(engine="ray", num_workers=-1))


def test_cli_joins_an_existing_cluster_with_address(local_ray, mlp_onnx_package: Path, shards,
                                                    tmp_path: Path) -> None:
    root, _, bad = shards
    address = ray.get_runtime_context().gcs_address
    out = tmp_path / "cli"
    proc = run_cli("run", str(mlp_onnx_package), "-i", str(root / "in"), "-o", f"{out}/", "--engine", "ray",
                   "--address", address, "--num-workers", "2", "--on-error", "skip", "-q", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["engine"] == "ray" and summary["written"] == 3000 - len(bad)
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.parquet"]
    bad_addr = run_cli("run", str(mlp_onnx_package), "-i", str(root / "in"), "-o", str(tmp_path / "b.npz"),
                       "--engine", "ray", "--address", "127.0.0.1:1")
    assert bad_addr.returncode == 2 and "Traceback" not in bad_addr.stderr


@pytest.mark.gpu
def test_ray_gpu_actors_match_cpu(local_ray, mlp_onnx_package: Path, shards, tmp_path: Path) -> None:
    root, _, _ = shards
    cpu = run_dataset(mlp_onnx_package, root / "x.npy", tmp_path / "c.npz", config=RunConfig(engine="ray"))
    gpu = run_dataset(mlp_onnx_package, root / "x.npy", tmp_path / "g.npz", device="cuda",
                      config=RunConfig(engine="ray", num_workers=1))
    np.testing.assert_allclose(_load(cpu.output)["output"], _load(gpu.output)["output"], rtol=1e-3, atol=1e-4)


def test_work_units_carry_absolute_paths(mlp_onnx_package: Path, tmp_path: Path, monkeypatch) -> None:
    """A Ray worker does not share the driver's working directory: a relative --input must reach
    it resolved (issue 18)."""
    from packager.batch.io import open_dataset
    from packager.batch.ray_engine import _units
    from packager.package import Package

    signature = Package(mlp_onnx_package, verify=False).manifest.signature
    np.save(tmp_path / "in.npy", np.zeros((10, 16), np.float32))
    monkeypatch.chdir(tmp_path)
    units = _units(open_dataset("in.npy", signature), 0, 4, 64)
    assert units and all(u["path"] == str(tmp_path / "in.npy") for u in units)
