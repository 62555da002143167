"""Downstream adaptation: UNETR, metrics against scikit-learn and MONAI, task folders, adaptation modes, encoders."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import yaml
from monai.metrics import DiceMetric, compute_dice
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from torch.utils.data import DataLoader

import dex
from dex.cli import main
from dex.data.tasks import TaskSpec, finish_task, load_task, mask_labels
from dex.downstream.encoders import EncoderSpec, freeze_all_but_last, load_encoder
from dex.downstream.finetune import FinetuneConfig, TaskImages, evaluate, finetune
from dex.downstream.metrics import DiceAccumulator, classification_metrics
from dex.models import DEXViT
from dex.models.unetr import UNETR2D

QUICK = FinetuneConfig(epochs=2, warmup_epochs=1, batch_size=4, lr=5e-4, steps_per_epoch=3)


def small_vit(depth: int = 4, img_size: int = 32, **kwargs) -> DEXViT:
    return DEXViT(img_size=img_size, patch_size=16, embed_dim=32, depth=depth, num_heads=2, num_experts=4, top_k=2,
                  mode="experts", **kwargs)


# --- UNETR -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,size", [(4, 32), (8, 64), (12, 96)])
def test_unetr_shapes_and_gradients_reach_every_part(depth, size):
    model = UNETR2D(small_vit(depth, size), num_classes=3, feature_size=8)
    images = torch.randn(2, 3, size, size)
    out = model(images)
    assert out.shape == (2, 3, size, size)
    out.square().mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad and ".director." not in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.block_indices == [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1]  # 3, 6, 9 of 12 (1-based)


def test_unetr_on_a_timm_vit_and_bad_encoders():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0)
    assert UNETR2D(vit, 2, feature_size=8)(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match="16 px patches"):
        UNETR2D(DEXViT(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2), 2)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        UNETR2D(small_vit(depth=2), 2)


# --- metrics -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 4])
def test_classification_metrics_equal_scikit_learn(classes):
    torch.manual_seed(classes)
    logits, target = torch.randn(60, classes), torch.randint(0, classes, (60,))
    got = classification_metrics(logits, target)
    pred, probs = logits.argmax(1).numpy(), logits.softmax(1).numpy()
    assert got["f1_macro"] == pytest.approx(f1_score(target, pred, average="macro"))
    assert got["accuracy"] == pytest.approx(accuracy_score(target, pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(target, pred))
    auroc = roc_auc_score(target, probs[:, 1]) if classes == 2 else roc_auc_score(target, probs, multi_class="ovr")
    assert got["auroc"] == pytest.approx(auroc, abs=1e-6)


def _decathlon_dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """The Decathlon rule on two boolean arrays of any shape, written out."""
    if not truth.any():
        return 0.0 if pred.any() else 1.0
    return 2 * (pred & truth).sum().item() / (pred.sum() + truth.sum()).item()


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """[*S] class indices -> [1, C, *S] one-hot, MONAI's layout."""
    return torch.nn.functional.one_hot(labels, classes).movedim(-1, 0)[None]


def test_dice_at_original_resolution_equals_monai_and_the_formula():
    torch.manual_seed(0)
    accumulator, metric = DiceAccumulator(3), DiceMetric(include_background=False, reduction="mean_batch",
                                                         ignore_empty=False)
    per_class = {1: [], 2: []}
    for n in range(6):
        logits = torch.randn(3, 16, 16)
        truth = torch.randint(0, 3, (40, 40))
        truth[:, :5] = 0
        if n == 3:
            truth[:] = 0  # an empty slice with foreground predicted: 0 for both classes
        if n >= 4:
            truth[truth == 2] = 1  # slices without class 2
        if n == 5:
            logits[2] = -10.0  # class 2 neither predicted nor present: 1
        accumulator.add(logits, truth)
        pred = torch.nn.functional.interpolate(logits[None], size=(40, 40), mode="bilinear").argmax(1)[0]
        metric(_one_hot(pred, 3), _one_hot(truth, 3))
        for c in (1, 2):
            per_class[c].append(_decathlon_dice(pred == c, truth == c))
    assert per_class[1][3] == per_class[2][3] == per_class[2][4] == 0.0 and per_class[2][5] == 1.0
    direct = np.mean([np.mean(v) for v in per_class.values()])
    assert accumulator.value() == pytest.approx(direct, abs=1e-6)
    assert accumulator.value() == pytest.approx(float(metric.aggregate().mean()), abs=1e-6)


