"""Typed settings: dataclasses, YAML loading, dotted `--set a.b=v` overrides, clear errors.

Each component owns a small dataclass; a recipe is a tree of them, and serve's arguments
(`ServeConfig`) are one more. The dataclass defaults are the documented defaults (a comment beside
each field) and the YAML files under `shards/recipes/` and `jobs/recipes/` restate them with units
(a test keeps `shards/recipes/default.yaml` equal to `IngestRecipe()`).

`from_dict` validates a plain mapping with pydantic (types, unknown keys, lists into tuples) and
each section's `__post_init__` checks ranges, so a bad value fails at load time, on one line with
the dotted key, before any work starts. The objects stay plain stdlib dataclasses: they pickle
and cross Ray as they are, and constructing one directly runs the same range checks.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic
import pydantic_core
import yaml

from radforge import kinds
from radforge.errors import ConfigError


class SettingError(ConfigError, ValueError):
    """A value out of range. A `ConfigError` to callers; also a `ValueError`, which is what pydantic
    catches from `__post_init__` and reports with the location of the section that raised it."""


class Section:
    """Base of every recipe dataclass: how `from_dict` validates it. Strict scalars, since YAML
    has already typed them (`true` is not a count, `1` is not a flag, `.nan` is not a size);
    unknown keys are errors (a typo must not fall back to a default silently)."""

    __pydantic_config__ = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


# ---------------------------------------------------------------------------------------------
# Ingest recipe
# ---------------------------------------------------------------------------------------------

SUPPORTED_MODALITIES = kinds.MODALITIES
# What may tell the acquisitions of one CT series apart (`ct.split_acquisitions_by`); each is
# read per frame where Enhanced CT keeps it in a functional group.
SPLIT_ATTRIBUTES = ("AcquisitionNumber", "TemporalPositionIdentifier", "TemporalPositionIndex",
                    "ContrastBolusAgentPhase", "EchoNumbers", "ImageType")
SERIES_PLANES = ("axial", "coronal", "sagittal", "oblique")


@dataclass
class CTConfig(Section):
    """How CT series become volumes. Spacing is in array axis order (z, y, x), millimetres."""

    spacing_mm: tuple[float, float, float] = (3.0, 1.5, 1.5)  # target voxel spacing after resampling
    min_slices: int = 8  # fewer slices than this: the series is rejected (a scout, a single slab)
    # Slice spacing may vary by this fraction of the median before the series counts as non-uniform
    # (a gap of a missing slice is ~100%, rounding noise in positions is < 1%).
    spacing_tolerance: float = 0.1
    # Gantry tilt shows as slice positions drifting off the slice normal; beyond this angle the
    # series is rejected (stacking it would shear the anatomy).
    max_tilt_deg: float = 0.5
    # "reject" the series, or "drop" repeated positions when the pixels are identical copies.
    duplicate_positions: str = "reject"
    # Largest source volume (voxels) one worker may assemble; bigger series are rejected, not OOM'd.
    # Also the budget of each file, checked from its header before any decoder runs: rows ×
    # columns × frames × samples per pixel × bits allocated / 16 ≤ max_voxels ("too_large").
    max_voxels: int = 1024 * 1024 * 2000
    # Repeated slice positions in one series that these attributes tell apart are separate
    # acquisitions (phases, echoes, time points): one volume each. Tried one attribute at a time in
    # this order, then all together; repeats none of them explains stay `duplicate_position`.
    # Only attributes from SPLIT_ATTRIBUTES (none identifies a patient: they name the sub-volume).
    split_acquisitions_by: list[str] = field(default_factory=lambda: list(SPLIT_ATTRIBUTES))

    def __post_init__(self):
        # Comparisons are written so that NaN fails them (`not x > 0`), since NaN < 0 is False too.
        _positive("ct.spacing_mm", self.spacing_mm, n=3)
        # Floats, always: the spacing feeds the profile_id digest, where 3 and 3.0 hash differently.
        self.spacing_mm = tuple(float(v) for v in self.spacing_mm)
        _at_least("ct.min_slices", self.min_slices, 2)
        if not 0 < self.spacing_tolerance < 1:
            raise SettingError("ct.spacing_tolerance must be in (0, 1)")
        if not 0 <= self.max_tilt_deg < 90:
            raise SettingError(f"ct.max_tilt_deg must be in [0, 90), got {self.max_tilt_deg!r}")
        _choice("ct.duplicate_positions", self.duplicate_positions, ("reject", "drop"))
        bad = [a for a in self.split_acquisitions_by if a not in SPLIT_ATTRIBUTES]
        if bad:
            raise SettingError(f"ct.split_acquisitions_by: {bad} not among {list(SPLIT_ATTRIBUTES)}")
        _above("ct.max_voxels", self.max_voxels, 0)


@dataclass
class XrayConfig(Section):
    """How CR/DX images are stored (lossless 16-bit PNG, presentation values, high = bright)."""

    longest_side: int = 1024  # px: images are resized (aspect kept) so the longer side is at most this
    # "window": apply the header's VOI (VOI LUT Sequence, else the first window) as a radiologist
    # would see it; "none": store Modality-LUT values rescaled to the BitsStored range.
    voi: str = "window"
    # Budget of one radiograph, in 16-bit pixels: rows × columns × frames × samples per pixel ×
    # bits allocated / 16, from the header, before any decoder runs; larger → rejected
    # "too_large" (a 4k × 4k DX is 16.8 M; the default is ~6300²). Decoding one image peaks at
    # about 32 bytes per pixel (formula in radforge.ingest), ~1.3 GB at the default.
    max_pixels: int = 40_000_000
    # PresentationIntentType: "presentation" keeps FOR PRESENTATION images (and those without the
    # attribute, e.g. CR) and skips FOR PROCESSING ones ("for_processing"); "processing" keeps the
    # raw detector images and skips FOR PRESENTATION ones ("for_presentation"). Either way, when
    # both exist for one exposure exactly one is used and the other counted.
    presentation_intent: str = "presentation"

    def __post_init__(self):
        _at_least("xray.longest_side", self.longest_side, 16)
        _choice("xray.presentation_intent", self.presentation_intent, ("presentation", "processing"))
        _above("xray.max_pixels", self.max_pixels, 0)
        _choice("xray.voi", self.voi, ("window", "none"))


@dataclass
class DeidConfig(Section):
    """Keyed pseudonyms: HMAC-SHA256 with a secret that never leaves the operator's environment."""

    secret_env: str = "RADFORGE_DEID_SECRET"  # environment variable holding the secret
    secret_file: str | None = None  # else a file holding it (any URL), read when the variable is empty
    # Demo mode uses a public, fixed key: pseudonyms are then NOT secret. Marked in the manifest.
    demo_key: bool = False
    keep_age_sex: bool = False  # keep the patient's age and sex in each sample's metadata
    # Pixels that may carry names (PS3.15 Clean Pixel Data): BurnedInAnnotation YES, Secondary
    # Capture SOP classes, screen captures. Rejected "burned_in_annotation" unless this is true
    # (then CR/DX Secondary Captures are ingested as radiographs). Only for cleaned pixel data.
    allow_burned_in: bool = False

    def __post_init__(self):
        if not self.secret_env or not self.secret_env.strip():
            raise SettingError("deid.secret_env must name an environment variable")


