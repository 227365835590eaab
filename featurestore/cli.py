"""The `featurestore` command: a thin layer over the Python API.

Each pipeline stage keeps its commands beside its own code (cli_models.py,
cli_store.py, cli_extract.py, classifiers/cli.py, jobs/cli.py); this module only
gathers them into one group, importing each lazily so `--help` stays fast.
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

# command name -> "module:attribute"
COMMANDS = {
    "models": "featurestore.cli_models:models",
    "layers": "featurestore.cli_models:layers",
    "classify": "featurestore.cli_models:classify",
    "extract": "featurestore.cli_extract:extract",
    "inspect": "featurestore.cli_store:inspect_cmd",
    "verify": "featurestore.cli_store:verify_cmd",
    "train": "classifiers.cli:train",
    "evaluate": "classifiers.cli:evaluate",
    "predict": "classifiers.cli:predict",
    "export": "classifiers.cli:export",
    "probe": "featurestore.cli_probe:probe",
    "submit": "jobs.cli:submit",
    "jobs": "jobs.cli:jobs",
}


class Refused(click.ClickException):
    """An input the command cannot act on: one `Error:` line and exit code 2, without click's usage
    banner (kept for mistakes in the command line itself)."""

    exit_code = 2


def os_error_message(exc: OSError) -> str:
    """A path the file system refused, in one line (a file where a folder goes, no permission, ...)."""
    if exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror.lower()}; choose another path"
    return str(exc)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:  # a stage not installed / not built
            why = str(exc)  # `exc` itself is unbound once this block ends, before the command runs

            @click.command(name=name, help=f"(unavailable: {why})")
            def unavailable():
                raise click.ClickException(f"command '{name}' is unavailable: {why}")

            return unavailable


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featurestore")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Build sharded HDF5 feature stores from image sets with pretrained backbones on Ray,
    and train lightweight heads on them."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()
