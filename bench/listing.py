"""How long listing takes for a million inputs (a folder per class, or a manifest table).

    python bench/listing.py                 # 1e6 synthetic keys: the pure-Python part only
    python bench/listing.py --real 1e6      # also: a real folder of N empty .jpg files and a
                                            # Parquet manifest of N paths, listed end to end

The synthetic run times split_classes (class from the path, hidden/extension filtering),
the sort and the label ids -- everything list_source does after the one recursive
fs.find/walk -- and the check every resume makes: the new listing compared with the
stored plan, unchanged and with 1% of the images new and 1% gone. --real writes N empty files (1000 class folders) under a temporary
directory, then times list_source + make_plan on the folder and on a manifest; the files
are deleted afterwards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from featurestore.sources import Listing, Plan, _labels_from_names, compare, list_source, make_plan, split_classes


def synthetic(n: int) -> None:
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
    print(f"synthetic  {n} keys: filter+sort+classes {t1 - t0:.2f}s, ids+label ids {t2 - t1:.2f}s, "
          f"total {t2 - t0:.2f}s")
    resume_check(Listing(ids, labels, label_names))


def resume_check(listing: Listing, shard_size: int = 1024) -> None:
    """A resume lists the source again and compares it with the stored plan (sources.compare)."""
    plan = Plan.from_table(make_plan(listing, shard_size).to_table())  # as read back from plan.parquet
    t0 = time.perf_counter()
    same = compare(plan, listing)
    t1 = time.perf_counter()
    k = max(1, len(listing) // 100)  # 1% new images, spread over the classes; 1% deleted
    grown = Listing(listing.ids[k:] + [f"{i}.new.jpg" for i in listing.ids[:k]],
                    np.concatenate([listing.labels[k:], listing.labels[:k]]), listing.label_names)
    t2 = time.perf_counter()
    delta = compare(plan, grown)
    appended = plan.appended(delta.new_ids, delta.new_labels)
    t3 = time.perf_counter()
    assert same.unchanged and len(delta.new_ids) == k and delta.gone == k and appended.num_shards > plan.num_shards
    print(f"resume     {len(listing)} planned: compare unchanged {t1 - t0:.2f}s; "
          f"{k} new + {k} gone: compare + append {t3 - t2:.2f}s")


def real(n: int, shard_size: int = 1024) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tempfile.mkdtemp(prefix="fs-listing-")
    try:
        t0 = time.perf_counter()
        per = -(-n // 1000)
        made = 0
        for c in range(1000):
            d = os.path.join(root, "images", f"class_{c:03d}")
            os.makedirs(d)
            for i in range(min(per, n - made)):
                open(os.path.join(d, f"img_{made:08d}.jpg"), "wb").close()
                made += 1
        print(f"(made {made} empty files in {time.perf_counter() - t0:.0f}s)")

        t0 = time.perf_counter()
        listing = list_source(os.path.join(root, "images"))
        t1 = time.perf_counter()
        plan = make_plan(listing, shard_size)
        t2 = time.perf_counter()
        assert len(listing.ids) == made and len(listing.label_names) == 1000
        print(f"folder     {made} files: list_source {t1 - t0:.2f}s, plan {t2 - t1:.2f}s "
              f"({plan.num_shards} shards), total {t2 - t0:.2f}s")

        manifest = os.path.join(root, "manifest.parquet")
        pq.write_table(pa.table({"path": listing.ids,
                                 "label": [listing.label_names[i] for i in listing.labels]}), manifest)
        t0 = time.perf_counter()
        table_listing = list_source(manifest)
        t1 = time.perf_counter()
        assert len(table_listing.ids) == made
        print(f"manifest   {made} rows:  list_source {t1 - t0:.2f}s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", nargs="?", type=float, default=1e6, help="synthetic keys (default 1e6)")
    ap.add_argument("--real", type=float, default=0, help="also list a real folder / manifest of this many files")
    a = ap.parse_args()
    synthetic(int(a.n))
    if a.real:
        real(int(a.real))


if __name__ == "__main__":
    main()
