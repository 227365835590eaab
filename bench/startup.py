"""The driver's start-up with torchvision weights enums: the weights check before Ray's start, or beside it.

    python bench/startup.py --rounds 3

With `--weights IMAGENET1K_V2` (any torchvision enum), the driver resolves the enum and makes
sure the weights are in torch's cache before any actor starts; resolving it imports torch and
torchvision (seconds). featurestore.engine runs that check in a thread while Ray starts, and
records the member's URL (featurestore.layer_names), so that later runs find the file without
the import. Each round times four fresh processes, interleaved:

  sequential  engine.preflight's check, then engine.connect (an embedded Ray), one after the other
  parallel    the check in a thread while engine.connect runs, nothing recorded yet (a first run)
  recorded    the same with the URL recorded (every later run of extract)
  ray only    engine.connect alone: the floor

Offline here, so the check finds a placeholder file at the cache path in a temporary
TORCH_HOME (it only checks that the file is there; nothing loads it). The first two modes get
an empty record folder each time (FEATURESTORE_LAYER_CACHE). Prints seconds until Ray is up
and the check is done, best of the rounds per mode.
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
elif mode in ("parallel", "recorded"):
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
    modes = ("sequential", "parallel", "recorded", "ray only")
    best = {m: float("inf") for m in modes}
    with tempfile.TemporaryDirectory(prefix="fs-startup-") as home:
        placeholder_cache(home, a.model)
        recorded = os.path.join(home, "recorded")
        env = dict(os.environ, TORCH_HOME=home, FEATURESTORE_LAYER_CACHE=recorded)
        subprocess.run([sys.executable, "-c", CHILD, "sequential", a.model], check=True, capture_output=True,
                       env=env)  # records the URL for the "recorded" mode
        for r in range(a.rounds):
            for mode in modes:
                fresh = tempfile.mkdtemp(dir=home)  # nothing recorded: a first run
                run_env = env if mode == "recorded" else dict(env, FEATURESTORE_LAYER_CACHE=fresh)
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", CHILD, mode, a.model], capture_output=True,
                                     text=True, env=run_env)
                wall = time.perf_counter() - t0
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return 1
                inside = float(out.stdout.strip().splitlines()[-1])
                best[mode] = min(best[mode], inside)
                print(f"round {r + 1}  {mode:<10}  ready after {inside:5.2f} s  (process {wall:5.2f} s)")
    print(f"\nbest of {a.rounds}: " + ", ".join(f"{m} {best[m]:.2f} s" for m in modes)
          + f"; parallel saves {best['sequential'] - best['parallel']:.2f} s, recorded "
          f"{best['sequential'] - best['recorded']:.2f} s; over Ray's start alone, parallel costs "
          f"{best['parallel'] - best['ray only']:.2f} s, recorded {best['recorded'] - best['ray only']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
