"""ResidualAttentionNet: stem, stages of residual units and attention modules, head.

A network is a list of :class:`StageSpec`. Each stage opens with ``units`` residual units (the
first may stride and widen), followed by ``modules`` attention modules whose encoder-decoder
masks pool ``pools`` times. Table 2 of the paper, written this way (ImageNet, Attention-56)::

    stem: conv 7x7/2, 64 -> max-pool 3x3/2             112 -> 56
    StageSpec(256,  stride=1, units=1, modules=1, pools=3)   56x56, mask down to 7x7
    StageSpec(512,  stride=2, units=1, modules=1, pools=2)   28x28
    StageSpec(1024, stride=2, units=1, modules=1, pools=1)   14x14
    StageSpec(2048, stride=2, units=3, modules=0)            7x7
    head: BN-ReLU -> global average pool -> FC
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ran.models.attention import AttentionModule
from ran.models.units import _PreActUnit

Stem = Literal["imagenet", "cifar"]
STEMS = ("imagenet", "cifar")


class _GlobalAvgPool(torch.autograd.Function):
    """Mean over H and W whose gradient keeps the input's memory format. Autograd's own gradient
    of a mean is an expanded view that the next element-wise op writes out in NCHW, so the head's
    BatchNorm backward received an NCHW gradient for a channels_last input (found by
    ran.train.step.layout_walk)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.shape = x.shape
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        n, c, h, w = ctx.shape
        full = (grad / (h * w)).view(n, c, 1, 1).expand(n, c, h, w)
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return full.contiguous(memory_format=fmt)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, C)``, the mean over H and W; when training, its gradient keeps the
    input's memory format (:class:`_GlobalAvgPool`); otherwise a plain mean (what export traces)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GlobalAvgPool.apply(x)
    return x.mean(dim=(2, 3))


@dataclass(frozen=True)
class StageSpec:
    channels: int  # output channels of every unit in the stage
    stride: int  # stride of the stage's first unit
    units: int  # plain residual units opening the stage
    modules: int = 0  # attention modules after them
    pools: int = 1  # max-poolings in each module's encoder-decoder mask


def make_stem(stem: Stem, in_channels: int, width: int) -> nn.Sequential:
    """ImageNet: conv 7x7/2 + max-pool 3x3/2 (224 -> 56). CIFAR: conv 3x3/1 (32 -> 32)."""
    if stem == "imagenet":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    if stem == "cifar":
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False))
    raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")


class ResidualAttentionNet(nn.Module):
    """Residual Attention Network; with no attention modules it is a pre-activation ResNet.

    ``forward(x, return_masks=True)`` returns ``(logits, masks)``: one soft mask per attention
    module, in network order, each of shape (N, C, H, W) like the trunk it gates.

    Every argument is a keyword: ``stages`` and ``unit`` (the residual unit class) are required;
    ``p``, ``t``, ``r`` and the mask options act only on stages with attention modules.
    """

    def __init__(
        self,
        *,
        stages: list[StageSpec],
        unit: type[_PreActUnit],
        stem: Stem = "imagenet",
        stem_width: int = 64,
        num_classes: int = 1000,
        in_channels: int = 3,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        mask_activation: str = "mixed",
        combination: str = "arl",
        mask_structure: str = "encoder_decoder",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_channels = in_channels
        self.stem = make_stem(stem, in_channels, stem_width)
        blocks: list[nn.Module] = []
        channels = stem_width
        for spec in stages:
            for i in range(spec.units):
                blocks.append(unit(channels, spec.channels, spec.stride if i == 0 else 1))
                channels = spec.channels
            for _ in range(spec.modules):
                blocks.append(
                    AttentionModule(
                        channels, p, t, r, spec.pools, unit,
                        mask_activation, combination, mask_structure,  # type: ignore[arg-type]
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.head_act = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation (fan_out, ReLU) for convs, as in the paper; BN to identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    @property
    def attention_modules(self) -> list[AttentionModule]:
        return [b for b in self.blocks if isinstance(b, AttentionModule)]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )

    def forward_features(
        self, x: torch.Tensor, return_masks: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._check_input(x)
        x = self.stem(x)
        masks: list[torch.Tensor] = []
        for block in self.blocks:
            if return_masks and isinstance(block, AttentionModule):
                x, mask = block.forward_with_mask(x)
                masks.append(mask)
            else:
                x = block(x)
        return self.head_act(x), masks

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(global_avg_pool(x))

    def forward(self, x: torch.Tensor, return_masks: bool = False):
        features, masks = self.forward_features(x, return_masks)
        logits = self.forward_head(features)
        return (logits, masks) if return_masks else logits
