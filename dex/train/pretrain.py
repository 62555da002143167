"""The pretraining loop, from one CPU to many GPUs (``torchrun ... -m dex pretrain``), for any objective
(:mod:`dex.train.objective`; MAE-DEX, Sec. 3.4, is the default).

One step: ``accum_steps`` micro-batches of forward and backward, gradient clipping, AdamW, then the objective's hooks
(for MAE-DEX the director update, group EMA Eq. 6-7, from the activation weights of the whole global batch). The
step's random inputs (for MAE-DEX mask noise and router noise) are drawn for the global batch from a generator seeded
by (seed, step), each rank using its own rows, and augmentation is seeded per image: a run is the same whatever the
number of ranks, and a resumed run continues exactly where the checkpoint left it. A step whose loss or gradient is
not finite on any rank is skipped and counted.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dex._version import __version__
from dex.checkpoint import CheckpointManager, check_same_settings, rank_rng_states, set_rank_rng_state
from dex.config import read_yaml, save_config
from dex.data.stream import sample_seed
from dex.models import save_pretrained
from dex.safeload import load_torch_file
from dex.schedules import warmup_cosine, warmup_warning
from dex.seeding import seed_everything
from dex.threads import shared_cores
from dex.train.batches import RunData, bad_shards, require_pairs, run_data
from dex.train.dex_backbone import DEX_TERMS
from dex.train.distributed import (
    DistContext,
    all_ranks_true,
    any_rank_true,
    barrier,
    init_distributed,
    shard_model,
    shutdown,
)
from dex.train.monitor import RunMonitor
from dex.train.objective import Objective, RunConfig, StepHook
from dex.train.objectives import build_objective, objective_class
from dex.train.preemption import Stopped, StopSignal

log = logging.getLogger("dex.train")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already consumed
    skipped: int = 0


class PretrainResult(NamedTuple):
    run_dir: Path
    model: Objective  # the trained objective (for MAE-DEX, the MaskedAutoencoderDEX with the encoder)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: with weight decay, and without it for biases (stacked expert biases
    included), norms and the embeddings the model names in ``no_weight_decay``."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith("bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with PyTorch's fused kernel (one kernel for all tensors: 2.6x the
    per-tensor loop on this project's CPU, and the fast path on GPUs)."""
    groups = param_groups(model, config.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=0.0, betas=config.betas, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(groups, lr=0.0, betas=config.betas)


# --- the run -----------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """What the epochs and steps of one run share: its settings, the objective and the module the step calls (the
    objective wrapped by DDP and compiled, as asked), the optimiser, checkpoints, data, position, log and progress."""

    config: RunConfig
    ctx: DistContext
    model: Objective
    wrapped: nn.Module  # the objective, under DDP when distributed and not sharded
    optimizer: torch.optim.Optimizer
    manager: CheckpointManager
    data: RunData
    state: TrainState
    micro_batch: int  # images per micro-batch and rank
    total: int  # optimiser steps of the whole run
    warmup: int
    peak_lr: float
    stop: StopSignal | None = None  # signals that end the run at the next step boundary, with a checkpoint
    forward: nn.Module = field(init=False)
    trainable: list[nn.Parameter] = field(init=False)  # what the gradient is clipped over
    hooks: list[StepHook] = field(init=False)
    autocast: dict[str, Any] = field(init=False)  # bfloat16 on a GPU, off on a CPU
    monitor: RunMonitor = field(init=False)
    bar: tqdm = field(init=False)
    window: dict[str, float] = field(init=False)  # images since the last logged step, and when that was

    def __post_init__(self) -> None:
        self.forward = torch.compile(self.wrapped) if self.config.compile else self.wrapped
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.hooks = self.model.hooks()
        self.autocast = dict(device_type=self.ctx.device.type, dtype=torch.bfloat16,
                             enabled=self.ctx.device.type == "cuda")
        self.monitor = RunMonitor(Path(self.config.out_dir), self.ctx.is_main, self.state.step, self.config.tensorboard,
                                  self.config.collapse_threshold, self.config.collapse_patience)
        self.window = {"start": time.perf_counter(), "images": 0}
        self.bar = tqdm(total=self.total, initial=self.state.step, desc="pretrain", unit="step",
                        disable=not self.ctx.is_main)

    @property
    def sharded(self) -> bool:
        return _sharded(self.config, self.ctx)


def pretrain(config: RunConfig, resume: str | None = None, stop: StopSignal | None = None) -> PretrainResult:
    """Run the pretraining described by ``config`` (under torchrun: on every rank); returns the run folder and
    the model.

    ``resume``: None for a fresh run, ``"auto"`` for the newest checkpoint in the run folder that verifies and loads
    (a fresh run when there is none, but an error when there are checkpoints and none loads, or when the log records
    steps and there is no checkpoint), or a checkpoint path; a checkpoint written with other settings is refused
    (:func:`dex.checkpoint.check_same_settings`). ``stop``: an open :class:`~dex.train.preemption.StopSignal`; once
    any rank has recorded its signal, the run checkpoints the step it has just made and raises
    :class:`~dex.train.preemption.Stopped`. The folder holds ``config.yaml``, ``log.jsonl``, ``tensorboard/``,
    ``checkpoints/`` and, at the end, what the objective keeps (``encoder/``, see :func:`dex.load_pretrained`).
    """
    ctx = init_distributed(config.device)
    try:
        with shared_cores(config.num_workers):
            return _pretrain(config, resume, ctx, stop)
    finally:
        shutdown(ctx)


def _pretrain(config: RunConfig, resume: str | None, ctx: DistContext, stop: StopSignal | None) -> PretrainResult:
    run = _setup(config, resume, ctx)
    run.stop = stop
    try:
        while run.state.epoch < config.epochs:
            _epoch(run)
    finally:  # a run stopped by an error closes its progress bar and log files first
        run.bar.close()
        run.monitor.close()
    _keep(run)
    barrier(ctx)
    return PretrainResult(Path(config.out_dir), run.model)


def _setup(config: RunConfig, resume: str | None, ctx: DistContext) -> _Run:
    """Everything before the first step: the objective (seeded, sharded under FSDP), the optimiser, the resumed
    position, the data, the run folder's config and the DDP wrapper. Every refusal comes before anything in the run
    folder is written."""
    out_dir = Path(config.out_dir)
    micro_batch = _micro_batch(config, ctx)
    model = _objective(config, ctx)
    optimizer = make_optimizer(model, config)
    manager = CheckpointManager(out_dir / "checkpoints", config.keep_checkpoints)
    state = _resume(resume, manager, model, optimizer, config, ctx) if resume else TrainState()
    if model.batch == "image_text":
        require_pairs(Path(config.data), config.objective)
    data = run_data(config, ctx, model.transform(), micro_batch)
    if data.steps_per_epoch < 1:
        raise ValueError(f"{config.data}: too little data for one step of {config.batch_size} images")
    warning = warmup_warning(config.epochs, config.warmup_epochs)
    if warning and ctx.is_main:
        log.warning(warning)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    wrapped: nn.Module = model
    if ctx.distributed and not _sharded(config, ctx):  # buffers stay in step through the objective's hooks
        ddp_arguments = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_arguments
                          else {"broadcast_buffers": False})
        wrapped = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                          **no_buffer_sync)
    return _Run(config, ctx, model, wrapped, optimizer, manager, data, state, micro_batch,
                total=config.epochs * data.steps_per_epoch, warmup=config.warmup_epochs * data.steps_per_epoch,
                peak_lr=config.base_lr * config.batch_size / 512)


def _micro_batch(config: RunConfig, ctx: DistContext) -> int:
    """Images per micro-batch and rank: the global batch split over the ranks and the accumulation steps."""
    per_rank = config.batch_size // ctx.world_size
    micro_batch = per_rank // config.accum_steps
    if per_rank * ctx.world_size != config.batch_size or micro_batch * config.accum_steps != per_rank:
        raise ValueError(f"batch_size {config.batch_size} does not split into {ctx.world_size} ranks x "
                         f"{config.accum_steps} accumulation steps")
    return micro_batch


def _objective(config: RunConfig, ctx: DistContext) -> Objective:
    """The objective ``config`` names, seeded, on the device, in training mode, sharded under FSDP; its teachers
    must follow by hooks, never by the optimiser."""
    seed_everything(config.seed, ctx.device)
    model = build_objective(config).to(ctx.device).train()
    for name, teacher in model.teachers().items():
        if any(p.requires_grad for p in teacher.parameters()):
            raise ValueError(f"objective {config.objective}: its teacher {name} has parameters that require "
                             "gradients (a teacher follows the trained modules by a hook, not by the optimiser)")
    if _sharded(config, ctx):
        shard_model(model, model.sharded_units())
    return model


def _epoch(run: _Run) -> None:
    """The rest of the current epoch from where the run stands, checkpoints on the way and at its end."""
    config, state = run.config, run.state
    batches = iter(run.data.loader(state.epoch, state.batches_done))
    unreadable: set[str] = set()  # shards this rank's readers could not read this epoch
    while state.batches_done + config.accum_steps <= run.data.steps_per_epoch * config.accum_steps:
        values, losses, grad_norm = _step(run, batches, unreadable)
        run.bar.update()
        if state.step % config.log_every == 0 or state.step == run.total:
            row = _log(run.monitor, run.model, state, values, losses / config.accum_steps, grad_norm, run.window,
                       run.ctx, bad_shards(run.data, unreadable, run.ctx))
            run.bar.set_postfix(loss=f"{row['loss']:.4f}", images_per_s=f"{row['images_per_s']:.0f}",
                                skipped=state.skipped)
        if config.checkpoint_every and state.step % config.checkpoint_every == 0:
            _checkpoint(run)
        if run.stop is not None and any_rank_true(run.stop.requested, run.ctx):
            _checkpoint(run)
            raise Stopped(state.step)
    bad_shards(run.data, unreadable, run.ctx)
    state.epoch, state.batches_done = state.epoch + 1, 0
    _checkpoint(run, milestone=bool(config.milestone_every) and state.epoch % config.milestone_every == 0)


def _step(run: _Run, batches, unreadable: set[str]) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """One optimiser step: ``accum_steps`` micro-batches of forward and backward, clipping, AdamW and the
    objective's hooks, or a skipped step when a loss or gradient is not finite on any rank. Returns the step's
    scheduled values, its summed losses (the total, then each term) and the gradient norm."""
    config, ctx, model, state = run.config, run.ctx, run.model, run.state
    values = {"lr": warmup_cosine(run.peak_lr, config.min_lr, state.step, run.warmup, run.total),
              **model.schedule(state.step, run.total)}
    for group in run.optimizer.param_groups:
        group["lr"] = values["lr"]
    losses = torch.zeros(1 + len(model.loss_terms), device=ctx.device)
    for micro in range(config.accum_steps):
        out = _forward_backward(run, next(batches), micro, values, unreadable)
        losses += torch.stack([out.loss, *(out.terms[n] for n in model.loss_terms)]).detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, config.clip_grad or math.inf)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    if all_ranks_true(bool(torch.isfinite(losses).all() and torch.isfinite(grad_norm)), ctx):
        run.optimizer.step()
        for hook in run.hooks:
            hook.after_step(values)
    else:
        for hook in run.hooks:
            hook.after_skipped_step()
        state.skipped += 1
        if ctx.is_main:
            log.warning("step %d: non-finite loss or gradient; step skipped (%d so far)", state.step, state.skipped)
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.batches_done += config.accum_steps
    run.window["images"] += config.batch_size
    return values, losses, grad_norm


def _forward_backward(run: _Run, batch: dict[str, Any], micro: int, values: dict[str, float],
                      unreadable: set[str]):
    """Forward and backward of micro-batch ``micro`` of the step; its gradients are synchronised across ranks on the
    last micro-batch only. The step's random inputs are drawn for all its images: micro-batch m of rank r holds rows
    m * G + r * b ... + b of the global batch (G images per micro-batch over the ranks, b per rank)."""
    config, ctx, model = run.config, run.ctx, run.model
    unreadable.update(n for names in batch.get("bad_shards", ()) for n in names.split(",") if n)
    # tensors to the device; texts (reports, keys) go to the objective as they are
    samples = {k: v.to(ctx.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
               for k, v in batch.items() if k != "bad_shards"}
    start = micro * run.micro_batch * ctx.world_size + ctx.rank * run.micro_batch
    inputs = model.step_inputs(torch.Generator().manual_seed(sample_seed(config.seed, run.state.step)),
                               config.batch_size, slice(start, start + run.micro_batch))
    last = micro == config.accum_steps - 1
    if run.sharded:
        model.set_requires_gradient_sync(last)
    sync = nullcontext() if last or run.sharded or not ctx.distributed else run.wrapped.no_sync()
    with sync, torch.autocast(**run.autocast):
        out = run.forward(samples, values, inputs)
        (out.loss / config.accum_steps).backward()
    return out


# --- checkpoints -------------------------------------------------------------------------------------------------

def _sharded(config: RunConfig, ctx: DistContext) -> bool:
    return ctx.distributed and config.distributed == "fsdp"


def _full_states(model: nn.Module, optimizer, sharded: bool) -> tuple[dict, dict]:
    """Model and optimizer state dicts with full tensors (gathered on the main rank when sharded)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def _checkpoint(run: _Run, milestone: bool = False) -> None:
    rng = rank_rng_states(run.ctx.device)
    model_state, optimizer_state = _full_states(run.model, run.optimizer, run.sharded)
    if run.ctx.is_main:
        run.manager.save({
            "model": model_state, "optimizer": optimizer_state, "train": dataclasses.asdict(run.state),
            "rng": rng, "config": dataclasses.asdict(run.config), "version": __version__,
        }, run.state.step, milestone)
    barrier(run.ctx)


