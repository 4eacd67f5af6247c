"""`ran explain`: one PNG per image, the input plus one heat-map panel per attention module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ran.cli import main
from ran.config import parse_config
from ran.explain import (
    DPI,
    ImageError,
    PANEL_INCHES,
    draw,
    explain,
    explain_images,
    mask_panels,
    read_image,
)
from ran.models import create_model


def _cfg(name: str = "attention56", recipe: str = "cifar", classes: int = 4):
    return parse_config({"model": {"name": name, "num_classes": classes}, "data": {"recipe": recipe}})


def _model(name: str = "attention56", classes: int = 4):
    torch.manual_seed(0)
    return create_model(name, stem="cifar", num_classes=classes).eval()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "cat.png"
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_one_panel_per_attention_module_plus_the_input(image):
    model = _model("attention92")  # CIFAR Attention-92: 2 modules in each of 3 stages
    result = explain(model, read_image(image, "cifar", 32), "cifar")
    fig = draw(result, "title")

    assert len(model.attention_modules) == 6
    assert len(fig.axes) == 1 + 6
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("input 32x32")
    assert [t.split("\n")[0] for t in titles[1:]] == [
        "stage 1, module 1 (32x32)", "stage 1, module 2 (32x32)",
        "stage 2, module 1 (16x16)", "stage 2, module 2 (16x16)",
        "stage 3, module 1 (8x8)", "stage 3, module 2 (8x8)",
    ]
    for ax in fig.axes[1:]:
        picture, heat = ax.get_images()
        assert heat.get_array().shape == (32, 32)  # upsampled to the image
        assert heat.get_cmap().name == "jet"


def test_png_size_follows_the_grid(image, tmp_path):
    cfg, model = _cfg(), _model()  # Attention-56: 3 modules -> 4 panels in one row
    [png] = explain_images(model, cfg, ["a", "b", "c", "d"], [image], tmp_path / "out")

    assert png.name == "cat_attention.png"
    panel = int(PANEL_INCHES * DPI)
    width, height = Image.open(png).size
    assert width == 4 * panel
    assert height == panel + 50  # one row and the title strip
    seven = draw(explain(_model("attention92"), read_image(image, "cifar", 32), "cifar"), "t")
    assert seven.get_size_inches().tolist() == [4 * PANEL_INCHES, 2 * PANEL_INCHES + 0.5]


def test_masks_are_channel_means_upsampled_and_stages_split_on_shape():
    masks = [torch.full((1, 8, 4, 4), 0.25), torch.full((1, 8, 4, 4), 0.75),
             torch.rand(1, 16, 2, 2)]
    panels = mask_panels(masks, (16, 16))

    assert [(p.stage, p.module, p.size) for p in panels] == [(1, 1, (4, 4)), (1, 2, (4, 4)),
                                                              (2, 1, (2, 2))]
    assert panels[0].mask.shape == (16, 16)
    assert torch.allclose(panels[1].mask, torch.full((16, 16), 0.75))
    assert float(panels[2].mask.min()) >= 0.0 and float(panels[2].mask.max()) <= 1.0


def test_prediction_is_the_models_argmax_and_titles_the_figure(image, tmp_path):
    from ran.data.transforms import normalizer

    model = _model()
    picture = read_image(image, "cifar", 32)
    with torch.no_grad():
        probs = model(normalizer("cifar")(picture[None])).softmax(dim=1)[0]
    result = explain(model, picture, "cifar")

    assert result.predicted == int(probs.argmax())
    assert result.probability == pytest.approx(float(probs.max()), abs=1e-6)
    [png] = explain_images(model, _cfg(), ["ant", "bee", "cat", "dog"], [image], tmp_path)
    assert png.exists()
    fig = draw(result, f"cat.png: predicted {['ant', 'bee', 'cat', 'dog'][result.predicted]}")
    assert fig.get_suptitle().startswith("cat.png: predicted ")


def test_unreadable_or_missing_images_fail_before_anything_is_written(image, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(ImageError, match=r"notes\.png: cannot decode"):
        explain_images(_model(), _cfg(), None, [image, bad], out)
    assert not out.exists()
    with pytest.raises(ImageError, match=r"missing\.jpg: no such file"):
        read_image(tmp_path / "missing.jpg", "cifar", 32)


def test_cli_explains_a_checkpoint(image, tmp_path, capsys):
    cfg = _cfg()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": _model().state_dict(), "config": cfg.model_dump(), "run_id": None},
               ckpt / "checkpoint.pt")
    out = tmp_path / "pictures"

    assert main(["explain", str(ckpt), str(image), str(image), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat_attention.png", "cat_attention_2.png"]
    assert str(out / "cat_attention.png") in capsys.readouterr().out

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert main(["explain", str(ckpt), str(bad), "--out", str(out)]) == 2
    assert "bad.jpg: cannot decode" in capsys.readouterr().err
