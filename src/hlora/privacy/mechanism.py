"""The DP-FedAvg mechanism of a round: clip each change, average with fixed weights, add Gaussian noise.

The estimator is the fixed-denominator one of DP-FedAvg (McMahan et al. 2018): every client of the
round's sample `S` (the clients the server planned for, `|S| = m = clients_per_round`) has weight
`1 / m`, whatever its data size. DP-FedAvg needs weights that do not depend on client data; the usual
`p_k = n_k / sum n_j` do (they reveal and depend on every sampled client's size), and a denominator that
counted the valid updates would let one client's update change another's weight. A planned client whose
update was refused or never came contributes no change (its clipped change is 0), so what the release
depends on, per client, is only that client's own clipped change.

Products (`private_space = "products"`), per adapted weight:

    dW = sum_{k in S} [ (1/|S|) B0_k A0_k + (c_k/m) (B_k A_k - B0_k A0_k) ] + N(0, sigma^2),  sigma = z C / m

(`B0_k A0_k`: what client `k` was sent, public; `c_k = min(1, C / ||change_k||)`, `clipping`). The sum is a
product mean of `2|S|` pairs with the non-negative weights `1/|S| - c_k/m` and `c_k/m` (summing to 1),
built by `products.product_mean`. The noise is dense by nature, so this is the one place the dense
`m x n` matrix is built; the rule then re-factors it at the bank rank (`Aggregator.from_noisy_mean`,
post-processing: the guarantee is kept). The head: the same estimator plus noise.

Factors (`private_space = "factors"`): the same estimator on the zero-padded travelling tensors (every
coordinate at the bank rank gets noise; FFA-LoRA's frozen `A` does not travel, neither changes nor gets
noise), then the rule's usual post-steps.

With `C = inf`, `z = 0` and every planned client valid, the products path is the rule's plain aggregate
with uniform weights (to round-off: the dense SVD instead of the QR path).

The noise comes from `seeding.noise_seed(seed, round)` (reproducible, so a resumed run is bit-identical;
for experiments only: whoever knows the seed can subtract it), or with `secure_noise` from the OS's
CSPRNG (`secrets`), by Box-Muller on 53-bit uniforms (not reproducible; floating-point Gaussian samples
keep the known least-significant-bit caveat of Mironov 2012).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hlora.aggregation.base import Aggregator
from hlora.aggregation.products import product_mean
from hlora.privacy.clipping import change_norm, clip_coefficient
from hlora.protocol import ClientPlan, ClientUpdate
from hlora.seeding import noise_seed
from hlora.weights import AdapterWeights

_WORK = torch.float64


@dataclass(frozen=True)
class PrivateRound:
    """What the mechanism did in one round, for the metrics row."""

    sigma: float  # the noise's standard deviation on the mean, z C / m
    norms: dict[int, float] = field(default_factory=dict)  # client id -> its change's L2 norm, unclipped
    coefficients: dict[int, float] = field(default_factory=dict)  # client id -> c_k

    @property
    def clipped(self) -> int:
        """How many accepted updates were scaled down (`c_k < 1`)."""
        return sum(c < 1 for c in self.coefficients.values())

    def record(self) -> dict[str, Any]:
        """The row's figures; `norm_median` (the round's median unclipped change norm, what a clip `C` is
        chosen from) is the server's own record, not part of any release."""
        norms = sorted(self.norms.values())
        return {
            "sigma": self.sigma,
            "clipped": self.clipped,
            "aggregated": len(self.coefficients),
            "norm_median": float(np.median(norms)) if norms else None,
        }


class GaussianNoise:
    """Standard normal draws in float64 on the CPU: seeded (a torch Generator) or from the OS."""

    def __init__(self, seed: int | None) -> None:
        self._gen = None if seed is None else torch.Generator().manual_seed(seed)

    def draw(self, shape: Sequence[int]) -> Tensor:
        if self._gen is not None:
            return torch.randn(tuple(shape), generator=self._gen, dtype=_WORK)
        count = math.prod(shape)
        raw = np.frombuffer(secrets.token_bytes(16 * count), dtype=np.uint64).reshape(2, count)
        u1, u2 = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return torch.from_numpy(z).reshape(tuple(shape))


