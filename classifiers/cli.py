"""CLI commands for heads: `train`, `evaluate`, `predict`, `export` (thin layers over classifiers)."""
from __future__ import annotations

import errno
import functools
import json
import os

import click


# errnos that are about the path itself (the user picks another); others (a full disk, an I/O error)
# are failures of the file system, said as such with exit code 1
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
                errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP}


def _related(path: str, arg: str) -> bool:
    """`path` is the argument's path, inside it, or a folder above it (the one that could not be made)."""
    if "://" in arg or "://" in path:  # a URL; fsspec names its paths without the scheme (bucket/key)
        a, p = arg.split("://", 1)[-1].rstrip("/"), path.split("://", 1)[-1].rstrip("/")
        return a == p or p.startswith(a + "/") or a.startswith(p + "/")
    a, p = os.path.abspath(os.path.expanduser(arg)), os.path.abspath(path)
    try:
        return os.path.commonpath([a, p]) in (a, p)
    except ValueError:
        return False


def os_error_exception(exc: OSError, reads: dict[str, str | None], writes: dict[str, str | None]):
    """The OSError as one line naming the argument it is about, the path, and whether it was being read or
    written; None when it is about no path given to the command (a bug or the machine: keep the traceback).

    reads / writes: {label (STORE, --out): the path given}. A path problem (permission, a file where a
    folder goes) is a refusal (exit 2) saying to choose another path; a full disk or an I/O error is a
    failure (exit 1) said as such, not blamed on the input."""
    from featurestore.cli import Refused

    path = exc.filename if exc.filename is not None else exc.filename2
    if isinstance(exc, FileNotFoundError) and path is None and exc.errno is None:
        return Refused(str(exc))  # our own message for a missing input (sources: "SRC: no such folder ...")
    if path is None or not exc.strerror:
        return None
    path = str(path)
    for verb, args in (("write", writes), ("read", reads)):
        for label, arg in args.items():
            if arg is None or not _related(path, str(arg)):
                continue
            reason = exc.strerror[:1].lower() + exc.strerror[1:]  # "Permission denied" -> "permission denied"
            if exc.errno in (errno.EEXIST, errno.ENOTDIR) and os.path.isfile(path):
                reason = "a file, not a folder"
            where = f"{label} {arg}: cannot {verb} {path}: {reason}"
            if exc.errno in _PATH_ERRNOS:
                return Refused(where + ("; choose another path" if verb == "write" else ""))
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                where += "; free some space there, or choose a path on another disk"
            return click.ClickException(where)  # exit 1: the file system failed, not the input
    return None


