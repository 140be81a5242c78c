"""The round engine both runtimes drive: one round, top to bottom.

    plans = loop.configure(rnd)          # the server samples the round's clients and plans their work
    replies = <the runtime's exchange>   # in-process calls (hlora.simulation), Flower messages (hlora.flower)
    row = loop.finish(rnd, plans, replies)

`finish` is the rest of the round, the same for every runtime and every method:
1. aggregate the accepted updates (`FederatedServer.aggregate`: validation, weights, the method's rule,
   the instruments);
2. evaluate the global model, and each rank tier's, on the rounds `eval.every` picks;
3. check the clients' figures and build the metrics row (`federation.metrics`);
4. commit the checkpoint (`federation.prepared.save_checkpoint`), then append the row.
A runtime decides only how plans reach clients and what comes back (`Replies`); it never asks which
method runs. Before each round it asks `loop.stop_reason(rnd)`: with a `privacy.epsilon_budget`, a
round whose release would spend more than the budget is not played, and the run ends there (`close`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hlora.checkpoint import Checkpoint
from hlora.client.client import merge_base
from hlora.config import Settings, settings_to_toml
from hlora.data.partition import format_partition_table, write_partition_csv
from hlora.errors import ConfigError
from hlora.evaluation import evaluate, evaluate_with_spread
from hlora.federation.metrics import (
    plot_accuracy,
    reliability_fields,
    round_row,
    summarise,
)
from hlora.federation.prepared import PreparedRun, restore, save_checkpoint
from hlora.federation.reports import check_reports, planned_work
from hlora.federation.server import RoundOutcome, RoundTraffic, traffic
from hlora.federation.validation import Rejection
from hlora.privacy.accountant import PrivacyAccountant
from hlora.protocol import ClientPlan, ClientUpdate, TrainResult
from hlora.provenance import environment
from hlora.rundir import (
    CONFIG_FILE,
    PARTITION_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    MetricsLog,
    lock_run_dir,
    write_json,
    write_text_atomic,
)

log = logging.getLogger("hlora")


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
    # A secure round (`federation.secure`): the server's outcome, already adopted from sums alone (then
    # `updates` is empty: no update reached the server), and what the round's `secure` field records.
    outcome: RoundOutcome | None = None
    secure: dict[str, Any] | None = None
    secure_s: float = 0.0  # the secure stages' wall time, counted apart from the clients' training


def check_runtime(settings: Settings, carries_secure: bool) -> None:
    """Refuse (ConfigError, one line) a run that the runtime cannot play: `[secure]` on one without the
    secure two-stage exchange. A runtime calls it before it creates anything; `RoundLoop` again."""
    if settings.secure.enabled and not carries_secure:
        raise ConfigError(
            "secure.enabled: this runtime does not carry secure aggregation yet (the Flower runtime "
            "has no secure two-stage exchange); run it in the simulation (`hlora run`)"
        )


@dataclass(frozen=True)
class _Evaluation:
    """A round's dev scores: none on a round `eval.every` skips."""

    scores: dict[str, float] = field(default_factory=dict)  # the global model's
    spread: dict[str, object] | None = None  # its `prediction_spread` (logit_std ~0: one answer for all)
    tiers: dict[int, dict[str, float]] = field(default_factory=dict)  # rank -> the model that tier holds
    tier_seconds: float = 0.0  # what scoring the tiers cost


