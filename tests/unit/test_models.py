"""The model zoo against the paper's tables and the behaviours later issues rely on."""

from __future__ import annotations

import pytest
import torch

from ran.models import (
    AttentionModule,
    MaskActivationFn,
    count_macs,
    count_params,
    create_model,
    list_models,
    model_defaults,
)

ALL_MODELS = list_models()


def test_registry_holds_every_variant_of_the_paper():
    assert set(ALL_MODELS) == {
        "attention56", "attention92", "attention128", "attention164", "attention236",
        "attention452", "attentionnext56", "attentioninception56", "preact_resnet164", "resnet152",
    }


# Official prototxt sizes (PAPER.md): params within 1% (3% for NeXt), GMACs at 224 within 2%.
@pytest.mark.parametrize(
    "name, params_m, params_tol, gmacs",
    [
        ("attention56", 31.81, 0.01, 6.27),
        ("attention92", 52.47, 0.01, 10.53),
        ("attentionnext56", 31.32, 0.03, None),
    ],
)
def test_imagenet_sizes_match_official_prototxts(name, params_m, params_tol, gmacs):
    model = create_model(name, stem="imagenet", num_classes=1000)
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=params_tol)
    if gmacs is not None:
        assert count_macs(model, 224) / 1e9 == pytest.approx(gmacs, rel=0.02)


@pytest.mark.parametrize("name, params_m", [("attention92", 1.9), ("attention236", 5.1), ("attention452", 8.6)])
def test_cifar_sizes_within_ten_percent_of_paper(name, params_m):
    model = create_model(name, stem="cifar", num_classes=10)
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=0.10)


def test_module_counts_follow_table_2():
    counts = {
        ("attention56", "imagenet"): 3,
        ("attention92", "imagenet"): 6,
        ("attention92", "cifar"): 6,
        ("attention236", "cifar"): 18,
        ("attention452", "cifar"): 18,
    }
    for (name, stem), n in counts.items():
        assert len(create_model(name, stem=stem).attention_modules) == n, (name, stem)
    a92 = create_model("attention92", stem="imagenet")
    widths = [m.trunk[0].out_channels for m in a92.attention_modules]
    assert widths == [256, 512, 512, 1024, 1024, 1024]  # m = (1, 2, 3)


def _small_input(name: str, stem: str) -> torch.Tensor:
    # 64 px keeps the ImageNet-stem models cheap: 64 -> 16 at stage 1, the masks still pool 3x.
    return torch.randn(2, 3, 64 if stem == "imagenet" else 32, 64 if stem == "imagenet" else 32)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    stem = "cifar" if name in ("attention236", "attention452") else model_defaults(name).stem
    model = create_model(name, stem=stem, num_classes=7)
    x = _small_input(name, stem)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("activation", ["mixed", "spatial", "channel"])
def test_masks_returned_per_module_with_activation_range(activation):
    model = create_model("attention56", stem="cifar", num_classes=10, mask_activation=activation)
    model.eval()
    logits, masks = model(torch.randn(2, 3, 32, 32), return_masks=True)
    assert logits.shape == (2, 10)
    assert len(masks) == len(model.attention_modules) == 3
    assert [m.shape[1:] for m in masks] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    for mask in masks:
        if activation == "channel":
            norms = mask.norm(dim=1)
            assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
        else:
            assert mask.min() >= 0 and mask.max() <= 1


