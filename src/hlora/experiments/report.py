"""Tables and charts of a comparison, from its run directories alone (`hlora report`).

Each complete run directory under `RESULTS/runs/` (`<name>-s<seed>`, with a `summary.json`) is read back
from its `metrics.jsonl`. Runs of one name form a group (a row of the tables, a line of the charts);
the local reference's runs (`local-c<k>`) of one seed are first averaged over clients, round by round,
so that a seed of `local` is the mean client training alone. Statistics over seeds are the mean and the
sample standard deviation (none with one seed).
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hlora.experiments.compare import CENTRAL, LOCAL, RUNS_DIR
from hlora.federation.metrics import evaluated_rows
from hlora.rundir import CONFIG_FILE, SUMMARY_FILE, read_metrics, write_text_atomic

SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
PAIRED_CSV = "paired.csv"
PLOT_ROUNDS = "accuracy_by_round.png"
PLOT_TRAFFIC = "accuracy_by_traffic.png"
PLOT_TIERS = "tier_accuracy.png"
TARGET_SHARE = 0.95  # default target: this share of the centralised reference's mean final accuracy
_METHOD_ORDER = ("hlora", "flexlora", "zeropad", "flora", "ffa", "fedit")
_DIR = re.compile(r"(?P<name>.+)-s(?P<seed>-?\d+)")


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
    return group in (CENTRAL, LOCAL) or re.fullmatch(r"fedit-r\d+", group) is not None


def group_order(group: str) -> tuple[int, int, str]:
    """Methods first (HLoRA, its dense twin, the baselines, the peers), then the references."""
    if group in _METHOD_ORDER:
        return (0, _METHOD_ORDER.index(group), group)
    if not is_reference(group):
        return (1, 0, group)
    if group == CENTRAL:
        return (2, 0, group)
    if group == LOCAL:
        return (4, 0, group)
    return (3, int(group.removeprefix("fedit-r")), group)


def label(group: str) -> str:
    """How a group is named in tables and legends."""
    if group == CENTRAL:
        return "centralised (upper ref.)"
    if group == LOCAL:
        return "local alone (lower ref.)"
    if is_reference(group):
        return f"FedIT r={group.removeprefix('fedit-r')} (ref.)"
    return group


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
    import json

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


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean and the sample standard deviation (ddof 1; None with fewer than two values)."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return None, None
    return float(np.mean(clean)), float(np.std(clean, ddof=1)) if len(clean) > 1 else None


def rounds_to_target(rows: Sequence[dict[str, Any]], target: float) -> int | None:
    """The first evaluated round whose dev accuracy reaches `target`; None if none does."""
    return next((r["round"] for r in evaluated_rows(rows) if r["accuracy"] >= target), None)


def seed_figures(run: SeedRun, target: float | None) -> dict[str, Any]:
    """The figures of one seed of one group."""
    rows = run.rows
    scored = evaluated_rows(rows)  # the last round is always among them
    final = scored[-1]
    tier_acc = final.get("tier_accuracy") or {}
    # every tier scored at the end, and every tier that trained in some round (a round samples a few)
    ranks = sorted({*tier_acc, *(rank for row in rows for rank in row.get("tier_step_s", {}))}, key=int)
    reached = rounds_to_target(rows, target) if target is not None else None
    figures: dict[str, Any] = {
        "rounds": len(rows),
        "final_accuracy": final["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in scored),
        "final_f1": final.get("f1"),
        "best_f1": max(r["f1"] for r in scored) if "f1" in final else None,
        "rounds_to_target": reached,
        "wall_to_target_s": sum(r["wall_s"] for r in rows if r["round"] <= reached) if reached else None,
        "uplink_mb": sum(r["uplink_bytes"] for r in rows) / 1e6 if run.communicates else None,
        "downlink_mb": sum(r["downlink_bytes"] for r in rows) / 1e6 if run.communicates else None,
        "wall_s": sum(r["wall_s"] for r in rows),
        "aggregate_s": sum(r.get("aggregate_s", 0.0) for r in rows) if run.communicates else None,
        "tiers": {},
    }
    for rank in ranks:
        steps = [r["tier_step_s"][rank] for r in rows if rank in r.get("tier_step_s", {})]
        peaks = [r["tier_peak_bytes"][rank] for r in rows if rank in r.get("tier_peak_bytes", {})]
        states = [r["tier_state_bytes"][rank] for r in rows if rank in r.get("tier_state_bytes", {})]
        figures["tiers"][int(rank)] = {
            # a run that did not score tiers, or a single-rank run: its rank holds the global model
            "final_accuracy": tier_acc.get(rank, final["accuracy"] if len(ranks) == 1 else None),
            "step_s": float(np.mean(steps)) if steps else None,
            "peak_bytes": max(peaks) if peaks else None,
            "state_bytes": max(states) if states else None,
        }
    return figures


_SCALARS = (
    "final_accuracy",
    "best_accuracy",
    "final_f1",
    "best_f1",
    "uplink_mb",
    "downlink_mb",
    "wall_s",
    "aggregate_s",
)


def group_table(runs: Sequence[SeedRun], target: float | None) -> list[dict[str, Any]]:
    """One row per group: `<figure>_mean`, `<figure>_std` over seeds, rounds to target (mean over the
    seeds that reached it, and how many did), and per rank tier the final accuracy (mean, std), step time
    (mean) and peak memory (largest)."""
    groups: dict[str, list[SeedRun]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    table = []
    for group in sorted(groups, key=group_order):
        figures = [seed_figures(r, target) for r in groups[group]]
        row: dict[str, Any] = {
            "group": group,
            "reference": is_reference(group),
            "seeds": len(figures),
            "clients": groups[group][0].clients,
            "rounds": min(f["rounds"] for f in figures),
        }
        for key in _SCALARS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([f[key] for f in figures])
        reached = [f["rounds_to_target"] for f in figures if f["rounds_to_target"] is not None]
        row["reached_target"] = len(reached) if target is not None else None
        row["rounds_to_target_mean"] = float(np.mean(reached)) if reached else None
        walls = [f["wall_to_target_s"] for f in figures if f["wall_to_target_s"] is not None]
        row["wall_to_target_s_mean"] = float(np.mean(walls)) if walls else None
        ranks = sorted({rank for f in figures for rank in f["tiers"]})
        row["tiers"] = {}
        for rank in ranks:
            tiers = [f["tiers"][rank] for f in figures if rank in f["tiers"]]
            acc_mean, acc_std = mean_std([t["final_accuracy"] for t in tiers])
            steps = [t["step_s"] for t in tiers if t["step_s"] is not None]
            peaks = [t["peak_bytes"] for t in tiers if t["peak_bytes"] is not None]
            states = [t["state_bytes"] for t in tiers if t["state_bytes"] is not None]
            row["tiers"][rank] = {
                "final_accuracy_mean": acc_mean,
                "final_accuracy_std": acc_std,
                "step_ms": 1e3 * float(np.mean(steps)) if steps else None,
                "peak_mib": max(peaks) / 2**20 if peaks else None,
                "state_mib": max(states) / 2**20 if states else None,
            }
        table.append(row)
    return table


def default_target(table: Sequence[dict[str, Any]]) -> float | None:
    """`TARGET_SHARE` of the centralised reference's mean final accuracy; None without that reference."""
    central = next((row for row in table if row["group"] == CENTRAL), None)
    return None if central is None else TARGET_SHARE * central["final_accuracy_mean"]


