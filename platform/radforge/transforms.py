"""Canonical storage transforms (used by ingest) and model views (used by loader and serve).

Preprocessing is defined here once so that ingest, training and serving cannot drift apart.
Names follow MONAI: imperative CamelCase callables configured in ``__init__`` and applied with
``__call__``; anything stochastic gets a ``Rand`` prefix and an explicit seed. Intensity
transforms accept numpy arrays or torch tensors and return the type they were given; geometric
storage transforms (`Orient`, `Resample`) work on numpy volumes because that is what ingest holds.

torch is imported lazily inside the functions that need it, so importing this module stays cheap
(``radforge.viz`` reuses `WindowHU` on numpy arrays without ever loading torch).

Conventions (copied verbatim into shards/SPEC.md; change both together)
-----------------------------------------------------------------------
Array layout
    A CT volume is a numpy array indexed ``[k, j, i]`` = ``[slice, row, column]``.
    An X-ray image is indexed ``[y, x]`` = ``[row, column]``.

Affine
    ``affine`` is a 4x4 float64 matrix mapping the voxel index *column vector* ``(i, j, k, 1)``
    (note: reversed with respect to array axis order) to patient coordinates in DICOM LPS
    millimetres: +x toward patient Left, +y toward Posterior, +z toward Superior. Column 0 of the
    affine is the step for array axis 2, column 1 for array axis 1, column 2 for array axis 0; the
    last column is the patient position of the *centre* of voxel ``[0, 0, 0]``.

Spacing
    Always reported in array axis order ``(z, y, x)`` = ``(|affine[:3, 2]|, |affine[:3, 1]|,
    |affine[:3, 0]|)``, i.e. the Euclidean norms of the affine columns, so it stays correct for
    oblique acquisitions. ``spacing_mm`` in shard metadata follows the same order.

Canonical storage orientation "LPS"
    Array axis 2 (i) points toward +x (Left), axis 1 (j) toward +y (Posterior), axis 0 (k) toward
    +z (Superior): the affine's 3x3 part is diagonal with positive entries (nearly diagonal for an
    oblique acquisition, which `Orient` permutes and flips but never interpolates). Hence
    ``volume[k]`` is an axial slice, ``k`` grows toward the head, rows grow toward the back and
    columns toward the patient's left.

Resample voxel-centre convention
    `Resample` calls ``torch.nn.functional.interpolate(..., size=..., align_corners=False)``:
    the *outer edges* of the first and last voxels stay where they were (the physical extent
    ``n * spacing`` is preserved exactly on every axis), so output voxel ``o`` samples input
    index ``(o + 0.5) * r - 0.5`` with ``r = n_in / n_out``. The returned affine encodes exactly
    this: column scaled by ``r`` and origin shifted by ``(r - 1) / 2`` input voxels. Because
    ``n_out`` is rounded, the realised spacing is ``s_in * n_in / n_out``, which differs from the
    requested spacing by at most half an output voxel over the whole extent (read the real value
    from the affine; never assume the requested one).

HU storage
    CT intensities are stored as int16 Hounsfield units, rounded half away from zero and clipped
    to ``[-1024, 32767]`` (see `to_int16_hu` for why -1024).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Orient",
    "Resample",
    "to_int16_hu",
    "spacing_zyx",
    "ResizeLongest",
    "ScaleIntensityRange",
    "WindowHU",
    "HU_MIN",
    "HU_MAX",
]

HU_MIN = -1024
HU_MAX = 32767
CANONICAL_ORIENTATION = "LPS"
CT_INTERPOLATION = "trilinear"  # storage resampling (Resample's mode)

# Slab budget (elements) for chunked resampling: ~64 MB of float32 temporaries per slab keeps
# peak memory near one input plus one output copy even for 512x512x600 series. Tests shrink it
# to exercise the slab boundaries.
_CHUNK_ELEMENTS = 16 * 1024 * 1024

# Patient axis and sign for each orientation letter, in the DICOM LPS frame.
_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def _torch_tensor_type():
    """torch.Tensor if torch is already imported, else None: a tensor cannot exist without it."""
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _is_tensor(x: Any) -> bool:
    tensor = _torch_tensor_type()
    return tensor is not None and isinstance(x, tensor)


def _check_affine(affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError("affine must be a finite 4x4 matrix")
    return a


def _check_volume(volume: Any) -> np.ndarray:
    if _is_tensor(volume):
        raise TypeError("geometric storage transforms take numpy volumes; call .numpy() first")
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"expected a 3-D volume [k, j, i], got {v.ndim} dimensions")
    return v


def spacing_zyx(affine: Any) -> tuple[float, float, float]:
    """Voxel spacing in array axis order (z, y, x), from the affine's column norms."""
    a = _check_affine(affine)
    norms = np.linalg.norm(a[:3, :3], axis=0)
    return (float(norms[2]), float(norms[1]), float(norms[0]))


class StageClock:
    """CPU seconds per named stage of building a sample (`radforge bench ingest` prints them).

    `lap(name)` charges the CPU time of this process since the previous lap (or since the clock
    was made) to `name`. Process time, not wall time: other load on a shared machine does not
    count, and a child process keeps its own clock (`add` merges what it reports). One clock read
    per stage, so ingest always keeps one; `NO_CLOCK` is the do-nothing stand-in.
    """

    __slots__ = ("seconds", "_t")

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.process_time()

    def lap(self, name: str) -> None:
        t = time.process_time()
        self.seconds[name] = self.seconds.get(name, 0.0) + (t - self._t)
        self._t = t

    def add(self, seconds: dict[str, float]) -> None:
        for k, v in seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


class _NoClock:
    __slots__ = ()

    def lap(self, name: str) -> None:
        pass

    def add(self, seconds: dict[str, float]) -> None:
        pass


NO_CLOCK = _NoClock()


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


