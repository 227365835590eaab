"""Parameters named in classifiers' refusals: the Python API says its parameter names (split_column,
out, fmt, test_size) throughout the message, the commands the flags the user typed (--split-column,
--out, --format, --test-size), a job spec its config fields; an ordinary word such as "out" or
"split" in the text is never reworded."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from click.testing import CliRunner

import classifiers
from classifiers.heads import HeadError
from featurestore.cli import main
from featurestore.store import write_store

CFG = {"model": "resnet18", "weights": "none", "weights_sha256": "a" * 64, "layers": ["avgpool"],
       "pooling": "avg", "precision": "fp32", "preprocessing": {"input_size": [32, 32], "crop": "center"}}


def _store(path, y, names):
    X = np.random.default_rng(0).normal(size=(len(y), 8)).astype(np.float32)
    write_store(str(path), {"avgpool": X}, np.asarray(y), names, config=CFG)
    return str(path)


def test_a_manifest_split_column_that_is_missing(tmp_path):
    store = _store(tmp_path / "s", np.arange(40) % 2, ["neg", "pos"])
    with pytest.raises(HeadError) as exc:
        classifiers.train(store, split_column="fold")
    said = str(exc.value)
    assert said.startswith("split_column fold: ") and "give the split as a file instead: split=FILE with columns " \
        "id and fold" in said and "--" not in said, said
    r = CliRunner().invoke(main, ["train", store, "--split-column", "fold", "--out", str(tmp_path / "h")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: --split-column fold: ") and "give the split as a file instead: --split FILE " \
        "with columns id and fold" in r.output, r.output


def test_parameters_named_mid_message(tmp_path):
    """A class with one training row: the fix names split, test_size and grid in the middle of the message."""
    y = np.arange(41) % 2
    y[-1] = 2  # one row of a third class, which lands in the training part
    store = _store(tmp_path / "s", y, ["a", "b", "c"])
    split = {i: "train" if n % 4 or n == 40 else "test" for n, i in enumerate(_ids(store))}
    with pytest.raises(HeadError) as exc:
        classifiers.train(store, cv=3, split=split)
    said = str(exc.value)
    assert "training part (split, test_size), or give one value per hyperparameter in grid (e.g. C=1)" in said, said
    assert "--" not in said
    split_file = tmp_path / "split.csv"
    split_file.write_text("id,split\n" + "".join(f"{k},{v}\n" for k, v in split.items()))
    r = CliRunner().invoke(main, ["train", store, "--cv", "3", "--split", str(split_file), "--out", str(tmp_path / "h")])
    assert r.exit_code == 2, r.output
    assert ("training part (--split, --test-size), or give one value per hyperparameter in --grid (e.g. C=1)"
            in r.output), r.output


def _ids(store):
    from featurestore.store import open_store

    return [str(i) for i in open_store(store).ids]


def test_predictions_file_of_another_format(tmp_path):
    store = _store(tmp_path / "s", np.arange(40) % 2, ["neg", "pos"])
    classifiers.train(store, out=str(tmp_path / "h"), grid={"C": [1.0]})
    out = tmp_path / "p.json"
    with pytest.raises(HeadError, match=rf"^out {out}: predictions are written as Parquet"):
        classifiers.predict(str(tmp_path / "h"), store, out=str(out))
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "h"), store, "--out", str(out)])
    assert r.exit_code == 2 and r.output.startswith(f"Error: --out {out}: predictions are written as Parquet"), r.output


def test_export_file_name_of_the_other_format(tmp_path):
    """fmt is --format on the command line: the flag is found by the option's parameter, not its spelling."""
    out = tmp_path / "m.onnx"
    with pytest.raises(classifiers.ExportArgumentError) as exc:
        classifiers.export(str(tmp_path / "h"), "torchscript", out=str(out))
    assert str(exc.value) == (f"out {out}: an ONNX file name, but fmt is torchscript; pass fmt='onnx', or name the "
                              f"file {tmp_path / 'm.pt'}")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "h"), "--format", "torchscript", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == (f"Error: --out {out}: an ONNX file name, but --format is torchscript; pass --format "
                                f"onnx, or name the file {tmp_path / 'm.pt'}")


def test_the_marks_survive_pickling_and_job_specs_say_fields(tmp_path):
    """An error raised in a Ray worker reaches the driver pickled: it can still be said as flags or fields."""
    from classifiers.terms import spec_term
    from jobs.specs import ConfigError, load_spec

    with pytest.raises(HeadError) as exc:
        classifiers.train(str(tmp_path / "none"), cv=1)
    back = pickle.loads(pickle.dumps(exc.value))
    assert str(back) == str(exc.value) and back.params == ["cv", "grid"]
    assert back.worded(spec_term).startswith("config.cv must be a whole number >= 2 (folds of the sweep; a single "
                                             "config.grid value needs no sweep)")
    spec = tmp_path / "t.yaml"
    spec.write_text("job: train\nconfig:\n  store: s3://b/s\n  out: s3://b/h\n  grid: {C: [x]}\n")
    with pytest.raises(ConfigError) as err:
        load_spec(str(spec))
    assert str(err.value) == f"{spec}: field 'config.grid': C: 'x' is not a number", str(err.value)


def test_a_grid_given_as_one_string(tmp_path):
    """grid="C=0.1,1" in Python is the command line's --grid C=0.1,1, not the specs 'C', '=', '0', ..."""
    store = _store(tmp_path / "s", np.arange(40) % 2, ["neg", "pos"])
    head = classifiers.train(store, grid="C=0.1,1", cv=3)
    assert sorted(s["params"]["C"] for s in head.sweep) == [0.1, 1.0]
    with pytest.raises(HeadError, match=r"^grid 'C': expected NAME=V1,V2"):
        classifiers.train(store, grid="C", cv=3)


def test_an_unknown_loss_is_refused_before_the_store_is_read(tmp_path):
    """loss="hing" was SGDClassifier's InvalidParameterError after a pass over the store (and on the
    cluster, for a train job's spec)."""
    from jobs.specs import ConfigError, parse_spec

    with pytest.raises(HeadError, match=r"^loss must be one of log_loss, hinge .*got 'hing'$"):
        classifiers.train(str(tmp_path / "no-store"), head="sgd", loss="hing")
    with pytest.raises(ConfigError, match=r"^t\.yaml: field 'config\.loss' must be one of log_loss, hinge"):
        parse_spec({"job": "train", "config": {"store": "s3://b/s", "out": "s3://b/h", "loss": "hing"}}, "t.yaml")
