"""Vision Transformer encoder for 2D images (X-ray) and 3D volumes (CT).

One class serves both: the patch embedding is a Conv2d or Conv3d whose stride equals the patch
(the standard ViT trick: a strided conv *is* a per-patch linear map), chosen by the length of
`patch`. There is no class token: both objectives here (MAE reconstruction, CLIP with mean
pooling) use the mean of the patch tokens, and a class token would complicate MAE's masking.

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
from collections.abc import Sequence

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
    """Pre-norm transformer block (LN -> attention -> residual, LN -> MLP -> residual)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks + final LayerNorm, with optional activation checkpointing per block."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
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
    """ViT encoder. `forward(images) -> [B, N, width]` (normed tokens); `pool(images) -> [B, width]`.

    `ids_keep` ([B, K] patch indices) runs the encoder on a subset of patches (MAE), with each
    token keeping its own position embedding. `pos_embed="sincos"` is a fixed, non-persistent
    buffer (rebuilt from the shape, so it never goes into checkpoints and never mismatches);
    `"learned"` is a parameter initialised from the sin-cos table.
    """

    def __init__(self, input_shape: Sequence[int], patch: Sequence[int], width: int, depth: int,
                 heads: int, *, mlp_ratio: float = 4.0, pos_embed: str = "sincos"):
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
        self.transformer = Transformer(width, depth, heads, mlp_ratio)
        init_weights(self)

    @property
    def activation_checkpointing(self) -> bool:
        return self.transformer.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.transformer.activation_checkpointing = bool(on)

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        return self.transformer(x)

    def pool(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).mean(dim=1)


def vit(preset: str, input_shape: Sequence[int], patch: Sequence[int], **kwargs) -> ViT:
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; one of {', '.join(PRESETS)}")
    width, depth, heads = PRESETS[preset]
    return ViT(input_shape, patch, width, depth, heads, **kwargs)
