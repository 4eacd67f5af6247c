"""`ran explain`: each attention module's soft mask drawn over the image (the paper's Figure 1).

For every image, one PNG: the input as the model sees it (the eval transform of the model's
recipe, at its eval crop) and one panel per attention module, in network order, with that
module's soft mask averaged over channels, bilinearly upsampled to the image and drawn as a heat
map over it. Panels are titled with the stage and module; the figure with the predicted class.

Layout: ``PANEL_INCHES`` square panels at ``DPI``, at most ``MAX_COLUMNS`` per row, and a title
strip of ``TITLE_INCHES`` on top, so a figure of ``n`` modules is
``min(n + 1, 4) * 300`` by ``ceil((n + 1) / 4) * 300 + 50`` pixels. Drawn with matplotlib's Agg
canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from ran import runtime, tracking
from ran.data.transforms import make_transform, normalizer

if TYPE_CHECKING:
    from torch import nn

    from ran.config import JobConfig

PANEL_INCHES = 3.0
TITLE_INCHES = 0.5  # the figure's title strip
PANEL_TITLE_INCHES = 0.45  # two lines of panel title above the first row
DPI = 100
MAX_COLUMNS = 4
HEATMAP = "jet"
HEATMAP_ALPHA = 0.5


class ImageError(ValueError):
    """An image that cannot be read or decoded."""


@dataclass
class MaskPanel:
    """One attention module's mask, ready to draw."""

    stage: int  # 1-based stage of the network (masks of one stage share their shape)
    module: int  # 1-based module within the stage
    mask: torch.Tensor  # (H, W) mean over channels, upsampled to the image
    size: tuple[int, int]  # the mask's own spatial size before upsampling


@dataclass
class Explanation:
    """The prediction and the masks of one image."""

    image: torch.Tensor  # uint8 (3, H, W): the input as the model saw it
    panels: list[MaskPanel]
    predicted: int
    probability: float