@dataclass
class TableConfig(Section):
    """An optional side table (CSV, Parquet or JSONL) joined to studies."""

    join_on: str = "AccessionNumber"  # DICOM attribute matched: AccessionNumber or StudyInstanceUID
    key_column: str = "AccessionNumber"  # the table's column holding that value
    text_column: str = "report"  # reports only
    findings: list[str] = field(default_factory=list)  # labels only; empty = every other column

    def __post_init__(self):
        _choice("join_on", self.join_on, ("AccessionNumber", "StudyInstanceUID"))


@dataclass
class SeriesRule(Section):
    """One CT series selection rule (`series.rules`): it matches a series when every condition
    given holds (unset conditions always hold), and then keeps or drops it."""

    name: str  # the reason a dropped series is counted under ("rule:<name>"); required
    action: str = "keep"  # keep | drop
    image_type: list[str] = field(default_factory=list)  # every value must be in ImageType (e.g. [DERIVED, SECONDARY])
    series_description: str | None = None  # regex searched in SeriesDescription (case-insensitive)
    kernel: str | None = None  # regex searched in ConvolutionKernel (case-insensitive)
    slice_thickness_mm: tuple[float, float] | None = None  # [min, max] SliceThickness, inclusive
    plane: list[str] = field(default_factory=list)  # acquisition plane from IOP: axial | coronal | sagittal | oblique
    min_slices: int = 0  # fewer slice positions than this: condition fails

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SettingError(f"series.rules: name {self.name!r} must be a plain identifier")
        _choice("series.rules.action", self.action, ("keep", "drop"))
        for p in self.plane:
            _choice("series.rules.plane", p, SERIES_PLANES)
        import re

        for what in ("series_description", "kernel"):
            try:
                re.compile(getattr(self, what) or "")
            except re.error as e:
                raise SettingError(f"series.rules.{what}: not a regular expression ({e})") from None
        self.image_type = [v.upper() for v in self.image_type]


def _default_series_rules() -> list[SeriesRule]:
    return [
        SeriesRule(name="secondary", action="drop", image_type=["SECONDARY"]),
        SeriesRule(name="dose_report", action="drop", series_description=r"dose\s*(report|info)|patient\s*protocol|screen\s*save"),
    ]


@dataclass
class SeriesConfig(Section):
    """Which CT series become samples (after MONAI Deploy's series selector): `rules` in order, the
    first that matches decides; a series no rule matches follows `default`; then, per study,
    `per_study` chooses among the kept series. Every dropped series is counted skipped
    ("rule:<name>", "no_rule", "per_study:<choice>")."""

    rules: list[SeriesRule] = field(default_factory=_default_series_rules)  # in order; default: drop SECONDARY and dose reports
    default: str = "keep"  # keep | drop: series no rule matches
    # all: every kept series; thinnest: the kept series with the smallest SliceThickness (all its
    # acquisitions); first_match: the series kept by the earliest keep rule (ties: thinnest).
    per_study: str = "all"

    def __post_init__(self):
        _choice("series.default", self.default, ("keep", "drop"))
        _choice("series.per_study", self.per_study, ("all", "thinnest", "first_match"))
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise SettingError(f"series.rules: rule names must be unique, got {names}")


@dataclass
class ShardConfig(Section):
    """How the WebDataset tar shards are cut."""

    target_mb: float = 256.0  # shard size aimed at, MB: shards per split = estimated bytes / this

    def __post_init__(self):
        _above("shards.target_mb", self.target_mb, 0)


@dataclass
class DicomwebConfig(Section):
    """A `dicomweb+http(s)://HOST:PORT/PATH` SOURCE (radforge.dicomweb): QIDO-RS filters, paging
    and the WADO-RS client. Ignored for other sources. Credentials are never recipe values."""

    study_date: str | None = None  # QIDO StudyDate: "YYYYMMDD", or a range "YYYYMMDD-YYYYMMDD" (either end may be empty)
    modalities_in_study: list[str] = field(default_factory=list)  # QIDO ModalitiesInStudy: studies holding any of these
    modality: list[str] = field(default_factory=list)  # series-level Modality: only series of these modalities
    body_part: str | None = None  # series-level BodyPartExamined (e.g. CHEST)
    query: dict[str, str] = field(default_factory=dict)  # any other study-level QIDO attribute → value (e.g. InstitutionName)
    page_size: int = 1000  # QIDO results per request (limit/offset paging)
    concurrency: int = 8  # WADO-RS requests in flight per Ray task (read-ahead)
    retries: int = 5  # retries per request on 429/5xx/timeouts/connection errors, exponential backoff
    backoff_s: float = 0.5  # first retry delay, seconds; doubles per retry (jittered, capped at 30 s)
    timeout_s: float = 60.0  # connect/read timeout per request, seconds
    # A secrets file (YAML/JSON: {token: …} or {username: …, password: …}), readable on every Ray node;
    # else RADFORGE_DICOMWEB_TOKEN or RADFORGE_DICOMWEB_USERNAME/_PASSWORD in the workers' environment.
    credentials_file: str | None = None

    def __post_init__(self):
        _at_least("dicomweb.page_size", self.page_size, 1)
        _at_least("dicomweb.concurrency", self.concurrency, 1)
        _at_least("dicomweb.retries", self.retries, 0)
        _above("dicomweb.timeout_s", self.timeout_s, 0)
        _at_least("dicomweb.backoff_s", self.backoff_s, 0)
        ends = (self.study_date or "").split("-")
        if self.study_date is not None and not (
                len(ends) <= 2 and any(ends) and all(e == "" or (len(e) == 8 and e.isdigit()) for e in ends)):
            raise SettingError(f"dicomweb.study_date must be YYYYMMDD or YYYYMMDD-YYYYMMDD, got {self.study_date!r}")


