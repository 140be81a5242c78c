"""The paper regime's runs (BENCHMARKS.md, "the paper regime"), queued and kept going, and their records
collected into a checkout.

Every entry is one `hlora compare` of one method (or the references) and one seed, so it resumes from
its checkpoint when started again and skips what is complete: run this again after an interruption (a
session's end) and it goes on where it stopped. `--workers` processes of one torch thread each take the
entries in order, each taking the next as it finishes (on 2 cores: 2 workers, ~100 min a run).

    # in a worktree of the commit the runs are to record, beside ../shared:
    .venv/bin/python scripts/paper_regime.py run --logs ../runs-logs &     # or --dry-run: the queue
    # later, from the checkout that commits them (copies each finished run's record, then hlora report):
    .venv/bin/python scripts/paper_regime.py collect ../runs
    # where each entry stands (done, rounds checkpointed so far, or to run):
    .venv/bin/python scripts/paper_regime.py status ../runs
    # BENCHMARKS.md's per-rule rows (accuracy by round, tiers, instruments) of committed runs:
    .venv/bin/python scripts/paper_regime.py rows results/mrpc-paper-a5/runs/*-s1
    # the same of runs still under way in the worktree (each marked with the last round it recorded):
    .venv/bin/python scripts/paper_regime.py rows ../runs/results/qqp-paper/runs/*-s0
    # which client weighed most in rounds 15-17, and what the round did (the seed-1 shock, BENCHMARKS.md):
    .venv/bin/python scripts/paper_regime.py clients results/mrpc-paper-a5/runs/*-s1 --rounds 15-17
    # per seed, without training: the rounds a single client weighs most in (seed 1's client 30, elsewhere)
    .venv/bin/python scripts/paper_regime.py weights configs/experiments/mrpc-paper-a5.toml --seeds 0-9

The order puts first what the verdicts need most: seed 0 of every rule, seeds 1 and 2 of HLoRA and the
four rules it is compared with, then of the rules published since, then the references (seed 0), the IID
control and the data-size variant (HLoRA and zero-padding, seed 0) and QQP (HLoRA, zero-padding and the
best new rule on MRPC, `QQP_RULE`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from hlora.experiments.answers import one_class_runs
from hlora.experiments.report import SeedRun, group_order
from hlora.rundir import METRICS_FILE, SUMMARY_FILE, read_metrics

ROOT = Path(__file__).resolve().parents[1]
A5 = "configs/experiments/mrpc-paper-a5.toml"
RIVALS = ("hlora", "zeropad", "flexlora", "ffa", "flora")
NEW_RULES = ("hlora_ef", "rablock", "fedplora")
# the references' settings of BENCHMARKS.md: 5 local clients, the centralised one at its own lr and epochs
REFERENCES = ("--local-clients", "5", "--central-set", "train.lr=3e-4",
              "--central-set", "train.local_epochs=0.2")  # fmt: skip
# QQP's "best new rule": the new rule with the highest final and mean-over-rounds MRPC dev accuracy. Chosen
# at seed 0 (HLoRA-EF 0.762 / HLoRA -0.05 points; FedPLoRA 0.757 / -0.6; raBlock 0.735 / -0.8) and kept over
# seeds 0-2 (results/mrpc-paper-a5/summary.md: HLoRA-EF 0.739 final, +0.3 points on HLoRA over the rounds;
# raBlock 0.721, -0.3; FedPLoRA 0.713, -1.9).
QQP_RULE = "hlora_ef"
RECORD = ("config.toml", "metrics.jsonl", "partition.csv", "summary.json")  # what a run commits


def queue() -> list[tuple[str, ...]]:
    """Each entry: the arguments of one `hlora compare`."""
    one = [(A5, "--methods", m, "--seeds", "0", "--no-references") for m in RIVALS + NEW_RULES]
    for seed in ("1", "2"):
        one += [(A5, "--methods", m, "--seeds", seed, "--no-references") for m in RIVALS + NEW_RULES]
    one.append((A5, "--methods", "fedit", "--seeds", "0", *REFERENCES))
    for config, methods in (
        ("configs/experiments/mrpc-paper-iid.toml", ("hlora", "zeropad")),
        ("configs/experiments/mrpc-paper-datasize.toml", ("hlora", "zeropad")),
        ("configs/experiments/qqp-paper.toml", ("hlora", "zeropad", QQP_RULE)),
    ):
        one += [(config, "--methods", m, "--seeds", "0", "--no-references") for m in methods]
    return one


def entry_runs(entry: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The run directories (glob patterns under `results/<config name>/runs/`) one entry writes."""
    method, seed = entry[2], entry[4]
    if "--no-references" in entry:
        return [f"{method}-s{seed}"]
    return [f"{method}-r*-s{seed}", f"central-s{seed}", f"local-c*-s{seed}"]  # the rule at both ends, refs


