"""``packager bench``: latency and throughput of every artifact x runtime x device x batch size.

The fastest (format, runtime) per device at the batch size ``packager run`` would use is
recorded for ``packager run --runtime auto``. The record lives in the user's cache folder,
never inside the package (whose manifest lists and checksums every file)::

    $PACKAGER_CACHE_DIR (or $XDG_CACHE_HOME/packager, or ~/.cache/packager)
        /bench/<sha256 of manifest.json>-<hostname>.json

Keyed by the manifest's hash, a re-exported package never reuses stale figures; keyed by the
host name, a cache folder shared between machines never lends one host's choice to another.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from packager.errors import InputError, PackagerError, UsageError

RECORD_VERSION = 1


#: p90/p50 above which a row's runs are said to vary too much to trust.
UNSTABLE_SPREAD = 1.5


@dataclass
class BenchRow:
    """Figures of one artifact x runtime x device x batch size."""

    format: str
    runtime: str
    device: str
    batch_size: int
    iterations: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    #: Rows per second at the median latency (the statistic the table shows).
    rows_per_s: float | None = None
    #: p90 / p50: how much the runs varied.
    spread: float | None = None
    error: str | None = None

    @property
    def unstable(self) -> bool:
        """Runs varied too much for the figures to be trusted (p90 over 1.5x p50)."""
        return self.spread is not None and self.spread > UNSTABLE_SPREAD


@dataclass
class BenchReport:
    """All rows, and the fastest choice per device."""

    package: str
    manifest_sha256: str
    host: str
    rows: list[BenchRow] = field(default_factory=list)
    fastest: dict[str, dict[str, Any]] = field(default_factory=dict)
    record_path: str | None = None

    def speedups(self) -> list[dict[str, Any]]:
        """Each optimised artifact's throughput over its source artifact's, same runtime, device
        and batch size (``packager optimize``'s speed-up, measured by this run)."""
        from packager.registry import FORMATS, OPTIMIZED_FORMATS

        timed = {(r.format, r.runtime, r.device, r.batch_size): r.rows_per_s for r in self.rows if r.rows_per_s}
        found = []
        for (fmt, runtime, device, batch), rate in timed.items():
            if fmt not in OPTIMIZED_FORMATS:
                continue
            for source in FORMATS[fmt].derived_from:
                base = timed.get((source, runtime, device, batch))
                if base:
                    found.append({"format": fmt, "source": source, "runtime": runtime, "device": device,
                                  "batch_size": batch, "speedup": round(rate / base, 3)})
                    break
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"package": self.package, "manifest_sha256": self.manifest_sha256, "host": self.host,
                "rows": [{**asdict(r), "unstable": r.unstable} for r in self.rows], "fastest": self.fastest,
                "speedups": self.speedups(), "record_path": self.record_path}


