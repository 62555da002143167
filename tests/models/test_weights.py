"""Checkpoints: safe loading, warm start from ViT / MAE files, director export to timm, save/load round trips."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed

import dex
from dex.downstream.encoders import EncoderSpec, load_encoder
from dex.models import (
    DEXSettings,
    DEXViT,
    MaskedAutoencoderDEX,
    director_state_dict,
    export_director,
    init_from_vit_checkpoint,
    load_pretrained,
    load_state_dict_file,
    save_pretrained,
)
from dex.safeload import RefusedFileError
from tests.conftest import tiny_vit
from tests.models.test_dex_vit import timm_twin


def plain_vit(img_size=32, depth=3):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=0, fc_norm=False
    ).eval()


# --- safe loading --------------------------------------------------------------------------------------------

def test_load_state_dict_file_formats(tmp_path):
    state = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "wrapped.pth"):
        loaded = load_state_dict_file(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_checkpoint_with_python_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(RefusedFileError, match=r"with_args.pth: refused: it holds Python objects other than tensors "
                                               r"\(argparse.Namespace\), which the safe loader does not build"):
        load_state_dict_file(path)


def test_every_torch_load_of_the_package_is_the_safe_one():
    package = Path(dex.__file__).parent
    calls = [str(p.relative_to(package)) for p in package.rglob("*.py") if "torch.load" in p.read_text()]
    assert calls == ["safeload.py"]


@pytest.mark.parametrize("content,message", [(b"", "not a readable"), (b"garbage" * 10, "not a readable")])
def test_corrupt_checkpoint_names_the_file(tmp_path, content, message):
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"broken{suffix}"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"broken{suffix}.*{message}"):
            load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_state_dict_file(tmp_path / "nowhere.pth")


def test_truncated_checkpoint_is_detected(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(plain_vit().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.pth"):
        load_state_dict_file(path)


# --- warm start from a plain ViT / MAE checkpoint ------------------------------------------------------------

def test_init_from_vit_copies_mlp_into_director_and_every_expert(tmp_path):
    vit = plain_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = tiny_vit().eval()
    report = init_from_vit_checkpoint(model, tmp_path / "vit.pth")
    assert report.initialised and all(".dex.router." in k for k in report.initialised)
    for i, block in enumerate(model.blocks):
        mlp = vit.blocks[i].mlp
        for eta, theta, source in zip(block.dex.director.parameters(), block.dex.experts.tensors(), mlp.parameters()):
            assert torch.equal(eta, source)
            assert all(torch.equal(theta[r], source) for r in range(theta.shape[0]))
    x = torch.randn(2, 3, 32, 32)
    # identical experts: any routing mixes copies of the same MLP, so every mode is the plain ViT
    for mode, k in [("director", None), ("experts", 2), ("experts", 4)]:
        model.set_mode(mode, top_k=k)
        torch.testing.assert_close(model.forward_features(x), vit.forward_features(x), rtol=1e-5, atol=1e-5)


def test_init_interpolates_positional_embedding(tmp_path):
    vit = plain_vit(img_size=32)
    safetensors.torch.save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    model = tiny_vit(img_size=48)
    init_from_vit_checkpoint(model, tmp_path / "vit.safetensors")
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), [6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)


def test_init_mae_loads_decoder_from_full_mae_checkpoint(tmp_path):
    """A full MAE checkpoint (encoder at top level, decoder_* keys) fills the decoder too (reference bug B10)."""
    source = MaskedAutoencoderDEX(tiny_vit(), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    mae_layout = director_state_dict(source.encoder)
    mae_layout.update({k: v for k, v in source.state_dict().items() if not k.startswith("encoder.")})
    torch.save({"model": mae_layout}, tmp_path / "mae_full.pth")
    target = MaskedAutoencoderDEX(tiny_vit(), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    report = init_from_vit_checkpoint(target, tmp_path / "mae_full.pth")
    assert not [k for k in report.initialised if "decoder" in k or "mask_token" in k]
    for key, value in source.state_dict().items():
        if not key.startswith("encoder.") or ".dex.director." in key:
            assert torch.equal(target.state_dict()[key], value), key


def test_init_mae_from_encoder_only_checkpoint_keeps_decoder_init(tmp_path):
    torch.save({"model": plain_vit().state_dict()}, tmp_path / "mae_enc.pth")
    target = MaskedAutoencoderDEX(tiny_vit(), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    report = init_from_vit_checkpoint(target, tmp_path / "mae_enc.pth")
    assert "decoder_pred.weight" in report.initialised and "mask_token" in report.initialised


def test_init_from_mismatched_checkpoint_is_a_clear_error(tmp_path):
    torch.save(plain_vit(depth=2).state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"shallow.pth.*missing.*blocks\.2\."):
        init_from_vit_checkpoint(tiny_vit(), tmp_path / "shallow.pth")
    torch.save(plain_vit(depth=4).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"deep.pth.*does not have.*blocks\.3\."):
        init_from_vit_checkpoint(tiny_vit(), tmp_path / "deep.pth")


def test_timm_file_of_a_vit_converts_into_a_dex_encoder(tmp_path):
    """``timm:dex_vit_*:FILE`` reads a plain ViT file through DEX's own conversion, as timm's loader would."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = load_encoder(EncoderSpec("dex", f"timm:dex_vit_tiny_patch16_256:{tmp_path / 'vit.pth'}", img_size=32,
                                     mode="director")).eval()
    assert isinstance(model, DEXViT) and model.mode == "director"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), vit.forward_features(x), rtol=1e-5, atol=1e-5)


