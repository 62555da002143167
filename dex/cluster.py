"""Work spread over a Slurm cluster, or over processes of this machine, with submitit (issue 32; MAE's
``submitit_pretrain.py`` and DINOv2's ``run/submit.py`` run on the same library).

- **Pretraining** (:func:`submit_pretrain`): one job of ``nodes`` x ``tasks_per_node`` tasks, each running the same
  :func:`dex.train.pretrain.pretrain` as a torchrun process would (rank, world size and rendezvous from submitit's
  ``TorchDistributedEnvironment``), DDP or FSDP as the config says. On submitit's signal (Slurm sends it ``--signal``
  seconds before the time limit, and on pre-emption where the cluster is set up to) every rank finishes its step,
  the step's checkpoint is written (:mod:`dex.train.preemption`) and the job requeues itself; the requeued job
  resumes from it (``--resume auto``), bit for bit.
- **Curation** (:func:`submit_curate`): an array of ``parts`` jobs, ``dex curate --part I/N --resume`` each (a
  requeued part resumes from its journal), then a merge (:func:`curate_merge`: ``dex data stats`` and ``dex data
  verify``) that refuses a missing or unfinished part, naming it. On Slurm the merge waits for the whole array to end
  (``afterany``, so that a failed part is named by the merge rather than leaving it pending); locally a failed part
  is submitted again (``retries`` times) before the merge.
- **Benchmark suites** (:func:`submit_benchmark`): the suite's runs dealt into ``jobs`` parts
  (:func:`dex.eval.suite.part_of_runs`: whole (encoder, task) pairs), one array task each, every task storing its
  records as ``dex benchmark --part I/N`` does, then the tables once every part is done: on Slurm a job that depends
  on the whole array (``afterok``), locally in the submitting process after the parts.

A rerun of any of them submits what is missing only: stored benchmark runs are skipped, finished curation parts are
not submitted again, a pretraining run resumes from its newest checkpoint. Logs and job ids are in the work's output
folder: ``submitit/`` (a curation's in ``private/submitit/``, since its logs name source files) holds submitit's log
of each job (``JOBID_0_log.out`` and ``.err``) and ``jobs.json``, which :func:`status` reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import submitit

from dex.files import write_json

log = logging.getLogger("dex.cluster")

EXECUTORS = ("local", "slurm")
JOBS = "jobs.json"  # in the submitit folder: the command, the executor and each job's label and id


@dataclasses.dataclass
class Resources:
    """Where the jobs run and what each asks for: ``local`` (processes of this machine, submitit's local executor;
    also what the tests use) or ``slurm``. ``requeues``: how many times a job may be requeued after reaching its
    time limit (submitit's ``max_num_timeout``; requeues after pre-emption are not counted)."""

    executor: Literal["local", "slurm"] = "local"
    partition: str | None = None
    account: str | None = None
    time: int = 60  # minutes a job may run
    cpus_per_task: int | None = None
    gpus_per_node: int = 0
    mem_gb: float | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    requeues: int = 3
    signal_delay: int | None = None  # seconds before the time limit that Slurm signals (submitit's default: 90)


def job_parameters(resources: Resources, name: str, after: str | None = None) -> dict[str, Any]:
    """submitit's ``update_parameters`` of a job: its name, time limit, tasks and, on Slurm, what it asks for,
    ``--requeue`` (Slurm requeues a job whose node failed, and the job resumes from what it stored) and the
    dependency ``after`` (e.g. ``afterok:123``)."""
    parameters: dict[str, Any] = {"name": name, "timeout_min": resources.time}
    if resources.tasks_per_node != 1:
        parameters["tasks_per_node"] = resources.tasks_per_node
    if resources.executor == "slurm":
        parameters |= {key: value for key, value in (
            ("slurm_partition", resources.partition), ("slurm_account", resources.account),
            ("cpus_per_task", resources.cpus_per_task), ("gpus_per_node", resources.gpus_per_node or None),
            ("mem_gb", resources.mem_gb), ("nodes", resources.nodes if resources.nodes != 1 else None),
            ("slurm_signal_delay_s", resources.signal_delay))
            if value is not None}
        parameters["slurm_additional_parameters"] = {"requeue": True, **({"dependency": after} if after else {})}
    return parameters


def make_executor(folder: Path, resources: Resources, name: str) -> submitit.AutoExecutor:
    """A submitit executor writing its logs and pickles to ``folder``; a ValueError naming the executor where there
    is no Slurm, or for several nodes on this machine."""
    if resources.executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {resources.executor!r}")
    if resources.executor == "local" and resources.nodes != 1:
        raise ValueError(f"--nodes {resources.nodes}: the local executor runs on this machine, one node")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=resources.executor,
                                         slurm_max_num_timeout=resources.requeues,
                                         local_max_num_timeout=resources.requeues)
    except RuntimeError as error:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise ValueError(f"--executor {resources.executor}: {error} (--executor local runs the jobs here)") from None
    executor.update_parameters(**job_parameters(resources, name))
    return executor


