"""DINO / iBOT self-distillation (Caron et al. 2021; Zhou et al. 2022; Oquab et al. 2023, DINOv2;
RAD-DINO continues DINOv2 on radiographs) for 2D X-rays and 3D CT volumes.

A student ViT (models.vit, plus a class token of its own) learns to match an EMA teacher of
itself. Every sample arrives as multi-crop views (`transforms.RandMultiCrop`, applied by the
trainer: ``batch["global_crops"]``, ``["local_crops"]``, ``["crop_masks"]``); the teacher sees the
global crops, the student all of them, with iBOT's hidden patches replaced by a mask token.

Losses (weights in `config.DinoConfig`):
* DINO: cross-entropy between the teacher's centred, sharpened CLS distribution over
  `out_dim` prototypes of one global crop and the student's of every other crop.
* iBOT: the same on the patch tokens the student did not see (teacher: unmasked crop), per
  image averaged over its hidden patches, then over all global crops (crops without hidden
  patches count as 0, so the loss is a plain per-sample mean; DINOv2 divides by the masked crops
  instead, a constant factor of ~mask_prob absorbed by `ibot_weight`). One head serves both
  (DINOv2's default, `separate_head: false`).
* KoLeo (optional): −mean log nearest-neighbour distance of the student's L2-normalised global
  CLS tokens, per crop, within the rank's micro-batch (as DINOv2; it is not rank-invariant).

The head is an MLP (`head_layers`, GELU) to a `head_bottleneck` space, L2-normalised, then
weight-normalised prototypes with the norm fixed at 1 (DINO freezes weight_g = 1), so the
logits are cosines. Teacher temperature warms up linearly from `warmup_teacher_temp`; the EMA
momentum follows a cosine from `momentum` to 1 over `momentum_steps` (both on the optimizer step
the trainer reports through `on_step_end`).

Centering, not Sinkhorn-Knopp: DINOv2 uses SK, which equipartitions a batch over the
prototypes; with the global batches this platform trains on CPU (8-64 samples over 256+
prototypes) the equipartition constraint is far from its regime (B ≪ K) and forces near-uniform
targets. Centering (an EMA of the teacher's mean logits, all-reduced over ranks) is one
all-reduce per step, works at any batch size and is exactly invariant to the world size.

ZeRO 0–3: the teacher is kept OUT of the optimizer and out of ZeRO's partitioning by holding its
weights as persistent buffers, not parameters (`_freeze_as_buffers`). DeepSpeed partitions only
parameters, so every rank holds the full teacher (which it needs for its forward pass anyway),
buffers still travel in every checkpoint (DeepSpeed's module states; zero_to_fp32 copies them)
and in the export, and the teacher never gets gradients, optimizer state or weight decay. The
EMA update (`on_step_end`, called by the trainer after each optimizer step) reads the student:
under ZeRO-3 its parameters are partitions, so it is gathered with
`deepspeed.zero.GatheredParameters` (read-only, in chunks of at most ~50M elements so the
transient full copy stays bounded) and every rank applies the same update to its identical
teacher. Chosen over gathering a partitioned teacher (a second gather plus a scatter back every
step) and over updating partitions in place (ties the code to ZeRO's flat-buffer layout). Cost:
one extra all-gather of the student per step (ZeRO-3 already gathers it twice per step) and
the teacher's full size per GPU (ViT-B: 0.35 GB fp32), which is fine up to ViT-L. Under bf16
the engine casts buffers too; the teacher is put back to fp32 on the first update (a 0.996 EMA
step is below bf16's resolution) and run under autocast in the student's dtype.

Capabilities: embed_image = the teacher backbone's CLS token, L2-normalised (what DINO
evaluates and serves). The teacher backbone is registered as `encoder` (a ViT), so an exported
DINO model is a valid `model.init_from` for CLIP (`load_encoder_state` reads `encoder.*`).

What it learns on the phantoms, measured (in-process, one thread: the tiny recipe's model, view,
crops and optimizer on phantoms.chest_radiograph DX images through Profile.canonical_xray and
the 64 px view, 200 train / 120 held-out studies, 100 steps at batch 32; one-off scripts, not the
demo). An untrained ViT of the same architecture already separates effusion and cardiomegaly
(cosine 20-NN AUROC 1.000 each; a linear probe too), so those figures cannot show learning; the
nodule (a ~2.7 px disc at 64 px) it reads at 0.902. The figure a learned representation has to
win is therefore the nodule's 20-NN AUROC, paired with the untrained init on the same test
samples (bootstrap over them): with the recipe's settings +0.040 (95% CI [0.011, 0.077]); at
32 px, where the untrained ViT is at chance on the nodule (0.47), +0.33 [0.15, 0.51] after 20
steps (tests/test_dino.py asserts CI > 0). Few-shot probes (1/2/5 shots: 0.68/0.80/0.90
untrained) move by ≤ 0.02, retrieving an image from a global crop of it stays at chance.
The earlier settings learned less (+0.021 [0.001, 0.048]; the two CIs overlap, so the retuning
is not shown to be better on this figure, only on the loss): with momentum 0.99 the teacher is
still ~60 % its random init after 100 steps, and with the temperature warming to 0.07 over 256
prototypes the centred teacher went uniform — the DINO loss ended at ln K (5.53 vs 5.55), the
teacher's per-sample entropy 2.5 → 5.2 nats. Now (momentum 0.9, T = 0.04 throughout, K = 16) the DINO
loss falls 3.28 → 1.88 by step 50 (ln K = 2.77; teacher entropy 1.3–2.1, its batch marginal
1.8–2.5: neither one-hot nor uniform), then drifts back towards ln K (2.81 at step 100) as the
backbone's CLS tokens converge (mean cosine between samples 0.9987 → 0.99996): the batch-
standardised head (`head_batch_norm`) hides that collapse from the loss. KoLeo keeps the
CLS tokens apart but does not help the nodule: at 64 px the nodule's 20-NN AUROC falls below
the untrained init's, by 0.113 [0.008, 0.213] with weight 0.1 (DINOv2's; mean cosine 0.997)
and by 0.137 [0.034, 0.236] with weight 1 (mean cosine 0.75), the DINO loss ending at ln K
both times; at 32 px with weight 1 (30 steps, K = 64, lr 3e-3) +0.15 with a CI through 0,
against +0.26 [0.03, 0.45] without it. So it stays off. Holding the momentum at 0.9 (no cosine
to 1) is worse: the teacher collapses onto one prototype by step 60 (batch marginal entropy
0.09), the loss ends above ln K (3.57) and the nodule's gain is +0.034 [−0.007, 0.078]. A CPU run this short is a smoke test of the objective; rad-dino.yaml starts from
DINOv2's weights.

Left out of DINOv2: Sinkhorn-Knopp (above), iBOT block masking
(random patches instead), separate iBOT head, last-layer freezing during the first epoch,
stochastic depth / layer scale / register tokens, blur and solarisation (intensity jitter
only), the high-resolution adaptation phase, and the DINOv2 data curation. The tiny recipe
also leaves DINOv2's schedule (momentum 0.996, teacher temperature warm-up to 0.07, 65536
prototypes) for momentum 0.9, T = 0.04 throughout and 16 prototypes: measured above.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from radforge.models.objective import Objective
from radforge.models.vit import ViT

_GATHER_CHUNK = 50_000_000  # elements gathered at once for the ZeRO-3 EMA update
# state-dict path components that only training needs (DINO.exported leaves them out)
_TRAINING_ONLY = frozenset({"student", "student_cls", "mask_token", "head", "teacher_head", "center", "center_patch",
                            "steps_done"})


class DINOHead(nn.Module):
    """[batch standardisation →] MLP → L2-normalised bottleneck → cosine logits against
    weight-normalised prototypes.

    `batch_norm`: standardise each input feature over the whole global batch (statistics
    all-reduced over ranks and not back-propagated: BatchNorm without affine or running stats, the
    same on 1 or N ranks). DINO's head has a BatchNorm option for the same reason it helps here:
    a randomly initialised ViT maps similar images (phantom radiographs) to nearly the same CLS
    (cosine ≈ 0.9995 between samples), so the centred teacher has nothing sample-specific to
    sharpen and collapses to uniform; standardising across the batch hands the head the
    differences between samples instead of their shared component. Off by default (DINOv2)."""

    def __init__(self, width: int, out_dim: int, hidden: int, bottleneck: int, layers: int = 3, batch_norm: bool = False):
        super().__init__()
        self.batch_norm = batch_norm
        dims = [width] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_norm:
            x = _standardise(x)
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return z @ F.normalize(self.prototypes, dim=-1, eps=1e-6).T.to(z.dtype)


def _standardise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(x − mean) / std per feature over every rank's rows (statistics detached)."""
    with torch.no_grad():
        f = x.detach().float()
        stats = _all_reduce_sum(torch.cat([f.sum(0), (f * f).sum(0), f.new_tensor([f.shape[0]])]))
        n = stats[-1].clamp(min=1)
        mean, sq = stats[: x.shape[-1]] / n, stats[x.shape[-1]: -1] / n
        std = (sq - mean * mean).clamp(min=0).add(eps).sqrt()
    return (x - mean.to(x.dtype)) / std.to(x.dtype)


