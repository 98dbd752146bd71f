"""Small CPU backbones registered in timm's model registry.

An 11 M-parameter ResNet trained from scratch on a few hundred 64-px images learns little on a
2-core CPU, where a small CNN on the same images learns (docs/results.md, "Training recipe").
These backbones are the CPU default; because they are registered with
:func:`timm.models.register_model`, ``timm.create_model(name, features_only=True)`` builds them
like any timm model and every timm name keeps working in ``model.teacher`` / ``model.student``.

``pagkd_cnn_s``: stages of (3x3 conv, BN, ReLU) x 2 then a 2x2 max-pool. Every stage pool halves
the map: at 64 px the last stage is 8 x 8 = 64 tokens per image (stride 8), enough for GKD-Den's
foreground / background token labels, and the 3x3 convs at full resolution keep the fine pit
and vessel texture a stride-4 ResNet stem erases.
"""

from __future__ import annotations

import common  # noqa: F401  (torchvision shim before timm)
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


def _conv_bn_relu(in_chs: int, out_chs: int) -> list[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]


class ConvStage(nn.Sequential):
    """[B, in_chs, H, W] -> [B, out_chs, H/2, W/2]: two conv-BN-ReLU, then a 2x2 max-pool."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(*_conv_bn_relu(in_chs, out_chs), *_conv_bn_relu(out_chs, out_chs), nn.MaxPool2d(2))


class SmallConvNet(nn.Module):
    """A plain VGG-style CNN with timm's model interface (``forward_features``, ``forward_head``,
    ``feature_info``, ``reset_classifier``), so timm's ``features_only`` wrapper applies.

    images [B, 3, H, W] -> features [B, widths[-1], H / 2**len(widths), W / 2**len(widths)].
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        output_stride: int | None = None,
        **_: object,
    ):
        super().__init__()
        native = 2 ** len(widths)
        if output_stride is not None and output_stride not in (native, 32):
            # 32 is PaGKDNet's "no dilation" default; this net's own stride is fixed by its stages.
            raise ValueError(f"pagkd_cnn has output stride {native}; model.output_stride={output_stride} is not supported")
        self.num_classes, self.drop_rate = num_classes, drop_rate
        stages, chs = [], in_chans
        self.feature_info = []
        for index, width in enumerate(widths):
            stages.append(ConvStage(chs, width))
            chs = width
            self.feature_info.append({"num_chs": width, "reduction": 2 ** (index + 1), "module": f"stages.{index}"})
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = chs
        self.head = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        pooled = nn.functional.dropout(pooled, self.drop_rate, self.training)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _create(variant: str, pretrained: bool, **kwargs) -> SmallConvNet:
    return build_model_with_cfg(SmallConvNet, variant, pretrained, feature_cfg={"flatten_sequential": True}, **kwargs)


# timm reads a module's ``default_cfgs`` when registering its models (no hub weights: url "").
default_cfgs = generate_default_cfgs(
    {
        name: {"url": "", "num_classes": 1000, "input_size": (3, 64, 64), "pool_size": (8, 8), "classifier": "head"}
        for name in ("pagkd_cnn_s", "pagkd_cnn_m")
    }
)


@register_model
def pagkd_cnn_s(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """~290 k parameters, widths 32-64-128, stride 8 (8 x 8 tokens at 64 px)."""
    return _create("pagkd_cnn_s", pretrained, widths=(32, 64, 128), **kwargs)


@register_model
def pagkd_cnn_m(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """~1.2 M parameters, widths 48-96-192, stride 8."""
    return _create("pagkd_cnn_m", pretrained, widths=(48, 96, 192), **kwargs)
