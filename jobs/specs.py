"""Typed YAML job specs, validated before anything is submitted or started.

A job spec names its job, the job's configuration and, optionally, how to run it:

    job: extract                 # extract | train | evaluate | predict | probe
    config:                      # ExtractConfig / TrainSpec / EvaluateSpec / PredictSpec / ProbeConfig fields
      source: s3://bucket/images
      output: s3://bucket/stores/animals
    runtime:                     # only used by `featurestore submit`
      pip: [s3fs]                # extra requirements installed for the job
      env: [AWS_ENDPOINT_URL]    # NAMES of variables copied from the submitter's environment

A typo found on the cluster costs a queued GPU job, so unknown keys, wrong types and
missing fields are refused here, naming the field and the file. Credentials never
belong in a spec: `runtime.env` holds variable names only, and storage_options keys
that carry secrets are refused.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from featurestore.config import (EXTRACT_NUMBERS, ConfigError, ExtractConfig, NumberRange, from_mapping, load_yaml,
                                 out_of_range, whole_number)
from featurestore.probing import ProbeConfig

JOB_KINDS = ("extract", "train", "evaluate", "predict", "probe")

# storage_options keys that hold secrets: they come from the environment (or an instance
# role), never from a file that gets committed, shipped and shown in dashboards.
SECRET_OPTION_KEYS = frozenset({
    "key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "client_secret", "account_key", "sas_token", "connection_string",
    "access_key", "secret_key", "secret_access_key", "session_token", "api_key", "private_key",
})

# Ray names each job's log file job-driver-<submission id>.log: an id over 240 characters makes
# the Jobs API answer 500 (and leave a job that never leaves PENDING). The readable part of the
# ids made here is cut to this length; with "-" and 8 hex characters they stay far below.
MAX_ID_NAME = 64


@dataclass
class TrainSpec:
    """classifiers.train(...) on a store; the head is saved to `out` (a directory or URL)."""

    store: str
    out: str
    head: str = "logreg"  # one of classifiers.HEADS; checked by parse_spec
    layer: str | None = None
    grid: dict[str, Any] | None = None
    cv: int = 5
    class_weight: str | dict[str, Any] | None = None
    test_size: float = 0.25
    seed: int = 0
    l2: bool = False
    loss: str = "log_loss"
    split: str | None = None
    split_column: str | None = None  # None: a manifest `split` column if there is one
    scoring: str | None = None
    memory_budget: int | None = None
    n_jobs: int | None = None
    batch_size: int = 4096
    epochs: int = 8
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateSpec:
    """classifiers.evaluate(head, store): a report on every labeled row, written to `out`."""

    head: str
    store: str
    out: str | None = None
    batch_size: int = 4096
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictSpec:
    """classifiers.predict(head, store): a Parquet table of predictions per row, written to `out`."""

    head: str
    store: str
    out: str
    batch_size: int = 4096
    storage_options: dict[str, Any] = field(default_factory=dict)


SPEC_CLASSES: dict[str, type] = {
    "extract": ExtractConfig,
    "train": TrainSpec,
    "evaluate": EvaluateSpec,
    "predict": PredictSpec,
    "probe": ProbeConfig,  # featurestore.probe: backbones x layers on one image set, table and plot in `out`
}


@dataclass
class RuntimeSpec:
    """How `featurestore submit` runs the job; ignored by `python -m jobs.<name>`."""

    pip: list[str] = field(default_factory=list)  # extra pip requirements installed on the nodes
    env: list[str] = field(default_factory=list)  # names of variables taken from the submitter's environment
    working_dir: str | None = None  # shipped to the cluster; default: the current directory
    excludes: list[str] = field(default_factory=list)  # added to the default excludes
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class JobSpec:
    job: Literal["extract", "train", "evaluate", "predict", "probe"]
    config: dict[str, Any]
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    name: str | None = None  # a readable prefix for the submission id

    # filled by load_spec: the typed configuration and where it came from
    source: str = "<dict>"

    @property
    def typed(self) -> Any:
        return _typed(self)


def _typed(spec: JobSpec) -> Any:
    return from_mapping(SPEC_CLASSES[spec.job], spec.config, spec.source, prefix="config.")


def _check_no_secrets(options: Mapping[str, Any], source: str, where: str = "config.storage_options") -> None:
    """Refuse credentials anywhere in storage_options, nested ones included (s3fs passes
    client_kwargs / config_kwargs on to botocore, which takes aws_secret_access_key there)."""
    items = options.items() if isinstance(options, Mapping) else enumerate(options)
    for key, value in items:
        path = f"{where}.{key}" if isinstance(options, Mapping) else f"{where}[{key}]"
        if isinstance(options, Mapping) and str(key).lower() in SECRET_OPTION_KEYS:
            raise ConfigError(
                f"{source}: field '{path}' holds a credential; job specs must not "
                "carry secrets. Set it in the environment instead (e.g. AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, forwarded with `featurestore submit --env NAME`) or use an instance role"
            )
        if isinstance(value, (Mapping, list, tuple)):
            _check_no_secrets(value, source, path)


def _check_head_kind(kind: str, source: str) -> None:
    try:
        from classifiers.heads import HEADS
    except ImportError:  # heads not installed here: the job will say so on the cluster
        return
    if kind not in HEADS:
        raise ConfigError(f"{source}: field 'config.head' must be one of {', '.join(HEADS)}, got {kind!r}")


def _check_probe(cfg: ProbeConfig, source: str) -> None:
    """The probe's models/weights/layers syntax (model names: check_models, run by load_spec)."""
    from featurestore.probing import ProbeError, parse_layers, parse_weights

    if not cfg.models:
        raise ConfigError(f"{source}: field 'config.models' lists no model; e.g. [efficientnet_lite0, resnet18@none]")
    for what, check in (("weights", lambda: parse_weights(cfg.weights)), ("layers", lambda: parse_layers(cfg.layers))):
        try:
            check()
        except ProbeError as exc:
            raise ConfigError(f"{source}: field 'config.{what}': {exc}") from None


