"""The wire format (common/records.py): every schema validates a well-formed payload, and every
kind of corruption is refused with a PayloadError that names the offending key."""

from __future__ import annotations

import json

import dataclasses
import math
from collections import Counter
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.records import (
    PROTOCOL_VERSION,
    REPLY_KIND,
    SCHEMAS,
    ArrayField,
    Dims,
    Payload,
    PayloadError,
    make,
    validate,
    weight_shapes,
)

# All sizes different, so a dim taken for another is a shape error.
DIMS = Dims(C=3, S=2, M=4, D=5, L=6, B=7)
CONFIG_VALUES: dict[type, Any] = {int: 3, float: 0.25, bool: True, str: "x"}
# A value of the wrong type for each declared type (bool is not an int; str is never a number).
WRONG_TYPE: dict[type, list[Any]] = {
    int: ["3", 3.5, True, None],
    float: ["0.5", True, None, [0.5]],
    bool: [1, "true", None],
    str: [3, b"x", None],
}


def _fill(spec: ArrayField, dims: Dims, rng: np.random.Generator) -> np.ndarray:
    shape = dims.resolve(spec.shape)
    if np.dtype(spec.dtype).kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    return rng.integers(0, 10, size=shape).astype(spec.dtype)


def _weight_block(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
        "fc.bias": rng.standard_normal(2).astype(np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
    }


def valid_payload(kind: str, dims: Dims = DIMS, seed: int = 0) -> Payload:
    """A payload of ``kind`` filled from its schema: arrays of the declared dtype and resolved
    shape (counts non-negative), one value of each config key's type, every weight block."""
    schema = SCHEMAS[kind]
    rng = np.random.default_rng(seed)
    return Payload(
        kind,
        arrays={spec.name: _fill(spec, dims, rng) for spec in schema.every_array()},  # optional groups too
        config={
            key: SPECIAL_VALUES[key](dims) if key in SPECIAL_VALUES else CONFIG_VALUES[kind_] for key, kind_ in schema.config
        },
        weights={block: _weight_block(rng) for block in schema.weights},
    )


def CLASS_NAMES_JSON(dims: Dims) -> str:
    """A metadata reply's class names: one per class of the run (its counts' C)."""
    return json.dumps([f"class-{c}" for c in range(dims.C)])


# Config keys whose valid values are narrower than their type.
SPECIAL_VALUES = {
    "class-names": CLASS_NAMES_JSON,
    "skipped-files": lambda dims: json.dumps({"dangling link": 2}),
    "evaluate": lambda dims: "val",
    "schedule-start": lambda dims: 0.25,
    "schedule-end": lambda dims: 0.5,
}


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"evaluate": "train"}, "'evaluate'"),
        ({"evaluate": "x"}, "'evaluate'"),
        ({"schedule-start": 0.6, "schedule-end": 0.5}, "schedule span"),
        ({"schedule-start": -0.1}, "schedule span"),
        ({"schedule-end": 1.5}, "schedule span"),
    ],
)
def test_evaluation_split_and_schedule_span_out_of_range_are_refused(config, fragment):
    payload = valid_payload("student.train")
    payload.config.update(config)
    with pytest.raises(PayloadError, match=fragment):
        validate(payload, DIMS, reference_of(payload))


def reference_of(payload: Payload) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    return {block: weight_shapes(state) for block, state in payload.weights.items()}


KINDS = sorted(SCHEMAS)


# --------------------------------------------------------------------------- schemas


def test_dims_are_the_six_run_sizes():
    assert [f.name for f in dataclasses.fields(Dims)] == ["C", "S", "M", "D", "L", "B"]
    assert DIMS.resolve(("C", "S", 9)) == (3, 2, 9)


@pytest.mark.parametrize("kind", KINDS)
def test_no_schema_has_a_per_image_dimension(kind):
    allowed = {f.name for f in dataclasses.fields(Dims)}
    for spec in SCHEMAS[kind].every_array():  # optional arrays leave a site too
        assert spec.shape, f"{kind}.{spec.name} is a scalar"
        for dim in spec.shape:
            # Only the run's fixed sizes: never a literal or a name that could be an image count.
            assert isinstance(dim, str) and dim in allowed, f"{kind}.{spec.name} has dim {dim!r}"
        assert np.dtype(spec.dtype) in (np.dtype("float32"), np.dtype("int64"))
        if spec.counts:
            assert np.dtype(spec.dtype).kind == "i"


