"""Split files on object storage: `--split s3://...` (and a train job's `split:`) are read through
fsspec with the storage_options the store takes, as every other input of the tool is. Against
moto's real S3 server on loopback (tests/conftest.py), no mocks of the reading."""
from __future__ import annotations

import io
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

import classifiers
from featurestore.store import write_store


@pytest.fixture(autouse=True)
def _root_logging():
    """A job's logging setup points the root logger at this test's captured stderr, closed after it:
    put the root logger back, so a later command's log lines are not written to a closed file."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _store(path) -> str:
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    X = rng.normal(size=(40, 6)).astype(np.float32)
    X[:, 0] += 4 * y
    write_store(str(path), {"avgpool": X}, y, ["neg", "pos"], ids=[f"img{i}" for i in range(40)],
                config={"model": "planted"})
    return str(path)


def _sides() -> dict[str, str]:
    return {f"img{i}": "test" if i % 5 == 0 else "train" for i in range(40)}


def _put(s3_server, url: str, data: bytes) -> str:
    with s3_server.fs().open(url, "wb") as f:
        f.write(data)
    return url


def _csv_bytes(sides: dict[str, str]) -> bytes:
    return ("id,split\n" + "".join(f"{i},{s}\n" for i, s in sides.items())).encode()


def _parquet_bytes(sides: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": list(sides), "split": list(sides.values())}), buf)
    return buf.getvalue()


def test_train_reads_a_split_file_on_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    """storage_options (here the only way to the server) reach the split file as they reach the store."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    store = _store(tmp_path / "s")
    so = s3_server.storage_options
    for name, data in (("split.csv", _csv_bytes(_sides())), ("split.parquet", _parquet_bytes(_sides()))):
        url = _put(s3_server, f"{s3_bucket}/splits/{name}", data)
        head = classifiers.train(store, split=url, cv=2, storage_options=so)
        assert head.report["n"] == 8 and head.report["n_train"] == 32, name
        assert head.report["split"] == f"file {url}"
    bad = _put(s3_server, f"{s3_bucket}/splits/cols.csv", b"name,side\nimg0,train\n")
    with pytest.raises(classifiers.HeadError, match=f"^split {bad}: needs columns 'id'"):
        classifiers.train(store, split=bad, cv=2, storage_options=so)
    missing = f"{s3_bucket}/splits/none.csv"
    with pytest.raises(FileNotFoundError, match="no such file"):
        classifiers.train(store, split=missing, cv=2, storage_options=so)


def test_the_train_command_reads_a_split_file_on_s3(s3_server, s3_bucket, tmp_path):
    """The command has no storage_options: the AWS_* variables (set by the fixture) reach the server."""
    from featurestore.cli import main

    store, head = _store(tmp_path / "s"), str(tmp_path / "h")
    url = _put(s3_server, f"{s3_bucket}/split.csv", _csv_bytes(_sides()))
    r = CliRunner().invoke(main, ["train", store, "--split", url, "--cv", "2", "--out", head])
    assert r.exit_code == 0, r.output
    assert f"split: file {url}" in r.output and "(n=8)" in r.output
    missing = f"{s3_bucket}/none.csv"
    r = CliRunner().invoke(main, ["train", store, "--split", missing, "--cv", "2", "--out", head])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == (f"Error: --split {missing}: cannot read {missing}: no such file (a CSV/Parquet file "
                                "with columns id and split)")


def test_a_train_job_checks_and_reads_a_split_file_on_s3(s3_server, s3_bucket, tmp_path, capsys, monkeypatch):
    """The job's early check of the split file (its columns) reads the URL with the spec's
    storage_options (the server's endpoint; the keys come from the environment, as specs carry no
    secrets), and so does the training; a missing or malformed one is config.split's fault."""
    from classifiers import load_head
    from jobs import train
    from jobs._entry import EXIT_BAD_SPEC, main

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    store = _store(tmp_path / "s")
    so = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}}

    def job(name: str, split: str) -> int:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"job": "train", "config": {
            "store": store, "out": str(tmp_path / name), "cv": 2, "split": split, "storage_options": so}}))
        return main("train", train.run, ["--config", str(path)])

    url = _put(s3_server, f"{s3_bucket}/split.parquet", _parquet_bytes(_sides()))
    assert job("ok", url) == 0, capsys.readouterr().err
    assert load_head(str(tmp_path / "ok")).report["split"] == f"file {url}"
    assert load_head(str(tmp_path / "ok")).report["n"] == 8
    capsys.readouterr()
    cols = _put(s3_server, f"{s3_bucket}/cols.csv", b"name,side\nimg0,train\n")
    for name, split, said in (("missing", f"{s3_bucket}/none.csv", f"{s3_bucket}/none.csv: no such file"),
                              ("cols", cols, f"{cols}: needs columns 'id' (or 'path') and 'split'; it has name, side")):
        assert job(name, split) == EXIT_BAD_SPEC
        err = capsys.readouterr().err
        (line,) = [ln for ln in err.splitlines() if " ERROR " in ln]
        assert f"field 'config.split': {said}" in line, line
        assert "Traceback" not in err


def test_a_split_file_on_s3_without_credentials_is_named_not_a_traceback(s3_server, s3_bucket, tmp_path, monkeypatch,
                                                                         capsys, request):
    """botocore's NoCredentialsError (no OSError) said with the URL and what to check, in train, on the
    command line (as --split) and in a train job (as config.split)."""
    import s3fs

    from featurestore.cli import main as cli
    from jobs import train
    from jobs._entry import EXIT_BAD_SPEC, main

    store = _store(tmp_path / "s")
    url = _put(s3_server, f"{s3_bucket}/split.csv", _csv_bytes(_sides()))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # the command makes a plain S3FileSystem(), which fsspec caches: not one with the old keys here, and
    # not this one without keys for the tests after this one
    s3fs.S3FileSystem.clear_instance_cache()
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    so = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}, "skip_instance_cache": True}
    said = f"{url}: cannot read it (NoCredentialsError: Unable to locate credentials); check the URL and the credentials"
    with pytest.raises(classifiers.HeadError, match="^" + re.escape(f"split {said}")):
        classifiers.train(store, split=url, cv=2, storage_options=so)
    r = CliRunner().invoke(cli, ["train", store, "--split", url, "--cv", "2", "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and r.output.startswith(f"Error: --split {said}"), r.output
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"job": "train", "config": {
        "store": store, "out": str(tmp_path / "h"), "cv": 2, "split": url,
        "storage_options": {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}}}}))
    capsys.readouterr()
    assert main("train", train.run, ["--config", str(spec)]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert f"field 'config.split': {said}" in line and "Traceback" not in err, err
