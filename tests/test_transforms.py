"""radforge.transforms: geometry must keep every voxel where it is in the patient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radforge import kinds
from radforge import transforms as T


def _affine(cols_ijk, origin=(10.0, -20.0, 30.0)):
    """4x4 affine whose 3x3 columns are the patient steps of voxel axes i, j, k."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(cols_ijk, dtype=np.float64).T
    a[:3, 3] = origin
    return a


def _rot_z(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _patient(affine, k, j, i):
    """Patient coordinates (N, 3) of array indices [k, j, i]."""
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=0).astype(np.float64)
    return (affine @ ijk1)[:3].T


# Synthetic acquisitions: (name, columns of voxel axes i, j, k in LPS mm).
ACQUISITIONS = [
    ("axial_lps", [(0.7, 0, 0), (0, 0.7, 0), (0, 0, 2.5)]),
    ("axial_feet_first", [(0.7, 0, 0), (0, 0.7, 0), (0, 0, -2.5)]),
    ("axial_flipped_xy", [(-0.8, 0, 0), (0, -0.6, 0), (0, 0, 3.0)]),
    ("coronal", [(0.7, 0, 0), (0, 0, -0.7), (0, -2.0, 0)]),
    ("sagittal", [(0, 0.9, 0), (0, 0, -0.9), (1.5, 0, 0)]),
    ("sagittal_other_way", [(0, -0.9, 0), (0, 0, 0.9), (-1.5, 0, 0)]),
]


@pytest.mark.parametrize("name,cols", ACQUISITIONS, ids=[a[0] for a in ACQUISITIONS])
def test_orient_preserves_patient_coordinates(name, cols):
    shape = (4, 5, 6)
    vol = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    aff = _affine(cols)
    out, out_aff = T.Orient("LPS")(vol, aff)

    # Canonical: diagonal, positive, and spacing carried along with its axis.
    assert np.allclose(out_aff[:3, :3], np.diag(np.diag(out_aff[:3, :3])))
    assert np.all(np.diag(out_aff)[:3] > 0)
    assert out.flags.c_contiguous
    assert sorted(out.shape) == sorted(shape)

    # Every voxel: value v sat at index idx_in(v) -> same patient point as its new index.
    k, j, i = np.indices(out.shape).reshape(3, -1)
    kin, jin, iin = np.unravel_index(out[k, j, i], shape)
    np.testing.assert_allclose(_patient(out_aff, k, j, i), _patient(aff, kin, jin, iin),
                               atol=1e-9)


def test_orient_marker_ends_up_left_posterior_superior():
    # Axial series stored right-to-left / anterior-to-posterior / feet-to-head reversed.
    aff = _affine([(-1, 0, 0), (0, -1, 0), (0, 0, -1)], origin=(0, 0, 0))
    vol = np.zeros((3, 3, 3), np.int16)
    vol[0, 0, 0] = 1  # patient (0, 0, 0): the most L, P, S voxel
    out, out_aff = T.Orient()(vol, aff)
    assert out[2, 2, 2] == 1
    assert np.allclose(out_aff @ [2, 2, 2, 1], [0, 0, 0, 1])


def test_orient_identity_returns_input():
    vol = np.zeros((2, 3, 4), np.int16)
    aff = _affine(ACQUISITIONS[0][1])
    out, out_aff = T.Orient()(vol, aff)
    assert out is vol
    np.testing.assert_array_equal(out_aff, aff)


def test_orient_oblique_keeps_exact_affine():
    cols = (_rot_z(20) @ np.diag([0.7, 0.7, 2.5])).T  # 20 degree tilt in the axial plane
    cols = np.array([-cols[0], cols[1], cols[2]])  # and i runs right-ward
    shape = (3, 4, 5)
    vol = np.arange(np.prod(shape)).reshape(shape)
    aff = _affine(cols)
    out, out_aff = T.Orient()(vol, aff)
    m = out_aff[:3, :3]
    assert np.all(np.diag(m) > 0)
    assert np.all(np.abs(np.diag(m)) > np.abs(m - np.diag(np.diag(m))).max(axis=0))
    k, j, i = np.indices(out.shape).reshape(3, -1)
    kin, jin, iin = np.unravel_index(out[k, j, i], shape)
    np.testing.assert_allclose(_patient(out_aff, k, j, i), _patient(aff, kin, jin, iin),
                               atol=1e-9)


