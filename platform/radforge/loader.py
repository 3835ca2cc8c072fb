"""Streaming loader: manifest shards on any fsspec URL → batches of model views, resumable.

No Ray imports: rank, world size and seed are passed in (radforge.train does that).

How it works
------------
The epoch is planned in *index space* from the manifest alone, before any byte is read. A "slot"
is one sample of the selected image kind (``data.image``; ``kinds`` says which modalities), numbered
by its shard (manifest order) and its ordinal among the selected samples of that shard (tar/key
order); the manifest's per-shard modality counts give the number of slots without reading anything.

* Streams. Each rank runs ``max(1, data.num_workers)`` streams (torch DataLoader workers), so
  ``S = world_size × workers`` streams in all. The split's shards are partitioned once into S
  groups of nearly equal slot counts (largest first, to the lightest group). Every epoch a seeded
  permutation deals the groups to the streams and orders the shards inside each group, so a shard
  moves between ranks from epoch to epoch while every stream's slot count stays the same.
  With FEWER shards than streams, every stream reads every shard and keeps every S-th slot
  (sample-level striding: correct, but each shard is read S times; a warning says so).
* Shuffle. Each stream's slot sequence is shuffled with webdataset's own shuffle-buffer stage
  (``data.shuffle_buffer``, seeded by seed/epoch/stream) run over slot numbers; the data side then
  reads the stream's shards sequentially and emits slots in that order, holding at most about one
  buffer of raw samples.
* Stages. A stream is webdataset-style generator stages composed in a list (`_RankStreams.stream`):
  planned shard reads → `_prefetch` → `_shard_slots` (`shardspec.tar_samples` over the verified
  shard bytes: webdataset's grouping rules, no shell-outs, no copy of the corpus; selects the
  kind's modalities) → `_in_plan_order` → `_decode` (decode + report check + view) →
  `_substitute` (train) or `_good_only` (evaluation) → `_batched`. Every stage that can meet bad
  data takes the same ``handler=``: count the skip, warn, go on (`_count_warn_skip`).
* I/O. A shard is fetched whole (one GET; local files: one read) into one buffer on a prefetch
  thread one shard ahead, and its sha256 (``data.verify_sha256``) is computed piece by piece as
  the body arrives (`storage.read_into`: fsspec's event loop receives while the prefetch thread
  hashes), so the digest is ready with the last byte; the stream's download + hashing of the next
  shard overlaps the decoding of this one (``radforge bench stream`` measures it against a plain
  tar read). A read that checks sha256 skips botocore's own CRC32 of the body. A stream runs epoch after epoch in one DataLoader
  iteration: workers start once and the prefetch crosses epoch boundaries. ``data.cache_dir``
  keeps verified shards on local disk (LRU by file mtime, bounded by ``data.cache_limit_gb``; a
  cache hit is not hashed again).
* Verification guarantee. A shard's bytes are parsed only after its sha256 matched the manifest:
  a mismatched shard yields no sample at all (its slots are bad slots, below, counted in
  ``sha_mismatch``, ``bad_shards`` and ``skipped:bad_shard``), however the damage falls.
* No copies between tar and view. The body is copied once, into the shard's buffer; the
  shard's members are read-only memoryviews into it (`shardspec.tar_samples`), a CT volume is ``np.frombuffer`` over its ``.npy`` member
  (`shardspec.decode_sample` with ``copy=False``) and the view crops it, so only the crop is ever
  read. Memory: the shard being decoded, the one fetched ahead, and any older shard that samples
  held by the shuffle (below) still point into; about one shuffle buffer of samples spans at most
  two shards when shards hold more samples than the buffer.
* Equal batches. Every stream yields exactly ``Q = min over streams(slots // batch_size)``
  batches per epoch, so every rank yields ``batches_per_epoch = Q × workers`` (ZeRO's collectives
  hang on an uneven rank); surplus slots of larger streams are left for that epoch (they differ
  from epoch to epoch). A slot that turns out bad (truncated/corrupt shard, sha256 mismatch,
  undecodable member or metadata, no report when ``data.require_report``) is replaced by a repeat
  of the stream's last good sample (fresh random crop), counted in ``metrics()["substituted"]``; a
  stream with no readable sample at all raises `LoaderError` (every rank fails: no hang).
* Per-sample randomness (crop, flip) is drawn from ``(seed, epoch, slot)``, never from position,
  so a resumed run produces the same tensors.

Mixtures (``data.sources``: `MixtureLoader`)
--------------------------------------------
* Each source is a `StreamingLoader` of its own (its shard set, split, image kind, seed derived
  from the run's seed and its index), so everything above holds per source: its own epochs, shuffle,
  equal batches per rank and resume. A batch comes from ONE source, so it is homogeneous in image
  kind (a CT + X-ray run batches CT and X-ray apart) and says which (``batch["source"]``,
  ``batch["kind"]``).
* Which source gives the next batch is a function of the batches taken from each so far and a
  seeded phase per source (`MixtureLoader.next_source`): the same on every rank at every step, so
  every rank takes the same source (and kind) at the same step and batches stay equal across
  ranks. Shares: ``weight`` normalised, or samples per mixture epoch (``choose``, or ``repeat`` ×
  the source's samples), which set rates only: a mixture epoch is nominal, no subset is chosen.
  After t batches each source has had its share of them within ±2 batches
  (a low-discrepancy interleave, not i.i.d. draws); ``metrics()`` reports the realised share
  (``mix_<name>_frac``) beside the target. Sources cycle their epochs independently: a small
  source with a large weight is repeated more often (one epoch of it is still each sample once).
* The state holds each source's position and the counts per source, so a resume continues the
  exact same mixed sequence (same layout), and under another layout each source re-plans the rest
  of its epoch as below while the interleave goes on from the same counts.
* Cost: each source runs its own streams, so a rank runs ``sources × max(1, num_workers)``
  DataLoader workers, each prefetching one shard ahead; a source's workers start with its first
  batch. Samples per second match one source's once past the start (`radforge bench stream`).

Resume guarantees (`LoaderState`: per source the epoch + batches consumed in it + the layout that consumed them)
----------------------------------------------------------------------------------------------------------------
All ranks consume batches in lockstep, so rank 0's state describes every rank. ``state_dict()`` is
the state's JSON form (what checkpoints store, `STATE_VERSION`); it loads under any layout.

* Same world size, workers and batch size: the sample sequence continues EXACTLY: no sample
  repeated or skipped, same order, same crops. Consumed slots are recomputed in index space;
  shards whose slots were all consumed are not read again, partly consumed ones are re-read and
  the consumed samples dropped before decoding. DataLoader workers are rotated so that torch's
  round-robin over workers continues where it stopped.
* Different world size (or workers, or batch size): the rest of the epoch is re-planned over the
  slots NOT yet consumed (recomputed from the earlier layouts, kept in the state as a short list
  of segments), so no sample of the epoch is repeated; the remainder may be shorter than a full
  epoch and leaves fewer surplus slots unused. Further resumes inside that remainder are exact
  again.
* Known limit: a substituted slot is a repeat by design, and a stream whose epoch STARTS with a
  run of bad slots emits them after its first good sample; a resume inside such a run may repeat
  that one sample once more.

Evaluation (``train=False``): one pass in manifest order, centre crops, no shuffle, no
substitution (bad samples are skipped and counted), the last partial batch is kept;
``batches_per_epoch`` is then an upper bound that ranks reach when no sample is bad.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
import logging
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch.utils.data as tud

from radforge import kinds, shardspec, storage
from radforge.errors import ConfigError

__all__ = ["build_loader", "StreamingLoader", "MixtureLoader", "LoaderError", "LoaderState", "SourceState", "Layout",
           "STATE_VERSION"]

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: a mixture of sources (1: one source; still read)


class LoaderError(RuntimeError):
    """The data cannot produce the promised batches (e.g. every sample of a stream is bad)."""


# ---------------------------------------------------------------------------------------------
# Resume state (tiny: what a checkpoint stores, loadable under any layout)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How an epoch is cut into streams and batches; the resume state records the one that ran."""

    world_size: int
    workers: int  # streams per rank (max(1, data.num_workers))
    batch_size: int

    @property
    def streams(self) -> int:
        return self.world_size * self.workers

    def to_json(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.workers, "batch_size": self.batch_size}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls(int(d["world_size"]), int(d["num_workers"]), int(d["batch_size"]))


