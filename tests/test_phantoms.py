"""The phantom generators are the ground truth for every other test, so they are checked by
reading their output back through pydicom only (never through radforge.dicom)."""

from __future__ import annotations

import csv
import importlib.util
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from radforge import phantoms as ph

ENCODABLE = ph.encodable_transfer_syntaxes()
PHI_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientAddress", "AccessionNumber",
                "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
                "PerformingPhysicianName", "OperatorsName", "StudyID", "StudyDescription",
                "SeriesDescription", "ImageComments", "RequestingPhysician")
SAFE_KEYWORDS = ("Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "PatientSex",
                 "PatientAge", "StudyDate", "ImageType", "SOPClassUID")


def _study(index: int = 3, **findings) -> ph.Study:
    f = {k: findings.get(k, 1) for k in ph.FINDINGS}
    return ph.make_study(ph.make_patient(index), findings=f)


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _check_geometry(info: ph.SeriesInfo) -> None:
    """Map every pixel of every file to LPS mm and from there into hu_lps: values must agree."""
    origin = np.array(info.origin_xyz)
    spacing_xyz = np.array(info.spacing_zyx[::-1])
    for path in info.paths:
        ds = pydicom.dcmread(path)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        pos = ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]
        idx = (pos - origin) / spacing_xyz
        assert np.allclose(idx, np.rint(idx), atol=1e-3), path
        ix, iy, iz = np.rint(idx).astype(int).transpose(2, 0, 1)
        np.testing.assert_array_equal(_hu(ds), info.hu_lps[iz, iy, ix])


# --------------------------------------------------------------------------------- identities


def test_patient_and_study_are_deterministic_and_marked():
    p = ph.make_patient(7, seed=3)
    assert p == ph.make_patient(7, seed=3)
    assert p.name == "ZZPHIFAMILY0007^ZZPHIGIVEN0007" and p.patient_id == "ZZPHIID0007"
    assert len(p.birth_date) == 8 and p.birth_date.isdigit() and ph.PHI_MARKER not in p.birth_date
    assert p.sex in "MF" and p.age.endswith("Y") and len(p.age) == 4
    s = ph.make_study(p, 0, seed=3)
    assert s.accession == "ZZPHIACC0007-1"
    assert s.study_uid == ph.make_study(p, 0, seed=3).study_uid != ph.make_study(p, 1, seed=3).study_uid
    assert set(s.findings) == set(ph.FINDINGS)
    assert all(v in (1, 0, -1, None) for v in s.findings.values())
    with pytest.raises(ValueError):
        ph.make_study(p, findings={"fracture": 1})


def test_report_states_findings_and_carries_phi():
    s = ph.make_study(ph.make_patient(1), findings={"nodule": 1, "effusion": 0, "cardiomegaly": -1})
    text = s.report
    assert "nodule is present" in text and "No pleural effusion" in text and "possible cardiomegaly" in text
    for value in (s.patient.patient_id, s.accession, s.patient.birth_date_variants[2], s.patient.family):
        assert value in text
    assert s.present("nodule") and not s.present("effusion") and not s.present("cardiomegaly")


# --------------------------------------------------------------------------------- CT


@pytest.mark.parametrize("ts", ENCODABLE, ids=lambda u: UID(u).keyword or str(u))
def test_ct_series_round_trips_every_encodable_transfer_syntax(tmp_path, ts):
    info = ph.ct_series(tmp_path, _study(), n_slices=6, rows=32, cols=40, transfer_syntax=ts, seed=1)
    assert info.expected_reason is None and info.hu_lps.shape == info.shape_zyx == (6, 32, 40)
    by_z = {}
    for path in info.paths:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ts
        assert ds.SOPClassUID == CTImageStorage
        by_z[float(ds.ImagePositionPatient[2])] = _hu(ds)
    for k, z in enumerate(sorted(by_z)):
        np.testing.assert_array_equal(by_z[z], info.hu_lps[k])


