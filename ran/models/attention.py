"""The Attention Module of Wang et al. (CVPR 2017), Section 3.

    x -> p units -> +-> trunk: t units ------------------------+-> combine -> p units -> out
                    +-> soft mask: hourglass (or local) -> M --+

``combination="arl"``: H = (1 + M) * T (attention residual learning, the paper's default);
``combination="nal"``: H = M * T (naive attention learning).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ran.models.units import PreActBottleneck, _PreActUnit

MaskActivation = Literal["mixed", "channel", "spatial"]
Combination = Literal["arl", "nal"]
MaskStructure = Literal["encoder_decoder", "local"]

MASK_ACTIVATIONS = ("mixed", "channel", "spatial")
COMBINATIONS = ("arl", "nal")
MASK_STRUCTURES = ("encoder_decoder", "local")


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")


class MaskActivationFn(nn.Module):
    """f1/f2/f3 of Section 3.3 over x of shape (N, C, H, W).

    mixed:   sigmoid(x_ic)
    channel: x_ic / ||x_i||, the L2 norm over channels at each position i
    spatial: sigmoid((x_ic - mean_c) / std_c), mean and std over the spatial map of channel c
    """

    def __init__(self, kind: MaskActivation = "mixed", eps: float = 1e-5) -> None:
        super().__init__()
        _check_choice("mask_activation", kind, MASK_ACTIVATIONS)
        self.kind, self.eps = kind, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mixed":
            return torch.sigmoid(x)
        if self.kind == "channel":
            # Normalise in fp32: bf16's 8-bit mantissa would leave norms visibly off 1.
            x32 = x.float()
            return (x32 / x32.norm(dim=1, keepdim=True).clamp_min(self.eps)).to(x.dtype)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.float().var(dim=(2, 3), keepdim=True, unbiased=False).add(self.eps).sqrt()
        return torch.sigmoid((x - mean) / std.to(x.dtype))

    def extra_repr(self) -> str:
        return self.kind


def _units(unit: type[_PreActUnit], channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(unit(channels, channels) for _ in range(n)))


class HourglassMask(nn.Module):
    """Bottom-up top-down soft mask trunk (Section 3.3, Fig. 2 of the paper).

    Down: ``num_pools`` times max-pool(3, 2) followed by ``r`` units (``2r`` at the bottom).
    Up: bilinear up-sampling one level at a time; at every level but the top, the skip connection
    (one unit applied to the down-path map of that level) is added and ``r`` units follow. The top
    up-sampling adds nothing: Caffe's two-input Interp only borrows its output size.
    """

    def __init__(self, channels: int, r: int, num_pools: int, unit: type[_PreActUnit]) -> None:
        super().__init__()
        if num_pools < 1:
            raise ValueError(f"an encoder-decoder mask needs num_pools >= 1, got {num_pools}")
        self.num_pools = num_pools
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        last = num_pools - 1
        self.down = nn.ModuleList(
            _units(unit, channels, 2 * r if i == last else r) for i in range(num_pools)
        )
        self.skips = nn.ModuleList(unit(channels, channels) for _ in range(last))
        self.up = nn.ModuleList(_units(unit, channels, r) for _ in range(last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes, skips = [], []
        for i, down in enumerate(self.down):
            sizes.append(x.shape[-2:])
            x = down(self.pool(x))
            if i < len(self.skips):
                skips.append(self.skips[i](x))
        # Deepest skip first; ``up[j]`` refines the level that ``skips[j]`` came from.
        for j in reversed(range(len(self.skips))):
            x = _upsample(x, skips[j].shape[-2:]) + skips[j]
            x = self.up[j](x)
        return _upsample(x, sizes[0])


def _upsample(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    # align_corners=True matches Caffe's Interp layer used by the official release.
    # Autocast off: CUDA's autocast runs upsample_bilinear2d in fp32, and the fp32 map then made
    # the skip add, the up-path units' residual adds and the mask's first BatchNorm fp32 too (6
    # of Attention-56's BN layers took cuDNN's fp32 kernels, with casts around them, in the H200
    # profile). The kernel accumulates in fp32 either way; the CPU's autocast already keeps bf16.
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        with torch.autocast("cuda", enabled=False):
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class AttentionModule(nn.Module):
    """One attention module (trunk + soft mask) at a fixed channel count and resolution.

    Args:
        channels: input = output channels.
        p, t, r: the paper's hyper-parameters (units before/after, trunk units, mask units per level).
        num_pools: max-poolings in the encoder-decoder mask (3 at 56x56 on ImageNet, ...).
        unit: residual unit class (bottleneck, ResNeXt, Inception).
        mask_activation: ``mixed | channel | spatial``.
        combination: ``arl`` ((1 + M) * T) or ``nal`` (M * T).
        mask_structure: ``encoder_decoder`` (hourglass) or ``local`` (three units, no pooling).
    """

    def __init__(
        self,
        channels: int,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        num_pools: int = 1,
        unit: type[_PreActUnit] = PreActBottleneck,
        mask_activation: MaskActivation = "mixed",
        combination: Combination = "arl",
        mask_structure: MaskStructure = "encoder_decoder",
    ) -> None:
        super().__init__()
        _check_choice("combination", combination, COMBINATIONS)
        _check_choice("mask_structure", mask_structure, MASK_STRUCTURES)
        for name, value, low in (("p", p, 0), ("t", t, 1), ("r", r, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.combination = combination
        self.pre = _units(unit, channels, p)
        self.trunk = _units(unit, channels, t)
        if mask_structure == "encoder_decoder":
            mask_trunk: nn.Module = HourglassMask(channels, r, num_pools, unit)
        else:  # "local convolutions" of Table 4: same depth budget, no pooling
            mask_trunk = _units(unit, channels, 3)
        self.mask = nn.Sequential(
            mask_trunk,
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            MaskActivationFn(mask_activation),
        )
        self.post = _units(unit, channels, p)

    def combine(self, trunk: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ARL: (1 + M) * T; NAL: M * T."""
        if self.combination == "arl":
            return torch.addcmul(trunk, mask, trunk)  # T + M * T in one kernel
        return mask * trunk

    def forward_with_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the module output and its soft mask M (same shape as the trunk output)."""
        x = self.pre(x)
        trunk, mask = self.trunk(x), self.mask(x)
        return self.post(self.combine(trunk, mask)), mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_mask(x)[0]
