"""The guarded torchvision shim (common/compat.py): both branches, each in a fresh process.

The shim must run before the first torchvision import of a process, so every check that
depends on import order runs in a subprocess of its own. The subprocesses are all started at
once by a module fixture (they are independent) and each test reads its own one's result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / "common" / "compat.py"

# Loads compat.py as a standalone module (not through common/__init__.py, which already calls
# ensure_torchvision), so a script can patch it before the first call.
_STANDALONE = f"""
import importlib.util, json, sys, types
import torch
spec = importlib.util.spec_from_file_location("compat_standalone", {str(COMPAT)!r})
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
assert "torchvision" not in sys.modules
assert "common" not in sys.modules
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
    # No-op branch: the extension is said to load, so nothing may be defined.
    "extension_loads": _STANDALONE
    + """
compat.torchvision_extension_loads = lambda: True
before = hasattr(torch.ops.torchvision, "nms")
result = compat.ensure_torchvision()
print(json.dumps({
    "before": before,
    "result": result,
    "shim": compat._shim_library is not None,
    "has_nms": hasattr(torch.ops.torchvision, "nms"),
    "has_qnms": hasattr(torch.ops.torchvision, "qnms"),
}))
""",
    # Shim branch, forced: schemas defined exactly once, torchvision then imports.
    "extension_missing": _STANDALONE
    + """
compat.torchvision_extension_loads = lambda: False
before = hasattr(torch.ops.torchvision, "nms")
first = compat.ensure_torchvision()
second = compat.ensure_torchvision()
schemas = sorted(str(s) for s in torch._C._jit_get_all_schemas() if str(s).startswith("torchvision::"))
import torchvision  # must now import
print(json.dumps({
    "before": before, "first": first, "second": second,
    "has_nms": hasattr(torch.ops.torchvision, "nms"),
    "schemas": schemas,
}))
""",
    # Too late: torchvision was imported before (a stub stands for it); nothing is probed or defined.
    "already_imported": _STANDALONE
    + """
sys.modules["torchvision"] = types.ModuleType("torchvision")
called = []
compat.torchvision_extension_loads = lambda: called.append(1) or False
result = compat.ensure_torchvision()
print(json.dumps({
    "result": result,
    "shim": compat._shim_library is not None,
    "has_nms": hasattr(torch.ops.torchvision, "nms"),
    "probed": bool(called),
}))
""",
    # torchvision not installed: nothing to do.
    "absent": _STANDALONE
    + """
real = compat.importlib.util.find_spec
compat.importlib.util.find_spec = lambda name, *a, **k: None if name == "torchvision" else real(name, *a, **k)
result = compat.ensure_torchvision()
compat.importlib.util.find_spec = real
print(json.dumps({"result": result, "has_nms": hasattr(torch.ops.torchvision, "nms")}))
""",
}


@pytest.fixture(scope="module")
def procs():
    started = {
        name: subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, code in SCRIPTS.items()
    }
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _result(procs: dict, name: str) -> dict:
    """Wait for one script; it prints one JSON line last."""
    proc = procs[name]
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"subprocess '{name}' failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return json.loads(stdout.strip().splitlines()[-1])


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
