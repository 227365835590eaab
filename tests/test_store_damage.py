"""Damage inside a shard's labels, ids and features, made by flipping one byte of a real file on
disk: verify names the shard, the dataset and the rows; the reader stays right or says which shard."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.cli_store import verify_cmd
from featurestore.sources import Plan
from featurestore.store import ShardWriter, StoreError, StoreWriter, open_store, verify, write_store

N = 20


def _store(tmp_path, compression=None, layers=("f",)):
    rng = np.random.default_rng(0)
    feats = {name: rng.normal(size=(N, 4)).astype(np.float32) for name in layers}
    labels = np.arange(N) % 3
    ids = [f"/data/img_{i:03d}.jpg" for i in range(N)]
    write_store(str(tmp_path / "st"), feats, labels, ["a", "b", "c"], ids, {}, shard_size=10,
                compression=compression).close()
    return str(tmp_path / "st"), feats, labels, ids


def _running_store(tmp_path, ids: list[str]):
    """A store of 8 rows in two committed shards of 4, not yet finalized: (plan, writer)."""
    plan = Plan(ids, np.array([0, 1] * 4), ["a", "b"], 4)
    w = StoreWriter(str(tmp_path / "st"), {"model": "m"}, plan.label_names)
    w.write_plan(plan)
    for k in (0, 1):
        with ShardWriter(w.uri, k, plan.label_names) as sw:
            sw.append(plan.shard(k).ids, plan.shard(k).labels, {"f": np.ones((4, 2), np.float32)})
            sw.commit()
    return plan, w


def _flip_in_chunk(path, dataset: str, at: int = 0) -> None:
    """Flip one bit of the byte `at` bytes into the first stored chunk of `dataset`."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    assert 0 <= at < info.size
    raw = bytearray(open(path, "rb").read())
    raw[info.byte_offset + at] ^= 0x01
    with open(path, "wb") as fh:
        fh.write(bytes(raw))


def _flip_text(path, text: str, at: int) -> None:
    """Flip a bit of one character of `text`, which occurs once in the file (an id in HDF5's global heap)."""
    raw = bytearray(open(path, "rb").read())
    where = raw.find(text.encode())
    assert where >= 0 and raw.find(text.encode(), where + 1) < 0
    raw[where + at] ^= 0x02
    with open(path, "wb") as fh:
        fh.write(bytes(raw))


def test_a_flipped_byte_in_a_labels_chunk_is_named_by_verify_while_reads_stay_right(tmp_path):
    uri, feats, labels, ids = _store(tmp_path)
    shard = tmp_path / "st" / "shards" / "shard-00001.h5"
    _flip_in_chunk(shard, "labels", at=8)  # row 11's label: 2 becomes another valid class
    with h5py.File(shard, "r") as f, pytest.raises(OSError, match="filter returned failure"):
        f["labels"][()]  # a plain-h5py user is stopped too, not handed a wrong label
    rep = verify(uri)
    assert not rep.ok and rep.damaged_shards == ["shards/shard-00001.h5"]
    assert rep.problems[0].startswith("shards/shard-00001.h5: checksum mismatch")
    assert rep.problems[1] == ("shards/shard-00001.h5: labels rows 0-9: its chunk checksum (fletcher32) no longer "
                               "matches: the bytes changed after they were written (Can't synchronously read data "
                               "(filter returned failure during read))")
    assert len(rep.problems) == 2  # the manifest, a healthy copy, is not blamed
    assert rep.repair == (f"delete shards/shard-00001.h5 from {uri} and run the same `featurestore extract` "
                          "command again; it recomputes only those shards")
    res = CliRunner().invoke(verify_cmd, [uri])
    assert res.exit_code == 1 and "shard-00001.h5: labels rows 0-9: its chunk checksum" in res.output
    # the reader takes a finished store's labels from the manifest (its own copy): still right
    r = open_store(uri)
    assert r.ids.tolist() == ids and r.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(r.features()[:], feats["f"])
    # what reads the shard's labels says which shard
    with pytest.raises(StoreError, match=r"shard-00001.h5: cannot read this shard .*featurestore verify"):
        list(open_store(uri).iter_batches(7))


