"""The model registry: which backbones exist, what they cost, and where to cut them by default.

torchvision's ImageNet classifiers come from its own registry (list_models /
get_model_weights, whose metadata carries parameters, file size, top-1 and GFLOPs);
timm models are reachable as `timm:NAME`. Depth and the default cut for torchvision
models were found by tracing each graph (see `trace_summary`) and are stored in
_TV_TRACED so that listing the zoo does not build 80 networks.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

__all__ = ["ModelInfo", "UnknownModelError", "UnknownLayerError", "ALIASES", "canonical_name", "family_of",
           "list_models", "model_info", "torchvision_models", "DEFAULT_MODEL"]

DEFAULT_MODEL = "efficientnet_lite0"
# Friendly names for models whose weights ship offline.
ALIASES = {"efficientnet_lite0": "timm:tf_efficientnet_lite0"}

# (family, regex on the torchvision/timm name), first match wins
_FAMILIES = [
    ("wide_resnet", r"^wide_resnet"), ("resnext", r"^resnext"), ("resnet", r"^resnet"),
    ("vgg", r"^vgg"), ("alexnet", r"^alexnet"), ("squeezenet", r"^squeezenet"),
    ("googlenet", r"^googlenet"), ("inception", r"^inception"), ("densenet", r"^densenet"),
    ("mobilenet_v2", r"^mobilenet_?v2"), ("mobilenet_v3", r"^mobilenet_?v3"),
    ("shufflenet_v2", r"^shufflenet_v2"), ("mnasnet", r"^mnasnet"),
    ("efficientnet_lite", r"^(tf_)?efficientnet_lite"), ("efficientnet_v2", r"^(tf_)?efficientnet_?v2"),
    ("efficientnet", r"^(tf_)?efficientnet"), ("regnet", r"^regnet"), ("convnext", r"^convnext"),
    ("vit", r"^vit"), ("swin", r"^swin"), ("maxvit", r"^maxvit"),
]


class UnknownModelError(ValueError):
    """A model name that is neither a torchvision classifier nor a timm model; names the closest ones."""


class UnknownLayerError(ValueError):
    """A layer name the model does not have; names the closest valid ones (raised by backbones)."""


def family_of(name: str) -> str:
    base = name.removeprefix("timm:")
    for family, pattern in _FAMILIES:
        if re.match(pattern, base):
            return family
    return re.split(r"[_\d]", base, maxsplit=1)[0] or base


@lru_cache(maxsize=1)
def torchvision_models() -> tuple[str, ...]:
    import torchvision
    from torchvision.models import list_models as tv_list

    return tuple(tv_list(module=torchvision.models))


@lru_cache(maxsize=1)
def _timm_models() -> tuple[str, ...]:
    """timm's registry; recorded per timm version (layer_names), as importing timm imports torch."""
    from featurestore import layer_names

    def list_them() -> list[str]:
        import timm

        return timm.list_models()

    return layer_names.timm_models(list_them)


