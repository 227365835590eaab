"""Listing and the whole store cycle on S3 through s3fs, against moto's real server on loopback."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurestore.cli_store import verify_cmd
from featurestore.sources import Listing, list_source, make_plan, read_bytes
from featurestore.store import (
    ShardWriter,
    StoreConfigMismatch,
    StoreWriter,
    inspect,
    open_store,
    verify,
    write_store,
)

pytestmark = pytest.mark.slow
CONFIG = {"model": "resnet18", "weights": "none", "layers": ["avgpool"], "pooling": "avg", "dtype": "float32"}


def _upload(s3_server, local_root, url):
    fs = s3_server.fs()
    for p in sorted(local_root.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{url[5:]}/{p.relative_to(local_root).as_posix()}", p.read_bytes())


def test_list_folder_and_manifest_on_s3(s3_server, s3_bucket, image_folder, tmp_path):
    root = image_folder({"cat": 2, "dog": 3})
    (root / "cat" / ".DS_Store").write_bytes(b"x")
    (root / "dog" / "nested").mkdir()
    (root / "dog" / "nested" / "n.png").write_bytes((root / "dog" / "dog_1.png").read_bytes())
    (root / "dog" / "readme.txt").write_text("x")
    _upload(s3_server, root, f"{s3_bucket}/images")
    so = s3_server.storage_options
    local = list_source(str(root))
    remote = list_source(f"{s3_bucket}/images", storage_options=so)
    assert remote.ids == [f"{s3_bucket}/images/{i[len(str(root)) + 1:]}" for i in local.ids]
    assert remote.label_names == ["cat", "dog"] and np.array_equal(remote.labels, local.labels)
    assert read_bytes(remote.ids[-1], storage_options=so) == (root / "dog" / "nested" / "n.png").read_bytes()
    with pytest.raises(FileNotFoundError):
        read_bytes(f"{s3_bucket}/images/gone.jpg", storage_options=so)

    table = pa.table({"path": ["images/dog/dog_0.jpg", "images/cat/cat_1.png"], "label": ["dog", "cat"]})
    pq.write_table(table, tmp_path / "m.parquet")
    s3_server.fs().put_file(str(tmp_path / "m.parquet"), f"{s3_bucket[5:]}/m.parquet")
    man = list_source(f"{s3_bucket}/m.parquet", storage_options=so)
    assert man.ids == [f"{s3_bucket}/images/cat/cat_1.png", f"{s3_bucket}/images/dog/dog_0.jpg"]
    assert man.labels.tolist() == [0, 1]
    with pytest.raises(FileNotFoundError):
        list_source(f"{s3_bucket}/nothing-here", storage_options=so)


def test_many_class_folders_on_s3_list_as_the_same_local_folder_does(s3_server, s3_bucket, tmp_path):
    root = tmp_path / "many"
    names = [f"c{i:02d}/{j}.jpg" for i in range(35) for j in range(3)]
    names += ["c00/deeper/still/x.png", ".hidden/a.jpg", "c01/.cache/b.jpg", "loose.jpg", "c02/notes.txt",
              "only-a-folder/sub/y.jpg"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    _upload(s3_server, root, f"{s3_bucket}/many")
    so = s3_server.storage_options
    local = list_source(str(root))
    remote = list_source(f"{s3_bucket}/many", storage_options=so)
    assert remote.ids == [f"{s3_bucket}/many/{i[len(str(root)) + 1:]}" for i in local.ids]
    assert remote.label_names == local.label_names and np.array_equal(remote.labels, local.labels)
    assert len(remote.label_names) == 36 and f"{s3_bucket}/many/loose.jpg" not in remote.ids
    one = list_source(f"{s3_bucket}/many/only-a-folder", storage_options=so)
    assert one.ids == [f"{s3_bucket}/many/only-a-folder/sub/y.jpg"] and one.label_names == ["sub"]
    with pytest.raises(FileNotFoundError):  # a prefix of folder names is no folder
        list_source(f"{s3_bucket}/many/c0", storage_options=so)


def test_whole_cycle_on_s3(s3_server, s3_bucket, tmp_path):
    so = s3_server.storage_options
    uri = f"{s3_bucket}/stores/run1"
    ids = [f"{s3_bucket}/img/{c}/{i}.jpg" for i, c in enumerate("abababababa")]
    labels = np.array([0, 1] * 5 + [0])
    plan = make_plan(Listing(ids, labels, ["a", "b"]), 4)
    w = StoreWriter(uri, CONFIG, plan.label_names, storage_options=so)
    w.write_plan(plan)
    assert StoreWriter.existing_plan(uri, storage_options=so).ids == ids
    rng = np.random.default_rng(0)
    X = rng.normal(size=(11, 5)).astype(np.float32)
    for spec in plan.shards():
        sw = ShardWriter(uri, spec.index, plan.label_names, storage_options=so, compression="lzf")
        keep = [j for j, i in enumerate(spec.ids) if i != ids[5]]
        lo = spec.index * 4
        sw.append([spec.ids[j] for j in keep], spec.labels[keep], {"avgpool": X[[lo + j for j in keep]]})
        if spec.index == 1:
            sw.add_error(ids[5], 1, "truncated JPEG")
        # not visible before commit: the h5 is a local temp file until then
        assert not any(k.endswith(f"shard-{spec.index:05d}.h5") for k in s3_server.fs().find(uri[5:]))
        sw.commit()
    final = w.finalize(plan, {})
    assert final.status == "complete" and final.num_rows == 10 and final.num_errors == 1
    keep_rows = [i for i in range(11) if i != 5]
    for mode in ("cache", "stream"):
        r = open_store(uri, storage_options=so, remote=mode, cache_dir=str(tmp_path / f"cache-{mode}"))
        assert len(r) == 10 and r.ids.tolist() == [ids[i] for i in keep_rows]
        assert np.array_equal(r.features()[:], X[keep_rows])
        assert np.array_equal(r.features()[[9, 0, 4]], X[keep_rows][[9, 0, 4]])
        assert np.array_equal(np.concatenate([b[1] for b in r.iter_batches(3)]), X[keep_rows])
        Xs, ys = r.select([ids[10], ids[0]])
        assert np.array_equal(Xs, X[[10, 0]]) and ys.tolist() == [0, 0]
        assert r.errors().to_pydict()["reason"] == ["truncated JPEG"]
        r.close()
    assert sorted(p.name for p in (tmp_path / "cache-cache").iterdir()) == sorted(f"{s['sha256']}.h5" for s in final.shards)
    rep = verify(uri, storage_options=so)
    assert rep.ok, rep.problems
    assert rep.rows == 10 and rep.shards == 3
    assert inspect(uri, storage_options=so)["class_counts"] == {"a": 6, "b": 4}
    res = CliRunner().invoke(verify_cmd, [uri, "--storage-options", json.dumps(so)])
    assert res.exit_code == 0 and "OK" in res.output

    fs = s3_server.fs()
    key = f"{uri[5:]}/shards/shard-00001.h5"
    data = bytearray(fs.cat_file(key))
    data[-100] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    fs.rm_file(f"{uri[5:]}/shards/shard-00002.h5")
    rep = verify(uri, storage_options=so)
    assert any("shard-00001.h5: checksum mismatch" in p for p in rep.problems)
    assert any("shard-00002.h5: missing" in p for p in rep.problems)
    res = CliRunner().invoke(verify_cmd, [uri, "--storage-options", json.dumps(so)])
    assert res.exit_code == 1


def test_resume_sees_commits_from_other_processes_and_refuses_mixing(s3_server, s3_bucket):
    so = s3_server.storage_options
    uri = f"{s3_bucket}/st"
    ids = [f"k{i}" for i in range(6)]
    plan = make_plan(Listing(ids, np.zeros(6, np.int64), ["a"]), 3)
    w = StoreWriter(uri, CONFIG, ["a"], storage_options=so)
    w.write_plan(plan)
    assert w.committed() == {}  # primes s3fs's listing cache in this process
    # a sidecar alone is not a commit
    s3_server.fs().pipe_file(f"{uri[5:]}/shards/shard-00001.json", b'{"index": 1}')
    script = textwrap.dedent(f"""
        import numpy as np
        from featurestore.store import ShardWriter
        sw = ShardWriter({uri!r}, 0, ["a"], storage_options={so!r})
        sw.append(["k0", "k1", "k2"], [0, 0, 0], {{"avgpool": np.ones((3, 2))}})
        sw.commit()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert sorted(w.committed()) == [0]
    assert w.committed()[0].rows == 3

    other = {**CONFIG, "pooling": "max"}
    with pytest.raises(StoreConfigMismatch, match=r"pooling: 'avg' -> 'max'.*--overwrite"):
        StoreWriter(uri, other, ["a"], storage_options=so)
    again = StoreWriter(uri, CONFIG, ["a"], storage_options=so)
    assert again.resumed and sorted(again.committed()) == [0]

    r = write_store(uri, {"avgpool": np.zeros((2, 2))}, [0, 0], ["a"], ["x", "y"], other,
                    overwrite=True, storage_options=so)
    assert len(r) == 2 and r.config["pooling"] == "max"
    keys = sorted(k.rsplit("/", 1)[-1] for k in s3_server.fs().find(uri[5:]))
    assert keys == ["errors.parquet", "manifest.parquet", "plan.parquet", "shard-00000.h5", "shard-00000.json", "store.json"]