class Orient:
    """Permute and flip a volume so its voxel axes point along ``axcodes`` (default "LPS").

    ``Orient("LPS")(volume, affine) -> (volume, affine)``. Like nibabel's
    ``as_closest_canonical``: no interpolation, so intensities are untouched and the operation
    is exactly invertible. Each voxel axis is assigned the patient axis its affine column points
    along most strongly, which handles axial, coronal, sagittal and mildly oblique series; an
    oblique series keeps its small off-diagonal terms (the affine stays exact, only "nearly"
    diagonal). If two voxel axes would land on the same patient axis (obliquity near 45 degrees,
    or a degenerate affine) a ValueError is raised rather than guessing, because a wrong guess
    would silently mirror anatomy.

    ``axcodes`` follow nibabel: the letter at position 0 is where voxel axis i (array axis 2)
    points, position 1 is j (array axis 1), position 2 is k (array axis 0).

    The result is always C-contiguous (the input object itself when nothing moves and it already
    was). That costs one copy when anything moves, but a flipped view has
    negative strides, which ``torch.from_numpy`` rejects and which make every later per-slice
    read slow; paying once here is cheaper than paying in every consumer.
    """

    def __init__(self, axcodes: str = "LPS"):
        codes = str(axcodes).upper()
        if len(codes) != 3 or any(c not in _LETTERS for c in codes):
            raise ValueError(f"axcodes must be three of L/R, P/A, S/I, got {axcodes!r}")
        targets = [_LETTERS[c] for c in codes]
        if len({axis for axis, _ in targets}) != 3:
            raise ValueError(f"axcodes {axcodes!r} name the same patient axis twice")
        self.axcodes = codes
        # patient axis -> (voxel axis wanted along it, sign wanted)
        self._want = {axis: (v, sign) for v, (axis, sign) in enumerate(targets)}

    def __repr__(self) -> str:
        return f"Orient({self.axcodes!r})"

    def __call__(self, volume: np.ndarray, affine: Any) -> tuple[np.ndarray, np.ndarray]:
        vol = _check_volume(volume)
        aff = _check_affine(affine)
        n_ijk = (vol.shape[2], vol.shape[1], vol.shape[0])
        perm_in_for_out, flip_out, P = self._moves(aff, n_ijk)
        if perm_in_for_out == [0, 1, 2] and not any(flip_out):
            return np.ascontiguousarray(vol), aff  # same object when already contiguous

        # Voxel axis v is array axis 2 - v.
        transpose = [2 - perm_in_for_out[2 - a] for a in range(3)]
        out = vol.transpose(transpose)
        flips = tuple(2 - v for v in range(3) if flip_out[v])
        if flips:
            out = np.flip(out, axis=flips)
        return np.ascontiguousarray(out), aff @ P

    def keeps(self, affine: Any) -> bool:
        """Whether `__call__` leaves a volume with this affine where it is (its axes already
        point along `axcodes`: no permutation, no flip, same affine); False where it would
        move the voxels or raise."""
        try:
            perm_in_for_out, flip_out, _ = self._moves(_check_affine(affine), (1, 1, 1))
        except ValueError:
            return False
        return perm_in_for_out == [0, 1, 2] and not any(flip_out)

    def _moves(self, aff: np.ndarray, n_ijk: tuple[int, int, int]) -> tuple[list[int], list[bool], np.ndarray]:
        """(input voxel axis of each output axis, output axes flipped, P: output voxel index →
        input voxel index, u_in = P @ u_out) for an affine and the volume's size along i, j, k."""
        cols = aff[:3, :3]
        if np.any(np.linalg.norm(cols, axis=0) == 0):
            raise ValueError("affine has a zero-length voxel axis")
        # For every input voxel axis v: the patient axis it runs along and its direction.
        patient_axis = [int(np.argmax(np.abs(cols[:, v]))) for v in range(3)]
        if len(set(patient_axis)) != 3:
            raise ValueError(
                "cannot orient: two voxel axes run closest to the same patient axis "
                "(oblique near 45 degrees or degenerate affine)"
            )
        direction = [1 if cols[patient_axis[v], v] > 0 else -1 for v in range(3)]

        P = np.zeros((4, 4))
        P[3, 3] = 1.0
        perm_in_for_out = [0, 0, 0]  # output voxel axis -> input voxel axis
        flip_out = [False, False, False]
        for v in range(3):
            out_v, want_sign = self._want[patient_axis[v]]
            sign = direction[v] * want_sign
            perm_in_for_out[out_v] = v
            P[v, out_v] = sign
            if sign < 0:
                P[v, 3] = n_ijk[v] - 1
                flip_out[out_v] = True
        return perm_in_for_out, flip_out, P


