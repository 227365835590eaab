"""The extraction engine with real parts: a real Ray instance, real HDF5 shards, real models."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featurestore
from featurestore.config import EXTRACT_NUMBERS, ConfigError, ExtractConfig
from featurestore.engine import ExtractError, extract

MODEL = "resnet18"
SMALL = dict(model=MODEL, weights="none", input_size=64, batch_size=8, quiet=True)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def make_images(root: Path, per_class: int = 6, classes=("cat", "dog", "panda"), size=(72, 56)) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{c}_{i:03d}.jpg", quality=90)
    return root


def reference_features(ids: list[str], model=MODEL, input_size=64, layer=None, **load) -> np.ndarray:
    """Features from a plain single-process loop over the public backbone API."""
    from featurestore.decode import decode_image

    bb = featurestore.load_backbone(model, weights="none", input_size=input_size,
                                    layers=[layer] if layer else None, **load)
    bb.eval()
    draft = bb.preprocessing.draft_size
    xs = [bb.preprocess(decode_image(Path(i).read_bytes(), i, draft_size=draft)) for i in ids]
    with torch.inference_mode():
        out = bb(torch.stack(xs).contiguous(memory_format=torch.channels_last))
    (name,) = bb.layers if layer is None else (layer,)
    return out[name].float().numpy()


def read_store(uri: str):
    reader = featurestore.open(uri)
    X, y = reader.to_numpy()
    return reader, np.asarray(X), np.asarray(y), [str(i) for i in reader.ids]


def test_features_equal_single_process_reference(tmp_path, ray_local):
    src = make_images(tmp_path / "src", per_class=5)
    out = str(tmp_path / "store")
    result = extract(ExtractConfig(source=str(src), output=out, shard_size=4, **SMALL))
    assert result.ok and result.rows == 15 and result.shards == 4
    assert all(a["fold"] == "20/20 batchnorms folded" for a in result.actor_info)  # the default
    reader, X, y, ids = read_store(out)
    assert len(reader) == 15
    assert reader.label_names == ["cat", "dog", "panda"]
    # ids and labels aligned row by row: the folder names the label
    for i, lab in zip(ids, y):
        assert Path(i).parent.name == reader.label_names[lab]
    assert ids == sorted(ids)
    ref = reference_features(ids)
    assert X.shape == ref.shape == (15, 512)
    np.testing.assert_allclose(X, ref, atol=1e-5, rtol=0)
    # each shard alone is a PyImageSearch-style file readable with plain h5py
    shard0 = sorted((Path(out) / "shards").glob("shard-*.h5"))[0]
    with h5py.File(shard0, "r") as f:
        assert f["features"].shape == (4, 512)
        assert list(f["labels"][:]) == list(y[:4])
        assert [s.decode() if isinstance(s, bytes) else s for s in f["label_names"][:]] == ["cat", "dog", "panda"]
        assert len(f["ids"]) == 4


def test_bf16_on_cpu_actors_is_the_bf16_reference_and_part_of_the_request(tmp_path, ray_local):
    """--precision bf16 on CPU actors (twice as fast on CPUs with AVX512-BF16 or AMX): the actors' features
    are a bf16 forward pass's, not fp32's; a store of them is not resumed by an fp32 request; and an fp32
    run on such a CPU says what bf16 would give."""
    from featurestore.backbones import cpu_has_native_bf16

    src = make_images(tmp_path / "src", per_class=3)
    out = str(tmp_path / "store")
    hint = "compute bf16 natively"
    res = extract(ExtractConfig(source=str(src), output=out, shard_size=5, **dict(SMALL, precision="bf16")))
    assert res.ok and all(a["precisions"] == ["bf16"] for a in res.actor_info)
    assert hint not in res.summary()  # already asked for
    reader, X, y, ids = read_store(out)
    assert reader.config["precision"] == "bf16" and X.dtype == np.float32
    as_actors = dict(fold_batchnorm=True, channels_last=True)
    bf16, fp32 = (reference_features(ids, precision=p, **as_actors) for p in ("bf16", "fp32"))
    scale = np.abs(fp32).max()
    # the same bf16 pass (here bit for bit; a little room for kernels picked by batch size), and not fp32's:
    # bf16 keeps 8 bits of mantissa, which moved these random-weights features by about 1% of their scale
    assert np.abs(X - bf16).max() <= 1e-3 * scale
    assert 2e-3 * scale < np.abs(X - fp32).max() < 0.05 * scale
    with pytest.raises(Exception, match="precision"):
        extract(ExtractConfig(source=str(src), output=out, shard_size=5, **SMALL))
    res = extract(ExtractConfig(source=str(src), output=out, shard_size=5, overwrite=True, **SMALL))
    assert res.ok and featurestore.open(out).config["precision"] == "fp32"
    assert all(a["native_bf16"] == cpu_has_native_bf16() for a in res.actor_info)
    assert (hint in res.summary()) == cpu_has_native_bf16(), res.summary()


def test_two_layers_one_pass_and_rerun_is_a_noop(tmp_path, ray_local):
    src = make_images(tmp_path / "src", per_class=3)
    out = str(tmp_path / "store")
    cfg = ExtractConfig(source=str(src), output=out, shard_size=5, layers=["layer3", "avgpool"], **SMALL)
    first = extract(cfg)
    assert first.ok and sorted(first.computed_shards) == [0, 1]
    reader = featurestore.open(out)
    assert set(reader.layers) == {"layer3", "avgpool"}
    assert reader.features("layer3").shape == (9, 256)
    assert reader.features("avgpool").shape == (9, 512)
    again = extract(cfg)
    assert again.computed_shards == [] and sorted(again.skipped_shards) == [0, 1]
    assert again.actors == 0  # complete, same request: decided from store.json, no actor started
    assert featurestore.verify(out).ok
    # Another library version might give other numbers: the actors' resolved configuration decides.
    meta_path = Path(out) / "store.json"
    meta = json.loads(meta_path.read_text())
    meta["request"]["versions"]["torchvision"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    checked = extract(cfg)
    assert checked.actors > 0 and checked.computed_shards == []
    assert extract(cfg).actors == 0  # the request was stored again by the full run
    # Weights from a file can change under the same name: never decided without the actors' hash.
    from featurestore import engine
    from featurestore.store import StoreWriter

    plan = StoreWriter.existing_plan(out)
    file_cfg = ExtractConfig(source=str(src), output=out, shard_size=5, layers=["layer3", "avgpool"],
                             **dict(SMALL, weights=str(tmp_path / "w.pth")))
    requests = [engine._request(file_cfg, b) for b in file_cfg.backbones()]
    meta = json.loads(meta_path.read_text())
    assert engine._already_complete(cfg, plan, [out], [meta["request"]], None) is not None
    meta["request"] = requests[0]
    meta_path.write_text(json.dumps(meta))
    assert engine._already_complete(file_cfg, plan, [out], requests, None) is None


def test_other_configuration_refused_unless_overwrite(tmp_path, ray_local):
    src = make_images(tmp_path / "src", per_class=2)
    out = str(tmp_path / "store")
    extract(ExtractConfig(source=str(src), output=out, shard_size=4, **SMALL))
    other = dict(SMALL, pooling="max")
    with pytest.raises(Exception, match="pooling"):
        extract(ExtractConfig(source=str(src), output=out, shard_size=4, **other))
    res = extract(ExtractConfig(source=str(src), output=out, shard_size=4, overwrite=True, **other))
    assert res.ok and featurestore.open(out).config["pooling"] == "max"


def test_new_images_are_refused_then_appended_as_new_shards(tmp_path, ray_local, caplog):
    import dataclasses

    src = make_images(tmp_path / "src", per_class=3)
    out = tmp_path / "store"
    cfg = ExtractConfig(source=str(src), output=str(out), shard_size=4, **SMALL)
    assert extract(cfg).shards == 3
    shard_bytes = {p.name: p.read_bytes() for p in (out / "shards").glob("*.h5")}
    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        Image.fromarray(rng.integers(0, 256, (56, 72, 3), dtype=np.uint8)).save(src / c / f"{c}_new.jpg")

    # A silent resume would leave the new images out of a "complete" store: refused, nothing touched.
    with pytest.raises(ExtractError, match="2 image.*--append"):
        extract(cfg)
    from click.testing import CliRunner

    from featurestore.cli import main
    cli = CliRunner().invoke(main, ["extract", str(src), str(out), "--model", MODEL, "--weights", "none",
                                    "--input-size", "64", "-q"])
    assert cli.exit_code == 2 and "--append to add them" in cli.output, cli.output
    assert len(featurestore.open(str(out))) == 9

    grown = extract(dataclasses.replace(cfg, append=True))
    assert grown.ok and grown.computed_shards == [3] and grown.skipped_shards == [0, 1, 2]
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.h5") if p.name in shard_bytes} == shard_bytes
    reader, X, y, ids = read_store(str(out))
    assert len(reader) == 11 and ids[9:] == [str(src / "cat" / "cat_new.jpg"), str(src / "dog" / "dog_new.jpg")]
    assert [reader.label_names[k] for k in y[9:]] == ["cat", "dog"]
    np.testing.assert_allclose(X, reference_features(ids), atol=1e-5)
    import pyarrow.parquet as pq
    assert pq.read_table(out / "manifest.parquet").column("shard").to_pylist()[8:] == [2, 3, 3]
    assert featurestore.verify(str(out)).ok
    assert extract(cfg).computed_shards == []  # the grown plan is the store's plan now

    # New classes cannot be appended: label ids come from the first run's sorted class names.
    make_images(src, per_class=1, classes=("bird",))
    with pytest.raises(ExtractError, match="bird.*--overwrite"):
        extract(dataclasses.replace(cfg, append=True))
    import shutil
    shutil.rmtree(src / "bird")
    # A deleted image is only a warning: its row stays.
    (src / "cat" / "cat_000.jpg").unlink()
    with caplog.at_level("WARNING", logger="featurestore.extract"):
        again = extract(cfg)
    assert again.ok and again.computed_shards == [] and len(featurestore.open(str(out))) == 11
    assert "1 of the store's 11 planned inputs are no longer in" in caplog.text


def test_torchvision_weights_offline_or_unknown_fail_before_any_actor(tmp_path, ray_local, monkeypatch):
    """Enum weights are resolved (and fetched) in the driver while Ray starts: a plain error, no actor."""
    import urllib.error

    import torchvision.models._api as api
    from click.testing import CliRunner

    from featurestore.cli import main

    def offline(url, *a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    src = make_images(tmp_path / "src", per_class=1)
    out = tmp_path / "store"
    base = ["extract", str(src), str(out), "--model", MODEL, "--input-size", "64", "-q"]
    r = CliRunner().invoke(main, base + ["--weights", "IMAGENET1K_V1"])
    assert r.exit_code == 2, r.output
    assert "could not get torchvision weights" in r.output and "resnet18-f37072fd.pth" in r.output
    r = CliRunner().invoke(main, base + ["--weights", "IMAGENET9"])
    assert r.exit_code == 2 and "unknown weights 'IMAGENET9'" in r.output and "IMAGENET1K_V1" in r.output
    assert not (out / "shards").exists()  # nothing was written


def test_unlistable_sources_are_plain_errors(tmp_path, ray_local):
    """A folder without images or a manifest that is not a table: exit 2, one line, no traceback."""
    from click.testing import CliRunner

    from featurestore.cli import main

    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "bad.csv").write_bytes(b"path,label\na.jpg,cat\nb.jpg\n")  # a row with one column of two
    for src, said in (("empty", "no images found"), ("bad.parquet", "not a readable Parquet manifest"),
                      ("bad.csv", "not a readable CSV manifest")):
        out = tmp_path / f"store-{src}"
        r = CliRunner().invoke(main, ["extract", str(tmp_path / src), str(out), "--model", MODEL, "--weights",
                                      "none", "-q"])
        assert r.exit_code == 2 and said in r.output and r.exception.__class__ is SystemExit, (r.output, r.exception, src)
        assert not (out / "shards").exists()
    r = CliRunner().invoke(main, ["extract"])
    assert r.exit_code == 2 and "missing SOURCE and OUTPUT: pass them as arguments" in r.output, r.output
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "missing OUTPUT: pass it as an argument, or set output:" in r.output, r.output


def test_verify_names_a_damaged_shard_and_a_rerun_repairs_it(tmp_path, ray_local):
    """The repair verify suggests: delete the damaged shard file, run the same extraction again."""
    from click.testing import CliRunner

    from featurestore.cli import main

    src = make_images(tmp_path / "src", per_class=4)
    out = tmp_path / "store"
    cfg = ExtractConfig(source=str(src), output=str(out), shard_size=4, **SMALL)
    extract(cfg)
    before = read_store(str(out))[1]
    damaged = out / "shards" / "shard-00001.h5"
    with h5py.File(damaged, "r+") as f:
        f["features"][0, 0] = 123.0
    report = featurestore.verify(str(out))
    assert not report.ok and report.damaged_shards == ["shards/shard-00001.h5"]
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and "To repair: delete shards/shard-00001.h5" in r.output, r.output
    damaged.unlink()
    assert extract(cfg).computed_shards == [1]
    assert featurestore.verify(str(out)).ok
    np.testing.assert_allclose(read_store(str(out))[1], before, atol=1e-6, rtol=0)
    # a damaged table: deleted as verify says, the same command writes it again and computes nothing
    (out / "manifest.parquet").write_bytes(b"junk")
    assert featurestore.verify(str(out)).repair.startswith("delete manifest.parquet from")
    (out / "manifest.parquet").unlink()
    again = extract(cfg)
    assert again.computed_shards == [] and len(again.skipped_shards) == 3 and featurestore.verify(str(out)).ok


@pytest.mark.parametrize("field,value,said", [
    ("batch_size", 0, "--batch-size must be a whole number >= 1 or 'auto', got 0; leave it out for the default"),
    ("shard_size", 0, "--shard-size must be a whole number of rows >= 1, got 0; leave it out for the default"),
    ("actors", 0, "--actors must be a whole number >= 1, got 0"),
    ("actors", 1.5, "--actors must be a whole number >= 1, got 1.5"),
    ("cpus_per_actor", 0, "--cpus-per-actor must be a number above 0, got 0"),
    ("gpus_per_actor", -1, "--gpus-per-actor must be a number >= 0 (0: CPU actors), got -1"),
    ("decode_threads", 0, "--decode-threads must be a whole number >= 1"),
    ("max_retries", -1, "--max-retries must be a whole number >= 0"),
    ("max_image_pixels", 0, "max_image_pixels must be a whole number >= 1, got 0"),
    ("input_size", 0, "--input-size must be a whole number of pixels >= 1, got 0"),
])
def test_placement_numbers_out_of_range_are_refused_before_ray_starts(tmp_path, field, value, said):
    src = make_images(tmp_path / "src", per_class=1)
    with pytest.raises(ExtractError, match=re.escape(said)):
        extract(ExtractConfig(source=str(src), output=str(tmp_path / "store"), **{**SMALL, field: value}))
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("row", EXTRACT_NUMBERS, ids=lambda r: r[0])
def test_the_engine_and_job_specs_check_numbers_from_one_table(row):
    """config.EXTRACT_NUMBERS is the one list of ranges: the engine says it with the command's flag
    (a flag `featurestore extract` has), a job spec with its field, in the same words."""
    from featurestore.cli_extract import extract as extract_command
    from featurestore.engine import _check_numbers
    from jobs.specs import _check_numbers as spec_check

    name, ok, what = row
    assert not ok(-1) and not ok(True)
    cfg = ExtractConfig(source="s", output="o", **{name: -1})
    with pytest.raises(ExtractError) as engine_err:
        _check_numbers(cfg)
    with pytest.raises(ConfigError) as spec_err:
        spec_check("extract", cfg, "spec.yaml")
    flags = {opt for p in extract_command.params for opt in p.opts}
    flag = "--" + name.replace("_", "-")
    said = str(engine_err.value)
    assert said == f"{flag if flag in flags else name} must be {what}, got -1; leave it out for the default"
    assert flag in flags or name == "max_image_pixels"  # a field without a flag is said by its name
    assert str(spec_err.value) == f"spec.yaml: field 'config.{name}' must be {what}, got -1; leave it out for the default"


def test_a_backbone_that_cannot_load_is_one_message_not_a_worker_crash_dump(tmp_path):
    """Weights at a URL are read where the model is built, in the actors (the driver does not download
    them): a file there that is no checkpoint is said once (exit 2), without the actor's traceback or
    Ray's report of a dying worker. (A layer typo no longer gets this far: the driver refuses it.)"""
    import functools
    import http.server
    import threading

    src = make_images(tmp_path / "src", per_class=1)
    served = tmp_path / "served"
    served.mkdir()
    (served / "garbage.pth").write_bytes(b"not a checkpoint")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/garbage.pth"
    out = tmp_path / "store"
    try:
        res = subprocess.run(_cli("extract", str(src), str(out), "--model", MODEL, "--weights", url,
                                  "--input-size", "64", "--quiet"),
                             capture_output=True, text=True, timeout=300, env={**os.environ, "TORCH_HOME": str(tmp_path)})
    finally:
        server.shutdown()
    assert res.returncode == 2, res.stderr[-3000:]
    assert "the backbone could not be loaded on a worker: WeightsError:" in res.stderr, res.stderr[-3000:]
    assert "garbage.pth" in res.stderr, res.stderr[-3000:]
    for noise in ("Traceback", "Stack trace", "creation task"):
        assert noise not in res.stderr, res.stderr[-3000:]
    assert not (out / "shards").exists() or not list((out / "shards").iterdir())


