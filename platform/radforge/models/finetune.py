"""Fine-tuning (`kind: finetune`): an image tower + a multi-label linear head, trained with BCE
on the shards' finding labels, either every weight (`finetune.method: full`) or only low-rank
adapters (`lora`, Hu et al. 2021, through the `peft` library) on the modules named by
`finetune.lora_targets` (default the ViT's attention projections `attn.qkv`, `attn.proj`) plus
the head. It starts from an exported model's image encoder or a Hugging Face tower
(`model.init_from`, read by checkpoint.read_weights) — from scratch when there is none.

Labels: [B, F] in the order of `findings` (= model.findings = eval.findings, saved in
model.json); NaN (uncertain or not stated) is masked out of the loss, which is the mean BCE over
the known entries (zero, with a gradient path, when a batch has none).

LoRA: `peft.inject_adapter_in_model` replaces each target Linear by a LoRA layer in place
(frozen `base_layer` + `lora_A`/`lora_B`, B zero-initialised so training starts at the source
model's function); every other tower weight is frozen (`requires_grad=False`, so
train._param_groups leaves them out of the optimizer). `exported` folds the adapters into
the base weights (W + alpha/r · B A): what checkpoint.export writes, so an exported LoRA model
is a plain ViT + head (`method: full` in its model.json) that loads with strict=True and needs
no peft, and its encoder initialises other models like any export.

Capabilities: classify ([B, F] sigmoid probabilities in `findings` order) and embed_image
(the pooled tower, L2-normalised), so the frozen-feature protocols apply as to MAE/CLIP/DINO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from radforge.config import FinetuneConfig
from radforge.models.objective import Objective
from radforge.models.vit import ViT


class FineTune(Objective):
    name = "finetune"
    capabilities = frozenset({"embed_image", "classify"})
    metrics = ("labelled",)  # fraction of label entries that were known (not NaN) in the batch

    def __init__(self, encoder: ViT, findings: Sequence[str], cfg: FinetuneConfig | None = None):
        super().__init__()
        if not findings:
            raise ValueError("a finetune model needs its findings (model.findings / eval.findings)")
        self.cfg = cfg or FinetuneConfig()
        self.findings = list(findings)
        self.encoder = encoder
        self.dropout = nn.Dropout(self.cfg.head_dropout)
        self.head = nn.Linear(encoder.width, len(self.findings))
        nn.init.zeros_(self.head.weight)  # starts at p = 0.5 everywhere: the loss is the prior's
        nn.init.zeros_(self.head.bias)
        if self.cfg.method == "lora":
            add_lora(self.encoder, self.cfg)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder.pool(images)))

    def forward(self, batch: Mapping) -> dict:
        """batch["image"] [B, ...], batch["labels"] [B, F] (NaN = unknown) -> {"loss", "labelled"}."""
        logits = self.logits(batch["image"])
        labels = batch["labels"].to(logits.device, torch.float32)
        if labels.shape != logits.shape:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the head's {len(self.findings)} findings "
                             f"{self.findings} (the loader must read eval.findings)")
        known = ~torch.isnan(labels)
        if known.any():
            loss = F.binary_cross_entropy_with_logits(logits.float()[known], labels[known])
        else:
            loss = logits.sum() * 0.0  # keeps every rank's backward in step
        return {"loss": loss, "labelled": known.float().mean().detach()}

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(images).float())

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder.pool(images).float(), dim=-1)


def add_lora(module: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """LoRA adapters (peft) on `cfg.lora_targets` of `module`, in place; freezes the rest of it."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in module.named_modules()]
    for t in cfg.lora_targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"model.finetune.lora_targets: no module named {t!r} in the image tower "
                             f"(its linear layers end in: {', '.join(sorted(_linear_suffixes(module)))})")
    inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules=list(cfg.lora_targets), bias="none"), module)
    for n, p in module.named_parameters():
        p.requires_grad = "lora_" in n
    return module


def _linear_suffixes(module: nn.Module) -> set[str]:
    return {".".join(n.split(".")[-2:]) for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def merge_lora(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict with every adapter folded into its base layer under the plain
    layer name (`x.base_layer.weight` + `x.lora_A/B.<adapter>.weight` -> `x.weight` = W + scaling
    · B A; `x.base_layer.bias` -> `x.bias`): the state dict of the same model with `method: full`.
    `scaling` = lora_alpha / lora_r (peft's, without rank-stabilised scaling)."""
    state = dict(state)
    for key in [k for k in state if k.endswith(".base_layer.weight")]:
        name = key[: -len(".base_layer.weight")]
        w = state.pop(key)
        merged = w.float()
        for a_key in [k for k in state if k.startswith(f"{name}.lora_A.") and k.endswith(".weight")]:
            b_key = a_key.replace(".lora_A.", ".lora_B.")
            merged = merged + scaling * (state.pop(b_key).float() @ state.pop(a_key).float())
        state[f"{name}.weight"] = merged.to(w.dtype)
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


def exported(state: Mapping[str, torch.Tensor], cfg):
    """(state, ModelConfig) an export writes: LoRA merged and `method: full` (see the module doc)."""
    import dataclasses

    if cfg.finetune.method != "lora":
        return dict(state), cfg
    merged = merge_lora(state, cfg.finetune.lora_alpha / cfg.finetune.lora_r)
    return merged, dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, method="full"))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
