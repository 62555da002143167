"""The ``dex`` command line (also ``python -m dex``)."""

from __future__ import annotations

import argparse
import os
import sys


def _pretrain(args: argparse.Namespace) -> int:
    from dex.config import load_config
    from dex.train.pretrain import PretrainConfig, pretrain, summary

    config = load_config(PretrainConfig, args.config, args.set)
    print(summary(pretrain(config)))
    return 0


def _make_phantoms(args: argparse.Namespace) -> int:
    from dex.data.phantoms import make_phantoms

    recipe = make_phantoms(args.out, per_modality=args.per_modality, size=args.size, seed=args.seed,
                           task_images=args.task_images, workers=args.workers)
    print(f"wrote {len(recipe.sources)} raw sources, the recipe {recipe.path} and task folders in {args.out}/tasks")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dex", description="DEX: Director-Experts medical vision foundation model")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pretrain = commands.add_parser("pretrain", help="MAE-DEX pretraining from a YAML config",
                                   description="MAE-DEX pretraining from a YAML config (see configs/).")
    pretrain.add_argument("config", help="YAML config file")
    pretrain.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                          help="override config keys, e.g. --set epochs=2 model_args.num_experts=4")
    pretrain.set_defaults(func=_pretrain)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True,
                                                                         metavar="DATA_COMMAND")
    phantoms = data.add_parser(
        "make-phantoms", help="write procedural images of all 10 modalities, a curation recipe and task folders",
        description="Write procedural images of the 10 MedVerse modalities in real file formats (DICOM, NIfTI, "
                    "PNG, JPEG, TIFF, MP4), a curation recipe for them, and downstream task folders with exact "
                    "labels. The same seed gives byte-identical output.")
    phantoms.add_argument("out", help="output folder")
    phantoms.add_argument("--per-modality", type=int, default=200, help="pretraining images per modality (200)")
    phantoms.add_argument("--size", type=int, default=64, help="image size in pixels (64)")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--task-images", type=int, default=60, help="images per downstream task (60)")
    phantoms.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (all cores)")
    phantoms.set_defaults(func=_make_phantoms)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dex {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
