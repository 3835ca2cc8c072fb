"""End-to-end ingest on a real local Ray cluster over a generated + package-shipped DICOM corpus."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from radforge import config, deid, ingest, phantoms, shardspec, storage
from radforge.config import IngestRecipe

SECRET = "module-secret-" + "k" * 40
REPO = Path(__file__).resolve().parents[1]
# Phantom geometry (see phantoms.ct_series defaults): no resampling, so volumes compare exactly.
NATIVE_SPACING = "ct.spacing_mm=[2.5,0.8,0.8]"


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "platform") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return phantoms.build_corpus(tmp_path_factory.mktemp("corpus"), n_patients=3)


@pytest.fixture(scope="module")
def run1(corpus, ray_cluster, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("out") / "shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADFORGE_DEID_SECRET", SECRET)
        recipe = config.load(IngestRecipe, None, [NATIVE_SPACING, "shards.target_mb=0.05"])
        result = ingest.run(corpus.dicom_dir, dest, recipe, reports=corpus.reports_csv, labels=corpus.labels_csv, progress=False)
    return result


def _samples(result):
    out = []
    for raw in shardspec.iter_samples(result.dest, result.manifest):
        arr, meta, report = shardspec.decode_sample({k: v for k, v in raw.items() if not k.startswith("__")})
        out.append((raw["__key__"], arr, meta, report))
    return out


def test_accounting_matches_the_corpus(run1, corpus):
    exp = corpus.expected
    inp = run1.manifest["inputs"]
    assert inp["seen"] == exp["files"]
    assert inp["rejected"] == exp["rejected"]
    assert inp["skipped"] == exp["skipped"]
    assert inp["used"] == exp["ct_files"] + exp["xray_images"]
    assert shardspec.reconciles(inp)
    mods = run1.manifest["totals"]["by_modality"]
    assert mods["CT"] == exp["ct_volumes"]
    assert sum(v for k, v in mods.items() if k != "CT") == exp["xray_images"]


def test_rejects_ledger_has_every_rejected_file_with_its_reason(run1, corpus):
    lines = storage.read_bytes(storage.join(run1.private, "rejects.jsonl")).decode().splitlines()
    ledger = {r["path"]: r["reason"] for r in map(json.loads, lines)}
    expected = {p: r for p, r in corpus.outcome.items() if r is not None}
    assert ledger == expected
    # The private location is not inside DEST.
    assert not run1.private.startswith(run1.dest + "/")


def test_no_identifying_value_reaches_dest(run1, corpus):
    needles = [s.encode() for s in corpus.secrets + corpus.package_secrets if len(s) >= 6]
    needles.append(phantoms.PHI_MARKER.encode())
    # Source folders are named after PHI: no source path may leak either.
    needles.append(corpus.dicom_dir.encode())
    checked = 0
    for path in Path(run1.dest).rglob("*"):
        if not path.is_file():
            continue
        blobs = [path.read_bytes()]
        if path.suffix == ".tar":
            with tarfile.open(path) as tf:
                for m in tf.getmembers():
                    assert phantoms.PHI_MARKER not in m.name
                    blobs.append(tf.extractfile(m).read())
        for blob in blobs:
            checked += 1
            low = blob.lower()
            for n in needles:
                assert n.lower() not in low, f"identifying value found in {path.name}"
    assert checked > 10


def test_ct_volumes_equal_ground_truth_in_lps(run1, corpus):
    """Slice order, HU rescale, every transfer syntax and the reorientation of axial, coronal and
    sagittal acquisitions, checked voxel by voxel against the phantom's ground truth."""
    from radforge import transforms

    pseudo = deid.Pseudonymizer(SECRET.encode())
    by_key = {k: (arr, meta) for k, arr, meta, _ in _samples(run1)}
    target = run1.manifest["profile"]["ct"]["spacing_mm"]
    orientations = set()
    for s in corpus.series:
        if s.expected_reason is not None or s.hu_lps is None:
            continue
        arr, meta = by_key[pseudo("series", s.series_uid)]
        src = meta["canonical_source_spacing_mm"]
        assert sorted(src) == pytest.approx(sorted(s.spacing_zyx))
        truth = np.maximum(s.hu_lps, -1024).astype(np.float32)
        expected, affine = transforms.Resample(target)(truth, np.diag([src[2], src[1], src[0], 1.0]))
        np.testing.assert_array_equal(arr, transforms.to_int16_hu(expected))
        assert meta["orientation"] == "LPS" and meta["shape"] == list(arr.shape)
        assert meta["spacing_mm"] == pytest.approx(transforms.spacing_zyx(affine), abs=1e-5)
        stored = np.array(meta["affine_lps"])
        assert np.all(np.diag(stored)[:3] > 0)
        assert np.allclose(stored[:3, :3], np.diag(np.diag(stored)[:3]), atol=1e-3)
        orientations.add(s.orientation)
    assert {"axial", "coronal", "sagittal"} <= orientations


