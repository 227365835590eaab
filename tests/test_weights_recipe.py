"""Which preprocessing a state-dict file gets, how to name another, and `layers` never loading weights.

A file carries tensors, not the recipe they were trained with: torchvision files get the
classic IMAGENET1K_V1 recipe unless FILE#NAME says otherwise.
"""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from featurestore.backbones import describe_layers, load_backbone
from featurestore.cli_models import layers
from featurestore.weights import WeightsError, is_file_spec, split_recipe

SHARED_MBV2 = "/work/shared/weights/mobilenet_v2_imagenet_dequantized.pth"


@pytest.fixture(scope="module")
def mbv2_file(tmp_path_factory):
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "mbv2.pth"
    torch.save(mobilenet_v2().state_dict(), path)
    return str(path)


def test_split_recipe_only_takes_a_name_after_a_path():
    assert split_recipe("/w/r50.pth#IMAGENET1K_V2") == ("/w/r50.pth", "IMAGENET1K_V2")
    assert split_recipe("s3://b/r50.pth#DEFAULT") == ("s3://b/r50.pth", "DEFAULT")
    assert split_recipe("/w/run#3.pth") == ("/w/run#3.pth", None)  # a '#' in the file name
    assert split_recipe("https://h/r.pth#sha=abc") == ("https://h/r.pth#sha=abc", None)  # a URL fragment
    assert split_recipe("IMAGENET1K_V2") == ("IMAGENET1K_V2", None)
    assert is_file_spec("r50.pth#IMAGENET1K_V2") and not is_file_spec("IMAGENET1K_V2")


def test_a_torchvision_file_gets_the_v1_recipe_unless_named(mbv2_file):
    # mobilenet_v2's DEFAULT (IMAGENET1K_V2) resizes to 232; checkpoints made elsewhere follow V1: 256
    plain = load_backbone("mobilenet_v2", mbv2_file, input_size=64)
    assert plain.preprocessing.resize_size == round(64 * 256 / 224)
    full = load_backbone("mobilenet_v2", mbv2_file)
    assert full.preprocessing.resize_size == 256 and full.preprocessing.input_size == (224, 224)
    assert full.config()["preprocessing"]["resize_size"] == 256  # what store.json records
    for hint in ("IMAGENET1K_V2", "DEFAULT", "imagenet1k_v2"):
        named = load_backbone("mobilenet_v2", f"{mbv2_file}#{hint}")
        assert named.preprocessing.resize_size == 232, hint
        # the same tensors; the id names the recipe by its member, so it rebuilds this backbone (heads do)
        assert named.weights_id == f"{mbv2_file}#IMAGENET1K_V2" and named.weights_sha256 == full.weights_sha256
        again = load_backbone("mobilenet_v2", named.weights_id)
        assert again.config() == named.config()
    # naming the default recipe is the plain file
    assert load_backbone("mobilenet_v2", f"{mbv2_file}#IMAGENET1K_V1").weights_id == mbv2_file
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET1K_V3' for mobilenet_v2.*IMAGENET1K_V1"):
        load_backbone("mobilenet_v2", f"{mbv2_file}#IMAGENET1K_V3")
    # a model whose DEFAULT is V1 keeps it
    assert load_backbone("resnet18", "none").preprocessing.resize_size == 256


def test_a_timm_file_can_take_a_pretrained_tags_recipe(tmp_path):
    import timm

    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    default = load_backbone("timm:resnet18", str(path)).preprocessing  # timm's default tag, a1_in1k
    tv = load_backbone("timm:resnet18", f"{path}#tv_in1k").preprocessing  # torchvision's own recipe
    assert default.interpolation == "bicubic" and default.resize_size == 235
    assert tv.interpolation == "bilinear" and tv.resize_size == 256
    assert load_backbone("timm:resnet18", f"{path}#tv_in1k").weights_id == f"{path}#tv_in1k"
    assert load_backbone("timm:resnet18", f"{path}#a1_in1k").weights_id == str(path)  # timm's default tag
    with pytest.raises(WeightsError, match="its tags are .*tv_in1k"):
        load_backbone("timm:resnet18", f"{path}#nosuch_tag")


def test_layers_never_loads_weights_but_checks_the_name(tmp_path, monkeypatch, mbv2_file):
    home = tmp_path / "th"
    monkeypatch.setenv("TORCH_HOME", str(home))
    # an enum: its input size and recipe, and nothing downloaded (offline this would fail)
    rows, pre, recipe = describe_layers("resnet50", "IMAGENET1K_V2", input_size=32)
    assert rows[-1].name == "logits" and pre.resize_size == round(32 * 232 / 224) and "IMAGENET1K_V2" in recipe
    assert not (home / "hub" / "checkpoints").exists() or not os.listdir(home / "hub" / "checkpoints")
    # a file's names and shapes are read (its classifier's size shows in logits): a corrupt one is refused
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(layers, ["mobilenet_v2", "--weights", str(junk), "--recommended"])
    assert r.exit_code == 2 and f"weights file {junk} cannot be loaded as a state dict" in r.output, r.output
    r = CliRunner().invoke(layers, ["mobilenet_v2", "--weights", mbv2_file, "--recommended"])
    last = r.output.splitlines()[-1]
    assert last.startswith("preprocessing: resize 256, center crop 224x224, bilinear") and "IMAGENET1K_V1" in last
    r = CliRunner().invoke(layers, ["mobilenet_v2", "--weights", f"{mbv2_file}#IMAGENET1K_V2", "--recommended"])
    assert r.exit_code == 0 and r.output.splitlines()[-1].startswith("preprocessing: resize 232"), r.output
    # but a name that does not exist is refused in one line
    for weights, says in (("IMAGENET_V9", "its weights are IMAGENET1K_V1"), (str(tmp_path / "no.pth"), "not found"),
                          (f"{mbv2_file}#V9", "unknown weights 'V9'")):
        r = CliRunner().invoke(layers, ["mobilenet_v2", "--weights", weights])
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(layers, ["timm:resnet18", "--weights", "nosuch", "--json"])
    assert r.exit_code == 2 and "tv_in1k" in r.output
    r = CliRunner().invoke(layers, ["timm:resnet18", "--weights", "tv_in1k", "--json", "--recommended"])
    out = json.loads(r.output)  # --json stays pure JSON
    assert r.exit_code == 0 and out["layers"][-1]["name"] == "logits", r.output
    assert out["weights"] == "tv_in1k" and out["preprocessing"]["recipe"], out["preprocessing"]


@pytest.mark.skipif(not os.path.exists(SHARED_MBV2), reason="shared real MobileNetV2 weights absent")
def test_shared_mobilenet_v2_file_uses_its_documented_v1_recipe():
    bb = load_backbone("mobilenet_v2", SHARED_MBV2, layers=["logits"], pooling="none")
    pre = bb.preprocessing
    assert (pre.resize_size, pre.input_size, pre.interpolation) == (256, (224, 224), "bilinear")
