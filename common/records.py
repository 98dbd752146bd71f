"""The wire format: every message of the FedPaGKD protocol, with a declared schema.

A message's content is a :class:`Payload`: named arrays (statistics), named weight blocks
(state dicts of ``teacher``, ``student``, ``head``) and scalar config values. Each message kind
has a :class:`Schema` listing its keys, dtypes and *symbolic* shapes; dims resolve from the
run's :class:`Dims` (C classes, S sub-types, M queries, D width, L codebook size, B bins).
No schema has a per-image dimension: that is what the privacy audit checks.

The knowledge statistics are one table, :data:`common.statistics.KNOWLEDGE_STATISTICS`; the bank,
seed, centroid, masked and DP fields derived from it are re-exported here with the other field
tables. "Bank": on the wire and on the server, the summed statistics (:data:`BANK_STATISTICS`);
at a site, the means a student distils from (:class:`common.losses.KnowledgeBank`).

:func:`validate` refuses a payload with a missing, extra, mistyped, misshaped, negative-count
or non-finite entry, naming the key. Flower is not imported here: ``client/wire.py`` maps a
Payload to a ``RecordDict`` and back, byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from common.config import LIMITS
from common.statistics import (  # noqa: F401  (re-exported: the wire's field tables, read from here)
    ArrayField,
    BANK_STATISTICS,
    CENTROIDS,
    DP_COUNT_KEYS,
    DP_FLOAT_KEYS,
    IMAGE_COUNT,
    KNOWLEDGE_SEEDS_FIELDS,
    KNOWLEDGE_STATISTICS,
    MASKED_BANK_STATISTICS,
    STATISTICS,
    SUM_COUNT_PAIRS,
    Statistic,
    mean_of,
    seeds_from_statistics,
    statistic_means,
    F32 as _F32,
    I64 as _I64,
)

# 2: evaluations folded into knowledge.seeds and student.update; 3: secure aggregation, class prototypes;
# 4: learning-rate schedule spans, validation split (model selection), evaluations in teacher.update;
# 6: every request carries a nonce its reply echoes (Payload.nonce), metadata reports the site's DP
# releases and the files it did not read; FedProto's class prototypes only in its own student messages
PROTOCOL_VERSION = 6


# Longest config string accepted (a peer roster of ~700 sites fits): a larger one is refused, not parsed.
MAX_STRING_CHARS = 65536


def _most(key: str) -> int:
    """The largest value the run config allows for ``key`` (:data:`common.config.LIMITS`)."""
    return int(LIMITS[key][0])


# Inclusive bounds of every integer value of a request that a site acts on, with where the
# server takes it from (the fix a refusal names): without them local epochs of 0 or 10^9 or a
# negative round were taken as asked. A reply's counts are the server's to judge, against the
# site's declaration (server/trust.py); "protocol" is compared with PROTOCOL_VERSION.
INT_RANGES: dict[str, tuple[int, int, str]] = {
    "round": (1, max(_most("fed.teacher_rounds"), _most("fed.student_rounds")), "rounds and refreshes count from 1"),
    "seed": (0, 2**53, "train.seed x 100,000 + phase + round"),
    "local-epochs": (1, _most("train.local_epochs"), "train.local_epochs"),
    "iteration": (1, _most("pagkd.kmeans_iters"), "Lloyd steps count from 1 to pagkd.kmeans_iters"),
    "attempt": (0, _most("data.nbi_sites"), "a restarted step counts attempts from 0, at most one per NBI site"),
    "releases": (0, 2**53, "the statistics releases a site counted for this run (client.egress)"),
}

# Replies that release knowledge statistics: each is one DP release of its site (server.accounting
# counts them as asked, the site as sent: client.egress.count_release).
RELEASE_KINDS = ("knowledge.seeds", "knowledge.sums", "knowledge.masked")
# A request's nonce (Payload.nonce): what the server accepts as one, at most this long.
NONCE_RE = re.compile(r"[0-9a-f]{0,64}")
# At most this many reasons for unread files in a site's metadata ("skipped-files").
MAX_SKIP_REASONS = 100


class PayloadError(ValueError):
    """A message does not match its schema; the message names the key and what was expected."""


@dataclass(frozen=True)
class Dims:
    """Sizes the symbolic shapes resolve to (all fixed for a run)."""

    C: int  # classes
    S: int  # prototype sets (sub-types) per class
    M: int  # queries per prototype set
    D: int  # token / prototype width
    L: int  # codebook centroids per class and label
    B: int  # score-histogram bins

    def resolve(self, shape: tuple[str | int, ...]) -> tuple[int, ...]:
        return tuple(getattr(self, d) if isinstance(d, str) else d for d in shape)


def dims_of(cfg: Any) -> Dims:
    """The run's :class:`Dims` from its :class:`common.config.Config` (server and sites alike)."""
    return Dims(
        C=cfg.data.num_classes,
        S=cfg.pagkd.subtypes,
        M=cfg.model.num_queries,
        D=cfg.model.embed_dim,
        L=cfg.pagkd.codebook_size,
        B=cfg.fed.num_bins,
    )