@dataclass
class IngestRecipe(Section):
    """DICOM → shards (shards/recipes/*.yaml); each section is documented on its class."""

    name: str = "default"  # recorded in the manifest
    modalities: list[str] = field(default_factory=lambda: list(SUPPORTED_MODALITIES))  # the rest are skipped
    ct: CTConfig = field(default_factory=CTConfig)
    xray: XrayConfig = field(default_factory=XrayConfig)
    deid: DeidConfig = field(default_factory=DeidConfig)
    reports: TableConfig = field(default_factory=TableConfig)  # free-text reports (`--reports TABLE`)
    labels: TableConfig = field(default_factory=TableConfig)  # finding labels, one column each (`--labels TABLE`)
    # Fractions of patients per split, assigned from the patient pseudonym.
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    shards: ShardConfig = field(default_factory=ShardConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)  # CT series selection rules
    dicomweb: DicomwebConfig = field(default_factory=DicomwebConfig)  # a dicomweb+http(s):// SOURCE's filters and client
    # Where the private index and rejects ledger go (they hold source paths and original UIDs).
    # Default: "<DEST>.private". Never inside DEST.
    private_dir: str | None = None

    def __post_init__(self):
        if not self.name or not self.name.strip():
            raise SettingError("name must be a non-empty string")
        bad = [m for m in self.modalities if m not in SUPPORTED_MODALITIES]
        if bad or not self.modalities:
            raise SettingError(f"modalities must be a non-empty subset of {list(SUPPORTED_MODALITIES)}, got {self.modalities}")
        fractions = list(self.splits.values())
        if not fractions or not all(v >= 0 for v in fractions) or not abs(sum(fractions) - 1) <= 1e-6:
            raise SettingError(f"splits must be non-negative fractions summing to 1, got {self.splits}")
        self.splits = {name: float(v) for name, v in self.splits.items()}
        for name in self.splits:
            if not isinstance(name, str) or not name.isidentifier():
                raise SettingError(f"split name {name!r} must be a plain identifier")


# ---------------------------------------------------------------------------------------------
# Training recipe (jobs/recipes/*.yaml). One dataclass per component; `TrainRecipe` is the tree.
# Batch sizes are stated ONCE (deepspeed.micro_batch × deepspeed.grad_accum × scale.num_workers =
# the global batch); radforge.train derives the DeepSpeed config from these fields and nowhere else.
# ---------------------------------------------------------------------------------------------

VIT_PRESETS = ("tiny", "small", "base", "large")
IMAGE_KINDS = tuple(kinds.KINDS)  # ct = 3D volumes (CT); xray = 2D images (CR, DX)


@dataclass
class SourceConfig(Section):
    """One shard set of a weighted mixture (`data.sources`, after MosaicML Streaming's `Stream`).
    Give each source a `weight`, or give them `repeat`/`choose` (a mixture epoch's samples)."""

    shards: str  # shard set: directory URL holding manifest.json (any fsspec URL); required
    weight: float | None = None  # share of the mixture's samples (normalised over the sources)
    # repeat / choose (MosaicML's, as rates): the share is repeat × the source's samples, or choose,
    # over the sum of all sources'; a source still cycles ALL its samples, epoch after epoch.
    repeat: float | None = None  # instead of weight: passes over this source per mixture epoch (0.5 = half of it)
    choose: int | None = None  # instead of weight: samples of this source per mixture epoch
    split: str | None = None  # the split streamed from it (null = data.train_split)
    image: str | None = None  # ct | xray (null = data.image); sources of both kinds train one model on both
    name: str | None = None  # label in the metrics (mix_<name>_frac); null = "<index>_<image>"

    def __post_init__(self):
        given = [k for k in ("weight", "repeat", "choose") if getattr(self, k) is not None]
        if len(given) > 1:
            raise SettingError(f"data.sources: give one of weight, repeat or choose per source, not {' and '.join(given)}")
        for k in ("weight", "repeat"):
            if getattr(self, k) is not None:
                _above(f"data.sources.{k}", getattr(self, k), 0)
        if self.choose is not None:
            _at_least("data.sources.choose", self.choose, 1)
        if self.image is not None:
            _choice("data.sources.image", self.image, IMAGE_KINDS)


@dataclass
class DataConfig(Section):
    """Where the shards are and how they stream (radforge.loader)."""

    shards: str = "var/demo/shards"  # shard set: directory URL holding manifest.json (any fsspec URL)
    shards_version: int | None = None  # pin manifest version N (manifests/vN.json after `ingest --append`); null = latest
    # A weighted mixture instead of one shard set (see SourceConfig); the first source is then the
    # primary one: `shards`/`image` are set to it (evaluation, the tokenizer and the profile use it).
    sources: list[SourceConfig] = field(default_factory=list)
    image: str = "ct"  # ct: CT volumes, 3D models; xray: CR/DX images, 2D models
    train_split: str = "train"  # the split streamed for training
    val_split: str = "val"  # the validation split's name (no code reads it yet; eval.split is what evaluation uses)
    require_report: bool = False  # CLIP sets this: samples without a report are skipped (counted)
    shuffle_buffer: int = 64  # samples held for the within-rank shuffle (memory: buffer × sample size)
    num_workers: int = 1  # DataLoader worker processes per rank (0 = in the training process)
    verify_sha256: bool = True  # check each shard against the manifest before use; mismatches are skipped
    cache_dir: str | None = None  # optional local cache of shards (None = stream only)
    cache_limit_gb: float = 10.0  # cache size bound (least recently used shards evicted)

    def __post_init__(self):
        _choice("data.image", self.image, IMAGE_KINDS)
        if self.sources:
            self._resolve_sources()
        _at_least("data.shuffle_buffer", self.shuffle_buffer, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        _above("data.cache_limit_gb", self.cache_limit_gb, 0)

    def _resolve_sources(self) -> None:
        """Defaults from this section, one way of weighting, distinct names; the first source is primary."""
        default = DataConfig.__dataclass_fields__["shards"].default
        if self.shards not in (default, self.sources[0].shards):
            raise SettingError("data.shards and data.sources both given: the first source is the primary shard set")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise SettingError("data.sources: either every source has a weight, or every source repeat/choose")
        if not any(weighted) and len(self.sources) > 1 and not all(s.repeat or s.choose for s in self.sources):
            raise SettingError("data.sources: give every source a weight (or repeat/choose)")
        primary_image = self.sources[0].image or self.image
        for i, s in enumerate(self.sources):
            s.split = s.split or self.train_split
            s.image = s.image or self.image
            s.name = s.name or f"{i}_{s.image}"
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names) or not all(n.isidentifier() or n[0].isdigit() for n in names):
            raise SettingError(f"data.sources: names must be distinct identifiers, got {names}")
        self.shards, self.image = self.sources[0].shards, primary_image

    def images(self) -> tuple[str, ...]:
        """The image kinds this data holds, primary first (one unless sources mix CT and X-ray)."""
        return tuple(dict.fromkeys([self.image, *(s.image for s in self.sources)]))


