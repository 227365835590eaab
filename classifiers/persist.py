"""Saving and loading heads without letting a file run code.

A head directory holds head.json (kind, layer, label names, the store's backbone
configuration, hyperparameters, the model file's sha256) and model.skops. skops is a
pickle-free format that only rebuilds types it is told to trust: we trust skops's own
defaults (numpy, scikit-learn estimators) plus the exact scikit-learn helpers our heads
use, and refuse anything else before loading. The recorded sha256 refuses a model file
that changed after saving.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from .core import Head, writing
from .terms import Worded, param

FORMAT = "featurestore-head"
VERSION = 1
MODEL_FILE = "model.skops"
META_FILE = "head.json"
# Beyond skops's default trust (numpy, builtins, scikit-learn estimators): the calibration helpers.
TRUSTED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
)


class HeadFileError(Worded, RuntimeError):
    """A head directory is missing, malformed, modified after saving, or holds untrusted types."""


def _versions() -> dict[str, Any]:
    import numpy
    import sklearn
    import skops

    return {"scikit-learn": sklearn.__version__, "skops": skops.__version__, "numpy": numpy.__version__}


# What a head directory holds besides head.json and model.skops: replaced or left out by a new head,
# never kept beside it (an old export would answer for the old head).
HEAD_FILES = ("report.json", "report.md", "confusion_matrix.png", "model.onnx", "model.torchscript.pt")


def _store_above(path: str) -> str | None:
    """The feature store folder `path` lies in (a store.json in it or a folder above), if any."""
    if "://" in path:
        return None
    p = os.path.abspath(path)
    while True:
        if os.path.isfile(os.path.join(p, "store.json")):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def check_local_out(path: str, what: str, job: bool = True) -> None:
    """Refuse a URL where a local path is written (a head, a report, predictions, an export): written
    with os calls, s3://bucket/x became a local folder named 's3:' and the command said it was done.
    job: whether a job (which uploads its outputs) can write it instead."""
    if "://" in str(path):
        raise HeadFileError(f"{param('out')} {path}: {what} is written to a local path, not a URL; write it locally and copy "
                            "it there (e.g. `aws s3 cp`)" + (", or run it as a job (`featurestore submit`), which "
                                                             "uploads it" if job else ""))


def check_out(path: str, overwrite: bool = True) -> None:
    """Refuse an output folder that is not a head's: a feature store (or a folder inside one, which the
    store's --overwrite would delete), or a folder of other files."""
    check_local_out(path, "a head")
    store = _store_above(path)
    if store is not None and os.path.abspath(path) != store:
        raise HeadFileError(f"{param('out')} {path}: inside the feature store {store}; choose a folder outside it")
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise HeadFileError(f"{param('out')} {path}: a file, not a folder; choose a folder for the head")
    names = set(os.listdir(path))
    if "store.json" in names:
        raise HeadFileError(f"{param('out')} {path}: a feature store; choose another folder for the head")
    if META_FILE in names:
        if not overwrite:
            raise HeadFileError(f"{param('out')} {path}: holds a head already; choose a new folder, or pass "
                                f"{param('overwrite', 'True')}")
        return
    if names:
        raise HeadFileError(f"{param('out')} {path}: exists and holds other files ({', '.join(sorted(names)[:3])}...); "
                            "choose a new or empty folder, or a head folder to replace")


def check_report_out(path: str) -> None:
    """Refuse a report folder where evaluate's report.json/report.md would replace another's: a head
    folder (its training report, which the head loads as head.report) or a feature store."""
    check_local_out(path, "a report")
    if os.path.isfile(path):
        raise HeadFileError(f"{param('out')} {path}: a file, not a folder; choose a folder for the report")
    store = _store_above(path)
    if store is not None:
        what = "a feature store" if os.path.abspath(path) == store else f"inside the feature store {store}"
        raise HeadFileError(f"{param('out')} {path}: {what}; choose a folder outside it for the report")
    if os.path.isfile(os.path.join(path, META_FILE)):
        raise HeadFileError(f"{param('out')} {path}: a head folder; its own report (of its test part) would be replaced: "
                            "choose another folder for this report")


def clear_head_files(path: str) -> None:
    """Remove what a previous head left in `path` (its exports, its last report)."""
    for name in HEAD_FILES:
        try:
            os.remove(os.path.join(path, name))
        except FileNotFoundError:
            pass


