"""A small on-disk cache of each model's valid cut names, read without importing torch.

extract's driver checks named layers before any actor starts (engine.preflight), which needs a trace
of the model and so an import of torch: ~2.5 s of a short run on 2 cores. The names a model offers
depend only on its architecture (and the weights spec, which may change its config, and the input
size) and on the installed torch, torchvision and timm, so a successful trace records them here and
later runs that ask only for known names skip torch. A name not recorded here still goes through the
real check (typos keep their message and suggestions); the actors check every name again when they
build the model, so a stale entry can only delay a refusal, never change a result. Any problem
reading or writing the cache (corrupt, unwritable) falls back to the trace.

timm's registry of model names is recorded here too, once per timm version: a `timm:NAME` is then
looked up (and a typo given its suggestions) without importing timm, which imports torch. So is the
download URL of each torchvision weights enum member asked for (DEFAULT, IMAGENET1K_V2), once per
torchvision version: whether its file is in torch's cache is then known without importing torchvision;
and each timm architecture's pretrained tags, once per timm version, for `--weights TAG`.

Where: $FEATURESTORE_LAYER_CACHE, else $XDG_CACHE_HOME/featurestore/layers, else
~/.cache/featurestore/layers; one JSON file per (model, weights spec, input size, versions), and
one per timm version for its model names (and per architecture for its tags), one per (model,
weights, torchvision version) for a URL.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Callable, Sequence

log = logging.getLogger("featurestore.layers")

SCHEMA = 1  # bump when what counts as a cut name changes


def cache_dir() -> str:
    """The folder of the cache (see the module docstring)."""
    own = os.environ.get("FEATURESTORE_LAYER_CACHE")
    if own:
        return os.path.expanduser(own)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "featurestore", "layers")


def _versions() -> dict[str, str | None]:
    from featurestore import __version__
    from featurestore.store import package_versions

    return {"featurestore": __version__, **package_versions(("torch", "torchvision", "timm"))}


def _version(package: str) -> str | None:
    from featurestore.store import package_versions

    return package_versions((package,))[package]


def _key(model: str, weights: str | None, input_size: int | None) -> dict:
    weights = "none" if weights is None else str(weights).strip()
    return {"schema": SCHEMA, "model": model, "weights": weights, "input_size": input_size, **_versions()}


def _path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key['model'])}-{digest}.json")


def _read_list(key: dict) -> list[str] | None:
    """The strings recorded under key, or None: not recorded, or unreadable."""
    try:
        with open(_path(key), encoding="utf-8") as f:
            data = json.load(f)
        names = data["names"]
        if data.get("key") != key or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return None
        return names
    except Exception as exc:  # missing, corrupt, unreadable: the caller finds the names the slow way
        log.debug("name cache not used for %s (%s: %s)", key["model"], type(exc).__name__, exc)
        return None


def _write_list(key: dict, names: Sequence[str]) -> None:
    """Record strings under key; atomic (a temporary file renamed), silent on any failure."""
    tmp = None
    try:
        path = _path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "names": list(names)}, f)
        os.replace(tmp, path)
        tmp = None
    except Exception as exc:  # an unwritable cache costs the next run the slow way, nothing else
        log.debug("name cache not written for %s (%s: %s)", key["model"], type(exc).__name__, exc)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def read(model: str, weights: str | None, input_size: int | None) -> list[str] | None:
    """The recorded cut names of this (canonical) model, or None: not recorded, or unreadable."""
    return _read_list(_key(model, weights, input_size))


def write(model: str, weights: str | None, input_size: int | None, names: Sequence[str]) -> None:
    """Record a successful trace's cut names."""
    _write_list(_key(model, weights, input_size), names)


def _listed_per_version(package: str, name: str, list_them: Callable[[], Sequence[str]],
                        empty_is_an_answer: bool) -> tuple[str, ...]:
    """list_them()'s strings, recorded under `name` for the installed version of `package` (read from its
    metadata, so an upgrade lists them again); without the package, list_them() says so (an ImportError)."""
    version = _version(package)
    if version is None:
        return tuple(list_them())
    key = {"schema": SCHEMA, "model": name, package: version}
    names = _read_list(key)
    if names is None or not (names or empty_is_an_answer):
        names = list(list_them())
        _write_list(key, names)
    return tuple(names)


def timm_models(list_them: Callable[[], Sequence[str]]) -> tuple[str, ...]:
    """timm's model names: recorded for the installed timm, else `list_them()` (which imports timm) and
    recorded."""
    return _listed_per_version("timm", "timm-models", list_them, empty_is_an_answer=False)


def timm_tags(model: str, list_them: Callable[[], Sequence[str]]) -> tuple[str, ...]:
    """timm's pretrained tags for one architecture (resnet18: a1_in1k, ..., tv_in1k), recorded per timm
    version like its model names, so `--weights TAG` is checked (and a typo given its suggestions)
    without importing timm. An architecture without tags is recorded as such."""
    return _listed_per_version("timm", f"timm-tags-{model}", list_them, empty_is_an_answer=True)


def known(model: str, weights: str | None, layers: Sequence[str], input_size: int | None) -> bool:
    """True when every layer is a recorded cut name of the model with these weights: the trace can be
    skipped. A torchvision module name (`layer3`) counts when a recorded node lies inside it, as
    load_backbone accepts it (its last node)."""
    if not layers:
        return True
    names = read(model, weights, input_size)
    if not names:
        return False
    valid = set(names)
    prefixes = not model.startswith("timm:")
    return all(layer in valid or (prefixes and any(n.startswith(layer + ".") for n in names)) for layer in layers)


def torchvision_weights_url(model: str, weights: str, resolve: Callable[[], str]) -> str:
    """The download URL of torchvision's `weights` member (as given: DEFAULT, IMAGENET1K_V2) for model:
    recorded for the installed torchvision, else `resolve()` (which imports it) and recorded. A name
    that does not resolve raises there and is not recorded."""
    url = recorded_weights_url(model, weights)
    if url is None:
        url = resolve()
        key = _weights_key(model, weights)
        if key is not None:
            _write_list(key, [url])
    return url


def recorded_weights_url(model: str, weights: str) -> str | None:
    """The URL torchvision_weights_url recorded for (model, weights) with the installed torchvision, or
    None: a name once resolved is known to exist without importing torchvision (`featurestore submit`)."""
    key = _weights_key(model, weights)
    recorded = _read_list(key) if key is not None else None
    return recorded[0] if recorded and len(recorded) == 1 else None


def _weights_key(model: str, weights: str) -> dict | None:
    """None where torchvision is not installed: nothing to record."""
    torchvision = _version("torchvision")
    if torchvision is None:
        return None
    return {"schema": SCHEMA, "model": f"{model}@weights", "weights": str(weights).strip(), "torchvision": torchvision}
