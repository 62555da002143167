"""LoRA: only the adapters (and the head) train, merging keeps the function and gives the plain architecture, and
the lora protocol leaves every other encoder weight as it was."""

from __future__ import annotations

import torch

import dex
from dex.data.tasks import load_task
from dex.downstream.encoders import EncoderSpec
from dex.downstream.finetune import FinetuneConfig, train_task_model
from dex.downstream.lora import add_lora, merge_lora
from dex.downstream.model_folder import write_finetuned
from dex.downstream.task_model import load_model
from dex.models import DEXViT


def _vit(classes: int = 3) -> DEXViT:
    torch.manual_seed(0)
    return DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=2, top_k=1,
                  num_classes=classes)


def test_only_the_adapters_of_the_attention_projections_train():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{b}.attn.{layer}.lora_{ab}.default.weight" for b in range(4)
                         for layer in ("qkv", "proj") for ab in "AB"}
    model.reset_classifier(3)  # the head of a task trains in full
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith("head."):
            stored = after.get(key, after.get(key.replace(".weight", ".base_layer.weight").replace(
                ".bias", ".base_layer.bias")))
            assert torch.equal(stored, value), key
    assert after["blocks.0.attn.qkv.lora_B.default.weight"].abs().sum() > 0  # B starts at zero and has trained


def test_merging_keeps_the_function_and_gives_the_plain_architecture():
    model = _vit()
    add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    expected = model(x)
    merge_lora(model)
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    plain = _vit()
    plain.load_state_dict(model.state_dict(), strict=True)


def test_the_lora_protocol_changes_the_attention_projections_only(tmp_path, phantom_collection):
    folder = tmp_path / "encoder"
    dex.save_pretrained(_vit(0), folder)
    task = load_task(phantom_collection / "raw" / "tasks" / "photo-lesion-type")
    record, model = train_task_model(EncoderSpec("dex", str(folder)), task, 0,
                                     FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4, lr=1e-2, lora_rank=4,
                                                    steps_per_epoch=3))
    classes = len(task.spec.classes)
    adapters = 4 * (4 * (32 + 96) + 4 * (32 + 32))  # 4 blocks: qkv A [4, 32], B [96, 4]; proj A [4, 32], B [32, 4]
    assert record["trainable_parameters"] == adapters + 32 * classes + classes
    write_finetuned(tmp_path / "model", model, record)
    kept = load_model(tmp_path / "model").network.state_dict()
    original = dex.load_pretrained(folder).state_dict()
    changed = {k for k, v in original.items() if not k.startswith("head.") and not torch.equal(kept[k], v)}
    assert changed and changed <= {f"blocks.{b}.attn.{layer}.weight" for b in range(4) for layer in ("qkv", "proj")}
