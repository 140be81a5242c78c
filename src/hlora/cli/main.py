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

from hlora import provenance
from hlora.errors import HloraError

app = typer.Typer(
    name="hlora",
    help="Federated LoRA fine-tuning with heterogeneous client ranks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# -q of the commands that train: the one line each finished round prints is the run's result, kept.
QUIET_TRAINING = "No progress bars or info lines; each round's result line stays."


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
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this directory after its last checkpoint, with its own config "
            "(--set federation.rounds=N may extend it).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_TRAINING)] = False,
) -> None:
    """Run a federated (or centralised) fine-tuning job and write its run directory, or go on with a
    stopped one (--resume)."""
    from hlora import simulation
    from hlora.config import load_settings
    from hlora.federation.metrics import failures_line, privacy_line
    from hlora.federation.prepared import prepare
    from hlora.rundir import create_run_dir, default_run_dir

    _setup_logging(quiet)
    if resume is not None:
        summary = _resume(resume, list(set_ or []), quiet, refused=(config, out, data_dir))
        run_dir = resume
    else:
        settings = load_settings(config, list(set_ or []))
        if data_dir is not None:
            settings.data.data_dir = str(data_dir)
        if out is not None and out.exists():  # fail before the slow part, and again atomically below
            create_run_dir(out)
        experiment = prepare(settings)
        s = experiment.settings
        run_dir = create_run_dir(out or default_run_dir(s.data.task, s.federation.method, s.run.name))
        logging.getLogger("hlora").info("run directory: %s", run_dir)
        summary = simulation.run(experiment, run_dir, progress=not quiet)
    f1 = f", final F1 {summary['final_f1']:.4f}" if "final_f1" in summary else ""
    typer.echo(
        f"done: final accuracy {summary['final_accuracy']:.4f}{f1}, best {summary['best_accuracy']:.4f} "
        f"(round {summary['best_round']}); files in {run_dir}"
    )
    failures = failures_line(summary)
    if failures:
        typer.echo(f"faults: {failures}")
    privacy = privacy_line(summary)
    if privacy:
        typer.echo(f"privacy: {privacy}")


def _resume(run_dir: Path, overrides: list[str], quiet: bool, refused: tuple[Path | None, ...]) -> dict:
    """`hlora run --resume`: every check before the slow part, then the rounds after the checkpoint."""
    from hlora import checkpoint, simulation
    from hlora.errors import ConfigError
    from hlora.federation.prepared import prepare

    if any(option is not None for option in refused):
        raise ConfigError(
            "--resume continues a run in its own directory with its own config.toml: "
            "it takes no --config, --out or --data-dir"
        )
    settings, ckpt = checkpoint.open_resume(run_dir, overrides)
    experiment = prepare(settings)
    log = logging.getLogger("hlora")
    if ckpt is None:
        log.info("%s has no checkpoint yet (no round had finished): starting again from round 1", run_dir)
    else:
        log.info("resuming %s after round %d of %d", run_dir, ckpt.round, settings.federation.rounds)
    return simulation.run(experiment, run_dir, progress=not quiet, resume=ckpt)


@app.command()
def methods() -> None:
    """List the aggregation methods a config can name, in the order comparisons show them."""
    from hlora.aggregation import registry

    for name in registry.ordered():
        typer.echo(name)