SUBJECT = "hlora"  # the method the paired table compares with every other group


def paired_table(
    runs: Sequence[SeedRun], target: float | None, subject: str = SUBJECT
) -> list[dict[str, Any]]:
    """`subject` against every other group, seed by seed on the seeds both ran (the same partition, tiers
    and sampled clients): differences are `subject` minus the other, so positive means `subject` ahead.

    Per group: how many seeds pair; the final and the best dev accuracy difference (mean, std over the
    seeds) and in how many seeds `subject` ends ahead; the difference of the mean dev accuracy over the
    rounds both ran (the area under the accuracy curve per round: a convergence figure that needs no
    target); rounds to the target of each (mean over the seeds where both reach it); and the other's
    total traffic and aggregation time as multiples of `subject`'s. Empty without `subject` runs."""
    by_key = {(r.group, r.seed): r for r in runs}
    figures_of = {key: seed_figures(run, target) for key, run in by_key.items()}  # each run's once
    mine = {r.seed: r for r in runs if r.group == subject}
    table = []
    for group in sorted({r.group for r in runs if r.group != subject}, key=group_order):
        seeds = [seed for seed in sorted(mine) if (group, seed) in by_key]
        if not seeds:
            continue
        pairs = [(mine[seed], by_key[(group, seed)]) for seed in seeds]
        figures = [(figures_of[(subject, seed)], figures_of[(group, seed)]) for seed in seeds]
        row: dict[str, Any] = {"group": group, "reference": is_reference(group), "seeds": len(seeds)}
        for key in ("final_accuracy", "best_accuracy"):
            row[f"{key}_diff_mean"], row[f"{key}_diff_std"] = mean_std([a[key] - b[key] for a, b in figures])
        row["final_accuracy_p"] = paired_p([a["final_accuracy"] - b["final_accuracy"] for a, b in figures])
        row["ahead"] = sum(a["final_accuracy"] > b["final_accuracy"] for a, b in figures)
        row["behind"] = sum(a["final_accuracy"] < b["final_accuracy"] for a, b in figures)
        curve = [_mean_accuracy_diff(a.rows, b.rows) for a, b in pairs]
        row["mean_accuracy_diff_mean"], row["mean_accuracy_diff_std"] = mean_std(curve)
        row["mean_accuracy_p"] = paired_p(curve)
        both = [(a["rounds_to_target"], b["rounds_to_target"]) for a, b in figures]
        both = [(x, y) for x, y in both if x is not None and y is not None]
        row["both_reached_target"] = len(both) if target is not None else None
        row["rounds_to_target_subject"] = float(np.mean([x for x, _ in both])) if both else None
        row["rounds_to_target_other"] = float(np.mean([y for _, y in both])) if both else None
        traffic = [(a["uplink_mb"] + a["downlink_mb"], b["uplink_mb"] + b["downlink_mb"])
                   for a, b in figures if b["uplink_mb"] is not None and a["uplink_mb"]]  # fmt: skip
        row["traffic_ratio"] = float(np.mean([y / x for x, y in traffic])) if traffic else None
        agg = [(a["aggregate_s"], b["aggregate_s"]) for a, b in figures if b["aggregate_s"] is not None]
        row["aggregate_ratio"] = float(np.mean([y / x for x, y in agg if x > 0])) if agg else None
        table.append(row)
    return table


