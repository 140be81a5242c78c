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

With `[privacy]` too (distributed DP): every client clips its own change in product space (what it was
sent subtracted, head included, `privacy.clipping`) to `C`, scales it by `1/m` and adds its share of
Gaussian noise, `N(0, sigma^2 / t)` on every entry with `sigma = z C / m` and `t` the secure sums'
threshold, so that the shares of any `t` survivors add up to at least `sigma`: the server, which adds
the public mean of what it sent in the clear, sees only noised sums. Each sum is a Gaussian mechanism of
sensitivity `2C/m` (replace-one; the sketch is orthonormal), `2 + 2 power_iterations` of them a round,
which the accountant composes (`privacy.accountant`). What it does not cover is in the README
("Privacy with secure aggregation").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from hlora.aggregation.base import revive_components
from hlora.config import SecureSettings
from hlora.federation.server import FederatedServer, RoundOutcome, RoundTraffic
from hlora.privacy.clipping import change_norm, clip_coefficient
from hlora.privacy.mechanism import DpMechanism, GaussianNoise
from hlora.protocol import ClientPlan
from hlora.secure.masking import default_threshold
from hlora.secure.two_stage import (
    SCALE_BITS,
    Exchange,
    StagePrivacy,
    StageRequest,
    respond,
    secure_two_stage,
)
from hlora.seeding import noise_share_seed, sketch_seed
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


def contribution(trained: AdapterWeights, plan: ClientPlan, request: StageRequest) -> np.ndarray:
    """A client's answer to a stage request, on its side, from its trained adapter and the plan it was
    sent: the plain contribution (`two_stage.respond`), or under distributed DP its change clipped to
    `request.clip` in product space, times `request.weight`, plus its share of the noise."""
    if request.clip is None:
        return respond(trained, request)
    c = clip_coefficient(change_norm(plan, trained, "products"), request.clip)
    plain = replace(request, clip=None)
    out = c * (respond(trained, plain) - respond(plan.adapter, plain))
    if request.noise_std > 0:
        out = out + request.noise_std * GaussianNoise(request.noise_seed).draw(out.shape).numpy()
    return out


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

    def threshold(self, asked: int) -> int:
        """The fewest clients every secure sum of a round needs, `asked` clients in its first sum:
        `secure.threshold`, else a strict majority of them. The runtime passes the same one to each of
        the round's sums (under DP it is also the number of noise shares that carry sigma, so a later sum
        with fewer survivors must not open)."""
        return self.settings.threshold or default_threshold(asked)

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
        dp = server.privacy
        # Under DP the sums also hold the mean of what was sent (the server's public part), of rank up to
        # the bank rank: the default sketch covers it too, so that without noise the result is exact.
        q = self.settings.sketch_rank or total_rank + (server.aggregator.bank_rank if dp is not None else 0)
        record: dict[str, Any] = {"sketch_rank": q, "power_iterations": self.settings.power_iterations}
        candidate, contributors, reason, result = None, (), "", None
        t0 = time.perf_counter()
        private = self._private(rnd, dp, plans, len(clients)) if dp is not None and clients else None
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
                    private=private,
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
        released = None
        if private is not None:
            # the server never sees a change, so neither its norm nor whether it was clipped
            released = {
                "sigma": dp.sigma,
                "clipped": None,
                "aggregated": len(contributors),
                "norm_median": None,
                "noise_shares": round(dp.sigma**2 / private.share_std**2) if private.share_std else None,
            }
        outcome = server.adopt(rnd, candidate, contributors, reason, released)
        up = result.bytes_up if result is not None else {}
        down = result.bytes_down if result is not None else {}
        traffic = RoundTraffic(
            uplink_bytes_by_client={cid: up.get(cid, 0) for cid in clients},
            downlink_bytes_by_client={
                cid: tensor_bytes(plan.downlink().values()) + down.get(cid, 0) for cid, plan in plans.items()
            },
        )
        return SecureRoundResult(outcome, traffic, record, time.perf_counter() - t0)

    def _private(
        self, rnd: int, dp: DpMechanism, plans: Mapping[int, ClientPlan], asked: int
    ) -> StagePrivacy:
        """Distributed DP for round `rnd`: the requests' clip, weight `1/m` and noise share (`t` shares of
        any survivors carry `sigma`, `t` the sums' threshold for the `asked` clients), and the server's
        public part: the mean over the whole sample `S` (`plans`) of what it sent, `1/|S|` each."""
        t = self.threshold(asked)
        sample = sorted(plans)

        def public(request: StageRequest) -> np.ndarray:
            plain = replace(request, weight=1 / len(sample), clip=None, noise_std=0.0, noise_seed=None)
            return sum(respond(plans[cid].adapter, plain) for cid in sample)

        def noise_seed(cid: int, stage: int) -> int | None:
            return None if dp.secure_noise else noise_share_seed(self.server.seed, rnd, cid, stage)

        return StagePrivacy(
            clip=dp.clip,
            weight=1 / dp.clients_per_round,
            share_std=dp.sigma / math.sqrt(t),
            noise_seed=noise_seed,
            public=public,
        )

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
