"""A checkpoint fine-tuned to another number of classes (its classifier is the only difference
from the architecture's default) loads: every layer is the checkpoint's, `logits` gives its
classes, and what is recorded is still the file's. Another architecture is still refused by name."""
from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from PIL import Image

from featurestore.backbones import classify, load_backbone
from featurestore.weights import WeightsError, state_dict_sha256

SIZE = 64


def _save(tmp_path, name, model, wrap=None):
    path = tmp_path / name
    sd = model.state_dict()
    torch.save({f"{wrap}{k}": v for k, v in sd.items()} if wrap else sd, path)
    return str(path)


def _same_outputs(bb, model, layers):
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    got = bb(x)
    with torch.inference_mode():
        want = layers(model.eval(), x)
    for layer, t in want.items():
        torch.testing.assert_close(got[layer], t, rtol=1e-5, atol=1e-5, msg=layer)


@pytest.fixture(scope="module")
def timm_r18_10(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    return model, _save(tmp_path_factory.mktemp("w"), "r18_10.pth", model)


@pytest.mark.parametrize("tag", [None, "tv_in1k", "a1_in1k"])
def test_a_timm_file_fine_tuned_to_10_classes_loads_with_or_without_a_tag(timm_r18_10, tag, caplog):
    model, path = timm_r18_10
    spec = f"{path}#{tag}" if tag else path
    with caplog.at_level(logging.INFO, logger="featurestore.backbones"):
        bb = load_backbone("timm:resnet18", spec, layers=["layer3", "pre_logits", "logits"], pooling="avg",
                           input_size=SIZE)
    assert bb.feature_shapes == {"layer3": (256,), "pre_logits": (512,), "logits": (10,)}
    assert "a classifier for 10 classes where timm:resnet18 has 1000" in caplog.text
    _same_outputs(bb, model, lambda m, x: {"pre_logits": m.forward_head(m.forward_features(x), pre_logits=True),
                                           "logits": m(x)})
    # the record is the file's: its bytes' sha256, and the sha256 of its tensors
    assert bb.weights_file_sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert bb.weights_sha256 == state_dict_sha256(model.state_dict())
    assert bb.weights_id == (f"{path}#tv_in1k" if tag == "tv_in1k" else path)
    if tag == "tv_in1k":
        assert bb.preprocessing.interpolation == "bilinear"  # the tag's recipe still applies
    assert bb.categories == []  # not ImageNet's: classify names the classes by index
    top = classify([Image.new("RGB", (SIZE, SIZE))], backbone=load_backbone(
        "timm:resnet18", spec, layers=["logits"], pooling="none", input_size=SIZE), topk=3)[0]
    assert len(top) == 3 and all(name in {str(i) for i in range(10)} for name, _ in top)
    # the id rebuilds the same backbone (a head does)
    assert load_backbone("timm:resnet18", bb.weights_id, layers=["logits"], input_size=SIZE).weights_sha256 == \
        bb.weights_sha256


def test_a_tag_whose_config_has_other_classes_takes_an_in1k_file(tmp_path):
    """vit_tiny's augreg_in21k tag builds a 21,843-class head: an ImageNet-1k checkpoint with that
    tag's recipe is the same network with 1000 classes."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224")
    path = _save(tmp_path, "vit_tiny_in1k.pth", model)
    bb = load_backbone("timm:vit_tiny_patch16_224", f"{path}#augreg_in21k", layers=["pre_logits", "logits"])
    assert bb.feature_shapes == {"pre_logits": (192,), "logits": (1000,)} and len(bb.categories) == 1000
    assert bb.weights_sha256 == state_dict_sha256(model.state_dict())


def test_a_distilled_timm_model_with_two_heads(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=7)
    path = _save(tmp_path, "deit_7.pth", model, wrap="module.")  # a DataParallel prefix too
    bb = load_backbone("timm:deit_tiny_distilled_patch16_224", path, layers=["pre_logits", "logits"])
    assert bb.feature_shapes["logits"] == (7,)
    assert bb.weights_sha256 == state_dict_sha256(model.state_dict())


def test_a_torchvision_file_fine_tuned_to_10_classes_loads(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    path = _save(tmp_path, "tv18_10.pth", model)
    bb = load_backbone("resnet18", path, layers=["layer3", "avgpool", "logits"], input_size=SIZE)
    assert bb.feature_shapes == {"layer3": (256,), "avgpool": (512,), "logits": (10,)}

    def ref(m, x):
        return {"logits": m(x)}

    _same_outputs(bb, model, ref)
    assert bb.weights_file_sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert bb.weights_sha256 == state_dict_sha256(model.state_dict()) and bb.weights_id == path
    # ImageNet's names would be wrong for these 10 classes: none, and classify shows indices
    assert bb.categories == []
    top = classify([Image.new("RGB", (SIZE, SIZE))], backbone=load_backbone(
        "resnet18", path, layers=["logits"], pooling="none", input_size=SIZE), topk=10)[0]
    assert sorted(name for name, _ in top) == sorted(str(i) for i in range(10))
    # a DataParallel checkpoint and a #RECIPE alike
    wrapped = _save(tmp_path, "tv18_10_dp.pth", model, wrap="module.")
    assert load_backbone("resnet18", f"{wrapped}#DEFAULT", input_size=SIZE).weights_sha256 == bb.weights_sha256
    # a file with the architecture's own 1000 classes keeps ImageNet's names
    full = _save(tmp_path, "tv18.pth", resnet18())
    assert len(load_backbone("resnet18", full, input_size=SIZE).categories) == 1000


def test_squeezenet_classifies_with_a_conv(tmp_path):
    from torchvision.models import squeezenet1_1

    path = _save(tmp_path, "sq_5.pth", squeezenet1_1(num_classes=5))
    bb = load_backbone("squeezenet1_1", path, layers=["logits"], pooling="none", input_size=SIZE)
    assert bb.feature_shapes == {"logits": (5,)} and bb.categories == []


def test_another_architecture_is_still_refused_naming_the_file_and_the_model(tmp_path):
    import timm
    from torchvision.models import resnet18, resnet34

    r34 = _save(tmp_path, "r34_10.pth", resnet34(num_classes=10))  # 10 classes, and more blocks
    with pytest.raises(WeightsError) as err:
        load_backbone("resnet18", r34)
    msg = str(err.value)
    assert msg.startswith(f"weights {r34} do not fit resnet18 (ResNet): unexpected keys")
    assert "unexpected keys (96): layer1.2.conv1.weight" in msg and "same architecture" in msg
    # a classifier whose input differs is not a fine-tuned head of this network
    sd = resnet18().state_dict()
    sd["fc.weight"] = torch.zeros(10, 256)
    sd["fc.bias"] = torch.zeros(10)
    odd = tmp_path / "odd.pth"
    torch.save(sd, odd)
    with pytest.raises(WeightsError, match=r"do not fit resnet18 \(ResNet\): shape mismatches \(2\): fc.weight "
                                           r"\(10, 256\) vs model \(1000, 512\)"):
        load_backbone("resnet18", str(odd))
    other = _save(tmp_path, "mnv3.pth", timm.create_model("mobilenetv3_small_050", num_classes=10))
    with pytest.raises(WeightsError, match=rf"weights {other} do not fit timm:resnet18 \(ResNet\): missing keys"):
        load_backbone("timm:resnet18", f"{other}#tv_in1k")


def test_layers_shows_a_fine_tuned_files_class_count(timm_r18_10, tmp_path):
    """`featurestore layers MODEL --weights FILE` reads the file's shapes: logits is the file's 10 classes,
    not the architecture's 1000; a file of another architecture is refused there too, naming the keys."""
    import json

    from click.testing import CliRunner
    from torchvision.models import resnet18

    from featurestore.cli_models import layers

    torch.manual_seed(0)
    tv = _save(tmp_path, "tv_r18_10.pth", resnet18(num_classes=10))
    for model, path in (("resnet18", tv), ("timm:resnet18", timm_r18_10[1])):
        r = CliRunner().invoke(layers, [model, "--weights", path, "--json", "--recommended"])
        assert r.exit_code == 0, r.output
        logits = json.loads(r.output)["layers"][-1]
        assert logits["name"] == "logits" and logits["shape"] == [10] and "10 classes" in logits["note"], logits
    r = CliRunner().invoke(layers, ["resnet34", "--weights", tv])
    assert r.exit_code == 2 and f"weights {tv} do not fit resnet34" in r.output and "missing keys" in r.output, \
        r.output
