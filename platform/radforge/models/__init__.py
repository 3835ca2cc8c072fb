"""Model registry: `build(cfg, image, input_shape, tokenizer)` -> an nn.Module whose
`forward(batch) -> {"loss", ...}` consumes the loader's batches.

Imports nothing of radforge's but `radforge.config` and `radforge.kinds` (ARCHITECTURE.md), so training, export,
evaluation and serving all rebuild models the same way from a `ModelConfig`.

    mae   MAE(ViT 2D/3D)                         .encode(images) -> [B, width]; .reconstruct(images)
    clip  CLIP(ViT 2D/3D, small or HF text tower) .encode_image / .encode_text -> L2-normalised [B, E]

The image dimensionality follows `image` (a `kinds.ImageKind`: `cfg.patch(image)` has its
`ndim`); `input_shape` is the model view's ([C, z, y, x] or [1, s, s]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from radforge.config import ModelConfig
from radforge import kinds
from radforge.kinds import ImageKind
from radforge.models import text as text_mod
from radforge.models.clip import CLIP
from radforge.models.mae import MAE, load_encoder_state
from radforge.models.vit import PRESETS, Transformer, ViT, vit


def _patch(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int]) -> tuple[int, ...]:
    patch = cfg.patch(image)
    if len(input_shape) != len(patch) + 1:
        raise ValueError(f"input_shape {tuple(input_shape)} does not fit a {image.name} model (C + {len(patch)} spatial dims)")
    return patch


def build_mae(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int], tokenizer=None, *, pretrained: bool = True) -> MAE:
    encoder = vit(cfg.preset, input_shape, _patch(cfg, image, input_shape))
    return MAE(encoder, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
               decoder_width=cfg.decoder_width, decoder_depth=cfg.decoder_depth)


def build_clip(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int], tokenizer=None, *, pretrained: bool = True) -> CLIP:
    visual = vit(cfg.preset, input_shape, _patch(cfg, image, input_shape))
    text = text_mod.build_text_encoder(cfg.text, tokenizer, pretrained=pretrained)
    model = CLIP(visual, text, cfg.embed_dim, cfg.init_temperature)
    if cfg.init_from and pretrained:
        load_encoder_state(model, _read_safetensors(cfg.init_from))
    return model


def _read_safetensors(model_dir: str) -> dict:
    """model.safetensors of an exported model dir (any fsspec URL)."""
    import fsspec
    from safetensors.torch import load as st_load

    url = model_dir.rstrip("/") + "/model.safetensors"
    with fsspec.open(url, "rb") as f:
        return st_load(f.read())


REGISTRY: dict[str, Callable[..., nn.Module]] = {"mae": build_mae, "clip": build_clip}


def build(cfg: ModelConfig, image: ImageKind | str, input_shape: Sequence[int], tokenizer=None, *,
          pretrained: bool = True, activation_checkpointing: bool = False) -> nn.Module:
    """Build `cfg.kind` for an image kind (or its name, as recipes and model.json say it).
    `tokenizer`: the trained text.Tokenizer (CLIP with a small text tower).
    `pretrained=False` skips loading outside weights (HF text weights, `init_from` MAE encoder):
    for callers that load a full state dict next (export, inference)."""
    if cfg.kind not in REGISTRY:
        raise ValueError(f"unknown model kind {cfg.kind!r}; one of {', '.join(REGISTRY)}")
    image = kinds.get(image) if isinstance(image, str) else image
    model = REGISTRY[cfg.kind](cfg, image, tuple(int(v) for v in input_shape), tokenizer, pretrained=pretrained)
    set_activation_checkpointing(model, activation_checkpointing)
    return model


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Checkpoint every transformer block's activations (recompute in backward) when `on`."""
    for m in model.modules():
        if isinstance(m, Transformer):
            m.activation_checkpointing = bool(on)


__all__ = ["REGISTRY", "build", "set_activation_checkpointing", "MAE", "CLIP", "ViT", "PRESETS",
           "load_encoder_state"]