def test_orient_other_axcodes_and_errors():
    aff = _affine(ACQUISITIONS[0][1])
    vol = np.arange(24).reshape(2, 3, 4)
    out, out_aff = T.Orient("RAS")(vol, aff)
    assert np.all(np.diag(out_aff)[:3] * np.array([-1, -1, 1]) > 0)
    np.testing.assert_array_equal(out, vol[:, ::-1, ::-1])

    with pytest.raises(ValueError):
        T.Orient()(vol, _affine([(1, 1, 0), (-1, 1, 0), (0, 0, 1)]))  # exactly 45 degrees
    with pytest.raises(ValueError):
        T.Orient()(vol, _affine([(1, 0, 0), (1, 0.1, 0), (0, 0, 1)]))
    with pytest.raises(ValueError):
        T.Orient("LPL")
    with pytest.raises(ValueError):
        T.Orient()(vol[0], aff)


def test_spacing_zyx_order():
    aff = _affine([(0.5, 0, 0), (0, 0.75, 0), (0, 0, -3.0)])
    assert T.spacing_zyx(aff) == (3.0, 0.75, 0.5)


# ---------------------------------------------------------------------------- Resample


def _ramp_volume(shape, aff, coef=(0.3, -0.7, 1.1), offset=5.0):
    k, j, i = np.indices(shape).reshape(3, -1)
    p = _patient(aff, k, j, i)
    return (p @ np.asarray(coef) + offset).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("target,oblique", [
    ((3.0, 1.5, 1.5), False),  # downsample every axis
    ((1.0, 0.5, 0.45), False),  # upsample every axis
    ((3.0, 0.5, 1.5), True),  # mixed, oblique affine
])
def test_resample_affine_matches_interpolated_values(target, oblique, monkeypatch):
    monkeypatch.setattr(T, "_CHUNK_ELEMENTS", 500)  # force many slabs on a small volume
    shape = (11, 17, 19)
    cols = np.diag([0.8, 0.7, 2.0])
    if oblique:
        cols = _rot_z(10) @ cols
    aff = _affine(cols.T, origin=(-3.0, 7.0, 12.5))
    vol = _ramp_volume(shape, aff)
    out, out_aff = T.Resample(target)(vol, aff)

    s_in = T.spacing_zyx(aff)
    expect_shape = tuple(max(1, math.floor(n * a / b + 0.5))
                         for n, a, b in zip(shape, s_in, target))
    assert out.shape == expect_shape and out.dtype == np.float32
    # Realised spacing is within half an output voxel over the extent of the request.
    for n, got, want in zip(out.shape, T.spacing_zyx(out_aff), target):
        assert abs(got - want) <= want / (2 * n) + 1e-9

    # Values at output voxel centres equal the ramp at their patient coordinates, wherever the
    # sample is inside the input grid (torch clamps outside it when upsampling).
    k, j, i = np.indices(out.shape).reshape(3, -1)
    p = _patient(out_aff, k, j, i)
    idx_in = (np.linalg.inv(aff) @ np.c_[p, np.ones(len(p))].T)[:3]  # (i, j, k)
    n_ijk = np.array(shape[::-1])[:, None]
    inside = np.all((idx_in >= -1e-6) & (idx_in <= n_ijk - 1 + 1e-6), axis=0)
    assert inside.mean() > 0.5
    expected = p @ np.array([0.3, -0.7, 1.1]) + 5.0
    np.testing.assert_allclose(out.reshape(-1)[inside], expected[inside], atol=2e-4, rtol=1e-5)

    # Slabbed separable passes agree with one torch trilinear call.
    ref = F.interpolate(torch.from_numpy(vol)[None, None], size=out.shape, mode="trilinear",
                        align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_resample_identity_shortcut_returns_input():
    aff = _affine([(1.5, 0, 0), (0, 1.5, 0), (0, 0, 3.0)])
    vol = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    out, out_aff = T.Resample((3.0 * (1 + 5e-4), 1.5, 1.5))(vol, aff)
    assert out is vol and out_aff is aff


def test_resample_matching_axes_are_not_interpolated():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(6, 7)).astype(np.float32) * 1000
    vol = np.repeat(plane[None], 5, axis=0)
    aff = _affine([(1.5, 0, 0), (0, 1.5, 0), (0, 0, 5.0)])
    out, out_aff = T.Resample((3.0, 1.5, 1.5))(vol, aff)
    assert out.shape == (8, 6, 7)
    for k in range(out.shape[0]):
        np.testing.assert_array_equal(out[k], plane)  # bit-exact, no in-plane blur
    np.testing.assert_array_equal(out_aff[:3, :2], aff[:3, :2])


def test_resample_nearest_keeps_values():
    vol = np.arange(4 * 6 * 6, dtype=np.int16).reshape(4, 6, 6)
    aff = _affine([(1, 0, 0), (0, 1, 0), (0, 0, 1.0)], origin=(0, 0, 0))
    out, out_aff = T.Resample((2.0, 2.0, 2.0), mode="nearest")(vol, aff)
    assert out.shape == (2, 3, 3)
    assert set(np.unique(out)).issubset(set(vol.ravel().tolist()))
    # Output voxel centre (0,0,0) sits at input index 0.5: nearest-exact picks index 1.
    np.testing.assert_allclose(out_aff @ [0, 0, 0, 1], [0.5, 0.5, 0.5, 1])
    assert out[0, 0, 0] == vol[1, 1, 1]


