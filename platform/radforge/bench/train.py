"""`radforge bench train`, and the recipe runner `radforge bench gpu` shares with it."""

from __future__ import annotations

import os
import shutil
import tempfile

from radforge.bench._common import _block

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                           "jobs", "recipes")


def phantom_shards(root: str, *, n_patients: int = 120) -> str:
    """A generated phantom CT + X-ray corpus (reports, labels) ingested under root/shards, once
    (kept across runs with --workdir). Needs Ray (the ingest is a Ray Data job)."""
    from radforge import config, ingest, phantoms
    from radforge.config import IngestRecipe

    shards = os.path.join(root, "shards")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        c = phantoms.training_corpus(os.path.join(root, "corpus"), n_patients=n_patients)
        rec = config.load(IngestRecipe, None, ["deid.demo_key=true", "shards.target_mb=1"])
        ingest.run(c.dicom_dir, shards, rec, reports=c.reports_csv, labels=c.labels_csv, progress=False)
    return shards


def run_recipe(name: str, shards: str, root: str, sets: list[str] | tuple[str, ...] = ()):
    """Train jobs/recipes/NAME.yaml on `shards` through the real path (radforge.train: Ray Train,
    one DeepSpeed engine per worker) with checkpoints and metrics under `root`, no evaluation and
    no checkpoint before the end; `sets` are further `a.b=v` overrides. -> (recipe, TrainResult)."""
    from radforge import config, train
    from radforge.config import TrainRecipe

    r = config.load(TrainRecipe, os.path.join(RECIPES_DIR, f"{name}.yaml"), [
        f"data.shards={shards}", "checkpoint.every_steps=100000", "eval.split=none",
        f"checkpoint.storage_path={os.path.join(root, 'ckpt')}", f"output_dir={os.path.join(root, 'runs')}", *sets])
    return r, train.run(r, resume="never", progress=False)


def steady_state(history: list[dict]) -> dict:
    """Means over the logged windows after the first (start-up, first shard opens, the shuffle
    buffer filling); the first window alone when there is only one."""
    rows = [h for h in history if "step_time_s" in h]
    rows = rows[1:] or rows
    n = len(rows) or 1
    return {k: round(sum(h[k] for h in rows) / n, 4) for k in ("step_time_s", "samples_per_s", "data_wait_frac")} | {
        "windows": len(rows)}


def bench_train(*, workdir: str | None, steps: int = 40) -> dict:
    """Step time and data-wait fraction of the tiny recipes (jobs/recipes/tiny-*.yaml) on a
    generated phantom corpus, on a local Ray cluster with every CPU. The first log window (start-up,
    first shard opens) is excluded; the rest is steady state. Target: data-wait < 5% of step time
    (the loader keeps up with the model). Timings come from the trainer's own metrics."""
    import ray

    own = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="radforge-bench-train-")
    try:
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        shards = phantom_shards(root)
        out: dict = {}
        for name in ("tiny-mae-ct", "tiny-clip-xray"):
            r, res = run_recipe(name, shards, root, [f"steps={steps}", f"log_every={max(1, steps // 8)}"])
            s = steady_state(res.history)
            out[name] = {
                "workers": r.scale.num_workers, "zero_stage": r.deepspeed.zero_stage, "global_batch": r.global_batch,
                "loader_processes_per_rank": r.data.num_workers,
                "step_time_s": s["step_time_s"], "samples_per_s": round(s["samples_per_s"], 2),
                "data_wait_frac": s["data_wait_frac"],
            }
        if started:
            ray.shutdown()
        return {
            "benchmark": "train",
            "corpus": {"patients": 120, "cpus": os.cpu_count(), "steps": steps, "device": "cpu"},
            "recipes": out,
            "ratios": {f"data_wait / step_time ({k})": v["data_wait_frac"] for k, v in out.items()},
            "targets": {f"data_wait / step_time ({k})": "< 0.05" for k in out},
            "mfu": "n/a on CPU: `radforge bench gpu` (make bench-gpu) measures MFU on a GPU",
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
