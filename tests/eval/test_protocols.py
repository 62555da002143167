"""The frozen protocols: one feature pass (cached, and recomputed when what it depends on changes), an encoder
left as it was, and their place in dex benchmark (suite key, --protocols, stored records, the protocols table)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import dex
import dex.eval.features as features_module
import dex.eval.suite
from dex.cli import main
from dex.data.preprocess import Preprocessing
from dex.data.tasks import load_task
from dex.downstream.encoders import EncoderSpec, load_encoder
from dex.downstream.finetune import state_dict_sha256
from dex.eval.features import feature_key
from dex.eval.protocols import ProbeConfig, protocol_variants, run_frozen
from dex.eval.records import split_variant, variant_name
from dex.eval.suite import Suite, plan
from dex.models import DEXViT
from dex.seeding import seed_everything

PROBE = ProbeConfig(knn_k=[2], fewshot_n=[1, 2], fewshot_draws=3, bootstrap=50)


def _encoder(folder, seed=0):
    torch.manual_seed(seed)
    dex.save_pretrained(DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=2,
                               top_k=1), folder)
    return folder


def test_frozen_protocols_use_one_cached_feature_pass_and_leave_the_encoder_as_it_was(tmp_path, phantom_collection,
                                                                                     monkeypatch):
    task = load_task(phantom_collection / "raw" / "tasks" / "photo-lesion-type")
    folder = _encoder(tmp_path / "encoder")
    weights = (folder / "model.safetensors").read_bytes()
    spec = EncoderSpec("dex", str(folder))
    calls = []
    real = features_module.final_tokens
    monkeypatch.setattr(features_module, "final_tokens", lambda *a: calls.append(1) or real(*a))
    variants = ["linear", *protocol_variants("knn", PROBE), *protocol_variants("fewshot", PROBE)]
    records = run_frozen(spec, task, 0, variants, PROBE, tmp_path / "cache")
    first = len(calls)
    assert first > 0 and set(records) == {"linear", "knn-k2", "fewshot-1", "fewshot-2"}
    assert [r["protocol"] for r in records.values()] == ["linear", "knn", "fewshot", "fewshot"]
    assert not any(r["features_cached"] for r in records.values())
    loaded = dex.load_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == weights
    assert all(r["encoder_sha256"] == state_dict_sha256(loaded.state_dict()) for r in records.values())
    for name in ("linear", "knn-k2"):
        assert set(records[name]["test"]) == {"f1_macro", "accuracy", "balanced_accuracy", "auroc"}
        for metric, (low, high) in records[name]["test_intervals"].items():
            value = records[name]["test"][metric]
            assert np.isnan(value) or low - 1e-9 <= value <= high + 1e-9
    classes_in_train = len({task.labels[i] for i in task.splits["train"]})
    assert records["fewshot-1"]["train_images"] == classes_in_train and records["fewshot-1"]["draws"] == 3
    assert set(records["fewshot-2"]["test_std"]) == set(records["fewshot-2"]["test"])
    # the second run reads every split from the cache: no forward pass, the same records
    again = run_frozen(spec, task, 0, variants, PROBE, tmp_path / "cache")
    assert len(calls) == first and all(r["features_cached"] for r in again.values())
    def tests(rs):
        return json.dumps([r["test"] for r in rs.values()])  # NaN AUROC on 12 test images: compared as text

    assert tests(again) == tests(records)
    # other weights under the same folder: recomputed
    _encoder(folder, seed=1)
    changed = run_frozen(spec, task, 0, ["linear"], PROBE, tmp_path / "cache")
    assert len(calls) > first and not changed["linear"]["features_cached"]


def test_a_scratch_encoder_is_the_runs_seed_whatever_ran_before(tmp_path, phantom_collection):
    """The scratch baseline's frozen probes do not depend on what the process drew before (runs skipped as stored,
    other encoders, task order): the random encoder is drawn from the run's seed, as fine-tuning draws it."""
    task = load_task(phantom_collection / "raw" / "tasks" / "photo-lesion-type")
    spec = EncoderSpec("scratch", "scratch", img_size=32, model_args={"embed_dim": 32, "depth": 2, "num_heads": 2})
    first = run_frozen(spec, task, 0, ["linear"], PROBE, None)["linear"]
    torch.rand(1000)  # another run's draws
    again = run_frozen(spec, task, 0, ["linear"], PROBE, None)["linear"]
    other_seed = run_frozen(spec, task, 1, ["linear"], PROBE, None)["linear"]
    assert again["encoder_sha256"] == first["encoder_sha256"] != other_seed["encoder_sha256"]
    seed_everything(0)
    assert state_dict_sha256(load_encoder(spec).state_dict()) == first["encoder_sha256"]  # fine-tuning's encoder


