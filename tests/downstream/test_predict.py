"""dex predict on images: probabilities that sum to one, label maps at the image's size, bad files reported."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dex
from dex.cli import main
from dex.data.readers import read_picture
from dex.data.tasks import load_task
from dex.downstream.encoders import EncoderSpec
from dex.downstream.finetune import FinetuneConfig, train_task_model
from dex.downstream.metrics import label_map
from dex.downstream.model_folder import write_finetuned
from dex.downstream.predict import probabilities
from dex.models import DEXViT


@pytest.fixture(scope="module")
def models(phantom_collection, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dex.save_pretrained(DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=4,
                               top_k=2), root / "encoder")
    folders = {}
    for name in ("photo-lesion-type", "pathology-nuclei"):
        task = load_task(phantom_collection / "raw" / "tasks" / name)
        record, model = train_task_model(EncoderSpec("dex", str(root / "encoder")), task, 0,
                                         FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4,
                                                        steps_per_epoch=3))
        folders[name] = (write_finetuned(root / name, model, record), task)
    return folders


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_classification_probabilities_sum_to_one_and_a_broken_file_is_reported(models, tmp_path, capsys):
    folder, task = models["photo-lesion-type"]
    images = tmp_path / "images"
    shutil.copytree(task.root / "images", images)
    (images / "0-broken.png").write_bytes(b"\x89PNG broken")
    assert main(["predict", str(folder), str(images), "--out", str(tmp_path / "out"), "--batch-size", "3"]) == 3
    assert "1 inputs could not be read" in capsys.readouterr().err
    rows = _rows(tmp_path / "out" / "predictions.csv")
    errors = _rows(tmp_path / "out" / "errors.csv")
    assert [e["input"] for e in errors] == [str(images / "0-broken.png")]
    assert len(rows) == len(list((task.root / "images").iterdir()))
    model = dex.load_model(folder)
    for row in rows[:5]:
        p = np.array([float(row[f"p_{c}"]) for c in model.classes])
        assert abs(p.sum() - 1) < 1e-5 and row["predicted"] == model.classes[int(p.argmax())]
        expected = model.predict(model.preprocessing.read(row["input"])[None])[0]
        np.testing.assert_allclose(p, expected.numpy(), atol=1e-6)


def test_segmentation_writes_label_maps_at_the_images_size(models, tmp_path):
    folder, task = models["pathology-nuclei"]
    images = task.root / "images"
    assert main(["predict", str(folder), str(images), "--out", str(tmp_path / "out"), "--tta", "flip"]) == 0
    model = dex.load_model(folder)
    rows = _rows(tmp_path / "out" / "predictions.csv")
    first = sorted(images.iterdir())[0]
    assert rows[0]["input"] == str(first) and rows[0]["mask"] == f"masks/{first.stem}.png"
    written = np.asarray(Image.open(tmp_path / "out" / rows[0]["mask"]))
    picture = read_picture(first)
    assert written.shape == picture.pixels.shape[:2] and written.dtype == np.uint8
    x = model.preprocessing.read(first)[None]
    assert model.inference.window == model.preprocessing.size  # one window: the whole input
    with torch.no_grad():  # the logits of the image and of its mirror image averaged (nnU-Net), then the softmax
        flipped = ((model.network(x) + model.network(x.flip(-1)).flip(-1)) / 2).softmax(1)
    torch.testing.assert_close(probabilities(model, x, "flip"), flipped)
    assert np.array_equal(written, label_map(flipped[0], written.shape).numpy())
    assert sum(int(rows[0][f"pixels_{c}"]) for c in model.classes) == written.size
