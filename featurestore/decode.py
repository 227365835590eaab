"""Turn image bytes into a fully loaded RGB PIL image, or a BadImage with a short reason.

Large jobs meet every kind of broken input; one bad file must become one row in
errors.parquet, never a crashed actor, so every failure is a BadImage whose
`.reason` is short enough to store. JPEG draft mode (DCT scaling) decodes big
photos at 1/2, 1/4 or 1/8 size when the model needs far fewer pixels: decoding is
where extraction spends its time.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BadImage", "decode_image", "decode_image_multi", "draft_scale", "load_image"]

# EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


class BadImage(Exception):
    """An input that cannot be used as an image; `.reason` is a short, storable explanation."""

    def __init__(self, reason: str, name: str = "<bytes>"):
        self.reason = reason
        self.name = name
        super().__init__(f"{name}: {reason}")


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every mode to 3-channel RGB: grayscale replicated, alpha composited on white, 16-bit scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data (PNG/TIFF): scale 0..65535 to 0..255; 32-bit int images clip.
        top = 65535.0 if arr.size == 0 or arr.max() <= 65535 else float(arr.max())
        arr8 = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        arr8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        img = img.convert("L")
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV ...


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    *,
    draft_size: tuple[int, int] | None = None,
    max_pixels: int = 100_000_000,
) -> Image.Image:
    """Decode `data` into an RGB image with EXIF orientation applied and pixels loaded.

    draft_size=(w, h) lets JPEG decoding scale down by DCT so the result stays at least
    (w, h) after orientation. Images above `max_pixels` are refused before decoding.
    """
    if data is None or len(data) == 0:
        raise BadImage("zero-byte file", name)
    if max_pixels and Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        # PIL's own guard would refuse (or warn about) images that our limit allows.
        Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own guard, at twice MAX_IMAGE_PIXELS
        raise BadImage(_bomb(max_pixels or 2 * (Image.MAX_IMAGE_PIXELS or 0), _pil_count(exc)), name) from None
    except UnidentifiedImageError:
        raise BadImage("not an image", name) from None
    except Exception as exc:  # corrupt headers raise all sorts of things
        raise BadImage(f"unreadable: {type(exc).__name__}: {exc}"[:200], name) from None
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise BadImage(_bomb(max_pixels, w * h, f"{w}x{h}"), name)
    if w <= 0 or h <= 0:
        raise BadImage(f"empty image ({w}x{h})", name)
    fmt = img.format or "image"
    try:
        orientation = _exif_orientation(img)
        if draft_size is not None and fmt == "JPEG":
            dw, dh = int(draft_size[0]), int(draft_size[1])
            if orientation in _TRANSPOSED:
                dw, dh = dh, dw
            img.draft(img.mode, (dw, dh))
        img.load()
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
            raise BadImage(f"truncated {fmt}", name) from None
        raise BadImage(f"unreadable {fmt}: {msg}"[:200], name) from None
    except Exception as exc:
        raise BadImage(f"unreadable {fmt}: {type(exc).__name__}: {exc}"[:200], name) from None
    try:
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img.load()
    except Exception as exc:
        raise BadImage(f"cannot convert {fmt} ({img.mode}): {exc}"[:200], name) from None
    return img


def draft_scale(size: tuple[int, int], request: tuple[int, int] | None) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's JPEG draft picks for an image of `size` asked for `request`."""
    if request is None:
        return 1
    scale = min(int(size[0]) // max(1, int(request[0])), int(size[1]) // max(1, int(request[1])))
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


def decode_image_multi(
    data: bytes,
    name: str = "<bytes>",
    *,
    draft_sizes: list[tuple[int, int] | None],
    max_pixels: int = 100_000_000,
) -> list[Image.Image]:
    """decode_image for several draft requests at once (one per model), decoding as rarely as possible.

    A JPEG is decoded once per distinct DCT scale the requests lead to -- in practice once,
    since models of similar input sizes land on the same scale -- and every request gets
    exactly the pixels decode_image(data, draft_size=request) would give it alone, so a
    multi-model extraction equals single-model ones. Raises BadImage like decode_image.
    """
    requests = list(draft_sizes)
    if not requests:
        return []
    keys: list[object] = list(requests)
    if len(set(requests)) > 1 and any(r is not None for r in requests):
        try:  # header only: the size and orientation decide the scale
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                head = Image.open(io.BytesIO(data))
            if head.format == "JPEG":
                w, h = head.size
                swap = _exif_orientation(head) in _TRANSPOSED
                keys = ["full" if r is None else
                        draft_scale((w, h), (r[1], r[0]) if swap else (r[0], r[1])) for r in requests]
            else:
                keys = ["any"] * len(requests)  # draft applies to JPEGs only
        except Exception:
            pass  # decode_image below reports what is wrong with it
    decoded: dict[object, Image.Image] = {}
    out = []
    for key, request in zip(keys, requests):
        if key not in decoded:
            decoded[key] = decode_image(data, name, draft_size=request, max_pixels=max_pixels)
        out.append(decoded[key])
    return out


def _bomb(max_pixels: int, pixels: int | None, size: str = "") -> str:
    """One wording for both guards: ours, and PIL's (whose message gives only the pixel count)."""
    count = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    return f"decompression bomb: {size + ' = ' if size else ''}{count}, over the limit of {max_pixels:,} (max_image_pixels)"


def _pil_count(exc: Exception) -> int | None:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return int(found.group(1)) if found else None


def load_image(path_or_url: str, *, storage_options: dict | None = None, **kw) -> Image.Image:
    """Read a local path or fsspec URL and decode it (see decode_image for keywords).

    A missing file raises FileNotFoundError; one that cannot be read (a host that does not
    answer, missing credentials, ...) raises BadImage saying why.
    """
    from .sources import NotAFile, read_bytes

    name = str(path_or_url)
    try:
        data = read_bytes(name, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such file") from None
    except NotAFile as exc:
        raise BadImage(str(exc), name) from None
    except ConnectionError as exc:
        raise BadImage(f"cannot reach it: {exc}", name) from None
    except Exception as exc:
        raise BadImage(f"cannot read it: {type(exc).__name__}: {exc}", name) from None
    return decode_image(data, name, **kw)
