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
    """What classifiers.train would refuse, checked before it runs and raised as ConfigError naming the
    spec's field: the layer (the store's StoreKeyError), the split (a file without id/split columns
    or with other values, rows it leaves out; the store manifest's own split column: HeadError) and
    the scoring name (scikit-learn's bare ValueError, which jobs._entry would otherwise report as a
    bug). jobs._entry says a ConfigError as the spec's fault in one line."""
    from classifiers.split import manifest_split, read_split_file

    try:
        reader.features(cfg.layer)
    except KeyError as exc:  # StoreKeyError: "STORE: no layer 'x'; layers: ..."
        raise ConfigError(f"field 'config.layer': {exc}") from None
    column = cfg.split_column or "split"
    try:
        if cfg.split is not None:
            read_split_file(cfg.split, reader.ids, split_column=column)  # a missing file: FileNotFoundError
        else:
            manifest_split(reader, column)
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as exc:  # HeadError (a ValueError); OSError: a folder, no permission
        field = "split" if cfg.split is not None else "split_column" if cfg.split_column else "store"
        raise ConfigError(f"field 'config.{field}': {_without_flag(str(exc))}") from None
    if cfg.scoring is not None:
        from sklearn.metrics import get_scorer

        try:
            get_scorer(cfg.scoring)
        except ValueError as exc:
            raise ConfigError(f"field 'config.scoring': {exc}") from None


def _without_flag(message: str) -> str:
    """classifiers.split's messages start with the command's flag (`--split FILE: ...`); the field says it here."""
    return message[len("--split "):] if message.startswith("--split ") else message


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main("train", run))
