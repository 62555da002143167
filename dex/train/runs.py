"""Reading what ``dex pretrain`` and ``dex export`` leave: a run's objective (its class from ``config.yaml``, the
whole objective from its newest checkpoint), its encoder, and the whole model a method keeps (the encoder with what
else the method writes, such as MedMoE's text encoder and heads) from a run or export folder."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dex.checkpoint import CheckpointManager
from dex.config import read_yaml
from dex.models import load_pretrained
from dex.train.objective import OBJECTIVES, Objective, RunConfig
from dex.train.objectives import build_objective, load_pretrain_config, objective_class


def run_objective_class(run_dir: str | Path) -> type[Objective]:
    """The objective that made the run in ``run_dir``, as its ``config.yaml`` names it (MAE-DEX when it names
    none)."""
    return objective_class(read_yaml(Path(run_dir) / "config.yaml").get("objective", RunConfig.objective))


def run_objective(run_dir: str | Path) -> Objective:
    """The objective of a ``dex pretrain`` run with the weights of its newest checkpoint that verifies and loads
    (when none does, :class:`~dex.checkpoint.NoUsableCheckpointError` names every file and why)."""
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


def _holds_extras(objective: type[Objective], folder: Path) -> bool:
    return bool(objective.extra_folders) and all((folder / name).is_dir() for name in objective.extra_folders)


def kept_objective(folder: str | Path) -> type[Objective] | None:
    """The method whose whole kept model ``folder`` holds beyond an encoder: for a run folder (with
    ``config.yaml``) the objective it names, for a ``dex export`` folder the one whose extra folders
    (:attr:`~dex.train.objective.Objective.extra_folders`, what its ``save_extras`` writes) it holds; None when
    the folder holds those of none (an encoder alone, or a run that has not finished). Two methods whose extra
    folders both fit are a ValueError naming them."""
    folder = Path(folder)
    if (folder / "config.yaml").is_file():
        candidates = [run_objective_class(folder)]
    else:
        candidates = list(OBJECTIVES.values())
    found = [objective for objective in candidates if _holds_extras(objective, folder)]
    if len(found) > 1:
        raise ValueError(f"{folder}: holds the extra folders of objectives {sorted(o.name for o in found)}; "
                         "which one made it is not clear")
    return found[0] if found else None


def load_kept(folder: str | Path) -> nn.Module | None:
    """The whole model a method keeps, in eval mode, from its run or export ``folder``
    (:meth:`~dex.train.objective.Objective.load_kept` of :func:`kept_objective`'s method), e.g. a MedMoE model with
    its text encoder and heads; None when the folder holds an encoder alone (``dex.load_pretrained`` reads it)."""
    objective = kept_objective(folder)
    return None if objective is None else objective.load_kept(Path(folder))
