"""radforge.train + radforge.checkpoint on real Ray Train + DeepSpeed (CPU, gloo).

The session's one ingest of a phantom corpus (conftest `ingested_corpus`: CT + X-ray, findings in
pixels and reports) feeds every test. The exactness tests (ZeRO stages, kill-a-worker, resume
across runs, export) train a tiny CLIP on a ONE-shard X-ray set with no shuffle: with one shard
the loader strides samples across ranks (rank r takes slots r, r+S, ...), so the union of the
ranks' micro-batches at every step is exactly the 1-worker batch, and CLIP's loss (negatives
all-gathered) depends on the global batch only. Loss trajectories are then comparable step by step.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from radforge import checkpoint, config, kinds, shardspec, storage, train
from radforge.transforms import Profile
from radforge.config import TrainRecipe
from radforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "jobs" / "recipes"
pytestmark = pytest.mark.timeout(900)
# Runs that only need their final checkpoint save nothing in between (a save is ~1-3 s of a tiny
# run on 2 cores; the checkpoint at the last step is always written).
LAST_CHECKPOINT_ONLY = "checkpoint.every_steps=100000"
# Runs whose test evaluates the exported model itself skip the in-loop evaluation at the last step
# (eval.every_steps=0 still evaluates there when the shard set has eval.split): rank 0's quick
# protocols, sklearn's import included, were ~11 % of a 30-step MAE worker's CPU.
NO_LOOP_EVAL = "eval.split=none"


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def shards(ingested_corpus) -> str:
    """The session's ingested phantoms (conftest): 240 patients × (CT 16×48² + DX 128²), ~10% val, ~10% test."""
    return ingested_corpus.shards


def _one_shard(src: str, dest: str, n: int = 48) -> str:
    """The first n train X-rays of `src` re-packed into one shard (same members, same profile)."""
    m = shardspec.read_manifest(src)
    buf, count = io.BytesIO(), 0
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for raw in shardspec.iter_samples(src, m, split="train"):
            if json.loads(raw["json"])["modality"] not in ("DX", "CR"):
                continue
            for suffix in ("png", "json", "txt"):
                if suffix in raw:
                    info = tarfile.TarInfo(f"{raw['__key__']}.{suffix}")
                    info.size = len(raw[suffix])
                    tf.addfile(info, io.BytesIO(raw[suffix]))
            count += 1
            if count == n:
                break
    data = buf.getvalue()
    path = shardspec.shard_name("train", 0)
    storage.write_bytes_atomic(storage.join(dest, path), data)
    import hashlib

    rec = {"path": path, "split": "train", "samples": count, "bytes": len(data),
           "sha256": hashlib.sha256(data).hexdigest(), "modalities": {"DX": count}}
    out = shardspec.new_manifest(profile=Profile.from_dict(m["profile"]), recipe=m["recipe"], deid=m["deid"], plan_digest="one-shard")
    shardspec.finalize(out, [rec], {"seen": count, "used": count, "skipped": {}, "rejected": {}})
    storage.write_bytes_atomic(storage.join(dest, shardspec.MANIFEST), json.dumps(out).encode())
    return dest


@pytest.fixture(scope="module")
def one_shard(shards, tmp_path_factory) -> str:
    return _one_shard(shards, str(tmp_path_factory.mktemp("one-shard")))


def _tiny_sets(shards: str, tmp: Path, *sets: str, workers: int = 2, stage: int = 2, steps: int = 6) -> list[str]:
    """tiny-clip-xray shrunk to seconds: 32 px, global batch 8, no shuffle, no loader processes
    (the recipe overrides; `_tiny` loads them)."""
    micro = 8 // workers
    return [
        f"data.shards={shards}", f"steps={steps}", "log_every=1", "view.xray_size=32", "view.rand_crop=false",
        "data.num_workers=0", "data.shuffle_buffer=1", f"deepspeed.micro_batch={micro}", f"scale.num_workers={workers}",
        f"deepspeed.zero_stage={stage}", "optim.warmup_steps=2", "checkpoint.every_steps=3", "eval.every_steps=0",
        f"checkpoint.storage_path={tmp / 'ckpt'}", f"output_dir={tmp / 'runs'}", *sets]


