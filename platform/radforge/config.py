"""Typed recipes: dataclasses, YAML loading, dotted `--set a.b=v` overrides, clear errors.

Each component owns a small dataclass; a recipe is a tree of them. The dataclass defaults are the
documented defaults and the YAML files under `shards/recipes/` and `jobs/recipes/` restate them with
units and comments (a test keeps `shards/recipes/default.yaml` equal to `IngestRecipe()`).
Validation lives in `__post_init__`, so a bad value fails at load time with the dotted key in the
message, before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from radforge import kinds
from radforge.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Ingest recipe
# ---------------------------------------------------------------------------------------------

SUPPORTED_MODALITIES = kinds.MODALITIES


@dataclass
class CTConfig:
    """How CT series become volumes. Spacing is in array axis order (z, y, x), millimetres."""

    spacing_mm: tuple[float, float, float] = (3.0, 1.5, 1.5)
    min_slices: int = 8
    # Slice spacing may vary by this fraction of the median before the series counts as non-uniform
    # (a gap of a missing slice is ~100%, rounding noise in positions is < 1%).
    spacing_tolerance: float = 0.1
    # Gantry tilt shows as slice positions drifting off the slice normal; beyond this angle the
    # series is rejected (stacking it would shear the anatomy).
    max_tilt_deg: float = 0.5
    # "reject" the series, or "drop" repeated positions when the pixels are identical copies.
    duplicate_positions: str = "reject"
    # Largest source volume (voxels) one worker may assemble; bigger series are rejected, not OOM'd.
    max_voxels: int = 1024 * 1024 * 2000

    def __post_init__(self):
        # Comparisons are written so that NaN fails them (`not x > 0`), since NaN < 0 is False too.
        _positive("ct.spacing_mm", self.spacing_mm, n=3)
        # Floats, always: the spacing feeds the profile_id digest, where 3 and 3.0 hash differently.
        self.spacing_mm = tuple(float(v) for v in self.spacing_mm)
        if self.min_slices < 2:
            raise ConfigError("ct.min_slices must be >= 2")
        if not 0 < self.spacing_tolerance < 1:
            raise ConfigError("ct.spacing_tolerance must be in (0, 1)")
        if not 0 <= self.max_tilt_deg < 90:
            raise ConfigError(f"ct.max_tilt_deg must be in [0, 90), got {self.max_tilt_deg!r}")
        _choice("ct.duplicate_positions", self.duplicate_positions, ("reject", "drop"))
        if not self.max_voxels > 0:
            raise ConfigError(f"ct.max_voxels must be > 0, got {self.max_voxels!r}")


@dataclass
class XrayConfig:
    """How CR/DX images are stored (lossless 16-bit PNG, presentation values, high = bright)."""

    longest_side: int = 1024
    # "window": apply the header's VOI (VOI LUT Sequence, else the first window) as a radiologist
    # would see it; "none": store Modality-LUT values rescaled to the BitsStored range.
    voi: str = "window"

    def __post_init__(self):
        if self.longest_side < 16:
            raise ConfigError("xray.longest_side must be >= 16")
        _choice("xray.voi", self.voi, ("window", "none"))


@dataclass
class DeidConfig:
    """Keyed pseudonyms: HMAC-SHA256 with a secret that never leaves the operator's environment."""

    secret_env: str = "RADFORGE_DEID_SECRET"
    secret_file: str | None = None
    # Demo mode uses a public, fixed key: pseudonyms are then NOT secret. Marked in the manifest.
    demo_key: bool = False
    keep_age_sex: bool = False

    def __post_init__(self):
        if not self.secret_env or not self.secret_env.strip():
            raise ConfigError("deid.secret_env must name an environment variable")


@dataclass
class TableConfig:
    """An optional side table (CSV, Parquet or JSONL) joined to studies."""

    join_on: str = "AccessionNumber"  # DICOM attribute matched: AccessionNumber or StudyInstanceUID
    key_column: str = "AccessionNumber"  # the table's column holding that value
    text_column: str = "report"  # reports only
    findings: list[str] = field(default_factory=list)  # labels only; empty = every other column

    def __post_init__(self):
        _choice("join_on", self.join_on, ("AccessionNumber", "StudyInstanceUID"))


@dataclass
class ShardConfig:
    target_mb: float = 256.0

    def __post_init__(self):
        if not self.target_mb > 0:
            raise ConfigError(f"shards.target_mb must be > 0, got {self.target_mb!r}")


