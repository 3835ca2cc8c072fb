"""The one table of image kinds: what a CT volume and an X-ray image are, everywhere.

Every module that used to switch on the strings "ct" / "xray" or kept its own list of modalities
asks this registry instead: ingest (which modalities plan into which kind), shardspec (the stored
codec and array form), the loader (which samples a recipe's `data.image` selects), the models
(2D or 3D patches), the model views (`view()`: `transforms.CTView` / `transforms.XrayView`) and
serving (what a `.npy` upload must look like). Adding an image kind is one entry here plus its
view class.

Imports nothing of radforge's at module level (config and models may import it); the view class
is resolved on first use, since transforms is the heavier module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageKind:
    """One image kind. `name` is what recipes say (`data.image`), model.json and the plan record."""

    name: str
    modalities: tuple[str, ...]  # DICOM Modality values that become this kind
    ndim: int  # spatial dimensions of the stored array and of the model's patches
    codec: str  # tar member suffix of the stored array: "npy" (int16 HU) or "png" (uint16)
    dtype: str  # numpy dtype of the stored array
    axes: str  # array axis names, for messages and docs ("zyx", "yx")
    units: str  # what a stored value means
    view_class: str  # name of the model view class in radforge.transforms

    @property
    def stored_form(self) -> str:
        """How people read the stored array's form in an error message: 'int16 [z, y, x] HU'."""
        return f"{self.dtype} [{', '.join(self.axes)}] {self.units}"

    def check_stored(self, array: np.ndarray) -> None:
        """Raise ValueError unless `array` is this kind's stored form (dtype and rank)."""
        if array.dtype != np.dtype(self.dtype) or array.ndim != self.ndim:
            raise ValueError(f"{self.name} arrays are {self.stored_form}; got {array.dtype.name} with shape {list(array.shape)}")

    def view(self, cfg):
        """The model view for this kind (`transforms.View`) built from a `config.ViewConfig`."""
        from radforge import transforms

        return getattr(transforms, self.view_class)(cfg)


CT = ImageKind(name="ct", modalities=("CT",), ndim=3, codec="npy", dtype="int16", axes="zyx",
               units="HU", view_class="CTView")
XRAY = ImageKind(name="xray", modalities=("CR", "DX"), ndim=2, codec="png", dtype="uint16", axes="yx",
                 units="presentation", view_class="XrayView")

KINDS: dict[str, ImageKind] = {k.name: k for k in (CT, XRAY)}
# Every modality ingest can turn into a sample, in a stable order.
MODALITIES: tuple[str, ...] = tuple(m for k in KINDS.values() for m in k.modalities)


def get(name: str) -> ImageKind:
    """The kind called `name` ("ct", "xray"); ValueError naming the valid ones otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown image kind {name!r}; one of {', '.join(KINDS)}") from None


def of_modality(modality: str) -> ImageKind | None:
    """The kind a DICOM Modality becomes, or None when radforge does not ingest it."""
    for k in KINDS.values():
        if modality in k.modalities:
            return k
    return None


def of_codec(members) -> ImageKind:
    """The kind whose stored codec is among a sample's tar member suffixes."""
    for k in KINDS.values():
        if k.codec in members:
            return k
    raise ValueError(f"a sample needs one of the members {', '.join(k.codec for k in KINDS.values())}; got {sorted(members)}")
