"""radforge bench stream

Side by side in one run, all reading from one moto S3 server on 127.0.0.1 started here:

  loader     radforge.loader (train mode, sha256 verified, num_workers=0) → model views
  tar_read   the same shard bytes read and split into tar members (tarfile), nothing else:
             the floor any shard reader pays. Target loader ≥ 0.9 × tar_read (MB/s) with sha256
             verification on (issue 14); loader_no_sha256 (verification off) is shown beside it.
  raw_dicom  a torch Dataset that reads the same series' DICOM files from the same endpoint
             and assembles them with pydicom (sorted by position, HU). Target loader ≥ 10 ×
             raw_dicom (volumes/s).

  mixture    radforge.loader's MixtureLoader over 3 sources (the same shard set three times,
             weights 0.5/0.3/0.2, each source its own seed and stream): samples/s against the
             single-source loader. Target ≥ 0.9 ×. Plus the realised share error (max over
             sources of |share - weight|) after 10,000 samples of its interleave, which is a
             function of the counts alone (`MixtureLoader.schedule`, no data read); target ≤ 1 %.
             Both sides stream MIX_PASSES passes' worth of samples per block.

The loader and tar_read run `rounds` interleaved blocks of `block` consecutive passes over all the
data (a fresh loader iterator per block), raw_dicom two passes; the best of each counts (least
disturbed by other load on a shared machine). A block's end closes its iterator; the read-ahead
into the next epoch it leaves running is waited for between blocks, untimed (`_settle`).
"""

from __future__ import annotations

import os

from radforge.bench._common import _Best, _block, _ct_corpus, _met, _met_below, _moto_s3, _workdir


def _raw_dicom_dataset(series_urls: list[list[str]]):
    """The baseline: what a training script without ingest does, one series per item."""
    import io

    import numpy as np
    import pydicom
    import torch.utils.data as tud

    from radforge import storage

    class RawDicomSeries(tud.Dataset):
        def __len__(self):
            return len(series_urls)

        def __getitem__(self, i):
            slices = []
            for url in series_urls[i]:
                ds = pydicom.dcmread(io.BytesIO(storage.read_bytes(url)))
                normal = np.cross(*np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3)))
                pos = float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float)))
                hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
                slices.append((pos, hu))
            slices.sort(key=lambda t: t[0])
            return np.stack([h for _, h in slices]).clip(-1024, 32767).astype(np.int16)

    return RawDicomSeries()


def _stream_inputs(corpus: str, files: list[str], bucket: str) -> tuple[dict[str, list[str]], str, dict]:
    """The stream benchmark's two inputs on one S3 endpoint: the DICOM files as they are (series →
    file URLs, for the baseline) and their ingest (shard set URL, manifest)."""
    import ray

    from radforge import config, ingest, storage
    from radforge.config import IngestRecipe

    by_series: dict[str, list[str]] = {}
    for f in files:
        rel = os.path.relpath(f, corpus)
        url = storage.join(bucket, "dicom", rel)
        storage.put_file_atomic(f, url)
        by_series.setdefault(rel.split(os.sep)[0], []).append(url)
    dest = storage.join(bucket, "shards")
    recipe = config.load(IngestRecipe, None, ["deid.demo_key=true", "shards.target_mb=1", "splits={train: 1.0}"])
    ray.shutdown()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        return by_series, dest, ingest.run(corpus, dest, recipe, progress=False).manifest
    finally:
        ray.shutdown()


