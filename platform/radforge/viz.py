"""Pictures for people: a contact sheet of shard samples, to eyeball an ingest at a glance.

Pillow and numpy only (no torch, no ray), so it runs anywhere a shard can be read, including a
laptop pointed at object storage. The one piece of shared preprocessing it uses, the HU window,
comes from `radforge.transforms.WindowHU` (numpy path, which never imports torch), so what people
see is windowed exactly like what models see.

Display convention (radiological, as on a PACS workstation)
-----------------------------------------------------------
CT volumes are int16 HU ``[z, y, x]`` in canonical LPS storage orientation (see
`radforge.transforms`: axis 0 toward Superior, axis 1 toward Posterior, axis 2 toward patient
Left). Three panels are drawn per CT, each through the middle of the volume, soft-tissue window
L40/W400, stretched so one millimetre is the same number of pixels in both directions:

* axial ``volume[nz // 2]`` as stored: viewed from the feet, so patient Left is on the image
  right, Anterior at the top.
* coronal ``volume[::-1, ny // 2, :]``: viewed from the front, Superior at the top, patient
  Left on the image right.
* sagittal ``volume[::-1, :, nx // 2]``: viewed from the patient's left, Superior at the top,
  Anterior on the image left.

Orientation letters (R/L, A/P, S/I) are printed at the edges of every CT panel, so a sheet can be
read without remembering any of this. X-rays (``[y, x]`` uint16 presentation values, bright =
dense) get one panel, min-max scaled to 8 bits, with no letters: laterality is not in the pixels.
"""

from __future__ import annotations

import math
import os
from typing import Any, BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["montage", "shard_montage", "save_png", "CT_WINDOW"]

CT_WINDOW = (40.0, 400.0)  # soft tissue (level, width) in HU

BACKGROUND = (28, 28, 32)  # not pure black, so air inside a panel is distinguishable from gutter
TEXT = (225, 225, 225)
FINDINGS = (255, 170, 60)
LETTERS = (255, 215, 0)
VIEW_NAME = (130, 170, 215)
OUTLINE = (10, 10, 14)  # halo that keeps labels legible over bright anatomy
MARGIN = 3  # pixels between a panel and its tile edge
PAD = 3  # pixels around caption and title text
CAPTION_LINES = 3
FONT_SIZE = 12

_XRAY = {"CR", "DX", "DR", "MG", "RF", "XA", "RG", "PX", "IO"}


class _Panel:
    __slots__ = ("name", "pixels", "spacing", "letters")

    def __init__(self, name: str, pixels: np.ndarray, spacing: tuple[float, float],
                 letters: tuple[str, str, str, str] | None):
        self.name = name
        self.pixels = pixels  # uint8 [rows, cols]
        self.spacing = spacing  # (row mm, col mm)
        self.letters = letters  # (top, bottom, left, right)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _line_height(font: Any) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return int(ascent + descent) + 1
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom) + 2


def _caption_height(font: Any | None = None) -> int:
    """Height in pixels of the caption strip under each row of tiles."""
    return CAPTION_LINES * _line_height(font or _font()) + 2 * PAD


def _title_height(font: Any | None = None) -> int:
    return _line_height(font or _font()) + 2 * PAD


def _spacing(meta: dict, n: int) -> tuple[float, ...]:
    sp = meta.get("spacing_mm")
    if sp is None or len(sp) != n:
        return (1.0,) * n
    vals = tuple(float(s) for s in sp)
    # Nonsense spacing should not make a panel vanish; a square pixel is the honest fallback.
    return tuple(s if math.isfinite(s) and s > 0 else 1.0 for s in vals)


def _window_u8(hu2d: np.ndarray) -> np.ndarray:
    from radforge.transforms import WindowHU

    level, width = CT_WINDOW
    unit = WindowHU([(level, width)])(hu2d)[0]
    return np.rint(unit * 255.0).astype(np.uint8)


