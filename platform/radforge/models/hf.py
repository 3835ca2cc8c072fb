"""Public image towers, offline: a local Hugging Face directory (config.json + weights) of a
`transformers` Dinov2Model, Dinov2WithRegistersModel, ViTModel or CLIPVisionModel, loaded with
`from_pretrained(local_files_only=True)` and mapped onto radforge's ViT (models.vit) names.

    state = read_image_tower(local_dir)     # {"patch_embed.proj.weight": ..., "cls_token": ...}
    vit.load_pretrained(state)              # strict; resizes positions, adapts channels

Only exact structures are mapped: the ViT must be built with the matching `STYLES` entry
(`model.backbone`: dinov2 | vit | clip), the preset of the source's width/depth/heads and its
patch size; anything our ViT cannot express exactly (SwiGLU FFNs, another activation or
LayerNorm eps than the style's, no qkv bias) is refused here, naming the setting. Mapping:

* q, k, v projections → one `attn.qkv` (rows q, k, v); output projection → `attn.proj`.
* class token + its position embedding → `cls_token` (their sum: the token enters the first
  block as that sum either way); the patch positions → `pos_embed` at the source's grid
  (`ViT.load_pretrained` resizes them to the recipe's grid, bicubic as HF's own
  `interpolate_pos_encoding`); DINOv2 register tokens → `registers` (no position, as in HF).
* DINOv2 layer scale → `ls1`/`ls2`; CLIP's pre_layrnorm → `pre_norm`, its post_layernorm (HF
  applies it to the pooled class token only) → the final norm, which radforge applies to every
  token: the class token, the pooled output, is the same; CLIP's bias-free patch embedding gets
  a zero bias. ViTModel's pooler (dense + tanh) and DINOv2's mask token are not part of an
  image tower and are left out.

What comes out is the source model's own `last_hidden_state` (CLIP: post-layernormed) in
radforge's layout [class, registers, patches] — tests/test_hf_init.py checks it against the
source model on a fixed input. Input normalisation is not folded in: the tower sees the
recipe's model view (a gray image counts as the same image on every RGB channel).
"""

from __future__ import annotations

import torch

from radforge.models.vit import PRESETS, STYLES

# config.model_type -> (transformers class name, ViT style)
SOURCES: dict[str, tuple[str, str]] = {
    "dinov2": ("Dinov2Model", "dinov2"),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "dinov2"),
    "vit": ("ViTModel", "vit"),
    "clip_vision_model": ("CLIPVisionModel", "clip"),
    "clip": ("CLIPVisionModel", "clip"),  # a full CLIPModel directory: its vision tower
}
_ACT = {"dinov2": "gelu", "vit": "gelu", "clip": "quick_gelu"}

# Per-layer tensors: our name -> candidate source names (transformers 5, then 4) below a layer prefix.
_LAYER = {
    "norm1": ("norm1", "layernorm_before", "layer_norm1"),
    "q": ("attention.q_proj", "self_attn.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "self_attn.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "self_attn.v_proj", "attention.attention.value"),
    "attn.proj": ("attention.o_proj", "self_attn.out_proj", "attention.output.dense"),
    "norm2": ("norm2", "layernorm_after", "layer_norm2"),
    "mlp.0": ("mlp.fc1", "intermediate.dense"),
    "mlp.2": ("mlp.fc2", "output.dense"),
}
_LAYER_PREFIXES = ("encoder.layer.{i}.", "layers.{i}.", "encoder.layers.{i}.", "vision_model.encoder.layers.{i}.")


def describe(config) -> dict:
    """What radforge settings reproduce an HF config: {"backbone", "preset", "patch", "depth",
    "registers", "channels", "image_size"}; ValueError naming what cannot be expressed."""
    mt = config.model_type
    if mt not in SOURCES:
        raise ValueError(f"Hugging Face model_type {mt!r} is not an image tower radforge maps; "
                         f"one of {', '.join(SOURCES)}")
    if mt == "clip":
        config = config.vision_config
    style = SOURCES[mt][1]
    size = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    preset = next((p for p, s in PRESETS.items() if s == size), None)
    problems = []
    if preset is None:
        problems.append(f"width/depth/heads {size} is no radforge preset ({', '.join(f'{p} {s}' for p, s in PRESETS.items())})")
    mlp = int(config.hidden_size * config.mlp_ratio) if hasattr(config, "mlp_ratio") else config.intermediate_size
    if mlp != 4 * config.hidden_size:
        problems.append(f"MLP width {mlp} is not 4 × {config.hidden_size}")
    if getattr(config, "use_swiglu_ffn", False):
        problems.append("SwiGLU feed-forward layers (DINOv2 giant) are not part of radforge's ViT")
    if not getattr(config, "qkv_bias", True):
        problems.append("attention without qkv bias")
    if config.hidden_act != _ACT[style]:
        problems.append(f"activation {config.hidden_act!r} (style {style} has {_ACT[style]!r})")
    eps = STYLES[style].get("eps", 1e-5)
    if abs(config.layer_norm_eps - eps) > 1e-3 * eps:
        problems.append(f"LayerNorm eps {config.layer_norm_eps:g} (style {style} has {eps:g})")
    if problems:
        raise ValueError(f"Hugging Face {mt} model cannot be reproduced by radforge's ViT: " + "; ".join(problems))
    return {"backbone": style, "preset": preset, "patch": int(config.patch_size),
            "depth": int(config.num_hidden_layers), "registers": int(getattr(config, "num_register_tokens", 0) or 0),
            "channels": int(config.num_channels),
            "image_size": int(config.image_size)}


