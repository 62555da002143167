"""``dex benchmark`` and ``dex vl-eval``: judging encoders."""

from __future__ import annotations

import argparse

from dex.cli.common import command, suite_selection, suite_selection_flags


def add_commands(commands) -> None:
    _benchmark_parser(commands)
    _vl_eval_parser(commands)


def _benchmark_parser(commands) -> None:
    benchmark = command(
        commands, "benchmark", help="fine-tune and test encoders on a suite of tasks; write the paper's tables",
        description="Run every (encoder, task, seed) of SUITE (resuming: stored runs are skipped), then write the "
                    "per-task and per-modality tables with the gain over the baseline, a radar chart, and the "
                    "ablation tables and figures (docs/benchmark.md).")
    suite_selection_flags(benchmark)
    benchmark.add_argument("--part", default="0/1", metavar="I/N",
                           help="run only part I of N of the runs (a cluster array's task): no reports; then "
                                "--report-only once every part is done")
    benchmark.add_argument("--report-only", action="store_true", help="only recompute the reports from stored runs")
    benchmark.set_defaults(func=_benchmark)


def _benchmark(args: argparse.Namespace) -> int:
    import logging

    from dex.eval.suite import Suite, report_suite, run_suite

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    suite = Suite.load(args.suite, check_encoders=not args.report_only, **suite_selection(args))
    if args.report_only:
        report_suite(suite)
    else:
        run_suite(suite, args.part)
    if args.part != "0/1" and not args.report_only:
        print(f"part {args.part} done; once every part is: dex benchmark {args.suite} --report-only")
        return 0
    report_dir = suite.out_dir / "report"
    for table in ("table1_modalities.md", "table_protocols.md"):
        if (report_dir / table).is_file():
            print((report_dir / table).read_text())
    if suite.reading:
        print(suite.reading.strip() + "\n")
    print(f"tables and figures: {report_dir} (how to read them: {report_dir / 'README.md'})")
    return 0


def _vl_eval_parser(commands) -> None:
    vl_eval = command(
        commands, "vl-eval", help="retrieval, routing and zero-shot figures of a vision-language (MedMoE) model",
        description="Evaluate the MedMoE model MODEL (a dex export folder or a finished run) on the held-out "
                    "image-report pairs of PAIRS (a dex curate collection of pairs): image-to-text and text-to-image "
                    "Recall@1/5/10 against chance, overall and per report type; the routers' agreement with the "
                    "report type; zero-shot classification of the report type and of each --task from class "
                    "prompts. Writes vl_metrics.md and vl_metrics.json to --out.")
    vl_eval.add_argument("model", help="a MedMoE dex export folder or finished run folder")
    vl_eval.add_argument("pairs", help="a dex curate collection of held-out image-report pairs")
    vl_eval.add_argument("--out", required=True, help="output folder")
    vl_eval.add_argument("--task", nargs="+", default=[], help="classification task folders for zero-shot")
    vl_eval.add_argument("--batch-size", type=int, default=64, help="images or texts per batch (64)")
    vl_eval.set_defaults(func=_vl_eval)


def _vl_eval(args: argparse.Namespace) -> int:
    from dex.eval.vision_language import evaluate_vision_language

    result = evaluate_vision_language(args.model, args.pairs, args.out, args.task, args.batch_size)
    retrieval = result["retrieval"]
    print(f"{retrieval['pairs']} pairs: image-to-text R@5 {100 * retrieval['i2t_R@5']:.1f}, text-to-image R@5 "
          f"{100 * retrieval['t2i_R@5']:.1f} (chance {100 * retrieval['chance_R@5']:.1f}); tables: "
          f"{args.out}/vl_metrics.md; every number: {args.out}/vl_metrics.json")
    return 0