def _tiny(shards: str, tmp: Path, *sets: str, workers: int = 2, stage: int = 2, steps: int = 6) -> TrainRecipe:
    return config.load(TrainRecipe, str(RECIPES / "tiny-clip-xray.yaml"),
                       _tiny_sets(shards, tmp, *sets, workers=workers, stage=stage, steps=steps))


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history if "loss" in h]


def _trace(run_dir: str) -> dict[int, list[str]]:
    """step -> keys of that step, all ranks (from the train.TraceSamples hook)."""
    out: dict[int, list[str]] = {}
    d = os.path.join(storage.url_to_fs(run_dir)[1], "samples")
    for name in sorted(os.listdir(d)):
        for line in open(os.path.join(d, name)):
            row = json.loads(line)
            out.setdefault(row["step"], []).extend(row["keys"])
    return out


# --------------------------------------------------------------------------- pure functions


def test_deepspeed_config_states_each_batch_size_once_and_matches_the_recipe():
    r = config.load(TrainRecipe, str(RECIPES / "tiny-clip-xray.yaml"),
                    ["deepspeed.micro_batch=3", "deepspeed.grad_accum=5", "scale.num_workers=4", "deepspeed.zero_stage=3",
                     "optim.grad_clip=0.5", "deepspeed.offload_optimizer=true"])
    ds = train.deepspeed_config(r)
    assert ds["train_batch_size"] == 60 == r.global_batch
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] is False  # offloaded: DeepSpeed's CPU Adam
    assert ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    gpu = config.load(TrainRecipe, str(RECIPES / "tiny-clip-xray.yaml"), ["scale.use_gpu=true", "deepspeed.precision=bf16"])
    assert train.deepspeed_config(gpu)["bf16"]["enabled"] is True


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    r = config.load(TrainRecipe, None, ["steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = [train.lr_factor(r, s) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # monotone decay after warmup
    assert train.lr_factor(r, 110) == pytest.approx(0.1) and min(f) >= 0.1


def test_one_model_for_ct_and_xray_shares_all_but_the_patch_embeddings():
    """models.build_multi (what a CT + X-ray recipe trains): the kind follows the image's ndim,
    only the patch embeddings and the shape-specific pixel heads are per kind, and every
    parameter gets a gradient from either kind's batch (the same graph on every rank)."""
    from radforge import models

    r = config.load(TrainRecipe, str(RECIPES / "tiny-mix-ct-xray.yaml"), ["view.ct_size=[8, 16, 16]", "view.xray_size=32"])
    shapes = train._input_shapes(r)
    assert list(shapes) == ["ct", "xray"]
    torch.manual_seed(0)
    m = models.build_multi(r.model, shapes)
    own = {k: {n.split(".", 2)[2] for n, p in m.named_parameters() if n.startswith(f"kinds.{k}.")} for k in shapes}
    assert {n for n in own["xray"] if "patch_embed" not in n} <= {"decoder_pred.weight", "decoder_pred.bias"}
    assert any(n.startswith("encoder.transformer.") for n in m.shared) and "mask_token" in m.shared
    for images in (torch.rand(2, *shapes["ct"]), torch.rand(2, *shapes["xray"])):
        m.zero_grad()
        m({"image": images})["loss"].backward()
        assert all(p.grad is not None for p in m.parameters())
        assert m.embed_image(images).shape == (2, 128)
    again = models.build_multi(r.model, shapes)
    again.load_state_dict(m.state_dict())
    x = torch.rand(2, *shapes["xray"])
    assert torch.equal(again.embed_image(x), m.embed_image(x))


def test_every_recipe_loads_and_builds(tmp_path):
    """Each YAML under jobs/recipes loads, and its model builds for its view (production models
    included: built on the meta device, no memory)."""
    from radforge import models

    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {"tiny-clip-xray.yaml", "tiny-mae-ct.yaml", "mae-vitb-ct.yaml", "mae-xray.yaml", "ct-clip.yaml", "cxr-clip.yaml"} <= set(names)
    for name in names:
        r = config.load(TrainRecipe, str(RECIPES / name))
        train.deepspeed_config(r)
        view = kinds.get(r.data.image).view(r.view)
        tok = None
        if r.model.kind == "clip":
            from radforge.models import text

            tok = text.train_tokenizer(["no pleural effusion.", "a nodule is present."] * 10, r.model.text)
        with torch.device("meta"):
            m = models.build(r.model, r.data.image, view.input_shape, tok, pretrained=False)
        assert sum(p.numel() for p in m.parameters()) > 0, name


def test_ray_train_jobs_start_no_dataset_manager_unless_given_datasets_and_no_pg_cleaner(tmp_path):
    """The trainer class of train._torch_trainer leaves out Ray Train's datasets callback (it
    starts a DatasetManager actor process in every job) when the job passes no Ray datasets, as
    ours never do, and keeps it when one is passed; it never starts the placement-group cleaner
    (one more actor process per job); every other default callback stays. Built only: no Ray starts."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    cls = train._lean_trainer(TorchTrainer)
    assert issubclass(cls, TorchTrainer) and cls.__name__ == "TorchTrainer"

    def callbacks(trainer_cls=cls, **kw) -> list[type]:
        t = trainer_cls(lambda cfg: None, scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(storage_path=str(tmp_path)), **kw)
        return [type(c) for c in t._create_default_callbacks()]

    stock = callbacks(TorchTrainer)
    assert DatasetsCallback in stock and PlacementGroupCleanerCallback in stock
    assert callbacks() == [c for c in stock if c not in (DatasetsCallback, PlacementGroupCleanerCallback)]
    assert callbacks(datasets={"train": lambda: None}) == [c for c in stock if c is not PlacementGroupCleanerCallback]


def test_bad_resume_mode_and_missing_split_fail_before_any_work(tmp_path, one_shard):
    r = _tiny(one_shard, tmp_path)
    with pytest.raises(ConfigError):
        train.run(r, resume="sometimes")
    with pytest.raises(ConfigError, match="no 'nope' split"):
        train.run(config.load(TrainRecipe, None, [f"data.shards={one_shard}", "data.train_split=nope"]))


# --------------------------------------------------------------------------- Ray Train runs


# A simulated 2-node cluster (ray.cluster_utils.Cluster, a custom resource per node) in a child
# process: its own Ray instance, while the session's (ray_cluster) stays connected in this one;
# no dashboard (its head process and NodeHead were ~9 CPU s of the child's cluster).
# argv[1]: JSON [recipe path, overrides]; prints the TrainResult's fields.
_TWO_NODE_SCRIPT = """
import json, sys, ray
from ray.cluster_utils import Cluster
from radforge import config, train
from radforge.config import TrainRecipe
recipe, sets = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"rf_slot": 1}, "include_dashboard": False})
cluster.add_node(num_cpus=1, resources={"rf_slot": 1})
ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
try:
    res = train.run(config.load(TrainRecipe, recipe, sets), resume="never", progress=False, hooks=[train.TraceSamples()])
    print("RESULT", json.dumps({"name": res.name, "steps": res.steps, "checkpoint": res.checkpoint, "metrics": res.metrics,
                                "run_dir": res.run_dir, "curve_png": res.curve_png}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _train_on_two_nodes(sets: list[str]) -> train.TrainResult:
    """tiny-clip-xray with `sets` on a 2-node cluster, one worker per node (STRICT_SPREAD over a
    custom resource each node has one of), with train.TraceSamples."""
    sets = [*sets, "scale.placement_strategy=STRICT_SPREAD", "scale.resources_per_worker={rf_slot: 1}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    p = subprocess.run([sys.executable, "-c", _TWO_NODE_SCRIPT, json.dumps([str(RECIPES / "tiny-clip-xray.yaml"), sets])],
                       capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    return train.TrainResult(**out, history=train.read_metrics(out["run_dir"]))


@pytest.fixture(scope="module")
def kill_marker(tmp_path_factory) -> Path:
    """Created by the ZeRO-1 run's rank 1 just before it kills itself (train.KillAt)."""
    return tmp_path_factory.mktemp("kill") / "fault-fired"


@pytest.fixture(scope="module")
def zero_runs(one_shard, tmp_path_factory, ray_cluster, kill_marker):
    """The same tiny recipe: 1 worker ZeRO-0, and 2 workers ZeRO-1, -2, -3 (global batch 8).
    The ZeRO-1 run is also the killed-worker run: rank 1 kills its own process at step 4, once,
    and Ray Train restarts the group from the step-3 checkpoint (one Ray Train job fewer than a
    separate run; the trajectory test then holds the restarted run to the uninterrupted ZeRO-0
    losses and samples, the kill test checks the kill happened and no step was doubled).
    The ZeRO-3 run is also the two-node run: it trains on a simulated 2-node cluster with one
    worker per node (`_train_on_two_nodes`), held to the same trajectory (another job fewer)."""
    out = {}
    for workers, stage in ((1, 0), (2, 1), (2, 2), (2, 3)):
        tmp = tmp_path_factory.mktemp(f"z{stage}")
        hooks, sets = [train.TraceSamples()], [LAST_CHECKPOINT_ONLY]
        if stage == 1:  # the restart needs the step-3 checkpoint
            hooks.append(train.KillAt(step=4, rank=1, marker=str(kill_marker)))
            sets = ["checkpoint.max_failures=1", "checkpoint.every_steps=3"]
        if stage == 3:
            out[stage] = _train_on_two_nodes(_tiny_sets(one_shard, tmp, *sets, workers=workers, stage=stage))
            continue
        out[stage] = train.run(_tiny(one_shard, tmp, *sets, workers=workers, stage=stage), resume="never", progress=False,
                               hooks=hooks)
    return out


def test_zero_stages_and_world_sizes_give_the_same_loss_trajectory(zero_runs):
    """Tolerance: relative 2e-3 per step. Same data, same initial weights, same maths; what differs
    is float32 summation order (gloo all-reduce across 2 ranks vs one process, ZeRO's flattened
    and partitioned buffers), which drifts ~1e-6 per step through 6 AdamW steps; a real bug (wrong
    batch, missed accumulation, a rank's gradient lost, lr off by a step) moves the loss by > 1e-2."""
    ref = _losses(zero_runs[0])
    assert len(ref) == 6 and ref[-1] < ref[0]  # it learns
    for stage in (1, 2, 3):
        got = _losses(zero_runs[stage])
        np.testing.assert_allclose(got, ref, rtol=2e-3, err_msg=f"ZeRO-{stage} (2 workers{', killed at step 4 and restarted' if stage == 1 else ''}) vs ZeRO-0 (1 worker)")
        lrs = [h["lr"] for h in zero_runs[stage].history if "lr" in h]
        assert lrs == pytest.approx([h["lr"] for h in zero_runs[0].history if "lr" in h], rel=1e-9)
    for r in zero_runs.values():  # the same samples at every step, whatever the world size
        assert {s: sorted(k) for s, k in _trace(r.run_dir).items()} == {s: sorted(k) for s, k in _trace(zero_runs[0].run_dir).items()}


def test_run_writes_metrics_tensorboard_curve_and_a_checkpoint(zero_runs):
    r = zero_runs[2]
    assert r.steps == 6 and r.checkpoint
    row = r.history[-1]
    for k in ("loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_frac", "rss_mb", "skipped_samples"):
        assert k in row, k
    assert 0 <= row["data_wait_frac"] <= 1 and row["grad_norm"] > 0 and row["nodes"] == 1
    run_dir = storage.url_to_fs(r.run_dir)[1]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run_dir, "tb")))
    from PIL import Image

    assert Image.open(os.path.join(run_dir, "loss.png")).size[0] > 400
    state = checkpoint.load(r.checkpoint, rank=1)
    assert state.step == 6 and state.world_size == 2 and state.loader and state.tokenizer
    assert checkpoint.saved_loader_ranks(r.checkpoint) == [0, 1]


