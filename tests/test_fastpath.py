"""The fast path, on CPU: --batch-size auto, --compile, --decode gpu's tensor path, several models from one decode.

Nothing here needs a GPU: the GPU decode path runs with device="cpu" (torchvision's CPU
JPEG decoder, the same torch resize/normalise), the batch-size chooser is fed memory
numbers, and torch.compile is exercised with dynamo's quick "eager" backend and with a
backend that fails.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps

import featurestore
from featurestore.config import ConfigError, ExtractConfig, from_mapping, parse_model_values
from featurestore.decode import BadImage, decode_image, decode_image_multi
from featurestore.engine import extract
from featurestore.extractor import CPU_AUTO_BATCH, ShardExtractor, choose_batch_size
from featurestore.gpu_decode import RawImage, TensorPreprocess, decode_batch, orient, pil_decode, prepare
from featurestore.preprocess import Preprocessing
from featurestore.store import StoreError

SMALL = dict(weights="none", input_size=64, quiet=True)
GiB = 2**30
# torchvision 0.29 deprecates its decoders for TorchCodec; they work, and are what --decode gpu calls
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io.image")


class captured_log(logging.Handler):
    """Collect a logger's messages (the suite runs with -p no:logging, so no caplog)."""

    def __init__(self, name: str, level: int = logging.INFO):
        super().__init__(level)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self._old = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(min(self.level, self._old or logging.WARNING))
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self._old)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like RGB image (gradients, mild noise): what resize kernels are made for."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(xx * (3 + seed % 5) + c) * np.cos(yy * (2 + c) + seed) for c in range(3)], -1)
    return (base * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(w: int, h: int, seed: int = 0, **kw) -> bytes:
    return encode(Image.fromarray(photo(w, h, seed)), "JPEG", quality=90, **kw)


def make_images(root: Path, per_class: int = 5, classes=("cat", "dog", "panda")) -> Path:
    sizes = [(72, 56), (56, 80), (120, 90), (64, 64), (90, 60), (50, 70)]
    k = 0
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[k % len(sizes)]
            (d / f"{c}_{i:03d}.jpg").write_bytes(jpeg(w, h, seed=k))
            k += 1
    return root


def read_store(uri: str):
    reader = featurestore.open(uri)
    X, y = reader.to_numpy()
    return reader, np.asarray(X), np.asarray(y), [str(i) for i in reader.ids]


def assert_stores_equal(a: str, b: str, atol: float = 1e-5) -> None:
    ra, Xa, ya, ia = read_store(a)
    rb, Xb, yb, ib = read_store(b)
    assert ia == ib and list(ya) == list(yb)
    assert Xa.shape == Xb.shape
    np.testing.assert_allclose(Xa, Xb, atol=atol, rtol=0)
    assert ra.config == rb.config


# ---------------------------------------------------------------------------------------------
# --batch-size auto
# ---------------------------------------------------------------------------------------------
def linear_memory(fixed: float, per_image: float, oom_at: int | None = None):
    calls = []

    def measure(n):
        calls.append(n)
        if oom_at is not None and n >= oom_at:
            return None
        return int(fixed + per_image * n)

    return measure, calls


def test_batch_chooser_stops_before_the_budget_without_an_oom_trial():
    measure, calls = linear_memory(1 * GiB, 100 * 2**20)  # 1 GiB + 100 MiB per image
    n, trials = choose_batch_size(measure, budget_bytes=10 * GiB)
    assert n == 64  # 1 GiB + 64 * 100 MiB = 7.25 GiB fits; 128 (13.5 GiB) would not
    assert calls == [16, 32, 64]  # 128 is predicted not to fit: never tried
    assert all(p is not None and p <= 10 * GiB for _, p in trials)


def test_batch_chooser_backs_off_after_oom_and_respects_the_cap():
    measure, _ = linear_memory(0, 1, oom_at=128)  # tiny numbers, but the device refuses 128
    n, trials = choose_batch_size(measure, budget_bytes=1e12)
    assert n == 64 and trials[-1] == (128, None)
    measure, calls = linear_memory(0, 1)
    n, _ = choose_batch_size(measure, budget_bytes=1e12, cap=256)
    assert n == 256 and max(calls) == 256


def test_batch_chooser_halves_when_the_first_trial_does_not_fit():
    measure, calls = linear_memory(0, 1 * GiB)
    n, _ = choose_batch_size(measure, budget_bytes=3 * GiB)
    assert n == 2 and calls == [16, 8, 4, 2]
    measure, _ = linear_memory(50 * GiB, 1)
    n, trials = choose_batch_size(measure, budget_bytes=3 * GiB)
    assert n == 1 and [t for t, _ in trials] == [16, 8, 4, 2, 1]


def test_batch_size_auto_config_cli_and_cpu_default():
    cfg = from_mapping(ExtractConfig, {"source": "s", "output": "o", "batch_size": "auto"})
    assert cfg.batch_size == "auto"
    with pytest.raises(ConfigError, match="batch_size' must be int or one of 'auto'"):
        from_mapping(ExtractConfig, {"source": "s", "output": "o", "batch_size": "big"})
    from featurestore.cli import main

    res = CliRunner().invoke(main, ["extract", "src", "out", "--batch-size", "lots"])
    assert res.exit_code == 2 and "neither a number of images nor 'auto'" in res.output
    with captured_log("featurestore.extract") as logged:
        ex = ShardExtractor(featurestore.config.BackboneConfig(model="resnet18", **_bb()), "unused", ["a"],
                            batch_size="auto", torch_threads=1)
    assert ex.batch_size == CPU_AUTO_BATCH and "auto" in ex.info()["batch_note"]
    assert any("batch size auto" in m for m in logged.messages)
    ex.close()


def _bb(**kw):
    return {"weights": "none", "input_size": 64, **kw}


# ---------------------------------------------------------------------------------------------
# --compile
# ---------------------------------------------------------------------------------------------
def test_compile_failure_falls_back_to_eager_with_a_message():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("this compiler is broken")

    x = torch.randn(5, 3, 64, 64)
    bbc = featurestore.config.BackboneConfig(model="resnet18", **_bb())
    eager = ShardExtractor(bbc, "unused", ["a"], batch_size=4, torch_threads=1)
    with captured_log("featurestore.extract", logging.WARNING) as logged:
        ex = ShardExtractor(bbc, "unused", ["a"], batch_size=4, torch_threads=1, compile=True,
                            compile_backend=broken_backend)
    assert ex.compile_status.startswith("fallback to eager") and "broken" in ex.compile_status
    assert any("falling back to eager" in m for m in logged.messages)
    assert not ex.compiled
    for a, b in zip(ex.forward(x).values(), eager.forward(x).values()):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    ex.close()
    eager.close()


def test_compile_and_fold_flags_reach_the_actors(tmp_path, ray_local, monkeypatch):
    # dynamo's "eager" backend traces in seconds; inductor on 2 CPU cores takes over a minute
    monkeypatch.setenv("FEATURESTORE_COMPILE_BACKEND", "eager")
    src = make_images(tmp_path / "src", per_class=3)
    out = str(tmp_path / "store")
    res = extract(ExtractConfig(source=str(src), output=out, model="resnet18", shard_size=5, batch_size=4,
                                compile=True, fold_batchnorm=False, actors=1, **SMALL))
    assert res.ok and res.rows == 9
    assert all(a["compile"] == "on (backend eager)" for a in res.actor_info)
    assert all(a["fold"] == "batchnorm not folded" for a in res.actor_info)
    _, X, _, ids = read_store(out)  # 9 rows in shards of 5: the short last batches were padded
    bb = featurestore.load_backbone("resnet18", weights="none", input_size=64)
    ref = bb.extract([decode_image(Path(i).read_bytes(), i, draft_size=bb.preprocessing.draft_size) for i in ids])
    np.testing.assert_allclose(X, ref[bb.layers[0]], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# --decode gpu: the tensor path, run on the CPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_tensors_equals_pil(orientation):
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encode(img, "PNG", exif=exif.tobytes())))))
    got = orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == ref.shape and np.array_equal(got, ref)


