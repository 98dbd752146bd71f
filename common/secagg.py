"""Pairwise-mask secure aggregation of sufficient statistics, in fixed point.

Sites send per-class sums (float) and counts (int) that the server only ever adds up over
sites. With this module each site sends instead ``encode(x) + mask`` modulo 2**64, where its
mask is a sum of pseudo-random streams shared with each other site: the stream of the pair
(i, j) is added by the lower-named site and subtracted by the higher-named one, so all masks
cancel in the server's sum, which is exact in fixed point (``FRACTION_BITS`` fractional bits).
Each reply on its own is uniformly distributed mod 2**64 whatever the plaintext.

Scheme: Bonawitz et al. (CCS 2017) pairwise masking -- X25519 key agreement, HKDF-SHA256 per
(context, pair), ChaCha20 keystream as the mask -- *without* the Shamir secret-sharing of the
mask seeds that lets the server recover from dropouts, and without self-masks. Consequences
the caller must honour:

* **Dropouts:** if a site drops out after the others have masked, the masks of its pairs no
  longer cancel and the sum is garbage. The server must restart the step with the surviving
  sites under a different ``context`` (FedPaGKD includes round, Lloyd step and attempt), so
  every stream is fresh: replaying a context with a smaller roster would let the server
  subtract two replies of the same site masked with overlapping streams.
* **One use per key:** every (context, pair) key, hence every keystream, masks one message.
* **Threat model:** honest-but-curious server that learns only the sum. A server colluding with
  a site (or with all but one site) can unmask; and the server must hand every site the same,
  authentic roster of public keys (no MITM protection here).
* **Ephemeral keys:** a site makes a new key pair per bank refresh (kept only in its own
  process state); the contexts of that refresh's steps and attempts derive distinct streams.

Fixed point: ``x -> round(x * 2**FRACTION_BITS)`` as int64, two's complement mod 2**64.
Integer arrays (counts) are carried as int64 unchanged. Encoding refuses magnitudes for which
the sum over ``sum_bound_sites`` sites could overflow int64, so the modular sum equals the
true integer sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 24
_SCALE = float(2**FRACTION_BITS)
_KEY_BYTES = 32
_INFO_PREFIX = b"fedpagkd-secagg|"
# ChaCha20 in `cryptography` takes a 16-byte nonce (4-byte counter + 12-byte nonce). A zero
# nonce is safe because each derived key encrypts exactly one stream.
_NONCE = bytes(16)


class SecAggError(ValueError):
    """Secure-aggregation input is unusable; the message names the array key or site and the fix."""


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes."""

    private: bytes  # raw 32-byte X25519 private key
    public: bytes  # raw 32-byte X25519 public key


def keypair_from_private(private: bytes) -> KeyPair:
    """Rebuild the key pair of a raw 32-byte X25519 private key (tests use fixed keys)."""
    key = X25519PrivateKey.from_private_bytes(_check_key_bytes(private, "own private key"))
    return KeyPair(private=private, public=key.public_key().public_bytes_raw())


def generate_keypair() -> KeyPair:
    """A fresh ephemeral X25519 key pair (one per site per context)."""
    return keypair_from_private(X25519PrivateKey.generate().private_bytes_raw())


def public_key_hex(pair: KeyPair) -> str:
    """The public key as 64 lowercase hex characters, for the wire."""
    return pair.public.hex()


def parse_public_key(hex_str: str, owner: str) -> bytes:
    """Parse a 64-hex-character X25519 public key sent by ``owner``; refuse anything else."""
    try:
        raw = bytes.fromhex(hex_str)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != _KEY_BYTES:
        raise SecAggError(
            f"public key of {owner!r} is not {2 * _KEY_BYTES} hex characters "
            f"(got {str(hex_str)[:80]!r}); the site must send public_key_hex(generate_keypair())"
        )
    return raw


def _check_key_bytes(raw: bytes, what: str) -> bytes:
    if not isinstance(raw, bytes) or len(raw) != _KEY_BYTES:
        raise SecAggError(f"{what} must be {_KEY_BYTES} raw bytes; use generate_keypair() / parse_public_key()")
    return raw


# ------------------------------------------------------------------------------ fixed point


