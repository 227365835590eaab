"""One extraction worker: backbones held in memory, turning shards of images into shard files.

This is the callable class that Ray actors wrap (one per GPU, or one per CPU slice),
in the manner of Ray's batch-inference examples; it is plain Python so that the
single-process path, the benchmarks and the tests use exactly the same code.

Per shard, decoding runs in a thread pool ahead of the forward pass (PIL and torch
both release the GIL), so the model does not wait for JPEGs; batches are assembled
in order, so a bad image is dropped without shifting any label onto another image.

One extractor may hold several backbones (a multi-model job): every image is decoded
once, each model's preprocessing is applied to it, and each model's rows go to its own
store's shard file; a shard is committed in every store it was asked for.

On CUDA the loop is a two-stage pipeline: batch k+1 is staged in a pinned host buffer,
copied on a side stream and queued behind batch k, whose features are copied back
(non-blocking, pinned) and written to HDF5 while the GPU computes k+1. With
decode="gpu", JPEGs are decoded on the device in chunks (featurestore.gpu_decode).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from featurestore.config import AUTO_BATCH, BackboneConfig

log = logging.getLogger("featurestore.extract")  # one logger for the stage, driver and actors

CPU_AUTO_BATCH = 32  # --batch-size auto on CPU: larger batches buy nothing there
AUTO_START = 16  # first trial batch size on CUDA
AUTO_CAP = 512  # never more images per forward than this
AUTO_FRACTION = 0.7  # of the free GPU memory: the rest is for decoding, staging and fragmentation
GPU_DECODE_CHUNK = 32  # images decoded on the device at once (bounds full-size image memory)


class StrictModeError(RuntimeError):
    """Raised with --strict on the first input that cannot be used."""


@dataclass
class Decoded:
    index: int  # position in the shard
    id: str
    label: int
    # one [3, h, w] per model, on the CPU: uint8 (normalised per batch) or already normalised float
    tensors: list[torch.Tensor] | None = None
    reason: str | None = None  # why it could not be used
    raw: Any = None  # decode="gpu" on CUDA: a gpu_decode.RawImage, decoded on the device per batch

    @property
    def ok(self) -> bool:
        return self.reason is None and (self.tensors is not None or self.raw is not None)


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

    def reset(self) -> None:
        with self.lock:
            self.done = self.errors = 0


class NoCudaDevice(RuntimeError):
    """A GPU was asked for (or Ray gave the actor one) but torch in this process cannot use it."""


def pick_device(requested: str | None = None) -> torch.device:
    """The device asked for; none asked: CUDA where torch sees it.

    A CUDA device that torch cannot use is an error, not a quiet fall back to the CPU: a job
    sized for GPUs would run many times slower on the few threads a GPU actor keeps.
    """
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} here is a CPU-only build"
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = (f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device: no "
                   f"NVIDIA driver, or one too old for it (CUDA_VISIBLE_DEVICES={visible!r})")
        raise NoCudaDevice(f"{requested} asked for, but {why}")
    return device


@dataclass(frozen=True)
class DecodePlan:
    """What the reading threads do with each input's bytes.

    mode "pil": PIL decode (JPEG draft per model, decoded once per distinct DCT scale), then
    each model's resize and crop to uint8 (normalised later, per batch). mode "tensor"
    (decode="gpu"): header sniffing; on CUDA the JPEG bytes are left for a batched device
    decode (device_decode=True), on the CPU the thread decodes with torchvision and applies
    each model's TensorPreprocess itself.
    """

    mode: str
    preprocess: tuple[Callable, ...]
    draft_sizes: tuple = ()
    max_pixels: int = 100_000_000
    storage_options: dict | None = None
    device_decode: bool = False


def decode_one(index: int, id: str, label: int, plan: DecodePlan) -> Decoded:
    """Read, decode and preprocess one input for every model of `plan`; never raises for a bad
    input. What the plan's callables return is kept: uint8 tensors are normalised per batch,
    float ones are used as they are.
    """
    from featurestore.decode import BadImage, decode_image_multi
    from featurestore.sources import NotAFile, read_bytes

    try:
        data = read_bytes(id, storage_options=plan.storage_options)
    except FileNotFoundError:  # gone since a folder was listed, a manifest row naming nothing, or a broken link
        return Decoded(index, id, label, reason="no such file" + (" (a broken symlink)" if os.path.islink(id) else ""))
    except NotAFile as exc:
        return Decoded(index, id, label, reason=str(exc))
    except ConnectionError as exc:
        return Decoded(index, id, label, reason=f"unreachable: {exc}")
    except OSError as exc:  # no permission, an I/O error, an object store's refusal
        return Decoded(index, id, label, reason=f"unreadable: {type(exc).__name__}: {exc}")
    try:
        if plan.mode == "pil":
            images = decode_image_multi(data, id, draft_sizes=list(plan.draft_sizes), max_pixels=plan.max_pixels)
            return Decoded(index, id, label, tensors=[pre(img) for pre, img in zip(plan.preprocess, images)])
        from featurestore.gpu_decode import decode_batch, prepare

        raw = prepare(data, id, plan.max_pixels)
        if plan.device_decode:
            return Decoded(index, id, label, raw=raw)
        (img,) = decode_batch([raw], "cpu")
        if isinstance(img, BadImage):
            raise img
        return Decoded(index, id, label, tensors=[pre([img])[0] for pre in plan.preprocess])
    except BadImage as exc:
        return Decoded(index, id, label, reason=exc.reason)
    except Exception as exc:  # a decoder bug must not take the shard down
        return Decoded(index, id, label, reason=f"decode failed: {type(exc).__name__}: {exc}")


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
        if not item.ok:
            on_bad(item)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# --batch-size auto
# ---------------------------------------------------------------------------------------------
def choose_batch_size(
    measure: Callable[[int], int | None],
    budget_bytes: float,
    *,
    start: int = AUTO_START,
    cap: int = AUTO_CAP,
) -> tuple[int, list[tuple[int, int | None]]]:
    """The largest power-of-two batch size whose measured peak memory fits `budget_bytes`.

    measure(n) runs a trial forward at batch size n and returns its peak bytes, or None when
    it ran out of memory. Sizes double from `start` while they fit, stopping early when the
    growth measured so far predicts the next size would not (an OOM trial is slow and
    fragments the allocator); if `start` itself does not fit, sizes halve down to 1.
    Returns (batch size, [(n, peak or None) for each trial]); (1, trials) if nothing fits.
    """
    start = max(1, int(start))
    cap = max(1, int(cap))
    trials: list[tuple[int, int | None]] = []
    best: int | None = None
    prev: tuple[int, int] | None = None
    n = min(start, cap)
    while n <= cap:
        peak = measure(n)
        trials.append((n, peak))
        if peak is None or peak > budget_bytes:
            break
        best = n
        if prev is not None and n * 2 <= cap:
            per_image = max(0.0, (peak - prev[1]) / (n - prev[0]))
            if peak + per_image * n > budget_bytes:
                break  # the next doubling is predicted not to fit
        prev = (n, peak)
        n *= 2
    if best is None:
        n = min(start, cap) // 2
        while n >= 1:
            peak = measure(n)
            trials.append((n, peak))
            if peak is not None and peak <= budget_bytes:
                best = n
                break
            n //= 2
    return (best or 1), trials


def _gib(b: float | None) -> str:
    return "OOM" if b is None else f"{b / 2**30:.2f} GiB"


def measure_peak(backbones: Sequence[Any], device: torch.device, n: int) -> int | None:
    """Peak CUDA bytes of a forward of every backbone at batch size n (None: out of memory).

    One more input batch per model is added: the actor keeps two batches in flight.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    inputs = 0
    try:
        for bb in backbones:
            h, w = bb.preprocessing.input_size
            x = torch.zeros(n, 3, h, w, device=device)
            inputs += x.numel() * x.element_size()
            out = bb(x)
            del out, x
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return int(torch.cuda.max_memory_allocated(device) - base + inputs)


