"""A comparison's verdicts: for each rival of the subject (HLoRA in a full comparison), which side each
claim favours, read off the paired tables (`report.paired_table`, `report.paired_tier_table`) by one
stated rule, so that the verdicts are rebuilt with the tables and not written by hand.

The claims (`CLAIMS`): ends more accurate (the final dev accuracy), converges faster (the dev accuracy
averaged over the rounds both evaluated: the area under the curve, which needs no target), the smallest
rank tier ends more accurate (the low-rank clients, whom heterogeneous rules are for), sends less (the
bytes of the run, both ways) and aggregates faster (the server's aggregation time). Accuracy effects are
the subject minus the rival in points; cost effects are the rival's cost as a multiple of the subject's.

The rule, over the seeds both ran (the same partitions, tiers and sampled clients):
- p, the two-sided p-value of the paired t-test on the per-seed differences (on the log of the cost
  ratios), below `ALPHA`: the claim is separated and favours the side its mean favours;
- p at or above `ALPHA`: not separated (the mean's side is shown as a leaning);
- differences that do not vary over two or more seeds (no test to make: a cost fixed by the rules):
  separated, for the side every seed favours;
- one seed: a leaning, no test;
- a zero effect: level.
With three seeds a paired t-test separates only a large, steady effect (t above 4.3), and the dev set
is shared, so its sampling noise is not in p: a verdict says what these runs show, no more. Where an
accuracy claim over three or more seeds is not separated, `seeds_to_separate` says how many seeds an
effect of the size seen, at the spread of the per-seed differences seen, would take for its expected t
to reach the bound: a reading of these runs that tells a near miss from a far one, not a power analysis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    name: str  # how a table names it
    effect: str  # the paired table's column of the mean effect over seeds
    p: str  # and of its p
    cost: bool = False  # an effect that is a ratio of costs (above 1: the subject spends less)
    tier: bool = False  # read from the tier table, at the rival's smallest rank
    spread: str | None = None  # the column of the per-seed differences' standard deviation


CLAIMS = (
    Claim("ends more accurate", "final_accuracy_diff_mean", "final_accuracy_p",
          spread="final_accuracy_diff_std"),
    Claim("converges faster", "mean_accuracy_diff_mean", "mean_accuracy_p", spread="mean_accuracy_diff_std"),
    Claim("lowest tier ends more accurate", "final_diff_mean", "final_diff_p", tier=True,
          spread="final_diff_std"),
    Claim("sends less", "traffic_ratio", "traffic_ratio_p", cost=True),
    Claim("aggregates faster", "aggregate_ratio", "aggregate_ratio_p", cost=True),
)


@dataclass(frozen=True)
class Verdict:
    group: str  # the rival
    claim: str
    seeds: int
    favours: str | None  # the subject, the rival, or None (level)
    separated: bool  # p below ALPHA, or the same effect on every one of two or more seeds
    p: float | None
    effect: float  # accuracy: subject minus rival, in points; cost: the rival's over the subject's
    rank: int | None = None  # the tier of the tier claim
    # an accuracy claim of 3+ seeds not separated: the seeds its effect would take (`seeds_to_separate`)
    seeds_needed: int | None = None

    @property
    def text(self) -> str:
        """The table cell: `hlora +2.5 (p 0.01)`, `not separated: hlora +0.4 (p 0.62)`, `leaning ffa
        +0.7 (1 seed)`, `hlora 12.87x (every seed)`, `level` (accuracy), `equal` (cost)."""
        if self.favours is None:
            return "equal" if self.claim in _COSTS else "level"
        # a cost as the larger side's multiple of the smaller's; accuracy as the leader's lead in points
        lead = abs(self.effect)
        if self.claim in _COSTS:
            effect = f"{max(self.effect, 1 / self.effect):.2f}x"
        else:
            effect = f"+{lead:.2f}" if lead < 0.1 else f"+{lead:.1f}"
        what = f"{self.favours} {effect}"
        if self.seeds < 2:
            return f"leaning {what} (1 seed)"
        how = "every seed" if self.p is None else f"p {_p(self.p)}"
        if self.separated:
            return f"{what} ({how})"
        if self.seeds_needed is not None:
            how += f"; ~{self.seeds_needed} seeds to separate" if self.seeds_needed <= MAX_SEEDS else (
                f"; over {MAX_SEEDS} seeds to separate")
        return f"not separated: {what} ({how})"


MAX_SEEDS = 1000  # `seeds_to_separate` looks no further
_LEVEL = 1e-9  # an effect this small is none: equal accuracies, or traffic equal up to float rounding
_COSTS = {claim.name for claim in CLAIMS if claim.cost}


def verdicts(
    paired: Sequence[dict[str, Any]], paired_tiers: Sequence[dict[str, Any]], subject: str,
    rivals: Sequence[str],
) -> list[Verdict]:  # fmt: skip
    """Every claim of `CLAIMS` for each of `rivals` (the groups the verdicts are about, in their order)
    that the paired tables hold: `paired` rows by group, `paired_tiers` rows by group and rank (the
    smallest rank the rival has for the tier claim). A claim the runs cannot answer (a cost the rival did
    not spend, no tier scored) is left out."""
    by_group = {row["group"]: row for row in paired}
    lowest: dict[str, dict[str, Any]] = {}
    for row in paired_tiers:
        if row["group"] not in lowest or row["rank"] < lowest[row["group"]]["rank"]:
            lowest[row["group"]] = row
    found = []
    for group in rivals:
        for claim in CLAIMS:
            row = lowest.get(group) if claim.tier else by_group.get(group)
            if row is None:
                continue
            verdict = _verdict(claim, row, subject, group)
            if verdict is not None:
                found.append(verdict)
    return found


def _verdict(claim: Claim, row: dict[str, Any], subject: str, group: str) -> Verdict | None:
    value = row[claim.effect]
    if value is None or _missing(value) or (claim.cost and value <= 0):
        return None
    lean, effect = (math.log(value), value) if claim.cost else (value, 100 * value)
    p = row[claim.p]
    p = None if p is None or _missing(p) else float(p)
    seeds = int(row["seeds"])
    favours = None if abs(lean) < _LEVEL else subject if lean > 0 else group
    # `report.paired_p` gives no p for two or more seeds only where the differences do not vary
    separated = favours is not None and seeds >= 2 and (p is None or p < ALPHA)
    rank = int(row["rank"]) if "rank" in row else None
    spread = row.get(claim.spread) if claim.spread else None
    needed = None
    # from three seeds: two give a spread of one degree of freedom (any p 0.5 reads as 11 seeds)
    if favours is not None and seeds >= 3 and not separated and spread is not None and not _missing(spread):
        needed = seeds_to_separate(abs(value), float(spread))
    return Verdict(group, claim.name, seeds, favours, separated, p, float(effect), rank, needed)


def seeds_to_separate(effect: float, spread: float) -> int | None:
    """The fewest seeds n (2 or more) at which a mean paired difference `effect` with standard deviation
    `spread` over the seeds gives the paired t-test's bound: `t(1 - ALPHA/2, n - 1) x spread / sqrt(n)`
    at or below `effect`; `MAX_SEEDS + 1` where even that many do not, None where there is no spread."""
    from scipy.stats import t

    if spread <= 0 or effect <= 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if t.ppf(1 - ALPHA / 2, n - 1) * spread / math.sqrt(n) <= effect:
            return n
    return MAX_SEEDS + 1


def _p(p: float) -> str:
    """Two significant digits, three where two would round onto `ALPHA` (0.0496 is not "0.05")."""
    text = f"{p:.2g}"
    return f"{p:.3g}" if float(text) == ALPHA else text


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def records(found: Sequence[Verdict]) -> list[dict[str, Any]]:
    """Rows for `verdicts.csv`: the fields and the cell text."""
    return [{**asdict(v), "text": v.text} for v in found]
