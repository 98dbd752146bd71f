"""The student checkpoint a run ends with: weights as safetensors, and in the file's metadata
what is needed to rebuild and use the network (backbone, classes and their names, image size,
embed dim, output stride). Written by the server (``runs/<run>/student.safetensors``), read by
``fedpagkd predict`` / ``export``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file

from common.files import atomic_write
from common.models import PaGKDNet

STUDENT_CHECKPOINT = "student.safetensors"


def save_checkpoint(path: str | Path, state: dict, cfg, class_names: tuple[str, ...]) -> None:
    """Write a student checkpoint: weights as safetensors, with what is needed to rebuild and
    use it (backbone, classes, image size, embed dim) in the file's metadata. Atomic."""
    meta = {
        "backbone": cfg.model.student,
        "num_classes": str(cfg.data.num_classes),
        "embed_dim": str(cfg.model.embed_dim),
        "image_size": str(cfg.data.image_size),
        "output_stride": str(cfg.model.output_stride),
        "class_names": json.dumps(list(class_names)),
    }
    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp, metadata=meta))


def load_checkpoint(path: str | Path) -> tuple[PaGKDNet, dict]:
    """Rebuild a student from :func:`save_checkpoint`'s file -> (network in eval mode, metadata
    with ``class_names`` a tuple and sizes as ints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; a finished run writes runs/<name>/{STUDENT_CHECKPOINT}")
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    missing = {"backbone", "num_classes", "embed_dim", "image_size", "class_names"} - set(raw)
    if missing:
        raise ValueError(f"checkpoint '{path}' lacks metadata {sorted(missing)}; was it written by save_checkpoint?")
    meta = {
        "backbone": raw["backbone"],
        "num_classes": int(raw["num_classes"]),
        "embed_dim": int(raw["embed_dim"]),
        "image_size": int(raw["image_size"]),
        "output_stride": int(raw.get("output_stride", 32)),
        "class_names": tuple(json.loads(raw["class_names"])),
    }
    net = PaGKDNet(meta["backbone"], meta["num_classes"], meta["embed_dim"], output_stride=meta["output_stride"])
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval(), meta
