"""Pairwise-mask secure summation (`hlora.secure.masking`): the sum is exact, dropouts are recovered, and
what the server receives holds the sum and nothing else of a client's input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.secure import masking
from hlora.secure.masking import (
    Inbox,
    MaskingClient,
    MaskingServer,
    ProtocolAbort,
    SurvivorList,
    decode,
    default_threshold,
    encode,
    fixed_point_bound,
    pairwise_mask,
    prg,
    secure_sum,
)

SMALL = settings(deadline=None, derandomize=True, max_examples=15)


def random_inputs(n: int, d: int, seed: int = 0, scale: float = 1.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: scale * rng.normal(size=d) for u in range(n)}


def fixed_sum(inputs, ids, scale_bits=24) -> np.ndarray:
    return np.sum([encode(inputs[u], scale_bits) for u in ids], axis=0, dtype=np.int64)


class Played:
    """The four rounds played by hand, so that a test can look at (or tamper with) any message."""

    def __init__(self, inputs, dropouts=(), threshold=None, scale_bits=24):
        ids = sorted(inputs)
        t = threshold or default_threshold(len(ids))
        self.inputs = inputs
        self.clients = {u: MaskingClient(u, encode(inputs[u], scale_bits)) for u in ids}
        self.server = MaskingServer(t, len(inputs[ids[0]]))
        self.roster = self.server.collect_keys([c.advertise_keys() for c in self.clients.values()])
        self.inboxes = self.server.route_shares([c.share_keys(self.roster) for c in self.clients.values()])
        self.survivors = [u for u in ids if u not in dropouts]
        self.dropped = [u for u in ids if u in dropouts]
        self.scale_bits = scale_bits

    def finish(self) -> np.ndarray:
        masked = [self.clients[u].masked_input(self.inboxes[u]) for u in self.survivors]
        self.survivor_list = self.server.collect_masked(masked)
        self.replies = [self.clients[u].unmask(self.survivor_list) for u in self.survivor_list.survivors]
        return self.server.unmask(self.replies)


def test_total_is_the_exact_fixed_point_sum():
    inputs = random_inputs(7, 300, seed=1)
    result = secure_sum(inputs)
    assert result.survivors == tuple(range(7))
    assert np.array_equal(result.total_fixed, fixed_sum(inputs, range(7)))
    assert result.total.dtype == np.float64 and result.total.shape == (300,)
    exact = np.sum(list(inputs.values()), axis=0)
    # each encoding is off by at most 2^-(s+1); the float sum adds a few ulps of |x| ~ 1
    assert np.max(np.abs(result.total - exact)) <= 7 * 2.0**-24


def test_two_calls_give_bit_identical_totals_with_different_masks():
    inputs = random_inputs(5, 200, seed=2)
    first, second = secure_sum(inputs, dropouts=[3]), secure_sum(inputs, dropouts=[3])
    assert first.total.tobytes() == second.total.tobytes()
    assert not np.array_equal(first.server_view.masked_inputs[0], second.server_view.masked_inputs[0])


@SMALL
@given(
    n=st.integers(1, 7),
    dropout_bits=st.integers(0, 2**7 - 1),
    threshold_offset=st.integers(0, 3),
    d=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_any_dropouts_leaving_t_survivors_are_recovered_fewer_refused(
    n, dropout_bits, threshold_offset, d, seed
):
    inputs = random_inputs(n, d, seed=seed)
    dropouts = [u for u in range(n) if dropout_bits >> u & 1]
    t = min(default_threshold(n) + threshold_offset, n)
    survivors = [u for u in range(n) if u not in dropouts]
    if len(survivors) < t:
        with pytest.raises(ValueError, match=f"fewer than the threshold t = {t}"):
            secure_sum(inputs, dropouts=dropouts, threshold=t)
        return
    result = secure_sum(inputs, dropouts=dropouts, threshold=t)
    assert result.survivors == tuple(survivors)
    assert np.array_equal(result.total_fixed, fixed_sum(inputs, survivors))


def test_survivors_that_miss_the_unmasking_stay_in_the_sum():
    inputs = random_inputs(6, 50, seed=3)
    result = secure_sum(inputs, dropouts=[5], unmask_dropouts=[0])  # t = 4: 4 of the 5 survivors answer
    assert result.survivors == (0, 1, 2, 3, 4)
    assert np.array_equal(result.total_fixed, fixed_sum(inputs, range(5)))
    with pytest.raises(ValueError, match="3 clients sent unmask shares, fewer than the threshold t = 4"):
        secure_sum(inputs, dropouts=[5], unmask_dropouts=[0, 1])


def seeded_randomness(monkeypatch, seed: int) -> None:
    """The parties' keys, self-mask seeds and nonces from a seeded generator instead of the OS, so that a
    statistical check draws the same masks on every run (CI is red only for a reason)."""
    import os
    import random

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    rng = random.Random(seed)

    class SeededKeys:
        generate = staticmethod(lambda: X25519PrivateKey.from_private_bytes(rng.randbytes(32)))
        from_private_bytes = staticmethod(X25519PrivateKey.from_private_bytes)

    monkeypatch.setattr(masking, "X25519PrivateKey", SeededKeys)
    monkeypatch.setattr(masking, "os", type("SeededOs", (), {"urandom": staticmethod(rng.randbytes)}))
    assert os.urandom is not rng.randbytes  # the real module is untouched


def test_masked_inputs_look_uniform_and_uncorrelated_with_the_input(monkeypatch):
    seeded_randomness(monkeypatch, 2026)
    d = 40_000
    inputs = random_inputs(4, d, seed=4, scale=100.0)
    result = secure_sum(inputs, dropouts=[2])
    view = result.server_view
    assert set(view.masked_inputs) == {0, 1, 3}
    for u, y in view.masked_inputs.items():
        encoded = encode(inputs[u], 24).view(np.uint64)
        assert not np.any(y == encoded)
        # the top 4 bits: 16 bins of d / 16 expected; chi-square with 15 degrees of freedom, p ~ 1e-7 at 60
        counts = np.bincount((y >> np.uint64(60)).astype(np.int64), minlength=16)
        expected = d / 16
        assert np.sum((counts - expected) ** 2 / expected) < 60
        # the masked value read as a signed number against the input: no linear relation
        signed = y.view(np.int64).astype(np.float64)
        assert abs(np.corrcoef(signed, inputs[u])[0, 1]) < 5 / np.sqrt(d)
        # and the differences y - enc(x) are as uniform as y itself (the mask is independent of x)
        assert abs(
            np.corrcoef((y - encoded).view(np.int64).astype(np.float64), inputs[u])[0, 1]
        ) < 5 / np.sqrt(d)


def test_unmask_shares_never_reveal_both_secrets_of_one_client():
    inputs = random_inputs(7, 10, seed=5)
    result = secure_sum(inputs, dropouts=[1, 4])
    replies = result.server_view.unmask_shares
    assert {m.sender for m in replies} == set(result.survivors)
    seed_owners, key_owners = set(), set()
    for m in replies:
        assert not set(m.self_mask_shares) & set(m.mask_key_shares)
        seed_owners |= set(m.self_mask_shares)
        key_owners |= set(m.mask_key_shares)
    assert seed_owners == set(result.survivors)
    assert key_owners == {1, 4}
    assert not seed_owners & key_owners


def test_a_dropped_clients_revealed_key_cancels_exactly_its_pairwise_masks():
    inputs = random_inputs(6, 64, seed=6)
    played = Played(inputs, dropouts=[2, 5])
    total = played.finish()
    assert np.array_equal(total.view(np.int64), fixed_sum(inputs, played.survivors))
    view = played.server.view
    rebuilt = {v: played.server.dropped_client_masks(v, played.replies) for v in played.dropped}
    roster = played.roster.adverts
    for u in played.survivors:
        client = played.clients[u]
        # what is left of y_u once its input, its self mask and its masks with the other survivors are gone
        rest = view.masked_inputs[u] - encode(inputs[u], 24).view(np.uint64) - prg(client._self_seed, 64)
        for w in played.survivors:
            if w != u:
                rest -= pairwise_mask(u, client._mask_key, w, roster[w].mask_public_key, 64)
        # is exactly the masks with the dropped clients, as the server rebuilt them from the shares
        from_shares = np.zeros(64, dtype=np.uint64)
        for v in played.dropped:
            from_shares += rebuilt[v][u]
        assert np.array_equal(rest, from_shares)
        assert np.any(from_shares != 0)


def test_a_tampered_share_is_detected_and_the_recipient_aborts():
    inputs = random_inputs(4, 8, seed=7)
    played = Played(inputs)
    box = played.inboxes[1]
    blob = bytearray(box.ciphertexts[0])
    blob[-1] ^= 1  # one bit of the tag
    tampered = Inbox(1, {**box.ciphertexts, 0: bytes(blob)})
    with pytest.raises(ProtocolAbort, match="shares from client 0 do not authenticate"):
        played.clients[1].masked_input(tampered)
    # a share re-addressed to another recipient does not authenticate either (the ids are associated data)
    swapped = Inbox(1, {**box.ciphertexts, 0: played.inboxes[2].ciphertexts[0]})
    with pytest.raises(ProtocolAbort, match="do not authenticate"):
        played.clients[1].masked_input(swapped)
    # an untouched inbox still works: the abort left the client's state alone
    played.clients[1].masked_input(box)


def test_a_client_unmasks_once_and_only_for_a_sound_survivor_list():
    played = Played(random_inputs(4, 8, seed=8), dropouts=[3])
    played.finish()
    with pytest.raises(ProtocolAbort, match="twice"):
        played.clients[0].unmask(played.survivor_list)
    fresh = Played(random_inputs(4, 8, seed=8))
    for u in range(4):
        fresh.clients[u].masked_input(fresh.inboxes[u])
    with pytest.raises(ProtocolAbort, match="subset"):
        fresh.clients[0].unmask(SurvivorList((0, 1, 9)))
    with pytest.raises(ProtocolAbort, match="survivors"):
        fresh.clients[0].unmask(SurvivorList((0, 1)))


def test_a_roster_without_the_clients_own_keys_aborts():
    played = Played(random_inputs(3, 4))
    forged = dataclasses.replace(
        played.roster, adverts={**played.roster.adverts, 0: played.roster.adverts[1]}
    )
    with pytest.raises(ProtocolAbort, match="own keys"):
        played.clients[0].share_keys(forged)


def test_bytes_count_every_message():
    d, n = 100, 5
    result = secure_sum(random_inputs(n, d), dropouts=[4])
    ct = masking.CIPHERTEXT_BYTES + 8
    keys = 8 + 64
    shares_up = 8 + (n - 1) * ct
    unmask = 8 + n * (8 + masking.shamir.SHARE_BYTES)  # 4 survivors' seeds (its own too), 1 dropped key
    assert result.bytes_up[0] == keys + shares_up + 8 + 8 * d + unmask
    assert result.bytes_up[4] == keys + shares_up  # dropped before its masked input
    roster = 8 + n * keys
    assert result.bytes_down[0] == roster + (n - 1) * ct + 8 * 4
    assert result.bytes_down[4] == roster + (n - 1) * ct


def test_fixed_point_round_trip_and_bound():
    x = np.array([1.5, -2.25, 0.0, 3.0e-8])
    assert np.array_equal(decode(encode(x, 24).view(np.uint64), 24), np.round(x * 2**24) / 2**24)
    bound = fixed_point_bound(20, 24)
    assert bound == pytest.approx(2.0**63 / 20 / 2**24)
    with pytest.raises(ValueError, match=r"client 3 has \|x\| = .* above the fixed-point bound"):
        secure_sum({u: np.full(4, 2 * bound if u == 3 else 0.0) for u in range(20)})
    near = secure_sum({u: np.full(4, bound * 0.999) for u in range(20)})  # 20 of them just fit in int64
    assert np.all(near.total > 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inputs": {}}, "no inputs"),
        ({"inputs": {0: np.zeros(3), 1: np.zeros(4)}}, "one length"),
        ({"inputs": {0: np.zeros((2, 2)), 1: np.zeros((2, 2))}}, "1-D"),
        ({"inputs": {0: np.zeros(3), 1: np.array([0.0, np.nan, 1.0])}}, "client 1's input is not finite"),
        ({"inputs": {0: np.zeros(3), 1: np.array([0.0, np.inf, 1.0])}}, "not finite"),
        ({"inputs": {"a": np.zeros(3)}}, "int64 integers"),
        ({"inputs": {u: np.zeros(3) for u in range(4)}, "threshold": 2}, r"threshold must be .* \[3, 4\]"),
        ({"inputs": {u: np.zeros(3) for u in range(4)}, "threshold": 5}, "threshold"),
        ({"inputs": {u: np.zeros(3) for u in range(4)}, "dropouts": [7]}, "dropouts names clients"),
        ({"inputs": {u: np.zeros(3) for u in range(4)}, "scale_bits": 63}, "scale_bits"),
        ({"inputs": {u: np.zeros(3) for u in range(4)}, "scale_bits": 2.5}, "scale_bits"),
        ({"inputs": {u: np.zeros(3) for u in range(4)}, "dropouts": [0, 1]}, "2 of 4 clients survive"),
    ],
)
def test_bad_settings_refused_in_one_line(kwargs, match):
    inputs = kwargs.pop("inputs")
    with pytest.raises(ValueError, match=match) as caught:
        secure_sum(inputs, **kwargs)
    assert "\n" not in str(caught.value)


def test_a_client_that_aborts_on_a_tampered_share_counts_as_dropped_and_the_sum_stays_exact():
    inputs = random_inputs(5, 16, seed=9)
    played = Played(inputs)
    box = played.inboxes[2]
    blob = bytearray(box.ciphertexts[4])
    blob[masking.NONCE_BYTES] ^= 0x80  # a bit of the ciphertext body
    masked = []
    for u in range(5):
        inbox = Inbox(2, {**box.ciphertexts, 4: bytes(blob)}) if u == 2 else played.inboxes[u]
        try:
            masked.append(played.clients[u].masked_input(inbox))
        except ProtocolAbort:
            assert u == 2
    survivor_list = played.server.collect_masked(masked)
    assert survivor_list.survivors == (0, 1, 3, 4)
    replies = [played.clients[u].unmask(survivor_list) for u in survivor_list.survivors]
    assert all(2 in m.mask_key_shares and 2 not in m.self_mask_shares for m in replies)
    total = played.server.unmask(replies)
    assert np.array_equal(total.view(np.int64), fixed_sum(inputs, [0, 1, 3, 4]))
