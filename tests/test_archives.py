"""Real-archive input (issue 9): duplicate instances, conflicting copies, stale file meta, several
acquisitions in one series, series selection rules, burned-in pixels, X-ray presentation intent
and display orientation, side tables keyed without `--set`, and keys unique by construction.

Planning-level tests run without Ray (fast tier); one ingest over a small archive-like corpus
runs on the session's Ray cluster and checks the counts, the ledger and the stock readers."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from radforge import config, deid, dicom, ingest, phantoms, shardspec, storage, transforms
from radforge.config import IngestRecipe

ENCODABLE = phantoms.encodable_transfer_syntaxes()
SECRET = "archives-secret-" + "a" * 32


def scan_paths(paths) -> list[dict]:
    rows = []
    for p in paths:
        with open(p, "rb") as f:
            rows.append(dicom.scan(str(p), os.path.getsize(p), f))
    return rows


def plan_all(rows: list[dict], *overrides: str) -> list[dicom.PlanItem]:
    recipe = config.load(IngestRecipe, None, list(overrides)) if overrides else IngestRecipe()
    ctx = dicom.PlanContext(recipe=recipe, pseudo=deid.Pseudonymizer(b"k"))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_key"], []).append(r)
    items = [it for g in groups.values() for it in dicom.plan_group(g, ctx)]
    # Every input file in exactly one item (seen = used + skipped + rejected by construction) and
    # planned keys unique (what makes a shard set readable by stock tools).
    assert Counter(p for it in items for p in it.all_paths) == Counter(r["path"] for r in rows)
    keys = [it.key for it in items if it.status == "planned"]
    assert len(keys) == len(set(keys))
    for it in items:
        if it.status == "skipped":
            assert dicom.is_skip_reason(it.reason)
        elif it.status == "rejected":
            assert it.reason in dicom.REJECT_REASONS
    return items


def outcome(items) -> Counter:
    return Counter((it.status, it.reason) for it in items for _ in (it.all_paths or [None]))


@pytest.fixture(scope="module")
def study():
    return phantoms.make_study(phantoms.make_patient(3))


@pytest.fixture
def series(tmp_path, study):
    return phantoms.ct_series(tmp_path / "s", study, n_slices=12, rows=32, cols=32, seed=1)


# ---------------------------------------------------------------------------------------------
# 1. instance identity


def test_identical_copies_are_one_instance_whatever_the_transfer_syntax(tmp_path, series):
    copies = [phantoms.rewrite(series.paths[3], tmp_path / "copy" / "same.dcm")]
    if JPEG2000Lossless in ENCODABLE:
        copies.append(phantoms.rewrite(series.paths[5], tmp_path / "copy" / "j2k.dcm", transfer_syntax=JPEG2000Lossless))
    items = plan_all(scan_paths(series.paths + copies))
    vol = [it for it in items if it.status == "planned"]
    assert len(vol) == 1 and vol[0].source_shape[0] == 12
    assert outcome(items)[("skipped", "duplicate_instance")] == len(copies)
    # The volume equals the truth: the copy replaced nothing.
    hu, _ = dicom.load_ct(vol[0], lambda p: Path(p).read_bytes())
    assert np.array_equal(np.rint(hu).astype(np.int16), series.hu_lps)


def test_same_uid_with_other_pixels_rejects_every_copy(tmp_path, series):
    ds = pydicom.dcmread(series.paths[4])
    other = phantoms.rewrite(series.paths[4], tmp_path / "x" / "edited.dcm", pixels=ds.pixel_array[::-1].copy())
    items = plan_all(scan_paths(series.paths + [other]))
    got = outcome(items)
    assert got[("rejected", "conflicting_instance")] == 2
    # The series lost a slice it cannot trust: the rest is a series with a gap, not a guess.
    assert got[("rejected", "slice_gap")] == 11


def test_file_meta_contradicting_the_data_set_is_inconsistent_meta(tmp_path, series):
    p = Path(tmp_path / "meta.dcm")
    shutil.copyfile(series.paths[0], p)
    ds = pydicom.dcmread(p)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(p)  # as is: enforce_file_format would rewrite the meta from the data set
    (row,) = scan_paths([p])
    assert (row["status"], row["reason"], row["group_key"]) == ("rejected", "inconsistent_meta", "bad:" + str(p))


def test_pydicom_data_lossy_pair_is_one_sample():
    """RG1_UNCI / RG1_J2KI: one SOPInstanceUID, the same pixels (UNCI is the decoded J2KI)."""
    from pydicom.data import get_testdata_file

    paths = [get_testdata_file(n, download=False) for n in ("RG1_UNCI.dcm", "RG1_J2KI.dcm")]
    if not all(paths):
        pytest.skip("pydicom-data not installed")
    items = plan_all(scan_paths(paths))
    assert outcome(items) == Counter({("planned", None): 1, ("skipped", "duplicate_instance"): 1})


def test_serving_a_series_with_a_copy_in_it(tmp_path, series):
    datas = [Path(p).read_bytes() for p in series.paths] + [Path(series.paths[2]).read_bytes()]
    profile = transforms.Profile.from_recipe(config.load(IngestRecipe, None, ["ct.spacing_mm=[2.5,0.8,0.8]"]))
    arr, meta = dicom.canonical_from_files(datas, profile)
    assert arr.shape == series.hu_lps.shape and np.array_equal(arr, series.hu_lps)


def test_the_shard_writer_refuses_a_duplicate_key():
    members = shardspec.encode_sample("k1", np.zeros((4, 4, 4), np.int16), {"modality": "CT"})
    w = shardspec.TarWriter(io.BytesIO())
    w.write("k1", members)
    with pytest.raises(shardspec.DuplicateKeyError):
        w.write("k1", members)


# ---------------------------------------------------------------------------------------------
# 2. several acquisitions in one series


def test_two_acquisitions_in_one_series_are_two_volumes(tmp_path, series):
    second = phantoms.second_acquisition(series, tmp_path / "phase2", hu_offset=100)
    items = plan_all(scan_paths(series.paths + second))
    vols = sorted((it for it in items if it.status == "planned"), key=lambda it: it.sub_series)
    assert [v.sub_series for v in vols] == ["AcquisitionNumber=1", "AcquisitionNumber=2"]
    assert len({v.key for v in vols}) == 2 and all(v.key.startswith(v.series + "-") for v in vols)
    assert all(len(v.all_paths) == 12 for v in vols)
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    hu1, a1 = dicom.load_ct(vols[0], read)
    hu2, a2 = dicom.load_ct(vols[1], read)
    assert np.array_equal(a1, a2)
    assert np.allclose(hu2 - hu1, 100.0)
    # Keys are stable: planning again gives the same suffixes.
    again = plan_all(scan_paths(series.paths + second))
    assert sorted(it.key for it in again if it.status == "planned") == sorted(v.key for v in vols)


def test_repeats_no_attribute_explains_stay_duplicate_position(tmp_path, study):
    dup = phantoms.ct_series(tmp_path / "d", study, n_slices=12, rows=32, cols=32, duplicate_at=4, seed=2)
    assert outcome(plan_all(scan_paths(dup.paths))) == Counter({("rejected", "duplicate_position"): 12})
    # Not even with an attribute that varies per slice (some scanners count acquisitions so):
    # splitting on it would leave one-slice "volumes", so it explains nothing.
    for k, p in enumerate(dup.paths):
        phantoms.rewrite(p, p, AcquisitionNumber=k + 1)
    assert outcome(plan_all(scan_paths(dup.paths))) == Counter({("rejected", "duplicate_position"): 12})


def test_split_attributes_are_a_recipe_key(tmp_path, series):
    second = phantoms.second_acquisition(series, tmp_path / "phase2")
    items = plan_all(scan_paths(series.paths + second), "ct.split_acquisitions_by=[EchoNumbers]")
    assert outcome(items) == Counter({("rejected", "duplicate_position"): 24})
    with pytest.raises(config.ConfigError):
        config.load(IngestRecipe, None, ["ct.split_acquisitions_by=[PatientName]"])


# ---------------------------------------------------------------------------------------------
# 3. series selection


def test_default_rules_drop_secondary_reformats_and_keep_originals(tmp_path, study, series):
    mpr = phantoms.ct_series(tmp_path / "mpr", study, n_slices=10, rows=32, cols=32, orientation="coronal", seed=3)
    for p in mpr.paths:
        phantoms.rewrite(p, p, ImageType=["DERIVED", "SECONDARY", "REFORMATTED"])
    items = plan_all(scan_paths(series.paths + mpr.paths))
    assert outcome(items) == Counter({("planned", None): 12, ("skipped", "rule:secondary"): 10})  # files
    skipped = [it for it in items if it.status == "skipped"]
    assert skipped[0].study and skipped[0].series  # pseudonyms, for `radforge inspect`


def test_rules_by_plane_thickness_and_description_and_the_default(tmp_path, study, series):
    sag = phantoms.ct_series(tmp_path / "sag", study, n_slices=10, rows=32, cols=32, orientation="sagittal", seed=4)
    rows = scan_paths(series.paths + sag.paths)
    keep_axial = ['series.rules=[{name: axial, plane: [axial], slice_thickness_mm: [1, 3]}]', "series.default=drop"]
    got = outcome(plan_all(rows, *keep_axial))
    assert got == Counter({("planned", None): 12, ("skipped", "no_rule"): 10})
    by_desc = ['series.rules=[{name: scouts, action: drop, series_description: "sagittal"}]']
    assert outcome(plan_all(rows, *by_desc))[("skipped", "rule:scouts")] == 10
    vols = [it for it in plan_all(rows, *keep_axial) if it.status == "planned"]
    assert vols[0].selected_by == "axial"


def test_per_study_choice():
    vols = [{"key": "a", "study": "s1", "series": "a", "selected_by": "soft", "slice_thickness": 1.0},
            {"key": "b-1", "study": "s1", "series": "b", "selected_by": "bone", "slice_thickness": 0.6},
            {"key": "b-2", "study": "s1", "series": "b", "selected_by": "bone", "slice_thickness": 0.6},
            {"key": "c", "study": "s2", "series": "c", "selected_by": None, "slice_thickness": None}]
    cfg = config.SeriesConfig(rules=[config.SeriesRule(name="soft"), config.SeriesRule(name="bone")], per_study="thinnest")
    assert dicom.choose_per_study(vols, cfg) == {"a": "per_study:thinnest"}  # both acquisitions of b stay
    cfg.per_study = "first_match"
    assert dicom.choose_per_study(vols, cfg) == {"b-1": "per_study:first_match", "b-2": "per_study:first_match"}
    cfg.per_study = "all"
    assert dicom.choose_per_study(vols, cfg) == {}


# ---------------------------------------------------------------------------------------------
# 4./5. burned-in pixels, presentation intent, display orientation


@pytest.fixture
def dx(tmp_path, study):
    return phantoms.xray(tmp_path / "dx.dcm", study, rows=64, cols=48, seed=5)


def test_burned_in_pixels_are_rejected_unless_the_recipe_opts_in(tmp_path, dx):
    burned = phantoms.rewrite(dx.path, tmp_path / "burned.dcm", new_sop="b", BurnedInAnnotation="YES")
    screen = phantoms.rewrite(dx.path, tmp_path / "screen.dcm", new_sop="s", ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"])
    rows = scan_paths([burned, screen])
    assert outcome(plan_all(rows)) == Counter({("rejected", "burned_in_annotation"): 2})
    assert outcome(plan_all(rows, "deid.allow_burned_in=true")) == Counter({("planned", None): 2})


def test_presentation_intent(tmp_path, dx):
    proc = phantoms.rewrite(dx.path, tmp_path / "proc.dcm", new_sop="p", PresentationIntentType="FOR PROCESSING",
                            SOPClassUID=dicom.DX_FOR_PROCESSING)
    rows = scan_paths([dx.path, proc])
    assert outcome(plan_all(rows)) == Counter({("planned", None): 1, ("skipped", "for_processing"): 1})
    got = plan_all(rows, "xray.presentation_intent=processing")
    assert outcome(got) == Counter({("planned", None): 1, ("skipped", "for_presentation"): 1})
    assert [it.paths for it in got if it.status == "planned"] == [[proc]]


@pytest.mark.parametrize("orientation, view, flips", [
    (["L", "F"], "PA", []), (["R", "F"], "AP", ["horizontal"]), (["L", "H"], "PA", ["vertical"]),
    (["A", "F"], "LL", ["horizontal"]), (["F", "L"], "PA", None)])
def test_radiographs_are_stored_in_one_display_orientation(tmp_path, dx, orientation, view, flips):
    p = phantoms.rewrite(dx.path, tmp_path / "o.dcm", PatientOrientation=orientation, ViewPosition=view)
    (item,) = plan_all(scan_paths([p]))
    profile = transforms.Profile.from_recipe(config.load(IngestRecipe, None, ["xray.longest_side=64"]))
    arr, meta = dicom.canonical(item, lambda q: Path(q).read_bytes(), profile)
    values = dicom.load_xray(item, lambda q: Path(q).read_bytes(), profile.xray_voi)
    expect = profile.canonical_xray(values)
    if flips and "horizontal" in flips:
        expect = expect[:, ::-1]
    if flips and "vertical" in flips:
        expect = expect[::-1, :]
    assert np.array_equal(arr, expect)
    assert meta["display_flip"] == (flips or [])
    assert meta["view"] == dicom.VIEWS[view]
    canonical_row = "P" if meta["view"] == "lateral" else "L"
    assert meta["patient_orientation"] == (None if flips is None else [canonical_row, "F"])


# ---------------------------------------------------------------------------------------------
# 6. side tables keyed without --set


def test_a_table_with_one_known_key_column_needs_no_set(tmp_path):
    t = tmp_path / "reports.csv"
    t.write_text("StudyInstanceUID,report\n1.2.3,no finding\n")
    spec = ingest._TablesSpec.load(str(t), config.TableConfig(), None, config.TableConfig())
    got = spec.read()["reports"]
    assert got["join_on"] == "StudyInstanceUID" and got["map"] == {"1.2.3": "no finding"}
    bad = tmp_path / "bad.csv"
    bad.write_text("Accession,report\n1,x\n")
    with pytest.raises(config.ConfigError, match="no column 'AccessionNumber'"):
        ingest._TablesSpec.load(str(bad), config.TableConfig(), None, config.TableConfig())


# ---------------------------------------------------------------------------------------------
# one ingest of an archive-like corpus (Ray)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Two CT series (one with a copy of a slice in another folder and in RLE, one with a second
    acquisition), a reformat, DX images (burned-in, FOR PROCESSING, stale meta) and the
    pydicom-data lossy pair, with the expected count per reason."""
    root = tmp_path_factory.mktemp("archive")
    src = root / "src"
    s1 = phantoms.make_study(phantoms.make_patient(0))
    s2 = phantoms.make_study(phantoms.make_patient(1))
    a = phantoms.ct_series(src / "a", s1, n_slices=10, rows=32, cols=32, seed=10)
    copy_ts = RLELossless if RLELossless in ENCODABLE else None
    copies = [phantoms.rewrite(a.paths[2], src / "resend" / "c1.dcm"),
              phantoms.rewrite(a.paths[6], src / "resend" / "c2.dcm", transfer_syntax=copy_ts)]
    b = phantoms.ct_series(src / "b", s2, n_slices=10, rows=32, cols=32, seed=11)
    b2 = phantoms.second_acquisition(b, src / "b_phase2")
    mpr = phantoms.ct_series(src / "mpr", s2, n_slices=9, rows=32, cols=32, orientation="coronal", seed=12)
    for p in mpr.paths:
        phantoms.rewrite(p, p, ImageType=["DERIVED", "SECONDARY", "MPR"])
    dx = phantoms.xray(src / "xr" / "dx.dcm", s1, rows=64, cols=48, seed=13)
    phantoms.rewrite(dx.path, src / "xr" / "burned.dcm", new_sop="b", BurnedInAnnotation="YES")
    phantoms.rewrite(dx.path, src / "xr" / "proc.dcm", new_sop="p", PresentationIntentType="FOR PROCESSING")
    stale = Path(phantoms.rewrite(dx.path, src / "xr" / "stale.dcm", new_sop="m"))
    ds = pydicom.dcmread(stale)
    ds.file_meta.MediaStorageSOPInstanceUID = dx.sop_uid
    ds.save_as(stale)
    expected = {"used": 10 + 20 + 1, "skipped": {"duplicate_instance": 2, "rule:secondary": 9, "for_processing": 1},
                "rejected": {"burned_in_annotation": 1, "inconsistent_meta": 1}, "CT": 3}
    from pydicom.data import get_testdata_file

    pair = [get_testdata_file(n, download=False) for n in ("RG1_UNCI.dcm", "RG1_J2KI.dcm")]
    if all(pair):
        (src / "ext").mkdir()
        for i, p in enumerate(pair):
            shutil.copyfile(p, src / "ext" / f"rg{i}.dcm")
        expected["used"] += 1
        expected["skipped"]["duplicate_instance"] += 1
    return src, root, expected