@app.command()
def privacy(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config file (defaults if omitted).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(help="Find the noise multiplier that spends this epsilon (> 0) over the whole run."),
    ] = None,
    rounds: Annotated[
        str | None,
        typer.Option(
            help="Rounds at which to show the epsilon spent, comma-separated (default: 10, 30, 100 and "
            "federation.rounds).",
            callback=lambda v: _positive_ints(v) if v is not None else None,
        ),
    ] = None,
) -> None:
    """What a config's [privacy] costs in epsilon before anything runs: the epsilon spent by round, and
    with --epsilon the noise multiplier that keeps the whole run within it (the accountant the runs use)."""
    from hlora.config import load_settings
    from hlora.errors import ConfigError
    from hlora.privacy.accountant import epsilon as spent
    from hlora.privacy.accountant import noise_for_epsilon
    from hlora.secure.masking import default_threshold

    s = load_settings(config, list(set_ or []))
    fed, p = s.federation, s.privacy
    if epsilon is None and not p.noise_multiplier > 0:
        raise ConfigError(
            "nothing to account: set privacy.noise_multiplier (and privacy.clip) or pass --epsilon"
        )
    if epsilon is not None and not epsilon > 0:
        raise ConfigError(f"--epsilon must be > 0, got {epsilon:g}")
    releases = 2 + 2 * s.secure.power_iterations if s.secure.enabled else 1
    delta = p.resolved_delta(fed.num_clients)
    sampled = "every client" if fed.clients_per_round == fed.num_clients else "sampled without replacement"
    typer.echo(
        f"{fed.clients_per_round} of {fed.num_clients} clients a round ({sampled}), delta {delta:.3g}, "
        f"{releases} noised release{'s' if releases > 1 else ''} a round"
        + (" (secure sums, distributed DP)" if releases > 1 else "")
    )
    shown = sorted(set(rounds or [r for r in (10, 30, 100) if r < fed.rounds] + [fed.rounds]))
    zs = []
    if p.noise_multiplier > 0:
        zs.append((f"z {p.noise_multiplier:g} (config)", p.noise_multiplier))
    if epsilon is not None:
        z = noise_for_epsilon(epsilon, fed.rounds, fed.clients_per_round, fed.num_clients, delta, releases)
        zs.append((f"z {z:g} (for epsilon {epsilon:g})", z))
        typer.echo(
            f"noise multiplier {z:g} spends epsilon "
            f"{spent(fed.rounds, z, fed.clients_per_round, fed.num_clients, delta, releases):.4g} in "
            f"{fed.rounds} rounds (federation.rounds): --set privacy.noise_multiplier={z:g}"
        )
    typer.echo("epsilon after " + ", ".join(f"{r} rounds" for r in shown) + ":")
    for label, z in zs:
        figures = [spent(r, z, fed.clients_per_round, fed.num_clients, delta, releases) for r in shown]
        sigma = z * p.clip / fed.clients_per_round if p.clip else None
        noise = f"; noise std {sigma:.3g} on the mean" if sigma is not None else ""
        if sigma is not None and releases > 1:  # every client's share present: sqrt(m / t) times sigma
            t = s.secure.threshold or default_threshold(fed.clients_per_round)
            full = sigma * (fed.clients_per_round / t) ** 0.5
            noise += f", {full:.3g} with all {fed.clients_per_round} clients' shares (t = {t})"
        typer.echo(f"  {label}: " + ", ".join(f"{e:.4g}" for e in figures) + noise)


def _device(name: str):
    """`auto`, or a torch device this machine has; ConfigError naming --device otherwise."""
    from hlora.federation.prepared import pick_device

    return pick_device(name, key="--device")


