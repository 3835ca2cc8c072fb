"""radforge.dicom against real behaviour: phantom DICOM with known truth, the real files shipped
by pydicom / pydicom-data / deid-data, and mutated bytes.

Ground truth comes from radforge.phantoms (HU volumes in LPS, display images, defect reasons) or
is computed here from pydicom's own reading of the file, never from radforge.dicom itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import logging
import os
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from radforge import config, deid, dicom, kinds, phantoms, transforms
from radforge.config import IngestRecipe

ENCODABLE = phantoms.encodable_transfer_syntaxes()
REJECT = set(dicom.REJECT_REASONS)
KNOWN = REJECT | set(dicom.SKIP_REASONS)
MARKER = phantoms.PHI_MARKER
PKG = phantoms.package_files()


# ---------------------------------------------------------------------------------------------
# helpers


def scan_file(path) -> dict:
    with open(path, "rb") as f:
        return dicom.scan(str(path), os.path.getsize(path), f)


def scan_bytes(data: bytes, path: str = "mem/x.dcm") -> dict:
    return dicom.scan(path, len(data), io.BytesIO(data))


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def ctx(*overrides: str) -> dicom.PlanContext:
    recipe = config.load(IngestRecipe, None, list(overrides)) if overrides else IngestRecipe()
    return dicom.PlanContext(recipe=recipe, pseudo=deid.Pseudonymizer(b"k"))


def plan(rows: list[dict], *overrides: str) -> list[dicom.PlanItem]:
    items = dicom.plan_group(rows, ctx(*overrides))
    assert_accounting(rows, items)
    return items


def planned(rows: list[dict], *overrides: str) -> dicom.PlanItem:
    items = plan(rows, *overrides)
    assert [i.status for i in items] == ["planned"], [(i.status, i.reason) for i in items]
    return items[0]


def assert_accounting(rows: list[dict], items: list[dicom.PlanItem]) -> None:
    """seen = used + skipped + rejected by construction: each input path in exactly one item."""
    counts = Counter(p for it in items for p in it.all_paths)
    assert counts == Counter(r["path"] for r in rows)
    for it in items:
        assert it.status in ("planned", "rejected", "skipped")
        if it.status == "planned":
            assert it.reason is None and set(it.paths) <= set(it.all_paths)
        else:
            assert (it.reason in KNOWN or dicom.is_skip_reason(it.reason)) and it.paths == it.all_paths
            if it.status == "skipped":
                assert dicom.is_skip_reason(it.reason)


def by_group(rows: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["group_key"]].append(r)
    return dict(groups)


def edit(data: bytes, **changes) -> bytes:
    """Re-encode `data` with header changes: a value sets the attribute, None deletes it, and
    (VR, raw bytes) plants raw bytes exactly as a broken writer would (no validation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-encoding poisoned values: pydicom's complaints are expected
        ds = pydicom.dcmread(io.BytesIO(data))
        for kw, v in changes.items():
            tag = tag_for_keyword(kw)
            if v is None:
                if tag in ds:
                    del ds[tag]
            elif isinstance(v, tuple) and isinstance(v[1], bytes):
                ds[tag] = RawDataElement(Tag(tag), v[0], len(v[1]), v[1], 0, False, True)
            else:
                setattr(ds, kw, v)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def relabel_modality(data: bytes, old: bytes, new: bytes) -> bytes:
    """Swap a 2-letter Modality in place, so nothing else in the file moves."""
    for prefix in (b"\x08\x00\x60\x00CS\x02\x00", b"\x08\x00\x60\x00\x02\x00\x00\x00"):
        i = data.find(prefix + old)
        if i >= 0:
            j = i + len(prefix)
            return data[:j] + new + data[j + 2:]
    raise AssertionError("Modality element not found")


def pixel_data_offset(data: bytes) -> int:
    f = io.BytesIO(data)
    pydicom.dcmread(f, stop_before_pixels=True)
    return f.tell()


def to_lps(vol: np.ndarray, affine: np.ndarray):
    return transforms.Orient("LPS")(vol, affine)


def ipp_of(rows: list[dict]) -> dict[tuple[str, int], list[float]]:
    """(path, frame) -> ImagePositionPatient, as scanned."""
    out = {}
    for r in rows:
        for f, p in enumerate(r["positions"]):
            out[(r["path"], f if r["n_frames"] > 1 else -1)] = p
    return out


def assert_affine_maps_slices(item: dicom.PlanItem, affine: np.ndarray, rows: list[dict]) -> None:
    """Voxel (i, j, k) -> LPS: (0, 0, k) is slice k's IPP; i and j step along the IOP cosines
    by the column and row spacing."""
    ipp = ipp_of(rows)
    for k, key in enumerate(zip(item.paths, item.frames)):
        np.testing.assert_allclose(affine @ [0, 0, k, 1], [*ipp[key], 1], atol=1e-4)
    r0 = rows[0]
    iop, (dr, dc) = np.array(r0["iop"]), r0["pixel_spacing"]
    np.testing.assert_allclose(affine[:3, 0], iop[:3] * dc, atol=1e-6)
    np.testing.assert_allclose(affine[:3, 1], iop[3:] * dr, atol=1e-6)
    i, j, k = 3, 5, 1
    p = np.array(ipp[(item.paths[k], item.frames[k])]) + i * dc * iop[:3] + j * dr * iop[3:]
    np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], p, atol=1e-4)


