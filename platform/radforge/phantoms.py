"""Synthetic DICOM corpora with known ground truth and planted PHI.

Why this exists: every stage of radforge needs inputs whose right answer is known. Real DICOM
cannot be shipped with the repo, carries real identities, and never comes with the exact HU
volume a reader should reconstruct. So this module *writes* DICOM the way scanners and PACS
exports do (shuffled file names, scrambled InstanceNumber, several transfer syntaxes, series
split across folders, broken files) and returns the truth beside it:

* geometry: `SeriesInfo.hu_lps` is the int16 HU volume in canonical LPS array order
  ([z, y, x]: inferior->superior, anterior->posterior, right->left) with `origin_xyz` (LPS mm of
  voxel [0, 0, 0]) and `spacing_zyx`; an asymmetric bone marker sits in the patient's
  Left-Anterior-Superior octant so any flip or axis swap is detectable;
* content: each of FINDINGS is drawn in the pixels when the study label is 1, and stated in the
  report, so a tiny model can learn it and zero-shot evaluation has a real signal;
* privacy: every identifying value contains PHI_MARKER (or, where the VR forbids letters - dates
  and UIDs - is listed by `secrets()`), so a privacy test can grep every output byte;
* failure handling: defective series and broken files carry the exact ledger reason code the
  ingest must emit (`SeriesInfo.expected_reason`, `bad_files()`), and `build_corpus` sums them up.

Everything is a pure function of (arguments, seed): UIDs come from `generate_uid(entropy_srcs=...)`
and all randomness from seeded numpy generators, so a corpus rebuilt with the same seed is
byte-identical and tests can hard-code expectations.

Encoders (pydicom 3.0.2 with the pylibjpeg plugins): native Explicit VR LE, Implicit VR LE,
Explicit VR Big Endian and Deflated Explicit VR LE are written by pydicom itself; RLE Lossless
by pydicom's own encoder (or pylibjpeg-rle); JPEG 2000 Lossless by pylibjpeg-openjpeg (needs
rows and columns >= 32: OpenJPEG's default 6 resolution levels). JPEG-LS Lossless needs the
`pyjpegls` package, which is not a radforge dependency, so it is only used when
`encodable_transfer_syntaxes()` reports it (real JPEG-LS files still reach the tests through
`package_files()`, which the libjpeg plugin can decode).

Only numpy and pydicom are imported; never ray or torch (this runs in test collection).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import importlib.util
import io
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    UltrasoundImageStorage,
    generate_uid,
)

FINDINGS: tuple[str, ...] = ("nodule", "effusion", "cardiomegaly")
PHI_MARKER = "ZZPHI"
# Small CT lesions (training_corpus(ct_lesions=True)): diameter mm and |contrast| HU ranges, the
# subtle end of what a radiologist reports on a chest CT.
LESION_MM, LESION_HU = (4.0, 9.0), (20.0, 70.0)
PRIVATE_CREATOR = "ZZPHI CREATOR"
PRIVATE_GROUP = 0x0011

# Ledger reason codes, exactly as radforge.ingest emits them. Series-level reasons describe a
# whole CT series (every file of it is rejected or skipped); file-level ones a single file.
SERIES_REASONS = ("slice_gap", "duplicate_position", "gantry_tilt", "mixed_geometry",
                  "too_few_slices", "localizer")
FILE_REASONS = ("not_dicom", "truncated", "unreadable_header", "unsupported_modality")
SKIP_REASONS = frozenset({"localizer"})  # skipped on purpose, not an error
# A DICOM stream without the 128-byte preamble and "DICM" prefix is not a Part 10 file (PS3.10
# 7.1). Accepting it means force-parsing, and force-parsing "succeeds" on text and garbage too,
# so radforge draws the line at the magic bytes and ledgers such files as not_dicom (an operator
# can convert them with dcmconv if they matter). bad_files() writes one to pin this decision.
NO_PREAMBLE_REASON = "not_dicom"
TOO_FEW_SLICES = 3  # corpus series with this many slices expect "too_few_slices"; the ingest
# minimum must therefore lie in (3, 16] (16 is the smallest valid series build_corpus writes).

_AIR, _BODY, _LUNG, _BONE, _HEART, _FLUID, _NODULE, _MARKER = -1000, 40, -850, 700, 50, 15, 120, 1000
_RESCALE_CYCLE = ((1.0, -1024.0), (0.5, -1024.0), (1.0, -2048.0), (0.5, -1536.0))
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
           DeflatedExplicitVRLittleEndian)
_ORIENTATIONS = {  # name -> (row direction cosines, column direction cosines), PS3.3 C.7.6.2.1.1
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


# --------------------------------------------------------------------------------------------
# deterministic helpers


def _rng(*keys: object) -> np.random.Generator:
    digest = hashlib.sha256("|".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _uid(*keys: object) -> str:
    """A valid, reproducible UID (pydicom root + hash of the keys): reruns give the same files."""
    return str(generate_uid(entropy_srcs=["|".join(map(str, keys))]))


def _ds(x: float) -> str:
    """DS text for a value that is exact to a few decimals (DS allows at most 16 characters)."""
    v = round(float(x), 5)
    return repr(0.0 if v == 0 else v)


def encodable_transfer_syntaxes() -> list[UID]:
    """Transfer syntaxes this environment can *write*: the natives plus whatever encoders exist."""
    from pydicom.pixels import get_encoder

    out = list(_NATIVE)
    for ts in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        try:
            if get_encoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            pass
    return out


# --------------------------------------------------------------------------------------------
# patients and studies: the identifying values


@dataclass(frozen=True)
class Patient:
    """Identifying values of one synthetic patient; all are planted in headers and reports."""

    index: int
    name: str  # DICOM PN "FAMILY^GIVEN"
    patient_id: str
    birth_date: str  # DA; digits only, so it cannot carry the marker -> listed by secrets()
    sex: str
    age: str  # AS, e.g. "067Y"

    @property
    def family(self) -> str:
        return self.name.split("^")[0]

    @property
    def given(self) -> str:
        return self.name.split("^")[1]

    @property
    def other_id(self) -> str:
        return f"{PHI_MARKER}OTH{self.index:04d}"

    @property
    def address(self) -> str:
        return f"{self.index + 1} {PHI_MARKER} Street, {PHI_MARKER}TOWN"

    @property
    def birth_date_variants(self) -> tuple[str, str, str]:
        """The DA value and the forms a report writer uses (ISO, US)."""
        d = self.birth_date
        return d, f"{d[:4]}-{d[4:6]}-{d[6:]}", f"{d[4:6]}/{d[6:]}/{d[:4]}"


def make_patient(index: int, seed: int = 0) -> Patient:
    rng = _rng("patient", seed, index)
    born = _dt.date(1935 + int(rng.integers(0, 55)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    age = 2024 - born.year - (1 if (born.month, born.day) > (7, 1) else 0)
    return Patient(
        index=index,
        name=f"{PHI_MARKER}FAMILY{index:04d}^{PHI_MARKER}GIVEN{index:04d}",
        patient_id=f"{PHI_MARKER}ID{index:04d}",
        birth_date=born.strftime("%Y%m%d"),
        sex="MF"[int(rng.integers(0, 2))],
        age=f"{age:03d}Y",
    )


_SENTENCES = {  # finding -> {label: sentence}; None (not mentioned) writes nothing
    "nodule": {1: "A solid pulmonary nodule is present.", 0: "No pulmonary nodule.",
               -1: "Possible small pulmonary nodule, cannot be excluded."},
    "effusion": {1: "There is a pleural effusion layering posteriorly.", 0: "No pleural effusion.",
                 -1: "Possible trace pleural effusion."},
    "cardiomegaly": {1: "The heart is enlarged, consistent with cardiomegaly.",
                     0: "Heart size is normal.", -1: "Borderline heart size, possible cardiomegaly."},
}


@dataclass
class Study:
    """One imaging study. `findings` uses the CheXpert convention: 1 positive, 0 negative,
    -1 uncertain, None not mentioned. Only 1 is drawn in the pixels (`present`), so "U-zeros"
    is the exact label policy for the phantom."""

    patient: Patient
    study_uid: str
    accession: str
    study_date: str
    findings: dict[str, int | None]
    index_in_patient: int = 0
    study_time: str = "093000"
    # CT only: (diameter mm, contrast HU) of a small soft-tissue nodule drawn instead of the large
    # default one when the nodule is present (`training_corpus(ct_lesions=True)`); the report
    # states its size, as real reports do, so evaluation can band AUROC by size.
    lesion: tuple[float, float] | None = None

    def present(self, finding: str) -> bool:
        return self.findings.get(finding) == 1

    @property
    def _tag(self) -> str:
        return f"{self.patient.index:04d}"

    @property
    def study_id(self) -> str:  # SH, <= 16 chars
        return f"{PHI_MARKER}ST{self._tag}-{self.index_in_patient + 1}"

    @property
    def institution(self) -> str:
        return f"{PHI_MARKER}HOSP{self._tag} General Hospital"

    @property
    def institution_address(self) -> str:
        return f"1 {PHI_MARKER} Plaza, {PHI_MARKER}CITY"

    @property
    def referring_physician(self) -> str:
        return f"{PHI_MARKER}REF{self._tag}^{PHI_MARKER}DOC"

    @property
    def requesting_physician(self) -> str:
        return f"{PHI_MARKER}REQ{self._tag}^{PHI_MARKER}DOC"

    @property
    def performing_physician(self) -> str:
        return f"{PHI_MARKER}PERF{self._tag}^{PHI_MARKER}DOC"

    @property
    def operator(self) -> str:
        return f"{PHI_MARKER}OPER{self._tag}^{PHI_MARKER}TECH"

    @property
    def description(self) -> str:
        return f"CHEST for {self.patient.family}"

    @property
    def report(self) -> str:
        """Free-text report: states every mentioned finding and repeats the PHI, as real ones do."""
        p = self.patient
        found = [_SENTENCES[f][v] for f, v in self.findings.items() if v is not None]
        if self.lesion is not None and self.present("nodule"):
            d, c = self.lesion
            found[list(k for k, v in self.findings.items() if v is not None).index("nodule")] = \
                f"{'An' if round(d) in (8, 11, 18) else 'A'} {d:.0f} mm {'hyper' if c > 0 else 'hypo'}dense soft-tissue nodule is present."
        positives = [f for f in FINDINGS if self.findings.get(f) == 1]
        impression = ("; ".join(positives).capitalize() + ".") if positives else \
            "No acute cardiopulmonary abnormality."
        return (
            f"EXAMINATION: Chest imaging, accession {self.accession}.\n"
            f"PATIENT: {p.given} {p.family}, MRN {p.patient_id}, DOB {p.birth_date_variants[2]}, "
            f"{p.age} {p.sex}.\n"
            f"Referred by Dr. {self.referring_physician.split('^')[0]} to {self.institution}.\n"
            f"FINDINGS: {' '.join(found) or 'Lungs and heart unremarkable.'}\n"
            f"IMPRESSION: {impression}\n"
        )


def make_study(patient: Patient, index_in_patient: int = 0,
               findings: dict[str, int | None] | None = None, seed: int = 0) -> Study:
    rng = _rng("study", seed, patient.index, index_in_patient)
    date = _dt.date(2024, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 360)))
    if findings is None:
        choices = (1, 0, -1, None)
        findings = {f: choices[int(rng.choice(4, p=[0.45, 0.4, 0.1, 0.05]))] for f in FINDINGS}
    else:
        unknown = set(findings) - set(FINDINGS)
        bad = [v for v in findings.values() if v not in (1, 0, -1, None)]
        if unknown or bad:
            raise ValueError(f"findings keys must be in {FINDINGS} with values 1/0/-1/None")
        findings = {f: findings.get(f) for f in FINDINGS}
    return Study(
        patient=patient,
        study_uid=_uid("study", seed, patient.index, index_in_patient),
        accession=f"{PHI_MARKER}ACC{patient.index:04d}-{index_in_patient + 1}",
        study_date=date.strftime("%Y%m%d"),
        findings=findings,
        index_in_patient=index_in_patient,
        study_time=f"{8 + int(rng.integers(0, 10)):02d}{int(rng.integers(0, 60)):02d}00",
    )


# --------------------------------------------------------------------------------------------
# pixel content


def _grid(n: int) -> np.ndarray:
    """Voxel-centre coordinates normalised to [-1, 1]; features scale with the field of view."""
    return ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1)


def chest_volume(shape_zyx: tuple[int, int, int], study: Study, seed: int = 0,
                 spacing_zyx: tuple[float, float, float] | None = None) -> np.ndarray:
    """int16 HU volume in canonical LPS order: body, lungs, spine, heart, LAS bone marker, findings.

    Coordinates are normalised per axis (u: right->left, v: anterior->posterior, w:
    inferior->superior), so the anatomy fills the same fraction of any matrix; findings jitter in
    position/size per seed but keep one consistent look (learnable by a tiny model).
    A study with `lesion` set (and `spacing_zyx` given: its size is physical) gets that small
    soft-tissue nodule (`_small_lesion`) instead of the large lung nodule.
    """
    nz, ny, nx = shape_zyx
    rng = _rng("volume", study.study_uid, seed)
    w, v, u = _grid(nz)[:, None, None], _grid(ny)[None, :, None], _grid(nx)[None, None, :]
    vol = np.full(shape_zyx, _AIR, dtype=np.float32)

    def put(mask: np.ndarray, value: float) -> None:
        vol[np.broadcast_to(mask, shape_zyx)] = value

    put((u / 0.85) ** 2 + (v / 0.7) ** 2 <= 1, _BODY)
    lungs = np.zeros(shape_zyx, dtype=bool)
    for side in (-1, 1):
        lungs |= ((u - 0.4 * side) / 0.3) ** 2 + ((v + 0.05) / 0.5) ** 2 + (w / 1.3) ** 2 <= 1
    vol[lungs] = _LUNG
    put((u / 0.12) ** 2 + ((v - 0.55) / 0.12) ** 2 <= 1, _BONE)
    big = study.present("cardiomegaly")
    cu, cv, cw = 0.08 + rng.uniform(-0.03, 0.03), -0.1 + rng.uniform(-0.03, 0.03), -0.2
    ru, rv, rw = ((0.46, 0.36, 0.6) if big else (0.2, 0.17, 0.35)) * rng.uniform(0.95, 1.05, 3)
    put(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 + ((w - cw) / rw) ** 2 <= 1, _HEART)
    if study.present("effusion"):  # supine patient: fluid layers in the dependent (posterior) lung
        level = 0.15 + rng.uniform(-0.05, 0.05)
        vol[lungs & np.broadcast_to((v > level) & (w < 0.6), shape_zyx)] = _FLUID
    small = study.lesion is not None and spacing_zyx is not None
    if study.present("nodule"):
        side = 1 if rng.random() < 0.5 else -1
        nu, nv, nw = 0.4 * side + rng.uniform(-0.08, 0.08), -0.15 + rng.uniform(-0.1, 0.1), rng.uniform(-0.4, 0.2)
        if not small:
            put(((u - nu) / 0.13) ** 2 + ((v - nv) / 0.13) ** 2 + ((w - nw) / 0.25) ** 2 <= 1, _NODULE)
    # fixed (never jittered) marker: patient Left (u>0), Anterior (v<0), Superior (w>0)
    put(((u - 0.55) / 0.1) ** 2 + ((v + 0.45) / 0.1) ** 2 + ((w - 0.6) / 0.2) ** 2 <= 1, _MARKER)
    if small and study.present("nodule"):
        _small_lesion(vol, study, spacing_zyx, _rng("lesion", study.study_uid, seed))
    noise = rng.integers(-10, 11, size=shape_zyx, dtype=np.int16)
    return np.clip(np.rint(vol).astype(np.int16) + noise, -1024, 3071).astype(np.int16)


def _small_lesion(vol: np.ndarray, study: Study, spacing_zyx, rng: np.random.Generator) -> None:
    """Add a sphere of `study.lesion` = (diameter mm, contrast HU) inside plain soft tissue (body,
    not lung, heart, bone or marker), with partial-volume edges (4³ sub-samples per voxel): a
    4 mm lesion on 4 mm slices is a faint blur on one or two slices, as on a scanner."""
    diameter, contrast = study.lesion
    sp = np.asarray(spacing_zyx, dtype=np.float32)
    tissue = vol == _BODY
    half = np.ceil(diameter / 2 / sp).astype(int) + 1
    sub = (np.arange(4, dtype=np.float32) + 0.5) / 4 - 0.5
    for _ in range(500):  # a centre whose whole sphere lies in tissue
        c = np.array([rng.uniform(h, n - h) for h, n in zip(half, vol.shape)])
        lo = np.floor(c - half).astype(int)
        box = tuple(slice(a, a + 2 * h + 1) for a, h in zip(lo, half))
        grids = [(np.arange(b.start, b.stop, dtype=np.float32)[:, None] + sub[None, :] - cc) * s
                 for b, cc, s in zip(box, c, sp)]  # [n, 4] sub-sample offsets per axis, in mm
        d2 = (grids[0][:, None, None, :, None, None] ** 2 + grids[1][None, :, None, None, :, None] ** 2
              + grids[2][None, None, :, None, None, :] ** 2)
        cover = (d2 <= (diameter / 2) ** 2).mean(axis=(3, 4, 5))
        if tissue[box].shape == cover.shape and tissue[box][cover > 0].all():
            vol[box] += contrast * cover
            return
    raise ValueError(f"no room for a {diameter} mm lesion in a {vol.shape} volume")


def chest_radiograph(rows: int, cols: int, study: Study, max_value: int, seed: int = 0
                     ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """PA chest radiograph in display orientation (MONOCHROME2 sense: bright = dense).

    Viewer's left is the patient's right (standard PA display), so the heart sits right of
    centre. Returns (image, marker_box) where marker_box = (r0, r1, c0, c1) is a saturated
    square in the top-left corner: after correct MONOCHROME1 inversion it is the brightest
    region, and it stays top-left only if nobody flipped the image.
    """
    rng = _rng("radiograph", study.study_uid, seed)
    r, c = _grid(rows)[:, None], _grid(cols)[None, :]
    img = np.full((rows, cols), 0.05, dtype=np.float32)
    img[(c / 0.85) ** 2 + ((r - 0.15) / 1.0) ** 2 <= 1] = 0.45
    lungs = np.zeros((rows, cols), dtype=bool)
    for side in (-1, 1):
        lungs |= ((c - 0.38 * side) / 0.28) ** 2 + ((r + 0.05) / 0.55) ** 2 <= 1
    img[lungs] = 0.15
    img[np.broadcast_to(np.abs(c) < 0.06, img.shape)] = 0.6  # spine
    big = study.present("cardiomegaly")
    hc, hr = 0.1 + rng.uniform(-0.03, 0.03), 0.25 + rng.uniform(-0.03, 0.03)
    rc_, rr_ = ((0.46, 0.34) if big else (0.2, 0.18)) * rng.uniform(0.95, 1.05, 2)
    img[((c - hc) / rc_) ** 2 + ((r - hr) / rr_) ** 2 <= 1] = 0.5
    if study.present("effusion"):  # upright: fluid fills the lung bases
        img[lungs & (r > 0.12 + rng.uniform(-0.05, 0.05))] = 0.45
    if study.present("nodule"):
        side = 1 if rng.random() < 0.5 else -1
        nc, nr = 0.38 * side + rng.uniform(-0.08, 0.08), -0.2 + rng.uniform(-0.12, 0.12)
        img[((c - nc) / 0.08) ** 2 + ((r - nr) / 0.08 * cols / rows) ** 2 <= 1] = 0.65
    img += rng.uniform(-0.01, 0.01, img.shape).astype(np.float32)
    out = np.clip(np.rint(img * max_value * 0.9), 0, max_value - 1).astype(np.uint16)
    box = (max(1, rows * 3 // 100), max(2, rows * 12 // 100), max(1, cols * 3 // 100), max(2, cols * 12 // 100))
    out[box[0]:box[1], box[2]:box[3]] = max_value
    return out, box


# --------------------------------------------------------------------------------------------
# headers and writing


def _plant_phi(ds: Dataset, study: Study, description: str, comment: str) -> None:
    """Identifying tags, each with a marker value (dates and UIDs are listed by secrets())."""
    p = study.patient
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs = p.name, p.patient_id, p.other_id
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = p.birth_date, p.sex, p.age
    ds.PatientAddress = p.address
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study.study_uid, study.study_date, study.study_time
    ds.SeriesDate = ds.ContentDate = study.study_date
    ds.SeriesTime = ds.ContentTime = study.study_time
    ds.AccessionNumber, ds.StudyID = study.accession, study.study_id
    ds.StudyDescription, ds.SeriesDescription, ds.ImageComments = study.description, description, comment
    ds.InstitutionName, ds.InstitutionAddress = study.institution, study.institution_address
    ds.ReferringPhysicianName = study.referring_physician
    ds.PerformingPhysicianName = study.performing_physician
    ds.OperatorsName = study.operator
    ds.RequestingPhysician = study.requesting_physician
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", f"{PHI_MARKER} private note for {p.patient_id}")


def _image_pixel(ds: Dataset, rows: int, cols: int, bits_stored: int, signed: bool,
                 photometric: str = "MONOCHROME2") -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)


def _write(ds: Dataset, path: str | os.PathLike, transfer_syntax: str, pixels: np.ndarray) -> None:
    """Attach exact stored values in `transfer_syntax` and save as a Part 10 file.

    Native syntaxes get raw bytes in the right byte order (pydicom writes OW bytes as given, so
    big endian must be swapped here); compressed ones go through `Dataset.compress`.
    `enforce_file_format=True` matters: without it pydicom 3 writes no preamble/"DICM".
    """
    ts = UID(transfer_syntax)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    vr = "OB" if ds.BitsAllocated == 8 else "OW"
    order = ">" if ts == ExplicitVRBigEndian else "<"
    ds.add_new(0x7FE00010, vr, pixels.astype(pixels.dtype.newbyteorder(order)).tobytes())
    if ts.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(ts, pixels, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = ts
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _stored_dtype(lo: int, hi: int) -> tuple[np.dtype, int, bool]:
    """Smallest realistic (dtype, BitsStored, signed) holding [lo, hi]."""
    if lo >= 0:
        if hi > 65535:
            raise ValueError("stored values exceed 16 bits; choose another rescale")
        return np.dtype(np.uint16), (12 if hi < 4096 else 16), False
    if lo < -32768 or hi > 32767:
        raise ValueError("stored values exceed int16; choose another rescale")
    return np.dtype(np.int16), 16, True


def _check_rescale(slope: float, intercept: float) -> int:
    inv = 1.0 / slope
    if abs(inv - round(inv)) > 1e-9 or intercept != round(intercept):
        raise ValueError("rescale must have 1/slope and intercept integral so HU round-trips exactly")
    return int(round(inv))


# --------------------------------------------------------------------------------------------
# CT


@dataclass
class SeriesInfo:
    """A written CT series (or one Enhanced CT file) and the truth a reader must reproduce."""

    series_uid: str
    study: Study
    paths: list[str]
    modality: str
    spacing_zyx: tuple[float, float, float]  # mm
    shape_zyx: tuple[int, int, int]
    hu_lps: np.ndarray | None  # None when defective (or keep_volume=False)
    expected_reason: str | None  # None: must ingest; else the ledger reason code
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS mm of hu_lps[0, 0, 0]
    orientation: str = "axial"
    transfer_syntax: str = ExplicitVRLittleEndian
    sop_uids: list[str] = field(default_factory=list)
    frame_of_reference_uid: str = ""
    description: str = ""
    extra_uids: list[str] = field(default_factory=list)  # other generated UIDs (dimension org.)
    kind: str = "ct"  # "ct" (one file per slice) or "enhanced_ct" (one multi-frame file)


def _expected_ct_reason(localizer, n_slices, mixed_matrix_at, tilt_deg, duplicate_at, gap_after):
    """Precedence when several defects are combined (the corpus never combines them)."""
    if localizer:
        return "localizer"
    if n_slices <= TOO_FEW_SLICES:
        return "too_few_slices"
    if mixed_matrix_at is not None:
        return "mixed_geometry"
    if tilt_deg:
        return "gantry_tilt"
    if duplicate_at is not None:
        return "duplicate_position"
    if gap_after is not None:
        return "slice_gap"
    return None


def _ct_common(ds: Dataset, study: Study, *, series_uid: str, frame_uid: str, series_number: int,
               description: str, comment: str, slice_thickness: float) -> None:
    _plant_phi(ds, study, description, comment)
    ds.Modality = "CT"
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series_uid, frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SeriesNumber = series_number
    ds.Manufacturer, ds.ManufacturerModelName = "Radforge Phantom Systems", "PhantomCT 64"
    ds.KVP, ds.ConvolutionKernel = "120", "STANDARD"
    ds.SliceThickness = _ds(slice_thickness)
    ds.BodyPartExamined, ds.PatientPosition = "CHEST", "HFS"


def _slice_positions(n_slices: int, duplicate_at: int | None, gap_after: int | None) -> list[int]:
    """Position index along the slicing axis of each written slice (the defects bend it)."""
    pos = []
    for k in range(n_slices):
        p = k
        if duplicate_at is not None and k > duplicate_at:
            p -= 1
        if gap_after is not None and k > gap_after:
            p += 1
        pos.append(p)
    return pos


def _ct_grid(orientation: str, n_pos: int, rows: int, cols: int, pixel_spacing: tuple[float, float],
             slice_spacing: float, localizer: bool) -> tuple[int, tuple[int, int, int], tuple[float, float, float]]:
    """(slicing axis, LPS grid shape zyx, spacing zyx) of a series' volume."""
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}[orientation]
    inplane = {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}[orientation]
    shape, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    # a scout is a projection through the body, so give it depth to project through
    shape[axis], spacing[axis] = (max(n_pos, 24) if localizer else n_pos), float(slice_spacing)
    shape[inplane[0]], spacing[inplane[0]] = rows, float(pixel_spacing[0])
    shape[inplane[1]], spacing[inplane[1]] = cols, float(pixel_spacing[1])
    return axis, tuple(shape), tuple(spacing)


