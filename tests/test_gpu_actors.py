"""GPU actors on a Ray node that declares a GPU torch cannot use (no GPU here: Ray is told it has one).

This is what a GPU node with a CPU-only torch, or without a working driver, looks like: Ray
schedules one actor per GPU and sets CUDA_VISIBLE_DEVICES for it, and the actor's torch
sees no device. The run must stop with a message that says what to install or pass, not
run the job on the few threads a GPU actor keeps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featurestore

pytestmark = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="needs a machine whose torch sees no CUDA device")

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    import featurestore

    src, out = sys.argv[1], sys.argv[2]
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    said = {}
    try:
        featurestore.extract(source=src, output=out, model="mobilenet_v3_small", weights="none", input_size=32,
                             quiet=True)
        said["gpu"] = "no error"
    except featurestore.ExtractError as exc:
        said["gpu"] = str(exc)
    # the same output, CPU actors on the node that declares a GPU
    res = featurestore.extract(source=src, output=out, model="mobilenet_v3_small", weights="none", input_size=32,
                               quiet=True, gpus_per_actor=0)
    said["cpu"] = {"rows": res.rows, "devices": sorted({a["device"] for a in res.actor_info})}
    print("RESULT " + json.dumps(said))
""")


def test_a_gpu_that_torch_cannot_use_stops_the_run_and_says_what_to_do(tmp_path: Path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "src" / c / f"{i}.jpg")
    out = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "src"), str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    said = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    gpu = said["gpu"]
    assert gpu.startswith("a GPU actor on node "), gpu
    assert "cuda asked for, but torch " in gpu and ("CPU-only build" in gpu or "sees no CUDA device" in gpu), gpu
    assert gpu.endswith("Install a CUDA build of torch on the GPU nodes (see pytorch.org/get-started), "
                        "or pass --gpus-per-actor 0 to run on CPUs"), gpu
    # nothing computed on the CPU in the GPU actor's place; the CPU run then writes the whole store
    assert said["cpu"] == {"rows": 6, "devices": ["cpu"]}
    store = featurestore.open(str(out))
    assert len(store) == 6 and store.label_names == ["cat", "dog"]
