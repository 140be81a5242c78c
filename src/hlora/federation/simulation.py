"""The embedded runtime: every client in this process, sharing one base model.

`prepare()` does everything that can fail on the user's input (config, data, model) before anything
is written; `run()` then owns a fresh run directory and plays the rounds, committing a checkpoint after
each; given that checkpoint, `run()` goes on from it in the same directory (`hlora.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import set_seed

from hlora import checkpoint
from hlora.aggregation import registry
from hlora.aggregation.base import ClientPlan, ClientUpdate
from hlora.client.client import FederatedClient, merge_base
from hlora.client.trainer import LocalTrainer, TrainResult
from hlora.config import FederationSettings, Settings, settings_to_toml
from hlora.data.glue import TaskSpec, get_task, load_split
from hlora.data.partition import (
    dirichlet_partition,
    format_partition_table,
    partition_table,
    write_partition_csv,
)
from hlora.data.tokenize import EncodedSplit, encode, make_collator
from hlora.evaluation import evaluate
from hlora.federation.faults import ClientFailure, FaultInjector
from hlora.federation.ranks import assign_ranks, resolve_bank_rank
from hlora.federation.reports import check_reports, planned_work
from hlora.federation.server import FederatedServer, RoundOutcome, RoundTraffic, derive_seed, traffic
from hlora.federation.validation import Rejection
from hlora.models.lora_model import LoraModel, check_fit, load_base_model
from hlora.outputs import (
    CONFIG_FILE,
    PARTITION_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    MetricsLog,
    lock_run_dir,
    plot_accuracy,
    summarise,
    write_json,
    write_text_atomic,
)
from hlora.provenance import environment

log = logging.getLogger("hlora")


def pick_device(name: str, key: str = "run.device") -> torch.device:
    """`auto` (CUDA when present, else the CPU), or a device this machine has: `cpu`, `cuda[:i]`, `mps`.
    ConfigError naming `key` (the setting or option it came from) for any other."""
    from hlora.errors import ConfigError  # here: the rest of this module never raises it

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}: unknown device {name!r}; use auto, cpu or cuda[:i]")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}: {name!r} asked for, but this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{key}: {name!r} asked for, but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: {name!r} asked for, but this machine has no MPS device")
    return device


def effective_settings(settings: Settings) -> Settings:
    """The centralised reference is the federated loop with one client that holds all the data (the
    aggregate of one update is that update), so it needs no loop of its own. It trains at the rank the
    federated run's server holds (`bank_rank`, else the largest rank the policy gives).

    The local reference (`run.mode = "local"`) is the same loop with one client too: `prepare` splits the
    data as the federated run does (`num_clients`, `alpha`, seed), then keeps client `run.client`'s part
    and rank alone. Here only what needs no data changes: FedIT (the identity on one update), one client a
    round, no bank rank above the client's own."""
    if settings.run.mode == "local":
        fed = settings.federation.model_copy(
            update={"method": "fedit", "clients_per_round": 1, "min_clients": 1}
        )
        return settings.model_copy(
            update={
                "federation": fed,
                "lora": settings.lora.model_copy(update={"bank_rank": None}),
                "method_options": {},
            }
        )
    if settings.run.mode != "centralized":
        return settings
    lora = settings.lora
    rank = lora.bank_rank if lora.bank_rank is not None else lora.max_client_rank
    central_lora = lora.model_copy(update={"rank_policy": "fixed", "rank": rank, "bank_rank": None})
    fed = settings.federation
    central = FederationSettings(
        method="fedit",
        num_clients=1,
        clients_per_round=1,
        rounds=fed.rounds,
        alpha=math.inf,
        min_client_size=1,
        max_update_norm=fed.max_update_norm,
    )
    return settings.model_copy(update={"federation": central, "lora": central_lora, "method_options": {}})


@dataclass
class Experiment:
    """Everything a run needs, loaded and checked."""

    settings: Settings
    task: TaskSpec
    train: EncodedSplit
    dev: EncodedSplit
    model: LoraModel
    collate: Any
    partitions: list[np.ndarray]
    partition_rows: list[dict[str, Any]]
    client_ranks: dict[int, int]  # r_k of every client
    bank_rank: int  # r_g, the rank of the server's global adapter
    server: FederatedServer  # the round logic with its aggregation method and the round-0 global adapter
    majority_baseline: float
    data_source: str
    timings: dict[str, float] = field(default_factory=dict)


