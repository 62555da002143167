"""M-IDoL as a pretraining objective: the teacher, the views, a short run on phantoms, resume after a kill, export."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import dex
from dex.config import ConfigError
from dex.data.transforms import MultiViewTransform, ViewAugmentation
from dex.train.export import export_run
from dex.train.objectives import MIDoLObjective, build_objective, load_pretrain_config
from dex.train.pretrain import pretrain
from dex.train.runs import load_kept
from tests.train.test_engine import _rank, clean_killed_resumed, image_folder  # noqa: F401 (image_folder: a fixture)

TINY = [
    "objective=midol", "model=dex_vit_tiny_patch16_256", "model_args.img_size=32", "model_args.patch_size=8",
    "model_args.embed_dim=32", "model_args.depth=2", "model_args.num_heads=2", "model_args.num_experts=0",
    "projector_hidden_dim=32", "projector_dim=16", "batch_size=16", "warmup_epochs=1", "log_every=1",
    "device=cpu", "shuffle_buffer=16", "tensorboard=false", "samples_per_epoch=64", "base_lr=5e-2",
]
CONFIG = "configs/pretrain_midol_tiny_cpu.yaml"
DEX_BACKBONE = ["model_args.num_experts=4", "model_args.top_k=2"]


def tiny(*overrides: str) -> MIDoLObjective:
    return build_objective(load_pretrain_config(None, [*TINY, *overrides])).train()


def views(batch: int = 16) -> torch.Tensor:
    return torch.rand(batch, 2, 3, 32, 32)


@pytest.fixture(scope="module")
def midol_run(phantom_collection, tmp_path_factory):
    """80 steps of 16 images on the 10-modality phantoms (about 20 s)."""
    out = tmp_path_factory.mktemp("midol") / "run"
    torch.manual_seed(0)
    config = load_pretrain_config(None, [*TINY, f"data={phantom_collection / 'curated'}", "epochs=20",
                                         "checkpoint_every=0", f"out_dir={out}"])
    result = pretrain(config)
    return out, result.model, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_teacher_gets_no_gradient_and_follows_the_ema_formula():
    objective = tiny(*DEX_BACKBONE)
    directors = {f"student.encoder.blocks.{i}.dex.director": block.dex.director
                 for i, block in enumerate(objective.student["encoder"].blocks)}
    assert objective.teachers() == {**directors, "teacher": objective.teacher} and not objective.teacher.training
    assert tiny().teachers().keys() == {"teacher"}  # a plain ViT has no directors
    assert objective.routed_module() is objective.teacher["projector"]  # what dex analyze routes by
    out = objective({"image": views()}, objective.schedule(0, 10), {})
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in objective.teacher.parameters())
    assert all(p.grad is not None for p in objective.student.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in objective.student.parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    student = objective.student.state_dict()
    objective.ema.after_step({"teacher_momentum": 0.9})
    for key, value in objective.teacher.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * student[key], rtol=0, atol=1e-6)


def test_dex_backbone_adds_its_terms_and_the_router_noise_is_cut_per_rank():
    objective = tiny(*DEX_BACKBONE)
    full = objective.step_inputs(torch.Generator().manual_seed(5), 8, slice(0, 8))["router_eps"]
    part = objective.step_inputs(torch.Generator().manual_seed(5), 8, slice(4, 8))["router_eps"]
    for whole, rank in zip(full, part, strict=True):  # [V * b, R], view-major
        assert whole.shape == (16, 4) and rank.shape == (8, 4)
        torch.testing.assert_close(rank, torch.cat([whole[4:8], whole[12:16]]))
    out = objective({"image": views(8)}, objective.schedule(0, 10),
                    objective.step_inputs(torch.Generator().manual_seed(5), 8, slice(0, 8)))
    assert out.terms["alignment"] > 0 and out.terms["balance"] > 0
    terms = {k: float(v.detach()) for k, v in out.terms.items()}
    assert float(out.loss.detach()) == pytest.approx(terms["route"] + terms["contrast"] + 0.1 * terms["alignment"]
                                            + 0.001 * terms["balance"], rel=1e-5)
    assert tiny().step_inputs(torch.Generator(), 8, slice(0, 8)) == {}  # a plain ViT has no routers


def test_views_are_independent_reproducible_and_checked():
    transform = MultiViewTransform(32, ViewAugmentation(views=3))
    image = torch.rand(1, 48, 40)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    assert first.shape == (3, 3, 32, 32) and torch.equal(first, transform(image))
    assert not torch.equal(first[0], first[1])
    with pytest.raises(ConfigError, match="views"):
        load_pretrain_config(None, [*TINY, "augment.views=1"])
    with pytest.raises(ConfigError, match="gamma"):
        load_pretrain_config(None, [*TINY, "augment.gamma=[1.5, 0.5]"])


def test_a_short_run_lowers_the_loss_and_keeps_every_expert_in_use(midol_run):
    out, objective, rows = midol_run
    assert len(rows) == 80 and all({"route", "contrast", "teacher_momentum", "contrast_temperature",
                                    "expert_load", "load_entropy", "view_agreement"} <= row.keys() for row in rows)
    quarter = len(rows) // 4
    mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
    assert mean("loss", rows[-quarter:]) < mean("loss", rows[:quarter]) - 0.05
    assert mean("route", rows[-quarter:]) < mean("route", rows[:quarter])
    last = torch.tensor([r["expert_load"] for r in rows[-quarter:]]).sum(0)
    assert (last > 0).all() and mean("load_entropy", rows) > 0.8
    assert rows[-1]["teacher_momentum"] > rows[0]["teacher_momentum"] == pytest.approx(0.996)


def test_the_run_keeps_the_teacher_encoder_without_the_projector(midol_run, tmp_path):
    out, objective, _ = midol_run
    saved = dex.load_pretrained(out / "encoder")
    teacher = objective.teacher["encoder"].state_dict()
    assert saved.state_dict().keys() == teacher.keys()
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in teacher.items())
    assert not any("projector" in k for k in saved.state_dict())
    student = objective.student["encoder"].state_dict()
    assert any(not torch.equal(student[k], v) for k, v in teacher.items())
    exported = export_run(out, tmp_path / "export")
    assert dex.load_pretrained(exported).state_dict().keys() == teacher.keys()
    assert load_kept(exported) is None and load_kept(out) is None  # the encoder is all M-IDoL keeps


def test_resume_after_sigkill_ends_bit_for_bit_identical(tmp_path, phantom_collection):
    args = [*TINY, f"data={phantom_collection / 'curated'}", "epochs=4", "checkpoint_every=1",
            "keep_checkpoints=3", "samples_per_epoch=32"]
    clean_killed_resumed(CONFIG, args, tmp_path)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, image_folder, mode):  # noqa: F811
    """Sinkhorn over the global batch (all-reduced columns) and the gathered keys and codes make two ranks of 4
    images the step of one process of 8; a DEX backbone's balance loss and directors too."""
    args = [*TINY, *DEX_BACKBONE, f"data={image_folder}", "batch_size=8", "epochs=2", "checkpoint_every=0",
            f"distributed={mode}"]
    port = 28600 + os.getpid() % 500 + (0 if mode == "ddp" else 500)
    mp.spawn(_rank, args=(2, port, args, str(tmp_path / mode)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = pretrain(load_pretrain_config(None, [*args, f"out_dir={tmp_path / 'one'}"])).model.state_dict()
    # the key part of qkv.bias has no true gradient (softmax ignores it): Adam makes its float noise lr-sized steps
    atol = lambda key: 1e-4 if key.endswith("qkv.bias") else 1e-5  # noqa: E731
    if mode == "ddp":
        ranks = [torch.load(tmp_path / mode / f"rank{r}.pt", weights_only=True) for r in range(2)]
        for key, value in single.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), key
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=atol(key), msg=key)
    kept = dex.load_pretrained(tmp_path / mode / "encoder").state_dict()  # the teacher, gathered from the shards
    for key, value in kept.items():
        torch.testing.assert_close(value, single[f"teacher.encoder.{key}"], rtol=1e-4, atol=atol(key), msg=key)
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / mode / "log.jsonl").read_text().splitlines()]
    for a, b in zip(one, two, strict=True):  # the logged routing is the global batch's
        assert a["expert_load"] == pytest.approx(b["expert_load"]) and a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_a_swin_backbone_trains_a_step_and_its_teacher_round_trips(tmp_path):
    objective = tiny("model=swin_tiny_patch4_window7_224", "model_args={img_size: 32, window_size: 4, "
                     "embed_dim: 16, depths: [1, 1], num_heads: [1, 2]}")
    out = objective({"image": views(8)}, objective.schedule(0, 10), {})
    out.loss.backward()
    assert float(out.terms["alignment"]) == 0.0 and torch.isfinite(out.loss)
    encoder = objective.kept()["encoder"]
    dex.save_pretrained(encoder, tmp_path / "swin")
    loaded = dex.load_pretrained(tmp_path / "swin").eval()
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), encoder.eval()(image))
