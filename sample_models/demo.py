"""The main job on the bundled samples: train, save as a user would, export, verify, batch-run.

Each framework registers its samples in :data:`DEMOS`; a sample returns the training-time
save it wrote and the export arguments, so the demo goes through the same path as a user.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.text import Text

from packager.tables import print_table

#: sample name -> "module:function". The function takes a work folder and returns the
#: keyword arguments of packager.export (source, example_inputs/input_spec, builder, ...).
DEMOS: dict[str, str] = {
    "torch_cnn": "sample_models.torch_models:demo_cnn",
    "torch_transformer": "sample_models.torch_models:demo_transformer",
    "keras_cnn": "sample_models.tf_models:demo_cnn",
    "keras_two_tower": "sample_models.tf_models:demo_two_tower",
    "paddle_lenet": "sample_models.paddle_models:demo_lenet",
    "paddle_cnn": "sample_models.paddle_models:demo_cnn",
}


def _resolve(spec: str) -> Callable[[Path], dict[str, Any]]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _saved_as(source: Any) -> str:
    """How the sample was saved, for the table: a suffix, a folder, a prefix or in-memory."""
    if not isinstance(source, (str, Path)):
        return "in-memory"
    path = Path(source)
    return "folder" if path.is_dir() else ("".join(path.suffixes) or "prefix")


def run_demo(out_dir: str | Path, only: list[str] | None = None, console: Console | None = None) -> list[str]:
    """Run every registered sample; return the names that failed.

    Args:
        out_dir: Folder for the packages (``<out_dir>/<sample>``) and batch outputs.
        only: Sample names to run (default: all whose framework is installed).
        console: Where to print.
    """
    import packager
    import runtimes
    from packager.batch import run_batches
    from packager.errors import DependencyError, PackagerError

    console = console or Console(markup=False, highlight=False)  # names and paths are not markup
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = only or list(DEMOS)
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        from packager.errors import UsageError

        raise UsageError(f"sample(s) {unknown}", "are unknown", expected=", ".join(DEMOS), got=", ".join(unknown))
    rows: list[list[Any]] = []
    replay: list[str] = []
    failed: list[str] = []
    for name in names:
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f"packager-demo-{name}-"))
        try:
            try:
                with warnings.catch_warnings():
                    # Training the samples makes the frameworks warn about their own internals
                    # (paddle's BatchNorm, to_tensor copies): noise in a demo, not a finding.
                    warnings.simplefilter("ignore", UserWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    kwargs = _resolve(DEMOS[name])(work)
            except (ImportError, DependencyError) as exc:
                rows.append([name, "-", "-", "skipped", f"not installed: {exc}", "-", "-"])
                continue
            pkg = out_dir / name
            source = kwargs['source'] if not hasattr(kwargs['source'], 'eval') else 'in-memory model'
            console.print(Text.assemble((name, "bold"), f": exporting {source}"))
            result = packager.export(out=pkg, overwrite=True, **kwargs)
            report = packager.verify(pkg)
            with runtimes.load(pkg) as runner:
                data = runner.signature.example_inputs(seed=7, sizes={"batch": 100})
                outputs = run_batches(runner, data, batch_size=32)
            np.savez(out_dir / f"{name}-inputs.npz", **data)
            np.savez(out_dir / f"{name}-outputs.npz", **outputs)
            replay += [f"packager verify {pkg}",
                       f"packager run {pkg} -i {out_dir / f'{name}-inputs.npz'} -o {out_dir / f'{name}-outputs.npz'} "
                       "--overwrite"]
            ok = result.passed and report.passed
            if not ok:
                failed.append(name)
            rows.append([name, _saved_as(kwargs["source"]), " ".join(result.manifest.formats),
                         _verdict(result.passed), _verdict(report.passed),
                         f"{next(iter(outputs.values())).shape[0]} rows", f"{time.perf_counter() - start:.1f}"])
        except PackagerError as exc:
            failed.append(name)
            rows.append([name, "-", "-", Text("ERROR", "red"), Text(exc.message[:80]), "-",
                         f"{time.perf_counter() - start:.1f}"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_table(console, "packager demo: sample models",
                ("sample", "saved as", "formats", "parity", "verify", "batch", "s"), rows, right=("s",))
    console.print(Text(f"packages in {out_dir.resolve()} (kept); replay each step with:"), soft_wrap=True)
    for line in [f"packager inspect {out_dir / names[0]}", *replay]:
        console.print(Text(f"  {line}"), soft_wrap=True)
    return failed


def _verdict(passed: bool) -> Text:
    return Text("PASS", "green") if passed else Text("FAIL", "red")