def test_the_feature_key_changes_with_the_preprocessing_the_split_and_the_files(tmp_path, phantom_collection):
    task = load_task(phantom_collection / "raw" / "tasks" / "photo-lesion-type")
    base = feature_key("abc", task, "train", Preprocessing(size=32))
    assert base == feature_key("abc", task, "train", Preprocessing(size=32))
    assert base != feature_key("abd", task, "train", Preprocessing(size=32))
    assert base != feature_key("abc", task, "val", Preprocessing(size=32))
    assert base != feature_key("abc", task, "train", Preprocessing(size=32, mean=(0.5, 0.5, 0.5)))
    task.images[task.splits["train"][0]].touch()  # a rewritten image file
    assert base != feature_key("abc", task, "train", Preprocessing(size=32))


def test_a_segmentation_task_takes_the_linear_protocol_only(tmp_path, phantom_collection):
    task = load_task(phantom_collection / "raw" / "tasks" / "pathology-nuclei")
    with pytest.raises(ValueError, match="pathology-nuclei: a segmentation task takes the linear protocol only"):
        run_frozen(EncoderSpec("dex", str(_encoder(tmp_path / "e"))), task, 0, ["linear", "knn-k2"], PROBE, None)


def test_a_suite_runs_its_protocols_and_the_command_line_replaces_them(tmp_path, phantom_collection, monkeypatch):
    tasks = phantom_collection / "raw" / "tasks"
    data = {"out_dir": str(tmp_path / "bench"), "seeds": [0],
            "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "steps_per_epoch": 3, "mirror": "none"},
            "protocols": ["finetune", "linear", "knn"], "probe": {"knn_k": [2], "bootstrap": 20},
            "encoders": {"dex": str(_encoder(tmp_path / "encoder"))},
            "tasks": [str(tasks / "photo-lesion-type"), str(tasks / "pathology-nuclei")]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["benchmark", str(path)]) == 0
    runs = tmp_path / "bench" / "runs" / "dex"
    stored = {p.relative_to(runs).as_posix() for p in runs.glob("*/*/seed0.json")}
    assert stored == {"photo-lesion-type/default/seed0.json", "photo-lesion-type/linear/seed0.json",
                      "photo-lesion-type/knn-k2/seed0.json", "pathology-nuclei/default/seed0.json",
                      "pathology-nuclei/linear/seed0.json"}  # segmentation: the linear head on patch tokens
    assert json.loads((runs / "photo-lesion-type/default/seed0.json").read_text())["protocol"] == "finetune"
    table = (tmp_path / "bench" / "report" / "table_protocols.md").read_text()
    assert "| finetune | linear | knn-k2 |" in table and "photo-lesion-type" in table
    assert list((tmp_path / "bench" / "features").glob("photo-lesion-type-*.npz"))

    assert main(["benchmark", str(path), "--protocols", "lora"]) == 0  # LoRA on both tasks (head, or UNETR)
    lora = {p.parent.parent.name: json.loads(p.read_text()) for p in runs.glob("*/lora/seed0.json")}
    assert set(lora) == {"photo-lesion-type", "pathology-nuclei"}
    assert all(r["protocol"] == "lora" and r["config"]["lora_rank"] == 8 for r in lora.values())
    assert "| lora |" in (tmp_path / "bench" / "report" / "table_protocols.md").read_text()
    assert main(["benchmark", str(path), "--protocols", "frozen-unetr"]) == 0  # segmentation tasks only
    assert [p.parent.parent.name for p in runs.glob("*/frozen-unetr/seed0.json")] == ["pathology-nuclei"]
    assert "| lora | frozen-unetr |" in (tmp_path / "bench" / "report" / "table_protocols.md").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a stored fine-tuning run was trained again")

    monkeypatch.setattr(dex.eval.suite, "train_task_model", refuse)
    assert main(["benchmark", str(path), "--protocols", "fewshot,finetune"]) == 0
    assert {p.parent.name for p in runs.glob("photo-lesion-type/fewshot-*/seed0.json")} == {
        "fewshot-1", "fewshot-5", "fewshot-10"}
    assert main(["benchmark", str(path), "--protocols", "probe,linear"]) == 2
    data["out_dir"] = str(tmp_path / "frozen-only")
    path.write_text(yaml.safe_dump(data))
    assert main(["benchmark", str(path), "--protocols", "knn"]) == 0  # no fine-tuning run at all
    assert {p.name for p in (tmp_path / "frozen-only" / "report").iterdir()} == {  # the paper's layouts per protocol
        "table_protocols.md", "table_protocols.csv", "runs.csv", "README.md", "table1_modalities_knn-k2.md",
        "table1_modalities_knn-k2.csv", "table5_tasks_knn-k2.md", "table5_tasks_knn-k2.csv"}
    report = tmp_path / "frozen-only" / "report"
    assert "Test score per task, knn-k2" in (report / "table5_tasks_knn-k2.md").read_text()
    assert main(["report", str(tmp_path / "frozen-only")]) == 0  # the page finds a frozen-only benchmark
    page = (tmp_path / "frozen-only" / "report.html").read_text()
    assert "Test score per protocol" in page and "Average test score per modality, knn-k2" in page


