"""The ingest pipeline: DICOM on any fsspec URL → de-identified WebDataset shards + manifest.

The only module that imports `ray.data`. Stages, one driver function each (`_list_and_scan`,
`_plan`, `_assign`, `_build`, `_write_manifest`; all distributed, streaming; the driver only
aggregates counts and per-shard records):

    list      fan the recursive listing out over SOURCE's sub-directories
    scan      header-only read of every file, SCAN_BATCH files per task → the private index
              (parquet parts of INDEX_PART_ROWS rows, `<private>/index/`)
    plan      group by series / image (sort shuffle; one partition per index block, blocks of
              PLAN_ROWS_PER_PARTITION rows), validate geometry from headers → items, dispositions
    assign    deterministic shard per item: hash(key) mod n_shards(split), n_shards from the
              estimated output bytes of the split and `shards.target_mb`; shards are dealt
              round-robin to at most 200 build slots
    build     one task per slot (a sort on the slot with fixed boundaries, no sampling), shard
              after shard: decode, HU/orient/resample or VOI/resize, de-identify, encode,
              write the tar locally, upload atomically, then a completion record in
              `<private>/progress/` (this is what makes a killed run resumable without rewriting)
    manifest  written last, atomically, from the completion records

Between tasks, index rows and `dicom.PlanItem`s travel as Arrow columns (INDEX_SCHEMA,
ITEM_SCHEMA), converted in one place (`_index_table`/`_index_rows`, `_items_table`/`_items_of`);
the recipe and the profile travel as the dataclasses themselves. The run's Ray Data settings
(`_data_context`) apply to its own datasets only.

Cost model (`radforge bench ingest`): a Ray Data task costs ~10-20 ms and each dataset execution
~0.2 s of fixed overhead, so work is cut into few, large tasks; what remains is the per-file work
itself. CPU ms per 512² RLE CT slice, in process, resampled to 3/1.5/1.5 mm (measured at a 1-min
load of ~6 on 2 cores, so a few tens of % above an idle machine): header scan 1.4; build 2.3 =
read 0.20, parse (dcmread) 0.49, decode 0.77, HU 0.38 (mostly first touch of the float32
volume), orient 0.10, resample 0.27, int16 0.07, encode + tar 0.03. A build task's decoder round
trip costs its own side ~0.03-0.05 ms per slice. Every build task clocks its stages
(`transforms.StageClock`, the decoder child's included) into its outcome records, and
`Result.build_cpu_s` sums them; the bench prints them beside what the rest of the run (scan,
plan, Ray itself) cost.

Hostile input: every budget is checked from the headers before any decoder runs (`dicom.scan`
caps the header read at `dicom.HEADER_LIMITS`; planning refuses a file whose rows × columns ×
frames × samples × bits allocated exceed `xray.max_pixels` / `ct.max_voxels`, `too_large`, the
figure in the private ledger's `detail`), and the build task decodes in a child process
(`_Decoder`): a decoder that aborts, crashes, is OOM-killed or overruns DECODE_TIMEOUT_S costs
that one sample (`decode_error`, with what happened as the detail), and a build task that dies
anyway is retried BUILD_TASK_RETRIES times, then the run fails, instead of Ray Data's default of
retrying forever. Peak memory of a build task ≈ the Ray worker (~0.3 GB) + its decoder child
(~0.2 GB + one sample): an X-ray ≈ 32 B × pixels (file, decoded pixels, float64 modality/VOI
values, resize; measured 32-34 B/px at 4096² and 6000²), so ≤ 32 B × `xray.max_pixels`
(1.3 GB at the default); a CT series ≈ 4 B × source voxels (the HU volume, ≤ `ct.max_voxels`)
+ 6 B × stored voxels (resampled float32 + int16) + one decoded file (≤ 2 B × `ct.max_voxels`):
~5 B per source voxel when the profile downsamples (measured: 100 × 512² → 127 MB).

Resume/idempotence: the plan is a pure function of the inputs, the recipe and the secret, so a
restarted run computes the same shard assignment; shards whose completion record exists are not
rebuilt. A finished DEST with the same plan digest is a no-op. A DEST holding a different plan is
refused (choose a new DEST) rather than mixed.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from radforge import config, deid, dicom, kinds, shardspec, storage
from radforge.config import IngestRecipe
from radforge.errors import ConfigError
from radforge.transforms import NO_CLOCK, Profile, StageClock

log = logging.getLogger("radforge.ingest")

# Granularity. A Ray Data task costs ~10-20 ms of fixed overhead (scheduling, block
# (de)serialisation, stats) and a header scan ~1 ms per file, so a scan task of 128 files keeps
# that overhead near 10% while 1,000 files still make 8 tasks for 2 CPUs (batches of 16 were
# ~60% overhead). Shuffle partitions scale with the data: each is one reduce task plus one
# block, so ∝-files partitioning made small and medium runs pay for hundreds of near-empty
# tasks. (Ray's sort makes one partition per input block, so the plan's parallelism comes from
# the index blocks of PLAN_ROWS_PER_PARTITION rows; planning is ~0.05 ms per file, so one block
# is fine when small.)
SCAN_BATCH = 128
PLAN_ROWS_PER_PARTITION = 50_000  # index rows (~1 KB each) per plan partition: ~50 MB per task
INDEX_PART_ROWS = 250_000  # rows per private index parquet part (parallel re-read at scale)
SORT_PIECE_BYTES = 512 * 1024  # least bytes per (block, slot) piece of assign's sort: above Ray's inline limit (`_assign`)
BUILD_TASK_RETRIES = 3  # a build task that died (node lost, OOM-killed) is retried this often, then the run fails
DECODE_TIMEOUT_S = 600.0  # one sample's decode (`_Decoder`); beyond it the child is killed: decode_error

# The plan as Ray Data columns: one per `dicom.PlanItem` field (`_items_table` / `_items_of`).
ITEM_SCHEMA = pa.schema(
    [
        ("status", pa.string()),  # "planned" | "rejected" | "skipped"
        ("reason", pa.string()),
        ("paths", pa.list_(pa.string())),  # slices in order (CT) / the file (X-ray) / disposed files
        ("all_paths", pa.list_(pa.string())),  # every input file the item accounts for
        ("kind", pa.string()),  # kinds.ImageKind name; null for a disposition (rejected/skipped files)
        ("key", pa.string()),
        ("split", pa.string()),
        ("est_bytes", pa.int64()),
        ("decode_bytes", pa.int64()),
        ("detail", pa.string()),  # a disposition's figure (too_large): private ledger only
        ("frames", pa.list_(pa.int32())),
        ("modality", pa.string()),
        ("patient", pa.string()),
        ("study", pa.string()),
        ("series", pa.string()),
        ("safe", pa.string()),  # JSON of the allow-listed header values
        ("transfer_syntax", pa.string()),
        ("source_shape", pa.list_(pa.int64())),
        ("source_spacing_mm", pa.list_(pa.float64())),
        ("source_affine", pa.list_(pa.list_(pa.float64()))),
        ("n_files", pa.int64()),
        ("accession", pa.string()),  # private join keys and redaction terms: never written to DEST
        ("study_uid", pa.string()),
        ("phi_terms", pa.list_(pa.string())),
        ("sub_series", pa.string()),  # CT: the acquisition of a split series (its key has a suffix)
        ("selected_by", pa.string()),  # CT: the series rule that kept it
        ("flip", pa.list_(pa.string())),  # X-ray: display flips applied
        ("orientation", pa.list_(pa.string())),  # X-ray: PatientOrientation after the flips
    ]
)
_ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(dicom.PlanItem))
assert set(_ITEM_FIELDS) == set(ITEM_SCHEMA.names), "ITEM_SCHEMA must hold every PlanItem field"

OUTCOME_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("modality", pa.string()),
        ("status", pa.string()),  # "used" | "rejected"
        ("reason", pa.string()),
        ("n_files", pa.int64()),
        ("bytes", pa.int64()),
        # CPU seconds per build stage (`transforms.StageClock`) of the whole shard, on its first
        # row (null on the others): how `radforge bench ingest` breaks the build down.
        ("cpu_s", pa.map_(pa.string(), pa.float64())),
    ]
)


@dataclass
class Result:
    """What a run did; `manifest` is the written manifest."""

    dest: str
    private: str
    manifest: dict
    wall_s: float
    built_shards: int = 0
    reused_shards: int = 0
    noop: bool = False
    stage_s: dict = field(default_factory=dict)
    build_cpu_s: dict = field(default_factory=dict)  # CPU seconds per build stage, all build tasks summed
    source_stats: dict = field(default_factory=dict)  # DICOMweb: requests, retries (by cause), bytes

    @property
    def ok(self) -> bool:
        return self.manifest["totals"].get("samples", 0) > 0


@dataclass
class _Plan:
    """The planned items (a materialised dataset) and what the driver derived from them."""

    items: Any  # ray.data.Dataset of ITEM_SCHEMA rows
    n_shards: dict[str, int]  # split -> shard count
    planned: int  # items to build
    digest: str  # plan digest: inputs, recipe, secret (through the pseudonyms) and tables
    version: int = 1  # the manifest version these shards belong to (`--append`: N + 1), in their names


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def run(
    source: str,
    dest: str,
    recipe: IngestRecipe,
    *,
    reports: str | None = None,
    labels: str | None = None,
    progress: bool = True,
    append: bool = False,
) -> Result:
    """Ingest SOURCE into DEST. Raises ConfigError (before any work) on bad configuration.

    `append`: DEST holds a finished ingest (version N); only inputs not in its index (by SOP
    Instance UID) are planned, with the earlier files of the series they join; their shards are
    written beside the old ones as version N + 1 (see `_Previous`)."""
    t0 = time.time()
    dest = dest.rstrip("/")
    private = (recipe.private_dir or dest + ".private").rstrip("/")
    source = _source(source, recipe)
    _preflight(source, dest, private)
    secret = deid.load_secret(recipe.deid)
    tables = _TablesSpec.load(reports, recipe.reports, labels, recipe.labels)

    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    stage: dict[str, float] = {}
    with _data_context():
        prev = _Previous.load(dest, private, secret) if append else None
        t = time.time()
        index, seen = _list_and_scan(source, private, progress)
        stage["scan"] = time.time() - t
        if prev is not None:
            index, seen = prev.select(index, private)
            if seen == 0:  # nothing arrived since version N
                return Result(dest, private, prev.manifest, time.time() - t0, noop=True, stage_s=stage,
                              source_stats=_source_stats(source))
        t = time.time()
        plan = _plan(index, recipe, secret, tables)
        plan.version = prev.version + 1 if prev is not None else 1
        stage["plan"] = time.time() - t

        manifest_url = storage.join(dest, shardspec.MANIFEST)
        progress_url = storage.join(private, "progress")
        if storage.exists(manifest_url) and prev is None:
            existing = json.loads(storage.read_bytes(manifest_url))
            if existing.get("plan_digest") == plan.digest:
                return Result(dest, private, existing, time.time() - t0, noop=True, stage_s=stage)
            raise ConfigError(
                f"DEST already holds a different ingest ({manifest_url}); use a new DEST (inputs, recipe or secret changed)"
            )
        done = _load_progress(progress_url, plan.digest)

        t = time.time()
        built, build_cpu = _build(plan, done, recipe, tables, dest, progress_url, progress)
        stage["build"] = time.time() - t

        m = _write_manifest(plan, recipe, secret, seen, dest, private, progress_url, prev)
    return Result(dest, private, m, time.time() - t0, built_shards=built, reused_shards=len(done), stage_s=stage,
                  source_stats=_source_stats(source), build_cpu_s=build_cpu)


@contextlib.contextmanager
def _data_context():
    """Ray Data settings for this run only: a copy of the current DataContext is current while
    the run lasts (datasets snapshot it when created) and the caller's is restored after, as is
    the level of the "ray.data" logger."""
    import ray
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current().copy()
    ctx.verbose_stats_logs = False
    # Pull-based sort shuffle is task-based: no aggregator actors to start, which dominated
    # small and medium runs with the hash shuffle (seconds per groupby); it scales the same way.
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # Per-operator reservations split the CPUs between the operators of a stage (its input
    # buffer included), so on a small cluster a map ran one task at a time ("backpressured:
    # tasks(ResourceBudget)"; 2 CPUs scanned at the speed of 1). Without them the global
    # object-store limit still bounds memory; only the per-operator split goes.
    ctx.op_resource_reservation_enabled = False
    # Ray Data's own per-operator log lines would drown the summary; our bars show progress.
    ctx.enable_progress_bars = False
    ray_log = logging.getLogger("ray.data")
    level = ray_log.level
    ray_log.setLevel(logging.WARNING)
    try:
        with ray.data.DataContext.current(ctx):
            yield
    finally:
        ray_log.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Stages (driver side)
# ---------------------------------------------------------------------------------------------


def _list_and_scan(source: str, private: str, progress: bool):
    """list + scan: every file's header → the private index → (index dataset, files seen).

    The driver consumes index batches (not files) to write the private index and drive the bar;
    the returned dataset re-reads the index parts, one task per part.
    """
    import ray

    scanned = _list(source).map_batches(_scan_batch, batch_size=SCAN_BATCH, batch_format="pyarrow")
    seen, parts = _write_index(scanned, storage.join(private, "index"), progress)
    if seen == 0:
        raise ConfigError(f"SOURCE has no files: {source}")
    # One task per part reads it with pyarrow: ray.data.read_parquet costs ~1 s of fixed set-up
    # (metadata prefetch, schema resolution) per call, longer than planning a thousand files.
    index = ray.data.from_items([{"part": u} for u in parts], override_num_blocks=len(parts)).map_batches(
        _read_index_parts, batch_size=1, batch_format="pyarrow"
    )
    return index, seen


def _plan(index, recipe: IngestRecipe, secret: bytes, tables: "_TablesSpec | None") -> _Plan:
    """plan: group the index by series / image, validate → items (materialised), shard counts
    per split from the estimated bytes and `shards.target_mb`, and the plan digest."""
    # A sort puts every row of a group into one block (its ranges split between keys); each
    # block is planned whole (`_plan_block`), which is what a groupby's map_groups does, less
    # its one output table per group.
    items = (
        index.sort("group_key")
        .map_batches(_plan_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"recipe": recipe, "secret": secret})
        .materialize()
    )
    items = _select_per_study(items, recipe)
    # One pass of small per-block aggregates: bytes per split (→ shard counts) and the plan digest.
    agg = _aggregate(items)
    target = recipe.shards.target_mb * 1024 * 1024
    n_shards = {s: max(1, math.ceil(b / target)) for s, b in sorted(agg["est_bytes"].items())}
    body = {"items": agg["hash"], "n_shards": n_shards, "recipe": config.to_dict(recipe),
            "tables": tables.digest() if tables else None}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
    return _Plan(items, n_shards, agg["planned"], digest)


def _assign(plan: _Plan, done: dict[str, dict]):
    """assign: the planned items not yet built, each with its shard and build slot, as one block
    per slot.

    Blocks are cut at explicit slot boundaries: a groupby's sort shuffle makes as many
    partitions as it has input blocks and places its boundaries by sampling, so the few item
    blocks of a run put every shard into one task (2 CPUs built one shard at a time). Slots deal
    the shards round-robin over the tasks.

    The sort's map tasks cut each input block into `slots` pieces, and a task's return under
    Ray's inline limit (100 KiB) is kept in the memory of its owner, the driver: 20 item blocks
    × 200 slots at 1M index rows put ~150 MB of items into the driver (`radforge bench scale`).
    The items are first coalesced (no shuffle) into blocks of ≥ slots × SORT_PIECE_BYTES.
    """
    slots = _partitions(sum(plan.n_shards.values()))
    items = plan.items
    blocks = max(1, min(items.num_blocks(), (items.size_bytes() or 0) // (slots * SORT_PIECE_BYTES)))
    if blocks < items.num_blocks():
        items = items.repartition(blocks, shuffle=False)
    todo = items.map_batches(
        _assign_batch,
        batch_format="pyarrow",
        fn_kwargs={"n_shards": plan.n_shards, "done": sorted(done), "slots": slots, "version": plan.version},
    )
    return todo.sort("slot", boundaries=list(range(1, slots)))


def _build(plan: _Plan, done: dict[str, dict], recipe: IngestRecipe, tables: "_TablesSpec | None",
           dest: str, progress_url: str, progress: bool) -> tuple[int, dict[str, float]]:
    """build: every shard without a completion record → shards in DEST, records in
    `progress_url`. Returns the number of shards built and the CPU seconds per build stage
    (summed over the build tasks and their decoder processes)."""
    import ray

    todo_items = plan.planned - sum(r["items"] for r in done.values())
    if todo_items <= 0:
        return 0, {}
    with warnings.catch_warnings():
        # Ray Data retries a task forever by default; a build task that keeps dying (decoding
        # runs in `_Decoder`'s child, so it is not the input) fails the run instead. Ray 2.60
        # has no named parameter for it yet, only the deprecated ray_remote_args (removed in 2.64).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        outcomes = _assign(plan, done).map_batches(
            _build_shards,
            batch_size=None,
            batch_format="pyarrow",
            max_retries=BUILD_TASK_RETRIES,
            fn_kwargs={
                "dest": dest,
                "progress_url": progress_url,
                "recipe": recipe,
                "profile": Profile.from_recipe(recipe),
                "tables_ref": ray.put(tables.read()) if tables else None,
                "digest": plan.digest,
            },
        )
    built = 0
    cpu = StageClock()
    bar = _bar(progress, todo_items, "sample", "build shards")
    for batch in outcomes.iter_batches(batch_format="pyarrow", batch_size=None):
        built += len(set(batch.column("shard").to_pylist()))
        for stages in batch.column("cpu_s").to_pylist():
            cpu.add(dict(stages or ()))
        if bar is not None:
            bar.update(batch.num_rows)
    if bar is not None:
        bar.close()
    return built, cpu.seconds


def _write_manifest(plan: _Plan, recipe: IngestRecipe, secret: bytes, seen: int, dest: str, private: str,
                    progress_url: str, prev: "_Previous | None" = None) -> dict:
    """manifest: from the completion records and the input accounting, written last and
    atomically (only when there is at least one sample); also kept as `manifests/vN.json`.
    With `prev` (an append) version N + 1 on top of version N."""
    records = _load_progress(progress_url, plan.digest)
    inputs = _accounting(plan.items, progress_url, plan.digest, seen, private)
    m = shardspec.new_manifest(
        profile=Profile.from_recipe(recipe),
        recipe=config.to_dict(recipe),
        deid={"pseudonyms": "hmac-sha256", "demo_key": secret == deid.DEMO_KEY, "keep_age_sex": recipe.deid.keep_age_sex},
        plan_digest=plan.digest,
    )
    m["version"] = plan.version
    shardspec.finalize(m, list(records.values()), inputs)
    if not shardspec.reconciles(inputs):  # pragma: no cover - a bug, never an input problem
        raise RuntimeError(f"input accounting does not reconcile: {inputs}")
    if prev is not None:
        m = prev.next_manifest(m, private)
    if m["totals"]["samples"]:
        _write_selection(plan.items, storage.join(dest, shardspec.SELECTION))
        body = json.dumps(m, indent=1, sort_keys=True).encode()
        storage.write_bytes_atomic(storage.join(dest, shardspec.manifest_path(m["version"])), body)
        storage.write_bytes_atomic(storage.join(dest, shardspec.MANIFEST), body)
    return m


# ---------------------------------------------------------------------------------------------
# Append (`--append`): version N + 1 of a finished DEST
# ---------------------------------------------------------------------------------------------

_DISPOSITIONS = pa.schema([("ident", pa.string()), ("path", pa.string()), ("group_key", pa.string()),
                           ("status", pa.string()), ("reason", pa.string())])


@dataclass
class _Previous:
    """What an append builds on: version N's manifest and every known file's latest
    disposition, `<private>/dispositions/vN.parquet` (identity = SOP Instance UID, else the
    path; used | skipped | rejected and the reason). Made from the index and the ledger of
    version 1 on the first append, before the scan replaces the index, so a killed append
    re-run plans the same inputs (and reuses its completed shards). Held in the driver: ~100 B
    per file."""

    manifest: dict
    known: pa.Table  # _DISPOSITIONS rows of version N
    new: int = 0  # files not known to version N
    replanned: int = 0  # known files planned again with the series a new file joined
    groups: set = field(default_factory=set)  # group keys (series / images) this version plans

    @property
    def version(self) -> int:
        return int(self.manifest.get("version", 1))

    @classmethod
    def load(cls, dest: str, private: str, secret: bytes) -> "_Previous":
        import pyarrow.parquet as pq

        try:
            m = shardspec.read_manifest(dest)
        except ConfigError:
            raise ConfigError(f"--append needs a finished ingest in {dest} (no manifest.json): run without --append first") from None
        if m.get("deid", {}).get("demo_key") != (secret == deid.DEMO_KEY):
            raise ConfigError("--append must use the pseudonym key of the earlier versions (demo key on one side only)")
        url = storage.join(private, "dispositions", f"v{int(m.get('version', 1))}.parquet")
        if not storage.exists(url):
            storage.write_bytes_atomic(url, _parquet_bytes(_dispositions(_index_idents(private), private)))
        with storage.open_input(url) as f:
            return cls(m, pq.read_table(f))

    def select(self, index, private: str):
        """The index rows to plan: files not known to version N and every file of a group one of
        them belongs to (a series that gained slices is planned whole) → (dataset, row count)."""
        import pyarrow.compute as pc

        rows = _index_idents(private)
        fresh = pc.invert(pc.is_in(rows.column("ident"), value_set=self.known.column("ident")))
        groups = pc.unique(rows.filter(fresh).column("group_key"))
        self.new = int(pc.sum(fresh).as_py() or 0)
        selected = int(pc.sum(pc.is_in(rows.column("group_key"), value_set=groups)).as_py() or 0)
        self.replanned = selected - self.new
        self.groups = set(groups.to_pylist())
        return index.map_batches(_in_groups, batch_format="pyarrow", fn_kwargs={"groups": sorted(self.groups)}), selected

    def next_manifest(self, m: dict, private: str) -> dict:
        """Version N + 1: this version's shards and accounting on top of version N; samples of
        earlier versions that a new one replaces (same key) are superseded; the totals count
        every known file once, at its latest disposition."""
        import pyarrow.compute as pc

        m["inputs"] = {**m["inputs"], "new": self.new, "replanned": self.replanned}
        earlier = _sample_index(storage.join(private, "progress"), {s["path"] for s in self.manifest["shards"]})
        gone = [earlier[k] for r in _records(storage.join(private, "progress"), m["plan_digest"]) for k in r.get("keys", {})
                if k in earlier]
        mine = _dispositions(_index_idents(private), private, self.groups)
        keep = pc.invert(pc.is_in(self.known.column("group_key"), value_set=pc.unique(mine.column("group_key"))))
        known = pa.concat_tables([self.known.filter(keep), mine])
        url = storage.join(private, "dispositions", f"v{m['version']}.parquet")
        storage.write_bytes_atomic(url, _parquet_bytes(known))
        out = shardspec.append_version(self.manifest, m, gone, _inputs_of(known))
        if not shardspec.reconciles(out["inputs"]):  # pragma: no cover - a bug, never an input problem
            raise RuntimeError(f"input accounting does not reconcile: {out['inputs']}")
        return out


def _in_groups(batch: pa.Table, groups: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("group_key"), value_set=pa.array(groups, pa.string())))


def _index_idents(private: str) -> pa.Table:
    """(ident, path, group_key) of every row of the private index as it is now."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = []
    for url, _ in storage.find_files(storage.join(private, "index")):
        with storage.open_input(url) as f:
            parts.append(pq.read_table(f, columns=["path", "sop_uid", "group_key"]))
    t = pa.concat_tables(parts) if parts else pa.table({"path": [], "sop_uid": [], "group_key": []},
                                                         schema=pa.schema([("path", pa.string()), ("sop_uid", pa.string()), ("group_key", pa.string())]))
    ident = pc.if_else(pc.is_null(t.column("sop_uid")), pc.binary_join_element_wise("path:", t.column("path"), ""),
                       pc.binary_join_element_wise("sop:", t.column("sop_uid"), ""))
    return pa.table({"ident": ident, "path": t.column("path"), "group_key": t.column("group_key")})


