"""MedMoE as a pretraining objective on the phantoms' image-report pairs: a short run learns and routes by report
type, resumes bit for bit after a kill, and its model (backbone, text encoder and tokenizer, heads) round-trips
through export and load with no network; the vision-language evaluation reads it."""

from __future__ import annotations

import json
import socket

import pytest
import torch

import dex
from dex.cli import main
from dex.data.curate import CurateOptions, curate
from dex.data.phantoms import make_phantoms
from dex.models import DEXViT
from dex.models.text import build_text_encoder
from dex.train.export import export_run, load_medmoe, run_objective
from dex.train.objectives import load_pretrain_config
from dex.train.objectives.medmoe import MedMoEObjective
from dex.train.pretrain import pretrain
from tests.train.test_engine import clean_killed_resumed

CONFIG = "configs/pretrain_medmoe_tiny_cpu.yaml"
TINY = [  # a 4-stage Swin at 64 px and a one-layer BERT
    "model_args.img_size=64", "model_args.embed_dim=16", "model_args.depths=[1, 1, 1, 1]",
    "model_args.num_heads=[1, 2, 2, 4]", "text.hidden_size=32", "text.layers=1", "text.intermediate_size=64",
    "text.vocab_size=300", "text.max_length=48", "embed_dim=32", "router_hidden=32", "batch_size=16",
    "warmup_epochs=1", "log_every=1", "shuffle_buffer=32", "tensorboard=false", "base_lr=0.16",
]


@pytest.fixture(scope="module")
def pairs(phantom_collection, tmp_path_factory):
    """The phantoms' image-report pairs (7 report types, 32 px images read at 64), curated as a collection."""
    out = tmp_path_factory.mktemp("pairs") / "curated"
    curate(phantom_collection / "raw" / "recipe-pairs.yaml", out, options=CurateOptions(min_size=16),
           progress=False)
    return out


@pytest.fixture(scope="module")
def held_out_pairs(tmp_path_factory):
    """Pairs of phantoms drawn with another seed (8 per modality): images and reports the run never saw."""
    root = tmp_path_factory.mktemp("held-out")
    make_phantoms(root / "raw", per_modality=8, size=32, seed=1, task_images=5, workers=1)
    curate(root / "raw" / "recipe-pairs.yaml", root / "curated", options=CurateOptions(min_size=16), progress=False)
    return root / "curated"


@pytest.fixture(scope="module")
def medmoe_run(pairs, tmp_path_factory):
    """60 steps of 16 pairs (about 30 s)."""
    out = tmp_path_factory.mktemp("medmoe") / "run"
    torch.manual_seed(0)
    pretrain(load_pretrain_config(CONFIG, [*TINY, f"data={pairs}", "epochs=10", "checkpoint_every=0",
                                         f"out_dir={out}"]))
    return out, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_short_run_lowers_the_loss_and_routes_by_report_type(medmoe_run, pairs):
    out, rows = medmoe_run
    types = json.loads((pairs / "index.json").read_text())["report_types"]
    assert len(types) == 7 and {"X-ray", "US", "Fundus", "OCT", "Pathology", "Endoscopy", "Photo"} == set(types)
    first, last = (sum(r[key] for r in part) / len(part) for part in (rows[:5], rows[-5:]) for key in ["loss"])
    assert last < first - 0.5
    assert all({"global", "local", "aux", "image_router", "expert_load", "expert_load_by_type", "type_agreement"}
               <= r.keys() for r in rows)
    assert sum(r["type_agreement"] for r in rows[-5:]) / 5 > 0.8  # chance about 1/7
    assert {"encoder", "text", "heads"} <= {p.name for p in out.iterdir()}


def test_the_model_round_trips_through_export_and_load_offline(medmoe_run, tmp_path, monkeypatch):
    out, _ = medmoe_run
    exported = export_run(out, tmp_path / "export")
    assert {"config.json", "model.safetensors", "text", "heads"} <= {p.name for p in exported.iterdir()}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in exported.rglob("*"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(OSError("no network")))
    trained = run_objective(out).eval()
    images, texts = torch.rand(3, 3, 64, 64), ["Chest X-ray, PA view.", "No polyp.", "Fetal head ultrasound."]
    with torch.no_grad():
        expected = trained.encode_images(images), trained.encode_texts(texts)
        for folder in (exported, out):
            model = load_medmoe(folder)
            torch.testing.assert_close(model.encode_images(images), expected[0])
            torch.testing.assert_close(model.encode_texts(texts), expected[1])
    assert model.text.tokenizer.get_vocab() == trained.text.tokenizer.get_vocab()
    backbone = dex.load_pretrained(exported)  # the backbone alone is a dex encoder folder, as for every method
    torch.testing.assert_close(backbone.state_dict(), trained.encoder.state_dict())


def test_held_out_retrieval_and_routing_are_far_above_chance(medmoe_run, held_out_pairs, phantom_collection,
                                                            tmp_path):
    out, _ = medmoe_run
    assert main(["vl-eval", str(out), str(held_out_pairs), "--out", str(tmp_path / "vl"), "--task",
                 str(phantom_collection / "raw" / "tasks" / "photo-lesion-type")]) == 0
    result = json.loads((tmp_path / "vl" / "vl_metrics.json").read_text())
    retrieval = result["retrieval"]
    assert retrieval["pairs"] == json.loads((held_out_pairs / "index.json").read_text())["samples"] > 40
    assert retrieval["i2t_R@5"] > 3 * retrieval["chance_R@5"] and retrieval["t2i_R@5"] > 3 * retrieval["chance_R@5"]
    assert result["routing"]["type_agreement"] > 0.8
    assert set(result["zero_shot"]) == {"report_type", "photo-lesion-type"}
    assert "| all (" in (tmp_path / "vl" / "vl_metrics.md").read_text()


def test_resume_after_sigkill_ends_bit_for_bit_identical(tmp_path, pairs):
    args = [*TINY, f"data={pairs}", "epochs=3", "checkpoint_every=1", "keep_checkpoints=3", "samples_per_epoch=48"]
    clean_killed_resumed(CONFIG, args, tmp_path, ("encoder/model.safetensors", "heads/model.safetensors",
                                                  "text/model.safetensors"))


def test_bad_settings_are_refused_with_the_reason(pairs, tmp_path):
    config = load_pretrain_config(CONFIG, [*TINY, f"data={pairs}"])
    text = build_text_encoder(config.text, ["A report."])
    dex_vit = DEXViT(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="a DEX ViT with experts would train here without its alignment"):
        MedMoEObjective(dex_vit, text, ["X-ray"], config)
    with pytest.raises(ValueError, match="the H/32 map of a 32 px input is 1 x 1"):
        MedMoEObjective(DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=0), text,
                        ["X-ray"], config)
    with pytest.raises(ValueError, match="num_experts 3 with 7 report types"):
        pretrain(load_pretrain_config(CONFIG, [*TINY, f"data={pairs}", "num_experts=3", f"out_dir={tmp_path / 'a'}"]))
    config = load_pretrain_config(CONFIG, [*TINY, f"data={pairs}", "report_types=[X-ray, US]", "num_experts=2",
                                         "epochs=1", f"out_dir={tmp_path / 'b'}"])
    with pytest.raises(ValueError, match=r"report types \[.*'Fundus'.*\] are not among the run's \['X-ray', 'US'\]"):
        pretrain(config)