def _resume(resume: str, manager: CheckpointManager, model: Objective, optimizer, config: RunConfig,
            ctx: DistContext) -> TrainState:
    """The position of the checkpoint ``resume`` names (``auto``: the newest that verifies and loads), with the
    model, optimiser and generators restored; a fresh start when ``auto`` finds no checkpoint in a run that has
    logged nothing."""
    checkpoint = manager.load_latest() if resume == "auto" else _load_file(resume)
    out_dir = Path(config.out_dir)
    if checkpoint is None:
        if (out_dir / "log.jsonl").is_file() and (out_dir / "log.jsonl").read_text().strip():
            raise ValueError(f"{out_dir}: log.jsonl records training steps but there is no checkpoint to resume "
                             "from; not starting over in this folder silently (run without --resume to start over)")
        return TrainState()
    check_same_settings(checkpoint["config"], config, checkpoint["path"])
    if _sharded(config, ctx):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, checkpoint["model"], options=options)
        set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=options)
    else:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    set_rank_rng_state(checkpoint["rng"], ctx.device)
    state = TrainState(**checkpoint["train"])
    if ctx.is_main:
        log.info("resumed from %s at step %d", checkpoint["path"], state.step)
    return state


def _load_file(path: str) -> dict[str, Any]:
    checkpoint = load_torch_file(path)  # errors name the file: missing, refused as unsafe, unreadable
    if not isinstance(checkpoint, dict) or not {"model", "optimizer", "train", "rng", "config"} <= checkpoint.keys():
        raise ValueError(f"{path}: not a dex pretrain checkpoint (one holds model, optimizer, train, rng and config)")
    checkpoint["path"] = str(path)
    return checkpoint


