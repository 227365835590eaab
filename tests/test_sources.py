"""Listing (folder per class, manifests) and the shard plan, on real files."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import featurestore
from featurestore.sources import (FilesystemUnavailable, Listing, Plan, SourceError, list_source, make_plan, read_bytes,
                                  split_classes)


def test_folder_per_class_sorted_with_labels(image_folder):
    root = image_folder({"dog": 2, "cat": 3, "ant": 1})
    listing = list_source(str(root))
    assert listing.label_names == ["ant", "cat", "dog"]
    assert listing.ids == sorted(listing.ids)
    assert all(os.path.isabs(i) and os.path.exists(i) for i in listing.ids)
    by_class = {os.path.basename(os.path.dirname(i)): int(l) for i, l in zip(listing.ids, listing.labels)}
    assert by_class == {"ant": 0, "cat": 1, "dog": 2}
    assert listing.labels.dtype == np.int64 and len(listing) == 6


def test_hidden_nested_and_non_images(image_folder):
    root = image_folder({"cat": 2, "dog": 2})
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / "._cat_0.jpg").write_bytes(b"appledouble")
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "x.jpg").write_bytes(b"x")
    (root / "dog" / ".cache").mkdir()
    (root / "dog" / ".cache" / "y.png").write_bytes(b"y")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "stray.jpg").write_bytes(b"root-level file has no class")
    nested = root / "dog" / "puppies" / "small"
    nested.mkdir(parents=True)
    (nested / "p.JPEG").write_bytes((root / "dog" / "dog_0.jpg").read_bytes())
    listing = list_source(str(root))
    names = [os.path.relpath(i, root) for i in listing.ids]
    assert names == ["cat/cat_0.jpg", "cat/cat_1.png", "dog/dog_0.jpg", "dog/dog_1.png", "dog/puppies/small/p.JPEG"]
    assert listing.labels.tolist() == [0, 0, 1, 1, 1]


def test_file_url_gives_the_same_listing(image_folder):
    root = image_folder()
    a = list_source(str(root))
    b = list_source(f"file://{root}")
    assert a.ids == b.ids and a.label_names == b.label_names
    assert np.array_equal(a.labels, b.labels)


def test_flat_folder_is_unlabeled(tmp_path, image_folder):
    src = image_folder({"x": 3})
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((src / "x").iterdir()):
        (flat / p.name).write_bytes(p.read_bytes())
    listing = list_source(str(flat))
    assert listing.label_names == [] and listing.labels.tolist() == [-1, -1, -1]


def test_missing_and_empty_folders_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        list_source(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found"):
        list_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="a.txt: a file, not a folder"):
        list_source(str(tmp_path / "empty" / "cls" / "a.txt"))


def test_csv_manifest_relative_paths_and_labels(image_folder, tmp_path):
    root = image_folder({"cat": 2, "dog": 2})
    sub = tmp_path / "lists"
    sub.mkdir()
    manifest = sub / "train.csv"
    rows = ["path,label", "../images/dog/dog_1.png,dog", "../images/cat/cat_0.jpg,cat",
            f"{root}/dog/dog_0.jpg,dog", "../images/cat/cat_1.png,"]
    manifest.write_text("\n".join(rows) + "\n")
    listing = list_source(str(manifest))
    assert listing.ids == sorted(str(p) for p in [root / "cat/cat_0.jpg", root / "cat/cat_1.png",
                                                  root / "dog/dog_0.jpg", root / "dog/dog_1.png"])
    assert listing.label_names == ["cat", "dog"]
    assert listing.labels.tolist() == [0, -1, 1, 1]  # empty label -> unlabeled
    assert all(os.path.exists(i) for i in listing.ids)


def test_parquet_manifest_unlabeled_and_custom_column(image_folder, tmp_path):
    root = image_folder({"cat": 2})
    files = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.*"))
    pq.write_table(pa.table({"file": files}), tmp_path / "m.parquet")
    listing = list_source(str(tmp_path / "m.parquet"), path_column="file")
    assert listing.label_names == [] and listing.labels.tolist() == [-1, -1]
    assert listing.ids == [str(tmp_path / f) for f in files]


def test_manifest_integer_labels_sort_numerically(tmp_path):
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg", "c.jpg"], "label": [10, 2, 2]}), tmp_path / "m.parquet")
    listing = list_source(str(tmp_path / "m.parquet"))
    assert listing.label_names == ["2", "10"]
    assert listing.labels.tolist() == [1, 0, 0]


def test_manifest_errors_name_the_problem(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(ValueError, match="no 'path' column.*file, label"):
        list_source(str(tmp_path / "m.csv"))
    (tmp_path / "d.csv").write_text("path\na.jpg\na.jpg\n")
    with pytest.raises(ValueError, match="more than once"):
        list_source(str(tmp_path / "d.csv"))
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        list_source(str(tmp_path / "missing.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 but no more")
    with pytest.raises(SourceError, match="junk.parquet: not a readable Parquet manifest"):
        list_source(str(tmp_path / "junk.parquet"))


def test_a_url_without_its_filesystem_package_names_what_to_install(tmp_path):
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(FilesystemUnavailable, match=r"gs://bucket/images: .*gcsfs.*install the fsspec implementation"):
        list_source("gs://bucket/images")
    with pytest.raises(featurestore.FilesystemUnavailable, match="gs://bucket/store"):
        featurestore.open("gs://bucket/store")
    assert featurestore.SourceError is SourceError


def test_split_classes_filters():
    kept, classes = split_classes(["b/x.jpg", "a/y.PNG", ".h/z.jpg", "a/.z.jpg", "a/b/.c/d.jpg",
                                   "top.jpg", "a/readme.md", "a/noext", "a/.jpg", "c/d/e.webp"])
    assert kept == ["a/y.PNG", "b/x.jpg", "c/d/e.webp"]
    assert classes == ["a", "b", "c"]


def test_plan_shards_and_table_round_trip():
    listing = Listing([f"/d/c/{i:02d}.jpg" for i in range(10)], np.arange(10) % 3, ["a", "b", "c"])
    plan = make_plan(listing, 4)
    assert plan.num_shards == 3
    specs = plan.shards()
    assert [len(s) for s in specs] == [4, 4, 2]
    assert specs[2].ids == listing.ids[8:] and specs[2].labels.tolist() == [2, 0]
    back = Plan.from_table(plan.to_table())
    assert back.ids == plan.ids and back.label_names == plan.label_names and back.shard_size == 4
    assert np.array_equal(back.labels, plan.labels)
    assert plan.to_table().column("shard").to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        make_plan(listing, 0)


def test_appended_plan_keeps_every_shard_and_round_trips():
    listing = Listing([f"/d/c/{i:02d}.jpg" for i in range(10)], np.arange(10) % 3, ["a", "b", "c"])
    plan = make_plan(listing, 4)
    grown = plan.appended(["/d/c/20.jpg", "/d/c/21.jpg", "/d/c/22.jpg"], np.array([1, -1, 0]))
    # the old shards stay as they were; the new inputs start a new shard after the short last one
    assert [grown.shard(i).ids for i in range(3)] == [s.ids for s in plan.shards()]
    assert grown.num_shards == 4 and grown.bounds(3) == (10, 13)
    assert grown.shard(3).labels.tolist() == [1, -1, 0]
    table = grown.to_table()
    assert table.column("shard").to_pylist() == [0] * 4 + [1] * 4 + [2] * 2 + [3] * 3
    back = Plan.from_table(table)
    assert back.starts.tolist() == [0, 4, 8, 10] and back.ids == grown.ids
    assert [len(s) for s in back.shards()] == [4, 4, 2, 3]
    # many new inputs are cut at shard_size rows
    big = plan.appended([f"/d/n/{i}.jpg" for i in range(9)], np.zeros(9, np.int64))
    assert [len(s) for s in big.shards()] == [4, 4, 2, 4, 4, 1]
    bad = table.set_column(2, "shard", pa.array([0] * 4 + [2] * 9))
    with pytest.raises(ValueError, match="steps of 1"):
        Plan.from_table(bad)


def test_compare_a_listing_with_its_stored_plan():
    from featurestore.sources import compare

    listing = Listing(["/r/cat/1.jpg", "/r/cat/2.jpg", "/r/dog/1.jpg"], [0, 0, 1], ["cat", "dog"])
    plan = make_plan(listing, 2)
    assert compare(plan, listing).unchanged
    # new images in a known class and a new class ("ant" sorts first: its listing ids all shift)
    grown = Listing(["/r/ant/1.jpg", "/r/cat/1.jpg", "/r/cat/2.jpg", "/r/cat/3.jpg", "/r/dog/1.jpg"],
                    [0, 1, 1, 1, 2], ["ant", "cat", "dog"])
    d = compare(plan, grown)
    assert d.new_ids == ["/r/ant/1.jpg", "/r/cat/3.jpg"] and d.new_labels.tolist() == [-1, 0]
    assert d.new_classes == ["ant"] and d.gone == 0 and d.relabeled == 0  # known ids kept their classes
    # an image removed, one moved to the other class
    d = compare(plan, Listing(["/r/cat/1.jpg", "/r/dog/1.jpg", "/r/dog/2.jpg"], [1, 1, 1], ["cat", "dog"]))
    assert d.gone == 1 and d.relabeled == 1 and d.new_ids == ["/r/dog/2.jpg"] and d.new_labels.tolist() == [1]
    # an unlabeled store growing with unlabeled images
    flat = make_plan(Listing(["/u/1.jpg"], [-1], []), 4)
    d = compare(flat, Listing(["/u/1.jpg", "/u/2.jpg"], [-1, -1], []))
    assert d.new_ids == ["/u/2.jpg"] and d.new_labels.tolist() == [-1] and not d.new_classes


def test_read_bytes_local(image_folder):
    root = image_folder({"cat": 1})
    p = next((root / "cat").iterdir())
    assert read_bytes(str(p)) == p.read_bytes() == read_bytes(f"file://{p}")
    with pytest.raises(FileNotFoundError):
        read_bytes(str(p) + ".gone")


def test_symlink_loops_do_not_break_listing(image_folder):
    root = image_folder({"cat": 1, "dog": 1})
    os.symlink(root / "dog" / "loop.jpg", root / "dog" / "loop.jpg")  # a file link to itself
    os.symlink(root, root / "cat" / "back")  # a folder link to an ancestor
    listing = list_source(str(root))
    names = [os.path.relpath(i, root) for i in listing.ids]
    assert "dog/loop.jpg" in names  # listed: decoding reports it as unreadable
    assert "cat/cat_0.jpg" in names and not any(n.startswith("cat/back/cat/back") for n in names)


def test_a_linked_folder_counts_wherever_it_is_linked(image_folder, tmp_path):
    """What a class holds never depends on the order the walk meets a folder's links."""
    root = image_folder({"cat": 2, "dog": 1})
    os.symlink("../cat", root / "dog" / "alias_to_cats")
    outside = image_folder({"birds": 1}, name="outside") / "birds"
    os.symlink(outside, root / "birds")
    os.symlink(outside, root / "owls")  # two classes linked to one folder: both keep their images
    listing = list_source(str(root))
    rel = {os.path.relpath(i, root): listing.label_names[l] for i, l in zip(listing.ids, listing.labels)}
    assert listing.label_names == ["birds", "cat", "dog", "owls"]
    assert rel["cat/cat_0.jpg"] == "cat" and rel["dog/alias_to_cats/cat_0.jpg"] == "dog"
    assert rel["birds/birds_0.jpg"] == "birds" and rel["owls/birds_0.jpg"] == "owls" and len(rel) == 7


