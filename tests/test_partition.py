"""Client partitions: a Dirichlet label-skew split (or IID) that is complete, disjoint and reproducible."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.data.partition import (
    _client_sizes,
    _largest_remainder,
    dirichlet_partition,
    format_partition_table,
    partition_table,
    write_partition_csv,
)
from hlora.errors import DataError

FAST = settings(max_examples=40, deadline=None)

alphas = st.one_of(st.sampled_from([0.05, 0.5, 1.0, 10.0, math.inf]), st.floats(0.05, 100.0))


@st.composite
def problems(draw):
    """Labels (2-4 classes, 1-200 rows), a client count and a feasible min_size."""
    n = draw(st.integers(1, 200))
    num_classes = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    num_clients = draw(st.integers(1, min(n, 12)))
    min_size = draw(st.integers(0, min(3, n // num_clients)))
    return labels, num_clients, min_size


def check_cover(parts, n, num_clients):
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(n))  # every row exactly once


@FAST
@given(problems(), alphas, st.integers(0, 1000))
def test_disjoint_complete_and_min_size(problem, alpha, seed):
    labels, k, min_size = problem
    try:
        parts = dirichlet_partition(labels, k, alpha, min_size=min_size, seed=seed, max_tries=200)
    except DataError as e:  # a very skewed draw may never fit min_size; the error must say why
        assert not math.isinf(alpha) and "too small" in str(e)
        return
    check_cover(parts, len(labels), k)
    assert min(len(p) for p in parts) >= min_size


@FAST
@given(problems(), alphas, st.integers(0, 1000))
def test_deterministic_for_a_seed(problem, alpha, seed):
    labels, k, _ = problem
    a = dirichlet_partition(labels, k, alpha, min_size=0, seed=seed)
    b = dirichlet_partition(labels, k, alpha, min_size=0, seed=seed)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0, math.inf])
def test_another_seed_gives_another_split(alpha):
    labels = np.random.default_rng(0).integers(0, 3, size=300)
    a = dirichlet_partition(labels, 5, alpha, seed=1)
    b = dirichlet_partition(labels, 5, alpha, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@FAST
@given(st.integers(1, 300), st.integers(1, 20), st.integers(0, 1000))
def test_iid_sizes_differ_by_at_most_one(n, k, seed):
    k = min(k, n)
    labels = np.zeros(n, dtype=np.int64)
    parts = dirichlet_partition(labels, k, math.inf, min_size=n // k, seed=seed)
    check_cover(parts, n, k)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def mean_label_skew(labels, parts):
    """Mean total-variation distance between each client's label mix and the global one."""
    num_classes = labels.max() + 1
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    return np.mean([
        0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - overall).sum() for p in parts
    ])


def test_smaller_alpha_gives_more_label_skew():
    labels = np.random.default_rng(0).integers(0, 2, size=2000)
    skew = {}
    for alpha in (0.1, 100.0):
        splits = [dirichlet_partition(labels, 10, alpha, min_size=1, seed=s) for s in range(5)]
        skew[alpha] = np.mean([mean_label_skew(labels, parts) for parts in splits])
    assert skew[0.1] > 0.2 > 0.05 > skew[100.0]


def test_impossible_requests_raise():
    labels = np.array([0, 1] * 10)
    with pytest.raises(DataError, match="only 20"):
        dirichlet_partition(labels, 5, 1.0, min_size=5)
    with pytest.raises(DataError, match="too small"):
        dirichlet_partition(labels, 10, 0.01, min_size=2, max_tries=50)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(labels, 2, 0.0)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(labels, 2, float("nan"))
    with pytest.raises(DataError, match="clients"):
        dirichlet_partition(labels, 0, 1.0)


@FAST
@given(problems(), alphas)
def test_table_sizes_sum_to_data_size(problem, alpha):
    labels, k, _ = problem
    names = ["a", "b", "c", "d"]
    parts = dirichlet_partition(labels, k, alpha, min_size=0, seed=0)
    rows = partition_table(parts, labels, names)
    assert [r["client"] for r in rows] == list(range(k))
    assert sum(r["size"] for r in rows) == len(labels)
    for r in rows:
        assert r["size"] == sum(r[name] for name in names)
    for i, name in enumerate(names):
        assert sum(r[name] for r in rows) == int((labels == i).sum())


