"""Training checkpoints → self-describing model directories → models for inference.

This module owns both layouts; train, tests and tools go through `RunState`, `save`, `load`,
`export` and `load_for_inference`, never through file names. A training checkpoint (written by
`radforge.train` through Ray Train; any fsspec URL):

    state.json            step, DeepSpeed tag, world size, recipe, shard profile, findings
    ds/<tag>/...          DeepSpeed sharded state (module states + one ZeRO shard per rank)
    ds/latest
    loader/rank-R.json    each rank's loader position (all equal: ranks consume in lockstep)
    tokenizer/            the text tower's tokenizer (small: BPE vocabulary; hf: tokenizer files
                          and the model config), for models that embed text

Elastic resume: a checkpoint written by N workers resumes on M ≠ N. `load` gives every rank a
loader position (rank 0's where the checkpoint has none for that rank: the loader re-plans the rest
of the epoch for the new layout), and `load_engine` turns ZeRO-1/2/3 shards, which are laid out per
rank, into a DeepSpeed universal checkpoint (`deepspeed.checkpoint.ds_to_universal`: fp32 weights
and Adam moments per parameter, world-size independent) in a scratch folder of the local copy and
loads that (the engine must be built with `train.deepspeed_config(..., load_universal=True)`:
`needs_universal` says when). ZeRO-0 state is not partitioned and loads under any world size.

`export(checkpoint, out)` writes a model directory that needs nothing else to rebuild the model:

    model.safetensors     consolidated fp32 weights (ZeRO-1/2/3 shards gathered by DeepSpeed's
                          zero_to_fp32, which reads the fp32 master copy, so bf16 runs export
                          their full-precision weights), text tower included; as the objective
                          exports them (`models.ObjectiveSpec.exported`: a LoRA fine-tune's adapters
                          merged into its weights, its model.json `model` then says method full)
    model.json            {"kind", "image", "images", "model", "view", "profile", "findings", "prompts",
                           "recipe", "step", "model_id"} ("images": every kind of a CT + X-ray model,
                           rebuilt as one `models.multi.MultiKind`; "image" is the primary one)
    tokenizer/            copied from the checkpoint: with model.safetensors it rebuilds the text
                          tower, a Hugging Face one too (`model.text.path` is provenance only)

`load_for_inference(dir)` rebuilds it without DeepSpeed (torch + radforge.models only) — what
serving and `radforge evaluate` use. `write_model` writes the same directory from a live model
(benchmarks and tests that need a model without training one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass

from radforge import config, kinds, storage
from radforge.kinds import ImageKind
from radforge.transforms import Profile
from radforge.config import ModelConfig, TrainRecipe, ViewConfig
from radforge.errors import ConfigError

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
_STATE = "state.json"
_DS = "ds"
_LOADER = "loader"
_TOKENIZER = "tokenizer"
_HF_CONFIG = "config.json"  # a Hugging Face model directory (model.init_from)
_MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's (ZeRO-3: one per rank, prefixed zero_pp_rank_N_)


@dataclass
class LoadedModel:
    """A model ready for inference plus everything needed to feed it exactly like in training."""

    model: object  # torch.nn.Module in eval mode
    kind: str  # "mae" | "clip"
    image: ImageKind
    view: ViewConfig  # the exact model view used in training
    profile: Profile  # the shard preprocessing profile the model was trained on
    model_id: str  # name + short digest of the weights
    findings: list[str]
    prompts: dict  # {"positive": "...{finding}...", "negative": "..."}
    device: str = "cpu"

    # Thin calls into the model's objective protocol (radforge.models.objective): a capability
    # the model lacks raises models.Unsupported (a ValueError) from the model itself.

    def embed_images(self, images):
        """[B, *input_shape] → [B, D] float32, L2-normalised (CLIP: joint space; MAE: pooled encoder)."""
        import torch

        with torch.no_grad():
            return self.model.embed_image(images.to(self.device)).float()

    def embed_texts(self, texts: list[str]):
        """[T, D] float32, L2-normalised, in the image embeddings' space (models with "embed_text")."""
        import torch

        with torch.no_grad():
            return self.model.embed_text(list(texts)).float()

    def zero_shot(self, images, findings: list[str]):
        """[B, F] probabilities with the model's own prompts (models with "zero_shot"; CLIP:
        softmax over the scaled similarities to the positive and the negative prompt)."""
        import torch

        with torch.no_grad():
            return self.model.zero_shot(images.to(self.device), list(findings), self.prompts["positive"],
                                        self.prompts["negative"])


# --------------------------------------------------------------------------------------------
# training checkpoints


