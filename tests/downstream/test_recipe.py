"""The classification recipe of fine-tuning: layer decay in the loop, RandAugment and random erasing, mixup, the
weights' EMA, and the validation metric that picks the epoch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

import dex.downstream.finetune as finetune_module
from dex.data.preprocess import Preprocessing
from dex.data.tasks import TaskSpec, finish_task, load_task
from dex.downstream.encoders import EncoderSpec
from dex.downstream.finetune import FinetuneConfig, TaskImages, TrainingLoss, train_task_model
from dex.downstream.plans import derive

SCRATCH = EncoderSpec("scratch", "scratch", model="dex_vit_tiny_patch16_256", img_size=32,
                      model_args={"depth": 4, "embed_dim": 32, "num_heads": 2})


def brightness_task(root, count=20, grey=True, classes=("dark", "bright")):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(count):
        label = i % len(classes)
        level = 60 + 120 * label / max(len(classes) - 1, 1)
        shape = (40, 48) if grey else (40, 48, 3)
        pixels = np.clip(rng.normal(level, 20, shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"c{i:02d}.png")
        labels[f"c{i:02d}"] = classes[label]
    spec = TaskSpec(name="brightness", type="classification", modality="CT", classes=list(classes),
                    image_size=[40, 48], channels=1 if grey else 3)
    finish_task(root, spec, sorted(labels), labels=labels)
    return load_task(root)


def test_the_loop_trains_each_layer_at_its_decayed_rate(tmp_path, monkeypatch):
    """With layer decay, the learning rate the loop sets is the schedule's times each group's lr_scale: the head at
    the schedule's rate, the patch embedding at decay^(depth + 1) of it."""
    task = brightness_task(tmp_path / "t")
    seen = []
    real = finetune_module.set_learning_rate

    def spy(optimizer, lr):
        real(optimizer, lr)
        seen.append((lr, [(group["lr"], group.get("lr_scale", 1.0)) for group in optimizer.param_groups]))

    monkeypatch.setattr(finetune_module, "set_learning_rate", spy)
    train_task_model(SCRATCH, task, 0, FinetuneConfig(epochs=1, steps_per_epoch=2, batch_size=4, layer_decay=0.5,
                                                      device="cpu"))
    lr, groups = seen[-1]
    assert lr > 0 and {scale for _, scale in groups} == {0.5 ** k for k in range(6)}  # 4 blocks: layers 0-5
    assert all(group_lr == pytest.approx(lr * scale) for group_lr, scale in groups)


def test_randaugment_inputs_are_reproducible_grey_where_the_image_is_and_leave_the_generators_alone(tmp_path):
    task = brightness_task(tmp_path / "t")
    preprocessing = Preprocessing(size=32)
    data = TaskImages(task, task.splits["train"], preprocessing, "randaugment", seed=3, random_erasing=0.25)
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    first = data[2]["image"]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert first.shape == (3, 32, 32) and torch.equal(data[2]["image"], first)
    grey = preprocessing.unnormalize(first)
    torch.testing.assert_close(grey[0], grey[1])
    torch.testing.assert_close(grey[1], grey[2])
    data.epoch = 1
    assert not torch.equal(data[2]["image"], first)
    evaluation = TaskImages(task, task.splits["val"], preprocessing)[0]["image"]
    assert evaluation.shape == first.shape  # training and evaluation inputs alike in layout and scale
    with pytest.raises(ValueError, match="randaugment is for classification"):
        TaskImages(load_task(_segmentation(tmp_path / "s")), ["c0"], preprocessing, "randaugment")


def test_randaugment_survives_its_largest_magnitude(monkeypatch):
    """A magnitude drawn at or above timm's maximum (10) made posterize keep 0 bits, which Pillow 13 refuses: every
    op at the largest magnitude must run on grey and colour pictures."""
    from dex.data.readers import Picture
    from dex.downstream.augment import classification_augmentation

    monkeypatch.setattr(random, "gauss", lambda mean, std: mean + 10 * std)  # every magnitude drawn far too high
    for grey in (True, False):
        augment = classification_augmentation(Preprocessing(size=32), grey)
        pixels = np.random.default_rng(0).integers(0, 255, (40, 48) if grey else (40, 48, 3), dtype=np.uint8)
        random.seed(0)
        for _ in range(150):  # two of the 15 ops a time, each at p 0.5: posterize about ten times
            assert augment(Picture(pixels, 255)).shape == (3, 32, 32)


def _segmentation(root):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(5):
        Image.fromarray(np.full((16, 16), 100, np.uint8)).save(root / "images" / f"c{i}.png")
        Image.fromarray(np.eye(16, dtype=np.uint8)).save(root / "masks" / f"c{i}.png")
    finish_task(root, TaskSpec(name="s", type="segmentation", modality="CT", classes=["bg", "fg"],
                               image_size=[16, 16], channels=1), [f"c{i}" for i in range(5)])
    return root


def test_mixup_mixes_the_batch_and_its_labels(tmp_path):
    task = brightness_task(tmp_path / "t")
    config = FinetuneConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    loss_of = TrainingLoss(task, config)
    seen = {}

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.zeros(len(x), 2, requires_grad=True)

    images = torch.randn(4, 3, 8, 8)
    np.random.seed(0)
    loss = loss_of(Recording(), {"image": images.clone(), "target": torch.tensor([0, 1, 0, 1])}, torch.device("cpu"))
    assert not torch.equal(seen["x"], images)  # mixed with the flipped batch
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)  # uniform logits: log 2 whatever the soft targets
    plain = TrainingLoss(task, FinetuneConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.1))
    assert plain.mix is None and plain.criterion.label_smoothing == 0.1


def test_the_kept_model_is_the_weights_ema(tmp_path, monkeypatch):
    import timm.utils

    task = brightness_task(tmp_path / "t")
    made = []

    class Recorded(timm.utils.ModelEmaV3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.updates = 0
            made.append(self)

        def update(self, model, step=None):
            self.updates += 1
            super().update(model, step)

    monkeypatch.setattr(timm.utils, "ModelEmaV3", Recorded)
    record, model = train_task_model(SCRATCH, task, 0, FinetuneConfig(epochs=1, steps_per_epoch=3, batch_size=4,
                                                                      ema_decay=0.9, device="cpu"))
    assert record["config"]["ema_decay"] == 0.9 and made[0].updates == 3
    for key, value in made[0].module.state_dict().items():
        assert torch.equal(model.network.state_dict()[key], value.cpu()), key


def test_the_derived_recipe_for_classification():
    two = {"images": {"train": 300}, "median_size": [224, 224], "class_counts": {"a": 150, "b": 150}}
    many = {"images": {"train": 1200}, "median_size": [224, 224], "class_counts": {"a": 400, "b": 400, "c": 400}}
    values, _ = derive({}, "derived", "classification", two, (224, 224), pretrained=True)
    assert values["selection_metric"] == "auroc" and (values["augmentation"], values["random_erasing"]) == ("flip", 0)
    assert values["mixup"] == 0.0 and values["label_smoothing"] == 0.1 and values["ema_decay"] > 0
    values, _ = derive({}, "derived", "classification", many, (224, 224), pretrained=True)
    assert values["selection_metric"] == "f1_macro" and (values["mixup"], values["cutmix"]) == (0.8, 1.0)
    assert (values["augmentation"], values["random_erasing"]) == ("randaugment", 0.25)
    paper, _ = derive({}, "paper", "classification", two, (224, 224), pretrained=True)
    assert (paper["selection_metric"], paper["augmentation"], paper["ema_decay"], paper["mixup"]) == \
        ("f1_macro", "flip", 0.0, 0.0)
