"""The phantom generator: each modality's physics, labels that match the images, Non-IID modalities,
determinism, and files that read back through dex's readers."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage

from dex.data.normalize import VOLUME_NORMALIZERS, scale_255
from dex.data.phantoms import RAW_SOURCES, TASKS, make_phantoms
from dex.data.phantoms import eye, optical, radiology, ultrasound
from dex.data.phantoms.generate import _ct_volume, _pet_scan, task_fundus
from dex.data.phantoms.optical import EOSIN_OD, HAEMATOXYLIN_OD
from dex.data.phantoms.radiology import T
from dex.data.phantoms.shapes import speckle
from dex.data.readers import group_dicom_series, read_label_map, read_picture, read_video_frames
from dex.data.recipe import MODALITIES, Recipe
from dex.data.tasks import TaskSpec
from dex.data.volumes import read_dicom_volume, read_nifti

SIZE = 32


def rngs(n, seed=0):
    return [np.random.default_rng([seed, i]) for i in range(n)]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(out, per_modality=24, size=SIZE, seed=5, task_images=10, workers=2)
    return out


# --- physics -------------------------------------------------------------------------------------------------

def test_ct_hounsfield_units_per_tissue():
    rng = np.random.default_rng(0)
    body = radiology.torso(rng, 8, 128)
    hu = radiology.ct_hu(rng, body)

    def interior(name):  # away from partial-volume edges
        return ndimage.binary_erosion(body.labels == T[name], np.ones((1, 3, 3)))

    median = {name: float(np.median(hu[interior(name)])) for name in ("air", "lung", "fat", "soft", "liver")}
    assert median["air"] < -950 and -900 < median["lung"] < -700 and -200 < median["fat"] < -50
    assert 20 < median["soft"] < 60 and median["soft"] < median["liver"] < 80
    assert np.percentile(hu[body.labels == T["bone"]], 75) > 400
    # the noise: in air (no texture, far from edges) HU scatter is the scanner's Gaussian sigma of 12 HU
    outside = (body.labels == 0) & (np.abs(np.linspace(-1, 1, 128))[None, None, :] > 0.95)
    assert 10 < hu[outside].std() < 14


def test_mr_contrast_bias_and_rician_background():
    rng = np.random.default_rng(1)
    body = radiology.torso(rng, 24, 64)
    mr = radiology.mr_t1(rng, body)
    means = {name: float(np.median(mr[body.labels == T[name]])) for name in ("fat", "liver", "soft", "lung")}
    assert means["fat"] > means["liver"] > means["soft"] > means["lung"]  # T1: fat bright, unlike CT
    corners = mr[:, :6, :6].ravel()  # air: the magnitude of pure complex Gaussian noise is Rayleigh
    assert corners.mean() / corners.std() == pytest.approx(np.sqrt(np.pi / 2) / np.sqrt(2 - np.pi / 2), rel=0.1)
    liver = body.labels == T["liver"]
    assert mr[liver].std() / mr[liver].mean() > 0.05  # the smooth bias field modulates one tissue


def test_pet_suv_counts_and_resolution():
    scan = radiology.pet(np.random.default_rng(2), radiology.torso(np.random.default_rng(2), 24, 64, lesions=2))
    assert scan.suv.shape == (24, 32, 32)  # half the in-plane matrix
    interior = scan.labels == T["liver"]
    assert 1.6 < float(np.median(scan.suv[interior])) < 2.8
    assert scan.suv[scan.labels == T["lesion"]].max() > 2 * np.median(scan.suv[interior])
    decayed = scan.dose_bq * 2.0 ** (-scan.minutes_after_injection * 60 / 6586.2)
    np.testing.assert_allclose(scan.suv, scan.bqml * scan.weight_kg * 1000 / decayed, rtol=1e-5)
    counts = scan.bqml / (2.2 * decayed / (scan.weight_kg * 1000) / 40)
    assert np.allclose(counts, np.round(counts), atol=1e-3)  # Poisson counts are whole numbers


def test_xray_is_a_beer_lambert_projection():
    sample = radiology.chest_xray(np.random.default_rng(3), 64)
    image, fields = sample.image, sample.masks["xray-lungs"]
    lung, heart = image[fields == 1].mean(), image[fields == 2].mean()
    assert lung < heart  # lungs attenuate least: dark on a radiograph
    spine = image[:, 30:34].mean()
    assert spine > image[fields == 1].mean()
    assert image[0, :4].mean() < 0.05  # air beside the neck transmits everything


def test_ultrasound_sector_and_rayleigh_speckle():
    field = np.random.default_rng(4).standard_normal((2, 256, 256))
    grain = speckle(field, ultrasound.GRAIN)
    assert grain.mean() == pytest.approx(1.0)
    assert grain.std() / grain.mean() == pytest.approx(np.sqrt(4 / np.pi - 1), rel=0.05)  # Rayleigh
    sample = ultrasound.fetal_head(np.random.default_rng(4), 64)
    assert sample.image[0, 0] == 0 and sample.image[0, -1] == 0 and sample.image[-1, 0] == 0  # outside the fan
    head = sample.masks["us-fetal-head"].astype(bool)
    assert sample.image[head].mean() > 0.05 and head.sum() > 50


def test_fundus_colour_and_vessels():
    for rng in rngs(3):
        sample = eye.fundus(rng, 64)
        rgb, vessels = sample.image, sample.masks["fundus-vessels"].astype(bool)
        assert rgb[0, 0].max() == 0  # black outside the circular field
        inside = np.hypot(*np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64))) < 0.8
        r, g, b = (rgb[inside & ~vessels][:, c].mean() for c in range(3))
        assert r > g > b  # orange-red retina
        assert rgb[vessels, 1].mean() < rgb[inside & ~vessels, 1].mean()  # vessels dark in the green channel


def test_oct_layer_reflectivity():
    sample = eye.oct_bscan(np.random.default_rng(5), 96)
    layers = sample.masks["oct-layers"]
    mean = [sample.image[layers == i].mean() for i in range(len(eye.OCT_LAYERS))]
    assert mean[0] < 0.2  # dark vitreous
    assert mean[5] == max(mean)  # EZ / RPE is the brightest band
    assert mean[1] > mean[3] and mean[1] > mean[4]  # bright RNFL over dark nuclear layers


def test_he_stains_deconvolve():
    """Colour deconvolution with the same stain vectors recovers haematoxylin in nuclei and eosin in stroma."""
    sample = optical.he_tile(np.random.default_rng(6), 96)
    nuclei = sample.masks["pathology-nuclei"].astype(bool)
    density = -np.log(np.clip(sample.image, 1e-3, 1)).reshape(-1, 3)
    stains = np.linalg.lstsq(np.stack([HAEMATOXYLIN_OD, EOSIN_OD], 1), density.T, rcond=None)[0].T
    haem, eosin = stains[:, 0].reshape(96, 96), stains[:, 1].reshape(96, 96)
    assert haem[nuclei].mean() > 1.0 and haem[~nuclei].mean() < 0.3
    assert eosin[~nuclei].mean() > eosin[nuclei].mean()
    assert sample.image[nuclei, 2].mean() > sample.image[nuclei, 1].mean()  # nuclei are blue-purple


def test_endoscopy_vignette_and_lumen():
    sample = optical.colonoscopy(np.random.default_rng(7), 64, polyp=True)
    assert sample.image[0, 0].max() == 0 and sample.masks["endoscopy-polyp"].sum() > 10
    inside = sample.image[sample.image.sum(2) > 0]
    assert (inside[:, 0] >= inside[:, 2]).mean() > 0.95  # reddish mucosa


def test_dermoscopy_lesion_darker_and_irregular_border():
    ratios = {0: [], 1: []}
    for rng in rngs(12):
        sample = optical.dermoscopy(rng, 96)
        lesion = sample.masks["photo-lesion"].astype(bool)
        luminance = sample.image.mean(2)
        assert luminance[lesion].mean() < np.median(luminance[~lesion])
        perimeter = (lesion ^ np.roll(lesion, 1, 0)).sum() + (lesion ^ np.roll(lesion, 1, 1)).sum()
        ratios[sample.labels["photo-lesion-type"]].append(perimeter**2 / lesion.sum())
    assert ratios[0] and ratios[1] and np.mean(ratios[1]) > np.mean(ratios[0])  # the label names the border


# --- labels match the images ---------------------------------------------------------------------------------

def test_ct_task_masks_cover_the_organs(collection):
    folder = collection / "tasks" / "ct-organs"
    for image_path in sorted((folder / "images").iterdir())[:5]:
        picture = read_picture(image_path)
        hu = scale_255(picture.pixels, picture.max_value) * 600 - 200
        mask = read_label_map(folder / "masks" / f"{image_path.stem}.png")
        if (mask == 1).any():
            assert np.median(hu[mask == 1]) < -150  # lung is below the window
        if (mask == 3).any():
            assert 20 < np.median(hu[mask == 3]) < 100  # liver


def test_exudate_labels_match_yellow_spots(collection):
    seen = set()
    for rng in rngs(10):
        sample = eye.fundus(rng, 64)
        spots = sample.masks["fundus-exudates"].astype(bool)
        assert sample.labels["fundus-exudates"] == int(spots.any())
        if spots.any():
            r, g, b = (sample.image[spots][:, c].mean() for c in range(3))
            retina_green = sample.image[~spots & (sample.image[..., 0] > 0.2), 1].mean()
            assert r > 0.8 and g > 1.5 * retina_green and b < g - 0.2  # yellow on the orange-red retina
        seen.add(sample.labels["fundus-exudates"])
    assert seen == {0, 1}
    folder = collection / "tasks" / "fundus-exudates"
    written = dict(list(csv.reader(open(folder / "labels.csv")))[1:])
    for index in range(10):  # the CSV holds what the generator drew for that image
        label = task_fundus(5, index, SIZE)["fundus-exudates"][1]
        assert written[f"fundus-exudates_{index:04d}"] == label


def test_pet_lesion_masks_are_hot(collection):
    folder = collection / "tasks" / "pet-organs"
    found = 0
    for mask_path in sorted((folder / "masks").iterdir()):
        mask = read_label_map(mask_path)
        if (mask == 4).any():
            picture = read_picture(folder / "images" / f"{mask_path.stem}.png")
            suv = scale_255(picture.pixels, picture.max_value) * 20
            body = (suv > 0.1) & (mask == 0)
            assert suv[mask == 4].max() > 1.5 * np.median(suv[body])  # hotter than the body background
            found += 1
    assert found >= 3


# --- Non-IID: a simple classifier on global intensity statistics separates the modalities --------------------

def _features(image: np.ndarray) -> np.ndarray:
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    grey = rgb.mean(2)
    gy, gx = np.gradient(grey)
    return np.concatenate([
        rgb.mean((0, 1)), rgb.std((0, 1)), np.percentile(grey, [5, 25, 50, 75, 95]),
        [(grey < 0.02).mean(), np.hypot(gy, gx).mean(), (rgb[..., 0] - rgb[..., 2]).mean()],
    ])


def test_modalities_are_separable_from_global_statistics():
    generators = {
        "CT": lambda r: radiology.ct_hu(r, radiology.torso(r, 8, 48))[4],
        "MR": lambda r: radiology.mr_t1(r, radiology.torso(r, 8, 48))[4],
        "PET": lambda r: radiology.pet(r, radiology.torso(r, 8, 48)).suv[4],
        "X-ray": lambda r: radiology.chest_xray(r, 48).image,
        "US": lambda r: ultrasound.fetal_head(r, 48).image,
        "Fundus": lambda r: eye.fundus(r, 48).image,
        "OCT": lambda r: eye.oct_bscan(r, 48).image,
        "Pathology": lambda r: optical.he_tile(r, 48).image,
        "Endoscopy": lambda r: optical.colonoscopy(r, 48).image,
        "Photo": lambda r: optical.dermoscopy(r, 48).image,
    }
    normalise = {"CT": VOLUME_NORMALIZERS["ct_hu"], "MR": VOLUME_NORMALIZERS["mr_percentile"],
                 "PET": VOLUME_NORMALIZERS["pet_suv"]}
    feats, labels = [], []
    for label, (modality, make) in enumerate(generators.items()):
        for rng in rngs(12, seed=label):
            image = make(rng)
            feats.append(_features(normalise.get(modality, lambda x: x)(image)))
            labels.append(label)
    x, y = np.array(feats), np.array(labels)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    train = np.arange(len(y)) % 2 == 0
    centroids = np.stack([x[train & (y == c)].mean(0) for c in range(len(generators))])
    predicted = np.argmin(((x[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y[~train]).mean() >= 0.95


# --- the written collection ----------------------------------------------------------------------------------

def test_collection_layout_recipe_and_tasks(collection):
    recipe = Recipe.load(collection / "recipe.yaml")
    assert {s.modality for s in recipe.sources} == set(MODALITIES)
    assert {s.name for s in recipe.sources} == {raw.source.name for raw in RAW_SOURCES}
    for name, (spec, ext) in TASKS.items():
        folder = collection / "tasks" / name
        written = TaskSpec(**yaml.safe_load((folder / "task.yaml").read_text()))
        assert written.type == spec.type and written.classes == spec.classes
        ids = [row[0] for row in csv.reader(open(folder / "splits.csv"))][1:]
        assert len(ids) == 10 and sorted(p.stem for p in (folder / "images").iterdir()) == ids
        assert {row[1] for row in csv.reader(open(folder / "splits.csv"))} - {"split"} == {"train", "val", "test"}
        if spec.type == "segmentation":
            assert sorted(p.stem for p in (folder / "masks").iterdir()) == ids
            values = set(np.unique(np.concatenate([read_label_map(p).ravel() for p in (folder / "masks").iterdir()])))
            assert values <= set(range(len(spec.classes))) and len(values) > 1
            shape = read_picture(folder / "images" / f"{ids[0]}.{ext}").pixels.shape[:2]
            assert list(shape) == written.image_size == list(read_label_map(folder / "masks" / f"{ids[0]}.png").shape)
        else:
            labels = [row[1] for row in csv.reader(open(folder / "labels.csv"))][1:]
            assert set(labels) <= set(spec.classes)


def test_every_written_file_reads_back(collection):
    """Each source's files read through the reader its recipe format names, with the count the recipe reports."""
    recipe = Recipe.load(collection / "recipe.yaml")
    for source in recipe.sources:
        files = sorted(recipe.root_of(source).glob(source.pattern))
        assert files, source.name
        if source.format == "dicom":
            series = group_dicom_series(files)
            volumes = [read_dicom_volume(paths) for paths in series.values()]
            count = sum(v.values.shape[0] for v in volumes)
            if source.modality == "PET":
                assert all(v.meta["suv_factor"] for v in volumes)
        elif source.format == "nifti":
            count = sum(v.values.shape[0] for f in files for v in read_nifti(f))
        elif source.format == "video":
            count = sum(1 for f in files for _ in read_video_frames(f, source.frame_stride))
        else:
            pictures = [read_picture(f) for f in files]
            count = len(pictures)
            assert all(p.pixels.shape[:2] == (SIZE, SIZE) for p in pictures)
        assert count == source.reported_count, source.name


