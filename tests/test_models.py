"""Networks (common/models.py): the timm backbone net, the lesion-aware query head, weights, devices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import common  # noqa: F401  (torchvision shim before timm)
import timm
from common.config import ModelConfig
from common.grouping import Group
from common.models import (
    LesionQueryHead,
    PaGKDNet,
    build_query_head,
    build_student,
    build_teacher,
    group_prototypes,
    load_weights,
)
from common.device import pick_device

# One intra-op thread (conftest): on the shared 2-core machine it is much faster.
pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE = 64
C, D = 5, 16  # classes, token width


@pytest.fixture(scope="module")
def nets() -> dict[str, PaGKDNet]:
    torch.manual_seed(0)
    return {name: PaGKDNet(name, C, D).eval() for name in ("resnet18", "efficientnet_b0")}


def _images(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- PaGKDNet


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_net_output_shapes(nets, name):
    net = nets[name]
    with torch.no_grad():
        out = net(_images(3))
    b, cf, h, w = out.feature_map.shape
    assert b == 3 and cf == net.num_features
    assert (h, w) == (IMAGE // 32, IMAGE // 32)  # stride-32 last stage
    assert out.logits.shape == (3, C)
    assert out.tokens.shape == (3, h * w, D)
    # logits are GAP + linear on the feature map
    torch.testing.assert_close(out.logits, net.classifier(out.feature_map.mean(dim=(2, 3))))
    # token n of image b is the embedding of feature-map pixel n (row-major)
    pixel = out.feature_map[1, :, 1, 0]
    torch.testing.assert_close(out.tokens[1, 1 * w + 0], net.embed.weight[:, :, 0, 0] @ pixel + net.embed.bias)


def test_teacher_and_student_may_differ():
    cfg = ModelConfig(teacher="efficientnet_b0", student="resnet18", embed_dim=D, num_queries=3, num_heads=4)
    teacher, student = build_teacher(cfg, C), build_student(cfg, C)
    head = build_query_head(cfg, C)
    assert teacher.backbone_name == "efficientnet_b0" and student.backbone_name == "resnet18"
    assert teacher.detach_embed is True and student.detach_embed is False
    assert teacher.num_features != student.num_features  # 320 vs 512 channels
    with torch.no_grad():
        t, s = teacher(_images()), student(_images())
    assert t.tokens.shape == s.tokens.shape == (2, 4, D)
    # one shared head reads both modalities' tokens
    groups = [Group(class_id=1, indices=torch.tensor([0, 1]))]
    pt, _, _ = group_prototypes(head, t.tokens, groups)
    ps, _, _ = group_prototypes(head, s.tokens, groups)
    assert pt.shape == ps.shape == (1, 3, D)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_embed_stops_token_gradient_at_the_backbone(detach):
    torch.manual_seed(0)
    net = PaGKDNet("resnet18", C, D, detach_embed=detach)
    out = net(_images())
    out.tokens.pow(2).sum().backward()
    embed_grads = [p.grad for p in net.embed.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in embed_grads)
    backbone_grads = [p.grad for p in net.backbone.parameters()]
    if detach:
        assert all(g is None for g in backbone_grads)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads)
    assert all(p.grad is None for p in net.classifier.parameters())


def test_detached_teacher_still_trains_its_classifier_through_logits():
    torch.manual_seed(0)
    net = PaGKDNet("resnet18", C, D, detach_embed=True)
    net(_images()).logits.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.parameters())
    assert all(p.grad is None for p in net.embed.parameters())


def test_unknown_timm_name_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="resnet_nonexistent_42"):
        PaGKDNet("resnet_nonexistent_42", C, D)


# --------------------------------------------------------------------------- LesionQueryHead

# All different: queries, images per group, width, classes, groups, tokens per image, heads.
M, K, HD, HC, G, N, HEADS = 3, 4, 8, 5, 2, 6, 2


@pytest.fixture
def head() -> LesionQueryHead:
    torch.manual_seed(0)
    return LesionQueryHead(HD, M, HEADS, HC).eval()


def _tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_head_shapes(head):
    tokens = _tokens(G, K, N, HD)
    prototypes, attention = head(tokens, need_weights=True)
    assert prototypes.shape == (G, M, HD)
    assert attention.shape == (G, M, K * N)
    torch.testing.assert_close(attention.sum(-1), torch.ones(G, M))
    assert head.classify(prototypes).shape == (G, HC)
    assert head.num_queries == M
    _, no_attention = head(tokens)
    assert no_attention is None


def test_head_gradients_reach_queries_and_tokens(head):
    tokens = _tokens(G, K, N, HD).requires_grad_()
    prototypes, _ = head(tokens)
    head.classify(prototypes).sum().backward()
    assert head.queries.grad is not None and head.queries.grad.abs().sum() > 0
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_prototypes_invariant_to_image_order(head):
    tokens = _tokens(G, K, N, HD)
    reference, _ = head(tokens)
    for seed in range(3):
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
        permuted, _ = head(tokens[:, perm])
        torch.testing.assert_close(permuted, reference, atol=1e-5, rtol=0)


def test_prototypes_depend_on_the_images(head):
    # the invariance above must not come from ignoring the tokens
    tokens = _tokens(G, K, N, HD)
    a, _ = head(tokens)
    b, _ = head(tokens + _tokens(G, K, N, HD, seed=7))
    assert (a - b).abs().max() > 1e-3


def test_padding_with_garbage_images_equals_unpadded_group(head):
    real = _tokens(1, 3, N, HD)
    unpadded, att_unpadded = head(real, need_weights=True)
    garbage = 100 * _tokens(1, 2, N, HD, seed=5)
    padded_tokens = torch.cat([real[:, :1], garbage[:, :1], real[:, 1:], garbage[:, 1:]], dim=1)  # pads interleaved
    mask = torch.tensor([[True, False, True, True, False]])
    padded, att_padded = head(padded_tokens, mask, need_weights=True)
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=0)
    att = att_padded.reshape(1, M, 5, N)
    assert att[:, :, ~mask[0]].abs().max() == 0  # nothing attends to padding
    torch.testing.assert_close(att[:, :, mask[0]].reshape(1, M, 3 * N), att_unpadded, atol=1e-6, rtol=0)


def test_group_prototypes_unequal_groups(head):
    tokens = _tokens(9, N, HD)
    groups = [
        Group(class_id=2, indices=torch.tensor([0, 5])),
        Group(class_id=0, indices=torch.tensor([1, 2, 3, 8])),
        Group(class_id=4, indices=torch.tensor([7, 4, 6])),
    ]
    prototypes, labels, attention = group_prototypes(head, tokens, groups, need_weights=True)
    assert prototypes.shape == (3, M, HD)
    assert labels.tolist() == [2, 0, 4] and labels.dtype == torch.long
    assert attention.shape == (3, M, 4 * N)
    for row, group in enumerate(groups):
        alone, _ = head(tokens[group.indices][None])
        torch.testing.assert_close(prototypes[row], alone[0], atol=1e-5, rtol=0)
    # padded key slots of the 2-image group get no attention
    assert attention[0, :, 2 * N :].abs().max() == 0


def test_group_prototypes_no_groups(head):
    prototypes, labels, attention = group_prototypes(head, _tokens(4, N, HD), [])
    assert prototypes.shape == (0, M, HD) and labels.shape == (0,) and attention is None


# --------------------------------------------------------------------------- load_weights


class Tiny(nn.Module):
    """A stand-in with the same top-level layout as PaGKDNet (backbone / classifier / embed)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.classifier = nn.Linear(4, classes)
        self.embed = nn.Conv2d(4, 2, 1)


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
            else:
                tensor.fill_(int(torch.randint(1, 100, (), generator=gen)))
    return module


