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
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

TENSORS, META = "state.safetensors", "state.json"


class StateError(RuntimeError):
    """A checkpoint that cannot be trusted or does not belong to this run."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".state.", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(flatten_blocks(blocks), tmp)
        data = Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_bytes(run_dir / TENSORS, data)
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
