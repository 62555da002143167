"""``dex export RUN_DIR OUT``: a run's encoder as a folder ``dex.load_pretrained`` reads, and its director path as a
plain timm ViT in ``OUT/director``; :func:`run_objective` reads a whole run (projector heads included) from its
checkpoints."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dex.models import DEXViT, export_director, load_pretrained, save_pretrained
from dex.train.checkpoint import CheckpointManager
from dex.train.objective import Objective
from dex.train.objectives import build_objective, load_pretrain_config


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
    """The run's encoder in ``out``, and for a DEX or plain ViT its director path as a timm ViT in
    ``out/director``."""
    encoder = run_encoder(run_dir)
    out = Path(out)
    save_pretrained(encoder, out)
    if isinstance(encoder, DEXViT):
        export_director(encoder, out / "director")
    return out
