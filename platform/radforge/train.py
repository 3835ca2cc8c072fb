"""Ray Train + DeepSpeed: one DeepSpeed engine per Ray Train worker; the ONE place a DeepSpeed
config is generated (`deepspeed_config`).

    result = train.run(recipe)          # radforge train RECIPE / python -m jobs.train --recipe ...

Shape of a run
--------------
* The driver checks the shard set, trains the CLIP text tokenizer on the training split's reports
  once (workers must agree on one vocabulary) and ships its files in the worker config, then runs
  a Ray Train `TorchTrainer`: `scale.*` → `ScalingConfig`, checkpoints → `RunConfig(storage_path=
  checkpoint.storage_path, name=recipe.name)` (any fsspec URL; remote URLs go through
  `storage.pyarrow_filesystem`, so a custom S3 endpoint works), `FailureConfig(max_failures)`,
  `CheckpointConfig(num_to_keep=keep_last)`.
* Each worker streams its share of the shards (`radforge.loader`, rank/world size/seed passed in),
  builds the model (`radforge.models.build`) and `deepspeed.initialize`s it with the generated
  config. Gradient accumulation, ZeRO partitioning, clipping and mixed precision are DeepSpeed's;
  the loop only feeds micro-batches and measures.
* Every `checkpoint.every_steps` and at the end, every rank writes into its own local directory
  its DeepSpeed shard (`engine.save_checkpoint`), its loader position, and rank 0 the step, recipe,
  profile and tokenizer; `ray.train.report(checkpoint=...)` merges the ranks' directories into one
  checkpoint under the storage path and keeps the last K.

Resume
------
`resume="auto"` (default): Ray Train v2 restores a run from `storage_path/name` when one exists
(its checkpoint-manager snapshot), and a restarted worker group after a failure does the same:
`ray.train.get_checkpoint()` is the latest checkpoint, and the loop continues at its step with each
rank's loader position, so the sample sequence continues exactly (same world size). The MAE mask
RNG is reseeded from (seed, step, rank) every micro-step, so a resumed run draws the same masks as
an uninterrupted one. `resume="never"` deletes `storage_path/name` (the run's old checkpoints) and
its metrics first. Resuming with a different number of workers is refused: ZeRO optimizer shards
are laid out per rank (export the checkpoint and start a new run with `model.init_from` instead).

Learning-rate schedule: linear warmup over `optim.warmup_steps`, then cosine to `lr × min_lr_ratio`
at `steps`, a `LambdaLR` DeepSpeed steps once per optimizer step; the lr at step k is the same for
every ZeRO stage and world size (it depends on k only). Metrics record the lr the optimizer used.

Metrics (every `log_every` steps, rank 0): loss (mean over ranks and micro-batches), lr, samples/s,
step time, data-wait fraction (time blocked on the loader / step time, worst rank), gradient norm
(before clipping), memory (RSS; CUDA max allocated), loader counters (skipped samples, bad shards,
summed over ranks). They go to `ray.train.report`, `OUTPUT/NAME/metrics.jsonl` and TensorBoard
event files in `OUTPUT/NAME/tb`; `OUTPUT/NAME/loss.png` is drawn at the end.

Test/debug hooks read from the driver's environment and forwarded to workers:
`RADFORGE_TRACE_SAMPLES=1` writes the sample keys of every step per rank to
`OUTPUT/NAME/samples/rank-R.jsonl` (keys are pseudonyms); `RADFORGE_FAULT_AT=STEP:RANK:MARKER`
makes that rank kill its own process (`os._exit`) when it reaches STEP, once (MARKER is a file
created just before), a real fault for Ray Train's restart path.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from radforge import config, kinds, storage
from radforge.config import TrainRecipe
from radforge.errors import ConfigError

_FORWARDED_ENV = ("RADFORGE_TRACE_SAMPLES", "RADFORGE_FAULT_AT")
MAX_TOKENIZER_TEXTS = 50_000  # reports read to train the BPE vocabulary (it saturates well before)
STATE = "state.json"


@dataclass
class TrainResult:
    name: str
    steps: int  # optimizer steps completed
    checkpoint: str | None  # URL of the latest checkpoint (input of `checkpoint.export`)
    metrics: dict  # the last reported metrics (rank 0)
    run_dir: str  # metrics.jsonl, tb/, loss.png
    curve_png: str | None
    history: list[dict] = field(default_factory=list)  # every logged metrics row


# --------------------------------------------------------------------------------------------
# DeepSpeed config and schedule: the only place these are made


def deepspeed_config(recipe: TrainRecipe) -> dict:
    """The DeepSpeed config for `recipe`. Batch sizes come from the recipe alone:
    micro_batch × grad_accum × num_workers = train_batch_size (DeepSpeed checks the identity).

    The optimizer is DeepSpeed's "AdamW" section: `torch_adam` (plain torch.optim.AdamW, no op to
    compile, CPU-friendly) unless the optimizer is offloaded, where DeepSpeed picks its CPU Adam
    (a compiled op; the reason to offload at all). Parameter groups (no weight decay on biases and
    norms) are passed to `deepspeed.initialize`.
    """
    ds, opt = recipe.deepspeed, recipe.optim
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=recipe.scale.use_gpu, contiguous_gradients=True)
    if ds.zero_stage == 3:
        # No 16-bit gather at save time: export consolidates the fp32 shards itself.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": recipe.scale.use_gpu}
    cfg: dict[str, Any] = {
        "train_batch_size": recipe.global_batch,
        "train_micro_batch_size_per_gpu": ds.micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": 1e-8, "weight_decay": opt.weight_decay,
                       "torch_adam": not ds.offload_optimizer},
        },
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # our own metrics; DeepSpeed's prints would interleave
        "wall_clock_breakdown": False,
    }
    return cfg


def lr_factor(recipe: TrainRecipe, step: int) -> float:
    """Multiplier of optim.lr for optimizer step `step` (0-based): linear warmup, cosine decay."""
    o = recipe.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    span = max(1, recipe.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Driver


def run(recipe: TrainRecipe, *, resume: str = "auto", progress: bool = True) -> TrainResult:
    """Train `recipe` on the Ray cluster this process is connected to (a local one is started
    when none is). Blocks until done; worker failures are retried from the last checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from radforge import shardspec

    if resume not in ("auto", "never"):
        raise ConfigError(f"resume must be auto or never, got {resume!r}")
    manifest = shardspec.read_manifest(recipe.data.shards)
    splits = manifest["totals"].get("by_split", {})
    if recipe.data.train_split not in splits:
        raise ConfigError(f"shard set {recipe.data.shards} has no {recipe.data.train_split!r} split (has: {', '.join(splits) or 'none'})")
    # Absolute URLs: workers run elsewhere (another cwd, another node).
    store = storage.absolute(recipe.checkpoint.storage_path)
    recipe = config.from_dict(TrainRecipe, {**config.to_dict(recipe),
                                            "data": {**config.to_dict(recipe.data), "shards": storage.absolute(recipe.data.shards)},
                                            "output_dir": storage.absolute(recipe.output_dir)})
    run_store = storage.join(store, recipe.name)
    run_dir = storage.join(recipe.output_dir, recipe.name)
    if resume == "never":
        for url in (run_store, run_dir):
            if storage.exists(url):
                storage.remove(url, recursive=True)
    storage.check_writable(store)
    storage.makedirs(run_dir)
    tokenizer_files = _prepare_tokenizer(recipe, manifest, run_store)

    if not ray.is_initialized():
        ray.init(logging_level="WARNING", log_to_driver=progress)
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    if not recipe.scale.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    resources = {"CPU": recipe.scale.cpus_per_worker, **recipe.scale.resources_per_worker}
    if recipe.scale.use_gpu:
        resources["GPU"] = recipe.scale.gpus_per_worker
    pa_fs, pa_path = storage.pyarrow_filesystem(store)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"recipe": config.to_dict(recipe), "tokenizer": tokenizer_files, "profile": manifest["profile"],
                           "run_dir": run_dir, "progress": progress},
        torch_config=TorchConfig(backend="nccl" if recipe.scale.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=recipe.scale.num_workers, use_gpu=recipe.scale.use_gpu,
                                     resources_per_worker=resources, placement_strategy=recipe.scale.placement_strategy),
        run_config=RunConfig(
            name=recipe.name, storage_path=pa_path, storage_filesystem=pa_fs,
            failure_config=FailureConfig(max_failures=recipe.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.checkpoint.keep_last),
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    ckpt_url = None
    if result.checkpoint is not None:
        ckpt_url = _to_url(store, pa_path, result.checkpoint.path)
    history = read_metrics(run_dir)
    curve = None
    if history:
        curve = storage.join(run_dir, "loss.png")
        write_loss_curve(history, curve, title=recipe.name)
    metrics = dict(result.metrics or {})
    return TrainResult(name=recipe.name, steps=int(metrics.get("step", 0)), checkpoint=ckpt_url, metrics=metrics,
                       run_dir=run_dir, curve_png=curve, history=history)


def _to_url(store: str, pa_path: str, path: str) -> str:
    """Ray reports checkpoint paths inside its pyarrow filesystem; map back to our URL."""
    path = path.rstrip("/")
    base = pa_path.rstrip("/")
    if path.startswith(base):
        return storage.join(store, path[len(base):].lstrip("/"))
    return path


def _prepare_tokenizer(recipe: TrainRecipe, manifest: dict, run_store: str) -> dict[str, bytes] | None:
    """CLIP with a small text tower: one BPE vocabulary for all workers and every resume, trained
    once on the driver from the training split's reports and kept in the run's storage folder."""
    if recipe.model.kind != "clip" or recipe.model.text.kind != "small":
        return None
    from radforge import shardspec
    from radforge.models import text

    saved = storage.join(run_store, "tokenizer")
    if storage.exists(saved):
        return {storage.basename(u): storage.read_bytes(u) for u, _ in storage.find_files(saved)}

    def reports():
        n = 0
        for raw in shardspec.iter_samples(recipe.data.shards, manifest, split=recipe.data.train_split):
            if "txt" in raw:
                yield raw["txt"].decode("utf-8")
                n += 1
                if n >= MAX_TOKENIZER_TEXTS:
                    return

    tok = text.train_tokenizer(reports(), recipe.model.text)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        files = {}
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                files[name] = f.read()
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(saved, name), data)
    return files


