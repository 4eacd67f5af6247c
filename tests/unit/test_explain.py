"""`ran explain`: one grid (a row per image, a column per attention module) of heat maps that show
the masks: a forced pattern is read back from the rendered colours, contrast per map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from ran.cli import main
from ran.config import parse_config
from ran.explain import (
    DPI,
    HEATMAP,
    HEATMAP_ALPHA,
    PANEL_INCHES,
    TITLE_INCHES,
    ImageError,
    draw,
    explain,
    explain_images,
    mask_panels,
    read_image,
)
from ran.models import create_model
from ran.runtime import ModelBundle

CLASSES = ["ant", "bee", "cat", "dog"]
GREY = 128  # the test image: uniform grey, so every heat-map pixel is blended over the same grey


def _cfg(name: str = "attention56", classes: int = 4, **model):
    return parse_config({"model": {"name": name, "num_classes": classes, **model},
                         "data": {"recipe": "cifar"}, "train": {"precision": "fp32"}})


def _bundle(model, cfg=None, classes=CLASSES):
    """``model`` as ``ran explain`` sees it: a bundle on the CPU (the crop: CIFAR's 32)."""
    return ModelBundle.build(model, cfg or _cfg(), classes, device=torch.device("cpu"))


def _explain(model, path):
    bundle = _bundle(model)
    return explain(bundle, read_image(path, bundle)[None])[0]


def _model(name: str = "attention56", classes: int = 4, **options):
    torch.manual_seed(0)
    return create_model(name, stem="cifar", num_classes=classes, **options).eval()


def _save(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def image(tmp_path):
    return _save(tmp_path / "cat.png",
                 np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))


@pytest.fixture
def grey(tmp_path):
    return _save(tmp_path / "grey.png", np.full((32, 32, 3), GREY, dtype=np.uint8))


def _force_first_mask(model, inside: float, outside: float):
    """Make the first attention module's soft mask ``inside`` on the central 16x16 square of its
    32x32 map and ``outside`` elsewhere, in every channel (a forward hook replaces its output)."""
    pattern = torch.full((32, 32), outside)
    pattern[8:24, 8:24] = inside
    activation = model.attention_modules[0].mask[-1]
    return activation.register_forward_hook(lambda m, i, out: pattern.expand_as(out).to(out.dtype).clone())


def _heat_values(fig, panel: int) -> np.ndarray:
    """The rendered heat-map panel ``panel`` read back as colormap positions 0..255: each pixel is
    matched to the nearest colour of the colormap blended over the grey image."""
    canvas = fig.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float32) / 255
    box = fig.axes[panel].get_window_extent()
    height = rgba.shape[0]
    crop = rgba[int(height - box.y1) + 1:int(height - box.y0) - 1, int(box.x0) + 1:int(box.x1) - 1]
    lut = colormaps[HEATMAP](np.linspace(0, 1, 256))[:, :3]
    blended = HEATMAP_ALPHA * lut + (1 - HEATMAP_ALPHA) * (GREY / 255)
    distance = ((crop[:, :, None, :] - blended[None, None]) ** 2).sum(-1)
    return distance.argmin(-1)


def _inside_outside(values: np.ndarray) -> tuple[float, float]:
    """Median colormap position in the middle of the square (35%..65% of the panel) and on the
    border ring (outer 15%); the square covers 25%..75%."""
    h, w = values.shape
    inside = values[int(0.35 * h):int(0.65 * h), int(0.35 * w):int(0.65 * w)]
    ring = np.ones_like(values, dtype=bool)
    ring[int(0.15 * h):int(0.85 * h), int(0.15 * w):int(0.85 * w)] = False
    return float(np.median(inside)), float(np.median(values[ring]))


def test_a_mask_forced_high_inside_a_square_is_drawn_bright_there_and_dark_outside(grey):
    model = _model()
    _force_first_mask(model, inside=0.9, outside=0.1)
    result = _explain(model, grey)

    assert float(result.panels[0].mask[16, 16]) == pytest.approx(0.9)
    fig = draw([result], CLASSES)
    inside, outside = _inside_outside(_heat_values(fig, 1))
    assert inside >= 245 and outside <= 10  # the colormap's bright end inside, its dark end outside


def test_each_map_is_stretched_on_its_own_so_a_nearly_constant_mask_shows_its_pattern(grey):
    model = _model()
    _force_first_mask(model, inside=0.501, outside=0.5)  # a 0.001 difference
    result = _explain(model, grey)
    fig = draw([result], CLASSES)

    inside, outside = _inside_outside(_heat_values(fig, 1))
    assert inside >= 245 and outside <= 10  # full contrast for a 0.001 difference
    bar = fig.axes[4]  # the colour bars follow the 1 x 4 grid of panels
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0.5", "0.501"]


def test_a_constant_mask_is_drawn_in_the_middle_colour_and_titled_so(grey):
    model = _model()
    _force_first_mask(model, inside=0.3, outside=0.3)
    fig = draw([_explain(model, grey)], CLASSES)

    inside, outside = _inside_outside(_heat_values(fig, 1))
    assert abs(inside - 127.5) <= 3 and abs(outside - 127.5) <= 3
    assert fig.axes[1].get_title().endswith("mean of 64 ch (constant)")


