"""Every image mode Pillow opens becomes the right 8-bit RGB, through every decode path and the build.

Each case is an image of four vertical stripes (32 px each, 128 x 32) in one mode, saved in a
format that keeps that mode; the expected RGB of each stripe is computed here from the stripe's
values, independently of ran.data.transforms.to_rgb.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from ran.data.read import verify_shards
from ran.data.transforms import decode_full, decode_region
from ran.data.write import build_shards

W, H, STRIPE = 128, 32, 32
PALETTE = [0, 0, 0, 250, 10, 10, 10, 250, 10, 10, 10, 250]
WHITE = 255


def grey(*levels):
    return [(v, v, v) for v in levels]


def over_white(colour, alpha):
    """A colour of the given alpha composited over white."""
    return tuple(round((c * alpha + WHITE * (255 - alpha)) / 255) for c in colour)


def cmyk_to_rgb(c, m, y, k):
    return tuple(round((255 - v) * (255 - k) / 255) for v in (c, m, y))


def pillow_rgb(mode, value):
    """Pillow's own conversion of one pixel (the reference for LAB and YCbCr colour spaces)."""
    return tuple(Image.new(mode, (1, 1), value).convert("RGB").getpixel((0, 0)))


def striped(mode, values, palette=None):
    image = Image.new(mode, (W, H))
    if palette:
        image.putpalette(palette + [0] * (768 - len(palette)))
    for i, value in enumerate(values):
        image.paste(value, (i * STRIPE, 0, (i + 1) * STRIPE, H))
    return image


def from_array(values, dtype, mode=None):
    row = np.repeat(np.array(values, dtype=dtype), STRIPE)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (H, W))), mode)


def encode(image, fmt, **params):
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def pgm16(values):
    """A 16-bit binary PGM (maxval 65535), which Pillow opens as mode I."""
    pixels = np.broadcast_to(np.repeat(np.array(values, dtype=">u2"), STRIPE), (H, W))
    return f"P5\n{W} {H}\n65535\n".encode() + pixels.tobytes()


RAMP16 = [0, 1000, 41610, 65535]  # 41610 is column 40 of a 64-wide 0..65535 ramp: 41610 >> 8 = 162
RGBA = [(255, 0, 0, 255), (0, 255, 0, 128), (0, 0, 255, 0), (90, 120, 30, 64)]
CMYK = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 128, 255, 64), (30, 60, 90, 120)]
LAB = [(0, 128, 128), (128, 128, 128), (200, 180, 90), (255, 128, 128)]
YCBCR = [(16, 128, 128), (120, 90, 200), (200, 160, 60), (235, 128, 128)]

