"""Tensor signatures: typed inputs/outputs with named dynamic dimensions.

A spec string reads ``name:dtype[dim,dim,...]`` with an optional value range, e.g.
``x:float32[batch,3,32,32]`` or ``ids:int64[batch,seq=1..64]@0:1000``. A dimension is an
integer (fixed) or a name (dynamic). A named dimension may carry ``=N`` (the size used for
generated example inputs) or ``=MIN..MAX`` (its declared extremes, used by the fidelity
sweep). ``@LOW:HIGH`` bounds generated values (``[LOW, HIGH)`` for integers).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from packager.errors import SignatureError

#: dtypes a signature may use (numpy names).
DTYPES = (
    "float16", "float32", "float64", "bfloat16",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
)
BATCH = "batch"
DEFAULT_EXAMPLE_SIZE = {"batch": 4}
DEFAULT_DYNAMIC_SIZE = 8

Dim = int | str


class DimInfo(BaseModel):
    """Metadata of one named dynamic dimension."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=0)
    max: int | None = Field(None, ge=1)
    example: int | None = Field(None, ge=1)

    def example_size(self, name: str) -> int:
        if self.example is not None:
            return self.example
        size = DEFAULT_EXAMPLE_SIZE.get(name, DEFAULT_DYNAMIC_SIZE)
        size = max(size, self.min)
        return min(size, self.max) if self.max is not None else size