def test_build_reports_its_cpu_seconds_per_stage(run1):
    """The build tasks' stage clocks (decoder child included) reach the driver through the
    outcome records: what `radforge bench ingest` breaks the build down by."""
    cpu = run1.build_cpu_s
    assert {"items", "meta", "read", "parse", "decode", "hu", "orient", "int16", "decoder_ipc", "encode", "tar",
            "sha256", "upload", "record"} <= set(cpu)
    assert all(v >= 0 for v in cpu.values()) and cpu["decode"] > 0
    assert sum(cpu.values()) < run1.wall_s * 16  # CPU seconds of this run's tasks, not a clock's epoch


def test_reports_are_redacted_and_labels_joined(run1, corpus):
    by_study = {}
    pseudo = deid.Pseudonymizer(SECRET.encode())
    for st in corpus.studies:
        by_study[pseudo("study", st.study_uid)] = st
    with_report = 0
    for key, arr, meta, report in _samples(run1):
        st = by_study.get(meta["study"])
        if st is None:  # package files have no report
            assert report is None and "labels" not in meta
            continue
        assert report is not None and meta["has_report"]
        with_report += 1
        assert phantoms.PHI_MARKER not in report
        assert "[REDACTED]" in report
        assert meta["labels"] == {f: st.findings.get(f) for f in meta["labels"]}
        assert set(meta["labels"]) == set(phantoms.FINDINGS)
    assert with_report >= 6


def test_a_patient_is_in_exactly_one_split(run1):
    splits = {}
    for _, _, meta, _ in _samples(run1):
        splits.setdefault(meta["patient"], set()).add(meta["split"])
        assert meta["split"] in ("train", "val", "test")
    assert all(len(v) == 1 for v in splits.values())


def test_manifest_shards_are_complete_and_readable_by_stock_tools(run1, ray_cluster):
    import ray
    import webdataset as wds

    m = run1.manifest
    assert len(m["shards"]) >= 2  # target_mb is tiny: several shards
    urls = []
    for s in m["shards"]:
        p = os.path.join(run1.dest, s["path"])
        data = Path(p).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        with tarfile.open(p) as tf:
            keys = {n.split(".", 1)[0] for n in tf.getnames()}
        assert len(keys) == s["samples"]
        urls.append(p)
    n = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False).decode())
    assert n == m["totals"]["samples"]
    # Samples are heterogeneous (.npy or .png, optional .txt): read raw bytes, no tensor casting.
    ray.data.DataContext.get_current().enable_tensor_extension_casting = False
    try:
        ds = ray.data.read_webdataset([os.path.join(run1.dest, s["path"]) for s in m["shards"]], decoder=None)
        rows = ds.take_all()
    finally:
        ray.data.DataContext.get_current().enable_tensor_extension_casting = True
    assert len(rows) == m["totals"]["samples"]
    assert all(json.loads(r["json"])["modality"] in ("CT", "CR", "DX") for r in rows)
    keys = [k for k, *_ in _samples(run1)]
    assert len(keys) == len(set(keys))


