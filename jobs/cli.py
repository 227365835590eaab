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


class Refused(click.ClickException):
    """An input the command cannot act on, said in one line (exit code 2, no usage text)."""

    exit_code = 2


def build_submission(spec_path: str, *, env_names=(), pip=(), working_dir: str | None = None,
                     environ: dict | None = None) -> dict:
    """Validate the spec and build submit_job's arguments (entrypoint, runtime_env, ...).

    Raises Refused (one line, exit code 2: the spec, not the command line, is wrong, and usage text
    would bury the line) for a bad spec or an unset variable: nothing is sent.
    """
    from featurestore.config import ConfigError
    from jobs.specs import load_spec, new_submission_id, relative_paths

    environ = os.environ if environ is None else environ
    try:
        spec, typed = load_spec(spec_path)
    except ConfigError as exc:
        raise Refused(str(exc)) from None
    relative = relative_paths(spec.job, typed)
    if relative:
        shown = ", ".join(f"config.{k}: {v}" for k, v in relative)
        raise Refused(
            f"{spec_path}: {shown}: a relative path. A submitted job runs in a temporary copy of the working "
            "folder on the cluster, so it would read or write inside that copy. Give an absolute path on a "
            "filesystem every node shares, or an s3:// URL")
    wd = Path(working_dir or spec.runtime.working_dir or os.getcwd()).resolve()
    if not wd.is_dir():
        raise Refused(f"working directory {wd} does not exist")
    names = list(dict.fromkeys([*spec.runtime.env, *env_names]))
    missing = [n for n in names if n not in environ]
    if missing:
        raise Refused(f"environment variable(s) {', '.join(missing)} named by --env / runtime.env are not "
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
        "metadata": {"featurestore_job": spec.job, "spec": spec_file.name},  # `jobs list` and `status` show it
    }
    if spec.runtime.entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = spec.runtime.entrypoint_num_cpus
    if spec.runtime.entrypoint_num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = spec.runtime.entrypoint_num_gpus
    if spec.runtime.entrypoint_resources:
        kwargs["entrypoint_resources"] = dict(spec.runtime.entrypoint_resources)
    return kwargs


