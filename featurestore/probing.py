"""The probe: which backbone, which weights and which layer transfer best to *your* images.

ImageNet accuracy does not always carry over to other data, and networks differ in speed
and size, so the seeds advise trying several. `probe()` does that on the user's own set:
for each backbone (model + weights) it extracts every probed layer in ONE forward pass into
one store, trains a head on each layer with one fixed protocol (classifiers.train: the
deterministic stratified hash split of ids, cross-validated C on the training part), and
measures extraction images/s on this machine. Output, in OUT:

    stores/<model>-<weights>[-<hash>]/   one feature store per backbone (reused on re-runs)
    heads/<store>/<layer>/              the trained heads with their reports
    probe.csv, probe.md                 the table
    probe.png                           accuracy vs relative extraction time, area ~ model size
    probe.json                          rows, configuration, and each store's measured images/s
    sample-<N>-seed<S>.parquet          the stratified subsample (with sample=N)

A store already in OUT with the same configuration, the same images and all the requested
layers is reused (the engine's resume: nothing is computed twice); its images/s come from
probe.json, recorded when it was made. A store lacking a requested layer is left alone and
a new one is extracted beside it (<model>-<weights>-<hash of the request>).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

log = logging.getLogger("featurestore.probe")

PROBE_FORMAT = 1
AUTO = "auto"
DEFAULT = "default"
ANY_MODEL = "*"
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".tar")


class ProbeError(ValueError):
    """The probe cannot run as asked; the message names the input and what to do."""


class ProbeExtractionError(ProbeError):
    """An extraction failed (finished stores are kept; running the probe again goes on)."""


@dataclass
class ProbeConfig:
    """One probe: several backbones (model + weights) at several layers on one labeled image set.

    models:  names, each optionally `MODEL@WEIGHTS` (efficientnet_lite0@none, mobilenet_v2@/path.pth);
             the same model may appear with different weights.
    weights: for entries without @: one spec for all (none, DEFAULT, a file...), or {model: spec};
             None: each model's default weights.
    layers:  "auto" (the global pool and two earlier stage ends), "default" (the model's usual cut),
             layer names, or {model: ...} per model (a model missing from the mapping gets "auto";
             key "*" sets the rest).
    """

    source: str
    out: str
    models: list[str] = field(default_factory=lambda: ["efficientnet_lite0"])
    weights: str | dict[str, str] | None = None
    layers: str | list[str] | dict[str, Any] = AUTO
    sample: int | None = None  # a stratified, deterministic subsample of N images
    head: str = "logreg"
    grid: dict[str, Any] | None = None  # the head's sweep, e.g. {"C": [0.01, 0.1, 1, 10]}; None: its default
    cv: int = 5
    test_size: float = 0.25
    seed: int = 0
    class_weight: str | None = None
    pooling: Literal["avg", "max", "flatten", "none"] = "avg"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    input_size: int | None = None
    crop: Literal["center", "squash", "pad"] = "center"
    decode: Literal["draft", "full"] = "draft"
    batch_size: int = 32
    shard_size: int | None = None  # None: ExtractConfig's default (shrinks for small inputs)
    dtype: Literal["float32", "float16"] = "float32"
    address: str | None = None  # None: an embedded local Ray instance
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    n_jobs: int | None = None  # joblib jobs for the head's CV sweep
    save_heads: bool = True
    plot: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False


# --------------------------------------------------------------------------------------------
# Parsing models, weights and layers (CLI strings, lists or mappings)
# --------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One backbone to probe: a model with its weights, cut at `layers` (one store, one forward pass)."""

    entry: str  # as the user wrote it (model or model@weights)
    model: str  # the model name as given
    canonical: str
    weights: str  # the weights spec handed to the engine (local files made absolute)
    weights_label: str  # how the table names them
    tag: str  # the weights part of the store name
    layers: list[str] = field(default_factory=list)
    layer_notes: dict[str, str] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        return self.weights.strip().lower() == "none"

    @property
    def store_base(self) -> str:
        return f"{_safe(self.model.removeprefix('timm:'))}-{self.tag}"


def _split_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ProbeError(f"expected names as strings, got {item!r}")
        out.extend(p.strip() for p in item.split(",") if p.strip())
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def _is_file_spec(weights: str) -> bool:
    from featurestore.weights import is_file_spec

    return is_file_spec(weights)


def weights_tag(weights: str | None) -> str:
    """The weights part of a store name: none, default, an enum/source name, or a file's stem."""
    if weights is None or weights.strip().upper() == "DEFAULT":
        return "default"
    w = weights.strip()
    if w.lower() == "none":
        return "none"
    if _is_file_spec(w):
        from featurestore.weights import split_recipe

        path, recipe = split_recipe(w)
        stem = os.path.basename(path.rstrip("/"))
        for suffix in _WEIGHT_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return _safe(stem + (f"-{recipe.lower()}" if recipe else ""))
    return _safe(w.lower().replace(":", "-"))


def _weights_label(weights: str) -> str:
    w = weights.strip()
    if w.lower() == "none":
        return "none (random init)"
    if w.upper() == "DEFAULT":
        return "DEFAULT"
    if _is_file_spec(w):
        from featurestore.weights import split_recipe

        path, recipe = split_recipe(w)
        return os.path.basename(path.rstrip("/")) + (f"#{recipe}" if recipe else "")
    return w


def parse_weights(value: str | Mapping[str, str] | None) -> tuple[str | None, dict[str, str]]:
    """(one spec for every model or None, {model: spec}) from "none", "m1=w1,m2=w2" or a mapping."""
    if value is None:
        return None, {}
    if isinstance(value, Mapping):
        return None, {str(k).strip(): str(v).strip() for k, v in value.items()}
    default: str | None = None
    per: dict[str, str] = {}
    for item in _split_list(value):
        key, sep, spec = item.partition("=")
        if sep and key.strip() and not _is_file_spec(key.strip()):
            if not spec.strip():
                raise ProbeError(f"--weights {item!r}: no weights after '='; write MODEL=WEIGHTS")
            per[key.strip()] = spec.strip()
        else:
            if default is not None:
                raise ProbeError(f"--weights: two weights for every model ({default!r} and {item!r}); "
                                 "give one, or MODEL=WEIGHTS pairs, or MODEL@WEIGHTS in --models")
            default = item
    return default, per


def parse_layers(value: str | Sequence[str] | Mapping[str, Any] | None) -> dict[str, list[str]]:
    """{model or "*": [layer tokens]} from "auto", "flatten,layer3" or "resnet18=layer3.1.relu_1,auto".

    Tokens: auto, default or a layer name; MODEL=TOKEN applies to one model (repeat it for more
    layers); unscoped tokens apply to every model not named. A mapping {model: token(s)} works too.
    """
    if value is None:
        return {ANY_MODEL: [AUTO]}
    out: dict[str, list[str]] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            tokens = _split_list(v) if isinstance(v, (str, list, tuple)) else None
            if not tokens:
                raise ProbeError(f"layers for {k!r}: expected a layer name, a list of names, 'auto' or 'default', got {v!r}")
            out.setdefault(str(k).strip(), []).extend(tokens)
    else:
        tokens = _split_list(value)
        if not tokens:
            raise ProbeError("--layers: empty; pass auto, default, layer names or MODEL=LAYER")
        for tok in tokens:
            key, sep, layer = tok.partition("=")
            if sep:
                if not layer.strip() or not key.strip():
                    raise ProbeError(f"--layers {tok!r}: write MODEL=LAYER (e.g. resnet18=layer3.1.relu_1)")
                out.setdefault(key.strip(), []).append(layer.strip())
            else:
                out.setdefault(ANY_MODEL, []).append(tok)
    out.setdefault(ANY_MODEL, [AUTO])
    return out


def parse_candidates(models: str | Sequence[str], weights: str | Mapping[str, str] | None = None) -> list[Candidate]:
    """Backbones from model names (MODEL or MODEL@WEIGHTS) and --weights; unknown models name the closest."""
    from featurestore.zoo import UnknownModelError, canonical_name

    entries = _split_list(models)
    if not entries:
        raise ProbeError("no models given; pass --models resnet18,efficientnet_lite0,... (see `featurestore models`)")
    default_w, per_model = parse_weights(weights)
    cands: list[Candidate] = []
    used_keys: set[str] = set()
    seen: dict[tuple[str, str], str] = {}
    for entry in entries:
        model, at, w = entry.partition("@")
        model = model.strip()
        try:
            canonical = canonical_name(model)
        except UnknownModelError as exc:
            raise ProbeError(f"--models {entry!r}: {exc}") from None
        if at:
            if not w.strip():
                raise ProbeError(f"--models {entry!r}: nothing after '@'; write MODEL@WEIGHTS, e.g. resnet18@none")
            spec = w.strip()
        else:
            key = next((k for k in per_model if k == model or _canonical_or_none(k) == canonical), None)
            if key is not None:
                used_keys.add(key)
                spec = per_model[key]
            else:
                spec = default_w or "DEFAULT"
        if _is_file_spec(spec) and "://" not in spec:
            from featurestore.weights import absolute_file_spec, split_recipe

            file = split_recipe(spec)[0]
            spec = absolute_file_spec(spec)
            if not os.path.isfile(split_recipe(spec)[0]):
                raise ProbeError(f"weights for {model}: file {file} not found; pass an existing state-dict file, "
                                 "an enum name such as DEFAULT, or none")
        ident = (canonical, spec if spec.lower() != "none" else "none")
        if ident in seen:
            raise ProbeError(f"--models: {entry!r} repeats {seen[ident]!r} (same model and weights); list each once")
        seen[ident] = entry
        cands.append(Candidate(entry=entry, model=model, canonical=canonical, weights=spec,
                               weights_label=_weights_label(spec), tag=weights_tag(spec)))
    unused = [k for k in per_model if k not in used_keys]
    if unused:
        raise ProbeError(f"--weights names {', '.join(unused)}, not among --models ({', '.join(entries)}); "
                         "write MODEL=WEIGHTS with a model from --models")
    # two entries whose weights give the same tag (two files with one name) keep apart by the full spec
    by_base: dict[str, list[Candidate]] = {}
    for c in cands:
        by_base.setdefault(c.store_base, []).append(c)
    for group in by_base.values():
        if len(group) > 1:
            for c in group:
                c.tag = f"{c.tag}-{hashlib.sha256(c.weights.encode()).hexdigest()[:6]}"
    return cands


def _canonical_or_none(name: str) -> str | None:
    from featurestore.zoo import canonical_name

    try:
        return canonical_name(name)
    except Exception:
        return None


def auto_layers(infos: list) -> tuple[list[str], dict[str, str]]:
    """The recommended cut points for `layers="auto"`: two stage ends before the last stage, and the
    default (pooled, penultimate) cut. Earlier, more generic layers suit data unlike ImageNet."""
    notes = {i.name: i.note for i in infos}
    stages = [i.name for i in infos if i.recommended and
              (i.note.startswith("stage") or i.note.startswith("end of"))]
    default = next((i.name for i in infos if "(default)" in i.note), None)
    # the last stage feeds the pool: its pooled features are (nearly) the default cut
    earlier = stages[:-1] if len(stages) >= 2 else []
    chosen = earlier[-2:] + ([default] if default else stages[-1:])
    return list(dict.fromkeys(chosen)), {n: notes.get(n, "") for n in chosen}


def resolve_layers(cands: list[Candidate], layers: Mapping[str, list[str]], input_size: int | None) -> None:
    """Fill each candidate's layers from the parsed --layers, validating names against the model."""
    from featurestore.backbones import list_layers
    from featurestore.weights import WeightsError, is_file_spec

    known = {c.entry for c in cands} | {c.model for c in cands} | {c.canonical for c in cands}
    for key in layers:
        if key != ANY_MODEL and key not in known and _canonical_or_none(key) not in {c.canonical for c in cands}:
            raise ProbeError(f"--layers names model {key!r}, not among --models ({', '.join(c.entry for c in cands)})")
    cache: dict[str, list] = {}
    for c in cands:
        tokens = (layers.get(c.entry) or layers.get(c.model)
                  or next((v for k, v in layers.items() if k != ANY_MODEL and _canonical_or_none(k) == c.canonical), None)
                  or layers[ANY_MODEL])
        # a local weights file is read for its classifier (names and shapes only): auto and default then
        # pick cuts a headless file can give
        local_file = c.weights if is_file_spec(c.weights) and "://" not in c.weights.split("#")[0] else None
        key = f"{c.canonical}@{local_file}"
        if key not in cache:
            try:
                cache[key] = list_layers(c.canonical, weights=local_file, input_size=input_size)
            except WeightsError as exc:  # not a checkpoint, or not this model's
                raise ProbeError(f"weights for {c.model}: {exc}") from None
        infos = cache[key]
        names = [i.name for i in infos]
        notes = {i.name: i.note for i in infos}
        default = next((i.name for i in infos if "(default)" in i.note), names[-2] if len(names) > 1 else names[0])
        chosen: list[str] = []
        for tok in tokens:
            if tok.lower() == AUTO:
                auto, auto_notes = auto_layers(infos)
                chosen.extend(auto)
                notes.update(auto_notes)
            elif tok.lower() == DEFAULT:
                chosen.append(default)
            else:
                modules = c.canonical[:5] != "timm:"  # torchvision: a module name cuts at its last node
                if tok not in names and not (modules and any(n.startswith(tok + ".") for n in names)):
                    from featurestore.backbones import _suggest, with_modules

                    # extract's suggestions: a case slip's exact name, stage names before deep nodes
                    pool = with_modules(names) if modules else names
                    listing = f"featurestore layers {c.model}" + (f" --weights {local_file}" if local_file else "")
                    raise ProbeError(f"--layers: {c.model} has no layer {tok!r}{_suggest(tok, pool)}; "
                                     f"list them with `{listing}` (or use auto/default)")
                chosen.append(tok)
        c.layers = list(dict.fromkeys(chosen))
        c.layer_notes = {n: notes.get(n, "") for n in c.layers}


# --------------------------------------------------------------------------------------------
# The output location (a local directory or an fsspec URL)
# --------------------------------------------------------------------------------------------
class _Out:
    def __init__(self, uri: str, storage_options: dict | None = None):
        self.local = "://" not in uri or uri.startswith(("file://", "local://"))
        if self.local:
            path = uri.split("://", 1)[1] if "://" in uri else uri
            self.uri = os.path.abspath(os.path.expanduser(path))
        else:
            self.uri = uri.rstrip("/")
        self.storage_options = storage_options or {}
        self._fs = None

    @property
    def fs(self):
        if self._fs is None:
            from featurestore.sources import url_to_fs

            self._fs, _ = url_to_fs(self.uri, self.storage_options)
        return self._fs

    def join(self, *parts: str) -> str:
        return (os.path.join(self.uri, *parts) if self.local else "/".join([self.uri, *parts]))

    def makedirs(self) -> bool:
        """Create a local output folder (and its missing parents); True when it did not exist before."""
        if not self.local or os.path.isdir(self.uri):
            return False
        top = self.uri
        while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
            top = os.path.dirname(top)
        os.makedirs(self.uri, exist_ok=True)
        self._made_top = top
        return True

    def prune_empty(self) -> None:
        """Remove the empty folders this run created (the output, anything under it, and parents it
        had to make), so a probe that fails before writing anything leaves no trace."""
        for root, _, _ in sorted(os.walk(self.uri), key=lambda w: -len(w[0])):
            try:
                os.rmdir(root)  # only empty ones: anything written is kept
            except OSError:
                pass
        top, folder = getattr(self, "_made_top", self.uri), self.uri
        while folder != top and folder.startswith(top + os.sep):
            folder = os.path.dirname(folder)
            try:
                os.rmdir(folder)
            except OSError:
                break

    def write_bytes(self, rel: str, data: bytes) -> str:
        path = self.join(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(data)
        return path

    def read_text(self, rel: str) -> str | None:
        path = self.join(rel)
        try:
            if self.local:
                with open(path, encoding="utf-8") as f:
                    return f.read()
            with self.fs.open(path, "rb") as f:
                return f.read().decode("utf-8")
        except (FileNotFoundError, OSError):
            return None

    def listdir(self, rel: str) -> list[str]:
        path = self.join(rel)
        if self.local:
            return sorted(os.listdir(path)) if os.path.isdir(path) else []
        try:
            self.fs.invalidate_cache(path)
            return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def upload_dir(self, local_dir: str, rel: str) -> None:
        for root, _, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(root, name)
                sub = os.path.relpath(src, local_dir).replace(os.sep, "/")
                self.fs.put_file(src, self.join(rel, sub))


# --------------------------------------------------------------------------------------------
# The images: listing, the stratified sample
# --------------------------------------------------------------------------------------------
def _list(source: str, storage_options: dict | None):
    from featurestore.sources import list_source

    try:
        listing = list_source(source, storage_options=storage_options or None)
    except (FileNotFoundError, ValueError) as exc:
        raise ProbeError(f"source {source}: {exc}") from None
    labeled = [i for i, v in enumerate(listing.labels) if v >= 0]
    if not labeled:
        raise ProbeError(f"source {source}: no labeled images; the probe trains heads, so it needs a folder per "
                         "class (<root>/<class>/<image>) or a manifest with a label column")
    classes = {int(listing.labels[i]) for i in labeled}
    if len(classes) < 2:
        raise ProbeError(f"source {source}: only one class ({listing.label_names[next(iter(classes))]}); a head needs "
                         "at least two classes")
    return listing


def stratified_sample(ids: Sequence[str], labels: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Indices of a deterministic sample of n labeled items with class proportions kept (largest
    remainder), at least 2 per class; per class, the items with the smallest hash of (seed, id)."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.int64)
    idx = np.flatnonzero(labels >= 0)
    classes, counts = np.unique(labels[idx], return_counts=True)
    total = int(counts.sum())
    if n > total:
        raise ProbeError(f"--sample {n} is larger than the set ({total} labeled images); pass at most {total}, "
                         "or leave --sample out to use every image")
    if n < 2 * len(classes):
        raise ProbeError(f"--sample {n} is too small for {len(classes)} classes: a stratified split needs at least "
                         f"2 images per class (--sample {2 * len(classes)} or more)")
    exact = n * counts / total
    quota = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - quota), kind="stable")[: n - int(quota.sum())]:
        quota[k] += 1
    quota = np.minimum(np.maximum(quota, 2), counts)
    while quota.sum() > n:  # the minimum of 2 borrowed from the largest quotas
        quota[int(np.argmax(np.where(quota > 2, quota, -1)))] -= 1
    chosen: list[int] = []
    for c, q in zip(classes, quota):
        rows = idx[labels[idx] == c]
        keys = [hashlib.blake2b(f"probe-sample:{seed}:{ids[r]}".encode(), digest_size=8).digest() for r in rows]
        order = sorted(range(len(rows)), key=keys.__getitem__)
        chosen.extend(int(rows[i]) for i in order[: int(q)])
    return sorted(chosen)


def _write_sample(out: _Out, listing, n: int, seed: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = stratified_sample(listing.ids, listing.labels, n, seed)
    table = pa.table({
        "path": pa.array([listing.ids[i] for i in rows], pa.string()),
        "label": pa.array([listing.label_names[int(listing.labels[i])] for i in rows], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return out.write_bytes(f"sample-{n}-seed{seed}.parquet", buf.getvalue())


def _ids_digest(ids: Sequence[str], labels, label_names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i, v in zip(ids, labels):
        h.update(f"{i}\t{label_names[int(v)] if int(v) >= 0 else ''}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Stores: find a reusable one or extract a new one
# --------------------------------------------------------------------------------------------
def _request_hash(cand: Candidate, cfg: ProbeConfig, digest: str) -> str:
    key = json.dumps({"model": cand.canonical, "weights": cand.weights, "layers": sorted(cand.layers),
                      "pooling": cfg.pooling, "precision": cfg.precision, "input_size": cfg.input_size,
                      "crop": cfg.crop, "decode": cfg.decode, "dtype": cfg.dtype, "images": digest}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _store_state(uri: str, storage_options: dict | None) -> tuple[dict | None, str | None]:
    """(store.json, digest of its planned images) of an existing store; (None, None) if there is none."""
    from featurestore.store import StoreWriter, _Loc, _read_meta

    try:
        meta = _read_meta(_Loc(uri, storage_options))
    except Exception:
        return None, None
    if meta is None:
        return None, None
    plan = StoreWriter.existing_plan(uri, storage_options=storage_options)
    if plan is None:
        return meta, None
    return meta, _ids_digest(plan.ids, plan.labels, plan.label_names)


def _prefilter(meta: dict, cand: Candidate, cfg: ProbeConfig) -> bool:
    conf = meta.get("config", {})
    if conf.get("model") != cand.canonical or conf.get("pooling") != cfg.pooling:
        return False
    if conf.get("precision") != cfg.precision or conf.get("dtype", cfg.dtype) != cfg.dtype:
        return False
    if not set(cand.layers) <= set(conf.get("layers", [])):
        return False
    if cand.random_init and conf.get("weights") != "none":
        return False
    pre = conf.get("preprocessing", {})
    if cfg.input_size and list(pre.get("input_size", [])) not in ([cfg.input_size, cfg.input_size],):
        return False
    return pre.get("crop", cfg.crop) == cfg.crop and pre.get("decode", cfg.decode) == cfg.decode


def _check_weights(cfg: ProbeConfig, cand: Candidate, source: str) -> None:
    """The weights of a candidate, checked here as the engine would on its actors (an unknown enum
    member, an offline download, a local file that is not a checkpoint): one ProbeError before
    any folder or worker, not a failed extraction that says to run the probe again."""
    from featurestore.engine import preflight
    from featurestore.weights import WeightsError, is_file_spec, read_state_dict, split_recipe
    from featurestore.zoo import UnknownLayerError

    try:
        # as extract decides: workers of an embedded instance share this machine's network and credentials
        workers_here = not (cfg.address or os.environ.get("RAY_ADDRESS"))
        check = preflight(_extract_config(cfg, cand, source, "unused", cand.layers).backbones()[0],
                          cfg.storage_options or None, workers_here)
        if check is not None:
            check()
        elif is_file_spec(cand.weights) and "://" not in cand.weights:
            read_state_dict(split_recipe(cand.weights)[0])
    except WeightsError as exc:
        raise ProbeError(f"weights for {cand.model}: {exc}") from None
    except UnknownLayerError as exc:  # a named layer these weights cannot give (a headless file's logits)
        raise ProbeError(f"--layers for {cand.model}: {exc}") from None


def _extract_config(cfg: ProbeConfig, cand: Candidate, source: str, output: str, layers: list[str]):
    from featurestore.config import ExtractConfig

    return ExtractConfig(
        source=source, output=output, model=cand.canonical, weights=cand.weights, layers=list(layers),
        pooling=cfg.pooling, precision=cfg.precision, input_size=cfg.input_size, crop=cfg.crop,
        decode=cfg.decode, batch_size=cfg.batch_size, shard_size=cfg.shard_size, dtype=cfg.dtype,
        address=cfg.address, actors=cfg.actors, gpus_per_actor=cfg.gpus_per_actor,
        cpus_per_actor=cfg.cpus_per_actor, storage_options=dict(cfg.storage_options), quiet=cfg.quiet,
    )


@dataclass
class StoreUse:
    """How one backbone's store was obtained in this run."""

    name: str
    uri: str
    reused: bool  # an existing store served (resumed or complete)
    computed_shards: int
    skipped_shards: int
    images_per_second: float
    timing: str  # where images/s comes from
    extract_seconds: float | None = None


def _run_extract(cfg, cand, source, uri, layers):
    from featurestore.engine import ExtractError, extract

    try:
        return extract(_extract_config(cfg, cand, source, uri, layers))
    except ExtractError as exc:
        raise ProbeExtractionError(f"extraction for {cand.entry} into {uri} failed: {exc}. Stores already finished are "
                         "kept; run the same probe again to go on") from None


def _expected_config(cfg: ProbeConfig, cand: Candidate, layers: list[str]) -> dict:
    """What store.json's config would say for this backbone cut at `layers`: the backbone is built here,
    in the driver (the same code and seed the engine's actors use), instead of starting an actor."""
    from featurestore.backbones import load_backbone
    from featurestore.store import _jsonable

    try:
        bb = load_backbone(cand.canonical, weights=cand.weights, layers=list(layers), pooling=cfg.pooling,
                           precision=cfg.precision, device="cpu", input_size=cfg.input_size, crop=cfg.crop,
                           decode=cfg.decode, storage_options=cfg.storage_options or None)
    except Exception as exc:
        raise ProbeError(f"{cand.entry}: the backbone cannot be built: {exc}") from None
    return _jsonable({**bb.config(), "dtype": cfg.dtype, "compression": "none"})


def _obtain_store(cfg: ProbeConfig, cand: Candidate, out: _Out, source: str, digest: str,
                  records: dict[str, dict], say) -> StoreUse:
    """Reuse a store in OUT/stores with this backbone's configuration, these images and every requested
    layer (complete: nothing runs; partial: the engine resumes it), or extract a new one."""
    from featurestore.store import StoreConfigMismatch, _diff

    so = cfg.storage_options or None
    existing = out.listdir("stores")
    pattern = re.compile(re.escape(cand.store_base) + r"(-[0-9a-f]{8}(-\d+)?)?$")
    result = None
    chosen = None
    meta = None
    for name in [n for n in existing if pattern.fullmatch(n)]:
        uri = out.join("stores", name)
        meta, plan_digest = _store_state(uri, so)
        if meta is None or plan_digest != digest or not _prefilter(meta, cand, cfg):
            continue
        diffs = _diff(meta.get("config", {}), _expected_config(cfg, cand, list(meta["config"]["layers"])))
        if diffs:
            log.info("%s: not reusable, another configuration (%s)", uri, "; ".join(diffs))
            continue
        if meta.get("status") != "complete":
            try:  # unfinished: the engine resumes it, committed shards are skipped
                result = _run_extract(cfg, cand, source, uri, list(meta["config"]["layers"]))
            except StoreConfigMismatch as exc:
                log.info("%s: not reusable (%s)", uri, exc)
                continue
        chosen = name
        break
    if chosen is None:
        chosen = cand.store_base
        if chosen in existing:
            chosen = f"{cand.store_base}-{_request_hash(cand, cfg, digest)}"
            k = 2
            while chosen in existing:
                chosen = f"{cand.store_base}-{_request_hash(cand, cfg, digest)}-{k}"
                k += 1
        uri = out.join("stores", chosen)
        say(f"  extracting {len(cand.layers)} layer(s) into {uri}")
        result = _run_extract(cfg, cand, source, uri, cand.layers)
        reused = False
    else:
        uri = out.join("stores", chosen)
        reused = True
        if result is None:
            say(f"  reusing {uri} (complete, same configuration and images: nothing to compute)")
        else:
            say(f"  resumed {uri} ({len(result.skipped_shards)} shard(s) already there, "
                f"{len(result.computed_shards)} computed now)")
    num_shards = int(meta.get("num_shards", 0)) if (meta is not None and result is None) else 0
    computed = len(result.computed_shards) if result is not None else 0
    skipped = len(result.skipped_shards) if result is not None else num_shards
    record = records.get(chosen)
    if record is not None and "startup_seconds" not in record:
        record = None  # a whole run's rate (probe.json before 2026-11-24): not comparable with the others
    if result is not None and computed and _speed(result) > 0:
        new = {"images_per_second": _speed(result), "seconds": result.seconds,
               "startup_seconds": result.startup_seconds, "computed_shards": computed, "total_shards": result.shards, "rows": result.rows,
               "measured": _now(), "host": socket.gethostname(), "how": "extraction",
               "actors": result.actors}
        if record is None or computed >= int(record.get("computed_shards", 0)) or record.get("how") != "extraction":
            record = new
        records[chosen] = record
        timing = "this run" if record is new else f"recorded {record['measured']}"
    elif record is not None:
        timing = f"recorded {record['measured']}"
    else:  # a store made elsewhere, or timed the old way: time the same extraction on a slice of the images
        record = _timing_run(cfg, cand, out, source, digest, chosen, say)
        records[chosen] = record
        timing = "this run (timing extraction)"
    return StoreUse(name=chosen, uri=uri, reused=reused, computed_shards=computed, skipped_shards=skipped,
                    images_per_second=float(record["images_per_second"]), timing=timing,
                    extract_seconds=result.seconds if result is not None else None)


def _speed(result) -> float:
    """A backbone's images/s once its actors were up. The whole run's rate would charge the first backbone
    of a probe with Ray's worker start-up (16.8 s against 3.3 s for the next one on 300 images here, which
    made mobilenet_v2 look 2.5x slower than efficientnet_lite0 when it ran faster): a fixed cost that says
    nothing of the backbone's speed on a large set."""
    steady = result.steady_images_per_second
    return steady if steady > 0 else result.images_per_second


def _timing_run(cfg, cand, out: _Out, source, digest, name, say) -> dict:
    """images/s of a store that has no record: extract up to 256 of the images into a scratch store."""
    listing = _list(source, cfg.storage_options)
    n = min(len(listing.ids), 256)
    scratch = _Out(out.join("timing", f"{name}-{os.getpid()}"), cfg.storage_options)
    say(f"  no recorded images/s for {name}: timing {n} images")
    manifest = source
    if n < len(listing.ids):
        n = max(n, 2 * len(set(int(v) for v in listing.labels if v >= 0)))
        manifest = _write_sample(scratch, listing, n, cfg.seed)
    result = _run_extract(cfg, cand, manifest, scratch.join("store"), cand.layers)
    rec = {"images_per_second": _speed(result), "seconds": result.seconds, "startup_seconds": result.startup_seconds,
           "computed_shards": len(result.computed_shards), "total_shards": result.shards, "rows": result.rows,
           "measured": _now(), "host": socket.gethostname(), "how": f"timing extraction of {result.rows} images",
           "actors": result.actors}
    _remove_tree(scratch)
    return rec


def _remove_tree(out: _Out) -> None:
    try:
        if out.local:
            import shutil

            shutil.rmtree(out.uri, ignore_errors=True)
        else:
            out.fs.rm(out.uri, recursive=True)
    except Exception:  # scratch left behind is harmless
        pass


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------
# Rows, the table and the plot
# --------------------------------------------------------------------------------------------
@dataclass
class ProbeRow:
    model: str
    weights: str  # how the table names them (file name, none (random init), enum)
    layer: str
    dim: int
    accuracy: float
    balanced_accuracy: float
    images_per_second: float
    params_m: float | None
    size_mb: float | None
    relative_time: float = 1.0  # time per image / the fastest backbone's
    best_accuracy: bool = False
    pareto: bool = False
    layer_note: str = ""
    weights_id: str = ""
    weights_sha256: str = ""
    C: float | None = None
    n_train: int = 0
    n_test: int = 0
    store: str = ""
    reused: bool = False
    timing: str = ""
    head: str = ""
    ranked_by: str = "accuracy"  # or balanced_accuracy (class weights: imbalanced data); set by mark_best

    @property
    def key(self) -> str:
        return f"{self.model}|{self.weights}|{self.layer}"

    @property
    def score(self) -> float:
        """What the rows are ranked by: accuracy, or balanced accuracy for a probe with class weights."""
        return self.balanced_accuracy if self.ranked_by == "balanced_accuracy" else self.accuracy

    @property
    def best(self) -> str:
        tags = ([f"highest {metric_name(self.ranked_by)}"] if self.best_accuracy else []) + \
            (["Pareto"] if self.pareto else [])
        return ", ".join(tags)


def metric_name(ranked_by: str) -> str:
    return ranked_by.replace("_", " ")


CSV_COLUMNS = ["model", "weights", "layer", "dim", "accuracy", "balanced_accuracy", "images_per_second",
               "relative_time", "params_m", "size_mb", "best", "layer_note", "weights_id", "weights_sha256", "C",
               "n_train", "n_test", "store", "reused", "timing", "head"]


def mark_best(rows: list[ProbeRow], ranked_by: str = "accuracy") -> None:
    """relative_time from images/s; flag the highest score and the Pareto front (score up, time down).

    ranked_by: accuracy, or balanced_accuracy where classes are weighted (imbalanced data: accuracy
    rewards a layer that predicts the majority class, and the heads' sweep already scores balanced)."""
    if not rows:
        return
    fastest = max(r.images_per_second for r in rows)
    for r in rows:
        r.relative_time = fastest / r.images_per_second if r.images_per_second > 0 else math.inf
        r.ranked_by = ranked_by
    top = max(r.score for r in rows)
    for r in rows:
        r.best_accuracy = r.score == top
        r.pareto = not any(
            q is not r and q.relative_time <= r.relative_time and q.score >= r.score
            and (q.relative_time < r.relative_time or q.score > r.score)
            for q in rows)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def to_csv(rows: list[ProbeRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        d = dataclasses.asdict(r)
        d["best"] = r.best
        w.writerow(["" if d[c] is None else (repr(d[c]) if isinstance(d[c], float) else d[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


MD_HEADER = ["model", "weights", "layer", "dim", "accuracy", "balanced acc.", "images/s", "rel. time",
             "params (M)", "size (MB)", "best"]


def md_cells(r: ProbeRow) -> list[str]:
    return [r.model, r.weights, f"`{r.layer}`", str(r.dim), f"{r.accuracy:.4f}", f"{r.balanced_accuracy:.4f}",
            f"{r.images_per_second:.1f}", f"{r.relative_time:.2f}", _fmt(r.params_m, ".2f"), _fmt(r.size_mb, ".1f"),
            r.best]


def to_markdown_table(rows: list[ProbeRow]) -> str:
    lines = ["| " + " | ".join(MD_HEADER) + " |", "|" + "|".join("---" for _ in MD_HEADER) + "|"]
    lines += ["| " + " | ".join(md_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """The rows of the first table in probe.md, as {header: cell} (cells stripped of backticks)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip().strip("`") for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def _annotate(ax, fig, rows: list[ProbeRow]) -> None:
    """Label every point with its layer (Pareto points also with the model, in bold), rows at the same
    spot sharing one label, and labels nudged apart vertically so that none overlap."""
    groups: dict[tuple[float, float], list[ProbeRow]] = {}
    for r in rows:
        groups.setdefault((round(r.relative_time, 6), round(r.score, 6)), []).append(r)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed: list = []  # the drawn labels' boxes, in pixels
    line_px = 11.0 * fig.dpi / 72.0
    style = dict(textcoords="offset points", fontsize=7.5, va="center", zorder=4)
    # best first, so the labels that matter sit closest to their points
    for (x, y), group in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        pareto = any(r.pareto for r in group)
        head = f"{group[0].model} ({group[0].weights}): " if pareto else ""
        text = head + ", ".join(r.layer for r in group)
        if any(r.best_accuracy for r in group):
            text += f"  [highest {metric_name(group[0].ranked_by)}]"
        weight = "bold" if pareto else "normal"
        # the label's own rendered box, not a guess of its width: a long label (a model and a weights
        # file) reaches over a neighbour's that starts a few hundred pixels to its right
        trial = ax.annotate(text, (x, y), xytext=(10, 0), fontweight=weight, **style)
        dy = 0.0
        for step in range(60):
            trial.xyann = (10, dy * 72.0 / fig.dpi)
            box = trial.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            dy = -(step // 2 + 1) * line_px if step % 2 == 0 else (step // 2 + 1) * line_px
        trial.remove()
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(10, dy * 72.0 / fig.dpi), fontweight=weight,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="grey") if dy else None, **style)


def plot(rows: list[ProbeRow], path_or_file, title: str = "") -> list[dict]:
    """The seeds' figure on the user's data: test accuracy (balanced where the rows are ranked by it) against
    relative extraction time, marker area proportional to model size (MB), the best and the Pareto front labelled.

    Returns the points as drawn (read back from the plotted artists), which also go into the PNG's
    text metadata under "featurestore.probe.points"."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sizes = [r.size_mb or 0.0 for r in rows]
    scale = 1500.0 / max(max(sizes), 1e-9)
    backbones = list(dict.fromkeys((r.model, r.weights) for r in rows))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        color = cmap(backbones.index((r.model, r.weights)) % 10)
        sc = ax.scatter([r.relative_time], [r.score], s=[(r.size_mb or 0.0) * scale], color=color, alpha=0.5,
                        edgecolors="black" if r.pareto else "none", linewidths=1.5 if r.pareto else 0, zorder=3)
        sc.set_gid("row:" + r.key)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.relative_time)
    if len(front) > 1:
        ax.plot([r.relative_time for r in front], [r.score for r in front], "--", color="grey", lw=1, zorder=2,
                label="Pareto front")
    for i, (model, weights) in enumerate(backbones):
        ax.scatter([], [], color=cmap(i % 10), alpha=0.55, s=80, label=f"{model} ({weights})")
    ax.set_xlabel("relative extraction time per image (1 = fastest backbone on this machine)")
    ax.set_ylabel(f"test {metric_name(rows[0].ranked_by) if rows else 'accuracy'}")
    ax.set_title(title or "Backbone probe", fontsize=10)
    ax.grid(True, alpha=0.3, zorder=0)
    lo = min(r.score for r in rows)
    ax.set_ylim(max(0.0, lo - 0.08), min(1.04, max(r.score for r in rows) + 0.06))
    xmax = max(r.relative_time for r in rows)
    ax.set_xlim(0.8, xmax * 1.25 + 0.2)
    ax.legend(fontsize=8, loc="best", title="marker area ~ model size (MB)", title_fontsize=8)
    fig.tight_layout()
    _annotate(ax, fig, rows)
    points = []
    for coll in ax.collections:
        gid = coll.get_gid()
        if gid and gid.startswith("row:"):
            (x, y), = coll.get_offsets().tolist()
            points.append({"key": gid[4:], "x": float(x), "y": float(y), "area": float(coll.get_sizes()[0]),
                           "area_per_mb": scale})
    fig.savefig(path_or_file, dpi=110, format="png", bbox_inches="tight",
                metadata={"featurestore.probe.points": json.dumps(points), "Software": "featurestore probe"})
    plt.close(fig)
    return points


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    rows: list[ProbeRow]
    out: str
    csv: str
    markdown: str
    json: str
    png: str | None
    stores: dict[str, StoreUse]
    n_images: int
    label_names: list[str]

    def best(self) -> ProbeRow:
        """The most accurate row (ties: the fastest)."""
        return min((r for r in self.rows if r.best_accuracy), key=lambda r: r.relative_time)

    def pareto(self) -> list[ProbeRow]:
        return sorted((r for r in self.rows if r.pareto), key=lambda r: r.relative_time)

    def table(self) -> str:
        return to_markdown_table(self.rows)

    def __repr__(self) -> str:
        return f"ProbeResult({len(self.rows)} rows, out={self.out!r})"


def _model_sizes(model: str) -> tuple[float | None, float | None]:
    """Parameters (millions) and weights size (MB) from the zoo: the architecture's, whatever the weights."""
    from featurestore.zoo import model_info

    try:
        info = model_info(model)
        return info.params_m, info.size_mb
    except Exception as exc:  # pragma: no cover - the zoo knows every model it canonicalised
        log.warning("no size for %s: %s", model, exc)
        return None, None


def _load_record(out: _Out) -> dict:
    text = out.read_text("probe.json")
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        log.warning("%s is not valid JSON; starting a new probe record", out.join("probe.json"))
        return {}
    return data if isinstance(data, dict) else {}


def probe(source: str | ProbeConfig | None = None, models: str | Sequence[str] | None = None,
          out: str | None = None, **kwargs: Any) -> ProbeResult:
    """Probe backbones × layers on the labeled images at `source`; write the table and plot into `out`.

        featurestore.probe("data/animals", ["efficientnet_lite0", "resnet18@none"], out="probe/animals",
                           layers="auto", sample=600)

    Also accepts a ProbeConfig. Returns a ProbeResult (rows, paths of probe.csv/.md/.png/.json).
    """
    if isinstance(source, ProbeConfig):
        if models is not None or out is not None or kwargs:
            raise TypeError("pass either a ProbeConfig or keyword fields, not both")
        cfg = source
    else:
        data = dict(kwargs)
        if models is not None:
            data["models"] = _split_list(models)
        cfg = ProbeConfig(source=source, out=out, **data)  # type: ignore[arg-type]
    if not cfg.source:
        raise ProbeError("no source given; pass a folder per class or a CSV/TSV/Parquet manifest")
    if not cfg.out:
        raise ProbeError("no output given; pass --out DIR")
    from classifiers.heads import HEADS

    if cfg.head not in HEADS:
        raise ProbeError(f"head {cfg.head!r}: choose one of {', '.join(HEADS)}")
    if cfg.sample is not None and cfg.sample < 1:
        raise ProbeError(f"--sample {cfg.sample}: must be a positive number of images")
    say = (lambda msg: None) if cfg.quiet else (lambda msg: print(f"probe: {msg}", file=sys.stderr, flush=True))
    started = time.perf_counter()

    cands = parse_candidates(cfg.models, cfg.weights)
    resolve_layers(cands, parse_layers(cfg.layers), cfg.input_size)
    source = cfg.source if "://" in cfg.source else os.path.abspath(os.path.expanduser(cfg.source))
    output = _Out(cfg.out, cfg.storage_options)
    listing = _list(source, cfg.storage_options)
    if cfg.sample is not None:
        stratified_sample(listing.ids, listing.labels, cfg.sample, cfg.seed)  # a bad --sample: before any folder
    for cand in cands:
        _check_weights(cfg, cand, source)
    from featurestore.engine import connect

    connect(cfg.address)  # before any timing: the first backbone must not pay for starting Ray
    made = output.makedirs()
    try:
        return _probe(cfg, cands, output, source, listing, say, started)
    except BaseException:
        if made:
            output.prune_empty()
        raise


def _probe(cfg: ProbeConfig, cands: list, output: _Out, source: str, listing, say, started: float) -> ProbeResult:
    engine_source = source
    if cfg.sample is not None:
        engine_source = _write_sample(output, listing, cfg.sample, cfg.seed)
        listing = _list(engine_source, cfg.storage_options)
        say(f"stratified sample of {len(listing.ids)} images in {engine_source}")
    digest = _ids_digest(listing.ids, listing.labels, listing.label_names)
    record = _load_record(output)
    store_records: dict[str, dict] = dict(record.get("stores", {}))
    uses: dict[str, StoreUse] = {}
    rows: list[ProbeRow] = []
    import classifiers
    from featurestore.store import open_store

    for k, cand in enumerate(cands, 1):
        say(f"[{k}/{len(cands)}] {cand.model} with weights {cand.weights_label}: layers {', '.join(cand.layers)}")
        use = _obtain_store(cfg, cand, output, engine_source, digest, store_records, say)
        uses[cand.entry] = use
        _save_record(output, record, store_records, cfg, rows=None)  # timings survive a later failure
        reader = open_store(use.uri, storage_options=cfg.storage_options or None)
        params_m, size_mb = _model_sizes(cand.model)
        for layer in cand.layers:
            head_rel = f"heads/{use.name}/{_safe(layer)}"
            head_dir = output.join(head_rel) if (cfg.save_heads and output.local) else None
            tmp_dir = None
            if cfg.save_heads and not output.local:
                import tempfile

                tmp_dir = head_dir = tempfile.mkdtemp(prefix="featurestore-probe-head-")
            head = classifiers.train(reader, head=cfg.head, layer=layer, grid=cfg.grid, cv=cfg.cv, test_size=cfg.test_size,
                                     seed=cfg.seed, class_weight=cfg.class_weight, out=head_dir, n_jobs=cfg.n_jobs)
            if tmp_dir is not None:
                import shutil

                output.upload_dir(tmp_dir, head_rel)
                shutil.rmtree(tmp_dir, ignore_errors=True)
            rep = head.report or {}
            if not rep.get("n"):
                raise ProbeError(f"{use.uri}: no labeled test rows for layer {layer}; use more images "
                                 "(at least 2 per class) or a larger test_size")
            conf = reader.config
            shape = reader.meta.get("layers", {}).get(layer, {}).get("shape", [])
            weights_label = cand.weights_label if cand.weights_label != "DEFAULT" else str(conf.get("weights", "DEFAULT"))
            row = ProbeRow(
                model=cand.model, weights=weights_label, layer=layer, dim=int(math.prod(shape)) if shape else 0,
                accuracy=float(rep["accuracy"]), balanced_accuracy=float(rep["balanced_accuracy"]),
                images_per_second=use.images_per_second, params_m=params_m, size_mb=size_mb,
                layer_note=cand.layer_notes.get(layer, ""), weights_id=str(conf.get("weights", "")),
                weights_sha256=str(conf.get("weights_sha256", "")), C=(head.params or {}).get("C"),
                n_train=int(rep.get("n_train", 0)), n_test=int(rep["n"]), store=use.uri, reused=use.reused,
                timing=use.timing, head=output.join(head_rel) if cfg.save_heads else "")
            rows.append(row)
            say(f"  {layer}: accuracy {row.accuracy:.4f}, balanced {row.balanced_accuracy:.4f} "
                f"(dim {row.dim}, C={row.C}), {row.images_per_second:.1f} images/s")
    mark_best(rows, "balanced_accuracy" if cfg.class_weight is not None else "accuracy")

    title = (f"Probe on {os.path.basename(source.rstrip('/'))}: {len(listing.ids)} images, "
             f"{len(listing.label_names)} classes, {cfg.head} head")
    png_path = None
    if cfg.plot:
        buf = io.BytesIO()
        plot(rows, buf, title)
        png_path = output.write_bytes("probe.png", buf.getvalue())
    csv_path = output.write_bytes("probe.csv", to_csv(rows).encode())
    md = _markdown(rows, cfg, source, listing, png_path is not None)
    md_path = output.write_bytes("probe.md", md.encode())
    json_path = _save_record(output, record, store_records, cfg, rows=rows, n_images=len(listing.ids),
                             label_names=listing.label_names, engine_source=engine_source,
                             seconds=time.perf_counter() - started)
    say(f"wrote {md_path}, {csv_path}" + (f", {png_path}" if png_path else ""))
    return ProbeResult(rows=rows, out=output.uri, csv=csv_path, markdown=md_path, json=json_path, png=png_path,
                       stores=uses, n_images=len(listing.ids), label_names=list(listing.label_names))


def _markdown(rows: list[ProbeRow], cfg: ProbeConfig, source: str, listing, has_png: bool) -> str:
    n_test = rows[0].n_test if rows else 0
    lines = [
        f"# Backbone probe: {source}",
        "",
        f"{len(listing.ids)} images, {len(listing.label_names)} classes ({', '.join(listing.label_names)})"
        + (f", a stratified sample of {cfg.sample}" if cfg.sample else "") + ". "
        f"Protocol, the same for every row: {cfg.head} head, deterministic stratified split of ids "
        f"({n_test} test images), C cross-validated ({cfg.cv}-fold) on the training part; "
        f"{cfg.pooling} pooling. images/s: the whole extraction on this machine (decode, forward, write, "
        "start-up included), one forward pass per backbone for all its layers; "
        "rel. time = time per image / the fastest backbone's.",
        "",
        to_markdown_table(rows).rstrip("\n"),
        "",
    ]
    best = [r for r in rows if r.best_accuracy]
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.relative_time)
    name = metric_name(rows[0].ranked_by) if rows else "accuracy"
    if best:
        lines.append(f"Highest {name}: " + "; ".join(f"{r.model} ({r.weights}) at `{r.layer}` ({r.score:.4f})"
                                                    for r in best) + ".")
    if front:
        better = "more accurate" if name == "accuracy" else f"higher in {name}"
        lines.append(f"Pareto front (no other row is both faster and {better}): "
                     + "; ".join(f"{r.model} ({r.weights}) `{r.layer}`" for r in front) + ".")
    if has_png:
        lines += ["", f"![{name} against relative extraction time](probe.png)"]
    return "\n".join(lines) + "\n"


def _save_record(out: _Out, record: dict, stores: dict, cfg: ProbeConfig, rows: list[ProbeRow] | None,
                 **extra: Any) -> str:
    data = dict(record)
    data["format"] = PROBE_FORMAT
    data["stores"] = stores
    if rows is not None:
        data["config"] = dataclasses.asdict(cfg) | {"storage_options": {k: "***" for k in cfg.storage_options}}
        data["rows"] = [dataclasses.asdict(r) | {"best": r.best} for r in rows]
        data["finished"] = _now()
        data.update(extra)
    record.clear()
    record.update(data)
    return out.write_bytes("probe.json", json.dumps(data, indent=2, default=str).encode())
