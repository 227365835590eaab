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
from typing import Any, Callable, Literal, Mapping, Sequence

POOLINGS = ("avg", "max", "flatten", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
CROPS = ("center", "squash", "pad")
DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "lzf", "gzip")
DECODES = ("draft", "full", "gpu")
AUTO_BATCH = "auto"
DEFAULT_SHARD_SIZE = 1024  # rows per shard when the job does not say
ANY_MODEL = "*"  # key of a per-model mapping (weights, layers) that applies to models not named


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
    decode: Literal["draft", "full", "gpu"] = "draft"


@dataclass
class ExtractConfig:
    """One extraction job: a source of labeled images into one store, or into one store per model.

    model:   one name (OUTPUT is the store), or a list of two or more: every image is decoded
             once and each model's features go to their own complete store OUTPUT/<model>.
    weights: one spec for every model, or {model: spec} (key "*" for the models not named;
             a model missing from the mapping gets DEFAULT).
    layers:  layer names for every model, or {model: [layers]} (key "*" for the rest).
    decode:  draft (JPEG DCT scaling on CPU, the default), full, or gpu (JPEG decoded by
             nvJPEG, resized and normalised with torch on the device; see featurestore.gpu_decode).
    batch_size: images per forward pass, or "auto": chosen by each actor from a measured
             trial against its free GPU memory (a fixed CPU_AUTO_BATCH on CPU).
    compile: torch.compile the backbones in the actors (falls back to eager if compiling fails).
    fold_batchnorm: the actors fold each BatchNorm into the convolution feeding it (see
             featurestore.fold): 1.1-1.7x faster CNNs on one CPU thread, features equal up to float32 rounding.
    shard_size: rows per shard; None: DEFAULT_SHARD_SIZE, or fewer when the input is small,
             so that every actor gets at least two shards (see engine.auto_shard_size).
    append:  a store's plan is fixed by its first run; inputs that SOURCE holds and the plan
             lacks are refused, or with append added as new shards after the last one.
    """

    source: str
    output: str
    model: str | list[str] = "efficientnet_lite0"
    weights: str | dict[str, str] | None = "DEFAULT"
    layers: list[str] | dict[str, list[str]] = field(default_factory=list)
    pooling: Literal["avg", "max", "flatten", "none"] = "avg"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    input_size: int | None = None
    crop: Literal["center", "squash", "pad"] = "center"
    decode: Literal["draft", "full", "gpu"] = "draft"
    batch_size: int | Literal["auto"] = 32
    compile: bool = False
    fold_batchnorm: bool = True
    shard_size: int | None = None
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
    append: bool = False  # add inputs that SOURCE holds and the store's plan lacks, as new shards
    label_column: str | None = None  # a manifest's label column; None: 'label' if it has one (else unlabeled)
    path_column: str = "path"
    max_image_pixels: int = 100_000_000  # decompression-bomb guard
    storage_options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False

    # -- models ------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The model names, as given (one, or several for a multi-model extraction)."""
        models = [self.model] if isinstance(self.model, str) else list(self.model)
        if not models:
            raise ConfigError("field 'model' lists no model; give one name or a list of names")
        seen: set[str] = set()
        for m in models:
            if not isinstance(m, str) or not m.strip():
                raise ConfigError(f"field 'model' must hold model names, got {m!r}")
            if m in seen:
                raise ConfigError(f"field 'model' names {m!r} twice; each model gets one store, list it once")
            seen.add(m)
        return models

    @property
    def multi_model(self) -> bool:
        """True when several models are extracted: OUTPUT is then a parent of one store per model."""
        return len(self.models()) > 1

    def backbones(self) -> list[BackboneConfig]:
        """One BackboneConfig per model, with that model's weights and layers resolved."""
        models = self.models()
        weights = per_model(self.weights, models, "weights", default="DEFAULT")
        layers = per_model(self.layers, models, "layers", default=[])
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(BackboneConfig)
                  if f.name not in ("model", "weights", "layers")}
        out = []
        for m in models:
            lay = layers[m]
            lay = [lay] if isinstance(lay, str) else list(lay or [])
            if not all(isinstance(v, str) for v in lay):
                raise ConfigError(f"field 'layers' for model {m!r} must be a list of layer names, got {lay!r}")
            out.append(BackboneConfig(model=m, weights=weights[m], layers=lay, **shared))
        return out

    def backbone(self) -> BackboneConfig:
        """The BackboneConfig of a single-model job (ConfigError when several models are given)."""
        bbs = self.backbones()
        if len(bbs) != 1:
            raise ConfigError(f"{len(bbs)} models given ({', '.join(b.model for b in bbs)}); use backbones()")
        return bbs[0]

    def outputs(self) -> list[str]:
        """Where each model's store goes: OUTPUT itself for one model, OUTPUT/<model> for several."""
        models = self.models()
        if len(models) == 1:
            return [self.output]
        return [join_uri(self.output, store_dir_name(m)) for m in models]