def test_schema_names_are_unique_and_replies_are_schemas():
    for kind, schema in SCHEMAS.items():
        assert schema.kind == kind
        names = schema.array_names()
        assert len(names) == len(set(names))
        keys = [k for k, _ in schema.config]
        assert len(keys) == len(set(keys))
        assert all(t in CONFIG_VALUES for _, t in schema.config)
    for request, reply in REPLY_KIND.items():
        assert request in SCHEMAS and reply in SCHEMAS
    assert isinstance(PROTOCOL_VERSION, int)


# --------------------------------------------------------------------------- valid payloads


@pytest.mark.parametrize("kind", KINDS)
def test_valid_payload_validates(kind):
    payload = valid_payload(kind)
    assert validate(payload, DIMS) is payload
    assert validate(payload, DIMS, reference_of(payload), sender="site 'a'") is payload
    made = make(kind, DIMS, arrays=payload.arrays, config=payload.config, weights=payload.weights)
    assert made.kind == kind and set(made.arrays) == set(payload.arrays)


def test_float_config_accepts_an_int():
    payload = valid_payload("teacher.update")
    payload.config["loss"] = 2
    validate(payload, DIMS)


def test_zero_counts_are_valid():
    payload = valid_payload("knowledge.sums")
    payload.arrays["prototype_count"][:] = 0
    validate(payload, DIMS)


def test_num_bytes_counts_array_bytes():
    payload = valid_payload("knowledge.sums")
    payload.config.clear()
    expected = sum(a.nbytes for a in payload.arrays.values())
    d = DIMS
    by_hand = 4 * (d.C * d.S * d.M * d.D + 2 * d.C * d.L * d.D) + 8 * (d.C * d.S + 2 * d.C * d.L + d.C)
    assert expected == by_hand
    assert payload.num_bytes() == expected
    payload.weights["student"] = {"w": np.zeros((10, 10), np.float32)}
    assert payload.num_bytes() == expected + 400
    payload.config["round"] = 12
    assert payload.num_bytes() == expected + 400 + len("round") + len("12")


# --------------------------------------------------------------------------- corruptions

Corruption = Callable[[Payload], tuple[Payload, str]]


def _first(kind: str, pred: Callable[[ArrayField], bool]) -> ArrayField | None:
    return next((s for s in SCHEMAS[kind].every_array() if pred(s)), None)


def _cases() -> list[tuple[str, str, Any]]:
    """(kind, corruption name, argument) for every corruption that applies to a kind."""
    cases = []
    for kind in KINDS:
        schema = SCHEMAS[kind]
        cases.append((kind, "extra_array", "bogus_array"))
        cases.append((kind, "extra_config", "bogus-key"))
        cases.append((kind, "wrong_weight_blocks", None))
        for spec in schema.every_array():  # an optional array missing from its group is refused too
            cases.append((kind, "missing_array", spec.name))
            cases.append((kind, "wrong_dtype", spec.name))
            cases.append((kind, "wrong_shape", spec.name))
            cases.append((kind, "wrong_ndim", spec.name))
            cases.append((kind, "not_an_array", spec.name))
            if np.dtype(spec.dtype).kind == "f":
                cases.append((kind, "nan", spec.name))
                cases.append((kind, "inf", spec.name))
            if spec.counts:
                cases.append((kind, "negative_count", spec.name))
        for key, type_ in schema.config:
            cases.append((kind, "missing_config", key))
            for i in range(len(WRONG_TYPE[type_])):
                cases.append((kind, f"wrong_config_type_{i}", key))
            if type_ is float:
                for value in ("nan", "inf", "-inf"):
                    cases.append((kind, f"nonfinite_config_{value}", key))
        for block in schema.weights:
            for what in ("shape", "dtype", "missing", "extra", "nan", "nan_noref", "inf_noref", "not_array"):
                cases.append((kind, f"weights_{what}", block))
    return cases


