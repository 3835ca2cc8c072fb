"""Ray Train + DeepSpeed: one DeepSpeed engine per Ray Train worker; the ONE place a DeepSpeed
config is generated (`deepspeed_config`).

    result = train.run(recipe)          # radforge train RECIPE / python -m jobs.train --recipe ...

Shape of a run
--------------
* The driver checks the shard set, trains the text tokenizer of objectives with a small text
  tower on the training split's reports once (workers must agree on one vocabulary) and ships its
  files in the worker config, then runs a Ray Train `TorchTrainer`: `scale.*` → `ScalingConfig`,
  checkpoints → `RunConfig(storage_path=checkpoint.storage_path, name=recipe.name)` (any fsspec
  URL; remote URLs go through `storage.pyarrow_filesystem`, so a custom S3 endpoint works),
  `FailureConfig(max_failures)`, `CheckpointConfig(num_to_keep=keep_last)`.
* Each worker builds a `Trainer` from components: the loader (`radforge.loader`, rank/world
  size/seed passed in), the model (`radforge.models.build`) in a DeepSpeed engine made from the
  generated config, a `Checkpointer`, a `Metrics` logger (rank 0 writes through a `MetricsSink`),
  a `Validator` and the test hooks. Gradient accumulation, ZeRO partitioning, clipping and mixed
  precision are DeepSpeed's; the loop only feeds micro-batches and measures.
* Every `checkpoint.every_steps` and at the end, every rank saves a `checkpoint.RunState` (its
  DeepSpeed shard and loader position; the step, recipe, profile, findings and the text tower's
  tokenizer) into its own local directory with `checkpoint.save` (radforge.checkpoint owns the
  layout); `ray.train.report(checkpoint=...)` merges the ranks' directories into one checkpoint
  under the storage path and keeps the last K.

Resume
------
`resume="auto"` (default): Ray Train v2 restores a run from `storage_path/name` when one exists
(its checkpoint-manager snapshot), and a restarted worker group after a failure does the same:
`ray.train.get_checkpoint()` is the latest checkpoint (or the newest complete one on storage when
that has more steps: a worker group that dies right after a checkpoint can leave it uploaded but
not yet registered in Ray's snapshot), and the loop continues at its step with each rank's loader position, so the sample sequence continues exactly (same world size). The MAE mask
RNG is reseeded from (seed, step, rank) every micro-step, so a resumed run draws the same masks as
an uninterrupted one. `resume="never"` deletes `storage_path/name` (the run's old checkpoints) and
its metrics first. Resuming with a different number of workers (elastic): ZeRO optimizer shards
are laid out per rank, so `checkpoint.load_engine` converts them into a DeepSpeed universal checkpoint and the
engine is built with `load_universal` (`deepspeed_config`); the loader re-plans the rest of the
epoch over the samples not yet consumed (no sample of the epoch repeated).

Learning-rate schedule: linear warmup over `optim.warmup_steps`, then cosine to `lr × min_lr_ratio`
at `steps`, a `LambdaLR` DeepSpeed steps once per optimizer step; the lr at step k is the same for
every ZeRO stage and world size (it depends on k only). Metrics record the lr the optimizer used.

Metrics (every `log_every` steps, rank 0): loss (mean over ranks and micro-batches), lr, samples/s,
step time, data-wait fraction (time blocked on the loader / step time, worst rank), gradient norm
(before clipping), memory (RSS; CUDA max allocated), loader counters (skipped samples, bad shards,
summed over ranks); with `data.sources` each source's realised and target share of the batches
(`mix_<name>_frac`, `mix_<name>_target`, `mix_<name>_epoch`) and, when the sources mix image
kinds, each kind's mean loss over the window (`loss_ct`, `loss_xray`). They go to `ray.train.report`,
`OUTPUT/NAME/metrics.jsonl` and TensorBoard event files in `OUTPUT/NAME/tb`; `OUTPUT/NAME/loss.png`
is drawn at the end.

CT + X-ray in one run: sources of both kinds build one model (`models.build_multi`: a patch
embedding per kind, the rest shared); each batch is one source's, so one kind, and the mixture's
interleave is a function of the counts, so every rank takes the same kind at the same step and
runs the same graph (ZeRO's collectives stay aligned).

Test/debug hooks are passed in, never read from the environment: `run(recipe, hooks=[...])`
with picklable `Hook` objects that travel to every worker in the worker config.
`TraceSamples()` writes the sample keys of every step per rank to `OUTPUT/NAME/samples/rank-R.jsonl`
(keys are pseudonyms); `KillAt(step, rank, marker)` makes that rank kill its own process
(`os._exit`) when it reaches `step`, once (`marker` is a file created just before), a real fault
for Ray Train's restart path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from radforge import checkpoint, kinds, storage
from radforge.config import TrainRecipe
from radforge.errors import ConfigError
from radforge.transforms import Profile

MAX_TOKENIZER_TEXTS = 50_000  # reports read to train the BPE vocabulary (it saturates well before)
METRICS = "metrics.jsonl"  # under OUTPUT/NAME, beside tb/ and loss.png


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


def deepspeed_config(recipe: TrainRecipe, *, load_universal: bool = False) -> dict:
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
    if load_universal:  # resuming a checkpoint of another world size (checkpoint.needs_universal)
        cfg["checkpoint"] = {"load_universal": True}
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


def run(recipe: TrainRecipe, *, resume: str = "auto", progress: bool = True, hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train `recipe` on the Ray cluster this process is connected to (a local one is started
    when none is). Blocks until done; worker failures are retried from the last checkpoint.
    `hooks`: test/debug `Hook`s run by every worker (picklable; see the module docstring)."""
    import ray

    if resume not in ("auto", "never"):
        raise ConfigError(f"resume must be auto or never, got {resume!r}")
    manifest = _read_train_split(recipe)
    # Absolute URLs: workers run elsewhere (another cwd, another node).
    sources = [dataclasses.replace(s, shards=storage.absolute(s.shards)) for s in recipe.data.sources]
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, shards=storage.absolute(recipe.data.shards),
                                                                  sources=sources),
                                 output_dir=storage.absolute(recipe.output_dir))
    store = storage.absolute(recipe.checkpoint.storage_path)
    run_store = storage.join(store, recipe.name)
    run_dir = storage.join(recipe.output_dir, recipe.name)
    if resume == "never":
        for url in (run_store, run_dir):
            if storage.exists(url):
                storage.remove(url, recursive=True)
    storage.check_writable(store)
    storage.makedirs(run_dir)
    job = _Job(recipe=recipe, profile=Profile.from_dict(manifest["profile"]), run_dir=run_dir, run_store=run_store,
               progress=progress, tokenizer=_prepare_tokenizer(recipe, manifest, run_store), hooks=tuple(hooks))
    if not ray.is_initialized():
        ray.init(logging_level="WARNING", log_to_driver=progress)
    pa_fs, pa_path = storage.pyarrow_filesystem(store)
    result = _torch_trainer(job, pa_fs, pa_path).fit()
    ckpt_url = _to_url(store, pa_path, result.checkpoint.path) if result.checkpoint is not None else None
    history = read_metrics(run_dir)
    curve = None
    if history:
        curve = storage.join(run_dir, "loss.png")
        write_loss_curve(history, curve, title=recipe.name)
    metrics = dict(result.metrics or {})
    return TrainResult(name=recipe.name, steps=int(metrics.get("step", 0)), checkpoint=ckpt_url, metrics=metrics,
                       run_dir=run_dir, curve_png=curve, history=history)