def test_rerun_of_a_finished_ingest_is_a_noop(run1, corpus):
    from ray.data import DataContext

    before = {p: p.stat().st_mtime_ns for p in Path(run1.dest).rglob("*") if p.is_file()}
    ctx = DataContext.get_current()
    settings = (ctx.shuffle_strategy, ctx.op_resource_reservation_enabled, ctx.enable_progress_bars)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADFORGE_DEID_SECRET", SECRET)
        recipe = config.load(IngestRecipe, None, [NATIVE_SPACING, "shards.target_mb=0.05"])
        again = ingest.run(corpus.dicom_dir, run1.dest, recipe, reports=corpus.reports_csv, labels=corpus.labels_csv, progress=False)
    assert again.noop
    after = {p: p.stat().st_mtime_ns for p in Path(run1.dest).rglob("*") if p.is_file()}
    assert before == after
    # The run's Ray Data settings were its own: the caller's context is back, unchanged.
    assert DataContext.get_current() is ctx
    assert (ctx.shuffle_strategy, ctx.op_resource_reservation_enabled, ctx.enable_progress_bars) == settings


def test_a_different_plan_into_the_same_dest_is_refused(run1, corpus):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADFORGE_DEID_SECRET", SECRET)
        recipe = config.load(IngestRecipe, None, ["shards.target_mb=0.05"])  # other spacing
        with pytest.raises(Exception, match="different ingest"):
            ingest.run(corpus.dicom_dir, run1.dest, recipe, progress=False)


def test_inspect_prints_samples_as_json_and_draws_a_montage(run1, tmp_path):
    png = tmp_path / "m.png"
    out = subprocess.run(
        [sys.executable, "-m", "radforge", "inspect", run1.dest, "--samples", "3", "--json"],
        capture_output=True, text=True, env=_env(), check=True,
    ).stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert len(rows) == 3 and all({"modality", "shape", "spacing_mm", "patient", "split"} <= set(r) for r in rows)
    subprocess.run([sys.executable, "-m", "radforge", "inspect", run1.dest, "--png", str(png)], env=_env(), check=True)
    from PIL import Image

    img = Image.open(png)
    assert img.size[0] > 500 and img.size[1] > 200
    summary = subprocess.run([sys.executable, "-m", "radforge", "inspect", run1.dest], capture_output=True, text=True, env=_env(), check=True).stdout
    assert "files seen" in summary and "CT volumes" in summary


# ----------------------------------------------------------------------------- object storage


def test_ingest_from_and_to_s3(s3_bucket, ray_cluster, tmp_path):
    small = phantoms.build_corpus(tmp_path / "c", n_patients=1, include_package_files=False)
    fs, _ = storage.url_to_fs(s3_bucket)
    fs.put(small.dicom_dir, s3_bucket.removeprefix("s3://") + "/raw/dicom", recursive=True)
    fs.put(small.reports_csv, s3_bucket.removeprefix("s3://") + "/raw/reports.csv")
    storage.clear_cache()
    recipe = config.load(IngestRecipe, None, ["deid.demo_key=true"])
    res = ingest.run(f"{s3_bucket}/raw/dicom", f"{s3_bucket}/shards", recipe, reports=f"{s3_bucket}/raw/reports.csv", progress=False)
    m = shardspec.read_manifest(f"{s3_bucket}/shards")
    assert m["inputs"]["seen"] == small.expected["files"]
    assert m["inputs"]["rejected"] == small.expected["rejected"]
    assert m["totals"]["samples"] == small.expected["ct_volumes"] + small.expected["xray_images"]
    assert storage.exists(f"{s3_bucket}/shards.private/rejects.jsonl")
    n = sum(1 for _ in shardspec.iter_samples(f"{s3_bucket}/shards", m))
    assert n == m["totals"]["samples"] and res.ok


