"""dex: DEX (Director-Experts), a multi-modality medical vision foundation model.

Importing ``dex`` registers the DEX encoders in timm (``dex_vit_{tiny,small,base,large}_patch16_256``).
"""

__version__ = "0.1.0"

from dex.models import (  # noqa: E402  (the version must exist before the models import it)
    DEXViT,
    DirectorExperts,
    MaskedAutoencoderDEX,
    export_director,
    init_from_vit_checkpoint,
    load_pretrained,
    save_pretrained,
    update_directors_,
)

__all__ = [
    "DEXViT", "DirectorExperts", "MaskedAutoencoderDEX", "__version__", "export_director",
    "init_from_vit_checkpoint", "load_pretrained", "save_pretrained", "update_directors_",
]
