"""A checkpoint saved without its classifier (DINO/SimCLR/MoCo exports, `model.fc = nn.Identity()`,
timm's num_classes=0) loads: every other tensor strictly, the default cut gives the features the same
tensors give in a full model, the sha256 recorded is the file's tensors' (whatever the seed), and
`logits` and every cut that needs the missing classifier are refused naming the file. A file that
lacks anything else is still refused, naming the keys."""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.backbones import UnknownLayerError, classify, load_backbone
from featurestore.weights import WeightsError, state_dict_sha256

SIZE = 64


def _save(tmp_path, name, sd, drop=(), wrap=""):
    path = tmp_path / name
    torch.save({f"{wrap}{k}": v for k, v in sd.items() if not k.startswith(tuple(f"{d}." for d in drop))}, path)
    return str(path)


def _images(n=3):
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(SIZE + 8, SIZE, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def _headless_logged(caplog, path):
    lines = [r.getMessage() for r in caplog.records if "has no classifier" in r.getMessage()]
    assert len(lines) == 1 and path in lines[0], lines


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A full random-init torchvision resnet18 file and the same tensors without fc.*."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    sd = resnet18().state_dict()
    tmp = tmp_path_factory.mktemp("w")
    return sd, _save(tmp, "r18.pth", sd), _save(tmp, "r18_headless.pth", sd, drop=["fc"])


def test_a_torchvision_file_without_fc_gives_the_full_files_features(r18, caplog, tmp_path):
    sd, full, headless = r18
    with caplog.at_level(logging.INFO, logger="featurestore.backbones"):
        bb = load_backbone("resnet18", headless, input_size=SIZE)
    _headless_logged(caplog, headless)
    ref = load_backbone("resnet18", full, input_size=SIZE)
    assert bb.layers == ref.layers == ("flatten",) and bb.missing_classifier == ("fc.weight", "fc.bias")
    imgs = _images()
    np.testing.assert_array_equal(bb.extract(imgs)["flatten"], ref.extract(imgs)["flatten"])
    # any cut before the classifier works too, and the wrapper prefix of a DataParallel export is stripped
    wrapped = _save(tmp_path, "r18_headless_dp.pth", sd, drop=["fc"], wrap="module.")
    two = load_backbone("resnet18", wrapped, layers=["layer3", "avgpool"], input_size=SIZE)
    assert two.feature_shapes == {"layer3": (256,), "avgpool": (512,)}
    assert bb.categories == []  # no classifier, no ImageNet class names


def test_a_headless_files_sha256_is_its_tensors_whatever_the_seed(r18):
    sd, full, headless = r18
    expected = state_dict_sha256({k: v for k, v in sd.items() if not k.startswith("fc.")})
    for seed in (0, 7):  # the seed draws the (unused) classifier the file lacks: not in the hash
        bb = load_backbone("resnet18", headless, input_size=SIZE, seed=seed)
        assert bb.weights_sha256 == expected
        assert bb.weights_file_sha256 == hashlib.sha256(open(headless, "rb").read()).hexdigest()
        assert bb.config()["weights_sha256"] == expected and bb.weights_id == headless
    # the full file's record is its own (fc included): another checkpoint
    assert load_backbone("resnet18", full, input_size=SIZE).weights_sha256 == state_dict_sha256(sd) != expected


@pytest.mark.parametrize("layer", ["logits", "fc"])
def test_cuts_that_need_the_missing_classifier_are_refused_naming_the_file(r18, layer):
    _, _, headless = r18
    with pytest.raises(UnknownLayerError) as err:
        load_backbone("resnet18", headless, layers=["layer4", layer], input_size=SIZE)
    msg = str(err.value)
    assert err.value.missing_classifier == ("fc.weight", "fc.bias")
    # a plain UnknownLayerError: an extraction actor's error reaches the driver (and a job spec's
    # `layers` field) as "UnknownLayerError: ..."
    assert type(err.value).__name__ == "UnknownLayerError"
    what = "logits" if layer == "logits" else "layer 'fc'"
    assert msg.startswith(f"resnet18: {what} needs the classifier, and weights {headless} have none")
    assert "saved without its classifier: fc.weight, fc.bias missing" in msg
    assert "the deepest layer they give is 'flatten' (the default cut with these weights)" in msg


def test_classify_without_a_classifier_says_there_are_no_classes(r18):
    _, _, headless = r18
    with pytest.raises(UnknownLayerError, match=rf"resnet18: weights {headless} have no classifier .*no classes to "
                                                r"rank; extract features .*\(featurestore train STORE"):
        classify(_images(1), model="resnet18", weights=headless)
    bb = load_backbone("resnet18", headless, input_size=SIZE)
    with pytest.raises(UnknownLayerError, match="no classes to rank"):
        classify(_images(1), backbone=bb)


def test_a_file_missing_more_than_the_classifier_is_still_refused(r18, tmp_path):
    sd, _, _ = r18
    missing_more = {k: v for k, v in sd.items() if not k.startswith("fc.") and k != "layer4.1.bn2.weight"}
    path = tmp_path / "broken.pth"
    torch.save(missing_more, path)
    with pytest.raises(WeightsError, match=rf"weights {path} do not fit resnet18 \(ResNet\): missing keys \(3\): "
                                           r"layer4.1.bn2.weight, fc.weight, fc.bias"):
        load_backbone("resnet18", str(path))
    # half a classifier is not a headless export
    no_weight = _save(tmp_path, "no_fc_weight.pth", {k: v for k, v in sd.items() if k != "fc.weight"})
    with pytest.raises(WeightsError, match=r"missing keys \(1\): fc.weight"):
        load_backbone("resnet18", no_weight)
    # a headless file with a stray tensor: unexpected keys are still refused
    stray = _save(tmp_path, "stray.pth", {**{k: v for k, v in sd.items() if not k.startswith("fc.")},
                                          "proj.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightsError, match=r"do not fit resnet18 \(ResNet\): missing keys \(2\): fc.weight, fc.bias; "
                                           r"unexpected keys \(1\): proj.weight"):
        load_backbone("resnet18", stray)


def test_mobilenet_v3_without_its_last_linear_or_its_whole_classifier(tmp_path):
    """`model.classifier[3] = nn.Identity()` keeps the hidden Linear (the default cut, classifier.1, works);
    `model.classifier = nn.Identity()` drops it too: the default becomes the pooled `flatten`."""
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    sd = mobilenet_v3_small().state_dict()
    full = _save(tmp_path, "mnv3.pth", sd)
    last = _save(tmp_path, "mnv3_no_last.pth", sd, drop=["classifier.3"])
    whole = _save(tmp_path, "mnv3_no_classifier.pth", sd, drop=["classifier"])
    imgs = _images(2)
    ref = load_backbone("mobilenet_v3_small", full, layers=["classifier.1", "flatten"], input_size=SIZE).extract(imgs)

    bb = load_backbone("mobilenet_v3_small", last, input_size=SIZE)
    assert bb.layers == ("classifier.1",) and bb.missing_classifier == ("classifier.3.weight", "classifier.3.bias")
    np.testing.assert_array_equal(bb.extract(imgs)["classifier.1"], ref["classifier.1"])
    with pytest.raises(UnknownLayerError, match="the deepest layer they give is 'classifier.1'"):
        load_backbone("mobilenet_v3_small", last, layers=["classifier.3"], input_size=SIZE)

    bb = load_backbone("mobilenet_v3_small", whole, input_size=SIZE)
    assert bb.layers == ("flatten",) and len(bb.missing_classifier) == 4
    np.testing.assert_array_equal(bb.extract(imgs)["flatten"], ref["flatten"])
    assert bb.weights_sha256 == state_dict_sha256({k: v for k, v in sd.items() if not k.startswith("classifier.")})
    for layer in ("classifier.1", "classifier", "logits"):  # the hidden Linear is gone: its output too
        with pytest.raises(UnknownLayerError, match=rf"weights {whole} have none .* deepest layer they give is "
                                                    r"'flatten'"):
            load_backbone("mobilenet_v3_small", whole, layers=[layer], input_size=SIZE)


def test_convnext_without_its_classifier_cuts_before_the_norm(tmp_path):
    """convnext's classifier is LayerNorm2d, Flatten, Linear: without all of it, the norm's output
    needs the missing tensors, so the cut is the global pool."""
    from torchvision.models import convnext_tiny

    sd = convnext_tiny().state_dict()
    whole = _save(tmp_path, "cnx_no_classifier.pth", sd, drop=["classifier"])
    assert load_backbone("convnext_tiny", whole, input_size=SIZE).feature_shapes == {"avgpool": (768,)}
    last = _save(tmp_path, "cnx_no_last.pth", sd, drop=["classifier.2"])
    assert load_backbone("convnext_tiny", last, input_size=SIZE).feature_shapes == {"classifier.1": (768,)}


@pytest.fixture(scope="module")
def timm_r18(tmp_path_factory):
    """timm's resnet18 with random weights, saved whole and saved with num_classes=0 (the same tensors)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18")
    sd = model.state_dict()
    headless_model = timm.create_model("resnet18", num_classes=0)
    headless_model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True)
    tmp = tmp_path_factory.mktemp("t")
    path = tmp / "r18_num_classes_0.pth"
    torch.save(headless_model.state_dict(), path)
    return sd, _save(tmp, "r18_full.pth", sd), str(path)


@pytest.mark.parametrize("tag", [None, "tv_in1k"])
def test_a_timm_file_saved_with_num_classes_0(timm_r18, tag, caplog):
    sd, full, headless = timm_r18
    spec = f"{headless}#{tag}" if tag else headless
    with caplog.at_level(logging.INFO, logger="featurestore.backbones"):
        bb = load_backbone("timm:resnet18", spec, layers=["layer3", "pre_logits"], input_size=SIZE)
    _headless_logged(caplog, headless)
    ref = load_backbone("timm:resnet18", f"{full}#{tag}" if tag else full, layers=["layer3", "pre_logits"],
                        input_size=SIZE)
    imgs = _images(2)
    got, want = bb.extract(imgs), ref.extract(imgs)
    for layer in ("layer3", "pre_logits"):
        np.testing.assert_array_equal(got[layer], want[layer])
    assert load_backbone("timm:resnet18", spec, input_size=SIZE).layers == ("pre_logits",)
    expected = state_dict_sha256({k: v for k, v in sd.items() if not k.startswith("fc.")})
    assert {load_backbone("timm:resnet18", spec, input_size=SIZE, seed=s).weights_sha256 for s in (0, 3)} == {expected}
    assert bb.categories == [] and bb.missing_classifier == ("fc.weight", "fc.bias")
    with pytest.raises(UnknownLayerError, match=rf"timm:resnet18: logits needs the classifier, and weights "
                                                rf"{headless} have none .*deepest layer they give is 'pre_logits'"):
        load_backbone("timm:resnet18", spec, layers=["pre_logits", "logits"], input_size=SIZE)


def test_a_distilled_timm_model_needs_both_heads_missing(tmp_path):
    import timm

    torch.manual_seed(0)
    sd = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0).state_dict()
    path = _save(tmp_path, "deit_headless.pth", sd, wrap="module.")
    bb = load_backbone("timm:deit_tiny_distilled_patch16_224", path)
    assert bb.feature_shapes == {"pre_logits": (192,)} and bb.weights_sha256 == state_dict_sha256(sd)
    full = timm.create_model("deit_tiny_distilled_patch16_224").state_dict()
    one = _save(tmp_path, "deit_one_head.pth", {k: v for k, v in full.items() if not k.startswith("head.")})
    with pytest.raises(WeightsError, match=r"missing keys \(2\): head.weight, head.bias"):
        load_backbone("timm:deit_tiny_distilled_patch16_224", one)


def _layers_json(model, weights, *extra):
    import json

    from click.testing import CliRunner

    from featurestore.cli_models import layers

    r = CliRunner().invoke(layers, [model, "--weights", weights, "--json", *extra])
    assert r.exit_code == 0, r.output
    return {row["name"]: row for row in json.loads(r.output)["layers"]}


def test_layers_marks_what_a_headless_file_cannot_give(r18, tmp_path):
    """`featurestore layers MODEL --weights FILE` reads the file's names and shapes: what needs the
    missing classifier is marked unusable (and not recommended); the full file's rows are all usable."""
    _, full, headless = r18
    rows = _layers_json("resnet18", headless)
    assert not rows["logits"]["usable"] and not rows["fc"]["usable"] and not rows["logits"]["recommended"]
    assert "needs the classifier these weights lack (fc.weight, fc.bias)" in rows["logits"]["note"]
    assert rows["flatten"]["usable"] and "(default)" in rows["flatten"]["note"]
    assert all(r["usable"] for r in _layers_json("resnet18", full).values())
    assert "logits" not in _layers_json("resnet18", headless, "--recommended")
    # vgg saved with `model.classifier = nn.Identity()`: its hidden Linear layers are gone too
    from torchvision.models import vgg11

    m = vgg11()
    m.classifier = torch.nn.Identity()
    vgg = _save(tmp_path, "vgg11_headless.pth", m.state_dict())
    rows = _layers_json("vgg11", vgg)
    assert "(default)" in rows["flatten"]["note"] and rows["flatten"]["usable"]
    assert {n for n, r in rows.items() if not r["usable"]} >= {"classifier.0", "classifier.3", "classifier.6",
                                                                  "logits"}


def test_layers_marks_a_timm_headless_files_logits(timm_r18):
    _, _, headless = timm_r18
    rows = _layers_json("timm:resnet18", headless)
    assert not rows["logits"]["usable"] and rows["pre_logits"]["usable"] and rows["layer4"]["usable"]
