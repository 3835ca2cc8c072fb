"""Vision Transformer encoder for 2D images (X-ray) and 3D volumes (CT).

One class serves both: the patch embedding is a Conv2d or Conv3d whose stride equals the patch
(the standard ViT trick: a strided conv *is* a per-patch linear map), chosen by the length of
`patch`. radforge's own towers have no class token: MAE reconstruction and CLIP with mean
pooling use the mean of the patch tokens, and a class token would complicate MAE's masking. The
structures of public weights (DINOv2, HF ViT, CLIP vision: class token, register tokens, layer
scale, pre-norm, their eps and activation) are optional pieces named by `STYLES`, off by default.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks
flash / memory-efficient kernels on GPUs and the math kernel on CPU; nothing here is
hand-fused. Activation checkpointing (`torch.utils.checkpoint`, non-reentrant) trades ~30% more
compute for activations of one block instead of all; radforge.train switches it on from
`deepspeed.activation_checkpointing`.

Presets follow the ViT paper for small/base/large (width/depth/heads: 384/12/6, 768/12/12,
1024/24/16). `tiny` is NOT DeiT-Ti (192/12/3): it is 128/4/4, small enough that CPU tests and
the demo train in seconds; use `small` or larger for real runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (width, depth, heads)
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def sincos_pos_embed(grid: Sequence[int], dim: int) -> torch.Tensor:
    """Fixed sin-cos position embedding for a 1/2/3-D patch grid: [prod(grid), dim].

    Each axis gets an equal share of the channels (rounded down to an even number; leftover
    channels stay zero), with the usual 1/10000^(2i/d) frequencies (MAE's 2D version, extended
    per axis)."""
    per_axis = (dim // len(grid)) // 2 * 2
    if per_axis < 2:
        raise ValueError(f"width {dim} too small for a {len(grid)}-D sin-cos position embedding")
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis // 2))
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


class PatchEmbed(nn.Module):
    """[B, C, *spatial] -> tokens [B, N, D] with a strided Conv2d/Conv3d; also (un)patchify for MAE."""

    def __init__(self, input_shape: Sequence[int], patch: Sequence[int], width: int):
        super().__init__()
        self.in_chans, *spatial = (int(v) for v in input_shape)
        self.patch = tuple(int(p) for p in patch)
        if len(spatial) != len(self.patch) or len(self.patch) not in (2, 3):
            raise ValueError(f"input_shape {tuple(input_shape)} (C + 2 or 3 spatial dims) does not match patch {self.patch}")
        if any(s % p for s, p in zip(spatial, self.patch)):
            raise ValueError(f"patch {self.patch} must divide the input size {tuple(spatial)}")
        self.spatial = tuple(spatial)
        self.grid = tuple(s // p for s, p in zip(spatial, self.patch))
        self.num_patches = math.prod(self.grid)
        self.patch_dim = self.in_chans * math.prod(self.patch)
        conv = nn.Conv3d if len(self.patch) == 3 else nn.Conv2d
        self.proj = conv(self.in_chans, width, kernel_size=self.patch, stride=self.patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, *spatial] -> [B, N, prod(patch) * C], patches in the token order of forward()."""
        b, c = images.shape[:2]
        nd = len(self.patch)
        shape = [b, c]
        for g, p in zip(self.grid, self.patch):
            shape += [g, p]
        x = images.reshape(shape)
        # (b, c, g0, p0, g1, p1, ...) -> (b, g0, g1, .., p0, p1, .., c)
        perm = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
        return x.permute(perm).reshape(b, self.num_patches, -1)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        b = patches.shape[0]
        nd = len(self.patch)
        x = patches.reshape(b, *self.grid, *self.patch, self.in_chans)
        # (b, g0, g1, .., p0, p1, .., c) -> (b, c, g0, p0, g1, p1, ...)
        perm = [0, 1 + 2 * nd]
        for i in range(nd):
            perm += [1 + i, 1 + nd + i]
        return x.permute(perm).reshape(b, self.in_chans, *self.spatial)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # key_padding_mask: [B, N] True = real token; SDPA wants True = attend, broadcast [B,1,1,N].
        mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (LN -> attention -> residual, LN -> MLP -> residual).

    Optional pieces for public weights (radforge.models.hf), off by default so radforge's own
    checkpoints are unchanged: `layer_scale` (DINOv2's per-channel scale on both residual
    branches, `ls1`/`ls2`), the LayerNorm `eps` and the MLP activation (`act`: gelu | quick_gelu,
    OpenAI CLIP's x·sigmoid(1.702x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, eps: float = 1e-5, act: str = "gelu",
                 layer_scale: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), _activation(act), nn.Linear(hidden, width))
        if layer_scale:
            self.ls1 = nn.Parameter(torch.ones(width))
            self.ls2 = nn.Parameter(torch.ones(width))
        else:
            self.ls1 = self.ls2 = None

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), key_padding_mask)
        x = x + (a if self.ls1 is None else a * self.ls1)
        m = self.mlp(self.norm2(x))
        return x + (m if self.ls2 is None else m * self.ls2)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Transformer(nn.Module):
    """A stack of blocks + final LayerNorm, with optional activation checkpointing per block.
    `block` keyword arguments (eps, act, layer_scale) go to every Block; `eps` to the final norm too."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, **block):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, **block) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=block.get("eps", 1e-5))
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, key_padding_mask, use_reentrant=False)
            else:
                x = blk(x, key_padding_mask)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """MAE/timm initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):  # as a linear map over the flattened patch
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """ViT encoder. `forward(images) -> [B, N, width]` (normed patch tokens); `pool(images) -> [B, width]`.

    `ids_keep` ([B, K] patch indices) runs the encoder on a subset of patches (MAE), with each
    token keeping its own position embedding. `pos_embed="sincos"` is a fixed, non-persistent
    buffer (rebuilt from the shape, so it never goes into checkpoints and never mismatches);
    `"learned"` is a parameter initialised from the sin-cos table.

    Optional pieces, all off by default (radforge's own towers and checkpoints are unchanged),
    for the structures of public weights (`STYLES`, radforge.models.hf): a class token
    (`cls_token`, its position folded in: it is one learned vector either way), `registers`
    extra learned tokens after it (DINOv2 with registers; no position), `pre_norm` (a LayerNorm
    on the embedded tokens before the blocks: CLIP's pre_layrnorm), Block's `layer_scale`, `eps`
    and `act`, and `pool="cls"` (the normed class token instead of the mean of the patch tokens).
    `forward` always returns the patch tokens only, so masking and per-patch heads see the same
    [B, N, D] whatever the style; `tokens()` also returns the prefix (class + register tokens).
    """

    def __init__(self, input_shape: Sequence[int], patch: Sequence[int], width: int, depth: int,
                 heads: int, *, mlp_ratio: float = 4.0, pos_embed: str = "sincos", cls_token: bool = False,
                 registers: int = 0, pre_norm: bool = False, pool: str = "mean", eps: float = 1e-5,
                 act: str = "gelu", layer_scale: bool = False):
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.width = width
        self.patch_embed = PatchEmbed(input_shape, patch, width)
        table = sincos_pos_embed(self.patch_embed.grid, width)[None]
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", table, persistent=False)
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(table.clone())
        else:
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        if pool not in ("mean", "cls") or (pool == "cls" and not cls_token):
            raise ValueError(f"pool must be 'mean' or 'cls' (with cls_token), got {pool!r}")
        self.pool_mode = pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls_token else None
        self.registers = nn.Parameter(torch.zeros(1, registers, width)) if registers else None
        self.num_prefix = int(cls_token) + int(registers)
        self.pre_norm = nn.LayerNorm(width, eps=eps) if pre_norm else None
        self.transformer = Transformer(width, depth, heads, mlp_ratio, eps=eps, act=act, layer_scale=layer_scale)
        init_weights(self)
        for p in (self.cls_token, self.registers):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    @property
    def activation_checkpointing(self) -> bool:
        return self.transformer.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.transformer.activation_checkpointing = bool(on)

    def tokens(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prefix [B, num_prefix, D]: class then register tokens, patches [B, N or K, D]), normed."""
        x = self.patch_embed(images) + self.pos_embed
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        prefix = [p.expand(x.shape[0], -1, -1).to(x.dtype) for p in (self.cls_token, self.registers) if p is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.transformer(x)
        return x[:, : self.num_prefix], x[:, self.num_prefix:]

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.tokens(images, ids_keep)[1]

    def pool(self, images: torch.Tensor) -> torch.Tensor:
        prefix, patches = self.tokens(images)
        return prefix[:, 0] if self.pool_mode == "cls" else patches.mean(dim=1)

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Initialise from another tower's weights (our names: `encoder_weights`, or
        models.hf.read_image_tower), strictly: every tensor of this tower must be given and every
        given tensor must have a place here, else a ValueError naming them. Adapted on the way, so
        a public 2D tower fits the recipe's view: `pos_embed` of another square grid is resized to
        this grid (bicubic, align_corners=False: HF's interpolate_pos_encoding); a patch
        embedding for 3 input channels is summed to 1 (a gray image = the same image on each RGB
        channel), one for 1 channel is spread over C. A 2D source never initialises a 3D tower:
        inflating its patches and positions along z would invent a third axis, so it is refused.
        Returns the names loaded."""
        own = self.state_dict()
        state = dict(state)
        w = state.get("patch_embed.proj.weight")
        if w is not None and w.ndim != own["patch_embed.proj.weight"].ndim:
            raise ValueError(f"a {w.ndim - 2}D image tower cannot initialise this {len(self.patch_embed.grid)}D one "
                             "(radforge does not inflate 2D patch embeddings to 3D; start a CT tower from a 3D "
                             "radforge export or from scratch)")
        if "pos_embed" in state and "pos_embed" in own:
            # antialiased with registers, as HF's Dinov2WithRegisters (DINOv2, ViT, CLIP: without)
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], self.patch_embed.grid,
                                                  antialias=self.registers is not None)
        c = self.patch_embed.in_chans
        if w is not None and w.shape[1] != c and (c == 1 or w.shape[1] == 1):
            state["patch_embed.proj.weight"] = w.sum(1, keepdim=True) if c == 1 else w.repeat_interleave(c, 1) / c
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(f"{k} {tuple(state[k].shape)} (needs {tuple(own[k].shape)})" for k in set(own) & set(state)
                       if state[k].shape != own[k].shape)
        if missing or unexpected or wrong:
            parts = [f"{what} {len(names)}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
                     for what, names in (("missing", missing), ("unexpected", unexpected), ("mismatched shape", wrong)) if names]
            raise ValueError("the initial weights do not fit this image tower (same model.backbone, preset, patch "
                             "and registers as the source?): " + "; ".join(parts))
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return sorted(state)


