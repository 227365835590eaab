"""Streaming training for stores larger than memory: SGDClassifier.partial_fit over shards.

Memory stays at a few read chunks whatever the store's size: a first pass fits the
StandardScaler with partial_fit (over StoreReader.iter_batches); each epoch then visits
fixed-size row chunks in a fresh random order and mixes a few chunks at a time, because
stores are written in listing order (sorted by class) and SGD on class-sorted batches
forgets the earlier classes.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import get_scorer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.utils.metaestimators import available_if

from .core import as_rows
from .split import hash_split

log = logging.getLogger(__name__)


class _Replay(ClassifierMixin, BaseEstimator):
    """A model's outputs on the validation rows, replayed to a scikit-learn scorer: those rows are read
    in chunks, so the scorer cannot run the model on them itself. Its X is the rows' positions (N, 1);
    outputs: {"predict": ..., "decision_function": ..., "predict_proba": ... (log_loss only)}."""

    def __init__(self, classes=None, outputs=None):
        self.classes = classes
        self.outputs = outputs

    def __sklearn_is_fitted__(self) -> bool:
        return True

    @property
    def classes_(self):
        return self.classes

    def _out(self, name, X):
        return self.outputs[name][np.asarray(X)[:, 0].astype(np.int64)]

    def predict(self, X):
        return self._out("predict", X)

    def decision_function(self, X):
        return self._out("decision_function", X)

    @available_if(lambda self: "predict_proba" in self.outputs)
    def predict_proba(self, X):
        return self._out("predict_proba", X)


def check_scoring(scoring: str, loss: str, classes) -> None:
    """Refuse a scorer of probabilities (neg_log_loss, roc_auc_ovr) for hinge-loss SGD, which gives
    none, before the store is read; tried on a replay of a few dummy outputs."""
    from .heads import HeadError
    from .terms import param

    if loss == "log_loss":
        return
    y = np.repeat(np.asarray(classes), 2)
    k = len(classes)
    outs = {"predict": y, "decision_function": np.eye(k)[np.searchsorted(classes, y)] if k > 2 else y - 0.5}
    try:
        get_scorer(scoring)(_Replay(np.asarray(classes), outs), np.arange(len(y)).reshape(-1, 1), y)
    except AttributeError:
        raise HeadError(f"{param('scoring')} {scoring!r} scores probabilities, which an SGD head with hinge loss "
                        f"does not give; use {param('loss', 'log_loss')}, or a scorer of predicted classes "
                        "(balanced_accuracy, f1_macro)") from None
    except (ValueError, TypeError):  # anything else about this scorer is fit.check_scoring's to say
        pass


def _class_weights(class_weight, labels_train: np.ndarray, label_names: list[str]) -> np.ndarray:
    k = len(label_names)
    w = np.ones(k, dtype=np.float64)
    if class_weight == "balanced":
        counts = np.bincount(labels_train, minlength=k).astype(np.float64)
        present = counts > 0
        w[present] = len(labels_train) / (present.sum() * counts[present])
    elif isinstance(class_weight, dict):
        for key, v in class_weight.items():
            idx = label_names.index(key) if isinstance(key, str) else int(key)
            w[idx] = float(v)
    return w


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _mixed_batches(feats, labels, mask, size: int, mix: int, rng, transform) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows where mask is True, as shuffled batches of `size`: small contiguous chunks (size/16 rows) are
    read in random order and pooled `mix` batches' worth at a time, then shuffled within the pool."""
    step = max(32, size // 16)
    chunks = [c for c in _chunks(len(labels), step) if mask[c[0]:c[1]].any()]
    order = rng.permutation(len(chunks))
    per_pool = max(1, (mix * size) // step)
    for g in range(0, len(order), per_pool):
        xs, ys = [], []
        for ci in order[g:g + per_pool]:
            a, b = chunks[ci]
            m = mask[a:b]
            X = as_rows(feats[a:b])[m]
            xs.append(transform(X))
            ys.append(labels[a:b][m])
        X, y = np.concatenate(xs), np.concatenate(ys)
        perm = rng.permutation(len(y))
        X, y = X[perm], y[perm]
        for a in range(0, len(y), size):
            yield X[a:a + size], y[a:a + size]


def fit_streaming(*, reader, layer, label_names, is_test, labeled, ids, labels, seed, scoring, grid, loss,
                  class_weight, l2, batch_size, epochs, train_rows, mix: int = 4) -> tuple[Pipeline, dict, list, int]:
    """Fit [Normalizer] -> StandardScaler -> SGDClassifier without holding the store in memory.

    With several alpha values, every candidate learns in the same passes on the training part
    minus a stratified 20% validation hold-out; the best is then refitted on the whole training part.
    """
    feats = reader.features(layer)
    classes = np.arange(len(label_names))
    train_mask = labeled & ~is_test
    normalizer = Normalizer() if l2 else None

    def prep(X):
        X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        return normalizer.transform(X) if normalizer is not None else X

    if normalizer is not None:
        normalizer.fit(np.zeros((1, int(np.prod(feats.shape[1:])))))
    # pass 1: the scaler
    scaler = StandardScaler()
    offset = 0
    for bids, X, y in reader.iter_batches(batch_size, layer):
        n = len(y)
        if n and str(bids[0]) != str(ids[offset]):
            raise RuntimeError(f"{reader.uri}: batch order differs from the store's id order at row {offset}")
        m = train_mask[offset:offset + n]
        if m.any():
            scaler.partial_fit(prep(X[m]))
        offset += n

    weights = _class_weights(class_weight, labels[train_rows], label_names)

    def transform(X):
        return scaler.transform(prep(X))

    def new_model(alpha):
        return SGDClassifier(loss=loss, alpha=float(alpha), average=True, random_state=seed)

    def run(models, mask, rng_seed):
        rng = np.random.default_rng(rng_seed)
        for _ in range(int(epochs)):
            for X, y in _mixed_batches(feats, labels, mask, batch_size, mix, rng, transform):
                sw = weights[y]
                for mdl in models:
                    mdl.partial_fit(X, y, classes=classes, sample_weight=sw)
        return models

    alphas = [float(a) for a in grid.get("alpha", [1e-4])]
    sweep: list[dict] = []
    cv_used = 0
    if len(alphas) > 1:
        val_mask = train_mask & hash_split(ids, labels, test_size=0.2, seed=seed, salt="validation:")
        fit_mask = train_mask & ~val_mask
        models = run([new_model(a) for a in alphas], fit_mask, seed)
        # each candidate scored by `scoring` (f1_macro, neg_log_loss, ...), as the in-memory sweep is
        methods = ("predict", "decision_function") + (("predict_proba",) if loss == "log_loss" else ())
        ys, outs = [], [{m: [] for m in methods} for _ in models]
        for a, b in _chunks(len(labels), batch_size):
            m = val_mask[a:b]
            if not m.any():
                continue
            X = transform(as_rows(feats[a:b])[m])
            ys.append(labels[a:b][m])
            for i, mdl in enumerate(models):
                for name in methods:
                    outs[i][name].append(getattr(mdl, name)(X))
        y_val = np.concatenate(ys)
        scorer, rows = get_scorer(scoring), np.arange(len(y_val)).reshape(-1, 1)
        scores = [float(scorer(_Replay(classes, {k: np.concatenate(v) for k, v in o.items()}), rows, y_val))
                  for o in outs]
        sweep = [{"params": {"alpha": a}, "mean": s, "std": 0.0} for a, s in zip(alphas, scores)]
        top = max(scores)  # ties (common on easy data): the strongest alpha, whose probabilities saturate least
        best = max(a for a, s in zip(alphas, scores) if s == top)
        cv_used = 1  # one stratified hold-out
    else:
        best = alphas[0]
    final = run([new_model(best)], train_mask, seed + 1)[0]
    steps = ([("l2", normalizer)] if normalizer is not None else []) + [("scale", scaler), ("clf", final)]
    return Pipeline(steps), {"alpha": best, "loss": loss, "epochs": int(epochs)}, sweep, cv_used