@dataclass(frozen=True)
class Schema:
    kind: str
    arrays: tuple[ArrayField, ...] = ()
    config: tuple[tuple[str, type], ...] = ()
    weights: tuple[str, ...] = ()  # weight blocks carried, validated against reference state dicts
    # Groups of arrays a message carries only when its method uses them (each group all or none):
    # the bank only to a student that distils from it, a baseline plug-in's arrays only in its runs.
    optional: tuple[tuple[ArrayField, ...], ...] = ()

    def array_names(self) -> list[str]:
        return [f.name for f in self.arrays]

    def every_array(self) -> tuple[ArrayField, ...]:
        """The arrays a message of this kind may carry: the required ones, then every optional group's."""
        return self.arrays + tuple(f for group in self.optional for f in group)


@dataclass
class Payload:
    """``nonce``: a request's one-time token (random hex, :class:`server.channel.Channel` draws
    one per request sent), echoed by the reply that answers it: a reply recorded in another run
    or answering an earlier round carries another one and is dropped. Transport metadata: not in
    the schemas, not counted in :meth:`num_bytes`; '' where none was given."""

    kind: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    nonce: str = ""

    def num_bytes(self) -> int:
        """Bytes of array data plus config values (what dominates the wire size)."""
        size = sum(a.nbytes for a in self.arrays.values())
        size += sum(a.nbytes for block in self.weights.values() for a in block.values())
        size += sum(len(str(k)) + len(str(v)) for k, v in self.config.items())
        return size


# --------------------------------------------------------------------------- field groups

# FedProto-style baseline: per-class sums of the WLI students' mean embedded tokens (only its
# student messages carry them).
CLASS_PROTOTYPES = (
    ArrayField("class_prototype_sum", _F32, ("C", "D")),
    ArrayField("class_prototype_count", _I64, ("C",), counts=True),  # images summed
)

EVALUATION_FIELDS = (
    ArrayField("score_positives", _I64, ("C", "B"), counts=True),
    ArrayField("score_negatives", _I64, ("C", "B"), counts=True),
    ArrayField("confusion", _I64, ("C", "C"), counts=True),
)

# An evaluation folded into another reply: images scored (0: not evaluated) and their mean CE.
EVALUATED = (("eval-examples", int), ("eval-loss", float))

_ROUND = (("round", int), ("seed", int))
# A training request's share of the run's learning-rate schedule (common/optim.py): progress
# in [0, 1] at its first and after its last local step.
_SPAN = (("schedule-start", float), ("schedule-end", float))
# "evaluate": the split ('val' or 'test') on which to score the received model before the
# local work, its evaluation riding on the reply; '' for none (all-zero histograms).
_EVALUATE = (("evaluate", str),)
EVALUATION_SPLITS = ("val", "test")

# --------------------------------------------------------------------------- message kinds

