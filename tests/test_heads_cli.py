"""The train / evaluate / predict / export commands, end to end through the featurestore CLI group."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from featurestore.cli import main
from featurestore.store import write_store

CFG = {"model": "resnet18", "weights": "none", "weights_sha256": "a" * 64, "layers": ["avgpool"],
       "pooling": "avg", "precision": "fp32", "preprocessing": {"input_size": [32, 32], "crop": "center"}}


def _store(path, config=CFG):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    X = rng.normal(size=(120, 8))
    X[:, 0] += 4 * y
    write_store(str(path), {"avgpool": X.astype(np.float32)}, y, ["neg", "pos"], config=config)
    return str(path)


def test_train_evaluate_predict(tmp_path):
    store, head = _store(tmp_path / "s"), str(tmp_path / "h")
    r = CliRunner().invoke(main, ["train", store, "--head", "svm", "--grid", "C=0.1,1", "--grid", "gamma=scale",
                                  "--cv", "3", "--class-weight", "balanced", "--out", head])
    assert r.exit_code == 0, r.output
    assert "balanced accuracy 1.0000" in r.output and "in memory" in r.output
    rep = json.loads((tmp_path / "h" / "report.json").read_text())
    assert rep["params"]["C"] in (0.1, 1.0) and len(rep["sweep"]) == 2
    r = CliRunner().invoke(main, ["evaluate", head, store, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n"] == 120
    r = CliRunner().invoke(main, ["predict", head, store, "--out", str(tmp_path / "p.parquet")])
    assert r.exit_code == 0 and "120 predictions" in r.output


def test_streaming_flag_and_errors(tmp_path):
    store, head = _store(tmp_path / "s"), str(tmp_path / "h")
    r = CliRunner().invoke(main, ["train", store, "--head", "logreg", "--memory-budget", "1K", "--out", head])
    assert r.exit_code == 0, r.output
    assert "streaming" in r.output
    other = _store(tmp_path / "o", config={**CFG, "pooling": "max"})
    r = CliRunner().invoke(main, ["evaluate", head, other])
    assert r.exit_code == 2 and "pooling" in r.output
    r = CliRunner().invoke(main, ["train", store, "--grid", "gamma=1", "--out", head])
    assert r.exit_code == 2 and "no hyperparameter 'gamma'" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nohead"), store])
    assert r.exit_code == 2 and "not a head directory" in r.output
    (tmp_path / "a-file").write_text("x")  # a file where a folder goes: a message, not a traceback
    r = CliRunner().invoke(main, ["train", store, "--out", str(tmp_path / "a-file")])
    assert r.exit_code == 2 and "a-file: a file, not a folder; choose a folder for the head" in r.output, r.output
    r = CliRunner().invoke(main, ["predict", head, store, "--out", str(tmp_path / "a-file" / "p.parquet")])
    assert r.exit_code == 2, r.output
    assert (f"Error: --out {tmp_path / 'a-file' / 'p.parquet'}: cannot write {tmp_path / 'a-file'}: a file, not a "
            "folder; choose another path") in r.output, r.output


def test_export_command(tmp_path):
    from featurestore.backbones import load_backbone
    import torch

    bb = load_backbone("resnet18", "none", input_size=32)
    f = bb(torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)))[bb.layers[0]].numpy()
    y = (f[:, 0] > np.median(f[:, 0])).astype(int)
    write_store(str(tmp_path / "s"), {bb.layers[0]: f}, y, ["a", "b"], config=bb.config())
    head = str(tmp_path / "h")
    assert CliRunner().invoke(main, ["train", str(tmp_path / "s"), "--out", head]).exit_code == 0
    r = CliRunner().invoke(main, ["export", head, "--format", "onnx"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "h" / "model.onnx").stat().st_size > 1000


def test_train_on_an_address_no_cluster_answers_at_is_refused(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    store = _store(tmp_path / "s")
    r = subprocess.run([sys.executable, "-m", "featurestore", "train", store, "--out", str(tmp_path / "h"),
                        "--address", address], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"no Ray cluster answers at {address}" in r.stderr and "connection refused" in r.stderr, r.stderr
    assert not (tmp_path / "h").exists()


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """train/evaluate/predict refuse bad input in one line (exit 2) through named errors; a bare
    KeyError or ValueError from inside is a bug, not the input's fault: its traceback stays (exit 1)."""
    import pytest

    from classifiers import fit
    from featurestore.store import StoreError, StoreKeyError, open_store

    store, head = _store(tmp_path / "s"), str(tmp_path / "h")
    r = CliRunner().invoke(main, ["train", store, "--layer", "nope", "--out", head])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == f"Error: {store}: no layer 'nope'; layers: avgpool"  # no KeyError quotes
    with pytest.raises(StoreKeyError) as err:
        open_store(store).features("nope")
    assert isinstance(err.value, KeyError) and isinstance(err.value, StoreError)  # `except KeyError` still works
    garbage = tmp_path / "split.csv"
    garbage.write_bytes(b'id,split\n"unterminated\n\x00\x01,train,extra,columns\n')
    r = CliRunner().invoke(main, ["train", store, "--split", str(garbage), "--out", head])
    assert r.exit_code == 2 and r.output.startswith(f"Error: --split {garbage}: "), r.output
    assert "Traceback" not in r.output
    missing = tmp_path / "missing.csv"
    r = CliRunner().invoke(main, ["train", store, "--split", str(missing), "--out", head])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == (f"Error: --split {missing}: cannot read {missing}: no such file (a CSV/Parquet file "
                                "with columns id and split)")
    (tmp_path / "ok.csv").write_text("id,split\n" + "".join(f"{i},maybe\n" for i in range(3)))
    r = CliRunner().invoke(main, ["train", store, "--split", str(tmp_path / "ok.csv"), "--out", head])
    assert r.exit_code == 2 and "split values must be train or test; found 'maybe'" in r.output, r.output

    def broken(*a, **kw):
        raise KeyError("an internal key")

    monkeypatch.setattr(fit, "train", broken)
    r = CliRunner().invoke(main, ["train", store, "--out", head])
    assert r.exit_code == 1 and isinstance(r.exception, KeyError), r.output


