"""train(): split a store, sweep hyperparameters on the training part, fit, report, save.

Two paths: in memory (GridSearchCV over a scikit-learn pipeline, joblib-parallel, Ray's
joblib backend when attached to a cluster) and streaming (SGDClassifier.partial_fit over
the store's shards, for stores larger than the memory budget, or `head="sgd"`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import numpy as np

from .core import Head, as_rows
from .heads import (calibrated, check_kind, check_loss, make_pipeline, needs_calibration, parse_grid, HeadError)
from .report import compute_report, write_report
from .apply import proba_rows
from .split import check_test_size, hash_split, manifest_split, read_split_file
from .terms import param

log = logging.getLogger(__name__)


def default_memory_budget() -> int:
    """A quarter of physical memory: room for the copies scikit-learn makes while fitting."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 4 << 30


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux): free memory plus what the page cache would give back."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def sweep_jobs(n_jobs: int | None, nbytes: int, fits: int, cores: int | None = None,
               available: int | None = None) -> int | None:
    """Parallel sweep fits when the caller did not choose: one per core, no more than there
    are fits, and no more than half the available memory holds at about four copies of the
    training features each (a fold's rows, the scaled copy, a float64 copy in the solver)."""
    if n_jobs is not None:
        return n_jobs
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, min(int(cores), int(fits)))
    if available is None:
        available = _available_memory()
    if available is not None:
        jobs = min(jobs, max(1, int(available // 2 // max(4 * int(nbytes), 1))))
    return jobs


def _open(store, storage_options=None):
    if isinstance(store, (str, os.PathLike)):
        from featurestore.store import open_store

        return open_store(str(store), storage_options=storage_options)
    return store


def store_identity(reader) -> str | None:
    """What tells a store apart wherever it is copied or moved, and however it is named (a relative
    path, file://): when store.json was created and the first shard's ids. None for a store that
    records neither (evaluate then cannot tell that it is the head's training store)."""
    meta = getattr(reader, "meta", None) or {}
    shards = meta.get("shards") or [{}]
    created, first = meta.get("created"), (shards[0] or {}).get("ids_sha256")
    return f"{created}/{first}" if created and first else None


def _test_mask(reader, ids, labels, split, split_column, test_size, seed,
               storage_options=None) -> tuple[np.ndarray, str]:
    if split is not None:
        if isinstance(split, dict):
            from .split import split_from_mapping

            return split_from_mapping({str(k): str(v).lower() for k, v in split.items()}, ids, "split"), "given mapping"
        return (read_split_file(str(split), ids, split_column=split_column or "split", storage_options=storage_options),
                f"file {split}")
    from_manifest = manifest_split(reader, split_column or "split")
    if from_manifest is not None:
        return from_manifest, f"manifest column {split_column or 'split'!r}"
    if split_column is not None:  # named on purpose: never fall back to hashing without a word
        raise HeadError(f"{param('split_column')} {split_column}: {reader.uri}'s manifest has no such column; give "
                        f"the split as a file instead: {param('split', 'FILE')} with columns id and {split_column}")
    return hash_split(ids, labels, test_size=test_size, seed=seed), f"stratified hash of ids (seed {seed}, test {test_size})"


@contextlib.contextmanager
def _joblib_backend(address: str | None):
    """Ray's joblib backend when attached to a cluster; joblib's default (processes) otherwise."""
    if not address:
        yield
        return
    import joblib
    from ray.util.joblib import register_ray

    from featurestore.engine import connect

    connect(address)  # an unreachable address is refused at once, not retried for minutes
    register_ray()
    with joblib.parallel_backend("ray"):
        yield


def check_arguments(head: str = "logreg", cv: int = 5, batch_size: int = 4096, epochs: int = 8,
                    n_jobs: int | None = None, class_weight: str | dict | None = None,
                    scoring: str | None = None, test_size: float = 0.25, loss: str = "log_loss") -> None:
    """Refuse train's arguments that need no store, with HeadError naming the argument first.

    train calls it before any work; a job spec calls it at submit time, so a bad number is said
    there in the same words it would be said on the cluster. The message opens with the Python
    parameter's name (cv, test_size), marked (terms.param): the CLI says its flag, a job spec its field.
    test_size is checked even with a split file, which leaves it unused: a value outside (0, 1) is
    still a mistake, and job specs refuse it too. loss likewise for a head that does not stream: any
    head streams with SGD when its features exceed the memory budget."""
    check_kind(head)
    check_loss(loss)
    check_test_size(test_size)
    for name, value, low, why in (("cv", cv, 2, f"folds of the sweep; a single {param('grid')} value needs no sweep"),
                                  ("batch_size", batch_size, 1, "rows per streaming batch"),
                                  ("epochs", epochs, 1, "passes over the store when streaming")):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise HeadError(f"{param(name)} must be a whole number >= {low} ({why}), got {value!r}")
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0):
        raise HeadError(f"{param('n_jobs')} must be a whole number of parallel fits (-1: one per core), got {n_jobs!r}")
    if class_weight not in (None, "balanced") and not isinstance(class_weight, dict):
        raise HeadError(f"{param('class_weight')} must be None, 'balanced' or a dict, got {class_weight!r}")
    if scoring is not None:  # before any work; scikit-learn's own refusal is a bare ValueError mid-sweep
        from sklearn.metrics import get_scorer

        try:
            get_scorer(scoring)
        except (ValueError, TypeError):
            raise HeadError(f"{param('scoring')} {scoring!r} is not a scikit-learn scorer name; e.g. accuracy, "
                            "balanced_accuracy, f1_macro (all: sklearn.metrics.get_scorer_names())") from None


def check_scoring(scoring: str, classes, label_names: list[str]) -> None:
    """Refuse a scorer that cannot score these classes (f1, precision, roc_auc on three classes; f1 when
    no class has label id 1) before the sweep, where scikit-learn's refusal is a traceback from a
    worker. It is tried on a few rows of a dummy classifier with the training part's label ids."""
    import warnings

    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import get_scorer

    y = np.repeat(np.asarray(classes), 2)
    X = np.zeros((len(y), 1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ill-defined scores of the dummy: not the question here
            get_scorer(scoring)(DummyClassifier(strategy="stratified", random_state=0).fit(X, y), X, y)
    except (ValueError, TypeError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        kinds = "binary" if len(classes) == 2 else "multiclass"
        raise HeadError(f"{param('scoring')} {scoring!r} cannot score these {len(classes)} classes "
                        f"({', '.join(label_names[c] for c in classes)}): {why}; choose a {kinds} scorer, e.g. "
                        "balanced_accuracy, f1_macro, accuracy") from None


def train(store, head: str = "logreg", layer: str | None = None, grid=None, cv: int = 5,
          class_weight: str | dict | None = None, test_size: float = 0.25, seed: int = 0,
          out: str | None = None, *, l2: bool = False, loss: str = "log_loss", split=None,
          split_column: str | None = None, scoring: str | None = None, memory_budget: int | None = None,
          n_jobs: int | None = None, address: str | None = None, batch_size: int = 4096, epochs: int = 8,
          storage_options: dict | None = None, overwrite: bool = True) -> Head:
    """Train a head on a store (path/URL or StoreReader) and return it (saved to `out` when given).

    The test part (hash split of ids, a manifest `split` column, or `split=` file/mapping) is
    used only for the final report. The sweep is `cv`-fold on the training part, scored by
    balanced accuracy when class_weight is set (imbalanced data), accuracy otherwise.
    `out` must be new, empty, or a head folder, which is replaced (everything the old head left
    there goes, its exports too); overwrite=False refuses a head folder instead. storage_options
    open a store and a split file given as URLs (s3://...).
    """
    t0 = time.perf_counter()
    check_arguments(head=head, cv=cv, batch_size=batch_size, epochs=epochs, n_jobs=n_jobs,
                    class_weight=class_weight, scoring=scoring, test_size=test_size, loss=loss)
    if out is not None:
        from .persist import check_out

        check_out(str(out), overwrite)
    reader = _open(store, storage_options)
    feats = reader.features(layer)
    layer = feats.layer
    label_names = list(reader.label_names)
    if isinstance(class_weight, dict):  # by class name or label id; scikit-learn wants ids
        unknown = [k for k in class_weight if isinstance(k, str) and k not in label_names]
        if unknown:
            raise HeadError(f"{param('class_weight')} names {unknown}, not classes of {reader.uri} ({', '.join(label_names)})")
        class_weight = {label_names.index(k) if isinstance(k, str) else int(k): float(v) for k, v in class_weight.items()}
    ids, labels = np.asarray(reader.ids), np.asarray(reader.labels)
    labeled = labels >= 0
    if labeled.sum() == 0:
        raise HeadError(f"{reader.uri}: no labeled rows; a head needs labels (folder per class or a label column)")
    is_test, split_how = _test_mask(reader, ids, labels, split, split_column, test_size, seed,
                                     storage_options)
    train_rows = np.flatnonzero(labeled & ~is_test)
    test_rows = np.flatnonzero(labeled & is_test)
    present = np.unique(labels[train_rows])
    if len(present) < 2:
        raise HeadError(f"{reader.uri}: the training part has {len(present)} class(es); a head needs at least 2")
    if scoring is not None:
        check_scoring(scoring, present, label_names)
    scoring = scoring or ("balanced_accuracy" if class_weight is not None else "accuracy")
    dim = int(np.prod(feats.shape[1:]))
    need = len(train_rows) * dim * 8 * 2  # float64 copy and one more inside the estimator
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    streaming = head == "sgd" or need > budget
    if streaming and head != "sgd":
        from featurestore.store import human_bytes

        log.warning("%s: training features need ~%s > memory budget %s: streaming with SGD (%s loss)",
                    reader.uri, human_bytes(need), human_bytes(budget), loss)
        alpha_only = isinstance(grid, dict) and set(grid) == {"alpha"}  # SGD's own grid, meant for this case
        asked = parse_grid(grid, "sgd" if alpha_only else head) if grid else {}  # values as numbers, checked
        grid = asked if alpha_only else None
        if "C" in asked:  # the same regularisation strength: alpha = 1 / (C * n)
            grid = {"alpha": [1.0 / (float(c) * len(train_rows)) for c in asked["C"]]}
            log.warning("the grid C=%s becomes SGD's alpha=%s (alpha = 1 / (C x %d training rows))",
                        ",".join(f"{c:g}" for c in asked["C"]), ",".join(f"{a:.3g}" for a in grid["alpha"]),
                        len(train_rows))
        if set(asked) - {"C", "alpha"}:
            log.warning("the grid's %s ignored: SGD has no such hyperparameter",
                        ", ".join(sorted(set(asked) - {"C", "alpha"})))
        head = "sgd"
    if streaming and scoring is not None:
        from .stream import check_scoring as check_streaming_scoring

        check_streaming_scoring(scoring, loss, present)
    grid = parse_grid(grid, head)
    common = dict(reader=reader, layer=layer, label_names=label_names, is_test=is_test, labeled=labeled,
                  ids=ids, labels=labels, seed=seed, scoring=scoring)
    if streaming:
        from .stream import fit_streaming

        fitted = fit_streaming(grid=grid, loss=loss, class_weight=class_weight, l2=l2, batch_size=batch_size,
                               epochs=epochs, train_rows=train_rows, **common)
        pipeline, params, sweep, cv_used = fitted
        kind_loss = loss
    else:
        pipeline, params, sweep, cv_used = _fit_in_memory(feats, labels, train_rows, head, grid, cv, class_weight,
                                                          l2, seed, scoring, n_jobs, address, loss, label_names)
        kind_loss = loss if head == "sgd" else None
    result = Head(pipeline=pipeline, kind=head, layer=layer, label_names=label_names, store_config=reader.config,
                  feature_shape=tuple(int(v) for v in feats.shape[1:]), params=params, loss=kind_loss, l2=l2,
                  streaming=streaming, sweep=sweep, trained_on=reader.uri)
    y_test = labels[test_rows]
    p_test, pred_test = proba_rows(result, feats, test_rows, batch_size) if len(test_rows) else (None, None)
    report_extra = dict(head=head, layer=layer, store=reader.uri, path="streaming (SGD partial_fit)" if streaming else "in memory",
                        split=split_how, n_train=int(len(train_rows)), params=params, sweep=sweep,
                        sweep_scoring=scoring, cv=cv_used, class_weight=class_weight, l2=l2,
                        store_identity=store_identity(reader), seconds=round(time.perf_counter() - t0, 3))
    if p_test is None:
        result.report = {"n": 0, "label_names": label_names, **report_extra}
    else:
        result.report = compute_report(y_test, p_test, label_names, pred=pred_test, **report_extra)
    if out is not None:
        from .persist import clear_head_files

        if os.path.isdir(out):
            clear_head_files(out)
        result.save(out)
        write_report(result.report, out, title=f"{head} head on {os.path.basename(str(reader.uri).rstrip('/'))} (test part)")
    return result


def _fit_in_memory(feats, labels, train_rows, head, grid, cv, class_weight, l2, seed, scoring, n_jobs, address, loss,
                   label_names):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    X = as_rows(feats[train_rows])
    y = labels[train_rows]
    counts = np.bincount(y)
    present = np.unique(y)
    min_count = int(counts[present].min())
    base = make_pipeline(head, l2=l2, class_weight=class_weight, seed=seed, loss=loss)
    points = int(np.prod([len(v) for v in grid.values()]))
    folds = min(int(cv), min_count)
    if min_count < 2 and (points > 1 or needs_calibration(head)):
        thin = ", ".join(f"{label_names[c]!r}" for c in present if counts[c] < 2)
        why = ("the sweep's cross-validation" if points > 1 else "the SVM's probability calibration")
        fix = f"give one value per hyperparameter in {param('grid')} (e.g. C=1)" \
            if points > 1 and not needs_calibration(head) else f"use {param('head', 'logreg')} with one {param('grid')} value"
        raise HeadError(f"class(es) {thin} have a single row in the training part, and {why} needs at least 2 per "
                        f"class: add images, put more of them in the training part ({param('split')}, {param('test_size')}), or {fix}")
    sweep: list[dict] = []
    if points > 1 and folds >= 2:
        if folds < cv:
            log.warning("only %d rows in the smallest class: %d-fold CV instead of %d", min_count, folds, cv)
        if not address:  # on a cluster, Ray's joblib backend spreads the fits; n_jobs=None lets it
            n_jobs = sweep_jobs(n_jobs, X.nbytes, points * folds)
        log.info("sweep: %d settings x %d folds, %s parallel fit(s)", points, folds, n_jobs or "backend's")
        search = GridSearchCV(base, {f"clf__{k}": v for k, v in grid.items()}, scoring=scoring,
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              n_jobs=n_jobs, refit=not needs_calibration(head), error_score="raise")
        with _joblib_backend(address):
            search.fit(X, y)
        res = search.cv_results_
        sweep = [{"params": {k.removeprefix("clf__"): _plain(v) for k, v in p.items()},
                  "mean": float(m), "std": float(s)}
                 for p, m, s in zip(res["params"], res["mean_test_score"], res["std_test_score"])]
        params = {k.removeprefix("clf__"): _plain(v) for k, v in search.best_params_.items()}
        model = None if needs_calibration(head) else search.best_estimator_
    else:
        params = {k: _plain(v[0]) for k, v in grid.items()}
        folds = 0
        model = None
    if model is None:
        fit_kw: dict[str, Any] = {}
        # Platt's sigmoid fitted on unweighted rows moves the threshold back to the majority
        # class and undoes the weighting. Give the SVM and its calibrator the same per-row
        # weights instead (for the SVM, the same as class_weight).
        weigh_rows = needs_calibration(head) and class_weight is not None
        if weigh_rows:
            from sklearn.utils.class_weight import compute_sample_weight

            fit_kw["clf__sample_weight"] = compute_sample_weight(class_weight, y)
        model = make_pipeline(head, l2=l2, class_weight=None if weigh_rows else class_weight, seed=seed, loss=loss,
                              **params)
        if needs_calibration(head):
            model = calibrated(model, cv=max(2, min(3, min_count)))
        model.fit(X, y, **fit_kw)
    return model, params, sweep, folds


def _plain(v: Any):
    return v.item() if hasattr(v, "item") else v