_EXTRACT = {name: (ok, what) for name, ok, what in EXTRACT_NUMBERS}


def _ranges(*rows: tuple[str, tuple]) -> list[NumberRange]:
    return [(name, ok, what) for name, (ok, what) in rows]


# Number ranges per job kind (featurestore.config.out_of_range). An extract job's are the engine's
# own table, config.EXTRACT_NUMBERS; a probe hands its extraction fields to the engine, so they
# are that table's rows too (batch_size without 'auto', which ProbeConfig's type refuses). The
# head's numbers (cv, test_size, n_jobs, batch_size and epochs of a train job) are not here: the
# checks classifiers.train makes are run on them (_check_head_numbers). What is left are the
# numbers no other module checks: memory_budget (classifiers takes any int) and a probe's sample
# (featurestore.probing refuses < 1 in the middle of its run, where it cannot be called alone).
NUMBER_RANGES: dict[str, list[NumberRange]] = {
    "extract": list(EXTRACT_NUMBERS),
    "train": _ranges(("memory_budget", whole_number(1))),
    "evaluate": _ranges(("batch_size", whole_number(1))),
    "predict": _ranges(("batch_size", whole_number(1))),
    "probe": _ranges(("sample", whole_number(1)),
                     *((name, _EXTRACT[name]) for name in ("batch_size", "shard_size", "actors", "gpus_per_actor",
                                                           "cpus_per_actor", "input_size"))),
}

# The head's numbers each job kind hands to classifiers.train (a probe's batch_size is its extraction's).
# A train job's loss is checked with them (not a number, but refused by the same call, in the same words).
HEAD_NUMBERS = {"train": ("cv", "test_size", "n_jobs", "batch_size", "epochs", "loss"),
                "probe": ("cv", "test_size", "n_jobs")}


