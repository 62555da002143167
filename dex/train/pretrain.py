"""MAE-DEX pretraining (Sec. 3.4, 4.1, App. C.2.1), from one CPU to many GPUs (``torchrun ... -m dex pretrain``).

One step: ``accum_steps`` micro-batches of forward and backward, gradient clipping, AdamW, then the director update
(group EMA, Eq. 6-7) from the activation weights of the whole global batch. The step's random inputs (mask noise,
router noise) are drawn for the global batch from a generator seeded by (seed, step), each rank using its own rows,
and augmentation is seeded per image: a run is the same whatever the number of ranks, and a resumed run continues
exactly where the checkpoint left it. A step whose loss or gradient is not finite on any rank is skipped and counted.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import timm
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dex._version import __version__
from dex.config import STRICT, save_config
from dex.data.stream import CuratedImages, FolderImages, GlobalBatchSampler, sample_seed
from dex.data.transforms import PretrainTransform
from dex.models import (
    DirectorExperts,
    MaskedAutoencoderDEX,
    discard_usage_,
    init_from_vit_checkpoint,
    save_pretrained,
    update_directors_,
)
from dex.safeload import load_torch_file
from dex.train.checkpoint import CheckpointManager
from dex.train.distributed import DistContext, all_ranks_true, barrier, init_distributed, shard_model, shutdown
from dex.train.monitor import RunMonitor, normalised_entropy
from dex.train.reproducibility import seed_everything
from dex.train.schedules import cosine, warmup_cosine

log = logging.getLogger("dex.train")


@STRICT
@dataclass
class PretrainConfig:
    """A pretraining run; saved as ``config.yaml`` in the run folder. Defaults are the paper's where it gives
    them (lr, warm-up, schedules, coefficients, mask ratio, decoder) and MAE's otherwise (betas, weight decay)."""

    out_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"  # auto (cuda if present), cpu or cuda
    # model
    model: str = "dex_vit_base_patch16_256"
    model_args: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    init_checkpoint: str | None = None  # a plain ViT / MAE checkpoint to warm-start from (reference: D10)
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
    # DEX objective (Eq. 8) and its schedules (cosine over the whole run)
    lambda_co: float = 0.1
    lambda_bal: float = 0.001
    lambda_bal_final: float = 0.0
    momentum: float = 0.99  # GEMA m, Eq. 7
    momentum_final: float = 1.0
    noise_std: float = 1.0  # sigma, Eq. 21
    noise_std_final: float = 0.0
    # run
    log_every: int = 10
    checkpoint_every: int = 500  # steps; 0: only at the end of each epoch
    keep_checkpoints: int = 3
    milestone_every: int = 0  # epochs whose final checkpoint is kept for good; 0: none
    tensorboard: bool = True
    collapse_threshold: float = 0.5  # routing collapse: usage entropy under this fraction of log R ...
    collapse_patience: int = 5  # ... for this many logged steps in a row

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("epochs", "batch_size", "accum_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_bad_shards <= 1:
            raise ValueError(f"max_bad_shards is a share of the shards, in [0, 1]; got {self.max_bad_shards}")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already consumed
    skipped: int = 0


class PretrainResult(NamedTuple):
    run_dir: Path
    model: MaskedAutoencoderDEX


def build_mae(config: PretrainConfig) -> MaskedAutoencoderDEX:
    try:
        encoder = timm.create_model(config.model, pretrained=False, **config.model_args)
    except (TypeError, RuntimeError) as err:  # an unknown architecture or argument
        raise ValueError(f"model {config.model!r} with model_args {config.model_args}: {err}") from err
    model = MaskedAutoencoderDEX(
        encoder, config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads,
        norm_pix_loss=config.norm_pix_loss, mask_ratio=config.mask_ratio,
    )
    if config.init_checkpoint:
        init_from_vit_checkpoint(model, config.init_checkpoint)
    return model


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


def make_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with PyTorch's fused kernel (one kernel for all tensors: 2.6x the
    per-tensor loop on this project's CPU, and the fast path on GPUs)."""
    groups = param_groups(model, config.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=0.0, betas=config.betas, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(groups, lr=0.0, betas=config.betas)


def usage_entropy(model: nn.Module) -> list[float]:
    """Per DEX layer, the normalised entropy of the long-term expert usage c (1 balanced, 0 collapsed)."""
    return [normalised_entropy(m.router.usage.tolist()) for m in model.modules() if isinstance(m, DirectorExperts)]


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


def _data(config: PretrainConfig, ctx: DistContext, img_size: int, micro_batch: int) -> _Data:
    root = Path(config.data)
    transform = PretrainTransform(img_size)

    def dataloader(dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=config.num_workers, persistent_workers=False,
                          pin_memory=ctx.device.type == "cuda", **kwargs)

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


# --- checkpoints -------------------------------------------------------------------------------------------------

def _rng_state(ctx: DistContext) -> dict[str, Any]:
    numpy = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy[1].astype(np.int64)), "pos": int(numpy[2]),
                  "has_gauss": int(numpy[3]), "gauss": float(numpy[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict[str, Any], ctx: DistContext) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


def _gather_rng(ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's RNG state (each rank draws its own, e.g. for stochastic depth)."""
    mine = _rng_state(ctx)
    if not ctx.distributed:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


def _sharded(config: PretrainConfig, ctx: DistContext) -> bool:
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


def _checkpoint(manager: CheckpointManager, model: MaskedAutoencoderDEX, optimizer, state: TrainState,
                config: PretrainConfig, ctx: DistContext, milestone: bool = False) -> None:
    rng = _gather_rng(ctx)
    model_state, optimizer_state = _full_states(model, optimizer, _sharded(config, ctx))
    if ctx.is_main:
        manager.save({
            "model": model_state, "optimizer": optimizer_state, "train": dataclasses.asdict(state),
            "rng": rng, "config": dataclasses.asdict(config), "version": __version__,
        }, state.step, milestone)
    barrier(ctx)


def _restore(checkpoint: dict[str, Any], model, optimizer, config: PretrainConfig, ctx: DistContext) -> TrainState:
    saved, current = (json.loads(json.dumps(c)) for c in (checkpoint["config"], dataclasses.asdict(config)))
    changed = sorted(k for k in current if k not in ("out_dir", "num_workers", "log_every") and saved.get(k) != current[k])
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
    _set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0], ctx)
    return TrainState(**checkpoint["train"])


# --- the step ----------------------------------------------------------------------------------------------------

def _schedules(config: PretrainConfig, step: int, warmup: int, total: int, peak_lr: float) -> dict[str, float]:
    return {
        "lr": warmup_cosine(peak_lr, config.min_lr, step, warmup, total),
        "momentum": cosine(config.momentum, config.momentum_final, step, total),
        "noise_std": cosine(config.noise_std, config.noise_std_final, step, total),
        "lambda_bal": cosine(config.lambda_bal, config.lambda_bal_final, step, total),
    }


def pretrain(config: PretrainConfig, resume: str | None = None) -> PretrainResult:
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


def _pretrain(config: PretrainConfig, resume: str | None, ctx: DistContext) -> PretrainResult:
    out_dir = Path(config.out_dir)
    per_rank = config.batch_size // ctx.world_size
    micro_batch = per_rank // config.accum_steps
    if per_rank * ctx.world_size != config.batch_size or micro_batch * config.accum_steps != per_rank:
        raise ValueError(f"batch_size {config.batch_size} does not split into {ctx.world_size} ranks x "
                         f"{config.accum_steps} accumulation steps")
    seed_everything(config.seed, ctx.device)
    model = build_mae(config).to(ctx.device).train()
    sharded = _sharded(config, ctx)
    if sharded:
        shard_model(model)
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
    data = _data(config, ctx, model.encoder.patch_embed.img_size[0], micro_batch)
    if data.steps_per_epoch < 1:
        raise ValueError(f"{config.data}: too little data for one step of {config.batch_size} images")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    total = config.epochs * data.steps_per_epoch
    warmup = config.warmup_epochs * data.steps_per_epoch
    peak_lr = config.base_lr * config.batch_size / 512
    wrapped: nn.Module = model
    if ctx.distributed and not sharded:  # buffers stay in step through update_directors_: no broadcast
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
        wrapped = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                          **no_buffer_sync)
    forward = torch.compile(wrapped) if config.compile else wrapped
    trainable = [p for p in model.parameters() if p.requires_grad]
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
                values = _schedules(config, state.step, warmup, total, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = values["lr"]
                losses = torch.zeros(4, device=ctx.device)
                for micro in range(config.accum_steps):
                    batch = next(batches)
                    unreadable.update(n for names in batch.get("bad_shards", ()) for n in names.split(",") if n)
                    images = batch["image"].to(ctx.device, non_blocking=True)
                    # the step's noise for all its images; micro-batch m of rank r holds rows m*G + r*b ... + b
                    start = micro * global_micro + ctx.rank * micro_batch
                    noise = model.draw_noise(torch.Generator().manual_seed(sample_seed(config.seed, state.step)),
                                             config.batch_size, slice(start, start + micro_batch))
                    last = micro == config.accum_steps - 1
                    if sharded:
                        model.set_requires_gradient_sync(last)
                    sync = nullcontext() if last or sharded or not ctx.distributed else wrapped.no_sync()
                    with sync, torch.autocast(**autocast):
                        out = forward(images, noise_std=values["noise_std"], lambda_co=config.lambda_co,
                                      lambda_bal=values["lambda_bal"], **noise)
                        (out.loss / config.accum_steps).backward()
                    losses += torch.stack([out.loss, out.reconstruction, out.alignment, out.balance]).detach().float()
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.clip_grad or math.inf)
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()
                finite = all_ranks_true(bool(torch.isfinite(losses).all() and torch.isfinite(grad_norm)), ctx)
                if finite:
                    optimizer.step()
                    loads = update_directors_(model, values["momentum"])
                else:
                    discard_usage_(model)
                    state.skipped += 1
                    loads = []
                    if ctx.is_main:
                        log.warning("step %d: non-finite loss or gradient; step skipped (%d so far)", state.step,
                                    state.skipped)
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batches_done += config.accum_steps
                window["images"] += config.batch_size
                bar.update()
                if state.step % config.log_every == 0 or state.step == total:
                    row = _log(monitor, model, state, values, losses / config.accum_steps, grad_norm, loads, window,
                               ctx, _bad_shards(data, unreadable, ctx))
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
            plain = build_mae(config)
            plain.load_state_dict(full)
            save_pretrained(plain.encoder, out_dir / "encoder")
    elif ctx.is_main:
        save_pretrained(model.encoder, out_dir / "encoder")
    barrier(ctx)
    return PretrainResult(out_dir, model)


