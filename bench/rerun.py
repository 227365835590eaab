"""A re-run of a finished extraction: answered from store.json, against starting the actors to decide.

    python bench/rerun.py --rounds 3

Builds one complete store of N Animals photos (spread over the classes; mobilenet_v3_small,
random weights), then times fresh `featurestore extract SRC OUT ...` processes, start to exit,
interleaved:

  actors decide   store.json without its stored request, as every store had before it
                  kept one: Ray and the actors start, compare the resolved configuration,
                  find every shard committed (the request is written back, and removed
                  again before the next round)
  from store.json the same command on the store as it is: nothing to compute, no actor

Prints seconds per round, the best of each, and their ratio.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import DEFAULT_IMAGES, list_images  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("-n", type=int, default=90, help="photos in the store (default 90)")
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fs-rerun-") as tmp:
        src = Path(tmp) / "src"
        ids = list_images(a.images, None)
        for p in map(Path, ids[:: max(1, len(ids) // a.n)][: a.n]):  # every class, a folder each
            (src / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, src / p.parent.name / p.name)
        out = Path(tmp) / "store"
        cmd = ["featurestore", "extract", str(src), str(out), "--model", a.model, "--weights", "none", "--quiet"]
        subprocess.run(cmd, check=True)
        meta_path = out / "store.json"

        def timed() -> float:
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            return time.perf_counter() - t0

        best = {"actors decide": float("inf"), "from store.json": float("inf")}
        for r in range(a.rounds):
            meta = json.loads(meta_path.read_text())
            meta.pop("request", None)
            meta_path.write_text(json.dumps(meta))
            full = timed()
            assert "request" in json.loads(meta_path.read_text()), "the full run should store the request"
            fast = timed()
            best["actors decide"] = min(best["actors decide"], full)
            best["from store.json"] = min(best["from store.json"], fast)
            print(f"round {r + 1}: actors decide {full:5.2f} s, from store.json {fast:5.2f} s")
    print(f"\n{a.n} photos, {a.model}, best of {a.rounds}: actors decide {best['actors decide']:.2f} s, "
          f"from store.json {best['from store.json']:.2f} s "
          f"({best['actors decide'] / best['from store.json']:.1f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
