"""`featurestore submit` and `featurestore jobs ...`: job specs sent to a Ray cluster's Jobs API.

The spec is validated here, before anything is sent, so a typo never costs a queued
job. The working directory is shipped with the job (the code that runs is the code
you have); variables named with --env are copied from your environment into the job's
runtime environment and never printed.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import click

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = ("FEATURESTORE_RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")

# Never shipped: version control, environments, caches, build outputs and data/stores
# (those belong in object storage; Ray refuses large working directories anyway).
DEFAULT_EXCLUDES = [
    ".git", ".hg", "/.venv", "/venv", "/env", "**/__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
    ".mypy_cache", ".ruff_cache", "/build", "/dist", "/.whl", "/out", "/stores", "/heads", "/data",
    "*.h5", "*.h5.tmp", "*.parquet", "*.onnx", "*.pt", "*.pth", "*.safetensors", ".ipynb_checkpoints",
]
SPEC_ENV = "FEATURESTORE_JOB_SPEC"


def _address_option(f):
    return click.option(
        "--address", default=None, metavar="URL",
        help=f"The cluster's Jobs API (dashboard), e.g. http://HEAD:8265. Default: $FEATURESTORE_RAY_ADDRESS, "
             f"$RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS}.",
    )(f)


def _resolve_address(address: str | None) -> str:
    if address:
        return address
    for name in ADDRESS_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_ADDRESS


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = _resolve_address(address)
    # Ray's client prefers $RAY_API_SERVER_ADDRESS and $RAY_ADDRESS to the address it is given:
    # a job meant for --address went to another cluster. The url is resolved above; hide them.
    hidden = {n: os.environ.pop(n) for n in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if n in os.environ}
    try:
        return JobSubmissionClient(url)
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach the Ray Jobs API at {url} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "is the cluster up (cluster/local.sh status, `ray status` on the head) and the dashboard port "
            "(8265) reachable? Pass --address http://HEAD:8265"
        ) from None
    finally:
        os.environ.update(hidden)


def build_submission(spec_path: str, *, env_names=(), pip=(), working_dir: str | None = None,
                     environ: dict | None = None) -> dict:
    """Validate the spec and build submit_job's arguments (entrypoint, runtime_env, ...).

    Raises click.UsageError for a bad spec or an unset variable: nothing is sent.
    """
    from featurestore.config import ConfigError
    from jobs.specs import load_spec, new_submission_id, relative_paths

    environ = os.environ if environ is None else environ
    try:
        spec, typed = load_spec(spec_path)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    relative = relative_paths(spec.job, typed)
    if relative:
        shown = ", ".join(f"config.{k}: {v}" for k, v in relative)
        raise click.UsageError(
            f"{spec_path}: {shown}: a relative path. A submitted job runs in a temporary copy of the working "
            "folder on the cluster, so it would read or write inside that copy. Give an absolute path on a "
            "filesystem every node shares, or an s3:// URL")
    wd = Path(working_dir or spec.runtime.working_dir or os.getcwd()).resolve()
    if not wd.is_dir():
        raise click.UsageError(f"working directory {wd} does not exist")
    names = list(dict.fromkeys([*spec.runtime.env, *env_names]))
    missing = [n for n in names if n not in environ]
    if missing:
        raise click.UsageError(f"environment variable(s) {', '.join(missing)} named by --env / runtime.env are not "
                               "set in your environment; export them first (their values are sent to the job, "
                               "never written to the spec)")
    env_vars = {n: environ[n] for n in names}
    env_vars["PYTHONUNBUFFERED"] = "1"  # log lines reach the job log as they happen
    spec_file = Path(spec_path).resolve()
    try:
        rel = spec_file.relative_to(wd).as_posix()
        config_arg = rel
    except ValueError:  # the spec lives outside the shipped directory: send its text along
        env_vars[SPEC_ENV] = spec_file.read_text()
        env_vars["FEATURESTORE_JOB_SPEC_NAME"] = str(spec_file)
        config_arg = f"env:{SPEC_ENV}"
    runtime_env: dict = {
        "working_dir": str(wd),
        "excludes": DEFAULT_EXCLUDES + list(spec.runtime.excludes),
        "env_vars": env_vars,
    }
    requirements = list(dict.fromkeys([*spec.runtime.pip, *pip]))
    if requirements:
        runtime_env["pip"] = requirements
    kwargs: dict = {
        "entrypoint": f"python -m jobs.{spec.job} --config {shlex.quote(config_arg)}",
        "runtime_env": runtime_env,
        "submission_id": new_submission_id(spec),
        "metadata": {"featurestore_job": spec.job, "spec": spec_file.name},
    }
    if spec.runtime.entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = spec.runtime.entrypoint_num_cpus
    if spec.runtime.entrypoint_num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = spec.runtime.entrypoint_num_gpus
    if spec.runtime.entrypoint_resources:
        kwargs["entrypoint_resources"] = dict(spec.runtime.entrypoint_resources)
    return kwargs


def follow_logs(client, job_id: str) -> str:
    """Stream a job's log to stdout until it ends; returns the final status."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job keeps running. `featurestore jobs logs {job_id} --follow` "
                   f"to follow again, `featurestore jobs stop {job_id}` to stop it.", err=True)
        return str(client.get_job_status(job_id))
    import time

    for _ in range(60):  # the log ends a moment before the status turns terminal
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status)
        time.sleep(0.5)
    return str(client.get_job_status(job_id))


