"""Listing inputs (folder per class or a manifest table) and splitting them into a shard plan.

Any fsspec URL works (plain paths, file://, s3://...). Listing is one recursive walk per
source and a tight loop over strings, so a million objects list in seconds; the order
is sorted and label ids come from sorted class names, so the same input gives the same
store every time.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".parquet", ".pq")
_LOCAL_PROTOCOLS = ("", "file", "local")


# what to check when an object store refuses (no credentials, access denied, no endpoint)
REMOTE_HINT = "check the URL and the credentials (AWS_* variables or storage_options)"


class SourceError(ValueError):
    """The input cannot be listed as asked (no images, a manifest without paths, ...)."""


class SourceNotFound(SourceError, FileNotFoundError):
    """No folder, prefix or manifest file at the source: a SourceError, as the API documents for a
    source that cannot be listed, and still the FileNotFoundError it used to be."""


@dataclass
class Listing:
    """The inputs of one job: ids (what fsspec opens), integer labels (-1 = unlabeled), class names."""

    ids: list[str]
    labels: np.ndarray
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.ids):
            raise ValueError(f"Listing: {len(self.ids)} ids but {len(self.labels)} labels")


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def _is_local(url: str) -> bool:
    return _protocol(url) in _LOCAL_PROTOCOLS


def _local_path(url: str) -> str:
    if url.startswith("file://"):
        url = unquote(url[len("file://"):])  # Path.as_uri() writes "c%20d.png" for "c d.png"
    elif url.startswith("local://"):
        url = url[len("local://"):]
    return os.path.abspath(os.path.expanduser(url))


class NotAFile(OSError):
    """A local input that is a folder, a named pipe, a device or a socket, not an image file."""


class FilesystemUnavailable(ImportError):
    """A URL whose fsspec filesystem is not installed (s3:// without s3fs, ...)."""


def url_to_fs(url: str, storage_options: dict | None = None):
    """fsspec's (filesystem, path) for url, with an error naming the package to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        proto = _protocol(url)
        how = ('pip install "featurestore[s3]"' if proto in ("s3", "s3a")
               else f"install the fsspec implementation for {proto}:// (see fsspec's list of known implementations)")
        raise FilesystemUnavailable(f"{url}: {exc}; {how}") from None


def _has_image_ext(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def split_classes(rel_paths: list[str]) -> tuple[list[str], list[str]]:
    """Keep image files under a class folder; return (kept relative paths sorted, class per path).

    `rel_paths` are '/'-separated paths relative to the root. Hidden files and anything under a
    hidden folder are dropped, as are non-image extensions and files directly in the root.
    The pure-Python hot loop of listing: kept small on purpose (see bench/listing.py).
    """
    exts = IMAGE_EXTENSIONS
    kept: list[str] = []
    keep = kept.append
    for rel in rel_paths:
        slash = rel.find("/")
        if slash <= 0 or rel[0] == "." or "/." in rel:
            continue
        dot = rel.rfind(".")
        if dot <= rel.rfind("/") + 1 or rel[dot:].lower() not in exts:
            continue
        keep(rel)
    kept.sort()
    return kept, [r[:r.find("/")] for r in kept]


def _labels_from_names(classes: list[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(classes))
    index = {n: i for i, n in enumerate(names)}
    return np.fromiter(map(index.__getitem__, classes), dtype=np.int64, count=len(classes)), names


def _walk_local(root: str) -> list[str]:
    """Relative '/'-paths of every file under root, skipping hidden dirs early (os.scandir is fast).

    A symlinked folder is walked wherever it is linked (so what a class holds never depends on
    the order the walk meets its links), except a link back to one of its own ancestors, which
    would never end. A broken or looping file link is listed as a file, so decoding reports it
    instead of listing failing. Names that are not UTF-8 cannot be ids (they cannot be written to
    Parquet or HDF5): skipped with a warning, as are folders that cannot be read.
    """
    out: list[str] = []
    stack: list[tuple[str, frozenset]] = [("", frozenset())]
    not_utf8: list[str] = []
    unreadable: list[str] = []
    while stack:
        rel_dir, ancestors = stack.pop()
        path = os.path.join(root, rel_dir) if rel_dir else root
        try:
            st = os.stat(path)
            here = (st.st_dev, st.st_ino)
            if here in ancestors:
                continue
            it = os.scandir(path)
        except OSError as exc:
            unreadable.append(f"{path} ({exc.strerror or exc})")
            continue
        inner = ancestors | {here}
        with it:
            for entry in it:
                name = entry.name
                if name[0] == ".":
                    continue
                rel = f"{rel_dir}/{name}" if rel_dir else name
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError:
                    not_utf8.append(os.fsencode(os.path.join(path, name)).decode("utf-8", "backslashreplace"))
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=True)
                except OSError:
                    is_dir = False
                if is_dir:
                    stack.append((rel, inner))
                else:
                    out.append(rel)
    if not_utf8:
        log.warning("skipped %d file(s) or folder(s) whose names are not UTF-8 (rename them to include them), "
                    "e.g. %s", len(not_utf8), not_utf8[0])
    if unreadable:
        log.warning("skipped %d folder(s) that cannot be read, e.g. %s", len(unreadable), unreadable[0])
    return out


def _list_folder(src: str, storage_options: dict | None) -> Listing:
    if _is_local(src):
        root = _local_path(src)
        if os.path.isfile(root):
            raise SourceError(f"{src}: a file, not a folder; pass a folder per class or a .csv/.tsv/.parquet manifest "
                              "(`featurestore classify` takes single images)")
        if not os.path.isdir(root):
            raise SourceNotFound(f"{src}: no such directory; pass a folder per class or a .csv/.tsv/.parquet manifest")
        rels = _walk_local(root)
        prefix = root.rstrip(os.sep) + "/"
    else:
        fs, path = url_to_fs(src, storage_options)
        path = path.rstrip("/")
        fs.invalidate_cache(path)
        found = fs.find(path, detail=False)
        if not found and not fs.isdir(path):
            raise SourceNotFound(f"{src}: no such folder or prefix; pass a folder per class or a .csv/.tsv/.parquet manifest")
        strip = len(path) + 1
        rels = [p[strip:] for p in found]
        prefix = f"{_protocol(src)}://{path}/"
    kept, classes = split_classes(rels)
    loose = sum(1 for r in rels if "/" not in r and r[0] != "." and _has_image_ext(r)) if kept else 0
    if loose:
        log.warning("%s: %d image(s) directly in the folder, beside the class folders, belong to no class and "
                    "were left out; move them into a class folder", src, loose)
    if not kept:
        flat = [r for r in rels if "/" not in r and r[0] != "." and _has_image_ext(r)]
        if flat:  # images directly in the root and no class folders: an unlabeled set
            flat.sort()
            return Listing([prefix + r for r in flat], np.full(len(flat), -1, np.int64), [])
        raise SourceError(
            f"{src}: no images found (expected <root>/<class>/<image> with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, or a .csv/.tsv/.parquet manifest)"
        )
    labels, names = _labels_from_names(classes)
    return Listing([prefix + r for r in kept], labels, names)


def _delimiter(src: str, header: str) -> str:
    """A .tsv separates columns with tabs; so does a .csv whose header has tabs and no comma
    (a spreadsheet's "tab-delimited" export named .csv). Other separators are refused later,
    naming the one the header seems to use (see _list_manifest)."""
    if src.lower().endswith(".tsv"):
        return "\t"
    return "\t" if "\t" in header and "," not in header else ","


def _text_kind(src: str) -> str:
    return "TSV" if src.lower().endswith(".tsv") else "CSV"


def _read_table(src: str, storage_options: dict | None, text_columns: tuple[str, ...] = ()):
    """The manifest as a pyarrow Table; in a CSV/TSV, text_columns are read as written (no "01" -> 1)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if _is_local(src):
        path = _local_path(src)
        if not os.path.isfile(path):
            raise SourceNotFound(f"{src}: no such manifest file")
        opener = lambda: open(path, "rb")  # noqa: E731
    else:
        fs, path = url_to_fs(src, storage_options)
        if not fs.exists(path):
            raise SourceNotFound(f"{src}: no such manifest file")
        opener = lambda: fs.open(path, "rb")  # noqa: E731
    import pyarrow as pa

    try:
        with opener() as f:
            if src.lower().endswith((".csv", ".tsv")):
                line = f.readline().decode("utf-8-sig", "replace")
                sep = _delimiter(src, line)
                header = next(csv.reader([line], delimiter=sep), [])
                f.seek(0)
                as_text = {c: pa.string() for c in header if c.strip() in text_columns}
                table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=sep),
                                       convert_options=pacsv.ConvertOptions(column_types=as_text))
                # "path, label": the space after the comma is not part of the name
                return table.rename_columns([c.strip() for c in table.column_names])
            return pq.read_table(f, use_threads=False)  # see store._Loc.read_parquet
    except pa.ArrowException as exc:
        kind = _text_kind(src) if src.lower().endswith((".csv", ".tsv")) else "Parquet"
        raise SourceError(f"{src}: not a readable {kind} manifest ({exc}); "
                          "a manifest is a table with a header row naming a path column") from exc