def test_a_stored_variant_names_its_setting_and_protocol():
    assert variant_name("top_k=2", "default") == "top_k=2"
    assert variant_name("top_k=2", "knn-k10") == "top_k=2,knn-k10"
    assert variant_name("", "linear") == "linear"
    for setting in ("", "top_k=2", "data_fraction=0.25", "mode=director"):
        for variant in ("default", "linear", "knn-k10", "fewshot-5", "frozen-unetr"):
            assert split_variant(variant_name(setting, variant)) == (setting, variant)


def test_an_ablation_runs_under_its_own_protocols(tmp_path, phantom_collection, monkeypatch):
    tasks = phantom_collection / "raw" / "tasks"
    scratch = {"source": "scratch", "img_size": 32, "scratch_experts": True,
               "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_experts": 4}}
    data = {"out_dir": str(tmp_path / "bench"), "seeds": [0], "protocols": ["knn"],
            "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "steps_per_epoch": 3, "mirror": "none"},
            "probe": {"knn_k": [2], "bootstrap": 20}, "encoders": {"dex": scratch},
            "tasks": [str(tasks / "photo-lesion-type"), str(tasks / "pathology-nuclei")],
            "ablations": {"top_k": {"encoder": "dex", "values": [1, 4], "tasks": ["photo-lesion-type"],
                                    "protocols": ["finetune", "linear"]},
                          "data_fraction": {"encoders": ["dex"], "values": [0.25, 1.0], "protocols": ["linear"]}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    suite = Suite.load(path)
    planned = {(task, variant): config for _, task, variant, _, _, config in
               plan(suite, {t.name: t for t in map(load_task, data["tasks"])})}
    assert set(planned) == {
        ("photo-lesion-type", "knn-k2"), ("photo-lesion-type", "top_k=1"), ("photo-lesion-type", "top_k=1,linear"),
        ("photo-lesion-type", "top_k=4"), ("photo-lesion-type", "top_k=4,linear"),
        ("photo-lesion-type", "data_fraction=0.25,linear"), ("photo-lesion-type", "data_fraction=1.0,linear"),
        ("pathology-nuclei", "data_fraction=0.25,linear"), ("pathology-nuclei", "data_fraction=1.0,linear")}
    assert planned[("pathology-nuclei", "data_fraction=0.25,linear")].data_fraction == 0.25
    forwards = []
    real = features_module.final_tokens
    monkeypatch.setattr(features_module, "final_tokens", lambda encoder, images: forwards.append(
        encoder.blocks[0].dex.top_k) or real(encoder, images))
    assert main(["benchmark", str(path)]) == 0
    runs = tmp_path / "bench" / "runs" / "dex"
    record = json.loads((runs / "photo-lesion-type" / "top_k=4,linear" / "seed0.json").read_text())
    assert record["protocol"] == "linear" and record["encoder_spec"]["top_k"] == 4
    assert {1, 4} <= set(forwards)  # each top_k its own feature pass: the cache key knows the setting
    task = load_task(tasks / "photo-lesion-type")
    fraction = json.loads((runs / "photo-lesion-type" / "data_fraction=0.25,linear" / "seed0.json").read_text())
    assert fraction["split_images"]["train"] == round(len(task.splits["train"]) * 0.25)
    assert fraction["split_images"]["test"] == len(task.splits["test"])  # validation and test stay whole
    sweep = (tmp_path / "bench" / "report" / "fig5_top_k.md").read_text()
    assert "| dex on photo-lesion-type |" in sweep and "| dex on photo-lesion-type (linear) |" in sweep
    fractions = (tmp_path / "bench" / "report" / "fig5_data_fraction.md").read_text()
    assert "| dex on pathology-nuclei (linear) |" in fractions
    data["ablations"]["trainable_blocks"] = {"encoder": "dex", "values": [1], "protocols": ["linear"]}
    path.write_text(yaml.safe_dump(data))
    assert main(["benchmark", str(path)]) == 2  # a frozen probe has no blocks to train


def test_frozen_unetr_trains_the_decoder_and_leaves_the_encoder_as_it_was(tmp_path, phantom_collection):
    from dex.downstream.finetune import FinetuneConfig, train_task_model

    folder = _encoder(tmp_path / "encoder")
    task = load_task(phantom_collection / "raw" / "tasks" / "pathology-nuclei")
    record, model = train_task_model(EncoderSpec("dex", str(folder)), task, 0,
                                     FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4, freeze_encoder=True,
                                                    steps_per_epoch=3))
    original = dex.load_pretrained(folder).state_dict()
    kept = model.network.encoder.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in original.items() if k in kept and not k.startswith("head."))
    assert record["trainable_parameters"] == sum(p.numel() for n, p in model.network.named_parameters()
                                                 if not n.startswith("encoder."))


