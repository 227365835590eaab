"""`python -m jobs.train --config SPEC.yaml`: train a head on a store; save it to a directory or URL."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile

from featurestore.config import ConfigError
from jobs._entry import check_outputs, is_remote, main, upload_dir

log = logging.getLogger("jobs.train")


def run(spec, cfg) -> int:
    import classifiers
    from featurestore.store import open_store

    check_outputs(spec, cfg)
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    kwargs["storage_options"] = kwargs["storage_options"] or None
    reader = open_store(cfg.store, kwargs["storage_options"])  # a missing store: StoreError, the input's fault
    check_inputs(cfg, reader)
    kwargs["store"] = reader
    out = kwargs.pop("out")
    # Heads are saved into a local directory; object storage gets a copy of it.
    local = tempfile.mkdtemp(prefix="featurestore-head-") if is_remote(out) else out
    try:
        head = classifiers.train(out=local, **kwargs)
        if local != out:
            upload_dir(local, out, cfg.storage_options)
    finally:
        if local != out:
            shutil.rmtree(local, ignore_errors=True)
    rep = head.report or {}
    log.info("head %s on layer %s saved to %s; test accuracy %s, balanced accuracy %s (n=%s), params %s",
             head.kind, head.layer, out, _fmt(rep.get("accuracy")), _fmt(rep.get("balanced_accuracy")),
             rep.get("n"), head.params)
    return 0


def check_inputs(cfg, reader) -> None:
    """What classifiers.train would refuse, checked cheaply before it runs and raised as ConfigError
    naming the spec's field: the layer (the store's StoreKeyError; features are read lazily), the
    split file's format and columns (its schema only: classifiers.train reads the file itself, once,
    and its HeadError about values or ids left out names the file, which jobs._entry turns into
    field 'config.split'), the store manifest's own split column and the scoring name (scikit-learn's
    bare ValueError, which jobs._entry would otherwise report as a bug)."""
    from classifiers.split import manifest_split

    try:
        reader.features(cfg.layer)
    except KeyError as exc:  # StoreKeyError: "STORE: no layer 'x'; layers: ..."
        raise ConfigError(f"field 'config.layer': {exc}") from None
    column = cfg.split_column or "split"
    if cfg.split is not None:
        _check_split_file(str(cfg.split), column, cfg.storage_options or None)
    else:
        try:
            manifest_split(reader, column)
        except ValueError as exc:  # HeadError: values other than train/test, ids without a split
            field = "split_column" if cfg.split_column else "store"
            raise ConfigError(f"field 'config.{field}': {exc}") from None
    if cfg.scoring is not None:
        from sklearn.metrics import get_scorer

        try:
            get_scorer(cfg.scoring)
        except ValueError as exc:
            raise ConfigError(f"field 'config.scoring': {exc}") from None


def _check_split_file(path: str, column: str, storage_options: dict | None = None) -> None:
    """A split file (a path or a URL, read with the spec's storage_options as the store is) that
    exists, reads as CSV/Parquet and has the id and split columns, from its schema alone (a Parquet
    footer, a CSV's first block): the rows are read once, by the training."""
    from classifiers.heads import HeadError
    from classifiers.split import split_file_columns

    wanted = f"a CSV/Parquet file with columns id (or path) and {column}"
    try:
        cols = split_file_columns(path, column, storage_options)
    except HeadError as exc:  # "split PATH: ...": not CSV/Parquet, a folder, an object store that refused
        raise ConfigError(f"field 'config.split': {str(exc).removeprefix('split ')}") from None
    except FileNotFoundError:
        raise ConfigError(f"field 'config.split': {path}: no such file; {wanted}") from None
    except OSError as exc:  # no permission
        raise ConfigError(f"field 'config.split': {path}: {exc.strerror or exc}; {wanted}") from None
    if not ({"id", "path"} & set(cols)) or column not in cols:
        raise ConfigError(f"field 'config.split': {path}: needs columns 'id' (or 'path') and {column!r}; "
                          f"it has {', '.join(cols)}")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main("train", run))