def test_an_object_store_without_credentials_is_named_not_a_traceback(s3_server, s3_bucket, monkeypatch, tmp_path):
    """The first touch of a source, a store or an image on S3 without credentials says which URL
    and what to check."""
    import featurestore
    from featurestore.decode import BadImage, load_image
    from featurestore.lease import WriterLease
    from featurestore.sources import SourceError
    from featurestore.store import StoreError

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    so = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}, "skip_instance_cache": True}
    hint = r"NoCredentialsError.*check the URL and the credentials"
    with pytest.raises(SourceError, match=rf"{s3_bucket}/images: cannot list it: {hint}"):
        list_source(f"{s3_bucket}/images", storage_options=so)
    with pytest.raises(SourceError, match=rf"{s3_bucket}/list.csv: cannot list it: {hint}"):
        list_source(f"{s3_bucket}/list.csv", storage_options=so)
    with pytest.raises(StoreError, match=rf"{s3_bucket}/store: cannot read its store.json \({hint}"):
        featurestore.open(f"{s3_bucket}/store", storage_options=so)
    with pytest.raises(StoreError, match=rf"{s3_bucket}/out: cannot reach it \({hint}"):
        WriterLease(f"{s3_bucket}/out", storage_options=so).acquire()
    with pytest.raises(BadImage, match=rf"{s3_bucket}/a.jpg: cannot read it: NoCredentialsError"):
        load_image(f"{s3_bucket}/a.jpg", storage_options=so)


def test_a_mistyped_bucket_or_prefix_is_named_as_such(s3_server, s3_bucket, tmp_path):
    """Opening, inspecting or verifying a URL that holds nothing says whether the bucket or the prefix
    is wrong, instead of 'not a feature store'."""
    from featurestore.store import StoreError

    so = s3_server.storage_options
    s3_server.fs().pipe_file(f"{s3_bucket[5:]}/other/file.txt", b"x")
    cases = [("s3://no-such-bucket-here/store", r"no such bucket 'no-such-bucket-here' at this endpoint; check the "
                                                r"URL \(and AWS_ENDPOINT_URL or storage_options' endpoint_url\)"),
             (f"{s3_bucket}/stroe", "nothing is stored under this prefix; check the URL"),
             (f"{s3_bucket}/other", r"no store.json; not a feature store")]
    for url, says in cases:
        with pytest.raises(StoreError, match=rf"{url}: {says}"):
            open_store(url, storage_options=so)
        with pytest.raises(StoreError, match=rf"{url}: {says}"):
            inspect(url, storage_options=so)
        rep = verify(url, storage_options=so)
        assert not rep.ok and rep.problems[0].startswith(f"{url}: ") and says.split(" ")[0] in rep.problems[0]
