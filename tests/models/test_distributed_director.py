"""Under torch.distributed, update_directors_ sums the activation weights over ranks: every rank ends with the
same director and usage, equal to one process that routed the whole global batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dex.models import update_directors_
from tests.conftest import tiny_vit


def _model_and_batch():
    torch.manual_seed(0)
    model = tiny_vit().train()
    return model, torch.randn(6, 3, 32, 32)


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, batch = _model_and_batch()
        model.forward_features(batch.chunk(world)[rank])  # each rank routes its share of the global batch
        update_directors_(model, momentum=0.5)
        torch.save({k: v for k, v in model.state_dict().items() if ".director." in k or ".usage" in k},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_hold_the_director_of_the_global_batch(tmp_path):
    world, port = 2, 29500 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    model, batch = _model_and_batch()
    model.forward_features(batch)
    update_directors_(model, momentum=0.5)
    single = model.state_dict()
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-6, atol=1e-6)
