"""Train and eval transforms per recipe (PAPER.md, "Training recipes"), kept uint8 until the device.

A transform has two steps: ``sample(data, rng)`` decodes one encoded image straight to a uint8
``(3, crop, crop)`` tensor (cropping before resizing, and decoding JPEGs at a reduced DCT scale when
the crop allows), and ``batch(images, rng)`` applies what is cheaper on a whole uint8 batch (the
CIFAR pad-and-crop). Whatever the file's mode (16-bit, float, palette, alpha, CMYK, 1-bit...), every
decode path turns it into 8-bit RGB through the one function :func:`to_rgb`. The
float conversion and mean/std normalisation happen last, on the training device, with
:func:`normalizer`.

- ImageNet train: random-resized crop (scale 0.08-1, ratio 3/4-4/3), horizontal flip, and the
  standard PCA lighting colour augmentation (AlexNet; std 0.1).
- ImageNet eval: resize the short side to ``crop / 0.875``, centre crop ``crop`` (224; 320 for
  Attention-92).
- CIFAR train: zero-pad 4 px, random ``crop`` (32) crop, horizontal flip. CIFAR eval: the image.
"""

from __future__ import annotations

import io
import math
import random
import re
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ran.data import DEFAULT_MAX_PIXELS

# The pixel cap below (data.max_pixels) decides which images are decoded, well under Pillow's
# limits: its warning between 89 and 179 Mpx would only repeat what the cap already refused.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Same values as ran.models.registry; ran.data does not depend on ran.models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

RECIPES = ("imagenet", "cifar")
EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize to crop / 0.875, then centre crop
TRAIN_CROP = {"imagenet": 224, "cifar": 32}  # data.crop unset; the eval crop: ran.runtime.eval_crop

# PCA of ImageNet RGB pixels (Krizhevsky et al. 2012), as used by fb.resnet.torch.
_LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
_LIGHTING_EIGVEC = (  # rows: R, G, B; columns: principal components
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

_quiet_readonly: set[str] = set()


def _readonly_tensor(make: Callable[[], torch.Tensor], kind: str) -> torch.Tensor:
    """Wrap read-only memory (bytes, PIL arrays) without torch's once-per-process warnings.

    We only ever read these tensors. Torch warns once per process and kind (numpy, buffer), so
    only the first call of each kind needs the (slow) warnings context.
    """
    if kind in _quiet_readonly:
        return make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensor = make()
    _quiet_readonly.add(kind)
    return tensor


class ImageTooLarge(ValueError):
    """An image whose header gives more pixels than the cap (``data.max_pixels``); never decoded."""


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Raise :class:`ImageTooLarge` if a ``width`` x ``height`` image is over ``max_pixels``
    (None: no cap). The message gives the size, e.g. ``13000x13000 pixels (169.0 Mpx), above
    data.max_pixels=50000000``."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} pixels ({width * height / 1e6:.1f} Mpx), above "
                            f"data.max_pixels={max_pixels}")


def open_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``data`` opened by Pillow with only its header read, its size checked against ``max_pixels``
    before anything is decoded.

    Raises:
        ImageTooLarge: over the cap (or over Pillow's own bomb limit).
        PIL.UnidentifiedImageError: not an image format Pillow reads.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.1f} Mpx" if found else "more pixels than Pillow allows"
        raise ImageTooLarge(f"{size}, above data.max_pixels={max_pixels}") from None
    check_pixels(image.size[0], image.size[1], max_pixels)
    return image


class PixelRangeError(ValueError):
    """Pixels outside the range the 8-bit conversion defines (32-bit int or float images)."""


_HIGH_DEPTH = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_BACKGROUND = (255, 255, 255, 255)  # transparent pixels are shown over white, as on a page


