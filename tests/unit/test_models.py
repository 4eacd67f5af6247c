"""The model zoo against the paper's tables and the behaviours later issues rely on."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ran.models
from ran.models import (
    AttentionModule,
    MaskActivationFn,
    ModelDefaults,
    count_macs,
    count_params,
    create_model,
    list_models,
    model_defaults,
    model_options,
    register_model,
)
from ran.models.attention import HourglassMask

ALL_MODELS = list_models()
STEMS = ("imagenet", "cifar")
BASELINES = ("preact_resnet164", "resnet152")
ATTENTION_MODELS = [n for n in ALL_MODELS if n not in BASELINES]
# Every option a job can leave unset (None: "the model's own").
JOB_OPTIONS = ("depth", "p", "t", "r", "unit", "mask_activation", "combination", "mask_structure")


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


# Attention modules in stages 1, 2, 3 (Table 2 for Attention-56/92 on ImageNet; the layouts
# documented in ran/models/registry.py elsewhere).
TABLE_2_LAYOUTS = {
    ("attention56", "imagenet"): (1, 1, 1), ("attention56", "cifar"): (1, 1, 1),
    ("attention92", "imagenet"): (1, 2, 3), ("attention92", "cifar"): (2, 2, 2),
    ("attention128", "imagenet"): (3, 3, 3), ("attention128", "cifar"): (3, 3, 3),
    ("attention164", "imagenet"): (4, 4, 4), ("attention164", "cifar"): (4, 4, 4),
    ("attention236", "imagenet"): (6, 6, 6), ("attention236", "cifar"): (6, 6, 6),
    ("attention452", "imagenet"): (6, 6, 6), ("attention452", "cifar"): (6, 6, 6),
    ("attentionnext56", "imagenet"): (1, 1, 1), ("attentionnext56", "cifar"): (1, 1, 1),
    ("attentioninception56", "imagenet"): (1, 1, 1),
    ("attentioninception56", "cifar"): (1, 1, 1),
}
STAGE_WIDTHS = {"imagenet": (256, 512, 1024), "cifar": (64, 128, 256)}


def _layout(model: torch.nn.Module, stem: str) -> tuple[int, ...]:
    """Attention modules per stage, told apart by their width."""
    widths = [m.trunk[0].out_channels for m in model.attention_modules]
    assert set(widths) <= set(STAGE_WIDTHS[stem])
    return tuple(widths.count(w) for w in STAGE_WIDTHS[stem])


def _meta(build, *args, **kwargs) -> torch.nn.Module:
    """Build without allocating weights: structure tests need no numbers."""
    with torch.device("meta"):
        return build(*args, **kwargs)


def test_every_attention_variant_has_a_layout_in_the_table():
    assert {name for name, _ in TABLE_2_LAYOUTS} == set(ATTENTION_MODELS)


@pytest.mark.parametrize("name, stem", sorted(TABLE_2_LAYOUTS))
def test_variant_function_builds_its_table_2_layout(name, stem):
    variant = getattr(ran.models, name)  # attention92(stem=...), as torchvision's resnet50()
    assert _layout(_meta(variant, stem=stem), stem) == TABLE_2_LAYOUTS[(name, stem)]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_create_model_builds_the_variant_function(name):
    by_name = _meta(create_model, name)
    direct = _meta(getattr(ran.models, name))
    assert repr(by_name) == repr(direct)


def test_attention92_imagenet_modules_sit_at_table_2_widths():
    a92 = _meta(create_model, "attention92", stem="imagenet")
    widths = [m.trunk[0].out_channels for m in a92.attention_modules]
    assert widths == [256, 512, 512, 1024, 1024, 1024]


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_have_no_attention_modules(name):
    model = _meta(create_model, name)
    assert not any(isinstance(m, AttentionModule) for m in model.modules())


@pytest.mark.parametrize(
    "name, stem, overrides, layout",
    [
        # depth=92 gives Attention-92's layout, with the model's own units
        ("attention56", "imagenet", {"depth": 92}, (1, 2, 3)),
        ("attention56", "cifar", {"depth": 92}, (2, 2, 2)),
        ("attentionnext56", "imagenet", {"depth": 92}, (1, 2, 3)),
        ("attention92", "imagenet", {"depth": 56}, (1, 1, 1)),
        ("attention56", "imagenet", {"depth": 164}, (4, 4, 4)),
        ("attention56", "cifar", {"depth": 452, "p": 2, "t": 4, "r": 3}, (6, 6, 6)),
        # p and t keep the depth: 92 = 20 + 3 x (2 x 2 + 4) x 3 modules
        ("attention92", "imagenet", {"p": 2, "t": 4}, (1, 1, 1)),
        ("attention56", "cifar", {"depth": 92, "p": 2, "t": 4}, (1, 1, 1)),
        # no registered variant: the depth's modules split evenly, 20 + 12 x 21 = 272
        ("attention56", "cifar", {"depth": 272}, (7, 7, 7)),
        ("attention452", "cifar", {"p": 1, "t": 2, "r": 1}, (12, 12, 12)),
    ],
)
def test_depth_override_picks_the_modules_per_stage(name, stem, overrides, layout):
    model = _meta(create_model, name, stem=stem, **overrides)
    assert _layout(model, stem) == layout


def test_depth_override_keeps_the_models_units():
    model = _meta(create_model, "attentionnext56", stem="imagenet", depth=92)
    assert {type(u).__name__ for u in model.attention_modules[0].trunk} == {"ResNeXtBottleneck"}


def test_registry_refuses_a_name_twice():
    before = list_models()
    with pytest.raises(ValueError, match="'attention56' is registered twice"):
        register_model(ModelDefaults(56, "imagenet", "again"))(ran.models.attention56)
    assert list_models() == before


def _small_input(stem: str) -> torch.Tensor:
    # Small enough to be cheap, large enough that every mask still pools as often as at full size:
    # ImageNet stem 32 -> 8 at stage 1 (pools 3x), CIFAR stem 16 at stage 1 (pools 2x).
    size = 32 if stem == "imagenet" else 16
    return torch.randn(2, 3, size, size)


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_trains_with_every_job_option_unset(name, stem):
    # What a job that sets only model.name passes: every option None, the model's own.
    torch.manual_seed(0)
    model = create_model(name, stem=stem, num_classes=7, **dict.fromkeys(JOB_OPTIONS))
    logits = model(_small_input(stem))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    for module in model.modules():  # the attention models' own mask design
        if isinstance(module, AttentionModule):
            assert module.combination == "arl"
            assert isinstance(module.mask[0], HourglassMask)
        if isinstance(module, MaskActivationFn):
            assert module.kind == "mixed"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_defaults_give_the_models_stem_and_classes(name):
    stem = model_defaults(name).stem
    logits = _meta(create_model, name)(torch.empty(2, 3, 32, 32, device="meta"))
    assert logits.shape == (2, 1000 if stem == "imagenet" else 10)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_options_given_as_the_models_own_values_change_nothing(name):
    d = model_defaults(name)
    own = {"depth": d.depth, "p": d.p, "t": d.t, "r": d.r, "unit": d.unit, "in_channels": 3,
           "mask_activation": d.mask_activation, "combination": d.combination,
           "mask_structure": d.mask_structure}
    explicit = {k: v for k, v in own.items() if k in model_options(name)}
    assert set(explicit) == model_options(name)
    assert repr(_meta(create_model, name, **explicit)) == repr(_meta(create_model, name))


def test_model_options_of_attention_models_and_baselines():
    for name in ATTENTION_MODELS:
        assert model_options(name) == frozenset({
            "depth", "p", "t", "r", "unit", "mask_activation", "combination", "mask_structure",
            "in_channels",
        }), name
    for name in BASELINES:
        assert model_options(name) == frozenset({"in_channels"}), name
        d = model_defaults(name)
        assert (d.p, d.t, d.r, d.unit, d.mask_activation, d.combination, d.mask_structure) == (
            None,) * 7


def test_model_options_of_an_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'attention57'; valid models: attention128"):
        model_options("attention57")


def test_a_baseline_refuses_an_attention_option_in_one_line():
    with pytest.raises(ValueError) as err:
        create_model("resnet152", mask_activation="channel")
    assert str(err.value) == (
        "model resnet152 has no attention modules: it takes no mask_activation; leave it unset"
    )


def test_a_baseline_names_every_refused_option():
    with pytest.raises(ValueError) as err:
        create_model("preact_resnet164", combination="arl", mask_structure="local",
                     mask_activation=None)
    assert str(err.value) == ("model preact_resnet164 has no attention modules: it takes no "
                              "combination, mask_structure; leave them unset")


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("option, value", [
    ("depth", 56), ("p", 1), ("t", 2), ("r", 1), ("unit", "bottleneck"),
    ("mask_activation", "mixed"), ("combination", "nal"), ("mask_structure", "encoder_decoder"),
])
def test_baselines_refuse_every_attention_option_that_is_set(name, option, value):
    with pytest.raises(ValueError, match=f"^model {name} has no attention modules: it takes no "
                                         f"{option}; leave it unset$"):
        create_model(name, stem="cifar", **{option: value})


def test_a_baseline_takes_in_channels():
    model = create_model("resnet152", stem="cifar", num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


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
    with pytest.raises(ValueError, match=r"impossible depth 60 for p=1, t=2: .*depths: 56, 92, 128,"):
        create_model("attention56", depth=60)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"mask_activation": "softmax"}, "valid choices: mixed, channel, spatial"),
        ({"combination": "sum"}, "valid choices: arl, nal"),
        ({"mask_structure": "unet"}, "valid choices: encoder_decoder, local"),
        ({"unit": "dense"}, "valid units: bottleneck, inception, resnext"),
        ({"stem": "mnist"}, "valid stems: imagenet, cifar"),
        ({"dropout": 0.1}, "unknown option.s. dropout for model attention56; valid options: comb"),
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


def test_models_import_neither_ray_nor_mlflow():
    code = ("import sys, ran.models; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