def _freeze_as_buffers(module: nn.Module) -> None:
    """Every parameter of `module` becomes a persistent buffer of the same name (see the module
    docstring: invisible to the optimizer and to ZeRO partitioning, still in every state dict)."""
    for m in module.modules():
        for name in list(m._parameters):
            p = m._parameters.pop(name)
            if p is not None:
                m.register_buffer(name, p.detach().clone())


def _pos_embed(vit: ViT, grid: tuple[int, ...]) -> torch.Tensor:
    """The ViT's position table for a patch grid: its own, or interpolated (local crops) as
    DINOv2 does (bicubic in 2D, trilinear in 3D), so a small crop sees the whole positional range."""
    pos, native = vit.pos_embed, tuple(vit.patch_embed.grid)
    if tuple(grid) == native:
        return pos
    t = pos.reshape(1, *native, -1).movedim(-1, 1).float()
    mode = "bicubic" if len(native) == 2 else "trilinear"
    t = F.interpolate(t, size=tuple(grid), mode=mode, align_corners=False)
    return t.movedim(1, -1).reshape(1, math.prod(grid), -1).to(pos.dtype)


def _gathered(params: list):
    """Full ZeRO-3 parameters for reading (a no-op for ordinary tensors)."""
    import contextlib

    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


class DINO(Objective):
    name = "dino"
    capabilities = frozenset({"embed_image"})
    metrics = ("dino_loss", "ibot_loss", "koleo_loss", "teacher_temp", "momentum")

    def __init__(self, backbone: ViT, cfg):
        """`backbone`: the student ViT (the teacher starts as its copy); `cfg`: a config.DinoConfig."""
        super().__init__()
        self.cfg = cfg
        width = backbone.width
        # A class token of DINO's own unless the tower has one (model.backbone dinov2/vit/clip:
        # public weights bring theirs, and it travels with the exported tower).
        own_cls = getattr(backbone, "cls_token", None) is None
        if cfg.teacher_only:  # an exported model: the teacher backbone is all there is
            self.encoder = backbone.requires_grad_(False)
            self.teacher_cls = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, width), std=0.02),
                                            requires_grad=False) if own_cls else None
            return
        self.student = backbone
        self.student_cls = nn.Parameter(torch.zeros(1, 1, width)) if own_cls else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        if own_cls:
            nn.init.trunc_normal_(self.student_cls, std=0.02)
        self.head = DINOHead(width, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.head_layers,
                             batch_norm=cfg.head_batch_norm)
        # the teacher: same weights at step 0, buffers from here on
        self.encoder = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head)
        self.register_buffer("teacher_cls", self.student_cls.detach().clone() if own_cls else None)
        _freeze_as_buffers(self.encoder)
        _freeze_as_buffers(self.teacher_head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("center_patch", torch.zeros(1, cfg.out_dim))
        # optimizer steps done: an integer (a bf16 engine casts floating buffers), shape [1] (not
        # 0-dim: DeepSpeed views tensors as bytes when broadcasting)
        self.register_buffer("steps_done", torch.zeros(1, dtype=torch.long))
        self._pairs = self._ema_pairs()
        self._external_to_zero3()

    # -- schedules ------------------------------------------------------------------------------

    def teacher_temp(self, step: int | None = None) -> float:
        c = self.cfg
        step = int(self.steps_done.item()) if step is None else step
        if c.teacher_temp_warmup_steps and step < c.teacher_temp_warmup_steps:
            return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * step / c.teacher_temp_warmup_steps
        return c.teacher_temp

    def momentum(self, step: int | None = None) -> float:
        c = self.cfg
        step = int(self.steps_done.item()) if step is None else step
        if not c.momentum_steps:
            return c.momentum
        progress = min(1.0, step / c.momentum_steps)
        return 1 - (1 - c.momentum) * (math.cos(math.pi * progress) + 1) / 2

    # -- the EMA teacher ------------------------------------------------------------------------

    def _ema_pairs(self) -> list[tuple[str, str]]:
        """(student parameter name, teacher buffer name), by structure."""
        pairs = [("student_cls", "teacher_cls")] if self.student_cls is not None else []
        pairs += [(f"student.{n}", f"encoder.{n}") for n, _ in self.student.named_parameters()]
        pairs += [(f"head.{n}", f"teacher_head.{n}") for n, _ in self.head.named_parameters()]
        return pairs

    def _teacher_fp32(self) -> None:
        for t in [t for _, t in self._pairs] + ["center", "center_patch"]:
            buf = self.get_buffer(t)
            if buf.dtype != torch.float32:
                owner, _, leaf = t.rpartition(".")
                (self.get_submodule(owner) if owner else self)._buffers[leaf] = buf.float()

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        """After optimizer step `step` (1-based count of steps done): teacher ← m·teacher + (1−m)·student."""
        m = self.momentum(step - 1)  # the momentum of the step just taken
        self.steps_done.fill_(step)
        self._teacher_fp32()
        params = dict(self.named_parameters())
        chunk: list[tuple[str, str]] = []
        size = 0
        for s, t in self._pairs:
            chunk.append((s, t))
            size += getattr(params[s], "ds_numel", params[s].numel())
            if size >= _GATHER_CHUNK:
                self._ema_chunk(chunk, params, m)
                chunk, size = [], 0
        if chunk:
            self._ema_chunk(chunk, params, m)

    def _ema_chunk(self, chunk, params, m: float) -> None:
        students = [params[s] for s, _ in chunk]
        with _gathered(students):
            for (s, t), p in zip(chunk, students):
                buf = self.get_buffer(t)
                buf.mul_(m).add_(p.detach().to(buf.dtype), alpha=1 - m)

    # -- forward --------------------------------------------------------------------------------

    def _external_to_zero3(self) -> None:
        """The student tower's own tensors that `_encode` reads outside the tower's forward (a
        learned position table, class/register tokens) are registered with ZeRO-3 as used by this
        module's forward, so it gathers them (training imports deepspeed before building)."""
        import sys

        if "deepspeed" not in sys.modules:
            return
        import deepspeed

        for p in self.student.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(self, p)

    def _encode(self, vit: ViT, cls: torch.Tensor | None, images: torch.Tensor, masks: torch.Tensor | None = None):
        """(CLS [B, D], patch tokens [B, N, D]) of a ViT with a class token (DINO's `cls`, or
        the tower's own) and the tower's register tokens prepended; iBOT's hidden patches
        replaced by the mask token before the position embedding is added."""
        weight = next(itertools.chain(vit.patch_embed.parameters(), vit.patch_embed.buffers()))
        x = vit.patch_embed(images.to(weight.dtype))
        grid = tuple(s // p for s, p in zip(images.shape[2:], vit.patch_embed.patch))
        if masks is not None:
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype), x)
        x = x + _pos_embed(vit, grid).to(x.dtype)
        prefix = [t for t in (getattr(vit, "cls_token", None), getattr(vit, "registers", None)) if t is not None]
        prefix = prefix if prefix and getattr(vit, "cls_token", None) is not None else [cls, *prefix]
        x = torch.cat([*(t.to(x.dtype).expand(x.shape[0], -1, -1) for t in prefix), x], dim=1)
        if getattr(vit, "pre_norm", None) is not None:
            x = vit.pre_norm(x)
        x = vit.transformer(x)
        return x[:, 0], x[:, sum(t.shape[1] for t in prefix):]

    @torch.no_grad()
    def _teacher(self, crops: torch.Tensor, masks: torch.Tensor):
        """Teacher CLS and masked-patch logits (fp32, under autocast in the student's dtype)."""
        self._teacher_fp32()
        dtype = self.mask_token.dtype
        with torch.autocast(crops.device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
            cls, patches = self._encode(self.encoder, self.teacher_cls, crops.float())
            cls_logits = self.teacher_head(cls)
            patch_logits = self.teacher_head(patches[masks])
        return cls_logits.float(), patch_logits.float()

    def _centred_probs(self, logits: torch.Tensor, center: torch.Tensor, temp: float, update: str) -> torch.Tensor:
        """softmax((logits − centre) / T), then the centre's EMA over every rank's rows."""
        probs = F.softmax((logits - center) / temp, dim=-1)
        if self.training:
            stats = torch.cat([logits.sum(0), logits.new_tensor([logits.shape[0]])])
            stats = _all_reduce_sum(stats)
            if stats[-1] > 0:
                cm = self.cfg.center_momentum
                buf = getattr(self, update)
                buf.mul_(cm).add_((stats[:-1] / stats[-1])[None].to(buf.dtype), alpha=1 - cm)
        return probs

    def forward(self, batch: Mapping) -> dict:
        """Multi-crop batch (see the module docstring) → {"loss", "dino_loss", "ibot_loss", "koleo_loss", ...}."""
        if "global_crops" not in batch:
            raise ValueError("DINO trains on multi-crop views: batch needs global_crops/local_crops/crop_masks "
                             "(transforms.RandMultiCrop; radforge.train adds them for objectives that ask for it)")
        c = self.cfg
        if c.teacher_only:
            raise ValueError("this DINO model is an export: it holds only the teacher backbone, which embeds but does not "
                             "train; to continue training, start a run from it with model.init_from")
        g, l_crops, masks = batch["global_crops"], batch["local_crops"], batch["crop_masks"].bool()
        n_g = c.global_crops
        b = g.shape[0] // n_g
        tt = self.teacher_temp()
        t_cls, t_patch = self._teacher(g, masks)
        t_probs = self._centred_probs(t_cls, self.center, tt, "center").view(n_g, b, -1)

        s_cls, s_patches = self._encode(self.student, self.student_cls, g, masks)
        s_logits = [self.head(s_cls).float().view(n_g, b, -1)]
        if l_crops.shape[0]:
            s_local, _ = self._encode(self.student, self.student_cls, l_crops)
            s_logits.append(self.head(s_local).float().view(-1, b, s_logits[0].shape[-1]))
        s_logp = F.log_softmax(torch.cat(s_logits) / c.student_temp, dim=-1)  # [crops, B, K]

        dino, pairs = s_logp.new_zeros(()), 0
        for i in range(n_g):
            for v in range(s_logp.shape[0]):
                if v != i:
                    dino = dino - (t_probs[i] * s_logp[v]).sum(-1).mean()
                    pairs += 1
        dino = dino / pairs

        ibot = s_logp.new_zeros(())
        if c.ibot_weight > 0:
            # Always run (an empty selection on a rank without hidden patches): ZeRO-3 gathers the
            # head's weights on every call and the centre all-reduces, so all ranks must call alike.
            t_pp = self._centred_probs(t_patch, self.center_patch, tt, "center_patch")
            s_pp = F.log_softmax(self.head(s_patches[masks]).float() / c.student_temp, dim=-1)
            per_patch = -(t_pp * s_pp).sum(-1)
            weight = (1.0 / masks.sum(-1).clamp(min=1).float())[:, None].expand_as(masks)[masks]
            ibot = (per_patch * weight).sum() / masks.shape[0]

        koleo = s_logp.new_zeros(())
        if c.koleo_weight > 0:
            for chunk in s_cls.float().view(n_g, b, -1):
                koleo = koleo + _koleo(chunk)
        loss = c.dino_weight * dino + c.ibot_weight * ibot + c.koleo_weight * koleo
        return {"loss": loss, "dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo_loss": koleo.detach(),
                "teacher_temp": torch.tensor(tt), "momentum": torch.tensor(self.momentum())}

    # -- export -------------------------------------------------------------------------------

    @staticmethod
    def exported(state: Mapping[str, torch.Tensor], cfg) -> tuple[dict, object]:
        """What `radforge export` writes (models.ObjectiveSpec.export): the teacher backbone
        (`encoder.*`, and `teacher_cls` when DINO gave the tower its class token), nothing of the
        student, the heads, the centres or the schedule, with `model.dino.teacher_only` set, so
        loading builds just that tower (strict). `encoder.*` is what `model.init_from` reads."""
        keep = {k: v for k, v in state.items() if not _TRAINING_ONLY & set(k.split("."))}
        if not any(k.split(".")[-3:] == ["patch_embed", "proj", "weight"] for k in keep):
            raise ValueError("a DINO export needs the teacher backbone (encoder.*), the weights have none")
        return keep, dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, teacher_only=True))

    # -- inference ------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher backbone's CLS token, L2-normalised: [B, width]."""
        cls, _ = self._encode(self.encoder, self.teacher_cls, images)
        return F.normalize(cls.float(), dim=-1)


def _koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko–Leonenko entropy estimator (DINOv2's KoLeo): −mean log distance to the nearest
    other sample, on L2-normalised rows."""
    if x.shape[0] < 2:
        return x.new_zeros(())
    x = F.normalize(x, dim=-1, eps=eps)
    dots = x @ x.T
    dots.fill_diagonal_(-2.0)
    nn_idx = dots.argmax(dim=1)
    dist = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(dist + eps).mean()