@app.command("eval")
def eval_(
    adapter: Annotated[
        Path,
        typer.Option(
            "--adapter", "-a", help="An exported PEFT adapter folder, or a plain transformers model folder."
        ),
    ],
    task: Annotated[
        str | None, typer.Option(help="GLUE task: mrpc, rte or qqp (default: the one the export records).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="A labelled split: dev (default) or train.")] = None,
    tsv: Annotated[
        Path | None, typer.Option(help="A labelled TSV file in the task's GLUE layout, instead of a split.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="GLUE TSV folder.")] = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Score the first N rows only.")] = None,
    max_length: Annotated[
        int | None, typer.Option(min=8, help="Tokens per row (default: the export's, else 128).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu or cuda[:i].")] = "auto",
    base: Annotated[
        str | None, typer.Option(help="Base model of the adapter (default: the one its config names).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the scores to this new JSON file.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No info lines.")] = False,
) -> None:
    """Score an exported adapter (or a merged model) on a labelled GLUE split or TSV file, and say how its
    answers spread: the share of rows given each class, whether the logits vary with the input, and how
    much each layer's features vary over the rows (near 0: the input no longer reaches the head)."""
    from hlora.data.glue import get_task, load_split, read_glue_tsv
    from hlora.data.tokenize import encode, make_collator
    from hlora.errors import DataError, ExportError
    from hlora.evaluation import features_line, predict, prediction_spread, spread_line, task_metrics
    from hlora.export import load_model_folder, read_export_info
    from hlora.models.lora_model import check_max_length, ensure_pad_token
    from hlora.rundir import write_json

    _setup_logging(quiet)
    if json_out is not None and json_out.exists():  # fail before the slow part
        raise ExportError(f"{json_out} exists already; scores are never overwritten")
    if tsv is not None and split is not None:
        raise DataError("give --split or --tsv, not both")
    info = read_export_info(adapter)
    if task is None and "task" not in info:
        raise DataError(f"--task is needed: {adapter} does not record the task it was trained for")
    spec = get_task(task if task is not None else info["task"])
    rows = read_glue_tsv(tsv, spec) if tsv is not None else load_split(spec, split or "dev", data_dir)
    rows = rows.head(max_samples)
    torch_device = _device(device)
    loaded = load_model_folder(adapter, spec.num_labels, torch_device, base_model=base)
    model_config = getattr(loaded.module, "config", None)
    if max_length is not None:
        check_max_length(model_config, max_length, "--max-length")
    ensure_pad_token(loaded.tokenizer, loaded.module, str(adapter))
    data = encode(rows, loaded.tokenizer, max_length or int(info.get("max_length", 128)))
    collate = make_collator(loaded.tokenizer)
    seen = predict(loaded.module, data, batch_size, collate, torch_device, features=True)
    scores = task_metrics(spec, data.labels, seen.logits.argmax(axis=1))
    spread = prediction_spread(seen.logits)
    shown = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
    typer.echo(f"{spec.name} {rows.source} ({len(rows)} rows, {loaded.kind} {adapter}): {shown}")
    typer.echo(spread_line(spread))
    if seen.feature_variation is not None:
        typer.echo(features_line(seen.feature_variation))
        spread["feature_variation"] = seen.feature_variation
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            json_out,
            {"task": spec.name, "data": rows.source, "rows": len(rows), "model": str(adapter), **scores,
             **spread},
        )  # fmt: skip


@app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with at least one finished round.")],
    out_dir: Annotated[Path, typer.Argument(help="A new (or empty) folder to write.")],
    rank: Annotated[
        int | None,
        typer.Option(min=1, help="Export what a client of this rank holds (default: the bank rank)."),
    ] = None,
    merged: Annotated[
        bool, typer.Option(help="Write a plain transformers model with the adapter merged in.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No info lines.")] = False,
) -> None:
    """Export a run's global model at its last checkpoint as a PEFT adapter folder (or a merged model)."""
    from hlora.checkpoint import Checkpoint
    from hlora.errors import ExportError
    from hlora.export import check_out_dir, export_model
    from hlora.federation.prepared import restore_run

    _setup_logging(quiet)
    check_out_dir(out_dir)  # before the slow part; export_model checks again
    exp = restore_run(run_dir)
    if rank is not None and rank > exp.bank_rank:
        raise ExportError(f"--rank {rank} is above the run's bank rank {exp.bank_rank}")
    ckpt = Checkpoint.read(run_dir)
    assert ckpt is not None  # restore_run refuses a run without one
    client_rank = rank if rank is not None else exp.bank_rank
    path = export_model(
        exp.server.model_plan(client_rank),
        exp.settings,
        out_dir,
        merged=merged,
        provenance={
            "run_dir": str(run_dir.resolve()),
            "round": ckpt.round,
            "method": exp.settings.federation.method,
            "held_rank": client_rank,
        },
    )
    kind = "merged model" if merged else "PEFT adapter"
    typer.echo(f"{kind} of {run_dir} at round {ckpt.round}, as a rank-{client_rank} client holds it: {path}")


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="The TOML config every run starts from (a federated one).")],
    methods: Annotated[
        str | None,
        typer.Option(
            help="Methods to compare, comma-separated (default: every method, in the order of "
            "`hlora methods`). With mixed ranks a method of equal ranks (fedit) stands for that method at "
            "the smallest and at the largest client rank.",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="Seeds, comma-separated: each gives its own partition and tiers.")
    ] = "0",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Results folder (default results/<config name>).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value for every run: section.key=value (repeatable)."),
    ] = None,
    references: Annotated[
        bool,
        typer.Option(
            help="Also run the references: centralised, FedIT at the smallest and largest rank, local."
        ),
    ] = True,
    local_clients: Annotated[
        int | None,
        typer.Option(min=0, help="Clients of the local reference, ids 0..N-1 (default: every client)."),
    ] = None,
    central_set: Annotated[
        list[str] | None,
        typer.Option(
            "--central-set",
            help="Override a config value of the centralised reference alone, e.g. its own learning "
            "rate: section.key=value (repeatable).",
        ),
    ] = None,
    target_accuracy: Annotated[
        float | None,
        typer.Option(help="Accuracy whose first round the table shows (default: 0.95 x centralised final)."),
    ] = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Train nothing: tables and charts from the runs there.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_TRAINING)] = False,
) -> None:
    """Run every method and seed on the same partitions and rank tiers, beside the references, skipping
    complete runs and resuming stopped ones; then write summary.md, summary.csv and charts."""
    from hlora.experiments import compare as cmp
    from hlora.experiments.report import write_report

    _setup_logging(quiet)
    out = out if out is not None else Path("results") / config.stem
    if not report_only:
        if methods is not None:
            chosen = cmp.parse_methods(methods)
        else:
            chosen, refused = cmp.admitted_methods(config, list(set_ or []))
            for method, why in refused.items():
                typer.echo(f"{method}: skipped, {why}")
        planned = cmp.prepare_comparison(
            config,
            list(set_ or []),
            chosen,
            cmp.parse_seeds(seeds),
            out,
            references=references,
            local_clients=local_clients,
            central_overrides=list(central_set or []),
        )
        todo = sum(run.state != "complete" for run in planned)
        typer.echo(f"{len(planned)} runs in {out / cmp.RUNS_DIR}, {todo} to train")
        cmp.run_comparison(planned, typer.echo, progress=not quiet)
    _echo_report(write_report(out, target_accuracy))


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A results folder of hlora compare.")],
    target_accuracy: Annotated[
        float | None,
        typer.Option(help="Accuracy whose first round the table shows (default: 0.95 x centralised final)."),
    ] = None,
) -> None:
    """Write a comparison's summary.md, summary.csv and charts again from its run directories."""
    from hlora.experiments.report import write_report

    _echo_report(write_report(results_dir, target_accuracy))


