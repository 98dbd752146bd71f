"""Pretrained backbones (issue 13): ``model.pretrained`` (timm's weights from its cache or the
hub), a local weights file for offline machines, and ``fetch-weights``. The hub is never
reached: :func:`no_network` makes every download fail, :func:`fake_hub` makes timm's hub
download return a weights file the test wrote (what a warm cache would give)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import common  # noqa: F401  (torchvision shim before timm)
import timm
from common.config import config_from_flat
from common.models import (
    PretrainedWeightsError,
    build_student,
    build_teacher,
    pretrained_backbone_state,
    save_backbone_weights,
)

BACKBONE = "test_resnet"
MODEL = {"model.teacher": BACKBONE, "model.student": BACKBONE, "model.embed_dim": 32, "model.num_heads": 4}


def _refuse(*args, **kwargs):
    raise OSError("network disabled in tests")


@pytest.fixture()
def no_network(monkeypatch):
    import timm.models._builder as builder
    import timm.models._hub as hub

    monkeypatch.setattr(hub, "hf_hub_download", _refuse)
    monkeypatch.setattr(builder, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(builder, "download_cached_file", _refuse)


@pytest.fixture()
def weights_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A backbone-only safetensors file of distinctive weights, as fetch-weights writes."""
    from safetensors.torch import save_file

    torch.manual_seed(123)
    state = {k: v.clone() for k, v in timm.create_model(BACKBONE, pretrained=False, num_classes=0).state_dict().items()}
    state = {k: (v + 0.5 if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path = tmp_path / f"{BACKBONE}.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture()
def fake_hub(monkeypatch, no_network, weights_file):
    import timm.models._hub as hub

    path, _ = weights_file
    calls = []

    def download(*args, **kwargs):
        calls.append((args, kwargs))
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    return calls


def _same_backbone(net, state) -> None:
    own = net.backbone.state_dict()
    shared = [k for k in state if k in own]
    assert len(shared) > 10
    for key in shared:
        torch.testing.assert_close(own[key], state[key])


def test_a_local_weights_file_initialises_both_networks_offline(no_network, weights_file):
    path, state = weights_file
    cfg = config_from_flat({**MODEL, "model.teacher_weights": str(path), "model.student_weights": str(path)})
    _same_backbone(build_teacher(cfg.model, 3), state)
    _same_backbone(build_student(cfg.model, 3), state)


def test_the_weights_file_wins_over_pretrained(no_network, weights_file):
    path, state = weights_file
    cfg = config_from_flat({**MODEL, "model.pretrained": True, "model.teacher_weights": str(path)})
    _same_backbone(build_teacher(cfg.model, 3), state)  # no hub asked (it would raise)


def test_pretrained_loads_timms_weights_from_the_cache_or_hub(fake_hub, weights_file):
    _, state = weights_file
    cfg = config_from_flat({**MODEL, "model.pretrained": True})
    _same_backbone(build_student(cfg.model, 3), state)
    assert fake_hub  # through timm's own pretrained loading


def test_pretrained_offline_says_how_to_get_the_weights(no_network):
    cfg = config_from_flat({**MODEL, "model.pretrained": True})
    with pytest.raises(PretrainedWeightsError) as err:
        build_teacher(cfg.model, 3)
    message = str(err.value)
    assert f"fedpagkd fetch-weights {BACKBONE} --out {BACKBONE}.safetensors" in message
    assert "model.teacher_weights" in message and "model.pretrained=false" in message


def test_sites_build_networks_without_loading_any_weights(no_network):
    """Sites receive the weights from the server: they never need the hub or the file."""
    cfg = config_from_flat({**MODEL, "model.pretrained": True, "model.teacher_weights": "/nowhere.safetensors"})
    build_teacher(cfg.model, 3, initial=False)
    build_student(cfg.model, 3, initial=False)


def test_timm_reads_a_weights_file_through_its_pretrained_path(no_network, weights_file):
    path, state = weights_file
    loaded = pretrained_backbone_state(BACKBONE, file=path)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value)


def test_fetch_weights_writes_a_file_a_site_can_use_and_never_overwrites(fake_hub, weights_file, tmp_path):
    _, state = weights_file
    out = save_backbone_weights(BACKBONE, tmp_path / "copy" / "w.safetensors")
    cfg = config_from_flat({**MODEL, "model.student_weights": str(out)})
    _same_backbone(build_student(cfg.model, 3), state)
    with pytest.raises(FileExistsError, match="already exists"):
        save_backbone_weights(BACKBONE, out)
    with pytest.raises(ValueError, match=".safetensors"):
        save_backbone_weights(BACKBONE, tmp_path / "w.pt")


def test_an_unknown_backbone_is_named(no_network):
    with pytest.raises(ValueError, match="not_a_model"):
        pretrained_backbone_state("not_a_model")
