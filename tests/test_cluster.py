"""dex submit with submitit's local executor (dex.cluster): a two-task pretraining equals torchrun's weight for
weight, and one stopped by submitit's signal checkpoints, requeues and ends bit for bit the same; a curation over
three array jobs, one killed and retried, gives the shards of the same split curated in one process; a suite spread
over array jobs gives the records and the tables of one process; bad input is refused before anything is queued;
what a Slurm job asks for; dex submit status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dex.cli import main
from dex.cluster import Resources, job_parameters, make_executor, submit_pretrain
from tests.eval.test_benchmark import SMALL, files
from tests.train.test_pretrain import TINY_ARGS

PRETRAIN_ARGS = [*TINY_ARGS, "samples_per_epoch=24", "epochs=3", "warmup_epochs=1", "checkpoint_every=0",
                 "tensorboard=false"]  # 6 steps an epoch of 8 images, 4 a rank (24 a rank an epoch)


@pytest.fixture(scope="module")
def torchrun_run(phantom_collection, tmp_path_factory):
    """The reference: the tiny pretraining under torchrun, two gloo processes."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    port = 27600 + os.getpid() % 1000
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(port), "-m", "dex", "pretrain", _config(out.parent), "--set", *PRETRAIN_ARGS,
                    f"data={phantom_collection / 'curated'}", f"out_dir={out}"],
                   check=True, capture_output=True, text=True)
    return out


def _config(folder: Path) -> str:
    (folder / "pretrain.yaml").write_text("objective: mae_dex\n")
    return str(folder / "pretrain.yaml")


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def _submit_pretrain(tmp_path: Path, data: Path) -> tuple[Path, dict]:
    out = tmp_path / "run"
    return out, submit_pretrain(_config(tmp_path), [*PRETRAIN_ARGS, f"data={data}", f"out_dir={out}"],
                                Resources("local", tasks_per_node=2))


def test_a_two_task_submitted_pretraining_equals_torchrun(tmp_path, phantom_collection, torchrun_run, capsys):
    out, submitted = _submit_pretrain(tmp_path, phantom_collection / "curated")
    assert (out / "encoder" / "model.safetensors").read_bytes() == \
        (torchrun_run / "encoder" / "model.safetensors").read_bytes()
    assert _steps(out) == _steps(torchrun_run) == list(range(1, 19))
    job = submitted["jobs"]["pretrain"]
    assert (out / "submitit" / f"{job}_0_log.out").is_file() and (out / "submitit" / f"{job}_1_log.out").is_file()
    assert main(["submit", "status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"pretrain: job {job} FINISHED" in printed and "step 18 (epoch 2) logged" in printed
    assert "finished (encoder written)" in printed


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_pretraining_stopped_by_the_signal_checkpoints_requeues_and_ends_bit_for_bit(tmp_path, phantom_collection,
                                                                                   torchrun_run):
    finished: dict = {}
    thread = threading.Thread(target=lambda: finished.update(
        submitted=_submit_pretrain(tmp_path, phantom_collection / "curated")[1]))
    thread.start()
    log, jobs = tmp_path / "run" / "log.jsonl", tmp_path / "run" / "submitit" / "jobs.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.01)
    controller = int(json.loads(jobs.read_text())["jobs"]["pretrain"])  # the local job's id: its controller's pid
    tasks = _children(controller)
    assert len(tasks) == 2
    for task in tasks:  # as Slurm signals every task of the job
        os.kill(task, signal.SIGUSR2)
    thread.join(timeout=300)
    run = tmp_path / "run"
    stopped = json.loads((run / "submitit" / "jobs.json").read_text())["jobs"]["pretrain"]
    logged = (run / "submitit" / f"{stopped}_0_log.out").read_text() + \
        (run / "submitit" / f"{stopped}_0_log.err").read_text()
    assert "Requeued job" in logged and "stopped by a signal after step" in logged
    step = int(logged.split("stopped by a signal after step ")[1].split(";")[0])
    assert 2 <= step < 18  # then the requeued job starts from the checkpoint of that step
    assert f"resumed from {run / 'checkpoints' / f'step-{step:08d}.pt'} at step {step}" in logged
    assert _steps(run) == list(range(1, 19))  # no step lost, none made twice
    assert (run / "encoder" / "model.safetensors").read_bytes() == \
        (torchrun_run / "encoder" / "model.safetensors").read_bytes()


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
    assert set(submitted["jobs"]) == {"part 0/2", "part 1/2"}
    assert submitted["report"] == str(tmp_path / "jobs" / "report")
    for job_id in submitted["jobs"].values():  # each job's log where the user looks: the run folder
        assert (tmp_path / "jobs" / "submitit" / f"{job_id}_0_log.out").is_file()
    assert main(["submit", "status", str(tmp_path / "jobs")]) == 0
    assert f"suite {tmp_path / 'jobs'}: 4 runs stored; tables written" in capsys.readouterr().out


def test_a_bad_suite_is_refused_before_anything_is_queued(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"out_dir: {tmp_path / 'out'}\ntasks: []\nencoders: {{a: {{source: scratch, mode: expert}}}}\n")
    assert main(["submit", "benchmark", str(bad), "--jobs", "2", "--executor", "local"]) == 2
    assert "encoders.a: mode: input should be 'experts' or" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_what_a_slurm_job_asks_for(tmp_path, monkeypatch):
    resources = Resources("slurm", partition="gpu", account="lab", time=90, cpus_per_task=8, gpus_per_node=2,
                          nodes=4, tasks_per_node=2, signal_delay=300)
    assert job_parameters(resources, "dex-pretrain-x") == {
        "name": "dex-pretrain-x", "timeout_min": 90, "slurm_partition": "gpu", "slurm_account": "lab",
        "cpus_per_task": 8, "gpus_per_node": 2, "nodes": 4, "tasks_per_node": 2, "slurm_signal_delay_s": 300,
        "slurm_additional_parameters": {"requeue": True}}
    fake = tmp_path / "bin"  # submitit looks for srun before it makes a Slurm executor
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    executor = make_executor(tmp_path / "jobs", resources, "dex-pretrain-x")
    script = executor._executor._make_submission_file_text("python -m x", "u")  # the sbatch file submitit writes
    for line in ("--job-name=dex-pretrain-x", "--partition=gpu", "--account=lab", "--time=90", "--nodes=4",
                 "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=8", "--signal=USR2@300", "--requeue"):
        assert f"#SBATCH {line}\n" in script, line
    executor.update_parameters(**job_parameters(resources, "dex-merge-x", "afterany:12:13"))
    assert "#SBATCH --dependency=afterany:12:13\n" in executor._executor._make_submission_file_text("x", "u")
    assert job_parameters(Resources("local", partition="gpu"), "x") == {"name": "x", "timeout_min": 60}
    with pytest.raises(ValueError, match="--nodes 2: the local executor runs on this machine, one node"):
        submit_pretrain(None, [f"out_dir={tmp_path / 'run'}"], Resources("local", nodes=2))
    assert not (tmp_path / "run").exists()


def test_bad_input_is_refused_before_anything_is_queued(tmp_path, capsys):
    assert main(["submit", "pretrain", _config(tmp_path), "--set", "epochs=two", f"out_dir={tmp_path / 'run'}",
                 "--executor", "local"]) == 2
    assert "epochs" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["submit", "curate", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "c"), "--parts", "2",
                 "--executor", "local"]) == 2
    assert "none.yaml" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert main(["submit", "status", str(tmp_path)]) == 2
    assert f"{tmp_path}: no jobs.json here or in submitit/ or private/submitit/" in capsys.readouterr().err