SCHEMAS: dict[str, Schema] = {
    s.kind: s
    for s in (
        Schema("discover", config=(("protocol", int),)),
        Schema(
            "metadata",
            arrays=(
                ArrayField("train_class_counts", _I64, ("C",), counts=True),
                ArrayField("val_class_counts", _I64, ("C",), counts=True),  # zeros: the site has no val split
                ArrayField("test_class_counts", _I64, ("C",), counts=True),
            ),
            # "class-names": JSON list of the site's class names in label order; its length is
            # the C of this reply's counts (see metadata_class_names), so a site whose classes
            # differ from the run's can still say which it has and the server can list them.
            # "releases": the statistics releases the site counted for this run (its DP budget; 0 without
            # a state folder); "skipped-files": JSON {reason: files} of the files it did not read.
            config=(
                ("site-name", str),
                ("modality", str),
                ("version", str),
                ("protocol", int),
                ("class-names", str),
                ("releases", int),
                ("skipped-files", str),
            ),
        ),
        # The received teacher is the previous round's global one: "evaluate" scores it (val).
        Schema("teacher.train", config=_ROUND + (("local-epochs", int),) + _SPAN + _EVALUATE, weights=("teacher", "head")),
        Schema(
            "teacher.update",
            arrays=EVALUATION_FIELDS,
            config=(("num-examples", int), ("loss", float)) + EVALUATED,
            weights=("teacher", "head"),
        ),
        # "evaluate": also score the (selected) teacher on the test split (its evaluation rides on
        # this reply instead of costing a message of its own).
        Schema("knowledge.seed", config=_ROUND + _EVALUATE, weights=("teacher", "head")),
        # "public-key": the site's X25519 key (hex) for this refresh's secure aggregation; "" when off.
        Schema(
            "knowledge.seeds",
            arrays=KNOWLEDGE_SEEDS_FIELDS + EVALUATION_FIELDS,
            config=(("groups", int), ("public-key", str)) + EVALUATED,
        ),
        # "peers": JSON {site-name: public-key hex} of every site in this secure sum ("" when off);
        # "attempt" changes the masks when a step is restarted without a site that dropped out.
        Schema("knowledge.stats", arrays=CENTROIDS, config=_ROUND + (("iteration", int), ("peers", str), ("attempt", int))),
        Schema("knowledge.sums", arrays=BANK_STATISTICS, config=(("groups", int), ("smallest-group", int))),
        Schema("knowledge.masked", arrays=MASKED_BANK_STATISTICS, config=(("groups", int), ("smallest-group", int))),
        Schema(
            "student.train",
            optional=(BANK_STATISTICS, CLASS_PROTOTYPES),  # the bank: when use-bank is set
            # "evaluate": score the received global student (the previous round's) on the val
            # split before training: the next round's request is the previous round's evaluation.
            config=_ROUND + (("local-epochs", int), ("group-losses", bool), ("use-bank", bool)) + _SPAN + _EVALUATE,
            weights=("student", "head"),
        ),
        Schema(
            "student.update",
            arrays=EVALUATION_FIELDS,
            optional=(CLASS_PROTOTYPES,),
            config=(("num-examples", int), ("loss", float), ("ce", float), ("den", float), ("pro", float)) + EVALUATED,
            weights=("student", "head"),
        ),
        Schema("evaluate", config=(("model", str), ("split", str)), weights=("net",)),
        Schema("evaluation", arrays=EVALUATION_FIELDS, config=(("num-examples", int), ("loss", float))),
        # A site's refusal of any request: it names itself and the reason (bad data, wrong role...).
        Schema("error", config=(("site-name", str), ("reason", str))),
    )
}

# Which reply answers which request.
REPLY_KIND = {
    "discover": "metadata",
    "teacher.train": "teacher.update",
    "knowledge.seed": "knowledge.seeds",
    "knowledge.stats": "knowledge.sums",
    "student.train": "student.update",
    "evaluate": "evaluation",
}


def reply_kind(request: Payload) -> str:
    """The reply kind a request expects (a secure-aggregation Lloyd step answers masked sums)."""
    if request.kind == "knowledge.stats" and request.config.get("peers"):
        return "knowledge.masked"
    return REPLY_KIND[request.kind]


def _check_array(where: str, value: Any, spec: ArrayField, dims: Dims) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise PayloadError(f"{where}: '{spec.name}' must be a numpy array, got {type(value).__name__}")
    if value.dtype != np.dtype(spec.dtype):
        raise PayloadError(f"{where}: '{spec.name}' has dtype {value.dtype}, expected {spec.dtype}")
    expected = dims.resolve(spec.shape)
    if value.shape != expected:
        raise PayloadError(
            f"{where}: '{spec.name}' has shape {value.shape}, expected {expected} ({'x'.join(map(str, spec.shape))})"
        )
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise PayloadError(f"{where}: '{spec.name}' holds NaN or Inf")
    if spec.counts and (value < 0).any():
        raise PayloadError(f"{where}: '{spec.name}' holds negative counts")
    return value