@dataclass(frozen=True)
class _Segment:
    """An earlier layout of the current epoch and the batches per rank it consumed."""

    layout: Layout
    batches: int

    @property
    def samples(self) -> int:
        return self.batches * self.layout.batch_size * self.layout.world_size

    def to_json(self) -> dict:
        return {**self.layout.to_json(), "batches": self.batches}


@dataclass(frozen=True)
class SourceState:
    """Where a run stands in ONE source's data (MosaicML Streaming style: epoch, position,
    canonical layout, seed). Rank-independent: all ranks consume in lockstep. (The whole of
    `LoaderState` up to version 1.)"""

    split: str
    seed: int
    epoch: int
    batches: int  # batches per rank consumed in `epoch` under `layout`
    layout: Layout
    segments: tuple[_Segment, ...] = ()  # earlier layouts of this epoch (a world-size change)

    @property
    def samples(self) -> int:
        """Samples of this epoch consumed by all ranks together, over every layout it ran with."""
        return sum(s.samples for s in self.segments) + _Segment(self.layout, self.batches).samples

    def to_json(self) -> dict:
        return {"split": self.split, "seed": self.seed, "epoch": self.epoch, "batches": self.batches,
                "samples": self.samples, "layout": self.layout.to_json(), "segments": [s.to_json() for s in self.segments]}

    @classmethod
    def from_json(cls, d: dict) -> "SourceState":
        return cls(split=d["split"], seed=int(d["seed"]), epoch=int(d["epoch"]), batches=int(d["batches"]),
                   layout=Layout.from_json(d["layout"]),
                   segments=tuple(_Segment(Layout.from_json(s), int(s["batches"])) for s in d.get("segments", [])))


