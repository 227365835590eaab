"""BatchNorm folding: the forward pass with and without it, same network and batches, one run.

    python bench/fold.py                       # five CNNs, one torch thread (as a CPU actor runs)
    python bench/fold.py --threads 2 --rounds 5

Each model is loaded twice the way the actors load it (channels_last), once with
fold_batchnorm=True. Both run the same batches of real photos, interleaved round by round;
the best round of each is kept. Printed: images/s of both, their ratio, and the largest
feature difference relative to the features' scale. EfficientNet-Lite0 and MobileNetV2
use the real ImageNet weights in ../shared/weights when present (a random-init network's
BatchNorms are identities, and its activations can shrink to denormal floats); the
others are random-init. Not a test: the ratio is what the README quotes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
sys.path.insert(0, str(HERE))

from throughput import DEFAULT_IMAGES, list_images, preprocessed  # noqa: E402
REAL = {"efficientnet_lite0": SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth",
        "mobilenet_v2": SHARED / "weights" / "mobilenet_v2_imagenet_dequantized.pth"}


def batches(bb, images: Path, batch_size: int, count: int) -> list[torch.Tensor]:
    ids = list_images(images, None)
    x = preprocessed(bb, ids[:: max(1, len(ids) // (batch_size * count))][: batch_size * count])
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def rate(bb, xs: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        for x in xs:
            bb(x)
        return sum(len(x) for x in xs) / (time.perf_counter() - t)


def main() -> int:
    import featurestore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v3_small,mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a CPU actor of one core has one)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3, help="batches per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# forward only, CPU, {args.threads} torch thread(s), batch {args.batch_size}, {args.batches} batches "
          f"a round, best of {args.rounds} interleaved rounds; torch {torch.__version__}")
    print(f"{'model':<20}{'weights':<10}{'plain':>9}{'folded':>9}{'ratio':>8}  {'folded BN':<12}{'max diff / scale':>17}")
    for model in args.models.split(","):
        real = REAL.get(model)
        weights = str(real) if real is not None and real.exists() else "none"
        plain = featurestore.load_backbone(model, weights=weights, channels_last=True)
        folded = featurestore.load_backbone(model, weights=weights, channels_last=True, fold_batchnorm=True)
        xs = batches(plain, args.images, args.batch_size, args.batches)
        with torch.inference_mode():
            a, b = plain(xs[0]), folded(xs[0])
        rel = max(float((a[k] - b[k]).abs().max()) / max(float(a[k].abs().max()), 1e-30) for k in a)
        best = {"plain": 0.0, "folded": 0.0}
        rate(plain, xs[:1]), rate(folded, xs[:1])  # warm-up
        for _ in range(args.rounds):
            best["plain"] = max(best["plain"], rate(plain, xs))
            best["folded"] = max(best["folded"], rate(folded, xs))
        n = folded.folded
        print(f"{model:<20}{'real' if weights != 'none' else 'random':<10}{best['plain']:>9.1f}{best['folded']:>9.1f}"
              f"{best['folded'] / best['plain']:>7.2f}x  {f'{n.folded}/{n.batchnorms}':<12}{rel:>17.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