def split_clients(settings: Settings, labels: Any) -> tuple[list[np.ndarray], dict[int, int]]:
    """The clients' rows (indices into the training rows, from their `labels`) and their ranks: the
    seeded Dirichlet partition and the rank policy, so that anything that needs them without the model
    (`hlora compare`'s planning) gets the ones a run gets."""
    fed = settings.federation
    parts = dirichlet_partition(
        np.asarray(labels),
        fed.num_clients,
        fed.alpha,
        min_size=fed.min_client_size,
        seed=settings.run.seed,
        scheme=fed.partition,
        size_sigma=fed.size_sigma,
    )
    return parts, assign_ranks(settings.lora, [len(idx) for idx in parts], settings.run.seed)


def prepare(settings: Settings) -> Experiment:
    """Load and check the data, partitions and model. Raises HloraError on bad input; writes nothing."""
    check_fit(settings)  # what the model cannot serve, before anything slow
    settings = effective_settings(settings)
    t0 = time.perf_counter()
    task = get_task(settings.data.task)
    train_rows = load_split(task, "train", settings.data.data_dir).head(settings.data.max_train_samples)
    dev_rows = load_split(task, "dev", settings.data.data_dir).head(settings.data.max_eval_samples)
    fed = settings.federation
    # The partition and the ranks before the model: both cheap, both fail on user input.
    parts, client_ranks = split_clients(settings, train_rows.labels)
    local = settings.run.client if settings.run.mode == "local" else None
    if local is not None:  # the lower reference: this client's part and rank, and no other client
        parts, client_ranks = [parts[local]], {0: client_ranks[local]}
    bank_rank = resolve_bank_rank(settings.lora, client_ranks)
    aggregator = registry.create(fed.method, bank_rank, settings.run.seed, settings.method_options)
    t1 = time.perf_counter()
    # Every global RNG (Python's, numpy's, torch's) from the run's seed, so that a checkpoint's RNG states
    # depend on the run alone, not on what the process did before it.
    set_seed(settings.run.seed)
    base, tokenizer = load_base_model(settings.model, task.num_labels, seed=settings.run.seed)
    device = pick_device(settings.run.device)
    model = LoraModel(base, settings.lora, device)
    initial = model.initial_weights(bank_rank, seed=derive_seed(settings.run.seed, 0xA11CE))
    # The server refuses ranks its method cannot serve (FedIT with mixed ranks) here, before a run
    # directory exists. It weighs updates by the partition made here (in the simulation and on Flower
    # alike), never by the sizes clients claim.
    server = FederatedServer(
        aggregator,
        initial,
        client_ranks,
        fed.clients_per_round,
        settings.run.seed,
        min_clients=fed.min_clients,
        max_update_norm=fed.max_update_norm,
        client_sizes={cid: len(parts[cid]) for cid in client_ranks},
        update_norm_factor=fed.update_norm_factor,
    )
    t2 = time.perf_counter()
    train = encode(train_rows, tokenizer, settings.data.max_length)
    dev = encode(dev_rows, tokenizer, settings.data.max_length)
    t3 = time.perf_counter()
    counts = np.bincount(dev.labels, minlength=task.num_labels)
    rows = partition_table(parts, np.asarray(train_rows.labels), list(task.label_names))
    rows = [{"client": r["client"], "size": r["size"], "rank": client_ranks[r["client"]], **r} for r in rows]
    if local is not None:  # partition.csv names the client by its id in the federated partition
        rows = [{**r, "client": local} for r in rows]
    return Experiment(
        settings=settings,
        task=task,
        train=train,
        dev=dev,
        model=model,
        collate=make_collator(tokenizer),
        partitions=parts,
        partition_rows=rows,
        client_ranks=client_ranks,
        bank_rank=bank_rank,
        server=server,
        majority_baseline=float(counts.max() / counts.sum()),
        data_source=train_rows.source,
        timings={"data_s": t1 - t0, "model_s": t2 - t1, "tokenize_s": t3 - t2},
    )


