"""The benchmark suite: every run stored once, resumed, and the tables recomputed identically from stored runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dex
import dex.eval.suite
from dex.cli import main
from dex.data.tasks import load_task
from dex.eval.suite import Suite
from dex.eval.tables import report as write_report

SMALL = {"embed_dim": 32, "depth": 4, "num_heads": 2, "num_experts": 4}  # num_experts: for the DEX encoder only


@pytest.fixture(scope="module")
def suite(phantom_collection, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("suite")
    tasks = phantom_collection / "raw" / "tasks"
    data = {
        "out_dir": str(tmp_path / "bench"), "seeds": [0, 1], "baseline": "scratch",
        "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "lr": 5.0e-4, "steps_per_epoch": 3,
                     "mirror": "none"},
        "encoders": {"scratch": {"source": "scratch", "img_size": 32, "model_args": SMALL},
                     "dex-scratch": {"source": "scratch", "img_size": 32, "scratch_experts": True,
                                     "model_args": SMALL}},
        "tasks": [str(tasks / "xray-lungs"), str(tasks / "photo-lesion-type"), str(tasks / "oct-layers")],
        "ablations": {
            "top_k": {"encoder": "dex-scratch", "values": [1, 4], "tasks": ["xray-lungs"], "seeds": [0]},
            "data_fraction": {"encoders": ["scratch"], "values": [0.5, 1.0], "tasks": ["xray-lungs"], "seeds": [0]},
            "experts_vs_director": {"encoders": ["dex-scratch"], "tasks": ["photo-lesion-type"], "seeds": [0]},
            "components": {"encoders": ["scratch", "dex-scratch"], "tasks": ["xray-lungs"]},
        },
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["benchmark", str(path)]) == 0
    return path


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_suite_runs_resumes_and_reports_from_stored_runs(suite, monkeypatch, capsys):
    out = suite.parent / "bench"
    stored = sorted(out.glob("runs/*/*/*/seed*.json"))
    # 2 encoders x 3 tasks x 2 seeds, + top_k 2, data_fraction 2 (1.0 is its own variant), modes 2
    assert len(stored) == 12 + 2 + 2 + 2
    report = out / "report"
    assert {"table1_modalities.md", "table5_tasks.csv", "radar.png", "fig5_top_k.png", "fig5_data_fraction.md",
            "table4_experts_director.md", "table6_components.md", "runs.csv", "table_gains.md"} <= set(files(report))
    gains = (report / "table_gains.csv").read_text().splitlines()
    assert gains[0] == "task,protocol,encoder,seed,gain over scratch,paired 95% interval"
    rows = [line.split(",") for line in gains[1:]]
    assert {(r[0], r[2], r[3]) for r in rows if r[1] == "finetune"} == {
        (t, "dex-scratch", s) for t in ("xray-lungs", "photo-lesion-type", "oct-layers") for s in "01"}
    before = files(report)

    def refuse(*args, **kwargs):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(dex.eval.suite, "train_task_model", refuse)
    assert main(["benchmark", str(suite)]) == 0  # everything is stored: only the reports are rewritten
    assert "Avg. (3 tasks)" in capsys.readouterr().out
    assert files(report) == before
    for path in report.iterdir():
        path.unlink()
    assert main(["benchmark", str(suite), "--report-only"]) == 0
    assert files(report) == before  # the reports are a function of the stored runs


def test_tables_hold_the_means_of_the_stored_runs(suite):
    out = suite.parent / "bench"
    scores = [100 * json.loads(p.read_text())["test"]["dice"] for p in out.glob("runs/scratch/xray-lungs/default/*.json")]
    lines = (out / "report" / "table5_tasks.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[2].split("|")]
    assert header[1:5] == ["task", "trivial", "chance", "scratch"]
    row = next(line for line in lines if "xray-lungs" in line).split("|")
    mean, std = np.mean(scores), np.std(scores, ddof=1)
    assert f"{mean:.1f} ± {std:.1f}" in row[header.index("scratch")]
    assert row[header.index("chance")].strip() == "-" and float(row[header.index("trivial")]) == 0  # lungs in every image


def test_suite_errors(suite, tmp_path, capsys):
    assert main(["benchmark", str(suite), "--encoders", "scratch,mae"]) == 2
    assert "does not define: ['mae']" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    cases = {
        "finetune: {epoch: 3}": r"finetune\.epoch: unknown key; the known keys are recipe, epochs, warmup_epochs",
        "finetune: {epochs: ten}": r"finetune\.epochs: input should be a valid integer.*got 'ten'",
        "encoders: {a: {source: scratch, model: vit_nonexistent}}": r"encoder 'a': model 'vit_nonexistent'.*Unknown",
        "encoders: {a: {source: scratch, model_args: {depht: 2}}}": r"encoder 'a': .*unexpected keyword.*'depht'",
        "encoders: {a: 'timm:vit_nonexistent:x.pth'}": "encoder 'a': timm has no architecture 'vit_nonexistent'",
        "encoders: {a: {source: scratch, mode: expert}}": r"encoders\.a: mode: input should be 'experts' or",
        "encoders: {a: scratch}\nablations: {top_k: {encoder: b, values: [1]}}": r"ablations\.top_k: needs encoder",
        "encoders: {a: scratch}\nablations: {topk: {encoder: a}}": r"ablations\.topk: input should be 'top_k'",
        "encoders: {a: scratch}\ntasks: [{path: x, modalty: CT}]": r"tasks\[0\]: modalty: unknown key",
        "encoders: {trivial: scratch}": r"encoders: \['trivial'\] name the tables' baseline rows",
    }
    for text, message in cases.items():
        bad.write_text(("tasks: []\n" if "tasks:" not in text else "") + ("encoders: {a: scratch}\n" if "encoders:"
                       not in text else "") + text + "\n")
        with pytest.raises(ValueError, match=f"bad.yaml: .*{message}"):
            Suite.load(bad)
    # --tasks keeps those tasks, and the ablations' runs on them only
    subset = Suite.load(suite, tasks=["photo-lesion-type"])
    assert [Path(entry["path"]).name for entry in subset.tasks] == ["photo-lesion-type"]
    assert set(subset.ablations) == {"experts_vs_director"}  # the others: xray-lungs only
    with pytest.raises(ValueError, match=r"suite.yaml: --tasks names tasks the suite does not have: \['xray'\]; "
                                         r"its tasks are xray-lungs, photo-lesion-type, oct-layers"):
        Suite.load(suite, tasks=["xray"])
    # --encoders runs a subset: the others' files are not needed (an encoder not made yet), only theirs
    bad.write_text(f"tasks: []\nencoders: {{a: scratch, b: {tmp_path / 'not-yet'}}}\n")
    assert list(Suite.load(bad, only=["a"]).encoders) == ["a"]
    with pytest.raises(ValueError, match="encoder 'b'.*not-yet"):
        Suite.load(bad)


def test_per_case_dice_gets_its_own_table_when_stored_runs_have_it(tmp_path):
    def store(encoder, task, seed, test):
        path = tmp_path / "runs" / encoder / task / "default" / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": task, "modality": "CT", "type": "segmentation", "variant": "default",
                                    "seed": seed, "score_name": "dice", "test": test}))

    for seed, (a, b) in enumerate([(0.5, 0.3), (0.7, 0.5)]):
        store("scratch", "kipa", seed, {"dice": 0.8, "dice_3d": a})
        store("dex", "kipa", seed, {"dice": 0.9, "dice_3d": b})
        store("scratch", "polyp", seed, {"dice": 0.6})
        store("dex", "polyp", seed, {"dice": 0.6})
    write_report(tmp_path, "scratch")
    report = tmp_path / "report"
    assert "DSC per slice, Decathlon rule: an empty prediction on an empty truth scores 1" in \
        (report / "README.md").read_text()
    table = (report / "table5_tasks_dice3d.md").read_text()
    assert table.startswith("# Test DSC per case (3D), fine-tuning (x100, mean ± std over seeds 0, 1;")
    assert "| CT: kipa | 60.0 ± 14.1 | 40.0 ± 14.1 (-20.0) |" in table and "polyp" not in table
    assert (report / "table5_tasks_dice3d.csv").read_text().splitlines()[1] == \
        "CT: kipa,60.0 ± 14.1,40.0 ± 14.1 (-20.0)"
    for path in (tmp_path / "runs").glob("*/kipa/default/*.json"):
        record = json.loads(path.read_text())
        del record["test"]["dice_3d"]
        path.write_text(json.dumps(record))
    for path in report.iterdir():
        path.unlink()
    write_report(tmp_path, "scratch")
    assert not (report / "table5_tasks_dice3d.md").exists() and (report / "table5_tasks.md").exists()


def test_keep_models_writes_a_model_folder_per_run(phantom_collection, tmp_path):
    data = {"out_dir": str(tmp_path / "bench"), "keep_models": True,
            "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "steps_per_epoch": 3, "mirror": "none"},
            "encoders": {"scratch": {"source": "scratch", "img_size": 32, "model_args": SMALL}},
            "tasks": [str(phantom_collection / "raw" / "tasks" / "photo-lesion-type")]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(data))
    assert main(["benchmark", str(tmp_path / "suite.yaml")]) == 0
    folder = tmp_path / "bench" / "models" / "scratch" / "photo-lesion-type" / "default" / "seed0"
    record = json.loads((tmp_path / "bench" / "runs" / "scratch" / "photo-lesion-type" / "default" /
                         "seed0.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert json.dumps(metrics["test"], sort_keys=True) == json.dumps(record["test"], sort_keys=True)
    task = load_task(phantom_collection / "raw" / "tasks" / "photo-lesion-type")
    assert dex.load_model(folder).classes == list(task.spec.classes)


def test_trivial_rows_score_what_a_trivial_predictor_scores_on_the_same_images(tmp_path):
    """The trivial column is the all-background prediction's Dice (per slice and per case) and the majority class's
    macro F1 on the same test images, exactly; chance is the expected macro F1 of a uniform guess."""
    from dex.downstream.finetune import per_image_outputs
    from dex.downstream.metrics import DiceAccumulator, chance_f1_macro, classification_metrics

    rng = np.random.default_rng(0)
    masks = [torch.from_numpy(rng.integers(0, 3, (8, 8)) * (rng.random() < 0.5)) for _ in range(10)]

    def segmentation(logits_of):
        dice = DiceAccumulator(3)
        for n, mask in enumerate(masks):
            dice.add(logits_of(mask), mask, case=f"case{n // 4}")
        return dice

    background = segmentation(lambda mask: torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 8, 8))
    perfect = segmentation(lambda mask: torch.nn.functional.one_hot(mask, 3).permute(2, 0, 1).float())
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 1, 2, 0])
    majority = torch.zeros(len(labels), 3).index_fill_(1, torch.tensor([2]), 5.0)
    guess = torch.from_numpy(rng.normal(size=(len(labels), 3))).float()
    ids = [f"i{n}" for n in range(len(masks))]

    def store(encoder, task, kind, collected, test):
        path = tmp_path / "runs" / encoder / task / "default" / "seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        names = ids if kind == "segmentation" else [f"c{n}" for n in range(len(labels))]
        score = "dice" if kind == "segmentation" else "f1_macro"
        path.write_text(json.dumps({
            "task": task, "modality": "CT", "type": kind, "variant": "default", "seed": 0, "score_name": score,
            "test": test, "test_outputs": per_image_outputs(collected, names), "encoder": encoder}))
        return 100 * test[score]

    expected = {
        "seg": store("background", "seg", "segmentation", background,
                     {"dice": background.value(), "dice_3d": background.value_3d()}),
        "cls": store("background", "cls", "classification", (majority, labels),
                     classification_metrics(majority, labels))}
    store("model", "seg", "segmentation", perfect, {"dice": perfect.value(), "dice_3d": perfect.value_3d()})
    store("model", "cls", "classification", (guess, labels), classification_metrics(guess, labels))
    write_report(tmp_path, "model")
    report = tmp_path / "report"
    table = (report / "table5_tasks.csv").read_text().splitlines()
    assert table[0] == "task,trivial,chance,model,background"
    rows = {line.split(",")[0]: line.split(",") for line in table[1:]}
    assert rows["CT: seg"][1] == rows["CT: seg"][4].split(" ")[0] == f"{expected['seg']:.1f}" != "0.0"
    assert rows["CT: seg"][2] == "-"
    assert rows["CT: cls"][1] == rows["CT: cls"][4].split(" ")[0] == f"{expected['cls']:.1f}"
    assert rows["CT: cls"][2] == f"{100 * chance_f1_macro(labels.tolist(), 3):.1f}"
    dice_3d = (report / "table5_tasks_dice3d.csv").read_text().splitlines()
    assert dice_3d[0] == "task,trivial,model,background"
    assert dice_3d[1].split(",")[1] == f"{100 * background.value_3d():.1f}"
    assert "scores 1" in (report / "README.md").read_text()


def test_chance_macro_f1_is_the_mean_f1_of_uniform_guesses():
    from dex.downstream.metrics import chance_f1_macro, classification_metrics

    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    draws = [classification_metrics(torch.nn.functional.one_hot(torch.randint(0, 4, (1000,), generator=g), 4).float(),
                                    labels)["f1_macro"] for g in [torch.Generator().manual_seed(s) for s in range(20)]]
    assert chance_f1_macro(labels.tolist(), 4) == pytest.approx(np.mean(draws), abs=0.01)
    assert chance_f1_macro([0, 1, 2, 3], 4) == pytest.approx(0.25)


def test_a_suite_split_into_parts_gives_the_records_and_tables_of_one_process(phantom_collection, tmp_path, capsys):
    tasks = phantom_collection / "raw" / "tasks"

    def suite(out):
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump({
            "out_dir": str(tmp_path / out), "seeds": [0], "baseline": "scratch", "protocols": ["finetune", "linear"],
            "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "steps_per_epoch": 2, "mirror": "none"},
            "encoders": {"scratch": {"source": "scratch", "img_size": 32, "model_args": SMALL},
                         "dex-scratch": {"source": "scratch", "img_size": 32, "scratch_experts": True,
                                         "model_args": SMALL}},
            "tasks": [str(tasks / "xray-lungs"), str(tasks / "photo-lesion-type")]}))
        return str(path)

    def records(out):
        found = {}
        for path in sorted((tmp_path / out / "runs").rglob("seed*.json")):
            record = json.loads(path.read_text())
            found[str(path.relative_to(tmp_path / out))] = {k: v for k, v in record.items()
                                                           if not k.endswith("seconds")}  # timings differ
        return found

    assert main(["benchmark", suite("whole")]) == 0
    for part in ("0/2", "1/2"):
        assert main(["benchmark", suite("parts"), "--part", part]) == 0
        assert "--report-only" in capsys.readouterr().out and not (tmp_path / "parts" / "report").exists()
        if part == "0/2":
            assert 0 < len(records("parts")) < len(records("whole"))  # half the (encoder, task) pairs
    assert main(["benchmark", suite("parts"), "--report-only"]) == 0
    assert records("parts") == records("whole")
    assert files(tmp_path / "parts" / "report") == files(tmp_path / "whole" / "report")
    assert main(["benchmark", suite("parts"), "--part", "2/2"]) == 2
    assert "--part must be I/N with 0 <= I < N, got '2/2'" in capsys.readouterr().err
