"""Heads: planted signal, noise, class weights, streaming vs in-memory, splits, reports."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from featurestore.store import write_store

import classifiers
from classifiers.fit import sweep_jobs
from classifiers.heads import HeadError, parse_grid
from classifiers.split import hash_split

CFG = {"model": "resnet18", "weights": "none", "weights_sha256": "a" * 64, "layers": ["avgpool"],
       "pooling": "avg", "precision": "fp32", "preprocessing": {"input_size": [32, 32], "crop": "center"}}


def make_store(path, X, y, names, shard_size=256, config=CFG, layer="avgpool"):
    return write_store(str(path), {layer: X.astype(np.float32)}, y, names, config=config, shard_size=shard_size)


def planted(n=240, d=20, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.normal(size=(n, d))
    X[np.arange(n), y] += 8.0  # class c lights up dimension c: linearly separable with a wide margin
    return X, y


@pytest.mark.parametrize("kind", ["logreg", "linear-svm", "svm", "sgd"])
def test_planted_signal_reaches_accuracy_one(tmp_path, kind):
    X, y = planted()
    store = make_store(tmp_path / "s", X, y, ["cat", "dog", "panda"])
    head = classifiers.train(store, head=kind, cv=3, seed=0)
    assert head.report["n"] == 60
    assert head.report["accuracy"] == 1.0
    assert head.report["balanced_accuracy"] == 1.0
    assert head.report["path"] == ("streaming (SGD partial_fit)" if kind == "sgd" else "in memory")


def test_sgd_sweep_ties_go_to_the_strongest_alpha_and_probabilities_keep_an_order(tmp_path):
    """On separable data every alpha is perfect on the hold-out; the weakest one (the old pick)
    drives log-loss weights so far that the other classes' probabilities are exactly 0."""
    X, y = planted()
    store = make_store(tmp_path / "s", X, y, ["cat", "dog", "panda"])
    head = classifiers.train(store, head="sgd", seed=0)
    assert [r["mean"] for r in head.report["sweep"]] == [1.0] * 4
    assert head.params["alpha"] == 0.1
    P = head.predict_proba(X)
    second = np.sort(P, axis=1)[:, -2]
    weak = classifiers.train(store, head="sgd", seed=0, grid={"alpha": [1e-5]})
    weak_second = np.sort(weak.predict_proba(X), axis=1)[:, -2]
    assert head.report["accuracy"] == 1.0 and np.median(second) > 1e-4
    assert np.median(weak_second) < 1e-12  # what the tie-break avoids: "certain" beyond any meaning


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_noise_stays_near_chance(tmp_path, kind):
    rng = np.random.default_rng(1)
    n, k = 600, 3
    X, y = rng.normal(size=(n, 16)), np.arange(n) % k
    head = classifiers.train(make_store(tmp_path / "s", X, y, ["a", "b", "c"]), head=kind, cv=3,
                             grid={"C": [1.0]})
    assert abs(head.report["accuracy"] - 1 / k) < 0.12, head.report["accuracy"]


@pytest.mark.parametrize("kind", ["logreg", "linear-svm", "svm"])
def test_class_weight_balanced_raises_balanced_accuracy(tmp_path, kind):
    """For SVMs too: their Platt calibrator must not pull the threshold back to the majority."""
    rng = np.random.default_rng(2)
    n_major, n_minor = 1900, 100
    y = np.r_[np.zeros(n_major, int), np.ones(n_minor, int)]
    X = rng.normal(size=(len(y), 10))
    X[y == 1, 0] += 1.5  # overlapping classes: an unweighted fit favours the majority
    store = make_store(tmp_path / "s", X, y, ["neg", "pos"], shard_size=512)
    plain = classifiers.train(store, head=kind, grid={"C": [1.0]})
    weighted = classifiers.train(store, head=kind, grid={"C": [1.0]}, class_weight="balanced")
    assert weighted.report["class_weight"] == "balanced"
    assert weighted.report["balanced_accuracy"] > plain.report["balanced_accuracy"] + 0.1, (
        plain.report["balanced_accuracy"], weighted.report["balanced_accuracy"])
    assert weighted.report["per_class"]["pos"]["recall"] > plain.report["per_class"]["pos"]["recall"]


