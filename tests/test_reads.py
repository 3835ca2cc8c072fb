"""One read per file: the header scan reads a bounded prefix with range reads (storage.open_head),
and gives the same index row as a scan of the whole file; the build reads each file once, whole.

Fast tier (no Ray). Bytes on S3 are what moto's server sent (ContentLength of each GetObject
response), seen by a spy on the s3fs client, not our reader's own count.
"""

from __future__ import annotations

import io
import os

import pytest
from pydicom.uid import RLELossless

from radforge import config, deid, dicom, ingest, phantoms, storage


def _scan_whole(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    return dicom.scan(path, len(data), io.BytesIO(data))


def _scan_head(url: str, size: int) -> tuple[dict, storage.HeadReader]:
    with storage.open_head(url, size) as f:
        return dicom.scan(url, size, f), f


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory) -> str:
    """An Enhanced CT (RLE) whose header (functional groups of 60 frames) is longer than the first range."""
    path = str(tmp_path_factory.mktemp("reads") / "enhanced.dcm")
    study = phantoms.make_study(phantoms.make_patient(0), 0)
    phantoms.enhanced_ct(path, study, n_frames=60, rows=48, cols=48, transfer_syntax=RLELossless)
    return path


def _header_end(path: str) -> int:
    import pydicom

    with open(path, "rb") as f:
        pydicom.dcmread(f, stop_before_pixels=True)
        return f.tell()


def test_a_header_longer_than_the_first_range_scans_as_a_full_read(enhanced):
    size = os.path.getsize(enhanced)
    first = storage.head_first_range(size)
    assert first < _header_end(enhanced) < size  # the premise: one extension is needed
    row, f = _scan_head(enhanced, size)
    assert row["status"] == "ok" and row["n_frames"] == 60
    assert row == _scan_whole(enhanced)
    # the prefix, one extension, the 8-byte end-of-pixel-data check: never the file
    assert f.requests == 3
    assert f.bytes_fetched <= 4 * first + 8 < size


_SCAN_REASONS = {"not_dicom", "unreadable_header", "truncated", "inconsistent_meta"}


def test_hostile_and_truncated_files_keep_their_reject_reason(tmp_path, enhanced):
    expected = phantoms.bad_files(tmp_path / "bad")
    # cuts of a compressed multi-frame file: in the preamble, the file meta, the data set, just
    # before the pixel data, in the fragments, and its last byte (the sequence delimiter)
    data = open(enhanced, "rb").read()
    end = _header_end(enhanced)
    walked = set()
    for at in (100, 140, 4000, end, end + 6, end + 5000, len(data) - 1):
        p = tmp_path / f"cut-{at}.dcm"
        p.write_bytes(data[:at])
        expected[str(p)] = None
        if at > end + 8:
            walked.add(str(p))
    assert len(expected) > 10
    reasons = set()
    for path, reason in expected.items():
        size = os.path.getsize(path)
        row, f = _scan_head(path, size)
        assert row == _scan_whole(path), path
        if reason in _SCAN_REASONS:  # the others (unsupported_modality, ...) are planning's
            assert row["reason"] == reason, (path, row["reason"])
        if path in walked:  # a cut among the fragments: their headers are walked, in O(log) requests
            assert row["reason"] == "truncated" and f.requests <= 8
        else:
            assert f.bytes_fetched <= 4 * storage.head_first_range(size) + 8
        reasons.add(row["reason"])
    assert {"truncated", "not_dicom", "unreadable_header"} <= reasons