@dataclass
class Replies:
    """What came back from a round's clients, however it travelled: the part of a round in which the
    runtimes differ (in-process calls here, Flower messages in `hlora.flower`)."""

    updates: list[ClientUpdate]
    results: dict[int, TrainResult]  # client id -> its training's loss and cost, for each update
    lost: dict[int, str] = field(default_factory=dict)  # client id -> why no reply came ("crash", ...)
    # client id -> why a reply that came could not be read as an update at all (it is refused as the
    # server refuses an invalid update, and counted with them)
    unreadable: dict[int, Rejection] = field(default_factory=dict)
    corrupted: dict[int, str] = field(default_factory=dict)  # client id -> injected corruption ([faults])
    # Bytes counted from the messages that travelled; None: from the plans and updates (`traffic`)
    sent: RoundTraffic | None = None


class RoundLoop:
    """The body of a round that every runtime shares: `configure` (the plans), then the runtime's
    exchange, then `finish` (aggregate, evaluate, metrics row, checkpoint). A runtime decides only how
    plans reach the clients and what comes back (`Replies`)."""

    def __init__(self, exp: Experiment, run_dir: Path, resume: checkpoint.Checkpoint | None = None) -> None:
        """Own `run_dir` (new and empty, or with `resume` the run's own directory): lock it (RunDirError
        while another process holds it), restore the checkpoint (before anything is written: one that
        does not fit changes nothing), then write the config and partition. `first` is the round to play
        next. The caller restores the RNG states (`checkpoint.set_rng_state(resume.rng)`) just before the
        first round, and calls `release` when the run ends or stops."""
        self.exp = exp
        self.run_dir = run_dir
        self._lock = lock_run_dir(run_dir)
        try:
            self._start(resume)
        except BaseException:
            self.release()
            raise

    def _start(self, resume: checkpoint.Checkpoint | None) -> None:
        exp, run_dir = self.exp, self.run_dir
        s = exp.settings
        fed = s.federation
        self.first = checkpoint.restore(exp, resume) + 1 if resume is not None else 1
        write_text_atomic(run_dir / CONFIG_FILE, settings_to_toml(s))
        write_partition_csv(exp.partition_rows, run_dir / PARTITION_FILE)
        log.info("data: %s (%d train rows, %d dev rows)", exp.data_source, len(exp.train), len(exp.dev))
        log.info("clients, their ranks and label mix:\n%s", format_partition_table(exp.partition_rows))
        log.info(
            "%s at bank rank %d, client ranks %s", fed.method, exp.bank_rank, _rank_counts(exp.client_ranks)
        )
        self.metrics = MetricsLog(run_dir, resume.metrics if resume is not None else ())
        self._t0 = 0.0

    def configure(self, rnd: int) -> dict[int, ClientPlan]:
        """The round's plans, by client id (`FederatedServer.configure`); the round's clock starts."""
        self._t0 = time.perf_counter()
        return self.exp.server.configure(rnd)

    def finish(self, rnd: int, plans: dict[int, ClientPlan], replies: Replies) -> dict[str, Any]:
        """Aggregate what came back, evaluate the global model (and each tier's) if the round is one
        `eval.every` picks, append the metrics row and commit the checkpoint. Returns the row."""
        exp, s = self.exp, self.exp.settings
        server = exp.server
        t1 = time.perf_counter()
        outcome = server.aggregate(rnd, replies.updates)
        if replies.unreadable:
            for cid, why in sorted(replies.unreadable.items()):
                log.warning("round %d: client %s rejected (%s): %s", rnd, cid, why.code, why.detail)
            outcome = replace(outcome, rejected={**outcome.rejected, **replies.unreadable})
        t2 = time.perf_counter()
        last = rnd == s.federation.rounds
        evaluated = rnd % s.eval.every == 0 or last
        scores: dict[str, float] = {}
        if evaluated:  # else the base waits for the next client to merge FLoRA's deltas, in the same order
            held = server.model_plan()  # the global model, as a client would hold it (FLoRA: merged stacks)
            merge_base(exp.model, held)
            scores = evaluate(exp.model, held.adapter, exp.dev, exp.task, s.eval.batch_size, exp.collate)
        t3 = time.perf_counter()
        score_tiers = evaluated and (s.eval.tiers is True or (s.eval.tiers == "final" and last))
        tiers = evaluate_tiers(exp, held, scores) if score_tiers else {}
        t4 = time.perf_counter()
        timings = {
            "train_s": t1 - self._t0,
            "aggregate_s": t2 - t1 - outcome.instruments_s,
            "instruments_s": outcome.instruments_s,
        }
        if evaluated:
            timings["eval_s"] = t3 - t2
        if score_tiers:
            timings["tier_eval_s"] = t4 - t3
        timings["wall_s"] = t4 - self._t0
        sent = replies.sent if replies.sent is not None else traffic(plans, replies.updates)
        # The clients' own figures are claims: those out of bounds are recorded as missing, not averaged.
        work = {cid: planned_work(s.train, len(exp.partitions[cid])) for cid in replies.results}
        results, invalid = check_reports(replies.results, work)
        if invalid:
            log.warning(
                "round %d: client figures out of bounds, recorded as missing: %s", rnd,
                "; ".join(f"client {cid}: {', '.join(names)}" for cid, names in sorted(invalid.items())),
            )
        row = round_row(rnd, scores, tiers, results, sent, exp.client_ranks, timings)
        row["evaluated"] = evaluated
        row.update(reliability_fields(outcome, replies.lost, replies.corrupted))
        row["invalid_reports"] = {str(cid): names for cid, names in sorted(invalid.items())}
        # The checkpoint first, so that the row can say what it cost (the checkpoint's copy of the row
        # lacks `checkpoint_s`); a crash between the two loses nothing: a resumed run rewrites
        # metrics.jsonl from the checkpoint's rows.
        t5 = time.perf_counter()
        checkpoint.save_checkpoint(self.run_dir, exp, rnd, [*self.metrics.rows, row])
        row["checkpoint_s"] = round(time.perf_counter() - t5, 4)
        self.metrics.append(row)
        return row

    def release(self) -> None:
        """Let another process play into the run directory (after `close`, or when the run stops)."""
        self._lock.release()

    def close(self) -> dict[str, Any]:
        """Write `summary.json` and the accuracy plot; returns the summary."""
        exp, s = self.exp, self.exp.settings
        fed = s.federation
        summary = summarise(
            self.metrics.rows,
            {
                "task": exp.task.name,
                "method": fed.method,
                "mode": s.run.mode,
                "seed": s.run.seed,
                "num_clients": fed.num_clients,
                **({"client": s.run.client} if s.run.mode == "local" else {}),
                "client_ranks": sorted(set(exp.client_ranks.values())),
                "bank_rank": exp.bank_rank,
                "majority_baseline": exp.majority_baseline,
                "device": str(exp.model.device),
                **{k: round(v, 3) for k, v in exp.timings.items()},
                "environment": environment(str(exp.model.device)),
            },
        )
        write_json(self.run_dir / SUMMARY_FILE, summary)
        plot_accuracy(
            self.metrics.rows,
            self.run_dir / PLOT_FILE,
            f"{exp.task.name.upper()} dev, {fed.method}, {s.run.mode}",
            baseline=exp.majority_baseline,
        )
        return summary


