"""The one preprocessing definition (dex.data.preprocess.Preprocessing): its output equals the formula every pipeline
used before it, to the bit, wherever it is used; it round-trips through dicts, JSON and model folders."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dex.analysis import plots
from dex.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, full_scale
from dex.data.readers import read_picture
from dex.data.stream import FolderImages, decode_png
from dex.data.transforms import PretrainTransform
from dex.downstream.encoders import EncoderSpec, encoder_preprocessing, load_encoder
from dex.downstream.finetune import TaskImages
from dex.models import export_director, save_pretrained
from dex.models.weights import CONFIG_NAME, load_preprocessing
from tests.conftest import tiny_vit

SIZE = 32


def direct(pixels: np.ndarray, full: float, size: int = SIZE) -> torch.Tensor:
    """The formula written out: / full scale, [C, H, W], resize (bilinear, antialias), clamp, 3 channels, z-score."""
    tensor = torch.from_numpy(pixels.astype(np.float32) / full)
    image = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    image = TF.resize(image, [size, size], antialias=True).clamp(0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return TF.normalize(image, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _pictures(folder):
    """(path, stored pixels, full scale) of a grey 8-bit PNG, a grey 16-bit PNG, an RGB PNG and a float TIFF with
    values outside [0, 1] (clamped after the resize, not before)."""
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (45, 61), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (20, 27), dtype=np.uint16)  # smaller than the input: upsampled
    rgb = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    floats = rng.uniform(-0.5, 1.5, (40, 40)).astype(np.float32)
    Image.fromarray(grey8).save(folder / "grey8.png")
    Image.fromarray(grey16).save(folder / "grey16.png")
    Image.fromarray(rgb).save(folder / "rgb.png")
    tifffile.imwrite(folder / "float.tif", floats)
    return [(folder / "grey8.png", grey8, 255.0), (folder / "grey16.png", grey16, 65535.0),
            (folder / "rgb.png", rgb, 255.0), (folder / "float.tif", floats, 1.0)]


@pytest.fixture()
def pictures(tmp_path):
    return _pictures(tmp_path)


def test_reading_a_picture_equals_the_direct_formula(pictures):
    preprocessing = Preprocessing(size=SIZE)
    for path, pixels, full in pictures:
        stored = np.asarray(Image.open(path)) if path.suffix == ".png" else tifffile.imread(path)
        assert np.array_equal(stored, pixels), path.name
        expected = direct(stored, full)
        assert expected.shape == (3, SIZE, SIZE)
        assert torch.equal(preprocessing.read(path), expected), path.name
        assert torch.equal(preprocessing(full_scale(read_picture(path))), expected), path.name


def test_every_pipeline_feeds_the_same_input(pictures, tmp_path):
    """Fine-tuning, the analyses (a Preprocessing on an image folder) and the decoded shard PNGs give the formula's
    tensor; the pretraining augmentation's tail is the same (no crop, flip or rotation drawn: it equals it too)."""
    task = SimpleNamespace(images={path.stem: path for path, _, _ in pictures})
    by_task = TaskImages(task, list(task.images), SIZE)
    folder = FolderImages(tmp_path, Preprocessing(size=SIZE))
    by_name = {folder.files[i].stem: folder[i]["image"] for i in range(len(folder))}
    unchanged = PretrainTransform(SIZE, p=0.0, min_mean=2.0)  # every crop refused: the centre square, resized
    for path, pixels, full in pictures:
        expected = direct(pixels, full)
        assert torch.equal(by_task.image(path.stem), expected), path.name
        assert torch.equal(by_name[path.stem], expected), path.name
        if path.suffix == ".png":
            assert torch.equal(Preprocessing(size=SIZE)(decode_png(path.read_bytes())), expected), path.name
        square = full_scale(read_picture(path))[:, :20, :20]
        assert torch.equal(unchanged(square), direct(pixels[:20, :20], full)), path.name


def test_task_images_take_a_preprocessing_and_size_masks_to_it(pictures):
    task = SimpleNamespace(images={path.stem: path for path, _, _ in pictures})
    wide = Preprocessing(size=(16, 24))
    data = TaskImages(task, list(task.images), wide)
    assert data.preprocessing is wide and data.image("rgb").shape == (3, 16, 24)
    assert TaskImages(task, list(task.images), SIZE).preprocessing == Preprocessing(size=(SIZE, SIZE))


