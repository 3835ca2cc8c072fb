"""Seeded image corruptions at five severities, applied in the model view at load time
(the robustness protocol of radforge.evaluate, after MedMNIST-C).

A corruption works on the STORED array, in stored units, before the model view: X-rays are
uint16 presentation values (treated as [0, 1] intensities), CT volumes int16 Hounsfield units.
So a CT noise level is a figure in HU and an HU offset is an offset in HU, whatever windows the
model view applies afterwards; the result keeps the stored dtype and range.

    corruption     X-ray                                   CT
    gaussian_noise σ = 0.02 … 0.10 of full scale            —
    poisson_noise  photon count 1000 … 60 per unit          —
    dose_noise     —                                        σ = 10 … 75 HU (a lower-dose scan)
    blur           Gaussian σ = 0.4 … 2.4 % of the short    Gaussian σ = 0.5 … 2 voxels
                   side
    gamma          x ** 1.2 … 2.5                           —
    contrast       (x − mean) × 0.8 … 0.2 + mean            (HU − 40) × 0.9 … 0.5 + 40
    bias_field     × (1 + a·smooth field), a = 0.1 … 0.5    + a·smooth field, a = 20 … 100 HU
    downsample     down by 1.5 … 6, bilinear back up        in-plane, same factors
    jpeg           JPEG quality 75 … 8 (8-bit)             —
    hu_offset      —                                        + 10 … 100 HU

Determinism: the random draw for a sample comes from (seed, corruption, severity, CRC-32 of
the stored array), never from its position in a stream, so a sample is corrupted identically
in every run, by every loader layout. `CorruptedView` wraps a `transforms.View` and is what the
loader is handed instead of the plain view: nothing in the loader changes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    """One corruption: the image kinds it applies to, its five levels, the operation."""

    name: str
    kinds: tuple[str, ...]  # radforge.kinds names ("xray", "ct")
    levels: dict  # kind name -> five parameters, severity 1..5
    fn: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]  # float array, level, rng

    def level(self, kind: str, severity: int) -> float:
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
        return self.levels[kind][severity - 1]


def _smooth_field(shape, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field in [-1, 1]: low-order polynomial in normalised coordinates."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    field = np.zeros(shape)
    for a in axes:
        c = rng.normal(size=3)
        field += c[0] * a + c[1] * a ** 2 + c[2] * a ** 3
    field += rng.normal() * axes[0] * axes[-1]
    return field / max(1e-6, float(np.abs(field).max()))


def _gaussian(x, sigma, rng):
    return x + rng.normal(0.0, sigma, x.shape)


def _poisson(x, photons, rng):
    return rng.poisson(np.clip(x, 0, None) * photons) / photons


def _blur(x, sigma, rng):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma * min(x.shape) if x.ndim == 2 else sigma)


def _gamma(x, g, rng):
    return np.clip(x, 0, 1) ** g


def _contrast(x, c, rng):
    centre = x.mean() if x.ndim == 2 else 40.0  # CT: around soft tissue (HU), not the air-heavy mean
    return (x - centre) * c + centre


def _bias(x, a, rng):
    f = _smooth_field(x.shape, rng)
    return x * (1 + a * f) if x.ndim == 2 else x + a * f


def _downsample(x, factor, rng):
    from scipy.ndimage import zoom

    plane = x.shape[-2:]
    small = [max(2, int(round(n / factor))) for n in plane]
    if x.ndim == 2:
        lo = zoom(x, [s / n for s, n in zip(small, plane)], order=1)
        return zoom(lo, [n / s for s, n in zip(small, plane)], order=1)[:plane[0], :plane[1]]
    lo = zoom(x, [1, *(s / n for s, n in zip(small, plane))], order=1)
    up = zoom(lo, [1, *(n / s for s, n in zip(small, plane))], order=1)
    return up[:, :plane[0], :plane[1]]


def _jpeg(x, quality, rng):
    import io

    from PIL import Image

    u8 = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64) / 255.0


def _offset(x, hu, rng):
    return x + hu


_X, _C = "xray", "ct"
CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption("gaussian_noise", (_X,), {_X: (0.02, 0.04, 0.06, 0.08, 0.10)}, _gaussian),
    Corruption("poisson_noise", (_X,), {_X: (1000, 500, 250, 120, 60)}, _poisson),
    Corruption("dose_noise", (_C,), {_C: (10, 20, 35, 50, 75)}, _gaussian),
    Corruption("blur", (_X, _C), {_X: (0.004, 0.008, 0.012, 0.016, 0.024), _C: (0.5, 0.75, 1.0, 1.5, 2.0)}, _blur),
    Corruption("gamma", (_X,), {_X: (1.2, 1.4, 1.7, 2.0, 2.5)}, _gamma),
    Corruption("contrast", (_X, _C), {_X: (0.8, 0.65, 0.5, 0.35, 0.2), _C: (0.9, 0.8, 0.7, 0.6, 0.5)}, _contrast),
    Corruption("bias_field", (_X, _C), {_X: (0.1, 0.2, 0.3, 0.4, 0.5), _C: (20, 40, 60, 80, 100)}, _bias),
    Corruption("downsample", (_X, _C), {_X: (1.5, 2, 3, 4, 6), _C: (1.5, 2, 3, 4, 6)}, _downsample),
    Corruption("jpeg", (_X,), {_X: (75, 50, 30, 15, 8)}, _jpeg),
    Corruption("hu_offset", (_C,), {_C: (10, 25, 50, 75, 100)}, _offset),
)}

# stored dtype -> (to float working units, back to stored)
_XRAY_SCALE = 65535.0
_CT_RANGE = (-1024, 3071)


def for_kind(kind: str) -> list[str]:
    """The corruption names that apply to image kind `kind` (registry order)."""
    return [n for n, c in CORRUPTIONS.items() if kind in c.kinds]


def get(name: str) -> Corruption:
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise ValueError(f"unknown corruption {name!r} (known: {', '.join(CORRUPTIONS)})") from None


def sample_rng(array: np.ndarray, name: str, severity: int, seed: int) -> np.random.Generator:
    """The draw for one stored array: from its content, never its position in a stream."""
    crc = zlib.crc32(np.ascontiguousarray(array).tobytes())
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(severity), crc])


def apply(array: np.ndarray, kind: str, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt one stored array of image kind `kind` ("xray": uint16, "ct": int16 HU);
    returns the stored dtype."""
    c = get(name)
    if kind not in c.kinds:
        raise ValueError(f"corruption {name!r} does not apply to {kind} images (it applies to: {', '.join(c.kinds)})")
    level = c.level(kind, severity)
    rng = sample_rng(array, name, severity, seed)
    if kind == _X:
        out = c.fn(np.asarray(array, dtype=np.float64) / _XRAY_SCALE, level, rng)
        return (np.clip(out, 0, 1) * _XRAY_SCALE + 0.5).astype(np.uint16)
    out = c.fn(np.asarray(array, dtype=np.float64), level, rng)
    return np.clip(np.rint(out), *_CT_RANGE).astype(np.int16)


class CorruptedView:
    """A model view that corrupts the stored array first: hand it to the loader in place of
    `view`. Picklable (DataLoader workers), stateless between calls, like `transforms.View`."""

    def __init__(self, view, kind: str, name: str, severity: int, seed: int = 0):
        get(name).level(kind, severity)  # fail at construction, not in a worker
        self.view, self.kind, self.name, self.severity, self.seed = view, kind, name, int(severity), int(seed)

    @property
    def input_shape(self):
        return self.view.input_shape

    def __repr__(self) -> str:
        return f"CorruptedView({self.view!r}, {self.name}@{self.severity})"

    def __call__(self, array, meta=None, rng=None):
        return self.view(apply(np.asarray(array), self.kind, self.name, self.severity, self.seed), meta, rng)
