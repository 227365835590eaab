"""A head finds its backbone's weights file from any folder, or says how to point at it (--weights)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from click.testing import CliRunner

import classifiers
from featurestore.backbones import load_backbone
from featurestore.cli import main


@pytest.fixture
def head_with_relative_weights(tmp_path, monkeypatch, head_on_images):
    """A logreg head trained on features of a resnet18 loaded from `w.pth`, a path relative to tmp_path/work."""
    work = tmp_path / "work"
    work.mkdir()
    torch.save(_state_dict(), work / "w.pth")
    monkeypatch.chdir(work)
    bb = load_backbone("resnet18", "w.pth", input_size=32)
    assert bb.config()["weights"] == "w.pth"  # the store records weights as given
    paths, feats, head = head_on_images(bb, work)
    return work, paths, feats, head


def _state_dict():
    from torchvision.models import resnet18

    torch.manual_seed(3)
    return resnet18().state_dict()


def test_saved_head_records_the_weights_file_as_an_absolute_path(head_with_relative_weights):
    work, *_ = head_with_relative_weights
    meta = json.loads((work / "h" / "head.json").read_text())
    assert meta["store_config"]["weights"] == str(work / "w.pth")
    # URLs and names are not paths: left alone
    from classifiers.persist import absolute_weights

    for w in ("DEFAULT", "IMAGENET1K_V2", "none", "pypi:efficientnet-lite0", "s3://bucket/w.pth"):
        assert absolute_weights({"weights": w})["weights"] == w


def test_classify_and_export_from_another_folder(head_with_relative_weights, tmp_path, monkeypatch):
    work, paths, feats, head = head_with_relative_weights
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = CliRunner().invoke(main, ["classify", "--head", str(work / "h"), "--json", *paths[:2]])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["results"]
    expect = head.predict_proba(feats[:2])
    assert [g["label"] for g in got] == [head.label_names[i] for i in expect.argmax(1)]
    r = CliRunner().invoke(main, ["export", str(work / "h"), "--format", "torchscript", "--out", "m.pt"])
    assert r.exit_code == 0, r.output
    assert (elsewhere / "m.pt").stat().st_size > 1000
    # the metadata names the weights file by its base name and sha256s, not by this machine's path
    meta = _export_metadata(elsewhere / "m.pt")
    assert meta["weights"] == "w.pth" and str(tmp_path) not in json.dumps(meta)
    assert meta["weights_file_sha256"] == hashlib.sha256((work / "w.pth").read_bytes()).hexdigest()
    assert meta["weights_sha256"] == head.store_config["weights_sha256"]


def _export_metadata(path) -> dict:
    from classifiers.exporter import EXTRA_FILE

    extra = {EXTRA_FILE: ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[EXTRA_FILE])


def test_a_missing_weights_file_is_named_with_the_way_out(head_with_relative_weights, tmp_path):
    work, paths, feats, head = head_with_relative_weights
    moved = tmp_path / "moved.pth"
    os.replace(work / "w.pth", moved)
    for args in (["classify", "--head", str(work / "h"), paths[0]], ["export", str(work / "h")]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, r.output
        assert str(work / "h") in r.output and str(work / "w.pth") in r.output and "--weights" in r.output
        assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["classify", "--head", str(work / "h"), "--weights", str(moved), "--json", paths[0]])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["results"][0]["label"] == head.label_names[int(head.predict_proba(feats[:1]).argmax())]
    r = CliRunner().invoke(main, ["export", str(work / "h"), "--format", "torchscript", "--weights", str(moved)])
    assert r.exit_code == 0, r.output
    got = classifiers.predict_images(str(work / "h"), paths[:1], weights=str(moved))  # the Python API too
    assert got[0][0] == head.label_names[int(head.predict_proba(feats[:1]).argmax())]
    # other weights than the head was trained with are refused by their sha256, not silently used
    other = tmp_path / "other.pth"
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), other)
    r = CliRunner().invoke(main, ["classify", "--head", str(work / "h"), "--weights", str(other), paths[0]])
    assert r.exit_code == 2 and "weights_sha256" in r.output, r.output


def test_a_weights_name_cannot_stand_for_the_heads_weights_file(head_with_relative_weights):
    work, paths, feats, head = head_with_relative_weights
    r = CliRunner().invoke(main, ["classify", "--head", str(work / "h"), "--weights", "DEFAULT", paths[0]])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"Error: --weights DEFAULT cannot apply to {work / 'h'}: it was trained on resnet18 with the weights file "
        f"{work / 'w.pth'}; with a head, --weights only points at a moved copy of that file: "
        "pass its path, or drop --weights"]


def test_a_file_with_a_named_recipe_keeps_it_through_the_head(tmp_path, monkeypatch, head_on_images):
    """FILE#RECIPE: the head records the absolute file with its recipe, finds it from anywhere,
    and a moved file given with --weights keeps the recipe the head was trained with."""
    from torchvision.models import mobilenet_v2

    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(5)
    torch.save(mobilenet_v2().state_dict(), work / "w.pth")
    monkeypatch.chdir(work)
    bb = load_backbone("mobilenet_v2", "w.pth#IMAGENET1K_V2", input_size=32)
    assert bb.config()["weights"] == "w.pth#IMAGENET1K_V2"
    assert bb.config()["preprocessing"] != load_backbone("mobilenet_v2", "w.pth", input_size=32).config()["preprocessing"]
    paths, feats, head = head_on_images(bb, work)
    assert json.loads((work / "h" / "head.json").read_text())["store_config"]["weights"] == f"{work / 'w.pth'}#IMAGENET1K_V2"
    want = [head.label_names[i] for i in head.predict_proba(feats[:2]).argmax(1)]
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["classify", "--head", str(work / "h"), "--json", *paths[:2]])
    assert r.exit_code == 0, r.output
    assert [g["label"] for g in json.loads(r.output)["results"]] == want
    moved = tmp_path / "moved.pth"
    os.replace(work / "w.pth", moved)
    r = CliRunner().invoke(main, ["classify", "--head", str(work / "h"), "--weights", str(moved), "--json", *paths[:2]])
    assert r.exit_code == 0, r.output
    assert [g["label"] for g in json.loads(r.output)["results"]] == want
    r = CliRunner().invoke(main, ["export", str(work / "h"), "--format", "torchscript", "--weights", str(moved),
                                  "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 0, r.output
    meta = _export_metadata(tmp_path / "m.pt")  # the moved file's name, with the head's recipe
    assert meta["weights"] == "moved.pth#IMAGENET1K_V2" and str(tmp_path) not in json.dumps(meta)
    assert meta["weights_file_sha256"] == hashlib.sha256(moved.read_bytes()).hexdigest()
    # another recipe than the head's is refused, saying which one the head has and to drop the suffix
    for args in (["classify", "--head", str(work / "h"), "--weights", f"{moved}#IMAGENET1K_V1", paths[0]],
                 ["export", str(work / "h"), "--format", "torchscript", "--weights", f"{moved}#IMAGENET1K_V1"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [
            f"Error: --weights {moved}#IMAGENET1K_V1: {work / 'h'} was trained with the IMAGENET1K_V2 recipe, not "
            f"#IMAGENET1K_V1; drop the '#IMAGENET1K_V1' suffix (--weights {moved}): the head's recipe is applied to "
            "a moved weights file automatically"]
    # a suffix naming the head's recipe is harmless (#DEFAULT is mobilenet_v2's IMAGENET1K_V2)
    r = CliRunner().invoke(main, ["classify", "--head", str(work / "h"), "--weights", f"{moved}#DEFAULT", "--json",
                                  *paths[:2]])
    assert r.exit_code == 0, r.output
    assert [g["label"] for g in json.loads(r.output)["results"]] == want


def test_a_recipe_on_a_head_trained_with_a_plain_file_is_refused(tmp_path, head_on_images):
    """A head trained with a plain file has the file default recipe (IMAGENET1K_V1): --weights FILE#V2 says so."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(5)
    torch.save(mobilenet_v2().state_dict(), tmp_path / "w.pth")
    bb = load_backbone("mobilenet_v2", str(tmp_path / "w.pth"), input_size=32)
    paths, feats, head = head_on_images(bb, tmp_path)
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "h"), "--weights",
                                  f"{tmp_path / 'w.pth'}#IMAGENET1K_V2", paths[0]])
    assert r.exit_code == 2, r.output
    assert (f"was trained with the IMAGENET1K_V1 recipe (a weights file's default), not #IMAGENET1K_V2; drop the "
            f"'#IMAGENET1K_V2' suffix (--weights {tmp_path / 'w.pth'})") in r.output
    with pytest.raises(classifiers.HeadConfigMismatch, match="drop the '#IMAGENET1K_V2' suffix"):
        classifiers.predict_images(str(tmp_path / "h"), paths[:1], weights=f"{tmp_path / 'w.pth'}#IMAGENET1K_V2")
    other = tmp_path / "other.pth"
    torch.save(mobilenet_v2().state_dict(), other)  # other numbers as well: said too, not hidden by the recipe
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "h"), "--weights", f"{other}#IMAGENET1K_V2",
                                  paths[0]])
    assert r.exit_code == 2 and "drop the '#IMAGENET1K_V2' suffix" in r.output, r.output
    assert "Also differing: weights_sha256: " in r.output


