"""The tables and figures of a benchmark suite, computed from its stored runs only (:mod:`dex.eval.records`), so
that recomputing them gives the same files: the paper's Tables 1 and 5 and Fig. 4 per protocol, the protocols table
with bootstrap intervals, the paired gains over the baseline, the ablations' tables and figures (Fig. 5, Tables 4
and 6), ``runs.csv``, and ``README.md``: how to read them (the scores' rules, once).

Every table that ranks encoders has a ``trivial`` column (or row) scored on the same test images: background
everywhere for segmentation, the majority class of the test labels for classification; and, for classification, a
``chance`` one: the macro F1 a uniform random guess is expected to score (:mod:`dex.downstream.metrics`)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from dex.data.recipe import MODALITIES
from dex.downstream.metrics import chance_f1_macro, paired_gain_interval, score_interval, trivial_score
from dex.eval.protocols import PROTOCOLS
from dex.eval.records import split_variant, stored_runs, variant_name

DICE_RULE = "an empty prediction on an empty truth scores 1, false positives on empty slices score 0"
SCORES = f"F1 macro for classification; for segmentation DSC per slice, Decathlon rule: {DICE_RULE}"
TRIVIAL, CHANCE = "trivial", "chance"
READING = f"""# How to read these tables

- Scores are x100 on each task's test images: {SCORES}. `table5_tasks_dice3d` scores a case's slices as one 3D
  volume per class, by the same rule.
- `{TRIVIAL}`: what a model that learned nothing scores on the same test images: background everywhere for
  segmentation (under the Decathlon rule an image without the class scores 1 for it, so this is often far from 0),
  the majority class of the test labels for classification. `{CHANCE}` (classification): the macro F1 a uniform
  random guess is expected to score. An encoder at or below these rows has learned nothing usable for the task.
- A probe that learned nothing says so: `(background only)` or `(one class only)` after its score.
- One seed: each score with its bootstrap 95% interval over the test images (`table_protocols`); several seeds:
  mean ± std over seeds. `table_gains`: each encoder's gain over the baseline on the same images with its paired
  bootstrap interval: a gain whose interval holds 0 is not told apart from no gain.
"""


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and, over several values, the sample standard deviation (None for one value: no spread to show)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _scores(records, variant="default", metric=None) -> dict[tuple[str, str], list[float]]:
    """(encoder, task) -> the runs' scores (x100): each run's own score, or ``metric`` where a run has it."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r["variant"] == variant and (metric is None or metric in r["test"]):
            out.setdefault((r["encoder"], r["task"]), []).append(r["score"] if metric is None
                                                                 else 100 * r["test"][metric])
    return out


def _trivial(records, variant="default", metric=None) -> dict[tuple[str, str], tuple[float, None]]:
    """(trivial or chance, task) -> the trivial predictors' scores (x100) on the test images of the task's runs of
    ``variant``, the mean over seeds (one run per seed: every encoder is tested on the same images)."""
    scores: dict[tuple[str, str], dict[int, float]] = {}
    for r in records:
        outputs, name = r.get("test_outputs"), metric or r["score_name"]
        if r["variant"] != variant or not outputs or name not in r["test"]:
            continue
        trivial = trivial_score(outputs, name)
        if trivial is not None:
            scores.setdefault((TRIVIAL, r["task"]), {})[r["seed"]] = 100 * trivial
        if name == "f1_macro":
            scores.setdefault((CHANCE, r["task"]), {})[r["seed"]] = 100 * chance_f1_macro(
                outputs["labels"], len(outputs["probabilities"][0]))
    return {key: (float(np.mean(list(by_seed.values()))), None) for key, by_seed in scores.items()}


def _with_trivial(means, encoders) -> list[str]:
    """The columns of a table of ``encoders``: the trivial predictors that have scores in ``means``, then them."""
    return [name for name in (TRIVIAL, CHANCE) if any(key[0] == name for key in means)] + encoders


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _write(out: Path, name: str, header: list[str], rows: list[list[str]], title: str) -> None:
    (out / f"{name}.md").write_text(f"# {title}\n\n" + _table(header, rows))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    (out / f"{name}.csv").write_text(buffer.getvalue())


