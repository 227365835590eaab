"""What heads do with scorers and with stores unlike their training store.

- A scorer that cannot score the store's classes (f1 on three classes) is refused before the sweep,
  naming --scoring, instead of a scikit-learn traceback from inside the sweep's workers.
- The streaming (SGD) sweep is scored by `scoring` as the in-memory sweep is: it used accuracy for
  any scorer but balanced_accuracy while the report named the scorer asked for.
- predict on a store whose folders are not the head's classes (new images sorted by batch, say):
  every row is predicted, with an empty label column; evaluate, which scores labels, still refuses it
  and says what to do instead.
- evaluate on a store without labels said "no labeled test rows", exit 0, and wrote a report of
  nothing; it is refused, saying to predict instead.
"""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import classifiers
from classifiers.heads import HeadError
from featurestore.cli import main
from featurestore.store import write_store

CFG = {"model": "resnet18", "weights": "none", "weights_sha256": "a" * 64, "layers": ["avgpool"],
       "pooling": "avg", "precision": "fp32", "preprocessing": {"input_size": [32, 32], "crop": "center"}}


def _labelled_store(path, y, names):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(len(y), 8)).astype(np.float32)
    X[:, 0] += 4 * np.asarray(y)
    write_store(str(path), {"avgpool": X}, np.asarray(y), names, config=CFG)
    return str(path)


def test_a_binary_scorer_on_three_classes_is_refused_before_the_sweep(tmp_path):
    store = _labelled_store(tmp_path / "s", np.arange(60) % 3, ["cat", "dog", "yak"])
    with pytest.raises(HeadError, match=r"^scoring 'f1' cannot score these 3 classes \(cat, dog, yak\): Target is "
                                        r"multiclass .*; choose a multiclass scorer, e\.g\. balanced_accuracy"):
        classifiers.train(store, scoring="f1", cv=3, out=str(tmp_path / "h"))
    assert not (tmp_path / "h").exists()
    r = CliRunner().invoke(main, ["train", store, "--scoring", "roc_auc", "--cv", "3", "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and r.output.startswith("Error: --scoring 'roc_auc' cannot score these 3 classes"), \
        r.output


def test_a_scorer_that_fits_is_used(tmp_path):
    """f1 on two classes, f1_macro on three: accepted, and the sweep is scored by them."""
    two = classifiers.train(_labelled_store(tmp_path / "b", np.arange(40) % 2, ["neg", "pos"]), scoring="f1", cv=3)
    assert two.report["sweep_scoring"] == "f1" and len(two.sweep) == 4
    three = classifiers.train(_labelled_store(tmp_path / "m", np.arange(60) % 3, ["a", "b", "c"]), scoring="f1_macro",
                              cv=3)
    assert three.report["sweep_scoring"] == "f1_macro"


def _overlapping_store(path):
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    X = rng.normal(size=(150, 8)).astype(np.float32)
    X[np.arange(150), y] += 1.5  # overlapping classes: log loss and accuracy rank alphas differently
    write_store(str(path), {"avgpool": X}, y, ["a", "b", "c"], config=CFG)
    return str(path)


def test_the_streaming_sweep_is_scored_by_the_scorer_asked_for(tmp_path):
    store = _overlapping_store(tmp_path / "s")
    head = classifiers.train(store, head="sgd", scoring="neg_log_loss", epochs=2)
    means = [s["mean"] for s in head.sweep]
    assert head.report["sweep_scoring"] == "neg_log_loss" and len(means) == 4
    assert all(m < 0 for m in means), means  # log losses, not accuracies
    assert head.params["alpha"] == max((s["params"]["alpha"] for s in head.sweep if s["mean"] == max(means)))


def test_a_probability_scorer_for_hinge_loss_is_refused_before_reading(tmp_path):
    store = _overlapping_store(tmp_path / "s")
    with pytest.raises(HeadError, match=r"^scoring 'neg_log_loss' scores probabilities, which an SGD head with "
                                        r"hinge loss does not give; use loss='log_loss', or"):
        classifiers.train(store, head="sgd", loss="hinge", scoring="neg_log_loss")
    r = CliRunner().invoke(main, ["train", store, "--head", "sgd", "--loss", "hinge", "--scoring", "neg_log_loss",
                                  "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and "use --loss log_loss, or a scorer of predicted classes" in r.output, r.output


def _store_of(path, names, n=40):
    rng = np.random.default_rng(len(names))
    y = np.arange(n) % len(names)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X[:, 0] += 4 * y
    write_store(str(path), {"avgpool": X}, y, names, config=CFG)
    return str(path)


def test_predict_a_store_of_other_folders(tmp_path):
    head = classifiers.train(_store_of(tmp_path / "s", ["neg", "pos"]), grid={"C": [1.0]}, out=str(tmp_path / "h"))
    new = _store_of(tmp_path / "new", ["batch1", "batch2", "batch3"], n=30)
    table = classifiers.predict(head, new)
    assert table.num_rows == 30 and table["label"].null_count == 30
    assert set(table["predicted_label"].to_pylist()) <= {"neg", "pos"}
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "h"), new, "--out", str(tmp_path / "p.parquet")])
    assert r.exit_code == 0 and "30 predictions" in r.output, r.output
    assert pq.read_table(tmp_path / "p.parquet")["label"].null_count == 30
    with pytest.raises(classifiers.HeadConfigMismatch, match=r"label names \['batch1', 'batch2', 'batch3'\] are not "
                                                             r"among the head's \['neg', 'pos'\], .*predict its rows"):
        classifiers.evaluate(head, new)


def test_predict_keeps_the_labels_the_head_knows(tmp_path):
    head = classifiers.train(_store_of(tmp_path / "s", ["neg", "pos"]), grid={"C": [1.0]})
    mixed = _store_of(tmp_path / "m", ["pos", "other"], n=20)
    labels = classifiers.predict(head, mixed)["label"].to_pylist()
    assert labels == ["pos", None] * 10


def test_evaluate_refuses_a_store_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    X = rng.normal(size=(40, 8)).astype(np.float32)
    write_store(str(tmp_path / "s"), {"avgpool": X}, y, ["neg", "pos"], config=CFG)
    head = classifiers.train(str(tmp_path / "s"), grid={"C": [1.0]}, out=str(tmp_path / "h"))
    write_store(str(tmp_path / "u"), {"avgpool": X[:10]}, np.full(10, -1), [], config=CFG)
    with pytest.raises(HeadError, match=r"u: no labeled rows to evaluate on .*; predict its rows instead"):
        classifiers.evaluate(head, str(tmp_path / "u"))
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "h"), str(tmp_path / "u"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "no labeled rows to evaluate on" in r.output, r.output
    assert not (tmp_path / "r").exists()
    assert classifiers.predict(head, str(tmp_path / "u")).num_rows == 10  # what to do instead works