@pytest.mark.parametrize("stage", [2, 3])
def test_export_then_load_for_inference_gives_the_live_models_embeddings(zero_runs, stage, tmp_path):
    """Export (ZeRO shards consolidated by zero_to_fp32) → load without DeepSpeed → the same
    embeddings as the trained weights (rebuilt here from the checkpoint's module state)."""
    from radforge.loader import build_loader

    res = zero_runs[stage]
    out = checkpoint.export(res.checkpoint, str(tmp_path / "model"))
    lm = checkpoint.load_for_inference(out)
    meta = checkpoint.read_model_meta(out)
    assert meta["kind"] == "clip" and meta["step"] == 6 and meta["profile"]["profile_id"]
    assert lm.model_id.startswith("tiny-clip-xray-") and lm.findings
    # the same weights as ZeRO-0's run (same trajectory), within the trajectory tolerance
    ref = checkpoint.load_for_inference(checkpoint.export(zero_runs[0].checkpoint, str(tmp_path / "ref")))
    r = config.from_dict(TrainRecipe, meta["recipe"])
    data = config.from_dict(type(r.data), {**config.to_dict(r.data), "num_workers": 0})
    batch = next(iter(build_loader(data, lm.view, split="train", batch_size=8, train=False)))
    a, b = lm.embed_images(batch["image"]), ref.embed_images(batch["image"])
    assert a.shape == (8, 64) and torch.allclose(a.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(a, b, atol=2e-3)
    p = lm.zero_shot(batch["image"], lm.findings)
    assert p.shape == (8, len(lm.findings)) and bool(((p >= 0) & (p <= 1)).all())


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(zero_runs, kill_marker):
    """The ZeRO-1 run of `zero_runs`: rank 1 killed its own process (os._exit) at step 4, once;
    Ray Train restarted the worker group from the step-3 checkpoint and the run ended at step 6
    with the uninterrupted losses (here against ZeRO-2's; the trajectory test holds it to ZeRO-0's
    losses and samples step by step)."""
    res = zero_runs[1]
    assert kill_marker.exists() and res.steps == 6
    np.testing.assert_allclose(_losses(res), _losses(zero_runs[2]), rtol=2e-3)
    assert [h["step"] for h in res.history if "loss" in h] == [1, 2, 3, 4, 5, 6]  # no doubled steps


def _copy_shard_set(src: str, dest: str) -> str:
    """The manifest and every shard it lists, byte for byte, from `src` to `dest` (any storage URL)."""
    m = shardspec.read_manifest(src)
    for rec in m["shards"]:
        storage.write_bytes_atomic(storage.join(dest, rec["path"]), storage.read_bytes(storage.join(src, rec["path"])))
    storage.write_bytes_atomic(storage.join(dest, shardspec.MANIFEST), storage.read_bytes(storage.join(src, shardspec.MANIFEST)))
    return dest


def _mix(shards: str, tmp: Path, workers: int, ckpt: str) -> TrainRecipe:
    """tiny-mix-ct-xray shrunk: CT 8×16×16 and X-ray 32 px, one source each on the session corpus,
    global batch 8, 8 steps, a checkpoint every 3 (to `ckpt`), no retries (a kill ends the run)."""
    return config.load(TrainRecipe, str(RECIPES / "tiny-mix-ct-xray.yaml"), [
        f"data.sources=[{{shards: {shards}, image: ct, weight: 0.5, name: ct}}, "
        f"{{shards: {shards}, image: xray, weight: 0.5, name: xray}}]",
        "steps=8", "log_every=1", "data.num_workers=0", "data.shuffle_buffer=8", f"scale.num_workers={workers}",
        f"deepspeed.micro_batch={8 // workers}", "optim.warmup_steps=2", "checkpoint.every_steps=3", "eval.every_steps=0",
        "eval.split=none", "view.ct_size=[8, 16, 16]", "view.xray_size=32", "model.patch_ct=[4, 8, 8]", "model.patch_xray=8",
        "checkpoint.max_failures=0", f"checkpoint.storage_path={ckpt}", f"output_dir={tmp / 'runs'}"])


def test_mixed_ct_xray_run_learns_both_and_resumes_on_other_worker_counts(shards, tmp_path, ray_cluster, s3_bucket):
    """One MAE for CT and X-ray (a patch embedding each, one transformer) under ZeRO-2, trained
    as a chain of three jobs on 2 → 1 → 2 workers: job 1 dies after step 4 (checkpoint 3), job 2
    resumes it on ONE worker (universal checkpoint, loader re-plan) and dies after step 7
    (checkpoint 6), job 3 finishes on two. Each batch is one kind and every rank takes the same
    kind at the same step (else ZeRO would hang or mix shapes); both kinds' losses fall across the
    resumes; 8 steps × 8 samples fit one epoch of each source, so no sample may come twice.
    Shards AND checkpoints live on the moto S3 endpoint (this chain is also the resume-across-runs
    test on S3: job 1 leaves exactly the step-3 checkpoint there, the later jobs resume from S3,
    the export is written to and loaded from S3); the traces stay local (train.TraceSamples)."""
    from ray.train import TrainingFailedError

    local_shards, shards = shards, _copy_shard_set(shards, f"{s3_bucket}/shards")
    ckpt = f"{s3_bucket}/ckpt"
    hooks = [train.TraceSamples(), train.KillAt(step=4, rank=0, marker=str(tmp_path / "k4")),
             train.KillAt(step=7, rank=0, marker=str(tmp_path / "k7"))]
    for i, workers in enumerate((2, 1, 2)):
        r = _mix(shards, tmp_path, workers, ckpt)
        if i < 2:
            with pytest.raises((TrainingFailedError, RuntimeError)):
                train.run(r, resume="never" if i == 0 else "auto", progress=False, hooks=hooks)
            if i == 0:  # a crashed job: what it left on S3 is the step-3 checkpoint, nothing later
                assert [checkpoint.load(u).step for u in checkpoint.find(f"{ckpt}/{r.name}")] == [3]
        else:
            res = train.run(r, resume="auto", progress=False, hooks=hooks)
    assert res.steps == 8 and (tmp_path / "k4").exists() and (tmp_path / "k7").exists()
    assert res.checkpoint.startswith(f"{ckpt}/{r.name}/")
    rows = [h for h in res.history if "loss" in h]
    assert [h["step"] for h in rows] == list(range(1, 9))
    kinds_by_step = [("ct" if "loss_ct" in h else "xray") for h in rows]
    assert all(("loss_ct" in h) != ("loss_xray" in h) for h in rows)  # one kind per step, on every rank
    for kind in ("ct", "xray"):
        losses = [h[f"loss_{kind}"] for h in rows if f"loss_{kind}" in h]
        assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], (kind, losses)  # learns, through both resumes
        assert abs(rows[-1][f"mix_{kind}_frac"] - 0.5) <= 2 / 8  # ±2 batches of 8 (loader guarantee)
    trace = _trace(res.run_dir)
    assert sorted(trace) == list(range(1, 9)) and all(len(trace[s]) == 8 for s in trace)  # global batch kept
    rank0 = [json.loads(ln) for ln in open(os.path.join(storage.url_to_fs(res.run_dir)[1], "samples", "rank-00000.jsonl"))]
    # job 2 resumed at step 3 on one worker (8 keys a step), job 3 at step 6 on two (4 each)
    assert {row["step"]: len(row["keys"]) for row in rank0} == {1: 4, 2: 4, 3: 4, 4: 8, 5: 8, 6: 8, 7: 4, 8: 4}
    keys = [k for s in sorted(trace) for k in trace[s]]
    assert len(keys) == len(set(keys)) == 64  # no sample of either source's epoch twice (2→1 and 1→2)
    modality = {raw["__key__"]: json.loads(raw["json"])["modality"]
                for raw in shardspec.iter_samples(local_shards, shardspec.read_manifest(local_shards), split="train")}
    for s, kind in zip(sorted(trace), kinds_by_step):  # each step's batch is of the kind its loss says
        assert {kinds.of_modality(modality[k]).name for k in trace[s]} == {kind}
    lm = checkpoint.load_for_inference(checkpoint.export(res.checkpoint, f"{s3_bucket}/model"))  # one model, both kinds, from S3
    assert lm.kind == "mae"
    assert lm.embed_images(torch.rand(2, 2, 8, 16, 16)).shape == lm.embed_images(torch.rand(2, 1, 32, 32)).shape == (2, 128)