class Resample:
    """Resample a volume to ``spacing_zyx`` millimetres (array axis order z, y, x).

    ``Resample((3.0, 1.5, 1.5))(volume, affine) -> (float32 volume, affine)``.

    Output size per axis is ``max(1, floor(n_in * s_in / s_out + 0.5))`` (round half up, not
    Python's banker's rounding, so the size never depends on parity). Sampling follows
    ``interpolate(size=..., align_corners=False)``: the physical extent is preserved exactly and
    the realised spacing is ``s_in * n_in / n_out`` (see the module docstring); the returned
    affine is exact for what was computed, including oblique affines.

    An axis whose spacing already equals the target within 1e-3 relative is left alone (no
    interpolation, no resampling blur, affine column unchanged). If all three match the input
    volume and affine are returned as they are, same objects, same dtype: callers that need
    float32 or int16 convert afterwards (ingest calls `to_int16_hu` regardless).

    ``mode`` is "trilinear" or "nearest" (torch's "nearest-exact": centre-aligned like the
    linear mode, unlike torch's legacy "nearest", so the same affine holds; use it for label
    maps). Trilinear downsampling does not low-pass first, so a 3x reduction aliases fine
    texture; we accept that for storage because thick-slice CT is already integrated along z by
    the scanner and in-plane reductions are typically under 2x.

    Memory: trilinear is separable, so the volume is resampled one axis group at a time
    (in-plane, then z, or the reverse when that gives the smaller intermediate), each in slabs of
    about 64 MB. Peak extra memory is one float32 intermediate plus the float32 output plus two
    slabs, instead of a full float32 copy of the input plus torch's own buffers: a 600x512x512
    int16 series at 1.0/0.7/0.7 mm resampled to 3/1.5/1.5 mm peaks at about 0.4 GB above the
    input (intermediate 0.14 GB, output 0.05 GB) and takes ~1.3 s on 2 CPU cores. Per-slab
    results match a single ``interpolate(mode="trilinear")`` call up to float32 rounding.

    Tip for ingest: clip padding values (-2000/-3024) to the air floor *before* resampling;
    otherwise they are blended into tissue at the edge of the field of view.
    """

    def __init__(self, spacing_zyx: Sequence[float] = (3.0, 1.5, 1.5), mode: str = "trilinear"):
        target = tuple(float(s) for s in spacing_zyx)
        if len(target) != 3 or not all(math.isfinite(s) and s > 0 for s in target):
            raise ValueError("spacing_zyx must be three positive millimetre values (z, y, x)")
        if mode not in ("trilinear", "nearest"):
            raise ValueError(f"mode must be 'trilinear' or 'nearest', got {mode!r}")
        self.spacing_zyx = target
        self.mode = mode

    def __repr__(self) -> str:
        return f"Resample(spacing_zyx={self.spacing_zyx}, mode={self.mode!r})"

    def output_shape(self, shape: Sequence[int], affine: Any) -> tuple[int, int, int]:
        """The shape `__call__` will produce, without touching any voxels (for planning)."""
        s_in = spacing_zyx(affine)
        out = []
        for n, si, so in zip(shape, s_in, self.spacing_zyx):
            if abs(si - so) <= 1e-3 * so:
                out.append(int(n))
            else:
                out.append(max(1, int(math.floor(n * si / so + 0.5))))
        return tuple(out)  # type: ignore[return-value]

    def __call__(self, volume: np.ndarray, affine: Any) -> tuple[np.ndarray, np.ndarray]:
        vol = _check_volume(volume)
        aff = _check_affine(affine)
        out_shape = self.output_shape(vol.shape, aff)
        if tuple(out_shape) == tuple(vol.shape):
            return volume, affine
        out = vol
        for axes in _pass_order(vol.shape, out_shape):
            out = (_resample_inplane if axes == "yx" else _resample_z)(out, out_shape, self.mode)
        return out, self._affine(out_shape, aff, vol.shape)

    def filled(self, shape: Sequence[int], affine: Any, fill, clock: StageClock | _NoClock = NO_CLOCK,
               ) -> tuple[np.ndarray, np.ndarray] | None:
        """`self(volume, affine)` of the float32 volume of `shape` that `fill(z0, z1, out)`
        writes a slab of slices at a time, without that volume ever held in full: where the
        in-plane pass comes first (`__call__`'s order), each slab is filled into one buffer and
        resampled in plane. The same slabs as `__call__`'s, hence the same values (torch's
        kernel rounds differently for other slab sizes: 3 slices of 512² do not give the bytes
        of 64). None, having called nothing, where that order does not hold (no in-plane pass,
        z first, an empty volume): fill the volume and call `self`. `clock`: "resample"."""
        aff = _check_affine(affine)
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or 0 in shape:
            return None
        out_shape = self.output_shape(shape, aff)
        order = _pass_order(shape, out_shape)
        if not order or order[0] != "yx":
            return None
        vol = _resample_inplane(_Filled(shape, fill, clock), out_shape, self.mode)
        if len(order) > 1:
            vol = _resample_z(vol, out_shape, self.mode)
            clock.lap("resample")
        return vol, self._affine(out_shape, aff, shape)

    @staticmethod
    def _affine(out_shape: Sequence[int], aff: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """The affine of the resampled volume: each column scaled by n_in / n_out, the origin
        moved by (r - 1) / 2 input voxels (the module docstring's voxel-centre convention)."""
        T = np.eye(4)
        for a in range(3):
            r = shape[a] / out_shape[a]
            c = 2 - a  # array axis a is affine column 2 - a
            T[c, c] = r
            T[c, 3] = (r - 1.0) / 2.0
        return aff @ T


def _pass_order(shape: Sequence[int], out_shape: Sequence[int]) -> tuple[str, ...]:
    """The separable passes, in order: "yx" (in plane) and/or "z". Both: by intermediate size,
    the first pass's output must be held in full."""
    nz, ny, nx = shape
    oz, oy, ox = out_shape
    inplane = (oy, ox) != (ny, nx)
    along_z = oz != nz
    if inplane and along_z:
        return ("yx", "z") if nz * oy * ox <= oz * ny * nx else ("z", "yx")
    return ("yx",) if inplane else ("z",) if along_z else ()


class _Filled:
    """A float32 volume not held: `fill(z0, z1, out)` writes its slices z0..z1 into `out`
    (`Resample.filled`); `clock` is charged "resample" after each slab's pass."""

    __slots__ = ("shape", "fill", "clock")

    def __init__(self, shape, fill, clock):
        self.shape, self.fill, self.clock = shape, fill, clock


def _torch_mode(mode: str, ndim: int) -> tuple[str, dict]:
    if mode == "nearest":
        return "nearest-exact", {}
    return ("linear", "bilinear", "trilinear")[ndim - 1], {"align_corners": False}


def _resample_inplane(src, out_shape: Sequence[int], mode: str) -> np.ndarray:
    """Resample axes 1 and 2, slabs along axis 0 (slices are independent); `src` an array or
    a `_Filled` volume, each slab filled into one buffer."""
    import torch
    import torch.nn.functional as F

    nz, ny, nx = src.shape
    size_yx = tuple(out_shape[1:])
    dst = np.empty((nz, *size_yx), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, ny * nx))
    filled = src if isinstance(src, _Filled) else None
    buf = np.empty((min(step, nz), ny, nx), dtype=np.float32) if filled is not None else None
    tmode, kw = _torch_mode(mode, 2)
    with torch.inference_mode():
        for z0 in range(0, nz, step):
            if filled is not None:
                slab = buf[: min(step, nz - z0)]
                filled.fill(z0, z0 + len(slab), slab)
            else:
                slab = np.ascontiguousarray(src[z0 : z0 + step], dtype=np.float32)
            # Slices ride in the channel axis: one call, no per-slice Python loop.
            t = F.interpolate(torch.from_numpy(slab)[None], size=size_yx, mode=tmode, **kw)
            dst[z0 : z0 + step] = t[0].numpy()
            if filled is not None:
                filled.clock.lap("resample")
    return dst


