"""Estimators for each head kind, as plain scikit-learn pipelines.

Every head is `[Normalizer (optional L2)] -> StandardScaler -> classifier`, so a head is
usable anywhere a scikit-learn pipeline is; SVMs are wrapped in a sigmoid calibrator
(Platt scaling) after the sweep so that every head can report class probabilities and
export them as one closed-form function.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from .terms import Worded, param

HEADS = ("logreg", "linear-svm", "svm", "sgd")
SGD_LOSSES = ("log_loss", "hinge")

# Default sweeps (cross-validated on the training part only).
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "logreg": {"C": [0.01, 0.1, 1.0, 10.0]},
    "linear-svm": {"C": [0.001, 0.01, 0.1, 1.0]},
    "svm": {"C": [0.1, 1.0, 10.0], "gamma": ["scale"]},
    # alpha ~ 1 / (C x training rows): about logreg's C range for a few thousand rows. Weaker
    # alphas drive log-loss weights on separable features to probabilities of exactly 0 and 1.
    "sgd": {"alpha": [1e-4, 1e-3, 1e-2, 1e-1]},
}
# Which hyperparameters each kind accepts in its grid.
GRID_KEYS = {"logreg": {"C"}, "linear-svm": {"C"}, "svm": {"C", "gamma"}, "sgd": {"alpha"}}


class HeadError(Worded, ValueError):
    """A head was asked for something it cannot do; the message says what to change (its parameters
    marked with terms.param: str() names them as Python does, the CLI as flags)."""


def check_loss(loss: str) -> None:
    """SGD's loss, checked before any work: any head streams with SGD when its features exceed the
    memory budget, and SGDClassifier's own refusal came after a pass over the store."""
    if loss not in SGD_LOSSES:
        raise HeadError(f"{param('loss')} must be one of {', '.join(SGD_LOSSES)} (SGD's, when a head streams), "
                        f"got {loss!r}")


def check_kind(kind: str) -> str:
    if kind not in HEADS:
        raise HeadError(f"unknown head {kind!r}; choose one of: {', '.join(HEADS)}")
    return kind


def classifier(kind: str, *, class_weight: Any = None, seed: int = 0, loss: str = "log_loss",
               **params: Any):
    """The bare (uncalibrated) estimator of a head kind with the given hyperparameters."""
    check_kind(kind)
    if kind == "logreg":
        return LogisticRegression(C=params.get("C", 1.0), max_iter=3000, class_weight=class_weight, random_state=seed)
    if kind == "linear-svm":
        return LinearSVC(C=params.get("C", 0.01), class_weight=class_weight, max_iter=20000, random_state=seed)
    if kind == "svm":
        return SVC(kernel="rbf", C=params.get("C", 1.0), gamma=params.get("gamma", "scale"),
                   class_weight=class_weight, decision_function_shape="ovr", random_state=seed)
    check_loss(loss)
    return SGDClassifier(loss=loss, alpha=params.get("alpha", 1e-4), class_weight=class_weight,
                         max_iter=50, tol=1e-4, random_state=seed)


def make_pipeline(kind: str, *, l2: bool = False, class_weight: Any = None, seed: int = 0,
                  loss: str = "log_loss", **params: Any) -> Pipeline:
    """Preprocessing and the bare classifier in one Pipeline (step names: l2, scale, clf)."""
    steps: list = []
    if l2:
        steps.append(("l2", Normalizer(norm="l2")))
    steps.append(("scale", StandardScaler()))
    steps.append(("clf", classifier(kind, class_weight=class_weight, seed=seed, loss=loss, **params)))
    return Pipeline(steps)


def needs_calibration(kind: str) -> bool:
    """SVMs give margins, not probabilities: they get a sigmoid calibrator after the sweep."""
    return kind in ("linear-svm", "svm")


def calibrated(pipeline: Pipeline, cv: int = 3) -> Pipeline:
    """Replace the pipeline's SVM by Platt-calibrated one (fitted on all data, calibrated by CV)."""
    steps = list(pipeline.steps)
    name, est = steps[-1]
    steps[-1] = (name, CalibratedClassifierCV(est, method="sigmoid", cv=cv, ensemble=False))
    return Pipeline(steps)


def parse_grid(specs: str | list[str] | tuple[str, ...] | dict | None, kind: str) -> dict[str, list]:
    """'C=0.01,0.1,1' (one, or a list as --grid repeated) -> {'C': [0.01, 0.1, 1.0]}; None -> the kind's
    default sweep. A single string is one spec (it was read character by character: "grid 'C': expected")."""
    check_kind(kind)
    if isinstance(specs, str):
        specs = [specs]
    if specs is None or (not isinstance(specs, dict) and len(specs) == 0):
        return {k: list(v) for k, v in DEFAULT_GRIDS[kind].items()}
    if isinstance(specs, dict):
        grid = {k: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] for k, v in specs.items()}
    else:
        grid = {}
        for spec in specs:
            for part in [spec] if spec.count("=") == 1 else spec.split(";"):
                key, sep, values = part.partition("=")
                if not sep or not values.strip():
                    raise HeadError(f"{param('grid')} {spec!r}: expected NAME=V1,V2,... e.g. C=0.01,0.1,1")
                grid[key.strip()] = [_value(v.strip()) for v in values.split(",") if v.strip()]
    allowed = GRID_KEYS[kind]
    for key in grid:
        if key not in allowed:
            raise HeadError(f"{param('grid')}: head {kind!r} has no hyperparameter {key!r}; it accepts: {', '.join(sorted(allowed))}")
        if not grid[key]:
            raise HeadError(f"{param('grid')}: no values given for {key!r}")
        for v in grid[key]:
            if isinstance(v, str) and key == "gamma" and v in ("scale", "auto"):
                continue
            if isinstance(v, str):
                raise HeadError(f"{param('grid')} {key}: {v!r} is not a number"
                                + (" (gamma also accepts 'scale' or 'auto')" if key == "gamma" else ""))
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0:
                raise HeadError(f"{param('grid')} {key}: {v!r}; {key} must be a number > 0, e.g. {key}="
                                + ",".join(f"{x:g}" for x in DEFAULT_GRIDS[kind].get(key, [0.1, 1.0])
                                           if not isinstance(x, str)))
    return grid


def _value(text: str):
    if text in ("scale", "auto"):
        return text
    try:
        return float(text)
    except ValueError:
        return text  # named in parse_grid, which knows the hyperparameter
