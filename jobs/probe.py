"""`python -m jobs.probe --config SPEC.yaml`: probe backbones x layers on the Ray cluster this runs on.

Extractions run on the cluster's actors (the engine joins the job's cluster through
RAY_ADDRESS); heads are trained in the job's driver process. Submitted again, it reuses
every store already finished in `out` and recomputes nothing.
"""
from __future__ import annotations

import logging
import sys

from jobs._entry import EXIT_FAILED, check_outputs, main

log = logging.getLogger("jobs.probe")


def run(spec, cfg) -> int:
    from featurestore.engine import ExtractError
    from featurestore.probing import ProbeExtractionError, probe

    check_outputs(spec, cfg)  # a local `out` on a multi-node cluster without a shared filesystem is refused
    cfg.quiet = False  # progress and the engine's summaries belong in the job log
    try:
        result = probe(cfg)
    except (ProbeExtractionError, ExtractError) as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    # Bad input (unknown model or layer, empty source, sample too large ...) goes on to jobs._entry,
    # which says it in the spec's terms.
    for line in result.table().splitlines():
        log.info("%s", line)
    best = result.best()
    log.info("highest accuracy: %s (%s) at %s: %.4f; Pareto front: %s", best.model, best.weights, best.layer,
             best.accuracy, "; ".join(f"{r.model} ({r.weights}) {r.layer}" for r in result.pareto()))
    log.info("wrote %s, %s, %s, %s", result.markdown, result.csv, result.png or "-", result.json)
    return 0


if __name__ == "__main__":
    sys.exit(main("probe", run))