def resize_pos_embed(pos: torch.Tensor, grid: Sequence[int], *, antialias: bool = False) -> torch.Tensor:
    """Patch position embeddings [1, N0, D] on a square 2D grid -> [1, prod(grid), D] (bicubic)."""
    n0, d = pos.shape[1], pos.shape[2]
    if n0 == math.prod(grid):
        return pos
    side = math.isqrt(n0)
    if side * side != n0 or len(grid) != 2:
        raise ValueError(f"cannot resize {n0} position embeddings to the grid {tuple(grid)} "
                         "(resizing is for square 2D grids)")
    x = pos.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False, antialias=antialias)
    return x.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)


def encoder_weights(state: Mapping[str, torch.Tensor], *, prefer: Sequence[str] = ("teacher.", "encoder.")) -> dict:
    """The image tower inside an exported model's state dict, unprefixed: the tensors below the
    prefix that holds `patch_embed.proj.weight` (MAE and finetune `encoder.`, CLIP `visual.`, …;
    DeepSpeed/compile wrappers `module.`/`_orig_mod.` are stripped). When several towers are
    there (student and teacher) the first of `prefer` wins; ValueError when there is none."""
    clean = {}
    for k, v in state.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        clean[k] = v
    anchor = "patch_embed.proj.weight"
    prefixes = sorted({k[: -len(anchor)] for k in clean if k.endswith(anchor)})
    if not prefixes:
        raise ValueError("the weights hold no image tower (no MAE encoder 'encoder.*', nor any '*patch_embed.proj.weight')")
    prefix = next((p for p in prefer if p in prefixes), prefixes[0]) if len(prefixes) > 1 else prefixes[0]
    return {k[len(prefix):]: v for k, v in clean.items() if k.startswith(prefix)}


