"""From command to store: `featurestore extract` as a user runs it, against a plain loop script.

    python bench/cold.py                                         # mobilenet_v3_small and resnet18, 900 Animals
    python bench/cold.py --models mobilenet_v3_small --rounds 3

bench/throughput.py times the extract() call on a Ray instance that is already up, in a
process that has already imported torch; that is what a long job sustains. A user who
types one command also pays for everything around it, so here every method is a fresh
process, timed from its start to its exit:

  loop     `python bench/cold.py --loop-child ...`: import torch and torchvision, build the
           model, then PIL decode, transform, forward, h5py append, one process
  extract  `featurestore extract SRC OUT --model M --weights none --quiet`: start an
           embedded Ray, start the actors, extract, commit, stop Ray

Both read the same images with the same model and random weights. Prints seconds and
images/s per method and the ratio extract/loop. --rounds N runs the methods N times,
interleaved, and keeps each one's best (a shared machine's noise only ever slows a run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import DEFAULT_IMAGES, list_images  # noqa: E402


def loop_child(images: Path, model: str, batch_size: int, out: Path) -> None:
    """The plain loop, in this fresh process: every import and the model build count."""
    import torch  # noqa: F401  (timed: part of what the loop pays)

    from throughput import bench_loop, load

    bb = load(model, "fp32", "cpu", channels_last=False)
    bench_loop(bb, list_images(images, None), batch_size, "cpu", out)


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--models", default="mobilenet_v3_small,resnet18")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--loop-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.images.exists():
        print(f"no images at {args.images}; pass --images PATH", file=sys.stderr)
        return 2
    if args.loop_child:
        loop_child(args.images, args.models, args.batch_size, args.out)
        return 0

    n = len(list_images(args.images, None))
    tmp = Path(tempfile.mkdtemp(prefix="fs-cold-"))
    print(f"# {n} images from {args.images}; {os.cpu_count()} CPUs; batch {args.batch_size}; fresh processes, "
          f"start to exit; best of {args.rounds} round(s)")
    print(f"{'model':<22}{'loop s':>10}{'extract s':>11}{'loop img/s':>12}{'extract img/s':>15}{'ext/loop':>10}")
    try:
        for model in args.models.split(","):
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                loop = timed([sys.executable, str(Path(__file__).resolve()), "--loop-child", "--images",
                              str(args.images), "--models", model, "--batch-size", str(args.batch_size),
                              "--out", str(tmp / f"{model}-loop.h5")])
                store = tmp / f"{model}-store"
                shutil.rmtree(store, ignore_errors=True)
                ext = timed([sys.executable, "-m", "featurestore", "extract", str(args.images), str(store),
                             "--model", model, "--weights", "none", "--batch-size", str(args.batch_size),
                             "--quiet"])
                best["loop"] = min(best.get("loop", loop), loop)
                best["extract"] = min(best.get("extract", ext), ext)
            print(f"{model:<22}{best['loop']:>10.1f}{best['extract']:>11.1f}{n / best['loop']:>12.1f}"
                  f"{n / best['extract']:>15.1f}{best['loop'] / best['extract']:>9.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