def paired_p(diffs: Sequence[float]) -> float | None:
    """The two-sided p-value of the paired t-test on per-seed differences (is their mean zero?); None
    with fewer than two seeds or differences that do not vary (no test to make)."""
    from scipy.stats import ttest_1samp

    if len(diffs) < 2 or np.ptp(diffs) == 0:
        return None
    return float(ttest_1samp(diffs, 0.0).pvalue)


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
    beside them; `target` (default: `TARGET_SHARE` of the centralised final accuracy). Returns the paths
    written. RunDirError when there is no complete run."""
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
    table = group_table(loaded.runs, target)
    paired = paired_table(loaded.runs, target)
    results_dir = Path(results_dir)
    paths = [results_dir / SUMMARY_MD, results_dir / SUMMARY_CSV]
    write_text_atomic(paths[0], markdown(table, loaded, target, target_note, paired))
    write_csv(table, target, paths[1])
    if paired:
        paths.append(results_dir / PAIRED_CSV)
        _write_rows(paired, paths[-1])
    paths += plot_all(loaded.runs, results_dir, loaded.settings)
    return paths


def _pm(mean: float | None, std: float | None, digits: int = 4, signed: bool = False) -> str:
    if mean is None:
        return "-"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: float | None) -> str:
    """Megabytes with three significant figures below 100 (tiny test runs send kilobytes)."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _cells(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(
    table: Sequence[dict[str, Any]],
    loaded: Loaded,
    target: float | None,
    target_note: str,
    paired: Sequence[dict[str, Any]] = (),
) -> str:
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
    lines += [
        f"Target accuracy {target_text} ({target_note}).",
        "",
        _cells(
            "method", "seeds", "final acc", "best acc", "final F1", "best F1", "rounds to target",
            "MB up", "MB down", "wall s", "aggregation s",
        ),
        _cells(*["---"] * 11),
    ]  # fmt: skip
    for row in table:
        to_target = "-"
        if row["reached_target"] is not None:
            to_target = f"{_num(row['rounds_to_target_mean'])} ({row['reached_target']}/{row['seeds']})"
            if row["wall_to_target_s_mean"] is not None:
                to_target += f", {row['wall_to_target_s_mean']:.0f} s"
        lines.append(
            _cells(
                label(row["group"]),
                row["seeds"],
                *[_pm(row[f"{k}_mean"], row[f"{k}_std"]) for k in _SCALARS[:4]],
                to_target,
                _mb(row["uplink_mb_mean"]),
                _mb(row["downlink_mb_mean"]),
                _num(row["wall_s_mean"]),
                _num(row["aggregate_s_mean"], 3),
            )
        )
    lines += [
        "",
        "Per rank tier: the dev accuracy of the adapter a client of that rank holds at the end (the "
        "global one cut to its rank), the mean seconds per local step, the largest peak memory of "
        "local training, and of it the trainable tensors with their gradients and optimizer state (the "
        "part that grows with the rank; the rest is the base model and the activations of the client's "
        "longest batch).",
        "",
        _cells("method", "rank", "final acc", "ms per step", "peak MiB", "trainable state MiB"),
        _cells(*["---"] * 6),
    ]
    for row in table:
        for rank, tier in row["tiers"].items():
            lines.append(
                _cells(
                    label(row["group"]),
                    rank,
                    _pm(tier["final_accuracy_mean"], tier["final_accuracy_std"]),
                    _num(tier["step_ms"]),
                    _num(tier["peak_mib"]),
                    _num(tier["state_mib"], 2),
                )
            )
    local = next((row for row in table if row["group"] == LOCAL), None)
    lines += [
        "",
        "Mean ± sample standard deviation over seeds (no ± with one seed). Rounds to target: the first "
        "round whose dev accuracy reaches the target, mean over the seeds that reach it (how many do, of "
        "all), and the wall time of the rounds up to it. MB: total bytes of the tensors sent over the "
        "run / 1e6. Wall s: the rounds' wall time (for the local reference, summed over its clients' "
        "runs). Aggregation s: the server's aggregation time summed over the rounds.",
        "",
        "References: centralised = one client holding all the training data at the bank rank, the same "
        "rounds and local epochs (or steps) a round; FedIT r=... = every client at that one rank (the "
        "smallest and the largest tier); local alone = each client training on its own data at its own "
        "rank with no federation, the mean over "
        + (f"{local['clients']} clients" if local else "the clients")
        + " (per tier: over that tier's clients). The centralised and the local runs exchange nothing, "
        "so they have no MB or aggregation time.",
    ]
    if loaded.central_settings:
        lines[-1] += " The centralised reference has settings of its own: " + "; ".join(
            loaded.central_settings
        ) + "."
    if paired:
        lines += paired_lines(paired, target, evaluated=bool(cadence))
    if loaded.incomplete:
        lines += ["", f"Not complete, left out: {', '.join(loaded.incomplete)}."]
    lines += provenance_lines(loaded.environments)
    return "\n".join(lines) + "\n"


