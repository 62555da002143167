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
      unet: {source: peer, model: unet, img_size: 64}   # peers: trained from scratch (dex.models.peers)
      resnet: {source: peer, model: resnet18, img_size: 64}
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

Each run is stored as ``runs/<encoder>/<task>/<variant>/seed<n>.json`` (:mod:`dex.eval.records`, written
atomically) and skipped when it exists, so an interrupted suite resumes. Fine-tuning runs are variant ``default`` (or
an ablation's setting, ``top_k=2``; under another protocol ``top_k=2,linear``); the frozen protocols
(:mod:`dex.eval.protocols`, classification tasks) are variants named by the protocol (``linear``, ``knn-k10``,
``fewshot-5``, ...), their features cached in ``features/`` (:mod:`dex.eval.features`); ``lora`` runs are
fine-tuning runs of a frozen encoder with LoRA adapters (:mod:`dex.downstream.lora`), variant ``lora``, and
``frozen-unetr`` runs (segmentation tasks) train the UNETR decoder on a frozen encoder. A peer (an encoder of source
``peer``: a U-Net or a timm CNN trained from scratch, :mod:`dex.models.peers`) has fine-tuning runs only, on the
tasks of its type, so the tables put it next to the foundation encoders. The tables and figures
(:mod:`dex.eval.tables`) are computed from the stored runs only: recomputing them gives the same files.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

from typing_extensions import TypedDict

from dex.config import STRICT, ConfigError, parse_part, read_yaml, validate
from dex.data.tasks import Task, TaskSpec, load_task
from dex.downstream.encoders import PEER, EncoderSpec
from dex.downstream.finetune import FinetuneConfig, train_task_model
from dex.downstream.model_folder import write_finetuned
from dex.eval.protocols import FROZEN_PROTOCOLS, PROTOCOLS, ProbeConfig, protocol_variants, run_frozen
from dex.eval.records import model_path, record_path, split_variant, store_record, variant_name
from dex.eval.tables import report
from dex.models.peers import peer_task_type

log = logging.getLogger("dex.eval")
ABLATIONS = ("top_k", "data_fraction", "trainable_blocks", "experts_vs_director", "components")


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
    reading: str | None = None  # what this suite's numbers can and cannot show: printed under its tables


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
    reading: str | None = None

    @classmethod
    def load(cls, path: str | Path, only: list[str] | None = None, check_encoders: bool = True,
             protocols: list[str] | None = None, tasks: list[str] | None = None) -> Suite:
        """Read and check a suite: every key and value, the names the ablations refer to and, with
        ``check_encoders`` (not needed to report on stored runs), the architecture and files of every encoder
        that will run (those of ``only``, when given); ``protocols`` replaces the suite's; ``tasks`` keeps the
        suite's tasks of those folder names. Errors name the file and the key."""
        path = Path(path)
        data = validate(SuiteFile, read_yaml(path, "suite"), str(path))
        encoders = {name: EncoderSpec.parse(name, value, str(path), check_encoders and (not only or name in only))
                    for name, value in data.encoders.items()}
        reserved = sorted(set(encoders) & {"trivial", "chance"})
        if reserved:
            raise ConfigError(f"{path}: encoders: {reserved} name the tables' baseline rows; give another name")
        if data.baseline is not None and data.baseline not in encoders:
            raise ConfigError(f"{path}: baseline {data.baseline!r} is not one of the encoders {sorted(encoders)}")
        entries = [_task_entry(entry, f"{path}: tasks[{n}]") for n, entry in enumerate(data.tasks)]
        if tasks is not None:
            names = [Path(entry["path"]).name for entry in entries]
            unknown = sorted(set(tasks) - set(names))
            if unknown or not tasks:
                raise ConfigError(f"{path}: --tasks names tasks the suite does not have: {unknown}; its tasks are "
                                  f"{', '.join(names)}")
            entries = [entry for entry, name in zip(entries, names) if name in tasks]
            ablations = {kind: ablation if "tasks" not in ablation else
                         {**ablation, "tasks": [t for t in ablation["tasks"] if t in tasks]}
                         for kind, ablation in data.ablations.items()}
            data.ablations = {kind: a for kind, a in ablations.items() if a.get("tasks") != []}  # all theirs left out
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
                   encoders, entries, dict(data.ablations), data.keep_models, list(protocols or data.protocols),
                   data.probe, data.reading)


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