def _resolve(p: str, base: str, local: bool) -> str:
    """A manifest path as an id: URLs kept, relative paths joined to the manifest's folder."""
    if "://" in p:
        return _local_path(p) if _is_local(p) else p
    if local:
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))
    proto, base_path = base.split("://", 1)
    joined = p.lstrip("/") if p.startswith("/") else posixpath.join(base_path, p)
    return f"{proto}://{posixpath.normpath(joined)}"


_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def _label_names(values: list) -> tuple[np.ndarray, list[str]]:
    """Label ids and class names from a manifest's label cells.

    Empty cells, None and NaN are unlabeled (-1). Whole-number floats are the integers they hold
    (pandas stores an integer column with a gap as floats), so 2 and 2.0 are one class. When
    every name is an integer as written (no "01"), names sort as numbers (1, 2, 10), else as text.
    """
    names_of: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v):
            names_of.append(None)
        elif isinstance(v, float) and v.is_integer():
            names_of.append(str(int(v)))
        else:  # "a.png, cat": the space after the comma is not part of the class name
            names_of.append(str(v).strip() or None)
    present = {n for n in names_of if n is not None}
    if present and all(_CANONICAL_INT.fullmatch(n) for n in present):
        names = sorted(present, key=int)
    else:
        names = sorted(present)
    index = {n: i for i, n in enumerate(names)}
    return np.array([-1 if n is None else index[n] for n in names_of], np.int64), names


