"""``ran data build|synth|verify``: argparse subcommands; the main CLI calls ``add_data_parser``.

Handlers return an exit code: 0 on success, 1 when ``verify`` finds a mismatch; bad input raises
DataError or OSError, which ``ran.cli.main`` turns into one ``error: ...`` line and exit code 2, as
for every verb.
"""

from __future__ import annotations

import argparse
import sys

from ran.data import DEFAULT_MAX_PIXELS

SOURCES = ("imagenet", "imagefolder", "cifar10", "cifar100")


def build_command(args: argparse.Namespace) -> int:
    from ran.data.write import build_shards

    build_shards(args.source, args.input, args.output, samples_per_shard=args.samples_per_shard,
                 max_shard_mb=args.shard_size_mb, max_size=args.max_size, val_fraction=args.val_fraction,
                 seed=args.seed, workers=args.workers, progress=not args.quiet, max_pixels=args.max_pixels)
    return 0


def synth_command(args: argparse.Namespace) -> int:
    from ran.data.synth import write_synthetic

    write_synthetic(args.output, classes=args.classes, train=args.train, val=args.val, size=args.size,
                    seed=args.seed, samples_per_shard=args.samples_per_shard, workers=args.workers,
                    progress=not args.quiet)
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from ran.data.read import verify_shards
    from ran.data.storage import require_dir

    require_dir(args.path)
    ok = verify_shards(args.path, workers=args.workers, progress=not args.quiet, max_pixels=args.max_pixels)
    if not ok:
        print(f"error: {args.path}: shards do not match the manifest (see above)", file=sys.stderr)
    return 0 if ok else 1


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` with its ``build``, ``synth`` and ``verify`` subcommands."""
    data = subparsers.add_parser("data", help="build, generate and verify WebDataset shards",
                                 description="Build, generate and verify WebDataset shards.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{build,synth,verify}")

    build = sub.add_parser("build", help="shards + manifest from ImageNet, an image folder or CIFAR",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples(
                               "ran data build --source imagefolder --input photos/ --output data/photos",
                               "ran data build --source imagenet --input /datasets/ILSVRC2012 "
                               "--output s3://bucket/imagenet --workers 16"))
    build.add_argument("--source", required=True, choices=SOURCES, help="layout of --input (required)")
    build.add_argument("--input", required=True, metavar="PATH",
                       help="imagenet: train/<wnid>/ + val/, or the folder holding ILSVRC2012_img_train.tar, "
                            "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz (read in place); "
                            "imagefolder: <class>/ or train/ + val/; cifar: the python pickle folder (required)")
    build.add_argument("--output", required=True, metavar="DIR_OR_S3",
                       help="directory or s3://bucket/prefix (required)")
    build.add_argument("--samples-per-shard", type=int, default=2000, metavar="N",
                       help="samples per shard (default: 2000)")
    build.add_argument("--shard-size-mb", type=float, default=None, metavar="MB",
                       help="also cap shards at about this many MB of source bytes (default: no cap)")
    build.add_argument("--max-size", type=int, default=None, metavar="PX",
                       help="downsize longer sides above PX, re-encoded JPEG q90 (default: keep the bytes)")
    build.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                       help="split this fraction of each class off as val, for sources without val/ "
                            "(default: 0)")
    _max_pixels(build, "skipped undecoded, listed as too large")
    _common(build)
    build.set_defaults(func=build_command)

    synth = sub.add_parser("synth", help="a small learnable synthetic dataset (no download)",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples(
                               "ran data synth --output data/synth",
                               "ran data synth --output data/big --classes 100 --train 50000 --size 64"))
    synth.add_argument("--output", required=True, metavar="DIR_OR_S3",
                       help="directory or s3://bucket/prefix (required)")
    synth.add_argument("--classes", type=int, default=10, metavar="N", help="classes (default: 10)")
    synth.add_argument("--train", type=int, default=2000, metavar="N", help="train images (default: 2000)")
    synth.add_argument("--val", type=int, default=500, metavar="N", help="val images (default: 500)")
    synth.add_argument("--size", type=int, default=32, metavar="PX", help="image side (default: 32)")
    synth.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                       help="samples per shard (default: 1000)")
    _common(synth)
    synth.set_defaults(func=synth_command)

    verify = sub.add_parser("verify", help="check shards against manifest.json; exit 1 on mismatch",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples(
                                "ran data verify data/synth", "ran data verify s3://bucket/imagenet --workers 8"))
    verify.add_argument("path", metavar="PATH", help="directory, s3:// prefix or URL with manifest.json")
    verify.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: all cores)")
    verify.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    _max_pixels(verify, "a problem, never decoded")
    verify.set_defaults(func=verify_command)


def _max_pixels(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"images whose header gives more pixels are {what}; the same cap as "
                             f"a job's data.max_pixels (default: {DEFAULT_MAX_PIXELS})")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="shuffle seed (default: 0)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="writer processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
