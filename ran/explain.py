"""`ran explain`: each attention module's soft mask drawn over the image, as in the paper's Fig. 1.

One PNG for all the images given: one row per image, one column per attention module (in network
order) after the input itself. The model is a :class:`ran.runtime.ModelBundle`: each image goes
through its eval transform and its one forward pass (precision, memory format), as served. A module's soft mask ``M`` has the trunk's shape
``(C, h, w)``; it is drawn as one ``h x w`` map, the **mean over its C channels** (for mixed
attention, the mean of the per-channel sigmoids: where the module lets features through on
average), bilinearly upsampled to the image and laid over a grey copy of it as a heat map in a
perceptual colormap (:data:`HEATMAP`). Every map is **contrast-stretched on its own**, from its
minimum (dark) to its maximum (bright), and its colour bar gives those values: a mask's values
typically span a few hundredths around 0.5, which a common 0..1 scale shows as one flat tint. A
constant map is drawn in the colormap's middle colour and titled so.

Rows are labelled with the file name, the predicted class and its probability, and the true class
when the image sits in a folder named after one of the model's classes (``val/cat/1.jpg``, as
torchvision's ``ImageFolder`` lays out data); columns with the stage, module and mask size.

Layout: ``PANEL_INCHES`` square panels (plus a colour bar) at ``DPI``, a header strip of
``TITLE_INCHES``. Drawn with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from ran import tracking
from ran.progress import Progress
from ran.runtime import ModelBundle

if TYPE_CHECKING:
    from torch import nn

    from ran.config import JobConfig

PANEL_INCHES = 2.4  # one image or mask panel (its colour bar and title take a little of it)
TITLE_CHARS = 30  # characters of a 7-point title line that fit a panel's width
TITLE_INCHES = 0.4  # the figure's two-line title
DPI = 100
EXPLAIN_BATCH = 16  # images a forward pass (one batch: what a bundle test compares bitwise with eval)
HEATMAP = "inferno"  # perceptually uniform, dark (low) to bright (high), readable in greyscale
HEATMAP_ALPHA = 0.75  # the heat map over the grey image
FLAT = 1e-6  # a map whose values span less than this is drawn as constant
REDUCTION = {  # how a module's C channels become one map, per mask activation (Section 3.3)
    "mixed": "mean over channels of the per-channel sigmoid",
    "spatial": "mean over channels of the per-channel spatial sigmoid",
    "channel": "mean over channels of the L2-normalised channel vector",
}


class ImageError(ValueError):
    """An image that cannot be read or decoded."""


@dataclass
class MaskPanel:
    """One attention module's mask, ready to draw."""

    stage: int  # 1-based stage of the network (masks of one stage share their shape)
    module: int  # 1-based module within the stage
    mask: torch.Tensor  # float32 (H, W): mean over channels, upsampled to the image
    size: tuple[int, int]  # the mask's own spatial size (h, w) before upsampling
    channels: int  # C, the channels averaged


@dataclass
class Explanation:
    """The prediction and the masks of one image."""

    image: torch.Tensor  # uint8 (3, H, W): the input as the model saw it
    panels: list[MaskPanel]
    predicted: int
    probability: float
    name: str = ""  # the file name, for the row label
    true: int | None = None  # the true class, when known


def read_image(path: str | Path, bundle: ModelBundle) -> torch.Tensor:
    """The image file through the bundle's eval transform: uint8 ``(3, crop, crop)``.

    Raises:
        ImageError: no such file, or not an image Pillow can decode.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path}: no such file")
    try:
        data = path.read_bytes()
        with Image.open(path) as probe:
            probe.verify()
        return bundle.pixels(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {path}: cannot decode it ({err}); use a PNG, JPEG or other "
                         "format Pillow reads") from None


def mask_panels(masks: Sequence[torch.Tensor], size: tuple[int, int]) -> list[MaskPanel]:
    """Masks of one image, each ``(1, C, h, w)`` -> channel means upsampled to ``size``, labelled.

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
        panels.append(MaskPanel(stage, module, up, (int(mask.shape[2]), int(mask.shape[3])),
                                int(mask.shape[1])))
    return panels


def explain(bundle: ModelBundle, images: torch.Tensor) -> list[Explanation]:
    """The prediction and masks of uint8 ``(N, 3, crop, crop)`` images (:func:`read_image`), from
    the bundle's one forward pass (:meth:`ran.runtime.ModelBundle.predict_with_masks`: its
    precision and memory format, as served). A baseline (resnet152, preact_resnet164) has no
    masks: its rows show the prediction only."""
    probs, masks = bundle.predict_with_masks(images)
    results = []
    for i, image in enumerate(images):
        predicted = int(probs[i].argmax())
        panels = mask_panels([m[i:i + 1] for m in masks], tuple(image.shape[1:]))  # type: ignore[arg-type]
        results.append(Explanation(image, panels, predicted, float(probs[i, predicted])))
    return results


def stretch(mask: torch.Tensor) -> tuple[float, float, bool]:
    """The colour range of one map: its own (min, max), and whether it is flat (then a range
    centred on its value, so that it shows the colormap's middle colour)."""
    low, high = float(mask.min()), float(mask.max())
    if high - low < FLAT:
        return low - 0.5, low + 0.5, True
    return low, high, False


def class_label(index: int | None, class_names: Sequence[str] | None) -> str:
    """``name (class i)``, ``class i``, or ``?`` when unknown."""
    if index is None:
        return "?"
    if class_names and 0 <= index < len(class_names):
        return f"{class_names[index]} (class {index})"
    return f"class {index}"


def true_class(path: str | Path, class_names: Sequence[str] | None) -> int | None:
    """The class an image's folder names (``.../cat/1.jpg`` -> ``cat``), if it is one of
    ``class_names``; else None."""
    if not class_names:
        return None
    folder = Path(path).resolve().parent.name
    return list(class_names).index(folder) if folder in class_names else None


