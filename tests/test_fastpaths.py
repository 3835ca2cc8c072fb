"""The ingest's fast paths give the same values as a straightforward reference (Ray-free).

Each reference is the plain way to compute the same thing: pydicom's own `ds.pixel_array`, its
`apply_modality_lut`, `ds.get(keyword)` per attribute, and the float64 rounding `to_int16_hu`
used before it worked in the input's own float type. The end-to-end check builds a stored CT
array with those references and compares it with `ingest.make_sample`, voxel for voxel.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import struct
import warnings

import numpy as np
import pydicom
import pydicom.data
from pydicom.data import get_testdata_files
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

from radforge import config, deid, dicom, ingest, phantoms, storage, transforms
from radforge.config import IngestRecipe


def _old_round_clip_hu(x) -> np.ndarray:
    """`transforms._round_clip_hu` as it was: through float64."""
    x = np.asarray(x, dtype=np.float64)
    x = np.copysign(np.floor(np.abs(x) + 0.5), x)
    x = np.nan_to_num(x, nan=transforms.HU_MIN, posinf=transforms.HU_MAX, neginf=transforms.HU_MIN)
    np.clip(x, transforms.HU_MIN, transforms.HU_MAX, out=x)
    return x.astype(np.int16)


def _old_hu(plane: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """`dicom._hu_plane`'s arithmetic as it was: a float64 product cast to float32, then a
    float32 addition of the intercept."""
    out = np.empty(plane.shape, np.float32)
    np.multiply(plane, slope, out=out, casting="unsafe")
    out += inter
    return out


# ---------------------------------------------------------------------------------------------
# to_int16_hu


TIES = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 0.50000006, -1023.5, -1024.5,
                 32766.5, 32767.5, 8388607.5, -8388607.5, 16777216.0, 1e30, -1e30, np.nan, np.inf, -np.inf, -0.0],
                np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_int16_hu_ties_and_specials_match_the_float64_reference(dtype):
    x = TIES.astype(dtype)
    np.testing.assert_array_equal(transforms.to_int16_hu(x), _old_round_clip_hu(x))
    assert transforms.to_int16_hu(np.float32(2.5)).shape == ()
    assert transforms.to_int16_hu(np.float32(-2.5)) == -3


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40)),
              elements=st.floats(-40000, 40000, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])))
def test_to_int16_hu_matches_the_float64_reference(x):
    x[..., ::3] = np.round(x[..., ::3]) + np.float32(0.5)  # many exact ties
    np.testing.assert_array_equal(transforms.to_int16_hu(x), _old_round_clip_hu(x))


def test_to_int16_hu_crosses_its_piece_boundaries_unchanged(monkeypatch):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 37, 41)) * 900).astype(np.float32)
    monkeypatch.setattr(transforms, "_ROUND_ELEMENTS", 1000)  # not a multiple of any axis
    np.testing.assert_array_equal(transforms.to_int16_hu(x), _old_round_clip_hu(x))


# ---------------------------------------------------------------------------------------------
# decode and HU


def _pydicom_files() -> list[str]:
    # The files shipped with pydicom (get_testdata_files would try to download the rest).
    return sorted(glob.glob(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "**", "*.dcm"),
                            recursive=True))


def test_pixels_equal_pydicom_pixel_array_on_its_test_files():
    """`dicom._pixels` calls the decoder's `as_array` directly: the same array (values, dtype,
    shape) as `ds.pixel_array` on every pydicom test file that decodes at all."""
    compared = 0
    for path in _pydicom_files():
        if os.path.getsize(path) > 256 * 1024:  # the large ones add seconds, not cases
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ref = pydicom.dcmread(path).pixel_array
            except Exception:  # noqa: BLE001 — files pydicom itself cannot decode here
                continue
            try:
                got = dicom._pixels(pydicom.dcmread(path), 1 << 31)
            except dicom.Reject:
                continue  # refused before decoding (budget, truncation): not the decode path
        assert got.dtype == ref.dtype and got.shape == ref.shape, path
        np.testing.assert_array_equal(got, ref, err_msg=path)
        compared += 1
    assert compared >= 40


@pytest.fixture(scope="module")
def study():
    return phantoms.make_study(phantoms.make_patient(7))


SERIES = {
    "native": dict(),
    "rle": dict(transfer_syntax=RLELossless),
    "slope": dict(rescale=(0.5, -1000.0)),
    "per_slice": dict(per_slice_rescale=True, transfer_syntax=ImplicitVRLittleEndian),
    "signed_bigendian": dict(rescale=(1.0, 0.0), transfer_syntax=ExplicitVRBigEndian),
    "coronal": dict(orientation="coronal", rows=24, n_slices=20),
}
SAMPLES = {"rle": SERIES["rle"], "coronal_slope": dict(orientation="coronal", rows=24, rescale=(0.5, -1000.0))}


def _planned(paths: list[str], recipe: IngestRecipe) -> dicom.PlanItem:
    rows = [dicom.scan(p, os.path.getsize(p), open(p, "rb")) for p in paths]
    ctx = dicom.PlanContext(recipe=recipe, pseudo=deid.Pseudonymizer(b"k"))
    (item,) = [it for it in dicom.plan_group(rows, ctx) if it.status == "planned"]
    return item


def _reference_hu(item: dicom.PlanItem, exact: bool) -> np.ndarray:
    """The HU volume by the plain route: dcmread, pixel_array, then the old two-step float32
    arithmetic (`exact`) or pydicom's float64 `apply_modality_lut`."""
    planes = []
    for path in item.paths:
        ds = pydicom.dcmread(path)
        px = ds.pixel_array
        slope, inter = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        planes.append(_old_hu(px, slope, inter) if exact else apply_modality_lut(px, ds).astype(np.float32))
    return np.stack(planes)