@dataclass
class IngestRecipe:
    name: str = "default"
    modalities: list[str] = field(default_factory=lambda: list(SUPPORTED_MODALITIES))
    ct: CTConfig = field(default_factory=CTConfig)
    xray: XrayConfig = field(default_factory=XrayConfig)
    deid: DeidConfig = field(default_factory=DeidConfig)
    reports: TableConfig = field(default_factory=TableConfig)
    labels: TableConfig = field(default_factory=TableConfig)
    # Fractions of patients per split, assigned from the patient pseudonym.
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    shards: ShardConfig = field(default_factory=ShardConfig)
    # Where the private index and rejects ledger go (they hold source paths and original UIDs).
    # Default: "<DEST>.private". Never inside DEST.
    private_dir: str | None = None

    def __post_init__(self):
        if not self.name or not self.name.strip():
            raise ConfigError("name must be a non-empty string")
        bad = [m for m in self.modalities if m not in SUPPORTED_MODALITIES]
        if bad or not self.modalities:
            raise ConfigError(f"modalities must be a non-empty subset of {list(SUPPORTED_MODALITIES)}, got {self.modalities}")
        fractions = list(self.splits.values())
        if not fractions or not all(v >= 0 for v in fractions) or not abs(sum(fractions) - 1) <= 1e-6:
            raise ConfigError(f"splits must be non-negative fractions summing to 1, got {self.splits}")
        self.splits = {name: float(v) for name, v in self.splits.items()}
        for name in self.splits:
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"split name {name!r} must be a plain identifier")


# ---------------------------------------------------------------------------------------------
# Training recipe (jobs/recipes/*.yaml). One dataclass per component; `TrainRecipe` is the tree.
# Batch sizes are stated ONCE (deepspeed.micro_batch × deepspeed.grad_accum × scale.num_workers =
# the global batch); radforge.train derives the DeepSpeed config from these fields and nowhere else.
# ---------------------------------------------------------------------------------------------

MODEL_KINDS = ("mae", "clip")
VIT_PRESETS = ("tiny", "small", "base", "large")
IMAGE_KINDS = tuple(kinds.KINDS)  # ct = 3D volumes (CT); xray = 2D images (CR, DX)


@dataclass
class DataConfig:
    """Where the shards are and how they stream (radforge.loader)."""

    shards: str = "var/demo/shards"  # shard set: directory URL holding manifest.json (any fsspec URL)
    image: str = "ct"  # ct: CT volumes, 3D models; xray: CR/DX images, 2D models
    train_split: str = "train"
    val_split: str = "val"
    require_report: bool = False  # CLIP sets this: samples without a report are skipped (counted)
    shuffle_buffer: int = 64  # samples held for the within-rank shuffle (memory: buffer × sample size)
    num_workers: int = 1  # DataLoader worker processes per rank (0 = in the training process)
    verify_sha256: bool = True  # check each shard against the manifest before use; mismatches are skipped
    cache_dir: str | None = None  # optional local cache of shards (None = stream only)
    cache_limit_gb: float = 10.0  # cache size bound (least recently used shards evicted)

    def __post_init__(self):
        _choice("data.image", self.image, IMAGE_KINDS)
        if self.shuffle_buffer < 1:
            raise ConfigError("data.shuffle_buffer must be >= 1")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if not self.cache_limit_gb > 0:
            raise ConfigError("data.cache_limit_gb must be > 0")


@dataclass
class ViewConfig:
    """The model view derived from stored samples at load time (radforge.transforms), shared by
    the loader, evaluation and serving and written into exported models."""

    # CT: HU windows (level, width) → one channel each, scaled to [0, 1].
    ct_windows: list[tuple[float, float]] = field(default_factory=lambda: [(-600.0, 1500.0), (40.0, 400.0)])
    ct_size: tuple[int, int, int] = (32, 64, 64)  # model input (z, y, x) voxels: crop / pad
    xray_size: int = 224  # model input (square, px): aspect-preserving resize then centre/random crop
    xray_mean: float = 0.5  # normalisation of [0, 1] presentation values
    xray_std: float = 0.25
    rand_crop: bool = True  # training: random crop position (evaluation/serving: centre)
    rand_flip: bool = False  # training: random left-right flip (off: laterality is anatomy)
    # CT: resample to this voxel spacing (z, y, x mm) at load time, from each sample's stored
    # spacing_mm; null = use the shards' spacing as stored (the ingest profile's, usually right).
    ct_spacing_mm: tuple[float, float, float] | None = None

    def __post_init__(self):
        if not self.ct_windows:
            raise ConfigError("view.ct_windows needs at least one (level, width) window")
        for level, width in self.ct_windows:
            if not width > 0:
                raise ConfigError(f"view.ct_windows: width must be > 0, got {width!r}")
        _positive("view.ct_size", self.ct_size, n=3)
        self.ct_size = tuple(int(v) for v in self.ct_size)
        if self.ct_spacing_mm is not None:
            _positive("view.ct_spacing_mm", self.ct_spacing_mm, n=3)
            self.ct_spacing_mm = tuple(float(v) for v in self.ct_spacing_mm)
        if self.xray_size < 16:
            raise ConfigError("view.xray_size must be >= 16")
        if not self.xray_std > 0:
            raise ConfigError("view.xray_std must be > 0")


