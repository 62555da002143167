"""The templated reports of the 2D phantom sources: one index.csv row per image, the modality named, sizes and sides
that match what was drawn, and the same bytes for a seed whatever the number of workers."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dex.data.curation import discover_units
from dex.data.phantoms import eye, make_phantoms, optical, radiology, reports
from dex.data.phantoms.generate import item_rng
from dex.data.phantoms.shapes import to_uint
from dex.data.readers import read_picture
from dex.data.recipe import MODALITIES, Recipe

SIZE, SEED, PER_MODALITY = 64, 7, 10
#: a word each report of a modality must contain
MODALITY_WORDS = {"X-ray": "X-ray", "US": "ultrasound", "Fundus": "fundus", "OCT": "OCT", "Pathology": "pathology",
                  "Endoscopy": "endoscop", "Photo": "photo"}


def _generate(out: Path, workers: int, seed: int = SEED) -> Path:
    make_phantoms(out, per_modality=PER_MODALITY, size=SIZE, seed=seed, task_images=5, workers=workers)
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("reports"), workers=1)


def _picture_sources(folder: Path):
    recipe = Recipe.load(folder / "recipe.yaml")
    return recipe, [s for s in recipe.sources if s.format == "image"]


def _rows(recipe: Recipe, source) -> list[dict[str, str]]:
    with open(recipe.root_of(source) / source.index_csv, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_image_has_one_report_row(collection):
    recipe, sources = _picture_sources(collection)
    assert len(sources) == 8
    for source in sources:
        root = recipe.root_of(source)
        assert source.index_csv == "index.csv"
        header = (root / "index.csv").read_text(encoding="utf-8").split("\n")[0]
        assert header == "path,modality,anatomy,report,report_type"
        rows = _rows(recipe, source)
        files = sorted(p.relative_to(root).as_posix() for p in root.glob(source.pattern))
        assert [r["path"] for r in rows] == files and len(files) == source.reported_count
        assert all(r["report"].strip() for r in rows)
        assert {(r["modality"], r["anatomy"], r["report_type"]) for r in rows} == {
            (source.modality, source.anatomy, source.modality)}
        assert source.modality in MODALITIES
        # the curation lists the same images through the CSV as through the pattern
        assert [u.key for u in discover_units(recipe, source)] == files
    for source in recipe.sources:
        if source.format != "image":
            assert not source.index_csv and not (recipe.root_of(source) / "index.csv").exists()


def test_reports_name_the_modality_and_vary_in_wording(collection):
    recipe, sources = _picture_sources(collection)
    for source in sources:
        texts = [r["report"] for r in _rows(recipe, source)]
        word = MODALITY_WORDS[source.modality]
        assert all(word.lower() in t.lower() for t in texts), (source.name, texts)
        assert all(1 <= t.count(". ") + 1 <= 3 for t in texts)
        assert len({t.split(". ")[0] for t in texts}) > 1, source.name  # more than one wording of the first sentence


def _heart_checks(report: str, fields: np.ndarray, size: int) -> None:
    """The heart's width, cardiothoracic ratio and side stated in ``report`` against the radiograph's field mask."""
    spacing = radiology.FIELD_MM / size  # mm per column
    heart = np.flatnonzero((fields == 2).any(0))
    thorax = np.flatnonzero((fields > 0).any(0))
    width_px, thorax_px = heart[-1] - heart[0] + 1, thorax[-1] - thorax[0] + 1
    stated = float(re.search(r"(\d+(?:\.\d+)?) mm (?:wide|across)", report)[1])
    assert abs(stated - width_px * spacing) <= 1.5 * spacing, report
    ratio = float(re.search(r"cardiothoracic ratio (\d\.\d\d)", report)[1])
    assert ratio == pytest.approx(width_px / thorax_px, abs=0.04), report
    heart_column = np.nonzero(fields == 2)[1].mean()
    image_side = "right" if heart_column > (thorax[0] + thorax[-1]) / 2 else "left"
    patient_side = {"right": "left", "left": "right"}[image_side]  # a PA radiograph is viewed facing the patient
    assert f"patient's {patient_side}" in report, report


def test_xray_heart_size_and_side_match_the_drawn_fields(collection):
    recipe, sources = _picture_sources(collection)
    source = next(s for s in sources if s.name == "xray-png8")
    for row in _rows(recipe, source):
        index = int(row["path"].split("_")[1].split(".")[0])
        sample = radiology.chest_xray(item_rng(SEED, source.name, index), SIZE)
        written = read_picture(recipe.root_of(source) / row["path"]).pixels
        np.testing.assert_array_equal(written, to_uint(sample.image, 8))  # the report's image is this drawing
        _heart_checks(row["report"], sample.masks["xray-lungs"], SIZE)


def _place_of(row: float, column: float, size: int) -> tuple[str, str]:
    """Which third (top / middle / bottom, left / middle / right) a pixel lies in."""
    y, x = 2 * row / (size - 1) - 1, 2 * column / (size - 1) - 1
    return ("top" if y < -1 / 3 else "bottom" if y > 1 / 3 else "",
            "left" if x < -1 / 3 else "right" if x > 1 / 3 else "")


def _polyp_checks(report: str, mask: np.ndarray, size: int) -> None:
    """The polyp's largest diameter and place stated in ``report`` against its mask."""
    rows, columns = np.nonzero(mask)
    words = re.search(r"polyp(?:, [\d.]+ mm,)? at the ([a-z ]+?) of the frame", report)[1]
    expected = " ".join(w for w in _place_of(rows.mean(), columns.mean(), size) if w) or "centre"
    assert words == expected, report
    if rows.min() > 0 and columns.min() > 0 and rows.max() < size - 1 and columns.max() < size - 1:
        # a filled ellipse's covariance has eigenvalues (semi-axis / 2) ** 2
        axis_px = 4 * np.sqrt(np.linalg.eigvalsh(np.cov(np.stack([rows, columns]))).max())
        spacing = reports.FIELD_MM["Endoscopy"][1] / size
        stated = float(re.search(r"(\d+(?:\.\d+)?) mm", report)[1])
        assert abs(stated - axis_px * spacing) <= 1.5 * spacing, report