def test_linear_segmentation_learns_from_frozen_patch_tokens(tmp_path, phantom_collection):
    task = load_task(phantom_collection / "raw" / "tasks" / "pathology-nuclei")
    spec = EncoderSpec("dex", str(_encoder(tmp_path / "encoder")))
    record = run_frozen(spec, task, 0, ["linear"], ProbeConfig(segmentation_epochs=5, bootstrap=20),
                        tmp_path / "cache")["linear"]
    assert record["protocol"] == "linear" and record["score_name"] == "dice" and 0 <= record["test"]["dice"] <= 1
    assert record["chosen"]["lr"] in (1e-3, 1e-2) and len(record["test_outputs"]["dice"]) == len(task.splits["test"])
    cached = next((tmp_path / "cache").glob("pathology-nuclei-train-*.npz"))
    with np.load(cached) as stored:
        assert stored["patches"].shape == (len(task.splits["train"]), 4, 32)  # 32 px / 16: a 2 x 2 grid of tokens


def test_the_patch_classifier_fits_a_rule_of_the_tokens():
    from dex.eval.probes import fit_patch_classifier, patch_logits

    rng = np.random.default_rng(0)
    patches = rng.normal(size=(24, 16, 8)).astype(np.float16)
    labels = (patches[..., 0] > 0).astype(np.int64).reshape(24, 4, 4)  # class = sign of the first feature
    masks = labels.repeat(4, axis=1).repeat(4, axis=2)  # 16 x 16 masks, one 4 x 4 block per token
    head = fit_patch_classifier(patches, masks, (4, 4), 2, lr=1e-2, epochs=60, batch_size=8)
    with torch.no_grad():
        predicted = patch_logits(head, torch.from_numpy(patches), (4, 4)).argmax(1).numpy()
    assert (predicted == labels).mean() > 0.95