def _resample_z(src: np.ndarray, out_shape: Sequence[int], mode: str) -> np.ndarray:
    """Resample axis 0, slabs along axis 1.

    The slab is viewed as a 2-D image (z, rows*columns) and resized only in height: along the
    width the scale is exactly 1, so every sample lands on an input column with weight 1 and the
    in-plane values pass through bit-exact.
    """
    import torch
    import torch.nn.functional as F

    nz, ny, nx = src.shape
    size_z = out_shape[0]
    dst = np.empty((size_z, ny, nx), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, nz * nx))
    tmode, kw = _torch_mode(mode, 2)
    with torch.inference_mode():
        for y0 in range(0, ny, step):
            slab = np.ascontiguousarray(src[:, y0 : y0 + step], dtype=np.float32)
            rows = slab.shape[1]
            t = torch.from_numpy(slab.reshape(nz, rows * nx))[None, None]
            t = F.interpolate(t, size=(size_z, rows * nx), mode=tmode, **kw)
            dst[:, y0 : y0 + rows] = t[0, 0].numpy().reshape(size_z, rows, nx)
    return dst


# --------------------------------------------------------------------------------------------
# Intensity storage
# --------------------------------------------------------------------------------------------


def to_int16_hu(volume: Any) -> np.ndarray:
    """Float (or integer) HU -> int16 HU for storage.

    Rounds half away from zero (so +0.5 and -0.5 behave symmetrically, unlike numpy's
    half-to-even) and clips to ``[-1024, 32767]``. NaN becomes -1024.

    Why -1024: air is about -1000 HU, and nothing in a patient is less dense than air. Values
    below it are not anatomy but scanner padding and outside-the-field-of-view fill (commonly
    -2000, -2048 or -3024). Folding them into one air floor keeps the circular reconstruction
    edge from looking like a strong structure to a model, keeps intensity statistics about the
    patient, and matches the lowest value of the common 12-bit encoding (intercept -1024).
    The top is just int16's limit: dense metal can exceed 3071 on extended-scale scanners.

    Works slab by slab so a 600-slice float volume needs no full-size float temporaries.
    """
    if _is_tensor(volume):
        volume = volume.detach().cpu().numpy()
    v = np.asarray(volume)
    if np.issubdtype(v.dtype, np.integer):
        info = np.iinfo(v.dtype)
        # Bounds in the input's own range: NEP 50 rejects -1024 as a uint16 scalar.
        return np.clip(v, max(HU_MIN, info.min), min(HU_MAX, info.max)).astype(np.int16)
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    if v.ndim == 0:
        return _round_clip_hu(v.reshape(1)).reshape(())
    out = np.empty(v.shape, dtype=np.int16)
    flat, dst = v.reshape(-1), out.reshape(-1)
    # Cache-sized pieces: the few temporaries of each stay in L2 (~4x faster than 64 MB slabs).
    for r0 in range(0, flat.size, _ROUND_ELEMENTS):
        dst[r0 : r0 + _ROUND_ELEMENTS] = _round_clip_hu(flat[r0 : r0 + _ROUND_ELEMENTS])
    return out


_ROUND_ELEMENTS = 64 * 1024


