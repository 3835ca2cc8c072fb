"""Pictures for people: a contact sheet of shard samples, to eyeball an ingest at a glance, and
the evaluation report (`write_report`: index.html + matplotlib PNGs, no network).

Pillow and numpy only (no torch, no ray; the report adds matplotlib, imported when drawn), so it runs anywhere a shard can be read, including a
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

import json
import math
import os
from typing import Any, BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["montage", "shard_montage", "save_png", "write_report", "CT_WINDOW"]

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


# ---------------------------------------------------------------------------------------------
# The evaluation report (radforge.evaluate.run(report_dir=...)): index.html + PNGs beside it


REPORT_SECTIONS = ("summary", "roc", "frozen", "fairness", "robustness", "calibration", "config")
_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
        "margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}th{background:#eee}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}.small{color:#888}")


def _esc(v) -> str:
    import html

    return html.escape(str(v), quote=True)


def _f3(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _ci3(ci) -> str:
    return "–" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(out_dir: str, name: str, draw) -> str:
    """Draw with matplotlib (Agg) into out_dir/name; -> the <img> tag, linked relatively."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(5.2, 3.8), dpi=90)
    try:
        draw(fig)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), format="png")
    finally:
        plt.close(fig)
    return f'<img src="{_esc(name)}" alt="{_esc(name)}">'


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)[:60]


def _roc_section(curves: dict, prot: dict, out_dir: str) -> str:
    findings = sorted({f for per in curves.values() for f in per})
    if not findings:
        return "<p>No ROC curves: no protocol produced scores for a finding with both classes.</p>"
    parts = []
    for f in findings:
        def draw(fig, f=f):
            ax = fig.add_subplot(111)
            for scorer, per in curves.items():
                if f in per:
                    fpr, tpr = per[f]
                    auc = (prot.get(scorer, {}).get("per_finding", {}).get(f, {}) or {}).get("auroc")
                    ax.plot(fpr, tpr, label=f"{scorer} ({_f3(auc)})")
            ax.plot([0, 1], [0, 1], ":", color="grey")
            ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC: {f}")
            ax.legend(fontsize=8, loc="lower right")
        parts.append(_figure(out_dir, f"roc_{_slug(f)}.png", draw))
    return "".join(parts)


def _frozen_section(prot: dict) -> str:
    parts = []
    for name in ("zero_shot", "knn", "linear_probe", "fine_tune"):
        if name in prot:
            rows = [(f, _f3(v["auroc"]), _ci3(v["ci95"]), v.get("n_pos", ""), v.get("n_neg", ""))
                    for f, v in prot[name]["per_finding"].items()]
            rows.append(("mean", _f3(prot[name]["mean_auroc"]), "", "", ""))
            parts.append(f"<h3>{_esc(name)}</h3>" + _table(("finding", "AUROC", "95% CI", "pos", "neg"), rows))
    if "few_shot" in prot:
        rows = [(s, _f3(v["mean_auroc"]), _ci3(v["ci95"]), v["n_seeds"], f"{v['mean_train_samples']:.0f}")
                for s, v in prot["few_shot"]["settings"].items()]
        parts.append("<h3>few_shot</h3>" + _table(("setting", "mean AUROC", "95% CI (seeds)", "seeds", "train samples"), rows))
    rec = prot.get("retrieval", {}).get("recall")
    if rec:
        ks = list(next(iter(rec.values())))
        rows = [(d.replace("_", " "), *(_f3(rec[d][k]) for k in ks)) for d in rec]
        parts.append(f"<h3>retrieval ({prot['retrieval']['n_with_report']} reports)</h3>"
                     + _table(("direction", *(f"R@{k}" for k in ks)), rows))
    if "recon_loss" in prot:
        parts.append(f"<h3>recon_loss</h3><p>masked-patch reconstruction loss {_f3(prot['recon_loss']['recon_loss'])} "
                     f"(masks seed {prot['recon_loss']['masks_seed']})</p>")
    return "".join(parts) or "<p>No frozen-feature protocol ran.</p>"


def _fairness_section(fr: dict | None, out_dir: str) -> str:
    if not fr:
        return ""
    parts = [f"<p>Scorer: {_esc(fr['scorer'])}; operating threshold: {_esc(fr['threshold_rule'])}; "
             f"groups under {fr['min_group']} labelled samples are reported as too small.</p>"]
    for attr, a in fr["attributes"].items():
        findings = list(a["per_finding"])
        rows = []
        for g, v in a["groups"].items():
            cells = ["too small"] * len(findings) if v["too_small"] else \
                [f"{_f3(v['per_finding'][f]['auroc'])} {_ci3(v['per_finding'][f]['ci95'])}" for f in findings]
            rows.append((g, v["n"], *cells))
        parts.append(f"<h3>{_esc(attr)}</h3>" + _table((attr, "n", *findings), rows))
        gap_rows = [(f, _f3(v["auroc_gap"]), _f3(v["es_auc"]), _f3(v["equal_opportunity_diff"]),
                     _f3(v["statistical_parity_diff"])) for f, v in a["per_finding"].items()]
        parts.append(_table(("finding", "AUROC gap", "ES-AUC", "equal-opportunity diff", "statistical-parity diff"), gap_rows))

        def draw(fig, a=a, findings=findings):
            ax = fig.add_subplot(111)
            big = [(g, v) for g, v in a["groups"].items() if not v["too_small"]]
            width = 0.8 / max(1, len(big))
            for i, (g, v) in enumerate(big):
                vals = [v["per_finding"][f]["auroc"] or 0 for f in findings]
                ax.bar(np.arange(len(findings)) + i * width, vals, width, label=str(g))
            ax.set_xticks(np.arange(len(findings)) + 0.4 - width / 2, findings, rotation=20, fontsize=8)
            ax.set(ylim=(0, 1), ylabel="AUROC", title=f"AUROC by {attr}")
            ax.legend(fontsize=8)
        parts.append(_figure(out_dir, f"fairness_{_slug(attr)}.png", draw))
    return "".join(parts)