def test_predict_writes_csv_for_a_csv_name_and_refuses_other_names(tmp_path):
    """--out p.csv is CSV (the prob_<class> columns, no list column), not Parquet bytes under a .csv name;
    a name of another format is refused before any work."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    store, head = _store(tmp_path / "s"), str(tmp_path / "h")
    assert CliRunner().invoke(main, ["train", store, "--cv", "3", "--out", head]).exit_code == 0
    r = CliRunner().invoke(main, ["predict", head, store, "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    got = pcsv.read_csv(tmp_path / "p.csv")
    want = pq.read_table(_predict_parquet(tmp_path, head, store))
    assert got.column_names == [c for c in want.column_names if c != "probabilities"]
    assert got["predicted_label"].to_pylist() == want["predicted_label"].to_pylist()
    assert np.allclose(got["prob_pos"].to_numpy(), want["prob_pos"].to_numpy(), atol=1e-6)
    r = CliRunner().invoke(main, ["predict", head, store, "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == (f"Error: --out {tmp_path / 'p.json'}: predictions are written as Parquet (.parquet) "
                                "or CSV (.csv), not .json; name the file with one of those")
    assert not (tmp_path / "p.json").exists()


def _predict_parquet(tmp_path, head, store):
    out = tmp_path / "p.parquet"
    assert CliRunner().invoke(main, ["predict", head, store, "--out", str(out)]).exit_code == 0
    return out


def test_a_full_disk_while_writing_is_said_as_such_not_blamed_on_the_input(tmp_path):
    """ENOSPC (real: /dev/full) while writing predictions or a head names the file being written, says the
    disk is full and exits 1 (a failure), not 2 with 'choose another path' as for a bad path."""
    import stat

    import pytest

    if not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full here")
    store, head = _store(tmp_path / "s"), tmp_path / "h"
    assert CliRunner().invoke(main, ["train", store, "--cv", "3", "--out", str(head)]).exit_code == 0
    full = tmp_path / "p.parquet"
    # a link, never /dev/full itself: pyarrow's write_table, which predict used, deletes its target on failure
    os.symlink("/dev/full", full)
    r = CliRunner().invoke(main, ["predict", str(head), store, "--out", str(full)])
    assert r.exit_code == 1, r.output
    assert r.output.strip() == (f"Error: --out {full}: cannot write {full}: no space left on device; free some "
                                "space there, or choose a path on another disk")
    os.symlink("/dev/full", head / ".model.skops.tmp")  # the head's model file lands on a full device
    r = CliRunner().invoke(main, ["train", store, "--cv", "3", "--out", str(head)])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1] == (
        f"Error: --out {head}: cannot write {head / 'model.skops'}: no space left on device; free some space "
        "there, or choose a path on another disk")


def test_an_os_error_about_no_argument_keeps_its_traceback(tmp_path):
    """Only an OSError naming a path given to the command is said in one line: any other (a library's
    cache, a temporary folder) is not the input's fault, and os_error_exception leaves it alone."""
    import click

    from classifiers.cli import os_error_exception
    from featurestore.cli import Refused

    out = str(tmp_path / "h")
    reads, writes = {"STORE": str(tmp_path / "s")}, {"--out": out}
    assert os_error_exception(PermissionError(13, "Permission denied", "/var/cache/x"), reads, writes) is None
    assert os_error_exception(OSError(28, "No space left on device"), reads, writes) is None
    said = os_error_exception(FileNotFoundError("src: no such folder; pass a folder per class"), reads, writes)
    assert isinstance(said, Refused) and said.message == "src: no such folder; pass a folder per class"
    said = os_error_exception(PermissionError(13, "Permission denied", str(tmp_path / "s" / "store.json")),
                              reads, writes)
    assert isinstance(said, Refused) and said.message == (
        f"STORE {tmp_path / 's'}: cannot read {tmp_path / 's' / 'store.json'}: permission denied")
    said = os_error_exception(OSError(5, "Input/output error", out), reads, writes)
    assert type(said) is click.ClickException and said.exit_code == 1
    assert said.message == f"--out {out}: cannot write {out}: input/output error"