def _keep(run: _Run) -> None:
    """Write what the objective keeps (its models, then its extras) into the run folder, from the main rank; under
    FSDP the shards are gathered into a plain objective first."""
    out_dir = Path(run.config.out_dir)
    objective = run.model
    if run.sharded:
        full, _ = _full_states(run.model, run.optimizer, sharded=True)
        if not run.ctx.is_main:
            return
        objective = build_objective(run.config)
        objective.load_state_dict(full)
    elif not run.ctx.is_main:
        return
    for name, module in objective.kept().items():
        save_pretrained(module, out_dir / name)
    objective.save_extras(out_dir)


def _log(monitor: RunMonitor, model: Objective, state: TrainState, values, losses, grad_norm, window, ctx,
         bad_shards: list[str]) -> dict:
    if ctx.distributed:  # the logged losses are the global batch's
        dist.all_reduce(losses)
        losses /= ctx.world_size
    elapsed = time.perf_counter() - window["start"]
    row = {
        "step": state.step, "epoch": state.epoch, **dict(zip(("loss", *model.loss_terms), losses.tolist())),
        **values, "grad_norm": float(grad_norm), "skipped": state.skipped,
        "images_per_s": window["images"] / max(elapsed, 1e-9),
        **{k: v for hook in model.hooks() for k, v in hook.log().items()},
        "bad_shards": len(bad_shards), **({"bad_shard_names": bad_shards} if bad_shards else {}),
    }
    window.update(start=time.perf_counter(), images=0)
    monitor.log(row)
    return row


