"""Benchmarks, reported as ratios measured side by side in one run (never as timed test asserts).

`radforge bench ingest`: on a generated CT corpus, CT slices/s for

  naive        one process: `pydicom.dcmread(f).pixel_array` per file (what glue scripts do)
  decode       one process: `pydicom.pixels.pixel_array(f)` (pydicom's decode-only fast path)
  ingest@1cpu  the full ingest (scan, plan, decode, HU, orient, resample, encode, tar, manifest)
               on a local Ray cluster limited to 1 CPU
  ingest@Ncpu  the same with all CPUs (N = os.cpu_count(), at least 2)

Targets: ingest@1cpu ≥ 0.8 × naive (Ray + encoding overhead ≤ 20%); ingest@2cpu ≥ 1.7 × ingest@1cpu.
Ray start-up is excluded (a long-running cluster pays it once); everything after `ray.init` counts.
Peak memory is the largest summed RSS of the driver plus Ray worker processes, sampled every 0.2 s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "j2k": "1.2.840.10008.1.2.4.90",
}


class _PeakRSS:
    """Samples the RSS of this process and all Ray worker processes (children of raylet)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for p in psutil.process_iter(["name", "cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if "ray::" in cmd or "default_worker.py" in cmd:
                        total += p.memory_info().rss
                except (psutil.Error, OSError):
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run(what: str, *, workdir: str | None = None, series: int = 4, slices: int = 64, size: int = 512, syntax: str = "rle") -> dict:
    if what != "ingest":
        raise ValueError(f"unknown benchmark {what!r}")
    return bench_ingest(workdir=workdir, series=series, slices=slices, size=size, syntax=syntax)


def bench_ingest(*, workdir: str | None, series: int, slices: int, size: int, syntax: str) -> dict:
    import pydicom
    import ray
    from pydicom.pixels import pixel_array

    from radforge import config, ingest, phantoms, storage
    from radforge.config import IngestRecipe

    own = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="radforge-bench-")
    try:
        corpus = os.path.join(root, "corpus")
        if not os.path.isdir(corpus):
            phantoms.ct_slices_corpus(corpus, n_series=series, n_slices=slices, rows=size, cols=size, transfer_syntax=SYNTAXES[syntax])
        files = [p for p, _ in storage.find_files(corpus)]
        n = len(files)
        src_bytes = sum(os.path.getsize(f) for f in files)

        t = time.perf_counter()
        for f in files:
            pydicom.dcmread(f).pixel_array  # noqa: B018 — the naive loop under test
        naive_s = time.perf_counter() - t

        t = time.perf_counter()
        for f in files:
            pixel_array(f)
        decode_s = time.perf_counter() - t

        # Shards sized so that each CPU gets several (parallelism comes from shards).
        recipe = config.load(IngestRecipe, None, ["deid.demo_key=true", "shards.target_mb=8"])
        runs = {}
        ncpu = max(2, os.cpu_count() or 2)
        for cpus in (1, ncpu):
            dest = os.path.join(root, f"shards-{cpus}cpu")
            for d in (dest, dest + ".private"):
                shutil.rmtree(d, ignore_errors=True)
            ray.shutdown()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            with _PeakRSS() as mem:
                t = time.perf_counter()
                res = ingest.run(corpus, dest, recipe, progress=False)
                wall = time.perf_counter() - t
            ray.shutdown()
            runs[cpus] = {"wall_s": wall, "peak_rss_mb": mem.peak / 1e6, "samples": res.manifest["totals"]["samples"], "stages_s": res.stage_s}
        one, many = runs[1], runs[ncpu]
        rate = lambda s: n / s  # noqa: E731
        return {
            "benchmark": "ingest",
            "corpus": {"series": series, "slices": n, "size": size, "transfer_syntax": syntax, "source_mb": round(src_bytes / 1e6, 1)},
            "slices_per_s": {
                "naive_1proc": round(rate(naive_s), 1),
                "decode_only_1proc": round(rate(decode_s), 1),
                "ingest_1cpu": round(rate(one["wall_s"]), 1),
                f"ingest_{ncpu}cpu": round(rate(many["wall_s"]), 1),
            },
            "slices_per_s_per_core": {"ingest_1cpu": round(rate(one["wall_s"]), 1), f"ingest_{ncpu}cpu": round(rate(many["wall_s"]) / ncpu, 1)},
            "ratios": {
                "ingest_1cpu / naive": round(naive_s / one["wall_s"], 3),
                "ingest_1cpu / decode_only": round(decode_s / one["wall_s"], 3),
                f"ingest_{ncpu}cpu / ingest_1cpu": round(one["wall_s"] / many["wall_s"], 3),
            },
            "targets": {"ingest_1cpu / naive": 0.8, f"ingest_{ncpu}cpu / ingest_1cpu": 1.7 if ncpu == 2 else None},
            "peak_rss_mb": {"ingest_1cpu": round(one["peak_rss_mb"]), f"ingest_{ncpu}cpu": round(many["peak_rss_mb"])},
            "stages_s": {"ingest_1cpu": {k: round(v, 2) for k, v in one["stages_s"].items()}, f"ingest_{ncpu}cpu": {k: round(v, 2) for k, v in many["stages_s"].items()}},
        }
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def format_result(r: dict) -> str:
    lines = [f"radforge bench {r['benchmark']}", "=" * 24]
    c = r["corpus"]
    lines.append(f"corpus: {c['series']} CT series, {c['slices']} slices of {c['size']}², {c['transfer_syntax']}, {c['source_mb']} MB")
    lines.append("")
    lines.append("slices/s")
    for k, v in r["slices_per_s"].items():
        lines.append(f"  {k:<22}{v:>10.1f}")
    lines.append("ratios (target)")
    for k, v in r["ratios"].items():
        tgt = r["targets"].get(k)
        mark = "" if tgt is None else (f"  (target ≥ {tgt}: {'met' if v >= tgt else 'NOT met'})")
        lines.append(f"  {k:<28}{v:>8.3f}{mark}")
    lines.append("peak RSS (driver + Ray workers)")
    for k, v in r["peak_rss_mb"].items():
        lines.append(f"  {k:<22}{v:>8} MB")
    lines.append("stage seconds: " + "; ".join(f"{k}: {v}" for k, v in r["stages_s"].items()))
    return "\n".join(lines)
