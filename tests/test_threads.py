"""dex's CPU thread settings (dex.threads): OpenMP's spin count set before PyTorch loads it, unless the user set
one, and intra-op threads that leave the data-loading workers (and torchrun's sibling processes) their cores."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from dex.threads import SPIN_COUNT, available_cores, shared_cores


def _spin_count(env: dict[str, str]) -> str:
    code = "import dex, os, sys; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    environment = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | env
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                          check=True).stdout.split()


def test_the_spin_count_is_set_before_torch_loads_and_the_users_wins():
    assert _spin_count({}) == [SPIN_COUNT, "True"]
    assert _spin_count({"GOMP_SPINCOUNT": "77"}) == ["77", "True"]


def test_intra_op_threads_leave_the_workers_and_sibling_processes_their_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("dex.threads.available_cores", lambda: 8)
    before = torch.get_num_threads()
    with shared_cores(workers=2) as threads:
        assert threads == torch.get_num_threads() == 6
    assert torch.get_num_threads() == before
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with shared_cores(workers=1) as threads:
        assert threads == 1  # 8 cores over 4 processes, one worker each
    with shared_cores(workers=5) as threads:
        assert threads == 1  # never fewer than one
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with shared_cores(workers=1) as threads:
        assert threads == before  # the user's setting is left alone
    assert available_cores() >= 1


def test_the_suite_runs_under_dex_s_thread_settings():
    """pyproject.toml loads dex.threads before anything imports torch (-p dex.threads), as every dex command does."""
    assert "GOMP_SPINCOUNT" in os.environ  # dex's value, or one the user gave
