"""``dex submit``: pretraining, curation and benchmark suites as cluster jobs (Slurm, or local processes) with
submitit (dex.cluster), and ``dex submit status``."""

from __future__ import annotations

import argparse

from dex.cli.common import command, suite_selection, suite_selection_flags
from dex.cli.data import curate_option_flags, curate_options
from dex.cli.pretrain import pretrain_config_flags


def add_commands(commands) -> None:
    submit = commands.add_parser("submit", help="run a command as cluster jobs (Slurm, or local processes)",
                                 description="Submit work as jobs with submitit: on Slurm (--executor slurm) or as "
                                             "processes of this machine (--executor local, which waits for them). "
                                             "Logs and job ids: submitit/ of the work's output folder "
                                             "(private/submitit/ for a curation); dex submit status FOLDER.")
    jobs = submit.add_subparsers(dest="submit_command", required=True, metavar="COMMAND")
    pretrain = command(jobs, "pretrain", help="pretraining as one job of nodes x tasks, requeued on pre-emption",
                       description="Run dex pretrain CONFIG as one job: --nodes x --tasks-per-node tasks (one per "
                                   "GPU), DDP or FSDP as the config says, rank and rendezvous from Slurm. On "
                                   "submitit's signal (before the time limit, or on pre-emption) the run "
                                   "checkpoints the step it is at and the job requeues itself and resumes there.")
    pretrain_config_flags(pretrain)
    pretrain.add_argument("--nodes", type=int, default=1, help="nodes (1)")
    pretrain.add_argument("--tasks-per-node", type=int,
                          help="processes a node (default: --gpus-per-node, or 1 without GPUs)")
    pretrain.add_argument("--requeues", type=int, default=100,
                          help="times the job may be requeued after reaching its time limit (100)")
    pretrain.add_argument("--signal-delay", type=int,
                          help="seconds before the time limit that Slurm signals the job to checkpoint (90)")
    _resource_flags(pretrain)
    pretrain.set_defaults(func=_pretrain)

    curate = command(jobs, "curate", help="a curation as an array of parts, then their merge and verification",
                     description="Run dex curate RECIPE --out OUT --part I/N --resume as --parts array jobs, then "
                                 "a job that merges the parts (dex data stats) and verifies every shard (dex data "
                                 "verify); the merge refuses a missing or unfinished part, naming it. Parts already "
                                 "finished are not submitted again; a requeued part resumes from its journal.")
    curate.add_argument("recipe", help="recipe YAML")
    curate.add_argument("--out", required=True, help="output folder")
    curate.add_argument("--parts", type=int, required=True, help="array tasks")
    curate.add_argument("--workers", type=int, default=1, help="processes per part (1)")
    curate.add_argument("--retries", type=int, default=1,
                        help="with --executor local: times a failed part is submitted again (1)")
    curate_option_flags(curate)
    _resource_flags(curate)
    curate.set_defaults(func=_curate)

    benchmark = command(jobs, "benchmark", help="a benchmark suite as an array of jobs, then its tables",
                        description="Deal the runs of SUITE into --jobs parts (whole encoder-task pairs), one array "
                                    "task each (dex benchmark --part I/N), then write the tables: on Slurm a job "
                                    "depending on the array, locally after the parts. Stored runs are skipped, so "
                                    "a rerun submits only what is missing.")
    suite_selection_flags(benchmark)
    benchmark.add_argument("--jobs", type=int, required=True, help="array tasks")
    _resource_flags(benchmark)
    benchmark.set_defaults(func=_benchmark)

    status = command(jobs, "status", help="where submitted work stands: its jobs, logs and progress",
                     description="Print each job of the work submitted from FOLDER (a pretraining run, a "
                                 "curation or a suite's output folder) with its state and log, then the work's "
                                 "progress.")
    status.add_argument("folder", help="the work's output folder")
    status.set_defaults(func=_status)


def _resource_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("local", "slurm"), default="slurm",
                        help="slurm (default), or local: processes of this machine")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--time", type=int, default=60, help="minutes a job may run (60)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores a job asks for")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs a job asks for (0)")
    parser.add_argument("--mem-gb", type=float, help="memory a job asks for, GB")


def _resources(args: argparse.Namespace, **more):
    from dex.cluster import Resources

    return Resources(args.executor, args.partition, args.account, args.time, args.cpus_per_task,
                     args.gpus_per_node, args.mem_gb, **more)


def _print_jobs(submitted: dict) -> None:
    jobs = ", ".join(f"{label}: {job}" for label, job in submitted["jobs"].items())
    print(f"{len(submitted['jobs'])} jobs ({jobs}); logs: {submitted['logs']}")


def _pretrain(args: argparse.Namespace) -> int:
    from dex.cluster import submit_pretrain

    tasks = args.tasks_per_node or args.gpus_per_node or 1
    submitted = submit_pretrain(args.config, args.set,
                                _resources(args, nodes=args.nodes, tasks_per_node=tasks, requeues=args.requeues,
                                           signal_delay=args.signal_delay))
    _print_jobs(submitted)
    print(f"run folder: {submitted['run']}" + ("" if args.executor == "local" else
                                               f" (dex submit status {submitted['run']})"))
    return 0


def _curate(args: argparse.Namespace) -> int:
    from dex.cluster import submit_curate

    submitted = submit_curate(args.recipe, args.out, args.parts, _resources(args), curate_options(args),
                              args.workers, args.retries)
    _print_jobs(submitted)
    if args.executor == "slurm":
        print(f"the merge job runs when every part has ended (dex submit status {args.out})")
    else:
        print(f"merged and verified: {args.out}/stats.md; training reads {args.out}/index.json")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from dex.cluster import submit_benchmark

    submitted = submit_benchmark(args.suite, args.jobs, _resources(args), suite_selection(args))
    _print_jobs(submitted)
    if args.executor == "slurm":
        print("the report job runs when every part has succeeded (dex submit status OUT_DIR)")
    else:
        print(f"tables and figures: {submitted['report']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from dex.cluster import status

    print("\n".join(status(args.folder)))
    return 0
