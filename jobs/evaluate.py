"""`python -m jobs.evaluate --config SPEC.yaml`: a saved head's report on every labeled row of a store."""
from __future__ import annotations

import logging
import shutil
import sys
import tempfile

from jobs._entry import check_outputs, fetch_dir, is_remote, main, upload_dir

log = logging.getLogger("jobs.evaluate")


def run(spec, cfg) -> int:
    import classifiers

    check_outputs(spec, cfg)
    opts = cfg.storage_options or None
    head_dir = fetch_dir(cfg.head, opts) if is_remote(cfg.head) else cfg.head
    out_local = tempfile.mkdtemp(prefix="featurestore-report-") if cfg.out and is_remote(cfg.out) else cfg.out
    try:
        rep = classifiers.evaluate(head_dir, cfg.store, out=out_local, batch_size=cfg.batch_size,
                                   storage_options=opts)
        if cfg.out and out_local != cfg.out:
            upload_dir(out_local, cfg.out, opts)
    finally:
        if head_dir != cfg.head:
            shutil.rmtree(head_dir, ignore_errors=True)
        if out_local and out_local != cfg.out:
            shutil.rmtree(out_local, ignore_errors=True)
    log.info("accuracy %.4f, balanced accuracy %.4f on %d rows of %s%s", rep.get("accuracy", float("nan")),
             rep.get("balanced_accuracy", float("nan")), rep.get("n", 0), cfg.store,
             f"; report in {cfg.out}" if cfg.out else "")
    return 0


if __name__ == "__main__":
    sys.exit(main("evaluate", run))