@dataclass
class TextConfig:
    """CLIP text tower: a small transformer with a tokenizer trained on the corpus' reports
    (`kind: small`), or a Hugging Face encoder + tokenizer from a local/object-store dir (`kind: hf`)."""

    kind: str = "small"
    path: str | None = None  # hf: directory (any URL) with config + weights + tokenizer; offline
    vocab_size: int = 2000  # small: BPE vocabulary trained on the training split's reports
    max_len: int = 64  # tokens per report (truncated)
    width: int = 128
    depth: int = 2
    heads: int = 4

    def __post_init__(self):
        _choice("model.text.kind", self.kind, ("small", "hf"))
        if self.kind == "hf" and not self.path:
            raise ConfigError("model.text.path must name the Hugging Face model directory when kind is hf")
        for k in ("vocab_size", "max_len", "width", "depth", "heads"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.text.{k} must be >= 1")
        if self.width % self.heads:
            raise ConfigError("model.text.width must be divisible by model.text.heads")


@dataclass
class ModelConfig:
    """What to train. The image encoder is a ViT whose dimensionality follows data.image."""

    kind: str = "mae"  # mae | clip
    preset: str = "tiny"  # ViT size: tiny | small | base | large
    patch_ct: tuple[int, int, int] = (8, 16, 16)  # 3D patch (z, y, x) voxels; must divide view.ct_size
    patch_xray: int = 16  # 2D patch (px); must divide view.xray_size
    mask_ratio: float = 0.75  # MAE: fraction of patches hidden from the encoder
    norm_pix_loss: bool = True  # MAE: loss on per-patch normalised pixels
    decoder_width: int = 128  # MAE decoder
    decoder_depth: int = 2
    embed_dim: int = 128  # CLIP: joint embedding size
    init_temperature: float = 0.07  # CLIP: initial softmax temperature (learnable)
    init_from: str | None = None  # CLIP: an exported MAE model dir whose encoder initialises the image tower
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self):
        _choice("model.kind", self.kind, MODEL_KINDS)
        _choice("model.preset", self.preset, VIT_PRESETS)
        _positive("model.patch_ct", self.patch_ct, n=3)
        self.patch_ct = tuple(int(v) for v in self.patch_ct)
        if self.patch_xray < 1:
            raise ConfigError("model.patch_xray must be >= 1")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError("model.mask_ratio must be in (0, 1)")
        if not self.init_temperature > 0:
            raise ConfigError("model.init_temperature must be > 0")

    def patch(self, image: kinds.ImageKind) -> tuple[int, ...]:
        """The patch (voxels per axis) for an image kind: `patch_ct` in 3D, `patch_xray` squared in 2D."""
        return tuple(self.patch_ct) if image.ndim == 3 else (self.patch_xray,) * image.ndim


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to lr × min_lr_ratio at `train.steps`."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm (0 = off)

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError("optim.lr must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio must be in [0, 1]")
        if not self.grad_clip >= 0:
            raise ConfigError("optim.grad_clip must be >= 0")


@dataclass
class DeepSpeedSettings:
    """The recipe side of the DeepSpeed config (radforge.train generates the rest, in one place)."""

    zero_stage: int = 2  # 0 | 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (bf16/fp16 need GPUs)
    micro_batch: int = 4  # samples per worker per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    activation_checkpointing: bool = False
    offload_optimizer: bool = False  # ZeRO optimizer state on CPU (stage >= 1)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        _choice("deepspeed.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ConfigError("deepspeed.micro_batch and deepspeed.grad_accum must be >= 1")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs zero_stage >= 1")


