"""classifiers: lightweight heads (logistic regression, linear/RBF SVM, streaming SGD) on feature stores.

    head = classifiers.train("stores/animals", head="logreg", out="heads/animals")
    classifiers.evaluate(head, "stores/other")          # refuses another backbone configuration
    classifiers.predict_images("heads/animals", ["cat.jpg"])

Imports are lazy so that `featurestore --help` does not load scikit-learn or torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "classifiers.fit:train",
    "evaluate": "classifiers.apply:evaluate",
    "predict": "classifiers.apply:predict",
    "predict_images": "classifiers.apply:predict_images",
    "predict_features": "classifiers.apply:predict_features",
    "load_head_backbone": "classifiers.apply:load_head_backbone",
    "export": "classifiers.exporter:export",
    "head_module": "classifiers.exporter:head_module",
    "Head": "classifiers.core:Head",
    "HeadConfigMismatch": "classifiers.core:HeadConfigMismatch",
    "HeadError": "classifiers.heads:HeadError",
    "HeadFileError": "classifiers.persist:HeadFileError",
    "ExportError": "classifiers.core:ExportError",
    "ExportArgumentError": "classifiers.core:ExportArgumentError",
    "HEADS": "classifiers.heads:HEADS",
    "make_pipeline": "classifiers.heads:make_pipeline",
    "save_head": "classifiers.persist:save_head",
    "load_head": "classifiers.persist:load_head",
    "load": "classifiers.persist:load_head",
    "hash_split": "classifiers.split:hash_split",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'classifiers' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