def summary(run_dir: Path) -> str:
    """A few lines on a finished run: its steps and images per second (over every logged step: the harmonic mean of
    the logged rates, each over the same number of steps), first and last logged losses, the last loss terms, the
    final routing balance and the models the run kept. A backbone without experts shows no expert terms."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    objective = objective_class(read_yaml(run_dir / "config.yaml").get("objective", RunConfig.objective))
    experts = bool(last.get("usage_entropy"))
    rate = len(rows) / sum(1 / max(row["images_per_s"], 1e-9) for row in rows)
    lines = [
        f"run: {run_dir}",
        f"steps: {last['step']} ({last['skipped']} skipped), {rate:.1f} images/s",
        f"loss: {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
        "  " + ", ".join(f"{name} {last[name]:.4f}" for name in objective.loss_terms
                         if experts or name not in DEX_TERMS),
    ]
    if experts:
        lines.append("expert usage entropy per layer (1 = balanced): "
                     + ", ".join(f"{e:.2f}" for e in last["usage_entropy"]))
    note = "dex.load_pretrained; dex export for a timm ViT of the director" if experts else "dex.load_pretrained"
    lines += [f"{folder.name}: {folder}  ({note})" for folder in sorted(run_dir.iterdir())
              if (folder / "config.json").is_file() and folder.name not in objective.extra_folders]
    if objective.extras_note:
        lines.append(objective.extras_note.format(run=run_dir))
    return "\n".join(lines)
