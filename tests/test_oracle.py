"""An outside oracle for CT assembly: SimpleITK's (GDCM's) series reader vs radforge, on generated
series with the geometry real archives have. Both read the same files; radforge's volume (HU at
native spacing, in its planned slice order) and affine must equal SimpleITK's: |ΔHU| ≤ 1 and
every affine entry within 1e-4 mm. Where radforge splits a series (two acquisitions) or drops a
copy, SimpleITK is handed the files of the one acquisition / without the copy."""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radforge import deid, dicom, phantoms
from radforge.config import IngestRecipe

sitk = pytest.importorskip("SimpleITK")

HU_TOL = 1.0
AFFINE_TOL_MM = 1e-4
FIGURES: dict[str, dict] = {}  # case → measured agreement (written beside the test run, see below)


def _radforge(paths: list[str]) -> list[tuple[dicom.PlanItem, np.ndarray, np.ndarray]]:
    rows = []
    for p in paths:
        with open(p, "rb") as f:
            rows.append(dicom.scan(p, os.path.getsize(p), f))
    ctx = dicom.PlanContext(recipe=IngestRecipe(), pseudo=deid.Pseudonymizer(b"oracle"))
    groups = defaultdict(list)
    for r in rows:
        groups[r["group_key"]].append(r)
    items = [it for g in groups.values() for it in dicom.plan_group(g, ctx)]
    out = []
    for it in items:
        if it.status == "planned":
            hu, affine = dicom.load_ct(it, lambda p: Path(p).read_bytes())
            out.append((it, hu, affine))
    return out


def _sitk(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's series reader on exactly these files, sorted by GDCM (IPP along the normal)."""
    d = os.path.dirname(paths[0])
    names = [n for n in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(d) if n in set(paths)]
    assert len(names) == len(paths)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img)  # [k, j, i]
    affine = np.eye(4)
    affine[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return arr, affine


def _compare(case: str, rf: tuple, paths: list[str]) -> None:
    item, hu, affine = rf
    ref, ref_affine = _sitk(paths)
    if np.dot(affine[:3, 2], ref_affine[:3, 2]) < 0:  # the same stack, listed the other way round
        ref = ref[::-1]
        ref_affine = ref_affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, ref.shape[0] - 1], [0, 0, 0, 1]])
    assert hu.shape == ref.shape, case
    d_hu = float(np.abs(hu - ref).max())
    d_aff = float(np.abs(affine - ref_affine).max())
    FIGURES[case] = {"max_abs_dHU": d_hu, "max_abs_daffine_mm": d_aff, "shape": list(hu.shape)}
    assert d_hu <= HU_TOL, (case, d_hu)
    assert d_aff <= AFFINE_TOL_MM, (case, d_aff)


@pytest.fixture(scope="module")
def study():
    return phantoms.make_study(phantoms.make_patient(7))


c, s = np.cos(np.radians(25)), np.sin(np.radians(25))  # double oblique: 15° about z, then 25° about the row
c2, s2 = np.cos(np.radians(15)), np.sin(np.radians(15))
CASES = {
    "axial_shuffled": dict(kind="ct_series"),
    "sagittal": dict(kind="ct_series", orientation="sagittal", rows=40, cols=36, n_slices=14),
    "per_slice_rescale": dict(kind="ct_series", per_slice_rescale=True, n_slices=16),
    "oblique": dict(kind="oriented", row_dir=(c2, s2, 0.0), col_dir=(-s2 * c, c2 * c, -s)),
    "feet_first": dict(kind="oriented", row_dir=(-1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0), reverse_files=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_radforge_equals_simpleitk(case, tmp_path, study):
    kw = dict(CASES[case])
    kind = kw.pop("kind")
    if kind == "ct_series":
        paths = phantoms.ct_series(tmp_path, study, **{"n_slices": 12, "rows": 32, "cols": 32, **kw}).paths
    else:
        paths = phantoms.oriented_series(tmp_path, study, **kw)
    (rf,) = _radforge(paths)
    _compare(case, rf, paths)


def test_two_acquisitions_and_a_duplicate_copy_equal_simpleitk_per_acquisition(tmp_path, study):
    base = phantoms.ct_series(tmp_path / "a", study, n_slices=12, rows=32, cols=32, seed=3)
    second = phantoms.second_acquisition(base, tmp_path / "a", hu_offset=250)
    copy = phantoms.rewrite(base.paths[5], tmp_path / "elsewhere" / "copy.dcm")
    vols = _radforge(base.paths + second + [copy])
    assert sorted(it.sub_series for it, _, _ in vols) == ["AcquisitionNumber=1", "AcquisitionNumber=2"]
    for rf in vols:
        # SimpleITK reads one acquisition from a folder of its own (GDCM does not split series).
        acq = int(rf[0].sub_series.split("=")[1])
        own = tmp_path / f"acq{acq}"
        own.mkdir()
        files = []
        for p in base.paths + second:
            if int(pydicom.dcmread(p, stop_before_pixels=True).AcquisitionNumber) == acq:
                files.append(str(own / Path(p).name))
                shutil.copyfile(p, files[-1])
        _compare(f"acquisition_{acq}_with_copy", rf, files)


def test_zz_write_figures(tmp_path_factory):
    """The agreement figures of this run, for the record (pytest's basetemp/oracle-figures.json)."""
    out = tmp_path_factory.getbasetemp() / "oracle-figures.json"
    out.write_text(json.dumps(FIGURES, indent=1, sort_keys=True))
    assert FIGURES or pytest.skip("no case ran")