def test_ct_series_files_are_shuffled_and_instance_numbers_scrambled(tmp_path):
    info = ph.ct_series(tmp_path, _study(), n_slices=12, seed=2)
    rows = sorted((float(pydicom.dcmread(p).ImagePositionPatient[2]), int(pydicom.dcmread(p).InstanceNumber),
                   Path(p).name) for p in info.paths)
    instance = [r[1] for r in rows]
    names = [r[2] for r in rows]
    assert sorted(instance) == list(range(1, 13)) and instance != sorted(instance)
    assert names != sorted(names)


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_geometry_matches_ground_truth(tmp_path, orientation):
    info = ph.ct_series(tmp_path, _study(), n_slices=10, rows=36, cols=44, pixel_spacing=(0.7, 0.9),
                        slice_spacing=2.0, orientation=orientation, seed=4)
    n = {"axial": 0, "coronal": 1, "sagittal": 2}[orientation]
    assert info.shape_zyx[n] == 10 and info.spacing_zyx[n] == 2.0
    _check_geometry(info)


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_marker_is_left_anterior_superior(tmp_path, orientation):
    info = ph.ct_series(tmp_path, _study(nodule=0), n_slices=24, rows=48, cols=48, orientation=orientation)
    vol = info.hu_lps
    z, y, x = np.nonzero(vol >= 900)
    centre = (np.array(vol.shape) - 1) / 2
    assert len(z) and x.min() > centre[2] and y.max() < centre[1] and z.min() > centre[0]


def test_each_finding_is_visible():
    def vol(**flags):
        return ph.chest_volume((24, 64, 64), _study(**{k: flags.get(k, 0) for k in ph.FINDINGS}), seed=5)

    lung = lambda v: np.count_nonzero((v > -950) & (v < -700))
    none = vol()
    assert np.count_nonzero((none > 90) & (none < 200)) == 0  # nothing nodule-like
    assert np.count_nonzero((none > 0) & (none < 30)) == 0  # nothing fluid-like (body is 40 +- 10)
    assert np.count_nonzero((vol(nodule=1) > 90) & (vol(nodule=1) < 200)) > 100
    assert np.count_nonzero((vol(effusion=1) > 0) & (vol(effusion=1) < 30)) > 1000
    assert lung(vol(cardiomegaly=1)) < 0.9 * lung(none)  # the big heart displaces lung


def test_per_slice_and_signed_rescale_are_exact(tmp_path):
    info = ph.ct_series(tmp_path / "a", _study(), n_slices=8, per_slice_rescale=True, seed=6)
    slopes = {float(pydicom.dcmread(p).RescaleSlope) for p in info.paths}
    assert slopes == {0.5, 1.0}
    _check_geometry(info)
    signed = ph.ct_series(tmp_path / "b", _study(), n_slices=5, rescale=(1.0, 0.0), shuffle_names=False)
    ds = pydicom.dcmread(signed.paths[0])
    assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16 and ds.pixel_array.min() < 0
    _check_geometry(signed)


def _positions(info):
    return sorted(tuple(float(v) for v in pydicom.dcmread(p).ImagePositionPatient) for p in info.paths)


def test_defects_carry_reasons_and_show_in_headers(tmp_path):
    s = _study()
    gap = ph.ct_series(tmp_path / "gap", s, n_slices=10, gap_after=4, slice_spacing=2.5)
    steps = np.diff([p[2] for p in _positions(gap)])
    assert gap.expected_reason == "slice_gap" and gap.hu_lps is None
    assert sorted(np.round(steps, 3).tolist()) == [2.5] * 8 + [5.0]

    dup = ph.ct_series(tmp_path / "dup", s, n_slices=10, duplicate_at=3)
    zs = [p[2] for p in _positions(dup)]
    assert dup.expected_reason == "duplicate_position" and len(set(zs)) == 9 and len(zs) == 10

    tilt = ph.ct_series(tmp_path / "tilt", s, n_slices=6, tilt_deg=20.0, slice_spacing=2.0)
    pos = np.array(_positions(tilt))
    assert tilt.expected_reason == "gantry_tilt"
    np.testing.assert_allclose(np.diff(pos[:, 1]), np.tan(np.radians(20.0)) * 2.0, atol=1e-4)
    ds = pydicom.dcmread(tilt.paths[0])
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.GantryDetectorTilt) == 20.0

    mixed = ph.ct_series(tmp_path / "mix", s, n_slices=8, mixed_matrix_at=2)
    assert mixed.expected_reason == "mixed_geometry"
    assert {(pydicom.dcmread(p).Rows, pydicom.dcmread(p).Columns) for p in mixed.paths} == {(64, 64), (32, 32)}

    few = ph.ct_series(tmp_path / "few", s, n_slices=3)
    assert few.expected_reason == "too_few_slices" and len(few.paths) == 3

    scout = ph.ct_series(tmp_path / "scout", s, n_slices=1, localizer=True, orientation="coronal")
    assert scout.expected_reason == "localizer"
    assert list(pydicom.dcmread(scout.paths[0]).ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def test_same_arguments_give_identical_bytes(tmp_path):
    a = ph.ct_series(tmp_path / "a", _study(), n_slices=4, seed=9)
    b = ph.ct_series(tmp_path / "b", _study(), n_slices=4, seed=9)
    assert [Path(p).name for p in a.paths] == [Path(p).name for p in b.paths]
    assert all(Path(p).read_bytes() == Path(q).read_bytes() for p, q in zip(a.paths, b.paths))
    c = ph.ct_series(tmp_path / "c", _study(), n_slices=4, seed=10)
    assert c.series_uid != a.series_uid and not set(c.sop_uids) & set(a.sop_uids)


def test_enhanced_ct_needs_sorting_by_position(tmp_path):
    info = ph.enhanced_ct(tmp_path / "mf", _study(), n_frames=12, rows=40, cols=36)
    ds = pydicom.dcmread(info.paths[0])
    assert ds.SOPClassUID == EnhancedCTImageStorage and int(ds.NumberOfFrames) == 12
    assert "PixelSpacing" not in ds and "ImagePositionPatient" not in ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    slope = float(shared.PixelValueTransformationSequence[0].RescaleSlope)
    intercept = float(shared.PixelValueTransformationSequence[0].RescaleIntercept)
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.9, 0.9]
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert z != sorted(z)
    frames = ds.pixel_array.astype(np.float64) * slope + intercept
    np.testing.assert_array_equal(frames[np.argsort(z)], info.hu_lps)
    stack = [f.FrameContentSequence[0].InStackPositionNumber for f in ds.PerFrameFunctionalGroupsSequence]
    assert [stack[i] for i in np.argsort(z)] == list(range(1, 13))