def test_per_case_dice_equals_monai_on_the_stacked_volumes_and_the_formula():
    torch.manual_seed(1)
    accumulator = DiceAccumulator(3)
    volumes = {}  # case -> (predicted [Z, H, W], truth [Z, H, W], logits [Z, C, H, W])
    for case, depth in (("a", 4), ("b", 3), ("c", 5), ("d", 2)):
        truth = torch.randint(0, 3, (depth, 20, 20))
        truth[0] = 0  # an empty slice
        if case in "cd":
            truth[truth == 2] = 1  # cases without class 2
        logits = torch.randn(depth, 3, 20, 20)
        if case in "bc":
            logits[:, 2] = -10.0  # class 2 never predicted
        volumes[case] = (logits.argmax(1), truth, logits)
    order = [(case, z) for case, (_, truth, _) in volumes.items() for z in range(len(truth))]
    for index in np.random.default_rng(0).permutation(len(order)):  # slices in any order, cases interleaved
        case, z = order[index]
        accumulator.add(volumes[case][2][z], volumes[case][1][z], case)
    monai = torch.cat([compute_dice(_one_hot(pred, 3), _one_hot(truth, 3), include_background=False,
                                    ignore_empty=False) for pred, truth, _ in volumes.values()])  # [cases, 2]
    direct = [[_decathlon_dice(pred == c, truth == c) for c in (1, 2)] for pred, truth, _ in volumes.values()]
    assert [row[1] for row in direct[1:]] == [0.0, 1.0, 0.0]  # missed; empty on empty; false positives only
    assert accumulator.value_3d() == pytest.approx(float(monai.mean(0).mean()), abs=1e-6)
    assert accumulator.value_3d() == pytest.approx(float(np.mean(direct, 0).mean()), abs=1e-6)


def test_false_positives_on_empty_slices_cost_per_slice_and_per_case():
    truth = torch.zeros(4, 16, 16, dtype=torch.long)  # one case: two slices with an organ, two without
    truth[1:3, 4:12, 4:12] = 1
    correct = torch.nn.functional.one_hot(truth, 2).movedim(-1, 1).float() * 10  # [Z, 2, H, W] logits
    painted = correct.clone()
    painted[[0, 3], 1, 2:6, 2:6] = 20.0  # foreground painted on both empty slices
    scores = {}
    for name, logits in (("correct", correct), ("painted", painted)):
        accumulator = DiceAccumulator(2)
        for z in range(4):
            accumulator.add(logits[z], truth[z], "case")
        scores[name] = accumulator.value(), accumulator.value_3d()
    assert scores["correct"] == (1.0, 1.0)  # empty prediction on an empty slice: 1
    assert scores["painted"][0] == pytest.approx(0.5)  # two slices of 0, two of 1
    assert scores["painted"][1] == pytest.approx(2 * 128 / (128 + 128 + 32))  # the false positives join |P|
    empty = DiceAccumulator(3)
    empty.add(torch.tensor([10.0, 0.0, 0.0])[:, None, None].expand(3, 8, 8), torch.zeros(8, 8, dtype=torch.long))
    assert empty.value() == 1.0


# --- task folders ------------------------------------------------------------------------------------------------

def _segmentation_folder(root, count=6, size=24):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(root / "images" / f"c{i}.png")
        Image.fromarray(rng.integers(0, 3, (size, size), dtype=np.uint8)).save(root / "masks" / f"c{i}.png")
    spec = TaskSpec(name="toy", type="segmentation", modality="CT", classes=["bg", "a", "b"],
                    image_size=[size, size], channels=1, bit_depth=16)
    finish_task(root, spec, [f"c{i}" for i in range(count)])
    return spec


