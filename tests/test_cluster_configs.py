"""The cluster configs are checked the way their tools would read them.

cluster/aws.yaml against the JSON schema Ray's cluster launcher itself validates with;
the KubeRay manifests for the fields the operator needs; the Dockerfile and the launcher
install the package with the README's command (jobs.INSTALL_COMMAND).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs import INSTALL_COMMAND

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def ray_schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.exists(), f"Ray's launcher schema not found at {path}"
    return json.loads(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# -------------------------------------------------------------------------------------
# cluster/aws.yaml
# -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_yaml_matches_rays_schema(aws):
    import jsonschema

    jsonschema.validate(aws, ray_schema())


def test_schema_check_is_not_vacuous(aws):
    """The same validation refuses a broken config, so the test above can fail."""
    import jsonschema

    broken = json.loads(json.dumps(aws))
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())
    broken = json.loads(json.dumps(aws))
    broken["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def test_aws_cpu_head_autoscaling_gpu_workers_s3_by_role(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head is a CPU instance"
    gpu = [t for name, t in types.items() if name != aws["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for t in gpu:
        assert t["min_workers"] == 0 < t["max_workers"] <= aws["max_workers"]  # autoscales from zero
        assert "IamInstanceProfile" in t["node_config"]  # S3 by instance role
    text = (CLUSTER / "aws.yaml").read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]|aws_secret_access_key", text)


def test_aws_installs_with_the_readme_command(aws):
    steps = aws["setup_commands"]
    assert any(step.split("&&")[-1].strip() == INSTALL_COMMAND for step in steps), steps
    # the repository it installs from is the one shipped by file_mounts
    assert any(src == "." for src in aws["file_mounts"].values())


# -------------------------------------------------------------------------------------
# KubeRay
# -------------------------------------------------------------------------------------
def check_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams values are strings"
    containers = head["template"]["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    ports = {p["containerPort"] for c in containers for p in c.get("ports", [])}
    assert {6379, 8265} <= ports, f"{where}: head exposes GCS and dashboard/Jobs API"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: workerGroupSpecs"
    for g in groups:
        assert isinstance(g["groupName"], str) and g["groupName"]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']} replicas"
        assert isinstance(g["rayStartParams"], dict)
        assert g["template"]["spec"]["containers"][0]["image"]
    gpu_groups = [
        g for g in groups
        if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
               for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, f"{where}: a worker group with nvidia.com/gpu limits"


def test_raycluster_manifest():
    docs = load_all(CLUSTER / "kuberay" / "raycluster.yaml")
    rc = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(rc) == 1
    rc = rc[0]
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    check_cluster_spec(rc["spec"], "raycluster.yaml")


def test_rayjob_manifest(tmp_path):
    docs = load_all(CLUSTER / "kuberay" / "rayjob.yaml")
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:3] == ["python", "-m", "jobs.extract"] and "--config" in entry
    check_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob.yaml")
    # the spec it runs is shipped alongside and is a valid job spec
    spec_path = entry[entry.index("--config") + 1]
    maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0].get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mount_dir, fname = spec_path.rsplit("/", 1)
    cm = maps[volumes[mounts[mount_dir]]["configMap"]["name"]]
    from jobs.specs import load_spec, relative_paths

    # every check `featurestore submit` makes (model, weights and layer names included): KubeRay runs it unchecked
    (tmp_path / fname).write_text(cm["data"][fname])
    spec, cfg = load_spec(tmp_path / fname)
    assert spec.job == "extract" and cfg.output.startswith("s3://") and not relative_paths(spec.job, cfg)


# -------------------------------------------------------------------------------------
# Dockerfile and the README's install command
# -------------------------------------------------------------------------------------
def dockerfile_pip_installs() -> list[str]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    cmds = []
    for line in text.splitlines():
        m = re.match(r"\s*RUN\s+(.*)", line)
        if m:
            cmds += [c.strip() for c in m.group(1).split("&&") if re.match(r"\s*(python3? -m )?pip install", c)]
    return cmds


def test_dockerfile_installs_with_the_readme_command():
    installs = dockerfile_pip_installs()
    assert installs == [INSTALL_COMMAND], installs
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^COPY\s+.*\.\s+\.", text, re.M), "the Dockerfile installs the copied source tree"


def test_readme_uses_the_same_install_command():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    assert INSTALL_COMMAND in readme.read_text(), f"README.md must show the install command {INSTALL_COMMAND}"


def test_local_script_is_executable_and_documents_its_commands():
    script = CLUSTER / "local.sh"
    assert script.stat().st_mode & 0o111
    text = script.read_text()
    for cmd in ("up", "down", "status"):
        assert re.search(rf"^\s+{cmd}\)", text, re.M), cmd
    assert "ray stop" not in [ln.strip() for ln in text.splitlines() if not ln.strip().startswith("#")], \
        "local.sh must stop only its own nodes, never `ray stop` (other Ray instances share the machine)"