def test_a_damaged_ids_chunk_or_id_string_is_named_by_verify(tmp_path):
    uri, _, labels, ids = _store(tmp_path)
    shard = tmp_path / "st" / "shards" / "shard-00001.h5"
    # ids are vlen strings: no checksum filter. A flipped byte in the chunk (its heap references)
    # fails the read ...
    _flip_in_chunk(shard, "ids", at=3)
    rep = verify(uri)
    assert rep.damaged_shards == ["shards/shard-00001.h5"] and len(rep.problems) == 2
    assert rep.problems[1].startswith("shards/shard-00001.h5: ids rows 0-9: cannot be read (")

    # ... one in a string itself reads as another id: the manifest, the reference copy, tells
    uri, _, labels, ids = _store(tmp_path / "b")
    shard = tmp_path / "b" / "st" / "shards" / "shard-00001.h5"
    _flip_text(shard, "/data/img_013.jpg", at=10)
    with h5py.File(shard, "r") as f:
        assert f["ids"].asstr()[3] == "/data/img_213.jpg"  # plain h5py reads a wrong id without complaint
    rep = verify(uri)
    assert rep.damaged_shards == ["shards/shard-00001.h5"]
    assert rep.problems[1:] == ["shards/shard-00001.h5: 1 row(s) differ from manifest.parquet, e.g. row 3: ids reads "
                                "'/data/img_213.jpg', manifest.parquet says '/data/img_013.jpg'"]
    assert open_store(uri).ids.tolist() == ids  # from the manifest: right


def test_a_running_stores_shard_ids_are_checked_against_their_sidecar(tmp_path):
    plan, w = _running_store(tmp_path, [f"/data/i{i:03d}.jpg" for i in range(8)])
    _flip_text(tmp_path / "st" / "shards" / "shard-00001.h5", "/data/i005.jpg", at=8)
    rep = verify(w.uri)
    assert rep.damaged_shards == ["shards/shard-00001.h5"]
    assert ("shards/shard-00001.h5: ids differ from its sidecar shard-00001.json in 1 row(s), e.g. row 1 reads "
            "'/data/i025.jpg' where the sidecar says '/data/i005.jpg'") in rep.problems


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_damaged_features_chunk_is_named_with_its_layer_and_rows(tmp_path, compression):
    uri, feats, *_ = _store(tmp_path, compression=compression, layers=("layer4", "layer3"))
    shard = tmp_path / "st" / "shards" / "shard-00000.h5"
    _flip_in_chunk(shard, "layers/layer3", at=5)
    _flip_in_chunk(shard, "layers/layer4", at=2)
    rep = verify(uri)
    assert rep.damaged_shards == ["shards/shard-00000.h5"]
    said = [p for p in rep.problems if "chunk checksum" in p]
    assert [p.split(": its")[0] for p in said] == ["shards/shard-00000.h5: layers/layer4 (= features) rows 0-9",
                                                   "shards/shard-00000.h5: layers/layer3 rows 0-9"]
    np.testing.assert_array_equal(open_store(uri).features("layer3")[10:], feats["layer3"][10:])


def test_damage_recorded_into_store_json_is_still_found(tmp_path):
    """A shard whose sidecar was lost is described from the file as it is now (its sha256
    included): verify still finds a damaged chunk in it, by reading the chunks."""
    plan, w = _running_store(tmp_path, [f"i{i}" for i in range(8)])
    _flip_in_chunk(tmp_path / "st" / "shards" / "shard-00001.h5", "labels", at=0)
    _flip_in_chunk(tmp_path / "st" / "shards" / "shard-00001.h5", "layers/f", at=0)
    os.remove(tmp_path / "st" / "shards" / "shard-00001.json")
    meta = w.finalize(plan)
    assert meta.status == "complete"  # the sidecar's stand-in took the damaged file's sha256
    rep = verify(w.uri)
    says = ": its chunk checksum (fletcher32) no longer matches: the bytes changed after they were written (Can't " \
           "synchronously read data (filter returned failure during read))"
    assert rep.problems == [f"shards/shard-00001.h5: labels rows 0-3{says}",
                            f"shards/shard-00001.h5: layers/f (= features) rows 0-3{says}"]
    assert rep.damaged_shards == ["shards/shard-00001.h5"]
    assert open_store(w.uri).labels.tolist() == [0, 1] * 4


def test_a_healthy_store_verifies_with_every_chunk_read(tmp_path):
    uri, *_ = _store(tmp_path, compression="lzf", layers=("a", "b"))
    rep = verify(uri)
    assert rep.ok and rep.problems == [] and rep.rows == N and rep.shards == 2


def _rewrite(path, dataset: str, values=None, rows: int | None = None) -> None:
    """Change a shard's dataset in place with plain h5py, as a script or a bad copy might."""
    with h5py.File(path, "r+") as f:
        ds = f[dataset]
        if rows is not None:
            ds.resize(rows, axis=0)
        if values is not None:
            ds[:len(values)] = values


