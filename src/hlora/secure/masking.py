"""Pairwise-mask secure summation (SecAgg, Bonawitz et al., CCS 2017), as its parties and their rounds.

The server learns the sum of the surviving clients' vectors and nothing else of any one of them. Each
client `u` encodes its vector in fixed point in Z_{2^64} and sends

    y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} sign(u, v) PRG(s_uv)        (mod 2^64)

where `b_u` is a fresh self-mask seed, `s_uv` the key that `u` and `v` agree by X25519 on their mask keys
(`sign` is +1 when u < v, -1 otherwise, so the pairwise masks of two survivors cancel in the sum), and
`U2` the clients that shared their secrets. Before masking, each client splits `b_u` and its mask private
key `s_u^SK` into Shamir shares (threshold `t`) and sends one of each to every peer, encrypted with
ChaCha20-Poly1305 under a key agreed by X25519 on a second key pair, through the server. After the masked
inputs arrive, each survivor reveals, for every peer, either its share of `b_v` (v survived: the server
removes v's self mask) or its share of `s_v^SK` (v dropped: the server recomputes and removes v's
pairwise masks with the survivors), never both for the same peer. So a dropped client's input stays out
of the sum, and a survivor's input is never unmasked alone: its pairwise masks would need `s_u^SK`, which
no honest client reveals for a survivor.

The rounds (Bonawitz et al.'s numbering), each a method that takes and returns plain messages, so that
a deployment can carry the same messages over its own transport (Flower Messages, say):

    0 advertise keys  client.advertise_keys()        -> KeyAdvert      server.collect_keys     -> Roster
    1 share keys      client.share_keys(Roster)      -> EncryptedShares server.route_shares    -> Inbox
    2 masked input    client.masked_input(Inbox)     -> MaskedInput    server.collect_masked   -> SurvivorList
    3 unmasking       client.unmask(SurvivorList)    -> UnmaskShares   server.unmask           -> the sum

`secure_sum` plays them in-process. The model of threats is SecAgg's honest-but-curious server (and any
fewer than `t` colluding clients): the round of consistency checks with signatures that protects against
a server that lies about who dropped, and a PKI for the keys, are left out (see `secure_sum`).

Keys, seeds and Shamir coefficients come from the OS, never from a seed: the masks differ on every run,
but they cancel exactly in Z_{2^64}, so the sum of the same inputs is bit-identical on every run.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from hlora.secure import shamir
from hlora.secure.shamir import Share

KEY_BYTES = 32
ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
# plaintext of one encrypted share pair: sender id, recipient id, share of s_u^SK, share of b_u
PLAINTEXT_BYTES = 2 * ID_BYTES + 2 * shamir.SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + PLAINTEXT_BYTES + TAG_BYTES
_CIPHER_INFO = b"hlora secure-sum share cipher v1"
_MASK_INFO = b"hlora secure-sum pairwise mask v1"


class ProtocolAbort(RuntimeError):
    """A party met a message that the protocol says to abort on: a share that does not authenticate
    (tampered, or encrypted for someone else), a roster without the client's own keys or with repeated
    keys, a survivor list that is not a subset of the clients that shared, a second unmasking request.

    The client stops there and sends nothing more. A client that aborts on its inbox (round 2) has sent
    no masked input, so to the server it is a client that dropped after sharing its keys: its pairwise
    masks are cancelled from its key shares and its input stays out of the sum, and nothing of its input
    was revealed (its key only unmasks a `y_u` that was never sent). Bonawitz et al. abort the client's
    part in the same way. `secure_sum`, where no party tampers, lets it propagate (a bug)."""


# ---------------------------------------------------------------------------------------------------
# messages: what travels between a client and the server. `nbytes` is the size of a plain encoding
# (ids as 8 bytes, keys 32, shares `shamir.SHARE_BYTES`, vectors 8 bytes an entry).


@dataclass(frozen=True)
class KeyAdvert:
    """Round 0, client -> server: its two X25519 public keys (one to encrypt shares, one for masks)."""

    sender: int
    cipher_public_key: bytes
    mask_public_key: bytes

    @property
    def nbytes(self) -> int:
        return ID_BYTES + 2 * KEY_BYTES


@dataclass(frozen=True)
class Roster:
    """Round 0, server -> every client: the adverts of all clients that advertised (U1), and `t`."""

    adverts: Mapping[int, KeyAdvert]
    threshold: int

    @property
    def nbytes(self) -> int:
        return ID_BYTES + sum(a.nbytes for a in self.adverts.values())


@dataclass(frozen=True)
class EncryptedShares:
    """Round 1, client -> server: for each peer, the peer's shares of the sender's `s^SK` and `b`,
    encrypted so that only that peer can read them (nonce || ChaCha20-Poly1305 ciphertext and tag)."""

    sender: int
    ciphertexts: Mapping[int, bytes]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + sum(ID_BYTES + len(c) for c in self.ciphertexts.values())


@dataclass(frozen=True)
class Inbox:
    """Round 1, server -> one client: the ciphertexts addressed to it, by sender. Its senders and the
    recipient are U2, the clients whose masks a masked input must carry."""

    recipient: int
    ciphertexts: Mapping[int, bytes]

    @property
    def nbytes(self) -> int:
        return sum(ID_BYTES + len(c) for c in self.ciphertexts.values())


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client -> server: `y_u` in Z_{2^64} (uint64)."""

    sender: int
    masked: np.ndarray

    @property
    def nbytes(self) -> int:
        return ID_BYTES + 8 * int(self.masked.size)


