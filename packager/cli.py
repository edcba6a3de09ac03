"""The ``packager`` command line: parses options and delegates to the Python API.

Exit codes: 0 success, 1 fidelity failure, 2 bad usage or input, 3 contract mismatch,
4 an artifact failed to export/load/run, 70 internal error. Errors print one message;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from packager.errors import ExitCode, PackagerError, UsageError

app = typer.Typer(name="packager", help="Export trained models to verified deployment packages, verify them, "
                  "and run batch inference.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and converter logs.")) -> None:
    _state["debug"] = debug


def _split(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _tolerances(values: Optional[list[str]], flag: str) -> float | dict[str, float] | None:
    """``--atol 1e-4`` (all outputs) or ``--atol logits:1e-4`` (one output); repeatable."""
    if not values:
        return None
    result: dict[str, float] = {}
    for value in values:
        name, _, number = value.rpartition(":")
        try:
            tol = float(number)
        except ValueError:
            raise UsageError(f"{flag} {value!r}", "is not a number", expected="1e-4 or OUTPUT:1e-4", got=value) from None
        if not name:
            if len(values) == 1:
                return tol
            result["*"] = tol
        else:
            result[name] = tol
    return result


@app.command()
def export(
    source: str = typer.Argument(..., help="Model save: state_dict/checkpoint/full model (.pt/.pth), .pt2, "
                                 ".keras/.h5/SavedModel, .pdparams/.pdmodel/.json, ..."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Package folder to create."),
    formats: Optional[list[str]] = typer.Option(None, "--formats", "-f", help="Comma-separated formats "
                                                "(default: all of the framework's)."),
    builder: Optional[str] = typer.Option(None, help="module:function (or file.py:function) returning the architecture."),
    example_inputs: Optional[Path] = typer.Option(None, help=".npz (keys = input names) or .npy example inputs."),
    input_spec: Optional[list[str]] = typer.Option(None, help="e.g. 'x:float32[batch,3,32,32]' or "
                                                   "'ids:int64[batch,seq=1..64]@0:1000'; repeatable."),
    output_names: Optional[list[str]] = typer.Option(None, help="Names of the outputs (comma-separated)."),
    framework: Optional[str] = typer.Option(None, help="torch, tensorflow or paddle (default: detected)."),
    state_key: Optional[str] = typer.Option(None, help="Key of the model weights in a checkpoint dict."),
    trust: bool = typer.Option(False, "--trust", help="Allow sources that run pickled code when loaded."),
    name: Optional[str] = typer.Option(None, help="Model name (default: the package folder's name)."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset."),
    atol: Optional[list[str]] = typer.Option(None, help="Absolute tolerance, or OUTPUT:TOL; repeatable."),
    rtol: Optional[list[str]] = typer.Option(None, help="Relative tolerance, or OUTPUT:TOL; repeatable."),
    torchscript_mode: str = typer.Option("trace", help="trace or script."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="Exporter option KEY=VALUE; repeatable."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing package."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Write the package even if parity fails."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Export SOURCE to every requested format, check parity, and write one package."""
    from packager.exporting import export as do_export

    options: dict[str, Any] = {"torchscript_mode": torchscript_mode}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--option {item!r}", "is not KEY=VALUE", got=item)
        options[key] = value
    result = do_export(source, str(example_inputs) if example_inputs else None, out=out_dir,
                       formats=_split(formats) or None, input_spec=input_spec, name=name, framework=framework,
                       builder=builder, state_key=state_key, trust=trust, overwrite=overwrite,
                       allow_mismatch=allow_mismatch, atol=_tolerances(atol, "--atol"), rtol=_tolerances(rtol, "--rtol"),
                       output_names=_split(output_names) or None, opset=opset, options=options)
    if as_json:
        out.print_json(result.manifest.model_dump_json())
    else:
        _print_artifacts(result.manifest)
        out.print(f"[bold]{'wrote' if result.passed else 'wrote (PARITY FAILED)'}[/] {result.path}")
    if not result.passed:
        raise typer.Exit(int(ExitCode.FIDELITY))


@app.command()
def verify(
    package: Path = typer.Argument(..., help="Package folder."),
    formats: Optional[list[str]] = typer.Option(None, "--format", "-f", help="Only these formats."),
    runtime: Optional[list[str]] = typer.Option(None, "--runtime", help="Only these runtimes."),
    device: Optional[list[str]] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (comma-separated)."),
    atol: Optional[list[str]] = typer.Option(None, help="Absolute tolerance, or OUTPUT:TOL."),
    rtol: Optional[list[str]] = typer.Option(None, help="Relative tolerance, or OUTPUT:TOL."),
    as_json: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON ('-' for stdout)."),
) -> None:
    """Re-run the golden check of every artifact with its runtime(s) on this host."""
    from packager.verifying import verify as do_verify

    report = do_verify(package, formats=_split(formats) or None, runtimes=_split(runtime) or None,
                       devices=_split(device) or ["cpu"], atol=_tolerances(atol, "--atol"),
                       rtol=_tolerances(rtol, "--rtol"))
    if as_json is not None:
        text = json.dumps(report.to_dict(), indent=2)
        if str(as_json) == "-":
            out.print_json(text)
        else:
            as_json.write_text(text)
    if str(as_json) != "-":
        table = Table(title=f"verify {package}")
        for col in ("format", "runtime", "device", "verdict", "worst output", "max abs", "max rel"):
            table.add_column(col)
        for row in report.rows:
            worst = max(row.parity.outputs, key=lambda o: o.max_abs or 0.0, default=None)
            table.add_row(row.format, row.parity.runtime, row.parity.device,
                          "[green]PASS[/]" if row.passed else "[red]FAIL[/]",
                          (worst.name if worst else "") if not row.parity.error else row.parity.error[:60],
                          f"{worst.max_abs:.3g}" if worst and worst.max_abs is not None else "-",
                          f"{worst.max_rel:.3g}" if worst and worst.max_rel is not None else "-")
        out.print(table)
    raise typer.Exit(int(report.exit_code))


