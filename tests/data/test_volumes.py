"""The one volume module (dex.data.volumes): DICOM series and multi-frame objects of every acquisition orientation
brought to the display layout NIfTI gets, the source grid as its exact inverse, the gap-tolerant read of curation;
and one sagittally acquired CT, as DICOM and as NIfTI, giving the same axial slices in curation, task import and
prediction. Real files: the shared CT series, pydicom's and pydicom-data's CT and enhanced CT / MR."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dex.data.curation import CurateOptions, curate
from dex.data.importers import ImportOptions, import_task
from dex.data.normalize import ct_hu
from dex.data.phantoms.writers import write_nifti
from dex.data.preprocess import Preprocessing
from dex.data.readers import ReadError, group_dicom_series, read_picture
from dex.data.recipe import Recipe, Source
from dex.data.shards import iter_shard
from dex.data.stream import decode_png
from dex.data.tasks import load_task, mask_labels
from dex.data.volumes import SLICE_AXES, cut, read_dicom_volume, read_nifti, source_grid
from dex.downstream.inputs import find_inputs, read_case
from dex.downstream.predict import write_label_volume
from tests.conftest import ct_series

SHARED_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct-lung-dicom" / "images"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
AXIS_NAMES = {index: name for name, index in SLICE_AXES.items()}
L, P, S = np.eye(3)  # the LPS axes of DICOM patient space
ORIGIN = np.array([10.0, -20.0, 30.0])  # LPS mm of display voxel (0, 0, 0)


# --- a known volume, acquired in any orientation ------------------------------------------------------------------

def _display(shape=(5, 6, 7), seed=0) -> np.ndarray:
    """The truth in the display layout [Z: S->I, Y: A->P, X: R->L]: distinct values, so any misplaced voxel shows."""
    return np.random.default_rng(seed).permutation(np.prod(shape)).reshape(shape).astype(np.float32) - 500


def _axis(direction: np.ndarray) -> tuple[int, bool]:
    """The display axis an LPS direction (+-L, +-P or +-S) runs along, and whether display indices grow along it:
    X grows towards L, Y towards P, Z towards I (against S)."""
    lps_axis = int(np.flatnonzero(direction)[0])
    return 2 - lps_axis, (direction[lps_axis] > 0) == (lps_axis < 2)


def _acquire(display: np.ndarray, spacing, row, column, step):
    """``display`` as a scanner with these directions (LPS) of the rows, columns and slice steps stores it: the slices
    [K, rows, columns], each slice's Image Position (Patient), the Image Orientation and the Pixel Spacing."""
    axes = [_axis(np.asarray(v)) for v in (step, column, row)]  # of the stored axes k, i (row), j (column)
    stored = display.transpose([d for d, _ in axes])[tuple(slice(None, None, 1 if grows else -1) for _, grows in axes)]

    def position(k: int) -> np.ndarray:  # LPS mm of the stored voxel (k, 0, 0)
        index = [0, 0, 0]
        for (d, grows), t, n in zip(axes, (k, 0, 0), stored.shape):
            index[d] = t if grows else n - 1 - t
        z, y, x = index
        return ORIGIN + np.array([x * spacing[2], y * spacing[1], -z * spacing[0]])

    positions = [position(k) for k in range(stored.shape[0])]
    return np.ascontiguousarray(stored), positions, [*row, *column], [spacing[axes[1][0]], spacing[axes[2][0]]]


