"""The HDF5 store on local disk: real files written, committed, read back, verified."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from featurestore.cli_store import inspect_cmd, verify_cmd
from featurestore.lease import WriterLease
from featurestore.sources import Plan
from featurestore.store import (
    ShardWriter,
    StoreConfigMismatch,
    StoreError,
    StoreWriter,
    inspect,
    open_store,
    verify,
    write_store,
)

CONFIG = {"model": "resnet18", "weights": "none", "weights_sha256": "ab" * 32, "layers": ["layer4", "layer3"],
          "pooling": "avg", "preprocessing": {"input_size": [224, 224], "crop": "center"}, "dtype": "float32"}


def _data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    feats = {"layer4": rng.normal(size=(n, 6)).astype(np.float32), "layer3": rng.normal(size=(n, 2, 3)).astype(np.float32)}
    labels = rng.integers(0, 3, n)
    ids = [f"/data/{['cat', 'dog', 'eel'][l]}/{i:03d}.jpg" for i, l in enumerate(labels)]
    return feats, labels, ids


@pytest.fixture
def store(tmp_path):
    feats, labels, ids = _data()
    reader = write_store(str(tmp_path / "st"), feats, labels, ["cat", "dog", "eel"], ids, CONFIG, shard_size=10)
    return reader, feats, labels, ids


def test_round_trip_reader(store):
    r, feats, labels, ids = store
    assert len(r) == 23 and r.label_names == ["cat", "dog", "eel"] and r.layers == ["layer4", "layer3"]
    assert r.config == CONFIG and r.status == "complete"
    assert r.ids.tolist() == ids and np.array_equal(r.labels, labels)
    f = r.features()
    assert f.shape == (23, 6) and f.dtype == np.float32 and len(f) == 23
    assert np.array_equal(f[:], feats["layer4"])
    assert np.array_equal(f[5:17], feats["layer4"][5:17])  # crosses a shard boundary
    assert np.array_equal(f[::4], feats["layer4"][::4])
    assert np.array_equal(f[-1], feats["layer4"][-1])
    rows = [22, 0, 10, 10, 9, -2]
    assert np.array_equal(f[rows], feats["layer4"][rows])
    mask = labels == 1
    assert np.array_equal(f[mask], feats["layer4"][mask])
    assert np.array_equal(f[3:6, 2], feats["layer4"][3:6, 2])
    assert np.array_equal(np.asarray(r.features("layer3")), feats["layer3"])
    with pytest.raises(IndexError):
        f[23]
    with pytest.raises(KeyError, match="layer9"):
        r.features("layer9")
    X, y = r.to_numpy("layer3")
    assert np.array_equal(X, feats["layer3"]) and np.array_equal(y, labels)


def test_iter_batches_select_and_torch(store):
    r, feats, labels, ids = store
    batches = list(r.iter_batches(batch_size=4))
    assert [len(b[0]) for b in batches] == [4] * 5 + [3]
    assert np.concatenate([b[0] for b in batches]).tolist() == ids
    assert np.array_equal(np.concatenate([b[1] for b in batches]), feats["layer4"])
    assert np.array_equal(np.concatenate([b[2] for b in batches]), labels)
    big = list(r.iter_batches(batch_size=1000, layer="layer3"))
    assert len(big) == 1 and np.array_equal(big[0][1], feats["layer3"])
    X, y = r.select([ids[20], ids[1], ids[11]])
    assert np.array_equal(X, feats["layer4"][[20, 1, 11]]) and y.tolist() == labels[[20, 1, 11]].tolist()
    with pytest.raises(KeyError, match="nope"):
        r.select(["nope"])
    torch = pytest.importorskip("torch")
    ds = r.torch_dataset()
    x, lab = ds[12]
    assert isinstance(x, torch.Tensor) and torch.equal(x, torch.from_numpy(feats["layer4"][12])) and lab == labels[12]
    assert isinstance(ds, torch.utils.data.Dataset)
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    xb = torch.cat([b[0] for b in loader])
    assert torch.equal(xb, torch.from_numpy(feats["layer4"]))
    # spawned workers unpickle the dataset by its class name (built lazily, on first use)
    spawned = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([b[0] for b in spawned]), xb)


def test_shards_are_plain_pyimagesearch_h5(store):
    r, feats, labels, ids = store
    assert len(r.shard_uris) == 3
    with h5py.File(r.shard_uris[1], "r") as f:
        assert f["features"].shape == (10, 6)
        assert np.array_equal(f["features"][()], feats["layer4"][10:20])
        assert np.array_equal(f["labels"][()], labels[10:20])
        assert [s.decode() for s in f["label_names"][()]] == ["cat", "dog", "eel"]
        assert [s.decode() for s in f["ids"][()]] == ids[10:20]
        assert np.array_equal(f["layers/layer3"][()], feats["layer3"][10:20])
        assert f["features"].chunks is not None


def test_store_json_manifest_and_errors(store, tmp_path):
    r, feats, labels, ids = store
    meta = json.loads((tmp_path / "st" / "store.json").read_text())
    assert meta["status"] == "complete" and meta["num_rows"] == 23 and meta["num_shards"] == 3
    assert meta["config"] == CONFIG and meta["label_names"] == ["cat", "dog", "eel"]
    assert meta["layers"] == {"layer4": {"shape": [6], "dtype": "float32"}, "layer3": {"shape": [2, 3], "dtype": "float32"}}
    assert set(meta["versions"]) >= {"python", "featurestore", "torch", "torchvision", "timm", "pillow", "h5py", "numpy"}
    import hashlib

    for s in meta["shards"]:
        data = (tmp_path / "st" / "shards" / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    m = r.manifest().to_pydict()
    assert m["id"] == ids and m["status"] == ["ok"] * 23
    assert m["shard"] == [i // 10 for i in range(23)] and m["row"] == [i % 10 for i in range(23)]
    assert r.errors().num_rows == 0
    assert not [n for n in os.listdir(tmp_path / "st" / "shards") if n.startswith(".")]


def _writer_store(tmp_path, ids, labels, shard_size=4, config=CONFIG):
    plan = Plan(ids, np.asarray(labels), ["a", "b"], shard_size)
    w = StoreWriter(str(tmp_path / "st"), config, plan.label_names)
    w.write_plan(plan)
    return w, plan


def test_errors_failed_shards_and_manifest(tmp_path):
    ids = [f"img{i}" for i in range(10)]
    labels = [0, 1] * 5
    w, plan = _writer_store(tmp_path, ids, labels)
    specs = plan.shards()
    # shard 0: rows appended out of order plus one bad input
    sw = ShardWriter(w.uri, 0, plan.label_names)
    sw.append(["img3", "img1"], [1, 1], {"f": np.ones((2, 5))})
    sw.add_error("img2", 0, "truncated JPEG")
    sw.append(["img0"], [0], {"f": np.zeros((1, 5))})
    info = sw.commit()
    assert (info.rows, info.errors) == (3, [("img2", 0, "truncated JPEG")])
    # shard 1: every input bad -> an empty shard
    sw = ShardWriter(w.uri, 1, plan.label_names)
    for i, l in zip(specs[1].ids, specs[1].labels):
        sw.add_error(i, int(l), "zero-byte file")
    sw.commit()
    # shard 2 failed (never committed)
    final = w.finalize(plan, {2: "actor died 3 times"})
    assert final.status == "incomplete" and final.num_rows == 3 and final.num_errors == 7
    m = w.loc.read_parquet("manifest.parquet").to_pydict()
    assert m["status"] == ["ok", "ok", "error", "ok"] + ["error"] * 4 + ["failed"] * 2
    assert m["row"][:4] == [2, 1, -1, 0] and m["row"][4:] == [-1] * 6
    e = w.loc.read_parquet("errors.parquet").to_pydict()
    assert e["id"] == ["img2", "img4", "img5", "img6", "img7", "img8", "img9"]
    assert e["reason"][0] == "truncated JPEG" and e["reason"][1] == "zero-byte file"
    assert e["reason"][-1] == "shard failed: actor died 3 times" and e["shard"][-1] == 2
    r = open_store(w.uri)
    assert len(r) == 3 and r.ids.tolist() == ["img3", "img1", "img0"]
    assert np.array_equal(r.features()[:], np.array([[1] * 5, [1] * 5, [0] * 5], np.float32))
    rep = verify(w.uri)
    assert not rep.ok and any("incomplete" in p and "actor died" in p for p in rep.problems)
    assert len(rep.problems) == 1  # otherwise consistent
    # a shard nobody reported failed but that is not there (written to another node's disk)
    # makes the store incomplete too, never "complete" with rows missing
    again = w.finalize(plan, {})
    assert again.status == "incomplete" and again.failed_shards == {"2": "shard was not committed"}
    assert inspect(w.uri)["error_reasons"] == {"zero-byte file": 4, "shard failed": 2, "truncated JPEG": 1}


def test_uncommitted_and_aborted_writers_leave_no_shard(tmp_path):
    w, plan = _writer_store(tmp_path, [f"i{i}" for i in range(8)], [0] * 8)
    sw = ShardWriter(w.uri, 0, plan.label_names)
    sw.append(plan.shard(0).ids, plan.shard(0).labels, {"f": np.ones((4, 3))})
    shard_dir = tmp_path / "st" / "shards"
    assert not [n for n in os.listdir(shard_dir) if n.endswith(".h5")]  # being written: invisible
    assert w.committed() == {}
    sw.abort()
    assert os.listdir(shard_dir) == []
    with pytest.raises(StoreError):
        sw.append(["x"], [0], {"f": np.ones((1, 3))})
    with pytest.raises(ValueError, match="layers"):
        with ShardWriter(w.uri, 1, plan.label_names) as sw:  # an exception leaving the block aborts
            sw.append(plan.shard(1).ids, plan.shard(1).labels, {"f": np.ones((4, 3))})
            sw.append(["x"], [0], {"g": np.ones((1, 3))})
    assert os.listdir(shard_dir) == []
    with ShardWriter(w.uri, 1, plan.label_names) as sw:  # leaving without commit() also aborts
        sw.append(plan.shard(1).ids, plan.shard(1).labels, {"f": np.ones((4, 3))})
    assert os.listdir(shard_dir) == [] and w.committed() == {}


def test_killed_writer_leaves_no_shard_and_resume_commits(tmp_path):
    w, plan = _writer_store(tmp_path, [f"i{i}" for i in range(8)], [0, 1] * 4)
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from featurestore.store import ShardWriter
        sw = ShardWriter({w.uri!r}, 0, ["a", "b"])
        sw.append(["i0", "i1"], [0, 1], {{"f": np.ones((2, 3))}})
        sw._h5.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    names = os.listdir(tmp_path / "st" / "shards")
    assert names and all(n.startswith(".") and n.endswith(".tmp") for n in names)  # only a hidden temp
    assert w.committed() == {}
    w2 = StoreWriter(w.uri, CONFIG, ["a", "b"])  # the re-run: same config resumes
    assert w2.resumed and w2.read_plan().ids == plan.ids
    for spec in plan.shards():
        with ShardWriter(w2.uri, spec.index, plan.label_names) as sw:
            sw.append(spec.ids, spec.labels, {"f": np.full((len(spec), 3), spec.index, np.float32)})
            sw.commit()
    assert sorted(w2.committed()) == [0, 1]
    w2.finalize(plan, {})
    assert sorted(os.listdir(tmp_path / "st" / "shards")) == ["shard-00000.h5", "shard-00000.json", "shard-00001.h5", "shard-00001.json"]
    assert verify(w2.uri).ok


def test_sidecar_without_h5_is_not_committed(tmp_path):
    w, plan = _writer_store(tmp_path, [f"i{i}" for i in range(4)], [0] * 4)
    (tmp_path / "st" / "shards" / "shard-00000.json").write_text(json.dumps({"index": 0}))
    assert w.committed() == {}


def test_config_mismatch_refused_and_overwrite(tmp_path):
    feats, labels, ids = _data(6)
    uri = str(tmp_path / "st")
    write_store(uri, feats, labels, ["cat", "dog", "eel"], ids, CONFIG, shard_size=4)
    other = {**CONFIG, "model": "resnet50", "preprocessing": {"input_size": [256, 256], "crop": "center"}}
    with pytest.raises(StoreConfigMismatch) as info:
        StoreWriter(uri, other, ["cat", "dog", "eel"])
    msg = str(info.value)
    assert "model" in msg and "preprocessing.input_size" in msg and "--overwrite" in msg and uri in msg
    assert info.value.differences == ["model: 'resnet18' -> 'resnet50'", "preprocessing.input_size: [224, 224] -> [256, 256]"]
    assert open_store(uri).status == "complete"  # untouched
    tuple_cfg = {**CONFIG, "layers": ("layer4", "layer3")}
    assert StoreWriter(uri, tuple_cfg, ["cat"]).resumed  # JSON-equal configs are the same
    feats2 = {"x": np.ones((3, 2), np.float32)}
    r = write_store(uri, feats2, [0, 1, 0], ["p", "q"], ["a", "b", "c"], other, shard_size=2, overwrite=True)
    assert len(r) == 3 and r.layers == ["x"] and r.config["model"] == "resnet50" and r.label_names == ["p", "q"]
    assert sorted(os.listdir(os.path.join(uri, "shards"))) == ["shard-00000.h5", "shard-00000.json", "shard-00001.h5", "shard-00001.json"]
    assert verify(uri).ok


def test_refuses_a_non_store_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not empty"):
            StoreWriter(str(tmp_path / "out"), CONFIG, [], overwrite=overwrite)
    assert (tmp_path / "out" / "precious.txt").exists()


@pytest.mark.parametrize("dtype,compression", [("float16", "lzf"), ("float32", "gzip")])
def test_dtype_and_compression(tmp_path, dtype, compression):
    x = np.linspace(-3, 3, 40 * 16, dtype=np.float32).reshape(40, 16)
    r = write_store(str(tmp_path / "st"), {"f": x}, np.zeros(40, int), ["only"], None, {}, shard_size=25,
                    dtype=dtype, compression=compression)
    assert r.features().dtype == np.dtype(dtype) and r.meta["compression"] == compression
    np.testing.assert_allclose(r.features()[:], x, rtol=1e-3 if dtype == "float16" else 0)
    with h5py.File(r.shard_uris[0], "r") as f:
        assert f["features"].compression == compression and f["features"].dtype == np.dtype(dtype)
    assert r.ids[0] == "item-00000000"


def test_write_store_validates_inputs(tmp_path):
    uri = str(tmp_path / "st")
    with pytest.raises(ValueError, match="rows"):
        write_store(uri, {"f": np.ones((3, 2))}, [0, 0], ["a"], None, {})
    with pytest.raises(ValueError, match="more than once"):
        write_store(uri, np.ones((2, 2)), [0, 0], ["a"], ["x", "x"], {})
    with pytest.raises(ValueError, match="labels must lie"):
        write_store(uri, np.ones((2, 2)), [0, 3], ["a"], None, {})
    r = write_store(uri, np.ones((2, 2)), [-1, -1], [], None, {})  # unlabeled
    assert r.layers == ["features"] and r.labels.tolist() == [-1, -1]


def test_verify_catches_corrupt_and_missing_shards(store, tmp_path):
    r, *_ = store
    uri = r.uri
    assert verify(uri).ok
    p = tmp_path / "st" / "shards" / "shard-00001.h5"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    rep = verify(uri)
    assert not rep.ok and any("shard-00001.h5: checksum mismatch" in x for x in rep.problems)
    os.remove(tmp_path / "st" / "shards" / "shard-00002.h5")
    rep = verify(uri)
    assert any("shard-00002.h5: missing" in x for x in rep.problems)
    # the manifest's rows into the missing shard are that shard's problem, not the manifest's
    assert not any("manifest.parquet" in x for x in rep.problems), rep.problems
    assert rep.damaged_shards == ["shards/shard-00001.h5", "shards/shard-00002.h5"]
    res = CliRunner().invoke(verify_cmd, [uri])
    assert res.exit_code == 1 and "checksum mismatch" in res.output and "missing" in res.output


def test_verify_catches_manifest_and_duplicate_problems(store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    r, *_ = store
    man = r.manifest().to_pydict()
    man["row"][0], man["row"][1] = man["row"][1], man["row"][0]
    pq.write_table(pa.table(man), tmp_path / "st" / "manifest.parquet")
    rep = verify(r.uri)
    assert rep.problems == [f"manifest.parquet: 2 ok row(s) do not match their shard row (id or label), e.g. "
                            f"{man['id'][0]} -> shard 0 row 1; {man['id'][1]} -> shard 0 row 0"]


def test_cli_inspect_and_verify(store, tmp_path):
    r, *_ = store
    runner = CliRunner()
    res = runner.invoke(inspect_cmd, [r.uri])
    assert res.exit_code == 0, res.output
    assert "resnet18" in res.output and "23 of 23 inputs" in res.output and "layer layer3" in res.output
    assert "3 classes" in res.output
    res = runner.invoke(inspect_cmd, [r.uri, "--json"])
    info = json.loads(res.output)
    assert info["rows"] == 23 and sum(info["class_counts"].values()) == 23
    res = runner.invoke(verify_cmd, [r.uri])
    assert res.exit_code == 0 and res.output.startswith("OK:")
    res = runner.invoke(verify_cmd, [r.uri, "--json"])
    assert json.loads(res.output)["ok"] is True
    res = runner.invoke(inspect_cmd, [r.uri + "-nope"])
    assert res.exit_code != 0 and "-nope: no such folder" in res.output
    (tmp_path / "notes.txt").write_text("x")
    for cmd in (inspect_cmd, verify_cmd):
        res = runner.invoke(cmd, [str(tmp_path / "notes.txt")])
        assert res.exit_code != 0 and "notes.txt: a file, not a store; a store is the folder that holds store.json" \
            in res.output, res.output
    os.makedirs(r.uri + "-empty")
    res = runner.invoke(inspect_cmd, [r.uri + "-empty"])
    assert res.exit_code != 0 and "no store.json; not a feature store" in res.output


def test_reader_of_a_running_store_sees_only_committed_shards(tmp_path):
    w, plan = _writer_store(tmp_path, [f"i{i}" for i in range(8)], [0] * 8)
    with ShardWriter(w.uri, 1, plan.label_names) as sw:
        sw.append(plan.shard(1).ids, plan.shard(1).labels, {"f": np.ones((4, 2))})
        sw.commit()
    sw0 = ShardWriter(w.uri, 0, plan.label_names)
    sw0.append(plan.shard(0).ids, plan.shard(0).labels, {"f": np.ones((4, 2))})
    lease = WriterLease(w.uri).acquire()  # as the engine holds it while it writes
    r = open_store(w.uri)
    assert r.status == "running" and len(r) == 4 and r.ids.tolist() == plan.shard(1).ids
    with pytest.raises(StoreError, match=r"\(status: running\); wait for it to finish"):
        r.manifest()
    sw0.abort()
    lease.release()
    assert r.status == "stopped"  # its writer is gone: said at once, not when the store was opened


def _two_shard_run(tmp_path, commit=(0, 1)):
    """A store whose run stopped (store.json still says running) after committing `commit`."""
    w, plan = _writer_store(tmp_path, [f"i{i}" for i in range(8)], [0, 1] * 4)
    feats = np.arange(16, dtype=np.float32).reshape(8, 2)
    for k in commit:
        with ShardWriter(w.uri, k, plan.label_names) as sw:
            sh = plan.shard(k)
            sw.append(sh.ids, sh.labels, {"f": feats[4 * k:4 * k + 4]})
            if k == 1:
                sw.add_error("i9", 1, "zero-byte file")
            sw.commit()
    return w, plan, feats


def test_a_lost_sidecar_is_rebuilt_from_its_shard(tmp_path):
    w, plan, feats = _two_shard_run(tmp_path)
    os.remove(tmp_path / "st" / "shards" / "shard-00001.json")
    r = open_store(w.uri)
    assert len(r) == 8 and r.ids.tolist() == plan.ids and np.array_equal(r.features()[:], feats)
    assert sum(len(b[0]) for b in r.iter_batches(3)) == 8
    meta = w.finalize(plan)
    assert meta.num_rows == 8 and [s["rows"] for s in meta["shards"]] == [4, 4] and verify(w.uri).ok
    # a shard that cannot be read and has no sidecar: named, with the repair
    r.close()  # HDF5 would serve the open file from its own cache
    (tmp_path / "st" / "shards" / "shard-00001.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="shard-00001.h5: committed, but its sidecar shard-00001.json is gone and "
                                         "the shard cannot be read .*delete it and run the same"):
        StoreWriter.committed(w)


def test_inspect_and_verify_of_a_stopped_run(tmp_path):
    w, plan, feats = _two_shard_run(tmp_path, commit=(1,))
    info = inspect(w.uri)
    assert info["status"] == "stopped" and info["rows"] == 4 and info["shards"] == 1 and info["planned_shards"] == 2
    assert info["errors"] == 1 and info["layers"] == {"f": {"shape": [2], "dtype": "float32"}}
    assert info["unfinished"].startswith("killed or interrupted before it finished; run the same `featurestore "
                                         "extract`")
    rep = verify(w.uri)
    assert rep.problems == ["the extraction has not finished (it was stopped): 1 of 2 planned shards committed"]
    assert rep.repair.endswith("it resumes where it stopped") and rep.rows == 4
    res = CliRunner().invoke(inspect_cmd, [w.uri])
    assert "stopped: killed or interrupted before it finished" in res.output and "4 of 8 inputs (1 errors)" in res.output
    with pytest.raises(StoreError, match=r"manifest.parquet is written when the extraction finishes \(status: "
                                         r"stopped\); run the same `featurestore extract` command to finish it"):
        open_store(w.uri).manifest()


def test_damaged_tables_are_reported_and_the_reader_falls_back_to_the_shards(store, tmp_path):
    r, feats, labels, ids = store
    (tmp_path / "st" / "manifest.parquet").write_bytes(b"junk")
    rep = verify(r.uri)
    assert len(rep.problems) == 1 and rep.problems[0].startswith("manifest.parquet: unreadable (ArrowInvalid")
    assert rep.repair == (f"delete manifest.parquet from {r.uri} and run the same `featurestore extract` command "
                          "again; it rewrites the tables")
    fresh = open_store(r.uri)
    assert fresh.ids.tolist() == ids and np.array_equal(fresh.labels, labels)
    with pytest.raises(StoreError, match="manifest.parquet: unreadable .*delete it and run the same"):
        fresh.manifest()
    info = inspect(r.uri)
    assert "class_counts" not in info and "manifest.parquet: unreadable" in info["warnings"][0]
    os.remove(tmp_path / "st" / "errors.parquet")
    assert "errors.parquet: missing" in verify(r.uri).problems


def test_a_damaged_shard_read_names_the_file_and_the_repair(store, tmp_path):
    r, *_ = store
    os.remove(tmp_path / "st" / "shards" / "shard-00001.h5")
    fresh = open_store(r.uri)
    with pytest.raises(StoreError, match=r"shard-00001.h5: cannot read this shard .*featurestore verify"):
        fresh.features()[15]
    rep = verify(r.uri)
    assert rep.damaged_shards == ["shards/shard-00001.h5"]
    assert rep.repair == "run the same `featurestore extract` command again; it recomputes only those shards"

def test_a_flipped_byte_in_a_shard_fails_the_read_instead_of_returning_wrong_numbers(tmp_path):
    """Every numeric dataset carries HDF5's per-chunk fletcher32 checksum: silent bit rot in a
    feature value is an error naming the shard, on every read path, while other shards still read."""
    x = np.zeros((20, 4), np.float32)
    x[13, 2] = 1234.5  # a value whose bytes occur once in the file
    r = write_store(str(tmp_path / "st"), {"f": x}, np.arange(20) % 2, ["a", "b"], None, {}, shard_size=10)
    path = tmp_path / "st" / "shards" / "shard-00001.h5"
    with h5py.File(path, "r") as f:
        assert f["features"].fletcher32 and f["labels"].fletcher32  # plain h5py sees a standard filter
    raw = bytearray(path.read_bytes())
    at = raw.find(np.float32(1234.5).tobytes())
    assert at > 0 and raw.find(np.float32(1234.5).tobytes(), at + 1) < 0
    raw[at + 1] ^= 0x01  # 1234.5 becomes another plausible float: without a checksum nobody would notice
    path.write_bytes(bytes(raw))
    for read in (lambda s: s.features()[13], lambda s: s.features()[10:15], lambda s: s.features()[[2, 13]],
                 lambda s: s.to_numpy(), lambda s: list(s.iter_batches(batch_size=7))):
        with pytest.raises(StoreError, match=r"shard-00001.h5: cannot read this shard .*featurestore verify"):
            read(open_store(r.uri))
    np.testing.assert_array_equal(open_store(r.uri).features()[:10], x[:10])  # the healthy shard still reads
    assert verify(r.uri).damaged_shards == ["shards/shard-00001.h5"]



def test_row_indexing_refuses_what_numpy_would_read_otherwise(store):
    r, feats, *_ = store
    X, ref = r.features(), feats["layer4"]
    for bad in (1.5, [1.5, 2.7], True, None, "a", [[0, 1], [2, 3]], np.zeros((2, 2), int)):
        with pytest.raises(IndexError, match="rows are selected by an int, a slice, a 1-D list"):
            X[bad]
    with pytest.raises(IndexError, match="index in two steps"):
        X[[3, 4], [0, 1]]
    assert np.array_equal(X[...], ref) and np.array_equal(X[[3, 4]][:, [0, 1]], ref[[3, 4]][:, [0, 1]])
    assert np.array_equal(X[[3, 4], 1], ref[[3, 4], 1]) and np.array_equal(X[2:5, [0, 2]], ref[2:5, [0, 2]])
    assert X[[]].shape == (0, 6) and np.array_equal(X[np.int32(3)], ref[3])
    with pytest.raises(TypeError, match="select takes a list of ids, got the single id"):
        r.select(r.ids[0])


def test_not_a_store_says_what_the_path_is(tmp_path):
    feats, labels, ids = _data()
    for model in ("resnet18", "mobilenet_v3_small"):
        write_store(str(tmp_path / "multi" / model), feats, labels, ["cat", "dog", "eel"], ids, CONFIG)
    with pytest.raises(StoreError, match="a multi-model output holding one store per model "
                                         r"\(mobilenet_v3_small, resnet18\); open one of them"):
        open_store(str(tmp_path / "multi"))
    with pytest.raises(StoreError, match="no such folder"):
        inspect(str(tmp_path / "nowhere"))
    with pytest.raises(StoreError, match="the path is empty"):
        open_store("")


def test_shards_are_readable_by_whoever_can_read_the_store(tmp_path):
    old = os.umask(0o022)
    try:
        feats, labels, ids = _data()
        write_store(str(tmp_path / "st"), feats, labels, ["cat", "dog", "eel"], ids, CONFIG, shard_size=10)
    finally:
        os.umask(old)
    modes = {n: os.stat(tmp_path / "st" / "shards" / n).st_mode & 0o777 for n in os.listdir(tmp_path / "st" / "shards")}
    assert set(modes.values()) == {0o644}, modes


def test_tables_are_read_without_arrow_threads(store, tmp_path, monkeypatch):
    """A pyarrow reader thread alive at exit aborts the process (exit 134, apache/arrow#34314):
    about one process in three that read a table with threads crashed that way here, so every
    Parquet read of the package stays on the calling thread."""
    import pyarrow.parquet as pq

    from featurestore.sources import list_source

    calls = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda *a, **kw: calls.append(kw.get("use_threads")) or real(*a, **kw))
    r, *_ = store
    fresh = open_store(r.uri)
    fresh.manifest(), fresh.errors(), fresh.ids, inspect(r.uri), verify(r.uri)
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "m.parquet")
    list_source(str(tmp_path / "m.parquet"))
    assert len(calls) >= 6 and set(calls) == {False}, calls


def test_float16_that_loses_values_says_so(tmp_path, caplog):
    """Beyond 65504 a value becomes inf (scikit-learn refuses it later); below 6e-8 a row of
    an untrained network becomes all zeros. Both are stored as cast, and the writer warns."""
    x = np.ones((4, 3), np.float32)
    x[1, 2] = 1e6
    x[3] = 1e-9
    with caplog.at_level("WARNING", logger="featurestore.store"):
        write_store(str(tmp_path / "s"), x, [0, 1, 0, 1], ["a", "b"], dtype="float16")
    said = caplog.text
    assert "1 value(s) beyond float16's range (|x| up to 1e+06 > 65504)" in said, said
    assert "1 row(s) became all zeros in float16" in said and "--dtype float32" in said, said
    got = open_store(str(tmp_path / "s")).features()[:]
    assert np.isinf(got[1, 2]) and not got[3].any() and got[0].all()
    caplog.clear()
    with caplog.at_level("WARNING", logger="featurestore.store"):
        write_store(str(tmp_path / "t"), np.full((2, 3), 3.5, np.float32), [0, 1], ["a", "b"], dtype="float16")
    assert "float16" not in caplog.text


def test_a_weights_file_spelled_another_way_with_the_same_sha256_is_the_same_configuration(tmp_path):
    """Stores made before the engine recorded absolute paths hold `./w.pth`: the same numbers under
    another spelling resume; other numbers, or another preprocessing recipe, are still refused."""
    uri = str(tmp_path / "st")
    base = {**CONFIG, "weights": "./w.pth", "weights_sha256": "ab" * 32}
    StoreWriter(uri, base, ["cat", "dog"])
    assert StoreWriter(uri, {**base, "weights": "/models/w.pth"}, ["cat", "dog"]).resumed
    with pytest.raises(StoreConfigMismatch, match="weights_sha256"):
        StoreWriter(uri, {**base, "weights": "/models/w.pth", "weights_sha256": "cd" * 32}, ["cat", "dog"])
    with pytest.raises(StoreConfigMismatch, match=r"weights: '\./w\.pth' -> '/models/w\.pth#IMAGENET1K_V2'"):
        StoreWriter(uri, {**base, "weights": "/models/w.pth#IMAGENET1K_V2"}, ["cat", "dog"])
