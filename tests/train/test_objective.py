"""The objective interface: a method the loop has never seen (a student with an EMA teacher, defined here) trains,
logs its terms and schedules, keeps its teacher out of the optimiser, checkpoints and resumes exactly, all through
:class:`dex.train.objective.Objective` with the loop unchanged."""

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
from dex.data.curate import CurateOptions, curate
from dex.data.recipe import Recipe, Source
from dex.data.transforms import PretrainTransform
from dex.schedules import cosine
from dex.train.hooks import EMATeacher
from dex.train.objective import Objective, RunConfig, StepOutput
from dex.train.objectives import OBJECTIVES, load_pretrain_config
from dex.train.pretrain import pretrain, summary


@STRICT
@dataclass
class ConsistencyConfig(RunConfig):
    objective: Literal["consistency"] = "consistency"
    teacher_momentum: float = 0.9
    teacher_momentum_final: float = 1.0


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
def consistency(monkeypatch, phantom_collection):
    monkeypatch.setitem(OBJECTIVES, "consistency", ConsistencyObjective)
    return ["objective=consistency", f"data={phantom_collection / 'curated'}", "samples_per_epoch=16",
            "batch_size=8", "epochs=2", "warmup_epochs=1", "log_every=1", "device=cpu", "shuffle_buffer=16",
            "base_lr=1e-2", "tensorboard=false", "checkpoint_every=1"]


def test_a_new_objective_trains_through_the_unchanged_loop(tmp_path, consistency):
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
