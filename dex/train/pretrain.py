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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dex._version import __version__
from dex.config import read_yaml, save_config
from dex.data.shards import read_index
from dex.data.stream import CuratedImages, FolderImages, GlobalBatchSampler, sample_seed
from dex.models import save_pretrained
from dex.safeload import load_torch_file
from dex.schedules import warmup_cosine
from dex.seeding import rng_state, seed_everything, set_rng_state
from dex.train.checkpoint import CheckpointManager
from dex.train.distributed import DistContext, all_ranks_true, barrier, init_distributed, shard_model, shutdown
from dex.train.monitor import RunMonitor
from dex.train.objective import Objective, RunConfig
from dex.train.objectives import MAEDEXConfig, build_objective, objective_class

log = logging.getLogger("dex.train")


#: The config of the default objective, MAE-DEX (any objective's config is a :class:`RunConfig` with its keys).
PretrainConfig = MAEDEXConfig


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


# --- data --------------------------------------------------------------------------------------------------------

class _Data(NamedTuple):
    steps_per_epoch: int
    loader: Any  # (epoch, batches_done) -> iterable of micro-batches
    shards: CuratedImages | None = None  # curated data: what knows its bad shards


def _bad_shards(data: _Data, unreadable: set[str], ctx: DistContext) -> list[str]:
    """The shards left out or found unreadable this epoch, by any loader worker of any rank; raises a ValueError
    (on every rank alike) when they are more than ``max_bad_shards`` of the collection."""
    if data.shards is None:
        return []
    if ctx.distributed:
        found: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(found, sorted(unreadable))
        unreadable = set().union(*map(set, found))
    data.shards.check_bad_shards(unreadable)
    return sorted(set(data.shards.missing) | unreadable)