@pytest.mark.parametrize("name", sorted(SERIES))
def test_load_ct_equals_pydicom_modality_lut(tmp_path, study, name):
    info = phantoms.ct_series(tmp_path / name, study, **{"n_slices": 10, "rows": 32, "cols": 32, "seed": 5, **SERIES[name]})
    item = _planned(info.paths, IngestRecipe())
    vol, _ = dicom.load_ct(item, lambda p: open(p, "rb").read())
    np.testing.assert_array_equal(vol, _reference_hu(item, exact=True))
    # Against pydicom's float64 LUT: equal where the slope is 1, within float32 rounding else.
    np.testing.assert_allclose(vol, _reference_hu(item, exact=False), rtol=2e-7, atol=0)


def test_hu_plane_still_rejects_what_overflows_float32():
    class Rescale:  # only what _rescale reads from a classic (not Enhanced) data set
        RescaleSlope, RescaleIntercept = 1e35, 0.0

        def get(self, k, default=None):
            return getattr(self, k, default)

        def __contains__(self, k):
            return hasattr(self, k)

        def __getitem__(self, k):
            return type("E", (), {"value": getattr(self, k)})()

    plane = np.full((4, 4), 60000, np.uint16)
    out = np.empty((4, 4), np.float32)
    with pytest.raises(dicom.Reject):
        dicom._hu_plane(Rescale(), plane, -1, [1, 4, 4], out)


# ---------------------------------------------------------------------------------------------
# the index row fill


def _header_files(tmp_path, study) -> list[str]:
    """Phantoms (classic, Enhanced, DX, broken files) and every real file at hand: pydicom's own
    test files, pydicom-data's and deid-data's (where those packages are installed)."""
    ct = phantoms.ct_series(tmp_path / "ct", study, n_slices=3, rows=16, cols=16, seed=2).paths
    ect = phantoms.enhanced_ct(tmp_path / "ect.dcm", study, n_frames=4, rows=16, cols=16).paths
    dx = [phantoms.xray(tmp_path / "dx.dcm", study, rows=40, cols=32).path]
    bad = list(phantoms.bad_files(tmp_path / "bad", study))
    real = set(_pydicom_files()) | {p for p in get_testdata_files() if os.path.isfile(p)}
    spec = importlib.util.find_spec("deid_data")
    if spec is not None:
        root = os.path.join(list(spec.submodule_search_locations)[0], "data")
        real |= {p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(p)}
    return [*ct, *ect, *dx, *bad, *sorted(real)]