# --------------------------------------------------------------------------------- X-ray


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless, JPEG2000Lossless])
def test_xray_round_trip_and_display_truth(tmp_path, photometric, ts):
    if ts not in ENCODABLE:
        pytest.skip("encoder not installed")
    info = ph.xray(tmp_path / "x.dcm", _study(), rows=80, cols=64, photometric=photometric, transfer_syntax=ts)
    ds = pydicom.dcmread(info.path)
    arr = ds.pixel_array
    np.testing.assert_array_equal(arr, info.stored)
    maxv = (1 << int(ds.BitsStored)) - 1
    display = maxv - arr.astype(np.int64) if ds.PhotometricInterpretation == "MONOCHROME1" else arr
    np.testing.assert_array_equal(display, info.display)
    r0, r1, c0, c1 = info.marker_box
    assert (display[r0:r1, c0:c1] == maxv).all() and (np.count_nonzero(display == maxv) == (r1 - r0) * (c1 - c0))
    assert r1 <= ds.Rows // 2 and c1 <= ds.Columns // 2  # top-left: nobody may flip it
    assert ds.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")


def test_xray_variants(tmp_path):
    s = _study()
    cr = ph.xray(tmp_path / "cr.dcm", s, modality="CR", photometric="MONOCHROME1", window=None, voi_lut=True)
    ds = pydicom.dcmread(cr.path)
    assert ds.SOPClassUID == ComputedRadiographyImageStorage and "WindowCenter" not in ds
    from pydicom.pixels import apply_voi_lut

    out = apply_voi_lut(ds.pixel_array, ds)
    assert out.max() <= 4095 and out.min() >= 0 and np.unique(out).size > 10
    lut = np.asarray(ds.VOILUTSequence[0].LUTData)
    assert (np.diff(lut) >= 0).all()
    dx8 = ph.xray(tmp_path / "dx8", s, bits_stored=8, window=(128, 256))
    ds8 = pydicom.dcmread(dx8.path)
    assert ds8.BitsAllocated == 8 and ds8.pixel_array.dtype == np.uint8
    assert ds8.SOPClassUID == DigitalXRayImageStorageForPresentation and float(ds8.WindowWidth) == 256
    def radiograph(**flags):
        return ph.chest_radiograph(200, 160, _study(**{k: flags.get(k, 0) for k in ph.FINDINGS}), 4095)[0]

    lung = lambda img: np.count_nonzero(img < 0.25 * 4095)
    none = radiograph()
    assert lung(radiograph(effusion=1)) < 0.92 * lung(none)  # fluid whitens the bases
    assert lung(radiograph(cardiomegaly=1)) < 0.92 * lung(none)
    nodule = lambda img: np.count_nonzero((img > 0.55 * 4095) & (img < 0.62 * 4095))
    assert nodule(none) == 0 and nodule(radiograph(nodule=1)) > 100


# --------------------------------------------------------------------------------- bad + package


