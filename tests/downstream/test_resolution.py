"""Fine-tuning at a resolution other than pretraining's: every pretrained source is brought to ``img_size`` (its
position embeddings for the new grid, its other weights kept), recorded and fed at that size, and the fine-tuned
model folder rebuilds there."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed

import dex
from dex.cli import main
from dex.data.tasks import TaskSpec, finish_task, load_task
from dex.downstream.encoders import EncoderSpec, encoder_architecture, encoder_preprocessing, load_encoder
from dex.downstream.finetune import FinetuneConfig, train_task_model
from dex.models import DEXViT, load_state_dict_file, sincos_2d
from dex.models.weights import load_preprocessing

QUICK = FinetuneConfig(epochs=1, steps_per_epoch=1, batch_size=4, device="cpu")
SWIN = {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A DEX encoder saved at 32 px (16 px patches: a 2x2 grid), as an export folder, as a pretraining run's
    ``encoder/`` and as its director (a timm ViT folder), and the same director's weights as a timm file."""
    root = tmp_path_factory.mktemp("resolution")
    torch.manual_seed(0)
    encoder = DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2)
    dex.save_pretrained(encoder, root / "dex")
    dex.save_pretrained(encoder, root / "run" / "encoder")
    (root / "run" / "config.yaml").write_text("objective: mae_dex\n")
    dex.export_director(encoder, root / "director")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    torch.save(vit.state_dict(), root / "vit.pth")
    return root


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Ten 40 px RGB images of two classes (dark, bright)."""
    root = tmp_path_factory.mktemp("brightness")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    labels = {f"p{i}": ("dark", "bright")[i % 2] for i in range(10)}
    for i, name in enumerate(labels):
        image = rng.integers(0, 100, (40, 40, 3)) + 120 * (i % 2)
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{name}.png")
    finish_task(root, TaskSpec(name="brightness", type="classification", modality="Photo", classes=["dark", "bright"],
                               image_size=[40, 40], channels=3, bit_depth=8), list(labels), labels)
    return load_task(root)


def _rebuilt(spec: EncoderSpec, encoder: torch.nn.Module) -> torch.nn.Module:
    """The encoder rebuilt from what :func:`encoder_architecture` records, its weights loaded strictly."""
    architecture, args = encoder_architecture(spec, encoder)
    rebuilt = timm.create_model(architecture, pretrained=False, **args)
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    return rebuilt.eval()


@pytest.mark.parametrize("source", ["dex", "run"])
def test_a_dex_encoder_takes_the_sincos_table_of_the_new_grid_and_keeps_its_other_weights(folders, source):
    spec = EncoderSpec("dex", str(folders / source), img_size=64)
    encoder = load_encoder(spec).eval()
    assert encoder.patch_embed.img_size == (64, 64) and encoder.patch_embed.grid_size == (4, 4)
    assert torch.equal(encoder.pos_embed, sincos_2d(32, (4, 4)).unsqueeze(0)) and not encoder.pos_embed.requires_grad
    saved = load_state_dict_file(folders / "dex" / "model.safetensors")
    resized = encoder.state_dict()
    assert saved.keys() == resized.keys()
    assert all(torch.equal(saved[k], resized[k]) for k in saved if k != "pos_embed")
    x = torch.randn(2, 3, 64, 64)
    assert encoder(x).shape == (2, 32)
    assert encoder.forward_intermediates(x, indices=1)[1][0].shape == (2, 32, 4, 4)
    assert encoder_architecture(spec, encoder)[1]["img_size"] == [64, 64]
    torch.testing.assert_close(_rebuilt(spec, encoder)(x), encoder(x), rtol=0, atol=0)


def test_a_learned_position_table_is_resampled_bicubically_its_class_entry_kept():
    torch.manual_seed(0)
    encoder = DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_experts=2, top_k=1)
    learned = torch.randn_like(encoder.pos_embed)  # as vit_to_dex_state_dict copies a supervised ViT's positions
    encoder.pos_embed.data.copy_(learned)
    encoder.set_input_size((48, 64))
    assert encoder.patch_embed.grid_size == (3, 4) and encoder.model_args["img_size"] == [48, 64]
    expected = resample_abs_pos_embed(learned, [3, 4], [2, 2], num_prefix_tokens=1)
    assert torch.equal(encoder.pos_embed, expected) and torch.equal(encoder.pos_embed[:, 0], learned[:, 0])
    assert encoder(torch.randn(1, 3, 48, 64)).shape == (1, 32)


@pytest.mark.parametrize("source", ["director", "timm"])
def test_a_timm_vit_is_resampled_by_timm_and_keeps_its_other_weights(folders, source):
    path = folders / "vit.pth" if source == "timm" else folders / "director" / "model.safetensors"
    spec = EncoderSpec("vit", f"timm:vit_tiny_patch16_224:{path}" if source == "timm" else str(folders / "director"),
                       img_size=64)
    encoder = load_encoder(spec).eval()
    assert encoder.patch_embed.img_size == (64, 64) and encoder.patch_embed.grid_size == (4, 4)
    saved = load_state_dict_file(path)
    assert torch.equal(encoder.pos_embed, resample_abs_pos_embed(saved["pos_embed"], [4, 4], num_prefix_tokens=1))
    resized = encoder.state_dict()
    assert all(torch.equal(saved[k], resized[k]) for k in resized if k != "pos_embed")
    x = torch.randn(2, 3, 64, 64)
    assert encoder.forward_features(x).shape[1] == 17
    torch.testing.assert_close(_rebuilt(spec, encoder).forward_features(x), encoder.forward_features(x), rtol=0,
                               atol=0)


def test_a_swin_is_resized_by_timm_windows_and_all_and_rebuilds(tmp_path):
    swin = dex.models.create_model("swin_tiny_patch4_window7_224", num_classes=0, **SWIN)
    dex.save_pretrained(swin, tmp_path / "swin")
    spec = EncoderSpec("swin", str(tmp_path / "swin"), img_size=64)
    encoder = load_encoder(spec).eval()
    assert encoder.patch_embed.grid_size == (16, 16)
    assert [stage.blocks[0].window_size for stage in encoder.layers] == [(8, 8), (8, 8), (4, 4), (2, 2)]
    x = torch.randn(2, 3, 64, 64)
    assert encoder.forward_features(x).shape == (2, 2, 2, 128)
    assert encoder_preprocessing(spec, encoder).size == (64, 64)
    torch.testing.assert_close(_rebuilt(spec, encoder)(x), encoder(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"encoder 'swin': img_size 48 is not a multiple of 32"):
        load_encoder(EncoderSpec("swin", str(tmp_path / "swin"), img_size=48))


@pytest.mark.parametrize("source", ["dex", "director", "timm"])
def test_a_size_the_patches_do_not_divide_is_refused_naming_the_encoder(folders, source):
    where = f"timm:vit_tiny_patch16_224:{folders / 'vit.pth'}" if source == "timm" else str(folders / source)
    with pytest.raises(ValueError, match=rf"^encoder '{source}': img_size 40 is not a multiple of 16, the patch size"):
        load_encoder(EncoderSpec(source, where, img_size=40))
    with pytest.raises(ValueError, match=r"img_size \(40, 40\) is not divisible by patch_size 16"):
        DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2).set_input_size(40)


def test_a_model_fine_tuned_at_a_new_size_reloads_and_serves_as_a_source(folders, task, tmp_path):
    spec = EncoderSpec("dex", str(folders / "dex"), img_size=64)
    _, model = train_task_model(spec, task, 0, QUICK)
    recorded = load_preprocessing(folders / "dex")
    # the folder's recorded preprocessing at the new size (the task names the modality)
    assert dataclasses.replace(model.preprocessing, modality="") == dataclasses.replace(recorded, size=(64, 64))
    assert model.encoder_args["img_size"] == [64, 64]
    model.save(tmp_path / "model")
    loaded = dex.load_model(tmp_path / "model")
    inputs = torch.stack([loaded.preprocessing.read(task.images[item]) for item in task.splits["test"]])
    assert inputs.shape[-2:] == (64, 64) and loaded.network.patch_embed.grid_size == (4, 4)
    assert torch.equal(loaded(inputs), model(inputs))
    # the fine-tuned encoder, brought to another size in turn
    again = EncoderSpec("fine-tuned", str(tmp_path / "model"), img_size=96)
    encoder = load_encoder(again)
    assert torch.equal(encoder.pos_embed, sincos_2d(32, (6, 6)).unsqueeze(0))
    assert encoder_preprocessing(again, encoder) == dataclasses.replace(loaded.preprocessing, size=(96, 96))
    assert encoder_architecture(again, encoder)[1]["img_size"] == [96, 96]


def test_dex_finetune_brings_a_timm_vit_folder_to_encoder_img_size(folders, task, tmp_path):
    assert main(["finetune", str(folders / "director"), str(task.root), "--out", str(tmp_path / "model"), "--set",
                 "epochs=1", "steps_per_epoch=1", "batch_size=4", "device=cpu", "encoder.img_size=64"]) == 0
    loaded = dex.load_model(tmp_path / "model")
    assert loaded.preprocessing.size == (64, 64) and loaded.network.patch_embed.grid_size == (4, 4)
    assert list(loaded.encoder_args["img_size"]) == [64, 64]
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 2)
