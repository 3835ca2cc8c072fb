"""radforge.shardspec: samples round-trip exactly, the manifest adds up and is checked on read,
and shards written by stock webdataset are streamed back."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from radforge import config, shardspec
from radforge.transforms import Profile
from radforge.config import IngestRecipe
from radforge.errors import ConfigError

CT_META = {"modality": "CT", "shape": [5, 6, 7], "split": "train"}
XR_META = {"modality": "DX", "shape": [40, 30], "split": "val"}


def _ct(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1024, 3072, size=(5, 6, 7)).astype(np.int16)
    vol[0, 0, 0], vol[-1, -1, -1] = -1024, 32767  # the clip range's ends
    return vol


def _xray(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 65536, size=(40, 30)).astype(np.uint16)
    img[0, 0], img[-1, -1] = 0, 65535
    return img


# ----------------------------------------------------------------------------- samples


def test_ct_sample_round_trip_is_exact():
    vol = _ct()
    members = shardspec.encode_sample("a" * 24, vol, CT_META, report="No acute finding.")
    assert set(members) == {"npy", "json", "txt"}
    arr, meta, report = shardspec.decode_sample(members)
    assert arr.dtype == np.int16 and arr.shape == vol.shape
    np.testing.assert_array_equal(arr, vol)
    assert meta == CT_META and report == "No acute finding."
    # Stock numpy reads the member (the format is plain .npy, no pickle).
    np.testing.assert_array_equal(np.load(io.BytesIO(members["npy"]), allow_pickle=False), vol)


def test_non_contiguous_ct_arrays_are_stored_in_array_order():
    vol = np.ascontiguousarray(_ct()[:, ::-1, :])[:, ::-1, :]  # a view with negative strides
    arr, _, _ = shardspec.decode_sample(shardspec.encode_sample("k", vol, CT_META))
    np.testing.assert_array_equal(arr, vol)


def test_xray_sample_round_trip_is_exact_16_bit_png():
    img = _xray()
    members = shardspec.encode_sample("b" * 24, img, XR_META)
    assert set(members) == {"png", "json"}  # no report -> no txt member
    assert members["png"][:8] == b"\x89PNG\r\n\x1a\n"
    arr, meta, report = shardspec.decode_sample(members)
    assert arr.dtype == np.uint16 and arr.shape == img.shape
    np.testing.assert_array_equal(arr, img)
    assert meta == XR_META and report is None


def test_metadata_json_is_canonical_and_reports_are_utf8():
    members = shardspec.encode_sample("k", _xray(), {"z": 1, "a": [1, 2], **XR_META}, report="Épanchement — none")
    text = members["json"].decode()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert members["txt"].decode("utf-8") == "Épanchement — none"


@pytest.mark.parametrize("key", ["a.b", "a/b", "train/x", "x.npy"])
def test_sample_keys_may_not_contain_dots_or_slashes(key):
    with pytest.raises(ValueError, match="may not contain"):
        shardspec.encode_sample(key, _ct(), CT_META)


@pytest.mark.parametrize(
    "array, meta",
    [
        (_ct().astype(np.float32), CT_META),
        (_ct()[0], CT_META),  # 2-D for CT
        (_xray().astype(np.int16), XR_META),
        (_xray()[None], XR_META),  # 3-D for X-ray
    ],
)
def test_wrong_dtype_or_rank_is_refused(array, meta):
    with pytest.raises(ValueError):
        shardspec.encode_sample("k", array, meta)


def test_shard_names_are_deterministic():
    assert shardspec.shard_name("train", 42) == "train/train-000042.tar"
    assert shardspec.shard_name("val", 0) == "val/val-000000.tar"


# ----------------------------------------------------------------------------- profile


def test_profile_id_is_stable_and_tracks_what_changes_stored_arrays():
    base = Profile.from_recipe(IngestRecipe()).to_dict()
    assert Profile.from_dict(base) == Profile.from_recipe(IngestRecipe())  # the JSON form round-trips
    assert len(base["profile_id"]) == 12 and base["ct"]["spacing_mm"] == [3.0, 1.5, 1.5]
    json.dumps(base)  # JSON-able as it goes into the manifest

    def pid(*sets):
        return Profile.from_recipe(config.load(IngestRecipe, None, list(sets))).profile_id

    assert pid() == base["profile_id"]
    assert pid("ct.spacing_mm=[2, 1.5, 1.5]") != base["profile_id"]
    assert pid("xray.longest_side=512") != base["profile_id"]
    assert pid("xray.voi=none") != base["profile_id"]
    # Settings that do not change a stored array, and the recipe's name, keep the id.
    assert pid("ct.min_slices=3", "shards.target_mb=1", "name=other") == base["profile_id"]
    # 3 and 3.0 are the same spacing.
    assert pid("ct.spacing_mm=[3, 1.5, 1.5]") == base["profile_id"]


# ----------------------------------------------------------------------------- manifest

RECORDS = [
    {"path": "val/val-000000.tar", "split": "val", "samples": 2, "bytes": 200, "sha256": "c" * 64,
     "modalities": {"DX": 2}, "extra": "dropped"},
    {"path": "train/train-000001.tar", "split": "train", "samples": 3, "bytes": 300, "sha256": "b" * 64,
     "modalities": {"CT": 1, "CR": 2}},
    {"path": "train/train-000000.tar", "split": "train", "samples": 4, "bytes": 400, "sha256": "a" * 64,
     "modalities": {"CT": 3, "DX": 1}},
    {"path": "test/test-000000.tar", "split": "test", "samples": 0, "bytes": 0, "sha256": "d" * 64,
     "modalities": {}},
]
INPUTS = {"seen": 30, "used": 20, "skipped": {"localizer": 2}, "rejected": {"slice_gap": 5, "not_dicom": 3}}


def _manifest(records=RECORDS, inputs=INPUTS) -> dict:
    recipe = IngestRecipe()
    m = shardspec.new_manifest(
        profile=Profile.from_recipe(recipe),
        recipe=config.to_dict(recipe),
        deid={"pseudonyms": "hmac-sha256", "demo_key": False, "keep_age_sex": False},
        plan_digest="p" * 16,
    )
    return shardspec.finalize(m, [dict(r) for r in records], dict(inputs))


def test_finalize_totals_and_accounting():
    m = _manifest()
    assert m["schema"] == "radforge.shards" and m["schema_version"] == shardspec.SCHEMA_VERSION
    assert [s["path"] for s in m["shards"]] == ["train/train-000000.tar", "train/train-000001.tar", "val/val-000000.tar"]
    assert all(set(s) == {"path", "split", "samples", "bytes", "sha256", "modalities", "version"} for s in m["shards"])
    assert m["version"] == 1 and [v["version"] for v in m["versions"]] == [1] and m["superseded"] == []
    t = m["totals"]
    assert t["shards"] == 3 and t["samples"] == 9 and t["bytes"] == 900
    assert t["by_modality"] == {"CR": 2, "CT": 4, "DX": 3}
    assert t["by_split"] == {
        "train": {"shards": 2, "samples": 7, "bytes": 700, "modalities": {"CT": 4, "DX": 1, "CR": 2}},
        "val": {"shards": 1, "samples": 2, "bytes": 200, "modalities": {"DX": 2}},
    }
    assert sum(t["by_modality"].values()) == t["samples"]
    assert m["inputs"] == INPUTS and shardspec.reconciles(m["inputs"])
    json.loads(json.dumps(m))


def test_append_version_keeps_old_shards_supersedes_and_counts_live_samples(tmp_path):
    """Version 2 on top of version 1: old entries unchanged, new ones after them, a superseded
    sample out of the totals and of iter_samples' stream, each version's own accounting kept."""
    v1 = _manifest()
    new = shardspec.new_manifest(profile=Profile.from_recipe(IngestRecipe()), recipe={}, deid={}, plan_digest="q" * 16)
    new["version"] = 2
    added = {"path": shardspec.shard_name("train", 0, 2), "split": "train", "samples": 2, "bytes": 50,
             "sha256": "e" * 64, "modalities": {"CT": 2}}
    mine = {"seen": 9, "used": 9, "skipped": {}, "rejected": {}}
    shardspec.finalize(new, [added], mine)
    gone = [{"key": "k1", "shard": "train/train-000000.tar", "split": "train", "modality": "CT"}]
    total = {"seen": 36, "used": 26, "skipped": {"localizer": 2}, "rejected": {"slice_gap": 5, "not_dicom": 3}}
    v2 = shardspec.append_version(v1, new, gone, total)
    assert added["path"] == "train/train-v0002-000000.tar"
    assert v2["shards"][:3] == v1["shards"] and v2["shards"][3]["version"] == 2
    assert v2["totals"]["samples"] == 9 + 2 - 1 and v2["totals"]["by_split"]["train"]["modalities"]["CT"] == 4 + 2 - 1
    assert v2["superseded"] == [{**gone[0], "by_version": 2}] and shardspec.superseded(v2) == {"train/train-000000.tar": {"k1"}}
    assert [v["version"] for v in v2["versions"]] == [1, 2] and v2["versions"][1]["inputs"] == mine
    assert v2["versions"][1]["shards"] == [added["path"]] and v2["inputs"] == total and shardspec.reconciles(total)
    assert v1["versions"][0] == v2["versions"][0] and v1["shards"] == v2["shards"][:3]  # v1 itself untouched
    # read_manifest pins a version through manifests/vN.json
    for m in (v1, v2):
        _write_json(tmp_path / shardspec.manifest_path(m["version"]), m)
    _write_json(tmp_path / shardspec.MANIFEST, v2)
    assert shardspec.read_manifest(str(tmp_path), version=1) == v1 and shardspec.read_manifest(str(tmp_path)) == v2


def test_finalize_does_not_depend_on_record_order():
    assert _manifest(RECORDS) == _manifest(list(reversed(RECORDS)))


def test_reconciles():
    assert shardspec.reconciles({"seen": 0, "used": 0, "skipped": {}, "rejected": {}})
    assert shardspec.reconciles(INPUTS)
    assert not shardspec.reconciles({**INPUTS, "seen": 31})
    assert not shardspec.reconciles({**INPUTS, "rejected": {"slice_gap": 5}})


def _write_json(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_read_manifest_from_the_directory_or_the_file(tmp_path):
    m = _manifest()
    _write_json(tmp_path / "set" / "manifest.json", m)
    assert shardspec.read_manifest(str(tmp_path / "set")) == m
    assert shardspec.read_manifest(str(tmp_path / "set" / "manifest.json")) == m
    assert shardspec.read_manifest(f"file://{tmp_path}/set") == m


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        shardspec.read_manifest(str(tmp_path / "nothing"))
    msg = str(info.value)
    assert "no manifest" in msg and "manifest.json" in msg and "\n" not in msg

    _write_json(tmp_path / "other" / "manifest.json", {"schema": "something.else", "schema_version": 1})
    with pytest.raises(ConfigError, match="not a radforge shard manifest"):
        shardspec.read_manifest(str(tmp_path / "other"))

    newer = _manifest()
    newer["schema_version"] = shardspec.SCHEMA_VERSION + 1
    _write_json(tmp_path / "newer" / "manifest.json", newer)
    with pytest.raises(ConfigError) as info:
        shardspec.read_manifest(str(tmp_path / "newer"))
    assert f"schema version {shardspec.SCHEMA_VERSION + 1}" in str(info.value) and "upgrade" in str(info.value)


def test_format_summary_has_the_counts_and_reasons():
    text = shardspec.format_summary(_manifest(), wall_s=2.0, title="my shards")
    lines = text.splitlines()
    assert lines[0] == "my shards" and lines[1] == "=" * len("my shards")

    def row(label):
        return next(ln for ln in lines if ln.strip().startswith(label))

    assert row("files seen").split()[-1] == "30"
    assert row("files used").split()[-1] == "20"
    assert "localizer 2" in row("files skipped") and " 2 " in row("files skipped")
    assert row("files rejected").split()[-1] == "8"
    assert row("slice_gap").split()[-1] == "5" and row("not_dicom").split()[-1] == "3"
    assert "yes" in row("accounting")
    assert row("CT volumes").split()[-1] == "4"
    assert "5" in row("X-ray images") and "CR 2" in row("X-ray images") and "DX 3" in row("X-ray images")
    assert row("samples").split()[-1] == "9"
    assert "0.0 MB" in row("shards")
    assert "7" in row("train") and "2 shard(s)" in row("train")
    assert _manifest()["profile"]["profile_id"] in row("profile")
    assert "15.0 files/s" in row("wall time")
    assert "DEMO KEY" not in text


def test_format_summary_flags_bad_accounting_and_demo_keys():
    m = _manifest(inputs={**INPUTS, "seen": 99})
    m["deid"]["demo_key"] = True
    text = shardspec.format_summary(m)
    assert "NO" in next(ln for ln in text.splitlines() if "accounting" in ln)
    assert "DEMO KEY" in text


# ----------------------------------------------------------------------------- streaming


def _write_shard(path, samples) -> None:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for key, arr, meta, report in samples:
            members = shardspec.encode_sample(key, arr, meta, report)
            w.write({"__key__": key, **members})


@pytest.fixture
def shard_set(tmp_path):
    """Two splits written with webdataset.TarWriter, plus a manifest listing them."""
    dest = tmp_path / "set"
    train = [(f"{i:024x}", _ct(i), {**CT_META, "i": i}, f"report {i}") for i in range(3)]
    val = [(f"{100 + i:024x}", _xray(i), {**XR_META, "i": i}, None) for i in range(2)]
    _write_shard(dest / shardspec.shard_name("train", 0), train)
    _write_shard(dest / shardspec.shard_name("val", 0), val)
    records = [
        {"path": shardspec.shard_name("train", 0), "split": "train", "samples": 3,
         "bytes": (dest / "train/train-000000.tar").stat().st_size, "sha256": "", "modalities": {"CT": 3}},
        {"path": shardspec.shard_name("val", 0), "split": "val", "samples": 2,
         "bytes": (dest / "val/val-000000.tar").stat().st_size, "sha256": "", "modalities": {"DX": 2}},
    ]
    m = _manifest(records, {"seen": 5, "used": 5, "skipped": {}, "rejected": {}})
    _write_json(dest / "manifest.json", m)
    return dest, train + val, m


def test_iter_samples_streams_what_was_written(shard_set):
    dest, written, m = shard_set
    got = list(shardspec.iter_samples(str(dest), m))
    assert [s["__key__"] for s in got] == [k for k, *_ in written]
    for raw, (key, arr, meta, report) in zip(got, written):
        assert raw["__url__"].endswith(".tar")
        out, out_meta, out_report = shardspec.decode_sample({k: v for k, v in raw.items() if not k.startswith("__")})
        np.testing.assert_array_equal(out, arr)
        assert out.dtype == arr.dtype and out_meta == meta and out_report == report


def test_iter_samples_limit_and_split(shard_set):
    dest, written, m = shard_set
    assert len(list(shardspec.iter_samples(str(dest), m, limit=2))) == 2
    val = list(shardspec.iter_samples(str(dest), m, split="val"))
    assert [s["__key__"] for s in val] == [k for k, *_ in written[3:]]
    assert list(shardspec.iter_samples(str(dest), m, split="nope")) == []


def test_shards_are_plain_tar_files(shard_set):
    dest, written, _ = shard_set
    with tarfile.open(dest / "train/train-000000.tar") as tf:
        names = tf.getnames()
    key = written[0][0]
    assert {f"{key}.npy", f"{key}.json", f"{key}.txt"} <= set(names)


# ----------------------------------------------------------------------------- in-memory reader (the loader's fast path)


def _reference_samples(data: bytes) -> list[dict]:
    """The reference path: webdataset's stream reader over the same bytes (each member copied)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    out = []
    for s in group_by_keys({**f, "__url__": "mem"} for f in tar_file_iterator(io.BytesIO(data))):
        s.pop("__url__")
        out.append(s)
    return out


