"""``dex benchmark SUITE.yaml``: every (encoder, task, seed) fine-tuned and tested, then the paper's tables and
figures from the stored results.

A suite is YAML::

    out_dir: runs/benchmark
    seeds: [0, 1, 2]
    baseline: scratch                       # the "gain over" column of Tables 1 and 5
    finetune: {epochs: 30, lr: 5.0e-4}      # FinetuneConfig fields
    encoders:                               # name: source, or name: {EncoderSpec fields}
      scratch: {source: scratch, img_size: 64}
      dex: runs/cpu/dex-tiny
    tasks:                                  # task folders; other keys override their description
      - {path: runs/phantoms/tasks/ct-organs}
      - {path: ../shared/data/us-breast-busi, modality: US}
    protocols: [finetune, linear, knn, fewshot]   # optional; default [finetune]
    probe: {features: both, knn_k: [10, 20]}       # the frozen protocols' settings (ProbeConfig)
    ablations:                              # optional, each on its own tasks
      top_k: {encoder: dex, values: [1, 2, 4, 8], tasks: [ct-organs]}                 # Fig. 5-a
      data_fraction: {encoders: [dex, scratch], values: [0.2, 0.6, 1.0], tasks: [...]}  # Fig. 5-b
      trainable_blocks: {encoders: [dex, scratch], values: [1, 6, 12], tasks: [...]}    # Fig. 5-c
      experts_vs_director: {encoders: [dex, dex-scratch], tasks: [...]}               # Table 4
      components: {encoders: [scratch, mae, experts, dex], tasks: [...]}               # Table 6

Paths are relative to the working directory. An ablation may set its own ``seeds`` and ``protocols`` (default
``[finetune]``; see :func:`plan` for the variants they make).

Each run is stored as ``runs/<encoder>/<task>/<variant>/seed<n>.json`` (written atomically) and skipped when it
exists, so an interrupted suite resumes. Fine-tuning runs are variant ``default`` (or an ablation's setting,
``top_k=2``; under another protocol ``top_k=2,linear``); the frozen protocols (:mod:`dex.eval.protocols`,
classification tasks) are variants named by the
protocol (``linear``, ``knn-k10``, ``fewshot-5``, ...), their features cached in ``features/``
(:mod:`dex.eval.features`); ``lora`` runs are fine-tuning runs of a frozen encoder with LoRA adapters
(:mod:`dex.eval.lora`), variant ``lora``, and ``frozen-unetr`` runs (segmentation tasks) train the UNETR decoder on
a frozen encoder. Reports are computed from the stored runs only: recomputing them gives the same files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from typing_extensions import TypedDict

from dex.config import STRICT, ConfigError, read_yaml, validate
from dex.data.recipe import MODALITIES
from dex.data.tasks import Task, TaskSpec, load_task
from dex.eval.metrics import paired_gain_interval, score_interval
from dex.eval.encoders import EncoderSpec
from dex.eval.finetune import FinetuneConfig, train_task_model
from dex.eval.protocols import FROZEN_PROTOCOLS, PROTOCOLS, ProbeConfig, protocol_variants, run_frozen
from dex.eval.task_model import write_finetuned

log = logging.getLogger("dex.eval")
ABLATIONS = ("top_k", "data_fraction", "trainable_blocks", "experts_vs_director", "components")
DICE_RULE = "an empty prediction on an empty truth scores 1, false positives on empty slices score 0"
SCORES = f"F1 macro for classification; for segmentation DSC per slice, Decathlon rule: {DICE_RULE}"


@STRICT
class Ablation(TypedDict, total=False):
    """One ablation of a suite (see the module docstring)."""

    encoder: str
    encoders: list[str]
    values: list[int | float]
    tasks: list[str]
    seeds: list[int]
    protocols: list[Literal[PROTOCOLS]]


@STRICT
@dataclasses.dataclass
class SuiteFile:
    """The schema of a suite file; encoders and tasks are checked entry by entry (:meth:`Suite.load`)."""

    encoders: dict[str, Any]  # name: source, or name: {EncoderSpec fields}
    tasks: list[Any]  # a task folder, or {path: folder, TaskSpec fields to override}
    out_dir: str | None = None
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    baseline: str | None = None
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    ablations: dict[Literal[ABLATIONS], Ablation] = dataclasses.field(default_factory=dict)
    keep_models: bool = False  # write each run's model folder (as dex finetune does) under OUT/models/
    protocols: list[Literal[PROTOCOLS]] = dataclasses.field(default_factory=lambda: ["finetune"])
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)


@dataclasses.dataclass
class Suite:
    path: Path
    out_dir: Path
    seeds: list[int]
    baseline: str | None
    finetune: FinetuneConfig
    encoders: dict[str, EncoderSpec]
    tasks: list[dict[str, Any]]  # {"path": ..., overrides ...}
    ablations: dict[str, Ablation]
    keep_models: bool = False
    protocols: list[str] = dataclasses.field(default_factory=lambda: ["finetune"])
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)

    @classmethod
    def load(cls, path: str | Path, only: list[str] | None = None, check_encoders: bool = True,
             protocols: list[str] | None = None) -> Suite:
        """Read and check a suite: every key and value, the names the ablations refer to and, with
        ``check_encoders`` (not needed to report on stored runs), the architecture and files of every encoder
        that will run (those of ``only``, when given); ``protocols`` replaces the suite's. Errors name the file and
        the key."""
        path = Path(path)
        data = validate(SuiteFile, read_yaml(path, "suite"), str(path))
        encoders = {name: EncoderSpec.parse(name, value, str(path), check_encoders and (not only or name in only))
                    for name, value in data.encoders.items()}
        if data.baseline is not None and data.baseline not in encoders:
            raise ConfigError(f"{path}: baseline {data.baseline!r} is not one of the encoders {sorted(encoders)}")
        tasks = [_task_entry(entry, f"{path}: tasks[{n}]") for n, entry in enumerate(data.tasks)]
        for kind, ablation in data.ablations.items():
            named = ablation.get("encoders") or ([ablation["encoder"]] if "encoder" in ablation else [])
            if not named or set(named) - set(encoders):
                raise ConfigError(f"{path}: ablations.{kind}: needs encoder or encoders among {sorted(encoders)}, "
                                  f"got {named}")
            if kind in ("top_k", "data_fraction", "trainable_blocks") and not ablation.get("values"):
                raise ConfigError(f"{path}: ablations.{kind}: needs values")
        if only:
            missing = sorted(set(only) - set(encoders))
            if missing:
                raise ConfigError(f"{path}: --encoders names encoders the suite does not define: {missing}")
            encoders = {name: encoders[name] for name in only}
        if protocols is not None and (not protocols or set(protocols) - set(PROTOCOLS)):
            raise ConfigError(f"--protocols: expected some of {', '.join(PROTOCOLS)}, got {','.join(protocols)!r}")
        return cls(path, Path(data.out_dir or path.with_suffix("")), data.seeds, data.baseline, data.finetune,
                   encoders, tasks, dict(data.ablations), data.keep_models, list(protocols or data.protocols),
                   data.probe)


def _task_entry(entry: Any, where: str) -> dict[str, Any]:
    """``folder`` or ``{path: folder, overrides}`` -> ``{"path": folder, **overrides}``, the overrides being fields
    of a task description."""
    entry = {"path": entry} if isinstance(entry, str) else entry
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ConfigError(f"{where}: give a task folder, or a mapping with its path, not {entry!r}")
    known = {f.name for f in dataclasses.fields(TaskSpec)}
    unknown = sorted(set(entry) - known - {"path"})
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key; a task takes its path and the keys of task.yaml "
                          f"({', '.join(sorted(known))})")
    return entry


def _record_path(out: Path, encoder: str, task: str, variant: str, seed: int) -> Path:
    return out / "runs" / encoder / task / variant / f"seed{seed}.json"


def variant_name(setting: str, protocol_variant: str) -> str:
    """The stored variant of a run of ``protocol_variant`` (``default`` for fine-tuning, ``linear``, ``knn-k10``,
    ...) under an ablation's ``setting`` (``top_k=2``; empty for the suite's own runs): ``top_k=2`` for fine-tuning,
    ``top_k=2,linear`` for another protocol."""
    if not setting:
        return protocol_variant
    return setting if protocol_variant == "default" else f"{setting},{protocol_variant}"


def split_variant(variant: str) -> tuple[str, str]:
    """(setting, protocol variant) of a stored variant: the inverse of :func:`variant_name`."""
    if "," in variant:
        setting, _, protocol_variant = variant.partition(",")
        return setting, protocol_variant
    return (variant, "default") if "=" in variant else ("", variant)


def _model_path(out: Path, encoder: str, task: str, variant: str, seed: int) -> Path:
    return out / "models" / encoder / task / variant / f"seed{seed}"


def plan(suite: Suite, tasks: dict[str, Any]) -> list[tuple[str, str, str, int, EncoderSpec,
                                                             FinetuneConfig | ProbeConfig]]:
    """Every run the suite asks for: (encoder, task, variant, seed, encoder spec, fine-tuning settings, or the
    probe settings for a frozen protocol's run). kNN and few-shot are planned for classification tasks only,
    frozen UNETR for segmentation tasks only. An ablation's settings run under its ``protocols`` (default
    ``[finetune]``): fine-tuning as variant ``top_k=2``, another protocol as ``top_k=2,linear``, ``top_k=2,knn-k10``,
    ... (the components ablation: the protocol's own names)."""
    runs = []
    for name, spec in suite.encoders.items():
        for task in tasks:
            for seed in suite.seeds:
                runs += _protocol_runs(suite, tasks[task], name, seed, spec, suite.finetune, suite.protocols)
    unknown = sorted({t for a in suite.ablations.values() for t in a.get("tasks") or []} - set(tasks))
    if unknown:
        raise ValueError(f"{suite.path}: ablations name tasks the suite does not have: {unknown}")
    for kind, ablation in suite.ablations.items():
        protocols = ablation.get("protocols") or ["finetune"]
        if kind == "trainable_blocks" and protocols != ["finetune"]:
            raise ValueError(f"{suite.path}: ablations.trainable_blocks: the blocks trained are fine-tuning's "
                             f"setting; its protocols can only be [finetune], not {protocols}")
        names = ablation.get("encoders") or [ablation["encoder"]]
        for name in (n for n in names if n in suite.encoders):
            spec = suite.encoders[name]
            if kind == "top_k":
                settings = [(f"top_k={k}", dataclasses.replace(spec, mode="experts", top_k=k), suite.finetune)
                            for k in ablation["values"]]
            elif kind in ("data_fraction", "trainable_blocks"):
                settings = [(f"{kind}={value}", spec, dataclasses.replace(suite.finetune, **{kind: value}))
                            for value in ablation["values"]]
            elif kind == "experts_vs_director":
                settings = [(f"mode={mode}", dataclasses.replace(spec, mode=mode), suite.finetune)
                            for mode in ("experts", "director")]
            else:  # components: the default runs of the named encoders
                settings = [("", spec, suite.finetune)]
            for task in ablation.get("tasks") or list(tasks):
                for seed in ablation.get("seeds", suite.seeds):
                    for base, setting_spec, config in settings:
                        runs += _protocol_runs(suite, tasks[task], name, seed, setting_spec, config, protocols, base)
    unique = {}
    for run in runs:
        unique.setdefault(run[:4], run)
    return list(unique.values())


def _protocol_runs(suite: Suite, task: Task, name: str, seed: int, spec: EncoderSpec, config: FinetuneConfig,
                   protocols: list[str], base: str = "") -> list[tuple]:
    """The runs of one setting (``spec`` and fine-tuning ``config``; ``base`` names an ablation's) under each of
    ``protocols``; the frozen probes take the setting's ``data_fraction``."""
    probe = dataclasses.replace(suite.probe, data_fraction=config.data_fraction)
    variants: list[tuple[str, FinetuneConfig | ProbeConfig]] = []
    for protocol in protocols:
        if protocol == "finetune":
            variants.append(("default", config))
        elif protocol in FROZEN_PROTOCOLS and task.spec.type == "classification":
            variants += [(v, probe) for v in protocol_variants(protocol, suite.probe)]
        elif protocol == "linear":  # segmentation: DINOv2's linear head on the patch tokens
            variants.append(("linear", probe))
        elif protocol == "lora":
            variants.append(("lora", dataclasses.replace(config, lora_rank=suite.probe.lora_rank,
                                                         lora_alpha=suite.probe.lora_alpha)))
        elif protocol == "frozen-unetr" and task.spec.type == "segmentation":
            variants.append(("frozen-unetr", dataclasses.replace(config, freeze_encoder=True)))
    return [(name, task.name, variant_name(base, variant), seed, spec, variant_config)
            for variant, variant_config in variants]


def run_suite(suite: Suite) -> Path:
    """Run what is not stored yet, then write the reports; returns the output folder."""
    tasks = {}
    for entry in suite.tasks:
        overrides = {k: v for k, v in entry.items() if k != "path"}
        task = load_task(entry["path"], overrides)
        tasks[task.name] = task
    runs = plan(suite, tasks)
    todo = [r for r in runs if not _record_path(suite.out_dir, r[0], r[1], r[2], r[3]).exists()
            or (suite.keep_models and isinstance(r[5], FinetuneConfig)
                and not _model_path(suite.out_dir, r[0], r[1], r[2], r[3]).exists())]
    log.info("%d runs, %d stored, %d to do", len(runs), len(runs) - len(todo), len(todo))
    frozen: dict[tuple[str, str, int, str], list[str]] = {}  # one feature pass serves every frozen run of a key
    for encoder, task, variant, seed, spec, config in todo:
        if isinstance(config, ProbeConfig):
            frozen.setdefault((encoder, task, seed, split_variant(variant)[0]), []).append(variant)
    done = 0
    for encoder, task, variant, seed, spec, config in todo:
        if isinstance(config, ProbeConfig):
            base = split_variant(variant)[0]
            if (encoder, task, seed, base) not in frozen:
                continue  # run with the first frozen run of its encoder, task, seed and ablation setting
            names = frozen.pop((encoder, task, seed, base))
            records = run_frozen(spec, tasks[task], seed, [split_variant(n)[1] for n in names], config,
                                 suite.out_dir / "features")
            records = {variant_name(base, protocol): r for protocol, r in records.items()}
        else:
            record, model = train_task_model(spec, tasks[task], seed, config,
                                             bootstrap=1000 if suite.keep_models else 0)
            if suite.keep_models:
                write_finetuned(_model_path(suite.out_dir, encoder, task, variant, seed), model, record)
            protocol = "lora" if config.lora_rank else "frozen-unetr" if config.freeze_encoder else "finetune"
            records = {variant: {**record, "protocol": protocol}}
        for name, record in records.items():
            done += 1
            _store(suite.out_dir, encoder, task, name, seed, record)
            log.info("[%d/%d] %s on %s (%s, seed %d): test %s %.4f (%.0f s)", done, len(todo), encoder, task, name,
                     seed, record["score_name"], record["test"][record["score_name"]], record["seconds"])
    report(suite)
    return suite.out_dir


def _store(out: Path, encoder: str, task: str, variant: str, seed: int, record: dict[str, Any]) -> None:
    record["variant"] = variant
    path = _record_path(out, encoder, task, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


# --- reports -----------------------------------------------------------------------------------------------------

def stored_runs(out: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((out / "runs").glob("*/*/*/seed*.json")):
        record = json.loads(path.read_text())
        records.append({"encoder": path.parts[-4], "task": record["task"], "modality": record["modality"],
                        "type": record["type"], "variant": record["variant"], "seed": record["seed"],
                        "protocol": record.get("protocol", "finetune"),
                        "score": 100 * record["test"][record["score_name"]], "score_name": record["score_name"],
                        "test": record["test"], "test_outputs": record.get("test_outputs"),
                        "test_std": record.get("test_std")})
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _scores(records, variant="default", metric=None) -> dict[tuple[str, str], list[float]]:
    """(encoder, task) -> the runs' scores (x100): each run's own score, or ``metric`` where a run has it."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r["variant"] == variant and (metric is None or metric in r["test"]):
            out.setdefault((r["encoder"], r["task"]), []).append(r["score"] if metric is None
                                                                 else 100 * r["test"][metric])
    return out


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


def report(suite: Suite) -> None:
    """Write every table and figure from the stored runs (and only from them)."""
    out = suite.out_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = stored_runs(suite.out_dir)
    if not records:
        raise ValueError(f"{suite.out_dir}: no stored runs to report on")
    for variant in _protocol_variants(records):
        _paper_tables(out, records, suite.baseline, variant)
    _protocols(out, records)
    _gains(out, records, suite.baseline)
    _ablations(out, records, suite)
    _runs_csv(out, records)


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
    suffix, protocol = ("", "") if variant == "default" else (f"_{variant}", f", {variant}")  # default: fine-tuning
    encoders = sorted({r["encoder"] for r in records if r["variant"] == variant})
    if baseline in encoders:
        encoders = [baseline] + [e for e in encoders if e != baseline]
    tasks = sorted({r["task"] for r in records if r["variant"] == variant},
                   key=lambda t: (_modality_rank(records, t), t))
    modality = {r["task"]: r["modality"] for r in records}
    means = {key: _mean_std(values) for key, values in _scores(records, variant).items()}
    seeds = sorted({r["seed"] for r in records})
    over = f"mean ± std over seeds {seeds}" + (f", gain over {baseline} in brackets" if baseline else "")
    # Table 5: per task, mean ± std over seeds, gain over the baseline
    _write(out, f"table5_tasks{suffix}", ["task"] + encoders, _task_rows(means, tasks, encoders, baseline, modality),
           f"Per-task test scores{protocol} (x100; {SCORES}), {over}")
    dice_3d = {key: _mean_std(values) for key, values in _scores(records, variant, metric="dice_3d").items()}
    if dice_3d:
        tasks_3d = [t for t in tasks if any((e, t) in dice_3d for e in encoders)]
        _write(out, f"table5_tasks_dice3d{suffix}", ["task"] + encoders,
               _task_rows(dice_3d, tasks_3d, encoders, baseline, modality),
               f"Per-task test DSC per case{protocol} (x100; a case's slices scored as one 3D volume per class, "
               f"Decathlon rule: an empty prediction on an empty truth scores 1, false positives in a case without "
               f"the class score 0), {over}")
    # Table 1: per modality and overall
    rows = []
    for mod in [m for m in MODALITIES if m in modality.values()] + sorted(set(modality.values()) - set(MODALITIES)):
        members = [t for t in tasks if modality[t] == mod]
        if members:
            rows.append([f"{mod} ({len(members)} task{'s' if len(members) > 1 else ''})"] +
                        [_average_cell(means, encoder, members, baseline) for encoder in encoders])
    rows.append([f"Avg. ({len(tasks)} tasks)"] + [_average_cell(means, encoder, tasks, baseline)
                                                 for encoder in encoders])
    _write(out, f"table1_modalities{suffix}", ["modality"] + encoders, rows,
           f"Average test score per modality and overall{protocol} (x100; {SCORES}), gain over the baseline in "
           "brackets")
    if variant == "default":
        _radar(out, encoders, tasks, means)


def _protocols(out: Path, records) -> None:
    """The table encoders x protocols x tasks: per task and encoder, the test score of every protocol of the suite
    (fine-tuning, the frozen ones, LoRA, frozen UNETR). One seed: the score and its bootstrap 95% interval on the
    test images; few-shot: the mean ± std over the draws; several seeds: the mean ± std over seeds."""
    variants = _protocol_variants(records)
    if variants in ([], ["default"]):
        return
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        runs.setdefault((r["task"], r["encoder"], r["variant"]), []).append(r)
    rows = []
    for task, encoder in sorted({(t, e) for t, e, v in runs if v in variants}):
        rows.append([task, encoder] + [_protocol_cell(runs.get((task, encoder, v))) for v in variants])
    _write(out, "table_protocols", ["task", "encoder"] + ["finetune" if v == "default" else v for v in variants],
           rows, f"Test score per protocol (x100; {SCORES}); one seed: [bootstrap 95% interval over the test "
           "images]; few-shot: ± std over the draws; several seeds: ± std over seeds. knn and fewshot: "
           "classification tasks; linear on a segmentation task: a linear head on the frozen patch tokens")


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
    return _cell(run["score"]) + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def _gains(out: Path, records, baseline: str | None) -> None:
    """Each run's gain over the baseline's run of the same task, variant and seed, with its paired bootstrap 95%
    interval on the same test images (:func:`dex.eval.metrics.paired_gain_interval`); runs stored without
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
               f"Gain over {baseline} on the same test images (x100; {SCORES}), with its paired bootstrap 95% "
               "interval (1000 resamples of the test images, both runs scored on each)")


def _task_rows(means, tasks, encoders, baseline, modality) -> list[list[str]]:
    """Table 5's rows: per task, each encoder's mean ± std, with the gain over the baseline."""
    rows = []
    for task in tasks:
        base = means.get((baseline, task), (None,))[0] if baseline else None
        row = [f"{modality[task]}: {task}"]
        for encoder in encoders:
            mean, std = means.get((encoder, task), (None, None))
            row.append(_cell(mean, None if encoder == baseline else base, std))
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
    if baseline is None or encoder == baseline:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(out / "radar.png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def _ablations(out: Path, records, suite: Suite) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        if kind not in suite.ablations:
            continue
        values = suite.ablations[kind]["values"]
        series = settings(f"{kind}=")
        rows = [[label(f"{e} on {t}", p)] + [_cell(mean.get((e, t, variant_name(f"{kind}={v}", p)))) for v in values]
                for e, t, p in series]
        _write(out, f"fig5_{kind}", [kind] + [str(v) for v in values], rows,
               f"Fig. 5 sweep over {kind}: test score (x100; {SCORES}), mean over seeds; the protocol in brackets "
               "where it is not fine-tuning")
        fig, ax = plt.subplots(figsize=(6, 4))
        for e, t, p in series:
            ax.plot(values, [mean.get((e, t, variant_name(f"{kind}={v}", p)), np.nan) for v in values], marker="o",
                    label=label(f"{e}: {t}", p))
        ax.set(xlabel=kind, ylabel="test score (x100)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"fig5_{kind}.png", dpi=100, metadata={"Software": None})
        plt.close(fig)
    if "experts_vs_director" in suite.ablations:
        names = suite.ablations["experts_vs_director"]["encoders"]
        series = sorted({(t, p) for _, t, p in settings("mode=")})
        rows = [[label(t, p)] + [_cell(mean.get((e, t, variant_name(f"mode={m}", p)))) for e in names
                                 for m in ("experts", "director")] for t, p in series]
        _write(out, "table4_experts_director", ["task"] + [f"{e} {m}" for e in names for m in ("DEX-E", "DEX-D")],
               rows, f"Table 4: adaptation through the experts (DEX-E) or the director (DEX-D), test score (x100; "
                     f"{SCORES}); the protocol in brackets where it is not fine-tuning")
    if "components" in suite.ablations:
        ablation = suite.ablations["components"]
        names = ablation["encoders"]
        tasks = ablation.get("tasks") or sorted({t for _, t, _ in mean})
        wanted = ablation.get("protocols") or ["finetune"]
        variants = [v for v in _protocol_variants(records)
                    if any(r["variant"] == v and r["protocol"] in wanted for r in records)]
        rows = [[label(t, v)] + [_cell(mean.get((e, t, v))) for e in names]
                for t in tasks for v in variants]
        _write(out, "table6_components", ["task"] + names, rows,
               f"Table 6: components, test score (x100; {SCORES}), mean over seeds; the protocol in brackets where "
               "it is not fine-tuning")
