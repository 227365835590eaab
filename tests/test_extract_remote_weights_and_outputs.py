"""Extract's checks before any actor starts: a multi-model OUTPUT that is a folder of other files,
and remote weights URLs (a real HTTP server on loopback, a real S3 server) that cannot be read."""
from __future__ import annotations

import functools
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featurestore
from featurestore.engine import extract
from featurestore.store import StoreError, StoreWriter
from featurestore.weights import WeightsError

MODELS = ["--model", "resnet18", "--model", "mobilenet_v3_small"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "featurestore", *args]


def _images(root: Path, per_class: int = 1) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.jpg")
    return root


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- 1. a multi-model OUTPUT that holds other files -----------------------------------------------------
def test_a_multi_model_output_of_other_files_is_one_line_before_ray_starts(tmp_path):
    """SOURCE itself, or a folder of documents, as the parent of OUTPUT/<model>: refused like a single
    model's output, before Ray starts, and the folder is left as it was."""
    src = _images(tmp_path / "src")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "taxes.pdf").write_bytes(b"%PDF-1.4 keep me")
    for out in (src, docs):
        before = _tree(out)
        res = subprocess.run(_cli("extract", str(src), str(out), *MODELS, "--weights", "none", "--input-size", "32"),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"{out} exists and holds files that are not stores" in res.stderr, res.stderr[-3000:]
        assert "choose a new or empty output" in res.stderr
        assert res.stderr.count("\n") == 1 and "starting Ray" not in res.stderr, res.stderr[-3000:]
        assert _tree(out) == before


def test_a_multi_model_output_may_hold_its_stores_and_other_stores(tmp_path):
    """What featurestore wrote there earlier (this job's OUTPUT/<model>, a store of another model list, the
    writer lease) is no reason to refuse; one file of the user's among them is."""
    from featurestore.store import LEASE_FILE, write_store

    out = tmp_path / "out"
    for name in ("resnet18", "timm-resnet18"):  # this job's store, and one of an earlier job's other model
        write_store(str(out / name), {"f": np.zeros((2, 3), np.float32)}, np.array([0, 1]), ["a", "b"])
    (out / LEASE_FILE).write_text("{}")
    (out / "mobilenet_v3_small").mkdir()  # this job's, not written yet (its own check looks inside)
    StoreWriter.refuse_foreign_parent(str(out), ["resnet18", "mobilenet_v3_small"], None)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"holds files that are not stores \(notes.txt\)"):
        StoreWriter.refuse_foreign_parent(str(out), ["resnet18", "mobilenet_v3_small"], None)