def _ct_planes(vol: np.ndarray, pos: list[int], orientation: str, axis: int, localizer: bool,
               origin: tuple[float, float, float], spacing: tuple[float, float, float],
               shear: float) -> tuple[list[np.ndarray], list[tuple[float, float, float]]]:
    """Each slice's HU plane (image rows first) and ImagePositionPatient, as ct_series writes them."""
    (x0, y0, z0), (dz, dy, dx), nz = origin, spacing, vol.shape[0]
    if localizer:  # projection radiograph-like scout, still stored as HU
        proj = np.rint(vol.astype(np.float32).mean(axis=axis)).astype(np.int16)
    planes, positions = [], []
    for k, p in enumerate(pos):
        if orientation == "axial":
            img = proj if localizer else vol[p]
            ipp = (x0, y0 + k * shear, z0 + p * dz)
        elif orientation == "coronal":
            img = (proj if localizer else vol[:, p, :])[::-1]
            ipp = (x0, y0 + p * dy, z0 + (nz - 1) * dz)
        else:
            img = (proj if localizer else vol[:, :, p])[::-1]
            ipp = (x0 + p * dx, y0, z0 + (nz - 1) * dz)
        planes.append(img)
        positions.append(ipp)
    return planes, positions


def ct_series(out_dir: str | os.PathLike, study: Study, *, n_slices: int = 24, rows: int = 64,
              cols: int = 64, pixel_spacing: tuple[float, float] = (0.8, 0.8),
              slice_spacing: float = 2.5, orientation: str = "axial", tilt_deg: float = 0.0,
              gap_after: int | None = None, duplicate_at: int | None = None,
              mixed_matrix_at: int | None = None, transfer_syntax: str = ExplicitVRLittleEndian,
              rescale: tuple[float, float] = (1.0, -1024.0), per_slice_rescale: bool = False,
              shuffle_names: bool = True, scramble_instance_numbers: bool = True,
              name_prefix: str = "", localizer: bool = False, extension: str = ".dcm",
              series_number: int = 1, keep_volume: bool = True, seed: int = 0) -> SeriesInfo:
    """Write one CT series, one file per slice, and return its geometry and HU truth.

    `rows`, `cols`, `pixel_spacing` (row spacing, column spacing) describe each image; the
    standard IOPs map them into LPS: axial images are (y, x) planes stacked along +z; coronal
    (row +x, column -z) are (z, x) planes stacked along +y; sagittal (row +y, column -z) are
    (z, y) planes stacked along +x. `hu_lps` is sampled on that grid, so for axial
    `sorted-by-z slice k == hu_lps[k]`, for coronal `slice k == hu_lps[::-1, k, :]`, for sagittal
    `slice k == hu_lps[::-1, :, k]`.

    Defects (each yields `expected_reason` and `hu_lps=None`): `gap_after=k` leaves out the
    position after slice k; `duplicate_at=k` repeats slice k's position (and pixels) once more;
    `tilt_deg` shifts ImagePositionPatient along y by tan(tilt)*spacing per slice while IOP stays
    axial (how gantry tilt appears, with GantryDetectorTilt set); `mixed_matrix_at=k` writes
    slice k at half the matrix; `localizer` writes LOCALIZER ImageType projections.
    Stored values are (HU - intercept) / slope exactly; 1/slope must be an integer.
    `per_slice_rescale` cycles slope/intercept per slice (a reader must rescale per file).
    UIDs derive from (study, seed, parameters): vary `seed` or `name_prefix` for distinct series.
    """
    if orientation not in _ORIENTATIONS:
        raise ValueError(f"orientation must be one of {sorted(_ORIENTATIONS)}")
    if tilt_deg and orientation != "axial":
        raise ValueError("gantry tilt is only modelled for axial series")
    slope0, intercept0 = rescale
    for m, b in [rescale, *(_RESCALE_CYCLE if per_slice_rescale else ())]:
        _check_rescale(m, b)
    ts = UID(transfer_syntax)
    key = ("ct", study.study_uid, seed, n_slices, rows, cols, pixel_spacing, slice_spacing,
           orientation, tilt_deg, gap_after, duplicate_at, mixed_matrix_at, str(ts), rescale,
           per_slice_rescale, name_prefix, localizer, series_number)
    rng = _rng(*key)
    series_uid, frame_uid = _uid(*key, "series"), _uid(*key, "frame")
    reason = _expected_ct_reason(localizer, n_slices, mixed_matrix_at, tilt_deg, duplicate_at, gap_after)

    pos = _slice_positions(n_slices, duplicate_at, gap_after)
    dr, dc = pixel_spacing
    axis, (nz, ny, nx), (dz, dy, dx) = _ct_grid(orientation, max(pos) + 1, rows, cols, pixel_spacing,
                                                slice_spacing, localizer)
    vol = chest_volume((nz, ny, nx), study, seed, spacing_zyx=(dz, dy, dx))
    x0 = round(-(nx - 1) * dx / 2, 2)
    y0 = round(-(ny - 1) * dy / 2 + float(rng.integers(-20, 21)), 2)
    z0 = round(-(nz - 1) * dz / 2 - 150 + float(rng.integers(-40, 41)) * 0.5, 2)
    row_dir, col_dir = _ORIENTATIONS[orientation]
    normal = np.cross(row_dir, col_dir)
    shear = math.tan(math.radians(tilt_deg)) * slice_spacing

    description = f"{PHI_MARKER} {orientation} {'scout' if localizer else 'chest'} {study.patient.family}"
    planes, positions = _ct_planes(vol, pos, orientation, axis, localizer, (x0, y0, z0), (dz, dy, dx), shear)
    scales = [_RESCALE_CYCLE[k % len(_RESCALE_CYCLE)] if per_slice_rescale else (slope0, intercept0) for k in range(n_slices)]

    stored = [((img.astype(np.int32) - int(b)) * _check_rescale(m, b)) for img, (m, b) in zip(planes, scales)]
    dtype, bits_stored, signed = _stored_dtype(min(int(s.min()) for s in stored), max(int(s.max()) for s in stored))
    order = rng.permutation(n_slices) if scramble_instance_numbers else np.arange(n_slices)
    instance_numbers = [int(i) + 1 for i in order]
    out_dir = Path(out_dir)
    paths, sops = [], []
    for k in range(n_slices):
        sop = _uid(*key, "sop", k)
        img = stored[k].astype(dtype)
        ps = (dr, dc)
        if mixed_matrix_at is not None and k == mixed_matrix_at:
            img, ps = img[::2, ::2], (dr * 2, dc * 2)
        ds = Dataset()
        _ct_common(ds, study, series_uid=series_uid, frame_uid=frame_uid, series_number=series_number,
                   description=description, comment=f"{PHI_MARKER} slice of {study.patient.patient_id}",
                   slice_thickness=slice_spacing)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL"]
        ds.InstanceNumber, ds.AcquisitionNumber = instance_numbers[k], 1
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = _ds(float(np.dot(positions[k], normal)))
        ds.PixelSpacing = [_ds(v) for v in ps]
        if tilt_deg:
            ds.GantryDetectorTilt = _ds(tilt_deg)
        _image_pixel(ds, img.shape[0], img.shape[1], bits_stored, signed)
        m, b = scales[k]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(b), _ds(m), "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        name = (hashlib.sha1(sop.encode()).hexdigest()[:12] if shuffle_names else f"{k:04d}")
        path = out_dir / f"{name_prefix}{name}{extension}"
        _write(ds, path, ts, img)
        paths.append(str(path))
        sops.append(sop)
    return SeriesInfo(
        series_uid=series_uid, study=study, paths=paths, modality="CT",
        spacing_zyx=(dz, dy, dx), shape_zyx=(nz, ny, nx),
        hu_lps=vol if (reason is None and keep_volume) else None, expected_reason=reason,
        origin_xyz=(x0, y0, z0), orientation=orientation, transfer_syntax=ts, sop_uids=sops,
        frame_of_reference_uid=frame_uid, description=description,
    )


