"""Model registry: one small public function per variant, found by name by :func:`create_model`.

As torchvision's ``resnet50()``: each variant is a function (``attention92(**options)``) that
:func:`register_model` files under its own name together with what travels with it
(:class:`ModelDefaults`) and the options it takes (:func:`model_options`). An attention variant's
body states its stage layout: the attention modules in stages 1, 2 and 3 on each stem.

ImageNet stem (224 input), stage widths 256/512/1024/2048, masks pool 3/2/1 times so the smallest
mask map is 7x7. Attention-56 (1, 1, 1) and Attention-92 (1, 2, 3) are Table 2's and the official
prototxts'; the deeper variants split their modules evenly.

CIFAR stem (32 input): conv 3x3, 16 -> stages of widths 64/128/256 at 32/16/8 (like
pre-activation ResNet-164) -> a last stage of three 256-wide units at 8x8. Masks pool 2/1/1 times:
stages 1 and 2 bottom out at 8x8, the resolution of the last stage (as 7x7 is on ImageNet); stage 3,
already at 8x8, pools once to 4x4. Modules split evenly. Parameter counts against the paper:
Attention-92 1.83M (paper 1.9M, -3.9%), Attention-236 4.80M (5.1M, -5.9%), Attention-452 9.36M
(8.6M, +8.9%). Of the layouts tried (last stage 256/512/1024 wide, 1-3 poolings per stage), this one
keeps all three within 10%.

Depth counts trunk layers: 20 + 3 (2p + t) per module. A ``depth``, ``p`` or ``t`` other than the
variant's own keeps the variant's units and takes the layout of the registered Attention-<depth>
built with that p and t (``create_model("attention56", depth=92)`` has Attention-92's (1, 2, 3) on
ImageNet); with none registered, the modules that depth implies, split evenly over the stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ran.models.network import STEMS, ResidualAttentionNet, StageSpec
from ran.models.units import get_unit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

Layout = tuple[int, int, int]  # attention modules in stages 1, 2 and 3

ATTENTION_OPTIONS = frozenset({
    "depth", "p", "t", "r", "unit", "mask_activation", "combination", "mask_structure",
    "in_channels",
})
BASELINE_OPTIONS = frozenset({"in_channels"})


@dataclass(frozen=True)
class ModelDefaults:
    """What travels with a model besides its weights (timm's default_cfg, reduced).

    The attention fields (``p`` to ``mask_structure``) are ``None`` for a model without attention
    modules: it takes no such option.
    """

    depth: int | None  # layers, counted as the paper does
    stem: str  # the stem it is built with unless told otherwise
    description: str
    p: int | None = 1
    t: int | None = 2
    r: int | None = 1
    unit: str | None = "bottleneck"
    eval_crop: dict[str, int] = field(default_factory=dict)  # per stem, where not the recipe's
    mask_activation: str | None = "mixed"
    combination: str | None = "arl"
    mask_structure: str | None = "encoder_decoder"


def _baseline(depth: int, stem: str, description: str) -> ModelDefaults:
    return ModelDefaults(depth, stem, description, p=None, t=None, r=None, unit=None,
                         mask_activation=None, combination=None, mask_structure=None)


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]
    defaults: ModelDefaults
    options: frozenset[str]


_MODELS: dict[str, _Entry] = {}


def register_model(
    defaults: ModelDefaults, options: Iterable[str] = ATTENTION_OPTIONS
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator filing a model function under its own name; a name is registered only once.

    ``options``: the keyword options the function takes besides ``stem`` and ``num_classes``.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _MODELS[fn.__name__] = _Entry(fn, defaults, frozenset(options))
        return fn

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _MODELS[name]


def model_defaults(name: str) -> ModelDefaults:
    """Depth, stem, p/t/r, unit, mask design and eval crop per stem of a registered model."""
    return _entry(name).defaults


def model_options(name: str) -> frozenset[str]:
    """The ``create_model`` overrides this model takes (``stem`` and ``num_classes`` aside)."""
    return _entry(name).options


def _stem_and_classes(stem: str | None, num_classes: int | None, own_stem: str) -> tuple[str, int]:
    stem = stem or own_stem
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
    if num_classes is None:
        num_classes = 1000 if stem == "imagenet" else 10
    return stem, num_classes


# ---------------------------------------------------------------------------------------------
# Attention networks


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


# Stage widths, strides and mask poolings per stem (PAPER.md Table 2 on ImageNet; the narrow
# pre-activation ResNet-164 widths on CIFAR), then the last stage of three plain units.
_STAGES = {  # stem: ((width, stride, pools) of the three attention stages, last width, stem width)
    "imagenet": (((256, 1, 3), (512, 2, 2), (1024, 2, 1)), 2048, 64),  # 56, 28, 14 -> 7 px
    "cifar": (((64, 1, 2), (128, 2, 1), (256, 2, 1)), 256, 16),  # 32, 16, 8 -> 8 px
}


def _attention_stages(modules: Layout, stem: str) -> tuple[list[StageSpec], int]:
    """Stages and stem width of an attention network with ``modules`` per stage on ``stem``."""
    stages, last_width, stem_width = _STAGES[stem]
    specs = [StageSpec(width, stride=stride, units=1, modules=m, pools=pools)
             for (width, stride, pools), m in zip(stages, modules)]
    last_stride = 2 if stem == "imagenet" else 1
    return [*specs, StageSpec(last_width, stride=last_stride, units=3)], stem_width


def _valid_depths(p: int, t: int, limit: int = 500) -> list[int]:
    per_module = 3 * (2 * p + t)
    return list(range(20 + 3 * per_module, limit + 1, 3 * per_module))


def _even_layout(depth: int, p: int, t: int) -> Layout:
    """The modules a depth implies, split evenly; ValueError listing the valid depths otherwise."""
    per_module = 3 * (2 * p + t)
    total, rest = divmod(depth - 20, per_module)
    if depth <= 20 or rest or total % 3:
        raise ValueError(
            f"impossible depth {depth} for p={p}, t={t}: depth must be 20 + {per_module} x "
            f"(modules, a multiple of 3); valid depths: {', '.join(map(str, _valid_depths(p, t)))}"
        )
    return (total // 3,) * 3


def _attention_variant(depth: int, p: int, t: int) -> str | None:
    """The registered Attention-<depth> (bottleneck units) built with these p and t, if any."""
    for name, entry in _MODELS.items():
        d = entry.defaults
        plain = entry.options == ATTENTION_OPTIONS and d.unit == "bottleneck"
        if plain and (d.depth, d.p, d.t) == (depth, p, t):
            return name
    return None


def _attention_net(
    name: str,
    *,
    imagenet: Layout,
    cifar: Layout,
    stem: str | None = None,
    num_classes: int | None = None,
    in_channels: int = 3,
    depth: int | None = None,
    p: int | None = None,
    t: int | None = None,
    r: int | None = None,
    unit: str | None = None,
    mask_activation: str | None = None,
    combination: str | None = None,
    mask_structure: str | None = None,
) -> ResidualAttentionNet:
    """Build the attention variant ``name`` with its layout per stem; ``None`` means its own."""
    own = _MODELS[name].defaults
    stem, num_classes = _stem_and_classes(stem, num_classes, own.stem)
    depth, p, t = _given(depth, own.depth), _given(p, own.p), _given(t, own.t)
    kept = dict(
        stem=stem, num_classes=num_classes, in_channels=in_channels, r=_given(r, own.r),
        unit=_given(unit, own.unit), mask_activation=_given(mask_activation, own.mask_activation),
        combination=_given(combination, own.combination),
        mask_structure=_given(mask_structure, own.mask_structure),
    )
    if (depth, p, t) == (own.depth, own.p, own.t):
        modules = imagenet if stem == "imagenet" else cifar
    else:
        other = _attention_variant(depth, p, t)
        if other is not None:
            return _MODELS[other].build(**kept)  # type: ignore[return-value]
        modules = _even_layout(depth, p, t)
    stages, stem_width = _attention_stages(modules, stem)
    return ResidualAttentionNet(
        stages=stages, unit=get_unit(kept.pop("unit")), stem_width=stem_width, p=p, t=t, **kept
    )


@register_model(ModelDefaults(56, "imagenet", "Attention-56, pre-activation bottleneck units"))
def attention56(**options: Any) -> ResidualAttentionNet:
    """Attention-56 (Table 2): one attention module in each of stages 1-3. Options: see
    :func:`create_model`."""
    return _attention_net("attention56", imagenet=(1, 1, 1), cifar=(1, 1, 1), **options)


@register_model(ModelDefaults(
    92, "imagenet", "Attention-92, pre-activation bottleneck units",
    eval_crop={"imagenet": 320},  # Table 7 evaluates Attention-92 at 320
))
def attention92(**options: Any) -> ResidualAttentionNet:
    """Attention-92 (Table 2): modules (1, 2, 3) on ImageNet, as in the official prototxt, and
    (2, 2, 2) on CIFAR, where the paper gives no layout. Options: see :func:`create_model`."""
    return _attention_net("attention92", imagenet=(1, 2, 3), cifar=(2, 2, 2), **options)


@register_model(ModelDefaults(128, "imagenet", "Attention-128, pre-activation bottleneck units"))
def attention128(**options: Any) -> ResidualAttentionNet:
    """Attention-128 (Table 3): three modules in each of stages 1-3. Options: see
    :func:`create_model`."""
    return _attention_net("attention128", imagenet=(3, 3, 3), cifar=(3, 3, 3), **options)


@register_model(ModelDefaults(164, "imagenet", "Attention-164, pre-activation bottleneck units"))
def attention164(**options: Any) -> ResidualAttentionNet:
    """Attention-164 (Table 3): four modules in each of stages 1-3. Options: see
    :func:`create_model`."""
    return _attention_net("attention164", imagenet=(4, 4, 4), cifar=(4, 4, 4), **options)


@register_model(ModelDefaults(236, "imagenet", "Attention-236, pre-activation bottleneck units"))
def attention236(**options: Any) -> ResidualAttentionNet:
    """Attention-236: six modules in each of stages 1-3. Options: see :func:`create_model`."""
    return _attention_net("attention236", imagenet=(6, 6, 6), cifar=(6, 6, 6), **options)


@register_model(ModelDefaults(452, "cifar", "Attention-452 (p=2, t=4, r=3)", p=2, t=4, r=3))
def attention452(**options: Any) -> ResidualAttentionNet:
    """Attention-452: p=2, t=4, r=3 and six modules in each of stages 1-3, 18 x 24 + 20 = 452
    layers. Options: see :func:`create_model`."""
    return _attention_net("attention452", imagenet=(6, 6, 6), cifar=(6, 6, 6), **options)


@register_model(ModelDefaults(56, "imagenet", "AttentionNeXt-56, ResNeXt units", unit="resnext"))
def attentionnext56(**options: Any) -> ResidualAttentionNet:
    """AttentionNeXt-56 (Table 7): Attention-56's layout, one module in each of stages 1-3, of
    ResNeXt units. Options: see :func:`create_model`."""
    return _attention_net("attentionnext56", imagenet=(1, 1, 1), cifar=(1, 1, 1), **options)


@register_model(ModelDefaults(
    56, "imagenet", "AttentionInception-56, Inception-ResNet-A units", unit="inception",
    eval_crop={"imagenet": 299},  # Table 7 evaluates it at 299
))
def attentioninception56(**options: Any) -> ResidualAttentionNet:
    """AttentionInception-56 (Table 7): Attention-56's layout, one module in each of stages 1-3,
    of Inception-ResNet-A units. Options: see :func:`create_model`."""
    return _attention_net("attentioninception56", imagenet=(1, 1, 1), cifar=(1, 1, 1), **options)


# ---------------------------------------------------------------------------------------------
# Baselines without attention modules


@register_model(
    _baseline(164, "cifar", "Pre-activation ResNet-164 (He et al. 2016), CIFAR baseline"),
    options=BASELINE_OPTIONS,
)
def preact_resnet164(
    *, stem: str | None = None, num_classes: int | None = None, in_channels: int = 3
) -> ResidualAttentionNet:
    """Pre-activation ResNet-164 (He et al. 2016), the paper's CIFAR baseline: 18 bottleneck
    units in each of three stages (64/128/256 wide), 18 x 3 x 3 + 2 = 164 layers."""
    stem, num_classes = _stem_and_classes(stem, num_classes, "cifar")
    stages = [StageSpec(64, 1, 18), StageSpec(128, 2, 18), StageSpec(256, 2, 18)]
    return ResidualAttentionNet(
        stages=stages, unit=get_unit("bottleneck"), stem=stem,
        stem_width=64 if stem == "imagenet" else 16, num_classes=num_classes,
        in_channels=in_channels,
    )


class _TorchvisionResNet(nn.Module):
    """torchvision's ResNet-152 with our input check and a CIFAR stem option. Its layers are its
    own children (torchvision's names: ``conv1`` ... ``layer4``, ``fc``), so that its classifier is
    ``fc`` as in every registered model (the registry's provenance check, ``model.init_from``'s
    new-classes rule and the class check of ``ran eval`` find it by that name)."""

    def __init__(self, stem: str, num_classes: int, in_channels: int) -> None:
        super().__init__()
        from torchvision.models import resnet152

        self.in_channels = in_channels
        net = resnet152(weights=None, num_classes=num_classes)
        if stem == "cifar" or in_channels != 3:
            k, s, pad = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
            net.conv1 = nn.Conv2d(in_channels, 64, k, stride=s, padding=pad, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if stem == "cifar":
            net.maxpool = nn.Identity()
        for name, child in net.named_children():  # conv1, bn1, relu, maxpool, layer1-4, avgpool, fc
            self.add_module(name, child)

    def forward(self, x: torch.Tensor, return_masks: bool = False):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return (logits, []) if return_masks else logits


@register_model(
    _baseline(152, "imagenet", "ResNet-152 (torchvision), ImageNet baseline"),
    options=BASELINE_OPTIONS,
)
def resnet152(
    *, stem: str | None = None, num_classes: int | None = None, in_channels: int = 3
) -> nn.Module:
    """torchvision's ResNet-152, the paper's ImageNet baseline; on the CIFAR stem its first
    conv is 3x3/1 and its max-pool is dropped."""
    stem, num_classes = _stem_and_classes(stem, num_classes, "imagenet")
    return _TorchvisionResNet(stem, num_classes, in_channels)


# ---------------------------------------------------------------------------------------------
# By name


def _check_options(name: str, given: Iterable[str]) -> None:
    takes = model_options(name)
    unknown = sorted(set(given) - frozenset().union(*(e.options for e in _MODELS.values())))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name}; "
            f"valid options: {', '.join(sorted(takes))}"
        )
    refused = sorted(set(given) - takes)
    if refused:
        why = "has no attention modules" if "mask_activation" not in takes else (
            f"takes only {', '.join(sorted(takes))}")
        it = "it" if len(refused) == 1 else "them"
        raise ValueError(f"model {name} {why}: it takes no {', '.join(refused)}; leave {it} unset")


def create_model(
    name: str, stem: str | None = None, num_classes: int | None = None, **overrides: Any
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        stem: ``imagenet`` (224 input) or ``cifar`` (32 input); default: the model's own.
        num_classes: classifier outputs; default 1000 (ImageNet stem) or 10 (CIFAR stem).
        overrides: those of :func:`model_options`: ``depth``, ``p``, ``t``, ``r``, ``unit``
            (bottleneck|resnext|inception), ``mask_activation`` (mixed|channel|spatial),
            ``combination`` (arl|nal), ``mask_structure`` (encoder_decoder|local) for attention
            models, and ``in_channels``. A ``None`` value means the model's own.

    Raises:
        ValueError: unknown name, stem, option or option value, an option the model cannot use,
            or an impossible depth; the message names the valid choices.
    """
    entry = _entry(name)
    stem, num_classes = _stem_and_classes(stem, num_classes, entry.defaults.stem)
    given = {k: v for k, v in overrides.items() if v is not None}
    _check_options(name, given)
    return entry.build(stem=stem, num_classes=num_classes, **given)


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN scale and shift included, buffers not)."""
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
    """Size of one model as built: parameters and MACs at ``input_size``."""

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