def _dispositions(rows: pa.Table, private: str, groups: set[str] | None = None) -> pa.Table:
    """Each file of `rows` planned by the last run with its disposition: the run's private
    ledger (`rejects.jsonl`: skipped / rejected) or used. Rows the run did not plan (an append
    plans some groups only) are left out."""
    ledger: dict[str, tuple[str, str]] = {}
    url = storage.join(private, "rejects.jsonl")
    if storage.exists(url):
        for line in storage.read_bytes(url).splitlines():
            r = json.loads(line)
            ledger[r["path"]] = (r["status"], r["reason"])
    out = {n: [] for n in _DISPOSITIONS.names}
    for ident, path, group in zip(*(rows.column(c).to_pylist() for c in ("ident", "path", "group_key"))):
        if groups is not None and group not in groups:
            continue
        status, reason = ledger.get(path, ("used", None))
        for k, v in zip(_DISPOSITIONS.names, (ident, path, group, status, reason)):
            out[k].append(v)
    return pa.table(out, schema=_DISPOSITIONS)


def _inputs_of(known: pa.Table) -> dict:
    """Manifest `inputs` over every known file at its latest disposition."""
    counts = {"skipped": {}, "rejected": {}}
    used = 0
    for status, reason in zip(known.column("status").to_pylist(), known.column("reason").to_pylist()):
        if status == "used":
            used += 1
        else:
            counts[status][reason] = counts[status].get(reason, 0) + 1
    return {"seen": known.num_rows, "used": used, "skipped": dict(sorted(counts["skipped"].items())),
            "rejected": dict(sorted(counts["rejected"].items()))}