def read_image(path: str | Path, recipe: str, crop: int) -> torch.Tensor:
    """The eval transform of ``recipe`` applied to the image file: uint8 ``(3, crop, crop)``."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path}: no such file")
    try:
        data = path.read_bytes()
        with Image.open(path) as probe:
            probe.verify()
        return make_transform(recipe, train=False, crop=crop).sample(data, random.Random(0))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {path}: cannot decode it ({err}); use a PNG, JPEG or other "
                         "format Pillow reads") from None


def mask_panels(masks: Sequence[torch.Tensor], size: tuple[int, int]) -> list[MaskPanel]:
    """Masks of one image ``(1, C, h, w)`` -> channel means upsampled to ``size``, labelled.

    A new stage starts where the mask shape (channels or resolution) changes; within a stage all
    modules gate trunks of the same shape.
    """
    panels: list[MaskPanel] = []
    stage, module, previous = 0, 0, None
    for mask in masks:
        shape = tuple(mask.shape[1:])
        if shape != previous:
            stage, module, previous = stage + 1, 0, shape
        module += 1
        mean = mask[0].float().mean(dim=0)
        up = F.interpolate(mean[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        panels.append(MaskPanel(stage, module, up, (int(mask.shape[2]), int(mask.shape[3]))))
    return panels


@torch.inference_mode()
def explain(model: "nn.Module", image: torch.Tensor, recipe: str) -> Explanation:
    """Run ``model`` on one uint8 ``(3, H, W)`` image and collect its prediction and masks."""
    model.eval()
    device = next(model.parameters()).device
    x = normalizer(recipe)(image[None].to(device))
    logits, masks = model(x, return_masks=True)
    probs = logits.float().softmax(dim=1)[0]
    predicted = int(probs.argmax())
    panels = mask_panels([m.cpu() for m in masks], tuple(image.shape[1:]))  # type: ignore[arg-type]
    return Explanation(image, panels, predicted, float(probs[predicted]))


def grid_shape(num_panels: int) -> tuple[int, int]:
    """(rows, columns) of a figure with ``num_panels`` panels."""
    columns = min(num_panels, MAX_COLUMNS)
    return math.ceil(num_panels / columns), columns


def draw(explanation: Explanation, title: str) -> Figure:
    """The figure: the input, then one heat-map panel per attention module."""
    rows, columns = grid_shape(1 + len(explanation.panels))
    height = rows * PANEL_INCHES + TITLE_INCHES
    fig = Figure(figsize=(columns * PANEL_INCHES, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01,
                        top=1 - (TITLE_INCHES + PANEL_TITLE_INCHES) / height, wspace=0.05, hspace=0.3)
    picture = explanation.image.permute(1, 2, 0).numpy()
    h, w = picture.shape[:2]
    ax = fig.add_subplot(rows, columns, 1)
    ax.imshow(picture)
    ax.set_title(f"input {w}x{h}", fontsize=9)
    ax.set_axis_off()
    for i, panel in enumerate(explanation.panels, start=2):
        ax = fig.add_subplot(rows, columns, i)
        ax.imshow(picture)
        low, high = _range(panel.mask)
        ax.imshow(panel.mask.numpy(), cmap=HEATMAP, alpha=HEATMAP_ALPHA, vmin=low, vmax=high)
        ax.set_title(f"stage {panel.stage}, module {panel.module} ({panel.size[0]}x{panel.size[1]})\n"
                     f"mask mean {float(panel.mask.mean()):.2f}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    return fig


def _range(mask: torch.Tensor) -> tuple[float, float]:
    """[0, 1] for sigmoid masks (mixed, spatial), so panels compare; min..max otherwise (channel)."""
    low, high = float(mask.min()), float(mask.max())
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    return low, high if high > low else low + 1e-6


def class_label(index: int, class_names: Sequence[str] | None) -> str:
    if class_names and 0 <= index < len(class_names):
        return f"{class_names[index]} (class {index})"
    return f"class {index}"


def explain_images(model: "nn.Module", cfg: "JobConfig", class_names: Sequence[str] | None,
                   images: Sequence[str | Path], out: str | Path, crop: int | None = None) -> list[Path]:
    """Write ``<out>/<image stem>_attention.png`` for every image; returns the PNG paths.

    Every image is read first, so an unreadable one fails the call before anything is written.
    """
    crop = crop or runtime.eval_crop(cfg)
    recipe = cfg.data.recipe
    pictures = [read_image(path, recipe, crop) for path in images]
    if not model_has_masks(model):
        raise ValueError(f"model {cfg.model.name} has no attention modules: nothing to explain")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path, picture in zip(images, pictures):
        result = explain(model, picture, recipe)
        title = (f"{Path(path).name}: predicted {class_label(result.predicted, class_names)}, "
                 f"p={result.probability:.2f}")
        target = _unique(out / f"{Path(path).stem}_attention.png", written)
        draw(result, title).savefig(target, dpi=DPI)
        written.append(target)
    return written


def _unique(target: Path, taken: list[Path]) -> Path:
    stem, n = target.stem, 1
    while target in taken:
        n += 1
        target = target.with_name(f"{stem}_{n}.png")
    return target


def model_has_masks(model: "nn.Module") -> bool:
    return bool(getattr(model, "attention_modules", None))


def cli_explain(args: argparse.Namespace) -> int:
    """``ran explain MODEL IMAGE... --out DIR [--crop N] [--log-mlflow]``."""
    loaded = runtime.load_model(args.model)
    written = explain_images(loaded.model, loaded.config, loaded.class_names, args.images, args.out,
                             crop=getattr(args, "crop", None))
    for path in written:
        print(path)
    if args.log_mlflow:
        run_id = log_explanations(written, loaded.source, loaded.config)
        print(f"logged {len(written)} picture(s) to MLflow run {run_id}")
    return 0


def log_explanations(paths: Sequence[Path], source: tracking.ModelSource, cfg: "JobConfig") -> str:
    """Log the PNGs under ``attention/`` of a new run tagged with the model; returns its id."""
    with tracking.linked_run(cfg.tracking.experiment, kind="explain",
                             run_name=f"explain {source.label}", tags=source.tags()) as run:
        for path in paths:
            run.log_artifact(path, "attention")
    return run.run_id