# -- number ranges -------------------------------------------------------------------------------
# The type of a field lets through values a job refuses (a batch of 0 images, a negative shard
# size); these are the ranges. One table for ExtractConfig, read by the engine (whose message
# names the command-line flag, `--batch-size`) and by job specs (`config.batch_size`), so the
# two checks cannot drift apart. None (the default where there is one) is always fine.
NumberRange = tuple[str, Callable[[Any], bool], str]  # (field, check, what the value must be)


def whole_number(low: int) -> tuple[Callable[[Any], bool], str]:
    """(check, what) for an int >= low (bool is not a number here)."""
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"a whole number >= {low}"


def number_above(low: float, inclusive: bool = False) -> tuple[Callable[[Any], bool], str]:
    """(check, what) for an int or float above low (or at least low)."""
    def ok(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= low if inclusive else v > low)

    return ok, f"a number {'>=' if inclusive else 'above'} {low:g}"


EXTRACT_NUMBERS: tuple[NumberRange, ...] = (
    ("batch_size", lambda v: v == AUTO_BATCH or whole_number(1)[0](v), f"a whole number >= 1 or '{AUTO_BATCH}'"),
    ("shard_size", whole_number(1)[0], "a whole number of rows >= 1"),
    ("actors", *whole_number(1)),
    ("gpus_per_actor", number_above(0, inclusive=True)[0], "a number >= 0 (0: CPU actors)"),
    ("cpus_per_actor", *number_above(0)),
    ("decode_threads", *whole_number(1)),
    ("max_retries", *whole_number(0)),
    ("max_image_pixels", *whole_number(1)),
    ("input_size", whole_number(1)[0], "a whole number of pixels >= 1"),
)


def out_of_range(cfg: Any, ranges: Sequence[NumberRange]) -> tuple[str, Any, str] | None:
    """(field, value, what it must be) of the first field of `cfg` outside its range, or None."""
    for name, ok, what in ranges:
        value = getattr(cfg, name, None)
        if value is not None and not ok(value):
            return name, value, what
    return None


def store_dir_name(model: str) -> str:
    """The folder of a model's store under a multi-model OUTPUT (timm:x -> timm-x)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.") or "model"


def join_uri(parent: str, name: str) -> str:
    return parent.rstrip("/") + "/" + name


def per_model(value: Any, models: list[str], what: str, default: Any) -> dict[str, Any]:
    """Resolve a per-model field: one value for all, or {model: value} with "*" for the rest."""
    if not isinstance(value, Mapping):
        return {m: value for m in models}
    unknown = [k for k in value if k != ANY_MODEL and k not in models]
    if unknown:
        raise ConfigError(
            f"field '{what}' names model(s) {', '.join(map(repr, unknown))} that are not among the models "
            f"({', '.join(models)}); key a mapping by the model names as given, or '{ANY_MODEL}' for the rest")
    rest = value.get(ANY_MODEL, default)
    return {m: value.get(m, rest) for m in models}


def parse_model_values(entries: list[str] | tuple[str, ...], models: list[str], flag: str,
                       multiple: bool = False) -> Any:
    """CLI values that may be keyed by model: `SPEC` (every model) or `MODEL=SPEC` (that model).

    A prefix before '=' counts as a model key only when it is one of `models` (as given) or
    '*', so specs that contain '=' themselves (URLs with a query) stay whole. Returns None
    (no entries), the plain value (no keyed entry; a list when `multiple`), or a mapping
    {model: value, '*': plain value}.
    """
    plain: list[str] = []
    keyed: dict[str, list[str]] = {}
    for entry in entries:
        key, sep, rest = entry.partition("=")
        if sep and (key in models or key == ANY_MODEL):
            if not rest:
                raise ConfigError(f"{flag} {entry!r}: nothing after '='; write {flag} {key}=VALUE")
            keyed.setdefault(key, []).append(rest)
        elif sep and len(models) > 1 and key and "/" not in key and ":" not in key and "." not in key:
            raise ConfigError(f"{flag} {entry!r}: {key!r} is not one of the models ({', '.join(models)}); "
                              f"write {flag} MODEL=VALUE with a model given to --model")
        else:
            plain.append(entry)
    if not entries:
        return None

    def one(values: list[str], where: str) -> Any:
        if multiple:
            return list(values)
        if len(values) > 1:
            raise ConfigError(f"{flag} given twice for {where} ({', '.join(values)}); give it once")
        return values[0]

    if not keyed:
        return one(plain, "every model")
    out = {k: one(v, f"model {k}") for k, v in keyed.items()}
    if plain:
        if ANY_MODEL in out:
            raise ConfigError(f"{flag}: both a plain value and '{ANY_MODEL}=' given; keep one")
        out[ANY_MODEL] = one(plain, "the models not named")
    return out


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
