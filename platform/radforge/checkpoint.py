"""Training checkpoints → self-describing model directories → models for inference.

A training checkpoint (written by `radforge.train` through Ray Train; any fsspec URL):

    state.json            step, DeepSpeed tag, world size, recipe, shard profile, findings
    ds/<tag>/...          DeepSpeed sharded state (module states + one ZeRO shard per rank)
    ds/latest
    loader/rank-R.json    each rank's loader position
    tokenizer/            CLIP small text tower's BPE vocabulary

`export(checkpoint, out)` writes a model directory that needs nothing else to rebuild the model:

    model.safetensors     consolidated fp32 weights (ZeRO-1/2/3 shards gathered by DeepSpeed's
                          zero_to_fp32, which reads the fp32 master copy, so bf16 runs export
                          their full-precision weights)
    model.json            {"kind", "image", "model", "view", "profile", "findings", "prompts",
                           "recipe", "step", "model_id"}
    tokenizer/            CLIP small text tower

`load_for_inference(dir)` rebuilds it without DeepSpeed (torch + radforge.models only) — what
serving and `radforge evaluate` use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

from radforge import config, kinds, storage
from radforge.kinds import ImageKind
from radforge.transforms import Profile
from radforge.config import ModelConfig, TrainRecipe, ViewConfig
from radforge.errors import ConfigError

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"


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
# export


def export(checkpoint_url: str, out_url: str) -> str:
    """Consolidate a training checkpoint into a model directory at `out_url`; returns out_url."""
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="radforge-export-") as tmp:
        local = _fetch(checkpoint_url, os.path.join(tmp, "ckpt"))
        state_path = os.path.join(local, "state.json")
        if not os.path.exists(state_path):
            raise ConfigError(f"{checkpoint_url} is not a radforge training checkpoint (no state.json)")
        with open(state_path) as f:
            state = json.load(f)
        weights = _consolidate(os.path.join(local, "ds"), state["tag"])
        # safetensors refuses shared storage (tied weights); contiguous clones keep it simple
        weights = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()}
        for k in state.get("scalar_params", []):  # trained as shape [1] (see train._scalars_as_vectors)
            if k in weights and weights[k].numel() == 1:
                weights[k] = weights[k].reshape(())
        recipe = config.from_dict(TrainRecipe, state["recipe"])
        out_local = os.path.join(tmp, "model")
        os.makedirs(out_local)
        save_file(weights, os.path.join(out_local, WEIGHTS), metadata={"format": "pt"})
        digest = storage.sha256_file(os.path.join(out_local, WEIGHTS))[:12]
        meta = {
            "kind": state["kind"],
            "image": state["image"],
            "model": config.to_dict(recipe.model),
            "view": config.to_dict(recipe.view),
            "profile": state["profile"],
            "findings": state["findings"],
            "prompts": {"positive": recipe.eval.positive_prompt, "negative": recipe.eval.negative_prompt},
            "recipe": state["recipe"],
            "step": state["step"],
            "model_id": f"{recipe.name}-{digest}",
        }
        with open(os.path.join(out_local, MODEL_JSON), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(os.path.join(local, "tokenizer")):
            shutil.copytree(os.path.join(local, "tokenizer"), os.path.join(out_local, "tokenizer"))
        _publish(out_local, out_url)
    return out_url


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
    states = torch.load(os.path.join(ds_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
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
    files = storage.find_files(url)
    if not files:
        raise ConfigError(f"no such checkpoint or model directory: {url}")
    base = url.rstrip("/")
    for u, _ in files:
        rel = u[len(base):].lstrip("/")
        dest = os.path.join(local, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with storage.open_input(u) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return local


def _publish(local_dir: str, out_url: str) -> None:
    """Upload a finished model dir; model.json last, so a reader never sees weights without it."""
    storage.makedirs(out_url)
    names = []
    for root, _, files in os.walk(local_dir):
        names += [os.path.relpath(os.path.join(root, n), local_dir) for n in files]
    for rel in sorted(names, key=lambda n: n == MODEL_JSON):
        dest = storage.join(out_url, *rel.split(os.sep))
        storage.makedirs(storage.parent(dest))
        storage.put_file_atomic(os.path.join(local_dir, rel), dest)


# --------------------------------------------------------------------------------------------
# loading


def read_weights(model_url: str) -> dict:
    """The state dict of an exported model directory (any URL)."""
    from safetensors.torch import load as load_bytes

    return load_bytes(storage.read_bytes(storage.join(model_url, WEIGHTS)))


def load_for_inference(model_url: str, device: str = "cpu") -> LoadedModel:
    """Rebuild an exported model (no DeepSpeed): model.json → radforge.models.build → weights."""
    from radforge import models

    try:
        meta = json.loads(storage.read_bytes(storage.join(model_url, MODEL_JSON)))
    except FileNotFoundError:
        raise ConfigError(f"{model_url} is not an exported radforge model (no {MODEL_JSON}); run `radforge export` first") from None
    model_cfg = config.from_dict(ModelConfig, meta["model"])
    view = config.from_dict(ViewConfig, meta["view"])
    tokenizer = None
    with tempfile.TemporaryDirectory(prefix="radforge-model-") as tmp:
        tok_url = storage.join(model_url, "tokenizer")
        if meta["kind"] == "clip" and model_cfg.text.kind == "small" and storage.exists(tok_url):
            from radforge.models import text

            local = _fetch(tok_url, os.path.join(tmp, "tokenizer"))
            tokenizer = text.Tokenizer.load(local)
        image = kinds.get(meta["image"])
        model = models.build(model_cfg, image, image.view(view).input_shape, tokenizer, pretrained=False)
    missing, unexpected = model.load_state_dict(read_weights(model_url), strict=False)
    # non-persistent buffers (position tables) are rebuilt from the shape; anything else is an error
    if unexpected or missing:
        raise ConfigError(f"{model_url}: weights do not match the model config (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.to(device).eval()
    return LoadedModel(model=model, kind=meta["kind"], image=image, view=view, profile=Profile.from_dict(meta["profile"]),
                       model_id=meta["model_id"], findings=list(meta["findings"]), prompts=dict(meta["prompts"]), device=device)
