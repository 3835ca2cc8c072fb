"""Benchmarks, reported as ratios measured side by side in one run (never as timed test asserts).

One module per benchmark, each `bench_<name>(**options) -> dict` and `format_<name>(dict) -> str`:

  ingest    the full ingest against single-process baselines (slices/s, CPU ms per slice, memory)
  stream    the shard loader against a plain tar read and a raw-DICOM Dataset, from moto S3
  serve     /v1/embed over HTTP: batched vs unbatched, Serve overhead, the model's own ceiling
            (`--hostile`: valid uploads mixed with crafted ones)
  train     step time and data-wait fraction of the training recipes
  dicomweb  the same corpus ingested from a folder and from Orthanc's DICOMweb plugin
  scale     plan, assign and manifest on 10k-1M synthetic index rows (driver RSS, s/row); S3 listing
  gpu       the GPU recipes' bf16 + nccl path: MFU, data-wait, peak memory vs DeepSpeed's estimate,
            GPU vs CPU decode (`--cpu-dry-run`: the same path on CPU, fp32/gloo, for CI)

`radforge bench NAME` calls `run` and prints `format_result`; `--json` prints the dict.
"""

from __future__ import annotations

from radforge.bench._common import SYNTAXES
from radforge.bench.dicomweb import ORTHANC_BIN, ORTHANC_DICOMWEB_PLUGIN, Orthanc, bench_dicomweb, format_dicomweb
from radforge.bench.gpu import bench_gpu, format_gpu
from radforge.bench.ingest import bench_ingest, format_ingest
from radforge.bench.scale import bench_scale, format_scale
from radforge.bench.serve import bench_serve, bench_serve_hostile, format_serve, format_serve_hostile
from radforge.bench.stream import bench_stream, format_stream
from radforge.bench.train import bench_train, format_train

__all__ = ["SYNTAXES", "ORTHANC_BIN", "ORTHANC_DICOMWEB_PLUGIN", "Orthanc", "run", "format_result", "bench_ingest", "bench_stream",
           "bench_serve", "bench_serve_hostile", "bench_train", "bench_dicomweb", "format_ingest", "format_stream", "format_serve",
           "format_serve_hostile", "format_train", "format_dicomweb", "bench_gpu", "format_gpu", "bench_scale", "format_scale"]


def run(what: str, *, workdir: str | None = None, series: int | None = None, slices: int | None = None, size: int = 512,
        syntax: str = "rle", hostile: bool = False, cpu_dry_run: bool = False, peak_tflops: float | None = None,
        max_rows: int | None = None) -> dict:
    """Run benchmark `what` (names looked up at call time, so a test can replace one)."""
    if hostile and what != "serve":
        from radforge.errors import ConfigError

        raise ConfigError("--hostile is an option of `radforge bench serve` only")
    if (cpu_dry_run or peak_tflops) and what != "gpu":
        from radforge.errors import ConfigError

        raise ConfigError("--cpu-dry-run and --peak-tflops are options of `radforge bench gpu` only")
    if max_rows is not None and what != "scale":
        from radforge.errors import ConfigError

        raise ConfigError("--max-rows is an option of `radforge bench scale` only")
    if what == "scale":
        return bench_scale(workdir=workdir, max_rows=max_rows or 1_000_000)
    if what == "gpu":
        return bench_gpu(workdir=workdir, cpu_dry_run=cpu_dry_run, peak_tflops_override=peak_tflops)
    if what == "serve":
        return bench_serve_hostile(workdir=workdir) if hostile else bench_serve(workdir=workdir)
    if what == "train":
        return bench_train(workdir=workdir)
    if what == "stream":
        return bench_stream(workdir=workdir, series=series or 4, slices=slices or 64, size=size, syntax=syntax)
    if what == "dicomweb":
        return bench_dicomweb(workdir=workdir, series=series or 4, slices=slices or 64, size=size, syntax=syntax)
    if what != "ingest":
        raise ValueError(f"unknown benchmark {what!r}")
    # 1024 slices: enough that per-run fixed costs (a few Ray Data executions, ~0.2 s each) are
    # amortised, small enough for < 2 min on 2 cores.
    return bench_ingest(workdir=workdir, series=series or 8, slices=slices or 128, size=size, syntax=syntax)


_FORMATS = {"serve-hostile": "format_serve_hostile", "serve": "format_serve", "train": "format_train",
            "stream": "format_stream", "dicomweb": "format_dicomweb", "scale": "format_scale", "gpu": "format_gpu"}


def format_result(r: dict) -> str:
    return globals()[_FORMATS.get(r["benchmark"], "format_ingest")](r)