@dataclass(frozen=True)
class DpMechanism:
    """The server's DP-FedAvg mechanism: clip norm `C`, noise multiplier `z`, `m` clients a round."""

    clip: float
    noise_multiplier: float
    clients_per_round: int
    seed: int
    secure_noise: bool = False

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {self.clients_per_round}")

    @property
    def sigma(self) -> float:
        """The noise's standard deviation on the mean: `z C / m` (0 without noise, whatever `C`)."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.noise_multiplier * self.clip / self.clients_per_round

    def noise(self, rnd: int) -> GaussianNoise:
        return GaussianNoise(None if self.secure_noise else noise_seed(self.seed, rnd))

    def aggregate(
        self,
        aggregator: Aggregator,
        global_weights: AdapterWeights,
        rnd: int,
        plans: Mapping[int, ClientPlan],
        accepted: Sequence[ClientUpdate],
    ) -> tuple[AdapterWeights, PrivateRound]:
        """The next global adapter from the round's `plans` (client id -> what it was sent: the sample
        `S`) and its `accepted` updates, and what was clipped. Raises ValueError for a method without a
        private path or updates that do not fit their plans."""
        space = aggregator.private_space
        if space is None:
            raise ValueError(f"{aggregator.name} has no private path")
        if len(plans) > self.clients_per_round:
            raise ValueError(f"{len(plans)} planned clients, the mechanism's m is {self.clients_per_round}")
        trained = {u.client_id: u.weights for u in accepted}
        if not trained.keys() <= plans.keys():
            raise ValueError(f"updates from unplanned clients {sorted(trained.keys() - plans.keys())}")
        norms = {cid: change_norm(plans[cid], w, space) for cid, w in sorted(trained.items())}
        coefficients = {cid: clip_coefficient(norm, self.clip) for cid, norm in norms.items()}
        m, noise = self.clients_per_round, self.noise(rnd)
        order = sorted(plans)
        sent = [plans[cid] for cid in order]
        # (weight of what was sent, weight of what came back) per planned client: 1/|S| - c/m and c/m,
        # both >= 0 (|S| <= m, c <= 1) and summing to 1 over S
        c = [coefficients.get(cid, 0.0) for cid in order]  # 0: refused or lost, no change
        w = [(1 / len(order) - ck / m, ck / m) for ck in c]
        back = [trained.get(cid) for cid in order]
        if space == "products":
            layers = {
                layer: self._product_layer(layer, sent, back, w, noise) for layer in global_weights.factors
            }
            travelling = global_weights.dense
        else:
            up = sent[0].uplink(global_weights)
            travelling = up
            layers = {}
        means = {
            name: self._tensor_mean(name, target, sent, back, w, noise, space)
            for name, target in travelling.items()
        }
        if space == "factors":
            layers = {name: t for name, t in means.items() if name not in global_weights.dense}
            means = {name: t for name, t in means.items() if name in global_weights.dense}
        result = aggregator.from_noisy_mean(global_weights, layers, means)
        return result, PrivateRound(self.sigma, norms, coefficients)

    def _product_layer(
        self,
        layer: str,
        sent: list[ClientPlan],
        back: list[AdapterWeights | None],
        w: list[tuple[float, float]],
        noise: GaussianNoise,
    ) -> Tensor:
        """`dW` of one adapted weight, noised (float64, `m x n`): the product mean of the pairs sent
        and returned with the estimator's weights (weight-0 pairs left out)."""
        pairs, weights = [], []
        for plan, trained, (w_sent, w_back) in zip(sent, back, w, strict=True):
            f0 = plan.adapter.factors[layer]
            if w_sent > 0:
                pairs.append((f0.B.double(), f0.A.double()))
                weights.append(w_sent)
            if trained is not None and w_back > 0:
                f = trained.factors[layer]
                pairs.append((f.B.double(), f.A.double()))
                weights.append(w_back)
        return self._noised(product_mean(pairs, weights), noise)  # the weights sum to 1: no rescaling

    def _tensor_mean(
        self,
        name: str,
        target: Tensor,
        sent: list[ClientPlan],
        back: list[AdapterWeights | None],
        w: list[tuple[float, float]],
        noise: GaussianNoise,
        space: str,
    ) -> Tensor:
        """The estimator on one tensor (the head, or a travelling factor zero-padded to `target`'s
        shape), noised, in float64."""
        out = torch.zeros(target.shape, dtype=_WORK, device=target.device)
        for plan, trained, (w_sent, w_back) in zip(sent, back, w, strict=True):
            t0 = _pad(_flat(plan.adapter, plan, space)[name], target.shape)
            out += w_sent * t0.to(out.device)
            if trained is not None:  # else c = 0: the client's whole weight is on what it was sent
                out += w_back * _pad(_flat(trained, plan, space)[name], target.shape).to(out.device)
        return self._noised(out, noise)

    def _noised(self, mean: Tensor, noise: GaussianNoise) -> Tensor:
        if self.sigma == 0:
            return mean
        return mean + self.sigma * noise.draw(mean.shape).to(mean.device)


def _flat(weights: AdapterWeights, plan: ClientPlan, space: str) -> Mapping[str, Tensor]:
    return weights.tensors() if space == "products" else plan.uplink(weights)


def _pad(t: Tensor, shape: torch.Size) -> Tensor:
    """`t` (a factor at a client's rank, or a tensor of `shape`) zero-padded to `shape`, in float64:
    `lora_A` (`r x n`) gets rows, `lora_B` (`m x r`) columns."""
    t = t.detach().to(_WORK)
    if t.shape == shape:
        return t
    if t.ndim != 2 or len(shape) != 2 or t.shape[0] > shape[0] or t.shape[1] > shape[1]:
        raise ValueError(f"a tensor of shape {tuple(t.shape)} does not fit {tuple(shape)}")
    out = t.new_zeros(shape)
    out[: t.shape[0], : t.shape[1]] = t
    return out