def _errors(reads: tuple[str, ...] = (), writes: tuple[str, ...] = ("out",)):
    """Known user errors become a one-line message and exit code 2, not a traceback.

    Only the named errors the code raises for bad input: a bare KeyError or ValueError is a bug
    until shown otherwise, and keeps its traceback. An OSError is said with the argument whose path it
    names (reads / writes: the parameters holding the paths read and written); one about no argument's
    path keeps its traceback."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            from featurestore.cli import Refused
            from featurestore.engine import ClusterUnreachable
            from featurestore.sources import FilesystemUnavailable
            from featurestore.store import StoreError
            from featurestore.weights import WeightsError
            from featurestore.zoo import UnknownLayerError, UnknownModelError

            from .core import ExportError, HeadConfigMismatch
            from .heads import HeadError
            from .persist import HeadFileError

            try:
                return fn(*a, **kw)
            except (HeadConfigMismatch, HeadError, HeadFileError, StoreError, FilesystemUnavailable,
                    ExportError, WeightsError, UnknownModelError, UnknownLayerError, ClusterUnreachable) as exc:
                raise Refused(_flag_terms(exc)) from None
            except OSError as exc:
                said = os_error_exception(exc, {_LABELS.get(n, n): kw.get(n) for n in reads},
                                          {_LABELS.get(n, n): kw.get(n) for n in writes})
                if said is None:
                    raise
                raise said from None

        return wrapper

    return decorate


def _flag_of(ctx, name: str) -> str | None:
    """How the running command spells Python parameter `name`: its option's flag (split_column:
    --split-column; fmt, held by --format: --format), its argument's metavar (head: HEAD); None
    when the command has neither."""
    if ctx is None:
        return None
    for p in ctx.command.params:
        if isinstance(p, click.Option):
            spelled = [o for o in p.opts if o.startswith("--") and o[2:].replace("-", "_") == name]
            if spelled or p.name == name:
                return (spelled or [o for o in p.opts if o.startswith("--")] or p.opts)[0]
        elif isinstance(p, click.Argument) and p.name == name:
            return p.human_readable_name
    return None


def _flag_terms(exc: BaseException) -> str:
    """The error's message in the running command's terms: each Python parameter classifiers marks in
    it (terms.param: "out /x: a file", "pass split=FILE") said as the flag the user typed ("--out /x",
    "pass --split FILE"), a parameter the command lacks as Python says it. Another module's message
    (unmarked) has the parameter it opens with said as a flag ("layer 'x' ..." -> "--layer 'x' ...")."""
    from .terms import python_term

    ctx = click.get_current_context(silent=True)
    if getattr(exc, "params", None):
        def term(name: str, value: str | None) -> str:
            flag = _flag_of(ctx, name)
            if flag is None:
                return python_term(name, value)
            return flag if value is None else f"{flag} {value}"

        return exc.worded(term)
    message = str(exc)
    first, sep, rest = message.partition(" ")
    flag = _flag_of(ctx, first) if sep else None
    return f"{flag} {rest}" if flag and flag.startswith("--") else message


_LABELS = {"store": "STORE", "head": "HEAD", "out": "--out", "split_file": "--split", "weights": "--weights"}


def _summary(rep: dict) -> str:
    if not rep.get("n"):
        return "no labeled test rows"
    s = f"accuracy {rep['accuracy']:.4f}  balanced accuracy {rep['balanced_accuracy']:.4f}  (n={rep['n']})"
    if "top5_accuracy" in rep:
        s += f"  top-5 {rep['top5_accuracy']:.4f}"
    return s


@click.command("train")
@click.argument("store")
@click.option("--head", "kind", type=click.Choice(["logreg", "linear-svm", "svm", "sgd"]), default="logreg", show_default=True)
@click.option("--layer", default=None, help="Store layer to train on (default: the store's first layer).")
@click.option("--grid", multiple=True, metavar="NAME=V1,V2",
              help="Sweep values, repeatable: C=0.01,0.1,1,10; gamma=scale,0.001 (svm); alpha=1e-5,1e-4 (sgd).")
@click.option("--cv", type=int, default=5, show_default=True, help="Cross-validation folds on the training part.")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None, help="Weight classes inversely to their frequency.")
@click.option("--scoring", default=None, metavar="NAME",
              help="What the sweep maximises: a scikit-learn scorer name (accuracy, balanced_accuracy, f1_macro, "
                   "...). Default: balanced_accuracy with --class-weight, else accuracy.")
@click.option("--test-size", type=float, default=0.25, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", "split_file", default=None, metavar="FILE",
              help="CSV/Parquet mapping id -> train|test (columns id (or path) and split) instead of the hash split.")
@click.option("--split-column", default=None,
              help="Split column in --split FILE or the store manifest. Default: split (when there is one).")
@click.option("--l2/--no-l2", default=False, show_default=True, help="L2-normalise each feature vector before scaling.")
@click.option("--loss", type=click.Choice(["log_loss", "hinge"]), default="log_loss", show_default=True, help="SGD loss (streaming).")
@click.option("--memory-budget", default=None, metavar="BYTES",
              help="Stream with SGD when training features exceed this (e.g. 8G; default: a quarter of RAM).")
@click.option("--batch-size", type=int, default=4096, show_default=True, help="Rows per streaming batch.")
@click.option("--epochs", type=int, default=8, show_default=True, help="Passes over the store when streaming.")
@click.option("--n-jobs", type=int, default=None,
              help="Parallel sweep fits (joblib; -1 = all cores). Default: one per core, no more than "
                   "there are fits and than free memory holds.")
@click.option("--address", default=None, help="Ray cluster address: run the sweep on it via Ray's joblib backend.")
@click.option("--out", required=True, help="Head directory to write (head.json, model.skops, report.*).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_errors(reads=("store", "split_file"))
def train(store, kind, layer, grid, cv, class_weight, scoring, test_size, seed, split_file, split_column, l2, loss,
          memory_budget, batch_size, epochs, n_jobs, address, out, as_json):
    """Train a head on STORE, sweep hyperparameters by CV on the training part, report on the test part."""
    from .fit import train as _train

    h = _train(store, head=kind, layer=layer, grid=list(grid) or None, cv=cv, class_weight=class_weight,
               scoring=scoring, test_size=test_size, seed=seed, out=out, l2=l2, loss=loss, split=split_file,
               split_column=split_column, memory_budget=_bytes(memory_budget), n_jobs=n_jobs, address=address,
               batch_size=batch_size, epochs=epochs)
    if as_json:
        click.echo(json.dumps(h.report, indent=2, default=str))
        return
    click.echo(f"{h.describe()} -> {out}")
    click.echo(f"training path: {h.report.get('path')}; split: {h.report.get('split')}")
    click.echo(f"test: {_summary(h.report)}")
    _per_class(h.report)
    click.echo(f"report: {out}/report.md")


def _per_class(rep: dict) -> None:
    """Each class's precision and recall: with imbalanced classes the summary can hide a class the head misses."""
    for name, m in rep.get("per_class", {}).items():
        click.echo(f"  {name}: precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f} (n={m['support']})")


def _bytes(text):
    if text is None:
        return None
    t = str(text).strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 512M, 8G)", param_hint="--memory-budget") from None