def _corrupt(payload: Payload, name: str, arg: Any) -> tuple[Payload, dict | None, list[str]]:
    """Apply one corruption -> (payload, weight reference to validate against, strings the
    error message must contain)."""
    schema = SCHEMAS[payload.kind]
    reference = reference_of(payload)
    if name == "extra_array":
        payload.arrays[arg] = np.zeros(3, np.float32)
        return payload, reference, [arg]
    if name == "extra_config":
        payload.config[arg] = 1
        return payload, reference, [arg]
    if name == "wrong_weight_blocks":
        if schema.weights:
            dropped = sorted(schema.weights)[0]
            del payload.weights[dropped]
            return payload, reference, [dropped]
        payload.weights["student"] = {"w": np.zeros(2, np.float32)}
        return payload, reference, ["student"]
    if name == "missing_array":
        del payload.arrays[arg]
        return payload, reference, [arg]
    if name == "wrong_dtype":
        a = payload.arrays[arg]
        payload.arrays[arg] = a.astype(np.float64 if a.dtype.kind == "f" else np.int32)
        return payload, reference, [arg, "dtype"]
    if name == "wrong_shape":
        a = payload.arrays[arg]
        payload.arrays[arg] = np.zeros((a.shape[0] + 1,) + a.shape[1:], a.dtype)
        return payload, reference, [arg, "shape"]
    if name == "wrong_ndim":
        a = payload.arrays[arg]
        payload.arrays[arg] = a[None]
        return payload, reference, [arg, "shape"]
    if name == "not_an_array":
        payload.arrays[arg] = payload.arrays[arg].tolist()
        return payload, reference, [arg]
    if name in ("nan", "inf"):
        payload.arrays[arg].flat[-1] = np.nan if name == "nan" else -np.inf
        return payload, reference, [arg, "NaN or Inf"]
    if name == "negative_count":
        payload.arrays[arg].flat[0] = -1
        return payload, reference, [arg, "negative"]
    if name == "missing_config":
        del payload.config[arg]
        return payload, reference, [arg, "missing"]
    if name.startswith("wrong_config_type_"):
        value = WRONG_TYPE[dict(schema.config)[arg]][int(name.rsplit("_", 1)[1])]
        payload.config[arg] = value
        return payload, reference, [f"'{arg}'"]
    if name.startswith("nonfinite_config_"):
        payload.config[arg] = float(name.rsplit("_", 1)[1])
        return payload, reference, [f"'{arg}'", "not finite"]
    if name.startswith("weights_"):
        what = name[len("weights_") :]
        block = payload.weights[arg]
        if what == "shape":
            block["conv.weight"] = np.zeros((4, 3, 3, 3), np.float32)
            return payload, reference, [f"{arg}.conv.weight"]
        if what == "dtype":
            block["fc.bias"] = block["fc.bias"].astype(np.float16)
            return payload, reference, [f"{arg}.fc.bias"]
        if what == "missing":
            del block["fc.bias"]
            return payload, reference, [f"'{arg}'", "fc.bias"]
        if what == "extra":
            block["head.extra"] = np.zeros(2, np.float32)
            return payload, reference, [f"'{arg}'", "head.extra"]
        if what == "not_array":
            block["fc.bias"] = block["fc.bias"].tolist()
            return payload, None, [f"{arg}.fc.bias"]
        if what == "nan":
            block["conv.weight"].flat[0] = np.nan
            return payload, reference, [f"{arg}.conv.weight", "NaN or Inf"]
        if what in ("nan_noref", "inf_noref"):
            block["fc.bias"][0] = np.nan if what == "nan_noref" else np.inf
            return payload, None, [f"{arg}.fc.bias", "NaN or Inf"]
    raise AssertionError(f"unknown corruption {name}")


@pytest.mark.parametrize("kind, corruption, arg", _cases(), ids=lambda v: str(v))
def test_corruption_raises_payload_error_naming_the_key(kind, corruption, arg):
    payload, reference, needles = _corrupt(valid_payload(kind), corruption, arg)
    with pytest.raises(PayloadError) as info:
        validate(payload, DIMS, reference, sender="site 'h1'")
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "site 'h1'" in message


def test_every_kind_has_at_least_the_generic_corruptions():
    per_kind = Counter(kind for kind, _, _ in _cases())
    assert set(per_kind) == set(SCHEMAS)
    assert all(n >= 3 for n in per_kind.values())


def test_unknown_kind_names_it():
    payload = valid_payload("discover")
    payload.kind = "student.trian"
    with pytest.raises(PayloadError) as info:
        validate(payload, DIMS, sender="server")
    assert "student.trian" in str(info.value)
    assert "student.train" in str(info.value)  # the known kinds are listed


def test_make_refuses_what_validate_refuses():
    with pytest.raises(PayloadError, match="protocol"):
        make("discover", DIMS, config={})


