"""The driver's start-up with torchvision weights enums: the weights check before Ray's start, or beside it.

    python bench/startup.py --rounds 3

With `--weights IMAGENET1K_V2` (any torchvision enum), the driver resolves the enum and makes
sure the weights are in torch's cache before any actor starts; that imports torch and
torchvision (seconds). featurestore.engine runs that check in a thread while Ray starts.
Each round times three fresh processes, interleaved:

  sequential  engine.preflight's check, then engine.connect (an embedded Ray), one after the other
  parallel    the check in a thread while engine.connect runs (what extract does)
  ray only    engine.connect alone: the floor

Offline here, so the check finds a placeholder file at the cache path in a temporary
TORCH_HOME (it only checks that the file is there; nothing loads it). Prints seconds until
Ray is up and the check is done, best of the rounds per mode.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time
t0 = time.perf_counter()
from featurestore.config import BackboneConfig
from featurestore.engine import _InBackground, connect, preflight
check = preflight(BackboneConfig(model=sys.argv[2], weights="DEFAULT"))
mode = sys.argv[1]
if mode == "sequential":
    check(); connect(None)
elif mode == "parallel":
    background = _InBackground([check]); connect(None); background.result()
else:
    connect(None)
print(time.perf_counter() - t0)
"""


def placeholder_cache(torch_home: str, model: str) -> None:
    env = dict(os.environ, TORCH_HOME=torch_home)
    code = ("import os, sys; from torchvision.models import get_model_weights; "
            "from featurestore.weights import _hub_cache_file; "
            f"p = _hub_cache_file(get_model_weights({model!r}).DEFAULT.url); "
            "os.makedirs(os.path.dirname(p), exist_ok=True); open(p, 'wb').close()")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    modes = ("sequential", "parallel", "ray only")
    best = {m: float("inf") for m in modes}
    with tempfile.TemporaryDirectory(prefix="fs-startup-") as home:
        placeholder_cache(home, a.model)
        env = dict(os.environ, TORCH_HOME=home)
        for r in range(a.rounds):
            for mode in modes:
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", CHILD, mode, a.model], capture_output=True,
                                     text=True, env=env)
                wall = time.perf_counter() - t0
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return 1
                inside = float(out.stdout.strip().splitlines()[-1])
                best[mode] = min(best[mode], inside)
                print(f"round {r + 1}  {mode:<10}  ready after {inside:5.2f} s  (process {wall:5.2f} s)")
    print(f"\nbest of {a.rounds}: " + ", ".join(f"{m} {best[m]:.2f} s" for m in modes)
          + f"; parallel saves {best['sequential'] - best['parallel']:.2f} s, "
          f"costs {best['parallel'] - best['ray only']:.2f} s over Ray's start alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
