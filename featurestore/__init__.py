"""featurestore: sharded HDF5 feature stores from image sets with pretrained backbones on Ray.

Imports are lazy (module __getattr__) so `import featurestore` and `featurestore --help`
stay fast; torch, timm and Ray load only when a function that needs them is used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "list_models": "featurestore.backbones:list_models",
    "list_layers": "featurestore.backbones:list_layers",
    "load_backbone": "featurestore.backbones:load_backbone",
    "classify": "featurestore.backbones:classify",
    "Backbone": "featurestore.backbones:Backbone",
    "LayerInfo": "featurestore.backbones:LayerInfo",
    "ModelInfo": "featurestore.zoo:ModelInfo",
    "UnknownModelError": "featurestore.zoo:UnknownModelError",
    "UnknownLayerError": "featurestore.zoo:UnknownLayerError",
    "WeightsError": "featurestore.weights:WeightsError",
    "Preprocessing": "featurestore.preprocess:Preprocessing",
    "decode_image": "featurestore.decode:decode_image",
    "load_image": "featurestore.decode:load_image",
    "BadImage": "featurestore.decode:BadImage",
    "SourceError": "featurestore.sources:SourceError",
    "FilesystemUnavailable": "featurestore.sources:FilesystemUnavailable",
    "open": "featurestore.store:open_store",
    "StoreError": "featurestore.store:StoreError",
    "verify": "featurestore.store:verify",
    "extract": "featurestore.engine:extract",
    "ExtractResult": "featurestore.engine:ExtractResult",
    "ExtractError": "featurestore.engine:ExtractError",
    "ExtractInterrupted": "featurestore.engine:ExtractInterrupted",
    "probe": "featurestore.probing:probe",
    "ExtractConfig": "featurestore.config:ExtractConfig",
    "BackboneConfig": "featurestore.config:BackboneConfig",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'featurestore' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
