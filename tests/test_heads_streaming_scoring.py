"""The streaming (SGD) sweep is scored by `scoring` as the in-memory sweep is: it used accuracy for
any scorer but balanced_accuracy while the report named the scorer asked for."""
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


def _store(path):
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    X = rng.normal(size=(150, 8)).astype(np.float32)
    X[np.arange(150), y] += 1.5  # overlapping classes: log loss and accuracy rank alphas differently
    write_store(str(path), {"avgpool": X}, y, ["a", "b", "c"], config=CFG)
    return str(path)


def test_the_streaming_sweep_is_scored_by_the_scorer_asked_for(tmp_path):
    store = _store(tmp_path / "s")
    head = classifiers.train(store, head="sgd", scoring="neg_log_loss", epochs=2)
    means = [s["mean"] for s in head.sweep]
    assert head.report["sweep_scoring"] == "neg_log_loss" and len(means) == 4
    assert all(m < 0 for m in means), means  # log losses, not accuracies
    assert head.params["alpha"] == max((s["params"]["alpha"] for s in head.sweep if s["mean"] == max(means)))


def test_a_probability_scorer_for_hinge_loss_is_refused_before_reading(tmp_path):
    store = _store(tmp_path / "s")
    with pytest.raises(HeadError, match=r"^scoring 'neg_log_loss' scores probabilities, which an SGD head with "
                                        r"hinge loss does not give; use loss='log_loss', or"):
        classifiers.train(store, head="sgd", loss="hinge", scoring="neg_log_loss")
    r = CliRunner().invoke(main, ["train", store, "--head", "sgd", "--loss", "hinge", "--scoring", "neg_log_loss",
                                  "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and "use --loss log_loss, or a scorer of predicted classes" in r.output, r.output