@dataclass
class ScaleConfig:
    """Ray Train scaling: multi-node is configuration only."""

    num_workers: int = 2
    use_gpu: bool = False  # nccl when true, gloo otherwise
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used only with use_gpu
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError("scale.num_workers must be >= 1")
        _choice("scale.placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        if not self.cpus_per_worker > 0:
            raise ConfigError("scale.cpus_per_worker must be > 0")


@dataclass
class CheckpointConfig:
    """Sharded DeepSpeed state + loader position + recipe, through Ray Train's storage."""

    storage_path: str = "var/demo/checkpoints"  # any fsspec URL (s3:// works)
    every_steps: int = 50
    keep_last: int = 2
    max_failures: int = 2  # worker-group restarts (Ray Train FailureConfig), each from the last checkpoint

    def __post_init__(self):
        if self.every_steps < 1 or self.keep_last < 1 or self.max_failures < 0:
            raise ConfigError("checkpoint.every_steps and keep_last must be >= 1, max_failures >= 0")


@dataclass
class EvalConfig:
    """In-loop and offline evaluation (radforge.evaluate)."""

    every_steps: int = 0  # 0 = only at the end
    split: str = "val"
    findings: list[str] = field(default_factory=list)  # empty = every finding in the labels
    # Zero-shot prompts; `{finding}` is replaced by the finding's name.
    positive_prompt: str = "{finding} is present."
    negative_prompt: str = "no {finding}."
    bootstrap: int = 1000  # resamples for the 95% CIs
    max_samples: int = 0  # cap per evaluation (0 = the whole split)

    def __post_init__(self):
        if self.every_steps < 0 or self.bootstrap < 0 or self.max_samples < 0:
            raise ConfigError("eval.every_steps, eval.bootstrap and eval.max_samples must be >= 0")
        if "{finding}" not in self.positive_prompt or "{finding}" not in self.negative_prompt:
            raise ConfigError("eval.positive_prompt and eval.negative_prompt must contain {finding}")


@dataclass
class TrainRecipe:
    name: str = "tiny-mae-ct"
    seed: int = 0
    steps: int = 100  # optimizer steps in total (the schedule's length); epochs follow from the data
    log_every: int = 10
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
            raise ConfigError("name must be a non-empty string")
        if self.steps < 1 or self.log_every < 1:
            raise ConfigError("steps and log_every must be >= 1")
        if self.model.kind == "clip":
            self.data.require_report = True
        if self.data.image == "ct":
            bad = [s for s, p in zip(self.view.ct_size, self.model.patch_ct) if s % p]
            if bad:
                raise ConfigError(f"model.patch_ct {list(self.model.patch_ct)} must divide view.ct_size {list(self.view.ct_size)}")
        elif self.view.xray_size % self.model.patch_xray:
            raise ConfigError(f"model.patch_xray {self.model.patch_xray} must divide view.xray_size {self.view.xray_size}")
        if self.deepspeed.precision != "fp32" and not self.scale.use_gpu:
            raise ConfigError(f"deepspeed.precision {self.deepspeed.precision} needs scale.use_gpu: true (CPU training is fp32)")

    @property
    def global_batch(self) -> int:
        return self.deepspeed.micro_batch * self.deepspeed.grad_accum * self.scale.num_workers


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
    data: dict = {}
    if path:
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
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            fields = {f.name: f for f in dataclasses.fields(tp)}
            if p not in fields:
                raise ConfigError(f"unknown recipe key {here} (valid: {', '.join(sorted(fields))})")
            ftp = _unwrap_optional(typing.get_type_hints(tp)[p])
            fdefault = getattr(default, p, None) if default is not None else None
        else:  # inside dict[str, X]: any entry name is allowed, its value is a leaf
            ftp, fdefault = typing.get_args(tp)[1] if typing.get_args(tp) else Any, None
        if last:
            if dataclasses.is_dataclass(ftp) and isinstance(value, dict) and isinstance(node.get(p), dict):
                node[p] = _merge(node[p], value)  # `--set ct={min_slices: 3}` keeps the file's ct.*
            else:
                node[p] = value
            return
        is_section = dataclasses.is_dataclass(ftp) or typing.get_origin(ftp) is dict
        if not is_section:
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


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build a dataclass tree from a plain mapping, with the dotted key in every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {_short(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((str(k) for k in data if k not in fields))
    if unknown:
        raise ConfigError(f"unknown recipe key {prefix}{unknown[0]} (valid: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def to_dict(obj: Any) -> dict:
    """Plain, JSON/YAML-able mapping (tuples become lists); `from_dict(cls, to_dict(x)) == x`."""
    return _plain(dataclasses.asdict(obj))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    try:
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            if origin is tuple and args and Ellipsis not in args and len(args) != len(value):
                raise TypeError
            item_t = args[0] if args else Any
            items = [_coerce(item_t, v, key) for v in value]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if tp in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            if not math.isfinite(value):  # .nan / .inf pass every `<` check below them otherwise
                raise TypeError
            if tp is int and float(value) != int(value):
                raise TypeError
            return tp(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)}") from None
    return value


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args and Ellipsis not in args:
        return f"a list of {len(args)} {_type_name(args[0])}s"
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}s" if args else "a list"
    if origin is dict:
        return f"a mapping of names to {_type_name(args[1])}s" if args else "a mapping"
    names = {bool: "true/false", int: "integer", float: "finite number", str: "string"}
    return names.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _short(value: Any, limit: int = 80) -> str:
    """A value for an error message: repr, one line, bounded (messages are one line for people)."""
    r = repr(value).replace("\n", " ")
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _positive(key: str, values, n: int) -> None:
    # `not v > 0` rather than `v <= 0`: NaN must fail too.
    if len(values) != n or not all(v > 0 for v in values):
        raise ConfigError(f"{key} must be {n} positive numbers, got {list(values)}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