def _cell(value: float | None, base: float | None = None, std: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "-"
    text = f"{value:.1f}"
    if std is not None:
        text += f" ± {std:.1f}"
    if base is not None:
        text += f" ({value - base:+.1f})"
    return text


def report(out_dir: Path, baseline: str | None = None, ablations: dict[str, dict] | None = None,
           reading: str | None = None) -> None:
    """Write every table and figure of the suite stored in ``out_dir`` into ``out_dir/report``, from the stored runs
    (and only from them); ``baseline`` names the encoder of the gain columns, ``ablations`` are the suite's,
    ``reading`` its own note on what its numbers mean (added to the report's ``README.md``)."""
    out = out_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = stored_runs(out_dir)
    if not records:
        raise ValueError(f"{out_dir}: no stored runs to report on")
    for variant in _protocol_variants(records):
        _paper_tables(out, records, baseline, variant)
    _protocols(out, records)
    _gains(out, records, baseline)
    _ablations(out, records, ablations or {})
    _runs_csv(out, records)
    (out / "README.md").write_text(READING + (f"\n## This suite\n\n{reading.strip()}\n" if reading else ""))


def _protocol_variants(records) -> list[str]:
    """The variants of the suite's protocols (not an ablation's), fine-tuning (``default``) first:
    finetune, linear, knn-k10, knn-k20, fewshot-1, ..., lora, frozen-unetr."""
    def order(variant: str) -> tuple[int, int]:
        if variant == "default":
            return 0, 0
        if variant in PROTOCOLS:
            return PROTOCOLS.index(variant), 0
        protocol, _, number = variant.rpartition("-")
        return PROTOCOLS.index(protocol), int(number.lstrip("k"))

    return sorted({r["variant"] for r in records if not split_variant(r["variant"])[0]}, key=order)


def _paper_tables(out: Path, records, baseline: str | None, variant: str) -> None:
    """Tables 1 and 5 and Fig. 4 of one protocol's runs: ``table5_tasks``, ``table1_modalities``, ``radar.png``
    for fine-tuning, ``table5_tasks_linear``, ``table1_modalities_knn-k10``, ... for the others."""
    suffix, protocol = ("", "fine-tuning") if variant == "default" else (f"_{variant}", variant)
    encoders = sorted({r["encoder"] for r in records if r["variant"] == variant})
    if baseline in encoders:
        encoders = [baseline] + [e for e in encoders if e != baseline]
    tasks = sorted({r["task"] for r in records if r["variant"] == variant},
                   key=lambda t: (_modality_rank(records, t), t))
    modality = {r["task"]: r["modality"] for r in records}
    means = {key: _mean_std(values) for key, values in _scores(records, variant).items()}
    means |= _trivial(records, variant)
    columns = _with_trivial(means, encoders)
    seeds = sorted({r["seed"] for r in records})
    over = (f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}") + (
        f"; gain over {baseline} in brackets" if baseline else "")
    _write(out, f"table5_tasks{suffix}", ["task"] + columns, _task_rows(means, tasks, columns, baseline, modality),
           f"Test score per task, {protocol} (x100, {over})")
    dice_3d = {key: _mean_std(values) for key, values in _scores(records, variant, metric="dice_3d").items()}
    if dice_3d:
        tasks_3d = [t for t in tasks if any((e, t) in dice_3d for e in encoders)]
        dice_3d |= _trivial(records, variant, metric="dice_3d")
        _write(out, f"table5_tasks_dice3d{suffix}", ["task"] + _with_trivial(dice_3d, encoders),
               _task_rows(dice_3d, tasks_3d, _with_trivial(dice_3d, encoders), baseline, modality),
               f"Test DSC per case (3D), {protocol} (x100, {over})")
    rows = []
    for mod in [m for m in MODALITIES if m in modality.values()] + sorted(set(modality.values()) - set(MODALITIES)):
        members = [t for t in tasks if modality[t] == mod]
        if members:
            rows.append([f"{mod} ({len(members)} task{'s' if len(members) > 1 else ''})"] +
                        [_average_cell(means, column, members, baseline) for column in columns])
    rows.append([f"Avg. ({len(tasks)} tasks)"] + [_average_cell(means, column, tasks, baseline)
                                                 for column in columns])
    _write(out, f"table1_modalities{suffix}", ["modality"] + columns, rows,
           f"Average test score per modality, {protocol} (x100; gain over {baseline} in brackets)" if baseline
           else f"Average test score per modality, {protocol} (x100)")
    if variant == "default":
        _radar(out, encoders, tasks, means)


