"""The engine against object storage: S3 in, S3 out, through s3fs and moto's real HTTP server."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import featurestore
from featurestore.config import ExtractConfig
from featurestore.engine import ExtractError, extract
from test_engine import SMALL, make_images, ray_local  # noqa: F401  (fixture)


def _upload(fs, local_root, url: str) -> None:
    for path in sorted(local_root.rglob("*.jpg")):
        fs.put_file(str(path), f"{url}/{path.relative_to(local_root).as_posix()}")


def test_s3_to_s3_matches_local_and_resumes(tmp_path, ray_local, s3_server, s3_bucket):  # noqa: F811
    fs = s3_server.fs()
    src_local = make_images(tmp_path / "src", per_class=5)
    src = f"{s3_bucket}/images"
    _upload(fs, src_local, src)
    out = f"{s3_bucket}/stores/animals"
    opts = s3_server.storage_options

    first = extract(ExtractConfig(source=src, output=out, shard_size=4, storage_options=opts, **SMALL))
    assert first.ok and first.rows == 15 and first.shards == 4

    local = extract(ExtractConfig(source=str(src_local), output=str(tmp_path / "local"), shard_size=4, **SMALL))
    assert local.rows == 15
    remote = featurestore.open(out, storage_options=opts)
    here = featurestore.open(str(tmp_path / "local"))
    ids = [str(i) for i in remote.ids]
    assert all(i.startswith(src + "/") for i in ids)
    # same images in the same order, so the same features and labels row by row
    assert [i[len(src) + 1:] for i in ids] == [str(p)[len(str(src_local)) + 1:] for p in here.ids]
    np.testing.assert_array_equal(np.asarray(remote.labels), np.asarray(here.labels))
    np.testing.assert_allclose(remote.features().to_numpy(), here.features().to_numpy(), atol=1e-5)
    assert featurestore.verify(out, storage_options=opts).ok

    # A shard that never got committed (its .h5 is the commit point): only it is recomputed.
    shards = f"{out}/shards"
    before = {p: fs.info(p)["ETag"] for p in fs.ls(shards) if p.endswith(".h5")}
    lost = sorted(before)[2]
    fs.rm(lost)
    again = extract(ExtractConfig(source=src, output=out, shard_size=4, storage_options=opts, **SMALL))
    assert again.computed_shards == [2]
    assert sorted(again.skipped_shards) == [0, 1, 3]
    fs.invalidate_cache()
    after = {p: fs.info(p)["ETag"] for p in fs.ls(shards) if p.endswith(".h5")}
    assert set(after) == set(before)
    for p in before:
        if p != lost:
            assert after[p] == before[p], f"{p} was rewritten"
    resumed = featurestore.open(out, storage_options=opts)
    np.testing.assert_allclose(resumed.features().to_numpy(), here.features().to_numpy(), atol=1e-5)
    assert [str(i) for i in resumed.ids] == ids
    assert featurestore.verify(out, storage_options=opts).ok

    # An identical re-run computes nothing.
    noop = extract(ExtractConfig(source=src, output=out, shard_size=4, storage_options=opts, **SMALL))
    assert noop.computed_shards == [] and noop.rows == 15

    # New objects under the prefix: refused, then appended as a new shard with the old ones untouched.
    extra = tmp_path / "extra" / "dog"
    extra.mkdir(parents=True)
    Image.fromarray(np.full((56, 72, 3), 200, np.uint8)).save(extra / "dog_late.jpg")
    _upload(fs, tmp_path / "extra", src)
    with pytest.raises(ExtractError, match="--append"):
        extract(ExtractConfig(source=src, output=out, shard_size=4, storage_options=opts, **SMALL))
    grown = extract(ExtractConfig(source=src, output=out, shard_size=4, append=True, storage_options=opts, **SMALL))
    assert grown.computed_shards == [4] and grown.rows == 16
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.ls(shards) if p in after} == after
    reader = featurestore.open(out, storage_options=opts)
    assert str(reader.ids[-1]) == f"{src}/dog/dog_late.jpg" and reader.label_names[int(reader.labels[-1])] == "dog"
    assert featurestore.verify(out, storage_options=opts).ok