def test_two_node_cluster_places_one_worker_per_node(zero_runs):
    """The ZeRO-3 run of `zero_runs` ran on a simulated 2-node cluster with STRICT_SPREAD: Ray
    Train reports two nodes, and rank 0 and rank 1 traced their samples on different nodes (the
    trajectory test holds its losses to the 1-worker run's)."""
    res = zero_runs[3]
    assert res.steps == 6 and res.metrics.get("nodes") == 2
    d = os.path.join(storage.url_to_fs(res.run_dir)[1], "samples")
    nodes = {json.loads(open(os.path.join(d, n)).readline())["node"] for n in os.listdir(d)}
    assert len(nodes) == 2  # rank 0 and rank 1 on different nodes


# --------------------------------------------------------------------------- learning happens


def test_tiny_clip_learns_zero_shot_findings(shards, tmp_path):
    """Tiny CLIP on the phantom X-rays (findings drawn in pixels, stated in reports), 2 workers,
    ZeRO-2: zero-shot mean AUROC on the held-out test split ≥ 0.8 (chance is 0.5). 80 of the
    recipe's 250 steps (its schedule shortened with it): 0.912 on this corpus (0.906 at 60,
    0.898 once at 125, 0.972 at 250)."""
    from radforge import evaluate

    r = config.load(TrainRecipe, str(RECIPES / "tiny-clip-xray.yaml"), [
        f"data.shards={shards}", "steps=80", "data.num_workers=0", "eval.every_steps=0", "eval.bootstrap=100", LAST_CHECKPOINT_ONLY, NO_LOOP_EVAL,
        f"checkpoint.storage_path={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'runs'}"])
    res = train.run(r, resume="never", progress=False)
    assert res.steps == r.steps
    model = checkpoint.export(res.checkpoint, str(tmp_path / "model"))
    result = evaluate.run(model, shards, split="test", protocols=("quick",), cfg=r.eval)
    assert result["mean_auroc"] >= 0.8, evaluate.format_table(result)