@click.command("evaluate")
@click.argument("head")
@click.argument("store")
@click.option("--out", default=None, help="Directory for report.json, report.md and confusion_matrix.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_errors(reads=("head", "store"))
def evaluate(head, store, out, as_json):
    """Report HEAD's accuracy on every labeled row of STORE (same backbone configuration required)."""
    from .apply import evaluate as _evaluate

    rep = _evaluate(head, store, out=out)
    if as_json:
        click.echo(json.dumps(rep, indent=2, default=str))
        return
    click.echo(_summary(rep))
    _per_class(rep)
    if out:
        click.echo(f"report: {out}/report.md")


@click.command("predict")
@click.argument("head")
@click.argument("store")
@click.option("--out", required=True,
              help="Parquet file (or .csv): id, label, predicted, predicted_label, probabilities (Parquet only), "
                   "prob_<class>.")
@_errors(reads=("head", "store"))
def predict(head, store, out):
    """Predict every row of STORE with HEAD into a Parquet file, or a CSV file for an --out ending in .csv."""
    from .apply import predict as _predict

    table = _predict(head, store, out=out)
    click.echo(f"{table.num_rows} predictions -> {out}")


@click.command("export")
@click.argument("head")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option("--out", default=None, help="Output file (default: HEAD/model.onnx or HEAD/model.torchscript.pt).")
@click.option("--opset", type=int, default=17, show_default=True,
              help="ONNX opset (the range the installed torch exports, 7-20 for torch 2.x).")
@click.option("--weights", default=None, metavar="PATH",
              help="The backbone's weights file, when it is no longer where the head recorded it.")
@_errors(reads=("weights",), writes=("out", "head"))  # no --out: HEAD/model.onnx
def export(head, fmt, out, opset, weights):
    """Write backbone + HEAD as one model: preprocessed images [N,3,H,W] in, class probabilities out.

    The backbone is rebuilt from the head's stored configuration; the written model is checked
    against the Python path (max difference <= 1e-4) before it replaces --out. The file carries
    the class names and preprocessing (ONNX metadata_props; TorchScript extra file featurestore.json).
    """
    from .exporter import export as _export

    path = _export(head, fmt, out, opset=opset, weights=weights)
    click.echo(f"{fmt} -> {path} (input 'image' [N,3,H,W] preprocessed; output 'probabilities' [N,K])")


def _check_model(head_dir: str, model: str) -> None:
    """--model given with --head: harmless when it names the head's own model, else refused (it would
    be ignored: the head classifies with the backbone it was trained on)."""
    from featurestore.cli import Refused
    from featurestore.zoo import UnknownModelError, canonical_name

    from .persist import read_meta

    own = (read_meta(head_dir).get("store_config") or {}).get("model")
    if not own:
        return  # no backbone recorded: loading the head's backbone refuses it, saying so
    try:
        same = canonical_name(model) == canonical_name(own)
    except UnknownModelError:
        same = False
    if not same:
        raise Refused(f"--model {model}: the head {head_dir} classifies with the backbone it was trained on, "
                      f"{own}; drop --model")


def classify_with_head(head_dir: str, images: list[str], *, topk: int, as_json: bool, weights: str | None = None,
                       strict: bool = False, model: str | None = None) -> int:
    """`featurestore classify --head`: print each image's top classes; returns the exit code.

    An image that cannot be read or decoded is named on stderr and skipped (exit code 1), unless
    strict, where it stops the command (BadImage / FileNotFoundError, exit code 2 in the CLI).
    model: the --model the user gave (None when not given); refused unless it is the head's model.
    """
    from featurestore.cli import Refused
    from featurestore.cli_models import _table as table, report_skipped

    from .apply import predict_images
    from .core import HeadConfigMismatch
    from .heads import HeadError
    from .persist import HeadFileError

    if model is not None:
        _check_model(head_dir, model)
    errors: list[tuple[str, str]] = []
    try:
        preds = predict_images(head_dir, list(images), weights=weights, on_error="raise" if strict else "skip",
                               errors=errors)
    except (HeadConfigMismatch, HeadError, HeadFileError) as exc:  # a head's refusal (weights= that cannot apply): said with classify's flags
        raise Refused(_flag_terms(exc)) from None
    done = [(p, pred) for p, pred in zip(images, preds) if pred is not None]
    # the head's own label first among equal probabilities (saturated SGD heads tie at 0.5)
    ranked = [(p, label, sorted(probs.items(), key=lambda kv: (-kv[1], kv[0] != label))[:topk])
              for p, (label, probs) in done]
    if as_json:
        click.echo(json.dumps({"head": head_dir, "results": [
            {"image": p, "label": label, "top": [{"class": c, "prob": round(pr, 6)} for c, pr in r]}
            for p, label, r in ranked], "errors": [{"image": p, "error": e} for p, e in errors]}, indent=2))
    elif ranked:
        body = [[p if rank == 1 else "", str(rank), c, f"{pr:.4f}"]
                for p, _, r in ranked for rank, (c, pr) in enumerate(r, 1)]
        click.echo(table(["image", "rank", "class", "prob"], body))
    return report_skipped(errors, len(images))
