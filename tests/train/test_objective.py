"""The objective interface: a method the loop has never seen (a student with an EMA teacher, defined and registered
here) trains, logs its terms and schedules, keeps its teacher out of the optimiser, checkpoints and resumes exactly,
all through :class:`dex.train.objective.Objective` with the loop unchanged; a method on a DEX backbone gets the DEX
terms from :class:`dex.train.dex_backbone.DEXBackboneObjective` alone."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Literal

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import dex  # noqa: F401  (registers the models in timm)
from dex.config import STRICT, ConfigError
from dex.data.curation import CurateOptions, curate
from dex.data.recipe import Recipe, Source
from dex.data.transforms import PretrainTransform
from dex.schedules import cosine
from dex.seeding import seed_everything
from dex.train.dex_backbone import DEX_TERMS, DEXBackboneObjective, DEXEncoderConfig, create_encoder
from dex.train.hooks import EMATeacher
from dex.train.objective import Objective, RunConfig, StepOutput, register_objective
from dex.train.objectives import build_objective, load_pretrain_config, objective_class
from dex.train.pretrain import pretrain, summary


@STRICT
@dataclass
class ConsistencyConfig(RunConfig):
    objective: Literal["consistency"] = "consistency"
    teacher_momentum: float = 0.9
    teacher_momentum_final: float = 1.0


@register_objective
class ConsistencyObjective(Objective):
    """A student ViT's class token pulled towards an EMA teacher's on the mirrored image (a BYOL-like toy)."""

    name = "consistency"
    config_class = ConsistencyConfig
    loss_terms = ("consistency", "feature_norm")

    def __init__(self, config: ConsistencyConfig) -> None:
        super().__init__()
        self.config = config
        self.student = timm.create_model("dex_vit_tiny_patch16_256", img_size=32, patch_size=8, embed_dim=32,
                                         depth=2, num_heads=2, num_experts=0)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.ema = EMATeacher(self.student, self.teacher)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    def kept(self):
        return {"encoder": self.student, "teacher": self.teacher}

    def teachers(self):
        return {"teacher": self.teacher}

    def transform(self):
        return PretrainTransform(32)

    def schedule(self, step, total):
        return {"teacher_momentum": cosine(self.config.teacher_momentum, self.config.teacher_momentum_final, step,
                                           total)}

    def step_inputs(self, generator, global_batch, rows):
        return {"drop": torch.rand(global_batch, generator=generator)[rows]}

    def hooks(self):
        return [self.ema]

    def forward(self, batch, schedule, inputs):
        images = batch["image"]
        student = self.student.forward_features(images)[:, 0]
        with torch.no_grad():
            target = self.teacher.forward_features(images.flip(-1))[:, 0]
        weight = (inputs["drop"] > 0.1).float()
        consistency = ((1 - F.cosine_similarity(student, target, dim=-1)) * weight).mean()
        return StepOutput(consistency, {"consistency": consistency, "feature_norm": student.norm(dim=-1).mean()})


@pytest.fixture
def consistency(phantom_collection):
    return ["objective=consistency", f"data={phantom_collection / 'curated'}", "samples_per_epoch=16",
            "batch_size=8", "epochs=2", "warmup_epochs=1", "log_every=1", "device=cpu", "shuffle_buffer=16",
            "base_lr=1e-2", "tensorboard=false", "checkpoint_every=1"]


def test_a_new_objective_trains_through_the_unchanged_loop(tmp_path, consistency):
    assert objective_class("consistency") is ConsistencyObjective  # registered by its decorator
    config = load_pretrain_config(None, [*consistency, f"out_dir={tmp_path}"])
    assert type(config) is ConsistencyConfig and config.teacher_momentum == 0.9
    before = ConsistencyObjective(config).state_dict()
    torch.manual_seed(0)
    objective = pretrain(config).model
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"consistency", "feature_norm", "teacher_momentum", "lr"} <= r.keys() for r in rows)
    assert rows[0]["teacher_momentum"] == pytest.approx(cosine(0.9, 1.0, 0, 4))
    # the teacher moved only through its hook: no gradient, no optimiser state, but not the student either
    checkpoint = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    trained = {id(p) for p in objective.parameters() if p.requires_grad}
    assert trained == {id(p) for p in objective.student.parameters() if p.requires_grad}
    assert len(checkpoint["optimizer"]["state"]) == len(trained)
    assert any(k.startswith("teacher.") for k in checkpoint["model"])
    weight = "blocks.0.mlp.fc1.weight"
    teacher, student = objective.teacher.state_dict()[weight], objective.student.state_dict()[weight]
    assert not torch.equal(teacher, before[f"teacher.{weight}"]) and not torch.equal(teacher, student)
    # what the objective keeps, the run folder holds
    assert dex.load_pretrained(tmp_path / "teacher").state_dict()[weight].equal(teacher)
    text = summary(tmp_path)
    assert "consistency" in text and "feature_norm" in text and "teacher:" in text and "usage entropy" not in text


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_new_objective_resumes_bit_for_bit(tmp_path, consistency, monkeypatch, dropout):
    """Also with dropout in the step (drawn from the global generator): a loader that drew its workers' base seed
    from that generator when an epoch's iterator starts would shift those draws after a mid-epoch resume."""
    if dropout:
        forward = ConsistencyObjective.forward
        monkeypatch.setattr(ConsistencyObjective, "forward", lambda self, batch, schedule, inputs: forward(
            self, {**batch, "image": F.dropout(batch["image"], dropout)}, schedule, inputs))
    args = [*consistency, "keep_checkpoints=10"]
    whole = pretrain(load_pretrain_config(None, [*args, f"out_dir={tmp_path / 'whole'}"])).model
    middle = tmp_path / "whole" / "checkpoints" / "step-00000003.pt"  # within the second epoch
    again = load_pretrain_config(None, [*args, f"out_dir={tmp_path / 'again'}"])
    resumed = pretrain(again, resume=str(middle)).model
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_ema_teacher_follows_the_formula():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = {k: 0.75 * v + 0.25 * student.state_dict()[k] for k, v in teacher.state_dict().items()}
    EMATeacher(student, teacher, "m").after_step({"m": 0.75})
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7)


