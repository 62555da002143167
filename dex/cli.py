"""The ``dex`` command line (also ``python -m dex``)."""

from __future__ import annotations

import argparse
import sys


def _pretrain(args: argparse.Namespace) -> int:
    from dex.config import load_config
    from dex.train.pretrain import PretrainConfig, pretrain, summary

    config = load_config(PretrainConfig, args.config, args.set)
    print(summary(pretrain(config)))
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
