"""What the pretraining loop trains: the objective interface, its registry, and the settings of the loop itself.

The loop (:func:`dex.train.pretrain.pretrain`) owns the data, the optimiser and its learning-rate schedule, gradient
accumulation and clipping, non-finite steps, checkpoints and exact resume, logging, and DDP / FSDP. It knows nothing
of the method: everything else is the objective's. An objective is one ``nn.Module`` (the one the loop wraps, shards,
optimises and checkpoints) that declares

- its models: :meth:`Objective.kept` (what the run keeps at the end, e.g. ``{"encoder": ...}``, and in
  :meth:`Objective.save_extras` what else it writes, e.g. a text encoder, which :meth:`Objective.load_kept` reads
  back with the encoder as one model), and
  :meth:`Objective.teachers` (modules that follow the trained ones by a hook, such as EMA teachers; their parameters
  need no gradient, so the optimiser leaves them alone, and they are part of the state dict, so checkpoints hold them);
- the batches it needs: :meth:`Objective.transform` makes each image's sample (one augmented view; a multi-view
  method returns ``[V, 3, H, W]`` crops per image) and :attr:`Objective.batch` names the kind;
- its random inputs per step, drawn for the global batch (:meth:`Objective.step_inputs`), so that a step is the same
  whatever the number of ranks;
- its schedules (:meth:`Objective.schedule`) and loss terms (:attr:`Objective.loss_terms`), which the log records;
- its per-step hooks (:meth:`Objective.hooks`), run after every optimiser step (the DEX director update is one);
- for the analyses, the log keys of its routing (:attr:`Objective.routing_log_keys`, which ``dex report`` plots)
  and a module that routes the kept encoder's features (:meth:`Objective.routed_module`, for ``dex analyze``).

A new method is one module with its config (a subclass of :class:`RunConfig` adding the method's keys) and its
objective, registered by :func:`register_objective` (a class decorator) under its :attr:`Objective.name`; the loop
does not change. A method whose backbone may be a DEX ViT subclasses
:class:`dex.train.dex_backbone.DEXBackboneObjective`, which brings the DEX terms (Eq. 8, router noise, director
update, schedules).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

from torch import Tensor, nn

from dex.config import STRICT

#: The kinds of batch an objective may ask for: one view per image; several crops per image (M-IDoL-style
#: contrast); an image with its report (MedMoE). The loop's data gives each sample what the objective's transform
#: returns, so ``image`` and ``views`` need nothing more of it; ``image_text`` needs a collection with reports.
BatchKind = Literal["image", "views", "image_text"]


@STRICT
@dataclass
class RunConfig:
    """The settings of the pretraining loop, shared by every objective; an objective's config adds its own keys.
    Saved as ``config.yaml`` in the run folder. Defaults are the paper's where it gives them (lr, warm-up) and
    MAE's otherwise (betas, weight decay)."""

    out_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"  # auto (cuda if present), cpu or cuda
    objective: str = "mae_dex"  # the method (a name in OBJECTIVES)
    # data: a curated folder (dex curate) or any folder of images
    data: str = "runs/medverse"
    num_workers: int = 0
    modality_temperature: float | None = None  # None: the natural mix; T: modality m drawn as n_m ** (1/T)
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None  # per rank, curated data only; None: the whole collection
    max_bad_shards: float = 0.01  # curated data: the share of shards that may be unreadable before the run stops
    # optimisation
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 64  # global: images per optimizer step over all ranks and accumulation steps
    accum_steps: int = 1
    base_lr: float = 1e-4  # lr = base_lr * batch_size / 512
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 1.0
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: ddp (a full model per process) or fsdp (sharded)
    # run
    log_every: int = 10
    checkpoint_every: int = 500  # steps; 0: only at the end of each epoch
    keep_checkpoints: int = 3
    milestone_every: int = 0  # epochs whose final checkpoint is kept for good; 0: none
    tensorboard: bool = True
    collapse_threshold: float = 0.5  # routing collapse: usage entropy under this fraction of log R ...
    collapse_patience: int = 5  # ... for this many logged steps in a row
    #: the settings a run may resume with changed: where it writes, how it reads, logs and runs, never what it
    #: computes (any other changed setting refuses the resume, :func:`dex.checkpoint.check_same_settings`)
    resume_free: ClassVar[tuple[str, ...]] = (
        "out_dir", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints", "milestone_every",
        "tensorboard", "collapse_threshold", "collapse_patience", "max_bad_shards", "device", "compile",
        "distributed")

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("epochs", "batch_size", "accum_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_bad_shards <= 1:
            raise ValueError(f"max_bad_shards is a share of the shards, in [0, 1]; got {self.max_bad_shards}")


class StepOutput(NamedTuple):
    """One forward of an objective: the loss to minimise and its terms by name (scalars, for the log)."""

    loss: Tensor
    terms: dict[str, Tensor]


class StepHook:
    """Runs after every optimiser step of the loop (on every rank, with the same values)."""

    def after_step(self, schedule: Mapping[str, float]) -> None:
        """The step was applied; ``schedule`` holds the step's scheduled values."""

    def after_skipped_step(self) -> None:
        """The step was skipped (a non-finite loss or gradient on some rank): forget what it accumulated."""

    def log(self) -> dict[str, Any]:
        """What the hook adds to a log row (called on logged steps, after :meth:`after_step`)."""
        return {}


class Objective(nn.Module, ABC):
    """A pretraining method as the loop sees it; see the module's docstring. Subclasses set :attr:`name`,
    :attr:`loss_terms` and :attr:`batch`, build themselves from their config in :meth:`from_config`, and implement
    :meth:`forward` (the loop calls the module, so that DDP sees the forward)."""

    name: ClassVar[str]
    config_class: ClassVar[type[RunConfig]]
    loss_terms: ClassVar[tuple[str, ...]]  # the names of StepOutput.terms, in the order the log shows them
    batch: ClassVar[BatchKind] = "image"
    extra_folders: ClassVar[tuple[str, ...]] = ()  # the run-folder entries save_extras writes
    extras_note: ClassVar[str] = ""  # how to read them, for the run's summary ({run}: the run folder)
    routing_log_keys: ClassVar[tuple[str, ...]] = ()  # the hooks' logged routing shares in [0, 1], plotted together

    @classmethod
    @abstractmethod
    def from_config(cls, config: RunConfig) -> Objective:
        ...

    @abstractmethod
    def kept(self) -> dict[str, nn.Module]:
        """The models the run keeps, by folder name in the run folder (written with ``save_pretrained``)."""
        ...

    def save_extras(self, directory: Path) -> None:
        """Write what the run keeps besides :meth:`kept`'s models into ``directory`` (a run folder at the end, a
        ``dex export`` folder): MedMoE's text encoder and heads. Nothing by default."""

    @classmethod
    def load_kept(cls, folder: Path) -> nn.Module | None:
        """The whole model the method keeps, in eval mode, from a ``dex export`` folder (the encoder in ``folder``
        with what :meth:`save_extras` wrote beside it) or a finished run folder (``folder/encoder`` and the same);
        None (the default) when the encoder is the whole of it, which ``dex.load_pretrained`` reads."""
        return None

    def routed_module(self) -> nn.Module | None:
        """A module that routes the kept encoder's pooled features [B, C] to experts (its ``router`` gives the
        scores [B, N]; ``num_experts`` is N), for ``dex analyze``; None (the default) when the method has none."""
        return None

    def teachers(self) -> dict[str, nn.Module]:
        """Modules that follow the trained ones through a hook instead of the optimiser (EMA teachers)."""
        return {}

    def sharded_units(self) -> list[nn.Module]:
        """The submodules FSDP shards as units (then the whole objective is one more unit)."""
        return []

    @abstractmethod
    def transform(self) -> Callable[[Tensor], Tensor]:
        """``[C, H, W]`` image in [0, 1] -> the sample the objective trains on (seeded by the loop per image)."""
        ...

    def schedule(self, step: int, total: int) -> dict[str, float]:
        """The objective's scheduled values at ``step`` of ``total`` (logged with the learning rate)."""
        return {}

    def step_inputs(self, generator, global_batch: int, rows: slice) -> dict[str, Any]:
        """The step's random inputs, drawn from ``generator`` for the whole global batch and cut to ``rows``."""
        return {}

    def hooks(self) -> list[StepHook]:
        """What runs after every optimiser step, in order."""
        return []

    @abstractmethod
    def forward(self, batch: dict[str, Tensor], schedule: Mapping[str, float],
                inputs: Mapping[str, Any]) -> StepOutput:
        ...


#: The objectives by name (``objective: NAME`` in a config), as :func:`register_objective` records them.
OBJECTIVES: dict[str, type[Objective]] = {}

T = TypeVar("T", bound=type[Objective])


def register_objective(cls: T) -> T:
    """Class decorator: ``cls`` becomes the objective of configs with ``objective: cls.name``. Another class under a
    name already taken is a ValueError naming both (the same class defined again, as a reloaded module does,
    replaces itself)."""
    known = OBJECTIVES.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"objective {cls.name!r} is already {known.__module__}.{known.__qualname__}; "
                         f"{cls.__module__}.{cls.__qualname__} needs another name")
    OBJECTIVES[cls.name] = cls
    return cls
