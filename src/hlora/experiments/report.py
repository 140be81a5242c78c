"""Tables and charts of a comparison, from its run directories alone (`hlora report`).

Each complete run directory under `RESULTS/runs/` (`<name>-s<seed>`, with a `summary.json`) is read back
from its `metrics.jsonl`. Runs of one name form a group (a row of the tables, a line of the charts);
the local reference's runs (`local-c<k>`) of one seed are first averaged over clients, round by round,
so that a seed of `local` is the mean client training alone. Statistics over seeds are the mean and the
sample standard deviation (none with one seed).

The figures of one run are plain sums and maxima over its rounds (`seed_figures`); everything over seeds
is pandas: one frame row per run (`seed_frame`) or per run and rank tier, grouped for the tables
(`group_table`, `tier_table`, `paired_table`, `paired_tier_table`), unstacked for the per-tier CSV
columns, written with `to_csv`. Groups are ordered by `registry.ordered()` (`group_order`); the paired
tables' subject is the first method of that order that has runs here (HLoRA in a full comparison).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from hlora.aggregation import registry
from hlora.experiments import answers, verdicts
from hlora.experiments.compare import CENTRAL, LOCAL, RUNS_DIR
from hlora.federation.metrics import evaluated_rows, last_layer_variation
from hlora.rundir import CONFIG_FILE, SUMMARY_FILE, read_metrics, write_text_atomic

SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
PAIRED_CSV = "paired.csv"
PAIRED_TIERS_CSV = "paired_tiers.csv"
VERDICTS_CSV = "verdicts.csv"
REPORT_LOCK = ".report.lock"  # held while a report is written (`write_report`)
PLOT_ROUNDS = "accuracy_by_round.png"
PLOT_TRAFFIC = "accuracy_by_traffic.png"
PLOT_TIERS = "tier_accuracy.png"
PLOT_SEEDS = "accuracy_by_seed.png"  # with two seeds or more: a panel per seed
PLOT_BIAS = "bias_by_round.png"  # the instruments: written where the runs logged them
PLOT_BLOCKS = "block_energy_by_round.png"
PLOT_FEATURES = "feature_variation_by_round.png"  # where rounds recorded `feature_variation`
TARGET_SHARE = 0.95  # default target: this share of the centralised reference's mean final accuracy
_DIR = re.compile(r"(?P<name>.+)-s(?P<seed>-?\d+)")
_FIXED_RANK = re.compile(r"(?P<method>.+)-r(?P<rank>\d+)")  # compare.fixed_rank_runs: `fedit-r2`


@dataclass
class SeedRun:
    """One seed of one group: its metrics rows (for `local`, the mean over its clients' runs)."""

    group: str
    seed: int
    rows: list[dict[str, Any]]
    majority_baseline: float | None = None
    clients: int = 1  # runs averaged into `rows` (the local reference's clients)
    eval_every: int = 1  # its `eval.every`: rows between the evaluated rounds have no scores

    @property
    def reference(self) -> bool:
        return is_reference(self.group)

    @property
    def communicates(self) -> bool:
        """Whether its bytes are federated traffic (the centralised and the local runs exchange nothing)."""
        return self.group not in (CENTRAL, LOCAL)


def is_reference(group: str) -> bool:
    """The centralised and local references, and the references' rule at one rank (`fedit-r2`)."""
    match = _FIXED_RANK.fullmatch(group)
    return group in (CENTRAL, LOCAL) or (match is not None and match["method"] == registry.reference())


def group_order(group: str) -> tuple[int, int, int, str]:
    """Methods first, in `registry.ordered()` (a method's own fixed-rank runs right after it), then
    groups of no registered method, then the references: centralised, the fixed-rank ones by rank,
    local."""
    methods = registry.ordered()
    fixed = _FIXED_RANK.fullmatch(group)
    method, rank = (fixed["method"], int(fixed["rank"])) if fixed else (group, 0)
    if is_reference(group):
        return ({CENTRAL: 2, LOCAL: 4}.get(group, 3), 0, rank, group)
    if method in methods:
        return (0, methods.index(method), rank, group)
    return (1, 0, 0, group)


def label(group: str) -> str:
    """How a group is named in tables and legends; a fixed-rank reference by its rule's class name, the
    method as its paper writes it (`FedIT r=2 (ref.)`)."""
    if group == CENTRAL:
        return "centralised (upper ref.)"
    if group == LOCAL:
        return "local alone (lower ref.)"
    if is_reference(group):
        return f"{_reference_title()} r={_FIXED_RANK.fullmatch(group)['rank']} (ref.)"
    return group


def seed_labels(runs: Sequence[SeedRun]) -> dict[str, str]:
    """Legend labels of the groups of `runs`: `label(group)`, and its number of seeds where the groups
    differ in it (while a comparison's seeds are still landing, a mean over two seeds and one seed's
    curve are not alike: the paired tables compare on common seeds, a chart cannot)."""
    counts = Counter(run.group for run in runs)
    if len(set(counts.values())) <= 1:
        return {group: label(group) for group in counts}
    return {group: f"{label(group)} ({n} seed{'s' if n > 1 else ''})" for group, n in counts.items()}


def _reference_title() -> str:
    return registry.get(registry.reference()).__name__


def subject_of(groups: Iterable[str]) -> str | None:
    """The method the paired table compares with every other group: the first of `registry.ordered()`
    among `groups` (None if no method ran)."""
    present = set(groups)
    return next((method for method in registry.ordered() if method in present), None)


@dataclass
class Loaded:
    runs: list[SeedRun]
    incomplete: list[str] = field(default_factory=list)  # run directories without a summary.json
    settings: dict[str, Any] = field(default_factory=dict)  # a method run's summary, for the header
    environments: list[dict[str, Any] | None] = field(default_factory=list)  # per run, from summary.json
    # How the centralised reference's settings differ from the methods' besides its mode (its own
    # learning rate, say: `--central-set`), as "key = its value (the methods: theirs)", once each.
    central_settings: list[str] = field(default_factory=list)


def load_results(results_dir: Path) -> Loaded:
    """Every complete run under `results_dir/runs/`, the local reference averaged over clients."""
    folder = Path(results_dir) / RUNS_DIR
    loaded = Loaded(runs=[])
    local: dict[int, list[list[dict[str, Any]]]] = {}
    baselines: dict[int, float] = {}
    local_every: dict[int, int] = {}
    for run_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _DIR.fullmatch(run_dir.name)
        if match is None or not run_dir.is_dir():
            continue
        if not (run_dir / SUMMARY_FILE).is_file():
            loaded.incomplete.append(run_dir.name)
            continue
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        name, seed = match["name"], int(match["seed"])
        loaded.environments.append(summary.get("environment"))
        rows = read_metrics(run_dir)
        baseline = summary.get("majority_baseline")
        every = eval_every(run_dir)
        if re.fullmatch(rf"{LOCAL}-c\d+", name):
            local.setdefault(seed, []).append(rows)
            baselines[seed] = baseline
            local_every[seed] = every
            continue
        loaded.runs.append(SeedRun(name, seed, rows, baseline, eval_every=every))
        if not is_reference(name) and not loaded.settings:
            loaded.settings = summary
    for seed, runs in sorted(local.items()):
        every = local_every[seed]
        loaded.runs.append(SeedRun(LOCAL, seed, mean_rows(runs), baselines[seed], len(runs), every))
    loaded.central_settings = central_settings(folder, loaded.runs)
    loaded.runs.sort(key=lambda r: (group_order(r.group), r.seed))
    return loaded


def eval_every(run_dir: Path) -> int:
    """The run's `eval.every` from its `config.toml` (1 where the file or the key is missing: a run made
    before the setting existed scored every round)."""
    import tomllib

    try:
        config = tomllib.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        every = config.get("eval", {}).get("every", 1)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return 1
    return every if type(every) is int and every >= 1 else 1


def central_settings(folder: Path, runs: Sequence[SeedRun]) -> list[str]:
    """What the centralised reference of each seed set otherwise than a method run of that seed (its mode
    apart), as `key = value (the methods: value)` lines, each once."""
    from hlora.config import effective_settings, load_settings
    from hlora.experiments.compare import differences

    lines: list[str] = []
    for run in runs:
        peer = next((r for r in runs if r.seed == run.seed and not r.reference), None)
        if run.group != CENTRAL or peer is None:
            continue
        central, method = (load_settings(folder / f"{r.group}-s{r.seed}" / CONFIG_FILE) for r in (run, peer))
        # what the methods' config becomes as a centralised run (one client, the bank rank)
        plain = effective_settings(method.model_copy(update={"run": central.run}))
        for key, mine, theirs in differences(central, plain, ("run.name",)):
            line = f"{key} = {mine!r} (the methods: {theirs!r})"
            if line not in lines:
                lines.append(line)
    return lines


def mean_rows(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round by round, the mean of several runs' rows (over the rounds they all have): the mean scores,
    per rank the mean tier score and step time over the runs of that rank and their largest peak, the
    summed wall time; no traffic and no aggregation (the runs stand for clients alone)."""
    rows = []
    for per_run in zip(*runs, strict=False):
        row: dict[str, Any] = {"round": per_run[0]["round"]}
        for metric in ("accuracy", "f1"):
            if all(metric in r for r in per_run):
                row[metric] = float(np.mean([r[metric] for r in per_run]))
                row[f"tier_{metric}"] = _by_rank(per_run, f"tier_{metric}", np.mean, fallback=metric)
        row["tier_step_s"] = _by_rank(per_run, "tier_step_s", np.mean)
        row["tier_peak_bytes"] = _by_rank(per_run, "tier_peak_bytes", max)
        row["tier_state_bytes"] = _by_rank(per_run, "tier_state_bytes", max)
        row.update(uplink_bytes=0, downlink_bytes=0, aggregate_s=0.0)
        row["wall_s"] = float(sum(r["wall_s"] for r in per_run))
        rows.append(row)
    return rows


def _by_rank(rows: Sequence[dict[str, Any]], key: str, reduce, fallback: str | None = None) -> dict[str, Any]:
    values: dict[str, list[Any]] = {}
    for row in rows:
        per_rank = row.get(key)
        if per_rank is None and fallback is not None:  # tiers not scored: the run's one rank holds the score
            per_rank = {r: row[fallback] for r in row.get("tier_step_s", {})}
        for rank, value in (per_rank or {}).items():
            values.setdefault(rank, []).append(value)
    return {r: float(reduce(v)) for r, v in sorted(values.items(), key=lambda item: int(item[0]))}


# --- statistics ---------------------------------------------------------------------------------------


def rounds_to_target(rows: Sequence[dict[str, Any]], target: float) -> int | None:
    """The first evaluated round whose dev accuracy reaches `target`; None if none does."""
    return next((r["round"] for r in evaluated_rows(rows) if r["accuracy"] >= target), None)


def seed_figures(run: SeedRun, target: float | None) -> dict[str, Any]:
    """The figures of one seed of one group: sums and maxima over its rounds, and per rank tier (`tiers`:
    rank -> final accuracy, mean step seconds, largest peak and trainable-state bytes)."""
    rows = run.rows
    scored = evaluated_rows(rows)  # the last round is always among them
    final = scored[-1]
    tier_acc = final.get("tier_accuracy") or {}
    # every tier scored at the end, and every tier that trained in some round (a round samples a few)
    ranks = sorted({*tier_acc, *(rank for row in rows for rank in row.get("tier_step_s", {}))}, key=int)
    reached = rounds_to_target(rows, target) if target is not None else None

    def total(key: str) -> float | None:
        return sum(r.get(key, 0) for r in rows) if run.communicates else None

    def median(key: str) -> float | None:
        return float(np.median([r.get(key, 0) for r in rows])) if run.communicates else None

    def per_round(key: str, rank: str) -> list[Any]:
        return [r[key][rank] for r in rows if rank in r.get(key, {})]

    return {
        "rounds": len(rows),
        "final_accuracy": final["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in scored),
        "final_f1": final.get("f1"),
        "best_f1": max(r["f1"] for r in scored) if "f1" in final else None,
        "rounds_to_target": reached,
        "wall_to_target_s": sum(r["wall_s"] for r in rows if r["round"] <= reached) if reached else None,
        "uplink_mb": total("uplink_bytes") / 1e6 if run.communicates else None,
        "downlink_mb": total("downlink_bytes") / 1e6 if run.communicates else None,
        "wall_s": sum(r["wall_s"] for r in rows),
        "aggregate_s": total("aggregate_s"),
        # the median round's aggregation, in wall and, where every round records it, in CPU seconds (the
        # paired multiples: one paused or starved round does not move a median)
        "aggregate_round_s": median("aggregate_s"),
        "aggregate_cpu_round_s": median("aggregate_cpu_s") if all("aggregate_cpu_s" in r for r in rows)
        else None,
        # [privacy]: the epsilon the run spent (None without privacy, or without noise: unbounded)
        "epsilon": (rows[-1].get("privacy") or {}).get("epsilon"),
        "tiers": {
            int(rank): {
                # a run that did not score tiers, or a single-rank run: its rank holds the global model
                "final_accuracy": tier_acc.get(rank, final["accuracy"] if len(ranks) == 1 else None),
                "step_s": np.mean(steps) if (steps := per_round("tier_step_s", rank)) else None,
                "peak_bytes": max(per_round("tier_peak_bytes", rank), default=None),
                "state_bytes": max(per_round("tier_state_bytes", rank), default=None),
            }
            for rank in ranks
        },
    }


_SCALARS = ("final_accuracy", "best_accuracy", "final_f1", "best_f1", "uplink_mb", "downlink_mb", "wall_s",
            "aggregate_s")  # fmt: skip
_TIER_COLUMNS = ("final_accuracy_mean", "final_accuracy_std", "step_ms", "peak_mib", "state_mib")


def seed_frame(runs: Sequence[SeedRun], target: float | None) -> pd.DataFrame:
    """One row per run: `group`, `seed`, `clients` and its `seed_figures` but the tiers (None as NaN)."""
    figures = [dict(group=r.group, seed=r.seed, clients=r.clients, **seed_figures(r, target)) for r in runs]
    numbers = (*_SCALARS, "aggregate_round_s", "aggregate_cpu_round_s", "rounds_to_target",
               "wall_to_target_s", "epsilon")  # fmt: skip
    return pd.DataFrame(figures).drop(columns="tiers").astype(dict.fromkeys(numbers, float))


# Over seeds: the mean, and the sample standard deviation (NaN with one seed). Series' own reductions,
# not groupby's compiled ones (which sum otherwise), so the figures are numpy's to the last bit.
def _mean(values: pd.Series) -> float:
    return values.mean()


def _std(values: pd.Series) -> float:
    return values.std()


def _mean_std(*keys: str) -> dict[str, tuple[str, Callable]]:
    """Named aggregations `<key>_mean` and `<key>_std` over each group's seeds, for each of `keys`."""
    return {f"{key}_{name}": (key, f) for key in keys for name, f in (("mean", _mean), ("std", _std))}


def _in_group_order(table: pd.DataFrame) -> pd.DataFrame:
    """`table` (indexed by group) in `group_order`, with a `reference` column first."""
    table.insert(0, "reference", table.index.map(is_reference))
    return table.loc[sorted(table.index, key=group_order)]


def group_table(runs: Sequence[SeedRun], target: float | None) -> pd.DataFrame:
    """One row per group (the index, in `group_order`): `<figure>_mean`, `<figure>_std` over seeds,
    rounds to target (mean over the seeds that reached it, how many did; NA without a target) and the
    wall time up to it."""
    by_group = seed_frame(runs, target).groupby("group", sort=False)
    reached = by_group["rounds_to_target"]
    table = by_group.agg(
        seeds=("seed", "size"), clients=("clients", "first"), rounds=("rounds", "min"),
        **_mean_std(*_SCALARS), epsilon=("epsilon", "max"),
    ).assign(
        target_accuracy=target,
        reached_target=reached.count().astype("Int64") if target is not None else pd.NA,
        rounds_to_target_mean=reached.agg(_mean),
        wall_to_target_s_mean=by_group["wall_to_target_s"].agg(_mean),
    )
    return _in_group_order(table)


def tier_table(runs: Sequence[SeedRun]) -> pd.DataFrame:
    """One row per group and rank tier (the index): the final accuracy (mean, std over seeds), the mean
    milliseconds per step, the largest peak and trainable-state memory in MiB."""
    tiers = [
        {"group": r.group, "rank": rank, **figures}
        for r in runs
        for rank, figures in seed_figures(r, None)["tiers"].items()
    ]
    numbers = ["final_accuracy", "step_s", "peak_bytes", "state_bytes"]
    frame = pd.DataFrame(tiers, columns=["group", "rank", *numbers]).astype(dict.fromkeys(numbers, float))
    table = frame.groupby(["group", "rank"]).agg(
        **_mean_std("final_accuracy"), step_s=("step_s", _mean), peak=("peak_bytes", "max"),
        state=("state_bytes", "max"),
    )  # fmt: skip
    table = table.assign(step_ms=1e3 * table.pop("step_s"), peak_mib=table.pop("peak") / 2**20,
                         state_mib=table.pop("state") / 2**20)  # fmt: skip
    return table.loc[sorted(table.index, key=lambda key: (group_order(key[0]), key[1]))]


# Where a round's time goes: each part's metrics key(s), in the order the round spends them. A round's
# `wall_s` is the sum of the parts before the checkpoint by construction (training is timed as what the
# round spent before aggregating, plans included); the checkpoint is written after `wall_s` closes.
TIME_PARTS = {
    "training": ("train_s",),
    "secure stages": ("secure_s",),
    "aggregation": ("aggregate_s",),
    "instruments": ("instruments_s",),
    "evaluation": ("eval_s", "tier_eval_s"),
    "checkpoint": ("checkpoint_s",),
}


BUSY = "cpu_per_wall"  # time_table's column of CPU seconds per wall second


def time_table(runs: Sequence[SeedRun]) -> pd.DataFrame:
    """Per group of the runs that federate (the index, in `group_order`): the mean over its seeds of the
    seconds per round (`round_s`: the round's wall time plus its checkpoint), of the CPU seconds the
    process spent per wall second of its rounds (`BUSY`, where rows record `cpu_s`) and of each part's
    share of the round (`TIME_PARTS`), summed over the rounds. Parts a group never spent are left out."""
    records = []
    for run in runs:
        if not run.communicates:
            continue
        parts = {part: sum(r.get(k, 0.0) for r in run.rows for k in ks) for part, ks in TIME_PARTS.items()}
        total = sum(r["wall_s"] for r in run.rows) + parts["checkpoint"]
        # NaN for a part no row times (a run made before `checkpoint_s`), zero for one it did not spend
        timed = {part: any(k in r for r in run.rows for k in ks) for part, ks in TIME_PARTS.items()}
        shares = {part: seconds / total if timed[part] else np.nan for part, seconds in parts.items()}
        # CPU seconds per wall second over the rounds that record both: below the threads the run was
        # given, the rounds waited for cores something else held (or for a pause)
        cpu = [(r["cpu_s"], r["wall_s"]) for r in run.rows if "cpu_s" in r]
        busy = sum(c for c, _ in cpu) / sum(w for _, w in cpu) if cpu and sum(w for _, w in cpu) else np.nan
        records.append({"group": run.group, "round_s": total / len(run.rows), BUSY: busy, **shares})
    if not records:
        return pd.DataFrame()
    table = pd.DataFrame.from_records(records).groupby("group", sort=False).mean()
    table = table.loc[:, table.notna().any() & (table.fillna(0) != 0).any()]  # e.g. no secure stages
    return table.loc[sorted(table.index, key=group_order)]


def default_target(table: pd.DataFrame) -> float | None:
    """`TARGET_SHARE` of the centralised reference's mean final accuracy; None without that reference."""
    return TARGET_SHARE * table.at[CENTRAL, "final_accuracy_mean"] if CENTRAL in table.index else None


def paired_table(
    runs: Sequence[SeedRun], target: float | None, subject: str | None = None
) -> list[dict[str, Any]]:
    """`subject` (default `subject_of` the runs) against every other group, seed by seed on the seeds
    both ran (the same partition, tiers and sampled clients): differences are `subject` minus the
    other, so positive means `subject` ahead.

    Per group: how many seeds pair; the final and the best dev accuracy difference (mean, std over the
    seeds) and in how many seeds `subject` ends ahead; the difference of the mean dev accuracy over the
    rounds both ran (the area under the accuracy curve per round: a convergence figure that needs no
    target); rounds to the target of each (mean over the seeds where both reach it); and the other's
    total traffic and median round's aggregation time (CPU seconds where both record them) as multiples
    of `subject`'s, with the p of the paired t-test on their logs. Empty without `subject` runs; None
    for a figure with nothing to show."""
    subject = subject or subject_of(r.group for r in runs)
    seeds = seed_frame(runs, target)
    mine = seeds[seeds["group"] == subject].set_index("seed")
    pair = seeds[seeds["group"] != subject].join(mine, on="seed", rsuffix="_s", how="inner")  # _s: subject's
    if pair.empty:
        return []
    rows_of = {(r.group, r.seed): r.rows for r in runs}
    final = pair["final_accuracy_s"] - pair["final_accuracy"]
    both_reached = pair["rounds_to_target"].notna() & pair["rounds_to_target_s"].notna()
    traffic = (pair["uplink_mb"] + pair["downlink_mb"]) / (pair["uplink_mb_s"] + pair["downlink_mb_s"])
    # aggregation: the median round's, in CPU seconds where both runs record them (a pause or cores held
    # by other work inflate the wall time: FLoRA's seed 1 of the paper regime spent 859 s of one round's
    # aggregation stopped, 24x HLoRA's whole run's aggregation)
    cpu = pair["aggregate_cpu_round_s"].notna() & pair["aggregate_cpu_round_s_s"].notna()
    mine_agg = pair["aggregate_cpu_round_s_s"].where(cpu, pair["aggregate_round_s_s"])
    other_agg = pair["aggregate_cpu_round_s"].where(cpu, pair["aggregate_round_s"])
    figures = pair[["group"]].assign(
        final_accuracy_diff=final,
        best_accuracy_diff=pair["best_accuracy_s"] - pair["best_accuracy"],
        ahead=final > 0,
        behind=final < 0,
        mean_accuracy_diff=[
            _mean_accuracy_diff(rows_of[(subject, seed)], rows_of[(group, seed)])
            for group, seed in zip(pair["group"], pair["seed"], strict=True)
        ],
        subject_to_target=pair["rounds_to_target_s"].where(both_reached),
        other_to_target=pair["rounds_to_target"].where(both_reached),
        traffic_ratio=traffic.where(pair["uplink_mb_s"] > 0),
        aggregate_ratio=(other_agg / mine_agg).where(mine_agg > 0),
    )
    table = figures.groupby("group", sort=False).agg(
        seeds=("group", "size"),
        **_mean_std("final_accuracy_diff", "best_accuracy_diff"),
        final_accuracy_p=("final_accuracy_diff", paired_p),
        ahead=("ahead", "sum"),
        behind=("behind", "sum"),
        **_mean_std("mean_accuracy_diff"),
        mean_accuracy_p=("mean_accuracy_diff", paired_p),
        both_reached_target=("subject_to_target", "count"),
        rounds_to_target_subject=("subject_to_target", _mean),
        rounds_to_target_other=("other_to_target", _mean),
        traffic_ratio=("traffic_ratio", _mean_of_all),
        traffic_ratio_p=("traffic_ratio", _log_p),
        aggregate_ratio=("aggregate_ratio", _mean_of_all),
        aggregate_ratio_p=("aggregate_ratio", _log_p),
    )
    if target is None:
        table["both_reached_target"] = None
    return _records(_in_group_order(table))


def tier_scores(run: SeedRun) -> dict[int, dict[int, float]]:
    """Rank -> {round: the dev accuracy of that tier's adapter} over the evaluated rounds that scored
    the tiers (`eval.tiers`); a run of one rank (a fixed-rank reference) holds its global score there."""
    ranks = list(seed_figures(run, None)["tiers"])
    scores: dict[int, dict[int, float]] = {}
    for row in evaluated_rows(run.rows):
        tiers = row.get("tier_accuracy") or ({str(ranks[0]): row["accuracy"]} if len(ranks) == 1 else {})
        for rank, accuracy in tiers.items():
            scores.setdefault(int(rank), {})[row["round"]] = accuracy
    return scores


def paired_tier_table(runs: Sequence[SeedRun], subject: str | None = None) -> list[dict[str, Any]]:
    """Rank tier by rank tier, `subject`'s adapter of that rank against the other group's, seed by seed
    (the same partition, tiers and sampled clients): the difference of their final scores (mean, std, p
    of the paired t-test, in how many seeds `subject` ends ahead and behind) and of their mean scores
    over the rounds both scored that tier (`rounds`: how many, the fewest over the seeds; 1 where the
    tiers are scored in the last round only). A fixed-rank reference pairs at its own rank with its global
    adapter: FedIT r=2 against `subject`'s rank-2 clients. Empty without `subject` runs."""
    subject = subject or subject_of(r.group for r in runs)
    mine = {r.seed: tier_scores(r) for r in runs if r.group == subject}
    records = []
    for run in runs:
        if run.group == subject or run.seed not in mine:
            continue
        for rank, theirs in tier_scores(run).items():
            own = mine[run.seed].get(rank)
            if not own:
                continue
            both = sorted(own.keys() & theirs.keys())
            final = own[max(own)] - theirs[max(theirs)]
            mean = np.mean([own[r] for r in both]) - np.mean([theirs[r] for r in both]) if both else None
            records.append({"group": run.group, "rank": rank, "final_diff": final, "ahead": final > 0,
                            "behind": final < 0, "mean_diff": mean, "rounds": len(both)})  # fmt: skip
    if not records:
        return []
    frame = pd.DataFrame.from_records(records).astype({"final_diff": float, "mean_diff": float})
    table = frame.groupby(["group", "rank"], sort=False).agg(
        seeds=("group", "size"), **_mean_std("final_diff"), final_diff_p=("final_diff", paired_p),
        ahead=("ahead", "sum"), behind=("behind", "sum"), rounds=("rounds", "min"),
        **_mean_std("mean_diff"), mean_diff_p=("mean_diff", paired_p),
    )  # fmt: skip
    table = table.loc[sorted(table.index, key=lambda key: (group_order(key[0]), key[1]))]
    return _records(table)


def paired_p(diffs: Sequence[float]) -> float | None:
    """The two-sided p-value of the paired t-test on per-seed differences (is their mean zero?); None
    with fewer than two seeds or differences that do not vary (no test to make)."""
    from scipy.stats import ttest_1samp

    if len(diffs) < 2 or np.ptp(diffs) == 0:
        return None
    return float(ttest_1samp(diffs, 0.0).pvalue)


def _mean_of_all(values: pd.Series) -> float:
    """The mean, missing (NaN) where a seed's value is: a cost ratio of some seeds is no figure of all."""
    return values.mean(skipna=False)


def _log_p(ratios: pd.Series) -> float | None:
    """`paired_p` of the logs of per-seed cost ratios (is the rival's cost the subject's on average?);
    None where a ratio is missing (a side that spent nothing)."""
    return None if ratios.isna().any() else paired_p(np.log(ratios.to_numpy()))


def _mean_accuracy_diff(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> float:
    """The mean dev accuracy over the rounds both ran and both evaluated, of `a` minus that of `b`."""
    n = min(len(a), len(b))
    both = _common_rounds([a[:n], b[:n]])
    return float(
        np.mean([r["accuracy"] for r in a[:n] if r["round"] in both])
        - np.mean([r["accuracy"] for r in b[:n] if r["round"] in both])
    )


def _common_rounds(runs: Sequence[Sequence[dict[str, Any]]]) -> set[int]:
    """The rounds every one of `runs` (metrics rows) evaluated."""
    return set.intersection(*({r["round"] for r in evaluated_rows(rows)} for rows in runs))


# --- output -------------------------------------------------------------------------------------------


def write_report(results_dir: Path, target: float | None = None) -> list[Path]:
    """Read every complete run of `results_dir` and write `summary.md`, `summary.csv` and three charts
    beside them (and `paired.csv` and `paired_tiers.csv` when the subject has runs); `target` (default:
    `TARGET_SHARE` of the centralised final accuracy). Returns the paths written. RunDirError when there
    is no complete run.

    One writer at a time (`REPORT_LOCK`, an OS lock that goes with the process): `hlora compare`s of one
    method or seed each, side by side on one results folder (`scripts/paper_regime.py`), each write the
    report as they end, and two writing at once would rename each other's files away mid-write. Under the
    lock a report is read and written whole, so the last one holds every run complete by then."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():  # nothing to lock; `_write_report` says there is no run
        return _write_report(results_dir, target)
    with FileLock(results_dir / REPORT_LOCK):
        return _write_report(results_dir, target)


def _write_report(results_dir: Path, target: float | None) -> list[Path]:
    from hlora.errors import RunDirError

    loaded = load_results(results_dir)
    if not loaded.runs:
        raise RunDirError(f"{results_dir} holds no complete run under {RUNS_DIR}/ to report")
    target_note = "given with --target-accuracy"
    if target is None:
        target = default_target(group_table(loaded.runs, None))
        target_note = f"{TARGET_SHARE:g} x the centralised reference's mean final accuracy"
        if target is None:
            target_note = "none: no centralised reference and no --target-accuracy"
    table, tiers = group_table(loaded.runs, target), tier_table(loaded.runs)
    subject = subject_of(r.group for r in loaded.runs)
    paired = paired_table(loaded.runs, target, subject)
    paired_tiers = paired_tier_table(loaded.runs, subject)
    rivals = [group for group in dict.fromkeys(r.group for r in loaded.runs) if group != subject]
    found = verdicts.verdicts(paired, paired_tiers, subject, [g for g in rivals if not is_reference(g)])
    paths = [results_dir / SUMMARY_MD, results_dir / SUMMARY_CSV]
    write_text_atomic(
        paths[0], markdown(table, tiers, loaded, target, target_note, paired, subject, paired_tiers, found)
    )
    write_csv(table, tiers, paths[1])
    for rows, name in (
        (paired, PAIRED_CSV), (paired_tiers, PAIRED_TIERS_CSV), (verdicts.records(found), VERDICTS_CSV)
    ):
        if rows:
            paths.append(results_dir / name)
            _to_csv(pd.DataFrame(rows).convert_dtypes(convert_floating=False), paths[-1])  # ranks as ints
    paths += plot_all(loaded.runs, results_dir, loaded.settings)
    paths += plot_mechanism(loaded.runs, results_dir, loaded.settings)
    paths += plot_features(loaded.runs, results_dir, loaded.settings)
    return paths


def write_csv(table: pd.DataFrame, tiers: pd.DataFrame, path: Path) -> None:
    """`group_table` with `tier_table` pivoted beside it: `tier<r>_<figure>` columns, rank by rank
    (empty where a group lacks r)."""
    ranks = sorted(tiers.index.unique("rank"))
    wide = tiers.unstack("rank")[[(key, r) for r in ranks for key in _TIER_COLUMNS]]
    wide.columns = [f"tier{r}_{key}" for key, r in wide.columns]
    if table["epsilon"].isna().all():  # no [privacy] run: the columns of the reports written before it
        table = table.drop(columns="epsilon")
    _to_csv(table.join(wide).reset_index(), path)


def _to_csv(frame: pd.DataFrame, path: Path) -> None:
    """`frame` as CSV (missing values as empty cells, the csv module's CRLF line ends of the reports
    written so far), written beside `path` and renamed into place."""
    write_text_atomic(path, frame.to_csv(index=False, na_rep="", lineterminator="\r\n"))


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of `frame` (its index as the first columns) as dicts, None where a value is missing."""
    frame = frame.reset_index()
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _pm(mean: float | None, std: float | None, digits: int = 4, signed: bool = False) -> str:
    if mean is None:
        return "-"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.{digits}f}"  # NaN: a figure not recorded


def _mb(value: float | None) -> str:
    """Megabytes with three significant figures below 100 (tiny test runs send kilobytes)."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _cells(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table (a small writer: `DataFrame.to_markdown` would need `tabulate`)."""
    return [_cells(*header), _cells(*["---"] * len(header)), *(_cells(*row) for row in rows)]


def markdown(
    table: pd.DataFrame, tiers: pd.DataFrame, loaded: Loaded, target: float | None, target_note: str,
    paired: Sequence[dict[str, Any]] = (), subject: str | None = None,
    paired_tiers: Sequence[dict[str, Any]] = (), found: Sequence[verdicts.Verdict] = (),
) -> str:  # fmt: skip
    """summary.md: the settings, the group table, the tier table, what they mean, the paired tables of
    `subject` (whole model, then tier by tier), the verdicts `found` and how the runs were made."""
    s = loaded.settings
    lines = ["# Comparison", ""]
    if s:
        seeds = ", ".join(str(x) for x in _seeds(loaded.runs))
        lines += [
            f"{str(s.get('task', '?')).upper()} dev, {s.get('num_clients', '?')} clients, "
            f"client ranks {s.get('client_ranks', '?')}, bank rank {s.get('bank_rank', '?')}; "
            f"majority class {_num(s.get('majority_baseline'), 4)}. Seeds: {seeds}.",
            "",
        ]
    target_text = "-" if target is None else f"{target:.4f}"
    baseline = s.get("majority_baseline") if s else None
    if target is not None and baseline is not None and target <= baseline:
        target_note += (
            f"; at or below the majority class ({baseline:.4f}): a model that answers one class reaches "
            "it, so rounds to target say nothing here"
        )
    cadence = cadence_note(loaded.runs)
    if cadence:
        target_note += f"; rounds to target are read on the evaluated rounds, {cadence}"

    def to_target(row: dict[str, Any]) -> str:
        if row["reached_target"] is None:
            return "-"
        text = f"{_num(row['rounds_to_target_mean'])} ({row['reached_target']}/{row['seeds']})"
        wall = row["wall_to_target_s_mean"]
        return text if wall is None else f"{text}, {wall:.0f} s"

    lines += [f"Target accuracy {target_text} ({target_note}).", ""]
    # [privacy] runs: the epsilon each spent (the largest over its seeds), a column only where one did
    private = any(row["epsilon"] is not None for row in _records(table))
    lines += _table(
        ("method", "seeds", "final acc", "best acc", "final F1", "best F1", "rounds to target", "MB up",
         "MB down", "wall s", "aggregation s", *(("epsilon",) if private else ())),
        [(label(row["group"]), row["seeds"], *[_pm(row[f"{k}_mean"], row[f"{k}_std"]) for k in _SCALARS[:4]],
          to_target(row), _mb(row["uplink_mb_mean"]), _mb(row["downlink_mb_mean"]), _num(row["wall_s_mean"]),
          _num(row["aggregate_s_mean"], 3), *((_num(row["epsilon"], 2),) if private else ()))
         for row in _records(table)],
    )  # fmt: skip
    lines += [
        "",
        "Per rank tier: the dev accuracy of the adapter a client of that rank holds at the end (the "
        "global one cut to its rank), the mean seconds per local step, the largest peak memory of "
        "local training, and of it the trainable tensors with their gradients and optimizer state (the "
        "part that grows with the rank; the rest is the base model and the activations of the client's "
        "longest batch).",
        "",
    ]
    lines += _table(
        ("method", "rank", "final acc", "ms per step", "peak MiB", "trainable state MiB"),
        [(label(t["group"]), t["rank"], _pm(t["final_accuracy_mean"], t["final_accuracy_std"]),
          _num(t["step_ms"]), _num(t["peak_mib"]), _num(t["state_mib"], 2)) for t in _records(tiers)],
    )  # fmt: skip
    clients = f"{table.at[LOCAL, 'clients']} clients" if LOCAL in table.index else "the clients"
    rule = _reference_title()
    lines += [
        "",
        "Mean ± sample standard deviation over seeds (no ± with one seed). Rounds to target: the first "
        "round whose dev accuracy reaches the target, mean over the seeds that reach it (how many do, of "
        "all), and the wall time of the rounds up to it. MB: total bytes of the tensors sent over the "
        "run / 1e6. Wall s: the rounds' wall time (for the local reference, summed over its clients' "
        "runs). Aggregation s: the server's aggregation time summed over the rounds.",
        "",
        "References: centralised = one client holding all the training data at the bank rank, the same "
        f"rounds and local epochs (or steps) a round; {rule} r=... = every client at that one rank (the "
        "smallest and the largest tier); local alone = each client training on its own data at its own "
        f"rank with no federation, the mean over {clients} (per tier: over that tier's clients). The "
        "centralised and the local runs exchange nothing, so they have no MB or aggregation time.",
    ]
    if loaded.central_settings:
        own = "; ".join(loaded.central_settings)
        lines[-1] += f" The centralised reference has settings of its own: {own}."
    if paired:
        lines += paired_lines(paired, target, subject, evaluated=bool(cadence))
    if paired_tiers:
        lines += paired_tier_lines(paired_tiers, subject)
    if found:
        lines += verdict_lines(found, subject)
    lines += one_class_lines(answers.one_class_runs(loaded.runs))
    times = time_table(loaded.runs)
    if not times.empty:
        lines += time_lines(times)
    if loaded.incomplete:
        lines += ["", f"Not complete, left out: {', '.join(loaded.incomplete)}."]
    lines += provenance_lines(loaded.environments)
    return "\n".join(lines) + "\n"


def paired_lines(
    paired: Sequence[dict[str, Any]], target: float | None, subject: str, evaluated: bool = False
) -> list[str]:
    """The paired table of `subject`; `evaluated`: some runs skipped evaluations (`eval.every`), and
    the text says that the mean accuracy is over the rounds both evaluated."""
    both = "both evaluated" if evaluated else "both ran"
    lines = [
        "",
        f"## {subject} against each method and reference, seed by seed",
        "",
        f"Differences are {subject} minus the other on the same seeds (same partition, tiers and sampled "
        f"clients): positive means {subject} is ahead; mean ± sample standard deviation over the seeds, "
        "and p, the two-sided p-value of a paired t-test over the seeds that the mean difference is zero "
        "(with 3 seeds only a large, steady difference gets p below 0.05; the dev set is the same for "
        "both, so its sampling noise is not in p). Mean accuracy: the dev accuracy averaged over the "
        f"rounds {both} (a convergence figure that needs no target). Traffic and aggregation: the "
        f"other's as multiples of {subject}'s (above 1: {subject} spends less): the bytes of the whole "
        "run, and the median round's aggregation time, in CPU seconds where both runs of a seed record "
        "them, else in wall seconds (a median, and CPU time, that a paused or starved round does not "
        "move).",
        "",
    ]

    def to_target(row: dict[str, Any]) -> str:
        if row["both_reached_target"]:
            return (f"{row['rounds_to_target_subject']:.1f} vs {row['rounds_to_target_other']:.1f} "
                    f"({row['both_reached_target']}/{row['seeds']})")  # fmt: skip
        return "-" if target is None else f"not both (0/{row['seeds']})"

    def diff(row: dict[str, Any], key: str) -> str:
        return _pm(row[f"{key}_diff_mean"], row[f"{key}_diff_std"], signed=True)

    return lines + _table(
        ("against", "seeds", "final acc diff", f"{subject} ahead / behind", "best acc diff", "mean acc diff",
         f"rounds to target ({subject} vs other)", "traffic x", "aggregation x"),
        [(label(row["group"]), row["seeds"], diff(row, "final_accuracy") + _p(row["final_accuracy_p"]),
          f"{row['ahead']} / {row['behind']}", diff(row, "best_accuracy"),
          diff(row, "mean_accuracy") + _p(row["mean_accuracy_p"]), to_target(row),
          _num(row["traffic_ratio"], 2), _num(row["aggregate_ratio"], 1)) for row in paired],
    )  # fmt: skip


def paired_tier_lines(paired_tiers: Sequence[dict[str, Any]], subject: str) -> list[str]:
    """The per-tier paired table of `subject` (`paired_tier_table`)."""
    lines = [
        "",
        f"## {subject}'s rank tiers against each method's, seed by seed",
        "",
        f"The adapter a client of each rank holds ({subject}'s global adapter cut to that rank) against "
        "the other's of the same rank, on the same seeds: final dev accuracy difference (mean ± sample "
        f"standard deviation, p of the paired t-test), in how many seeds {subject} ends ahead and behind, "
        "and the difference of the mean over the rounds both scored the tiers (how many: `rounds`; where "
        "the tiers are scored in the last round only, the final difference says it all). A reference of "
        "one rank pairs at that rank with its global adapter.",
        "",
    ]

    def diff(row: dict[str, Any], key: str) -> str:
        return _pm(row[f"{key}_diff_mean"], row[f"{key}_diff_std"], signed=True) + _p(row[f"{key}_diff_p"])

    return lines + _table(
        ("against", "rank", "seeds", "final acc diff", f"{subject} ahead / behind", "rounds",
         "mean acc diff"),
        [(label(row["group"]), row["rank"], row["seeds"], diff(row, "final"),
          f"{row['ahead']} / {row['behind']}", row["rounds"], diff(row, "mean") if row["rounds"] > 1 else "-")
         for row in paired_tiers],
    )  # fmt: skip


def verdict_lines(found: Sequence[verdicts.Verdict], subject: str) -> list[str]:
    """The verdicts, one row per rival and one column per claim (`verdicts.CLAIMS`)."""
    claims = [c.name for c in verdicts.CLAIMS if any(v.claim == c.name for v in found)]
    cells = {(v.group, v.claim): v for v in found}
    rivals = list(dict.fromkeys(v.group for v in found))
    tier = {v.group: v.rank for v in found if v.rank is not None}

    def cell(group: str, claim: str) -> str:
        verdict = cells.get((group, claim))
        if verdict is None:
            return "-"
        rank = f" (r={verdict.rank})" if verdict.rank is not None and len(set(tier.values())) > 1 else ""
        return verdict.text + rank

    ranks = sorted(set(tier.values()))
    lowest = f" (r={ranks[0]})" if len(ranks) == 1 else ""
    header = [c.replace("lowest tier", f"lowest tier{lowest}") for c in claims]
    return [
        "",
        f"## Verdicts: {subject} against each method",
        "",
        f"Which side each claim favours, by one rule (`hlora.experiments.verdicts`): over the seeds both "
        f"ran, a paired t-test's two-sided p below {verdicts.ALPHA:g} names the side the mean favours; "
        "above it the claim is not separated (the mean's side shown as a leaning); effects that do not "
        "vary over two or more seeds name the side every seed favours; one seed gives a leaning and no "
        f"test. Accuracy effects are points of dev accuracy ({subject} minus the other or the other "
        "minus it, whichever leads): the final one, the mean over the rounds both evaluated (converges "
        "faster) and the final one of the smallest rank tier both have. Cost effects are the larger "
        f"side's figure as a multiple of the smaller's: the bytes sent both ways over the run and the "
        "server's median round's aggregation time (CPU seconds where both runs record them; wall times "
        "of runs that shared the cores: a large multiple only). With 3 seeds only a large, steady effect "
        "is separated; where an accuracy claim over three or more seeds is not, \"~N seeds to separate\" "
        "is how many seeds an effect of the size seen, at the spread of the per-seed differences seen, "
        "would take for the test to reach the bound (`verdicts.seeds_to_separate`): a near miss told from "
        "a far one.",
        "",
        *_table(("against", "seeds", *header),
                [(label(g), max(v.seeds for v in found if v.group == g), *(cell(g, c) for c in claims))
                 for g in rivals]),
    ]  # fmt: skip


def one_class_lines(found: Sequence[answers.OneClassRun]) -> list[str]:
    """The runs with a round whose global model gave every dev row one class (`answers`), or a line
    saying no round that could be read was one; nothing where no round could be read."""
    if all(run.undecided == run.evaluated for run in found):
        return []
    title = ["", "## Rounds whose global model gives every dev row one class", ""]
    hit = [run for run in found if run.one_class]
    if not hit:
        return [*title, "None: in every evaluated round that could be read, the global model's answers "
                        "depend on its input."]  # fmt: skip
    undecided = sum(run.undecided for run in found)
    return [
        *title,
        "A model that answers every input alike scores the majority class's share: dead, not weak. Each "
        "evaluated round is read from its recorded prediction spread (the share of rows given each class, "
        "the spread of the logits over the rows) or, in runs made before rounds recorded it, from its "
        "accuracy and F1: on a two-class task, accuracy equal to the majority share with F1 of 0 or "
        "2m/(1+m) (m that share) happens only when every row gets the majority class. Runs with no such "
        "round are not listed. \"Last layer's features flat\": the rounds, of those that recorded it, whose "
        "encoder gave every dev row nearly the same last-layer vector (the share of the features that "
        "varies over the rows under 1e-3: `feature_variation_by_round.png`).",
        "",
        *_table(("method", "seed", "one-class rounds", "one class from round to the end",
                 "same logits on every row", "last layer's features flat", "read from"),
                [(label(run.group), run.seed, f"{run.one_class} of {run.evaluated}",
                  "-" if run.since is None else run.since,
                  "-" if run.same_logits is None else f"{run.same_logits} of {run.evaluated}",
                  "-" if run.flat_features is None else "{} of {}".format(*run.flat_features), run.read_from)
                 for run in hit]),
        *(["", f"{undecided} evaluated rounds scored the minority class's share with an F1 a one-class "
               "model has, which a mixed model can score too: not counted."] if undecided else []),
    ]  # fmt: skip


def time_lines(times: pd.DataFrame) -> list[str]:
    """The `time_table`: seconds a round, the CPU seconds per wall second where recorded, each part's
    share of the round."""
    parts = [c for c in times.columns if c not in ("round_s", BUSY)]
    busy = BUSY in times.columns
    return [
        "",
        "## Where a round's time goes",
        "",
        "Seconds a round (its wall time and its checkpoint, mean over the rounds and the seeds) and each "
        "part's share of them, summed over the run: the clients' training (everything the round spent "
        "before aggregating: in the simulation the clients train one after another), the server's "
        "aggregation, its instruments, the evaluation of the global adapter and the tiers (on the rounds "
        "`eval.every` picks), the checkpoint. A round's wall time is the sum of the parts before the "
        "checkpoint." + (" CPU s per wall s: the CPU time the run's process spent in its rounds (every "
                         "thread) over their wall time, for the runs that record it; below the threads "
                         "a run was given, its rounds waited for cores that other work held, and their "
                         "wall times count that wait." if busy else ""),
        "",
        *_table(
            ("method", "s a round", *(("CPU s per wall s",) if busy else ()), *parts),
            [(label(group), _num(row["round_s"]), *((_num(row[BUSY], 2),) if busy else ()),
              *(_share(row[p]) for p in parts))
             for group, row in times.iterrows()],
        ),
    ]  # fmt: skip


def _share(value: float) -> str:
    """A share as a percentage: `-` where it was not timed, `<0.1%` where it rounds to nothing."""
    if pd.isna(value):
        return "-"
    return "<0.1%" if 0 < value < 0.0005 else f"{100 * value:.1f}%"


def _p(value: float | None) -> str:
    return "" if value is None else f" (p {value:.2g})"


def cadence_note(runs: Sequence[SeedRun]) -> str:
    """`"every 5"` (`"every 5 (hlora, ffa), every 1 (central)"` where groups differ) when some run scored
    fewer rounds than it played (`eval.every` above 1), else empty: the rounds its readings come from."""
    groups: dict[int, list[str]] = {}
    for run in sorted(runs, key=lambda r: group_order(r.group)):
        names = groups.setdefault(run.eval_every, [])
        if run.group not in names:
            names.append(run.group)
    if set(groups) <= {1}:
        return ""
    if len(groups) == 1:
        return f"every {next(iter(groups))}"
    return ", ".join(f"every {n} ({', '.join(names)})" for n, names in sorted(groups.items(), reverse=True))


def provenance_lines(environments: Sequence[dict[str, Any] | None]) -> list[str]:
    """How the runs were made, from their summaries: each distinct commit, hardware and command with how
    many runs it made; runs written before hlora recorded it are counted as such."""
    recorded = [e for e in environments if e]
    lines = ["", "## How these runs were made", ""]

    def tally(values: Iterable[str]) -> list[str]:
        return [f"- {value} ({n} run{'s' if n > 1 else ''})" for value, n in Counter(values).most_common()]

    lines += ["Commits:", *tally(str(e.get("commit") or "not a git checkout") for e in recorded), ""]
    lines += ["Hardware and libraries:", *tally(_hardware(e) for e in recorded), ""]
    lines += ["Commands:", *tally(f"`{e.get('command')}`" for e in recorded)]
    loads = [(e["load_avg"][1], e.get("torch_threads") or 1) for e in recorded if e.get("load_avg")]
    if loads:
        busy = sum(load > threads + 0.5 for load, threads in loads)
        low, high = min(x for x, _ in loads), max(x for x, _ in loads)
        lines += [
            "",
            f"Load average over the 5 min before each run ended: {low:.2f} to {high:.2f}. {busy} of "
            f"{len(loads)} runs ended on cores busier than their own torch threads (+0.5): something else "
            "ran beside them, and their wall, step and aggregation times may be inflated.",
        ]
    if len(recorded) < len(environments):
        bare = len(environments) - len(recorded)
        lines += ["", f"{bare} run{' carries' if bare == 1 else 's carry'} no record of this (made by an "
                  "hlora that did not write it): see BENCHMARKS.md for them."]  # fmt: skip
    return lines


def _hardware(env: dict[str, Any]) -> str:
    where = env.get("gpu") or f"{env.get('cpu') or 'unknown CPU'}, {env.get('cpu_count')} cores"
    return (
        f"{env.get('device')} ({where}), {env.get('torch_threads')} torch threads; "
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
        f"python {env.get('python')}"
    )


def _seeds(runs: Sequence[SeedRun]) -> list[int]:
    return sorted({r.seed for r in runs})


# --- charts -------------------------------------------------------------------------------------------

Curve = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _curves(
    runs: Sequence[SeedRun], key: Callable[[list[dict[str, Any]]], Sequence[float]]
) -> dict[str, Curve]:
    """Per group (in `group_order`), over the rounds every seed has and evaluated: x (mean over seeds of
    `key(rows)`, a value per row: a cumulative one counts the rounds between too), and the mean, minimum
    and maximum dev accuracy over seeds."""
    groups: dict[str, list[SeedRun]] = {}
    for run in sorted(runs, key=lambda r: group_order(r.group)):
        groups.setdefault(run.group, []).append(run)
    curves = {}
    for group, seeds in groups.items():
        n = min(len(r.rows) for r in seeds)
        rows = [r.rows[:n] for r in seeds]
        acc = _per_round(rows, lambda rows: [r.get("accuracy") for r in rows]).dropna()  # all evaluated
        x = _per_round(rows, key).loc[acc.index].mean(axis=1)
        curves[group] = (x.to_numpy(), *(acc.agg(stat, axis=1).to_numpy() for stat in ("mean", "min", "max")))
    return curves


def _per_round(runs: Sequence[Sequence[dict[str, Any]]], values: Callable) -> pd.DataFrame:
    """One column per run (metrics rows), one row per round: `values(rows)`, a value per row."""
    return pd.DataFrame(
        {i: pd.Series(values(rows), [r["round"] for r in rows], dtype=float) for i, rows in enumerate(runs)}
    )


# matplotlib's default cycle without its grey (C7), which the majority-class line uses
_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "black", "navy", "darkred")


def _style(group: str, index: int) -> dict[str, Any]:
    colour = _COLOURS[index % len(_COLOURS)]
    if is_reference(group):
        return {"linestyle": "--", "linewidth": 1.3, "color": colour}
    return {"linestyle": "-", "linewidth": 2.0, "marker": "o", "markersize": 3.5, "color": colour}


def plot_all(runs: Sequence[SeedRun], folder: Path, settings: dict[str, Any]) -> list[Path]:
    """The three charts: accuracy per round, accuracy against traffic, final accuracy per rank tier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    task = str(settings.get("task", "")).upper()
    baseline = next((r.majority_baseline for r in runs if r.majority_baseline is not None), None)
    colours = {g: i for i, g in enumerate(sorted({r.group for r in runs}, key=group_order))}
    seeds = len(_seeds(runs))
    band = "mean; band: min-max over seeds" if seeds > 1 else "one seed"
    names = seed_labels(runs)
    paths = []

    def draw(ax, curves: dict[str, Curve]) -> None:
        for group, (x, mean, low, high) in curves.items():
            style = _style(group, colours[group])
            ax.plot(x, mean, label=names[group], **style)
            if seeds > 1 and not is_reference(group):  # references: the mean alone, not to crowd the chart
                ax.fill_between(x, low, high, color=style["color"], alpha=0.12)

    def finish(fig, ax, name: str, title: str) -> None:
        if baseline is not None:
            ax.axhline(
                baseline, color="grey", linestyle=":", linewidth=1, label=f"majority class ({baseline:.3f})"
            )
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        # beside the axes: a dozen lines would hide part of the curves inside them
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        paths.append(folder / name)

    # 1. accuracy per round
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    draw(ax, _curves(runs, lambda rows: [r["round"] for r in rows]))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("dev accuracy")
    finish(fig, ax, PLOT_ROUNDS, f"{task} dev accuracy per round ({band})")

    # 1b. accuracy per round, a panel per seed: a seed's runs share the partition, tiers and sampled
    # clients, and a mean over a seed where a rule died and one where it learned reads as a weak rule
    if seeds > 1:
        paths.append(_plot_by_seed(runs, folder, colours, baseline, task))

    # 2. accuracy against traffic; the runs that exchange nothing as their final accuracy
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    curves = _curves(
        [r for r in runs if r.communicates],
        lambda rows: np.cumsum([(r["uplink_bytes"] + r["downlink_bytes"]) / 1e6 for r in rows]),
    )
    draw(ax, curves)
    silent = _curves([r for r in runs if not r.communicates], lambda rows: [0] * len(rows))
    for group, (_, mean, _, _) in silent.items():
        ax.axhline(mean[-1], label=f"{names[group]}, final (no traffic)", **_style(group, colours[group]))
    spans = [x for x, *_ in curves.values() if len(x) and x[0] > 0]
    if spans and max(float(x[-1]) for x in spans) / min(float(x[0]) for x in spans) > 50:
        ax.set_xscale("log")
    ax.set_xlabel("MB communicated, up + down, cumulative")
    ax.set_ylabel("dev accuracy")
    finish(fig, ax, PLOT_TRAFFIC, f"{task} dev accuracy against traffic ({band})")

    # 3. final accuracy per rank tier: the methods and the local reference, a bar per rank
    tiers = tier_table(runs)
    shown = [g for g in colours if not is_reference(g) or g == LOCAL]
    accuracy = tiers["final_accuracy_mean"].unstack("rank").reindex(shown)
    spread = tiers["final_accuracy_std"].unstack("rank").reindex(shown).fillna(0.0)
    ranks = list(accuracy.columns)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(shown) + 4), 4.5), dpi=120)
    width = 0.8 / max(1, len(ranks))
    for j, rank in enumerate(ranks):
        present = accuracy[rank].notna().to_numpy()
        ax.bar(
            (np.arange(len(shown)) - 0.4 + width * (j + 0.5))[present],
            accuracy[rank][present],
            width,
            yerr=spread[rank][present] if seeds > 1 else None,
            capsize=2,
            color=plt.cm.viridis(0.15 + 0.7 * j / max(1, len(ranks) - 1)),  # ranks light to dark, not hues
            label=f"rank {rank}",
        )
    central = [evaluated_rows(r.rows)[-1]["accuracy"] for r in runs if r.group == CENTRAL]
    if central:  # its mean final accuracy
        ax.axhline(np.mean(central), label=label(CENTRAL), **_style(CENTRAL, colours[CENTRAL]))
    ax.set_xticks(range(len(shown)), [label(g) for g in shown], rotation=15, fontsize=8)
    ax.set_ylabel("final dev accuracy")
    low = np.nanmin([baseline or 1.0, *accuracy.to_numpy().ravel()])
    ax.set_ylim(max(0.0, low - 0.05), None)
    error_note = " (mean; ticks: ± std over seeds)" if seeds > 1 else ""
    finish(fig, ax, PLOT_TIERS, f"{task} final dev accuracy of the adapter each rank tier holds{error_note}")
    return paths


def _plot_by_seed(
    runs: Sequence[SeedRun], folder: Path, colours: dict[str, int], baseline: float | None, task: str
) -> Path:
    """`PLOT_SEEDS`: dev accuracy per evaluated round, a panel per seed and a line per group, with a
    cross on each round whose global model gave every dev row one class (`answers.one_class`; not for
    the local reference, whose rows are means over clients)."""
    import matplotlib.pyplot as plt

    seeds = _seeds(runs)
    fig, axes = plt.subplots(
        1, len(seeds), figsize=(4.5 * len(seeds) + 2.5, 4.5), dpi=120, sharey=True, squeeze=False
    )
    for ax, seed in zip(axes[0], seeds, strict=True):
        for run in sorted((r for r in runs if r.seed == seed), key=lambda r: group_order(r.group)):
            scored = evaluated_rows(run.rows)
            ax.plot([r["round"] for r in scored], [r["accuracy"] for r in scored], label=label(run.group),
                    **_style(run.group, colours[run.group]))  # fmt: skip
            majority = run.majority_baseline
            dead = [r for r in scored if run.group != LOCAL and answers.one_class(r, majority)[0]]
            if dead:
                ax.plot([r["round"] for r in dead], [r["accuracy"] for r in dead], linestyle="none",
                        marker="x", markersize=8, color="black", label="every dev row one class")  # fmt: skip
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle=":", linewidth=1,
                       label=f"majority class ({baseline:.3f})")  # fmt: skip
    title = f"{task} dev accuracy per round, seed by seed (the same partition and clients a panel)"
    return _save_seed_panels(fig, axes[0], seeds, "dev accuracy", title, folder / PLOT_SEEDS)


def _save_seed_panels(fig, axes, seeds: Sequence[int], ylabel: str, title: str, path: Path) -> Path:
    """Finish a row of per-seed panels (titles, round axes, one legend beside them, each label once in
    the order first drawn) and save it to `path`."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    legend: dict[str, Any] = {}
    for ax, seed in zip(axes, seeds, strict=True):
        ax.set_title(f"seed {seed}", fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    axes[0].set_ylabel(ylabel)
    fig.legend(legend.values(), legend.keys(), loc="upper left", bbox_to_anchor=(0.995, 0.92), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.995, 1))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def instrument_frame(runs: Sequence[SeedRun]) -> pd.DataFrame:
    """The methods' per-round instruments (`aggregation.instruments`), one row per run and round:
    `group`, `seed`, `round`, `rel_error` (the aggregate against the exact product mean) and one column
    per rank block, `block <lo-hi>` (its share of the update's energy, mean over the adapted weights), in
    the blocks' order. The references are left out (one client: nothing to aggregate), and so are rounds
    without instruments (a failed round, a run made before they existed). Empty where none has any."""
    records = []
    for run in runs:
        if run.reference:
            continue
        for row in run.rows:
            figures = row.get("instruments")
            if not figures:
                continue
            blocks = {f"block {b}": share for b, share in (figures.get("block_energy") or {}).items()}
            where = {"group": run.group, "seed": run.seed, "round": row["round"]}
            records.append({**where, "rel_error": figures.get("rel_error"), **blocks})
    return pd.DataFrame.from_records(records)


def plot_mechanism(runs: Sequence[SeedRun], folder: Path, settings: dict[str, Any]) -> list[Path]:
    """The mechanism behind the accuracy, where the runs logged their instruments: the relative error of
    each method's aggregate against the exact product mean by round (`PLOT_BIAS`; mean over seeds, band
    min-max), and each rank block's share of the global update's energy by round, a panel per method
    (`PLOT_BLOCKS`; mean over seeds): rank collapse shows as the lowest block taking everything."""
    frame = instrument_frame(runs)
    if frame.empty:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    task = str(settings.get("task", "")).upper()
    groups = sorted(frame["group"].unique(), key=group_order)
    seeds = frame["seed"].nunique()
    band = "mean; band: min-max over seeds" if seeds > 1 else "one seed"
    names = seed_labels([run for run in runs if run.group in set(groups)])
    paths = []

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    for i, group in enumerate(groups):
        error = frame[frame["group"] == group].groupby("round")["rel_error"]
        error = error.agg(["mean", "min", "max"]).dropna()
        style = _style(group, i)
        ax.plot(error.index, error["mean"], label=names[group], **style)
        if seeds > 1:
            ax.fill_between(error.index, error["min"], error["max"], color=style["color"], alpha=0.12)
    if (frame["rel_error"].dropna() > 0).all() and frame["rel_error"].max() > 20 * frame["rel_error"].min():
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("relative error vs the exact product mean")
    ax.set_title(f"{task}: each method's aggregate against the exact mean of the clients' products ({band})",
                 fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(folder / PLOT_BIAS)
    plt.close(fig)
    paths.append(folder / PLOT_BIAS)

    blocks = [c for c in frame.columns if c.startswith("block ")]
    columns = min(4, len(groups))
    rows = -(-len(groups) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns + 1.6, 2.8 * rows + 0.6), dpi=120, sharex=True, sharey=True,
        squeeze=False,
    )  # fmt: skip
    colours = [plt.cm.viridis(0.15 + 0.7 * j / max(1, len(blocks) - 1)) for j in range(len(blocks))]
    for ax, group in zip(axes.flat, groups, strict=False):
        shares = frame[frame["group"] == group].groupby("round")[blocks].mean().fillna(0.0)
        ax.stackplot(shares.index, shares.T.to_numpy(), colors=colours, labels=[b[6:] for b in blocks])
        ax.set_title(names[group], fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("share of energy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], title="rank block", loc="center right", fontsize=8)
    over = "mean over seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"{task}: energy of the global update per rank block, by round ({over})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (3.2 * columns + 1.6), 1))
    fig.savefig(folder / PLOT_BLOCKS)
    plt.close(fig)
    paths.append(folder / PLOT_BLOCKS)
    return paths



def plot_features(runs: Sequence[SeedRun], folder: Path, settings: dict[str, Any]) -> list[Path]:
    """`PLOT_FEATURES`, where any run recorded it: by evaluated round, how much the last layer's features
    vary over the dev rows, a panel per seed and a line per group (log scale; the local reference, whose
    rows are means over clients, left out). A rule whose encoder maps every row to one vector falls
    under `FLAT_FEATURES`, the dotted line, before or as its answers become one class."""
    from hlora.evaluation import FLAT_FEATURES

    curves: list[tuple[SeedRun, list[tuple[int, float]]]] = []
    for run in runs:
        if run.group == LOCAL:
            continue
        points = [(r["round"], last_layer_variation(r)) for r in evaluated_rows(run.rows)]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            curves.append((run, points))
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = str(settings.get("task", "")).upper()
    colours = {g: i for i, g in enumerate(sorted({r.group for r in runs}, key=group_order))}
    seeds = sorted({run.seed for run, _ in curves})
    fig, axes = plt.subplots(
        1, len(seeds), figsize=(4.5 * len(seeds) + 2.5, 4.5), dpi=120, sharey=True, squeeze=False
    )
    for ax, seed in zip(axes[0], seeds, strict=True):
        shown = sorted((c for c in curves if c[0].seed == seed), key=lambda c: group_order(c[0].group))
        for run, points in shown:
            x, y = zip(*points, strict=True)
            ax.plot(x, np.maximum(y, 1e-12), label=label(run.group), **_style(run.group, colours[run.group]))
        ax.axhline(FLAT_FEATURES, color="grey", linestyle=":", linewidth=1,
                   label=f"flat: every row one vector (< {FLAT_FEATURES:g})")  # fmt: skip
        ax.set_yscale("log")
    ylabel = "share of the last layer's features that varies over the rows"
    title = f"{task}: does the global model's encoder still tell the dev rows apart? Seed by seed"
    return [_save_seed_panels(fig, axes[0], seeds, ylabel, title, folder / PLOT_FEATURES)]