def test_payload_from_other_dims_is_refused():
    other = dataclasses.replace(DIMS, D=DIMS.D + 1)
    payload = valid_payload("knowledge.sums", dims=other)
    with pytest.raises(PayloadError, match="prototype_sum"):
        validate(payload, DIMS)


def test_reference_for_a_block_not_carried_is_ignored():
    payload = valid_payload("teacher.update")
    reference = reference_of(payload)
    reference["student"] = {"x": ((1,), "float32")}
    validate(payload, DIMS, reference)


def test_huge_int_for_a_float_config_is_a_payload_error():
    # Python ints are unbounded; np.isfinite cannot take one beyond uint64.
    payload = valid_payload("teacher.update")
    payload.config["loss"] = 2**64
    with pytest.raises(PayloadError, match="'loss'"):
        validate(payload, DIMS)


def test_unreferenced_weights_with_complex_nan_are_refused():
    payload = valid_payload("teacher.train")
    payload.weights["teacher"]["fc.bias"] = np.array([np.nan + 0j, 1 + 0j], dtype=np.complex64)
    with pytest.raises(PayloadError, match="teacher.fc.bias"):
        validate(payload, DIMS)


def test_referenced_weights_with_complex_dtype_are_refused():
    payload = valid_payload("teacher.train")
    reference = reference_of(payload)
    payload.weights["teacher"]["fc.bias"] = payload.weights["teacher"]["fc.bias"].astype(np.complex64)
    with pytest.raises(PayloadError, match="teacher.fc.bias"):
        validate(payload, DIMS, reference)


# --------------------------------------------------------------------------- fuzz

_ARRAY_NAMES = sorted({s.name for schema in SCHEMAS.values() for s in schema.every_array()})
_CONFIG_KEYS = sorted({k for schema in SCHEMAS.values() for k, _ in schema.config})
_BLOCKS = ["teacher", "student", "head", "net"]
_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_, np.complex64]
_SHAPES = sorted({DIMS.resolve(s.shape) for schema in SCHEMAS.values() for s in schema.every_array()})


@st.composite
def _array(draw) -> np.ndarray:
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.one_of(st.sampled_from(_SHAPES), hnp.array_shapes(min_dims=0, max_dims=4, max_side=4)))
    if np.prod(shape, dtype=np.int64) > 600:
        shape = shape[:1]
    return draw(hnp.arrays(dtype, shape))  # hypothesis draws NaN, Inf, negatives, extremes


_NOT_ARRAY = st.one_of(st.none(), st.integers(), st.lists(st.floats(), max_size=3), st.text(max_size=3))

_CONFIG_VALUE = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),  # what a Flower ConfigRecord can carry
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def _payloads(draw) -> tuple[Payload, dict | None]:
    """Mostly near-valid payloads (so the fuzz reaches the deep checks), mutated at random."""
    kind = draw(st.sampled_from(KINDS + ["bogus", "", "Discover"]))
    base = valid_payload(kind if kind in SCHEMAS else "discover", seed=draw(st.integers(0, 3)))
    base.kind = kind
    reference = draw(st.sampled_from([None, reference_of(base)]))
    if draw(st.booleans()):
        arrays = dict(base.arrays)
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.one_of(st.sampled_from(_ARRAY_NAMES), st.text(max_size=4)))
            if arrays and draw(st.booleans()):
                arrays.pop(draw(st.sampled_from(sorted(arrays))), None)
            else:
                arrays[name] = draw(st.one_of(_array(), _NOT_ARRAY))
        base.arrays = arrays
    if draw(st.booleans()):
        config = dict(base.config)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.one_of(st.sampled_from(_CONFIG_KEYS), st.text(max_size=4)))
            if config and draw(st.booleans()):
                config.pop(draw(st.sampled_from(sorted(config))), None)
            else:
                config[key] = draw(_CONFIG_VALUE)
        base.config = config
    if draw(st.booleans()):
        weights = {b: dict(v) for b, v in base.weights.items()}
        for _ in range(draw(st.integers(0, 2))):
            block = draw(st.sampled_from(_BLOCKS + ["x"]))
            if weights and draw(st.booleans()):
                weights.pop(draw(st.sampled_from(sorted(weights))), None)
            else:
                weights.setdefault(block, {})[draw(st.sampled_from(["conv.weight", "fc.bias", "z"]))] = draw(
                    st.one_of(_array(), _NOT_ARRAY)
                )
        base.weights = weights
    return base, reference