@dataclass
class _Job:
    """What every worker gets (train_loop_config["job"], pickled by Ray)."""

    recipe: TrainRecipe
    profile: Profile  # the shard set's
    run_dir: str  # OUTPUT/NAME
    # storage_path/name. Every worker group (the first, and one restarted after a failure) resumes
    # the newer of Ray's latest checkpoint and the newest complete one found here (`Checkpointer`);
    # resume="never" emptied it before the first.
    run_store: str
    progress: bool
    tokenizer: dict[str, bytes] | None  # a small text tower's trained tokenizer files
    hooks: tuple[Hook, ...] = ()


def _read_train_split(recipe: TrainRecipe) -> dict:
    """The shard set's manifest, refused early when it has no training split."""
    from radforge import shardspec

    manifest = shardspec.read_manifest(recipe.data.shards)
    splits = manifest["totals"].get("by_split", {})
    if recipe.data.train_split not in splits:
        raise ConfigError(f"shard set {recipe.data.shards} has no {recipe.data.train_split!r} split (has: {', '.join(splits) or 'none'})")
    for s in recipe.data.sources:  # a mixture: every source's own split, before any worker starts
        has = shardspec.read_manifest(s.shards)["totals"].get("by_split", {})
        if s.split not in has:
            raise ConfigError(f"data.sources {s.name}: shard set {s.shards} has no {s.split!r} split (has: {', '.join(has) or 'none'})")
    return manifest


