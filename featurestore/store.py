"""The sharded HDF5 feature store: writer (driver + per-shard), reader, verify and inspect.

Layout of a store (a local directory or any fsspec URL prefix):

    store.json                 config (refuses mixing), label names, shard list, checksums, versions,
                               the request as given (an identical re-run of a complete store needs no actor)
    plan.parquet               the input list cut into shards, fixed at the first run (resume reuses
                               it; --append adds new shards after the last)
    shards/shard-00000.json    sidecar: rows, sha256, bytes, ids, errors (written first)
    shards/shard-00000.h5      the shard itself (written last: its existence is the commit)
    manifest.parquet           one row per input: id, label, shard, row, status
    errors.parquet             every input that could not be used: id, label, shard, reason

Each shard is a standalone PyImageSearch-style HDF5 file (features, labels, label_names, ids)
that plain h5py reads. h5py needs a seekable local file, so shards are written to a local
temporary file and then committed atomically (os.replace locally, a single PUT on S3).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .sources import REMOTE_HINT, Plan, _is_local, _local_path, _protocol, url_to_fs

log = logging.getLogger(__name__)

FORMAT = "featurestore.store/1"
SHARD_FORMAT = "featurestore.shard/1"
DTYPES = ("float32", "float16")
COMPRESSIONS = (None, "none", "lzf", "gzip")
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.h5$")
LEASE_FILE = ".writer.json"  # featurestore.lease: which extraction is writing here now
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"}
_BLOCK = 4 << 20


class StoreError(RuntimeError):
    """The store is missing, unreadable or inconsistent; the message names the store and the fix."""


class StoreKeyError(StoreError, KeyError):
    """A layer or ids the store does not have. A KeyError too, as a mapping's lookup would raise,
    but printed as its plain message (KeyError's own str() quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreConfigMismatch(StoreError):
    """An existing store was built with a different configuration; .differences lists the keys."""

    def __init__(self, message: str, differences: list[str]):
        super().__init__(message)
        self.differences = differences


def _umask() -> int:
    """The process's umask, read without os.umask's set-and-restore (which races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so tuples/lists and numpy scalars compare equal to what is stored."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of these distributions, None where absent (importlib.metadata: no heavy imports)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def library_versions() -> dict[str, str | None]:
    """Versions recorded in store.json."""
    return {"python": sys.version.split()[0],
            **package_versions(("featurestore", "torch", "torchvision", "timm", "pillow", "h5py", "numpy"))}


class _Loc:
    """A store location: local directory (os calls, os.replace) or fsspec URL prefix."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        if not str(uri).strip():
            raise StoreError("no store given: the path is empty")
        self.uri = str(uri).rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        self.local = _is_local(self.uri)
        if self.local:
            self.root = _local_path(self.uri)
            self.fs = None
            self.protocol = "file"
        else:
            self.fs, root = url_to_fs(self.uri, self.storage_options)
            self.root = root.rstrip("/")
            self.protocol = _protocol(self.uri)

    def __getstate__(self):
        return {"uri": self.uri, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["storage_options"])

    def path(self, rel: str = "") -> str:
        if not rel:
            return self.root
        return os.path.join(self.root, *rel.split("/")) if self.local else f"{self.root}/{rel}"

    def url(self, rel: str = "") -> str:
        if self.local:
            return self.path(rel)
        return f"{self.protocol}://{self.path(rel)}"

    def refresh(self, rel: str = "") -> None:
        if self.fs is not None:
            self.fs.invalidate_cache(self.path(rel))

    def exists(self, rel: str) -> bool:
        if self.local:
            return os.path.exists(self.path(rel))
        self.refresh(rel)
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic replace: readers see the old content or the new one, never a mix."""
        if self.local:
            path = self.path(rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        elif self.protocol in _ATOMIC_PUT:
            self.fs.pipe_file(self.path(rel), data)
        else:
            tmp = f"{self.path(rel)}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, self.path(rel))

    def put_file(self, local_path: str, rel: str) -> None:
        """Move a finished local file into the store atomically (the commit point of a shard)."""
        if self.local:
            dest = self.path(rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.dirname(os.path.abspath(local_path)) != os.path.dirname(dest):
                tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{uuid.uuid4().hex[:8]}.tmp")
                shutil.copyfile(local_path, tmp)
                local_path = tmp
            os.replace(local_path, dest)
        elif self.protocol in _ATOMIC_PUT:
            self.fs.put_file(local_path, self.path(rel))
        else:
            tmp = f"{self.path(rel)}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.put_file(local_path, tmp)
            self.fs.mv(tmp, self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        if self.local:
            try:
                return sorted(os.listdir(self.path(rel)))
            except FileNotFoundError:
                return []
        self.refresh(rel)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    def remove(self, rel: str) -> None:
        try:
            if self.local:
                os.remove(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self) -> None:
        """Everything but the writer's lease (the run that wipes is the one that holds it)."""
        if self.local:
            for name in self.listdir(""):
                path = self.path(name)
                if name in (LEASE_FILE, "store.json"):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    self.remove(name)
        else:
            self.refresh()
            if self.fs.exists(self.root):
                for p in self.fs.find(self.root, detail=False):
                    if not p.endswith(("/store.json", f"/{LEASE_FILE}")):
                        self.fs.rm_file(p)
        self.remove("store.json")  # last: an interrupted wipe still looks like a store

    def makedirs(self) -> None:
        if self.local:
            os.makedirs(os.path.join(self.root, "shards"), exist_ok=True)

    def open(self, rel: str, block_size: int | None = None):
        if self.local:
            return open(self.path(rel), "rb")
        kw = {"block_size": block_size} if block_size else {}
        return self.fs.open(self.path(rel), "rb", **kw)

    def sha256(self, rel: str) -> tuple[str, int]:
        h, n = hashlib.sha256(), 0
        with self.open(rel, block_size=_BLOCK) as f:
            while True:
                b = f.read(_BLOCK)
                if not b:
                    break
                h.update(b)
                n += len(b)
        return h.hexdigest(), n

    def read_parquet(self, rel: str):
        import pyarrow.parquet as pq

        # On the calling thread: a pyarrow reader thread still alive when the interpreter exits
        # aborts the process ("terminate called without an active exception", exit 134;
        # apache/arrow#34314), one `featurestore inspect` in three here. The tables are small.
        return pq.read_table(io.BytesIO(self.read_bytes(rel)), use_threads=False)

    def write_parquet(self, rel: str, table) -> None:
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())


def _read_meta(loc: _Loc) -> dict | None:
    try:
        data = loc.read_bytes("store.json")
    except (FileNotFoundError, NotADirectoryError):  # the latter: a plain file where the folder would be
        return None
    except Exception as exc:  # no credentials, access denied, no endpoint: the first thing a reader meets
        hint = "" if loc.local else f"; {REMOTE_HINT}"
        raise StoreError(f"{loc.uri}: cannot read its store.json ({type(exc).__name__}: {exc}){hint}") from exc
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{loc.url('store.json')}: not valid JSON ({exc}); the store is damaged") from exc


def _not_a_store(loc: _Loc) -> StoreError:
    """Why `loc` has no store.json, as precisely as the location tells."""
    if loc.local and not os.path.exists(loc.root):
        return StoreError(f"{loc.uri}: no such folder")
    if loc.local and not os.path.isdir(loc.root):
        return StoreError(f"{loc.uri}: a file, not a store; a store is the folder that holds store.json")
    if not loc.local:  # a mistyped bucket or prefix reads as nothing at all, not as some other kind of folder
        bucket = loc.root.split("/")[0]
        try:
            there, has_bucket = loc.fs.exists(loc.root), loc.fs.exists(bucket)
        except Exception:  # no permission to look: say what is known below
            there = has_bucket = True
        if not has_bucket:
            return StoreError(f"{loc.uri}: no such bucket {bucket!r} at this endpoint; check the URL (and "
                              "AWS_ENDPOINT_URL or storage_options' endpoint_url)")
        if not there:
            return StoreError(f"{loc.uri}: nothing is stored under this prefix; check the URL")
    from featurestore.lease import writer_status  # lease imports this module

    writer = writer_status(loc.uri, loc.storage_options)
    if writer is not None and writer["live"]:
        return StoreError(f"{loc.uri}: being created by pid {writer['pid']} on {writer['host']}; its store.json is "
                          "written once the workers are ready: try again in a moment")
    inner = [d for d in loc.listdir("")[:200] if not d.startswith(".") and loc.exists(f"{d}/store.json")]
    if inner:
        return StoreError(f"{loc.uri}: a multi-model output holding one store per model ({', '.join(inner)}); "
                          f"open one of them, e.g. {loc.url(inner[0])}")
    return StoreError(f"{loc.uri}: no store.json; not a feature store (or not written yet)")


def _write_meta(loc: _Loc, meta: dict) -> None:
    meta["updated"] = _now()
    loc.write_bytes("store.json", json.dumps(meta, indent=1, sort_keys=False).encode())


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}{k}"
            if k not in old:
                out.append(f"{key}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (absent)")
            else:
                out.extend(_diff(old[k], new[k], key + "."))
        return out
    return [] if old == new else [f"{prefix.rstrip('.') or 'config'}: {old!r} -> {new!r}"]


