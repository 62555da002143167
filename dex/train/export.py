"""``dex export RUN_DIR OUT``: a run's encoder as a folder ``dex.load_pretrained`` reads, and its director path as a
plain timm ViT in ``OUT/director``; :func:`run_objective` reads a whole run (projector heads included) from its
checkpoints, :func:`load_medmoe` a MedMoE model (backbone, text encoder, heads) from its folders."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dex.config import validate
from dex.models import DEXViT, export_director, load_pretrained, load_state_dict_file, save_pretrained
from dex.models.text import load_text_encoder
from dex.train.checkpoint import CheckpointManager
from dex.train.objective import Objective
from dex.train.objectives import build_objective, load_pretrain_config, objective_class
from dex.train.objectives.medmoe import HEADS_FORMAT, NOT_HEADS, MedMoEConfig, MedMoEObjective


def run_objective(run_dir: str | Path) -> Objective:
    """The objective of a ``dex pretrain`` run with the weights of its newest checkpoint that verifies and loads
    (when none does, :class:`~dex.train.checkpoint.NoUsableCheckpointError` names every file and why)."""
    run_dir = Path(run_dir)
    checkpoint = CheckpointManager(run_dir / "checkpoints").load_latest()
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to read the run from")
    config = load_pretrain_config(run_dir / "config.yaml")
    if hasattr(config, "init_checkpoint"):  # the checkpoint holds every weight: no warm start to read
        config.init_checkpoint = None
    objective = build_objective(config)
    objective.load_state_dict(checkpoint["model"])
    return objective


def run_encoder(run_dir: str | Path) -> nn.Module:
    """The encoder of a run: its final ``encoder/`` when it finished, else its newest checkpoint's."""
    run_dir = Path(run_dir)
    if (run_dir / "encoder" / "config.json").is_file():
        return load_pretrained(run_dir / "encoder")
    try:
        objective = run_objective(run_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}: neither a finished encoder/ nor a checkpoint to export") from None
    return objective.kept()["encoder"]


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """The run's encoder in ``out``, for a DEX or plain ViT its director path as a timm ViT in ``out/director``,
    and what else the run's objective keeps (:meth:`~dex.train.objective.Objective.save_extras`, from the newest
    checkpoint: MedMoE's ``out/text`` and ``out/heads``)."""
    encoder = run_encoder(run_dir)
    out = Path(out)
    save_pretrained(encoder, out)
    if isinstance(encoder, DEXViT):
        export_director(encoder, out / "director")
    objective = objective_class(load_pretrain_config(Path(run_dir) / "config.yaml").objective)
    if objective.save_extras is not Objective.save_extras:  # e.g. MedMoE's text encoder and heads
        run_objective(run_dir).save_extras(out)
    return out


def load_medmoe(folder: str | Path) -> MedMoEObjective:
    """A trained MedMoE model, in eval mode, from a ``dex export`` folder (the backbone in ``folder``, then
    ``folder/text`` and ``folder/heads``) or a finished run folder (``folder/encoder`` and the same). Every tensor
    is loaded strictly from safetensors; a missing or foreign part raises an error naming it."""
    folder = Path(folder)
    backbone = folder / "encoder" if (folder / "encoder" / "config.json").is_file() else folder
    config_path = folder / "heads" / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; {folder} is not a MedMoE export or run folder")
    try:
        record = json.loads(config_path.read_text())
        if record.get("format") != HEADS_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, not {HEADS_FORMAT!r}")
        config = validate(MedMoEConfig, record["config"], str(config_path))
        report_types = list(record["report_types"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path}: not a MedMoE heads config ({err})") from err
    model = MedMoEObjective(load_pretrained(backbone), load_text_encoder(folder / "text"), report_types, config)
    heads = load_state_dict_file(folder / "heads" / "model.safetensors")
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith(NOT_HEADS)]
    if missing or unexpected:
        raise ValueError(f"{folder / 'heads' / 'model.safetensors'}: does not fit {config_path} (missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
