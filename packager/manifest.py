"""The package manifest: schema, validation with field-naming errors, load/save.

``manifest.json`` is the contract between export time and deployment time. It is validated
with pydantic; the JSON Schema is generated from these models (``packager schema``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from packager.errors import ManifestError, SchemaVersionError
from packager.signature import Signature

#: 2 added per-chunk digests of large files (``FileEntry.chunks``); 3 added each output's
#: measured rounding noise (``Golden.noise``), so a reader that predates it says "upgrade"
#: instead of rejecting an unknown field. Version 1 and 2 manifests still load.
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
#: Manifests larger than this are refused before parsing (a manifest is a few KB).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A package-relative path: 255 characters per component and 1024 in all. Longer names cannot
# exist on common file systems, so a manifest naming one is malformed, not a missing file.
RelPath = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^/\x00]{1,255}(/[^/\x00]{1,255})*$")]


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Chunks(_Model):
    """SHA-256 of each fixed-size chunk of a large file: one SHA-256 stream cannot be split
    across cores, chunks can, so checking a large file takes a fraction of the time."""

    size: int = Field(ge=1 << 16, le=1 << 30, description="Bytes per chunk; the last one may be shorter.")
    sha256: list[Sha256] = Field(min_length=1, max_length=4096)


class FileEntry(_Model):
    """One file of the package with its checksum."""

    path: RelPath
    sha256: Sha256 = Field(description="Of the whole file (what sha256sum prints).")
    size: int = Field(ge=0)
    chunks: Chunks | None = Field(None, description="Per-chunk digests of large files, checked instead of "
                                  "the whole-file digest (in parallel).")

    @model_validator(mode="after")
    def _chunks_cover_the_file(self) -> "FileEntry":
        if self.chunks is not None:
            want = max(1, -(-self.size // self.chunks.size))
            if len(self.chunks.sha256) != want:
                raise ValueError(f"chunks: {len(self.chunks.sha256)} digests of {self.chunks.size} bytes cannot "
                                 f"cover a file of {self.size} bytes ({want} needed)")
        return self


class OutputParity(_Model):
    """Comparison figures of one output against the reference."""

    name: str
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    atol: float | None = None
    rtol: float | None = None
    problem: str | None = None


class Parity(_Model):
    """Export-time parity of one artifact run by one runtime on one device."""

    runtime: str
    device: str = "cpu"
    passed: bool
    outputs: list[OutputParity] = Field(default_factory=list)
    error: str | None = None
    notes: list[str] = Field(default_factory=list)


class Artifact(_Model):
    """One exported format."""

    format: str
    path: RelPath = Field(description="File or folder the runtime loads, relative to the package.")
    files: list[FileEntry]
    runtimes: list[str] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    parity: list[Parity] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity)


class Source(_Model):
    """Where the model came from."""

    framework: str
    framework_version: str
    kind: str = Field(description="in_memory, state_dict, checkpoint, full_model, inference_model, ...")
    path: str | None = None
    builder: str | None = None


class OutputNoise(_Model):
    """An output's intrinsic rounding noise, measured at export (judged by packager.fidelity.judge)."""

    scale: float = Field(ge=0, description="max |reference| of the golden output (finite elements).")
    noise: float | None = Field(None, ge=0, description="Max abs difference between the fp32 reference and an "
                                "equivalent computation (None: not measured).")
    method: str = Field("none", description="'float64' (eager model in float64), 'rows alone' (each row run "
                        "alone, the spread of equivalent fp32 computations) or 'none'.")
    degenerate: str | None = Field(None, description="Why parity on this output is not informative (constant).")


class Golden(_Model):
    """Golden inputs and the reference outputs for them."""

    inputs: FileEntry
    outputs: FileEntry
    reference: str = Field(description="What produced the outputs, e.g. 'torch eager'.")
    #: Optional: packages exported before the noise record load and verify with the defaults.
    noise: dict[str, OutputNoise] = Field(default_factory=dict, description="Per output: rounding noise and scale.")


class Manifest(_Model):
    """Top-level manifest."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(min_length=1)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    packager_version: str
    source: Source
    versions: dict[str, str] = Field(description="Framework and runtime versions at export time.")
    signature: Signature
    artifacts: list[Artifact]
    golden: Golden | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    def artifact(self, fmt: str) -> Artifact:
        for art in self.artifacts:
            if art.format == fmt:
                return art
        raise KeyError(fmt)

    @property
    def formats(self) -> list[str]:
        return [a.format for a in self.artifacts]

    def all_files(self) -> list[FileEntry]:
        files = [f for a in self.artifacts for f in a.files]
        if self.golden:
            files += [self.golden.inputs, self.golden.outputs]
        return files

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=False) + "\n"


def json_schema() -> dict[str, Any]:
    """JSON Schema of the manifest (generated from the pydantic models)."""
    schema = Manifest.model_json_schema()
    schema["$id"] = f"https://packager.dev/schema/manifest-v{SCHEMA_VERSION}.json"
    return schema


def parse_manifest(data: Any, *, origin: str = MANIFEST_NAME) -> Manifest:
    """Validate parsed JSON as a manifest.

    Raises:
        SchemaVersionError: The manifest is from a newer (or unknown) schema.
        ManifestError: A field is missing or invalid; the message names the field.
    """
    if not isinstance(data, dict):
        raise ManifestError(origin, "is not a JSON object", expected="object", got=type(data).__name__)
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"{origin}: field 'schema_version'", "is missing or not an integer",
                            expected="an integer", got=repr(version))
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{origin}: field 'schema_version'", "is newer than this packager understands",
            expected=f"<= {SCHEMA_VERSION}", got=version,
            fix="upgrade packager (pip install -U packager) on this host")
    if version < 1:
        raise SchemaVersionError(f"{origin}: field 'schema_version'", "is not a valid schema version",
                                 expected=f"1..{SCHEMA_VERSION}", got=version)
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        got = err.get("input")
        got_text = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        if len(got_text) > 80:
            got_text = got_text[:77] + "..."
        raise ManifestError(f"{origin}: field '{loc}'", f"{err['msg']}{more}", got=got_text,
                            fix="re-export the package, or repair the field") from None


def load_manifest(package_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json`` in a package folder."""
    path = Path(package_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(str(path), "does not exist", fix="point at a package folder made by 'packager export'")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(str(path), "is too large to be a manifest", expected=f"<= {MAX_MANIFEST_BYTES} bytes",
                            got=f"{path.stat().st_size} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return parse_manifest(data, origin=str(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(str(path), f"is not valid JSON ({exc})", fix="re-export the package") from None
    except RecursionError:  # "[[[[...": decoding or validating; a manifest packager wrote nests a few levels
        raise ManifestError(str(path), "is nested too deeply to be a manifest",
                            fix="re-export the package; a manifest from an untrusted source may be an attack") from None