def _check_head_numbers(job: str, cfg: Any, source: str) -> None:
    """Refuse the head's numbers (cv, test_size, ...) with the checks classifiers itself makes, so the
    spec and the training cannot disagree: classifiers.fit.check_arguments, what train checks before
    it reads anything (test_size too, which a split file or a manifest column leaves unused)."""
    names = HEAD_NUMBERS.get(job)
    if not names:
        return
    try:
        from classifiers.fit import check_arguments
        from classifiers.heads import HeadError
    except ImportError:  # heads not installed here: the job checks them on the cluster
        return
    given = {name: getattr(cfg, name) for name in names}
    try:
        check_arguments(head=cfg.head, **given)
    except HeadError as exc:
        from classifiers.terms import spec_term

        name = (exc.params or [""])[0]  # the parameter the message opens with
        if name not in names or not str(exc).startswith(name + " "):  # not a number: the job says it itself
            return
        message = exc.worded(spec_term)  # "a single grid value" is "a single config.grid value"
        raise ConfigError(f"{source}: field 'config.{name}' {message.removeprefix(f'config.{name} ')}; "
                          "leave it out for the default") from None


def _check_grid(cfg: Any, source: str) -> None:
    """The head's grid, read by classifiers.heads.parse_grid as classifiers.train reads it (a grid of
    alpha alone is SGD's, for a head that streams): a value that is not a number, a hyperparameter
    the head lacks, refused here rather than after the job has started."""
    if not cfg.grid:
        return
    try:
        from classifiers.heads import HeadError, parse_grid
    except ImportError:  # heads not installed here: the job checks it on the cluster
        return
    alpha_only = isinstance(cfg.grid, Mapping) and set(cfg.grid) == {"alpha"}
    try:
        parse_grid(cfg.grid, "sgd" if alpha_only else cfg.head)
    except HeadError as exc:
        from classifiers.terms import spec_term

        said = exc.worded(spec_term).removeprefix("config.grid").lstrip(": ")
        raise ConfigError(f"{source}: field 'config.grid': {said}") from None


def _check_class_weight(value: Any, source: str) -> None:
    """'balanced', or {class name or label id: weight}: classifiers.train would take float() of a weight
    that is not a number and fail with a bare ValueError on the cluster."""
    if value is None or value == "balanced":
        return
    if isinstance(value, Mapping):
        bad = {k: v for k, v in value.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(k, bool)
               or not isinstance(k, (str, int))}
        if not bad:
            return
        raise ConfigError(f"{source}: field 'config.class_weight' must map class names (or label ids) to numbers, "
                          f"got {bad!r}")
    raise ConfigError(f"{source}: field 'config.class_weight' must be 'balanced' or a mapping of class name to "
                      f"weight, got {value!r}")


def _check_numbers(job: str, cfg: Any, source: str) -> None:
    """Numbers out of range are refused here, not by a job that has waited for its GPU."""
    bad = out_of_range(cfg, NUMBER_RANGES.get(job, []))
    if bad is not None:
        name, value, what = bad
        raise ConfigError(f"{source}: field 'config.{name}' must be {what}, got {value!r}; "
                          "leave it out for the default")
    _check_head_numbers(job, cfg, source)


