"""DICOM bytes → index rows → validated series plans → HU volumes and X-ray images.

Stages, each a plain function so Ray Data can call them and tests can call them directly:

1. `scan(path, size, fileobj)`: header-only read of one file → one index row, a dict with the
   fields of INDEX_SCHEMA (never raises; a file that cannot be used gets `status="rejected"` and a
   reason code).
2. `plan_group(rows, ctx)`: all index rows of one SeriesInstanceUID (or one X-ray) → `PlanItem`s,
   validated from the headers alone (geometry, ordering, gaps, tilt) so a bad series costs no
   pixel decoding. Real-archive rules, in this order: per file (burned-in pixels, presentation
   intent, localizers), then instance identity (files sharing a SOPInstanceUID: identical pixels
   → one used, `duplicate_instance`; different → `conflicting_instance`; the only decoding
   planning does, and only for such copies), then CT series selection (`select_series`, recipe
   `series.rules`) and the split of several acquisitions in one series (`_split_acquisitions`).
   The per-study choice (`choose_per_study`) needs every series of a study: ingest applies it
   after planning.
3. `load_ct(item, read)` / `load_xray(item, read, voi)`: decode the planned files (pydicom's pixel
   handlers + pylibjpeg plugins for every transfer syntax) into HU / presentation values.
4. `canonical(item, read, profile)`: a planned item → the stored array, per a `transforms.Profile`
   (what ingest writes and serving, through `canonical_from_files`, feeds the model).

What each image kind (`radforge.kinds`) means here (SOP classes, grouping, planner, canonical
path) is one table, `_RULES`, at the end of the module. Arrow and JSON are not spoken here: the
Ray Data edge (`radforge.ingest`) converts rows and items to columns.

Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
the ImageOrientationPatient direction cosines), never by file name or InstanceNumber: both are
unreliable in real archives.

Hostile input: `scan` reads a header under `HeaderLimits` (bytes, elements, inflation) and
records the decoded size its header declares (`pixel_bytes`: rows × columns × frames × samples
× bits allocated / 8, whatever the transfer syntax); planning refuses files past the recipe's
budgets (`xray.max_pixels`, `ct.max_voxels`) as `too_large`, with the figure in
`Reject.detail` / `PlanItem.detail`; decoding checks the figure again on the bytes it is given
(`PlanItem.decode_bytes`), so no decoder runs on a size nobody budgeted.

Privacy: index rows hold original UIDs, paths and the identifying values needed to redact reports,
so the index is a private artifact. Reason codes and exception messages never contain header values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import math
import re
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pydicom
from pydicom.dataelem import RawDataElement as _RawDataElement
from pydicom.dataelem import convert_raw_data_element as _convert_raw
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR as _AMBIGUOUS_VR

from radforge import deid, kinds, storage
from radforge.config import SPLIT_ATTRIBUTES, CTConfig, IngestRecipe, SeriesConfig, SeriesRule, XrayConfig
from radforge.transforms import NO_CLOCK, Profile, StageClock, spacing_zyx

# Never let pydicom warn about invalid element values: its warnings quote the value, and a
# malformed PatientName or date would then reach logs. Values are validated where they are used.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Validation off still leaves warnings that quote header values (an unknown Specific Character
# Set, an exception text while reading an attribute). Every pydicom call here runs under
# `_quiet()`: Python warnings are ignored for its duration and records of the "pydicom" logger
# are dropped in this thread. (warnings.catch_warnings is process-wide state; Ray runs one task
# per worker process, so no other thread's warnings are lost in practice.)
_QUIET = threading.local()


class _DropWhileQuiet(logging.Filter):
    radforge_quiet = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET, "on", False)


_PYDICOM_LOG = logging.getLogger("pydicom")
for _f in [f for f in _PYDICOM_LOG.filters if getattr(f, "radforge_quiet", False)]:
    _PYDICOM_LOG.removeFilter(_f)  # a reloaded module replaces its filter instead of stacking one
_PYDICOM_LOG.addFilter(_DropWhileQuiet())


@contextlib.contextmanager
def _quiet():
    prev = getattr(_QUIET, "on", False)
    _QUIET.on = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _QUIET.on = prev


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
    "multiple_images",  # canonical_from_files: one request holds more than one series / image
    "conflicting_instance",  # one SOPInstanceUID, different pixel data: no copy can be trusted
    "inconsistent_meta",  # file meta's MediaStorageSOP{Instance,Class}UID contradicts the data set
    "burned_in_annotation",  # pixels may carry names: BurnedInAnnotation YES, Secondary Capture, screen capture
)
# Planning's skips; the listing's (never opened: FIFOs, symlinks…) are `storage.SKIP_REASONS`.
# Series selection adds "rule:<name>", "no_rule" and "per_study:<choice>" (`is_skip_reason`).
SKIP_REASONS = ("localizer", "modality_not_selected", "duplicate_instance", "for_processing", "for_presentation", "no_rule")
SELECTION_PREFIXES = ("rule:", "per_study:")


def is_skip_reason(reason: str | None) -> bool:
    """A planning skip: a fixed code or a series selection rule's ("rule:<name>", "per_study:<choice>")."""
    return reason in SKIP_REASONS or (reason or "").startswith(SELECTION_PREFIXES)


SECONDARY_CAPTURE = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
)


class Reject(Exception):
    """An input that cannot become a sample. `reason` is a code from REJECT_REASONS.

    `detail` is an optional figure for the private ledger (e.g. the declared size of a
    `too_large` image and the budget it exceeds): numbers only, never a header value's text. It
    is not part of the message, which stays the bare code.
    """

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class HeaderLimits:
    """Per-file caps on what the header read (`scan`) may consume before the pixel data.

    A hostile or broken file cannot make a header read slow or large: past either cap the file
    is `unreadable_header`, in bounded time (~0.35 s per 100k elements) and memory (`max_bytes`).
    Element headers are counted as 8-byte reads (each element, sequence item and delimiter
    starts with one), so the count includes a few value reads of 8 bytes; the defaults leave
    room for a 3,000-frame Enhanced CT (~30 elements per frame) and a large private blob.
    """

    max_bytes: int = 32 * 1024 * 1024  # header bytes read (values included), pixel data excluded
    max_elements: int = 200_000  # data elements + sequence items read
    # A Deflated data set is one zlib stream (header and pixels): it may inflate to at most this.
    max_inflated_bytes: int = 1024 * 1024 * 1024


HEADER_LIMITS = HeaderLimits()


