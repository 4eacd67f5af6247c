"""`ran`: the command line. Thin: parse arguments, call one function, turn errors into one line.

Handlers are imported lazily (``"module:function"``) so that ``ran models`` does not pay for
importing Ray and MLflow. Every handler takes the parsed ``argparse.Namespace`` and returns an
exit code. Expected errors (``ValueError`` subclasses such as ConfigError and DataError, missing
files, refused connections) print ``error: ...`` and exit 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    run.__name__ = target
    return run


def _add_job_args(p: argparse.ArgumentParser, *, job_flag: bool = False) -> None:
    """The job YAML (positional, or ``--job`` for ``ran tune``) and its ``--set`` overrides."""
    if job_flag:
        p.add_argument("--job", required=True, help="base job config YAML (see jobs/)")
    else:
        p.add_argument("job", help="job config YAML (see jobs/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=0.05 (repeatable; default: none)",
    )


def _add_ray_args(p: argparse.ArgumentParser, resume: str) -> None:
    """``--address`` (the same fallback everywhere) and ``--resume`` (``resume``: its help)."""
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true", help=resume)


def cmd_models(args: argparse.Namespace) -> int:
    from ran.models import list_models, model_defaults, model_info

    names = list_models() if not args.names else args.names
    rows = []
    for name in names:
        stems = [args.stem] if args.stem else [model_defaults(name).stem]
        for stem in stems:
            info = model_info(name, stem=stem)
            rows.append((name, stem, str(info.depth), f"{info.params / 1e6:.2f}",
                         f"{info.macs / 1e9:.3f}", str(info.input_size)))
    header = ("name", "stem", "depth", "params(M)", "GMACs", "input")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ran", description="Residual Attention Networks: train on Ray, track in MLflow."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list registered models with depth, params and GMACs")
    p.add_argument("names", nargs="*", help="models to show (default: all)")
    p.add_argument("--stem", choices=["imagenet", "cifar"], help="default: each model's own")
    p.set_defaults(func=cmd_models)

    from ran.data.commands import add_data_parser

    add_data_parser(sub)

    p = sub.add_parser("train", help="train a job on Ray Train, tracked in MLflow")
    _add_job_args(p)
    _add_ray_args(p, "continue the job from its latest checkpoint")
    p.set_defaults(func=_lazy("ran.train.launch:cli_train"))

    p = sub.add_parser("tune", help="search a Tune space over a job")
    p.add_argument("space", help="search space YAML (see tune_spaces/)")
    _add_job_args(p, job_flag=True)
    _add_ray_args(p, "restore an interrupted search")
    p.set_defaults(func=_lazy("ran.tune.search:cli_tune"))

    p = sub.add_parser("eval", help="evaluate a model on shards")
    p.add_argument("model", help="models:/name@alias, models:/name/version, a run id or a checkpoint")
    p.add_argument("--data", required=True, help="shard directory or s3:// prefix")
    p.add_argument("--split", default="val")
    p.add_argument("--crop", type=int, help="eval crop (default: the model's, e.g. 320 for A-92)")
    p.add_argument("--batch-size", type=int, help="default: the model's data.batch_size")
    p.add_argument("--workers", type=int, help="loader processes (default: the model's data.workers)")
    p.set_defaults(func=_lazy("ran.evaluate:cli_eval"))

    p = sub.add_parser("promote", help="move a registry alias to a version if it beats the holder")
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", required=True)
    p.add_argument("--alias", default="champion")
    p.add_argument("--min-top1", type=float, help="refuse below this validation top-1")
    p.add_argument("--eval-data", help="re-evaluate both versions on these shards first")
    p.add_argument("--reason", default="", help="why, recorded on the version")
    p.set_defaults(func=_lazy("ran.promotion:cli_promote"))

    p = sub.add_parser("registry", help="list registered models, versions, aliases and metrics")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_lazy("ran.promotion:cli_registry"))

    p = sub.add_parser("explain", help="draw each attention module's soft mask over images")
    p.add_argument("model", help="models:/name@alias, models:/name/version, a run id or a checkpoint")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--crop", type=int, help="input size (default: the model's eval crop)")
    p.add_argument("--log-mlflow", action="store_true", help="also log the PNGs to a new MLflow run")
    p.set_defaults(func=_lazy("ran.explain:cli_explain"))

    p = sub.add_parser("submit", help="submit `ran train` (or `ran tune`) as a Ray Job")
    _add_job_args(p)
    p.add_argument("--address", required=True, help="Ray dashboard, e.g. http://HEAD:8265")
    p.add_argument("--tune", metavar="SPACE", help="submit `ran tune SPACE --job JOB` instead")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    p.add_argument("--working-dir", default=".", metavar="DIR",
                   help="uploaded to the cluster as the job's working directory (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="also pass this environment variable to the job (repeatable)")
    p.set_defaults(func=_lazy("ran.cluster:cli_submit"))

    p = sub.add_parser("jobs", help="list, inspect, follow or stop Ray Jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="Ray dashboard (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true")
    p.set_defaults(func=_lazy("ran.cluster:cli_jobs"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