def draw(explanations: Sequence[Explanation], class_names: Sequence[str] | None = None,
         reduction: str = REDUCTION["mixed"], title: str = "") -> Figure:
    """The grid: one row per explanation, the input then one heat-map panel (with its colour bar)
    per attention module. All explanations come from one model (same modules)."""
    rows, columns = len(explanations), 1 + len(explanations[0].panels)
    fig = Figure(figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES + TITLE_INCHES), dpi=DPI,
                 layout="constrained")  # room for titles and colour bars, nothing overlaps
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for row, explanation in zip(axes, explanations):
        _draw_row(fig, row, explanation, class_names)
    fig.suptitle(title or f"soft attention masks, {reduction}\n"
                 "each map stretched from its min (dark) to its max (bright)", fontsize=9)
    return fig


def _draw_row(fig: Figure, axes: Sequence, e: Explanation,
              class_names: Sequence[str] | None) -> None:
    picture = e.image.permute(1, 2, 0).numpy()
    grey = picture.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    axes[0].imshow(picture)
    # Wrapped to the panel's width: the first column's title cannot spill past the figure's edge.
    label = [e.name, f"predicted {class_label(e.predicted, class_names)} p={e.probability:.2f}",
             f"true {class_label(e.true, class_names)}"]
    axes[0].set_title("\n".join(textwrap.fill(line, TITLE_CHARS) for line in label), fontsize=7)
    axes[0].set_axis_off()
    for ax, panel in zip(axes[1:], e.panels):
        low, high, flat = stretch(panel.mask)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        heat = ax.imshow(panel.mask.numpy(), cmap=HEATMAP, alpha=HEATMAP_ALPHA, vmin=low, vmax=high)
        bar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=6)
        bar.set_ticks([low, high] if not flat else [(low + high) / 2])
        bar.ax.set_yticklabels([f"{t:.3g}" for t in bar.get_ticks()])
        h, w = panel.size
        ax.set_title(f"stage {panel.stage}, module {panel.module}\n{h}x{w}, mean of "
                     f"{panel.channels} ch" + (" (constant)" if flat else ""), fontsize=7)
        ax.set_axis_off()


def mask_activation(model: "nn.Module") -> str:
    """``mixed``, ``channel`` or ``spatial``: how the model's first module activates its mask."""
    return str(getattr(model.attention_modules[0].mask[-1], "kind", "mixed"))


def output_name(images: Sequence[str | Path]) -> str:
    """``attention_<first image stem>.png`` (``..._and_N_more.png`` with N more images)."""
    more = f"_and_{len(images) - 1}_more" if len(images) > 1 else ""
    return f"attention_{Path(images[0]).stem}{more}.png"


def explain_images(bundle: ModelBundle, images: Sequence[str | Path], out: str | Path) -> Path:
    """Draw the grid of ``images`` (rows) by attention modules (columns) into
    ``<out>/`` :func:`output_name`; returns its path. The images go through one forward pass.

    Every image is read first, so an unreadable one fails the call before anything is written.

    Raises:
        ImageError: an image is missing or unreadable.
    """
    cfg, class_names = bundle.config, bundle.class_names
    results: list[Explanation] = []
    with Progress("explaining", len(images), "img", enabled=len(images) > 1) as shown:
        for start in range(0, len(images), EXPLAIN_BATCH):  # one forward pass a batch
            chunk = images[start:start + EXPLAIN_BATCH]
            results += explain(bundle, torch.stack([read_image(path, bundle) for path in chunk]))
            shown.update(len(chunk))
    for path, result in zip(images, results):
        result.name, result.true = Path(path).name, true_class(path, class_names)
    if bundle.has_masks:
        activation = mask_activation(bundle.model)
        title = (f"{cfg.model.name}, {activation} attention: each module's soft mask as the "
                 f"{REDUCTION.get(activation, 'channel mean')}\n"
                 "each map stretched from its min (dark) to its max (bright)")
    else:
        title = f"{cfg.model.name} has no attention modules: the prediction only"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / output_name(images)
    draw(results, class_names, title=title).savefig(target, dpi=DPI)
    return target


def cli_explain(args: argparse.Namespace) -> int:
    """``ran explain MODEL IMAGE... --out DIR [--crop N] [--log-mlflow] [--mlflow-run RUN_ID]``."""
    for image in args.images:  # before any model or tracking store is touched
        if not Path(image).is_file():
            raise ImageError(f"image {image}: no such file")
    bundle = ModelBundle.load(args.model, crop=getattr(args, "crop", None))
    path = explain_images(bundle, args.images, args.out)
    print(path)
    named = getattr(args, "mlflow_run", None)
    if args.log_mlflow or named:
        assert bundle.source is not None
        run_id = log_explanation(path, bundle.source, bundle.config, run_id=named)
        print(f"logged {path.name} to MLflow run {run_id} (attention/)")
    return 0


def log_explanation(path: Path, source: tracking.ModelSource, cfg: "JobConfig",
                    run_id: str | None = None) -> str:
    """Log the picture under ``attention/`` of the run the user named (``run_id``), else of a new
    run (kind ``explain``) in ``<experiment>-explanations``, tagged with the model it explains.
    Never into a run the model names itself (a checkpoint's embedded run id, a version's training
    run, maybe another user's). Returns the run id."""
    if run_id:
        tracking.RunTracker(run_id).log_artifact(path, "attention")
        return run_id
    with tracking.linked_run(f"{cfg.tracking.experiment}-explanations", kind="explain",
                             run_name=f"explain {source.label}", tags=source.tags()) as run:
        run.log_artifact(path, "attention")
    return run.run_id
