"""DICOM bytes → index rows → validated series plans → HU volumes and X-ray images.

Three stages, each a plain function so Ray Data can call them and tests can call them directly:

1. `scan(path, size, fileobj)`: header-only read of one file → one index row (never raises;
   a file that cannot be used gets `status="rejected"` and a reason code).
2. `plan_group(rows, ...)`: all index rows of one SeriesInstanceUID (or one X-ray) → work items,
   validated from the headers alone (geometry, ordering, gaps, tilt) so a bad series costs no
   pixel decoding.
3. `load_ct(item, read)` / `load_xray(item, read, cfg)`: decode the planned files (pydicom's pixel
   handlers + pylibjpeg plugins for every transfer syntax) into HU / presentation values.

Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
the ImageOrientationPatient direction cosines), never by file name or InstanceNumber: both are
unreliable in real archives.

Privacy: index rows hold original UIDs, paths and the identifying values needed to redact reports,
so the index is a private artifact. Reason codes and exception messages never contain header values.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from radforge import deid

# Never let pydicom warn about invalid element values: its warnings quote the value, and a
# malformed PatientName or date would then reach logs. Values are validated where they are used.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

XRAY_MODALITIES = ("CR", "DX")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
XRAY_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
)

# Reason codes. Rejections are input problems; skips are inputs deliberately not used.
REJECT_REASONS = (
    "not_dicom",
    "unreadable_header",
    "truncated",
    "unsupported_modality",
    "unsupported_sop_class",
    "missing_geometry",
    "mixed_geometry",
    "duplicate_position",
    "slice_gap",
    "nonuniform_spacing",
    "gantry_tilt",
    "too_few_slices",
    "too_large",
    "unsupported_photometric",
    "decode_error",
)
SKIP_REASONS = ("localizer", "modality_not_selected")


class Reject(Exception):
    """An input that cannot become a sample. `reason` is a code from REJECT_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


INDEX_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("status", pa.string()),  # "ok" | "rejected"
        ("reason", pa.string()),
        ("group_key", pa.string()),  # what plan_group groups on
        ("modality", pa.string()),
        ("sop_class_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("series_uid", pa.string()),
        ("study_uid", pa.string()),
        ("patient_id", pa.string()),
        ("accession", pa.string()),
        ("transfer_syntax", pa.string()),
        ("image_type", pa.string()),
        ("rows", pa.int32()),
        ("cols", pa.int32()),
        ("n_frames", pa.int32()),
        ("pixel_spacing", pa.list_(pa.float64())),
        ("iop", pa.list_(pa.float64())),
        ("positions", pa.list_(pa.list_(pa.float64()))),  # one per frame
        ("safe", pa.string()),  # JSON of allow-listed attributes (deid.SAFE_ATTRIBUTES)
        ("phi_terms", pa.list_(pa.string())),  # identifying values, for report redaction only
    ]
)


# ---------------------------------------------------------------------------------------------
# 1. Header scan
# ---------------------------------------------------------------------------------------------


def scan(path: str, size: int, fileobj) -> dict:
    """Header-only read of one file into an index row. Never raises."""
    row = {name: None for name in INDEX_SCHEMA.names}
    row.update(path=path, size=int(size), status="rejected", group_key="bad:" + path)
    if size == 0:
        row["reason"] = "not_dicom"
        return row
    try:
        ds = _read_header(fileobj)
    except Reject as r:
        row["reason"] = r.reason
        return row
    except Exception:  # noqa: BLE001 — pydicom raises many types on smashed headers
        row["reason"] = "unreadable_header"
        return row
    try:
        _fill_row(row, ds)
        if "PixelData" not in ds and row["modality"] in ("CT", *XRAY_MODALITIES):
            _check_pixel_data_extent(fileobj, ds, size)
        row["status"] = "ok"
        row["reason"] = None
    except Reject as r:
        row["reason"] = r.reason
    except Exception:  # noqa: BLE001
        row["reason"] = "unreadable_header"
    if row["status"] == "ok":
        row["group_key"] = _group_key(row)
    return row


def _read_header(fileobj) -> pydicom.Dataset:
    head = fileobj.read(132)
    # PS3.10 files start with a 128-byte preamble and "DICM". Without it, reading means
    # force-parsing, which also "succeeds" on text and random bytes, so the line is drawn here.
    if len(head) < 132 or head[128:132] != b"DICM":
        raise Reject("not_dicom")
    fileobj.seek(0)
    try:
        ds = pydicom.dcmread(fileobj, stop_before_pixels=True)
    except EOFError:
        raise Reject("truncated") from None
    if "SOPClassUID" not in ds and "Modality" not in ds:
        # A Part 10 prefix followed by nothing recognisable: the header is smashed.
        raise Reject("unreadable_header")
    return ds


