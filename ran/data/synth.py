"""A procedurally generated image dataset that small networks learn quickly (the demo, the tests).

Each class is a combination of a shape (disc, square, triangle, ring, cross, diamond), a texture
(solid, stripes, checks, dots) and a hue. Every image draws its position, size, rotation,
background, colour jitter and pixel noise at random, so the task takes some learning but a tiny
CNN beats chance within seconds.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np

from ran.data import storage
from ran.data.write import Item, Source, write_dataset

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
TEXTURES = ("solid", "stripes", "checks", "dots")
SYNTH_SAMPLES_PER_SHARD = 1000


def class_names(classes: int) -> list[str]:
    return [f"{c:02d}-{SHAPES[c % len(SHAPES)]}-{TEXTURES[(c // len(SHAPES)) % len(TEXTURES)]}"
            for c in range(classes)]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape of radius ~1 in rotated, scaled coordinates (u, v)."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return (v >= -0.6) & (v <= 1.0 - 1.8 * np.abs(u))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.35)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    return np.abs(u) + np.abs(v) <= 1.0  # diamond


def _texture(texture: str, u: np.ndarray, v: np.ndarray, hue: float) -> np.ndarray:
    """Brightness pattern in [0, 1] over the shape; its orientation depends on the class hue."""
    if texture == "solid":
        return np.ones_like(u)
    angle = hue * np.pi
    a = u * np.cos(angle) + v * np.sin(angle)
    b = -u * np.sin(angle) + v * np.cos(angle)
    if texture == "stripes":
        return (np.sin(a * 3 * np.pi) > 0).astype(np.float32)
    if texture == "checks":
        return ((np.floor(a * 2) + np.floor(b * 2)) % 2).astype(np.float32)
    return ((np.mod(a * 2, 1) - 0.5) ** 2 + (np.mod(b * 2, 1) - 0.5) ** 2 < 0.1).astype(np.float32)


def render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One HWC uint8 image of class ``label``."""
    shape = SHAPES[label % len(SHAPES)]
    texture = TEXTURES[(label // len(SHAPES)) % len(TEXTURES)]
    hue = (label * 0.381966) % 1.0  # golden-ratio spacing keeps neighbouring classes apart in hue
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    radius = rng.uniform(0.2, 0.34)
    theta = rng.uniform(-0.4, 0.4)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    inside = _shape_mask(shape, u, v)

    background = rng.uniform(0.1, 0.9) + rng.normal(0, 0.05, 3)
    gradient = rng.normal(0, 0.15) * (x - 0.5) + rng.normal(0, 0.15) * (y - 0.5)
    image = np.clip(background[None, None, :] + gradient[..., None], 0, 1)
    colour = np.array(colorsys.hsv_to_rgb((hue + rng.normal(0, 0.02)) % 1.0,
                                          rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
    shade = 0.55 + 0.45 * _texture(texture, u, v, hue)
    foreground = colour[None, None, :] * shade[..., None]
    image = np.where(inside[..., None], foreground, image)
    image = image * 255 + rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def synthesize(classes: int, count: int, size: int, rng: np.random.Generator,
               split: str) -> list[Item]:
    """``count`` images, classes balanced (round robin)."""
    return [Item(f"{split}/{i:06d}", i % classes, pixels=render(i % classes, size, rng))
            for i in range(count)]


def write_synthetic(output: str, *, classes: int = 10, train: int = 2000, val: int = 500,
                    size: int = 32, seed: int = 0, samples_per_shard: int = SYNTH_SAMPLES_PER_SHARD,
                    workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Write a synthetic dataset as shards + manifest under ``output`` and return the manifest."""
    from ran.data import DataError

    if classes < 2 or train < classes or val < 0 or size < 8:
        raise DataError(f"synthetic dataset needs classes >= 2, train >= classes, val >= 0 and size >= 8 "
                        f"(got classes={classes}, train={train}, val={val}, size={size})")
    storage.check_writable(output)  # before spending time on the images
    splits = {"train": synthesize(classes, train, size, np.random.default_rng([seed, 0]), "train")}
    if val:
        splits["val"] = synthesize(classes, val, size, np.random.default_rng([seed, 1]), "val")
    source = Source("synthetic", class_names(classes), splits)
    return write_dataset(source, output, source="synth", samples_per_shard=samples_per_shard,
                         seed=seed, workers=workers, progress=progress,
                         options={"size": size})
