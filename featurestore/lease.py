"""One extraction writes an output at a time: a lease file with a heartbeat.

Two runs of the same job on one output (a scheduler's retry while the first still runs,
a second terminal) would compute every shard twice, and the second would sweep the first
one's temporary files away under it. The lease, `OUT/.writer.json`, names the holder
(host, pid, start) and is rewritten every HEARTBEAT_S seconds by a daemon thread. Another
run refuses to start while it is live. A holder that died (SIGKILL, lost node) leaves the
file behind: on the same host (and pid namespace) a dead pid frees it at once, elsewhere it
expires EXPIRE_S seconds after its last heartbeat. It is advisory (object stores offer no atomic
create-if-absent through fsspec), which is enough to stop the accidents above.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from featurestore.sources import REMOTE_HINT
from featurestore.store import LEASE_FILE, StoreError, _Loc

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
EXPIRE_S = 120.0


class StoreBusy(StoreError):
    """Another live extraction holds the output's lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: someone else's process, alive
        pass
    return True


def _pid_namespace() -> str | None:
    """Which pid namespace this process is in: a pid means the same process only within one
    (containers sharing a hostname, e.g. with host networking, have their own)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


class WriterLease:
    """The lease of one output: `acquire()`, then `release()` however the job ends."""

    def __init__(self, uri: str, storage_options: dict | None = None, *, heartbeat_s: float = HEARTBEAT_S,
                 expire_s: float = EXPIRE_S):
        self.loc = _Loc(uri, storage_options)
        self.heartbeat_s, self.expire_s = heartbeat_s, expire_s
        self.token = uuid.uuid4().hex
        self.holder = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_namespace": _pid_namespace(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: str | None = None  # the top folder acquire() created (removed again if left empty)

    def read(self) -> dict | None:
        try:
            if not self.loc.exists(LEASE_FILE):
                return None
            return json.loads(self.loc.read_bytes(LEASE_FILE))
        except (FileNotFoundError, ValueError):
            return None  # vanished meanwhile, or a torn/foreign file: nobody to wait for

    def why_live(self, other: dict, now: float | None = None) -> str | None:
        """Why `other` still holds the lease, or None when it is free to take."""
        now = time.time() if now is None else now
        age = now - float(other.get("renewed", 0))
        same_pids = (other.get("host") == self.holder["host"] and self.holder["pid_namespace"] is not None
                     and other.get("pid_namespace") == self.holder["pid_namespace"])
        pid = int(other.get("pid", -1))
        if same_pids and pid != os.getpid():
            return f"process {pid} on this host is alive" if pid > 0 and _pid_alive(pid) else None
        if age < self.expire_s:
            return f"last heartbeat {age:.0f}s ago, expires after {self.expire_s:.0f}s without one"
        return None

    def acquire(self) -> "WriterLease":
        try:
            other = self.read()
        except Exception as exc:  # the first touch of the output: no credentials, access denied, no endpoint
            hint = "" if self.loc.local else f"; {REMOTE_HINT}"
            raise StoreError(f"{self.loc.uri}: cannot reach it ({type(exc).__name__}: {exc}){hint}") from exc
        if other is not None and other.get("token") != self.token:
            why = self.why_live(other)
            if why:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(other.get("started", 0))))
                raise StoreBusy(
                    f"{self.loc.uri} is being written by another extraction (pid {other.get('pid')} on host "
                    f"{other.get('host')}, started {started}; {why}). Wait for it to finish or stop it, then run "
                    f"again; if you are sure no extraction is writing there, delete {self.loc.url(LEASE_FILE)}")
            log.warning("%s: taking over the lease of an extraction that is gone (pid %s on %s)", self.loc.uri,
                        other.get("pid"), other.get("host"))
        # A job that stops before writing anything (no such source, no cluster) leaves no empty folder.
        if self.loc.local:
            top = os.path.abspath(self.loc.root)
            while not os.path.exists(top) and not os.path.exists(os.path.dirname(top)):
                top = os.path.dirname(top)
            there = top if os.path.exists(top) else os.path.dirname(top)  # the nearest part that exists
            if not os.path.isdir(there):  # the output itself, or a folder on its way, is a plain file
                what = self.loc.uri if there == os.path.abspath(self.loc.root) else f"{self.loc.uri}: {there}"
                raise StoreError(f"{what} is a file, not a folder; choose another output")
            self._made = None if os.path.exists(top) else top
        try:
            self._write()
        except Exception as exc:  # OSError locally; an object store's own error (access denied, ...) remotely
            raise StoreError(f"{self.loc.uri}: cannot write there ({type(exc).__name__}: {exc}); choose an output "
                             "you can write to") from None
        back = self.read()
        if back is not None and back.get("token") != self.token:  # lost a race with a run started together
            raise StoreBusy(f"{self.loc.uri}: another extraction started at the same moment (pid {back.get('pid')} "
                            f"on host {back.get('host')}); run again once it has finished")
        self._thread = threading.Thread(target=self._beat, name="featurestore-lease", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        self.loc.write_bytes(LEASE_FILE, json.dumps({**self.holder, "renewed": time.time()}).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except Exception as exc:  # a missed beat is not fatal; the next one may land
                log.warning("%s: could not renew the writer lease: %s", self.loc.uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            other = self.read()
            if other is not None and other.get("token") == self.token:
                self.loc.remove(LEASE_FILE)
        except Exception as exc:
            log.warning("%s: could not remove the writer lease (it expires by itself): %s", self.loc.uri, exc)
            return
        if self._made:
            folder = os.path.abspath(self.loc.root)
            try:
                while True:
                    os.rmdir(folder)  # only if still empty
                    if folder == self._made:
                        break
                    folder = os.path.dirname(folder)
            except OSError:
                pass


def writer_status(uri: str, storage_options: dict | None = None) -> dict | None:
    """Who holds the output's lease and whether it looks alive (for `featurestore inspect`)."""
    probe = WriterLease(uri, storage_options)
    other = probe.read()
    if other is None:
        return None
    why = probe.why_live(other)
    return {"host": other.get("host"), "pid": other.get("pid"), "started": other.get("started"),
            "seconds_since_heartbeat": round(time.time() - float(other.get("renewed", 0)), 1),
            "live": why is not None, "why": why or "its process is gone or its heartbeat expired"}

