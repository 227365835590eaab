"""Deterministic, stratified train/test splits keyed on the store's ids.

Keyed on a hash of (seed, id) rather than on row order, so a row keeps its side when the
store is re-extracted, re-sharded or grows; per class, so both sides keep class ratios.
The id is taken below the folder all ids share (cats/001.jpg, not /home/me/animals/cats/
001.jpg), so the same images split the same way wherever they live: another checkout, a
mount, or a copy on s3://.
"""
from __future__ import annotations

import errno
import hashlib
import numbers
import numpy as np

from .heads import HeadError
from .terms import param

SPLIT_VALUES = {"train": False, "test": True}


def relative_ids(ids) -> list[str]:
    """Each id without the leading folders that every id shares (the file name always stays)."""
    text = [str(v) for v in ids]
    if not text:
        return text
    lo, hi = min(text), max(text)  # the prefix all ids share is the one these two share
    n = next((i for i, (a, b) in enumerate(zip(lo, hi)) if a != b), min(len(lo), len(hi)))
    cut = lo.rfind("/", 0, n) + 1  # back to a whole folder; 0 when they share none
    return [t[cut:] for t in text]


def _keys(ids, seed: int, salt: str = "") -> np.ndarray:
    out = np.empty(len(ids), dtype=np.uint64)
    prefix = f"{salt}{int(seed)}:".encode()
    for i, v in enumerate(relative_ids(ids)):
        out[i] = int.from_bytes(hashlib.blake2b(prefix + v.encode(), digest_size=8).digest(), "little")
    return out


def hash_split(ids, labels, test_size: float = 0.25, seed: int = 0, salt: str = "") -> np.ndarray:
    """Boolean mask, True = test: per class, the round(test_size * n) ids with the smallest hashes.

    Every class with at least 2 rows gets at least one row on each side.
    """
    check_test_size(test_size)
    labels = np.asarray(labels)
    keys = _keys(ids, seed, salt)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_test = int(round(test_size * len(rows)))
        if len(rows) >= 2:
            n_test = min(max(n_test, 1), len(rows) - 1)
        else:
            n_test = 0
        order = rows[np.argsort(keys[rows], kind="stable")]
        is_test[order[:n_test]] = True
    return is_test


def check_test_size(test_size) -> None:
    """test_size as hash_split takes it: a fraction strictly between 0 and 1 (HeadError opening
    with the parameter's name, which the commands and job specs reword as their own)."""
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real) or not 0.0 < test_size < 1.0:
        raise HeadError(f"{param('test_size')} must lie strictly between 0 and 1, got {test_size}")