def cache_dir() -> Path:
    """Folder for host-local records (``$PACKAGER_CACHE_DIR``, else the XDG cache folder)."""
    if os.environ.get("PACKAGER_CACHE_DIR"):
        return Path(os.environ["PACKAGER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "packager"


def manifest_sha256(package: str | Path) -> str:
    from packager.manifest import MANIFEST_NAME

    path = Path(package) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(str(package), "is not a package folder", expected="a folder with manifest.json",
                         fix="pass the folder written by 'packager export'")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_path(package: str | Path) -> Path:
    """Where the bench record of ``package`` on this host lives."""
    return cache_dir() / "bench" / f"{manifest_sha256(package)}-{platform.node() or 'host'}.json"


def _time_calls(runner: Any, feeds: dict[str, np.ndarray], min_time: float, max_iters: int,
                warmup: int) -> list[float]:
    for _ in range(warmup):
        runner.run(feeds)
    times: list[float] = []
    deadline = time.perf_counter() + min_time
    while len(times) < max_iters and (len(times) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        runner.run(feeds)
        times.append(time.perf_counter() - t0)
    return times


def bench(package: str | Path, *, formats: Sequence[str] | None = None, runtimes: Sequence[str] | None = None,
          devices: Sequence[str] = ("cpu",), batch_sizes: Sequence[int] | None = None, min_time: float = 0.5,
          max_iters: int = 1000, warmup: int = 3, record: bool = True, verify: bool = True) -> BenchReport:
    """Benchmark a package's artifacts on this host.

    Args:
        package: Package folder.
        formats: Only these formats (default: all).
        runtimes: Only these runtimes (default: every runtime of each artifact).
        devices: Devices to try; one that is absent gives an error row, not a failure.
        batch_sizes: Batch sizes (default: 1, 32 and the batch size ``packager run`` picks).
        min_time: Seconds of timed calls per case (at least 5 calls).
        max_iters: Upper bound of timed calls per case.
        warmup: Untimed calls first.
        record: Save the fastest choice per device for ``--runtime auto``.
        verify: Check the package's checksums first (once).

    Raises:
        UsageError: A filter matches nothing, or a batch size is not positive.
    """
    import runtimes as rt
    from packager.batch.core import default_batch_size, fixed_batch_size
    from packager.package import Package

    pkg = Package(package, verify=verify)
    package = pkg.root  # an archive is unpacked once; the temporary folder lives as long as ``pkg``
    manifest = pkg.manifest
    signature = manifest.signature
    model_bytes = max((sum(f.size for f in a.files) for a in manifest.artifacts), default=0)
    run_batch = default_batch_size(signature, model_bytes)
    fixed = fixed_batch_size(signature)
    if fixed is not None:
        sizes = [fixed]
    else:
        sizes = sorted(set(batch_sizes or (1, 32, run_batch)))
    if any(b < 1 for b in sizes):
        raise UsageError("--batch-sizes", "must all be at least 1", got=sizes)
    artifacts = [a for a in manifest.artifacts if not formats or a.format in formats]
    if not artifacts:
        raise UsageError("--format", "matches no artifact of this package", expected=manifest.formats,
                         got=list(formats or []))
    report = BenchReport(str(package), manifest_sha256(package), platform.node())
    for art in artifacts:
        for runtime in art.runtimes:
            if runtimes and runtime not in runtimes:
                continue
            for device in devices:
                try:
                    runner = rt.select_artifact(pkg, art, runtime).open(device)
                except PackagerError as exc:
                    for size in sizes:
                        report.rows.append(BenchRow(art.format, runtime, device, size, error=exc.message))
                    continue
                with runner:
                    for size in sizes:
                        row = BenchRow(art.format, runtime, str(runner.device), size)
                        try:
                            feeds = signature.example_inputs(seed=0, sizes={"batch": size})
                            times = _time_calls(runner, feeds, min_time, max_iters, warmup)
                        except PackagerError as exc:
                            row.error = exc.message
                        else:
                            ms = np.array(times) * 1e3
                            row.iterations = len(times)
                            row.p50_ms, row.p90_ms, row.p99_ms = (round(float(np.percentile(ms, q)), 4)
                                                                  for q in (50, 90, 99))
                            # From the median, like p50: a mean would let a few stalls move it.
                            row.rows_per_s = round(size / (float(np.median(times)) or 1e-12), 1)
                            row.spread = round(row.p90_ms / row.p50_ms, 3) if row.p50_ms else None
                        report.rows.append(row)
    if runtimes and not report.rows:
        raise UsageError("--runtime", "matches no runtime of the chosen artifacts",
                         expected=sorted({r for a in artifacts for r in a.runtimes}), got=list(runtimes))
    target = run_batch if run_batch in sizes else max(sizes)
    from packager.registry import OPTIMIZED_FORMATS

    for row in report.rows:
        # An fp16/int8 artifact is never chosen for the user: it computes other numbers.
        if row.error or row.batch_size != target or row.format in OPTIMIZED_FORMATS:
            continue
        best = report.fastest.get(row.device)
        if best is None or (row.rows_per_s or 0) > best["rows_per_s"]:
            report.fastest[row.device] = {"format": row.format, "runtime": row.runtime, "batch_size": row.batch_size,
                                          "rows_per_s": row.rows_per_s}
    if record and report.fastest:
        report.record_path = str(_save_record(package, report))
    return report


def _save_record(package: str | Path, report: BenchReport) -> Path:
    path = record_path(package)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = load_record(package) or {}
    fastest = {**existing.get("fastest", {}), **report.fastest}  # other devices' figures stay
    data = {"version": RECORD_VERSION, "manifest_sha256": report.manifest_sha256, "host": report.host,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "fastest": fastest,
            "rows": [asdict(r) for r in report.rows]}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_record(package: str | Path) -> dict[str, Any] | None:
    """The bench record of ``package`` on this host, or None (missing or unreadable)."""
    try:
        data = json.loads(record_path(package).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != RECORD_VERSION or data.get("manifest_sha256") != manifest_sha256(package):
        return None
    return data


def auto_choice(package: str | Path, format: str | None, device: str) -> tuple[str | None, str | None, str]:
    """``--runtime auto``: the (format, runtime) ``packager bench`` found fastest on this host.

    Returns:
        (format, runtime, note). Without a record, ``(format, None)``: the default runtime.
    """
    from packager.package import is_package

    if not is_package(package):
        return format, None, "--runtime auto needs a package; using the artifact's default runtime"
    data = load_record(package)
    hint = f"run 'packager bench {package}' to record the fastest"
    if not data:
        return format, None, f"no benchmark of this package on this host; using the default runtime ({hint})"
    if format is None:
        best = data.get("fastest", {}).get(device)
    else:
        rows = [r for r in data.get("rows", []) if r["device"] == device and r["format"] == format
                and not r.get("error") and r.get("rows_per_s")]
        top = max((r["batch_size"] for r in rows), default=None)
        rows = [r for r in rows if r["batch_size"] == top]
        best = max(rows, key=lambda r: r["rows_per_s"]) if rows else None
    if not best:
        return format, None, f"no benchmark for device {device} on this host; using the default runtime ({hint})"
    return best["format"], best["runtime"], (f"--runtime auto chose {best['runtime']} ({best['format']}), "
                                             f"{best['rows_per_s']:,.0f} rows/s in packager bench")