def test_table_text_and_csv(tmp_path):
    labels = np.array([0, 0, 1, 1, 1])
    rows = partition_table([np.array([0, 2]), np.array([1, 3, 4])], labels, ["neg", "pos"])
    assert rows == [
        {"client": 0, "size": 2, "neg": 1, "pos": 1},
        {"client": 1, "size": 3, "neg": 1, "pos": 2},
    ]
    lines = format_partition_table(rows).splitlines()
    assert lines[0].split() == ["client", "size", "neg", "pos"]
    assert lines[-1].split() == ["all", "5", "2", "3"]
    assert len({len(line) for line in lines}) == 1  # aligned
    path = tmp_path / "partition.csv"
    write_partition_csv(rows, path)
    with path.open(newline="") as f:
        assert list(csv.DictReader(f)) == [{k: str(v) for k, v in r.items()} for r in rows]


# The default "classes" scheme must split exactly as before the "clients" scheme existed (the committed
# runs depend on it): outputs computed with the code of commit c1af176.
PINNED_LABELS = np.array([0, 1, 1, 0, 2, 1, 0, 0, 1, 2, 1, 1, 0, 2, 1, 0, 1, 1, 0, 1])
PINNED = {
    0.5: [[2, 8, 13, 17, 19], [1, 4, 15, 16, 18], [0, 3, 5, 7, 11, 12, 14], [6, 9, 10]],
    5.0: [[0, 17], [4, 10, 15, 18, 19], [6, 8, 11, 16], [1, 2, 3, 5, 7, 9, 12, 13, 14]],
}
PINNED_IID = [[3, 8, 10, 12, 13, 14, 16], [0, 1, 4, 6, 7, 15, 18], [2, 5, 9, 11, 17, 19]]


@pytest.mark.parametrize("alpha", sorted(PINNED))
def test_classes_scheme_splits_as_before(alpha):
    for kwargs in ({}, {"scheme": "classes"}, {"scheme": "classes", "size_sigma": 0.0}):
        parts = dirichlet_partition(PINNED_LABELS, 4, alpha, min_size=2, seed=7, **kwargs)
        assert [p.tolist() for p in parts] == PINNED[alpha]


@pytest.mark.parametrize("scheme", ["classes", "clients"])
def test_iid_is_the_same_split_whatever_the_scheme(scheme):
    parts = dirichlet_partition(PINNED_LABELS, 3, math.inf, seed=7, scheme=scheme)
    assert [p.tolist() for p in parts] == PINNED_IID


sigmas = st.sampled_from([0.0, 0.5, 1.0, 2.0])