def test_resample_rejects_bad_arguments():
    with pytest.raises(ValueError):
        T.Resample((1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        T.Resample(mode="cubic")


# ---------------------------------------------------------------------------- intensities


def test_to_int16_hu_rounds_away_from_zero_and_clips():
    x = np.array([-0.5, 0.5, 1.5, 2.5, -1.5, -2.5, 0.49, -3024.0, 40000.0, np.nan, -1023.5])
    out = T.to_int16_hu(x)
    assert out.dtype == np.int16
    assert out.tolist() == [-1, 1, 2, 3, -2, -3, 0, -1024, 32767, -1024, -1024]
    ints = np.array([-3024, 0, 65535 // 2 + 1], dtype=np.int32)
    assert T.to_int16_hu(ints).tolist() == [-1024, 0, 32767]
    assert T.to_int16_hu(np.array([0, 40000], dtype=np.uint16)).tolist() == [0, 32767]


def test_to_int16_hu_slabs(monkeypatch):
    monkeypatch.setattr(T, "_CHUNK_ELEMENTS", 7)
    x = np.random.default_rng(1).normal(scale=800, size=(9, 4, 5))
    ref = np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), -1024, 32767).astype(np.int16)
    np.testing.assert_array_equal(T.to_int16_hu(x), ref)


@pytest.mark.parametrize("hw,expect", [
    ((2048, 1000), (1024, 500)),
    ((1000, 2048), (500, 1024)),
    ((3000, 3000), (1024, 1024)),
    ((1024, 77), (1024, 77)),
    ((300, 200), (300, 200)),  # never upsample by default
])
def test_resize_longest_shapes(hw, expect):
    img = np.random.default_rng(0).random(hw, dtype=np.float32)
    out, scale = T.ResizeLongest(1024)(img)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == expect
    assert scale == (expect[0] / hw[0], expect[1] / hw[1])


def test_resize_longest_upsample_and_torch():
    img = torch.rand(2, 300, 200)
    out, scale = T.ResizeLongest(1024, allow_upsample=True)(img)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1024, 683)
    assert scale == (1024 / 300, 683 / 200)


def test_resize_longest_antialiases():
    # A one-pixel checkerboard shrunk 4x must become flat grey, not a moire pattern.
    yy, xx = np.indices((512, 256))
    board = ((yy + xx) % 2).astype(np.float32)
    out, _ = T.ResizeLongest(128)(board)
    assert out.shape == (128, 64)
    assert abs(out.mean() - 0.5) < 0.01 and out[2:-2, 2:-2].std() < 0.02


def test_scale_intensity_range_numpy_and_torch():
    x = np.array([-1000.0, 0.0, 500.0, 2000.0], dtype=np.float32)
    t = T.ScaleIntensityRange(-1000, 1000, 0.0, 1.0, clip=True)
    np.testing.assert_allclose(t(x), [0.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(t(torch.from_numpy(x)).numpy(), t(x), atol=1e-7)
    unclipped = T.ScaleIntensityRange(-1000, 1000, -1.0, 1.0)(np.int16(2000))
    assert unclipped.dtype == np.float32 and float(unclipped) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        T.ScaleIntensityRange(5, 5)


def test_window_hu_numpy_torch_equal():
    hu = np.random.default_rng(2).integers(-1024, 3000, size=(3, 8, 9)).astype(np.int16)
    hu[0, 0, 0] = 40  # soft-tissue level -> 0.5 in the first channel
    w = T.WindowHU(windows=[(40, 400), (-600, 1500)])
    a = w(hu)
    b = w(torch.from_numpy(hu))
    assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
    assert a.shape == (2, 3, 8, 9) and a.dtype == np.float32 and b.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert a[0, 0, 0, 0] == pytest.approx(0.5)
    np.testing.assert_allclose(a, b.numpy(), atol=1e-6)


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, radforge.transforms, radforge.viz; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# Model views
# --------------------------------------------------------------------------------------------

from radforge.config import ViewConfig  # noqa: E402


def test_model_view_ct_windows_crop_and_air_padding():
    view = ViewConfig(ct_windows=[(40.0, 400.0), (-600.0, 1500.0)], ct_size=(4, 6, 6))
    mv = kinds.CT.view(view)
    vol = np.full((2, 10, 4), 40, np.int16)  # z too small (pad), y too big (crop), x too small (pad)
    vol[:, 5, :] = 240  # the top of the soft-tissue window
    out = mv(vol, {})
    assert out.shape == mv.input_shape == (2, 4, 6, 6) and out.dtype == np.float32
    # Centre crop of y=10 → rows 2..7; the 240 HU row lands at y=3; centred pads: z 1+1, x 1+1.
    inside = out[:, 1:3, :, 1:5]
    assert np.allclose(inside[0, :, 3], 1.0) and np.allclose(np.delete(inside[0], 3, axis=1), 0.5)
    assert np.allclose(np.delete(inside[1], 3, axis=1), (40 + 600 + 750) / 1500, atol=1e-6)
    # Padding is air (-1024 HU) before windowing: in the lung window air is NOT the floor.
    air = np.array([0.0, (-1024 + 1350) / 1500], np.float32)[:, None, None]
    assert np.allclose(out[:, 0], air) and np.allclose(out[:, 3], air) and np.allclose(out[:, :, :, 0], air)


def test_model_view_deterministic_without_rng_and_reproducible_with_seed():
    view = ViewConfig(ct_size=(4, 8, 8), rand_flip=True)
    mv = kinds.CT.view(view)
    vol = np.random.default_rng(0).integers(-1024, 1500, size=(12, 20, 20)).astype(np.int16)
    a, b = mv(vol, {}), mv(vol, {})
    assert np.array_equal(a, b)
    assert np.array_equal(a, T.WindowHU(view.ct_windows)(vol[4:8, 6:14, 6:14]))  # centre crop, no flip
    r1 = mv(vol, {}, np.random.default_rng(7))
    r2 = mv(vol, {}, np.random.default_rng(7))
    assert np.array_equal(r1, r2)
    outs = {mv(vol, {}, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) > 1  # random crops (and flips) do vary
    fixed = kinds.CT.view(ViewConfig(ct_size=(4, 8, 8), rand_crop=False))
    assert np.array_equal(fixed(vol, {}, np.random.default_rng(7)), a)  # rand_crop off: centre even in training


def test_model_view_xray_short_side_resize_crop_normalise():
    view = ViewConfig(xray_size=32, xray_mean=0.5, xray_std=0.25)
    mv = kinds.XRAY.view(view)
    img = np.zeros((64, 128), np.uint16)
    img[:, 64:] = 65535
    out = mv(img, {})
    assert out.shape == mv.input_shape == (1, 32, 32) and out.dtype == np.float32
    # 64x128 → 32x64 (short side 32) → centre 32x32 = columns 16..47: left half dark, right bright.
    assert np.allclose(out[0, :, :14], -2.0) and np.allclose(out[0, :, 18:], 2.0)
    small = mv(np.full((20, 10), 65535, np.uint16), {})  # upsampled so the short side reaches 32
    assert small.shape == (1, 32, 32) and np.allclose(small, 2.0)
    a = mv(img, {}, np.random.default_rng(1))
    assert np.array_equal(a, mv(img, {}, np.random.default_rng(1)))


def test_crop_or_pad_and_flip_pieces():
    x = np.arange(10)
    assert T.CropOrPad((4,))(x).tolist() == [3, 4, 5, 6]
    assert T.CropOrPad((13,), pad_value=-1)(x).tolist() == [-1] + list(range(10)) + [-1, -1]
    starts = {int(T.CropOrPad((4,))(x, np.random.default_rng(s))[0]) for s in range(40)}
    assert starts == set(range(7))
    assert T.RandFlip(1.0)(x, np.random.default_rng(0)).tolist() == x[::-1].tolist()
    assert T.RandFlip(1.0)(x, None).tolist() == x.tolist()
    assert np.allclose(T.NormalizeIntensity(1.0, 2.0)(np.array([1.0, 3.0])), [0.0, 1.0])
    assert T.ResizeShortest(32).output_hw(64, 128) == (32, 64)


def test_model_view_resamples_from_stored_spacing():
    view = ViewConfig(ct_size=(4, 8, 8), ct_spacing_mm=(3.0, 3.0, 3.0), ct_windows=[(0.0, 2000.0)])
    mv = kinds.CT.view(view)
    vol = np.full((4, 16, 16), 500, np.int16)  # 3 x 1.5 x 1.5 mm → 4 x 8 x 8 at 3 mm
    out = mv(vol, {"spacing_mm": [3.0, 1.5, 1.5]})
    assert out.shape == (1, 4, 8, 8) and np.allclose(out, 0.75)  # no air padding needed: resampled to fit
    same = mv(vol[:, :8, :8], {"spacing_mm": [3.0, 3.0, 3.0]})
    assert np.allclose(same, 0.75)
    with pytest.raises(ValueError, match="spacing_mm"):
        mv(vol, {})