def test_train_scoring_and_per_class_lines(tmp_path):
    """--scoring picks what the sweep maximises (f1_macro on imbalanced classes, as the Python API and
    job specs allow), train prints each class's recall, and a name scikit-learn lacks is refused first."""
    rng = np.random.default_rng(1)
    y = (np.arange(160) % 4 == 0).astype(int)  # 1 positive in 4
    X = rng.normal(size=(160, 8)).astype(np.float32)
    X[:, 0] += 1.5 * y
    store = str(tmp_path / "s")
    write_store(store, {"avgpool": X}, y, ["neg", "pos"], config=CFG)
    r = CliRunner().invoke(main, ["train", store, "--scoring", "f1_macro", "--cv", "3", "--out", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "h" / "report.json").read_text())
    assert rep["sweep_scoring"] == "f1_macro"
    assert "## Sweep (f1_macro, 3-fold CV" in (tmp_path / "h" / "report.md").read_text()
    for name in ("neg", "pos"):
        m = rep["per_class"][name]
        assert f"  {name}: precision {m['precision']:.3f} recall {m['recall']:.3f}" in r.output, r.output
    r = CliRunner().invoke(main, ["train", store, "--scoring", "acuracy", "--out", str(tmp_path / "h2")])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == ("Error: --scoring 'acuracy' is not a scikit-learn scorer name; e.g. accuracy, "
                                "balanced_accuracy, f1_macro (all: sklearn.metrics.get_scorer_names())")
    assert not (tmp_path / "h2").exists()


def test_reports_and_heads_stay_out_of_stores_and_other_heads(tmp_path):
    """evaluate --out into a head folder would replace the head's own test report (loaded as head.report),
    into a store it would litter the store; a head inside a store would go with the store's --overwrite."""
    store, head = _store(tmp_path / "s"), tmp_path / "h"
    assert CliRunner().invoke(main, ["train", store, "--cv", "3", "--out", str(head)]).exit_code == 0
    before = (head / "report.json").read_text()
    for out, said in ((head, f"--out {head}: a head folder; its own report (of its test part) would be replaced: "
                             "choose another folder for this report"),
                      (tmp_path / "s", f"--out {tmp_path / 's'}: a feature store; choose a folder outside it for the "
                                       "report"),
                      (tmp_path / "s" / "r", f"--out {tmp_path / 's' / 'r'}: inside the feature store "
                                             f"{tmp_path / 's'}; choose a folder outside it for the report")):
        r = CliRunner().invoke(main, ["evaluate", str(head), store, "--out", str(out)])
        assert r.exit_code == 2 and r.output.strip() == f"Error: {said}", r.output
    assert (head / "report.json").read_text() == before
    assert not {"report.json", "report.md", "r"} & set(os.listdir(tmp_path / "s"))
    r = CliRunner().invoke(main, ["train", store, "--out", str(tmp_path / "s" / "h")])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == (f"Error: --out {tmp_path / 's' / 'h'}: inside the feature store {tmp_path / 's'}; "
                                "choose a folder outside it")
    r = CliRunner().invoke(main, ["evaluate", str(head), store, "--out", str(tmp_path / "reports" / "x")])
    assert r.exit_code == 0 and (tmp_path / "reports" / "x" / "report.md").is_file(), r.output


