"""Serving a trained model on images: the ``python_function`` of every model ``ran train`` logs.

``mlflow.pyfunc.load_model("models:/NAME@champion")`` and ``mlflow models serve -m
models:/NAME@champion --env-manager local`` load it through :func:`_load_pyfunc` (MLflow imports
this module by name, so ``ran`` must be installed where the model is served). It takes what a
client has, one image per item:

- encoded image bytes (JPEG, PNG, any format Pillow reads), raw or base64 strings (what JSON
  carries; ``data:image/...;base64,`` prefixes are accepted);
- uint8 pixel arrays of shape ``(H, W, 3)`` (RGB), or a batch ``(N, H, W, 3)``; nested lists of
  integers 0..255 (JSON) are arrays too.

given as a list, a single item, a pandas DataFrame or Series (column ``image``, or the only
column), or a dict ``{"image": [...]}``. The model is a :class:`ran.runtime.ModelBundle`: every
image goes through its eval transform (at the crop training validated at; arrays exactly as the
same pixels stored losslessly would) and its ``predict`` (the normalisation, memory format and
precision training validated with). The answer is a DataFrame, one row per image:
``indices``, ``classes`` (names) and ``probabilities`` of the top ``min(5, classes)``, best first.

Over HTTP (``POST /invocations``, ``Content-Type: application/json``)::

    {"inputs": ["<base64 JPEG>", ...]}     ->  {"predictions": [{"indices": [...], ...}, ...]}

A request that is not an image, or an array of the wrong shape or type, is answered with HTTP 400
and one line naming the item and what to send instead; the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from ran.data.transforms import ImageTooLarge, check_pixels, to_rgb
from ran.runtime import ModelBundle
from ran.tracking.models import request_error

TOP_K = 5  # classes answered per image (fewer when the model has fewer)
IMAGE_COLUMN = "image"  # the column (or dict key) that holds the images


class RequestError(ValueError):
    """A request item that is not an image this model can read; the message says what to send."""


class ImageClassifier:
    """A model bundle (:class:`ran.runtime.ModelBundle`) answering requests: images in, top-k
    classes out. Class names default to ``"class <i>"`` where the bundle has none."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        outputs = int(bundle.config.model.num_classes or len(bundle.class_names or []))
        self.class_names = bundle.class_names or [f"class {i}" for i in range(outputs)]
        self.k = min(TOP_K, outputs)

    @property
    def crop(self) -> int:
        """The eval crop every image is brought to."""
        return self.bundle.crop

    # -- input

    def images(self, model_input: Any) -> torch.Tensor:
        """Every image of ``model_input`` (see the module docstring) through the eval transform:
        uint8 ``(N, 3, crop, crop)``.

        Raises:
            RequestError: no images, or an item that is not one (the message names its index).
        """
        items = _items(model_input)
        if not items:
            raise RequestError('no images in the request; send {"inputs": ["<base64 JPEG>", ...]}')
        return torch.stack([self._one(item, i) for i, item in enumerate(items)])

    def _one(self, item: Any, index: int) -> torch.Tensor:
        if isinstance(item, str):
            item = _from_base64(item, index)
        max_pixels = self.bundle.transform.max_pixels
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        else:
            data = _array_as_ppm(item, index, max_pixels)
        try:
            return self.bundle.pixels(data)
        except ImageTooLarge as err:  # judged from the header: nothing was decoded
            raise RequestError(f"image {index}: too large: {err}; send an image of at most "
                               f"{max_pixels} pixels") from None
        except UnidentifiedImageError:
            reason = f"{len(data)} bytes in no image format Pillow reads"
        except (OSError, ValueError, SyntaxError) as err:
            reason = f"a broken image: {_first_line(err)}"
        raise RequestError(f"image {index}: {reason}; send JPEG or PNG bytes (base64 in JSON) or "
                           "(H, W, 3) uint8 RGB pixels")

    # -- prediction

    def top_k(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(N, 3, crop, crop)`` -> (probabilities float32 ``(N, k)``, indices int64
        ``(N, k)``), best first: the top of :meth:`ran.runtime.ModelBundle.predict`."""
        top = self.bundle.predict(images).topk(self.k, dim=1)
        return top.values, top.indices

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Top-k classes of every image: a DataFrame with one row per image and the columns
        ``indices`` (list of int), ``classes`` (list of str) and ``probabilities`` (list of
        float), best first.

        Raises:
            RequestError: see :meth:`images`.
        """
        probs, indices = self.top_k(self.images(model_input))
        rows = indices.tolist()
        return Predictions({
            "indices": rows,
            "classes": [[self.class_names[i] for i in row] for row in rows],
            "probabilities": [[round(float(p), 6) for p in row] for row in probs.tolist()],
        })


class Predictions(pd.DataFrame):
    """The answer's DataFrame, printed whole: pandas would elide the middle column (``classes``,
    the one a person reads) of lists wider than the console as ``...``."""

    @property
    def _constructor(self) -> type:
        return Predictions

    def __repr__(self) -> str:
        return self.to_string()


class _Pyfunc:
    """What MLflow's ``PyFuncModel`` wraps: a bad request becomes MLflow's 400 error."""

    def __init__(self, classifier: ImageClassifier) -> None:
        self.classifier = classifier

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self.classifier.predict(model_input, params)
        except RequestError as err:
            raise request_error(str(err)) from None


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> _Pyfunc:
    """MLflow's loader hook (``loader_module: ran.serving``): ``data_path`` holds the side files,
    loaded as a :class:`ran.runtime.ModelBundle` (on the first GPU if there is one)."""
    return _Pyfunc(ImageClassifier(ModelBundle.load(data_path)))


# ---------------------------------------------------------------------------------------------
# Request items


def _items(model_input: Any) -> list[Any]:
    """The images of a request, one list item each."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            return model_input[IMAGE_COLUMN].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise RequestError(f"a DataFrame of columns {list(model_input.columns)[:5]}; put the "
                           f"images in a column named {IMAGE_COLUMN!r}")
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, dict):
        if set(model_input) != {IMAGE_COLUMN} and len(model_input) != 1:
            raise RequestError(f"a mapping with keys {sorted(model_input)[:5]}; send "
                               f"{{{IMAGE_COLUMN!r}: [images]}} or a list of images")
        return _items(model_input.get(IMAGE_COLUMN, next(iter(model_input.values()))))
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 4:
            return list(model_input)
        if model_input.ndim == 3:
            return [model_input]
        raise RequestError(f"an array of shape {model_input.shape}; send (H, W, 3) or "
                           "(N, H, W, 3) uint8 pixels")
    if isinstance(model_input, (list, tuple, np.ndarray)):
        return list(model_input)
    return [model_input]


def _from_base64(text: str, index: int) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise RequestError(f"image {index}: a string that is not base64; send image bytes as "
                           "base64 strings") from None


def _array_as_ppm(item: Any, index: int, max_pixels: int | None) -> bytes:
    """uint8 ``(H, W, 3)`` pixels (or nested lists of 0..255) as a lossless PPM: the eval
    transform then treats them as it treats a stored image. RequestError for anything else, or
    for more than ``max_pixels`` pixels."""
    try:
        pixels = np.asarray(item)
    except (ValueError, TypeError):
        pixels = np.asarray(None)
    if pixels.dtype == object or pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        what = (f"an array of shape {pixels.shape}" if pixels.dtype != object
                else f"a {type(item).__name__}")
        raise RequestError(f"image {index}: {what}; send (H, W, 3) uint8 RGB pixels, or JPEG or "
                           "PNG bytes (base64 in JSON)")
    try:
        check_pixels(pixels.shape[1], pixels.shape[0], max_pixels)
    except ImageTooLarge as err:
        raise RequestError(f"image {index}: too large: {err}; send an image of at most {max_pixels} "
                           "pixels") from None
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.integer) or pixels.min() < 0 or pixels.max() > 255:
            raise RequestError(f"image {index}: {pixels.dtype} pixels; send uint8 values 0..255")
        pixels = pixels.astype(np.uint8)
    buffer = io.BytesIO()
    to_rgb(Image.fromarray(np.ascontiguousarray(pixels), "RGB")).save(buffer, format="PPM")
    return buffer.getvalue()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
