"""Curation: Table 2 normalisation, slicing and filtering, privacy, quarantine, resume after a kill, partitions,
and streaming the shards into training."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from dex.cli import main
from dex.config import ConfigError
from dex.data.curation import CurateOptions, curate, finalize
from dex.data.normalize import ct_hu, pet_suv
from dex.data.volumes import read_dicom_volume, read_nifti
from dex.data.recipe import MODALITIES, HoldOut, Recipe, Source
from dex.data.shards import iter_shard
from dex.data.stream import CuratedImages, decode_png, modality_weights
from dex.data.tasks import load_task
from dex.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform
from tests.conftest import ct_series

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
OPTIONS = CurateOptions(min_size=16, shard_samples=40)


def manifest(folder: Path) -> list[dict]:
    """The manifest's rows, each with the ``path`` and ``where`` of its source file from the curator's private map
    (the manifest itself names no file)."""
    origin = {r["key"]: r for r in csv.DictReader(open(folder / "private/paths.csv"))}
    rows = list(csv.DictReader(open(folder / "manifest.csv")))
    assert "path" not in rows[0] if rows else True
    return [{**r, "path": origin[r["key"]]["path"], "where": origin[r["key"]]["where"]} for r in rows]


def shard_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in sorted((folder / "shards").glob("*.tar")):
        for key, parts in iter_shard(shard):
            assert key not in samples, f"{key} written twice"
            samples[key] = parts
    return samples


# --- the phantom collection --------------------------------------------------------------------------------------

def test_every_generated_image_is_written_or_dropped_for_a_reason(phantom_collection):
    curated = phantom_collection / "curated"
    stats = json.loads((curated / "stats.json").read_text())
    assert set(stats["modalities"]) == set(MODALITIES)
    for source in stats["sources"]:
        dropped = sum(source["dropped"].values())
        assert source["images"] + dropped == source["reported"], source  # nothing lost, nothing invented
        assert source["quarantined"] == 0
    rows = manifest(curated)
    samples = shard_samples(curated)
    assert len(rows) == stats["total"] == len(samples) == json.loads((curated / "index.json").read_text())["samples"]
    assert {r["key"] for r in rows} == set(samples)
    assert sum(s["dropped"].get("foreground", 0) for s in stats["sources"]) > 0  # empty slices beyond the body
    by_name = {s["name"]: s for s in stats["sources"]}
    assert all(by_name[n]["dropped"].get("foreground", 0) > 0 for n in ("ct-dicom", "ct-nifti", "mr-nifti"))
    assert not by_name["fundus-jpeg"]["dropped"]  # distinct photographs: nothing to drop


def test_ct_slices_are_normalised_as_table_2(phantom_collection):
    raw, curated = phantom_collection / "raw", phantom_collection / "curated"
    volume = read_dicom_volume(sorted((raw / "sources/ct-dicom/case_0000").glob("*.dcm")))
    expected = ct_hu(volume.values)
    samples = shard_samples(curated)
    rows = [r for r in manifest(curated) if r["source"] == "ct-dicom" and r["path"].startswith("case_0000/")]
    assert rows
    for row in rows:
        image = decode_png(samples[row["key"]]["png"])[0].numpy()
        np.testing.assert_allclose(image, expected[int(row["index"])], atol=1 / 65535)
        body = (volume.values[int(row["index"])] > -500).mean()
        assert body >= 0.05  # kept slices pass the foreground rule
    kept = {int(r["index"]) for r in rows}
    dropped = [z for z in range(volume.values.shape[0]) if z not in kept]
    assert dropped and all((volume.values[z] > -500).mean() < 0.05 or z in kept for z in dropped)


def test_pet_suv_from_nifti(phantom_collection):
    raw, curated = phantom_collection / "raw", phantom_collection / "curated"
    (volume,) = read_nifti(raw / "sources/pet-suv-nifti/case_0000.nii.gz")
    samples = shard_samples(curated)
    for row in (r for r in manifest(curated) if r["source"] == "pet-suv-nifti" and r["path"] == "case_0000.nii.gz"):
        image = decode_png(samples[row["key"]]["png"])[0].numpy()
        np.testing.assert_allclose(image, pet_suv(volume.values[int(row["index"])]), atol=1 / 65535)


def test_no_identifying_dicom_attribute_reaches_the_outputs(phantom_collection):
    import pydicom

    raw, curated = phantom_collection / "raw", phantom_collection / "curated"
    ds = pydicom.dcmread(next((raw / "sources/ct-dicom").rglob("*.dcm")))
    secrets_ = [str(ds.PatientName), ds.PatientID, ds.InstitutionName, ds.AccessionNumber, ds.PatientBirthDate,
                ds.StudyDate, str(ds.ReferringPhysicianName), ds.StudyInstanceUID, ds.SeriesInstanceUID]
    outputs = [p for p in curated.rglob("*") if p.is_file() and "private" not in p.relative_to(curated).parts]
    for path in outputs:
        data = path.read_bytes()
        for secret in secrets_:
            assert secret.encode() not in data, (path.name, secret)
    studies = {r["study"] for r in manifest(curated)
               if r["source"] == "ct-dicom" and r["path"].startswith("case_0000/")}
    assert len(studies) == 1 and len(next(iter(studies))) == 16  # one salted hash per study, kept for splits


# --- dedup, quarantine, burned-in text ----------------------------------------------------------------------------

def _recipe(tmp_path: Path, *sources: Source) -> Path:
    path = tmp_path / "recipe.yaml"
    Recipe("test", list(sources)).save(path)
    return path


def _image(path: Path, seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    image = (0.5 + 0.4 * np.sin(6 * (xx * rng.uniform(1, 3) + yy * rng.uniform(1, 3)) + rng.uniform(0, 6)))
    array = (np.stack([image, image ** 2, 1 - image], 2) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def test_near_duplicates_within_a_source_are_dropped(tmp_path):
    folder = tmp_path / "images"
    original = _image(folder / "a.png", 0)
    _image(folder / "b.png", 1)
    shutil.copy(folder / "a.png", folder / "a_copy.png")
    Image.fromarray(original).resize((44, 44)).save(folder / "a_small.jpg", quality=85)  # re-encoded and resized
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(folder / "black.png")
    Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(folder / "flat.png")
    Image.fromarray(original[:8, :8]).save(folder / "tiny.png")
    recipe = _recipe(tmp_path, Source("photos", "Photo", "images", "image", "scale_255", pattern="*.*"))
    summary = curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    assert summary.written == 2 and summary.quarantined == 0
    assert summary.dropped == {"near-duplicate": 2, "empty": 1, "constant": 1, "small": 1}
    assert {r["path"] for r in manifest(tmp_path / "out")} == {"a.png", "b.png"}


def _broken_inputs(root: Path) -> None:
    (root / "dicom/bad").mkdir(parents=True)
    good = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (root / "dicom/bad/cut.dcm").write_bytes(good[: len(good) // 2])
    (root / "dicom/ok").mkdir(parents=True)
    (root / "dicom/ok/ct.dcm").write_bytes(good)
    (root / "images").mkdir(parents=True)
    _image(root / "images/ok.png", 3)
    (root / "images/zero.png").write_bytes(b"")
    (root / "images/cut.png").write_bytes((root / "images/ok.png").read_bytes()[:40])
    (root / "nifti").mkdir()
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), root / "nifti/nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), root / "nifti/flat2d.nii.gz")
    (root / "videos").mkdir()
    (root / "videos/cut.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 50)


def test_bad_files_are_quarantined_and_the_run_goes_on(tmp_path, capsys):
    _broken_inputs(tmp_path)
    recipe = _recipe(
        tmp_path,
        Source("ct", "CT", "dicom", "dicom", "ct_hu", pattern="**/*.dcm"),
        Source("photos", "Photo", "images", "image", "scale_255", pattern="*.png"),
        Source("mr", "MR", "nifti", "nifti", "mr_percentile", pattern="*.nii.gz"),
        Source("us", "US", "videos", "video", "scale_255", pattern="*.mp4"),
        Source("missing", "OCT", "", "image", "scale_255"),
    )
    status = main(["curate", str(recipe), "--out", str(tmp_path / "out"), "--workers", "2", "--min-size", "16"])
    assert status == 3  # something was quarantined
    output = capsys.readouterr().out
    assert "quarantined files: 6" in output and "without a root: missing" in output
    rows = {(r["source"], r["path"]): r["reason"]
            for r in csv.DictReader(open(tmp_path / "out/private/quarantine.csv"))}
    assert set(rows) == {("ct", "bad/cut.dcm"), ("photos", "zero.png"), ("photos", "cut.png"),
                         ("mr", "nan.nii.gz"), ("mr", "flat2d.nii.gz"), ("us", "cut.mp4")}
    assert "NaN" in rows[("mr", "nan.nii.gz")] and "3D or 4D" in rows[("mr", "flat2d.nii.gz")]
    assert {r["source"] for r in manifest(tmp_path / "out")} == {"ct", "photos"}  # the good files went through


def test_burned_in_annotation_is_a_warning(tmp_path, caplog):
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"))
    ds.BurnedInAnnotation = "YES"
    (tmp_path / "us").mkdir()
    ds.save_as(tmp_path / "us/frame.dcm")
    recipe = _recipe(tmp_path, Source("us", "US", "us", "dicom", "scale_255", pattern="*.dcm"))
    curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    warning = [r.getMessage() for r in caplog.records if "BurnedInAnnotation" in r.getMessage()]
    assert warning and str(ds.PatientName) not in warning[0]


# --- real DICOM and images ----------------------------------------------------------------------------------------

def test_real_dicom_pictures_and_volumes(tmp_path):
    (tmp_path / "cr").mkdir()
    (tmp_path / "us").mkdir()
    (tmp_path / "mr").mkdir()
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), tmp_path / "cr")  # radiograph, MONOCHROME1, 15 bit
    shutil.copy(get_testdata_file("US1_UNCR.dcm"), tmp_path / "us")  # RGB ultrasound
    shutil.copy(get_testdata_file("color3d_jpeg_baseline.dcm"), tmp_path / "us")  # 120-frame JPEG cine
    shutil.copy(get_testdata_file("OBXXXX1A.dcm"), tmp_path / "us")  # palette colour with a 16-bit LUT
    shutil.copy(get_testdata_file("emri_small.dcm"), tmp_path / "mr")  # 10-frame MR volume
    recipe = _recipe(
        tmp_path,
        Source("cr", "X-ray", "cr", "dicom", "scale_255", pattern="*.dcm"),
        Source("us", "US", "us", "dicom", "scale_255", pattern="*.dcm", frame_stride=30),
        Source("mr", "MR", "mr", "dicom", "mr_percentile", pattern="*.dcm"),
    )
    summary = curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    assert summary.quarantined == 0
    counts = Counter(r["source"] for r in manifest(tmp_path / "out"))
    assert counts["cr"] == 1 and counts["us"] == 2 + 4 and 1 <= counts["mr"] <= 10  # 120 frames / 30
    cr = next(r for r in manifest(tmp_path / "out") if r["source"] == "cr")
    image = decode_png(shard_samples(tmp_path / "out")[cr["key"]]["png"])[0].numpy()
    assert image[0, 0] < image[image.shape[0] // 2, image.shape[1] // 2]  # MONOCHROME1 inverted: body bright


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not present")
def test_shared_real_data(tmp_path):
    recipe = _recipe(
        tmp_path,
        Source("ct-lung", "CT", str(SHARED / "ct-lung-dicom/images"), "dicom", "ct_hu", pattern="**/*.dcm"),
        Source("chase", "Fundus", str(SHARED / "fundus-vessels-chase/images"), "image", "scale_255", pattern="*.jpg"),
        Source("busi", "US", str(SHARED / "us-breast-busi/images"), "image", "scale_255", pattern="*.png"),
    )
    summary = curate(recipe, tmp_path / "out", workers=2, options=CurateOptions(), progress=False)
    assert summary.quarantined == 0
    stats = {s["name"]: s for s in json.loads((tmp_path / "out/stats.json").read_text())["sources"]}
    assert stats["ct-lung"]["images"] + sum(stats["ct-lung"]["dropped"].values()) == 64
    assert stats["chase"]["images"] + sum(stats["chase"]["dropped"].values()) == 28
    assert stats["busi"]["images"] + sum(stats["busi"]["dropped"].values()) == 780
    # BUSI holds re-exported copies of the same scans (one even labelled benign and malignant): caught here
    kept = {r["path"] for r in manifest(tmp_path / "out") if r["source"] == "busi"}
    assert stats["busi"]["dropped"]["near-duplicate"] > 50
    assert not {"benign_105.png", "benign_156.png"} <= kept and not {"benign_131.png", "malignant_51.png"} <= kept


def test_held_out_task_splits_stay_out_of_the_collection(tmp_path):
    chase = SHARED / "fundus-vessels-chase"
    task = load_task(chase, seed=0)
    test = {task.images[i].name for i in task.splits["test"]}
    path = tmp_path / "recipe.yaml"
    Recipe("test", [Source("chase", "Fundus", str(chase / "images"), "image", "scale_255", pattern="*.jpg")],
           hold_out=[HoldOut(str(chase))]).save(path)
    assert Recipe.load(path).hold_out == [HoldOut(str(chase), ["test"], 0)]
    curate(path, tmp_path / "out", options=OPTIONS, progress=False)
    kept = {r["path"] for r in manifest(tmp_path / "out")}
    stats = json.loads((tmp_path / "out/stats.json").read_text())["sources"][0]
    assert len(test) >= 5 and not kept & test
    assert stats["images"] + sum(stats["dropped"].values()) == 28 - len(test)
    Recipe("test", Recipe.load(path).sources, hold_out=[HoldOut(str(tmp_path / "no-task"))]).save(path)
    with pytest.raises(ConfigError, match=r"recipe.yaml: hold_out task .*no-task.*: .*no images/ folder"):
        curate(path, tmp_path / "again", options=OPTIONS, progress=False)


def test_csv_index_names_the_modality_per_file(tmp_path):
    _image(tmp_path / "mixed/x1.png", 0)
    _image(tmp_path / "mixed/f1.png", 1)
    (tmp_path / "mixed/index.csv").write_text("path,modality\nx1.png,X-ray\nf1.png,Fundus\n")
    recipe = _recipe(tmp_path, Source("mixed", "Photo", "mixed", "image", "scale_255", index_csv="index.csv"))
    curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    assert {(r["path"], r["modality"]) for r in manifest(tmp_path / "out")} == {("x1.png", "X-ray"),
                                                                                 ("f1.png", "Fundus")}


def test_image_report_pairs_reach_the_shards_and_the_loader_and_bad_pairs_are_quarantined(tmp_path):
    for seed, name in enumerate(["a.png", "b.png", "empty.png", "c.png"]):
        _image(tmp_path / "pairs" / name, seed)
    (tmp_path / "pairs/broken.png").write_bytes(b"not a png")
    rows = [["a.png", "X-ray", "Chest X-ray: a 7 mm nodule, left upper zone.", ""],
            ["b.png", "US", "Fetal head, biparietal diameter 41 mm.", "obstetric US"],
            ["empty.png", "US", "  ", ""], ["broken.png", "X-ray", "Clear lungs.", ""],
            ["c.png", "", "Ünïcode report, no modality column value.", ""]]
    with open(tmp_path / "pairs/index.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "modality", "report", "report_type"], *rows])
    recipe = _recipe(tmp_path, Source("pairs", "Photo", "pairs", "image", "scale_255", index_csv="index.csv"))
    assert main(["curate", str(recipe), "--out", str(tmp_path / "out"), "--min-size", "16"]) == 3  # quarantined
    out = tmp_path / "out"
    quarantine = {r["path"]: r["reason"] for r in csv.DictReader(open(out / "private/quarantine.csv"))}
    assert set(quarantine) == {"empty.png", "broken.png"} and quarantine["empty.png"].startswith("empty report")
    by_path = {r["path"]: r for r in manifest(out)}
    assert set(by_path) == {"a.png", "b.png", "c.png"}
    assert [by_path[p]["report_type"] for p in ("a.png", "b.png", "c.png")] == ["X-ray", "obstetric US", "Photo"]
    samples = shard_samples(out)
    reports = {r[0]: r[2] for r in rows}
    for path, row in by_path.items():
        parts = samples[row["key"]]
        assert set(parts) == {"png", "json", "txt"} and parts["txt"].decode() == reports[path]
        assert json.loads(parts["json"])["report_type"] == row["report_type"]
    index = json.loads((out / "index.json").read_text())
    assert index["report_types"] == {"Photo": 1, "X-ray": 1, "obstetric US": 1}
    loaded = next(iter(DataLoader(CuratedImages(out, lambda x: x[:, :16, :16], shuffle_buffer=1,
                                                batch_size=3), batch_size=3)))
    key_report = {by_path[p]["key"]: reports[p] for p in by_path}
    assert sorted(loaded["report"]) == sorted(key_report.values())
    assert all(key_report[k] == r for k, r in zip(loaded["key"], loaded["report"]))
    plain = tmp_path / "plain"
    _image(plain / "x.png", 0)
    curate(_recipe(tmp_path, Source("plain", "X-ray", "plain", "image", "scale_255")), tmp_path / "plain-out",
           options=OPTIONS, progress=False)
    (sample,) = shard_samples(tmp_path / "plain-out").values()
    assert set(sample) == {"png", "json"} and "report_types" not in json.loads(
        (tmp_path / "plain-out/index.json").read_text())
    assert next(iter(CuratedImages(tmp_path / "plain-out", lambda x: x)))["report"] == ""


# --- resume, partitions ------------------------------------------------------------------------------------------

def _share_salt(curated: Path, other: Path) -> None:
    """Give ``other`` the salt of ``curated``, so that both name the same images alike (as parts of one collection
    do by sharing their folder)."""
    (other / "private").mkdir(parents=True)
    shutil.copy(curated / "private/salt.txt", other / "private/salt.txt")


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, phantom_collection):
    recipe = phantom_collection / "raw" / "recipe.yaml"
    clean = tmp_path / "clean"
    curate(recipe, clean, options=CurateOptions(min_size=16, shard_samples=10), progress=False)
    killed = tmp_path / "killed"
    _share_salt(clean, killed)
    command = [sys.executable, "-m", "dex", "curate", str(recipe), "--out", str(killed), "--workers", "1",
               "--min-size", "16", "--shard-samples", "10"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = killed / "journal-0-of-1.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 6):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "index.json").exists()  # it was cut before the end
    with pytest.raises(ValueError, match="--resume"):
        curate(recipe, killed, options=CurateOptions(min_size=16, shard_samples=10), progress=False)
    curate(recipe, killed, resume=True, options=CurateOptions(min_size=16, shard_samples=10), progress=False)
    assert not list((killed / "shards").glob("*.tmp"))
    assert shard_samples(killed).keys() == shard_samples(clean).keys()
    assert sorted(r["key"] for r in manifest(killed)) == sorted(r["key"] for r in manifest(clean))
    assert json.loads((killed / "stats.json").read_text()) == json.loads((clean / "stats.json").read_text())
    for report in ("paths.csv", "dropped.csv", "quarantine.csv"):  # the private journal resumed as well
        assert (killed / "private" / report).read_text() == (clean / "private" / report).read_text()


def test_partitions_merge_into_one_collection(tmp_path, phantom_collection, capsys):
    recipe = phantom_collection / "raw" / "recipe.yaml"
    whole = phantom_collection / "curated"
    _share_salt(whole, tmp_path / "parts")
    for part in ("0/3", "2/3"):
        curate(recipe, tmp_path / "parts", part=part, options=OPTIONS, progress=False)
    assert main(["data", "stats", str(tmp_path / "parts")]) == 2  # a merge over a missing part is refused
    assert "not merging: part 1/3 is missing (no journal-1-of-3.jsonl)" in capsys.readouterr().err
    journal = tmp_path / "parts" / "journal-2-of-3.jsonl"
    finished = journal.read_text()
    journal.write_text("".join(finished.splitlines(keepends=True)[:-1]))  # as if stopped before its last record
    curate(recipe, tmp_path / "parts", part="1/3", options=OPTIONS, progress=False)
    with pytest.raises(ValueError, match=r"part 2/3 is unfinished \(journal-2-of-3.jsonl has no end record\)"):
        finalize(tmp_path / "parts")
    journal.write_text(finished)
    assert not (tmp_path / "parts/index.json").exists()  # parts do not finalise
    assert main(["data", "stats", str(tmp_path / "parts")]) == 0
    merged = {r["key"] for r in manifest(tmp_path / "parts")}
    single = {r["key"] for r in manifest(whole)}
    # the same work, split three ways: the same images, up to near-duplicate choices between parts
    assert len(merged ^ single) <= 0.1 * len(single)
    index = json.loads((tmp_path / "parts/index.json").read_text())
    assert index["samples"] == len(merged) and len({s["name"] for s in index["shards"]}) == len(index["shards"])


def test_bad_part_and_recipe_errors(tmp_path, phantom_collection):
    with pytest.raises(ValueError, match="--part must be I/N with 0 <= I < N, got .3/3."):
        curate(phantom_collection / "raw" / "recipe.yaml", tmp_path, part="3/3")
    with pytest.raises(ValueError, match="no curation journal"):
        finalize(tmp_path)


# --- streaming into training -------------------------------------------------------------------------------------

def _keys(dataset, workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [sample["key"] for sample in loader]


@pytest.mark.parametrize("shard_samples", [5, 1000])  # many shards: split by shard; one shard: split by sample
def test_ranks_and_workers_read_disjoint_samples(tmp_path, phantom_collection, shard_samples):
    out = tmp_path / "curated"
    curate(phantom_collection / "raw" / "recipe.yaml", out,
           options=CurateOptions(min_size=16, shard_samples=shard_samples), progress=False)
    total = json.loads((out / "index.json").read_text())["samples"]
    identity = lambda image: image  # noqa: E731
    per_rank = []
    for rank in range(2):
        dataset = CuratedImages(out, identity, rank=rank, world_size=2, shuffle_buffer=16, loader_workers=2)
        keys = _keys(dataset, workers=2)
        assert len(keys) == len(dataset)
        assert dataset.by_shard == (shard_samples == 5)
        assert len(dataset) >= (total // 4 - (5 if dataset.by_shard else 0)) * 2  # the balanced share
        per_rank.append(keys)
    everything = per_rank[0] + per_rank[1]
    assert len(set(everything)) == len(everything)  # no sample twice, across ranks and workers


def test_epochs_reshuffle_and_seeds_reproduce(phantom_collection):
    identity = lambda image: image  # noqa: E731
    dataset = CuratedImages(phantom_collection / "curated", identity, shuffle_buffer=32)
    first = _keys(dataset, 0)
    assert first == _keys(CuratedImages(phantom_collection / "curated", identity, shuffle_buffer=32), 0)
    dataset.set_epoch(1)
    second = _keys(dataset, 0)
    assert sorted(first) == sorted(second) and first != second


def test_two_curations_of_the_same_data_train_alike(tmp_path, phantom_collection):
    """Keys are salted per collection; what training sees (order, images, augmentation) must not depend on it."""
    again = tmp_path / "again"
    curate(phantom_collection / "raw" / "recipe.yaml", again, options=OPTIONS, progress=False)
    assert (again / "private/salt.txt").read_text() != (phantom_collection / "curated/private/salt.txt").read_text()
    first, second = (CuratedImages(folder, PretrainTransform(32), seed=3, shuffle_buffer=16)
                     for folder in (phantom_collection / "curated", again))
    for a, b, _ in zip(first, second, range(40)):
        assert a["key"] != b["key"] and torch.equal(a["image"], b["image"]) and a["modality"] == b["modality"]


def test_modality_balancing(phantom_collection):
    counts = {"CT": 400, "US": 100, "OCT": 25}
    weights = modality_weights(counts, temperature=1.0)
    assert all(w == pytest.approx(1.0) for w in weights.values())
    weights = modality_weights(counts, temperature=1e9)  # uniform target: accept inversely to frequency
    assert weights["OCT"] == pytest.approx(1.0) and weights["CT"] == pytest.approx(25 / 400)
    identity = lambda image: image  # noqa: E731
    natural = Counter(s["modality"] for s in CuratedImages(phantom_collection / "curated", identity))
    flat = Counter(s["modality"] for s in CuratedImages(phantom_collection / "curated", identity,
                                                        modality_temperature=100.0))
    spread = lambda c: max(c.values()) / min(c.values())  # noqa: E731
    assert spread(flat) <= spread(natural)


def test_pretrain_transform_refuses_black_crops():
    image = torch.zeros(1, 100, 100)
    image[:, :30, :30] = 1.0  # bright only in one corner
    torch.manual_seed(0)
    transform = PretrainTransform(size=32, p=0.0)
    for _ in range(20):
        crop = transform.crop(image)
        assert crop.shape == (1, 32, 32) and float(crop.mean()) >= 0.05
    out = PretrainTransform(size=32)(image)
    assert out.shape == (3, 32, 32)
    black = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(PretrainTransform(size=8)(torch.zeros(1, 40, 40)), -black.expand(3, 8, 8), atol=1e-6)


def test_shards_read_with_webdataset(phantom_collection):
    wds = pytest.importorskip("webdataset")
    shards = sorted(str(p) for p in (phantom_collection / "curated/shards").glob("*.tar"))
    first = next(iter(wds.WebDataset(shards[0], shardshuffle=False)))
    meta = json.loads(first["json"])
    assert first["__key__"] == meta["key"] and first["png"][:4] == b"\x89PNG"
    assert meta["modality"] in MODALITIES
    assert os.path.getsize(shards[0]) > 0


def test_npy_pictures_volumes_and_bad_arrays(tmp_path):
    folder = tmp_path / "arrays"
    folder.mkdir()
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    np.save(folder / "grey8.npy", picture)
    np.save(folder / "float01.npy", rng.random((40, 40, 3)).astype(np.float32))
    np.save(folder / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(folder / "nan.npy", np.full((40, 40), np.nan))
    np.save(folder / "four_d.npy", np.zeros((2, 2, 2, 2)))
    volume = rng.gamma(2.0, 100.0, (6, 40, 40))
    (tmp_path / "vols").mkdir()
    np.save(tmp_path / "vols/mr.npy", volume)
    recipe = _recipe(tmp_path, Source("pics", "Photo", "arrays", "npy", "scale_255", pattern="*.npy"),
                     Source("mr", "MR", "vols", "npy", "mr_percentile", pattern="*.npy"))
    summary = curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    reasons = {r["path"]: r["reason"] for r in csv.DictReader(open(tmp_path / "out/private/quarantine.csv"))}
    assert set(reasons) == {"object.npy", "nan.npy", "four_d.npy"} and summary.quarantined == 3
    samples, rows = shard_samples(tmp_path / "out"), manifest(tmp_path / "out")
    grey = next(r for r in rows if r["path"] == "grey8.npy")
    np.testing.assert_allclose(decode_png(samples[grey["key"]]["png"])[0].numpy(), picture / 255.0, atol=1e-6)
    low, high = np.percentile(volume, [1, 99])
    for row in (r for r in rows if r["source"] == "mr"):
        expected = (np.clip(volume[int(row["index"])], low, high) - low) / (high - low)
        np.testing.assert_allclose(decode_png(samples[row["key"]]["png"])[0].numpy(), expected, atol=2e-5)


@pytest.mark.parametrize("axis,shape", [("coronal", (8, 40)), ("sagittal", (8, 48))])
def test_volumes_slice_along_the_chosen_axis(tmp_path, axis, shape):
    from dex.data.phantoms.writers import write_nifti

    (tmp_path / "v").mkdir()
    volume = np.random.default_rng(1).normal(40.0, 30.0, (8, 48, 40)).astype(np.float32)  # [Z, Y, X] in HU
    write_nifti(tmp_path / "v/ct.nii.gz", volume, (5.0, 1.0, 1.0))
    recipe = _recipe(tmp_path, Source("ct", "CT", "v", "nifti", "ct_hu", pattern="*.nii.gz", slice_axis=axis))
    curate(recipe, tmp_path / "out", options=CurateOptions(min_size=8, dedup_distance=0), progress=False)
    rows = manifest(tmp_path / "out")
    assert {(int(r["height"]), int(r["width"])) for r in rows} == {shape}
    assert len(rows) == (48 if axis == "coronal" else 40)
    row = rows[0]
    image = decode_png(shard_samples(tmp_path / "out")[row["key"]]["png"])[0].numpy()
    expected = np.take(ct_hu(volume), int(row["index"]), axis=1 if axis == "coronal" else 2)
    np.testing.assert_allclose(image, expected, atol=1 / 65535)


# --- per-file quarantine, salt, privacy, dropped images, shard hashes, workers -------------------------------------

def test_bad_files_in_a_dicom_folder_cost_only_themselves(tmp_path):
    import pydicom

    study = tmp_path / "dicom/study"
    ct_series(study, "a", "1.2.826.0.1.3680043.8.498.1", 4, 0)
    ct_series(study, "b", "1.2.826.0.1.3680043.8.498.2", 4, 4)
    (study / "empty.dcm").write_bytes(b"")
    (study / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    cut = pydicom.dcmread(study / "a_0.dcm")
    cut.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    cut.ImagePositionPatient = [-158.0, -179.0, -67.0]
    cut.PixelData = cut.PixelData[:1000]  # the header reads, the pixels do not decode
    cut.save_as(study / "a_cut.dcm")
    recipe = _recipe(tmp_path, Source("ct", "CT", "dicom", "dicom", "ct_hu", pattern="**/*.dcm"))
    summary = curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    assert summary.quarantined == 3
    written = {r["path"] for r in manifest(tmp_path / "out")}
    assert written == {f"study/{s}_{i}.dcm" for s in "ab" for i in range(4)}  # both series, every good slice
    rows = {r["path"]: r["reason"] for r in csv.DictReader(open(tmp_path / "out/private/quarantine.csv"))}
    assert set(rows) == {"study/empty.dcm", "study/garbage.dcm", "study/a_cut.dcm"}
    assert "not a readable DICOM file" in rows["study/empty.dcm"]
    assert "not a readable DICOM file" in rows["study/garbage.dcm"]
    assert "cannot decode the pixel data" in rows["study/a_cut.dcm"]


def _one_image_source(tmp_path: Path) -> Path:
    _image(tmp_path / "images/a.png", 0)
    return _recipe(tmp_path, Source("photos", "Photo", "images", "image", "scale_255", pattern="*.png"))


@pytest.mark.parametrize("content", ["", "not-a-salt\n", "0123456789abcdef\n"])
def test_an_empty_or_malformed_salt_is_refused(tmp_path, content):
    recipe = _one_image_source(tmp_path)
    (tmp_path / "out/private").mkdir(parents=True)
    (tmp_path / "out/private/salt.txt").write_text(content)
    with pytest.raises(ValueError, match="salt is (empty|malformed)"):
        curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    assert not (tmp_path / "out/manifest.csv").exists()


def test_a_kill_while_the_salt_is_made_leaves_no_salt_and_a_race_keeps_the_first(tmp_path, monkeypatch):
    import dex.data.curation.privacy as privacy

    recipe = _one_image_source(tmp_path)
    token_hex = privacy.secrets.token_hex

    def killed_while_writing(length: int) -> str:
        if length == 16:  # the salt itself: the process dies here
            raise KeyboardInterrupt
        return token_hex(length)

    monkeypatch.setattr(privacy.secrets, "token_hex", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    assert list((tmp_path / "out/private").iterdir()) == []  # no salt, empty or whole, and no temporary file
    monkeypatch.setattr(privacy.secrets, "token_hex", token_hex)

    winner = "ab" * 16
    link = os.link

    def another_part_first(source, target):  # another part links its salt between our check and our link
        Path(target).write_text(winner + "\n")
        link(source, target)

    monkeypatch.setattr(privacy.os, "link", another_part_first)
    curate(recipe, tmp_path / "out", options=OPTIONS, progress=False)
    assert (tmp_path / "out/private/salt.txt").read_text() == winner + "\n"
    assert [p.name for p in (tmp_path / "out/private").glob(".salt-*")] == []


CANARIES = ("DOE^JOHN", "MRN12345678", "SMITH_JANE", "19700101", "ID987654")


def test_identifiers_in_folder_and_file_names_reach_nothing_outside_private(tmp_path):
    raw = tmp_path / "raw"
    _image(raw / "photos/DOE^JOHN_MRN12345678/DOE_JOHN_19700101.png", 0)
    _image(raw / "photos/DOE^JOHN_MRN12345678/SMITH_JANE_tiny.png", 1, size=8)  # dropped: too small
    (raw / "photos/DOE^JOHN_MRN12345678/ID987654_cut.png").write_bytes(b"\x89PNG")  # quarantined
    ct_series(raw / "ct/SMITH_JANE_ID987654", "SMITH_JANE_slice", "1.2.826.0.1.3680043.8.498.4", 3, 0)
    recipe = _recipe(tmp_path, Source("photos", "Photo", "raw/photos", "image", "scale_255", pattern="**/*.png"),
                     Source("ct", "CT", "raw/ct/SMITH_JANE_ID987654", "dicom", "ct_hu", pattern="*.dcm"))
    out = tmp_path / "out"
    assert main(["curate", str(recipe), "--out", str(out), "--workers", "1", "--min-size", "16"]) == 3
    assert main(["data", "stats", str(out)]) == 0
    shared = [p for p in out.rglob("*") if p.is_file() and "private" not in p.relative_to(out).parts]
    assert {"manifest.csv", "index.json", "stats.md", "stats.json", "journal-0-of-1.jsonl"} <= {p.name for p in shared}
    for path in shared:
        data = path.read_bytes().lower()
        for canary in CANARIES:
            assert canary.lower().encode() not in data, (path.relative_to(out), canary)
    private = b"".join(p.read_bytes() for p in (out / "private").rglob("*") if p.is_file())
    assert all(canary.encode() in private for canary in CANARIES)  # the curator can still find every file
    assert {"salt.txt", "paths.csv", "dropped.csv", "quarantine.csv", "curate.log"} <= {
        p.name for p in (out / "private").iterdir()}
    assert (out / "private").stat().st_mode & 0o077 == 0 and (out / "private/salt.txt").stat().st_mode & 0o077 == 0


def test_every_dropped_image_is_listed_with_its_path_and_reason(phantom_collection):
    raw, curated = phantom_collection / "raw", phantom_collection / "curated"
    recipe = Recipe.load(raw / "recipe.yaml")
    stats = json.loads((curated / "stats.json").read_text())
    rows = list(csv.DictReader(open(curated / "private/dropped.csv")))
    for source in stats["sources"]:
        listed = Counter(r["reason"] for r in rows if r["source"] == source["name"])
        assert listed == Counter(source["dropped"]), source["name"]
    assert Counter(r["reason"] for r in rows) == Counter(stats["dropped"]) and rows
    roots = {s.name: recipe.root_of(s) for s in recipe.sources}
    assert all((roots[r["source"]] / r["path"]).exists() for r in rows)
    foreground = next(r for r in rows if r["reason"] == "foreground" and r["source"] == "ct-nifti")
    assert foreground["where"].startswith("axial slice ")
    text = (curated / "stats.md").read_text()
    assert "| Dropped because | Images |" in text
    assert f"| too little foreground (volume slices) | {stats['dropped']['foreground']:,} |" in text


def test_the_index_records_each_shard_and_verify_finds_a_damaged_one(tmp_path, phantom_collection, capsys):
    from dex.files import file_sha256

    folder = tmp_path / "curated"
    shutil.copytree(phantom_collection / "curated", folder)
    index = json.loads((folder / "index.json").read_text())
    for shard in index["shards"]:
        path = folder / "shards" / shard["name"]
        assert (shard["bytes"], shard["sha256"]) == (path.stat().st_size, file_sha256(path))
        assert shard["stored"] == sum(1 for _ in iter_shard(path))
    assert main(["data", "verify", str(folder)]) == 0
    capsys.readouterr()
    first, second = (folder / "shards" / s["name"] for s in index["shards"][:2])
    first.write_bytes(first.read_bytes()[:-4096])  # cut short
    data = bytearray(second.read_bytes())
    data[600:610] = b"0123456789"  # same size, other bytes
    second.write_bytes(bytes(data))
    (folder / "shards/9-of-9-000001.tar").write_bytes(b"")
    assert main(["data", "verify", str(folder)]) == 3
    output = capsys.readouterr().out
    assert f"{first.name}: " in output and "cut short" in output
    assert f"{second.name}: its SHA-256 differs" in output
    assert "9-of-9-000001.tar: not in index.json" in output


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every live process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table, found, frontier = _processes(), set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_a_killed_curation_leaves_no_worker_behind(tmp_path, phantom_collection):
    command = [sys.executable, "-m", "dex", "curate", str(phantom_collection / "raw" / "recipe.yaml"), "--out",
               str(tmp_path / "out"), "--workers", "2", "--min-size", "16"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, set()
    while time.time() < deadline and len(workers) < 2 and process.poll() is None:
        workers = _descendants(process.pid)
        time.sleep(0.01)
    assert len(workers) >= 2, "the workers never started"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_processes().get(pid, (0, "Z"))[1] != "Z" for pid in workers):
        time.sleep(0.05)
    alive = [pid for pid in workers if _processes().get(pid, (0, "Z"))[1] != "Z"]
    assert not alive, f"worker processes {alive} outlived their parent"
