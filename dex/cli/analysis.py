"""``dex analyze`` and ``dex report``: what the experts learned, and one page of a run, benchmark or analysis."""

from __future__ import annotations

import argparse

from dex.cli.common import command


def add_commands(commands) -> None:
    _analyze_parser(commands)
    _report_parser(commands)


def _analyze_parser(commands) -> None:
    analyze = command(
        commands, "analyze",
        help="routing, attention, pattern layout, cost and modality-collapse analyses of an encoder",
        description="Analyse ENCODER on the labelled images of DATA: expert activation per modality and layer "
                    "(Fig. 9) with NMI, usage entropy and shared experts; last-block attention of the centre patch "
                    "(Fig. 6); k-means pattern layout of patch features (Fig. 7); FLOPs of image-wise vs token-wise "
                    "activation (Fig. 8); per-layer modality probe and between-modality variance (App. A) next to "
                    "the --compare encoders. Writes analysis.md, analysis.json and the figures to --out.")
    analyze.add_argument("encoder", help="an exported encoder folder, a pretraining run, 'scratch' or "
                                         "timm:ARCH:FILE (a weights file with its architecture)")
    analyze.add_argument("data", help="a dex curate output folder, or a folder of images in modality sub-folders")
    analyze.add_argument("--out", required=True, help="output folder")
    analyze.add_argument("--compare", nargs="+", default=[], metavar="NAME=SOURCE",
                         help="baselines for the collapse diagnostics, e.g. scratch=scratch mae=runs/mae/encoder")
    analyze.add_argument("--per-modality", type=int, default=40, help="images per modality (40)")
    analyze.add_argument("--clusters", type=int, default=4, help="k-means clusters of the pattern layout (4)")
    analyze.add_argument("--cost-model", default="dex_vit_base_patch16_256",
                         help="architecture of the FLOP count (dex_vit_base_patch16_256, the paper's ViT-B)")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.set_defaults(func=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    from dex.analysis.analyze import analyze

    compare = {}
    for item in args.compare:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--compare takes NAME=SOURCE, got {item!r}")
        compare[name] = source
    analyze(args.encoder, args.data, args.out, compare=compare, per_modality=args.per_modality,
            clusters=args.clusters, cost_model=args.cost_model, seed=args.seed)
    print(f"tables: {args.out}/analysis.md; every number: {args.out}/analysis.json; page: dex report {args.out}")
    return 0


def _report_parser(commands) -> None:
    report = command(
        commands, "report", help="one self-contained HTML page of a run, benchmark or analysis folder",
        description="Write FOLDER/report.html: every pretraining run (config, curves, summary), benchmark (tables, "
                    "figures) and analysis (tables, figures) in FOLDER and its sub-folders, with the figures "
                    "embedded, so that the page opens offline.")
    report.add_argument("folder", help="a run, benchmark or analysis folder, or a folder holding several")
    report.add_argument("--out", help="HTML file to write (FOLDER/report.html)")
    report.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from dex.analysis.report import write_report

    print(f"report: {write_report(args.folder, args.out)}")
    return 0
