"""The shard format in code: sample encode/decode and the manifest. Twin of shards/SPEC.md.

A sample is a group of tar members sharing a key (WebDataset convention), so stock `webdataset`,
`ray.data.read_webdataset` and `tar` all read the shards:

    <key>.npy    CT: int16 HU volume [z, y, x], canonical LPS orientation (numpy .npy format)
    <key>.png    X-ray: 16-bit greyscale PNG, presentation values (0 = black, 65535 = white)
    <key>.json   metadata (see SPEC.md); always present
    <key>.txt    redacted report text (UTF-8); only when a report was joined

Bump SCHEMA_VERSION (and SPEC.md) on any change a reader could notice.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from radforge import kinds

SCHEMA = "radforge.shards"
SCHEMA_VERSION = 2  # 2: manifest versions (`--append`), superseded samples, manifests/vN.json
MANIFEST = "manifest.json"
MANIFESTS = "manifests"  # manifests/v<N>.json: every version's manifest, kept (a pinned run reads one)


@dataclass
class Sample:
    """One sample as stored: its key, the kind's stored array (`kinds.ImageKind.check_stored`),
    the metadata of `<key>.json` (SPEC.md) and the redacted report, if one was joined."""

    key: str
    array: np.ndarray
    meta: dict
    report: str | None = None

    def members(self) -> dict[str, bytes]:
        """Tar members (name suffix → bytes): `encode_sample` of this sample."""
        return encode_sample(self.key, self.array, self.meta, self.report)


def encode_sample(key: str, array: np.ndarray, meta: dict, report: str | None = None) -> dict[str, bytes]:
    """Sample → tar members (name suffix → bytes)."""
    if "." in key or "/" in key:
        raise ValueError("sample keys may not contain '.' or '/' (WebDataset splits on the first dot)")
    kind = kinds.of_modality(meta["modality"])
    if kind is None:
        raise ValueError(f"no image kind stores modality {meta['modality']!r}")
    kind.check_stored(array)
    members = {kind.codec: _CODECS[kind.codec][0](array)}
    members["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if report is not None:
        members["txt"] = report.encode("utf-8")
    return members


def decode_sample(members: dict, *, copy: bool = True) -> tuple[np.ndarray, dict, str | None]:
    """Tar members (suffix → bytes or memoryview: what webdataset or `tar_samples` yield) →
    (array, meta, report). ``copy=False`` returns a CT array that is a read-only view of the
    member's bytes (no copy; the loader's path, where the view crops it at once); the default
    returns an array of its own, as ``np.load`` does."""
    meta = json.loads(bytes(members["json"]))  # bytes(): json refuses memoryviews (a no-op on bytes)
    codec = kinds.of_codec(members).codec
    array = _CODECS[codec][1](members[codec], copy=copy)
    report = bytes(members["txt"]).decode("utf-8") if "txt" in members else None
    return array, meta, report


def _npy_encode(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_header(data) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran_order, dtype, payload offset) of `.npy` bytes, read from the header alone
    with numpy's own parser (no payload touched); None for a version-3 header (utf-8 field names,
    never written for the stored dtypes). ValueError on a bad magic or header."""
    from numpy.lib import format as npy

    view = memoryview(data).cast("B")
    if bytes(view[:6]) != npy.MAGIC_PREFIX or len(view) < 10:
        raise ValueError("not a .npy member (bad magic)")
    version = (view[6], view[7])
    if version == (1, 0):
        end = 10 + int.from_bytes(view[8:10], "little")
    elif version == (2, 0):
        end = 12 + int.from_bytes(view[8:12], "little")
    else:
        return None
    head = io.BytesIO(bytes(view[:end]))
    npy.read_magic(head)
    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran, dtype = read(head)
    return shape, fortran, dtype, end


