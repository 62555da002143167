"""dex predict and dex embed on NIfTI volumes and DICOM series: the geometry of what they write (shape, affine,
orientation, position order), the reuse of task import's slicing, DICOM Segmentation objects, modality checks,
and metrics against ground truth."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scipy import ndimage
from scipy.spatial.distance import cdist

from dex.cli import main
from dex.data.importers import ImportOptions, import_task
from dex.data.preprocess import Preprocessing
from dex.data.readers import read_label_map
from dex.data.tasks import load_task
from dex.data.volumes import read_nifti, read_volume, source_grid
from dex.downstream.embed import embed
from dex.downstream.finetune import task_preprocessing
from dex.downstream.metrics import segmentation_case_metrics
from dex.downstream.predict import predict
from dex.downstream.task_model import TaskModel, build_network
from dex.models import DEXViT

SHARED_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct-lung-dicom" / "images"
ARCH = "dex_vit_tiny_patch16_256"
ARGS = dict(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=2, top_k=1)
CLASSES = ["background", "body", "organ"]


def _model(folder: Path, task_type: str = "segmentation", classes=CLASSES, **preprocessing) -> Path:
    """A task model with random weights (its predictions follow the image: enough to test where they go)."""
    torch.manual_seed(0)
    network = build_network(task_type, len(classes), ARCH, ARGS)
    settings = {"size": 32, "modality": "CT", "volume_normalization": "ct_hu", **preprocessing}
    TaskModel(network, task_type, classes, Preprocessing(**settings), ARCH, ARGS).save(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("volume-models")
    return {"segmentation": _model(root / "seg"), "classification": _model(root / "cls", "classification",
                                                                           ["normal", "abnormal"])}


def _ct(shape=(12, 40, 48), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume in HU ([I, J, K] voxel order of a NIfTI file) and its labels (0 air, 1 body, 2 organ)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.mgrid[: shape[0], : shape[1], : shape[2]]
    centre = np.array(shape) / 2
    body = (((i - centre[0]) / (0.45 * shape[0])) ** 2 + ((j - centre[1]) / (0.4 * shape[1])) ** 2
            + ((k - centre[2]) / (0.45 * shape[2])) ** 2) < 1
    organ = (((j - 0.4 * shape[1]) / 6) ** 2 + ((k - 0.6 * shape[2]) / 7) ** 2 < 1) & body
    hu = np.where(body, 40.0, -900.0) + np.where(organ, 150.0, 0.0) + rng.normal(0, 15, shape)
    return hu.astype(np.int16), (body.astype(np.uint8) + organ.astype(np.uint8))


OBLIQUE = np.array([[0.0, 0.92, 0.12, -20.0], [-0.8, 0.0, 0.05, 10.0], [0.03, -0.1, 2.5, 30.0], [0, 0, 0, 1]])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("affine", [np.diag([0.8, 0.8, 2.5, 1.0]), OBLIQUE,
                                    np.array([[0, 0, -2.0, 30], [0.7, 0, 0, -5], [0, -0.9, 0, 12], [0, 0, 0, 1]])])
def test_source_grid_inverts_the_display_reorientation(tmp_path, affine):
    values = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(values, affine), tmp_path / "v.nii.gz")
    volume = read_nifti(tmp_path / "v.nii.gz")[0]
    assert volume.meta["source_shape"] == (5, 6, 7)
    np.testing.assert_allclose(volume.meta["source_affine"], affine, atol=1e-5)
    np.testing.assert_array_equal(source_grid(volume.values, volume.meta["source_affine"]), values)


def test_a_volume_is_sliced_and_predicted_exactly_as_its_imported_task_slices(tmp_path, models):
    hu, labels = _ct()
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(hu, OBLIQUE), tmp_path / "images" / "case.nii.gz")
    nib.save(nib.Nifti1Image(labels, OBLIQUE), tmp_path / "labels" / "case.nii.gz")
    task = import_task("volumes", tmp_path / "images", tmp_path / "task",
                       ImportOptions(modality="CT", labels=str(tmp_path / "labels"), slices="all", classes=CLASSES)).out
    recorded = task_preprocessing(Preprocessing(size=32), load_task(task))  # what dex finetune on it keeps
    assert (recorded.modality, recorded.volume_normalization, recorded.slice_axis) == ("CT", "ct_hu", "axial")
    predict(models["segmentation"], [tmp_path / "images"], tmp_path / "volume")
    predict(models["segmentation"], [task], tmp_path / "slices", split="all")
    written = nib.load(tmp_path / "volume" / "masks" / "case.nii.gz")
    assert written.shape == hu.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, OBLIQUE, atol=1e-5)
    display = read_nifti(tmp_path / "volume" / "masks" / "case.nii.gz")[0].values
    cases = {row["id"]: int(row["slice"]) for row in _rows(task / "cases.csv")}
    assert len(cases) == display.shape[0]
    for item, z in cases.items():
        np.testing.assert_array_equal(read_label_map(tmp_path / "slices" / "masks" / f"{item}.png"), display[z])
    # the task folder input is scored against its masks: the same labels give the same Dice as the volume's 2D cuts
    metrics = json.loads((tmp_path / "slices" / "metrics.json").read_text())
    assert metrics["cases"] == len(cases) and set(metrics["dice"]) == {"body", "organ"}
    assert len(np.unique(display)) > 1  # the check above is not one of constant maps


def test_a_reoriented_volume_gives_the_same_labels_in_space(tmp_path, models):
    hu, _ = _ct()
    image = nib.Nifti1Image(hu, OBLIQUE)
    reoriented = image.as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))  # axes permuted, two flipped
    assert reoriented.shape != image.shape
    nib.save(image, tmp_path / "a.nii.gz")
    nib.save(reoriented, tmp_path / "b.nii")
    predict(models["segmentation"], [tmp_path / "a.nii.gz", tmp_path / "b.nii"], tmp_path / "out")
    a, b = (nib.load(tmp_path / "out" / "masks" / f"{n}.nii.gz") for n in "ab")
    assert a.shape == image.shape and b.shape == reoriented.shape
    np.testing.assert_allclose(b.affine, reoriented.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(b.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(b.affine), nib.orientations.io_orientation(a.affine))).dataobj),
        np.asarray(a.dataobj))


def _oblique_series(folder: Path, count: int = 6, modality: str = "CT") -> list[Path]:
    """``count`` slices of pydicom's real CT slice as one oblique series, slice k at origin + 3 mm * k * normal."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True)
    angle = np.deg2rad(20)
    row, column = np.array([np.cos(angle), np.sin(angle), 0.0]), np.array([0.0, 0.0, -1.0])  # a tilted coronal
    normal = np.cross(row, column)
    uid, paths = generate_uid(), []
    for k in range(count):
        ds = template.copy()
        ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = modality, uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [float(v) for v in (*row, *column)]
        ds.ImagePositionPatient = [float(v) for v in np.array([-40.0, 12.0, 80.0]) + 3.0 * k * normal]
        ds.PixelSpacing = [0.7, 0.6]
        ds.InstanceNumber = count - k
        ds.PixelData = np.roll(template.pixel_array, 9 * k, axis=(0, 1)).tobytes()
        paths.append(folder / f"slice{k}.dcm")
        ds.save_as(paths[-1])
    return paths