@dataclass(frozen=True)
class SurvivorList:
    """Round 2, server -> every survivor: U3, the clients whose masked inputs arrived."""

    survivors: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES * len(self.survivors)


@dataclass(frozen=True)
class UnmaskShares:
    """Round 3, client -> server: its shares of `b_v` for survivors `v` (itself included) and of `s_v^SK`
    for the clients that shared keys but sent no masked input. The two key sets are disjoint."""

    sender: int
    self_mask_shares: Mapping[int, Share]
    mask_key_shares: Mapping[int, Share]

    @property
    def nbytes(self) -> int:
        count = len(self.self_mask_shares) + len(self.mask_key_shares)
        return ID_BYTES + count * (ID_BYTES + shamir.SHARE_BYTES)


@dataclass(frozen=True)
class ServerView:
    """Everything the server received, in order: `(round, message)` with round 0-3 as above."""

    received: tuple[tuple[int, KeyAdvert | EncryptedShares | MaskedInput | UnmaskShares], ...]

    def of_round(self, round_: int) -> list:
        return [m for r, m in self.received if r == round_]

    @property
    def masked_inputs(self) -> dict[int, np.ndarray]:
        return {m.sender: m.masked for m in self.of_round(2)}

    @property
    def unmask_shares(self) -> list[UnmaskShares]:
        return self.of_round(3)


@dataclass(frozen=True)
class SecureSumResult:
    """What `secure_sum` returns. `total` (float64, shape (d,)): the sum of the survivors' inputs after
    fixed-point rounding; `total_fixed` (int64): the same sum as the exact fixed-point integers."""

    total: np.ndarray
    survivors: tuple[int, ...]
    server_view: ServerView
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    total_fixed: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------
# primitives


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform elements of Z_{2^64} (uint64) from a 32-byte seed: the ChaCha20 keystream."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def agree(private_key: X25519PrivateKey, peer_public_key: bytes, info: bytes) -> bytes:
    """A 32-byte key shared by the two ends: HKDF-SHA256 of their X25519 agreement, bound to `info`."""
    secret = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def pairwise_mask(
    own_id: int, mask_private_key: X25519PrivateKey, peer_id: int, peer_mask_public_key: bytes, length: int
) -> np.ndarray:
    """The mask that `own_id` adds for its peer: +PRG(s_uv) when own_id < peer_id, else -PRG(s_uv)."""
    stream = prg(agree(mask_private_key, peer_mask_public_key, _MASK_INFO), length)
    return stream if own_id < peer_id else np.negative(stream)  # uint64 negation wraps mod 2^64


