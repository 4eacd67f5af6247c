"""Residual units the attention networks are built from (all pre-activation, BN-ReLU-conv).

Every unit maps ``(N, in_channels, H, W) -> (N, out_channels, H/stride, W/stride)`` and has the
same constructor, so a network takes its unit type as a parameter (``unit=`` in ``create_model``).
A projection shortcut exists only where the shape changes, so no parameter goes unused.
"""

from __future__ import annotations

import torch
from torch import nn


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


class _PreActUnit(nn.Module):
    """Shared skeleton: BN-ReLU on the input feeds both the residual body and the projection.

    As in the official prototxts (and He et al.'s pre-activation ResNet), the projection shortcut
    reads the pre-activated input; the identity shortcut reads the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.bn_in = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv1x1(in_channels, out_channels, stride) if needs_projection else None

    def body(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn_in(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return self.body(pre) + shortcut


def _bn_relu_conv(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(conv.in_channels), nn.ReLU(inplace=True), conv)


class PreActBottleneck(_PreActUnit):
    """Pre-activation bottleneck (He et al. 2016): 1x1 reduce to out/4, 3x3, 1x1 expand.

    The stride sits on the 3x3 conv, as in the official Attention-56/92 prototxts.
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride)
        width = out_channels // self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.conv2 = _bn_relu_conv(conv3x3(width, width, stride))
        self.conv3 = _bn_relu_conv(conv1x1(width, out_channels))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class ResNeXtBottleneck(_PreActUnit):
    """Pre-activation ResNeXt bottleneck (Xie et al. 2017), cardinality 32.

    The grouped 3x3 is ``out/2`` wide (32 groups of ``out/64``), i.e. ResNeXt's 32x4d template at
    256 output channels, which is the unit of the official AttentionNeXt-56 prototxt.
    """

    cardinality = 32

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride)
        width = max(out_channels // 2, self.cardinality)
        self.conv1 = conv1x1(in_channels, width)
        self.conv2 = _bn_relu_conv(conv3x3(width, width, stride, groups=self.cardinality))
        self.conv3 = _bn_relu_conv(conv1x1(width, out_channels))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class InceptionResNetUnit(_PreActUnit):
    """Pre-activation Inception-ResNet-A unit (Szegedy et al. 2017, Inception-ResNet-v2, Fig. 16).

    We follow block A because it is the only Inception-ResNet block made purely of 1x1/3x3 convs,
    so it works at every stage resolution (7x7 down to 4x4 mask maps on CIFAR), and its three
    branches (1x1 | 1x1-3x3 | 1x1-3x3-3x3) give receptive fields 1, 3 and 5, the Inception idea.
    Branch widths keep block A's proportions (32 | 32 | 32-48-64 at 320 channels), scaled to
    b = 3*out/32 so that the unit costs about what the bottleneck costs (b | b | b-1.5b-2b); the concatenation is projected back to ``out`` by a linear 1x1 and added
    to the shortcut. Strides sit on the first conv of each branch.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride)
        b = max(out_channels * 3 // 32, 4)
        self.branch1 = conv1x1(in_channels, b, stride)
        self.branch3 = nn.Sequential(
            conv1x1(in_channels, b), *_bn_relu_conv(conv3x3(b, b, stride))
        )
        b2, b3 = b * 3 // 2, b * 2
        self.branch5 = nn.Sequential(
            conv1x1(in_channels, b),
            *_bn_relu_conv(conv3x3(b, b2, stride)),
            *_bn_relu_conv(conv3x3(b2, b3)),
        )
        self.project = _bn_relu_conv(conv1x1(b + b + b3, out_channels))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([self.branch1(x), self.branch3(x), self.branch5(x)], 1))


UNITS: dict[str, type[_PreActUnit]] = {
    "bottleneck": PreActBottleneck,
    "resnext": ResNeXtBottleneck,
    "inception": InceptionResNetUnit,
}


def get_unit(name: str) -> type[_PreActUnit]:
    """Look up a unit class by its config name (``model.unit``)."""
    if name not in UNITS:
        raise ValueError(f"unknown unit {name!r}; valid units: {', '.join(sorted(UNITS))}")
    return UNITS[name]
