"""Naming the inputs of dex predict and dex embed: one output name per case, told apart by kind where names meet."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from PIL import Image

from dex.downstream.inputs import find_inputs
from tests.conftest import ct_series


def test_cases_of_one_name_are_told_apart_by_their_kind(tmp_path):
    inputs = tmp_path / "in"
    ct_series(inputs / "case_0000", "slice", "1.2.3.4", 3, 0)
    ct_series(inputs / "case_0000", "other", "1.2.3.5", 3, 5)  # a second series in the same folder
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4)), inputs / "case_0000.nii.gz")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(inputs / "b.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(inputs / "c.png")
    np.save(inputs / "c.npy", np.zeros((8, 8), np.float32))
    errors = []
    names = {(entry.kind, str(entry.name)) for entry in find_inputs([inputs], errors)}
    assert not errors
    assert names == {("nifti", "case_0000_nii"), ("series", "case_0000_dicom"), ("series", "case_0000_dicom_2"),
                     ("picture", "b"), ("picture", "c_png"), ("picture", "c_npy")}