def _torch_trainer(job: _Job, pa_fs, pa_path: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scale, ck = job.recipe.scale, job.recipe.checkpoint
    resources = {"CPU": scale.cpus_per_worker, **scale.resources_per_worker}
    if scale.use_gpu:
        resources["GPU"] = scale.gpus_per_worker
    return _lean_trainer(TorchTrainer)(
        _worker_loop,
        train_loop_config={"job": job},
        # CPU tensors need gloo beside nccl: Metrics reduces its counters on the CPU, and a
        # nccl-only process group has no backend for them.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if scale.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                                     resources_per_worker=resources, placement_strategy=scale.placement_strategy),
        run_config=RunConfig(
            name=job.recipe.name, storage_path=pa_path, storage_filesystem=pa_fs,
            failure_config=FailureConfig(max_failures=ck.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ck.keep_last),
        ),
    )


def _lean_trainer(trainer_cls):
    """`trainer_cls` without two of Ray Train's default callbacks, each of which starts one more
    actor process per job (a Ray worker importing ray.train and with it Ray Data and pandas: 4-7
    CPU s on 2 cores, more than the actor ever does):
    * the datasets callback (a DatasetManager actor), unless the job passes Ray `datasets`: ours
      read shards with radforge.loader, never through Ray Train;
    * the placement-group cleaner (a detached PlacementGroupCleaner actor that removes the
      worker group's placement group if the controller actor dies without doing so itself).
      `run` blocks on the controller in the driver of the job (`ray job submit -- python -m
      jobs.train`, `radforge train`), and a placement group Ray did not detach is removed with
      the job that made it, so a controller crash frees the workers' resources when the job
      exits; what is lost is only the cleanup while a driver that outlives a dead controller is
      still running (a notebook).
    Ray versions without these callbacks get the class unchanged."""
    drop: list[type] = []
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        DatasetsCallback = None
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        drop.append(PlacementGroupCleanerCallback)
    except ImportError:
        pass
    if not hasattr(trainer_cls, "_create_default_callbacks") or (DatasetsCallback is None and not drop):
        return trainer_cls

    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            unwanted = tuple(drop) + ((DatasetsCallback,) if DatasetsCallback is not None and not self.datasets else ())
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unwanted)]

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def _to_url(store: str, pa_path: str, path: str) -> str:
    """Ray reports checkpoint paths inside its pyarrow filesystem; map back to our URL."""
    path = path.rstrip("/")
    base = pa_path.rstrip("/")
    if path.startswith(base):
        return storage.join(store, path[len(base):].lstrip("/"))
    return path


def _prepare_tokenizer(recipe: TrainRecipe, manifest: dict, run_store: str) -> dict[str, bytes] | None:
    """Objectives with a small text tower: one BPE vocabulary for all workers and every resume,
    trained once on the driver from the training split's reports and kept beside the run's
    checkpoints (`checkpoint.run_tokenizer`)."""
    from radforge import models

    if not models.get(recipe.model.kind).text_tower or recipe.model.text.kind != "small":
        return None
    from radforge import shardspec
    from radforge.models import text

    def reports():  # what the tower reads of them: model.text.sections
        n = 0
        for raw in shardspec.iter_samples(recipe.data.shards, manifest, split=recipe.data.train_split):
            if "txt" in raw:
                yield text.report_sections(raw["txt"].decode("utf-8"), recipe.model.text.sections)
                n += 1
                if n >= MAX_TOKENIZER_TEXTS:
                    return

    files = checkpoint.run_tokenizer(run_store)
    if not files:
        tok = text.train_tokenizer(reports(), recipe.model.text)
        with tempfile.TemporaryDirectory() as d:
            tok.save(d)
            files = {name: _read_file(os.path.join(d, name)) for name in sorted(os.listdir(d))}
        checkpoint.keep_run_tokenizer(run_store, files)
    _warn_truncation(_tokenizer_from_files(files), list(reports()), recipe.model.text.max_len)
    return files


def _warn_truncation(tok, reports: list[str], max_len: int) -> None:
    """Once per run, on the driver: how many training reports are longer than the tower reads."""
    import warnings

    from radforge.models import text

    line = text.truncation_warning(text.token_lengths(tok, reports), max_len) if reports else None
    if line:
        warnings.warn(line, stacklevel=3)
        print(f"radforge train: warning: {line}", flush=True)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_metrics(run_dir: str) -> list[dict]:
    url = storage.join(run_dir, METRICS)
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
# Test/debug hooks (passed to `run`, never read from the environment)


@dataclass
class WorkerInfo:
    """Where a worker stands: what its components and hooks are told at start."""

    rank: int
    world: int
    node: str  # Ray node id
    nodes: int  # distinct nodes of the worker group
    run_dir: str
    start_step: int  # 0, or the step of the checkpoint it resumed from


class Hook:
    """Called by every rank's Trainer. Must be picklable: hooks travel to the workers in the
    worker config. Override what you need."""

    def start(self, info: WorkerInfo) -> None:
        pass

    def before_step(self, step: int) -> None:
        """`step`: optimizer steps completed so far."""

    def after_step(self, step: int, keys: list[str]) -> None:
        """`keys`: the sample keys of the step just completed (this rank's)."""

    def close(self) -> None:
        pass