def _is_parquet(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq"))


def _refused(path: str, exc: Exception) -> Exception:
    """An object store's refusal (no credentials: botocore's NoCredentialsError, no such bucket, no
    endpoint) as a HeadError naming the URL and what to check; a local path's error as it is."""
    from featurestore.sources import REMOTE_HINT, _is_local

    if _is_local(path):
        return exc
    return HeadError(f"{param('split')} {path}: cannot read it ({type(exc).__name__}: {exc}); {REMOTE_HINT}")


def _split_fs(path: str, split_column: str, storage_options: dict | None):
    """(fsspec filesystem, its path) of an existing split file: a local path or a URL (s3://...),
    so that a split file lives wherever the store does."""
    from featurestore.sources import url_to_fs

    fs, fpath = url_to_fs(path, storage_options)
    wanted = f"a CSV/Parquet file with columns id and {split_column}"
    try:
        exists, folder = fs.exists(fpath), fs.isdir(fpath)
    except Exception as exc:
        raise _refused(path, exc) from None
    if folder:
        raise HeadError(f"{param('split')} {path}: a folder, not a file; {wanted}")
    if not exists:  # the path as the error's filename: the commands name the argument it belongs to
        raise FileNotFoundError(errno.ENOENT, f"no such file ({wanted})", path)
    return fs, fpath


def split_file_columns(path: str, split_column: str = "split", storage_options: dict | None = None) -> list[str]:
    """The column names of a split file from its schema alone (a Parquet footer, a CSV's first
    block), for checks made before the rows are read (a train job's)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = str(path)
    fs, fpath = _split_fs(p, split_column, storage_options)
    try:
        with fs.open(fpath, "rb") as f:
            if _is_parquet(p):
                return list(pq.read_schema(f).names)
            with pcsv.open_csv(f) as csv:
                return list(csv.schema.names)
    except pa.ArrowInvalid as exc:  # not CSV (or not Parquet) at all
        raise HeadError(_unreadable(p, exc, split_column)) from None
    except Exception as exc:
        raise _refused(p, exc) from None


def _unreadable(p: str, exc: Exception, split_column: str) -> str:
    return (f"{param('split')} {p}: cannot be read as {'Parquet' if _is_parquet(p) else 'CSV'} ({str(exc).splitlines()[0]}); "
            f"a CSV/Parquet file with columns id and {split_column}")


def read_split_file(path: str, ids, id_column: str | None = None, split_column: str = "split",
                    storage_options: dict | None = None) -> np.ndarray:
    """Boolean test mask from a CSV/Parquet file mapping id -> train|test (every store id must appear).

    path: a local path or a URL (s3://..., read with storage_options, as the store is)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = str(path)
    fs, fpath = _split_fs(p, split_column, storage_options)
    try:
        with fs.open(fpath, "rb") as f:
            table = pq.read_table(f, use_threads=False) if _is_parquet(p) else pcsv.read_csv(f)
    except pa.ArrowInvalid as exc:  # not CSV (or not Parquet) at all
        raise HeadError(_unreadable(p, exc, split_column)) from None
    except Exception as exc:
        raise _refused(p, exc) from None
    cols = table.column_names
    if id_column is None:
        id_column = next((c for c in ("id", "path") if c in cols), None)
    if id_column not in cols or split_column not in cols:
        raise HeadError(f"{param('split')} {p}: needs columns 'id' (or 'path') and {split_column!r}; it has {', '.join(cols)}")
    mapping: dict[str, str] = {}
    for k, v in zip((str(v) for v in table[id_column].to_pylist()),
                    (str(v).strip().lower() for v in table[split_column].to_pylist())):
        if mapping.setdefault(k, v) != v:
            raise HeadError(f"{param('split')} {p}: id {k} is listed as both {mapping[k]} and {v}; list each id once")
    return split_from_mapping(mapping, ids, source=p)


def split_from_mapping(mapping: dict, ids, source: str) -> np.ndarray:
    """Boolean test mask of the store's ids from {id: train|test}.

    An id is found as it is, else by its trailing folders and file name: a split file written
    below the image folder (negatives/001.jpg), or on another machine, fits a store whose ids are
    the images' full paths or URLs (/data/smiles/negatives/001.jpg), as the hash split is keyed
    below the folder the ids share. Each store id must find exactly one entry of its own."""
    bad = sorted({v for v in mapping.values() if v not in SPLIT_VALUES})
    if bad:
        raise HeadError(f"{source}: split values must be train or test; found {', '.join(map(repr, bad[:5]))}")
    text = [str(i) for i in ids]
    keys = [k if k in mapping else None for k in text]
    if None in keys:
        keys = _match_by_trailing_parts(mapping, text, keys, source)
    missing = [t for t, k in zip(text, keys) if k is None]
    if missing:
        raise HeadError(f"{source}: {len(missing)} store id(s) have no split, e.g. {', '.join(missing[:3])}; "
                        "list every id with train or test (as the store names it, or by its folders below the "
                        "image folder: class/file.jpg)")
    return np.array([SPLIT_VALUES[mapping[k]] for k in keys], dtype=bool)


def _parts(text: str) -> list[str]:
    """The path's components, without a URL's scheme, a leading ./ or empty ones."""
    return [c for c in text.split("://", 1)[-1].split("/") if c and c != "."]


def _match_by_trailing_parts(mapping: dict, text: list[str], keys: list, source: str) -> list:
    """keys with each unmatched id given the mapping's key sharing its longest run of trailing
    components. The run must be a whole entry (neg/0.jpg for /data/neg/0.jpg) or cover the id below
    the folder all store ids share (smiles/neg/0.jpg from another machine): 0.jpg alone does not fit
    pos/0.jpg to neg/0.jpg. An id whose run fits two entries, or two ids fitting one entry, is
    refused: the file does not say which image it means."""
    index: dict[str, list[tuple[str, int]]] = {}
    for k in mapping:
        parts = _parts(k)
        for j in range(len(parts)):
            index.setdefault("/".join(parts[j:]), []).append((k, len(parts)))
    below = [len(_parts(r)) for r in relative_ids(text)]
    taken: dict[str, str] = {}
    out = list(keys)
    for n, (t, k) in enumerate(zip(text, keys)):
        if k is not None:
            taken.setdefault(k, t)
            continue
        parts = _parts(t)
        for j in range(len(parts)):
            run = len(parts) - j
            found = {key for key, size in index.get("/".join(parts[j:]), ()) if run >= below[n] or size == run}
            if not found:
                continue
            if len(found) > 1:
                raise HeadError(f"{source}: store id {t} fits more than one entry ({', '.join(sorted(found)[:3])}); "
                                "list ids with enough of their folders to tell them apart")
            out[n] = found.pop()
            break
        if out[n] is not None:
            other = taken.setdefault(out[n], t)
            if other != t:
                raise HeadError(f"{source}: store ids {other} and {t} both fit only its entry {out[n]!r}; "
                                "list ids with enough of their folders to tell them apart")
    return out


def manifest_split(reader, split_column: str = "split") -> np.ndarray | None:
    """The store manifest's own split column (aligned to reader.ids), or None when it has none."""
    try:
        table = reader.manifest()
    except Exception:  # no manifest (a store still running): fall back to hashing
        return None
    if split_column not in table.column_names:
        return None
    mapping = dict(zip((str(v) for v in table["id"].to_pylist()),
                       (str(v).strip().lower() for v in table[split_column].to_pylist())))
    return split_from_mapping(mapping, reader.ids, source=f"{reader.uri}/manifest.parquet")