def _assert_same_state(a: nn.Module, b: nn.Module, prefix: str = "") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix)]
    assert keys
    for k in keys:
        assert torch.equal(sa[k], sb[k]), k


def _save(state: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("filename", ["w.safetensors", "w.pt", "w.pth"])
def test_load_weights_round_trip(tmp_path, filename):
    source = _randomised(Tiny(), 1)
    target = _randomised(Tiny(), 2)
    path = tmp_path / filename
    _save(source.state_dict(), path)
    load_weights(target, path, strict=True)
    _assert_same_state(source, target)


def test_load_weights_torch_checkpoint_with_state_dict_key(tmp_path):
    source, target = _randomised(Tiny(), 1), _randomised(Tiny(), 2)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    load_weights(target, str(tmp_path / "ckpt.pt"))
    _assert_same_state(source, target)


@pytest.mark.parametrize("filename", ["b.safetensors", "b.pt"])
def test_backbone_only_file_loads_into_backbone(tmp_path, filename):
    source, target = _randomised(Tiny(), 1), _randomised(Tiny(), 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    _save(source.backbone.state_dict(), tmp_path / filename)  # keys '0.weight', not 'backbone.0.weight'
    load_weights(target, tmp_path / filename)
    _assert_same_state(source, target, prefix="backbone.")
    for k, v in target.state_dict().items():
        if not k.startswith("backbone."):
            assert torch.equal(v, before[k]), k  # head left at its init


def test_mismatched_shapes_are_skipped_and_strict_refuses(tmp_path):
    source, target = _randomised(Tiny(classes=3), 1), _randomised(Tiny(classes=7), 2)
    before = target.classifier.weight.clone()
    _save(source.state_dict(), tmp_path / "w.safetensors")
    load_weights(target, tmp_path / "w.safetensors")
    _assert_same_state(source, target, prefix="backbone.")
    _assert_same_state(source, target, prefix="embed.")
    assert torch.equal(target.classifier.weight, before)
    with pytest.raises(ValueError, match="classifier"):
        load_weights(target, tmp_path / "w.safetensors", strict=True)


def test_timm_plain_weights_load_into_pagkdnet_backbone(tmp_path):
    """The real use: a timm resnet18 state dict (keys without 'backbone.', plus an fc head)."""
    torch.manual_seed(3)
    plain = timm.create_model("resnet18", pretrained=False, num_classes=10)
    _save(plain.state_dict(), tmp_path / "resnet18.safetensors")
    torch.manual_seed(4)
    net = PaGKDNet("resnet18", C, D)
    classifier_before = net.classifier.weight.clone()
    load_weights(net, tmp_path / "resnet18.safetensors")
    own = net.state_dict()
    for k, v in plain.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own[f"backbone.{k}"], v), k
    assert torch.equal(net.classifier.weight, classifier_before)


def test_build_teacher_loads_its_weights_file(tmp_path):
    torch.manual_seed(5)
    source = PaGKDNet("resnet18", C, D, detach_embed=True)
    _save(source.state_dict(), tmp_path / "teacher.safetensors")
    cfg = ModelConfig(teacher="resnet18", embed_dim=D, teacher_weights=str(tmp_path / "teacher.safetensors"))
    torch.manual_seed(6)
    teacher = build_teacher(cfg, C)
    _assert_same_state(source, teacher)


def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        load_weights(Tiny(), path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("filename", ["other.safetensors", "other.pt"])
def test_file_with_no_matching_tensor_raises_value_error(tmp_path, filename):
    path = tmp_path / filename
    _save({"something.else": torch.zeros(3), "backbone.0.weight": torch.zeros(9, 9)}, path)
    target = _randomised(Tiny(), 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights(target, path)
    assert str(path) in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


# --------------------------------------------------------------------------- devices


def test_pick_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device().type == expected
    assert pick_device("cpu") == torch.device("cpu")


def test_pick_device_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError) as info:
            pick_device(name)
        assert f"'{name}'" in str(info.value) and "no CUDA" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine has no CUDA")
def test_pick_device_cuda_on_this_cpu_machine():
    assert pick_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pick_device("cuda")
