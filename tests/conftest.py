"""Shared fixtures: small labeled image folders and a real S3-compatible server (moto) on loopback.

image_folder (function scope, factory)
    image_folder(classes={"cat": 3, "dog": 2}, size=(24, 24), fmt="mixed", name="images", seed=0) -> Path
    Writes <tmp_path>/<name>/<class>/<class>_<i>.<ext> with deterministic random pixels
    (numpy Generator seeded from `seed`), so two calls with the same arguments give
    byte-identical files. `classes` may also be a list of names (3 images each).
    fmt: "jpg", "png" or "mixed" (alternating). Returns the root folder.

head_on_images (function scope, factory)
    head_on_images(backbone, folder) -> (paths, feats, head): a logreg head saved at folder/h,
    trained (store at folder/s) on the backbone's features of 8 images from image_folder
    (4 cats, 4 dogs, 40x36), ids the images' paths in sorted order.

s3_server (session scope)
    Starts moto's real HTTP server (ThreadedMotoServer) on 127.0.0.1 at a free port and yields
    an S3Server with .endpoint_url, .storage_options (pass to fsspec/s3fs: key/secret dummies
    and client_kwargs.endpoint_url), .env (AWS_* variables for subprocesses and Ray workers),
    .make_bucket(name=None) -> "s3://<bucket>" and .fs() (an s3fs filesystem, caches off).
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL are set
    only while the fixture is active and restored afterwards.

s3_bucket (function scope)
    A fresh empty bucket on s3_server, as "s3://<bucket>".
"""
from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

# extract's driver records the layer names it traced (featurestore.layer_names); the tests keep that
# record in a folder of their own, not in the user's ~/.cache (subprocesses and Ray workers inherit it)
os.environ["FEATURESTORE_LAYER_CACHE"] = tempfile.mkdtemp(prefix="featurestore-test-layers-")
atexit.register(shutil.rmtree, os.environ["FEATURESTORE_LAYER_CACHE"], ignore_errors=True)


def signal_images(root: Path, classes: list[str], per_class: int, side: int) -> Path:
    """root/<class>/<class>_<i>.jpg, random pixels with one colour channel brightened per class, so
    that features of a random backbone still separate the classes (heads have a signal)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 160, size=(side, side, 3), dtype=np.uint8)
            arr[..., ci] += 90
            Image.fromarray(arr).save(root / cls / f"{cls}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    def make(classes=None, size=(24, 24), fmt="mixed", name="images", seed=0):
        if classes is None:
            classes = {"cat": 3, "dog": 2}
        if not isinstance(classes, dict):
            classes = {c: 3 for c in classes}
        root = tmp_path / name
        rng = np.random.default_rng(seed)
        for cls in sorted(classes):
            d = root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(classes[cls]):
                ext = fmt if fmt != "mixed" else ("jpg" if i % 2 == 0 else "png")
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                img = Image.fromarray(pixels, "RGB")
                if ext == "jpg":
                    img.save(d / f"{cls}_{i}.jpg", format="JPEG", quality=90)
                else:
                    img.save(d / f"{cls}_{i}.png", format="PNG")
        return root

    return make


@pytest.fixture
def head_on_images(image_folder):
    def make(backbone, folder):
        import classifiers
        from featurestore.decode import load_image
        from featurestore.store import write_store

        root = image_folder(classes={"cat": 4, "dog": 4}, size=(40, 36))
        paths = sorted(str(p) for p in root.rglob("*.*"))
        feats = backbone.extract([load_image(p) for p in paths])[backbone.layers[0]]
        y = np.array([0 if "/cat/" in p else 1 for p in paths])
        store = write_store(str(folder / "s"), {backbone.layers[0]: feats}, y, ["cat", "dog"], ids=paths,
                            config=backbone.config())
        head = classifiers.train(store, head="logreg", grid={"C": [10.0]}, out=str(folder / "h"))
        return paths, feats, head

    return make


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint_url: str
    storage_options: dict
    env: dict = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=itertools.count)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
        self.fs().mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    options = {
        "key": "testing",
        "secret": "testing",
        # no region_name here: s3fs would send it as a LocationConstraint, which moto refuses for us-east-1
        "client_kwargs": {"endpoint_url": endpoint},
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            yield S3Server(endpoint, options, env)
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.make_bucket()