def _volume_folder(root, size=24, depth=3):
    """Six cases of ``depth`` slices, two per split, the first slice of each empty; ``cases.csv`` names them."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    ids, splits, rows = [], {}, ["id,case,slice"]
    for n, case in enumerate(f"case{c}" for c in range(6)):
        for z in range(depth):
            item = f"{case}_{z:04d}"
            mask = np.zeros((size, size), np.uint8)
            if z:
                mask[rng.integers(0, 8):rng.integers(12, size), rng.integers(0, 8):rng.integers(12, size)] = 1 + z % 2
            Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(root / "images" / f"{item}.png")
            Image.fromarray(mask).save(root / "masks" / f"{item}.png")
            ids.append(item)
            splits[item] = ("train", "train", "val", "val", "test", "test")[n]
            rows.append(f"{item},{case},{z}")
    spec = TaskSpec(name="volumes", type="segmentation", modality="CT", classes=["bg", "a", "b"],
                    image_size=[size, size], channels=1, bit_depth=16)
    finish_task(root, spec, ids, splits=splits)
    (root / "cases.csv").write_text("\n".join(rows) + "\n")


def test_evaluate_reports_per_case_dice_only_for_a_task_with_cases(tmp_path):
    _volume_folder(tmp_path / "task")
    task = load_task(tmp_path / "task")
    assert task.cases["case4_0002"] == ("case4", 2) and len(task.cases) == 18
    torch.manual_seed(0)
    model = UNETR2D(small_vit(), 3, feature_size=8)
    data = TaskImages(task, task.splits["test"], 32)
    scores = evaluate(model, data, torch.device("cpu"), 4)
    assert set(scores) == {"dice", "dice_3d"}
    with torch.no_grad():  # batched as evaluate batches, so the logits are the same to the bit
        logits = torch.cat([model(batch["image"]) for batch in DataLoader(data, batch_size=4)])
    volumes = {}
    for row, item in zip(logits, data.ids):
        truth = torch.from_numpy(mask_labels(task, item))
        pred = torch.nn.functional.interpolate(row[None], size=truth.shape, mode="bilinear").argmax(1)[0]
        case, z = task.cases[item]
        volumes.setdefault(case, {})[z] = (pred, truth)
    stacked = [[torch.stack([slices[z][k] for z in sorted(slices)]) for k in (0, 1)] for slices in volumes.values()]
    monai = torch.cat([compute_dice(_one_hot(pred, 3), _one_hot(truth, 3), include_background=False,
                                    ignore_empty=False) for pred, truth in stacked])
    assert len(stacked) == 2 and stacked[0][0].shape == (3, 24, 24)
    assert scores["dice_3d"] == pytest.approx(float(monai.mean(0).mean()), abs=1e-6)
    (tmp_path / "task" / "cases.csv").unlink()
    plain = load_task(tmp_path / "task")
    assert not plain.cases
    assert set(evaluate(model, TaskImages(plain, plain.splits["test"], 32), torch.device("cpu"), 4)) == {"dice"}


def test_finetune_records_per_case_dice_on_val_and_test(tmp_path):
    _volume_folder(tmp_path / "task")
    spec = EncoderSpec("scratch", "scratch", img_size=32, model_args={"embed_dim": 32, "depth": 4, "num_heads": 2})
    record = finetune(spec, load_task(tmp_path / "task"), 0, FinetuneConfig(**{**QUICK.__dict__, "epochs": 1}))
    assert record["score_name"] == "dice" and {"dice", "dice_3d"} == set(record["val"]) == set(record["test"])
    assert "val_dice_3d" in record["history"][0]


def test_task_folder_round_trip(tmp_path):
    spec = _segmentation_folder(tmp_path / "toy")
    task = load_task(tmp_path / "toy")
    assert task.spec == spec
    assert sum(len(v) for v in task.splits.values()) == 6 and task.splits["train"]
    assert set(np.unique(mask_labels(task, "c0"))) <= {0, 1, 2}


def test_bad_task_folders_name_the_file(tmp_path):
    _segmentation_folder(tmp_path / "a")
    (tmp_path / "a" / "masks" / "c2.png").unlink()
    with pytest.raises(ValueError, match="c2.png: no mask"):
        load_task(tmp_path / "a")
    _segmentation_folder(tmp_path / "b")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "b" / "masks" / "c1.png")
    with pytest.raises(ValueError, match="masks/c1.png: mask is 20 x 24, its image c1.png is 24 x 24"):
        load_task(tmp_path / "b")
    _segmentation_folder(tmp_path / "c")
    Image.fromarray(np.full((24, 24), 7, np.uint8)).save(tmp_path / "c" / "masks" / "c3.png")
    with pytest.raises(ValueError, match="c3.png: label value 7 is outside the 3 classes"):
        load_task(tmp_path / "c")
    (tmp_path / "d" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d" / "images" / "x.png")
    (tmp_path / "d" / "labels.csv").write_text("id,label\nx,cat\n")
    (tmp_path / "d" / "task.yaml").write_text("name: d\ntype: classification\nmodality: CT\nclasses: [dog]\n"
                                              "image_size: [8, 8]\nchannels: 1\n")
    with pytest.raises(ValueError, match="labels.csv:2: label 'cat' is not one of"):
        load_task(tmp_path / "d")


def test_folder_without_task_yaml_is_inferred(phantom_collection, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(phantom_collection / "raw" / "tasks" / "endoscopy-polyp", folder)
    for name in ("task.yaml", "splits.csv"):
        (folder / name).unlink()
    for mask in (folder / "masks").iterdir():  # stored as 0 / 255, as public releases do
        Image.fromarray((np.asarray(Image.open(mask)) * 255).astype(np.uint8)).save(mask)
    task = load_task(folder, {"modality": "Endoscopy"})
    assert task.spec.type == "segmentation" and task.spec.mask_threshold == 127
    assert task.spec.modality == "Endoscopy" and set(task.splits) == {"train", "val", "test"}
    original = load_task(phantom_collection / "raw" / "tasks" / "endoscopy-polyp")
    item = next(iter(task.masks))
    assert np.array_equal(mask_labels(task, item), mask_labels(original, item))


# --- adaptation modes and encoders -------------------------------------------------------------------------------

def test_partial_fine_tuning_freezes_what_it_says():
    encoder = small_vit(depth=4)
    freeze_all_but_last(encoder, 1)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert all(n.startswith(("blocks.3.", "norm.")) for n in trainable) and "blocks.3.attn.qkv.weight" in trainable
    assert not any(n.startswith(("patch_embed", "cls_token", "blocks.2.")) for n in trainable)


@pytest.mark.parametrize("mode,top_k", [("experts", 1), ("experts", 2), ("experts", 4), ("director", None)])
def test_dex_e_with_any_k_and_dex_d_fine_tune(tmp_path, phantom_collection, mode, top_k):
    encoder = DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=4, top_k=2)
    dex.save_pretrained(encoder, tmp_path / "encoder")
    spec = EncoderSpec("dex", str(tmp_path / "encoder"), mode=mode, top_k=top_k)
    loaded = load_encoder(spec)
    assert loaded.mode == mode and (top_k is None or loaded.model_args["dex"]["top_k"] == [top_k] * 4)
    for name in ("pathology-nuclei", "photo-lesion-type"):
        task = load_task(phantom_collection / "raw" / "tasks" / name)
        record = finetune(spec, task, 0, QUICK)
        assert 0 <= record["test"][record["score_name"]] <= 1 and len(record["history"]) == 2


def test_every_encoder_gets_the_same_decoder_initialisation(phantom_collection, tmp_path, monkeypatch):
    """Encoders of one width but different architectures (a plain ViT, a DEX ViT) start from the same UNETR decoder
    for a seed, so that their scores are paired comparisons."""
    import dex.downstream.finetune as finetune_module

    built = []
    build = finetune_module.build_model

    def capture(encoder, task, config):
        model = build(encoder, task, config)
        built.append({k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")})
        return model

    monkeypatch.setattr(finetune_module, "build_model", capture)
    dex.save_pretrained(small_vit(), tmp_path / "dex")
    task = load_task(phantom_collection / "raw" / "tasks" / "xray-lungs")
    plain = EncoderSpec("scratch", "scratch", img_size=32, model_args={"embed_dim": 32, "depth": 4, "num_heads": 2})
    one_epoch = FinetuneConfig(**{**QUICK.__dict__, "epochs": 1})
    for spec in (plain, EncoderSpec("dex", str(tmp_path / "dex"))):
        finetune(spec, task, 3, one_epoch)
    assert built[0].keys() == built[1].keys() and len(built[0]) > 10
    for name, tensor in built[0].items():
        torch.testing.assert_close(tensor, built[1][name], rtol=0, atol=0, msg=name)


def test_data_fraction_and_trainable_blocks(phantom_collection):
    task = load_task(phantom_collection / "raw" / "tasks" / "xray-lungs")
    spec = EncoderSpec("scratch", "scratch", img_size=32, model_args={"embed_dim": 32, "depth": 4, "num_heads": 2})
    full = finetune(spec, task, 0, QUICK)
    small = finetune(spec, task, 0, FinetuneConfig(**{**QUICK.__dict__, "data_fraction": 0.34,
                                                      "trainable_blocks": 2}))
    assert small["train_images"] == 1 and full["train_images"] == len(task.splits["train"])
    assert small["trainable_parameters"] < full["trainable_parameters"]


def test_encoders_from_a_timm_file_and_a_run(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    loaded = load_encoder(EncoderSpec("timm", f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.pth'}", img_size=64))
    assert loaded.patch_embed.img_size == (64, 64)
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="neither an exported encoder"):
        load_encoder(EncoderSpec("missing", str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="DEX encoders only"):
        load_encoder(EncoderSpec("plain", "scratch", img_size=32, mode="director"))


class _Payload:
    """Unpickling it opens ``marker`` for writing, which creates the file: what a malicious checkpoint would run."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_timm_file_holding_python_objects_is_refused_and_never_unpickled(tmp_path, capsys):
    marker, payload = tmp_path / "unpickled", tmp_path / "payload.pth"
    torch.save({"pos_embed": torch.zeros(1, 5, 192), "extra": _Payload(marker)}, payload)
    source = f"timm:vit_tiny_patch16_224:{payload}"
    refusal = (f"{payload}: refused: it holds Python objects other than tensors (io.open), which the safe loader does "
               "not build (nothing in it was run)")
    with pytest.raises(ValueError) as error:
        load_encoder(EncoderSpec("evil", source, img_size=32))
    assert str(error.value).startswith(refusal)
    _segmentation_folder(tmp_path / "toy")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "bench"), "finetune": {"epochs": 1, "batch_size": 4},
                                     "encoders": {"evil": {"source": source, "img_size": 32}},
                                     "tasks": [str(tmp_path / "toy")]}))
    capsys.readouterr()
    assert main(["benchmark", str(suite)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [f"dex benchmark: error: {error.value}"]
    assert not marker.exists()
    torch.load(payload, weights_only=False)  # the payload is live: unpickling it would have created the marker
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_files_give_the_features_of_timm_with_the_same_weights(tmp_path, suffix):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64).eval()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(vit.state_dict(), path)
    else:
        torch.save({"model": vit.state_dict()}, path)  # wrapped as MAE's checkpoints are
    source = f"timm:vit_tiny_patch16_224:{path}"
    x = torch.randn(2, 3, 64, 64)
    same = load_encoder(EncoderSpec("timm", source, img_size=64)).eval()
    assert torch.equal(same.forward_features(x), vit.forward_features(x))  # the classifier is dropped, the rest fits
    # at 32 px the ViT filter resamples the position embeddings, as timm's own loader does with the same file
    resized = load_encoder(EncoderSpec("timm", source, img_size=32)).eval()
    by_timm = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                num_classes=0, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(resized.forward_features(x), by_timm.forward_features(x))


def test_a_timm_file_that_does_not_fit_names_the_file_and_the_keys(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    torch.save(vit.state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"shallow.pth: does not fit vit_tiny_patch16_224; encoder tensors missing "
                                         r"from the file: \['blocks\.2\."):
        load_encoder(EncoderSpec("timm", f"timm:vit_tiny_patch16_224:{tmp_path / 'shallow.pth'}", img_size=32))
    with pytest.raises(FileNotFoundError, match="nowhere.pth: no such file"):
        load_encoder(EncoderSpec("timm", f"timm:vit_tiny_patch16_224:{tmp_path / 'nowhere.pth'}"))
    with pytest.raises(ValueError, match="is not timm:ARCH:FILE"):
        load_encoder(EncoderSpec("timm", "timm:vit_tiny_patch16_224"))


def _jax_npz(vit, path) -> None:
    """``vit``'s weights in the layout of Google's JAX ViT checkpoints (what timm's ``_load_weights`` reads)."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    dim, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(vit.blocks)):
        block, jax = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attention = jax + "MultiHeadDotProductAttention_1/"
        for norm, layer in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{jax}{layer}/scale"] = sd[f"{block}{norm}.weight"]
            out[f"{jax}{layer}/bias"] = sd[f"{block}{norm}.bias"]
        weights, biases = np.split(sd[block + "attn.qkv.weight"], 3), np.split(sd[block + "attn.qkv.bias"], 3)
        for name, weight, bias in zip(("query", "key", "value"), weights, biases):
            out[f"{attention}{name}/kernel"] = weight.T.reshape(dim, heads, -1)
            out[f"{attention}{name}/bias"] = bias.reshape(heads, -1)
        out[attention + "out/kernel"] = sd[block + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)
        out[attention + "out/bias"] = sd[block + "attn.proj.bias"]
        for r in range(2):
            out[f"{jax}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{block}mlp.fc{r + 1}.weight"].T
            out[f"{jax}MlpBlock_3/Dense_{r}/bias"] = sd[f"{block}mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


def test_jax_npz_timm_files_load_and_object_arrays_are_refused(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    _jax_npz(vit, tmp_path / "vit.npz")
    loaded = load_encoder(EncoderSpec("timm", f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.npz'}", img_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.forward_features(x), vit.forward_features(x))
    marker = tmp_path / "unpickled"
    np.savez(tmp_path / "evil.npz", **{"embedding/kernel": np.array([_Payload(marker)], dtype=object)})
    with pytest.raises(ValueError, match=r"evil.npz: not a JAX .npz checkpoint that vit_tiny_patch16_224 reads .*"
                                         r"Object arrays cannot be loaded when allow_pickle=False"):
        load_encoder(EncoderSpec("timm", f"timm:vit_tiny_patch16_224:{tmp_path / 'evil.npz'}", img_size=32))
    assert not marker.exists()
    with pytest.raises(ValueError, match="vit.npz: a JAX .npz checkpoint, which dex_vit_tiny_patch16_256 cannot read"):
        load_encoder(EncoderSpec("dex", f"timm:dex_vit_tiny_patch16_256:{tmp_path / 'vit.npz'}", img_size=32))


def test_bootstrap_intervals_match_a_direct_resampling():
    from dex.downstream.metrics import bootstrap_intervals

    values = np.random.default_rng(3).normal(size=50)
    rng = np.random.default_rng(0)
    means = [values[rng.integers(0, 50, 50)].mean() for _ in range(1000)]
    interval = bootstrap_intervals(lambda idx: {"mean": float(values[idx].mean())}, 50)["mean"]
    assert interval == pytest.approx([np.quantile(means, 0.025), np.quantile(means, 0.975)], rel=1e-12)
    assert np.isnan(bootstrap_intervals(lambda idx: {"x": float("nan")}, 5, resamples=10)["x"]).all()