def _record(folder: Path, command: str, resources: Resources, jobs: dict[str, str], **extra: Any) -> dict[str, Any]:
    """Write and return ``folder/jobs.json``: the command, the executor, the logs' folder and each job's id."""
    submitted = {"command": command, "executor": resources.executor, "logs": str(folder), "jobs": jobs, **extra}
    write_json(folder / JOBS, submitted)
    return submitted


def _submit_array(executor: submitit.AutoExecutor, calls: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each call as a job (one Slurm array), by label."""
    if not calls:
        return {}
    with executor.batch():
        jobs = {label: executor.submit(call) for label, call in calls.items()}
    return jobs


def _wait_locally(executor: submitit.AutoExecutor, jobs: dict[str, Any], calls: dict[str, Callable[[], Any]],
                  retries: int) -> None:
    """Wait for the local ``jobs``, submitting a failed one again up to ``retries`` times (``jobs`` is updated);
    a ValueError naming the job and its log when one still fails."""
    for label in list(jobs):
        for attempt in range(retries + 1):
            try:
                jobs[label].results()
                break
            except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
                reason = str(error).strip().splitlines()[0]
                if attempt == retries:
                    raise ValueError(f"{label} (job {jobs[label].job_id}) failed: {reason}; its log: "
                                     f"{jobs[label].paths.stderr}") from None
                log.warning("%s (job %s) failed (%s); submitting it again", label, jobs[label].job_id, reason)
                jobs[label] = executor.submit(calls[label])


class Resumable(submitit.helpers.Checkpointable):
    """``function(*args)`` as a job that, on submitit's signal, is requeued as it was: for work that stores its
    progress as it goes and takes up from there (a curation part, a benchmark part)."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __call__(self) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        return self.function(*self.args)


# --- pretraining -------------------------------------------------------------------------------------------------

class PretrainJob:
    """What every task of a ``dex submit pretrain`` job runs: the rank's :func:`~dex.train.pretrain.pretrain` of
    ``config``, resumed from the run's newest checkpoint (``auto``: none on the first start). submitit calls
    :meth:`checkpoint` on the main rank once the run has stopped on the signal, and requeues the job."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def __call__(self) -> str:
        from dex.train.preemption import Stopped, StopSignal
        from dex.train.pretrain import pretrain

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        requeue_signal = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        with StopSignal(requeue_signal) as stop:
            try:
                return str(pretrain(self.config, resume="auto", stop=stop).run_dir)
            except Stopped as stopped:
                log.info("rank %d: %s", environment.rank, stopped)
                message = f"stopped after step {stopped.step}"
        if environment.rank == 0:  # submitit's own handler: calls checkpoint(), requeues the job and exits
            stop.previous[requeue_signal](requeue_signal, None)
        return message

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(PretrainJob(self.config))


def submit_pretrain(config_path: str | Path | None, overrides: list[str], resources: Resources) -> dict[str, Any]:
    """Submit the pretraining of the config at ``config_path`` with ``overrides`` (``KEY=VALUE``) as one job of
    ``resources.nodes`` x ``resources.tasks_per_node`` tasks (see the module's docstring); the config is read and
    checked first. Returns what ``OUT/submitit/jobs.json`` records; the local executor waits for the run."""
    from dex.train.objectives import load_pretrain_config

    config = load_pretrain_config(config_path, overrides)
    out = Path(config.out_dir)
    folder = out / "submitit"
    executor = make_executor(folder, resources, f"dex-pretrain-{out.name}")
    job = executor.submit(PretrainJob(config))
    submitted = _record(folder, "pretrain", resources, {"pretrain": job.job_id}, run=str(out))
    if resources.executor == "local":
        _wait_locally(executor, {"pretrain": job}, {}, retries=0)
    return submitted


# --- curation ----------------------------------------------------------------------------------------------------

def curate_part(recipe: str, out: str, part: str, options: Any, workers: int) -> str:
    """One array task: ``dex curate RECIPE --out OUT --part I/N --resume``."""
    from dex.data.curation import curate, private_log

    with private_log(Path(out)):
        curate(recipe, out, workers=workers, resume=True, part=part, options=options, progress=False)
    return part


def curate_merge(out: str) -> str:
    """The job after the parts: ``dex data stats OUT`` (which refuses a missing or unfinished part, naming it),
    then ``dex data verify OUT``; a ValueError naming each shard that does not verify."""
    from dex.data.curation import finalize, stats_markdown, verify

    stats = stats_markdown(finalize(out))
    shards, problems = verify(out)
    if problems:
        raise ValueError(f"{out}: {len(problems)} of {shards} shards do not verify: "
                         + "; ".join(f"{p.path}: {p.reason}" for p in problems[:5]))
    log.info("%s: %d shards verified\n%s", out, shards, stats)
    return stats


def submit_curate(recipe: str | Path, out: str | Path, parts: int, resources: Resources, options: Any = None,
                  workers: int = 1, retries: int = 1) -> dict[str, Any]:
    """Submit the curation of ``recipe`` into ``out`` as ``parts`` array jobs and the merge (see the module's
    docstring); parts already finished in ``out`` are not submitted again. The recipe is read first. Returns what
    ``OUT/private/submitit/jobs.json`` records; the local executor waits and merges."""
    from dex.data.curation import PRIVATE, part_journals, unfinished_parts
    from dex.data.recipe import Recipe

    if parts < 1:
        raise ValueError(f"--parts must be at least 1, got {parts}")
    Recipe.load(recipe)  # a bad recipe is refused before anything is queued
    out = Path(out)
    existing = set(part_journals(out))
    if existing - {parts}:
        raise ValueError(f"{out} holds a curation in {min(existing)} parts; submit it with --parts "
                         f"{min(existing)}, or choose an empty folder")
    folder = out / PRIVATE / "submitit"
    executor = make_executor(folder, resources, f"dex-curate-{out.name}")
    todo = [f"{i}/{parts}" for i in range(parts)]
    if existing:
        unfinished = set(unfinished_parts(out))
        todo = [p for p in todo if any(line.startswith(f"part {p} ") for line in unfinished)]
    calls = {f"part {p}": Resumable(curate_part, str(recipe), str(out), p, options, workers) for p in todo}
    jobs = _submit_array(executor, calls)
    if resources.executor == "slurm":
        arrays = sorted({job.job_id.split("_")[0] for job in jobs.values()})
        executor.update_parameters(**job_parameters(resources, f"dex-merge-{out.name}",
                                                    "afterany:" + ":".join(arrays) if arrays else None))
        merge = executor.submit(curate_merge, str(out))
        return _record(folder, "curate", resources, {**_ids(jobs), "merge": merge.job_id}, collection=str(out))
    _record(folder, "curate", resources, _ids(jobs), collection=str(out))
    _wait_locally(executor, jobs, calls, retries)
    curate_merge(str(out))
    return _record(folder, "curate", resources, _ids(jobs), collection=str(out))


def _ids(jobs: dict[str, Any]) -> dict[str, str]:
    return {label: job.job_id for label, job in jobs.items()}


# --- benchmark suites --------------------------------------------------------------------------------------------

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
    calls = {f"part {i}/{jobs}": Resumable(benchmark_part, str(suite_path), f"{i}/{jobs}", selection)
             for i in range(jobs)}
    array = _submit_array(executor, calls)
    if resources.executor == "slurm":  # the report waits on the whole array (its id: the tasks' before "_")
        array_id = next(iter(array.values())).job_id.split("_")[0]
        executor.update_parameters(**job_parameters(resources, f"dex-report-{suite.out_dir.name}",
                                                    f"afterok:{array_id}"))
        report = executor.submit(benchmark_report, str(suite_path))
        return _record(folder, "benchmark", resources, {**_ids(array), "report": report.job_id}, suite=str(suite_path))
    _record(folder, "benchmark", resources, _ids(array), suite=str(suite_path))
    _wait_locally(executor, array, calls, retries=0)  # a failed part's stored runs stay; a rerun does the rest
    return _record(folder, "benchmark", resources, _ids(array), suite=str(suite_path),
                   report=str(benchmark_report(str(suite_path))))


# --- status ------------------------------------------------------------------------------------------------------

def find_jobs(folder: str | Path) -> Path:
    """The ``jobs.json`` of the work in ``folder`` (a run, collection or suite output folder, or its ``submitit``
    folder); a ValueError when there is none."""
    folder = Path(folder)
    for candidate in (folder / JOBS, folder / "submitit" / JOBS, folder / "private" / "submitit" / JOBS):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{folder}: no {JOBS} here or in submitit/ or private/submitit/ (was it run with dex submit?)")


def status(folder: str | Path) -> list[str]:
    """Lines telling where the submitted work in ``folder`` stands: each job's state (Slurm's, through submitit;
    for the local executor whether it left a result) and log, then the work's own progress (the run's last logged
    step and checkpoint, the curation's unfinished parts, the suite's stored runs and report)."""
    path = find_jobs(folder)
    submitted = json.loads(path.read_text())
    logs = Path(submitted["logs"])
    job_class = submitit.SlurmJob if submitted["executor"] == "slurm" else submitit.LocalJob
    lines = [f"{submitted['command']} ({submitted['executor']}), logs in {logs}"]
    for label, job_id in submitted["jobs"].items():
        job = job_class(folder=logs, job_id=job_id)
        lines.append(f"  {label}: job {job_id} {job.state}; log {job.paths.stdout}")
    return lines + _progress(submitted)


def _progress(submitted: dict[str, Any]) -> list[str]:
    if submitted["command"] == "pretrain":
        run = Path(submitted["run"])
        rows = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").is_file() else []
        last = json.loads(rows[-1]) if rows else None
        checkpoints = sorted((run / "checkpoints").glob("step-*.pt"))
        return [f"  run {run}: " + (f"step {last['step']} (epoch {last['epoch']}) logged" if last else "no step yet")
                + (f"; newest checkpoint {checkpoints[-1].name}" if checkpoints else "")
                + ("; finished (encoder written)" if (run / "encoder").is_dir() else "")]
    if submitted["command"] == "curate":
        from dex.data.curation import unfinished_parts

        out = Path(submitted["collection"])
        unfinished = unfinished_parts(out)
        return [f"  collection {out}: " + ("; ".join(unfinished) if unfinished else "every part finished")
                + ("; merged (index.json)" if not unfinished and (out / "index.json").is_file() else "")]
    from dex.eval.suite import Suite

    out = Suite.load(submitted["suite"], check_encoders=False).out_dir
    stored = len(list((out / "runs").rglob("seed*.json")))
    return [f"  suite {out}: {stored} runs stored"
            + ("; tables written" if (out / "report" / "README.md").is_file() else "")]