@dataclass
class RunState:
    """Everything a training checkpoint holds besides DeepSpeed's own engine state.

    `loader` is one rank's loader position (each rank saves and restores its own); the rest is the
    same on every rank and written by rank 0. `world_size` is the writer's: resuming with another
    worker count goes through a universal checkpoint (`needs_universal`, `load_engine`)."""

    step: int  # optimizer steps completed
    world_size: int
    recipe: TrainRecipe
    profile: Profile  # the shard set's preprocessing profile
    findings: list[str]  # label names, in the loader's order
    tokenizer: dict[str, bytes] | None = None  # the text tower's tokenizer files (None: no text)
    loader: dict | None = None  # this rank's loader state_dict
    tag: str = ""  # DeepSpeed checkpoint tag; derived from step when empty

    def __post_init__(self):
        self.tag = self.tag or f"step{self.step:08d}"

    @property
    def image(self) -> ImageKind:
        return kinds.get(self.recipe.data.image)

    def _json(self) -> dict:
        r = self.recipe
        # kind, image and zero_stage restate the recipe for people reading the file
        return {"step": self.step, "tag": self.tag, "world_size": self.world_size, "recipe": config.to_dict(r),
                "profile": self.profile.to_dict(), "findings": list(self.findings), "kind": r.model.kind,
                "image": r.data.image, "zero_stage": r.deepspeed.zero_stage}


def save(directory: str, state: RunState, engine, *, rank: int) -> None:
    """Every rank, into its own local `directory` (Ray Train merges the ranks' directories into one
    checkpoint): its DeepSpeed shard and loader position; rank 0 also state.json and the tokenizer."""
    engine.save_checkpoint(os.path.join(directory, _DS), tag=state.tag)
    _write(os.path.join(directory, _LOADER, f"rank-{rank:05d}.json"), json.dumps(state.loader).encode())
    if rank == 0:
        _write(os.path.join(directory, _STATE), json.dumps(state._json(), indent=1).encode())
        for name, data in (state.tokenizer or {}).items():
            _write(os.path.join(directory, _TOKENIZER, name), data)


def load(url: str, *, rank: int = 0, world_size: int | None = None) -> RunState:
    """The run state of the checkpoint at `url` (any URL), with `rank`'s loader position (rank
    0's when the checkpoint has none for `rank`: a run resumed on more workers than wrote it).
    `world_size`: the resuming run's (informational; any worker count resumes)."""
    try:
        raw = json.loads(storage.read_bytes(storage.join(url, _STATE)))
    except FileNotFoundError:
        raise ConfigError(f"{url} is not a radforge training checkpoint (no {_STATE})") from None
    loader_url = storage.join(url, _LOADER, f"rank-{rank:05d}.json")
    if not storage.exists(loader_url):
        loader_url = storage.join(url, _LOADER, f"rank-{0:05d}.json")
    return RunState(step=int(raw["step"]), world_size=int(raw["world_size"]),
                    recipe=config.from_dict(TrainRecipe, raw["recipe"]), profile=Profile.from_dict(raw["profile"]),
                    findings=list(raw["findings"]), tokenizer=_read_tree(storage.join(url, _TOKENIZER)),
                    loader=json.loads(storage.read_bytes(loader_url)) if storage.exists(loader_url) else None,
                    tag=raw["tag"])


def needs_universal(state: RunState, world_size: int) -> bool:
    """Whether resuming `state` on `world_size` workers needs DeepSpeed's universal checkpoint
    (ZeRO ≥ 1 partitions optimizer state per rank; ZeRO-0 does not)."""
    return world_size != state.world_size and state.recipe.deepspeed.zero_stage > 0


def load_engine(directory: str, state: RunState, engine) -> None:
    """Restore a DeepSpeed engine (weights, optimizer shard, scheduler) from a local checkpoint;
    under another world size (ZeRO ≥ 1) through a universal checkpoint made here."""
    ds_dir = os.path.join(directory, _DS)
    if needs_universal(state, engine.dp_world_size):
        if not engine.load_universal_checkpoint():
            raise ConfigError(f"checkpoint of {state.world_size} workers on {engine.dp_world_size}: build the engine "
                              "with train.deepspeed_config(..., load_universal=True)")
        # DeepSpeed's ZeRO-3 universal load gives every param group group 0's hyperparameters,
        # i.e. weight decay on biases and norms (train._param_groups): keep each group's own
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        own = [{"weight_decay": g["weight_decay"]} for g in getattr(inner, "param_groups", []) if "weight_decay" in g]
        with tempfile.TemporaryDirectory(prefix="radforge-universal-", dir=directory) as uni:
            _to_universal(os.path.join(ds_dir, state.tag), os.path.join(uni, state.tag))
            path, _ = engine.load_checkpoint(uni, tag=state.tag)
        for group, hyper in zip(getattr(inner, "param_groups", []), own):
            group.update(hyper)
        _restore_buffers(os.path.join(ds_dir, state.tag), engine.module)
    else:
        path, _ = engine.load_checkpoint(ds_dir, tag=state.tag)
    if path is None:
        raise RuntimeError("DeepSpeed could not load the checkpoint's engine state")