def _int_limit(sum_bound_sites: int) -> int:
    # (2**63 - 1) // n rather than 2**63 // n: n values of this magnitude still sum inside int64
    # even for n == 1 (2**63 itself is not an int64).
    if not isinstance(sum_bound_sites, int) or sum_bound_sites < 1:
        raise SecAggError(f"sum_bound_sites must be a positive int, got {sum_bound_sites!r}")
    return (2**63 - 1) // sum_bound_sites


def _float_limit(limit: int) -> float:
    # Largest float64 <= limit, so that a float passing the check is castable without overflow.
    as_float = float(limit)
    return as_float if int(as_float) <= limit else float(np.nextafter(as_float, 0.0))


def _encode_one(key: str, array: np.ndarray, limit: int) -> np.ndarray:
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise SecAggError(f"array {key!r} has NaN or infinite values; fix the statistic before sending")
        values = np.rint(array.astype(np.float64) * _SCALE)  # float32 * 2**k is exact in float64
        too_big = np.abs(values) > _float_limit(limit)
    elif np.issubdtype(array.dtype, np.integer):
        # Compare in the array's own dtype: casting a uint64 above 2**63 to int64 first would wrap.
        values = array
        too_big = array > limit
        if np.issubdtype(array.dtype, np.signedinteger):
            too_big |= array < -limit
    else:
        raise SecAggError(f"array {key!r} has dtype {array.dtype}; only float and integer arrays can be aggregated")
    if too_big.any():
        raise SecAggError(
            f"array {key!r} has values too large for fixed point with {FRACTION_BITS} fraction bits "
            f"(|encoded| must be <= {limit}); rescale it or lower sum_bound_sites"
        )
    return np.array(values, dtype=np.int64, order="C")  # a copy; np.array keeps 0-d shapes


def encode_fixed_point(arrays: Mapping[str, np.ndarray], sum_bound_sites: int = 1024) -> dict[str, np.ndarray]:
    """Fixed-point encode each array (any shape) as int64 of the same shape.

    Float arrays become ``round(x * 2**FRACTION_BITS)``; integer arrays are kept as int64.
    Refuses (``SecAggError`` naming the key) non-finite values, non-numeric dtypes, and
    values so large that the sum of ``sum_bound_sites`` of them could overflow int64.
    """
    limit = _int_limit(sum_bound_sites)
    return {key: _encode_one(key, value, limit) for key, value in arrays.items()}


