"""Hostile input: budgets before decoding, bounded header parsing, a fuzzer over header fields.

Each crafted case that could take memory or time runs in a child process under a watchdog
(RLIMIT_AS and a timeout): a regression fails the test instead of taking the machine down. The
child reports the reason it got, its peak RSS growth over the case and the seconds it took (the
bounds are on CPU seconds: a loaded machine does not count against them).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from radforge import config, deid, dicom, ingest, kinds, transforms

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = dicom.CT_STORAGE
REJECT = set(dicom.REJECT_REASONS)
PROFILE = transforms.Profile.from_recipe(config.IngestRecipe())
WATCHDOG_AS = 3 * 1024**3  # address space of a child case: far below what the bombs would take
WATCHDOG_S = 120


# ---------------------------------------------------------------------------------------------
# crafting


def header(rows: int, cols: int, *, modality: str = "DX", bits: int = 16, spp: int = 1, frames: int | None = None,
           ts: str = ExplicitVRLittleEndian) -> Dataset:
    """A minimal radiograph (or CT slice) header that plans: geometry only, no pixel data yet."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = CT if modality == "CT" else DX
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, uid
    ds.Modality = modality
    ds.PatientID = "hostile"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, 16), min(bits, 16) - 1
    ds.SamplesPerPixel = spp
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2" if spp == 1 else "RGB"
    if spp > 1:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if modality == "CT":
        ds.ImagePositionPatient = [0, 0, 0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def rle_frame(n_segments: int, segment: bytes) -> bytes:
    """An RLE frame: the 64-byte header (segment count, offsets) then the segments."""
    offsets = [64 + i * len(segment) for i in range(n_segments)] + [0] * (15 - n_segments)
    return struct.pack("<16I", n_segments, *offsets) + segment * n_segments


def rle_bomb(rows: int = 65535, cols: int = 65535) -> bytes:
    """~2 KB that a decoder would expand to rows × cols × 2 bytes: each replicate run
    (0x81, value) is 128 bytes of output."""
    ds = header(rows, cols, ts=RLELossless)
    ds.PixelData = encapsulate([rle_frame(2, b"\x81\x00" * 400)])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def native(rows: int, cols: int, pixels: bytes | None = None, **kw) -> bytes:
    ds = header(rows, cols, **kw)
    n = rows * cols * (kw.get("frames") or 1) * kw.get("spp", 1) * kw.get("bits", 16) // 8
    ds.PixelData = pixels if pixels is not None else bytes(n)
    ds["PixelData"].VR = "OW"
    return to_bytes(ds)


def sparse_giant(path, rows: int, cols: int) -> int:
    """A valid native 16-bit image of rows × cols written as a sparse file (its pixel data is
    zeros nobody stores): the header, a Pixel Data element of the full length, then a hole."""
    ds = header(rows, cols)
    ds.PixelData = b"\0\0"
    ds["PixelData"].VR = "OW"
    small = to_bytes(ds)
    n = rows * cols * 2
    at = small.rindex(b"\xe0\x7f\x10\x00")  # Pixel Data tag; explicit VR: OW, 2 reserved, 4-byte length
    head = small[:at] + b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<I", n)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + n)
    return len(head) + n


# ---------------------------------------------------------------------------------------------
# watchdog


CHILD = textwrap.dedent(
    """
    import io, json, os, resource, sys, time
    from radforge import config, deid, dicom, ingest, kinds, transforms
    path, how = sys.argv[1], sys.argv[2]
    profile = transforms.Profile.from_recipe(config.IngestRecipe())
    size = os.path.getsize(path)
    data = open(path, "rb").read() if how == "serve" else None
    def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before, t, cpu = rss(), time.perf_counter(), time.process_time()
    out = {}
    if how == "serve":  # serving: the request's bytes → canonical_from_files
        try:
            arr, _ = dicom.canonical_from_files([data], profile, image=kinds.XRAY)
            out["reason"] = None
        except dicom.Reject as e:
            out["reason"], out["detail"] = e.reason, e.detail
    else:  # ingest: scan the file → plan → build what was planned
        with open(path, "rb") as f:
            row = dicom.scan(path, size, f)
        ctx = dicom.PlanContext(recipe=config.IngestRecipe(), pseudo=__import__("radforge.deid").deid.Pseudonymizer(b"k"))
        (item,) = dicom.plan_group([row], ctx)
        out["reason"], out["detail"] = item.reason, item.detail
        if item.status == "planned":
            try:
                dicom.canonical(item, lambda p: open(p, "rb").read(), profile)
            except dicom.Reject as e:
                out["reason"] = e.reason
    out["seconds"], out["cpu_seconds"], out["rss_growth"] = time.perf_counter() - t, time.process_time() - cpu, rss() - before
    print(json.dumps(out))
    """
)


def run_case(path, how: str = "ingest", address_space: int = WATCHDOG_AS) -> dict:
    """Run one case in a child under RLIMIT_AS and a timeout → its report (reason, detail,
    seconds and cpu_seconds of the case, rss_growth in bytes). A child that dies or overruns fails the test."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True,
                       timeout=WATCHDOG_S, preexec_fn=limit, env=env)
    assert p.returncode == 0, f"case died (rc {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# 1. budgets before decoding


@pytest.mark.parametrize("how", ["ingest", "serve"])
def test_rle_decompression_bomb_is_too_large_without_decoding(tmp_path, how):
    data = rle_bomb()
    assert len(data) < 4096
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    out = run_case(path, how)
    assert out["reason"] == "too_large" and "8589672450 pixel bytes" in out["detail"]
    assert out["rss_growth"] < 32 * MB and out["cpu_seconds"] < 5, out


def test_valid_giant_image_is_too_large_without_reading_its_pixels(tmp_path):
    path = tmp_path / "giant.dcm"
    size = sparse_giant(path, 30000, 30000)  # 1.8 GB declared and present (as a hole)
    out = run_case(path, "ingest")
    assert out["reason"] == "too_large" and str(30000 * 30000 * 2) in out["detail"]
    assert out["rss_growth"] < 32 * MB and out["cpu_seconds"] < 5, (out, size)


def test_giant_upload_is_too_large_in_serve_without_decoding(tmp_path):
    path = tmp_path / "big.dcm"
    path.write_bytes(native(7000, 7000))  # 49 M pixels > the 40 M default; 98 MB of bytes
    out = run_case(path, "serve")
    assert out["reason"] == "too_large"
    assert out["rss_growth"] < 32 * MB, out  # the upload's own bytes are held before the case starts


def test_a_4k_dx_passes_the_default_budget_and_30000_squared_does_not():
    budget = config.XrayConfig().max_pixels
    assert 4096 * 4096 <= budget < 30000 * 30000
    rows = [dicom.scan("a", len(d), io.BytesIO(d)) for d in [native(64, 64)]]
    rows[0].update(rows=4096, cols=4096, pixel_bytes=4096 * 4096 * 2, size=4096 * 4096 * 2 + 1000)
    ctx = dicom.PlanContext(recipe=config.IngestRecipe(), pseudo=__import__("radforge.deid").deid.Pseudonymizer(b"k"))
    assert dicom.plan_group(rows, ctx)[0].status == "planned"
    rows[0].update(rows=30000, cols=30000, pixel_bytes=30000 * 30000 * 2, size=30000 * 30000 * 2 + 1000)
    assert dicom.plan_group(rows, ctx)[0].reason == "too_large"


@pytest.mark.parametrize("kw, pixels", [
    (dict(frames=40), 64 * 64 * 40),  # frames count
    (dict(spp=3), 64 * 64 * 3),  # samples per pixel count
    (dict(bits=32), 64 * 64 * 2),  # 32 bits allocated: two 16-bit pixels' worth
])
def test_every_header_factor_counts_against_the_budget(kw, pixels):
    data = native(64, 64, **kw)
    xray = config.XrayConfig(max_pixels=pixels - 1)
    with pytest.raises(dicom.Reject) as e:
        dicom.canonical_from_files([data], PROFILE, image=kinds.XRAY, xray=xray)
    assert e.value.reason == "too_large"


def test_ct_budget_is_per_file_before_any_decoding():
    data = native(2048, 2048, modality="CT")
    with pytest.raises(dicom.Reject) as e:
        dicom.canonical_from_files([data], PROFILE, image=kinds.CT, ct=config.CTConfig(max_voxels=1_000_000, min_slices=2))
    assert e.value.reason == "too_large" and "ct.max_voxels" in e.value.detail


def test_decode_refuses_a_file_that_grew_since_it_was_planned():
    small, big = native(32, 32), native(64, 64)
    ctx = dicom.PlanContext(recipe=config.IngestRecipe(), pseudo=__import__("radforge.deid").deid.Pseudonymizer(b"k"))
    (item,) = dicom.plan_group([dicom.scan("f", len(small), io.BytesIO(small))], ctx)
    assert item.decode_bytes == 32 * 32 * 2
    with pytest.raises(dicom.Reject) as e:
        dicom.canonical(item, {"f": big}.__getitem__, PROFILE)
    assert e.value.reason == "too_large"


def test_a_budgeted_rle_image_still_decodes():
    ds = header(64, 64, ts=RLELossless)
    ds.PixelData = encapsulate([rle_frame(2, (b"\x81\x07") * 32)])  # 32 runs × 128 B = one 64 × 64 byte plane per segment
    ds["PixelData"].VR = "OB"
    arr, meta = dicom.canonical_from_files([to_bytes(ds)], PROFILE, image=kinds.XRAY)
    assert arr.shape == (64, 64) and meta["modality"] == "DX"


# ---------------------------------------------------------------------------------------------
# 2. bounded header parsing


def test_zero_filled_dicm_file_is_unreadable_header_in_seconds(tmp_path):
    path = tmp_path / "zeros.dcm"
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        f.truncate(132 + 64 * MB)
    out = run_case(path, "ingest")
    # Before the element cap: ~0.35 CPU s per MB (~22 s for this file, 12 minutes for 2 GB). CPU, not
    # wall: 16.8 s wall at load ~15 failed a wall bound with the cap in place.
    assert out["reason"] == "unreadable_header" and out["cpu_seconds"] < 3, out
    assert out["rss_growth"] < 32 * MB, out


def test_element_cap_and_byte_cap():
    many = header(8, 8)
    for i in range(3000):  # private elements: legal, and each one costs a read
        many.add_new((0x0009, 0x1000 + i), "LO", "x")
    many.PixelData = bytes(128)
    many["PixelData"].VR = "OW"
    data = to_bytes(many)
    assert dicom.scan("f", len(data), io.BytesIO(data))["status"] == "ok"
    r = dicom.scan("f", len(data), io.BytesIO(data), dicom.HeaderLimits(max_elements=1000))
    assert r["reason"] == "unreadable_header"
    r = dicom.scan("f", len(data), io.BytesIO(data), dicom.HeaderLimits(max_bytes=10_000))
    assert r["reason"] == "unreadable_header"


def test_a_declared_4gb_header_value_is_refused_unallocated():
    ds = header(8, 8)
    ds.PixelData = bytes(128)
    ds["PixelData"].VR = "OW"
    data = to_bytes(ds)
    at = data.index(b"\x10\x00\x20\x00")  # PatientID (0010,0020), explicit VR LO: 2-byte length
    # Replace it by an OB private element declaring 0xFFFFFFF0 bytes.
    end = at + 8 + struct.unpack("<H", data[at + 6:at + 8])[0]
    evil = data[:at] + b"\x09\x00\x10\x00OB\0\0" + struct.pack("<I", 0xFFFFFFF0) + data[end:]
    t = time.perf_counter()
    r = dicom.scan("f", len(evil), io.BytesIO(evil))
    assert r["reason"] in ("unreadable_header", "truncated") and time.perf_counter() - t < 1


def test_a_huge_number_of_frames_beside_one_functional_group_scans_in_bounded_time(tmp_path):
    """Enhanced CT reads per-frame values from its functional groups: NumberOfFrames 2³¹-1 beside a
    one-item PerFrameFunctionalGroupsSequence must cost one group's lookups, not 2³¹ (the scan read
    frame values for every declared frame; it ran past the watchdog)."""
    from pydicom.sequence import Sequence

    ds = header(4, 4, modality="CT", frames=2**31 - 1)
    content = Dataset()
    content.TemporalPositionIndex = 1
    group = Dataset()
    group.FrameContentSequence = Sequence([content])
    ds.PerFrameFunctionalGroupsSequence = Sequence([group])
    ds.PixelData = bytes(32)
    ds["PixelData"].VR = "OW"
    path = tmp_path / "frames.dcm"
    path.write_bytes(to_bytes(ds))
    out = run_case(path, "ingest")
    assert out["reason"] is not None and out["cpu_seconds"] < 5 and out["rss_growth"] < 32 * MB, out
    row = dicom.scan(str(path), path.stat().st_size, io.BytesIO(path.read_bytes()))
    assert row["n_frames"] == 2**31 - 1 and row["attrs"]["frames"] == [{"TemporalPositionIndex": "1"}]


def test_deflate_bomb_is_refused_before_inflating():
    ds = header(1024, 1024, ts=DeflatedExplicitVRLittleEndian)
    ds.PixelData = bytes(1024 * 1024 * 2)
    ds["PixelData"].VR = "OW"
    data = to_bytes(ds)
    assert len(data) < 64 * 1024  # 2 MB of zeros deflate to a few KB
    assert dicom.scan("f", len(data), io.BytesIO(data))["status"] == "ok"
    r = dicom.scan("f", len(data), io.BytesIO(data), dicom.HeaderLimits(max_inflated_bytes=1024 * 1024))
    assert r["reason"] == "too_large"


# ---------------------------------------------------------------------------------------------
# 3. fuzzer over header fields


FUZZ_XRAY = config.XrayConfig(max_pixels=1 << 20)  # small budgets: what passes decodes quickly
FUZZ_CT = config.CTConfig(max_voxels=1 << 20, min_slices=2)
FUZZ_CASE_S = 2.0  # CPU seconds per case (process time: a loaded machine does not count against it)
_FUZZ_WARM: set[bool] = set()  # kinds (ct?) decoded once in this process
EMPTY_ENCAPSULATED = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)  # empty BOT, end
TS = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless]


@st.composite
def crafted(draw):
    side = st.one_of(st.integers(0, 80), st.sampled_from([1, 255, 256, 4096, 30000, 65535]))
    rows, cols = draw(side, label="Rows"), draw(side, label="Columns")
    frames = draw(st.one_of(st.none(), st.integers(-1, 3), st.sampled_from([1000, 2**31 - 1])), label="NumberOfFrames")
    bits = draw(st.sampled_from([16, 16, 8, 0, 1, 12, 32, 64]), label="BitsAllocated")
    spp = draw(st.sampled_from([1, 1, 1, 0, 3, 4]), label="SamplesPerPixel")
    ts = draw(st.sampled_from([TS[0], *TS]), label="TransferSyntax")
    modality = draw(st.sampled_from(["DX", "DX", "CT"]), label="Modality")
    ds = header(max(rows, 0), max(cols, 0), modality=modality, bits=max(bits, 1), spp=max(spp, 1), frames=frames, ts=ts)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = rows, cols, bits, spp
    if ts in (RLELossless, JPEG2000Lossless):
        sizes = draw(st.lists(st.integers(2, 3000), min_size=0, max_size=4), label="fragment sizes")
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        frags = [rng.bytes(n + n % 2) for n in sizes]
        if ts == RLELossless and frags and draw(st.booleans()):
            frags[0] = rle_frame(draw(st.integers(0, 15)), frags[0][:256])
        ds.PixelData = encapsulate(frags) if frags else EMPTY_ENCAPSULATED
        ds["PixelData"].VR = "OB"
    else:
        need = rows * cols * max(frames or 1, 1) * max(spp, 1) * max(bits, 1) // 8
        n = draw(st.sampled_from([need, max(need - 2, 0), need + 2, 0]), label="pixel bytes") if need < 200_000 else 16
        ds.PixelData = bytes(n + n % 2)
        ds["PixelData"].VR = "OW"
    return ds


IN_WATCHDOG = os.environ.get("RADFORGE_HOSTILE_CHILD") == "1"


FUZZ_EXAMPLES = int(os.environ.get("RADFORGE_FUZZ_EXAMPLES", "200"))
_FUZZ_CASES = [0]  # examples run in this process
# The child calls the hypothesis test directly, not through a child pytest, whose start-up (plugins,
# collection) cost ~2 CPU s of the ~9 the test took.
FUZZ_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); import test_hostile as t; "
              "t.test_fuzz_header_fields_give_a_reason_or_an_array_in_budget(); print('FUZZED', t._FUZZ_CASES[0])")


def test_fuzzer_runs_under_a_watchdog():
    """The fuzzer below runs in a child under RLIMIT_AS and a timeout: with a budget regression a
    decoder would otherwise allocate gigabytes in this process (or abort it)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (WATCHDOG_AS, WATCHDOG_AS))

    env = {**os.environ, "RADFORGE_HOSTILE_CHILD": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", FUZZ_CHILD, os.path.dirname(os.path.abspath(__file__))], env=env,
                       capture_output=True, text=True, timeout=WATCHDOG_S, preexec_fn=limit)
    ran = [int(ln.split()[1]) for ln in p.stdout.splitlines() if ln.startswith("FUZZED ")]
    assert p.returncode == 0 and ran and ran[0] >= FUZZ_EXAMPLES, (p.returncode, p.stdout[-3000:], p.stderr[-3000:])