def _restore_buffers(tag_dir: str, module) -> None:
    """A universal checkpoint restores parameters and optimizer state only (DeepSpeed skips the
    module states), so persistent buffers — DINO's EMA teacher, centres and step count — would
    silently restart from the fresh model's. The module states file holds them whole at every
    ZeRO stage (ZeRO partitions parameters only); copy them back."""
    import glob

    import torch

    files = sorted(glob.glob(os.path.join(tag_dir, "*" + _MODEL_STATES)))
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"] if files else {}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved:
                buf.copy_(saved[name].to(buf.dtype))


def _to_universal(tag_dir: str, out_dir: str) -> None:
    """DeepSpeed's ds_to_universal on one tag folder (every rank's ZeRO shards) → out_dir. In this
    process (no extraction pool): each resuming rank converts its own copy; quiet, like export."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


def local_copy(url: str) -> tuple[str, bool]:
    """A local directory holding the checkpoint at `url`: the directory itself when it is local
    (False: not a copy, keep it), else a fresh temporary copy (True: the caller deletes it)."""
    if storage.is_local(url):
        return _fetch(url, ""), False
    return _fetch(url, tempfile.mkdtemp(prefix="radforge-resume-")), True


def find(url: str) -> list[str]:
    """The training checkpoints below `url` (e.g. a run's storage folder), sorted."""
    if not storage.exists(url):
        return []
    return sorted(storage.parent(u) for u, _ in storage.find_files(url) if storage.basename(u) == _STATE)


def newest(url: str) -> str | None:
    """The complete checkpoint with the most steps below `url` (None: none yet). A worker group
    that dies right after a checkpoint can leave it uploaded but not registered with Ray (a
    restarted group's `ray.train.get_checkpoint()` is then an older one, or none); one that dies
    while uploading leaves a part of one, which this skips."""
    done = []
    for u in find(url):
        state = load(u)
        if complete(u, state):
            done.append((state.step, u))
    return max(done)[1] if done else None


def complete(url: str, state: RunState | None = None) -> bool:
    """Whether every writer rank's part of the checkpoint at `url` is on storage: state.json (rank
    0), each rank's loader position and DeepSpeed files (the model states; ZeRO ≥ 1: each rank's
    optimizer partition). `state`: its run state, when already read."""
    state = state or load(url)
    if saved_loader_ranks(url) != list(range(state.world_size)):
        return False
    names = [storage.basename(u) for u, _ in storage.find_files(storage.join(url, _DS, state.tag))]
    needed = [_MODEL_STATES]
    if state.recipe.deepspeed.zero_stage > 0:
        needed += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(state.world_size)]
    return all(any(n.endswith(suffix) for n in names) for suffix in needed)


def saved_loader_ranks(url: str) -> list[int]:
    """The ranks whose loader position the checkpoint at `url` holds."""
    return sorted(int(storage.basename(u)[5:10]) for u, _ in storage.find_files(storage.join(url, _LOADER)))


def tokenizer_files(model) -> dict[str, bytes] | None:
    """A model's text-tower tokenizer (and, for a Hugging Face tower, its config) as files: what
    `RunState.tokenizer` holds. None for models that do not embed text."""
    if "embed_text" not in model.capabilities:
        return None
    with tempfile.TemporaryDirectory(prefix="radforge-tok-") as d:
        model.save_tokenizer(d)
        return _read_tree(d)


def run_tokenizer(run_url: str) -> dict[str, bytes] | None:
    """The tokenizer a run trained once and keeps beside its checkpoints (same vocabulary on every
    resume); None when it has none yet."""
    return _read_tree(storage.join(run_url, _TOKENIZER))


def keep_run_tokenizer(run_url: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(run_url, _TOKENIZER, name), data)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _read_tree(url: str) -> dict[str, bytes] | None:
    """{relative name: bytes} of every file below `url`; None when there is none."""
    if not storage.exists(url):
        return None
    base = storage.absolute(url).rstrip("/")
    files = {u[len(base):].lstrip("/"): storage.read_bytes(u) for u, _ in storage.find_files(url)}
    return files or None