def _protocols(out: Path, records) -> None:
    """The table encoders x protocols x tasks: per task and encoder, the test score of every protocol of the suite
    (fine-tuning, the frozen ones, LoRA, frozen UNETR), the trivial predictors first. One seed: the score and its
    bootstrap 95% interval on the test images; few-shot: the mean ± std over the draws; several seeds: the mean ±
    std over seeds."""
    variants = _protocol_variants(records)
    if variants in ([], ["default"]):
        return
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        runs.setdefault((r["task"], r["encoder"], r["variant"]), []).append(r)
    trivial = {(task, name, v): value for v in variants for (name, task), (value, _) in _trivial(records, v).items()}
    rows = []
    for task in sorted({t for t, _, v in runs if v in variants}):
        for name in (TRIVIAL, CHANCE):
            if any((task, name, v) in trivial for v in variants):
                rows.append([task, name] + [_cell(trivial.get((task, name, v))) for v in variants])
        for encoder in sorted({e for t, e, v in runs if t == task and v in variants}):
            rows.append([task, encoder] + [_protocol_cell(runs.get((task, encoder, v))) for v in variants])
    _write(out, "table_protocols", ["task", "encoder"] + ["finetune" if v == "default" else v for v in variants],
           rows, "Test score per protocol (x100; one seed: [bootstrap 95% interval]; few-shot: ± std over the draws; "
                 "several seeds: ± std over seeds)")


def _protocol_cell(runs: list[dict] | None) -> str:
    if not runs:
        return "-"
    if len(runs) > 1:
        mean, std = _mean_std([r["score"] for r in runs])
        return _cell(mean, std=std)
    run = runs[0]
    if run["test_std"]:
        return _cell(run["score"], std=100 * run["test_std"][run["score_name"]])
    interval = score_interval(run["test_outputs"], run["score_name"], seed=run["seed"])
    return _cell(run["score"]) + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "") + (
        _learned_nothing(run["test_outputs"]))


def _learned_nothing(outputs: dict | None) -> str:
    """`` (background only)`` for a segmentation run whose per-image Dice is the all-background prediction's, ``
    (one class only)`` for a classifier that gives every test image the same class; else nothing."""
    if not outputs:
        return ""
    if "probabilities" in outputs:
        return " (one class only)" if len(set(np.argmax(outputs["probabilities"], 1).tolist())) == 1 else ""
    if "present" in outputs and np.array_equal(np.asarray(outputs["dice"]), 1.0 - np.asarray(outputs["present"])):
        return " (background only)"
    return ""


def _gains(out: Path, records, baseline: str | None) -> None:
    """Each run's gain over the baseline's run of the same task, variant and seed, with its paired bootstrap 95%
    interval on the same test images (:func:`dex.downstream.metrics.paired_gain_interval`); runs stored without
    per-image outputs (older records, few-shot means) are left out."""
    if baseline is None:
        return
    base = {(r["task"], r["variant"], r["seed"]): r for r in records if r["encoder"] == baseline}
    rows = []
    for r in sorted(records, key=lambda r: (r["task"], r["variant"], r["encoder"], r["seed"])):
        b = base.get((r["task"], r["variant"], r["seed"]))
        if r["encoder"] == baseline or b is None or not r["test_outputs"] or not b["test_outputs"]:
            continue
        interval = paired_gain_interval(b["test_outputs"], r["test_outputs"], r["score_name"], seed=r["seed"])
        if interval is not None:
            rows.append([r["task"], "finetune" if r["variant"] == "default" else r["variant"], r["encoder"],
                         str(r["seed"]), f"{r['score'] - b['score']:+.1f}",
                         f"[{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"])
    if rows:
        _write(out, "table_gains", ["task", "protocol", "encoder", "seed", f"gain over {baseline}",
                                    "paired 95% interval"], rows,
               f"Gain over {baseline} on the same test images (x100), with its paired bootstrap 95% interval")


def _task_rows(means, tasks, columns, baseline, modality) -> list[list[str]]:
    """Table 5's rows: per task, each column's mean (± std over seeds), an encoder's with its gain over the
    baseline."""
    rows = []
    for task in tasks:
        base = means.get((baseline, task), (None,))[0] if baseline else None
        row = [f"{modality[task]}: {task}"]
        for column in columns:
            mean, std = means.get((column, task), (None, None))
            row.append(_cell(mean, None if column in (baseline, TRIVIAL, CHANCE) else base, std))
        rows.append(row)
    return rows


def _modality_rank(records, task) -> int:
    mod = next(r["modality"] for r in records if r["task"] == task)
    return MODALITIES.index(mod) if mod in MODALITIES else len(MODALITIES)


def _average_cell(means, encoder, tasks, baseline) -> str:
    values = [means[(encoder, t)][0] for t in tasks if (encoder, t) in means]
    if len(values) != len(tasks):
        return "-"
    average = float(np.mean(values))
    if baseline is None or encoder in (baseline, TRIVIAL, CHANCE):
        return _cell(average)
    base = [means[(baseline, t)][0] for t in tasks if (baseline, t) in means]
    return _cell(average, float(np.mean(base)) if len(base) == len(tasks) else None)


