"""Model registry: ``create_model(name, stem=..., num_classes=..., **overrides)``.

Layouts (PAPER.md, Table 2 and Section 4):

ImageNet stem (224 input), stage widths 256/512/1024/2048, masks pool 3/2/1 times so the smallest
mask map is 7x7. Modules per stage: Attention-56 (1, 1, 1) and Attention-92 (1, 2, 3) as in the
official prototxts; other depths split their modules evenly, (k, k, k).

CIFAR stem (32 input): conv 3x3, 16 -> stages of widths 64/128/256 at 32/16/8 (like
pre-activation ResNet-164) -> a last stage of three 256-wide units at 8x8. Masks pool 2/1/1 times:
stages 1 and 2 bottom out at 8x8, the resolution of the last stage (as 7x7 is on ImageNet); stage 3,
already at 8x8, pools once to 4x4. Modules per stage (k, k, k). Parameter counts against the paper:
Attention-92 1.83M (paper 1.9M, -3.9%), Attention-236 4.80M (5.1M, -5.9%), Attention-452 9.36M
(8.6M, +8.9%). Of the layouts tried (last stage 256/512/1024 wide, 1-3 poolings per stage), this one
keeps all three within 10%.

Depth counts trunk layers: 20 + 3 * (2p + t) * (number of modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ran.models.network import STEMS, ResidualAttentionNet, StageSpec
from ran.models.units import get_unit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelDefaults:
    """What travels with a model besides its weights (timm's default_cfg, reduced)."""

    depth: int | None
    stem: str
    description: str
    p: int = 1
    t: int = 2
    r: int = 1
    unit: str = "bottleneck"
    eval_crop: dict[str, int] = field(default_factory=lambda: {"imagenet": 224, "cifar": 32})


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ModelDefaults]] = {}


def _register(name: str, defaults: ModelDefaults):
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise KeyError(f"model {name!r} registered twice")
        _REGISTRY[name] = (builder, defaults)
        return builder

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def model_defaults(name: str) -> ModelDefaults:
    _check_name(name)
    return _REGISTRY[name][1]


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")


def valid_depths(p: int, t: int, limit: int = 500) -> list[int]:
    """Depths reachable with modules split evenly over three stages."""
    per_module = 3 * (2 * p + t)
    return [20 + per_module * 3 * k for k in range(1, limit) if 20 + per_module * 3 * k <= limit]