# --------------------------------------------------------------------------------------------
# export


def export(checkpoint_url: str, out_url: str) -> str:
    """Consolidate a training checkpoint into a model directory at `out_url`; returns out_url."""
    import torch

    with tempfile.TemporaryDirectory(prefix="radforge-export-") as tmp:
        local = _fetch(checkpoint_url, os.path.join(tmp, "ckpt"))
        if not os.path.exists(os.path.join(local, _STATE)):
            raise ConfigError(f"{checkpoint_url} is not a radforge training checkpoint (no {_STATE})")
        state = load(local)
        weights = _consolidate(os.path.join(local, _DS), state.tag)
        # safetensors refuses shared storage (tied weights); contiguous clones keep it simple
        weights = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()}
        r = state.recipe
        weights, model_cfg = _exported(r.model, weights)
        _write_model_dir(out_url, weights, state.tokenizer, tmp, {
            "kind": r.model.kind,
            "image": r.data.image,
            "images": list(r.data.images()),  # every kind a CT + X-ray model embeds (primary first)
            "model": config.to_dict(model_cfg),
            "view": config.to_dict(r.view),
            "profile": state.profile.to_dict(),
            "findings": state.findings,
            "prompts": {"positive": r.eval.positive_prompt, "negative": r.eval.negative_prompt},
            "recipe": config.to_dict(r),
            "step": state.step,
            "model_id": f"{r.name}-{{digest}}",
        })
    return out_url


def write_model(out_url: str, model, *, image: ImageKind | str, model_cfg: ModelConfig, view: ViewConfig,
                profile: Profile, model_id: str, findings: list[str] = (), prompts: dict | None = None) -> str:
    """A model directory (the export layout) from a live, untrained-or-not model: for benchmarks
    and tests that need one without a training run. Returns out_url."""
    image = kinds.get(image) if isinstance(image, str) else image
    weights = {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}
    weights, model_cfg = _exported(model_cfg, weights)
    with tempfile.TemporaryDirectory(prefix="radforge-model-") as tmp:
        _write_model_dir(out_url, weights, tokenizer_files(model), tmp, {
            "kind": model_cfg.kind, "image": image.name, "model": config.to_dict(model_cfg), "view": config.to_dict(view),
            "profile": profile.to_dict(), "findings": list(findings), "prompts": dict(prompts or {}), "recipe": {},
            "step": 0, "model_id": model_id})
    return out_url


def _exported(model_cfg: ModelConfig, weights: dict) -> tuple[dict, ModelConfig]:
    """What the objective writes into a model directory (models.ObjectiveSpec.exported: a LoRA
    fine-tune merges its adapters and is saved as `method: full`); as trained otherwise."""
    from radforge import models

    return models.get(model_cfg.kind).exported(weights, model_cfg)


def _write_model_dir(out_url: str, weights: dict, tokenizer: dict[str, bytes] | None, tmp: str, meta: dict) -> str:
    """Weights + tokenizer staged in `tmp` and uploaded, then model.json last, so a reader never
    sees weights without it. "{digest}" in meta["model_id"] becomes the weights' short sha256."""
    from safetensors.torch import save_file

    stage = os.path.join(tmp, "model")
    os.makedirs(stage)
    save_file(weights, os.path.join(stage, WEIGHTS), metadata={"format": "pt"})
    digest = storage.sha256_file(os.path.join(stage, WEIGHTS))[:12]
    for name, data in (tokenizer or {}).items():
        _write(os.path.join(stage, _TOKENIZER, name), data)
    storage.makedirs(out_url)
    fs, path = storage.url_to_fs(out_url)
    fs.put(stage + "/", path.rstrip("/") + "/", recursive=True)  # trailing slashes: copy the contents
    meta = {**meta, "model_id": meta["model_id"].replace("{digest}", digest)}
    storage.write_bytes_atomic(storage.join(out_url, MODEL_JSON), json.dumps(meta, indent=1).encode())
    return digest


def _consolidate(ds_dir: str, tag: str) -> dict:
    """Full fp32 state dict from DeepSpeed's checkpoint: ZeRO-1/2/3 through zero_to_fp32 (the
    fp32 master partitions, gathered); ZeRO-0 has no partitions, its module state is complete."""
    import glob

    import torch

    if glob.glob(os.path.join(ds_dir, tag, "*optim_states.pt")) and _zero_stage(ds_dir, tag) > 0:
        import contextlib
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints its progress (paths, parameter counts, a tqdm bar) to stdout and
        # stderr; an export says what it wrote itself, so keep the terminal to that.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return dict(get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=tag))
    states = torch.load(os.path.join(ds_dir, tag, _MODEL_STATES), map_location="cpu", weights_only=False)
    return dict(states["module"])


