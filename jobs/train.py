"""`python -m jobs.train --config SPEC.yaml`: train a head on a store; save it to a directory or URL."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile

from jobs._entry import check_outputs, is_remote, main, upload_dir

log = logging.getLogger("jobs.train")


def run(spec, cfg) -> int:
    import classifiers

    check_outputs(spec, cfg)
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    kwargs["storage_options"] = kwargs["storage_options"] or None
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


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main("train", run))