# ----------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def killed_and_resumed(corpus, ray_cluster, tmp_path_factory):
    """`radforge ingest` of the corpus with its report and label tables, killed (SIGKILL) once two
    shards are done, then run again to completion: (dest, the mtimes of the shards completed before
    the restart, the killed run's output, the resumed run's CompletedProcess). Two tests read it:
    the resume guarantees, and what the CLI printed and Ray logged (one ingest for both, not two)."""
    work = tmp_path_factory.mktemp("killed")
    dest = work / "shards"
    progress = Path(str(dest) + ".private") / "progress"
    cmd = [sys.executable, "-m", "radforge", "ingest", corpus.dicom_dir, str(dest), "--demo", "--no-progress",
           "--reports", corpus.reports_csv, "--labels", corpus.labels_csv, "--set", "shards.target_mb=0.02"]
    env = _env(RAY_ADDRESS=ray_cluster)
    with open(work / "killed.out", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if progress.exists() and len(list(progress.glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "ingest finished before it could be killed: make the corpus bigger"
        proc.kill()
        proc.wait()
    assert not (dest / "manifest.json").exists()
    done_before = {p.name: json.loads(p.read_text())["path"] for p in progress.glob("*.json")}
    stamps = {rel: (dest / rel).stat().st_mtime_ns for rel in done_before.values() if (dest / rel).exists()}
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return dest, stamps, (work / "killed.out").read_text(errors="replace"), resumed


def test_killed_ingest_resumes_without_rewriting_completed_shards(killed_and_resumed, corpus):
    dest, stamps, _, out = killed_and_resumed
    assert stamps, "completed shards exist before the restart"
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((dest / "manifest.json").read_text())
    for rel, ns in stamps.items():
        assert (dest / rel).stat().st_mtime_ns == ns, f"{rel} was rewritten"
    keys = []
    for s in m["shards"]:
        with tarfile.open(dest / s["path"]) as tf:
            keys += sorted({n.split(".", 1)[0] for n in tf.getnames()})
    assert len(keys) == len(set(keys)) == m["totals"]["samples"]
    assert m["totals"]["samples"] == corpus.expected["ct_volumes"] + corpus.expected["xray_images"]
    assert shardspec.reconciles(m["inputs"]) and m["inputs"]["seen"] == corpus.expected["files"]


# ----------------------------------------------------------------------------- bad configuration


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "radforge", *args], capture_output=True, text=True, env=_env(**env), timeout=120)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "ct.spacing=[1,1,1]"], "unknown recipe key ct.spacing"),
        (["--set", "xray.voi=maybe"], "xray.voi must be one of"),
        (["--recipe", "/nonexistent/recipe.yaml"], "recipe not found"),
    ],
)
def test_bad_recipe_fails_before_any_work_with_one_line(args, needle, tmp_path, corpus):
    dest = tmp_path / "out"
    r = _cli("ingest", corpus.dicom_dir, str(dest), "--demo", *args)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not dest.exists()


def _cli_in_process(capsys, monkeypatch, *args, **env) -> tuple[int, str]:
    """`radforge ARGS` through cli.main in this process (what `python -m radforge` runs, without a
    new interpreter's imports) → (exit code, stderr). For failures that come before any work: a
    case that started Ray here would fail the fast tier's guard."""
    from radforge import cli

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    rc = cli.main(list(args))
    return rc, capsys.readouterr().err


