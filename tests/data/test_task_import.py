"""Importing public release layouts as task folders: on the real tasks under shared/data rearranged into the layouts
they were released in, on the real CT series as NIfTI volumes, and on broken inputs."""

from __future__ import annotations

import csv
import io
import itertools
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from dex.cli import main
from dex.data.dedup import IMPORT_DUPLICATE_DISTANCE, IMPORT_HASH_SIZE, near_duplicate_groups, phash
from dex.data.importers import ImportOptions, Item, MaskMapping, TaskWriter, import_task
from dex.data.normalize import ct_hu
from dex.data.phantoms.writers import write_nifti
from dex.data.readers import read_picture
from dex.data.tasks import load_task, mask_labels, roi_mask, write_csv
from dex.data.volumes import read_dicom_volume, read_nifti

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not present")


def _rows(path: Path) -> dict[str, str]:
    """A two-column CSV as {first column: second column}."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {key: value for key, value in rows}


def _brain_as_released(root: Path, with_splits: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """The shared MR brain-tumour task laid out as the Kaggle release: Training|Testing/<class>/<image>."""
    source = SHARED / "mr-brain-tumour"
    labels, splits = _rows(source / "labels.csv"), _rows(source / "splits.csv")
    for image in (source / "images").iterdir():
        split = ("Training" if splits[image.stem] == "train" else "Testing") if with_splits else ""
        folder = root / split / labels[image.stem]
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(image, folder / image.name)
    return labels, splits


@needs_shared
def test_class_folders_with_split_folders_keep_labels_splits_and_bytes(tmp_path):
    labels, splits = _brain_as_released(tmp_path / "src")
    summary = import_task("class-folders", tmp_path / "src", tmp_path / "task", ImportOptions(modality="MR"))
    assert summary.images == 500 and not summary.problems and summary.splits == {"train": 400, "test": 100}
    task = load_task(tmp_path / "task")
    assert task.spec.classes == ["glioma", "meningioma", "notumor", "pituitary"]
    assert {i: task.spec.classes[c] for i, c in task.labels.items()} == labels
    assert set(task.splits["test"]) == {i for i, s in splits.items() if s == "test"}
    assert set(task.splits["train"]) | set(task.splits["val"]) == {i for i, s in splits.items() if s == "train"}
    for item in list(labels)[:20]:  # JPEGs are stored as they are, not re-encoded
        original = next((SHARED / "mr-brain-tumour" / "images").glob(f"{item}.*"))
        assert task.images[item].read_bytes() == original.read_bytes()
    assert not (tmp_path / "task.partial").exists()
    # the release puts copies of some scans in both Training and Testing (checked by eye): reported, not moved
    assert len(summary.across_splits) == 5 and ["Te-me_0096", "Tr-me_0273"] in summary.across_splits
    assert "5 group(s) lie on both sides of the source's own split" in (tmp_path / "task" / "README.md").read_text()


@needs_shared
def test_class_folders_without_splits_get_a_seeded_split_stratified_by_class(tmp_path):
    labels, _ = _brain_as_released(tmp_path / "src", with_splits=False)
    first = import_task("class-folders", tmp_path / "src", tmp_path / "a", ImportOptions(modality="MR", seed=3))
    again = import_task("class-folders", tmp_path / "src", tmp_path / "b", ImportOptions(modality="MR", seed=3))
    assert (tmp_path / "a" / "splits.csv").read_bytes() == (tmp_path / "b" / "splits.csv").read_bytes()
    assert first.splits == again.splits
    split = _rows(tmp_path / "a" / "splits.csv")
    for name in set(labels.values()):
        members = [i for i in labels if labels[i] == name]
        train = sum(split[i] == "train" for i in members)
        assert abs(train - 0.6 * len(members)) <= 1  # 60 % of every class in train


@needs_shared
def test_pairs_in_two_folders_match_the_task_loader_on_real_jpeg_masks(tmp_path):
    source = SHARED / "endoscopy-polyp-kvasir"
    options = ImportOptions(modality="endoscopy", masks=str(source / "masks"), classes=["background", "polyp"])
    summary = import_task("pairs", source / "images", tmp_path / "task", options)
    assert summary.images == 300 and not summary.problems
    imported, original = load_task(tmp_path / "task"), load_task(source)
    assert imported.spec.mask_threshold is None  # masks are stored as class indices
    for item in sorted(original.images)[:30]:
        np.testing.assert_array_equal(mask_labels(imported, item), mask_labels(original, item))
        assert set(np.unique(mask_labels(imported, item))) <= {0, 1}


@needs_shared
def test_pairs_in_one_folder_by_name_pattern_as_chase_releases_them(tmp_path):
    source, src = SHARED / "fundus-vessels-chase", tmp_path / "CHASEDB1"
    src.mkdir()
    for image in sorted((source / "images").iterdir())[:6]:
        os.symlink(image, src / image.name)
        os.symlink(source / "masks" / f"{image.stem}.png", src / f"{image.stem}_1stHO.png")
    options = ImportOptions(modality="fundus", mask_pattern="{stem}_1stHO")
    summary = import_task("pairs", src, tmp_path / "task", options)
    task, original = load_task(tmp_path / "task"), load_task(source)
    assert summary.images == 6 and sorted(task.images) == sorted(p.stem for p in (source / "images").iterdir())[:6]
    for item in task.images:
        np.testing.assert_array_equal(mask_labels(task, item), mask_labels(original, item))


@needs_shared
def test_one_binary_mask_per_class_in_class_folders_as_idrid_releases_them(tmp_path):
    source = SHARED / "fundus-vessels-chase"
    images, masks = tmp_path / "1. Original Images", tmp_path / "2. All Segmentation Groundtruths"
    images.mkdir()
    stems = sorted(p.stem for p in (source / "images").iterdir())[:4]
    expected, chase = {}, load_task(source)
    for n, stem in enumerate(stems):
        os.symlink(source / "images" / f"{stem}.jpg", images / f"{stem}.jpg")
        vessels = mask_labels(chase, stem) > 0
        expected[stem] = vessels.astype(np.int64)
        if n < 3:
            _picture(masks / "1. Vessels" / f"{stem}_VS.png", vessels.astype(np.uint8) * 255)
        disc = np.zeros(vessels.shape, bool)
        disc[100:200, 300:400] = True
        if n % 2 == 0:  # the optic disc as a red RGB TIFF, drawn over the vessels
            red = np.zeros((*vessels.shape, 3), np.uint8)
            red[disc, 0] = 255
            _picture(masks / "3. Optic Disc" / f"{stem}_OD.tif", red)
            expected[stem][disc] = 2
    options = ImportOptions(modality="fundus", masks=str(masks),
                            class_masks=["vessel=1. Vessels/{stem}_VS", "optic disc=3. Optic Disc/{stem}_OD"])
    summary = import_task("pairs", images, tmp_path / "task", options)
    task = load_task(tmp_path / "task")
    assert task.spec.classes == ["background", "vessel", "optic disc"]
    assert sorted(task.images) == stems[:3]  # the fourth has no mask of any class
    reason = f"no mask named 1. Vessels/{stems[3]}_VS or 3. Optic Disc/{stems[3]}_OD.* in {masks}"
    assert summary.problems == [(str(images / f"{stems[3]}.jpg"), reason)]
    for stem in stems[:3]:
        np.testing.assert_array_equal(mask_labels(task, stem), expected[stem])
    with pytest.raises(ValueError, match=r"expected CLASS=PATTERN with \{stem\}"):
        import_task("pairs", images, tmp_path / "bad", ImportOptions(class_masks=["vessel=vessels/VS"]))


def _picture(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_several_masks_per_image_are_merged_and_bad_items_are_recorded(tmp_path):
    src, rng = tmp_path / "busi", np.random.default_rng(0)
    for n in range(4):
        _picture(src / f"benign ({n}).png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
        first, second = np.zeros((20, 24), np.uint8), np.zeros((20, 24), np.uint8)
        first[2:6, 2:6], second[10:14, 10:14] = 255, 255
        _picture(src / f"benign ({n})_mask.png", first)
        _picture(src / f"benign ({n})_mask_1.png", second)
    _picture(src / "benign (9).png", np.zeros((20, 24), np.uint8))  # no mask
    _picture(src / "benign (7).png", np.zeros((20, 24), np.uint8))
    _picture(src / "benign (7)_mask.png", np.zeros((10, 24), np.uint8))  # wrong size
    (src / "benign (8).png").write_bytes(b"not a png")
    _picture(src / "benign (8)_mask.png", np.zeros((20, 24), np.uint8))
    code = main(["data", "import-task", "pairs", str(src), str(tmp_path / "task"), "--modality", "US",
                 "--mask-pattern", "{stem}_mask*"])
    assert code == 3  # problems, like dex curate's quarantine
    task = load_task(tmp_path / "task")
    assert sorted(task.images) == [f"benign_({n})" for n in range(4)]
    merged = mask_labels(task, "benign_(0)")
    assert merged.sum() == 32 and merged[3, 3] == 1 and merged[12, 12] == 1
    problems = _rows(tmp_path / "task" / "problems.csv")
    assert sorted(Path(p).name for p in problems) == ["benign (7).png", "benign (8).png", "benign (9).png"]
    assert "no mask named benign (9)_mask*" in problems[str(src / "benign (9).png")]
    assert "mask is 10 x 24, the image is 20 x 24" in problems[str(src / "benign (7).png")]
    assert "not a readable image" in problems[str(src / "benign (8).png")]


def test_colour_masks_through_a_value_map_and_unknown_colours(tmp_path):
    images, masks = tmp_path / "frames", tmp_path / "masks"
    colours = {"background": (0, 0, 0), "liver": (255, 0, 0), "tool": (0, 255, 0)}
    truth = {}
    for n in range(3):
        _picture(images / f"f{n}.png", np.full((8, 8, 3), 40 * n, np.uint8))
        labels = np.zeros((8, 8), np.int64)
        labels[:4, :] = 1
        labels[:, 6:] = 2
        truth[f"f{n}"] = labels
        _picture(masks / f"f{n}.png", np.array(list(colours.values()), np.uint8)[labels])
    odd = np.zeros((8, 8, 3), np.uint8)
    odd[0, 0] = (1, 2, 3)
    _picture(images / "f9.png", np.zeros((8, 8, 3), np.uint8))
    _picture(masks / "f9.png", odd)
    options = ImportOptions(modality="endoscopy", masks=str(masks), classes=list(colours),
                            mask_values=[f"{r},{g},{b}={name}" for name, (r, g, b) in colours.items()])
    summary = import_task("pairs", images, tmp_path / "task", options)
    task = load_task(tmp_path / "task")
    for item, labels in truth.items():
        np.testing.assert_array_equal(mask_labels(task, item), labels)
    assert summary.problems == [(str(masks / "f9.png"), "mask values [(1, 2, 3)] are not in the --mask-value map")]
    with pytest.raises(ValueError, match="expected VALUE=CLASS"):
        import_task("pairs", images, tmp_path / "other", ImportOptions(mask_values=["255=liver"]))
    with pytest.raises(ValueError, match="mask value '2a': give one integer or R,G,B"):
        import_task("pairs", images, tmp_path / "other", ImportOptions(mask_values=["2a=foreground"]))


@needs_shared
def test_csv_with_named_columns_and_one_hot_labels(tmp_path):
    source = SHARED / "us-breast-busi"
    labels = _rows(source / "labels.csv")
    classes = sorted(set(labels.values()))
    plain, onehot = tmp_path / "plain.csv", tmp_path / "onehot.csv"
    with open(plain, "w") as handle:
        handle.write("image_name,diagnosis\n" + "".join(f"{i}.png,{labels[i]}\n" for i in labels))
        handle.write("missing.png,benign\n")
    with open(onehot, "w") as handle:
        handle.write("image," + ",".join(classes) + "\n")
        handle.writelines(f"{i},{','.join('1.0' if c == labels[i] else '0.0' for c in classes)}\n" for i in labels)
    first = import_task("csv", plain, tmp_path / "a", ImportOptions(
        modality="US", images=str(source / "images"), id_column="image_name", label_column="diagnosis"))
    second = import_task("csv", onehot, tmp_path / "b", ImportOptions(
        modality="US", images=str(source / "images"), id_column="image", label_column="onehot:" + ",".join(classes)))
    assert first.problems == [(f"{plain}:{len(labels) + 2}", f"no image 'missing.png' in {source / 'images'}")]
    assert not second.problems
    for folder in ("a", "b"):
        task = load_task(tmp_path / folder)
        assert {i: task.spec.classes[c] for i, c in task.labels.items()} == labels
    # BUSI holds re-exported copies of the same scans: each group of them is drawn into one split
    assert len(first.duplicates) >= 50 and not first.across_splits
    split = _rows(tmp_path / "a" / "splits.csv")
    assert all(len({split[i] for i in group}) == 1 for group in first.duplicates)
    assert ["benign_1", "benign_318"] in first.duplicates
    assert (tmp_path / "a" / "splits.csv").read_bytes() == (tmp_path / "b" / "splits.csv").read_bytes()
    with pytest.raises(ValueError, match=r"no column\(s\) \['id', 'diagnosis'\]; the columns are \['image'"):
        import_task("csv", onehot, tmp_path / "c",
                    ImportOptions(images=str(source / "images"), label_column="diagnosis"))


@pytest.fixture(scope="module")
def real_ct() -> np.ndarray:
    files = sorted((SHARED / "ct-lung-dicom" / "images").rglob("*.dcm"))
    return read_dicom_volume(files).values[:, ::4, ::4]  # [64, 128, 128] HU


@needs_shared
def test_volumes_nnunet_layout_normalised_slices_split_by_case(tmp_path, real_ct):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    truth = {}
    for case in range(5):  # five cases cut from the real series, stored LAS (the reader must reorient)
        volume = np.ascontiguousarray(real_ct[case * 12: case * 12 + 12])
        label = ((volume > -500) & (volume < 100)).astype(np.uint8)  # soft tissue in the body
        label[:3] = 0  # slices without any label
        label[5][volume[5] > 300] = 2
        write_nifti(images / f"ct_{case:03d}_0000.nii.gz", volume.astype(np.float32), (5.0, 3.4, 3.4), flip_x=True)
        write_nifti(labels / f"ct_{case:03d}.nii.gz", label, (5.0, 3.4, 3.4), flip_x=True)
        truth[f"ct_{case:03d}"] = (volume, label)
    options = ImportOptions(modality="CT", labels=str(labels), classes=["background", "soft tissue", "bone"],
                            normalization="ct_hu")
    summary = import_task("volumes", images, tmp_path / "task", options)
    import_task("volumes", images, tmp_path / "threads", options, workers=2)
    for path in (tmp_path / "task").rglob("*.[pc][ns][gv]"):  # same images, masks, CSVs whatever the workers
        assert path.read_bytes() == (tmp_path / "threads" / path.relative_to(tmp_path / "task")).read_bytes()
    task = load_task(tmp_path / "task")
    assert task.spec.bit_depth == 16 and summary.images == 5 * 9 and not summary.problems
    split_of_case = {}
    for item in task.images:
        case, index = item.rsplit("_", 1)
        volume, label = truth[case]
        picture = read_picture(task.images[item])
        np.testing.assert_allclose(picture.pixels / 65535.0, ct_hu(volume[int(index)]), atol=0.5 / 65535)
        np.testing.assert_array_equal(mask_labels(task, item), label[int(index)])
        split_of_case.setdefault(case, set()).update(s for s in task.splits if item in task.splits[s])
        assert task.cases[item] == (case, int(index))
    assert all(len(s) == 1 for s in split_of_case.values())  # no case in two splits
    assert sorted(int(i.rsplit("_", 1)[1]) for i in task.images if i.startswith("ct_000")) == list(range(3, 12))
    every = import_task("volumes", images, tmp_path / "all", ImportOptions(
        modality="CT", labels=str(labels), classes=["background", "soft tissue", "bone"], slices="all", stride=4,
        axis="coronal"))
    assert every.images == 5 * 32  # 128 coronal slices, every 4th
    assert read_picture(next(iter(load_task(tmp_path / "all").images.values()))).pixels.shape == (12, 128)


@needs_shared
def test_volumes_from_a_dicom_series_line_up_with_labels_drawn_in_patient_space(tmp_path):
    """The real CT series stored mirrored (columns reversed, Image Orientation (-1, 0, 0, ...)): same anatomy, other
    pixel order. A label volume written in patient space from the original's tags must line up with it."""
    files = sorted((SHARED / "ct-lung-dicom" / "images").rglob("*.dcm"))[20:36]
    original = read_dicom_volume(files)  # standard axial: already in the display layout
    case = tmp_path / "images" / "lung_001"
    case.mkdir(parents=True)
    top = None
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
        position = [float(v) for v in ds.ImagePositionPatient]
        position[0] += (ds.Columns - 1) * float(ds.PixelSpacing[1])
        ds.ImagePositionPatient, ds.ImageOrientationPatient = position, [-1, 0, 0, 0, 1, 0]
        ds.save_as(case / path.name)
        top = position if top is None or position[2] > top[2] else top
    label = ((original.values > -500) & (original.values < 100)).astype(np.uint8)
    rows, columns = (float(v) for v in pydicom.dcmread(files[0]).PixelSpacing)
    corner = [top[0] - (original.values.shape[2] - 1) * columns, top[1], top[2]]  # LPS of display voxel (0, 0, 0)
    affine = np.array([[0, 0, -columns, -corner[0]], [0, -rows, 0, -corner[1]], [-5.0, 0, 0, corner[2]],
                       [0, 0, 0, 1]])  # display (z, y, x) -> RAS, from the tags alone
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "labels" / "lung_001.nii.gz")
    shifted = affine.copy()
    shifted[2, 3] += 5.0
    (tmp_path / "images" / "lung_002").symlink_to(case, target_is_directory=True)
    nib.save(nib.Nifti1Image(label, shifted), tmp_path / "labels" / "lung_002.nii.gz")
    summary = import_task("volumes", tmp_path / "images", tmp_path / "task", ImportOptions(
        modality="CT", labels=str(tmp_path / "labels"), slices="all", splits=None))
    reason = "label volume is not in the space of the image lung_002 (their affines differ by up to 5 mm)"
    assert summary.problems == [(str(tmp_path / "labels" / "lung_002.nii.gz"), reason)]
    task = load_task(tmp_path / "task")
    assert summary.images == 16
    for z in range(16):
        item = f"lung_001_{z:04d}"
        np.testing.assert_allclose(read_picture(task.images[item]).pixels / 65535.0, ct_hu(original.values[z]),
                                   atol=0.5 / 65535)
        np.testing.assert_array_equal(mask_labels(task, item), label[z])


