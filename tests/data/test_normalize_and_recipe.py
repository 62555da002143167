"""Table 2 normalisations against direct formulas; the recipe schema's round trip and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from dex.data.normalize import ct_hu, mr_percentile, normalize_volume, pet_raw, pet_suv, scale_255
from dex.data.recipe import HoldOut, Recipe, Source
from dex.data.volumes import volume_slice


def test_ct_window():
    hu = np.array([-1000.0, -200.0, 100.0, 400.0, 3000.0])
    np.testing.assert_allclose(ct_hu(hu), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_mr_percentiles_of_the_volume():
    volume = np.random.default_rng(0).gamma(2.0, 100.0, (4, 16, 16))
    low, high = np.percentile(volume, 1), np.percentile(volume, 99)
    expected = (np.clip(volume, low, high) - low) / (high - low)
    np.testing.assert_allclose(mr_percentile(volume), expected, rtol=1e-5, atol=1e-6)


def test_pet_raw_three_stages():
    volume = np.random.default_rng(1).exponential(1000.0, (4, 8, 8))
    low, high = np.percentile(volume, [1, 99])
    clipped = np.clip(volume, low, high)
    z = (clipped - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(pet_raw(volume), (z - z.min()) / (z.max() - z.min()), rtol=1e-5, atol=1e-6)
    assert pet_raw(np.full((2, 2, 2), 5.0)).max() == 0.0  # a constant volume does not divide by zero


def test_suv_and_bit_depth():
    np.testing.assert_allclose(pet_suv(np.array([-1.0, 5.0, 25.0])), [0.0, 0.25, 1.0])
    np.testing.assert_allclose(scale_255(np.array([0, 255], np.uint8), 255.0), [0.0, 1.0])
    np.testing.assert_allclose(scale_255(np.array([0, 32768, 65535], np.uint16), 65535.0), [0.0, 0.5, 1.0], atol=1e-4)


def test_recipe_round_trip_and_relative_roots(tmp_path):
    recipe = Recipe("r", [Source("a", "CT", "data/a", "nifti", "ct_hu", reported_count=3),
                          Source("b", "US", "", "video", "scale_255", frame_stride=15)])
    recipe.save(tmp_path / "recipe.yaml")
    loaded = Recipe.load(tmp_path / "recipe.yaml")
    assert loaded.sources == recipe.sources
    assert loaded.root_of(loaded.sources[0]) == tmp_path / "data" / "a"
    assert loaded.root_of(loaded.sources[1]) is None  # left for the user to fill


def test_an_included_recipe_brings_its_sources_and_hold_outs_with_their_own_paths(tmp_path):
    base = tmp_path / "phantoms" / "recipe.yaml"
    base.parent.mkdir()
    Recipe("base", [Source("a", "CT", "sources/a", "nifti", "ct_hu"), Source("b", "US", "", "video", "scale_255")],
           hold_out=[HoldOut("tasks/t")]).save(base)
    top = tmp_path / "configs" / "recipe.yaml"
    top.parent.mkdir()
    top.write_text("include: [../phantoms/recipe.yaml]\nsources:\n"
                   "  - {name: c, modality: MR, root: real/c, format: image, normalization: scale_255}\n"
                   "hold_out: [{task: real/task}]\n")
    recipe = Recipe.load(top)
    assert [s.name for s in recipe.sources] == ["a", "b", "c"]
    roots = [recipe.root_of(s) for s in recipe.sources]
    assert [r and r.resolve() for r in roots] == [(tmp_path / "phantoms" / "sources" / "a").resolve(), None,
                                                  (tmp_path / "configs" / "real" / "c").resolve()]
    assert [recipe.resolve(h.task).resolve() for h in recipe.hold_out] == [
        (tmp_path / "phantoms" / "tasks" / "t").resolve(), (tmp_path / "configs" / "real" / "task").resolve()]
    top.write_text("include: [../phantoms/recipe.yaml]\nsources:\n"
                   "  - {name: a, modality: MR, root: x, format: image, normalization: scale_255}\n")
    with pytest.raises(ValueError, match=r"source names \['a'\] are used twice"):
        Recipe.load(top)
    top.write_text("include: [recipe.yaml]\n")
    with pytest.raises(ValueError, match="recipe.yaml: includes itself"):
        Recipe.load(top)
    top.write_text("name: empty\n")
    with pytest.raises(ValueError, match="recipe.yaml: sources: the recipe lists no source"):
        Recipe.load(top)


@pytest.mark.parametrize("entry,message", [
    ("{name: a, modality: CAT, root: x, format: nifti, normalization: ct_hu}",
     r"sources\[0\]\.modality: input should be 'CT', .* or 'Photo', got 'CAT'"),
    ("{name: a, modality: CT, root: x, format: mhd, normalization: ct_hu}", r"sources\[0\]\.format: .*got 'mhd'"),
    ("{name: a, modality: CT, root: x, format: nifti, normalization: zscore}", "normalization: .*got 'zscore'"),
    ("{name: a, modality: CT, root: x, format: nifti, normalization: ct_hu, colour: red}",
     r"sources\[0\]\.colour: unknown key; the known keys are name, modality"),
    ("{name: a, modality: CT}", r"sources\[0\]\.root: missing"),
    ("{name: a, modality: US, root: x, format: video, normalization: scale_255, frame_stride: thirty}",
     r"sources\[0\]\.frame_stride: input should be a valid integer.*got 'thirty'"),
    ("{name: a, modality: US, root: x, format: video, normalization: scale_255, frame_stride: 0}",
     "frame_stride must be at least 1"),
])
def test_recipe_errors_name_the_file_and_source(tmp_path, entry, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: r\nsources:\n  - {entry}\n")
    with pytest.raises(ValueError, match=f"bad.yaml.*{message}"):
        Recipe.load(path)
    path.write_text("name: r\nsources:\n  - {name: a, modality: CT, root: x, format: nifti, normalization: ct_hu}\n"
                    "  - {name: a, modality: MR, root: y, format: nifti, normalization: mr_percentile}\n")
    with pytest.raises(ValueError, match="used twice"):
        Recipe.load(path)


def test_modality_names_match_the_canonical_ones_whatever_the_case(tmp_path):
    from dex.data.recipe import canonical_modality
    from dex.data.tasks import TaskSpec

    assert [canonical_modality(n) for n in ("fundus", "XRAY", "x_ray", "X ray", "pet", "mr", "Dermatology")] == [
        "Fundus", "X-ray", "X-ray", "X-ray", "PET", "MR", "Dermatology"]
    path = tmp_path / "r.yaml"
    path.write_text("sources:\n  - {name: a, modality: fundus, root: x, format: image, normalization: scale_255}\n")
    assert Recipe.load(path).sources[0].modality == "Fundus"
    spec = TaskSpec(name="t", type="classification", modality="oct", classes=["a"], image_size=[8, 8], channels=1)
    assert spec.modality == "OCT"  # one table row per modality, however a task folder spells it


def test_ct_window_and_the_16_bit_slices_of_a_normalised_volume():
    hu = np.array([[[-1000.0, -200.0, 100.0, 400.0, 3000.0]]])
    np.testing.assert_allclose(ct_hu(hu), [[[0.0, 0.0, 0.5, 1.0, 1.0]]])
    np.testing.assert_allclose(ct_hu(hu, (-1000.0, 1000.0)), [[[0.0, 0.4, 0.55, 0.7, 1.0]]], atol=1e-7)
    np.testing.assert_array_equal(normalize_volume(hu, "ct_hu", (-1000.0, 1000.0)), ct_hu(hu, (-1000.0, 1000.0)))
    np.testing.assert_array_equal(normalize_volume(hu, "pet_suv"), pet_suv(hu))
    with pytest.raises(ValueError, match="'hu': one of ct_hu"):
        normalize_volume(hu, "hu")
    volume = np.random.default_rng(0).random((3, 4, 5))
    for axis, cut in (("axial", volume[1]), ("coronal", volume[:, 1]), ("sagittal", volume[:, :, 1])):
        stored = volume_slice(volume, 1, axis)
        assert stored.dtype == np.uint16 and np.abs(stored / 65535.0 - cut).max() <= 0.5 / 65535
