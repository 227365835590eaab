"""What every `python -m jobs.<name>` shares: argument parsing, logs, exit codes, stopping.

A Ray job's log is a plain file read later in a browser or by `featurestore jobs logs`,
so logs are line-oriented with timestamps (no progress bars), and the first and last
lines say what ran, where, and how it ended.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Callable

from featurestore.config import ConfigError

log = logging.getLogger("jobs")

EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC, EXIT_STOPPED = 0, 1, 2, 143


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    # Ray and HTTP clients are chatty at INFO; their warnings still show.
    for name in ("ray", "botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def redacted(config: Any) -> dict:
    """A job configuration safe to print: storage_options values are hidden."""
    import dataclasses

    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    if data.get("storage_options"):
        data["storage_options"] = {k: "***" for k in data["storage_options"]}
    return data


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the cluster test
    log.warning("received signal %d (`featurestore jobs stop`, or the cluster ending the job): stopping", signum)
    raise KeyboardInterrupt  # main() logs what was kept and exits EXIT_STOPPED


def _handle_sigterm() -> None:
    """(Re)install our SIGTERM handler: ray.init replaces it with a bare sys.exit."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def join_cluster_if_in_job() -> bool:
    """Inside a submitted Ray job (RAY_ADDRESS set), connect to its cluster; True if connected."""
    import ray

    if ray.is_initialized():
        return True
    if not os.environ.get("RAY_ADDRESS"):
        return False
    ray.init(logging_level=logging.WARNING)
    _handle_sigterm()
    return True


def check_outputs(spec, typed) -> None:
    from jobs.specs import check_output_reachable, output_fields

    if any(loc for _, loc in output_fields(spec, typed)) and join_cluster_if_in_job():
        for _, location in output_fields(spec, typed):
            check_output_reachable(location, os.environ.get("RAY_ADDRESS"))


def submission_id() -> str:
    """The Jobs API submission id when running as a submitted job, else "-"."""
    import json

    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        meta = {}
    return meta.get("job_submission_id") or os.environ.get("RAY_JOB_SUBMISSION_ID") or "-"


def input_errors(kind: str) -> tuple[type, ...]:
    """What the local command (`featurestore extract`, `probe`, `train`, ...) reports as the
    input's fault, in one line with exit code 2: a job run from a spec fails the same way.

    Only the project's named errors: a bare KeyError or ValueError is a bug until shown otherwise
    (the train job turns the ones bad input causes, a layer the store lacks or a split file with
    the wrong columns, into ConfigError where it reads them), and keeps its traceback. An OSError
    counts only when it is about a path the spec gave (see is_input_error)."""
    from featurestore.engine import ClusterUnreachable
    from featurestore.sources import FilesystemUnavailable, SourceError
    from featurestore.store import StoreError
    from featurestore.weights import WeightsError
    from featurestore.zoo import UnknownLayerError, UnknownModelError

    common = (ConfigError, SourceError, StoreError, WeightsError, UnknownModelError, UnknownLayerError,
              FileNotFoundError, FilesystemUnavailable, ClusterUnreachable)
    if kind == "extract":
        return common
    try:  # the heads' own errors; without them the rest still holds
        from classifiers.core import ExportError, HeadConfigMismatch
        from classifiers.heads import HeadError
        from classifiers.persist import HeadFileError
    except ImportError:
        return common
    if kind == "probe":
        from featurestore.probing import ProbeError

        return (*common, ProbeError, HeadError)
    return (*common, HeadConfigMismatch, HeadFileError, ExportError, HeadError)


def spec_locations(kind: str, typed: Any, addresses: bool = False) -> list[tuple[str, str]]:
    """(field, path or URL) of every location a spec gives: source, output, store, out, head, split,
    weights files (and with `addresses`, the Ray address, which is no path)."""
    from featurestore.weights import is_file_spec, split_recipe

    found = []
    for name in _LOCATION_FIELDS:
        if (name == "address" and not addresses) or (name == "head" and kind in ("train", "probe")):
            continue  # a train/probe head is a head's kind (logreg, ...), not a path
        value = getattr(typed, name, None)
        for v in (value.values() if isinstance(value, dict) else [value]):
            if not isinstance(v, str) or len(v.strip()) <= 2:
                continue
            if name == "weights":
                if not is_file_spec(v):  # an enum name, none, pypi:...
                    continue
                v = split_recipe(v)[0]
            found.append((name, v))
    return found