@app.command()
def run(
    package: Path = typer.Argument(..., help="Package folder or artifact."),
    input_path: Path = typer.Option(..., "--input", "-i", help=".npy (single input) or .npz (keys = input names)."),
    output_path: Path = typer.Option(..., "--output", "-o", help="Output .npz."),
    batch_size: int = typer.Option(32, help="Rows per runtime call."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Artifact format (default: ONNX if present)."),
    runtime: Optional[str] = typer.Option(None, help="Runtime (default: the format's first)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    cast: str = typer.Option("strict", help="strict, or safe to allow lossless dtype casts."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Run batch inference of a package over a dataset."""
    import numpy as np

    import runtimes
    from packager.batch import read_inputs, run_batches

    if output_path.exists() and not overwrite:
        raise UsageError(str(output_path), "already exists", fix="pass --overwrite or choose another --output")
    with runtimes.load(package, format=fmt, device=device, runtime=runtime, cast=cast) as runner:
        inputs = read_inputs(input_path, runner.signature)
        outputs = run_batches(runner, inputs, batch_size)
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **outputs)
    os.replace(tmp, output_path)
    rows = next(iter(outputs.values())).shape[0] if outputs else 0
    err.print(f"wrote {rows} rows to {output_path}")


@app.command()
def inspect(
    package: Path = typer.Argument(..., help="Package folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a package's signature, artifacts, sizes, versions and parity."""
    from packager.package import Package

    manifest = Package(package, verify=False).manifest
    if as_json:
        out.print_json(manifest.model_dump_json())
        return
    out.print(f"[bold]{manifest.name}[/] from {manifest.source.framework} {manifest.source.framework_version} "
              f"({manifest.source.kind}), schema v{manifest.schema_version}, packager {manifest.packager_version}")
    sig = Table(title="signature")
    for col in ("kind", "name", "dtype", "shape"):
        sig.add_column(col)
    for kind, specs in (("input", manifest.signature.inputs), ("output", manifest.signature.outputs)):
        for spec in specs:
            sig.add_row(kind, spec.name, spec.dtype, spec.shape_str())
    out.print(sig)
    _print_artifacts(manifest)
    out.print("versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))


def _print_artifacts(manifest: Any) -> None:
    table = Table(title="artifacts")
    for col in ("format", "path", "size", "runtimes", "parity", "max abs"):
        table.add_column(col)
    for art in manifest.artifacts:
        size = sum(f.size for f in art.files)
        worst = max((o.max_abs or 0.0 for p in art.parity for o in p.outputs), default=None)
        verdict = "-" if not art.parity else ("[green]PASS[/]" if art.passed else "[red]FAIL[/]")
        table.add_row(art.format, art.path, _human(size), ", ".join(art.runtimes), verdict,
                      f"{worst:.3g}" if worst is not None else "-")
    out.print(table)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@app.command()
def schema() -> None:
    """Print the manifest's JSON Schema."""
    from packager.manifest import json_schema

    out.print_json(json.dumps(json_schema()))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo-packages"), "--out", "-o", help="Where the sample packages go."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these samples (comma-separated)."),
) -> None:
    """Train the bundled sample models, export, verify and batch-run each one (the main job)."""
    from sample_models.demo import run_demo

    failed = run_demo(out_dir, only=_split(only) or None, console=out)
    raise typer.Exit(int(ExitCode.FIDELITY) if failed else 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to documented exit codes."""
    # paddle2onnx's constant folding goes through Polygraphy, which would pip-install
    # onnx-graphsurgeon at run time; it is a declared dependency instead.
    os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="packager", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return int(ExitCode.USAGE)
    except PackagerError as exc:
        if debug:
            err.print_exception()
            if exc.details:
                err.print(exc.details)
        err.print(f"[bold red]error[/] {exc.message}", highlight=False, markup=True, soft_wrap=True)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was left half-written")
        return 130
    except Exception as exc:  # a bug in packager: say so, keep the trace behind --debug
        if debug:
            err.print_exception()
        err.print(f"[bold red]internal error[/] {type(exc).__name__}: {exc}. Re-run with --debug and report it.",
                  highlight=False)
        return int(ExitCode.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())


def run_main() -> None:
    """Console-script entry point."""
    sys.exit(main())