def test_fuzz_validate_raises_only_payload_error(capsys):
    outcomes: Counter = Counter()

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_payloads())
    def run(case):
        payload, reference = case
        try:
            validate(payload, DIMS, reference)
        except PayloadError as err:
            assert str(err)
            outcomes["refused"] += 1
        else:
            outcomes["accepted"] += 1
            assert payload.kind in SCHEMAS
            # whatever is accepted is finite and well-typed
            for spec in (s for s in SCHEMAS[payload.kind].every_array() if s.name in payload.arrays):
                array = payload.arrays[spec.name]
                assert array.dtype == np.dtype(spec.dtype) and array.shape == DIMS.resolve(spec.shape)
                if array.dtype.kind == "f":
                    assert np.isfinite(array).all()
            for key, type_ in SCHEMAS[payload.kind].config:
                if type_ is float:
                    assert math.isfinite(payload.config[key])
        outcomes["examples"] += 1

    run()
    with capsys.disabled():
        print(f"\n[records fuzz] {outcomes['examples']} examples: {outcomes['accepted']} accepted, {outcomes['refused']} refused")
    assert outcomes["examples"] >= 400
    assert outcomes["accepted"] > 0 and outcomes["refused"] > 0


def test_oversized_payloads_are_refused_naming_the_key():
    """An array with more elements than its schema, or an absurdly long string, never gets parsed."""
    from common.records import MAX_STRING_CHARS

    dims = Dims(C=3, S=1, M=4, D=8, L=4, B=20)
    good = {f.name: np.zeros(dims.resolve(f.shape), f.dtype) for f in SCHEMAS["knowledge.sums"].arrays}
    big = dict(good, prototype_sum=np.zeros((3, 1, 4, 8 * 1000), np.float32))
    with pytest.raises(PayloadError, match=r"'prototype_sum' has shape \(3, 1, 4, 8000\), expected \(3, 1, 4, 8\)"):
        validate(Payload("knowledge.sums", big, {"groups": 1, "smallest-group": 2}), dims)
    reason = "x" * (MAX_STRING_CHARS + 1)
    with pytest.raises(PayloadError, match=r"config 'reason' is 65537 characters long"):
        validate(Payload("error", config={"site-name": "a", "reason": reason}), dims)
    validate(Payload("error", config={"site-name": "a", "reason": "x" * MAX_STRING_CHARS}), dims)  # the limit itself is fine


# --------------------------------------------------------------------------- class names (issue 13)


def test_metadata_counts_are_over_the_sites_own_class_names():
    """A site with 2 classes in a 3-class run still sends valid metadata: the server then
    lists its names instead of a shape error."""
    from common.records import metadata_class_names

    payload = valid_payload("metadata", dataclasses.replace(DIMS, C=2))
    payload.config["class-names"] = json.dumps(["adenoma", "hyperplastic"])
    assert validate(payload, DIMS) is payload
    assert metadata_class_names(payload) == ("adenoma", "hyperplastic")
    payload.config["class-names"] = json.dumps(["a", "b", "c"])  # 3 names, 2 counts
    with pytest.raises(PayloadError, match="train_class_counts"):
        validate(payload, DIMS)


@pytest.mark.parametrize(
    "text", ["x", "[]", '{"a": -1}', '{"a": 1.5}', '{"a": true}', json.dumps({str(i): 1 for i in range(101)})]
)
def test_metadata_refuses_skipped_files_that_are_not_counts_by_reason(text):
    payload = valid_payload("metadata")
    payload.config["skipped-files"] = text
    with pytest.raises(PayloadError, match="skipped-files"):
        validate(payload, DIMS)


@pytest.mark.parametrize("nonce", ["ABC", "g" * 8, "a" * 65, "a b"])
def test_a_nonce_that_is_not_short_lowercase_hex_is_refused(nonce):
    payload = valid_payload("evaluation")
    validate(dataclasses.replace(payload, nonce="0123abcd" * 8), DIMS)  # 64 hex digits: fine
    with pytest.raises(PayloadError, match="nonce"):
        validate(dataclasses.replace(payload, nonce=nonce), DIMS)


@pytest.mark.parametrize("text", ["x", "[]", '["only"]', "[1, 2]", '{"a": 1}'])
def test_metadata_refuses_class_names_that_are_not_a_list_of_names(text):
    payload = valid_payload("metadata")
    payload.config["class-names"] = text
    with pytest.raises(PayloadError, match="class-names"):
        validate(payload, DIMS)