def _same_file_spelled_alike(old: dict, new: dict) -> dict:
    """`new` with the stored weights path when both name a file and the weights' sha256 agree:
    `./w.pth`, `w.pth` and `/data/w.pth` (or the file moved) are the same numbers, not another
    configuration to refuse."""
    from featurestore.weights import is_file_spec, split_recipe

    ow, nw = old.get("weights"), new.get("weights")
    if (isinstance(ow, str) and isinstance(nw, str) and ow != nw and is_file_spec(ow) and is_file_spec(nw)
            and old.get("weights_sha256") and old.get("weights_sha256") == new.get("weights_sha256")
            and split_recipe(ow)[1] == split_recipe(nw)[1]):
        return {**new, "weights": ow}
    return new


class StoreMeta(dict):
    """store.json's content; keys also read as attributes (meta.num_rows)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass
class ShardInfo:
    """What a committed shard holds (from its sidecar)."""

    index: int
    name: str
    rows: int
    sha256: str
    bytes: int
    errors: list[tuple[str, int, str]] = field(default_factory=list)
    ids: list[str] | None = field(default=None, repr=False)
    layers: dict[str, dict] = field(default_factory=dict)
    dtype: str = "float32"
    compression: str | None = None
    node_id: str | None = None  # the Ray node that wrote it (None outside Ray)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardInfo":
        return cls(
            index=int(d["index"]), name=d["name"], rows=int(d["rows"]), sha256=d["sha256"], bytes=int(d["bytes"]),
            errors=[(str(e[0]), int(e[1]), str(e[2])) for e in d.get("errors", [])], ids=d.get("ids"),
            layers=d.get("layers", {}), dtype=d.get("dtype", "float32"), compression=d.get("compression"),
            node_id=d.get("node_id"),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["errors"] = [list(e) for e in self.errors]
        return d


# --------------------------------------------------------------------------------------------
# Writing


def _narrow(arr: np.ndarray, dtype, where: str) -> np.ndarray:
    """arr as the store's dtype; float16 that loses values says so (inf breaks every head downstream)."""
    with np.errstate(over="ignore"):  # said below, once, in our words
        out = arr.astype(dtype, copy=False)
    if out.dtype != np.float16 or arr.dtype == np.float16 or not np.issubdtype(arr.dtype, np.floating):
        return out
    over = int(np.count_nonzero(np.isinf(out) & np.isfinite(arr)))
    if over:
        log.warning("%s: %d value(s) beyond float16's range (|x| up to %.3g > 65504) are stored as inf; "
                    "extract with --dtype float32", where, over, float(np.nanmax(np.abs(arr[np.isfinite(arr)]))))
    rows = arr.reshape(len(arr), -1)
    flat = np.count_nonzero(~out.reshape(len(out), -1).any(axis=1) & rows.any(axis=1))
    if flat:
        log.warning("%s: %d row(s) became all zeros in float16 (values below 6e-8; untrained weights?); "
                    "extract with --dtype float32", where, flat)
    return out


