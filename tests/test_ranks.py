"""Rank policies: which rank each client trains at, and the config checks on them."""

from __future__ import annotations

from collections import Counter

import pytest

from hlora.config import LoraSettings, load_settings
from hlora.errors import ConfigError
from hlora.federation.ranks import assign_ranks, resolve_bank_rank, tier_counts


def test_fixed_gives_every_client_the_rank():
    assert assign_ranks(LoraSettings(rank=6), [10, 3, 7], seed=0) == {0: 6, 1: 6, 2: 6}


def test_tiers_follow_the_shares_and_cover_every_client():
    lora = LoraSettings(rank_policy="tiers", tiers=[2, 4, 8], tier_shares=[0.5, 0.3, 0.2])
    ranks = assign_ranks(lora, [5] * 10, seed=0)
    assert sorted(ranks) == list(range(10))
    assert Counter(ranks.values()) == {2: 5, 4: 3, 8: 2}


def test_tiers_are_deterministic_per_seed_and_shuffled_by_it():
    lora = LoraSettings(rank_policy="tiers", tiers=[1, 2, 4, 8])
    draws = {seed: assign_ranks(lora, [1] * 12, seed=seed) for seed in range(6)}
    assert assign_ranks(lora, [1] * 12, seed=3) == draws[3]
    assert len({tuple(d.values()) for d in draws.values()}) > 1  # the seed picks who lands where
    for d in draws.values():
        assert Counter(d.values()) == {1: 3, 2: 3, 4: 3, 8: 3}  # equal shares when unset


def test_tier_counts_round_by_largest_remainder():
    assert tier_counts(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert tier_counts(4, [1, 1, 1]) == [2, 1, 1]  # one left over: ties go to the earlier tier
    assert tier_counts(7, [0.1, 0.1, 0.8]) == [1, 1, 5]  # quotas .7 .7 5.6: the two .7 remainders win
    assert tier_counts(3, [1 / 3, 1 / 3, 1 / 3]) == [1, 1, 1]  # exact floors, whatever the floats
    assert tier_counts(2, [1, 1, 1]) == [1, 1, 0]  # fewer clients than tiers: sums still match
    for k in range(1, 30):
        counts = tier_counts(k, [0.15, 0.25, 0.6])
        assert sum(counts) == k
        assert all(int(k * s) <= c <= int(k * s) + 1 for c, s in zip(counts, [0.15, 0.25, 0.6], strict=True))


def test_data_size_rank_grows_with_the_size_quantile():
    # K = 5, r_max = 8: sizes sorted 10 < 20 = 20 < 50 < 90, so q = [1, 3, 3, 4, 5] for clients
    # [10, 20, 20, 50, 90]; r_k = max(1, floor(q_k / 5 * 8)) = [1, 4, 4, 6, 8]
    lora = LoraSettings(rank_policy="data_size", rank=8)
    ranks = assign_ranks(lora, [50, 20, 90, 10, 20], seed=0)
    assert ranks == {0: 6, 1: 4, 2: 8, 3: 1, 4: 4}
    assert assign_ranks(lora, [50, 20, 90, 10, 20], seed=1) == ranks  # the seed plays no part
    # ten clients at r_max 2: the smallest four would floor to 0 and get 1
    small = assign_ranks(LoraSettings(rank_policy="data_size", rank=2), list(range(1, 11)), seed=0)
    assert list(small.values()) == [1, 1, 1, 1, 1, 1, 1, 1, 1, 2]


def test_bank_rank_defaults_to_the_largest_client_rank():
    lora = LoraSettings(rank_policy="tiers", tiers=[1, 2, 4])
    assert resolve_bank_rank(lora, {0: 1, 1: 2}) == 2  # only the tiers that clients landed in count
    assert resolve_bank_rank(lora.model_copy(update={"bank_rank": 16}), {0: 1, 1: 4}) == 16


def test_bank_rank_below_the_largest_client_rank_is_refused():
    with pytest.raises(ConfigError, match=r"bank_rank \(4\) is below the largest client rank \(8"):
        load_settings(None, ["lora.rank=8", "lora.bank_rank=4"])
    with pytest.raises(ConfigError, match=r"bank_rank \(8\) is below the largest client rank \(16"):
        load_settings(None, ["lora.rank_policy='tiers'", "lora.tiers=[2, 16]", "lora.bank_rank=8"])
    assert load_settings(None, ["lora.rank=8", "lora.bank_rank=12"]).lora.bank_rank == 12


def test_tier_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="tier_shares has 2 entries but tiers has 3"):
        load_settings(
            None, ["lora.rank_policy='tiers'", "lora.tiers=[1, 2, 4]", "lora.tier_shares=[0.5, 0.5]"]
        )
    with pytest.raises(ConfigError, match="'lora.tier_shares'.*> 0"):
        load_settings(None, ["lora.rank_policy='tiers'", "lora.tiers=[1, 2]", "lora.tier_shares=[1.0, 0.0]"])
    with pytest.raises(ConfigError, match="'lora.tiers'.*>= 1"):
        load_settings(None, ["lora.rank_policy='tiers'", "lora.tiers=[0, 2]"])
    with pytest.raises(ConfigError, match='rank_policy "tiers" needs tiers'):
        load_settings(None, ["lora.rank_policy='tiers'"])
    with pytest.raises(ConfigError, match="'lora.rank_policy'.*'fixed', 'tiers' or 'data_size'"):
        load_settings(None, ["lora.rank_policy='random'"])
