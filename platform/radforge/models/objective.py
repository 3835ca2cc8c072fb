"""The objective protocol: what every model built by `radforge.models.build` can be asked.

Train, evaluate, serve and export ask a model what it can do — `model.capabilities`, a
frozenset of CAPABILITIES — and call the matching method; none of them switches on an objective
name or probes with `hasattr`. A method whose capability a model lacks raises `Unsupported` (a
ValueError naming the model and the capability).

    capability    method                                             returns
    (every model) forward(batch) -> {"loss", *metrics}              scalar tensors only
    embed_image   embed_image(images [B, *input_shape])             [B, D] L2-normalised
    embed_text    embed_text(texts: list[str])                       [T, D] L2-normalised, in the
                                                                     image embeddings' space
                  save_tokenizer(directory)                          the text tower's tokenizer files
    zero_shot     zero_shot_from_embeddings(image_emb, findings,      [B, F] P(finding)
                  positive, negative); zero_shot(images, ...)
    reconstruct   reconstruction_loss(images, generator)            scalar (masked-patch loss)
                  reconstruct(images, generator)                     {"masked", "reconstruction", "mask"}
    classify      classify(images [B, *input_shape])                 [B, F] probabilities, in the order of
                                                                     `model.findings` (saved in model.json)

Embeddings come in the model's compute dtype (training keeps its autocast dtype); inference
callers take `.float()`. `metrics` names the scalars `forward` returns besides "loss" (what training logs), and
`evaluations` the evaluation protocols that apply (what `radforge.evaluate` runs); by default
the latter follow from the capabilities (`evaluations_for`), a model may declare others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

CAPABILITIES = frozenset({"embed_image", "embed_text", "zero_shot", "reconstruct", "classify"})

# Evaluation protocols (radforge.evaluate), each with the capability sets that allow it (any one
# of them suffices). One table: `evaluations_for` and evaluate's skip messages both read it.
#   zero_shot     AUROC of the prompt probabilities per finding
#   retrieval     image <-> report recall@K
#   recon_loss    seeded masked-reconstruction loss
#   knn           temperature-weighted cosine kNN on frozen image embeddings (DINO's protocol)
#   linear_probe  logistic regression on frozen image embeddings (fit on train, C chosen on val)
#   few_shot      the probe on 1/10/100 % of the train labels and on k = 1/5/10 shots, seeds
#   fine_tune     AUROC of the model's own classifier head (`classify`: a fine-tuned model)
#   fairness, robustness, calibration: of the model's best scorer (its classifier, else its
#                 zero-shot probabilities, else a linear probe on its embeddings)
_SCORES = (frozenset({"classify"}), frozenset({"zero_shot"}), frozenset({"embed_image"}))
EVALUATION_NEEDS: dict[str, tuple[frozenset[str], ...]] = {
    "zero_shot": (frozenset({"zero_shot"}),),
    "retrieval": (frozenset({"embed_image", "embed_text"}),),
    "recon_loss": (frozenset({"reconstruct"}),),
    "knn": (frozenset({"embed_image"}),),
    "linear_probe": (frozenset({"embed_image"}),),
    "few_shot": (frozenset({"embed_image"}),),
    "fine_tune": (frozenset({"classify"}),),
    "fairness": _SCORES,
    "robustness": _SCORES,
    "calibration": _SCORES,
}
EVALUATIONS = tuple(EVALUATION_NEEDS)


def evaluations_for(capabilities: frozenset[str]) -> tuple[str, ...]:
    """The evaluation protocols a model with `capabilities` supports, in EVALUATIONS order."""
    return tuple(p for p, needs in EVALUATION_NEEDS.items() if any(n <= capabilities for n in needs))


class Unsupported(ValueError):
    """A model was asked for a capability it lacks."""

    def __init__(self, model: str, capability: str, capabilities: frozenset[str]):
        super().__init__(f"a {model} model cannot {capability.replace('_', ' ')} "
                         f"(it can: {', '.join(sorted(capabilities)) or 'nothing but train'})")
        self.capability = capability


class Objective(nn.Module):
    """Base class of every objective (one module per objective in radforge.models).

    Subclasses set `name`, `capabilities` and `metrics`, implement `forward` and the methods of
    their capabilities; the others raise `Unsupported`."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    metrics: ClassVar[tuple[str, ...]] = ()  # scalars of forward() besides "loss"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        unknown = cls.capabilities - CAPABILITIES
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown capabilities {sorted(unknown)}")

    @property
    def evaluations(self) -> tuple[str, ...]:
        return evaluations_for(self.capabilities)

    def _unsupported(self, capability: str) -> Unsupported:
        return Unsupported(self.name, capability, self.capabilities)

    def forward(self, batch: Mapping) -> dict:  # pragma: no cover - every objective overrides
        raise NotImplementedError

    def on_step_end(self, step: int) -> None:
        """Called by the trainer after every optimizer step (`step` = steps done, 1-based) on every
        rank: EMA teachers, temperature schedules. Default: nothing."""

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        raise self._unsupported("embed_image")

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        raise self._unsupported("embed_text")

    def save_tokenizer(self, directory: str) -> None:
        raise self._unsupported("embed_text")

    def zero_shot_from_embeddings(self, image_emb: torch.Tensor, findings: Sequence[str], positive: str,
                                  negative: str) -> torch.Tensor:
        raise self._unsupported("zero_shot")

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor, findings: Sequence[str], positive: str = "{finding} is present.",
                  negative: str = "no {finding}.") -> torch.Tensor:
        if "zero_shot" not in self.capabilities:
            raise self._unsupported("zero_shot")
        return self.zero_shot_from_embeddings(self.embed_image(images), findings, positive, negative)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise self._unsupported("classify")

    def reconstruction_loss(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise self._unsupported("reconstruct")

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        raise self._unsupported("reconstruct")