class _ByKeyword:
    """The reference every row fill is held to: a pydicom data set asked keyword by keyword
    (`ds.get(keyword)`: pydicom's own conversion, hooks and all), the file meta by tag."""

    def __init__(self, ds):
        self._ds = ds

    def get(self, keyword, default=None):
        return self._ds.get(keyword, default)

    def __contains__(self, keyword):
        return keyword in self._ds

    def __getitem__(self, keyword):
        return self._ds[keyword]

    def meta(self, tag):
        meta = getattr(self._ds, "file_meta", None)
        return dicom._meta_get(meta, tag) if meta is not None else None


def _same(a, b) -> bool:
    """Equal and of the same types all the way down (1.0 == 1 == True, "a" == UID("a") would
    pass a plain ==)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN


def _reference_row(ds) -> dict:
    row = {}
    with dicom._quiet():
        dicom._fill_row_from(row, _ByKeyword(ds))
    return row


class _CountSlow:
    """Counts the elements `dicom._fast_value` leaves to pydicom (`_SLOW`) among all it is asked."""

    def __init__(self, monkeypatch):
        self.asked = self.slow = 0
        real = dicom._fast_value

        def counted(vr, value, encodings):
            out = real(vr, value, encodings)
            self.asked += 1
            self.slow += out is dicom._SLOW
            return out

        monkeypatch.setattr(dicom, "_fast_value", counted)


def test_fill_row_by_tag_equals_fill_row_by_keyword(tmp_path, study, monkeypatch):
    """`_HeaderValues.of_dataset` (every row element fetched once by tag, most converted by
    `_fast_value`) fills the same index row, types included, as asking pydicom's data set keyword
    by keyword, on phantoms (classic, Enhanced, DX, broken files) and every real file at hand."""
    counts = _CountSlow(monkeypatch)
    filled = 0
    for path in _header_files(tmp_path, study):
        try:
            with open(path, "rb") as f:
                ds_fast = dicom._read_header(f)
            with open(path, "rb") as f:
                ds_ref = dicom._read_header(f)
        except Exception:  # noqa: BLE001 — not a readable header: no row is filled from it
            continue
        fast = {}
        with dicom._quiet():
            dicom._fill_row_from(fast, dicom._HeaderValues.of_dataset(ds_fast))
        assert _same(fast, _reference_row(ds_ref)), path
        filled += 1
    assert filled >= 60
    assert counts.asked > 1000 and counts.slow < 0.1 * counts.asked  # the fast conversion was what ran


def test_walked_values_equal_the_data_set_values(tmp_path, study, monkeypatch):
    """`_HeaderValues.of_walk` (the elements walked over the bytes, no Dataset) fills the same
    index row, types included, as pydicom's `stop_before_pixels` read asked keyword by keyword,
    on every header the walk takes (most of them), and gives each row element pydicom's value
    (a plain str for a UID)."""
    counts = _CountSlow(monkeypatch)
    rle = phantoms.ct_series(tmp_path / "rle", study, n_slices=2, rows=64, cols=64, seed=4,
                             transfer_syntax=RLELossless).paths
    walked = compared = 0
    for path in [*rle, *_header_files(tmp_path, study)]:
        data = open(path, "rb").read()
        try:
            meta, raw, _, _ = dicom._explicit_le_parts(data, [10**6], pixels=False, meta_dataset=False)
        except dicom._Unhandled:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 — pydicom's read refuses it: the walk's row is not used
            continue
        walked += 1
        try:
            with dicom._quiet():
                values = dicom._HeaderValues.of_walk(meta, raw)
        except dicom._Unhandled:
            continue
        row = {}
        with dicom._quiet():
            dicom._fill_row_from(row, values)
        assert _same(row, _reference_row(ds)), path
        for kw, _ in dicom._ROW_TAGS:
            if kw in values:
                got, want = (str(v) if isinstance(v, pydicom.uid.UID) else v for v in (values.get(kw), ds[kw].value))
                assert type(got) is type(want) and str(got) == str(want), (path, kw)
        compared += 1
    assert compared >= 60 and compared >= 0.8 * walked  # the walk's values, not pydicom's, on most files
    assert counts.asked > 1000 and counts.slow < 0.1 * counts.asked


# Edge cases of each VR the row reads, beside what real files hold: padding, backslashes,
# NULs, empties, numbers pydicom parses (or not), ISO 2022 escapes, person name groups,
# bytes that do not decode in the character set, wrong lengths.
_TEXTS = [b"A", b"AB ", b" AB", b"  A  \x00", b"A\x00", b"A \x00", b"\x00A", b"\x00", b" ", b"  ",
          b"A\\B", b"A\\", b"\\", b"\\\\", b" A \\ B ", b"A\\\x00", b"A\tB", b"A\r\n", b"CT", b"ct \\ MR",
          b"ORIGINAL\\PRIMARY\\AXIAL", b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.3 ", b" 1.2.3", b"1.2\\3.4",
          b"1", b"43", b"-0", b"+1", b"01", b"1.5", b" 1.5 ", b"1e3", b"1E-2", b".5", b"5.", b"nan",
          b"inf", b"-Infinity", b"1_000", b"abc", b"1\\2\\3", b"1\\\\3", b"1.0\\ 2.0 ", b"1 2", b"2.0",
          b"99999999999999999999", b"-178.85\\-197.85\\-129.63", b"1\\abc", b"0\\0",
          b"DOE^JOHN", b"DOE^JOHN ", b"DOE^JOHN=", b"A=B", b"=", b"^", b"^^^^", b"DOE^JOHN\\ROE^JANE",
          b"M\xfcller^J\xf6rg", b"\xe9", "Müller^Jörg".encode(), "山田^太郎".encode("shift_jis"),
          b"\x1b$BVP\x1b(B^\x1b$BB@\x1b(B", b"\xff\xfe", b"O'Brien-Smith^Anne Marie"]
_BINARY = [struct.pack("<H", 512), struct.pack("<h", -2), struct.pack("<I", 7), struct.pack("<f", 1.5),
           struct.pack("<d", -2.25), struct.pack("<HH", 1, 2), struct.pack("<d", float("nan")), b"\x01",
           b"\x01\x02\x03", b"\x00" * 6, b"\xff" * 8]
_CHARSETS = [None, "ISO_IR 100", "ISO_IR 192", "ISO_IR 144", "ISO_IR 13", ["ISO 2022 IR 6", "ISO 2022 IR 87"],
             "GB18030", "ISO_IR 126", "not-a-charset"]
_LEFT_TO_PYDICOM = ("AE", "OB", "UN", "AT")
_ROW_VRS = ["CS", "AS", "DA", "TM", "DT", "UI", "DS", "IS", "SH", "LO", "UC", "ST", "LT", "UT", "PN",
            "US", "SS", "UL", "SL", "FL", "FD", *_LEFT_TO_PYDICOM]


_NOT_IN_GRID = ("NumberOfFrames", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")


def test_fast_values_fill_the_row_as_pydicom_values_do():
    """`dicom._fast_value` of each VR the row may meet (any row keyword may carry any VR in a
    broken file), on the edge cases above under several character sets: where it gives a value,
    the row filled with that value in every row keyword is the row pydicom's own conversion of
    the same element fills, types included; where pydicom fails to convert, it gives none."""
    from pydicom.charset import convert_encodings, default_encoding
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import BaseTag

    def row_of(vr, value) -> dict:
        elem = dicom._Elem(vr, value)
        # (not the frame count: a value of 2**32 - 1 there would make the row 4 billion frames long)
        values = dicom._HeaderValues({kw: elem for kw, _ in dicom._ROW_TAGS if kw not in _NOT_IN_GRID},
                                     {t: value for t in dicom._META_TAGS})
        row = {}
        dicom._fill_row_from(row, values)
        return row

    fast = cases = 0
    with dicom._quiet():
        for charset in _CHARSETS:
            encodings = convert_encodings(charset) if charset is not None else default_encoding
            for vr in _ROW_VRS:
                for value in (_BINARY if vr in ("US", "SS", "UL", "SL", "FL", "FD", "AT") else []) + _TEXTS:
                    raw = RawDataElement(BaseTag(0x00081030), vr, len(value), value, 0, False, True)
                    try:
                        ref = dicom._convert_raw(raw, encoding=encodings)
                    except Exception:  # noqa: BLE001 — pydicom cannot convert it
                        ref = None
                    got = dicom._fast_value(vr, value, dicom._encodings(encodings))
                    cases += vr not in _LEFT_TO_PYDICOM
                    if got is dicom._SLOW:
                        continue
                    assert ref is not None and ref.VR == vr, (vr, value, charset)
                    assert _same(row_of(vr, got), row_of(vr, ref.value)), (vr, value, charset)
                    fast += 1
    assert cases > 5000 and fast > 0.6 * cases, (fast, cases)  # most cases of the VRs it takes


def test_converted_values_are_reused_only_for_the_same_bytes_and_character_set(tmp_path, study):
    """`dicom._CONVERTED` reuses a walked element's value across files: two files with the same
    PatientName bytes (at the same offset: one walked element) under different Specific Character
    Sets, scanned one after the other, each get their own decoded name (as the keyword-by-keyword
    reference reads it)."""
    src = phantoms.ct_series(tmp_path / "ct", study, n_slices=1, rows=16, cols=16, seed=3).paths[0]
    rows = []
    for i, charset in enumerate(["ISO_IR 100", "ISO_IR 144", "ISO_IR 100"]):
        ds = pydicom.dcmread(src)
        ds.SpecificCharacterSet = charset
        ds.PatientName = b"M\xfcller^J\xf6rg"  # raw bytes: ü/ö in Latin-1, other letters in Cyrillic
        path = str(tmp_path / f"cs{i}.dcm")
        ds.save_as(path)
        with open(path, "rb") as f:
            ref = _reference_row(dicom._read_header(f))
        size = os.path.getsize(path)
        with storage.open_head(path, size) as f:
            row = dicom.scan(path, size, f)
        assert row["phi_terms"] == ref["phi_terms"], charset
        rows.append(row)
    assert rows[0]["phi_terms"] == rows[2]["phi_terms"] != rows[1]["phi_terms"]


def test_scan_from_the_first_range_equals_scan_read_by_read(tmp_path, study, monkeypatch):
    """`dicom._Reader` serves pydicom's small reads from the file's first range (one read);
    the index row is the same as when every read goes to the file as asked (a first range of
    0), on every real file and phantom, and on cuts of them (truncated and smashed headers)."""
    files = _header_files(tmp_path, study)
    cuts = (1, 100, 128, 131, 132, 140, 200, 300, 500, 1000, 2000, 3000, 5000)

    def rows() -> list[dict]:
        out = []
        for i, path in enumerate(files):
            size = os.path.getsize(path)
            with storage.open_head(path, size) as f:
                out.append(dicom.scan(path, size, f))
            if i % 4 == 0 and size < 300_000:  # cuts of every 4th file: the short-read accounting
                data = open(path, "rb").read()
                for cut in sorted({*cuts, size // 2, size - 8, size - 1}):
                    if 0 < cut < size:
                        head = storage.HeadReader(lambda start, end, d=data[:cut]: d[start:end], cut)
                        out.append(dicom.scan(path, cut, head))
        return out

    fast = rows()
    monkeypatch.setattr(storage, "head_first_range", lambda size: 0)
    ref = rows()
    assert len(fast) == len(ref) > 1000
    for a, b in zip(fast, ref):
        assert _same(a, b), a["path"]
    assert sum(r["status"] == "ok" for r in ref) >= 60 and sum(r["reason"] == "truncated" for r in ref) >= 100


def test_scan_by_the_byte_walk_equals_pydicom_read(tmp_path, study, monkeypatch):
    """`dicom.scan` walks an Explicit VR Little Endian header over the first range
    (`_scan_explicit_le`) and fills the row from the walked elements (`_HeaderValues.of_walk`, no
    Dataset) instead of pydicom's `stop_before_pixels` read asked keyword by keyword; the index
    row is the same, types included (every field, every reason), on every real file and phantom
    (RLE CT included), on cuts of them, and under caps small enough that the headers reach them."""
    rle = phantoms.ct_series(tmp_path / "rle", study, n_slices=2, rows=64, cols=64, seed=4,
                             transfer_syntax=RLELossless).paths
    files = [*rle, *_header_files(tmp_path, study)]
    caps = [dicom.HEADER_LIMITS, dicom.HeaderLimits(max_elements=40), dicom.HeaderLimits(max_elements=120),
            dicom.HeaderLimits(max_bytes=1500), dicom.HeaderLimits(max_bytes=4000)]
    walked = []
    real_walk = dicom._scan_explicit_le

    def walk(reader, limits):
        values = real_walk(reader, limits)
        walked.append(1)  # the walk's values made this row
        return values

    monkeypatch.setattr(dicom, "_scan_explicit_le", walk)

    def rows() -> list[dict]:
        out = []
        for i, path in enumerate(files):
            data = open(path, "rb").read()
            cuts = [len(data)]
            if i % 4 == 0 and len(data) < 300_000:
                cuts += sorted({132, 200, 500, 1000, 2000, len(data) // 2, len(data) - 8, len(data) - 1})
            for cut in cuts:
                if 0 < cut <= len(data):
                    for limits in caps if cut == len(data) else caps[:1]:
                        head = storage.HeadReader(lambda start, end, d=data[:cut]: d[start:end], cut)
                        before = len(walked)
                        out.append(dicom.scan(path, cut, head, limits))
                        if cut == len(data) and limits is caps[0]:
                            whole[len(out) - 1] = len(walked) > before
        return out

    whole: dict[int, bool] = {}  # row number of a whole file under the default caps → made by the walk
    fast = rows()
    n_walked, by_walk = len(walked), dict(whole)

    def unhandled(reader, limits):
        raise dicom._Unhandled

    monkeypatch.setattr(dicom, "_scan_explicit_le", unhandled)
    # pydicom's read, asked keyword by keyword: no `_fast_value` in the reference
    monkeypatch.setattr(dicom._HeaderValues, "of_dataset", classmethod(lambda cls, ds: _ByKeyword(ds)))
    ref = rows()
    assert len(fast) == len(ref) > 1000
    for a, b in zip(fast, ref):
        assert _same(a, b), a["path"]
    ok_whole = [w for i, w in by_walk.items() if fast[i]["status"] == "ok"]
    # most whole files' rows (the rest: other transfer syntaxes, sequences of undefined length,
    # headers longer than the first range)
    assert n_walked >= 100 and sum(ok_whole) >= 0.5 * len(ok_whole)
    assert sum(r["status"] == "ok" for r in ref) >= 60 and sum(r["reason"] == "truncated" for r in ref) >= 50
    assert sum(r["reason"] == "unreadable_header" for r in ref) >= 20  # the small caps reached


def _decoded(data: bytes):
    """What `dicom._decode` makes of `data`, in comparable form: the Reject reason, or every
    element as stored (raw tuples; converted ones by VR and value), the file meta's, both
    encodings, the preamble, and the pixel array and rescale the decoder reads from it."""
    try:
        ds = dicom._decode(data)
    except dicom.Reject as r:
        return ("reject", r.reason)

    def elements(d):
        return [(int(t), tuple(e) if isinstance(e, tuple) else (e.VR, repr(e.value))) for t, e in d._dict.items()]

    out = [elements(ds), elements(ds.file_meta), ds.original_encoding, ds.original_character_set, ds.preamble]
    for step in (lambda: dicom._pixels(ds, 1 << 31), lambda: dicom._rescale(ds, -1)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v = step()
            out.append((v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else v)
        except BaseException as e:  # noqa: BLE001 — decoder plugins raise many types
            out.append(("raised", type(e).__name__, getattr(e, "reason", None)))
    return out


def test_decode_by_the_byte_walk_equals_pydicom_dcmread(tmp_path, study, monkeypatch):
    """`dicom._decode` walks an Explicit VR Little Endian data set over its bytes
    (`_decode_explicit_le`) instead of pydicom's per-element file reads; the data set (every raw
    element, file meta, encodings), the decoded pixels and the rescale are the same as pydicom's
    own `dcmread` gives, and so is every Reject, on every real file and phantom (RLE and native
    CT included) and on cuts of them."""
    rle = phantoms.ct_series(tmp_path / "rle", study, n_slices=2, rows=64, cols=64, seed=4,
                             transfer_syntax=RLELossless).paths
    files = [*rle, *_header_files(tmp_path, study)]
    datas = []
    for i, path in enumerate(files):
        if os.path.getsize(path) > 256 * 1024:  # the large ones add seconds, not cases
            continue
        data = open(path, "rb").read()
        datas.append(data)
        if i % 8 == 0:
            for cut in sorted({132, 200, 500, 1000, len(data) // 2, len(data) - 8, len(data) - 1}):
                if 0 < cut < len(data):
                    datas.append(data[:cut])
    walked = 0
    for data in datas:
        try:
            dicom._decode_explicit_le(data, dicom.HEADER_LIMITS)
            walked += 1
        except dicom._Unhandled:
            pass
    fast = [_decoded(d) for d in datas]

    def unhandled(data, limits):
        raise dicom._Unhandled

    monkeypatch.setattr(dicom, "_decode_explicit_le", unhandled)
    ref = [_decoded(d) for d in datas]
    assert len(fast) == len(ref) > 300
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a == b, i
    assert walked >= 80 and sum(r[0] == "reject" for r in ref) >= 20
    assert sum(isinstance(r[-2], tuple) and r[-2][0] != "raised" for r in ref) >= 60  # pixels decoded


IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("first_iop, other_iop, first_ps, other_ps", [
    (IOP, IOP, [0.7, 0.7], [0.7, 0.7]),
    (IOP, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0005], [0.7, 0.7], [0.7, 0.7]),  # close, not equal
    (IOP, [1.0, 0.0, 0.0, 0.0, 0.99, 0.1], [0.7, 0.7], [0.7, 0.7]),
    (IOP, IOP, [0.7, 0.7], [0.7, 0.7007]),
    (IOP, IOP, [0.7, 0.7], [0.7, 0.71]),
    ([1.0, 0.0, 0.0, 0.0, 1.0, float("nan")], [1.0, 0.0, 0.0, 0.0, 1.0, float("nan")], [0.7, 0.7], [0.7, 0.7]),
    (IOP, IOP, [float("inf"), 0.7], [float("inf"), 0.7]),
    (IOP, IOP, [0.7, 0.7], [0.7]),
    (IOP, [1, 0, 0, 0, 1, 0], [0.7, 0.7], [0.7, 0.7]),
])
def test_check_ct_rows_equal_geometry_shortcut_gives_allclose_answer(first_iop, other_iop, first_ps, other_ps):
    """`_check_ct_rows` skips np.allclose for a slice whose IOP and spacing equal the first's
    (finite); every answer (pass, mixed_geometry, or what allclose raises) is still allclose's."""
    def row(iop, ps):
        return {"iop": iop, "pixel_spacing": ps, "positions": [[0.0, 0.0, 0.0]], "rows": 4, "cols": 4,
                "n_frames": 1, "safe": {"PhotometricInterpretation": "MONOCHROME2"}}

    rows = [row(first_iop, first_ps), row(list(first_iop), list(first_ps)), row(other_iop, other_ps)]

    def outcome(fn):
        try:
            return fn(rows)
        except dicom.Reject as e:
            return e.reason
        except Exception as e:  # noqa: BLE001 — allclose's own errors (shapes) must stay the same
            return type(e).__name__

    def reference(rows):
        first = rows[0]
        for r in rows[1:]:
            if (r["rows"] != first["rows"] or r["cols"] != first["cols"]
                    or not np.allclose(r["iop"], first["iop"], atol=1e-3)
                    or not np.allclose(r["pixel_spacing"], first["pixel_spacing"], rtol=1e-3)):
                raise dicom.Reject("mixed_geometry")

    assert outcome(dicom._check_ct_rows) == outcome(reference)


