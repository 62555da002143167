"""MedMoE as a pretraining objective on the phantoms' image-report pairs: a short run learns and routes by report
type, resumes bit for bit after a kill, and its model (backbone, text encoder and tokenizer, heads) round-trips
through export and load with no network; the vision-language evaluation and dex embed read it."""

from __future__ import annotations

import csv
import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import dex
from dex.analysis.report import write_report
from dex.cli import main
from dex.data.curation import CurateOptions, curate
from dex.data.phantoms import make_phantoms
from dex.downstream.embed import embed
from dex.models import DEXViT
from dex.models.text import build_text_encoder
from dex.models.weights import load_preprocessing
from dex.safeload import load_state_dict_file
from dex.train.export import export_run
from dex.train.runs import kept_objective, load_kept, run_objective
from dex.seeding import seed_everything
from dex.train.objectives import build_objective, load_pretrain_config
from dex.train.objectives.medmoe import MedMoEObjective
from dex.train.pretrain import pretrain
from tests.train.test_engine import _rank, clean_killed_resumed

CONFIG = "configs/pretrain_medmoe_tiny_cpu.yaml"
TINY = [  # a 4-stage Swin at 64 px and a one-layer BERT
    "model_args.img_size=64", "model_args.embed_dim=16", "model_args.depths=[1, 1, 1, 1]",
    "model_args.num_heads=[1, 2, 2, 4]", "text.hidden_size=32", "text.layers=1", "text.intermediate_size=64",
    "text.vocab_size=300", "text.max_length=48", "embed_dim=32", "router_hidden=32", "batch_size=16",
    "warmup_epochs=1", "log_every=1", "shuffle_buffer=32", "tensorboard=false", "base_lr=0.16",
]


DEX_VIT = [  # no config file, whose model_args are a Swin's: a DEX ViT at 64 px with 4 experts top-2 per block
    "objective=medmoe", "device=cpu", *(arg for arg in TINY if not arg.startswith("model_args.")),
    "model=dex_vit_tiny_patch16_256", "model_args={img_size: 64, patch_size: 16, embed_dim: 32, depth: 4, "
    "num_heads: 2, num_experts: 4, top_k: 2}"]


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
        for folder in (exported, out):  # the method is found from the folder, never named
            model = load_kept(folder)
            assert type(model) is MedMoEObjective and kept_objective(folder) is MedMoEObjective and not model.training
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
    page = write_report(tmp_path / "vl").read_text()  # dex report shows the evaluation's tables
    assert "<h3>Retrieval (x100; chance K/N)</h3>" in page and page.count("<table>") == 2
    page = write_report(out, tmp_path / "run.html").read_text()  # and the run's expert load per report type
    logged = medmoe_run[1][-1]["expert_load_by_type"]
    load = page.split("Expert load by report type")[1].split("</table>")[0]
    assert load.count("<tr>") == 1 + len(logged) and all(f"<td class=\"\">{t}</td>" in load for t in logged)
    assert page.count("<img") == 1


def test_embed_gives_images_and_texts_in_the_shared_space(medmoe_run, held_out_pairs, tmp_path, capsys):
    out, _ = medmoe_run
    raw = held_out_pairs.parent / "raw"
    index = next(raw.rglob("index.csv"))
    with open(index, newline="", encoding="utf-8") as handle:
        pairs = list(csv.DictReader(handle))[:5]
    images = [index.parent / row["path"] for row in pairs]
    (tmp_path / "reports.txt").write_text(f"{pairs[0]['report']}\n\n{pairs[1]['report']}\n", encoding="utf-8")
    with open(tmp_path / "reports.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["id", "report"], *[[i, row["report"]] for i, row in enumerate(pairs)]])
    status = main(["embed", str(out), *map(str, images), "--texts", str(tmp_path / "reports.txt"),
                   str(tmp_path / "reports.csv"), "--out", str(tmp_path / "emb")])
    assert status == 3 and "1 inputs could not be read" in capsys.readouterr().err
    emb = tmp_path / "emb"
    model = load_kept(out)
    preprocessing = load_preprocessing(out / "encoder")
    texts = [pairs[0]["report"], pairs[1]["report"], *(row["report"] for row in pairs)]
    with torch.no_grad():
        expected_images = model.encode_images(torch.stack([preprocessing.read(path) for path in images]))
        expected_texts = model.encode_texts(texts)
    torch.testing.assert_close(torch.from_numpy(np.load(emb / "shared.npy")), expected_images)
    torch.testing.assert_close(torch.from_numpy(np.load(emb / "text_shared.npy")), expected_texts)
    assert np.load(emb / "cls.npy").shape == (len(images), model.encoder.num_features) and len(images) > 2
    lines = (emb / "text_index.csv").read_text().splitlines()
    assert lines[:4] == ["row,file,line", f"0,{tmp_path / 'reports.txt'},1", f"1,{tmp_path / 'reports.txt'},3",
                         f"2,{tmp_path / 'reports.csv'},2"] and len(lines) == 1 + 2 + len(pairs)
    assert not any(pairs[0]["report"] in line for line in lines)  # rows are named, never quoted
    assert (emb / "errors.csv").read_text().splitlines()[1] == f"{tmp_path / 'reports.txt'}:2,empty text"
    (tmp_path / "bad.csv").write_text("id,text\n1,a\n")
    with pytest.raises(ValueError, match=r"bad.csv: no 'report' column"):
        embed(str(out), [], tmp_path / "bad", texts=[tmp_path / "bad.csv"])
    with pytest.raises(ValueError, match="texts need a vision-language model"):
        embed(str(out / "encoder"), [], tmp_path / "image-only", texts=[tmp_path / "reports.txt"])


def test_resume_after_sigkill_ends_bit_for_bit_identical(tmp_path, pairs):
    args = [*TINY, f"data={pairs}", "epochs=3", "checkpoint_every=1", "keep_checkpoints=3", "samples_per_epoch=48"]
    clean_killed_resumed(CONFIG, args, tmp_path, ("encoder/model.safetensors", "heads/model.safetensors",
                                                  "text/model.safetensors"))


def test_bad_settings_are_refused_with_the_reason(pairs, tmp_path):
    config = load_pretrain_config(CONFIG, [*TINY, f"data={pairs}"])
    text = build_text_encoder(config.text, ["A report."])
    with pytest.raises(ValueError, match="the H/32 map of a 32 px input is 1 x 1"):
        MedMoEObjective(DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=0), text,
                        ["X-ray"], config)
    with pytest.raises(ValueError, match="num_experts 3 with 7 report types"):
        pretrain(load_pretrain_config(CONFIG, [*TINY, f"data={pairs}", "num_experts=3", f"out_dir={tmp_path / 'a'}"]))
    config = load_pretrain_config(CONFIG, [*TINY, f"data={pairs}", "report_types=[X-ray, US]", "num_experts=2",
                                         "epochs=1", f"out_dir={tmp_path / 'b'}"])
    with pytest.raises(ValueError, match=r"report types \[.*'Fundus'.*\] are not among the run's \['X-ray', 'US'\]"):
        pretrain(config)