def _sample_index(progress_url: str, shards: set[str]) -> dict[str, dict]:
    """key → {"key", "shard", "split", "modality"} of the samples in `shards` (completion records)."""
    out = {}
    for url, _ in storage.find_files(progress_url):
        if url.endswith(".json"):
            rec = json.loads(storage.read_bytes(url))
            if rec["path"] in shards:
                for key, modality in rec.get("keys", {}).items():
                    out[key] = {"key": key, "shard": rec["path"], "split": rec["split"], "modality": modality}
    return out


def _parquet_bytes(t: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(t, buf)
    return buf.getvalue().to_pybytes()


# ---------------------------------------------------------------------------------------------
# Pre-flight
# ---------------------------------------------------------------------------------------------


def _source(source: str, recipe: IngestRecipe) -> str:
    """SOURCE as the listing takes it: a DICOMweb URL gets the recipe's filters and client
    settings in its query (and its request counters are reset for this run)."""
    from radforge import dicomweb

    if not dicomweb.is_dicomweb(source):
        return source
    source = dicomweb.resolve(source, recipe.dicomweb)
    dicomweb.reset_stats(source)
    dicomweb.drop_cache(source)  # instances a run that died kept for its build
    atexit.register(dicomweb.drop_cache, source)  # and if this one dies (the driver's node only)
    return source


def _source_stats(source: str) -> dict:
    from radforge import dicomweb

    if not dicomweb.is_dicomweb(source):
        return {}
    dicomweb.drop_cache(source)  # what the build did not take (disposed files, other nodes' copies)
    return dicomweb.read_stats(source)


def _preflight(source: str, dest: str, private: str) -> None:
    storage.check_readable(source)
    norm = lambda u: u.rstrip("/") + "/"  # noqa: E731
    if norm(private).startswith(norm(dest)):
        raise ConfigError("the private location (index, rejects ledger) must not be inside DEST")
    if norm(dest).startswith(norm(source)):
        raise ConfigError("DEST must not be inside SOURCE (the shards would be re-ingested)")
    storage.check_writable(dest)
    storage.check_writable(private)


# ---------------------------------------------------------------------------------------------
# Stage functions (run in Ray workers)
# ---------------------------------------------------------------------------------------------


def _list(source: str):
    """Listing fanned out over sub-directories, so huge trees are listed in parallel.

    Rows are every directory entry that is not a directory (storage.walk's policy): `skip` is ""
    for a file to scan, else the reason it is never opened (FIFO, socket, symlink, ...); the scan
    turns those into index rows with status "skipped", so they are counted in `seen`.
    """
    import ray

    source = storage.absolute(source)  # workers do not share the driver's cwd
    if storage.isfile(source):
        return ray.data.from_items([{"path": e.url, "size": e.size, "skip": ""} for e in storage.walk(source)])
    subdirs, top = storage.scan_dir(source)
    top_ds = ray.data.from_items(_listed(top)) if top else None
    if not subdirs:
        return top_ds if top_ds is not None else ray.data.from_items([])
    nested = ray.data.from_items([{"dir": d} for d in subdirs]).flat_map(
        lambda r: _listed(storage.walk(r["dir"], within=source))
    )
    return nested.union(top_ds) if top_ds is not None else nested


def _listed(entries: list[storage.Entry]) -> list[dict]:
    return [{"path": e.url, "size": e.size, "skip": e.skip or ""} for e in entries]


def _partitions(n: int) -> int:
    """Shuffle partitions: enough for parallelism, few enough that tiny runs stay quick."""
    return max(1, min(200, n))


def _write_index(files_with_headers, index_url: str, progress: bool) -> tuple[int, list[str]]:
    """Stream index batches into parquet parts in the private location → (rows, part URLs).

    Parts of INDEX_PART_ROWS rows, each uploaded as soon as it is full: the driver holds one
    batch and one local part at a time, and the plan stage re-reads the parts in parallel.
    """
    import pyarrow.parquet as pq

    if storage.exists(index_url):
        storage.remove(index_url, recursive=True)
    storage.makedirs(index_url)
    bar = _bar(progress, None, "files", "scan headers")
    seen = 0
    parts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="radforge-index-") as tmp:
        local = os.path.join(tmp, "index.parquet")
        writer = None
        for batch in files_with_headers.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None:
                writer, part_rows = pq.ParquetWriter(local, dicom.INDEX_SCHEMA), 0
            writer.write_table(batch.cast(dicom.INDEX_SCHEMA))
            seen += batch.num_rows
            part_rows += batch.num_rows
            if part_rows >= INDEX_PART_ROWS:
                parts.append(_upload_part(writer, local, index_url, len(parts)))
                writer = None
            if bar is not None:
                bar.update(batch.num_rows)
        if writer is not None:
            parts.append(_upload_part(writer, local, index_url, len(parts)))
        if bar is not None:
            bar.close()
    return seen, parts


