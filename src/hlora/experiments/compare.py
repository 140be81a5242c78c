"""`hlora compare`: every method and seed on the same partitions and rank tiers, beside references.

A comparison is a results folder with one ordinary run directory per (method or reference, seed) under
`runs/`, named `<name>-s<seed>`. Each run is the base config with a few overrides (the method, the seed,
a reference's mode or rank), so the partition and the rank map, which depend on the config and the seed
alone, are the same for every method of a seed. A comparison started again skips the runs that are
complete, resumes the ones that were stopped (`hlora.checkpoint`), and refuses a run directory that holds
a run of another config.

The references (on by default):

- `central`: centralised LoRA, one client holding all the data at the bank rank (`run.mode =
  "centralized"`); the upper reference. `central_overrides` (`--central-set`) change its settings alone:
  one client taking every step of an epoch with the methods' learning rate may not learn at all (a
  fresh AdamW at 1e-3 keeps MRPC at the majority class for 6 epochs at rank 16), and an upper reference
  is worth its name only once it is tuned on its own.
- `fedit-r<r>`: FedIT with every client at one rank (`lora.rank_policy = "fixed"`), at the smallest and at
  the largest client rank of the tiers: the homogeneous federation each end of the tiers could run.
- `local-c<k>`: client `k` alone on its own part of the federated partition at its own rank, the same
  rounds and local work per round (`run.mode = "local"`); the lower reference is the mean over clients.

FedIT needs equal ranks (`Aggregator.equal_ranks`), so with mixed tiers `fedit` in the methods stands for
the two `fedit-r<r>` runs (with references on they are the same run directories, run once). The code
names no method: the references train with `registry.reference()`, and any method of equal ranks is
run at both ends of the tiers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hlora.config import (
    MAX_SEED,
    Settings,
    apply_override,
    load_settings,
    settings_differences,
    validate_settings,
)
from hlora.errors import ConfigError, RunDirError
from hlora.rundir import CONFIG_FILE, LOCK_FILE, SUMMARY_FILE, lock_run_dir

log = logging.getLogger("hlora")

RUNS_DIR = "runs"
CENTRAL = "central"
LOCAL = "local"
# What a run may differ in from another of the same comparison and still be the same run: its name, and
# its number of rounds (a shorter one is extended by resuming it).
_IGNORED_KEYS = ("run.name", "federation.rounds")


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: the base config with `overrides` (`section.key=value`) at `seed`."""

    name: str  # "hlora", "fedit-r2", "central", "local-c3"
    seed: int
    overrides: tuple[str, ...] = ()
    reference: bool = False

    @property
    def group(self) -> str:
        """The row of the tables and the line of the charts: the name, `local` for every `local-c<k>`."""
        return LOCAL if self.name.startswith(f"{LOCAL}-c") else self.name

    @property
    def dir_name(self) -> str:
        return f"{self.name}-s{self.seed}"


