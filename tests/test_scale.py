"""`radforge bench scale`: the synthetic index rows it plans (fast tier) and the scale pipeline on a
real local Ray at ~2k rows (slow tier: counts reconcile, nothing identifying in what DEST gets)."""

from __future__ import annotations

import itertools
import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc

from radforge import config, deid, dicom, ingest, phantoms, shardspec
from radforge.bench import scale
from radforge.config import IngestRecipe


def _recipe():
    return config.load(IngestRecipe, None, ["deid.demo_key=true", "series.per_study=thinnest"])


def _plan_sorted(t: pa.Table, group_by_group: bool = False) -> pa.Table:
    """Index rows → items as the plan stage makes them from one sorted block (`ingest._plan_block`),
    or group by group, one call per group (what a groupby's map_groups did)."""
    recipe = _recipe()
    secret = deid.load_secret(recipe.deid)
    t = t.sort_by("group_key")
    if not group_by_group:
        return ingest._plan_block(t, recipe, secret)
    keys = t.column("group_key").to_pylist()
    runs = [list(g) for _, g in itertools.groupby(range(t.num_rows), keys.__getitem__)]
    return pa.concat_tables([ingest._plan_block(t.slice(g[0], len(g)), recipe, secret) for g in runs])


def test_a_sorted_block_plans_as_its_groups_one_by_one():
    """`ingest._plan_block` plans a whole sorted block at once: the same items, in the same order,
    as one call per group; and one chunk per column (Ray serialises a block chunk by chunk)."""
    listed = ingest._scan_rows([], ["/archive/fifo", "/archive/link"], [0, 0], ["not_regular_file", "symlink_outside_source"])
    t = pa.concat_tables([scale.synthetic_rows(2, 2_000), listed])
    whole = _plan_sorted(t)
    assert whole.equals(_plan_sorted(t, group_by_group=True))
    assert all(c.num_chunks == 1 for c in whole.columns)
    statuses = set(zip(whole.column("status").to_pylist(), whole.column("reason").to_pylist()))
    assert {("skipped", "not_regular_file"), ("rejected", "unreadable_header"), ("planned", None)} <= statuses
    assert ingest._plan_block(t.slice(0, 0), _recipe(), b"k" * 32).num_rows == 0


def test_synthetic_rows_are_index_rows_that_plan_like_an_archive():
    t = scale.synthetic_rows(2, 2_000)  # part 2 at 2k rows holds both rare dispositions (deterministic)
    assert t.schema == dicom.INDEX_SCHEMA and t.num_rows == 2_000
    assert t.equals(scale.synthetic_rows(2, 2_000)) and not t.equals(scale.synthetic_rows(3, 2_000))
    assert len(set(t.column("path").to_pylist())) == t.num_rows
    # Planned through ingest's own path (a block sorted by group key: one group = one series or one radiograph).
    items = _plan_sorted(t)
    planned = items.filter(pc.equal(items.column("status"), "planned"))
    kinds_planned = set(planned.column("kind").to_pylist())
    assert kinds_planned == {"ct", "xray"}
    ct = planned.filter(pc.equal(planned.column("kind"), "ct"))
    slices = [n for n in ct.column("n_files").to_pylist()]
    assert max(slices) >= 100 and sum(slices) > 0.5 * t.num_rows  # CT series of 100-300 slices dominate the files
    # Every row is in exactly one item: planned files + dispositions = rows.
    files = [p for ps in items.column("all_paths").to_pylist() for p in ps]
    assert sorted(files) == sorted(t.column("path").to_pylist())
    reasons = set(items.filter(pc.not_equal(items.column("status"), "planned")).column("reason").to_pylist())
    assert {"unreadable_header", "localizer"} <= reasons


def test_ledger_parts_hold_a_blocks_lines_and_count_them(tmp_path):
    """`ingest._ledger_part`: a block's ledger lines in one part file named by its bytes (a retried
    task writes the same file), and the counts per status and reason the driver sums."""
    items = _plan_sorted(scale.synthetic_rows(2, 2_000))
    counts = ingest._ledger_part(items, str(tmp_path))
    lines = ingest._ledger_lines(items)
    assert len(set(counts.column("part").to_pylist())) == 1 and sum(counts.column("n").to_pylist()) == lines.num_rows > 0
    part = counts.column("part")[0].as_py()
    assert open(part).read().splitlines() == lines.column("line").to_pylist()
    assert ingest._ledger_part(items, str(tmp_path)).equals(counts) and len(list(tmp_path.iterdir())) == 1
    assert ingest._ledger_part(items.slice(0, 0), str(tmp_path)).num_rows == 0