def load_model(local_dir: str):
    """(the transformers model in eval mode, describe(config)), offline, from a local directory."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(local_dir, local_files_only=True)
    info = describe(config)
    cls = getattr(transformers, SOURCES[config.model_type][0])
    model = cls.from_pretrained(local_dir, local_files_only=True)
    return model.eval(), info


def read_image_tower(local_dir: str) -> dict[str, torch.Tensor]:
    """The image tower of an HF directory as a radforge ViT state dict (source grid and channels)."""
    model, info = load_model(local_dir)
    return map_state(model.state_dict(), info)


def map_state(src: dict[str, torch.Tensor], info: dict) -> dict[str, torch.Tensor]:
    """An HF image model's state dict -> radforge ViT names (see the module docstring)."""
    src = {k.removeprefix("vision_model."): v.detach().float() for k, v in src.items()}
    used: set[str] = set()

    def take(*names: str) -> torch.Tensor:
        for n in names:
            if n in src:
                used.add(n)
                return src[n]
        raise ValueError(f"Hugging Face weights lack {names[0]} (looked for {', '.join(names)})")

    if info["backbone"] == "clip":
        cls, pos = take("embeddings.class_embedding")[None, None], take("embeddings.position_embedding.weight")[None]
        patch_w = take("embeddings.patch_embedding.weight")
        patch_b = torch.zeros(patch_w.shape[0])
    else:
        cls, pos = take("embeddings.cls_token"), take("embeddings.position_embeddings")
        patch_w = take("embeddings.patch_embeddings.projection.weight")
        patch_b = take("embeddings.patch_embeddings.projection.bias")
    out = {"patch_embed.proj.weight": patch_w, "patch_embed.proj.bias": patch_b,
           "cls_token": cls + pos[:, :1], "pos_embed": pos[:, 1:]}
    if info["registers"]:
        out["registers"] = take("embeddings.register_tokens")
    if info["backbone"] == "clip":
        out["pre_norm.weight"], out["pre_norm.bias"] = take("pre_layrnorm.weight"), take("pre_layrnorm.bias")
        final = "post_layernorm"
    else:
        final = "layernorm"
    out["transformer.norm.weight"], out["transformer.norm.bias"] = take(f"{final}.weight"), take(f"{final}.bias")
    for i in range(info["depth"]):
        out.update(_map_layer(take, src, i, layer_scale=info["backbone"] == "dinov2"))
    skipped = {k for k in src if k not in used} - {"embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias"}
    if skipped:
        raise ValueError(f"Hugging Face weights have tensors with no place in radforge's ViT: {sorted(skipped)[:5]}")
    return out


def _map_layer(take, src: dict, i: int, *, layer_scale: bool) -> dict[str, torch.Tensor]:
    prefix = next((p.format(i=i) for p in _LAYER_PREFIXES if any(k.startswith(p.format(i=i)) for k in src)), None)
    if prefix is None:
        raise ValueError(f"Hugging Face weights lack layer {i} (looked for {', '.join(p.format(i=i) for p in _LAYER_PREFIXES)})")
    ours = f"transformer.blocks.{i}."
    out = {}
    for name, cands in _LAYER.items():
        if name in ("q", "k", "v"):
            continue
        for part in ("weight", "bias"):
            out[f"{ours}{name}.{part}"] = take(*(f"{prefix}{c}.{part}" for c in cands))
    for part in ("weight", "bias"):
        out[f"{ours}attn.qkv.{part}"] = torch.cat([take(*(f"{prefix}{c}.{part}" for c in _LAYER[x])) for x in "qkv"])
    if layer_scale:
        out[f"{ours}ls1"] = take(f"{prefix}layer_scale1.lambda1")
        out[f"{ours}ls2"] = take(f"{prefix}layer_scale2.lambda1")
    return out
