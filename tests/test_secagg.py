"""Pairwise-mask secure aggregation (common.secagg): exact sums, uniform-looking replies, refusals.

Keys come from fixed private bytes so every statistical assertion below is deterministic.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import stats

from common.secagg import (
    FRACTION_BITS,
    SecAggError,
    decode_fixed_point,
    encode_fixed_point,
    generate_keypair,
    keypair_from_private,
    mask,
    pairwise_masks,
    parse_public_key,
    public_key_hex,
    sum_masked,
)

CONTEXT = b"task-1|round-0|attempt-0"
SHAPES = {"sum.nbi": (3, 1, 12, 8), "sum.wli": (3, 8, 8), "total": (), "count": (3,)}
LIKE = {"sum.nbi": "float32", "sum.wli": "float32", "total": "float32", "count": "int64"}


def fixed_keys(names: list[str]) -> dict:
    # X25519 clamps any 32 bytes into a valid scalar, so hashing the name gives a fixed key pair.
    return {name: keypair_from_private(hashlib.sha256(name.encode()).digest()) for name in names}


def site_stats(rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {key: rng.normal(0, 10, shape).astype(np.float32) for key, shape in SHAPES.items() if key != "count"}
    arrays["count"] = rng.integers(0, 500, SHAPES["count"], dtype=np.int64)
    return arrays


def masked_replies(plain: dict[str, dict[str, np.ndarray]], context: bytes = CONTEXT) -> dict[str, dict]:
    keys = fixed_keys(sorted(plain))
    roster = {name: pair.public for name, pair in keys.items()}  # the server's broadcast, own name included
    shapes = {key: value.shape for key, value in next(iter(plain.values())).items()}
    return {
        name: mask(encode_fixed_point(arrays), pairwise_masks(name, keys[name].private, roster, context, shapes))
        for name, arrays in plain.items()
    }


def as_u64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, order="C").view(np.uint64)


@pytest.mark.parametrize("n_sites", [2, 3, 5])
def test_masked_sum_equals_plain_fixed_point_sum(n_sites: int) -> None:
    rng = np.random.default_rng(n_sites)
    plain = {f"site-{i}": site_stats(rng) for i in range(n_sites)}
    replies = masked_replies(plain)

    secure = decode_fixed_point(sum_masked(list(replies.values())), LIKE)
    encoded = [encode_fixed_point(arrays) for arrays in plain.values()]
    reference = decode_fixed_point({k: sum(e[k] for e in encoded) for k in SHAPES}, LIKE)
    for key, shape in SHAPES.items():
        assert all(isinstance(r[key], np.ndarray) and r[key].shape == shape for r in replies.values()), key
        assert isinstance(secure[key], np.ndarray) and secure[key].dtype == np.dtype(LIKE[key])
        assert np.array_equal(secure[key], reference[key]), key

    secure64 = decode_fixed_point(sum_masked(list(replies.values())), {k: "float64" for k in SHAPES})
    for key in ("sum.nbi", "sum.wli", "total"):
        true_sum = sum(arrays[key].astype(np.float64) for arrays in plain.values())
        assert np.max(np.abs(secure64[key] - true_sum)) <= n_sites * 2.0**-FRACTION_BITS
    assert np.array_equal(secure["count"], sum(arrays["count"] for arrays in plain.values()))


def test_single_reply_looks_uniform_whatever_the_plaintext() -> None:
    rng = np.random.default_rng(0)
    shape = (4096,)  # 32 KiB per reply
    plain = {
        "a-zeros": {"x": np.zeros(shape, np.float32)},
        "b-thousands": {"x": np.full(shape, 1000.0, np.float32)},
        "c-random": {"x": rng.normal(0, 100, shape).astype(np.float32)},
    }
    replies = {name: reply["x"] for name, reply in masked_replies(plain).items()}

    histograms = []
    for name in ("a-zeros", "b-thousands", "c-random"):
        raw = np.frombuffer(replies[name].tobytes(), dtype=np.uint8)
        assert raw.size >= 20_000
        counts = np.bincount(raw, minlength=256)
        histograms.append(counts)
        assert stats.chisquare(counts).pvalue > 1e-3, name
        assert abs(np.unpackbits(raw).mean() - 0.5) < 0.01, name

    correlation = np.corrcoef(plain["c-random"]["x"].astype(np.float64), replies["c-random"].astype(np.float64))[0, 1]
    assert abs(correlation) < 0.05

    # Two very different constant plaintexts: different replies, same (uniform) byte distribution.
    assert not np.array_equal(replies["a-zeros"], replies["b-thousands"])
    assert stats.chi2_contingency(np.stack(histograms[:2])).pvalue > 1e-3


def test_masks_cancel_only_with_every_reply() -> None:
    rng = np.random.default_rng(1)
    plain = {f"site-{i}": site_stats(rng) for i in range(3)}
    replies = masked_replies(plain)

    survivors = ["site-0", "site-1"]  # site-2 dropped after masking
    partial = decode_fixed_point(sum_masked([replies[n] for n in survivors]), {k: "float64" for k in SHAPES})
    for key in SHAPES:
        true_sum = sum(plain[n][key].astype(np.float64) for n in survivors)
        # The uncancelled pairwise masks are uniform mod 2**64, i.e. typically ~2**62 / 2**24 ~ 1e11.
        assert np.median(np.abs(partial[key] - true_sum)) > 1e6, key


def test_both_ends_derive_the_same_pair_stream() -> None:
    keys = fixed_keys(["alice", "bob"])
    a = pairwise_masks("alice", keys["alice"].private, {"bob": keys["bob"].public}, CONTEXT, SHAPES)
    b = pairwise_masks("bob", keys["bob"].private, {"alice": keys["alice"].public}, CONTEXT, SHAPES)
    for key, shape in SHAPES.items():
        assert a[key].shape == shape and a[key].dtype == np.int64
        assert np.all(as_u64(a[key]) + as_u64(b[key]) == 0), key
        assert np.count_nonzero(a[key]) == a[key].size  # and the stream is not trivially zero


def test_masks_are_deterministic_per_context() -> None:
    keys = fixed_keys(["alice", "bob", "carol"])
    roster = {name: pair.public for name, pair in keys.items()}

    def masks_of(context: bytes) -> dict[str, np.ndarray]:
        return pairwise_masks("bob", keys["bob"].private, roster, context, SHAPES)

    first, again, other = masks_of(CONTEXT), masks_of(CONTEXT), masks_of(b"task-1|round-0|attempt-1")
    for key in SHAPES:
        assert np.array_equal(first[key], again[key]), key
        assert not np.any(first[key] == other[key]), key
    # Listing oneself in the roster changes nothing (the server may broadcast the full roster).
    without_self = {name: pub for name, pub in roster.items() if name != "bob"}
    no_self = pairwise_masks("bob", keys["bob"].private, without_self, CONTEXT, SHAPES)
    assert all(np.array_equal(first[key], no_self[key]) for key in SHAPES)


def test_refusals_name_the_culprit() -> None:
    with pytest.raises(SecAggError, match="'sum.nbi'.*NaN"):
        encode_fixed_point({"ok": np.ones(2, np.float32), "sum.nbi": np.array([1.0, np.inf], np.float32)})
    with pytest.raises(SecAggError, match="'sum.wli'.*too large"):
        encode_fixed_point({"sum.wli": np.array([2.0**63 / 2**FRACTION_BITS / 1024 * 1.01])})
    with pytest.raises(SecAggError, match="'count'.*too large"):
        encode_fixed_point({"count": np.array([2**60], np.int64)}, sum_bound_sites=16)
    encode_fixed_point({"count": np.array([2**59 - 1], np.int64)}, sum_bound_sites=16)  # at the bound: fine

    pair = generate_keypair()
    assert parse_public_key(public_key_hex(pair), "site-3") == pair.public
    for bad in ("zz" * 32, "ab" * 31, "", None):
        with pytest.raises(SecAggError, match="'site-3'"):
            parse_public_key(bad, "site-3")

    with pytest.raises(SecAggError, match="no peers"):
        pairwise_masks("alone", pair.private, {"alone": pair.public}, CONTEXT, SHAPES)
    with pytest.raises(SecAggError, match="share one public key"):
        pairwise_masks("a", pair.private, {"b": pair.public}, CONTEXT, SHAPES)
    with pytest.raises(SecAggError, match="appears twice"):
        roster = {"a": generate_keypair().public, "b": generate_keypair().public}  # not our "a" key
        pairwise_masks("a", pair.private, roster, CONTEXT, SHAPES)

    encoded = encode_fixed_point({"x": np.ones(3, np.float32)})
    with pytest.raises(SecAggError, match="only in first: \\['x'\\].*only in second: \\['y'\\]"):
        mask(encoded, {"y": np.zeros(3, np.int64)})
    with pytest.raises(SecAggError, match="'x'.*shape"):
        mask(encoded, {"x": np.zeros(4, np.int64)})
    with pytest.raises(SecAggError, match="'x'.*float32.*encode_fixed_point"):
        mask({"x": np.ones(3, np.float32)}, {"x": np.zeros(3, np.int64)})  # forgot to encode
    with pytest.raises(SecAggError, match="keys differ"):
        sum_masked([encoded, {"x": encoded["x"], "y": encoded["x"]}])


def test_fixed_point_round_trip() -> None:
    rng = np.random.default_rng(2)
    floats = {
        "small": rng.uniform(-1, 1, (3, 1, 12, 8)).astype(np.float32),
        "large": rng.normal(0, 1e4, (3, 8, 8)).astype(np.float32),
        "scalar": np.array(0.1, np.float32),
    }
    decoded = decode_fixed_point(encode_fixed_point(floats), {k: v.dtype for k, v in floats.items()})
    for key, value in floats.items():
        assert decoded[key].dtype == np.float32 and decoded[key].shape == value.shape
        assert np.max(np.abs(decoded[key].astype(np.float64) - value)) <= 2.0 ** -(FRACTION_BITS + 1), key

    ints = {"count": rng.integers(-(2**40), 2**40, (5, 3)), "u8": np.arange(256, dtype=np.uint8)}
    back = decode_fixed_point(encode_fixed_point(ints), {k: v.dtype for k, v in ints.items()})
    for key, value in ints.items():
        assert back[key].dtype == np.int64 and np.array_equal(back[key], value), key