@dataclass(frozen=True)
class LoaderState:
    """Where a run stands in its data: each source's position and the mixture's (batches per rank
    drawn from each source since the run began, which fixes the next draw). One source is a
    mixture of one. Its JSON form (`to_json`, `STATE_VERSION`) is what checkpoints store; version 1
    (one source, no mixture) is still read."""

    sources: tuple[SourceState, ...]
    taken: tuple[int, ...]  # batches per rank drawn from each source so far (the mixture position)

    def __post_init__(self):
        if len(self.sources) != len(self.taken) or not self.sources:
            raise ConfigError("loader state: one mixture count per source, and at least one source")

    @property
    def single(self) -> SourceState:
        if len(self.sources) != 1:
            raise ConfigError(f"loader state of a {len(self.sources)}-source mixture; this loader has one source")
        return self.sources[0]

    def to_json(self) -> dict:
        return {"version": STATE_VERSION, "sources": [s.to_json() for s in self.sources], "taken": list(self.taken)}

    @classmethod
    def from_json(cls, d: dict) -> "LoaderState":
        version = d.get("version") if isinstance(d, dict) else None
        if version not in (1, STATE_VERSION):
            raise ConfigError(f"loader state version {version!r} is not 1 or {STATE_VERSION}")
        try:
            if version == 1:  # one source, its fields at the top
                return cls((SourceState.from_json(d),), (int(d["batches"]),))
            return cls(tuple(SourceState.from_json(s) for s in d["sources"]), tuple(int(n) for n in d["taken"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"loader state is malformed ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Index-space planning (pure functions of the manifest, seed, epoch and layout)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    index: int  # position among the split's eligible shards (manifest order)
    path: str  # relative to the shard set
    url: str
    sha256: str | None
    slots: int  # selected samples (from the manifest's modality counts, less the superseded ones)
    offset: int  # global slot number of this shard's ordinal 0
    skip: frozenset = frozenset()  # keys of samples a later manifest version superseded (`--append`)

    def left(self, remaining: np.ndarray) -> np.ndarray:
        """This shard's part of a boolean slot mask."""
        return remaining[self.offset : self.offset + self.slots]


@dataclass
class _StreamPlan:
    order: list[int]  # slot numbers in emission order
    shards: list[int]  # shard indices in read order


def _live(shards: list[_Shard], remaining: np.ndarray) -> list[_Shard]:
    return [s for s in shards if s.left(remaining).any()]


def _groups(shards: list[_Shard], remaining: np.ndarray, n: int) -> list[list[int]]:
    """Partition shards with remaining slots into n groups of near-equal remaining slot count
    (largest first onto the lightest group; deterministic)."""
    counts = {s.index: int(s.left(remaining).sum()) for s in shards}
    live = sorted((i for i, c in counts.items() if c > 0), key=lambda i: (-counts[i], i))
    groups: list[list[int]] = [[] for _ in range(n)]
    heap = [(0, g) for g in range(n)]  # (load, group): the lightest group, ties to the lowest index
    for i in live:
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + counts[i], g))
    return groups


def _plan(shards: list[_Shard], remaining: np.ndarray, layout: Layout, *, seed: int, epoch: int,
          segment: int, train: bool, shuffle_buffer: int, streams: list[int] | None = None) -> dict[int, _StreamPlan]:
    """Plan streams (all, or only `streams`) for one epoch segment over the `remaining` slots."""
    import webdataset as wds

    S = layout.streams
    rng = np.random.default_rng([seed, epoch, segment, 7]) if train else None
    live = _live(shards, remaining)
    wanted = range(S) if streams is None else streams
    plans: dict[int, _StreamPlan] = {}
    if len(live) < S:  # striding: every stream reads every shard, keeps every S-th slot
        order = [live[i] for i in (rng.permutation(len(live)) if train else range(len(live)))]
        seq = np.concatenate([np.flatnonzero(s.left(remaining)) + s.offset for s in order]) if order else np.zeros(0, np.int64)
        for j in wanted:
            plans[j] = _StreamPlan(order=[int(x) for x in seq[j::S]], shards=[s.index for s in order])
    else:
        groups = _groups(live, remaining, S)
        deal = rng.permutation(S) if train else np.arange(S)
        by_index = {s.index: s for s in shards}
        for j in wanted:
            g = groups[int(deal[j])]
            if train:
                g = [g[i] for i in np.random.default_rng([seed, epoch, segment, 11, j]).permutation(len(g))]
            slots: list[int] = []
            for i in g:
                s = by_index[i]
                slots.extend(int(x) + s.offset for x in np.flatnonzero(s.left(remaining)))
            plans[j] = _StreamPlan(order=slots, shards=list(g))
    if train:
        for j, p in plans.items():
            rnd = random.Random(f"radforge/{seed}/{epoch}/{segment}/{j}")
            stage = wds.filters.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rnd)
            p.order = list(stage(iter(p.order)))
    return plans


def _stream_counts(shards: list[_Shard], remaining: np.ndarray, layout: Layout) -> list[int]:
    """Slots per stream (independent of seed/epoch: groups are dealt, not re-formed)."""
    S = layout.streams
    live = _live(shards, remaining)
    if len(live) < S:
        n = int(sum(s.left(remaining).sum() for s in live))
        return [len(range(j, n, S)) for j in range(S)]
    by_index = {s.index: s for s in shards}
    return [int(sum(by_index[i].left(remaining).sum() for i in g)) for g in _groups(live, remaining, S)]


def _worker_batches(k: int, w: int, workers: int) -> int:
    """Batches logical worker w contributed to the first k batches of a rank (round-robin)."""
    return len(range(w, k, workers))


# ---------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------


class _Counters(dict):
    def add(self, key: str, n: float = 1) -> None:
        self[key] = self.get(key, 0) + n

    def merge(self, other: dict) -> None:
        for k, v in other.items():
            self.add(k, v)

    def take(self) -> dict:
        """The counts so far, and start again from zero."""
        out = dict(self)
        self.clear()
        return out


class _BadShard(Exception):
    """A shard that fails its sha256 check or holds fewer samples than its manifest record."""


@dataclass
class _Fetched:
    """A shard's bytes (a read-only view of one buffer), and whether they matched the manifest's
    sha256 (None: nothing checked; a cache hit was checked when it was stored)."""

    data: memoryview | bytes
    ok: bool | None = None


def _fetch_shard(shard: _Shard, *, verify: bool, cache_dir: str | None, cache_limit: float,
                 counters: _Counters) -> _Fetched:
    """The shard's bytes, on the stream's prefetch thread: fetched whole with one GET (a shard is
    read whole anyway, and one GET beats many buffered range reads; local files: one read) into
    one buffer, its sha256 computed piece by piece as the body arrives (`storage.read_into`), so
    the digest is ready with the last byte and hashing overlaps the download rather than
    following it. The cache stores shards under their sha256 once they check, evicting least
    recently used files beyond the size limit; a cache hit was verified when it was stored."""
    cached = None
    if cache_dir:
        cached = os.path.join(cache_dir, (shard.sha256 or hashlib.sha256(shard.url.encode()).hexdigest()) + ".tar")
        try:
            with open(cached, "rb") as f:
                data = f.read()
            os.utime(cached)  # LRU order = mtime
            counters.add("cache_hits")
            return _Fetched(data)
        except FileNotFoundError:
            pass
    check = bool(verify and shard.sha256)
    body = storage.read_into(shard.url, sha256=check)
    counters.add("bytes_read", len(body.data))
    ok = body.sha256 == shard.sha256 if check else None
    if cached and ok is not False:
        _cache_put(cached, body.data, cache_dir, cache_limit)
    return _Fetched(body.data, ok)


def _cache_put(path: str, data: memoryview | bytes, cache_dir: str, limit_bytes: float) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    storage.write_bytes_atomic(path, data)
    entries = []
    for e in os.scandir(cache_dir):
        if e.name.endswith(".tar") and e.path != path:
            try:
                st = e.stat()
            except FileNotFoundError:  # another worker evicted it
                continue
            entries.append((st.st_mtime, st.st_size, e.path))
    total = len(data) + sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries):
        if total <= limit_bytes:
            break
        try:
            os.remove(p)
            total -= size
        except FileNotFoundError:
            pass