def _robustness_section(rb: dict | None, out_dir: str) -> str:
    if not rb:
        return ""

    def draw(fig):
        ax = fig.add_subplot(111)
        for name, sev in rb["corruptions"].items():
            ax.plot([int(s) for s in sev], [v["mean_auroc"] if v["mean_auroc"] is not None else np.nan for v in sev.values()],
                    marker="o", label=name)
        if rb["clean"]["mean_auroc"] is not None:
            ax.axhline(rb["clean"]["mean_auroc"], color="black", ls=":", label="clean")
        ax.set(xlabel="severity", ylabel="mean AUROC", title=f"robustness ({rb['scorer']})")
        ax.legend(fontsize=7, ncol=2)
    rows = [(name, *(f"{_f3(v['mean_auroc'])} ({_f3(v['relative_drop'])})" for v in sev.values()))
            for name, sev in rb["corruptions"].items()]
    sev = [f"severity {s} (rel. drop)" for s in rb["severities"]]
    return (f"<p>Clean mean AUROC {_f3(rb['clean']['mean_auroc'])}; corruption seed {rb['seed']}.</p>"
            + _figure(out_dir, "robustness.png", draw) + _table(("corruption", *sev), rows))


def _calibration_section(cal: dict | None, out_dir: str) -> str:
    if not cal:
        return ""
    parts = []
    for scorer, src in cal["sources"].items():
        def draw(fig, src=src, scorer=scorer):
            ax = fig.add_subplot(111)
            for f, v in src["per_finding"].items():
                d = v["reliability"]
                if d["confidence"]:
                    ax.plot(d["confidence"], d["accuracy"], marker="o", label=f"{f} (ECE {_f3(v['ece'])})")
            ax.plot([0, 1], [0, 1], ":", color="grey")
            ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=f"reliability: {scorer}",
                   xlim=(0, 1), ylim=(0, 1))
            ax.legend(fontsize=7)
        rows = [(f, _f3(v["ece"]), _ci3(v.get("ci95"))) for f, v in src["per_finding"].items()]
        parts.append(f"<h3>{_esc(scorer)}: mean ECE {_f3(src['mean_ece'])}</h3>"
                     + _figure(out_dir, f"reliability_{_slug(scorer)}.png", draw)
                     + _table(("finding", f"ECE ({cal['bins']} bins)", "95% CI"), rows))
    return "".join(parts)


def write_report(result: dict, curves: dict, out_dir: str) -> str:
    """index.html (self-contained: inline CSS, no network, PNGs beside it linked relatively) for
    an evaluation result; sections REPORT_SECTIONS, each present (with the reason when a protocol
    was skipped). -> the path of index.html (local directories only)."""
    os.makedirs(out_dir, exist_ok=True)
    prot, skipped = result.get("protocols", {}), result.get("skipped", {})

    def why(*names):
        return "".join(f"<p class='small'>{_esc(n)} not run: {_esc(skipped[n])}</p>" for n in names if n in skipped)

    summary = _table(("protocol", "seconds"), [(k, v) for k, v in (result.get("protocol_seconds") or {}).items()])
    body = {
        "summary": f"<p>Model {_esc(result.get('model_id'))} ({_esc(result.get('kind'))}), split {_esc(result.get('split'))}, "
                   f"n = {result.get('n')}, {result.get('seconds')} s.</p>{summary}" + why(*skipped),
        "roc": _roc_section(curves, prot, out_dir),
        "frozen": _frozen_section(prot) + why("knn", "linear_probe", "few_shot", "zero_shot", "fine_tune"),
        "fairness": _fairness_section(prot.get("fairness"), out_dir) + why("fairness"),
        "robustness": _robustness_section(prot.get("robustness"), out_dir) + why("robustness"),
        "calibration": _calibration_section(prot.get("calibration"), out_dir) + why("calibration"),
        "config": f"<pre>{_esc(json.dumps(result.get('config', {}), indent=1, sort_keys=True))}</pre>",
    }
    titles = {"summary": "Summary", "roc": "ROC curves per finding", "frozen": "Frozen-feature protocols",
              "fairness": "Subgroup fairness", "robustness": "Corruption robustness",
              "calibration": "Calibration (reliability diagrams)", "config": "Configuration"}
    sections = "".join(f'<section id="{s}"><h2>{titles[s]}</h2>{body[s] or "<p>not run</p>"}</section>'
                       for s in REPORT_SECTIONS)
    # Written by the page itself once loaded: how many pictures decoded (the report test reads it).
    check = ("<script>window.addEventListener('load',function(){var i=document.images,n=0;for(var k=0;k<i.length;k++)"
             "{if(i[k].complete&&i[k].naturalWidth>0)n++}document.getElementById('render-check').textContent="
             "n+'/'+i.length+' images rendered'})</script>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>radforge evaluation: {_esc(result.get('model_id'))}"
            f"</title><style>{_CSS}</style></head><body><h1>radforge evaluation</h1>"
            f"<p id='render-check'>not loaded</p>{sections}{check}</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