def test_display_undoes_the_z_score():
    image = torch.rand(3, 8, 8) * 1.2 - 0.1
    inputs = Preprocessing(size=8).standardize(image)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (inputs * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.array_equal(plots.display(inputs), expected)
    assert np.allclose(plots.display(inputs), image.clamp(0, 1).permute(1, 2, 0).numpy(), atol=1e-6)
    other = Preprocessing(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert np.allclose(plots.display(other.standardize(image), other), image.clamp(0, 1).permute(1, 2, 0).numpy(),
                       atol=1e-6)


# --- serialisation -------------------------------------------------------------------------------------------

def test_to_dict_from_dict_round_trip():
    default = Preprocessing()
    assert default.to_dict() == {"size": [256, 256], "channels": 3, "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "interpolation": "bilinear", "antialias": True,
                                 "intensity": "full_scale", "modality": "", "volume_normalization": "",
                                 "slice_axis": "axial", "ct_window": [-200.0, 400.0], "fit": "resize"}
    other = Preprocessing(size=(224, 192), mean=(0.5, 0.25, 0.125), std=(1, 2, 3), interpolation="bicubic",
                          antialias=False, modality="CT", volume_normalization="ct_hu", slice_axis="coronal",
                          ct_window=(-1000, 1000), fit="native")
    for preprocessing in (default, other):
        again = Preprocessing.from_dict(json.loads(json.dumps(preprocessing.to_dict())))
        assert again == preprocessing and hash(again) == hash(preprocessing)
    assert Preprocessing(size=64).size == (64, 64) and Preprocessing(size=[64, 48]).size == (64, 48)
    assert Preprocessing.from_dict({"size": [64, 64]}) == Preprocessing(size=64)  # missing fields: the defaults


@pytest.mark.parametrize("block,key", [
    ({"sizes": [32, 32]}, "unknown key.*sizes"),
    ({"size": [32]}, "size"), ({"size": [0, 32]}, "size"), ({"size": 32.0}, "size"), ({"size": True}, "size"),
    ({"channels": 0}, "channels"), ({"channels": "3"}, "channels"),
    ({"mean": [0.5, 0.5]}, "mean"), ({"mean": [0.5, "a", 0.5]}, "mean"), ({"mean": [0.5, float("nan"), 0.5]}, "mean"),
    ({"std": [0.2, 0.0, 0.2]}, "std"), ({"std": 0.2}, "std"),
    ({"interpolation": "cubic"}, "interpolation"), ({"interpolation": "lanczos"}, "interpolation"),
    ({"antialias": 1}, "antialias"), ({"intensity": "ct_hu"}, "intensity.*VOLUME_NORMALIZERS"),
    ({"modality": 3}, "modality"), ({"volume_normalization": "hu"}, "volume_normalization.*ct_hu"),
    ({"slice_axis": "transverse"}, "slice_axis.*axial"),
    ({"fit": "crop"}, "fit.*native"), ({"ct_window": [400, -200]}, "ct_window.*low < high"),
    ({"ct_window": [-200]}, "ct_window.*low and high HU"),
])
def test_from_dict_refuses_bad_blocks_naming_the_key(block, key):
    with pytest.raises(ValueError, match=key):
        Preprocessing.from_dict(block)
    with pytest.raises(ValueError, match="expected a mapping"):
        Preprocessing.from_dict([("size", 32)])


# --- model folders -------------------------------------------------------------------------------------------

def test_model_folders_record_the_preprocessing(tmp_path):
    model = tiny_vit()
    for folder in (save_pretrained(model, tmp_path / "enc"), export_director(model, tmp_path / "director")):
        config = json.loads((folder / CONFIG_NAME).read_text())
        expected = Preprocessing(size=(32, 32))
        assert config["preprocessing"] == expected.to_dict()
        cfg = config["pretrained_cfg"]
        assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == list(expected.mean)
        assert cfg["std"] == list(expected.std)
        assert load_preprocessing(folder) == expected
        spec = EncoderSpec("enc", str(folder))
        assert encoder_preprocessing(spec, load_encoder(spec)) == expected


def test_folders_written_before_the_block_read_as_the_default(tmp_path):
    folder = save_pretrained(tiny_vit(), tmp_path / "enc")
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["preprocessing"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert load_preprocessing(folder) == Preprocessing(size=(32, 32))


def test_a_bad_block_or_folder_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_preprocessing(tmp_path)
    folder = save_pretrained(tiny_vit(), tmp_path / "enc")
    config = json.loads((folder / CONFIG_NAME).read_text())
    for block, message in (({**config["preprocessing"], "mean": [1, 2]}, "config.json: preprocessing: mean"),
                           ({**config["preprocessing"], "scale": 2}, "config.json: preprocessing: unknown key.*scale")):
        (folder / CONFIG_NAME).write_text(json.dumps({**config, "preprocessing": block}))
        with pytest.raises(ValueError, match=message):
            load_preprocessing(folder)
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "preprocessing": {**config["preprocessing"],
                                                                              "size": [64, 64]}}))
    spec = EncoderSpec("enc", str(folder))
    with pytest.raises(ValueError, match="preprocessing size \\[64, 64\\] is not the model's input size \\[32, 32\\]"):
        encoder_preprocessing(spec, load_encoder(spec))


def test_encoders_without_a_folder_get_the_default_at_their_size():
    spec = EncoderSpec("scratch", "scratch", img_size=48)
    assert encoder_preprocessing(spec, load_encoder(spec)) == Preprocessing(size=48)
