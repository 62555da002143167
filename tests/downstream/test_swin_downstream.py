"""A Swin teacher from an M-IDoL run goes through every downstream command unchanged: export, fine-tuning (a head,
UNETR, the last blocks, LoRA), prediction, embedding, every protocol of the benchmark, and the analysis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dex
from dex.cli import main
from dex.data.tasks import load_task
from dex.train.objectives import load_pretrain_config
from dex.train.pretrain import pretrain

SWIN = {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}
ARCH = "swin_tiny_patch4_window7_224"


@pytest.fixture(scope="module")
def swin_run(phantom_collection, tmp_path_factory):
    """12 M-IDoL steps of a 4-stage Swin on the phantoms, and its export (about 10 s)."""
    out = tmp_path_factory.mktemp("swin")
    config = load_pretrain_config(None, [
        "objective=midol", f"model={ARCH}", f"model_args={json.dumps(SWIN)}", "projector_hidden_dim=32",
        "projector_dim=16", "batch_size=16", "warmup_epochs=1", "epochs=3", "samples_per_epoch=64", "device=cpu",
        "shuffle_buffer=16", "tensorboard=false", "checkpoint_every=0", f"data={phantom_collection / 'curated'}",
        f"out_dir={out / 'run'}"])
    pretrain(config)
    assert main(["export", str(out / "run"), str(out / "exported")]) == 0
    return out


def test_fine_tuning_prediction_and_embedding_take_a_swin(swin_run, phantom_collection, tmp_path):
    tasks = phantom_collection / "raw" / "tasks"
    quick = ["epochs=1", "warmup_epochs=0", "batch_size=4", "steps_per_epoch=3", "mirror=none"]
    for task, extra in (("photo-lesion-type", ["trainable_blocks=2"]), ("ct-organs", ["lora_rank=4"])):
        assert main(["finetune", str(swin_run / "exported"), str(tasks / task), "--out", str(tmp_path / task),
                     "--set", *quick, *extra]) == 0
        model = dex.load_model(tmp_path / task)
        assert model.encoder_architecture == ARCH and model.preprocessing.size == (32, 32)
    segmenter = dex.load_model(tmp_path / "ct-organs")
    assert type(segmenter.network).__name__ == "UNETR2D" and not segmenter.network.vit
    assert main(["predict", str(tmp_path / "ct-organs"), str(tasks / "ct-organs"), "--out", str(tmp_path / "pred")]
                ) == 0
    masks = sorted((tmp_path / "pred" / "masks").rglob("*.png"))
    assert masks and all(Image.open(m).size == (32, 32) for m in masks)
    assert json.loads((tmp_path / "pred" / "metrics.json").read_text())

    images = tasks / "photo-lesion-type" / "images"
    assert main(["embed", str(swin_run / "exported"), str(images), "--out", str(tmp_path / "embed")]) == 0
    pooled = np.load(tmp_path / "embed" / "cls.npy")
    encoder = dex.load_pretrained(swin_run / "exported").eval()
    first = sorted(images.iterdir())[0]
    with torch.no_grad():
        direct = encoder.forward_features(segmenter.preprocessing.read(first)[None]).mean((1, 2))
    np.testing.assert_allclose(pooled[0], direct[0].numpy(), rtol=1e-4, atol=1e-5)  # a Swin's pooled feature
    np.testing.assert_array_equal(pooled, np.load(tmp_path / "embed" / "mean_patch.npy"))


def test_every_benchmark_protocol_and_the_analysis_take_a_swin(swin_run, phantom_collection, tmp_path):
    tasks = phantom_collection / "raw" / "tasks"
    suite = {"out_dir": str(tmp_path / "bench"), "protocols": ["finetune", "linear", "knn", "fewshot", "lora",
                                                               "frozen-unetr"],
             "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "steps_per_epoch": 3, "mirror": "none"},
             "encoders": {"scratch": {"source": "scratch", "model": ARCH, "img_size": 32,
                                      "model_args": {k: v for k, v in SWIN.items() if k != "img_size"}},
                          "midol": str(swin_run / "run")},
             "tasks": [str(tasks / "photo-lesion-type"), str(tasks / "ct-organs")]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    assert main(["benchmark", str(tmp_path / "suite.yaml")]) == 0
    for encoder in ("scratch", "midol"):
        for task in ("photo-lesion-type", "ct-organs"):
            protocols = {p.parent.name for p in (tmp_path / "bench" / "runs" / encoder / task).glob("*/seed0.json")}
            classification = load_task(tasks / task).spec.type == "classification"
            assert {"default", "linear", "lora"} <= protocols, (encoder, task, protocols)
            assert (classification and {"knn-k10", "fewshot-1"} <= protocols) or "frozen-unetr" in protocols

    assert main(["analyze", str(swin_run / "run"), str(phantom_collection / "curated"), "--out",
                 str(tmp_path / "analysis"), "--compare", "scratch=scratch", "--per-modality", "6"]) == 0
    result = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert [len(rows) for rows in result["collapse"].values()] == [4, 4]  # one row per Swin stage
    assert 0 <= result["subspaces"]["run"]["nmi"] <= 1 and "attention" not in result
    assert "windowed" in (tmp_path / "analysis" / "analysis.md").read_text()
    assert (tmp_path / "analysis" / "patterns.png").is_file() and (tmp_path / "analysis" / "subspaces.png").is_file()
