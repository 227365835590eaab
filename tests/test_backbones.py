"""Cutting real torchvision/timm networks (random init) at several layers: shapes, pooling, precision."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.backbones import UnknownLayerError, list_layers, load_backbone
from featurestore.zoo import UnknownModelError

# (model, input size, layers to cut at: two or more recommended points)
CASES = [
    ("resnet18", 64, ["layer2", "layer4.1.relu_1", "flatten"]),
    ("vgg11", 32, ["features.10", "features.20"]),
    ("mobilenet_v2", 64, ["features.6", "features.18", "flatten"]),
    ("efficientnet_b0", 64, ["features.3", "features.8", "flatten"]),
    ("densenet121", 64, ["features.transition1.pool", "features.norm5"]),
    ("vit_b_16", 32, ["encoder.layers.encoder_layer_1.add_1", "encoder.ln", "getitem_5"]),
    ("timm:tf_efficientnet_lite0", 64, ["blocks.2", "blocks.6", "features", "pre_logits"]),
    ("timm:vit_tiny_patch16_224", 32, ["blocks.3", "blocks.11", "pre_logits"]),
]


@pytest.mark.parametrize("model,size,layers", CASES, ids=[c[0] for c in CASES])
def test_cut_shapes_match_list_layers(model, size, layers):
    listed = {info.name: info for info in list_layers(model, input_size=size)}
    bb = load_backbone(model, "none", layers=layers, pooling="none", input_size=size)
    x = torch.randn(2, 3, size, size)
    out = bb(x)
    assert list(out) == layers
    for layer in layers:
        # torchvision accepts a module name for the output of its last node
        name = layer if layer in listed else [n for n in listed if n.startswith(layer + ".")][-1]
        assert tuple(out[layer].shape) == (2, *listed[name].shape), layer
        assert out[layer].dtype == torch.float32
    assert sum(info.recommended for info in listed.values()) >= 3
    # avg pooling: [N, C] from each layer, channels as listed (tokens [T, C] -> C; NCHW -> C)
    pooled = load_backbone(model, "none", layers=layers, pooling="avg", input_size=size)(x)
    for layer in layers:
        shape = listed[layer if layer in listed else [n for n in listed if n.startswith(layer + ".")][-1]].shape
        expect = shape[0] if len(shape) == 3 and not model.startswith("vit") else shape[-1]
        assert pooled[layer].shape == (2, expect), layer


def test_vgg16_flatten_and_avg_at_last_pool():
    bb = load_backbone("vgg16", "none", layers=["features.30", "logits"], pooling="flatten")
    assert bb.preprocessing.input_size == (224, 224)
    x = torch.randn(1, 3, 224, 224)
    out = bb(x)
    assert out["features.30"].shape == (1, 25088) and out["logits"].shape == (1, 1000)
    assert bb.feature_shapes["features.30"] == (25088,)
    bb.pooling = "avg"  # the same network, pooled the other way
    avg = bb(x)["features.30"]
    assert avg.shape == (1, 512)
    assert torch.allclose(avg, out["features.30"].view(1, 512, 49).mean(-1), atol=1e-5)


def test_default_cut_is_penultimate_and_config_is_json():
    bb = load_backbone("resnet18", "none", input_size=32)
    assert bb.layers == ("flatten",) and bb.feature_shapes == {"flatten": (512,)}
    cfg = json.loads(json.dumps(bb.config()))
    assert cfg["model"] == "resnet18" and cfg["weights"] == "none" and len(cfg["weights_sha256"]) == 64
    assert cfg["preprocessing"]["input_size"] == [32, 32]
    feats = bb.extract([__import__("PIL.Image").Image.new("RGB", (40, 50), (10, 200, 30))])
    assert feats["flatten"].shape == (1, 512) and feats["flatten"].dtype == np.float32


def test_pooling_max_and_flatten_dims():
    x = torch.randn(2, 3, 32, 32)
    mx = load_backbone("resnet18", "none", layers=["layer3"], pooling="max", input_size=32)(x)["layer3"]
    fl = load_backbone("resnet18", "none", layers=["layer3"], pooling="flatten", input_size=32)(x)["layer3"]
    assert mx.shape == (2, 256) and fl.shape == (2, 256 * 2 * 2)
    assert torch.allclose(mx, fl.view(2, 256, 4).amax(-1))


def test_random_init_is_seeded():
    a = load_backbone("resnet18", "none", input_size=32, seed=0)
    b = load_backbone("resnet18", "none", input_size=32, seed=0)
    c = load_backbone("resnet18", "none", input_size=32, seed=1)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(x)["flatten"], b(x)["flatten"])


def test_bf16_on_cpu_and_channels_last():
    x = torch.randn(2, 3, 32, 32)
    ref = load_backbone("resnet18", "none", layers=["layer4", "logits"], input_size=32)(x)
    bf = load_backbone("resnet18", "none", layers=["layer4", "logits"], precision="bf16", input_size=32)(x)
    cl = load_backbone("resnet18", "none", layers=["layer4", "logits"], channels_last=True, input_size=32)(x)
    for k in ref:
        assert bf[k].dtype == torch.float32
        assert torch.allclose(bf[k], ref[k], rtol=0.1, atol=0.1 * ref[k].abs().max().item())
        assert torch.allclose(cl[k], ref[k], rtol=1e-4, atol=1e-4)


def test_swin_nhwc_stage_pools_over_space():
    bb = load_backbone("swin_t", "none", layers=["features.5", "norm"], pooling="avg", input_size=64)
    out = bb(torch.randn(1, 3, 64, 64))
    assert out["features.5"].shape == (1, 384) and out["norm"].shape == (1, 768)


def test_unknown_model_and_layer_name_alternatives():
    with pytest.raises(UnknownModelError, match="resnet18"):
        load_backbone("resnet-18", "none")
    with pytest.raises(UnknownModelError, match="timm:"):
        load_backbone("timm:tf_efficientnet_lite9", "none")
    with pytest.raises(UnknownLayerError, match="layer4"):
        load_backbone("resnet18", "none", layers=["layer5"], input_size=32)
    with pytest.raises(UnknownLayerError, match="blocks"):
        load_backbone("efficientnet_lite0", "none", layers=["block.3"], input_size=32)
    with pytest.raises(ValueError, match="pooling"):
        load_backbone("resnet18", "none", pooling="mean")
    for size in (0, -5, 22.5):
        with pytest.raises(ValueError, match=rf"input_size must be a whole number of pixels >= 1, got {size}"):
            load_backbone("resnet18", "none", input_size=size)


def test_misspelt_layer_suggestions_prefer_the_intended_name():
    def suggestion(model, layer):
        with pytest.raises(UnknownLayerError) as err:
            load_backbone(model, "none", layers=[layer], input_size=32)
        return str(err.value)

    # a case slip: the exact name, not a deep node that happens to share letters
    msg = suggestion("resnet18", "Layer3")
    assert "did you mean 'layer3'" in msg and "layer3.1.bn2" not in msg
    assert "did you mean 'logits'" in suggestion("resnet18", "LOGITS")
    assert "did you mean 'layer3.1.bn2'" in suggestion("resnet18", "Layer3.1.BN2")
    # a typo in a stage name: stage names (module names count: layer3 is a cut) before deep nodes
    msg = suggestion("resnet18", "layr3")
    assert msg.split("closest: ")[1].startswith("layer3, ")
    # a typo deep down: the nearby deep nodes
    assert "closest: layer3.1.bn2, layer3.1.bn1" in suggestion("resnet18", "layer3.1.bn")
    # timm: the hint names the timm model, not the torchvision one of the same name
    msg = suggestion("timm:resnet18", "Layer3")
    assert "did you mean 'layer3'" in msg and "`featurestore layers timm:resnet18`" in msg


def test_the_input_node_is_not_a_layer():
    with pytest.raises(UnknownLayerError, match="'x' is the input image itself, not a feature"):
        load_backbone("resnet18", "none", layers=["x"], input_size=32)
    assert "x" not in [r.name for r in list_layers("resnet18", input_size=32)]


SHARED = "/work/shared/data/animals"


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="opt-in: shared Animals photos absent")
def test_default_model_classifies_real_photos():
    from featurestore.backbones import classify

    pandas = sorted(os.listdir(f"{SHARED}/panda"))[:4]
    results = classify([f"{SHARED}/panda/{p}" for p in pandas])
    assert sum(r[0][0] == "giant panda" for r in results) >= 3


def test_a_node_asked_for_by_two_names_gives_both():
    """fc and logits are one node: both come out (they used to collapse into one, a KeyError)."""
    bb = load_backbone("resnet18", weights="none", layers=["fc", "logits"], input_size=64)
    out = bb.extract([Image.new("RGB", (64, 64))])
    assert set(out) == {"fc", "logits"} and np.array_equal(out["fc"], out["logits"])


@pytest.mark.parametrize("model,layers", [
    ("resnet18", ["layer3", "layer3.1.relu_1", "layer3.1", "layer2"]),
    ("mobilenet_v2", ["features.14", "features.18", "features"]),  # features ends where features.18 does
])
def test_a_stage_and_a_node_inside_it_both_come_out_as_cut_alone(model, layers):
    """A stage name stands for its last node: asked for with that node (or another name in its scope),
    each comes out, equal to the same layer cut alone (the second name used to be missing: a KeyError)."""
    img = [Image.new("RGB", (64, 64), (120, 40, 200))]
    out = load_backbone(model, weights="none", layers=layers, input_size=64).extract(img)
    assert set(out) == set(layers)
    for layer in layers:
        alone = load_backbone(model, weights="none", layers=[layer], input_size=64).extract(img)[layer]
        np.testing.assert_allclose(out[layer], alone, rtol=0, atol=1e-6)


def test_only_per_image_nodes_are_offered_or_accepted():
    """swin's attention bias tables and maxvit's window partitions are not one row per image:
    never starred as stage ends, refused by name at build (not as failed shards), and the
    stars stay on maps in image layout (convnext's permuted LayerNorm views are not stages)."""
    stars = [r for r in list_layers("swin_t", input_size=64) if r.recommended]
    assert not any("relative_position" in r.name for r in stars), [r.name for r in stars]
    with pytest.raises(UnknownLayerError, match="not a per-image output"):
        load_backbone("swin_t", weights="none", input_size=64,
                      layers=["features.7.1.attn._get_relative_position_bias"])
    stages = [r for r in list_layers("convnext_tiny", input_size=64) if r.note.startswith("end of stage")]
    assert [r.shape[1:] for r in stages] == [(16, 16), (8, 8), (4, 4), (2, 2)], [(r.name, r.shape) for r in stages]


def test_vit_input_size_must_be_whole_patches():
    with pytest.raises(ValueError, match=r"16x16 patches: --input-size must be a multiple of 16 \(e.g. 192 or 208\)"):
        load_backbone("vit_b_16", weights="none", input_size=200)


def test_random_weights_build_at_the_recipe_size():
    """vit_h_14's only weights (SWAG) take 518 px: with weights none the network is built for 518 px
    too, not torchvision's 224, or tracing it at its own preprocessing failed (traced on the meta
    device here: 632M parameters need no memory there)."""
    with torch.device("meta"):
        layers = {info.name: info.shape for info in list_layers("vit_h_14", weights="none")}
    assert layers["encoder.layers.encoder_layer_31.add_1"] == (37 * 37 + 1, 1280)  # 518/14 = 37 patches a side
