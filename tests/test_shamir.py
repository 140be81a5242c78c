"""Shamir secret sharing (`hlora.secure.shamir`): any `t` shares give the secret, `t - 1` do not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.secure import shamir
from hlora.secure.shamir import PRIME, Share, combine, combine_bytes, split, split_bytes

SMALL = settings(deadline=None, derandomize=True, max_examples=25)


@st.composite
def sharings(draw):
    """A secret, its threshold and parties, and which of their shares a reconstruction uses (shuffled)."""
    n = draw(st.integers(1, 8))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    secret = draw(st.integers(0, PRIME - 1))
    order = draw(st.permutations(range(n)))
    return secret, t, xs, order


@SMALL
@given(sharings())
def test_any_t_shares_reconstruct(case):
    secret, t, xs, order = case
    shares = split(secret, threshold=t, xs=xs)
    for k in range(t, len(xs) + 1):
        assert combine([shares[i] for i in order[:k]]) == secret


@SMALL
@given(sharings())
def test_t_minus_one_shares_do_not(case):
    secret, t, xs, order = case
    if t == 1:
        return
    shares = split(secret, threshold=t, xs=xs)
    # The coefficients are uniform in the field: t - 1 shares hit the secret with probability 1 / PRIME.
    assert combine([shares[i] for i in order[: t - 1]]) != secret


def test_t_minus_one_shares_fit_every_secret():
    """Perfect secrecy, shown: for any candidate secret there is a polynomial of degree t - 1 through the
    t - 1 shares and (0, candidate), so the shares rule out no secret."""
    shares = split(12345, threshold=3, xs=[1, 2, 3])
    for candidate in (0, 12345, 999, PRIME - 1):
        points = [(0, candidate), (shares[0].x, shares[0].y), (shares[1].x, shares[1].y)]
        y3 = _interpolate(points, shares[2].x)
        assert combine([shares[0], shares[1], Share(shares[2].x, y3)]) == candidate


def _interpolate(points, x):
    value = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if j != i:
                term = term * (x - xj) * pow(xi - xj, -1, PRIME) % PRIME
        value = (value + term) % PRIME
    return value


def test_shares_differ_every_run():
    assert split(7, threshold=2, xs=[1, 2]) != split(7, threshold=2, xs=[1, 2])


def test_bytes_round_trip():
    secret = bytes(range(32))
    shares = split_bytes(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    assert combine_bytes(shares[2:], 32) == secret
    assert all(Share.from_bytes(s.to_bytes()) == s for s in shares)
    assert len(shares[0].to_bytes()) == shamir.SHARE_BYTES


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: split(1, threshold=0, xs=[1, 2]), "threshold"),
        (lambda: split(1, threshold=3, xs=[1, 2]), "threshold"),
        (lambda: split(1, threshold=1, xs=[0, 2]), "abscissas"),
        (lambda: split(1, threshold=1, xs=[2, 2]), "distinct"),
        (lambda: split(PRIME, threshold=1, xs=[1]), "secret"),
        (lambda: combine([]), "no shares"),
        (lambda: Share.from_bytes(b"\x00" * 3), "bytes"),
    ],
)
def test_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
