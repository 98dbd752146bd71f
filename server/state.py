"""Checkpoint and resume: the server's state after each finished round, written atomically.

A run folder holds ``state.safetensors`` (global weights, the bank, centroids: flat
``<block>/<name>`` keys) and ``state.json`` (phase progress, metrics, byte counts, config).
Both are written to a temporary file, fsynced and renamed, tensors first, so a crash leaves
either the previous consistent pair or the new one: a state.json never points at tensors it
does not match (it records the tensor file's digest). Loading verifies that digest and uses
safetensors (no pickle), so a tampered or half-written checkpoint is refused, not executed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from common.files import atomic_write, atomic_write_json

TENSORS, META = "state.safetensors", "state.json"


class StateError(RuntimeError):
    """A checkpoint that cannot be trusted or does not belong to this run."""


def flatten_blocks(blocks: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{block}/{name}": np.ascontiguousarray(a) for block, arrays in blocks.items() for name, a in arrays.items()}


def unflatten_blocks(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    blocks: dict[str, dict[str, np.ndarray]] = {}
    for key, array in flat.items():
        block, name = key.split("/", 1)
        blocks.setdefault(block, {})[name] = array
    return blocks


def save_state(run_dir: Path, blocks: Mapping[str, Mapping[str, np.ndarray]], meta: Mapping[str, Any]) -> None:
    """Write tensors then metadata, each atomically; metadata records the tensors' digest."""
    atomic_write(run_dir / TENSORS, lambda tmp: save_file(flatten_blocks(blocks), tmp))
    data = (run_dir / TENSORS).read_bytes()
    atomic_write_json(run_dir / META, {**meta, "tensors_sha256": hashlib.sha256(data).hexdigest()})


def load_state(run_dir: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]] | None:
    """The last finished state of a run folder, or None when there is none yet."""
    meta_path, tensor_path = run_dir / META, run_dir / TENSORS
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise StateError(f"{meta_path} is not valid JSON ({err}); delete the run folder to start over") from err
    if not tensor_path.exists():
        raise StateError(f"{tensor_path} is missing although {meta_path} exists; delete the run folder to start over")
    digest = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    if digest != meta.get("tensors_sha256"):
        raise StateError(f"{tensor_path} does not match the digest in {meta_path} (tampered or torn write)")
    return unflatten_blocks(load_file(str(tensor_path))), meta
