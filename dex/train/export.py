"""``dex export RUN_DIR OUT``: a run's encoder as a folder ``dex.load_pretrained`` reads, and its director path as a
plain timm ViT in ``OUT/director``."""

from __future__ import annotations

from pathlib import Path

from dex.models import DEXViT, export_director, load_pretrained, save_pretrained
from dex.train.checkpoint import CheckpointManager
from dex.train.objectives import build_objective, load_pretrain_config


def run_encoder(run_dir: str | Path) -> DEXViT:
    """The encoder of a run: its final ``encoder/`` when it finished, else its newest checkpoint that verifies and
    loads (when none does, :class:`~dex.train.checkpoint.NoUsableCheckpointError` names every file and why)."""
    run_dir = Path(run_dir)
    if (run_dir / "encoder" / "config.json").is_file():
        return load_pretrained(run_dir / "encoder")
    checkpoint = CheckpointManager(run_dir / "checkpoints").load_latest()
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: neither a finished encoder/ nor a checkpoint to export")
    config = load_pretrain_config(run_dir / "config.yaml")
    if hasattr(config, "init_checkpoint"):  # the checkpoint holds every weight: no warm start to read
        config.init_checkpoint = None
    objective = build_objective(config)
    objective.load_state_dict(checkpoint["model"])
    return objective.kept()["encoder"]


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    encoder = run_encoder(run_dir)
    out = Path(out)
    save_pretrained(encoder, out)
    export_director(encoder, out / "director")
    return out