def _round_clip_hu(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, NaN → HU_MIN, clip; exact in x's own float type: the
    fractional part x - trunc(x) of a float is representable, so no float64 copy is needed
    (float32 |x| + 0.5 would round 0.49999997 up to 1)."""
    t = np.trunc(x)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN: compares False, inf stays inf
        t += np.copysign(np.abs(x - t) >= 0.5, x)
    np.fmax(t, HU_MIN, out=t)  # fmax, not maximum: NaN becomes HU_MIN
    np.minimum(t, HU_MAX, out=t)
    return t.astype(np.int16)


# --------------------------------------------------------------------------------------------
# Model views
# --------------------------------------------------------------------------------------------


class ResizeLongest:
    """Resize a 2-D image so its longest side is ``size``, keeping the aspect ratio.

    ``ResizeLongest(1024)(image) -> (image float32, (scale_y, scale_x))``. The short side is
    ``max(1, round half up(n * size / longest))``; ``scale_yx`` are the realised factors
    (out / in per axis), which differ slightly between axes because of that rounding; use them,
    not ``size / longest``, to map coordinates.

    Downsampling is antialiased (torch bilinear with ``antialias=True``): radiographs are often
    3000 px and a plain bilinear 3x reduction aliases fine lines such as fractures and the
    detector grid. Upsampling invents no information and costs memory, so it is off unless
    ``allow_upsample=True``; in that case the image is returned unchanged with scale (1, 1).

    Accepts numpy or torch ``[..., H, W]`` (leading axes are treated as channels) and returns
    the same type.
    """

    def __init__(self, size: int = 1024, allow_upsample: bool = False):
        if int(size) < 1:
            raise ValueError("size must be a positive number of pixels")
        self.size = int(size)
        self.allow_upsample = bool(allow_upsample)

    def __repr__(self) -> str:
        return f"ResizeLongest({self.size}, allow_upsample={self.allow_upsample})"

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """The (height, width) `__call__` will produce for an ``h x w`` input."""
        longest = max(h, w)
        if longest == self.size or (longest < self.size and not self.allow_upsample):
            return h, w
        s = self.size / longest
        if h >= w:
            return self.size, max(1, int(math.floor(w * s + 0.5)))
        return max(1, int(math.floor(h * s + 0.5))), self.size

    def __call__(self, image: Any) -> tuple[Any, tuple[float, float]]:
        import torch
        import torch.nn.functional as F

        as_tensor = _is_tensor(image)
        t = image if as_tensor else torch.from_numpy(np.ascontiguousarray(image))
        if t.ndim < 2:
            raise ValueError("ResizeLongest expects an image [..., H, W]")
        t = t.to(torch.float32)
        h, w = int(t.shape[-2]), int(t.shape[-1])
        oh, ow = self.output_hw(h, w)
        if (oh, ow) != (h, w):
            lead = t.shape[:-2]
            with torch.inference_mode():
                x = t.reshape(1, -1, h, w)
                x = F.interpolate(
                    x, size=(oh, ow), mode="bilinear", align_corners=False,
                    antialias=(oh < h or ow < w),
                )
            t = x.reshape(*lead, oh, ow)
        out = t if as_tensor else t.numpy()
        return out, (oh / h, ow / w)


class ScaleIntensityRange:
    """MONAI's ScaleIntensityRange: map ``[a_min, a_max]`` linearly onto ``[b_min, b_max]``.

    Result is float32 in the input's container type (numpy in -> numpy out, torch in -> torch
    out on the same device). With ``clip=True`` the output is clamped to the b range (works for
    reversed ranges too). Unlike MONAI, an empty input range is a ValueError at construction:
    it is always a configuration mistake and should not surface as a warning mid-epoch.
    """

    def __init__(self, a_min: float, a_max: float, b_min: float = 0.0, b_max: float = 1.0,
                 clip: bool = False):
        if a_max == a_min:
            raise ValueError("a_max must differ from a_min")
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.b_min, self.b_max = float(b_min), float(b_max)
        self.clip = bool(clip)

    def __repr__(self) -> str:
        return (f"ScaleIntensityRange({self.a_min}, {self.a_max}, {self.b_min}, {self.b_max}, "
                f"clip={self.clip})")

    def __call__(self, x: Any) -> Any:
        scale = (self.b_max - self.b_min) / (self.a_max - self.a_min)
        lo, hi = min(self.b_min, self.b_max), max(self.b_min, self.b_max)
        if _is_tensor(x):
            import torch

            y = (x.to(torch.float32) - self.a_min) * scale + self.b_min
            return y.clamp(lo, hi) if self.clip else y
        y = (np.asarray(x, dtype=np.float32) - np.float32(self.a_min)) * np.float32(scale)
        y += np.float32(self.b_min)
        if self.clip:
            np.clip(y, lo, hi, out=y)
        return y


class WindowHU:
    """CT windows as channels: each ``(level, width)`` maps ``[L - W/2, L + W/2]`` HU to [0, 1].

    ``WindowHU([(40, 400), (-600, 1500)])(hu)`` returns float32 of shape ``(n_windows, *hu.shape)``
    (a new leading channel axis), clipped to [0, 1]. numpy in -> numpy out, torch in -> torch
    out; both paths compute in float32 with the same formula so they agree to rounding.
    Multi-window input is the usual way to give a model the dynamic range of 12-bit CT without
    letting bone and air dominate a single normalisation.
    """

    def __init__(self, windows: Sequence[tuple[float, float]] = ((40.0, 400.0),)):
        ws = [(float(level), float(width)) for level, width in windows]
        if not ws or any(width <= 0 for _, width in ws):
            raise ValueError("windows must be a non-empty list of (level, width>0) HU pairs")
        self.windows = ws
        self._scalers = [
            ScaleIntensityRange(level - width / 2, level + width / 2, 0.0, 1.0, clip=True)
            for level, width in ws
        ]

    def __repr__(self) -> str:
        return f"WindowHU({self.windows})"

    def __call__(self, hu: Any) -> Any:
        chans = [s(hu) for s in self._scalers]
        if _is_tensor(hu):
            import torch

            return torch.stack(chans, dim=0)
        return np.stack(chans, axis=0)


# --------------------------------------------------------------------------------------------
# Model views: stored sample → model input (loader, evaluation, serving)
# --------------------------------------------------------------------------------------------
#
# The view is the ONLY place where a stored sample becomes a tensor a model sees, so the loader
# (training), evaluation and serving run exactly the same code. Everything stochastic takes an
# explicit ``numpy.random.Generator``; with ``rng=None`` every piece is deterministic (centre crop,
# no flip), which is what evaluation and serving use. No piece keeps state between calls.


def _crop_pad_plan(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator | None):
    """Per axis (crop_start, pad_before, pad_after). Crops are centred (rng None) or uniformly
    placed; pads are always centred (a random pad offset only moves the air around)."""
    plan = []
    for n, s in zip(shape, size):
        if n > s:
            start = (n - s) // 2 if rng is None else int(rng.integers(0, n - s + 1))
            plan.append((start, 0, 0))
        else:
            before = (s - n) // 2
            plan.append((0, before, s - n - before))
    return plan


class CropOrPad:
    """Crop / pad every axis to ``size`` (MONAI's ResizeWithPadOrCrop): a centre crop, or with
    an ``rng`` a uniformly placed one (MONAI's RandSpatialCrop), so one class serves both.

    ``pad_value`` fills the padding *in the units of the input*: for CT that is air, -1024 HU,
    applied before windowing so padding looks like air to the model in every window.
    numpy in → numpy out (same dtype).
    """

    def __init__(self, size: Sequence[int], pad_value: float = 0.0):
        self.size = tuple(int(s) for s in size)
        if not self.size or any(s < 1 for s in self.size):
            raise ValueError("size must be positive integers")
        self.pad_value = pad_value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size}, pad_value={self.pad_value})"

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != len(self.size):
            raise ValueError(f"expected {len(self.size)} axes, got shape {x.shape}")
        plan = _crop_pad_plan(x.shape, self.size, rng)
        x = x[tuple(slice(c, c + min(n, s)) for (c, _, _), n, s in zip(plan, x.shape, self.size))]
        pads = [(b, a) for _, b, a in plan]
        if any(b or a for b, a in pads):
            x = np.pad(x, pads, mode="constant", constant_values=self.pad_value)
        return np.ascontiguousarray(x)


class RandFlip:
    """Flip ``axis`` with probability ``prob`` (MONAI's RandFlip); never flips when rng is None."""

    def __init__(self, prob: float = 0.5, axis: int = -1):
        if not 0.0 <= prob <= 1.0:
            raise ValueError("prob must be in [0, 1]")
        self.prob, self.axis = float(prob), int(axis)

    def __repr__(self) -> str:
        return f"RandFlip(prob={self.prob}, axis={self.axis})"

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        if rng is not None and self.prob > 0 and rng.random() < self.prob:
            return np.ascontiguousarray(np.flip(x, axis=self.axis))
        return x


class NormalizeIntensity:
    """``(x - mean) / std`` in float32 (MONAI's NormalizeIntensity with fixed statistics)."""

    def __init__(self, mean: float, std: float):
        if not std > 0:
            raise ValueError("std must be > 0")
        self.mean, self.std = float(mean), float(std)

    def __repr__(self) -> str:
        return f"NormalizeIntensity({self.mean}, {self.std})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float32) - np.float32(self.mean)
        y /= np.float32(self.std)
        return y


class ResizeShortest:
    """Resize a 2-D image so its SHORT side is ``size`` (aspect preserved; the long side is
    rounded half up). Downsampling is antialiased (see `ResizeLongest` for why); upsampling is
    plain bilinear. numpy [H, W] in → float32 numpy out."""

    def __init__(self, size: int):
        if int(size) < 1:
            raise ValueError("size must be a positive number of pixels")
        self.size = int(size)

    def __repr__(self) -> str:
        return f"ResizeShortest({self.size})"

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        s = self.size / min(h, w)
        if h <= w:
            return self.size, max(self.size, int(math.floor(w * s + 0.5)))
        return max(self.size, int(math.floor(h * s + 0.5))), self.size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        img = np.asarray(image, dtype=np.float32)
        h, w = img.shape[-2:]
        oh, ow = self.output_hw(h, w)
        if (oh, ow) == (h, w):
            return img
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(img)).reshape(1, 1, h, w)
            t = F.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False, antialias=oh < h)
        return t.reshape(oh, ow).numpy()


class View:
    """A stored sample → the model's input; one subclass per image kind (`radforge.kinds`).

    ``view(array, meta=None, rng=None) -> float32 ndarray`` of shape `input_shape`. Deterministic
    when ``rng`` is None (evaluation, serving); with an rng, the crop position (``rand_crop``) and
    the left-right flip (``rand_flip``) are drawn from it. Holds no state between calls, so one
    instance can be shared by DataLoader workers and serving replicas.
    """

    ndim: int  # spatial dimensions of the stored array it accepts

    def __init__(self, cfg):
        self.cfg = cfg
        self._flip = RandFlip(0.5 if cfg.rand_flip else 0.0, axis=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_shape={self.input_shape})"

    @property
    def input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def __call__(self, array: np.ndarray, meta: dict | None = None,
                 rng: np.random.Generator | None = None) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim != self.ndim:
            raise ValueError(f"{type(self).__name__} expects {self.ndim} axes, got shape {array.shape}")
        return self._apply(array, meta or {}, rng if self.cfg.rand_crop else None, rng)

    def _apply(self, array: np.ndarray, meta: dict, crop_rng, rng) -> np.ndarray:
        raise NotImplementedError


class CTView(View):
    """int16 HU ``[z, y, x]`` (LPS, profile spacing) → float32 ``[C, *cfg.ct_size]``.

    Crop/pad to ``ct_size`` (pad with air, -1024 HU, before windowing; centre crop unless an rng
    is given and ``rand_crop`` is on) → optional left-right flip (axis 2 = patient left; training
    only, ``rand_flip``) → `WindowHU` with ``ct_windows``, one [0, 1] channel per window.

    Spacing: the crop is taken in voxels. Shards are stored at the ingest profile's spacing, so by
    default a fixed voxel size is a fixed physical field of view. With ``ct_spacing_mm`` set, the
    volume is first resampled (`Resample`, trilinear) from the sample's stored
    ``meta["spacing_mm"]`` to that spacing (a sample without it is an error), so one model view
    can consume shard sets made with different profiles.
    """

    ndim = 3

    def __init__(self, cfg):
        super().__init__(cfg)
        self._crop = CropOrPad(cfg.ct_size, pad_value=HU_MIN)
        self._window = WindowHU(cfg.ct_windows)
        self._resample = Resample(cfg.ct_spacing_mm) if cfg.ct_spacing_mm is not None else None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (len(self.cfg.ct_windows), *self.cfg.ct_size)

    def _apply(self, array, meta, crop_rng, rng):
        if self._resample is not None:
            spacing = meta.get("spacing_mm")
            if not spacing or len(spacing) != 3:
                raise ValueError("view.ct_spacing_mm needs the sample's stored spacing_mm")
            affine = np.diag([float(spacing[2]), float(spacing[1]), float(spacing[0]), 1.0])
            array, _ = self._resample(array, affine)
        x = self._crop(array, crop_rng)
        x = self._flip(x, rng)
        return self._window(x)


class XrayView(View):
    """uint16 ``[y, x]`` presentation values → [0, 1] → `ResizeShortest` to ``xray_size`` →
    centre/random square crop → optional flip → ``(x - mean) / std`` → ``[1, s, s]``."""

    ndim = 2

    def __init__(self, cfg):
        super().__init__(cfg)
        self._resize = ResizeShortest(cfg.xray_size)
        self._crop = CropOrPad((cfg.xray_size, cfg.xray_size), pad_value=0.0)
        self._norm = NormalizeIntensity(cfg.xray_mean, cfg.xray_std)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.cfg.xray_size, self.cfg.xray_size)

    def _apply(self, array, meta, crop_rng, rng):
        x = array.astype(np.float32) / np.float32(65535.0)
        x = self._resize(x)
        x = self._crop(x, crop_rng)
        x = self._flip(x, rng)
        return self._norm(x)[None]