def modules_per_stage(depth: int, p: int, t: int, stem: str) -> tuple[int, int, int]:
    """Attention modules in stages 1-3 for a depth; ValueError listing valid depths otherwise."""
    per_module = 3 * (2 * p + t)
    total, rest = divmod(depth - 20, per_module)
    if depth <= 20 or rest or total % 3:
        raise ValueError(
            f"impossible depth {depth} for p={p}, t={t}: depth must be 20 + {per_module} x "
            f"(modules, a multiple of 3); valid depths: {', '.join(map(str, valid_depths(p, t)))}"
        )
    if stem == "imagenet" and total == 6 and (p, t) == (1, 2):
        return (1, 2, 3)  # Attention-92 of the official release
    return (total // 3,) * 3


def _attention_stages(mods: tuple[int, int, int], stem: str) -> tuple[list[StageSpec], int]:
    if stem == "imagenet":
        return [
            StageSpec(256, 1, 1, mods[0], pools=3),
            StageSpec(512, 2, 1, mods[1], pools=2),
            StageSpec(1024, 2, 1, mods[2], pools=1),
            StageSpec(2048, 2, 3),
        ], 64
    return [
        StageSpec(64, 1, 1, mods[0], pools=2),
        StageSpec(128, 2, 1, mods[1], pools=1),
        StageSpec(256, 2, 1, mods[2], pools=1),
        StageSpec(256, 1, 3),
    ], 16


def _build_attention(
    defaults: ModelDefaults,
    stem: str,
    num_classes: int,
    depth: int | None = None,
    p: int | None = None,
    t: int | None = None,
    r: int | None = None,
    unit: str | None = None,
    mask_activation: str = "mixed",
    combination: str = "arl",
    mask_structure: str = "encoder_decoder",
    in_channels: int = 3,
) -> nn.Module:
    p = defaults.p if p is None else p
    t = defaults.t if t is None else t
    r = defaults.r if r is None else r
    depth = defaults.depth if depth is None else depth
    assert depth is not None
    mods = modules_per_stage(depth, p, t, stem)
    stages, stem_width = _attention_stages(mods, stem)
    return ResidualAttentionNet(
        stages, get_unit(unit or defaults.unit), stem, stem_width, num_classes, in_channels,
        p, t, r, mask_activation, combination, mask_structure,
    )


def _attention_builder(defaults: ModelDefaults) -> Callable[..., nn.Module]:
    def build(stem: str, num_classes: int, **overrides: Any) -> nn.Module:
        return _build_attention(defaults, stem, num_classes, **overrides)

    return build


for _depth in (56, 92, 128, 164, 236):
    _defaults = ModelDefaults(
        _depth, "imagenet", f"Attention-{_depth}, pre-activation bottleneck units",
        # The paper evaluates Attention-92 at a 320 crop (Table 7).
        eval_crop={"imagenet": 320 if _depth == 92 else 224, "cifar": 32},
    )
    _register(f"attention{_depth}", _defaults)(_attention_builder(_defaults))

for _name, _defaults in {
    "attention452": ModelDefaults(452, "cifar", "Attention-452 (p=2, t=4, r=3)", p=2, t=4, r=3),
    "attentionnext56": ModelDefaults(56, "imagenet", "AttentionNeXt-56, ResNeXt units", unit="resnext"),
    "attentioninception56": ModelDefaults(
        56, "imagenet", "AttentionInception-56, Inception-ResNet-A units", unit="inception",
        eval_crop={"imagenet": 299, "cifar": 32},
    ),
}.items():
    _register(_name, _defaults)(_attention_builder(_defaults))


def _no_attention_overrides(name: str, overrides: dict[str, Any]) -> None:
    if overrides:
        raise ValueError(
            f"{name} has no attention modules; it takes no {', '.join(sorted(overrides))} "
            "(valid options: stem, num_classes, in_channels)"
        )


@_register(
    "preact_resnet164",
    ModelDefaults(164, "cifar", "Pre-activation ResNet-164 (He et al. 2016), CIFAR baseline"),
)
def _preact_resnet164(stem: str, num_classes: int, in_channels: int = 3, **overrides: Any):
    _no_attention_overrides("preact_resnet164", overrides)
    stages = [StageSpec(64, 1, 18), StageSpec(128, 2, 18), StageSpec(256, 2, 18)]
    width = 64 if stem == "imagenet" else 16
    return ResidualAttentionNet(
        stages, get_unit("bottleneck"), stem, width, num_classes, in_channels  # type: ignore[arg-type]
    )


class _TorchvisionResNet(nn.Module):
    """torchvision's ResNet-152 with our input check and a CIFAR stem option."""

    def __init__(self, stem: str, num_classes: int, in_channels: int) -> None:
        super().__init__()
        from torchvision.models import resnet152

        self.in_channels = in_channels
        self.net = resnet152(weights=None, num_classes=num_classes)
        if stem == "cifar" or in_channels != 3:
            k, s, pad = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
            self.net.conv1 = nn.Conv2d(in_channels, 64, k, stride=s, padding=pad, bias=False)
            nn.init.kaiming_normal_(self.net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if stem == "cifar":
            self.net.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor, return_masks: bool = False):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        logits = self.net(x)
        return (logits, []) if return_masks else logits


@_register("resnet152", ModelDefaults(152, "imagenet", "ResNet-152 (torchvision), ImageNet baseline"))
def _resnet152(stem: str, num_classes: int, in_channels: int = 3, **overrides: Any):
    _no_attention_overrides("resnet152", overrides)
    return _TorchvisionResNet(stem, num_classes, in_channels)


def create_model(
    name: str, stem: str | None = None, num_classes: int | None = None, **overrides: Any
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        stem: ``imagenet`` (224 input) or ``cifar`` (32 input); default: the model's own.
        num_classes: classifier outputs; default 1000 (ImageNet stem) or 10 (CIFAR stem).
        overrides: ``depth``, ``p``, ``t``, ``r``, ``unit`` (bottleneck|resnext|inception),
            ``mask_activation`` (mixed|channel|spatial), ``combination`` (arl|nal),
            ``mask_structure`` (encoder_decoder|local), ``in_channels``. ``None`` values are ignored.

    Raises:
        ValueError: unknown name, stem, option value or impossible depth, naming the valid choices.
    """
    _check_name(name)
    builder, defaults = _REGISTRY[name]
    stem = stem or defaults.stem
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
    if num_classes is None:
        num_classes = 1000 if stem == "imagenet" else 10
    overrides = {k: v for k, v in overrides.items() if v is not None}
    valid = {"depth", "p", "t", "r", "unit", "mask_activation", "combination",
             "mask_structure", "in_channels"}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for {name}; "
            f"valid options: {', '.join(sorted(valid))}"
        )
    return builder(stem=stem, num_classes=num_classes, **overrides)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass at batch 1, measured by running the model."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, input_size, input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class ModelInfo:
    name: str
    stem: str
    depth: int | None
    params: int
    macs: int
    input_size: int


def model_info(name: str, stem: str | None = None, **overrides: Any) -> ModelInfo:
    """Size of a model: parameters and MACs at its stem's input size (224 or 32)."""
    defaults = model_defaults(name)
    stem = stem or defaults.stem
    model = create_model(name, stem=stem, **overrides)
    size = 224 if stem == "imagenet" else 32
    depth = overrides.get("depth") or defaults.depth
    return ModelInfo(name, stem, depth, count_params(model), count_macs(model, size), size)
