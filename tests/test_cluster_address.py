"""--address checks against real listeners: a port that accepts but is no Ray GCS (silent, another
protocol, open on loopback only while Ray dials this machine's address) is refused in seconds, and a
real `ray start --head` cluster is still joined."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featurestore
from featurestore.engine import ClusterUnreachable, _as_ray_dials, _probe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _Listener:
    """A real TCP server that accepts connections and then sends `banner` (b"": nothing) and waits."""

    def __init__(self, host: str, banner: bytes = b""):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.banner, self.held = banner, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.banner:
                conn.sendall(self.banner)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.mark.parametrize("banner, said", [
    (b"", "accepts connections but sent nothing within 5s"),  # a stale or other service that never answers
    (b"SSH-2.0-OpenSSH_9.6\r\n", "answers, but not in gRPC as a Ray GCS does"),
])
def test_a_port_that_is_no_gcs_is_refused_in_seconds(banner, said):
    """ray.init waits on such a port for minutes (seen: over 3 minutes of GCS warnings); the probe says so."""
    server = _Listener("0.0.0.0", banner)
    try:
        for host in ("127.0.0.1", _as_ray_dials("127.0.0.1")):
            started = time.monotonic()
            with pytest.raises(ClusterUnreachable, match=re.escape(said)) as err:
                _probe(f"{host}:{server.port}", "--address")
            assert time.monotonic() - started < 12
            assert f"no Ray cluster answers at {host}:{server.port} (--address)" in str(err.value)
            assert "leave --address out" in str(err.value)
    finally:
        server.close()


def test_a_port_open_on_loopback_only_is_refused_as_ray_dials_it():
    """Ray turns 127.0.0.1 into this machine's address before it connects: a service bound to loopback
    only (not a head, which listens on every interface) is not what Ray reaches."""
    node = _as_ray_dials("127.0.0.1")
    if node == "127.0.0.1":
        pytest.skip("this machine's address is loopback: Ray dials 127.0.0.1 itself")
    server = _Listener("127.0.0.1")
    try:
        with pytest.raises(ClusterUnreachable, match=re.escape(
                f"connection refused at {node}:{server.port} (the address Ray dials for 127.0.0.1)")):
            _probe(f"127.0.0.1:{server.port}", "--address")
    finally:
        server.close()


def test_a_ray_address_from_the_environment_says_to_unset_it():
    """RAY_ADDRESS is often left set to the dashboard for `ray job submit`; leaving --address out does not help."""
    with pytest.raises(ClusterUnreachable, match=re.escape(
            "; or unset RAY_ADDRESS to run on an embedded local Ray instance")):
        _probe("http://127.0.0.1:8265", "RAY_ADDRESS")
    port = _free_port()  # closed
    with pytest.raises(ClusterUnreachable, match=re.escape(
            f"no Ray cluster answers at 127.0.0.1:{port} (RAY_ADDRESS): connection refused")) as err:
        _probe(f"127.0.0.1:{port}", "RAY_ADDRESS")
    assert "or unset RAY_ADDRESS to run on an embedded local Ray instance" in str(err.value)
    assert "--address" not in str(err.value)


@pytest.fixture(scope="module")
def ray_head():
    """A real `ray start --head` cluster (1 CPU, own temp dir and ports), ended with its process group.

    Yields its ports: gcs (what --address takes), raylet (node manager) and object_manager."""
    temp = tempfile.mkdtemp(prefix="/tmp/fsh_")  # short: Ray's socket paths live under it
    port = _free_port()
    ports = {"gcs": port, "raylet": _free_port(), "object_manager": _free_port()}
    ray_exe = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # as Ray 2.59+ `ray start` has it by default
    log = open(os.path.join(temp, "head.log"), "w")
    proc = subprocess.Popen(
        [ray_exe, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=1",
         f"--node-manager-port={ports['raylet']}", f"--object-manager-port={ports['object_manager']}",
         "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}", "--block"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        waiting = list(ports.values())  # the GCS first, then the raylet's ports
        while waiting and time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
                waiting.pop(0)
            except OSError:
                time.sleep(0.5)
        if proc.poll() is not None or time.monotonic() >= deadline:
            pytest.fail("ray start --head did not come up: " + Path(temp, "head.log").read_text()[-2000:])
        yield ports
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{c}.jpg")
    return root


def test_another_port_of_a_real_head_is_refused_by_what_it_serves(ray_head):
    # every Ray process speaks gRPC, so the greeting passes; ray.init then retried for ~20 s
    for kind, said in (("raylet", "is a Ray node's raylet (node manager) port"),
                       ("object_manager", "is a gRPC service that is not Ray's GCS")):
        t0 = time.monotonic()
        with pytest.raises(ClusterUnreachable, match=re.escape(said)) as err:
            _probe(f"127.0.0.1:{ray_head[kind]}", "--address")
        assert time.monotonic() - t0 < 10
        assert "Give the head's GCS address" in str(err.value)
    _probe(f"127.0.0.1:{ray_head['gcs']}", "--address")  # the GCS, token auth and all, passes


def test_a_real_head_passes_the_probe_and_is_joined(tmp_path, ray_head):
    ray_head = ray_head["gcs"]
    for address in (f"127.0.0.1:{ray_head}", f"localhost:{ray_head}", f"{_as_ray_dials('127.0.0.1')}:{ray_head}"):
        _probe(address, "--address")
    src, out = _images(tmp_path / "src"), tmp_path / "store"
    cmd = [sys.executable, "-m", "featurestore", "extract", str(src), str(out), "--model", "mobilenet_v3_small",
           "--weights", "none", "--input-size", "32", "--address", f" 127.0.0.1:{ray_head} "]  # as pasted
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"joining the Ray cluster at 127.0.0.1:{ray_head}\n" in res.stderr
    assert len(featurestore.open(str(out))) == 2
    # without RAY_AUTH_MODE=token the driver does not send the head's token: ray.init only says it could
    # not connect; the message says what to set
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    cmd[5] = str(tmp_path / "store2")  # a new output: the complete one would need no Ray at all
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if res.returncode == 0:
        pytest.skip("this Ray sends its token without RAY_AUTH_MODE=token")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "set RAY_AUTH_MODE=token here, with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN" in res.stderr, \
        res.stderr[-3000:]