def _fill_row(row: dict, ds: pydicom.Dataset) -> None:
    row["modality"] = str(ds.get("Modality", "") or "").upper() or None
    row["sop_class_uid"] = str(ds.get("SOPClassUID", "") or "") or None
    row["sop_uid"] = str(ds.get("SOPInstanceUID", "") or "") or None
    row["series_uid"] = str(ds.get("SeriesInstanceUID", "") or "") or None
    row["study_uid"] = str(ds.get("StudyInstanceUID", "") or "") or None
    row["patient_id"] = str(ds.get("PatientID", "") or "")
    row["accession"] = str(ds.get("AccessionNumber", "") or "")
    meta = getattr(ds, "file_meta", None)
    row["transfer_syntax"] = str(meta.get("TransferSyntaxUID", "")) if meta is not None else None
    image_type = ds.get("ImageType")
    if image_type is not None:
        row["image_type"] = "\\".join(str(v) for v in (image_type if isinstance(image_type, (list, pydicom.multival.MultiValue)) else [image_type]))
    row["rows"] = _int(ds.get("Rows"))
    row["cols"] = _int(ds.get("Columns"))
    row["n_frames"] = _int(ds.get("NumberOfFrames")) or 1
    ps, iop, positions = _geometry(ds, row["n_frames"])
    row["pixel_spacing"], row["iop"], row["positions"] = ps, iop, positions
    safe = {}
    for attr in list(deid.SAFE_ATTRIBUTES) + list(deid.AGE_SEX_ATTRIBUTES):
        v = _plain(ds.get(attr))
        if v is not None:
            safe[attr] = v
    if "ConvolutionKernel" not in safe:  # Enhanced CT keeps it in a functional group
        k = _functional(ds, 0, "CTReconstructionSequence", "ConvolutionKernel")
        if k is not None:
            safe["ConvolutionKernel"] = _plain(k)
    row["safe"] = json.dumps(safe, sort_keys=True)
    row["phi_terms"] = deid.identifying_terms(
        str(v) for attr in deid.IDENTIFYING_ATTRIBUTES for v in _as_list(ds.get(attr)) if v
    )


def _geometry(ds, n_frames: int):
    """Pixel spacing, orientation and one position per frame; classic or Enhanced (functional groups)."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        ps = _functional(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
        iop = _functional(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
        positions = []
        for i in range(len(ds.PerFrameFunctionalGroupsSequence)):
            p = _functional(ds, i, "PlanePositionSequence", "ImagePositionPatient")
            positions.append([float(v) for v in p] if p is not None else None)
        if any(p is None for p in positions):
            positions = None
    else:
        ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        iop = ds.get("ImageOrientationPatient")
        ipp = ds.get("ImagePositionPatient")
        positions = [[float(v) for v in ipp]] if ipp is not None and len(ipp) == 3 else None
    ps = [float(v) for v in ps] if ps is not None and len(ps) == 2 else None
    if ps is not None and min(ps) <= 0:  # some CR writers put 0\0: unknown, not zero
        ps = None
    iop = [float(v) for v in iop] if iop is not None and len(iop) == 6 else None
    return ps, iop, positions


def _functional(ds, frame: int, seq: str, attr: str):
    """An attribute from the per-frame functional group `frame`, falling back to the shared group."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[frame] if len(groups) > frame else groups[0]
        inner = item.get(seq)
        if inner and attr in inner[0]:
            return inner[0].get(attr)
    return None


