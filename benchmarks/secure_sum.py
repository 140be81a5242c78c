"""Cost of one secure sum (`hlora.secure.masking`) against a plain numpy sum, one thread.

For each vector length and number of dropouts: the wall time of `secure_sum` (all parties in one
process, one after another), then the same rounds played by hand to split it into what one client
spends (its share and mask rounds, mean over clients) and what the server spends (routing and
unmasking), and the bytes a surviving client sends and receives; beside them the plain
`np.sum` of the same vectors. Masks are fresh on every repeat; the median is printed.

    python benchmarks/secure_sum.py [--clients 20] [--lengths 100000 1000000] [--dropouts 0 2] [--repeats 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from hlora.secure.masking import (  # noqa: E402
    MaskingClient,
    MaskingServer,
    default_threshold,
    encode,
    secure_sum,
)


def play_timed(inputs: dict[int, np.ndarray], dropouts: list[int]) -> tuple[float, float]:
    """(mean seconds of one surviving client over its four rounds, seconds of the server)."""
    ids = sorted(inputs)
    client_s = dict.fromkeys(ids, 0.0)

    def timed(u, call, *args):
        start = time.perf_counter()
        out = call(*args)
        client_s[u] += time.perf_counter() - start
        return out

    clients = {u: MaskingClient(u, encode(inputs[u], 24)) for u in ids}
    server = MaskingServer(default_threshold(len(ids)), len(inputs[ids[0]]))
    server_s = 0.0
    adverts = [timed(u, clients[u].advertise_keys) for u in ids]
    start = time.perf_counter()
    roster = server.collect_keys(adverts)
    server_s += time.perf_counter() - start
    shared = [timed(u, clients[u].share_keys, roster) for u in ids]
    start = time.perf_counter()
    inboxes = server.route_shares(shared)
    server_s += time.perf_counter() - start
    survivors = [u for u in ids if u not in dropouts]
    masked = [timed(u, clients[u].masked_input, inboxes[u]) for u in survivors]
    start = time.perf_counter()
    survivor_list = server.collect_masked(masked)
    server_s += time.perf_counter() - start
    replies = [timed(u, clients[u].unmask, survivor_list) for u in survivors]
    start = time.perf_counter()
    server.unmask(replies)
    server_s += time.perf_counter() - start
    return statistics.mean(client_s[u] for u in survivors), server_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--lengths", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dropouts", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    print(
        f"{'length':>9} {'drop':>4} {'numpy s':>9} {'secure s':>9} {'x numpy':>8} {'client s':>9} "
        f"{'server s':>9} {'up B/client':>12} {'down B/client':>14} {'up/8d':>6}"
    )
    for length in args.lengths:
        rng = np.random.default_rng(0)
        inputs = {u: rng.normal(size=length) for u in range(args.clients)}
        for n_drop in args.dropouts:
            dropouts = list(range(1, 1 + 2 * n_drop, 2))[:n_drop]  # clients 1, 3, ...
            survivors = [u for u in inputs if u not in dropouts]
            plain, secure, client, server = [], [], [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                np.sum([inputs[u] for u in survivors], axis=0)
                plain.append(time.perf_counter() - start)
                start = time.perf_counter()
                result = secure_sum(inputs, dropouts=dropouts)
                secure.append(time.perf_counter() - start)
                c, s = play_timed(inputs, dropouts)
                client.append(c)
                server.append(s)
            timings = {"p": plain, "s": secure, "c": client, "v": server}
            med = {k: statistics.median(v) for k, v in timings.items()}
            up = result.bytes_up[survivors[0]]
            down = result.bytes_down[survivors[0]]
            print(
                f"{length:>9} {n_drop:>4} {med['p']:>9.4f} {med['s']:>9.3f} {med['s'] / med['p']:>8.0f} "
                f"{med['c']:>9.3f} {med['v']:>9.3f} {up:>12,} {down:>14,} {up / (8 * length):>6.3f}"
            )


if __name__ == "__main__":
    main()
