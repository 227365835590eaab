"""The Head: a fitted pipeline plus everything needed to apply it safely elsewhere.

A head is only meaningful on features made exactly like the ones it was trained on,
so it carries its store's backbone configuration and refuses any other.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .terms import Worded

# store.json "config" keys that change the numbers a head sees (weights id is a name; its hash is the truth)
COMPARED_KEYS = ("model", "weights_sha256", "pooling", "precision", "preprocessing")


class HeadConfigMismatch(Worded, ValueError):
    """Features come from another backbone configuration; .differences names each key."""

    def __init__(self, message: str, differences: list[str] | None = None):
        super().__init__(message)  # differences optional: an unpickled error (from a Ray worker) has none
        self.differences = list(differences or [])


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """An OSError while writing `path` names it: a failed write() or close() (a full disk) names no
    file, and the commands tell which path failed, and that it was being written, by the name."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{prefix}.{k}: (absent) vs {b[k]!r}")
            elif k not in b:
                out.append(f"{prefix}.{k}: {a[k]!r} vs (absent)")
            else:
                out.extend(_diff(a[k], b[k], f"{prefix}.{k}"))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix}: {a!r} (head) vs {b!r} (features)"]


def config_differences(head_config: dict, store_config: dict, layer: str, store_layers: list[str],
                       feature_shape: tuple | None = None, store_shape: tuple | None = None) -> list[str]:
    """Every way features described by (store_config, layer, shape) differ from what a head was trained on."""
    diffs: list[str] = []
    for key in COMPARED_KEYS:
        if key in head_config or key in store_config:
            diffs.extend(_diff(head_config.get(key, "(absent)"), store_config.get(key, "(absent)"), key))
    if layer not in store_layers:
        diffs.append(f"layer: {layer!r} (head) not among the store's layers {list(store_layers)!r}")
    elif feature_shape is not None and store_shape is not None and tuple(feature_shape) != tuple(store_shape):
        diffs.append(f"feature shape of {layer!r}: {tuple(feature_shape)} (head) vs {tuple(store_shape)} (features)")
    return diffs


class ExportError(Worded, RuntimeError):
    """An exported file does not compute what the head computes (its verification failed)."""


class ExportArgumentError(ExportError, ValueError):
    """export() was asked for something it cannot write (fmt, opset, out, a missing package);
    the message says what to pass instead. A ValueError too, as for any bad argument."""


def as_rows(X) -> np.ndarray:
    """Features as an (N, D) matrix; float16 (a store's --dtype float16) widened to float32, since
    scikit-learn's scalers would otherwise compute in float16 and overflow."""
    X = np.asarray(X)
    X = X.reshape(len(X), -1)
    return X.astype(np.float32) if X.dtype == np.float16 else X


@dataclass
class Head:
    """A trained head: `pipeline` maps flattened features of `layer` to class probabilities."""

    pipeline: Any
    kind: str
    layer: str
    label_names: list[str]
    store_config: dict
    feature_shape: tuple
    params: dict = field(default_factory=dict)
    loss: str | None = None
    l2: bool = False
    streaming: bool = False
    sweep: list[dict] = field(default_factory=list)
    report: dict | None = None
    trained_on: str | None = None
    path: str | None = None

    # -- applying
    @property
    def num_features(self) -> int:
        return int(np.prod(self.feature_shape)) if self.feature_shape else 1

    @property
    def calibrated_probabilities(self) -> bool:
        """False only for hinge-loss SGD, whose 'probabilities' are normalised one-vs-rest scores."""
        return not (self.kind == "sgd" and self.loss == "hinge")

    def _flat(self, X) -> np.ndarray:
        X = as_rows(X)
        if X.shape[1] != self.num_features:
            raise HeadConfigMismatch(f"features have {X.shape[1]} values per row; this head expects "
                                     f"{self.num_features} (layer {self.layer!r}, shape {tuple(self.feature_shape)})",
                                     [f"feature width: {self.num_features} (head) vs {X.shape[1]} (features)"])
        return X

    def predict_proba(self, X) -> np.ndarray:
        """(N, num_classes) probabilities over all label_names (classes absent in training get 0)."""
        X = self._flat(X)
        clf = self.pipeline
        if self.kind != "sgd":
            p = clf.predict_proba(X)
        else:  # one-vs-rest logistic scores normalised (sklearn's rule), computed in log space to stay finite
            from scipy.special import expit, log_expit, softmax

            d = clf.decision_function(X)
            if d.ndim == 1:
                s = expit(d)
                p = np.stack([1.0 - s, s], axis=1)
            else:
                p = softmax(log_expit(d), axis=1)
        classes = np.asarray(clf.classes_, dtype=np.int64)
        if len(classes) == len(self.label_names) and np.array_equal(classes, np.arange(len(classes))):
            return p
        full = np.zeros((len(X), len(self.label_names)), dtype=p.dtype)
        full[:, classes] = p
        return full

    def predict(self, X) -> np.ndarray:
        """Predicted label ids: the argmax of predict_proba, except for SGD heads, whose class is the
        highest decision score (as scikit-learn's predict): two large one-vs-rest scores both give a
        logistic score of 1.0, so their probabilities tie while the scores still tell them apart."""
        if self.kind != "sgd":
            return self.predict_proba(X).argmax(axis=1)
        clf = self.pipeline
        d = clf.decision_function(self._flat(X))
        best = (d > 0).astype(np.int64) if d.ndim == 1 else d.argmax(axis=1)
        return np.asarray(clf.classes_, dtype=np.int64)[best]

    # -- safety
    def check_compatible(self, store, labels: bool = True) -> None:
        """Refuse a store whose backbone configuration or layer differs from the training store's, and
        (labels: for evaluate, which compares them) one whose class names are not among the head's."""
        shape = None
        info = store.meta.get("layers", {}).get(self.layer) if hasattr(store, "meta") else None
        if info is not None:
            shape = tuple(info.get("shape", ()))
        diffs = config_differences(self.store_config, store.config, self.layer, list(store.layers),
                                   self.feature_shape, shape)
        if diffs:
            where = self.path or "this head"
            raise HeadConfigMismatch(
                f"{getattr(store, 'uri', store)}: features were made with another backbone configuration than "
                f"{where} was trained on; differing: " + "; ".join(diffs)
                + ". Re-extract the images with the head's configuration (see head.json) or train a head on this store.",
                diffs)
        names = list(getattr(store, "label_names", []) or [])
        if labels and names and names != list(self.label_names) and not set(names) <= set(self.label_names):
            raise HeadConfigMismatch(
                f"{getattr(store, 'uri', store)}: label names {names} are not among the head's {self.label_names}, "
                "so its rows cannot be scored against them; predict its rows instead, or evaluate on a store "
                "of the head's classes", ["label_names"])

    # -- persistence (see persist.py)
    def save(self, path: str) -> str:
        from .persist import save_head

        return save_head(self, path)

    @classmethod
    def load(cls, path: str) -> "Head":
        from .persist import load_head

        return load_head(path)

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "defaults"
        return f"{self.kind} head on layer {self.layer!r} ({len(self.label_names)} classes; {p})"