def bench_stream(*, workdir: str | None, series: int, slices: int, size: int, syntax: str, rounds: int = 5,
                 block: int = 3) -> dict:
    import io
    import itertools
    import tarfile

    import torch.utils.data as tud

    from radforge import loader, storage
    from radforge.config import DataConfig, ViewConfig

    with _workdir(workdir) as root:
        corpus, files = _ct_corpus(root, series=series, slices=slices, size=size, syntax=syntax)
        with _moto_s3() as bucket:
            by_series, dest, manifest = _stream_inputs(corpus, files, bucket)
            dicom_mb = sum(os.path.getsize(f) for f in files) / 1e6
            n_vol = manifest["totals"]["samples"]
            shard_mb = manifest["totals"]["bytes"] / 1e6
            urls = [storage.join(dest, s["path"]) for s in manifest["shards"]]

            def tar_read():
                for u in urls:
                    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(u)), mode="r|") as tf:
                        for m in tf:
                            tf.extractfile(m).read()

            view = ViewConfig()

            loaders = {}

            def make_block(verify: bool):
                """`block` consecutive epochs from a fresh iterator: no prefetch head start, and the
                stream's prefetch may cross epochs, as it does in training."""
                data = DataConfig(shards=dest, image="ct", num_workers=0, shuffle_buffer=8, verify_sha256=verify)
                ld = loaders[verify] = loader.build_loader(data, view, split="train", batch_size=1, seed=0)

                def run_block():
                    for _ in itertools.islice(iter(ld), ld.batches_per_epoch * block):
                        pass

                return run_block

            loader_block, loader_nov_block = make_block(True), make_block(False)
            # The mixture side: both loaders stream MIX_PASSES passes' worth of samples per block
            # from a fresh iterator (sources cycle their epochs independently, so a block of a few
            # samples would mostly time each source's cold start and read-ahead).
            mix_n = loaders[True].batches_per_epoch * MIX_PASSES
            mix_block, mix = _mixture_block(dest, view, mix_n)

            def single_block():
                for _ in itertools.islice(iter(loaders[True]), mix_n):
                    pass
            ld = loaders[True]
            per_pass = ld.batches_per_epoch

            def tar_block():
                for _ in range(block):
                    tar_read()

            raw = tud.DataLoader(_raw_dicom_dataset(list(by_series.values())), batch_size=None, num_workers=0)

            def raw_pass():
                for _ in raw:
                    pass

            # The cheap sides run interleaved, block by block (`block` passes each), so that load
            # from other processes hits them alike; the best block of each counts.
            # CPU seconds of this process (all its threads) are reported beside wall time: they do
            # not depend on what else the machine runs, so they show the loader's own cost even
            # when wall-clock ratios are noisy.
            load_before = os.getloadavg()[0]
            timed = _Best()
            for _ in range(rounds):
                for name, fn in (("tar", tar_block), ("loader", loader_block), ("loader_nov", loader_nov_block),
                                 ("single", single_block), ("mixture", mix_block)):
                    timed(name, fn, per=block)
                    _settle()
            for _ in range(2):
                timed("raw", raw_pass)
            best, cpu = timed.wall, timed.cpu
            tar_s, loader_s, loader_nov_s, raw_s = best["tar"], best["loader"], best["loader_nov"], best["raw"]
            m = ld.metrics()
        loader_mb = shard_mb  # a pass reads every shard whole, as tar_read does
        return {
            "benchmark": "stream",
            "corpus": {"series": series, "slices": len(files), "size": size, "transfer_syntax": syntax, "source_mb": round(dicom_mb, 1),
                       "shards": len(urls), "shard_mb": round(shard_mb, 1), "volumes": n_vol},
            "volumes_per_s": {"loader": round(per_pass / loader_s, 2), "loader_no_sha256": round(per_pass / loader_nov_s, 2), "raw_dicom": round(len(by_series) / raw_s, 2),
                              "tar_read": round(n_vol / tar_s, 2)},
            "mb_per_s": {"loader (shard bytes)": round(loader_mb / loader_s, 1), "loader_no_sha256": round(loader_mb / loader_nov_s, 1), "tar_read (shard bytes)": round(shard_mb / tar_s, 1),
                         "raw_dicom (DICOM bytes)": round(dicom_mb / raw_s, 1)},
            "ratios": {"loader / raw_dicom (volumes/s)": round((per_pass / loader_s) / (len(by_series) / raw_s), 2),
                       "loader / tar_read (MB/s)": round((loader_mb / loader_s) / (shard_mb / tar_s), 3),
                       "loader_no_sha256 / tar_read (MB/s)": round((loader_mb / loader_nov_s) / (shard_mb / tar_s), 3)},
            "targets": {"loader / raw_dicom (volumes/s)": 10.0, "loader / tar_read (MB/s)": 0.9},
            "cpu_s_per_pass": {"loader": round(cpu["loader"], 4), "loader_no_sha256": round(cpu["loader_nov"], 4),
                               "tar_read": round(cpu["tar"], 4)},
            "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "mixture": _mixture_figures(mix, single_s=best["single"], mix_s=best["mixture"], per_block=mix_n / block),  # timed(): seconds / block
            "loader": {"input_shape": list(ld.input_shape), "batches_per_pass": per_pass, "data_wait_s": round(m["data_wait_s"], 2),
                       "skipped_samples": m["skipped_samples"], "bad_shards": m["bad_shards"], "passes": f"{rounds} x {block}"},
        }


def _settle() -> None:
    """Wait, outside the timed region, for the read-ahead a closed loader iterator left running:
    a block ends at an epoch boundary, where the loader has started the next epoch's first shard
    (which training would use); it does not wait for it, and it must not slow the next block."""
    import gc
    import threading

    gc.collect()  # an iterator caught in a reference cycle is closed (and its threads released) now
    for t in threading.enumerate():
        if t.name.startswith(("radforge-prefetch", "radforge-sha256")):
            t.join(timeout=30)  # bounded: a live iterator's idle threads never end