def test_train_argument_errors_name_the_flag_typed_and_the_api_its_parameter(tmp_path):
    """A bad number on the command line is said as the flag the user typed (--test-size), not the
    Python parameter behind it (test_size), which the Python API keeps; --test-size is refused even
    with a split file, where it would go unused (job specs refuse it too)."""
    import pytest

    import classifiers
    from classifiers import HeadError
    from featurestore.store import open_store

    store, head = _store(tmp_path / "s"), str(tmp_path / "h")
    split = tmp_path / "split.csv"
    split.write_text("id,split\n" + "".join(f"{i},{'test' if n % 4 == 0 else 'train'}\n"
                                            for n, i in enumerate(open_store(store).ids)))
    # (flags, what the command says, the same arguments in Python, what classifiers.train says)
    cases = [(["--cv", "1"], "--cv must be a whole number >= 2", {"cv": 1}, "cv must be a whole number >= 2"),
             (["--test-size", "1.5"], "--test-size must lie strictly between 0 and 1, got 1.5", {"test_size": 1.5},
              "test_size must lie strictly between 0 and 1, got 1.5"),
             (["--test-size", "0", "--split", str(split)], "--test-size must lie strictly between 0 and 1, got 0.0",
              {"test_size": 0.0, "split": str(split)}, "test_size must lie strictly between 0 and 1, got 0.0"),
             (["--n-jobs", "0"], "--n-jobs must be a whole number of parallel fits", {"n_jobs": 0},
              "n_jobs must be a whole number of parallel fits"),
             (["--batch-size", "0"], "--batch-size must be a whole number >= 1", {"batch_size": 0},
              "batch_size must be a whole number >= 1"),
             (["--epochs", "0"], "--epochs must be a whole number >= 1", {"epochs": 0}, "epochs must be a whole number"),
             (["--scoring", "acc"], "--scoring 'acc' is not a scikit-learn scorer name", {"scoring": "acc"},
              "scoring 'acc' is not a scikit-learn scorer name")]
    for args, said, kw, api in cases:
        r = CliRunner().invoke(main, ["train", store, *args, "--out", head])
        assert r.exit_code == 2 and r.output.startswith(f"Error: {said}"), (args, r.output)
        with pytest.raises(HeadError) as err:
            classifiers.train(store, **kw)
        assert str(err.value).startswith(api), (kw, err.value)
    r = CliRunner().invoke(main, ["train", store, "--split", str(tmp_path), "--out", head])
    assert r.exit_code == 2, r.output  # a folder given as --split: said as --split, not as --out's folder
    assert r.output.strip() == (f"Error: --split {tmp_path}: a folder, not a file; a CSV/Parquet file with "
                                "columns id and split")
    assert not os.path.exists(head)


def test_an_out_url_is_refused_not_written_to_a_local_folder_named_after_it(tmp_path, monkeypatch):
    """train/evaluate/predict/export write local files: --out s3://bucket/x made a folder 's3:' in the
    current folder and reported success; now each says to write locally and copy, before any work."""
    store, head = _store(tmp_path / "s"), str(tmp_path / "h")
    assert CliRunner().invoke(main, ["train", store, "--grid", "C=1", "--out", head]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    for args, what in ((["train", store, "--out", "s3://bucket/heads/h"], "a head"),
                       (["evaluate", head, store, "--out", "s3://bucket/reports/r"], "a report"),
                       (["predict", head, store, "--out", "s3://bucket/p.parquet"], "a predictions file"),
                       (["export", head, "--out", "gs://bucket/m.onnx"], "an exported model")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith(f"Error: --out {args[-1]}: {what} is written to a local path, not a URL; "
                                   "write it locally and copy it there"), r.output
        assert ("featurestore submit" in r.output) == (args[0] != "export"), r.output
    assert sorted(os.listdir(tmp_path)) == ["h", "s"]  # no 's3:' or 'gs:' folder