def decode_fixed_point(encoded: Mapping[str, np.ndarray], like: Mapping[str, np.dtype | str]) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_fixed_point` for int64 arrays (e.g. a sum over sites).

    ``like`` maps each key to its plaintext dtype: float keys are divided by 2**FRACTION_BITS in
    float64 and cast to that dtype; integer keys come back as int64. Keys must match exactly.
    """
    _check_same_keys(encoded, like, "decode_fixed_point: encoded arrays vs `like` dtypes")
    out: dict[str, np.ndarray] = {}
    for key, value in encoded.items():
        target = np.dtype(like[key])
        value = np.asarray(value, dtype=np.int64)
        if np.issubdtype(target, np.floating):
            out[key] = np.asarray(value / _SCALE, dtype=target)  # float64 division, then cast; 0-d stays an array
        elif np.issubdtype(target, np.integer):
            out[key] = value.copy()
        else:
            raise SecAggError(f"array {key!r}: cannot decode to dtype {target}; use a float or integer dtype")
    return out


# ------------------------------------------------------------------------------ masking


def _pair_stream(
    own_private: X25519PrivateKey, own_name: str, peer_name: str, peer_public: bytes, context: bytes, n_values: int
) -> np.ndarray:
    """The ChaCha20 keystream of the pair (own, peer) as ``n_values`` uint64; both ends agree."""
    peer_key = X25519PublicKey.from_public_bytes(_check_key_bytes(peer_public, f"public key of {peer_name!r}"))
    try:
        shared = own_private.exchange(peer_key)
    except ValueError as err:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise SecAggError(f"public key of {peer_name!r} is unusable ({err}); that site must send a fresh key") from err
    lo, hi = sorted((own_name.encode(), peer_name.encode()))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO_PREFIX + context + b"|" + lo + b"|" + hi).derive(
        shared
    )
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * n_values)), dtype="<u8").astype(np.uint64)


def _check_roster(own_name: str, own_public: bytes, peers: Mapping[str, bytes]) -> dict[str, bytes]:
    """The peers other than ``own_name``; refuse a roster that contradicts itself or is too small."""
    if own_name in peers and peers[own_name] != own_public:
        raise SecAggError(
            f"site name {own_name!r} appears twice with different public keys (ours and one in peers); "
            "site names must be unique in the roster"
        )
    others = {name: key for name, key in peers.items() if name != own_name}
    if not others:
        raise SecAggError(
            f"site {own_name!r} has no peers: a lone site cannot hide its values; aggregate securely only with at least two sites"
        )
    owners: dict[bytes, str] = {own_public: own_name}
    for name, key in others.items():
        if key in owners:
            raise SecAggError(
                f"sites {owners[key]!r} and {name!r} share one public key; each site must generate its own key pair"
            )
        owners[key] = name
    return others


def pairwise_masks(
    own_name: str, own_private: bytes, peers: Mapping[str, bytes], context: bytes, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """This site's total mask for arrays of the given shapes, as int64 (uint64 bit pattern).

    ``peers`` maps the other sites' names to their raw 32-byte public keys (``own_name`` may be
    present with our own key; it is skipped). For each peer the pairwise keystream, filled in
    sorted array-key order, is added if ``own_name < peer_name`` (utf-8 order) else subtracted,
    mod 2**64, so the masks of all sites sum to zero. ``context`` must be unique per
    aggregation attempt (e.g. task, round and attempt), because each pair key masks only once.
    """
    if not isinstance(context, bytes):
        raise SecAggError(f"context must be bytes, got {type(context).__name__}; encode it, e.g. b'round-3|attempt-0'")
    private = X25519PrivateKey.from_private_bytes(_check_key_bytes(own_private, "own private key"))
    others = _check_roster(own_name, private.public_key().public_bytes_raw(), peers)
    keys = sorted(shapes)
    sizes = [int(np.prod(shapes[key], dtype=np.int64)) for key in keys]
    total = np.zeros(sum(sizes), dtype=np.uint64)
    for peer_name, peer_public in others.items():
        stream = _pair_stream(private, own_name, peer_name, peer_public, context, total.size)
        if own_name.encode() < peer_name.encode():
            total += stream  # uint64 array arithmetic wraps mod 2**64 silently
        else:
            total -= stream
    chunks = np.split(total, np.cumsum(sizes)[:-1])
    return {key: chunk.reshape(shapes[key]).view(np.int64) for key, chunk in zip(keys, chunks)}


def _check_same_keys(a: Mapping[str, object], b: Mapping[str, object], what: str) -> None:
    if set(a) != set(b):
        raise SecAggError(
            f"{what}: keys differ (only in first: {sorted(set(a) - set(b))}, "
            f"only in second: {sorted(set(b) - set(a))}); both must describe the same arrays"
        )


def _as_u64(key: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype != np.int64:
        raise SecAggError(f"array {key!r} has dtype {value.dtype}, expected int64; pass encode_fixed_point() output")
    return np.asarray(value, order="C").view(np.uint64)  # C order so the view is elementwise


def _check_shape(key: str, a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise SecAggError(f"array {key!r}: shape {a.shape} vs {b.shape}; every site must send the same shapes")


def mask(encoded: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``(encoded + masks) mod 2**64`` per key, as int64; keys, shapes and dtype (int64) must match."""
    _check_same_keys(encoded, masks, "mask: encoded arrays vs masks")
    out: dict[str, np.ndarray] = {}
    for key, value in encoded.items():
        a, m = _as_u64(key, value), _as_u64(key, masks[key])
        _check_shape(key, a, m)
        out[key] = np.asarray(a + m).view(np.int64)  # asarray: 0-d arithmetic yields a numpy scalar
    return out


def sum_masked(replies: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise sum mod 2**64 of the sites' masked int64 arrays (same keys and shapes)."""
    if not replies:
        raise SecAggError("sum_masked: no replies; aggregate at least two sites")
    first = replies[0]
    totals = {key: _as_u64(key, value).copy() for key, value in first.items()}
    for reply in replies[1:]:
        _check_same_keys(first, reply, "sum_masked: replies of two sites")
        for key, total in totals.items():
            value = _as_u64(key, reply[key])
            _check_shape(key, total, value)
            total += value
    return {key: total.view(np.int64) for key, total in totals.items()}
