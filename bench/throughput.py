"""Throughput: featurestore extract against its baselines, same images and model, one run.

    python bench/throughput.py                       # resnet18 and mobilenet_v3_small on ../shared/data/animals
    python bench/throughput.py --models resnet50 --precision bf16 --images PATH   # on a GPU node

Prints images/s of
  ceiling    the forward pass alone, on tensors decoded and preprocessed beforehand
  loop       a plain single-process loop: PIL decode, transform, forward, h5py append
  raydata    Ray Data read_images().map_batches(<actor class>) with default settings
  extract    featurestore.extract on an embedded Ray instance (Ray start-up excluded)
and the ratios extract/loop, extract/raydata, extract/ceiling. Not a test: figures vary
with the machine; the ratios are what the README quotes.
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


def load(model: str, precision: str, device: str):
    import featurestore

    bb = featurestore.load_backbone(model, weights="none", precision=precision, device=device)
    bb.eval()
    return bb


def bench_ceiling(bb, paths, batch_size, device) -> float:
    from featurestore.decode import decode_image

    xs = torch.stack([bb.preprocess(decode_image(Path(p).read_bytes(), p)) for p in paths])
    batches = [xs[i:i + batch_size].to(device) for i in range(0, len(xs), batch_size)]
    with torch.inference_mode():
        bb(batches[0])  # warm-up
        sync(device)
        t = time.perf_counter()
        for b in batches:
            bb(b)
        sync(device)
    return len(paths) / (time.perf_counter() - t)


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


def bench_raydata(model, precision, paths) -> float:
    import ray

    t = time.perf_counter()
    ds = ray.data.read_images(paths, mode="RGB")
    ds = ds.map_batches(RayDataEmbedder, fn_constructor_args=(model, precision), concurrency=1,
                        num_gpus=1 if torch.cuda.is_available() else 0)
    n = 0
    for batch in ds.iter_batches(batch_size=None):
        n += len(batch["features"])
    assert n == len(paths), (n, len(paths))
    return n / (time.perf_counter() - t)


def bench_extract(model, precision, paths, batch_size, out: Path, **kw) -> float:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    import featurestore

    manifest = out.with_suffix(".csv")
    pacsv.write_csv(pa.table({"path": paths}), manifest)
    t = time.perf_counter()
    res = featurestore.extract(featurestore.ExtractConfig(
        source=str(manifest), output=str(out), model=model, weights="none", precision=precision,
        batch_size=batch_size, shard_size=max(256, len(paths) // 4), quiet=True, overwrite=True, **kw))
    assert res.rows == len(paths), res.summary()
    return len(paths) / (time.perf_counter() - t)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--models", default="resnet18,mobilenet_v3_small")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma list of methods to skip: ceiling,loop,raydata,extract")
    args = ap.parse_args(argv)
    if not args.images.exists():
        print(f"no images at {args.images}; pass --images PATH", file=sys.stderr)
        return 2
    import ray

    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = list_images(args.images, args.limit)
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-"))
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    cpu = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    print(f"# {len(paths)} images from {args.images}; {cpu} CPUs; GPU: {gpu}; torch {torch.__version__}; "
          f"precision {args.precision}; batch {args.batch_size}")
    print(f"{'model':<22}{'ceiling':>10}{'loop':>10}{'raydata':>10}{'extract':>10}"
          f"{'ext/loop':>10}{'ext/rayd':>10}{'ext/ceil':>10}")
    try:
        for model in args.models.split(","):
            bb = load(model, args.precision, device)
            r = {}
            if "ceiling" not in skip:
                r["ceiling"] = bench_ceiling(bb, paths, args.batch_size, device)
            if "loop" not in skip:
                r["loop"] = bench_loop(bb, paths, args.batch_size, device, tmp / f"{model}-loop.h5")
            del bb
            if "raydata" not in skip:
                r["raydata"] = bench_raydata(model, args.precision, paths)
            if "extract" not in skip:
                r["extract"] = bench_extract(model, args.precision, paths, args.batch_size, tmp / f"{model}-store")

            def ratio(a, b):
                return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"

            print(f"{model:<22}" + "".join(f"{r[k]:>10.1f}" if k in r else f"{'-':>10}"
                                           for k in ("ceiling", "loop", "raydata", "extract"))
                  + f"{ratio('extract', 'loop'):>10}{ratio('extract', 'raydata'):>10}{ratio('extract', 'ceiling'):>10}",
                  flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