def test_a_single_model_store_is_no_multi_model_output(tmp_path):
    """A store given as the OUTPUT of several models would get OUTPUT/<model> stores inside it: refused
    before Ray starts, naming what OUTPUT must be, and the store is left as it was."""
    from featurestore.store import write_store

    out = tmp_path / "store"
    write_store(str(out), {"f": np.zeros((2, 3), np.float32)}, np.array([0, 1]), ["a", "b"])
    before = _tree(out)
    with pytest.raises(StoreError, match=r"holds a single-model store; with several models OUTPUT is a parent"):
        StoreWriter.refuse_foreign_parent(str(out), ["resnet18", "mobilenet_v3_small"], None)
    res = subprocess.run(_cli("extract", str(_images(tmp_path / "src")), str(out), *MODELS, "--weights", "none",
                              "--input-size", "32"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and f"{out} holds a single-model store" in res.stderr, res.stderr[-3000:]
    assert "starting Ray" not in res.stderr and _tree(out) == before, res.stderr[-3000:]


# -- 2. remote weights URLs -----------------------------------------------------------------------------
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def weights_server(tmp_path_factory):
    """A real HTTP server on loopback serving mobilenet_v3_small's (random) state dict as /w.pth."""
    import torchvision

    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), root / "w.pth")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_weights_url_is_one_plain_line_before_any_actor(tmp_path, weights_server):
    src = _images(tmp_path / "src")
    out = tmp_path / "store"
    url = f"{weights_server}/missing.pth"
    res = subprocess.run(_cli("extract", str(src), str(out), "--model", "mobilenet_v3_small", "--weights", url,
                              "--input-size", "32"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"weights URL not found (HTTP 404): {url}; check the address" in res.stderr, res.stderr[-3000:]
    assert "--weights /path/to/missing.pth" in res.stderr  # how to pass it offline
    assert "actor" not in res.stderr and "Traceback" not in res.stderr and "worker" not in res.stderr, \
        res.stderr[-3000:]


@pytest.mark.parametrize("where", ["404", "closed port"])
def test_an_unreachable_weights_url_is_refused_fast_in_the_driver(tmp_path, ray_local, weights_server, where):
    url = f"{weights_server}/nope.pth" if where == "404" else f"http://127.0.0.1:{_closed_port()}/w.pth"
    said = "weights URL not found (HTTP 404)" if where == "404" else "connection refused"
    started = time.perf_counter()
    with pytest.raises(WeightsError, match=re.escape(said)):  # not ExtractError: no worker read it
        extract(source=str(_images(tmp_path / "src")), output=str(tmp_path / "store"), model="mobilenet_v3_small",
                weights=url, input_size=32, quiet=True)
    assert time.perf_counter() - started < 20
    assert not (tmp_path / "store" / "shards").exists()


def test_a_served_weights_file_still_extracts(tmp_path, ray_local, weights_server):
    url = f"{weights_server}/w.pth"
    res = extract(source=str(_images(tmp_path / "src")), output=str(tmp_path / "store"), model="mobilenet_v3_small",
                  weights=url, input_size=32, batch_size=2, quiet=True)
    assert res.ok and res.rows == 2
    store = featurestore.open(str(tmp_path / "store"))
    assert len(store) == 2 and store.config["weights"] == url


def test_a_missing_s3_weights_key_is_refused_in_the_driver(tmp_path, ray_local, s3_server, s3_bucket):
    url = f"{s3_bucket}/models/missing.pth"
    with pytest.raises(WeightsError, match=re.escape(f"weights not found: {url}; check the address")):
        extract(source=str(_images(tmp_path / "src")), output=str(tmp_path / "store"), model="mobilenet_v3_small",
                weights=url, input_size=32, quiet=True, storage_options=s3_server.storage_options)
    assert not (tmp_path / "store" / "shards").exists()



def test_weights_the_driver_may_not_read_are_left_to_a_clusters_workers(tmp_path, s3_server, monkeypatch, caplog):
    """No credentials in the driver: on a cluster (not strict) the nodes may have theirs, so it is logged
    and left to them; with the workers here (strict) it is refused. A missing key is refused either way."""
    import logging

    from featurestore.weights import check_remote

    bucket = s3_server.make_bucket()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    options = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}, "skip_instance_cache": True}
    with caplog.at_level(logging.WARNING, logger="featurestore.weights"):
        assert check_remote(f"{bucket}/w.pth", options, strict=False) is None
    assert f"weights {bucket}/w.pth not checked in the driver" in caplog.text, caplog.text
    with pytest.raises(WeightsError, match="no credentials, or access denied"):
        check_remote(f"{bucket}/w.pth", options, strict=True)
    with pytest.raises(WeightsError, match=re.escape(f"weights not found: {bucket}/missing.pth")):
        check_remote(f"{bucket}/missing.pth", {**s3_server.storage_options, "skip_instance_cache": True})


def test_s3_weights_without_credentials_are_refused_before_workers_that_would_lack_them_too(tmp_path, s3_server):
    """No --address: the workers are this machine's, with this environment, so the driver's answer is
    theirs; said before any actor starts (on a cluster, the nodes may have an instance role: left to them)."""
    src, out = _images(tmp_path / "src"), tmp_path / "store"
    url = f"{s3_server.make_bucket()}/w.pth"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    res = subprocess.run(_cli("extract", str(src), str(out), "--model", "mobilenet_v3_small", "--weights", url,
                              "--input-size", "32"), capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"cannot read weights {url}: no credentials, or access denied" in res.stderr, res.stderr[-3000:]
    assert "check the credentials (AWS_* variables or storage_options)" in res.stderr
    assert "actor" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]


def test_s3_weights_are_read_by_the_workers_with_the_jobs_storage_options(tmp_path, s3_server):
    """Weights at s3:// on an endpoint named only in storage_options (no AWS_* variables anywhere):
    the actors read them with the job's options, as the driver's check does."""
    import io

    import torchvision

    buf = io.BytesIO()
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), buf)
    url = f"{s3_server.make_bucket()}/w.pth"
    s3_server.fs().pipe(url, buf.getvalue())
    src, out = _images(tmp_path / "src"), tmp_path / "store"
    script = ("import json, sys, featurestore\n"
              "res = featurestore.extract(source=sys.argv[1], output=sys.argv[2], model='mobilenet_v3_small', "
              "weights=sys.argv[3], input_size=32, batch_size=2, quiet=True, storage_options=json.loads(sys.argv[4]))\n"
              "print('rows', res.rows)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))
    import json

    res = subprocess.run([sys.executable, "-c", script, str(src), str(out), url, json.dumps(s3_server.storage_options)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "rows 2" in res.stdout, res.stderr[-3000:]
    assert featurestore.open(str(out)).config["weights"] == url