def check_models(spec: JobSpec, typed: Any) -> None:
    """Model names (and per-model weights/layers keys) exist, and so do the weights and layers named
    (a probe's MODEL@WEIGHTS and its weights: as featurestore.probing reads them, see _probe_weights).

    A torchvision name is found in featurestore.zoo's traced table at once; a timm name, or a
    name found nowhere (to suggest the closest), costs importing timm/torchvision (~3-5 s).
    Layer names are checked as `featurestore layers MODEL` lists them (see check_layers): only
    when some are named, and only where torch can be imported."""
    if spec.job not in ("extract", "probe"):
        return
    from featurestore.zoo import UnknownModelError, canonical_name

    source = spec.source
    if spec.job == "extract":
        try:
            backbones = typed.backbones()  # the models, and weights/layers mappings keyed by them
        except ConfigError as exc:
            raise ConfigError(f"{source}: {_config_fields(str(exc))}") from None
        names = [("model", m) for m in typed.models()]
    else:
        names = [("models", entry.partition("@")[0].strip()) for entry in typed.models]
    for where, name in names:
        try:
            canonical_name(name)
        except UnknownModelError as exc:
            raise ConfigError(f"{source}: field 'config.{where}': {exc}") from None
    if spec.job == "extract":
        check_weights([(b.model, b.weights) for b in backbones], source)
        asked = [(b.model, list(b.layers)) for b in backbones]
    else:
        for where, model, weights in _probe_weights(typed, source):
            check_weights([(model, weights)], source, where)
        asked = _probe_layers(typed, source)
    check_layers(asked, typed.input_size, source)


def check_weights(asked: list[tuple[str, str | None]], source: str, where: str = "weights") -> None:
    """Refuse weights a model does not have, named as torchvision's enum member or timm's pretrained
    tag (`weights: IMAGENET1K_V3`, a typo `nonee`), with the names it has: what the job's first step
    would refuse after waiting for the cluster. `where` is the config field that gave them (a probe's
    `models: [resnet18@NAME]` is config.models). The names are looked up, nothing is downloaded.
    None, DEFAULT, named sources (pypi:...) and files are not checked here (a file may exist only
    on the cluster); importing torchvision (~3 s) or timm happens only for the other names, and not
    for a name that was resolved here before (layer_names records torchvision's URLs and timm's tags)."""
    import importlib

    from featurestore import layer_names
    from featurestore.weights import NAMED_SOURCES, WeightsError, check_timm_tag, is_file_spec, torchvision_enum
    from featurestore.zoo import canonical_name

    for model, weights in asked:
        low = (weights or "none").strip().lower()
        if low in ("none", "default", "pretrained", "timm") or low in NAMED_SOURCES or is_file_spec(weights):
            continue
        canonical = canonical_name(model)
        timm_name = canonical.removeprefix("timm:") if canonical.startswith("timm:") else None
        if not timm_name and layer_names.recorded_weights_url(canonical, weights):
            continue
        try:
            if timm_name:
                check_timm_tag(timm_name, weights)  # imports timm unless its tags are recorded
            else:
                importlib.import_module("torchvision")
                torchvision_enum(canonical, weights)
        except (ImportError, OSError):  # not installed here: the cluster checks them when it builds the model
            continue
        except WeightsError as exc:
            raise ConfigError(f"{source}: field 'config.{where}': {exc}") from None
        except Exception:  # a name these lookups do not cover: the job says what is wrong
            continue


