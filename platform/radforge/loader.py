"""Streaming loader: manifest shards on any fsspec URL → batches of model views, resumable.

No Ray imports: rank, world size and seed are passed in (radforge.train does that).

How it works
------------
The epoch is planned in *index space* from the manifest alone, before any byte is read. A "slot"
is one sample of the selected modality (``data.image``: ct → CT, xray → CR/DX), numbered by its
shard (manifest order) and its ordinal among the selected samples of that shard (tar/key order);
the manifest's per-shard modality counts give the number of slots without reading anything.

* Streams. Each rank runs ``max(1, data.num_workers)`` streams (torch DataLoader workers), so
  ``S = world_size × workers`` streams in all. The split's shards are partitioned once into S
  groups of nearly equal slot counts (largest first, to the lightest group). Every epoch a seeded
  permutation deals the groups to the streams and orders the shards inside each group, so a shard
  moves between ranks from epoch to epoch while every stream's slot count stays the same.
  With FEWER shards than streams, every stream reads every shard and keeps every S-th slot
  (sample-level striding: correct, but each shard is read S times; a warning says so).
* Shuffle. Each stream's slot sequence is shuffled with webdataset's own shuffle-buffer stage
  (``data.shuffle_buffer``, seeded by seed/epoch/stream) run over slot numbers; the data side then
  reads the stream's shards sequentially (webdataset's ``tar_file_iterator`` + ``group_by_keys``
  over ``radforge.storage``: no shell-outs, no copy of the corpus) and emits slots in that order,
  holding at most about one buffer of raw samples.
* I/O. Remote shards are fetched whole (one GET) and sha256-checked (``data.verify_sha256``) on a
  prefetch thread one shard ahead, so at most two shards per stream are in memory and download
  overlaps decoding. A stream runs epoch after epoch in one DataLoader iteration: workers start
  once and the prefetch crosses epoch boundaries. ``data.cache_dir`` keeps verified shards on
  local disk (LRU by file mtime, bounded by ``data.cache_limit_gb``).
* Equal batches. Every stream yields exactly ``Q = min over streams(slots // batch_size)``
  batches per epoch, so every rank yields ``batches_per_epoch = Q × workers`` (ZeRO's collectives
  hang on an uneven rank); surplus slots of larger streams are left for that epoch (they differ
  from epoch to epoch). A slot that turns out bad (truncated/corrupt shard, sha256 mismatch,
  undecodable member, no report when ``data.require_report``) is replaced by a repeat of the
  stream's last good sample (fresh random crop), counted in ``metrics()["substituted"]``; a
  stream with no readable sample at all raises `LoaderError` (every rank fails: no hang).
* Per-sample randomness (crop, flip) is drawn from ``(seed, epoch, slot)``, never from position,
  so a resumed run produces the same tensors.

Resume guarantees (``state_dict`` = epoch + batches consumed in it + the layout that consumed them)
----------------------------------------------------------------------------------------------------
All ranks consume batches in lockstep, so rank 0's state describes every rank.

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

import hashlib
import heapq
import io
import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch.utils.data as tud

from radforge import kinds, shardspec, storage
from radforge.errors import ConfigError

__all__ = ["build_loader", "StreamingLoader", "LoaderError"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


class LoaderError(RuntimeError):
    """The data cannot produce the promised batches (e.g. every sample of a stream is bad)."""


# ---------------------------------------------------------------------------------------------
# Index-space planning (pure functions of the manifest, seed, epoch and layout)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    index: int  # position among the split's eligible shards (manifest order)
    path: str  # relative to the shard set
    url: str
    sha256: str | None
    slots: int  # selected samples (from the manifest's modality counts)
    offset: int  # global slot number of this shard's ordinal 0


@dataclass(frozen=True)
class _Layout:
    world_size: int
    workers: int  # streams per rank (max(1, num_workers))
    batch_size: int

    @property
    def streams(self) -> int:
        return self.world_size * self.workers

    def as_dict(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.workers, "batch_size": self.batch_size}


@dataclass
class _StreamPlan:
    order: list[int]  # slot numbers in emission order
    shards: list[int]  # shard indices in read order


def _groups(shards: list[_Shard], remaining: np.ndarray, n: int) -> list[list[int]]:
    """Partition shards with remaining slots into n groups of near-equal remaining slot count
    (largest first onto the lightest group; deterministic)."""
    counts = {s.index: int(remaining[s.offset : s.offset + s.slots].sum()) for s in shards}
    live = sorted((i for i, c in counts.items() if c > 0), key=lambda i: (-counts[i], i))
    groups: list[list[int]] = [[] for _ in range(n)]
    heap = [(0, g) for g in range(n)]  # (load, group): the lightest group, ties to the lowest index
    for i in live:
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + counts[i], g))
    return groups


def _plan(shards: list[_Shard], remaining: np.ndarray, layout: _Layout, *, seed: int, epoch: int,
          segment: int, train: bool, shuffle_buffer: int, streams: list[int] | None = None) -> tuple[dict[int, _StreamPlan], bool]:
    """Plan streams (all, or only `streams`) for one epoch segment over the `remaining` slots."""
    import webdataset as wds

    S = layout.streams
    rng = np.random.default_rng([seed, epoch, segment, 7]) if train else None
    live = [s for s in shards if remaining[s.offset : s.offset + s.slots].any()]
    striding = len(live) < S
    wanted = range(S) if streams is None else streams
    plans: dict[int, _StreamPlan] = {}
    if striding:
        order = [live[i] for i in (rng.permutation(len(live)) if train else range(len(live)))]
        seq = np.concatenate([np.flatnonzero(remaining[s.offset : s.offset + s.slots]) + s.offset for s in order]) if order else np.zeros(0, np.int64)
        for j in wanted:
            mine = seq[j::S]
            plans[j] = _StreamPlan(order=[int(x) for x in mine], shards=[s.index for s in order])
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
                slots.extend(int(x) + s.offset for x in np.flatnonzero(remaining[s.offset : s.offset + s.slots]))
            plans[j] = _StreamPlan(order=slots, shards=list(g))
    if train:
        for j, p in plans.items():
            rnd = random.Random(f"radforge/{seed}/{epoch}/{segment}/{j}")
            stage = wds.filters.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rnd)
            p.order = list(stage(iter(p.order)))
    return plans, striding


def _stream_counts(shards: list[_Shard], remaining: np.ndarray, layout: _Layout) -> list[int]:
    """Slots per stream (independent of seed/epoch: groups are dealt, not re-formed)."""
    S = layout.streams
    live = [s for s in shards if remaining[s.offset : s.offset + s.slots].any()]
    if len(live) < S:
        n = int(sum(remaining[s.offset : s.offset + s.slots].sum() for s in live))
        return [len(range(j, n, S)) for j in range(S)]
    groups = _groups(live, remaining, S)
    by_index = {s.index: s for s in shards}
    return [int(sum(remaining[by_index[i].offset : by_index[i].offset + by_index[i].slots].sum() for i in g)) for g in groups]


def _worker_batches(k: int, w: int, workers: int) -> int:
    """Batches logical worker w contributed to the first k batches of a rank (round-robin)."""
    return len(range(w, k, workers))


# ---------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------


class _Counters(dict):
    def add(self, key: str, n: float = 1) -> None:
        self[key] = self.get(key, 0) + n


def _open_shard(shard: _Shard, *, verify: bool, cache_dir: str | None, cache_limit: float, counters: _Counters):
    """A readable file object for the shard, or None when it fails its sha256 check.

    Remote shards are fetched whole with one GET (on the stream's prefetch thread, so the next
    shard downloads while this one is decoded), hashed when verifying, and parsed from memory; a
    shard is read whole anyway, and one GET beats many buffered range reads. The cache stores verified shards under their sha256, evicting least recently
    used files beyond the size limit.
    """
    cached = None
    if cache_dir:
        name = (shard.sha256 or hashlib.sha256(shard.url.encode()).hexdigest()) + ".tar"
        cached = os.path.join(cache_dir, name)
        try:
            f = open(cached, "rb")
            os.utime(cached)  # LRU order = mtime
            counters.add("cache_hits")
            return f
        except FileNotFoundError:
            pass
    if not verify and not cached and storage.is_local(shard.url):
        return storage.open_input(shard.url)  # the OS page cache streams local files
    # One GET for the whole object, then hash (~2 GB/s): measured faster than hashing ranged
    # chunks while they download. This runs on the stream's prefetch thread, overlapped with the
    # previous shard's parsing and decoding.
    data = storage.read_bytes(shard.url)
    counters.add("bytes_read", len(data))
    if verify and shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        log.warning("shard %s: sha256 does not match the manifest; its samples are skipped", shard.path)
        counters.add("sha_mismatch")
        return None
    if cached:
        _cache_put(cached, data, cache_dir, cache_limit)
    return io.BytesIO(data)


def _cache_put(path: str, data: bytes, cache_dir: str, limit_bytes: float) -> None:
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


def _fetch_shard(shard: _Shard, *, verify: bool, cache_dir: str | None, cache_limit: float):
    """(file or None, counter deltas) without raising: runs on the prefetch thread, so it keeps
    its own counters and the stream merges them (no shared mutable state across threads)."""
    counters = _Counters()
    try:
        return _open_shard(shard, verify=verify, cache_dir=cache_dir, cache_limit=cache_limit, counters=counters), counters
    except Exception as e:  # missing object, I/O error: the shard's samples become bad slots
        log.warning("shard %s unreadable (%s); its samples are skipped", shard.path, type(e).__name__)
        return None, counters


def _shard_samples(shard: _Shard, wanted: set[int], modalities: tuple[str, ...], fetched,
                   counters: _Counters) -> Iterator[tuple[int, dict | None]]:
    """(slot, raw members) for every wanted slot of one shard, in tar order; (slot, None) for a
    wanted slot the shard could not deliver. The shard is this reader's one error boundary."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    got: set[int] = set()
    bad = False
    counters.add("shards_read")
    f, stats = fetched
    for k, v in stats.items():
        counters.add(k, v)
    try:
        if f is None:
            bad = True
        else:
            ordinal = 0
            for sample in group_by_keys({**m, "__url__": shard.path} for m in tar_file_iterator(f)):
                try:
                    modality = json.loads(sample["json"])["modality"]
                except Exception:  # no/corrupt metadata: a bad slot of the selected kind
                    modality = None
                if modality is not None and modality not in modalities:
                    continue
                if ordinal >= shard.slots:
                    counters.add("unplanned_samples")  # more than the manifest says: ignored
                    continue
                if ordinal in wanted:
                    got.add(ordinal)
                    yield shard.offset + ordinal, (sample if modality is not None else None)
                ordinal += 1
            if ordinal < shard.slots:
                log.warning("shard %s: %d of %d samples readable (manifest); the rest are skipped", shard.path, ordinal, shard.slots)
                bad = True
    except Exception as e:  # truncated tar, I/O error: the rest of the shard is lost
        log.warning("shard %s unreadable (%s); its remaining samples are skipped", shard.path, type(e).__name__)
        bad = True
    finally:
        if f is not None:
            f.close()
    if bad:
        counters.add("bad_shards")
    for o in sorted(wanted - got):
        yield shard.offset + o, None