def _check_config(where: str, config: Mapping[str, Any], schema: Schema) -> None:
    expected = dict(schema.config)
    missing = sorted(set(expected) - set(config))
    if missing:
        raise PayloadError(f"{where}: missing config keys {missing}")
    extra = sorted(set(config) - set(expected))
    if extra:
        raise PayloadError(f"{where}: unexpected config keys {extra}; '{schema.kind}' has {sorted(expected)}")
    for key, kind in expected.items():
        value = config[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise PayloadError(f"{where}: config '{key}' = {value!r} should be {kind.__name__}")
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            raise PayloadError(
                f"{where}: config '{key}' is {len(value)} characters long, at most {MAX_STRING_CHARS} are accepted"
            )
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise PayloadError(f"{where}: config '{key}' = {value} does not fit in int64 (what a record carries)")
        if kind is int and key in INT_RANGES and not INT_RANGES[key][0] <= value <= INT_RANGES[key][1]:
            low, high, source = INT_RANGES[key]
            raise PayloadError(
                f"{where}: config '{key}' = {value} is out of range: expected {low:,}..{high:,} ({source}); "
                "not acted on: the sender's run config or version is wrong, fix it there"
            )
        if kind is float:
            try:
                finite = math.isfinite(float(value))
            except OverflowError:  # an int too large for a float
                finite = False
            if not finite:
                raise PayloadError(f"{where}: config '{key}' is not finite ({value!r}; a float is expected)")


def check_weights(
    where: str,
    block: str,
    weights: Mapping[str, np.ndarray],
    reference: Mapping[str, tuple[tuple[int, ...], str]],
    model: str = "the model",
) -> None:
    """The one weight-shape check: ``weights`` (a received state dict of numpy arrays) must have
    exactly ``reference``'s names ({param: (shape, dtype)}, :func:`weight_shapes`), each with its
    shape and dtype, and finite values. The server checks replies against its global models, a
    site checks requests against its own (``client.wire.load_numpy_state``); ``model`` names the
    receiver's model in the message. Raises :class:`PayloadError` naming the block and tensor."""
    missing = sorted(set(reference) - set(weights))
    extra = sorted(set(weights) - set(reference))
    if missing or extra:
        raise PayloadError(
            f"{where}: weights '{block}' do not match {model}: missing {missing[:3]}{'...' if len(missing) > 3 else ''} "
            f"(the received weights lack them), unexpected {extra[:3]}{'...' if len(extra) > 3 else ''} "
            "(same backbone and num_classes on every site?)"
        )
    for name, (shape, dtype) in reference.items():
        array = weights[name]
        if not isinstance(array, np.ndarray) or array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            got_shape, got_dtype = getattr(array, "shape", None), getattr(array, "dtype", type(array).__name__)
            raise PayloadError(
                f"{where}: weights '{block}.{name}' has shape {got_shape} and dtype {got_dtype}, "
                f"expected shape {tuple(shape)} and dtype {dtype} ({model})"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise PayloadError(f"{where}: weights '{block}.{name}' hold NaN or Inf")


def validate(
    payload: Payload,
    dims: Dims,
    weight_shapes: Mapping[str, Mapping[str, tuple[tuple[int, ...], str]]] | None = None,
    sender: str = "message",
) -> Payload:
    """Check a payload against its kind's schema; return it or raise :class:`PayloadError`.

    ``weight_shapes`` maps each weight block (``teacher``, ``student``, ``head``, ``net``) to
    ``{param: (shape, dtype)}`` of the receiver's own model; a carried block absent from it
    is checked for finiteness only. ``sender`` names the site in error messages.
    """
    where = f"{sender} ({payload.kind})"
    if not isinstance(payload.nonce, str) or not NONCE_RE.fullmatch(payload.nonce):
        raise PayloadError(f"{where}: nonce {str(payload.nonce)[:80]!r} is not at most 64 lowercase hex digits")
    if payload.kind == "metadata" and "class-names" in payload.config:  # a site's counts are over its own classes
        dims = dataclasses.replace(dims, C=len(metadata_class_names(payload, sender)))
    schema = SCHEMAS.get(payload.kind)
    if schema is None:
        raise PayloadError(f"{sender}: unknown message kind '{payload.kind}'; known: {sorted(SCHEMAS)}")
    names = set(schema.array_names())
    missing = sorted(names - set(payload.arrays))
    if missing:
        raise PayloadError(f"{where}: missing arrays {missing}")
    carried: tuple[ArrayField, ...] = ()
    for group in schema.optional:
        present = tuple(f for f in group if f.name in payload.arrays)
        if present and len(present) < len(group):
            raise PayloadError(
                f"{where}: carries {[f.name for f in present]} without the rest of {[f.name for f in group]} (all or none)"
            )
        carried += present
    extra = sorted(set(payload.arrays) - names - {f.name for f in carried})
    if extra:
        raise PayloadError(f"{where}: unexpected arrays {extra}; '{schema.kind}' carries {sorted(names)}")
    for spec in schema.arrays + carried:
        _check_array(where, payload.arrays[spec.name], spec, dims)
    _check_config(where, payload.config, schema)
    if payload.kind == "metadata":
        metadata_skipped(payload, sender)
    config = payload.config
    if "evaluate" in config and config["evaluate"] not in ("", *EVALUATION_SPLITS):
        raise PayloadError(
            f"{where}: config 'evaluate' = {config['evaluate']!r}, expected '' or one of {list(EVALUATION_SPLITS)}"
        )
    if "schedule-start" in config and not 0.0 <= config["schedule-start"] <= config["schedule-end"] <= 1.0:
        raise PayloadError(f"{where}: schedule span [{config['schedule-start']}, {config['schedule-end']}] is not within [0, 1]")
    blocks = set(schema.weights)
    if set(payload.weights) != blocks:
        raise PayloadError(f"{where}: weight blocks {sorted(payload.weights)}, expected {sorted(blocks)}")
    for block, weights in payload.weights.items():
        if not isinstance(weights, Mapping):
            raise PayloadError(f"{where}: weights '{block}' must map names to arrays")
        reference = (weight_shapes or {}).get(block)
        if reference is None:
            if not isinstance(weights, Mapping):
                raise PayloadError(f"{where}: weights '{block}' must map names to arrays")
            for name, array in weights.items():
                if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
                    kind = getattr(array, "dtype", type(array).__name__)
                    raise PayloadError(f"{where}: weights '{block}.{name}' must be a real numeric array, got {kind}")
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise PayloadError(f"{where}: weights '{block}.{name}' hold NaN or Inf")
        else:
            check_weights(where, block, weights, reference)
    return payload


def metadata_class_names(payload: Payload, sender: str = "message") -> tuple[str, ...]:
    """The class names a ``metadata`` reply declares (its ``class-names`` JSON list)."""
    text = payload.config.get("class-names")
    try:
        names = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise PayloadError(f"{sender} (metadata): config 'class-names' = {text!r} should be a JSON list of >= 2 class names")
    return tuple(names)


def metadata_skipped(payload: Payload, sender: str = "message") -> dict[str, int]:
    """The files a ``metadata`` reply says its site did not read ({reason: files}, its
    ``skipped-files`` JSON object of at most :data:`MAX_SKIP_REASONS` counts >= 0)."""
    text = payload.config.get("skipped-files")
    try:
        skipped = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        skipped = None
    ok = isinstance(skipped, dict) and len(skipped) <= MAX_SKIP_REASONS
    if not ok or not all(type(n) is int and 0 <= n < 2**53 for n in skipped.values()):
        raise PayloadError(
            f"{sender} (metadata): config 'skipped-files' = {str(text)[:200]!r} should be a JSON object of at most "
            f"{MAX_SKIP_REASONS} reasons, each with a count >= 0"
        )
    return skipped


def make(kind: str, dims: Dims, *, arrays=None, config=None, weights=None) -> Payload:
    """Build a payload of a kind and validate it before it is sent (the sender's own check)."""
    payload = Payload(kind, dict(arrays or {}), dict(config or {}), {k: dict(v) for k, v in (weights or {}).items()})
    return validate(payload, dims)


def empty_statistics(fields: tuple[ArrayField, ...], dims: Dims) -> dict[str, np.ndarray]:
    """All-zero arrays of the given fields (no knowledge yet, or a part a message leaves unused)."""
    return {f.name: np.zeros(dims.resolve(f.shape), dtype=f.dtype) for f in fields}


def weight_shapes(state: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{param: (shape, dtype)} of a numpy state dict, the reference :func:`validate` checks against."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in state.items()}
