from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import dex  # noqa: F401  (registers the models in timm)
from dex.models import DEXViT, ExpertBank


def tiny_vit(**kwargs) -> DEXViT:
    """A 3-block, 32-wide DEX ViT on 32 px images with 8 px patches (16 patches)."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_experts=4, top_k=2)
    return DEXViT(**{**args, **kwargs})


def experts_by_loop(bank: ExpertBank, units: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
    """Eq. 5 written out: for each unit u and slot k, ``w_uk * E_r(x_u)`` with expert r run on its own."""
    out = torch.zeros_like(units)
    for u in range(units.shape[0]):
        for k in range(indices.shape[1]):
            r = int(indices[u, k])
            hidden = F.gelu(units[u] @ bank.fc1_weight[r].T + bank.fc1_bias[r])
            out[u] = out[u] + weights[u, k] * (hidden @ bank.fc2_weight[r].T + bank.fc2_bias[r])
    return out


def ct_series(folder: Path, name: str, uid: str, count: int, shift: int) -> None:
    """``count`` slices of pydicom's real CT slice as one series, each rolled differently (no near-duplicates)."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ds = template.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.ImagePositionPatient = [-158.0, -179.0, -75.0 - 2.0 * i]
        ds.PixelData = np.roll(template.pixel_array, 12 * (shift + i), axis=(0, 1)).tobytes()
        ds.save_as(folder / f"{name}_{i}.dcm")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def phantom_collection(tmp_path_factory):
    """Phantoms of all 10 modalities at 32 px (``raw/``) curated into shards (``curated/``)."""
    from dex.data.curation import CurateOptions, curate
    from dex.data.phantoms import make_phantoms

    root = tmp_path_factory.mktemp("phantom-collection")
    make_phantoms(root / "raw", per_modality=16, size=32, seed=0, task_images=5, workers=1)
    curate(root / "raw" / "recipe.yaml", root / "curated", workers=1,
           options=CurateOptions(min_size=16, shard_samples=40), progress=False)
    return root