def test_sweep_runs_in_parallel_within_cores_fits_and_memory():
    gib = 1 << 30
    assert sweep_jobs(None, nbytes=gib // 100, fits=20, cores=8, available=16 * gib) == 8
    assert sweep_jobs(None, nbytes=gib // 100, fits=3, cores=8, available=16 * gib) == 3  # no idle workers
    assert sweep_jobs(None, nbytes=gib, fits=20, cores=8, available=16 * gib) == 2  # 8 GiB at ~4 GiB a fit
    assert sweep_jobs(None, nbytes=8 * gib, fits=20, cores=8, available=16 * gib) == 1  # never zero
    assert sweep_jobs(3, nbytes=8 * gib, fits=20, cores=8, available=16 * gib) == 3  # the caller's choice stands
    assert sweep_jobs(None, nbytes=1, fits=20) >= 1  # this machine's cores and memory


def test_streaming_within_one_point_of_in_memory_with_bounded_memory(tmp_path):
    rng = np.random.default_rng(3)
    n, d, k = 12000, 48, 4
    y = np.sort(np.arange(n) % k)  # class-sorted rows, as a folder listing writes them
    centers = rng.normal(size=(k, d)) * 0.35
    X = centers[y] + rng.normal(size=(n, d))
    store = make_store(tmp_path / "s", X, y, ["a", "b", "c", "d"], shard_size=2048)
    in_memory = classifiers.train(store, head="logreg", grid={"C": [1.0]})
    tracemalloc.start()
    try:
        streamed = classifiers.train(store, head="logreg", memory_budget=1 << 20, batch_size=250, epochs=6,
                                     grid={"alpha": [1e-4]})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert streamed.kind == "sgd" and streamed.streaming  # chosen automatically: over the 1 MiB budget
    full = n * d * 8
    assert peak < 0.5 * full, (peak, full)
    a_mem, a_str = in_memory.report["accuracy"], streamed.report["accuracy"]
    assert 0.6 < a_mem < 0.99  # a meaningful, not saturated, problem
    assert abs(a_str - a_mem) <= 0.01, (a_mem, a_str)


def test_split_is_deterministic_stratified_and_order_free():
    ids = [f"img/{i}.jpg" for i in range(1000)]
    labels = np.r_[np.zeros(800, int), np.ones(200, int)]
    a = hash_split(ids, labels, 0.25, seed=0)
    assert np.array_equal(a, hash_split(ids, labels, 0.25, seed=0))
    assert a[labels == 0].sum() == 200 and a[labels == 1].sum() == 50
    perm = np.random.default_rng(0).permutation(1000)
    b = hash_split([ids[i] for i in perm], labels[perm], 0.25, seed=0)
    assert {ids[i] for i in perm[b]} == {ids[i] for i in np.flatnonzero(a)}
    assert not np.array_equal(a, hash_split(ids, labels, 0.25, seed=1))


def test_split_file_is_used_and_test_part_not_tuned(tmp_path):
    X, y = planted(n=120)
    store = make_store(tmp_path / "s", X, y, ["a", "b", "c"])
    ids = list(store.ids)
    test_ids = set(ids[:30])
    split = tmp_path / "split.csv"
    split.write_text("id,split\n" + "".join(f"{i},{'test' if i in test_ids else 'train'}\n" for i in ids))
    head = classifiers.train(store, head="logreg", split=str(split), cv=3)
    assert head.report["n"] == 30 and head.report["n_train"] == 90
    assert "file" in head.report["split"]
    split.write_text("id,split\n" + f"{ids[0]},test\n")
    with pytest.raises(ValueError, match="have no split"):
        classifiers.train(store, head="logreg", split=str(split))


def test_reports_written(tmp_path):
    X, y = planted(n=300, k=3)
    out = tmp_path / "head"
    classifiers.train(make_store(tmp_path / "s", X, y, ["cat", "dog", "panda"]), head="logreg",
                      grid={"C": [0.1, 1.0]}, cv=3, out=str(out))
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["per_class"]) == {"cat", "dog", "panda"}
    assert len(rep["sweep"]) == 2 and rep["params"]["C"] in (0.1, 1.0)
    assert np.array(rep["confusion_matrix"]).sum() == rep["n"] == 75
    md = (out / "report.md").read_text()
    assert "balanced accuracy" in md and "| panda |" in md
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_grid_parsing_names_bad_input():
    assert parse_grid(["C=0.01,0.1"], "logreg") == {"C": [0.01, 0.1]}
    assert parse_grid(["C=1", "gamma=scale,0.01"], "svm") == {"C": [1.0], "gamma": ["scale", 0.01]}
    with pytest.raises(HeadError, match="no hyperparameter 'gamma'"):
        parse_grid(["gamma=1"], "logreg")
    with pytest.raises(HeadError, match="not a number"):
        parse_grid(["C=big"], "logreg")
    for bad, kind in ((["alpha=0"], "sgd"), (["alpha=-1"], "sgd"), (["C=0"], "logreg"), (["gamma=-0.1"], "svm")):
        with pytest.raises(HeadError, match=r"must be a number > 0, e\.g\. "):
            parse_grid(bad, kind)
    with pytest.raises(HeadError, match=r"^grid alpha: 'abc' is not a number$"):  # no gamma hint for alpha
        parse_grid(["alpha=abc"], "sgd")


@pytest.mark.parametrize("kwargs,said", [
    (dict(cv=1), "cv must be a whole number >= 2"),
    (dict(epochs=0), "epochs must be a whole number >= 1"),
    (dict(batch_size=0), "batch_size must be a whole number >= 1"),
    (dict(n_jobs=0), "n_jobs must be a whole number of parallel fits"),
])
def test_training_numbers_out_of_range_are_refused(tmp_path, kwargs, said):
    X, y = planted(n=60)
    store = make_store(tmp_path / "s", X, y, ["a", "b", "c"])
    with pytest.raises(HeadError, match=said):
        classifiers.train(store, **kwargs)


def test_sgd_class_follows_the_decision_scores_when_probabilities_tie(tmp_path):
    """Two large one-vs-rest scores both give a logistic score of 1.0: the probabilities tie, and
    the class must still be the highest score (scikit-learn's predict), in predict and evaluate."""
    X, y = planted()
    store = make_store(tmp_path / "s", X, y, ["cat", "dog", "panda"])
    head = classifiers.train(store, head="sgd", cv=3, seed=0)
    sgd = head.pipeline[-1]
    sgd.coef_ = sgd.coef_ * 1e3  # scores in the thousands, as with unscaled features and a small alpha,
    sgd.intercept_ = sgd.intercept_ + np.array([3e4, 3e4, 0.0])  # and two classes positive on every row
    feats = store.features()[:]
    proba = head.predict_proba(feats)
    tied = np.sum(np.isclose(np.sort(proba, axis=1)[:, -1], np.sort(proba, axis=1)[:, -2]))
    assert tied > 0  # the case this test is about
    expected = head.pipeline.predict(feats.reshape(len(feats), -1))
    assert np.array_equal(head.predict(feats), expected)
    assert classifiers.evaluate(head, store)["accuracy"] == pytest.approx(np.mean(expected == y))
    table = classifiers.predict(head, store)
    assert np.array_equal(np.asarray(table["predicted"]), expected)


def test_train_out_must_be_a_head_folder_and_replacing_one_drops_its_old_files(tmp_path):
    from classifiers.persist import HeadFileError

    X, y = planted()
    store = make_store(tmp_path / "s", X, y, ["cat", "dog", "panda"])
    with pytest.raises(HeadFileError, match="a feature store; choose another folder for the head"):
        classifiers.train(store, cv=2, out=str(tmp_path / "s"))
    assert not (tmp_path / "s" / "head.json").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(HeadFileError, match="exists and holds other files"):
        classifiers.train(store, cv=2, out=str(tmp_path / "other"))
    out = tmp_path / "h"
    classifiers.train(store, cv=2, out=str(out))
    (out / "model.onnx").write_bytes(b"an export of the old head")
    classifiers.train(store, head="sgd", cv=2, out=str(out))
    assert not (out / "model.onnx").exists() and json.loads((out / "head.json").read_text())["kind"] == "sgd"
    with pytest.raises(HeadFileError, match="holds a head already"):
        classifiers.train(store, cv=2, out=str(out), overwrite=False)


def test_training_says_why_it_cannot_sweep_or_split_as_asked(tmp_path, caplog):
    X, y = planted(n=61)
    y[-1], X[-1] = 3, X[-1] + 20.0  # one image of a fourth class
    store = make_store(tmp_path / "s", X, y, ["cat", "dog", "panda", "yak"])
    split = {i: ("test" if n % 4 == 0 and n < 60 else "train") for n, i in enumerate(store.ids)}
    with pytest.raises(HeadError, match=r"class\(es\) 'yak' have a single row in the training part"):
        classifiers.train(store, cv=3, split=split)
    with pytest.raises(HeadError, match="the SVM's probability calibration needs at least 2"):
        classifiers.train(store, head="svm", grid={"C": [1.0]}, split=split)
    with pytest.raises(HeadError, match="^split_column fold: .*manifest has no such column; give the split as a file instead: split=FILE "):
        classifiers.train(store, cv=3, split_column="fold")
    # the CLI's grid (strings) still becomes SGD's alpha grid when the budget forces streaming
    with caplog.at_level("WARNING", logger="classifiers"):
        head = classifiers.train(make_store(tmp_path / "p", *planted(), ["a", "b", "c"]), grid=["C=0.1,1"],
                                 memory_budget=1024, cv=3)
    assert head.kind == "sgd" and "the grid C=0.1,1 becomes SGD's alpha=" in caplog.text
    assert len(head.sweep) == 2 and "KiB" in caplog.text


def test_float16_features_are_widened_before_scaling():
    from classifiers.core import as_rows

    X = np.full((3, 2, 2), 300.0, dtype=np.float16)
    out = as_rows(X)
    assert out.shape == (3, 4) and out.dtype == np.float32
    assert as_rows(X.astype(np.float64)).dtype == np.float64


@pytest.mark.parametrize("kind", ["logreg", "svm", "sgd"])
def test_class_weight_by_name(tmp_path, kind):
    X, y = planted(n=90)
    store = make_store(tmp_path / "s", X, y, ["cat", "dog", "panda"])
    head = classifiers.train(store, head=kind, grid={"C": [1.0]} if kind != "sgd" else None, cv=3,
                             class_weight={"cat": 2.0, "dog": 1.0, "panda": 1.0})
    assert head.report["accuracy"] > 0.9
    with pytest.raises(HeadError, match=r"class_weight names \['yak'\]"):
        classifiers.train(store, head=kind, class_weight={"yak": 2.0})


def test_split_does_not_depend_on_where_the_images_live():
    """The same images under another root (a checkout elsewhere, a mount, s3://) split alike."""
    names = [f"{c}/{c}_{i:03d}.jpg" for c in ("cats", "dogs", "panda") for i in range(50)]
    labels = np.repeat([0, 1, 2], 50)
    roots = ("/home/ann/data/animals/", "/tmp/x/shared/data/animals/", "s3://bucket/animals/", "")
    masks = [hash_split([root + n for n in names], labels, 0.25, seed=3) for root in roots]
    for m in masks[1:]:
        assert np.array_equal(m, masks[0])
    assert masks[0].sum() == 3 * 12  # round(0.25 * 50) a class


def test_split_file_ids_below_the_image_folder_fit_a_store_of_full_paths(tmp_path):
    """A split file naming images below their folder (neg/0.jpg), or by another machine's paths, fits
    a store whose ids are full paths, as the hash split is keyed below the shared folder; an entry
    that two images could be, or an id listed on both sides, is refused rather than guessed."""
    from classifiers.split import read_split_file

    ids = [f"/data/smiles/{c}/{i}.jpg" for c in ("neg", "pos") for i in range(6)]
    sides = {i: "test" if n % 3 == 0 else "train" for n, i in enumerate(ids)}
    want = np.array([sides[i] == "test" for i in ids])
    for name, key in (("rel", lambda i: i.removeprefix("/data/smiles/")),
                      ("dot", lambda i: "./" + i.removeprefix("/data/smiles/")),
                      ("other-machine", lambda i: "s3://bucket/copies" + i.removeprefix("/data")),
                      ("exact", lambda i: i)):
        f = tmp_path / f"{name}.csv"
        f.write_text("id,split\n" + "".join(f"{key(i)},{s}\n" for i, s in reversed(sides.items())))
        assert np.array_equal(read_split_file(str(f), ids), want), name
    f = tmp_path / "names.csv"  # file names alone: neg/0.jpg and pos/0.jpg would both be '0.jpg'
    f.write_text("id,split\n" + "".join(f"{i}.jpg,train\n" for i in range(6)))
    with pytest.raises(HeadError, match=r"store ids /data/smiles/neg/0.jpg and /data/smiles/pos/0.jpg both fit "
                                        r"only its entry '0.jpg'"):
        read_split_file(str(f), ids)
    f = tmp_path / "two.csv"  # one store id, two entries it could be
    f.write_text("id,split\na/neg/0.jpg,train\nb/neg/0.jpg,test\n")
    with pytest.raises(HeadError, match="store id /data/smiles/neg/0.jpg fits more than one entry"):
        read_split_file(str(f), ids[:1])
    f = tmp_path / "both.csv"
    f.write_text("id,split\nneg/0.jpg,train\nneg/0.jpg,test\n")
    with pytest.raises(HeadError, match=f"split {f}: id neg/0.jpg is listed as both train and test"):
        read_split_file(str(f), ids[:1])
    f.write_text("id,split\nneg/0.jpg,train\n")
    with pytest.raises(HeadError, match=r"1 store id\(s\) have no split, e.g. /data/smiles/pos/0.jpg"):
        read_split_file(str(f), [ids[0], ids[6]])


def test_evaluate_and_predict_refuse_a_batch_size_below_one(tmp_path):
    """batch_size=0 named as the parameter, not range()'s bare ValueError from the middle of scoring."""
    X, y = planted(n=60)
    store = make_store(tmp_path / "s", X, y, ["a", "b", "c"])
    head = classifiers.train(store, grid={"C": [1.0]}, cv=2)
    for fn in (classifiers.evaluate, classifiers.predict):
        with pytest.raises(HeadError, match=r"^batch_size must be a whole number >= 1 \(rows scored at a time\), got 0"):
            fn(head, store, batch_size=0)
    assert classifiers.evaluate(head, store, batch_size=7)["n"] == 60


def test_evaluating_the_training_store_says_its_figures_include_the_training_rows(tmp_path, caplog):
    """Evaluate on the store the head was trained on (by any name, or a copy) scores rows the head
    has fit: the report counts them and a warning says so; another store gets no such note."""
    import shutil

    X, y = planted(n=120)
    store = make_store(tmp_path / "s", X, y, ["a", "b", "c"])
    head = classifiers.train(store.uri, grid={"C": [1.0]}, cv=2, out=str(tmp_path / "h"))
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    for where in (str(tmp_path / "s"), f"file://{tmp_path / 's'}", str(tmp_path / "copy")):
        caplog.clear()
        rep = classifiers.evaluate(str(tmp_path / "h"), where, out=str(tmp_path / "ev"))
        assert rep["training_rows_included"] == head.report["n_train"] == 90, where
        assert "these figures include its 90 training rows" in caplog.text
        assert "training rows among them (the figures flatter it): 90" in (tmp_path / "ev" / "report.md").read_text()
    other = write_store(str(tmp_path / "o"), {"avgpool": X.astype(np.float32)}, y, ["a", "b", "c"], config=CFG,
                        ids=[f"holdout/{i}.jpg" for i in range(120)])
    caplog.clear()
    rep = classifiers.evaluate(str(tmp_path / "h"), other.uri)
    assert "training_rows_included" not in rep and "training rows" not in caplog.text