def _dataset(path: Path, sop_class: str, series: str, rows: int, columns: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.826.0.1.3680043.8.498.10", series, "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    return ds


def _write_series(folder: Path, stored, positions, orientation, pixel_spacing, series="1.2.826.0.1.3680043.8.498.11"):
    """One file per slice, named in a shuffled order (the reader must sort by position); returns the files by k."""
    folder.mkdir(parents=True, exist_ok=True)
    names = np.random.default_rng(1).permutation(len(stored))
    files = []
    for k, (pixels, position) in enumerate(zip(stored, positions)):
        ds = _dataset(folder / f"{names[k]:03d}.dcm", CT_IMAGE, series, *pixels.shape)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [float(v) for v in position], orientation
        ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = pixel_spacing, "1", "0"
        ds.PixelData = pixels.astype(np.int16).tobytes()
        ds.save_as(folder / f"{names[k]:03d}.dcm", enforce_file_format=True)
        files.append(folder / f"{names[k]:03d}.dcm")
    return files


def _write_multiframe(path: Path, stored, positions, orientation, pixel_spacing, groups: bool = True) -> None:
    """One enhanced CT object, its frames in a shuffled order, each stored less its own Rescale Intercept and placed by
    its own Plane Position (the orientation and pixel measures shared); without ``groups``, no functional groups."""
    order = np.random.default_rng(2).permutation(len(stored))
    ds = _dataset(path, ENHANCED_CT_IMAGE, "1.2.826.0.1.3680043.8.498.12", *stored.shape[1:])
    ds.NumberOfFrames = len(stored)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = orientation
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = pixel_spacing
    frames = []
    for k in order:
        frame = Dataset()
        frame.PlanePositionSequence = [Dataset()]
        frame.PlanePositionSequence[0].ImagePositionPatient = [float(v) for v in positions[k]]
        frame.PixelValueTransformationSequence = [Dataset()]
        frame.PixelValueTransformationSequence[0].RescaleSlope = "1"
        frame.PixelValueTransformationSequence[0].RescaleIntercept = str(10 * k)
        frames.append(frame)
    if groups:
        ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = [shared], frames
    ds.PixelData = np.stack([stored[k] - (10 * k if groups else 0) for k in order]).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _tags_affine(row, column, positions, pixel_spacing) -> np.ndarray:
    """The RAS affine of the stored grid (column, row, slice k) from the tags, as a DICOM to NIfTI converter writes
    it."""
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = np.asarray(row) * pixel_spacing[1], np.asarray(column) * pixel_spacing[0]
    lps[:3, 2], lps[:3, 3] = positions[1] - positions[0], positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


SPACING = (3.0, 1.0, 2.0)  # (z, y, x) mm
EXPECTED_AFFINE = np.array([[0, 0, -SPACING[2], -ORIGIN[0]], [0, -SPACING[1], 0, -ORIGIN[1]],
                            [-SPACING[0], 0, 0, ORIGIN[2]], [0, 0, 0, 1]])  # display (z, y, x) -> RAS

#: (rows along, columns along, slices stepping along), LPS: the three acquisition planes, every axis flipped at least
#: once, and an in-plane transposition.
ACQUISITIONS = {
    "axial": (L, P, -S), "axial ascending": (L, P, S), "axial rows flipped": (-L, P, -S),
    "axial columns flipped": (L, -P, S), "coronal": (L, -S, P), "sagittal": (P, -S, L),
    "sagittal flipped": (-P, S, -L), "axial transposed": (P, L, S),
}


@pytest.mark.parametrize("acquisition", ACQUISITIONS)
def test_every_acquisition_orientation_reads_as_its_nifti_does(tmp_path, acquisition):
    display = _display()
    row, column, step = ACQUISITIONS[acquisition]
    stored, positions, orientation, pixel_spacing = _acquire(display, SPACING, row, column, step)
    files = _write_series(tmp_path / "series", stored, positions, orientation, pixel_spacing)
    volume = read_dicom_volume(files)
    np.testing.assert_array_equal(volume.values, display)
    assert volume.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(volume.meta["affine"], EXPECTED_AFFINE, atol=1e-9)
    # the same grid and geometry as NIfTI, reoriented by nibabel
    image = nib.Nifti1Image(stored.transpose(2, 1, 0), _tags_affine(row, column, positions, pixel_spacing))
    canonical = np.asarray(nib.as_closest_canonical(image).dataobj)
    np.testing.assert_array_equal(canonical.transpose(2, 1, 0)[::-1, ::-1, ::-1], display)
    nib.save(image, tmp_path / "same.nii.gz")
    (nifti,) = read_nifti(tmp_path / "same.nii.gz")
    np.testing.assert_array_equal(nifti.values, display)
    np.testing.assert_allclose(nifti.meta["affine"], volume.meta["affine"], atol=1e-5)
    # the source grid: column, row, slice, the slices descending along the normal; display -> grid is exact
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort([-float(np.dot(normal, p)) for p in positions])
    np.testing.assert_array_equal(source_grid(volume.values, volume.meta["source_affine"]),
                                  stored[order].transpose(2, 1, 0))
    assert volume.slice_files == tuple(files[k] for k in order)
    slice_axis, grows = _axis(np.asarray(step))
    for axis in SLICE_AXES.values():  # a cut along the slices names its file, any other cut none
        for index in range(display.shape[axis]):
            expected = files[index if grows else len(files) - 1 - index] if axis == slice_axis else None
            assert volume.slice_file(AXIS_NAMES[axis], index) == expected


def test_a_multiframe_object_is_placed_by_its_functional_groups(tmp_path):
    display = _display(seed=3)
    stored, positions, orientation, pixel_spacing = _acquire(display, SPACING, *ACQUISITIONS["sagittal"])
    _write_multiframe(tmp_path / "enhanced.dcm", stored, positions, orientation, pixel_spacing)
    volume = read_dicom_volume([tmp_path / "enhanced.dcm"])  # per-frame position and rescale
    np.testing.assert_array_equal(volume.values, display)
    np.testing.assert_allclose(volume.meta["affine"], EXPECTED_AFFINE, atol=1e-9)
    assert volume.spacing == pytest.approx(SPACING) and volume.slice_files == ()
    _write_multiframe(tmp_path / "bare.dcm", stored, positions, orientation, pixel_spacing, groups=False)
    with pytest.raises(ReadError, match="bare.dcm: .*Image Position and Orientation"):
        read_dicom_volume([tmp_path / "bare.dcm"])
    bare = read_dicom_volume([tmp_path / "bare.dcm"], strict=False)  # no geometry: as stored, frame by frame
    order = np.random.default_rng(2).permutation(len(stored))
    np.testing.assert_array_equal(bare.values, stored[order])
    assert "affine" not in bare.meta


def test_an_enhanced_object_is_predicted_as_a_volume_and_its_labels_go_back_to_its_grid(tmp_path):
    display = _display(seed=5)
    stored, positions, orientation, pixel_spacing = _acquire(display, SPACING, *ACQUISITIONS["coronal"])
    _write_multiframe(tmp_path / "enhanced.dcm", stored, positions, orientation, pixel_spacing)
    errors = []
    (entry,) = find_inputs([tmp_path / "enhanced.dcm"], errors)
    case = read_case(entry, Preprocessing(size=32, modality="CT", volume_normalization="ct_hu", slice_axis="axial"))
    assert not errors and case.dicom_files == () and len(case.pictures) == display.shape[0]  # axial, not its frames
    np.testing.assert_array_equal(case.volume.values, display)
    labels = (display > -400).astype(np.uint8)
    write_label_volume(labels, case, tmp_path / "labels.nii.gz")  # in the object's own grid, with its affine
    (written,) = read_nifti(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(written.values, labels)
    np.testing.assert_allclose(written.meta["affine"], EXPECTED_AFFINE, atol=1e-5)


def test_real_enhanced_ct_and_mr():
    path = Path(get_testdata_file("eCT_Supplemental.dcm"))  # two axial frames, rows mirrored (orientation -1, 0, 0)
    ds = pydicom.dcmread(path)
    volume = read_dicom_volume([path])
    frames = ds.pixel_array.astype(np.float32) - 1024.0  # the shared Pixel Value Transformation
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    expected = frames[np.argsort(z)[::-1]][:, :, ::-1]  # superior frame first, columns patient right to left
    np.testing.assert_array_equal(volume.values, expected)
    assert volume.spacing == pytest.approx((abs(z[1] - z[0]), 0.388672, 0.388672))
    path = Path(get_testdata_file("emri_small.dcm"))  # enhanced MR whose functional groups were removed
    with pytest.raises(ReadError, match="emri_small.dcm"):
        read_dicom_volume([path])
    stored = read_dicom_volume([path], strict=False)
    np.testing.assert_array_equal(stored.values, pydicom.dcmread(path).pixel_array.astype(np.float32))


# --- curation's reading: gaps, bad files, no geometry ------------------------------------------------------------

def test_a_gap_is_refused_when_strict_and_kept_around_for_curation(tmp_path):
    ct_series(tmp_path / "series", "slice", "1.2.826.0.1.3680043.8.498.13", 6, 0)
    full = read_dicom_volume(sorted((tmp_path / "series").glob("*.dcm")))
    (tmp_path / "series" / "slice_2.dcm").unlink()
    (tmp_path / "series" / "slice_4.dcm").write_bytes(b"not DICOM")
    files = sorted((tmp_path / "series").glob("*.dcm"))
    with pytest.raises(ReadError, match="slice_4.dcm: not a readable DICOM"):
        read_dicom_volume(files, strict=False)
    unreadable = []
    with pytest.raises(ReadError, match="series: the slices are not evenly spaced"):
        read_dicom_volume(files, unreadable)
    unreadable = []
    kept = read_dicom_volume(files, unreadable, strict=False)
    assert [Path(p.path).name for p in unreadable] == ["slice_4.dcm"]
    np.testing.assert_array_equal(kept.values, full.values[[0, 1, 3, 5]])
    assert [f.name for f in kept.slice_files] == ["slice_0.dcm", "slice_1.dcm", "slice_3.dcm", "slice_5.dcm"]
    assert kept.spacing[0] == pytest.approx(2.0)  # the median gap


def test_a_series_without_geometry_is_taken_as_stored(tmp_path):
    ct_series(tmp_path / "series", "slice", "1.2.826.0.1.3680043.8.498.14", 3, 0)
    files = sorted((tmp_path / "series").glob("*.dcm"))
    placed = read_dicom_volume(files)
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        ds.save_as(path)
    with pytest.raises(ReadError, match="series: a volume needs two or more slices .*with Image Position"):
        read_dicom_volume(files)
    stored = read_dicom_volume(files[::-1], strict=False)  # in the order given: file order
    np.testing.assert_array_equal(stored.values, placed.values[::-1])
    assert "affine" not in stored.meta and stored.slice_file("axial", 0) == files[-1]
    assert stored.slice_file("coronal", 0) is None
    one = read_dicom_volume([Path(get_testdata_file("CT_small.dcm"))], strict=False)  # one slice: its own plane
    assert one.values.shape == (1, 128, 128)


# --- the readers of a series or NIfTI as they were (moved from test_readers.py) ---------------------------------

@pytest.mark.skipif(not SHARED_CT.is_dir(), reason="shared data not present")
def test_real_ct_series_sorted_by_position_in_hounsfield_units_and_placed_in_patient_space():
    files = sorted(SHARED_CT.rglob("*.dcm"))
    assert len(group_dicom_series(files)) == 1
    volume = read_dicom_volume(files[::-1])  # file order must not matter
    assert volume.values.shape == (64, 512, 512)
    assert volume.spacing == pytest.approx((5.0, 0.841796875, 0.841796875))
    assert volume.values.min() == -1024 and volume.values.max() == 2976  # stored 0..4000, intercept -1024
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    top = int(np.argmax([float(h.ImagePositionPatient[2]) for h in headers]))  # the first slice: the most superior
    stored = pydicom.dcmread(files[top]).pixel_array.astype(np.float32) - 1024
    np.testing.assert_array_equal(volume.values[0], stored)
    assert volume.meta["modality"] == "CT" and volume.meta["units"] == "HU"
    position, (rows, columns) = headers[top].ImagePositionPatient, (float(v) for v in headers[0].PixelSpacing)
    lps = [position[0] + 30 * columns, position[1] + 20 * rows, position[2] - 10 * 5.0]
    np.testing.assert_allclose(volume.meta["affine"] @ [10, 20, 30, 1.0], [-lps[0], -lps[1], lps[2], 1.0], atol=1e-6)
    np.testing.assert_array_equal(read_dicom_volume(files, [], strict=False).values, volume.values)


def test_pydicom_ct_applies_rescale():
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    volume = read_dicom_volume([path], strict=False)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.values[0], expected)


def test_truncated_and_foreign_dicom_name_the_file(tmp_path):
    with pytest.raises(ReadError, match="MR_truncated.dcm"):
        read_dicom_volume([Path(get_testdata_file("MR_truncated.dcm"))])
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(ReadError, match="empty.dcm: not a readable DICOM"):
        read_dicom_volume([empty])
    png = tmp_path / "image.dcm"
    Image.new("L", (4, 4)).save(png, format="PNG")
    with pytest.raises(ReadError, match="image.dcm"):
        read_dicom_volume([png])


def test_series_with_mismatched_slices_is_refused(tmp_path):
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ct.save_as(tmp_path / "a.dcm")
    mr.SeriesInstanceUID = ct.SeriesInstanceUID
    mr.save_as(tmp_path / "b.dcm")
    assert (ct.Rows, ct.Columns) != (mr.Rows, mr.Columns)
    for strict in (True, False):
        with pytest.raises(ReadError, match="differ in size"):
            read_dicom_volume([tmp_path / "a.dcm", tmp_path / "b.dcm"], strict=strict)


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


# --- one sagittal CT, as DICOM and as NIfTI: the same axial slices everywhere --------------------------------------

def _body(shape=(10, 24, 20), seed=4) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like display-layout volume in HU (an ellipsoid body in air, an organ, noise) and its labels."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]] / (np.array(shape)[:, None, None, None] - 1) - 0.5
    body = (z / 0.7) ** 2 + (y / 0.45) ** 2 + (x / 0.4) ** 2 < 1
    organ = ((y - 0.1) / 0.15) ** 2 + ((x + 0.1) / 0.12) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + 120.0 * (body & organ) + np.random.default_rng(seed).normal(0, 20, shape)
    return np.round(hu).astype(np.float32), (body.astype(np.uint8) + (body & organ))


@pytest.fixture()
def sagittal_ct(tmp_path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """The body acquired sagittally (rows along P, columns along I, slices stepping along L: Image Orientation
    [0, 1, 0, 0, 0, -1]) as a DICOM series ``dicom/sag``, and the same voxels as ``nifti/sag.nii.gz``, stored as the
    series stores them with the affine of its tags; with the body's HU and labels in the display layout."""
    hu, labels = _body()
    stored, positions, orientation, pixel_spacing = _acquire(hu, SPACING, *ACQUISITIONS["sagittal"])
    assert orientation == [0, 1, 0, 0, 0, -1] and positions[1][0] - positions[0][0] == SPACING[2]
    _write_series(tmp_path / "dicom" / "sag", stored, positions, orientation, pixel_spacing)
    (tmp_path / "nifti").mkdir()
    nib.save(nib.Nifti1Image(stored.transpose(2, 1, 0).astype(np.int16), _tags_affine(
        *ACQUISITIONS["sagittal"][:2], positions, pixel_spacing)), tmp_path / "nifti" / "sag.nii.gz")
    return tmp_path / "dicom", tmp_path / "nifti" / "sag.nii.gz", hu, labels


def test_a_sagittal_series_and_its_nifti_curate_to_the_same_axial_slices(tmp_path, sagittal_ct):
    dicom, _, hu, _ = sagittal_ct
    sources = [Source("dcm", "CT", "dicom", "dicom", "ct_hu", pattern="**/*.dcm"),
               Source("nii", "CT", "nifti", "nifti", "ct_hu", pattern="*.nii.gz"),
               Source("dcm-sagittal", "CT", "dicom", "dicom", "ct_hu", pattern="**/*.dcm", slice_axis="sagittal")]
    Recipe("sagittal", sources).save(tmp_path / "recipe.yaml")
    curate(tmp_path / "recipe.yaml", tmp_path / "out", options=CurateOptions(min_size=8, dedup_distance=0),
           progress=False)
    with open(tmp_path / "out" / "private" / "paths.csv", newline="") as handle:
        where = {row["key"]: row for row in csv.DictReader(handle)}
    images = {}
    for shard in sorted((tmp_path / "out" / "shards").glob("*.tar")):
        for key, parts in iter_shard(shard):
            origin = where[key]
            images[origin["source"], origin["where"] or origin["path"]] = decode_png(parts["png"])[0].numpy()
    axial = {w: image for (source, w), image in images.items() if source == "dcm"}
    assert axial and axial.keys() == {w for (source, w) in images if source == "nii"}
    for name, image in axial.items():  # "axial slice 3": cut across the sagittal files, named by number
        assert image.shape == hu.shape[1:]
        np.testing.assert_array_equal(image, images["nii", name])
        np.testing.assert_allclose(image, ct_hu(hu[int(name.rsplit(" ", 1)[1])]), atol=1 / 65535)
    files = sorted((dicom / "sag").glob("*.dcm"), key=lambda f: pydicom.dcmread(f).ImagePositionPatient[0])
    sagittal = {w: image for (source, w), image in images.items() if source == "dcm-sagittal"}
    assert sagittal  # cut along its own slices, each named by its file: x grows towards L, as the positions do
    for name, image in sagittal.items():
        x = [f.name for f in files].index(Path(name).name)
        np.testing.assert_allclose(image, ct_hu(hu[:, :, x]), atol=1 / 65535)


def test_a_sagittal_series_and_its_nifti_import_to_the_same_axial_slices(tmp_path, sagittal_ct):
    dicom, nifti, hu, labels = sagittal_ct
    images, truth = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    truth.mkdir()
    (dicom / "sag").rename(images / "dcm")
    nifti.rename(images / "nii.nii.gz")
    for name in ("dcm", "nii"):  # a label volume drawn on the image: stored as it is, with its affine
        nib.save(nib.Nifti1Image(_acquire(labels, SPACING, *ACQUISITIONS["sagittal"])[0].transpose(2, 1, 0),
                                 nib.load(images / "nii.nii.gz").affine), truth / f"{name}.nii.gz")
    summary = import_task("volumes", images, tmp_path / "task", ImportOptions(
        modality="CT", labels=str(truth), classes=["background", "body", "organ"], slices="all"))
    assert not summary.problems and summary.images == 2 * hu.shape[0]
    task = load_task(tmp_path / "task")
    for z in range(hu.shape[0]):
        dcm, nii = read_picture(task.images[f"dcm_{z:04d}"]), read_picture(task.images[f"nii_{z:04d}"])
        np.testing.assert_array_equal(dcm.pixels, nii.pixels)
        np.testing.assert_allclose(dcm.pixels / 65535.0, ct_hu(hu[z]), atol=0.5 / 65535)
        np.testing.assert_array_equal(mask_labels(task, f"dcm_{z:04d}"), labels[z])
        np.testing.assert_array_equal(mask_labels(task, f"nii_{z:04d}"), labels[z])


@pytest.mark.parametrize("axis", SLICE_AXES)
def test_a_sagittal_series_and_its_nifti_are_predicted_on_the_same_slices(sagittal_ct, axis):
    dicom, nifti, hu, _ = sagittal_ct
    preprocessing = Preprocessing(size=32, modality="CT", volume_normalization="ct_hu", slice_axis=axis)
    errors = []
    series, volume = (read_case(entry, preprocessing) for entry in find_inputs([dicom, nifti], errors))
    assert not errors and len(series.dicom_files) == hu.shape[2] and volume.dicom_files == ()
    assert len(series.pictures) == len(volume.pictures) == hu.shape[SLICE_AXES[axis]]
    for (i, a), (j, b) in zip(series.pictures, volume.pictures):
        assert i == j
        np.testing.assert_array_equal(a.pixels, b.pixels)
        np.testing.assert_allclose(a.pixels / 65535.0, ct_hu(cut(hu, i, axis)), atol=0.5 / 65535)
    np.testing.assert_allclose(series.volume.meta["affine"], volume.volume.meta["affine"], atol=1e-5)