def test_manifest_labels_are_kept_as_written(tmp_path):
    (tmp_path / "codes.csv").write_text("path,label\na.png,01\nb.png,1\nc.png,2\nd.png,10\ne.png,\nf.png,007\n")
    listing = list_source(str(tmp_path / "codes.csv"))
    assert listing.label_names == ["007", "01", "1", "10", "2"]  # "01" and "1" are two classes
    assert listing.labels.tolist() == [1, 2, 4, 3, -1, 0]
    (tmp_path / "ints.csv").write_text("path,label\na.png,2\nb.png,10\nc.png,1\n")
    assert list_source(str(tmp_path / "ints.csv")).label_names == ["1", "2", "10"]  # integers sort as numbers
    # pandas stores an integer column with a gap as floats: 2.0 is class "2", NaN is unlabeled
    pq.write_table(pa.table({"path": ["a", "b", "c", "d"], "label": [1.0, 2.0, 10.0, float("nan")]}),
                   tmp_path / "f.parquet")
    listing = list_source(str(tmp_path / "f.parquet"))
    assert listing.label_names == ["1", "2", "10"] and listing.labels.tolist() == [0, 1, 2, -1]


def test_manifest_label_column_missing_or_misnamed(tmp_path):
    (tmp_path / "space.csv").write_text("path, label\na.png, x\nb.png, y\n")
    listing = list_source(str(tmp_path / "space.csv"))
    assert listing.label_names == ["x", "y"]
    assert listing.labels.tolist() == [0, 1]
    (tmp_path / "cap.csv").write_text("path,Label\na.png,x\n")
    with pytest.raises(SourceError, match=r"no 'label' column, but 'Label'; rename it, or name it with "
                                          r"--label-column 'Label'"):
        list_source(str(tmp_path / "cap.csv"))
    assert list_source(str(tmp_path / "cap.csv"), label_column="Label").label_names == ["x"]
    with pytest.raises(SourceError, match="no 'kind' column .*leave --label-column out for an unlabeled set"):
        list_source(str(tmp_path / "cap.csv"), label_column="kind")
    (tmp_path / "plain.csv").write_text("path\na.png\n")
    assert list_source(str(tmp_path / "plain.csv")).labels.tolist() == [-1]