# name -> (mode Pillow opens, bytes, expected RGB per stripe, tolerance per channel)
CASES = {
    "1": ("1", encode(striped("1", [0, 1, 1, 0]), "PNG"), grey(0, 255, 255, 0), 0),
    "L": ("L", encode(striped("L", [0, 60, 200, 255]), "PNG"), grey(0, 60, 200, 255), 0),
    "L jpeg": ("L", encode(striped("L", [0, 60, 200, 255]), "JPEG", quality=95), grey(0, 60, 200, 255), 3),
    "RGB": ("RGB", encode(striped("RGB", [c[:3] for c in RGBA]), "PNG"), [c[:3] for c in RGBA], 0),
    "RGB jpeg": ("RGB", encode(striped("RGB", [c[:3] for c in RGBA]), "JPEG", quality=95, subsampling=0),
                 [c[:3] for c in RGBA], 4),
    "P": ("P", encode(striped("P", [0, 1, 2, 3], PALETTE), "PNG"),
          [tuple(PALETTE[3 * i:3 * i + 3]) for i in range(4)], 0),
    "P+transparency": ("P", encode(striped("P", [0, 1, 2, 3], PALETTE), "PNG", transparency=1),
                       [(0, 0, 0), (WHITE,) * 3, (10, 250, 10), (10, 10, 250)], 0),
    "P+transparency gif": ("P", encode(striped("P", [0, 1, 2, 3], PALETTE), "GIF", transparency=1),
                           [(0, 0, 0), (WHITE,) * 3, (10, 250, 10), (10, 10, 250)], 0),
    "PA": ("PA", encode(striped("PA", [(1, 255), (2, 128), (3, 0), (1, 64)], PALETTE), "TIFF"),
           [over_white((250, 10, 10), 255), over_white((10, 250, 10), 128), (WHITE,) * 3,
            over_white((250, 10, 10), 64)], 1),
    "LA": ("LA", encode(striped("LA", [(0, 255), (100, 128), (200, 0), (50, 64)]), "PNG"),
           [over_white((v,) * 3, a) for v, a in [(0, 255), (100, 128), (200, 0), (50, 64)]], 1),
    "RGBA": ("RGBA", encode(striped("RGBA", RGBA), "PNG"), [over_white(c[:3], c[3]) for c in RGBA], 1),
    "RGBA webp": ("RGBA", encode(striped("RGBA", RGBA), "WEBP", lossless=True, exact=True),
                  [over_white(c[:3], c[3]) for c in RGBA], 1),
    "CMYK": ("CMYK", encode(striped("CMYK", CMYK), "TIFF"), [cmyk_to_rgb(*c) for c in CMYK], 1),
    "CMYK jpeg": ("CMYK", encode(striped("CMYK", CMYK), "JPEG", quality=95), [cmyk_to_rgb(*c) for c in CMYK], 6),
    "I;16": ("I;16", encode(from_array(RAMP16, np.uint16), "PNG"), grey(0, 3, 162, 255), 0),
    "I;16 tiff": ("I;16", encode(from_array(RAMP16, np.uint16), "TIFF"), grey(0, 3, 162, 255), 0),
    "I;16B": ("I;16B", encode(from_array(RAMP16, ">u2"), "TIFF"), grey(0, 3, 162, 255), 0),
    "I": ("I", encode(from_array(RAMP16, np.int32), "TIFF"), grey(0, 3, 162, 255), 0),
    "I pgm": ("I", pgm16(RAMP16), grey(0, 3, 162, 255), 0),
    "F": ("F", encode(from_array([0.0, 0.25, 0.5, 1.0], np.float32), "TIFF"), grey(0, 64, 128, 255), 0),
    "LAB": ("LAB", encode(striped("LAB", LAB), "TIFF"), [pillow_rgb("LAB", v) for v in LAB], 1),
    "YCbCr": ("YCbCr", encode(striped("YCbCr", YCBCR), "TIFF"), [pillow_rgb("YCbCr", v) for v in YCBCR], 1),
}


