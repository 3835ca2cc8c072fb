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
    if what == "serve":
        return bench_serve(workdir=workdir)
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
    if r["benchmark"] == "serve":
        return format_serve(r)
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


# ---------------------------------------------------------------------------------------------
# radforge bench serve
# ---------------------------------------------------------------------------------------------
#
# /v1/embed of radforge.serve over HTTP on 127.0.0.1, side by side in one run on one local Ray.
# Two applications run at once, each one replica with the same resources: "batched"
# (max_batch_size=16, batch_wait_timeout_s=0.01) and "unbatched" (max_batch_size=1). They are
# measured in alternating rounds and the best round of each counts, so load from other processes
# on the machine hits both alike.
#
#   in_process    np.load → ModelView → LoadedModel.embed_images in this process with the
#                 replica's thread count; at concurrency 1 each in-process call is interleaved
#                 with one HTTP request, so "Serve overhead" = p50(HTTP, unbatched) − p50(in-process)
#                 compares like with like
#   model_only    embed_images per item at batch 1 vs batch 16: the most batching can give on this
#                 device (a compute-bound CPU forward gains little; a GPU gains a lot)
#
# Payload: one X-ray in the stored form (.npy uint16 [256, 256]) for a freshly initialised tiny
# MAE X-ray model at the default 224 px view (weights do not change the cost); cuda when present.
# Targets: batched ≥ 3 × unbatched requests/s at concurrency 16; Serve overhead p50 ≤ 5 ms. The
# client runs on the same machine as the server.


def _bench_model(root: str) -> str:
    """A tiny MAE X-ray model dir in the exported format, random weights (cost only)."""
    import json

    import torch
    from safetensors.torch import save_file

    from radforge import checkpoint, config, models, shardspec, transforms
    from radforge.config import IngestRecipe, ModelConfig, ViewConfig

    torch.manual_seed(0)
    view, cfg = ViewConfig(rand_crop=False), ModelConfig(kind="mae", preset="tiny")
    model = models.build(cfg, "xray", transforms.ModelView(view, "xray").input_shape, pretrained=False)
    out = os.path.join(root, "bench-model")
    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, os.path.join(out, checkpoint.WEIGHTS))
    meta = {"kind": "mae", "image": "xray", "model": config.to_dict(cfg), "view": config.to_dict(view),
            "profile": shardspec.profile(IngestRecipe()), "findings": [], "prompts": {}, "recipe": {}, "step": 0,
            "model_id": "bench-mae-xray"}
    with open(os.path.join(out, checkpoint.MODEL_JSON), "w") as f:
        json.dump(meta, f)
    return out


