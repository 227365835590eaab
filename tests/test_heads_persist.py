"""Heads on disk: identical predictions after loading, tampering refused, other configurations refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from featurestore.store import write_store

import classifiers
from classifiers import HeadConfigMismatch, HeadFileError

CFG = {"model": "resnet18", "weights": "none", "weights_sha256": "a" * 64, "layers": ["avgpool"],
       "pooling": "avg", "precision": "fp32", "preprocessing": {"input_size": [32, 32], "crop": "center"}}


def store(path, config=CFG, layer="avgpool", seed=0, names=("cat", "dog", "panda")):
    rng = np.random.default_rng(seed)
    n, k = 150, len(names)
    y = np.arange(n) % k
    X = rng.normal(size=(n, 12))
    X[np.arange(n), y] += 3.0
    return write_store(str(path), {layer: X.astype(np.float32)}, y, list(names), config=config, shard_size=64)


@pytest.mark.parametrize("kind,loss", [("logreg", "log_loss"), ("linear-svm", "log_loss"), ("svm", "log_loss"),
                                       ("sgd", "hinge")])
def test_saved_head_loads_and_predicts_identically(tmp_path, kind, loss):
    s = store(tmp_path / "s")
    head = classifiers.train(s, head=kind, loss=loss, cv=3, out=str(tmp_path / "h"), l2=kind == "svm")
    loaded = classifiers.load_head(str(tmp_path / "h"))
    X = s.features().to_numpy()
    assert np.array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert loaded.label_names == ["cat", "dog", "panda"] and loaded.layer == "avgpool"
    assert loaded.store_config["weights_sha256"] == "a" * 64 and loaded.params == head.params
    meta = json.loads((tmp_path / "h" / "head.json").read_text())
    assert meta["model_sha256"] and meta["store_config"]["preprocessing"]["input_size"] == [32, 32]


def test_modified_model_file_is_refused(tmp_path):
    classifiers.train(store(tmp_path / "s"), head="logreg", out=str(tmp_path / "h"))
    model = tmp_path / "h" / "model.skops"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(HeadFileError, match="modified after saving"):
        classifiers.load_head(str(tmp_path / "h"))


def test_untrusted_types_are_refused_even_with_a_matching_hash(tmp_path):
    import hashlib

    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    classifiers.train(store(tmp_path / "s"), head="logreg", out=str(tmp_path / "h"))
    evil = sio.dumps(Pipeline([("clf", FunctionTransformer(eval))]))  # would call eval on load/apply
    (tmp_path / "h" / "model.skops").write_bytes(evil)
    meta_path = tmp_path / "h" / "head.json"
    meta = json.loads(meta_path.read_text())
    meta["model_sha256"] = hashlib.sha256(evil).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(HeadFileError, match="outside the trusted list.*eval"):
        classifiers.load_head(str(tmp_path / "h"))


def test_not_a_head_directory(tmp_path):
    with pytest.raises(HeadFileError, match="not a head directory"):
        classifiers.load_head(str(tmp_path))


def test_features_from_another_configuration_are_refused(tmp_path):
    head = classifiers.train(store(tmp_path / "a"), head="logreg", out=str(tmp_path / "h"))
    other = {**CFG, "weights_sha256": "b" * 64, "pooling": "max",
             "preprocessing": {"input_size": [64, 64], "crop": "center"}}
    b = store(tmp_path / "b", config=other)
    with pytest.raises(HeadConfigMismatch) as err:
        classifiers.evaluate(str(tmp_path / "h"), b)
    msg = str(err.value)
    assert "weights_sha256" in msg and "pooling" in msg and "preprocessing.input_size" in msg
    assert set(d.split(":")[0] for d in err.value.differences) == {"weights_sha256", "pooling", "preprocessing.input_size"}
    with pytest.raises(HeadConfigMismatch, match="layer"):
        classifiers.predict(head, store(tmp_path / "c", layer="layer4"))
    # same configuration, another store: accepted
    rep = classifiers.evaluate(head, store(tmp_path / "d", seed=5))
    assert rep["accuracy"] > 0.9


def test_predict_writes_parquet_with_probabilities(tmp_path):
    import pyarrow.parquet as pq

    s = store(tmp_path / "s")
    head = classifiers.train(s, head="logreg")
    classifiers.predict(head, s, out=str(tmp_path / "p" / "preds.parquet"))
    t = pq.read_table(str(tmp_path / "p" / "preds.parquet"))
    assert t.column_names[:5] == ["id", "label", "predicted", "predicted_label", "probabilities"]
    assert t.num_rows == len(s) and t["id"].to_pylist() == list(s.ids)
    probs = np.array(t["probabilities"].to_pylist())
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(1), t["predicted"].to_numpy())