def test_tiny_mae_validation_loss_falls_well_below_its_initial_value(shards, tmp_path):
    """Tiny 3D MAE, half the recipe's 60 steps (its schedule shortened with it): validation
    reconstruction loss after / before 0.292 on this corpus (the floor is 0.6)."""
    r = config.load(TrainRecipe, str(RECIPES / "tiny-mae-ct.yaml"), [
        f"data.shards={shards}", "steps=30", "data.num_workers=0", "eval.every_steps=0", LAST_CHECKPOINT_ONLY, NO_LOOP_EVAL,
        f"checkpoint.storage_path={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'runs'}"])
    from radforge import evaluate, models

    view = kinds.CT.view(r.view)
    torch.manual_seed(r.seed)
    init = models.build(r.model, "ct", view.input_shape)
    lm0 = checkpoint.LoadedModel(model=init, kind="mae", image=kinds.CT, view=r.view, profile=Profile(), model_id="init",
                                 findings=[], prompts={})
    cfg = config.from_dict(type(r.eval), {**config.to_dict(r.eval), "findings": []})
    before = evaluate.run(lm0, shards, split="val", protocols=("quick",), cfg=cfg)["recon_loss"]
    res = train.run(r, resume="never", progress=False)
    after = evaluate.run(checkpoint.export(res.checkpoint, str(tmp_path / "model")), shards, split="val", protocols=("quick",), cfg=cfg)["recon_loss"]
    assert after < 0.6 * before, (before, after)


