"""predict on a store whose folders are not the head's classes (new images sorted by batch, say):
every row is predicted, with an empty label column; evaluate, which scores labels, still refuses it
and says what to do instead."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import classifiers
from featurestore.cli import main
from featurestore.store import write_store

CFG = {"model": "resnet18", "weights": "none", "weights_sha256": "a" * 64, "layers": ["avgpool"],
       "pooling": "avg", "precision": "fp32", "preprocessing": {"input_size": [32, 32], "crop": "center"}}


def _store(path, names, n=40):
    rng = np.random.default_rng(len(names))
    y = np.arange(n) % len(names)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X[:, 0] += 4 * y
    write_store(str(path), {"avgpool": X}, y, names, config=CFG)
    return str(path)


def test_predict_a_store_of_other_folders(tmp_path):
    head = classifiers.train(_store(tmp_path / "s", ["neg", "pos"]), grid={"C": [1.0]}, out=str(tmp_path / "h"))
    new = _store(tmp_path / "new", ["batch1", "batch2", "batch3"], n=30)
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
    head = classifiers.train(_store(tmp_path / "s", ["neg", "pos"]), grid={"C": [1.0]})
    mixed = _store(tmp_path / "m", ["pos", "other"], n=20)
    labels = classifiers.predict(head, mixed)["label"].to_pylist()
    assert labels == ["pos", None] * 10