def test_return_masks_does_not_change_logits():
    model = create_model("attention56", stem="cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    logits, _ = model(x, return_masks=True)
    assert torch.equal(logits, model(x))


def _module_with_forced_mask(combination: str, value: float) -> tuple[AttentionModule, torch.Tensor]:
    torch.manual_seed(0)
    module = AttentionModule(64, p=0, t=2, r=1, num_pools=2, combination=combination).eval()
    # Replace the mask's output with a constant: H must then equal the trunk exactly.
    module.mask.register_forward_hook(lambda mod, inp, out: torch.full_like(out, value))
    return module, torch.randn(2, 64, 16, 16)


def test_arl_with_zero_mask_is_exactly_the_trunk():
    module, x = _module_with_forced_mask("arl", 0.0)
    with torch.no_grad():
        assert torch.equal(module(x), module.trunk(x))


def test_nal_with_all_ones_mask_is_exactly_the_trunk():
    module, x = _module_with_forced_mask("nal", 1.0)
    with torch.no_grad():
        assert torch.equal(module(x), module.trunk(x))


def test_arl_and_nal_differ_for_a_half_mask():
    arl, x = _module_with_forced_mask("arl", 0.5)
    nal, _ = _module_with_forced_mask("nal", 0.5)
    nal.load_state_dict(arl.state_dict())
    with torch.no_grad():
        trunk = arl.trunk(x)
        assert torch.allclose(arl(x), 1.5 * trunk)
        assert torch.allclose(nal(x), 0.5 * trunk)


def test_spatial_activation_normalises_each_channel_map():
    x = torch.randn(2, 4, 8, 8) * 5 + 3
    out = MaskActivationFn("spatial")(x)
    logits = torch.logit(out.double())
    assert torch.allclose(logits.mean(dim=(2, 3)), torch.zeros(2, 4, dtype=torch.double), atol=1e-4)
    assert torch.allclose(logits.std(dim=(2, 3), unbiased=False), torch.ones(2, 4, dtype=torch.double), atol=1e-3)


def test_hourglass_adds_no_tensor_after_the_top_upsampling():
    # Stage 1 on ImageNet pools 3 times: 2 skip connections, 8 units (r, r, 2r down; r, r up + 2 skips).
    module = AttentionModule(256, num_pools=3)
    hourglass = module.mask[0]
    assert len(hourglass.skips) == 2
    n_units = sum(len(s) for s in hourglass.down) + len(hourglass.skips) + sum(len(s) for s in hourglass.up)
    assert n_units == 8
    assert len(AttentionModule(256, num_pools=1).mask[0].skips) == 0


def test_local_mask_structure_has_no_pooling():
    module = AttentionModule(64, mask_structure="local")
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in module.modules())
    out, mask = module.forward_with_mask(torch.randn(1, 64, 8, 8))
    assert out.shape == mask.shape == (1, 64, 8, 8)


@pytest.mark.parametrize("unit", ["bottleneck", "resnext", "inception"])
def test_unit_override(unit):
    model = create_model("attention56", stem="cifar", unit=unit)
    assert type(model.attention_modules[0].trunk[0]).__name__ == {
        "bottleneck": "PreActBottleneck", "resnext": "ResNeXtBottleneck", "inception": "InceptionResNetUnit"
    }[unit]


def test_p_t_r_overrides_change_the_depth():
    base = create_model("attention56", stem="cifar")
    deeper = create_model("attention56", stem="cifar", p=2, t=4, depth=92)
    assert len(deeper.attention_modules) == 3
    assert len(deeper.attention_modules[0].trunk) == 4 and len(deeper.attention_modules[0].pre) == 2
    assert count_params(deeper) > count_params(base)


def test_unknown_model_names_the_valid_choices():
    with pytest.raises(ValueError, match="valid models: .*attention56"):
        create_model("attention57")


def test_impossible_depth_names_the_valid_depths():
    with pytest.raises(ValueError, match=r"valid depths: 56, 92, 128, 164"):
        create_model("attention56", depth=60)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"mask_activation": "softmax"}, "valid choices: mixed, channel, spatial"),
        ({"combination": "sum"}, "valid choices: arl, nal"),
        ({"mask_structure": "unet"}, "valid choices: encoder_decoder, local"),
        ({"unit": "dense"}, "valid units: bottleneck, inception, resnext"),
        ({"stem": "mnist"}, "valid stems: imagenet, cifar"),
        ({"dropout": 0.1}, "valid options:"),
    ],
)
def test_bad_options_name_the_valid_choices(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_model("attention56", **kwargs)


@pytest.mark.parametrize("name", ["attention56", "resnet152"])
def test_wrong_input_channels_is_a_value_error(name):
    model = create_model(name, stem="cifar")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_any_num_classes_and_in_channels():
    model = create_model("attention56", stem="cifar", num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_deterministic_under_a_seed():
    torch.manual_seed(123)
    a = create_model("attention56", stem="cifar")
    torch.manual_seed(123)
    b = create_model("attention56", stem="cifar")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_he_initialisation_of_convs():
    model = create_model("attention56", stem="imagenet")
    conv = model.attention_modules[2].trunk[0].conv1  # 1024 -> 256, 1x1
    expected_std = (2.0 / (conv.out_channels * 1 * 1)) ** 0.5  # fan_out mode
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)


def test_channels_last_and_bf16_autocast_match_fp32():
    torch.manual_seed(0)
    model = create_model("attention56", stem="cifar").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(cl, ref, atol=1e-4, rtol=1e-4)
    assert bf.dtype == torch.bfloat16
    assert torch.allclose(bf.float(), ref, atol=0.1 * ref.abs().max().item())


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = create_model("attention56", stem="cifar", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
