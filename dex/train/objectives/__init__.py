"""The pretraining methods, by name: ``objective: NAME`` in a pretraining config picks one. Importing this package
registers the built-in methods (:func:`~dex.train.objective.register_objective`); a method defined elsewhere
registers itself when its module is imported."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dex.config import ConfigError, load_config, merge, parse_overrides, read_yaml
from dex.train.objective import OBJECTIVES, Objective, RunConfig
from dex.train.objectives.mae_dex import MAEDEXConfig, MAEDEXObjective
from dex.train.objectives.medmoe import MedMoEConfig, MedMoEObjective
from dex.train.objectives.midol import MIDoLConfig, MIDoLObjective


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(config: RunConfig) -> Objective:
    """The objective ``config`` describes, built from it (fresh weights, or its warm start)."""
    return objective_class(config.objective).from_config(config)


def load_pretrain_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A pretraining config from the YAML file at ``path`` (if any) and ``KEY=VALUE`` overrides, checked against the
    config of the objective it names (``objective:``, MAE-DEX when absent)."""
    values = merge(read_yaml(path) if path is not None else {}, parse_overrides(list(overrides)))
    name = values.get("objective", RunConfig.objective)
    return load_config(objective_class(name).config_class, path, list(overrides))


__all__ = [
    "OBJECTIVES", "MAEDEXConfig", "MAEDEXObjective", "MIDoLConfig", "MIDoLObjective", "MedMoEConfig",
    "MedMoEObjective", "build_objective", "load_pretrain_config", "objective_class",
]