def _minmax_u8(img: np.ndarray) -> np.ndarray:
    x = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, np.uint8)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    y = (np.where(finite, x, lo) - lo) * (255.0 / (hi - lo))
    return np.rint(y).astype(np.uint8)


def _panels(meta: dict, array: np.ndarray) -> list[_Panel]:
    arr = np.asarray(array)
    modality = str(meta.get("modality", "")).upper()
    is_ct = modality == "CT" or (modality not in _XRAY and arr.ndim == 3)
    if is_ct:
        if arr.ndim != 3 or 0 in arr.shape:
            raise ValueError(f"CT sample must be a non-empty [z, y, x] volume, got {arr.shape}")
        sz, sy, sx = _spacing(meta, 3)
        nz, ny, nx = arr.shape
        return [
            _Panel("axial", _window_u8(arr[nz // 2]), (sy, sx), ("A", "P", "R", "L")),
            _Panel("coronal", _window_u8(arr[::-1, ny // 2, :]), (sz, sx), ("S", "I", "R", "L")),
            _Panel("sagittal", _window_u8(arr[::-1, :, nx // 2]), (sz, sy), ("S", "I", "A", "P")),
        ]
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"X-ray sample must be a non-empty [y, x] image, got shape {arr.shape}")
    sy, sx = _spacing(meta, 2)
    return [_Panel("", _minmax_u8(arr), (sy, sx), None)]


def _fit(panel: _Panel, box: int) -> Image.Image:
    rows, cols = panel.pixels.shape
    h_mm, w_mm = rows * panel.spacing[0], cols * panel.spacing[1]
    scale = box / max(h_mm, w_mm)
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
    # Pillow filters widen their support when shrinking, so this is antialiased both ways.
    pixels = Image.fromarray(np.ascontiguousarray(panel.pixels))
    return pixels.resize(size, Image.Resampling.BICUBIC)


def _truncate(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _caption(meta: dict, shape: Sequence[int]) -> list[tuple[str, tuple[int, int, int]]]:
    modality = str(meta.get("modality", "?"))
    key = str(meta.get("__key__", ""))[:8]
    split = meta.get("split")
    first = "  ".join(s for s in (modality, key, str(split) if split else "") if s)
    sp = meta.get("spacing_mm")
    second = "x".join(str(int(n)) for n in shape)
    if sp is not None:
        second += "  @ " + "x".join(f"{float(s):g}" for s in sp) + " mm"
    labels = meta.get("labels")
    if isinstance(labels, dict):
        positive = [str(k) for k, v in labels.items() if v is not None and v == 1]
        third = ("+ " + ", ".join(positive)) if positive else "no positive findings"
    else:
        third = ""
    return [(first, TEXT), (second, TEXT), (third, FINDINGS)]


def _draw_letters(draw: ImageDraw.ImageDraw, font: Any, box: tuple[int, int, int, int],
                  letters: tuple[str, str, str, str]) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    top, bottom, left, right = letters
    # Anchors put each letter just inside its edge, centred along it.
    spots = [((cx, y0 + 1), top, "mt"), ((cx, y1 - 1), bottom, "mb"),
             ((x0 + 2, cy), left, "lm"), ((x1 - 2, cy), right, "rm")]
    for xy, letter, anchor in spots:
        try:
            draw.text(xy, letter, fill=LETTERS, font=font, anchor=anchor, stroke_width=1,
                      stroke_fill=OUTLINE)
        except ValueError:  # bitmap fallback font has no anchors; near the spot is good enough
            draw.text(xy, letter, fill=LETTERS, font=font)


def montage(items: Sequence[tuple[dict, np.ndarray]], *, tile: int = 256,
            columns: int | None = None, title: str | None = None) -> Image.Image:
    """Lay samples out on one RGB contact sheet.

    ``items`` are ``(meta, array)`` pairs as decoded from shards. ``meta`` needs "modality"
    ("CT", "CR", "DX") and "spacing_mm" (array axis order); "__key__", "split" and "labels"
    (finding -> 1/0/-1/None; 1 is listed as positive) go into the caption when present.

    Layout: the sheet is a grid of square ``tile`` x ``tile`` cells, ``columns`` cells wide. A
    CT takes three adjacent cells (axial, coronal, sagittal; see the module docstring for their
    orientation), an X-ray one; items flow left to right and wrap whole, never split across
    rows. Under every row is a caption strip of `CAPTION_LINES` lines per item (modality, key
    prefix, split / shape and spacing / positive findings). Size is therefore exactly
    ``columns * tile`` by ``title_h + rows * (tile + caption_h)``. Default ``columns`` keeps a
    CT on one row and aims for a roughly square sheet, at least six cells wide when there are
    that many.
    """
    if not items:
        raise ValueError("montage needs at least one (meta, array) item")
    tile = int(tile)
    if tile < 16:
        raise ValueError("tile must be at least 16 pixels")
    font = _font()
    line_h = _line_height(font)
    caption_h = _caption_height(font)

    cells = [(dict(meta or {}), np.asarray(arr)) for meta, arr in items]
    panels = [_panels(meta, arr) for meta, arr in cells]
    widest = max(len(p) for p in panels)
    units = sum(len(p) for p in panels)
    if columns is None:
        columns = max(widest, min(units, max(6, math.ceil(math.sqrt(units)))))
    elif int(columns) < widest:
        raise ValueError(f"columns={columns} cannot hold a CT, which needs {widest} cells")
    columns = int(columns)

    placements = []
    row = col = 0
    for p in panels:
        if col + len(p) > columns:
            row, col = row + 1, 0
        placements.append((row, col))
        col += len(p)
    n_rows = row + 1

    title_h = _title_height(font) if title else 0
    sheet = Image.new("RGB", (columns * tile, title_h + n_rows * (tile + caption_h)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), _truncate(draw, str(title), font, sheet.width - 2 * PAD),
                  fill=TEXT, font=font)

    box = tile - 2 * MARGIN
    for (meta, arr), item_panels, (r, c) in zip(cells, panels, placements):
        top = title_h + r * (tile + caption_h)
        for n, panel in enumerate(item_panels):
            left = (c + n) * tile
            img = _fit(panel, box)
            x0 = left + (tile - img.width) // 2
            y0 = top + (tile - img.height) // 2
            sheet.paste(img.convert("RGB"), (x0, y0))
            if panel.letters:
                _draw_letters(draw, font, (x0, y0, x0 + img.width, y0 + img.height),
                              panel.letters)
            if panel.name:
                draw.text((left + MARGIN + 2, top + MARGIN + 1), panel.name, fill=VIEW_NAME,
                          font=font, stroke_width=1, stroke_fill=OUTLINE)
        width = len(item_panels) * tile - 2 * PAD
        y = top + tile + PAD
        for text, colour in _caption(meta, arr.shape):
            if text:
                draw.text((c * tile + PAD, y), _truncate(draw, text, font, width),
                          fill=colour, font=font)
            y += line_h
    return sheet


def shard_montage(shards: str, manifest: dict, *, limit: int = 12, split: str | None = None,
                  title: str = "radforge") -> tuple[Image.Image, int]:
    """The contact sheet of a shard set's first `limit` samples (of `split`, or of all): the one
    picture `radforge inspect --png` and the demo draw. Returns the sheet and its sample count."""
    from radforge import shardspec

    items = []
    for raw in shardspec.iter_samples(shards, manifest, limit=limit, split=split):
        arr, meta, _ = shardspec.decode_sample({k: v for k, v in raw.items() if not k.startswith("__")})
        items.append(({"__key__": raw["__key__"], **meta}, arr))
    return montage(items, title=f"{title}: {len(items)} samples"), len(items)


def save_png(image: Union[Image.Image, np.ndarray],
             path_or_fileobj: Union[str, os.PathLike, BinaryIO]) -> None:
    """Write ``image`` as PNG to a local path or a binary file object (e.g. an fsspec handle)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path_or_fileobj, format="PNG")