def _zero_stage(ds_dir: str, tag: str) -> int:
    import glob

    import torch

    files = sorted(glob.glob(os.path.join(ds_dir, tag, "*optim_states.pt")))
    sd = torch.load(files[0], map_location="cpu", weights_only=False)
    osd = sd.get("optimizer_state_dict", {})
    return int(osd.get("zero_stage", 0)) if isinstance(osd, dict) else 0


def _fetch(url: str, local: str) -> str:
    """A local directory with the contents of `url` (local URLs are used in place)."""
    if storage.is_local(url):
        path = storage.url_to_fs(storage.absolute(url))[1]
        if not os.path.isdir(path):
            raise ConfigError(f"no such checkpoint or model directory: {url}")
        return path
    fs, path = storage.url_to_fs(url)
    if not fs.isdir(path):
        raise ConfigError(f"no such checkpoint or model directory: {url}")
    fs.get(path.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)  # trailing slashes: the contents
    return local


# --------------------------------------------------------------------------------------------
# loading


def read_weights(model_url: str) -> dict:
    """The state dict of an exported model directory (any URL) — what `model.init_from` reads.
    A Hugging Face image model directory instead (config.json, no model.json: Dinov2Model,
    Dinov2WithRegistersModel, ViTModel, CLIPVisionModel; local or any fsspec URL, fetched to a
    temporary directory first) is loaded offline with `from_pretrained` and returned as a radforge
    image tower under `encoder.` (radforge.models.hf), like an MAE export's encoder."""
    from safetensors.torch import load as load_bytes

    if not storage.exists(storage.join(model_url, MODEL_JSON)) and storage.exists(storage.join(model_url, _HF_CONFIG)):
        from radforge.models import hf

        with tempfile.TemporaryDirectory(prefix="radforge-hf-") as tmp:
            local = _fetch(model_url, os.path.join(tmp, "hf"))
            return {f"encoder.{k}": v for k, v in hf.read_image_tower(local).items()}
    try:
        return load_bytes(storage.read_bytes(storage.join(model_url, WEIGHTS)))
    except FileNotFoundError:
        raise ConfigError(f"{model_url} is neither an exported radforge model (no {WEIGHTS}) nor a Hugging Face "
                          f"model directory (no {_HF_CONFIG})") from None


def read_model_meta(model_url: str) -> dict:
    """model.json of an exported model directory (any URL)."""
    try:
        return json.loads(storage.read_bytes(storage.join(model_url, MODEL_JSON)))
    except FileNotFoundError:
        raise ConfigError(f"{model_url} is not an exported radforge model (no {MODEL_JSON}); run `radforge export` first") from None


def load_for_inference(model_url: str, device: str = "cpu") -> LoadedModel:
    """Rebuild an exported model (no DeepSpeed): model.json → radforge.models.build → weights.
    Reads nothing outside `model_url`: a Hugging Face text tower is rebuilt from tokenizer/."""
    from radforge import models

    meta = read_model_meta(model_url)
    model_cfg = config.from_dict(ModelConfig, meta["model"])
    view = config.from_dict(ViewConfig, meta["view"])
    image = kinds.get(meta["image"])
    tokenizer = None
    with tempfile.TemporaryDirectory(prefix="radforge-model-") as tmp:
        tok_url = storage.join(model_url, _TOKENIZER)
        if storage.exists(tok_url):
            local = _fetch(tok_url, os.path.join(tmp, _TOKENIZER))
            if model_cfg.text.kind == "hf":
                model_cfg = dataclasses.replace(model_cfg, text=dataclasses.replace(model_cfg.text, path=local))
            else:
                from radforge.models import text

                tokenizer = text.Tokenizer.load(local)
        shapes = {k: kinds.get(k).view(view).input_shape for k in meta.get("images") or [image.name]}
        model = models.build_multi(model_cfg, shapes, tokenizer, pretrained=False)  # one kind: models.build
    missing, unexpected = model.load_state_dict(read_weights(model_url), strict=False)
    # non-persistent buffers (position tables) are rebuilt from the shape; anything else is an error
    if unexpected or missing:
        raise ConfigError(f"{model_url}: weights do not match the model config (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.to(device).eval()
    return LoadedModel(model=model, kind=meta["kind"], image=image, view=view, profile=Profile.from_dict(meta["profile"]),
                       model_id=meta["model_id"], findings=list(meta["findings"]), prompts=dict(meta["prompts"]), device=device)
