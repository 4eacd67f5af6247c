"""Residual Attention Network models in pure PyTorch (no Ray, no MLflow)."""

from ran.models.attention import AttentionModule, MaskActivationFn
from ran.models.network import ResidualAttentionNet, StageSpec
from ran.models.registry import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelDefaults,
    ModelInfo,
    attention56,
    attention92,
    attention128,
    attention164,
    attention236,
    attention452,
    attentioninception56,
    attentionnext56,
    count_macs,
    count_params,
    create_model,
    list_models,
    model_defaults,
    model_info,
    model_options,
    preact_resnet164,
    register_model,
    resnet152,
)
from ran.models.units import InceptionResNetUnit, PreActBottleneck, ResNeXtBottleneck, get_unit

__all__ = [
    "AttentionModule", "MaskActivationFn", "ResidualAttentionNet", "StageSpec",
    "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD", "ModelDefaults", "ModelInfo",
    "count_macs", "count_params", "create_model", "list_models", "model_defaults", "model_info",
    "model_options", "register_model",
    "attention56", "attention92", "attention128", "attention164", "attention236", "attention452",
    "attentionnext56", "attentioninception56", "preact_resnet164", "resnet152",
    "InceptionResNetUnit", "PreActBottleneck", "ResNeXtBottleneck", "get_unit",
]