def paired_lines(
    paired: Sequence[dict[str, Any]], target: float | None, evaluated: bool = False
) -> list[str]:
    """The paired table; `evaluated`: some runs skipped evaluations (`eval.every`), and the text says
    that the mean accuracy is over the rounds both evaluated."""
    both = "both evaluated" if evaluated else "both ran"
    lines = [
        "",
        f"## {SUBJECT} against each method and reference, seed by seed",
        "",
        f"Differences are {SUBJECT} minus the other on the same seeds (same partition, tiers and sampled "
        f"clients): positive means {SUBJECT} is ahead; mean ± sample standard deviation over the seeds, "
        "and p, the two-sided p-value of a paired t-test over the seeds that the mean difference is zero "
        "(with 3 seeds only a large, steady difference gets p below 0.05; the dev set is the same for "
        "both, so its sampling noise is not in p). Mean accuracy: the dev accuracy averaged over the "
        f"rounds {both} (a convergence figure that needs no target). Traffic and aggregation: the "
        f"other's totals as multiples of {SUBJECT}'s (above 1: {SUBJECT} spends less).",
        "",
        _cells(
            "against", "seeds", "final acc diff", f"{SUBJECT} ahead / behind", "best acc diff",
            "mean acc diff", f"rounds to target ({SUBJECT} vs other)", "traffic x", "aggregation x",
        ),
        _cells(*["---"] * 9),
    ]  # fmt: skip
    for row in paired:
        to_target = "-"
        if row["both_reached_target"]:
            to_target = (
                f"{row['rounds_to_target_subject']:.1f} vs {row['rounds_to_target_other']:.1f} "
                f"({row['both_reached_target']}/{row['seeds']})"
            )
        elif target is not None:
            to_target = f"not both (0/{row['seeds']})"
        lines.append(
            _cells(
                label(row["group"]),
                row["seeds"],
                _pm(row["final_accuracy_diff_mean"], row["final_accuracy_diff_std"], signed=True)
                + _p(row["final_accuracy_p"]),
                f"{row['ahead']} / {row['behind']}",
                _pm(row["best_accuracy_diff_mean"], row["best_accuracy_diff_std"], signed=True),
                _pm(row["mean_accuracy_diff_mean"], row["mean_accuracy_diff_std"], signed=True)
                + _p(row["mean_accuracy_p"]),
                to_target,
                _num(row["traffic_ratio"], 2),
                _num(row["aggregate_ratio"], 1),
            )
        )
    return lines


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


