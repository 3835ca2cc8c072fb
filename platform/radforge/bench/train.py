"""`radforge bench train`."""

from __future__ import annotations

import os
import shutil
import tempfile

from radforge.bench._common import _block


def bench_train(*, workdir: str | None, steps: int = 40) -> dict:
    """Step time and data-wait fraction of the tiny recipes (jobs/recipes/tiny-*.yaml) on a
    generated phantom corpus, on a local Ray cluster with every CPU. The first log window (start-up,
    first shard opens) is excluded; the rest is steady state. Target: data-wait < 5% of step time
    (the loader keeps up with the model). Timings come from the trainer's own metrics."""
    import ray

    from radforge import config, ingest, phantoms, train
    from radforge.config import IngestRecipe, TrainRecipe

    own = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="radforge-bench-train-")
    recipes_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs", "recipes")
    try:
        shards = os.path.join(root, "shards")
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        if not os.path.exists(os.path.join(shards, "manifest.json")):
            c = phantoms.training_corpus(os.path.join(root, "corpus"), n_patients=120)
            rec = config.load(IngestRecipe, None, ["deid.demo_key=true", "shards.target_mb=1"])
            ingest.run(c.dicom_dir, shards, rec, reports=c.reports_csv, labels=c.labels_csv, progress=False)
        out: dict = {}
        log_every = max(1, steps // 8)
        for name in ("tiny-mae-ct", "tiny-clip-xray"):
            r = config.load(TrainRecipe, os.path.join(recipes_dir, f"{name}.yaml"), [
                f"data.shards={shards}", f"steps={steps}", f"log_every={log_every}", "checkpoint.every_steps=100000",
                "eval.split=none", f"checkpoint.storage_path={os.path.join(root, 'ckpt')}", f"output_dir={os.path.join(root, 'runs')}"])
            res = train.run(r, resume="never", progress=False)
            rows = [h for h in res.history if "step_time_s" in h][1:]  # steady state: drop the first window
            n = sum(1 for _ in rows) or 1
            out[name] = {
                "workers": r.scale.num_workers, "zero_stage": r.deepspeed.zero_stage, "global_batch": r.global_batch,
                "loader_processes_per_rank": r.data.num_workers,
                "step_time_s": round(sum(h["step_time_s"] for h in rows) / n, 4),
                "samples_per_s": round(sum(h["samples_per_s"] for h in rows) / n, 2),
                "data_wait_frac": round(sum(h["data_wait_frac"] for h in rows) / n, 4),
            }
        if started:
            ray.shutdown()
        return {
            "benchmark": "train",
            "corpus": {"patients": 120, "cpus": os.cpu_count(), "steps": steps, "device": "cpu"},
            "recipes": out,
            "ratios": {f"data_wait / step_time ({k})": v["data_wait_frac"] for k, v in out.items()},
            "targets": {f"data_wait / step_time ({k})": "< 0.05" for k in out},
            "mfu": "n/a on CPU (model FLOPs utilisation needs a GPU peak to divide by)",
        }
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def format_train(r: dict) -> str:
    lines = ["radforge bench train", "=" * 24, f"corpus: {r['corpus']['patients']} phantom patients, {r['corpus']['steps']} steps per recipe, {r['corpus']['cpus']} CPUs", ""]
    lines.append(f"  {'recipe':<16}{'workers':>8}{'ZeRO':>6}{'batch':>7}{'step s':>9}{'samples/s':>11}{'data-wait':>11}")
    for k, v in r["recipes"].items():
        lines.append(f"  {k:<16}{v['workers']:>8}{v['zero_stage']:>6}{v['global_batch']:>7}{v['step_time_s']:>9.3f}{v['samples_per_s']:>11.1f}{v['data_wait_frac']:>10.1%}")
    lines += _block("ratios (target)", r["ratios"], lambda k, v: f"{k:<40}{v:>8.3f}  ({r['targets'][k]})")
    lines.append(f"MFU: {r['mfu']}")
    return "\n".join(lines)