def test_a_shard_whose_ids_have_another_length_is_refused_by_every_read(tmp_path):
    uri, feats, labels, ids = _store(tmp_path)
    _rewrite(tmp_path / "st" / "shards" / "shard-00001.h5", "ids", rows=7)
    says = (r"shard-00001.h5: does not match store.json \(ids has 7 rows, store.json says 10\)\. "
            r"`featurestore verify .*` lists every damaged shard; delete them and run the same `featurestore extract`")
    r = open_store(uri)  # opening reads no shard
    batches = r.iter_batches(4)
    assert len(next(batches)[0]) == 4  # shard 0 is fine
    with pytest.raises(StoreError, match=says):
        list(batches)
    for read in (lambda r: r.to_numpy(), lambda r: r.features()[12], lambda r: r.select([ids[15]]),
                 lambda r: r.torch_dataset()[10]):
        with pytest.raises(StoreError, match=says):
            read(open_store(uri))
    np.testing.assert_array_equal(open_store(uri).features()[:10], feats["f"][:10])
    rep = verify(uri)
    assert rep.damaged_shards == ["shards/shard-00001.h5"]
    assert "shards/shard-00001.h5: ids has 7 rows, store.json says 10" in rep.problems


def test_a_shard_whose_layer_has_another_length_is_refused(tmp_path):
    uri, *_ = _store(tmp_path, layers=("a", "b"))
    _rewrite(tmp_path / "st" / "shards" / "shard-00000.h5", "layers/b", rows=12)
    with pytest.raises(StoreError, match=r"shard-00000.h5: does not match store.json \(layer 'b' has shape "
                                         r"\(12, 4\), store.json says \(10, 4\)\)"):
        list(open_store(uri).iter_batches(4, layer="a"))


def test_a_shard_whose_ids_were_rewritten_is_refused_before_a_row_is_returned(tmp_path):
    uri, feats, labels, ids = _store(tmp_path)
    shard = tmp_path / "st" / "shards" / "shard-00001.h5"
    _rewrite(shard, "ids", values=[ids[11], ids[10]])  # rows 0 and 1 swapped: same length, same set of ids
    with pytest.raises(StoreError, match=r"shard-00001.h5: does not match store.json \(its ids are not those its "
                                         r"rows were committed with\)\. `featurestore verify"):
        list(open_store(uri).iter_batches(5))
    with pytest.raises(StoreError, match="its ids are not those"):
        open_store(uri).to_numpy()
    rep = verify(uri)
    assert rep.damaged_shards == ["shards/shard-00001.h5"]

    # a store written before store.json kept the ids' digest: compared with manifest.parquet, naming the row
    meta = json.loads((tmp_path / "st" / "store.json").read_text())
    for s in meta["shards"]:
        del s["ids_sha256"]
    (tmp_path / "st" / "store.json").write_text(json.dumps(meta))
    r = open_store(uri)
    np.testing.assert_array_equal(r.features()[:10], feats["f"][:10])
    with pytest.raises(StoreError, match=r"its ids are not those its rows were committed with; row 0 reads "
                                         r"'/data/img_011.jpg' where manifest.parquet says '/data/img_010.jpg'"):
        r.features()[10]


def test_a_running_stores_shard_with_rewritten_ids_is_refused(tmp_path):
    plan, w = _running_store(tmp_path, [f"/data/i{i:03d}.jpg" for i in range(8)])
    _rewrite(tmp_path / "st" / "shards" / "shard-00001.h5", "ids", values=["/data/other.jpg"])
    r = open_store(w.uri)
    assert r.status != "complete" and len(r) == 8
    with pytest.raises(StoreError, match="shard-00001.h5: does not match store.json .its ids are not those"):
        r.ids  # read from the shards while no manifest exists


def test_a_healthy_store_reads_every_shard_without_complaint_and_checks_each_once(tmp_path):
    uri, feats, labels, ids = _store(tmp_path)
    r = open_store(uri, max_open=1)  # handles closed and reopened: the check is not repeated
    for _ in range(2):
        got = list(r.iter_batches(3))
        assert np.concatenate([b[0] for b in got]).tolist() == ids
    assert r._checked == {0, 1}
    meta = json.loads((tmp_path / "st" / "store.json").read_text())
    assert [len(s["ids_sha256"]) for s in meta["shards"]] == [64, 64]


def test_a_changed_ids_digest_in_store_json_is_named_by_verify_as_the_reader_refuses_the_shard(tmp_path):
    """What the reader refuses, verify names, so its advice to run verify always leads somewhere."""
    uri, *_ = _store(tmp_path)
    meta = json.loads((tmp_path / "st" / "store.json").read_text())
    meta["shards"][1]["ids_sha256"] = "0" * 64
    (tmp_path / "st" / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="shard-00001.h5: does not match store.json"):
        open_store(uri).to_numpy()
    rep = verify(uri)
    assert rep.problems == ["shards/shard-00001.h5: its ids do not hash to store.json's ids_sha256, so readers "
                            "refuse the shard, though they agree with the manifest: store.json was changed after "
                            "the extraction"]
    assert rep.damaged_shards == ["shards/shard-00001.h5"] and rep.repair.startswith("delete shards/shard-00001.h5")