def test_bad_locations_and_missing_secret_fail_clearly(tmp_path, corpus, capsys, monkeypatch):
    # The real entry point once (exit status and stderr of a new process) ...
    r = _cli("ingest", str(tmp_path / "missing"), str(tmp_path / "o1"), "--demo")
    assert r.returncode == 2 and ("does not exist" in r.stderr.lower() or "not found" in r.stderr.lower())
    # ... then the same main() in process for the other cases.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _cli_in_process(capsys, monkeypatch, "ingest", corpus.dicom_dir, str(blocker / "sub"), "--demo")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    rc, err = _cli_in_process(capsys, monkeypatch, "ingest", corpus.dicom_dir, str(tmp_path / "o2"), RADFORGE_DEID_SECRET="")
    assert rc == 2 and "RADFORGE_DEID_SECRET" in err
    rc, err = _cli_in_process(capsys, monkeypatch, "ingest", corpus.dicom_dir, str(tmp_path / "o3"), "--demo",
                              "--reports", str(tmp_path / "nope.csv"))
    assert rc == 2 and "table not found" in err
    rc, err = _cli_in_process(capsys, monkeypatch, "ingest", corpus.dicom_dir, str(tmp_path / "o3"), "--demo",
                              "--reports", corpus.reports_csv, "--set", "reports.text_column=body")
    assert rc == 2 and "no column 'body'" in err
    rc, err = _cli_in_process(capsys, monkeypatch, "ingest", "s3://no-such-bucket-radforge/x", str(tmp_path / "o4"), "--demo",
                              AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_logs_and_terminal_output_hold_no_identifying_values(killed_and_resumed, corpus):
    """What `radforge ingest` with the report and label tables printed (the killed run's output and
    the resumed run's stdout/stderr) and every Ray log file of the cluster that ran the tasks."""
    import ray

    _, _, killed, r = killed_and_resumed
    assert r.returncode == 0, r.stderr[-2000:]
    assert "files seen" in r.stdout
    needles = [s for s in corpus.secrets if len(s) >= 6] + [phantoms.PHI_MARKER]
    for text in (killed, r.stdout, r.stderr):
        for n in needles:
            assert n.lower() not in text.lower()
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    scanned = 0
    for f in logs.rglob("*"):
        if f.is_file():
            blob = f.read_bytes().lower()
            scanned += 1
            for n in needles:
                assert n.lower().encode() not in blob, f"identifying value in Ray log {f.name}"
    assert scanned > 0


def test_report_and_label_tables_read_the_same_from_csv_parquet_and_jsonl(corpus, tmp_path):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    base = pcsv.read_csv(corpus.labels_csv, convert_options=pcsv.ConvertOptions(column_types={"AccessionNumber": "string"}))
    pq.write_table(base, tmp_path / "labels.parquet")
    with open(tmp_path / "labels.jsonl", "w") as f:
        for row in base.to_pylist():
            f.write(json.dumps(row) + "\n")
    cfg = IngestRecipe().labels
    maps = []
    for path in (corpus.labels_csv, str(tmp_path / "labels.parquet"), str(tmp_path / "labels.jsonl")):
        spec = ingest._TablesSpec.load(None, IngestRecipe().reports, path, cfg)
        maps.append(spec.read()["labels"]["map"])
    assert maps[0] == maps[1] == maps[2] and len(maps[0]) >= 3
    for st in corpus.studies:
        if st.accession in maps[0]:
            assert maps[0][st.accession] == {f: st.findings.get(f) for f in phantoms.FINDINGS}
    # CheXpert cells: 1 / 0 / -1 / blank; anything else is missing, never a guess.
    assert [ingest._label(v) for v in ("1", "0", "-1", "", None, "1.0", "maybe", float("nan"))] == [1, 0, -1, None, None, 1, None, None]


def test_index_rows_and_plan_items_cross_the_arrow_edge_unchanged(tmp_path):
    """What a Ray task hands the next one (index rows, plan items as Arrow columns) is exactly
    what dicom produced: no field dropped or retyped at the edge."""
    from radforge import dicom

    st = phantoms.make_study(phantoms.make_patient(0))
    ct = phantoms.ct_series(tmp_path / "ct", st, n_slices=10, rows=32, cols=32)
    xr = phantoms.xray(tmp_path / "dx.dcm", st, rows=40, cols=32)
    rows = []
    for p in [*ct.paths, xr.path, __file__]:
        with open(p, "rb") as f:
            rows.append(dicom.scan(p, os.path.getsize(p), f))
    back = ingest._index_rows(ingest._index_table(rows))
    assert back == rows
    ctx = dicom.PlanContext(IngestRecipe(), deid.Pseudonymizer(b"k"))
    items = [it for g in {r["group_key"] for r in rows} for it in dicom.plan_group([r for r in rows if r["group_key"] == g], ctx)]
    assert sorted(it.status for it in items) == ["planned", "planned", "rejected"]
    assert ingest._items_of(ingest._items_table(items)) == items
    # The CT's rows share one parsed `safe` (`_index_rows`), which is sound while planning never writes it.
    assert back[0]["safe"] is back[1]["safe"]
    for g in {r["group_key"] for r in back}:
        dicom.plan_group([r for r in back if r["group_key"] == g], ctx)
    assert back == rows


# ----------------------------------------------------------------------------- hostile input


def test_bombs_and_stalls_cost_one_file_each_and_are_ledgered_with_the_figure(ray_cluster, tmp_path):
    """The crafted files of tests/test_hostile.py in a real ingest, next to valid X-rays: each is
    refused from its header (no decoding, no stall), counted, and ledgered privately."""
    from test_hostile import rle_bomb, sparse_giant

    src = tmp_path / "src"
    src.mkdir()
    study = phantoms.make_study(phantoms.make_patient(0))
    for i in range(2):
        phantoms.xray(src / f"ok{i}.dcm", study, rows=40 + i, cols=32, seed=i)
    (src / "bomb.dcm").write_bytes(rle_bomb())
    sparse_giant(src / "giant.dcm", 30000, 30000)
    with open(src / "zeros.dcm", "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        f.truncate(132 + 64 * 1024 * 1024)
    t = time.time()
    res = ingest.run(str(src), str(tmp_path / "out"), config.load(IngestRecipe, None, ["deid.demo_key=true"]), progress=False)
    inp = res.manifest["inputs"]
    assert inp["seen"] == 5 and inp["used"] == 2 and shardspec.reconciles(inp)
    assert inp["rejected"] == {"too_large": 2, "unreadable_header": 1}
    assert time.time() - t < 120
    lines = [json.loads(x) for x in storage.read_bytes(storage.join(res.private, "rejects.jsonl")).decode().splitlines()]
    by_name = {os.path.basename(r["path"]): r for r in lines}
    assert "8589672450 pixel bytes" in by_name["bomb.dcm"]["detail"]
    assert str(30000 * 30000 * 2) in by_name["giant.dcm"]["detail"]
    assert "detail" not in by_name["zeros.dcm"]
    assert "detail" not in json.dumps(res.manifest)  # figures stay in the private ledger


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_the_decoder_child_keeps_slice_sized_buffers_in_its_heap(tmp_path):
    """`ingest._keep_heap`, which the decoder child runs first: decoding one 512² RLE slice after
    another, a fresh process faulted ~290 new pages in per slice (glibc maps allocations ≥ 128 KiB
    afresh and unmaps them on free, ~1 ms of kernel time a slice); after it, none. Page faults,
    counted by the kernel, not time."""
    from pydicom.uid import RLELossless

    phantoms.ct_slices_corpus(str(tmp_path), n_series=1, n_slices=1, rows=512, cols=512, transfer_syntax=RLELossless)
    (path,) = [p for p, _ in storage.find_files(str(tmp_path))]
    code = (
        "import resource, sys\n"
        "from pydicom.pixels import pixel_array\n"
        "from radforge import ingest\n"
        "def faults():\n"
        "    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(10):\n"
        "        pixel_array(sys.argv[1])\n"
        "    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f) / 10\n"
        "faults(); before = faults(); ingest._keep_heap(); faults(); print(before, faults())\n")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True, timeout=120)
    before, after = map(float, out.stdout.split())
    assert before >= 100 and after < 10, (before, after)
