"""Downstream adaptation: UNETR, metrics against scikit-learn and MONAI, task folders, adaptation modes, encoders."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import timm
import torch
from monai.metrics import DiceMetric
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

import dex
from dex.data.tasks import TaskSpec, finish_task, load_task, mask_labels
from dex.eval.encoders import EncoderSpec, freeze_all_but_last, load_encoder
from dex.eval.finetune import FinetuneConfig, finetune
from dex.eval.metrics import DiceAccumulator, classification_metrics
from dex.models import DEXViT
from dex.models.unetr import UNETR2D

QUICK = FinetuneConfig(epochs=2, warmup_epochs=1, batch_size=4, lr=5e-4)


def small_vit(depth: int = 4, img_size: int = 32, **kwargs) -> DEXViT:
    return DEXViT(img_size=img_size, patch_size=16, embed_dim=32, depth=depth, num_heads=2, num_experts=4, top_k=2,
                  mode="experts", **kwargs)


# --- UNETR -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,size", [(4, 32), (8, 64), (12, 96)])
def test_unetr_shapes_and_gradients_reach_every_part(depth, size):
    model = UNETR2D(small_vit(depth, size), num_classes=3, feature_size=8)
    images = torch.randn(2, 3, size, size)
    out = model(images)
    assert out.shape == (2, 3, size, size)
    out.square().mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad and ".director." not in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.block_indices == [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1]  # 3, 6, 9 of 12 (1-based)


def test_unetr_on_a_timm_vit_and_bad_encoders():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0)
    assert UNETR2D(vit, 2, feature_size=8)(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match="16 px patches"):
        UNETR2D(DEXViT(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2), 2)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        UNETR2D(small_vit(depth=2), 2)


# --- metrics -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 4])
def test_classification_metrics_equal_scikit_learn(classes):
    torch.manual_seed(classes)
    logits, target = torch.randn(60, classes), torch.randint(0, classes, (60,))
    got = classification_metrics(logits, target)
    pred, probs = logits.argmax(1).numpy(), logits.softmax(1).numpy()
    assert got["f1_macro"] == pytest.approx(f1_score(target, pred, average="macro"))
    assert got["accuracy"] == pytest.approx(accuracy_score(target, pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(target, pred))
    auroc = roc_auc_score(target, probs[:, 1]) if classes == 2 else roc_auc_score(target, probs, multi_class="ovr")
    assert got["auroc"] == pytest.approx(auroc, abs=1e-6)


def test_dice_at_original_resolution_equals_monai_and_the_formula():
    torch.manual_seed(0)
    accumulator, metric = DiceAccumulator(3), DiceMetric(include_background=False, reduction="mean_batch")
    per_class = {1: [], 2: []}
    for _ in range(5):
        logits = torch.randn(3, 16, 16)
        truth = torch.randint(0, 3, (40, 40))
        truth[:, :5] = 0
        accumulator.add(logits, truth)
        pred = torch.nn.functional.interpolate(logits[None], size=(40, 40), mode="bilinear").argmax(1)[0]
        metric(torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None],
               torch.nn.functional.one_hot(truth, 3).permute(2, 0, 1)[None])
        for c in (1, 2):
            p, t = pred == c, truth == c
            per_class[c].append(2 * (p & t).sum().item() / (p.sum() + t.sum()).item())
    direct = np.mean([np.mean(v) for v in per_class.values()])
    assert accumulator.value() == pytest.approx(direct, abs=1e-6)
    assert accumulator.value() == pytest.approx(float(metric.aggregate().mean()), abs=1e-6)


# --- task folders ------------------------------------------------------------------------------------------------

def _segmentation_folder(root, count=6, size=24):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(root / "images" / f"c{i}.png")
        Image.fromarray(rng.integers(0, 3, (size, size), dtype=np.uint8)).save(root / "masks" / f"c{i}.png")
    spec = TaskSpec(name="toy", type="segmentation", modality="CT", classes=["bg", "a", "b"],
                    image_size=[size, size], channels=1, bit_depth=16)
    finish_task(root, spec, [f"c{i}" for i in range(count)])
    return spec


def test_task_folder_round_trip(tmp_path):
    spec = _segmentation_folder(tmp_path / "toy")
    task = load_task(tmp_path / "toy")
    assert task.spec == spec
    assert sum(len(v) for v in task.splits.values()) == 6 and task.splits["train"]
    assert set(np.unique(mask_labels(task, "c0"))) <= {0, 1, 2}


def test_bad_task_folders_name_the_file(tmp_path):
    _segmentation_folder(tmp_path / "a")
    (tmp_path / "a" / "masks" / "c2.png").unlink()
    with pytest.raises(ValueError, match="c2.png: no mask"):
        load_task(tmp_path / "a")
    _segmentation_folder(tmp_path / "b")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "b" / "masks" / "c1.png")
    with pytest.raises(ValueError, match="masks/c1.png: mask is 20 x 24, its image c1.png is 24 x 24"):
        load_task(tmp_path / "b")
    _segmentation_folder(tmp_path / "c")
    Image.fromarray(np.full((24, 24), 7, np.uint8)).save(tmp_path / "c" / "masks" / "c3.png")
    with pytest.raises(ValueError, match="c3.png: label value 7 is outside the 3 classes"):
        load_task(tmp_path / "c")
    (tmp_path / "d" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d" / "images" / "x.png")
    (tmp_path / "d" / "labels.csv").write_text("id,label\nx,cat\n")
    (tmp_path / "d" / "task.yaml").write_text("name: d\ntype: classification\nmodality: CT\nclasses: [dog]\n"
                                              "image_size: [8, 8]\nchannels: 1\n")
    with pytest.raises(ValueError, match="labels.csv:2: label 'cat' is not one of"):
        load_task(tmp_path / "d")


def test_folder_without_task_yaml_is_inferred(phantom_collection, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(phantom_collection / "raw" / "tasks" / "endoscopy-polyp", folder)
    for name in ("task.yaml", "splits.csv"):
        (folder / name).unlink()
    for mask in (folder / "masks").iterdir():  # stored as 0 / 255, as public releases do
        Image.fromarray((np.asarray(Image.open(mask)) * 255).astype(np.uint8)).save(mask)
    task = load_task(folder, {"modality": "Endoscopy"})
    assert task.spec.type == "segmentation" and task.spec.mask_threshold == 127
    assert task.spec.modality == "Endoscopy" and set(task.splits) == {"train", "val", "test"}
    original = load_task(phantom_collection / "raw" / "tasks" / "endoscopy-polyp")
    item = next(iter(task.masks))
    assert np.array_equal(mask_labels(task, item), mask_labels(original, item))


# --- adaptation modes and encoders -------------------------------------------------------------------------------

def test_partial_fine_tuning_freezes_what_it_says():
    encoder = small_vit(depth=4)
    freeze_all_but_last(encoder, 1)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert all(n.startswith(("blocks.3.", "norm.")) for n in trainable) and "blocks.3.attn.qkv.weight" in trainable
    assert not any(n.startswith(("patch_embed", "cls_token", "blocks.2.")) for n in trainable)


@pytest.mark.parametrize("mode,top_k", [("experts", 1), ("experts", 2), ("experts", 4), ("director", None)])
def test_dex_e_with_any_k_and_dex_d_fine_tune(tmp_path, phantom_collection, mode, top_k):
    encoder = DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=4, top_k=2)
    dex.save_pretrained(encoder, tmp_path / "encoder")
    spec = EncoderSpec("dex", str(tmp_path / "encoder"), mode=mode, top_k=top_k)
    loaded = load_encoder(spec)
    assert loaded.mode == mode and (top_k is None or loaded.model_args["top_k"] == [top_k] * 4)
    for name in ("pathology-nuclei", "photo-lesion-type"):
        task = load_task(phantom_collection / "raw" / "tasks" / name)
        record = finetune(spec, task, 0, QUICK)
        assert 0 <= record["test"][record["score_name"]] <= 1 and len(record["history"]) == 2


def test_every_encoder_gets_the_same_decoder_initialisation(phantom_collection, tmp_path, monkeypatch):
    """Encoders of one width but different architectures (a plain ViT, a DEX ViT) start from the same UNETR decoder
    for a seed, so that their scores are paired comparisons."""
    import dex.eval.finetune as finetune_module

    built = []
    build = finetune_module.build_model

    def capture(encoder, task, config):
        model = build(encoder, task, config)
        built.append({k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")})
        return model

    monkeypatch.setattr(finetune_module, "build_model", capture)
    dex.save_pretrained(small_vit(), tmp_path / "dex")
    task = load_task(phantom_collection / "raw" / "tasks" / "xray-lungs")
    plain = EncoderSpec("scratch", "scratch", img_size=32, model_args={"embed_dim": 32, "depth": 4, "num_heads": 2})
    one_epoch = FinetuneConfig(**{**QUICK.__dict__, "epochs": 1})
    for spec in (plain, EncoderSpec("dex", str(tmp_path / "dex"))):
        finetune(spec, task, 3, one_epoch)
    assert built[0].keys() == built[1].keys() and len(built[0]) > 10
    for name, tensor in built[0].items():
        torch.testing.assert_close(tensor, built[1][name], rtol=0, atol=0, msg=name)


def test_data_fraction_and_trainable_blocks(phantom_collection):
    task = load_task(phantom_collection / "raw" / "tasks" / "xray-lungs")
    spec = EncoderSpec("scratch", "scratch", img_size=32, model_args={"embed_dim": 32, "depth": 4, "num_heads": 2})
    full = finetune(spec, task, 0, QUICK)
    small = finetune(spec, task, 0, FinetuneConfig(**{**QUICK.__dict__, "data_fraction": 0.34,
                                                      "trainable_blocks": 2}))
    assert small["train_images"] == 1 and full["train_images"] == len(task.splits["train"])
    assert small["trainable_parameters"] < full["trainable_parameters"]


def test_encoders_from_a_timm_file_and_a_run(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    loaded = load_encoder(EncoderSpec("timm", f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.pth'}", img_size=64))
    assert loaded.patch_embed.img_size == (64, 64)
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="neither an exported encoder"):
        load_encoder(EncoderSpec("missing", str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="DEX encoders only"):
        load_encoder(EncoderSpec("plain", "scratch", img_size=32, mode="director"))
