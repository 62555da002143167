"""Fine-tuned models people keep: the model folder, its card, loading it in another process, and bad folders."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

import dex
from dex.cli import main
from dex.data.tasks import load_task
from dex.downstream.encoders import EncoderSpec
from dex.downstream.finetune import FinetuneConfig, train_task_model
from dex.downstream.model_folder import finetune_curves, write_finetuned
from dex.downstream.task_model import load_model
from dex.models import DEXViT

QUICK = FinetuneConfig(epochs=2, warmup_epochs=1, batch_size=4, lr=5e-4, steps_per_epoch=3)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoder") / "dex"
    dex.save_pretrained(DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=4, top_k=2),
                        folder)
    return folder


def _inputs(model, task):
    return torch.stack([model.preprocessing.read(task.images[item]) for item in task.splits["test"]])


@pytest.mark.parametrize("name", ["photo-lesion-type", "pathology-nuclei"])  # classification, segmentation
def test_a_kept_model_predicts_in_another_process_as_in_memory(tmp_path, phantom_collection, encoder_folder, name):
    task = load_task(phantom_collection / "raw" / "tasks" / name)
    record, model = train_task_model(EncoderSpec("dex", str(encoder_folder)), task, 0, QUICK, bootstrap=200)
    write_finetuned(tmp_path / "model", model, record)
    inputs = _inputs(model, task)
    expected = model.predict(inputs)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = ("import sys, torch, dex; model = dex.load_model(sys.argv[1]); "
              "torch.save(model.predict(torch.load(sys.argv[2], weights_only=True)), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "model"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)
    classes = len(task.spec.classes)
    assert expected.shape[:2] == (len(inputs), classes)
    torch.testing.assert_close(expected.sum(dim=1), torch.ones_like(expected.sum(dim=1)))
    loaded = load_model(tmp_path / "model")
    assert not loaded.training and loaded.classes == list(task.spec.classes) and loaded.task_type == task.spec.type
    assert loaded.preprocessing == model.preprocessing
    # the card names the real classes and the measured metrics
    card = (tmp_path / "model" / "README.md").read_text()
    assert all(c in card for c in task.spec.classes) and "research only" in card
    score = record["score_name"]
    low, high = record["test_intervals"][score]
    assert low <= high
    assert f"| {score} | {record['val'][score]:.4f} | {record['test'][score]:.4f} | {low:.4f} - {high:.4f} |" in card
    assert record["encoder_sha256"] in card
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert json.dumps(metrics["test"], sort_keys=True) == json.dumps(record["test"], sort_keys=True)  # NaN too
    assert metrics["best_epoch"] == record["best_epoch"]
    assert len((tmp_path / "model" / "log.jsonl").read_text().splitlines()) == QUICK.epochs
    with Image.open(tmp_path / "model" / "curves.png") as curves:
        assert curves.format == "PNG" and curves.width >= 400 and curves.height >= 200
        curves.load()  # the whole image decodes
    assert "`curves.png`" in card


def test_the_curves_draw_one_point_per_epoch_and_mark_the_best(tmp_path):
    history = [{"epoch": e, "loss": loss, "val_dice": dice, "val_dice_3d": 0.0}
               for e, loss, dice in ((0, 1.5, 0.2), (1, 0.9, 0.6), (2, 0.7, 0.5))]
    fig = finetune_curves(history, 1, "dice", tmp_path / "curves.png", "task t, encoder e")
    loss_ax, score_ax = fig.axes
    for ax, key in ((loss_ax, "loss"), (score_ax, "val_dice")):
        curve, best = ax.lines
        assert list(curve.get_xdata()) == [0, 1, 2] and list(curve.get_ydata()) == [r[key] for r in history]
        assert list(best.get_xdata()) == [1, 1] and best.get_linestyle() == "--"
        assert ax.get_xlabel() == "epoch"
    assert score_ax.get_ylabel() == "dice" and fig.get_suptitle() == "task t, encoder e"
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG"


def test_a_folder_with_a_missing_or_altered_file_is_refused_naming_it(tmp_path, phantom_collection, encoder_folder):
    task = load_task(phantom_collection / "raw" / "tasks" / "photo-lesion-type")
    record, model = train_task_model(EncoderSpec("dex", str(encoder_folder)), task, 0,
                                     FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4, steps_per_epoch=3))
    write_finetuned(tmp_path / "model", model, record)
    weights = tmp_path / "model" / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    with pytest.raises(ValueError, match="model.safetensors: its SHA-256 is not the one .*config.json records"):
        load_model(tmp_path / "model")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        load_model(tmp_path / "model")
    weights.write_bytes(content)
    config = tmp_path / "model" / "config.json"
    config.write_text(config.read_text().replace('"format": "dex-task-model"', '"format": "other"'))
    with pytest.raises(ValueError, match="config.json: not a dex task model config"):
        load_model(tmp_path / "model")


def test_dex_finetune_writes_the_folder_and_keeps_an_existing_one(tmp_path, phantom_collection, encoder_folder,
                                                                  capsys, caplog):
    task = phantom_collection / "raw" / "tasks" / "photo-lesion-type"
    args = ["finetune", str(encoder_folder), str(task), "--out", str(tmp_path / "model"), "--set", "epochs=1",
            "warmup_epochs=0", "batch_size=4", "steps_per_epoch=3", "encoder.mode=director"]
    with caplog.at_level("INFO", logger="dex"):
        assert main(args) == 0
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("epoch ")] == [
        "epoch 1/1"]  # the line the terminal shows, once an epoch
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"config.json", "model.safetensors", "metrics.json",
                                                                 "log.jsonl", "README.md", "curves.png",
                                                                 "progress.log"}
    lines = (tmp_path / "model" / "progress.log").read_text().splitlines()
    assert [line.split(" INFO ")[1].split(":")[0] for line in lines if "epoch" in line] == ["epoch 1/1"]
    assert load_model(tmp_path / "model").network.mode == "director"
    assert "dex.load_model" in capsys.readouterr().out
    assert main(args) == 2 and "exists" in capsys.readouterr().err


def test_a_stopped_fine_tuning_resumes_bit_for_bit(tmp_path, phantom_collection, encoder_folder, monkeypatch):
    import dex.downstream.finetune as finetune_module

    task = load_task(phantom_collection / "raw" / "tasks" / "pathology-nuclei")
    spec = EncoderSpec("dex", str(encoder_folder))
    config = FinetuneConfig(epochs=3, warmup_epochs=1, batch_size=4, steps_per_epoch=3)
    whole, whole_model = train_task_model(spec, task, 0, config)
    save = finetune_module._save_checkpoint
    calls = []

    def stop_after_the_second_epoch(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "_save_checkpoint", stop_after_the_second_epoch)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        train_task_model(spec, task, 0, config, checkpoints)
    assert [p.name for p in checkpoints.glob("*.pt")] == ["step-00000002.pt"]  # the last epoch's only
    monkeypatch.setattr(finetune_module, "_save_checkpoint", save)
    resumed, resumed_model = train_task_model(spec, task, 0, config, checkpoints)
    assert json.dumps(resumed["history"]) == json.dumps(whole["history"])
    assert json.dumps(resumed["test"]) == json.dumps(whole["test"])
    for key, value in whole_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"step-00000003.pt: cannot resume from it with other settings than it was "
                                         r"written with \(lr 0.0005 -> 1.0\); resume with the same settings"):
        train_task_model(spec, task, 0, replace(config, lr=1.0), checkpoints)
    # where it runs is free: the same run on another device setting and worker count goes on
    free = FinetuneConfig(epochs=3, warmup_epochs=1, batch_size=4, steps_per_epoch=3, device="cpu",
                          num_workers=0)
    assert train_task_model(spec, task, 0, free, checkpoints)[0]["history"] == resumed["history"]


def test_dex_finetune_resume_goes_on_from_the_partial_folder(tmp_path, phantom_collection, encoder_folder,
                                                             monkeypatch, capsys):
    import dex.downstream.finetune as finetune_module

    task = phantom_collection / "raw" / "tasks" / "photo-lesion-type"
    settings = ["--set", "epochs=2", "warmup_epochs=0", "batch_size=4", "steps_per_epoch=3"]
    assert main(["finetune", str(encoder_folder), str(task), "--out", str(tmp_path / "whole"), *settings]) == 0
    save = finetune_module._save_checkpoint

    def stop_after_the_first_epoch(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "_save_checkpoint", stop_after_the_first_epoch)
    out = tmp_path / "stopped"
    assert main(["finetune", str(encoder_folder), str(task), "--out", str(out), *settings]) == 130
    assert (tmp_path / "stopped.partial" / "checkpoints" / "step-00000001.pt").is_file() and not out.exists()
    monkeypatch.setattr(finetune_module, "_save_checkpoint", save)
    capsys.readouterr()
    assert main(["finetune", str(encoder_folder), str(task), "--out", str(out), "--resume", *settings]) == 0
    assert f"resuming from {tmp_path / 'stopped.partial' / 'checkpoints'}" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (tmp_path / "stopped.partial").exists() and not (out / "checkpoints").exists()
