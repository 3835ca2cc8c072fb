"""CLIP (Radford et al., 2021) for image ↔ report: ViT image tower + text tower + linear
projections into a joint space, symmetric InfoNCE with a learnable temperature.

Negatives from every rank: with torch.distributed initialised and world > 1, image and text
embeddings are all-gathered with `torch.distributed.nn.functional.all_gather`, whose backward
sends each rank the gradient for its own samples. Each rank computes the loss for its local
rows against all gathered columns ("local loss", as open_clip's `local_loss=True`): the mean of
the ranks' losses is exactly the single-process loss on the concatenated batch, and after the
data-parallel gradient average (DeepSpeed/DDP) the gradients are exactly the single-process
ones too, at 1/world of the logits compute. Every rank must bring the same micro-batch size
(the loader guarantees it; all_gather needs equal shapes).

The temperature is stored as `logit_scale = log(1/T)` (shape [1]) and clamped to at most 100 in the forward
pass (as in CLIP) so it cannot blow up early in training.

Capabilities (radforge.models.objective): embed_image and embed_text (the joint space) and
zero_shot (CheXzero's positive/negative prompt pair per finding).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from radforge.models.objective import Objective
from radforge.models.vit import ViT

MAX_LOGIT_SCALE = math.log(100.0)


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (with gradients) and this rank's index; (x, 0) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(x), dim=0), dist.get_rank()
    return x, 0


class AttentionPool(nn.Module):
    """One learned query attending over the image tower's patch tokens (multi-head; CLIP's
    ResNet attnpool, SigLIP's MAP head): [B, N, D] -> [B, D]. A finding that covers one patch of a
    hundred (a 5 mm lesion in a 24 mm patch grid) is a hundredth of a mean pool but can take most
    of an attention pool's weight."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        h = self.heads
        q = self.q(self.query.to(tokens.dtype)).expand(b, -1, -1).view(b, 1, h, d // h).transpose(1, 2)
        k, v = self.kv(tokens).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, d)
        return self.norm(self.proj(out))


POOLS = ("mean", "attention")  # model.image_pool


class CLIP(Objective):
    name = "clip"
    capabilities = frozenset({"embed_image", "embed_text", "zero_shot"})
    metrics = ("logit_scale", "accuracy")

    def __init__(self, visual: ViT, text: nn.Module, embed_dim: int, init_temperature: float = 0.07,
                 pool: str = "mean"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"image pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.visual = visual
        self.text = text
        # "mean": the tower's own pool (mean of patch tokens, or its class token); "attention": ours
        self.attn_pool = AttentionPool(visual.width, 4 if visual.width % 4 == 0 else 1) if pool == "attention" else None
        self.image_proj = nn.Linear(visual.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=visual.width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text.width ** -0.5)
        # shape [1], not 0-dim: DeepSpeed's parameter broadcast views every parameter as bytes,
        # which torch refuses for 0-dim tensors.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def save_tokenizer(self, directory: str) -> None:
        """What export writes to `tokenizer/` (small: tokenizer.json; hf: tokenizer + config)."""
        self.text.save_tokenizer(directory)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.visual.pool(images) if self.attn_pool is None else self.attn_pool(self.visual(images))
        return F.normalize(self.image_proj(pooled), dim=-1)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(list(texts))), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, batch: Mapping) -> dict:
        """batch["image"] [B, ...], batch["text"] list[str] -> {"loss", "logit_scale", "accuracy"}.
        `loss` is this rank's share (mean over ranks = global loss); `accuracy` is the local
        image→text top-1 against all gathered texts."""
        img = self.embed_image(batch["image"])
        txt = self.embed_text(batch["text"])
        all_img, rank = _gather(img)
        all_txt, _ = _gather(txt)
        scale = self.scale()
        labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
        logits_i = scale * img @ all_txt.T
        logits_t = scale * txt @ all_img.T
        loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
        with torch.no_grad():
            acc = (logits_i.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "logit_scale": scale.detach(), "accuracy": acc}

    @torch.no_grad()
    def zero_shot_from_embeddings(self, image_emb: torch.Tensor, findings: list[str],
                                  positive: str = "{finding} is present.", negative: str = "no {finding}.") -> torch.Tensor:
        """P(finding) per image: softmax over the scaled similarities to the positive and the
        negative prompt (CheXzero's recipe). image_emb: L2-normalised [B, E] -> [B, F]."""
        prompts = [p.format(finding=f) for f in findings for p in (positive, negative)]
        t = self.embed_text(prompts).float().to(image_emb.device).view(len(findings), 2, -1)
        scale = self.scale().float().to(image_emb.device)
        logits = scale * torch.einsum("be,fke->bfk", image_emb.float(), t)
        return logits.softmax(dim=-1)[..., 0]
