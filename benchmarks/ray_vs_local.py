"""``packager run --engine ray`` on a local two-CPU Ray instance vs the local engine.

Both engines run in this process through :func:`packager.batch.run_dataset` on the same
Parquet shards (same package, runtime, batch size, output format), alternating, and the
median wall time of each is compared. The Ray instance is started once (as a user's cluster
would already be running); each Ray run still starts its actor pool, which is included.

    python benchmarks/ray_vs_local.py --rows 4000000 --shards 8 --repeats 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray

    import packager
    from packager.batch import RunConfig, run_dataset
    from packager.batch.io import to_arrow_table
    from packager.batch.ray_engine import RUNTIME_ENV
    from sample_models.torch_models import train_mlp

    work = Path(tempfile.mkdtemp(prefix="packager-raybench-", dir=args.work))
    try:
        model, example = train_mlp(steps=5)
        pkg = packager.export(model, example, out=work / "mlp", formats=["onnx"]).path
        src = work / "in"
        src.mkdir()
        rng = np.random.default_rng(0)
        per = -(-args.rows // args.shards)
        for i in range(args.shards):
            n = min(per, args.rows - i * per)
            x = rng.standard_normal((n, 16), dtype=np.float32)
            pq.write_table(to_arrow_table({"id": np.arange(i * per, i * per + n), "x": x}),
                           src / f"part-{i:03d}.parquet", row_group_size=65_536)
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env=RUNTIME_ENV)
        ray_start = time.perf_counter() - t0
        times: dict[str, list[float]] = {"local": [], "ray": []}
        for rep in range(args.repeats):
            for engine in ("local", "ray"):
                out = work / f"{engine}.parquet"
                t0 = time.perf_counter()
                summary = run_dataset(pkg, src, out, config=RunConfig(engine=engine, id_column="id",
                                                                      overwrite=True))
                wall = time.perf_counter() - t0
                times[engine].append(wall)
                print(f"rep {rep} {engine:5s} {wall:6.2f} s  {args.rows / wall:12,.0f} rows/s "
                      f"(batch {summary.batch_size})", flush=True)
            a, b = pq.read_table(work / "local.parquet"), pq.read_table(work / "ray.parquet")
            assert a["id"].equals(b["id"]), "engines disagree on rows"
        local, remote = statistics.median(times["local"]), statistics.median(times["ray"])
        result = {"rows": args.rows, "shards": args.shards, "cpus": args.cpus, "repeats": args.repeats,
                  "ray_start_s": ray_start, "local_s": local, "ray_s": remote,
                  "local_rows_per_s": args.rows / local, "ray_rows_per_s": args.rows / remote,
                  "ray_over_local_throughput": local / remote, "load_average": os.getloadavg()}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