def _exit_for(status: str) -> None:
    if status != "SUCCEEDED":
        raise SystemExit(1)


@click.command("submit")
@click.argument("spec", type=click.Path(dir_okay=False))
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Stream the job's log until it ends; exit 1 unless it SUCCEEDED.")
@click.option("--env", "env_names", multiple=True, metavar="NAME",
              help="Copy this variable from your environment into the job (repeatable), e.g. "
                   "--env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY --env AWS_ENDPOINT_URL. Values are never printed.")
@click.option("--pip", "pip", multiple=True, metavar="REQ", help="Extra pip requirement installed for the job (repeatable).")
@click.option("--working-dir", type=click.Path(file_okay=False, exists=True),
              help="Directory shipped to the cluster (default: the current directory).")
def submit(spec, address, follow, env_names, pip, working_dir):
    """Submit the YAML job SPEC (extract, train, evaluate, predict, probe) to a Ray cluster; prints the job id.

    Submitting the same spec again after a stop or failure resumes it.
    """
    kwargs = build_submission(spec, env_names=env_names, pip=pip, working_dir=working_dir)
    # Ray says on every submit that .git and .venv are no longer shipped (we exclude them anyway)
    # and lists each .gitignore it honours; the upload line itself stays
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    client = _client(address)
    try:
        job_id = client.submit_job(**kwargs)
    except Exception as exc:
        raise click.ClickException(f"the cluster refused the job: {str(exc).splitlines()[0]}") from None
    click.echo(job_id)
    url = _resolve_address(address)
    click.echo(f"submitted {kwargs['entrypoint']!r} to {url}; follow with `featurestore jobs logs {job_id} "
               f"--follow --address {url}`", err=True)
    if follow:
        status = follow_logs(client, job_id)
        click.echo(f"job {job_id}: {status}", err=True)
        _exit_for(status)


@click.group("jobs")
def jobs():
    """List, inspect, follow and stop jobs on a Ray cluster."""


@jobs.command("list")
@_address_option
def list_cmd(address):
    """Jobs known to the cluster, newest first."""
    client = _client(address)
    rows = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    click.echo(f"{'SUBMISSION ID':<36} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT")
    for j in rows:
        click.echo(f"{(j.submission_id or j.job_id or '-'):<36} {str(j.status):<10} {_time(j.start_time):<20} "
                   f"{j.entrypoint}")


def _time(ms) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _job_info(client, job_id: str, address):
    """The job's info, or a one-line error when the cluster does not know it."""
    try:
        return client.get_job_info(job_id)
    except Exception as exc:
        raise click.ClickException(f"no job {job_id} on {_resolve_address(address)}: {str(exc).splitlines()[0]} "
                                   "(`featurestore jobs list` shows the jobs it knows)") from None


@jobs.command("status")
@click.argument("job_id")
@_address_option
def status_cmd(job_id, address):
    """A job's status, message and timing (environment values are not shown)."""
    client = _client(address)
    info = _job_info(client, job_id, address)
    env_names = sorted(((info.runtime_env or {}).get("env_vars") or {}).keys())
    click.echo(f"job:        {job_id}")
    click.echo(f"status:     {info.status}")
    if info.message:
        click.echo(f"message:    {info.message}")
    click.echo(f"entrypoint: {info.entrypoint}")
    click.echo(f"started:    {_time(info.start_time)}")
    click.echo(f"ended:      {_time(info.end_time)}")
    if env_names:
        click.echo(f"env:        {', '.join(env_names)} (values hidden)")
    if getattr(info, "driver_exit_code", None) is not None:
        click.echo(f"exit code:  {info.driver_exit_code}")


@jobs.command("logs")
@click.argument("job_id")
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
def logs_cmd(job_id, address, follow):
    """A job's log (stdout and stderr of its entrypoint)."""
    client = _client(address)
    _job_info(client, job_id, address)
    if follow:
        status = follow_logs(client, job_id)
        click.echo(f"job {job_id}: {status}", err=True)
        _exit_for(status)
    else:
        click.echo(client.get_job_logs(job_id), nl=False)


@jobs.command("stop")
@click.argument("job_id")
@_address_option
@click.option("--wait/--no-wait", default=True, help="Wait until the job has stopped (default).")
def stop_cmd(job_id, address, wait):
    """Stop a running job; committed shards are kept, and submitting the spec again resumes it."""
    import time

    client = _client(address)
    _job_info(client, job_id, address)
    client.stop_job(job_id)
    status = str(client.get_job_status(job_id))
    deadline = time.monotonic() + 60
    while wait and status not in ("STOPPED", "SUCCEEDED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    click.echo(f"job {job_id}: {status}")