def _tar_samples(f, path: str) -> Iterator[dict]:
    """webdataset's own tar stages over one open shard, streamed (not held whole: label discovery
    reads one shard at construction). Their handler stays the default (re-raise)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander(iter([{"url": path, "stream": f}])))


def _meta(sample: dict) -> dict:
    """A sample's JSON metadata, or {} when it is missing or corrupt (decoding then fails and the
    handler counts it)."""
    try:
        meta = json.loads(bytes(sample["json"]))  # members are memoryviews (`shardspec.tar_samples`)
    except Exception:
        return {}
    return meta if isinstance(meta, dict) else {}


def _selected(samples: Iterable[dict], shard: _Shard, modalities: tuple[str, ...],
              counters: _Counters) -> Iterator[tuple[int, dict]]:
    """(ordinal, raw members) of the shard's samples of the selected modalities; a sample with no
    readable metadata counts as one of them (a bad slot). Raises `_BadShard` when the shard holds
    fewer than its manifest record says."""
    ordinal = 0
    for sample in samples:
        if sample.get("__key__") in shard.skip:  # replaced by a later version's sample
            continue
        modality = _meta(sample).get("modality")
        if modality is not None and modality not in modalities:
            continue
        if ordinal >= shard.slots:
            counters.add("unplanned_samples")  # more than the manifest says: ignored
            continue
        yield ordinal, sample
        ordinal += 1
    if ordinal < shard.slots:
        raise _BadShard(f"{ordinal} of {shard.slots} samples readable (manifest)")


# ---------------------------------------------------------------------------------------------
# The stages of one stream (webdataset style: f(src, ..., handler=...) generators)
# ---------------------------------------------------------------------------------------------


class _Skip(Exception):
    """What a stage hands the handler: the counter to add and what to warn (None: an expected
    skip, counted quietly)."""

    def __init__(self, counter: str, warning: str | None = None):
        super().__init__(warning or counter)
        self.counter, self.warning = counter, warning


def _count_warn_skip(counters: _Counters) -> Callable[[Exception], bool]:
    """The loader's one error policy, as a webdataset ``handler``: count the skip, warn, carry on
    (True). A stage whose handler returns False stops its stream, as in webdataset."""

    def handler(exn: Exception) -> bool:
        if not isinstance(exn, _Skip):
            exn = _Skip(f"skipped:{type(exn).__name__}", f"skipped ({type(exn).__name__})")
        counters.add(exn.counter)
        if exn.warning:
            log.warning("%s", exn.warning)
        return True

    return handler


@dataclass
class _EpochPlan:
    epoch: int
    start: int  # position of todo[0] in the stream's epoch order (> 0 when resumed mid-epoch)
    todo: list[int]  # slots to emit, in order
    reads: list[tuple[_Shard, set[int]]]  # shards to read, in order, with their wanted ordinals


@dataclass
class _Read:
    """One shard to read for an epoch plan; `_prefetch` starts its fetch."""

    plan: _EpochPlan
    shard: _Shard
    wanted: set[int]
    fetched: Future | None = None  # -> _Fetched
    stats: _Counters = field(default_factory=_Counters)  # the fetch's counts (written on the prefetch thread)


@dataclass
class _Slot:
    plan: _EpochPlan
    slot: int
    raw: dict | None  # tar members; None: its shard could not deliver it
    pos: int = -1  # position in the epoch's emission order (set by _in_plan_order)
    out: dict | None = None  # the decoded view (set by _decode); None: a bad slot


def _shard_reads(plans: Iterable[_EpochPlan]) -> Iterator[_Read]:
    """Source: every planned shard read, epoch after epoch (plans are made lazily, when the
    prefetch reaches them)."""
    for plan in plans:
        for shard, wanted in plan.reads:
            yield _Read(plan, shard, wanted)


def _prefetch(reads: Iterable[_Read], *, fetch: Callable) -> Iterator[_Read]:
    """Each read with its fetch (download and sha256 together, `_fetch_shard`) started on a
    thread one shard ahead (possibly of the next epoch): object-store latency and hashing hide
    behind decoding, at most two shards are held fetched ahead. The fetch keeps its own counters
    (`_Read.stats`): no shared mutable state across threads."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="radforge-prefetch")
    try:
        ahead = None
        for read in reads:
            read.fetched = pool.submit(fetch, read.shard, counters=read.stats)
            if ahead is not None:
                yield ahead
            ahead = read
        if ahead is not None:
            yield ahead
    finally:
        # Closed early (training stopped, a caller broke off): the read-ahead, often the next
        # epoch's first shard, is of no use, so the caller does not wait for its download (the
        # thread finishes it and exits).
        pool.shutdown(wait=False, cancel_futures=True)


def _verified(read: _Read) -> memoryview | bytes:
    """The shard's bytes once its sha256 matched (when checked); raises `_BadShard` otherwise, so
    no byte of a mismatched shard is parsed, and a shard is bad once however it is damaged."""
    fetched = read.fetched.result()
    if fetched.ok is False:
        read.stats.add("sha_mismatch")
        raise _BadShard("sha256 does not match the manifest")
    return fetched.data


def _shard_slots(reads: Iterable[_Read], *, modalities: tuple[str, ...], counters: _Counters,
                 handler: Callable[[Exception], bool]) -> Iterator[_Slot]:
    """Every wanted slot of every shard, in tar order; a wanted slot that its shard could not
    deliver (unreadable, torn, short, sha256 mismatch) follows with ``raw=None``."""
    for read in reads:
        shard, got = read.shard, set()
        counters.add("shards_read")
        try:
            for ordinal, sample in _selected(shardspec.tar_samples(_verified(read)), shard, modalities, counters):
                if ordinal in read.wanted:
                    got.add(ordinal)
                    yield _Slot(read.plan, shard.offset + ordinal, sample)
        except Exception as e:
            why = str(e) if isinstance(e, _BadShard) else type(e).__name__
            if not handler(_Skip("bad_shards", f"shard {shard.path}: {why}; its remaining samples are skipped")):
                return
        finally:
            counters.merge(read.stats)  # the fetch is done once its result is in (or failed)
        for o in sorted(read.wanted - got):
            yield _Slot(read.plan, shard.offset + o, None)