def enhanced_ct(path: str | os.PathLike, study: Study, *, n_frames: int = 20, rows: int = 48,
                cols: int = 48, pixel_spacing: tuple[float, float] = (0.9, 0.9),
                slice_spacing: float = 2.0, shuffle_frames: bool = True,
                transfer_syntax: str = ExplicitVRLittleEndian, seed: int = 0) -> SeriesInfo:
    """One Enhanced CT Image Storage file (axial). Geometry lives only in the functional groups
    (shared: PixelMeasures, PlaneOrientation, PixelValueTransformation, FrameVOILUT; per frame:
    PlanePosition, FrameContent), as in the IOD; frames are stored in shuffled spatial order so
    a reader must sort by ImagePositionPatient, not trust frame order."""
    key = ("ect", study.study_uid, seed, n_frames, rows, cols, pixel_spacing, slice_spacing,
           shuffle_frames, str(transfer_syntax))
    rng = _rng(*key)
    series_uid, frame_uid, sop, dim_uid = (_uid(*key, s) for s in ("series", "frame", "sop", "dim"))
    dr, dc = pixel_spacing
    vol = chest_volume((n_frames, rows, cols), study, seed)
    x0, y0 = round(-(cols - 1) * dc / 2, 2), round(-(rows - 1) * dr / 2, 2)
    z0 = round(-(n_frames - 1) * slice_spacing / 2 - 140 + float(rng.integers(-20, 21)), 2)
    order = rng.permutation(n_frames) if shuffle_frames else np.arange(n_frames)
    description = f"{PHI_MARKER} enhanced chest {study.patient.family}"

    ds = Dataset()
    _ct_common(ds, study, series_uid=series_uid, frame_uid=frame_uid, series_number=2,
               description=description, comment=f"{PHI_MARKER} multiframe of {study.patient.patient_id}",
               slice_thickness=slice_spacing)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, sop
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber, ds.NumberOfFrames = 1, n_frames
    ds.ContentQualification, ds.BurnedInAnnotation, ds.LossyImageCompression = "PRODUCT", "NO", "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionDateTime = study.study_date + study.study_time
    _image_pixel(ds, rows, cols, 12, False)

    def item(**kw) -> Dataset:
        it = Dataset()
        for k, v in kw.items():
            setattr(it, k, v)
        return it

    shared = item(
        PixelMeasuresSequence=Sequence([item(PixelSpacing=[_ds(dr), _ds(dc)], SliceThickness=_ds(slice_spacing),
                                             SpacingBetweenSlices=_ds(slice_spacing))]),
        PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=["1.0", "0.0", "0.0", "0.0", "1.0", "0.0"])]),
        PixelValueTransformationSequence=Sequence([item(RescaleIntercept="-1024.0", RescaleSlope="1.0", RescaleType="HU")]),
        FrameVOILUTSequence=Sequence([item(WindowCenter="40", WindowWidth="400")]),
        CTImageFrameTypeSequence=Sequence([item(FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.DimensionOrganizationSequence = Sequence([item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionIndexSequence = Sequence([
        item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209056, FunctionalGroupPointer=0x00209111),
        item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209057, FunctionalGroupPointer=0x00209111),
    ])
    per_frame = []
    for k in order:  # frame i holds spatial slice order[i]
        per_frame.append(item(
            PlanePositionSequence=Sequence([item(ImagePositionPatient=[_ds(x0), _ds(y0), _ds(z0 + k * slice_spacing)])]),
            FrameContentSequence=Sequence([item(StackID="1", InStackPositionNumber=int(k) + 1,
                                                DimensionIndexValues=[1, int(k) + 1], FrameAcquisitionNumber=1)]),
        ))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    pixels = (vol[order].astype(np.int32) + 1024).astype(np.uint16)
    _write(ds, path, transfer_syntax, pixels)
    return SeriesInfo(
        series_uid=series_uid, study=study, paths=[str(path)], modality="CT",
        spacing_zyx=(float(slice_spacing), float(dr), float(dc)), shape_zyx=(n_frames, rows, cols),
        hu_lps=vol if n_frames > TOO_FEW_SLICES else None,
        expected_reason=None if n_frames > TOO_FEW_SLICES else "too_few_slices",
        origin_xyz=(x0, y0, z0), orientation="axial", transfer_syntax=UID(transfer_syntax),
        sop_uids=[sop], frame_of_reference_uid=frame_uid, description=description,
        extra_uids=[dim_uid], kind="enhanced_ct",
    )


# --------------------------------------------------------------------------------------------
# X-ray


@dataclass
class ImageInfo:
    """A written CR/DX image and its display truth."""

    path: str
    sop_uid: str
    series_uid: str
    study: Study
    modality: str
    photometric: str
    display: np.ndarray  # uint16, MONOCHROME2 sense (bright = dense), before any VOI
    stored: np.ndarray  # the exact stored values (display inverted for MONOCHROME1)
    marker_box: tuple[int, int, int, int]  # (r0, r1, c0, c1): brightest region, top-left
    bits_stored: int
    pixel_spacing: tuple[float, float]
    window: tuple[float, float] | None
    voi_lut: bool
    transfer_syntax: str
    description: str = ""
    expected_reason: str | None = None


def _voi_lut_item(bits_stored: int) -> Dataset:
    """A sigmoid VOI LUT: 4096 entries spanning the stored range, 12-bit output."""
    n = min(1 << bits_stored, 4096)
    step = (1 << bits_stored) // n
    x = np.arange(n) * step
    mid, width = (1 << bits_stored) / 2, (1 << bits_stored) / 4
    y = np.rint(4095 / (1 + np.exp(-(x - mid) / (width / 4)))).astype(int)
    it = Dataset()
    it.add_new(0x00283002, "US", [n if n < 65536 else 0, 0, 12])  # LUTDescriptor
    it.LUTExplanation = "SIGMOID"
    it.add_new(0x00283006, "US", [int(v) for v in y])  # LUTData
    return it


def xray(path: str | os.PathLike, study: Study, *, modality: str = "DX", rows: int = 300,
         cols: int = 240, photometric: str = "MONOCHROME2", bits_stored: int = 12,
         window: tuple[float, float] | None = (2048, 4096), voi_lut: bool = False,
         transfer_syntax: str = ExplicitVRLittleEndian, pixel_spacing: tuple[float, float] = (0.2, 0.2),
         seed: int = 0) -> ImageInfo:
    """Write one PA chest radiograph: DX (Digital X-Ray For Presentation) or CR.

    MONOCHROME1 stores `max - display` (and DX sets PresentationLUTShape INVERSE), so a reader
    that forgets the inversion sees the marker dark. `window` is (center, width) in stored
    values; `voi_lut` adds a VOILUTSequence (sigmoid), which takes precedence for display.
    """
    if modality not in ("DX", "CR"):
        raise ValueError("modality must be DX or CR")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    key = ("xray", study.study_uid, seed, modality, rows, cols, photometric, bits_stored,
           window, voi_lut, str(transfer_syntax), pixel_spacing)
    sop, series_uid = _uid(*key, "sop"), _uid(*key, "series")
    max_value = (1 << bits_stored) - 1
    display, box = chest_radiograph(rows, cols, study, max_value, seed)
    stored = (max_value - display) if photometric == "MONOCHROME1" else display
    stored = stored.astype(np.uint8 if bits_stored <= 8 else np.uint16)
    description = f"{PHI_MARKER} {modality} chest PA {study.patient.family}"

    ds = Dataset()
    _plant_phi(ds, study, description, f"{PHI_MARKER} radiograph of {study.patient.patient_id}")
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = modality, series_uid, 1, 1
    ds.SOPInstanceUID = sop
    ds.Manufacturer, ds.ManufacturerModelName = "Radforge Phantom Systems", f"Phantom{modality} 1"
    ds.KVP, ds.BodyPartExamined, ds.ViewPosition = "110", "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]  # columns run toward patient left, rows toward feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    if modality == "DX":
        ds.SOPClassUID = DigitalXRayImageStorageForPresentation
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
    else:
        ds.SOPClassUID = ComputedRadiographyImageStorage
    _image_pixel(ds, rows, cols, bits_stored, False, photometric)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = _ds(window[0]), _ds(window[1])
    if voi_lut:
        ds.VOILUTSequence = Sequence([_voi_lut_item(bits_stored)])
    _write(ds, path, transfer_syntax, stored)
    return ImageInfo(
        path=str(path), sop_uid=sop, series_uid=series_uid, study=study, modality=modality,
        photometric=photometric, display=display, stored=stored, marker_box=box,
        bits_stored=bits_stored, pixel_spacing=tuple(pixel_spacing), window=window, voi_lut=voi_lut,
        transfer_syntax=UID(transfer_syntax), description=description,
    )


# --------------------------------------------------------------------------------------------
# broken and unsupported files


def _other_modality(path: Path, study: Study, kind: str, key: tuple) -> list[str]:
    """A small, valid MR / US / SR file with planted PHI; returns its generated UIDs."""
    uids = [_uid(*key, kind, "series"), _uid(*key, kind, "sop")]
    ds = Dataset()
    _plant_phi(ds, study, f"{PHI_MARKER} {kind} {study.patient.family}", f"{PHI_MARKER} {kind} comment")
    ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber, ds.InstanceNumber = *uids, 9, 1
    ds.Manufacturer = "Radforge Phantom Systems"
    if kind == "SR":
        ds.Modality, ds.SOPClassUID = "SR", BasicTextSRStorage
        ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        ds.ContinuityOfContent = "SEPARATE"
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121070", "DCM", "Findings"
        ds.ConceptNameCodeSequence = Sequence([concept])
        text = Dataset()
        text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", study.report
        text.ConceptNameCodeSequence = Sequence([concept])
        ds.ContentSequence = Sequence([text])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
        return uids
    rng = _rng(*key, kind)
    if kind == "MR":
        ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
        ds.ImageType, ds.ScanningSequence, ds.SequenceVariant = ["ORIGINAL", "PRIMARY"], "SE", "NONE"
        _image_pixel(ds, 32, 32, 12, False)
        px = rng.integers(0, 4096, (32, 32), dtype=np.uint16)
    else:
        ds.Modality, ds.SOPClassUID = "US", UltrasoundImageStorage
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        _image_pixel(ds, 32, 32, 8, False, "RGB")
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    _write(ds, path, ExplicitVRLittleEndian, px)
    return uids


def _bad_files(out_dir: Path, study: Study, seed: int) -> tuple[dict[str, str], list[str]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = _rng("bad", seed)
    key = ("bad", study.study_uid, seed)
    bad: dict[str, str] = {}
    uids: list[str] = []

    def put(name: str, data: bytes, reason: str) -> None:
        (out_dir / name).write_bytes(data)
        bad[str(out_dir / name)] = reason

    put("empty.dcm", b"", "not_dicom")
    put("notes.dcm", b"Radiology department notes.\nThis is not a DICOM file.\n" * 8, "not_dicom")
    garbage = bytearray(rng.bytes(4096))
    garbage[128:132] = b"DIKM"  # never the magic by accident, whatever the seed
    garbage = bytes(garbage)
    put("garbage.bin", garbage, "not_dicom")
    # pydicom 3 does NOT raise on this: it "reads" one nonsense element and no file meta. The
    # ingest must notice the missing SOP Class UID / Modality and call it unreadable_header.
    put("smashed_header.dcm", b"\0" * 128 + b"DICM" + rng.bytes(2048), "unreadable_header")
    info = ct_series(out_dir / "_tmp", study, n_slices=4, rows=32, cols=32, seed=seed, name_prefix="trunc")
    uids += [info.series_uid, info.frame_of_reference_uid, *info.sop_uids]
    full = Path(info.paths[0]).read_bytes()
    shutil.rmtree(out_dir / "_tmp")
    put("truncated.dcm", full[: len(full) - 32 * 32], "truncated")  # cut half way into PixelData
    # A complete DX dataset without preamble/"DICM"/file meta (raw implicit VR LE stream).
    img = xray(out_dir / "_np.dcm", study, rows=40, cols=32, seed=seed)
    ds = pydicom.dcmread(img.path)
    os.remove(img.path)
    del ds.file_meta
    buf = io.BytesIO()
    ds.preamble = None
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    put("no_preamble.dcm", buf.getvalue(), NO_PREAMBLE_REASON)
    uids += [img.sop_uid, img.series_uid]
    for kind in ("MR", "US", "SR"):
        p = out_dir / f"{kind.lower()}.dcm"
        uids += _other_modality(p, study, kind, key)
        bad[str(p)] = "unsupported_modality"
    return bad, uids


def bad_files(out_dir: str | os.PathLike, study: Study | None = None, seed: int = 0) -> dict[str, str]:
    """Write files the ingest must ledger, not crash on: path -> reason code.

    zero-byte, text and random bytes -> not_dicom; preamble+DICM then garbage ->
    unreadable_header; a CT slice cut inside PixelData -> truncated; a complete dataset with no
    preamble -> NO_PREAMBLE_REASON (see its comment); MR, US and SR files ->
    unsupported_modality. Files carry `study`'s PHI (a dedicated patient by default).
    """
    study = study or make_study(make_patient(9999, seed), seed=seed)
    return _bad_files(Path(out_dir), study, seed)[0]


# --------------------------------------------------------------------------------------------
# real files shipped by installed packages

# group -> [(package, relative path, expected outcome in a corpus: None = ingested)]
_PACKAGE_FILES: dict[str, list[tuple[str, str, str | None]]] = {
    "ct_slices": [("pydicom", "CT_small.dcm", "too_few_slices"),
                  ("pydicom-data", "693_UNCR.dcm", "too_few_slices"),
                  ("pydicom-data", "693_J2KR.dcm", "too_few_slices"),
                  ("pydicom-data", "explicit_VR-UN.dcm", "too_few_slices")],
    "cr": [("pydicom-data", "RG1_UNCR.dcm", None), ("pydicom-data", "RG1_J2KR.dcm", None),
           ("pydicom-data", "RG3_UNCR.dcm", None), ("pydicom-data", "RG3_J2KR.dcm", None)],
    "dx": [("deid-data", "animals/cat.dcm", None)],
    "enhanced_ct": [("pydicom-data", "eCT_Supplemental.dcm", "too_few_slices")],  # 2 frames
    "unsupported": [("pydicom", "MR_small.dcm", "unsupported_modality"),
                    ("pydicom-data", "emri_small_jpeg_ls_lossless.dcm", "unsupported_modality"),
                    ("pydicom-data", "US1_UNCR.dcm", "unsupported_modality"),
                    ("pydicom", "test-SR.dcm", "unsupported_modality")],
}
# The subset build_corpus copies: one file per series (693_UNCR and 693_J2KR share a series and
# position, so copying both would turn two too_few_slices into a duplicate_position).
_CORPUS_PACKAGE = ("CT_small.dcm", "693_J2KR.dcm", "RG1_UNCR.dcm", "RG3_J2KR.dcm", "animals/cat.dcm",
                   "eCT_Supplemental.dcm", "MR_small.dcm", "emri_small_jpeg_ls_lossless.dcm",
                   "test-SR.dcm")


def _package_path(package: str, rel: str) -> str | None:
    if package == "deid-data":
        spec = importlib.util.find_spec("deid_data")
        if spec is None or not spec.submodule_search_locations:
            return None
        p = Path(list(spec.submodule_search_locations)[0]) / "data" / rel
        return str(p) if p.is_file() else None
    if package == "pydicom-data" and importlib.util.find_spec("data_store") is None:
        return None
    from pydicom.data import get_testdata_file

    try:  # download=False: never touch the network (pydicom 3 would fetch from GitHub)
        p = get_testdata_file(rel, download=False)
    except Exception:
        return None
    return str(p) if p and Path(p).is_file() else None


def package_files() -> dict[str, list[str]]:
    """Real DICOM shipped by installed packages, by group; missing packages give empty lists.

    Traps worth knowing: RG1 has PixelSpacing 0\\0 and RG3 none at all (CR often lacks it);
    eCT_Supplemental has IOP -1\\0\\0\\0\\1\\0 and 2 frames; explicit_VR-UN stores elements as UN;
    cat.dcm is a 2614x3072 DX with real-looking names.
    """
    out: dict[str, list[str]] = {}
    for group, entries in _PACKAGE_FILES.items():
        out[group] = [p for pkg, rel, _ in entries if (p := _package_path(pkg, rel))]
    return out


def _package_secrets(paths: Iterable[str]) -> list[str]:
    """Identifying values already inside package files (not marked; >= 6 chars to stay greppable)."""
    found: list[str] = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for kw in ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName",
                   "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                   "FrameOfReferenceUID"):
            v = ds.get(kw)
            if v is None:
                continue
            vals = [str(x) for x in (v if isinstance(v, (list, pydicom.multival.MultiValue)) else [v])]
            for s in vals:
                found += [s, *s.split("^")] if kw.endswith("Name") else [s]
    return list(dict.fromkeys(s.strip() for s in found if len(s.strip()) >= 6))


# --------------------------------------------------------------------------------------------
# tables and secrets


def write_tables(out_dir: str | os.PathLike, studies: Iterable[Study]) -> tuple[str, str]:
    """reports.csv (AccessionNumber, StudyInstanceUID, report) and labels.csv (AccessionNumber,
    one column per finding: 1/0/-1/blank). The report text carries PHI on purpose."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports, labels = out_dir / "reports.csv", out_dir / "labels.csv"
    studies = list(studies)
    with open(reports, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["AccessionNumber", "StudyInstanceUID", "report"])
        for s in studies:
            w.writerow([s.accession, s.study_uid, s.report])
    with open(labels, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["AccessionNumber", *FINDINGS])
        for s in studies:
            w.writerow([s.accession, *("" if s.findings.get(x) is None else s.findings[x] for x in FINDINGS)])
    return str(reports), str(labels)


def secrets(patients: Iterable[Patient], studies: Iterable[Study], series: Iterable[SeriesInfo],
            images: Iterable[ImageInfo], extra: Iterable[str] = ()) -> list[str]:
    """Every identifying string planted anywhere: a privacy test greps output bytes for each.

    Includes values that cannot carry PHI_MARKER (birth dates in DA/ISO/US form, all generated
    UIDs) and the marked ones (names and their parts, IDs, accession, institution, physicians).
    """
    out: list[str] = []
    for p in patients:
        out += [p.name, p.family, p.given, f"{p.given} {p.family}", p.patient_id, p.other_id,
                p.address, *p.birth_date_variants]
    for s in studies:
        out += [s.study_uid, s.accession, s.study_id, s.institution, s.institution_address, s.description]
        for pn in (s.referring_physician, s.requesting_physician, s.performing_physician, s.operator):
            out += [pn, *pn.split("^")]
    for se in series:
        out += [se.series_uid, se.frame_of_reference_uid, *se.sop_uids, se.description, *se.extra_uids]
    for im in images:
        out += [im.sop_uid, im.series_uid, im.description]
    out += list(extra)
    return list(dict.fromkeys(x for x in out if x))


# --------------------------------------------------------------------------------------------
# corpora


@dataclass
class Corpus:
    """A built corpus and everything a test needs to check an ingest run against it.

    `expected` holds:
      files          every regular file under dicom_dir
      ct_volumes     CT volumes that must come out (series + Enhanced CT files)
      ct_files       files belonging to those volumes
      xray_images    X-ray images that must come out (one file each)
      rejected       {reason: files}  every file of a rejected series counts
      skipped        {reason: files}  ("localizer")
      rejected_series / skipped_series  {reason: series} for series-level reasons only
    Invariant: files == ct_files + xray_images + sum(rejected) + sum(skipped).
    `outcome` maps every file to None (ingested) or its reason. `secrets` are the planted
    identifiers; `package_secrets` the unmarked ones already inside copied package files.
    """

    root: str
    dicom_dir: str
    reports_csv: str
    labels_csv: str
    patients: list[Patient]
    studies: list[Study]
    series: list[SeriesInfo]
    images: list[ImageInfo]
    bad: dict[str, str]
    package: dict[str, str | None]  # copied package file -> expected reason (None: ingested)
    outcome: dict[str, str | None]
    expected: dict
    secrets: list[str]
    package_secrets: list[str]


def _ct_recipes() -> list[tuple[str, str, dict]]:
    """(name, folder, ct_series kwargs). Folder "mixed" holds two series, "s1" an axial series and
    its scout; "implicit" is split across two folders by build_corpus."""
    enc = encodable_transfer_syntaxes()
    r = [("axial", "s1", {}),
         ("implicit", "s2", dict(transfer_syntax=ImplicitVRLittleEndian)),
         ("bigendian", "s3", dict(transfer_syntax=ExplicitVRBigEndian, extension="")),
         ("deflated", "s4", dict(transfer_syntax=DeflatedExplicitVRLittleEndian, shuffle_names=False))]
    for name, ts in (("rle", RLELossless), ("jpegls", JPEGLSLossless), ("j2k", JPEG2000Lossless)):
        if ts in enc:
            r.append((name, f"s_{name}", dict(transfer_syntax=ts, extension=".DCM" if name == "j2k" else ".dcm")))
    r += [("coronal", "mixed", dict(orientation="coronal", rows=48, n_slices=32)),
          ("sagittal", "mixed", dict(orientation="sagittal", rows=48, cols=56, n_slices=28, extension="")),
          ("per_slice_rescale", "s5", dict(per_slice_rescale=True, n_slices=16)),
          ("signed", "s6", dict(rescale=(1.0, 0.0), shuffle_names=False, scramble_instance_numbers=False)),
          ("gap", "s7", dict(gap_after=11)),
          ("duplicate", "s8", dict(duplicate_at=7)),
          ("tilt", "s9", dict(tilt_deg=15.0)),
          ("mixed_matrix", "s10", dict(mixed_matrix_at=5)),
          ("few", "s11", dict(n_slices=TOO_FEW_SLICES)),
          ("localizer", "s1", dict(localizer=True, n_slices=1, orientation="coronal", name_prefix="scout"))]
    return r


_XRAY_RECIPES: list[tuple[str, dict]] = [
    ("dx_m2.dcm", dict(modality="DX", photometric="MONOCHROME2")),
    ("dx_m1.dcm", dict(modality="DX", photometric="MONOCHROME1")),
    ("cr_m1_voilut.dcm", dict(modality="CR", photometric="MONOCHROME1", window=None, voi_lut=True)),
    ("cr_m2_rle.dcm", dict(modality="CR", photometric="MONOCHROME2", window=None, transfer_syntax=RLELossless,
                           pixel_spacing=(0.15, 0.15))),
    ("IMG0001", dict(modality="DX", photometric="MONOCHROME2", bits_stored=14, window=(8192, 16384),
                     transfer_syntax=JPEG2000Lossless)),
    ("dx_8bit.dcm", dict(modality="DX", photometric="MONOCHROME2", bits_stored=8, window=(128, 256),
                         transfer_syntax=ImplicitVRLittleEndian, rows=256, cols=208)),
]


def build_corpus(root: str | os.PathLike, *, n_patients: int = 6, seed: int = 0,
                 include_package_files: bool = True, include_bad: bool = True) -> Corpus:
    """Build root/dicom/... plus root/reports.csv and root/labels.csv (beside, not inside).

    Each patient has a CT study and an X-ray study; the CT recipes (every encodable transfer
    syntax, coronal/sagittal, per-slice rescale, signed storage, each defect, a localizer) and
    the X-ray recipes (DX/CR, MONOCHROME1/2, window, VOI LUT, 8/12/14 bits) are dealt round-robin
    over patients. Patient 0's folder is named after its PHI (real exports do this), so an
    ingest that copies source paths into outputs fails the privacy grep.
    """
    if n_patients < 1:
        raise ValueError("n_patients must be >= 1")
    root = Path(root)
    dicom = root / "dicom"
    patients = [make_patient(i, seed) for i in range(n_patients)]
    ct_studies = [make_study(p, 0, seed=seed) for p in patients]
    xr_studies = [make_study(p, 1, seed=seed) for p in patients]
    folders = [dicom / (f"{p.family}_{p.patient_id}" if p.index == 0 else f"pt{p.index:03d}") for p in patients]
    series = _corpus_ct(folders, ct_studies, seed)
    images: list[ImageInfo] = []
    for j in range(max(len(_XRAY_RECIPES), n_patients)):
        fname, kw = _XRAY_RECIPES[j] if j < len(_XRAY_RECIPES) else (f"dx_{j}.dcm", {})
        if UID(kw.get("transfer_syntax", ExplicitVRLittleEndian)) not in encodable_transfer_syntaxes():
            kw = {**kw, "transfer_syntax": ExplicitVRLittleEndian}
        i = j % n_patients
        images.append(xray(folders[i] / "xr" / fname, xr_studies[i], seed=seed * 1000 + j, **kw))

    bad: dict[str, str] = {}
    extra_patients, extra_studies, extra_uids = [], [], []
    if include_bad:
        bp = make_patient(n_patients, seed)
        bs = make_study(bp, 0, seed=seed)
        bad, extra_uids = _bad_files(dicom / "incoming" / "broken", bs, seed)
        extra_patients, extra_studies = [bp], [bs]

    package = _copy_package_files(dicom / "incoming" / "external") if include_package_files else {}
    studies = [s for s in ct_studies + xr_studies
               if any(x.study is s for x in series) or any(x.study is s for x in images)]
    reports_csv, labels_csv = write_tables(root, studies)
    outcome, expected = _corpus_expected(series, images, bad, package)
    return Corpus(
        root=str(root), dicom_dir=str(dicom), reports_csv=reports_csv, labels_csv=labels_csv,
        patients=patients, studies=studies, series=series, images=images, bad=bad, package=package,
        outcome=outcome, expected=expected,
        secrets=secrets(patients + extra_patients, studies + extra_studies, series, images, extra_uids),
        package_secrets=_package_secrets(package),
    )


def _corpus_ct(folders: list[Path], ct_studies: list[Study], seed: int) -> list[SeriesInfo]:
    """build_corpus's CT series: the recipes dealt round-robin over the patients' folders, then
    one enhanced multi-frame CT."""
    n_patients = len(folders)
    series: list[SeriesInfo] = []
    recipes = _ct_recipes()
    pinned: dict[str, int] = {}  # recipes sharing a folder (mixed, s1 + scout) share a patient
    for j in range(max(len(recipes), n_patients)):
        name, folder, kw = recipes[j] if j < len(recipes) else ("axial", f"s{j}", {})
        i = pinned.setdefault(folder, j % n_patients)
        info = ct_series(folders[i] / "ct" / folder, ct_studies[i], series_number=j + 1,
                         seed=seed * 1000 + j, **kw)
        if name == "implicit":  # one series split across two folders
            moved = []
            for k, p in enumerate(info.paths):
                if k % 2:
                    dest = folders[i] / "ct_part2" / Path(p).name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(p, dest)
                    p = str(dest)
                moved.append(p)
            info.paths = moved
        series.append(info)
    i = len(recipes) % n_patients
    series.append(enhanced_ct(folders[i] / "ct" / "enhanced" / "MF000001", ct_studies[i], seed=seed))
    return series


def _copy_package_files(dest_dir: Path) -> dict[str, str | None]:
    """The installed packages' real DICOM files that the corpus uses, copied into `dest_dir`:
    copied path → expected ingest reason (None: ingested)."""
    package: dict[str, str | None] = {}
    n = 0
    for entries in _PACKAGE_FILES.values():
        for pkg, rel, reason in entries:
            src = _package_path(pkg, rel) if rel in _CORPUS_PACKAGE else None
            if src:
                dest = dest_dir / f"ext_{n:03d}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
                package[str(dest)] = reason
                n += 1
    return package


def _corpus_expected(series: list[SeriesInfo], images: list[ImageInfo], bad: dict[str, str | None],
                     package: dict[str, str | None]) -> tuple[dict[str, str | None], dict]:
    """(file → expected reason, the accounting an ingest of the corpus must report)."""
    outcome: dict[str, str | None] = {}
    for s in series:
        outcome.update({p: s.expected_reason for p in s.paths})
    outcome.update({im.path: None for im in images})
    outcome.update(bad)
    outcome.update(package)
    series_level = [s.expected_reason for s in series if s.expected_reason] + \
                   [r for r in package.values() if r in SERIES_REASONS]
    per_file = Counter(r for r in outcome.values() if r)
    package_xrays = sum(1 for r in package.values() if r is None)
    expected = {
        "files": len(outcome),
        "ct_volumes": sum(1 for s in series if s.expected_reason is None),
        "ct_files": sum(len(s.paths) for s in series if s.expected_reason is None),
        "xray_images": len(images) + package_xrays,
        "rejected": {r: n for r, n in sorted(per_file.items()) if r not in SKIP_REASONS},
        "skipped": {r: n for r, n in sorted(per_file.items()) if r in SKIP_REASONS},
        "rejected_series": dict(sorted(Counter(r for r in series_level if r not in SKIP_REASONS).items())),
        "skipped_series": dict(sorted(Counter(r for r in series_level if r in SKIP_REASONS).items())),
    }
    return outcome, expected


def ct_slices_corpus(root: str | os.PathLike, *, n_series: int, n_slices: int, rows: int = 512,
                     cols: int = 512, transfer_syntax: str = ExplicitVRLittleEndian,
                     seed: int = 0) -> list[SeriesInfo]:
    """Plain valid axial series (one patient each) for the ingest benchmark. Volumes are not kept
    in memory (`hu_lps` is None although `expected_reason` is None) so large runs stay cheap."""
    out = []
    for i in range(n_series):
        study = make_study(make_patient(i, seed), seed=seed)
        out.append(ct_series(Path(root) / f"series{i:04d}", study, n_slices=n_slices, rows=rows, cols=cols,
                             pixel_spacing=(0.7, 0.7), slice_spacing=1.25, transfer_syntax=transfer_syntax,
                             keep_volume=False, seed=seed * 1000 + i))
    return out


@dataclass
class TrainingCorpus:
    """A clean, learnable corpus: every study's findings are drawn in its pixels and stated in its
    report, so a model that learns the pixel → report correspondence can be scored."""

    root: str
    dicom_dir: str
    reports_csv: str
    labels_csv: str
    studies: list[Study]
    files: int


def training_corpus(root: str | os.PathLike, *, n_patients: int = 120, with_ct: bool = True, with_xray: bool = True,
                    ct_slices: int = 16, ct_matrix: int = 48, xray_size: int = 128,
                    first_patient: int = 0, seed: int = 0, ct_lesions: bool = False) -> TrainingCorpus:
    """Write `n_patients` patients, each with a small CT series and/or a small DX radiograph, plus
    reports.csv / labels.csv, for training tests and the demo (fast to ingest: small matrices).

    Findings are drawn independently per study with P(positive) = 0.45, so every finding has both
    classes in any split of a few dozen patients. CT: `ct_slices` axial slices of `ct_matrix`² at
    2 mm in-plane and 4 mm apart (a 96 mm cube-ish field of view, resampled by ingest to the
    profile spacing); X-ray: `xray_size`² DX MONOCHROME2 at 0.2 mm. The headers carry the usual
    planted PHI, so privacy checks apply to training outputs too. Patients are numbered from
    `first_patient`, so a training corpus can sit beside `build_corpus` patients in one source
    without sharing IDs or accession numbers (merge the tables with `write_tables`).
    `ct_lesions`: a CT nodule is a small soft-tissue lesion (`LESION_MM` diameter, ±`LESION_HU`
    contrast, uniform; `Study.lesion`) instead of the large lung nodule, and its report says its size.
    """
    if n_patients < 1 or not (with_ct or with_xray):
        raise ValueError("need n_patients >= 1 and at least one of with_ct / with_xray")
    root = Path(root)
    dicom = root / "dicom"
    studies: list[Study] = []
    files = 0
    for i in range(first_patient, first_patient + n_patients):
        p = make_patient(i, seed)
        if with_ct:
            s = make_study(p, 0, seed=seed)
            if ct_lesions:
                r = _rng("lesion-size", s.study_uid, seed)
                s.lesion = (round(float(r.uniform(*LESION_MM)), 1),
                            float(r.choice((-1, 1)) * round(float(r.uniform(*LESION_HU)))))
            info = ct_series(dicom / f"pt{i:05d}" / "ct", s, n_slices=ct_slices, rows=ct_matrix, cols=ct_matrix,
                             pixel_spacing=(2.0, 2.0), slice_spacing=4.0, keep_volume=False, seed=seed * 100003 + i)
            studies.append(s)
            files += len(info.paths)
        if with_xray:
            s = make_study(p, 1, seed=seed)
            xray(dicom / f"pt{i:05d}" / "xr.dcm", s, rows=xray_size, cols=xray_size, seed=seed * 100003 + i)
            studies.append(s)
            files += 1
    reports_csv, labels_csv = write_tables(root, studies)
    return TrainingCorpus(root=str(root), dicom_dir=str(dicom), reports_csv=reports_csv, labels_csv=labels_csv,
                          studies=studies, files=files)


# --------------------------------------------------------------------------------------------
# real-archive variants of written files (issue 9): copies, acquisitions, header edits


def rewrite(src: str | os.PathLike, dest: str | os.PathLike, *, transfer_syntax: str | None = None,
            pixels: np.ndarray | None = None, new_sop: str | None = None, **attrs) -> str:
    """Write `src` again as `dest`: the same instance (same SOPInstanceUID) unless `new_sop`
    ("<anything>": a UID derived from it and the source's), optionally in another transfer
    syntax, with other stored `pixels` and with header attributes set (`attrs`, keyword → value;
    None deletes). What a PACS re-send, a copy in another folder or an edited export looks like."""
    ds = pydicom.dcmread(src)
    stored = ds.pixel_array if pixels is None else pixels
    if new_sop is not None:
        ds.SOPInstanceUID = _uid("rewrite", ds.SOPInstanceUID, new_sop)
    for kw, v in attrs.items():
        if v is None:
            if kw in ds:
                delattr(ds, kw)
        else:
            setattr(ds, kw, v)
    ts = UID(transfer_syntax or ds.file_meta.TransferSyntaxUID)
    del ds.PixelData  # `_write` attaches the stored values afresh (and compresses them for `ts`)
    _write(ds, dest, ts, np.ascontiguousarray(stored))
    return str(dest)


def second_acquisition(info: SeriesInfo, out_dir: str | os.PathLike, *, acquisition_number: int = 2,
                       hu_offset: int = 100) -> list[str]:
    """A second acquisition of `info`'s series at the same slice positions (same
    SeriesInstanceUID, new SOP instances, AcquisitionNumber `acquisition_number`, pixels
    `hu_offset` HU brighter): a contrast phase written into the series of the native scan."""
    out = []
    for k, p in enumerate(info.paths):
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array.astype(np.int32) + int(round(hu_offset / float(ds.RescaleSlope)))
        arr = arr.astype(ds.pixel_array.dtype)
        dest = Path(out_dir) / f"acq{acquisition_number}_{k:04d}.dcm"
        out.append(rewrite(p, dest, pixels=arr, new_sop=f"acq{acquisition_number}", AcquisitionNumber=acquisition_number))
    return out


def oriented_series(out_dir: str | os.PathLike, study: Study, *, row_dir, col_dir, n_slices: int = 12,
                    rows: int = 40, cols: int = 36, pixel_spacing: tuple[float, float] = (0.7, 0.9),
                    slice_spacing: float = 2.0, reverse_files: bool = False, origin=(10.0, -20.0, -140.0),
                    seed: int = 0) -> list[str]:
    """An axial-content CT series written with any orientation: images along `row_dir` /
    `col_dir` (unit cosines, PS3.3 C.7.6.2.1.1), slices stacked along their cross product, file
    names shuffled; `reverse_files` numbers the files against the stacking (feet-first archives).
    Pixels are a smooth random field in HU (no truth beyond the files: for comparing readers)."""
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    rng = _rng("oriented", study.study_uid, seed, tuple(row_dir), tuple(col_dir))
    base = rng.normal(0, 1, (n_slices, rows, cols)).cumsum(axis=2).cumsum(axis=1)
    hu = np.rint(base / np.abs(base).max() * 900 + 40).astype(np.int16)
    series_uid, frame_uid = _uid("oriented", study.study_uid, seed, "series"), _uid("oriented", study.study_uid, seed, "frame")
    out_dir = Path(out_dir)
    paths = []
    for k in range(n_slices):
        ds = Dataset()
        _ct_common(ds, study, series_uid=series_uid, frame_uid=frame_uid, series_number=1,
                   description=f"{PHI_MARKER} oriented", comment=f"{PHI_MARKER} slice", slice_thickness=slice_spacing)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, _uid("oriented", series_uid, k)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = (n_slices - k) if reverse_files else k + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [_ds(v) for v in np.asarray(origin) + k * slice_spacing * normal]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        _image_pixel(ds, rows, cols, 16, True)
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        name = hashlib.sha1(ds.SOPInstanceUID.encode()).hexdigest()[:12]
        _write(ds, out_dir / f"{name}.dcm", ExplicitVRLittleEndian, hu[k])
        paths.append(str(out_dir / f"{name}.dcm"))
    return paths