@pytest.mark.parametrize("crop", ["center", "squash", "pad"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_tensor_preprocess_within_three_levels_of_pil(crop, interpolation):
    """Same geometry as the PIL transform; torch's antialiased resize differs by a few 8-bit levels at most."""
    pre = Preprocessing(input_size=(56, 56), resize_size=64, crop=crop, interpolation=interpolation, decode="full")
    tp = TensorPreprocess(pre)
    std = torch.tensor(pre.std).view(3, 1, 1)
    for i, (w, h) in enumerate([(160, 120), (90, 130), (300, 200), (40, 30), (64, 64)]):
        data = jpeg(w, h, seed=i)
        a = pre(decode_image(data))
        (img,) = decode_batch([prepare(data)], "cpu")
        b = tp([img])[0]
        assert a.shape == b.shape == (3, 56, 56)
        levels = ((a - b).abs() * std * 255).max().item()
        assert levels <= 3.01, (w, h, levels)


def test_lanczos_is_refused_clearly():
    with pytest.raises(ValueError, match="lanczos.*--decode draft"):
        TensorPreprocess(Preprocessing(interpolation="lanczos"))


def test_gpu_decode_features_within_tolerance_of_pil():
    """The stated tolerance: features of the tensor path vs PIL's full decode (resnet18, random init)."""
    bb = featurestore.load_backbone("resnet18", weights="none", input_size=64, decode="full")
    tp = TensorPreprocess(bb.preprocessing)
    datas = [jpeg(w, h, seed=i) for i, (w, h) in enumerate([(160, 120), (90, 130), (300, 200), (64, 64), (500, 375)])]
    a = torch.stack([bb.preprocess(decode_image(d)) for d in datas])
    b = tp(decode_batch([prepare(d) for d in datas], "cpu"))
    fa, fb = bb(a)[bb.layers[0]], bb(b)[bb.layers[0]]
    assert torch.nn.functional.cosine_similarity(fa, fb).min() >= 0.999
    assert (fa - fb).abs().max() <= 0.01 * fa.abs().max()


def test_what_the_device_decoder_gets_and_what_falls_back():
    rgb = Image.fromarray(photo(40, 30))
    assert prepare(jpeg(40, 30)).device_ok
    gray = prepare(encode(rgb.convert("L"), "JPEG"))
    assert gray.device_ok
    (g,) = decode_batch([gray], "cpu")
    assert g.shape == (3, 30, 40) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    # non-JPEG and CMYK: decoded by PIL in the reading thread, same pixels as the PIL path
    for data in (encode(rgb, "PNG"), encode(rgb.convert("CMYK"), "JPEG")):
        raw = prepare(data, "x")
        assert not raw.device_ok and raw.image is not None
        assert np.array_equal(raw.image.permute(1, 2, 0).numpy(), np.asarray(decode_image(data)))
    # an EXIF-rotated JPEG: decoded on the device, then turned like PIL turns it
    exif = rgb.getexif()
    exif[0x0112] = 6
    rot = prepare(encode(rgb, "JPEG", quality=95, exif=exif.tobytes()))
    assert rot.device_ok and rot.orientation == 6
    (r,) = decode_batch([rot], "cpu")
    assert r.shape == (3, 40, 30)
    # unusable inputs: the same reasons as the PIL path
    full = jpeg(80, 60)
    for data, word in ((b"", "zero-byte"), (b"not an image at all", "not an image"),
                       (full[: len(full) // 2], "truncated")):
        with pytest.raises(BadImage, match=word):
            prepare(data, "bad.jpg")
    with pytest.raises(BadImage, match="bomb"):  # over the pixel limit: never sent to the device
        prepare(jpeg(80, 60), "big.jpg", max_pixels=1000)


def test_decode_batch_isolates_what_the_decoder_rejects():
    good = [prepare(jpeg(40 + 8 * i, 30, seed=i), f"g{i}.jpg") for i in range(3)]
    png = encode(Image.fromarray(photo(24, 20)), "PNG")
    # a decoder refusal, simulated: inputs marked for the device decoder that it cannot take
    rejected = RawImage("odd.png", png, True, encoded=torch.frombuffer(bytearray(png), dtype=torch.uint8))
    garbage = RawImage("junk.jpg", b"\xff\xd8junk" * 10, True,
                       encoded=torch.frombuffer(bytearray(b"\xff\xd8junk" * 10), dtype=torch.uint8))
    out = decode_batch([good[0], rejected, good[1], garbage, good[2]], "cpu")
    assert [type(o).__name__ for o in out] == ["Tensor", "Tensor", "Tensor", "BadImage", "Tensor"]
    assert torch.equal(out[1], pil_decode(png, "odd.png", 10**8))  # the PIL fallback, in its place
    assert [o.shape[-1] for o in (out[0], out[2], out[4])] == [40, 48, 56]  # order kept
    assert "not an image" in out[3].reason


def write_bad_and_odd_inputs(src: Path) -> dict[str, str]:
    """Unusable inputs (name -> reason word) and usable odd ones (PNG, CMYK, rotated) in class dog."""
    d = src / "dog"
    (d / "zero.jpg").write_bytes(b"")
    (d / "notimage.jpg").write_text("this is a text file with an image extension")
    good = jpeg(80, 60, seed=7)
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (d / "corrupt.jpg").write_bytes(good[:180] + b"garbage" * 40)
    rgb = Image.fromarray(photo(70, 50, seed=3))
    (d / "odd_png.png").write_bytes(encode(rgb, "PNG"))
    (d / "odd_cmyk.jpg").write_bytes(encode(rgb.convert("CMYK"), "JPEG", quality=95))
    exif = rgb.getexif()
    exif[0x0112] = 8
    (d / "odd_rotated.jpg").write_bytes(encode(rgb, "JPEG", quality=95, exif=exif.tobytes()))
    return {"zero.jpg": "zero-byte", "notimage.jpg": "not an image", "truncated.jpg": "truncated",
            "corrupt.jpg": ""}


def test_decode_gpu_without_cuda_runs_the_tensor_path_in_the_engine(tmp_path, ray_local):
    src = make_images(tmp_path / "src", per_class=4)
    expected = write_bad_and_odd_inputs(src)
    out = str(tmp_path / "store")
    res = extract(ExtractConfig(source=str(src), output=out, model="resnet18", shard_size=6, decode="gpu",
                                batch_size="auto", **SMALL))
    assert res.ok and res.rows == 12 + 3
    assert all(a["decode"] == "gpu" and a["batch_size"] == CPU_AUTO_BATCH for a in res.actor_info)
    reader, X, y, ids = read_store(out)
    assert reader.config["preprocessing"]["decode"] == "gpu"
    for i, lab in zip(ids, y):
        assert Path(i).parent.name == reader.label_names[lab], "a label moved onto another image"
    errors = {Path(e["id"]).name: e for e in reader.errors().to_pylist()}
    assert set(errors) == set(expected)
    for name, word in expected.items():
        assert word in errors[name]["reason"] and reader.label_names[errors[name]["label"]] == "dog"
    # every usable row within the stated tolerance of the PIL path (full decode)
    bb = featurestore.load_backbone("resnet18", weights="none", input_size=64, decode="full")
    ref = bb.extract([decode_image(Path(i).read_bytes(), i) for i in ids])[bb.layers[0]]
    cos = (X * ref).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999 and np.abs(X - ref).max() <= 0.01 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# Several models from one decode
# ---------------------------------------------------------------------------------------------
def test_decode_once_per_scale_equals_single_decodes():
    data = jpeg(1024, 768, seed=1)
    requests = [(64, 64), (72, 72), (300, 300), None]  # scales 8, 8, 2 and full
    images = decode_image_multi(data, "x.jpg", draft_sizes=requests)
    assert images[0] is images[1]  # one decode for the two models at the same DCT scale
    assert images[0].size == (128, 96) and images[2].size == (512, 384) and images[3].size == (1024, 768)
    for req, img in zip(requests, images):
        assert np.array_equal(np.asarray(img), np.asarray(decode_image(data, draft_size=req)))
    with pytest.raises(BadImage, match="zero-byte"):
        decode_image_multi(b"", "z.jpg", draft_sizes=requests)


def test_model_keyed_values_syntax():
    models = ["resnet18", "mobilenet_v3_small"]
    assert parse_model_values([], models, "--weights") is None
    assert parse_model_values(["none"], models, "--weights") == "none"
    assert parse_model_values(["none", "resnet18=/w/r18.pth"], models, "--weights") == \
        {"resnet18": "/w/r18.pth", "*": "none"}
    # a spec with '=' that is not keyed by a model stays whole (URL query strings)
    assert parse_model_values(["s3://b/w.pt?version=3"], models, "--weights") == "s3://b/w.pt?version=3"
    assert parse_model_values(["layer3", "mobilenet_v3_small=features.3"], models, "--layer", multiple=True) == \
        {"mobilenet_v3_small": ["features.3"], "*": ["layer3"]}
    with pytest.raises(ConfigError, match="'resnet50' is not one of the models"):
        parse_model_values(["resnet50=none"], models, "--weights")
    with pytest.raises(ConfigError, match="given twice"):
        parse_model_values(["resnet18=none", "resnet18=DEFAULT"], models, "--weights")
    cfg = ExtractConfig(source="s", output="o", model=models, weights={"resnet18": "none"})
    assert [b.weights for b in cfg.backbones()] == ["none", "DEFAULT"]
    assert cfg.outputs() == ["o/resnet18", "o/mobilenet_v3_small"]
    with pytest.raises(ConfigError, match="names 'resnet18' twice"):
        ExtractConfig(source="s", output="o", model=["resnet18", "resnet18"]).backbones()
    with pytest.raises(ConfigError, match="'vgg16'.*not among the models"):
        ExtractConfig(source="s", output="o", model=models, weights={"vgg16": "none"}).backbones()
    from featurestore.cli import main

    res = CliRunner().invoke(main, ["extract", "src", "out", "--model", "resnet18", "--model", "mobilenet_v3_small",
                                    "--weights", "vgg16=none"])
    assert res.exit_code == 2 and "'vgg16' is not one of the models" in res.output


def test_two_models_one_decode_equal_single_runs_and_resume_recomputes_only_the_missing(tmp_path, ray_local):
    src = make_images(tmp_path / "src", per_class=4)
    (src / "dog" / "zero.jpg").write_bytes(b"")  # a bad input lands in every store's errors
    models = ["resnet18", "mobilenet_v3_small"]
    out = tmp_path / "multi"
    common = dict(source=str(src), shard_size=5, batch_size=4, input_size=64, quiet=True)
    res = extract(ExtractConfig(output=str(out), model=models, weights={"*": "none"}, **common))
    assert res.ok and res.shards == 3 and sorted(res.computed_shards) == [0, 1, 2]
    assert res.stores == {m: str(out / m) for m in models}
    assert sorted(p.name for p in out.iterdir()) == sorted(models)
    singles = {}
    for m in models:
        singles[m] = str(tmp_path / f"single-{m}")
        extract(ExtractConfig(output=singles[m], model=m, weights="none", **common))
        assert_stores_equal(str(out / m), singles[m])
        assert [e["id"] for e in featurestore.open(str(out / m)).errors().to_pylist()][0].endswith("zero.jpg")

    # one store loses a shard: the resume computes that shard for that store only
    mob = out / "mobilenet_v3_small" / "shards"
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/shards/shard-*.h5")}
    (mob / "shard-00001.h5").unlink()
    again = extract(ExtractConfig(output=str(out), model=models, weights="none", **common))
    assert again.computed_shards == [1] and sorted(again.skipped_shards) == [0, 2]
    after = {p: p.stat().st_mtime_ns for p in out.glob("*/shards/shard-*.h5")}
    changed = [p for p in after if after[p] != before.get(p)]
    assert changed == [mob / "shard-00001.h5"]
    for m in models:
        assert_stores_equal(str(out / m), singles[m])
        assert featurestore.verify(str(out / m)).ok
    # a re-run computes nothing
    assert extract(ExtractConfig(output=str(out), model=models, weights="none", **common)).computed_shards == []

    # --append grows every store by the same new shard
    old_plan = (out / "mobilenet_v3_small" / "plan.parquet").read_bytes()
    Image.fromarray(np.full((56, 72, 3), 90, np.uint8)).save(src / "cat" / "late.jpg")
    grown = extract(ExtractConfig(output=str(out), model=models, weights="none", append=True, **common))
    assert grown.computed_shards == [3] and [len(featurestore.open(str(out / m))) for m in models] == [13, 13]
    # stopped between the stores' plans: one store still holds the old plan; a plain re-run finishes it
    (out / "mobilenet_v3_small" / "plan.parquet").write_bytes(old_plan)
    (mob / "shard-00003.h5").unlink()
    again = extract(ExtractConfig(output=str(out), model=models, weights="none", **common))
    assert again.computed_shards == [3]
    for m in models:
        reader = featurestore.open(str(out / m))
        assert len(reader) == 13 and str(reader.ids[-1]).endswith("late.jpg") and featurestore.verify(str(out / m)).ok
    # several models cannot write into a single-model store
    with pytest.raises(StoreError, match="single-model store"):
        extract(ExtractConfig(output=singles["resnet18"], model=models, weights="none", **common))