class ShardWriter:
    """Writes one shard: rows go to a local temporary HDF5 file; commit() publishes it atomically.

    Use one per process at a time (h5py serialises every call in a process). Order of the
    commit: sidecar JSON first, then the .h5 (its appearance is the commit); a writer that is
    aborted or killed leaves no .h5 behind, so readers and resumes never see a partial shard.
    """

    def __init__(
        self,
        store_uri: str,
        index: int,
        label_names: Sequence[str],
        *,
        dtype: str = "float32",
        compression: str | None = None,
        storage_options: dict | None = None,
        feature_shapes: dict[str, tuple] | None = None,
        chunk_bytes: int = 1 << 20,
        tmp_dir: str | None = None,
        expected_rows: int | None = None,
        node_id: str | None = None,
    ):
        import h5py

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of none, lzf, gzip, got {compression!r}")
        self.loc = _Loc(store_uri, storage_options)
        self.index = int(index)
        self.name = shard_name(self.index)
        self.label_names = [str(n) for n in label_names]
        self.dtype = dtype
        self.compression = None if compression in (None, "none") else compression
        self.chunk_bytes = int(chunk_bytes)
        self.node_id = node_id
        # chunks never larger than the shard: HDF5 allocates whole chunks
        self._max_chunk_rows = int(max(1, min(256, expected_rows or 256)))
        self.rows = 0
        self.errors: list[tuple[str, int, str]] = []
        self._ids: list[str] = []
        self._layers: list[str] = []
        self._shapes: dict[str, tuple] = {}
        self._state = "open"
        if tmp_dir is None:
            if self.loc.local:  # same directory as the final name: os.replace is atomic
                tmp_dir = self.loc.path("shards")
                os.makedirs(tmp_dir, exist_ok=True)
            else:
                tmp_dir = os.environ.get("FEATURESTORE_TMPDIR") or tempfile.gettempdir()
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp", dir=tmp_dir)
        os.close(fd)
        os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make shards the one unreadable part of a store
        self._h5 = h5py.File(self._tmp, "w")
        str_t = h5py.string_dtype("utf-8")
        self._h5.create_dataset("label_names", data=np.array(self.label_names, dtype=object), dtype=str_t)
        small = max(1, min(1024, expected_rows or 1024))
        # fletcher32: a per-chunk checksum, so a flipped byte fails the read that touches it instead
        # of returning wrong numbers (HDF5 built-in filter; plain h5py reads it; vlen ids cannot have it)
        self._h5.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(small,),
                                fletcher32=True, track_times=False)
        self._h5.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=str_t, chunks=(small,), track_times=False)
        if feature_shapes:
            for layer, shape in feature_shapes.items():
                self._create_layer(layer, tuple(int(s) for s in shape))

    def _create_layer(self, layer: str, shape: tuple) -> None:
        if "/" in layer or not layer:
            raise ValueError(f"layer name {layer!r} cannot be empty or contain '/'")
        row_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize)
        chunk_rows = int(max(1, min(self._max_chunk_rows, self.chunk_bytes // row_bytes)))
        kw: dict[str, Any] = {}
        if self.compression:
            kw = {"compression": self.compression, "shuffle": True}
        self._h5.create_dataset(
            f"layers/{layer}", shape=(0, *shape), maxshape=(None, *shape), dtype=self.dtype,
            chunks=(chunk_rows, *shape), fletcher32=True, track_times=False, **kw,
        )
        if not self._layers:
            self._h5["features"] = self._h5[f"layers/{layer}"]  # hard link: PyImageSearch-style name
        self._layers.append(layer)
        self._shapes[layer] = shape

    def append(self, ids: Sequence[str], labels, features: dict[str, np.ndarray]) -> None:
        """Add rows (same order in ids, labels and every layer's first axis)."""
        if self._state != "open":
            raise StoreError(f"{self.name}: writer is {self._state}; create a new ShardWriter")
        ids = [str(i) for i in ids]
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        n = len(ids)
        if len(labels) != n:
            raise ValueError(f"{self.name}: {n} ids but {len(labels)} labels")
        if not isinstance(features, dict) or not features:
            raise ValueError(f"{self.name}: features must be a non-empty dict of layer -> array")
        arrays = {}
        for layer, arr in features.items():
            arr = np.asarray(arr.detach().cpu() if hasattr(arr, "detach") else arr)
            if arr.shape[:1] != (n,):
                raise ValueError(f"{self.name}: layer {layer!r} has {arr.shape[0] if arr.ndim else 0} rows, expected {n}")
            arrays[layer] = arr
        if not self._layers:
            for layer, arr in arrays.items():
                self._create_layer(layer, tuple(arr.shape[1:]))
        if set(arrays) != set(self._layers):
            raise ValueError(f"{self.name}: layers {sorted(arrays)} differ from earlier rows' {self._layers}")
        for layer, arr in arrays.items():
            if tuple(arr.shape[1:]) != self._shapes[layer]:
                raise ValueError(f"{self.name}: layer {layer!r} rows have shape {arr.shape[1:]}, expected {self._shapes[layer]}")
        if n == 0:
            return
        bad = (labels < -1) | (labels >= len(self.label_names)) if self.label_names else labels != -1
        if np.any(bad):
            raise ValueError(f"{self.name}: label {int(labels[bad][0])} outside -1..{len(self.label_names) - 1}")
        lo, hi = self.rows, self.rows + n
        for layer, arr in arrays.items():
            ds = self._h5[f"layers/{layer}"]
            ds.resize(hi, axis=0)
            ds[lo:hi] = _narrow(arr, self.dtype, f"{self.name}: layer {layer!r}")
        for name, data in (("labels", labels), ("ids", np.array(ids, dtype=object))):
            ds = self._h5[name]
            ds.resize(hi, axis=0)
            ds[lo:hi] = data
        self._ids.extend(ids)
        self.rows = hi

    def add_error(self, id: str, label: int, reason: str) -> None:
        """Record an input of this shard that could not be used (goes to errors.parquet)."""
        self.errors.append((str(id), int(label), str(reason)))

    def commit(self) -> ShardInfo:
        """Close the file, write the sidecar, then publish the .h5 atomically. Returns its info."""
        if self._state != "open":
            raise StoreError(f"{self.name}: writer is {self._state}; cannot commit")
        try:
            f = self._h5
            f.attrs["format"] = SHARD_FORMAT
            f.attrs["shard_index"] = self.index
            f.attrs["rows"] = self.rows
            f.attrs["layers"] = json.dumps(self._layers)
            f.attrs["dtype"] = self.dtype
            f.close()
            h, size = hashlib.sha256(), 0
            with open(self._tmp, "rb") as fh:
                while True:
                    b = fh.read(_BLOCK)
                    if not b:
                        break
                    h.update(b)
                    size += len(b)
                if self.loc.local:
                    os.fsync(fh.fileno())
            info = ShardInfo(
                self.index, self.name, self.rows, h.hexdigest(), size, list(self.errors), list(self._ids),
                {k: {"shape": list(self._shapes[k]), "dtype": self.dtype} for k in self._layers},
                self.dtype, self.compression, self.node_id,
            )
            self.loc.write_bytes(f"shards/{self.name[:-3]}.json", json.dumps(info.to_dict()).encode())
            self.loc.put_file(self._tmp, f"shards/{self.name}")  # the commit point
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self._cleanup()
        return info

    def abort(self) -> None:
        """Drop everything written so far; nothing becomes visible."""
        if self._state == "open":
            self._state = "aborted"
        try:
            if self._h5.id.valid:
                self._h5.close()
        except Exception:  # pragma: no cover - closing a broken file
            pass
        self._cleanup()

    def _cleanup(self) -> None:
        try:
            os.remove(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._state == "open":
            self.abort()

    def __del__(self):  # an abandoned writer leaves nothing behind
        try:
            if getattr(self, "_state", None) == "open":
                self.abort()
        except Exception:
            pass


class StoreWriter:
    """Driver side of a store: creates store.json, keeps the plan, lists commits, finalizes.

    `config` is everything that changes the numbers (backbone config, dtype...); opening an
    existing store with a different config raises StoreConfigMismatch unless overwrite=True.
    On resume the stored label names and plan win over the new listing (see read_plan()).
    """

    def __init__(
        self,
        uri: str,
        config: dict,
        label_names: Sequence[str],
        *,
        overwrite: bool = False,
        storage_options: dict | None = None,
        request: dict | None = None,
    ):
        self.loc = _Loc(uri, storage_options)
        self.uri = self.loc.uri
        self.storage_options = self.loc.storage_options
        self.config = _jsonable(dict(config))
        existing = _read_meta(self.loc)
        if existing is None:
            self.refuse_foreign(self.loc)
        if existing is not None and overwrite:
            log.info("overwriting store %s", self.uri)
            self.loc.remove_tree()
            existing = None
        if existing is not None:
            diffs = _diff(existing.get("config", {}), _same_file_spelled_alike(existing.get("config", {}), self.config))
            if diffs:
                raise StoreConfigMismatch(
                    f"{self.uri} already holds a store built with a different configuration "
                    f"({'; '.join(diffs)}); write to a new output, or pass --overwrite "
                    f"(overwrite=True) to replace it",
                    diffs,
                )
            self.meta = existing
            self.meta["status"] = "running"
            self.resumed = True
        else:
            self.meta = {
                "format": FORMAT,
                "status": "running",
                "created": _now(),
                "config": self.config,
                "label_names": [str(n) for n in label_names],
                "versions": library_versions(),
            }
            self.resumed = False
        if request is not None:  # what the job asked for, unresolved (engine._already_complete)
            self.meta["request"] = _jsonable(request)
        self.loc.makedirs()
        _write_meta(self.loc, self.meta)
        self.label_names = list(self.meta["label_names"])

    @staticmethod
    def refuse_foreign(loc: "_Loc | str", storage_options: dict | None = None) -> None:
        """A folder that holds files but no store.json (the source itself, say) is no output: raise
        StoreError. The engine asks before Ray starts; the writer asks again when it opens."""
        loc = loc if isinstance(loc, _Loc) else _Loc(loc, storage_options)
        if _read_meta(loc) is None and [n for n in loc.listdir("") if n != LEASE_FILE] not in ([], ["shards"]):
            raise StoreError(
                f"{loc.uri} exists, is not empty and holds no store.json; refusing to write into it "
                f"(choose a new or empty output)"
            )

    @staticmethod
    def refuse_foreign_parent(output: str, store_names: Sequence[str], storage_options: dict | None = None) -> None:
        """Refuse a multi-model OUTPUT that holds anything but stores (the source itself, a folder of documents).

        refuse_foreign only looks at OUTPUT/<model>, which does not exist yet in such a folder, so the
        job would write its stores among the user's files. Allowed: nothing, the writer lease, this
        job's store folders (`store_names`, checked one by one after this), and other stores (a
        featurestore output with another list of models)."""
        loc = _Loc(output, storage_options)
        if _read_meta(loc) is not None:
            raise StoreError(
                f"{output} holds a single-model store; with several models OUTPUT is a parent folder of one "
                f"store per model (OUTPUT/<model>): choose a new output")
        others = [n for n in loc.listdir("") if n != LEASE_FILE and n not in store_names
                  and _read_meta(_Loc(loc.url(n), storage_options)) is None]
        if others:
            raise StoreError(
                f"{output} exists and holds files that are not stores ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); with several models OUTPUT is a parent folder of one "
                f"store per model (OUTPUT/<model>): choose a new or empty output")

    def write_plan(self, plan: Plan) -> None:
        """Store the plan: on the first run, and again when --append grew it (a resume reuses it)."""
        self.loc.write_parquet("plan.parquet", plan.to_table())
        self.meta["shard_size"] = plan.shard_size
        self.meta["num_inputs"] = len(plan)
        self.meta["num_shards"] = plan.num_shards
        self.meta["label_names"] = list(plan.label_names)
        self.label_names = list(plan.label_names)
        _write_meta(self.loc, self.meta)

    def read_plan(self) -> Plan | None:
        if not self.loc.exists("plan.parquet"):
            return None
        return Plan.from_table(self.loc.read_parquet("plan.parquet"))

    @staticmethod
    def existing_plan(uri: str, storage_options: dict | None = None) -> Plan | None:
        """The plan of an existing store at uri (None if there is no store or no plan yet); touches nothing."""
        loc = _Loc(uri, storage_options)
        if _read_meta(loc) is None or not loc.exists("plan.parquet"):
            return None
        return Plan.from_table(loc.read_parquet("plan.parquet"))

    @staticmethod
    def complete_meta(uri: str, num_shards: int, storage_options: dict | None = None) -> dict | None:
        """store.json of a store at uri that is complete with num_shards shards, all of them and its
        manifest and errors tables on disk (a user may delete one to have it rewritten); else None."""
        loc = _Loc(uri, storage_options)
        meta = _read_meta(loc)
        if not meta or meta.get("status") != "complete" or meta.get("num_shards") != num_shards:
            return None
        if not {shard_name(i) for i in range(num_shards)} <= set(loc.listdir("shards")):
            return None
        return meta if loc.exists("manifest.parquet") and loc.exists("errors.parquet") else None

    def committed(self) -> dict[int, ShardInfo]:
        """Shards whose .h5 exists (the commit point), with their sidecar info."""
        return _committed(self.loc)

    def finalize(self, plan: Plan, failed: dict[int, str] | None = None) -> "StoreMeta":
        """Write manifest.parquet, errors.parquet and the final store.json; returns store.json's
        content (a dict whose keys also read as attributes: .status, .num_rows, .num_errors ...)."""
        import pyarrow as pa

        failed = {int(k): str(v) for k, v in (failed or {}).items()}
        infos = self.committed()
        n = len(plan)
        shard_of = plan.shard_of_rows()
        row = np.full(n, -1, dtype=np.int64)
        status = np.full(n, "ok", dtype=object)
        reason: dict[int, str] = {}
        digests: dict[int, str] = {}
        for spec_index in range(plan.num_shards):
            lo, hi = plan.bounds(spec_index)
            info = infos.get(spec_index)
            if info is None:  # failed, or committed where this writer cannot see it: the store is incomplete
                why = failed.setdefault(spec_index, "shard was not committed")
                status[lo:hi] = "failed"
                for p in range(lo, hi):
                    reason[p] = f"shard failed: {why}"
                continue
            failed.pop(spec_index, None)  # committed after all (e.g. a late retry)
            pos = {plan.ids[p]: p for p in range(lo, hi)}
            ids = info.ids if info.ids is not None else _shard_ids(self.loc, info.name)
            digests[spec_index] = ids_digest(ids)
            for r, i in enumerate(ids):
                p = pos.get(i)
                if p is None:
                    raise StoreError(f"{self.loc.url('shards/' + info.name)} holds id {i!r} that its plan shard does not list; re-run with --overwrite")
                row[p] = r
            for i, _label, why in info.errors:
                p = pos.get(i)
                if p is not None and row[p] < 0:
                    status[p], reason[p] = "error", why
            for p in range(lo, hi):
                if row[p] < 0 and p not in reason:
                    status[p], reason[p] = "error", "missing from the committed shard"
        manifest = pa.table({
            "id": pa.array(plan.ids, pa.string()),
            "label": plan.labels.astype(np.int64),
            "shard": shard_of,
            "row": row,
            "status": pa.array(status.tolist(), pa.string()),
        })
        err_pos = np.array(sorted(reason), dtype=np.int64)
        errors = pa.table({
            "id": pa.array([plan.ids[p] for p in err_pos], pa.string()),
            "label": plan.labels[err_pos].astype(np.int64) if len(err_pos) else np.zeros(0, np.int64),
            "shard": shard_of[err_pos] if len(err_pos) else np.zeros(0, np.int64),
            "reason": pa.array([reason[p] for p in err_pos], pa.string()),
        })
        self.loc.write_parquet("manifest.parquet", manifest)
        self.loc.write_parquet("errors.parquet", errors)
        self._remove_stale_temps()

        shards = [infos[i] for i in sorted(infos) if i < plan.num_shards]
        first = _with_layers(shards)
        layers: dict[str, dict] = first.layers if first else {}
        dtype = first.dtype if first else self.config.get("dtype")
        compression = first.compression if first else self.config.get("compression")
        self.meta.update({
            "status": "complete" if not failed else "incomplete",
            "label_names": list(plan.label_names),
            "shard_size": plan.shard_size,
            "num_inputs": n,
            "num_rows": int(sum(s.rows for s in shards)),
            "num_errors": int(len(err_pos)),
            "num_shards": plan.num_shards,
            "failed_shards": {str(k): v for k, v in sorted(failed.items())},
            "layers": layers,
            "dtype": dtype,
            "compression": compression,
            "shards": [
                {"index": s.index, "name": s.name, "rows": s.rows, "errors": len(s.errors), "sha256": s.sha256, "bytes": s.bytes,
                 "node_id": s.node_id, "ids_sha256": digests.get(s.index)}
                for s in shards
            ],
            "versions": library_versions(),
        })
        _write_meta(self.loc, self.meta)
        return StoreMeta(self.meta)

    def _remove_stale_temps(self) -> None:
        if self.loc.local:
            for name in self.loc.listdir("shards"):
                if name.startswith(".") and name.endswith(".tmp"):
                    self.loc.remove(f"shards/{name}")


def _committed(loc: _Loc) -> dict[int, ShardInfo]:
    names = loc.listdir("shards")
    present = set(names)
    h5s = [(int(m.group(1)), n) for n in names if (m := _SHARD_RE.match(n))]
    sidecars = [f"shards/{n[:-3]}.json" for _, n in h5s]
    blobs: dict[str, bytes] = {}
    if loc.local:
        for rel in sidecars:
            if rel.split("/")[1] in present:
                blobs[rel] = loc.read_bytes(rel)
    elif sidecars:  # one concurrent batch of GETs (s3fs/async filesystems)
        got = loc.fs.cat([loc.path(r) for r in sidecars if r.split("/")[1] in present], on_error="omit")
        for r in sidecars:
            if loc.path(r) in got:
                blobs[r] = got[loc.path(r)]
    out: dict[int, ShardInfo] = {}
    for (index, name), rel in zip(h5s, sidecars):
        if rel in blobs:
            out[index] = ShardInfo.from_dict(json.loads(blobs[rel]))
        else:  # sidecar lost: rebuild what we can from the shard itself
            out[index] = _info_from_shard(loc, index, name)
    return out


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of a shard's ids in row order, kept in store.json: a reader compares a shard's `ids`
    with it when it first opens the shard (the ids are a small read beside the features; vlen
    strings carry no fletcher32 checksum, and the file's own sha256 would mean reading all of it)."""
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()


def _with_layers(infos) -> ShardInfo | None:
    """The first shard that holds layers: a shard whose every input failed has none, so says nothing
    about the store's layers, dtype or compression."""
    return next((i for i in infos if i.layers), None)


def human_bytes(n: int) -> str:
    """A byte count as people read it: 642.2 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _info_from_shard(loc: _Loc, index: int, name: str) -> ShardInfo:
    """A committed shard's info from the .h5 alone, when its sidecar is gone (its errors' reasons are lost:
    those inputs read "missing from the committed shard" in errors.parquet)."""
    import h5py

    rel = f"shards/{name}"
    try:
        sha, size = loc.sha256(rel)
        with _open_shard_for_scan(loc, name) as path, h5py.File(path, "r") as f:
            ids = list(f["ids"].asstr()[()])
            group = f["layers"] if "layers" in f else {}
            layers = {k: {"shape": list(ds.shape[1:]), "dtype": str(ds.dtype)} for k, ds in group.items()}
            first = next(iter(group.values()), None)
            dtype = str(first.dtype) if first is not None else "float32"
            compression = first.compression if first is not None else None
    except (OSError, KeyError) as exc:
        raise StoreError(f"{loc.url(rel)}: committed, but its sidecar {name[:-3]}.json is gone and the shard cannot "
                         f"be read ({exc}); delete it and run the same `featurestore extract` command again to "
                         "recompute it") from exc
    return ShardInfo(index, name, len(ids), sha, size, [], ids, layers, dtype, compression)


def _shard_ids(loc: _Loc, name: str) -> list[str]:
    import h5py

    with _open_shard_for_scan(loc, name) as path, h5py.File(path, "r") as f:
        return list(f["ids"].asstr()[()])


class _open_shard_for_scan:
    """A local path for a shard: itself when local, else a downloaded temporary copy."""

    def __init__(self, loc: _Loc, name: str):
        self.loc, self.name, self.tmp = loc, name, None

    def __enter__(self) -> str:
        if self.loc.local:
            return self.loc.path(f"shards/{self.name}")
        fd, self.tmp = tempfile.mkstemp(suffix=".h5")
        os.close(fd)
        self.loc.fs.get_file(self.loc.path(f"shards/{self.name}"), self.tmp)
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.tmp:
            os.remove(self.tmp)


def write_store(
    uri: str,
    features: dict[str, np.ndarray] | np.ndarray,
    labels,
    label_names: Sequence[str],
    ids: Sequence[str] | None = None,
    config: dict | None = None,
    shard_size: int = 1024,
    dtype: str = "float32",
    overwrite: bool = False,
    *,
    compression: str | None = None,
    storage_options: dict | None = None,
) -> "StoreReader":
    """Write a complete store from arrays in memory (no model); rows keep the given order.

    features: {layer: array (N, ...)} or one array (stored as layer "features"). ids default to
    "item-00000000"...; they must be unique. Returns a reader on the new store.
    """
    if not isinstance(features, dict):
        features = {"features": features}
    features = {str(k): np.asarray(v) for k, v in features.items()}
    if not features:
        raise ValueError("write_store: features is empty; pass {layer: array (N, ...)}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(labels)
    for layer, arr in features.items():
        if arr.ndim < 1 or arr.shape[0] != n:
            raise ValueError(f"write_store: layer {layer!r} has {arr.shape[0] if arr.ndim else 0} rows but there are {n} labels")
    if ids is None:
        ids = [f"item-{i:08d}" for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"write_store: {len(ids)} ids but {n} labels")
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"write_store: id {dup!r} appears more than once; ids must be unique")
    label_names = [str(x) for x in label_names]
    if n and (labels.min() < -1 or labels.max() >= len(label_names)):
        raise ValueError(f"write_store: labels must lie in -1..{len(label_names) - 1} (label_names has {len(label_names)} names)")
    cfg = dict(config or {})
    cfg.setdefault("layers", list(features))
    cfg.setdefault("dtype", dtype)
    plan = Plan(ids, labels, label_names, int(shard_size))
    writer = StoreWriter(uri, cfg, label_names, overwrite=overwrite, storage_options=storage_options)
    writer.write_plan(plan)
    shapes = {k: v.shape[1:] for k, v in features.items()}
    done = writer.committed()
    for spec in plan.shards():
        if spec.index in done:
            continue
        lo, hi = plan.bounds(spec.index)
        with ShardWriter(uri, spec.index, label_names, dtype=dtype, compression=compression,
                         storage_options=storage_options, feature_shapes=shapes, expected_rows=len(spec)) as sw:
            sw.append(spec.ids, spec.labels, {k: v[lo:hi] for k, v in features.items()})
            sw.commit()
    writer.finalize(plan, {})
    return open_store(uri, storage_options=storage_options)


# --------------------------------------------------------------------------------------------
# Reading


def _default_cache_dir() -> str:
    return os.environ.get("FEATURESTORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "featurestore", "shards")


class LazyFeatures:
    """One layer's features across all shards, read on demand (numpy-style indexing on rows)."""

    def __init__(self, reader: "StoreReader", layer: str):
        self._r = reader
        self.layer = layer
        info = reader.meta.get("layers", {}).get(layer)
        if info is None:
            raise StoreKeyError(f"{reader.uri}: no layer {layer!r}; layers: {', '.join(reader.layers) or '(none)'}")
        self.shape = (len(reader), *info["shape"])
        self.dtype = np.dtype(info["dtype"])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyFeatures(layer={self.layer!r}, shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype=None, copy=None):
        out = self.to_numpy()
        return out.astype(dtype, copy=False) if dtype is not None else out

    def _ds(self, k: int):
        return self._r._file(k)[f"layers/{self.layer}"]

    def to_numpy(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        for k, (lo, hi) in enumerate(self._r._bounds()):
            if hi > lo:
                with self._r._reading(k):
                    self._ds(k).read_direct(out, np.s_[0:hi - lo], np.s_[lo:hi])
        return out

    def _rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        for k, (lo, hi) in enumerate(self._r._bounds()):
            a, b = max(lo, start), min(hi, stop)
            if b > a:
                with self._r._reading(k):
                    self._ds(k).read_direct(out, np.s_[a - lo:b - lo], np.s_[a - start:b - start])
        return out

    def _take(self, idx: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} does not match {n} rows")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        if not len(idx):
            return out
        offsets = self._r._offsets()
        shard = np.searchsorted(offsets, idx, side="right") - 1
        order = np.argsort(idx, kind="stable")
        for k in np.unique(shard):
            sel = order[shard[order] == k]
            local = idx[sel] - offsets[k]
            uniq, inv = np.unique(local, return_inverse=True)
            ds = self._ds(int(k))
            span = int(uniq[-1] - uniq[0] + 1)
            with self._r._reading(int(k)):
                if span <= 4 * len(uniq) or len(uniq) > 256:
                    block = ds[int(uniq[0]):int(uniq[-1]) + 1]
                    vals = block[uniq - uniq[0]]
                else:
                    vals = ds[uniq]
            out[sel] = vals[inv]
        return out

    def _row_index(self, key):
        """key as an int, a slice or a 1-D array of ints or bools; anything numpy would read otherwise is refused."""
        if key is Ellipsis:
            return slice(None)
        if isinstance(key, (int, np.integer, slice)) and not isinstance(key, (bool, np.bool_)):
            return key
        arr = None
        if not (key is None or isinstance(key, (str, bytes, float, bool, np.generic))):
            try:
                arr = np.asarray(key)
            except ValueError:  # ragged nested lists
                arr = None
        if arr is not None and arr.ndim == 1 and arr.size == 0:
            return arr.astype(np.int64)
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iub":
            raise IndexError(f"rows are selected by an int, a slice, a 1-D list or array of ints, or a boolean mask of "
                             f"{len(self)}; got {key!r:.80}")
        return arr

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            if not key:
                return self.to_numpy()
            key, rest = key[0], key[1:]
        key = self._row_index(key)
        if isinstance(key, np.ndarray) and any(isinstance(r, (list, tuple, np.ndarray)) for r in rest):
            raise IndexError("rows and columns both selected by lists: numpy would pair them, not cross them; "
                             "index in two steps, X[rows][:, columns]")
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} out of range for {len(self)} rows")
            res = self._take(np.array([i]))[0]
        elif isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            res = self._rows(start, stop) if step == 1 else self._take(np.arange(start, stop, step))
        else:
            res = self._take(key)
        return res[(slice(None), *rest)] if rest and res.ndim == self.ndim else (res[rest] if rest else res)


class StoreReader:
    """A store opened for reading. Shards are opened lazily; features are read on demand.

    Remote shards (s3:// ...) are copied once into a local content-addressed cache (by sha256)
    and read from there with plain h5py (remote="cache", the default; faster than reading HDF5
    through s3fs's small random reads), or read in place through fsspec (remote="stream").
    """

    def __init__(self, uri: str, storage_options: dict | None = None, *, remote: str = "cache",
                 cache_dir: str | None = None, block_size: int = 1 << 20, max_open: int = 32):
        if remote not in ("cache", "stream"):
            raise ValueError(f"remote must be 'cache' or 'stream', got {remote!r}")
        self.loc = _Loc(uri, storage_options)
        self.uri = self.loc.uri
        self.storage_options = self.loc.storage_options
        self.remote = remote
        self.cache_dir = cache_dir
        self.block_size = int(block_size)
        self.max_open = int(max_open)
        meta = _read_meta(self.loc)
        if meta is None:
            raise _not_a_store(self.loc)
        self.meta = meta
        if "shards" in meta:
            self._shards = [dict(s) for s in meta["shards"]]
        else:  # still running: read what has been committed so far
            infos = _committed(self.loc)
            self._shards = [{"index": i.index, "name": i.name, "rows": i.rows, "sha256": i.sha256, "bytes": i.bytes,
                             "ids_sha256": ids_digest(i.ids) if i.ids is not None else None}
                            for _, i in sorted(infos.items())]
            if infos and not meta.get("layers"):
                first = _with_layers(infos.values())
                if first is not None:
                    self.meta = {**meta, "layers": first.layers, "dtype": first.dtype}
        self._init_state()

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._handles: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.RLock()
        self._ids = None
        self._labels = None
        self._index = None
        self._ids_from: str | None = None  # "manifest" or "shards", once loaded
        self._checked: set[int] = set()  # shards found to match store.json (see _check_shard)
        self._loading_ids = False
        rows = np.array([int(s["rows"]) for s in self._shards], dtype=np.int64)
        self._offs = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_lock", "_ids", "_labels", "_index", "_pid", "_offs",
                                                                   "_ids_from", "_checked", "_loading_ids")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_state()

    # -- metadata
    def __len__(self) -> int:
        return int(self._offs[-1])

    def __repr__(self) -> str:
        return f"StoreReader({self.uri!r}, rows={len(self)}, shards={len(self._shards)}, layers={self.layers})"

    @property
    def label_names(self) -> list[str]:
        return list(self.meta.get("label_names", []))

    @property
    def layers(self) -> list[str]:
        return list(self.meta.get("layers", {}))

    @property
    def config(self) -> dict:
        return dict(self.meta.get("config", {}))

    @property
    def status(self) -> str:
        """'complete' or 'incomplete' (failed shards) once the extraction finished. Before that,
        'running' while its writer holds the lease (OUT/.writer.json: a live pid on this host, or a
        recent heartbeat), else 'stopped' (killed or interrupted: the same extract command resumes
        it); `featurestore inspect` tells them apart the same way. One small read of the lease,
        only for an unfinished store, on every access: the writer may stop while this is open."""
        status = self.meta.get("status", "unknown")
        if status == "running":
            from featurestore.lease import writer_status  # lease imports this module

            try:
                writer = writer_status(self.uri, self.storage_options)
            except Exception as exc:  # a lease this reader may not read (object-store permissions): cannot tell
                log.debug("%s: cannot read the writer lease: %s", self.uri, exc)
                return status
            if not (writer and writer["live"]):
                return "stopped"
        return status

    @property
    def shard_uris(self) -> list[str]:
        return [self.loc.url(f"shards/{s['name']}") for s in self._shards]

    def _offsets(self) -> np.ndarray:
        return self._offs

    def _bounds(self) -> list[tuple[int, int]]:
        return [(int(self._offs[k]), int(self._offs[k + 1])) for k in range(len(self._shards))]

    # -- shard files
    def _file(self, k: int):
        import h5py

        with self._lock:
            if self._pid != os.getpid():  # forked (DataLoader workers): never share HDF5 handles
                self._handles = OrderedDict()
                self._pid = os.getpid()
            if k in self._handles:
                self._handles.move_to_end(k)
                return self._handles[k][0]
            s = self._shards[k]
            rel = f"shards/{s['name']}"
            extra = None
            try:
                if self.loc.local:
                    f = h5py.File(self.loc.path(rel), "r")
                elif self.remote == "cache":
                    f = h5py.File(self._cached(s), "r")
                else:
                    extra = self.loc.open(rel, block_size=self.block_size)
                    f = h5py.File(extra, "r")
            except OSError as exc:  # deleted, truncated or overwritten since the store was opened
                if extra is not None:
                    extra.close()
                raise self._damaged(k, exc) from exc
            if k not in self._checked:
                try:
                    self._check_shard(k, f)
                except BaseException:
                    f.close()
                    if extra is not None:
                        extra.close()
                    raise
                self._checked.add(k)
            self._handles[k] = (f, extra)
            while len(self._handles) > self.max_open:
                _, (old, old_extra) = self._handles.popitem(last=False)
                old.close()
                if old_extra is not None:
                    old_extra.close()
            return f

    def _damaged(self, k: int, exc: BaseException | str, what: str = "cannot read this shard") -> StoreError:
        return StoreError(f"{self.loc.url('shards/' + self._shards[k]['name'])}: {what} ({exc}). "
                          f"`featurestore verify {self.uri}` lists every damaged shard; delete them and run the same "
                          "`featurestore extract` command again to recompute them")

    def _check_shard(self, k: int, f) -> None:
        """Refuse a shard that is not the one store.json describes, before any of its rows is returned:
        `ids`, `labels` or a layer whose length is not the shard's row count (shapes only, no data read),
        or ids other than those its rows were committed with (one read of its `ids`, small beside the
        features, compared with store.json's ids_sha256, or for a store written before that digest with
        manifest.parquet). Features and labels chunks are not read here: fletcher32 fails the read that
        touches a damaged one, and verify reads them all. Once per shard per reader."""
        s = self._shards[k]
        rows = int(s["rows"])
        wrong = []

        def dataset(name: str):  # one lookup each: h5py's are what this check spends its time on
            try:
                return f[name]
            except KeyError:
                return None

        ids_ds = None
        for name in ("ids", "labels"):
            ds = dataset(name)
            if ds is None:
                wrong.append(f"dataset {name!r} missing")
            elif ds.shape[:1] != (rows,):
                wrong.append(f"{name} has {ds.shape[0] if ds.shape else 0} rows, store.json says {rows}")
            ids_ds = ds if name == "ids" else ids_ds
        for layer, info in (self.meta.get("layers", {}) if rows else {}).items():
            ds = dataset(f"layers/{layer}")
            if ds is None:
                wrong.append(f"layer {layer!r} missing")
            elif ds.shape != (rows, *info["shape"]):
                wrong.append(f"layer {layer!r} has shape {ds.shape}, store.json says {(rows, *info['shape'])}")
        if wrong:
            raise self._damaged(k, "; ".join(wrong), "does not match store.json")
        if not rows:
            return
        want = s.get("ids_sha256")
        expected = None
        if want is None and self.meta.get("status") in ("complete", "incomplete") and self._ids_from is None \
                and not self._loading_ids:
            self._load_ids_labels()
        if want is None and self._ids_from == "manifest":
            expected = self._ids[self._offs[k]:self._offs[k + 1]].tolist()
            want = ids_digest(expected)
        if want is None:  # a store written before the digest, without a manifest to compare with
            return
        with self._reading(k):
            got = ids_ds.asstr()[()].tolist()
        if ids_digest(got) != want:
            where = ""
            if expected is not None:
                r = next((r for r, (a, b) in enumerate(zip(got, expected)) if a != b), None)
                where = "" if r is None else f"; row {r} reads {got[r]!r} where manifest.parquet says {expected[r]!r}"
            raise self._damaged(k, f"its ids are not those its rows were committed with{where}",
                                "does not match store.json")

    @contextmanager
    def _reading(self, k: int):
        """h5py's OSError (a failed chunk checksum, a truncated file) as a StoreError naming the shard."""
        try:
            yield
        except OSError as exc:
            raise self._damaged(k, exc) from exc

    def _cached(self, s: dict) -> str:
        root = self.cache_dir or _default_cache_dir()
        os.makedirs(root, exist_ok=True)
        key = s.get("sha256") or f"{abs(hash((self.uri, s['name'])))}"
        path = os.path.join(root, f"{key}.h5")
        if os.path.exists(path) and (not s.get("bytes") or os.path.getsize(path) == int(s["bytes"])):
            return path
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.loc.fs.get_file(self.loc.path(f"shards/{s['name']}"), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def close(self) -> None:
        with self._lock:
            for f, extra in self._handles.values():
                try:
                    f.close()
                finally:
                    if extra is not None:
                        extra.close()
            self._handles.clear()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rows
    def _load_ids_labels(self) -> None:
        """ids and labels of every row: from manifest.parquet when the store is finished (one small
        table, no shard opened: on object storage no shard is downloaded just for its labels), else
        from the shards' `ids` and `labels` datasets.

        Deliberately, the shards' `labels` are then not read, so a damaged labels chunk (fletcher32)
        goes unnoticed here: what is returned is still right, since the manifest is its own copy of
        the plan's labels, and checking the shards would cost a read of every shard on every open.
        Finding that damage is verify's job (it reads every chunk and names shard, dataset and
        rows); iter_batches, which reads ids and labels from the shards, fails on it with a
        StoreError naming the shard, as for features."""
        if self._ids is not None:
            return
        ids, labels = None, None
        if self.meta.get("status") in ("complete", "incomplete") and self.loc.exists("manifest.parquet"):
            import pyarrow.compute as pc

            try:
                t = self.manifest()
            except StoreError as exc:  # damaged: the shards hold the same ids and labels
                log.warning("%s; reading ids and labels from the shards instead", exc)
                t = None
            if t is not None:
                t = t.filter(pc.equal(t["status"], "ok")).sort_by([("shard", "ascending"), ("row", "ascending")])
            if t is not None and t.num_rows == len(self):
                ids = np.array(t["id"].to_pylist(), dtype=object)
                labels = t["label"].to_numpy().astype(np.int64)
        source = "manifest"
        if ids is None:
            source = "shards"
            parts_i, parts_l = [], []
            self._loading_ids = True  # _check_shard: no manifest to compare with
            try:
                for k in range(len(self._shards)):
                    if self._shards[k]["rows"]:
                        f = self._file(k)
                        with self._reading(k):
                            parts_i.append(np.asarray(f["ids"].asstr()[()], dtype=object))
                            parts_l.append(f["labels"][()].astype(np.int64))
            finally:
                self._loading_ids = False
            ids = np.concatenate(parts_i) if parts_i else np.zeros(0, dtype=object)
            labels = np.concatenate(parts_l) if parts_l else np.zeros(0, dtype=np.int64)
        self._ids, self._labels, self._ids_from = ids, labels, source

    @property
    def ids(self) -> np.ndarray:
        self._load_ids_labels()
        return self._ids

    @property
    def labels(self) -> np.ndarray:
        self._load_ids_labels()
        return self._labels

    def _layer(self, layer: str | None) -> str:
        if layer is None:
            if not self.layers:
                raise StoreError(f"{self.uri}: the store has no feature layers (no rows were written)")
            return self.layers[0]
        if layer not in self.meta.get("layers", {}):
            raise StoreKeyError(f"{self.uri}: no layer {layer!r}; layers: {', '.join(self.layers) or '(none)'}")
        return layer

    def features(self, layer: str | None = None) -> LazyFeatures:
        """A lazy (N, ...) array of one layer (default: the first) across all shards."""
        return LazyFeatures(self, self._layer(layer))

    def to_numpy(self, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All features of one layer and the labels, in memory."""
        return self.features(layer).to_numpy(), self.labels.copy()

    def iter_batches(self, batch_size: int = 4096, layer: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (ids, X, y) batches of batch_size rows (the last may be smaller), reading shard by
        shard, so memory stays about two batches whatever the store's size."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        layer = self._layer(layer)
        pend: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        have = 0

        def flush(n):
            nonlocal pend, have
            ids = np.concatenate([p[0] for p in pend])
            X = np.concatenate([p[1] for p in pend])
            y = np.concatenate([p[2] for p in pend])
            out = (ids[:n], X[:n], y[:n])
            pend = [(ids[n:], X[n:], y[n:])] if len(ids) > n else []
            have = len(ids) - n
            return out

        for k, s in enumerate(self._shards):
            rows = int(s["rows"])
            if not rows:
                continue
            f = self._file(k)
            for a in range(0, rows, batch_size):
                b = min(rows, a + batch_size)
                with self._reading(k):
                    pend.append((np.asarray(f["ids"].asstr()[a:b], dtype=object), f[f"layers/{layer}"][a:b],
                                 f["labels"][a:b].astype(np.int64)))
                have += b - a
                while have >= batch_size:
                    yield flush(batch_size)
        if have:
            yield flush(have)

    def select(self, ids: Sequence[str], layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the given ids, in the order given. KeyError names missing ids."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"select takes a list of ids, got the single id {ids!r}; pass [{ids!r}]")
        if self._index is None:
            self._index = {v: i for i, v in enumerate(self.ids.tolist())}
        ids = [str(i) for i in ids]
        missing = [i for i in ids if i not in self._index]
        if missing:
            raise StoreKeyError(f"{self.uri}: {len(missing)} id(s) not in the store, e.g. {', '.join(missing[:3])}")
        rows = np.array([self._index[i] for i in ids], dtype=np.int64)
        return self.features(layer)[rows], self.labels[rows]

    def torch_dataset(self, layer: str | None = None, transform=None):
        """A torch Dataset of (features tensor, label); safe with DataLoader worker processes."""
        return _feature_dataset_class()(self, self._layer(layer), transform)

    def manifest(self):
        """Every input of the plan with its label, shard, row and status (a pyarrow Table)."""
        return _read_table(self.loc, "manifest.parquet", self.status)

    def errors(self):
        """The inputs that were skipped, with the reason (a pyarrow Table)."""
        return _read_table(self.loc, "errors.parquet", self.status)


def _read_table(loc: _Loc, rel: str, status: str | None):
    """One of the store's Parquet tables; StoreError says why it cannot be had."""
    try:
        return loc.read_parquet(rel)
    except FileNotFoundError:
        if status not in ("complete", "incomplete"):
            todo = "wait for it to finish" if status == "running" else \
                "run the same `featurestore extract` command to finish it"
            raise StoreError(f"{loc.uri}: {rel} is written when the extraction finishes (status: {status}); "
                             f"{todo}") from None
        raise StoreError(f"{loc.url(rel)}: missing; run the same `featurestore extract` command again to "
                         "rewrite it") from None
    except Exception as exc:  # pyarrow's ArrowInvalid: truncated, overwritten, not Parquet
        raise StoreError(f"{loc.url(rel)}: unreadable ({type(exc).__name__}: {exc}); delete it and run the same "
                         "`featurestore extract` command again to rewrite it") from exc


def _feature_dataset_class():
    """FeatureDataset, built on first use: importing torch takes seconds that a job's driver,
    `inspect` or `train` should not pay just for reading a store."""
    built = globals().get("FeatureDataset")
    if built is not None:
        return built
    from torch.utils.data import Dataset

    class FeatureDataset(Dataset):
        """Rows of one layer as (torch.Tensor, int label); each worker process opens its own files."""

        def __init__(self, reader: StoreReader, layer: str, transform=None):
            self.reader, self.layer, self.transform = reader, layer, transform
            self._feats = reader.features(layer)
            self._labels = reader.labels

        def __len__(self) -> int:
            return len(self.reader)

        def __getitem__(self, i: int):
            import torch

            x = torch.from_numpy(np.ascontiguousarray(self._feats[int(i)]))
            if self.transform is not None:
                x = self.transform(x)
            return x, int(self._labels[int(i)])

    FeatureDataset.__module__ = __name__
    FeatureDataset.__qualname__ = "FeatureDataset"  # pickled by name: spawned DataLoader workers find it
    globals()["FeatureDataset"] = FeatureDataset
    return FeatureDataset


def __getattr__(name: str):
    if name == "FeatureDataset":
        return _feature_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(uri: str, storage_options: dict | None = None, **kwargs) -> StoreReader:
    """Open a store for reading (featurestore.open). kwargs: remote="cache"|"stream", cache_dir."""
    return StoreReader(uri, storage_options=storage_options, **kwargs)


# --------------------------------------------------------------------------------------------
# verify / inspect


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str]
    rows: int
    shards: int
    checked_bytes: int = 0
    # shard files that are missing, corrupt or unreadable: deleting them and running the same
    # extraction again recomputes exactly those shards
    damaged_shards: list[str] = field(default_factory=list)
    repair: str | None = None  # what to do about the problems, when running extract again fixes them

    def to_dict(self) -> dict:
        return asdict(self)


_SCAN_BYTES = 16 << 20  # verify reads a dataset this much at a time


def _span(rows: list[tuple[int, int]]) -> str:
    """[(0, 10), (20, 30)] -> 'rows 0-9, 20-29'."""
    shown = ", ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in rows[:3])
    return f"row{'s' if len(rows) > 1 or rows[0][1] - rows[0][0] > 1 else ''} {shown}" + \
        (f" and {len(rows) - 3} more chunk(s)" if len(rows) > 3 else "")


def _scan_dataset(ds, rel: str, label: str, problems: list[str], keep: bool = False) -> np.ndarray | None:
    """Read every chunk of one shard dataset (its values when `keep`, else read and dropped, a block at
    a time), naming the dataset and the rows of each chunk that fails: a fletcher32 checksum that no
    longer matches, a chunk that does not decompress, a vlen string whose heap entry is damaged.
    Returns the values (keep) when everything read, else None."""
    import h5py

    view = ds.asstr() if h5py.check_string_dtype(ds.dtype) is not None else ds
    n = int(ds.shape[0]) if ds.shape else 0
    chunk = int(ds.chunks[0]) if ds.chunks else max(1, n)
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    block = max(chunk, _SCAN_BYTES // row_bytes // chunk * chunk)
    parts: list[np.ndarray] = []
    failed: list[tuple[int, int]] = []
    reason = ""
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        try:
            values = view[lo:hi]
        except OSError:
            for a in range(lo, hi, chunk):  # which chunks of the block
                b = min(hi, a + chunk)
                try:
                    view[a:b]
                except OSError as exc:
                    reason = reason or str(exc)
                    if failed and failed[-1][1] == a:
                        failed[-1] = (failed[-1][0], b)
                    else:
                        failed.append((a, b))
            continue
        if keep:
            parts.append(np.asarray(values, dtype=object) if view is not ds else values)
    if failed:
        why = (f"its chunk checksum (fletcher32) no longer matches: the bytes changed after they were written "
               f"({reason})" if ds.fletcher32 and "filter returned failure" in reason else f"cannot be read ({reason})")
        problems.append(f"{rel}: {label} {_span(failed)}: {why}")
        return None
    if not keep:
        return None
    return np.concatenate(parts) if parts else view[0:0]


def _verify_shard_datasets(f, rel: str, rows: int, layers: dict, label_names: list, problems: list[str]):
    """Check one open shard against what store.json says, reading every chunk of every dataset
    (the fletcher32 checksums of labels and features are checked as they are read; ids, vlen
    strings, cannot carry one: the caller compares them with the sidecar or manifest). Problems
    name the shard and the dataset. Returns (ids, labels), each None where it could not be read."""
    out: dict[str, np.ndarray | None] = {}
    for name in ("ids", "labels"):
        if name not in f:
            problems.append(f"{rel}: dataset {name!r} missing")
            out[name] = None
            continue
        ds = f[name]
        if ds.shape[:1] != (rows,):
            problems.append(f"{rel}: {name} has {ds.shape[0] if ds.shape else 0} rows, store.json says {rows}")
        out[name] = _scan_dataset(ds, rel, name, problems, keep=True)
    lab = out["labels"]
    if lab is not None and len(lab):
        bad = (lab < -1) | (lab >= len(label_names)) if label_names else lab != -1
        if np.any(bad):
            r = int(np.flatnonzero(bad)[0])
            problems.append(f"{rel}: labels row {r} is {int(lab[r])}, outside -1..{len(label_names) - 1} "
                            f"({int(np.count_nonzero(bad))} such row(s))")
    first = next(iter(layers), None)
    for layer, info in layers.items():
        if rows == 0 and f"layers/{layer}" not in f:
            continue
        if f"layers/{layer}" not in f:
            problems.append(f"{rel}: layer {layer!r} missing")
            continue
        ds = f[f"layers/{layer}"]
        if ds.shape != (rows, *info["shape"]):
            problems.append(f"{rel}: layer {layer!r} has shape {ds.shape}, expected {(rows, *info['shape'])}")
        _scan_dataset(ds, rel, f"layers/{layer}" + (" (= features)" if layer == first else ""), problems)
    if first is not None and f"layers/{first}" in f and "features" not in f:
        problems.append(f"{rel}: dataset 'features' (the first layer's PyImageSearch-style name) missing")
    if "label_names" not in f:
        problems.append(f"{rel}: dataset 'label_names' missing")
    else:
        names = _scan_dataset(f["label_names"], rel, "label_names", problems, keep=True)
        if names is not None and names.tolist() != list(label_names):
            problems.append(f"{rel}: label_names differ from store.json")
    return out["ids"], lab


def verify(uri: str, storage_options: dict | None = None) -> VerifyReport:
    """Recompute checksums and check counts and manifest consistency; problems as readable lines.

    Every chunk of every shard dataset is read, so a damaged labels or features chunk is named
    (shard, dataset, rows) even where nothing else reads it: a complete store's reader takes
    ids and labels from manifest.parquet, not from the shards' `labels`."""
    import h5py

    loc = _Loc(uri, storage_options)
    problems: list[str] = []
    meta = _read_meta(loc)
    if meta is None:
        return VerifyReport(False, [str(_not_a_store(loc))], 0, 0)
    status = meta.get("status")
    finished = status in ("complete", "incomplete")
    label_names = meta.get("label_names", [])
    rerun = "run the same `featurestore extract` command again"
    repair = None
    if finished:
        listed = meta.get("shards", [])
        layers = meta.get("layers", {})
        if status != "complete":
            failed = meta.get("failed_shards") or {}
            extra = f": failed shards {', '.join(f'{k} ({v})' for k, v in failed.items())}" if failed else ""
            problems.append(f"store status is {status!r}, not 'complete'{extra}")
            repair = f"{rerun}: it retries the failed shards"
    else:  # running, or stopped: check the shards committed so far against their sidecars
        try:
            infos = _committed(loc)
        except StoreError as exc:
            problems.append(str(exc))
            infos = {}
        listed = [i.to_dict() for _, i in sorted(infos.items())]
        first = _with_layers(infos.values())
        layers = first.layers if first else {}
        from featurestore.lease import writer_status  # lease imports this module

        writer = writer_status(loc.uri, storage_options)
        live = bool(writer and writer["live"])
        problems.append(f"the extraction has not finished ({'its writer is running' if live else 'it was stopped'}): "
                        f"{len(listed)} of {meta.get('num_shards', '?')} planned shards committed")
        repair = "wait for the running extraction to finish" if live else f"{rerun}: it resumes where it stopped"
    on_disk = {n for n in loc.listdir("shards") if _SHARD_RE.match(n)}
    for n in sorted(on_disk - {s["name"] for s in listed}):
        problems.append(f"shards/{n}: present but not listed in store.json")
    missing: list[str] = []
    shard_ids: dict[int, np.ndarray | None] = {}  # None: missing or unreadable (said already)
    shard_labels: dict[int, np.ndarray | None] = {}
    altered: set[int] = set()  # shards whose bytes are not those committed (sha256 differs)
    unhashed: dict[str, int] = {}  # shards whose ids do not hash to store.json's ids_sha256 (readers refuse them)
    checked = 0
    damaged: list[str] = []
    for s in listed:
        rel = f"shards/{s['name']}"
        before = len(problems)
        if s["name"] not in on_disk:
            problems.append(f"{rel}: missing (listed in store.json with {s['rows']} rows)")
            shard_ids[int(s["index"])] = shard_labels[int(s["index"])] = None
            damaged.append(rel)
            missing.append(rel)
            continue
        tmp = None
        try:
            if loc.local:
                path = loc.path(rel)
                sha, size = loc.sha256(rel)
            else:  # one download: hash it and open it with h5py
                fd, tmp = tempfile.mkstemp(suffix=".h5")
                os.close(fd)
                loc.fs.get_file(loc.path(rel), tmp)
                path = tmp
                h, size = hashlib.sha256(), 0
                with open(tmp, "rb") as fh:
                    for b in iter(lambda: fh.read(_BLOCK), b""):
                        h.update(b)
                        size += len(b)
                sha = h.hexdigest()
            checked += size
            if sha != s.get("sha256"):
                problems.append(f"{rel}: checksum mismatch (sha256 {sha[:12]}..., store.json says {str(s.get('sha256'))[:12]}...); the file is corrupt or was replaced")
                altered.add(int(s["index"]))
            if s.get("bytes") is not None and size != int(s["bytes"]):
                problems.append(f"{rel}: {size} bytes, store.json says {s['bytes']}")
            try:
                with h5py.File(path, "r") as f:
                    ids, lab = _verify_shard_datasets(f, rel, int(s["rows"]), layers, label_names, problems)
            except (OSError, KeyError) as exc:  # not HDF5, a truncated file, a damaged header: no dataset to name
                problems.append(f"{rel}: not a readable shard ({exc})")
                ids = lab = None
            if ids is not None and s.get("ids") is not None:
                # a running store's shards listed from their sidecars, which hold the ids too (a finished
                # store's are checked against manifest.parquet below)
                differ = [r for r, (a, b) in enumerate(zip(ids.tolist(), s["ids"])) if a != b]
                if differ:
                    r = differ[0]
                    problems.append(f"{rel}: ids differ from its sidecar {s['name'][:-3]}.json in {len(differ)} "
                                    f"row(s), e.g. row {r} reads {ids[r]!r} where the sidecar says {s['ids'][r]!r}")
            if ids is not None and s.get("ids_sha256") and ids_digest(ids.tolist()) != s["ids_sha256"]:
                unhashed[rel] = int(s["index"])
            shard_ids[int(s["index"])] = ids
            shard_labels[int(s["index"])] = lab
        finally:
            if tmp:
                os.remove(tmp)
        if len(problems) > before:
            damaged.append(rel)
    total = sum(int(s["rows"]) for s in listed)
    if meta.get("num_rows") is not None and int(meta["num_rows"]) != total:
        problems.append(f"store.json: num_rows {meta['num_rows']} but the shards list sums to {total}")
    read = [v for v in shard_ids.values() if v is not None]
    all_ids = np.concatenate(read) if read else np.zeros(0, dtype=object)
    uniq, counts = np.unique(all_ids.astype(str), return_counts=True) if len(all_ids) else (np.zeros(0), np.zeros(0))
    dups = uniq[counts > 1]
    if len(dups):
        problems.append(f"{len(dups)} id(s) appear in more than one shard row, e.g. {', '.join(map(str, dups[:3]))}")

    bad_tables: list[str] = []

    def table(rel: str):
        try:
            return loc.read_parquet(rel)
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            missing.append(rel)
        except Exception as exc:  # pyarrow: truncated or not Parquet
            problems.append(f"{rel}: unreadable ({type(exc).__name__}: {exc})")
            bad_tables.append(rel)
        return None

    if finished:
        man = table("manifest.parquet")
        if man is not None:
            mid = man["id"].to_pylist()
            mshard = man["shard"].to_numpy()
            mrow = man["row"].to_numpy()
            mlabel = man["label"].to_numpy()
            mstatus = man["status"].to_pylist()
            if meta.get("num_inputs") is not None and len(mid) != int(meta["num_inputs"]):
                problems.append(f"manifest.parquet: {len(mid)} rows, store.json says {meta['num_inputs']} inputs")
            if len(set(mid)) != len(mid):
                problems.append("manifest.parquet: duplicate ids")
            ok = [i for i, st in enumerate(mstatus) if st == "ok"]
            if len(ok) != total:
                problems.append(f"manifest.parquet: {len(ok)} ok rows, shards hold {total}")
            bad = 0
            examples: list[str] = []
            # a shard whose bytes changed since its commit is the one to blame for a row that disagrees;
            # otherwise the manifest is (rows of a missing or unreadable shard were named above)
            differ: dict[int, list[str]] = {}
            for i in ok:
                k, r = int(mshard[i]), int(mrow[i])
                if k in shard_ids and shard_ids[k] is None:
                    continue
                sid, slab = shard_ids.get(k), shard_labels.get(k)
                what = None
                if sid is not None and 0 <= r < len(sid):
                    if sid[r] != mid[i]:
                        what = f"row {r}: ids reads {sid[r]!r}, manifest.parquet says {mid[i]!r}"
                    elif slab is not None and int(slab[r]) != int(mlabel[i]):
                        what = f"row {r}: labels reads {int(slab[r])}, manifest.parquet says {int(mlabel[i])}"
                    else:
                        continue
                if what is not None and k in altered:
                    differ.setdefault(k, []).append(what)
                    continue
                bad += 1
                if len(examples) < 3:
                    examples.append(f"{mid[i]} -> shard {k} row {r}")
            names = {int(s["index"]): s["name"] for s in listed}
            for k, whats in sorted(differ.items()):
                problems.append(f"shards/{names[k]}: {len(whats)} row(s) differ from manifest.parquet, e.g. "
                                f"{'; '.join(whats[:3])}")
            if bad:
                problems.append(f"manifest.parquet: {bad} ok row(s) do not match their shard row (id or label), e.g. {'; '.join(examples)}")
        errs = table("errors.parquet")
        if man is not None and errs is not None and errs.num_rows != man.num_rows - len(ok):
            problems.append(f"errors.parquet: {errs.num_rows} rows, manifest has {man.num_rows - len(ok)} non-ok inputs")
    for rel, k in unhashed.items():  # said only where nothing else named the shard: its ids agree with the rest
        if not any(p.startswith(f"{rel}:") or f"shard {k} row" in p for p in problems):
            problems.append(f"{rel}: its ids do not hash to store.json's ids_sha256, so readers refuse the shard, "
                            "though they agree with the manifest: store.json was changed after the extraction")
            damaged.append(rel)
    to_delete = [d for d in damaged if d not in missing] + bad_tables
    if to_delete or (missing and finished):
        redo = [what for what, lacking in (("recomputes only those shards", [d for d in damaged if d.endswith(".h5")]),
                                           ("rewrites the tables", bad_tables + [m for m in missing if m.endswith(".parquet")]))
                if lacking]
        repair = (f"delete {', '.join(to_delete)} from {loc.uri} and {rerun}" if to_delete else rerun) + \
            f"; it {' and '.join(redo)}"
    return VerifyReport(not problems, problems, total, len(listed), checked, damaged, repair if problems else None)


def inspect(uri: str, storage_options: dict | None = None) -> dict:
    """A JSON-able summary of a store: what built it, its size, classes and errors."""
    loc = _Loc(uri, storage_options)
    meta = _read_meta(loc)
    if meta is None:
        raise _not_a_store(loc)
    cfg = meta.get("config", {})
    out: dict[str, Any] = {
        "uri": loc.uri,
        "status": meta.get("status"),
        "rows": meta.get("num_rows"),
        "inputs": meta.get("num_inputs"),
        "errors": meta.get("num_errors"),
        "shards": len(meta.get("shards", [])),
        "planned_shards": meta.get("num_shards"),
        "failed_shards": meta.get("failed_shards", {}),
        "bytes": sum(int(s.get("bytes", 0)) for s in meta.get("shards", [])),
        "model": cfg.get("model"),
        "weights": cfg.get("weights"),
        "layers": meta.get("layers", {}),
        "pooling": cfg.get("pooling"),
        "dtype": meta.get("dtype"),
        "compression": meta.get("compression"),
        "label_names": meta.get("label_names", []),
        "created": meta.get("created"),
        "updated": meta.get("updated"),
        "versions": meta.get("versions", {}),
        "config": cfg,
    }
    from featurestore.lease import writer_status  # lease imports this module

    out["writer"] = writer_status(loc.uri, storage_options)
    if meta.get("status") not in ("complete", "incomplete"):  # running or stopped: what is committed so far
        infos = _committed(loc)
        first = _with_layers(infos.values())
        out.update(rows=sum(i.rows for i in infos.values()), errors=sum(len(i.errors) for i in infos.values()),
                   shards=len(infos), bytes=sum(i.bytes for i in infos.values()))
        if first is not None:
            out.update(layers=first.layers, dtype=first.dtype, compression=first.compression)
        live = bool(out["writer"] and out["writer"]["live"])
        if meta.get("status") == "running" and not live:
            out["status"] = "stopped"  # as StoreReader.status says it
        out["unfinished"] = ("being written now" if live else
                             "killed or interrupted before it finished; run the same `featurestore extract` "
                             "command to resume")
    out["warnings"] = []

    def table(rel: str):
        try:
            return _read_table(loc, rel, meta.get("status"))
        except StoreError as exc:
            out["warnings"].append(str(exc))
            return None

    man = table("manifest.parquet") if meta.get("status") in ("complete", "incomplete") else None
    if man is not None:
        labels = man["label"].to_numpy()
        ok = np.array([s == "ok" for s in man["status"].to_pylist()], dtype=bool)
        names = out["label_names"]
        counts = {}
        for i, n in enumerate(names):
            counts[n] = int(np.sum(ok & (labels == i)))
        if np.any(ok & (labels == -1)):
            counts["(unlabeled)"] = int(np.sum(ok & (labels == -1)))
        out["class_counts"] = counts
    errs = table("errors.parquet") if meta.get("num_errors") else None
    if errs is not None:
        reasons: dict[str, int] = {}
        for r in errs["reason"].to_pylist():
            key = r.split(":")[0] if r.startswith("shard failed") else r
            reasons[key] = reasons.get(key, 0) + 1
        out["error_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    return out
