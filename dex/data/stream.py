"""Streaming the curated shards into training, on one or many processes.

Every (rank, loader worker) pair reads a disjoint part of the collection: whole shards when there are at least as
many shards as readers, otherwise every reader walks all shards and keeps every n-th sample. Each rank yields the
same number of samples per epoch (so DDP ranks stay in step), drawn in a seeded order that changes every epoch.

A bad shard costs only itself, as with WebDataset's ``warn_and_continue``: one that is missing or not of its
recorded size is left out from the start, one that fails to read is skipped for the rest of the epoch; each is
named in a warning, and every sample carries the names of the shards its reader has found unreadable so far this
epoch (``bad_shards``), so that the training loop can count them across loader workers and ranks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from dex.data.preprocess import full_scale
from dex.data.recipe import MODALITIES
from dex.data.shards import INDEX, ShardError, iter_shard, read_index, shard_problem
from dex.data.transforms import PretrainTransform

log = logging.getLogger("dex.data")


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> [C, H, W] float32 in [0, 1] (8- or 16-bit, grey or RGB)."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 65535.0
    tensor = torch.from_numpy(array.astype(np.float32) / scale)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from anything printable: the same parts give the same seed on every machine."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") >> 1


def seeded(transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply a transform that draws from torch's global generator with that generator seeded for this image
    only (restored afterwards): each sample's augmentation depends on its seed, not on what ran before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def modality_weights(counts: dict[str, int], temperature: float) -> dict[str, float]:
    """Acceptance probability per modality so that modality m is drawn with probability proportional to
    ``n_m ** (1 / temperature)``: 1 keeps the natural mix, large values approach equal shares."""
    target = {m: n ** (1.0 / temperature) for m, n in counts.items() if n}
    total_target, total = sum(target.values()), sum(counts.values())
    ratio = {m: (target[m] / total_target) / (counts[m] / total) for m in target}
    top = max(ratio.values())
    return {m: r / top for m, r in ratio.items()}


class CuratedImages(IterableDataset):
    """Samples of a curated folder (``dex curate``'s ``index.json`` and ``shards/``) as dicts: ``image`` (the
    transformed tensor), ``modality`` (index in MODALITIES), ``key``, and ``report`` and ``report_type`` (an
    image-report pair's ``.txt`` member and its type; empty strings for an image without a report).

    Readers are the (rank, loader worker) pairs. With at least 8 shards per reader, each epoch deals whole shards
    to readers, largest-first onto the least-loaded reader, which leaves every reader within one shard of the mean;
    with fewer shards, every reader walks all shards and keeps every n-th sample. Each reader yields a fixed
    quota (the mean share, less one shard in the first case), so every rank yields the same number of samples
    per epoch and no sample comes twice.

    Args:
        root: the curation folder.
        transform: applied to each [C, H, W] image in [0, 1]; the paper's augmentation at 256 px by default.
        seed: fixes the shard order, the shuffle and the augmentation of every epoch.
        shuffle_buffer: samples held for shuffling within a reader's stream.
        modality_temperature: None for the natural mix, or T for sampling modality m as ``n_m ** (1/T)``
            (by rejection; the epoch is then the expected number of accepted samples and may repeat a few).
        loader_workers: the ``num_workers`` of the DataLoader that will read this dataset.
        batch_size: the DataLoader's; every worker's quota is a whole number of batches, so the loader's
            round-robin over workers, and with it :meth:`resume_at`, is exact.
        samples_per_epoch: per rank; the largest count every reader can serve by default.
        rank, world_size: default to torch.distributed's.
        max_bad_shards: the share of the collection's shards that may be bad (missing, cut, unreadable) before
            :meth:`check_bad_shards` stops the run.
    """

    def __init__(self, root: str | Path, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 seed: int = 0, shuffle_buffer: int = 1000, modality_temperature: float | None = None,
                 loader_workers: int = 0, batch_size: int = 1, samples_per_epoch: int | None = None,
                 rank: int | None = None, world_size: int | None = None, max_bad_shards: float = 0.01) -> None:
        self.root = Path(root)
        index = read_index(self.root)
        if not index["samples"]:
            raise ValueError(f"{self.root / INDEX}: the curated collection is empty")
        self.total_shards, self.max_bad_shards = len(index["shards"]), max_bad_shards
        self.missing: list[str] = []  # shards left out from the start
        entries = []
        for entry in index["shards"]:
            problem = shard_problem(self.root, entry)
            if problem:
                log.warning("%s/shards/%s: %s; left out of the run", self.root, entry["name"], problem)
                self.missing.append(entry["name"])
            else:
                entries.append(entry)
        self.check_bad_shards()
        index["samples"] -= sum(s["samples"] for s in index["shards"] if s["name"] in self.missing)
        self.shards = [self.root / "shards" / s["name"] for s in entries]
        self.shard_sizes = np.array([s["samples"] for s in entries])
        self.stored = [s.get("stored") for s in entries]  # samples in the file, for the completeness check
        self.exclude = set(index["exclude"])
        self.counts = index["modalities"]
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.workers = max(1, loader_workers)
        readers = self.world_size * self.workers
        self.by_shard = len(self.shards) >= 8 * readers
        self.accept = modality_weights(self.counts, modality_temperature) if modality_temperature else None
        served = sum(self.accept[m] * n for m, n in self.counts.items()) if self.accept else index["samples"]
        share = int(served // readers - (self.shard_sizes.max() if self.by_shard else 0))
        if share < 1:
            raise ValueError(f"{self.root}: {index['samples']} samples cannot feed {readers} readers "
                             f"({self.world_size} ranks x {self.workers} loader workers)")
        per_worker = (samples_per_epoch or share * self.workers) // (self.workers * batch_size) * batch_size
        if per_worker < 1:
            raise ValueError(f"{self.root}: too few samples for a batch of {batch_size} on each of {readers} readers")
        self.samples_per_epoch, self.batch_size = per_worker * self.workers, batch_size
        self.transform = transform if transform is not None else PretrainTransform()
        self.seed, self.shuffle_buffer, self.epoch, self.start_batch = seed, shuffle_buffer, 0, 0

    def check_bad_shards(self, unreadable: Iterable[str] = ()) -> None:
        """Raise a ValueError when the shards left out and ``unreadable`` (names found so far, by any reader) are
        more than ``max_bad_shards`` of the collection."""
        bad = sorted(set(self.missing) | set(unreadable))
        if len(bad) > self.max_bad_shards * self.total_shards:
            raise ValueError(f"{self.root}: {len(bad)} of {self.total_shards} shards are missing or unreadable "
                             f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}), more than max_bad_shards "
                             f"{self.max_bad_shards:g} of them; dex data verify {self.root} lists them")

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = epoch, 0

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start ``epoch`` after the first ``batches_done`` batches the DataLoader has already delivered."""
        self.epoch, self.start_batch = epoch, batches_done

    def _my_shards(self, reader: int, readers: int, order: np.ndarray) -> list[int]:
        if not self.by_shard:
            return list(order)
        loads, owner = np.zeros(readers), {}
        for shard in sorted(order, key=lambda s: -self.shard_sizes[s]):  # stable: ties keep the shuffled order
            owner[shard] = int(np.argmin(loads))
            loads[owner[shard]] += self.shard_sizes[shard]
        return [s for s in order if owner[s] == reader]

    def _records(self, reader: int, readers: int, round_: int, failed: set[int]) -> Iterator[tuple[bytes, dict, int]]:
        """The reader's (png, meta, shard) records of one pass; a shard that fails to read joins ``failed`` and is
        skipped from then on (for the epoch)."""
        order = np.random.default_rng([self.seed, self.epoch, round_]).permutation(len(self.shards))
        rng = np.random.default_rng([self.seed, self.epoch, round_, reader])
        position = 0
        for shard in self._my_shards(reader, readers, order):
            if shard in failed:
                continue
            try:
                for key, parts in iter_shard(self.shards[shard], self.stored[shard]):
                    if key in self.exclude:
                        continue
                    position += 1
                    if not self.by_shard and (position - 1) % readers != reader:
                        continue
                    meta = json.loads(parts["json"])
                    if "txt" in parts:
                        meta["report"] = parts["txt"].decode()
                    if self.accept and rng.random() >= self.accept.get(meta["modality"], 0.0):
                        continue
                    yield parts["png"], meta, shard
            except (ShardError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
                self._fail(shard, failed, err)

    def _fail(self, shard: int, failed: set[int], err: Exception) -> None:
        failed.add(shard)
        log.warning("%s; skipped for the rest of epoch %d", err if isinstance(err, ShardError) else
                    f"{self.shards[shard]}: a sample is corrupt ({type(err).__name__}: {err})", self.epoch)

    def _shuffled(self, records: Iterator, rng: np.random.Generator) -> Iterator:
        buffer = []
        for record in records:
            buffer.append(record)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if workers != self.workers:
            raise ValueError(f"CuratedImages was built for {self.workers} loader worker(s) (loader_workers) but "
                             f"is read by {workers}")
        reader, readers = self.rank * workers + worker, self.world_size * workers
        quota = self.samples_per_epoch // workers
        # the loader takes batch j from worker j % workers: this worker has delivered these samples already
        skip = max(0, -(-(self.start_batch - worker) // workers)) * self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch, 10**6 + reader])
        produced, round_, failed = 0, 0, set()
        while produced < quota:
            before = produced
            for png, meta, shard in self._shuffled(self._records(reader, readers, round_, failed), rng):
                if produced >= skip:
                    try:
                        pixels = decode_png(png)
                    except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for corrupt PNG bytes
                        self._fail(shard, failed, err)
                        continue
                    # seeded by the image's bytes, not its key: keys are salted per collection, and two curations
                    # of the same data must train alike
                    content = hashlib.blake2b(png, digest_size=8).hexdigest()
                    image = seeded(self.transform, pixels, sample_seed(self.seed, self.epoch, content))
                    yield {"image": image, "modality": MODALITIES.index(meta["modality"]), "key": meta["key"],
                           "report": meta.get("report", ""), "report_type": meta.get("report_type", ""),
                           "bad_shards": ",".join(sorted(self.shards[i].name for i in failed))}
                produced += 1
                if produced == quota:
                    return
            if produced == before:
                unreadable = sorted(self.shards[i].name for i in failed)
                raise RuntimeError(f"{self.root}: reader {reader} of {readers} received no samples"
                                   + (f"; its shards {', '.join(unreadable)} are unreadable" if unreadable else ""))
            round_ += 1  # a bad shard, rebalanced modalities or more than one pass asked for: go round again


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class FolderImages(Dataset):
    """Every image under a folder, for small experiments without curation: pixels scaled by their bit depth
    (``x / 255``, 16-bit ``x / 65535``: :func:`dex.data.preprocess.full_scale`, the intensity rule of
    :class:`~dex.data.preprocess.Preprocessing`), the modality from ``modalities.csv`` (``path,modality``) when
    present, else from a first-level folder named after a modality, else unknown (-1).

    Items are dicts like :class:`CuratedImages`'; each image's augmentation is seeded by (seed, epoch, index).
    """

    def __init__(self, root: str | Path, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 seed: int = 0) -> None:
        from dex.data.readers import read_picture

        self.root, self.seed, self.epoch = Path(root), seed, 0
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        table = self.root / "modalities.csv"
        named = dict(csv.reader(open(table))) if table.is_file() else {}
        by_name = {m.lower(): m for m in MODALITIES}
        self.modalities = []
        for path in self.files:
            rel = path.relative_to(self.root).as_posix()
            modality = named.get(rel) or by_name.get(rel.split("/")[0].lower() if "/" in rel else "")
            self.modalities.append(MODALITIES.index(modality) if modality in MODALITIES else -1)
        self.transform = transform if transform is not None else PretrainTransform()
        self._read = read_picture

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        image = full_scale(self._read(self.files[index]))
        return {"image": seeded(self.transform, image, sample_seed(self.seed, self.epoch, index)),
                "modality": self.modalities[index], "key": self.files[index].relative_to(self.root).as_posix()}


class GlobalBatchSampler(Sampler[list[int]]):
    """Global batches of a seeded per-epoch permutation; rank r takes rows [r*b, (r+1)*b) of each, so the ranks
    together see exactly what one process with the global batch sees. Starts at ``start_batch``."""

    def __init__(self, size: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start_batch: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(f"the global batch {global_batch} does not split over {world_size} ranks")
        if size < global_batch:
            raise ValueError(f"{size} samples make no global batch of {global_batch}")
        self.size, self.global_batch, self.rank, self.world_size = size, global_batch, rank, world_size
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch

    def __len__(self) -> int:
        return self.size // self.global_batch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        local = self.global_batch // self.world_size
        for batch in range(self.start_batch, self.size // self.global_batch):
            rows = order[batch * self.global_batch + self.rank * local: batch * self.global_batch + (self.rank + 1) * local]
            yield [int(i) for i in rows]
