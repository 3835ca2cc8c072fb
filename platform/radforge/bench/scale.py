"""`radforge bench scale`: the driver-side cost of ingest's plan, assign and manifest stages as the
number of files grows, on synthetic index rows (headers only, no pixels), and the listing stage
on an S3 bucket.

  sizes     10k, 100k and 1M index rows (10M with `max_rows=10_000_000`), each through the real
            `ingest._plan` (groupby series → `dicom.plan_group`, `_select_per_study`,
            `_aggregate`), `ingest._assign`, a completion record per shard as the build stage
            writes it (samples counted, no pixels) and `ingest._write_manifest` (`_accounting`:
            the private ledger, `selection.json`, the manifest), on one local Ray
  listing   `ingest._list` over a moto S3 bucket (127.0.0.1) holding `list_keys` keys

Reported per size: driver peak RSS and heap, overall and per stage (this process; it should hold
counts and per-shard records, never rows), worker peak PSS (the largest single Ray worker) and seconds per row (wall, and CPU
of the whole process tree, which other load on the machine does not change); ratios of the 1M
figures to the 100k ones. Targets: driver RSS grows ≤ 10 % from 100k to 1M rows, seconds per row
at 1M ≤ 1.2 × that at 100k.

The synthetic archive (`synthetic_rows`): per patient either a CT study (one series of 100-300
axial 512² slices, or two reconstructions of one acquisition, 1 mm and 5 mm, of which
`series.per_study=thinnest` keeps one; 5 % of series carry a localizer slice, skipped) or an
X-ray study (one or two DX/CR radiographs); 1 % of series lost a slice (rejected: slice_gap), 2 %
of patients have an unreadable file beside their images. Rows are generated part
by part inside Ray tasks and written as parquet parts of the private index schema
(`dicom.INDEX_SCHEMA`), so the generator never holds the corpus in the driver.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

from radforge.bench._common import _rss_pss, _Sampler, _tree_cpu_s, _workdir

SIZES = (10_000, 100_000, 1_000_000)
PART_ROWS = 250_000  # rows per generated index part (ingest.INDEX_PART_ROWS: what a scan writes)
_CHUNK = 25_000  # rows generated at a time inside a part's task
_UID = "1.2.826.0.1.3680043.8.498."
_CT_SAFE = {"Manufacturer": "Radforge Phantom Systems", "ManufacturerModelName": "PhantomCT 64", "KVP": 120.0,
            "ConvolutionKernel": "STANDARD", "BodyPartExamined": "CHEST", "PhotometricInterpretation": "MONOCHROME2",
            "BitsStored": 12}
_XR_SAFE = {"Manufacturer": "Radforge Phantom Systems", "ManufacturerModelName": "PhantomDX 1", "KVP": 110.0,
            "BodyPartExamined": "CHEST", "ViewPosition": "PA", "PhotometricInterpretation": "MONOCHROME2", "BitsStored": 12}
_SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}


# ---------------------------------------------------------------------------------------------
# Synthetic index rows
# ---------------------------------------------------------------------------------------------


def synthetic_rows(part: int, n_rows: int, root: str = "/archive", seed: int = 0) -> pa.Table:
    """Index part `part`: exactly `n_rows` rows (the last series may be cut short) of patients
    numbered within the part, as `dicom.scan` would have written them (INDEX_SCHEMA, `safe` and
    `attrs` as JSON). Deterministic in (part, n_rows, root, seed)."""
    from radforge import dicom

    cols: dict[str, list] = {n: [] for n in dicom.INDEX_SCHEMA.names}
    rng = random.Random(f"{seed}:{part}")
    patient = 0
    while len(cols["path"]) < n_rows:
        _patient_rows(cols, rng, f"{root}/p{part:05d}-{patient:06d}", f"{part}.{patient}", n_rows - len(cols["path"]))
        patient += 1
    return pa.table(cols, schema=dicom.INDEX_SCHEMA)


def _patient_rows(cols: dict, rng: random.Random, folder: str, pid: str, room: int) -> None:
    from radforge.phantoms import PHI_MARKER

    ident = {"patient_id": f"{PHI_MARKER}ID{pid}", "accession": f"{PHI_MARKER}ACC{pid}", "study_uid": f"{_UID}1.{pid}",
             "phi_terms": [f"{PHI_MARKER}FAMILY{pid}^{PHI_MARKER}GIVEN", f"{PHI_MARKER}ID{pid}", f"{PHI_MARKER}ACC{pid}"]}
    age = {"PatientAge": f"{rng.randint(18, 95):03d}Y", "PatientSex": rng.choice("FM")}
    if room > 1 and rng.random() < 0.02:  # a file that is not DICOM (notes, a broken copy)
        _unreadable(cols, f"{folder}/notes.txt")
        room -= 1
    if rng.random() < 0.6:
        n = rng.randint(100, 300)
        recons = [(2.5, n)] if rng.random() < 0.7 else [(1.0, n), (5.0, max(20, n // 5))]
        for s, (thick, slices) in enumerate(recons):
            room -= _ct_series(cols, rng, f"{folder}/s{s}", f"{pid}.{s}", ident, age, thick, min(slices, room))
            if room <= 0:
                return
    else:
        for i in range(min(room, rng.randint(1, 2))):
            _xray(cols, rng, f"{folder}/x{i}.dcm", f"{pid}.{i}", ident, age)


def _ct_series(cols: dict, rng: random.Random, folder: str, uid: str, ident: dict, age: dict, thick: float, n: int) -> int:
    """One axial series of `n` files (the first a localizer in 5 % of series) → rows added."""
    from radforge.phantoms import PHI_MARKER

    series_uid = f"{_UID}2.{uid}"
    safe = json.dumps({**_CT_SAFE, "SliceThickness": thick, **age}, sort_keys=True)
    localizer = n > 2 and rng.random() < 0.05
    x0, y0, z0 = -180.0 + rng.random(), -200.0 + rng.random(), -300.0 + 10 * rng.random()
    gap = rng.randrange(1, n - 1) if n > 3 and rng.random() < 0.01 else None  # a lost slice: rejected, slice_gap
    for k in range(n):
        if k == gap:
            continue
        image_type = "ORIGINAL\\PRIMARY\\LOCALIZER" if localizer and k == 0 else "ORIGINAL\\PRIMARY\\AXIAL"
        attrs = json.dumps({"SeriesDescription": f"{PHI_MARKER} chest {thick:g}mm", "AcquisitionNumber": "1",
                            "ImageType": image_type}, sort_keys=True)
        _row(cols, path=f"{folder}/{k:04d}.dcm", size=525_000 + rng.randint(0, 2000), group_key=f"ct:{series_uid}",
             modality="CT", sop_uid=f"{_UID}3.{uid}.{k}", series_uid=series_uid, rows=512, cols_=512,
             pixel_bytes=512 * 512 * 2, pixel_spacing=[0.7, 0.7], iop=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
             positions=[[x0, y0, z0 + k * thick]], safe=safe, attrs=attrs, image_type=image_type, **ident)
    return n - (gap is not None)


def _xray(cols: dict, rng: random.Random, path: str, uid: str, ident: dict, age: dict) -> None:
    from radforge.phantoms import PHI_MARKER

    modality = rng.choice(("DX", "CR"))
    h, w = rng.choice(((3000, 2500), (2800, 2300), (2048, 2048)))
    attrs = json.dumps({"PresentationIntentType": "FOR PRESENTATION", "PatientOrientation": "L\\F",
                        "SeriesDescription": f"{PHI_MARKER} {modality} chest PA", "ImageType": "ORIGINAL\\PRIMARY"},
                       sort_keys=True)
    sop = f"{_UID}4.{uid}"
    _row(cols, path=path, size=h * w * 2 + 4000, group_key=f"xr:{sop}", modality=modality, sop_uid=sop,
         series_uid=f"{_UID}5.{uid}", rows=h, cols_=w, pixel_bytes=h * w * 2, pixel_spacing=[0.15, 0.15], iop=None,
         positions=None, safe=json.dumps({**_XR_SAFE, **age}, sort_keys=True), attrs=attrs,
         image_type="ORIGINAL\\PRIMARY", **ident)


def _row(cols: dict, cols_: int, **v) -> None:
    """One readable file's row (`cols_`: the image's columns; `cols`: the table being filled)."""
    v.update(cols=cols_, status="ok", reason=None, sop_class_uid=_SOP[v["modality"]], transfer_syntax="1.2.840.10008.1.2.5", n_frames=1)
    for name, values in cols.items():
        values.append(v.get(name))


def _unreadable(cols: dict, path: str) -> None:
    for name, values in cols.items():
        values.append({"path": path, "size": 1024, "status": "rejected", "reason": "unreadable_header"}.get(name))


def write_index(n_rows: int, index_url: str, *, seed: int = 0, root: str = "/archive") -> list[str]:
    """The synthetic private index of `n_rows` rows as parquet parts of PART_ROWS rows under
    `index_url`, each generated and written by its own Ray task → the part URLs."""
    import ray

    from radforge import storage

    @ray.remote(num_cpus=1)
    def part(i: int, n: int) -> str:
        import tempfile

        import pyarrow.parquet as pq

        url = storage.join(index_url, f"index-{i:05d}.parquet")
        with tempfile.TemporaryDirectory(prefix="radforge-scale-") as tmp:
            local = os.path.join(tmp, "part.parquet")
            with pq.ParquetWriter(local, synthetic_rows(0, 0).schema) as w:
                for lo in range(0, n, _CHUNK):  # chunks of patients: the task holds one chunk's rows
                    w.write_table(synthetic_rows(i * 1000 + lo // _CHUNK, min(_CHUNK, n - lo), root, seed))
            storage.put_file_atomic(local, url)
        return url

    storage.makedirs(index_url)
    counts = [min(PART_ROWS, n_rows - s) for s in range(0, n_rows, PART_ROWS)]
    return ray.get([part.remote(i, n) for i, n in enumerate(counts)])


# ---------------------------------------------------------------------------------------------
# The pipeline at one size
# ---------------------------------------------------------------------------------------------


def _record_shards(batch: pa.Table, progress_url: str, digest: str) -> pa.Table:
    """The build stage without pixels: the items of one build slot → a completion record per
    shard (the fields `ingest._build_shard` writes; every item used, est. bytes as its size)."""
    import hashlib

    import pyarrow.compute as pc

    from radforge import storage

    out = {"shard": [], "items": []}
    for shard in sorted(set(batch.column("shard").to_pylist())):
        part = batch.filter(pc.equal(batch.column("shard"), shard))
        keys = dict(zip(part.column("key").to_pylist(), part.column("modality").to_pylist()))
        modalities: dict[str, int] = {}
        for m in keys.values():
            modalities[m] = modalities.get(m, 0) + 1
        record = {"plan_digest": digest, "path": shard, "split": part.column("split")[0].as_py(), "samples": part.num_rows,
                  "bytes": int(pc.sum(part.column("est_bytes")).as_py()), "sha256": hashlib.sha256(shard.encode()).hexdigest(),
                  "modalities": modalities, "used_files": int(pc.sum(part.column("n_files")).as_py()), "rejects": [],
                  "items": part.num_rows, "keys": keys}
        storage.write_bytes_atomic(storage.join(progress_url, shard.replace("/", "__") + ".json"), json.dumps(record).encode())
        out["shard"].append(shard)
        out["items"].append(part.num_rows)
    return pa.table(out, schema=pa.schema([("shard", pa.string()), ("items", pa.int64())]))


def run_size(n_rows: int, root: str, recipe=None, *, seed: int = 0, mark=None, inspect=None) -> dict:
    """Synthetic index of `n_rows` rows (`generate`) → `pipeline` (needs a running Ray)."""
    t = time.perf_counter()
    paths = generate(n_rows, root, seed=seed)
    gen_s = time.perf_counter() - t
    return {**pipeline(n_rows, paths, recipe, mark=mark, inspect=inspect), "gen_s": round(gen_s, 2)}


def generate(n_rows: int, root: str, *, seed: int = 0) -> dict:
    """A fresh DEST and private location under `root`, the synthetic index in the private one →
    {"dest", "private", "parts"}."""
    from radforge import storage

    dest, private = os.path.join(root, "shards"), os.path.join(root, "shards.private")
    for d in (dest, private):
        shutil.rmtree(d, ignore_errors=True)
    storage.makedirs(dest)
    parts = write_index(n_rows, storage.join(private, "index"), seed=seed, root=os.path.join(root, "archive"))
    return {"dest": dest, "private": private, "parts": parts}


def pipeline(n_rows: int, paths: dict, recipe=None, *, mark=None, inspect=None) -> dict:
    """The index parts → plan, assign, a completion record per shard, manifest (the real ingest
    functions) → counts and the manifest's input accounting. `mark(stage)` is called after each
    stage (the benchmark's per-stage memory); `inspect(plan)` after the manifest (tests)."""
    import ray

    from radforge import config, deid, ingest, storage
    from radforge.config import IngestRecipe

    recipe = recipe or config.load(IngestRecipe, None, ["deid.demo_key=true", "series.per_study=thinnest"])
    secret = deid.load_secret(recipe.deid)
    mark = mark or (lambda stage: None)
    stage: dict[str, float] = {}
    with ingest._data_context():
        t = time.perf_counter()
        index = ray.data.from_items([{"part": u} for u in paths["parts"]], override_num_blocks=len(paths["parts"])).map_batches(
            ingest._read_index_parts, batch_size=1, batch_format="pyarrow")
        plan = ingest._plan(index, recipe, secret, None)
        stage["plan"] = time.perf_counter() - t
        mark("plan")
        t = time.perf_counter()
        progress_url = storage.join(paths["private"], "progress")
        recorded = ingest._assign(plan, ingest._load_progress(progress_url, plan.digest)).map_batches(
            _record_shards, batch_size=None, batch_format="pyarrow", fn_kwargs={"progress_url": progress_url, "digest": plan.digest})
        shards = items = 0
        for b in recorded.iter_batches(batch_format="pyarrow", batch_size=None):
            shards += b.num_rows
            items += int(pa.compute.sum(b.column("items")).as_py() or 0)
        stage["assign"] = time.perf_counter() - t
        mark("assign")
        t = time.perf_counter()
        m = ingest._write_manifest(plan, recipe, secret, n_rows, paths["dest"], paths["private"], progress_url)
        stage["manifest"] = time.perf_counter() - t
        mark("manifest")
        if inspect is not None:
            inspect(plan)
    return {"rows": n_rows, "stage_s": {k: round(v, 2) for k, v in stage.items()}, "planned": plan.planned,
            "assigned": items, "shards": shards, "inputs": m["inputs"], "samples": m["totals"]["samples"]}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


class _Peaks(_Sampler):
    """Peaks, sampled every 0.2 s: this process's RSS (the driver) and its heap (anonymous
    memory: Python objects and Arrow buffers it owns; RSS also counts object-store pages it has
    read, which are shared memory), and the largest PSS of any one of its Ray worker processes.
    `mark(stage)` records the driver's peaks since the previous mark."""

    def __init__(self):
        super().__init__()
        self.driver = self.heap = self.worker = 0
        self.stages: dict[str, dict] = {}
        self._since = (0, 0)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        rss, heap = _rss_anon(me.pid)
        self.driver, self.heap = max(self.driver, rss), max(self.heap, heap)
        self._since = (max(self._since[0], rss), max(self._since[1], heap))
        for p in me.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if "ray::" in cmd or "default_worker.py" in cmd:
                    self.worker = max(self.worker, _rss_pss(p)[1])
            except (psutil.Error, OSError):
                continue

    def mark(self, stage: str) -> None:
        self.sample()
        self.stages[stage] = {"driver_rss_mb": _mb(self._since[0]), "driver_heap_mb": _mb(self._since[1])}
        self._since = (0, 0)


def _rss_anon(pid: int) -> tuple[int, int]:
    """(RSS, anonymous) bytes of process `pid` from smaps_rollup (RSS twice without it)."""
    vals = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Anonymous"):
                    vals[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "Rss" not in vals:
        import psutil

        vals["Rss"] = psutil.Process(pid).memory_info().rss
    return vals["Rss"], vals.get("Anonymous", vals["Rss"])


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


def _measured(fn):
    """fn(mark) with the driver's and the workers' peak memory (per stage too), wall and
    process-tree CPU seconds."""
    import gc

    gc.collect()
    cpu0, t = _tree_cpu_s(), time.perf_counter()
    with _Peaks() as peaks:
        out = fn(peaks.mark)
    return out, {"driver_rss_mb": _mb(peaks.driver), "driver_heap_mb": _mb(peaks.heap), "worker_pss_mb": _mb(peaks.worker),
                 "driver_by_stage": peaks.stages, "wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(_tree_cpu_s(cpu0), 2)}


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def bench_scale(*, workdir: str | None = None, max_rows: int = 1_000_000, list_keys: int = 100_000, cpus: int = 2) -> dict:
    """Every size in SIZES up to `max_rows` (and `max_rows` itself), smallest first, on one local
    Ray of `cpus` CPUs started here; then the listing of `list_keys` keys on moto S3."""
    import logging

    import ray

    sizes = sorted({*(s for s in SIZES if s <= max_rows), max_rows})
    loadavg = [round(os.getloadavg()[0], 2)]
    out: dict = {"benchmark": "scale", "cpus": cpus, "sizes": {}}
    # The S3 endpoint first: the local Ray's workers inherit its environment when they start.
    with _workdir(workdir) as root, archive_bucket(list_keys) as archive:
        ray.init(num_cpus=cpus, logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
        try:
            for n in sizes:
                t = time.perf_counter()
                paths = generate(n, os.path.join(root, "scale"))  # not measured: the generator is not the pipeline
                gen_s = round(time.perf_counter() - t, 2)
                r, m = _measured(lambda mark: pipeline(n, paths, mark=mark))
                if not _reconciles(r):
                    raise RuntimeError(f"scale run at {n} rows does not reconcile: {r}")
                out["sizes"][_label(n)] = {**r, **m, "gen_s": gen_s, "s_per_row": m["wall_s"] / n, "cpu_s_per_row": m["cpu_s"] / n}
                loadavg.append(round(os.getloadavg()[0], 2))
            if list_keys:
                out["listing"] = bench_listing(archive, list_keys)
                loadavg.append(round(os.getloadavg()[0], 2))
        finally:
            ray.shutdown()
    out["loadavg_1min"] = loadavg
    out.update(_ratios(out["sizes"]))
    return out


def _reconciles(r: dict) -> bool:
    """planned + dispositions = rows, and every planned item assigned and recorded."""
    from radforge import shardspec

    i = r["inputs"]
    return i["seen"] == r["rows"] and shardspec.reconciles(i) and r["assigned"] == r["planned"] == r["samples"]


def _ratios(sizes: dict) -> dict:
    out = {}
    for big in ("1M", "10M"):
        if big in sizes and "100k" in sizes:
            a, b = sizes[big], sizes["100k"]
            out[f"driver_rss {big} / 100k"] = round(a["driver_rss_mb"] / b["driver_rss_mb"], 3)
            out[f"driver_heap {big} / 100k"] = round(a["driver_heap_mb"] / b["driver_heap_mb"], 3)
            out[f"s_per_row {big} / 100k"] = round(a["s_per_row"] / b["s_per_row"], 3)
            out[f"cpu_s_per_row {big} / 100k"] = round(a["cpu_s_per_row"] / b["cpu_s_per_row"], 3)
    return out


# ---------------------------------------------------------------------------------------------
# Listing on S3
# ---------------------------------------------------------------------------------------------

FILES_PER_SERIES = 200  # the listing's tree: patient / study / series / file, as archives store it

# moto's S3 server in a child process (as `_common._moto_s3`), its bucket filled in bulk through
# moto's own backend before it serves: 100k PUTs over HTTP run at ~200/s on this machine.
_MOTO_FILLED = """
import logging, sys
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
n, per = int(sys.argv[1]), int(sys.argv[2])
s3 = s3_backends["123456789012"]["global"]
s3.create_bucket("bench", "us-east-1")
for i in range(n):
    series, k = divmod(i, per)
    s3.put_object("bench", f"archive/p{series // 2:06d}/study/s{series % 2}/{k:04d}.dcm", b"DICM")
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


@contextmanager
def archive_bucket(n_keys: int) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 whose bucket holds `n_keys` tiny objects in an archive's
    layout (patient / study / series / slice, two series of FILES_PER_SERIES per patient), with
    the standard AWS env pointing at it (restored after) → the archive's URL."""
    from radforge.bench._common import s3_child

    with s3_child(["-c", _MOTO_FILLED, str(n_keys), str(FILES_PER_SERIES)], key="bench"):
        yield "s3://bench/archive"


def bench_listing(source: str, n_keys: int) -> dict:
    """`ingest._list` over the `n_keys` keys of `archive_bucket` (fanned out over the patients'
    folders, rows counted on the driver as they stream) → keys/s, driver RSS, worker PSS. Needs
    a running Ray started inside the S3 endpoint's environment."""
    from radforge import ingest

    def listed() -> int:
        with ingest._data_context():
            return sum(b.num_rows for b in ingest._list(source).iter_batches(batch_format="pyarrow", batch_size=None))

    n, m = _measured(lambda mark: listed())
    if n != n_keys:
        raise RuntimeError(f"listing found {n} of {n_keys} keys")
    return {"keys": n, **m, "keys_per_s": round(n / m["wall_s"]), "keys_per_cpu_s": round(n / m["cpu_s"])}


def format_scale(r: dict) -> str:
    lines = [f"radforge bench scale: plan + assign + manifest on synthetic index rows, local Ray of {r['cpus']} CPUs"
             f" (load avg 1 min: {', '.join(map(str, r['loadavg_1min']))})",
             f"  {'rows':>6}  {'items':>8}  {'shards':>6}  {'driver RSS':>10}  {'heap':>7}  {'worker PSS':>10}  {'µs/row':>7}"
             f"  {'CPU µs/row':>10}  plan / assign / manifest s"]
    for label, s in r["sizes"].items():
        st = s["stage_s"]
        lines.append(f"  {label:>6}  {s['planned']:>8}  {s['shards']:>6}  {s['driver_rss_mb']:>7.0f} MB  {s['driver_heap_mb']:>4.0f} MB"
                     f"  {s['worker_pss_mb']:>7.0f} MB  {s['s_per_row'] * 1e6:>7.1f}  {s['cpu_s_per_row'] * 1e6:>10.1f}"
                     f"  {st['plan']} / {st['assign']} / {st['manifest']}")
    for big in ("1M", "10M"):
        if f"driver_rss {big} / 100k" in r:
            rss, spr = r[f"driver_rss {big} / 100k"], r[f"s_per_row {big} / 100k"]
            lines.append(f"  driver RSS {big} / 100k: {rss:.3f} (target ≤ 1.10: {'met' if rss <= 1.10 else 'NOT met'}), heap"
                         f" {r[f'driver_heap {big} / 100k']:.3f}; s/row {big} / 100k: {spr:.3f} (target ≤ 1.2:"
                         f" {'met' if spr <= 1.2 else 'NOT met'}), CPU s/row {r[f'cpu_s_per_row {big} / 100k']:.3f}")
    if "listing" in r:
        li = r["listing"]
        lines.append(f"  listing {li['keys']} S3 keys (moto, 127.0.0.1): {li['keys_per_s']} keys/s ({li['keys_per_cpu_s']} per CPU s),"
                     f" driver RSS {li['driver_rss_mb']:.0f} MB, worker PSS {li['worker_pss_mb']:.0f} MB")
    return "\n".join(lines)
