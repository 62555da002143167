"""What a pretraining run trains on: its collection (a ``dex curate`` output, streamed by
:class:`~dex.data.stream.CuratedImages`) or any folder of images, as micro-batches per epoch, resumable mid-epoch;
and the shards left out or found unreadable, counted over every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dex.data.shards import read_index
from dex.data.stream import CuratedImages, FolderImages, GlobalBatchSampler
from dex.train.distributed import DistContext
from dex.train.objective import RunConfig


class RunData(NamedTuple):
    """A run's data: its optimiser steps per epoch, its loader and, for a collection, the shards it streams."""

    steps_per_epoch: int
    loader: Any  # (epoch, batches_done) -> iterable of micro-batches
    shards: CuratedImages | None = None  # curated data: what knows its bad shards


def bad_shards(data: RunData, unreadable: set[str], ctx: DistContext) -> list[str]:
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


def run_data(config: RunConfig, ctx: DistContext, transform, micro_batch: int) -> RunData:
    """The data of ``config``: every image made a sample by ``transform``, in micro-batches of ``micro_batch`` per
    rank; the same global batches whatever the number of ranks."""
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

        return RunData(len(dataset) // (micro_batch * config.accum_steps), loader, dataset)
    if root.is_dir():
        dataset = FolderImages(root, transform, seed=config.seed)
        global_micro = micro_batch * ctx.world_size

        def loader(epoch: int, batches_done: int):
            dataset.set_epoch(epoch)
            sampler = GlobalBatchSampler(len(dataset), global_micro, ctx.rank, ctx.world_size, config.seed, epoch,
                                         batches_done)
            return dataloader(dataset, batch_sampler=sampler)

        return RunData(len(dataset) // global_micro // config.accum_steps, loader)
    raise FileNotFoundError(f"{root}: no such folder (a dex curate output or a folder of images)")


def require_pairs(root: Path, objective: str) -> None:
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