def _probe_weights(cfg: ProbeConfig, source: str) -> list[tuple[str, str, str]]:
    """(field, model, weights) of each probe entry, as featurestore.probing.parse_candidates gives
    them: MODEL@WEIGHTS from config.models, else the model's key in a config.weights mapping (its
    name or an alias of it), else config.weights' one value for all, else DEFAULT. The input errors
    parse_candidates would raise on the cluster (nothing after '@', a weights key that is no listed
    model) are refused here; files are not opened (one may exist only where the job runs)."""
    from featurestore.probing import parse_weights
    from featurestore.zoo import canonical_name

    default, per_model = parse_weights(cfg.weights)  # its syntax: _check_probe, run by parse_spec
    out, used = [], set()
    for entry in cfg.models:
        model, at, weights = (part.strip() for part in entry.partition("@"))
        if at:
            if not weights:
                raise ConfigError(f"{source}: field 'config.models': {entry!r}: nothing after '@'; write "
                                  "MODEL@WEIGHTS, e.g. resnet18@none, or leave out the '@'")
            out.append(("models", model, weights))
            continue
        canonical = canonical_name(model)
        key = next((k for k in per_model if k == model or _canonical_or_none(k) == canonical), None)
        if key is not None:
            used.add(key)
        out.append(("weights", model, per_model[key] if key is not None else default or "DEFAULT"))
    seen: dict[tuple[str, str], str] = {}
    for entry, (_, model, weights) in zip(cfg.models, out):  # one store per model and weights
        ident = (canonical_name(model), "none" if weights.lower() == "none" else weights)
        if ident in seen:
            raise ConfigError(f"{source}: field 'config.models': {entry!r} repeats {seen[ident]!r} (the same model "
                              "and weights); list each once")
        seen[ident] = entry
    unused = [k for k in per_model if k not in used]
    if unused:
        import difflib

        listed = [entry.partition("@")[0].strip() for entry in cfg.models]
        close = difflib.get_close_matches(unused[0], listed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{source}: field 'config.weights' names {', '.join(map(str, unused))}{hint}, not among "
                          f"config.models ({', '.join(cfg.models)}) without '@'; key it by a model listed there")
    return out


def _canonical_or_none(name: str) -> str | None:
    from featurestore.zoo import canonical_name

    try:
        return canonical_name(name)
    except Exception:
        return None


def _probe_layers(cfg: ProbeConfig, source: str) -> list[tuple[str, list[str]]]:
    """(model, layer names) of a probe spec, looked up per model as featurestore.probing.resolve_layers
    does; its tokens auto and default are not names and always fit. A config.layers key that is no
    listed model (resolve_layers' "not among --models" on the cluster) is refused here."""
    from featurestore.config import ANY_MODEL
    from featurestore.probing import AUTO, DEFAULT, parse_layers
    from featurestore.zoo import canonical_name

    layers = parse_layers(cfg.layers)
    listed = {entry.partition("@")[0].strip() for entry in cfg.models}
    known = set(cfg.models) | listed | {canonical_name(m) for m in listed}
    by_canonical = {}
    for key in layers:
        if key == ANY_MODEL:
            continue
        canonical = _canonical_or_none(key)
        if key not in known and canonical not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(listed), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: field 'config.layers' names model {key!r}{hint}, not among config.models "
                              f"({', '.join(cfg.models)}); key it by a model listed there, or '*' for the rest")
        if canonical is not None:
            by_canonical.setdefault(canonical, key)
    out = []
    for entry in cfg.models:
        model = entry.partition("@")[0].strip()
        canonical = canonical_name(model)
        tokens = (layers.get(entry) or layers.get(model)
                  or (layers[by_canonical[canonical]] if canonical in by_canonical else None) or layers[ANY_MODEL])
        named = [t for t in tokens if t.lower() not in (AUTO, DEFAULT)]
        if named:
            out.append((model, named))
    return out