def _load_file(path: str) -> dict[str, Any]:
    checkpoint = load_torch_file(path)  # errors name the file: missing, refused as unsafe, unreadable
    if not isinstance(checkpoint, dict) or not {"model", "optimizer", "train", "rng", "config"} <= checkpoint.keys():
        raise ValueError(f"{path}: not a dex pretrain checkpoint (one holds model, optimizer, train, rng and config)")
    checkpoint["path"] = str(path)
    return checkpoint


def _log(monitor: RunMonitor, model, state: TrainState, values, losses, grad_norm, loads, window, ctx,
         bad_shards: list[str]) -> dict:
    if ctx.distributed:  # the logged losses are the global batch's
        dist.all_reduce(losses)
        losses /= ctx.world_size
    elapsed = time.perf_counter() - window["start"]
    row = {
        "step": state.step, "epoch": state.epoch, **dict(zip(("loss", "reconstruction", "alignment", "balance"),
                                                              losses.tolist())),
        **values, "grad_norm": float(grad_norm), "skipped": state.skipped,
        "images_per_s": window["images"] / max(elapsed, 1e-9),
        "usage_entropy": usage_entropy(model), "load": [load.tolist() for load in loads],
        "bad_shards": len(bad_shards), **({"bad_shard_names": bad_shards} if bad_shards else {}),
    }
    window.update(start=time.perf_counter(), images=0)
    monitor.log(row)
    return row


def summary(run_dir: Path) -> str:
    """A few lines on a finished run: first and last logged losses and the final routing balance."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    lines = [
        f"run: {run_dir}",
        f"steps: {last['step']} ({last['skipped']} skipped), {last['images_per_s']:.1f} images/s",
        f"loss: {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
        f"  reconstruction {last['reconstruction']:.4f}, alignment {last['alignment']:.4f}, "
        f"balance {last['balance']:.4f}",
        "expert usage entropy per layer (1 = balanced): " + ", ".join(f"{e:.2f}" for e in last["usage_entropy"]),
        f"encoder: {run_dir / 'encoder'}  (dex.load_pretrained; dex export for a timm ViT of the director)",
    ]
    return "\n".join(lines)