def auto_batch_size(backbones: Sequence[Any], device: torch.device | str, *, fraction: float = AUTO_FRACTION,
                    gpu_share: float = 1.0) -> tuple[int, str]:
    """--batch-size auto: CPU_AUTO_BATCH on CPU; on CUDA a measured trial against free memory.

    The budget is `fraction` of the free memory (or of the actor's share of the GPU, when Ray
    gave it a fraction of one, whichever is smaller). Returns (batch size, a line for the log).
    """
    device = torch.device(device)
    if device.type != "cuda":
        note = f"batch size auto: {CPU_AUTO_BATCH} (the CPU default)"
        log.info(note)
        return CPU_AUTO_BATCH, note
    free, total = torch.cuda.mem_get_info(device)
    budget = fraction * min(free, total * gpu_share)
    n, trials = choose_batch_size(lambda k: measure_peak(backbones, device, k), budget)
    torch.cuda.empty_cache()
    note = (f"batch size auto: {n} on {torch.cuda.get_device_name(device)} "
            f"(budget {_gib(budget)} = {fraction:.0%} of free {_gib(free)}; peak per trial: "
            + ", ".join(f"{b}: {_gib(p)}" for b, p in trials) + ")")
    if n == 1 and (not trials or trials[-1][1] is None or trials[-1][1] > budget):
        log.warning("%s; even one image per batch does not fit: the GPU is nearly full", note)
    else:
        log.info(note)
    return n, note