def check_layers(asked: list[tuple[str, list[str]]], input_size: int | None, source: str) -> None:
    """Refuse a layer a model does not have, naming config.layers and the closest names, here
    rather than on the cluster after the job has waited for its GPU.

    The names are the ones `featurestore layers MODEL` lists (backbones.list_layers, weights none:
    the architecture alone, nothing downloaded or read), traced on the meta device so that no
    weights are allocated either; the refusal is backbones' own (UnknownLayerError, with its
    suggestions). Cost on this 2-core machine: importing torch and torchvision ~3 s (timm ~1 s
    more), then per model 0.1-0.6 s (resnet18, mobilenet_v3_small, efficientnet_lite0, vit_b_16),
    ~1.3 s (vit_l_16, efficientnet_b7), maxvit_t ~11 s (its trace). Models that cannot be built
    on the meta device (regnet) are traced for real, up to _REAL_TRACE_MAX_PARAMS_M (regnet_y_16gf:
    ~5 s), and larger ones left to the cluster. Where torch, torchvision (or timm, for a timm
    model) cannot be imported, or a model cannot be listed here at all, nothing is checked: the
    cluster still checks when it builds the model. A listing is recorded (featurestore.layer_names),
    so a later spec that asks only for recorded names is checked without importing torch."""
    asked = [(m, lay) for m, lay in asked if lay]
    if not asked:
        return
    from featurestore import layer_names
    from featurestore.zoo import canonical_name

    # names an earlier listing of the architecture recorded (featurestore.layer_names): a spec that
    # asks only for those is let through without importing torch (seconds); the cluster checks again
    if all(layer_names.known(canonical_name(m), "none", lay, input_size) for m, lay in asked):
        return
    import importlib

    try:
        for module in ("torch", "torchvision"):
            importlib.import_module(module)
    except (ImportError, OSError):  # OSError: a broken CUDA library, say
        return
    from featurestore.backbones import _check_layers
    from featurestore.zoo import UnknownLayerError

    listed: dict[str, list[str] | None] = {}
    for model, layers in asked:
        canonical = canonical_name(model)
        if canonical not in listed:
            listed[canonical] = _layer_names(canonical, input_size)
        valid = listed[canonical]
        if valid is None:
            continue
        try:
            _check_layers(layers, valid, canonical, prefixes=not canonical.startswith("timm:"))
        except UnknownLayerError as exc:
            raise ConfigError(f"{source}: field 'config.layers': {exc}") from None


# A model that cannot be built on the meta device is traced with real (random) weights only up
# to this many million parameters: regnet_y_16gf (84M) took ~5 s here, regnet_y_128gf would take minutes.
_REAL_TRACE_MAX_PARAMS_M = 100


def _layer_names(canonical: str, input_size: int | None) -> list[str] | None:
    """The cut points `featurestore layers` lists for a model, or None when they cannot be had here."""
    import importlib
    import logging

    import torch

    from featurestore.backbones import list_layers

    log = logging.getLogger("jobs.specs")
    if canonical.startswith("timm:"):
        try:
            importlib.import_module("timm")
        except (ImportError, OSError):
            return None
    try:
        with torch.device("meta"):  # shapes without allocating weights or running the network
            return [info.name for info in list_layers(canonical, input_size=input_size)]
    except Exception as exc:  # some constructors copy data (regnet); some ops have no meta kernel
        log.debug("%s: no layer listing on the meta device (%s: %s)", canonical, type(exc).__name__, exc)
    try:
        from featurestore.zoo import model_info

        params = model_info(canonical).params_m
        if params is None or params > _REAL_TRACE_MAX_PARAMS_M:
            return None
        return [info.name for info in list_layers(canonical, input_size=input_size)]
    except Exception as exc:  # the cluster will say what is wrong when it builds the model
        log.debug("%s: layers not checked before submission (%s: %s)", canonical, type(exc).__name__, exc)
        return None


def _config_fields(message: str) -> str:
    """ExtractConfig's own messages say field 'layers'; in a job spec that is field 'config.layers'."""
    import re

    return re.sub(r"field '(?!config\.)", "field 'config.", message)


