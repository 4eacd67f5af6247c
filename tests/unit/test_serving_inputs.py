"""The serving pyfunc's own logic (ran.serving.ImageClassifier), without MLflow: every accepted
form of an image gives the same pixels, the answer is the model's top-k, and every bad item is
refused with one line that names it."""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ran.config import parse_config
from ran.data.transforms import make_transform, normalizer
from ran.models import create_model
from ran.runtime import ModelBundle
from ran.serving import ImageClassifier, RequestError

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def classifier() -> ImageClassifier:
    cfg = parse_config({"model": {"name": "attention56", "stem": "cifar", "num_classes": 10},
                        "data": {"recipe": "cifar"}, "train": {"precision": "fp32"}})
    torch.manual_seed(0)
    model = create_model("attention56", stem="cifar", num_classes=10)
    return ImageClassifier(ModelBundle.build(model, cfg, CLASSES, device=torch.device("cpu")))


def _pixels(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_form_of_an_image_gives_the_same_pixels(classifier):
    pixels = [_pixels(0), _pixels(1)]
    pngs = [_png(p) for p in pixels]
    expected = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)

    forms = {
        "bytes": pngs,
        "base64": [base64.b64encode(b).decode() for b in pngs],
        "data url": ["data:image/png;base64," + base64.b64encode(b).decode() for b in pngs],
        "NHWC array": np.stack(pixels),
        "HWC arrays": list(pixels),
        "nested lists (JSON)": [p.tolist() for p in pixels],
        "DataFrame column image": pd.DataFrame({"image": pngs, "id": [1, 2]}),
        "DataFrame of one column": pd.DataFrame({"whatever": pngs}),
        "Series": pd.Series(pngs),
        "dict": {"image": pngs},
    }
    for name, model_input in forms.items():
        assert torch.equal(classifier.images(model_input), expected), name
    assert torch.equal(classifier.images(pngs[0]), expected[:1])  # one item alone
    assert torch.equal(classifier.images(pixels[0]), expected[:1])


def test_images_go_through_the_eval_transform_at_the_eval_crop(classifier):
    big = _pixels(2, size=48)  # not 32x32: the CIFAR eval transform resizes it
    expected = make_transform("cifar", train=False, crop=32).sample(_png(big), random.Random(0))
    assert classifier.crop == 32
    assert torch.equal(classifier.images([_png(big)])[0], expected)
    assert torch.equal(classifier.images([big])[0], expected)  # arrays exactly as stored pixels


def test_the_answer_is_the_models_top5_with_names(classifier):
    pngs = [_png(_pixels(i)) for i in range(3)]
    answer = classifier.predict(pngs)

    x = normalizer("cifar")(classifier.images(pngs)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        probs = classifier.bundle.model(x).softmax(1)
    top = probs.topk(5, dim=1)
    assert list(answer.columns) == ["indices", "classes", "probabilities"]
    assert answer["indices"].tolist() == top.indices.tolist()
    assert answer["classes"].tolist() == [[CLASSES[i] for i in row] for row in top.indices.tolist()]
    assert answer["probabilities"].tolist() == [[round(float(p), 6) for p in row]
                                                for row in top.values.tolist()]
    assert "..." not in repr(answer) and CLASSES[top.indices[0, 0]] in repr(answer)  # printed whole


@pytest.mark.parametrize("model_input, message", [
    ([], "no images in the request"),
    ([b"hello"], "image 0: 5 bytes in no image format Pillow reads; send JPEG or PNG bytes"),
    ([_png(_pixels(0)), b"\x89PNG\r\n\x1a\n broken"], "image 1: "),
    (["abc"], "image 0: a string that is not base64"),
    ([np.zeros((4, 4), dtype=np.uint8)], "image 0: an array of shape (4, 4); send (H, W, 3) uint8"),
    ([np.zeros((4, 4, 4), dtype=np.uint8)], "image 0: an array of shape (4, 4, 4)"),
    ([np.zeros((4, 4, 3), dtype=np.float32)], "image 0: float32 pixels; send uint8 values 0..255"),
    ([[[[300, 0, 0]]]], "image 0: int64 pixels; send uint8 values 0..255"),
    ([{"a": 1}], "image 0: a dict; send (H, W, 3) uint8 RGB pixels"),
    (np.zeros((2, 2), dtype=np.uint8), "an array of shape (2, 2); send (H, W, 3) or (N, H, W, 3)"),
    (pd.DataFrame({"a": [b""], "b": [b""]}), "a DataFrame of columns ['a', 'b']; put the images in "
                                              "a column named 'image'"),
    ({"a": [], "b": []}, "a mapping with keys ['a', 'b']; send {'image': [images]}"),
])
def test_a_bad_item_is_refused_with_one_line_naming_it(classifier, model_input, message):
    with pytest.raises(RequestError) as err:
        classifier.predict(model_input)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(classifier):
    from untrusted import png_bomb

    with pytest.raises(RequestError) as err:
        classifier.predict([_png(_pixels(0)), png_bomb()])
    assert str(err.value) == ("image 1: too large: 13000x13000 pixels (169.0 Mpx), above "
                              "data.max_pixels=50000000; send an image of at most 50000000 pixels")
    with pytest.raises(RequestError, match=r"image 0: too large: 8000x7000 pixels \(56\.0 Mpx\)"):
        classifier.images(np.broadcast_to(np.zeros(3, dtype=np.uint8), (7000, 8000, 3)))
