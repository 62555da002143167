"""The stored runs of a benchmark suite: one JSON record per (encoder, task, variant, seed) in
``OUT/runs/ENCODER/TASK/VARIANT/seedN.json`` (written atomically, so an interrupted suite resumes), each run's model
folder in ``OUT/models/...`` (``keep_models``), and the naming of the variants an ablation and a protocol make."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dex.files import write_json


def record_path(out: Path, encoder: str, task: str, variant: str, seed: int) -> Path:
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


def model_path(out: Path, encoder: str, task: str, variant: str, seed: int) -> Path:
    return out / "models" / encoder / task / variant / f"seed{seed}"


def store_record(out: Path, encoder: str, task: str, variant: str, seed: int, record: dict[str, Any]) -> None:
    """Store a finished run's ``record`` under its name (:func:`dex.files.write_json`: whole or not at all)."""
    record["variant"] = variant
    path = record_path(out, encoder, task, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


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
