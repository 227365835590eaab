"""`featurestore inspect STORE` and `featurestore verify STORE`: thin layers over store.inspect/verify."""
from __future__ import annotations

import json

import click

_SO_HELP = 'fsspec storage options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\''


def _options(raw: str | None) -> dict | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--storage-options") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return value


@click.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--storage-options", default=None, help=_SO_HELP)
def inspect_cmd(store: str, as_json: bool, storage_options: str | None) -> None:
    """Summarise a feature store: what built it, rows, layers, classes, errors."""
    from featurestore.sources import FilesystemUnavailable
    from featurestore.store import StoreError, human_bytes, inspect

    try:
        info = inspect(store, storage_options=_options(storage_options))
    except (StoreError, FileNotFoundError, FilesystemUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    rows = [
        ("store", info["uri"]),
        ("status", info["status"]),
        ("rows", f"{info['rows']} of {info['inputs']} inputs ({info['errors']} errors)"),
        ("shards", f"{info['shards']} committed of {info['planned_shards']} planned, {human_bytes(info['bytes'])}"),
        ("model", f"{info['model']}  weights={info['weights']}  pooling={info['pooling']}"),
        ("dtype", f"{info['dtype']}  compression={info['compression'] or 'none'}"),
    ]
    for layer, meta in info["layers"].items():
        rows.append((f"layer {layer}", f"{tuple(meta['shape'])} {meta['dtype']}"))
    if info.get("unfinished"):
        rows[1] = ("status", f"{info['status']}: {info['unfinished']}")
    writer = info.get("writer")
    if writer:
        state = "running" if writer["live"] else "gone; the next run takes over"
        rows.append(("writer", f"pid {writer['pid']} on {writer['host']}, last heartbeat "
                               f"{writer['seconds_since_heartbeat']:.0f}s ago ({state})"))
    rows.append(("created", f"{info['created']}  (updated {info['updated']})"))
    rows.append(("versions", "  ".join(f"{k}={v}" for k, v in info["versions"].items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    counts = info.get("class_counts")
    if counts is not None and not info["label_names"]:
        click.echo(f"\nunlabeled: {counts.get('(unlabeled)', 0)} rows")
    elif counts is not None:
        click.echo(f"\n{len(info['label_names'])} classes:")
        w = max([len(n) for n in counts] + [5])
        for name, c in counts.items():
            click.echo(f"  {name:<{w}}  {c:>8}")
    if info.get("failed_shards"):
        click.echo("\nfailed shards:")
        for k, why in info["failed_shards"].items():
            click.echo(f"  {int(k):05d}  {why}")
    for warning in info.get("warnings", []):
        click.echo(f"\nwarning: {warning}", err=True)
    if info.get("error_reasons"):
        click.echo("\nerrors by reason:")
        for reason, c in list(info["error_reasons"].items())[:20]:
            click.echo(f"  {c:>8}  {reason}")


@click.command("verify")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--storage-options", default=None, help=_SO_HELP)
def verify_cmd(store: str, as_json: bool, storage_options: str | None) -> None:
    """Check a store: shard checksums (sha256, and every chunk's own, naming the shard, dataset and
    rows of a damaged one), row counts, ids against the manifest, manifest consistency, duplicate ids.

    Exits 1 when anything is wrong, listing each problem on its own line.
    """
    from featurestore.sources import FilesystemUnavailable
    from featurestore.store import StoreError, verify

    try:
        report = verify(store, storage_options=_options(storage_options))
    except (StoreError, FileNotFoundError, FilesystemUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        click.echo(f"OK: {store}: {report.rows} rows in {report.shards} shards; checksums, counts and manifest agree")
    else:
        click.echo(f"FAILED: {store}: {len(report.problems)} problem(s)", err=True)
        for p in report.problems:
            click.echo(f"  - {p}", err=True)
        if report.repair:
            click.echo(f"To repair: {report.repair}.", err=True)
    if not report.ok:
        raise SystemExit(1)