def test_one_row_per_image_one_column_per_module_with_a_colour_bar_each(image, tmp_path):
    model = _model("attention92")  # CIFAR Attention-92: 2 modules in each of 3 stages
    other = _save(tmp_path / "dog" / "x.png", np.zeros((20, 20, 3), dtype=np.uint8))
    bundle = _bundle(model, _cfg("attention92"))
    png = explain_images(bundle, [image, other], tmp_path / "out")

    assert png.name == "attention_cat_and_1_more.png"
    width, height = Image.open(png).size
    assert (width, height) == (round(7 * PANEL_INCHES * DPI), round((2 * PANEL_INCHES + TITLE_INCHES) * DPI))
    results = [_explain(model, p) for p in (image, other)]
    fig = draw(results, CLASSES)
    assert len(fig.axes) == 2 * 7 + 2 * 6  # 2 rows of input + 6 modules, and 12 colour bars
    titles = [ax.get_title().split("\n") for ax in fig.axes[1:7]]
    assert [t[0] for t in titles] == [
        "stage 1, module 1", "stage 1, module 2", "stage 2, module 1", "stage 2, module 2",
        "stage 3, module 1", "stage 3, module 2"]
    assert [t[1] for t in titles] == [
        "32x32, mean of 64 ch", "32x32, mean of 64 ch", "16x16, mean of 128 ch",
        "16x16, mean of 128 ch", "8x8, mean of 256 ch", "8x8, mean of 256 ch"]
    for ax in fig.axes[1:7]:
        grey_image, heat = ax.get_images()
        assert heat.get_array().shape == (32, 32)  # upsampled to the image
        assert heat.get_cmap().name == HEATMAP


def test_rows_name_the_file_the_prediction_and_the_true_class_from_its_folder(tmp_path):
    model = _model()
    in_class = _save(tmp_path / "val" / "bee" / "1.png", np.full((32, 32, 3), 90, dtype=np.uint8))
    loose = _save(tmp_path / "2.png", np.full((32, 32, 3), 200, dtype=np.uint8))
    from ran.data.transforms import normalizer

    bundle = _bundle(model)
    with torch.no_grad():
        probs = model(normalizer("cifar")(read_image(in_class, bundle)[None])).softmax(1)[0]
    predicted = int(probs.argmax())
    png = explain_images(bundle, [in_class, loose], tmp_path / "out")
    assert png.exists()

    result = _explain(model, in_class)
    assert result.predicted == predicted
    assert result.probability == pytest.approx(float(probs.max()), abs=1e-6)
    result.name, result.true = "1.png", 1
    fig = draw([result], CLASSES)
    assert fig.axes[0].get_title() == (f"1.png\npredicted {CLASSES[predicted]} (class {predicted}) "
                                       f"p={float(probs.max()):.2f}\ntrue bee (class 1)")


def test_the_title_says_how_channels_are_reduced(image, tmp_path):
    from ran.explain import mask_activation

    mixed, channel = _model(), _model(mask_activation="channel")
    assert (mask_activation(mixed), mask_activation(channel)) == ("mixed", "channel")
    png = explain_images(_bundle(channel, _cfg(mask_activation="channel")), [image], tmp_path)
    assert png.exists()
    cfg = _cfg()
    title = draw([_explain(mixed, image)], CLASSES,
                 reduction="mean over channels of the per-channel sigmoid").get_suptitle()
    assert title.startswith("soft attention masks, mean over channels of the per-channel sigmoid")
    assert cfg.model.mask_activation is None  # the model's own: mixed


def test_masks_are_channel_means_upsampled_and_stages_split_on_shape():
    masks = [torch.full((1, 8, 4, 4), 0.25), torch.full((1, 8, 4, 4), 0.75),
             torch.rand(1, 16, 2, 2)]
    panels = mask_panels(masks, (16, 16))

    assert [(p.stage, p.module, p.size, p.channels) for p in panels] == [
        (1, 1, (4, 4), 8), (1, 2, (4, 4), 8), (2, 1, (2, 2), 16)]
    assert panels[0].mask.shape == (16, 16)
    assert torch.allclose(panels[1].mask, torch.full((16, 16), 0.75))
    assert float(panels[2].mask.min()) >= 0.0 and float(panels[2].mask.max()) <= 1.0


def test_unreadable_or_missing_images_fail_before_anything_is_written(image, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(ImageError, match=r"notes\.png: cannot decode"):
        explain_images(_bundle(_model(), classes=None), [image, bad], out)
    assert not out.exists()
    with pytest.raises(ImageError, match=r"missing\.jpg: no such file"):
        read_image(tmp_path / "missing.jpg", _bundle(_model()))


def test_cli_explains_a_checkpoint(image, tmp_path, capsys):
    cfg = _cfg()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": _model().state_dict(), "config": cfg.model_dump(), "run_id": None},
               ckpt / "checkpoint.pt")
    out = tmp_path / "pictures"

    assert main(["explain", str(ckpt), str(image), str(image), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention_cat_and_1_more.png"]
    assert capsys.readouterr().out.strip() == str(out / "attention_cat_and_1_more.png")

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert main(["explain", str(ckpt), str(bad), "--out", str(out)]) == 2
    assert "bad.jpg: cannot decode" in capsys.readouterr().err