def run(
    exp: Experiment, run_dir: Path, progress: bool = True, resume: checkpoint.Checkpoint | None = None
) -> dict[str, Any]:
    """Play every round in-process, writing the run's files into the (new, empty) `run_dir`; with
    `resume` (`checkpoint.open_resume`), the run's own directory, going on after the checkpoint's round
    as if the run had never stopped. Returns the summary. The run directory is locked while it plays
    (`RoundLoop`), and let go however the run ends."""
    loop = RoundLoop(exp, run_dir, resume)
    try:
        return _play(loop, resume, progress)
    finally:
        loop.release()


def _play(loop: RoundLoop, resume: checkpoint.Checkpoint | None, progress: bool) -> dict[str, Any]:
    exp = loop.exp
    s = exp.settings
    fed = s.federation
    trainer = LocalTrainer(exp.model, s.train, exp.collate, progress=progress)
    clients = {
        cid: FederatedClient(cid, exp.train.subset(idx), trainer) for cid, idx in enumerate(exp.partitions)
    }

    faults = FaultInjector(s.faults, s.run.seed)
    if faults.active:
        log.info("injected faults per sampled client and round: %s", faults)
    rounds = tqdm(
        range(loop.first, fed.rounds + 1),
        initial=loop.first - 1,
        total=fed.rounds,
        desc=f"{exp.task.name} {fed.method}",
        unit="round",
        disable=not progress,
    )
    if resume is not None:
        checkpoint.set_rng_state(resume.rng)  # last: nothing may draw from them before the rounds
    for rnd in rounds:
        plans = loop.configure(rnd)
        replies = Replies([], {}, corrupted=faults.corrupted(rnd, plans))
        for cid, plan in plans.items():
            try:
                update, replies.results[cid] = faults.fit(
                    clients[cid], plan, rnd, derive_seed(s.run.seed, rnd, cid)
                )
            except ClientFailure as e:
                replies.lost[cid] = e.kind
                log.warning("round %d: %s", rnd, e)
                continue
            replies.updates.append(update)
        row = loop.finish(rnd, plans, replies)
        rounds.write(round_line(row, fed.rounds))
    return loop.close()