def test_header_limits_still_hold_on_range_reads(tmp_path):
    """The byte cap (HeaderLimits.max_bytes) is checked before reading: a 4 MB private value
    is refused with no more than the cap fetched."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = dicom.CT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.add_new((0x0009, 0x1001), "OB", bytes(4 * 1024 * 1024))
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(128)
    path = str(tmp_path / "blob.dcm")
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    size = os.path.getsize(path)
    limits = dicom.HeaderLimits(max_bytes=1024 * 1024)
    with storage.open_head(path, size) as f:
        assert dicom.scan(path, size, f, limits)["reason"] == "unreadable_header"
        assert f.bytes_fetched < limits.max_bytes
    row, f = _scan_head(path, size)  # under the default cap it scans, in O(log) requests
    assert row["status"] == "ok" and row == _scan_whole(path)
    assert f.requests <= 6


def test_a_small_slice_is_scanned_in_two_requests_of_a_few_percent(tmp_path):
    """A 256² RLE slice (≈ 72 KB): its header is in the first range (1/32 of the file), then the
    8 bytes at its end; a file of at most HEAD_WHOLE_MAX is read whole, in one request."""
    corpus = tmp_path / "ct"
    phantoms.ct_slices_corpus(corpus, n_series=1, n_slices=2, rows=256, cols=256, transfer_syntax=RLELossless)
    (path, size), _ = storage.find_files(str(corpus))
    row, f = _scan_head(path, size)
    assert row["status"] == "ok" and row == _scan_whole(path)
    assert (f.requests, f.bytes_fetched) == (2, size // 32 + 8) and size // 32 + 8 < 0.05 * size
    small = tmp_path / "small.dcm"
    small.write_bytes(open(path, "rb").read()[: storage.HEAD_WHOLE_MAX])  # a cut among the fragments
    row, f = _scan_head(str(small), storage.HEAD_WHOLE_MAX)
    assert row == _scan_whole(str(small)) and row["reason"] == "truncated"
    assert (f.requests, f.bytes_fetched) == (1, storage.HEAD_WHOLE_MAX)


def test_head_reader_matches_the_file_anywhere(tmp_path):
    data = os.urandom(300_000)
    p = tmp_path / "blob"
    p.write_bytes(data)
    with storage.open_head(str(p), len(data)) as f:
        for pos, n in [(0, 10), (5, 9000), (100_000, 50), (299_990, 100), (300_000, 5), (42, -1)]:
            f.seek(pos)
            assert f.read(n) == (data[pos:] if n < 0 else data[pos:pos + n])
        assert f.seek(-8, 2) == len(data) - 8 and f.read(8) == data[-8:]


@pytest.fixture
def s3_spy(s3_bucket, monkeypatch):
    """(bucket URL, calls): every S3 call as (method, key, Range, bytes the server sent)."""
    fs, _ = storage.url_to_fs(s3_bucket + "/x")
    calls: list[tuple] = []
    real = fs._call_s3

    async def spy(method, *args, **kwargs):
        out = await real(method, *args, **kwargs)
        calls.append((method, kwargs.get("Key"), kwargs.get("Range"), out.get("ContentLength")))
        return out

    monkeypatch.setattr(fs, "_call_s3", spy)
    return s3_bucket, calls


def test_s3_scan_reads_a_prefix_and_the_build_reads_each_file_once(s3_spy, tmp_path, enhanced):
    bucket, calls = s3_spy
    corpus = tmp_path / "ct"
    phantoms.ct_slices_corpus(corpus, n_series=1, n_slices=8, rows=128, cols=128, transfer_syntax=RLELossless)
    local = dict(storage.find_files(str(corpus)))
    local[enhanced] = os.path.getsize(enhanced)
    for path in local:
        storage.put_file_atomic(path, f"{bucket}/src/{os.path.basename(path)}")
    copied = sorted(local)[0]  # a second copy of one slice (same SOP Instance UID, same pixels)
    storage.put_file_atomic(copied, f"{bucket}/src/copy/{os.path.basename(copied)}")
    local[copied + "#copy"] = local[copied]
    listed = storage.find_files(bucket + "/src")
    assert len(listed) == 10
    calls.clear()

    rows = []
    for url, size in listed:
        row, _ = _scan_head(url, size)
        rows.append(row)
        key = url.split("/", 3)[3]
        gets = [c for c in calls if c[1] == key]
        assert all(m == "get_object" and r is not None for m, _, r, _ in gets)  # ranged GETs only, no HEAD
        first = storage.head_first_range(size)
        if key.endswith(os.path.basename(enhanced)):  # prefix, one extension, the end-of-pixel-data check
            assert len(gets) == 3 and sum(c[3] for c in gets) <= 4 * first + 8
        else:  # a slice: its first range holds the header; then the end of the pixel data (a small
            # file's rest in one extension, a large one's last 8 bytes)
            assert len(gets) == 2 and gets[0][2:] == (f"bytes=0-{first - 1}", first)
            assert gets[1][2].endswith(f"-{size - 1}") and gets[1][3] <= max(8, size - first)
        by_name = {os.path.basename(p): p for p in local if not p.endswith("#copy")}
        assert {**row, "path": None} == {**_scan_whole(by_name[os.path.basename(url)]), "path": None,
                                         "group_key": row["group_key"]}

    calls.clear()
    recipe = config.load(config.IngestRecipe, None, ["deid.demo_key=true"])
    # planning's comparison of copies, as ingest._pixel_digest_of does it (without the decoder child)
    digest = lambda row, limit: dicom.pixel_digest(storage.read_bytes(row["path"]), limit)  # noqa: E731
    ctx = dicom.PlanContext(recipe=recipe, pseudo=deid.Pseudonymizer(deid.DEMO_KEY), pixel_digest=digest)
    items = [it for it in dicom.plan_group([r for r in rows if r["modality"] == "CT" and r["n_frames"] == 1], ctx)]
    items += dicom.plan_group([r for r in rows if r["n_frames"] == 60], ctx)
    planned = [it for it in items if it.status == "planned"]
    assert len(planned) == 2 and [it.reason for it in items if it.status == "skipped"] == ["duplicate_instance"]
    sizes = dict(listed)
    name = os.path.basename(copied)
    # the one re-read there is: both copies of the duplicate, whole, to compare their pixels
    assert sorted(c[1] for c in calls) == sorted(k for k in (u.split("/", 3)[3] for u in sizes) if k.endswith(name))
    assert all(m == "get_object" and r is None and n == local[copied] for m, _, r, n in calls)
    calls.clear()
    for item in planned:
        ingest.make_sample(item, recipe, None)
    used = {p for it in planned for p in it.paths}  # the enhanced file is a path per frame
    assert len(used) == 8 + 1  # 8 slices (one of the two copies) and the enhanced file
    assert sorted(c[1] for c in calls) == sorted(u.split("/", 3)[3] for u in used)  # one call per file used
    for method, key, rng, nbytes in calls:
        assert method == "get_object" and rng is None and nbytes == sizes[f"{bucket}/{key}"]