def parse_spec(data: Mapping[str, Any], source: str = "<dict>") -> tuple[JobSpec, Any]:
    """Validate a job spec mapping; returns (JobSpec, typed config). Raises ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a job spec must be a mapping with keys job, config[, runtime, name]")
    data = dict(data)
    known = {"job", "config", "runtime", "name"}
    for key in data:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            if str(key).replace("-", "_") in {f for cls in SPEC_CLASSES.values() for f in cls.__dataclass_fields__}:
                hint += " (job fields go under 'config:')"
            raise ConfigError(f"{source}: unknown field '{key}'{hint}; a job spec has job, config, runtime, name")
    if "job" not in data:
        raise ConfigError(f"{source}: missing required field 'job' (one of {', '.join(JOB_KINDS)})")
    if data["job"] not in JOB_KINDS:
        raise ConfigError(f"{source}: field 'job' must be one of {', '.join(JOB_KINDS)}, got {data['job']!r}")
    if "config" not in data:
        raise ConfigError(f"{source}: missing required field 'config' (the {data['job']} job's settings)")
    if not isinstance(data["config"], Mapping):
        raise ConfigError(f"{source}: field 'config' must be a mapping of field: value, got {data['config']!r}")
    runtime = data.get("runtime") or {}
    if not isinstance(runtime, Mapping):
        raise ConfigError(f"{source}: field 'runtime' must be a mapping, got {runtime!r}")
    rt = from_mapping(RuntimeSpec, runtime, source, prefix="runtime.")
    for name in rt.env:
        if not name or "=" in name:
            raise ConfigError(f"{source}: field 'runtime.env' lists variable NAMES (e.g. AWS_ENDPOINT_URL), got "
                              f"{name.split('=')[0]}=...; values come from the submitter's environment, never the spec")
    if data.get("name") is not None and not isinstance(data["name"], str):
        raise ConfigError(f"{source}: field 'name' must be str, got {data['name']!r}")
    spec = JobSpec(job=data["job"], config=dict(data["config"]), runtime=rt, name=data.get("name"), source=source)
    typed = _typed(spec)
    if spec.job in ("train", "probe"):
        _check_head_kind(typed.head, source)
        _check_grid(typed, source)
    if spec.job == "probe":
        _check_probe(typed, source)
    if spec.job == "train":
        _check_class_weight(typed.class_weight, source)
    _check_numbers(spec.job, typed, source)
    _check_no_secrets(getattr(typed, "storage_options", None) or {}, source)
    return spec, typed


def load_spec(path: str | os.PathLike, expect: str | None = None) -> tuple[JobSpec, Any]:
    """Load and validate a YAML job spec, model names included; `expect` refuses a spec for another job kind."""
    text_source = str(path)
    if text_source.startswith("env:"):  # a spec shipped in an environment variable by `submit`
        import yaml

        var = text_source[4:]
        if var not in os.environ:
            raise ConfigError(f"{text_source}: environment variable {var} is not set")
        data = yaml.safe_load(os.environ[var]) or {}
        text_source = os.environ.get("FEATURESTORE_JOB_SPEC_NAME", text_source)
    else:
        data = load_yaml(path)
    spec, typed = parse_spec(data, text_source)
    if expect is not None and spec.job != expect:
        raise ConfigError(f"{text_source}: this is a '{spec.job}' job spec; run it with python -m jobs.{spec.job}")
    check_models(spec, typed)
    return spec, typed


def output_fields(spec: JobSpec, typed: Any) -> list[tuple[str, str]]:
    """(field, location) pairs the job writes to: the ones a multi-node cluster must be able to reach."""
    if spec.job == "extract":
        return [("output", typed.output)]
    out = getattr(typed, "out", None)
    return [("out", out)] if out else []


PATH_FIELDS = ("source", "output", "store", "out", "head", "split", "weights")


def relative_paths(job: str, typed: Any) -> list[tuple[str, str]]:
    """(field, value) of every relative local path in a job's config.

    A submitted job runs in Ray's temporary copy of the working folder on whichever node
    it lands, so a relative path there reads from, or writes into, that copy."""
    found = []
    for name in PATH_FIELDS:
        if name == "head" and job in ("train", "probe"):  # there it names the head's kind (logreg, ...)
            continue
        value = getattr(typed, name, None)
        values = value.values() if isinstance(value, Mapping) else [value]  # weights per model
        for v in values:
            if not isinstance(v, str) or not v or not is_local_path(v) or os.path.isabs(os.path.expanduser(_local_path(v))):
                continue
            if name == "weights":
                from featurestore.weights import is_file_spec

                if not is_file_spec(v):  # an enum name, none, pypi:...
                    continue
            found.append((name, v))
    if job == "probe":  # models: [MODEL@FILE]
        from featurestore.weights import is_file_spec, split_recipe

        for entry in getattr(typed, "models", None) or []:
            w = entry.partition("@")[2].strip()
            if w and is_file_spec(w) and is_local_path(w) \
                    and not os.path.isabs(os.path.expanduser(_local_path(split_recipe(w)[0]))):
                found.append(("models", entry))
    return found


# -------------------------------------------------------------------------------------
# Local outputs on clusters without a shared filesystem
# -------------------------------------------------------------------------------------
def is_local_path(location: str) -> bool:
    """True for plain paths and file:// URLs; False for object storage (s3://, gs://, ...)."""
    if location.startswith("file://") or location.startswith("local://"):
        return True
    return "://" not in location


