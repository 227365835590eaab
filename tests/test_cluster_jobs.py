"""The cluster path, really started: cluster/local.sh brings up a head and two worker
nodes (separate raylets), jobs go over HTTP to the Jobs API with `featurestore submit`,
images come from and stores go to a real S3 server (moto) on loopback.

The nodes get no AWS variables of their own: the job only reaches S3 because submit
forwards the caller's variables (named with --env) into its runtime environment.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

ROOT = Path(__file__).resolve().parent.parent
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def _ports_free(base: int, span: int = 600) -> bool:
    for port in list(range(base, base + 40)) + list(range(base + 200, base + span, 50)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _our_processes(cluster_dir: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cluster_dir + "/" in cmd:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def local_cluster():
    """`cluster/local.sh up 2` on free ports; always `down` afterwards (only our nodes)."""
    rng = random.Random(os.getpid())
    base = next(b for b in (rng.randrange(30000, 40000, 10) for _ in range(50)) if _ports_free(b))
    cluster_dir = f"/tmp/fsray-test-{base}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(FS_CLUSTER_PORT=str(base), FS_CLUSTER_DIR=cluster_dir, FS_CLUSTER_CPUS="1", FS_CLUSTER_HEAD_CPUS="0",
               FS_CLUSTER_OBJECT_STORE="100000000", RAY=str(Path(sys.executable).parent / "ray"))
    script = str(ROOT / "cluster" / "local.sh")
    try:
        up = subprocess.run([script, "up", "2"], env=env, capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        jobs_api = re.search(r"Jobs API:\s+(http://\S+)", up.stdout).group(1)
        status = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and status.stdout.count(" ALIVE ") == 3, status.stdout
        again = subprocess.run([script, "up", "2"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already up" in again.stdout  # idempotent
        yield {"jobs_api": jobs_api, "dir": cluster_dir, "env": env}
    finally:
        down = subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=120)
        left = _our_processes(cluster_dir)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, f"processes of the test cluster still running: {left}"
        down2 = subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=60)
        assert down2.returncode == 0  # idempotent


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """The `featurestore` command as a user runs it, from the repository (the shipped working dir)."""
    return subprocess.run([sys.executable, "-m", "featurestore", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def submit(spec: Path, address: str, *extra) -> str:
    env_flags = [a for name in AWS_ENV for a in ("--env", name)]
    res = cli("submit", str(spec), "--address", address, *env_flags, *extra)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip().splitlines()[0]


def client(address):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def wait_terminal(address: str, job_id: str, timeout: float = 240) -> str:
    c = client(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = c.get_job_status(job_id)
        if status.is_terminal():
            return str(status)
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {c.get_job_status(job_id)} after {timeout}s:\n{c.get_job_logs(job_id)[-3000:]}")


def write_spec(path: Path, job: str, config: dict) -> Path:
    path.write_text(yaml.safe_dump({"name": f"test-{job}", "job": job, "config": config}))
    return path


def upload_images(s3_server, image_folder, bucket: str, classes: dict, size=(24, 24), name="images") -> str:
    local = image_folder(classes=classes, size=size, fmt="jpg", name=name)
    fs = s3_server.fs()
    src = f"{bucket}/{name}"
    fs.put(str(local), src[len("s3://"):], recursive=True)
    return src


def shard_nodes(fs, store: str) -> dict[int, str]:
    out = {}
    for p in fs.glob(f"{store[5:]}/shards/shard-*.json"):
        side = json.loads(fs.cat_file(p))
        if side.get("node_id"):
            out[int(side["index"])] = side["node_id"]
    return out


def test_extract_then_train_on_the_cluster(local_cluster, s3_server, image_folder, tmp_path):
    from featurestore.store import verify

    address = local_cluster["jobs_api"]
    bucket = s3_server.make_bucket()
    source = upload_images(s3_server, image_folder, bucket, {"cat": 6, "dog": 6})
    store = f"{bucket}/stores/animals"
    spec = write_spec(tmp_path / "extract.yaml", "extract", {
        "source": source, "output": store, "model": "resnet18", "weights": "none", "input_size": 32,
        "shard_size": 2, "batch_size": 2, "actors": 2, "cpus_per_actor": 1,
    })
    job_id = submit(spec, address)
    assert job_id.startswith("test-extract-")
    status = wait_terminal(address, job_id)
    logs = client(address).get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "extract: joining the Ray cluster at" in logs and "starting Ray" not in logs, logs[-4000:]

    report = verify(store)
    assert report.ok, report.problems
    assert report.rows == 12 and report.shards == 6

    # shards were written by actors on at least two different worker nodes
    from ray.util.state import list_nodes

    workers = {n.node_id for n in list_nodes(address=address) if not n.is_head_node and n.state == "ALIVE"}
    recorded = shard_nodes(s3_server.fs(), store)
    if recorded:  # the store records the node per shard
        assert len(recorded) == 6 and set(recorded.values()) <= workers
        nodes = set(recorded.values())
    else:  # the engine's summary line, checked against the cluster's node ids
        line = re.search(r"nodes: ([0-9a-f, ]+)", logs).group(1)
        nodes = {w for prefix in line.split(", ") for w in workers if w.startswith(prefix.strip())}
    assert len(nodes) >= 2, f"shards written on {nodes} only"

    # credentials went in through the runtime env, never into the log or `jobs status`
    status_out = cli("jobs", "status", job_id, "--address", address)
    assert "SUCCEEDED" in status_out.stdout and "AWS_SECRET_ACCESS_KEY" in status_out.stdout
    assert "values hidden" in status_out.stdout
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for text in (logs, status_out.stdout):
        assert f"={secret}" not in text and f"'{secret}'" not in text and f": {secret}" not in text
    listed = cli("jobs", "list", "--address", address)
    assert job_id in listed.stdout

    # a head on the store, as a second job, saved to S3
    head_out = f"{bucket}/heads/animals"
    spec = write_spec(tmp_path / "train.yaml", "train", {
        "store": store, "out": head_out, "head": "logreg", "cv": 2, "test_size": 0.25,
    })
    res = cli("submit", str(spec), "--address", address, "--follow",
              *[a for name in AWS_ENV for a in ("--env", name)])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    train_id = res.stdout.strip().splitlines()[0]
    assert client(address).get_job_status(train_id) == "SUCCEEDED"
    assert "head logreg on layer" in res.stdout
    fs = s3_server.fs()
    assert fs.exists(f"{head_out[5:]}/head.json") and fs.exists(f"{head_out[5:]}/model.skops")
    meta = json.loads(fs.cat_file(f"{head_out[5:]}/head.json"))
    assert meta["kind"] == "logreg" and meta["label_names"] == ["cat", "dog"]


def test_stopped_job_resumes_computing_only_unfinished_shards(local_cluster, s3_server, image_folder, tmp_path):
    from featurestore.store import verify

    address = local_cluster["jobs_api"]
    bucket = s3_server.make_bucket()
    # larger inputs and a bigger network make each shard take a while, so the stop lands midway
    source = upload_images(s3_server, image_folder, bucket, {"a": 20, "b": 20}, size=(64, 64))
    store = f"{bucket}/stores/slow"
    spec = write_spec(tmp_path / "extract.yaml", "extract", {
        "source": source, "output": store, "model": "resnet50", "weights": "none", "input_size": 160,
        "shard_size": 2, "batch_size": 2, "actors": 2, "cpus_per_actor": 1,
    })
    fs = s3_server.fs()
    job_id = submit(spec, address)
    deadline = time.monotonic() + 240
    committed: list[str] = []
    while time.monotonic() < deadline:
        fs.invalidate_cache()
        committed = fs.glob(f"{store[5:]}/shards/shard-*.h5")
        if committed:
            break
        assert not client(address).get_job_status(job_id).is_terminal(), client(address).get_job_logs(job_id)[-3000:]
        time.sleep(0.3)
    assert committed, "no shard committed in time"
    # in-process (no interpreter start-up) so the stop lands while shards are still running
    from click.testing import CliRunner

    from jobs.cli import jobs as jobs_group

    stop = CliRunner().invoke(jobs_group, ["stop", job_id, "--address", address])
    assert stop.exit_code == 0 and "STOPPED" in stop.output, stop.output
    assert client(address).get_job_status(job_id) == "STOPPED"
    stopped_log = client(address).get_job_logs(job_id)  # an orderly stop: the log says what was kept
    assert re.search(r"interrupted by SIGTERM with \d+ of 20 shards committed", stopped_log), stopped_log[-3000:]

    time.sleep(1)
    fs.invalidate_cache()
    before = {p: fs.info(p)["ETag"] for p in fs.glob(f"{store[5:]}/shards/shard-*.h5")}
    assert 0 < len(before) < 20, f"{len(before)} shards committed at the stop; expected some but not all"
    fs.invalidate_cache()
    assert not fs.exists(f"{store[5:]}/manifest.parquet")  # the stopped run never finalized

    again = submit(spec, address)
    assert wait_terminal(address, again) == "SUCCEEDED", client(address).get_job_logs(again)[-4000:]
    logs = client(address).get_job_logs(again)
    m = re.search(r"(\d+) computed, (\d+) already committed", logs)
    assert m, logs[-3000:]
    assert int(m.group(2)) == len(before) and int(m.group(1)) == 20 - len(before)
    fs.invalidate_cache()
    after = {p: fs.info(p)["ETag"] for p in fs.glob(f"{store[5:]}/shards/shard-*.h5")}
    assert len(after) == 20
    assert all(after[p] == etag for p, etag in before.items()), "a committed shard was written again"
    report = verify(store)
    assert report.ok and report.rows == 40, report.problems


PROBE_SCRIPT = """
import sys, ray
from featurestore.config import ConfigError
from jobs.specs import check_output_reachable
ray.init(address=sys.argv[1], logging_level="ERROR")
for out in sys.argv[2:]:
    try:
        check_output_reachable(out, sys.argv[1])
        print("ACCEPTED", out, flush=True)
    except ConfigError as exc:
        print("REFUSED", out, "::", exc, flush=True)
