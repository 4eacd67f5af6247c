"""``ran eval MODEL --data PATH``: evaluate a model exactly as training validated it, and log it.

``MODEL`` is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an MLflow run id or a checkpoint path
(:func:`ran.runtime.resolve_model`). The model is rebuilt as our own class and measured by
:func:`ran.runtime.evaluate`: the eval transform at the eval crop, the training precision and
memory format, counts summed over the whole split, so a registered version reproduces the
``val_top1`` it was registered with on the same data. The evaluation is logged as a run tagged
with the model version and source run, its metrics also attached to the logged model.
"""

from __future__ import annotations

import argparse

from ran import runtime, tracking


def cli_eval(args: argparse.Namespace) -> int:
    """``ran eval MODEL --data PATH [--split S] [--crop N] [--batch-size N] [--workers N]``."""
    loaded, metrics = runtime.evaluate_ref(args.model, args.data, args.split, args.crop,
                                           args.batch_size, args.workers)
    cfg, source = loaded.config, loaded.source
    print(f"model   {source.label}  ({cfg.model.name}, {cfg.resolved_stem()} stem)")
    print(f"data    {args.data} [{args.split}]  {int(metrics['images'])} images"
          + (f", {int(metrics['skipped'])} skipped" if metrics["skipped"] else ""))
    print(f"top-1   {metrics['top1']:.4f}")
    print(f"top-5   {metrics['top5']:.4f}")
    print(f"loss    {metrics['loss']:.4f}")
    print(f"img/s   {metrics['img_per_s']:.1f}")
    params = {"data": args.data, "split": args.split, "crop": args.crop or runtime.eval_crop(cfg),
              "batch_size": args.batch_size or cfg.data.batch_size}
    with tracking.linked_run(cfg.tracking.experiment, kind="evaluation",
                             run_name=f"evaluation {source.label}", tags=source.tags(),
                             params=params) as run:
        tracking.log_model_metrics(run, metrics, source.model_id)
    print(f"logged  MLflow run {run.run_id}")
    return 0