def test_a_local_copy_of_named_weights_keeps_their_recipe(tmp_path, monkeypatch, head_on_images):
    """A head trained on IMAGENET1K_V2 (resize 232), given the same tensors as a plain file, reads
    the images with V2's preprocessing, not a weights file's default (V1, resize 256)."""
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    url = MobileNet_V2_Weights.IMAGENET1K_V2.url
    cached = tmp_path / "th" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(5)
    torch.save(mobilenet_v2().state_dict(), cached)  # the cache torchvision reads offline
    bb = load_backbone("mobilenet_v2", "IMAGENET1K_V2")
    paths, feats, head = head_on_images(bb, tmp_path)
    assert head.store_config["weights"] == "IMAGENET1K_V2"
    want = [head.label_names[i] for i in head.predict_proba(feats[:2]).argmax(1)]
    copy = tmp_path / "copy.pth"
    copy.write_bytes(cached.read_bytes())
    cached.unlink()  # offline, and the cache gone: only the copy is left
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "h"), "--weights", str(copy), "--json",
                                  *paths[:2]])
    assert r.exit_code == 0, r.output
    assert [g["label"] for g in json.loads(r.output)["results"]] == want
    r = CliRunner().invoke(main, ["export", str(tmp_path / "h"), "--format", "torchscript", "--weights", str(copy),
                                  "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 0, r.output
    meta = _export_metadata(tmp_path / "m.pt")
    assert meta["weights"] == "copy.pth#IMAGENET1K_V2" and meta["resize_size"] == 232
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "h"), "--weights", f"{copy}#IMAGENET1K_V1",
                                  paths[0]])
    assert r.exit_code == 2, r.output
    assert (f"was trained with the IMAGENET1K_V2 recipe, not #IMAGENET1K_V1; drop the '#IMAGENET1K_V1' suffix "
            f"(--weights {copy})") in r.output


