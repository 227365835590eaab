"""Input errors inside a job (`python -m jobs.<name>`, as the cluster runs it) end the way the
local commands end them: one line naming the spec and its field, exit code 2, no traceback."""
from __future__ import annotations

import logging

import pytest
import yaml

from jobs._entry import EXIT_BAD_SPEC, input_error_line, main


def spec_file(tmp_path, job, config):
    path = tmp_path / f"{job}.yaml"
    path.write_text(yaml.safe_dump({"job": job, "config": config}))
    return path


def errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if " ERROR " in ln]


def test_missing_source_is_one_line_naming_the_field_and_spec(tmp_path, capsys):
    from jobs import extract

    path = spec_file(tmp_path, "extract", {"source": str(tmp_path / "nope"), "output": str(tmp_path / "store"),
                                           "model": "resnet18", "weights": "none"})
    assert main("extract", extract.run, ["--config", str(path)]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(lines) == 1, err
    assert f"refused: {path}: field 'config.source': {tmp_path / 'nope'}: no such directory" in lines[0]
    assert "Traceback" not in err and "refused after" in err and "fix the spec" in err


def test_a_layer_the_model_lacks_is_refused_before_the_extraction_starts(tmp_path, capsys, monkeypatch):
    """The job checks its spec's layers as `submit` does (a spec sent from a machine without torch),
    before Ray or any actor is asked for: one line naming config.layers and the closest names."""
    import featurestore.engine
    from jobs import extract

    def no_extraction(cfg):
        raise AssertionError("the extraction started")

    monkeypatch.setattr(featurestore.engine, "extract", no_extraction)
    path = spec_file(tmp_path, "extract", {"source": str(tmp_path), "output": str(tmp_path / "store"),
                                           "model": "resnet18", "weights": "none", "layers": ["layer9"]})
    assert main("extract", extract.run, ["--config", str(path)]) == EXIT_BAD_SPEC
    (line,) = errors(capsys)
    assert line.endswith(f"{path}: field 'config.layers': resnet18 has no layer 'layer9'; closest: layer4, layer3, "
                         "layer2, layer1, layer4.1; list them with `featurestore layers resnet18`"), line


def test_missing_store_of_a_train_job(tmp_path, capsys):
    from jobs import train

    path = spec_file(tmp_path, "train", {"store": str(tmp_path / "no-store"), "out": str(tmp_path / "head")})
    assert main("train", train.run, ["--config", str(path)]) == EXIT_BAD_SPEC
    (line,) = errors(capsys)
    assert f"{path}: field 'config.store': " in line and str(tmp_path / "no-store") in line


def test_an_unexpected_error_still_shows_its_traceback(tmp_path, capsys):
    """A bug is not the spec's fault: exit 1 with the traceback to report."""
    path = spec_file(tmp_path, "train", {"store": "/s", "out": "/h"})

    def run(spec, cfg):
        raise ZeroDivisionError("a bug")

    assert main("train", run, ["--config", str(path)]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.fixture
def small_store(tmp_path):
    import numpy as np

    from featurestore.store import write_store

    labels = np.repeat([0, 1], 12)
    feats = np.random.default_rng(0).normal(size=(24, 4)).astype("float32") + labels[:, None] * 3.0
    store = str(tmp_path / "store")
    write_store(store, {"features": feats}, labels, ["cat", "dog"], [f"img{i}" for i in range(24)],
                config={"model": "planted"}, shard_size=12)
    return store


@pytest.mark.parametrize("bad,said", [
    # the store's KeyError for a layer it lacks
    (lambda tmp, store: {"layer": "layer9"},
     lambda tmp, store: f"field 'config.layer': {store}: no layer 'layer9'; layers: features"),
    # classifiers.split's ValueErrors: a split file without the columns, or one that leaves rows out
    (lambda tmp, store: {"split": _csv(tmp / "s.csv", "name,side\nimg0,train\n")},
     lambda tmp, store: f"field 'config.split': {tmp / 's.csv'}: needs columns 'id' (or 'path') and 'split'; "
                        "it has name, side"),
    (lambda tmp, store: {"split": _csv(tmp / "s.csv", "id,split\nimg0,train\nimg1,test\n")},
     lambda tmp, store: f"field 'config.split': {tmp / 's.csv'}: 22 store id(s) have no split"),
    (lambda tmp, store: {"split": _csv(tmp / "s.csv", "id,split\n" + "".join(f"img{i},trian\n" for i in range(24)))},
     lambda tmp, store: f"field 'config.split': {tmp / 's.csv'}: split values must be train or test; found 'trian'"),
    (lambda tmp, store: {"split": str(tmp)},
     lambda tmp, store: f"field 'config.split': {tmp}: "),
    (lambda tmp, store: {"split": str(tmp / "none.csv")},
     lambda tmp, store: f"field 'config.split': {tmp / 'none.csv'}: no such file"),
    # classifiers' HeadError marks the parameter it is about: said as the field, not the store it names
    (lambda tmp, store: {"class_weight": {"cat": 2, "tiger": 1}},
     lambda tmp, store: f"config.class_weight names ['tiger'], not classes of {store} (cat, dog)"),
    # scikit-learn's ValueError for a scoring name it does not know
    (lambda tmp, store: {"scoring": "acuracy"},
     lambda tmp, store: "field 'config.scoring': 'acuracy' is not a valid scoring value"),
    # an OSError about the spec's own path: a file where the head's folder should be made
    (lambda tmp, store: {"out": str(_csv(tmp / "file", "x")) + "/head"},
     lambda tmp, store: f"field 'config.out': {tmp / 'file'}"),
])
def test_bad_train_input_is_one_line_and_exit_2(tmp_path, capsys, small_store, bad, said):
    """The KeyError / ValueError / OSError that bad input causes in a train job is said as the spec's
    field, in one line, without a traceback."""
    from jobs import train

    config = {"store": small_store, "out": str(tmp_path / "head"), "cv": 2, **bad(tmp_path, small_store)}
    path = spec_file(tmp_path, "train", config)
    assert main("train", train.run, ["--config", str(path)]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert f"refused: {path}: {said(tmp_path, small_store)}" in line, line
    assert "Traceback" not in err


def test_a_train_job_reads_its_split_file_once(tmp_path, capsys, small_store, monkeypatch):
    """The job's early check of the split file reads its columns only; the rows are read once, by the
    training, and the head's report still names the file."""
    import classifiers.fit
    import classifiers.split
    from classifiers import load_head
    from jobs import train

    reads = []
    real = classifiers.split.read_split_file

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(classifiers.split, "read_split_file", counted)
    monkeypatch.setattr(classifiers.fit, "read_split_file", counted)
    split = _csv(tmp_path / "s.csv", "id,split\n" + "".join(f"img{i},{'test' if i % 4 == 0 else 'train'}\n"
                                                             for i in range(24)))
    path = spec_file(tmp_path, "train", {"store": small_store, "out": str(tmp_path / "head"), "cv": 2,
                                         "split": split})
    assert main("train", train.run, ["--config", str(path)]) == 0, capsys.readouterr().err
    assert reads == [split]
    assert load_head(str(tmp_path / "head")).report["split"] == f"file {split}"


def _csv(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("kind,error", [
    ("train", KeyError("features")),
    ("train", ValueError("could not broadcast input array from shape (4,) into shape (3,)")),
    ("train", PermissionError(13, "Permission denied", "/var/lib/somewhere/cache.db")),
    ("evaluate", KeyError("accuracy")),
    ("predict", ValueError("a bug")),
    ("probe", OSError(28, "No space left on device", "/tmp/featurestore-scratch/x.npy")),
])
def test_an_internal_key_value_or_os_error_keeps_its_traceback(tmp_path, capsys, kind, error):
    """A KeyError, ValueError or OSError that no check of the input raised (a bug, a full scratch disk)
    is a failure (exit 1) with its traceback, not a refusal of the spec."""
    config = {"train": {"store": str(tmp_path / "s"), "out": str(tmp_path / "h")},
              "evaluate": {"head": str(tmp_path / "h"), "store": str(tmp_path / "s")},
              "predict": {"head": str(tmp_path / "h"), "store": str(tmp_path / "s"), "out": str(tmp_path / "p")},
              "probe": {"source": str(tmp_path / "i"), "out": str(tmp_path / "p"), "models": ["resnet18@none"]}}[kind]
    path = spec_file(tmp_path, kind, config)

    def run(spec, cfg):
        raise error

    assert main(kind, run, ["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and f"{type(error).__name__}" in err and "refused" not in err, err


def test_an_os_error_about_the_specs_own_path_is_a_refusal(tmp_path, capsys):
    path = spec_file(tmp_path, "predict", {"head": str(tmp_path / "h"), "store": str(tmp_path / "s"),
                                           "out": str(tmp_path / "out" / "p.parquet")})

    def run(spec, cfg):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    assert main("predict", run, ["--config", str(path)]) == EXIT_BAD_SPEC
    (line,) = errors(capsys)
    assert f"refused: {path}: field 'config.out': {tmp_path / 'out'}: permission denied; choose another path" in line


@pytest.fixture
def extract_spec(tmp_path):
    from jobs.specs import load_spec

    path = spec_file(tmp_path, "extract", {"source": "s3://b/images", "output": "s3://b/stores/x",
                                           "model": "resnet18", "weights": "none", "layers": ["layer3"]})
    return load_spec(path)


@pytest.mark.parametrize("make,expected", [
    # an actor's error reaches the driver as text: the kind in it names the field
    (lambda: ("ExtractError", "the backbone could not be loaded on a worker: UnknownLayerError: resnet18 has no "
                              "layer 'layer9'; closest: layer4; list them with `featurestore layers resnet18`"),
     "field 'config.layers': the backbone could not be loaded on a worker: UnknownLayerError: resnet18 has no "
     "layer 'layer9'; closest: layer4; list them with `featurestore layers resnet18`"),
    # flags become the spec's fields; a value after one reads as YAML
    (lambda: ("ExtractError", "--gpus-per-actor 2.0 asked for, but the cluster has 0 GPU(s); pass "
                              "--gpus-per-actor 0 to run on CPUs"),
     "config.gpus_per_actor: 2.0 asked for, but the cluster has 0 GPU(s); pass config.gpus_per_actor: 0 to run on CPUs"),
    (lambda: ("StoreError", "s3://b/stores/x was made with another configuration; write to a new output, or pass "
                            "--overwrite to start it again"),
     "s3://b/stores/x was made with another configuration; write to a new output, or pass config.overwrite: true "
     "to start it again"),
    (lambda: ("SourceError", "s3://b/images/m.csv has no column 'path'; name it with --path-column "
                             "(path_column: in a job spec)"),
     "s3://b/images/m.csv has no column 'path'; name it with config.path_column"),
    # commands in backticks stay as they are; the field is the one whose location the message names
    (lambda: ("ClusterUnreachable", "no Ray head at 10.0.0.1:6379 (`ray start --head --port 6379` there), or "
                                    "leave --address out"),
     "no Ray head at 10.0.0.1:6379 (`ray start --head --port 6379` there), or leave config.address out"),
    (lambda: ("FileNotFoundError", "s3://b/images: no such directory"),
     "field 'config.source': s3://b/images: no such directory"),
])
def test_input_error_line_speaks_in_spec_fields(extract_spec, make, expected):
    from featurestore.engine import ClusterUnreachable, ExtractError
    from featurestore.sources import SourceError
    from featurestore.store import StoreError

    spec, typed = extract_spec
    kinds = {"ExtractError": ExtractError, "StoreError": StoreError, "SourceError": SourceError,
             "ClusterUnreachable": ClusterUnreachable, "FileNotFoundError": FileNotFoundError}
    kind, text = make()
    line = input_error_line("extract", kinds[kind](text), spec, typed)
    assert line == f"{spec.source}: {expected}"


def test_a_probe_names_its_models_field(tmp_path):
    from featurestore.probing import ProbeError
    from jobs.specs import load_spec

    spec, typed = load_spec(spec_file(tmp_path, "probe", {"source": "s3://b/i", "out": "s3://b/p",
                                                          "models": ["resnet18@none"], "layers": "auto"}))
    line = input_error_line("probe", ProbeError("--models 'resnet18@none': UnknownLayerError: no layer 'x'"),
                            spec, typed)
    assert line == f"{spec.source}: config.models: 'resnet18@none': UnknownLayerError: no layer 'x'"


def test_a_heads_error_names_the_spec_fields_it_marks(tmp_path):
    """classifiers marks the parameters its messages name; a train job's log says them as config fields,
    mid-message too, where str() would say Python's `split=FILE`."""
    from classifiers.heads import HeadError
    from classifiers.terms import param
    from jobs.specs import load_spec

    spec, typed = load_spec(spec_file(tmp_path, "train", {"store": "s3://b/store", "out": "s3://b/head"}))
    exc = HeadError(f"{param('split_column')} fold: the manifest has no such column; give the split as a file "
                    f"instead: {param('split', 'FILE')} with columns id and fold")
    line = input_error_line("train", exc, spec, typed)
    assert line == (f"{spec.source}: config.split_column fold: the manifest has no such column; give the split as a "
                    "file instead: config.split: FILE with columns id and fold"), line


@pytest.mark.parametrize("error,field", [
    # the message names the output, whose path starts with the source's: the longer one at that place
    (lambda tmp: OSError(f"{tmp / 'animals-store'}/shard-00000.h5: read-only file system"), "output"),
    (lambda tmp: FileNotFoundError(f"{tmp / 'animals'}/cats: no such directory"), "source"),
    # an OSError naming its path: the location it lies in, not one that merely starts the same
    (lambda tmp: PermissionError(13, "Permission denied", str(tmp / "animals-store" / "store.json")), "output"),
    (lambda tmp: PermissionError(13, "Permission denied", str(tmp / "animals" / "cats")), "source"),
    # a folder above both: the nearer location
    (lambda tmp: PermissionError(13, "Permission denied", str(tmp)), "source"),
])
def test_one_rule_names_the_field_of_a_location(tmp_path, error, field):
    """is_input_error and the refusal line ask one function which field a location error is about;
    a source /d/animals and an output /d/animals-store are told apart by path, not by prefix."""
    from jobs._entry import is_input_error, location_field
    from jobs.specs import load_spec

    spec, typed = load_spec(spec_file(tmp_path, "extract", {"source": str(tmp_path / "animals"),
                                                            "output": str(tmp_path / "animals-store"),
                                                            "model": "resnet18", "weights": "none"}))
    exc = error(tmp_path)
    assert location_field("extract", exc, typed) == field
    assert f"field 'config.{field}': " in input_error_line("extract", exc, spec, typed)
    _, train = load_spec(spec_file(tmp_path, "train", {"store": str(tmp_path / "animals"),
                                                       "out": str(tmp_path / "animals-store")}))
    assert is_input_error("train", exc, train)


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() sets up the job log on stderr; leave the test session's logging as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("config,field", [
    ({"models": ["resnet18@MISSING", "mobilenet_v3_small@none"]}, "models"),
    ({"models": ["resnet18", "mobilenet_v3_small@none"], "weights": {"resnet18": "MISSING"}}, "weights"),
])
def test_a_probe_names_the_field_its_missing_weights_file_came_from(tmp_path, capsys, config, field):
    """The weights of `models: [resnet18@FILE]` come from config.models, not config.weights: the job's
    refusal (on the cluster, where the file must be) names the field the user wrote the file in."""
    from jobs import probe

    missing = str(tmp_path / "missing.pth")
    config = yaml.safe_load(yaml.safe_dump(config).replace("MISSING", missing))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    path = spec_file(tmp_path, "probe", {"source": str(tmp_path / "imgs"), "out": str(tmp_path / "probe"), **config})
    assert main("probe", probe.run, ["--config", str(path)]) == EXIT_BAD_SPEC
    lines = errors(capsys)
    assert len(lines) == 1 and f"refused: {path}: field 'config.{field}': weights for resnet18: file {missing} not " \
                               "found" in lines[0], lines