def test_odd_files_in_a_folder_are_skipped_or_reported(image_folder, caplog):
    root = image_folder({"cat": 1, "dog": 1})
    bad_name = os.path.join(os.fsencode(root / "cat"), b"bad\xffname.jpg")
    with open(bad_name, "wb") as f:
        f.write((root / "cat" / "cat_0.jpg").read_bytes())
    (root / "stray.jpg").write_bytes((root / "cat" / "cat_0.jpg").read_bytes())
    os.mkfifo(root / "dog" / "pipe.jpg")
    with caplog.at_level("WARNING", logger="featurestore.sources"):
        listing = list_source(str(root))
    names = sorted(os.path.relpath(i, root) for i in listing.ids)
    assert names == ["cat/cat_0.jpg", "dog/dog_0.jpg", "dog/pipe.jpg"]
    said = caplog.text
    assert "1 file(s) or folder(s) whose names are not UTF-8" in said and "bad\\xffname.jpg" in said
    assert "1 image(s) directly in the folder, beside the class folders" in said
    # the pipe is refused at once, not read (which would wait for a writer forever)
    from featurestore.extractor import DecodePlan, decode_one

    got = decode_one(0, str(root / "dog" / "pipe.jpg"), 1, DecodePlan("pil", (lambda im: im,)))
    assert got.reason == "not a regular file but a named pipe" and got.label == 1
    os.symlink(root / "nowhere.jpg", root / "dog" / "broken.jpg")
    got = decode_one(1, str(root / "dog" / "broken.jpg"), 1, DecodePlan("pil", (lambda im: im,)))
    assert got.reason == "no such file (a broken symlink)"