# --------------------------------------------------------------------------------------------
# The preprocessing profile


@dataclass(frozen=True)
class Profile:
    """How stored arrays were made: derived once from the ingest recipe (`from_recipe`), written
    into the manifest and into every exported model (`to_dict`), read back with `from_dict`.

    dicom (building canonical arrays), shardspec (the manifest), checkpoint (model.json) and serve
    (requests) all take this object. The operations' fixed parameters (orientation, HU clip range,
    interpolation) are this module's and are read from it, never restated elsewhere. `profile_id`
    is a digest of everything a consumer could notice, so shards made with other spacing/VOI
    settings are never silently mixed into one run.
    """

    name: str = "default"
    ct_spacing_mm: tuple[float, float, float] = (3.0, 1.5, 1.5)
    xray_longest_side: int = 1024
    xray_voi: str = "window"

    @classmethod
    def from_recipe(cls, recipe) -> "Profile":
        """`recipe`: a `config.IngestRecipe`."""
        return cls(name=recipe.name, ct_spacing_mm=tuple(float(v) for v in recipe.ct.spacing_mm),
                   xray_longest_side=int(recipe.xray.longest_side), xray_voi=recipe.xray.voi)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        """The manifest / model.json form back to a Profile (the fixed parameters are checked)."""
        try:
            p = cls(name=str(d["name"]), ct_spacing_mm=tuple(float(v) for v in d["ct"]["spacing_mm"]),
                    xray_longest_side=int(d["xray"]["longest_side"]), xray_voi=str(d["xray"]["voi"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a preprocessing profile: {e!r}") from None
        if d.get("profile_id") not in (None, p.profile_id):
            raise ValueError(f"profile {d.get('profile_id')!r} was made with other fixed parameters than this "
                             f"radforge's ({p.profile_id}); re-ingest or use the radforge that made it")
        return p

    def _body(self) -> dict:
        return {
            "ct": {
                "orientation": CANONICAL_ORIENTATION,
                "spacing_mm": list(self.ct_spacing_mm),
                "axis_order": "zyx",
                "dtype": "int16",
                "units": "HU",
                "clip": [HU_MIN, HU_MAX],
                "interpolation": CT_INTERPOLATION,
            },
            "xray": {
                "longest_side": self.xray_longest_side,
                "voi": self.xray_voi,
                "dtype": "uint16",
                "format": "png",
                "photometric": "MONOCHROME2",
            },
        }

    @property
    def profile_id(self) -> str:
        return hashlib.sha256(json.dumps(self._body(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        """The JSON form (shards/SPEC.md, "profile"): name, profile_id and the per-kind bodies."""
        return {"name": self.name, "profile_id": self.profile_id, **self._body()}

    def canonical_ct(self, hu: np.ndarray, affine: Any, clock: StageClock | _NoClock = NO_CLOCK,
                     ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """Float HU volume + affine → (stored int16 HU volume, its affine, the source spacing in
        the stored axis order): floored at air, oriented to LPS, resampled to the profile spacing.
        `clock` is charged per stage (orient, resample, int16)."""
        # Padding outside the field of view (-2048, -3024) must not blend into tissue when resampled.
        np.maximum(hu, HU_MIN, out=hu)
        hu, affine = Orient(CANONICAL_ORIENTATION)(hu, affine)
        source_spacing = spacing_zyx(affine)
        clock.lap("orient")
        hu, affine = Resample(self.ct_spacing_mm, mode=CT_INTERPOLATION)(hu, affine)
        clock.lap("resample")
        out = to_int16_hu(hu)
        clock.lap("int16")
        return out, affine, source_spacing

    def canonical_ct_filled(self, shape: Sequence[int], affine: Any, fill, clock: StageClock | _NoClock = NO_CLOCK,
                            ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """`canonical_ct` of the float32 HU volume of `shape` that `fill(k0, k1, out)` writes
        slices k0..k1 of into `out` (returning a lower bound of what it wrote, or -inf): the
        same bytes. Where `Orient` keeps the volume as it is (axial slices already in LPS) and
        `Resample.filled` applies, the float32 source volume is never held: each slab is
        filled into one buffer, floored (unless its bound is at the floor already) and
        resampled in plane."""
        aff = _check_affine(affine)
        resample = Resample(self.ct_spacing_mm, mode=CT_INTERPOLATION)
        out = None
        if Orient(CANONICAL_ORIENTATION).keeps(aff):

            def floored(k0: int, k1: int, slab: np.ndarray) -> None:
                if not fill(k0, k1, slab) >= HU_MIN:  # nothing below the floor: nothing to do
                    np.maximum(slab, HU_MIN, out=slab)  # as canonical_ct, before any resampling
                clock.lap("orient")

            out = resample.filled(shape, aff, floored, clock)
        if out is None:
            hu = np.empty(tuple(shape), dtype=np.float32)
            fill(0, hu.shape[0], hu)
            return self.canonical_ct(hu, aff, clock)
        hu, affine = out
        out = to_int16_hu(hu)
        clock.lap("int16")
        return out, affine, spacing_zyx(aff)

    def canonical_xray(self, image: np.ndarray, clock: StageClock | _NoClock = NO_CLOCK) -> np.ndarray:
        """[0, 1] presentation image → stored uint16 image, longest side at the profile's."""
        img, _ = ResizeLongest(self.xray_longest_side)(image)
        clock.lap("resize")
        out = np.clip(np.rint(img * 65535.0), 0, 65535).astype(np.uint16)
        clock.lap("uint16")
        return out


__all__ += ["CropOrPad", "RandFlip", "NormalizeIntensity", "ResizeShortest", "View", "CTView", "XrayView", "Profile"]


# --------------------------------------------------------------------------------------------
# Multi-crop views (DINO / iBOT self-distillation)


@dataclass(frozen=True)
class CropPlan:
    """One sample's multi-crop draw: per crop (globals first, then locals) the box centre and
    half-extent in grid_sample's normalised coordinates ([-1, 1], array axis order), a left-right
    flip, an intensity (contrast, brightness) pair; per global crop the patches hidden from the
    student (iBOT), as a flat bool mask in token order."""

    centres: np.ndarray  # [crops, ndim]
    halves: np.ndarray  # [crops, ndim], in (0, 1]
    flips: np.ndarray  # [crops] bool
    intensity: np.ndarray  # [crops, 2]: x * contrast + brightness
    masks: np.ndarray  # [global crops, patches] bool, True = hidden from the student


class MultiCrop:
    """The deterministic twin of `RandMultiCrop`: a batch of model views and one `CropPlan` per
    sample → ``{"global_crops" [G·B, C, *spatial], "local_crops" [L·B, C, *local_size],
    "crop_masks" [G·B, patches]}``, crop-major (crop 0 of every sample, then crop 1, …) as DINO
    orders them. Resampling is one batched ``grid_sample`` per group (bilinear, 2D and 3D alike)
    on the images' device, so crops of a GPU batch are cut on the GPU."""

    def __init__(self, spatial: Sequence[int], local_size: Sequence[int], n_global: int):
        self.spatial, self.local_size, self.n_global = tuple(spatial), tuple(local_size), int(n_global)

    def __repr__(self) -> str:
        return f"MultiCrop(global={self.spatial}, local={self.local_size}, n_global={self.n_global})"

    def __call__(self, images, plans: Sequence[CropPlan]) -> dict:
        import torch

        nd = len(self.spatial)
        b = images.shape[0]
        if images.ndim != nd + 2 or len(plans) != b:
            raise ValueError(f"MultiCrop: images [B, C, *{self.spatial}] and one plan per sample; got {tuple(images.shape)}, {len(plans)} plans")
        n_crops = plans[0].centres.shape[0]
        # crop-major [crops, B, ...] parameters
        centres = np.stack([p.centres for p in plans], axis=1)
        halves = np.stack([p.halves for p in plans], axis=1)
        flips = np.stack([p.flips for p in plans], axis=1)
        inten = np.stack([p.intensity for p in plans], axis=1)
        out = {}
        for name, sl, size in (("global_crops", slice(0, self.n_global), self.spatial),
                               ("local_crops", slice(self.n_global, n_crops), self.local_size)):
            c, h, f, k = centres[sl], halves[sl], flips[sl], inten[sl]
            n = c.shape[0] * b
            if n == 0:
                out[name] = images.new_zeros((0, images.shape[1], *size))
                continue
            theta = np.zeros((n, nd, nd + 1), dtype=np.float32)
            # affine_grid's coordinates run (x, y[, z]) = array axes reversed
            for j in range(nd):
                axis = nd - 1 - j
                theta[:, j, j] = h.reshape(n, nd)[:, axis] * np.where(f.reshape(n) & (axis == nd - 1), -1.0, 1.0)
                theta[:, j, nd] = c.reshape(n, nd)[:, axis]
            theta_t = torch.from_numpy(theta).to(images.device, images.dtype)
            src = images.repeat(c.shape[0], *([1] * (images.ndim - 1)))
            grid = torch.nn.functional.affine_grid(theta_t, [n, images.shape[1], *size], align_corners=False)
            crops = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
            kk = torch.from_numpy(k.reshape(n, 2).astype(np.float32)).to(images.device, images.dtype)
            shape = (n,) + (1,) * (crops.ndim - 1)
            out[name] = crops * kk[:, 0].view(shape) + kk[:, 1].view(shape)
        masks = np.stack([p.masks for p in plans], axis=1)  # [G, B, N]
        out["crop_masks"] = torch.from_numpy(masks.reshape(-1, masks.shape[-1])).to(images.device)
        return out


class RandMultiCrop:
    """DINOv2-style multi-crop of a batch of model views (2D X-ray or 3D CT), drawn from an
    explicit seed per sample: ``(seed, key)`` → one `CropPlan` (`draw`), applied by `MultiCrop`.
    The seed is what the trainer passes (the run's seed mixed with the step), the key the sample's
    own, so a sample's crops do not depend on the rank or micro-batch it lands in: the same step
    gives the same crops on 1 worker or on 8 (and after a resume).

    ``cfg`` is a `config.DinoConfig` (duck-typed: this module imports nothing of ours):
    ``global_crops`` boxes covering ``global_scale`` of the area (volume in 3D) resampled to the
    view's own size; ``local_crops`` covering ``local_scale`` resampled to ``local_size`` × the
    view's size (rounded to whole patches); aspect ratios log-uniform in [3/4, 4/3] per axis pair;
    a left-right flip with ``flip_prob``; contrast × U(1 ± jitter) and brightness + U(± jitter)
    (view units); on each global crop, with ``mask_prob``, a fraction U(``mask_ratio``) of its
    patches hidden from the student (iBOT; random patches, not iBOT's blocks)."""

    def __init__(self, cfg, input_shape: Sequence[int], patch: Sequence[int]):
        self.cfg = cfg
        self.spatial = tuple(int(s) for s in input_shape[1:])
        self.patch = tuple(int(p) for p in patch)
        if len(self.spatial) != len(self.patch) or any(s % p for s, p in zip(self.spatial, self.patch)):
            raise ValueError(f"RandMultiCrop: patch {self.patch} must divide the view {self.spatial}")
        self.local_size = tuple(max(p, int(round(s * cfg.local_size / p)) * p) for s, p in zip(self.spatial, self.patch))
        self.grid = tuple(s // p for s, p in zip(self.spatial, self.patch))
        self.crop = MultiCrop(self.spatial, self.local_size, cfg.global_crops)

    def __repr__(self) -> str:
        c = self.cfg
        return f"RandMultiCrop({c.global_crops}×{self.spatial} + {c.local_crops}×{self.local_size})"

    def draw(self, seed: int, key: str) -> CropPlan:
        c = self.cfg
        digest = int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")
        rng = np.random.default_rng([int(seed) & (2**63 - 1), digest])
        nd = len(self.spatial)
        scales = [c.global_scale] * c.global_crops + [c.local_scale] * c.local_crops
        halves, centres = [], []
        for lo, hi in scales:
            frac = rng.uniform(lo, hi)
            log_ratio = rng.uniform(-math.log(4 / 3), math.log(4 / 3), size=nd) / 2
            side = np.clip(frac ** (1 / nd) * np.exp(log_ratio - log_ratio.mean()), 1e-3, 1.0)
            halves.append(side)
            centres.append(rng.uniform(-(1 - side), 1 - side))
        n = len(scales)
        flips = rng.random(n) < c.flip_prob
        j = c.jitter
        intensity = np.stack([rng.uniform(1 - j, 1 + j, n), rng.uniform(-j, j, n)], axis=1)
        patches = math.prod(self.grid)
        masks = np.zeros((c.global_crops, patches), dtype=bool)
        for g in range(c.global_crops):
            if rng.random() < c.mask_prob:
                k = max(1, int(round(rng.uniform(*c.mask_ratio) * patches)))
                masks[g, rng.permutation(patches)[:k]] = True
        return CropPlan(np.array(centres), np.array(halves), flips, intensity, masks)

    def __call__(self, images, keys: Sequence[str], seed: int) -> dict:
        """images [B, C, *spatial] (a batch of this kind's model view) → the crops (see `MultiCrop`)."""
        return self.crop(images, [self.draw(seed, k) for k in keys])

    def apply(self, batch: dict, seed: int) -> dict:
        """A loader batch with its multi-crop views added (what the trainer feeds DINO)."""
        return {**batch, **self(batch["image"], batch["key"], seed)}


__all__ += ["CropPlan", "MultiCrop", "RandMultiCrop"]