def _echo_report(paths: list[Path]) -> None:
    typer.echo(f"report: {', '.join(str(p) for p in paths)}")


bench_app = typer.Typer(
    help="Measure hlora's own costs, side by side in one process (results in BENCHMARKS.md).",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


def _positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1, such as `10,20,100`."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise typer.BadParameter(f"every value must be >= 1, got {text!r}")
    return values


@bench_app.command("aggregation")
def bench_aggregation(
    clients: Annotated[
        str, typer.Option(help="Client counts K to measure, comma-separated.", callback=_positive_ints)
    ] = "10,20,100",
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per method (the median is shown).")] = 3,
    layers: Annotated[int, typer.Option(min=1, help="Transformer layers (query and value in each).")] = 24,
    width: Annotated[int, typer.Option(min=1, help="m = n of every adapted weight.")] = 1024,
    ranks: Annotated[
        str, typer.Option(help="Client ranks to draw from, comma-separated.", callback=_positive_ints)
    ] = "4,8,16,32",
    bank_rank: Annotated[
        int | None, typer.Option(min=1, help="Server bank rank r_g (default: the largest rank).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the ranks, sample counts and factors.")] = 0,
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu or cuda[:i].")] = "auto",
    memory: Annotated[bool, typer.Option(help="Measure peak memory (on CPU: a fresh process each).")] = True,
    csv: Annotated[Path | None, typer.Option(help="Also write the rows to this new CSV file.")] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Methods to measure, comma-separated (default: every method that serves mixed ranks, "
            "in the order of `hlora methods`).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Every method's server aggregation on the same random client updates of mixed ranks: time, peak
    memory, largest intermediate, and each method against the one computing the same update by another
    path (HLoRA's QR path against FlexLoRA's dense SVD)."""
    import torch

    from hlora.bench import aggregation as bench
    from hlora.experiments.compare import parse_methods

    chosen = bench.bench_methods(parse_methods(methods) if methods is not None else None)
    if csv is not None and csv.exists():  # fail before the slow part, and again atomically when writing
        raise bench.BenchOutputError(f"{csv} exists already; benchmark results are never overwritten")
    device = str(_device(device))
    typer.echo(
        f"{layers} layers x {'/'.join(bench.TARGETS)}, {width} x {width}, client ranks from {ranks}, "
        f"bank rank {bank_rank or max(ranks)}, seed {seed}, {device} ({torch.get_num_threads()} threads), "
        f"median of {repeats}; time in seconds per aggregate() over all layers, MiB of peak extra memory"
    )
    typer.echo(bench.table_header())
    rows = []
    cases = bench.run_bench(
        clients,
        repeats,
        memory,
        chosen,
        layers=layers,
        width=width,
        ranks=tuple(ranks),
        seed=seed,
        bank_rank=bank_rank,
        device=device,
    )
    for row in cases:
        rows.append(row)
        typer.echo(bench.table_row(row))
    largest = {(row.clients, row.method): row.largest for row in rows}
    for row in rows:
        if row.same_update_as is not None and row.largest == largest[(row.clients, row.same_update_as)]:
            typer.echo(
                f"K = {row.clients}: {row.method} built the dense {row.largest} like {row.same_update_as}: "
                "R = sum r_k >= min(m, n), where the stacked factors would be no smaller (METHOD.md rule 3)."
            )
    if csv is not None:
        bench.write_csv(rows, csv)
        typer.echo(f"rows written to {csv}")


def main(argv: list[str] | None = None) -> None:
    provenance.record_invocation(["hlora", *(sys.argv[1:] if argv is None else argv)])
    try:
        app(args=argv, standalone_mode=True)
    except HloraError as e:
        typer.echo(f"hlora: error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