# Structures of the image towers of public weights (models.hf maps their tensors onto these):
# style -> ViT keyword arguments. "radforge" is our own (no class token, sin-cos, mean pooling).
STYLES: dict[str, dict] = {
    "radforge": {},
    "dinov2": dict(cls_token=True, pos_embed="learned", pool="cls", eps=1e-6, layer_scale=True),
    "vit": dict(cls_token=True, pos_embed="learned", pool="cls", eps=1e-12),
    "clip": dict(cls_token=True, pos_embed="learned", pool="cls", eps=1e-5, pre_norm=True, act="quick_gelu"),
}


def vit(preset: str, input_shape: Sequence[int], patch: Sequence[int], *, style: str = "radforge",
        registers: int = 0, **kwargs) -> ViT:
    """A ViT of a preset size and a structure `style` (STYLES); `registers` only with dinov2."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; one of {', '.join(PRESETS)}")
    if style not in STYLES:
        raise ValueError(f"unknown ViT style {style!r}; one of {', '.join(STYLES)}")
    if registers and style != "dinov2":
        raise ValueError(f"register tokens are a DINOv2 piece; style {style!r} has none")
    width, depth, heads = PRESETS[preset]
    return ViT(input_shape, patch, width, depth, heads, **{**STYLES[style], "registers": registers, **kwargs})
