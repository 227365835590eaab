"""A scorer that cannot score the store's classes (f1 on three classes) is refused before the sweep,
naming --scoring, instead of a scikit-learn traceback from inside the sweep's workers."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import classifiers
from classifiers.heads import HeadError
from featurestore.cli import main
from featurestore.store import write_store

CFG = {"model": "resnet18", "weights": "none", "weights_sha256": "a" * 64, "layers": ["avgpool"],
       "pooling": "avg", "precision": "fp32", "preprocessing": {"input_size": [32, 32], "crop": "center"}}


def _store(path, y, names):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(len(y), 8)).astype(np.float32)
    X[:, 0] += 4 * np.asarray(y)
    write_store(str(path), {"avgpool": X}, np.asarray(y), names, config=CFG)
    return str(path)


def test_a_binary_scorer_on_three_classes_is_refused_before_the_sweep(tmp_path):
    store = _store(tmp_path / "s", np.arange(60) % 3, ["cat", "dog", "yak"])
    with pytest.raises(HeadError, match=r"^scoring 'f1' cannot score these 3 classes \(cat, dog, yak\): Target is "
                                        r"multiclass .*; choose a multiclass scorer, e\.g\. balanced_accuracy"):
        classifiers.train(store, scoring="f1", cv=3, out=str(tmp_path / "h"))
    assert not (tmp_path / "h").exists()
    r = CliRunner().invoke(main, ["train", store, "--scoring", "roc_auc", "--cv", "3", "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and r.output.startswith("Error: --scoring 'roc_auc' cannot score these 3 classes"), \
        r.output


def test_a_scorer_that_fits_is_used(tmp_path):
    """f1 on two classes, f1_macro on three: accepted, and the sweep is scored by them."""
    two = classifiers.train(_store(tmp_path / "b", np.arange(40) % 2, ["neg", "pos"]), scoring="f1", cv=3)
    assert two.report["sweep_scoring"] == "f1" and len(two.sweep) == 4
    three = classifiers.train(_store(tmp_path / "m", np.arange(60) % 3, ["a", "b", "c"]), scoring="f1_macro", cv=3)
    assert three.report["sweep_scoring"] == "f1_macro"
