"""Scaling on one node: actors 1..N and image counts x1 and x10, images/s and peak memory.

    python bench/scaling.py                                   # N = the CPU count, x1 = 300 images
    python bench/scaling.py --model resnet18 --base 300 --actors 1,2 --factor 10

For each actor count and each image count, runs featurestore.extract (embedded Ray,
fresh store) and samples, every 0.1 s, the resident memory (RSS) of the driver plus every
extraction actor process (`ray::ExtractorActor`); Ray's own daemons (raylet, GCS) are not
counted. Prints images/s (wall clock of the call, and after the actors were ready) and the
peak, with the ratios that matter: images/s against one actor, and peak(x10)/peak(x1):
memory must stay flat as the image count grows, because shards stream through a bounded
decode window and are committed one by one.

The larger counts reuse the images of --images through symlinks (distinct paths, no disk).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import DEFAULT_IMAGES, list_images, replicate  # noqa: E402


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _actor_pids() -> list[int]:
    """This driver's extraction actors: `ray::ExtractorActor...` processes whose raylet this process started.

    Other Ray instances on the machine (a colleague's tests) have their own raylets and are not counted.
    """
    me = os.getpid()
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                procs[int(name)] = f.read(200)
        except OSError:
            continue
    raylets = {pid for pid, cmd in procs.items() if b"raylet" in cmd.split(b"\0")[0] and _ppid(pid) == me}
    return [pid for pid, cmd in procs.items() if cmd.startswith(b"ray::ExtractorActor") and _ppid(pid) in raylets]


class PeakMemory:
    """Samples driver + actor RSS in a thread; .peak is the largest sum seen."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self.peak_actors = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            actors = sum(_rss_of(p) for p in _actor_pids())
            total = _rss_of(me) + actors
            self.peak = max(self.peak, total)
            self.peak_actors = max(self.peak_actors, actors)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(model: str, paths: list[str], actors: int, out: Path, batch_size, shard_size: int, cores: int) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from featurestore.config import ExtractConfig
    from featurestore.engine import extract

    manifest = out.with_suffix(".csv")
    pacsv.write_csv(pa.table({"path": paths}), manifest)
    with PeakMemory() as mem:
        t = time.perf_counter()
        res = extract(ExtractConfig(
            source=str(manifest), output=str(out), model=model, weights="none", batch_size=batch_size,
            shard_size=shard_size, actors=actors, cpus_per_actor=max(1, cores // actors), gpus_per_actor=0,
            quiet=True, overwrite=True))
        wall = time.perf_counter() - t
    assert res.rows == len(paths), res.summary()
    shutil.rmtree(out, ignore_errors=True)
    return {"ips": len(paths) / wall, "steady": res.steady_images_per_second, "peak": mem.peak,
            "peak_actors": mem.peak_actors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--base", type=int, default=300, help="images at x1")
    ap.add_argument("--factor", type=int, default=10, help="the larger count is base x factor")
    ap.add_argument("--actors", default=None, help="comma list of actor counts (default 1..CPU count)")
    ap.add_argument("--batch-size", default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args(argv)
    if not args.images.exists():
        print(f"no images at {args.images}; pass --images PATH", file=sys.stderr)
        return 2
    import ray
    import torch

    cores = os.cpu_count() or 1
    counts = [int(a) for a in args.actors.split(",")] if args.actors else list(range(1, cores + 1))
    batch = args.batch_size if str(args.batch_size) == "auto" else int(args.batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="fs-scaling-"))
    found = list_images(args.images, None)
    sizes = [args.base, args.base * args.factor]
    need = -(-sizes[-1] // len(found))
    pool = replicate(found, need, tmp / "images") if need > 1 else found
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    print(f"# {args.model}, random init; images from {args.images} ({len(found)} files, repeated by symlink); "
          f"{cores} CPUs; torch {torch.__version__}; batch {batch}; shard {args.shard_size}; "
          f"RSS = driver + ExtractorActor actors, sampled every 0.1 s")
    print(f"{'actors':>6}{'images':>8}{'img/s':>9}{'steady':>9}{'vs 1 actor':>12}{'peak MiB':>10}"
          f"{'actors MiB':>12}{f'peak x{args.factor}/x1':>13}")
    try:
        base: dict[int, float] = {}
        for a in counts:
            peaks = {}
            for n in sizes:
                r = run(args.model, pool[:n], a, tmp / f"store-{a}-{n}", batch, args.shard_size, cores)
                peaks[n] = r["peak"]
                if a == counts[0]:
                    base[n] = r["ips"]
                vs = r["ips"] / base[n]
                flat = f"{peaks[n] / peaks[sizes[0]]:.2f}x" if n != sizes[0] else "-"
                print(f"{a:>6}{n:>8}{r['ips']:>9.1f}{r['steady']:>9.1f}{vs:>11.2f}x{r['peak'] / 2**20:>10.0f}"
                      f"{r['peak_actors'] / 2**20:>12.0f}{flat:>13}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