def read_metrics(run_dir: str) -> list[dict]:
    url = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


def write_loss_curve(history: list[dict], url: str, *, title: str = "") -> None:
    """Loss (log scale) and learning rate against optimizer step; eval metrics as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], color="#1f77b4", lw=1.6, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if rows and min(h["loss"] for h in rows) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([h["step"] for h in rows], [h["lr"] for h in rows], color="#ff7f0e", lw=1, ls="--", label="learning rate")
    ax2.set_ylabel("learning rate")
    evals = [h for h in history if "eval_mean_auroc" in h or "eval_recon_loss" in h]
    if evals:
        key = "eval_mean_auroc" if "eval_mean_auroc" in evals[-1] else "eval_recon_loss"
        ax3 = ax.twinx()
        ax3.spines["right"].set_position(("axes", 1.22))  # clear of the learning-rate axis' tick labels
        ax3.plot([h["step"] for h in evals], [h[key] for h in evals], "o-", color="#2ca02c", label=key.replace("_", " "))
        ax3.set_ylabel(key.replace("_", " "))
    handles = sum((a.get_legend_handles_labels()[0] for a in fig.axes), [])
    # Lower left: loss and learning rate start high and fall, so that corner stays empty.
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    ax.set_title(f"radforge train: {title}")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, "loss.png")
        fig.savefig(local)
        plt.close(fig)
        storage.put_file_atomic(local, url)


# --------------------------------------------------------------------------------------------
# Worker


def _worker_loop(cfg: dict) -> None:
    """One Ray Train worker: loader + model + DeepSpeed engine, steps, metrics, checkpoints."""
    import ray.train
    import torch

    recipe = config.from_dict(TrainRecipe, cfg["recipe"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    w = _Worker(recipe, rank, world, cfg)
    try:
        w.train()
    finally:
        w.close()
    del torch


class _Worker:
    def __init__(self, recipe: TrainRecipe, rank: int, world: int, cfg: dict):
        import deepspeed
        import ray.train
        import torch

        from radforge import loader as loader_mod
        from radforge import models

        self.recipe, self.rank, self.world = recipe, rank, world
        self.run_dir, self.profile, self.progress = cfg["run_dir"], cfg["profile"], cfg["progress"]
        self.tokenizer_files = cfg["tokenizer"]
        ds = recipe.deepspeed
        if recipe.scale.use_gpu:
            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            # Ray gives each worker its CPU share; torch would otherwise start one thread per core
            # in every worker and they would fight over the same cores.
            torch.set_num_threads(max(1, int(recipe.scale.cpus_per_worker)))
        deepspeed.init_distributed(dist_backend="nccl" if recipe.scale.use_gpu else "gloo")
        import ray

        nodes: list = [None] * world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        self.nodes = nodes  # node id per rank (placement is checked by tests, reported as a count)

        self.step, loader_state, self.ckpt_dir, state = 0, None, None, None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            self.ckpt_dir = ckpt.to_directory()
            with open(os.path.join(self.ckpt_dir, STATE)) as f:
                state = json.load(f)
            if state["world_size"] != world:
                raise ConfigError(f"checkpoint was written by {state['world_size']} workers, this run has {world}: "
                                  "resume with the same scale.num_workers, or export it and start a new run with model.init_from")
            with open(os.path.join(self.ckpt_dir, "loader", f"rank-{rank:05d}.json")) as f:
                loader_state = json.load(f)
            self.step = int(state["step"])

        self.tokenizer = _tokenizer_from_files(self.tokenizer_files)
        self.view = kinds.get(recipe.data.image).view(recipe.view)
        torch.manual_seed(recipe.seed)  # same initial weights on every rank
        # pretrained: outside weights (model.init_from, an HF text tower) only for a fresh start;
        # a resumed run gets every weight from its checkpoint.
        model = models.build(recipe.model, recipe.data.image, self.view.input_shape, self.tokenizer,
                             pretrained=ckpt is None, activation_checkpointing=ds.activation_checkpointing)
        self.scalars = _scalars_as_vectors(model)
        self.loader = loader_mod.build_loader(
            recipe.data, recipe.view, split=recipe.data.train_split, batch_size=ds.micro_batch, rank=rank,
            world_size=world, seed=recipe.seed, train=True, findings=recipe.eval.findings or None, state=loader_state)
        self.findings = list(self.loader.findings)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=_param_groups(model, recipe.optim.weight_decay),
            config=deepspeed_config(recipe),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(recipe, s)))
        if self.ckpt_dir is not None:
            path, _ = self.engine.load_checkpoint(os.path.join(self.ckpt_dir, "ds"), tag=state["tag"])
            if path is None:
                raise RuntimeError("DeepSpeed could not load the checkpoint's engine state")
        self.sink = _MetricsSink(self.run_dir, resume_step=self.step) if rank == 0 else None
        self.trace = None
        if os.environ.get("RADFORGE_TRACE_SAMPLES"):
            self.trace = _Trace(self.run_dir, rank, self.nodes[rank], self.step)
        self.fault = _Fault.from_env(rank)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        import torch

        r = self.recipe
        accum = r.deepspeed.grad_accum
        it = iter(self.loader)
        window = {"time": 0.0, "wait": 0.0, "steps": 0}
        last_saved = self.step
        if self.rank == 0 and self.progress:
            print(f"[radforge train] {r.name}: steps {self.step}→{r.steps}, {self.world} worker(s), ZeRO-{r.deepspeed.zero_stage}, "
                  f"global batch {r.global_batch} = {r.deepspeed.micro_batch} × {accum} × {self.world}", flush=True)
        while self.step < r.steps:
            if self.fault is not None:
                self.fault.maybe_die(self.step)
            t0 = time.perf_counter()
            wait, losses, keys = 0.0, [], []
            lr_used, grad_norm = None, None
            for micro in range(accum):
                tw = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:  # one pass ended (train loaders normally never end)
                    it = iter(self.loader)
                    batch = next(it)
                wait += time.perf_counter() - tw
                keys.extend(batch["key"])
                batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
                # MAE masks (torch's global RNG) are a function of (seed, step, micro, rank): a
                # resumed run draws what the uninterrupted one would have.
                torch.manual_seed(_mix(r.seed, self.step, micro, self.rank))
                out = self.engine(batch)
                loss = out["loss"]
                self.engine.backward(loss)
                if micro == accum - 1:
                    lr_used = self.optimizer.param_groups[0]["lr"]
                    if r.deepspeed.zero_stage == 0:
                        grad_norm = _grad_norm(self.engine.module)
                self.engine.step()
                losses.append(loss.detach().float())
            self.step += 1
            if grad_norm is None:
                g = self.engine.get_global_grad_norm()
                grad_norm = float(g) if g is not None else float("nan")
            # one small all-reduce per step: loss (mean), wait and time (worst rank)
            dt = time.perf_counter() - t0
            red = torch.stack([torch.stack(losses).mean().cpu(), torch.tensor(float(wait)), torch.tensor(float(dt))])
            sums = red[:1].clone()
            torch.distributed.all_reduce(sums)
            maxes = red[1:].clone()
            torch.distributed.all_reduce(maxes, op=torch.distributed.ReduceOp.MAX)
            window["time"] += float(maxes[1])
            window["wait"] += float(maxes[0])
            window["steps"] += 1
            if self.trace is not None:
                self.trace.write(self.step, keys)
            metrics = None
            if self.step % r.log_every == 0 or self.step == r.steps:
                metrics = self._metrics(float(sums[0]) / self.world, lr_used, grad_norm, window)
                window = {"time": 0.0, "wait": 0.0, "steps": 0}
            if r.eval.every_steps and self.step % r.eval.every_steps == 0 and self.step < r.steps:
                metrics = {**(metrics or {"step": self.step}), **self._evaluate()}
            if self.step == r.steps:
                metrics = {**(metrics or {"step": self.step}), **self._evaluate()}
            if self.step % r.checkpoint.every_steps == 0 or self.step == r.steps:
                self._save(metrics or {"step": self.step})
                last_saved = self.step
            elif metrics is not None:
                self._report(metrics)
        if last_saved != self.step:  # resumed at the end already
            self._save({"step": self.step})

    def _metrics(self, loss: float, lr: float, grad_norm: float, window: dict) -> dict:
        import psutil
        import torch

        lm = self.loader.metrics()
        counters = torch.tensor([float(lm.get("skipped_samples", 0)), float(lm.get("bad_shards", 0))])
        torch.distributed.all_reduce(counters)
        n = max(1, window["steps"])
        m = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": self.recipe.global_batch * n / max(window["time"], 1e-9),
            "step_time_s": window["time"] / n,
            "data_wait_frac": window["wait"] / max(window["time"], 1e-9),
            "rss_mb": psutil.Process().memory_info().rss / 1e6,
            "skipped_samples": int(counters[0]),
            "bad_shards": int(counters[1]),
            "nodes": len(set(self.nodes)),
        }
        if self.recipe.scale.use_gpu:
            m["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 1e6
        if self.sink is not None:
            self.sink.write(m)
            if self.progress:
                print(f"[radforge train] step {self.step}/{self.recipe.steps}  loss {loss:.4f}  lr {lr:.2e}  "
                      f"{m['samples_per_s']:.1f} samples/s  data-wait {m['data_wait_frac']:.0%}  "
                      f"grad-norm {grad_norm:.3g}  rss {m['rss_mb']:.0f} MB", flush=True)
        return m

    def _evaluate(self) -> dict:
        """In-loop evaluation on rank 0 with a plain copy of the current weights while the other
        ranks wait. Needs radforge.evaluate and the eval split; otherwise nothing."""
        import importlib.util

        import torch

        from radforge import shardspec

        if importlib.util.find_spec("radforge.evaluate") is None:
            return {}
        m = shardspec.read_manifest(self.recipe.data.shards)
        if self.recipe.eval.split not in m["totals"].get("by_split", {}):
            return {}
        from radforge import checkpoint, evaluate

        live = self._plain_copy()
        out: dict = {}
        if self.rank == 0:
            lm = checkpoint.LoadedModel(
                model=live, kind=self.recipe.model.kind, image=self.recipe.data.image, view=self.recipe.view,
                profile=self.profile, model_id=f"{self.recipe.name}@{self.step}", findings=self.findings,
                prompts={"positive": self.recipe.eval.positive_prompt, "negative": self.recipe.eval.negative_prompt},
                device=str(self.device))
            with torch.no_grad():
                res = evaluate.run(lm, self.recipe.data.shards, split=self.recipe.eval.split, cfg=self.recipe.eval)
            for k in ("mean_auroc", "recon_loss"):
                if res.get(k) is not None and not (isinstance(res[k], float) and math.isnan(res[k])):
                    out[f"eval_{k}"] = float(res[k])
            for d, ks in (res.get("recall") or {}).items():
                if isinstance(ks, dict):
                    out.update({f"eval_recall_{d}@{k}": float(v) for k, v in ks.items() if v is not None})
            if self.sink is not None and out:
                self.sink.write({"step": self.step, **out})
                if self.progress:
                    print(f"[radforge train] eval @ step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in out.items()), flush=True)
        torch.distributed.barrier()
        return out

    def _plain_copy(self):
        """Rank 0: a plain (non-DeepSpeed) copy of the current weights, for evaluation. Under
        ZeRO-3 the engine's module fetches partitions in forward hooks, a collective the other
        ranks would have to join; gathering once (every rank) into a copy avoids that and works
        the same for every stage. None on other ranks."""
        import deepspeed

        from radforge import models

        module = self.engine.module
        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) \
            if self.recipe.deepspeed.zero_stage == 3 else _Null()
        state = None
        with gather:
            if self.rank == 0:
                state = {n: (p.detach().reshape(()) if n in self.scalars else p.detach()).clone().cpu()
                         for n, p in module.named_parameters()}
                state.update({n: b.detach().clone().cpu() for n, b in module.named_buffers()})
        if self.rank != 0:
            return None
        copy = models.build(self.recipe.model, self.recipe.data.image, self.view.input_shape, self.tokenizer, pretrained=False)
        copy.load_state_dict(state, strict=False)
        return copy.to(self.device).eval()

    def _report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(_clean(metrics))

    def _save(self, metrics: dict) -> None:
        """Every rank: DeepSpeed shard + loader position into its own local dir; rank 0 also the
        step, recipe, profile and tokenizer. Ray Train merges the ranks' dirs into one checkpoint."""
        import ray.train
        from ray.train import Checkpoint

        tag = f"step{self.step:08d}"
        with tempfile.TemporaryDirectory(prefix="radforge-ckpt-") as d:
            self.engine.save_checkpoint(os.path.join(d, "ds"), tag=tag)
            os.makedirs(os.path.join(d, "loader"), exist_ok=True)
            with open(os.path.join(d, "loader", f"rank-{self.rank:05d}.json"), "w") as f:
                json.dump(self.loader.state_dict(), f)
            if self.rank == 0:
                state = {"step": self.step, "tag": tag, "world_size": self.world, "recipe": config.to_dict(self.recipe),
                         "profile": self.profile, "findings": self.findings, "kind": self.recipe.model.kind,
                         "image": self.recipe.data.image, "zero_stage": self.recipe.deepspeed.zero_stage,
                         "scalar_params": self.scalars}
                with open(os.path.join(d, STATE), "w") as f:
                    json.dump(state, f, indent=1)
                if self.tokenizer_files:
                    os.makedirs(os.path.join(d, "tokenizer"))
                    for name, data in self.tokenizer_files.items():
                        with open(os.path.join(d, "tokenizer", name), "wb") as f:
                            f.write(data)
            if self.sink is not None:
                self.sink.flush()
            ray.train.report(_clean(metrics), checkpoint=Checkpoint.from_directory(d))

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.trace is not None:
            self.trace.close()
        if self.ckpt_dir and os.path.isdir(self.ckpt_dir):
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _clean(m: dict) -> dict:
    return {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}