def fixed_point_bound(n_clients: int, scale_bits: int) -> float:
    """The largest |x| a client may encode so that the sum of `n_clients` encodings stays inside int64."""
    return ((2**63 - 1) // max(n_clients, 1)) / 2.0**scale_bits


def encode(x: np.ndarray, scale_bits: int) -> np.ndarray:
    """Fixed point: round(x * 2**scale_bits) as int64 (round half to even). The caller checks the bound."""
    return np.rint(np.ldexp(np.asarray(x, dtype=np.float64), scale_bits)).astype(np.int64)


def decode(total: np.ndarray, scale_bits: int) -> np.ndarray:
    """Back to float64 from Z_{2^64} read as two's complement."""
    return np.ldexp(total.view(np.int64).astype(np.float64), -scale_bits)


def _id_bytes(client_id: int) -> bytes:
    return client_id.to_bytes(ID_BYTES, "big", signed=True)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# ---------------------------------------------------------------------------------------------------
# parties


class MaskingClient:
    """One client of the protocol: holds its input and secrets, and answers each round's message."""

    def __init__(self, client_id: int, encoded: np.ndarray) -> None:
        """`encoded`: the client's vector in fixed point (int64, see `encode`)."""
        self.client_id = client_id
        self._x = np.asarray(encoded, dtype=np.int64).view(np.uint64)
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = os.urandom(KEY_BYTES)
        self._roster: Roster | None = None
        self._peers_in_u2: tuple[int, ...] = ()
        # shares this client holds of each U2 member's secrets (its own included): id -> (s^SK share, b share)
        self._held: dict[int, tuple[Share, Share]] = {}
        self._answered_unmask = False

    # round 0
    def advertise_keys(self) -> KeyAdvert:
        return KeyAdvert(self.client_id, _raw_public(self._cipher_key), _raw_public(self._mask_key))

    # round 1
    def share_keys(self, roster: Roster) -> EncryptedShares:
        """Shamir-split `s^SK` and `b` among the roster, and encrypt each peer's pair for that peer."""
        ids = sorted(roster.adverts)
        own = roster.adverts.get(self.client_id)
        if own != self.advertise_keys():
            raise ProtocolAbort(f"client {self.client_id}: the roster does not carry its own keys")
        keys = [k for a in roster.adverts.values() for k in (a.cipher_public_key, a.mask_public_key)]
        if len(set(keys)) != len(keys):
            raise ProtocolAbort(f"client {self.client_id}: the roster repeats a public key")
        if not 1 <= roster.threshold <= len(ids):
            raise ProtocolAbort(
                f"client {self.client_id}: threshold {roster.threshold} for {len(ids)} clients"
            )
        self._roster = roster
        xs = [_abscissa(ids, v) for v in ids]
        key_shares = shamir.split_bytes(_raw_private(self._mask_key), threshold=roster.threshold, xs=xs)
        seed_shares = shamir.split_bytes(self._self_seed, threshold=roster.threshold, xs=xs)
        ciphertexts = {}
        for v, key_share, seed_share in zip(ids, key_shares, seed_shares, strict=True):
            if v == self.client_id:
                self._held[v] = (key_share, seed_share)
                continue
            plaintext = (
                _id_bytes(self.client_id) + _id_bytes(v) + key_share.to_bytes() + seed_share.to_bytes()
            )
            cipher = ChaCha20Poly1305(
                agree(self._cipher_key, roster.adverts[v].cipher_public_key, _CIPHER_INFO)
            )
            nonce = os.urandom(NONCE_BYTES)
            ciphertexts[v] = nonce + cipher.encrypt(
                nonce, plaintext, _id_bytes(self.client_id) + _id_bytes(v)
            )
        return EncryptedShares(self.client_id, ciphertexts)

    # round 2
    def masked_input(self, inbox: Inbox) -> MaskedInput:
        """Decrypt and keep the peers' shares, then send the input under its self mask and one pairwise
        mask per peer in U2. A share that does not authenticate aborts, before anything is masked."""
        roster = self._require_roster()
        if inbox.recipient != self.client_id or not set(inbox.ciphertexts) <= set(roster.adverts):
            raise ProtocolAbort(f"client {self.client_id}: an inbox for someone else or from strangers")
        if len(inbox.ciphertexts) + 1 < roster.threshold:
            raise ProtocolAbort(f"client {self.client_id}: fewer than t = {roster.threshold} clients shared")
        for v, blob in sorted(inbox.ciphertexts.items()):
            self._held[v] = self._open(v, blob)
        self._peers_in_u2 = tuple(sorted(inbox.ciphertexts))
        length = self._x.size
        y = self._x + prg(self._self_seed, length)
        for v in self._peers_in_u2:
            y += pairwise_mask(self.client_id, self._mask_key, v, roster.adverts[v].mask_public_key, length)
        return MaskedInput(self.client_id, y)

    def _open(self, sender: int, blob: bytes) -> tuple[Share, Share]:
        roster = self._require_roster()
        cipher = ChaCha20Poly1305(
            agree(self._cipher_key, roster.adverts[sender].cipher_public_key, _CIPHER_INFO)
        )
        try:
            plaintext = cipher.decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], _id_bytes(sender) + _id_bytes(self.client_id)
            )
        except InvalidTag:
            raise ProtocolAbort(
                f"client {self.client_id}: the shares from client {sender} do not authenticate (tampered)"
            ) from None
        if plaintext[: 2 * ID_BYTES] != _id_bytes(sender) + _id_bytes(self.client_id):
            raise ProtocolAbort(f"client {self.client_id}: shares from {sender} name other parties")
        body = plaintext[2 * ID_BYTES :]
        return (
            Share.from_bytes(body[: shamir.SHARE_BYTES]),
            Share.from_bytes(body[shamir.SHARE_BYTES :]),
        )

    # round 3
    def unmask(self, survivor_list: SurvivorList) -> UnmaskShares:
        """For each member of U2: its `b` share if it survived, its `s^SK` share if it dropped. Answered
        once: a second request (a server trying another survivor list) aborts."""
        if self._answered_unmask:
            raise ProtocolAbort(f"client {self.client_id}: asked to unmask twice")
        roster = self._require_roster()
        survivors = set(survivor_list.survivors)
        u2 = set(self._peers_in_u2) | {self.client_id}
        if self.client_id not in survivors or not survivors <= u2:
            raise ProtocolAbort(f"client {self.client_id}: the survivor list is not a subset of U2 with it")
        if len(survivors) < roster.threshold:
            raise ProtocolAbort(f"client {self.client_id}: fewer than t = {roster.threshold} survivors")
        self._answered_unmask = True
        seeds = {v: self._held[v][1] for v in sorted(u2 & survivors)}
        keys = {v: self._held[v][0] for v in sorted(u2 - survivors)}
        return UnmaskShares(self.client_id, seeds, keys)

    def _require_roster(self) -> Roster:
        if self._roster is None:
            raise ProtocolAbort(f"client {self.client_id}: a round out of order")
        return self._roster


