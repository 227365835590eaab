"""Image -> normalized tensor, exactly as the weights were trained, with explicit overrides.

Stored features are only comparable when preprocessing is identical, so the
transform is a frozen, JSON-able value that goes into store.json, and it is done
with PIL alone (no randomness, no threads) so the same file gives the same tensor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

# torch is imported where tensors are made: the driver reads and logs recipes without paying
# torch's import (seconds) for it.
if TYPE_CHECKING:
    import torch

__all__ = ["Preprocessing", "CROPS", "DECODES", "INTERPOLATIONS"]

CROPS = ("center", "squash", "pad")
DECODES = ("draft", "full", "gpu")
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class Preprocessing:
    """Resize (shorter side), crop policy, normalisation; `decode` says whether draft decoding is allowed."""

    input_size: tuple[int, int] = (224, 224)  # (H, W)
    resize_size: int = 256  # shorter side before a center crop
    crop: str = "center"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # "draft": JPEG DCT scaling allowed down to draft_size; "full": never; "gpu": JPEGs decoded at full
    # size by torchvision (nvJPEG on CUDA), resize/crop/normalise as torch ops (featurestore.gpu_decode)
    decode: str = "draft"

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "resize_size", int(self.resize_size))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_crop_pct(cls, size: int | tuple[int, int], crop_pct: float, **kw) -> "Preprocessing":
        """timm-style: resize the shorter side to floor(size / crop_pct), then crop `size`."""
        h, w = (size, size) if isinstance(size, int) else size
        return cls(input_size=(h, w), resize_size=int(math.floor(max(h, w) / crop_pct)), **kw)

    def with_input_size(self, size: int) -> "Preprocessing":
        """Change the model input to size x size, keeping the resize/crop ratio of the weights."""
        ratio = self.resize_size / max(self.input_size)
        return replace(self, input_size=(int(size), int(size)), resize_size=int(round(size * ratio)))

    def describe(self) -> str:
        """One line for logs and `featurestore layers`: what an image goes through."""
        h, w = self.input_size
        fmt = lambda v: "/".join(f"{x:g}" for x in v)  # noqa: E731
        geometry = {"center": f"resize {self.resize_size}, center crop {h}x{w}",
                    "squash": f"squash to {h}x{w}", "pad": f"pad to {h}x{w}"}[self.crop]
        return f"{geometry}, {self.interpolation}, mean {fmt(self.mean)}, std {fmt(self.std)}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    # -- decoding hint --------------------------------------------------------------------------
    @property
    def draft_size(self) -> tuple[int, int] | None:
        """Smallest (w, h) a JPEG may be DCT-downscaled to without losing pixels this transform uses."""
        if self.decode != "draft":
            return None
        h, w = self.input_size
        if self.crop == "center":
            r = max(self.resize_size, h, w)
            return (r, r)
        return (w, h)  # squash and pad resize straight to fit (w, h)

    # -- the geometry, shared with the tensor path (featurestore.gpu_decode) ------------------------
    def center_resize(self, iw: int, ih: int) -> tuple[int, int]:
        """(w, h) an iw x ih image is resized to before the center crop (shorter side to the resize size)."""
        h, w = self.input_size
        r = max(self.resize_size, h, w) if self.resize_size < max(h, w) else self.resize_size
        if iw <= ih:
            return r, max(1, int(r * ih / iw))
        return max(1, int(r * iw / ih)), r

    def pad_resize(self, iw: int, ih: int) -> tuple[int, int]:
        """(w, h) an iw x ih image is resized to before being pasted, centered, on the padded canvas."""
        h, w = self.input_size
        scale = min(w / iw, h / ih)
        return max(1, round(iw * scale)), max(1, round(ih * scale))

    # -- the transform ----------------------------------------------------------------------------
    def resize_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part: an RGB image of exactly input_size."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        h, w = self.input_size
        interp = INTERPOLATIONS[self.interpolation]
        iw, ih = img.size
        if self.crop == "squash":
            return img.resize((w, h), interp)
        if self.crop == "pad":
            nw, nh = self.pad_resize(iw, ih)
            resized = img.resize((nw, nh), interp)
            fill = tuple(int(round(m * 255)) for m in self.mean)  # pads normalise to 0
            canvas = Image.new("RGB", (w, h), fill)
            canvas.paste(resized, ((w - nw) // 2, (h - nh) // 2))
            return canvas
        # center: shorter side to resize_size (as torchvision does), then center crop
        nw, nh = self.center_resize(iw, ih)
        if (nw, nh) != (iw, ih):
            img = img.resize((nw, nh), interp)
        left = int(round((nw - w) / 2.0))
        top = int(round((nh - h) / 2.0))
        return img.crop((left, top, left + w, top + h))

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """The resized, cropped image as a [3, h, w] uint8 tensor: a quarter of the float's bytes.

        Reading threads stop here; `normalize` then runs once per batch, where torch's
        threads (or the GPU, after a 4x smaller host-to-device copy) do it in one pass.
        """
        import torch

        arr = np.asarray(self.resize_crop(img), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [..., 3, h, w] in 0..255 (uint8, or float from the tensor path) -> float32
        normalised, on x's device, in a new tensor. The same operations in the same order
        for one image or a batch, on either path, so they give bit-identical values."""
        import torch

        mean, std = _channel_stats(self.mean, self.std, x.device)
        return x.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(img))


@functools.lru_cache(maxsize=64)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [3, 1, 1] tensors, made once per device: creating them from Python
    on a GPU is a blocking copy that would stall the stream on every batch."""
    import torch

    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1)  # noqa: E731
    return as_tensor(mean), as_tensor(std)
