"""`radforge bench gpu` (make bench-gpu): the GPU recipes' bf16 + nccl path, measured in minutes.

What it runs, on a machine with CUDA GPUs (all of them, one Ray Train worker each):

  train   jobs/recipes/mae-vitb-ct.yaml (3D MAE, ViT-B) and cxr-clip.yaml (CLIP, ViT-B/16 + text
          tower), each ~50 optimizer steps through the real path (radforge.train: Ray Train,
          nccl, one DeepSpeed engine per GPU, the recipe's ZeRO stage and bf16) on a generated
          phantom corpus ingested first (120 patients; kept with --workdir). The recipes are run as
          written except: grad_accum 1 (each step is one micro-batch per GPU, so 50 steps take
          minutes; memory and MFU are a micro-batch's either way), no evaluation, one checkpoint
          at the end, workers = GPUs here, CPUs and loader processes per worker capped to the
          machine, a 32-sample shuffle buffer.
  decode  the same JPEG 2000 CT slices decoded by pydicom on the CPU (the ingest's decoder) and
          by nvImageCodec on the GPU (batched), where `nvidia.nvimgcodec` is installed; the pixels
          are compared.

How to read it. `step s` and `data-wait` are the trainer's own metrics (radforge.train: the
worst rank per step), averaged over the logged windows after the first (start-up excluded);
data-wait is the share of the step spent blocked on the loader, so a high one means the GPUs
wait for CPU decoding and MFU measures the loader, not the model. `TFLOP/s` is model FLOPs per
step ÷ step time per GPU: FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over one
forward + backward of the recipe's model on one real micro-batch, on the meta device (shapes
only: exact matmul/conv/attention FLOPs, no recompute from activation checkpointing, optimizer
and elementwise work not counted). `MFU` divides that by the GPU's dense bf16 tensor-core peak
(PEAK_BF16_TFLOPS by torch.cuda.get_device_name, or --peak-tflops); ViT-B training usually lands
at 0.3-0.5 on A100/H100 when the loader keeps up. `peak MB` is torch.cuda.max_memory_allocated
on rank 0 (what the trainer logs as cuda_max_allocated_mb); `DS est MB` is DeepSpeed's estimate
of the model states per GPU (params + grads + Adam states: estimate_zero3/zero2_model_states_mem_
needs for the recipe's stage, no offload, no zero.Init, as the recipes' headers quote), so
`peak ÷ est` − 1 is roughly the activations' share, which the estimate does not cover.

Without CUDA it refuses ("no CUDA device: ..."). `--cpu-dry-run` runs the same code path on CPU
with fp32 and gloo for 3 steps, with a tiny model (DRY_RUN_SETS), so CI proves the script works:
its figures are the CPU's (peak memory is the rank's host RSS, MFU needs --peak-tflops).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from radforge.bench._common import _block
from radforge.bench.train import phantom_shards, run_recipe, steady_state
from radforge.errors import ConfigError

RECIPES = ("mae-vitb-ct", "cxr-clip")
GPU_STEPS = 50
DRY_RUN_STEPS = 3

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (SXM
# figures where a name does not say PCIe/NVL). First match of the substring in
# torch.cuda.get_device_name wins, so longer names come first (GH200 before H200, A100 before A10).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0), ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A40", 150.0),
    ("A10G", 125.0),  # no NVIDIA datasheet for AWS's A10G: the A10's figure; pass --peak-tflops if you know better
    ("A10", 125.0),
)

# --cpu-dry-run: the recipes' objectives, ZeRO stages, optimizer, schedule, loader and image kinds
# with a model and views small enough for 3 CPU steps in seconds.
DRY_RUN_SETS = ("deepspeed.precision=fp32", "scale.use_gpu=false", "scale.num_workers=1", "scale.cpus_per_worker=1",
                "data.num_workers=0", "data.shuffle_buffer=8", "deepspeed.micro_batch=2", "deepspeed.grad_accum=1",
                "model.preset=tiny", "model.patch_ct=[8,8,8]", "model.patch_xray=16", "model.decoder_width=64",
                "model.decoder_depth=1", "view.ct_size=[16,32,32]", "view.xray_size=64", "model.embed_dim=64",
                "model.text.vocab_size=300", "model.text.max_len=32", "model.text.width=64", "model.text.depth=1",
                "model.text.heads=4")


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name (None: not in PEAK_BF16_TFLOPS)."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern.lower() in device_name.lower():
            return tflops
    return None


def require_cuda() -> tuple[str, int]:
    """(device name, GPU count), or a ConfigError saying why there is no GPU to measure."""
    import torch

    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"no CUDA device: torch {torch.__version__} ({built}) sees no GPU, so there is nothing to "
                          "measure. Run `make bench-gpu` on a GPU machine (install a CUDA build of torch: `make setup "
                          "CONSTRAINTS=`), or `radforge bench gpu --cpu-dry-run` to check the script on CPU.")
    return torch.cuda.get_device_name(0), torch.cuda.device_count()


def bench_gpu(*, workdir: str | None = None, cpu_dry_run: bool = False, peak_tflops_override: float | None = None,
              shards: str | None = None, recipes: tuple[str, ...] = RECIPES, sets: tuple[str, ...] = (),
              decode_slices: int | None = None) -> dict:
    """The figures of the module docstring as a dict (the JSON edge). `shards`: an ingested shard
    set with CT and X-ray samples and reports (default: the phantom corpus, ingested first);
    `sets`: extra recipe overrides applied after the benchmark's own."""
    import ray
    import torch

    if cpu_dry_run:
        device, n_gpu = "cpu (dry run: fp32, gloo)", 0
    else:
        device, n_gpu = require_cuda()
    peak = peak_tflops_override if peak_tflops_override else (peak_tflops(device) if n_gpu else None)
    own = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="radforge-bench-gpu-")
    loadavg = round(os.getloadavg()[0], 2)
    try:
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=max(2, os.cpu_count() or 2), num_gpus=n_gpu, include_dashboard=False,
                     log_to_driver=False, logging_level="WARNING")
        try:
            shards = shards or phantom_shards(root)
            out = {name: _train_figures(name, shards, root, _overrides(name, n_gpu, cpu_dry_run, sets), peak)
                   for name in recipes}
        finally:
            if started:
                ray.shutdown()
        decode = _decode_figures(root, decode_slices or (8 if cpu_dry_run else 128), 64 if cpu_dry_run else 512, n_gpu)
        return {
            "benchmark": "gpu",
            "mode": "cpu-dry-run" if cpu_dry_run else "gpu",
            "device": {"name": device, "count": n_gpu, "peak_bf16_tflops": peak,
                       "peak_source": "--peak-tflops" if peak_tflops_override else ("table" if peak else None),
                       "torch": torch.__version__, "cuda": torch.version.cuda},
            "loadavg_1min": [loadavg, round(os.getloadavg()[0], 2)],
            "recipes": out,
            "decode": decode,
        }
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _overrides(name: str, n_gpu: int, cpu_dry_run: bool, sets: tuple[str, ...]) -> list[str]:
    """The benchmark's recipe overrides (module docstring), then the caller's."""
    from radforge import config
    from radforge.bench.train import RECIPES_DIR
    from radforge.config import TrainRecipe

    if cpu_dry_run:
        return [f"steps={DRY_RUN_STEPS}", "log_every=1", *DRY_RUN_SETS, *sets]
    r = config.load(TrainRecipe, os.path.join(RECIPES_DIR, f"{name}.yaml"))
    cpus = max(1, (os.cpu_count() or 2) // n_gpu - 1)  # one CPU left for the driver and Ray
    cpus_per_worker = min(r.scale.cpus_per_worker, cpus)
    return [f"steps={GPU_STEPS}", f"log_every={GPU_STEPS // 5}", "deepspeed.grad_accum=1", f"scale.num_workers={n_gpu}",
            f"scale.cpus_per_worker={cpus_per_worker}", f"data.num_workers={min(r.data.num_workers, max(0, int(cpus_per_worker) - 1))}",
            "data.shuffle_buffer=32", *sets]


def _train_figures(name: str, shards: str, root: str, sets: list[str], peak: float | None) -> dict:
    """One recipe's run and its figures: steps, timing, FLOPs/MFU, peak memory vs the estimate."""
    r, res = run_recipe(name, shards, root, sets)
    s = steady_state(res.history)
    flops_micro, params, largest = _model_flops(r)
    world = r.scale.num_workers
    flops_step = flops_micro * r.deepspeed.grad_accum  # per rank: every rank runs its own micro-batches
    achieved = flops_step / s["step_time_s"] / 1e12 if s["step_time_s"] > 0 else 0.0
    gpu = r.scale.use_gpu
    peak_mem = max((h.get("cuda_max_allocated_mb" if gpu else "rss_mb", 0.0) for h in res.history), default=0.0)
    est = _zero_estimate_mb(r.deepspeed.zero_stage, params, largest, world, r.deepspeed.offload_optimizer)
    return {
        "steps": res.steps, "workers": world, "zero_stage": r.deepspeed.zero_stage, "precision": r.deepspeed.precision,
        "backend": "nccl" if gpu else "gloo", "micro_batch": r.deepspeed.micro_batch, "global_batch": r.global_batch,
        "params_m": round(params / 1e6, 2),
        "step_time_s": s["step_time_s"], "samples_per_s": round(s["samples_per_s"], 2), "data_wait_frac": s["data_wait_frac"],
        "windows": s["windows"],
        "model_flops_per_step_per_gpu": flops_step, "achieved_tflops_per_gpu": round(achieved, 4),
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_mem_mb": round(peak_mem, 1), "peak_mem_kind": "cuda_max_allocated" if gpu else "host RSS (CPU)",
        "ds_estimate_mb": round(est, 1), "peak / estimate": round(peak_mem / est, 3) if est else None,
    }


def _model_flops(r) -> tuple[int, int, int]:
    """(FLOPs of one forward + backward on one micro-batch, parameters, largest layer's parameters)
    of the recipe's model, counted on the meta device (shapes only; nothing is computed or
    allocated, so ViT-B at the recipe's micro-batch costs nothing here). The micro-batch is a real
    one from the loader (texts of real length), the tokenizer the one the run trained."""
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from radforge import kinds, models
    from radforge.loader import build_loader
    from radforge.models import text as text_mod

    shapes = {k: tuple(kinds.get(k).view(r.view).input_shape) for k in r.data.images()}
    spec = models.get(r.model.kind)
    tokenizer = _run_tokenizer(r) if spec.text_tower and r.model.text.kind == "small" else None
    data = dataclasses.replace(r.data, num_workers=0, shuffle_buffer=1)
    view = text_mod.ReportView.from_config(r.model.text) if spec.text_tower else None
    batch = next(iter(build_loader(data, r.view, split=r.data.train_split, batch_size=r.deepspeed.micro_batch,
                                   seed=r.seed, train=True, text_view=view)))
    with torch.device("meta"):
        model = models.build_multi(r.model, shapes, tokenizer, pretrained=False)
    unique = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in unique.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    meta = {k: (v.to("meta") if torch.is_tensor(v) else v) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        model(meta)["loss"].backward()
    return int(counter.get_total_flops()), params, largest


def _run_tokenizer(r):
    """The BPE tokenizer radforge.train trained for this run (kept beside its checkpoints)."""
    from radforge import checkpoint, storage
    from radforge.models import text as text_mod

    files = checkpoint.run_tokenizer(storage.join(storage.absolute(r.checkpoint.storage_path), r.name))
    with tempfile.TemporaryDirectory() as d:
        for name, data in (files or {}).items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        return text_mod.Tokenizer.load(d)


def _zero_estimate_mb(stage: int, params: int, largest: int, gpus: int, offload: bool) -> float:
    """DeepSpeed's model-states estimate per GPU (MB) for ZeRO `stage` on one node of `gpus`:
    stage 3 → estimate_zero3_model_states_mem_needs, else the stage-1/2 one (stage 0 = one GPU's
    worth: nothing partitioned). No zero.Init: radforge builds the full model on every rank."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpus, cpu_offload=offload,
                                                                cpu_offload_params=False, zero_init=False)
    else:
        _, gpu_bytes = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus if stage else 1, cpu_offload=offload)
    return gpu_bytes / 1e6


def _decode_figures(root: str, slices: int, size: int, n_gpu: int) -> dict:
    """CPU (pydicom) vs GPU (nvImageCodec) decode of the same JPEG 2000 CT slices: slices/s each,
    their ratio and whether the pixels are identical (lossless J2K: they must be)."""
    from pydicom.pixels import pixel_array

    from radforge.bench._common import _ct_corpus

    _, files = _ct_corpus(os.path.join(root, f"decode-{slices}x{size}"), series=1, slices=slices, size=size, syntax="j2k")
    out: dict = {"syntax": "j2k (lossless JPEG 2000)", "slices": len(files), "size": size}
    t, c = time.perf_counter(), time.process_time()
    cpu = [pixel_array(f) for f in files]
    wall, cpu_s = time.perf_counter() - t, time.process_time() - c
    out["cpu_slices_per_s"] = round(len(files) / wall, 1)
    out["cpu_ms_per_slice"] = round(cpu_s / len(files) * 1e3, 3)
    try:
        from nvidia import nvimgcodec
    except ImportError:
        out["gpu"] = "skipped: nvidia.nvimgcodec is not installed (pip install nvidia-nvimgcodec-cu12[all])"
        return out
    if not n_gpu:
        out["gpu"] = "skipped: no CUDA device"
        return out
    out.update(_gpu_decode(nvimgcodec, files, cpu))
    if "gpu_slices_per_s" in out:
        out["gpu / cpu"] = round(out["gpu_slices_per_s"] / out["cpu_slices_per_s"], 2)
    return out


def _gpu_decode(nvimgcodec, files: list[str], reference: list) -> dict:
    """nvImageCodec's batched decode of the slices' J2K frames (best of 3 after a warm-up; the
    frames are extracted from the files first, as an ingest would hand them over), compared with
    the CPU's pixels bit for bit."""
    import numpy as np
    import pydicom
    import torch
    from pydicom.encaps import generate_frames

    frames = [next(generate_frames(pydicom.dcmread(f).PixelData, number_of_frames=1)) for f in files]
    decoder = nvimgcodec.Decoder()
    params = nvimgcodec.DecodeParams(allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED)

    def run():
        images = decoder.decode(frames, params=params)
        # __cuda_array_interface__ syncs the decode stream
        tensors = [torch.as_tensor(im, device="cuda") for im in images if im is not None]
        torch.cuda.synchronize()
        return images, tensors

    failed = sum(im is None for im in run()[0])  # nvImageCodec answers None for a frame it cannot decode
    if failed:
        return {"gpu": f"failed: nvImageCodec decoded {len(frames) - failed} of {len(frames)} J2K frames"}
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        images, _ = run()
        best = min(best, time.perf_counter() - t)
    same, worst = True, 0
    for im, ref in zip(images, reference):
        got = np.asarray(im.cpu()).reshape(ref.shape)
        if got.dtype != ref.dtype and got.dtype.itemsize == ref.dtype.itemsize:
            got = got.view(ref.dtype)  # J2K sign flag vs DICOM PixelRepresentation: same bits
        same = same and np.array_equal(got, ref)
        worst = max(worst, int(np.abs(got.astype(np.int64) - ref.astype(np.int64)).max()))
    return {"gpu_slices_per_s": round(len(frames) / best, 1), "gpu_identical": bool(same), "gpu_max_abs_diff": worst}


def format_gpu(r: dict) -> str:
    d = r["device"]
    peak = f"{d['peak_bf16_tflops']:.0f} TFLOP/s bf16 ({d['peak_source']})" if d["peak_bf16_tflops"] else "peak unknown (--peak-tflops)"
    lines = ["radforge bench gpu", "=" * 24, f"device: {d['name']} × {d['count']}, {peak}; torch {d['torch']}, CUDA {d['cuda']}",
             f"mode: {r['mode']}; load average (1 min) before/after: {r['loadavg_1min'][0]} / {r['loadavg_1min'][1]}", "",
             f"  {'recipe':<13}{'steps':>6}{'ZeRO':>5}{'prec':>6}{'batch':>6}{'step s':>8}{'data-wait':>10}"
             f"{'TFLOP/s':>9}{'MFU':>7}{'peak MB':>10}{'DS est MB':>10}{'peak/est':>9}"]
    for k, v in r["recipes"].items():
        mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "n/a"
        ratio = f"{v['peak / estimate']:.2f}" if v["peak / estimate"] is not None else "n/a"
        lines.append(f"  {k:<13}{v['steps']:>6}{v['zero_stage']:>5}{v['precision']:>6}{v['global_batch']:>6}"
                     f"{v['step_time_s']:>8.3f}{v['data_wait_frac']:>9.1%} {v['achieved_tflops_per_gpu']:>9.2f}{mfu:>7}"
                     f"{v['peak_mem_mb']:>10.0f}{v['ds_estimate_mb']:>10.0f}{ratio:>9}")
    kind = {v["peak_mem_kind"] for v in r["recipes"].values()}
    lines.append(f"  (peak MB: {', '.join(sorted(kind))}; DS est: model states per GPU, activations not included)")
    dec = r["decode"]
    lines += _block(f"decode ({dec['slices']} × {dec['size']}² {dec['syntax']})", {
        "CPU (pydicom)": f"{dec['cpu_slices_per_s']} slices/s, {dec['cpu_ms_per_slice']} CPU ms per slice",
        "GPU (nvImageCodec)": (f"{dec['gpu_slices_per_s']} slices/s ({dec['gpu / cpu']}× CPU), pixels identical: "
                               f"{dec['gpu_identical']} (max |diff| {dec['gpu_max_abs_diff']})") if "gpu_slices_per_s" in dec else dec["gpu"],
    }, lambda k, v: f"{k:<20}{v}")
    return "\n".join(lines)