def test_volume_problems_name_the_file(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_nifti(images / "a.nii.gz", np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0))
    write_nifti(labels / "a.nii.gz", np.ones((4, 8, 6), np.uint8), (1.0, 1.0, 1.0))
    write_nifti(images / "b.nii.gz", np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0))
    write_nifti(labels / "b.nii.gz", np.full((4, 8, 8), 5, np.uint8), (1.0, 1.0, 1.0))
    write_nifti(images / "c.nii.gz", np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0))
    write_nifti(labels / "c.nii.gz", np.ones((4, 8, 8), np.uint8), (1.0, 1.0, 1.0))
    write_nifti(images / "d.nii.gz", np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0))
    summary = import_task("volumes", images, tmp_path / "task", ImportOptions(labels=str(labels)))
    reasons = dict(summary.problems)
    assert "label volume is (4, 8, 6), the image a.nii.gz is (4, 8, 8)" in reasons[str(labels / "a.nii.gz")]
    assert "mask values [5] are not indices of the 2 classes" in reasons[str(labels / "b.nii.gz")]
    assert "no label volume d.nii.gz" in reasons[str(images / "d.nii.gz")]
    assert summary.images == 4


def test_volumes_write_cases_csv_and_the_loader_checks_it(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    rng = np.random.default_rng(0)
    cases = [f"liver_{n}" for n in range(5)]
    for case in cases:
        label = np.zeros((6, 8, 8), np.uint8)
        label[1:5, 2:6, 2:6] = 1
        write_nifti(images / f"{case}.nii.gz", rng.normal(0, 100, (6, 8, 8)).astype(np.float32), (1.0, 1.0, 1.0))
        write_nifti(labels / f"{case}.nii.gz", label, (1.0, 1.0, 1.0))
    import_task("volumes", images, tmp_path / "task", ImportOptions(labels=str(labels), slices="all", stride=2))
    with open(tmp_path / "task" / "cases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["case"], int(r["slice"])) for r in rows} == {(case, z) for case in cases for z in (0, 2, 4)}
    assert all(r["id"] == f"{r['case']}_{int(r['slice']):04d}" for r in rows)
    assert "`cases.csv` gives each image's case and slice index" in (tmp_path / "task" / "README.md").read_text()
    task = load_task(tmp_path / "task")
    assert task.cases == {r["id"]: (r["case"], int(r["slice"])) for r in rows} and len(task.cases) == 15
    split = {i: name for name, members in task.splits.items() for i in members}
    line, moved = next((n, r) for n, r in reversed(list(enumerate(rows, start=2)))
                       if split[r["id"]] != split[rows[0]["id"]])

    def refused(edited: list[dict[str, str]], message: str) -> None:
        write_csv(tmp_path / "task" / "cases.csv", ("id", "case", "slice"),
                  [(r["id"], r["case"], r["slice"]) for r in edited])
        with pytest.raises(ValueError, match=message):
            load_task(tmp_path / "task")

    spread = [{**r, "case": rows[0]["case"], "slice": "9"} if r is moved else r for r in rows]
    refused(spread, rf"task/cases.csv:{line}: case '{rows[0]['case']}' is in {split[rows[0]['id']]} \(line 2\) and "
                    rf"in {split[moved['id']]} \(id '{moved['id']}'\) by splits.csv; a case must lie in one split")
    refused([{**rows[0], "slice": "two"}] + rows[1:], r"task/cases.csv:2: slice 'two' is not a non-negative integer")
    refused(rows + [{"id": "nowhere", "case": "x", "slice": "0"}], "cases.csv:17: id 'nowhere' is not an image")
    refused(rows[1:], rf"task/cases.csv: no row for image '{rows[0]['id']}' \(1 image\(s\) without a case\)")
    refused(rows[:2] + [{**rows[2], "case": rows[1]["case"], "slice": rows[1]["slice"]}] + rows[3:],
            rf"cases.csv:4: slice {rows[1]['slice']} of case '{rows[1]['case']}' is already given on line 3")
    (tmp_path / "task" / "splits.csv").unlink()
    refused(rows, "task/cases.csv: a task with cases needs splits.csv")


def test_medmnist_npz_keeps_its_split_and_label_indices(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 10), ("val", 4), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, (count, 1))
    arrays["train_labels"][0] = 10
    np.savez(tmp_path / "pathmnist.npz", **arrays)
    summary = import_task("medmnist", tmp_path / "pathmnist.npz", tmp_path / "task",
                          ImportOptions(modality="pathology"))
    task = load_task(tmp_path / "task")
    assert summary.splits == {"train": 10, "val": 4, "test": 5}
    assert not task.cases and not (tmp_path / "task" / "cases.csv").exists()  # only slices of volumes have cases
    assert task.spec.classes == [str(n) for n in range(11)]  # numeric order: label 10 is class 10, not 2
    for split in ("train", "val", "test"):
        for n in range(len(arrays[f"{split}_images"])):
            item = f"{split}_{n:06d}"
            assert item in task.splits[split] and task.labels[item] == int(arrays[f"{split}_labels"][n, 0])
            np.testing.assert_array_equal(read_picture(task.images[item]).pixels, arrays[f"{split}_images"][n])
    np.savez(tmp_path / "chest.npz", train_images=arrays["train_images"], train_labels=np.zeros((10, 14)))
    with pytest.raises(ValueError, match="multi-label"):
        import_task("medmnist", tmp_path / "chest.npz", tmp_path / "chest")
    np.savez(tmp_path / "organ3d.npz", train_images=np.zeros((2, 28, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match="3D MedMNIST"):
        import_task("medmnist", tmp_path / "organ3d.npz", tmp_path / "organ3d")


def _units(count: int, stop_at: int | None = None):
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (6, 6), dtype=np.uint8) for _ in range(count)]
    for n in range(count):
        def make(problems, n=n):
            if n == stop_at:
                raise KeyboardInterrupt  # the job is killed here
            return [Item(f"i{n}", pixels[n], label="a" if n % 2 else "b")]
        yield f"unit{n}", make


def _finish(writer: TaskWriter) -> None:
    from dex.data.tasks import TaskSpec

    writer.finish(TaskSpec(name="t", type="classification", modality="x", classes=[], image_size=[0, 0], channels=1))


def test_a_killed_import_resumes_to_the_same_folder(tmp_path):
    whole = TaskWriter(tmp_path / "whole")
    whole.run(_units(12))
    _finish(whole)
    killed = TaskWriter(tmp_path / "resumed", workers=2)
    with pytest.raises(KeyboardInterrupt):
        killed.run(_units(12, stop_at=7))
    with open(tmp_path / "resumed.partial" / "journal.jsonl", "a") as handle:
        handle.write('{"unit": "unit7", "ite')  # a line cut off by the kill
    resumed = TaskWriter(tmp_path / "resumed", resume=True, workers=3)  # the number of workers changes nothing
    assert resumed.done == {f"unit{n}" for n in range(7)}
    resumed.run(_units(12))
    _finish(resumed)
    def files(folder: Path) -> list[Path]:
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())

    assert files(tmp_path / "whole") == files(tmp_path / "resumed")
    for path in files(tmp_path / "whole"):
        assert (tmp_path / "whole" / path).read_bytes() == (tmp_path / "resumed" / path).read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        TaskWriter(tmp_path / "whole")


