"""Client partitions: a Dirichlet label-skew split (or IID) that is complete, disjoint and reproducible."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.data.partition import (
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
