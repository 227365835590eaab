"""evaluate on a store without labels said "no labeled test rows", exit 0, and wrote a report of
nothing; it is refused, saying to predict instead."""
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
