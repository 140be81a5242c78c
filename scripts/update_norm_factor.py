"""Where `federation.update_norm_factor`'s default comes from: the committed run records.

Every `metrics.jsonl` row holds `client_update_norm`, the change norm of each valid update of the round.
For every round with two or more, this prints the largest honest ratio `max(norm) / lower_median(norm)`
(what the bound must let through) and the smallest ratio of one update boosted `--boost` times against
the lower median of its round with the boosted one in it (what the bound must refuse).

    .venv/bin/python scripts/update_norm_factor.py [results] [--boost 1000]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from hlora.federation.validation import lower_median


def round_norms(root: Path) -> list[list[float]]:
    """The change norms of every round with at least two valid updates, in every `metrics.jsonl` under
    `root`."""
    rounds = []
    for path in sorted(Path(root).rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                norms = list(json.loads(line).get("client_update_norm", {}).values())
                if len(norms) >= 2:
                    rounds.append(norms)
    return rounds


def ratios(rounds: Sequence[Sequence[float]], boost: float) -> tuple[list[float], list[float]]:
    """Per round, the honest ratio `max / lower median`; per round and client, the ratio of that client's
    update boosted `boost` times to the lower median of the round that includes it."""
    honest, boosted = [], []
    for norms in rounds:
        honest.append(max(norms) / lower_median(norms))
        for k in range(len(norms)):
            round_with = [n * boost if j == k else n for j, n in enumerate(norms)]
            boosted.append(round_with[k] / lower_median(round_with))
    return honest, boosted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=Path(__file__).resolve().parents[1] / "results", type=Path)
    parser.add_argument("--boost", type=float, default=1e3)
    args = parser.parse_args()
    rounds = round_norms(args.root)
    honest, boosted = ratios(rounds, args.boost)
    files = len(list(args.root.rglob("metrics.jsonl")))
    print(f"{len(rounds)} rounds with 2+ valid updates in {files} metrics.jsonl under {args.root}")
    print(f"largest honest ratio max/lower-median: {max(honest):.3f}")
    print(f"smallest ratio of an update boosted {args.boost:g} times: {min(boosted):.1f}")
    print(f"a factor between them with the same margin both ways: {(max(honest) * min(boosted)) ** 0.5:.1f}")


if __name__ == "__main__":
    main()