def _upload_part(writer, local: str, index_url: str, n: int) -> str:
    """Close the local index part and upload it as part number `n` → its URL."""
    writer.close()
    url = storage.join(index_url, f"index-{n:05d}.parquet")
    storage.put_file_atomic(local, url)
    return url


def _read_index_parts(batch: pa.Table):
    """Index part URLs → their rows, one row group at a time (bounded task memory)."""
    import pyarrow.parquet as pq

    for url in batch.column("part").to_pylist():
        with storage.open_input(url) as f:
            for rg in pq.ParquetFile(f).iter_batches(batch_size=PLAN_ROWS_PER_PARTITION):
                yield pa.Table.from_batches([rg])


def _scan_batch(batch: pa.Table) -> pa.Table:
    rows = []
    skips = batch.column("skip").to_pylist() if "skip" in batch.column_names else [""] * batch.num_rows
    paths = batch.column("path").to_pylist()
    with storage.read_ahead([p for p, skip in zip(paths, skips) if not skip]):  # DICOMweb: bounded parallel fetch
        return _scan_rows(rows, paths, batch.column("size").to_pylist(), skips)


def _scan_rows(rows: list, paths: list, sizes: list, skips: list) -> pa.Table:
    for path, size, skip in zip(paths, sizes, skips):
        if skip:  # listed but never opened (see _list)
            rows.append({**dicom.rejected_row(path, size, skip), "status": "skipped"})
            continue
        try:
            # Range reads of the header only (storage.HeadReader): the build reads the file once more, whole.
            with storage.open_head(path, size) as f:
                rows.append(dicom.scan(path, size if size >= 0 else _size_of(f), f))
        except (OSError, ValueError):
            rows.append(dicom.rejected_row(path, size, "unreadable_header"))
    return _index_table(rows)


