"""Shamir secret sharing over the prime field of the Mersenne prime 2^521 - 1.

A secret `s` becomes the constant term of a random polynomial `f` of degree `t - 1`; the share of the
party at abscissa `x` is `(x, f(x))`. Any `t` shares give `f(0) = s` by Lagrange interpolation; `t - 1`
shares are consistent with every secret, so they tell nothing of it. The field is larger than any
256-bit secret (a 32-byte seed or an X25519 private key), so one element holds one secret.

The coefficients come from the OS (`secrets`): a share never repeats from one run to the next.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
X_BYTES = 4
Y_BYTES = (PRIME.bit_length() + 7) // 8  # 66
SHARE_BYTES = X_BYTES + Y_BYTES


@dataclass(frozen=True)
class Share:
    """One share: the point `(x, y)` of the secret's polynomial, `1 <= x < 2**32`, `0 <= y < PRIME`."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(X_BYTES, "big") + self.y.to_bytes(Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x = int.from_bytes(data[:X_BYTES], "big")
        y = int.from_bytes(data[X_BYTES:], "big")
        if x == 0 or y >= PRIME:
            raise ValueError("a share's x must be nonzero and its y below the field's prime")
        return cls(x, y)


def split(secret: int, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """The shares of `secret` (0 <= secret < PRIME) for the parties at abscissas `xs`, any `threshold` of
    which reconstruct it."""
    if not 0 <= secret < PRIME:
        raise ValueError("shamir: the secret must lie in [0, 2**521 - 1)")
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"shamir: threshold {threshold} must be between 1 and the {len(xs)} parties")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in xs]


def combine(shares: Sequence[Share]) -> int:
    """The polynomial's value at 0 from `shares` (distinct abscissas): the secret when there are at least
    `threshold` of them, an unrelated field element when there are fewer."""
    if not shares:
        raise ValueError("shamir: no shares to combine")
    _check_xs([s.x for s in shares])
    secret = 0
    for i, si in enumerate(shares):
        # Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i)
        numerator, denominator = 1, 1
        for j, sj in enumerate(shares):
            if j != i:
                numerator = numerator * sj.x % PRIME
                denominator = denominator * (sj.x - si.x) % PRIME
        secret = (secret + si.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def split_bytes(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """`split` for a byte string of at most 65 bytes (a 32-byte seed or key)."""
    if len(secret) >= Y_BYTES:
        raise ValueError(f"shamir: a secret of {len(secret)} bytes does not fit the field")
    return split(int.from_bytes(secret, "big"), threshold=threshold, xs=xs)


def combine_bytes(shares: Sequence[Share], length: int) -> bytes:
    """`combine` for a secret of `length` bytes; ValueError when the result does not fit in `length`
    bytes (too few or wrong shares, most likely)."""
    value = combine(shares)
    if value.bit_length() > 8 * length:
        raise ValueError(f"shamir: the shares do not give a {length}-byte secret")
    return value.to_bytes(length, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):  # Horner
        value = (value * x + c) % PRIME
    return value


def _check_xs(xs: Sequence[int]) -> None:
    if any(not 1 <= x < 2 ** (8 * X_BYTES) for x in xs):
        raise ValueError(f"shamir: abscissas must lie in [1, 2**{8 * X_BYTES})")
    if len(set(xs)) != len(xs):
        raise ValueError("shamir: abscissas must be distinct")