@pytest.mark.skipif(not IN_WATCHDOG, reason="run in a child by test_fuzzer_runs_under_a_watchdog")
@settings(deadline=None, max_examples=FUZZ_EXAMPLES, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ds=crafted())
def test_fuzz_header_fields_give_a_reason_or_an_array_in_budget(ds):
    _FUZZ_CASES[0] += 1
    ct = ds.Modality == "CT"
    try:
        datas = [to_bytes(ds)]
        if ct:  # a second slice 1 mm along the normal: the smallest series that plans
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ImagePositionPatient = [0, 0, 1]
            datas.append(to_bytes(ds))
    except Exception:  # noqa: BLE001 — pydicom refused to write this combination: nothing to test
        return
    if ct not in _FUZZ_WARM:  # the first decode of a kind pays one-time imports (≈ 2 CPU s on a slow core): not a case's cost
        with contextlib.suppress(dicom.Reject):
            dicom.canonical_from_files(datas, PROFILE, image=kinds.CT if ct else kinds.XRAY, ct=FUZZ_CT, xray=FUZZ_XRAY)
            _FUZZ_WARM.add(ct)
    t = time.process_time()
    try:
        arr, meta = dicom.canonical_from_files(datas, PROFILE, image=kinds.CT if ct else kinds.XRAY, ct=FUZZ_CT,
                                               xray=FUZZ_XRAY)
    except dicom.Reject as e:
        assert e.reason in REJECT | set(dicom.SKIP_REASONS) and str(e) == e.reason
    else:
        if ct:
            assert arr.ndim == 3 and 2 * ds.Rows * ds.Columns <= FUZZ_CT.max_voxels
        else:
            assert arr.ndim == 2 and ds.Rows * ds.Columns <= FUZZ_XRAY.max_pixels
    assert time.process_time() - t < FUZZ_CASE_S