def test_cli_export_and_evaluate(zero_runs, one_shard, tmp_path, capsys):
    from radforge import cli

    out = str(tmp_path / "model")
    assert cli.main(["export", zero_runs[2].checkpoint, out]) == 0
    assert cli.main(["evaluate", out, one_shard, "--split", "train", "--protocol", "zero_shot,retrieval,calibration",
                     "--set", "bootstrap=10", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == "clip" and result["n"] == 48 and "mean_auroc" in result
    assert cli.main(["export", str(tmp_path / "nothing"), out]) == 2  # one-line error, no traceback


# --------------------------------------------------------------------------- DINO under ZeRO


def _tiny_dino(shards: str, tmp: Path, *sets: str, workers: int, stage: int, steps: int = 6) -> TrainRecipe:
    """tiny-dino-xray shrunk like `_tiny`: 32 px, global batch 8, no shuffle, a small head; a
    checkpoint every 3 steps, no retries (a killed worker ends the job); the teacher temperature
    warms up over the run (its value at a step follows the model's step count, a buffer)."""
    return config.load(TrainRecipe, str(RECIPES / "tiny-dino-xray.yaml"), [
        f"data.shards={shards}", f"steps={steps}", "log_every=1", "view.xray_size=32", "view.rand_crop=false",
        "data.num_workers=0", "data.shuffle_buffer=1", f"deepspeed.micro_batch={8 // workers}", f"scale.num_workers={workers}",
        f"deepspeed.zero_stage={stage}", "optim.warmup_steps=2", "checkpoint.every_steps=3", "eval.every_steps=0",
        "checkpoint.max_failures=0", "model.dino.teacher_temp=0.07", "model.dino.teacher_temp_warmup_steps=6",
        "model.dino.out_dim=64", "model.dino.head_hidden=64", "model.dino.head_bottleneck=32", "model.dino.momentum=0.9",
        f"checkpoint.storage_path={tmp / 'ckpt'}", f"output_dir={tmp / 'runs'}", *sets])


@pytest.fixture(scope="module")
def dino_runs(one_shard, tmp_path_factory, ray_cluster):
    """tiny DINO (global batch 8, the one-shard set): 1 worker ZeRO-0 straight through 6 steps,
    and ONE job of 2 workers ZeRO-3 whose rank 0 kills its own process at step 4 (after the
    step-3 checkpoint), once: Ray Train restarts the group (checkpoint.max_failures=1) from the
    step-3 checkpoint for steps 4-6 (a second job resuming it was one Ray Train job more). The
    restarted group must continue with the same EMA teacher, centres and schedule step, which
    live in buffers, not in the optimizer. The kill marker's time is returned beside the runs."""
    out = {}
    tmp = tmp_path_factory.mktemp("dino-z0")
    out[0] = train.run(_tiny_dino(one_shard, tmp, LAST_CHECKPOINT_ONLY, workers=1, stage=0), resume="never", progress=False)
    tmp = tmp_path_factory.mktemp("dino-z3")
    kill = train.KillAt(step=4, rank=0, marker=str(tmp / "killed"))
    out[3] = train.run(_tiny_dino(one_shard, tmp, "checkpoint.max_failures=1", workers=2, stage=3), resume="never",
                       progress=False, hooks=[kill])
    assert (tmp / "killed").exists()
    out["killed_at"] = (tmp / "killed").stat().st_mtime
    return out


def test_dino_zero3_on_two_workers_follows_zero0_on_one_and_exports_its_teacher(dino_runs, one_shard, tmp_path):
    """DINO's loss depends on the global batch only: crops and iBOT masks are drawn per sample
    from (seed, step, key), the centre is all-reduced, each rank's loss is a mean over equal
    micro-batches and the teacher is updated from the full (ZeRO-3: gathered) student on every
    rank. What differs is float32 summation order, as in the CLIP test; DINO's sharp teacher
    softmax (T = 0.04 → 1/T = 25) amplifies a logit difference ~25×, so the CLIP tolerance
    (2e-3) still holds with margin for ~1e-6 drifts; a lost gradient, a rank-dependent crop or a
    teacher updated from a partition moves the loss by > 1e-2.
    Steps 4-6 of the ZeRO-3 run are its worker group restarted from the step-3 checkpoint after
    rank 0 killed itself (`dino_runs`): steps 1-3 were logged before the kill and 4-6 after it
    (so the restart began at step 3, not from scratch), and a teacher, centre or step count
    restarted from the fresh model's changes the targets of every step after the resume, which
    this comparison holds to the uninterrupted run's (the teacher temperature warms up over the 6
    steps here, so a step count restarted at 0 changes them too).
    Then export (ZeRO-3 shards → fp32, the teacher's buffers included) → load: the ZeRO-3 teacher
    embeds like the ZeRO-0 one, and both moved away from the initial student (the EMA ran)."""
    from radforge import models
    from radforge.loader import build_loader

    ref, got = _losses(dino_runs[0]), _losses(dino_runs[3])
    assert len(ref) == 6 and all(np.isfinite(ref)) and ref[-1] < ref[0]  # the loss falls
    rows = [h for h in dino_runs[3].history if "loss" in h]
    assert [h["step"] for h in rows] == [1, 2, 3, 4, 5, 6]  # no step twice
    # the restarted group began at the step-3 checkpoint: the first attempt's rows of steps 1-3 kept
    assert [h["time"] < dino_runs["killed_at"] for h in rows] == [True] * 3 + [False] * 3
    np.testing.assert_allclose(got, ref, rtol=2e-3, err_msg="DINO ZeRO-3 (2 workers, steps 4-6 resumed) vs ZeRO-0 (1 worker)")
    z3 = checkpoint.load_for_inference(checkpoint.export(dino_runs[3].checkpoint, str(tmp_path / "z3")))
    z0 = checkpoint.load_for_inference(checkpoint.export(dino_runs[0].checkpoint, str(tmp_path / "z0")))
    assert z3.kind == "dino" and checkpoint.read_model_meta(str(tmp_path / "z3"))["step"] == 6
    r = _tiny_dino(one_shard, tmp_path, workers=1, stage=0)
    batch = next(iter(build_loader(config.from_dict(type(r.data), {**config.to_dict(r.data), "num_workers": 0}),
                                   z3.view, split="train", batch_size=8, train=False)))
    a, b = z3.embed_images(batch["image"]), z0.embed_images(batch["image"])
    assert a.shape == (8, 128) and torch.allclose(a, b, atol=2e-3)
    torch.manual_seed(r.seed)
    init = models.build(r.model, "xray", kinds.XRAY.view(r.view).input_shape).eval()
    assert (a - init.embed_image(batch["image"])).abs().max() > 1e-2
