"""DEX models: the Director-Experts module, the DEX ViT encoder (registered in timm), MAE pretraining."""

from dex.models.conversions import director_state_dict, vit_to_dex_state_dict
from dex.models.dex_vit import DEXBlock, DEXViT
from dex.models.director_experts import (
    DEXAux,
    DEXSettings,
    DirectorExperts,
    ExpertBank,
    ExpertRouter,
    LayerLosses,
    Routing,
    alignment_loss,
    alignment_loss_kd,
    balance_loss,
    balance_loss_reference,
    discard_usage_,
    group_ema_,
    layer_losses,
    layer_weights,
    update_directors_,
)
from dex.models.mae import MaskedAutoencoderDEX, MAEOutput, patchify, random_masking, unpatchify
from dex.models.pos_embed import sincos_2d
from dex.models.weights import (
    create_model,
    export_director,
    init_from_vit_checkpoint,
    load_pretrained,
    load_state_dict_file,
    save_pretrained,
)

__all__ = [
    "DEXAux", "DEXBlock", "DEXSettings", "DEXViT", "DirectorExperts", "ExpertBank", "ExpertRouter", "LayerLosses",
    "MAEOutput", "MaskedAutoencoderDEX", "Routing", "alignment_loss", "alignment_loss_kd", "balance_loss",
    "balance_loss_reference", "create_model", "director_state_dict", "discard_usage_", "export_director",
    "group_ema_", "init_from_vit_checkpoint", "layer_losses", "layer_weights", "load_pretrained",
    "load_state_dict_file", "patchify", "random_masking", "save_pretrained", "sincos_2d", "unpatchify",
    "update_directors_", "vit_to_dex_state_dict",
]
