"""The derived recipe: fingerprint and plans, patch sampling, the region-of-interest loss and metric, fine-tuning on
patches and predicting whole images with its plans."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dex.data.preprocess import Preprocessing
from dex.data.tasks import TaskSpec, finish_task, load_task
from dex.downstream.encoders import EncoderSpec
from dex.downstream.finetune import FinetuneConfig, SegmentationLoss, train_task_model
from dex.downstream.metrics import DiceAccumulator
from dex.downstream.patches import TaskPatches
from dex.downstream.plans import PAPER, derive, fingerprint, fit_budget
from dex.downstream.task_model import load_model

SCRATCH = EncoderSpec("scratch", "scratch", model="dex_vit_tiny_patch16_256", img_size=32,
                      model_args={"depth": 4, "embed_dim": 32, "num_heads": 2})


def vessel_task(root, count=5, size=(72, 88), roi=False):
    """RGB images with a dark band 4 px wide (the "vessel", class 1) at a random row; a disc region of interest."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if roi:
        (root / "roi").mkdir()
    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for i in range(count):
        mask = np.zeros(size, np.uint8)
        row = int(rng.integers(8, h - 12))
        mask[row:row + 4, 4:w - 4] = 1
        image = rng.integers(150, 220, (*size, 3)).astype(np.uint8)
        image[mask == 1] = rng.integers(20, 60, (int(mask.sum()), 3))
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"c{i}.png")
        if roi:
            inside = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 2) ** 2
            Image.fromarray(inside.astype(np.uint8) * 255).save(root / "roi" / f"c{i}.png")
    spec = TaskSpec(name="vessels", type="segmentation", modality="Fundus", classes=["background", "vessel"],
                    image_size=list(size), channels=3, mask_threshold=127)
    splits = {f"c{i}": ("train", "train", "train", "val", "test")[i % 5] for i in range(count)}
    finish_task(root, spec, [f"c{i}" for i in range(count)], splits=splits)
    return load_task(root)


# --- fingerprint and plans ---------------------------------------------------------------------------------------

def test_fingerprint_measures_sizes_shares_and_structure_width(tmp_path):
    task = vessel_task(tmp_path / "t")
    found = fingerprint(task)
    assert found["median_size"] == [72, 88] and found["images"] == {"train": 3, "val": 1, "test": 1}
    assert found["foreground_share"]["vessel"] == pytest.approx(4 * 80 / (72 * 88))
    assert found["structure_width"]["vessel"] == pytest.approx(4.0, abs=0.1)  # a band 4 px wide


def test_large_images_of_thin_structures_get_patches_others_do_not_and_given_values_win():
    large = {"images": {"train": 20}, "median_size": [999, 960], "structure_width": {"vessel": 8.0}}
    small = {"images": {"train": 20}, "median_size": [64, 64], "structure_width": {"vessel": 8.0}}
    blobs = {"images": {"train": 20}, "median_size": [256, 256], "structure_width": {"polyp": 90.0}}
    assert derive({}, "derived", "segmentation", blobs, (64, 64), pretrained=True)[0]["fit"] == "resize"  # 22 px
    blobs["structure_width"]["polyp"] = 12.0  # 3 px once resized to 64
    assert derive({}, "derived", "segmentation", blobs, (64, 64), pretrained=True)[0]["fit"] == "native"
    values, sources = derive({}, "derived", "segmentation", large, (64, 64), pretrained=True)
    assert values["fit"] == "native" and values["mirror"] == "xy" and values["layer_decay"] == 0.75
    assert values["steps_per_epoch"] >= 25 and sources["fit"] == "derived"
    assert derive({}, "derived", "segmentation", small, (64, 64), pretrained=False)[0]["fit"] == "resize"
    values, sources = derive({"fit": "resize", "lr": 1e-3}, "derived", "segmentation", large, (64, 64), True)
    assert (values["fit"], values["lr"], sources["fit"], sources["lr"]) == ("resize", 1e-3, "given", "given")
    paper, sources = derive({}, "paper", "segmentation", large, (64, 64), True)
    assert {k: paper[k] for k in PAPER} == PAPER and set(sources.values()) == {"paper"}
    assert paper["steps_per_epoch"] is None  # one pass over the images an epoch
    budgeted = derive({"budget_minutes": 5}, "derived", "segmentation", large, (64, 64), True)[0]
    assert budgeted["epochs"] is None and budgeted["warmup_epochs"] is None  # the budget sets them