def test_ingest_of_an_archive_counts_every_reason_and_reads_with_stock_tools(archive, ray_cluster, monkeypatch, capsys):
    import ray
    import webdataset as wds

    src, root, exp = archive
    monkeypatch.setenv("RADFORGE_DEID_SECRET", SECRET)
    recipe = config.load(IngestRecipe, None, ["ct.spacing_mm=[2.5,0.8,0.8]"])
    res = ingest.run(str(src), str(root / "shards"), recipe, progress=False)
    inp = res.manifest["inputs"]
    assert shardspec.reconciles(inp)
    assert (inp["used"], inp["skipped"], inp["rejected"]) == (exp["used"], exp["skipped"], exp["rejected"])
    assert res.manifest["totals"]["by_modality"]["CT"] == exp["CT"]
    ledger = [json.loads(x) for x in storage.read_bytes(storage.join(res.private, "rejects.jsonl")).decode().splitlines()]
    assert Counter(r["reason"] for r in ledger) == Counter({**exp["skipped"], **exp["rejected"]})
    tars = [str(Path(res.dest) / s["path"]) for s in res.manifest["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)]
    assert len(keys) == len(set(keys)) == res.manifest["totals"]["samples"]
    rows = ray.data.read_webdataset(tars, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    metas = [json.loads(r["json"]) for r in rows]
    assert sorted(m.get("sub_series") for m in metas if m["modality"] == "CT" and m.get("sub_series")) == [
        "AcquisitionNumber=1", "AcquisitionNumber=2"]
    assert {m["view"] for m in metas if m["modality"] != "CT"} <= {"frontal", None}
    # Per study, which series were kept and why: what `radforge inspect` prints (pseudonyms only).
    sel = json.loads((Path(res.dest) / shardspec.SELECTION).read_text())
    whys = Counter((e["status"], e["why"]) for entries in sel["studies"].values() for e in entries)
    assert whys == Counter({("used", "default"): 3, ("skipped", "rule:secondary"): 1})
    assert len(sel["studies"]) == 2
    from radforge import cli

    cli.main(["inspect", res.dest])
    printed = capsys.readouterr().out
    assert "rule:secondary" in printed and "AcquisitionNumber=2" in printed
    blob = b"".join(Path(t).read_bytes() for t in tars) + json.dumps(res.manifest).encode() + printed.encode()
    blob += (Path(res.dest) / shardspec.SELECTION).read_bytes()
    assert phantoms.PHI_MARKER.encode() not in blob


def test_frames_of_one_enhanced_ct_file_split_by_temporal_position(tmp_path, study):
    """Per-frame split values (FrameContentSequence.TemporalPositionIndex): two time points of
    one multi-frame file become two volumes of ten frames each; the file counts once."""
    info = phantoms.enhanced_ct(tmp_path / "MF", study, n_frames=20, shuffle_frames=False)
    (row,) = scan_paths(info.paths)
    row["positions"] = row["positions"][:10] * 2  # frames 10-19 repeat the positions of 0-9
    row["attrs"]["frames"] = [{"TemporalPositionIndex": "1" if f < 10 else "2"} for f in range(20)]
    items = plan_all([row], "ct.min_slices=8")
    vols = sorted((it for it in items if it.status == "planned"), key=lambda it: it.sub_series)
    assert [v.sub_series for v in vols] == ["TemporalPositionIndex=1", "TemporalPositionIndex=2"]
    assert [sorted(v.frames) for v in vols] == [list(range(10)), list(range(10, 20))]
    assert [v.all_paths for v in vols] == [info.paths, []]
    hu, _ = dicom.load_ct(vols[1], lambda p: Path(p).read_bytes())
    assert hu.shape == (10, 48, 48) and np.array_equal(np.rint(hu).astype(np.int16), info.hu_lps[10:])


def test_volumes_without_a_series_uid_get_keys_of_their_own(tmp_path, study):
    """Each file without SeriesInstanceUID is a group of its own; two Enhanced CT volumes must
    not share the one pseudonym of an empty UID."""
    paths = []
    for i in range(2):
        info = phantoms.enhanced_ct(tmp_path / f"MF{i}", study, n_frames=10, seed=i)
        paths.append(phantoms.rewrite(info.paths[0], tmp_path / f"nouid{i}.dcm", SeriesInstanceUID=None))
    items = plan_all(scan_paths(paths), "ct.min_slices=8")  # asserts unique keys
    assert [it.status for it in items] == ["planned", "planned"]