class TraceSamples(Hook):
    """Sample keys consumed per step and rank → OUTPUT/NAME/samples/rank-R.jsonl (local OUTPUT)."""

    def start(self, info: WorkerInfo) -> None:
        self.node = info.node
        path = os.path.join(storage.url_to_fs(info.run_dir)[1], "samples", f"rank-{info.rank:05d}.jsonl")
        # a resumed run replays the steps after its checkpoint
        _keep_rows(path, lambda row: row["step"] <= info.start_step)
        if info.rank == 0:  # and ranks of an earlier, larger run (elastic resume) have none after it
            for name in sorted(os.listdir(os.path.dirname(path))):
                if name.startswith("rank-") and int(name[5:10]) >= info.world:
                    _keep_rows(os.path.join(os.path.dirname(path), name), lambda row: row["step"] <= info.start_step)
        self.f = open(path, "a")

    def after_step(self, step: int, keys: list[str]) -> None:
        self.f.write(json.dumps({"step": step, "keys": list(keys), "node": self.node}) + "\n")
        self.f.flush()

    def close(self) -> None:
        if getattr(self, "f", None) is not None:
            self.f.close()


@dataclass
class KillAt(Hook):
    """Rank `rank` kills its own process (os._exit) when it reaches `step`, once: `marker` (a path
    every worker can see) is created just before, so the restarted worker group goes on."""

    step: int
    rank: int
    marker: str

    def start(self, info: WorkerInfo) -> None:
        self.armed = info.rank == self.rank

    def before_step(self, step: int) -> None:
        if self.armed and step == self.step and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(step))
            os._exit(17)


