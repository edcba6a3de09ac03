"""The ``packager`` command line: parses options and delegates to the Python API.

Exit codes: 0 success, 1 fidelity failure, 2 bad usage or input, 3 contract mismatch,
4 an artifact failed to export/load/run, 70 internal error. Errors print one message;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from packager.errors import ExitCode, PackagerError, UsageError, cli_words, from_os_error
from packager.tables import print_table

app = typer.Typer(name="packager", help="Export trained models to verified deployment packages, verify them, "
                  "and run batch inference.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})
# Markup off everywhere: messages, paths, names and help carry square brackets
# ('float32[batch,3]', a path '[/x]'), which rich would eat or choke on. Styled words are
# Text parts instead (see _styled).
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)
_state: dict[str, Any] = {"debug": False, "quiet": False, "verbose": 0}


def _print_version(value: bool) -> None:
    if value:
        from packager import __version__

        out.print(f"packager {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and converter logs (accepted before "
                                     "or after the command)."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the packager version and exit."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the result line, warnings and errors: no "
                                     "progress, tables or notes (run: the summary line goes too with --json or "
                                     "--progress-log -). Accepted before or after the command."),
          verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Show packager's logs (export phases, "
                                      "converter logs, an error's details); -vv adds debug detail. Accepted "
                                      "before or after the command.")) -> None:
    _state["debug"] = debug
    _set_verbosity(quiet, verbose)
    _print_packager_warnings()


def _print_packager_warnings() -> None:
    """Show packager's own warnings (version drift, ...) as one 'warning' line, not file:line noise."""
    import warnings

    shown = warnings.showwarning
    if getattr(shown, "_packager", False):
        return

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        # Kept under -q (like pip -q): a warning such as version drift changes what the result means.
        if category.__module__.startswith("packager"):
            err.print(_styled(("warning", "bold yellow"), f" {message}"), soft_wrap=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show._packager = True  # type: ignore[attr-defined]
    warnings.showwarning = show


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
    out_dir: Path = typer.Option(..., "--out", "-o", "--output", help="Package folder to create."),
    formats: Optional[list[str]] = typer.Option(None, "--formats", "-f", help="Comma-separated formats "
                                                "(default: all of the framework's)."),
    builder: Optional[str] = typer.Option(None, help="module:function (or file.py:function) returning the architecture."),
    example_inputs: Optional[Path] = typer.Option(None, help=".npz (keys = input names) or .npy example inputs."),
    input_spec: Optional[list[str]] = typer.Option(None, help="e.g. 'x:float32[batch,3,32,32]' or "
                                                   "'ids:int64[batch,seq=1..64]@0:1000'; repeatable."),
    output_names: Optional[list[str]] = typer.Option(None, help="Names of the outputs (comma-separated)."),
    framework: Optional[str] = typer.Option(None, help="torch, tensorflow or paddle (default: detected)."),
    state_key: Optional[str] = typer.Option(None, help="Key of the model weights in a checkpoint dict."),
    signature: Optional[str] = typer.Option(None, "--signature", help="SavedModel signature to export "
                                            "(default: serving_default)."),
    trust: bool = typer.Option(False, "--trust", help="Allow sources that run code when loaded (pickled torch "
                               "models, Keras Lambda layers and custom objects)."),
    name: Optional[str] = typer.Option(None, help="Model name (default: the package folder's name)."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset."),
    atol: Optional[list[str]] = typer.Option(None, help="Absolute tolerance, or OUTPUT:TOL; repeatable."),
    rtol: Optional[list[str]] = typer.Option(None, help="Relative tolerance, or OUTPUT:TOL; repeatable."),
    torchscript_mode: Optional[str] = typer.Option(None, help="trace or script (torch models; default trace)."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="Exporter option KEY=VALUE, parsed by its "
                                               "type (torchscript_freeze=true, paddle2onnx_timeout=600, "
                                               "monitor=val_loss, ...); repeatable."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing package."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Write the package even if parity fails."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Export SOURCE to every requested format, check parity, and write one package."""
    from packager.exporting import export as do_export

    # Values stay strings here: the exporter's declared Options parse them by type
    # (packager.exporters.parse_exporter_options), for the CLI and the API alike.
    options: dict[str, Any] = {} if torchscript_mode is None else {"torchscript_mode": torchscript_mode}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {item!r}", "is not KEY=VALUE", expected="e.g. torchscript_freeze=true",
                             got=item)
        options[key.strip()] = value
    with _steps():
        result = do_export(source, str(example_inputs) if example_inputs else None, out=out_dir,
                           formats=_split(formats) or None, input_spec=input_spec, name=name, framework=framework,
                           builder=builder, state_key=state_key, signature_key=signature, trust=trust,
                           overwrite=overwrite, allow_mismatch=allow_mismatch, atol=_tolerances(atol, "--atol"),
                           rtol=_tolerances(rtol, "--rtol"), output_names=_split(output_names) or None, opset=opset,
                           options=options)
    if as_json:
        out.print_json(result.manifest.model_dump_json())
    else:
        if not quiet():
            _print_artifacts(result.manifest)
        out.print(_styled(("wrote" if result.passed else "wrote (PARITY FAILED)", "bold"), f" {result.path}"))
        if not quiet():
            _note_generated_output_names(result.manifest)
    if not result.passed:
        raise typer.Exit(int(ExitCode.FIDELITY))


@app.command()
def verify(
    package: Path = typer.Argument(..., help="Package folder."),
    formats: Optional[list[str]] = typer.Option(None, "--format", "-f", help="Only these formats."),
    runtime: Optional[list[str]] = typer.Option(None, "--runtime", help="Only these runtimes."),
    device: Optional[list[str]] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (comma-separated)."),
    atol: Optional[list[str]] = typer.Option(None, help="Absolute tolerance, or OUTPUT:TOL; repeatable."),
    rtol: Optional[list[str]] = typer.Option(None, help="Relative tolerance, or OUTPUT:TOL; repeatable."),
    reference: str = typer.Option("auto", help="auto (golden data + the package's reference artifact), golden, "
                                  "eager (re-run the model from --source), or a format name."),
    source: Optional[Path] = typer.Option(None, help="Training-time save for --reference eager."),
    builder: Optional[str] = typer.Option(None, help="module:function building the architecture (--reference eager)."),
    state_key: Optional[str] = typer.Option(None, help="Key of the weights in a checkpoint dict."),
    trust: bool = typer.Option(False, "--trust", help="Trust the package and --source: allow a pickled --source, "
                               "the manifest's builder, and graphs that run code or touch files."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Your own inputs (.npz, keys = input names)."),
    input_range: Optional[list[str]] = typer.Option(None, help="NAME:LOW:HIGH value range of generated inputs; "
                                                    "repeatable."),
    random_inputs: bool = typer.Option(False, "--random", help="Add seeded random inputs at the golden sizes."),
    seed: int = typer.Option(0, help="Seed of generated inputs."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Shape sweep and batch consistency."),
    as_json: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON ('-' for stdout)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML report."),
    integrity_only: bool = typer.Option(False, "--integrity-only", help="Only check every file's size and "
                                        "SHA-256 (and that no unlisted file is present); run nothing."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="PEM public key: check the package's "
                                              "signature (model.sig) first; fail (exit 2) if it is missing or does "
                                              "not match (default: $PACKAGER_PUBLIC_KEY)."),
    localize: bool = typer.Option(False, "--localize", help="For each failing ONNX artifact: the first node whose "
                                  "output diverges from its reference graph (an optimised artifact's fp32 ONNX, "
                                  "else ONNX's reference evaluator), on the golden inputs."),
    localize_out: Optional[Path] = typer.Option(None, "--localize-out", help="With --localize: write the diverging "
                                                "node as DIR/FORMAT/subgraph.onnx plus its inputs (.npz)."),
) -> None:
    """Verify every artifact x runtime x device: contract, golden data, shape sweep, batch consistency."""
    _trust_artifacts(trust)
    _require_signature(public_key)
    if integrity_only:
        _integrity_only(package)
        _signature_ok(package)
        return
    _require_cuda_host(_split(device))
    from packager.verifying import verify as do_verify

    ranges = {}
    for item in input_range or []:
        name, _, bounds = item.partition(":")
        low, _, high = bounds.partition(":")
        try:
            ranges[name] = (float(low), float(high))
        except ValueError:
            raise UsageError(f"--input-range {item!r}", "is not NAME:LOW:HIGH", expected="ids:0:1000",
                             got=item) from None
    with _steps():
        report = do_verify(package, formats=_split(formats) or None, runtimes=_split(runtime) or None,
                           devices=_split(device) or ["cpu"], atol=_tolerances(atol, "--atol"),
                           rtol=_tolerances(rtol, "--rtol"), reference=reference, source=source, builder=builder,
                           state_key=state_key, trust=trust, inputs=inputs, sweep=sweep, random=random_inputs, seed=seed,
                           input_ranges=ranges or None)
    if as_json is not None:
        text = json.dumps(report.to_dict(), indent=2)
        if str(as_json) == "-":
            out.print_json(text)
        else:
            as_json.write_text(text)
    if html is not None:
        from packager.fidelity.report_html import write_html

        write_html(report, html)
    if junit is not None:
        from packager.fidelity.report_junit import write_junit

        write_junit(report, junit)
    if str(as_json) != "-":
        from packager.fidelity.report_text import print_report

        _signature_ok(package)
        print_report(report, out, title=f"verify {package}", summary_only=quiet())
    if localize or localize_out is not None:
        _localize(package, report, localize_out)
    raise typer.Exit(int(report.exit_code))


def _localize(package: Path, report: Any, dest: Optional[Path]) -> None:
    """``verify --localize``: where each failing ONNX-family artifact departs from its reference."""
    from packager.optimizing.localize import localize_artifact
    from packager.package import Package
    from packager.registry import ONNX_FORMATS

    failing = list(dict.fromkeys(r.format for r in report.rows if not r.passed and r.format in ONNX_FORMATS))
    if not failing:
        err.print("--localize: no ONNX artifact failed; nothing to localise", highlight=False, markup=False)
        return
    pkg = Package(package, verify=False)  # verified above
    for fmt in failing:
        for line in localize_artifact(pkg, fmt, out=dest).lines():
            out.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command()
def optimize(
    package: Path = typer.Argument(..., help="Package folder."),
    precision: str = typer.Option(..., "--precision", "-p", help="fp16 or int8."),
    source: str = typer.Option("onnx", "--from", help="Artifact to optimise: onnx (fp16, int8) or openvino "
                               "(int8 with NNCF)."),
    method: Optional[str] = typer.Option(None, "--method", help="int8: dynamic (no calibration) or static "
                                         "(default with --calibration; QDQ)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Rows to calibrate and judge on: .npz, "
                                              ".npy, .parquet or a folder of them; 'random' for generated inputs "
                                              "(a warning)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="e.g. 'cosine>=0.999,top1>=0.99,max_abs<=1e-2' "
                                         "(default fp16 cosine>=0.999,rel<=0.05; int8 cosine>=0.99,top1>=0.99,rel<=0.25)."),
    max_tries: int = typer.Option(4, "--max-tries", help="Conversions tried, each keeping more of the costliest "
                                  "nodes in full precision."),
    calibration_rows: int = typer.Option(256, "--calibration-rows", help="Most calibration rows read."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per runtime call and calibration batch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an optimised artifact of the same format."),
    reduce_range: bool = typer.Option(False, "--reduce-range", help="int8 ONNX: 7-bit weights (no uint8 x int8 "
                                      "saturation on x86 hosts without VNNI; less accurate)."),
    as_json: bool = typer.Option(False, "--json", help="Print the new artifact's manifest entry as JSON."),
) -> None:
    """Add an fp16 or int8 artifact, judged against the fp32 reference by an accuracy budget."""
    from packager.optimizing import optimize as do_optimize

    with _steps():
        result = do_optimize(package, precision=precision, source=source, method=method, calibration=calibration,
                             budget=budget, max_tries=max_tries, calibration_rows=calibration_rows,
                             batch_size=batch_size, overwrite=overwrite, reduce_range=reduce_range)
    record = result.artifact.options["optimization"]
    if as_json:
        out.print_json(json.dumps(result.artifact.model_dump(mode="json")))
        return
    for note in result.notes:
        err.print(_styled(("note", "yellow"), f" {note}"))
    speed = record.get("speed") or {}
    figures = "; ".join(f"{case} {name} " + ", ".join(f"{k} {v:.6g}" for k, v in vals.items() if v is not None)
                        for case, outs in record["figures"].items() for name, vals in outs.items())
    out.print(_styled(("added", "bold green"), f" {result.artifact.format} to {result.path}: budget "
                      f"{record['budget']} met after {len(result.attempts)} tr"
                      f"{'y' if len(result.attempts) == 1 else 'ies'}, {len(record['kept'])} nodes kept in full "
                      f"precision"))
    out.print(Text(f"  {figures}"))
    if speed.get("speedup"):
        out.print(Text(f"  speed-up over {record['from']} on this host: {speed['speedup']:.2f}x (batch "
                       f"{speed['batch_size']})"))


@app.command()
def run(
    package: Path = typer.Argument(..., help="Package folder or artifact."),
    input_path: Path = typer.Option(..., "--input", "-i", help=".npy (single input), .npz (keys = input names), "
                                    ".parquet (one column per input) or a folder of such shards."),
    output_path: Path = typer.Option(..., "--output", "-o", "--out", help="out.npz, out.parquet, out.npy or a folder "
                                     "(dir/) of shards."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per runtime call (default: from the signature "
                                             "and model size)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Artifact format (default: ONNX if present)."),
    runtime: Optional[str] = typer.Option(None, help="Runtime, or 'auto' for the fastest one 'packager bench' "
                                          "recorded (default: the format's first)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    cast: str = typer.Option("strict", help="strict, or safe to allow lossless dtype casts."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (and discard an "
                                   "unfinished run with other arguments)."),
    skip_integrity: bool = typer.Option(False, "--skip-integrity", help="Do NOT check file checksums before "
                                        "loading (a modified or corrupted file reaches the framework)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Input column/key carried through to the "
                                            "output and the rejects file."),
    output_format: Optional[str] = typer.Option(None, "--output-format", help="npz or parquet for a folder "
                                                "output (default: parquet for Parquet input, else npz)."),
    on_error: str = typer.Option("fail", "--on-error", help="fail, or skip: write bad rows to the rejects file "
                                 "and go on."),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help="Rejects file (default: OUTPUT.rejects.jsonl)."),
    allow_nan: bool = typer.Option(False, "--allow-nan", help="Accept NaN/inf in float inputs."),
    shard_rows: Optional[int] = typer.Option(None, "--shard-rows", help="Input rows per output shard (resume "
                                             "granularity; default ~32 MB of output)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Inference threads, local engine (default: one "
                                          "per CPU up to 4 for thread-safe runtimes, each with its own batch)."),
    trust_graphs: bool = typer.Option(False, "--trust", help="Trust the package: load graphs that run code or "
                                      "touch files (pickled .pt2 objects, file operators, custom-op domains)."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="PEM public key: the package's signature "
                                              "(model.sig) must verify before it is loaded (default: "
                                              "$PACKAGER_PUBLIC_KEY)."),
    progress_log: Optional[str] = typer.Option(None, "--progress-log", help="Write JSON-lines progress to this "
                                               "file ('-': stderr; the default when stderr is not a terminal)."),
    engine: str = typer.Option("local", "--engine", help="local, or ray (Ray Data; several machines)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local "
                                          "Ray instance)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Ray actors (default: one per CPU, or "
                                              "per GPU with --device cuda)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Run batch inference of a package over a dataset: streaming, resumable, local or on Ray."""
    if skip_integrity:
        _warn_skip_integrity(package)
    _trust_artifacts(trust_graphs)
    _require_signature(public_key)
    if engine != "ray":  # Ray checks its cluster's GPUs, which need not be this host's
        _require_cuda_host([device])
    from packager.batch.pipeline import RunConfig, run_dataset

    if engine != "ray" and (address is not None or num_workers is not None):
        raise UsageError("--address/--num-workers", "only apply to --engine ray", got=f"--engine {engine}",
                         fix="add --engine ray or drop them")
    interactive = err.is_terminal
    quiet = _state["quiet"]
    config = RunConfig(batch_size=batch_size, on_error=on_error, allow_nan=allow_nan, id_column=id_column,
                       output_format=output_format, rejects=rejects, overwrite=overwrite, shard_rows=shard_rows,
                       threads=threads, progress_bar=interactive and not quiet,
                       progress_log=progress_log if progress_log is not None else
                       (None if quiet or interactive else "-"),
                       engine=engine, address=address, num_workers=num_workers)
    try:
        summary = run_dataset(package, input_path, output_path, format=fmt, runtime=runtime, device=device,
                              cast=cast, config=config, verify=not skip_integrity)
    except KeyboardInterrupt as exc:
        # Caught here: click would turn it into "Aborted!" and exit 1 before main() sees it.
        saved = getattr(exc, "saved", None)
        kept = (f"{saved} of {exc.rows} rows are saved in finished shards; run the same command again to resume "  # type: ignore[attr-defined]
                f"from row {saved}" if saved is not None else "nothing was written; run the same command again")
        err.print(f"interrupted; nothing was left half-written: {kept}", soft_wrap=True)
        raise typer.Exit(130) from None
    if as_json:
        out.print_json(json.dumps(summary.to_dict()))
    if not quiet:
        for note in summary.notes:
            err.print(f"note: {note}", highlight=False, markup=False)
    # -q removes progress and notes, not the one line of what was written and rejected; it goes
    # only when machine output is asked for (--json, or JSON lines on stderr with --progress-log -).
    if not quiet or not (as_json or progress_log == "-"):
        resumed = f", resumed at row {summary.resumed_from}" if summary.resumed_from else ""
        rejected = f", {summary.rejected} rejected (see {summary.rejects})" if summary.rejects else ""
        err.print(f"wrote {summary.written} of {summary.rows} rows to {summary.output}{rejected}{resumed} "
                  f"[{summary.runtime}/{summary.format} on {summary.device}, {summary.engine} engine, batch "
                  f"{summary.batch_size}, {summary.rows_per_s:,.0f} rows/s]", highlight=False, markup=False,
                  soft_wrap=True)


@app.command()
def bench(
    package: Path = typer.Argument(..., help="Package folder."),
    formats: Optional[list[str]] = typer.Option(None, "--format", "-f", help="Only these formats."),
    runtime: Optional[list[str]] = typer.Option(None, "--runtime", help="Only these runtimes."),
    device: Optional[list[str]] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (comma-separated)."),
    batch_sizes: Optional[list[str]] = typer.Option(None, "--batch-sizes", "-b", help="Batch sizes, e.g. 1,32,256 "
                                                    "(default: 1, 32 and packager run's default)."),
    min_time: float = typer.Option(0.5, "--min-time", help="Seconds of timed calls per case."),
    record: bool = typer.Option(True, "--record/--no-record", help="Record the fastest choice for "
                                "'packager run --runtime auto' (in the user cache folder, not the package)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    skip_integrity: bool = typer.Option(False, "--skip-integrity", help="Do NOT check file checksums before "
                                        "loading (a modified or corrupted file reaches the framework)."),
    trust_graphs: bool = typer.Option(False, "--trust", help="Trust the package: load graphs that run code or "
                                      "touch files (pickled .pt2 objects, file operators, custom-op domains)."),
) -> None:
    """Latency (p50/p90/p99) and throughput of each artifact x runtime x device x batch size."""
    if skip_integrity:
        _warn_skip_integrity(package)
    _trust_artifacts(trust_graphs)
    _require_cuda_host(_split(device))
    from packager.bench import bench as do_bench

    sizes: list[int] = []
    for value in _split(batch_sizes):
        try:
            sizes.append(int(value))
        except ValueError:
            raise UsageError(f"--batch-sizes {value!r}", "is not an integer", expected="e.g. 1,32,256",
                             got=value) from None
    report = do_bench(package, formats=_split(formats) or None, runtimes=_split(runtime) or None,
                      devices=_split(device) or ["cpu"], batch_sizes=sizes or None, min_time=min_time, record=record,
                      verify=not skip_integrity)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    rows = []
    for row in report.rows:
        if row.error:
            rows.append([row.format, row.runtime, row.device, str(row.batch_size), Text("error", "red"),
                         cli_words(row.error)[:60], "", ""])
            continue
        rows.append([row.format, row.runtime, row.device, str(row.batch_size), f"{row.p50_ms:.3f}",
                     f"{row.p90_ms:.3f}", f"{row.p99_ms:.3f}", f"{row.rows_per_s:,.0f}"])
    print_table(out, f"bench {package}", ("format", "runtime", "device", "batch", "p50 ms", "p90 ms", "p99 ms",
                                          "rows/s"), rows, right=("batch", "p50 ms", "p90 ms", "p99 ms", "rows/s"))
    for row in report.rows:
        if row.unstable:
            err.print(f"warning: {row.format} ({row.runtime}) {row.device} batch {row.batch_size}: runs varied too "
                      f"much to trust (p90 is {row.spread:.2f}x p50); stop other heavy programs or raise --min-time",
                      highlight=False)
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for sp in report.speedups():
        groups.setdefault((sp["format"], sp["source"], sp["runtime"], sp["device"]), []).append(
            f"{sp['speedup']:.2f}x at batch {sp['batch_size']}")
    for (fmt, source, rt, dev), figures in groups.items():
        out.print(f"{fmt} over {source} ({rt}, {dev}): {', '.join(figures)}", highlight=False, soft_wrap=True)
    for dev, best in report.fastest.items():
        out.print(f"fastest on {dev}: {best['runtime']} ({best['format']}) at batch {best['batch_size']}, "
                  f"{best['rows_per_s']:,.0f} rows/s", highlight=False)
    if report.record_path:
        out.print(f"recorded for --runtime auto in {report.record_path}", highlight=False)


@app.command()
def serve(
    package: Path = typer.Argument(..., help="Package folder or archive."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default; 0.0.0.0 "
                             "exposes the model to the network)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, printed when ready)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the URLs (default: the package's)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Artifact format (default: ONNX if present)."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="Runtime (default: the format's first)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    cast: str = typer.Option("strict", help="strict, or safe to allow lossless dtype casts."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most rows merged into one runtime call (1: no "
                                  "merging). Merging is on only when the artifact passes batch consistency."),
    max_delay_ms: float = typer.Option(5.0, "--max-delay-ms", help="How long a request waits for others to "
                                       "join its batch."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests waiting beyond this get HTTP 503."),
    workers: int = typer.Option(1, "--workers", help="Threads calling the runtime (thread-safe runtimes only)."),
    skip_integrity: bool = typer.Option(False, "--skip-integrity", help="Do NOT check file checksums before "
                                        "loading (a modified or corrupted file reaches the framework)."),
    trust_graphs: bool = typer.Option(False, "--trust", help="Trust the package: load graphs that run code or "
                                      "touch files (pickled .pt2 objects, file operators, custom-op domains)."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="PEM public key: the package's signature "
                                              "must verify before it is loaded (default: $PACKAGER_PUBLIC_KEY)."),
) -> None:
    """Serve a package over the Open Inference Protocol (KServe V2 REST), with dynamic batching and /metrics."""
    if skip_integrity:
        _warn_skip_integrity(package)
    _trust_artifacts(trust_graphs)
    _require_signature(public_key)
    _require_cuda_host([device])
    from packager.serving.server import ServeConfig, open_service
    from packager.serving.server import serve as do_serve

    config = ServeConfig(host=host, port=port, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                         workers=workers)
    service = open_service(package, format=fmt, runtime=runtime, device=device, cast=cast,
                           verify=not skip_integrity, public_key=public_key, name=name, config=config)
    batching = (f"dynamic batching on, up to {max_batch} rows or {max_delay_ms:g} ms" if service.batching
                else "dynamic batching off")

    def ready(url: str) -> None:
        err.print(f"serving {service.name} ({service.platform} on {device}) at {url}/v2/models/{service.name}; "
                  f"{batching}: {service.evidence.why}", highlight=False, markup=False, soft_wrap=True)
        err.file.flush()

    do_serve(service, on_ready=ready)
    err.print("stopped: in-flight requests were answered", highlight=False, markup=False)


@app.command()
def triton(
    package: Optional[Path] = typer.Argument(None, help="Package folder or archive (omit with --check REPO)."),
    out_dir: Optional[Path] = typer.Option(None, "--output", "-o", "--out", help="Model repository to write into "
                                           "(created if missing; other models in it are kept)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the package's; with several "
                                       "formats, NAME_FORMAT each)."),
    version: int = typer.Option(1, "--version", help="Version folder (a positive integer)."),
    formats: Optional[list[str]] = typer.Option(None, "--format", "-f", help="Artifact formats (default: the one "
                                                "'packager run' would pick)."),
    instances: str = typer.Option("cpu:1", "--instances", help="Instance group, KIND:COUNT (cpu:2, gpu:1)."),
    max_batch: int = typer.Option(32, "--max-batch", help="max_batch_size when every input and output has a "
                                  "batch axis first."),
    max_delay_us: int = typer.Option(5000, "--max-delay-us", help="dynamic_batching max_queue_delay_microseconds."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model folder of the same name."),
    check: Optional[Path] = typer.Option(None, "--check", help="Only check this repository: parse every "
                                         "config.pbtxt as Triton's ModelConfig and apply the lints."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    skip_integrity: bool = typer.Option(False, "--skip-integrity", help="Do NOT check file checksums."),
) -> None:
    """Write a Triton model repository for a package (config.pbtxt, version folder, warmup), then check it."""
    from packager.serving import triton as tr

    if check is not None:
        if package is not None or out_dir is not None:
            raise UsageError("--check", "checks an existing repository and takes no package or --output",
                             got=f"{package or out_dir}", fix="run 'packager triton --check REPO' on its own")
        _print_triton_problems(tr.check_repository(check), check, as_json)
        return
    if package is None or out_dir is None:
        raise UsageError("packager triton", "needs a package and -o REPO (or --check REPO)",
                         fix="e.g. packager triton PKG -o model_repository")
    if skip_integrity:
        _warn_skip_integrity(package)
    models = tr.write_repository(package, out_dir, name=name, version=version, formats=_split(formats) or None,
                                 instances=instances, max_batch=max_batch, max_delay_us=max_delay_us,
                                 overwrite=overwrite, verify=not skip_integrity)
    if as_json:
        out.print_json(json.dumps({"models": [m.to_dict() for m in models]}))
    else:
        for model in models:
            state = "on" if model.dynamic_batching else "off"
            out.print(_styled(("wrote", "bold"), f" {model.path} ({model.backend} backend, max_batch_size "
                              f"{model.max_batch_size}, dynamic batching {state}: {model.why})"))
    problems = tr.check_repository(out_dir, models=[m.name for m in models])
    _print_triton_problems(problems, out_dir, as_json=False, quiet_ok=as_json)


def _print_triton_problems(problems: list[Any], repo: Path, as_json: bool, quiet_ok: bool = False) -> None:
    """Print the repository check's findings; exit 3 (contract) when any is an error."""
    errors = [p for p in problems if p.severity == "error"]
    if as_json:
        out.print_json(json.dumps({"repository": str(repo), "problems": [p.to_dict() for p in problems]}))
    else:
        for problem in problems:
            err.print(f"{problem.severity}: {problem.model}: {problem.message}", highlight=False, markup=False,
                      soft_wrap=True)
        if not errors and not quiet_ok:
            err.print(f"checked {repo}: every config.pbtxt parses as Triton's ModelConfig and passes the lints",
                      highlight=False, markup=False)
    if errors:
        raise typer.Exit(int(ExitCode.CONTRACT))


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
    out.print(_styled((manifest.name, "bold"), f" from {manifest.source.framework} {manifest.source.framework_version} "
                      f"({manifest.source.kind}), schema v{manifest.schema_version}, packager "
                      f"{manifest.packager_version}"))
    # The layout the exporter recorded (Keras: NHWC for channels_last image inputs), so a user
    # feeding NCHW arrays sees the mismatch here rather than in wrong outputs.
    layouts = {k: v for art in manifest.artifacts for k, v in ((art.options or {}).get("layout") or {}).items()}
    columns = ("kind", "name", "dtype", "shape", *(("layout",) if layouts else ()))
    print_table(out, "signature", columns,
                [[kind, spec.name, spec.dtype, spec.shape_str(), *((layouts.get(spec.name, "-"),) if layouts else ())]
                 for kind, specs in (("input", manifest.signature.inputs), ("output", manifest.signature.outputs))
                 for spec in specs])
    _print_artifacts(manifest)
    out.print("versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))
    _note_generated_output_names(manifest)


@app.command()
def pack(
    package: Path = typer.Argument(..., help="Package folder."),
    out_file: Path = typer.Option(..., "--out", "-o", "--output", help="Archive to write (NAME.tar.gz)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing archive."),
) -> None:
    """Check a package's integrity and write it as one reproducible .tar.gz (every command accepts it)."""
    from packager.packing import pack as do_pack

    result = do_pack(package, out_file, overwrite=overwrite)
    out.print(_styled(("packed", "bold"), f" {result.files} files ({_human(result.bytes)}) into {result.path} "
                      f"({_human(result.path.stat().st_size)})"))


@app.command()
def sign(
    package: Path = typer.Argument(..., help="Package folder."),
    key: Path = typer.Option(..., "--key", "-k", help="PEM elliptic-curve private key (P-256, P-384, P-521)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing signature."),
) -> None:
    """Sign every file of a package (model.sig); verify/run check it with --public-key or $PACKAGER_PUBLIC_KEY."""
    from packager.packing import sign as do_sign
    from packager.signing import package_files

    sig = do_sign(package, key, overwrite=overwrite)
    out.print(_styled(("signed", "bold"), f" {len(package_files(package)) - 1} files of {package} into {sig}"))


def _require_cuda_host(devices: list[str]) -> None:
    """``--device cuda`` on a host without any CUDA device: one message (exit 2) naming that
    cause, instead of a failed load per artifact and advice to install GPU builds."""
    from runtimes.device import require_cuda_host

    require_cuda_host(devices)


def _trust_artifacts(trust: bool) -> None:
    """``--trust`` holds for the whole process and the workers it starts (runtimes/_graphscan.py)."""
    if trust:
        os.environ["PACKAGER_TRUST"] = "1"


def _require_signature(public_key: Optional[Path]) -> None:
    """``--public-key`` holds for the whole process and its workers: every package load checks the
    signature first (packager.signing, PACKAGER_PUBLIC_KEY)."""
    if public_key is not None:
        from packager.signing import PUBLIC_KEY_ENV

        os.environ[PUBLIC_KEY_ENV] = str(public_key.absolute())


def _signature_ok(package: Path) -> None:
    """Say that the signature was checked (the load would have failed otherwise)."""
    from packager.signing import resolve_public_key

    key = resolve_public_key()
    if key is not None:
        out.print(_styled(("signature OK", "green"), f" {package}: every file as signed, public key {key}"))


def _integrity_only(package: Path) -> None:
    """``verify --integrity-only``: checksums and unlisted files, no framework import."""
    from packager.package import Package

    report = Package(package, verify=False).verify_integrity()
    out.print(_styled(("integrity OK", "green"), f" {package}: {report.files} files, {_human(report.bytes)}, "
                      f"SHA-256 checked in {report.seconds:.2f} s"))


def _styled(*parts: str | tuple[str, str]) -> Text:
    """One line of plain text with styled parts (``("error", "bold red")``): nothing in it is
    parsed as markup, so interpolated paths, names and messages print as they are."""
    return Text.assemble(*parts)


def _warn_skip_integrity(package: Path) -> None:
    err.print(_styled(("WARNING --skip-integrity", "bold yellow"),
                      f": the size and SHA-256 of the files of {package} are NOT checked, nor is the package checked "
                      "for unlisted files; a modified, truncated or planted file will be handed to the framework as "
                      "is. Use only on a package you just verified."))


#: Output names Paddle makes up when a program is saved (paddle.jit.save's ``fetch_name_0``, a
#: legacy program's ``linear_2.tmp_1`` or ``save_infer_model/scale_0.tmp_0``, packager's ``output_0``).
_PADDLE_GENERATED = re.compile(r"fetch_name_\d+|output_\d+|(?:[\w.]+/)?\w+\.tmp_\d+")


def _note_generated_output_names(manifest: Any) -> None:
    """Say how to rename the outputs of an imported Paddle model that Paddle named itself."""
    if manifest.source.framework != "paddle" or not manifest.source.kind.startswith("inference_model"):
        return  # a Layer's outputs are named from forward() or packager's defaults
    names = [o.name for o in manifest.signature.outputs if _PADDLE_GENERATED.fullmatch(o.name)]
    if not names:
        return
    wanted = ",".join(["NAME"] * len(manifest.signature.outputs))
    err.print(f"note: output(s) {', '.join(map(repr, names))} carry the names the saved Paddle program gave "
              f"them, not the model's; to rename them, export again with --output-names {wanted} (one name "
              "per output, in order)", highlight=False, soft_wrap=True)


def _print_artifacts(manifest: Any) -> None:
    rows = []
    for art in manifest.artifacts:
        size = sum(f.size for f in art.files)
        worst = max((o.max_abs or 0.0 for p in art.parity for o in p.outputs), default=None)
        verdict = Text("-") if not art.parity else (Text("PASS", "green") if art.passed else Text("FAIL", "red"))
        rows.append([art.format, art.path, _human(size), ", ".join(art.runtimes), verdict,
                     f"{worst:.3g}" if worst is not None else "-"])
    print_table(out, "artifacts", ("format", "path", "size", "runtimes", "parity", "max abs"), rows,
                right=("size", "max abs"))


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@app.command()
def schema(
    report: bool = typer.Option(False, "--report", help="The schema of 'packager verify --json' reports instead."),
) -> None:
    """Print the manifest's JSON Schema (or, with --report, the verify report's)."""
    if report:
        from packager.verifying import report_json_schema

        out.print_json(json.dumps(report_json_schema()))
        return
    from packager.manifest import json_schema

    out.print_json(json.dumps(json_schema()))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo-packages"), "--out", "-o", "--output",
                                 help="Where the sample packages go."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these samples (comma-separated)."),
) -> None:
    """Train the bundled sample models, export, verify and batch-run each one (the main job)."""
    from sample_models.demo import run_demo

    failed = run_demo(out_dir, only=_split(only) or None, console=out)
    raise typer.Exit(int(ExitCode.FIDELITY) if failed else 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to documented exit codes."""
    argv, debug = _hoist_debug(sys.argv[1:] if argv is None else list(argv))
    interrupted, previous = _watch_sigint()
    try:
        return _dispatch(argv, debug, interrupted)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _dispatch(argv: list[str], debug: bool, interrupted: threading.Event) -> int:
    command = typer.main.get_command(app)
    _state.update(debug=debug, quiet=False, verbose=0)
    _document_common_options(command)
    try:
        # Standalone mode: typer/click print their own usage errors (exit 2) and turn
        # typer.Exit into SystemExit; our errors propagate to the handlers below.
        command.main(args=argv, prog_name="packager", standalone_mode=True)
        return 0
    except SystemExit as exc:
        if exc.code == 130 and _interrupted_by_typer(exc):
            # typer turns Ctrl-C into a silent exit 130 before it reaches the handler below.
            err.print(interrupted_line(argv), soft_wrap=True)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else int(ExitCode.USAGE))
    except (Exception, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt) or interrupted.is_set():
            # Also when Ctrl-C landed inside a library (pydantic building a validator, a
            # converter) that turned it into another error: the user's interrupt, not a bug.
            if debug and not isinstance(exc, KeyboardInterrupt):
                err.print_exception()
            err.print(interrupted_line(argv), soft_wrap=True)
            return 130
        if isinstance(exc, PackagerError):
            return _report(exc, debug)
        # Otherwise a bug in packager: say so, keep the trace behind --debug.
        mapped = from_os_error(exc) if isinstance(exc, OSError) else None
        if mapped is not None:  # a read-only folder or a full disk is the user's to fix, not a bug
            return _report(mapped, debug)
        if debug:
            err.print_exception()
        err.print(_styled(("internal error", "bold red"), f" {type(exc).__name__}: {exc}. Re-run with --debug and "
                          "report it."))
        return int(ExitCode.INTERNAL)


def _watch_sigint() -> tuple[threading.Event, Any]:
    """Record every Ctrl-C (then raise KeyboardInterrupt as Python's default handler does), so
    an interrupt that a library converts into another exception is still reported as one.
    Returns the event and the handler to restore (None when none was installed)."""
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return seen, None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return seen, None  # ignored (a background job) or the embedding program's own handler

    def handler(signum: int, frame: Any) -> None:
        seen.set()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    return seen, previous


#: What a Ctrl-C in each command kept, and how to go on (one line; ``run`` prints its own).
INTERRUPTED = {
    "export": "no package was written (the destination is unchanged); run the same command again to export",
    "verify": "the package is unchanged and no report was written; run the same command again",
    "bench": "nothing was written; run the same command again",
    "pack": "no archive was written; run the same command again",
    "sign": "the package is unchanged (no model.sig written); run the same command again",
    "demo": "packages already exported are kept; run the same command again to redo the rest",
    "triton": "model folders already written are complete; run the same command again (with --overwrite)",
}


def interrupted_line(argv: list[str]) -> str:
    """The Ctrl-C line for the command in ``argv``: what was kept and how to go on."""
    command = next((a for a in argv if not a.startswith("-")), "")
    return f"interrupted; nothing was left half-written: {INTERRUPTED.get(command, 'run the command again')}"


def _interrupted_by_typer(exc: BaseException) -> bool:
    """Whether ``exc`` is typer's ``Exit(130) from KeyboardInterrupt`` (our own handlers raise
    ``Exit(130) from None`` after printing their message)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen.__cause__, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def _set_verbosity(quiet: bool, verbose: int) -> None:
    import logging

    if quiet and verbose:
        raise UsageError("-q/--quiet and -v/--verbose", "contradict each other", fix="pass one of them")
    _state.update(quiet=quiet, verbose=verbose)
    logger = logging.getLogger("packager")
    # main() may run several times in one process (tests, embedding): start from the default.
    for handler in [h for h in logger.handlers if getattr(h, "_packager", False)]:
        logger.removeHandler(handler)
    logger.propagate = True
    # Without -v, INFO lines stay out even where a framework (Paddle) configured the root logger.
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    if verbose:
        # Library logs (export phases, converter logs, parity workers) as plain 'packager.x: ...' lines.
        logger.setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler._packager = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False  # once, not again through a root handler a framework installed


#: Printed under every command's --help: these options are the root's, accepted anywhere.
COMMON_OPTIONS = ("Every command also takes -q/--quiet, -v/--verbose (-vv) and --debug, before or after its "
                  "name.")


def _document_common_options(group: Any) -> None:
    for command in group.commands.values():
        if COMMON_OPTIONS not in (command.epilog or ""):
            command.epilog = f"{command.epilog}\n\n{COMMON_OPTIONS}" if command.epilog else COMMON_OPTIONS


def _steps() -> Any:
    """Step reporting for export/verify (packager.steps): off with -q, and with -v (its log shows them)."""
    from contextlib import nullcontext

    from packager.steps import StepReporter

    return nullcontext() if _state["quiet"] or _state["verbose"] else StepReporter()


def quiet() -> bool:
    """Whether -q/--quiet was given (before or after the command)."""
    return bool(_state["quiet"])


#: Root options accepted anywhere before a ``--``: they move to the front, where the root parses them.
HOISTED = ("--debug", "-q", "--quiet", "-v", "-vv", "--verbose")


def _hoist_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug``, ``-q``/``--quiet`` and ``-v``/``--verbose`` anywhere before a ``--``
    (``packager verify PKG --debug -v``) move to the front, where the root parses them:
    subcommands do not declare them themselves. Returns the arguments and whether --debug was given."""
    end = argv.index("--") if "--" in argv else len(argv)
    hoisted = [a for a in argv[:end] if a in HOISTED]
    if not hoisted:
        return argv, False
    # A repeated flag once; -v counts, so every -v stays.
    hoisted = [a for i, a in enumerate(hoisted) if a in ("-v", "-vv", "--verbose") or a not in hoisted[:i]]
    rest = [a for a in argv[:end] if a not in HOISTED] + argv[end:]
    return [*hoisted, *rest], "--debug" in hoisted


def _report(exc: PackagerError, debug: bool) -> int:
    if debug:
        err.print_exception()
    if (debug or _state["verbose"]) and exc.details:
        err.print(exc.details, soft_wrap=True)
    err.print(_styled(("error", "bold red"), f" {exc.cli_message}"), soft_wrap=True)
    return int(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())


def run_main() -> None:
    """Console-script entry point."""
    sys.exit(main())
