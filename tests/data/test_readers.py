"""Readers of pictures, masks, NPY arrays and video on real files and broken ones (volumes: test_volumes.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from dex.data.phantoms.writers import write_video
from dex.data.readers import ReadError, read_label_map, read_mask_pixels, read_picture, read_video_frames


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


def test_tiffs_of_every_compression_pillow_or_tifffile_decodes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for compression in ("tiff_lzw", "packbits", "tiff_adobe_deflate", "raw"):
        Image.fromarray(rgb).save(tmp_path / f"{compression}.tif", compression=compression)
        assert np.array_equal(read_picture(tmp_path / f"{compression}.tif").pixels, rgb), compression
    with tifffile.TiffFile(tmp_path / "tiff_lzw.tif") as tiff, pytest.raises(ValueError, match="imagecodecs"):
        tiff.asarray()  # what tifffile alone cannot decode
    Image.fromarray(rgb).save(tmp_path / "jpeg.tif", compression="jpeg", quality=95)
    assert np.abs(read_picture(tmp_path / "jpeg.tif").pixels.astype(int) - rgb).mean() < 8
    vessels = rng.random((12, 10)) > 0.7
    Image.fromarray(vessels).save(tmp_path / "group4.tif", compression="group4")  # 1-bit, CCITT fax
    assert np.array_equal(read_mask_pixels(tmp_path / "group4.tif"), vessels * 255)
    grey16 = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16_lzw.tif", compression="tiff_lzw")
    picture = read_picture(tmp_path / "grey16_lzw.tif")
    assert picture.max_value == 65535 and np.array_equal(picture.pixels, grey16)
    floats = rng.random((12, 10)).astype(np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "float_lzw.tif", compression="tiff_lzw")
    assert np.array_equal(read_picture(tmp_path / "float_lzw.tif").pixels, floats)
    rgb16 = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)  # tifffile's own: 16-bit colour, deflate
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb", compression="zlib", predictor=True)
    picture = read_picture(tmp_path / "rgb16.tif")
    assert picture.max_value == 65535 and np.array_equal(picture.pixels, rgb16)
    palette = Image.fromarray(rng.integers(0, 3, (12, 10), dtype=np.uint8), mode="L").convert("P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette_lzw.tif", compression="tiff_lzw")
    assert read_picture(tmp_path / "palette_lzw.tif").pixels.shape == (12, 10, 3)  # colours
    assert set(np.unique(read_mask_pixels(tmp_path / "palette_lzw.tif"))) <= {0, 1, 2}  # indices


def test_a_tiff_that_pillow_would_read_with_fewer_bits_is_refused(tmp_path):
    """16-bit colour compressed with LZW: tifffile needs imagecodecs, Pillow keeps 8 bits of it."""
    rgb16 = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 3000).astype(np.uint16)
    flat = np.frombuffer(rgb16.astype("<u2").tobytes(), np.uint8).reshape(4, 30)
    Image.fromarray(flat).save(tmp_path / "flat.tif", compression="tiff_lzw")  # Pillow's LZW of the same bytes
    with tifffile.TiffFile(tmp_path / "flat.tif") as tiff:
        page = tiff.pages.first
        tiff.filehandle.seek(page.dataoffsets[0])
        strip = tiff.filehandle.read(page.databytecounts[0])
    path = tmp_path / "rgb16_lzw.tif"
    tifffile.imwrite(path, rgb16, photometric="rgb", byteorder="<")
    end = os.path.getsize(path)
    with open(path, "ab") as handle:
        handle.write(strip)
    with tifffile.TiffFile(path, mode="r+b") as tiff:  # the same image, its strip now LZW-compressed
        tags = tiff.pages.first.tags
        tags["StripOffsets"].overwrite(end)
        tags["StripByteCounts"].overwrite(len(strip))
        tags["Compression"].overwrite(5)
    with pytest.raises(ReadError, match=r"rgb16_lzw.tif: not a readable image \(ValueError: Pillow would read its "
                                        r"16-bit samples as 8-bit, and tifffile cannot decode it.*imagecodecs"):
        read_picture(path)


def test_gif_masks_keep_their_values(tmp_path):
    vessels = np.zeros((6, 7), np.uint8)
    vessels[2:4] = 255
    grey = Image.frombytes("P", (7, 6), vessels.tobytes())  # a grey-ramp palette, as DRIVE's masks have
    grey.putpalette([v for i in range(256) for v in (i, i, i)])
    grey.save(tmp_path / "21_manual1.gif", optimize=False)
    assert np.array_equal(read_mask_pixels(tmp_path / "21_manual1.gif"), vessels)
    Image.fromarray(vessels).save(tmp_path / "two_colours.gif")  # Pillow's own: a two-entry palette
    assert np.array_equal(read_label_map(tmp_path / "two_colours.gif"), vessels // 255)