def evaluate_tiers(
    exp: Experiment, global_model: ClientPlan, global_scores: dict[str, float]
) -> dict[int, dict[str, float]]:
    """The dev scores of the model each distinct client rank holds for the next round
    (`FederatedServer.model_plan(rank)`). A tier that holds the global model itself (equal adapter
    tensors and the same base deltas: the top tier of a method that sends the global adapter as it is)
    gets the global scores, not a pass."""
    s = exp.settings
    scores: dict[int, dict[str, float]] = {}
    for rank in sorted(set(exp.client_ranks.values())):
        held = exp.server.model_plan(rank)
        if _same_model(held, global_model):
            scores[rank] = global_scores
        else:
            merge_base(exp.model, held)
            scores[rank] = evaluate(
                exp.model, held.adapter, exp.dev, exp.task, s.eval.batch_size, exp.collate
            )
    return scores


def round_row(
    rnd: int,
    scores: dict[str, float],
    tier_scores: dict[int, dict[str, float]],
    results: dict[int, TrainResult],
    sent: RoundTraffic,
    client_ranks: dict[int, int],
    timings: dict[str, float],
) -> dict[str, Any]:
    """One `metrics.jsonl` row: the global scores, each tier's (keyed by rank, as a string), the
    training loss, traffic, and each tier's cost (mean seconds per step over the tier's clients this
    round, the largest peak memory among them). `clients` are the round's sampled clients; loss and cost
    come from those whose reply arrived (`results`; the loss is None when none did). A figure that is
    None (missing: `hlora.federation.reports` refused it) is left out of the loss, the tier's mean or
    maximum and the sample count; a tier with none left has no entry."""
    ids = sorted(sent.downlink_bytes_by_client)
    replied = sorted(results)
    row: dict[str, Any] = {"round": rnd, **scores}
    if tier_scores:
        for metric in scores:  # accuracy, and F1 where the task has it
            row[f"tier_{metric}"] = {str(r): tier[metric] for r, tier in sorted(tier_scores.items())}
    by_tier: dict[int, list[TrainResult]] = {}
    for cid in sorted(replied, key=client_ranks.get):  # ranks ascending, so the tier keys come out in order
        by_tier.setdefault(client_ranks[cid], []).append(results[cid])
    loss = [(results[c].mean_loss, results[c].num_samples) for c in replied]
    loss = [(x, n) for x, n in loss if x is not None and n is not None]
    row.update(
        train_loss=float(np.average([x for x, _ in loss], weights=[n for _, n in loss])) if loss else None,
        uplink_bytes=sent.uplink_bytes,
        downlink_bytes=sent.downlink_bytes,
        clients=ids,
        client_ranks={str(cid): client_ranks[cid] for cid in ids},
        client_uplink_bytes={str(cid): n for cid, n in sorted(sent.uplink_bytes_by_client.items())},
        client_downlink_bytes={str(cid): n for cid, n in sorted(sent.downlink_bytes_by_client.items())},
        tier_step_s=_per_tier_figure(by_tier, "step_s", lambda v: round(float(np.mean(v)), 6)),
        tier_peak_bytes=_per_tier_figure(by_tier, "peak_bytes", max),
        tier_state_bytes=_per_tier_figure(by_tier, "state_bytes", max),
        train_samples=sum(results[c].samples_seen for c in replied if results[c].samples_seen is not None),
        **{name: round(seconds, 4) for name, seconds in timings.items()},
    )
    return row