def test_resuming_with_other_settings_is_refused(tmp_path):
    killed = TaskWriter(tmp_path / "task", settings={"layout": "pairs", "mask_pattern": "{stem}_mask"})
    with pytest.raises(KeyboardInterrupt):
        killed.run(_units(4, stop_at=2))
    with pytest.raises(ValueError, match="settings.json: the interrupted import had other settings"):
        TaskWriter(tmp_path / "task", resume=True, settings={"layout": "pairs", "mask_pattern": "{stem}_1stHO"})
    same = TaskWriter(tmp_path / "task", resume=True, settings={"layout": "pairs", "mask_pattern": "{stem}_mask"})
    assert same.done == {"unit0", "unit1"}


@pytest.mark.parametrize(("bits", "distances"), [(64, (0, 2, 3)), (256, (0, 3, IMPORT_DUPLICATE_DISTANCE))])
def test_near_duplicate_groups_equal_a_brute_force_union_of_close_pairs(bits, distances):
    rng = np.random.default_rng(0)
    base = [int.from_bytes(rng.bytes(bits // 8), "big") for _ in range(40)]
    hashes = {f"i{n}": value for n, value in enumerate(base)}
    for n in range(60):  # variants a few bits away, some chained through each other
        values = list(hashes.values())
        source = values[rng.integers(0, len(values))] if n % 3 else base[n % 40]
        flips = rng.choice(bits, size=rng.integers(0, max(distances) + 2), replace=False)
        hashes[f"v{n}"] = source ^ sum(1 << int(b) for b in flips)
    for distance in distances:
        keys = sorted(hashes)
        parent = {k: k for k in keys}

        def root(k, parent=parent):
            while parent[k] != k:
                k = parent[k]
            return k

        for a in keys:
            for b in keys:
                if (hashes[a] ^ hashes[b]).bit_count() <= distance:
                    parent[root(a)] = root(b)
        expected = {}
        for k in keys:
            expected.setdefault(root(k), []).append(k)
        expected = sorted((g for g in expected.values() if len(g) > 1), key=lambda g: g[0])
        assert near_duplicate_groups(hashes, distance, bits) == expected
        assert expected  # the case is not trivial


def _label_in_display_space(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """Write [Z, Y, X] labels as the NIfTI that :func:`read_nifti` reads back as these labels with this display
    affine (the inverse of its reorientation)."""
    x, y, z = labels.shape[::-1]
    flip = np.array([[0, 0, -1, x - 1], [0, -1, 0, y - 1], [-1, 0, 0, z - 1], [0, 0, 0, 1]], dtype=float)
    data = np.ascontiguousarray(labels[::-1, ::-1, ::-1].transpose(2, 1, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine @ np.linalg.inv(flip)), path)


def test_bad_files_in_a_dicom_case_folder_are_named_and_the_series_is_imported(tmp_path):
    from tests.conftest import ct_series

    case = tmp_path / "images/case_a"
    ct_series(case, "slice", "1.2.826.0.1.3680043.8.498.7", 4, 0)
    volume = read_dicom_volume(sorted(case.glob("*.dcm")))
    (case / "empty.dcm").write_bytes(b"")
    (case / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    labels = (volume.values > 0).astype(np.uint8)
    _label_in_display_space(tmp_path / "labels/case_a.nii.gz", labels, volume.meta["affine"])
    assert np.array_equal(read_nifti(tmp_path / "labels/case_a.nii.gz")[0].values, labels)
    summary = import_task("volumes", tmp_path / "images", tmp_path / "task",
                          ImportOptions(modality="CT", labels=str(tmp_path / "labels"), slices="all"))
    assert summary.images == 4  # the series, whole
    problems = dict(summary.problems)
    assert set(problems) == {str(case / "empty.dcm"), str(case / "garbage.dcm")}
    assert all("not a readable DICOM file" in reason for reason in problems.values())
    task = load_task(tmp_path / "task")
    assert sorted(task.cases.values()) == [("case_a", z) for z in range(4)]


def test_a_dicom_case_with_a_missing_slice_is_refused(tmp_path):
    from tests.conftest import ct_series

    for name, uid in (("case_a", "1.2.826.0.1.3680043.8.498.8"), ("case_b", "1.2.826.0.1.3680043.8.498.9")):
        ct_series(tmp_path / "images" / name, "slice", uid, 5, 0)
        volume = read_dicom_volume(sorted((tmp_path / "images" / name).glob("*.dcm")))
        _label_in_display_space(tmp_path / "labels" / f"{name}.nii.gz", np.ones(volume.values.shape, np.uint8),
                                volume.meta["affine"])
    (tmp_path / "images/case_a/slice_2.dcm").unlink()  # a gap: the geometry of the rest would misplace labels
    summary = import_task("volumes", tmp_path / "images", tmp_path / "task",
                          ImportOptions(modality="CT", labels=str(tmp_path / "labels")))
    assert summary.images == 5
    ((path, reason),) = summary.problems
    assert path == str(tmp_path / "images/case_a") and "not evenly spaced" in reason


def test_every_unreadable_mask_of_an_image_is_named(tmp_path):
    src = tmp_path / "busi"
    _picture(src / "a.png", np.zeros((20, 24), np.uint8))
    _picture(src / "a_mask.png", np.zeros((20, 24), np.uint8))
    _picture(src / "b.png", np.zeros((20, 24), np.uint8))
    (src / "b_mask.png").write_bytes(b"not a png")
    (src / "b_mask_1.png").write_bytes(b"")
    summary = import_task("pairs", src, tmp_path / "task", ImportOptions(mask_pattern="{stem}_mask*"))
    problems = dict(summary.problems)
    assert set(problems) == {str(src / "b_mask.png"), str(src / "b_mask_1.png"), str(src / "b.png")}
    assert "2 of its 2 masks could not be read" in problems[str(src / "b.png")]
    assert summary.images == 1


# --- a DRIVE-like release: LZW TIFFs, GIF masks named by leading id, field-of-view masks ---------------------------

def _grey_gif(path: Path, values: np.ndarray) -> None:
    """A GIF with a grey-ramp palette (as DRIVE's masks are stored), which Pillow reads back as these values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("P", values.shape[::-1], values.astype(np.uint8).tobytes())
    image.putpalette([v for i in range(256) for v in (i, i, i)])
    image.save(path, optimize=False)


def _drive_like(root: Path, numbers: range = range(21, 26)) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """DRIVE's training folder as released, small: ``images/NN_training.tif`` (RGB, LZW), ``1st_manual/NN_manual1.gif``
    (vessels 0 / 255) and ``mask/NN_training_mask.gif`` (the field of view, 0 / 255). Returns id -> (image, vessels
    as 0 / 1, field of view as bool)."""
    rng, out = np.random.default_rng(0), {}
    yy, xx = np.mgrid[:30, :34]
    for n in numbers:
        fov = (yy - 15) ** 2 + (xx - 17) ** 2 < (12 + n % 3) ** 2
        image = rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)
        vessels = (rng.random((30, 34)) > 0.8) & fov
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{n}_training.tif", compression="tiff_lzw")
        _grey_gif(root / "1st_manual" / f"{n}_manual1.gif", vessels * 255)
        _grey_gif(root / "mask" / f"{n}_training_mask.gif", fov * 255)
        out[f"{n}_training"] = (image, vessels.astype(np.int64), fov)
    return out


def test_a_drive_like_release_imports_with_the_modality_flag_only(tmp_path, monkeypatch):
    src = tmp_path / "DRIVE" / "training"
    expected = _drive_like(src)
    with tifffile.TiffFile(src / "images" / "21_training.tif") as tiff:  # the files are what DRIVE ships
        assert tiff.pages.first.compression == tifffile.COMPRESSION.LZW
    with Image.open(src / "1st_manual" / "21_manual1.gif") as gif:
        assert set(np.unique(np.asarray(gif))) == {0, 255}
    monkeypatch.chdir(tmp_path)  # --images, --masks and --rois are found below SRC, not here
    code = main(["data", "import-task", "pairs", str(src), "drive", "--modality", "fundus", "--images", "images",
                 "--masks", "1st_manual", "--rois", "mask", "--workers", "1"])
    assert code == 0
    task = load_task(tmp_path / "drive")
    assert sorted(task.images) == sorted(expected) and sorted(task.rois) == sorted(expected)
    assert task.spec.classes == ["background", "foreground"] and task.spec.mask_threshold is None
    for item, (image, vessels, fov) in expected.items():
        np.testing.assert_array_equal(read_picture(task.images[item]).pixels, image)  # LZW decoded, kept exactly
        np.testing.assert_array_equal(mask_labels(task, item), vessels)  # 0 / 255 became 0 / 1 with no flag
        np.testing.assert_array_equal(roi_mask(task, item), fov)
    assert "Regions of interest: `roi/<id>.png` for every image" in (tmp_path / "drive" / "README.md").read_text()


def test_a_region_of_interest_is_needed_for_every_image_and_must_fit_it(tmp_path):
    src = tmp_path / "training"
    _drive_like(src)
    (src / "mask" / "23_training_mask.gif").unlink()
    summary = import_task("pairs", src / "images", tmp_path / "task",
                          ImportOptions(modality="fundus", masks=str(src / "1st_manual"), rois=str(src / "mask")))
    assert summary.images == 4
    reason = (f"no region of interest with the leading id '23' in {src / 'mask'} (images and files are paired by "
              "the name before the first '_')")
    assert summary.problems == [(str(src / "images" / "23_training.tif"), reason)]
    (tmp_path / "task" / "roi" / "24_training.png").unlink()
    with pytest.raises(ValueError, match=r"task/roi: no region of interest for image '24_training' \(1 image\(s\) "
                                         r"without one"):
        load_task(tmp_path / "task")
    Image.fromarray(np.full((29, 34), 255, np.uint8)).save(tmp_path / "task" / "roi" / "24_training.png")
    task = load_task(tmp_path / "task")
    assert roi_mask(task, "21_training").shape == (30, 34)
    with pytest.raises(ValueError, match=r"roi/24_training.png: region of interest is 29 x 34, the image "
                                         r"24_training.png and its mask 30 x 34"):
        roi_mask(task, "24_training")
    with pytest.raises(ValueError, match="--rois mask: regions of interest are imported with the pairs layout only"):
        import_task("class-folders", src, tmp_path / "other", ImportOptions(rois="mask"))
    shutil.rmtree(tmp_path / "task" / "roi")
    task = load_task(tmp_path / "task")
    assert task.rois == {} and roi_mask(task, "21_training") is None


def test_masks_are_paired_by_leading_id_only_when_no_two_files_share_it(tmp_path):
    src = tmp_path / "training"
    _drive_like(src, range(21, 24))
    _grey_gif(src / "1st_manual" / "22_manual2.gif", np.zeros((30, 34), np.uint8))  # a second observer's tracing
    with pytest.raises(ValueError, match=r"no image could be imported") as caught:
        import_task("pairs", src, tmp_path / "task", ImportOptions(images="images", masks="1st_manual"))
    assert str(src / "images" / "21_training.tif") in str(caught.value)
    assert (f"no mask named 21_training.* in {src / '1st_manual'}; give --mask-pattern for files named otherwise "
            "than their image (e.g. {stem}_mask); pairing by the name before the first '_' is off: 22_manual1.gif "
            "and 22_manual2.gif share '22'") in str(caught.value)
    # images named alike (CHASE: Image_01L, Image_01R) are not paired by their shared 'Image'
    images, masks = tmp_path / "chase" / "images", tmp_path / "chase" / "masks"
    for stem in ("Image_01L", "Image_01R"):
        _picture(images / f"{stem}.png", np.zeros((4, 5), np.uint8))
        _picture(masks / f"{stem}_1stHO.png", np.zeros((4, 5), np.uint8))
    summary = import_task("pairs", images, tmp_path / "chase-task", ImportOptions(masks=str(masks),
                                                                                  mask_pattern="{stem}_1stHO"))
    assert summary.images == 2
    with pytest.raises(ValueError, match="is off: images Image_01L and Image_01R share 'Image'"):
        import_task("pairs", images, tmp_path / "chase-other", ImportOptions(masks=str(masks)))


def test_relative_folders_are_taken_below_src_else_from_the_working_directory(tmp_path, monkeypatch):
    src = tmp_path / "DRIVE" / "training"
    _drive_like(src, range(21, 24))
    (tmp_path / "elsewhere").mkdir()
    (src / "1st_manual").rename(tmp_path / "elsewhere" / "manual")
    monkeypatch.chdir(tmp_path / "elsewhere")
    summary = import_task("pairs", src, tmp_path / "task", ImportOptions(images="images", masks="manual"))
    assert summary.images == 3 and not summary.problems
    with pytest.raises(FileNotFoundError, match=f"--rois fov: no such file or folder below {src} or in the working "
                                                "directory"):
        import_task("pairs", src, tmp_path / "other", ImportOptions(images="images", masks="manual", rois="fov"))


def test_binary_masks_of_zero_and_one_other_value_need_no_flags(tmp_path):
    mapping, path = MaskMapping(["background", "vessel"]), tmp_path / "m.png"
    truth = np.zeros((6, 6), bool)
    truth[1:3, 2:5] = True
    for raw in (truth * np.uint8(100), truth * np.uint16(255), truth * np.uint8(1), truth * np.uint16(65535)):
        np.testing.assert_array_equal(mapping(path, raw), truth.astype(np.int64), err_msg=str(raw.dtype))
    lossy = (truth * 255).astype(np.uint8) + np.uint8(3) * ~truth - np.uint8(2) * truth  # JPEG-like: 0-3, 253
    np.testing.assert_array_equal(mapping(path, lossy), truth.astype(np.int64))
    with pytest.raises(ValueError, match="are not indices of the 3 classes"):  # several classes: no guessing
        MaskMapping(["background", "a", "b"])(path, truth * np.uint8(255))


@needs_shared
def test_distinct_fundus_photos_are_no_near_duplicates_and_a_resaved_copy_is(tmp_path, capsys):
    """The 28 CHASE photographs (14 children, both eyes) look alike in a 32 x 32 thumbnail; a copy re-saved as JPEG
    at another quality, or resized, is still found. The hash tells them apart: a copy of each re-saved at quality 10
    is within the default distance, the closest two photographs more than twice as far (with the 64-bit hash they
    were 6 bits apart, the quality-10 copies up to 4)."""
    source = SHARED / "fundus-vessels-chase"
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    stems = sorted(p.stem for p in (source / "images").iterdir())
    for stem in stems:
        os.symlink(source / "images" / f"{stem}.jpg", images / f"{stem}.jpg")
        os.symlink(source / "masks" / f"{stem}.png", masks / f"{stem}.png")
    hashes, resaved = {}, {}
    for stem in stems:
        with Image.open(images / f"{stem}.jpg") as image:
            hashes[stem] = phash(np.asarray(image.convert("F")), IMPORT_HASH_SIZE)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=10)
        with Image.open(buffer) as copy:
            resaved[stem] = phash(np.asarray(copy.convert("F")), IMPORT_HASH_SIZE)
    closest = min((hashes[a] ^ hashes[b]).bit_count() for a, b in itertools.combinations(stems, 2))
    farthest_copy = max((hashes[stem] ^ resaved[stem]).bit_count() for stem in stems)
    assert farthest_copy <= IMPORT_DUPLICATE_DISTANCE < closest / 2
    splits = tmp_path / "splits.csv"
    write_csv(splits, ("id", "split"), [(stem, "train" if n % 2 else "test") for n, stem in enumerate(stems)])
    command = ["data", "import-task", "pairs", str(images), "", "--modality", "fundus", "--masks", str(masks),
               "--splits", str(splits), "--workers", "1"]
    assert main([*command[:4], str(tmp_path / "chase"), *command[5:]]) == 0
    assert "near-duplicate" not in capsys.readouterr().err
    assert (tmp_path / "chase" / "duplicates.csv").read_text() == "id,group,split\n"
    with Image.open(images / "Image_01L.jpg") as photo, Image.open(masks / "Image_01L.png") as mask:
        photo.save(images / "Image_01L_q40.jpg", quality=40)
        half = (photo.width // 2, photo.height // 2)
        photo.resize(half, Image.Resampling.LANCZOS).save(images / "Image_01L_half.png")
        mask.save(masks / "Image_01L_q40.png")
        mask.resize(half, Image.Resampling.NEAREST).save(masks / "Image_01L_half.png")
    with open(splits, "a") as handle:
        handle.write("Image_01L_q40,train\nImage_01L_half,train\n")  # Image_01L itself is in test
    assert main([*command[:4], str(tmp_path / "copies"), *command[5:]]) == 0
    assert "1 near-duplicate group(s) lie on both sides of the source's own split" in capsys.readouterr().err
    assert (tmp_path / "copies" / "duplicates.csv").read_text() == ("id,group,split\nImage_01L,0,test\n"
                                                                    "Image_01L_half,0,train\nImage_01L_q40,0,train\n")
