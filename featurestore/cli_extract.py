"""`featurestore extract`: flags or a YAML job spec, over featurestore.engine.extract."""
from __future__ import annotations

import sys

import click

from featurestore.config import COMPRESSIONS, CROPS, DTYPES, POOLINGS, PRECISIONS, ConfigError, ExtractConfig, \
    from_mapping, load_yaml


@click.command("extract")
@click.argument("source", required=False)
@click.argument("output", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML job spec; flags override it.")
@click.option("--model", help="Backbone name (see `featurestore models`). Default: efficientnet_lite0.")
@click.option("--weights", help="DEFAULT, an enum name (IMAGENET1K_V2), a state-dict file/URL, or none.")
@click.option("--layer", "layers", multiple=True, help="Cut layer (repeatable). Default: the model's recommended cut.")
@click.option("--pooling", type=click.Choice(POOLINGS), help="How a layer's map becomes a vector. Default: avg.")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Forward precision. Default: fp32.")
@click.option("--input-size", type=int, help="Override the weights' input size (pixels, square).")
@click.option("--crop", type=click.Choice(CROPS), help="center (default), squash or pad.")
@click.option("--decode", type=click.Choice(("draft", "full")), help="draft: JPEG DCT scaling to the needed size (default).")
@click.option("--batch-size", type=int, help="Images per forward pass. Default: 32.")
@click.option("--shard-size", type=int, help="Rows per shard: the unit of work, commit and retry. Default: 1024.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Stored feature dtype. Default: float32.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), help="HDF5 compression. Default: none.")
@click.option("--address", help="Ray cluster to join (ray://HOST:10001 or auto). Default: an embedded local instance.")
@click.option("--actors", type=int, help="Number of backbone actors. Default: one per GPU, or enough to fill the CPUs.")
@click.option("--gpus-per-actor", type=float, help="GPUs per actor (fractions allowed; 0 for CPU).")
@click.option("--cpus-per-actor", type=float, help="CPUs per actor (also its torch threads on CPU).")
@click.option("--decode-threads", type=int, help="Decoding threads per actor.")
@click.option("--max-retries", type=int, help="Retries of a shard whose worker died. Default: 3.")
@click.option("--strict/--no-strict", default=None, help="Fail on the first unusable image instead of skipping it.")
@click.option("--overwrite/--no-overwrite", default=None, help="Replace a store made with another configuration.")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress bar or summary.")
def extract(source, output, config_path, **flags):
    """Extract features of every image in SOURCE into the sharded HDF5 store OUTPUT.

    SOURCE is a folder per class (root/<class>/<image>) or a CSV/Parquet manifest with a
    `path` (and optional `label`) column, on a local path or any fsspec URL (s3://...).
    Running the same command again resumes: committed shards are skipped.
    """
    from featurestore.engine import ExtractError
    from featurestore.engine import extract as run_extract

    data = load_yaml(config_path) if config_path else {}
    if source:
        data["source"] = source
    if output:
        data["output"] = output
    flags["layers"] = list(flags["layers"]) or None
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        cfg = from_mapping(ExtractConfig, data, source=config_path or "command line")
    except ConfigError as exc:
        raise click.UsageError(str(exc))
    from featurestore.backbones import UnknownLayerError
    from featurestore.store import StoreError
    from featurestore.weights import WeightsError
    from featurestore.zoo import UnknownModelError

    try:
        result = run_extract(cfg)
    except ExtractError as exc:
        click.echo(f"featurestore extract: {exc}", err=True)
        sys.exit(1)
    except (ConfigError, StoreError, WeightsError, UnknownModelError, UnknownLayerError, FileNotFoundError) as exc:
        # the input's fault, said once without a traceback
        click.echo(f"featurestore extract: {exc}", err=True)
        sys.exit(2)
    if cfg.quiet:
        return
    click.echo(f"store written to {result.store}")