def absolute_weights(config: dict) -> dict:
    """The store configuration with a local weights file as an absolute path.

    A store records weights as given (`--weights weights.pth`); a head saved with that would
    not find them when classify or export run from another folder. Only a file that exists
    from here is made absolute; URLs, enum names and named sources stay as they are.
    """
    from featurestore.weights import absolute_file_spec, split_recipe

    w = config.get("weights")
    if not isinstance(w, str):
        return config
    p = absolute_file_spec(w)
    return {**config, "weights": p} if p != w and os.path.isfile(split_recipe(p)[0]) else config


def save_head(head: Head, path: str) -> str:
    """Write head.json and model.skops into directory `path` (created); returns the path."""
    import skops.io as sio

    os.makedirs(path, exist_ok=True)
    head.store_config = absolute_weights(dict(head.store_config or {}))
    data = sio.dumps(head.pipeline)
    untrusted = set(sio.get_untrusted_types(data=data)) - set(TRUSTED_TYPES)
    if untrusted:  # would not load again: refuse now rather than at load time
        raise HeadFileError(f"cannot save: the model holds types outside the trusted list: {', '.join(sorted(untrusted))}")
    tmp = os.path.join(path, f".{MODEL_FILE}.tmp")
    with writing(os.path.join(path, MODEL_FILE)):
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(path, MODEL_FILE))
    meta = {
        "format": FORMAT, "version": VERSION, "kind": head.kind, "layer": head.layer,
        "label_names": list(head.label_names), "feature_shape": list(head.feature_shape),
        "params": head.params, "loss": head.loss, "l2": head.l2, "streaming": head.streaming,
        "calibrated_probabilities": head.calibrated_probabilities,
        "sweep": head.sweep, "trained_on": head.trained_on, "store_config": head.store_config,
        "model_file": MODEL_FILE, "model_sha256": hashlib.sha256(data).hexdigest(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "libraries": _versions(),
    }
    tmp = os.path.join(path, f".{META_FILE}.tmp")
    with writing(os.path.join(path, META_FILE)):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2, default=str)
        os.replace(tmp, os.path.join(path, META_FILE))
    head.path = str(path)
    return str(path)


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise HeadFileError(f"{path}: not a head directory (no {META_FILE}); train one with `featurestore train STORE --out DIR`")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise HeadFileError(f"{meta_path}: unreadable ({exc})") from None
    if meta.get("format") != FORMAT:
        raise HeadFileError(f"{meta_path}: not a featurestore head (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise HeadFileError(f"{meta_path}: head format version {meta.get('version')} is newer than this library "
                            f"reads ({VERSION}); upgrade featurestore")
    return meta


def load_head(path: str) -> Head:
    """Load a saved head, refusing a model file whose sha256 changed or that holds untrusted types."""
    import skops.io as sio

    path = str(path)
    meta = read_meta(path)
    model_path = os.path.join(path, os.path.basename(meta.get("model_file", MODEL_FILE)))
    try:
        with open(model_path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise HeadFileError(f"{model_path}: cannot read the model ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("model_sha256"):
        raise HeadFileError(f"{model_path}: sha256 {digest[:16]}... does not match head.json "
                            f"({str(meta.get('model_sha256'))[:16]}...): the file was modified after saving; refusing to load it")
    try:
        untrusted = set(sio.get_untrusted_types(data=data)) - set(TRUSTED_TYPES)
    except Exception as exc:
        raise HeadFileError(f"{model_path}: not a valid skops file ({exc}); refusing to load it") from None
    if untrusted:
        raise HeadFileError(f"{model_path}: holds types outside the trusted list ({', '.join(sorted(untrusted))}); "
                            "refusing to load it")
    try:
        pipeline = sio.loads(data, trusted=list(TRUSTED_TYPES))
    except Exception as exc:
        raise HeadFileError(f"{model_path}: refused by the safe loader ({type(exc).__name__}: {exc})") from None
    return Head(pipeline=pipeline, kind=meta["kind"], layer=meta["layer"], label_names=list(meta["label_names"]),
                store_config=dict(meta.get("store_config") or {}), feature_shape=tuple(meta["feature_shape"]),
                params=dict(meta.get("params") or {}), loss=meta.get("loss"), l2=bool(meta.get("l2")),
                streaming=bool(meta.get("streaming")), sweep=list(meta.get("sweep") or []),
                report=_read_report(path), trained_on=meta.get("trained_on"), path=path)


def _read_report(path: str) -> dict | None:
    p = os.path.join(path, "report.json")
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
