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


def test_synthetic_rows_are_index_rows_that_plan_like_an_archive():
    t = scale.synthetic_rows(2, 2_000)  # part 2 at 2k rows holds both rare dispositions (deterministic)
    assert t.schema == dicom.INDEX_SCHEMA and t.num_rows == 2_000
    assert t.equals(scale.synthetic_rows(2, 2_000)) and not t.equals(scale.synthetic_rows(3, 2_000))
    assert len(set(t.column("path").to_pylist())) == t.num_rows
    # Planned through ingest's own per-group path (one group = one series or one radiograph).
    t = t.sort_by("group_key")
    recipe, keys = _recipe(), t.column("group_key").to_pylist()
    secret = deid.load_secret(recipe.deid)
    items = pa.concat_tables([ingest._plan_batch(t.slice(g[0], len(g)), recipe, secret)
                              for _, g in ((k, list(g)) for k, g in itertools.groupby(range(t.num_rows), keys.__getitem__))])
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


def test_scale_pipeline_reconciles_on_ray(ray_cluster, tmp_path):
    expected = {}

    def reference(plan):  # the whole-table path: every disposition pulled to the driver
        items = plan.items.take_all()
        expected["selection"] = json.dumps(shardspec.selection(ingest._series_items(plan.items)), indent=1)
        expected["ledger"] = sorted(json.dumps(ingest._ledger_line({"path": p, **{k: it[k] for k in ("status", "reason", "detail")}}))
                                    for it in items if it["status"] in ("rejected", "skipped") for p in it["all_paths"])

    r = scale.run_size(3_000, str(tmp_path), inspect=reference)
    assert scale._reconciles(r), r
    i = r["inputs"]
    assert i["seen"] == 3_000 and i["used"] + sum(i["skipped"].values()) + sum(i["rejected"].values()) == 3_000
    assert r["planned"] == r["assigned"] == r["samples"] > 0 and r["shards"] >= 1
    assert any(k.startswith("per_study:") for k in i["skipped"])  # the second reconstruction of a study
    dest = tmp_path / "shards"
    m = shardspec.read_manifest(str(dest))
    assert m["totals"]["samples"] == r["samples"]
    for name in (shardspec.MANIFEST, shardspec.SELECTION):
        assert phantoms.PHI_MARKER not in (dest / name).read_text()
    ledger = (tmp_path / "shards.private" / "rejects.jsonl").read_text().splitlines()
    assert len(ledger) == i["seen"] - i["used"]
    # The ledger's lines are made in Ray tasks: the same lines as the whole-table path (their order
    # follows Ray task completion, so they are compared as a set); selection.json is its bytes.
    assert (dest / shardspec.SELECTION).read_text() == expected["selection"]
    assert sorted(ledger) == expected["ledger"]
    json.dumps(r)  # the figures are JSON (bench --json)
    shutil.rmtree(dest)  # no tars behind this manifest: keep it out of the session's shard-readability pass