# The Ray Data edge. Index rows and plan items cross Ray tasks as Arrow columns; these four
# functions are the only place they are converted, and `safe` the only JSON among them.


def _index_table(rows: list[dict]) -> pa.Table:
    """Scanned index rows (`dicom.scan`) → an INDEX_SCHEMA table."""
    rows = [{**r, **{k: json.dumps(r.get(k), sort_keys=True) if r.get(k) is not None else None for k in _JSON_INDEX}}
            for r in rows]
    return pa.Table.from_pylist(rows, schema=dicom.INDEX_SCHEMA)


def _index_rows(batch: pa.Table) -> list[dict]:
    """An INDEX_SCHEMA table → index rows as `dicom.plan_group` takes them. A JSON text is
    parsed once per batch: the files of a series mostly carry the same `safe` and `attrs`, and
    their rows share the parsed dict (planning reads these, never writes them)."""
    cols = batch.to_pydict()
    for k in _JSON_INDEX:
        if k in cols:
            parsed: dict[str, Any] = {}
            cols[k] = [None if s is None else parsed[s] if s in parsed else parsed.setdefault(s, json.loads(s)) for s in cols[k]]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


_JSON_INDEX = ("safe", "attrs")  # index columns that are dicts in a scanned row, JSON in Arrow


def _items_table(items: list[dicom.PlanItem]) -> pa.Table:
    """Plan items → an ITEM_SCHEMA table."""
    rows = []
    for it in items:
        row = {name: getattr(it, name) for name in _ITEM_FIELDS}  # not asdict: it deep-copies
        row["kind"] = it.kind.name if it.kind is not None else None
        row["safe"] = json.dumps(it.safe, sort_keys=True)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def _items_of(batch: pa.Table) -> list[dicom.PlanItem]:
    """An ITEM_SCHEMA table (extra columns ignored) → plan items."""
    items = []
    for row in batch.select(list(_ITEM_FIELDS)).to_pylist():
        row["kind"] = kinds.get(row["kind"]) if row["kind"] is not None else None
        row["safe"] = json.loads(row["safe"])
        items.append(dicom.PlanItem(**row))
    return items


def _plan_block(batch: pa.Table, recipe: IngestRecipe, secret: bytes) -> pa.Table:
    """Index rows sorted by group key, every group whole → the items of each group in turn, as
    one table: one Arrow conversion each way per block. (A table per group, as map_groups
    yields, made blocks of thousands of chunks per column, and Ray serialises a table chunk by
    chunk: ~40 % of planning's CPU went to (de)serialising them.)"""
    ctx = dicom.PlanContext(recipe=recipe, pseudo=deid.Pseudonymizer(secret), pixel_digest=_copy_digest)
    items: list[dicom.PlanItem] = []
    for _, group in itertools.groupby(_index_rows(batch), key=lambda r: r["group_key"]):
        rows = list(group)
        # Entries the listing skipped (status "skipped", see _list) keep that disposition.
        items += [dicom.PlanItem(status="skipped", reason=r["reason"], paths=[r["path"]], all_paths=[r["path"]])
                  for r in rows if r["status"] == "skipped"]
        items += dicom.plan_group([r for r in rows if r["status"] != "skipped"], ctx)
    return _items_table(items)


def _series_rows(batch: pa.Table) -> pa.Table:
    """The CT series items of a block (planned, or a series-level disposition with its
    pseudonyms), the columns `shardspec.selection` reads."""
    import pyarrow.compute as pc

    ct = pc.and_(pc.equal(batch.column("modality"), "CT"), pc.is_valid(batch.column("series")))
    return batch.filter(pc.fill_null(ct, False)).select(["status", "reason", "key", "study", "series", "selected_by", "sub_series"])


def _write_selection(items, url: str) -> None:
    """`selection.json` of the materialised `items` at `url`, made and written by one Ray task
    that reads the item blocks one at a time, in block order (the items' own order):
    the driver hands over block refs only."""
    import ray

    ray.get(ray.remote(num_cpus=1)(_selection_task).remote(url, items.to_arrow_refs()))


def _selection_task(url: str, refs: list) -> None:
    import ray

    rows = [r for ref in refs for r in _series_rows(ray.get(ref)).to_pylist()]
    storage.write_bytes_atomic(url, json.dumps(shardspec.selection(rows), indent=1).encode())


def _copy_digest(row: dict, limit: int) -> str:
    """Pixel digest of a file sharing its SOPInstanceUID with another (planning compares the
    copies), decoded in `_DIGESTER`'s child process like every decode of input pixels."""
    item = dicom.PlanItem(status="planned", reason=None, paths=[row["path"]], all_paths=[], decode_bytes=limit)
    return _DIGESTER.canonical(item, None)[0]


def _pixel_digest_of(item: dicom.PlanItem, _profile) -> tuple[str, None]:
    return dicom.pixel_digest(storage.read_bytes(item.paths[0]), item.decode_bytes), None


def _select_per_study(items, recipe: IngestRecipe):
    """`series.per_study` (not "all"): the planned CT volumes not chosen in their study become
    skipped dispositions. The choice runs in one Ray task over one small row per volume
    (`_per_study_task`; a groupby's sort shuffle cost ~0.2 s per execution and kept its small
    pieces in the driver); the dropped keys stay in the object store (one ref handed to
    `_drop_batch`), so the driver holds no per-volume state."""
    import ray

    if recipe.series.per_study == "all":
        return items
    task = ray.remote(num_cpus=1, num_returns=2)(_per_study_task)
    n, drops = task.remote(items.to_arrow_refs(), recipe.series)
    if ray.get(n) == 0:
        return items
    return items.map_batches(_drop_batch, batch_format="pyarrow", fn_kwargs={"drops": [drops]}).materialize()


def _per_study_task(refs: list, cfg: config.SeriesConfig) -> tuple[int, pa.Table]:
    """The item blocks, read one at a time → (count, (key, reason) table) of the CT volumes
    `series.per_study` does not choose: one small row per volume (`_ct_volumes`) held at once,
    every study's choice made in this one task."""
    import ray

    vols = pa.concat_tables([_VOLUMES.empty_table(), *(_ct_volumes(ray.get(ref)) for ref in refs)])
    drops = _study_drops(vols, cfg)
    return drops.num_rows, drops


_VOLUMES = pa.schema([("key", pa.string()), ("study", pa.string()), ("series", pa.string()),
                      ("selected_by", pa.string()), ("slice_thickness", pa.float64())])


def _ct_volumes(batch: pa.Table) -> pa.Table:
    """The planned CT volumes of a block: one small row each, what `dicom.choose_per_study` reads."""
    import pyarrow.compute as pc

    vols = batch.filter(pc.fill_null(pc.and_(pc.equal(batch.column("status"), "planned"),
                                             pc.equal(batch.column("kind"), kinds.CT.name)), False))
    thick = [json.loads(s).get("SliceThickness") for s in vols.column("safe").to_pylist()]
    thick = [float(t) if isinstance(t, (int, float)) else None for t in thick]
    return pa.table({**{c: vols.column(c) for c in _VOLUMES.names[:-1]}, "slice_thickness": pa.array(thick, pa.float64())},
                    schema=_VOLUMES)


