"""Serving load test: `packager serve` with and without dynamic batching vs calling the runner
directly, on a CNN (ONNX Runtime), loopback only, a fixed number of requests.

Each of ``--clients`` threads sends ``--requests / --clients`` one-row requests back to back
with Triton's own HTTP client (binary tensors), as a fleet of single-image callers would. The
same load runs three ways in one process tree, in interleaved repeats (medians):
- ``direct``: the same threads call ``runner.run`` in-process (no HTTP; the compute limit of
  unmerged single-row calls);
- ``serve, no batching``: ``packager serve --max-batch 1``;
- ``serve, batching``: ``packager serve --max-batch 32 --max-delay-ms D``.
Figures: rows/s, p50 and p99 request latency. On a 2-core machine the clients share the CPU
with the server, so absolute numbers are low; the ratios are the point.
Run: ``python benchmarks/serve_load.py [--requests 2000 --clients 16 --repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _start(package: Path, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "packager", "serve", str(package), "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stderr:
        if line.startswith("serving "):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
            return proc, line.split(" at ", 1)[1].split("/v2/", 1)[0].removeprefix("http://")
    raise SystemExit(f"packager serve failed: exit {proc.wait()}")


def _load(call, requests: int, clients: int) -> dict:
    """Run ``requests`` calls from ``clients`` threads; rows/s and latency percentiles (ms)."""
    per = requests // clients
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        send = call(i)
        send()  # warm: connection, first call
        barrier.wait()
        mine = []
        for _ in range(per):
            start = time.perf_counter()
            send()
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        barrier.wait()
        start = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - start
    latencies.sort()
    return {"rows_per_s": per * clients / wall, "p50_ms": 1e3 * latencies[len(latencies) // 2],
            "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99) - 1]}


def _head_package(work: Path) -> Path:
    """Two conv blocks on 3x32x32, then Linear(4096, 2048) and Linear(2048, 10): at batch 1 the
    head is a matrix-vector product bound by reading its 32 MB of weights on every call."""
    import torch
    from torch import nn

    import packager

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64 * 8 * 8, 2048), nn.ReLU(), nn.Linear(2048, 10)).eval()
    example = {"x": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    return packager.export(model, example, out=work / "head_cnn", formats=["onnx"]).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--model", choices=("head", "medium", "small"), default="head",
                        help="head: a CNN with a VGG-style fully connected head (32 MB of weights, read once per "
                             "call: batching amortises it); medium: the VGG-style 3x64x64 CNN of "
                             "verify_overhead.py (convolutions: as cheap per row at batch 1 as batched on a CPU); "
                             "small: the sample SmallCNN (~50 us a row: HTTP dominates).")
    parser.add_argument("--package", type=Path, help="A package (default: --model, exported here).")
    args = parser.parse_args()

    import tritonclient.http as th

    import packager
    import runtimes

    tmp = Path(tempfile.mkdtemp())
    package = args.package
    if package is None:
        if args.model == "head":
            package = _head_package(tmp)
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from verify_overhead import build_package

            package = build_package(tmp, 4, args.model)
    manifest = packager.Package(package).manifest
    spec = manifest.signature.inputs[0]
    name = manifest.name
    shape = [1] + [d if isinstance(d, int) else 8 for d in spec.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)

    runner = runtimes.load(package)

    def direct(_: int):
        return lambda: runner.run({spec.name: x})

    def over_http(address: str):
        def make(_: int):
            client = th.InferenceServerClient(address, network_timeout=300)
            tensor = th.InferInput(spec.name, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return lambda: client.infer(name, [tensor])
        return make

    results: dict[str, list[dict]] = {"direct": [], "serve, no batching": [], "serve, batching": []}
    servers = {"serve, no batching": _start(package, "--max-batch", "1"),
               "serve, batching": _start(package, "--max-batch", "32", "--max-delay-ms", str(args.max_delay_ms))}
    try:
        for _ in range(args.repeats):
            results["direct"].append(_load(direct, args.requests, args.clients))
            for label, (_, address) in servers.items():
                results[label].append(_load(over_http(address), args.requests, args.clients))
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    summary = {label: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for label, runs in results.items()}
    base = summary["serve, no batching"]
    print(json.dumps({"model": name, "requests": args.requests, "clients": args.clients, "rows_per_request": 1,
                      "repeats": args.repeats, "results": summary,
                      "batching_throughput_ratio": summary["serve, batching"]["rows_per_s"] / base["rows_per_s"],
                      "batching_p99_ratio": summary["serve, batching"]["p99_ms"] / base["p99_ms"],
                      "batching_vs_direct": summary["serve, batching"]["rows_per_s"] / summary["direct"]["rows_per_s"]},
                     indent=2))


if __name__ == "__main__":
    main()
