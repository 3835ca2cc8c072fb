"""One model for several image kinds (CT + X-ray in one run): a modality-specific patch embedding
per kind (Conv3d for CT, Conv2d for X-ray, with their own position tables) and everything else
shared — the encoder transformer, and whatever else of the objective has the same shape for both
kinds (MAE: decoder transformer, mask token, decoder embedding; CLIP: the text tower, projections,
temperature). Shape-specific heads (MAE's pixel predictor, one patch size per kind) stay per kind.

Built by `models.build_multi` from one objective per kind, then tied: a parameter of a later kind
becomes the first kind's parameter of the same name and shape unless it lives in a `patch_embed`.
Parameters are shared objects, so DeepSpeed/ZeRO, optimizers and `named_parameters()` see each
once; `state_dict()` names a shared tensor under every kind (export clones, loading re-ties).

Batches are homogeneous per kind (radforge.loader's mixtures draw each batch from one source),
and the kind of a batch is read from its image: [B, C, z, y, x] is 3D, [B, C, y, x] is 2D. Every
step's loss also touches the other kinds' own parameters with weight 0, so every parameter gets
a gradient at every step on every rank: the graph, and thus DeepSpeed's gradient buckets, are the
same whatever the batch's kind (no rank waits for a reduction another rank skipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from radforge.models.objective import Objective


class MultiKind(Objective):
    """`by_kind`: {kind name: objective for that kind}, ordered (the first one's shared weights
    are the ones kept). `ndims`: {kind name: spatial dims of its images}."""

    name = "multi"

    def __init__(self, by_kind: Mapping[str, Objective], ndims: Mapping[str, int]):
        super().__init__()
        if len(set(ndims.values())) != len(ndims):
            raise ValueError(f"image kinds must differ in dimensionality to be told apart: {dict(ndims)}")
        self.kinds = nn.ModuleDict(dict(by_kind))
        self._kind_of_ndim = {int(n): k for k, n in ndims.items()}
        first = next(iter(by_kind.values()))
        self.name = first.name
        self.capabilities = frozenset.intersection(*(m.capabilities for m in by_kind.values()))
        self.metrics = first.metrics
        self.shared = _tie(list(by_kind.values()))
        users: dict[int, int] = {}
        for m in by_kind.values():
            for p in m.parameters():
                users[id(p)] = users.get(id(p), 0) + 1
        # each kind's own parameters (its patch embedding, shape-specific heads): touched with weight 0
        # when another kind's batch runs
        self._own = {k: [p for p in m.parameters() if users[id(p)] == 1] for k, m in by_kind.items()}

    def kind_of(self, images: torch.Tensor) -> str:
        try:
            return self._kind_of_ndim[images.dim() - 2]
        except KeyError:
            raise ValueError(f"images of shape {tuple(images.shape)} fit none of {sorted(self.kinds)}") from None

    def _for(self, images: torch.Tensor) -> Objective:
        return self.kinds[self.kind_of(images)]

    def forward(self, batch: Mapping | torch.Tensor, **kw) -> dict:
        images = batch["image"] if isinstance(batch, Mapping) else batch
        kind = self.kind_of(images)
        out = dict(self.kinds[kind](batch, **kw))
        # zero-weight touch of the other kinds' own parameters: the same graph on every rank and step
        idle = [p.sum() for k, ps in self._own.items() if k != kind for p in ps if p.requires_grad]
        if idle:
            out["loss"] = out["loss"] + 0.0 * torch.stack(idle).sum()
        return out

    def on_step_end(self, step: int) -> None:
        for m in self.kinds.values():
            m.on_step_end(step)

    # -- capabilities: the kind's own model answers ----------------------------------------------

    def embed_image(self, images):
        return self._for(images).embed_image(images)

    def embed_text(self, texts: Sequence[str]):
        return next(iter(self.kinds.values())).embed_text(texts)

    def save_tokenizer(self, directory: str) -> None:
        next(iter(self.kinds.values())).save_tokenizer(directory)

    def zero_shot(self, images, findings, positive="{finding} is present.", negative="no {finding}."):
        return self._for(images).zero_shot(images, findings, positive, negative)

    def zero_shot_from_embeddings(self, image_emb, findings, positive, negative):
        return next(iter(self.kinds.values())).zero_shot_from_embeddings(image_emb, findings, positive, negative)

    def classify(self, images):
        return self._for(images).classify(images)

    def reconstruction_loss(self, images, generator=None):
        return self._for(images).reconstruction_loss(images, generator)

    def reconstruct(self, images, generator=None):
        return self._for(images).reconstruct(images, generator)


def _tie(models: list[nn.Module]) -> list[str]:
    """Make every parameter of models[1:] that has a same-named, same-shaped parameter in
    models[0] (outside patch embeddings) that very parameter. Returns the shared names."""
    base = dict(models[0].named_parameters())
    shared: set[str] = set()
    for m in models[1:]:
        for name, p in list(m.named_parameters()):
            q = base.get(name)
            if q is None or "patch_embed" in name or q.shape != p.shape:
                continue
            owner = m.get_submodule(name.rpartition(".")[0]) if "." in name else m
            setattr(owner, name.rpartition(".")[2], q)
            shared.add(name)
    return sorted(shared)