def _whole_table(plan, recipe) -> dict:
    """What plan, assign and the manifest's accounting give when every item is pulled to the
    driver and worked out there with the same building blocks: per-study choice, shards,
    input counts, ledger lines and selection.json."""
    items = plan.items.take_all()
    vols = [{"key": it["key"], "study": it["study"], "series": it["series"], "selected_by": it["selected_by"],
             "slice_thickness": json.loads(it["safe"]).get("SliceThickness")}
            for it in items if it["modality"] == "CT" and it["series"] is not None
            and ((it["status"] == "planned" and it["kind"] == "ct") or (it["reason"] or "").startswith("per_study:"))]
    counts = {"skipped": {}, "rejected": {}}
    for it in items:
        if it["status"] != "planned":
            counts[it["status"]][it["reason"]] = counts[it["status"]].get(it["reason"], 0) + len(it["all_paths"])
    return {
        "per_study": dicom.choose_per_study(vols, recipe.series),
        "dropped": {it["key"]: it["reason"] for it in items if (it["reason"] or "").startswith("per_study:")},
        "shards": {it["key"]: shardspec.shard_name(it["split"], deid.Pseudonymizer.bucket(it["key"], plan.n_shards[it["split"]]), plan.version)
                   for it in items if it["status"] == "planned"},
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "ledger": sorted(json.dumps(ingest._ledger_line({"path": p, **{k: it[k] for k in ("status", "reason", "detail")}}))
                         for it in items if it["status"] in ("rejected", "skipped") for p in it["all_paths"]),
        "selection": json.dumps(shardspec.selection(plan.items.map_batches(ingest._series_rows, batch_format="pyarrow").take_all()), indent=1),
    }


def test_scale_pipeline_reconciles_on_ray(ray_cluster, tmp_path):
    expected = {}
    recipe = _recipe()
    r = scale.run_size(3_000, str(tmp_path), recipe, inspect=lambda plan: expected.update(_whole_table(plan, recipe)))
    assert scale._reconciles(r), r
    i = r["inputs"]
    assert i["seen"] == 3_000 and i["used"] + sum(i["skipped"].values()) + sum(i["rejected"].values()) == 3_000
    assert r["planned"] == r["assigned"] == r["samples"] > 0 and r["shards"] >= 1
    assert any(k.startswith("per_study:") for k in i["skipped"])  # the second reconstruction of a study
    # The per-study choice made in one task over the volumes' rows equals choosing over every item.
    assert expected["per_study"] and expected["dropped"] == expected["per_study"]
    assert i["skipped"] == expected["counts"]["skipped"]
    assert i["rejected"] == expected["counts"]["rejected"]
    dest, private = tmp_path / "shards", tmp_path / "shards.private"
    m = shardspec.read_manifest(str(dest))
    assert m["totals"]["samples"] == r["samples"]
    # Every planned item is in the shard its key hashes to (assign's blocks, cut by slot).
    records = list(ingest._records(str(private / "progress"), m["plan_digest"]))
    assert {k: rec["path"] for rec in records for k in rec["keys"]} == expected["shards"]
    for name in (shardspec.MANIFEST, shardspec.SELECTION):
        assert phantoms.PHI_MARKER not in (dest / name).read_text()
    ledger = (private / "rejects.jsonl").read_text().splitlines()
    assert len(ledger) == i["seen"] - i["used"]
    # The ledger's lines are written in Ray tasks, one part file per block, concatenated by the
    # driver: the same lines as the whole-table path; selection.json (made in a task) its bytes.
    assert sorted(ledger) == expected["ledger"]
    assert (dest / shardspec.SELECTION).read_text() == expected["selection"]
    assert not (private / "ledger-parts").exists()
    json.dumps(r)  # the figures are JSON (bench --json)
    shutil.rmtree(dest)  # no tars behind this manifest: keep it out of the session's shard-readability pass
