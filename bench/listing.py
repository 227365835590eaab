"""How long the pure-Python part of listing takes for N synthetic object keys (default 1e6).

Times split_classes (class from the path, hidden/extension filtering), the sort and the
label ids -- everything list_source does after the one recursive fs.find/walk.
Usage: python bench/listing.py [N]
"""
from __future__ import annotations

import sys
import time

import numpy as np

from featurestore.sources import _labels_from_names, split_classes


def main(n: int = 1_000_000) -> None:
    rng = np.random.default_rng(0)
    classes = [f"class_{i:03d}" for i in range(1000)]
    cls = rng.integers(0, len(classes), n)
    rels = [f"{classes[c]}/sub{i % 7}/img_{i:08d}.JPEG" for i, c in enumerate(cls)]
    rels += [f"{classes[0]}/.DS_Store", ".hidden/x.jpg", "README.txt", f"{classes[1]}/notes.txt"]
    rng.shuffle(rels)
    prefix = "s3://bucket/images/"
    t0 = time.perf_counter()
    kept, names = split_classes(rels)  # filter, sort, class per path
    t1 = time.perf_counter()
    ids = [prefix + r for r in kept]
    labels, label_names = _labels_from_names(names)
    t2 = time.perf_counter()
    assert len(ids) == n and len(label_names) == len(set(cls.tolist()))
    print(f"{n} paths: filter+sort+classes {t1 - t0:.2f}s, ids+label ids {t2 - t1:.2f}s, total {t2 - t0:.2f}s")


if __name__ == "__main__":
    main(int(float(sys.argv[1])) if len(sys.argv) > 1 else 1_000_000)
