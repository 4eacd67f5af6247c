"""Residual Attention Network models in pure PyTorch (no Ray, no MLflow)."""

from ran.models.attention import AttentionModule, MaskActivationFn
from ran.models.network import ResidualAttentionNet, StageSpec
from ran.models.registry import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    count_macs,
    count_params,
    create_model,
    list_models,
    model_defaults,
    model_info,
)
from ran.models.units import InceptionResNetUnit, PreActBottleneck, ResNeXtBottleneck, get_unit

__all__ = [
    "AttentionModule", "MaskActivationFn", "ResidualAttentionNet", "StageSpec",
    "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD", "ModelInfo",
    "count_macs", "count_params", "create_model", "list_models", "model_defaults", "model_info",
    "InceptionResNetUnit", "PreActBottleneck", "ResNeXtBottleneck", "get_unit",
]