def full(data):
    """Whole image, full size: stripe i at column 32 i + 16."""
    return decode_full(data), [STRIPE * i + STRIPE // 2 for i in range(4)]


def region(data):
    """Stripes 1..3 cut out at full size (no resize): stripe i at column 32 (i - 1) + 16."""
    out = decode_region(data, lambda w, h: (STRIPE, 0, 3 * STRIPE, h), (H, 3 * STRIPE))
    return out, [None] + [STRIPE * i + STRIPE // 2 for i in range(3)]


def reduced(data):
    """Whole image at 1/8 size (JPEGs: decoded at 1/8 DCT scale): stripe i at columns 4 i + 1..2."""
    out = decode_region(data, lambda w, h: (0, 0, w, h), (H // 8, W // 8))
    return out, [4 * i + 1 for i in range(4)]


PATHS = {"full": full, "region": region, "reduced": reduced}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_every_mode_decodes_to_the_right_rgb_on_every_path(case, path):
    mode, data, expected, tolerance = CASES[case]
    assert Image.open(io.BytesIO(data)).mode == mode  # the case really is in that mode
    out, columns = PATHS[path](data)
    assert out.dtype.is_floating_point is False and out.shape[0] == 3
    for stripe, column in enumerate(columns):
        if column is None:
            continue
        got = out[:, out.shape[1] // 2, column].tolist()
        assert max(abs(g - e) for g, e in zip(got, expected[stripe])) <= tolerance, (stripe, got, expected[stripe])
        if path == "reduced":  # the neighbour column is inside the same stripe too
            neighbour = out[:, out.shape[1] // 2, column + 1].tolist()
            assert max(abs(g - e) for g, e in zip(neighbour, expected[stripe])) <= tolerance + 1


def test_a_16_bit_ramp_keeps_its_top_8_bits():
    ramp = np.round(np.arange(64) * 65535 / 63).astype(np.uint16)
    data = encode(Image.fromarray(np.repeat(ramp[None], 8, axis=0)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = decode_full(data)
    assert pixels[:, 3, 40].tolist() == [162, 162, 162]
    assert pixels[0, 3].tolist() == (ramp >> 8).tolist()  # every column, not almost all 255


EXT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp", "PPM": ".pgm"}
AS_IS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "PPM": "ppm"}  # the rest is re-encoded as PNG


def shard_samples(out, manifest):
    """{key: {ext: bytes}} of every train shard, read with the standard library."""
    samples = {}
    for shard in manifest["splits"]["train"]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_every_mode_survives_the_build_and_verify(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    keys = {}
    for name, (_, data, _, _) in CASES.items():
        fmt = Image.open(io.BytesIO(data)).format
        keys[name] = "modes/" + name.replace(" ", "_").replace(";", "").replace("+", "_")
        path = src / (keys[name] + EXT[fmt])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = build_shards("imagefolder", str(src), str(out), workers=1, progress=False)
    assert manifest["skipped"] == []
    assert manifest["splits"]["train"]["total"] == len(CASES)
    assert verify_shards(str(out), workers=1, progress=False, out=io.StringIO())
    stored = shard_samples(out, manifest)
    for name, (mode, data, expected, tolerance) in CASES.items():
        fmt = Image.open(io.BytesIO(data)).format
        (ext, encoded), = [(k, v) for k, v in stored[keys[name]].items() if k != "cls"]
        if fmt in AS_IS:
            assert (ext, encoded) == (AS_IS[fmt], data), name  # stored as it is
        else:  # TIFF, GIF: lossless PNG, in the same mode where PNG holds it
            assert ext == "png", name
            kept = Image.open(io.BytesIO(encoded)).mode
            assert kept == {"I;16B": "I;16", "I": "I;16", "PA": "RGBA", "CMYK": "RGB", "F": "RGB",
                            "LAB": "RGB", "YCbCr": "RGB"}.get(mode, mode), name
        pixels, columns = full(encoded)
        for stripe, column in enumerate(columns):
            got = pixels[:, H // 2, column].tolist()
            assert max(abs(g - e) for g, e in zip(got, expected[stripe])) <= tolerance, (name, stripe, got)


def test_pixels_without_an_8_bit_form_are_refused_at_build_time(tmp_path):
    hdr = from_array([0.0, 0.5, 2.5, 1.0], np.float32)  # float pixels above 1.0
    signed = from_array([-5, 0, 100, 70000], np.int32)  # 32-bit integers outside 0..65535
    (tmp_path / "src" / "a").mkdir(parents=True)
    hdr.save(tmp_path / "src" / "a" / "hdr.tif")
    signed.save(tmp_path / "src" / "a" / "signed.tif")
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "a" / "fine.png")
    manifest = build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), workers=1,
                            progress=False)
    assert manifest["splits"]["train"]["total"] == 1
    reasons = {os.path.basename(s["path"]): s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "hdr.tif": "cannot convert to 8-bit RGB: F pixels span 0..2.5, outside 0..1: no defined 8-bit "
                   "form; save the image as 8- or 16-bit",
        "signed.tif": "cannot convert to 8-bit RGB: I pixels span -5..70000, outside 0..65535: no defined "
                      "8-bit form; save the image as 8- or 16-bit",
    }
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == manifest["skipped"]
