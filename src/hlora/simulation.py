"""The embedded runtime: every client in this process, sharing one base model.

`federation.prepared.prepare()` does everything that can fail on the user's input (config, data, model)
before anything is written; `run()` then owns a fresh run directory and plays the rounds through the
engine (`federation.round`), committing a checkpoint after each; given that checkpoint, `run()` goes on
from it in the same directory. What is this runtime's own: the clients are objects in this process and a
round's exchange is a loop of calls (with the injected faults of `[faults]`). With `[secure]` on, the
clients keep their trained adapters; the two stages of `hlora.federation.secure` reach them as requests,
and what each computes on its side passes only through the secure summation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hlora.checkpoint import Checkpoint
from hlora.client.client import FederatedClient
from hlora.client.trainer import LocalTrainer
from hlora.federation.faults import ClientFailure, FaultInjector
from hlora.federation.metrics import round_line
from hlora.federation.prepared import PreparedRun
from hlora.federation.round import Replies, RoundLoop
from hlora.federation.secure import SecureRound, contribution
from hlora.secure.two_stage import SecureSumResult, StageRequest, Summation, default_summation
from hlora.seeding import client_seed, set_rng_state

log = logging.getLogger("hlora")


def run(
    exp: PreparedRun,
    run_dir: Path,
    progress: bool = True,
    resume: Checkpoint | None = None,
    summation: Summation | None = None,
) -> dict[str, Any]:
    """Play every round in-process, writing the run's files into the (new, empty) `run_dir`; with
    `resume` (`checkpoint.open_resume`), the run's own directory, going on after the checkpoint's round
    as if the run had never stopped. Returns the summary. The run directory is locked while it plays
    (`RoundLoop`), and let go however the run ends. `summation`: the secure sum of `[secure]` rounds
    (default: `two_stage.default_summation()`)."""
    loop = RoundLoop(exp, run_dir, resume, carries_secure=True)
    try:
        return _play(loop, resume, progress, summation)
    finally:
        loop.release()


def _play(
    loop: RoundLoop, resume: Checkpoint | None, progress: bool, summation: Summation | None
) -> dict[str, Any]:
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
    secure = SecureRound(exp.server, s.secure) if s.secure.enabled else None
    if secure is not None:
        summation = summation or default_summation()
    if resume is not None:
        set_rng_state(resume.rng)  # last: nothing may draw from them before the rounds
    for rnd in rounds:
        if loop.stop_reason(rnd) is not None:  # the privacy budget: the run ends here, cleanly
            rounds.write(f"stopped before round {rnd}: {loop.stopped}")
            break
        plans = loop.configure(rnd)
        replies = Replies([], {}, corrupted=faults.corrupted(rnd, plans))
        for cid, plan in plans.items():
            try:
                update, replies.results[cid] = faults.fit(
                    clients[cid], plan, rnd, client_seed(s.run.seed, rnd, cid)
                )
            except ClientFailure as e:
                replies.lost[cid] = e.kind
                log.warning("round %d: %s", rnd, e)
                continue
            replies.updates.append(update)
        if secure is not None:
            # The trained adapters stay on the clients' side: the server gets only the secure sums.
            held = {u.client_id: u.weights for u in replies.updates}
            replies.updates = []
            threshold = secure.threshold(len(held))  # one for every sum of the round

            def exchange(
                requests: Mapping[int, StageRequest], held=held, plans=plans, threshold=threshold
            ) -> SecureSumResult:
                inputs = {cid: contribution(held[cid], plans[cid], r) for cid, r in requests.items()}
                return summation(inputs, threshold=threshold)

            done = secure.play(rnd, plans, sorted(held), exchange)
            replies.outcome, replies.sent, replies.secure = done.outcome, done.traffic, done.record
            replies.secure_s = done.seconds
        row = loop.finish(rnd, plans, replies)
        rounds.write(round_line(row, fed.rounds))
    return loop.close()
