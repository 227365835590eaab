"""Export: the head as torch ops, and backbone + head as ONNX / TorchScript, equal to the Python path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.backbones import load_backbone
from featurestore.store import write_store

import classifiers
from classifiers import HeadConfigMismatch
from classifiers.exporter import head_module, python_path, run_exported

TOL = 1e-4


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("resnet18", "none", input_size=32)


def _features_store(tmp_path, bb, k=3, n=60, seed=0):
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    f = bb(x)[bb.layers[0]].numpy()
    # labels from the features themselves, so every head learns something
    proj = f @ np.random.default_rng(seed).normal(size=f.shape[1])
    y = np.digitize(proj, np.quantile(proj, np.linspace(0, 1, k + 1)[1:-1]))
    return write_store(str(tmp_path / "s"), {bb.layers[0]: f}, y, [f"c{i}" for i in range(k)], config=bb.config())


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kind,loss,l2", [("logreg", "log_loss", False), ("linear-svm", "log_loss", True),
                                          ("svm", "log_loss", False), ("sgd", "log_loss", True), ("sgd", "hinge", False)])
def test_head_module_equals_predict_proba(tmp_path, kind, loss, l2, k):
    rng = np.random.default_rng(k)
    y = np.arange(150) % k
    X = rng.normal(size=(150, 10))
    X[np.arange(150), y] += 1.5
    s = write_store(str(tmp_path / "s"), {"f": X.astype(np.float32)}, y, [str(i) for i in range(k)], config={"model": "m"})
    head = classifiers.train(s, head=kind, loss=loss, l2=l2, cv=3)
    Xt = rng.normal(size=(40, 10)).astype(np.float32) * 2
    got = head_module(head)(torch.from_numpy(Xt)).detach().numpy()
    assert got.shape == (40, k)
    assert np.abs(got - head.predict_proba(Xt)).max() < TOL


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_exported_model_equals_python_path(tmp_path, backbone, fmt, kind):
    s = _features_store(tmp_path, backbone)
    head = classifiers.train(s, head=kind, cv=3, out=str(tmp_path / "h"))
    path = classifiers.export(str(tmp_path / "h"), fmt, backbone=backbone)
    assert path.endswith(".onnx" if fmt == "onnx" else ".pt")
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # another batch size than traced
    ref = python_path(head, backbone, x)
    got = run_exported(path, fmt, x)
    assert got.shape == (5, 3)
    assert np.abs(got - ref).max() < TOL
    assert np.allclose(got.sum(1), 1, atol=1e-5)


def test_export_rebuilds_backbone_from_head_and_refuses_another(tmp_path, backbone):
    s = _features_store(tmp_path, backbone)
    classifiers.train(s, head="logreg", out=str(tmp_path / "h"))
    path = classifiers.export(str(tmp_path / "h"), "torchscript", out=str(tmp_path / "m.pt"))  # no backbone given
    x = torch.randn(2, 3, 32, 32)
    head = classifiers.load_head(str(tmp_path / "h"))
    assert np.abs(run_exported(path, "torchscript", x) - python_path(head, backbone, x)).max() < TOL
    other = load_backbone("resnet18", "none", input_size=32, seed=1)
    with pytest.raises(HeadConfigMismatch, match="weights_sha256"):
        classifiers.export(head, "onnx", out=str(tmp_path / "x.onnx"), backbone=other)


def test_onnx_export_without_the_export_extra_says_what_to_install(tmp_path, backbone, monkeypatch):
    import sys

    s = _features_store(tmp_path, backbone)
    classifiers.train(s, head="logreg", out=str(tmp_path / "h"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(ValueError, match=r'needs onnxscript: pip install "featurestore\[export\]", or export with '
                                         r"fmt='torchscript'$"):
        classifiers.export(str(tmp_path / "h"), "onnx", out=str(tmp_path / "m.onnx"), backbone=backbone)
    assert not (tmp_path / "m.onnx").exists()


def test_predict_images_runs_backbone_and_head(tmp_path, backbone, head_on_images):
    paths, feats, head = head_on_images(backbone, tmp_path)
    got = classifiers.predict_images(str(tmp_path / "h"), paths)  # backbone rebuilt from head.json
    expect = head.predict_proba(feats)
    assert [g[0] for g in got] == [head.label_names[i] for i in expect.argmax(1)]
    assert np.allclose([[g[1]["cat"], g[1]["dog"]] for g in got], expect, atol=1e-5)


def test_classify_cli_with_a_head(tmp_path, backbone, head_on_images):
    import json

    from click.testing import CliRunner

    from featurestore.cli import main

    paths, feats, head = head_on_images(backbone, tmp_path)
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "h"), "--json", *paths[:3]])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    expect = head.predict_proba(feats[:3])
    for rec, row in zip(out["results"], expect):
        assert rec["label"] == head.label_names[int(row.argmax())]
        assert rec["top"][0]["class"] == rec["label"]
        assert abs(dict((t["class"], t["prob"]) for t in rec["top"])["dog"] - row[1]) < 1e-4
    r = CliRunner().invoke(main, ["classify", "--head", str(tmp_path / "nohead"), paths[0]])
    assert r.exit_code != 0 and "nohead" in r.output


def test_l2_head_module_leaves_near_zero_rows_as_scikit_learn_does(tmp_path):
    """scikit-learn's Normalizer leaves rows shorter than 10 float eps unscaled; the torch head must too
    (features of random-weight backbones can be that small)."""
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    X = rng.normal(size=(90, 10))
    X[np.arange(90), y] += 2.0
    s = write_store(str(tmp_path / "s"), {"f": (X * 1e-8).astype(np.float32)}, y, ["a", "b", "c"], config={"model": "m"})
    head = classifiers.train(s, head="logreg", l2=True, cv=3)
    Xt = (rng.normal(size=(20, 10)) * 1e-8).astype(np.float32)
    got = head_module(head)(torch.from_numpy(Xt)).detach().numpy()
    assert np.abs(got - head.predict_proba(Xt)).max() < TOL


def test_export_refuses_a_folder_and_keeps_no_unverified_file(tmp_path, backbone, monkeypatch):
    from classifiers import exporter
    from classifiers.core import ExportError

    head = classifiers.train(_features_store(tmp_path, backbone), head="logreg", cv=2, out=str(tmp_path / "h"))
    with pytest.raises(ValueError, match=r"^out .*: a folder; give the file to write, e\.g\. .*model\.torchscript\.pt"):
        classifiers.export(head, "torchscript", str(tmp_path), backbone=backbone)
    monkeypatch.setattr(exporter, "TOLERANCE", -1.0)  # every difference fails verification
    with pytest.raises(ExportError, match="so it was not kept"):
        classifiers.export(head, "torchscript", backbone=backbone)
    assert not (tmp_path / "h" / "model.torchscript.pt").exists()