def _load(url: str, payload: bytes, concurrency: int, n: int, headers: dict | None = None) -> dict:
    """`n` POSTs of `payload` by `concurrency` client threads (keep-alive sessions) → rps, p50, p99."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import requests

    per = max(1, n // concurrency)

    def worker(_):
        lat = []
        with requests.Session() as s:
            for _ in range(per):
                t = time.perf_counter()
                r = s.post(url, data=payload, headers=headers or {}, timeout=120)
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"bench request failed: HTTP {r.status_code} {r.text[:200]}")
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lats = [x for part in pool.map(worker, range(concurrency)) for x in part]
    wall = time.perf_counter() - t0
    a = np.array(lats) * 1000
    return {"n": len(lats), "rps": round(len(lats) / wall, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2)}


def _percentiles(lat_s: list[float], wall_s: float) -> dict:
    import numpy as np

    a = np.array(lat_s) * 1000
    return {"n": len(lat_s), "rps": round(len(lat_s) / wall_s, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2)}


def bench_serve(*, workdir: str | None = None, requests_c16: int = 256, requests_c1: int = 60, rounds: int = 2) -> dict:
    import io
    import socket

    import numpy as np
    import ray
    import requests
    import torch
    from ray import serve

    from radforge import checkpoint, transforms
    from radforge import serve as rserve

    own = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="radforge-bench-serve-")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # One replica per app; on CPU each gets half the cores (both apps are up at once).
    ncpu = max(2, os.cpu_count() or 2)
    replica_cpus = 1 if cuda else max(1, ncpu // 2)
    try:
        model_url = _bench_model(root)
        img = (np.random.default_rng(0).random((256, 256)) * 65535).astype(np.uint16)
        buf = io.BytesIO()
        np.save(buf, img)
        payload = buf.getvalue()

        torch.set_num_threads(replica_cpus)  # what Ray gives a replica (OMP_NUM_THREADS = num_cpus)
        lm = checkpoint.load_for_inference(model_url, device)
        view = transforms.ModelView(lm.view, lm.image)

        def in_process():
            x = view(rserve.load_npy(payload, lm.image), {})
            e = lm.embed_images(torch.from_numpy(x[None]))
            if cuda:
                torch.cuda.synchronize()
            return e

        x1 = torch.from_numpy(view(rserve.load_npy(payload, lm.image), {})[None])
        per_item = {}
        for b in (1, 16):
            xb = x1.expand(b, *x1.shape[1:]).contiguous()
            lm.embed_images(xb)
            t = time.perf_counter()
            for _ in range(max(2, 32 // b)):
                lm.embed_images(xb)
            if cuda:
                torch.cuda.synchronize()
            per_item[b] = (time.perf_counter() - t) / (max(2, 32 // b) * b) * 1000

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.shutdown()
        ray.init(num_cpus=ncpu, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        best: dict[str, dict] = {}
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            urls = {}
            for name, batch in (("unbatched", 1), ("batched", 16)):
                app = rserve.build_app({"model": model_url, "max_batch_size": batch, "batch_wait_timeout_s": 0.01,
                                        "num_cpus": replica_cpus, "num_gpus": 0.5 if cuda else 0})
                serve.run(app, name=f"bench-{name}", route_prefix=f"/{name}", blocking=False)
                urls[name] = f"http://127.0.0.1:{port}/{name}/v1/embed"
                _load(urls[name], payload, 4, 32)  # warm-up: model load, connections
            inproc_lat, http_lat = [], []
            for _ in range(rounds):
                # Concurrency 1, interleaved with the in-process call.
                with requests.Session() as sess:
                    t_http = 0.0
                    for _ in range(requests_c1):
                        t = time.perf_counter()
                        in_process()
                        inproc_lat.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        r = sess.post(urls["unbatched"], data=payload, timeout=120)
                        http_lat.append(time.perf_counter() - t)
                        t_http += http_lat[-1]
                        if r.status_code != 200:
                            raise RuntimeError(f"bench request failed: HTTP {r.status_code}")
                for name in ("unbatched", "batched"):
                    for c in (1, 16):
                        res = _load(urls[name], payload, c, requests_c16 if c == 16 else requests_c1)
                        key = f"{name}/c{c}"
                        if key not in best or res["rps"] > best[key]["rps"]:
                            best[key] = res
        finally:
            serve.shutdown()
            ray.shutdown()
        runs = {
            "in_process": {"c1": _percentiles(inproc_lat, sum(inproc_lat))},
            "unbatched_interleaved": {"c1": _percentiles(http_lat, sum(http_lat))},
            "unbatched": {"c1": best["unbatched/c1"], "c16": best["unbatched/c16"]},
            "batched": {"c1": best["batched/c1"], "c16": best["batched/c16"]},
        }
        return {
            "benchmark": "serve",
            "setup": {"model": "mae tiny, xray 224 px (random weights)", "payload": "npy uint16 [256, 256]",
                      "device": device, "cpus": ncpu, "replica_cpus": replica_cpus, "torch_threads": torch.get_num_threads(),
                      "rounds": rounds},
            "runs": runs,
            "model_only_ms_per_item": {"batch_1": round(per_item[1], 2), "batch_16": round(per_item[16], 2)},
            "ratios": {
                "batched / unbatched rps @16": round(best["batched/c16"]["rps"] / best["unbatched/c16"]["rps"], 2),
                "model-only batching ceiling": round(per_item[1] / per_item[16], 2),
                "serve overhead p50 ms @1": round(runs["unbatched_interleaved"]["c1"]["p50_ms"] - runs["in_process"]["c1"]["p50_ms"], 2),
            },
            "targets": {"batched / unbatched rps @16": ">= 3", "model-only batching ceiling": "-",
                        "serve overhead p50 ms @1": "<= 5"},
        }
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def format_serve(r: dict) -> str:
    lines = ["radforge bench serve", "=" * 20, f"setup: {r['setup']}", "",
             f"  {'run':<12}{'conc':>5}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}"]
    for name, by_c in r["runs"].items():
        for c, v in by_c.items():
            lines.append(f"  {name:<12}{c[1:]:>5}{v['rps']:>10.1f}{v['p50_ms']:>10.2f}{v['p99_ms']:>10.2f}")
    m = r["model_only_ms_per_item"]
    lines.append(f"model only, ms per item: batch 1 {m['batch_1']:.2f}, batch 16 {m['batch_16']:.2f}")
    lines.append("ratios (target)")
    for k, v in r["ratios"].items():
        lines.append(f"  {k:<32}{v:>8.2f}  (target {r['targets'][k]})")
    return "\n".join(lines)
