"""The change a client's update makes, its L2 norm, and the clip coefficient `c_k = min(1, C / norm)`.

Product rules (`private_space = "products"`, HLoRA, FlexLoRA): client `k`'s change of an adapted weight
is `B_k A_k - B0_k A0_k` (`B0_k, A0_k`: the adapter of the plan it was sent), which is what the server
aggregates; clipping the factors instead would bound neither the change nor its product. Its squared
Frobenius norm is `||[B, -B0] [A; A0]||_F^2 = sum((Bs^T Bs) * (As As^T))` with `Bs = [B, -B0]`
(`m x (r + r0)`) and `As = [A; A0]` (`(r + r0) x n`): two small Gram matrices, never the dense `m x n`
product. The head's change (`weights.dense` minus what was sent) adds its own squared norm.

Linear rules (`private_space = "factors"`, zero-padding, FedIT, FFA-LoRA): they average the factors, so
the change is in factor space: every travelling tensor (`ClientPlan.uplink`) minus what was sent.

Pure functions of a plan and an adapter: the server calls them on every accepted update (a client
cannot evade its clip), and a client can call the same ones on its own update before it sends it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from hlora.protocol import ClientPlan
from hlora.weights import AdapterWeights

Space = Literal["products", "factors"]


def product_change_square(B: Tensor, A: Tensor, B0: Tensor, A0: Tensor) -> Tensor:
    """`||B @ A - B0 @ A0||_F^2` from `2r x 2r` Gram matrices, in float64 (a 0-d tensor, >= 0).

    Shapes: `B` is `m x r`, `A` is `r x n`, `B0` is `m x r0`, `A0` is `r0 x n`."""
    Bs = torch.cat([B.detach().double(), -B0.detach().double().to(B.device)], dim=1)
    As = torch.cat([A.detach().double(), A0.detach().double().to(A.device)], dim=0)
    return ((Bs.T @ Bs) * (As @ As.T)).sum().clamp_min(0)  # round-off can make a zero square negative


def change_norm(plan: ClientPlan, trained: AdapterWeights, space: Space) -> float:
    """The L2 norm of the change `trained` makes to what `plan` sent, over every adapted weight and the
    head: in product space (`space = "products"`) or over the travelling tensors ("factors")."""
    sent = plan.adapter
    total = torch.zeros((), dtype=torch.float64)
    if space == "products":
        for layer, f0 in sent.factors.items():
            f = trained.factors[layer]
            total = total + product_change_square(f.B, f.A, f0.B, f0.A).cpu()
        pairs = [(trained.dense[name], t0) for name, t0 in sent.dense.items()]
    elif space == "factors":
        now, before = plan.uplink(trained), plan.uplink(sent)
        pairs = [(now[name], t0) for name, t0 in before.items()]
    else:
        raise ValueError(f"unknown change space {space!r}; use 'products' or 'factors'")
    for t, t0 in pairs:
        total = total + (t.detach().double() - t0.detach().double().to(t.device)).square().sum().cpu()
    return math.sqrt(float(total))


def clip_coefficient(norm: float, clip: float) -> float:
    """`c = min(1, clip / norm)`: the factor that scales a change of L2 norm `norm` to at most `clip`
    (1 for a change already within it, and for a zero change). `clip` may be `inf` (no clipping)."""
    if not clip > 0:
        raise ValueError(f"the clip norm must be > 0, got {clip}")
    if not math.isfinite(norm):
        raise ValueError(f"the change norm must be finite, got {norm}")
    return 1.0 if norm <= clip else clip / norm