def test_bad_files(tmp_path):
    bad = ph.bad_files(tmp_path)
    assert set(bad.values()) == set(ph.FILE_REASONS)
    assert all(Path(p).is_file() for p in bad)
    by_name = {Path(p).name: r for p, r in bad.items()}
    assert by_name["empty.dcm"] == "not_dicom" and os.path.getsize(tmp_path / "empty.dcm") == 0
    assert by_name["no_preamble.dcm"] == ph.NO_PREAMBLE_REASON
    for name in ("empty.dcm", "notes.dcm", "garbage.bin", "no_preamble.dcm"):
        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(tmp_path / name)
    assert pydicom.dcmread(tmp_path / "no_preamble.dcm", force=True).Modality == "DX"  # really DICOM
    smashed = pydicom.dcmread(tmp_path / "smashed_header.dcm")  # pydicom does not raise...
    assert "SOPClassUID" not in smashed and "Modality" not in smashed  # ...but nothing is usable
    trunc = pydicom.dcmread(tmp_path / "truncated.dcm")  # header and even dcmread are fine...
    with pytest.raises(ValueError):
        trunc.pixel_array  # ...only decoding notices
    assert {pydicom.dcmread(tmp_path / f"{m.lower()}.dcm").Modality for m in ("MR", "US", "SR")} == {"MR", "US", "SR"}


def test_package_files_never_crash_and_exist():
    groups = ph.package_files()
    assert set(groups) == {"ct_slices", "cr", "dx", "enhanced_ct", "unsupported"}
    assert all(Path(p).is_file() for paths in groups.values() for p in paths)
    assert groups["ct_slices"]  # CT_small.dcm ships with pydicom itself
    if importlib.util.find_spec("data_store"):
        assert groups["cr"] and groups["enhanced_ct"]
        ts = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in groups["ct_slices"]}
        assert len(ts) >= 2
    if importlib.util.find_spec("deid_data"):
        assert groups["dx"]


# --------------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pydicom validation warnings: every value is legal
        return ph.build_corpus(tmp_path_factory.mktemp("corpus") / "c", n_patients=6, seed=0)


def _walk(root):
    return {str(Path(d) / f) for d, _, fs in os.walk(root) for f in fs}


def test_corpus_counts_match_files_on_disk(corpus):
    files = _walk(corpus.dicom_dir)
    assert files == set(corpus.outcome)
    e = corpus.expected
    assert e["files"] == len(files)
    assert e["files"] == e["ct_files"] + e["xray_images"] + sum(e["rejected"].values()) + sum(e["skipped"].values())
    assert e["ct_volumes"] == sum(1 for s in corpus.series if s.expected_reason is None)
    assert set(e["rejected"]) | set(e["skipped"]) <= set(ph.SERIES_REASONS) | set(ph.FILE_REASONS)
    assert e["skipped"] == {"localizer": 1} and e["skipped_series"] == {"localizer": 1}
    for reason in ("slice_gap", "duplicate_position", "gantry_tilt", "mixed_geometry", "too_few_slices"):
        assert e["rejected_series"][reason] >= 1
    if corpus.bad:
        assert set(ph.FILE_REASONS) <= set(e["rejected"])


def test_corpus_layout_exercises_the_reader(corpus):
    root = Path(corpus.root)
    assert Path(corpus.reports_csv).parent == root and Path(corpus.labels_csv).parent == root
    assert not _walk(corpus.dicom_dir) & {corpus.reports_csv, corpus.labels_csv}
    dirs = defaultdict(set)
    for s in corpus.series:
        for p in s.paths:
            dirs[s.series_uid].add(str(Path(p).parent))
    assert any(len(d) == 2 for d in dirs.values())  # one series split over two folders
    per_dir = defaultdict(set)
    for s in corpus.series:
        for d in dirs[s.series_uid]:
            per_dir[d].add(s.series_uid)
    assert any(len(v) >= 2 for v in per_dir.values())  # two series in one folder
    assert {s.transfer_syntax for s in corpus.series} >= set(ENCODABLE)
    assert {s.orientation for s in corpus.series} == {"axial", "coronal", "sagittal"}
    assert any(s.kind == "enhanced_ct" for s in corpus.series)
    assert any(not Path(p).suffix for p in corpus.outcome)
    assert {(i.modality, i.photometric) for i in corpus.images} >= {
        ("DX", "MONOCHROME1"), ("DX", "MONOCHROME2"), ("CR", "MONOCHROME1"), ("CR", "MONOCHROME2")}
    assert any(i.voi_lut for i in corpus.images) and any(i.window for i in corpus.images)
    for s in corpus.series:
        if s.expected_reason is None and s.kind == "ct":
            ds = pydicom.dcmread(s.paths[0], stop_before_pixels=True)
            assert ds.SeriesInstanceUID == s.series_uid


