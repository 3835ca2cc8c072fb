"""Typed recipes: dataclasses, YAML loading, dotted `--set a.b=v` overrides, clear errors.

Each component owns a small dataclass; a recipe is a tree of them. The dataclass defaults are the
documented defaults and the YAML files under `shards/recipes/` and `jobs/recipes/` restate them with
units and comments (a test keeps `shards/recipes/default.yaml` equal to `IngestRecipe()`).
Validation lives in `__post_init__`, so a bad value fails at load time with the dotted key in the
message, before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from radforge.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Ingest recipe
# ---------------------------------------------------------------------------------------------

SUPPORTED_MODALITIES = ("CT", "CR", "DX")


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
        _positive("ct.spacing_mm", self.spacing_mm, n=3)
        if self.min_slices < 2:
            raise ConfigError("ct.min_slices must be >= 2")
        if not 0 < self.spacing_tolerance < 1:
            raise ConfigError("ct.spacing_tolerance must be in (0, 1)")
        _choice("ct.duplicate_positions", self.duplicate_positions, ("reject", "drop"))


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
        if self.target_mb <= 0:
            raise ConfigError("shards.target_mb must be > 0")


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
        bad = [m for m in self.modalities if m not in SUPPORTED_MODALITIES]
        if bad or not self.modalities:
            raise ConfigError(f"modalities must be a non-empty subset of {list(SUPPORTED_MODALITIES)}, got {self.modalities}")
        if not self.splits or any(v < 0 for v in self.splits.values()) or abs(sum(self.splits.values()) - 1) > 1e-6:
            raise ConfigError(f"splits must be non-negative fractions summing to 1, got {self.splits}")
        for name in self.splits:
            if not name.isidentifier():
                raise ConfigError(f"split name {name!r} must be a plain identifier")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load(cls: type, path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build `cls` from an optional YAML file plus `a.b=value` overrides (values parsed as YAML)."""
    data: dict = {}
    if path:
        from radforge import storage

        try:
            text = storage.read_bytes(path).decode()
        except FileNotFoundError:
            raise ConfigError(f"recipe not found: {path}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return from_dict(cls, data)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown recipe key {prefix}{unknown[0]} (valid: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


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
            if tp is int and float(value) != int(value):
                raise TypeError
            return tp(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _positive(key: str, values, n: int) -> None:
    if len(values) != n or any(v <= 0 for v in values):
        raise ConfigError(f"{key} must be {n} positive numbers, got {list(values)}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
