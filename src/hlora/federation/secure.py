"""The server's side of a secure round (`[secure]`): the product mean's factors from secure sums alone.

A secure round runs as any other up to training: `FederatedServer.configure` samples the clients and
plans their work, and they train. Then the trained adapters stay with the clients: the runtime's
`exchange` carries the two stages of `hlora.secure.two_stage` (each client's contribution is computed on
its side and passes only through the secure summation), and `SecureRound.play` turns the sums into the
next global adapter and hands it to `FederatedServer.adopt`. The server never holds a `ClientUpdate`.

What this gives up, against the plain round (README, "Secure aggregation"): the server cannot validate
an update (no per-update norm bound, no outlier rule, no `misreported_samples`: the weights `p_k` are the
server's own and travel down), so a malicious client can poison the sum unseen; the round's instruments
against the exact product mean are not computed (`instruments` is null), only what the sums allow
(`secure.tail_energy`, the share of the sketched mean's energy beyond the bank rank). The protection is
against an honest-but-curious server: it learns the sums, which is what it needs, and nothing a single
client sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hlora.aggregation.base import revive_components
from hlora.config import SecureSettings
from hlora.federation.server import FederatedServer, RoundOutcome, RoundTraffic
from hlora.protocol import ClientPlan
from hlora.secure.two_stage import SCALE_BITS, Exchange, secure_two_stage
from hlora.seeding import sketch_seed
from hlora.weights import AdapterWeights, LoraFactors, tensor_bytes

log = logging.getLogger("hlora.federation")


@dataclass(frozen=True)
class SecureRoundResult:
    """What a secure round gives the round loop: the server's outcome (the global adapter already
    adopted, or the round failed), the bytes that travelled, and the round's `secure` record."""

    outcome: RoundOutcome
    traffic: RoundTraffic
    record: dict[str, Any]
    seconds: float = 0.0  # wall time of the stages: the clients' sketches, the secure sums, the SVD


class SecureRound:
    """Drives a `FederatedServer` through secure rounds: the weights, the stages, adopting the result.

    `settings`: `[secure]` (`sketch_rank` 0 is the round's total client rank, with which the result is
    HLoRA's exactly); the final SVD splits the singular values as the method's `secure_refactor` says."""

    def __init__(self, server: FederatedServer, settings: SecureSettings, resolution_bits: int = SCALE_BITS):
        split = server.aggregator.secure_refactor
        if split is None:
            raise ValueError(f"method {server.aggregator.name!r} cannot be computed from secure sums")
        self.server = server
        self.settings = settings
        self.split = split
        self.resolution = 2.0**-resolution_bits

    def weights(self, clients: Sequence[int]) -> dict[int, float]:
        """`p_k` of the clients that trained, from the server's own partition sizes (1 each without
        one): the server sends each client its weight, so no client chooses it."""
        sizes = self.server.client_sizes
        n = {cid: float(sizes[cid]) if sizes is not None else 1.0 for cid in clients}
        total = sum(n.values())
        return {cid: n[cid] / total for cid in sorted(clients)}

    def play(
        self, rnd: int, plans: Mapping[int, ClientPlan], trained: Sequence[int], exchange: Exchange
    ) -> SecureRoundResult:
        """The secure part of round `rnd`: `trained` are the planned clients that trained (the others
        were lost); `exchange` delivers each stage's requests to them and returns the secure sum. A client
        that drops after the first sum fails the round unless `stage_dropouts` is "renormalise"."""
        server = self.server
        glob = server.global_weights
        shapes = {layer: (f.B.shape[0], f.A.shape[1]) for layer, f in glob.factors.items()}
        head = {name: tuple(t.shape) for name, t in glob.dense.items()}
        clients = sorted(cid for cid in trained if cid in plans)
        total_rank = sum(server.client_ranks[cid] for cid in clients)
        q = self.settings.sketch_rank or total_rank
        record: dict[str, Any] = {"sketch_rank": q, "power_iterations": self.settings.power_iterations}
        candidate, contributors, reason, result = None, (), "", None
        t0 = time.perf_counter()
        if not clients:
            reason = "no client trained"
        else:
            try:
                result = secure_two_stage(
                    exchange,
                    self.weights(clients),
                    shapes,
                    head,
                    server.aggregator.bank_rank,
                    q,
                    sketch_seed(server.seed, rnd),
                    power_iterations=self.settings.power_iterations,
                    split=self.split,
                    resolution=self.resolution,
                )
            except (ValueError, ArithmeticError, RuntimeError) as e:  # too few survivors, a bad sum
                reason = f"the secure sums could not be made: {e}"
        if result is not None:
            record.update(
                stage_clients=[list(ids) for ids in result.stage_clients],
                tail_energy=result.tail_energy,
            )
            left = sorted(set(result.stage_clients[0]) - set(result.survivors))
            if left and self.settings.stage_dropouts == "fail":
                # Their first sum without them in the last would show the server their own sketch.
                reason = (
                    f"client(s) {left} dropped between the secure sums: the round fails rather than let the "
                    "difference of the sums show their contribution (secure.stage_dropouts)"
                )
            else:
                candidate = self._adapter(result.factors, result.head, glob)
                contributors = result.survivors
        outcome = server.adopt(rnd, candidate, contributors, reason)
        up = result.bytes_up if result is not None else {}
        down = result.bytes_down if result is not None else {}
        traffic = RoundTraffic(
            uplink_bytes_by_client={cid: up.get(cid, 0) for cid in clients},
            downlink_bytes_by_client={
                cid: tensor_bytes(plan.downlink().values()) + down.get(cid, 0) for cid, plan in plans.items()
            },
        )
        return SecureRoundResult(outcome, traffic, record, time.perf_counter() - t0)

    def _adapter(
        self, factors: Mapping[str, Any], head: Mapping[str, Any], glob: AdapterWeights
    ) -> AdapterWeights:
        """The global adapter of the sums' factors, in the global adapter's dtypes, dead components
        restarted from the round-0 init as the method's own aggregation does."""
        init = self.server.aggregator.initial
        out = {}
        for layer, (B, A) in factors.items():
            like = glob.factors[layer]
            B, A = B.to(like.B.dtype), A.to(like.A.dtype)
            if init is not None:
                B, A = revive_components(B, A, init.factors[layer].A)
            out[layer] = LoraFactors(B, A)
        return AdapterWeights(out, {name: t.to(glob.dense[name].dtype) for name, t in head.items()})