def _check_pixel_data_extent(fileobj, ds, size: int) -> None:
    """Detect truncation cheaply: the Pixel Data element's declared length must fit in the file.

    After a `stop_before_pixels` read the file sits at the Pixel Data tag. For native pixel data
    the declared length must end within the file; encapsulated (compressed) data must end with a
    Sequence Delimitation Item. Deflated files are checked at decode time instead.
    """
    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
    if ts == DeflatedExplicitVRLittleEndian:
        return
    pos = fileobj.tell()
    hdr = fileobj.read(12)
    if len(hdr) < 8:
        raise Reject("truncated")
    little = ts is None or ts.is_little_endian
    group, elem = struct.unpack("<HH" if little else ">HH", hdr[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        if (group, elem) > (0x7FE0, 0x0010) or group == 0xFFFC:  # ended past pixel data / padding
            return
        raise Reject("truncated")
    if ts is not None and not ts.is_implicit_VR:
        if len(hdr) < 12:
            raise Reject("truncated")
        (length,) = struct.unpack("<I" if little else ">I", hdr[8:12])
        start = pos + 12
    else:
        (length,) = struct.unpack("<I" if little else ">I", hdr[4:8])
        start = pos + 8
    if length == 0xFFFFFFFF:
        fileobj.seek(max(0, size - 8))
        tail = fileobj.read(8)
        if tail != struct.pack("<HHI" if little else ">HHI", 0xFFFE, 0xE0DD, 0):
            raise Reject("truncated")
    elif start + length > size:
        raise Reject("truncated")


def _group_key(row: dict) -> str:
    if row["modality"] == "CT" and row["series_uid"]:
        return "ct:" + row["series_uid"]
    if row["modality"] in XRAY_MODALITIES and row["sop_uid"]:
        return "xr:" + row["sop_uid"]
    return "file:" + row["path"]


# ---------------------------------------------------------------------------------------------
# 2. Planning (headers only)
# ---------------------------------------------------------------------------------------------


@dataclass
class PlanContext:
    """What planning needs beyond the rows: recipe, pseudonymizer, table lookups."""

    recipe: object  # IngestRecipe (typed loosely to keep this module free of cycles)
    pseudo: deid.Pseudonymizer


def plan_group(rows: list[dict], ctx: PlanContext) -> list[dict]:
    """Index rows of one group → item rows: samples to build, and per-file rejects/skips.

    Every input row ends up in exactly one output row's `paths`, which is what makes the
    manifest's accounting (seen = used + skipped + rejected) hold by construction.
    """
    out: list[dict] = []
    ok = []
    for r in rows:
        if r["status"] != "ok":
            out.append(_disposition([r], "rejected", r["reason"]))
        elif r["modality"] not in ("CT", *XRAY_MODALITIES):
            out.append(_disposition([r], "rejected", "unsupported_modality"))
        elif r["modality"] not in ctx.recipe.modalities:
            out.append(_disposition([r], "skipped", "modality_not_selected"))
        elif r["modality"] == "CT" and r["sop_class_uid"] not in (CT_STORAGE, ENHANCED_CT_STORAGE):
            out.append(_disposition([r], "rejected", "unsupported_sop_class"))
        elif r["modality"] in XRAY_MODALITIES and r["sop_class_uid"] not in XRAY_STORAGE:
            out.append(_disposition([r], "rejected", "unsupported_sop_class"))
        elif "LOCALIZER" in (r["image_type"] or "").upper():
            out.append(_disposition([r], "skipped", "localizer"))
        else:
            ok.append(r)
    if not ok:
        return out
    if ok[0]["modality"] == "CT":
        try:
            out.append(_plan_ct(ok, ctx))
        except Reject as rej:
            out.append(_disposition(ok, "rejected", rej.reason))
    else:
        for r in ok:
            try:
                out.append(_plan_xray(r, ctx))
            except Reject as rej:
                out.append(_disposition([r], "rejected", rej.reason))
    return out


def _disposition(rows: list[dict], status: str, reason: str) -> dict:
    return {
        "kind": "none",
        "status": status,
        "reason": reason,
        "key": None,
        "split": None,
        "est_bytes": 0,
        "paths": [r["path"] for r in rows],
        "frames": [],
        "info": "{}",
    }


def _plan_ct(rows: list[dict], ctx: PlanContext) -> dict:
    cfg = ctx.recipe.ct
    first = rows[0]
    for r in rows:
        if r["iop"] is None or r["pixel_spacing"] is None or not r["positions"] or not r["rows"]:
            raise Reject("missing_geometry")
    iop0 = np.array(first["iop"])
    ps0 = np.array(first["pixel_spacing"])
    for r in rows[1:]:
        if (
            r["rows"] != first["rows"]
            or r["cols"] != first["cols"]
            or not np.allclose(r["iop"], iop0, atol=1e-3)
            or not np.allclose(r["pixel_spacing"], ps0, rtol=1e-3)
        ):
            raise Reject("mixed_geometry")
    col_dir, row_dir = iop0[:3], iop0[3:]
    normal = np.cross(col_dir, row_dir)
    if np.linalg.norm(normal) < 0.9:
        raise Reject("missing_geometry")
    normal = normal / np.linalg.norm(normal)
    # One entry per frame: (projection on normal, position, path, frame index)
    slices = []
    for r in rows:
        for f, p in enumerate(r["positions"]):
            slices.append((float(np.dot(p, normal)), p, r["path"], f if r["n_frames"] > 1 else -1))
    slices.sort(key=lambda s: (s[0], s[2], s[3]))
    z = np.array([s[0] for s in slices])
    if len(slices) >= 2:
        steps = np.diff(z)
        dup = steps < 1e-3 * max(1.0, float(np.median(np.abs(steps))) if len(steps) else 1.0)
        if dup.any():
            if cfg.duplicate_positions == "reject":
                raise Reject("duplicate_position")
            keep = np.concatenate([[True], ~dup])
            slices = [s for s, k in zip(slices, keep) if k]
            z = z[keep]
    if len(slices) < cfg.min_slices:
        raise Reject("too_few_slices")
    steps = np.diff(z)
    step = float(np.median(steps))
    if step <= 0:
        raise Reject("duplicate_position")
    # Gantry tilt: consecutive positions step off the slice normal.
    p_first, p_last = np.array(slices[0][1]), np.array(slices[-1][1])
    travel = p_last - p_first
    cosang = abs(float(np.dot(travel, normal))) / max(float(np.linalg.norm(travel)), 1e-9)
    if math.degrees(math.acos(min(1.0, cosang))) > cfg.max_tilt_deg:
        raise Reject("gantry_tilt")
    dev = np.abs(steps - step) / step
    if (dev > cfg.spacing_tolerance).any():
        raise Reject("slice_gap" if (steps > step * 1.5).any() else "nonuniform_spacing")
    n = len(slices)
    if n * first["rows"] * first["cols"] > cfg.max_voxels:
        raise Reject("too_large")
    src_spacing = [step, float(ps0[0]), float(ps0[1])]  # z, y (row spacing), x (column spacing)
    src_shape = [n, int(first["rows"]), int(first["cols"])]
    out_shape = [max(1, round(src_shape[i] * src_spacing[i] / cfg.spacing_mm[i])) for i in range(3)]
    # Affine (i, j, k, 1) -> LPS mm: columns step along the first IOP cosine by the column spacing.
    affine = np.eye(4)
    affine[:3, 0] = col_dir * ps0[1]
    affine[:3, 1] = row_dir * ps0[0]
    affine[:3, 2] = travel / max(n - 1, 1) if n > 1 else normal * step
    affine[:3, 3] = p_first
    item = _sample_item("ct", first, rows, ctx)
    item["paths"] = [s[2] for s in slices]
    item["frames"] = [s[3] for s in slices]
    item["est_bytes"] = int(np.prod(out_shape)) * 2
    info = json.loads(item["info"])
    info.update(
        source_shape=src_shape,
        source_spacing_mm=src_spacing,
        source_affine=affine.tolist(),
        n_files=len(rows),
    )
    item["info"] = json.dumps(info)
    # Files dropped as duplicates still count as used inputs of this series.
    item["all_paths"] = [r["path"] for r in rows]
    return item


def _plan_xray(r: dict, ctx: PlanContext) -> dict:
    if not r["rows"] or not r["cols"]:
        raise Reject("missing_geometry")
    safe = json.loads(r["safe"] or "{}")
    if safe.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        raise Reject("unsupported_photometric")
    if (r["n_frames"] or 1) != 1:
        raise Reject("unsupported_sop_class")
    item = _sample_item("xray", r, [r], ctx)
    longest = ctx.recipe.xray.longest_side
    scale = min(1.0, longest / max(r["rows"], r["cols"]))
    item["est_bytes"] = int(r["rows"] * scale) * int(r["cols"] * scale) * 2
    info = json.loads(item["info"])
    info.update(source_shape=[int(r["rows"]), int(r["cols"])], n_files=1)
    if r["pixel_spacing"]:
        info["source_spacing_mm"] = list(r["pixel_spacing"])
    item["info"] = json.dumps(info)
    item["paths"] = [r["path"]]
    item["all_paths"] = [r["path"]]
    item["frames"] = [-1]
    return item


def _sample_item(kind: str, first: dict, rows: list[dict], ctx: PlanContext) -> dict:
    pseudo = ctx.pseudo
    patient = pseudo("patient", first["patient_id"] or ("nopatient:" + (first["study_uid"] or "")))
    study = pseudo("study", first["study_uid"] or "")
    series = pseudo("series", first["series_uid"] or "")
    key = series if kind == "ct" else pseudo("image", first["sop_uid"] or first["path"])
    phi = sorted({t for r in rows for t in (r["phi_terms"] or [])}, key=len, reverse=True)
    info = {
        "modality": first["modality"],
        "patient": patient,
        "study": study,
        "series": series,
        "safe": json.loads(first["safe"] or "{}"),
        "transfer_syntax": first["transfer_syntax"],
        # Private join keys and redaction terms: used while building, never written to DEST.
        "_join": {"AccessionNumber": first["accession"] or "", "StudyInstanceUID": first["study_uid"] or ""},
        "_phi": phi,
    }
    return {
        "kind": kind,
        "status": "planned",
        "reason": None,
        "key": key,
        "split": pseudo.split(patient, ctx.recipe.splits),
        "est_bytes": 0,
        "paths": [],
        "frames": [],
        "info": json.dumps(info),
    }


# ---------------------------------------------------------------------------------------------
# 3. Pixels
# ---------------------------------------------------------------------------------------------


def _decode(data: bytes) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception:  # noqa: BLE001
        raise Reject("unreadable_header") from None


def _pixels(ds) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:  # noqa: BLE001 — decoder errors vary by plugin
        msg = str(e).lower()
        truncated = any(w in msg for w in ("truncat", "too short", "insufficient", "end of", "expected", "missing"))
        raise Reject("truncated" if truncated else "decode_error") from None


def _rescale(ds, frame: int) -> tuple[float, float]:
    slope = _functional(ds, max(frame, 0), "PixelValueTransformationSequence", "RescaleSlope")
    inter = _functional(ds, max(frame, 0), "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None:
        slope = ds.get("RescaleSlope", 1)
    if inter is None:
        inter = ds.get("RescaleIntercept", 0)
    return float(slope if slope not in (None, "") else 1), float(inter if inter not in (None, "") else 0)


def load_ct(item: dict, read: Callable[[str], bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Decode a planned CT series → (HU float32 volume [k, j, i] in planned slice order, affine)."""
    info = json.loads(item["info"])
    shape = info["source_shape"]
    vol = np.empty(shape, dtype=np.float32)
    cache: dict[str, tuple[pydicom.Dataset, np.ndarray]] = {}
    for k, (path, frame) in enumerate(zip(item["paths"], item["frames"])):
        if path not in cache:
            # A multi-frame file is decoded once; single-frame files are used once each.
            cache.clear() if frame < 0 else None
            ds = _decode(read(path))
            cache[path] = (ds, _pixels(ds))
        ds, arr = cache[path]
        plane = arr[frame] if frame >= 0 else arr
        if plane.shape != tuple(shape[1:]):
            raise Reject("mixed_geometry")
        slope, inter = _rescale(ds, frame)
        np.multiply(plane, slope, out=vol[k], casting="unsafe")
        vol[k] += inter
    return vol, np.array(info["source_affine"], dtype=np.float64)


def load_xray(item: dict, read: Callable[[str], bytes], voi: str) -> np.ndarray:
    """Decode one radiograph → float32 presentation values in [0, 1], high = bright.

    Modality LUT, then VOI (VOI LUT Sequence or window) when `voi == "window"`, then MONOCHROME1
    inversion, so every stored image reads the same way regardless of the vendor's photometric
    choice. The output range of each step is known from the header (BitsStored, LUT descriptor),
    so scaling does not depend on the image content.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _decode(read(item["paths"][0]))
    raw = _pixels(ds)
    if raw.ndim != 2:
        raise Reject("unsupported_photometric")
    bits = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = apply_modality_lut(raw, ds).astype(np.float64)
    if "ModalityLUTSequence" in ds:
        lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        lo, hi = 0.0, float(2**lut_bits - 1)
    else:
        slope, inter = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = sorted((lo_raw * slope + inter, hi_raw * slope + inter))
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    if voi == "window" and has_voi:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        if "VOILUTSequence" in ds:
            desc = ds.VOILUTSequence[0].LUTDescriptor
            lo, hi = 0.0, float(2 ** int(desc[2]) - 1)
        else:
            # pydicom's windowing maps into the stored-value range of the image.
            lo, hi = float(lo_raw), float(hi_raw)
    out = np.clip((values - lo) / max(hi - lo, 1e-9), 0.0, 1.0).astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _int(v):
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _as_list(v):
    if v is None:
        return []
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return list(v)
    return [v]


def _plain(v):
    """A JSON-able plain value from a pydicom element value (numbers stay numbers)."""
    if v is None:
        return None
    if isinstance(v, (pydicom.multival.MultiValue, list, tuple)):
        items = [_plain(x) for x in v]
        return items if all(i is not None for i in items) else None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, pydicom.valuerep.DSfloat) or isinstance(v, pydicom.valuerep.IS):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return None
    return str(v)