def _in_plan_order(slots: Iterable[_Slot]) -> Iterator[_Slot]:
    """Each epoch's slots in its planned (shuffled) order; slots that arrive early are held (about
    one shuffle buffer: the shuffle draws from that far ahead in read order)."""
    slots = iter(slots)
    for first in slots:
        plan, held = first.plan, {first.slot: first}
        for pos, slot in enumerate(plan.todo, start=plan.start):
            while slot not in held:
                nxt = next(slots, None)
                if nxt is None or nxt.plan is not plan:
                    raise LoaderError(f"planned slot {slot} of epoch {plan.epoch} was not read (a planning bug)")
                held[nxt.slot] = nxt
            item = held.pop(slot)
            item.pos = pos
            yield item


def _decode(slots: Iterable[_Slot], *, make: Callable, seed: int,
            handler: Callable[[Exception], bool]) -> Iterator[_Slot]:
    """Decode and view each slot (randomness from (seed, epoch, slot)); a bad slot passes on with
    ``out=None`` once the handler has counted it."""
    for item in slots:
        skip = _Skip("skipped:bad_shard") if item.raw is None else None
        if item.raw is not None:
            try:
                item.out = make(item.raw, [seed, item.plan.epoch, item.slot])
            except _Skip as e:
                skip = e
            except Exception as e:
                why = type(e).__name__
                skip = _Skip(f"skipped:{why}", f"sample {item.raw.get('__key__', '?')} skipped ({why})")
        if skip is not None and not handler(skip):
            return
        yield item


def _substitute(slots: Iterable[_Slot], *, make: Callable, seed: int, counters: _Counters, who: str) -> Iterator[dict]:
    """Training: a bad slot becomes a repeat of the stream's last good sample (fresh crop), so the
    stream keeps its planned slot count; bad slots before the first good one are repaid right after
    it. An epoch without one good slot raises `LoaderError` (every rank fails: no hang)."""
    last: _Slot | None = None
    owed: _Slot | None = None  # the first bad slot of an epoch that has had no good one yet
    n_owed = 0

    def unpaid():
        return LoaderError(f"{who}: no readable sample among its {len(owed.plan.todo)} planned samples of epoch "
                           f"{owed.plan.epoch} (every shard bad?); see the warnings above")

    for item in slots:
        e = item.plan.epoch
        if owed is not None and owed.plan is not item.plan:
            raise unpaid()
        if item.out is not None:
            last = item
            yield item.out
            for n in range(n_owed):
                counters.add("substituted")
                yield make(item.raw, [seed, e, item.slot, 1 + n, 1])
            owed, n_owed = None, 0
        elif last is None:
            owed, n_owed = owed or item, n_owed + 1
        else:
            counters.add("substituted")
            yield make(last.raw, [seed, e, last.slot, item.pos, 2])
    if owed is not None:
        raise unpaid()


def _good_only(slots: Iterable[_Slot]) -> Iterator[dict]:
    """Evaluation: bad slots are left out (the handler counted them)."""
    return (item.out for item in slots if item.out is not None)


def _batched(samples: Iterable[dict], *, batch_size: int, counters: _Counters) -> Iterator[dict]:
    """Collated batches, each carrying the stream's counts since the previous one (``_stats``).
    Unlike webdataset's ``batched``, a full batch leaves at once rather than when the next sample
    arrives (which may be in the next epoch's first shard). The last partial batch (evaluation:
    a training stream never ends) is kept; then a stats-only item carries the last counts."""
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield _collate(batch, counters.take())
            batch = []
    if batch:
        yield _collate(batch, counters.take())
    elif counters:
        yield {"_stats": counters.take()}  # the main loop does not count it as a batch


def _label_vector(labels: dict | None, findings: list[str]) -> np.ndarray:
    out = np.full(len(findings), np.nan, dtype=np.float32)
    for i, f in enumerate(findings):
        v = (labels or {}).get(f)
        if v in (0, 1):
            out[i] = float(v)
    return out


def _collate(samples: list[dict], stats: dict) -> dict:
    import torch

    return {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "text": [s["text"] for s in samples],
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples]).reshape(len(samples), -1)),
        "key": [s["key"] for s in samples],
        "modality": [s["modality"] for s in samples],
        "_stats": stats,
    }


# ---------------------------------------------------------------------------------------------
# One rank's streams: DataLoader workers (or the rank itself with num_workers=0)
# ---------------------------------------------------------------------------------------------


