"""MAE-DEX pretraining (Sec. 3.4, 4.1, App. C.2.1) on one device.

One step: forward with the scheduled noise sigma and lambda_bal, backward, clip, AdamW step, then the
director update (group EMA with the scheduled momentum) from the activation weights of the step's batch.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dex.config import save_config
from dex.data.stream import CuratedImages
from dex.data.transforms import PretrainTransform
from dex.models import DirectorExperts, MaskedAutoencoderDEX, init_from_vit_checkpoint, save_pretrained, update_directors_
from dex.train.schedules import cosine, warmup_cosine


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
    # data: a curated folder (dex curate)
    data: str = "runs/medverse"
    num_workers: int = 0
    modality_temperature: float | None = None  # None: the natural mix; T: modality m drawn as n_m ** (1/T)
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None  # per rank; None: the whole collection
    # optimisation
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 64
    base_lr: float = 1e-4  # lr = base_lr * batch_size / 512
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 1.0
    # DEX objective (Eq. 8) and its schedules (cosine over the whole run)
    lambda_co: float = 0.1
    lambda_bal: float = 0.001
    lambda_bal_final: float = 0.0
    momentum: float = 0.99  # GEMA m, Eq. 7
    momentum_final: float = 1.0
    noise_std: float = 1.0  # sigma, Eq. 21
    noise_std_final: float = 0.0
    log_every: int = 10

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_mae(config: PretrainConfig) -> MaskedAutoencoderDEX:
    encoder = timm.create_model(config.model, pretrained=False, **config.model_args)
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


def usage_entropy(model: nn.Module) -> list[float]:
    """Per DEX layer, the entropy (nats) of the long-term expert usage c; log R when balanced, 0 when collapsed."""
    out = []
    for module in model.modules():
        if isinstance(module, DirectorExperts):
            usage = module.router.usage
            p = usage / usage.sum() if float(usage.sum()) > 0 else torch.full_like(usage, 1.0 / usage.numel())
            out.append(float(-(p * p.clamp_min(1e-12).log()).sum()))
    return out


def pretrain(config: PretrainConfig) -> Path:
    """Run the pretraining described by ``config``; returns the run folder.

    The folder holds ``config.yaml`` (the effective config), ``log.jsonl`` (one row per logged step) and
    ``encoder/`` (the pretrained DEX encoder, loadable with :func:`dex.load_pretrained`).
    """
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model = build_mae(config).to(device).train()
    img_size = model.encoder.patch_embed.img_size[0]
    dataset = CuratedImages(config.data, PretrainTransform(img_size), seed=config.seed,
                            shuffle_buffer=config.shuffle_buffer, modality_temperature=config.modality_temperature,
                            loader_workers=config.num_workers, samples_per_epoch=config.samples_per_epoch)
    loader = DataLoader(dataset, batch_size=config.batch_size, drop_last=True, num_workers=config.num_workers,
                        generator=torch.Generator().manual_seed(config.seed))
    steps_per_epoch = len(dataset) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{config.data}: {len(dataset)} samples make no batch of {config.batch_size}")
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = config.warmup_epochs * steps_per_epoch
    peak_lr = config.base_lr * config.batch_size / 512
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=peak_lr, betas=config.betas)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    step = 0
    started = time.perf_counter()
    with open(out_dir / "log.jsonl", "w") as log, tqdm(total=total_steps, desc="pretrain", unit="step") as bar:
        for epoch in range(config.epochs):
            dataset.set_epoch(epoch)
            for batch in loader:
                images = batch["image"]
                lr = warmup_cosine(peak_lr, config.min_lr, step, warmup_steps, total_steps)
                momentum = cosine(config.momentum, config.momentum_final, step, total_steps)
                noise_std = cosine(config.noise_std, config.noise_std_final, step, total_steps)
                lambda_bal = cosine(config.lambda_bal, config.lambda_bal_final, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(**autocast):
                    out = model(images.to(device), noise_std=noise_std, lambda_co=config.lambda_co,
                                lambda_bal=lambda_bal)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], config.clip_grad or math.inf
                )
                optimizer.step()
                update_directors_(model, momentum)
                step += 1
                bar.update()
                if step % config.log_every == 0 or step == total_steps:
                    losses = {k: float(getattr(out, k).detach()) for k in ("loss", "reconstruction", "alignment",
                                                                                "balance")}
                    row = dict(
                        step=step, epoch=epoch, **losses, lr=lr, momentum=momentum,
                        noise_std=noise_std, lambda_bal=lambda_bal, grad_norm=float(grad_norm),
                        images_per_s=step * config.batch_size / (time.perf_counter() - started),
                        usage_entropy=usage_entropy(model),
                    )
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{row['loss']:.4f}", align=f"{row['alignment']:.4f}")
    save_pretrained(model.encoder, out_dir / "encoder")
    return out_dir


def summary(run_dir: Path) -> str:
    """A few lines on a finished run: first and last logged losses and the final routing balance."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    entropy = last["usage_entropy"]
    lines = [
        f"run: {run_dir}",
        f"steps: {last['step']}, {last['images_per_s']:.1f} images/s",
        f"loss: {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
        f"  reconstruction {last['reconstruction']:.4f}, alignment {last['alignment']:.4f}, "
        f"balance {last['balance']:.4f}",
        f"expert usage entropy per layer (nats): {', '.join(f'{e:.2f}' for e in entropy)}",
        f"encoder: {run_dir / 'encoder'}  (dex.load_pretrained)",
    ]
    return "\n".join(lines)