def test_the_objective_key_picks_the_config_and_unknown_ones_are_named(tmp_path):
    (tmp_path / "run.yaml").write_text("objective: mae_dex\nepochs: 2\nlambda_co: 0.2\n")
    config = load_pretrain_config(tmp_path / "run.yaml", ["mask_ratio=0.5"])
    assert (config.objective, config.epochs, config.lambda_co, config.mask_ratio) == ("mae_dex", 2, 0.2, 0.5)
    with pytest.raises(ConfigError, match="objective 'dino' is not one of"):
        load_pretrain_config(tmp_path / "run.yaml", ["objective=dino"])
    with pytest.raises(ConfigError, match="teacher_momentum: unknown key"):
        load_pretrain_config(tmp_path / "run.yaml", ["teacher_momentum=0.9"])


def test_a_teacher_that_would_be_optimised_is_refused(tmp_path, consistency, monkeypatch):
    monkeypatch.setattr(ConsistencyObjective, "teachers", lambda self: {"teacher": self.student})
    with pytest.raises(ValueError, match="its teacher teacher has parameters that require gradients"):
        pretrain(load_pretrain_config(None, [*consistency, f"out_dir={tmp_path}"]))
    assert not (tmp_path / "config.yaml").exists()


def test_an_objective_on_image_text_pairs_gets_the_reports_and_is_refused_images_without(tmp_path, consistency,
                                                                                         phantom_collection,
                                                                                         monkeypatch):
    monkeypatch.setattr(ConsistencyObjective, "batch", "image_text")
    with pytest.raises(ValueError, match=r"curated/index.json: \d+ of \d+ samples have no report.*pairs only"):
        pretrain(load_pretrain_config(None, [*consistency, f"out_dir={tmp_path / 'mixed'}"]))
    with pytest.raises(ValueError, match="a folder of images has none"):
        pretrain(load_pretrain_config(None, [*consistency, f"out_dir={tmp_path / 'folder'}",
                                             f"data={phantom_collection / 'raw' / 'sources' / 'oct-png'}"]))
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    rows = ["path,report"]
    for i in range(8):
        image = torch.rand(32, 32).mul(255).byte().numpy()
        Image.fromarray(image).save(pairs / f"{i}.png")
        rows.append(f"{i}.png,report number {i}")
    (pairs / "index.csv").write_text("\n".join(rows) + "\n")
    Recipe("pairs", [Source("pairs", "OCT", str(pairs), "image", "scale_255", index_csv="index.csv")]).save(
        tmp_path / "recipe.yaml")
    curate(tmp_path / "recipe.yaml", tmp_path / "curated", options=CurateOptions(min_size=16), progress=False)
    seen = []
    forward = ConsistencyObjective.forward
    monkeypatch.setattr(ConsistencyObjective, "forward", lambda self, batch, schedule, inputs: seen.append(
        (batch["report"], batch["report_type"])) or forward(self, batch, schedule, inputs))
    pretrain(load_pretrain_config(None, [*consistency, f"out_dir={tmp_path / 'run'}", f"data={tmp_path / 'curated'}",
                                         "samples_per_epoch=8", "epochs=1"]))
    assert len(seen) == 1 and sorted(seen[0][0]) == [f"report number {i}" for i in range(8)]
    assert seen[0][1] == ["OCT"] * 8


def test_a_name_is_registered_once():
    class Impostor(ConsistencyObjective):
        pass

    with pytest.raises(ValueError, match="objective 'consistency' is already .*ConsistencyObjective; .*Impostor needs "
                                         "another name"):
        register_objective(Impostor)
    assert objective_class("consistency") is ConsistencyObjective


@STRICT
@dataclass
class CentreConfig(DEXEncoderConfig):
    objective: Literal["centre"] = "centre"