class _RankStreams(tud.IterableDataset):
    """Everything a rank's streams need, picklable to DataLoader workers; each worker runs one
    logical stream. A stream runs epoch after epoch without stopping (train), so the shard
    prefetch crosses epoch boundaries and DataLoader workers are started once, not per epoch."""

    def __init__(self, loader: "StreamingLoader", *, remaining: np.ndarray | None, rotate: int):
        self.shards, self.layout, self.total = loader._shards, loader._layout, loader._total
        self.rank, self.seed, self.train, self.data = loader.rank, loader.seed, loader.train, loader.data
        self.modalities, self.findings, self.view = loader._modalities, loader.findings, loader._view
        self.text_view = loader._text_view
        # The first epoch may be a re-planned remainder (segments) and may resume mid-way.
        self.epoch0, self.segment0, self.remaining0 = loader._epoch, len(loader._segments), remaining
        self.start_batch, self.rotate = loader._batch, rotate

    def __iter__(self):
        info = tud.get_worker_info()
        w = 0 if info is None else info.id
        # Rotate so that torch's round-robin (worker 0 first) continues the interrupted order.
        return self.stream((w + self.rotate) % self.layout.workers)

    def stream(self, worker: int) -> Iterator[dict]:
        """Batches of logical worker `worker` of this rank: epoch after epoch (train) or one pass."""
        import webdataset as wds

        counters = _Counters()
        handler = _count_warn_skip(counters)
        fetch = functools.partial(_fetch_shard, verify=self.data.verify_sha256, cache_dir=self.data.cache_dir,
                                  cache_limit=self.data.cache_limit_gb * 1e9)
        epochs = itertools.count(self.epoch0) if self.train else [self.epoch0]
        if self.train:
            fill = functools.partial(_substitute, make=self._sample, seed=self.seed, counters=counters,
                                     who=f"rank {self.rank} worker {worker}")
        else:
            fill = _good_only
        return wds.filters.pipeline(
            (self._epoch_plan(e, worker) for e in epochs),
            _shard_reads,
            functools.partial(_prefetch, fetch=fetch),
            functools.partial(_shard_slots, modalities=self.modalities, counters=counters, handler=handler),
            _in_plan_order,
            functools.partial(_decode, make=self._sample, seed=self.seed, handler=handler),
            fill,
            functools.partial(_batched, batch_size=self.layout.batch_size, counters=counters),
        )

    def _epoch_plan(self, epoch: int, worker: int) -> _EpochPlan:
        """The slots logical worker `worker` emits in `epoch`, and the shard reads that deliver them."""
        lay = self.layout
        first = epoch == self.epoch0
        remaining = self.remaining0 if first and self.remaining0 is not None else np.ones(self.total, dtype=bool)
        j = self.rank * lay.workers + worker
        plan = _plan(self.shards, remaining, lay, seed=self.seed, epoch=epoch, segment=self.segment0 if first else 0,
                     train=self.train, shuffle_buffer=self.data.shuffle_buffer, streams=[j])[j]
        start = _worker_batches(self.start_batch, worker, lay.workers) * lay.batch_size if first else 0
        end = min(_stream_counts(self.shards, remaining, lay)) // lay.batch_size * lay.batch_size if self.train else None
        todo = plan.order[start:end]
        needed = set(todo)
        by_index = {s.index: s for s in self.shards}
        reads = []
        for i in plan.shards:
            s = by_index[i]
            wanted = {o for o in range(s.slots) if s.offset + o in needed}
            if wanted:
                reads.append((s, wanted))
        return _EpochPlan(epoch, start, todo, reads)

    def _sample(self, raw: dict, rng_key: list[int]) -> dict:
        """Raw members → the model view and its labels; raises (the handler counts it) when bad."""
        array, meta, report = shardspec.decode_sample(raw, copy=False)  # the view crops/copies
        if self.data.require_report and not (report or "").strip():
            raise _Skip("skipped:no_report")
        rng = np.random.default_rng(rng_key) if self.train else None
        image = np.asarray(self.view(array, meta, rng), dtype=np.float32)
        if report and self.text_view is not None:
            report = self.text_view(report, rng)
        return {"image": image, "text": report or "", "labels": _label_vector(meta.get("labels"), self.findings),
                "key": raw["__key__"], "modality": meta["modality"]}


# ---------------------------------------------------------------------------------------------
# The public loader
# ---------------------------------------------------------------------------------------------


