"""Pretraining: schedules, configs, parameter groups, and short real runs through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dex
from dex.cli import main
from dex.config import load_config, parse_overrides
from dex.models import create_model
from dex.models.text import TextConfig, build_text_encoder
from dex.train.objectives import MAEDEXConfig, MedMoEObjective, build_objective, load_pretrain_config
from dex.train.pretrain import param_groups, pretrain
from dex.schedules import cosine, warmup_cosine

TINY_ARGS = [
    "model=dex_vit_tiny_patch16_256", "model_args.img_size=32", "model_args.patch_size=8",
    "model_args.embed_dim=32", "model_args.depth=2", "model_args.num_heads=2", "model_args.num_experts=4",
    "decoder_embed_dim=16", "decoder_depth=1", "decoder_num_heads=2", "batch_size=8", "epochs=2",
    "warmup_epochs=1", "log_every=1", "device=cpu", "shuffle_buffer=16",
]


@pytest.fixture
def tiny(phantom_collection):
    """A tiny run on 16 curated images: two steps per epoch."""
    return [*TINY_ARGS, f"data={phantom_collection / 'curated'}", "samples_per_epoch=16"]


def test_cosine_schedule_endpoints():
    assert cosine(0.99, 1.0, 0, 100) == pytest.approx(0.99)
    assert cosine(0.99, 1.0, 50, 100) == pytest.approx(0.995)
    assert cosine(0.99, 1.0, 100, 100) == pytest.approx(1.0)
    assert cosine(1.0, 0.0, 25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_warmup_then_cosine():
    assert warmup_cosine(1.0, 0.0, 0, 10, 110) == 0.0
    assert warmup_cosine(1.0, 0.0, 5, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 0.0, 10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(1.0, 0.0, 60, 10, 110) == pytest.approx(0.5)


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nmodel_args:\n  num_experts: 4\n  top_k: 1\n")
    config = load_config(MAEDEXConfig, path, ["model_args.top_k=2", "betas=[0.9, 0.999]"])
    assert config.epochs == 3 and config.model_args == {"num_experts": 4, "top_k": 2}
    assert config.betas == (0.9, 0.999)
    assert parse_overrides(["a.b.c=1.5e-3"]) == {"a": {"b": {"c": 1.5e-3}}}


def test_config_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: epoch: unknown key; the known keys are out_dir, seed"):
        load_config(MAEDEXConfig, path)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_overrides(["epochs"])
    path.write_text("epochs: two\nbetas: [0.9]\n")
    with pytest.raises(ValueError, match=r"bad.yaml: epochs: input should be a valid integer.*got 'two'; betas\[1\]"):
        load_config(MAEDEXConfig, path)
    with pytest.raises(ValueError, match=r"batch_size: .*got 'eight' \(--set batch_size=eight\)"):
        load_config(MAEDEXConfig, None, ["batch_size=eight"])
    with pytest.raises(ValueError, match=r"distributed: input should be 'ddp' or 'fsdp', got 'x'"):
        load_config(MAEDEXConfig, None, ["distributed=x"])
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        MAEDEXConfig(batch_size=0)


def test_param_groups_skip_director_and_decay_no_bias_norm_or_embedding(tiny):
    model = build_objective(load_config(MAEDEXConfig, None, tiny))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.blocks.0.dex.experts.fc1_weight" in decay_names
    assert "encoder.blocks.0.dex.router.proj.weight" in decay_names
    assert {"encoder.blocks.0.dex.experts.fc1_bias", "encoder.cls_token", "mask_token",
            "encoder.blocks.0.norm1.weight"} <= no_decay_names
    assert not any("director" in n for n in decay_names | no_decay_names)


def test_cli_pretrain_runs_and_writes_a_loadable_encoder(tmp_path, capsys, tiny):
    out = tmp_path / "run"
    assert main(["pretrain", "configs/pretrain_demo.yaml", "--set", *tiny, f"out_dir={out}"]) == 0
    assert "loss:" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["momentum"] == pytest.approx(0.99)
    assert rows[-1]["noise_std"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))  # step 3 of 4
    assert len(rows[-1]["usage_entropy"]) == 2
    saved = load_config(MAEDEXConfig, out / "config.yaml")
    assert saved.model_args["embed_dim"] == 32 and saved.epochs == 2
    encoder = dex.load_pretrained(out / "encoder")
    fresh = build_objective(saved).encoder
    director, initial = encoder.blocks[0].dex.director.fc1.weight, fresh.blocks[0].dex.director.fc1.weight
    assert not torch.equal(director, initial)  # the group EMA moved the director
    assert float(encoder.blocks[0].dex.router.usage.sum()) > 0  # the usage statistics were kept


def test_same_seed_reproduces_bit_for_bit(tmp_path, tiny):
    runs = []
    for name in ("a", "b"):
        config = load_config(MAEDEXConfig, None, [*tiny, f"out_dir={tmp_path / name}"])
        runs.append(pretrain(config).run_dir)
    assert (runs[0] / "encoder" / "model.safetensors").read_bytes() == (
        runs[1] / "encoder" / "model.safetensors").read_bytes()
    losses = [[json.loads(line)["loss"] for line in (r / "log.jsonl").read_text().splitlines()] for r in runs]
    assert losses[0] == losses[1]


def test_cli_reports_bad_config(tmp_path, capsys):
    assert main(["pretrain", "configs/pretrain_demo.yaml", "--set", "epoch=1"]) == 2
    assert "epoch: unknown key (--set epoch=1)" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(Path("configs").glob("pretrain_*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load_and_build(path):
    config = load_pretrain_config(path)
    with torch.device("meta"):
        if config.objective == "medmoe":  # its data (pairs) and text encoder (a download) are not here: a local one
            text = build_text_encoder(TextConfig(), ["A report of its type."])
            encoder = create_model(config.model, **{"num_classes": 0, **config.model_args})
            model = MedMoEObjective(encoder, text, config.report_types or ["X-ray", "US"], config)
        else:
            model = build_objective(config)
    encoder = model.kept()["encoder"]
    if not isinstance(encoder, dex.DEXViT):
        assert type(encoder).__name__ == "SwinTransformer" and config.objective in ("midol", "medmoe")
        return
    blocks = encoder.blocks
    if "mae" in path.stem or "midol" in path.stem:
        assert all(b.dex is None for b in blocks)
    else:
        assert all(b.dex is not None for b in blocks)
        assert ("tokenwise" in path.stem) == (blocks[0].dex.router.activation == "token")
        assert ("experts" in path.stem) == (blocks[0].dex.alignment == "none")


def test_bad_shards_are_skipped_named_in_the_log_and_stop_the_run_above_the_threshold(tmp_path, phantom_collection,
                                                                                       capsys):
    import shutil
    import tarfile

    data = tmp_path / "curated"
    shutil.copytree(phantom_collection / "curated", data)
    shards = sorted((data / "shards").glob("*.tar"))
    assert len(shards) == 5
    cut, corrupt = shards[1], shards[3]
    cut.write_bytes(cut.read_bytes()[:-3000])  # cut short: left out from the start
    with tarfile.open(corrupt) as tar:
        offset = tar.getmembers()[4].offset
    raw = bytearray(corrupt.read_bytes())
    raw[offset:offset + 512] = b"x" * 512  # a garbled header, same size: found only when read
    corrupt.write_bytes(bytes(raw))
    args = ["pretrain", "configs/pretrain_demo.yaml", "--set", *TINY_ARGS, f"data={data}", "epochs=1"]

    assert main([*args, "max_bad_shards=0.5", f"out_dir={tmp_path / 'run'}"]) == 0
    last = json.loads((tmp_path / "run/log.jsonl").read_text().splitlines()[-1])
    assert last["bad_shards"] == 2 and last["bad_shard_names"] == [cut.name, corrupt.name]
    capsys.readouterr()

    assert main([*args, "max_bad_shards=0.2", f"out_dir={tmp_path / 'strict'}"]) == 2  # one of five may be bad
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.startswith("dex pretrain: error: ")
    assert "2 of 5 shards are missing or unreadable" in error and cut.name in error and corrupt.name in error
    assert main([*args, "max_bad_shards=0", f"out_dir={tmp_path / 'none'}"]) == 2  # found before the first step
    assert "1 of 5 shards" in capsys.readouterr().err

    assert main(["data", "verify", str(data)]) == 3
    report = capsys.readouterr().out
    assert f"{cut.name}: " in report and f"{corrupt.name}: its SHA-256 differs" in report


def test_a_warmup_as_long_as_the_run_is_warned_of(tmp_path, tiny, caplog):
    config = load_config(MAEDEXConfig, None, [*tiny, f"out_dir={tmp_path}", "epochs=1", "warmup_epochs=1"])
    with caplog.at_level("WARNING", logger="dex.train"):
        pretrain(config)
    assert "warmup_epochs 1 >= epochs 1: the whole run trains at warm-up learning rates" in caplog.text