def _to_uint8(array: np.ndarray, mode: str, strict: bool) -> np.ndarray:
    """16-bit and 32-bit greyscale -> uint8: integers keep their top 8 of 16 bits (``v >> 8``),
    floats map 0.0..1.0 to 0..255. Outside those ranges: PixelRangeError if ``strict``, else clipped."""
    if mode == "F":
        low, high = 0.0, 1.0
        bad = not np.isfinite(array).all()
    else:
        low, high = 0, 65535
        bad = False
    if strict and (bad or array.min(initial=low) < low or array.max(initial=high) > high):
        finite = array[np.isfinite(array)] if mode == "F" else array
        lo, hi = (finite.min(), finite.max()) if finite.size else (float("nan"),) * 2
        raise PixelRangeError(f"{mode} pixels span {lo:g}..{hi:g}, outside {low:g}..{high:g}: no defined "
                              "8-bit form; save the image as 8- or 16-bit")
    if mode == "F":
        return np.rint(np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    return (np.clip(array.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def to_rgb(image: Image.Image, strict: bool = False) -> Image.Image:
    """Any Pillow image -> 8-bit ``RGB``: the one conversion every decode path (and the build) uses.

    - ``RGB``: as it is. ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``:
      Pillow's conversion (CMYK: ``(255 - C)(255 - K) / 255``, as libjpeg and torchvision).
    - 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit ``I``: the value
      shifted to 8 bits (``v >> 8``; Pillow opens 16-bit PGMs as ``I``). ``F``: 0.0..1.0 -> 0..255.
      Values outside those ranges raise :class:`PixelRangeError` if ``strict`` (the build refuses
      such files), else they are clipped.
    - Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, and ``P``/``L``/``RGB``
      with a transparent colour): composited over white, so hidden pixels never show.

    Raises ValueError for a mode Pillow cannot convert. The image is loaded (decoded) if it was not.
    """
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return image
    if mode in _HIGH_DEPTH:
        array = np.asarray(image)
        grey = Image.fromarray(_to_uint8(array, mode, strict), "L")
        if transparency is not None and mode != "F":  # a 16-bit tRNS grey level
            grey.paste(255, mask=Image.fromarray((array == transparency).astype(np.uint8) * 255, "L"))
        return grey.convert("RGB")
    if mode in _ALPHA or transparency is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, _BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")


def _pixels(image: Image.Image) -> torch.Tensor:
    """CHW uint8 view of a decoded RGB image (HWC memory)."""
    array = np.asarray(image)  # a read-only array over a fresh copy of the pixels; we only read it
    return _readonly_tensor(lambda: torch.from_numpy(array), "numpy").permute(2, 0, 1)


def _decode_jpeg(data: bytes) -> torch.Tensor:
    """Full-size JPEG decode straight into a CHW tensor (HWC memory), skipping PIL's extra copy."""
    buffer = _readonly_tensor(lambda: torch.frombuffer(data, dtype=torch.uint8), "buffer")
    try:
        return decode_jpeg(buffer, mode=ImageReadMode.RGB)
    except RuntimeError as exc:  # "decode_jpeg, <source path>:<line>, <reason>"
        raise ValueError(f"corrupt JPEG: {str(exc).rsplit(', ', 1)[-1]}") from None


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        from ran.data import DataError

        raise DataError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    return recipe


def train_crop(recipe: str) -> int:
    """The recipe's train crop when ``data.crop`` is unset (224 ImageNet, 32 CIFAR). Not the eval
    crop, which is the model's (:func:`ran.runtime.eval_crop`: 320 for Attention-92)."""
    return TRAIN_CROP[check_recipe(recipe)]


class Normalizer:
    """uint8 NCHW batch on any device -> float32, scaled to [0, 1] and mean/std normalised."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std) * 255.0)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        stats = self._cache.get(images.device)
        if stats is None:
            stats = (self.mean.to(images.device).view(1, -1, 1, 1),
                     self.inv_std.to(images.device).view(1, -1, 1, 1))
            self._cache[images.device] = stats
        mean, inv_std = stats
        return images.float().sub_(mean).mul_(inv_std)  # one float allocation


def normalizer(recipe: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The last step of every pipeline: ImageNet or CIFAR mean/std, applied on the device."""
    if check_recipe(recipe) == "imagenet":
        return Normalizer(IMAGENET_MEAN, IMAGENET_STD)
    return Normalizer(CIFAR_MEAN, CIFAR_STD)


# ---------------------------------------------------------------------------------------------
# Decoding


def _draft_scale(region_w: float, region_h: float, out_w: int, out_h: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) that keeps the region at least the output size."""
    factor = min(region_w / out_w, region_h / out_h)
    scale = 1
    while scale < 8 and scale * 2 <= factor:
        scale *= 2
    return scale


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None if ``data`` is not a parsable JPEG."""
    frame = jpeg_frame(data)
    return None if frame is None else frame[:2]


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header (components: 1 grey, 3 YCbCr or
    RGB, 4 CMYK or YCCK), or None if ``data`` is not a parsable JPEG."""
    header = jpeg_header(data)
    return None if header is None else header[:3]


def jpeg_header(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(width, height, components, SOF marker, bits per sample) from a JPEG's frame header, or
    None if ``data`` is not a parsable JPEG. Markers: 0xC0 baseline, 0xC1 extended, 0xC2
    progressive, 0xC3 lossless, 0xC9-0xCB and 0xCD-0xCF arithmetic-coded."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end = 2, len(data)
    while pos + 9 < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF_MARKERS:
            height, width = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            components = data[pos + 9]
            return (width, height, components, marker, data[pos + 4]) if width and height else None
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xDA:  # scan data before any frame header: not a JPEG we understand
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def decode_region(data: bytes, region: Callable[[int, int], tuple[int, int, int, int]],
                  size: tuple[int, int], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode ``data`` and resize the box ``region(width, height) -> (left, top, w, h)`` to ``size``.

    Returns a uint8 ``(3, size[0], size[1])`` tensor. JPEGs whose box is at least twice the output
    size are decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling), which is much cheaper than a
    full decode followed by a downscale. Every mode becomes RGB through :func:`to_rgb`; full-size
    grey and YCbCr JPEGs are decoded by libjpeg straight to RGB (the same values, one copy less).
    Raises :class:`ImageTooLarge` (from the header, before any decode) over ``max_pixels``.
    """
    jpeg = jpeg_frame(data)
    if jpeg is not None:
        width, height, components = jpeg
        check_pixels(width, height, max_pixels)
        left, top, w, h = region(width, height)
        scale = _draft_scale(w, h, size[1], size[0])
    if jpeg is not None and scale == 1 and components in (1, 3):
        pixels = _decode_jpeg(data)
    else:
        image = open_image(data, max_pixels)  # reads the header only
        if jpeg is None:
            width, height = image.size
            left, top, w, h = region(width, height)
            scale = 1
        if scale > 1:
            image.draft("RGB", (width // scale, height // scale))
            sx, sy = width / image.size[0], height / image.size[1]
            left, top = int(left / sx), int(top / sy)
            w, h = max(1, round(w / sx)), max(1, round(h / sy))
            w, h = min(w, image.size[0] - left), min(h, image.size[1] - top)
        pixels = _pixels(to_rgb(image))
    pixels = pixels[:, top:top + h, left:left + w]
    if (h, w) == tuple(size):
        return pixels.contiguous()
    return F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0]


def decode_full(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode ``data`` (any format and mode Pillow opens) to a uint8 ``(3, H, W)`` RGB tensor.

    The first frame of animated or multi-page files; modes become RGB through :func:`to_rgb`.
    Raises PIL.UnidentifiedImageError for data that is not an image, OSError for a broken one,
    :class:`ImageTooLarge` (from the header, nothing decoded) over ``max_pixels``.
    """
    return _pixels(to_rgb(open_image(data, max_pixels))).contiguous()


def check_image(data: bytes, strict: bool = True,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode all of ``data`` as the readers will, cheaply: (loaded image, (width, height)).

    JPEGs are decoded at 1/8 scale (every entropy-coded byte is still read, so truncation shows),
    other formats at full size; the size returned is the source's. The pixels go through
    :func:`to_rgb` (``strict``: pixels without a defined 8-bit form raise PixelRangeError); the
    image returned keeps its own mode and ``format``. Raises PIL.UnidentifiedImageError, OSError
    or ValueError with the reason; :class:`ImageTooLarge` (a ValueError) over ``max_pixels``,
    judged from the header before anything is decoded.
    """
    image = open_image(data, max_pixels)
    size = image.size
    if image.format in ("JPEG", "MPO"):
        image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
    image.load()
    to_rgb(image, strict=strict)
    return image, size


def random_resized_box(width: int, height: int, rng: random.Random,
                       scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, w, h): area fraction in ``scale``, aspect in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback as torchvision: the whole image, cut to the nearest allowed aspect ratio.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_box(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
    """Centred square whose side is ``fraction`` of the short side."""
    side = max(1, int(round(min(width, height) * fraction)))
    return (width - side) // 2, (height - side) // 2, side, side


# ---------------------------------------------------------------------------------------------
# Transforms


def add_saturating(images: torch.Tensor, offsets: torch.Tensor) -> None:
    """``images += offsets`` in place on uint8, clipped to 0..255 without a wider copy.

    ``offsets`` is an integer tensor that broadcasts against ``images`` (e.g. ``(N, 3, 1, 1)``:
    one shift per image and channel).
    """
    offsets = offsets.to(torch.int16)
    up = offsets.clamp(0, 255).to(torch.uint8)
    down = offsets.neg().clamp(0, 255).to(torch.uint8)
    torch.minimum(images, 255 - up, out=images)
    images.add_(up)
    torch.maximum(images, down, out=images)
    images.sub_(down)


class ImageNetTrain:
    """Random-resized crop and flip per sample; PCA lighting per batch."""

    def __init__(self, crop: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), lighting: float = 0.1,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.crop, self.scale, self.ratio, self.lighting = crop, scale, ratio, lighting
        self.max_pixels = max_pixels

    def sample(self, data: bytes, rng: random.Random) -> torch.Tensor:
        image = decode_region(data, lambda w, h: random_resized_box(w, h, rng, self.scale, self.ratio),
                              (self.crop, self.crop), self.max_pixels)
        if rng.random() < 0.5:
            image = image.flip(-1)
        return image

    def lighting_offsets(self, rng: random.Random) -> list[int]:
        """AlexNet's colour augmentation: RGB shift along the principal components, in 0..255 units."""
        alpha = [rng.gauss(0.0, self.lighting) * value for value in _LIGHTING_EIGVAL]
        return [round(255.0 * sum(v * a for v, a in zip(row, alpha))) for row in _LIGHTING_EIGVEC]

    def batch(self, images: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """The lighting shift, one per image and channel, over the whole batch at once (five
        times cheaper than per sample on the strided HWC crops)."""
        if self.lighting > 0:
            offsets = [self.lighting_offsets(rng) for _ in range(len(images))]
            add_saturating(images, torch.tensor(offsets, dtype=torch.int16)[:, :, None, None])
        return images


class ImageNetEval:
    """Resize to ``crop / 0.875`` then centre crop ``crop`` (done as crop-then-resize)."""

    def __init__(self, crop: int, fraction: float = EVAL_CROP_FRACTION,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.crop, self.fraction, self.max_pixels = crop, fraction, max_pixels

    def sample(self, data: bytes, rng: random.Random) -> torch.Tensor:
        return decode_region(data, lambda w, h: center_box(w, h, self.fraction), (self.crop, self.crop),
                             self.max_pixels)

    def batch(self, images: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return images


class CifarTrain:
    """Zero-pad ``crop // 8`` px (4 at 32), random ``crop`` crop, horizontal flip."""

    def __init__(self, crop: int = 32, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.crop, self.pad, self.max_pixels = crop, max(1, crop // 8), max_pixels

    def sample(self, data: bytes, rng: random.Random) -> torch.Tensor:
        return _decode_at(data, self.crop, self.max_pixels)

    def batch(self, images: torch.Tensor, rng: random.Random) -> torch.Tensor:
        n, pad, crop = len(images), self.pad, self.crop
        padded = images.new_zeros((n, 3, crop + 2 * pad, crop + 2 * pad))
        padded[:, :, pad:pad + crop, pad:pad + crop] = images
        for i in range(n):
            y, x = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
            window = padded[i, :, y:y + crop, x:x + crop]
            images[i] = window.flip(-1) if rng.random() < 0.5 else window
        return images


class CifarEval:
    """The image itself (resized only if it is not ``crop`` x ``crop``)."""

    def __init__(self, crop: int, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.crop, self.max_pixels = crop, max_pixels

    def sample(self, data: bytes, rng: random.Random) -> torch.Tensor:
        return _decode_at(data, self.crop, self.max_pixels)

    def batch(self, images: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return images


def _decode_at(data: bytes, crop: int, max_pixels: int | None) -> torch.Tensor:
    image = decode_full(data, max_pixels)
    if image.shape[1:] != (crop, crop):
        image = F.interpolate(image[None], size=(crop, crop), mode="bilinear", antialias=True,
                              align_corners=False)[0]
    return image


Transform = ImageNetTrain | ImageNetEval | CifarTrain | CifarEval


def make_transform(recipe: str, *, train: bool, crop: int | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Transform:
    """The train or eval transform of a recipe ("imagenet" or "cifar") at ``crop`` pixels; images
    over ``max_pixels`` (``data.max_pixels``) raise :class:`ImageTooLarge` undecoded.

    ``crop``: None trains at the recipe's :func:`train_crop`; an eval transform has no default,
    since a model's eval crop is its own (:func:`ran.runtime.eval_crop`: 320 for Attention-92).

    Raises:
        ValueError: an eval transform without its crop.
    """
    check_recipe(recipe)
    if crop is None and not train:
        raise ValueError(f"the {recipe} eval transform needs its crop: the model's eval crop "
                         "(ran.runtime.eval_crop), never a recipe default")
    crop = crop or train_crop(recipe)
    if recipe == "imagenet":
        return (ImageNetTrain(crop, max_pixels=max_pixels) if train
                else ImageNetEval(crop, max_pixels=max_pixels))
    return CifarTrain(crop, max_pixels) if train else CifarEval(crop, max_pixels)