def test_dicom_and_nifti_hold_the_generated_hounsfield_units(collection):
    dicom = read_dicom_volume(sorted((collection / "sources/ct-dicom/case_0000").glob("*.dcm")))
    _, hu = _ct_volume(5, "ct-dicom", 0, SIZE)
    above_floor = hu > -1020  # stored values are clipped at 0 = -1024 HU, as scanners do
    assert np.abs(dicom.values - hu)[above_floor].max() <= 0.25 + 1e-4  # slope 0.5: rounding to 0.25 HU
    nifti = read_nifti(collection / "sources/ct-nifti/case_0000.nii.gz")[0]  # stored with a flipped x axis
    _, hu = _ct_volume(5, "ct-nifti", 0, SIZE)
    np.testing.assert_array_equal(nifti.values, np.round(hu))
    pet = read_dicom_volume(sorted((collection / "sources/pet-dicom/case_0000").glob("*.dcm")))
    scan = _pet_scan(5, "pet-dicom", 0, SIZE)
    np.testing.assert_allclose(pet.values * pet.meta["suv_factor"], scan.suv, atol=1e-3 * scan.suv.max())


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_workers(tmp_path):
    make_phantoms(tmp_path / "a", per_modality=12, size=16, seed=1, task_images=5, workers=1)
    make_phantoms(tmp_path / "b", per_modality=12, size=16, seed=1, task_images=5, workers=2)
    make_phantoms(tmp_path / "c", per_modality=12, size=16, seed=2, task_images=5, workers=1)
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and sum(a[k] != c[k] for k in a) > len(a) // 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        make_phantoms("/nonexistent", size=15)