def _list_manifest(src: str, storage_options: dict | None, path_column: str, label_column: str | None) -> Listing:
    table = _read_table(src, storage_options, (path_column, label_column or "label"))
    columns = table.column_names
    if path_column not in columns:
        tsv = src.lower().endswith(".tsv")
        seps = ((";", "';'"), ("|", "'|'")) + (((",", "commas"),) if tsv else (("\t", "tabs"),))
        sep = next((name for c in columns for ch, name in seps if ch in c), None)
        if sep is not None:  # pyarrow reads "path;label" as one column named so
            fix = ("name it .csv" if sep == "commas" else "write it with tabs") if tsv else \
                "write it with commas (or with tabs)"
            hint = f"its header reads as one column: the file seems to separate columns with {sep}; {fix}"
        elif any(_has_image_ext(c) or "/" in c for c in columns):
            both = f"'{path_column}', a tab, 'label'" if tsv else f"'{path_column},label'"
            hint = (f"its first line looks like an image path, not a header: add a header line naming the columns "
                    f"('{path_column}' or {both})")
        else:
            hint = "rename it, or name it with --path-column (path_column: in a job spec)"
        raise SourceError(f"{src}: manifest has no '{path_column}' column (columns: {', '.join(columns)}); {hint}")
    if label_column is not None and label_column not in columns:
        raise SourceError(f"{src}: manifest has no '{label_column}' column (columns: {', '.join(columns)}); "
                          "leave --label-column out for an unlabeled set")
    if label_column is None and "label" not in columns:
        near = [c for c in columns if c.strip().lower() in ("label", "labels", "class")]
        if near:
            raise SourceError(f"{src}: manifest has no 'label' column, but '{near[0]}'; rename it, or name it "
                              f"with --label-column '{near[0]}' (label_column: in a job spec)")
    label_column = label_column or "label"
    raw_paths = table.column(path_column).to_pylist()
    if any(p is None or str(p) == "" for p in raw_paths):
        bad = next(i for i, p in enumerate(raw_paths) if p is None or str(p) == "")
        raise SourceError(f"{src}: empty '{path_column}' in row {bad}; every row needs a path")
    local = _is_local(src)
    if local:
        base = os.path.dirname(_local_path(src))
    else:
        base = src.rsplit("/", 1)[0]
    ids = [_resolve(str(p), base, local) for p in raw_paths]

    if label_column in table.column_names:
        labels, names = _label_names(table.column(label_column).to_pylist())
    else:
        names, labels = [], np.full(len(ids), -1, np.int64)

    order = sorted(range(len(ids)), key=ids.__getitem__)
    ids = [ids[i] for i in order]
    labels = labels[np.asarray(order, dtype=np.int64)] if ids else labels
    for a, b in zip(ids, ids[1:]):
        if a == b:
            raise SourceError(f"{src}: path {a} is listed more than once; each input must appear once")
    if not ids:
        raise SourceError(f"{src}: manifest has no rows")
    return Listing(ids, labels, names)