def parse_methods(text: str) -> list[str]:
    """`"hlora,zeropad"` as a list of registered method names; ConfigError naming an unknown one."""
    from hlora.aggregation import registry

    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods names no method; allowed: " + ", ".join(registry.names()))
    for method in methods:
        if method not in registry.names():
            raise ConfigError(f"--methods: unknown method {method!r}; allowed: {', '.join(registry.names())}")
    return list(dict.fromkeys(methods))  # in the order given, once each


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` as a list of distinct integer seeds; ConfigError otherwise."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds names no seed")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"--seeds: {seed} is not a seed; seeds run from 0 to {MAX_SEED}")
    return list(dict.fromkeys(seeds))


def plan_runs(
    methods: Sequence[str],
    seeds: Sequence[int],
    ranks_of_seed: Callable[[int], dict[int, int]],
    references: bool = True,
    local_clients: Iterable[int] = (),
    central_overrides: Sequence[str] = (),
) -> list[RunSpec]:
    """Every run of the comparison, seed by seed: the methods, then the references.

    `ranks_of_seed(seed)` gives the clients' ranks `{client id: r_k}` that the base config gives at that
    seed; with more than one distinct rank, a method of `equal_ranks` (FedIT) becomes that method at the
    smallest and at the largest (the references' rule, `registry.reference()`, gives the `fedit-r<r>`
    references, so the two are the same runs).
    `local_clients` are the client ids of the local reference; `central_overrides` (`section.key=value`)
    apply to the centralised reference alone, after its mode."""
    from hlora.aggregation import registry

    reference = registry.reference()
    specs: list[RunSpec] = []
    for seed in seeds:
        ranks = sorted(set(ranks_of_seed(seed).values()))
        ends = list(dict.fromkeys([ranks[0], ranks[-1]]))
        for method in methods:
            if registry.get(method).equal_ranks and len(ranks) > 1:
                specs.extend(fixed_rank_runs(method, seed, ends, reference=method == reference))
            else:
                specs.append(RunSpec(method, seed, (f"federation.method={method}",)))
        if references:
            specs.append(RunSpec(CENTRAL, seed, ("run.mode=centralized", *central_overrides), reference=True))
            if not (len(ranks) == 1 and reference in methods):  # equal ranks: the plain run is it
                specs.extend(fixed_rank_runs(reference, seed, ends, reference=True))
            specs.extend(
                RunSpec(f"{LOCAL}-c{k}", seed, ("run.mode=local", f"run.client={k}"), reference=True)
                for k in local_clients
            )
    return list(dict.fromkeys(specs))  # the references' rule in the methods and as reference: one run


def fixed_rank_runs(method: str, seed: int, ranks: Sequence[int], reference: bool) -> list[RunSpec]:
    """`method` with every client and the server at one rank (`lora.rank_policy = "fixed"`), once per
    rank of `ranks`, named `<method>-r<rank>`: the `fedit-r<r>` references."""
    return [
        RunSpec(
            f"{method}-r{r}",
            seed,
            (
                f"federation.method={method}",
                "lora.rank_policy=fixed",
                f"lora.rank={r}",
                f"lora.bank_rank={r}",
            ),
            reference=reference,
        )
        for r in ranks
    ]


def spec_settings(base: Settings, spec: RunSpec) -> Settings:
    """The settings of one run: `base` with the spec's overrides and seed. `[method_options]` belong to
    the base config's method, so a run of another method goes without them."""
    raw = base.model_dump()
    for item in spec.overrides:
        apply_override(raw, item)
    if raw["federation"]["method"] != base.federation.method:
        raw["method_options"] = {}
    raw["run"]["seed"] = spec.seed
    return validate_settings(raw)


def client_plan(settings: Settings) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The clients' rows and ranks that `prepared.prepare(settings)` will give, without loading the model:
    the same partition of the same rows, the same rank policy (`prepared.split_clients`). The rows are
    `partition_table`'s (each client's size and count of each label, a column per label name), as the
    run's `partition.csv` has them."""
    import numpy as np

    from hlora.data.glue import get_task, load_split
    from hlora.data.partition import partition_table
    from hlora.federation.prepared import split_clients

    task = get_task(settings.data.task)
    rows = load_split(task, "train", settings.data.data_dir).head(settings.data.max_train_samples)
    parts, ranks = split_clients(settings, rows.labels)
    return partition_table(parts, np.asarray(rows.labels), list(task.label_names)), ranks


def client_ranks(settings: Settings) -> dict[int, int]:
    """The clients' ranks that `prepared.prepare(settings)` will give (`client_plan`'s)."""
    return client_plan(settings)[1]


RunState = Literal["new", "complete", "resume"]


def run_state(run_dir: Path, settings: Settings) -> RunState:
    """What to do with `run_dir` for a run of `settings`: `new` (absent or empty), `complete` (finished
    with this config), or `resume` (stopped, or finished with fewer rounds: it goes on from its last
    checkpoint). RunDirError for a folder that is not a run directory or holds a run of another config,
    naming the first key that differs, or a complete run to extend that has no checkpoint. Reads only."""
    from hlora.checkpoint import CHECKPOINT_DIR
    from hlora.config import effective_settings

    if not run_dir.exists() or (run_dir.is_dir() and _holds_nothing(run_dir)):
        return "new"
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} exists but is not a run directory (no {CONFIG_FILE}): move it away")
    saved = effective_settings(load_settings(run_dir / CONFIG_FILE))
    wanted = effective_settings(settings)
    differs = first_difference(saved, wanted)
    if differs is not None:
        key, was, now = differs
        raise RunDirError(
            f"{run_dir} holds a run with {key} = {was!r}, this comparison asks for {now!r}: "
            "move it away or choose another --out"
        )
    have, want = saved.federation.rounds, wanted.federation.rounds
    if have > want:
        raise RunDirError(
            f"{run_dir} holds a run of {have} rounds, this comparison asks for {want}: "
            "move it away or choose another --out"
        )
    complete = (run_dir / SUMMARY_FILE).is_file()
    if have == want and complete:
        return "complete"
    if complete and not (run_dir / CHECKPOINT_DIR).is_dir():
        raise RunDirError(
            f"{run_dir} holds a complete run of {have} rounds without its checkpoint (a committed run "
            f"record), so it cannot be extended to {want}: choose another --out"
        )
    return "resume"


def _holds_nothing(run_dir: Path) -> bool:
    """Empty, or holding only the lock file of a run killed between taking its lock and writing its
    config (nothing of the run was written)."""
    return {entry.name for entry in run_dir.iterdir()} <= {LOCK_FILE}


def first_difference(a: Settings, b: Settings) -> tuple[str, Any, Any] | None:
    """The first `section.key` (in config order) whose values differ, with both values; None if the two
    differ at most in what a run of a comparison may (`run.name`, `federation.rounds`)."""
    return next(iter(differences(a, b, _IGNORED_KEYS)), None)


def differences(a: Settings, b: Settings, ignored: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """Every `section.key` (in config order) whose values differ, with both values, but the `ignored`."""
    return [d for d in settings_differences(a.model_dump(), b.model_dump()) if d[0] not in ignored]


def execute(run_dir: Path, settings: Settings, state: RunState, progress: bool = False) -> dict[str, Any]:
    """Bring one run to completion: nothing for `complete` (its summary is read), the rounds after the
    checkpoint for `resume`, the whole run in a new directory for `new`. Returns the run's summary."""
    from hlora import checkpoint, simulation
    from hlora.federation import prepared
    from hlora.rundir import create_run_dir

    if state == "complete":
        return json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    if state == "resume":
        resumed, ckpt = checkpoint.open_resume(run_dir, [f"federation.rounds={settings.federation.rounds}"])
        exp = prepared.prepare(resumed)
        return simulation.run(exp, run_dir, progress=progress, resume=ckpt)
    exp = prepared.prepare(settings)
    if run_dir.is_dir():  # empty but for a dead run's lock file (run_state)
        lock_run_dir(run_dir).release()  # RunDirError if a live process holds it after all
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        run_dir.rmdir()  # create_run_dir makes it again, and refuses a race
    create_run_dir(run_dir)
    return simulation.run(exp, run_dir, progress=progress)


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    settings: Settings
    run_dir: Path
    state: RunState


def admitted_methods(config: Path | None, overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The registered methods, in `registry.ordered()`, whose runs the config (with `overrides`) admits,
    and why it refuses each other one: what `hlora compare` runs when no `--methods` are given, so that
    a setting only some methods have (`[privacy]`, `[secure]`) compares those."""
    from hlora.aggregation import registry

    base = load_settings(config, list(overrides))
    admitted, refused = [], {}
    for method in registry.ordered():
        try:
            spec_settings(base, RunSpec(method, base.run.seed, (f"federation.method={method}",)))
        except ConfigError as e:
            refused[method] = str(e)
        else:
            admitted.append(method)
    return admitted, refused


def prepare_comparison(
    config: Path | None,
    overrides: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    references: bool = True,
    local_clients: int | None = None,
    ranks_of: Callable[[Settings], dict[int, int]] = client_ranks,
    central_overrides: Sequence[str] = (),
) -> list[PlannedRun]:
    """Every run with its settings, directory and state, all checked before any is trained: a bad
    config, override or run directory fails here with one error. `local_clients`: how many clients the
    local reference trains alone (ids 0 .. N-1, a fair sample: client ids carry no order; None: all).
    `central_overrides`: settings of the centralised reference alone (`section.key=value`)."""
    base = load_settings(config, list(overrides))
    if base.run.mode != "federated":
        raise ConfigError(f"hlora compare needs a federated config (run.mode = {base.run.mode!r})")
    num = base.federation.num_clients
    if local_clients is not None and not 0 <= local_clients <= num:
        raise ConfigError(f"--local-clients {local_clients}: the config has {num} clients")

    def ranks_of_seed(seed: int) -> dict[int, int]:
        return ranks_of(spec_settings(base, RunSpec("base", seed)))

    for item in central_overrides:
        if item.split("=", 1)[0].strip() in ("run.mode", "run.seed"):
            raise ConfigError(
                f"--central-set {item}: the centralised reference's mode and seed are the comparison's"
            )
    specs = plan_runs(
        methods,
        seeds,
        ranks_of_seed,
        references,
        range(num if local_clients is None else local_clients),
        central_overrides,
    )
    planned = []
    for spec in specs:
        settings = spec_settings(base, spec)
        check_runnable(settings)
        run_dir = out / RUNS_DIR / spec.dir_name
        planned.append(PlannedRun(spec, settings, run_dir, run_state(run_dir, settings)))
    return planned


def check_runnable(settings: Settings) -> None:
    """What `prepared.prepare` would refuse in the model and the device, checked for every run of the
    comparison before the first one trains (a reference's own rank or `--central-set` could fail one that
    comes late), without loading any weights."""
    from hlora.federation.prepared import pick_device
    from hlora.models.lora_model import check_fit

    check_fit(settings)
    pick_device(settings.run.device)


def run_comparison(
    planned: Sequence[PlannedRun], echo: Callable[[str], None], progress: bool = False
) -> None:
    """Run the planned runs one after another in this process, saying what happens to each."""
    width = len(str(len(planned)))
    for i, run in enumerate(planned, 1):
        head = f"[{i:>{width}}/{len(planned)}] {run.spec.name} seed {run.spec.seed} ({run.run_dir})"
        if run.state == "complete":
            echo(f"{head}: complete, skipped")
            continue
        echo(f"{head}: {'resuming' if run.state == 'resume' else 'running'}")
        summary = execute(run.run_dir, run.settings, run.state, progress=progress)
        echo(
            f"{head}: done, final accuracy {summary['final_accuracy']:.4f}, "
            f"{summary['total_wall_s']:.0f} s of rounds"
        )
