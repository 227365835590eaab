"""Decoding and preprocessing: every input mode becomes the same kind of tensor, deterministically."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.decode import BadImage, decode_image, load_image
from featurestore.preprocess import Preprocessing


def _photo(w=96, h=64, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    return Image.fromarray((base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8), "RGB")


def _bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


PRE = Preprocessing(input_size=(32, 32), resize_size=36)


def test_grayscale_equals_rgb_replication():
    gray = _photo().convert("L")
    rgb = Image.merge("RGB", [gray, gray, gray])
    a = PRE(decode_image(_bytes(gray, "PNG")))
    b = PRE(decode_image(_bytes(rgb, "PNG")))
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "I;16", "LA", "1", "F"])
def test_every_mode_becomes_rgb(mode):
    src = _photo()
    if mode == "I;16":
        arr = (np.asarray(src.convert("L")).astype(np.uint16) * 257)
        img, fmt = Image.fromarray(arr), "PNG"  # uint16 -> mode I;16, saved as 16-bit PNG
    elif mode == "F":
        img, fmt = Image.fromarray(np.asarray(src.convert("L"), np.float32) / 255.0, "F"), "TIFF"
    elif mode == "CMYK":
        img, fmt = src.convert("CMYK"), "JPEG"
    elif mode == "P":
        img, fmt = src.convert("P", palette=Image.ADAPTIVE), "PNG"
    else:
        img, fmt = src.convert(mode), "PNG"
    out = decode_image(_bytes(img, fmt), f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == src.size
    t = PRE(out)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32 and torch.isfinite(t).all()
    if mode == "I;16":  # 16-bit scaled back to 8-bit, not clipped to white
        assert np.abs(np.asarray(out)[..., 0].astype(int) - np.asarray(src.convert("L")).astype(int)).max() <= 1


def test_rgba_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = decode_image(_bytes(img, "PNG"))
    assert np.asarray(out).min() == 255


def test_exif_orientation_is_applied():
    src = _photo(96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_bytes(src, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (64, 96)
    plain = decode_image(_bytes(src, "JPEG", quality=95))
    assert np.abs(np.asarray(out, int) - np.asarray(plain.transpose(Image.Transpose.ROTATE_270), int)).mean() < 1
    assert PRE(out).shape == (3, 32, 32)


def test_same_file_gives_identical_tensor(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(_bytes(_photo(), "JPEG"))
    a = PRE(load_image(str(p), draft_size=PRE.draft_size))
    b = PRE(load_image(str(p), draft_size=PRE.draft_size))
    assert torch.equal(a, b)


@pytest.mark.parametrize("data,reason", [
    (b"", "zero-byte"),
    (b"this is not an image at all", "not an image"),
])
def test_bad_inputs(data, reason):
    with pytest.raises(BadImage) as err:
        decode_image(data, "bad.jpg")
    assert reason in err.value.reason and "bad.jpg" in str(err.value)


def test_truncated_and_corrupt():
    data = _bytes(_photo(256, 256), "JPEG")
    with pytest.raises(BadImage) as err:
        decode_image(data[: len(data) // 2], "half.jpg")
    assert "truncated" in err.value.reason
    png = _bytes(_photo(64, 64), "PNG")
    with pytest.raises(BadImage):
        decode_image(png[:40] + b"\x00" * 30 + png[70:], "corrupt.png")


def test_load_image_names_a_missing_or_unreadable_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg: no such file"):
        load_image(str(tmp_path / "nope.jpg"))
    with pytest.raises(BadImage, match=r"not a regular file but a folder"):
        load_image(str(tmp_path))


def test_a_host_that_does_not_answer_is_unreachable_not_vanished():
    """fsspec's HTTP filesystem turns a refused connection into FileNotFoundError; the reason
    must still say what happened, for a single image and in an extraction's errors."""
    import socket

    from featurestore.extractor import DecodePlan, decode_one

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/a.jpg"
    with pytest.raises(BadImage, match=r"a\.jpg: cannot reach it: Cannot connect to host 127\.0\.0\.1"):
        load_image(url)
    got = decode_one(0, url, 1, DecodePlan("pil", (lambda im: im,)))
    assert got.reason.startswith("unreachable: Cannot connect to host 127.0.0.1") and got.label == 1


def test_decompression_bomb_guard():
    data = _bytes(Image.new("L", (1000, 1000)), "PNG")
    with pytest.raises(BadImage) as err:
        decode_image(data, "big.png", max_pixels=500_000)
    assert "decompression bomb" in err.value.reason
    assert decode_image(data, "big.png", max_pixels=2_000_000).size == (1000, 1000)


def test_jpeg_draft_mode_scales_by_dct_but_keeps_enough_pixels():
    data = _bytes(_photo(1600, 1200), "JPEG")
    full = decode_image(data)
    small = decode_image(data, draft_size=(256, 256))
    assert full.size == (1600, 1200)
    assert 256 <= min(small.size) < 1200 and small.size[0] * 3 == small.size[1] * 4
    assert (PRE(full) - PRE(small)).abs().mean() < 0.1  # same picture


def test_preprocessing_crops_and_draft_sizes():
    img = _photo(120, 60)
    for crop in ("center", "squash", "pad"):
        p = Preprocessing(input_size=(32, 48), resize_size=40, crop=crop)
        assert p(img).shape == (3, 32, 48)
    assert Preprocessing(input_size=(224, 224), resize_size=256).draft_size == (256, 256)
    assert Preprocessing(input_size=(224, 224), crop="squash").draft_size == (224, 224)
    assert Preprocessing(decode="full").draft_size is None
    pad = Preprocessing(input_size=(32, 32), resize_size=32, crop="pad")(img)
    assert torch.allclose(pad[:, 0, :], torch.zeros(3, 32), atol=0.02)  # padding normalises to ~0
    p = Preprocessing.from_crop_pct(224, 0.875, interpolation="bicubic")
    assert p.resize_size == 256
    assert p.with_input_size(112).input_size == (112, 112) and p.with_input_size(112).resize_size == 128
    d = json.loads(json.dumps(p.to_dict()))
    assert Preprocessing.from_dict(d) == p
    with pytest.raises(ValueError, match="crop"):
        Preprocessing(crop="zoom")


def test_both_bomb_guards_say_the_same_thing():
    from featurestore.decode import _bomb, _pil_count

    data = _bytes(Image.new("L", (1001, 1000)), "PNG")
    with pytest.raises(BadImage) as err:
        decode_image(data, "big.png", max_pixels=1_000_000)
    assert err.value.reason == "decompression bomb: 1001x1000 = 1,001,000 pixels, over the limit of 1,000,000 (max_image_pixels)"
    # PIL's own guard (at twice its limit) gives only a count; the wording stays ours
    pil = Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit of 200000000 pixels, could be ...")
    assert _bomb(100_000_000, _pil_count(pil)) == ("decompression bomb: 400,000,000 pixels, over the limit of "
                                                  "100,000,000 (max_image_pixels)")
