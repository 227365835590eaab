"""The writer lease: one extraction per output, with real files and real processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from featurestore.lease import LEASE_FILE, StoreBusy, WriterLease

HOLD = "import sys, time; from featurestore.lease import WriterLease; WriterLease(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def _hold(out) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_process_holds_the_output_and_a_dead_one_frees_it(tmp_path):
    out = tmp_path / "store"
    holder = _hold(out)
    try:
        with pytest.raises(StoreBusy, match=rf"pid {holder.pid} on host .*process {holder.pid} on this host is alive"):
            WriterLease(str(out)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lease = WriterLease(str(out)).acquire()  # its holder died (SIGKILL): taken over at once
    assert json.loads((out / LEASE_FILE).read_text())["pid"] == os.getpid()
    lease.release()
    assert not (out / LEASE_FILE).exists()


def test_a_lease_from_another_host_expires_after_its_last_heartbeat(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    other = {"token": "t", "host": f"not-{socket.gethostname()}", "pid": 1, "started": time.time() - 600}
    (out / LEASE_FILE).write_text(json.dumps({**other, "renewed": time.time() - 10}))
    with pytest.raises(StoreBusy, match="last heartbeat 10s ago"):
        WriterLease(str(out), expire_s=120).acquire()
    (out / LEASE_FILE).write_text(json.dumps({**other, "renewed": time.time() - 500}))
    lease = WriterLease(str(out), expire_s=120, heartbeat_s=0.1).acquire()
    first = json.loads((out / LEASE_FILE).read_text())["renewed"]
    time.sleep(0.5)
    assert json.loads((out / LEASE_FILE).read_text())["renewed"] > first  # the heartbeat runs
    lease.release()
    assert not (out / LEASE_FILE).exists()


def test_release_leaves_a_lease_taken_over_by_another_run(tmp_path):
    out = tmp_path / "store"
    mine = WriterLease(str(out), heartbeat_s=3600).acquire()
    theirs = {"token": "theirs", "host": "elsewhere", "pid": 1, "started": time.time(), "renewed": time.time()}
    (out / LEASE_FILE).write_text(json.dumps(theirs))
    mine.release()
    assert json.loads((out / LEASE_FILE).read_text())["token"] == "theirs"


def test_inspect_names_the_writer_and_whether_it_is_alive(tmp_path):
    import numpy as np
    from click.testing import CliRunner

    from featurestore.cli import main as cli
    from featurestore.store import inspect, write_store

    out = tmp_path / "store"
    write_store(str(out), {"avgpool": np.zeros((4, 3), np.float32)}, np.array([0, 1, 0, 1]), ["a", "b"],
                ids=[f"i{k}" for k in range(4)], config={"model": "m"})
    assert inspect(str(out))["writer"] is None
    holder = _hold(out)
    try:
        w = inspect(str(out))["writer"]
        assert w["pid"] == holder.pid and w["live"] is True
        shown = CliRunner().invoke(cli, ["inspect", str(out)])
        assert shown.exit_code == 0 and f"pid {holder.pid} on" in shown.output and "(running)" in shown.output
    finally:
        holder.kill()
        holder.wait()
    assert inspect(str(out))["writer"]["live"] is False


def test_same_hostname_in_another_pid_namespace_is_judged_by_heartbeat(tmp_path):
    """Containers sharing a hostname (host networking) have their own pids: a pid that is
    dead here may be alive there, so only the heartbeat can free the lease."""
    out = tmp_path / "store"
    out.mkdir()
    dead_here = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_here.wait()
    other = {"token": "t", "host": socket.gethostname(), "pid": dead_here.pid, "pid_namespace": "pid:[1]",
             "started": time.time(), "renewed": time.time() - 5}
    (out / LEASE_FILE).write_text(json.dumps(other))
    with pytest.raises(StoreBusy, match="last heartbeat 5s ago"):
        WriterLease(str(out)).acquire()
    (out / LEASE_FILE).write_text(json.dumps({**other, "pid_namespace": WriterLease(str(out)).holder["pid_namespace"]}))
    WriterLease(str(out)).acquire().release()  # same namespace: the dead pid frees it at once


def test_a_job_that_wrote_nothing_leaves_no_folder_behind(tmp_path):
    """The lease made OUT (and its missing parents): released with nothing else written, they go;
    a folder that was there before, or one that holds anything, stays."""
    (tmp_path / "was").mkdir()
    WriterLease(str(tmp_path / "was" / "a" / "b")).acquire().release()
    assert os.listdir(tmp_path / "was") == []
    lease = WriterLease(str(tmp_path / "new" / "store")).acquire()
    (tmp_path / "new" / "store" / "store.json").write_text("{}")
    lease.release()
    assert os.listdir(tmp_path / "new" / "store") == ["store.json"]
    WriterLease(str(tmp_path / "was")).acquire().release()
    assert (tmp_path / "was").is_dir()


def test_a_reader_says_running_only_while_the_writer_lives(tmp_path):
    """featurestore.open(...).status of an unfinished store: 'running' while a live process
    holds the lease, 'stopped' once it is killed (its lease file left behind), as inspect says."""
    from featurestore import open as open_store
    from featurestore.sources import Plan
    from featurestore.store import StoreWriter, inspect

    out = tmp_path / "store"
    holder = _hold(out)
    try:
        w = StoreWriter(str(out), {"model": "m"}, ["a"])
        w.write_plan(Plan(["i0", "i1"], np.zeros(2, np.int64), ["a"], 2))
        reader = open_store(str(out))
        assert reader.status == "running" and inspect(str(out))["status"] == "running"
    finally:
        holder.kill()
        holder.wait()
    assert (out / LEASE_FILE).exists()  # SIGKILL: nobody removed it
    assert reader.status == "stopped" and open_store(str(out)).status == "stopped"
    assert inspect(str(out))["status"] == "stopped"
    assert open_store(str(out)).status != "complete"