# --- export and round trips ----------------------------------------------------------------------------------

def test_export_director_loads_in_timm_with_equal_features(tmp_path):
    model = tiny_vit().eval()
    export_director(model, tmp_path / "director")
    model.set_mode("director")
    x = torch.randn(2, 3, 32, 32)
    expected = model.forward_features(x)
    via_timm = timm.create_model(f"local-dir:{tmp_path / 'director'}", pretrained=True).eval()
    via_dex = load_pretrained(tmp_path / "director").eval()
    for vit in (via_timm, via_dex):
        assert type(vit).__name__ == "VisionTransformer"
        assert (vit.forward_features(x) - expected).abs().max() < 1e-5


def test_export_base_director_as_vit_base_at_256(tmp_path):
    """The issue's acceptance check at full size: timm's vit_base_patch16_224 at img_size=256."""
    torch.manual_seed(0)
    model = timm.create_model("dex_vit_base_patch16_256", num_experts=2, top_k=1).eval()
    model.set_mode("director")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=256, num_classes=0).eval()
    vit.load_state_dict(director_state_dict(model))
    x = torch.randn(1, 3, 256, 256)
    assert (model.forward_features(x) - vit.forward_features(x)).abs().max() < 1e-5


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny_vit()
    model.train().forward_features(torch.randn(4, 3, 32, 32), noise_std=1.0)
    dex.update_directors_(model, 0.9)  # non-trivial usage statistics
    model.set_mode("experts", top_k=3)
    save_pretrained(model, tmp_path / "enc")
    for loaded in (dex.load_pretrained(tmp_path / "enc"),
                   timm.create_model(f"local-dir:{tmp_path / 'enc'}", pretrained=True)):
        assert loaded.mode == "experts" and loaded.model_args == model.model_args
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded.eval().forward_features(x), model.eval().forward_features(x))


def test_load_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    save_pretrained(tiny_vit(), tmp_path / "enc")
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "enc" / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors.*does not match"):
        load_pretrained(tmp_path / "enc")


def test_director_mode_timm_twin_state_dict_keys_match():
    model = tiny_vit()
    assert set(director_state_dict(model)) == set(timm_twin(model).state_dict())


def test_dex_settings_are_one_block_of_config_json(tmp_path):
    model = tiny_vit(num_experts=[4, 0, 2], top_k=[2, 1, 1], router_temperature=0.5, balance="reference",
                     alignment="kd", expert_init="copy")
    save_pretrained(model, tmp_path / "enc")
    args = json.loads((tmp_path / "enc" / "config.json").read_text())["model_args"]
    assert args["dex"] == {"num_experts": [4, 0, 2], "top_k": [2, 0, 1], "activation": "image", "pooling": "cls",
                           "router_temperature": 0.5, "balance": "reference", "alignment": "kd",
                           "usage_momentum": 0.99, "expert_init": "copy"}
    assert not {f.name for f in dataclasses.fields(DEXSettings)} & args.keys()  # nowhere else
    loaded = load_pretrained(tmp_path / "enc")
    assert loaded.dex_settings == model.dex_settings
    assert [b.dex.settings if b.dex else None for b in loaded.blocks] == [
        DEXSettings(4, 2, router_temperature=0.5, balance="reference", alignment="kd", expert_init="copy"), None,
        DEXSettings(2, 1, router_temperature=0.5, balance="reference", alignment="kd", expert_init="copy")]


def test_a_folder_with_the_settings_given_one_by_one_still_loads(tmp_path):
    """Folders written before the settings became one block list R, K and the rest among the model arguments."""
    model = tiny_vit(num_experts=4, top_k=1, activation="token")
    save_pretrained(model, tmp_path / "enc")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    config["model_args"].update(config["model_args"].pop("dex"))
    (tmp_path / "enc" / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(tmp_path / "enc")
    assert loaded.dex_settings == model.dex_settings and loaded.blocks[0].dex.router.activation == "token"


def test_settings_given_one_by_one_replace_the_block():
    settings = DEXSettings.from_model_args({"dex": {"num_experts": 8, "top_k": 2, "pooling": "mean"}, "top_k": 1})
    assert settings == DEXSettings(num_experts=8, top_k=1, pooling="mean")
    model = tiny_vit(dex=DEXSettings(num_experts=4, top_k=2), top_k=1)
    assert [b.dex.top_k for b in model.blocks] == [1, 1, 1]
    with pytest.raises(TypeError, match="experts_count"):
        tiny_vit(experts_count=4)
    with pytest.raises(ValueError, match="usage_momentum"):
        DEXSettings(usage_momentum=1.5)


def test_a_one_channel_model_saves_with_averaged_statistics(tmp_path):
    save_pretrained(tiny_vit(in_chans=1), tmp_path / "grey")
    config = json.loads((tmp_path / "grey" / "config.json").read_text())
    assert config["preprocessing"]["channels"] == 1 and config["pretrained_cfg"]["input_size"] == [1, 32, 32]
    assert config["preprocessing"]["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    assert config["pretrained_cfg"]["interpolation"] == config["preprocessing"]["interpolation"] == "bilinear"
    assert load_pretrained(tmp_path / "grey").patch_embed.proj.in_channels == 1


def test_a_model_with_a_new_head_saves_and_loads_with_it(tmp_path):
    model = tiny_vit()
    model.reset_classifier(3, global_pool="avg")
    save_pretrained(model, tmp_path / "clf")
    loaded = load_pretrained(tmp_path / "clf").eval()
    assert loaded.num_classes == 3 and loaded.global_pool == "avg"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