# ---------------------------------------------------------------------------------------------
# One stream: a DataLoader worker (or the rank itself with num_workers=0)
# ---------------------------------------------------------------------------------------------


def _label_vector(labels: dict | None, findings: list[str]) -> np.ndarray:
    out = np.full(len(findings), np.nan, dtype=np.float32)
    for i, f in enumerate(findings):
        v = (labels or {}).get(f)
        if v in (0, 1):
            out[i] = float(v)
    return out


def _collate(samples: list[dict]) -> dict:
    import torch

    return {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "text": [s["text"] for s in samples],
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples]).reshape(len(samples), -1)),
        "key": [s["key"] for s in samples],
        "modality": [s["modality"] for s in samples],
    }


class _RankStream:
    """Everything a rank's streams need, picklable to DataLoader workers. A stream runs epoch
    after epoch without stopping (train), so the shard prefetch crosses epoch boundaries and
    DataLoader workers are started once, not once per epoch."""

    def __init__(self, loader: "StreamingLoader", *, epoch: int, remaining: np.ndarray | None, start_batch: int):
        self.shards = loader._shards
        self.layout = loader._layout
        self.rank = loader.rank
        self.seed = loader.seed
        self.train = loader.train
        self.data = loader.data
        self.modalities = loader._modalities
        self.findings = loader.findings
        self.view = loader._view
        self.total = loader._total
        # The first epoch may be a re-planned remainder (segments) and may resume mid-way.
        self.epoch0, self.segment0, self.remaining0 = epoch, len(loader._segments), remaining
        self.start_batch = start_batch

    def _work(self, epoch: int, worker: int) -> tuple[list[int], list[tuple[_Shard, set[int]]]]:
        """(slots to emit in order, shards to read with their wanted ordinals) for one epoch."""
        lay = self.layout
        first = epoch == self.epoch0
        remaining = self.remaining0 if first and self.remaining0 is not None else np.ones(self.total, dtype=bool)
        segment = self.segment0 if first else 0
        j = self.rank * lay.workers + worker
        plans, _ = _plan(self.shards, remaining, lay, seed=self.seed, epoch=epoch, segment=segment, train=self.train,
                         shuffle_buffer=self.data.shuffle_buffer, streams=[j])
        plan = plans[j]
        done = _worker_batches(self.start_batch, worker, lay.workers) if first else 0
        start = done * lay.batch_size
        if self.train:
            counts = _stream_counts(self.shards, remaining, lay)
            quota = min(counts) // lay.batch_size
            todo = plan.order[start : quota * lay.batch_size]
        else:
            todo = plan.order[start:]
        needed = set(todo)
        by_index = {s.index: s for s in self.shards}
        reads = []
        for i in plan.shards:
            s = by_index[i]
            wanted = {o for o in range(s.slots) if s.offset + o in needed}
            if wanted:
                reads.append((s, wanted))
        return todo, reads

    def stream(self, worker: int) -> Iterator[dict]:
        """Batches of logical worker `worker` of this rank: epoch after epoch (train) or one pass."""
        from concurrent.futures import ThreadPoolExecutor

        lay = self.layout
        counters = _Counters()
        epochs = itertools.count(self.epoch0) if self.train else iter([self.epoch0])
        todos: dict[int, list[int]] = {}  # epoch → slots to emit (popped by the emitter)
        reads: dict[int, list] = {}  # epoch → shards to read (popped by the reader, which runs ahead)
        generated: list[int] = []

        def generate() -> bool:
            """Plan the next epoch (both sides walk `generated` in order); False when none is left."""
            try:
                e = next(epochs)
            except StopIteration:
                return False
            todos[e], reads[e] = self._work(e, worker)
            generated.append(e)
            return True

        def raw() -> Iterator[tuple[tuple[int, int], dict | None]]:
            # The next shard (possibly of the next epoch) is fetched and sha256-verified on a
            # thread while this one is parsed, decoded and viewed: object-store latency is hidden
            # and at most two shards per stream are in memory.
            def shard_list():
                i = 0
                while i < len(generated) or generate():
                    e = generated[i]
                    for s, wanted in reads.pop(e):
                        yield e, s, wanted
                    i += 1

            fetch_kw = dict(verify=self.data.verify_sha256, cache_dir=self.data.cache_dir,
                            cache_limit=self.data.cache_limit_gb * 1e9)
            shards = shard_list()
            with ThreadPoolExecutor(1, thread_name_prefix="radforge-prefetch") as pool:
                cur = next(shards, None)
                ahead = pool.submit(_fetch_shard, cur[1], **fetch_kw) if cur else None
                while cur is not None:
                    fetched = ahead.result()
                    nxt = next(shards, None)
                    if nxt is not None:
                        ahead = pool.submit(_fetch_shard, nxt[1], **fetch_kw)
                    e, s, wanted = cur
                    for slot, sample in _shard_samples(s, wanted, self.modalities, fetched, counters):
                        yield (e, slot), sample
                    cur = nxt

        reader = raw()
        held: dict[tuple[int, int], dict | None] = {}
        last_good: tuple[int, dict] | None = None
        batch: list[dict] = []

        def fetch(key: tuple[int, int]) -> dict | None:
            while key not in held:
                k, sample = next(reader)  # StopIteration here would be a planning bug
                held[k] = sample
            return held.pop(key)

        def make(sample: dict, rng_key: list[int]) -> dict | None:
            try:
                array, meta, report = shardspec.decode_sample(sample)
                if self.data.require_report and not (report or "").strip():
                    counters.add("skipped:no_report")
                    return None
                rng = np.random.default_rng(rng_key) if self.train else None
                image = np.asarray(self.view(array, meta, rng), dtype=np.float32)
                return {"image": image, "text": report or "", "labels": _label_vector(meta.get("labels"), self.findings),
                        "key": sample["__key__"], "modality": meta["modality"]}
            except Exception as e:
                counters.add(f"skipped:{type(e).__name__}")
                log.warning("sample %s skipped (%s)", sample.get("__key__", "?"), type(e).__name__)
                return None

        def emit(out: dict) -> dict | None:
            nonlocal batch
            batch.append(out)
            if len(batch) < lay.batch_size:
                return None
            b = _collate(batch)
            b["_stats"] = dict(counters)
            counters.clear()
            batch = []
            return b

        i = 0
        while i < len(generated) or generate():
            e = generated[i]
            i += 1
            todo = todos.pop(e)
            first = e == self.epoch0
            base = _worker_batches(self.start_batch, worker, lay.workers) * lay.batch_size if first else 0
            owed = 0
            for t, slot in enumerate(todo):
                sample = fetch((e, slot))
                out = make(sample, [self.seed, e, slot]) if sample is not None else None
                if sample is None:
                    counters.add("skipped:bad_shard")
                if out is not None:
                    last_good = (slot, sample)
                    outs = [out]
                    for n in range(owed):  # slots that were bad before any good sample arrived
                        counters.add("substituted")
                        outs.append(make(sample, [self.seed, e, slot, 1 + n, 1]))
                    owed = 0
                elif self.train:
                    if last_good is None:
                        owed += 1
                        continue
                    counters.add("substituted")
                    outs = [make(last_good[1], [self.seed, e, last_good[0], base + t, 2])]
                else:
                    continue
                for o in outs:
                    if o is None:  # a repeat of a good sample cannot fail differently; be safe anyway
                        raise LoaderError("a substitute sample failed to decode")
                    b = emit(o)
                    if b is not None:
                        yield b
            if owed:
                raise LoaderError(f"rank {self.rank} worker {worker}: no readable sample among its {len(todo)} planned "
                                  f"samples of epoch {e} (every shard bad?); see the warnings above")
        if batch:  # evaluation keeps the last partial batch
            b = _collate(batch)
            b["_stats"] = dict(counters)
            yield b
        elif counters:
            yield {"_stats": dict(counters)}  # stats only; the main loop does not count it as a batch