@dataclass
class ViewConfig(Section):
    """The model view derived from stored samples at load time (radforge.transforms), shared by
    the loader, evaluation and serving and written into exported models."""

    # CT: HU windows (level, width) → one channel each, scaled to [0, 1].
    ct_windows: list[tuple[float, float]] = field(default_factory=lambda: [(-600.0, 1500.0), (40.0, 400.0)])
    ct_size: tuple[int, int, int] = (32, 64, 64)  # model input (z, y, x) voxels: crop / pad
    xray_size: int = 224  # model input (square, px): aspect-preserving resize then centre/random crop
    xray_mean: float = 0.5  # normalisation of [0, 1] presentation values: (x - mean) / std
    xray_std: float = 0.25  # (see xray_mean)
    rand_crop: bool = True  # training: random crop position (evaluation/serving: centre)
    rand_flip: bool = False  # training: random left-right flip (off: laterality is anatomy)
    # CT: resample to this voxel spacing (z, y, x mm) at load time, from each sample's stored
    # spacing_mm; null = use the shards' spacing as stored (the ingest profile's, usually right).
    ct_spacing_mm: tuple[float, float, float] | None = None

    def __post_init__(self):
        if not self.ct_windows:
            raise SettingError("view.ct_windows needs at least one (level, width) window")
        for level, width in self.ct_windows:
            if not width > 0:
                raise SettingError(f"view.ct_windows: width must be > 0, got {width!r}")
        _positive("view.ct_size", self.ct_size, n=3)
        self.ct_size = tuple(int(v) for v in self.ct_size)
        if self.ct_spacing_mm is not None:
            _positive("view.ct_spacing_mm", self.ct_spacing_mm, n=3)
            self.ct_spacing_mm = tuple(float(v) for v in self.ct_spacing_mm)
        _at_least("view.xray_size", self.xray_size, 16)
        _above("view.xray_std", self.xray_std, 0)


@dataclass
class TextConfig(Section):
    """CLIP text tower: a small transformer with a tokenizer trained on the corpus' reports
    (`kind: small`), or a Hugging Face encoder + tokenizer from a local/object-store dir (`kind: hf`)."""

    kind: str = "small"  # small | hf
    path: str | None = None  # hf: directory (any URL) with config + weights + tokenizer; offline
    vocab_size: int = 2000  # small: BPE vocabulary trained on the training split's reports
    max_len: int = 64  # tokens per report (truncated)
    width: int = 128  # small: transformer width (divisible by heads)
    depth: int = 2  # small: transformer blocks
    heads: int = 4  # small: attention heads
    # Report sections the tower reads (headers such as "FINDINGS:", case-insensitive), in this
    # order; empty = the whole report. A report with none of them is read whole.
    sections: list[str] = field(default_factory=list)
    sample_sentences: bool = False  # training only: a seeded random subset of the sentences per sample

    def __post_init__(self):
        _choice("model.text.kind", self.kind, ("small", "hf"))
        self.sections = [str(x).strip().lower() for x in self.sections]
        if any(not x for x in self.sections):
            raise SettingError("model.text.sections: section names must be non-empty (e.g. [findings, impression])")
        if self.kind == "hf" and not self.path:
            raise SettingError("model.text.path must name the Hugging Face model directory when kind is hf")
        for k in ("vocab_size", "max_len", "width", "depth", "heads"):
            _at_least(f"model.text.{k}", getattr(self, k), 1)
        if self.width % self.heads:
            raise SettingError("model.text.width must be divisible by model.text.heads")


@dataclass
class DinoConfig(Section):
    """DINO (`model.kind: dino`, radforge.models.dino): self-distillation with an EMA teacher,
    multi-crop views (transforms.RandMultiCrop), the iBOT masked-patch loss and optional KoLeo.
    Defaults follow DINOv2 where a small batch allows (crops, temperatures, momentum, masking)."""

    global_crops: int = 2  # views the teacher sees, at the model view's own size
    local_crops: int = 4  # small views only the student sees (DINOv2: 8)
    global_scale: tuple[float, float] = (0.32, 1.0)  # area (3D: volume) fraction of a global crop
    local_scale: tuple[float, float] = (0.05, 0.32)  # area (3D: volume) fraction of a local crop
    local_size: float = 0.5  # local crop side / model view side, rounded to whole patches (DINOv2 98/224)
    flip_prob: float = 0.0  # left-right flip per crop (off: laterality is anatomy)
    jitter: float = 0.3  # contrast × U(1 ± jitter), brightness + U(± jitter) in view units, per crop
    mask_prob: float = 0.5  # iBOT: share of global crops with hidden patches
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: fraction of a masked crop's patches hidden
    out_dim: int = 4096  # prototypes of the DINO head (DINOv2: 65536)
    head_hidden: int = 2048  # DINO head MLP width
    head_bottleneck: int = 256  # DINO head output before the weight-normalised prototypes
    head_layers: int = 3  # DINO head linear layers
    head_batch_norm: bool = False  # standardise the head's input over the global batch (models.dino.DINOHead)
    student_temp: float = 0.1  # softmax temperature of the student
    teacher_temp: float = 0.07  # of the teacher, after the warm-up
    warmup_teacher_temp: float = 0.04  # of the teacher at step 0, linear to teacher_temp
    teacher_temp_warmup_steps: int = 30  # optimizer steps of that warm-up
    center_momentum: float = 0.9  # EMA of the teacher-output centre (DINO centering)
    momentum: float = 0.996  # teacher EMA momentum at step 0, cosine to 1.0 at momentum_steps
    momentum_steps: int = 0  # 0 = the run's `steps`
    dino_weight: float = 1.0  # weight of the CLS (DINO) loss
    ibot_weight: float = 1.0  # weight of the iBOT masked-patch loss (0 = off)
    koleo_weight: float = 0.0  # weight of the KoLeo spreading loss on student CLS (DINOv2: 0.1; 0 = off)
    teacher_only: bool = False  # set by `radforge export`: the model is the teacher backbone alone (embeds, cannot train)

    def __post_init__(self):
        _at_least("model.dino.global_crops", self.global_crops, 2)
        _at_least("model.dino.local_crops", self.local_crops, 0)
        for k in ("global_scale", "local_scale", "mask_ratio"):
            lo, hi = (float(v) for v in getattr(self, k))
            if not 0 < lo <= hi <= 1:
                raise SettingError(f"model.dino.{k} must be 0 < low <= high <= 1, got {[lo, hi]}")
            setattr(self, k, (lo, hi))
        for k in ("local_size", "flip_prob", "mask_prob", "jitter"):
            if not 0 <= getattr(self, k) <= 1:
                raise SettingError(f"model.dino.{k} must be in [0, 1]")
        _above("model.dino.local_size", self.local_size, 0)
        for k in ("out_dim", "head_hidden", "head_bottleneck"):
            _at_least(f"model.dino.{k}", getattr(self, k), 1)
        _at_least("model.dino.head_layers", self.head_layers, 2)
        for k in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _above(f"model.dino.{k}", getattr(self, k), 0)
        _at_least("model.dino.teacher_temp_warmup_steps", self.teacher_temp_warmup_steps, 0)
        _at_least("model.dino.momentum_steps", self.momentum_steps, 0)
        for k in ("center_momentum", "momentum"):
            if not 0 <= getattr(self, k) <= 1:
                raise SettingError(f"model.dino.{k} must be in [0, 1]")
        for k in ("dino_weight", "ibot_weight", "koleo_weight"):
            _at_least(f"model.dino.{k}", getattr(self, k), 0)


