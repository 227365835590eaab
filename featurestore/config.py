"""Typed configuration for every job, loadable from YAML with errors that name the field.

Job specs are written by people and submitted to clusters where a typo costs a
queued GPU job, so validation is strict: unknown keys, missing fields and wrong
types are refused before anything starts, naming the field and the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

POOLINGS = ("avg", "max", "flatten", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
CROPS = ("center", "squash", "pad")
DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "lzf", "gzip")
DECODES = ("draft", "full")


class ConfigError(ValueError):
    """A job specification is invalid; the message names the field and the source."""


@dataclass
class BackboneConfig:
    """What turns an image into features; everything here changes the numbers."""

    model: str = "efficientnet_lite0"
    weights: str | None = "DEFAULT"
    layers: list[str] = field(default_factory=list)  # empty: the model's default cut
    pooling: Literal["avg", "max", "flatten", "none"] = "avg"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    input_size: int | None = None  # None: the weights' own input size
    crop: Literal["center", "squash", "pad"] = "center"
    decode: Literal["draft", "full"] = "draft"


@dataclass
class ExtractConfig:
    """One extraction job: a source of labeled images into one store."""

    source: str
    output: str
    model: str = "efficientnet_lite0"
    weights: str | None = "DEFAULT"
    layers: list[str] = field(default_factory=list)
    pooling: Literal["avg", "max", "flatten", "none"] = "avg"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    input_size: int | None = None
    crop: Literal["center", "squash", "pad"] = "center"
    decode: Literal["draft", "full"] = "draft"
    batch_size: int = 32
    shard_size: int = 1024
    dtype: Literal["float32", "float16"] = "float32"
    compression: Literal["none", "lzf", "gzip"] = "none"
    address: str | None = None  # None: an embedded local Ray instance
    actors: int | None = None  # None: one per GPU, or enough CPU actors to fill the cores
    gpus_per_actor: float | None = None  # None: 1 where GPUs exist, else 0
    cpus_per_actor: float | None = None
    decode_threads: int | None = None
    max_retries: int = 3
    strict: bool = False
    overwrite: bool = False
    label_column: str = "label"
    path_column: str = "path"
    max_image_pixels: int = 100_000_000  # decompression-bomb guard
    storage_options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False

    def backbone(self) -> BackboneConfig:
        names = {f.name for f in dataclasses.fields(BackboneConfig)}
        return BackboneConfig(**{k: getattr(self, k) for k in names})


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, Mapping)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


T = typing.TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys, missing fields and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or 'the spec'} must be a mapping of field: value, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        where = f"{prefix}{key}"
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid fields: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown field '{where}'{hint}")
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            kwargs[name] = from_mapping(tp, value, source, prefix=f"{where}.")
            continue
        if not _type_ok(value, tp):
            raise ConfigError(
                f"{source}: field '{where}' must be {_describe(tp)}, got {value!r} ({type(value).__name__})"
            )
        if typing.get_origin(tp) is list and isinstance(value, tuple):
            value = list(value)
        kwargs[name] = value
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file; pass the path of a YAML job spec")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a job spec must be a mapping of field: value")
    return data


def load_config(cls: type[T], path: str | Path, overrides: Mapping[str, Any] | None = None) -> T:
    """Load a YAML spec into `cls`; `overrides` (e.g. CLI flags that were given) win."""
    data = load_yaml(path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_mapping(cls, data, source=str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