def _keep_rows(path: str, keep) -> list[str]:
    """Rewrite a JSON-lines file with only the rows `keep` accepts (none when it is missing)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [ln.rstrip("\n") for ln in f if ln.strip() and keep(json.loads(ln))]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(ln + "\n" for ln in rows)
    return rows


# --------------------------------------------------------------------------------------------
# Worker: a Trainer built from components


def _worker_loop(cfg: dict) -> None:
    """One Ray Train worker: build the Trainer, run it, release it."""
    if not cfg["job"].recipe.scale.use_gpu:
        # Before DeepSpeed's first import picks its accelerator. Set here, not as the workers'
        # runtime_env: an actor with its own env_vars gets a freshly started worker process
        # (through setup_worker.py), never one of the idle workers Ray already started.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    trainer = Trainer.build(cfg["job"])
    try:
        trainer.train()
    finally:
        trainer.close()


class Checkpointer:
    """Ray Train checkpoints in radforge.checkpoint's layout: the run state to resume from, and a
    save every `every_steps` and at the last step (every rank, its own local directory)."""

    def __init__(self, rank: int, world: int, every_steps: int, last_step: int, newest: str | None = None):
        import ray.train

        self.rank, self.world, self.every, self.last = rank, world, every_steps, last_step
        ckpt = ray.train.get_checkpoint()
        self.dir = ckpt.to_directory() if ckpt is not None else None
        self._owned = self.dir is not None  # a local copy of ours (deleted at close)
        if newest and (self.dir is None or checkpoint.load(self.dir).step < checkpoint.load(newest).step):
            self.dir, self._owned = checkpoint.local_copy(newest)  # uploaded, never registered with Ray
        self.state = checkpoint.load(self.dir, rank=rank, world_size=world) if self.dir else None
        self.universal = self.state is not None and checkpoint.needs_universal(self.state, world)  # elastic resume

    def load_engine(self, engine) -> None:
        if self.state is not None:
            checkpoint.load_engine(self.dir, self.state, engine)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    def save(self, state: checkpoint.RunState, engine, metrics: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="radforge-ckpt-") as d:
            checkpoint.save(d, state, engine, rank=self.rank)
            ray.train.report(_clean(metrics), checkpoint=Checkpoint.from_directory(d))

    def close(self) -> None:
        if self.dir and self._owned and os.path.isdir(self.dir):
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


class MetricsSink:
    """metrics.jsonl + TensorBoard events under OUTPUT/NAME (rank 0). Local directories are written
    in place; a remote OUTPUT is staged locally and uploaded at every checkpoint and at the end."""

    def __init__(self, run_dir: str, resume_step: int):
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir
        self.local = storage.is_local(run_dir)
        self.dir = storage.url_to_fs(run_dir)[1] if self.local else tempfile.mkdtemp(prefix="radforge-metrics-")
        path = os.path.join(self.dir, METRICS)
        remote = storage.join(run_dir, METRICS)
        if not self.local and storage.exists(remote):
            with open(path, "wb") as f:
                f.write(storage.read_bytes(remote))
        # a resumed run rewrites what came after its checkpoint, so the curve has no doubled steps
        _keep_rows(path, lambda row: row.get("step", 0) <= resume_step)
        self.f = open(path, "a")
        self.tb = SummaryWriter(logdir=os.path.join(self.dir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, m: dict) -> None:
        self.f.write(json.dumps({"time": round(time.time(), 3), **_clean(m)}) + "\n")
        self.f.flush()
        for k, v in _clean(m).items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}" if not k.startswith("eval_") else f"eval/{k[5:]}", v, m["step"])

    def flush(self) -> None:
        self.f.flush()
        self.tb.flush()
        if not self.local:
            fs, path = storage.url_to_fs(self.run_dir)
            fs.put(self.dir + "/", path.rstrip("/") + "/", recursive=True)  # trailing slashes: the contents

    def close(self) -> None:
        self.flush()
        self.f.close()
        self.tb.close()


class Metrics:
    """Step timing and the logged metrics. Every rank measures and joins the reductions; rank 0
    writes to its sink (`sink` is None elsewhere) and prints progress."""

    def __init__(self, recipe: TrainRecipe, info: WorkerInfo, sink: MetricsSink | None, progress: bool):
        self.recipe, self.info, self.sink, self.progress = recipe, info, sink, progress
        self._reset()

    def _reset(self) -> None:
        self.window = {"time": 0.0, "wait": 0.0, "steps": 0, "loss": 0.0}
        self.by_kind: dict[str, list[float]] = {}  # image kind -> [loss sum, micro-batches] (CT + X-ray runs)

    def kind_loss(self, kind: str, loss) -> None:
        s = self.by_kind.setdefault(kind, [0.0, 0])
        s[0], s[1] = s[0] + float(loss), s[1] + 1

    def _mixture(self, lm: dict) -> dict:
        """Per image kind its mean loss over the window (loss_<kind>; every rank joins the
        reduction) when the run mixes kinds, and the loader's realised mixture shares."""
        import torch

        out = {k: v for k, v in lm.items() if k.startswith("mix_")}
        names = self.recipe.data.images()
        if len(names) > 1:
            t = torch.tensor([v for k in names for v in self.by_kind.get(k, [0.0, 0])], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            out.update({f"loss_{k}": float(t[2 * i] / t[2 * i + 1]) for i, k in enumerate(names) if t[2 * i + 1] > 0})
        return out

    def step_done(self, loss, wait: float, seconds: float) -> None:
        """One small all-reduce per step: loss (mean over ranks), wait and time (worst rank)."""
        import torch

        sums = loss.reshape(1).cpu().clone()
        torch.distributed.all_reduce(sums)
        maxes = torch.tensor([float(wait), float(seconds)])
        torch.distributed.all_reduce(maxes, op=torch.distributed.ReduceOp.MAX)
        self.window.update(time=self.window["time"] + float(maxes[1]), wait=self.window["wait"] + float(maxes[0]),
                           steps=self.window["steps"] + 1, loss=float(sums[0]) / self.info.world)

    def due(self, step: int) -> bool:
        return step % self.recipe.log_every == 0 or step == self.recipe.steps

    def log(self, step: int, lr: float, grad_norm: float, loader) -> dict:
        """The metrics of the window since the last log (every rank: the loader counters are summed)."""
        import psutil
        import torch

        lm = loader.metrics()
        counters = torch.tensor([float(lm.get("skipped_samples", 0)), float(lm.get("bad_shards", 0))])
        torch.distributed.all_reduce(counters)
        w, n = self.window, max(1, self.window["steps"])
        m = {
            "step": step, "loss": w["loss"], "lr": lr, "grad_norm": grad_norm,
            "samples_per_s": self.recipe.global_batch * n / max(w["time"], 1e-9),
            "step_time_s": w["time"] / n,
            "data_wait_frac": w["wait"] / max(w["time"], 1e-9),
            "rss_mb": psutil.Process().memory_info().rss / 1e6,
            "skipped_samples": int(counters[0]), "bad_shards": int(counters[1]), "nodes": self.info.nodes,
        }
        m.update(self._mixture(lm))
        if self.recipe.scale.use_gpu:
            m["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 1e6
        self._reset()
        self.write(m, f"step {step}/{self.recipe.steps}  loss {m['loss']:.4f}  lr {lr:.2e}  "
                      f"{m['samples_per_s']:.1f} samples/s  data-wait {m['data_wait_frac']:.0%}  "
                      f"grad-norm {grad_norm:.3g}  rss {m['rss_mb']:.0f} MB")
        return m

    def write(self, m: dict, line: str) -> None:
        if self.sink is not None:
            self.sink.write(m)
            self.say(line)

    def say(self, line: str) -> None:
        if self.info.rank == 0 and self.progress:
            print(f"[radforge train] {line}", flush=True)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


class Validator:
    """In-loop evaluation (`radforge.evaluate`) on rank 0 with a plain copy of the current weights
    while the other ranks wait: every `eval.every_steps` and at the last step, when the shard set
    has the eval split."""

    def __init__(self, recipe: TrainRecipe, info: WorkerInfo, profile: Profile, findings: list[str], tokenizer, device):
        from radforge import shardspec

        self.recipe, self.info, self.profile, self.findings = recipe, info, profile, findings
        self.tokenizer, self.device = tokenizer, device
        splits = shardspec.read_manifest(recipe.data.shards)["totals"].get("by_split", {})
        self.enabled = recipe.eval.split in splits

    def due(self, step: int) -> bool:
        every, last = self.recipe.eval.every_steps, self.recipe.steps
        return step == last or bool(every and step % every == 0 and step < last)

    def run(self, engine, step: int) -> dict:
        """Collective: every rank calls it. {"eval_<metric>": value} on rank 0, {} elsewhere."""
        import torch

        from radforge import evaluate

        if not self.enabled:
            return {}
        live = self._plain_copy(engine.module)
        out: dict = {}
        if self.info.rank == 0:
            r = self.recipe
            lm = checkpoint.LoadedModel(
                model=live, kind=r.model.kind, image=kinds.get(r.data.image), view=r.view, profile=self.profile,
                model_id=f"{r.name}@{step}", findings=self.findings,
                prompts={"positive": r.eval.positive_prompt, "negative": r.eval.negative_prompt}, device=str(self.device))
            with torch.no_grad():
                out = _eval_scalars(evaluate.run(lm, r.data.shards, split=r.eval.split, protocols=("quick",), cfg=r.eval))
        torch.distributed.barrier()
        return out

    def _plain_copy(self, module):
        """Rank 0: a plain (non-DeepSpeed) copy of the current weights. Under ZeRO-3 the engine's
        module fetches partitions in forward hooks, a collective the other ranks would have to
        join; gathering once (every rank) into a copy avoids that and works the same for every
        stage. None on other ranks."""
        import deepspeed

        from radforge import models

        r = self.recipe
        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) \
            if r.deepspeed.zero_stage == 3 else contextlib.nullcontext()
        state = None
        with gather:
            if self.info.rank == 0:
                state = {n: t.detach().clone().cpu() for n, t in [*module.named_parameters(), *module.named_buffers()]}
        if self.info.rank != 0:
            return None
        copy = models.build_multi(r.model, _input_shapes(r), self.tokenizer, pretrained=False)
        copy.load_state_dict(state, strict=False)
        return copy.to(self.device).eval()


def _eval_scalars(res: dict) -> dict:
    """The headline numbers of an evaluation result, as eval_* metrics."""
    out = {}
    for k in ("mean_auroc", "recon_loss"):
        if res.get(k) is not None and not (isinstance(res[k], float) and math.isnan(res[k])):
            out[f"eval_{k}"] = float(res[k])
    for d, ks in (res.get("recall") or {}).items():
        if isinstance(ks, dict):
            out.update({f"eval_recall_{d}@{k}": float(v) for k, v in ks.items() if v is not None})
    return out


class Trainer:
    """One rank's training loop over its components: the DeepSpeed engine, the loader, a
    Checkpointer, Metrics, a Validator and the hooks. `build` makes them from a job."""

    def __init__(self, recipe: TrainRecipe, info: WorkerInfo, *, engine, optimizer, loader, profile: Profile,
                 checkpointer: Checkpointer, metrics: Metrics, validator: Validator, hooks: Sequence[Hook] = (),
                 tokenizer: dict[str, bytes] | None = None, device=None, views=None):
        self.recipe, self.info, self.step = recipe, info, info.start_step
        self.views = views  # transforms.RandMultiCrop for objectives that train on multi-crop views
        self.engine, self.optimizer, self.loader, self.profile = engine, optimizer, loader, profile
        self.checkpointer, self.metrics, self.validator, self.hooks = checkpointer, metrics, validator, list(hooks)
        self.tokenizer, self.device = tokenizer, device

    @classmethod
    def build(cls, job: _Job) -> "Trainer":
        import deepspeed
        import ray
        import ray.train
        import torch

        from radforge import loader as loader_mod
        from radforge import models

        r = job.recipe
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = _setup_device(r)
        if not r.scale.use_gpu:
            _skip_inference_shm_op()
        _defer_muon_compile()
        deepspeed.init_distributed(dist_backend="nccl" if r.scale.use_gpu else "gloo")
        nodes: list = [None] * world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        # rank 0 looks for it, so every rank resumes the same checkpoint
        newest = [checkpoint.newest(job.run_store) if rank == 0 else None]
        torch.distributed.broadcast_object_list(newest, src=0)
        ckpt = Checkpointer(rank, world, r.checkpoint.every_steps, r.steps, newest=newest[0])
        info = WorkerInfo(rank=rank, world=world, node=nodes[rank], nodes=len(set(nodes)), run_dir=job.run_dir,
                          start_step=ckpt.state.step if ckpt.state else 0)

        tokenizer = _tokenizer_from_files(job.tokenizer)
        input_shape = kinds.get(r.data.image).view(r.view).input_shape
        torch.manual_seed(r.seed)  # same initial weights on every rank
        # Outside weights (model.init_from, an HF text tower) only for a fresh start; a resumed run
        # gets every weight from its checkpoint.
        fresh = ckpt.state is None
        model = models.build_multi(r.model, _input_shapes(r), tokenizer, pretrained=fresh,
                             init_encoder=checkpoint.read_weights(r.model.init_from) if fresh and r.model.init_from else None,
                             activation_checkpointing=r.deepspeed.activation_checkpointing)
        loader = loader_mod.build_loader(
            r.data, r.view, split=r.data.train_split, batch_size=r.deepspeed.micro_batch, rank=rank, world_size=world,
            seed=r.seed, train=True, findings=r.eval.findings or None, state=ckpt.state.loader if ckpt.state else None,
            text_view=_text_view(r))
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=_param_groups(model, r.optim.weight_decay),
            config=deepspeed_config(r, load_universal=ckpt.universal),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(r, s)))
        ckpt.load_engine(engine)
        for h in job.hooks:
            h.start(info)
        from radforge import transforms

        views = transforms.RandMultiCrop(r.model.dino, input_shape, r.model.patch(kinds.get(r.data.image))) \
            if models.get(r.model.kind).multicrop else None
        return cls(r, info, engine=engine, optimizer=optimizer, loader=loader, profile=job.profile, checkpointer=ckpt,
                   metrics=Metrics(r, info, MetricsSink(job.run_dir, info.start_step) if rank == 0 else None, job.progress),
                   validator=Validator(r, info, job.profile, list(loader.findings), tokenizer, device),
                   hooks=job.hooks, tokenizer=checkpoint.tokenizer_files(model) if rank == 0 else None, device=device,
                   views=views)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        r, ds = self.recipe, self.recipe.deepspeed
        self.metrics.say(f"{r.name}: steps {self.step}→{r.steps}, {self.info.world} worker(s), ZeRO-{ds.zero_stage}, "
                         f"global batch {r.global_batch} = {ds.micro_batch} × {ds.grad_accum} × {self.info.world}")
        batches = _forever(self.loader)
        last_saved = self.step
        while self.step < r.steps:
            for h in self.hooks:
                h.before_step(self.step)
            lr, grad_norm, keys = self._step(batches)
            self.step += 1
            self.engine.module.on_step_end(self.step)  # EMA teachers, schedules (models.objective)
            for h in self.hooks:
                h.after_step(self.step, keys)
            metrics = self.metrics.log(self.step, lr, grad_norm, self.loader) if self.metrics.due(self.step) else None
            if self.validator.due(self.step):
                metrics = {**(metrics or {"step": self.step}), **self._validate()}
            if self.checkpointer.due(self.step):
                self._save(metrics or {"step": self.step})
                last_saved = self.step
            elif metrics is not None:
                import ray.train

                ray.train.report(_clean(metrics))
        if last_saved != self.step:  # resumed at the end already
            self._save({"step": self.step})

    def _step(self, batches: Iterator[dict]) -> tuple[float, float, list[str]]:
        """One optimizer step of grad_accum micro-batches → (lr used, grad norm, sample keys)."""
        import torch

        r, accum = self.recipe, self.recipe.deepspeed.grad_accum
        t0 = time.perf_counter()
        wait, losses, keys = 0.0, [], []
        lr_used, grad_norm = None, None
        for micro in range(accum):
            tw = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - tw
            keys.extend(batch["key"])
            batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if self.views is not None:  # crops from (seed, step, sample key): the same on any rank
                batch = self.views.apply(batch, _mix(r.seed, self.step))
            batch = _cast_floats(batch, r.deepspeed.precision)
            # MAE masks (torch's global RNG) are a function of (seed, step, micro, rank): a
            # resumed run draws what the uninterrupted one would have.
            torch.manual_seed(_mix(r.seed, self.step, micro, self.info.rank))
            loss = self.engine(batch)["loss"]
            self.engine.backward(loss)
            if micro == accum - 1:
                lr_used = self.optimizer.param_groups[0]["lr"]
                if r.deepspeed.zero_stage == 0:  # DeepSpeed reports no global norm without ZeRO
                    grad_norm = _grad_norm(self.engine.module)
            self.engine.step()
            losses.append(loss.detach().float())
            if "kind" in batch:  # a mixture's batch: one image kind (radforge.loader)
                self.metrics.kind_loss(batch["kind"], losses[-1])
        if grad_norm is None:
            g = self.engine.get_global_grad_norm()
            grad_norm = float(g) if g is not None else float("nan")
        self.metrics.step_done(torch.stack(losses).mean(), wait, time.perf_counter() - t0)
        return lr_used, grad_norm, keys

    def _validate(self) -> dict:
        out = self.validator.run(self.engine, self.step)
        if out:
            self.metrics.write({"step": self.step, **out},
                               f"eval @ step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def run_state(self) -> checkpoint.RunState:
        return checkpoint.RunState(step=self.step, world_size=self.info.world, recipe=self.recipe, profile=self.profile,
                                   findings=list(self.loader.findings), tokenizer=self.tokenizer,
                                   loader=self.loader.state_dict())

    def _save(self, metrics: dict) -> None:
        self.metrics.flush()  # a remote OUTPUT is uploaded with every checkpoint
        self.checkpointer.save(self.run_state(), self.engine, metrics)

    def close(self) -> None:
        self.metrics.close()
        for h in self.hooks:
            h.close()
        self.checkpointer.close()


def _setup_device(recipe: TrainRecipe):
    import ray.train
    import torch

    if recipe.scale.use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    # Ray gives each worker its CPU share; torch would otherwise start one thread per core in
    # every worker and they would fight over the same cores.
    torch.set_num_threads(max(1, int(recipe.scale.cpus_per_worker)))
    return torch.device("cpu")


def _skip_inference_shm_op() -> None:
    """DeepSpeed's CPU comm backend JIT-compiles a C++ shared-memory all-reduce when it starts
    (40-120 s on 2 cores, and again whenever ~/.cache/torch_extensions holds another build of it)
    that only its `inference_all_reduce` uses; training all-reduces through torch.distributed
    (gloo), so the op is marked unavailable and the backend starts without it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _defer_muon_compile() -> None:
    """DeepSpeed's ZeRO optimizers import its Muon module whatever the optimizer (to ask whether
    it is Muon), and that module wraps three functions in torch.compile at import: making the
    wrappers imports inductor's compiler (~600 modules, 2.5-3 CPU s per worker on 2 cores) for an
    optimizer `deepspeed_config` never selects. The module is imported here first, with each
    torch.compile deferred to its function's first call (the same torch.compile then), so Muon
    would still run compiled if it were selected."""
    import importlib
    import sys

    import torch

    name = "deepspeed.runtime.zero.muon.original_muon"
    if name in sys.modules:
        return
    compile_now = torch.compile

    def deferred(model=None, **kwargs):
        if model is None:  # @torch.compile(mode=...)
            return lambda fn: deferred(fn, **kwargs)
        return _CompileOnFirstCall(compile_now, model, kwargs)

    torch.compile = deferred
    try:
        importlib.import_module(name)
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        torch.compile = compile_now


class _CompileOnFirstCall:
    """`compile(fn, **kwargs)`, made when the function is first called."""

    def __init__(self, compile, fn, kwargs: dict):
        self._compile, self._fn, self._kwargs, self._compiled = compile, fn, kwargs, None
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = self._compile(self._fn, **self._kwargs)
        return self._compiled(*args, **kwargs)


def _cast_floats(batch: dict, precision: str) -> dict:
    """Float tensors of a batch in the engine's 16-bit dtype (fp32: unchanged). DeepSpeed's bf16
    and fp16 engines hold 16-bit weights but cast no inputs (bf16 has no auto_cast, fp16's is
    off), so float32 images would stop at the first patch-embedding conv."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return batch
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}


def _input_shapes(recipe: TrainRecipe) -> dict[str, tuple[int, ...]]:
    """{image kind: model input shape} for every kind the data holds (primary first)."""
    return {k: tuple(kinds.get(k).view(recipe.view).input_shape) for k in recipe.data.images()}


def _forever(loader) -> Iterator[dict]:
    """The loader's batches, pass after pass (train loaders normally never end); an empty pass ends it."""
    while True:
        n = 0
        for n, batch in enumerate(loader, 1):
            yield batch
        if n == 0:
            return


def _clean(m: dict) -> dict:
    return {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}


def _mix(*xs: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1)[0])


def _grad_norm(module) -> float:
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on parameters with ndim < 2: biases, norms, CLIP's temperature (shape [1])."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _text_view(recipe: TrainRecipe):
    """The loader's report rewrite for objectives with a text tower (sections, sentence sampling)."""
    from radforge import models
    from radforge.models import text

    return text.ReportView.from_config(recipe.model.text) if models.get(recipe.model.kind).text_tower else None


def _tokenizer_from_files(files: dict[str, bytes] | None):
    if not files:
        return None
    from radforge.models import text

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        return text.Tokenizer.load(d)