def list_source(
    src: str,
    *,
    storage_options: dict[str, Any] | None = None,
    path_column: str = "path",
    label_column: str | None = None,
) -> Listing:
    """List a folder per class (root/<class>/.../<image>) or a .csv/.tsv/.parquet manifest.

    Manifest paths may be absolute, URLs, or relative to the manifest's own folder; the label
    column is optional (missing or empty labels are -1). label_column=None reads a 'label'
    column if there is one; a named column must exist. A folder with images only at its root
    is an unlabeled set.
    """
    src = str(src)
    try:
        if src.lower().endswith(MANIFEST_EXTENSIONS):
            return _list_manifest(src, storage_options, path_column, label_column)
        return _list_folder(src, storage_options)
    except (SourceError, FileNotFoundError, FilesystemUnavailable):
        raise
    except Exception as exc:
        # object stores raise their own errors (no credentials, access denied, no endpoint)
        if _is_local(src) and not isinstance(exc, OSError):
            raise
        where = "" if _is_local(src) else f"; {REMOTE_HINT}"
        raise SourceError(f"{src}: cannot list it: {type(exc).__name__}: {exc}{where}") from exc


@dataclass
class ShardSpec:
    """One unit of work, commit and retry: a contiguous slice of the plan."""

    index: int
    ids: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Plan:
    """The listing cut into shards; stored once so resumes reuse it and the shards never move.

    A first run cuts the listing into shards of shard_size rows. An appending run (--append)
    adds new inputs in new shards after the last one, so a plan's shards are contiguous
    slices that start at `starts` (None: every shard_size rows).
    """

    ids: list[str]
    labels: np.ndarray
    label_names: list[str]
    shard_size: int
    starts: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        n = len(self.ids)
        if self.starts is None:
            self.starts = np.arange(0, n, self.shard_size, dtype=np.int64)
        self.starts = np.asarray(self.starts, dtype=np.int64)
        s = self.starts
        if n and (len(s) == 0 or s[0] != 0 or s[-1] >= n or np.any(np.diff(s) <= 0)):
            raise ValueError(f"plan shard starts must rise from 0 and stay below {n} rows, got {s[:8].tolist()}...")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_shards(self) -> int:
        return len(self.starts)

    def bounds(self, index: int) -> tuple[int, int]:
        """Rows [lo, hi) of shard `index`."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range (plan has {self.num_shards} shards)")
        lo = int(self.starts[index])
        hi = int(self.starts[index + 1]) if index + 1 < self.num_shards else len(self.ids)
        return lo, hi

    def shard_of_rows(self) -> np.ndarray:
        """The shard index of every row."""
        shard = np.zeros(len(self.ids), dtype=np.int64)
        if self.num_shards > 1:
            shard[self.starts[1:]] = 1
        return np.cumsum(shard)

    def shard(self, index: int) -> ShardSpec:
        lo, hi = self.bounds(index)
        return ShardSpec(index, self.ids[lo:hi], self.labels[lo:hi])

    def shards(self) -> list[ShardSpec]:
        return [self.shard(i) for i in range(self.num_shards)]

    def appended(self, ids: list[str], labels: np.ndarray) -> "Plan":
        """This plan with `ids` added as new shards of shard_size rows after the last one."""
        n, extra = len(self.ids), len(ids)
        starts = np.concatenate([self.starts, n + np.arange(0, extra, self.shard_size, dtype=np.int64)])
        return Plan(self.ids + list(ids), np.concatenate([self.labels, np.asarray(labels, np.int64)]),
                    list(self.label_names), self.shard_size, starts)

    def to_table(self):
        import pyarrow as pa

        meta = {
            b"featurestore.label_names": json.dumps(self.label_names).encode(),
            b"featurestore.shard_size": str(self.shard_size).encode(),
        }
        return pa.table(
            {"id": pa.array(self.ids, pa.string()), "label": self.labels, "shard": self.shard_of_rows()}
        ).replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, t, label_names: list[str] | None = None, shard_size: int | None = None) -> "Plan":
        meta = t.schema.metadata or {}
        if label_names is None:
            label_names = json.loads(meta.get(b"featurestore.label_names", b"[]"))
        if shard_size is None:
            if b"featurestore.shard_size" not in meta:
                raise ValueError("plan table has no shard_size metadata; pass shard_size")
            shard_size = int(meta[b"featurestore.shard_size"])
        starts = None
        if "shard" in t.column_names and t.num_rows:
            shard = t.column("shard").to_numpy().astype(np.int64)
            step = np.diff(shard)
            if shard[0] != 0 or np.any((step != 0) & (step != 1)):
                raise ValueError("plan table: its 'shard' column must count up from 0 in steps of 1")
            starts = np.concatenate([[0], np.flatnonzero(step) + 1])
        return cls(
            t.column("id").to_pylist(),
            t.column("label").to_numpy().astype(np.int64),
            list(label_names),
            int(shard_size),
            starts,
        )


def make_plan(listing: Listing, shard_size: int) -> Plan:
    """Cut a listing into shards of `shard_size` rows, in listing order."""
    return Plan(list(listing.ids), listing.labels.copy(), list(listing.label_names), int(shard_size))


@dataclass
class PlanDelta:
    """How a fresh listing of SOURCE differs from a stored plan (see `compare`)."""

    new_ids: list[str]  # listed, not planned: in listing order
    new_labels: np.ndarray  # their labels in the plan's numbering (-1: unlabeled)
    new_classes: list[str]  # class names of new inputs that the plan has no id for
    gone: int  # planned, no longer listed
    relabeled: int  # in both, with another class name (the plan keeps its own)

    @property
    def unchanged(self) -> bool:
        return not (self.new_ids or self.gone or self.relabeled)


def compare(plan: Plan, listing: Listing) -> PlanDelta:
    """Compare a stored plan with a new listing of its source, by id and class name."""
    if list(plan.ids) == list(listing.ids) and list(plan.label_names) == list(listing.label_names) \
            and np.array_equal(plan.labels, listing.labels):
        return PlanDelta([], np.zeros(0, np.int64), [], 0, 0)
    names = {n: i for i, n in enumerate(plan.label_names)}
    listed_names = list(listing.label_names)
    planned = dict(zip(plan.ids, plan.labels.tolist()))
    new_ids: list[str] = []
    new_labels: list[int] = []
    new_classes: set[str] = set()
    relabeled = 0
    for i, lab in zip(listing.ids, listing.labels.tolist()):
        name = listed_names[lab] if lab >= 0 else None
        old = planned.get(i)
        if old is None:
            new_ids.append(i)
            if name is not None and name not in names:
                new_classes.add(name)
            new_labels.append(names.get(name, -1) if name is not None else -1)
        elif (plan.label_names[old] if old >= 0 else None) != name:
            relabeled += 1
    gone = len(planned) - (len(listing.ids) - len(new_ids))
    return PlanDelta(new_ids, np.asarray(new_labels, np.int64), sorted(new_classes), gone, relabeled)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole content of one input (local fast path; fsspec for URLs). Raises FileNotFoundError etc.,
    and ConnectionError for a host that does not answer."""
    if _is_local(url):
        path = _local_path(url)
        mode = os.stat(path).st_mode  # a broken link: FileNotFoundError
        if not stat.S_ISREG(mode):  # opening a FIFO would wait for a writer forever
            kind = "a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "special"
            raise NotAFile(f"not a regular file but {kind}")
        with open(path, "rb") as f:
            return f.read()
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        # fsspec's HTTP filesystem reports a failed connection as a missing file
        if isinstance(exc.__cause__, OSError):
            raise ConnectionError(str(exc.__cause__)) from exc.__cause__
        raise
