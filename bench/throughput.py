"""Throughput: featurestore extract against its baselines, same images and model, one run.

    python bench/throughput.py                       # resnet18 and mobilenet_v3_small on ../shared/data/animals
    python bench/throughput.py --precision fp32,bf16 # and again in bf16 (CPUs with AVX512-BF16 or AMX)
    python bench/throughput.py --models resnet50 --precision bf16 --decode gpu --batch-size auto \
        --images ../shared/data/animals-full --repeat 40          # on a GPU node (the GPU targets)

Prints images/s of
  ceiling    the forward pass alone, on tensors decoded, preprocessed and moved to the device
             beforehand (channels_last, folded BatchNorm and autocast as the actors use them)
  loop       a plain single-process loop: PIL decode, transform, forward (default memory
             layout, torch's default threads), h5py append
  raydata    Ray Data read_images().map_batches(<actor class>) with default settings
  extract    featurestore.extract on an embedded Ray instance, wall clock of the call
             (Ray start-up excluded; actor start-up, weights and compilation included)
  steady     the same run from the moment every actor was ready (what a long job sustains)
and the ratios extract/loop, extract/raydata, extract/ceiling and steady/ceiling. Not a
test: figures vary with the machine; the ratios are what the README quotes. On a shared
machine, --rounds N runs the methods N times, interleaved, and keeps each one's best.

--repeat N lists every image N times through symlinks (distinct paths, no extra disk), so
a small folder of full-size JPEGs can keep a fast GPU busy long enough to measure.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "data" / "animals"


def list_images(root: Path, limit: int | None) -> list[str]:
    from featurestore.sources import list_source

    ids = list_source(str(root)).ids
    return ids[:limit] if limit else ids


def replicate(paths: list[str], repeat: int, where: Path) -> list[str]:
    """Each path `repeat` times, as distinct symlinks under `where` (copy k of a/b.jpg is where/k/b/a.jpg's link)."""
    if repeat <= 1:
        return list(paths)
    out = []
    for k in range(repeat):
        for p in paths:
            src = Path(p)
            dst = where / f"r{k:03d}" / src.parent.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.is_symlink():
                os.symlink(src.resolve(), dst)
            out.append(str(dst))
    return out


def load(model: str, precision: str, device: str, channels_last: bool, fold_batchnorm: bool = False):
    import featurestore

    bb = featurestore.load_backbone(model, weights="none", precision=precision, device=device,
                                    channels_last=channels_last, fold_batchnorm=fold_batchnorm)
    bb.eval()
    return bb


def resolve_batch(bb, batch_size, device) -> int:
    from featurestore.extractor import auto_batch_size

    if batch_size != "auto":
        return int(batch_size)
    return auto_batch_size([bb], torch.device(device))[0]


def preprocessed(bb, paths: list[str]) -> torch.Tensor:
    """The images at `paths`, decoded and preprocessed as the actors do: a normalised [N, 3, h, w] batch."""
    from featurestore.decode import decode_image

    return torch.stack([bb.preprocess(decode_image(Path(p).read_bytes(), p, draft_size=bb.preprocessing.draft_size))
                        for p in paths])


def bench_ceiling(bb, paths, batch_size, device) -> float:
    """Forward only: distinct images decoded once, batches on the device beforehand, cycled to len(paths)."""
    unique = list(dict.fromkeys(os.path.realpath(p) for p in paths))[: max(batch_size * 8, 64)]
    xs = preprocessed(bb, unique)
    while len(xs) < batch_size:
        xs = torch.cat([xs, xs])
    batches = [xs[i:i + batch_size].to(device) for i in range(0, len(xs) - batch_size + 1, batch_size)]
    if bb.channels_last:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    n_batches = max(1, -(-len(paths) // batch_size))
    with torch.inference_mode():
        for b in batches[:2]:
            bb(b)  # warm-up (cudnn autotuning, compilation)
        sync(device)
        t = time.perf_counter()
        for k in range(n_batches):
            bb(batches[k % len(batches)])
        sync(device)
    return n_batches * batch_size / (time.perf_counter() - t)


def bench_loop(bb, paths, batch_size, device, out: Path) -> float:
    """What a careful user writes by hand: decode, transform, forward, write, one process."""
    import h5py
    from PIL import Image

    dim = None
    t = time.perf_counter()
    with h5py.File(out, "w") as f, torch.inference_mode():
        rows = 0
        for i in range(0, len(paths), batch_size):
            imgs = []
            for p in paths[i:i + batch_size]:
                with Image.open(p) as im:
                    imgs.append(bb.preprocess(im.convert("RGB")))
            feats = next(iter(bb(torch.stack(imgs).to(device)).values())).float().cpu().numpy()
            if dim is None:
                dim = feats.shape[1]
                ds = f.create_dataset("features", (len(paths), dim), dtype="float32")
            ds[rows:rows + len(feats)] = feats
            rows += len(feats)
    return len(paths) / (time.perf_counter() - t)


class RayDataEmbedder:
    """The batch-inference pattern of Ray's examples: a callable class holding the model."""

    def __init__(self, model: str, precision: str):
        import featurestore

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bb = featurestore.load_backbone(model, weights="none", precision=precision, device=self.device)
        self.bb.eval()

    def __call__(self, batch):
        from PIL import Image

        x = torch.stack([self.bb.preprocess(Image.fromarray(np.asarray(im))) for im in batch["image"]])
        with torch.inference_mode():
            out = next(iter(self.bb(x.to(self.device)).values()))
        return {"features": out.float().cpu().numpy()}


def bench_raydata(model, precision, paths, use_gpu: bool, actors: int | None = None) -> float:
    """Ray Data's default for a callable class is an autoscaling actor pool (1 to unlimited
    actors, one CPU or GPU each); `actors` fixes the pool's size instead."""
    import ray

    t = time.perf_counter()
    ds = ray.data.read_images(paths, mode="RGB")
    compute = {} if actors is None else {"compute": ray.data.ActorPoolStrategy(size=actors)}
    ds = ds.map_batches(RayDataEmbedder, fn_constructor_args=(model, precision), num_gpus=1 if use_gpu else 0,
                        **compute)
    n = 0
    for batch in ds.iter_batches(batch_size=None):
        n += len(batch["features"])
    assert n == len(paths), (n, len(paths))
    return n / (time.perf_counter() - t)


def bench_extract(model, precision, paths, batch_size, out: Path, shard_size=None, **kw) -> tuple[float, float, dict]:
    """(wall images/s, steady images/s, first actor's info) of featurestore.extract.

    Default shard size: extract's own (at least two shards per actor on a small input).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from featurestore.config import ExtractConfig
    from featurestore.engine import extract

    manifest = out.with_suffix(".csv")
    pacsv.write_csv(pa.table({"path": paths}), manifest)
    t = time.perf_counter()
    res = extract(ExtractConfig(
        source=str(manifest), output=str(out), model=model, weights="none", precision=precision,
        batch_size=batch_size, shard_size=shard_size, quiet=True, overwrite=True, **kw))
    wall = time.perf_counter() - t
    assert res.rows == len(paths), res.summary()
    info = {**(res.actor_info[0] if res.actor_info else {}), "actors": res.actors}
    return len(paths) / wall, res.steady_images_per_second, info


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


METHODS = ("ceiling", "loop", "raydata", "extract", "steady")


def bench_model(model, precision, label, paths, device, args, extra, skip, tmp) -> dict[str, float]:
    """One table row: every method on one model in one precision, best of the rounds."""
    bb = load(model, precision, device, channels_last=True,  # as the actors run it
              fold_batchnorm=not args.no_fold)
    plain = load(model, precision, device, channels_last=False)  # as a user's loop would
    batch = resolve_batch(bb, args.batch_size, device)
    if args.compile:
        from featurestore.extractor import compile_backbones

        compile_backbones([bb], None, batch, torch.device(device))
    r: dict[str, float] = {}
    info = {}

    def keep(key: str, value: float) -> None:
        r[key] = max(r.get(key, 0.0), value)  # best of the rounds: the least disturbed one

    for _ in range(args.rounds):  # methods interleaved, so a busy spell hurts all of them alike
        if "ceiling" not in skip:
            keep("ceiling", bench_ceiling(bb, paths, batch, device))
        if "loop" not in skip:
            keep("loop", bench_loop(plain, paths, batch, device, tmp / f"{model}-loop.h5"))
        if "raydata" not in skip:
            keep("raydata", bench_raydata(model, precision, paths, device == "cuda", args.raydata_actors))
        if "extract" not in skip:
            wall, steady, info = bench_extract(model, precision, paths, args.batch_size,
                                               tmp / f"{model}-{precision}-store", args.shard_size, **extra)
            keep("extract", wall)
            keep("steady", steady)
    del bb, plain

    def ratio(a, b):
        return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"

    print(f"{label:<28}" + "".join(f"{r[k]:>10.1f}" if k in r else f"{'-':>10}" for k in METHODS)
          + f"{ratio('extract', 'loop'):>10}{ratio('extract', 'raydata'):>10}"
          + f"{ratio('extract', 'ceiling'):>10}{ratio('steady', 'ceiling'):>10}", flush=True)
    if info:
        print(f"#   {label}: ceiling/loop batch {batch}; {info.get('actors')} actor(s): {info.get('device')}, "
              f"{info.get('batch_note')}, compile {info.get('compile')}, {info.get('fold')}", flush=True)
    return r


def batch_arg(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("give a positive number of images, or auto")
    return n


def precisions_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ("fp32", "bf16", "fp16")]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"give fp32, bf16 or fp16, or a comma list of them without repeats, "
                                         f"not {text!r}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--repeat", type=int, default=1, help="list every image N times (symlinks)")
    ap.add_argument("--models", default="resnet18,mobilenet_v3_small")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda where available")
    ap.add_argument("--precision", default="fp32", type=precisions_arg,
                    help="fp32, bf16 or fp16, or a comma list (fp32,bf16): a row per model and precision, then "
                         "each method's rate in the later precisions against the first's")
    ap.add_argument("--decode", default="draft", choices=("draft", "full", "gpu"), help="extract's --decode")
    ap.add_argument("--batch-size", type=batch_arg, default=32, help="images per forward, or auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile (the ceiling's model and the actors')")
    ap.add_argument("--no-fold", action="store_true",
                    help="extract with --no-fold-batchnorm, and a ceiling without folding, as before it existed")
    ap.add_argument("--actors", type=int, default=None, help="extract's --actors")
    ap.add_argument("--shard-size", type=int, default=None, help="extract's --shard-size (default: extract's own)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every method N times, interleaved, and keep each one's best (shared machines)")
    ap.add_argument("--skip", default="", help="comma list of methods to skip: ceiling,loop,raydata,extract")
    ap.add_argument("--raydata-actors", type=int, default=None,
                    help="a fixed Ray Data actor pool of N (default: Ray Data's own, an autoscaling pool)")
    args = ap.parse_args(argv)
    if not args.images.exists():
        print(f"no images at {args.images}; pass --images PATH", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    import ray

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the actors do
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-"))
    paths = replicate(list_images(args.images, args.limit), args.repeat, tmp / "images")
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    cpu = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    print(f"# {len(paths)} images ({args.repeat}x) from {args.images}; {cpu} CPUs; device {device}; GPU: {gpu}; "
          f"torch {torch.__version__}; precision {','.join(args.precision)}; decode {args.decode}; "
          f"batch {args.batch_size}"
          f"{'; compile' if args.compile else ''}{'; no fold' if args.no_fold else ''}; best of {args.rounds} round(s)")
    print(f"{'model':<28}{'ceiling':>10}{'loop':>10}{'raydata':>10}{'extract':>10}{'steady':>10}"
          f"{'ext/loop':>10}{'ext/rayd':>10}{'ext/ceil':>10}{'stdy/ceil':>10}")
    extra = {"decode": args.decode, "compile": args.compile, "actors": args.actors,
             "fold_batchnorm": not args.no_fold}
    if device == "cpu":
        extra["gpus_per_actor"] = 0
    try:
        for model in args.models.split(","):
            rates = {}
            for precision in args.precision:
                label = model if len(args.precision) == 1 else f"{model} {precision}"
                rates[precision] = bench_model(model, precision, label, paths, device, args, extra, skip, tmp)
            first = args.precision[0]
            for precision in args.precision[1:]:
                print(f"#   {model}: {precision} / {first}: " + ", ".join(
                    f"{k} {rates[precision][k] / rates[first][k]:.2f}x" for k in METHODS
                    if k in rates[precision] and k in rates[first]), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