# ---------------------------------------------------------------------------------------------
# 4. a decoder that aborts costs one sample, not the build task


class AbortWhenRead:
    """Stands in for a sample whose decoding aborts the process (pylibjpeg-rle under a memory
    limit): the child aborts as it takes it off the pipe. It pickles as a call of `os.abort`, so the
    children run the default decoder and import nothing of the tests (a decoder function defined
    here made each of the two spawned children import this module, hypothesis included: the test's
    CPU 9.6 -> 7.7 s at load ~8)."""

    def __reduce__(self):
        return os.abort, ()


def test_a_decoder_that_aborts_costs_one_sample(tmp_path):
    ctx = dicom.PlanContext(recipe=config.IngestRecipe(), pseudo=deid.Pseudonymizer(b"k"))
    path = tmp_path / "small.dcm"
    path.write_bytes(native(32, 32))
    (small,) = dicom.plan_group([dicom.scan(str(path), path.stat().st_size, open(path, "rb"))], ctx)
    dec = ingest._Decoder()
    try:
        assert dec.canonical(small, PROFILE)[0].shape == (32, 32)
        with pytest.raises(dicom.Reject) as e:
            dec.canonical(AbortWhenRead(), PROFILE)
        assert e.value.reason == "decode_error" and "died" in e.value.detail
        assert dec.canonical(small, PROFILE)[0].shape == (32, 32)  # a new child took over
    finally:
        dec._stop()