# ---------------------------------------------------------------------------------------------
# the whole sample


@pytest.mark.parametrize("name", ["rle", "coronal_slope"])
def test_make_sample_equals_the_reference_pipeline(tmp_path, study, name):
    """make_sample (clocked) stores exactly what the plain route gives: pydicom decode, the old
    HU arithmetic, air floor, Orient, Resample, the old float64 rounding."""
    info = phantoms.ct_series(tmp_path / name, study, **{"n_slices": 12, "rows": 40, "cols": 40, "seed": 9, **SAMPLES[name]})
    recipe = config.load(IngestRecipe, None, ["ct.spacing_mm=[3.0,1.1,1.3]", "ct.min_slices=2"])
    item = _planned(info.paths, recipe)
    clock = transforms.StageClock()
    sample = ingest.make_sample(item, recipe, clock=clock)
    hu = np.maximum(_reference_hu(item, exact=True), transforms.HU_MIN)
    hu, affine = transforms.Orient("LPS")(hu, np.array(item.source_affine))
    hu, affine = transforms.Resample(recipe.ct.spacing_mm)(hu, affine)
    np.testing.assert_array_equal(sample.array, _old_round_clip_hu(hu))
    assert sample.meta["affine_lps"] == [[round(float(v), 6) for v in r] for r in affine.tolist()]
    assert {"read", "parse", "decode", "hu", "orient", "resample", "int16", "meta"} <= set(clock.seconds)
    assert all(v >= 0 for v in clock.seconds.values())


