"""dex: DEX (Director-Experts), a multi-modality medical vision foundation model.

Importing ``dex`` registers the DEX encoders in timm (``dex_vit_{tiny,small,base,large}_patch16_256``).
"""

from dex import threads  # noqa: F401  (first: sets OpenMP's spin count before PyTorch loads it, see dex.threads)
from dex._version import __version__
from dex.models import (
    DEXSettings,
    DEXViT,
    DirectorExperts,
    MaskedAutoencoderDEX,
    export_director,
    init_from_vit_checkpoint,
    load_pretrained,
    save_pretrained,
    update_directors_,
)

from dex.downstream.task_model import load_model

__all__ = [
    "DEXSettings", "DEXViT", "DirectorExperts", "MaskedAutoencoderDEX", "__version__", "export_director",
    "init_from_vit_checkpoint", "load_model", "load_pretrained", "save_pretrained", "update_directors_",
]
