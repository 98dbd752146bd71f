"""Make ``import torchvision`` (and so ``import timm``) work on a CPU-only torch.

torchvision 0.28.0 ships as a CUDA build: its ``_C`` extension links ``libtorch_cuda.so``.
On a CPU torch the extension fails to load, and ``torchvision/_meta_registrations.py`` then
dies at import with ``operator torchvision::nms does not exist``, because it registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally (its other
registrations are guarded by ``_has_ops()``).

:func:`ensure_torchvision` defines just those two op schemas, and only when the extension
cannot load; where torchvision is whole it does nothing. It must run before the first
torchvision import in every process (ClientApp processes and Ray workers included), which is
why ``common/__init__.py`` calls it: any import of ``common`` runs it first.

What stays unavailable on such a machine: ``torchvision.ops.nms``/``roi_align`` kernels and
``torchvision.io`` decoding (we decode with PIL). Transforms, models and timm work.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Schemas as torchvision's C++ extension declares them (csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp).
_MISSING_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# Keeps the torch.library.Library alive: dropping it would unregister the schemas.
_shim_library: torch.library.Library | None = None


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in sorted(Path(folder).glob("_C*.so")) + sorted(Path(folder).glob("_C*.pyd")):
            return candidate
    return None


def torchvision_extension_loads() -> bool:
    """True when torchvision's compiled ops load into this torch (a matching build)."""
    path = _extension_path()
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        log.debug("torchvision extension %s does not load: %s", path, err)
        return False
    return True


def ensure_torchvision() -> bool:
    """Define the op schemas torchvision's import needs when its extension cannot load.

    Returns True if the shim was installed (now or earlier in this process), False when it was
    not needed (whole torchvision, torchvision absent, or torchvision already imported).
    """
    global _shim_library
    if _shim_library is not None:
        return True
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return False
    if torchvision_extension_loads():
        return False
    library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OP_SCHEMAS:
        library.define(schema)
    _shim_library = library
    log.info("torchvision extension unavailable on this torch build; defined %d op schemas", len(_MISSING_OP_SCHEMAS))
    return True
