"""Readers of pictures, masks, NPY arrays and video on real files and broken ones (volumes: test_volumes.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dex.data.phantoms.writers import write_video
from dex.data.readers import ReadError, read_label_map, read_picture, read_video_frames


def test_pictures_of_every_kind(tmp_path):
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65535, (6, 5), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    rgba = rng.integers(0, 255, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    palette = Image.fromarray(rng.integers(0, 3, (6, 5), dtype=np.uint8), mode="L").convert("P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.bmp")
    picture = read_picture(tmp_path / "g16.png")
    assert picture.max_value == 65535 and np.array_equal(picture.pixels, grey16)
    assert np.array_equal(read_picture(tmp_path / "rgba.png").pixels, rgba[..., :3])
    assert read_picture(tmp_path / "palette.png").pixels.shape == (6, 5, 3)
    assert read_picture(tmp_path / "rgb.bmp").max_value == 255
    labels = read_label_map(tmp_path / "palette.png")  # a palette mask keeps its indices
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_bad_pictures_name_the_file(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:30])
    (tmp_path / "zero.jpg").write_bytes(b"")
    for name in ("cut.png", "zero.jpg"):
        with pytest.raises(ReadError, match=f"{name}: not a readable image"):
            read_picture(tmp_path / name)
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "rgb_mask.png")
    with pytest.raises(ReadError, match="rgb_mask.png: an RGB mask"):
        read_label_map(tmp_path / "rgb_mask.png")


def test_video_frame_sampling(tmp_path):
    frames = np.stack([np.full((16, 16), 8 * i, np.uint8) for i in range(31)])
    write_video(tmp_path / "clip.mp4", frames)
    sampled = list(read_video_frames(tmp_path / "clip.mp4", stride=10))
    assert [i for i, _ in sampled] == [0, 10, 20, 30]
    assert abs(int(sampled[2][1].mean()) - 160) <= 3
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ReadError, match="broken.mp4: not a readable video"):
        list(read_video_frames(tmp_path / "broken.mp4"))


def test_npy_images_are_pictures_and_npy_volumes_are_refused(tmp_path):
    grey = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    np.save(tmp_path / "grey.npy", grey)
    picture = read_picture(tmp_path / "grey.npy")
    assert picture.max_value == 65535.0 and np.array_equal(picture.pixels, grey)
    np.save(tmp_path / "rgba.npy", np.full((3, 4, 4), 0.5, np.float32))
    picture = read_picture(tmp_path / "rgba.npy")
    assert picture.pixels.shape == (3, 4, 3) and picture.max_value == 1.0
    np.save(tmp_path / "volume.npy", np.zeros((5, 6, 7), np.float32))
    with pytest.raises(ReadError, match="volume.npy: expected an image array.*found shape \\(5, 6, 7\\)"):
        read_picture(tmp_path / "volume.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ReadError, match="objects.npy: not a readable .npy array"):
        read_picture(tmp_path / "objects.npy")
