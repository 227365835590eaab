"""`python -m jobs.extract --config SPEC.yaml`: build a feature store on the Ray cluster this runs on.

Submitted again after a stop or a failure, it resumes: committed shards are skipped.
"""
from __future__ import annotations

import logging
import sys

from jobs._entry import EXIT_FAILED, main

log = logging.getLogger("jobs.extract")


def run(spec, cfg) -> int:
    from featurestore.engine import ExtractError, extract

    # Inside a submitted job the engine joins the job's cluster (RAY_ADDRESS) and refuses a
    # local output that other nodes cannot see (jobs.specs.check_output_reachable).
    cfg.quiet = False  # the summary belongs in the job log
    try:
        result = extract(cfg)
    except ExtractError as exc:
        if exc.result is None or not exc.result.failed_shards:
            raise  # it could not start as asked: jobs._entry names the spec's field
        log.error("%s", exc)
        log.error("committed shards are kept; failed: %s", sorted(exc.result.failed_shards))
        return EXIT_FAILED
    log.info("store %s: %d rows, %d shards (%d computed, %d already committed), %d errors, nodes: %s",
             result.store, result.rows, result.shards, len(result.computed_shards), len(result.skipped_shards),
             result.errors, ", ".join(n[:12] for n in result.nodes) or "-")
    return 0


if __name__ == "__main__":
    sys.exit(main("extract", run))
