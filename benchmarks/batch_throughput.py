"""``packager run`` vs the naive loop a user writes, on a dataset of at least 1 GB.

Naive loop (same package, same runtime, same batch size)::

    x = np.load(path)                                  # the whole file in memory
    outs = [runner.run({"x": x[i:i+bs]})["output"] for i in range(0, len(x), bs)]
    np.save(dst, np.concatenate(outs))

Each run is a fresh process; wall time and peak RSS (``wait4`` ru_maxrss) are measured from
outside. This parent stays lean (set-up and checks run in child processes too): a forked
child's peak RSS starts at its parent's RSS before ``exec``. Runs alternate naive/packager so load from other processes hits both alike; medians
are reported. Peak memory of ``packager run`` is also measured on a dataset 4x larger (flat
is the target). Every file is written under ``--work`` (default: a temp folder) and removed.

    python benchmarks/batch_throughput.py --size-gb 1 --repeats 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAIVE = """
import sys, numpy as np, runtimes
pkg, src, dst, bs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
x = np.load(src)
outs = []
with runtimes.load(pkg) as runner:
    name = runner.signature.input_names[0]
    for i in range(0, len(x), bs):
        outs.append(runner.run({name: x[i:i + bs]})["output"])
np.save(dst, np.concatenate(outs))
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


SETUP = """
import sys
from pathlib import Path
import numpy as np
what, target = sys.argv[1], Path(sys.argv[2])
if what == "package":
    import packager
    from sample_models.torch_models import train_mlp
    model, example = train_mlp(steps=5)
    packager.export(model, example, out=target, formats=["onnx"])
elif what == "data":  # random float32 rows, block by block (never the whole array in memory)
    rows = int(sys.argv[3])
    arr = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(rows, 16))
    rng = np.random.default_rng(0)
    for lo in range(0, rows, 1 << 20):
        arr[lo:lo + (1 << 20)] = rng.standard_normal((min(1 << 20, rows - lo), 16), dtype=np.float32)
    arr.flush()
elif what == "same":  # compare two .npy outputs block by block
    a, b = np.load(target, mmap_mode="r"), np.load(sys.argv[3], mmap_mode="r")
    assert a.shape == b.shape, (a.shape, b.shape)
    for lo in range(0, len(a), 1 << 22):
        assert np.array_equal(a[lo:lo + (1 << 22)], b[lo:lo + (1 << 22)]), lo
elif what == "batch":
    from packager.batch.core import default_batch_size
    from packager.manifest import load_manifest
    print(default_batch_size(load_manifest(target).signature))
"""


def setup(*args: str) -> str:
    return subprocess.run([sys.executable, "-c", SETUP, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=4, help="Second dataset size for the memory check (x size).")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="packager-bench-", dir=args.work))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on kill
    need = args.size_gb * (1 + args.scale) * 1.6 * (1 << 30)  # inputs + outputs + shards, with margin
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"not enough disk in {work}: need {need / 2**30:.1f} GiB, have {free / 2**30:.1f} GiB")
    py = sys.executable
    try:
        pkg = work / "mlp"
        setup("package", str(pkg))
        rows = int(args.size_gb * (1 << 30)) // 64
        x1 = work / "x1.npy"
        setup("data", str(x1), str(rows))
        batch = int(setup("batch", str(pkg)))
        naive, ours = [], []
        for rep in range(args.repeats):
            for kind in ("naive", "packager"):
                out = work / f"{kind}.npy"
                if kind == "naive":
                    cmd = [py, "-c", NAIVE, str(pkg), str(x1), str(out), str(batch)]
                else:
                    cmd = [py, "-m", "packager", "run", str(pkg), "-i", str(x1), "-o", str(out), "-q", "--overwrite"]
                wall, rss = measure(cmd)
                (naive if kind == "naive" else ours).append((wall, rss))
                print(f"rep {rep} {kind:8s} {wall:6.2f} s  {rows / wall:12,.0f} rows/s  peak {rss:7.0f} MiB",
                      flush=True)
            setup("same", str(work / "naive.npy"), str(work / "packager.npy"))  # raises if they disagree
            for kind in ("naive", "packager"):
                (work / f"{kind}.npy").unlink()
        x1.unlink()
        xs = work / f"x{args.scale}.npy"
        setup("data", str(xs), str(rows * args.scale))
        big = []
        for rep in range(max(1, args.repeats - 1)):
            out = work / "big.npy"
            wall, rss = measure([py, "-m", "packager", "run", str(pkg), "-i", str(xs), "-o", str(out), "-q",
                                 "--overwrite"])
            big.append((wall, rss))
            print(f"rep {rep} packager x{args.scale} {wall:6.2f} s  {rows * args.scale / wall:12,.0f} rows/s  "
                  f"peak {rss:7.0f} MiB", flush=True)
            out.unlink()
        med = lambda xs, i: statistics.median(v[i] for v in xs)  # noqa: E731
        result = {
            "dataset_gb": args.size_gb, "rows": rows, "batch_size": batch, "repeats": args.repeats,
            "naive_s": med(naive, 0), "packager_s": med(ours, 0),
            "naive_rows_per_s": rows / med(naive, 0), "packager_rows_per_s": rows / med(ours, 0),
            "throughput_ratio": med(naive, 0) / med(ours, 0),
            "naive_peak_mib": med(naive, 1), "packager_peak_mib": med(ours, 1),
            "peak_ratio": med(ours, 1) / med(naive, 1),
            f"packager_peak_mib_x{args.scale}": med(big, 1),
            "peak_growth_x1_to_xN": med(big, 1) / med(ours, 1),
            "load_average": os.getloadavg(),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