def _runs_csv(out: Path, records) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metrics = sorted({k for r in records for k in r["test"]})
    writer.writerow(["encoder", "task", "modality", "variant", "seed", "score", *metrics])
    for r in sorted(records, key=lambda r: (r["encoder"], r["task"], r["variant"], r["seed"])):
        writer.writerow([r["encoder"], r["task"], r["modality"], r["variant"], r["seed"], f"{r['score']:.4f}",
                         *[f"{r['test'][m]:.6f}" if m in r["test"] else "" for m in metrics]])
    (out / "runs.csv").write_text(buffer.getvalue())


def _radar(out: Path, encoders, tasks, means) -> None:
    """Fig. 4: one axis per task, one polygon per encoder."""
    from dex.figures import plt, save_figure

    if len(tasks) < 3:
        return
    angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False).tolist()
    fig = plt.figure(figsize=(8, 8))
    ax = fig.add_subplot(polar=True)
    for encoder in encoders:
        values = [means.get((encoder, t), (0.0,))[0] for t in tasks]
        ax.plot(angles + angles[:1], values + values[:1], label=encoder)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels(tasks, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_rlabel_position(np.degrees(angles[1]) / 2)  # the score scale between the first two task axes
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1))
    save_figure(fig, out / "radar.png", bbox_inches="tight")


def _ablations(out: Path, records, ablations: dict[str, dict]) -> None:
    from dex.figures import plt, save_figure

    by_variant: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        by_variant.setdefault((r["encoder"], r["task"], r["variant"]), []).append(r["score"])
    mean = {k: float(np.mean(v)) for k, v in by_variant.items()}

    def settings(prefix: str) -> list[tuple[str, str, str]]:
        """(encoder, task, protocol variant) of the runs of an ablation's settings ``prefix...``."""
        return sorted({(e, t, split_variant(v)[1]) for e, t, v in mean if v.startswith(prefix)})

    def label(name: str, protocol_variant: str) -> str:
        return name if protocol_variant == "default" else f"{name} ({protocol_variant})"

    for kind in ("top_k", "data_fraction", "trainable_blocks"):
        if kind not in ablations:
            continue
        values = ablations[kind]["values"]
        series = settings(f"{kind}=")
        rows = [[label(f"{e} on {t}", p)] + [_cell(mean.get((e, t, variant_name(f"{kind}={v}", p)))) for v in values]
                for e, t, p in series]
        _write(out, f"fig5_{kind}", [kind] + [str(v) for v in values], rows,
               f"Fig. 5: test score over {kind} (x100, mean over seeds; other protocols than fine-tuning in "
               "brackets)")
        fig, ax = plt.subplots(figsize=(6, 4))
        for e, t, p in series:
            ax.plot(values, [mean.get((e, t, variant_name(f"{kind}={v}", p)), np.nan) for v in values], marker="o",
                    label=label(f"{e}: {t}", p))
        ax.set(xlabel=kind, ylabel="test score (x100)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / f"fig5_{kind}.png")
    if "experts_vs_director" in ablations:
        names = ablations["experts_vs_director"]["encoders"]
        series = sorted({(t, p) for _, t, p in settings("mode=")})
        rows = [[label(t, p)] + [_cell(mean.get((e, t, variant_name(f"mode={m}", p)))) for e in names
                                 for m in ("experts", "director")] for t, p in series]
        _write(out, "table4_experts_director", ["task"] + [f"{e} {m}" for e in names for m in ("DEX-E", "DEX-D")],
               rows, "Table 4: adaptation through the experts (DEX-E) or the director (DEX-D), test score (x100; "
                     "other protocols than fine-tuning in brackets)")
    if "components" in ablations:
        ablation = ablations["components"]
        names = ablation["encoders"]
        tasks = ablation.get("tasks") or sorted({t for _, t, _ in mean})
        wanted = ablation.get("protocols") or ["finetune"]
        variants = [v for v in _protocol_variants(records)
                    if any(r["variant"] == v and r["protocol"] in wanted for r in records)]
        rows = [[label(t, v)] + [_cell(mean.get((e, t, v))) for e in names]
                for t in tasks for v in variants]
        _write(out, "table6_components", ["task"] + names, rows,
               "Table 6: components, test score (x100, mean over seeds; other protocols than fine-tuning in "
               "brackets)")