@pytest.mark.parametrize("recorded,recipe", [
    ("IMAGENET1K_V2", "IMAGENET1K_V2"), ("timm:resnet18.tv_in1k", "tv_in1k"), ("timm:resnet18", None),
    ("pypi:efficientnet-lite0", None), ("none", None)])
def test_the_recipe_a_local_copy_of_named_weights_gets(recorded, recipe):
    from classifiers.apply import _recipe_of_named

    assert _recipe_of_named(recorded) == recipe


def test_a_head_saved_before_the_file_recipe_rule_keeps_its_recipe(tmp_path, head_on_images):
    """Older versions recorded a plain weights file (no #RECIPE) read with the DEFAULT recipe
    (mobilenet_v2: IMAGENET1K_V2, resize 232): such a head still classifies with its own recipe, from
    the recorded file or a moved copy, and a suffix naming another recipe is refused naming V2, not V1."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(5)
    w = tmp_path / "w.pth"
    torch.save(mobilenet_v2().state_dict(), w)
    bb = load_backbone("mobilenet_v2", f"{w}#IMAGENET1K_V2", input_size=32)
    paths, feats, head = head_on_images(bb, tmp_path)
    meta_path = tmp_path / "h" / "head.json"
    meta = json.loads(meta_path.read_text())
    meta["store_config"]["weights"] = str(w)  # as an older version wrote it: the plain file, V2's preprocessing
    meta_path.write_text(json.dumps(meta))
    want = [head.label_names[i] for i in head.predict_proba(feats[:2]).argmax(1)]
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "h"), "--json", *paths[:2]])
    assert r.exit_code == 0, r.output
    assert [g["label"] for g in json.loads(r.output)["results"]] == want
    moved = tmp_path / "moved.pth"
    os.replace(w, moved)
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "h"), "--weights", str(moved), "--json",
                                  *paths[:2]])
    assert r.exit_code == 0, r.output
    assert [g["label"] for g in json.loads(r.output)["results"]] == want
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "h"), "--weights", f"{moved}#IMAGENET1K_V1",
                                  paths[0]])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"Error: --weights {moved}#IMAGENET1K_V1: {tmp_path / 'h'} was trained with the IMAGENET1K_V2 recipe (an older "
        "version's default for a plain weights file), not #IMAGENET1K_V1; drop the '#IMAGENET1K_V1' suffix "
        f"(--weights {moved}): the head's recipe is applied to a moved weights file automatically"]