def hu_truth_matches(vol, affine, info: phantoms.SeriesInfo) -> None:
    lps, a = to_lps(vol, affine)
    assert lps.dtype == np.float32
    np.testing.assert_array_equal(lps, info.hu_lps.astype(np.float32))
    np.testing.assert_allclose(a[:3, 3], info.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(np.diag(a)[:3], info.spacing_zyx[::-1], atol=1e-4)


class CountingFile:
    """A file object that counts the bytes handed out: the measure of a header-only scan."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.n += len(b)
        return b

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()


def deid_data_file(rel: str) -> str | None:
    spec = importlib.util.find_spec("deid_data")
    if spec is None:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / rel
    return str(p) if p.is_file() else None


def need(path):
    if not path:
        pytest.skip("test data package not installed")
    return path


def pydicom_file(name: str) -> str:
    return need(get_testdata_file(name, download=False))


@pytest.fixture(scope="module")
def study():
    # Patient/study values all carry the PHI marker, so any leak of a header value is greppable.
    return phantoms.make_study(phantoms.make_patient(0))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("dicom")


# ---------------------------------------------------------------------------------------------
# 1. scan


@pytest.mark.parametrize(
    "group, modality, status",
    [("ct_slices", "CT", "ok"), ("cr", "CR", "ok"), ("dx", "DX", "ok"), ("enhanced_ct", "CT", "ok"),
     ("unsupported", None, "ok")],
)
def test_scan_package_files(group, modality, status):
    paths = PKG[group]
    if not paths:
        pytest.skip(f"no package files for {group}")
    for p in paths:
        r = scan_file(p)
        assert r["status"] == status and r["reason"] is None, (p, r["reason"])
        if modality:
            assert r["modality"] == modality
        else:  # MR, US, SR: scanned fine, refused later by plan_group
            assert r["modality"] in ("MR", "US", "SR")
            assert [i.reason for i in plan([r])] == ["unsupported_modality"]
    if group == "enhanced_ct":
        r = scan_file(paths[0])
        assert r["n_frames"] == 2 and len(r["positions"]) == 2 and r["iop"] == [-1, 0, 0, 0, 1, 0]
    if group == "cr":  # RG1 has PixelSpacing 0\0 (unknown), RG3 none: both read as None
        assert all(scan_file(p)["pixel_spacing"] is None for p in paths)


# Real files whose outcome is pinned; everything else in pydicom's test data must merely not
# raise and give a consistent row.
PINNED = {
    "CT_small.dcm": ("ok", None, "CT"),
    "MR_small.dcm": ("ok", None, "MR"),
    "693_J2KR.dcm": ("ok", None, "CT"),
    "RG1_J2KR.dcm": ("ok", None, "CR"),
    "eCT_Supplemental.dcm": ("ok", None, "CT"),
    "rtstruct.dcm": ("rejected", "not_dicom", None),  # a data set with no preamble
    "no_meta.dcm": ("rejected", "not_dicom", None),
    "ExplVR_BigEndNoMeta.dcm": ("rejected", "not_dicom", None),
    "README.txt": ("rejected", "not_dicom", None),
    "crayons.icc": ("rejected", "not_dicom", None),
    "priv_SQ.dcm": ("rejected", "unreadable_header", None),  # preamble, then no SOP class/modality
    "IM000000": ("rejected", "truncated", "CT"),  # a CT image whose file ends before Pixel Data
    "rtplan_truncated.dcm": ("rejected", "truncated", "RTPLAN"),  # cut inside its header
    # MediaStorageSOPInstanceUID 1.2.999… vs SOPInstanceUID 1.2.777…: a stale file meta
    "rtplan.dcm": ("rejected", "inconsistent_meta", "RTPLAN"),
}


def test_scan_every_pydicom_test_file_never_raises():
    files = [p for p in sorted(set(get_testdata_files())) if os.path.isfile(p)]
    assert len(files) > 100
    seen = set()
    for p in files:
        r = scan_file(p)
        assert r["status"] in ("ok", "rejected")
        if r["status"] == "ok":
            assert r["reason"] is None and not r["group_key"].startswith("bad:")
        else:
            assert r["reason"] in REJECT and r["group_key"] == "bad:" + p
        name = os.path.basename(p)
        if name in PINNED and name not in seen:
            seen.add(name)
            assert (r["status"], r["reason"], r["modality"]) == PINNED[name], name
    assert {"CT_small.dcm", "rtstruct.dcm", "IM000000", "rtplan_truncated.dcm"} <= seen


def test_scan_sniffs_pixel_data_encoding_and_tolerates_trailing_padding():
    """Real layouts that once read as truncated, relabelled CT so the pixel check runs:
    SC_rgb_jpeg.dcm declares Explicit VR but is written Implicit VR (pydicom reads it by
    sniffing); the MR_small RLE/J2K files have (FFFC,FFFC) padding after the sequence delimiter."""
    for name in ("SC_rgb_jpeg.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        data = read(pydicom_file(name))
        old = b"OT" if name.startswith("SC") else b"MR"
        r = scan_bytes(relabel_modality(data, old, b"CT"))
        assert (r["status"], r["reason"], r["modality"]) == ("ok", None, "CT"), name
    # ... while the truly short ones are caught: a J2K stream missing its tail, native cut short.
    for name in ("emri_small_jpeg_2k_lossless_too_short.dcm", "MR_truncated.dcm"):
        r = scan_bytes(relabel_modality(read(pydicom_file(name)), b"MR", b"CT"))
        assert (r["status"], r["reason"]) == ("rejected", "truncated"), name


def test_scan_reads_only_the_header(work, study):
    big = phantoms.ct_series(work / "big", study, n_slices=1, rows=512, cols=512)
    cases = [big.paths[0]]
    cases += [p for p in (deid_data_file("animals/cat.dcm"), get_testdata_file("RG1_J2KR.dcm", download=False)) if p]
    for p in cases:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            cf = CountingFile(f)
            r = dicom.scan(p, size, cf)
        assert r["status"] == "ok"
        # A header is a few KB; the pixel data (512 KB to 16 MB here) is never read.
        assert cf.n < 16 * 1024 and cf.n < size / 20, (p, cf.n, size)


def _one_slice(work, study, ts, name):
    info = phantoms.ct_series(work / f"one_{name}", study, n_slices=4, rows=32, cols=32, transfer_syntax=ts)
    return read(info.paths[0])


@pytest.mark.parametrize("ts", ENCODABLE, ids=lambda t: t.name.replace(" ", "_"))
def test_truncation_is_detected_wherever_the_file_is_cut(work, study, ts):
    data = _one_slice(work, study, ts, str(ts))
    assert scan_bytes(data)["status"] == "ok"
    meta_end = 132 + 12 + pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    if ts == DeflatedExplicitVRLittleEndian:
        cuts = range(meta_end, len(data))  # one zlib stream: every cut breaks it
    else:
        off = pixel_data_offset(data)
        # Cuts inside the pixel data: its element header, first/middle/last fragment bytes, and
        # (encapsulated) just the sequence delimiter missing. Plus header cuts after the meta.
        cuts = sorted({off, off + 4, off + 8, off + 11, off + 12, off + 20, (off + len(data)) // 2,
                       len(data) - 9, len(data) - 8, len(data) - 1} | set(range(meta_end, off, 7)))
    for cut in cuts:
        r = scan_bytes(data[:cut])
        assert (r["status"], r["reason"]) == ("rejected", "truncated"), (cut, len(data), r["reason"])
    # Cut inside the 132-byte prefix or the file meta: never ok, always a known reason.
    for cut in range(0, meta_end, 5):
        r = scan_bytes(data[:cut])
        assert r["status"] == "rejected" and r["reason"] in ("not_dicom", "unreadable_header", "truncated")


def test_bad_files_get_their_reasons(work):
    bad = phantoms.bad_files(work / "bad")
    assert set(bad.values()) >= {"not_dicom", "truncated", "unreadable_header", "unsupported_modality"}
    for path, reason in bad.items():
        r = scan_file(path)
        items = plan([r])
        assert len(items) == 1 and items[0].status == "rejected"
        assert items[0].reason == reason, (path, items[0].reason)
        if reason == "unsupported_modality":
            assert r["status"] == "ok"  # a valid MR/US/SR file; refused by modality, not by scan
        else:
            assert (r["status"], r["reason"]) == ("rejected", reason), path


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not_dicom"),
        (b"DICM", "not_dicom"),
        (b"Radiology notes.\n" * 40, "not_dicom"),
        (bytes(range(256)) * 16, "not_dicom"),
        (b"\0" * 128 + b"DICM", "unreadable_header"),
        (b"\0" * 128 + b"DICM" + np.random.default_rng(1).bytes(2048), "unreadable_header"),
        (b"\0" * 128 + b"DICM" + b"\0" * 64, "unreadable_header"),
    ],
    ids=["empty", "magic_only", "text", "garbage", "prefix_only", "smashed", "prefix_zeros"],
)
def test_scan_rejects_non_dicom_bytes(data, reason):
    r = scan_bytes(data)
    assert (r["status"], r["reason"]) == ("rejected", reason)
    assert r["group_key"] == "bad:mem/x.dcm" and set(r) == set(dicom.INDEX_SCHEMA.names)


def test_scan_without_preamble_is_not_dicom(work, study):
    ds = pydicom.dcmread(phantoms.xray(work / "np.dcm", study, rows=40, cols=32).path)
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    assert scan_bytes(buf.getvalue())["reason"] == phantoms.NO_PREAMBLE_REASON == "not_dicom"


def test_scan_row_contents(work, study):
    info = phantoms.ct_series(work / "rowct", study, n_slices=4, rows=32, cols=40, pixel_spacing=(0.7, 0.9))
    r = scan_file(info.paths[0])
    assert r["modality"] == "CT" and r["sop_class_uid"] == dicom.CT_STORAGE
    assert r["series_uid"] == info.series_uid and r["study_uid"] == study.study_uid
    assert r["group_key"] == "ct:" + info.series_uid
    assert (r["rows"], r["cols"], r["n_frames"]) == (32, 40, 1)
    assert r["pixel_spacing"] == [0.7, 0.9] and r["iop"] == [1, 0, 0, 0, 1, 0] and len(r["positions"]) == 1
    assert r["transfer_syntax"] == ExplicitVRLittleEndian and "AXIAL" in r["image_type"]
    safe = r["safe"]
    assert safe["Manufacturer"] == "Radforge Phantom Systems" and safe["KVP"] == 120.0
    assert safe["PhotometricInterpretation"] == "MONOCHROME2" and MARKER not in json.dumps(safe)
    # Identifying values are kept (privately) for report redaction.
    assert study.patient.patient_id in r["phi_terms"] and study.accession in r["phi_terms"]
    assert r["patient_id"] == study.patient.patient_id and r["accession"] == study.accession

    e = phantoms.enhanced_ct(work / "rowect.dcm", study, n_frames=6, rows=32, cols=32)
    r = scan_file(e.paths[0])
    assert r["sop_class_uid"] == dicom.ENHANCED_CT_STORAGE and r["n_frames"] == 6
    assert len(r["positions"]) == 6 and r["iop"] == [1, 0, 0, 0, 1, 0] and r["pixel_spacing"] == [0.9, 0.9]

    im = phantoms.xray(work / "rowdx.dcm", study, rows=40, cols=32)
    r = scan_file(im.path)
    assert r["group_key"] == "xr:" + im.sop_uid and r["modality"] == "DX" and r["pixel_spacing"] == [0.2, 0.2]


def test_malformed_values_cost_the_attribute_not_the_file(work, study):
    info = phantoms.ct_series(work / "malformed", study, n_slices=4, rows=32, cols=32)
    data = read(info.paths[0])
    r = scan_bytes(edit(data, KVP=("DS", b"ZZPHI "), SliceThickness=("DS", b"2.5\\x ")))
    assert r["status"] == "ok"
    safe = r["safe"]
    # Text in a numeric field is free text: never passed on as a "safe" attribute.
    assert "KVP" not in safe and "SliceThickness" not in safe and MARKER not in json.dumps(safe)
    # Geometry that does not parse is missing, which planning reports as such.
    for bad in ({"PixelSpacing": ("DS", b"a\\b ")}, {"ImagePositionPatient": ("DS", b"1\\2\\nan ")},
                {"ImageOrientationPatient": ("DS", b"1\\0\\0\\0\\1 ")}):
        r = scan_bytes(edit(data, **bad))
        assert r["status"] == "ok"
        assert [i.reason for i in plan([r])] == ["missing_geometry"]


# ---------------------------------------------------------------------------------------------
# 2. plan_group


def test_plan_orders_by_position_not_name_or_instance_number(work, study):
    info = phantoms.ct_series(work / "order", study, n_slices=12, rows=32, cols=32)  # shuffled + scrambled
    rows = [scan_file(p) for p in info.paths]
    item = planned(rows)
    z = {r["path"]: r["positions"][0][2] for r in rows}
    assert [z[p] for p in item.paths] == sorted(z.values())
    # File names and InstanceNumber disagree with position, so neither can have been used.
    inst = {p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in info.paths}
    assert [inst[p] for p in item.paths] != sorted(inst.values())
    assert item.paths != sorted(item.paths)
    # Input order does not matter.
    assert planned(rows[::-1]).paths == item.paths
    assert item.frames == [-1] * 12 and item.all_paths == [r["path"] for r in rows]
    assert item.source_shape == [12, 32, 32]
    assert item.source_spacing_mm == pytest.approx([2.5, 0.8, 0.8])
    assert item.key == deid.Pseudonymizer(b"k")("series", info.series_uid)
    assert item.kind is kinds.CT and item.split in ("train", "val", "test") and item.est_bytes > 0
    assert_affine_maps_slices(item, np.array(item.source_affine), rows)


def test_two_series_in_one_folder_are_grouped_apart(work, study):
    folder = work / "twoseries"
    a = phantoms.ct_series(folder, study, n_slices=10, rows=32, cols=32, seed=1, name_prefix="a")
    b = phantoms.ct_series(folder, study, n_slices=9, rows=32, cols=32, seed=2, name_prefix="b",
                           orientation="coronal")
    rows = [scan_file(p) for p in sorted(folder.iterdir())]
    groups = by_group(rows)
    assert len(groups) == 2
    want = {"ct:" + a.series_uid: set(a.paths), "ct:" + b.series_uid: set(b.paths)}
    assert {k: {r["path"] for r in g} for k, g in groups.items()} == want
    for key, g in groups.items():
        assert set(planned(g).paths) == want[key]


DEFECTS = [
    ("gap", dict(gap_after=5), "rejected", "slice_gap"),
    ("duplicate", dict(duplicate_at=4), "rejected", "duplicate_position"),
    ("tilt", dict(tilt_deg=15.0), "rejected", "gantry_tilt"),
    ("mixed_matrix", dict(mixed_matrix_at=3), "rejected", "mixed_geometry"),
    ("few", dict(n_slices=phantoms.TOO_FEW_SLICES), "rejected", "too_few_slices"),
    ("localizer", dict(localizer=True, n_slices=1, orientation="coronal"), "skipped", "localizer"),
]


@pytest.mark.parametrize("name, kw, status, reason", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_series_defects(work, study, name, kw, status, reason):
    info = phantoms.ct_series(work / f"defect_{name}", study, **{"n_slices": 12, "rows": 32, "cols": 32, **kw})
    assert info.expected_reason == reason  # the phantom and the planner agree on the code
    rows = [scan_file(p) for p in info.paths]
    assert all(r["status"] == "ok" for r in rows)
    items = plan(rows)
    assert {(i.status, i.reason) for i in items} == {(status, reason)}


def test_duplicate_positions_dropped_when_the_recipe_says_so(work, study):
    info = phantoms.ct_series(work / "dup_drop", study, n_slices=12, rows=32, cols=32, duplicate_at=4, seed=5)
    rows = [scan_file(p) for p in info.paths]
    item = planned(rows, "ct.duplicate_positions=drop")
    assert len(item.paths) == 11 and len(set(item.paths)) == 11
    assert sorted(item.all_paths) == sorted(info.paths)  # the dropped copy is still "used"
    vol, affine = dicom.load_ct(item, read)
    # The phantom's volume has one slice per distinct position; the duplicate is a pixel copy.
    truth = phantoms.chest_volume((11, 32, 32), study, 5).astype(np.float32)
    lps, _ = to_lps(vol, affine)
    np.testing.assert_array_equal(lps, truth)


def test_localizer_in_the_same_group_is_skipped_and_the_series_still_planned(work, study):
    series = phantoms.ct_series(work / "s1", study, n_slices=10, rows=32, cols=32, seed=1)
    scout = phantoms.ct_series(work / "s1", study, localizer=True, n_slices=1, rows=32, cols=32,
                               orientation="coronal", name_prefix="scout")
    rows = [scan_file(p) for p in series.paths + scout.paths]
    items = plan(rows)
    assert sorted((i.status, i.reason) for i in items) == [("planned", None), ("skipped", "localizer")]


def _good_rows(work, study, name="good", **kw):
    info = phantoms.ct_series(work / name, study, **{"n_slices": 10, "rows": 32, "cols": 32, **kw})
    return info, [scan_file(p) for p in info.paths]


def _sorted_by_z(rows):
    return sorted(rows, key=lambda r: r["positions"][0][2])


def test_geometry_defects_from_edited_rows(work, study):
    info, rows = _good_rows(work, study)
    planned(rows)

    def variant(fn):
        rs = [dict(r) for r in _sorted_by_z(rows)]
        fn(rs)
        return {(i.status, i.reason) for i in plan(rs)}

    def shift(dz=0.0, dx=0.0, k=5):
        def f(rs):
            x, y, z = rs[k]["positions"][0]
            rs[k]["positions"] = [[x + dx, y, z + dz]]
        return f

    # 30% off the regular step (no step > 1.5x): non-uniform, not a gap.
    assert variant(shift(dz=0.75)) == {("rejected", "nonuniform_spacing")}
    # One slice moved in-plane by 2 mm (> half a pixel): it would be stacked misplaced.
    assert variant(shift(dx=2.0)) == {("rejected", "mixed_geometry")}
    assert variant(lambda rs: rs[3].update(iop=None)) == {("rejected", "missing_geometry")}
    assert variant(lambda rs: rs[3].update(positions=None)) == {("rejected", "missing_geometry")}
    assert variant(lambda rs: [r.update(iop=[2, 0, 0, 0, 2, 0]) for r in rs]) == {("rejected", "missing_geometry")}
    assert variant(lambda rs: [r.update(iop=[1, 0, 0, 1, 0, 0]) for r in rs]) == {("rejected", "missing_geometry")}
    assert variant(lambda rs: rs[2].update(iop=[1, 0, 0, 0, 0, -1])) == {("rejected", "mixed_geometry")}
    assert variant(lambda rs: rs[2].update(pixel_spacing=[0.9, 0.9])) == {("rejected", "mixed_geometry")}
    rgb = {**rows[0]["safe"], "PhotometricInterpretation": "RGB"}
    assert variant(lambda rs: rs[0].update(safe=rgb)) == {("rejected", "unsupported_photometric")}
    assert {i.reason for i in plan(rows, "ct.max_voxels=1000")} == {"too_large"}
    # The minimum counts slices, inclusive.
    assert planned(rows, "ct.min_slices=10").status == "planned"
    assert {i.reason for i in plan(rows, "ct.min_slices=11")} == {"too_few_slices"}


def test_multi_frame_positions_must_match_frame_count(work, study):
    e = phantoms.enhanced_ct(work / "mf.dcm", study, n_frames=6, rows=32, cols=32)
    r = scan_file(e.paths[0])
    planned([r], "ct.min_slices=2")
    # NumberOfFrames 4 but six per-frame positions: planning frames 4 and 5 would index past
    # what the decoder returns.
    for n in (4, 1, 7):
        assert [i.reason for i in plan([dict(r, n_frames=n)], "ct.min_slices=2")] == ["missing_geometry"]


def test_plan_rejects_and_skips_per_file(work, study):
    im = phantoms.xray(work / "sel" / "dx.dcm", study, rows=40, cols=32)
    _, ct_rows = _good_rows(work, study, "sel_ct")
    xr = scan_file(im.path)
    # X-ray only: every CT file skipped on its own; CT only: the radiograph skipped.
    items = plan(ct_rows + [xr], "modalities=[CR,DX]")
    assert Counter((i.status, i.reason) for i in items) == {("skipped", "modality_not_selected"): 10, ("planned", None): 1}
    items = plan(ct_rows + [xr], "modalities=[CT]")
    assert Counter((i.status, i.reason) for i in items) == {("skipped", "modality_not_selected"): 1, ("planned", None): 1}
    # Both in one call: planned apart, never stacked together.
    items = plan(ct_rows + [xr])
    assert sorted(i.kind.name for i in items) == ["ct", "xray"]
    # A rejected scan row passes through with its own reason.
    bad = scan_bytes(b"\0" * 128 + b"DICM", "mem/bad.dcm")
    assert [(i.status, i.reason, i.paths) for i in plan([bad])] == [("rejected", "unreadable_header", ["mem/bad.dcm"])]


def test_secondary_capture_labelled_ct_is_burned_in_then_unsupported_sop_class():
    p = need(deid_data_file("humans/ctbrain1.dcm"))
    r = scan_file(p)
    assert (r["status"], r["modality"], r["sop_class_uid"]) == ("ok", "CT", "1.2.840.10008.5.1.4.1.1.7")
    assert [i.reason for i in plan([r])] == ["burned_in_annotation"]  # SC pixels may carry names
    # The opt-in admits CR/DX Secondary Captures as radiographs; a CT one has no geometry to stack.
    assert [i.reason for i in plan([r], "deid.allow_burned_in=true")] == ["unsupported_sop_class"]


@pytest.mark.parametrize("group", ["unsupported"])
def test_real_unsupported_modalities(group):
    for p in PKG[group] or pytest.skip("no files"):
        assert [i.reason for i in plan([scan_file(p)])] == ["unsupported_modality"]


def test_xray_plan(work, study):
    im = phantoms.xray(work / "xp" / "cr.dcm", study, modality="CR", rows=40, cols=32, pixel_spacing=(0.15, 0.15))
    r = scan_file(im.path)
    item = planned([r])
    assert item.kind is kinds.XRAY and item.paths == item.all_paths == [im.path] and item.frames == [-1]
    assert item.source_shape == [40, 32] and item.source_spacing_mm == [0.15, 0.15]
    assert item.key == deid.Pseudonymizer(b"k")("image", im.sop_uid)
    assert MARKER not in json.dumps(item.safe)
    assert [i.reason for i in plan([dict(r, n_frames=2)])] == ["unsupported_sop_class"]
    rgb = {**r["safe"], "PhotometricInterpretation": "RGB"}
    assert [i.reason for i in plan([dict(r, safe=rgb)])] == ["unsupported_photometric"]
    assert [i.reason for i in plan([dict(r, sop_class_uid=dicom.CT_STORAGE)])] == ["unsupported_sop_class"]
    # CR without any pixel spacing (RG3) still plans, without a spacing.
    for p in PKG["cr"]:
        assert planned([scan_file(p)]).source_spacing_mm is None


# ---------------------------------------------------------------------------------------------
# 3. load_ct


@pytest.mark.parametrize("ts", ENCODABLE, ids=lambda t: t.name.replace(" ", "_"))
def test_load_ct_every_transfer_syntax_equals_ground_truth(work, study, ts):
    info = phantoms.ct_series(work / f"ts_{ts}", study, n_slices=10, rows=32, cols=32, transfer_syntax=ts, seed=11)
    rows = [scan_file(p) for p in info.paths]
    item = planned(rows)
    vol, affine = dicom.load_ct(item, read)
    assert vol.dtype == np.float32 and vol.shape == (10, 32, 32)
    hu_truth_matches(vol, affine, info)
    assert_affine_maps_slices(item, affine, rows)


@pytest.mark.parametrize(
    "name, kw",
    [("per_slice_rescale", dict(per_slice_rescale=True)),
     ("signed", dict(rescale=(1.0, 0.0))),
     ("coronal", dict(orientation="coronal", rows=24, n_slices=20)),
     ("sagittal", dict(orientation="sagittal", rows=24, cols=28, n_slices=16)),
     ("bigendian_signed", dict(rescale=(1.0, 0.0), transfer_syntax=ExplicitVRBigEndian)),
     ("implicit_rescaled", dict(per_slice_rescale=True, transfer_syntax=ImplicitVRLittleEndian))],
)
def test_load_ct_rescale_and_orientation_equal_ground_truth(work, study, name, kw):
    info = phantoms.ct_series(work / f"var_{name}", study, **{"n_slices": 12, "rows": 32, "cols": 32, "seed": 4, **kw})
    rows = [scan_file(p) for p in info.paths]
    item = planned(rows)
    vol, affine = dicom.load_ct(item, read)
    hu_truth_matches(vol, affine, info)
    assert_affine_maps_slices(item, affine, rows)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless], ids=["native", "rle", "j2k"])
def test_load_enhanced_ct_with_shuffled_frames(work, study, ts):
    if ts not in ENCODABLE:
        pytest.skip("encoder not available")
    e = phantoms.enhanced_ct(work / f"ect_{ts}.dcm", study, n_frames=10, rows=32, cols=32, transfer_syntax=ts)
    rows = [scan_file(e.paths[0])]
    item = planned(rows)
    assert sorted(item.frames) == list(range(10)) and item.frames != list(range(10))
    vol, affine = dicom.load_ct(item, read)
    hu_truth_matches(vol, affine, e)
    assert_affine_maps_slices(item, affine, rows)


def test_load_real_enhanced_ct_two_frames():
    p = need(get_testdata_file("eCT_Supplemental.dcm", download=False))
    rows = [scan_file(p)]
    assert [i.reason for i in plan(rows)] == ["too_few_slices"]  # default minimum is 8
    item = planned(rows, "ct.min_slices=2")
    vol, affine = dicom.load_ct(item, read)
    ds = pydicom.dcmread(p)
    px = ds.pixel_array
    assert vol.shape == (2, *px.shape[1:])
    for k, f in enumerate(item.frames):
        # Rescale from the functional groups (per frame, else shared), as PS3.3 C.7.6.16 says.
        groups = [ds.PerFrameFunctionalGroupsSequence[f], ds.SharedFunctionalGroupsSequence[0]]
        pvt = next(g.PixelValueTransformationSequence[0] for g in groups if "PixelValueTransformationSequence" in g)
        expected = px[f].astype(np.float64) * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
        np.testing.assert_allclose(vol[k], expected, atol=1e-3)
    assert_affine_maps_slices(item, affine, rows)
    # IOP -1\0\0\0\1\0: the normal points to -z, so frames run from superior to inferior.
    assert affine[2, 2] < 0
    lps, a = to_lps(vol, affine)
    assert a[2, 2] > 0 and a[0, 0] > 0 and a[1, 1] > 0


def test_load_ct_input_failures_are_rejects(work, study):
    info = phantoms.ct_series(work / "lfail", study, n_slices=10, rows=32, cols=32)
    rows = [scan_file(p) for p in info.paths]
    item = planned(rows)
    target = item.paths[3]
    good = read(target)

    def load_with(data: bytes | None = None, **item_changes):
        files = {p: read(p) for p in info.paths}
        if data is not None:
            files[target] = data
        with pytest.raises(dicom.Reject) as e:
            dicom.load_ct(dataclasses.replace(item, **item_changes), files.__getitem__)
        assert str(e.value) == e.value.reason  # the message is the code, nothing else
        return e.value.reason

    assert load_with(good[: len(good) - 100]) == "truncated"  # cut after scan said ok
    assert load_with(b"garbage" * 30) == "unreadable_header"
    assert load_with(edit(good, RescaleSlope=("DS", b"ZZPHI "))) == "decode_error"
    assert load_with(edit(good, RescaleSlope="0")) == "decode_error"
    assert load_with(edit(good, RescaleIntercept=("DS", b"inf "))) == "decode_error"
    small = read(phantoms.ct_series(work / "lfail16", study, n_slices=4, rows=16, cols=16).paths[0])
    assert load_with(small) == "mixed_geometry"
    assert load_with(frames=[0] + item.frames[1:]) == "decode_error"  # a frame the file lacks


def test_load_ct_truncated_compressed_slice(work, study):
    for ts in (RLELossless, JPEG2000Lossless):
        if ts not in ENCODABLE:
            continue
        info = phantoms.ct_series(work / f"lcut_{ts}", study, n_slices=10, rows=32, cols=32, transfer_syntax=ts)
        item = planned([scan_file(p) for p in info.paths])
        files = {p: read(p) for p in info.paths}
        data = files[item.paths[0]]
        for cut in (len(data) - 9, (pixel_data_offset(data) + len(data)) // 2):
            files[item.paths[0]] = data[:cut]
            with pytest.raises(dicom.Reject) as e:
                dicom.load_ct(item, files.__getitem__)
            assert e.value.reason in ("truncated", "decode_error")


# ---------------------------------------------------------------------------------------------
# 4. load_xray

XRAYS = {
    "dx_m2": dict(modality="DX", photometric="MONOCHROME2"),
    "dx_m1": dict(modality="DX", photometric="MONOCHROME1"),
    "dx_m2_narrow": dict(modality="DX", photometric="MONOCHROME2", window=(1500, 1000)),
    "dx_m1_narrow": dict(modality="DX", photometric="MONOCHROME1", window=(1500, 1000)),
    "cr_m1_voilut": dict(modality="CR", photometric="MONOCHROME1", window=None, voi_lut=True),
    "cr_m2_rle": dict(modality="CR", photometric="MONOCHROME2", window=None, transfer_syntax=RLELossless),
    "dx14_j2k": dict(modality="DX", photometric="MONOCHROME2", bits_stored=14, window=(8192, 16384),
                     transfer_syntax=JPEG2000Lossless),
    "dx8_implicit": dict(modality="DX", photometric="MONOCHROME2", bits_stored=8, window=(100, 120),
                         transfer_syntax=ImplicitVRLittleEndian),
    "cr_m1_8bit": dict(modality="CR", photometric="MONOCHROME1", bits_stored=8, window=(128, 256)),
}


@pytest.fixture(scope="module")
def xrays(work, study):
    out = {}
    for name, kw in XRAYS.items():
        if kw.get("transfer_syntax", ExplicitVRLittleEndian) not in ENCODABLE:
            continue
        out[name] = phantoms.xray(work / "xr" / f"{name}.dcm", study, rows=60, cols=48, **kw)
    return out


def expected_xray(im: phantoms.ImageInfo, voi: str) -> np.ndarray:
    """PS3.3 C.11 by hand from the phantom's stored values: window (LINEAR) or VOI LUT, else the
    BitsStored range; then MONOCHROME1 inversion."""
    stored = im.stored.astype(np.float64)
    if voi == "window" and im.voi_lut:
        item = pydicom.dcmread(im.path).VOILUTSequence[0]
        n, first, bits = item.LUTDescriptor
        lut = np.asarray(item.LUTData, dtype=np.float64)
        f = lut[np.clip(stored - first, 0, n - 1).astype(int)] / (2**bits - 1)
    elif voi == "window" and im.window:
        c, w = im.window
        f = np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    else:
        f = stored / (2**im.bits_stored - 1)
    return 1 - f if im.photometric == "MONOCHROME1" else f


def file_item(path: str) -> dicom.PlanItem:
    return dicom.PlanItem(status="planned", reason=None, paths=[path], all_paths=[path], kind=kinds.XRAY)


def load_x(path: str, voi: str = "window") -> np.ndarray:
    return dicom.load_xray(file_item(path), read, voi)


@pytest.mark.parametrize("voi", ["window", "none"])
@pytest.mark.parametrize("name", list(XRAYS))
def test_load_xray_matches_display_truth(xrays, name, voi):
    if name not in xrays:
        pytest.skip("encoder not available")
    im = xrays[name]
    item = planned([scan_file(im.path)])
    out = dicom.load_xray(item, read, voi)
    assert out.dtype == np.float32 and out.shape == im.display.shape
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out, expected_xray(im, voi), atol=1e-5)
    # The saturated marker is the brightest thing, top-left, whatever the photometric: a reader
    # that forgot the MONOCHROME1 inversion would show it black.
    r0, r1, c0, c1 = im.marker_box
    assert out[r0:r1, c0:c1].min() > 0.99
    if im.photometric == "MONOCHROME1":
        assert im.stored[r0:r1, c0:c1].max() == 0  # stored dark, shown bright
    if voi == "none":
        np.testing.assert_allclose(out, im.display / (2**im.bits_stored - 1), atol=1e-6)


def test_monochrome1_and_2_of_the_same_image_read_the_same(xrays):
    for voi in ("window", "none"):  # full-range window (2048, 4096) is symmetric, so equal too
        np.testing.assert_allclose(load_x(xrays["dx_m1"].path, voi), load_x(xrays["dx_m2"].path, voi), atol=1e-6)
    # A narrow window is applied to stored values, which MONOCHROME1 stores inverted.
    assert not np.allclose(load_x(xrays["dx_m1_narrow"].path), load_x(xrays["dx_m2_narrow"].path))


def _variant(work, im, name, **changes) -> str:
    p = work / "xv" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(edit(read(im.path), **changes))
    return str(p)


def test_window_is_in_modality_units_after_rescale(work, xrays):
    """A window states rescaled (modality) values, and so does its output range: with an
    intercept or slope the image must still come out exactly as without them."""
    im = xrays["dx_m2_narrow"]
    base = load_x(im.path)
    shifted = _variant(work, im, "shift.dcm", RescaleIntercept="-1000", WindowCenter="500")
    np.testing.assert_allclose(load_x(shifted), base, atol=1e-6)
    # slope 2: c' - 0.5 = 2 (c - 0.5) and w' - 1 = 2 (w - 1) describe the same LINEAR window.
    scaled = _variant(work, im, "scaled.dcm", RescaleSlope="2", WindowCenter="2999.5", WindowWidth="1999")
    np.testing.assert_allclose(load_x(scaled), base, atol=1e-6)
    # Without VOI the output range is the rescaled BitsStored range: an intercept changes nothing.
    np.testing.assert_allclose(load_x(shifted, "none"), load_x(im.path, "none"), atol=1e-6)


@pytest.mark.parametrize("func", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_functions_match_pydicom(work, xrays, func):
    from pydicom.pixels import apply_windowing

    im = xrays["dx_m2_narrow"]
    p = _variant(work, im, f"{func}.dcm", VOILUTFunction=func)
    ds = pydicom.dcmread(p)
    ref = apply_windowing(ds.pixel_array.astype(np.float64), ds)  # output range [0, 4095] here
    np.testing.assert_allclose(load_x(p), ref / 4095.0, atol=1e-5)


def test_unusable_window_falls_back_to_the_full_range(work, xrays):
    im = xrays["dx_m2_narrow"]
    for i, changes in enumerate([dict(WindowWidth="0"), dict(WindowCenter=("DS", b"ZZPHI ")),
                                 dict(WindowWidth="-5", VOILUTFunction="SIGMOID")]):
        np.testing.assert_allclose(load_x(_variant(work, im, f"badwin{i}.dcm", **changes)),
                                   load_x(im.path, "none"), atol=1e-6)


def test_voi_lut_with_8_bit_entries_and_4096_inputs(work, xrays):
    """pydicom's apply_voi indexes such a LUT through a uint8 array, wrapping every input above
    255; the PS3.3 C.11.2.1.1 lookup must clip instead."""
    im = xrays["cr_m1_voilut"]
    ds = pydicom.dcmread(im.path)
    lut8 = [v >> 4 for v in ds.VOILUTSequence[0].LUTData]
    ds.VOILUTSequence[0].LUTDescriptor = [4096, 0, 8]
    ds.VOILUTSequence[0].LUTData = lut8
    p = work / "xv" / "lut8.dcm"
    p.parent.mkdir(exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    expected = 1 - np.asarray(lut8, dtype=np.float64)[im.stored.astype(int)] / 255
    np.testing.assert_allclose(load_x(str(p)), expected, atol=1e-6)


def test_modality_lut_sequence(work, xrays):
    im = xrays["dx_m2"]
    ds = pydicom.dcmread(im.path)
    del ds.RescaleSlope, ds.RescaleIntercept
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])
    item.ModalityLUTType = "US"
    lut = [(4095 - i) * 16 for i in range(4096)]  # an inverting 12 -> 16 bit LUT
    item.add_new(0x00283006, "US", lut)
    ds.ModalityLUTSequence = Sequence([item])
    p = work / "xv" / "mlut.dcm"
    ds.save_as(p, enforce_file_format=True)
    expected = np.asarray(lut, dtype=np.float64)[im.stored.astype(int)] / 65535
    np.testing.assert_allclose(load_x(str(p), "none"), expected, atol=1e-6)


@pytest.mark.parametrize("group", ["cr", "dx"])
def test_real_radiographs_decode_with_contrast(group):
    paths = PKG[group]
    if not paths:
        pytest.skip("package not installed")
    results = {}
    for p in paths:
        item = planned([scan_file(p)])
        out = dicom.load_xray(item, read, "window")
        assert out.dtype == np.float32 and out.ndim == 2
        assert out.min() >= 0 and out.max() <= 1 and np.isfinite(out).all()
        assert out.std() > 0.05, (p, out.std())
        results[os.path.basename(p)] = out
    # Lossless J2K must read exactly like the uncompressed original.
    for unc, j2k in (("RG1_UNCR.dcm", "RG1_J2KR.dcm"), ("RG3_UNCR.dcm", "RG3_J2KR.dcm")):
        if unc in results and j2k in results:
            np.testing.assert_array_equal(results[unc], results[j2k])
    if group == "cr" and "RG1_UNCR.dcm" in results:
        out = load_x(next(p for p in paths if p.endswith("RG1_UNCR.dcm")), "none")
        assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1 and out.std() > 0.05


def test_load_xray_input_failures_are_rejects(work, xrays):
    with pytest.raises(dicom.Reject) as e:
        load_x(pydicom_file("SC_rgb.dcm"))
    assert e.value.reason == "unsupported_photometric"
    im = xrays["dx_m2"]
    data = read(im.path)
    for bad, reason in [(data[:-500], "truncated"), (b"junk" * 100, "unreadable_header"),
                        (edit(data, RescaleSlope=("DS", b"ZZPHI ")), "decode_error")]:
        with pytest.raises(dicom.Reject) as e:
            dicom.load_xray(file_item("x"), lambda _p, b=bad: b, "window")
        assert e.value.reason == reason and str(e.value) == reason
    with pytest.raises(ValueError):  # a programming error, not an input problem
        load_x(im.path, "auto")


# ---------------------------------------------------------------------------------------------
# 5. fuzz: mutated bytes through the whole path


@pytest.fixture(scope="module")
def fuzz_seeds(work, study):
    """Small seeds so each example is cheap: (kind, {path: bytes}, mutate_path, overrides)."""
    d = work / "fuzz"
    seeds = []
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless):
        if ts in ENCODABLE:
            info = phantoms.ct_series(d / str(ts), study, n_slices=3, rows=32, cols=32, transfer_syntax=ts, seed=9)
            # Only the first slice is mutated; the intact ones let the series plan, so the
            # mutated file reaches the decoder.
            seeds.append(("ct", {p: read(p) for p in info.paths}, info.paths[0], ("ct.min_slices=2",)))
    e = phantoms.enhanced_ct(d / "ect.dcm", study, n_frames=4, rows=32, cols=32)
    seeds.append(("ct", {e.paths[0]: read(e.paths[0])}, e.paths[0], ("ct.min_slices=2",)))
    for name, kw in [("dx.dcm", {}), ("cr.dcm", dict(modality="CR", photometric="MONOCHROME1", window=None,
                                                       voi_lut=True, transfer_syntax=RLELossless))]:
        im = phantoms.xray(d / name, study, rows=40, cols=32, **kw)
        seeds.append(("xray", {im.path: read(im.path)}, im.path, ()))
    p = get_testdata_file("CT_small.dcm", download=False)
    if p:  # a real single slice: scan and planning only (too_few_slices when intact)
        seeds.append(("ct", {p: read(p)}, p, ("ct.min_slices=2",)))
    return seeds


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, head, arg in ops:
        # Half the positions land in the first 1.5 KB: the header is where parsing can go wrong,
        # and uniformly drawn positions would nearly always hit pixel data.
        n = max(1, min(len(b), 1536) if head else len(b))
        i = pos % n
        if op == "flip" and b:
            b[i % len(b)] ^= (arg % 255) + 1
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = bytes([arg % 256]) * (1 + arg % 17)
        elif op == "zero":
            b[i:i + 1 + arg % 64] = bytes(len(b[i:i + 1 + arg % 64]))
    return bytes(b)


OPS = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "zero"]), st.integers(0, 2**31),
              st.booleans(), st.integers(0, 2**16)),
    min_size=1, max_size=4,
)


def load(item: dicom.PlanItem, files: dict[str, bytes], voi: str = "window"):
    """Decode a planned item from in-memory files as its kind is decoded."""
    if item.kind is kinds.CT:
        return dicom.load_ct(item, files.__getitem__)
    return dicom.load_xray(item, files.__getitem__, voi)


def run_pipeline(files: dict[str, bytes], overrides, voi: str) -> None:
    """scan never raises; plan accounts for every file; loading succeeds or raises Reject."""
    rows = []
    for p, data in files.items():
        r = dicom.scan(p, len(data), io.BytesIO(data))
        assert r["status"] in ("ok", "rejected")
        assert (r["reason"] is None) if r["status"] == "ok" else (r["reason"] in REJECT)
        rows.append(r)
    for group in by_group(rows).values():
        for item in plan(group, *overrides):
            if item.status != "planned":
                continue
            try:
                out = load(item, files, voi)
            except dicom.Reject as e:
                assert e.reason in REJECT and str(e) == e.reason
                continue
            if item.kind is kinds.CT:
                vol, affine = out
                assert vol.dtype == np.float32 and list(vol.shape) == item.source_shape
                assert np.isfinite(vol).all() and np.isfinite(affine).all()
            else:
                assert out.dtype == np.float32 and out.ndim == 2
                assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@settings(deadline=None, max_examples=int(os.environ.get("RADFORGE_FUZZ_EXAMPLES", "150")),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), ops=OPS, voi=st.sampled_from(["window", "none"]))
def test_fuzz_mutated_files_never_escape_as_other_exceptions(fuzz_seeds, data, ops, voi):
    kind, files, target, overrides = data.draw(st.sampled_from(fuzz_seeds), label="seed")
    files = dict(files)
    files[target] = mutate(files[target], ops)
    run_pipeline(files, overrides, voi)


def test_fuzz_seeds_are_valid(fuzz_seeds):
    """Unmutated, every seed plans and loads: the fuzz test starts from working inputs."""
    for kind, files, _, overrides in fuzz_seeds:
        rows = [scan_bytes(b, p) for p, b in files.items()]
        assert all(r["status"] == "ok" for r in rows)
        for it in plan(rows, *overrides):
            if len(files) == 1 and kind == "ct" and rows[0]["n_frames"] == 1:
                assert it.reason == "too_few_slices"
                continue
            assert it.status == "planned" and it.kind.name == kind
            load(it, files)


# ---------------------------------------------------------------------------------------------
# 6. privacy


def test_reject_message_is_only_the_code():
    for reason in dicom.REJECT_REASONS:
        e = dicom.Reject(reason)
        assert str(e) == reason and e.args == (reason,)


def test_no_header_value_reaches_messages_warnings_or_logs(work, study, caplog):
    """Files whose broken values hold the PHI marker (character set, DS fields, geometry): no
    reason, exception text, warning or log record may quote them."""
    slope = phantoms.ct_series(work / "priv_a", study, n_slices=10, rows=32, cols=32, seed=1)
    geom = phantoms.ct_series(work / "priv_b", study, n_slices=10, rows=32, cols=32, seed=2)
    im = phantoms.xray(work / "priv" / "dx.dcm", study, rows=40, cols=32)
    poisoned = dict(SpecificCharacterSet=("CS", b"ZZPHI "), KVP=("DS", b"ZZPHI "),
                    RescaleSlope=("DS", b"ZZPHI "), WindowCenter=("DS", b"ZZPHI "))
    files = {p: read(p) for p in slope.paths + geom.paths}
    files[slope.paths[0]] = edit(files[slope.paths[0]], **poisoned)
    files[geom.paths[0]] = edit(files[geom.paths[0]], ImagePositionPatient=("DS", b"ZZPHI\\1\\2 "))
    files[im.path] = edit(read(im.path), **poisoned)
    texts, reasons = [], []
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # edit() above read the poisoned files through pydicom itself
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = [scan_bytes(b, p) for p, b in files.items()]
        texts += [r["reason"] or "" for r in rows] + [json.dumps(r["safe"]) for r in rows]
        for group in by_group(rows).values():
            for item in plan(group):
                reasons.append(item.reason)
                texts += [item.reason or "", json.dumps(item.safe)]
                if item.status != "planned":
                    continue
                try:
                    load(item, files)
                except Exception as e:  # noqa: BLE001 — collected and checked below
                    assert isinstance(e, dicom.Reject)
                    reasons.append(e.reason)
                    texts.append(f"{type(e).__name__}: {e} {e.args}")
    # Each poisoned value was really used, and refused: slope and geometry.
    # Two items planned (reason None) then refused at decode; the geometry one at planning.
    assert Counter(reasons) == {"decode_error": 2, "missing_geometry": 1, None: 2}
    texts += [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if MARKER in t]
    # The identifying values are still in the private index, where report redaction needs them.
    assert any(MARKER in t for r in rows for t in r["phi_terms"])
