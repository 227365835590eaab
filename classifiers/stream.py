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
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from .core import as_rows
from .split import hash_split

log = logging.getLogger(__name__)


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
        ys, preds = [], [[] for _ in models]
        for a, b in _chunks(len(labels), batch_size):
            m = val_mask[a:b]
            if not m.any():
                continue
            X = transform(as_rows(feats[a:b])[m])
            ys.append(labels[a:b][m])
            for i, mdl in enumerate(models):
                preds[i].append(mdl.predict(X))
        y_val = np.concatenate(ys)
        score = balanced_accuracy_score if scoring == "balanced_accuracy" else accuracy_score
        scores = [float(score(y_val, np.concatenate(p))) for p in preds]
        sweep = [{"params": {"alpha": a}, "mean": s, "std": 0.0} for a, s in zip(alphas, scores)]
        top = max(scores)  # ties (common on easy data): the strongest alpha, whose probabilities saturate least
        best = max(a for a, s in zip(alphas, scores) if s == top)
        cv_used = 1  # one stratified hold-out
    else:
        best = alphas[0]
    final = run([new_model(best)], train_mask, seed + 1)[0]
    steps = ([("l2", normalizer)] if normalizer is not None else []) + [("scale", scaler), ("clf", final)]
    return Pipeline(steps), {"alpha": best, "loss": loss, "epochs": int(epochs)}, sweep, cv_used