def write_csv(table: Sequence[dict[str, Any]], target: float | None, path: Path) -> None:
    """One row per group; the per-tier figures as `tier<r>_...` columns (empty where a group lacks r)."""
    ranks = sorted({rank for row in table for rank in row["tiers"]})
    scalar = [f"{k}_{stat}" for k in _SCALARS for stat in ("mean", "std")]
    tier_keys = ("final_accuracy_mean", "final_accuracy_std", "step_ms", "peak_mib", "state_mib")
    header = [
        "group",
        "reference",
        "seeds",
        "clients",
        "rounds",
        *scalar,
        "target_accuracy",
        "reached_target",
        "rounds_to_target_mean",
        "wall_to_target_s_mean",
        *[f"tier{r}_{k}" for r in ranks for k in tier_keys],
    ]
    lines = []
    for row in table:
        out = {k: row.get(k) for k in header if not k.startswith("tier")}
        out["target_accuracy"] = target
        for r in ranks:
            for k in tier_keys:
                out[f"tier{r}_{k}"] = row["tiers"].get(r, {}).get(k)
        lines.append(out)
    _write_rows(lines, path, header)


def _write_rows(rows: Sequence[dict[str, Any]], path: Path, header: Sequence[str] | None = None) -> None:
    """A CSV of `rows` (columns: `header`, default the first row's keys; None as an empty cell),
    written beside `path` and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(header or (rows[0] if rows else [])))
        writer.writeheader()
        for out in rows:
            writer.writerow({k: "" if v is None else v for k, v in out.items()})
    tmp.replace(path)


# --- charts -------------------------------------------------------------------------------------------


def _curves(runs: Sequence[SeedRun], key) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per group, over the rounds every seed has and evaluated: x (mean over seeds of `key(rows)`, a value
    per row: a cumulative one counts the rounds between too), and the mean, minimum and maximum dev
    accuracy over seeds."""
    groups: dict[str, list[SeedRun]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    curves = {}
    for group in sorted(groups, key=group_order):
        n = min(len(r.rows) for r in groups[group])
        seeds = [r.rows[:n] for r in groups[group]]
        both = _common_rounds(seeds)
        kept = [(rows, [i for i, row in enumerate(rows) if row["round"] in both]) for rows in seeds]
        acc = np.array([[rows[i]["accuracy"] for i in idx] for rows, idx in kept])
        x = np.mean([np.asarray(key(rows))[idx] for rows, idx in kept], axis=0)
        curves[group] = (x, acc.mean(axis=0), acc.min(axis=0), acc.max(axis=0))
    return curves


# matplotlib's default cycle without its grey (C7), which the majority-class line uses
_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "black", "navy", "darkred")


def _style(group: str, index: int) -> dict[str, Any]:
    colour = _COLOURS[index % len(_COLOURS)]
    if is_reference(group):
        return {"linestyle": "--", "linewidth": 1.3, "color": colour}
    return {"linestyle": "-", "linewidth": 2.0, "marker": "o", "markersize": 3.5, "color": colour}