@dataclass
class FinetuneConfig(Section):
    """model.kind finetune: a multi-label head on an image tower, all weights or LoRA adapters (peft)."""

    method: str = "lora"  # full (every weight trains) | lora (only adapters on lora_targets + the head)
    lora_r: int = 8  # adapter rank
    lora_alpha: float = 16.0  # adapter updates are scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapters' input (probability)
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])  # module-name suffixes: the ViT's attention projections
    head_dropout: float = 0.0  # dropout on the pooled features before the linear head (probability)

    def __post_init__(self):
        _choice("model.finetune.method", self.method, ("full", "lora"))
        _at_least("model.finetune.lora_r", self.lora_r, 1)
        _above("model.finetune.lora_alpha", self.lora_alpha, 0)
        for key in ("lora_dropout", "head_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise SettingError(f"model.finetune.{key} must be in [0, 1)")
        if self.method == "lora" and not self.lora_targets:
            raise SettingError("model.finetune.lora_targets must name at least one module (e.g. attn.qkv)")


@dataclass
class ModelConfig(Section):
    """What to train. The image encoder is a ViT whose dimensionality follows data.image."""

    kind: str = "mae"  # mae | clip | finetune (and the registry's other objectives)
    preset: str = "tiny"  # ViT size: tiny | small | base | large
    patch_ct: tuple[int, int, int] = (8, 16, 16)  # 3D patch (z, y, x) voxels; must divide view.ct_size
    patch_xray: int = 16  # 2D patch (px); must divide view.xray_size
    mask_ratio: float = 0.75  # MAE: fraction of patches hidden from the encoder
    norm_pix_loss: bool = True  # MAE: loss on per-patch normalised pixels
    decoder_width: int = 128  # MAE decoder: transformer width
    decoder_depth: int = 2  # MAE decoder: transformer blocks
    embed_dim: int = 128  # CLIP: joint embedding size
    init_temperature: float = 0.07  # CLIP: initial softmax temperature (learnable)
    image_pool: str = "mean"  # CLIP: image features from the tower's pool (mean) or a learned attention pool (attention)
    # An image tower to start from (fresh runs only): an exported radforge model dir (model.json;
    # its image encoder: MAE/CLIP/DINO/finetune) or a Hugging Face dir (config.json + weights;
    # Dinov2Model / Dinov2WithRegistersModel / ViTModel / CLIPVisionModel), local or any fsspec
    # URL; an HF source needs model.backbone (and preset, patch) to match it (radforge.models.hf).
    init_from: str | None = None
    backbone: str = "radforge"  # image-tower structure: radforge | dinov2 | vit | clip (those of the HF classes above)
    registers: int = 0  # backbone dinov2: register tokens (Dinov2WithRegistersModel weights)
    findings: list[str] = field(default_factory=list)  # finetune: the head's findings, in order; empty = eval.findings
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig())  # finetune: full or LoRA
    text: TextConfig = field(default_factory=TextConfig)  # CLIP: the text tower
    dino: DinoConfig = field(default_factory=DinoConfig)  # DINO: heads, crops, losses, schedules

    def __post_init__(self):
        _choice("model.kind", self.kind, tuple(_objectives()))
        _choice("model.preset", self.preset, VIT_PRESETS)
        _positive("model.patch_ct", self.patch_ct, n=3)
        self.patch_ct = tuple(int(v) for v in self.patch_ct)
        _at_least("model.patch_xray", self.patch_xray, 1)
        if not 0 < self.mask_ratio < 1:
            raise SettingError("model.mask_ratio must be in (0, 1)")
        _above("model.init_temperature", self.init_temperature, 0)
        _choice("model.backbone", self.backbone, ("radforge", "dinov2", "vit", "clip"))  # models.vit.STYLES
        _choice("model.image_pool", self.image_pool, ("mean", "attention"))  # models.clip.POOLS
        _at_least("model.registers", self.registers, 0)
        if self.registers and self.backbone != "dinov2":
            raise SettingError("model.registers needs model.backbone: dinov2")

    def patch(self, image: kinds.ImageKind) -> tuple[int, ...]:
        """The patch (voxels per axis) for an image kind: `patch_ct` in 3D, `patch_xray` squared in 2D."""
        return tuple(self.patch_ct) if image.ndim == 3 else (self.patch_xray,) * image.ndim


@dataclass
class OptimConfig(Section):
    """AdamW with linear warmup then cosine decay to lr × min_lr_ratio at `train.steps`."""

    lr: float = 1e-3  # peak learning rate, reached after warmup
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    warmup_steps: int = 10  # linear warmup from 0 (optimizer steps)
    min_lr_ratio: float = 0.1  # the cosine ends at lr × this
    grad_clip: float = 1.0  # max global grad norm (0 = off)

    def __post_init__(self):
        _above("optim.lr", self.lr, 0)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        if not 0 <= self.min_lr_ratio <= 1:
            raise SettingError("optim.min_lr_ratio must be in [0, 1]")
        if not self.grad_clip >= 0:
            raise SettingError("optim.grad_clip must be >= 0")


@dataclass
class DeepSpeedSettings(Section):
    """The recipe side of the DeepSpeed config (radforge.train generates the rest, in one place)."""

    zero_stage: int = 2  # 0 | 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (bf16/fp16 need GPUs)
    micro_batch: int = 4  # samples per worker per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    activation_checkpointing: bool = False  # recompute block activations in backward (memory for time)
    offload_optimizer: bool = False  # ZeRO optimizer state on CPU (stage >= 1)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise SettingError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        _choice("deepspeed.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise SettingError("deepspeed.micro_batch and deepspeed.grad_accum must be >= 1")
        if self.offload_optimizer and self.zero_stage == 0:
            raise SettingError("deepspeed.offload_optimizer needs zero_stage >= 1")