def _local_path(location: str) -> str:
    for prefix in ("file://", "local://"):
        if location.startswith(prefix):
            return location[len(prefix):]
    return location


def _probe_dir(path: str) -> str:
    """The nearest existing directory at or above `path`: where a probe file can be written."""
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_output_reachable(output: str | None, address: str | None = None) -> None:
    """Refuse a local `output` on a multi-node Ray cluster whose nodes do not share a filesystem.

    Call after joining the cluster (ray.init). Each alive node is asked, by a zero-CPU task
    pinned to it, whether it sees a probe file written next to the output; a node that
    does not would write its shards where nobody else can read them. A single node, an
    embedded instance or object storage (s3://, gs://, ...) always passes.
    """
    if not output or not is_local_path(output):
        return
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return
    if not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = _local_path(output)
    probe_dir = _probe_dir(path)
    probe = os.path.join(probe_dir, f".featurestore-probe-{uuid.uuid4().hex}")
    try:
        with open(probe, "w") as f:
            f.write("probe")
    except OSError as exc:
        raise ConfigError(f"output {output!r}: cannot write under {probe_dir} ({exc}); "
                          "write to object storage instead, e.g. output: s3://BUCKET/stores/NAME") from None

    @ray.remote(num_cpus=0, max_retries=0)
    def _sees(p: str) -> bool:
        return os.path.exists(p)

    try:
        refs = {
            n["NodeID"]: _sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            ).remote(probe)
            for n in nodes
        }
        blind = []
        for node_id, ref in refs.items():
            try:
                if not ray.get(ref, timeout=120):
                    blind.append(node_id)
            except Exception:  # a node that cannot even answer cannot be trusted with the output
                blind.append(node_id)
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    if blind:
        where = f"the Ray cluster at {address}" if address else "this Ray cluster"
        addrs = sorted(f"node {n['NodeID'][:12]} at {n.get('NodeManagerAddress', '?')}"
                       for n in nodes if n["NodeID"] in blind)
        raise ConfigError(
            f"output {output!r} is a local path, but {where} has {len(nodes)} nodes and {len(blind)} of them "
            f"({', '.join(addrs)}) do not share this filesystem: their shards would be written where the "
            "others cannot read them. Write to object storage instead, e.g. output: s3://BUCKET/stores/NAME "
            "(or put the path on a filesystem every node mounts)."
        )


# The name the cluster issue uses for the same rule.
featurestore_output_check = check_output_reachable


def new_submission_id(spec: JobSpec) -> str:
    """A readable, unique Ray submission id: <name or job, at most MAX_ID_NAME characters>-<8 hex>.

    Only letters, digits, _ and -: the id goes into URL paths and Ray's log file names."""
    import re

    base = re.sub(r"[^A-Za-z0-9_-]+", "-", spec.name or f"featurestore-{spec.job}").strip("-")
    base = base[:MAX_ID_NAME].rstrip("-_") or "featurestore"
    return f"{base}-{uuid.uuid4().hex[:8]}"