def _study_drops(vols: pa.Table, cfg: config.SeriesConfig) -> pa.Table:
    """The volumes of one study → (key, reason) of those not chosen."""
    drops = dicom.choose_per_study(vols.to_pylist(), cfg)
    return pa.table({"key": list(drops), "reason": list(drops.values())}, schema=pa.schema([("key", pa.string()), ("reason", pa.string())]))


def _drop_batch(batch: pa.Table, drops: list) -> pa.Table:
    """`drops`: refs to (key, reason) tables of the volumes `series.per_study` did not choose."""
    import ray

    drops = {k: r for t in ray.get(drops) for k, r in zip(t.column("key").to_pylist(), t.column("reason").to_pylist())}
    its = _items_of(batch)
    for it in its:
        if it.status == "planned" and it.key in drops:
            it.status, it.reason, it.paths, it.kind = "skipped", drops[it.key], list(it.all_paths), None
    return _items_table(its)


def _assign_batch(batch: pa.Table, n_shards: dict, done: list[str], slots: int, version: int = 1) -> pa.Table:
    """Planned items only, each with its shard and build slot (shard number across splits mod
    `slots`); items of already completed shards are dropped."""
    import pyarrow.compute as pc

    batch = batch.filter(pc.equal(batch.column("status"), "planned"))
    offset, first = 0, {}
    for split in sorted(n_shards):
        first[split] = offset
        offset += n_shards[split]
    shards, slot = [], []
    for key, split in zip(batch.column("key").to_pylist(), batch.column("split").to_pylist()):
        b = deid.Pseudonymizer.bucket(key, n_shards[split])
        shards.append(shardspec.shard_name(split, b, version))
        slot.append((first[split] + b) % slots)
    batch = batch.append_column("shard", pa.array(shards, pa.string())).append_column("slot", pa.array(slot, pa.int64()))
    if done:
        batch = batch.filter(pc.invert(pc.is_in(batch.column("shard"), pa.array(done, pa.string()))))
    return batch


def _aggregate(items) -> dict:
    """Per-block partial aggregates, summed on the driver: est. bytes per split, planned count,
    and an order-independent hash of every item (the plan digest's body)."""

    def partial(batch: pa.Table) -> pa.Table:
        est: dict[str, int] = {}
        h = 0
        planned = 0
        for row in batch.select(["status", "reason", "key", "split", "est_bytes", "all_paths"]).to_pylist():
            if row["status"] == "planned":
                planned += 1
                est[row["split"]] = est.get(row["split"], 0) + row["est_bytes"]
            d = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).digest()
            h = (h + int.from_bytes(d[:8], "little")) % (1 << 64)
        return pa.table({"part": [json.dumps({"est": est, "hash": h, "planned": planned})]})

    out = {"est_bytes": {}, "hash": 0, "planned": 0}
    for row in items.map_batches(partial, batch_format="pyarrow").take_all():
        p = json.loads(row["part"])
        out["hash"] = (out["hash"] + p["hash"]) % (1 << 64)
        out["planned"] += p["planned"]
        for k, v in p["est"].items():
            out["est_bytes"][k] = out["est_bytes"].get(k, 0) + v
    return out


_TABLE_CACHE: dict[str, Any] = {}


def _build_shards(batch: pa.Table, **kwargs) -> pa.Table:
    """The items of one build slot → every shard among them, in shard-name order."""
    import pyarrow.compute as pc

    out = [pa.table({n: [] for n in OUTCOME_SCHEMA.names}, schema=OUTCOME_SCHEMA)]
    for shard in sorted(set(batch.column("shard").to_pylist())):
        out.append(_build_shard(batch.filter(pc.equal(batch.column("shard"), shard)), **kwargs))
    return pa.concat_tables(out)


def _build_shard(batch: pa.Table, dest: str, progress_url: str, recipe: IngestRecipe, profile: Profile, tables_ref,
                 digest: str) -> pa.Table:
    """Build one shard: samples in key order, tar written locally, uploaded atomically, recorded."""
    clock = StageClock()
    tables = _tables(tables_ref)
    shard = batch.column("shard")[0].as_py()
    items = sorted(_items_of(batch), key=lambda it: it.key)
    clock.lap("items")
    outcomes = []  # one per item, in item order
    details: dict[int, str] = {}  # item index → the figure of its rejection (private ledger)
    modalities: dict[str, int] = {}
    used_files = 0
    with tempfile.TemporaryDirectory(prefix="radforge-shard-") as tmp:
        local = os.path.join(tmp, "shard.tar")
        with open(local, "wb") as fh:
            writer = shardspec.TarWriter(fh)  # refuses a second sample with the same key
            for i, item in enumerate(items):
                try:
                    sample = make_sample(item, recipe, tables, profile=profile, decode=_DECODER.canonical, clock=clock)
                except dicom.Reject as r:
                    outcomes.append(_outcome(shard, item, "rejected", r.reason, 0))
                    if r.detail:
                        details[i] = r.detail
                    continue
                except Exception as e:  # noqa: BLE001 — ledger it; never print header values
                    log.warning("sample in %s failed: %s", shard, type(e).__name__)
                    outcomes.append(_outcome(shard, item, "rejected", "decode_error", 0))
                    continue
                members = sample.members()
                clock.lap("encode")
                writer.write(sample.key, members)
                clock.lap("tar")
                modalities[item.modality] = modalities.get(item.modality, 0) + 1
                used_files += len(item.all_paths)
                outcomes.append(_outcome(shard, item, "used", None, sum(len(v) for v in members.values())))
            writer.close()
        samples = sum(modalities.values())
        size = os.path.getsize(local)
        sha = storage.sha256_file(local)
        clock.lap("sha256")
        if samples:
            storage.put_file_atomic(local, storage.join(dest, shard))
        clock.lap("upload")
    record = {
        "plan_digest": digest,
        "path": shard,
        "split": items[0].split,
        "samples": samples,
        "bytes": size if samples else 0,
        "sha256": sha if samples else None,
        "modalities": modalities,
        "used_files": used_files,
        "rejects": [{"paths": it.all_paths, "reason": o["reason"], "detail": details.get(i)}
                    for i, (it, o) in enumerate(zip(items, outcomes)) if o["status"] == "rejected"],
        "items": len(items),
        "keys": {o["key"]: o["modality"] for o in outcomes if o["status"] == "used"},  # superseding (`--append`)
    }
    # Written after the upload: a record always means a complete, uploaded shard.
    storage.write_bytes_atomic(storage.join(progress_url, shard.replace("/", "__") + ".json"), json.dumps(record).encode())
    clock.lap("record")
    if outcomes:
        outcomes[0]["cpu_s"] = clock.seconds
    return pa.Table.from_pylist(outcomes, schema=OUTCOME_SCHEMA)


def _outcome(shard: str, item: dicom.PlanItem, status: str, reason: str | None, nbytes: int) -> dict:
    return {
        "shard": shard,
        "key": item.key,
        "modality": item.modality,
        "status": status,
        "reason": reason,
        "n_files": len(item.all_paths),
        "bytes": nbytes,
    }


def make_sample(item: dicom.PlanItem, recipe: IngestRecipe, tables: dict | None = None, *,
                profile: Profile | None = None, decode=None, clock: StageClock = NO_CLOCK) -> shardspec.Sample:
    """One planned item → the sample to store. Raises dicom.Reject for unusable inputs.

    The pixels go through `dicom.canonical`, the one DICOM → stored-array path that serving
    (`dicom.canonical_from_files`) uses too. `profile` is `Profile.from_recipe(recipe)`, passed
    in by callers that build many samples. `decode(item, profile, clock)` runs that path
    (default: in this process; the build stage passes `_DECODER.canonical`, a child process).
    `clock` (a `transforms.StageClock`) is charged the CPU seconds of each stage.
    """
    profile = profile or Profile.from_recipe(recipe)
    meta: dict[str, Any] = {
        "schema_version": shardspec.SCHEMA_VERSION,
        "modality": item.modality,
        "patient": item.patient,
        "study": item.study,
        "series": item.series,
        "split": item.split,
        "profile": profile.profile_id,
        "acquisition": deid.safe_metadata(item.safe, recipe.deid),
        "source_shape": item.source_shape,
    }
    if item.sub_series is not None:
        meta["sub_series"] = item.sub_series
    if item.source_spacing_mm is not None:
        meta["source_spacing_mm"] = [round(float(v), 6) for v in item.source_spacing_mm]
    clock.lap("meta")
    array, geometry = (decode or _canonical)(item, profile, clock)
    meta.update(geometry)
    report = None
    if tables:
        report, labels = _lookup(tables, item)
        if labels is not None:
            meta["labels"] = labels
        if report is not None:
            report = deid.redact_report(report, item.phi_terms)
    meta["has_report"] = report is not None
    clock.lap("meta")
    return shardspec.Sample(item.key, array, meta, report)


