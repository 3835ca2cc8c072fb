"""Objective registry: `build(cfg, image, input_shape, tokenizer)` -> an `Objective` (an
nn.Module) whose `forward(batch) -> {"loss", *metrics}` consumes the loader's batches.

Imports nothing of radforge's but `radforge.config` and `radforge.kinds` (ARCHITECTURE.md), so training, export,
evaluation and serving all rebuild models the same way from a `ModelConfig`.

Every model answers the protocol of `radforge.models.objective` (`capabilities`, `embed_image`,
`embed_text`, `zero_shot`, `reconstruct`, `metrics`, `evaluations`); callers ask it, never its
name. REGISTRY has one `ObjectiveSpec` per `ModelConfig.kind` — the builder plus what the
objective needs from the outside before it is built:

    mae   MAE(ViT 2D/3D)                          embed_image, reconstruct
    clip  CLIP(ViT 2D/3D, small or HF text tower) embed_image, embed_text, zero_shot;
                                                  needs a text tower and every sample's report
    finetune  FineTune(ViT 2D/3D + linear head,   classify, embed_image; full or LoRA (peft);
              model.findings)                     export merges LoRA (spec.export)
    dino  DINO(student ViT + EMA teacher, 2D/3D)  embed_image (the teacher's CLS); trains on
                                                  multi-crop views (transforms.RandMultiCrop)

Adding an objective is one module here (a subclass of `Objective`) plus one REGISTRY entry.
The image dimensionality follows `image` (a `kinds.ImageKind`: `cfg.patch(image)` has its
`ndim`); `input_shape` is the model view's ([C, z, y, x] or [1, s, s]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from radforge.config import ModelConfig
from radforge import kinds
from radforge.kinds import ImageKind
from radforge.models import text as text_mod
from radforge.models.clip import CLIP
from radforge.models.dino import DINO
from radforge.models import finetune as finetune_mod
from radforge.models.finetune import FineTune
from radforge.models.mae import MAE, load_encoder_state
from radforge.models.objective import CAPABILITIES, EVALUATIONS, Objective, Unsupported, evaluations_for
from radforge.models.vit import PRESETS, Transformer, ViT, encoder_weights, vit


def _patch(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int]) -> tuple[int, ...]:
    patch = cfg.patch(image)
    if len(input_shape) != len(patch) + 1:
        raise ValueError(f"input_shape {tuple(input_shape)} does not fit a {image.name} model (C + {len(patch)} spatial dims)")
    return patch


def image_tower(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int]) -> ViT:
    """The ViT of a model config: preset size, the image kind's patch, `model.backbone` structure."""
    return vit(cfg.preset, input_shape, _patch(cfg, image, input_shape), style=cfg.backbone, registers=cfg.registers)


def build_mae(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int], tokenizer=None, *, pretrained: bool = True,
              init_encoder=None) -> MAE:
    if init_encoder is not None:
        raise ValueError("model.init_from initialises a CLIP image tower; an MAE starts from scratch")
    encoder = image_tower(cfg, image, input_shape)
    return MAE(encoder, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
               decoder_width=cfg.decoder_width, decoder_depth=cfg.decoder_depth)


def build_clip(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int], tokenizer=None, *, pretrained: bool = True,
               init_encoder=None) -> CLIP:
    visual = image_tower(cfg, image, input_shape)
    text = text_mod.build_text_encoder(cfg.text, tokenizer, pretrained=pretrained)
    model = CLIP(visual, text, cfg.embed_dim, cfg.init_temperature, pool=cfg.image_pool)
    if init_encoder is not None:
        load_encoder_state(model, init_encoder)
    return model


def build_dino(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int], tokenizer=None, *, pretrained: bool = True,
               init_encoder=None) -> DINO:
    student = image_tower(cfg, image, input_shape)
    if init_encoder is not None:  # before the teacher is copied from the student (RAD-DINO: DINOv2's weights)
        student.load_pretrained(encoder_weights(init_encoder))
    return DINO(student, cfg.dino)


