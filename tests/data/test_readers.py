"""Readers on real files (the shared CT series, pydicom's bundled CT/MR) and on broken ones."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from dex.data.phantoms.writers import write_nifti, write_video
from dex.data.readers import (
    ReadError,
    group_dicom_series,
    read_dicom_series,
    read_dicom_series_display,
    read_label_map,
    read_nifti,
    read_picture,
    read_video_frames,
)

SHARED_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct-lung-dicom" / "images"


@pytest.mark.skipif(not SHARED_CT.is_dir(), reason="shared data not present")
def test_real_ct_series_sorted_by_position_in_hounsfield_units():
    files = sorted(SHARED_CT.rglob("*.dcm"))
    series = group_dicom_series(files)
    assert len(series) == 1
    volume = read_dicom_series(files[::-1])  # file order must not matter
    assert volume.values.shape == (64, 512, 512)
    assert volume.spacing == pytest.approx((5.0, 0.841796875, 0.841796875))
    assert volume.values.min() == -1024 and volume.values.max() == 2976  # stored 0..4000, intercept -1024
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    top = files[int(np.argmax(z))]  # the first slice is the most superior one
    stored = pydicom.dcmread(top).pixel_array.astype(np.float32) - 1024
    np.testing.assert_array_equal(volume.values[0], stored)
    assert volume.meta["modality"] == "CT" and volume.meta["units"] == "HU"


@pytest.mark.skipif(not SHARED_CT.is_dir(), reason="shared data not present")
def test_real_ct_series_placed_in_patient_space_matches_its_nifti_affine():
    files = sorted(SHARED_CT.rglob("*.dcm"))
    plain, placed = read_dicom_series(files), read_dicom_series_display(files)
    np.testing.assert_array_equal(placed.values, plain.values)  # a standard axial series is already in display
    ds = pydicom.dcmread(files[0])
    top = max((pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient for f in files), key=lambda p: p[2])
    voxel = np.array([10, 20, 30, 1.0])  # display (z, y, x)
    lps = [top[0] + 30 * float(ds.PixelSpacing[1]), top[1] + 20 * float(ds.PixelSpacing[0]), top[2] - 10 * 5.0]
    np.testing.assert_allclose(placed.meta["affine"] @ voxel, [-lps[0], -lps[1], lps[2], 1.0], atol=1e-6)
    assert placed.meta["modality"] == "CT"


def test_pydicom_ct_applies_rescale():
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    volume = read_dicom_series([path])
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.values[0], expected)


def test_truncated_and_foreign_dicom_name_the_file(tmp_path):
    with pytest.raises(ReadError, match="MR_truncated.dcm"):
        read_dicom_series([Path(get_testdata_file("MR_truncated.dcm"))])
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(ReadError, match="empty.dcm: not a readable DICOM"):
        read_dicom_series([empty])
    png = tmp_path / "image.dcm"
    Image.new("L", (4, 4)).save(png, format="PNG")
    with pytest.raises(ReadError, match="image.dcm"):
        read_dicom_series([png])


def test_series_with_mismatched_slices_is_refused(tmp_path):
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ct.save_as(tmp_path / "a.dcm")
    mr.SeriesInstanceUID = ct.SeriesInstanceUID
    mr.save_as(tmp_path / "b.dcm")
    if (ct.Rows, ct.Columns) != (mr.Rows, mr.Columns):
        with pytest.raises(ReadError, match="differ in size"):
            read_dicom_series([tmp_path / "a.dcm", tmp_path / "b.dcm"])


def test_nifti_any_orientation_and_4d(tmp_path):
    volume = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    write_nifti(tmp_path / "ras.nii.gz", volume, (3.0, 1.0, 2.0))
    write_nifti(tmp_path / "las.nii.gz", volume, (3.0, 1.0, 2.0), flip_x=True)
    for name in ("ras", "las"):
        (read,) = read_nifti(tmp_path / f"{name}.nii.gz")
        np.testing.assert_array_equal(read.values, volume)
        assert read.spacing == (3.0, 1.0, 2.0)
    series = np.random.default_rng(1).normal(size=(4, 4, 3, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "4d.nii")
    assert len(read_nifti(tmp_path / "4d.nii")) == 2


@pytest.mark.parametrize("data,reason", [
    (np.zeros((4, 4), np.float32), "3D or 4D"),
    (np.full((3, 3, 3), np.nan, np.float32), "NaN"),
])
def test_bad_nifti(tmp_path, data, reason):
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "bad.nii.gz")
    with pytest.raises(ReadError, match=f"bad.nii.gz: .*{reason}"):
        read_nifti(tmp_path / "bad.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "bad.nii.gz").read_bytes()[:40])
    with pytest.raises(ReadError, match="cut.nii.gz"):
        read_nifti(tmp_path / "cut.nii.gz")


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