def _mix(*xs: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1)[0])


def _grad_norm(module) -> float:
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _scalars_as_vectors(model) -> list[str]:
    """0-dim parameters (CLIP's logit_scale) become shape [1] for DeepSpeed, whose model broadcast
    (0.19.8) views every parameter as bytes, which torch refuses for 0-dim tensors. Broadcasting
    keeps the maths identical; state_dict hooks keep the checkpointed module state 0-dim, and
    state.json lists the names so export restores the shape in ZeRO-consolidated weights too."""
    import torch

    names = []
    for mod_name, mod in model.named_modules():
        for n, p in list(mod._parameters.items()):
            if p is not None and p.dim() == 0:
                mod._parameters[n] = torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
                names.append(f"{mod_name}.{n}" if mod_name else n)
    if names:
        wanted = set(names)

        def squeeze(module, state, prefix, local_metadata):
            for k in list(state):
                # ZeRO-3 module states hold empty placeholders: only whole values are reshaped
                if k.startswith(prefix) and k[len(prefix):] in wanted and state[k].numel() == 1:
                    state[k] = state[k].reshape(())
            return state

        def unsqueeze(state, prefix, *args):
            for k in list(state):
                if k.startswith(prefix) and k[len(prefix):] in wanted and state[k].dim() == 0:
                    state[k] = state[k].reshape(1)

        model._register_state_dict_hook(squeeze)
        model._register_load_state_dict_pre_hook(unsqueeze)
    return names


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings' scalars (ndim < 2) and the CLIP temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _tokenizer_from_files(files: dict[str, bytes] | None):
    if not files:
        return None
    from radforge.models import text

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        return text.Tokenizer.load(d)