def build_finetune(cfg: ModelConfig, image: ImageKind, input_shape: Sequence[int], tokenizer=None, *,
                   pretrained: bool = True, init_encoder=None) -> FineTune:
    encoder = image_tower(cfg, image, input_shape)
    if init_encoder is not None:  # before the adapters: they wrap the loaded layers
        encoder.load_pretrained(encoder_weights(init_encoder))
    return FineTune(encoder, cfg.findings, cfg.finetune)


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: how to build it and what it needs before it is built."""

    model: type[Objective]  # the class: its capabilities, metrics and evaluations
    build: Callable[..., Objective]  # (cfg, image, input_shape, tokenizer, *, pretrained, init_encoder) -> model
    text_tower: bool = False  # takes `cfg.text`; a small text tower needs a trained tokenizer
    require_report: bool = False  # trains on image-report pairs: samples without a report are skipped
    # (state dict, ModelConfig) -> what an export writes (finetune: LoRA merged, method full); None = as trained
    export: Callable[..., tuple] | None = None
    multicrop: bool = False  # trains on multi-crop views: the trainer adds transforms.RandMultiCrop(cfg.dino) views

    @property
    def capabilities(self) -> frozenset[str]:
        return self.model.capabilities

    def exported(self, state: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
        """The weights and model config an exported model directory holds (checkpoint.export)."""
        return self.export(state, cfg) if self.export is not None else (state, cfg)

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.model.metrics

    @property
    def evaluations(self) -> tuple[str, ...]:
        return evaluations_for(self.model.capabilities)


REGISTRY: dict[str, ObjectiveSpec] = {
    "mae": ObjectiveSpec(MAE, build_mae),
    "clip": ObjectiveSpec(CLIP, build_clip, text_tower=True, require_report=True),
    "finetune": ObjectiveSpec(FineTune, build_finetune, export=finetune_mod.exported),
    "dino": ObjectiveSpec(DINO, build_dino, multicrop=True, export=DINO.exported),  # export: the teacher backbone
}


def get(kind: str) -> ObjectiveSpec:
    """The registry entry of an objective (`ModelConfig.kind`, model.json's "kind")."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; one of {', '.join(REGISTRY)}") from None


def build(cfg: ModelConfig, image: ImageKind | str, input_shape: Sequence[int], tokenizer=None, *,
          pretrained: bool = True, init_encoder=None, activation_checkpointing: bool = False) -> Objective:
    """Build `cfg.kind` for an image kind (or its name, as recipes and model.json say it).
    `tokenizer`: the trained text.Tokenizer (CLIP with a small text tower).
    `pretrained=False` skips loading outside weights (HF text weights): for callers that load a
    full state dict next (export, inference). `init_encoder`: the state dict of an exported model
    whose image encoder initialises this one (`model.init_from`; the caller reads it with
    `checkpoint.read_weights`, which owns the model-dir layout)."""
    spec = get(cfg.kind)
    image = kinds.get(image) if isinstance(image, str) else image
    model = spec.build(cfg, image, tuple(int(v) for v in input_shape), tokenizer, pretrained=pretrained,
                       init_encoder=init_encoder)
    set_activation_checkpointing(model, activation_checkpointing)
    return model


def set_activation_checkpointing(model, on: bool) -> None:
    """Checkpoint every transformer block's activations (recompute in backward) when `on`."""
    for m in model.modules():
        if isinstance(m, Transformer):
            m.activation_checkpointing = bool(on)


def build_multi(cfg: ModelConfig, shapes: dict, tokenizer=None, **kw) -> Objective:
    """One `cfg.kind` model for several image kinds (`shapes`: {kind name: input_shape}, primary
    first): a patch embedding per kind, the rest shared (`models.multi.MultiKind`). One kind:
    plain `build`. `kw` as for `build` (init_encoder applies to the first kind's encoder)."""
    from radforge.models.multi import MultiKind

    names = list(shapes)
    if len(names) == 1:
        return build(cfg, names[0], shapes[names[0]], tokenizer, **kw)
    parts = {k: build(cfg, k, shapes[k], tokenizer, **(kw if i == 0 else {**kw, "init_encoder": None}))
             for i, k in enumerate(names)}
    return MultiKind(parts, {k: kinds.get(k).ndim for k in names})


__all__ = ["REGISTRY", "ObjectiveSpec", "get", "build", "set_activation_checkpointing", "Objective", "Unsupported",
           "CAPABILITIES", "EVALUATIONS", "evaluations_for", "MAE", "CLIP", "DINO", "ViT", "PRESETS", "load_encoder_state",
           "FineTune", "image_tower"]