def test_stage_clock_charges_cpu_not_sleep():
    import time

    clock = transforms.StageClock()
    time.sleep(0.05)
    clock.lap("sleep")
    t = time.process_time()
    while time.process_time() - t < 0.05:
        pass
    clock.lap("spin")
    clock.add({"spin": 1.0, "child": 0.5})
    assert clock.seconds["sleep"] < 0.02 and 1.04 <= clock.seconds["spin"] < 1.5 and clock.seconds["child"] == 0.5


def test_tables_are_read_once_per_run(tmp_path, monkeypatch):
    """load (validation), the plan digest and the build's lookups share one read of each table;
    the digest still follows the bytes."""
    from radforge import storage

    reports = tmp_path / "reports.csv"
    reports.write_text("AccessionNumber,report\n007,No acute findings.\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("AccessionNumber,Effusion\n007,1\n")
    reads: list[str] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url, *a, **k: reads.append(url) or real(url, *a, **k))
    cfg = IngestRecipe()
    spec = ingest._TablesSpec.load(str(reports), cfg.reports, str(labels), cfg.labels)
    digest = spec.digest()
    lookups = spec.read()
    assert sorted(reads) == sorted([str(reports), str(labels)])
    assert lookups["reports"]["map"] == {"007": "No acute findings."}
    assert lookups["labels"]["map"] == {"007": {"Effusion": 1}}
    labels.write_text("AccessionNumber,Effusion\n007,0\n")
    assert ingest._TablesSpec.load(str(reports), cfg.reports, str(labels), cfg.labels).digest() != digest
