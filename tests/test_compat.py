"""The guarded torchvision shim (common/compat.py): both branches, each in a fresh process.

The shim must run before the first torchvision import of a process, so every check that
depends on import order runs in a fresh interpreter: one for the real import path through
``common``, one for the standalone scenarios of compat.py. Both are started at once by a module
fixture and each test reads its own part of the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread (conftest): on the shared 2-core machine it is much faster.
pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / "common" / "compat.py"

# One process runs every standalone scenario in turn: each loads a fresh copy of compat.py as
# a standalone module (not through common/__init__.py, which already calls ensure_torchvision),
# patches it and calls ensure_torchvision. The no-op scenarios run first and must leave
# torch.ops untouched (each checks that), so the shim scenario still starts from a bare torch.
_STANDALONE = f"""
import importlib.util, json, sys, types
import torch
assert "torchvision" not in sys.modules and "common" not in sys.modules

def fresh(tag):
    spec = importlib.util.spec_from_file_location("compat_" + tag, {str(COMPAT)!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def has(op):
    return hasattr(torch.ops.torchvision, op)

results = {{}}

# No-op branch: the extension is said to load, so nothing may be defined.
compat = fresh("loads")
compat.torchvision_extension_loads = lambda: True
before = has("nms")
result = compat.ensure_torchvision()
results["extension_loads"] = {{
    "before": before, "result": result, "shim": compat._shim_library is not None,
    "has_nms": has("nms"), "has_qnms": has("qnms"),
}}

# Too late: torchvision was imported before (a stub stands for it); nothing is probed or defined.
compat = fresh("imported")
sys.modules["torchvision"] = types.ModuleType("torchvision")
called = []
compat.torchvision_extension_loads = lambda: called.append(1) or False
result = compat.ensure_torchvision()
del sys.modules["torchvision"]
results["already_imported"] = {{
    "result": result, "shim": compat._shim_library is not None, "has_nms": has("nms"), "probed": bool(called),
}}

# torchvision not installed: nothing to do.
compat = fresh("absent")
real = compat.importlib.util.find_spec
compat.importlib.util.find_spec = lambda name, *a, **k: None if name == "torchvision" else real(name, *a, **k)
result = compat.ensure_torchvision()
compat.importlib.util.find_spec = real
results["absent"] = {{"result": result, "has_nms": has("nms")}}

# Shim branch, forced: schemas defined exactly once, torchvision then imports.
compat = fresh("missing")
compat.torchvision_extension_loads = lambda: False
before = has("nms")
first = compat.ensure_torchvision()
second = compat.ensure_torchvision()
schemas = sorted(str(s) for s in torch._C._jit_get_all_schemas() if str(s).startswith("torchvision::"))
import torchvision  # must now import
results["extension_missing"] = {{
    "before": before, "first": first, "second": second, "has_nms": has("nms"), "schemas": schemas,
    "transforms": hasattr(torchvision, "transforms"),
}}
print(json.dumps(results))
"""

SCRIPTS = {
    # The real import path: common first, then torchvision and timm.
    "import_order": """
import json
import common, torchvision, timm
import torch
import common.compat as compat
print(json.dumps({
    "shim": compat._shim_library is not None,
    "loads": compat.torchvision_extension_loads(),
    "has_nms": hasattr(torch.ops.torchvision, "nms"),
    "transforms": hasattr(torchvision, "transforms"),
    "timm_models": len(timm.list_models("resnet18*")) > 0,
}))
""",
    "standalone": _STANDALONE,
}


@pytest.fixture(scope="module")
def procs():
    started = {
        name: subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, code in SCRIPTS.items()
    }
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_DONE: dict[str, dict] = {}


def _result(procs: dict, name: str) -> dict:
    """Wait for one script (it prints one JSON line last); standalone scenarios by name."""
    script = name if name in SCRIPTS else "standalone"
    if script not in _DONE:
        proc = procs[script]
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"subprocess '{script}' failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
        _DONE[script] = json.loads(stdout.strip().splitlines()[-1])
    out = _DONE[script]
    return out if script == name else out[name]


def test_import_common_then_torchvision_and_timm_shim_iff_extension_missing(procs):
    out = _result(procs, "import_order")
    # The shim is installed exactly when the compiled extension cannot load.
    assert out["shim"] is (not out["loads"])
    # Either way torchvision's import needs torchvision::nms to exist.
    assert out["has_nms"] is True
    assert out["transforms"] and out["timm_models"]


def test_this_machine_has_cpu_torch_so_shim_is_installed(procs):
    out = _result(procs, "import_order")
    if out["loads"]:
        pytest.skip("torchvision's extension loads here: the shim branch is not taken")
    assert out["shim"] is True


def test_noop_branch_when_extension_loads_defines_nothing(procs):
    out = _result(procs, "extension_loads")
    assert out["before"] is False
    assert out["result"] is False
    assert out["shim"] is False
    assert out["has_nms"] is False and out["has_qnms"] is False


def test_shim_branch_standalone_defines_schemas_and_is_idempotent(procs):
    out = _result(procs, "extension_missing")
    assert out["before"] is False
    assert out["first"] is True and out["second"] is True
    assert out["has_nms"] is True
    assert out["transforms"] is True
    assert out["schemas"] == [
        "torchvision::nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "torchvision::qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ]


def test_noop_when_torchvision_already_imported(procs):
    out = _result(procs, "already_imported")
    assert out["result"] is False
    assert out["shim"] is False
    assert out["has_nms"] is False
    assert out["probed"] is False


def test_noop_when_torchvision_absent(procs):
    out = _result(procs, "absent")
    assert out["result"] is False
    assert out["has_nms"] is False


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_timm_forward_backward_after_import_common(name):
    import common  # noqa: F401  (shim first)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3)
    images = torch.randn(2, 3, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
