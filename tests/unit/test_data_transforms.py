"""Per-recipe transforms: output sizes, crop geometry, reduced-size JPEG decoding, normalisation."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ran.data import DataError
from ran.data.transforms import (CifarEval, CifarTrain, ImageNetEval, ImageNetTrain, add_saturating,
                                 center_box, decode_region, jpeg_size, normalizer, random_resized_box)


def encode(image, fmt="JPEG", **kw):
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def halves(width=400, height=300):
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


def test_random_resized_box_stays_inside_and_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = random_resized_box(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_center_box_is_the_eval_crop():
    assert center_box(500, 375, 0.875) == (86, 23, 328, 328)


def test_imagenet_eval_is_resize_then_centre_crop():
    image = halves()
    out = ImageNetEval(crop=32).sample(encode(image, "PNG"), random.Random(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    # centre crop of a red|blue image: red on the left, blue on the right, nothing else
    assert out[0, :, :12].float().mean() > 240 and out[2, :, -12:].float().mean() > 240


def test_imagenet_train_output_and_lighting_stay_uint8():
    data = encode(halves(), quality=90)
    with_light, without = ImageNetTrain(crop=48), ImageNetTrain(crop=48, lighting=0)
    crops = torch.stack([with_light.sample(data, random.Random(i)) for i in range(8)])
    same = torch.stack([without.sample(data, random.Random(i)) for i in range(8)])
    assert torch.equal(crops, same)  # lighting is not drawn per sample: same crops
    lit = with_light.batch(crops.clone(), random.Random(0))
    assert torch.equal(without.batch(crops.clone(), random.Random(0)), crops)
    assert lit.shape == (8, 3, 48, 48) and lit.dtype == torch.uint8
    shift = (lit.int() - crops.int()).float().mean(dim=(2, 3))  # per image and channel
    assert 0 < shift.abs().max() < 40  # a small colour shift per image
    assert len({tuple(s.round().tolist()) for s in shift}) > 1


def test_saturating_add_clips_instead_of_wrapping():
    images = torch.tensor([[0, 10, 250, 255], [0, 10, 250, 255]], dtype=torch.uint8)
    add_saturating(images, torch.tensor([[8], [-12]]))  # one offset per row
    assert images.tolist() == [[8, 18, 255, 255], [0, 0, 238, 243]]
    add_saturating(images, torch.tensor([[-12], [300]]))
    assert images.tolist() == [[0, 6, 243, 243], [255, 255, 255, 255]]


def test_flip_happens_about_half_the_time():
    transform = ImageNetTrain(crop=16, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), lighting=0)
    rng = random.Random(2)
    data = encode(halves(), "PNG")
    red_left = [transform.sample(data, rng)[0, :, :4].float().mean() > 200 for _ in range(200)]
    assert 70 < sum(red_left) < 130


def test_large_jpegs_are_decoded_at_reduced_scale_with_the_same_content():
    big = halves(1600, 1200)
    data = encode(big, quality=95)
    out = decode_region(data, lambda w, h: (0, 0, w, h), (100, 100))  # 1/8 DCT scale applies
    reference = torch.from_numpy(np.asarray(big.resize((100, 100), Image.BILINEAR)))
    assert out.shape == (3, 100, 100)
    assert (out.permute(1, 2, 0).float() - reference.float()).abs().mean() < 6


def test_region_coordinates_survive_draft_scaling():
    # Region = the right (blue) half of a big JPEG: the draft must not shift it into the red half.
    data = encode(halves(1600, 800), quality=95)
    out = decode_region(data, lambda w, h: (w // 2 + 20, 0, w // 2 - 20, h), (64, 64))
    assert out[2].float().mean() > 240 and out[0].float().mean() < 15


def test_grayscale_and_palette_images_become_rgb():
    gray = Image.new("L", (40, 30), 128)
    palette = Image.new("P", (40, 30), 3)
    for data in (encode(gray), encode(palette, "PNG")):
        assert ImageNetEval(crop=16).sample(data, random.Random(0)).shape == (3, 16, 16)


def test_cifar_train_pads_crops_and_flips_per_batch():
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    data = encode(image, "PNG")
    transform = CifarTrain()
    rng = random.Random(0)
    batch = torch.stack([transform.sample(data, rng) for _ in range(64)])
    out = transform.batch(batch, rng)
    assert out.shape == (64, 3, 32, 32)
    zero_rows = (out.sum(dim=(1, 3)) == 0).sum(dim=1)  # padded rows at the top or bottom
    assert zero_rows.max() <= 4 and zero_rows.float().mean() > 0.5
    assert CifarEval(32).sample(data, rng)[:, 5, 5].tolist() == [200, 100, 50]


def test_normalizer_matches_mean_and_std():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalizer("imagenet")(images)
    assert out.dtype == torch.float32
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)
    cifar = normalizer("cifar")(torch.zeros((1, 3, 2, 2), dtype=torch.uint8))
    assert torch.allclose(cifar[0, :, 0, 0], -torch.tensor([0.4914, 0.4822, 0.4465]) /
                          torch.tensor([0.2470, 0.2435, 0.2616]), atol=1e-5)
    with pytest.raises(DataError, match="unknown recipe"):
        normalizer("mnist")


def test_jpeg_size_reads_the_frame_header():
    for mode, progressive in (("RGB", False), ("RGB", True), ("L", False), ("CMYK", False)):
        assert jpeg_size(encode(Image.new(mode, (123, 45)), progressive=progressive)) == (123, 45)
    assert jpeg_size(encode(Image.new("RGB", (5, 5)), "PNG")) is None
    assert jpeg_size(b"\xff\xd8\xff") is None


def test_corrupt_jpeg_is_a_value_error_with_the_reason():
    data = encode(halves())
    with pytest.raises(ValueError, match="corrupt JPEG: Image is incomplete or truncated"):
        ImageNetEval(crop=256).sample(data[: len(data) // 2], random.Random(0))  # full-size decode
    with pytest.raises(OSError, match="truncated"):
        ImageNetEval(crop=32).sample(data[: len(data) // 2], random.Random(0))  # reduced-size decode