@dataclass
class ScaleConfig(Section):
    """Ray Train scaling: multi-node is configuration only."""

    num_workers: int = 2  # training workers (ranks), one DeepSpeed engine each
    use_gpu: bool = False  # nccl when true, gloo otherwise
    cpus_per_worker: float = 1.0  # Ray resources reserved per worker
    gpus_per_worker: float = 1.0  # used only with use_gpu
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources

    def __post_init__(self):
        _at_least("scale.num_workers", self.num_workers, 1)
        _choice("scale.placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        _above("scale.cpus_per_worker", self.cpus_per_worker, 0)


@dataclass
class CheckpointConfig(Section):
    """Sharded DeepSpeed state + loader position + recipe, through Ray Train's storage."""

    storage_path: str = "var/demo/checkpoints"  # any fsspec URL (s3:// works)
    every_steps: int = 50  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept (older ones deleted)
    max_failures: int = 2  # worker-group restarts (Ray Train FailureConfig), each from the last checkpoint

    def __post_init__(self):
        if self.every_steps < 1 or self.keep_last < 1 or self.max_failures < 0:
            raise SettingError("checkpoint.every_steps and keep_last must be >= 1, max_failures >= 0")


@dataclass
class EvalConfig(Section):
    """In-loop and offline evaluation (radforge.evaluate)."""

    every_steps: int = 0  # 0 = only at the end
    split: str = "val"  # the split evaluated
    findings: list[str] = field(default_factory=list)  # empty = every finding in the labels
    # Zero-shot prompts; `{finding}` is replaced by the finding's name.
    positive_prompt: str = "{finding} is present."
    negative_prompt: str = "no {finding}."  # (see positive_prompt)
    bootstrap: int = 1000  # resamples for the 95% CIs
    max_samples: int = 0  # cap per evaluation (0 = the whole split)
    # Protocols of `radforge evaluate` (radforge.evaluate; the JSON's "config" repeats every value used).
    knn_k: int = 20  # neighbours of the cosine kNN (DINO's protocol)
    knn_temperature: float = 0.07  # neighbour weight exp(cosine / T)
    probe_c: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])  # C grid, chosen on val
    few_shot_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # of the train labels
    few_shot_shots: list[int] = field(default_factory=lambda: [1, 5, 10])  # k positives + k negatives per finding
    few_shot_seeds: int = 5  # draws per few-shot setting (mean ± 95% CI over them)
    corruptions: list[str] = field(default_factory=list)  # empty = every corruption of the image kind
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])  # of each corruption (radforge.corruptions)
    corruption_seed: int = 0  # corruption noise is drawn from (seed, corruption, severity, sample content)
    min_group: int = 20  # fairness: smaller subgroups (labelled samples) are reported as too small
    age_bands: list[int] = field(default_factory=lambda: [18, 40, 60, 80])  # band edges in years
    threshold: float | None = None  # fairness operating point; None = Youden's J per finding on the split
    ece_bins: int = 10  # equal-width bins of the ECE and the reliability diagrams

    def __post_init__(self):
        if self.every_steps < 0 or self.bootstrap < 0 or self.max_samples < 0:
            raise SettingError("eval.every_steps, eval.bootstrap and eval.max_samples must be >= 0")
        if self.knn_k < 1 or self.few_shot_seeds < 1 or self.min_group < 1 or self.ece_bins < 2:
            raise SettingError("eval.knn_k, few_shot_seeds and min_group must be >= 1, ece_bins >= 2")
        _above("eval.knn_temperature", self.knn_temperature, 0)
        if not self.probe_c or any(not c > 0 for c in self.probe_c):
            raise SettingError("eval.probe_c must be a non-empty list of positive numbers")
        if any(not 0 < f <= 1 for f in self.few_shot_fractions) or any(k < 1 for k in self.few_shot_shots):
            raise SettingError("eval.few_shot_fractions must be in (0, 1], eval.few_shot_shots >= 1")
        if any(s not in (1, 2, 3, 4, 5) for s in self.severities):
            raise SettingError("eval.severities must be among 1..5")
        if list(self.age_bands) != sorted(set(self.age_bands)) or any(a <= 0 for a in self.age_bands):
            raise SettingError("eval.age_bands must be increasing positive ages in years")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise SettingError("eval.threshold must be in (0, 1) or null (Youden's J)")
        if "{finding}" not in self.positive_prompt or "{finding}" not in self.negative_prompt:
            raise SettingError("eval.positive_prompt and eval.negative_prompt must contain {finding}")