class MaskingServer:
    """The server: routes the clients' messages, and from the survivors' masked inputs and unmask shares
    computes their sum. It records everything it receives (`view`)."""

    def __init__(self, threshold: int, length: int) -> None:
        self.threshold = threshold
        self.length = length
        self._received: list[tuple[int, object]] = []
        self._adverts: dict[int, KeyAdvert] = {}
        self._u2: tuple[int, ...] = ()
        self._masked: dict[int, np.ndarray] = {}

    @property
    def view(self) -> ServerView:
        return ServerView(tuple(self._received))

    def collect_keys(self, adverts: Collection[KeyAdvert]) -> Roster:
        self._received += [(0, a) for a in adverts]
        self._adverts = {a.sender: a for a in sorted(adverts, key=lambda a: a.sender)}
        self._require(len(self._adverts), "advertised keys")
        return Roster(dict(self._adverts), self.threshold)

    def route_shares(self, messages: Collection[EncryptedShares]) -> dict[int, Inbox]:
        """Each sender's ciphertexts, regrouped by recipient; only U2's members get an inbox."""
        self._received += [(1, m) for m in messages]
        senders = {m.sender for m in messages if m.sender in self._adverts}
        self._u2 = tuple(sorted(senders))
        self._require(len(self._u2), "shared their keys")
        inboxes: dict[int, dict[int, bytes]] = {v: {} for v in self._u2}
        for m in messages:
            if m.sender not in senders:
                continue
            for v, blob in m.ciphertexts.items():
                if v in inboxes and v != m.sender:
                    inboxes[v][m.sender] = blob
        return {v: Inbox(v, box) for v, box in inboxes.items()}

    def collect_masked(self, messages: Collection[MaskedInput]) -> SurvivorList:
        self._received += [(2, m) for m in messages]
        for m in messages:
            if m.sender in self._u2 and m.masked.shape == (self.length,) and m.masked.dtype == np.uint64:
                self._masked[m.sender] = m.masked
        self._require(len(self._masked), "sent a masked input")
        return SurvivorList(tuple(sorted(self._masked)))

    def unmask(self, messages: Collection[UnmaskShares]) -> np.ndarray:
        """The survivors' sum in Z_{2^64} (uint64): sum of y_u, minus each survivor's self mask rebuilt
        from `t` shares of `b_u`, minus the pairwise masks between survivors and each dropped client,
        rebuilt from `t` shares of its `s^SK`."""
        self._received += [(3, m) for m in messages]
        survivors = tuple(sorted(self._masked))
        dropped = tuple(v for v in self._u2 if v not in self._masked)
        replies = [m for m in messages if m.sender in self._masked]
        self._require(len({m.sender for m in replies}), "sent unmask shares")
        total = np.zeros(self.length, dtype=np.uint64)
        for u in survivors:
            total += self._masked[u]
        for u in survivors:
            seed = shamir.combine_bytes(self._shares(replies, u, "self_mask_shares"), KEY_BYTES)
            total -= prg(seed, self.length)
        for v in dropped:
            for mask in self.dropped_client_masks(v, replies).values():
                total -= mask
        return total

    def dropped_client_masks(self, dropped: int, replies: Collection[UnmaskShares]) -> dict[int, np.ndarray]:
        """The pairwise masks that each survivor `u` added for the dropped client, as `u` added them,
        rebuilt from the survivors' shares of the dropped client's `s^SK`."""
        raw = shamir.combine_bytes(self._shares(replies, dropped, "mask_key_shares"), KEY_BYTES)
        key = X25519PrivateKey.from_private_bytes(raw)
        if _raw_public(key) != self._adverts[dropped].mask_public_key:
            raise ProtocolAbort(f"server: the shares of client {dropped}'s mask key do not rebuild it")
        return {
            u: np.negative(
                pairwise_mask(dropped, key, u, self._adverts[u].mask_public_key, self.length)
            )  # u added -(the mask the dropped client would have added)
            for u in sorted(self._masked)
        }

    def _shares(self, replies: Collection[UnmaskShares], owner: int, kind: str) -> list[Share]:
        shares = [getattr(m, kind)[owner] for m in replies if owner in getattr(m, kind)]
        if len(shares) < self.threshold:
            raise ProtocolAbort(
                f"server: {len(shares)} shares of client {owner}'s secret, below t = {self.threshold}"
            )
        return shares[: self.threshold]

    def _require(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise ValueError(
                f"secure sum: {count} clients {what}, fewer than the threshold t = {self.threshold}"
            )


def _abscissa(ids: list[int], client_id: int) -> int:
    """A client's Shamir abscissa: its 1-based place in the roster's ascending ids."""
    return ids.index(client_id) + 1


# ---------------------------------------------------------------------------------------------------


def default_threshold(n_clients: int) -> int:
    """n // 2 + 1: a strict majority, so that an honest majority of the clients is needed to unmask."""
    return n_clients // 2 + 1


def secure_sum(
    inputs: Mapping[int, np.ndarray],
    *,
    dropouts: Collection[int] = (),
    threshold: int | None = None,
    scale_bits: int = 24,
    unmask_dropouts: Collection[int] = (),
) -> SecureSumResult:
    """The sum of the clients' vectors, computed by running SecAgg's four rounds in-process.

    `inputs`: client id (an int64) -> 1-D float vector, the same length for all. `dropouts`: clients that
    advertise and share their keys, then drop before sending their masked input (their input is left out
    of the sum). `unmask_dropouts`: survivors that send their masked input but drop before the unmasking
    round (their input is in the sum; their shares are not needed when `t` others answer). `threshold`:
    Shamir's `t`, between `n // 2 + 1` (the default) and `n`, for `n = len(inputs)`: at least `t` clients
    must answer every round. A majority threshold is what keeps a server that lies to some clients about
    who dropped from collecting `t` shares of both secrets of one client; this in-process run has no such
    server, and the signatures that would detect it are not implemented (honest-but-curious server).
    `scale_bits`: fixed point, `x -> round(x * 2**scale_bits)` in Z_{2^64}; every |x| must be at most
    `fixed_point_bound(n, scale_bits)` so that the sum cannot wrap.

    Returns the total (float64; exact integer sum in `total_fixed`), the survivors, what the server
    received, and the bytes each client sent and received. ValueError (one line) for bad inputs or
    settings, or when fewer than `t` clients survive a round.
    """
    ids, vectors = _check_inputs(inputs)
    n = len(ids)
    if isinstance(scale_bits, bool) or not isinstance(scale_bits, int) or not 0 <= scale_bits <= 62:
        raise ValueError(f"secure sum: scale_bits must be an integer in [0, 62], got {scale_bits!r}")
    t = default_threshold(n) if threshold is None else threshold
    if isinstance(t, bool) or not isinstance(t, int) or not default_threshold(n) <= t <= n:
        raise ValueError(
            f"secure sum: threshold must be an integer in [{default_threshold(n)}, {n}] for {n} clients "
            f"(a strict majority), got {threshold!r}"
        )
    for name, subset in (("dropouts", dropouts), ("unmask_dropouts", unmask_dropouts)):
        strangers = sorted(set(subset) - set(ids), key=repr)
        if strangers:
            raise ValueError(f"secure sum: {name} names clients without an input: {strangers}")
    survivors = [u for u in ids if u not in set(dropouts)]
    if len(survivors) < t:
        raise ValueError(
            f"secure sum: {len(survivors)} of {n} clients survive, fewer than the threshold t = {t}"
        )
    bound = fixed_point_bound(n, scale_bits)
    for u, x in zip(ids, vectors, strict=True):
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > bound:
            raise ValueError(
                f"secure sum: client {u} has |x| = {peak:.6g}, above the fixed-point bound "
                f"(2**63 - 1) // {n} / 2**{scale_bits} = {bound:.6g}: lower scale_bits or scale the inputs"
            )

    clients = {u: MaskingClient(u, encode(x, scale_bits)) for u, x in zip(ids, vectors, strict=True)}
    server = MaskingServer(t, vectors[0].size)
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)

    adverts = [clients[u].advertise_keys() for u in ids]
    roster = server.collect_keys(adverts)
    for a in adverts:
        up[a.sender] += a.nbytes
    for u in ids:
        down[u] += roster.nbytes

    shared = [clients[u].share_keys(roster) for u in ids]
    inboxes = server.route_shares(shared)
    for m in shared:
        up[m.sender] += m.nbytes
    for u, box in inboxes.items():
        down[u] += box.nbytes

    masked = [clients[u].masked_input(inboxes[u]) for u in survivors]
    survivor_list = server.collect_masked(masked)
    for m in masked:
        up[m.sender] += m.nbytes
    for u in survivor_list.survivors:
        down[u] += survivor_list.nbytes

    replies = [
        clients[u].unmask(survivor_list) for u in survivor_list.survivors if u not in set(unmask_dropouts)
    ]
    for m in replies:
        up[m.sender] += m.nbytes
    total = server.unmask(replies)
    return SecureSumResult(
        total=decode(total, scale_bits),
        survivors=survivor_list.survivors,
        server_view=server.view,
        bytes_up=up,
        bytes_down=down,
        total_fixed=total.view(np.int64),
    )


def _check_inputs(inputs: Mapping[int, np.ndarray]) -> tuple[list[int], list[np.ndarray]]:
    if not inputs:
        raise ValueError("secure sum: no inputs")
    ids = sorted(inputs)
    for u in ids:
        if isinstance(u, bool) or not isinstance(u, int | np.integer) or not -(2**63) <= int(u) < 2**63:
            raise ValueError(f"secure sum: client ids must be int64 integers, got {u!r}")
    vectors = [np.asarray(inputs[u], dtype=np.float64) for u in ids]
    lengths = {v.shape for v in vectors}
    if any(v.ndim != 1 for v in vectors) or len(lengths) != 1:
        raise ValueError(
            f"secure sum: inputs must be 1-D vectors of one length, got shapes {sorted(lengths)}"
        )
    for u, v in zip(ids, vectors, strict=True):
        if not np.isfinite(v).all():
            raise ValueError(f"secure sum: client {u}'s input is not finite")
    return [int(u) for u in ids], vectors
