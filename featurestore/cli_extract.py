"""`featurestore extract`: flags or a YAML job spec, over featurestore.engine.extract."""
from __future__ import annotations

import sys

import click

from featurestore.config import AUTO_BATCH, COMPRESSIONS, CROPS, DECODES, DTYPES, EXTRACT_NUMBERS, POOLINGS, PRECISIONS, \
    ConfigError, ExtractConfig, from_mapping, load_yaml, parse_model_values


class _BatchSize(click.ParamType):
    """A whole number >= 1, or 'auto' (config.EXTRACT_NUMBERS' words)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif str(value).strip().lower() == AUTO_BATCH:
            return AUTO_BATCH
        else:
            try:
                n = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is neither a number of images nor 'auto'", param, ctx)
        if n < 1:
            what = next(what for name, _, what in EXTRACT_NUMBERS if name == "batch_size")
            self.fail(f"{value!r}: must be {what}", param, ctx)
        return n


@click.command("extract")
@click.argument("source", required=False)
@click.argument("output", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML job spec; flags override it.")
@click.option("--model", "models", multiple=True,
              help="Backbone name (see `featurestore models`). Default: efficientnet_lite0. Repeat it to extract "
                   "several models from one decode of each image: OUTPUT then holds one store per model, "
                   "OUTPUT/<model>.")
@click.option("--weights", "weights", multiple=True,
              help="DEFAULT, an enum name (IMAGENET1K_V2), a state-dict file/URL, or none; for every model, or "
                   "MODEL=SPEC for one of several models (repeatable), e.g. --weights resnet50=/w/r50.pth.")
@click.option("--layer", "layers", multiple=True,
              help="Cut layer (repeatable). Default: the model's recommended cut. With several models, "
                   "MODEL=LAYER cuts that model only.")
@click.option("--pooling", type=click.Choice(POOLINGS), help="How a layer's map becomes a vector. Default: avg.")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="Forward precision (autocast). Default: fp32. bf16 or fp16 on GPUs; on CPUs bf16 only, whose "
                   "forward pass ran about 2x faster on CPUs with AVX512-BF16 or AMX. Both round the features.")
@click.option("--input-size", type=int, help="Override the weights' input size (pixels, square).")
@click.option("--crop", type=click.Choice(CROPS), help="center (default), squash or pad.")
@click.option("--decode", type=click.Choice(DECODES),
              help="draft: JPEG DCT scaling to the needed size on CPU threads (default); full: never scaled; "
                   "gpu: JPEGs decoded by nvJPEG and resized/normalised on the GPU (non-JPEGs and what nvJPEG "
                   "rejects fall back to PIL per image; without CUDA the same path runs on the CPU, with a "
                   "warning). Numerics differ slightly from draft/full; the store records which.")
@click.option("--batch-size", type=_BatchSize(),
              help="Images per forward pass, or auto: measured per actor against free GPU memory "
                   "(32 on CPU). Default: 32.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the backbones in each actor (off by default; falls back to eager mode with a "
                   "warning if compiling fails).")
@click.option("--fold-batchnorm/--no-fold-batchnorm", default=None,
              help="Fold each BatchNorm into the convolution before it, in the actors (on by default: "
                   "1.1-1.7x faster CNNs on one CPU thread; features equal up to float32 rounding).")
@click.option("--shard-size", type=int,
              help="Rows per shard: the unit of work, commit and retry. Default: 1024, or fewer for a small "
                   "input, so that every actor gets at least two shards.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Stored feature dtype. Default: float32.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), help="HDF5 compression. Default: none.")
@click.option("--address", help="Ray cluster to join: the head's HOST:6379, ray://HOST:10001 or auto (a head "
                               "started by `ray start` of Ray 2.59+ also needs RAY_AUTH_MODE=token here). Default: "
                               "RAY_ADDRESS if set, else an embedded local instance.")
@click.option("--actors", type=int, help="Number of backbone actors. Default: one per GPU, or enough to fill the CPUs.")
@click.option("--gpus-per-actor", type=float, help="GPUs per actor (fractions allowed; 0 for CPU).")
@click.option("--cpus-per-actor", type=float, help="CPUs per actor (also its torch threads on CPU).")
@click.option("--decode-threads", type=int, help="Decoding threads per actor.")
@click.option("--max-retries", type=int, help="Retries of a shard whose worker died. Default: 3.")
@click.option("--strict/--no-strict", default=None, help="Fail on the first unusable image instead of skipping it.")
@click.option("--overwrite/--no-overwrite", default=None, help="Replace a store made with another configuration.")
@click.option("--append/--no-append", default=None,
              help="Add the images SOURCE holds that OUTPUT lacks (new since the store was planned) as new "
                   "shards; existing shards are kept. Without it such images stop the run.")
@click.option("--path-column", help="A manifest's column of image paths. Default: path.")
@click.option("--label-column",
              help="A manifest's column of labels. Default: label if the manifest has one, else the set is unlabeled.")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress bar or summary.")
def extract(source, output, config_path, models, weights, layers, compile_, **flags):
    """Extract features of every image in SOURCE into the sharded HDF5 store OUTPUT.

    SOURCE is a folder per class (root/<class>/<image>) or a CSV/TSV/Parquet manifest with a
    `path` (and optional `label`) column, on a local path or any fsspec URL (s3://...).
    Running the same command again resumes: committed shards are skipped. Images added
    to SOURCE since the store was planned stop the run with a message; --append adds them
    as new shards.

    Several models, one decode: `--model resnet50 --model efficientnet_b0` writes
    OUTPUT/resnet50 and OUTPUT/efficientnet_b0, two complete stores with the same shards;
    a resume recomputes a shard only for the stores that lack it.
    """
    from featurestore.engine import ClusterUnreachable, ExtractError, ExtractInterrupted
    from featurestore.engine import extract as run_extract

    where = config_path or "command line"
    try:
        data = _fields_of(load_yaml(config_path), config_path) if config_path else {}
    except ConfigError as exc:
        raise click.UsageError(str(exc))
    if source:
        data["source"] = source
    if output:
        data["output"] = output
    if models:
        data["model"] = models[0] if len(models) == 1 else list(models)
    if compile_ is not None:
        data["compile"] = compile_
    data.update({k: v for k, v in flags.items() if v is not None})
    missing = [key for key in ("source", "output") if not data.get(key)]
    if missing:
        raise click.UsageError(f"missing {' and '.join(k.upper() for k in missing)}: pass "
                               f"{'it as an argument' if len(missing) == 1 else 'them as arguments'}, or set "
                               f"{' and '.join(k + ':' for k in missing)} in a --config spec")
    model_names = data.get("model", ExtractConfig.model)
    model_names = [model_names] if isinstance(model_names, str) else list(model_names or [])
    try:
        w = parse_model_values(list(weights), model_names, "--weights")
        if w is not None:
            data["weights"] = w
        lay = parse_model_values(list(layers), model_names, "--layer", multiple=True)
        if lay is not None:
            data["layers"] = lay
        cfg = from_mapping(ExtractConfig, data, source=where)
        cfg.backbones()  # per-model weights/layers name models that exist
    except ConfigError as exc:
        raise click.UsageError(str(exc))
    from featurestore.sources import FilesystemUnavailable, SourceError
    from featurestore.store import StoreError
    from featurestore.weights import WeightsError
    from featurestore.zoo import UnknownLayerError, UnknownModelError

    try:
        result = run_extract(cfg)
    except ExtractError as exc:
        click.echo(f"featurestore extract: {exc}", err=True)
        # 1: shards failed (a re-run retries them); 2: the job could not start as asked
        sys.exit(1 if exc.result is not None and exc.result.failed_shards else 2)
    except ExtractInterrupted as exc:
        click.echo(f"featurestore extract: {exc}", err=True)
        sys.exit(128 + exc.signum)  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    except (ConfigError, SourceError, StoreError, WeightsError, UnknownModelError, UnknownLayerError,
            FileNotFoundError, FilesystemUnavailable, ClusterUnreachable) as exc:
        # the input's fault, said once without a traceback
        click.echo(f"featurestore extract: {exc}", err=True)
        sys.exit(2)
    if cfg.quiet:
        return
    if len(result.stores) > 1:
        click.echo(f"{len(result.stores)} stores written under {result.store}: "
                   + ", ".join(result.stores.values()))
    else:
        click.echo(f"store written to {result.store}")


def _fields_of(data: dict, path: str) -> dict:
    """A --config file's extraction fields: a flat mapping, or a job spec (job: extract) whose
    config: holds them, so the spec that `featurestore submit` sends runs here as it is."""
    if "job" not in data:
        return data
    from jobs.specs import JOB_KINDS, parse_spec

    if data["job"] != "extract" and data["job"] in JOB_KINDS:  # an unknown kind: parse_spec names the kinds
        raise ConfigError(f"{path}: this is a '{data['job']}' job spec; run it with `featurestore submit {path}` "
                          f"or `python -m jobs.{data['job']} --config {path}`")
    return dict(parse_spec(data, path)[0].config)