@dataclass
class TrainRecipe(Section):
    """A training run (jobs/recipes/*.yaml); each section is documented on its class."""

    name: str = "tiny-mae-ct"  # the run's name: metrics, checkpoints and the exported model carry it
    seed: int = 0  # model init, shuffling, masking and augmentation all derive from it
    steps: int = 100  # optimizer steps in total (the schedule's length); epochs follow from the data
    log_every: int = 10  # optimizer steps between metric logs
    output_dir: str = "var/demo/runs"  # metrics (TensorBoard events, metrics.jsonl) and the loss curve
    data: DataConfig = field(default_factory=DataConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if not self.name or not self.name.strip():
            raise SettingError("name must be a non-empty string")
        if self.steps < 1 or self.log_every < 1:
            raise SettingError("steps and log_every must be >= 1")
        if _objectives()[self.model.kind].require_report:
            self.data.require_report = True  # an objective that trains on pairs skips report-less samples
        if "classify" in _objectives()[self.model.kind].capabilities:
            self._head_findings()
        if self.model.dino.momentum_steps == 0:  # the teacher momentum's cosine spans the run
            self.model.dino.momentum_steps = self.steps
        images = self.data.images()
        if "ct" in images:
            bad = [s for s, p in zip(self.view.ct_size, self.model.patch_ct) if s % p]
            if bad:
                raise SettingError(f"model.patch_ct {list(self.model.patch_ct)} must divide view.ct_size {list(self.view.ct_size)}")
        if "xray" in images and self.view.xray_size % self.model.patch_xray:
            raise SettingError(f"model.patch_xray {self.model.patch_xray} must divide view.xray_size {self.view.xray_size}")
        if self.deepspeed.precision != "fp32" and not self.scale.use_gpu:
            raise SettingError(f"deepspeed.precision {self.deepspeed.precision} needs scale.use_gpu: true (CPU training is fp32)")

    def _head_findings(self) -> None:
        """A classifier's head outputs and the loader's label columns are one list, in one order:
        model.findings (saved in model.json) = eval.findings (what the loader reads)."""
        m, e = list(self.model.findings), list(self.eval.findings)
        if m and e and m != e:
            raise SettingError(f"model.findings {m} and eval.findings {e} differ; set one of them (the other follows)")
        if not (m or e):
            raise SettingError(f"model.kind {self.model.kind} needs its head's findings: set eval.findings to the "
                               "shards' label names to predict, in order (e.g. [cardiomegaly, effusion])")
        self.model.findings = list(m or e)
        self.eval.findings = list(m or e)

    @property
    def global_batch(self) -> int:
        return self.deepspeed.micro_batch * self.deepspeed.grad_accum * self.scale.num_workers


# ---------------------------------------------------------------------------------------------
# Serving (radforge.serve:build_app). Its arguments arrive as strings from `serve run key=value`,
# so, unlike a recipe, it parses numbers from strings (pydantic's lax mode).
# ---------------------------------------------------------------------------------------------


def _split_commas(v: Any) -> Any:
    # Ray's CLI keeps only the last `key=value` of a repeated key: several URLs are one "a,b" value.
    if isinstance(v, str):
        v = [v]
    if isinstance(v, (list, tuple)):
        return [p.strip() for item in v for p in str(item).split(",") if p.strip()]
    return v


URLs = Annotated[list[str], pydantic.BeforeValidator(_split_commas)]


@dataclass
class ServeConfig:
    """`build_app` arguments (the `args:` of a Serve config, or `key=value` on `serve run`)."""

    __pydantic_config__ = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    model: URLs  # exported model dirs (any fsspec URL); the first is the default; required
    index: URLs = field(default_factory=list)  # retrieval index dirs made by `radforge index`
    max_batch_size: int = 16  # radforge.serve.Batcher: images per model forward, 1..1024
    batch_wait_timeout_s: float = 0.01  # radforge.serve.Batcher: the oldest image's wait for a fuller batch, 0..10 s
    max_upload_mb: float = 256.0  # request body limit (and a zip's uncompressed total)
    max_files: int = 2000  # DICOM files per request (CT slices)
    max_models_per_replica: int = 4  # multiplexing: models kept loaded per replica (LRU)
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; > 0 runs the models on cuda
    num_replicas: int | None = None  # fixed replica count (instead of autoscaling)
    min_replicas: int = 1  # autoscaling lower bound (and the replica count without autoscaling)
    max_replicas: int = 1  # > min_replicas turns autoscaling on
    target_ongoing_requests: float = 8.0  # autoscaling target per replica
    max_ongoing_requests: int | None = None  # per replica; default: max(32, 2 × max_batch_size)
    # Per-request budgets (hostile input): past any of them the request gets a JSON 4xx.
    max_image_mb: float = 512.0  # pixels the DICOM headers declare (rows×cols×frames×samples×bytes), summed over a request's files: 413 too_large before decoding
    decode_timeout_s: float = 30.0  # decoding one request; past it its worker process is killed: 408 timeout
    body_timeout_s: float = 60.0  # reading one request body: 408 timeout
    decode_workers: int = 2  # decode processes per replica (an abort or a timeout costs one request, not the replica)
    replica_memory_mb: float | None = None  # declared to Ray; default `declared_memory_mb()` (the formula is there)
    # Authentication: keys never go in this config (it is visible in the dashboard); it names where they are.
    api_keys_env: str = "RADFORGE_API_KEYS"  # env var of the replicas: API keys, comma-separated
    api_keys_file: str | None = None  # a file on every node: one API key per line (# comments)
    allow_unauthenticated: bool = False  # serve without keys on a non-loopback address (trusted network only)

    def __post_init__(self):
        if not self.model:
            raise SettingError("model: at least one exported model dir is required")
        if not 1 <= self.max_batch_size <= 1024:
            raise SettingError(f"max_batch_size must be in [1, 1024], got {self.max_batch_size!r}")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise SettingError(f"batch_wait_timeout_s must be in [0, 10], got {self.batch_wait_timeout_s!r}")
        _above("max_upload_mb", self.max_upload_mb, 0)
        _above("target_ongoing_requests", self.target_ongoing_requests, 0)
        for key in ("max_files", "max_models_per_replica", "max_replicas", "num_replicas", "max_ongoing_requests"):
            if getattr(self, key) is not None:
                _at_least(key, getattr(self, key), 1)
        for key in ("num_cpus", "num_gpus", "min_replicas"):
            _at_least(key, getattr(self, key), 0)
        if self.max_replicas < self.min_replicas:
            raise SettingError("max_replicas must be >= min_replicas")
        for key in ("max_image_mb", "decode_timeout_s", "body_timeout_s"):
            _above(key, getattr(self, key), 0)
        _at_least("decode_workers", self.decode_workers, 1)
        if self.replica_memory_mb is not None:
            _above("replica_memory_mb", self.replica_memory_mb, 0)

    def declared_memory_mb(self) -> float:
        """Memory a replica declares to Ray (`ray_actor_options.memory`), so the scheduler, not the
        OOM killer, keeps replicas apart: 1024 MB (Ray worker, torch, FastAPI) + 512 MB per
        multiplexed model + per decode worker 512 MB (interpreter, pydicom) + 4 × max_image_mb
        (the decoded pixels, their float32 copy and the resampled output). Decode workers are
        capped at that per-worker figure (RLIMIT_DATA), so a lying file fails in its worker.
        `replica_memory_mb` overrides the total (large models)."""
        if self.replica_memory_mb is not None:
            return float(self.replica_memory_mb)
        return 1024 + 512 * self.max_models_per_replica + self.decode_workers * self.decode_worker_memory_mb()

    def decode_worker_memory_mb(self) -> float:
        return 512 + 4 * self.max_image_mb


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load(cls: type, path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build `cls` from an optional YAML file plus `a.b=value` overrides (values parsed as YAML).

    Sections (nested dataclasses) merge: a YAML file or `--set ct.min_slices=4` changes only what it
    names. Mapping-valued settings (`splits`) are values: a YAML file that states `splits` replaces
    the default mapping whole, while `--set splits.val=0.2` changes one entry of the mapping in
    effect (the file's, else the default), so `--set` acts the same with or without
    `--recipe shards/recipes/default.yaml`. `--set splits={train: 0.9, test: 0.1}` replaces it.
    """
    data = _read_yaml(path) if path else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value is not valid YAML: {_one_line(e)}") from None
        _set(cls, data, key, value)
    return from_dict(cls, data)


def _read_yaml(path: str) -> dict:
    from radforge import storage

    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} cannot be read: {_one_line(e)}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at the top level")
    return data


def _set(cls: type, data: dict, key: str, value: Any) -> None:
    """Put one dotted override into the raw recipe mapping, walking the dataclass types so that an
    unknown or non-section key fails here with its full dotted name."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: empty key component")
    node: dict = data
    tp: Any = cls  # a dataclass, or a dict type once inside a mapping-valued setting
    default: Any = _dataclass_default(cls)
    for i, p in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(tp):
            hints = _hints(tp)
            if p not in hints:
                raise ConfigError(_unknown_key(tp, here))
            ftp, fdefault = hints[p], getattr(default, p, None)
        else:  # inside dict[str, X]: any entry name is allowed, its value is a leaf
            ftp, fdefault = typing.get_args(tp)[1], None
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(ftp) and isinstance(value, dict) and isinstance(node.get(p), dict):
                node[p] = _merge(node[p], value)  # `--set ct={min_slices: 3}` keeps the file's ct.*
            else:
                node[p] = value
            return
        if not (dataclasses.is_dataclass(ftp) or typing.get_origin(ftp) is dict):
            raise ConfigError(f"--set {key}: {here} is a value, not a section")
        child = node.get(p)
        if child is None:
            # A mapping-valued setting starts from its value in effect (the default) so one entry
            # can be changed; a section starts empty (from_dict fills in its defaults).
            child = copy.deepcopy(dict(fdefault)) if typing.get_origin(ftp) is dict and fdefault else {}
            node[p] = child
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {here} is not a section in the recipe")
        node, tp, default = child, ftp, fdefault


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dataclass_default(cls: type) -> Any:
    try:
        return cls()
    except Exception:  # a class with required fields has no default instance; merge nothing
        return None


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def from_dict(cls: type, data: dict | None) -> Any:
    """Build a dataclass tree from a plain mapping (YAML, JSON, `--set`), with the dotted key in
    every error. A section given as null (`ct:` with every key commented out) takes its defaults."""
    if isinstance(data, dict):
        data = _without_null_sections(cls, data)
    try:
        return _validator(cls).validate_python({} if data is None else data)
    except pydantic.ValidationError as e:
        raise ConfigError(_message(cls, e)) from None


def to_dict(obj: Any) -> dict:
    """Plain, JSON/YAML-able mapping (tuples become lists); `from_dict(cls, to_dict(x)) == x`."""
    return _plain(dataclasses.asdict(obj))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


@functools.cache
def _validator(cls: type) -> pydantic_core.SchemaValidator:
    """pydantic's validator for the dataclass tree, with containers and strings lax: YAML has no
    tuples (a list fills a fixed-length tuple), sections arrive as mappings, and a number where a
    string is expected (`name: 2024`) is meant as that string. Scalars keep the class's strictness."""

    def lax(schema: Any) -> Any:
        if isinstance(schema, list):
            return [lax(s) for s in schema]
        if not isinstance(schema, dict):
            return schema
        out = {k: lax(v) for k, v in schema.items()}
        if out.get("type") in ("dataclass", "tuple", "list", "dict", "str"):
            out["strict"] = False
        return out

    return pydantic_core.SchemaValidator(lax(pydantic.TypeAdapter(cls).core_schema))


def _without_null_sections(cls: type, data: dict) -> dict:
    sections = {k: tp for k, tp in _hints(cls).items() if dataclasses.is_dataclass(tp)}
    return {k: _without_null_sections(sections[k], v) if k in sections and isinstance(v, dict) else v
            for k, v in data.items() if not (k in sections and v is None)}


# pydantic error type → what the setting expects, for "key: expected X, got Y".
_EXPECTED = {
    "int_type": "integer", "int_parsing": "integer", "int_from_float": "integer",
    "float_type": "finite number", "float_parsing": "finite number", "finite_number": "finite number",
    "bool_type": "true/false", "bool_parsing": "true/false", "string_type": "string",
    "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping",
}
_UNKNOWN_KEY = ("unexpected_keyword_argument", "invalid_key")  # invalid_key: a key that is no string


def _message(cls: type, e: pydantic.ValidationError) -> str:
    """pydantic's first error (an unknown key before anything else) as one line with the dotted key."""
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] in _UNKNOWN_KEY), errors[0])
    loc, kind = err["loc"], err["type"]
    if kind in _UNKNOWN_KEY:
        section = cls
        for p in loc[:-1]:
            section = _hints(section)[p]
        return _unknown_key(section, _dotted(loc[:-1] + (str(loc[-1]),)))
    key = _dotted(loc)
    if kind == "value_error":  # a __post_init__ check of the section at `loc`
        msg = str(err["ctx"]["error"])
        first = "." + msg.split(" ", 1)[0]
        return msg if not key or f".{loc[-1]}." in first else f"{key}.{msg}"
    if kind == "missing" and isinstance(loc[-1], int):  # a fixed-length tuple given too few items
        n = 1 + max(x["loc"][-1] for x in errors if x["type"] == "missing" and x["loc"][:-1] == loc[:-1])
        return f"{_dotted(loc[:-1])}: expected a list of {n}, got {_short(err['input'])}"
    if kind == "too_long":
        return f"{key}: expected a list of {err['ctx']['max_length']}, got {_short(err['input'])}"
    if kind == "missing":
        return f"{key}: required"
    what = f"expected {_EXPECTED[kind]}" if kind in _EXPECTED else err["msg"][:1].lower() + err["msg"][1:]
    return f"{key or 'recipe'}: {what}, got {_short(err['input'])}"


def _unknown_key(section: type, key: str) -> str:
    return f"unknown recipe key {key} (valid: {', '.join(sorted(f.name for f in dataclasses.fields(section)))})"


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _short(value: Any, limit: int = 80) -> str:
    """A value for an error message: repr, one line, bounded (messages are one line for people)."""
    r = repr(value).replace("\n", " ")
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _positive(key: str, values, n: int) -> None:
    # `not v > 0` rather than `v <= 0`: NaN must fail too.
    if len(values) != n or not all(v > 0 for v in values):
        raise SettingError(f"{key} must be {n} positive numbers, got {list(values)}")


def _at_least(key: str, value, low) -> None:
    if not value >= low:  # `not >=`: NaN fails too
        raise SettingError(f"{key} must be >= {low}, got {value!r}")


def _above(key: str, value, low) -> None:
    if not value > low:
        raise SettingError(f"{key} must be > {low}, got {value!r}")


def _objectives() -> dict:
    """The objective registry (`radforge.models.REGISTRY`), the one list of model kinds. Imported
    when a training recipe is validated, not with this module: models import config, and only
    training recipes need torch."""
    from radforge import models

    return models.REGISTRY


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
