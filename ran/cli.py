"""`ran`: the command line. Thin: parse arguments, call one function, turn errors into one line.

Handlers are imported lazily (``"module:function"``) so that ``ran models`` does not pay for
importing Ray and MLflow. Every handler takes the parsed ``argparse.Namespace`` and returns an
exit code. Expected errors (:data:`EXPECTED_ERRORS`: ``ValueError`` subclasses such as ConfigError
and DataError, missing or unreadable files, refused connections) print ``error: ...`` and exit 2;
a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from ran.data.commands import add_data_parser
from ran.table import format_table
from ran.train import console


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    run.__name__ = target
    return run


def _add_job_args(p: argparse.ArgumentParser, *, job_flag: bool = False) -> None:
    """The job YAML (positional, or ``--job`` for ``ran tune``) and its ``--set`` overrides."""
    if job_flag:
        p.add_argument("--job", required=True, help="base job config YAML, see jobs/ (required)")
    else:
        p.add_argument("job", help="job config YAML (see jobs/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=0.05 (repeatable; default: none)",
    )


def _add_ray_args(p: argparse.ArgumentParser, resume: str) -> None:
    """``--address`` (the same fallback everywhere) and ``--resume`` (``resume``: its help)."""
    _add_address(p)
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
    print(format_table(header, rows, right=range(2, len(header))))
    return 0


# Examples at the end of each verb's --help.
EXAMPLES = {
    "models": ["ran models", "ran models attention92 --stem cifar"],
    "train": ["ran train jobs/demo.yaml",
              "ran train jobs/cifar10_attention56.yaml --set optim.lr=0.05 --set scaling.num_workers=4",
              "ran train jobs/demo.yaml --resume"],
    "bench": ["ran bench jobs/demo.yaml --baseline none",
              "ran bench jobs/imagenet_attention56.yaml --batch 64,128,256 --data --json",
              "ran bench jobs/cifar10_attention92.yaml --set data.batch_size=64 --modes eager,cuda_graph"],
    "tune": ["ran tune tune_spaces/depth_mask.yaml --job jobs/cifar10_attention56.yaml",
             "ran tune tune_spaces/optim.yaml --job jobs/demo.yaml --trials 2 --epochs 1 "
             "--set search.scheduler=fifo --set search.resources.num_workers=1",
             "ran tune tune_spaces/depth_mask.yaml --job jobs/demo.yaml --resume"],
    "eval": ["ran eval models:/ran-demo@champion --data data/synth",
             "ran eval runs/demo-20260101-120000 --data s3://bucket/imagenet --crop 320"],
    "promote": ["ran promote ran-demo --version 3",
                "ran promote ran-demo --version 3 --alias champion --min-top1 0.75 --reason 'longer schedule'",
                "ran promote ran-demo --version 3 --eval-data data/synth"],
    "registry": ["ran registry", "ran registry ran-demo"],
    "explain": ["ran explain models:/ran-demo@champion cat.jpg dog.png --out pictures",
                "ran explain models:/ran-demo/2 cat.jpg --out pictures --log-mlflow"],
    "submit": ["ran submit jobs/imagenet_attention56.yaml --address http://127.0.0.1:8265",
               "RAY_ADDRESS=http://127.0.0.1:8265 ran submit jobs/demo.yaml --wait",
               "ran submit jobs/demo.yaml --tune tune_spaces/depth_mask.yaml"],
    "jobs list": ["ran jobs list", "ran jobs list --address http://127.0.0.1:8265"],
    "jobs status": ["ran jobs status raysubmit_XYZ"],
    "jobs logs": ["ran jobs logs raysubmit_XYZ", "ran jobs logs raysubmit_XYZ --follow"],
    "jobs stop": ["ran jobs stop raysubmit_XYZ"],
}
MODEL_REF = "models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id or a checkpoint path"


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that keeps the examples' line breaks."""


