"""``ran eval MODEL --data PATH``: evaluate a model exactly as training validated it, and log it.

``MODEL`` is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an MLflow run id or a checkpoint path
(:func:`ran.runtime.resolve_model`). It is loaded as a :class:`ran.runtime.ModelBundle` and
measured by its ``evaluate``: the eval transform at the eval crop, the training precision and
memory format, counts summed over the whole split, so a registered version reproduces the
``eval/top1`` it was registered with on the same data. The evaluation is logged as a run in the
experiment ``<training experiment>-evaluations`` (not among the training runs), tagged with the
model version and source run, its metrics also attached to the logged model; a registered version
also gets them as tags (``eval.<split>.top1`` ...).
"""

from __future__ import annotations

import argparse

from ran import runtime, tracking
from ran.config import JobConfig


def cli_eval(args: argparse.Namespace) -> int:
    """``ran eval MODEL --data PATH [--split S] [--crop N] [--batch-size N] [--workers N]``."""
    bundle = runtime.ModelBundle.load(args.model, crop=args.crop)
    metrics = bundle.evaluate(args.data, args.split, args.batch_size, args.workers, progress=True)
    cfg, source = bundle.config, bundle.source
    assert source is not None
    print(f"model   {source.label}  ({cfg.model.name}, {cfg.resolved_stem()} stem)")
    print(f"data    {args.data} [{args.split}]  {int(metrics['images'])} images"
          + (f", {int(metrics['skipped'])} skipped" if metrics["skipped"] else ""))
    print(f"top-1   {metrics['top1']:.4f}")
    print(f"top-5   {metrics['top5']:.4f}")
    print(f"loss    {metrics['loss']:.4f}")
    print(f"img/s   {metrics['img_per_s']:.1f}")
    params = {"data": args.data, "split": args.split, "crop": bundle.crop,
              "batch_size": args.batch_size or cfg.data.batch_size}
    experiment = evaluation_experiment(cfg)
    with tracking.linked_run(experiment, kind="evaluation", run_name=f"evaluation {source.label}",
                             tags=source.tags(), params=params) as run:
        tracking.log_model_metrics(run, {**{f"eval/{k}": metrics[k] for k in ("top1", "top5", "loss")},
                                         "eval/samples": metrics["images"],
                                         "eval/skipped": metrics["skipped"],
                                         "perf/img_per_s": metrics["img_per_s"]}, source.model_id)
    if source.name and source.version:
        tracking.tag_version(source.name, source.version, {
            f"eval.{args.split}.{key}": f"{metrics[key]:.6f}" for key in ("top1", "top5", "loss")}
            | {f"eval.{args.split}.data": args.data, f"eval.{args.split}.run_id": run.run_id})
    print(f"logged  MLflow run {run.run_id} (experiment {experiment!r})")
    return 0


def evaluation_experiment(cfg: JobConfig) -> str:
    """Where ``ran eval`` logs: ``<training experiment>-evaluations``, beside, not inside, the
    training runs."""
    return f"{cfg.tracking.experiment}-evaluations"
