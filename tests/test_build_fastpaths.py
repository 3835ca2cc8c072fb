"""The CT build's fast paths give the bytes of the plain path (Ray-free).

The plain path: `dicom.load_ct` holds the whole float32 HU volume, then
`transforms.Profile.canonical_ct` floors it at air, orients, resamples and rounds it. The fast
path (`dicom.canonical` → `Profile.canonical_ct_filled`) fills, floors and resamples in plane one
slab (`transforms._CHUNK_ELEMENTS`) at a time, and skips the floor where the slices' HU cannot
lie below it (`dicom._least_hu`). Each test compares the two, byte for byte, on inputs that take
each branch. The header elements every slice reads (`dicom._with_slice_elements`, converted once
per distinct raw element) are compared with pydicom's own reading of each file.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from radforge import deid, dicom, phantoms, transforms
from radforge.config import IngestRecipe
from radforge.transforms import HU_MIN, Profile


def _planned(paths: list[str], recipe: IngestRecipe) -> dicom.PlanItem:
    rows = [dicom.scan(p, os.path.getsize(p), open(p, "rb")) for p in paths]
    ctx = dicom.PlanContext(recipe=recipe, pseudo=deid.Pseudonymizer(b"k"))
    (item,) = [it for it in dicom.plan_group(rows, ctx) if it.status == "planned"]
    return item


def _plain(item: dicom.PlanItem, read, profile: Profile):
    hu, affine = dicom.load_ct(item, read)
    return profile.canonical_ct(hu, affine)


def _affine(spacing_zyx, flip_x=False, origin=(-90.0, -80.0, 30.0)):
    a = np.eye(4)
    a[0, 0], a[1, 1], a[2, 2] = -spacing_zyx[2] if flip_x else spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]
    a[:3, 3] = origin
    return a


def _filler(vol: np.ndarray, calls: list, least=-np.inf):
    def fill(k0, k1, out):
        calls.append((k0, k1))
        out[...] = vol[k0:k1]
        return least

    return fill


# ---------------------------------------------------------------------------------------------
# Profile.canonical_ct_filled on synthetic volumes: every order of passes, slab remainders


GEOMETRIES = {  # (shape, source spacing z, y, x, flip x): which passes, in which order
    "inplane_then_z": ((11, 20, 18), (1.25, 0.7, 0.7), False),
    "inplane_only": ((7, 21, 19), (3.0, 0.8, 0.95), False),
    "z_first": ((40, 12, 12), (0.5, 1.4, 1.4), False),  # the fallback: z pass first
    "z_only": ((9, 10, 10), (1.0, 1.5, 1.5), False),
    "upsample_z": ((5, 20, 20), (5.0, 0.9, 0.9), False),
    "nothing": ((4, 6, 6), (3.0, 1.5, 1.5), False),
    "flipped": ((11, 20, 18), (1.25, 0.7, 0.7), True),  # the fallback: Orient moves voxels
    "one_slice": ((1, 16, 16), (2.0, 0.6, 0.6), False),
}


@pytest.mark.parametrize("stream", [1, 3, None])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_canonical_ct_filled_equals_canonical_ct(monkeypatch, name, stream):
    """Slabs of 1 and 3 slices (both paths' `_CHUNK_ELEMENTS`: remainders) and the default."""
    shape, spacing, flip = GEOMETRIES[name]
    if stream:
        monkeypatch.setattr(transforms, "_CHUNK_ELEMENTS", stream * shape[1] * shape[2])
    rng = np.random.default_rng(len(name) * 31 + (stream or 0))
    vol = rng.uniform(-3100, 3100, size=shape).astype(np.float32)
    vol.flat[::17] = -2048.0  # padding below the air floor, blended into tissue if not floored first
    vol.flat[5] = np.nan
    profile = Profile(ct_spacing_mm=(3.0, 1.5, 1.5))
    calls: list = []
    got, got_aff, got_sp = profile.canonical_ct_filled(shape, _affine(spacing, flip), _filler(vol, calls))
    want, want_aff, want_sp = profile.canonical_ct(vol.copy(), _affine(spacing, flip))
    assert got.dtype == np.int16 and got.tobytes() == want.tobytes() and got.shape == want.shape
    np.testing.assert_array_equal(got_aff, want_aff)
    assert got_sp == want_sp
    # The slices are filled once each, in order; slab by slab only where the fast path applies.
    assert [k for k0, k1 in calls for k in range(k0, k1)] == list(range(shape[0]))
    streamed = name in ("inplane_then_z", "inplane_only", "upsample_z", "one_slice")
    assert len(calls) == (-(-shape[0] // stream) if streamed and stream else 1)


def test_canonical_ct_filled_skips_the_floor_only_on_the_fill_s_word(monkeypatch):
    """A fill whose bound is at the floor is not floored, one without a bound is: padding below
    the floor then blends into its neighbours (which only a fill that lies about it could cause)."""
    monkeypatch.setattr(transforms, "_CHUNK_ELEMENTS", 2 * 20 * 18)
    shape, spacing = GEOMETRIES["inplane_then_z"][:2]
    vol = np.full(shape, -3000.0, np.float32)
    vol[:, ::2] = 1000.0
    profile = Profile()
    floored, _, _ = profile.canonical_ct_filled(shape, _affine(spacing), _filler(vol, [], least=-np.inf))
    trusted, _, _ = profile.canonical_ct_filled(shape, _affine(spacing), _filler(vol, [], least=float(HU_MIN)))
    assert floored.tobytes() == profile.canonical_ct(vol.copy(), _affine(spacing))[0].tobytes()
    assert (trusted < floored).any()


def test_orient_keeps_exactly_where_it_returns_the_volume_unmoved():
    vol = np.zeros((3, 4, 5), np.float32)
    for cols in ([(0.7, 0, 0), (0, 0.7, 0), (0, 0, 2.5)], [(0.7, 0, 0), (0, 0.7, 0), (0, 0, -2.5)],
                 [(0, 0.7, 0), (0.7, 0, 0), (0, 0, 2.5)], [(0.7, 0.05, 0), (-0.05, 0.7, 0), (0, 0, 2.5)],
                 [(0.7, 0, 0), (0.7, 0, 0), (0, 0, 2.5)], [(0, 0, 0), (0, 0.7, 0), (0, 0, 2.5)]):
        a = np.eye(4)
        a[:3, :3] = np.asarray(cols, dtype=np.float64).T
        try:
            out, out_aff = transforms.Orient("LPS")(vol, a)
            unmoved = out is vol and np.array_equal(out_aff, a)
        except ValueError:
            unmoved = False
        assert transforms.Orient("LPS").keeps(a) == unmoved, cols


# ---------------------------------------------------------------------------------------------
# dicom._least_hu: a true lower bound of what _rescaled writes


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
@pytest.mark.parametrize("slope,inter", [(1.0, -1024.0), (1.0, -1024.5), (1.0, 0.0), (0.5, -1000.25),
                                         (-1.0, 1.0), (2.5, -3.3), (1e-3, -1024.0), (3.0, 7.1e5)])
def test_least_hu_is_the_least_value_written(dtype, slope, inter):
    info = np.iinfo(dtype)
    every = np.arange(info.min, info.max + 1).astype(dtype)  # every stored value of the dtype
    out = np.empty(every.shape, np.float32)
    dicom._rescaled(every, slope, inter, out)
    assert dicom._least_hu(np.dtype(dtype), slope, inter) == out.min()


@pytest.mark.parametrize("dtype", [np.int32, np.uint32])
def test_least_hu_bounds_wide_integers(dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(info.min, info.max, 100000, dtype=dtype, endpoint=True),
                             np.array([info.min, info.min + 1, info.max - 1, info.max], dtype=dtype)])
    for slope, inter in ((1.0, -1024.0), (0.37, -5.5), (-2.0, 3.0)):
        out = np.empty(values.shape, np.float32)
        dicom._rescaled(values, slope, inter, out)
        least = dicom._least_hu(np.dtype(dtype), slope, inter)
        assert least <= out.min() and least in out[-4:]


# ---------------------------------------------------------------------------------------------
# dicom.canonical on real files: the plain path's bytes


@pytest.fixture(scope="module")
def study():
    return phantoms.make_study(phantoms.make_patient(11))


def _rewrite(paths: list[str], **values) -> None:
    """Set header values in every file (pydicom writes them back as they are); `pad` (native
    signed pixels only): that stored value in the first rows and as the PixelPaddingValue."""
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        for k, v in values.items():
            if k == "pad":
                px = ds.pixel_array.copy()
                px[:3] = v
                ds.PixelData = px.tobytes()
                ds.add_new(0x00280120, "SS", v)
            else:
                setattr(ds, k, v(i) if callable(v) else v)
        ds.save_as(p)


SERIES = {  # ct_series arguments, then header rewrites: each takes a branch of the build
    # floor skipped; the pixel module at another offset in every file
    "rle_uint16": (dict(transfer_syntax=RLELossless), {"ImageComments": lambda i: "c" * (2 + 2 * i)}),
    "slope": (dict(rescale=(0.5, -1000.0)), {}),
    "float_intercept": (dict(), {"RescaleIntercept": "-1024.5", "RescaleSlope": "1.0"}),
    "float_slope_per_file": (dict(), {"RescaleSlope": lambda i: f"{0.9 + 0.01 * i:.2f}",
                                      "RescaleIntercept": lambda i: f"{-1000 - i}.25"}),
    "signed_padding": (dict(rescale=(1.0, 0.0)), {"pad": -2000}),  # below the floor: floored
    "per_slice_implicit": (dict(per_slice_rescale=True, transfer_syntax=ImplicitVRLittleEndian), {}),
    "odd_spacing": (dict(pixel_spacing=(0.77, 0.91), slice_spacing=1.7, rows=30, cols=26), {}),
    "thin_slices": (dict(slice_spacing=0.6, n_slices=24), {}),  # z pass first: the fallback
    "coronal": (dict(orientation="coronal", rows=24, n_slices=20), {}),  # Orient moves: the fallback
}


@pytest.mark.parametrize("stream", [1, 4])
@pytest.mark.parametrize("name", sorted(SERIES))
def test_canonical_ct_equals_the_plain_path(tmp_path, monkeypatch, study, name, stream):
    kwargs, rewrite = SERIES[name]
    info = phantoms.ct_series(tmp_path / name, study, **{"n_slices": 11, "rows": 28, "cols": 28, "seed": 2, **kwargs})
    _rewrite(info.paths, **rewrite)
    monkeypatch.setattr(transforms, "_CHUNK_ELEMENTS", stream * 28 * 28)
    item = _planned(info.paths, IngestRecipe())
    read = lambda p: open(p, "rb").read()  # noqa: E731
    profile = Profile(ct_spacing_mm=(3.0, 1.5, 1.5))
    got, meta = dicom.canonical(item, read, profile)
    want, affine, spacing = _plain(item, read, profile)
    assert got.tobytes() == want.tobytes() and list(got.shape) == meta["shape"] == list(want.shape)
    assert meta["affine_lps"] == [dicom._rounded(r) for r in affine.tolist()]
    assert meta["canonical_source_spacing_mm"] == dicom._rounded(spacing)


def test_canonical_ct_multi_frame_equals_the_plain_path(tmp_path, monkeypatch, study):
    info = phantoms.enhanced_ct(tmp_path / "ect.dcm", study, n_frames=13, rows=30, cols=30, seed=4)
    monkeypatch.setattr(transforms, "_CHUNK_ELEMENTS", 3 * 30 * 30)
    item = _planned(info.paths, IngestRecipe())
    assert len(set(item.paths)) == 1 and min(item.frames) >= 0
    read = lambda p: open(p, "rb").read()  # noqa: E731
    got, meta = dicom.canonical(item, read, Profile())
    want, affine, _ = _plain(item, read, Profile())
    assert got.tobytes() == want.tobytes()
    assert meta["affine_lps"] == [dicom._rounded(r) for r in affine.tolist()]


def test_canonical_ct_rejects_as_the_plain_path(tmp_path, study):
    """A slice that fails to decode midway rejects the series, with the plain path's reason."""
    info = phantoms.ct_series(tmp_path / "cut", study, n_slices=9, rows=28, cols=28, seed=3, transfer_syntax=RLELossless)
    item = _planned(info.paths, IngestRecipe())
    files = {p: open(p, "rb").read() for p in info.paths}
    files[item.paths[6]] = files[item.paths[6]][:-200]  # a compressed slice cut short
    reasons = []
    for build in (lambda: dicom.canonical(item, files.__getitem__, Profile()),
                  lambda: _plain(item, files.__getitem__, Profile())):
        with pytest.raises(dicom.Reject) as e:
            build()
        reasons.append(e.value.reason)
    assert reasons[0] == reasons[1]


# ---------------------------------------------------------------------------------------------
# dicom._with_slice_elements: each slice's pixel-module and rescale elements, converted once


@pytest.mark.parametrize("name", ["rle_uint16", "float_slope_per_file", "per_slice_implicit", "signed_padding"])
def test_slice_element_values_equal_pydicom_s_and_are_shared_only_when_equal(tmp_path, study, name):
    kwargs, rewrite = SERIES[name]
    info = phantoms.ct_series(tmp_path / name, study, **{"n_slices": 6, "rows": 20, "cols": 20, "seed": 8, **kwargs})
    _rewrite(info.paths, **rewrite)
    seen: dict[int, list] = {}  # the elements themselves, kept alive: their ids stay distinct
    for path in sorted(info.paths) * 2:  # the second round meets every element converted before
        data = open(path, "rb").read()
        ds, ref = dicom._decode(data), pydicom.dcmread(io.BytesIO(data))
        for tag in dicom._SLICE_TAGS:
            assert (tag in ds) == (tag in ref)
            if tag in ref:
                assert (ds[tag].VR, ds[tag].value, ds[tag].file_tell) == (ref[tag].VR, ref[tag].value, ref[tag].file_tell)
                seen.setdefault(tag, []).append(ds[tag])
        assert dicom._rescale(ds, -1) == (float(ref.get("RescaleSlope", 1)), float(ref.get("RescaleIntercept", 0)))
        np.testing.assert_array_equal(dicom._pixels(ds, 1 << 30), ref.pixel_array)
    # One value object per distinct raw value where the elements carry their VR (the walk's and
    # pydicom's explicit VR reads); the slopes and intercepts that vary per file, one per file.
    values = {tag: len({id(e.value) for e in elems}) for tag, elems in seen.items()}
    slope, intercept = 0x00281053, 0x00281052
    if name == "per_slice_implicit":  # implicit VR: raw elements without a VR, converted each time
        assert values[slope] == 2 * len(info.paths)
    elif name == "float_slope_per_file":
        assert values[slope] == values[intercept] == len(info.paths)
    else:
        assert values[slope] == values[intercept] == 1


def test_slice_element_that_fails_to_convert_rejects_each_time(tmp_path, study):
    info = phantoms.ct_series(tmp_path / "bad", study, n_slices=4, rows=20, cols=20, seed=8)
    data = open(info.paths[0], "rb").read()
    at = data.index(b"\x28\x00\x53\x10DS")  # RescaleSlope, explicit VR little endian
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    bad = data[: at + 8] + b"x" * length + data[at + 8 + length :]
    for _ in range(2):
        ds = dicom._decode(bad)
        with pytest.raises(dicom.Reject) as e:
            dicom._rescale(ds, -1)
        assert e.value.reason == "decode_error"
    assert dicom._rescale(dicom._decode(data), -1)[0] == float(pydicom.dcmread(info.paths[0]).RescaleSlope)