def location_field(kind: str, exc: BaseException, typed: Any, message: str | None = None,
                   addresses: bool = False) -> str | None:
    """The field whose location an error is about; the one place that decides it.

    An OSError that names its path (exc.filename) is matched by path: that location exactly, then
    the deepest location it lies inside, then a location below it (a folder above the output, say).
    Otherwise the message is scanned (fsspec and pyarrow often name the path in the text only): the
    location named first wins, the longest of those named at one place (output /d/a-store over
    source /d/a). `message` is the text to scan (default str(exc)); with `addresses` the Ray
    address counts there too (a path the filesystem refused never names it)."""
    def norm(p: str) -> str:
        for prefix in ("file://", "local://"):
            if p.startswith(prefix):
                p = p[len(prefix):]
        return os.path.normpath(os.path.abspath(os.path.expanduser(p))) if "://" not in p else p.rstrip("/")

    paths = [norm(os.fsdecode(p)) for p in (getattr(exc, "filename", None), getattr(exc, "filename2", None))
             if isinstance(p, (str, bytes, os.PathLike))] if isinstance(exc, OSError) else []
    if paths:
        best: tuple[int, int, str] | None = None
        for name, loc in spec_locations(kind, typed):
            loc = norm(loc).rstrip("/")
            for path in paths:
                if path == loc:
                    rank = (0, 0)
                elif path.startswith(loc + "/"):
                    rank = (1, -len(loc))  # inside it: the deepest location
                elif loc.startswith(path.rstrip("/") + "/"):
                    rank = (2, len(loc))  # a folder above it: the nearest location
                else:
                    continue
                best = min(best, (*rank, name)) if best else (*rank, name)
        return best[2] if best else None
    text = str(exc) if message is None else message
    found: tuple[int, int, str] | None = None
    for name, loc in spec_locations(kind, typed, addresses=addresses):
        for spelling in {loc, norm(loc)} if name != "address" else {loc}:
            at = text.find(spelling)
            if at >= 0:
                key = (at, -len(spelling), name)
                found = min(found, key) if found else key
    return found[2] if found else None


def is_input_error(kind: str, exc: BaseException, typed: Any = None) -> bool:
    from featurestore.engine import ExtractError
    from featurestore.probing import ProbeExtractionError

    if isinstance(exc, ProbeExtractionError):  # an extraction that failed: shards to retry, not the input
        return False
    if isinstance(exc, ExtractError):  # failed shards are worth a re-run; anything else could not start as asked
        return not (exc.result is not None and exc.result.failed_shards)
    if isinstance(exc, input_errors(kind)):
        return True
    # a path the spec gave that the filesystem refuses (no permission, a file where a folder goes, ...);
    # an OSError about anything else (a temporary folder, a library's own file) is a failure to report
    return (kind != "extract" and isinstance(exc, OSError) and typed is not None
            and location_field(kind, exc, typed) is not None)


# Exceptions whose message says which field is wrong, even when the message does not name it;
# an actor's error reaches the driver as text ("... UnknownLayerError: resnet18 has no layer ...").
_FIELD_OF_ERROR = {"UnknownLayerError": "layers", "UnknownModelError": "model", "WeightsError": "weights"}
_LOCATION_FIELDS = ("source", "output", "store", "out", "head", "split", "weights", "address")


def _flag_to_field(flag: str, fields: dict) -> str | None:
    name = flag.replace("-", "_")
    for candidate in (name, name + "s", name.removesuffix("s")):  # --layer: layers, --models: models
        if candidate in fields:
            return candidate
    return None


def spec_terms(message: str, typed: Any) -> str:
    """A message written for the command line, reworded for a job spec: `--batch-size` is the
    spec's config.batch_size, `--overwrite` is config.overwrite: true. Text in backticks (a
    command to run) is kept as it is."""
    import dataclasses
    import re

    fields = {f.name: f for f in dataclasses.fields(typed)} if dataclasses.is_dataclass(typed) else {}

    def one(m: re.Match) -> str:
        negated, flag = m.group(1), m.group(2)
        name = _flag_to_field(flag, fields)
        if name is None:
            return m.group(0)
        if fields[name].type in (bool, "bool"):
            return f"config.{name}: {'false' if negated else 'true'}"
        value_follows = re.match(r" (?:[\d'\"/~.]|none\b|[a-z0-9]+://)", message[m.end():]) is not None
        return f"config.{name}:" if value_follows else f"config.{name}"

    parts = message.split("`")
    for i in range(0, len(parts), 2):  # outside backticks
        parts[i] = re.sub(r"(?<![\w-])--(no-)?([a-z][a-z0-9-]*)", one, parts[i])
        parts[i] = re.sub(r" \(\w+: in a job spec\)", "", parts[i])
    return "`".join(parts)


def spec_field(kind: str, exc: BaseException, message: str, typed: Any) -> str | None:
    """The config field an input error is about: by its kind (an actor's error arrives as text
    naming it), else the field its message opens with (classifiers says "class_weight names
    ['tiger'], not classes of STORE"), else the field whose location it names (location_field)."""
    import dataclasses

    for name, field_name in _FIELD_OF_ERROR.items():
        if type(exc).__name__ == name or f"{name}:" in message:
            if kind == "probe" and field_name == "model":
                return "models"
            return _probe_weights_field(message, typed) if kind == "probe" and field_name == "weights" else field_name
    first = message.split(" ", 1)[0]
    if dataclasses.is_dataclass(typed) and first in {f.name for f in dataclasses.fields(typed)}:
        return _probe_weights_field(message, typed) if kind == "probe" and first == "weights" else first
    return location_field(kind, exc, typed, message, addresses=True)