def test_fit_budget_fills_the_time_and_keeps_validation_to_a_quarter():
    epochs, steps, warmup = fit_budget(10, 30, step_seconds=0.5, validation_seconds=20, test_seconds=40,
                                       steps_per_epoch=25)
    assert steps == 120  # 3 x 20 s of validation / 0.5 s a step
    assert epochs == int((10 * 60 * 0.95 - 30 - 40) // (120 * 0.5 + 20)) and warmup == max(1, epochs // 10)
    assert fit_budget(0.1, 0, 1.0, 2.0, 1.0, 25)[:1] == (1,)  # a budget too small: one short epoch


# --- patches -----------------------------------------------------------------------------------------------------

def blob_task(root, count=4, size=64):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        mask[28:36, 28:36] = 1  # 64 of 4096 pixels
        Image.fromarray((np.random.default_rng(i).random((size, size)) * 255).astype(np.uint8)).save(
            root / "images" / f"c{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
    spec = TaskSpec(name="blobs", type="segmentation", modality="CT", classes=["bg", "blob"],
                    image_size=[size, size], channels=1)
    finish_task(root, spec, [f"c{i}" for i in range(count)], splits={f"c{i}": "train" for i in range(count)})
    return load_task(root)


@pytest.mark.parametrize("share", [0.0, 1 / 3, 0.8])
def test_the_share_of_foreground_centred_patches_matches_the_setting(tmp_path, share):
    task = blob_task(tmp_path / "t")
    patches = TaskPatches(task, task.splits["train"], Preprocessing(size=16, channels=1, mean=(0.5,), std=(0.5,),
                                                                    fit="native"),
                          (16, 16), steps=100, batch_size=4, foreground_oversample=share, augmentation="flip")
    centred = [bool(patches.sample(i)[1]["label"][0, 8, 8]) for i in range(len(patches))]
    observed, n = np.mean(centred), len(centred)
    expected = share + (1 - share) * 64 / 4096  # the other patches centred anywhere, on the blob by chance
    assert abs(observed - expected) <= 3 * np.sqrt(expected * (1 - expected) / n) + 1e-9  # within sampling error
    item = patches[5]
    assert item["image"].shape == (1, 16, 16) and item["target"].shape == (16, 16) and item["roi"].min() == 1
    torch.testing.assert_close(patches[5]["image"], item["image"], rtol=0, atol=0)  # a function of (seed, epoch, i)
    patches.epoch = 1
    assert not torch.equal(patches[5]["image"], item["image"])


def test_a_region_of_interest_excludes_its_outside_from_loss_and_metric():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 16, 16), torch.randint(0, 2, (2, 16, 16))
    roi = torch.zeros(2, 16, 16)
    roi[:, 4:12, 4:12] = 1
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(2, 2, 4, 16) * 10  # only outside the region
    loss = SegmentationLoss()
    assert loss(logits, target, roi) == pytest.approx(float(loss(changed, target, roi)), abs=1e-6)
    assert loss(logits, target) != pytest.approx(float(loss(changed, target)), abs=1e-3)
    inside, full = DiceAccumulator(2), DiceAccumulator(2)
    truth = torch.zeros(16, 16, dtype=torch.long)
    truth[6:10, 6:10] = 1
    perfect_inside = torch.stack([1 - truth, truth]).float()
    perfect_inside[:, 0, :] = torch.tensor([0.0, 1.0])[:, None]  # a false positive row outside the region
    inside.add(perfect_inside, truth, roi=roi[0].bool())
    full.add(perfect_inside, truth)
    assert inside.value() == 1.0 and full.value() < 1.0


# --- fine-tuning on patches, predicting whole images ----------------------------------------------------------

def test_a_model_trained_on_patches_keeps_its_plans_and_predicts_whole_images_in_a_new_process(tmp_path):
    task = vessel_task(tmp_path / "task", roi=True)
    config = FinetuneConfig(epochs=1, steps_per_epoch=2, batch_size=4, mirror="x", device="cpu")
    record, model = train_task_model(SCRATCH, task, 0, config)
    plans = record["plans"]
    assert plans["settings"]["fit"] == "native" and plans["sources"]["fit"] == "derived"  # 72 x 88 > 1.25 x 32
    assert plans["sources"]["mirror"] == "given" and record["config"]["mirror"] == "x"
    assert model.preprocessing.fit == "native" and model.inference.window == (32, 32)
    folder = model.save(tmp_path / "model")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["inference"] == {"window": [32, 32], "overlap": 0.5, "mirror": "x"}
    assert saved["plans"]["settings"]["fit"] == "native"
    image = task.images[task.splits["test"][0]]
    x = model.preprocessing.read(image)[None]
    assert x.shape[-2:] == (72, 88)
    in_memory = model.predict(x)[0].argmax(0).numpy().astype(np.uint8)
    assert load_model(folder).inference == model.inference
    subprocess.run([sys.executable, "-m", "dex", "predict", str(folder), str(image), "--out", str(tmp_path / "pred")],
                   check=True, capture_output=True)
    written = np.asarray(Image.open(tmp_path / "pred" / "masks" / f"{image.stem}.png"))
    np.testing.assert_array_equal(written, in_memory)


def test_a_budget_below_one_validation_and_the_test_is_warned_of(tmp_path, caplog):
    task = vessel_task(tmp_path / "task")
    with caplog.at_level("WARNING", logger="dex.downstream.finetune"):
        record, _ = train_task_model(SCRATCH, task, 0, FinetuneConfig(budget_minutes=0.001, device="cpu"))
    assert "budget_minutes=0.001 is less than what the set-up, one validation and the test take" in caplog.text
    assert record["config"]["epochs"] == 1


def test_a_budget_fits_the_schedule_to_the_minutes_and_is_recorded(tmp_path):
    task = vessel_task(tmp_path / "task")
    record, _ = train_task_model(SCRATCH, task, 0, FinetuneConfig(budget_minutes=0.25, device="cpu"))
    budget = record["plans"]["budget"]
    assert budget["minutes"] == 0.25 and budget["step_seconds"] > 0
    assert record["config"]["epochs"] == budget["epochs"] >= 1 and len(record["history"]) == budget["epochs"]
    assert record["plans"]["sources"]["epochs"] == "budget"
    assert record["seconds"] < 3 * 0.25 * 60  # the budget, with room for a loaded machine