def follow_logs(client, job_id: str, poll: float = 1.0):
    """Stream a job's log to stdout and its status changes to stderr until it ends.

    Returns (JobDetails, whether any log came). A job can wait in PENDING (for resources, or for
    its runtime environment) or fail before its entrypoint runs (a pip requirement that does not
    install): it then has no log, so the status and Ray's message are all there is to say."""
    import asyncio

    streamed = False

    async def tail():
        nonlocal streamed
        async for chunk in client.tail_job_logs(job_id):
            streamed = streamed or bool(chunk)
            sys.stdout.write(chunk)
            sys.stdout.flush()

    async def watch():
        log_task = asyncio.create_task(tail())
        last, misses, said_broken = None, 0, False
        while True:
            try:
                info = await asyncio.to_thread(client.get_job_info, job_id)
                misses = 0
            except Exception as exc:  # a dashboard restarting: a few misses are not the job's end
                misses += 1
                if misses >= 10:
                    raise click.ClickException(f"lost contact with the Jobs API while following {job_id}: "
                                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                await asyncio.sleep(poll)
                continue
            if info.status.is_terminal():
                break
            if info.status != last:
                note = f" ({info.message})" if info.status == "PENDING" and info.message else ""
                click.echo(f"job {job_id}: {info.status}{note}", err=True)
                last = info.status
            if log_task.done() and not said_broken and not log_task.cancelled() and log_task.exception():
                click.echo(f"job {job_id}: the log stream broke ({log_task.exception()}); following its status",
                           err=True)
                said_broken = True
            await asyncio.sleep(poll)
        try:  # the log's last lines arrive a moment after the status turns terminal
            await asyncio.wait_for(log_task, timeout=15)
        except Exception:
            log_task.cancel()
        return info

    # Ray's client says at INFO each time the log's websocket closes
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    try:
        info = asyncio.run(watch())
    except KeyboardInterrupt:
        info = client.get_job_info(job_id)
        click.echo(f"\nstopped following; the job goes on ({info.status}). `featurestore jobs logs {job_id} "
                   f"--follow` to follow again, `featurestore jobs stop {job_id}` to stop it.", err=True)
    return info, streamed


def _end_of_follow(job_id: str, info, streamed: bool) -> None:
    """Say how a followed job ended (with Ray's message unless it SUCCEEDED) and exit accordingly:
    0 SUCCEEDED, 2 the job refused its spec (its exit code 2), 1 otherwise (or still running)."""
    status = str(info.status)
    code = getattr(info, "driver_exit_code", None)
    click.echo(f"job {job_id}: {status}" + (f" (exit code {code})" if code not in (None, 0) else ""), err=True)
    if status == "SUCCEEDED":
        return
    message = (info.message or "").strip()
    if message and streamed and message.startswith("Job entrypoint command failed"):
        message = message.split(", last available logs")[0] + "; its log is above"
    if message and info.status.is_terminal():
        click.echo(f"message: {message[-4000:]}", err=True)
    raise SystemExit(2 if code == 2 else 1)


@click.command("submit")
@click.argument("spec", type=click.Path(dir_okay=False))
@_address_option
@click.option("--follow", "-f", is_flag=True,
              help="Stream the job's status and log until it ends; exit 1 unless it SUCCEEDED (2: the job "
                   "refused its spec).")
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
        _end_of_follow(job_id, *follow_logs(client, job_id))


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
        what = _entrypoint(j) if _is_submitted(j) else f"(driver, not a submitted job) {j.entrypoint}"
        click.echo(f"{(j.submission_id or j.job_id or '-'):<36} {str(j.status):<10} {_time(j.start_time):<20} "
                   f"{what.splitlines()[0] if what else ''}")


def _entrypoint(info) -> str:
    """The job's command, naming the spec where submit sent its text in a variable (a spec outside the
    working directory): `--config env:FEATURESTORE_JOB_SPEC` alone does not say which spec a job ran."""
    command = info.entrypoint or ""
    spec = (getattr(info, "metadata", None) or {}).get("spec")
    if spec and f"env:{SPEC_ENV}" in command:
        command = command.replace(f"env:{SPEC_ENV}", f"{shlex.quote(spec)} (its text sent with the job)")
    return command


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


def _is_submitted(info) -> bool:
    """Submitted through the Jobs API; list_jobs also returns drivers (scripts that called ray.init)."""
    kind = getattr(info, "type", None)
    return info.submission_id is not None and str(getattr(kind, "value", kind) or "SUBMISSION") == "SUBMISSION"


def _submitted_job(client, job_id: str, address, action: str):
    """The job's info; a driver entry is refused in one line, since Ray has no log of it and cannot stop it."""
    info = _job_info(client, job_id, address)
    if _is_submitted(info):
        return info
    driver = getattr(info, "driver_info", None)
    where = f"pid {driver.pid} on {driver.node_ip_address}" if driver and driver.pid else "a process"
    command = " ".join((info.entrypoint or "?").split())[:120]
    raise Refused(f"{job_id} is a driver, not a submitted job: a script that called ray.init on the cluster "
                  f"({where}: {command}). Ray cannot {action} it by this id; its output is in the terminal that "
                  "started it, and it stops when that script ends (Ctrl-C, or kill it there). `featurestore jobs "
                  "list` marks drivers")


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
    click.echo(f"entrypoint: {_entrypoint(info)}")
    click.echo(f"started:    {_time(info.start_time)}")
    click.echo(f"ended:      {_time(info.end_time)}")
    if env_names:
        click.echo(f"env:        {', '.join(env_names)} (values hidden)")
    if not _is_submitted(info):
        click.echo("type:       driver (a script that called ray.init; not a submitted job: no log here, no stop)")
    if getattr(info, "driver_exit_code", None) is not None:
        from jobs._entry import EXIT_BAD_SPEC

        note = " (the job refused its spec: fix the field named in its log, then submit again)" \
            if info.driver_exit_code == EXIT_BAD_SPEC else ""
        click.echo(f"exit code:  {info.driver_exit_code}{note}")


@jobs.command("logs")
@click.argument("job_id")
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
def logs_cmd(job_id, address, follow):
    """A job's log (stdout and stderr of its entrypoint)."""
    client = _client(address)
    _submitted_job(client, job_id, address, "fetch the log of")
    if follow:
        _end_of_follow(job_id, *follow_logs(client, job_id))
    else:
        click.echo(client.get_job_logs(job_id), nl=False)


@jobs.command("stop")
@click.argument("job_id")
@_address_option
@click.option("--wait/--no-wait", default=True, help="Wait until the job has ended (default).")
@click.option("--timeout", type=click.FloatRange(min=0), default=20, show_default=True, metavar="SECONDS",
              help="How long to wait for the job to end; still running (or PENDING) then: exit 1.")
def stop_cmd(job_id, address, wait, timeout):
    """Stop a running job; committed shards are kept, and submitting the spec again resumes it.

    Says the state the job is in at the end: exit 0 once it has ended, 1 if it has not (with
    --no-wait: 0 once the request is made). Ray stops a job only once it has started; one
    still PENDING keeps the request until then."""
    import time

    client = _client(address)
    info = _submitted_job(client, job_id, address, "stop")
    if info.status.is_terminal():
        click.echo(f"job {job_id}: already {info.status}; nothing to stop")
        return
    try:
        has_supervisor = client.stop_job(job_id)  # False: Ray has nothing running for it
    except Exception as exc:
        raise click.ClickException(f"the cluster did not take the stop request for {job_id}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    status = client.get_job_status(job_id)
    deadline = time.monotonic() + (timeout if wait else 0)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    if status.is_terminal():
        said = "" if status == "STOPPED" else " (it ended before the stop took effect)"
        click.echo(f"job {job_id}: {status}{said}")
        return
    waited = f" after {timeout:g}s" if wait else ""
    if status == "PENDING" and not has_supervisor:
        click.echo(f"job {job_id}: still PENDING{waited}: Ray has nothing running for it to stop (its submission "
                   "broke off half-way), so it stays PENDING on this cluster", err=True)
    elif status == "PENDING":
        click.echo(f"job {job_id}: still PENDING{waited}: Ray stops a job only once it has started. It waits for "
                   "the resources it asks for (runtime.entrypoint_num_cpus/_gpus/_resources) or for its runtime "
                   "environment; the stop takes effect when it starts, and Ray fails a job that has not started "
                   "within RAY_JOB_START_TIMEOUT_SECONDS (900 s by default). Check again with "
                   f"`featurestore jobs status {job_id}`", err=True)
    else:
        click.echo(f"job {job_id}: still {status}{waited}; the stop was sent (SIGTERM, then SIGKILL). Check again "
                   f"with `featurestore jobs status {job_id}`", err=True)
    if wait:  # --no-wait asked only for the request, which was made
        raise SystemExit(1)