def _data(config: RunConfig, ctx: DistContext, transform, micro_batch: int) -> _Data:
    root = Path(config.data)

    def dataloader(dataset, **kwargs) -> DataLoader:
        # its own generator: a loader draws its workers' base seed when an epoch's iterator starts, which from the
        # global one would shift the draws of the training step (dropout, drop-path) after a mid-epoch resume
        return DataLoader(dataset, num_workers=config.num_workers, persistent_workers=False,
                          pin_memory=ctx.device.type == "cuda", generator=torch.Generator().manual_seed(config.seed),
                          **kwargs)

    if (root / "index.json").is_file():
        dataset = CuratedImages(root, transform, seed=config.seed, shuffle_buffer=config.shuffle_buffer,
                                modality_temperature=config.modality_temperature,
                                loader_workers=config.num_workers, batch_size=micro_batch,
                                samples_per_epoch=config.samples_per_epoch, rank=ctx.rank,
                                world_size=ctx.world_size, max_bad_shards=config.max_bad_shards)

        def loader(epoch: int, batches_done: int):
            dataset.resume_at(epoch, batches_done)
            return dataloader(dataset, batch_size=micro_batch)

        return _Data(len(dataset) // (micro_batch * config.accum_steps), loader, dataset)
    if root.is_dir():
        dataset = FolderImages(root, transform, seed=config.seed)
        global_micro = micro_batch * ctx.world_size

        def loader(epoch: int, batches_done: int):
            dataset.set_epoch(epoch)
            sampler = GlobalBatchSampler(len(dataset), global_micro, ctx.rank, ctx.world_size, config.seed, epoch,
                                         batches_done)
            return dataloader(dataset, batch_sampler=sampler)

        return _Data(len(dataset) // global_micro // config.accum_steps, loader)
    raise FileNotFoundError(f"{root}: no such folder (a dex curate output or a folder of images)")


def _require_pairs(root: Path, objective: str) -> None:
    """An image-text objective trains on a ``dex curate`` collection whose every sample is an image-report pair."""
    if not (root / "index.json").is_file():
        raise ValueError(f"{root}: objective {objective} trains on image-report pairs: give it a dex curate collection "
                         "of them (a recipe source whose index CSV has a report column); a folder of images has none")
    index = read_index(root)
    paired = sum(index.get("report_types", {}).values())
    if paired != index["samples"]:
        raise ValueError(f"{root / 'index.json'}: {index['samples'] - paired} of {index['samples']} samples have no "
                         f"report, and objective {objective} trains on image-report pairs only: curate the sources "
                         "with reports into a collection of their own")


# --- checkpoints -------------------------------------------------------------------------------------------------

def _gather_rng(ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's RNG state (each rank draws its own, e.g. for stochastic depth)."""
    mine = rng_state(ctx.device)
    if not ctx.distributed:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


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


def _checkpoint(manager: CheckpointManager, model: Objective, optimizer, state: TrainState, config: RunConfig,
                ctx: DistContext, milestone: bool = False) -> None:
    rng = _gather_rng(ctx)
    model_state, optimizer_state = _full_states(model, optimizer, _sharded(config, ctx))
    if ctx.is_main:
        manager.save({
            "model": model_state, "optimizer": optimizer_state, "train": dataclasses.asdict(state),
            "rng": rng, "config": dataclasses.asdict(config), "version": __version__,
        }, state.step, milestone)
    barrier(ctx)


def _restore(checkpoint: dict[str, Any], model, optimizer, config: RunConfig, ctx: DistContext) -> TrainState:
    saved, current = (json.loads(json.dumps(c)) for c in (checkpoint["config"], dataclasses.asdict(config)))
    # a key the checkpoint's version did not have yet (objective) counts as unchanged
    changed = sorted(k for k in current if k not in ("out_dir", "num_workers", "log_every") and k in saved
                     and saved[k] != current[k])
    if changed:
        log.warning("resuming %s with changed settings %s: the run will differ from an uninterrupted one",
                    checkpoint["path"], changed)
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
    rng = checkpoint["rng"]
    set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0], ctx.device)
    return TrainState(**checkpoint["train"])


# --- the step ----------------------------------------------------------------------------------------------------

def _schedule(objective: Objective, config: RunConfig, step: int, warmup: int, total: int,
              peak_lr: float) -> dict[str, float]:
    return {"lr": warmup_cosine(peak_lr, config.min_lr, step, warmup, total), **objective.schedule(step, total)}


def pretrain(config: RunConfig, resume: str | None = None) -> PretrainResult:
    """Run the pretraining described by ``config`` (under torchrun: on every rank); returns the run folder and
    the model.

    ``resume``: None for a fresh run, ``"auto"`` for the newest checkpoint in the run folder that verifies and loads
    (a fresh run when there is none, but an error when there are checkpoints and none loads, or when the log records
    steps and there is no checkpoint), or a checkpoint path. The folder holds ``config.yaml``, ``log.jsonl``,
    ``tensorboard/``, ``checkpoints/`` and, at the end, ``encoder/`` (the pretrained DEX encoder, see
    :func:`dex.load_pretrained`).
    """
    ctx = init_distributed(config.device)
    try:
        return _pretrain(config, resume, ctx)
    finally:
        shutdown(ctx)


def _pretrain(config: RunConfig, resume: str | None, ctx: DistContext) -> PretrainResult:
    out_dir = Path(config.out_dir)
    per_rank = config.batch_size // ctx.world_size
    micro_batch = per_rank // config.accum_steps
    if per_rank * ctx.world_size != config.batch_size or micro_batch * config.accum_steps != per_rank:
        raise ValueError(f"batch_size {config.batch_size} does not split into {ctx.world_size} ranks x "
                         f"{config.accum_steps} accumulation steps")
    seed_everything(config.seed, ctx.device)
    model = build_objective(config).to(ctx.device).train()
    for name, teacher in model.teachers().items():  # teachers follow by their hooks, never by the optimiser
        if any(p.requires_grad for p in teacher.parameters()):
            raise ValueError(f"objective {config.objective}: its teacher {name} has parameters that require "
                             "gradients (a teacher follows the trained modules by a hook, not by the optimiser)")
    sharded = _sharded(config, ctx)
    if sharded:
        shard_model(model, model.sharded_units())
    optimizer = make_optimizer(model, config)
    manager = CheckpointManager(out_dir / "checkpoints", config.keep_checkpoints)
    state = TrainState()
    if resume:  # every refusal comes before anything in the run folder is written
        checkpoint = manager.load_latest() if resume == "auto" else _load_file(resume)
        if checkpoint is not None:
            state = _restore(checkpoint, model, optimizer, config, ctx)
            if ctx.is_main:
                log.info("resumed from %s at step %d", checkpoint["path"], state.step)
        elif (out_dir / "log.jsonl").is_file() and (out_dir / "log.jsonl").read_text().strip():
            raise ValueError(f"{out_dir}: log.jsonl records training steps but there is no checkpoint to resume "
                             "from; not starting over in this folder silently (run without --resume to start over)")
    if model.batch == "image_text":
        _require_pairs(Path(config.data), config.objective)
    data = _data(config, ctx, model.transform(), micro_batch)
    if data.steps_per_epoch < 1:
        raise ValueError(f"{config.data}: too little data for one step of {config.batch_size} images")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    total = config.epochs * data.steps_per_epoch
    warmup = config.warmup_epochs * data.steps_per_epoch
    peak_lr = config.base_lr * config.batch_size / 512
    wrapped: nn.Module = model
    if ctx.distributed and not sharded:  # buffers stay in step through the objective's hooks: no broadcast
        ddp_arguments = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_arguments
                          else {"broadcast_buffers": False})
        wrapped = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                          **no_buffer_sync)
    forward = torch.compile(wrapped) if config.compile else wrapped
    trainable = [p for p in model.parameters() if p.requires_grad]
    hooks = model.hooks()
    autocast = dict(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda")
    monitor = RunMonitor(out_dir, ctx.is_main, state.step, config.tensorboard, config.collapse_threshold,
                         config.collapse_patience)
    global_micro = micro_batch * ctx.world_size
    window = {"start": time.perf_counter(), "images": 0}
    bar = tqdm(total=total, initial=state.step, desc="pretrain", unit="step", disable=not ctx.is_main)
    try:
        while state.epoch < config.epochs:
            batches = iter(data.loader(state.epoch, state.batches_done))
            unreadable: set[str] = set()  # shards this rank's readers could not read this epoch
            while state.batches_done + config.accum_steps <= data.steps_per_epoch * config.accum_steps:
                values = _schedule(model, config, state.step, warmup, total, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = values["lr"]
                losses = torch.zeros(1 + len(model.loss_terms), device=ctx.device)
                for micro in range(config.accum_steps):
                    batch = next(batches)
                    unreadable.update(n for names in batch.get("bad_shards", ()) for n in names.split(",") if n)
                    # tensors to the device; texts (reports, keys) go to the objective as they are
                    samples = {k: v.to(ctx.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                               for k, v in batch.items() if k != "bad_shards"}
                    # the step's random inputs for all its images; micro-batch m of rank r holds rows m*G + r*b ... + b
                    start = micro * global_micro + ctx.rank * micro_batch
                    inputs = model.step_inputs(torch.Generator().manual_seed(sample_seed(config.seed, state.step)),
                                               config.batch_size, slice(start, start + micro_batch))
                    last = micro == config.accum_steps - 1
                    if sharded:
                        model.set_requires_gradient_sync(last)
                    sync = nullcontext() if last or sharded or not ctx.distributed else wrapped.no_sync()
                    with sync, torch.autocast(**autocast):
                        out = forward(samples, values, inputs)
                        (out.loss / config.accum_steps).backward()
                    losses += torch.stack([out.loss, *(out.terms[n] for n in model.loss_terms)]).detach().float()
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.clip_grad or math.inf)
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()
                finite = all_ranks_true(bool(torch.isfinite(losses).all() and torch.isfinite(grad_norm)), ctx)
                if finite:
                    optimizer.step()
                    for hook in hooks:
                        hook.after_step(values)
                else:
                    for hook in hooks:
                        hook.after_skipped_step()
                    state.skipped += 1
                    if ctx.is_main:
                        log.warning("step %d: non-finite loss or gradient; step skipped (%d so far)", state.step,
                                    state.skipped)
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batches_done += config.accum_steps
                window["images"] += config.batch_size
                bar.update()
                if state.step % config.log_every == 0 or state.step == total:
                    row = _log(monitor, model, state, values, losses / config.accum_steps, grad_norm, window, ctx,
                               _bad_shards(data, unreadable, ctx))
                    bar.set_postfix(loss=f"{row['loss']:.4f}", images_per_s=f"{row['images_per_s']:.0f}",
                                    skipped=state.skipped)
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    _checkpoint(manager, model, optimizer, state, config, ctx)
            _bad_shards(data, unreadable, ctx)
            state.epoch, state.batches_done = state.epoch + 1, 0
            milestone = bool(config.milestone_every) and state.epoch % config.milestone_every == 0
            _checkpoint(manager, model, optimizer, state, config, ctx, milestone)
    finally:  # a run stopped by an error closes its progress bar and log files first
        bar.close()
        monitor.close()
    if sharded:  # gather the shards into a plain model on the main rank
        full, _ = _full_states(model, optimizer, sharded)
        if ctx.is_main:
            plain = build_objective(config)
            plain.load_state_dict(full)
            _save_kept(plain, out_dir)
    elif ctx.is_main:
        _save_kept(model, out_dir)
    barrier(ctx)
    return PretrainResult(out_dir, model)


def _save_kept(objective: Objective, out_dir: Path) -> None:
    for name, module in objective.kept().items():
        save_pretrained(module, out_dir / name)
    objective.save_extras(out_dir)


def _load_file(path: str) -> dict[str, Any]:
    checkpoint = load_torch_file(path)  # errors name the file: missing, refused as unsafe, unreadable
    if not isinstance(checkpoint, dict) or not {"model", "optimizer", "train", "rng", "config"} <= checkpoint.keys():
        raise ValueError(f"{path}: not a dex pretrain checkpoint (one holds model, optimizer, train, rng and config)")
    checkpoint["path"] = str(path)
    return checkpoint


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
    """A few lines on a finished run: first and last logged losses, the last loss terms, the final routing balance
    and the models the run kept."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    objective = objective_class(read_yaml(run_dir / "config.yaml").get("objective", RunConfig.objective))
    lines = [
        f"run: {run_dir}",
        f"steps: {last['step']} ({last['skipped']} skipped), {last['images_per_s']:.1f} images/s",
        f"loss: {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
        "  " + ", ".join(f"{name} {last[name]:.4f}" for name in objective.loss_terms),
    ]
    if last.get("usage_entropy"):
        lines.append("expert usage entropy per layer (1 = balanced): "
                     + ", ".join(f"{e:.2f}" for e in last["usage_entropy"]))
    lines += [f"{folder.name}: {folder}  (dex.load_pretrained; dex export for a timm ViT of the director)"
              for folder in sorted(run_dir.iterdir())
              if (folder / "config.json").is_file() and folder.name not in objective.extra_folders]
    if objective.extras_note:
        lines.append(objective.extras_note.format(run=run_dir))
    return "\n".join(lines)