@register_objective
class CentreObjective(DEXBackboneObjective):
    """A DEX ViT's class token pulled to the mean of its patch tokens: the method's one term, and nothing of the DEX
    terms written here."""

    name = "centre"
    config_class = CentreConfig
    loss_terms = ("centre", *DEX_TERMS)

    def __init__(self, config: CentreConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = create_encoder(config)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    def kept(self):
        return {"encoder": self.encoder}

    def transform(self):
        return PretrainTransform(32)

    def forward(self, batch, schedule, inputs):
        features, aux = self.encoder.forward_tokens(self.encoder.embed(batch["image"]), schedule["noise_std"],
                                                    inputs.get("router_eps"))
        centre = (features[:, 0] - features[:, 1:].mean(1)).pow(2).mean()
        return self.with_dex_terms(centre, {"centre": centre}, aux, schedule)


CENTRE = ["objective=centre", "model=dex_vit_tiny_patch16_256",
          "model_args={img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2, num_experts: 4, top_k: 2}",
          "lambda_bal=0.01", "samples_per_epoch=16", "batch_size=8", "epochs=2", "warmup_epochs=1", "log_every=1",
          "device=cpu", "shuffle_buffer=16", "base_lr=1e-2", "tensorboard=false", "checkpoint_every=0"]


def test_a_new_objective_on_the_dex_backbone_gets_the_dex_terms(tmp_path, phantom_collection):
    config = load_pretrain_config(None, [*CENTRE, f"data={phantom_collection / 'curated'}", f"out_dir={tmp_path}"])
    objective = build_objective(config)
    # the router noise of every DEX block, for the global batch, cut to a rank's rows
    full = objective.step_inputs(torch.Generator().manual_seed(3), 8, slice(0, 8))["router_eps"]
    part = objective.step_inputs(torch.Generator().manual_seed(3), 8, slice(4, 8))["router_eps"]
    assert len(full) == 3 and all(torch.equal(p, f[4:8]) for f, p in zip(full, part, strict=True))
    # Eq. 8's terms joined to the method's loss
    out = objective({"image": torch.rand(8, 3, 32, 32)}, objective.schedule(0, 10),
                    objective.step_inputs(torch.Generator().manual_seed(3), 8, slice(0, 8)))
    assert out.terms.keys() == {"centre", "alignment", "balance"} and out.terms["alignment"] > 0
    torch.testing.assert_close(out.loss, out.terms["centre"] + 0.1 * out.terms["alignment"]
                               + 0.01 * out.terms["balance"])
    # through the unchanged loop: the schedules, terms and director update logged, the directors moved by group EMA
    seed_everything(config.seed, torch.device("cpu"))
    initial = build_objective(config).state_dict()
    trained = pretrain(config).model
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"centre", "alignment", "balance", "momentum", "noise_std", "lambda_bal", "load"}
                                  <= r.keys() for r in rows)
    assert rows[0]["momentum"] == pytest.approx(0.99) and rows[-1]["noise_std"] < rows[0]["noise_std"] == 1.0
    assert len(rows[-1]["usage_entropy"]) == 3 and all(r["balance"] > 0 for r in rows)
    directors = trained.teachers()
    assert sorted(directors) == [f"encoder.blocks.{i}.dex.director" for i in range(3)]
    for name, director in directors.items():
        assert not any(p.requires_grad for p in director.parameters())
        assert not torch.equal(trained.state_dict()[f"{name}.fc1.weight"], initial[f"{name}.fc1.weight"]), name
    assert "usage entropy" in summary(tmp_path)


def test_a_backbone_without_dex_blocks_gets_none_of_the_dex_terms():
    objective = build_objective(load_pretrain_config(None, [*CENTRE, "model_args.num_experts=0"]))
    assert objective.step_inputs(torch.Generator(), 8, slice(0, 8)) == {} and objective.teachers() == {}
    out = objective({"image": torch.rand(4, 3, 32, 32)}, objective.schedule(0, 10), {})
    assert float(out.terms["alignment"]) == float(out.terms["balance"]) == 0.0 and torch.equal(out.loss,
                                                                                              out.terms["centre"])


def test_summary_gives_the_runs_rate_and_only_the_terms_that_apply(tmp_path):
    """images/s over the whole run (two windows of equal steps at 10 and 30 images/s: 15, not the last 30); a
    backbone without experts shows no alignment, balance or director."""
    (tmp_path / "config.yaml").write_text("objective: mae_dex\n")
    rows = [{"step": s, "epoch": 0, "skipped": 0, "loss": 1.0 / s, "reconstruction": 1.0 / s, "alignment": 0.0,
             "balance": 0.0, "images_per_s": rate} for s, rate in ((10, 10.0), (20, 30.0))]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summary(tmp_path)
    assert "steps: 20 (0 skipped), 15.0 images/s" in text and "reconstruction 0.0500" in text
    assert "alignment" not in text and "balance" not in text and "director" not in text
    rows[-1]["usage_entropy"] = [0.9, 0.8]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "alignment 0.0000, balance 0.0000" in summary(tmp_path)
