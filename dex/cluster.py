"""Work spread over a Slurm cluster, or over processes of this machine, with submitit (issue 32; MAE's
``submitit_pretrain.py`` and DINOv2's ``run/submit.py`` run on the same library).

So far a benchmark suite: its runs dealt into ``jobs`` parts (:func:`dex.eval.suite.part_of_runs`: whole (encoder,
task) pairs), one array task each, every task storing its records as ``dex benchmark --part I/N`` does, then the
tables once every part is done: on Slurm a job that depends on the whole array (``afterok``), on this machine in the
submitting process after the parts. A rerun submits only what is missing (stored runs are skipped). Logs and job ids
are in the suite's output folder: ``OUT/submitit/`` (submitit's logs of each job, ``%j_0_log.out`` and ``.err``) and
``OUT/submitit/jobs.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from dex.files import write_json

EXECUTORS = ("local", "slurm")


@dataclasses.dataclass
class Resources:
    """Where the jobs run and what each asks for: ``local`` (processes of this machine, submitit's local executor;
    also what the tests use) or ``slurm``."""

    executor: Literal["local", "slurm"] = "local"
    partition: str | None = None
    account: str | None = None
    time: int = 60  # minutes a job may run
    cpus_per_task: int | None = None
    gpus_per_node: int = 0
    mem_gb: float | None = None


def job_parameters(resources: Resources, name: str) -> dict[str, Any]:
    """submitit's ``update_parameters`` of a job: its name, time limit and, on Slurm, what it asks for."""
    parameters: dict[str, Any] = {"name": name, "timeout_min": resources.time}
    if resources.executor == "slurm":
        parameters |= {key: value for key, value in (
            ("slurm_partition", resources.partition), ("slurm_account", resources.account),
            ("cpus_per_task", resources.cpus_per_task), ("gpus_per_node", resources.gpus_per_node or None),
            ("mem_gb", resources.mem_gb)) if value is not None}
    return parameters


def make_executor(folder: Path, resources: Resources, name: str):
    """A submitit executor writing its logs and pickles to ``folder``; a ValueError naming the executor where there
    is no Slurm."""
    import submitit

    if resources.executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {resources.executor!r}")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=resources.executor)
    except RuntimeError as error:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise ValueError(f"--executor {resources.executor}: {error} (--executor local runs the jobs here)") from None
    executor.update_parameters(**job_parameters(resources, name))
    return executor


def benchmark_part(suite_path: str, part: str, selection: dict[str, list[str] | None]) -> str:
    """One array task: part ``part`` ("I/N") of the suite's runs (``selection``: :meth:`Suite.load`'s ``only``,
    ``tasks`` and ``protocols``), stored as ``dex benchmark --part`` stores them."""
    from dex.eval.suite import Suite, run_suite

    run_suite(Suite.load(suite_path, **selection), part)
    return part


def benchmark_report(suite_path: str) -> Path:
    """The tables of a suite from its stored runs (``dex benchmark --report-only``); returns the report folder."""
    from dex.eval.suite import Suite, report_suite

    return report_suite(Suite.load(suite_path, check_encoders=False))


def submit_benchmark(suite_path: str | Path, jobs: int, resources: Resources,
                     selection: dict[str, list[str] | None] | None = None) -> dict[str, Any]:
    """Submit the suite at ``suite_path`` as ``jobs`` array tasks and its report (see the module's docstring);
    ``selection``: the subsets :meth:`dex.eval.suite.Suite.load` takes (``only``, ``tasks``, ``protocols``). The
    suite is read and checked first, so that a bad suite is refused before anything is queued. Returns what
    ``OUT/submitit/jobs.json`` records: the jobs' ids, and for the local executor the report folder (it waits)."""
    from dex.eval.suite import Suite

    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    selection = selection or {}
    suite = Suite.load(suite_path, **selection)
    folder = suite.out_dir / "submitit"
    executor = make_executor(folder, resources, f"dex-benchmark-{suite.out_dir.name}")
    parts = [f"{index}/{jobs}" for index in range(jobs)]
    array = executor.map_array(benchmark_part, [str(suite_path)] * jobs, parts, [selection] * jobs)
    submitted: dict[str, Any] = {"suite": str(suite_path), "executor": resources.executor, "logs": str(folder),
                                 "parts": {part: job.job_id for part, job in zip(parts, array)}}
    if resources.executor == "slurm":  # the report waits on the whole array (its id: the tasks' before "_")
        array_id = array[0].job_id.split("_")[0]
        executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{array_id}"},
                                   name=f"dex-report-{suite.out_dir.name}")
        submitted["report"] = executor.submit(benchmark_report, str(suite_path)).job_id
    else:
        write_json(folder / "jobs.json", submitted)
        for job in array:  # a failed part raises submitit's error, naming its job and log; the others' runs stay
            job.result()
        submitted["report"] = str(benchmark_report(str(suite_path)))
    write_json(folder / "jobs.json", submitted)
    return submitted
