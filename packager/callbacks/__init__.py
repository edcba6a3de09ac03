"""Export-after-training callbacks (Keras, Paddle) share :func:`export_verified`.

A failed export or verification never raises into the training loop and never replaces the
last good package: the candidate is written beside the destination, verified there, and only
then renamed into place.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("packager.callbacks")


@dataclass
class CallbackVerdict:
    """What one export attempt from a callback gave."""

    ok: bool
    message: str
    path: Path | None = None


def export_verified(source: Any, out: str | Path, **export_kwargs: Any) -> CallbackVerdict:
    """Export ``source`` into a candidate package, verify it, and move it to ``out`` if it passed.

    Args:
        source: The in-memory model (or a save) to export.
        out: The package folder to keep up to date.
        **export_kwargs: Passed to :func:`packager.export` (example_inputs, formats, ...).

    Returns:
        The verdict; never raises for export/verification failures.
    """
    from packager.errors import PackagerError
    from packager.exporting import export
    from packager.atomic import replace_dir
    from packager.verifying import verify

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.candidate-", dir=out.parent))
    candidate = stage / "pkg"
    try:
        result = export(source, out=candidate, **{k: v for k, v in export_kwargs.items() if k not in ("out",)})
        # The same judge as export parity: the --atol/--rtol given for the export apply here too.
        report = verify(candidate, atol=export_kwargs.get("atol"), rtol=export_kwargs.get("rtol"))
        if not report.passed:
            bad = [f"{r.format}/{r.parity.runtime}" for r in report.rows if not r.passed]
            return CallbackVerdict(False, f"verification failed for {', '.join(bad)}; kept the previous package")
        # replace_dir swaps atomically (or restores the previous package if the second rename
        # fails), so the stage's rmtree below can never delete the last good package.
        replace_dir(candidate, out, overwrite=True)
        formats = ", ".join(result.manifest.formats)
        return CallbackVerdict(True, f"exported and verified {formats} -> {out}", out)
    except PackagerError as exc:
        return CallbackVerdict(False, f"export failed: {exc.message}; kept the previous package")
    except Exception as exc:  # never break training because of packaging
        log.exception("packager callback failed")
        return CallbackVerdict(False, f"export failed unexpectedly: {type(exc).__name__}: {exc}; kept the previous package")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
