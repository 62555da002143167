"""``dex pretrain`` and ``dex export``."""

from __future__ import annotations

import argparse
import os

from dex.cli.common import command


def add_commands(commands) -> None:
    _pretrain_parser(commands)
    _export_parser(commands)


def _pretrain_parser(commands) -> None:
    pretrain = command(commands, "pretrain", help="pretraining (MAE-DEX by default) from a YAML config",
                       description="Pretraining from a YAML config (see configs/); its objective key picks the "
                                   "method (mae_dex, the default).")
    pretrain_config_flags(pretrain)
    pretrain.add_argument("--resume", metavar="auto|CHECKPOINT",
                          help="continue from the newest complete checkpoint of the run (auto) or from a file")
    pretrain.set_defaults(func=_pretrain)


def pretrain_config_flags(parser: argparse.ArgumentParser) -> None:
    """CONFIG and --set, as dex pretrain and dex submit pretrain take them."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set epochs=2 model_args.num_experts=4")


def _pretrain(args: argparse.Namespace) -> int:
    import logging

    from dex.train.objectives import load_pretrain_config
    from dex.train.pretrain import pretrain, summary

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = pretrain(load_pretrain_config(args.config, args.set), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(result.run_dir))
    return 0


def _export_parser(commands) -> None:
    export = command(commands, "export", help="write a run's encoder (and a ViT's director path as a timm ViT)",
                     description="Write the encoder of a pretraining run (its final encoder, else its "
                                 "newest checkpoint) to OUT (config.json + model.safetensors, read by "
                                 "dex.load_pretrained) and, for a ViT, its director path as a plain timm "
                                 "ViT to OUT/director.")
    export.add_argument("run_dir", help="a dex pretrain run folder")
    export.add_argument("out", help="output folder")
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from dex.train.export import export_run

    out = export_run(args.run_dir, args.out)
    print(f"encoder: {out} (dex.load_pretrained)")
    if (out / "director").is_dir():
        print(f"director path as a timm ViT: {out / 'director'} "
              f"(timm.create_model('local-dir:{out / 'director'}', pretrained=True))")
    return 0
