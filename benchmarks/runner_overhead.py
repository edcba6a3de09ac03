"""Runner overhead: ``runner.run`` vs the raw backend call on the same inputs, in one process.

Targets (foundation issue): <= 1.15x on a tiny MLP at batch 1, <= 1.01x on the CNN at batch 32.
Calls are timed in interleaved blocks (raw, runner, raw, ...) so drift and other load hit both
sides alike; the ratio is the median over blocks. Run: ``python benchmarks/runner_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


def _block(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def compare(raw: Callable[[], object], wrapped: Callable[[], object], calls: int, blocks: int) -> dict:
    """Median per-call seconds of both and the median of per-block ratios."""
    for _ in range(max(calls // 4, 5)):  # warm-up: allocator, thread pools, caches
        raw(), wrapped()
    raws, wraps, ratios = [], [], []
    for _ in range(blocks):
        r = _block(raw, calls)
        w = _block(wrapped, calls)
        raws.append(r)
        wraps.append(w)
        ratios.append(w / r)
    return {"raw_us": statistics.median(raws) * 1e6, "runner_us": statistics.median(wraps) * 1e6,
            "ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    args = parser.parse_args()

    import torch

    import packager
    import runtimes
    from sample_models.torch_models import train_cnn, train_mlp

    torch.set_num_threads(1)  # one thread on both sides: a shared host's load skews multi-threaded runs
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # (name, model, input shape, calls per block, blocks multiplier, target). Short blocks,
        # many of them, for the CNN: a block then spans milliseconds and noise averages out.
        cases = [("tiny MLP", train_mlp(steps=2)[0], (1, 16), 2000, 1, 1.15),
                 ("CNN", train_cnn(steps=2)[0], (32, 3, 32, 32), 3, 8, 1.01)]
        for name, model, shape, calls, mult, target in cases:
            pkg = packager.export(model, {"x": np.zeros(shape, np.float32)}, out=Path(tmp) / name.replace(" ", "_"),
                                  formats=["onnx", "torchscript"]).path
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            feeds = {"x": x}
            with runtimes.load(pkg, format="onnx", intra_op_num_threads=1) as runner:
                session, names = runner.session, [o.name for o in runner.session.get_outputs()]
                row = compare(lambda: session.run(names, feeds), lambda: runner.run(feeds), calls, args.blocks * mult)
                results.append({"model": name, "batch": shape[0], "runtime": "onnxruntime", "target": target, **row})
            with runtimes.load(pkg, format="torchscript") as runner:
                module = runner.module

                def raw() -> object:  # what a user with numpy data writes
                    with torch.inference_mode():
                        return module(torch.from_numpy(x)).numpy()

                row = compare(raw, lambda: runner.run(feeds), calls, args.blocks * mult)
                results.append({"model": name, "batch": shape[0], "runtime": "torchscript", "target": target, **row})
    print(f"{'model':10} {'batch':>5} {'runtime':12} {'raw us':>10} {'runner us':>10} {'ratio':>7} {'target':>7}")
    for r in results:
        flag = "ok" if r["ratio"] <= r["target"] else "OVER"
        print(f"{r['model']:10} {r['batch']:>5} {r['runtime']:12} {r['raw_us']:>10.1f} {r['runner_us']:>10.1f} "
              f"{r['ratio']:>7.3f} {r['target']:>6.2f}x {flag}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
