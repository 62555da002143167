"""``dex export RUN_DIR OUT``: a run's encoder as a folder ``dex.load_pretrained`` reads, its director path as a plain
timm ViT in ``OUT/director``, and what else the run's method keeps beside it (:mod:`dex.train.runs` reads it back)."""

from __future__ import annotations

from pathlib import Path

from dex.models import DEXViT, export_director, save_pretrained
from dex.train.objective import Objective
from dex.train.runs import run_encoder, run_objective, run_objective_class


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """The run's encoder in ``out``, for a DEX or plain ViT its director path as a timm ViT in ``out/director``,
    and what else the run's objective keeps (:meth:`~dex.train.objective.Objective.save_extras`, from the newest
    checkpoint: MedMoE's ``out/text`` and ``out/heads``)."""
    encoder = run_encoder(run_dir)
    out = Path(out)
    save_pretrained(encoder, out)
    if isinstance(encoder, DEXViT):
        export_director(encoder, out / "director")
    if run_objective_class(run_dir).save_extras is not Objective.save_extras:  # e.g. MedMoE's text encoder, heads
        run_objective(run_dir).save_extras(out)
    return out
