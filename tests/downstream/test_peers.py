"""Peers (dex.models.peers): a U-Net for segmentation and a timm CNN for classification, trained from scratch through
the same fine-tuning, records, model folders and benchmark as the foundation encoders."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

import dex
from dex.cli import main
from dex.config import ConfigError
from dex.data.tasks import TaskSpec, finish_task, load_task
from dex.downstream.encoders import EncoderSpec, check_encoder
from dex.downstream.finetune import FinetuneConfig, train_task_model
from dex.downstream.model_folder import write_finetuned
from dex.eval.suite import Suite, plan
from dex.models.backbones import input_size
from dex.models.peers import UNet2D, unet_filters

ONE_EPOCH = FinetuneConfig(epochs=1, warmup_epochs=0, steps_per_epoch=2, batch_size=2, mirror="none")
UNET = EncoderSpec("unet", "peer", model="unet", img_size=48, model_args={"features": 4, "max_features": 16})
RESNET = EncoderSpec("resnet", "peer", model="resnet18", img_size=32)
VIT = EncoderSpec("scratch", "scratch", img_size=32, model_args={"embed_dim": 32, "depth": 4, "num_heads": 2})


def _segmentation_task(root, count=8, size=64):
    """Grey images with two bright squares, each its class."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(4, size // 2, 2)
        mask[top:top + 16, left:left + 16] = 1 + i % 2
        image = (rng.integers(0, 60, (size, size)) + 150 * (mask > 0)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    finish_task(root, TaskSpec(name="squares", type="segmentation", modality="CT", classes=["bg", "a", "b"],
                               image_size=[size, size], channels=1, bit_depth=8), [f"s{i}" for i in range(count)])
    return root


def _classification_task(root, count=10, size=48):
    """RGB images, bright or dark by class."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    labels = {}
    for i in range(count):
        labels[f"p{i}"] = ("dark", "bright")[i % 2]
        image = rng.integers(0, 100, (size, size, 3)) + 120 * (i % 2)
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"p{i}.png")
    finish_task(root, TaskSpec(name="brightness", type="classification", modality="Photo", classes=["dark", "bright"],
                               image_size=[size, size], channels=3, bit_depth=8), list(labels), labels)
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer-tasks")
    return {"segmentation": _segmentation_task(root / "squares"),
            "classification": _classification_task(root / "brightness")}


# --- the networks ------------------------------------------------------------------------------------------------

def test_the_unet_is_nnunets_2d_network_for_its_patch_size():
    assert unet_filters(128) == [32, 64, 128, 256, 512, 512]  # halved to 4 px: 6 stages, at most 512 channels
    assert unet_filters(512) == [32, 64, 128, 256, 512, 512, 512, 512]
    assert unet_filters(64) == [32, 64, 128, 256, 512] and unet_filters(48, 4, 16) == [4, 8, 16, 16]
    net = timm.create_model("dex_unet2d", img_size=48, num_classes=3, features=4, max_features=16)
    assert isinstance(net, UNet2D) and input_size(net) == (48, 48)
    out = net(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 3, 48, 48)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"InstanceNorm2d", "LeakyReLU", "ConvTranspose2d"} <= kinds and "BatchNorm2d" not in kinds
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and not isinstance(m, torch.nn.ConvTranspose2d)]
    assert {m.kernel_size for m in convs} == {(3, 3), (1, 1)} and {m.stride for m in convs} == {(1, 1), (2, 2)}
    state = net.state_dict()  # DynUNet's blocks held once: safetensors takes the state dict
    assert len({t.data_ptr() for t in state.values()}) == len(state)
    features = timm.create_model("dex_unet2d", img_size=48, num_classes=0, features=4, max_features=16)
    assert features(torch.randn(1, 3, 48, 48)).shape == (1, 4, 48, 48)


def test_check_encoder_takes_peers_and_names_what_is_wrong():
    for spec in (UNET, RESNET, EncoderSpec("convnext", "peer", model="convnext_atto")):
        check_encoder(spec, "suite.yaml")
    with pytest.raises(ConfigError, match=r"suite.yaml: encoder 'x': peer model 'resnet_nope'.*Unknown model"):
        check_encoder(EncoderSpec("x", "peer", model="resnet_nope"), "suite.yaml")
    with pytest.raises(ConfigError, match="encoder 'v': peer model 'vit_tiny_patch16_224'.* is a transformer"):
        check_encoder(EncoderSpec("v", "peer", model="vit_tiny_patch16_224"), "suite.yaml")
    with pytest.raises(ConfigError, match="encoder 'u': peer model 'unet' with model_args {'depth': 3}"):
        check_encoder(EncoderSpec("u", "peer", model="unet", model_args={"depth": 3}), "suite.yaml")


# --- fine-tuning -------------------------------------------------------------------------------------------------

def test_a_unet_peer_trains_is_scored_like_a_vit_and_its_model_folder_round_trips(tasks, tmp_path):
    task = load_task(tasks["segmentation"])
    native = replace(ONE_EPOCH, fit="native")  # its 16 px blobs would be resized whole: windows are the point here
    record, model = train_task_model(UNET, task, 0, native)
    vit_record, _ = train_task_model(VIT, task, 0, replace(native, feature_size=8))
    assert set(record) == set(vit_record) and set(record["test_outputs"]) == set(vit_record["test_outputs"])
    assert record["encoder"] == "unet" and record["score_name"] == "dice" and 0 <= record["test"]["dice"] <= 1
    assert len(record["test_outputs"]["dice"]) == len(task.splits["test"])
    settings = record["plans"]["settings"]
    assert settings["drop_path"] == 0.0 and settings["layer_decay"] == 1.0 and settings["fit"] == "native"
    assert type(model.network) is UNet2D and model.network.num_classes == 3  # the whole network, no UNETR
    assert record["trainable_parameters"] == sum(p.numel() for p in model.network.parameters())
    assert model.inference.window == (48, 48) and model.preprocessing.size == (48, 48)
    folder = write_finetuned(tmp_path / "model", model, record)
    images = torch.randn(2, 3, 80, 72)
    expected = model.predict(images)
    loaded = dex.load_model(folder)
    assert type(loaded.network) is UNet2D and torch.equal(loaded.predict(images), expected)
    np.save(tmp_path / "images.npy", images.numpy())
    np.save(tmp_path / "expected.npy", expected.numpy())
    script = ("import sys, numpy, torch, dex; model = dex.load_model(sys.argv[1]); "
              "got = model.predict(torch.from_numpy(numpy.load(sys.argv[2]))).numpy(); "
              "sys.exit(0 if (got == numpy.load(sys.argv[3])).all() else 1)")
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "images.npy"),
                           str(tmp_path / "expected.npy")], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]  # a fresh process finds dex_unet2d and gives the same bits
    assert main(["predict", str(folder), str(tasks["segmentation"]), "--out", str(tmp_path / "predicted")]) == 0
    masks = sorted((tmp_path / "predicted" / "masks").iterdir())
    assert len(masks) == len(task.splits["test"]) and Image.open(masks[0]).size == (64, 64)


def test_a_resnet_peer_trains_on_classification(tasks, tmp_path):
    task = load_task(tasks["classification"])
    record, model = train_task_model(RESNET, task, 0, ONE_EPOCH)
    assert record["score_name"] == "f1_macro" and len(record["test_outputs"]["probabilities"]) == len(
        task.splits["test"])
    assert model.encoder_architecture == "resnet18" and model.preprocessing.size == (32, 32)
    assert model.network.get_classifier().out_features == 2 and record["plans"]["settings"]["drop_path"] == 0.0
    images = torch.randn(3, 3, 32, 32)
    loaded = dex.load_model(write_finetuned(tmp_path / "model", model, record))
    assert input_size(loaded.network) == (32, 32) and torch.equal(loaded.predict(images), model.predict(images))


@pytest.mark.parametrize("spec,task_type,message", [
    (UNET, "classification", "encoder 'unet': peer 'unet' is a segmentation network, task 'brightness' is"),
    (RESNET, "segmentation", "encoder 'resnet': peer 'resnet18' is a classification network, task 'squares' is"),
])
def test_a_peer_on_the_wrong_task_type_is_refused(tasks, spec, task_type, message):
    with pytest.raises(ValueError, match=f"^{message} {task_type}$"):
        train_task_model(spec, load_task(tasks[task_type]), 0, ONE_EPOCH)


@pytest.mark.parametrize("setting", [{"freeze_encoder": True}, {"trainable_blocks": 2}, {"lora_rank": 4},
                                     {"drop_path": 0.1}, {"layer_decay": 0.75}])
def test_a_peer_refuses_the_adaptations_of_foundation_encoders(tasks, setting):
    config = replace(ONE_EPOCH, **setting)
    key, value = next(iter(setting.items()))
    with pytest.raises(ValueError, match=f"^encoder 'unet': a peer trains whole from scratch, without {key}={value} "
                                         r"\(settings of foundation encoders\)$"):
        train_task_model(UNET, load_task(tasks["segmentation"]), 0, config)


# --- the benchmark -----------------------------------------------------------------------------------------------

def _suite(tmp_path, tasks, **more):
    data = {"out_dir": str(tmp_path / "bench"), "seeds": [0], "baseline": "scratch",
            "finetune": {"epochs": 1, "warmup_epochs": 0, "steps_per_epoch": 2, "batch_size": 2, "mirror": "none",
                         "feature_size": 8},
            "encoders": {"scratch": {"source": "scratch", "img_size": 32, "model_args": VIT.model_args},
                         "unet": {"source": "peer", "model": "unet", "img_size": 48, "model_args": UNET.model_args},
                         "resnet": {"source": "peer", "model": "resnet18", "img_size": 32}},
            "tasks": [str(tasks["segmentation"]), str(tasks["classification"])], **more}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_plan_gives_a_peer_fine_tuning_on_its_own_task_type_only(tasks, tmp_path, caplog):
    suite = Suite.load(_suite(tmp_path, tasks, protocols=["finetune", "linear", "knn", "lora", "frozen-unetr"],
                              probe={"knn_k": [2]}))
    with caplog.at_level(logging.INFO, logger="dex.eval"):
        runs = plan(suite, {t.name: t for t in map(load_task, tasks.values())})
    by_encoder = {}
    for encoder, task, variant, *_ in runs:
        by_encoder.setdefault(encoder, set()).add((task, variant))
    assert by_encoder["unet"] == {("squares", "default")} and by_encoder["resnet"] == {("brightness", "default")}
    assert by_encoder["scratch"] == {("squares", v) for v in ("default", "linear", "lora", "frozen-unetr")} | {
        ("brightness", v) for v in ("default", "linear", "knn-k2", "lora")}
    logged = [r.getMessage() for r in caplog.records]
    assert "unet is a segmentation peer: no runs on brightness (classification)" in logged
    assert ("resnet is a peer, trained whole from scratch: fine-tuning only on brightness, not linear, knn, lora, "
            "frozen-unetr") in logged


def test_the_benchmark_puts_peers_next_to_the_encoders(tasks, tmp_path):
    assert main(["benchmark", str(_suite(tmp_path, tasks))]) == 0
    report = tmp_path / "bench" / "report"
    header = (report / "table5_tasks.csv").read_text().splitlines()[0]
    assert header == "task,trivial,chance,scratch,resnet,unet"
    gains = (report / "table_gains.csv").read_text()
    assert "squares,finetune,unet,0," in gains and "brightness,finetune,resnet,0," in gains
    record = json.loads((tmp_path / "bench" / "runs" / "unet" / "squares" / "default" / "seed0.json").read_text())
    assert record["encoder_spec"]["source"] == "peer" and record["protocol"] == "finetune"
    assert not (tmp_path / "bench" / "runs" / "unet" / "brightness").exists()
