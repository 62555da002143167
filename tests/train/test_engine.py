"""The pretraining engine: checkpoints, resume after SIGKILL, skipped steps, DDP = one process, export, monitoring."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp

import dex
from dex.config import load_config
from dex.checkpoint import CheckpointManager, NoUsableCheckpointError
from dex.train.monitor import RunMonitor, normalised_entropy
from dex.train.objectives import MAEDEXConfig, MAEDEXObjective, load_pretrain_config
from dex.train.pretrain import pretrain
from tests.train.test_pretrain import TINY_ARGS


def weights(path: Path) -> bytes:
    return (path / "encoder" / "model.safetensors").read_bytes()


@pytest.fixture
def curated(phantom_collection):
    return [*TINY_ARGS, f"data={phantom_collection / 'curated'}", "samples_per_epoch=32", "epochs=3",
            "checkpoint_every=1", "tensorboard=false"]


@pytest.fixture
def image_folder(phantom_collection, tmp_path):
    """Up to 32 raw phantom images in modality folders (an uncurated image folder)."""
    folder = tmp_path / "images"
    for modality, source in (("OCT", "oct-png"), ("US", "us-png")):
        (folder / modality).mkdir(parents=True)
        for path in sorted((phantom_collection / "raw" / "sources" / source).glob("*.png"))[:16]:
            shutil.copy(path, folder / modality / path.name)
    return folder


# --- checkpoints -------------------------------------------------------------------------------------------------

def test_checkpoints_keep_last_n_plus_milestones_and_skip_corrupt_ones(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in range(1, 6):
        manager.save({"value": torch.tensor([step])}, step, milestone=step == 2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step-00000002.pt", "step-00000004.pt",
                                                             "step-00000005.pt"]
    assert int(manager.load_latest()["value"]) == 5
    newest = tmp_path / "step-00000005.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # cut short by a crash or a full disk
    assert int(manager.load_latest()["value"]) == 4
    assert any("SHA-256" in r.getMessage() for r in caplog.records)
    (tmp_path / "index.json").write_text("{broken")  # even without the index, files that load are used
    assert int(manager.load_latest()["value"]) == 4


class Payload:
    """Unpickling it opens ``marker`` for writing, which creates the file: what a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_checkpoints_that_all_fail_are_an_error_naming_each_and_why(tmp_path, caplog):
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.load_latest() is None  # no folder
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("no checkpoint here")
    assert manager.load_latest() is None  # no checkpoint files
    for step in (1, 2):
        manager.save({"value": torch.tensor([step])}, step)
    first, second = (tmp_path / "checkpoints" / f"step-0000000{step}.pt" for step in (1, 2))
    second.write_bytes(second.read_bytes()[:100])
    torch.save({"value": Payload(tmp_path / "unpickled")}, tmp_path / "checkpoints" / "step-00000003.pt")
    assert int(manager.load_latest()["value"]) == 1  # the newest two fail: the previous one is used
    assert "step-00000003.pt is refused as unsafe" in caplog.text
    assert "step-00000002.pt fails its SHA-256" in caplog.text
    first.write_bytes(b"garbage")
    (tmp_path / "checkpoints" / "index.json").unlink()  # without hashes, the files are loaded and fail there
    with pytest.raises(NoUsableCheckpointError) as error:
        manager.load_latest()
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'checkpoints'}: no checkpoint verifies and loads: ")
    assert "step-00000003.pt is refused as unsafe (it holds io.open, which is not unpickled)" in message
    assert "step-00000002.pt does not load (not a readable PyTorch file" in message
    assert "step-00000001.pt does not load (not a readable PyTorch file" in message
    assert not (tmp_path / "unpickled").exists()


def test_checkpoints_hold_no_pickled_objects(tmp_path, curated):
    config = load_config(MAEDEXConfig, None, [*curated, f"out_dir={tmp_path}", "epochs=1"])
    pretrain(config)
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)  # raises on anything but tensors and plain values
        assert {"model", "optimizer", "train", "rng", "config", "version"} <= state.keys()
        assert state["train"]["step"] >= 1 and len(state["rng"]) == 1


# --- determinism -------------------------------------------------------------------------------------------------

