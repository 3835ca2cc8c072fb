"""radforge.loader: every sample once per epoch, equal batches per rank, exact resume, bad data
skipped and counted, streaming from S3, and one run on real ingest output."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from radforge.transforms import Profile
from radforge import shardspec, storage
from radforge.config import DataConfig, IngestRecipe, ViewConfig
from radforge.errors import ConfigError
from radforge.loader import LoaderError, LoaderState, build_loader

VIEW = ViewConfig(ct_size=(4, 8, 8), xray_size=16)


def _key(k: int) -> str:
    return f"{k:024x}"


def _members(k: int, modality: str, report: bool) -> dict[str, bytes]:
    if modality == "CT":
        arr = np.full((6, 10, 10), k, np.int16)
    else:
        arr = np.full((20, 24), k, np.uint16)
    meta = {"modality": modality, "shape": list(arr.shape), "split": "train",
            "labels": {"nodule": k % 2, "effusion": None, "cardiomegaly": -1}, "has_report": report}
    return shardspec.encode_sample(_key(k), arr, meta, f"report {k}" if report else None)


def write_set(dest, sizes, *, split="train", modality=lambda k: "CT", report=lambda k: True, corrupt=(),
              corrupt_member="npy", members=_members):
    """Shards of `sizes` samples (keys numbered 0.. across shards) + a manifest; `corrupt` keys get
    an undecodable `corrupt_member` (.npy or .json); `members(k, modality, report)` makes a
    sample's members. Returns (dest, {shard path: [keys]})."""
    os.makedirs(os.path.join(dest, split), exist_ok=True)
    recs, keys, k = [], {}, 0
    for si, n in enumerate(sizes):
        path = shardspec.shard_name(split, si)
        buf, mods = io.BytesIO(), {}
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for _ in range(n):
                m = modality(k)
                mods[m] = mods.get(m, 0) + 1
                for suffix, data in members(k, m, report(k)).items():
                    if k in corrupt and suffix == corrupt_member:
                        data = b"\x93NUMPY garbage" if suffix == "npy" else b"{not json"
                    info = tarfile.TarInfo(f"{_key(k)}.{suffix}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                keys.setdefault(path, []).append(_key(k))
                k += 1
        data = buf.getvalue()
        with open(os.path.join(dest, path), "wb") as f:
            f.write(data)
        recs.append({"path": path, "split": split, "samples": n, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "modalities": mods})
    manifest = shardspec.new_manifest(profile=Profile(), recipe={}, deid={}, plan_digest="t")
    shardspec.finalize(manifest, recs, {"seen": 0, "used": 0, "skipped": {}, "rejected": {}})
    with open(os.path.join(dest, shardspec.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return str(dest), keys


def _loader(shards, *, rank=0, world=1, batch=2, seed=0, state=None, train=True, **data):
    cfg = DataConfig(shards=shards, shuffle_buffer=data.pop("shuffle_buffer", 4), num_workers=data.pop("num_workers", 0), **data)
    return build_loader(cfg, VIEW, split="train", batch_size=batch, rank=rank, world_size=world, seed=seed,
                        train=train, state=state)


def _epoch(loader, n=None):
    """The next `n` batches, or (default) every batch until the loader's own state says the next
    epoch has begun: so a count of them checks the loader, not the slice."""
    if n is not None:
        return list(itertools.islice(iter(loader), n))
    start, out = loader.metrics()["epoch"], []
    for batch in loader:
        if loader.metrics()["epoch"] != start:
            return out
        out.append(batch)
        assert len(out) <= 10_000, "the epoch never ends"
    return out


def _keys(batches):
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_cover_each_sample_once(tmp_path, workers):
    dest, keys = write_set(tmp_path / "s", [6, 6, 6, 6, 6, 6, 6, 6])
    seen = []
    for rank in range(2):
        loader = _loader(dest, rank=rank, world=2, num_workers=workers)
        batches = _epoch(loader)
        assert len(batches) == loader.batches_per_epoch == 12
        assert (loader.state().single.epoch, loader.state().single.batches) == (1, 1)  # read into the next
        seen += _keys(batches)
    assert sorted(seen) == sorted(k for ks in keys.values() for k in ks)


def test_fewer_shards_than_ranks_strides_samples(tmp_path):
    dest, keys = write_set(tmp_path / "s", [7, 5])
    seen = []
    for rank in range(4):
        loader = _loader(dest, rank=rank, world=4, batch=1)
        batches = _epoch(loader)
        assert len(batches) == loader.batches_per_epoch == 3  # 12 samples / 4 ranks
        seen += _keys(batches)
    assert len(seen) == len(set(seen)) == 12


def test_equal_batches_with_uneven_shards_and_next_epoch_follows(tmp_path):
    dest, _ = write_set(tmp_path / "s", [9, 1, 4, 7, 2, 5])
    counts = set()
    for rank in range(3):
        loader = _loader(dest, rank=rank, world=3)
        first = _epoch(loader)  # ends on the first batch of the next epoch
        assert (loader.state().single.epoch, loader.state().single.batches) == (1, 1)
        counts.add(len(first))
        assert len(set(_keys(first))) == len(_keys(first))  # no repeats within the epoch
    assert counts == {loader.batches_per_epoch} and loader.batches_per_epoch >= 3


def test_too_few_samples_is_a_clear_error(tmp_path):
    dest, _ = write_set(tmp_path / "s", [3])
    with pytest.raises(ConfigError, match="too few"):
        _loader(dest, world=2, batch=4)


def test_seeded_determinism(tmp_path):
    dest, _ = write_set(tmp_path / "s", [5, 5, 5, 5])
    a = list(itertools.islice(iter(_loader(dest, seed=3)), 20))
    b = list(itertools.islice(iter(_loader(dest, seed=3)), 20))
    c = list(itertools.islice(iter(_loader(dest, seed=4)), 20))
    assert _keys(a) == _keys(b) and _keys(a) != _keys(c)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert _keys(a[:10]) != _keys(a[10:])  # epoch 2 is reshuffled
    assert sorted(_keys(a[:10])) == sorted(_keys(a[10:]))


@pytest.mark.parametrize("workers,k", [(0, 3), (0, "epoch_end"), (2, 3)])
def test_resume_same_world_size_continues_exactly(tmp_path, workers, k):
    dest, _ = write_set(tmp_path / "s", [5, 4, 6, 5, 3, 6, 4, 5])
    for rank in range(2):
        ref_loader = _loader(dest, rank=rank, world=2, num_workers=workers, seed=1)
        ref = list(itertools.islice(iter(ref_loader), ref_loader.batches_per_epoch + 3))
        first = _loader(dest, rank=rank, world=2, num_workers=workers, seed=1)
        k = ref_loader.batches_per_epoch if k == "epoch_end" else k
        got = list(itertools.islice(iter(first), k))
        state = json.loads(json.dumps(first.state_dict()))
        resumed = _loader(dest, rank=rank, world=2, num_workers=workers, seed=1, state=state)
        got += list(itertools.islice(iter(resumed), len(ref) - k))
        assert _keys(got) == _keys(ref)
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(got, ref))


def test_resume_with_another_world_size_repeats_nothing(tmp_path):
    dest, keys = write_set(tmp_path / "s", [6] * 12)
    consumed = []
    state = None
    for rank in range(2):
        loader = _loader(dest, rank=rank, world=2, seed=2)
        consumed += _keys(_epoch(loader, 5))
        state = loader.state_dict()
    assert len(set(consumed)) == 20
    later = []
    for rank in range(3):
        loader = _loader(dest, rank=rank, world=3, seed=2, state=state)
        rest = _epoch(loader)  # the remainder of epoch 0, re-planned for 3 ranks
        later += _keys(rest)
        again = _loader(dest, rank=rank, world=3, seed=2, state=state)  # resumable again, exactly
        assert _keys(_epoch(again)) == _keys(rest)
    assert not set(later) & set(consumed)
    assert len(later) == len(set(later)) >= 72 - 20 - 3 * 2 * 2  # the rest, but for a few surplus samples


def test_resume_with_fewer_workers_repeats_nothing(tmp_path):
    dest, keys = write_set(tmp_path / "s", [5] * 8)
    loader = _loader(dest, num_workers=2, seed=5)
    consumed = _keys(_epoch(loader, 7))  # odd: the workers are mid-rotation
    rest = _loader(dest, num_workers=0, seed=5, state=loader.state_dict())
    later = _keys(_epoch(rest))
    assert len(consumed) == len(set(consumed)) == 14
    assert len(later) == len(set(later)) >= 40 - 14 - 2 and not set(later) & set(consumed)


def test_state_is_small_json_and_checkpoints_of_version_1_still_resume(tmp_path):
    dest, _ = write_set(tmp_path / "s", [5, 4, 6, 5])
    ref = _keys(itertools.islice(iter(_loader(dest, seed=1)), 8))
    first = _loader(dest, seed=1)
    _epoch(first, 3)
    state = first.state()
    assert (state.single.epoch, state.single.batches, state.single.samples, state.taken) == (0, 3, 6, (3,))
    assert LoaderState.from_json(json.loads(json.dumps(first.state_dict()))) == state
    body = {"split": "train", "seed": 1, "epoch": 0, "batches": 3, "samples": 6,
            "layout": {"world_size": 1, "num_workers": 1, "batch_size": 2}, "segments": []}
    assert first.state_dict() == {"version": 2, "sources": [body], "taken": [3]}
    v1 = {"version": 1, **body}  # the form checkpoints written before mixtures hold
    assert LoaderState.from_json(v1) == state
    for resume in (v1, state.to_json(), state):  # both JSON forms or the object itself
        assert _keys(_epoch(_loader(dest, seed=1, state=resume), 5)) == ref[6:]
    with pytest.raises(ConfigError, match="version"):
        _loader(dest, seed=1, state={**v1, "version": 3})
    with pytest.raises(ConfigError, match="malformed"):
        _loader(dest, seed=1, state={k: v for k, v in v1.items() if k != "layout"})
    with pytest.raises(ConfigError, match="another split or seed"):
        _loader(dest, seed=2, state=v1)
    with pytest.raises(ConfigError, match="2-source mixture"):
        _loader(dest, seed=1, state={"version": 2, "sources": [body, body], "taken": [3, 0]})


def test_evaluation_pass_over_ranks_keeps_partial_batches(tmp_path):
    dest, keys = write_set(tmp_path / "s", [5, 4, 3])
    seen = []
    for rank in range(2):
        loader = _loader(dest, rank=rank, world=2, batch=4, train=False)
        batches = list(loader)
        assert 1 <= len(batches) <= loader.batches_per_epoch
        assert min(len(b["key"]) for b in batches) < 4  # the partial last batch is kept
        first = [b["image"] for b in _loader(dest, rank=rank, world=2, batch=4, train=False)]
        assert all(torch.equal(x, y["image"]) for x, y in zip(first, batches))  # centre views: deterministic
        seen += _keys(batches)
    assert sorted(seen) == sorted(k for ks in keys.values() for k in ks)


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "sha_mismatch", "corrupt_npy", "corrupt_json"])
def test_bad_data_is_skipped_counted_and_batches_stay_equal(tmp_path, damage):
    corrupt = {7, 8} if damage.startswith("corrupt") else ()
    dest, keys = write_set(tmp_path / "s", [6, 6, 6, 6], corrupt=corrupt, corrupt_member=damage.removeprefix("corrupt_"))
    shard = os.path.join(dest, "train/train-000001.tar")
    if damage == "truncated":
        _truncate(shard)
    elif damage == "sha_mismatch":
        _flip_byte(shard)
    verify = damage != "truncated"  # the truncated tar must be caught by the tar reader itself
    per_rank, totals = [], {}
    for rank in range(2):
        loader = _loader(dest, rank=rank, world=2, verify_sha256=verify)
        batches = _epoch(loader)
        per_rank.append(len(batches))
        assert all(torch.isfinite(b["image"]).all() for b in batches)
        for k, v in loader.metrics().items():
            totals[k] = totals.get(k, 0) + v
    assert per_rank == [6, 6]
    assert totals["skipped_samples"] >= (2 if corrupt else 1)
    assert totals["substituted"] == totals["skipped_samples"]
    assert totals["bad_shards"] == (0 if corrupt else 1)