@st.composite
def many_clients(draw):
    """Labels (1-4 classes, 1-400 rows, classes unbalanced), up to 40 clients and a feasible min_size."""
    n = draw(st.integers(1, 400))
    num_classes = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    labels = rng.choice(num_classes, size=n, p=rng.dirichlet(np.ones(num_classes)))
    num_clients = draw(st.integers(1, min(n, 40)))
    min_size = draw(st.integers(0, min(8, n // num_clients)))
    return labels, num_clients, min_size


def clients_split(labels, k, alpha, min_size, seed, sigma=1.0):
    return dirichlet_partition(
        labels, k, alpha, min_size=min_size, seed=seed, scheme="clients", size_sigma=sigma
    )


@FAST
@given(many_clients(), alphas, sigmas, st.integers(0, 1000))
def test_clients_scheme_covers_every_row_once_and_min_size(problem, alpha, sigma, seed):
    labels, k, min_size = problem
    parts = clients_split(labels, k, alpha, min_size, seed, sigma)  # never refuses a feasible min_size
    check_cover(parts, len(labels), k)
    assert min(len(p) for p in parts) >= min_size


@FAST
@given(many_clients(), alphas, sigmas, st.integers(0, 1000))
def test_clients_scheme_is_deterministic_for_a_seed(problem, alpha, sigma, seed):
    labels, k, min_size = problem
    a = clients_split(labels, k, alpha, min_size, seed, sigma)
    b = clients_split(labels, k, alpha, min_size, seed, sigma)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_clients_scheme_another_seed_gives_another_split(sigma):
    labels = np.random.default_rng(0).integers(0, 3, size=300)
    a = clients_split(labels, 10, 0.5, 1, seed=1, sigma=sigma)
    b = clients_split(labels, 10, 0.5, 1, seed=2, sigma=sigma)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@FAST
@given(st.integers(1, 500), st.integers(1, 50), st.integers(0, 8), st.integers(0, 1000))
def test_size_sigma_zero_gives_equal_sizes(n, k, min_size, seed):
    k = min(k, n)
    min_size = min(min_size, n // k)
    labels = np.random.default_rng(seed).integers(0, 2, size=n)
    sizes = [len(p) for p in clients_split(labels, k, 0.5, min_size, seed, sigma=0.0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


@FAST
@given(st.integers(1, 2000), st.integers(1, 100), st.integers(0, 10), sigmas, st.integers(0, 1000))
def test_client_sizes_follow_the_lognormal_draw_above_the_minimum(n, k, min_size, sigma, seed):
    k = min(k, n)
    min_size = min(min_size, n // k)
    sizes = _client_sizes(n, k, min_size, sigma, np.random.default_rng(seed))
    assert sizes.sum() == n and sizes.min() >= min_size
    # The clients above the minimum share what the others leave in proportion to the same draw
    # (largest-remainder rounding: each within 1 of its exact share).
    weights = np.random.default_rng(seed).lognormal(0.0, sigma, k)
    free = sizes > min_size
    if free.any():
        budget = n - min_size * int((~free).sum())
        exact = budget * weights[free] / weights[free].sum()
        assert np.all(np.abs(sizes[free] - exact) < 1)


def test_size_sigma_varies_the_sizes():
    labels = np.zeros(5000, dtype=np.int64)
    sizes = np.array([len(p) for p in clients_split(labels, 50, 1.0, 8, seed=0, sigma=1.0)])
    assert sizes.max() > 5 * np.median(sizes) > 5 * sizes.min() / 2


@FAST
@given(st.integers(0, 10_000), st.lists(st.floats(0, 10), min_size=1, max_size=12))
def test_largest_remainder_sums_and_stays_within_one(total, weights):
    weights = np.array(weights)
    if not weights.sum() > 0:
        weights = np.ones(len(weights))
    counts = _largest_remainder(total, weights)
    assert counts.sum() == total and counts.min() >= 0
    assert np.all(np.abs(counts - total * weights / weights.sum()) < 1)


def majority_shares(labels, parts):
    return np.array([np.bincount(labels[p]).max() / len(p) for p in parts])


def test_clients_scheme_small_alpha_gives_one_class_clients_large_alpha_the_data_mix():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat([0, 1, 2], [600, 900, 1500]))
    skewed = clients_split(labels, 30, 0.05, 8, seed=0, sigma=1.0)
    assert np.mean(majority_shares(labels, skewed) > 0.9) > 0.75
    # alpha 1e4: each mix is p up to about 1 / sqrt(1e4); the rows a client gets are those shares rounded.
    mixed = clients_split(labels, 30, 1e4, 8, seed=0, sigma=0.0)
    p = np.bincount(labels) / len(labels)
    for part in mixed:
        assert np.abs(np.bincount(labels[part], minlength=3) / len(part) - p).max() < 0.05
    assert mean_label_skew(labels, mixed) < 0.02 < 0.3 < mean_label_skew(labels, skewed)


MRPC_LIKE = np.random.default_rng(0).permutation(np.repeat([0, 1], [1194, 2474]))


@pytest.mark.parametrize("seed", range(3))
def test_clients_scheme_serves_100_clients_of_mrpc(seed):
    parts = clients_split(MRPC_LIKE, 100, 0.5, 8, seed=seed, sigma=1.0)
    check_cover(parts, len(MRPC_LIKE), 100)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 8 and max(sizes) > 4 * min(sizes)


def test_classes_scheme_cannot_serve_100_clients_of_mrpc():
    # Why the "clients" scheme exists: a client's share of a class is Beta(0.5, 49.5) here, nearly always
    # leaving some client empty.
    with pytest.raises(DataError, match="too small"):
        dirichlet_partition(MRPC_LIKE, 100, 0.5, min_size=8, seed=0, max_tries=50)


def test_clients_scheme_impossible_requests_raise():
    labels = np.array([0, 1] * 10)
    with pytest.raises(DataError, match="only 20"):
        clients_split(labels, 5, 1.0, 5, seed=0)
    with pytest.raises(DataError, match="'label'.*classes, clients"):
        dirichlet_partition(labels, 2, 1.0, scheme="label")
    for sigma in (-1.0, float("nan"), math.inf):
        with pytest.raises(DataError, match="size sigma") as info:
            clients_split(labels, 2, 1.0, 1, seed=0, sigma=sigma)
        assert "\n" not in str(info.value)


def test_split_clients_passes_the_scheme_through():
    from hlora.config import load_settings
    from hlora.federation.prepared import split_clients

    common = ["federation.num_clients=100", "federation.clients_per_round=10", "federation.alpha=0.5"]
    settings = load_settings(None, [*common, "federation.partition='clients'", "federation.size_sigma=0.5"])
    parts, ranks = split_clients(settings, MRPC_LIKE)
    expected = clients_split(MRPC_LIKE, 100, 0.5, 8, seed=0, sigma=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(parts, expected, strict=True))
    assert sorted(ranks) == list(range(100))
    assert load_settings(None, common).federation.partition == "classes"  # the default