def _mixture_block(dest: str, view, samples: int):
    """A block of `samples` batches (batch 1) from a 3-source mixture, and the mixture loader."""
    import itertools

    from radforge import loader
    from radforge.config import DataConfig, SourceConfig

    srcs = [SourceConfig(shards=dest, image="ct", weight=w, name=f"s{i}") for i, w in enumerate(MIX_WEIGHTS)]
    mx = loader.build_loader(DataConfig(sources=srcs, num_workers=0, shuffle_buffer=8), view, split="train",
                             batch_size=1, seed=0)

    def run_block():
        for _ in itertools.islice(iter(mx), samples):
            pass

    return run_block, mx


MIX_WEIGHTS = (0.5, 0.3, 0.2)
MIX_SAMPLES = 10_000
MIX_PASSES = 10  # samples per timed mixture block, in passes over the (single) shard set


def _mixture_figures(mx, *, single_s: float, mix_s: float, per_block: int) -> dict:
    """Throughput ratio (same samples per block) and the share errors: after the timed blocks
    (what the run's metrics said) and after MIX_SAMPLES samples of the interleave from the start."""
    import numpy as np

    m = mx.metrics()
    taken = np.bincount(mx.schedule(MIX_SAMPLES, taken=[0] * len(mx.names)), minlength=len(mx.names))
    return {"sources": len(mx.names), "weights": list(MIX_WEIGHTS),
            "samples_per_s_ratio (mixture / single)": round(single_s / mix_s, 3), "target_ratio": 0.9,
            "samples_per_s": {"single": round(per_block / single_s, 2), "mixture": round(per_block / mix_s, 2)},
            "share_error_after_10k": round(float(np.max(np.abs(taken / MIX_SAMPLES - np.asarray(MIX_WEIGHTS)))), 5),
            "target_share_error": 0.01, "samples_timed": int(m["samples"]),
            "share_error_timed": round(max(abs(m[f"mix_{n}_frac"] - w) for n, w in zip(mx.names, MIX_WEIGHTS)), 5)}


def format_stream(r: dict) -> str:
    c = r["corpus"]
    lines = ["radforge bench stream", "=" * 24,
             f"corpus: {c['series']} CT series, {c['slices']} slices of {c['size']}², {c['transfer_syntax']}, {c['source_mb']} MB DICOM "
             f"→ {c['volumes']} volumes in {c['shards']} shard(s), {c['shard_mb']} MB; all read from S3 (moto, 127.0.0.1)", ""]
    lines += _block("volumes/s", r["volumes_per_s"], lambda k, v: f"{k:<26}{v:>10.2f}")
    lines += _block("MB/s", r["mb_per_s"], lambda k, v: f"{k:<26}{v:>10.1f}")
    lines += _block("ratios (target)", r["ratios"], lambda k, v: f"{k:<38}{v:>8.3f}  "
                    f"({_met(v, r['targets'][k]) if k in r['targets'] else 'no target: what verification costs'})")
    cp = r["cpu_s_per_pass"]
    lines += _block("CPU seconds per pass (this process, all threads; independent of other load)", cp,
                    lambda k, v: f"{k:<26}{v:>10.4f}")
    lines.append(f"  {'tar_read / loader (CPU)':<26}{cp['tar_read'] / max(cp['loader'], 1e-9):>10.3f}")
    lines.append(f"machine load (1-min average) before / after the timed passes: {r['load_avg_1min'][0]} / {r['load_avg_1min'][1]}")
    mx = r.get("mixture")
    if mx:
        k = "samples_per_s_ratio (mixture / single)"
        lines.append(f"mixture of {mx['sources']} sources (weights {mx['weights']}): samples/s {mx[k]:.3f} × the single source "
                     f"({_met(mx[k], mx['target_ratio'])}); share error after 10k samples {mx['share_error_after_10k']:.2%} "
                     f"({_met_below(mx['share_error_after_10k'], mx['target_share_error'])}), after the timed "
                     f"{mx['samples_timed']} {mx['share_error_timed']:.2%}")
    lo = r["loader"]
    lines.append(f"loader: input {lo['input_shape']}, {lo['batches_per_pass']} batches/pass, best block of {lo['passes']} passes, "
                 f"skipped {lo['skipped_samples']}, bad shards {lo['bad_shards']}; loader_no_sha256 = data.verify_sha256 off")
    return "\n".join(lines)
