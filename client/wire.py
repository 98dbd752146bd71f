"""Flower adapter for :mod:`common.records`: Payload <-> RecordDict, kind <-> message type.

The one place that knows how a payload sits in a Flower message; the ServerApp imports it too.
Layout of a RecordDict: ``config`` (ConfigRecord: ``kind`` plus the scalar config),
``arrays`` (ArrayRecord of statistics) and ``weights.<block>`` (ArrayRecord per state dict).
A reply may also carry ``timing`` (MetricRecord ``compute-s``: the seconds its handler ran),
transport metadata outside the payload, which the server reads for its per-phase timings.
``nonce`` (ConfigRecord ``nonce``) holds :attr:`common.records.Payload.nonce`: a request's
one-time token, echoed by its reply.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.records import Payload, PayloadError, check_weights

# Protocol kind -> Flower message type "<category>.<action>" (action a Python identifier).
MESSAGE_TYPE = {
    "discover": "query.discover",
    "teacher.train": "train.teacher",
    "knowledge.seed": "query.knowledge_seed",
    "knowledge.stats": "query.knowledge_stats",
    "student.train": "train.student",
    "evaluate": "evaluate.score",
}

_WEIGHTS = "weights."
_TIMING = "timing"
_NONCE = "nonce"


def to_recorddict(payload: Payload, compute_s: float | None = None) -> RecordDict:
    content = RecordDict()
    if compute_s is not None:
        content[_TIMING] = MetricRecord({"compute-s": float(compute_s)})
    content["config"] = ConfigRecord({"kind": payload.kind, **payload.config})
    if payload.nonce:
        content[_NONCE] = ConfigRecord({_NONCE: payload.nonce})
    if payload.arrays:
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.arrays.items()})
    for block, weights in payload.weights.items():
        content[_WEIGHTS + block] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
    return content


def compute_seconds(content: RecordDict) -> float | None:
    """The handler's compute time a reply declares (None if absent or not a finite >= 0 float)."""
    record = content.metric_records.get(_TIMING)
    value = record.get("compute-s") if record is not None else None
    if not isinstance(value, float) or not np.isfinite(value) or value < 0:
        return None
    return value


def from_recorddict(content: RecordDict, sender: str = "message") -> Payload:
    """Parse without trusting the sender: structure errors become :class:`PayloadError`.
    The schema check itself is :func:`common.records.validate`."""
    config_records = content.config_records
    if "config" not in config_records or "kind" not in config_records["config"]:
        raise PayloadError(f"{sender}: message has no 'config' record with a 'kind'")
    # Every record is read or refused, as unexpected array records are: an extra ConfigRecord or
    # MetricRecord was ignored silently, so a sender could carry anything beside its payload.
    extra = sorted(set(config_records) - {"config", _NONCE}) + sorted(set(content.metric_records) - {_TIMING})
    if extra:
        raise PayloadError(
            f"{sender}: unexpected record(s) {extra}; a message carries 'config', 'arrays', 'weights.<block>', "
            f"'{_NONCE}' and '{_TIMING}' only (same FedPaGKD version on server and sites?)"
        )
    nonce = dict(config_records[_NONCE]) if _NONCE in config_records else {_NONCE: ""}
    if set(nonce) != {_NONCE} or not isinstance(nonce[_NONCE], str):
        raise PayloadError(f"{sender}: the '{_NONCE}' record must hold one string '{_NONCE}', got {sorted(nonce)}")
    config = dict(config_records["config"])
    kind = config.pop("kind")
    if not isinstance(kind, str):
        raise PayloadError(f"{sender}: 'kind' must be a string, got {kind!r}")
    arrays: dict[str, np.ndarray] = {}
    weights: dict[str, dict[str, np.ndarray]] = {}
    try:
        for name, record in content.array_records.items():
            numpy = {k: v.numpy() for k, v in record.items()}
            if name == "arrays":
                arrays = numpy
            elif name.startswith(_WEIGHTS):
                weights[name[len(_WEIGHTS) :]] = numpy
            else:
                raise PayloadError(f"{sender}: unexpected array record '{name}'")
    except (ValueError, TypeError) as err:  # undecodable array bytes
        raise PayloadError(f"{sender}: an array could not be decoded ({err})") from err
    return Payload(kind, arrays, config, weights, nonce=nonce[_NONCE])


def state_to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A module's state dict as numpy arrays (what travels). Scalars (BatchNorm's
    ``num_batches_tracked``) become shape (1,): Flower's Array does not keep 0-d shapes."""
    return {k: np.atleast_1d(v.detach().cpu().numpy()).copy() for k, v in module.state_dict().items()}


def module_weight_shapes(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """{param: (shape, dtype)} of a module's state dict as it travels (:func:`state_to_numpy`:
    scalars as (1,)), the reference :func:`common.records.check_weights` reads."""
    return {k: (tuple(v.shape) if v.dim() else (1,), str(v.detach().cpu().numpy().dtype)) for k, v in module.state_dict().items()}


def load_numpy_state(module: torch.nn.Module, state: Mapping[str, np.ndarray], block: str = "weights") -> None:
    """Load received weights, refusing any tensor whose name, shape or dtype is not exactly this
    model's (:func:`common.records.check_weights`: a transposed tensor of the same size must not
    load silently). Scalars travel as (1,)."""
    check_weights("server", block, state, module_weight_shapes(module), model="this site's model")
    own = module.state_dict()
    module.load_state_dict(
        {name: torch.from_numpy(state[name].copy()).reshape(target.shape) for name, target in own.items()}, strict=True
    )