def test_file_urls_are_percent_decoded(image_folder, tmp_path):
    from pathlib import Path

    root = image_folder({"cat": 1})
    spaced = root / "cat" / "c d ü.jpg"
    spaced.write_bytes((root / "cat" / "cat_0.jpg").read_bytes())
    (tmp_path / "uri.csv").write_text(f"path\n{Path(spaced).as_uri()}\n")
    listing = list_source(str(tmp_path / "uri.csv"))
    assert listing.ids == [str(spaced)] and read_bytes(listing.ids[0]) == spaced.read_bytes()


def test_a_manifest_without_a_header_or_with_another_separator_says_which(tmp_path):
    """pyarrow takes the first line as the header: a headerless list of paths, or a file written with
    ';' or tabs, would otherwise be told only that it has no 'path' column."""
    (tmp_path / "noheader.csv").write_text("imgs/cat/1.jpg,cat\nimgs/dog/2.jpg,dog\n")
    with pytest.raises(SourceError, match=r"noheader.csv: manifest has no 'path' column \(columns: imgs/cat/1.jpg, "
                                          r"cat\); its first line looks like an image path, not a header: add a "
                                          r"header line naming the columns \('path' or 'path,label'\)"):
        list_source(str(tmp_path / "noheader.csv"))
    for name, sep, said in (("sep.csv", ";", r"';'; write it with commas \(or with tabs\)"),
                            ("sep.csv", "|", r"'\|'; write it with commas"),
                            ("sep.tsv", ";", "';'; write it with tabs"),
                            ("sep.tsv", ",", "commas; name it .csv")):
        (tmp_path / name).write_text(f"path{sep}label\na.jpg{sep}cat\n")
        with pytest.raises(SourceError, match=rf"{name}: manifest has no 'path' column .*its header reads as one "
                                              rf"column: the file seems to separate columns with {said}"):
            list_source(str(tmp_path / name))