def reliability_fields(
    outcome: RoundOutcome, lost: dict[int, str], corrupted: dict[int, str]
) -> dict[str, Any]:
    """The `metrics.jsonl` fields of what went wrong in a round (client ids as strings): which clients'
    updates went into the global model and the norm of the change each valid one made, the updates the
    server refused and why, the clients whose reply never came, whether the round failed, which
    updates were corrupted on purpose (`[faults]`), and the sample counts clients claimed that differ
    from their partition's size (which they were weighted by instead); and `instruments`, what the
    method made of the accepted updates (`aggregation.instruments`; null for a failed round)."""
    return {
        "aggregated_clients": [] if outcome.failed else list(outcome.accepted),
        "client_update_norm": {str(cid): round(n, 6) for cid, n in sorted(outcome.update_norms.items())},
        "misreported_samples": {str(cid): _number(n) for cid, n in sorted(outcome.misreported.items())},
        "rejected": {str(cid): why.code for cid, why in sorted(outcome.rejected.items())},
        "failed_clients": {str(cid): kind for cid, kind in sorted(lost.items())},
        "round_failed": outcome.failed,
        "corrupted_clients": {str(cid): kind for cid, kind in sorted(corrupted.items())},
        "instruments": outcome.instruments,
    }


def _number(n: Any) -> int | float:
    """A claimed sample count as JSON can hold it: an int stays an int, anything else is a float."""
    return int(n) if isinstance(n, (int, np.integer)) else float(n)


def _same_model(a: ClientPlan, b: ClientPlan) -> bool:
    """The same base deltas and equal adapter tensors under the same names: loaded, the same model."""
    if [d.version for d in a.merge] != [d.version for d in b.merge]:
        return False
    ta, tb = a.adapter.tensors(), b.adapter.tensors()
    return ta.keys() == tb.keys() and all(
        ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta
    )


def _per_tier_figure(by_tier: dict[int, list[TrainResult]], figure: str, combine) -> dict[str, Any]:
    """`{rank: combine(the tier's values of figure)}` over the values that are not missing (None)."""
    values = {r: [v for v in (getattr(x, figure) for x in xs) if v is not None] for r, xs in by_tier.items()}
    return {str(r): combine(vs) for r, vs in values.items() if vs}


def _rank_counts(client_ranks: dict[int, int]) -> str:
    """`"1 x2, 4 x1"`: each distinct rank and how many clients train at it."""
    ranks = list(client_ranks.values())
    return ", ".join(f"{r} x{ranks.count(r)}" for r in sorted(set(ranks)))


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The one line a finished round prints (`acc -` on a round not evaluated)."""
    acc = f"{row['accuracy']:.4f}" if "accuracy" in row else "-"
    f1 = f"  f1 {row['f1']:.4f}" if "f1" in row else ""
    tiers = row.get("tier_accuracy", {})
    tier_acc = "  tiers " + " ".join(f"r{r} {acc:.4f}" for r, acc in tiers.items()) if len(tiers) > 1 else ""
    loss = f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-"
    trouble = "".join(
        f"  {label} " + " ".join(f"c{cid} {why}" for cid, why in row[key].items())
        for label, key in (("rejected", "rejected"), ("lost", "failed_clients"))
        if row.get(key)
    )
    if row.get("invalid_reports"):
        trouble += "  bad figures " + " ".join(
            f"c{cid} {','.join(names)}" for cid, names in row["invalid_reports"].items()
        )
    if row.get("round_failed"):
        trouble += "  round failed: global model kept"
    return (
        f"round {row['round']:>3}/{rounds}  acc {acc}{f1}{tier_acc}  "
        f"loss {loss}  "
        f"up {row['uplink_bytes'] / 1e6:.2f} MB  down {row['downlink_bytes'] / 1e6:.2f} MB  "
        f"{row['wall_s']:.1f} s{trouble}"
    )