class _StreamDataset(tud.IterableDataset):
    """One rank's data; each DataLoader worker runs one logical stream."""

    def __init__(self, ep: _RankStream, offset: int):
        self.ep, self.offset = ep, offset

    def __iter__(self):
        info = tud.get_worker_info()
        w = 0 if info is None else info.id
        # Rotate so that torch's round-robin (worker 0 first) continues the interrupted order.
        return self.ep.stream((w + self.offset) % self.ep.layout.workers)


# ---------------------------------------------------------------------------------------------
# The public loader
# ---------------------------------------------------------------------------------------------


class StreamingLoader:
    """Iterable over batches: epoch after epoch (train) or one pass (eval). See the module doc."""

    def __init__(self, data, view, *, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, findings: list[str] | None = None, state: dict | None = None):
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.data, self.split, self.rank, self.seed, self.train = data, split, rank, int(seed), bool(train)
        self._layout = _Layout(world_size, max(1, data.num_workers), batch_size)
        self._modalities = kinds.get(data.image).modalities
        self._view = kinds.get(data.image).view(view)
        self.input_shape = self._view.input_shape
        self.manifest = shardspec.read_manifest(data.shards)
        root = shardspec.shards_root(data.shards)
        shards, offset = [], 0
        for rec in self.manifest["shards"]:
            n = sum(rec.get("modalities", {}).get(m, 0) for m in self._modalities)
            if rec["split"] != split or n == 0:
                continue
            shards.append(_Shard(len(shards), rec["path"], storage.join(root, rec["path"]), rec.get("sha256"), n, offset))
            offset += n
        if not shards:
            raise ConfigError(f"no {data.image} samples in split {split!r} of {data.shards}")
        self._shards, self._total = shards, offset
        self.findings = list(findings) if findings is not None else self._discover_findings()
        full = np.ones(self._total, dtype=bool)
        self.batches_per_epoch = self._batches(full, self._layout)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"split {split!r} has {self._total} {data.image} samples: too few for {world_size} rank(s) × "
                f"{self._layout.workers} worker(s) × batch {batch_size} (lower data.num_workers or the batch size)")
        used = self.batches_per_epoch * batch_size * world_size if train else self._total
        if used < 0.75 * self._total:
            log.warning("split %s: %d of %d samples per epoch fit equal batches on every stream; the rest are left out "
                        "each epoch (too few or too uneven shards per rank × worker: smaller shards.target_mb helps)",
                        split, used, self._total)
        if len(shards) < self._layout.streams:
            log.warning("split %s has %d shard(s) for %d streams (ranks × workers): every stream reads every shard "
                        "and keeps 1/%d of the samples", split, len(shards), self._layout.streams, self._layout.streams)
        self._epoch, self._batch, self._segments = 0, 0, []  # segments: earlier layouts of this epoch
        self._metrics = _Counters(samples=0, batches=0, skipped_samples=0, substituted=0, bad_shards=0, data_wait_s=0.0)
        if state:
            self.load_state_dict(state)

    # -- planning helpers ------------------------------------------------------------------

    def _batches(self, remaining: np.ndarray, layout: _Layout) -> int:
        counts = _stream_counts(self._shards, remaining, layout)
        if self.train:
            return layout.workers * (min(counts) // layout.batch_size)
        per_rank = [sum(-(-c // layout.batch_size) for c in counts[r * layout.workers : (r + 1) * layout.workers])
                    for r in range(layout.world_size)]
        return max(per_rank)

    def _remaining(self, epoch: int) -> np.ndarray:
        """Slots of `epoch` not consumed by the earlier segments (index space, no I/O)."""
        remaining = np.ones(self._total, dtype=bool)
        for seg, s in enumerate(self._segments):
            lay = _Layout(s["world_size"], s["num_workers"], s["batch_size"])
            plans, _ = _plan(self._shards, remaining, lay, seed=self.seed, epoch=epoch, segment=seg,
                             train=self.train, shuffle_buffer=self.data.shuffle_buffer)
            nxt = remaining.copy()
            for j, p in plans.items():
                n = _worker_batches(s["batches"], j % lay.workers, lay.workers) * lay.batch_size
                nxt[np.asarray(p.order[:n], dtype=np.int64)] = False
            remaining = nxt
        return remaining

    def _discover_findings(self) -> list[str]:
        """Every label name in the split's first shard (labels are per corpus, not per shard)."""
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        names: set[str] = set()
        try:
            with storage.open_input(self._shards[0].url) as f:
                for sample in group_by_keys({**m, "__url__": ""} for m in tar_file_iterator(f)):
                    try:
                        names.update((json.loads(sample["json"]).get("labels") or {}).keys())
                    except Exception:
                        continue
        except Exception as e:
            log.warning("shard %s unreadable while discovering findings (%s)", self._shards[0].path, type(e).__name__)
        return sorted(names)

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on. One DataLoader iteration spans all epochs; the
        epoch/batch position is kept here by counting (every epoch has exactly the planned number
        of batches, a multiple of the worker count, so torch's round-robin stays aligned)."""
        remaining = self._remaining(self._epoch) if self._segments else None
        total = self._batches(remaining, self._layout) if remaining is not None else self.batches_per_epoch
        ep = _RankStream(self, epoch=self._epoch, remaining=remaining, start_batch=self._batch)
        nw = self.data.num_workers
        dl = tud.DataLoader(_StreamDataset(ep, self._batch % self._layout.workers), batch_size=None, num_workers=nw,
                            persistent_workers=False, prefetch_factor=(2 if nw else None))
        it = iter(dl)
        while True:
            if self._batch >= total:  # epoch boundary (also when resumed exactly at one)
                if not self.train:
                    return
                self._epoch += 1
                self._batch, self._segments, total = 0, [], self.batches_per_epoch
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                if self.train:
                    raise LoaderError(f"rank {self.rank}: the stream ended at batch {self._batch} of {total} "
                                      f"in epoch {self._epoch}") from None
                self._epoch, self._batch, self._segments = self._epoch + 1, 0, []
                return
            finally:
                self._metrics.add("data_wait_s", time.perf_counter() - t)
            self._account(item.pop("_stats", {}))
            if "image" not in item:
                continue
            self._batch += 1
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

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "epoch": self._epoch,
            "batches": self._batch,
            # Samples of this epoch consumed by all ranks together, over every layout it ran with.
            "samples": sum(s["batches"] * s["batch_size"] * s["world_size"] for s in self._segments)
            + self._batch * self._layout.batch_size * self._layout.world_size,
            "layout": self._layout.as_dict(),
            "segments": [dict(s) for s in self._segments],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("split") != self.split or int(state.get("seed", -1)) != self.seed:
            raise ConfigError("loader state belongs to another split or seed; it cannot continue this run")
        self._epoch = int(state["epoch"])
        self._segments = [dict(s) for s in state.get("segments", [])]
        lay = state["layout"]
        if lay == self._layout.as_dict():
            self._batch = int(state["batches"])
        else:
            if int(state["batches"]) > 0:
                self._segments.append({**lay, "batches": int(state["batches"])})
            self._batch = 0
            log.info("loader layout changed %s -> %s: the rest of epoch %d is re-planned over unconsumed samples",
                     lay, self._layout.as_dict(), self._epoch)

    def metrics(self) -> dict:
        m = dict(self._metrics)
        m["epoch"] = self._epoch
        m["batches_per_epoch"] = self.batches_per_epoch
        return m


def build_loader(data, view, *, split: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 train: bool = True, findings: list[str] | None = None, state: dict | None = None) -> StreamingLoader:
    """The loader for one rank (see the module docstring for the guarantees)."""
    return StreamingLoader(data, view, split=split, batch_size=batch_size, rank=rank, world_size=world_size,
                           seed=seed, train=train, findings=findings, state=state)