def expected_runs(entry: tuple[str, ...]) -> int:
    """How many run directories a complete entry has: one, or for the references the rule at its two
    ranks, the centralised run and each local client's."""
    if "--no-references" in entry:
        return 1
    return 3 + int(entry[entry.index("--local-clients") + 1])


def status(root: Path = ROOT) -> list[tuple[str, str]]:
    """Each entry of the queue, in order, with where its runs stand under `root`: `done`, `N rounds`
    (checkpointed so far, summed over its runs; for the references, how many of their runs are done
    first), or `to run`."""
    found = []
    for entry in queue():
        folder = root / "results" / Path(entry[0]).stem / "runs"
        dirs = [d for pattern in entry_runs(entry) for d in sorted(folder.glob(pattern)) if d.is_dir()]
        complete = [d for d in dirs if (d / "summary.json").is_file()]
        if len(complete) == expected_runs(entry):
            state = "done"
        elif dirs:
            rounds = sum(len(read_metrics(d)) for d in dirs if (d / "metrics.jsonl").is_file())
            state = f"{rounds} rounds"
            if expected_runs(entry) > 1:
                state = f"{len(complete)} of {expected_runs(entry)} runs done, {state}"
        else:
            state = "to run"
        found.append((f"{Path(entry[0]).stem} {entry[2]} seed {entry[4]}", state))
    return found