def test_declared_pixel_bytes_is_what_pydicom_expects_for_every_test_file():
    """The budget's figure agrees with pydicom's own expected length on its test files (every
    transfer syntax, 1-bit to 32-bit, multi-frame, colour): the budget measures what decoders
    allocate."""
    import glob

    import pydicom.data
    from pydicom.pixels.utils import get_expected_length

    checked = 0
    # The files shipped with pydicom (get_testdata_files would try to download the rest).
    for path in sorted(glob.glob(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "**", "*.dcm"), recursive=True)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's own notes on its odd test files
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            expected = get_expected_length(ds, unit="bytes")
        except Exception:  # noqa: BLE001 — files without an image (or a readable header)
            continue
        if not isinstance(expected, int):  # a malformed Rows (badVR.dcm) multiplies strings
            continue
        with open(path, "rb") as f:
            row = dicom.scan(path, os.path.getsize(path), f)
        if row["status"] == "ok":
            if "422" in str(ds.get("PhotometricInterpretation", "")):
                # Subsampled YBR stores 2/3 of it; the decoder still returns every sample.
                assert row["pixel_bytes"] == expected * 3 // 2, path
            else:
                assert row["pixel_bytes"] == expected, path
            checked += 1
    assert checked > 50


def test_decoding_applies_the_header_caps_again():
    """A file swapped after its scan (same name, a stalling header) is refused at decode too."""
    good = native(32, 32)
    ctx = dicom.PlanContext(recipe=config.IngestRecipe(), pseudo=deid.Pseudonymizer(b"k"))
    (item,) = dicom.plan_group([dicom.scan("f", len(good), io.BytesIO(good))], ctx)
    stall = header(32, 32)
    for i in range(3000):
        stall.add_new((0x0009, 0x1000 + i), "LO", "x")
    stall.PixelData = bytes(32 * 32 * 2)
    stall["PixelData"].VR = "OW"
    swapped = {"f": to_bytes(stall)}
    assert dicom.canonical(item, swapped.__getitem__, PROFILE)[0].shape == (32, 32)  # within the default caps
    capped = dicom.HeaderLimits(max_elements=1000)
    with pytest.raises(dicom.Reject) as e:
        dicom._decode(swapped["f"], capped)
    assert e.value.reason == "unreadable_header"