def test_a_dex_vit_backbone_trains_with_its_dex_terms_and_directors(tmp_path, pairs):
    config = load_pretrain_config(None, [*DEX_VIT, f"data={pairs}", "epochs=1", "samples_per_epoch=48",
                                         "checkpoint_every=0", f"out_dir={tmp_path}"])
    trained = pretrain(config).model
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["alignment"] > 0 and r["balance"] > 0 for r in rows) and len(rows[-1]["usage_entropy"]) == 4
    seed_everything(config.seed, torch.device("cpu"))
    initial = build_objective(config).state_dict()
    directors = trained.teachers()
    assert len(directors) == 4 and not any(p.requires_grad for d in directors.values() for p in d.parameters())
    for name in directors:  # each director followed its experts by group EMA
        key = f"{name}.fc1.weight"
        assert not torch.equal(trained.state_dict()[key], initial[key]), key
    exported = dex.load_pretrained(tmp_path / "encoder").state_dict()
    assert any(".dex.director." in key for key in exported)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, pairs, mode):
    """Both contrastive losses over the gathered global batch, the experts' BatchNorm over every rank's images of
    the expert, a DEX backbone's balance loss and directors: two ranks of 4 pairs take the step of one process of 8.

    A collection of fewer shards than 8 per reader is read sample by sample in turn (reader r of R takes every R-th
    sample) and, unshuffled, each global batch of two ranks holds the same pairs as one process's, in another order;
    the losses do not depend on the order. What does: the router noise, drawn per row of the global batch (off
    here), and the text encoder's dropout, drawn per rank (off)."""
    args = [*DEX_VIT, f"data={pairs}", "text.dropout=0", "noise_std=0", "noise_std_final=0", "shuffle_buffer=1",
            "batch_size=8", "epochs=2", "checkpoint_every=0", f"distributed={mode}"]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(_rank, args=(2, port, [*args, "samples_per_epoch=8"], str(tmp_path / mode)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = pretrain(load_pretrain_config(None, [*args, "samples_per_epoch=16", f"out_dir={tmp_path / 'one'}"]))
    single = single.model.state_dict()

    def close(value: torch.Tensor, expected: torch.Tensor, key: str) -> None:
        if key.endswith("qkv.bias"):  # the key bias has no true gradient (softmax ignores it): Adam makes its
            third = len(value) // 3   # float noise lr-sized steps, so compare the query and value biases
            value, expected = torch.cat([value[:third], value[2 * third:]]), torch.cat([expected[:third],
                                                                                       expected[2 * third:]])
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=key)

    if mode == "ddp":
        ranks = [torch.load(tmp_path / mode / f"rank{r}.pt", weights_only=True) for r in range(2)]
        for key, value in single.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), key
            close(ranks[0][key], value, key)
    for part, prefix in (("encoder", "pyramid.encoder."), ("heads", "")):  # gathered from the shards under FSDP
        saved = load_state_dict_file(tmp_path / mode / part / "model.safetensors")
        for key, value in saved.items():
            close(value, single[prefix + key], key)
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / mode / "log.jsonl").read_text().splitlines()]
    assert len(one) == 4
    for a, b in zip(one, two, strict=True):  # the logged losses and routing are the global batch's
        assert a["expert_load"] == b["expert_load"] and a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["local"] == pytest.approx(b["local"], abs=1e-4) and a["balance"] == pytest.approx(b["balance"])


def test_the_backbone_warm_starts_from_an_encoder_folder(medmoe_run, pairs, tmp_path):
    run, _ = medmoe_run
    config = load_pretrain_config(CONFIG, [*TINY, f"data={pairs}", f"init_checkpoint={run / 'encoder'}"])
    objective = build_objective(config)
    saved = dex.load_pretrained(run / "encoder").state_dict()
    assert objective.encoder.state_dict().keys() == saved.keys()
    assert all(torch.equal(objective.encoder.state_dict()[k], v) for k, v in saved.items())
    wider = load_pretrain_config(CONFIG, [*TINY, f"data={pairs}", "model_args.embed_dim=24",
                                          f"init_checkpoint={run / 'encoder'}"])
    with pytest.raises(ValueError, match=r"encoder/model.safetensors: does not fit SwinTransformer; shapes that "):
        build_objective(wider)