# ---------------------------------------------------------------------------------------------
# torch.compile with a fallback
# ---------------------------------------------------------------------------------------------
class _CompileGuard(nn.Module):
    """Runs the compiled module; on the first failure logs why and runs the eager one from then on."""

    def __init__(self, eager: nn.Module, compiled: Callable, name: str, on_fallback: Callable[[str], None]):
        super().__init__()
        self.eager = eager
        self._compiled = [compiled]  # a list: not registered as a second copy of the module
        self._name = name
        self._on_fallback = on_fallback

    @property
    def active(self) -> bool:
        return self._compiled[0] is not None

    def forward(self, x):
        fn = self._compiled[0]
        if fn is not None:
            try:
                return fn(x)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # a compiler failure: keep extracting, eagerly
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                log.warning("torch.compile of %s failed (%s); falling back to eager mode for this actor",
                            self._name, why)
                self._compiled[0] = None
                self._on_fallback(why)
        return self.eager(x)

    def __getattr__(self, name):  # backbone code reads attributes of the cut module (e.g. timm's .model)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["eager"], name)


def compile_backbones(backbones: Sequence[Any], backend: str | Callable | None, batch_size: int,
                      device: torch.device, status: Callable[[str], None] = lambda s: None) -> None:
    """torch.compile each backbone's network in place (static shapes), then compile it by a warm-up forward.

    Compiling happens at the first call, so the warm-up at `batch_size` makes a failure show at
    start-up (logged, then eager mode) rather than in the first shard. `status` receives
    "on (backend X)" or "fallback to eager (why)". backend: a torch.compile backend; default
    $FEATURESTORE_COMPILE_BACKEND or inductor.
    """
    backend = backend or os.environ.get("FEATURESTORE_COMPILE_BACKEND") or "inductor"
    label = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")

    def fell_back(why: str) -> None:
        status(f"fallback to eager ({why})")

    try:
        for bb in backbones:
            compiled = torch.compile(bb.net, backend=backend, dynamic=False)
            bb.net = _CompileGuard(bb.net, compiled, bb.model_name, fell_back)
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("torch.compile is unavailable (%s); running eagerly", why)
        for bb in backbones:
            if isinstance(bb.net, _CompileGuard):
                bb.net = bb.net.eager
        fell_back(why)
        return
    status(f"on (backend {label})")
    t = time.perf_counter()
    for bb in backbones:
        h, w = bb.preprocessing.input_size
        bb(torch.zeros(batch_size, 3, h, w, device=device))
    log.info("torch.compile (%s) of %s: done after %.1fs", label, ", ".join(bb.model_name for bb in backbones),
             time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------
# CUDA staging: pinned host buffers, H2D on a side stream
# ---------------------------------------------------------------------------------------------
class _CudaStager:
    """Two pinned host buffers per model; batches are copied to the device on a side stream.

    The compute stream waits on the copy's event, so a copy queued for batch k+1 overlaps
    the compute of batch k; a buffer is refilled only after its previous copy has left.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.events: dict[tuple, Any] = {}
        self.slot = 0

    def to_device(self, key: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        n, shape, dtype = len(tensors), tuple(tensors[0].shape), tensors[0].dtype
        k = (key, self.slot)
        ev = self.events.pop(k, None)
        if ev is not None:
            ev.synchronize()  # the previous copy out of this buffer has finished
        buf = self.buffers.get(k)
        if buf is None or buf.shape[0] < n or tuple(buf.shape[1:]) != shape or buf.dtype != dtype:
            buf = torch.empty((n, *shape), dtype=dtype, pin_memory=True)
            self.buffers[k] = buf
        host = buf[:n]
        torch.stack(list(tensors), out=host)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            x = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[k] = ev
        compute.wait_event(ev)
        x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return x

    def flip(self) -> None:
        self.slot ^= 1


@dataclass
class _Job:
    """A batch in flight: its rows and, per store, its features (on the host once `event` completes)."""

    ids: list[str]
    labels: np.ndarray
    outputs: dict[int, dict[str, torch.Tensor]]
    event: Any = None


# ---------------------------------------------------------------------------------------------
# The extractor
# ---------------------------------------------------------------------------------------------
class ShardExtractor:
    """Holds one backbone (or several); `process(shard)` writes and commits one shard file per store.

    backbone/store_uri: one BackboneConfig and one store, or equal-length lists of them (a
    multi-model job: one decode per image, one store per model). batch_size may be "auto".
    """

    def __init__(
        self,
        backbone: BackboneConfig | Sequence[BackboneConfig],
        store_uri: str | Sequence[str],
        label_names: list[str],
        *,
        batch_size: int | str = 32,
        dtype: str = "float32",
        compression: str | None = None,
        storage_options: dict | None = None,
        decode_threads: int | None = None,
        torch_threads: int | None = None,
        max_pixels: int = 100_000_000,
        strict: bool = False,
        device: str | None = None,
        seed: int = 0,
        compile: bool = False,
        compile_backend: str | Callable | None = None,
        memory_fraction: float = AUTO_FRACTION,
        fold_batchnorm: bool = True,
    ) -> None:
        from featurestore.backbones import load_backbone

        configs = [backbone] if isinstance(backbone, BackboneConfig) else list(backbone)
        uris = [store_uri] if isinstance(store_uri, str) else list(store_uri)
        if not configs or len(configs) != len(uris):
            raise ValueError(f"{len(configs)} backbone(s) for {len(uris)} store(s): give one store per backbone")
        decodes = {c.decode for c in configs}
        if len(decodes) != 1:
            raise ValueError(f"backbones of one extractor share a decode mode, got {sorted(decodes)}")
        self.single = isinstance(store_uri, str)
        self.decode = configs[0].decode
        if torch_threads:
            # Ray gives a one-CPU actor one OpenMP thread; an explicit count is what
            # makes CPU actors use the cores they were given.
            torch.set_num_threads(int(torch_threads))
        self.device = pick_device(device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        self.backbones = []
        for c in configs:
            bb = load_backbone(
                c.model, weights=c.weights, layers=list(c.layers) or None, pooling=c.pooling,
                precision=c.precision, device=str(self.device), input_size=c.input_size, crop=c.crop,
                decode=c.decode, seed=seed, storage_options=storage_options or None,  # weights at s3://...
                # faster on GPUs and on CPUs alike (oneDNN); same float32 maths, another summation order
                channels_last=True, fold_batchnorm=fold_batchnorm,
            )
            bb.eval()
            self.backbones.append(bb)
        self.backbone = self.backbones[0]  # single-model code
        self.store_uris = uris
        self.label_names = list(label_names)
        self.dtype = dtype
        self.compression = None if compression in (None, "none") else compression
        self.storage_options = storage_options or {}
        self.max_pixels = int(max_pixels)
        self.strict = strict

        self.tensor_pre: list = []
        if self.decode == "gpu":
            from featurestore.gpu_decode import TensorPreprocess

            self.tensor_pre = [TensorPreprocess(bb.preprocessing) for bb in self.backbones]
            if not cuda:
                log.warning("--decode gpu without a CUDA device: decoding with torchvision's CPU JPEG decoder "
                            "and resizing with torch on the CPU (same numerics as on a GPU, within tolerance; "
                            "usually slower than --decode draft on CPUs)")
            self.decode_plan = DecodePlan("tensor", tuple(self.tensor_pre), (), self.max_pixels,
                                          self.storage_options, device_decode=cuda)
        else:
            drafts = tuple(bb.preprocessing.draft_size if self.decode == "draft" else None for bb in self.backbones)
            pixels = tuple(bb.preprocessing.to_uint8 for bb in self.backbones)
            self.decode_plan = DecodePlan("pil", pixels, drafts, self.max_pixels, self.storage_options)

        self.batch_size, self.batch_note = self._resolve_batch_size(batch_size, memory_fraction)
        self.compile_status = "off"
        if compile:
            self._compile(compile_backend)
        threads = decode_threads or max(2, (torch_threads or os.cpu_count() or 2))
        self.pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        # Every shard runs on this one thread. A Ray actor with max_concurrency > 1 calls methods
        # from alternating threads, and each calling thread gets its own OpenMP team and its own
        # thread-count setting; one thread keeps one team with the count set here. (A first
        # measurement under heavy load suggested ~25% lost without it; a later interleaved A/B on a
        # quieter 2-core machine was within noise. It is kept for the deterministic setting.)
        self._runner = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract")
        if torch_threads:
            self._runner.submit(torch.set_num_threads, int(torch_threads)).result()
        self.window = max(2 * self.batch_size, 4 * threads)
        self.progress = ShardProgress()
        self._stager = _CudaStager(self.device) if cuda else None
        self.node_id = self.info()["node_id"]  # recorded in every shard this actor writes

    # -- set-up ----------------------------------------------------------------------------------
    def _gpu_share(self) -> float:
        """The fraction of its GPU this actor was given by Ray (1 outside Ray)."""
        try:
            import ray

            if ray.is_initialized():
                got = ray.get_runtime_context().get_assigned_resources().get("GPU")
                if got:
                    return max(0.01, min(1.0, float(got)))
        except Exception:
            pass
        return 1.0

    def _resolve_batch_size(self, requested: int | str, fraction: float) -> tuple[int, str]:
        if requested != AUTO_BATCH:
            n = int(requested)
            if n < 1:
                raise ValueError(f"batch size must be a positive integer or 'auto', got {requested!r}")
            return n, f"batch size {n}"
        return auto_batch_size(self.backbones, self.device, fraction=fraction, gpu_share=self._gpu_share())

    def _compile(self, backend: str | Callable | None) -> None:
        def status(text: str) -> None:
            self.compile_status = text

        compile_backbones(self.backbones, backend, self.batch_size, self.device, status)

    @property
    def compiled(self) -> bool:
        return any(isinstance(bb.net, _CompileGuard) and bb.net.active for bb in self.backbones)

    # -- metadata the driver asks for ------------------------------------------------
    def config(self) -> dict[str, Any]:
        return self.backbone.config()

    def configs(self) -> list[dict[str, Any]]:
        """Every backbone's config(), in store order."""
        return [bb.config() for bb in self.backbones]

    def feature_shapes(self) -> dict[str, tuple]:
        return dict(self.backbone.feature_shapes)

    def info(self) -> dict[str, Any]:
        import socket

        from featurestore.backbones import cpu_has_native_bf16

        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray
            pass
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node, "device": str(self.device),
                "batch_size": self.batch_size, "batch_note": self.batch_note, "compile": self.compile_status,
                "decode": self.decode, "models": [bb.model_name for bb in self.backbones],
                "precisions": [bb.precision for bb in self.backbones],
                "native_bf16": self.device.type == "cpu" and cpu_has_native_bf16(),
                "fold": ", ".join((f"{bb.model_name} " if len(self.backbones) > 1 else "")
                                  + str(bb.folded or "batchnorm not folded") for bb in self.backbones)}

    def poll(self) -> tuple[int, int]:
        """Images done and errors so far in the current shard (the driver's progress bar adds
        them to the shards it has seen committed, so they count from zero in every shard)."""
        return self.progress.snapshot()

    # -- the work ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """The first backbone's features of a normalised [N, 3, h, w] batch (synchronous)."""
        out = self._forward_model(0, batch.to(self.device))
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def _forward_model(self, j: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = int(x.shape[0])
        if n < self.batch_size and self.compiled:
            # a compiled model keeps one static shape: pad the short last batch instead of recompiling
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        out = self.backbones[j](x)
        return {k: v[:n] for k, v in out.items()}

    def _device_inputs(self, items: list[Decoded], stores: list[int], on_bad) -> tuple[dict, list[Decoded]]:
        """decode="gpu" on CUDA: decode the batch on the device in chunks, preprocess for every model."""
        from featurestore.decode import BadImage
        from featurestore.gpu_decode import decode_batch

        keep: list[Decoded] = []
        parts: dict[int, list[torch.Tensor]] = {j: [] for j in stores}
        for c in range(0, len(items), GPU_DECODE_CHUNK):
            chunk = items[c:c + GPU_DECODE_CHUNK]
            images = decode_batch([it.raw for it in chunk], self.device)
            good = []
            for it, img in zip(chunk, images):
                if isinstance(img, BadImage):
                    it.reason, it.raw = img.reason, None
                    on_bad(it)
                else:
                    good.append((it, img))
            del images
            if good:
                for j in stores:
                    parts[j].append(self.tensor_pre[j]([img for _, img in good]))
                keep.extend(it for it, _ in good)
            del good
        return {j: torch.cat(v) for j, v in parts.items() if v}, keep

    @torch.inference_mode()
    def _launch(self, batch: list[Decoded], stores: list[int], on_bad) -> _Job | None:
        """Queue one batch: inputs to the device, every requested model's forward, features back to the host."""
        cuda = self._stager is not None
        if batch[0].raw is not None:
            inputs, batch = self._device_inputs(batch, stores, on_bad)
            if not batch:
                return None
        elif cuda:
            inputs = {j: self._stager.to_device(j, [b.tensors[j] for b in batch]) for j in stores}
            self._stager.flip()
        else:
            inputs = {j: torch.stack([b.tensors[j] for b in batch]) for j in stores}
        for j, x in inputs.items():
            if x.dtype == torch.uint8:  # read as pixels: normalise the whole batch in one pass
                inputs[j] = self.backbones[j].preprocessing.normalize(x)
        outputs: dict[int, dict[str, torch.Tensor]] = {}
        for j in stores:
            out = self._forward_model(j, inputs[j])
            if cuda:  # copy back without blocking, into pinned memory
                host = {}
                for k, v in out.items():
                    h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                    h.copy_(v, non_blocking=True)
                    host[k] = h
                out = host
            outputs[j] = out
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return _Job([b.id for b in batch], np.asarray([b.label for b in batch], dtype=np.int64), outputs, event)

    def _finish(self, job: _Job, writers: dict) -> None:
        if job.event is not None:
            job.event.synchronize()
        for j, out in job.outputs.items():
            writers[j].append(job.ids, job.labels, {k: v.numpy() for k, v in out.items()})
        self.progress.add(done=len(job.ids))

    def process(self, shard, stores: Sequence[int] | None = None) -> Any:
        """Extract one shard (a sources.ShardSpec) and commit it in every store asked for.

        stores: indices of the stores to write (default: all). Returns the ShardInfo for a
        single-store extractor, else the list of ShardInfo in `stores` order.
        """
        return self._runner.submit(self._process, shard, stores).result()

    def _process(self, shard, stores: Sequence[int] | None = None) -> Any:
        from featurestore.store import ShardWriter

        started = time.perf_counter()
        self.progress.reset()
        wanted = list(range(len(self.store_uris))) if stores is None else sorted({int(s) for s in stores})
        writers: dict[int, ShardWriter] = {}
        try:
            for j in wanted:
                writers[j] = ShardWriter(
                    self.store_uris[j],
                    shard.index,
                    self.label_names,
                    dtype=self.dtype,
                    compression=self.compression,
                    storage_options=self.storage_options,
                    expected_rows=len(shard.ids),
                    node_id=self.node_id,
                )

            def work(i: int, id: str, label: int) -> Decoded:
                return decode_one(i, id, label, self.decode_plan)

            def on_bad(item: Decoded) -> None:
                if self.strict:
                    raise StrictModeError(f"{item.id}: {item.reason} (--strict stops at the first unusable input)")
                log.warning("skipping %s: %s", item.id, item.reason)
                for w in writers.values():
                    w.add_error(item.id, item.label, item.reason or "unknown")
                self.progress.add(done=1, errors=1)

            stream = decoded_stream(list(shard.ids), np.asarray(shard.labels), work, self.pool, self.window)
            pending: deque[_Job] = deque()
            for batch in batches_of(stream, self.batch_size, on_bad):
                job = self._launch(batch, wanted, on_bad)
                if job is not None:
                    pending.append(job)
                while len(pending) > 1:  # batch k is written while k+1 computes
                    self._finish(pending.popleft(), writers)
            while pending:
                self._finish(pending.popleft(), writers)
            infos = [writers[j].commit() for j in wanted]
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        info = infos[0]
        log.info("shard %05d: %d rows, %d errors, %d store(s), %.1fs", shard.index, info.rows, len(info.errors),
                 len(infos), time.perf_counter() - started)
        return info if self.single else infos

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._runner.shutdown(wait=False, cancel_futures=True)
