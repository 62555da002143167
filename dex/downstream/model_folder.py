"""A ``dex finetune`` output folder, the thing a user keeps: the model (:class:`~dex.downstream.task_model.TaskModel`'s
``config.json`` and ``model.safetensors``), ``metrics.json`` (validation and test metrics of the best epoch),
``log.jsonl`` (one row per epoch), ``curves.png`` and ``README.md``, the model card.

A folder ``OUT`` is made in ``OUT.partial``, where the run's checkpoints live while it trains
(``OUT.partial/checkpoints``, :class:`dex.checkpoint.CheckpointManager`), and renamed to ``OUT`` once complete, so
that a folder at ``OUT`` is always whole: a run stopped on the way leaves ``OUT.partial``, which ``--resume`` goes on
from and a fresh run starts over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dex.checkpoint import CheckpointManager
from dex.downstream.task_model import FORMAT, TaskModel
from dex.figures import plt, save_figure
from dex.files import write_json


class ModelFolder:
    """The output folder ``out`` of one fine-tuning run (see the module's docstring). ``resume``: keep the checkpoints
    of an unfinished run in ``out.partial`` (else they are removed: the run starts over); ``overwrite``: replace a
    complete folder at ``out`` at the end (else its existence is an error now, before any training)."""

    def __init__(self, out: str | Path, resume: bool = False, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        if self.out.exists() and not overwrite:
            raise ValueError(f"{self.out}: exists; give another --out, or --overwrite to replace it")
        if not resume and self.partial.exists():  # an unfinished run: start it over
            shutil.rmtree(self.partial)
        #: whether the run goes on from the checkpoints of an unfinished one
        self.resuming = resume and bool(CheckpointManager(self.checkpoints).files())

    @property
    def checkpoints(self) -> Path:
        """Where the run keeps its checkpoints until the folder is complete."""
        return self.partial / "checkpoints"

    def write(self, model: TaskModel, record: dict[str, Any]) -> Path:
        """Write the folder from the trained ``model`` and its run's ``record`` into ``out.partial``, drop the
        checkpoints, and rename it to ``out`` (replacing an older folder)."""
        partial = self.partial
        model.save(partial)
        write_json(partial / "metrics.json", {k: record[k] for k in ("score_name", "best_epoch", "val", "test",
                                                                     "test_intervals")})
        (partial / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in record["history"]))
        title = ", ".join(f"{k} {record[k]}" for k in ("task", "encoder") if k in record)
        finetune_curves(record["history"], record["best_epoch"], record["score_name"], partial / "curves.png", title)
        (partial / "README.md").write_text(model_card(model, record))
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        if self.out.exists():
            shutil.rmtree(self.out)
        partial.replace(self.out)
        return self.out


def write_finetuned(directory: str | Path, model: TaskModel, record: dict[str, Any]) -> Path:
    """A complete model folder at ``directory`` from a trained model and its record (replacing an older one):
    :meth:`ModelFolder.write` of a run with no checkpoints to keep."""
    return ModelFolder(directory, overwrite=True).write(model, record)


def finetune_curves(history: list[dict], best_epoch: int, score_name: str, path: Path,
                    title: str | None = None) -> Figure:
    """A fine-tuning run's training loss and validation ``score_name`` per epoch (its ``log.jsonl`` rows, keys
    ``epoch``, ``loss``, ``val_<score_name>``), side by side, the best epoch dashed; saved as PNG at ``path``. The
    figure, closed, is returned for inspection."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(epochs, [r["loss"] for r in history], marker="o")
    axes[0].set(xlabel="epoch", ylabel="loss", title="training loss")
    axes[1].plot(epochs, [r[f"val_{score_name}"] for r in history], marker="o")
    axes[1].set(xlabel="epoch", ylabel=score_name, title=f"validation {score_name}")
    for ax in axes:
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def model_card(model: TaskModel, record: dict[str, Any]) -> str:
    """The model card of a fine-tuned model: what it does, on what it was trained and how, how well it did."""
    task, spec, config = model.task, record["encoder_spec"], record["config"]
    splits = record["split_images"]
    metrics = sorted(set(record["val"]) | set(record["test"]))
    intervals = record.get("test_intervals", {})
    rows = "\n".join(f"| {name} | {record['val'].get(name, float('nan')):.4f} | "
                     f"{record['test'].get(name, float('nan')):.4f} | "
                     + ("{:.4f} - {:.4f}".format(*intervals[name]) if name in intervals else "")
                     + " |" for name in metrics)
    settings = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in config.items()
                         if k not in ("device", "num_workers"))
    plans = record.get("plans") or {}
    sources = plans.get("sources", {})
    by_source: dict[str, list[str]] = {}
    for key, source in sources.items():
        by_source.setdefault(source, []).append(key)
    derived = "; ".join(f"{source}: {', '.join(keys)}" for source, keys in by_source.items()) or "none"
    pre = model.preprocessing
    if model.inference is not None:
        sw = model.inference
        inference = (f"- prediction: Gaussian-weighted sliding windows of {sw.window[0]} x {sw.window[1]} px at "
                     f"overlap {sw.overlap}, mirroring `{sw.mirror}`, over the image "
                     + ("at its own resolution" if pre.fit == "native" else "resized to the window"))
    else:
        inference = "- prediction: the whole image resized to the input"
    window = f" (window {list(pre.ct_window)} HU)" if pre.volume_normalization == "ct_hu" else ""
    volumes = (f"volumes (NIfTI, DICOM series): normalised by `{pre.volume_normalization}`{window} and cut into "
               f"{pre.slice_axis} slices, as its training images were" if pre.volume_normalization else
               "volumes: its training images were not cut from volumes; `dex predict` uses the Table 2 rule of "
               "the volume's modality unless given --volume-normalization")
    return f"""# {task.get('name', 'task')}: {model.task_type} of {task.get('modality', 'unknown')} images

A {model.task_type} model fine-tuned with dex ({FORMAT}) from the encoder `{spec['source']}`.
Load it with `dex.load_model(FOLDER)`; `model.predict(x)` gives the class probabilities of model
inputs made by its preprocessing (`config.json`, `preprocessing`).

**Intended use: research only. This is not a medical device and must not be used for diagnosis or treatment.**

## Task
- classes ({len(model.classes)}): {', '.join(model.classes)}
- images: train {splits['train']}, validation {splits['val']}, test {splits['test']}
- input: {model.preprocessing.size[0]} x {model.preprocessing.size[1]} px, {model.preprocessing.channels} channels,
  {model.preprocessing.intensity} intensity, z-score mean {list(model.preprocessing.mean)} std
  {list(model.preprocessing.std)}
- {volumes}
{inference}

## Training
- encoder: `{spec['source']}` (architecture `{model.encoder_architecture}`), weights SHA-256
  `{record['encoder_sha256']}` before fine-tuning
- seed {record['seed']}; {settings}
- recipe `{plans.get('recipe', 'paper')}`; where the settings came from: {derived} (the fingerprint and the rules:
  `config.json`, `plans`)
- best validation epoch: {record['best_epoch']} (by {record['score_name']})
- {record['trainable_parameters']:,} trainable parameters; {record['seconds']:.0f} s
- training curves: `curves.png` (loss and validation {record['score_name']} per epoch; the per-epoch rows in
  `log.jsonl`)

## Metrics (best validation epoch)
Test 95% intervals (where computed): percentile bootstrap over the test images (cases for dice_3d).

| metric | validation | test | test 95% interval |
| --- | ---: | ---: | ---: |
{rows}
"""