def plot_all(runs: Sequence[SeedRun], folder: Path, settings: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    task = str(settings.get("task", "")).upper()
    baseline = next((r.majority_baseline for r in runs if r.majority_baseline is not None), None)
    colours = {g: i for i, g in enumerate(sorted({r.group for r in runs}, key=group_order))}
    seeds = len(_seeds(runs))
    band = "mean; band: min-max over seeds" if seeds > 1 else "one seed"
    paths = []

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
    for group, (x, mean, low, high) in _curves(runs, lambda rows: [r["round"] for r in rows]).items():
        style = _style(group, colours[group])
        ax.plot(x, mean, label=label(group), **style)
        if seeds > 1 and not is_reference(group):  # references: the mean line alone, not to crowd the chart
            ax.fill_between(x, low, high, color=style["color"], alpha=0.12)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("dev accuracy")
    finish(fig, ax, PLOT_ROUNDS, f"{task} dev accuracy per round ({band})")

    # 2. accuracy against traffic
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    talking = [r for r in runs if r.communicates]
    curves = _curves(
        talking, lambda rows: np.cumsum([(r["uplink_bytes"] + r["downlink_bytes"]) / 1e6 for r in rows])
    )
    for group, (x, mean, low, high) in curves.items():
        style = _style(group, colours[group])
        ax.plot(x, mean, label=label(group), **style)
        if seeds > 1 and not is_reference(group):
            ax.fill_between(x, low, high, color=style["color"], alpha=0.12)
    for group, (_, mean, _, _) in _curves(
        [r for r in runs if not r.communicates], lambda rows: [0] * len(rows)
    ).items():
        ax.axhline(mean[-1], label=f"{label(group)}, final (no traffic)", **_style(group, colours[group]))
    spans = [x for x, *_ in curves.values() if len(x) and x[0] > 0]
    if spans and max(float(x[-1]) for x in spans) / min(float(x[0]) for x in spans) > 50:
        ax.set_xscale("log")
    ax.set_xlabel("MB communicated, up + down, cumulative")
    ax.set_ylabel("dev accuracy")
    finish(fig, ax, PLOT_TRAFFIC, f"{task} dev accuracy against traffic ({band})")

    # 3. final accuracy per rank tier, grouped bars
    table = group_table(runs, None)
    shown = [row for row in table if not is_reference(row["group"]) or row["group"] == LOCAL]
    ranks = sorted({rank for row in shown for rank in row["tiers"]})
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(shown) + 4), 4.5), dpi=120)
    width = 0.8 / max(1, len(ranks))
    for j, rank in enumerate(ranks):
        heights, errors, xs = [], [], []
        for i, row in enumerate(shown):
            tier = row["tiers"].get(rank)
            if tier is None or tier["final_accuracy_mean"] is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            heights.append(tier["final_accuracy_mean"])
            errors.append(tier["final_accuracy_std"] or 0.0)
        colour = plt.cm.viridis(
            0.15 + 0.7 * j / max(1, len(ranks) - 1)
        )  # ranks: light to dark, not methods' hues
        ax.bar(
            xs,
            heights,
            width,
            yerr=errors if seeds > 1 else None,
            capsize=2,
            color=colour,
            label=f"rank {rank}",
        )
    central = next((row for row in table if row["group"] == CENTRAL), None)
    if central is not None:
        ax.axhline(central["final_accuracy_mean"], label=label(CENTRAL), **_style(CENTRAL, colours[CENTRAL]))
    ax.set_xticks(range(len(shown)), [label(row["group"]) for row in shown], rotation=15, fontsize=8)
    ax.set_ylabel("final dev accuracy")
    low = min(
        [baseline or 1.0]
        + [
            t["final_accuracy_mean"]
            for row in shown
            for t in row["tiers"].values()
            if t["final_accuracy_mean"] is not None
        ]
    )
    ax.set_ylim(max(0.0, low - 0.05), None)
    error_note = " (mean; ticks: ± std over seeds)" if seeds > 1 else ""
    finish(fig, ax, PLOT_TIERS, f"{task} final dev accuracy of the adapter each rank tier holds{error_note}")
    return paths