def _verb(sub: argparse._SubParsersAction, name: str, help: str, *,
          examples: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the examples of ``EXAMPLES[examples or name]``."""
    lines = EXAMPLES.get(examples or name)
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines) if lines else None
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog=epilog, formatter_class=_Help)


def _add_address(p: argparse.ArgumentParser, *, dashboard: bool = False) -> None:
    """``--address`` with the one fallback every verb uses (``RAY_ADDRESS``)."""
    if dashboard:
        p.add_argument("--address", help="Ray dashboard, e.g. http://127.0.0.1:8265 (default: "
                                         "RAY_ADDRESS)")
        p.add_argument("--insecure", action="store_true",
                       help="send the Ray token over plain http:// to a host other than 127.0.0.1 "
                            "(default: off)")
    else:
        p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    """Every ``ran`` verb, each flag with a one-line help and its default, each verb with examples."""
    parser = argparse.ArgumentParser(
        prog="ran", description="Residual Attention Networks: train on Ray, track in MLflow.",
        epilog="run `ran COMMAND --help` for a command's flags and examples", formatter_class=_Help)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print Ray's and MLflow's own messages, for this command and its "
                             "processes (default: off, i.e. ran's lines, warnings and errors; or "
                             "RAN_LOG_LEVEL=INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _verb(sub, "models", "list the model zoo's networks with depth, params and GMACs")
    p.add_argument("names", nargs="*", help="models to show (default: all)")
    p.add_argument("--stem", choices=["imagenet", "cifar"], help="input stem (default: each model's own)")
    p.set_defaults(func=cmd_models)

    add_data_parser(sub)

    p = _verb(sub, "train", "train a job on Ray Train, tracked in MLflow")
    _add_job_args(p)
    _add_ray_args(p, "continue the job's latest run from its latest checkpoint (default: a new run)")
    p.set_defaults(func=_lazy("ran.train.launch:cli_train"))

    p = _verb(sub, "bench", "time the job's training step on this machine, every precision, "
                            "compile mode and CUDA graph beside ResNet-50, without Ray")
    _add_job_args(p)
    p.add_argument("--batch", help="per-device batch sizes, e.g. 64,128,256 (default: the job's "
                                   "data.batch_size)")
    p.add_argument("--precision", help="precisions to time, e.g. bf16,fp16 (default: fp32 and the "
                                       "ones this device computes natively)")
    p.add_argument("--modes", help="step modes, e.g. eager,default,cuda_graph (default: eager and "
                                   "compile=default; on a GPU also reduce-overhead, cuda_graph and "
                                   "default+cuda_graph)")
    p.add_argument("--baseline", default="resnet50",
                   help="torchvision model timed beside the job's under each setting, or none "
                        "(default: resnet50)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting, after the 20 "
                                                          "whose loss is checked (default: 20)")
    p.add_argument("--data", action="store_true", help="also time the job's loader alone and the "
                                                       "fastest step fed by it (default: off)")
    p.add_argument("--data-steps", type=int, default=30, help="batches timed for --data, the "
                                                               "loader alone and fed (default: 30)")
    p.add_argument("--profile", action="store_true", help="also profile the fastest setting: "
                                                          "time per op family (default: off)")
    p.add_argument("--budget-s", type=float, help="start no new setting after this many seconds "
                                                  "(default: no limit)")
    p.add_argument("--no-save", action="store_true", help="do not record the fastest setting in "
                                                          "the step table auto reads (default: record)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON (default: "
                                                       "a table and the fastest setting)")
    p.set_defaults(func=_lazy("ran.bench:cli_bench"))

    p = _verb(sub, "tune", "search a Tune space over a job")
    p.add_argument("space", help="search space YAML (see tune_spaces/)")
    _add_job_args(p, job_flag=True)
    p.add_argument("--trials", type=int, metavar="N", help="samples of the space, i.e. --set "
                   "search.num_samples=N (default: the space's search.num_samples)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs per trial, i.e. --set "
                   "train.epochs=N (default: the job's and the space's set:)")
    _add_ray_args(p, "restore the interrupted search of this job and space (default: a new search)")
    p.set_defaults(func=_lazy("ran.tune.search:cli_tune"))

    p = _verb(sub, "eval", "evaluate a model on shards as training validated it")
    p.add_argument("model", help=MODEL_REF)
    p.add_argument("--data", required=True, help="shard directory or s3:// prefix (required)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--crop", type=int, help="eval crop (default: the one training validated at, "
                                            "e.g. 320 for Attention-92)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the model's data.batch_size)")
    p.add_argument("--workers", type=int, help="loader processes (default: the model's data.workers)")
    p.set_defaults(func=_lazy("ran.evaluate:cli_eval"))

    p = _verb(sub, "promote", "move a registry alias to a version if it beats the holder")
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", required=True, help="the version to promote (required)")
    p.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    p.add_argument("--min-top1", type=float, help="refuse below this validation top-1, a fraction "
                                                  "(default: no minimum)")
    p.add_argument("--eval-data", help="re-evaluate both versions on these shards first (default: "
                                       "compare the metrics recorded at registration)")
    p.add_argument("--reason", default="", help="why, recorded on the version (default: none)")
    p.set_defaults(func=_lazy("ran.promotion:cli_promote"))

    p = _verb(sub, "registry", "list registered models, versions, aliases and metrics")
    p.add_argument("name", nargs="?", help="one registered model (default: all)")
    p.set_defaults(func=_lazy("ran.promotion:cli_registry"))

    p = _verb(sub, "explain", "draw each attention module's soft mask over images (one row "
                              "per image, one column per module)")
    p.add_argument("model", help=MODEL_REF)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...); an image in a folder "
                                             "named after a class is labelled with that true class")
    p.add_argument("--out", required=True, help="directory for the PNG (required)")
    p.add_argument("--crop", type=int, help="input size (default: the model's eval crop)")
    p.add_argument("--log-mlflow", action="store_true",
                   help="also log the picture, under attention/, to a new MLflow run tagged with "
                        "the model (default: off)")
    p.add_argument("--mlflow-run", metavar="RUN_ID",
                   help="log the picture to this existing run, one you name, instead of a new "
                        "one; implies --log-mlflow (default: a new run)")
    p.set_defaults(func=_lazy("ran.explain:cli_explain"))

    p = _verb(sub, "submit", "submit `ran train` (or `ran tune`) as a Ray Job")
    _add_job_args(p)
    _add_address(p, dashboard=True)
    p.add_argument("--tune", metavar="SPACE", help="submit `ran tune SPACE --job JOB` instead "
                                                   "(default: ran train)")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends (default: off)")
    p.add_argument("--working-dir", default=".", metavar="DIR",
                   help="uploaded to the cluster as the job's working directory (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="also pass this environment variable to the job (repeatable; default: none)")
    p.set_defaults(func=_lazy("ran.cluster:cli_submit"))

    jobs = _verb(sub, "jobs", "list, inspect, follow or stop Ray Jobs")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="{list,status,logs,stop}")
    for action, text in [("list", "list the cluster's jobs"), ("status", "one job's status"),
                         ("logs", "one job's logs"), ("stop", "stop one job")]:
        p = _verb(actions, action, text, examples=f"jobs {action}")
        if action != "list":
            p.add_argument("job_id", help="submission id (see `ran jobs list`)")
        if action == "logs":
            p.add_argument("--follow", action="store_true",
                           help="keep printing until the job ends (default: off)")
        _add_address(p, dashboard=True)
        p.set_defaults(func=_lazy("ran.cluster:cli_jobs"), job_id=None, follow=False)
    return parser


# Errors of bad input or an unreachable service: one ``error: ...`` line and exit code 2 (ConfigError,
# DataError and the other ValueErrors; missing or unreadable files, refused connections). The one
# mapping of every verb, `ran data` included; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with console.configure(verbose_flag=args.verbose):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
