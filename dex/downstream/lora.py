"""LoRA adapters (Hu et al. 2021, by ``peft``) on an encoder's attention projections: the ``lora`` protocol of
``dex benchmark`` and ``dex finetune --set lora_rank=8``.

Adapters of rank r (scaled by alpha / r; peft's initialisation: A random, B zero, so training starts from the
encoder's own function) go on every block's ``attn.qkv`` and ``attn.proj``; every other encoder parameter is frozen,
and the head (or UNETR decoder) trains in full. The DEX experts are not adapted (our choice): their weights are the
stacked [R, out, in] parameters of one ``ExpertBank``, not the ``nn.Linear`` layers peft wraps, and the director is
not on the forward path in expert mode. After training, :func:`merge_lora` folds each adapter into its layer
(W + (alpha / r) B A) and puts the plain layer back, so a kept model folder holds the encoder's own architecture.
"""

from __future__ import annotations

from torch import nn

#: The layers that get adapters: peft's regular-expression form of ``target_modules`` (a full match of the name).
LORA_TARGETS = r".*\.attn\.(qkv|proj)"


def add_lora(encoder: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze ``encoder`` and add trainable LoRA adapters to its attention projections, in place."""
    from peft import LoraConfig, inject_adapter_in_model  # deferred: peft imports transformers

    encoder.requires_grad_(False)
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                              target_modules=LORA_TARGETS), encoder)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``model`` into its layer and put the plain layer back, in place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model