def test_a_layer_typo_is_one_message_from_the_driver(tmp_path):
    src = make_images(tmp_path / "src", per_class=1)
    out = tmp_path / "store"
    res = subprocess.run(_cli("extract", str(src), str(out), "--model", MODEL, "--weights", "none", "--input-size",
                              "64", "--layer", "layer9", "--quiet"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "resnet18 has no layer 'layer9'; closest:" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "worker" not in res.stderr, res.stderr[-3000:]
    assert not out.exists()


def test_an_output_that_is_a_file_is_one_line_before_ray_starts(tmp_path):
    """OUT (or a folder on its way) an existing plain file: said plainly, exit 2, the file untouched."""
    src = make_images(tmp_path / "src", per_class=1)
    (tmp_path / "notes.txt").write_text("keep me")
    for out, said in ((tmp_path / "notes.txt", f"{tmp_path / 'notes.txt'} is a file, not a folder; choose another "
                                                "output"),
                      (tmp_path / "notes.txt" / "store", f"{tmp_path / 'notes.txt' / 'store'}: "
                                                         f"{tmp_path / 'notes.txt'} is a file, not a folder")):
        for models in (["--model", MODEL], ["--model", MODEL, "--model", "mobilenet_v3_small"]):
            res = subprocess.run(_cli("extract", str(src), str(out), *models, "--weights", "none", "--input-size",
                                      "64"), capture_output=True, text=True, timeout=300)
            assert res.returncode == 2 and said in res.stderr, res.stderr[-3000:]
            assert res.stderr.count("\n") == 1 and "starting Ray" not in res.stderr, res.stderr[-3000:]
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_source_given_as_output_is_refused_before_ray_starts(tmp_path):
    """A folder of other files as OUTPUT (here SOURCE itself): one line before Ray starts, and the
    folder is left as it was (no lease file)."""
    src = make_images(tmp_path / "src", per_class=1)
    before = sorted(p.name for p in src.rglob("*"))
    res = subprocess.run(_cli("extract", str(src), str(src), "--model", MODEL, "--weights", "none", "--input-size",
                              "64"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{src} exists, is not empty and holds no store.json; refusing to write into it" in res.stderr
    assert res.stderr.count("\n") == 1 and "starting Ray" not in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in src.rglob("*")) == before


def test_fp16_on_cpu_actors_is_warned(tmp_path):
    """fp16 autocast has no fast CPU kernels: the run goes on (it is the user's choice) but says so."""
    src = make_images(tmp_path / "src", per_class=1)
    out = tmp_path / "store"
    res = subprocess.run(_cli("extract", str(src), str(out), "--model", MODEL, "--weights", "none", "--input-size",
                              "32", "--precision", "fp16", "--quiet"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--precision fp16 on CPU actors" in res.stderr and "use bf16 or fp32" in res.stderr, res.stderr[-3000:]
    assert len(featurestore.open(str(out))) == 3


def test_an_actor_that_cannot_load_raises_on_every_call(tmp_path):
    from featurestore.config import BackboneConfig
    from featurestore.engine import BackboneLoadError, ExtractorActor

    actor = ExtractorActor(BackboneConfig(model=MODEL, weights="none", layers=("layer9",)), str(tmp_path / "s"), [])
    assert actor.poll() == (0, 0)
    for call in (actor.configs, actor.info, lambda: actor.process(None)):
        with pytest.raises(BackboneLoadError, match="UnknownLayerError: resnet18 has no layer 'layer9'"):
            call()


def write_bad_inputs(src: Path) -> dict[str, str]:
    """Every kind of unusable input, each beside good images; returns name -> expected reason word."""
    bad = src / "dog"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notimage.jpg").write_text("this is a text file with an image extension")
    good = io.BytesIO()
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(good, format="JPEG")
    (bad / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    data = bytearray(good.getvalue())
    data[200:400] = b"\x00" * 200
    (bad / "corrupt.jpg").write_bytes(bytes(data[:180]) + b"garbage" * 40)
    Image.new("L", (1200, 1000)).save(bad / "bomb.png")  # 1.2 Mpx > the 1 Mpx limit used below
    os.symlink(bad / "loop.jpg", bad / "loop.jpg")  # unreadable (ELOOP), even as root
    return {"zero.jpg": "", "notimage.jpg": "", "truncated.jpg": "", "corrupt.jpg": "", "bomb.png": "bomb",
            "loop.jpg": ""}


def test_bad_inputs_are_reported_and_skipped_labels_stay_right(tmp_path, ray_local):
    src = make_images(tmp_path / "src", per_class=4)
    expected = write_bad_inputs(src)
    # the bad inputs below, and a manifest naming a missing file
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path / "store")
    res = extract(ExtractConfig(source=str(src), output=out, shard_size=5, max_image_pixels=1_000_000, **SMALL))
    assert res.ok
    reader, X, y, ids = read_store(out)
    assert len(reader) == 12  # 3 classes x 4 good images
    for i, lab in zip(ids, y):
        assert Path(i).parent.name == reader.label_names[lab], "a label moved onto another image"
    errors = reader.errors().to_pylist()
    by_name = {Path(e["id"]).name: e for e in errors}
    assert set(by_name) == set(expected)
    assert "bomb" in by_name["bomb.png"]["reason"].lower()
    assert all(e["reason"] for e in errors)
    assert all(reader.label_names[e["label"]] == "dog" for e in errors)
    manifest = reader.manifest().to_pylist()
    assert len(manifest) == 12 + len(expected)
    assert sum(1 for m in manifest if m["status"] == "ok") == 12
    # features of the good images equal the reference: nothing shifted
    np.testing.assert_allclose(X, reference_features(ids), atol=1e-5, rtol=0)

    # a manifest names a file that does not exist (or vanished after listing)
    paths = [str(p) for p in sorted((src / "cat").glob("*.jpg"))]
    table = pa.table({"path": paths + [str(src / "cat" / "gone.jpg")], "label": ["cat"] * (len(paths) + 1)})
    pq.write_table(table, tmp_path / "list.parquet")
    res2 = extract(ExtractConfig(source=str(tmp_path / "list.parquet"), output=str(tmp_path / "s2"),
                                 shard_size=8, **SMALL))
    errs = featurestore.open(str(tmp_path / "s2")).errors().to_pylist()
    assert [Path(e["id"]).name for e in errs] == ["gone.jpg"] and errs[0]["reason"] == "no such file"
    assert res2.rows == len(paths)


def test_strict_stops_at_first_bad_input(tmp_path, ray_local):
    src = make_images(tmp_path / "src", per_class=2)
    (src / "dog" / "zero.jpg").write_bytes(b"")
    with pytest.raises(ExtractError, match="zero.jpg"):
        extract(ExtractConfig(source=str(src), output=str(tmp_path / "store"), strict=True, **SMALL))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "featurestore", *args]


def _extract_cmd(src, out, shard_size: int) -> list[str]:
    return _cli("extract", str(src), str(out), "--model", MODEL, "--weights", "none", "--input-size", "64",
                "--batch-size", "4", "--shard-size", str(shard_size), "--quiet")


def _store_equal(a: str, b: str) -> None:
    ra, Xa, ya, ia = read_store(a)
    rb, Xb, yb, ib = read_store(b)
    assert ia == ib and list(ya) == list(yb)
    np.testing.assert_allclose(Xa, Xb, atol=1e-5, rtol=0)
    assert len(set(ia)) == len(ia), "a row was duplicated"


# Tests that stop a job midway: 30 shards of 4 images leave work to stop after the first ones are
# committed (with 9, a job on a faster CPU once finished before its actor was found to kill).
RACE_PER_CLASS, RACE_SHARDS = 40, 30


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_driver_killed_midway_then_resumed(tmp_path, ray_local):
    src = make_images(tmp_path / "src", per_class=RACE_PER_CLASS)
    full = tmp_path / "full"
    extract(ExtractConfig(source=str(src), output=str(full), shard_size=4, **SMALL))

    out = tmp_path / "store"
    proc = subprocess.Popen(_extract_cmd(src, out, 4), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    shards = out / "shards"
    while time.time() < deadline:
        if shards.exists() and len(list(shards.glob("shard-*.h5"))) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("the extraction finished before it could be killed; make the test input larger")
        time.sleep(0.05)
    _kill_tree(proc)
    # Ray's worker processes live in their own process groups and notice the driver's
    # death a moment later; a shard they were committing may still land. Wait until
    # the store is quiet, then take what is committed as "before".
    before: dict[str, int] = {}
    quiet_since = time.time()
    while time.time() - quiet_since < 3 and time.time() < deadline + 30:
        now = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.h5")}
        if now != before:
            before, quiet_since = now, time.time()
        time.sleep(0.2)
    assert 2 <= len(before) < RACE_SHARDS, before
    stopped = featurestore.open(str(out))  # its lease file is left behind, its pid is gone
    assert (out / ".writer.json").exists() and stopped.status == "stopped" and len(stopped) == 4 * len(before)

    res = subprocess.run(_cli("extract", str(src), str(out), "--model", MODEL, "--weights", "none",
                              "--input-size", "64", "--batch-size", "4", "--shard-size", "4"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.h5")}
    assert len(after) == RACE_SHARDS
    for name, mtime in before.items():
        assert after[name] == mtime, f"{name} was computed twice"
    assert f"{len(before)} already committed" in res.stderr
    _store_equal(str(full), str(out))
    assert featurestore.verify(str(out)).ok


def _stop_when_committed(proc: subprocess.Popen, shards: Path, more_than: int, sig: int) -> tuple[int, str]:
    """Send `sig` to the driver alone once more than `more_than` shards are committed."""
    deadline = time.time() + 180
    while time.time() < deadline:
        if shards.exists() and len(list(shards.glob("shard-*.h5"))) > more_than:
            break
        if proc.poll() is not None:
            pytest.fail("the extraction finished before it could be stopped; make the test input larger")
        time.sleep(0.05)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail(f"the driver did not stop within 120 s of signal {sig}")
    return proc.returncode, err


def test_sigterm_and_ctrl_c_stop_cleanly_then_resume(tmp_path, ray_local):
    """A scheduler's SIGTERM and a user's Ctrl-C: actors stopped, a message saying what was
    kept, the shell's exit code, nothing half-written; the next run finishes the store."""
    src = make_images(tmp_path / "src", per_class=RACE_PER_CLASS)
    full = tmp_path / "full"
    extract(ExtractConfig(source=str(src), output=str(full), shard_size=4, **SMALL))
    out = tmp_path / "store"
    shards = out / "shards"
    cmd = _cli("extract", str(src), str(out), "--model", MODEL, "--weights", "none", "--input-size", "64",
               "--batch-size", "2", "--shard-size", "4", "--quiet")
    committed = 0
    for sig, code, name in ((signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")):
        # A shell without job control starts background commands with SIGINT ignored, and an
        # ignored signal stays ignored through exec: a test run launched that way (`cmd &`)
        # would hand the driver a Ctrl-C it cannot receive. Give it the terminal's disposition.
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        rc, err = _stop_when_committed(proc, shards, committed, sig)
        assert rc == code, (rc, err[-3000:])
        said = re.search(rf"interrupted by {name} with (\d+) of {RACE_SHARDS} shards committed \((\d+) in this run\); "
                         rf"committed shards are kept in {re.escape(str(out))}\. Run the same command", err)
        assert said, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        now = len(list(shards.glob("shard-*.h5")))
        assert committed < int(said.group(1)) <= now < RACE_SHARDS and int(said.group(2)) >= 1
        assert not (out / "manifest.parquet").exists()  # an interrupted run never finalizes
        assert featurestore.open(str(out)).status == "stopped"
        committed = now

    res = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{committed} already committed" in res.stderr
    _store_equal(str(full), str(out))
    assert featurestore.verify(str(out)).ok


def test_second_extraction_on_a_busy_output_is_refused_before_any_worker_starts(tmp_path, ray_local):
    from featurestore.lease import LEASE_FILE, StoreBusy

    src = make_images(tmp_path / "src", per_class=2)
    out = tmp_path / "store"
    hold = "import sys, time; from featurestore.lease import WriterLease; WriterLease(sys.argv[1]).acquire(); " \
           "print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusy, match=f"being written by another extraction \\(pid {holder.pid}"):
            extract(ExtractConfig(source=str(src), output=str(out), **SMALL))
        assert not (out / "shards").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    res = extract(ExtractConfig(source=str(src), output=str(out), **SMALL))  # the holder died: taken over
    assert res.rows == 6 and not (out / LEASE_FILE).exists()


def _actor_pids() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "ray::ExtractorActor"], capture_output=True, text=True)
    return {int(p) for p in found.stdout.split()}


def test_actor_killed_midway_store_complete_and_exact(tmp_path, ray_local):
    # an actor busy with a shard, or idle between two, is killed once the first shard is committed
    src = make_images(tmp_path / "src", per_class=RACE_PER_CLASS)
    full = tmp_path / "full"
    extract(ExtractConfig(source=str(src), output=str(full), shard_size=4, **SMALL))

    out = tmp_path / "store"
    before = _actor_pids()  # actors of this process's Ray are not the subprocess's
    proc = subprocess.Popen(_cli("extract", str(src), str(out), "--model", MODEL, "--weights", "none",
                                 "--input-size", "64", "--batch-size", "2", "--shard-size", "4"),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    deadline = time.time() + 180
    while time.time() < deadline and not killed:
        if (out / "shards").exists() and list((out / "shards").glob("shard-*.h5")):
            pids = sorted(_actor_pids() - before)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = True
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        _kill_tree(proc)
    assert killed, "no extractor actor was found to kill"
    assert proc.returncode == 0, output[-3000:]
    assert "worker died" in output
    _store_equal(str(full), str(out))
    assert featurestore.verify(str(out)).ok


def test_plans_of_a_multi_model_job_agree_shard_for_shard():
    from featurestore.engine import _plan_extends, _plans_agree
    from featurestore.sources import Plan

    def plan(n, extra=0):
        p = Plan([f"/r/c/{i}.jpg" for i in range(n)], np.zeros(n), ["c"], 5)
        return p.appended([f"/r/c/new{i}.jpg" for i in range(extra)], np.zeros(extra)) if extra else p

    assert _plans_agree(plan(9), plan(9)) and _plan_extends(plan(9), plan(9))
    assert _plan_extends(plan(9, extra=2), plan(9)) and not _plans_agree(plan(9, extra=2), plan(9))
    # one more row in the last shard is another plan, not an append that reached one store only
    assert not _plan_extends(plan(10), plan(9)) and not _plans_agree(plan(10), plan(9))
    assert not _plan_extends(plan(9), plan(9, extra=2))


def test_the_summary_points_at_skipped_inputs_only_when_there_are_some():
    from featurestore.engine import ExtractResult

    clean = ExtractResult(store="s", rows=900, inputs=900, errors=0).summary()
    assert "rows:     900 of 900 inputs (none skipped)" in clean and "errors.parquet" not in clean
    bad = ExtractResult(store="s", rows=897, inputs=900, errors=3).summary()
    assert "897 of 900 inputs (3 skipped: `featurestore inspect` counts the reasons, errors.parquet lists each)" in bad


def test_cpu_placement_prefers_thin_actors_and_honours_overrides():
    from featurestore.engine import plan_placement

    cfg = ExtractConfig(source="unused", output="unused")
    two = plan_placement(cfg, {"CPU": 2.0}, num_shards=10)
    assert (two.actors, two.num_cpus, two.num_gpus, two.torch_threads, two.decode_threads) == (2, 1.0, 0.0, 1, 1)
    eight = plan_placement(cfg, {"CPU": 8.0}, num_shards=10)
    assert (eight.actors, eight.torch_threads) == (4, 2)
    big = plan_placement(cfg, {"CPU": 64.0}, num_shards=100)
    assert (big.actors, big.torch_threads) == (16, 4)
    # never more actors than shards to give them
    assert plan_placement(cfg, {"CPU": 64.0}, num_shards=3).actors == 3
    # explicit sizes win: one fat actor, or a given count splitting the cores
    fat = plan_placement(ExtractConfig(source="u", output="u", cpus_per_actor=2), {"CPU": 2.0}, 10)
    assert (fat.actors, fat.torch_threads, fat.decode_threads) == (1, 2, 2)
    split = plan_placement(ExtractConfig(source="u", output="u", actors=2, decode_threads=3), {"CPU": 8.0}, 10)
    assert (split.actors, split.torch_threads, split.decode_threads) == (2, 4, 3)
    gpu = plan_placement(cfg, {"CPU": 16.0, "GPU": 2.0}, num_shards=10)
    assert (gpu.actors, gpu.num_gpus, gpu.num_cpus) == (2, 1.0, 8.0)
    # more than the cluster holds: refused (Ray would wait for the missing CPUs or GPUs forever)
    with pytest.raises(ExtractError, match="--actors 3 x 1 CPU.s. each needs 3 CPUs, but the Ray cluster has 2"):
        plan_placement(ExtractConfig(source="u", output="u", actors=3, cpus_per_actor=1), {"CPU": 2.0}, 10)
    with pytest.raises(ExtractError, match="needs 3 GPUs, but the cluster has 2"):
        plan_placement(ExtractConfig(source="u", output="u", actors=3), {"CPU": 16.0, "GPU": 2.0}, 10)


def test_default_shard_size_gives_every_actor_work():
    from featurestore.engine import auto_shard_size

    assert auto_shard_size(900, 2) == 225  # four shards: two per actor, not one shard for one actor
    assert auto_shard_size(100_000, 8) == 1024  # large inputs keep the full default
    assert auto_shard_size(5_000, 8) == 313
    assert auto_shard_size(10, 4) == 64  # never tiny shards
    assert auto_shard_size(0, 1) == 64


def test_small_input_without_shard_size_is_spread_over_the_actors(tmp_path, ray_local, monkeypatch):
    import featurestore.engine as engine

    monkeypatch.setattr(engine, "MIN_AUTO_SHARD_SIZE", 2)  # the driver decides; 18 images stand for 900
    src = make_images(tmp_path / "src", per_class=6)
    out = str(tmp_path / "store")
    result = extract(ExtractConfig(source=str(src), output=out, actors=2, cpus_per_actor=1, **SMALL))
    assert result.ok and result.actors == 2
    assert (result.shards, result.rows) == (4, 18)  # 18 rows / (2 actors x 2 shards) -> shards of 5
    reader = featurestore.open(out)
    assert reader.meta["shard_size"] == 5 and len(reader) == 18
    assert len({i["pid"] for i in result.actor_info}) == 2
    # a resume reads the stored plan, whatever the default would say now
    monkeypatch.setattr(engine, "MIN_AUTO_SHARD_SIZE", 64)
    again = extract(ExtractConfig(source=str(src), output=out, actors=2, cpus_per_actor=1, **SMALL))
    assert again.computed_shards == [] and again.shards == 4


def test_the_driver_never_imports_torch(tmp_path):
    """Importing torch and torchvision takes seconds; a job's driver needs neither (its actors do)."""
    src = make_images(tmp_path / "src", per_class=2)
    code = f"""
import sys
import ray
import featurestore
from featurestore.config import ExtractConfig
from featurestore.engine import ExtractorActor, preflight
from featurestore.sources import list_source, make_plan
from featurestore.store import StoreReader, StoreWriter, verify
from featurestore.lease import WriterLease
import featurestore.cli_extract, jobs.specs
cfg = ExtractConfig(source={str(src)!r}, output="unused", model="resnet18", weights="none")
assert preflight(cfg.backbones()[0]) is None
enum_check = preflight(ExtractConfig(source="s", output="o", model="resnet18").backbones()[0])
assert callable(enum_check)  # torchvision weights: checked later, in a thread while Ray starts
make_plan(list_source(cfg.source), 4)
ray.remote(ExtractorActor)
featurestore.UnknownLayerError, featurestore.ExtractError
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_an_embedded_instance_stops_its_autoscaler_monitor_before_ray_stops_the_gcs():
    """At exit Ray stops the GCS before the autoscaler monitor, which then waited a second on it before being
    killed: a second on every command that started Ray. The monitor of an embedded instance goes first."""
    code = """
import atexit, sys
import ray
from ray._private import ray_constants, worker
from featurestore import engine

def seen():  # registered before connect's handler, so it runs after it and before Ray's own
    node = worker._global_node
    alive = lambda kind: [i.process.poll() is None for i in node.all_processes.get(kind, [])]
    print("monitor", alive(ray_constants.PROCESS_TYPE_MONITOR), "gcs", alive(ray_constants.PROCESS_TYPE_GCS_SERVER),
          flush=True)

atexit.register(seen)
assert engine.connect(None, num_cpus=1)
print("monitor was", [i.process.poll() is None for i in
                      worker._global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]], flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-2:] == ["monitor was [True]", "monitor [False] gcs [True]"], out.stdout
    assert "autoscaler failed" not in out.stderr, out.stderr[-3000:]


def test_progress_counts_each_shard_once(tmp_path):
    """poll() covers the running shard only: the driver already counted the committed ones."""
    from featurestore.config import BackboneConfig
    from featurestore.extractor import ShardExtractor
    from featurestore.sources import list_source, make_plan

    src = make_images(tmp_path / "src", per_class=3)
    (src / "cat" / "cat_000.jpg").write_bytes(b"not a jpeg")
    plan = make_plan(list_source(str(src)), 5)
    ex = ShardExtractor(BackboneConfig(model=MODEL, weights="none", input_size=64), str(tmp_path / "store"),
                        plan.label_names, batch_size=4, torch_threads=1)
    try:
        first = ex.process(plan.shard(0))
        assert (first.rows, len(first.errors)) == (4, 1) and ex.poll() == (5, 1)
        ex.process(plan.shard(1))
        assert ex.poll() == (4, 0)  # not 9: the first shard is not counted again
    finally:
        ex.close()


def _refused_address() -> str:
    """host:port of a loopback port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_an_address_no_cluster_answers_at_is_refused_at_once(tmp_path):
    """ray.init retries an unreachable GCS address for minutes, silently; extract and train say so at once."""
    src = make_images(tmp_path / "src", per_class=1)
    address = _refused_address()
    t0 = time.monotonic()
    res = subprocess.run(_cli("extract", str(src), str(tmp_path / "store"), "--model", MODEL, "--weights", "none",
                              "--address", address, "--quiet"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"no Ray cluster answers at {address} (--address): connection refused" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "store").exists()
    env = dict(os.environ, RAY_ADDRESS=address)  # a stale RAY_ADDRESS in the shell: named as the culprit
    res = subprocess.run(_cli("extract", str(src), str(tmp_path / "store"), "--model", MODEL, "--weights", "none",
                              "--quiet"), capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and f"no Ray cluster answers at {address} (RAY_ADDRESS)" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 60  # not Ray's minutes of retries


@pytest.mark.parametrize("address, said", [
    ("http://head:8265", "is a dashboard (Jobs API) address"),
    ("s3://bucket", "not a Ray address"),
    ("head", "give HOST:PORT"),
    ("head:port", "give HOST:PORT"),
])
def test_malformed_addresses_say_which_form_to_give(address, said):
    from featurestore.engine import ClusterUnreachable, _probe

    with pytest.raises(ClusterUnreachable, match=re.escape(said)):
        _probe(address, "--address")
    _probe("auto", "--address")  # Ray's own words, left to Ray


def test_extract_config_takes_a_job_spec_as_submit_sends_it(tmp_path, ray_local):
    """`extract --config` reads a flat mapping of fields or a whole job spec (job: extract)."""
    import yaml
    from click.testing import CliRunner

    from featurestore.cli import main

    src = make_images(tmp_path / "src", per_class=2)
    fields = {"source": str(src), "model": MODEL, "weights": "none", "input_size": 64, "quiet": True}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "job": "extract", "runtime": {"env": []},
                                    "config": {**fields, "output": str(tmp_path / "a")}}))
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({**fields, "output": str(tmp_path / "b")}))
    for path, out in ((spec, "a"), (flat, "b")):
        r = CliRunner().invoke(main, ["extract", "--config", str(path)])
        assert r.exit_code == 0, r.output
        assert len(featurestore.open(str(tmp_path / out))) == 6
    np.testing.assert_array_equal(featurestore.open(str(tmp_path / "a")).to_numpy()[0],
                                  featurestore.open(str(tmp_path / "b")).to_numpy()[0])
    spec.write_text(yaml.safe_dump({"job": "train", "config": {"store": str(tmp_path / "a")}}))
    r = CliRunner().invoke(main, ["extract", "--config", str(spec)])
    assert r.exit_code == 2 and "this is a 'train' job spec; run it with `featurestore submit" in r.output, r.output


def test_a_relative_output_lands_where_the_driver_looks(tmp_path, ray_local, monkeypatch):
    """Workers keep the folder Ray started in; the driver moved since. A relative OUTPUT is
    resolved by the driver, so the shards are where the store is (once, they went elsewhere
    and the run reported a complete store of 0 rows)."""
    src = make_images(tmp_path / "src", per_class=2)
    monkeypatch.chdir(tmp_path)
    res = extract(ExtractConfig(source=str(src), output="rel/store", shard_size=3, **SMALL))
    assert res.ok and res.rows == 6 and res.store == "rel/store"
    assert len(list((tmp_path / "rel" / "store" / "shards").glob("*.h5"))) == 2
    assert featurestore.verify(str(tmp_path / "rel" / "store")).ok


def test_a_dashboard_port_given_as_the_gcs_address_is_named():
    """host:port of an HTTP server (the dashboard, 8265) instead of the GCS (6379): ray.init
    would wait on it for minutes; the probe hears HTTP/1 and says which port was meant."""
    import http.server
    import threading

    from featurestore.engine import ClusterUnreachable, _probe

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ClusterUnreachable, match="answers in HTTP: it is a dashboard"):
            _probe(f"127.0.0.1:{server.server_port}", "--address")
    finally:
        server.shutdown()


def test_a_relative_weights_file_is_recorded_absolute_and_any_spelling_of_it_resumes(tmp_path, ray_local,
                                                                                    monkeypatch):
    """Weights given as `w.pth` resolved by the driver (a worker elsewhere would not find it, and a
    head trained from another folder would not either); `./w.pth` or the absolute path is the same
    file (same sha256), so a re-run resumes instead of being refused as another configuration."""
    from torchvision.models import resnet18

    src = make_images(tmp_path / "src", per_class=2)
    torch.manual_seed(1)
    torch.save(resnet18().state_dict(), tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    kw = {**SMALL, "weights": "w.pth"}
    first = extract(ExtractConfig(source=str(src), output="st", shard_size=3, **kw))
    meta = json.loads((tmp_path / "st" / "store.json").read_text())
    assert first.ok and meta["config"]["weights"] == str(tmp_path / "w.pth")
    for spelling in ("./w.pth", str(tmp_path / "w.pth")):
        again = extract(ExtractConfig(source=str(src), output="st", shard_size=3, **{**kw, "weights": spelling}))
        assert again.ok and again.rows == 6 and len(again.skipped_shards) == 2  # nothing computed twice
    torch.save(resnet18().state_dict(), tmp_path / "other.pth")  # another file: other numbers, refused
    from featurestore.store import StoreConfigMismatch

    with pytest.raises(StoreConfigMismatch, match="weights_sha256"):
        extract(ExtractConfig(source=str(src), output="st", shard_size=3, **{**kw, "weights": "other.pth"}))


def test_an_output_planned_from_other_images_is_refused_even_with_append(tmp_path):
    """A store given another source (a wrong OUTPUT, or the images moved) is not a source that grew:
    appending would mix two image sets in one store. Refused before Ray starts, naming both."""
    from featurestore.sources import list_source, make_plan
    from featurestore.store import StoreWriter

    first = make_images(tmp_path / "first", per_class=2)
    other = make_images(tmp_path / "other", per_class=2)
    out = tmp_path / "store"
    StoreWriter(str(out), {"model": MODEL}, ["cat", "dog", "panda"]).write_plan(make_plan(list_source(str(first)), 4))
    for append in (False, True):
        cfg = ExtractConfig(source=str(other), output=str(out), append=append, **SMALL)
        with pytest.raises(ExtractError, match=rf"{out} is a store of other images: none of its 6 planned inputs "
                                               rf"\(first: {first}/cat/cat_000.jpg\) is in {other}\. Choose a new "
                                               r"output .* or pass --overwrite"):
            extract(cfg)
    assert StoreWriter.existing_plan(str(out)).num_shards == 2  # untouched