def _size_of(f) -> int:
    """A listing that could not know the size (-1, DICOMweb): the size of what was read."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    return size


def _canonical(item: dicom.PlanItem, profile: Profile, clock: StageClock = NO_CLOCK):
    from radforge.dicomweb import DicomwebError

    try:
        with storage.read_ahead(item.paths):  # DICOMweb: a series' slices fetched in parallel
            return dicom.canonical(item, storage.read_bytes, profile, clock)
    except DicomwebError as e:  # retries exhausted: this sample, not the task (the message names no UID)
        raise dicom.Reject("fetch_error", str(e)) from None


class _Decoder:
    """Decoding in a child process, so that a decoder that aborts (pylibjpeg-rle aborts the
    process when an allocation fails), crashes or is OOM-killed costs the one sample it was
    decoding (ledgered `decode_error`, with what happened as the detail), not the build task,
    which Ray would otherwise retry with the same input. Budgets are checked before this (plan
    and `dicom._pixels`), so a child dying is the exception, not the defence.

    One child per Ray worker process (spawned on first use, ~1 s, then reused across tasks);
    a dead or timed-out child is replaced on the next sample. Items and arrays cross a pipe.
    """

    def __init__(self, fn=None):
        # fn(item, profile) -> (array, geometry), run in the child; the default, `_canonical`,
        # also reports its CPU seconds per stage.
        self._fn = fn or _canonical
        self._timed = fn is None
        self._proc = None
        self._conn = None

    def canonical(self, item: dicom.PlanItem, profile: Profile, clock: StageClock = NO_CLOCK):
        """`fn(item, profile)` in the child; the child's CPU seconds per stage are added to
        `clock`, and this process's own (pickling, the pipe) as "decoder_ipc"."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        clock.lap("meta")
        self._conn.send((item, profile))
        if not self._conn.poll(DECODE_TIMEOUT_S):
            self._stop()
            raise dicom.Reject("decode_error", f"decoding exceeded {DECODE_TIMEOUT_S:g} s")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            code = self._stop()
            raise dicom.Reject("decode_error", f"decoder process died (exit code {code})") from None
        clock.lap("decoder_ipc")
        if msg[0] == "ok":
            clock.add(msg[3])
            return msg[1], msg[2]
        if msg[0] == "reject":
            raise dicom.Reject(msg[1], msg[2])
        raise RuntimeError(msg[1])  # an error type name only: _build_shard logs and ledgers it

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # not fork: a Ray worker has threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_decoder_main, args=(child, self._fn, self._timed), daemon=True,
                                 name="radforge-decoder")
        self._proc.start()
        child.close()

    def _stop(self):
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        proc.kill()
        proc.join(10)
        self._conn.close()
        return proc.exitcode


def _decoder_main(conn, fn, timed: bool = False) -> None:
    """The child's loop: (item, profile) in, ("ok", array, geometry, CPU seconds per stage) |
    ("reject", reason, detail) | ("error", exception type name) out; ends when the parent goes."""
    _keep_heap()
    while True:
        try:
            item, profile = conn.recv()
        except (EOFError, OSError):
            return
        try:
            clock = StageClock()
            out = fn(item, profile, clock) if timed else fn(item, profile)
            conn.send(("ok", *out, clock.seconds))
        except dicom.Reject as r:
            conn.send(("reject", r.reason, r.detail))
        except Exception as e:  # noqa: BLE001 — the type name only: messages may quote header values
            conn.send(("error", type(e).__name__))


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_MMAP_BYTES, _HEAP_TRIM_BYTES = 32 << 20, 256 << 20


