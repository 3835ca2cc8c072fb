"""radforge.viz: contact sheets people can trust (right size, right side, nothing blank)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from radforge import viz

TILE = 128


def _ct(marker_left_anterior=True):
    """Synthetic canonical-LPS CT: soft-tissue ellipse body and a bone-bright marker.

    Axis 2 grows toward patient Left, axis 1 toward Posterior, so high x / low y is the
    patient's left-anterior corner.
    """
    nz, ny, nx = 24, 64, 80
    vol = np.full((nz, ny, nx), -1000, np.int16)
    yy, xx = np.indices((ny, nx))
    body = ((yy - ny / 2) / (ny * 0.45)) ** 2 + ((xx - nx / 2) / (nx * 0.45)) ** 2 <= 1
    vol[:, body] = 40
    if marker_left_anterior:
        vol[:, 14:24, 54:66] = 1500
    return vol


def _meta_ct():
    return {"modality": "CT", "spacing_mm": [3.0, 0.8, 0.8], "__key__": "abcdef0123456789",
            "split": "train", "labels": {"nodule": 1, "effusion": 0, "atelectasis": None}}


def _xray(h=200, w=160):
    yy, xx = np.indices((h, w))
    return ((yy * 300 + xx * 100) % 65536).astype(np.uint16)


def _tile(img: Image.Image, row: int, col: int, title_h: int = 0) -> np.ndarray:
    top = title_h + row * (TILE + viz._caption_height())
    return np.asarray(img)[top : top + TILE, col * TILE : (col + 1) * TILE]


def test_montage_size_and_every_tile_has_content():
    items = [(_meta_ct(), _ct()), ({"modality": "CR", "spacing_mm": [0.2, 0.2]}, _xray()),
             ({"modality": "DX", "spacing_mm": [0.15, 0.15], "split": "val"}, _xray(90, 300))]
    img = viz.montage(items, tile=TILE, columns=4, title="ingest demo")
    assert img.mode == "RGB"
    title_h = viz._title_height()
    # CT fills row 0 cells 0-2, the CR takes cell 3, the DX wraps to row 1.
    assert img.size == (4 * TILE, title_h + 2 * (TILE + viz._caption_height()))
    for row, col in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]:
        cell = _tile(img, row, col, title_h)
        assert np.any(cell != np.array(viz.BACKGROUND, np.uint8)), (row, col)
    assert np.all(_tile(img, 1, 3, title_h) == np.array(viz.BACKGROUND, np.uint8))


def test_default_columns_keep_ct_on_one_row():
    img = viz.montage([({"modality": "CR"}, _xray())] * 2 + [(_meta_ct(), _ct())], tile=TILE)
    assert img.size == (5 * TILE, TILE + viz._caption_height())
    with pytest.raises(ValueError):
        viz.montage([(_meta_ct(), _ct())], tile=TILE, columns=2)
    with pytest.raises(ValueError):
        viz.montage([], tile=TILE)


def _white_centroid(cell: np.ndarray) -> tuple[float, float]:
    white = np.all(cell >= 250, axis=-1)
    assert white.sum() > 10
    ys, xs = np.nonzero(white)
    return ys.mean() / cell.shape[0], xs.mean() / cell.shape[1]


def test_axial_panel_is_radiological():
    img = viz.montage([(_meta_ct(), _ct())], tile=TILE, columns=3)
    fy, fx = _white_centroid(_tile(img, 0, 0))
    assert fx > 0.5, "patient left must be on the image right"
    assert fy < 0.5, "anterior must be at the top"


def test_coronal_and_sagittal_superior_at_top_and_aspect():
    vol = np.full((20, 40, 40), -1000, np.int16)
    vol[:, 5:35, 5:35] = 40
    vol[15:19, 5:35, 5:35] = 1500  # slab near the head end (high k = superior)
    img = viz.montage([({"modality": "CT", "spacing_mm": [4.0, 1.0, 1.0]}, vol)], tile=TILE,
                      columns=3)
    for col in (1, 2):
        cell = _tile(img, 0, col)
        fy, _ = _white_centroid(cell)
        assert fy < 0.5, "superior must be at the top"
        # 20 slices x 4 mm = 80 mm tall vs 40 mm wide: the panel is taller than wide.
        # Panel pixels are grey (r == g == b); background and annotations are tinted.
        grey = (cell[..., 0] == cell[..., 1]) & (cell[..., 1] == cell[..., 2])
        ys, xs = np.nonzero(grey)
        assert (ys.max() - ys.min()) > 1.7 * (xs.max() - xs.min())


def test_save_png_roundtrip(tmp_path):
    img = viz.montage([({"modality": "DX"}, _xray())], tile=64)
    buf = io.BytesIO()
    viz.save_png(img, buf)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "m.png"
    viz.save_png(img, path)
    assert Image.open(path).size == img.size