def _shards(folder: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in json.loads((folder / "index.json").read_text())["shards"]}


def test_a_curation_over_three_jobs_one_killed_and_retried_equals_one_process(tmp_path, phantom_collection, capsys):
    from dex.data.curation import CurateOptions, curate, finalize

    recipe = phantom_collection / "raw" / "recipe.yaml"
    options = CurateOptions(min_size=16, shard_samples=4)
    one, jobs = tmp_path / "one", tmp_path / "jobs"
    for folder in (one, jobs):  # one salt, so that both name the same images alike
        (folder / "private").mkdir(parents=True)
        shutil.copy(phantom_collection / "curated" / "private" / "salt.txt", folder / "private" / "salt.txt")
    for part in ("0/3", "1/3", "2/3"):
        curate(recipe, one, part=part, options=options, progress=False)
    finalize(one)
    journal = jobs / "journal-1-of-3.jsonl"
    killed: dict = {}

    def kill_part_1() -> None:  # SIGKILL the task of part 1 once it has committed a few shards
        deadline = time.time() + 300
        while time.time() < deadline and (not journal.is_file() or len(journal.read_text().splitlines()) < 3):
            time.sleep(0.002)
        submitted = json.loads((jobs / "private" / "submitit" / "jobs.json").read_text())
        controller = int(submitted["jobs"]["part 1/3"])
        for task in _children(controller):
            os.kill(task, signal.SIGKILL)
        killed.update(job=str(controller), finished='"end"' in journal.read_text())

    killer = threading.Thread(target=kill_part_1)
    killer.start()
    assert main(["submit", "curate", str(recipe), "--out", str(jobs), "--parts", "3", "--executor", "local",
                 "--min-size", "16", "--shard-samples", "4"]) == 0
    killer.join()
    assert killed["finished"] is False  # it was killed before its end
    submitted = json.loads((jobs / "private" / "submitit" / "jobs.json").read_text())
    assert submitted["jobs"]["part 1/3"] != killed["job"]  # submitted again, and resumed
    assert _shards(jobs) == _shards(one) and len(_shards(one)) > 3
    assert json.loads((jobs / "stats.json").read_text()) == json.loads((one / "stats.json").read_text())
    assert not (jobs / "submitit").exists()  # the logs name source files: they stay in private/
    assert main(["submit", "status", str(jobs)]) == 0
    assert "every part finished; merged (index.json)" in capsys.readouterr().out
