"""One extraction worker: a backbone held in memory, turning shards of images into shard files.

This is the callable class that Ray actors wrap (one per GPU, or one per CPU slice),
in the manner of Ray's batch-inference examples; it is plain Python so that the
single-process path, the benchmarks and the tests use exactly the same code.

Per shard, decoding runs in a thread pool ahead of the forward pass (PIL and torch
both release the GIL), so the model does not wait for JPEGs; batches are assembled
in order, so a bad image is dropped without shifting any label onto another image.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from featurestore.config import BackboneConfig

log = logging.getLogger(__name__)


class StrictModeError(RuntimeError):
    """Raised with --strict on the first input that cannot be used."""


@dataclass
class Decoded:
    index: int  # position in the shard
    id: str
    label: int
    tensor: torch.Tensor | None = None
    reason: str | None = None  # why it could not be used


@dataclass
class ShardProgress:
    """Counters another thread can read while a shard is being processed."""

    done: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, done: int = 0, errors: int = 0) -> None:
        with self.lock:
            self.done += done
            self.errors += errors

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.done, self.errors


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def decode_one(
    index: int,
    id: str,
    label: int,
    preprocess: Callable,
    draft_size: tuple[int, int] | None,
    max_pixels: int,
    storage_options: dict | None,
) -> Decoded:
    """Read, decode and preprocess one input; never raises for a bad input."""
    from featurestore.decode import BadImage, decode_image
    from featurestore.sources import read_bytes

    try:
        data = read_bytes(id, storage_options=storage_options)
    except FileNotFoundError:
        return Decoded(index, id, label, reason="file vanished after listing")
    except (PermissionError, IsADirectoryError, OSError) as exc:
        return Decoded(index, id, label, reason=f"unreadable: {type(exc).__name__}: {exc}")
    try:
        img = decode_image(data, id, draft_size=draft_size, max_pixels=max_pixels)
        tensor = preprocess(img)
    except BadImage as exc:
        return Decoded(index, id, label, reason=exc.reason)
    except Exception as exc:  # a decoder bug must not take the shard down
        return Decoded(index, id, label, reason=f"decode failed: {type(exc).__name__}: {exc}")
    return Decoded(index, id, label, tensor=tensor)


def decoded_stream(
    ids: list[str],
    labels: np.ndarray,
    work: Callable[[int, str, int], Decoded],
    pool: cf.Executor,
    window: int,
) -> Iterator[Decoded]:
    """Yield decoded inputs in input order, keeping at most `window` decodes in flight."""
    pending: deque[cf.Future] = deque()
    it = iter(range(len(ids)))
    for i in it:
        pending.append(pool.submit(work, i, ids[i], int(labels[i])))
        if len(pending) >= window:
            break
    for i in it:
        yield pending.popleft().result()
        pending.append(pool.submit(work, i, ids[i], int(labels[i])))
    while pending:
        yield pending.popleft().result()


def batches_of(stream: Iterable[Decoded], size: int, on_bad: Callable[[Decoded], None]) -> Iterator[list[Decoded]]:
    batch: list[Decoded] = []
    for item in stream:
        if item.tensor is None:
            on_bad(item)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardExtractor:
    """Holds one backbone; `process(shard)` writes and commits one shard file."""

    def __init__(
        self,
        backbone: BackboneConfig,
        store_uri: str,
        label_names: list[str],
        *,
        batch_size: int = 32,
        dtype: str = "float32",
        compression: str | None = None,
        storage_options: dict | None = None,
        decode_threads: int | None = None,
        torch_threads: int | None = None,
        max_pixels: int = 100_000_000,
        strict: bool = False,
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        from featurestore.backbones import load_backbone

        if torch_threads:
            # Ray gives a one-CPU actor one OpenMP thread; an explicit count is what
            # makes CPU actors use the cores they were given.
            torch.set_num_threads(int(torch_threads))
        self.device = pick_device(device)
        self.backbone = load_backbone(
            backbone.model,
            weights=backbone.weights,
            layers=list(backbone.layers) or None,
            pooling=backbone.pooling,
            precision=backbone.precision,
            device=str(self.device),
            input_size=backbone.input_size,
            crop=backbone.crop,
            decode=backbone.decode,
            seed=seed,
        )
        self.backbone.eval()
        if self.device.type == "cuda":
            self.backbone.to(memory_format=torch.channels_last)
        self.preprocess = self.backbone.preprocess
        self.draft_size = self.backbone.preprocessing.draft_size if backbone.decode == "draft" else None
        self.store_uri = store_uri
        self.label_names = list(label_names)
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.compression = None if compression in (None, "none") else compression
        self.storage_options = storage_options or {}
        self.max_pixels = int(max_pixels)
        self.strict = strict
        threads = decode_threads or max(2, (torch_threads or os.cpu_count() or 2))
        self.pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.window = max(2 * self.batch_size, 4 * threads)
        self.progress = ShardProgress()
        self.node_id = self.info()["node_id"]  # recorded in every shard this actor writes

    # -- metadata the driver asks for ------------------------------------------------
    def config(self) -> dict[str, Any]:
        return self.backbone.config()

    def feature_shapes(self) -> dict[str, tuple]:
        return dict(self.backbone.feature_shapes)

    def info(self) -> dict[str, Any]:
        import socket

        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray
            pass
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node, "device": str(self.device)}

    def poll(self) -> tuple[int, int]:
        """Images done and errors so far (read by the driver for its progress bar)."""
        return self.progress.snapshot()

    # -- the work ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
            batch = batch.contiguous(memory_format=torch.channels_last)
        out = self.backbone(batch)
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def process(self, shard) -> Any:
        """Extract one shard (a sources.ShardSpec) and commit it; returns the ShardInfo."""
        from featurestore.store import ShardWriter

        started = time.perf_counter()
        writer = ShardWriter(
            self.store_uri,
            shard.index,
            self.label_names,
            dtype=self.dtype,
            compression=self.compression,
            storage_options=self.storage_options,
            expected_rows=len(shard.ids),
            node_id=self.node_id,
        )
        try:
            def work(i: int, id: str, label: int) -> Decoded:
                return decode_one(i, id, label, self.preprocess, self.draft_size, self.max_pixels, self.storage_options)

            def on_bad(item: Decoded) -> None:
                if self.strict:
                    raise StrictModeError(f"{item.id}: {item.reason} (--strict stops at the first unusable input)")
                log.warning("skipping %s: %s", item.id, item.reason)
                writer.add_error(item.id, item.label, item.reason or "unknown")
                self.progress.add(done=1, errors=1)

            stream = decoded_stream(list(shard.ids), np.asarray(shard.labels), work, self.pool, self.window)
            for batch in batches_of(stream, self.batch_size, on_bad):
                feats = self.forward(torch.stack([b.tensor for b in batch]))
                writer.append(
                    [b.id for b in batch],
                    np.asarray([b.label for b in batch], dtype=np.int64),
                    feats,
                )
                self.progress.add(done=len(batch))
            info = writer.commit()
        except BaseException:
            writer.abort()
            raise
        log.info("shard %05d: %d rows, %d errors, %.1fs", shard.index, info.rows, len(info.errors),
                 time.perf_counter() - started)
        return info

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