def test_two_cpu_runs_with_one_seed_are_bit_for_bit_identical(tmp_path, phantom_collection):
    """At the demo's sizes (batch 32, 64 px, R = 8, K = 2) on two threads; before seed_everything selected the
    deterministic kernels, such runs drifted apart within 20 to 80 steps."""
    args = [f"data={phantom_collection / 'curated'}", "epochs=16", "log_every=5", "keep_checkpoints=1",
            "tensorboard=false"]
    for name in ("a", "b"):
        pretrain(load_config(MAEDEXConfig, "configs/pretrain_demo.yaml", [*args, f"out_dir={tmp_path / name}"]))
    assert torch.get_num_threads() > 1 or os.cpu_count() == 1
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") >= 16
    assert weights(tmp_path / "a") == weights(tmp_path / "b")


# --- resume ------------------------------------------------------------------------------------------------------

def run_and_kill(command: list[str], run_dir: Path, after_step: int = 3) -> None:
    """Start ``command`` (a ``dex pretrain`` run into ``run_dir``) and SIGKILL it once it has checkpointed
    ``after_step`` steps."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = run_dir / "checkpoints" / "index.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if max(e["step"] for e in json.loads(index.read_text())["checkpoints"]) >= after_step:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError):
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def clean_killed_resumed(config: str, args: list[str], tmp_path: Path,
                         parts: tuple[str, ...] = ("encoder/model.safetensors",)) -> None:
    """Run ``dex pretrain CONFIG --set ARGS`` whole, and again SIGKILLed part-way then resumed; ``parts`` of the two
    run folders must be byte-identical."""
    clean = tmp_path / "clean"
    pretrain(load_pretrain_config(config, [*args, f"out_dir={clean}"]))
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "dex", "pretrain", config, "--set", *args, f"out_dir={killed}"]
    run_and_kill(command, killed)
    assert not (killed / "encoder").exists()  # killed part-way
    resumed = subprocess.run([*command, "--resume", "auto"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    for part in parts:
        assert (killed / part).read_bytes() == (clean / part).read_bytes(), part


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_ends_bit_for_bit_identical(tmp_path, curated, workers):
    args = [*curated, f"num_workers={workers}", "epochs=8", "keep_checkpoints=3"]
    clean = tmp_path / "clean"
    pretrain(load_config(MAEDEXConfig, "configs/pretrain_demo.yaml", [*args, f"out_dir={clean}"]))
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "dex", "pretrain", "configs/pretrain_demo.yaml", "--set", *args,
               f"out_dir={killed}"]
    run_and_kill(command, killed)
    assert not (killed / "encoder").exists()  # killed part-way
    resumed = subprocess.run([*command, "--resume", "auto"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert weights(killed) == weights(clean)
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == list(range(1, 33))  # every step logged once


def test_resume_from_a_given_checkpoint_file_and_bad_paths(tmp_path, curated):
    config = load_config(MAEDEXConfig, None, [*curated, f"out_dir={tmp_path / 'a'}"])
    pretrain(config)
    middle = sorted((tmp_path / "a" / "checkpoints").glob("*.pt"))[0]
    again = load_config(MAEDEXConfig, None, [*curated, f"out_dir={tmp_path / 'b'}", "log_every=3"])
    pretrain(again, resume=str(middle))  # where it writes and how often it logs are free to change
    assert weights(tmp_path / "b") == weights(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        pretrain(again, resume=str(tmp_path / "nowhere.pt"))
    longer = load_config(MAEDEXConfig, None, [*curated, f"out_dir={tmp_path / 'c'}", "epochs=4", "base_lr=0.01"])
    with pytest.raises(ValueError, match=rf"{middle.name}: cannot resume from it with other settings than it was "
                                         r"written with \(base_lr 0.0001 -> 0.01; epochs 3 -> 4\)"):
        pretrain(longer, resume=str(middle))
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_resume_auto_refuses_a_run_whose_checkpoints_all_fail_and_writes_nothing(tmp_path, curated, capsys):
    run = tmp_path / "run"
    command = ["pretrain", "configs/pretrain_demo.yaml", "--set", *curated, f"out_dir={run}", "epochs=1",
               "keep_checkpoints=2"]
    assert dex.cli.main(command) == 0
    shutil.rmtree(run / "encoder")  # as if killed before the end
    checkpoints = sorted((run / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 2
    for path in checkpoints:
        path.write_bytes(path.read_bytes()[:1000])
    before = {name: (run / name).read_bytes() for name in ("log.jsonl", "config.yaml")}
    capsys.readouterr()
    assert dex.cli.main([*command, "--resume", "auto"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("dex pretrain: error: ")
    assert all(f"{path.name} fails its SHA-256 check" in errors[0] for path in checkpoints)
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / "encoder").exists()


def test_resume_auto_refuses_to_start_over_on_a_run_with_logged_steps(tmp_path, curated):
    config = load_config(MAEDEXConfig, None, [*curated, f"out_dir={tmp_path / 'run'}", "epochs=1"])
    pretrain(config, resume="auto")  # a brand-new folder starts fresh
    log_rows = (tmp_path / "run" / "log.jsonl").read_bytes()
    assert log_rows
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(ValueError, match=f"{tmp_path / 'run'}: log.jsonl records training steps but there is no "
                                         "checkpoint"):
        pretrain(config, resume="auto")
    assert (tmp_path / "run" / "log.jsonl").read_bytes() == log_rows
    (tmp_path / "run" / "log.jsonl").write_text("")  # no rows: nothing to lose
    assert pretrain(config, resume="auto").run_dir == tmp_path / "run"


# --- skipped steps -----------------------------------------------------------------------------------------------

def test_non_finite_step_is_skipped_and_counted(tmp_path, curated, monkeypatch):
    original = MAEDEXObjective.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third step's loss is NaN
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(MAEDEXObjective, "forward", poisoned)
    config = load_config(MAEDEXConfig, None, [*curated, f"out_dir={tmp_path}", "epochs=1", "keep_checkpoints=10"])
    pretrain(config)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1]
    before = torch.load(tmp_path / "checkpoints" / "step-00000002.pt", weights_only=True)
    after = torch.load(tmp_path / "checkpoints" / "step-00000003.pt", weights_only=True)
    for key, value in before["model"].items():  # nothing moved: weights, directors, usage statistics
        assert torch.equal(after["model"][key], value), key
    assert torch.equal(after["optimizer"]["state"][0]["exp_avg"], before["optimizer"]["state"][0]["exp_avg"])


# --- DDP ---------------------------------------------------------------------------------------------------------

def _rank(rank: int, world: int, port: int, args: list[str], out: str, resume: str | None = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    config = load_pretrain_config(None, [*args, f"out_dir={out}"])
    result = pretrain(config, resume=resume)
    if config.distributed == "ddp":
        torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, image_folder, mode):
    args = [*TINY_ARGS, f"data={image_folder}", "batch_size=8", "epochs=2", "checkpoint_every=0",
            "tensorboard=false", f"distributed={mode}"]
    port = 29600 + os.getpid() % 500 + (0 if mode == "ddp" else 500)
    mp.spawn(_rank, args=(2, port, args, str(tmp_path / mode)), nprocs=2, join=True)
    single = pretrain(load_config(MAEDEXConfig, None, [*args, f"out_dir={tmp_path / 'one'}"])).model.state_dict()
    assert any(".director." in k for k in single) and any(".router.usage" in k for k in single)
    if mode == "ddp":  # each rank holds the whole model: the ranks agree, and agree with one process
        ranks = [torch.load(tmp_path / mode / f"rank{r}.pt", weights_only=True) for r in range(2)]
        for key, value in single.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), key
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5, msg=key)
    sharded = dex.load_pretrained(tmp_path / mode / "encoder").state_dict()  # gathered from the shards
    for key, value in sharded.items():
        torch.testing.assert_close(value, single[f"encoder.{key}"], rtol=1e-4, atol=1e-5, msg=key)
    logged = [json.loads(line) for line in (tmp_path / mode / "log.jsonl").read_text().splitlines()]
    images = sum(1 for _ in image_folder.rglob("*.png"))
    assert len(logged) == 2 * (images // 8) and all(r["skipped"] == 0 for r in logged)  # 2 epochs of 8 per step


def test_gradient_accumulation_equals_the_full_batch(tmp_path, image_folder):
    args = [*TINY_ARGS, f"data={image_folder}", "batch_size=8", "epochs=1", "checkpoint_every=0",
            "tensorboard=false"]
    full = pretrain(load_config(MAEDEXConfig, None, [*args, f"out_dir={tmp_path / 'a'}"])).model.state_dict()
    accumulated = pretrain(load_config(MAEDEXConfig, None, [*args, f"out_dir={tmp_path / 'b'}",
                                                              "accum_steps=2"])).model.state_dict()
    for key, value in full.items():
        if "router.usage" in key:
            continue  # the balance loss is a per-micro-batch statistic, the rest matches
        torch.testing.assert_close(accumulated[key], value, rtol=1e-2, atol=1e-3, msg=key)


# --- export ------------------------------------------------------------------------------------------------------

def test_export_round_trip(tmp_path, curated):
    run = tmp_path / "run"
    config = load_config(MAEDEXConfig, None, [*curated, f"out_dir={run}", "epochs=1"])
    trained = pretrain(config).model.encoder.eval()
    assert dex.cli.main(["export", str(run), str(tmp_path / "out")]) == 0
    encoder = dex.load_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder.forward_features(x), trained.forward_features(x))
    vit = timm.create_model(f"local-dir:{tmp_path / 'out' / 'director'}", pretrained=True).eval()
    trained.set_mode("director")
    assert (vit.forward_features(x) - trained.forward_features(x)).abs().max() < 1e-5
    shutil.rmtree(run / "encoder")  # an unfinished run exports from its newest checkpoint
    assert dex.cli.main(["export", str(run), str(tmp_path / "again")]) == 0
    exported_again = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert exported_again == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_export_names_checkpoints_refused_as_unsafe(tmp_path, curated, capsys):
    run = tmp_path / "run"
    pretrain(load_config(MAEDEXConfig, None, [*curated, f"out_dir={run}", "epochs=1", "keep_checkpoints=2"]))
    shutil.rmtree(run / "encoder")
    (run / "checkpoints" / "index.json").unlink()
    checkpoints = sorted((run / "checkpoints").glob("*.pt"))
    for path in checkpoints:  # a checkpoint that would run code when unpickled
        torch.save({"model": {}, "train": Payload(tmp_path / "unpickled")}, path)
    capsys.readouterr()
    assert dex.cli.main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "nor a checkpoint" not in err
    assert all(f"{path.name} is refused as unsafe" in err for path in checkpoints)
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "out").exists()


# --- monitoring --------------------------------------------------------------------------------------------------

def test_routing_collapse_is_warned_after_a_sustained_low_entropy(tmp_path, caplog):
    assert normalised_entropy([1, 1, 1, 1]) == pytest.approx(1.0)
    assert normalised_entropy([1, 0, 0, 0]) == 0.0
    monitor = RunMonitor(tmp_path, True, tensorboard=False, collapse_threshold=0.5, collapse_patience=3)
    for step, entropy in enumerate([0.9, 0.2, 0.1, 0.3, 0.2, 0.9], start=1):
        monitor.log({"step": step, "loss": 1.0, "usage_entropy": [0.9, entropy]})
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [("warnings" in r) for r in rows] == [False, False, False, True, False, False]
    assert "layer 1: routing collapsed" in rows[3]["warnings"][0]
    assert any("routing collapsed" in r.getMessage() for r in caplog.records)
    RunMonitor(tmp_path, True, start_step=2, tensorboard=False)  # a resume at step 2 drops the later rows
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_tensorboard_scalars(tmp_path, curated):
    pytest.importorskip("tensorboard")
    config = load_config(MAEDEXConfig, None, [*curated, f"out_dir={tmp_path}", "epochs=1", "tensorboard=true"])
    pretrain(config)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/alignment", "train/balance", "train/lr", "train/momentum", "train/noise_std",
            "train/grad_norm", "train/skipped", "train/images_per_s", "routing/entropy_layer00"} <= tags


def test_torch_compile_matches_eager(tmp_path, curated):
    args = [*curated, "epochs=1", "samples_per_epoch=16", "checkpoint_every=0"]
    losses = []
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        pretrain(load_config(MAEDEXConfig, None, [*args, f"out_dir={tmp_path / name}", f"compile={compiled}"]))
        losses.append([json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_fsdp_resumes_from_its_gathered_checkpoints(tmp_path, image_folder):
    args = [*TINY_ARGS, f"data={image_folder}", "batch_size=8", "epochs=2", "checkpoint_every=1",
            "keep_checkpoints=10", "tensorboard=false", "distributed=fsdp"]
    port = 28600 + os.getpid() % 500
    mp.spawn(_rank, args=(2, port, args, str(tmp_path / "whole")), nprocs=2, join=True)
    middle = tmp_path / "whole" / "checkpoints" / "step-00000002.pt"
    assert torch.load(middle, weights_only=True)["model"]  # full tensors, gathered from the shards
    mp.spawn(_rank, args=(2, port + 1, args, str(tmp_path / "resumed"), str(middle)), nprocs=2, join=True)
    assert weights(tmp_path / "resumed") == weights(tmp_path / "whole")