def test_corpus_tables(corpus):
    with open(corpus.reports_csv, newline="") as f:
        reports = list(csv.DictReader(f))
    with open(corpus.labels_csv, newline="") as f:
        labels = list(csv.DictReader(f))
    assert list(reports[0]) == ["AccessionNumber", "StudyInstanceUID", "report"]
    assert list(labels[0]) == ["AccessionNumber", *ph.FINDINGS]
    accessions = {s.accession for s in corpus.studies}
    assert {r["AccessionNumber"] for r in reports} == accessions == {r["AccessionNumber"] for r in labels}
    values = {v for r in labels for k, v in r.items() if k != "AccessionNumber"}
    assert values <= {"1", "0", "-1", ""}
    assert all(ph.PHI_MARKER in r["report"] for r in reports)
    assert all(r["StudyInstanceUID"] in corpus.secrets for r in reports)


def test_phi_is_planted_in_every_header(corpus):
    for path in [corpus.series[0].paths[0], corpus.images[0].path, next(s for s in corpus.series
                                                                        if s.kind == "enhanced_ct").paths[0]]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for kw in PHI_KEYWORDS:
            assert ph.PHI_MARKER in str(ds[kw].value), kw
        assert ds.PatientBirthDate in corpus.secrets
        block = ds.private_block(ph.PRIVATE_GROUP, ph.PRIVATE_CREATOR)
        assert ph.PHI_MARKER in block[0x10].value
        for kw in SAFE_KEYWORDS + (("ConvolutionKernel", "KVP", "SliceThickness") if ds.Modality == "CT" else ()):
            assert kw in ds and ph.PHI_MARKER not in str(ds[kw].value), kw


def _uids(ds):
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            for v in (elem.value if elem.VM > 1 else [elem.value]):
                yield str(v)


def test_secrets_cover_every_generated_uid(corpus):
    secrets = set(corpus.secrets)
    generated = [p for p in corpus.outcome if p not in corpus.package]
    seen = 0
    for path in generated:
        if corpus.outcome[path] in ("not_dicom", "unreadable_header") and "no_preamble" not in path:
            continue  # no dataset in there (the no-preamble file is one, read with force)
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for uid in _uids(ds):
            if UID(uid).name != uid or uid == PYDICOM_IMPLEMENTATION_UID:  # registered: not identifying
                continue
            assert uid in secrets, (path, uid)
            seen += 1
    assert seen > 500
    for s in corpus.secrets:  # anything without the marker must be a UID or a date form
        assert ph.PHI_MARKER in s or s.replace(".", "").isdigit() or s.replace("-", "").replace("/", "").isdigit(), s
    for p in corpus.patients:
        assert set(p.birth_date_variants) <= secrets
    assert all(len(s) >= 6 for s in corpus.package_secrets)


def test_ct_slices_corpus(tmp_path):
    out = ph.ct_slices_corpus(tmp_path, n_series=2, n_slices=5, rows=64, cols=64, transfer_syntax=RLELossless)
    assert len(out) == 2 and all(s.hu_lps is None and len(s.paths) == 5 for s in out)
    assert len({s.series_uid for s in out}) == 2
    ds = pydicom.dcmread(out[0].paths[0])
    assert ds.file_meta.TransferSyntaxUID == RLELossless and ds.pixel_array.shape == (64, 64)


def test_training_corpus_states_every_finding_in_pixels_reports_and_labels(tmp_path):
    c = ph.training_corpus(tmp_path, n_patients=6, ct_slices=4, ct_matrix=16, xray_size=32)
    files = [p for p in (tmp_path / "dicom").rglob("*") if p.is_file()]
    assert len(files) == c.files == 6 * (4 + 1)
    assert len(c.studies) == 12
    labels = {r["AccessionNumber"]: r for r in csv.DictReader(open(c.labels_csv))}
    reports = {r["AccessionNumber"]: r["report"] for r in csv.DictReader(open(c.reports_csv))}
    for s in c.studies:
        for f in ph.FINDINGS:
            want = "" if s.findings[f] is None else str(s.findings[f])
            assert labels[s.accession][f] == want
        impression = reports[s.accession].split("IMPRESSION:")[1]
        assert all((f in impression.lower()) == s.present(f) for f in ph.FINDINGS)