class StreamingLoader:
    """Iterable over batches: epoch after epoch (train) or one pass (eval). See the module doc."""

    def __init__(self, data, view, *, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, findings: list[str] | None = None,
                 state: LoaderState | dict | None = None, corrupt: Callable | None = None,
                 text_view: Callable | None = None):
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.data, self.split, self.rank, self.seed, self.train = data, split, rank, int(seed), bool(train)
        self._layout = Layout(world_size, max(1, data.num_workers), batch_size)
        kind = kinds.get(data.image)
        self._modalities, self._view = kind.modalities, kind.view(view)
        if corrupt is not None:  # robustness evaluation: view -> corruptions.CorruptedView around it
            if self.train:
                raise ConfigError("corrupt= is for evaluation loaders (train=False) only")
            self._view = corrupt(self._view)
        # report -> text the model reads: text(report, rng) with the sample's seeded rng in
        # training, None in evaluation (models.text.ReportView: sentence sampling). Picklable.
        self._text_view = text_view
        self.input_shape = self._view.input_shape
        self.manifest = shardspec.read_manifest(data.shards, version=data.shards_version)
        self._shards, self._total = self._eligible_shards()
        self.findings = list(findings) if findings is not None else self._discover_findings()
        self.batches_per_epoch = self._batches(np.ones(self._total, dtype=bool), self._layout)
        self._check_fit()
        self._epoch, self._batch = 0, 0
        self._taken = 0  # batches yielded since the run began (the state's mixture count)
        self._segments: tuple[_Segment, ...] = ()  # earlier layouts of this epoch
        self._metrics = _Counters(samples=0, batches=0, skipped_samples=0, substituted=0, bad_shards=0, data_wait_s=0.0)
        if state:
            self.load_state_dict(state)

    def _eligible_shards(self) -> tuple[list[_Shard], int]:
        """The split's shards holding samples of the selected kind, and their slot count."""
        root = shardspec.shards_root(self.data.shards)
        shards, offset = [], 0
        gone = {(s["shard"], s["key"]) for s in self.manifest.get("superseded", []) if s["modality"] in self._modalities}
        for rec in self.manifest["shards"]:
            skip = frozenset(k for p, k in gone if p == rec["path"])
            n = sum(rec.get("modalities", {}).get(m, 0) for m in self._modalities) - len(skip)
            if rec["split"] != self.split or n == 0:
                continue
            shards.append(_Shard(len(shards), rec["path"], storage.join(root, rec["path"]), rec.get("sha256"), n, offset,
                                 skip))
            offset += n
        if not shards:
            raise ConfigError(f"no {self.data.image} samples in split {self.split!r} of {self.data.shards}")
        return shards, offset

    def _check_fit(self) -> None:
        lay, split = self._layout, self.split
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"split {split!r} has {self._total} {self.data.image} samples: too few for {lay.world_size} rank(s) × "
                f"{lay.workers} worker(s) × batch {lay.batch_size} (lower data.num_workers or the batch size)")
        used = self.batches_per_epoch * lay.batch_size * lay.world_size if self.train else self._total
        if used < 0.75 * self._total:
            log.warning("split %s: %d of %d samples per epoch fit equal batches on every stream; the rest are left out "
                        "each epoch (too few or too uneven shards per rank × worker: smaller shards.target_mb helps)",
                        split, used, self._total)
        if len(self._shards) < lay.streams:
            log.warning("split %s has %d shard(s) for %d streams (ranks × workers): every stream reads every shard "
                        "and keeps 1/%d of the samples", split, len(self._shards), lay.streams, lay.streams)

    # -- planning helpers ------------------------------------------------------------------

    def _batches(self, remaining: np.ndarray, layout: Layout) -> int:
        counts = _stream_counts(self._shards, remaining, layout)
        if self.train:
            return layout.workers * (min(counts) // layout.batch_size)
        per_rank = [sum(-(-c // layout.batch_size) for c in counts[r * layout.workers : (r + 1) * layout.workers])
                    for r in range(layout.world_size)]
        return max(per_rank)

    def _remaining(self, epoch: int) -> np.ndarray:
        """Slots of `epoch` not consumed by the earlier segments (index space, no I/O)."""
        remaining = np.ones(self._total, dtype=bool)
        for i, seg in enumerate(self._segments):
            lay = seg.layout
            plans = _plan(self._shards, remaining, lay, seed=self.seed, epoch=epoch, segment=i,
                          train=self.train, shuffle_buffer=self.data.shuffle_buffer)
            nxt = remaining.copy()
            for j, p in plans.items():
                n = _worker_batches(seg.batches, j % lay.workers, lay.workers) * lay.batch_size
                nxt[np.asarray(p.order[:n], dtype=np.int64)] = False
            remaining = nxt
        return remaining

    def _discover_findings(self) -> list[str]:
        """Every label name in the split's first shard (labels are per corpus, not per shard)."""
        shard, names = self._shards[0], set()
        try:
            with storage.open_input(shard.url) as f:
                for sample in _tar_samples(f, shard.path):
                    labels = _meta(sample).get("labels")
                    names.update(labels if isinstance(labels, dict) else ())
        except Exception as e:
            log.warning("shard %s unreadable while discovering findings (%s)", shard.path, type(e).__name__)
        return sorted(names)

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on. One DataLoader iteration spans all epochs; the
        epoch/batch position is kept here by counting (every epoch has exactly the planned number
        of batches, a multiple of the worker count, so torch's round-robin stays aligned)."""
        remaining = self._remaining(self._epoch) if self._segments else None
        total = self._batches(remaining, self._layout) if remaining is not None else self.batches_per_epoch
        streams = _RankStreams(self, remaining=remaining, rotate=self._batch % self._layout.workers)
        nw = self.data.num_workers
        it = iter(tud.DataLoader(streams, batch_size=None, num_workers=nw, persistent_workers=False,
                                 prefetch_factor=(2 if nw else None)))
        while True:
            if self._batch >= total:  # epoch boundary (also when resumed exactly at one)
                if not self.train:
                    return
                self._epoch += 1
                self._batch, self._segments, total = 0, (), self.batches_per_epoch
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                if self.train:
                    raise LoaderError(f"rank {self.rank}: the stream ended at batch {self._batch} of {total} "
                                      f"in epoch {self._epoch}") from None
                self._epoch, self._batch, self._segments = self._epoch + 1, 0, ()
                return
            finally:
                self._metrics.add("data_wait_s", time.perf_counter() - t)
            self._account(item.pop("_stats", {}))
            if "image" not in item:
                continue
            self._batch += 1
            self._taken += 1
            self._metrics.add("batches")
            self._metrics.add("samples", len(item["key"]))
            yield item

    def batches_left(self) -> int:
        """Batches this rank still yields in the current epoch (after a world-size change this
        is the re-planned remainder, which can be shorter than `batches_per_epoch`)."""
        if not self._segments:
            return max(0, self.batches_per_epoch - self._batch)
        return max(0, self._batches(self._remaining(self._epoch), self._layout) - self._batch)

    def _account(self, stats: dict) -> None:
        for k, v in stats.items():
            if k.startswith("skipped:"):
                self._metrics.add("skipped_samples", v)
            self._metrics.add(k, v)

    # -- state -----------------------------------------------------------------------------

    def state(self) -> LoaderState:
        own = SourceState(self.split, self.seed, self._epoch, self._batch, self._layout, self._segments)
        return LoaderState((own,), (self._taken,))

    def state_dict(self) -> dict:
        """The state's JSON form (what checkpoints store)."""
        return self.state().to_json()

    def load_state_dict(self, state: LoaderState | dict) -> None:
        whole = state if isinstance(state, (LoaderState, SourceState)) else LoaderState.from_json(state)
        if isinstance(whole, LoaderState):
            st, self._taken = whole.single, whole.taken[0]
        else:
            st = whole
        if st.split != self.split or st.seed != self.seed:
            raise ConfigError("loader state belongs to another split or seed; it cannot continue this run")
        self._epoch, self._segments = st.epoch, st.segments
        if st.layout == self._layout:
            self._batch = st.batches
        else:
            if st.batches > 0:
                self._segments += (_Segment(st.layout, st.batches),)
            self._batch = 0
            log.info("loader layout changed %s -> %s: the rest of epoch %d is re-planned over unconsumed samples",
                     st.layout.to_json(), self._layout.to_json(), self._epoch)

    def metrics(self) -> dict:
        m = dict(self._metrics)
        m["epoch"] = self._epoch
        m["batches_per_epoch"] = self.batches_per_epoch
        return m


class MixtureLoader:
    """Batches drawn from several sources (`data.sources`) in the configured proportions; each
    source is a `StreamingLoader` of its own (its epochs, shuffle, equal batches and resume). See
    "Mixtures" in the module doc. Same interface as `StreamingLoader` where training uses it."""

    def __init__(self, data, view, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 train: bool = True, findings: list[str] | None = None, state: LoaderState | dict | None = None,
                 **source_kw):
        import dataclasses

        self.data, self.seed, self.train, self.rank = data, int(seed), bool(train), rank
        self.names = [s.name for s in data.sources]
        self.sources = [
            StreamingLoader(dataclasses.replace(data, shards=s.shards, image=s.image, sources=[], shards_version=None), view, split=s.split,
                            batch_size=batch_size, rank=rank, world_size=world_size, seed=_source_seed(self.seed, i),
                            train=train, findings=findings, **source_kw)
            for i, s in enumerate(data.sources)]
        # One label vector for every batch: the sources' findings together (or the ones given).
        self.findings = list(findings) if findings is not None else sorted({f for s in self.sources for f in s.findings})
        for s in self.sources:
            s.findings = self.findings
        self.input_shapes = {s.data.image: s.input_shape for s in self.sources}
        self.input_shape = self.sources[0].input_shape
        self.manifest = self.sources[0].manifest
        self.batches_per_epoch = sum(s.batches_per_epoch for s in self.sources)  # nominal: sources cycle on their own
        self.target = _mixture_weights(data.sources, [s._total for s in self.sources])
        self._phase = np.random.default_rng([self.seed, 13]).random(len(self.sources))
        self._taken = [0] * len(self.sources)
        if state:
            self.load_state_dict(state)

    def next_source(self) -> int:
        """The source of the next batch: source i's k-th batch sits at (k + phase_i) / p_i on one
        time line and batches are taken in time order, so after t batches each source has had
        p_i·t of them within ±2 (a seeded low-discrepancy interleave; i.i.d. draws would err by
        ~√(p(1-p)/t)). A function of the counts alone: every rank draws the same source."""
        return self.schedule(1)[0]

    def schedule(self, n: int, taken: list[int] | None = None) -> list[int]:
        """The sources of the next `n` batches after `taken` batches per source (default: the
        current counts), without reading anything or moving the state."""
        taken, out = list(self._taken if taken is None else taken), []
        for _ in range(n):
            i = int(np.argmin([(k + u) / p for k, u, p in zip(taken, self._phase, self.target)]))
            taken[i] += 1
            out.append(i)
        return out

    def __iter__(self) -> Iterator[dict]:
        if not self.train:  # evaluation: one pass over each source in turn
            for i, src in enumerate(self.sources):
                for batch in src:
                    yield {**batch, "source": self.names[i], "kind": self.data.sources[i].image}
            return
        its: dict[int, Iterator[dict]] = {}
        while True:
            i = self.next_source()
            if i not in its:  # a source's workers start with its first batch
                its[i] = iter(self.sources[i])
            batch = next(its[i])
            self._taken[i] += 1
            yield {**batch, "source": self.names[i], "kind": self.data.sources[i].image}

    def state(self) -> LoaderState:
        return LoaderState(tuple(s.state().single for s in self.sources), tuple(self._taken))

    def state_dict(self) -> dict:
        """The state's JSON form (what checkpoints store)."""
        return self.state().to_json()

    def load_state_dict(self, state: LoaderState | dict) -> None:
        st = state if isinstance(state, LoaderState) else LoaderState.from_json(state)
        if len(st.sources) != len(self.sources):
            raise ConfigError(f"loader state of {len(st.sources)} source(s); this run mixes {len(self.sources)}")
        for src, one, n in zip(self.sources, st.sources, st.taken):
            src.load_state_dict(LoaderState((one,), (n,)))
        self._taken = list(st.taken)

    def batches_left(self) -> int:
        """Batches left in the sources' current epochs together (each source cycles on its own)."""
        return sum(s.batches_left() for s in self.sources)

    def metrics(self) -> dict:
        """The sources' counters summed, plus per source the realised share of the batches (= of
        the samples: equal batch sizes) drawn since the run began (mix_<name>_frac), its target
        (mix_<name>_target) and the source's epoch (mix_<name>_epoch)."""
        m = _Counters()
        for s in self.sources:
            m.merge({k: v for k, v in s.metrics().items() if k not in ("epoch", "batches_per_epoch")})
        total = max(1, sum(self._taken))
        for name, n, p, s in zip(self.names, self._taken, self.target, self.sources):
            m[f"mix_{name}_frac"] = n / total
            m[f"mix_{name}_target"] = float(p)
            m[f"mix_{name}_epoch"] = s.metrics()["epoch"]
        m["epoch"] = min(s.metrics()["epoch"] for s in self.sources)
        m["batches_per_epoch"] = self.batches_per_epoch
        return dict(m)


def _source_seed(seed: int, i: int) -> int:
    """Each source's own seed (two sources over one shard set must not shuffle alike)."""
    return seed if i == 0 else int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def _mixture_weights(sources, totals: list[int]) -> np.ndarray:
    """Normalised shares: the weights, or each source's samples per mixture epoch (choose, or
    repeat × its samples in the split)."""
    raw = [s.weight if s.weight is not None else s.choose if s.choose is not None else (s.repeat or 1.0) * n
           for s, n in zip(sources, totals)]
    w = np.asarray(raw, dtype=np.float64)
    return w / w.sum()


def build_loader(data, view, *, split: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 train: bool = True, findings: list[str] | None = None,
                 state: LoaderState | dict | None = None, corrupt: Callable | None = None,
                 text_view: Callable | None = None) -> StreamingLoader:
    """The loader for one rank (see the module docstring for the guarantees). `corrupt` (evaluation
    only) wraps the model view, e.g. ``lambda v: corruptions.CorruptedView(v, "xray", "blur", 3)``.
    `text_view(report, rng)` rewrites each report (training: rng is the sample's seeded generator)."""
    if getattr(data, "sources", None):  # a weighted mixture (MixtureLoader): each source streams its own split
        return MixtureLoader(data, view, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                             train=train, findings=findings, state=state, text_view=text_view, corrupt=corrupt)
    return StreamingLoader(data, view, split=split, batch_size=batch_size, rank=rank, world_size=world_size,
                           seed=seed, train=train, findings=findings, state=state, corrupt=corrupt,
                           text_view=text_view)
