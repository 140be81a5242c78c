"""Secure two-stage HLoRA below the rank: the rank-`r_g` error of the randomised SVD against the
Eckart-Young optimum, by sketch rank `q` and power iterations, on one adapted weight of MiniLM's size.

    PYTHONPATH=src python scripts/secure_sketch_error.py

Two kinds of clients, 20 of ranks 2/4/8/16 (5 each, R = 150), bank rank 16, equal weights: "independent"
(every client's factors drawn on their own: a flat spectrum, the worst case of a range finder) and
"shared" (every client's B near one common 32-dimensional subspace, as clients fine-tuning one task
tend to be: a decaying spectrum). Each figure is the mean over 5 sketch seeds of
`||dW - B A||_F / ||dW - dW_16||_F` (1 is the optimum).
"""

from __future__ import annotations

import torch

from hlora.secure.two_stage import plain_sum, respond, secure_two_stage
from hlora.weights import AdapterWeights, LoraFactors

M = N = 384
RANKS = [2, 4, 8, 16] * 5
BANK = 16


def clients(kind: str, seed: int = 0) -> dict[int, AdapterWeights]:
    g = torch.Generator().manual_seed(seed)
    common = torch.linalg.qr(torch.randn(M, 32, generator=g, dtype=torch.float64)).Q
    out = {}
    for cid, r in enumerate(RANKS):
        if kind == "shared":
            B = common @ torch.randn(32, r, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
                M, r, generator=g, dtype=torch.float64
            )
        else:
            B = torch.randn(M, r, generator=g, dtype=torch.float64)
        A = torch.randn(r, N, generator=g, dtype=torch.float64) / N**0.5
        out[cid] = AdapterWeights({"w": LoraFactors(B, A)})
    return out


def main() -> None:
    print(f"{'clients':12s} {'q':>4s} " + " ".join(f"{'it=' + str(i):>8s}" for i in (0, 1, 2)))
    for kind in ("independent", "shared"):
        cs = clients(kind)
        p = {cid: 1 / len(cs) for cid in cs}
        dW = sum(p[c] * f.factors["w"].B @ f.factors["w"].A for c, f in cs.items())
        optimum = float(torch.linalg.svdvals(dW)[BANK:].square().sum().sqrt())

        def exchange(requests, cs=cs):
            return plain_sum({cid: respond(cs[cid], r) for cid, r in requests.items()})

        for q in (16, 24, 32, 64, sum(RANKS)):
            ratios = []
            for iters in (0, 1, 2):
                errs = []
                for seed in range(5):
                    out = secure_two_stage(
                        exchange, p, {"w": (M, N)}, {}, BANK, q, seed, power_iterations=iters
                    )
                    B, A = out.factors["w"]
                    errs.append(float(torch.linalg.norm(dW - B @ A)) / optimum)
                ratios.append(sum(errs) / len(errs))
            print(f"{kind:12s} {q:4d} " + " ".join(f"{x:8.4f}" for x in ratios))
    up_secure = {q: 8 * q * (M + N) for q in (16, 32, sum(RANKS))}
    print("bytes per client per adapted weight and stage (float64 sums):", up_secure)
    print("HLoRA, each way (float32):", {r: 4 * r * (M + N) for r in sorted(set(RANKS))})


if __name__ == "__main__":
    main()