def _probe_weights_field(message: str, typed: Any) -> str:
    """A probe's weights come from config.weights or from an entry MODEL@WEIGHTS in config.models: the
    latter when the message names weights given after an '@': a file by its path (a local one made
    absolute, as the probe names it), a name quoted ('nonee'; bare, a name like none is any text's)."""
    from featurestore.weights import is_file_spec, split_recipe

    for entry in getattr(typed, "models", None) or []:
        weights = entry.partition("@")[2].strip()
        if not weights:
            continue
        if is_file_spec(weights):
            path = split_recipe(weights)[0]
            spellings = {path} | ({os.path.abspath(os.path.expanduser(path))} if "://" not in path else set())
        else:
            spellings = {f"'{weights}'"}
        if any(s in message for s in spellings):
            return "models"
    return "weights"


def input_error_line(kind: str, exc: BaseException, spec: Any, typed: Any) -> str:
    """One line for the job log: the spec, the field and what was wrong, in the spec's terms."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror.lower()}; choose another path"
    elif getattr(exc, "params", None) and hasattr(exc, "worded"):  # classifiers marks the parameters it names
        from classifiers.terms import spec_term

        text = exc.worded(spec_term)
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    text = spec_terms(text, typed)
    if text.startswith(f"{spec.source}: "):
        text = text[len(spec.source) + 2:]
    import dataclasses

    named = dataclasses.is_dataclass(typed) and any(f"config.{f.name}" in text for f in dataclasses.fields(typed))
    field_name = None if named else spec_field(kind, exc, text, typed)
    return f"{spec.source}: " + (f"field 'config.{field_name}': " if field_name else "") + text


def main(kind: str, run: Callable[[Any, Any], int | None], argv: list[str] | None = None) -> int:
    """Run one job from its spec. Exit codes: 0 done, 1 failed (a re-run may help: failed shards,
    a crash), 2 refused (the spec asks for something impossible: fix it first), 143 stopped.

    A refusal is one line in the log naming the spec and the field, as the local commands say it;
    Ray shows the log's last lines as the job's message in `featurestore jobs status`."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{kind}",
                                     description=f"Run a featurestore '{kind}' job spec on this Ray node.")
    parser.add_argument("--config", required=True, metavar="SPEC.yaml", help="the YAML job spec")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        from jobs.specs import load_spec

        spec, typed = load_spec(args.config, expect=kind)
    except ConfigError as exc:
        log.error("invalid job spec: %s", exc)
        return EXIT_BAD_SPEC
    _handle_sigterm()
    job_id = submission_id()
    log.info("featurestore %s job %s from %s on host %s (pid %d)", kind, job_id, spec.source,
             socket.gethostname(), os.getpid())
    log.info("config: %s", ", ".join(f"{k}={v}" for k, v in redacted(typed).items()))
    started = time.perf_counter()
    try:
        code = run(spec, typed) or EXIT_OK
    except KeyboardInterrupt as exc:
        # an extraction says how far it got; anything else was stopped before it wrote a result
        log.warning("%s", str(exc) if str(exc) else "interrupted; committed work is kept, run the same spec again "
                    "to resume")
        code = EXIT_STOPPED
    except Exception as exc:  # the job log must say what failed, once, plainly
        if is_input_error(kind, exc, typed):
            log.error("refused: %s", input_error_line(kind, exc, spec, typed))
            code = EXIT_BAD_SPEC
        else:
            log.exception("%s job failed: %s: %s", kind, type(exc).__name__, exc)
            code = EXIT_FAILED
    if code == EXIT_BAD_SPEC:
        log.info("%s job %s refused after %.1fs (exit code %d): fix the spec and submit it again", kind, job_id,
                 time.perf_counter() - started, code)
        return code
    outcome = "succeeded" if code == EXIT_OK else f"ended with exit code {code}"
    log.info("%s job %s %s after %.1fs", kind, job_id, outcome, time.perf_counter() - started)
    return code


# ---------------------------------------------------------------------------------
# Files that heads read and write locally, moved to and from object storage
# ---------------------------------------------------------------------------------
def _fs(url: str, storage_options: dict | None):
    from featurestore.sources import url_to_fs

    return url_to_fs(url, storage_options)


def is_remote(location: str) -> bool:
    from jobs.specs import is_local_path

    return not is_local_path(location)


def upload_dir(local_dir: str, url: str, storage_options: dict | None = None) -> None:
    fs, path = _fs(url, storage_options)
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            fs.put_file(src, f"{path.rstrip('/')}/{rel}")


def upload_file(local: str, url: str, storage_options: dict | None = None) -> None:
    fs, path = _fs(url, storage_options)
    fs.put_file(local, path)


def fetch_dir(url: str, storage_options: dict | None = None) -> str:
    """Copy a remote directory (a saved head) to a temporary local one; returns its path."""
    fs, path = _fs(url, storage_options)
    local = tempfile.mkdtemp(prefix="featurestore-head-")
    entries = fs.find(path)
    if not entries:
        shutil.rmtree(local, ignore_errors=True)
        raise FileNotFoundError(f"{url}: nothing there; pass the `out` of a train job")
    for remote in entries:
        rel = remote[len(path.rstrip("/")) + 1:]
        dest = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(remote, dest)
    return local
