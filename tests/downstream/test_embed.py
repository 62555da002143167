"""dex embed: features of every readable image, in a stable order, equal to the encoder's own forward."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import torch

import dex
from dex.cli import main
from dex.data.preprocess import Preprocessing
from dex.data.tasks import load_task
from dex.downstream.encoders import EncoderSpec
from dex.downstream.finetune import FinetuneConfig, train_task_model
from dex.downstream.model_folder import write_finetuned
from dex.models import DEXViT


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_embed_gives_the_encoders_features_in_a_stable_order(tmp_path, phantom_collection, capsys):
    encoder = DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2,
                     mode="experts").eval()
    dex.save_pretrained(encoder, tmp_path / "encoder")
    images = tmp_path / "images"
    shutil.copytree(phantom_collection / "raw" / "tasks" / "photo-lesion-type" / "images", images / "b")
    (images / "a").mkdir()
    (images / "a" / "broken.png").write_bytes(b"not a png")
    single = sorted((images / "b").iterdir())[0]
    args = ["embed", str(tmp_path / "encoder"), str(single), str(images), "--out", str(tmp_path / "out"),
            "--batch-size", "5"]
    assert main(args) == 3  # one input could not be read
    assert "1 inputs could not be read" in capsys.readouterr().err
    rows = _rows(tmp_path / "out" / "index.csv")
    expected = [str(single), *map(str, sorted((images / "b").iterdir()))]
    assert [r["input"] for r in rows] == expected and [int(r["row"]) for r in rows] == list(range(len(expected)))
    errors = _rows(tmp_path / "out" / "errors.csv")
    assert len(errors) == 1 and errors[0]["input"].endswith("broken.png") and "not a readable image" in errors[0][
        "reason"]
    cls, mean = np.load(tmp_path / "out" / "cls.npy"), np.load(tmp_path / "out" / "mean_patch.npy")
    assert cls.shape == mean.shape == (len(expected), 32) and cls.dtype == np.float32
    preprocessing = Preprocessing(size=32)
    with torch.no_grad():
        tokens = encoder.forward_features(torch.stack([preprocessing.read(p) for p in expected]))
    torch.testing.assert_close(torch.from_numpy(cls), tokens[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(mean), tokens[:, 1:].mean(1), rtol=0, atol=1e-6)
    assert main(args) == 3  # again: the same rows
    assert np.array_equal(np.load(tmp_path / "out" / "cls.npy"), cls)


def test_a_fine_tuned_model_folder_is_an_encoder_source(tmp_path, phantom_collection):
    encoder = DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=4, top_k=2)
    dex.save_pretrained(encoder, tmp_path / "encoder")
    task = load_task(phantom_collection / "raw" / "tasks" / "pathology-nuclei")
    record, model = train_task_model(EncoderSpec("dex", str(tmp_path / "encoder")), task, 0,
                                     FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4,
                                                    steps_per_epoch=3))
    write_finetuned(tmp_path / "model", model, record)
    images = task.root / "images"
    assert main(["embed", str(tmp_path / "model"), str(images), "--out", str(tmp_path / "out")]) == 0
    first = sorted(p for p in images.iterdir())[0]
    with torch.no_grad():
        tokens = model.network.encoder.forward_features(model.preprocessing.read(first)[None])
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out" / "cls.npy")[:1]), tokens[:, 0],
                               rtol=0, atol=1e-6)