def test_tab_separated_manifests_are_read_like_csv(image_folder, tmp_path):
    """A .tsv, or a .csv a spreadsheet exported with tabs, lists what the comma CSV lists: relative
    paths (commas and spaces in names), labels as written ("01"), empty labels unlabeled."""
    root = image_folder({"cat": 2, "dog": 1})
    odd = root / "cat" / "a, b c.jpg"
    odd.write_bytes((root / "cat" / "cat_0.jpg").read_bytes())
    rows = [("cat/cat_0.jpg", "01"), ("cat/a, b c.jpg", "01"), ("cat/cat_1.jpg", ""), ("dog/dog_0.jpg", "1")]
    (root / "m.csv").write_text("path,label\n" + "".join(f'"{p}",{l}\n' for p, l in rows))
    want = list_source(str(root / "m.csv"))
    assert want.label_names == ["01", "1"] and (want.labels == -1).sum() == 1 and str(odd) in want.ids
    for name in ("m.tsv", "tabs.csv"):
        (root / name).write_text("path\tlabel\n" + "".join(f"{p}\t{l}\n" for p, l in rows))
        got = list_source(str(root / name))
        assert got.ids == want.ids and got.label_names == want.label_names, name
        assert got.labels.tolist() == want.labels.tolist(), name
    (root / "paths.tsv").write_text("path\n" + "".join(f"{p}\n" for p, _ in rows))
    assert list_source(str(root / "paths.tsv")).labels.tolist() == [-1] * 4
    (root / "bad.tsv").write_text("path\tlabel\ncat/cat_0.jpg\tcat\textra\n")
    with pytest.raises(SourceError, match="bad.tsv: not a readable TSV manifest"):
        list_source(str(root / "bad.tsv"))
    (root / "noheader.tsv").write_text("cat/cat_0.jpg\tcat\n")
    with pytest.raises(SourceError, match=r"noheader.tsv: .*add a header line naming the columns \('path' or "
                                          r"'path', a tab, 'label'\)"):
        list_source(str(root / "noheader.tsv"))


def test_a_missing_source_is_a_source_error_as_documented(tmp_path):
    """README: a source that cannot be listed raises featurestore.SourceError; a missing one was a bare
    FileNotFoundError, which `except SourceError` let through. It is both now."""
    for src, says in ((tmp_path / "nope", "no such directory"), (tmp_path / "nope.csv", "no such manifest file"),
                      (tmp_path / "nope.parquet", "no such manifest file")):
        with pytest.raises(featurestore.SourceError, match=f"{src}: {says}") as got:
            list_source(str(src))
        assert isinstance(got.value, FileNotFoundError)