def _keep_heap() -> None:
    """Keep freed slice-sized buffers in this process's heap (glibc malloc; elsewhere a no-op).
    By default glibc maps every allocation ≥ 128 KiB afresh and returns it on free, and a process
    that never freed a larger one keeps that threshold: each decoded 512² slice then faulted in
    ~290 new pages, ~1 ms of kernel time per slice in a fresh process (about a third of its
    decode). Buffers up to 32 MiB now come from the heap, which is trimmed only above 256 MiB
    free (a child's peak is the volume it builds, within the plan's budget, either way)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, _HEAP_MMAP_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM_BYTES)


_DECODER = _Decoder()
_DIGESTER = _Decoder(_pixel_digest_of)  # planning's duplicate-instance comparison (`_copy_digest`)


def _load_progress(progress_url: str, digest: str) -> dict[str, dict]:
    """Completion records of this plan (records of another plan are ignored, not trusted), per
    shard and without their per-sample parts (`keys`, the rejected files: `rejected` holds files
    per reason instead), so the driver holds O(shards); `_records` streams the whole records."""
    out = {}
    for rec in _records(progress_url, digest):
        rejected: dict[str, int] = {}
        for rej in rec.pop("rejects"):
            rejected[rej["reason"]] = rejected.get(rej["reason"], 0) + len(rej["paths"])
        rec.pop("keys", None)
        out[rec["path"]] = {**rec, "rejected": rejected}
    return out


def _records(progress_url: str, digest: str):
    """The completion records of plan `digest`, whole, one at a time."""
    if not storage.exists(progress_url):
        return
    for url, _ in storage.find_files(progress_url):
        if not url.endswith(".json"):
            continue
        try:
            rec = json.loads(storage.read_bytes(url))
        except (ValueError, FileNotFoundError):
            continue
        if rec.get("plan_digest") == digest:
            yield rec


def _accounting(items, progress_url: str, digest: str, seen: int, private: str) -> dict:
    """seen = used + skipped + rejected, by file; writes the private rejects ledger (JSONL).

    Dispositions are exploded to one ledger line per file inside Ray tasks, which write each
    block's lines to a part file named by its content (`_ledger_part`) and return only counts
    per status and reason: no line crosses the driver's object store. The driver concatenates
    the parts in name order (so the ledger's order follows its lines, not task completion) and
    appends the build's rejects from the completion records, read one at a time.
    """
    import shutil

    counts = {"rejected": {}, "skipped": {}}

    def add(status: str, reason: str, n: int) -> None:
        counts[status][reason] = counts[status].get(reason, 0) + n

    parts_url = storage.join(private, "ledger-parts")
    storage.remove(parts_url, recursive=True)  # a killed run's parts (a missing one is no error)
    storage.makedirs(parts_url)
    parts: set[str] = set()
    written = items.map_batches(_ledger_part, batch_format="pyarrow", fn_kwargs={"parts_url": parts_url})
    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            add(row["status"], row["reason"], row["n"])
            parts.add(row["part"])
    with tempfile.TemporaryDirectory(prefix="radforge-ledger-") as tmp:
        local = os.path.join(tmp, "rejects.jsonl")
        with open(local, "wb") as out:
            for url in sorted(parts):
                with storage.open_input(url) as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            used = 0
            for rec in _records(progress_url, digest):
                used += rec["used_files"]
                for rej in rec["rejects"]:
                    add("rejected", rej["reason"], len(rej["paths"]))
                    out.write("".join(json.dumps(_ledger_line({"path": p, "status": "rejected", "reason": rej["reason"],
                                                               "detail": rej.get("detail")})) + "\n" for p in rej["paths"]).encode())
        storage.put_file_atomic(local, storage.join(private, "rejects.jsonl"))
    storage.remove(parts_url, recursive=True)
    return {
        "seen": seen,
        "used": used,
        "skipped": dict(sorted(counts["skipped"].items())),
        "rejected": dict(sorted(counts["rejected"].items())),
    }


def _ledger_line(r: dict) -> dict:
    """A rejects-ledger line: path, status, reason, and the figure (`detail`) when there is one."""
    return {k: v for k, v in r.items() if k != "detail" or v is not None}


def _ledger_lines(batch: pa.Table) -> pa.Table:
    """The skipped and rejected items of a block → one ledger line per file (JSON text of
    `_ledger_line`), with its status and reason for the counts."""
    import pyarrow.compute as pc

    batch = batch.filter(pc.is_in(batch.column("status"), pa.array(["rejected", "skipped"])))
    paths = batch.column("all_paths").combine_chunks()
    parent = pc.list_parent_indices(paths)
    rows = pa.table({"path": pc.list_flatten(paths), "status": pc.take(batch.column("status"), parent),
                     "reason": pc.take(batch.column("reason"), parent), "detail": pc.take(batch.column("detail"), parent)})
    text = [json.dumps(_ledger_line(r)) for r in rows.to_pylist()]
    return pa.table({"status": rows.column("status"), "reason": rows.column("reason"), "line": pa.array(text, pa.string())})


_LEDGER_COUNTS = pa.schema([("status", pa.string()), ("reason", pa.string()), ("n", pa.int64()), ("part", pa.string())])


def _ledger_part(batch: pa.Table, parts_url: str) -> pa.Table:
    """A block's ledger lines (`_ledger_lines`) → one part file under `parts_url`, named by the
    sha256 of its bytes (a retried task writes the same file) → (status, reason, n, part)."""
    lines = _ledger_lines(batch)
    if lines.num_rows == 0:
        return _LEDGER_COUNTS.empty_table()
    body = ("\n".join(lines.column("line").to_pylist()) + "\n").encode()
    url = storage.join(parts_url, hashlib.sha256(body).hexdigest()[:32] + ".jsonl")
    storage.write_bytes_atomic(url, body)
    n = lines.group_by(["status", "reason"]).aggregate([("line", "count")])
    return pa.table({"status": n.column("status"), "reason": n.column("reason"), "n": n.column("line_count").cast(pa.int64()),
                     "part": pa.array([url] * n.num_rows, pa.string())}, schema=_LEDGER_COUNTS)


def _bar(enabled: bool, total: int | None, unit: str, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, mininterval=0.5)


# ---------------------------------------------------------------------------------------------
# Reports and labels
# ---------------------------------------------------------------------------------------------


@dataclass
class _TablesSpec:
    """The report and label tables of a run. Each is read once (`read`, when `load` validates
    it): the lookups and the digest of the bytes are kept, so the plan digest and the build do
    not read and parse the tables again."""

    reports: str | None
    reports_cfg: config.TableConfig
    labels: str | None
    labels_cfg: config.TableConfig
    _lookups: dict | None = field(default=None, repr=False, compare=False)
    _digests: dict = field(default_factory=dict, repr=False, compare=False)  # url → sha256 of its bytes

    @classmethod
    def load(cls, reports, reports_cfg, labels, labels_cfg):
        if not reports and not labels:
            return None
        spec = cls(reports, reports_cfg, labels, labels_cfg)
        spec.read()  # validate now: a missing column is a configuration error, before any work
        return spec

    def digest(self) -> str:
        self.read()
        parts = [self._digests[url] if url else "" for url in (self.reports, self.labels)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def _table(self, url: str, key_column: str) -> pa.Table:
        data = _table_bytes(url)
        self._digests[url] = hashlib.sha256(data).hexdigest()
        return _parse_table(url, data, key_column)

    def read(self) -> dict:
        """The tables as lookups: {"reports": {"join_on", "map": key → text}, "labels": {"join_on",
        "findings", "map": key → {finding: label}}}, each present when its table was given."""
        if self._lookups is None:
            self._lookups = self._read()
        return self._lookups

    def _read(self) -> dict:
        out: dict[str, Any] = {}
        if self.reports:
            cfg = self.reports_cfg
            t = self._table(self.reports, cfg.key_column)
            key, join_on = _table_key("reports", self.reports, t, cfg)
            t, keys = _keyed_table("reports", self.reports, key, [cfg.text_column], t)
            texts = t.column(cfg.text_column).to_pylist()
            out["reports"] = {"join_on": join_on, "map": {k: v for k, v in zip(keys, texts) if k and v}}
        if self.labels:
            cfg = self.labels_cfg
            t = self._table(self.labels, cfg.key_column)
            key, join_on = _table_key("labels", self.labels, t, cfg)
            findings = cfg.findings or [c for c in t.column_names if c != key and c not in (
                "StudyInstanceUID", "AccessionNumber", "PatientID", "report")]
            t, keys = _keyed_table("labels", self.labels, key, findings, t)
            cols = {f: t.column(f).to_pylist() for f in findings}
            mapping = {k: {f: _label(cols[f][i]) for f in findings} for i, k in enumerate(keys) if k}
            out["labels"] = {"join_on": join_on, "findings": findings, "map": mapping}
        return out


KEY_COLUMNS = ("AccessionNumber", "StudyInstanceUID")  # table columns named after a join attribute


def _table_key(what: str, url: str, t: pa.Table, cfg: config.TableConfig) -> tuple[str, str]:
    """(key column, join attribute): the configured `key_column` when the table has it; else the
    table's one column named after a join attribute (AccessionNumber or StudyInstanceUID), joined
    on that attribute, so no `--set` is needed; none or both: the missing-column error."""
    if cfg.key_column in t.column_names:
        return cfg.key_column, cfg.join_on
    known = [c for c in KEY_COLUMNS if c in t.column_names]
    if len(known) == 1:
        return known[0], known[0]
    raise ConfigError(f"{what} table {url} has no column {cfg.key_column!r} (columns: {', '.join(t.column_names)})")


def _keyed_table(what: str, url: str, key_column: str, columns: list[str], t: pa.Table | None = None):
    """(table, its keys as strings, "" for a blank) after checking it has the key and `columns`."""
    t = t if t is not None else _read_table(url, key_column)
    for col in (key_column, *columns):
        if col not in t.column_names:
            raise ConfigError(f"{what} table {url} has no column {col!r} (columns: {', '.join(t.column_names)})")
    return t, [str(k) if k is not None else "" for k in t.column(key_column).to_pylist()]


def _label(v) -> int | None:
    """CheXpert convention: 1 positive, 0 negative, -1 uncertain, blank missing (None)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(f):
        return None
    return int(f) if f in (1.0, 0.0, -1.0) else None


def _read_table(url: str, key_column: str) -> pa.Table:
    return _parse_table(url, _table_bytes(url), key_column)


def _table_bytes(url: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise ConfigError(f"table not found: {url}") from None


def _parse_table(url: str, data: bytes, key_column: str) -> pa.Table:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    buf = pa.BufferReader(data)
    try:
        if url.endswith(".parquet"):
            return pq.read_table(buf)
        if url.endswith((".jsonl", ".json", ".ndjson")):
            return pjson.read_json(buf)
        # Keys stay strings (accession numbers with leading zeros); label cells parse later.
        return pcsv.read_csv(buf, convert_options=pcsv.ConvertOptions(strings_can_be_null=True, column_types={c: pa.string() for c in (key_column, *KEY_COLUMNS)}))
    except pa.ArrowInvalid as e:
        raise ConfigError(f"cannot read table {url}: {str(e).splitlines()[0]}") from None


def _tables(ref) -> dict | None:
    if ref is None:
        return None
    import ray

    key = ref.hex()
    if key not in _TABLE_CACHE:
        _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = ray.get(ref)
    return _TABLE_CACHE[key]


def _lookup(tables: dict, item: dicom.PlanItem) -> tuple[str | None, dict | None]:
    report = labels = None
    if "reports" in tables:
        report = tables["reports"]["map"].get(item.join_key(tables["reports"]["join_on"]))
    if "labels" in tables:
        labels = tables["labels"]["map"].get(item.join_key(tables["labels"]["join_on"]))
    return report, labels