def _tar(entries) -> bytes:
    """A tar from (name, bytes | None for a directory) in order, with GNU long names where needed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _as(form: str, data: bytes):
    """`data` as bytes, or as what `storage.read_into` gives: a read-only view of a bytearray."""
    return data if form == "bytes" else memoryview(bytearray(data)).toreadonly()


@pytest.mark.parametrize("form", ["bytes", "read_only_view"])
def test_tar_samples_are_webdatasets_samples_without_copies(shard_set, form):
    dest, written, _ = shard_set
    for split in ("train", "val"):
        raw = (dest / shardspec.shard_name(split, 0)).read_bytes()
        data = _as(form, raw)
        owner = data if form == "bytes" else data.obj  # the one buffer every member must view
        fast, ref = list(shardspec.tar_samples(data)), _reference_samples(raw)
        assert [s["__key__"] for s in fast] == [s["__key__"] for s in ref] and len(fast) == len(ref) > 0
        for f, r in zip(fast, ref):
            assert set(f) == set(r)
            for suffix in set(f) - {"__key__"}:
                assert isinstance(f[suffix], memoryview) and f[suffix].obj is owner  # a view into the shard
                assert bytes(f[suffix]) == r[suffix]
            array, meta, report = shardspec.decode_sample(f, copy=False)
            want, want_meta, want_report = shardspec.decode_sample({k: v for k, v in r.items() if k != "__key__"})
            assert array.dtype == want.dtype and array.shape == want.shape and np.array_equal(array, want)
            assert (meta, report) == (want_meta, want_report)
            if "npy" in f:  # zero-copy: a read-only view of the shard's bytes; copy=True owns its array
                assert not array.flags.writeable and np.shares_memory(array, np.frombuffer(owner, np.uint8))
                assert shardspec.decode_sample(f)[0].flags.writeable


@pytest.mark.parametrize("form", ["bytes", "read_only_view"])
def test_tar_samples_follow_webdatasets_rules_on_odd_tars(form):
    long_key = "k" * 120  # past tar's 100-character name field: a GNU long-name header
    entries = [("dir", None), ("__meta__", b"skip"), ("a.NPY", b"1"), ("a.json", b"{}"), ("a.seg.png", b"2"),
               (f"sub/{long_key}.txt", b"3"), ("noext", b"4"), ("b.json", b"5")]
    data = _tar(entries)
    fast = [{k: bytes(v) if isinstance(v, memoryview) else v for k, v in s.items()}
            for s in shardspec.tar_samples(_as(form, data))]
    assert fast == _reference_samples(data)
    assert [s["__key__"] for s in fast] == ["a", f"sub/{long_key}", "b"] and set(fast[0]) == {"__key__", "npy", "json", "seg.png"}

    dup = _tar([("a.json", b"1"), ("a.json", b"2")])
    with pytest.raises(ValueError, match="duplicate"):
        list(shardspec.tar_samples(_as(form, dup)))
    with pytest.raises(ValueError, match="duplicate"):
        _reference_samples(dup)
    torn = _tar([("a.npy", b"x" * 4000), ("a.json", b"{}")])[:2048]  # cut inside the first member's data
    with pytest.raises(tarfile.ReadError):
        list(shardspec.tar_samples(_as(form, torn)))
    with pytest.raises(tarfile.ReadError):
        _reference_samples(torn)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("array", [_ct(3), np.asfortranarray(_ct(4)), np.zeros((0, 3, 2), np.int16),
                                   _ct(5).astype(">i2"), np.arange(12, dtype=np.float64).reshape(3, 4)],
                         ids=["ct", "fortran", "empty", "big-endian", "float64"])
def test_npy_decoder_is_np_load(array, version):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    data = buf.getvalue()
    want = np.load(io.BytesIO(data), allow_pickle=False)
    for copy in (True, False):
        got = shardspec._npy_decode(data, copy=copy)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.c_contiguous == want.flags.c_contiguous and got.flags.f_contiguous == want.flags.f_contiguous
        if version != (3, 0):  # 3.0 is read by np.load itself (an array of its own either way)
            assert got.flags.writeable == copy


def test_npy_decoder_refuses_what_np_load_refuses():
    good = shardspec._npy_encode(_ct())
    for bad in (good[:-1], good[:40], b"\x93NUMPZ" + good[6:], b""):
        with pytest.raises(ValueError):
            shardspec._npy_decode(bad)
        with pytest.raises((ValueError, EOFError)):
            np.load(io.BytesIO(bad), allow_pickle=False)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object"):
        shardspec._npy_decode(buf.getvalue())
