"""dex submit with submitit's local executor (dex.cluster): a suite spread over array jobs gives the records and the
tables of one process; a bad suite is refused before anything is queued; what a Slurm job asks for."""

from __future__ import annotations

import json

import submitit
import yaml

from dex.cli import main
from dex.cluster import Resources, job_parameters
from tests.eval.test_benchmark import SMALL, files


def _suite(tmp_path, tasks, out):
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / out), "seeds": [0], "baseline": "scratch", "protocols": ["finetune", "linear"],
        "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "steps_per_epoch": 2, "mirror": "none"},
        "encoders": {"scratch": {"source": "scratch", "img_size": 32, "model_args": SMALL}},
        "tasks": [str(tasks / "xray-lungs"), str(tasks / "photo-lesion-type")]}))
    return str(path)


def _records(folder):
    return {str(p.relative_to(folder)): {k: v for k, v in json.loads(p.read_text()).items()
                                         if not k.endswith("seconds")} for p in sorted(folder.rglob("seed*.json"))}


def test_a_suite_over_two_local_jobs_equals_one_process(phantom_collection, tmp_path, capsys):
    tasks = phantom_collection / "raw" / "tasks"
    assert main(["benchmark", _suite(tmp_path, tasks, "whole")]) == 0
    assert main(["submit", "benchmark", _suite(tmp_path, tasks, "jobs"), "--jobs", "2", "--executor", "local"]) == 0
    assert f"tables and figures: {tmp_path / 'jobs' / 'report'}" in capsys.readouterr().out
    assert _records(tmp_path / "jobs" / "runs") == _records(tmp_path / "whole" / "runs")
    assert files(tmp_path / "jobs" / "report") == files(tmp_path / "whole" / "report")
    submitted = json.loads((tmp_path / "jobs" / "submitit" / "jobs.json").read_text())
    assert set(submitted["parts"]) == {"0/2", "1/2"}
    for job_id in submitted["parts"].values():  # each job's log where the user looks: the run folder
        assert (tmp_path / "jobs" / "submitit" / f"{job_id}_0_log.out").is_file()


def test_a_bad_suite_is_refused_before_anything_is_queued(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"out_dir: {tmp_path / 'out'}\ntasks: []\nencoders: {{a: {{source: scratch, mode: expert}}}}\n")
    assert main(["submit", "benchmark", str(bad), "--jobs", "2", "--executor", "local"]) == 2
    assert "encoders.a: mode: input should be 'experts' or" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_what_a_slurm_job_asks_for(tmp_path):
    parameters = job_parameters(Resources("slurm", partition="gpu", account="lab", time=90, cpus_per_task=8,
                                          gpus_per_node=2), "dex-benchmark-x")
    assert parameters == {"name": "dex-benchmark-x", "timeout_min": 90, "slurm_partition": "gpu",
                          "slurm_account": "lab", "cpus_per_task": 8, "gpus_per_node": 2}
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="debug")  # submitit checks the names it is given
    executor.update_parameters(**{k: v for k, v in parameters.items() if not k.startswith("slurm_")})
    assert job_parameters(Resources("local", partition="gpu"), "x") == {"name": "x", "timeout_min": 60}
