"""`hlora`: the command line.

Errors the user can fix (config, data, model, run directory) print one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from hlora.errors import HloraError

app = typer.Typer(
    name="hlora",
    help="Federated LoRA fine-tuning with heterogeneous client ranks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _setup_logging(quiet: bool) -> None:
    # transformers announces its own deprecations on every run; they are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config file (defaults if omitted).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="New run directory (default runs/<task>-<method>-<time>)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="GLUE TSV folder (overrides data.data_dir).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info lines.")] = False,
) -> None:
    """Run a federated (or centralised) fine-tuning job and write its run directory."""
    from hlora.config import load_settings
    from hlora.federation import simulation
    from hlora.outputs import create_run_dir, default_run_dir

    _setup_logging(quiet)
    settings = load_settings(config, list(set_ or []))
    if data_dir is not None:
        settings.data.data_dir = str(data_dir)
    if out is not None and out.exists():  # fail before the slow part, and again atomically below
        create_run_dir(out)
    experiment = simulation.prepare(settings)
    s = experiment.settings
    run_dir = create_run_dir(out or default_run_dir(s.data.task, s.federation.method, s.run.name))
    logging.getLogger("hlora").info("run directory: %s", run_dir)
    summary = simulation.run(experiment, run_dir, progress=not quiet)
    f1 = f", final F1 {summary['final_f1']:.4f}" if "final_f1" in summary else ""
    typer.echo(
        f"done: final accuracy {summary['final_accuracy']:.4f}{f1}, best {summary['best_accuracy']:.4f} "
        f"(round {summary['best_round']}); files in {run_dir}"
    )


@app.command()
def methods() -> None:
    """List the aggregation methods a config can name."""
    from hlora.aggregation import registry

    for name in registry.names():
        typer.echo(name)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except HloraError as e:
        typer.echo(f"hlora: error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