def test_a_dicom_series_is_placed_by_its_geometry_whatever_its_file_names_and_order(tmp_path, models):
    paths = _oblique_series(tmp_path / "series")
    shuffled = tmp_path / "shuffled"
    order = list(range(len(paths)))
    random.Random(3).shuffle(order)
    for n, k in enumerate(order):  # names that sort in another order, in nested folders, no suffix
        target = shuffled / f"sub{n % 2}" / f"{9 - n:02d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths[k], target)
    predict(models["segmentation"], [tmp_path / "series"], tmp_path / "a")
    predict(models["segmentation"], [shuffled], tmp_path / "b", dicom_seg=True)
    a = nib.load(tmp_path / "a" / "masks" / "series.nii.gz")
    b = nib.load(tmp_path / "b" / "masks" / "shuffled.nii.gz")
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    assert a.shape == (128, 128, len(paths))  # (column, row, slice)
    # the in-plane axes and origin as nibabel's DICOM wrapper gives them (voxels row, column; LPS), slices in
    # position order: source slice 0 is the file farthest along the normal (the last one written)
    first = pydicom.dcmread(paths[-1])
    with pytest.warns(UserWarning, match="experimental"):  # nibabel's reader says so; its geometry is tested
        from nibabel.nicom import dicomwrappers
    reference = np.diag([-1.0, -1.0, 1.0, 1.0]) @ dicomwrappers.wrapper_from_data(first).affine
    np.testing.assert_allclose(a.affine[:3, 0], reference[:3, 1], atol=1e-5)
    np.testing.assert_allclose(a.affine[:3, 1], reference[:3, 0], atol=1e-5)
    np.testing.assert_allclose(a.affine[:3, 3], reference[:3, 3], atol=1e-4)
    second = np.diag([-1.0, -1.0, 1.0]) @ np.array(pydicom.dcmread(paths[-2]).ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(a.affine[:3, 2], second - a.affine[:3, 3], atol=1e-4)
    # the DICOM Segmentation object holds the same labels, frame by frame, for the source instances
    seg = hd.seg.segread(tmp_path / "b" / "masks" / "shuffled.seg.dcm")
    labels = np.asarray(b.dataobj)
    for k, path in enumerate(reversed(paths)):
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        frame = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2], combine_segments=True)[0]
        np.testing.assert_array_equal(frame, labels[:, :, k].T)
    assert seg.PatientID == first.PatientID and seg.Modality == "SEG"