def canonical_name(name: str) -> str:
    """'resnet18' -> 'resnet18'; 'efficientnet_lite0' or 'tf_efficientnet_lite0' -> 'timm:tf_efficientnet_lite0'."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}; see `featurestore models`")
    name = name.strip()
    if name in ALIASES:
        return ALIASES[name]
    if name.startswith("timm:"):
        base = name[5:]
        if base in _timm_models():
            return name
        close = difflib.get_close_matches(base, _timm_models(), n=5, cutoff=0.5)
        raise UnknownModelError(
            f"unknown timm model {base!r}" + (f"; closest: {', '.join('timm:' + c for c in close)}" if close else "")
            + "; list them with timm.list_models()")
    # The traced table names torchvision's classifiers without importing torchvision, which
    # takes seconds (torch._dynamo); the driver of a job needs only the name.
    if name in _TV_TRACED or name in torchvision_models():
        return name
    if name in _timm_models():
        return "timm:" + name
    pool = list(torchvision_models()) + list(ALIASES)
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
    close += [f"timm:{c}" for c in difflib.get_close_matches(name, _timm_models(), n=3, cutoff=0.7)]
    raise UnknownModelError(
        f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
        + " (run `featurestore models` for the list; timm models as timm:NAME)")


@dataclass
class ModelInfo:
    """One row of the zoo table (seeds' columns plus ImageNet top-1, GFLOPs and the default cut)."""

    name: str
    family: str
    source: str  # "torchvision" or "timm"
    depth: int | None
    size_mb: float | None  # weights file size on disk
    params_m: float | None
    input_size: int
    top1: float | None
    gflops: float | None
    default_layer: str
    feature_dim: int | None
    default_weights: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tv_info(name: str) -> ModelInfo:
    from torchvision.models import get_model_weights

    member = get_model_weights(name).DEFAULT
    meta = member.meta
    tf = member.transforms()
    crop = tf.crop_size[0] if isinstance(tf.crop_size, (list, tuple)) else tf.crop_size
    metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
    depth, default_layer, dim = _TV_TRACED.get(name, (None, "", None))
    return ModelInfo(
        name=name, family=family_of(name), source="torchvision", depth=depth,
        size_mb=meta.get("_file_size"), params_m=round(meta["num_params"] / 1e6, 2) if "num_params" in meta else None,
        input_size=int(crop), top1=metrics.get("acc@1"), gflops=meta.get("_ops"),
        default_layer=default_layer, feature_dim=dim, default_weights=member.name,
    )


def _timm_info(canonical: str, display: str | None = None) -> ModelInfo:
    """Built on the meta device: parameters and shapes without allocating or downloading anything."""
    import timm
    import torch

    from .weights import DEFAULT_NAMED

    base = canonical[5:]
    with torch.device("meta"):
        model = timm.create_model(base, pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cfg = model.pretrained_cfg or {}
    h = int(cfg.get("input_size", (3, 224, 224))[-1])
    depth = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    return ModelInfo(
        name=display or canonical, family=family_of(base), source="timm", depth=depth,
        size_mb=round(size / 1e6, 2), params_m=round(params / 1e6, 2), input_size=h, top1=_TIMM_TOP1.get(base),
        gflops=None, default_layer="pre_logits", feature_dim=int(dim) if dim else None,
        default_weights=DEFAULT_NAMED.get(canonical, "DEFAULT"),
    )


# ImageNet top-1 of the offline named sources (from the source's own documentation).
_TIMM_TOP1 = {"tf_efficientnet_lite0": 75.1}


def model_info(name: str) -> ModelInfo:
    canonical = canonical_name(name)
    if canonical.startswith("timm:"):
        display = name if name in ALIASES else canonical
        return _timm_info(canonical, display)
    return _tv_info(canonical)


def list_models(family: str | None = None, max_params: float | None = None,
                timm_pattern: str | None = None,
                progress: Callable[[list[str]], Iterable[str]] | None = None) -> list[ModelInfo]:
    """The zoo: every torchvision ImageNet classifier, the offline default, and timm models matching a pattern.

    family matches by prefix ("efficientnet" covers v1, v2 and lite); max_params is in millions.
    Each timm row builds its model on the meta device (about 0.15 s; '*' is 1,300+ models),
    so the family filter runs on the names first, and `progress` wraps the names being built.
    """
    rows = [model_info(a) for a in ALIASES] + [_tv_info(n) for n in torchvision_models()]
    if timm_pattern:
        import timm

        names = timm.list_models(timm_pattern)
        if not names:
            raise UnknownModelError(f"no timm model matches {timm_pattern!r}; try a wildcard such as 'resnet*'")
        if family:
            names = [n for n in names if family_of(n).startswith(family.lower())]
        rows += [_timm_info("timm:" + n) for n in (progress(names) if progress else names)]
    if family:
        fam = family.lower()
        rows = [r for r in rows if r.family.startswith(fam)]
        if not rows:
            families = sorted({f for f, _ in _FAMILIES})
            close = difflib.get_close_matches(fam, families, n=3, cutoff=0.4)
            raise UnknownModelError(f"no model in family {family!r}; families: {', '.join(families)}"
                                    + (f" (closest: {', '.join(close)})" if close else ""))
    if max_params is not None:
        rows = [r for r in rows if r.params_m is not None and r.params_m <= max_params]
    return rows


def trace_summary(name: str) -> tuple[int, str, int]:
    """(depth, default layer, feature dim) of a torchvision model by tracing it on the meta device.

    depth = parametric layers (conv, linear, attention) on the longest path through the graph;
    the default layer is the input of the final classifier layer, skipping dropout.
    """
    import torch
    from torchvision.models import get_model

    from .backbones import _graph_summary

    try:
        with torch.device("meta"):
            model = get_model(name, weights=None).eval()
    except NotImplementedError:  # a few constructors (regnet) copy data during init
        model = get_model(name, weights=None).eval()
    g = _graph_summary(model)
    return g["depth"], g["default"], g["default_dim"]


# Generated with: {n: trace_summary(n) for n in torchvision_models()} (tests re-trace a few).
_TV_TRACED: dict[str, tuple[int, str, int]] = {
    'alexnet': (8, 'classifier.5', 4096),
    'convnext_base': (113, 'classifier.1', 1024),
    'convnext_large': (113, 'classifier.1', 1536),
    'convnext_small': (113, 'classifier.1', 768),
    'convnext_tiny': (59, 'classifier.1', 768),
    'densenet121': (121, 'flatten', 1024),
    'densenet161': (161, 'flatten', 2208),
    'densenet169': (169, 'flatten', 1664),
    'densenet201': (201, 'flatten', 1920),
    'efficientnet_b0': (82, 'flatten', 1280),
    'efficientnet_b1': (116, 'flatten', 1280),
    'efficientnet_b2': (116, 'flatten', 1408),
    'efficientnet_b3': (131, 'flatten', 1536),
    'efficientnet_b4': (161, 'flatten', 1792),
    'efficientnet_b5': (195, 'flatten', 2048),
    'efficientnet_b6': (225, 'flatten', 2304),
    'efficientnet_b7': (274, 'flatten', 2560),
    'efficientnet_v2_l': (340, 'flatten', 1280),
    'efficientnet_v2_m': (246, 'flatten', 1280),
    'efficientnet_v2_s': (171, 'flatten', 1280),
    'googlenet': (22, 'flatten', 1024),
    'inception_v3': (48, 'flatten', 2048),
    'maxvit_t': (147, 'classifier.4', 512),
    'mnasnet0_5': (53, 'mean', 1280),
    'mnasnet0_75': (53, 'mean', 1280),
    'mnasnet1_0': (53, 'mean', 1280),
    'mnasnet1_3': (53, 'mean', 1280),
    'mobilenet_v2': (53, 'flatten', 1280),
    'mobilenet_v3_large': (64, 'classifier.1', 1280),
    'mobilenet_v3_small': (54, 'classifier.1', 1024),
    'regnet_x_16gf': (68, 'flatten', 2048),
    'regnet_x_1_6gf': (56, 'flatten', 912),
    'regnet_x_32gf': (71, 'flatten', 2520),
    'regnet_x_3_2gf': (77, 'flatten', 1008),
    'regnet_x_400mf': (68, 'flatten', 400),
    'regnet_x_800mf': (50, 'flatten', 672),
    'regnet_x_8gf': (71, 'flatten', 1920),
    'regnet_y_128gf': (137, 'flatten', 7392),
    'regnet_y_16gf': (92, 'flatten', 3024),
    'regnet_y_1_6gf': (137, 'flatten', 888),
    'regnet_y_32gf': (102, 'flatten', 3712),
    'regnet_y_3_2gf': (107, 'flatten', 1512),
    'regnet_y_400mf': (82, 'flatten', 440),
    'regnet_y_800mf': (72, 'flatten', 784),
    'regnet_y_8gf': (87, 'flatten', 2016),
    'resnet101': (101, 'flatten', 2048),
    'resnet152': (152, 'flatten', 2048),
    'resnet18': (18, 'flatten', 512),
    'resnet34': (34, 'flatten', 512),
    'resnet50': (50, 'flatten', 2048),
    'resnext101_32x8d': (101, 'flatten', 2048),
    'resnext101_64x4d': (101, 'flatten', 2048),
    'resnext50_32x4d': (50, 'flatten', 2048),
    'shufflenet_v2_x0_5': (51, 'mean', 1024),
    'shufflenet_v2_x1_0': (51, 'mean', 1024),
    'shufflenet_v2_x1_5': (51, 'mean', 1024),
    'shufflenet_v2_x2_0': (51, 'mean', 2048),
    'squeezenet1_0': (18, 'features.12.cat', 512),
    'squeezenet1_1': (18, 'features.12.cat', 512),
    'swin_b': (53, 'flatten', 1024),
    'swin_s': (53, 'flatten', 768),
    'swin_t': (29, 'flatten', 768),
    'swin_v2_b': (54, 'flatten', 1024),
    'swin_v2_s': (54, 'flatten', 768),
    'swin_v2_t': (30, 'flatten', 768),
    'vgg11': (11, 'classifier.4', 4096),
    'vgg11_bn': (11, 'classifier.4', 4096),
    'vgg13': (13, 'classifier.4', 4096),
    'vgg13_bn': (13, 'classifier.4', 4096),
    'vgg16': (16, 'classifier.4', 4096),
    'vgg16_bn': (16, 'classifier.4', 4096),
    'vgg19': (19, 'classifier.4', 4096),
    'vgg19_bn': (19, 'classifier.4', 4096),
    'vit_b_16': (50, 'getitem_5', 768),
    'vit_b_32': (50, 'getitem_5', 768),
    'vit_h_14': (130, 'getitem_5', 1280),
    'vit_l_16': (98, 'getitem_5', 1024),
    'vit_l_32': (98, 'getitem_5', 1024),
    'wide_resnet101_2': (101, 'flatten', 2048),
    'wide_resnet50_2': (50, 'flatten', 2048),
}