INDEX_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("status", pa.string()),  # "ok" | "rejected" | "skipped" (by the listing: never opened)
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
        # Decoded size of the file's pixel data as its header declares it: rows × columns ×
        # frames × samples per pixel × bits allocated / 8, the figure every budget is checked on
        # before any decoder runs; None when the header does not say (planning rejects it).
        ("pixel_bytes", pa.int64()),
        ("pixel_spacing", pa.list_(pa.float64())),
        ("iop", pa.list_(pa.float64())),
        ("positions", pa.list_(pa.list_(pa.float64()))),  # one per frame
        ("safe", pa.string()),  # allow-listed attributes (deid.SAFE_ATTRIBUTES): a dict in a
        # scanned row, JSON in the Arrow index (ingest converts at its edge)
        ("phi_terms", pa.list_(pa.string())),  # identifying values, for report redaction only
        # Selection attributes (`_ATTRS`: burned-in, presentation intent, orientation, acquisition
        # split values, SeriesDescription), a dict in a scanned row, JSON in the Arrow index;
        # "frames" holds per-frame values of a multi-frame file. Private: descriptions may hold PHI.
        ("attrs", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------
# 1. Header scan
# ---------------------------------------------------------------------------------------------


def scan(path: str, size: int, fileobj, limits: HeaderLimits = HEADER_LIMITS) -> dict:
    """Header-only read of one file into an index row. Never raises.

    Reads the preamble and the data set up to the Pixel Data element, then at most a few
    8-12 byte item headers to prove the pixel data is complete, so scanning a 500 KB slice costs a
    few KB of I/O (Deflated files are the exception: deflate is one stream, read whole). What the
    read may consume is capped by `limits` (`HeaderLimits`): beyond it, `unreadable_header`.
    Ingest hands it a `storage.open_head` file: those reads become one range request for the
    first 1/32 of the file (2-64 KiB; all of a file of ≤ 16 KiB), an extension only for a longer header, and one 8-byte
    request at the end for encapsulated pixel data; the row is the same as from the whole file.
    """
    with _quiet():
        try:
            return _scan(path, size, fileobj, limits)
        except _PASS_THROUGH:
            raise
        except BaseException:  # noqa: BLE001 — last resort for "never raises" (see _PASS_THROUGH)
            return rejected_row(path, size, "unreadable_header")


def rejected_row(path: str, size: int, reason: str | None) -> dict:
    """The index row of a file that cannot be used (every other field None)."""
    row = dict.fromkeys(INDEX_SCHEMA.names)
    row.update(path=path, size=int(size), status="rejected", reason=reason, group_key="bad:" + path)
    return row


def _scan(path: str, size: int, fileobj, limits: HeaderLimits) -> dict:
    row = rejected_row(path, size, None)
    if size == 0:
        row["reason"] = "not_dicom"
        return row
    # A HeadReader has fetched the first range anyway: pydicom's reads are served from it.
    head = storage.head_first_range(size) if isinstance(fileobj, storage.HeadReader) else 0
    if head > 0:
        # The header walked over the first range (`_scan_explicit_le`): the same row as
        # pydicom's read. A row it makes "unreadable_header" (a cap, among others) is made again
        # by pydicom's read, over the same bytes (no second request).
        reader = _Reader(fileobj, limits, head=head)
        try:
            values = _scan_explicit_le(reader, limits)
        except _Unhandled:
            values = None
        if values is not None:
            row = _scan_row(row, values, reader, size)
            if row["reason"] != "unreadable_header":
                return row
            row = rejected_row(path, size, None)
        reader = _Reader(fileobj, limits, prefix=reader.prefix())
    else:
        reader = _Reader(fileobj, limits)
    try:
        ds = _read_header(reader, limits)
    except Reject as r:
        row["reason"] = r.reason
        return row
    except Exception:  # noqa: BLE001 — pydicom raises many types on smashed headers
        # ... and on some cuts too (a struct.error when an element's 4-byte length is cut).
        cut = reader.any_short and _meta_names_transfer_syntax(fileobj)
        row["reason"] = "truncated" if cut else "unreadable_header"
        return row
    return _scan_row(row, ds, reader, size)


def _scan_row(row: dict, header: "pydicom.Dataset | _HeaderValues", reader: "_Reader", size: int) -> dict:
    """The index row of a header read (pydicom's data set, with SOPClassUID or Modality, or
    the values `_scan_explicit_le` walked; `reader` at its Pixel Data tag or end)."""
    # A file cut inside its header still parses (pydicom keeps the short last value and stops),
    # so a short read is the only sign. Checked for every file: a cut can fall before Modality
    # or inside the SOP Class UID, which would pass for another modality. The row is filled
    # first so a rejected file still shows what it was.
    try:
        values = header if isinstance(header, _HeaderValues) else _HeaderValues.of_dataset(header)
        _fill_row_from(row, values)
    except Exception:  # noqa: BLE001 — the row fill tolerates bad values; this is a last resort
        row["reason"] = "truncated" if reader.truncated else "unreadable_header"
        return row
    try:
        if reader.truncated:
            raise Reject("truncated")
        _check_file_meta(values, row)
        if row["modality"] in kinds.MODALITIES or row["sop_class_uid"] in _IMAGE_SOP_CLASSES:
            # A cut exactly between two elements reads cleanly but leaves the file at EOF
            # where Pixel Data should start; other modalities are rejected anyway, unread.
            _check_pixel_data_extent(reader, values.meta(_TRANSFER_SYNTAX), size)
        row["status"] = "ok"
        row["reason"] = None
    except Reject as r:
        row["reason"] = r.reason
    except Exception:  # noqa: BLE001
        row["reason"] = "unreadable_header"
    if row["status"] == "ok":
        row["group_key"] = _group_key(row)
    return row


class _Reader:
    """The scanned file object, noting reads that came back short.

    pydicom does not raise on a data set that ends inside an element: it keeps the short value
    and stops. A short read is how such a cut shows: a clean end of file is exactly one read that
    returns nothing (the next element's tag); a value cut short returns fewer bytes than asked,
    and a value cut exactly at its start is a second empty read.

    pydicom reads a header in ~150 small reads (element headers, then values). `head` bytes
    of the file's start (the scan of a `storage.HeadReader` passes `storage.head_first_range`,
    the range it fetches first anyway) or the whole file (`prefix`, when it is in memory) are
    taken in one read and those reads served from them; a read past them goes to the file as
    asked. What each read returns, and so every cap and short-read count, is the same either way.
    """

    def __init__(self, f, limits: HeaderLimits = HEADER_LIMITS, *, head: int = 0, prefix: bytes | None = None):
        self._f = f
        self._short = 0
        self._partial = False
        self._limits = limits
        self._bytes = 0  # read so far
        self._elements = 0  # 8-byte reads so far (element and item headers)
        self._head = head
        self._buf = prefix  # the file's first bytes (None: not fetched yet)
        self._pos = 0 if prefix is not None else f.tell()

    def _start(self) -> bytes:
        if self._head > 0:
            self._f.seek(0)
            self._buf = self._f.read(self._head)
        else:
            self._buf = b""
        return self._buf

    def read(self, n: int = -1) -> bytes:
        # The caps are checked before reading: a declared 4 GB value is refused, not allocated.
        room = self._limits.max_bytes - self._bytes
        pos = self._pos
        if n is None or n < 0:
            self._f.seek(pos)
            b = self._f.read(room + 1)
            if len(b) > room:
                raise Reject("unreadable_header")
            self._bytes += len(b)
            self._pos = pos + len(b)
            return b
        if n > room:
            raise Reject("unreadable_header")
        if n == 8:
            self._elements += 1
            if self._elements > self._limits.max_elements:
                raise Reject("unreadable_header")
        buf = self._buf if self._buf is not None else self._start()
        end = pos + n
        if end <= len(buf):
            b = buf[pos:end]
        else:
            self._f.seek(pos)
            b = self._f.read(n)
        self._bytes += len(b)
        self._pos = pos + len(b)
        if len(b) < n:
            self._short += 1
            self._partial |= len(b) > 0
        return b

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self._pos + offset
        else:
            pos = self._f.seek(offset, whence)
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def prefix(self) -> bytes:
        """The bytes of the file's start that reads are served from (fetched now if not yet)."""
        return self._buf if self._buf is not None else self._start()

    def set_counts(self, *, elements: int, nbytes: int) -> None:
        """What the caps count from now on, as if that much had been read (`_scan_explicit_le`)."""
        self._elements, self._bytes = elements, nbytes

    @property
    def raw(self):
        """The file itself, for reads that must not count against the caps."""
        return self._f

    @property
    def truncated(self) -> bool:
        return self._partial or self._short > 1

    @property
    def any_short(self) -> bool:
        """For a read that raised: it never reached a clean end, so any short read was a cut."""
        return self._short > 0


def _read_header(fileobj, limits: HeaderLimits = HEADER_LIMITS) -> pydicom.Dataset:
    head = fileobj.read(132)
    # PS3.10 files start with a 128-byte preamble and "DICM". Without it, reading means
    # force-parsing, which also "succeeds" on text and random bytes, so the line is drawn here.
    if len(head) < 132 or head[128:132] != b"DICM":
        raise Reject("not_dicom")
    if _meta_transfer_syntax(fileobj) == DeflatedExplicitVRLittleEndian:
        _check_inflated_size(getattr(fileobj, "raw", fileobj), limits.max_inflated_bytes)
    fileobj.seek(0)
    try:
        ds = pydicom.dcmread(fileobj, stop_before_pixels=True)
    except EOFError:
        raise Reject("truncated") from None
    except zlib.error as e:
        # Deflated data sets are one zlib stream: Z_BUF_ERROR (-5) is a stream cut short.
        raise Reject("truncated" if "-5" in str(e) else "unreadable_header") from None
    if "SOPClassUID" not in ds and "Modality" not in ds:
        raise Reject(_unrecognised(ds, fileobj))
    return ds


def _unrecognised(ds, fileobj) -> str:
    """The reason for a header with neither SOPClassUID nor Modality: a Part 10 prefix followed
    by nothing recognisable is smashed, unless a valid file meta (it names the transfer syntax)
    was followed by a data set cut short."""
    meta = getattr(ds, "file_meta", None)
    cut = getattr(fileobj, "truncated", False) and meta is not None and "TransferSyntaxUID" in meta
    return "truncated" if cut else "unreadable_header"


_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def _meta_names_transfer_syntax(f) -> bool:
    """Whether the file meta (group 2, always Explicit VR Little Endian) holds a Transfer Syntax
    UID: what tells a data set cut short from a smashed header when pydicom raised mid-read."""
    return _meta_transfer_syntax(f) is not None


def _meta_transfer_syntax(f) -> str | None:
    """The Transfer Syntax UID of the file meta, read by hand (a few small reads), or None."""
    try:
        f.seek(132)
        for _ in range(64):  # group 2 has a dozen elements; anything longer is not a file meta
            h = f.read(8)
            if len(h) < 8:
                return None
            group, elem = struct.unpack("<HH", h[:4])
            if group != 0x0002:
                return None
            if h[4:6] in _LONG_VRS:
                ext = f.read(4)
                if len(ext) < 4:
                    return None
                (length,) = struct.unpack("<I", ext)
            else:
                (length,) = struct.unpack("<H", h[6:8])
            if elem == 0x0010:
                if not 0 < length <= 64:
                    return None
                v = f.read(length)
                return v.rstrip(b"\0 ").decode("ascii") if len(v) == length else None
            f.seek(f.tell() + length)
    except Exception:  # noqa: BLE001 — a Reject from the capped reader included
        return None
    return None


def _check_inflated_size(f, limit: int) -> None:
    """A Deflated data set is inflated whole by pydicom; refuse one that would inflate past
    `limit` (a deflate bomb) by inflating it here first, in chunks, discarding the output.
    Where the deflated stream starts, the file meta ends: its group length says where."""
    f.seek(132)
    h = f.read(12)
    if len(h) < 12 or h[:4] != b"\x02\x00\x00\x00":
        return  # no group length: pydicom will make what it can of it
    (glen,) = struct.unpack("<I", h[8:12])
    f.seek(144 + glen)
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return
        buf = chunk
        while buf:
            out = z.decompress(buf, 1 << 24)
            total += len(out)
            if total > limit:
                raise Reject("too_large", f"inflates to > {limit} bytes")
            buf = z.unconsumed_tail
            if z.eof:
                return


def declared_pixel_bytes(ds) -> int | None:
    """Decoded size of a data set's pixel data from its header alone: rows × columns × frames ×
    samples per pixel × bits allocated / 8 (rounded up), for every transfer syntax (what a
    decoder allocates, whatever the compressed size). None when Rows, Columns or BitsAllocated
    is missing or not positive, or a count is absurd: such a header cannot be budgeted."""
    rows, cols, bits = _int(_get(ds, "Rows")), _int(_get(ds, "Columns")), _int(_get(ds, "BitsAllocated"))
    frames = _int(_get(ds, "NumberOfFrames"))
    spp = _int(_get(ds, "SamplesPerPixel"))
    frames = frames if frames and frames > 0 else 1  # absent, 0 or negative: pydicom decodes one
    spp = 1 if spp is None else spp
    if not all(v is not None and 0 < v < 2**32 for v in (rows, cols, bits, spp, frames)):
        return None
    return -(-rows * cols * frames * spp * bits // 8)


_SCANNED_SAFE = (*deid.SAFE_ATTRIBUTES, *deid.AGE_SEX_ATTRIBUTES)  # what the index keeps for metadata


class _Elem(NamedTuple):
    """A converted row element (`_HeaderValues`): what the row reads of a DataElement."""

    VR: str
    value: object


_SLOW = object()  # `_fast_value`: pydicom's own conversion decides
_NUMBERS = {vr: struct.Struct("<" + f) for vr, f in (("US", "H"), ("SS", "h"), ("UL", "L"), ("SL", "l"), ("FL", "f"), ("FD", "d"))}
_STRING_VRS = frozenset(("CS", "AS", "DA", "TM", "DT"))  # pydicom's convert_string (dates stay text)
_TEXT_VRS = frozenset(("SH", "LO", "UC"))  # convert_text: split at backslashes
_SINGLE_TEXT_VRS = frozenset(("ST", "LT", "UT"))  # convert_single_string
_ESC = 0x1B  # ISO 2022 code extensions: pydicom decodes such text fragment by fragment
_LATIN_1 = frozenset(("iso8859", "latin_1"))  # pydicom's default encoding; ISO_IR 100's Python name


def _pydicom_defaults() -> bool:
    """Whether pydicom converts values the way `_fast_value` mirrors (and `_CONVERTED` keeps):
    validation off (this module's setting), no numpy, Decimal or date values, no conversion
    callbacks, UN and wrong lengths read as by default."""
    cfg, hooks = pydicom.config, pydicom.hooks.hooks
    return (cfg.settings.reading_validation_mode == cfg.IGNORE and not cfg.datetime_conversion
            and not cfg.use_DS_numpy and not cfg.use_DS_decimal and not cfg.use_IS_numpy
            and not cfg.use_none_as_empty_text_VR_value and cfg.data_element_callback is None
            and cfg.replace_un_with_known_vr and not cfg.convert_wrong_length_to_UN
            and hooks.raw_element_vr is pydicom.hooks.raw_element_vr
            and hooks.raw_element_value is pydicom.hooks.raw_element_value and not hooks.raw_element_kwargs)


def _fast_value(vr: str, value: bytes, encodings: list):
    """The value pydicom's `convert_raw_data_element` gives a little-endian element of `vr`
    with `value` (not empty) under the character set `encodings`, when `_pydicom_defaults`:
    made by the same calls (pydicom's str, int, float, list, MultiValue, DSfloat, IS and
    PersonName) without its per-element machinery (hooks, `convert_value`'s dispatch, a
    DataElement), except a single UID, given as the plain str its UID is. `_SLOW` for what
    pydicom must decide: other VRs, a multi-valued UID or name, ISO 2022 escapes, text that does
    not decode, a number that does not parse (pydicom retries such values as other VRs), a
    length that is no multiple of the number size, a person name with `=` groups or whose
    encoding may not give its text back. `test_fastpaths` holds every value the row reads to
    pydicom's, on real files and on edge cases of each VR."""
    if vr in _STRING_VRS:
        items = value.decode("latin_1").rstrip(" \x00").split("\\")
        return items[0] if len(items) == 1 else pydicom.multival.MultiValue(str, items)
    if vr == "UI":
        text = value.decode("latin_1").rstrip("\0 ")
        return _SLOW if "\\" in text else text.strip()
    if vr == "DS" or vr == "IS":
        text = value.decode("latin_1")
        items = (text.strip() if vr == "DS" else text).rstrip(" \x00").split("\\")
        kind = pydicom.valuerep.DSfloat if vr == "DS" else pydicom.valuerep.IS
        try:
            return kind(items[0]) if len(items) == 1 else pydicom.multival.MultiValue(kind, items)
        except Exception:  # noqa: BLE001 — not a number
            return _SLOW
    number = _NUMBERS.get(vr)
    if number is not None:
        if len(value) == number.size:
            return number.unpack(value)[0]
        if len(value) % number.size:
            return _SLOW
        return list(struct.unpack(f"<{len(value) // number.size}{number.format[1:]}", value))
    if vr in _TEXT_VRS or vr in _SINGLE_TEXT_VRS or vr == "PN":
        if _ESC in value:
            return _SLOW
        if vr == "PN":
            value = value.rstrip(b"\x00 ")
        try:
            text = value.decode(encodings[0])
        except Exception:  # noqa: BLE001 — LookupError, UnicodeError: pydicom replaces and warns
            return _SLOW
        if vr in _SINGLE_TEXT_VRS:
            return text.rstrip("\0 ")
        if vr == "PN":
            # convert_PN encodes its text again and decodes that per `=` group: the same text
            # when there is one group and the encoding is Latin-1 or the text ASCII.
            if "=" in text or "\\" in text or not (text.isascii() or encodings[0] in _LATIN_1):
                return _SLOW
            return pydicom.valuerep.PersonName(text, encodings, value)
        items = [v.rstrip("\0 ") for v in text.split("\\")]
        return items[0] if len(items) == 1 else pydicom.multival.MultiValue(str, items)
    return _SLOW


class _HeaderValues:
    """The elements the index row reads (`_ROW_TAGS`), each converted once: `.get(keyword)`,
    `in` and `[keyword]` answer like a pydicom data set's own, `.meta(tag)` gives the file
    meta's (`_META_TAGS`). pydicom's `ds.get(keyword)` resolves the keyword through its
    dictionary and converts through its hooks on every call; the row reads ~60 keywords per
    file, most absent. An element whose value fails to convert is absent, as `_get` reads it.

    Made from a pydicom data set (`of_dataset`) or, with no Dataset at all, from the elements
    `_walk_le` walked over an Explicit VR Little Endian header (`of_walk`, the common case).
    Values are converted by `_fast_value` where it can, else as the data set converts them."""

    __slots__ = ("_elems", "_meta")

    def __init__(self, elems: dict, meta: dict):
        self._elems = elems  # keyword → _Elem
        self._meta = meta  # file meta tag → value

    @classmethod
    def of_dataset(cls, ds: pydicom.Dataset) -> "_HeaderValues":
        elems = {}
        fast = _pydicom_defaults()
        encodings = None
        for tag, raw in ds._dict.items():  # tag → RawDataElement | DataElement, as read (pydicom 3 internal)
            kw = _ROW_KEYWORD_OF.get(int(tag))
            if kw is None:
                continue
            try:
                value = _SLOW
                if fast and type(raw) is _RawDataElement and raw.value is not None and raw.is_little_endian:
                    vr = raw.VR or _ROW_DICTIONARY_VR[tag]  # implicit VR: what raw_element_vr looks up
                    if vr in _AMBIGUOUS_VR or vr in ("UN", "SQ"):
                        pass
                    elif not raw.value:
                        value = pydicom.dataelem.empty_value_for_VR(vr)
                    else:
                        if encodings is None:
                            encodings = _encodings(ds.original_character_set or ds._character_set)
                        value = _fast_value(vr, raw.value, encodings)
                if value is _SLOW:
                    elem = ds[tag]  # what `_fast_value` leaves, sequences, ambiguous VRs, big endian
                    vr, value = elem.VR, elem.value
                elems[kw] = _Elem(vr, value)
            except Exception:  # noqa: BLE001 — malformed: reads as absent, like _get
                continue
        meta = getattr(ds, "file_meta", None)
        return cls(elems, {t: _meta_get(meta, t) for t in _META_TAGS} if meta is not None else {})

    @classmethod
    def of_walk(cls, meta_elems: dict, raw: dict) -> "_HeaderValues":
        """From `_explicit_le_parts`' file meta and data set elements, converted as the
        FileDataset read from them would convert them. `_Unhandled` for what only a data set
        answers: a sequence the row reads (Enhanced CT's functional groups), a VR corrected
        from the data set, a character set that does not convert."""
        if not _pydicom_defaults():
            raise _Unhandled
        default = [pydicom.charset.default_encoding]
        charset = raw.get(_CHARSET_TAG)
        try:
            # Dataset._character_set: the element converted with the default encoding, else
            # the parent's (default) encoding
            encodings = default if charset is None else pydicom.charset.convert_encodings(_walked(charset, default)[1])
        except Exception:  # noqa: BLE001
            raise _Unhandled from None
        elems = {}
        converted, key = _CONVERTED, tuple(encodings)
        for tag, elem in raw.items():
            kw = _ROW_KEYWORD_OF.get(int(tag))
            if kw is None:
                continue
            hit = converted.get(id(elem))
            if hit is not None and hit[0] is elem and hit[1] == key:
                elems[kw] = hit[2]
                continue
            try:
                elems[kw] = _walked(elem, encodings)
            except _Unhandled:
                raise
            except Exception:  # noqa: BLE001 — malformed: reads as absent, like _get
                continue
            if len(elem.value or b"") <= _WALKED_MAX_VALUE:
                if len(converted) >= _WALKED_MAX:
                    converted.clear()
                converted[id(elem)] = (elem, key, elems[kw])
        meta = {}
        for tag in _META_TAGS:
            elem = meta_elems.get(tag)
            if elem is not None:
                try:
                    meta[tag] = _walked(elem, default).value
                except _Unhandled:
                    raise
                except Exception:  # noqa: BLE001 — as _meta_get reads it
                    meta[tag] = None
        return cls(elems, meta)

    def get(self, keyword: str, default=None):
        elem = self._elems.get(keyword)
        return default if elem is None else elem.value

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._elems

    def __getitem__(self, keyword: str):
        return self._elems[keyword]

    def meta(self, tag: int):
        """A file meta element's value (`_META_TAGS`); None when absent or unreadable."""
        return self._meta.get(tag)


def _walked(elem: "_RawDataElement", encodings: list) -> _Elem:
    """A walked element as its data set would convert it (`_HeaderValues.of_walk`)."""
    if elem.VR == "SQ":
        raise _Unhandled
    if elem.VR != "UN":  # pydicom reads a UN of a known tag as the tag's own VR
        value = _fast_value(elem.VR, elem.value, encodings) if elem.value else pydicom.dataelem.empty_value_for_VR(elem.VR)
        if value is not _SLOW:
            return _Elem(elem.VR, value)
    converted = _convert_raw(elem, encoding=encodings)  # no data set: no row tag is private
    if converted.VR == "SQ" or converted.VR in _AMBIGUOUS_VR:
        raise _Unhandled
    return _Elem(converted.VR, converted.value)


# Walked elements converted (`of_walk`), by the RawDataElement's identity (the entry holds it,
# so the id stays its own) and the encodings: `_walk_le` hands the slices of a series one object
# per repeated element (`_WALKED`), so most of a header is converted once per series. Values are
# only read (`_fill_row_from` builds new strings, numbers and lists from them), never changed.
_CONVERTED: dict[int, tuple] = {}


def _encodings(charset) -> list:
    """A data set's character set as a list of Python encodings (a str when it is the default)."""
    return [charset] if isinstance(charset, str) else list(charset)


_CHARSET_TAG = 0x00080005  # Specific Character Set
_META_TAGS = (0x00020002, 0x00020003, 0x00020010)  # MediaStorageSOPClassUID, MediaStorageSOPInstanceUID, TransferSyntaxUID


def _fill_row_from(row: dict, ds) -> None:
    # Each attribute is read on its own: one malformed value (a DS of "abc", a US of odd length)
    # must cost that attribute, not the file. Geometry that fails to parse becomes None, which
    # planning turns into missing_geometry. `ds` answers `.get(keyword)`, `in`, `[keyword]` and
    # `.meta(tag)` (`_HeaderValues`; the tests' reference asks a pydicom data set keyword by keyword).
    row["modality"] = _str(ds, "Modality").upper() or None
    row["sop_class_uid"] = _str(ds, "SOPClassUID") or None
    row["sop_uid"] = _str(ds, "SOPInstanceUID") or None
    row["series_uid"] = _str(ds, "SeriesInstanceUID") or None
    row["study_uid"] = _str(ds, "StudyInstanceUID") or None
    row["patient_id"] = _str(ds, "PatientID")
    row["accession"] = _str(ds, "AccessionNumber")
    row["transfer_syntax"] = _text(ds.meta(_TRANSFER_SYNTAX)) or None
    image_type = _get(ds, "ImageType")
    if image_type is not None:
        row["image_type"] = "\\".join(str(v) for v in _as_list(image_type))
    row["rows"] = _int(_get(ds, "Rows"))
    row["cols"] = _int(_get(ds, "Columns"))
    n_frames = _int(_get(ds, "NumberOfFrames"))
    row["n_frames"] = n_frames if n_frames and n_frames > 0 else 1
    row["pixel_bytes"] = declared_pixel_bytes(ds)
    ps, iop, positions = _geometry(ds, row["n_frames"])
    row["pixel_spacing"], row["iop"], row["positions"] = ps, iop, positions
    safe = {}
    for attr in _SCANNED_SAFE:
        v = _plain(_get(ds, attr))
        # pydicom (validation off) hands back the raw text of a DS/IS that is not a number; such
        # text in a numeric field is free text of unknown content and must not pass as "safe".
        if v is not None and not (_vr(ds, attr) in _NUMERIC_VRS and not _all_numbers(v)):
            safe[attr] = v
    if "ConvolutionKernel" not in safe:  # Enhanced CT keeps it in a functional group
        k = _plain(_functional(ds, 0, "CTReconstructionSequence", "ConvolutionKernel"))
        if k is not None:
            safe["ConvolutionKernel"] = k
    row["safe"] = safe
    row["attrs"] = _selection_attrs(ds, row["n_frames"])
    terms = []
    for attr in deid.IDENTIFYING_ATTRIBUTES:
        terms += [str(v) for v in _as_list(_get(ds, attr)) if v]
    row["phi_terms"] = deid.identifying_terms(terms)


def _check_file_meta(values: "_HeaderValues", row: dict) -> None:
    """The file meta must name the instance the data set holds (PS3.10 7.1): a file whose
    MediaStorageSOPInstanceUID / ClassUID contradicts SOPInstanceUID / SOPClassUID is a broken
    copy (edited data set, stale meta) and never joins a series. Absent values are not checked."""
    for meta_tag, field_name in ((0x00020003, "sop_uid"), (0x00020002, "sop_class_uid")):  # MediaStorageSOPInstance/ClassUID
        v = _text(values.meta(meta_tag))
        if v and row[field_name] and v != row[field_name]:
            raise Reject("inconsistent_meta")


# What the index keeps for selection and splitting (`attrs`), beside the geometry. None is
# patient-identifying except SeriesDescription, which stays in the private index (rules match it
# there; only the rule's name leaves).
_ATTRS = ("BurnedInAnnotation", "ConversionType", "PresentationIntentType", "PatientOrientation",
          "SeriesDescription", *SPLIT_ATTRIBUTES)
# Per-frame homes of split attributes in Enhanced CT: (functional group sequence, attribute) → key.
_FRAME_ATTRS = {("FrameContentSequence", "TemporalPositionIndex"): "TemporalPositionIndex",
                ("FrameContentSequence", "FrameAcquisitionNumber"): "AcquisitionNumber",
                ("CTImageFrameTypeSequence", "FrameType"): "ImageType",
                ("ContrastBolusUsageSequence", "ContrastBolusAgentPhase"): "ContrastBolusAgentPhase"}


def _selection_attrs(ds, n_frames: int) -> dict:
    out = {}
    for kw in _ATTRS:
        v = _attr_value(_get(ds, kw))
        if v is not None:
            out[kw] = v
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence") if n_frames > 1 else None
    if per_frame:
        frames = []
        # one per functional group, at most: NumberOfFrames is the header's word (2³¹ in a hostile one)
        for i in range(min(n_frames, len(per_frame))):
            f = {}
            for (seq, attr), key in _FRAME_ATTRS.items():
                v = _attr_value(_functional(ds, i, seq, attr))
                if v is not None:
                    f[key] = v
            frames.append(f)
        if any(frames):
            out["frames"] = frames
    return out


_ROW_KEYWORDS = frozenset((
    "Modality", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID",
    "AccessionNumber", "ImageType", "Rows", "Columns", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "PixelSpacing", "ImagerPixelSpacing",
    "ImageOrientationPatient", "ImagePositionPatient", *_SCANNED_SAFE, *_ATTRS, *deid.IDENTIFYING_ATTRIBUTES))
_ROW_TAGS = tuple(sorted((kw, pydicom.datadict.tag_for_keyword(kw)) for kw in _ROW_KEYWORDS))
assert all(tag is not None for _, tag in _ROW_TAGS), "every keyword the row reads must be a DICOM keyword"
_ROW_KEYWORD_OF = {tag: kw for kw, tag in _ROW_TAGS}
_ROW_DICTIONARY_VR = {tag: pydicom.datadict.dictionary_VR(tag) for _, tag in _ROW_TAGS}
# pydicom treats these apart (a LUT descriptor's first value, the character set itself): no row reads them
assert not {_CHARSET_TAG, *pydicom.tag._LUT_DESCRIPTOR_TAGS} & set(_ROW_KEYWORD_OF)


def _attr_value(v):
    """A selection attribute as plain text (multi-valued joined with backslashes), or None."""
    if v is None:
        return None
    try:
        items = [str(x).strip() for x in _as_list(v)]
    except Exception:  # noqa: BLE001 — undecodable text
        return None
    text = "\\".join(items)
    return text[:256] if text else None


def _geometry(ds, n_frames: int):
    """Pixel spacing, orientation and one position per frame; classic or Enhanced (functional groups).

    Anything malformed or non-finite is None (a NaN position would sort anywhere and pass every
    spacing test, since NaN comparisons are all False).
    """
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame:
        ps = _functional(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
        iop = _functional(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
        positions = []
        for i in range(len(per_frame)):
            positions.append(_floats(_functional(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3))
        if not positions or any(p is None for p in positions):
            positions = None
    else:
        ps = _get(ds, "PixelSpacing") or _get(ds, "ImagerPixelSpacing")
        iop = _get(ds, "ImageOrientationPatient")
        ipp = _floats(_get(ds, "ImagePositionPatient"), 3)
        positions = [ipp] if ipp is not None else None
    ps = _floats(ps, 2)
    if ps is not None and min(ps) <= 0:  # some CR writers put 0\0: unknown, not zero
        ps = None
    return ps, _floats(iop, 6), positions


_PER_FRAME, _SHARED = 0x52009230, 0x52009229  # Per-frame / Shared Functional Groups Sequence


def _functional(ds, frame: int, seq: str, attr: str):
    """An attribute from the per-frame functional group `frame`, falling back to the shared group.

    Never raises: a malformed functional group reads as absent.
    """
    tags = getattr(ds, "_dict", None)
    if tags is not None and _PER_FRAME not in tags and _SHARED not in tags:
        return None  # what the lookups below find in a single-frame file, without two keyword lookups
    for name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        try:
            groups = ds.get(name)
            if not groups:
                continue
            item = groups[frame] if len(groups) > frame else groups[0]
            inner = item.get(seq)
            if inner and attr in inner[0]:
                return inner[0].get(attr)
        except Exception:  # noqa: BLE001 — malformed sequence content
            continue
    return None


_PIXEL_VRS = (b"OB", b"OW", b"UN", b"OD", b"OF", b"OL", b"OV")
_SEQ_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _check_pixel_data_extent(fileobj, transfer_syntax, size: int) -> None:
    """Detect truncation cheaply: the Pixel Data element must end within the file.

    After a `stop_before_pixels` read the file sits at the Pixel Data tag (or at EOF, when the
    file was cut before it). Native pixel data: the declared length must fit. Encapsulated
    (compressed) data: the file normally ends with the Sequence Delimitation Item (one 8-byte
    read); if it does not (trailing padding follows, or the file is cut) the fragment items are
    walked header by header, each of which must fit, up to the delimiter. Deflated files were
    decompressed whole by the header read, where a cut already showed.

    Byte order and explicit/implicit VR are taken from the element's own bytes, not the transfer
    syntax: writers exist that encode the data set differently from what they declare, and
    pydicom reads those by the same sniffing.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return
    pos = fileobj.tell()
    hdr = fileobj.read(12)
    if len(hdr) < 8:
        raise Reject("truncated")  # the file ends where the pixel data should begin
    if hdr[:4] == b"\xe0\x7f\x10\x00":
        little = True
    elif hdr[:4] == b"\x7f\xe0\x00\x10":
        little = False
    elif hdr[:4] in (b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09"):
        return  # float pixel data: no CT/X-ray image uses it; decoding decides
    else:
        # pydicom stopped on something that is neither pixel data nor the end of the file
        # (an item delimiter at the top level): the data set structure is broken.
        raise Reject("unreadable_header")
    if hdr[4:6] in _PIXEL_VRS and hdr[6:8] == b"\0\0":
        if len(hdr) < 12:
            raise Reject("truncated")
        (length,) = struct.unpack("<I" if little else ">I", hdr[8:12])
        start = pos + 12
    else:
        (length,) = struct.unpack("<I" if little else ">I", hdr[4:8])
        start = pos + 8
    if length != 0xFFFFFFFF:
        if start + length > size:
            raise Reject("truncated")
        return
    fileobj.seek(max(0, size - 8))
    if fileobj.read(8) == _SEQ_DELIMITER:
        return
    p = start  # encapsulated items are always little endian (PS3.5 A.4)
    while True:
        fileobj.seek(p)
        item = fileobj.read(8)
        if len(item) < 8:
            raise Reject("truncated")
        group, elem, n = struct.unpack("<HHI", item)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000) or n == 0xFFFFFFFF:
            raise Reject("decode_error")  # not a fragment: the encapsulation itself is corrupt
        p += 8 + n
        if p > size:
            raise Reject("truncated")


def _group_key(row: dict) -> str:
    rules = _RULES.get(kinds.of_modality(row["modality"] or ""))
    uid = row[rules.group_field] if rules else None
    return f"{rules.group_prefix}:{uid}" if uid else "file:" + row["path"]


# ---------------------------------------------------------------------------------------------
# 2. Planning (headers only)
# ---------------------------------------------------------------------------------------------


@dataclass
class PlanContext:
    """What planning needs beyond the rows: recipe, pseudonymizer, table lookups."""

    recipe: IngestRecipe
    pseudo: deid.Pseudonymizer
    # (index row, byte budget) → digest of the file's decoded pixels (`pixel_digest`), asked only
    # for files sharing a SOPInstanceUID; raises Reject. Default: read the row's path locally.
    pixel_digest: Callable[[dict, int], str] | None = None

    def digest(self, row: dict, limit: int) -> str:
        if self.pixel_digest is not None:
            return self.pixel_digest(row, limit)
        with open(row["path"], "rb") as f:
            return pixel_digest(f.read(), limit)


@dataclass
class PlanItem:
    """One work item of the plan: a sample to build (`status == "planned"`) or the disposition of
    input files that will not become one (`"rejected"` / `"skipped"`, with a reason code).

    The fields below `frames` are set on planned items only. `accession`, `study_uid` and
    `phi_terms` are private (table join keys, report redaction terms): used while building,
    never written to DEST.
    """

    status: str  # "planned" | "rejected" | "skipped"
    reason: str | None  # a code from REJECT_REASONS / SKIP_REASONS; None when planned
    paths: list[str]  # slices in planned order (CT) / the file (X-ray) / the disposed files
    all_paths: list[str]  # every input file the item accounts for (a CT's dropped duplicates too)
    kind: kinds.ImageKind | None = None
    key: str | None = None  # sample key: series pseudonym (CT), image pseudonym (X-ray)
    split: str | None = None
    est_bytes: int = 0  # estimated stored size, for shard counts
    # Planned: the largest decoded pixel data of one of its files, as the headers declared it
    # and the budget allowed; decoding refuses a file that now declares more (`too_large`).
    decode_bytes: int = 0
    detail: str | None = None  # dispositions: a figure for the private ledger (`Reject.detail`)
    frames: list[int] = field(default_factory=list)  # per path: frame index, -1 = single-frame file
    modality: str | None = None
    patient: str | None = None  # pseudonyms
    study: str | None = None
    series: str | None = None
    safe: dict = field(default_factory=dict)  # allow-listed header values (deid.SAFE_ATTRIBUTES)
    transfer_syntax: str | None = None
    source_shape: list[int] | None = None  # [slices, rows, cols] (CT) / [rows, cols] (X-ray)
    source_spacing_mm: list[float] | None = None  # same axes; None: an X-ray without spacing
    source_affine: list[list[float]] | None = None  # CT: (i, j, k, 1) -> LPS mm, planned order
    n_files: int = 0
    accession: str = ""
    study_uid: str = ""
    phi_terms: list[str] = field(default_factory=list)
    # CT: the acquisition of a split series ("AcquisitionNumber=2"); its key is "<series>-<8 hex>".
    sub_series: str | None = None
    selected_by: str | None = None  # CT: the series rule that kept it (None: no rule matched, default keep)
    flip: list[str] = field(default_factory=list)  # X-ray: display flips applied ("horizontal", "vertical")
    orientation: list[str] | None = None  # X-ray: PatientOrientation (row, column) once flipped; None: not recognised

    def join_key(self, attribute: str) -> str:
        """This item's value of a table join attribute (`config.TableConfig.join_on`)."""
        return {"AccessionNumber": self.accession, "StudyInstanceUID": self.study_uid}[attribute]


def plan_group(rows: list[dict], ctx: PlanContext) -> list[PlanItem]:
    """Index rows of one group → plan items: samples to build, and per-file rejects/skips.

    Every input row ends up in exactly one item's `all_paths` (a disposition's `all_paths`
    equals its `paths`), which is what makes the manifest's accounting
    (seen = used + skipped + rejected) hold by construction. A group normally holds one CT
    series or one radiograph (see `_group_key`); rows of different kinds that arrive together
    anyway are planned apart, never stacked into one volume.
    """
    out: list[PlanItem] = []
    by_kind: dict[kinds.ImageKind, list[dict]] = {}
    for r in rows:
        kind = kinds.of_modality(r["modality"] or "") if r["status"] == "ok" else None
        why = _file_disposition(r, kind, ctx)
        if why is not None:
            out.append(_disposition([r], *why))
        else:
            by_kind.setdefault(kind, []).append(r)
    for kind, krows in by_kind.items():
        rules = _RULES[kind]
        krows, copies = _dedupe_instances(krows, kind, ctx)
        out += copies
        # A CT series is one sample of all its rows (or one per acquisition); each radiograph is a
        # sample of its own.
        for sample_rows in [[r] for r in krows] if rules.per_file else [krows]:
            out += rules.plan(sample_rows, ctx)
    return out


def _attempt(plan: Callable[[list[dict], PlanContext], PlanItem], rows: list[dict], ctx: PlanContext) -> list[PlanItem]:
    try:
        return [plan(rows, ctx)]
    except Reject as rej:
        return [_disposition(rows, "rejected", rej.reason, rej.detail)]


def pixel_digest(data: bytes, limit: int) -> str:
    """SHA-256 of a file's decoded pixel values (and the rescale and photometric that give them
    meaning), whatever the transfer syntax: equal digests = identical images. Raises Reject."""
    return _safely(_pixel_digest, data, limit)


def _pixel_digest(data: bytes, limit: int) -> str:
    ds, arr = _decode_pixels(data, limit)
    h = hashlib.sha256(repr((arr.shape, _rescale(ds, -1), _str(ds, "PhotometricInterpretation"))).encode())
    values = arr.astype(np.int64 if arr.dtype.kind in "iub" else np.float64, copy=False)
    h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


def _dedupe_instances(rows: list[dict], kind: kinds.ImageKind, ctx: PlanContext) -> tuple[list[dict], list[PlanItem]]:
    """Files sharing a SOPInstanceUID (a copy in another folder, another transfer syntax, a
    re-send) → (the rows to plan, dispositions of the others). Identical decoded pixels: the first
    copy by path is used, the rest `skipped: duplicate_instance`; different pixels: every copy
    `rejected: conflicting_instance`. A multi-frame file is one instance of all its frames, so its
    copies are compared frame for frame. Copies past the kind's budget (or without one) are left
    to planning, which refuses them without decoding."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["sop_uid"] or "path:" + r["path"], []).append(r)
    if all(len(g) == 1 for g in groups.values()):
        return rows, []
    budget = 2 * (ctx.recipe.ct.max_voxels if kind is kinds.CT else ctx.recipe.xray.max_pixels)
    kept: list[dict] = []
    out: list[PlanItem] = []
    for copies in groups.values():
        copies = sorted(copies, key=lambda r: r["path"])
        if len(copies) == 1 or any(not r.get("pixel_bytes") or r["pixel_bytes"] > budget for r in copies):
            kept += copies
            continue
        digests: dict[str, str] = {}
        for r in copies:
            try:
                digests[r["path"]] = ctx.digest(r, budget)
            except Reject as rej:
                out.append(_disposition([r], "rejected", rej.reason, rej.detail))
        good = [r for r in copies if r["path"] in digests]
        if len(set(digests.values())) > 1:
            out.append(_disposition(good, "rejected", "conflicting_instance"))
        elif good:
            kept.append(good[0])
            if len(good) > 1:
                out.append(_disposition(good[1:], "skipped", "duplicate_instance"))
    return kept, out


def _file_disposition(r: dict, kind: kinds.ImageKind | None, ctx: PlanContext) -> tuple[str, str] | None:
    """(status, reason) for a file that is not used, from its own row alone; None to plan it."""
    if r["status"] != "ok":
        return "rejected", r["reason"]
    if kind is None:
        return "rejected", "unsupported_modality"
    if r["modality"] not in ctx.recipe.modalities:
        return "skipped", "modality_not_selected"
    attrs = r.get("attrs") or {}
    if _burned_in(r, attrs) and not ctx.recipe.deid.allow_burned_in:
        return "rejected", "burned_in_annotation"
    sc_ok = kind is kinds.XRAY and ctx.recipe.deid.allow_burned_in and r["sop_class_uid"] in SECONDARY_CAPTURE
    if r["sop_class_uid"] not in _RULES[kind].sop_classes and not sc_ok:
        return "rejected", "unsupported_sop_class"
    if "LOCALIZER" in (r["image_type"] or "").upper():
        return "skipped", "localizer"
    if kind is kinds.XRAY:
        return _intent_disposition(r, attrs, ctx.recipe.xray.presentation_intent)
    return None


DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


def _burned_in(r: dict, attrs: dict) -> bool:
    """Pixels that may show names or IDs (PS3.15 Annex E, Clean Pixel Data): the header says so,
    the SOP class is a Secondary Capture, or it is a screen capture (ConversionType WSD, a
    SCREEN SAVE image type)."""
    return (
        attrs.get("BurnedInAnnotation", "").upper() == "YES"
        or r["sop_class_uid"] in SECONDARY_CAPTURE
        or attrs.get("ConversionType", "").upper() == "WSD"
        or "SCREEN" in (r["image_type"] or "").upper()
    )


def _intent_disposition(r: dict, attrs: dict, keep: str) -> tuple[str, str] | None:
    """PresentationIntentType (the DX For Processing SOP class implies it): keep the intent the
    recipe names (`xray.presentation_intent`) and images without one (CR); skip the other."""
    intent = attrs.get("PresentationIntentType", "").upper()
    if not intent and r["sop_class_uid"] == DX_FOR_PROCESSING:
        intent = "FOR PROCESSING"
    if intent == "FOR PROCESSING" and keep == "presentation":
        return "skipped", "for_processing"
    if intent == "FOR PRESENTATION" and keep == "processing":
        return "skipped", "for_presentation"
    return None


def _disposition(rows: list[dict], status: str, reason: str, detail: str | None = None) -> PlanItem:
    paths = [r["path"] for r in rows]
    return PlanItem(status=status, reason=reason, paths=paths, all_paths=list(paths), detail=detail)


def _check_budget(rows: list[dict], pixels: int, key: str) -> int:
    """Refuse, from the headers alone, files a decoder would expand beyond `pixels` 16-bit
    pixels (rows × columns × frames × samples × bits allocated / 16 > pixels), and files much
    larger than that (a native Pixel Data element declaring more than the image, trailing junk):
    `too_large`, with the figure. Returns the largest declared pixel bytes (what may be decoded)."""
    limit = 2 * pixels
    largest = 0
    for r in rows:
        n = r.get("pixel_bytes")
        if n is None:
            raise Reject("decode_error")  # no Rows/Columns/BitsAllocated: nothing can decode it
        if n > limit:
            raise Reject("too_large", f"{n} pixel bytes declared > {limit} ({key} x 2 B)")
        if r["size"] > 2 * n + HEADER_LIMITS.max_bytes:
            raise Reject("too_large", f"{r['size']} file bytes for {n} pixel bytes")
        largest = max(largest, n)
    return largest


def _monochrome(r: dict) -> bool:
    # HU and presentation values come from a single sample per pixel.
    return r["safe"].get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")


def _plan_ct_series(rows: list[dict], ctx: PlanContext) -> list[PlanItem]:
    """The rows of one CT series → its items: skipped by a selection rule (`series.rules`), or one
    volume per acquisition (`_split_acquisitions`), each planned (or rejected) on its own."""
    rule, keep = select_series(rows, ctx.recipe.series)
    if not keep:
        return [_series_disposition(rows, "skipped", f"rule:{rule}" if rule else "no_rule", ctx)]
    try:
        _check_ct_rows(rows)
        parts = _split_acquisitions(rows, ctx.recipe.ct)
    except Reject as rej:
        return [_series_disposition(rows, "rejected", rej.reason, ctx, rej.detail)]
    out: list[PlanItem] = []
    claimed: set[str] = set()  # a multi-frame file split across acquisitions counts in the first
    for sub, part in parts:
        paths = [r["path"] for r in part if r["path"] not in claimed]
        claimed.update(paths)
        try:
            item = _plan_ct(part, ctx)
        except Reject as rej:
            if paths:
                out.append(_series_disposition([r for r in part if r["path"] in paths], "rejected", rej.reason, ctx, rej.detail))
            continue
        item.all_paths, item.selected_by = paths, rule
        if sub is not None:
            item.sub_series = sub
            item.key = f"{item.series}-{hashlib.sha256(sub.encode()).hexdigest()[:8]}"
        out.append(item)
    return out


def _series_disposition(rows: list[dict], status: str, reason: str, ctx: PlanContext, detail: str | None = None) -> PlanItem:
    """A whole series' disposition, with its pseudonyms (what `radforge inspect` lists per study)."""
    item = _disposition(rows, status, reason, detail)
    first = rows[0]
    item.modality = first["modality"]
    item.study = ctx.pseudo("study", first["study_uid"] or "")
    item.series = ctx.pseudo("series", first["series_uid"] or "")
    return item


def series_plane(iop) -> str | None:
    """Acquisition plane from ImageOrientationPatient: the patient axis the slice normal is within
    ~18° of (axial: z, coronal: y, sagittal: x), else oblique; None without a usable IOP."""
    if iop is None:
        return None
    n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    norm = float(np.linalg.norm(n))
    if not norm > 1e-6:
        return None
    a = np.abs(n / norm)
    return {0: "sagittal", 1: "coronal", 2: "axial"}[int(a.argmax())] if a.max() >= 0.95 else "oblique"


def select_series(rows: list[dict], cfg: SeriesConfig) -> tuple[str | None, bool]:
    """(name of the first rule the series matches or None, keep?) from its headers alone."""
    for rule in cfg.rules:
        if _rule_matches(rule, rows):
            return rule.name, rule.action == "keep"
    return None, cfg.default == "keep"


def _rule_matches(rule: SeriesRule, rows: list[dict]) -> bool:
    first = rows[0]
    attrs, safe = first.get("attrs") or {}, first.get("safe") or {}
    if rule.image_type and not set(rule.image_type) <= {v.strip().upper() for v in (first["image_type"] or "").split("\\")}:
        return False
    for pattern, value in ((rule.series_description, attrs.get("SeriesDescription")), (rule.kernel, safe.get("ConvolutionKernel"))):
        if pattern is not None:
            text = "\\".join(map(str, value)) if isinstance(value, list) else value
            if text is None or not re.search(pattern, str(text), re.IGNORECASE):
                return False
    if rule.slice_thickness_mm is not None:
        t = _floats(safe.get("SliceThickness"), 1)
        if t is None or not rule.slice_thickness_mm[0] <= t[0] <= rule.slice_thickness_mm[1]:
            return False
    if rule.plane and series_plane(first["iop"]) not in rule.plane:
        return False
    n = len({tuple(np.round(p, 2)) for r in rows for p in (r["positions"] or [])})
    return n >= rule.min_slices


def choose_per_study(series: list[dict], cfg: SeriesConfig) -> dict[str, str]:
    """`series.per_study` over the planned CT volumes of a run: `series` holds one dict per
    volume (key, study, series pseudonyms, selected_by, slice_thickness) → {key: skip reason} of
    the volumes not chosen. A chosen series keeps all its acquisitions."""
    if cfg.per_study == "all":
        return {}
    rank = {r.name: i for i, r in enumerate(cfg.rules)}

    def order(v: dict):
        t = v.get("slice_thickness")
        thick = t if isinstance(t, (int, float)) and math.isfinite(t) else math.inf
        by_rule = rank.get(v.get("selected_by"), len(rank))
        return (by_rule, thick, v["series"]) if cfg.per_study == "first_match" else (thick, by_rule, v["series"])

    by_study: dict[str, list[dict]] = {}
    for v in series:
        by_study.setdefault(v["study"], []).append(v)
    drops = {}
    for vols in by_study.values():
        chosen = min(vols, key=order)["series"]
        drops.update({v["key"]: f"per_study:{cfg.per_study}" for v in vols if v["series"] != chosen})
    return drops


def _split_acquisitions(rows: list[dict], cfg: CTConfig) -> list[tuple[str | None, list[dict]]]:
    """[(sub-series key or None, rows)]: the series whole, or one part per acquisition when its
    repeated slice positions are told apart by `cfg.split_acquisitions_by` (one attribute at a
    time in order, then all of those that vary together; the split leaving fewest repeats wins,
    every part holding at least two frames). Frames of a multi-frame file are split too (rows
    restricted to some frames carry `_frames`, their indices in the file)."""
    normal = _slice_axes(np.array(rows[0]["iop"]))[2]
    frames = [(r, f, float(np.dot(p, normal))) for r in rows for f, p in enumerate(r["positions"])]
    base = _repeats([z for _, _, z in frames])
    if not base:
        return [(None, rows)]
    varying = [a for a in cfg.split_acquisitions_by if len({_frame_attr(r, f, a) for r, f, _ in frames}) > 1]
    best = None
    for cand in [[a] for a in varying] + ([varying] if len(varying) > 1 else []):
        parts: dict[tuple, list] = {}
        for r, f, z in frames:
            parts.setdefault(tuple(_frame_attr(r, f, a) or "" for a in cand), []).append((r, f, z))
        if len(parts) < 2 or min(map(len, parts.values())) < 2:
            continue
        left = sum(_repeats([z for _, _, z in p]) for p in parts.values())
        if left < base and (best is None or left < best[0]):
            best = (left, cand, parts)
    if best is None:
        return [(None, rows)]
    _, cand, parts = best
    return [(",".join(f"{a}={v}" for a, v in zip(cand, vals)), _part_rows(p)) for vals, p in sorted(parts.items())]


def _repeats(z: list[float]) -> int:
    """Frames at a position already taken (the criterion `_ordered_slices` rejects on)."""
    if len(z) < 2:
        return 0
    steps = np.diff(np.sort(np.asarray(z)))
    return int((steps < 1e-3 * max(1.0, float(np.median(np.abs(steps))))).sum())


def _frame_attr(r: dict, f: int, attr: str):
    attrs = r.get("attrs") or {}
    per_frame = attrs.get("frames") or []
    if f < len(per_frame) and attr in per_frame[f]:
        return per_frame[f][attr]
    return attrs.get(attr)


def _part_rows(part: list[tuple[dict, int, float]]) -> list[dict]:
    frames: dict[str, tuple[dict, list[int]]] = {}
    for r, f, _ in part:
        frames.setdefault(r["path"], (r, []))[1].append(f)
    out = []
    for r, fs in frames.values():
        whole = len(fs) == len(r["positions"])
        out.append(r if whole else {**r, "positions": [r["positions"][f] for f in fs], "_frames": fs})
    return out


def _plan_ct(rows: list[dict], ctx: PlanContext) -> PlanItem:
    """The rows of one CT series → a planned volume: slices ordered along the slice normal,
    validated (gaps, tilt, spacing, stacking) and its source affine computed."""
    cfg = ctx.recipe.ct
    first = rows[0]
    _check_ct_rows(rows)
    decode_bytes = _check_budget(rows, cfg.max_voxels, "ct.max_voxels")
    iop0 = np.array(first["iop"])
    ps0 = np.array(first["pixel_spacing"])
    col_dir, row_dir, normal = _slice_axes(iop0)
    slices, z = _ordered_slices(rows, normal, cfg)
    step, travel = _check_stacking(slices, z, normal, float(ps0.min()), cfg)
    n = len(slices)
    if n * first["rows"] * first["cols"] > cfg.max_voxels:
        raise Reject("too_large", f"{n * first['rows'] * first['cols']} voxels > {cfg.max_voxels} (ct.max_voxels)")
    src_spacing = [step, float(ps0[0]), float(ps0[1])]  # z, y (row spacing), x (column spacing)
    src_shape = [n, int(first["rows"]), int(first["cols"])]
    out_shape = [max(1, round(src_shape[i] * src_spacing[i] / cfg.spacing_mm[i])) for i in range(3)]
    # Affine (i, j, k, 1) -> LPS mm: columns step along the first IOP cosine by the column spacing.
    affine = np.eye(4)
    affine[:3, 0] = col_dir * ps0[1]
    affine[:3, 1] = row_dir * ps0[0]
    affine[:3, 2] = travel / (n - 1) if n > 1 else normal * step
    affine[:3, 3] = slices[0][1]
    item = _sample_item(kinds.CT, first, rows, ctx)
    item.paths = [s[2] for s in slices]
    item.frames = [s[3] for s in slices]
    # Files dropped as duplicates still count as used inputs of this series.
    item.all_paths = [r["path"] for r in rows]
    item.est_bytes = int(np.prod(out_shape)) * 2
    item.decode_bytes = decode_bytes
    item.source_shape, item.source_spacing_mm = src_shape, src_spacing
    item.source_affine = affine.tolist()
    return item


def _check_ct_rows(rows: list[dict]) -> None:
    """Every row has complete, monochrome geometry, and all rows share matrix, IOP and spacing."""
    for r in rows:
        if r["iop"] is None or r["pixel_spacing"] is None or not r["positions"] or not r["rows"] or not r["cols"]:
            raise Reject("missing_geometry")
        # One position per frame; a multi-frame file whose per-frame groups disagree with
        # NumberOfFrames would otherwise plan frames the decoder does not have.
        if len(r["positions"]) != (len(r["_frames"]) if "_frames" in r else (r["n_frames"] or 1)):
            raise Reject("missing_geometry")
    for r in rows:
        if not _monochrome(r):  # colour "CT" cannot be rescaled to HU
            raise Reject("unsupported_photometric")
    first = rows[0]
    iop0, ps0 = first["iop"], first["pixel_spacing"]
    # The slices of a series mostly repeat the first one's IOP and spacing exactly, and
    # np.allclose of equal finite values is True: those skip it (~0.1 ms a call, 85 % of
    # planning a 1024-slice corpus).
    try:
        finite = type(iop0) is list and type(ps0) is list and all(math.isfinite(v) for v in (*iop0, *ps0))
    except TypeError:
        finite = False
    for r in rows[1:]:
        if r["rows"] != first["rows"] or r["cols"] != first["cols"]:
            raise Reject("mixed_geometry")
        if finite and type(r["iop"]) is list and type(r["pixel_spacing"]) is list \
                and r["iop"] == iop0 and r["pixel_spacing"] == ps0:
            continue
        if (
            not np.allclose(r["iop"], iop0, atol=1e-3)
            or not np.allclose(r["pixel_spacing"], ps0, rtol=1e-3)
        ):
            raise Reject("mixed_geometry")


def _slice_axes(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(column direction, row direction, slice normal), unit vectors, from one IOP.

    IOP's first triplet is the direction in which the column index i grows (along a row), the
    second the direction of the row index j. Both must be unit and orthogonal, else the affine
    would scale or shear the volume.
    """
    col_dir, row_dir = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(col_dir) - 1) > 1e-2
        or abs(np.linalg.norm(row_dir) - 1) > 1e-2
        or abs(float(np.dot(col_dir, row_dir))) > 1e-2
    ):
        raise Reject("missing_geometry")
    col_dir, row_dir = col_dir / np.linalg.norm(col_dir), row_dir / np.linalg.norm(row_dir)
    normal = np.cross(col_dir, row_dir)
    return col_dir, row_dir, normal / np.linalg.norm(normal)


def _ordered_slices(rows: list[dict], normal: np.ndarray, cfg) -> tuple[list[tuple], np.ndarray]:
    """Every frame as (projection on the normal, position, path, frame index), sorted along the
    normal, duplicates rejected or dropped per `cfg.duplicate_positions`; and the projections."""
    slices = []
    for r in rows:
        index = r.get("_frames") or (range(len(r["positions"])) if r["n_frames"] > 1 else [-1])
        for f, p in zip(index, r["positions"]):
            slices.append((float(np.dot(p, normal)), p, r["path"], f))
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
    return slices, z


def _check_stacking(slices: list[tuple], z: np.ndarray, normal: np.ndarray, min_pixel: float, cfg):
    """(median slice step, first → last slice vector) of ordered slices that form one regular
    stack: no gantry tilt, uniform steps, every slice on the line from the first to the last."""
    steps = np.diff(z)
    step = float(np.median(steps))
    if step <= 0:
        raise Reject("duplicate_position")
    # Gantry tilt: consecutive positions step off the slice normal.
    pos = np.array([s[1] for s in slices], dtype=np.float64)
    travel = pos[-1] - pos[0]
    cosang = abs(float(np.dot(travel, normal))) / max(float(np.linalg.norm(travel)), 1e-9)
    if math.degrees(math.acos(min(1.0, cosang))) > cfg.max_tilt_deg:
        raise Reject("gantry_tilt")
    dev = np.abs(steps - step) / step
    if (dev > cfg.spacing_tolerance).any():
        raise Reject("slice_gap" if (steps > step * 1.5).any() else "nonuniform_spacing")
    # The affine places slice k at first + k * travel / (n - 1), so a slice shifted in-plane (a
    # second stack glued into the series) would be silently misplaced by up to its offset.
    frac = (z - z[0]) / (z[-1] - z[0]) if len(slices) > 1 else np.zeros(1)
    off = np.linalg.norm(pos - (pos[0] + frac[:, None] * travel), axis=1)
    if (off > 0.5 * min_pixel).any():
        raise Reject("mixed_geometry")
    return step, travel


def _plan_xray(rows: list[dict], ctx: PlanContext) -> PlanItem:
    """One radiograph's row (a one-row list) → a planned image."""
    (r,) = rows
    if not r["rows"] or not r["cols"]:
        raise Reject("missing_geometry")
    decode_bytes = _check_budget(rows, ctx.recipe.xray.max_pixels, "xray.max_pixels")
    if not _monochrome(r):
        raise Reject("unsupported_photometric")
    if (r["n_frames"] or 1) != 1:
        raise Reject("unsupported_sop_class")
    item = _sample_item(kinds.XRAY, r, rows, ctx)
    item.key = ctx.pseudo("image", r["sop_uid"] or r["path"])
    longest = ctx.recipe.xray.longest_side
    scale = min(1.0, longest / max(r["rows"], r["cols"]))
    item.est_bytes = int(r["rows"] * scale) * int(r["cols"] * scale) * 2
    item.source_shape = [int(r["rows"]), int(r["cols"])]
    if r["pixel_spacing"]:
        item.source_spacing_mm = list(r["pixel_spacing"])
    item.frames = [-1]
    item.decode_bytes = decode_bytes
    item.flip, item.orientation = display_flips((r.get("attrs") or {}).get("PatientOrientation"), r["safe"].get("ViewPosition"))
    return item


VIEWS = {"PA": "frontal", "AP": "frontal", "LL": "lateral", "RL": "lateral"}  # ViewPosition → view


def display_flips(patient_orientation: str | None, view_position) -> tuple[list[str], list[str] | None]:
    """(flips, orientation after them) that store a radiograph the same way every time: rows
    toward the patient's left (frontal; toward posterior for a lateral view: the patient faces
    the viewer's left) and columns toward the feet. From PatientOrientation (row direction \\
    column direction, PS3.3 C.7.6.1.1.1); unrecognised or rotated (rows along head-feet): no
    flip, orientation None."""
    parts = [p.strip().upper()[:1] for p in (patient_orientation or "").split("\\")]
    if len(parts) != 2 or parts[0] not in "LRAP" or parts[1] not in "HF" or not all(parts):
        return [], None
    row, col = parts
    flips = []
    if row in ("R", "A"):
        flips.append("horizontal")
        row = {"R": "L", "A": "P"}[row]
    if col == "H":
        flips.append("vertical")
        col = "F"
    return flips, [row, col]


def _sample_item(kind: kinds.ImageKind, first: dict, rows: list[dict], ctx: PlanContext) -> PlanItem:
    """A planned item's identity (pseudonyms, key, split) and private fields, from its rows."""
    pseudo = ctx.pseudo
    patient = pseudo("patient", first["patient_id"] or ("nopatient:" + (first["study_uid"] or "")))
    # Without a SeriesInstanceUID each file is a group of its own (`_group_key`): its path keys
    # it, so two such volumes never share a sample key.
    series = pseudo("series", first["series_uid"] or "nouid:" + first["path"])
    paths = [r["path"] for r in rows]
    return PlanItem(
        status="planned",
        reason=None,
        paths=list(paths),
        all_paths=paths,
        kind=kind,
        key=series,
        split=pseudo.split(patient, ctx.recipe.splits),
        modality=first["modality"],
        patient=patient,
        study=pseudo("study", first["study_uid"] or ""),
        series=series,
        safe=dict(first["safe"]),
        transfer_syntax=first["transfer_syntax"],
        n_files=len(rows),
        accession=first["accession"] or "",
        study_uid=first["study_uid"] or "",
        phi_terms=sorted({t for r in rows for t in (r["phi_terms"] or [])}, key=len, reverse=True),
    )


# ---------------------------------------------------------------------------------------------
# 3. Pixels
# ---------------------------------------------------------------------------------------------


def _decode(data: bytes, limits: HeaderLimits = HEADER_LIMITS) -> pydicom.Dataset:
    """The whole data set of a planned file, under the header caps again (the bytes read now
    may not be those scanned), with room for the pixel data, which is in memory already."""
    try:
        return _with_slice_elements(_decode_explicit_le(data, limits))
    except _Unhandled:  # Deflated among them: its file meta says so before the data set is walked
        pass
    if _meta_transfer_syntax(io.BytesIO(data)) == DeflatedExplicitVRLittleEndian:
        _check_inflated_size(io.BytesIO(data), limits.max_inflated_bytes)
    f = _Reader(io.BytesIO(data), dataclasses.replace(limits, max_bytes=limits.max_bytes + len(data)), prefix=data)
    try:
        ds = pydicom.dcmread(f)
    except zlib.error as e:  # a Deflated data set cut short
        raise Reject("truncated" if "-5" in str(e) else "unreadable_header") from None
    except Exception:  # noqa: BLE001
        raise Reject("unreadable_header") from None
    return _with_slice_elements(ds)


# The elements every slice's decode and HU read (the image pixel module, rescale: ~13
# conversions a slice, by pydicom's decoder, `declared_pixel_bytes` and `_rescale`), their
# values converted once per distinct raw value: the slices of a series repeat them byte for
# byte (not always at the same offsets: UIDs vary in length). Only VRs whose conversion reads
# nothing but the VR, the bytes and their byte order (pydicom's `convert_value`: not the data
# set, not the character set), so a value converted in one data set is the one any other
# would convert. The values are only read (by pydicom and here), never changed.
_SLICE_TAGS = tuple(pydicom.datadict.tag_for_keyword(k) for k in (
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames", "RescaleSlope", "RescaleIntercept"))
_SLICE_VRS = frozenset(("US", "CS", "IS", "DS"))
_SLICE_VALUES: dict[tuple, tuple] = {}  # (tag, VR, bytes, little endian) → (VR, value)


def _with_slice_elements(ds: pydicom.FileDataset) -> pydicom.FileDataset:
    """`ds` with its `_SLICE_TAGS` elements converted, each as `ds[tag]` converts it (the
    DataElement `convert_raw_data_element` makes: this file's offset, the value an earlier file
    with the same bytes converted to, from `_SLICE_VALUES`). One that fails to convert stays
    raw (and fails again where it is read, as it would have)."""
    elems = ds._dict  # tag → RawDataElement | DataElement, as read (pydicom 3 internal)
    for tag in _SLICE_TAGS:
        raw = elems.get(tag)
        if type(raw) is not _RawDataElement or raw.VR not in _SLICE_VRS or raw.value is None:
            continue
        key = (raw.tag, raw.VR, raw.value, raw.is_little_endian)
        known = _SLICE_VALUES.get(key)
        if known is not None:
            # what ds[tag] would store (a public, non-sequence tag of an unambiguous VR)
            elems[tag] = pydicom.DataElement(raw.tag, known[0], known[1], raw.value_tell, raw.length == 0xFFFFFFFF,
                                             already_converted=True)
            continue
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 — malformed: left for the reader to meet
            continue
        if len(_SLICE_VALUES) >= _WALKED_MAX:
            _SLICE_VALUES.clear()
        _SLICE_VALUES[key] = elem.VR, elem.value
    return ds


class _Unhandled(Exception):
    """`_decode_explicit_le` met something it leaves to pydicom's own reader."""


_LE_HEADER = struct.Struct("<HH2sH")
_LE_LENGTH = struct.Struct("<L")
_ENCODED_VRS = frozenset(vr.value.encode() for vr in pydicom.valuerep.VR if len(vr.value) == 2)
_LONG_LENGTH_VRS = frozenset(vr.encode() for vr in pydicom.valuerep.EXPLICIT_VR_LENGTH_32)


def _decode_explicit_le(data: bytes, limits: HeaderLimits) -> pydicom.FileDataset:
    """`pydicom.dcmread` of a whole file in memory, for the data sets every CT and radiograph
    archive is made of: Explicit VR Little Endian (native or encapsulated), no sequence of
    undefined length. The file meta and the data set are walked here over the bytes (one slice
    per value, no file call per element: pydicom's generator cost ~0.5 ms of a 512² slice's
    parse) into the same RawDataElements, Datasets and FileDataset that `read_partial` builds.
    Anything else (no preamble, implicit VR, big endian, Deflated, a private or missing transfer
    syntax, a command set, an undefined-length sequence, a value past the end, an unknown VR,
    more elements than `limits` allow) raises `_Unhandled` before any Dataset is made, and the
    caller reads the file with pydicom, which decides."""
    file_meta, raw, end, _ = _explicit_le_parts(data, [limits.max_elements // 2], pixels=True)
    # read_partial wraps read_dataset's Dataset: the same dict and parent encoding, and its
    # `_character_set` (what the FileDataset's encoding is set from) is read from that dict.
    fp = io.BytesIO(data)
    fp.seek(end)
    ds = pydicom.FileDataset(fp, raw, data[:128], file_meta, False, True)
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


def _scan_explicit_le(reader: "_Reader", limits: HeaderLimits) -> _HeaderValues:
    """`dcmread(reader, stop_before_pixels=True)` (`_read_header`'s read) walked over the bytes
    the reader has fetched first (`storage.head_first_range`), for an Explicit VR Little Endian
    header that ends, at a Pixel Data tag, inside them: the values the row reads of the same
    data set (`_HeaderValues.of_walk`, no Dataset made), and the reader left where pydicom leaves
    it (at that tag, no read short). `_Unhandled` otherwise (the header runs past those bytes, no
    pixel data, an undefined length, neither SOPClassUID nor Modality, anything
    `_decode_explicit_le` or `of_walk` leaves to pydicom), and the caller reads with pydicom. The
    caps: the reader's counts are set to at least what pydicom's reads would have counted
    (`_SCAN_COUNT_BOUND`), so a cap that pydicom's read would reach is reached, and `_scan` then
    reads the file with pydicom."""
    buf = reader.prefix()
    n_elements, n_bytes = limits.max_elements - _SCAN_COUNT_BOUND[1], (limits.max_bytes - 1024) // 2
    budget = [n_elements // 2]
    meta, raw, pos, walked = _explicit_le_parts(buf, budget, pixels=False, meta_dataset=False)
    if pos > n_bytes or (_SOP_CLASS_TAG not in raw and _MODALITY_TAG not in raw):
        raise _Unhandled
    values = _HeaderValues.of_walk(meta, raw)
    reader.seek(pos)
    reader.set_counts(elements=_SCAN_COUNT_BOUND[0] * walked + _SCAN_COUNT_BOUND[1], nbytes=2 * pos + 1024)
    return values


_SOP_CLASS_TAG, _MODALITY_TAG = 0x00080016, 0x00080060


# pydicom's header read counts at most 2 reads of 8 bytes per element (its header; a value of
# 8 bytes) and a few more (the file meta read again by `_meta_transfer_syntax`, peeks before
# the data set, the Pixel Data header); its bytes at most twice the header and 1 KiB.
_SCAN_COUNT_BOUND = (2, 64)


def _explicit_le_parts(data: bytes, budget: list, *, pixels: bool, meta_dataset: bool = True):
    """The file meta and data set of an Explicit VR Little Endian file over its bytes →
    (FileMetaDataset, data set elements, where the walk stopped, elements walked); with
    `pixels` False the walk stops at the first Pixel Data tag, as pydicom's
    `stop_before_pixels` read does; without `meta_dataset` the file meta is its elements as
    walked (tag → RawDataElement). `_Unhandled` for anything pydicom's own reader decides."""
    end = len(data)
    if end < 140 or data[128:132] != b"DICM":
        raise _Unhandled
    start_budget = budget[0]
    meta_raw: dict = {}
    pos = _walk_le(data, 132, meta_raw, budget, meta=True)
    if not meta_raw:
        raise _Unhandled
    if meta_dataset:
        file_meta, handled = _file_meta(meta_raw)
    else:
        file_meta, handled = meta_raw, _meta_handled(meta_raw)
    # A data set that starts with group 0000 has a command set: pydicom's.
    if not handled or end - pos < 8 or data[pos] == data[pos + 1] == 0:
        raise _Unhandled
    # read_dataset's VR check of the first element: two capital letters, else it would switch
    if not (0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B):
        raise _Unhandled
    raw: dict = {}
    stop = _walk_le(data, pos, raw, budget, meta=False, pixels=pixels)
    if (pixels and stop != end) or not raw:
        raise _Unhandled  # a few trailing bytes
    return file_meta, raw, stop, start_budget - budget[0]


def _file_meta(meta_raw: dict):
    """_read_file_meta_info's FileMetaDataset of the walked file meta elements (it wraps
    read_dataset's Dataset: the same dict and parent encoding; what else that Dataset holds is
    dropped with it) → (it, whether its transfer syntax reads as Explicit VR Little Endian)."""
    from pydicom.charset import default_encoding
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PrivateTransferSyntaxes

    file_meta = FileMetaDataset(meta_raw)
    file_meta.set_original_encoding(False, True, default_encoding)
    try:
        file_meta[next(iter(file_meta._dict))]  # pydicom's test of the explicit reading
        ts = file_meta[_TRANSFER_SYNTAX].value if _TRANSFER_SYNTAX in file_meta._dict else None
        # read_partial's cases: ExplicitVRLittleEndian and every other public syntax but
        # Implicit VR, Big Endian and Deflated read as Explicit VR Little Endian
        handled = (isinstance(ts, pydicom.uid.UID) and ts.is_transfer_syntax and not ts.is_private
                   and not ts.is_implicit_VR and ts.is_little_endian and not ts.is_deflated
                   and ts not in PrivateTransferSyntaxes)
    except Exception:  # noqa: BLE001
        handled = False
    return file_meta, handled


# `_file_meta`'s answer by what it depends on (the first element, the transfer syntax element),
# for the scan, which needs no FileMetaDataset: one per syntax in practice, up to _WALKED_MAX.
_META_HANDLED: dict[tuple, bool] = {}


def _meta_handled(meta_raw: dict) -> bool:
    key = (next(iter(meta_raw.values())), meta_raw.get(_TRANSFER_SYNTAX))
    handled = _META_HANDLED.get(key)
    if handled is None:
        handled = _file_meta(dict(meta_raw))[1]  # a copy: the FileMetaDataset converts into its dict
        if len(_META_HANDLED) >= _WALKED_MAX:
            _META_HANDLED.clear()
        _META_HANDLED[key] = handled
    return handled


_PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00009, 0x7FE00008))  # pydicom's _at_pixel_data
# RawDataElements walked (`_walk_le`) by (value offset, element bytes), up to _WALKED_MAX
# entries (then cleared), values of at most _WALKED_MAX_VALUE bytes: the slices of a series
# repeat most of their header (UIDs, patient, geometry but the position) at the same offsets.
_WALKED: dict[tuple, "_RawDataElement"] = {}
_WALKED_MAX, _WALKED_MAX_VALUE = 8192, 256


def _walk_le(data: bytes, pos: int, raw: dict, budget: list, *, meta: bool, pixels: bool = True) -> int:
    """Explicit VR Little Endian elements from `pos` into `raw` (tag → RawDataElement, as
    pydicom's `data_element_generator` yields them) → where the walk stopped: the end of the
    data, (`meta`) the first element not in group 0002, or (not `pixels`) a Pixel Data tag
    whose element header lies in `data`; a walk without `pixels` that meets neither, or a value
    of undefined length (its delimiter may lie past `data`), raises. `_Unhandled` for what it
    leaves to pydicom."""
    from pydicom.dataelem import empty_value_for_VR
    from pydicom.fileutil import read_undefined_length_value
    from pydicom.tag import BaseTag, SequenceDelimiterTag

    end = len(data)
    unpack, unpack_length, walked, cap = _LE_HEADER.unpack_from, _LE_LENGTH.unpack_from, _WALKED, _WALKED_MAX_VALUE
    left = budget[0]
    try:
        while end - pos >= 8:
            group, number, vr, length = unpack(data, pos)
            if meta and group != 2:
                return pos
            tag = group << 16 | number
            if vr not in _ENCODED_VRS or tag == 0xFFFEE00D or left <= 0:
                raise _Unhandled
            if not pixels and tag in _PIXEL_TAGS:
                if vr in _LONG_LENGTH_VRS and end - pos < 12:
                    raise _Unhandled
                return pos  # pydicom's stop_when: rewound to the tag
            left -= 1
            start = pos
            pos += 8
            if vr in _LONG_LENGTH_VRS:
                if end - pos < 4:
                    raise _Unhandled
                (length,) = unpack_length(data, pos)
                pos += 4
            if length == 0xFFFFFFFF:
                vr = vr.decode()
                if vr not in ("OB", "OW") or not pixels:
                    raise _Unhandled  # sequences (and UN read as one) are pydicom's
                fp = io.BytesIO(data)
                fp.seek(pos)
                try:
                    value = read_undefined_length_value(fp, True, SequenceDelimiterTag, None)
                except Exception:  # noqa: BLE001
                    raise _Unhandled from None
                raw[BaseTag(tag)] = _RawDataElement(BaseTag(tag), vr, length, value, pos, False, True)
                pos = fp.tell()
                continue
            stop = pos + length
            if stop > end:
                raise _Unhandled  # pydicom keeps a short value; the slow path decides what that is
            if length <= cap:
                # The element's bytes (header and value) at this offset make its RawDataElement,
                # an immutable tuple: the slices of a series repeat most of them at the same offsets.
                key = (pos, data[start:stop])
                found = walked.get(key)
                if found is None:
                    vr = vr.decode()
                    value = data[pos:stop] if length else empty_value_for_VR(vr, raw=True)
                    found = _RawDataElement(BaseTag(tag), vr, length, value, pos, False, True)
                    if len(walked) >= _WALKED_MAX:
                        walked.clear()
                    walked[key] = found
                raw[found[0]] = found
            else:
                raw[BaseTag(tag)] = _RawDataElement(BaseTag(tag), vr.decode(), length, data[pos:stop], pos, False, True)
            pos = stop
    finally:
        budget[0] = left
    if meta or pos != end or not pixels:
        raise _Unhandled  # nothing after the file meta, a few trailing bytes, or no pixel data here
    return pos


# Everything else a decoder raises is the input's fault. Not only Exceptions: the Rust RLE
# plugin (pyo3) raises PanicException, a BaseException, on corrupt segments ("index out of
# bounds"). MemoryError is the machine's problem, not the input's.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)

_TRUNCATION_WORDS = ("truncat", "too short", "insufficient", "end of", "less than expected")


def _pixels(ds, limit: int) -> np.ndarray:
    """The decoded pixel array, after checking from the header that it fits `limit` bytes: the
    file read now may not be the file scanned, and no decoder runs on a budget not checked."""
    declared = declared_pixel_bytes(ds)
    if declared is None:
        raise Reject("decode_error")
    if declared > limit:
        raise Reject("too_large", f"{declared} pixel bytes declared > {limit} planned")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise Reject("decode_error")  # no CT or radiograph stores floats
        # Scan found the element's start; a file without it now ends before its pixel data.
        raise Reject("truncated")
    # Native data can be checked structurally: fewer bytes than the image needs is a cut.
    meta = getattr(ds, "file_meta", None)
    ts = _get(meta, "TransferSyntaxUID") if meta is not None else None
    try:
        from pydicom.pixels.utils import get_expected_length

        short = ts is not None and not ts.is_compressed and len(ds.PixelData) < get_expected_length(ds, unit="bytes")
    except Exception:  # noqa: BLE001 — unknown syntax, malformed Rows/Bits: the decoder will say
        short = False
    if short:
        raise Reject("truncated")
    try:
        # The decoder's own `as_array`, which `ds.pixel_array` calls too (same options, same
        # array), without what the property adds around it: hashing the pixel module to key its
        # cache, ~0.4 ms of a 512² slice's ~1 ms decode.
        from pydicom.pixels import get_decoder

        return get_decoder(ts).as_array(ds)[0]
    except _PASS_THROUGH:
        raise
    except BaseException as e:  # noqa: BLE001 — decoder errors vary by plugin (see _PASS_THROUGH)
        # The message is only matched, never kept: it may quote header values.
        msg = str(e).lower()
        raise Reject("truncated" if any(w in msg for w in _TRUNCATION_WORDS) else "decode_error") from None


def _safely(fn, *args):
    """Run one decode step on input bytes: a Reject passes through, and any other failure of the
    input (pydicom and the decoder plugins raise many types on corrupt data) becomes
    decode_error, with no message that could quote a header value. MemoryError is the
    machine's problem, not the input's, and propagates."""
    try:
        with _quiet():
            return fn(*args)
    except (Reject, *_PASS_THROUGH):
        raise
    except BaseException:  # noqa: BLE001 — see _PASS_THROUGH
        raise Reject("decode_error") from None


def _rescale(ds, frame: int) -> tuple[float, float]:
    """(slope, intercept) of one frame: Enhanced CT per-frame/shared group, else the top level."""
    slope = _functional(ds, max(frame, 0), "PixelValueTransformationSequence", "RescaleSlope")
    inter = _functional(ds, max(frame, 0), "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None:
        slope = _strict(ds, "RescaleSlope")
    if inter is None:
        inter = _strict(ds, "RescaleIntercept")
    slope, inter = _number(slope, 1.0), _number(inter, 0.0)
    if slope == 0:
        raise Reject("decode_error")  # every pixel would read as the intercept
    return slope, inter


def _strict(ds, keyword: str):
    """A value, None when absent; present-but-unreadable rejects instead of reading as absent
    (a slope that failed to parse must not become the default 1: silently wrong HU)."""
    try:
        return ds[keyword].value if keyword in ds else None
    except Exception:  # noqa: BLE001
        raise Reject("decode_error") from None


def _number(v, default: float) -> float:
    """One finite number from a header value; absent or empty is `default`, malformed rejects."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return default
    f = _floats(v, 1)
    if f is None:
        raise Reject("decode_error")
    return f[0]


def load_ct(item: PlanItem, read: Callable[[str], bytes], clock: StageClock = NO_CLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Decode a planned CT series → (HU float32 volume [k, j, i] in planned slice order, affine).

    Input problems raise `Reject`; nothing else does except `read`'s own I/O errors. `clock`
    is charged per stage (read, parse, decode, hu).
    """
    vol = np.empty(item.source_shape, dtype=np.float32)
    _hu_slices(item, read, clock)(0, vol.shape[0], vol)
    return vol, np.array(item.source_affine, dtype=np.float64)


def _hu_slices(item: PlanItem, read: Callable[[str], bytes], clock: StageClock = NO_CLOCK):
    """`fill(k0, k1, out)`: the HU float32 slices k0..k1 of a planned CT series into `out`
    (`load_ct`'s volume, or a slab of it: `transforms.Profile.canonical_ct_filled`), decoding
    each file as it is needed, in planned order → a lower bound of the values written
    (`_least_hu`; -inf where none is known). Rejects as `load_ct` does."""
    shape = item.source_shape
    limit = _decode_limit(item)
    cache: dict[str, tuple[pydicom.Dataset, np.ndarray]] = {}

    def fill(k0: int, k1: int, out: np.ndarray) -> float:
        least = math.inf
        for k, (path, frame) in enumerate(zip(item.paths[k0:k1], item.frames[k0:k1]), k0):
            if path not in cache:
                # A multi-frame file is decoded once; single-frame files are used once each.
                if frame < 0:
                    cache.clear()
                data = read(path)
                clock.lap("read")
                ds = _safely(_decode, data)
                clock.lap("parse")
                cache[path] = ds, _safely(_pixels, ds, limit)
                clock.lap("decode")
            ds, arr = cache[path]
            least = min(least, _safely(_hu_plane, ds, arr, frame, shape, out[k - k0]))
            clock.lap("hu")
        return least

    return fill


def _decode_pixels(data: bytes, limit: int) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = _decode(data)
    return ds, _pixels(ds, limit)


def _decode_limit(item: PlanItem) -> int:
    """Pixel bytes a file of `item` may decode to: what planning budgeted, else (an item made
    by hand) the default budget of its kind."""
    if item.decode_bytes > 0:
        return item.decode_bytes
    return 2 * (CTConfig().max_voxels if item.kind is kinds.CT else XrayConfig().max_pixels)


def _hu_plane(ds, arr: np.ndarray, frame: int, shape: list[int], out: np.ndarray) -> float:
    """One slice's HU into float32 `out` → a lower bound of what was written (-inf: none known)."""
    if frame >= 0:
        if arr.ndim != 3 or frame >= arr.shape[0]:
            raise Reject("decode_error")  # fewer frames decoded than the header promised
        plane = arr[frame]
    else:
        plane = arr
    if plane.ndim != 2:
        raise Reject("unsupported_photometric")  # several samples per pixel
    if plane.shape != tuple(shape[1:]):
        raise Reject("mixed_geometry")
    slope, inter = _rescale(ds, frame)
    _rescaled(plane, slope, inter, out)
    # Finite slope and intercept (`_rescale`) on integer pixels cannot overflow float32 unless
    # the stored range times the slope comes near float32's limit: only then scan for inf.
    integer = np.issubdtype(plane.dtype, np.integer)
    if not (integer and _bound(plane.dtype) * abs(slope) + abs(inter) < 1e37):
        if not np.isfinite(out).all():
            raise Reject("decode_error")
        return -math.inf
    return _least_hu(plane.dtype, slope, inter)


def _rescaled(plane: np.ndarray, slope: float, inter: float, out: np.ndarray) -> None:
    """HU = stored value × slope + intercept, into float32 `out`."""
    if slope == 1.0:
        # The same float32 values as the general path (an integer converts to float32 exactly
        # either way, then one float32 addition), in one pass instead of two.
        np.add(plane, np.float32(inter), out=out, casting="unsafe")
    else:
        np.multiply(plane, slope, out=out, casting="unsafe")
        out += inter


@functools.lru_cache(maxsize=256)
def _least_hu(dtype: np.dtype, slope: float, inter: float) -> float:
    """The least HU `_rescaled` writes for any value of an integer dtype: the same arithmetic on
    the dtype's two extremes (each of its steps rounds monotonically, so every stored value
    maps between what they map to). A series whose slices all lie above the air floor need not
    be floored (`transforms.Profile.canonical_ct_filled`); the uint16, intercept -1024 slices of
    many scanners cannot lie below it."""
    info = np.iinfo(dtype)
    ends = np.empty(2, dtype=np.float32)
    _rescaled(np.array([info.min, info.max], dtype=dtype), slope, inter, ends)
    return float(ends.min())


def _bound(dtype) -> float:
    """The largest magnitude an integer dtype holds."""
    info = np.iinfo(dtype)
    return float(max(-int(info.min), int(info.max)))


def load_xray(item: PlanItem, read: Callable[[str], bytes], voi: str) -> np.ndarray:
    """Decode one radiograph → float32 presentation values in [0, 1], high = bright.

    Modality LUT (LUT or rescale), then VOI (VOI LUT Sequence, else the first window) when
    `voi == "window"`, then MONOCHROME1 inversion, so every stored image reads the same way
    regardless of the vendor's photometric choice. The output range of each step is known from
    the header (BitsStored, rescale, LUT descriptor), so scaling does not depend on the image
    content. The LUT and window arithmetic is PS3.3 C.11 done here rather than by pydicom's
    helpers: those index an 8-bit LUT through a uint8 array (wrapping inputs > 255), warn on
    float input, and raise plain ValueErrors on a zero window width.

    Input problems raise `Reject`; nothing else does except `read`'s own I/O errors.
    """
    if voi not in ("window", "none"):
        raise ValueError(f"voi must be 'window' or 'none', got {voi!r}")
    data = read(item.paths[0])
    return _safely(_xray, data, voi, _decode_limit(item))


def _xray(data: bytes, voi: str, limit: int) -> np.ndarray:
    ds = _decode(data)
    raw = _pixels(ds, limit)
    photometric = _str(ds, "PhotometricInterpretation").upper()
    if raw.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise Reject("unsupported_photometric")
    bits = _int(_get(ds, "BitsStored")) or 16
    if not 1 <= bits <= 32:
        raise Reject("decode_error")
    signed = _int(_get(ds, "PixelRepresentation")) == 1
    lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    mlut = _lut(ds, "ModalityLUTSequence", signed)
    if mlut is not None:
        values, (lo, hi) = _apply_lut(raw, *mlut[:2]), mlut[2]
    else:
        slope, inter = _rescale(ds, -1)
        values = raw.astype(np.float64) * slope + inter
        # Unsorted on purpose: with a negative slope the window below maps onto hi..lo, as
        # PS3.3 C.11.2.1.2 (and pydicom) define the output range of the rescaled values.
        lo, hi = lo_raw * slope + inter, hi_raw * slope + inter
    out = None
    if voi == "window":
        vlut = _lut(ds, "VOILUTSequence", lo < 0 or hi < 0)
        if vlut is not None:
            values, (lo, hi) = _apply_lut(values, *vlut[:2]), vlut[2]
        else:
            out = _window(ds, values)
    if out is None:
        lo, hi = min(lo, hi), max(lo, hi)
        out = (values - lo) / max(hi - lo, 1e-9)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if not np.isfinite(out).all():
        raise Reject("decode_error")
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def _lut(ds, seq: str, signed_input: bool):
    """(first mapped value, LUT entries, (lo, hi) output range) of a Modality or VOI LUT, or None.

    LUT Descriptor = (entries, first mapped input value, bits per entry); 0 entries means 65536
    (PS3.3 C.11.1.1). A first value >= 2**15 on signed input is the SS reading of a value
    written as US. Bits per entry outside 8..16 (seen in the wild) fall back to the width of the
    largest entry.
    """
    items = _get(ds, seq)
    if not items:
        return None
    item = items[0]
    desc = [_int(v) for v in _as_list(_get(item, "LUTDescriptor"))]
    data = _get(item, "LUTData")
    if len(desc) != 3 or any(v is None for v in desc) or data is None:
        raise Reject("decode_error")
    n, first, bits = desc
    n = n or 65536
    if signed_input and first >= 2**15:
        first -= 2**16
    if isinstance(data, (bytes, bytearray)):  # OW: raw 16-bit words in the data set's byte order
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        lut = np.frombuffer(bytes(data[: len(data) // 2 * 2]), dtype="<u2" if little else ">u2")
    else:
        lut = np.asarray([_int(v) for v in _as_list(data)], dtype=np.float64)
    lut = lut[:n].astype(np.float64)
    if lut.size == 0 or not np.isfinite(lut).all():
        raise Reject("decode_error")
    if not 8 <= bits <= 16:
        bits = max(1, int(lut.max()).bit_length())
    return first, lut, (0.0, float(2**bits - 1))


def _apply_lut(values: np.ndarray, first: int, lut: np.ndarray) -> np.ndarray:
    """Inputs below `first` map to the first entry, above the last to the last (PS3.3 C.11)."""
    idx = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.int64)
    return lut[idx]


def _window(ds, values: np.ndarray) -> np.ndarray | None:
    """Window (first of several) as a fraction of the output range, PS3.3 C.11.2.1.2-3; None
    when the header has no usable window (absent, malformed, or a width the function forbids)."""
    center = _as_list(_get(ds, "WindowCenter"))
    width = _as_list(_get(ds, "WindowWidth"))
    c, w = _floats(center[:1], 1), _floats(width[:1], 1)
    if c is None or w is None:
        return None
    c, w = c[0], w[0]
    func = _str(ds, "VOILUTFunction").upper() or "LINEAR"
    if func == "SIGMOID":
        if w <= 0:
            return None
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - c) / w, -700, 700)))
    if func == "LINEAR_EXACT":
        if w <= 0:
            return None
        return (values - c) / w + 0.5
    # LINEAR, also the default for an unknown function name (the Standard's default).
    if w < 1:
        return None
    if w == 1:  # a threshold: the linear ramp has zero width
        return (values > c - 0.5).astype(np.float64)
    return (values - (c - 0.5)) / (w - 1) + 0.5


# ---------------------------------------------------------------------------------------------
# 4. Canonical arrays (shared by ingest and serving)
# ---------------------------------------------------------------------------------------------


def canonical(item: PlanItem, read: Callable[[str], bytes], profile: Profile,
              clock: StageClock = NO_CLOCK) -> tuple[np.ndarray, dict]:
    """A planned item → (stored canonical array, geometry metadata), per a preprocessing profile.

    `profile` is a `transforms.Profile` (the ingest recipe's, or the one a model was trained on),
    which owns the operations: CT HU → int16 at the profile spacing in LPS; X-ray presentation
    values → uint16 with the profile's longest side and VOI. This is
    THE code path from DICOM to the stored form: ingest writes its output into shards, serving
    feeds it to the model view, so the two cannot drift apart.

    Input problems raise `Reject`. `clock` (a `transforms.StageClock`) is charged the CPU
    seconds of each stage.
    """
    rules = _RULES.get(item.kind) if item.status == "planned" else None
    if rules is None:
        raise ValueError(f"not a planned sample: {item.status} item of kind {item.kind!r}")
    return rules.canonical(item, read, profile, clock)


def _canonical_ct(item: PlanItem, read: Callable[[str], bytes], profile: Profile,
                  clock: StageClock = NO_CLOCK) -> tuple[np.ndarray, dict]:
    # Slab by slab where the profile can (no float32 volume of the source held): the same bytes.
    array, affine, source_spacing = profile.canonical_ct_filled(item.source_shape, item.source_affine,
                                                                _hu_slices(item, read, clock), clock)
    return array, {
        "canonical_source_spacing_mm": _rounded(source_spacing),
        "shape": list(array.shape),
        "spacing_mm": _rounded(spacing_zyx(affine)),
        "affine_lps": [_rounded(r) for r in affine.tolist()],
        "orientation": "LPS",
        "units": "HU",
    }


def _canonical_xray(item: PlanItem, read: Callable[[str], bytes], profile: Profile,
                    clock: StageClock = NO_CLOCK) -> tuple[np.ndarray, dict]:
    values = load_xray(item, read, profile.xray_voi)
    clock.lap("decode")
    if "horizontal" in item.flip:
        values = values[:, ::-1]
    if "vertical" in item.flip:
        values = values[::-1, :]
    values = np.ascontiguousarray(values)
    clock.lap("orient")
    array = profile.canonical_xray(values, clock)
    meta = {"shape": list(array.shape), "photometric": "MONOCHROME2", "units": "presentation", "spacing_mm": None,
            "view": VIEWS.get(str(item.safe.get("ViewPosition") or "").upper()), "display_flip": list(item.flip),
            "patient_orientation": item.orientation}
    src_sp = item.source_spacing_mm
    if src_sp:
        sy = item.source_shape[0] / array.shape[0]
        sx = item.source_shape[1] / array.shape[1]
        meta["spacing_mm"] = [round(src_sp[0] * sy, 6), round(src_sp[1] * sx, 6)]
    return array, meta


def _rounded(spacing) -> list[float]:
    return [round(float(v), 6) for v in spacing]


def canonical_from_files(datas: list[bytes], profile: Profile, *, image: kinds.ImageKind | None = None,
                         ct: CTConfig | None = None, xray: XrayConfig | None = None,
                         limits: HeaderLimits = HEADER_LIMITS) -> tuple[np.ndarray, dict]:
    """The DICOM files of ONE image (a radiograph, or every slice of one CT series) → (canonical
    array, metadata), exactly as ingest would store it: `scan` → `plan_group` → `canonical`.

    For serving, where the files arrive in a request rather than from a listing. `profile` is the
    model's `transforms.Profile`; `image` (a `kinds.ImageKind`) restricts the accepted modalities (others: Reject("modality_not_selected"));
    `ct` is a `config.CTConfig` with the series validation thresholds and the volume budget
    (`max_voxels`), `xray` a `config.XrayConfig` whose `max_pixels` is the radiograph budget
    (only the budget is read: resizing and VOI follow `profile`), `limits` the header caps
    (`HeaderLimits`); defaults: the ingest defaults, which the profile does not record. Every
    budget is checked from the headers before any decoder runs (`Reject("too_large")`, whose
    `detail` holds the figures); a header past `limits` is `Reject("unreadable_header")`. Strict where ingest is lenient: any unusable
    file rejects the whole request (a stray file in a series upload is a client error, not
    something to drop silently), and more than one series or image is Reject("multiple_images").

    The returned metadata holds `modality` plus the geometry of `canonical`; never a header value.
    """
    # Planning reads only the modalities and the CT validation thresholds of a recipe; the pixels
    # follow `profile` (`canonical`), so nothing of the profile is turned back into a recipe.
    # Series selection rules are a corpus policy, not a property of one image: none apply here.
    recipe = IngestRecipe(modalities=list(image.modalities if image else kinds.MODALITIES), ct=ct or CTConfig(),
                          xray=xray or XrayConfig(), series=SeriesConfig(rules=[]))
    files = {f"file{i}": bytes(d) for i, d in enumerate(datas)}
    # Pseudonyms are computed by planning but never leave this function: any key will do.
    ctx = PlanContext(recipe=recipe, pseudo=deid.Pseudonymizer(b"radforge-canonical-from-files"),
                      pixel_digest=lambda row, limit: pixel_digest(files[row["path"]], limit))
    groups: dict[str, list[dict]] = {}
    for path, data in files.items():
        row = scan(path, len(data), io.BytesIO(data), limits)
        groups.setdefault(row["group_key"], []).append(row)
    items = [it for rows in groups.values() for it in plan_group(rows, ctx)]
    for it in items:  # rejections first: a series with a gap beats a skipped localizer
        if it.status == "rejected" or it.reason == "modality_not_selected":
            raise Reject(it.reason, it.detail)
    planned = [it for it in items if it.status == "planned"]
    if not planned:
        raise Reject(items[0].reason if items else "not_dicom")
    if len(planned) > 1:
        raise Reject("multiple_images")
    item = planned[0]
    array, meta = canonical(item, files.__getitem__, profile)
    return array, {"modality": item.modality, **meta}


# ---------------------------------------------------------------------------------------------
# What planning and the canonical path do per image kind (the kinds themselves: radforge.kinds)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KindRules:
    sop_classes: tuple[str, ...]  # SOP classes accepted for the kind's modalities
    group_prefix: str  # `_group_key`: "<prefix>:<uid>"
    group_field: str  # the index row field one sample groups on
    per_file: bool  # each file of a group is a sample of its own (else the group is one sample)
    plan: Callable[[list[dict], PlanContext], list[PlanItem]]  # rows of one sample (group) → its items
    canonical: Callable[[PlanItem, Callable[[str], bytes], Profile, StageClock], tuple[np.ndarray, dict]]


_RULES: dict[kinds.ImageKind, _KindRules] = {
    kinds.CT: _KindRules((CT_STORAGE, ENHANCED_CT_STORAGE), "ct", "series_uid", False, _plan_ct_series, _canonical_ct),
    kinds.XRAY: _KindRules(XRAY_STORAGE, "xr", "sop_uid", True, lambda rows, ctx: _attempt(_plan_xray, rows, ctx),
                           _canonical_xray),
}
assert set(_RULES) == set(kinds.KINDS.values()), "every image kind needs its planning rules"
_IMAGE_SOP_CLASSES = frozenset(c for r in _RULES.values() for c in r.sop_classes)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _get(ds, keyword: str):
    """`ds.get(keyword)` that never raises: pydicom converts values lazily, on access, so a
    malformed one (a DS of "abc", a US of odd length) raises there; it counts as absent."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001
        return None


def _meta_get(meta, tag: int):
    """`_get(meta, keyword)` by tag, for the file meta (`ds.get(keyword)` is `ds[tag].value`
    after a dictionary lookup of the keyword, several per file)."""
    try:
        return meta[tag].value if tag in meta._dict else None
    except Exception:  # noqa: BLE001
        return None


_TRANSFER_SYNTAX = 0x00020010


def _str(ds, keyword: str) -> str:
    return _text(_get(ds, keyword))


def _text(v) -> str:
    if v is None:
        return ""
    try:
        return str(v).strip()
    except Exception:  # noqa: BLE001 — undecodable text
        return ""


def _floats(v, n: int) -> list[float] | None:
    """Exactly `n` finite floats, or None."""
    try:
        vals = [float(x) for x in _as_list(v)]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(vals) != n or not all(math.isfinite(x) for x in vals):
        return None
    return vals


_NUMERIC_VRS = ("DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV")


def _vr(ds, keyword: str) -> str | None:
    try:
        return ds[keyword].VR if keyword in ds else None
    except Exception:  # noqa: BLE001
        return None


def _all_numbers(v) -> bool:
    return all(isinstance(x, (int, float)) for x in (v if isinstance(v, list) else [v]))


def _int(v):
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


def _as_list(v):
    if v is None:
        return []
    # by exact type first: isinstance with MultiValue (an abc) costs ~1 µs, and the row asks ~25 times
    t = type(v)
    if t is str or t is int or t is float:
        return [v]
    if t is list or t is _MultiValue or isinstance(v, (list, tuple, _MultiValue)):
        return list(v)
    return [v]


_MultiValue = pydicom.multival.MultiValue


def _plain(v):
    """A JSON-able plain value from a pydicom element value (numbers stay numbers)."""
    if v is None:
        return None
    if type(v) is str:
        return v
    if isinstance(v, (_MultiValue, list, tuple)):
        items = [_plain(x) for x in v]
        return items if all(i is not None for i in items) else None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, pydicom.valuerep.DSfloat) or isinstance(v, pydicom.valuerep.IS):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return None
    return str(v)