class RoundLoop:
    """The body of a round that every runtime shares: `configure` (the plans), then the runtime's
    exchange, then `finish` (aggregate, evaluate, metrics row, checkpoint). A runtime decides only how
    plans reach the clients and what comes back (`Replies`)."""

    def __init__(
        self, exp: PreparedRun, run_dir: Path, resume: Checkpoint | None = None, carries_secure: bool = False
    ) -> None:
        """Own `run_dir` (new and empty, or with `resume` the run's own directory): lock it (RunDirError
        while another process holds it), restore the checkpoint (before anything is written: one that
        does not fit changes nothing), then write the config and partition. `first` is the round to play
        next. The caller restores the RNG states (`set_rng_state(resume.rng)`) just before the
        first round, and calls `release` when the run ends or stops. A runtime that cannot play secure
        rounds (`carries_secure` false) is refused a run with `[secure]` on (ConfigError), before
        anything is written into the run directory."""
        check_runtime(exp.settings, carries_secure)
        self.exp = exp
        self.run_dir = run_dir
        self._lock = lock_run_dir(run_dir)
        try:
            self._start(resume)
        except BaseException:
            self.release()
            raise

    def _start(self, resume: Checkpoint | None) -> None:
        exp, run_dir = self.exp, self.run_dir
        s = exp.settings
        fed = s.federation
        self.first = restore(exp, resume) + 1 if resume is not None else 1
        write_text_atomic(run_dir / CONFIG_FILE, settings_to_toml(s))
        write_partition_csv(exp.partition_rows, run_dir / PARTITION_FILE)
        log.info("data: %s (%d train rows, %d dev rows)", exp.data_source, len(exp.train), len(exp.dev))
        log.info("clients, their ranks and label mix:\n%s", format_partition_table(exp.partition_rows))
        log.info(
            "%s at bank rank %d, client ranks %s", fed.method, exp.bank_rank, _rank_counts(exp.client_ranks)
        )
        self.metrics = MetricsLog(run_dir, resume.metrics if resume is not None else ())
        self._t0 = 0.0
        p = s.privacy
        # Stateless: epsilon after round t is recomputed from t, so a resumed run needs nothing saved.
        # A secure round releases each of its sums noised (distributed DP, federation.secure).
        releases = 2 + 2 * s.secure.power_iterations if s.secure.enabled else 1
        self.accountant = (
            PrivacyAccountant(p.noise_multiplier, fed.clients_per_round, fed.num_clients,
                              p.resolved_delta(fed.num_clients), releases)
            if p.enabled
            else None
        )  # fmt: skip
        self.stopped: str | None = None  # why the run ended before federation.rounds (stop_reason)

    def stop_reason(self, rnd: int) -> str | None:
        """Why the run must end before round `rnd` (None: play it): with `privacy.epsilon_budget`, a
        round whose release would take epsilon above the budget. The runtimes ask it before each round;
        the reason goes into the summary (`stopped`)."""
        eps = self._over_budget(rnd)
        if eps is None:
            return None
        budget = self.exp.settings.privacy.epsilon_budget
        self.stopped = (
            f"privacy budget: round {rnd} would spend epsilon {eps:.4g} > privacy.epsilon_budget {budget:g}"
        )
        log.warning("stopped before round %d: %s", rnd, self.stopped)
        return self.stopped

    def _over_budget(self, rnd: int) -> float | None:
        """The epsilon after round `rnd` where it exceeds the budget, else None."""
        budget = self.exp.settings.privacy.epsilon_budget
        if self.accountant is None or budget is None:
            return None
        eps = self.accountant.epsilon(rnd)
        return eps if eps > budget else None

    def configure(self, rnd: int) -> dict[int, ClientPlan]:
        """The round's plans, by client id (`FederatedServer.configure`); the round's clock starts."""
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        return self.exp.server.configure(rnd)

    def finish(self, rnd: int, plans: dict[int, ClientPlan], replies: Replies) -> dict[str, Any]:
        """The rest of the round, the same for every runtime: aggregate what came back, evaluate the
        global model (and each tier's) if the round is one `eval.every` picks, build the metrics row,
        commit the checkpoint and append the row. Returns the row."""
        t1, cpu1 = time.perf_counter(), time.process_time()
        outcome = self._aggregate(rnd, replies)
        t2, cpu2 = time.perf_counter(), time.process_time()
        scored = self._evaluate(rnd)
        t3 = time.perf_counter()
        timings = {
            "train_s": t1 - self._t0 - replies.secure_s,
            **({"secure_s": replies.secure_s} if replies.secure is not None else {}),
            "aggregate_s": t2 - t1 - outcome.instruments_s,
            # its CPU time: the cost a pause or cores held elsewhere do not inflate (the report's ratios)
            "aggregate_cpu_s": max(cpu2 - cpu1 - outcome.instruments_cpu_s, 0.0),
            "instruments_s": outcome.instruments_s,
            **({"eval_s": t3 - t2 - scored.tier_seconds} if scored.scores else {}),
            **({"tier_eval_s": scored.tier_seconds} if scored.tiers else {}),
            "wall_s": t3 - self._t0,
            # the CPU this process spent on it, every thread: unlike the wall time, not inflated by work
            # that shares the cores or by a pause (under Flower: the server's own work alone)
            "cpu_s": time.process_time() - self._cpu0,
        }
        row = self._row(rnd, plans, replies, outcome, scored, timings)
        # The checkpoint first, so that the row can say what it cost (the checkpoint's copy of the row
        # lacks `checkpoint_s`); a crash between the two loses nothing: a resumed run rewrites
        # metrics.jsonl from the checkpoint's rows.
        t4 = time.perf_counter()
        save_checkpoint(self.run_dir, self.exp, rnd, [*self.metrics.rows, row])
        row["checkpoint_s"] = round(time.perf_counter() - t4, 4)
        self.metrics.append(row)
        return row

    def _aggregate(self, rnd: int, replies: Replies) -> RoundOutcome:
        """Step 1: the server folds the accepted updates into the next global adapter; replies that
        could not be read as updates count as refused."""
        if replies.outcome is not None:  # a secure round: aggregated from sums as the exchange went
            return replies.outcome
        outcome = self.exp.server.aggregate(rnd, replies.updates)
        if replies.unreadable:
            for cid, why in sorted(replies.unreadable.items()):
                log.warning("round %d: client %s rejected (%s): %s", rnd, cid, why.code, why.detail)
            outcome = replace(outcome, rejected={**outcome.rejected, **replies.unreadable})
        return outcome

    def _evaluate(self, rnd: int) -> _Evaluation:
        """Step 2: the dev scores of the global model, as a client would hold it, on the rounds
        `eval.every` picks (and always the last), with how its answers spread over the rows (the row's
        `prediction_spread`); each rank tier's scores where `eval.tiers` asks. A round not
        evaluated merges nothing: FLoRA's deltas wait for the next client, in the same order."""
        exp, s = self.exp, self.exp.settings
        # the run's last round: the configured last, or the last its privacy budget allows
        last = rnd == s.federation.rounds or self._over_budget(rnd + 1) is not None
        if not (rnd % s.eval.every == 0 or last):
            return _Evaluation()
        global_model = exp.server.model_plan()  # FLoRA: with the merged stacks
        merge_base(exp.model, global_model)
        scores, spread = evaluate_with_spread(
            exp.model, global_model.adapter, exp.dev, exp.task, s.eval.batch_size, exp.collate
        )
        if not (s.eval.tiers is True or (s.eval.tiers == "final" and last)):
            return _Evaluation(scores, spread)
        t0 = time.perf_counter()
        tiers = evaluate_tiers(exp, global_model, scores)
        return _Evaluation(scores, spread, tiers, time.perf_counter() - t0)

    def _row(
        self,
        rnd: int,
        plans: dict[int, ClientPlan],
        replies: Replies,
        outcome: RoundOutcome,
        scored: _Evaluation,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """Step 3: the round's metrics row. The clients' own figures are claims: those out of bounds are
        recorded as missing, not averaged (`federation.reports`)."""
        exp, s = self.exp, self.exp.settings
        sent = replies.sent if replies.sent is not None else traffic(plans, replies.updates)
        work = {cid: planned_work(s.train, len(exp.partitions[cid])) for cid in replies.results}
        results, invalid = check_reports(replies.results, work)
        if invalid:
            log.warning(
                "round %d: client figures out of bounds, recorded as missing: %s",
                rnd,
                "; ".join(f"client {cid}: {', '.join(names)}" for cid, names in sorted(invalid.items())),
            )
        row = round_row(rnd, scored.scores, scored.tiers, results, sent, exp.client_ranks, timings)
        row["evaluated"] = bool(scored.scores)
        if scored.spread is not None:  # a model that answers every input alike shows here (logit_std ~0)
            row["prediction_spread"] = scored.spread
        row.update(reliability_fields(outcome, replies.lost, replies.corrupted))
        row["invalid_reports"] = {str(cid): names for cid, names in sorted(invalid.items())}
        if replies.secure is not None:
            row["secure"] = replies.secure
        if self.accountant is not None:
            row["privacy"] = self._privacy_fields(rnd, outcome)
        return row

    def _privacy_fields(self, rnd: int, outcome: RoundOutcome) -> dict[str, Any]:
        """The `privacy` field of the row: the (epsilon, delta) spent after `rnd` rounds (epsilon null
        where it is unbounded: no noise), the mechanism's settings, and what it did this round."""
        assert self.accountant is not None
        p = self.exp.settings.privacy
        eps = self.accountant.epsilon(rnd)
        # a failed round released nothing (a secure one's server never knows what was clipped)
        clipped = None if self.exp.settings.secure.enabled else 0
        done = outcome.privacy or {"sigma": None, "clipped": clipped, "aggregated": 0, "norm_median": None}
        return {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": self.accountant.delta,
            "noise_multiplier": p.noise_multiplier,
            "clip": p.clip,
            "secure_noise": p.secure_noise,
            **done,
        }

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
                **({"stopped": self.stopped} if self.stopped else {}),
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


def evaluate_tiers(
    exp: PreparedRun, global_model: ClientPlan, global_scores: dict[str, float]
) -> dict[int, dict[str, float]]:
    """The dev scores of the model each distinct client rank holds for the next round
    (`FederatedServer.model_plan(rank)`). A tier that holds the global model itself (equal adapter
    tensors and the same base deltas: the top tier of a method that sends the global adapter as it is)
    gets the global scores, not a pass."""
    s = exp.settings
    scores: dict[int, dict[str, float]] = {}
    for rank in sorted(set(exp.client_ranks.values())):
        tier_model = exp.server.model_plan(rank)
        if _same_model(tier_model, global_model):
            scores[rank] = global_scores
        else:
            merge_base(exp.model, tier_model)
            scores[rank] = evaluate(
                exp.model, tier_model.adapter, exp.dev, exp.task, s.eval.batch_size, exp.collate
            )
    return scores


def _same_model(a: ClientPlan, b: ClientPlan) -> bool:
    """The same base deltas and equal adapter tensors under the same names: loaded, the same model."""
    if [d.version for d in a.merge] != [d.version for d in b.merge]:
        return False
    ta, tb = a.adapter.tensors(), b.adapter.tensors()
    return ta.keys() == tb.keys() and all(
        ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta
    )


def _rank_counts(client_ranks: dict[int, int]) -> str:
    """`"1 x2, 4 x1"`: each distinct rank and how many clients train at it."""
    ranks = list(client_ranks.values())
    return ", ".join(f"{r} x{ranks.count(r)}" for r in sorted(set(ranks)))
