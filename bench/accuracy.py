"""Accuracy of every head on real data: Animals (3 classes) and SMILEs (2 classes, imbalanced).

    python bench/accuracy.py                      # pretrained EfficientNet-Lite0 (weights DEFAULT)
    python bench/accuracy.py --weights none       # randomly initialised backbone: the floor
    python bench/accuracy.py --engine loop        # extract with a plain loop instead of the Ray engine
    python bench/accuracy.py --seeds 0 1 2 3 4    # five seeded splits: mean and spread, not one draw

Extracts features once per dataset into a store (reused when present under --work), then
trains each head with its default sweep (5-fold CV on the training part; class weights
balanced where the classes are imbalanced) and prints test accuracy and balanced accuracy.
Not a test: the numbers depend on the weights and the data.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATA = HERE.parent.parent / "shared" / "data"
DATASETS = {"animals": DATA / "animals", "smiles": DATA / "smiles"}
HEADS = ["logreg", "linear-svm", "svm", "sgd"]


def extract_ray(src: Path, out: str, model: str, weights: str, batch_size: int, layers=(), pooling="avg",
                crop="center", precision="fp32") -> None:
    from featurestore.config import ExtractConfig
    from featurestore.engine import extract

    res = extract(ExtractConfig(source=str(src), output=out, model=model, weights=weights, layers=list(layers),
                                pooling=pooling, crop=crop, batch_size=batch_size, precision=precision, quiet=True))
    print(f"  extracted {src.name}: {res.summary() if hasattr(res, 'summary') else res}", flush=True)


def extract_loop(src: Path, out: str, model: str, weights: str, batch_size: int, layers=(), pooling="avg",
                 crop="center", precision="fp32") -> None:
    """One process, no Ray: list, decode, forward, write_store."""
    import torch

    from featurestore.backbones import load_backbone
    from featurestore.decode import BadImage, load_image
    from featurestore.sources import list_source
    from featurestore.store import write_store

    listing = list_source(str(src))
    bb = load_backbone(model, weights, layers=list(layers) or None, pooling=pooling, crop=crop, precision=precision)
    layer = bb.layers[0]
    ids, labels, feats = [], [], []
    for a in range(0, len(listing.ids), batch_size):
        xs = []
        for i in range(a, min(a + batch_size, len(listing.ids))):
            try:
                xs.append(bb.preprocess(load_image(listing.ids[i])))
            except BadImage:
                continue
            ids.append(listing.ids[i])
            labels.append(int(listing.labels[i]))
        if xs:
            feats.append(bb(torch.stack(xs))[layer].float().numpy())
    write_store(out, {layer: np.concatenate(feats)}, np.array(labels), listing.label_names, ids=ids,
                config=bb.config(), overwrite=True)
    print(f"  extracted {src.name} with a plain loop: {len(ids)} images", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="DEFAULT", help="DEFAULT (pretrained) or none (random init)")
    ap.add_argument("--layers", nargs="+", default=[], help="cut layer(s) (default: the model's penultimate layer)")
    ap.add_argument("--pooling", default="avg", choices=["avg", "max", "flatten"])
    ap.add_argument("--crop", default="center", choices=["center", "squash", "pad"],
                    help="squash keeps the whole image (SMILEs: the mouth sits near the border)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: the forward pass in bf16 autocast (fast on CPUs with AVX512-BF16 or AMX)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--heads", nargs="+", default=HEADS, choices=HEADS)
    ap.add_argument("--engine", choices=["ray", "loop"], default="ray",
                    help="ray: featurestore.extract (the product path); loop: one process, no Ray")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "featurestore-bench-accuracy"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="repeat the split with each seed and add mean and spread (how much one split moves)")
    args = ap.parse_args(argv)

    import classifiers
    from featurestore.store import open_store

    print("command:", "python bench/accuracy.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])), flush=True)
    rows = []
    for name in args.datasets:
        src = DATASETS[name]
        if not src.exists():
            print(f"skip {name}: {src} not found", file=sys.stderr)
            continue
        tag = f"{name}-{args.model}-{args.weights}-{'+'.join(args.layers) or 'default'}-{args.pooling}-{args.crop}"
        tag += "" if args.precision == "fp32" else f"-{args.precision}"  # fp32 stores keep their old names
        store = os.path.join(args.work, tag.replace("/", "_").replace(":", "_"))
        t0 = time.perf_counter()
        try:
            reader = open_store(store)
            ok = reader.status == "complete"
        except Exception:
            ok = False
        if not ok:
            run = extract_ray if args.engine == "ray" else extract_loop
            run(src, store, args.model, args.weights, args.batch_size, args.layers, args.pooling, args.crop,
                args.precision)
            reader = open_store(store)
        t_extract = time.perf_counter() - t0
        counts = np.bincount(reader.labels[reader.labels >= 0])
        cw = "balanced" if counts.max() > 1.5 * counts.min() else None
        print(f"{name}: {len(reader)} rows, classes {dict(zip(reader.label_names, counts.tolist()))}, "
              f"layer {reader.layers[0]} {reader.features().shape[1:]}, class_weight={cw}, extract {t_extract:.0f}s",
              flush=True)
        seeds = args.seeds or [args.seed]
        for kind in args.heads:
            scores = []
            for seed in seeds:
                t1 = time.perf_counter()
                h = classifiers.train(reader, head=kind, cv=args.cv, class_weight=cw, seed=seed)
                rep = h.report
                scores.append((rep["accuracy"], rep["balanced_accuracy"]))
                rows.append([name, kind, str(seed), f"{rep['accuracy'] * 100:.1f}",
                             f"{rep['balanced_accuracy'] * 100:.1f}", str(rep["n"]),
                             ", ".join(f"{k}={v}" for k, v in h.params.items()), f"{time.perf_counter() - t1:.1f}"])
                print("  " + "  ".join(rows[-1]), flush=True)
            if len(seeds) > 1:
                acc, bal = (np.array(s) * 100 for s in zip(*scores))
                rows.append([name, kind, f"mean of {len(seeds)}", f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}",
                             f"{bal.mean():.1f} ± {bal.std(ddof=1):.1f}", "", "", ""])
                print("  " + "  ".join(rows[-1]), flush=True)
    headers = ["dataset", "head", "split seed", "test acc %", "balanced acc %", "n test", "chosen", "train s"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)] if rows else [len(h) for h in headers]
    print()
    print(f"model {args.model}, weights {args.weights}, precision {args.precision}, "
          "split: stratified hash of ids (25% test; "
          "mean ± sample standard deviation over the split seeds)")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