class TensorSpec(BaseModel):
    """One input or output tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    dtype: str
    shape: tuple[Dim, ...]
    value_range: tuple[float, float] | None = None

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: tuple[Dim, ...]) -> tuple[Dim, ...]:
        for dim in value:
            if isinstance(dim, int) and dim < 0:
                raise ValueError(f"dimension {dim} is negative; use a name for a dynamic axis")
        return value

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def batch_axis(self) -> int | None:
        """Index of the axis named ``batch``, if any."""
        return self.shape.index(BATCH) if BATCH in self.shape else None

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def shape_str(self) -> str:
        return "[" + ",".join(str(d) for d in self.shape) + "]"

    def __str__(self) -> str:
        text = f"{self.name}:{self.dtype}{self.shape_str()}"
        if self.value_range is not None:
            low, high = self.value_range
            text += f"@{_num(low)}:{_num(high)}"
        return text


class Signature(BaseModel):
    """Inputs, outputs and the named dynamic dimensions they share."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = Field(default_factory=list)
    dims: dict[str, DimInfo] = Field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dim(self, name: str) -> DimInfo:
        return self.dims.get(name) or DimInfo()

    def example_inputs(self, seed: int = 0, sizes: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """Seeded random inputs that fit the signature.

        Args:
            seed: RNG seed; the same seed gives the same arrays.
            sizes: Sizes for named dimensions (defaults: each dimension's example size).
        """
        rng = np.random.default_rng(seed)
        sizes = dict(sizes or {})
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = []
            for dim in spec.shape:
                if isinstance(dim, int):
                    shape.append(dim)
                else:
                    shape.append(sizes.setdefault(dim, self.dim(dim).example_size(dim)))
            feeds[spec.name] = random_array(rng, spec, tuple(shape))
        return feeds


def random_array(rng: np.random.Generator, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    """A seeded random array for ``spec`` with a concrete ``shape``."""
    dtype = spec.dtype
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith(("int", "uint")):
        low, high = spec.value_range or (0, 2)
        return rng.integers(int(low), int(high), size=shape).astype(dtype)
    low, high = spec.value_range or (None, None)
    if low is None:
        arr = rng.standard_normal(size=shape)
    else:
        arr = rng.uniform(low, high, size=shape)
    if dtype == "bfloat16":
        raise SignatureError(f"input {spec.name!r}", "bfloat16 example inputs cannot be generated with numpy",
                             fix="pass --example-inputs with float32 data")
    return arr.astype(dtype)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_SPEC = re.compile(
    r"^\s*(?P<name>[^:\s\[\]@]+)\s*:\s*(?P<dtype>[a-z0-9]+)\s*\[(?P<dims>[^\]]*)\]"
    r"(?:\s*@\s*(?P<low>-?[0-9.eE+-]+)\s*:\s*(?P<high>-?[0-9.eE+-]+))?\s*$"
)
_DIM = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:=(?P<a>\d+)(?:\.\.(?P<b>\d+))?)?$")


def parse_spec(text: str) -> tuple[TensorSpec, dict[str, DimInfo]]:
    """Parse one spec string into a TensorSpec and the dim metadata it declares.

    Raises:
        SignatureError: The text does not follow ``name:dtype[dims]@low:high``.
    """
    match = _SPEC.match(text)
    fix = "write it like 'x:float32[batch,3,32,32]' or 'ids:int64[batch,seq=1..64]@0:1000'"
    if not match:
        raise SignatureError(f"input spec {text!r}", "cannot be parsed", expected="name:dtype[dims][@low:high]",
                             got=text, fix=fix)
    dims: list[Dim] = []
    infos: dict[str, DimInfo] = {}
    raw_dims = [d.strip() for d in match["dims"].split(",")] if match["dims"].strip() else []
    for raw in raw_dims:
        if raw.isdigit():
            dims.append(int(raw))
            continue
        dim = _DIM.match(raw)
        if not dim:
            raise SignatureError(f"input spec {text!r}", f"dimension {raw!r} is neither an integer nor a name",
                                 expected="3, batch, seq=16 or seq=1..64", got=raw, fix=fix)
        name = dim["name"]
        dims.append(name)
        if dim["b"] is not None:
            low, high = int(dim["a"]), int(dim["b"])
            if low > high:
                raise SignatureError(f"dimension {name!r}", "range is reversed", expected="MIN..MAX with MIN<=MAX",
                                     got=raw)
            infos[name] = DimInfo(min=low, max=high)
        elif dim["a"] is not None:
            infos[name] = DimInfo(example=int(dim["a"]))
    value_range = None
    if match["low"] is not None:
        value_range = (float(match["low"]), float(match["high"]))
        if value_range[0] >= value_range[1]:
            raise SignatureError(f"input spec {text!r}", "value range is empty", expected="@LOW:HIGH with LOW<HIGH",
                                 got=f"@{match['low']}:{match['high']}")
    try:
        spec = TensorSpec(name=match["name"], dtype=match["dtype"], shape=tuple(dims), value_range=value_range)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise SignatureError(f"input spec {text!r}", message, fix=fix) from None
    return spec, infos


def split_specs(values: Iterable[str] | str | None) -> list[str]:
    """Split ``--input-spec`` values given repeatedly or joined by ';' or spaces between specs."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        # Split on ';' or whitespace outside brackets: commas live inside the brackets.
        depth, cur = 0, ""
        for ch in value:
            depth += ch == "["
            depth -= ch == "]"
            if depth == 0 and (ch == ";" or ch.isspace()):
                if cur.strip():
                    out.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if cur.strip():
            out.append(cur.strip())
    return out


def parse_input_specs(values: Iterable[str] | str | None) -> Signature | None:
    """Parse ``--input-spec`` values into a Signature holding only inputs (``None`` if empty)."""
    texts = split_specs(values)
    if not texts:
        return None
    specs, dims = [], {}
    for text in texts:
        spec, infos = parse_spec(text)
        if any(s.name == spec.name for s in specs):
            raise SignatureError(f"input {spec.name!r}", "is declared twice in --input-spec")
        specs.append(spec)
        for key, info in infos.items():
            if key in dims and dims[key] != info:
                raise SignatureError(f"dimension {key!r}", "is declared twice with different sizes",
                                     expected=dims[key], got=info)
            dims[key] = info
    return Signature(inputs=specs, dims=dims)


def dtype_name(dtype: Any) -> str:
    """Normalise a numpy/torch/tf/paddle dtype to a signature dtype name."""
    text = str(dtype)
    for prefix in ("torch.", "tf.", "paddle.", "<dtype: '", "DataType."):
        text = text.replace(prefix, "")
    text = text.strip("'>").lower()
    aliases = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
               "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
    text = aliases.get(text, text)
    if text not in DTYPES:
        try:
            text = np.dtype(text).name
        except TypeError:
            pass
    return text


def spec_from_array(name: str, array: Any, *, batch_axis: int | None = 0,
                    dynamic: Mapping[int, str] | None = None) -> TensorSpec:
    """Build a TensorSpec from a concrete array: the batch axis and ``dynamic`` axes get names."""
    shape: list[Dim] = list(int(d) for d in array.shape)
    for axis, dim_name in (dynamic or {}).items():
        if axis < len(shape):
            shape[axis] = dim_name
    if batch_axis is not None and len(shape) > batch_axis and isinstance(shape[batch_axis], int):
        shape[batch_axis] = BATCH
    return TensorSpec(name=name, dtype=dtype_name(array.dtype), shape=tuple(shape))


def infer_output_specs(names: list[str], first: list[Any], second: list[Any],
                       sizes_first: Mapping[str, int], sizes_second: Mapping[str, int]) -> list[TensorSpec]:
    """Output specs from two eager runs at different dynamic sizes.

    An output axis is dynamic when its size changed between the runs; it gets the name of the
    input dimension whose size changed the same way (``batch`` first), else ``<output>_dim<axis>``.
    Comparing two runs avoids mistaking a fixed axis that happens to equal a dynamic size.
    """
    specs = []
    for name, a, b in zip(names, first, second):
        shape: list[Dim] = []
        for axis, (da, db) in enumerate(zip(a.shape, b.shape)):
            if da == db:
                shape.append(int(da))
                continue
            match = [d for d in sizes_first if sizes_first[d] == da and sizes_second.get(d) == db]
            match.sort(key=lambda d: d != BATCH)
            shape.append(match[0] if match else f"{name}_dim{axis}")
        specs.append(TensorSpec(name=name, dtype=dtype_name(a.dtype), shape=tuple(shape)))
    return specs