def _npy_decode(data, *, copy: bool = True) -> np.ndarray:
    """`.npy` bytes → array: the header by `npy_header`, the payload by ``np.frombuffer``
    (``np.load`` on a BytesIO copies the payload twice). Same checks as
    ``np.load(allow_pickle=False)``: object arrays and short payloads raise ValueError."""
    view = memoryview(data).cast("B")
    header = npy_header(view)
    if header is None:  # version 3: numpy's own reader
        return np.load(io.BytesIO(bytes(view)), allow_pickle=False)
    shape, fortran, dtype, end = header
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded (pickles are refused)")
    count = int(np.prod(shape, dtype=np.int64))
    if len(view) - end < count * dtype.itemsize:
        raise ValueError(f".npy payload holds {len(view) - end} bytes; its header promises {count * dtype.itemsize}")
    flat = np.frombuffer(view, dtype=dtype, count=count, offset=end)
    array = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    return array.copy(order="K") if copy else array


def _png_encode(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _png_decode(data, *, copy: bool = True) -> np.ndarray:
    from PIL import Image  # (a decoded PNG is always an array of its own: `copy` is moot)

    return np.asarray(Image.open(io.BytesIO(data))).astype(np.uint16)


# Stored codec (`kinds.ImageKind.codec`, the tar member suffix) → (encode, decode).
_CODECS = {"npy": (_npy_encode, _npy_decode), "png": (_png_encode, _png_decode)}
assert {k.codec for k in kinds.KINDS.values()} <= set(_CODECS), "every image kind's codec needs an encoder"


class DuplicateKeyError(RuntimeError):
    """A second sample with a key already in the shard: a bug in whoever made the keys (planning
    makes them unique by construction), never an input problem. Stock readers refuse such tars."""


class TarWriter:
    """webdataset's TarWriter with the shard conventions (owner radforge, mtime 0, members written
    as given) that refuses a duplicate key instead of writing a tar no stock reader accepts."""

    def __init__(self, fileobj):
        import webdataset as wds

        self._tar = wds.TarWriter(fileobj, user="radforge", group="radforge", mtime=0, encoder=False)
        self._keys: set[str] = set()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if key in self._keys:
            raise DuplicateKeyError(f"sample key {key} written twice to one shard")
        self._keys.add(key)
        self._tar.write({"__key__": key, **members})

    def close(self) -> None:
        self._tar.close()


def shard_name(split: str, index: int, version: int = 1) -> str:
    """Deterministic shard path relative to DEST: `<split>/<split>-000042.tar` (version 1), and
    `<split>/<split>-v0002-000042.tar` for the shards an `--append` version N ≥ 2 adds."""
    if version <= 1:
        return f"{split}/{split}-{index:06d}.tar"
    return f"{split}/{split}-v{version:04d}-{index:06d}.tar"


def manifest_path(version: int) -> str:
    """Path relative to DEST of version N's manifest (`manifest.json` is the latest one)."""
    return f"{MANIFESTS}/v{version}.json"


def new_manifest(*, profile, recipe: dict, deid: dict, plan_digest: str) -> dict[str, Any]:
    """`profile`: the `transforms.Profile` the shards are made with."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "profile": profile.to_dict(),
        "recipe": recipe,
        "deid": deid,
        "plan_digest": plan_digest,
        "version": 1,
        "versions": [],
        "shards": [],
        "superseded": [],
        "totals": {},
        "inputs": {},
    }


def finalize(manifest: dict, shard_records: list[dict], inputs: dict) -> dict:
    """Fill shards (sorted by path), totals per split and modality, and input accounting."""
    shards = sorted((r for r in shard_records if r["samples"] > 0), key=lambda r: r["path"])
    by_split: dict[str, dict] = {}
    by_modality: dict[str, int] = {}
    for r in shards:
        s = by_split.setdefault(r["split"], {"shards": 0, "samples": 0, "bytes": 0, "modalities": {}})
        s["shards"] += 1
        s["samples"] += r["samples"]
        s["bytes"] += r["bytes"]
        for m, n in r["modalities"].items():
            s["modalities"][m] = s["modalities"].get(m, 0) + n
            by_modality[m] = by_modality.get(m, 0) + n
    manifest["shards"] = [
        {**{k: r[k] for k in ("path", "split", "samples", "bytes", "sha256", "modalities")}, "version": manifest.get("version", 1)}
        for r in shards
    ]
    manifest["totals"] = {
        "shards": len(shards),
        "samples": sum(r["samples"] for r in shards),
        "bytes": sum(r["bytes"] for r in shards),
        "by_split": dict(sorted(by_split.items())),
        "by_modality": dict(sorted(by_modality.items())),
    }
    manifest["inputs"] = inputs
    manifest["versions"] = [_version_entry(manifest)]
    return manifest


def _version_entry(m: dict) -> dict:
    return {"version": m["version"], "plan_digest": m["plan_digest"], "shards": [s["path"] for s in m["shards"]],
            "superseded": len(m.get("superseded", [])), "inputs": m["inputs"]}


def append_version(previous: dict, new: dict, superseded: list[dict], inputs: dict) -> dict:
    """The manifest of version N+1: `new` (finalized from this version's shards and its own
    `inputs`, with `new["version"]` = N+1) on top of `previous` (version N). Shards: every
    previous one unchanged, then the new ones. `superseded`: {"key", "shard", "modality",
    "split"} of earlier samples a new one replaces (a series that gained slices); they stay in
    their shard and readers skip them. `inputs`: the totals over all versions (every known file
    once, at its latest disposition); each version's own are in `versions`."""
    version_inputs = new["inputs"]
    m = dict(new)
    m["shards"] = list(previous["shards"]) + new["shards"]
    m["superseded"] = list(previous.get("superseded", [])) + [{**s, "by_version": new["version"]} for s in superseded]
    entry = _version_entry({**new, "superseded": superseded, "inputs": version_inputs})
    m["versions"] = list(_versions(previous)) + [entry]
    _totals(m)
    m["inputs"] = inputs
    return m


def _versions(m: dict) -> list[dict]:
    """A manifest's versions (a schema-1 manifest is version 1 of itself)."""
    return m.get("versions") or [{"version": 1, "plan_digest": m.get("plan_digest"), "shards": [s["path"] for s in m["shards"]],
                                  "superseded": 0, "inputs": m.get("inputs", {})}]


def _totals(m: dict) -> None:
    """Totals over the shards, less the superseded samples (what a reader of this version sees)."""
    t = {"shards": 0, "samples": 0, "bytes": 0, "by_split": {}, "by_modality": {}}
    for r in m["shards"]:
        s = t["by_split"].setdefault(r["split"], {"shards": 0, "samples": 0, "bytes": 0, "modalities": {}})
        t["shards"] += 1
        s["shards"] += 1
        t["bytes"] += r["bytes"]
        s["bytes"] += r["bytes"]
        for mod, n in r["modalities"].items():
            s["modalities"][mod] = s["modalities"].get(mod, 0) + n
            t["by_modality"][mod] = t["by_modality"].get(mod, 0) + n
        s["samples"] += r["samples"]
        t["samples"] += r["samples"]
    for old in m["superseded"]:
        s = t["by_split"][old["split"]]
        s["samples"] -= 1
        t["samples"] -= 1
        s["modalities"][old["modality"]] -= 1
        t["by_modality"][old["modality"]] -= 1
    t["by_split"] = dict(sorted(t["by_split"].items()))
    t["by_modality"] = dict(sorted(t["by_modality"].items()))
    m["totals"] = t


def superseded(manifest: dict) -> dict[str, set[str]]:
    """shard path → keys of samples in it that a later version replaced (readers skip them)."""
    out: dict[str, set[str]] = {}
    for s in manifest.get("superseded", []):
        out.setdefault(s["shard"], set()).add(s["key"])
    return out


def reconciles(inputs: dict) -> bool:
    """seen = used + skipped + rejected, the invariant every ingest must satisfy."""
    return inputs["seen"] == inputs["used"] + sum(inputs["skipped"].values()) + sum(inputs["rejected"].values())


def shards_root(url: str) -> str:
    """The shard set's directory, given it or its manifest's URL (what users may pass either way)."""
    return url[: -len(MANIFEST)].rstrip("/") if url.endswith("/" + MANIFEST) or url == MANIFEST else url


def read_manifest(url: str, version: int | None = None) -> dict:
    """Load and check a manifest (a DEST directory URL or the manifest's own URL); `version`
    pins version N (`manifests/vN.json`: the fixed snapshot an `--append` left behind)."""
    from radforge import storage
    from radforge.errors import ConfigError

    if version is not None:
        url = storage.join(shards_root(url), manifest_path(version))
    elif not url.endswith(".json"):
        url = storage.join(url, MANIFEST)
    try:
        m = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise ConfigError(f"no manifest at {url} (is the ingest finished? consumers trust only manifests)") from None
    if m.get("schema") != SCHEMA:
        raise ConfigError(f"{url} is not a radforge shard manifest")
    if m.get("schema_version", 0) > SCHEMA_VERSION:
        raise ConfigError(
            f"{url} has schema version {m['schema_version']}; this radforge reads up to {SCHEMA_VERSION}: upgrade radforge"
        )
    return m


def iter_samples(dest: str, manifest: dict, *, limit: int | None = None, split: str | None = None):
    """Stream raw samples (dicts of suffix → bytes plus `__key__`, `__url__`) from a manifest's
    shards with webdataset's own tar iterators, straight from storage (no local copy)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from radforge import storage

    n = 0
    gone = superseded(manifest)
    for shard in manifest["shards"]:
        if split and shard["split"] != split:
            continue
        url = storage.join(dest, shard["path"])
        skip = gone.get(shard["path"], set())
        with storage.open_input(url) as f:
            files = ({**s, "__url__": url} for s in tar_file_iterator(f))
            for sample in group_by_keys(files):
                if sample["__key__"] in skip:
                    continue
                yield sample
                n += 1
                if limit is not None and n >= limit:
                    return


class _ViewFile:
    """A seekable read-only file over a buffer without copying it (io.BytesIO shares only an
    exact bytes object and copies a bytearray or memoryview whole): `tar_samples`' tarfile reads
    the 512-byte headers through it and seeks over the payloads."""

    def __init__(self, view: memoryview):
        self._view, self._pos = view, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos : end]) if end > self._pos else b""
        self._pos = max(self._pos, end)
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos + (0, self._pos, len(self._view))[whence])
        return self._pos

    def tell(self) -> int:
        return self._pos


def tar_samples(data: bytes | bytearray | memoryview) -> Iterator[dict]:
    """The samples of one whole shard held in memory (any bytes-like: `storage.read_into`'s
    read-only view): dicts of suffix → memoryview of the member's bytes inside `data`, plus
    ``__key__``; the same samples, keys and bytes as webdataset's
    ``tar_file_iterator`` + ``group_by_keys`` (its key rule, lower-cased suffixes, non-files and
    ``__…__`` entries skipped, a repeated suffix in one sample is a ValueError), without copying
    a payload: tarfile reads only the 512-byte headers and seeks over the data.

    A torn tar raises ``tarfile.ReadError`` where the stream reader would; a header that fails its
    checksum mid-archive ends the iteration early, as in tarfile (the loader's sample count against
    the manifest catches that). A view keeps `data` alive: copy what must outlive the shard."""
    import re
    import tarfile

    from webdataset.tariterators import base_plus_ext

    whole = memoryview(data)
    tf = tarfile.open(fileobj=_ViewFile(whole), mode="r:")
    sample: dict | None = None
    while (info := tf.next()) is not None:
        tf.members.clear()  # the index tarfile keeps is not needed: constant memory per shard
        name = info.name
        if not info.isreg() or re.match(r"__[^/]*__($|/)", name):
            continue
        if info.issparse() or info.offset_data + info.size > len(whole):
            raise tarfile.ReadError(f"{name}: unexpected end of data" if not info.issparse() else f"{name}: sparse member")
        key, suffix = base_plus_ext(name)
        if key is None:
            continue
        suffix = suffix.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        if suffix in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix} {sample.keys()}")
        sample[suffix] = whole[info.offset_data : info.offset_data + info.size]
    if sample is not None:
        yield sample


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


SELECTION = "selection.json"  # per study: which CT series became samples and why (pseudonyms only)


def selection(series: list[dict]) -> dict:
    """`selection.json`: {"studies": {study: [{"series", "key", "status", "why", "sub_series"}]}}
    from one dict per CT series item (status "used" for a planned sample; why: the rule that kept
    it, "default" when none matched, or the skip/reject reason). Pseudonyms and rule names only."""
    studies: dict[str, list[dict]] = {}
    for v in series:
        why = v["reason"] or (f"rule:{v['selected_by']}" if v.get("selected_by") else "default")
        entry = {"series": v["series"], "key": v["key"], "status": "used" if v["status"] == "planned" else v["status"],
                 "why": why, "sub_series": v.get("sub_series")}
        studies.setdefault(v["study"], []).append(entry)
    for entries in studies.values():
        entries.sort(key=lambda e: (e["status"] != "used", e["series"], e["sub_series"] or ""))
    return {"schema": SCHEMA, "studies": dict(sorted(studies.items()))}


def format_selection(sel: dict, limit: int = 20) -> str:
    """Per study, the CT series kept and dropped, with the reason (`radforge inspect`)."""
    studies = sel.get("studies", {})
    lines = [f"CT series selection ({len(studies)} studies; pseudonyms)"]
    for study, entries in list(studies.items())[:limit]:
        lines.append(f"  study {study}")
        for e in entries:
            sub = f" [{e['sub_series']}]" if e.get("sub_series") else ""
            lines.append(f"    {e['status']:<9}series {e['series']}{sub}  {e['why']}")
    if len(studies) > limit:
        lines.append(f"  … {len(studies) - limit} more studies in {SELECTION}")
    return "\n".join(lines)


def format_summary(manifest: dict, *, wall_s: float | None = None, title: str = "radforge shards") -> str:
    """A table a person reads at the end of an ingest and from `radforge inspect`."""
    t = manifest["totals"]
    inp = manifest["inputs"]
    lines = [title, "=" * len(title)]

    def row(label, value, extra=""):
        lines.append(f"  {label:<22}{value:>14}  {extra}".rstrip())

    row("files seen", f"{inp['seen']:,}")
    row("files used", f"{inp['used']:,}")
    row("files skipped", f"{sum(inp['skipped'].values()):,}", ", ".join(f"{k} {v}" for k, v in inp["skipped"].items()))
    row("files rejected", f"{sum(inp['rejected'].values()):,}")
    for reason, n in inp["rejected"].items():
        row(f"  {reason}", f"{n:,}")
    ok = "yes" if reconciles(inp) else "NO"
    row("accounting", ok, "seen = used + skipped + rejected")
    if manifest.get("version", 1) > 1:
        last = manifest["versions"][-1]["inputs"]
        row("version", f"{manifest['version']}", f"this version: {last.get('new', 0)} new files, {last.get('replanned', 0)} "
            f"re-planned with their series, {len(manifest['versions'][-1]['shards'])} new shard(s), "
            f"{manifest['versions'][-1]['superseded']} sample(s) superseded")
    lines.append("")
    mods = t.get("by_modality", {})
    xray = {m: n for m, n in mods.items() if m in kinds.XRAY.modalities}
    row("CT volumes", f"{sum(n for m, n in mods.items() if m in kinds.CT.modalities):,}")
    row("X-ray images", f"{sum(xray.values()):,}", ", ".join(f"{m} {n}" for m, n in xray.items()))
    row("samples", f"{t.get('samples', 0):,}")
    row("shards", f"{t.get('shards', 0):,}", _mb(t.get("bytes", 0)))
    for split, s in t.get("by_split", {}).items():
        row(f"  {split}", f"{s['samples']:,}", f"samples in {s['shards']} shard(s), {_mb(s['bytes'])}, " + ", ".join(f"{k} {v}" for k, v in s["modalities"].items()))
    prof = manifest.get("profile", {})
    if prof:
        row("profile", prof.get("profile_id", "?"), f"{prof.get('name')}: CT {prof['ct']['spacing_mm']} mm (z,y,x) HU int16; X-ray longest side {prof['xray']['longest_side']}, VOI {prof['xray']['voi']}")
    if manifest.get("deid", {}).get("demo_key"):
        row("pseudonyms", "DEMO KEY", "public key: pseudonyms are not secret (demo mode)")
    if wall_s:
        row("wall time", f"{wall_s:,.1f} s", f"{inp['seen'] / wall_s:,.1f} files/s, {t.get('bytes', 0) / 1e6 / wall_s:,.2f} MB/s written")
    return "\n".join(lines)