@pytest.mark.parametrize("where", ["payload", "header"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_flipped_byte_is_caught_before_any_sample_and_counted_as_before(tmp_path, where, train):
    """sha256 is computed while the shard is read (`storage.read_into`), yet a shard that fails it
    yields no sample, whether the flip hits a member's bytes or a tar header, and is counted
    exactly as the loader counted it when it hashed before parsing (commit 5065d11, same set-up):
    one mismatch, one bad shard, each of its 6 slots skipped and, in training, substituted."""
    dest, keys = write_set(tmp_path / "s", [6, 6, 6, 6])
    path = os.path.join(dest, "train/train-000001.tar")
    with tarfile.open(path) as tf:
        member = tf.getmembers()[4]  # the second sample's first member
    data = bytearray(open(path, "rb").read())
    data[member.offset_data + member.size // 2 if where == "payload" else member.offset + 10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    totals, per_rank, seen = {}, [], []
    for rank in range(2):
        loader = _loader(dest, rank=rank, world=2, train=train)
        batches = _epoch(loader) if train else list(loader)
        per_rank.append(len(batches))
        seen += _keys(batches)
        for k, v in loader.metrics().items():
            totals[k] = totals.get(k, 0) + v
    assert not set(seen) & set(keys["train/train-000001.tar"])
    assert (totals["sha_mismatch"], totals["bad_shards"], totals["skipped:bad_shard"], totals["skipped_samples"]) == (1, 1, 6, 6)
    assert totals["substituted"] == (6 if train else 0)
    assert per_rank == ([6, 6] if train else [6, 3]) and len(seen) == (24 if train else 18)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_s3_shard_with_a_flipped_byte_yields_no_sample(tmp_path, s3_bucket, train):
    """From S3 the sha256 is computed as the body arrives (`storage.read_into`), yet a shard that
    fails it still yields no sample and is counted as from local disk: one mismatch, one bad
    shard, its 6 slots skipped (and, in training, substituted); the other shards' samples all come."""
    dest, keys = write_set(tmp_path / "s", [6, 6, 6, 6])
    _flip_byte(os.path.join(dest, "train/train-000002.tar"))
    loader = _loader(_to_s3(dest, s3_bucket, keys), train=train, verify_sha256=True)
    batches = _epoch(loader) if train else list(loader)
    seen, m = _keys(batches), loader.metrics()
    assert not set(seen) & set(keys["train/train-000002.tar"])
    assert set(seen) == {k for p, ks in keys.items() if p != "train/train-000002.tar" for k in ks}
    assert (m["sha_mismatch"], m["bad_shards"], m["skipped:bad_shard"]) == (1, 1, 6)
    assert m.get("substituted", 0) == (6 if train else 0) and m["shards_read"] >= 4


def _phantom_members(k: int, modality: str, report: bool) -> dict[str, bytes]:
    """Phantom anatomy in the stored forms ingest writes: CT volumes smaller and larger than the
    view on each axis (so the view both pads and crops), 12-bit radiographs scaled to 16 bits."""
    from radforge import phantoms

    study = phantoms.make_study(phantoms.make_patient(k))
    if modality == "CT":
        arr = phantoms.chest_volume([(3, 12, 7), (9, 6, 11), (4, 8, 8)][k % 3], study, seed=k)
    else:
        arr = phantoms.chest_radiograph(18 + k, 26 - k % 4, study, 4095, seed=k)[0].astype(np.uint16) * 16
    meta = {"modality": modality, "shape": list(arr.shape), "split": "train", "labels": {"nodule": k % 2},
            "has_report": report}
    return shardspec.encode_sample(_key(k), arr, meta, f"report {k}: ünïcode" if report else None)


def _reference_views(dest: str, image: str) -> dict[str, tuple]:
    """key → (view, meta, report) by the reference path: webdataset's stream reader (a copy per
    member), np.load / PIL, then the kind's view (centre crop)."""
    from PIL import Image
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from radforge import kinds

    kind = kinds.get(image)
    view, out = kind.view(VIEW), {}
    for rec in shardspec.read_manifest(dest)["shards"]:
        with open(os.path.join(dest, rec["path"]), "rb") as f:
            for s in group_by_keys({**m, "__url__": rec["path"]} for m in tar_file_iterator(f)):
                meta = json.loads(s["json"])
                if meta["modality"] not in kind.modalities:
                    continue
                arr = (np.load(io.BytesIO(s["npy"]), allow_pickle=False) if "npy" in s
                       else np.asarray(Image.open(io.BytesIO(s["png"]))).astype(np.uint16))
                out[s["__key__"]] = (np.asarray(view(arr, meta, None), np.float32), meta, s["txt"].decode() if "txt" in s else "")
    return out


def _to_s3(local: str, bucket: str, keys: dict) -> str:
    """The shard set at `local` (its manifest and the shards named in `keys`) copied to S3 → its URL."""
    for name in [shardspec.MANIFEST, *keys]:
        storage.put_file_atomic(os.path.join(local, name), storage.join(bucket, "set", name))
    return storage.join(bucket, "set")


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("image", ["ct", "xray"])
def test_fast_reader_gives_the_reference_samples_bit_for_bit(tmp_path, image, store, request):
    """The loader's path (whole shard read into one buffer and hashed as it arrives, zero-copy
    members, .npy by frombuffer) gives exactly what webdataset's stream reader + np.load give,
    from local disk and from S3: same keys once each, bit-identical views, same labels, reports
    and modalities."""
    dest, keys = write_set(tmp_path / "s", [5, 4, 6], modality=lambda k: "CT" if k % 2 else "DX",
                           report=lambda k: k % 3 != 0, members=_phantom_members)
    want = _reference_views(dest, image)
    src = _to_s3(dest, request.getfixturevalue("s3_bucket"), keys) if store == "s3" else dest
    cfg = DataConfig(shards=src, image=image, num_workers=0, verify_sha256=True)
    loader = build_loader(cfg, VIEW, split="train", batch_size=3, train=False, findings=["nodule"])
    got = []
    for b in loader:
        for i, key in enumerate(b["key"]):
            got.append(key)
            view, meta, report = want[key]
            assert torch.equal(b["image"][i], torch.from_numpy(view)), key
            assert (b["text"][i], b["modality"][i], b["labels"][i, 0].item()) == (report, meta["modality"], meta["labels"]["nodule"])
    assert sorted(got) == sorted(want) and len(want) >= 7
    m = loader.metrics()
    assert m["skipped_samples"] == 0 and m.get("sha_mismatch", 0) == 0 and m["shards_read"] == 3


def test_all_bad_is_an_error_not_a_hang(tmp_path):
    dest, _ = write_set(tmp_path / "s", [4])
    _flip_byte(os.path.join(dest, "train/train-000000.tar"))
    with pytest.raises(LoaderError, match="no readable sample"):
        _epoch(_loader(dest))


def test_modality_filter_report_requirement_and_labels(tmp_path):
    dest, _ = write_set(tmp_path / "s", [6, 6], modality=lambda k: "CT" if k % 3 == 0 else ("DX" if k % 3 == 1 else "CR"),
                        report=lambda k: k != 1)
    cfg = DataConfig(shards=dest, image="xray", num_workers=0, require_report=True)
    loader = build_loader(cfg, VIEW, split="train", batch_size=2, train=False, findings=["nodule", "cardiomegaly", "absent"])
    batches = list(loader)
    mods = {m for b in batches for m in b["modality"]}
    assert mods <= {"CR", "DX"}
    assert sum(len(b["key"]) for b in batches) == 7  # 8 X-rays, one without a report
    assert loader.metrics()["skipped_samples"] == 1 and loader.metrics()["skipped:no_report"] == 1
    b = batches[0]
    assert b["image"].shape[1:] == (1, 16, 16) and b["image"].dtype == torch.float32
    k = int(b["key"][0], 16)
    assert b["labels"].shape == (len(b["key"]), 3)
    assert b["labels"][0, 0].item() == k % 2 and torch.isnan(b["labels"][0, 1:]).all()
    assert b["text"][0] == f"report {k}"
    discovered = build_loader(cfg, VIEW, split="train", batch_size=2, train=False)
    assert discovered.findings == ["cardiomegaly", "effusion", "nodule"]


def test_streams_from_s3_and_caches(tmp_path, s3_bucket):
    local, keys = write_set(tmp_path / "s", [5, 5, 5])
    for name in ["manifest.json"] + [f"train/train-00000{i}.tar" for i in range(3)]:
        storage.put_file_atomic(os.path.join(local, name), storage.join(s3_bucket, "set", name))
    url = storage.join(s3_bucket, "set")
    loader = _loader(url, train=False, batch=4)
    assert sorted(_keys(list(loader))) == sorted(k for ks in keys.values() for k in ks)
    cache = str(tmp_path / "cache")
    for _ in range(2):
        loader = _loader(url, train=False, batch=4, cache_dir=cache, cache_limit_gb=1e-9)
        assert len(_keys(list(loader))) == 15
    assert len(os.listdir(cache)) == 1  # LRU bound: only the most recent shard stays
    loader = _loader(url, train=False, batch=4, cache_dir=str(tmp_path / "cache2"))
    list(loader)
    loader = _loader(url, train=False, batch=4, cache_dir=str(tmp_path / "cache2"))
    list(loader)
    assert loader.metrics()["cache_hits"] == 3


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_cluster):
    from radforge import config, ingest, phantoms

    root = tmp_path_factory.mktemp("ingest")
    dicom = root / "corpus"
    phantoms.ct_slices_corpus(dicom, n_series=2, n_slices=10, rows=48, cols=48)  # small: the fixture is timed
    for i in range(2):
        phantoms.xray(dicom / f"xr{i}.dcm", phantoms.make_study(phantoms.make_patient(10 + i), 1), rows=64, cols=80)
    recipe = config.load(IngestRecipe, None, ["deid.demo_key=true", "shards.target_mb=0.05",
                                              "splits={train: 1.0}"])
    return ingest.run(str(dicom), str(root / "shards"), recipe, progress=False)


@pytest.mark.parametrize("image", ["ct", "xray"])
def test_real_ingest_output(ingested, image):
    n = ingested.manifest["totals"]["by_split"]["train"]["modalities"]
    expected = n.get("CT", 0) if image == "ct" else n.get("CR", 0) + n.get("DX", 0)
    cfg = DataConfig(shards=ingested.dest, image=image, num_workers=0)
    loader = build_loader(cfg, VIEW, split="train", batch_size=2, train=False)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == expected > 0
    assert loader.metrics()["skipped_samples"] == 0 and loader.metrics()["bad_shards"] == 0
    assert batches[0]["image"].shape[1:] == loader.input_shape
    assert all(torch.isfinite(b["image"]).all() for b in batches)
    want = _reference_views(ingested.dest, image)  # the fast reader on real ingest output, bit for bit
    assert sorted(k for b in batches for k in b["key"]) == sorted(want)
    for b in batches:
        for i, key in enumerate(b["key"]):
            assert torch.equal(b["image"][i], torch.from_numpy(want[key][0])) and b["modality"][i] == want[key][1]["modality"]


# ---------------------------------------------------------------------------------------------
# Weighted mixtures (data.sources)


def _mixture(tmp_path, sizes_by_source, weights):
    """One shard set per source (keys restart at 0 in each: batches say their source)."""
    return [{"shards": write_set(tmp_path / f"m{i}", sizes)[0], "weight": w}
            for i, (sizes, w) in enumerate(zip(sizes_by_source, weights))]


def _mix_loader(sources, *, rank=0, world=1, batch=2, seed=0, state=None, num_workers=0):
    from radforge.config import SourceConfig

    cfg = DataConfig(sources=[SourceConfig(**s) for s in sources], shuffle_buffer=4, num_workers=num_workers)
    return build_loader(cfg, VIEW, split="train", batch_size=batch, rank=rank, world_size=world, seed=seed, state=state)


def test_mixture_proportions_within_two_batches_per_source(tmp_path):
    """3 sources weighted 5:3:2; after N samples each source's share is within 2 batches of its
    target (2 × batch / N: 0.8 % at N = 500), and each source still covers its epoch once. The
    repeat runs compare 60 batches: enough to tell two interleaves and orders apart."""
    sources = _mixture(tmp_path, [[10] * 4, [7] * 3, [5] * 2], [5, 3, 2])
    loader = _mix_loader(sources, seed=3)
    batches = list(itertools.islice(iter(loader), 250))
    n = sum(len(b["key"]) for b in batches)
    by_source = {name: sum(len(b["key"]) for b in batches if b["source"] == name) for name in loader.names}
    m = loader.metrics()
    for name, p in zip(loader.names, (0.5, 0.3, 0.2)):
        assert abs(by_source[name] / n - p) <= 2 * 2 / n
        assert m[f"mix_{name}_frac"] == by_source[name] / n and m[f"mix_{name}_target"] == pytest.approx(p)
    # per source: every sample once per epoch (source 2 has 10 samples = 5 batches per epoch)
    s2 = [b for b in batches if b["source"] == loader.names[2]]
    assert sorted(_keys(s2[:5])) == sorted(_keys(s2[5:10])) and len(set(_keys(s2[:5]))) == 10
    # seeded: the same interleave and order again, another one with another seed
    again = list(itertools.islice(iter(_mix_loader(sources, seed=3)), 60))
    other = list(itertools.islice(iter(_mix_loader(sources, seed=4)), 60))
    assert [b["source"] for b in again] == [b["source"] for b in batches[:60]] and _keys(again) == _keys(batches[:60])
    assert _keys(other) != _keys(batches[:60])
    # repeat / choose: the shares follow the samples per mixture epoch
    rep = _mix_loader([{**sources[0], "weight": None, "repeat": 1.0}, {**sources[1], "weight": None, "choose": 40}])
    assert list(rep.target) == pytest.approx([40 / 80, 40 / 80])


def test_mixture_resume_is_exact_and_world_size_changes_repeat_nothing(tmp_path):
    sources = _mixture(tmp_path, [[6] * 8, [6] * 4], [2, 1])
    ref = list(itertools.islice(iter(_mix_loader(sources, world=2, seed=1)), 30))
    first = _mix_loader(sources, world=2, seed=1)
    got = list(itertools.islice(iter(first), 7))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["version"] == 2 and len(state["sources"]) == 2 and sum(state["taken"]) == 7
    resumed = _mix_loader(sources, world=2, seed=1, state=state)
    got += list(itertools.islice(iter(resumed), 23))
    assert _keys(got) == _keys(ref) and [b["source"] for b in got] == [b["source"] for b in ref]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(got, ref))
    # 2 ranks → 1 and 1 → 2: the rest of each source's epoch, no sample of it again
    for before, after in ((2, 1), (1, 2)):
        consumed, st = [], None
        for rank in range(before):
            ld = _mix_loader(sources, rank=rank, world=before, seed=1)
            consumed += list(itertools.islice(iter(ld), 6))
            st = ld.state_dict()
        later = {"0_ct": [], "1_ct": []}
        for rank in range(after):
            ld = _mix_loader(sources, rank=rank, world=after, seed=1, state=st)
            left = {name: src.batches_left() for name, src in zip(ld.names, ld.sources)}  # this epoch's rest
            for b in itertools.islice(iter(ld), 60):
                if len(later[b["source"]]) < left[b["source"]] * (rank + 1):
                    later[b["source"]].append(b)
        for name, rest in later.items():
            seen = _keys(b for b in consumed if b["source"] == name)
            rest = _keys(rest)
            assert rest and len(seen) == len(set(seen)) and len(rest) == len(set(rest)), (before, after, name)
            assert not set(seen) & set(rest), (before, after, name)


def test_superseded_samples_are_skipped_and_a_version_pin_reads_its_snapshot(tmp_path):
    """After `ingest --append` a rebuilt series' old sample stays in its shard, listed as
    superseded: the latest version streams every other sample once; data.shards_version=1 reads
    manifests/v1.json, where it is still live."""
    dest, keys = write_set(tmp_path / "s", [5, 4])
    m = shardspec.read_manifest(dest)
    old = json.loads(json.dumps(m))
    os.makedirs(os.path.join(dest, shardspec.MANIFESTS))
    with open(os.path.join(dest, shardspec.manifest_path(1)), "w") as f:
        json.dump(old, f)
    gone = keys[m["shards"][0]["path"]][2]
    m["version"], m["superseded"] = 2, [{"key": gone, "shard": m["shards"][0]["path"], "split": "train", "modality": "CT"}]
    with open(os.path.join(dest, shardspec.MANIFEST), "w") as f:
        json.dump(m, f)
    latest = _keys(_loader(dest, batch=3, train=False))
    pinned = _keys(_loader(dest, batch=3, train=False, shards_version=1))
    everything = sorted(k for ks in keys.values() for k in ks)
    assert sorted(latest) == [k for k in everything if k != gone] and sorted(pinned) == everything