class _MetricsSink:
    """metrics.jsonl + TensorBoard events under OUTPUT/NAME. Local directories are written in place;
    a remote OUTPUT is staged locally and uploaded at every checkpoint and at the end."""

    def __init__(self, run_dir: str, resume_step: int):
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir
        self.local = storage.is_local(run_dir)
        self.dir = storage.url_to_fs(run_dir)[1] if self.local else tempfile.mkdtemp(prefix="radforge-metrics-")
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, "metrics.jsonl")
        old = [] if self.local or not storage.exists(storage.join(run_dir, "metrics.jsonl")) else \
            storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode().splitlines()
        if self.local and os.path.exists(path):
            with open(path) as f:
                old = f.read().splitlines()
        # a resumed run rewrites what came after its checkpoint, so the curve has no doubled steps
        keep = [ln for ln in old if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        with open(path, "w") as f:
            f.writelines(ln + "\n" for ln in keep)
        self.f = open(path, "a")
        self.tb = SummaryWriter(logdir=os.path.join(self.dir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, m: dict) -> None:
        self.f.write(json.dumps({"time": round(time.time(), 3), **_clean(m)}) + "\n")
        self.f.flush()
        for k, v in m.items():
            if k != "step" and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                self.tb.add_scalar(f"train/{k}" if not k.startswith("eval_") else f"eval/{k[5:]}", v, m["step"])

    def flush(self) -> None:
        self.f.flush()
        self.tb.flush()
        if not self.local:
            for root, _, files in os.walk(self.dir):
                for name in files:
                    p = os.path.join(root, name)
                    storage.put_file_atomic(p, storage.join(self.run_dir, os.path.relpath(p, self.dir)))

    def close(self) -> None:
        self.flush()
        self.f.close()
        self.tb.close()


class _Trace:
    """Sample keys consumed per step and rank (RADFORGE_TRACE_SAMPLES=1)."""

    def __init__(self, run_dir: str, rank: int, node: str, resume_step: int):
        d = os.path.join(storage.url_to_fs(run_dir)[1], "samples")
        os.makedirs(d, exist_ok=True)
        self.node = node
        path = os.path.join(d, f"rank-{rank:05d}.jsonl")
        keep = []
        if os.path.exists(path):  # a resumed run replays the steps after its checkpoint
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
        with open(path, "w") as f:
            f.writelines(keep)
        self.f = open(path, "a")

    def write(self, step: int, keys: list[str]) -> None:
        self.f.write(json.dumps({"step": step, "keys": list(keys), "node": self.node}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class _Fault:
    """RADFORGE_FAULT_AT=STEP:RANK:MARKER: that rank dies at STEP once (the marker records it)."""

    def __init__(self, step: int, marker: str):
        self.at, self.marker = step, marker

    @classmethod
    def from_env(cls, rank: int):
        spec = os.environ.get("RADFORGE_FAULT_AT")
        if not spec:
            return None
        step, r, marker = spec.split(":", 2)
        return cls(int(step), marker) if int(r) == rank else None

    def maybe_die(self, step: int) -> None:
        if step == self.at and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(step))
            os._exit(17)