def test_dicom_of_another_modality_and_a_broken_file_go_to_errors_and_the_rest_carries_on(tmp_path, models, capsys):
    _oblique_series(tmp_path / "in" / "mr", modality="MR")
    _oblique_series(tmp_path / "in" / "ct")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a volume")
    status = main(["predict", str(models["segmentation"]), str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert status == 3 and "2 inputs could not be read" in capsys.readouterr().err
    errors = {Path(row["input"]).name: row["reason"] for row in _rows(tmp_path / "out" / "errors.csv")}
    assert errors["mr"] == "DICOM modality MR (MR) is not the model's (CT)"
    assert "not a readable NIfTI file" in errors["broken.nii.gz"]
    assert [row["mask"] for row in _rows(tmp_path / "out" / "predictions.csv")] == ["masks/ct.nii.gz"]


def test_classification_of_a_volume_has_a_row_per_slice_and_their_mean(tmp_path, models):
    hu, _ = _ct()
    nib.save(nib.Nifti1Image(hu, OBLIQUE), tmp_path / "case.nii.gz")
    (tmp_path / "labels.csv").write_text("id,label\ncase,abnormal\n")
    predict(models["classification"], [tmp_path / "case.nii.gz"], tmp_path / "out", batch_size=5,
            labels=tmp_path / "labels.csv")
    rows = _rows(tmp_path / "out" / "predictions.csv")
    slices, total = rows[:-1], rows[-1]
    depth = read_nifti(tmp_path / "case.nii.gz")[0].values.shape[0]
    assert [r["slice"] for r in slices] == [str(z) for z in range(depth)]
    assert total["slice"] == "all"
    mean = np.mean([[float(r["p_normal"]), float(r["p_abnormal"])] for r in slices], axis=0)
    np.testing.assert_allclose([float(total["p_normal"]), float(total["p_abnormal"])], mean, atol=2e-6)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["cases"] == 1 and metrics["accuracy"] == float(total["predicted"] == "abnormal")


def test_volume_metrics_against_label_volumes_match_direct_formulas(tmp_path, models):
    hu, _ = _ct()
    nib.save(nib.Nifti1Image(hu, OBLIQUE), tmp_path / "case_0000.nii.gz")
    predict(models["segmentation"], [tmp_path / "case_0000.nii.gz"], tmp_path / "first")
    predicted = read_nifti(tmp_path / "first" / "masks" / "case_0000.nii.gz")[0].values.astype(np.int64)
    truth = np.roll(predicted, 1, axis=1)  # the truth one voxel off along y
    (tmp_path / "labels").mkdir()
    grid = source_grid(truth.astype(np.uint8), OBLIQUE)
    nib.save(nib.Nifti1Image(grid, OBLIQUE), tmp_path / "labels" / "case.nii.gz")  # nnU-Net naming
    predict(models["segmentation"], [tmp_path / "case_0000.nii.gz"], tmp_path / "out", labels=tmp_path / "labels")
    rows = {row["class"]: row for row in _rows(tmp_path / "out" / "metrics.csv")}
    spacing = read_nifti(tmp_path / "case_0000.nii.gz")[0].spacing
    for value, name in enumerate(CLASSES[1:], start=1):
        p, t = predicted == value, truth == value
        dice = 2 * (p & t).sum() / (p.sum() + t.sum())
        assert float(rows[name]["dice"]) == pytest.approx(dice, abs=1e-5) and rows[name]["hd95_unit"] == "mm"
        if p.any() and t.any():
            assert float(rows[name]["hd95"]) == pytest.approx(_hd95(p, t, spacing), abs=1e-3)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["cases"] == 1
    # a truth drawn in another space is reported, not scored against a misaligned prediction
    shifted = OBLIQUE.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(grid, shifted), tmp_path / "labels" / "case.nii.gz")
    predict(models["segmentation"], [tmp_path / "case_0000.nii.gz"], tmp_path / "moved", labels=tmp_path / "labels")
    errors = _rows(tmp_path / "moved" / "errors.csv")
    assert len(errors) == 1 and "not in the space of the image" in errors[0]["reason"]
    assert _rows(tmp_path / "moved" / "metrics.csv") == []


def _hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """The symmetric 95th-percentile Hausdorff distance between the surfaces (voxels minus their erosion)."""
    def surface(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * np.asarray(spacing)

    distances = cdist(surface(a), surface(b))
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def test_segmentation_case_metrics_of_equal_and_disjoint_labels():
    a = np.zeros((6, 10, 10), np.int64)
    a[1:4, 2:5, 2:5] = 1
    dice, hd95 = segmentation_case_metrics(a, a, 3, (1.0, 1.0, 1.0))
    assert dice == [1.0, 1.0] and hd95[0] == 0.0 and np.isnan(hd95[1])  # class 2 absent from both: Dice 1
    dice, hd95 = segmentation_case_metrics(a, np.zeros_like(a), 2, (1.0, 1.0, 1.0))
    assert dice == [0.0] and np.isnan(hd95[0])


def test_embed_gives_a_row_per_slice_of_a_volume_and_a_series(tmp_path):
    encoder = DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_experts=2, top_k=1)
    import dex

    dex.save_pretrained(encoder, tmp_path / "encoder")
    hu, _ = _ct()
    nib.save(nib.Nifti1Image(hu, OBLIQUE), tmp_path / "case.nii.gz")
    _oblique_series(tmp_path / "series", count=4)
    summary = embed(str(tmp_path / "encoder"), [tmp_path / "case.nii.gz", tmp_path / "series"], tmp_path / "out",
                    batch_size=5, volume_normalization="ct_hu")
    index = _rows(tmp_path / "out" / "index.csv")
    depth = read_nifti(tmp_path / "case.nii.gz")[0].values.shape[0]
    axial = read_volume(tmp_path / "series").values.shape[0]  # a tilted coronal series: 128 axial cuts
    assert axial == 128 and summary.rows == depth + axial
    assert [r["slice"] for r in index] == [*map(str, range(depth)), *map(str, range(axial))]
    cls = np.load(tmp_path / "out" / "cls.npy")
    loaded = dex.load_pretrained(tmp_path / "encoder").eval()
    from dex.data.normalize import ct_hu

    slice_3 = torch.from_numpy(np.round(ct_hu(read_nifti(tmp_path / "case.nii.gz")[0].values[3]) * 65535) / 65535)
    preprocessing = dex.models.weights.load_preprocessing(tmp_path / "encoder")
    with torch.no_grad():
        expected = loaded.forward_features(preprocessing.to_input(slice_3[None].float())[None])[0, 0]
    np.testing.assert_allclose(cls[3], expected.numpy(), atol=1e-5)


@pytest.mark.skipif(not SHARED_CT.is_dir(), reason="shared data not present")
def test_the_real_ct_series_gets_a_label_volume_and_a_dicom_seg(tmp_path, models):
    series = next(p.parent for p in SHARED_CT.rglob("*.dcm"))
    files = sorted(series.glob("*.dcm"))
    predict(models["segmentation"], [series], tmp_path / "out", batch_size=32, dicom_seg=True)
    label = nib.load(tmp_path / "out" / "masks" / f"{series.name}.nii.gz")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert label.shape == (first.Columns, first.Rows, len(files))
    assert abs(abs(label.affine[2, 2]) - float(first.SliceThickness)) < 0.5  # axial: slices along z
    seg = hd.seg.segread(tmp_path / "out" / "masks" / f"{series.name}.seg.dcm")
    assert len(seg.get_source_image_uids()) == len(files)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == CLASSES[1:]  # one segment per foreground class
