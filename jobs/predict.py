"""`python -m jobs.predict --config SPEC.yaml`: a saved head's predictions for every row of a store (Parquet)."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

from jobs._entry import check_outputs, fetch_dir, is_remote, main, upload_file

log = logging.getLogger("jobs.predict")


def run(spec, cfg) -> int:
    import classifiers

    check_outputs(spec, cfg)
    opts = cfg.storage_options or None
    head_dir = fetch_dir(cfg.head, opts) if is_remote(cfg.head) else cfg.head
    tmp = tempfile.mkdtemp(prefix="featurestore-predict-") if is_remote(cfg.out) else None
    out_local = os.path.join(tmp, "predictions.parquet") if tmp else cfg.out
    try:
        table = classifiers.predict(head_dir, cfg.store, out=out_local, batch_size=cfg.batch_size,
                                    storage_options=opts)
        if tmp:
            upload_file(out_local, cfg.out, opts)
    finally:
        if head_dir != cfg.head:
            shutil.rmtree(head_dir, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%d predictions written to %s", table.num_rows, cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main("predict", run))
