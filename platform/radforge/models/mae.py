"""Masked autoencoder (He et al., 2021) for 3D CT volumes and 2D X-rays.

The encoder sees only the visible patches (1 - mask_ratio of them), which is what makes MAE
cheap enough for 3D: at 75% masking a 3D ViT-B runs on a quarter of the tokens. A light decoder
(`decoder_width`/`decoder_depth`) gets the encoded tokens plus a shared mask token at every
hidden position and predicts the pixels of each patch; the loss is the MSE on masked patches
only, on per-patch normalised pixels when `norm_pix_loss` (the paper's better default; it also
makes the loss scale independent of the HU window).

Masking is per sample: `n_keep = round(N * (1 - mask_ratio))` patches chosen by argsort of
uniform noise, so exactly the same count is hidden in every sample (batched gather, no padding).
Evaluation passes a seeded `torch.Generator` so the validation loss is reproducible.

Capabilities (radforge.models.objective): embed_image (the unmasked encoder, mean-pooled,
L2-normalised) and reconstruct; no text tower, so no zero-shot.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from radforge.models.objective import Objective
from radforge.models.vit import ViT, Transformer, encoder_weights, init_weights, sincos_pos_embed


class MAE(Objective):
    name = "mae"
    capabilities = frozenset({"embed_image", "reconstruct"})
    metrics = ()

    def __init__(self, encoder: ViT, *, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 decoder_width: int = 128, decoder_depth: int = 2, decoder_heads: int | None = None):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError("mask_ratio must be in (0, 1)")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        pe = encoder.patch_embed
        if decoder_heads is None:  # 32-wide heads, as many as divide the width
            decoder_heads = max(h for h in range(1, decoder_width + 1) if decoder_width % h == 0 and decoder_width // h >= 32) \
                if decoder_width >= 32 else 1
        self.decoder_embed = nn.Linear(encoder.width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(pe.grid, decoder_width)[None], persistent=False)
        self.decoder = Transformer(decoder_width, decoder_depth, decoder_heads)
        self.decoder_pred = nn.Linear(decoder_width, pe.patch_dim)
        init_weights(self.decoder)
        init_weights(self.decoder_embed)
        init_weights(self.decoder_pred)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- pieces ---------------------------------------------------------------------------------

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def n_keep(self) -> int:
        return max(1, int(round(self.num_patches * (1 - self.mask_ratio))))

    def random_masking(self, batch_size: int, device, generator: torch.Generator | None = None):
        """-> (ids_keep [B, K], mask [B, N] with 1 = hidden, ids_restore [B, N])."""
        n = self.num_patches
        noise = torch.rand(batch_size, n, generator=generator, device=generator.device if generator else device)
        noise = noise.to(device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : self.n_keep()]
        mask = torch.ones(batch_size, n, device=device)
        mask[:, : self.n_keep()] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_keep, mask, ids_restore

    def _decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, k, d = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(b, n - k, d)], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, d))  # back to patch order
        x = self.decoder(x + self.decoder_pos_embed)
        return self.decoder_pred(x)

    def _target(self, images: torch.Tensor):
        target = self.encoder.patch_embed.patchify(images)
        if not self.norm_pix_loss:
            return target, None, None
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        return (target - mean) / (var + 1e-6).sqrt(), mean, var

    # -- public ---------------------------------------------------------------------------------

    def predict(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """The masked forward pass: {"loss", "pred" [B, N, patch_dim], "mask" [B, N] 1 = hidden}."""
        ids_keep, mask, ids_restore = self.random_masking(images.shape[0], images.device, generator)
        latent = self.encoder(images, ids_keep)
        pred = self._decode(latent, ids_restore)
        target, _, _ = self._target(images)
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss, "pred": pred, "mask": mask}

    def forward(self, batch: Mapping | torch.Tensor, *, generator: torch.Generator | None = None) -> dict:
        """batch["image"] [B, *input_shape] -> {"loss"}: MSE on the masked patches."""
        images = batch["image"] if isinstance(batch, Mapping) else batch
        return {"loss": self.predict(images, generator)["loss"]}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder, mean-pooled: [B, width] (not normalised; `embed_image` is)."""
        return self.encoder.pool(images)

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encode(images).float(), dim=-1)

    def reconstruction_loss(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.predict(images, generator)["loss"]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """For pictures: {"masked": input with hidden patches zeroed, "reconstruction": visible
        patches from the input + predicted hidden ones (de-normalised with each patch's own
        mean/var when norm_pix_loss, as in the MAE paper's figures), "mask": 1 = hidden},
        all shaped like `images`."""
        out = self.predict(images, generator)
        pe = self.encoder.patch_embed
        patches = pe.patchify(images)
        pred = out["pred"]
        if self.norm_pix_loss:
            _, mean, var = self._target(images)
            pred = pred * (var + 1e-6).sqrt() + mean
        m = out["mask"][..., None]
        return {
            "masked": pe.unpatchify(patches * (1 - m)),
            "reconstruction": pe.unpatchify(patches * (1 - m) + pred * m),
            "mask": pe.unpatchify(m.expand_as(patches).contiguous()),
        }


def load_encoder_state(clip_model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Initialise an image tower (`clip_model.visual`, a ViT) from the image encoder in an
    exported model's state dict (`vit.encoder_weights`: an MAE's `encoder.*`, a CLIP's `visual.*`,
    a DINO teacher, a finetune, an HF tower mapped by models.hf) with `ViT.load_pretrained`:
    strict, so a mismatch is a ValueError naming the tensors, never a silent partial load.
    Returns the keys loaded."""
    return clip_model.visual.load_pretrained(encoder_weights(state_dict))