def test_polyp_size_and_place_match_the_mask(collection):
    recipe, sources = _picture_sources(collection)
    source = next(s for s in sources if s.name == "endoscopy-jpeg")
    seen = 0
    for row in _rows(recipe, source):
        index = int(row["path"].split("_")[1].split(".")[0])
        mask = optical.colonoscopy(item_rng(SEED, source.name, index), SIZE).masks["endoscopy-polyp"]
        if mask.any():
            _polyp_checks(row["report"], mask, SIZE)
            seen += 1
        else:
            assert "polyp" not in row["report"].replace("No polyp", ""), row["report"]
    assert seen
    for i in range(6):  # and frames that all have one
        rng = np.random.default_rng([3, i])
        sample = optical.colonoscopy(rng, SIZE, polyp=True)
        _polyp_checks(reports.colonoscopy(sample.findings, SIZE, rng), sample.masks["endoscopy-polyp"], SIZE)


def test_fundus_eye_and_exudates_match_the_image():
    for i in range(8):
        rng = np.random.default_rng([4, i])
        sample = eye.fundus(rng, SIZE)
        report = reports.fundus(sample.findings, SIZE, rng)
        glow = ndimage.gaussian_filter(sample.image[..., 1], 3)  # the optic disc is the largest bright spot
        disc_column = np.unravel_index(glow.argmax(), glow.shape)[1]
        side = "right" if disc_column > (SIZE - 1) / 2 else "left"  # a right eye's disc is on the image's right
        assert f"{side} eye" in report.lower(), report
        count = re.search(r"(\d+) hard exudates?", report)
        spots = sample.masks["fundus-exudates"]
        if sample.labels["fundus-exudates"]:
            assert count and int(count[1]) >= ndimage.label(spots)[1], report  # touching spots merge
        else:
            assert count is None and "exudates" in report, report


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_reports_any_workers(collection, tmp_path):
    again = _digest(_generate(tmp_path / "workers2", workers=2))
    first = _digest(collection)
    indexes = [k for k in first if k.endswith("/index.csv")]
    assert len(indexes) == 8 and all(first[k] == again[k] for k in indexes)
    assert first == again  # every file, byte for byte
    other = _digest(_generate(tmp_path / "seed", workers=1, seed=SEED + 1))
    assert all(first[k] != other[k] for k in indexes)
