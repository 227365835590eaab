"""`--decode gpu`: JPEGs decoded on the device, resized, cropped and normalised with torch ops.

On a GPU node the CPUs, not the GPU, bound extraction: JPEG decoding is most of the
work. With decode="gpu" the actor's reading threads only read bytes and sniff headers;
JPEGs are decoded in batches by nvJPEG (`torchvision.io.decode_jpeg(list, device="cuda")`)
and every model's preprocessing (resize, crop, normalise) runs as torch ops on the device,
so each image is decoded once, at full size, whatever the models need.

Per image, what the device decoder cannot take is decoded on the CPU by PIL
(featurestore.decode.decode_image, with its mode conversions and EXIF orientation) and
then goes through the same torch preprocessing:
  - not a JPEG (PNG, WebP, TIFF ...), CMYK/YCCK JPEGs, JPEGs over the pixel limit,
    JPEGs without an end-of-image marker (truncated files: nvJPEG may decode them silently);
  - any JPEG the device decoder raises on (a failing batch is retried image by image).
An input PIL cannot use either is a BadImage, reported and skipped exactly as on the PIL
path: never a crashed shard, never a shifted label.

The same code runs with device="cpu" (torchvision's libjpeg-turbo decoder): that is how it is
tested here, and what `--decode gpu` does on a machine without CUDA (with a warning).

Numerics. The resize is torch's antialiased interpolation (`F.interpolate(antialias=True)`,
the kernel torchvision designed to match PIL), rounded to 8-bit levels like PIL's, so the
tensor path is close to, not identical with, the PIL path: on CPU, features of the same
JPEGs agree with decode="full" to cosine similarity >= 0.999 (tests/test_fastpath.py).
Stores record decode="gpu" in their preprocessing, so they never mix with PIL-decoded ones.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featurestore.decode import BadImage, _exif_orientation, decode_image
from featurestore.preprocess import Preprocessing

__all__ = ["RawImage", "prepare", "decode_batch", "orient", "TensorPreprocess", "DEVICE_MODES"]

DEVICE_MODES = ("RGB", "L")  # JPEG colour modes (as PIL reports them) the device decoder gets
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; the calls still work.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")
warnings.filterwarnings("ignore", message=r".*TorchCodec.*")


@dataclass
class RawImage:
    """One input after the reading thread: JPEG bytes for the device decoder, or a CPU-decoded image."""

    name: str
    data: bytes
    device_ok: bool  # a JPEG the device decoder should take
    orientation: int = 1  # EXIF orientation, applied after the device decode
    encoded: torch.Tensor | None = None  # uint8 [nbytes] (a writable copy, as decode_jpeg wants)
    image: torch.Tensor | None = None  # uint8 [3, H, W] decoded by PIL (the CPU fallback)
    max_pixels: int = 100_000_000


def _complete_jpeg(data: bytes) -> bool:
    """Ends with an EOI marker (trailing padding allowed): a cheap guard against truncated files."""
    return data[-32:].rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9")


def pil_decode(data: bytes, name: str, max_pixels: int) -> torch.Tensor:
    """The CPU fallback: PIL decode at full size (RGB, EXIF orientation applied) as uint8 [3, H, W]."""
    img = decode_image(data, name, draft_size=None, max_pixels=max_pixels)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def prepare(data: bytes, name: str = "<bytes>", max_pixels: int = 100_000_000) -> RawImage:
    """Reading-thread work: sniff the header; JPEGs for the device stay encoded, the rest is decoded by PIL now.

    Raises BadImage for an input that cannot be used at all.
    """
    if data is None or len(data) == 0:
        raise BadImage("zero-byte file", name)
    fmt = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            head = Image.open(io.BytesIO(data))
        fmt, mode, (w, h) = head.format, head.mode, head.size
        orientation = _exif_orientation(head)
    except Exception:
        fmt = None  # decode_image below names what is wrong
    if (fmt == "JPEG" and mode in DEVICE_MODES and w > 0 and h > 0
            and (not max_pixels or w * h <= max_pixels) and _complete_jpeg(data)):
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return RawImage(name, data, True, orientation, encoded=encoded, max_pixels=max_pixels)
    return RawImage(name, data, False, image=pil_decode(data, name, max_pixels), max_pixels=max_pixels)


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a [C, H, W] tensor, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def decode_batch(raws: Sequence[RawImage], device: torch.device | str) -> list[torch.Tensor | BadImage]:
    """uint8 [3, H, W] images on `device` (EXIF orientation applied), or a BadImage, in input order.

    The JPEGs go to the device decoder in one call; if that call fails, each is retried
    alone, and one the decoder still refuses is decoded on the CPU by PIL instead.
    """
    device = torch.device(device)
    out: list[torch.Tensor | BadImage | None] = [None] * len(raws)
    todo = [i for i, r in enumerate(raws) if r.device_ok]
    if todo:
        encoded = [raws[i].encoded if raws[i].encoded is not None
                   else torch.frombuffer(bytearray(raws[i].data), dtype=torch.uint8) for i in todo]
        try:
            decoded: list = _decode_jpegs(encoded, device)
        except Exception:  # one bad image fails the batch: find it
            decoded = []
            for t in encoded:
                try:
                    decoded.append(_decode_jpegs([t], device)[0])
                except Exception as exc:
                    decoded.append(exc)
        for i, d in zip(todo, decoded):
            r = raws[i]
            if isinstance(d, torch.Tensor) and d.ndim == 3 and d.shape[0] in (1, 3) and d.numel():
                if d.shape[0] == 1:
                    d = d.expand(3, -1, -1)
                out[i] = orient(d, r.orientation)
                continue
            try:  # the device decoder refused it: PIL on the CPU
                out[i] = pil_decode(r.data, r.name, r.max_pixels).to(device)
            except BadImage as exc:
                out[i] = exc
            except Exception as exc:  # a decoder bug must not take the shard down
                out[i] = BadImage(f"decode failed: {type(exc).__name__}: {exc}"[:200], r.name)
    for i, r in enumerate(raws):
        if not r.device_ok:
            out[i] = r.image.to(device, non_blocking=True) if r.image is not None else \
                BadImage("nothing decoded", r.name)
    return out  # type: ignore[return-value]


class TensorPreprocess:
    """A Preprocessing (resize, crop, normalise) as torch ops on uint8 [3, H, W] images on any device.

    Mirrors Preprocessing.resize_crop's geometry exactly (same sizes, same crop offsets, same
    pad fill); the resampling is torch's antialiased interpolation rounded to 8-bit levels.
    """

    def __init__(self, pre: Preprocessing):
        if pre.interpolation not in _TORCH_MODES:
            raise ValueError(
                f"--decode gpu cannot reproduce {pre.interpolation!r} interpolation with torch ops "
                f"(it does {', '.join(_TORCH_MODES)}); use --decode draft or --decode full for this model")
        self.pre = pre
        self.mode = _TORCH_MODES[pre.interpolation]
        self._fills: dict[torch.device, torch.Tensor] = {}

    def _fill(self, device: torch.device) -> torch.Tensor:
        """The pad colour (the mean, in 0..255 levels) as [1, 3, 1, 1], made once per device."""
        if device not in self._fills:
            self._fills[device] = torch.tensor([float(round(m * 255)) for m in self.pre.mean],
                                               dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return self._fills[device]

    def _resize(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (h, w):
            return x
        if self.mode == "nearest-exact":
            return F.interpolate(x, size=(h, w), mode=self.mode)
        # Like PIL: a horizontal pass, then a vertical one, each rounded and clipped to 8-bit levels
        # (PIL keeps the intermediate image in uint8; clipping there matters for bicubic overshoot).
        if x.shape[-1] != w:
            x = F.interpolate(x, size=(x.shape[-2], w), mode=self.mode, antialias=True,
                              align_corners=False).round_().clamp_(0.0, 255.0)
        if x.shape[-2] != h:
            x = F.interpolate(x, size=(h, w), mode=self.mode, antialias=True,
                              align_corners=False).round_().clamp_(0.0, 255.0)
        return x

    def geometry(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> float [3, h, w] in 0..255 at the model's input size."""
        pre = self.pre
        h, w = pre.input_size
        ih, iw = int(img.shape[-2]), int(img.shape[-1])
        x = img[None].to(torch.float32)
        if pre.crop == "squash":
            return self._resize(x, h, w)[0]
        if pre.crop == "pad":
            nw, nh = pre.pad_resize(iw, ih)
            x = self._resize(x, nh, nw)
            canvas = self._fill(x.device).expand(1, 3, h, w).clone()
            top, left = (h - nh) // 2, (w - nw) // 2
            canvas[:, :, top:top + nh, left:left + nw] = x
            return canvas[0]
        nw, nh = pre.center_resize(iw, ih)
        x = self._resize(x, nh, nw)
        left = int(round((nw - w) / 2.0))
        top = int(round((nh - h) / 2.0))
        return x[0, :, top:top + h, left:left + w]

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, H, W] images (any sizes, one device) -> normalised float32 [N, 3, h, w]."""
        return self.pre.normalize(torch.stack([self.geometry(im) for im in images]))