def plan(suite: Suite, tasks: dict[str, Any]) -> list[tuple[str, str, str, int, EncoderSpec,
                                                             FinetuneConfig | ProbeConfig]]:
    """Every run the suite asks for: (encoder, task, variant, seed, encoder spec, fine-tuning settings, or the
    probe settings for a frozen protocol's run). kNN and few-shot are planned for classification tasks only,
    frozen UNETR for segmentation tasks only, a peer's fine-tuning on its own task type only
    (:func:`_encoder_protocols`). An ablation's settings run under its ``protocols`` (default ``[finetune]``):
    fine-tuning as variant ``top_k=2``, another protocol as ``top_k=2,linear``, ``top_k=2,knn-k10``, ... (the
    components ablation: the protocol's own names)."""
    runs = []
    for name, spec in suite.encoders.items():
        for task in tasks.values():
            protocols = _encoder_protocols(name, spec, task, suite.protocols)
            for seed in suite.seeds:
                runs += _protocol_runs(suite, task, name, seed, spec, suite.finetune, protocols)
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
                task_protocols = _encoder_protocols(name, spec, tasks[task], protocols)
                for seed in ablation.get("seeds", suite.seeds):
                    for base, setting_spec, config in settings:
                        runs += _protocol_runs(suite, tasks[task], name, seed, setting_spec, config, task_protocols,
                                               base)
    unique = {}
    for run in runs:
        unique.setdefault(run[:4], run)
    return list(unique.values())


def _encoder_protocols(name: str, spec: EncoderSpec, task: Task, protocols: list[str]) -> list[str]:
    """The protocols of ``protocols`` that encoder ``name`` runs on ``task``: all of them for a foundation encoder;
    for a peer (:mod:`dex.models.peers`, trained whole from scratch) fine-tuning only, and nothing on a task of
    another type than the peer's; what a peer skips is logged."""
    if spec.source != PEER:
        return protocols
    kind = peer_task_type(spec.model)
    if kind != task.spec.type:
        log.info("%s is a %s peer: no runs on %s (%s)", name, kind, task.name, task.spec.type)
        return []
    if skipped := [p for p in protocols if p != "finetune"]:
        log.info("%s is a peer, trained whole from scratch: fine-tuning only on %s, not %s", name, task.name,
                 ", ".join(skipped))
    return [p for p in protocols if p == "finetune"]


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


def run_suite(suite: Suite, part: str = "0/1") -> Path:
    """Run what is not stored yet, then write the reports; returns the output folder. ``part`` ``"I/N"``: only this
    job's share of the runs (:func:`part_of_runs`), and no reports (``--report-only`` once every part is done)."""
    index, parts = parse_part(part)
    tasks = {}
    for entry in suite.tasks:
        overrides = {k: v for k, v in entry.items() if k != "path"}
        task = load_task(entry["path"], overrides)
        tasks[task.name] = task
    runs = part_of_runs(plan(suite, tasks), index, parts)
    todo = [r for r in runs if not record_path(suite.out_dir, r[0], r[1], r[2], r[3]).exists()
            or (suite.keep_models and isinstance(r[5], FinetuneConfig)
                and not model_path(suite.out_dir, r[0], r[1], r[2], r[3]).exists())]
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
                write_finetuned(model_path(suite.out_dir, encoder, task, variant, seed), model, record)
            protocol = "lora" if config.lora_rank else "frozen-unetr" if config.freeze_encoder else "finetune"
            records = {variant: {**record, "protocol": protocol}}
        for name, record in records.items():
            done += 1
            store_record(suite.out_dir, encoder, task, name, seed, record)
            log.info("[%d/%d] %s on %s (%s, seed %d): test %s %.4f (%.0f s)", done, len(todo), encoder, task, name,
                     seed, record["score_name"], record["test"][record["score_name"]], record["seconds"])
    if parts == 1:
        report_suite(suite)
    return suite.out_dir


def report_suite(suite: Suite) -> Path:
    """The suite's tables and figures from its stored runs (:func:`dex.eval.tables.report`); returns their folder."""
    report(suite.out_dir, suite.baseline, suite.ablations, suite.reading)
    return suite.out_dir / "report"


def part_of_runs(runs: list[tuple], index: int, parts: int) -> list[tuple]:
    """Part ``index`` of ``parts`` of a suite's planned runs: its (encoder, task) pairs, sorted, dealt round-robin,
    each pair with all its runs (so that one feature pass still serves every frozen run of a pair): the same split
    in every job of an array, and parts of near-equal size."""
    pairs = sorted({run[:2] for run in runs})
    mine = set(pairs[index::parts])
    return [run for run in runs if run[:2] in mine]
