"""``dex submit``: commands spread over a Slurm cluster or this machine's processes with submitit (dex.cluster)."""

from __future__ import annotations

import argparse

from dex.cli.common import command, suite_selection, suite_selection_flags


def add_commands(commands) -> None:
    submit = commands.add_parser("submit", help="run a command as cluster jobs (Slurm, or local processes)",
                                 description="Submit work as jobs with submitit: on Slurm (--executor slurm) or as "
                                             "processes of this machine (--executor local, which waits for them). "
                                             "Logs and job ids: OUT/submitit/ of the work's output folder.")
    jobs = submit.add_subparsers(dest="submit_command", required=True, metavar="COMMAND")
    benchmark = command(jobs, "benchmark", help="a benchmark suite as an array of jobs, then its tables",
                        description="Deal the runs of SUITE into --jobs parts (whole encoder-task pairs), one array "
                                    "task each (dex benchmark --part I/N), then write the tables: on Slurm a job "
                                    "depending on the array, locally after the parts. Stored runs are skipped, so "
                                    "a rerun submits only what is missing.")
    suite_selection_flags(benchmark)
    benchmark.add_argument("--jobs", type=int, required=True, help="array tasks")
    _resource_flags(benchmark)
    benchmark.set_defaults(func=_benchmark)


def _resource_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("local", "slurm"), default="slurm",
                        help="slurm (default), or local: processes of this machine")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--time", type=int, default=60, help="minutes a job may run (60)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores a job asks for")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs a job asks for (0)")
    parser.add_argument("--mem-gb", type=float, help="memory a job asks for, GB")


def _benchmark(args: argparse.Namespace) -> int:
    from dex.cluster import Resources, submit_benchmark

    resources = Resources(args.executor, args.partition, args.account, args.time, args.cpus_per_task,
                          args.gpus_per_node, args.mem_gb)
    submitted = submit_benchmark(args.suite, args.jobs, resources, suite_selection(args))
    parts = ", ".join(f"{part}: {job}" for part, job in submitted["parts"].items())
    print(f"{len(submitted['parts'])} jobs ({parts}); logs: {submitted['logs']}")
    if args.executor == "slurm":
        print(f"report job {submitted['report']} runs when every part has succeeded (squeue -u $USER)")
    else:
        print(f"tables and figures: {submitted['report']}")
    return 0
