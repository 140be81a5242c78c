"""The verdicts read off the paired tables by one rule (`hlora.experiments.verdicts`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from hlora.experiments import verdicts
from hlora.experiments.report import paired_p


def paired_row(group: str, diffs: list[float], traffic: list[float] | None = None,
               aggregate: list[float] | None = None) -> dict:
    """A `report.paired_table` row from per-seed differences (subject minus `group`) and cost ratios."""
    traffic = traffic or [1.0] * len(diffs)
    aggregate = aggregate or [1.0] * len(diffs)

    def std(values: list[float]) -> float | None:
        return float(np.std(values, ddof=1)) if len(values) > 1 else None

    return {
        "group": group, "seeds": len(diffs),
        "final_accuracy_diff_mean": float(np.mean(diffs)), "final_accuracy_diff_std": std(diffs),
        "final_accuracy_p": paired_p(diffs),
        "mean_accuracy_diff_mean": float(np.mean(diffs)) / 2, "mean_accuracy_diff_std": std(diffs),
        "mean_accuracy_p": paired_p([d / 2 for d in diffs]),
        "traffic_ratio": float(np.mean(traffic)), "traffic_ratio_p": paired_p(list(np.log(traffic))),
        "aggregate_ratio": float(np.mean(aggregate)), "aggregate_ratio_p": paired_p(list(np.log(aggregate))),
    }  # fmt: skip


def tier_row(group: str, rank: int, diffs: list[float]) -> dict:
    return {"group": group, "rank": rank, "seeds": len(diffs), "final_diff_mean": float(np.mean(diffs)),
            "final_diff_p": paired_p(diffs)}  # fmt: skip


def by_claim(found: list[verdicts.Verdict], group: str) -> dict[str, verdicts.Verdict]:
    return {v.claim: v for v in found if v.group == group}


def test_a_large_steady_lead_over_three_seeds_is_separated_and_a_noisy_one_is_not():
    steady = paired_row("zeropad", [0.030, 0.028, 0.033], traffic=[1.0] * 3, aggregate=[0.26, 0.27, 0.25])
    noisy = paired_row("flexlora", [-0.03, 0.01, -0.02], aggregate=[12.1, 13.0, 12.5])
    found = verdicts.verdicts([steady, noisy], [], "hlora", ["zeropad", "flexlora"])
    zeropad, flexlora = by_claim(found, "zeropad"), by_claim(found, "flexlora")
    final = zeropad["ends more accurate"]
    assert final.favours == "hlora" and final.separated and final.seeds == 3
    assert final.p == pytest.approx(stats.ttest_1samp([0.030, 0.028, 0.033], 0).pvalue) and final.p < 0.05
    assert final.text == f"hlora +3.0 (p {final.p:.2g})"
    # the cost: zero-padding aggregates in a quarter of HLoRA's time, on every seed
    cost = zeropad["aggregates faster"]
    assert cost.favours == "zeropad" and cost.separated and cost.text.startswith("zeropad 3.85x (p ")
    assert zeropad["sends less"].favours is None and zeropad["sends less"].text == "equal"
    lean = flexlora["ends more accurate"]
    assert lean.favours == "flexlora" and not lean.separated and lean.p > 0.05
    # mean -1.33 points, sd 2.08: t(0.975, 11) x 2.08 / sqrt(12) = 1.32 is the first bound under it
    assert lean.seeds_needed == 12
    assert lean.text == f"not separated: flexlora +1.3 (p {lean.p:.2g}; ~12 seeds to separate)"
    assert flexlora["aggregates faster"].favours == "hlora" and flexlora["aggregates faster"].separated
    assert list(found) == sorted(found, key=lambda v: ["zeropad", "flexlora"].index(v.group))  # rivals' order


def test_one_seed_leans_and_identical_seeds_are_separated_without_a_test():
    one = paired_row("ffa", [0.054], traffic=[0.66])
    same = paired_row("zeropad", [0.02, 0.02, 0.02], traffic=[1.5, 1.5, 1.5])
    found = verdicts.verdicts([one, same], [], "hlora", ["ffa", "zeropad"])
    ffa, zeropad = by_claim(found, "ffa"), by_claim(found, "zeropad")
    assert ffa["ends more accurate"].text == "leaning hlora +5.4 (1 seed)"
    assert not ffa["ends more accurate"].separated and ffa["ends more accurate"].p is None
    assert ffa["sends less"].text == "leaning ffa 1.52x (1 seed)"
    assert zeropad["ends more accurate"].separated and zeropad["ends more accurate"].p is None
    assert zeropad["ends more accurate"].text == "hlora +2.0 (every seed)"
    assert zeropad["sends less"].text == "hlora 1.50x (every seed)"


def test_the_tier_claim_reads_the_rivals_smallest_rank_and_level_is_no_side():
    rows = [paired_row("rablock", [0.0, 0.0])]
    tiers = [tier_row("rablock", 4, [0.05, 0.06]), tier_row("rablock", 2, [-0.01, -0.02]),
             tier_row("zeropad", 8, [0.01, 0.02])]  # fmt: skip
    found = verdicts.verdicts(rows, tiers, "hlora", ["rablock", "zeropad"])
    tier = by_claim(found, "rablock")["lowest tier ends more accurate"]
    assert tier.rank == 2 and tier.favours == "rablock" and tier.effect == pytest.approx(-1.5)
    assert by_claim(found, "rablock")["ends more accurate"].text == "level"
    # zero-padding has no paired row here: its tier verdict alone
    assert [v.claim for v in found if v.group == "zeropad"] == ["lowest tier ends more accurate"]
    assert verdicts.verdicts(rows, tiers, "hlora", []) == []  # only the rivals asked for


def test_a_claim_the_runs_cannot_answer_is_left_out():
    row = paired_row("zeropad", [0.01, 0.02])
    row["aggregate_ratio"] = None  # a side that spent no aggregation time
    row["traffic_ratio"] = float("nan")
    claims = [v.claim for v in verdicts.verdicts([row], [], "hlora", ["zeropad"])]
    assert claims == ["ends more accurate", "converges faster"]
    assert verdicts.records(verdicts.verdicts([row], [], "hlora", ["zeropad"]))[0]["text"].startswith(
        "not separated: hlora +1.5 (p "
    )
    record = verdicts.records(verdicts.verdicts([row], [], "hlora", ["zeropad"]))[0]
    assert record["seeds_needed"] is None  # two seeds: a spread of one degree of freedom is not read
    three = paired_row("zeropad", [0.01, 0.03, -0.005])  # +1.17 points at a spread of 1.76 (p 0.37)
    record = verdicts.records(verdicts.verdicts([three], [], "hlora", ["zeropad"]))[0]
    assert record["seeds_needed"] == 12 and record["text"].endswith("; ~12 seeds to separate)")


@settings(deadline=None, derandomize=True, max_examples=60)
@given(st.lists(st.floats(-0.2, 0.2, allow_nan=False), min_size=2, max_size=6))
def test_separated_exactly_when_the_paired_test_rejects_or_nothing_varies(diffs):
    verdict = verdicts.verdicts([paired_row("other", diffs)], [], "hlora", ["other"])[0]
    mean = float(np.mean(diffs))
    if abs(mean) < 1e-9:
        assert verdict.favours is None and not verdict.separated
        return
    assert verdict.favours == ("hlora" if mean > 0 else "other")
    if np.ptp(diffs) == 0:
        assert verdict.separated and verdict.p is None
    else:
        p = stats.ttest_1samp(diffs, 0.0).pvalue
        assert verdict.separated == (p < verdicts.ALPHA) or math.isclose(p, verdicts.ALPHA)
    assert verdict.effect == pytest.approx(100 * mean)


@settings(deadline=None, derandomize=True, max_examples=60)
@given(st.floats(1e-3, 0.1), st.floats(1e-3, 0.2))
def test_seeds_to_separate_is_the_first_count_whose_bound_the_effect_reaches(effect, spread):
    n = verdicts.seeds_to_separate(effect, spread)

    def bound(k: int) -> float:
        return stats.t.ppf(1 - verdicts.ALPHA / 2, k - 1) * spread / math.sqrt(k)

    assert n is not None and n >= 2
    if n <= verdicts.MAX_SEEDS:
        assert bound(n) <= effect and (n == 2 or bound(n - 1) > effect)
    else:
        assert bound(verdicts.MAX_SEEDS) > effect
    assert verdicts.seeds_to_separate(effect, 0.0) is None  # nothing varies: no test to wait for