"""


def test_local_output_on_cluster_without_shared_filesystem_is_refused(local_cluster, tmp_path):
    """The driver runs in its own mount namespace with a private tmpfs over one directory:
    for the cluster's nodes that directory is a different (empty) one, exactly as a local
    disk on another machine. An output there is refused; a path all nodes share and object
    storage are accepted."""
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("unshare(1) not available")
    private = tmp_path / "private"
    shared = tmp_path / "shared"
    private.mkdir()
    shared.mkdir()
    host, port = local_cluster["jobs_api"].replace("http://", "").rsplit(":", 1)
    gcs_address = f"{host}:{int(port) - 1}"  # local.sh: GCS on the base port, dashboard on base + 1
    script = tmp_path / "probe.py"
    script.write_text(PROBE_SCRIPT)
    cmd = (f"mount -t tmpfs tmpfs {private} && exec {sys.executable} {script} {gcs_address} "
           f"{private}/store {shared}/store s3://bucket/store")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd], cwd=ROOT,
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if "mount:" in res.stderr and "permission denied" in res.stderr.lower():
        pytest.skip("no permission for a private mount namespace here")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = {ln.split()[1]: ln for ln in res.stdout.splitlines() if ln.startswith(("ACCEPTED", "REFUSED"))}
    refused = lines[f"{private}/store"]
    assert refused.startswith("REFUSED"), res.stdout
    assert "do not share this filesystem" in refused and "s3://" in refused and "3 nodes and 3 of them" in refused
    assert lines[f"{shared}/store"].startswith("ACCEPTED"), res.stdout
    assert lines["s3://bucket/store"].startswith("ACCEPTED"), res.stdout


def test_an_unknown_job_id_is_named_not_a_traceback(local_cluster):
    address = local_cluster["jobs_api"]
    for command in (("jobs", "status"), ("jobs", "logs"), ("jobs", "logs", "--follow"), ("jobs", "stop")):
        res = cli(*command[:2], "no-such-job", *command[2:], "--address", address, timeout=120)
        assert res.returncode == 1, (command, res.stderr[-2000:])
        assert f"no job no-such-job on {address}" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_a_refused_spec_fails_in_one_line_and_follow_says_so(local_cluster, image_folder, tmp_path):
    """A layer the model lacks is refused by submit before anything is sent. Input errors inside
    the job: one line naming the spec and its field, exit code 2 (a
    FAILED job whose message and `jobs status` show it), never a traceback. `submit --follow`
    says the status changes and how it ended. The very long name gives a short submission id
    (Ray answered 500 for ids over 240 characters)."""
    address = local_cluster["jobs_api"]
    images = image_folder(classes={"cat": 2, "dog": 2}, size=(24, 24), fmt="jpg")
    layer = write_spec(tmp_path / "layer.yaml", "extract", {
        "source": str(images), "output": str(tmp_path / "store"), "model": "resnet18", "weights": "none",
        "layers": ["layer9"], "input_size": 32, "actors": 1, "cpus_per_actor": 1,
    })
    sent = cli("submit", str(layer), "--address", address)  # a layer the model lacks: refused before sending
    assert sent.returncode == 2, sent.stdout + sent.stderr
    assert f"{layer}: field 'config.layers': resnet18 has no layer 'layer9'; closest: layer4" in sent.stderr, \
        sent.stderr

    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"name": "a very long name " * 30, "job": "extract", "config": {
        "source": str(tmp_path / "no-such-folder"), "output": str(tmp_path / "store2"), "model": "resnet18",
        "weights": "none"}}))
    res = cli("submit", str(missing), "--address", address, "--follow")
    job_id = res.stdout.strip().splitlines()[0]
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert job_id.startswith("a-very-long-name-a-very-long-name") and len(job_id) <= 80, job_id
    line = f"refused: {missing}: field 'config.source': {tmp_path / 'no-such-folder'}: no such directory"
    assert line in res.stdout and "Traceback" not in res.stdout, res.stdout[-3000:]
    # a status change between two polls may go unseen; that it started and how it ended are said
    assert re.search(rf"job {job_id}: (PENDING|RUNNING)", res.stderr), res.stderr
    assert f"job {job_id}: FAILED (exit code 2)" in res.stderr, res.stderr
    assert "message: Job entrypoint command failed with exit code 2" in res.stderr, res.stderr
    status = cli("jobs", "status", job_id, "--address", address)
    assert "FAILED" in status.stdout and line in status.stdout and "exit code:  2 (the job refused its spec" in \
        status.stdout, status.stdout
    # the spec lies outside the shipped folder, so its text went in a variable: status and list name it
    said = "python -m jobs.extract --config missing.yaml (its text sent with the job)"
    assert f"entrypoint: {said}" in status.stdout, status.stdout
    listed = cli("jobs", "list", "--address", address)
    assert any(ln.startswith(job_id) and ln.endswith(said) for ln in listed.stdout.splitlines()), listed.stdout


def test_a_pending_job_is_followed_and_not_claimed_stopped(local_cluster, tmp_path):
    """A job that waits for a resource no node has sits PENDING: --follow says so (with Ray's
    reason) instead of staying silent, and `jobs stop` does not claim a stop Ray has not done."""
    import signal

    address = local_cluster["jobs_api"]
    spec = tmp_path / "pending.yaml"
    spec.write_text(yaml.safe_dump({"name": "test-pending", "job": "evaluate",
                                    "config": {"head": str(tmp_path / "h"), "store": str(tmp_path / "s")},
                                    "runtime": {"entrypoint_resources": {"no_such_resource": 1}}}))
    err = tmp_path / "follow.err"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "featurestore", "submit", str(spec), "--address", address,
                                 "--follow"], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        deadline = time.monotonic() + 120
        while "PENDING (" not in err.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    said = err.read_text()
    job_id = out.strip().splitlines()[0]
    assert f"job {job_id}: PENDING (Job has not started yet. It may be waiting for resources" in said, said
    assert proc.returncode == 1 and "stopped following; the job goes on (PENDING)" in said, said

    stop = cli("jobs", "stop", job_id, "--timeout", "3", "--address", address)
    assert stop.returncode == 1, stop.stdout + stop.stderr
    assert f"job {job_id}: still PENDING after 3s" in stop.stderr and "STOPPED" not in stop.stdout, stop.stderr
    assert client(address).get_job_status(job_id) == "PENDING"


def test_driver_entries_are_named_not_a_traceback(local_cluster, tmp_path):
    """list_jobs also returns drivers (scripts that called ray.init on the cluster); Ray has no
    log of them and cannot stop them by their id. Said in one line, exit code 2."""
    address = local_cluster["jobs_api"]
    host, port = address.replace("http://", "").rsplit(":", 1)
    script = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
              "print('DRIVER_ID=' + ray.get_runtime_context().get_job_id(), flush=True)")
    run = subprocess.run([sys.executable, "-c", script % f"{host}:{int(port) - 1}"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    driver_id = re.search(r"DRIVER_ID=(\w+)", run.stdout).group(1)
    for _ in range(10):  # a loaded head may list the driver a moment later
        listed = cli("jobs", "list", "--address", address)
        if any(ln.startswith(driver_id) for ln in listed.stdout.splitlines()):
            break
        time.sleep(2)
    assert any(ln.startswith(driver_id) and "(driver, not a submitted job)" in ln for ln in listed.stdout.splitlines()), \
        (driver_id, run.stdout[-1000:], listed.stdout[-3000:], listed.stderr[-2000:])
    for command, action in ((("logs",), "fetch the log of"), (("logs", "--follow"), "fetch the log of"),
                            (("stop",), "stop")):
        res = cli("jobs", command[0], driver_id, *command[1:], "--address", address, timeout=120)
        assert res.returncode == 2, (command, res.stderr[-2000:])
        assert f"{driver_id} is a driver, not a submitted job" in res.stderr and f"Ray cannot {action} it" in \
            res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
