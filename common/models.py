"""Networks of PaGKD: a timm backbone with a classifier and a token embedding, and the shared
lesion-aware query head (LR-QFormer) that turns a group of images into a prototype set; and
:func:`group_view`, the one "forward -> token labels -> groups -> prototypes" of a batch that
student steps and live-teacher banks share (an NBI site uses :func:`labelled_forward` and groups
its whole training set). Initial weights: timm's pretrained ones or a local file. Devices are
:mod:`common.device`'s, the student checkpoint :mod:`common.checkpoint`'s.

Shapes used throughout: B images, C classes, Cf backbone channels, h x w last feature map,
N = h * w tokens per image, D token width (``embed_dim``), M queries, G groups, K images per group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (torchvision shim before timm)
import common.backbones  # noqa: F401  (registers the small CPU backbones in timm)
import timm
import torch
from torch import nn

from common.config import ModelConfig, PaGKDConfig
from common.grouping import Group, make_groups
from common.losses import cam_token_labels

log = logging.getLogger(__name__)


@dataclass
class NetOutput:
    logits: torch.Tensor  # [B, C]
    feature_map: torch.Tensor  # [B, Cf, h, w] last backbone stage
    tokens: torch.Tensor  # [B, N, D] embedded tokens of the last stage


class PaGKDNet(nn.Module):
    """A timm backbone, GAP + linear classifier on the last stage, and a 1x1 token embedding.

    Teacher and student are both this network, possibly with different backbones. The
    teacher's embedding reads *detached* features (``detach_embed=True``): distillation
    trains it without touching the frozen teacher.
    """

    def __init__(self, backbone: str, num_classes: int, embed_dim: int, detach_embed: bool = False, output_stride: int = 32):
        super().__init__()
        # output_stride 16/8 dilates the last stage: more tokens per image at the same resolution.
        extra = {} if output_stride == 32 else {"output_stride": output_stride}
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(-1,), **extra)
        except RuntimeError as err:  # timm's "Unknown model" is a RuntimeError
            raise ValueError(f"model '{backbone}' is not a timm model name ({err}); see timm.list_models()") from err
        channels = self.backbone.feature_info.channels()[-1]
        self.backbone_name = backbone
        self.classifier = nn.Linear(channels, num_classes)
        self.embed = nn.Conv2d(channels, embed_dim, kernel_size=1)
        self.detach_embed = detach_embed

    @property
    def num_features(self) -> int:
        return self.classifier.in_features

    def forward(self, images: torch.Tensor) -> NetOutput:
        """images [B, 3, H, W] -> logits [B, C], feature_map [B, Cf, h, w], tokens [B, h*w, D]."""
        feature_map = self.backbone(images)[-1]
        logits = self.classifier(feature_map.mean(dim=(2, 3)))
        embed_input = feature_map.detach() if self.detach_embed else feature_map
        tokens = self.embed(embed_input).flatten(2).transpose(1, 2)
        return NetOutput(logits=logits, feature_map=feature_map, tokens=tokens)


class LesionQueryHead(nn.Module):
    """Shared lesion-aware queries: M learnable queries attend over all tokens of a group.

    Each image's tokens get an identity encoding computed from that image's own mean token, so
    attention can tell which tokens belong together while the prototypes stay invariant to the
    order of images in the group (a positional per-slot embedding would not be). One attention
    is shared by both modalities; its output for a group is a prototype set [M, D]. A linear
    group classifier reads the mean of the M prototypes (the paper's group classification).
    """

    def __init__(self, embed_dim: int, num_queries: int, num_heads: int, num_classes: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, embed_dim) * embed_dim**-0.5)
        self.identity = nn.Linear(embed_dim, embed_dim)
        self.norm_kv = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.group_classifier = nn.Linear(embed_dim, num_classes)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(
        self, tokens: torch.Tensor, image_mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [G, K, N, D], image_mask [G, K] (True = real image, False = padding)
        -> prototypes [G, M, D], attention [G, M, K*N] (only with ``need_weights``)."""
        groups, images, per_image, dim = tokens.shape
        if image_mask is None:
            image_mask = torch.ones(groups, images, dtype=torch.bool, device=tokens.device)
        identity = self.identity(tokens.mean(dim=2, keepdim=True))  # [G, K, 1, D]
        keys = self.norm_kv(tokens + identity).reshape(groups, images * per_image, dim)
        padding = (~image_mask).repeat_interleave(per_image, dim=1)  # [G, K*N]
        queries = self.queries.unsqueeze(0).expand(groups, -1, -1)
        prototypes, attention = self.attn(
            queries, keys, keys, key_padding_mask=padding, need_weights=need_weights, average_attn_weights=True
        )
        return prototypes, attention

    def classify(self, prototypes: torch.Tensor) -> torch.Tensor:
        """prototypes [G, M, D] -> group logits [G, C] from the mean query."""
        return self.group_classifier(prototypes.mean(dim=1))


def group_prototypes(
    head: LesionQueryHead, tokens: torch.Tensor, groups: list[Group], need_weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the query head over each group of a batch.

    tokens [B, N, D]; groups index into B -> prototypes [G, M, D], group class labels [G] (long),
    attention [G, M, Kmax*N] or None. Groups of unequal size are padded and masked.
    """
    if not groups:
        empty = tokens.new_zeros(0, head.num_queries, tokens.shape[-1])
        return empty, torch.zeros(0, dtype=torch.long, device=tokens.device), None
    largest = max(len(g.indices) for g in groups)
    index = torch.zeros(len(groups), largest, dtype=torch.long, device=tokens.device)
    mask = torch.zeros(len(groups), largest, dtype=torch.bool, device=tokens.device)
    for row, group in enumerate(groups):
        index[row, : len(group.indices)] = group.indices.to(tokens.device)
        mask[row, : len(group.indices)] = True
    prototypes, attention = head(tokens[index], mask, need_weights=need_weights)
    labels = torch.tensor([g.class_id for g in groups], dtype=torch.long, device=tokens.device)
    return prototypes, labels, attention


@dataclass
class GroupView:
    """A batch as PaGKD sees it: the network's outputs, each token's label from the network's
    own activation maps (foreground / background / uncertain), and the batch's same-class
    groups run through the query head."""

    out: NetOutput
    token_labels: torch.Tensor  # long [B, N]
    prototypes: torch.Tensor  # [G, M, D]
    group_labels: torch.Tensor  # long [G]


def labelled_forward(
    net: PaGKDNet, images: torch.Tensor, labels: torch.Tensor, pagkd: PaGKDConfig
) -> tuple[NetOutput, torch.Tensor]:
    """forward -> token labels: images [B, 3, H, W], labels [B] -> (outputs, token labels [B, N])."""
    out = net(images)
    token_labels = cam_token_labels(out.feature_map, net.classifier.weight, labels, pagkd.fg_threshold, pagkd.bg_threshold)
    return out, token_labels


def group_view(
    net: PaGKDNet,
    head: LesionQueryHead,
    images: torch.Tensor,
    labels: torch.Tensor,
    pagkd: PaGKDConfig,
    generator: torch.Generator,
    grouped: bool = True,
) -> GroupView:
    """forward -> token labels -> groups -> prototypes for one batch: the step every student
    step and every live-teacher bank shares. Groups follow ``pagkd.grouping``
    (:func:`common.grouping.make_groups`, drawn from ``generator``); ``grouped=False`` forms
    none (prototypes [0, M, D]). An NBI site groups its whole training set instead of a batch
    (``client/knowledge.py``): it uses :func:`labelled_forward` per batch, then the same grouping."""
    out, token_labels = labelled_forward(net, images, labels, pagkd)
    groups = make_groups(labels, out.tokens, pagkd, generator) if grouped else []
    prototypes, group_labels, _ = group_prototypes(head, out.tokens, groups)
    return GroupView(out, token_labels, prototypes, group_labels)


def build_teacher(cfg: ModelConfig, num_classes: int, initial: bool = True) -> PaGKDNet:
    """The NBI teacher; with ``initial``, its starting weights (:func:`init_weights`). Sites
    pass ``initial=False``: they receive the weights from the server at once."""
    net = PaGKDNet(cfg.teacher, num_classes, cfg.embed_dim, detach_embed=True, output_stride=cfg.output_stride)
    if initial:
        init_weights(net, cfg.teacher, cfg.teacher_weights, cfg.pretrained)
    return net


def build_student(cfg: ModelConfig, num_classes: int, initial: bool = True) -> PaGKDNet:
    """The WLI student; ``initial`` as :func:`build_teacher`."""
    net = PaGKDNet(cfg.student, num_classes, cfg.embed_dim, output_stride=cfg.output_stride)
    if initial:
        init_weights(net, cfg.student, cfg.student_weights, cfg.pretrained)
    return net


def build_query_head(cfg: ModelConfig, num_classes: int) -> LesionQueryHead:
    return LesionQueryHead(cfg.embed_dim, cfg.num_queries, cfg.num_heads, num_classes)


def load_weights(module: nn.Module, path: str | Path, strict: bool = False) -> None:
    """Load local weights (``.safetensors``, or a torch state dict read with ``weights_only``).

    Only the tensors whose names and shapes match are loaded (e.g. ImageNet backbone weights
    into a network with a new classifier); what was skipped is logged. Never touches a hub.
    A missing file or a file that matches nothing is an error naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist; give a local .safetensors or .pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    load_matching(module, state, f"weights file '{path}'", strict)


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = False) -> int:
    """Copy the tensors of ``state`` whose names and shapes match ``module`` (timm's plain
    backbone keys also match under ``backbone.``) -> how many; ``source`` names the origin in
    errors and the log line. Nothing matching is an error."""
    own = module.state_dict()
    matched = {}
    for name, tensor in state.items():
        for candidate in (name, f"backbone.{name}"):
            if candidate in own and own[candidate].shape == tensor.shape:
                matched[candidate] = tensor
                break
    if not matched:
        raise ValueError(f"{source} has no tensor matching this model's names and shapes (another backbone?)")
    skipped = sorted(set(own) - set(matched))
    if strict and skipped:
        raise ValueError(f"{source} lacks {len(skipped)} tensors, e.g. {skipped[:3]}")
    module.load_state_dict(matched, strict=False)
    log.info("loaded %d/%d tensors from %s (%d left at init)", len(matched), len(own), source, len(skipped))
    return len(matched)


class PretrainedWeightsError(RuntimeError):
    """timm's pretrained weights could not be had here; the message says how to get them offline."""


def pretrained_backbone_state(backbone: str, file: str | Path | None = None) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of ``backbone`` without its classifier (the state dict of
    ``timm.create_model(backbone, pretrained=True, num_classes=0)``): from timm's / Hugging
    Face's local cache, else the hub where the machine is online; from ``file`` instead when
    given (any weights file timm reads, e.g. one written by :func:`save_backbone_weights`)."""
    overlay = {"file": str(file)} if file else None
    try:
        model = timm.create_model(backbone, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model '{backbone}' is not a timm model name ({err}); see timm.list_models()") from err
        raise PretrainedWeightsError(_offline_fix(backbone, err)) from err
    except Exception as err:  # noqa: BLE001 - offline hub, missing cache, no pretrained tag: all say the same fix
        raise PretrainedWeightsError(_offline_fix(backbone, err)) from err
    return model.state_dict()


def _offline_fix(backbone: str, err: Exception) -> str:
    return (
        f"cannot load timm's pretrained weights for '{backbone}' ({type(err).__name__}: {err}). On a machine with "
        f"internet run `fedpagkd fetch-weights {backbone} --out {backbone}.safetensors`, copy the file here and set "
        "model.teacher_weights / model.student_weights to its path; or set model.pretrained=false to start from scratch"
    )


def load_pretrained(module: nn.Module, backbone: str) -> int:
    """Load timm's pretrained ``backbone`` weights into ``module`` (a :class:`PaGKDNet` or a
    bare timm model) -> tensors loaded; :class:`PretrainedWeightsError` with the offline fix."""
    return load_matching(module, pretrained_backbone_state(backbone), f"timm's pretrained '{backbone}'")


def init_weights(net: nn.Module, backbone: str, weights_file: str = "", pretrained: bool = False) -> None:
    """A network's starting weights: a local ``weights_file`` (offline) when set, else timm's
    pretrained weights when ``pretrained``, else timm's random initialisation."""
    if weights_file:
        load_weights(net, weights_file)
    elif pretrained:
        load_pretrained(net, backbone)


def save_backbone_weights(backbone: str, out: str | Path) -> Path:
    """Fetch timm's pretrained ``backbone`` (cache or hub) into a new ``.safetensors`` file to
    copy to an offline machine (``model.teacher_weights=...``). An existing ``out`` is refused."""
    from safetensors.torch import save_file

    from common.files import atomic_write

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: give a file name ending in .safetensors")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out or delete it first")
    state = {k: v.contiguous() for k, v in pretrained_backbone_state(backbone).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(state, tmp, metadata={"backbone": backbone, "source": "timm pretrained"}))
    return out