def run(args: argparse.Namespace) -> None:
    entries = queue()
    if args.dry_run:
        for entry in entries:
            print("hlora compare", " ".join(entry), "-q")
        return
    args.logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not entries:
                    return
                entry = entries.pop(0)
            name = f"{Path(entry[0]).stem}_{entry[2]}_s{entry[4]}"  # mrpc-paper-a5_hlora_s1
            with (args.logs / f"{name}.log").open("a", encoding="utf-8") as log:
                code = subprocess.call([sys.executable, "-m", "hlora", "compare", *entry, "-q"],
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            print(f"{name}: exit {code}", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def collect(source: Path, into: Path = ROOT) -> list[Path]:
    """Copy each complete run's record under `source`/results into `into`/results (this checkout's),
    where it is missing, and rebuild the reports of the comparisons that gained runs; returns the run
    directories collected."""
    gained: set[Path] = set()
    collected = []
    for summary in sorted((source / "results").glob("*/runs/*/summary.json")):
        run_dir = summary.parent
        target = into / "results" / run_dir.relative_to(source / "results")
        if (target / "summary.json").is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in RECORD:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, target / name)
        gained.add(target.parents[1])
        collected.append(target)
        print(f"collected {target}")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for folder in sorted(gained):
        subprocess.check_call([sys.executable, "-m", "hlora", "report", str(folder)], cwd=ROOT, env=env)
    return collected


# how BENCHMARKS.md names each rule in its tables
NAMES = {"hlora": "HLoRA", "zeropad": "zero-padding", "flexlora": "FlexLoRA", "ffa": "FFA-LoRA",
         "flora": "FLoRA", "hlora_ef": "HLoRA-EF", "rablock": "raBlock", "fedplora": "FedPLoRA",
         "fedit": "FedIT"}  # fmt: skip
ROWS_HEADER = (
    "| rule | dev accuracy at rounds 10, 20, ..., 100 | F1 at 100 | best | tiers r2 / r4 / r8 / r16 at 100 | "
    "`0-2` energy at 1, 10, 50, 100 | effective rank at 1, 10, 100 | rel. error at 1, 10, 100 |"
)


def _figures(values: list[Any], digits: int = 3) -> str:
    return ", ".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def row(run_dir: Path) -> tuple[str, str | None]:
    """BENCHMARKS.md's row of one run of the paper regime: its dev accuracy at every evaluated round, F1
    at the last and the best accuracy, the tiers' accuracy at the last, then the instruments at the rounds
    the table reads (the lowest rank block's share of the update's energy, the effective rank, the
    relative error against the exact product mean), and, where its global model gave every dev row one
    class in some evaluated round, a note of how often and from when (`hlora.experiments.answers`).

    A run still under way (no `summary.json` yet) gets its row so far, its name marked with the last round
    it recorded; a run that has evaluated no round yet is a `ValueError` that says so (`rows` names it on
    stderr and prints the others' rows)."""
    rows = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    scored = [r for r in rows if "accuracy" in r]
    if not scored:
        raise ValueError(f"{run_dir}: no evaluated round recorded yet (in {METRICS_FILE})")
    last = scored[-1]
    instruments = {r["round"]: r.get("instruments") or {} for r in rows}

    def at(rounds: tuple[int, ...], read) -> list[Any]:
        return [read(instruments.get(n, {})) for n in rounds]

    tiers = last.get("tier_accuracy") or {}
    name = run_dir.name.rsplit("-s", 1)[0]
    finished = (run_dir / SUMMARY_FILE).is_file()
    cells = [
        NAMES.get(name, name) + ("" if finished else f" (under way: round {rows[-1]['round']})"),
        _figures([r["accuracy"] for r in scored]),
        _figures([last.get("f1")]),
        _figures([max(r["accuracy"] for r in scored)]),
        " / ".join(f"{tiers[k]:.3f}" for k in sorted(tiers, key=int)) or "-",
        _figures(at((1, 10, 50, 100), lambda i: (i.get("block_energy") or {}).get("0-2"))),
        _figures(at((1, 10, 100), lambda i: i.get("effective_rank")), 1),
        _figures(at((1, 10, 100), lambda i: i.get("rel_error"))),
    ]
    summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8")) if finished else {}
    seed = int(run_dir.name.rsplit("-s", 1)[1])
    (dead,) = one_class_runs([SeedRun(name, seed, rows, summary.get("majority_baseline"))])
    note = None
    if dead.one_class:
        since = f", from round {dead.since} to the end" if dead.since is not None else ""
        note = (f"{cells[0]}, seed {seed}: every dev row one class in {dead.one_class} of {dead.evaluated} "
                f"evaluated rounds{since}")  # fmt: skip
    return "| " + " | ".join(cells) + " |", note


CLIENTS_HEADER = (
    "| run | round | clients' loss | global update norm | heaviest client: id, rows, label mix, rank | "
    "its share of the round's weight | its change norm / the round's lower median |"
)


def heaviest_clients(run_dir: Path, first: int, last: int) -> list[str]:
    """One table row per round from `first` to `last` of a run: the mean training loss of the round's
    clients (what the global model they were sent cost them), the norm of the global update after the
    round (`instruments.norm`) and the client with the largest share of the round's aggregation weight
    (its rows over the rows of every aggregated client): its id, rows, rows per class, rank, that share,
    and how many times the round's lower median its change norm was (`client_update_norm`)."""
    with (run_dir / "partition.csv").open(encoding="utf-8", newline="") as f:
        partition = {r["client"]: r for r in csv.DictReader(f)}
    classes = [c for c in next(iter(partition.values())) if c not in ("client", "size", "rank")]
    lines = []
    for row in read_metrics(run_dir):
        if not first <= row["round"] <= last:
            continue
        counted = [str(c) for c in row.get("aggregated_clients") or row["clients"]]
        rows_of = {c: int(partition[c]["size"]) for c in counted}
        heavy = max(counted, key=lambda c: (rows_of[c], -int(c)))
        norms = row.get("client_update_norm") or {}
        ratio = norms[heavy] / statistics.median_low(norms.values()) if heavy in norms else None
        mix = "/".join(partition[heavy][c] for c in classes)
        norm = (row.get("instruments") or {}).get("norm")
        lines.append("| " + " | ".join([
            run_dir.name, str(row["round"]), _figures([row.get("train_loss")], 2), _figures([norm], 2),
            f"{heavy}, {rows_of[heavy]} rows, {mix} ({'/'.join(classes)}), rank {partition[heavy]['rank']}",
            _figures([rows_of[heavy] / sum(rows_of.values())], 2), _figures([ratio], 1),
        ]) + " |")  # fmt: skip
    return lines


WEIGHTS_HEADER = (
    "| seed | largest client: id, rows, label mix, rank | rounds that sample it | rounds in which one client "
    "holds {share:.0%} of the weight or more | a single-class client's largest share: share, id, rows, "
    "rank, round |"
)


def heavy_rounds(config: Path, seed: int, share: float) -> str:
    """One table row (`WEIGHTS_HEADER`) for `config` at `seed`, read from the partition, the ranks and the
    rounds' samples that a run of it gets (`compare.client_plan`, `server.sample_clients`) without
    training: its largest client, how many rounds sample it, how many rounds give one client `share` of
    the aggregation weight (its rows over the round's) or more, and the largest share a client whose rows
    are all one class takes in any round (seed 1's client 30 took 0.29 in round 16, BENCHMARKS.md)."""
    from hlora.config import load_settings
    from hlora.data.glue import get_task
    from hlora.experiments.compare import client_plan
    from hlora.federation.server import sample_clients

    settings = load_settings(config, [f"run.seed={seed}"])
    names = get_task(settings.data.task).label_names
    table, ranks = client_plan(settings)
    sizes = [row["size"] for row in table]
    counts = [[row[name] for name in names] for row in table]
    fed = settings.federation
    rounds = [sample_clients(ranks, fed.clients_per_round, seed, rnd) for rnd in range(1, fed.rounds + 1)]

    def client(c: int) -> str:
        return f"{c}, {sizes[c]} rows, {'/'.join(map(str, counts[c]))}, rank {ranks[c]}"

    largest = max(range(len(sizes)), key=lambda c: (sizes[c], -c))
    heavy, pure = 0, (0.0, "-")
    for rnd, clients in enumerate(rounds, start=1):
        total = sum(sizes[c] for c in clients)
        heavy += any(sizes[c] >= share * total for c in clients)
        for c in clients:
            if np.count_nonzero(counts[c]) == 1 and sizes[c] / total > pure[0]:
                pure = (sizes[c] / total, f"{sizes[c] / total:.2f}: {client(c)}, round {rnd}")
    return (
        f"| {seed} | {client(largest)} ({'/'.join(names)}) | "
        f"{sum(largest in clients for clients in rounds)} of {len(rounds)} | {heavy} | {pure[1]} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="train the queue, resuming")
    go.add_argument("--workers", type=int, default=2, help="runs at once, one torch thread each")
    go.add_argument("--logs", type=Path, default=ROOT / "runs-logs", help="one log per entry")
    go.add_argument("--dry-run", action="store_true", help="print the queue and stop")
    take = sub.add_parser("collect", help="copy finished run records from a worktree and rebuild reports")
    take.add_argument("source", type=Path, help="the worktree (or checkout) whose results/ the runs wrote")
    look = sub.add_parser("status", help="where each entry of the queue stands in a worktree")
    look.add_argument("root", type=Path, nargs="?", default=ROOT, help="the worktree the runs write")
    show = sub.add_parser("rows", help="print BENCHMARKS.md's per-rule rows of run directories (so far)")
    show.add_argument("runs", type=Path, nargs="+", help="results/<comparison>/runs/<rule>-s<n>")
    heavy = sub.add_parser("clients", help="per round: clients' loss, update norm, heaviest client")
    heavy.add_argument("runs", type=Path, nargs="+", help="run directories")
    heavy.add_argument("--rounds", default="1-100", help="first-last round (default 1-100)")
    weigh = sub.add_parser("weights", help="per seed, without training: the clients that weigh most")
    weigh.add_argument("config", type=Path, help="a federated config (configs/experiments/...)")
    weigh.add_argument("--seeds", default="0-2", help="first-last seed (default 0-2)")
    weigh.add_argument("--share", type=float, default=0.25, help="a heavy round's client share (0.25)")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "collect":
        collect(args.source)
    elif args.command == "clients":
        first, _, last = args.rounds.partition("-")
        table = [heaviest_clients(d, int(first), int(last or first)) for d in args.runs]
        print(CLIENTS_HEADER, "|---" * 7 + "|", *(line for lines in table for line in lines), sep="\n")
    elif args.command == "weights":
        first, _, last = args.seeds.partition("-")
        print(WEIGHTS_HEADER.format(share=args.share), "|---" * 5 + "|", sep="\n")
        for seed in range(int(first), int(last or first) + 1):
            print(heavy_rounds(args.config, seed, args.share))
    elif args.command == "status":
        for name, state in status(args.root):
            print(f"{name:<40} {state}")
    else:
        order = sorted(args.runs, key=lambda d: (group_order(d.name.rsplit("-s", 1)[0]), d.name))
        built, empty = [], []
        for run_dir in order:  # a run that has scored nothing yet is named on stderr, the rest printed
            try:
                built.append(row(run_dir))
            except ValueError as error:
                empty.append(str(error))
        if not built:
            parser.error("; ".join(empty))
        for why in empty:
            print(f"skipped {why}", file=sys.stderr)
        lines, notes = zip(*built, strict=True)
        notes = ["", *filter(None, notes)] if any(notes) else []
        print(ROWS_HEADER, "|---" * 8 + "|", *lines, *notes, sep="\n")


if __name__ == "__main__":
    main()
