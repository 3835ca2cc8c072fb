"""DICOMweb sources: QIDO-RS listing and WADO-RS retrieval behind `storage`'s URL interface.

A SOURCE `dicomweb+http://HOST:PORT/PATH` (or `dicomweb+https://`) is listed and read like any
other URL (`storage.scan_dir` / `storage.walk` / `storage.open_input` dispatch here), so the ingest
pipeline is unchanged: the private index records instance URLs instead of paths.

    root      dicomweb+http://h:8042/dicom-web                  scan_dir → its studies (QIDO /studies)
    study     …/studies/<StudyUID>                              walk → its instances (QIDO /series,
                                                                 then /series/<uid>/instances)
    instance  …/studies/<S>/series/<SE>/instances/<SOPUID>      read → WADO-RS retrieve

Every QIDO query is paged with `limit`/`offset` (`page_size`), so 100k+ studies stream in pages
and only one page is in flight. The URL's query string carries the listing filters and the
client settings (`Source.parse`); `resolve()` writes the recipe's `dicomweb` section into it.
Instance URLs keep the client settings but not the filters.

HTTP: plain urllib3 (already a dependency through requests/botocore), not `dicomweb-client`:
we need the instance's bytes untouched, to go through `dicom.scan`'s header-capped parser and
budgets (dicomweb-client parses every retrieved part into a pydicom Dataset, uncapped), our own
retry loop to count retries and honour Retry-After, and one thread-safe connection pool per
process for the bounded read-ahead. WADO-RS asks for `multipart/related; type="application/dicom";
transfer-syntax=*` (the stored transfer syntax: the decoders handle RLE/JPEG/J2K, and bytes stay
what the archive holds); a server that refuses that (406) is asked again without it (its default,
usually Explicit VR Little Endian).

Retries: 429, 500, 502, 503, 504, timeouts and dropped connections are retried `retries` times
with exponential backoff (full jitter, `backoff_s` doubling, capped at 30 s; Retry-After honoured
up to that cap). Other statuses fail at once. A listing or scan that still fails raises
`DicomwebError` (the run fails; re-running resumes); a build read that fails is that sample's
`fetch_error`.

Credentials (basic or bearer) come from a secrets file (`credentials_file`, YAML/JSON with `token`
or `username`/`password`), else from RADFORGE_DICOMWEB_TOKEN or RADFORGE_DICOMWEB_USERNAME /
RADFORGE_DICOMWEB_PASSWORD in the environment of the process that makes the request (every Ray
worker: prefer the file on a cluster). They exist only in the request headers: never in URLs
(userinfo in a SOURCE is refused), logs, exceptions, the index or the manifest. Error messages
name the host and the kind of request, never UIDs or server text.

One retrieval per instance: WADO-RS has no byte ranges, so the header scan's read (`open_head`)
is the whole instance; it is kept on the node's disk (`_InstanceCache`, bounded, mode 0700, each
file taken once) and the build's read (`read_bytes`) takes it from there instead of asking the
server again. The metadata-only route (WADO-RS `/metadata`, DICOM JSON) was not taken: the scan
would then parse JSON instead of the file's own bytes (no truncation, file-meta or budget checks on
what is built), and the build would still retrieve every instance whole.

Counters (requests, retries by cause, bytes; cache_hits / cache_bytes: build reads served by the
scan's copy) are kept per process and flushed as small JSON
files under the system temp dir (`stats_dir`), which the ingest driver sums for its report.
Known limit: on a multi-node cluster only the driver node's processes are counted.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from radforge.errors import ConfigError

log = logging.getLogger("radforge.dicomweb")

SCHEMES = ("dicomweb+http", "dicomweb+https")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
WADO_ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'
TOKEN_ENV, USER_ENV, PASSWORD_ENV = "RADFORGE_DICOMWEB_TOKEN", "RADFORGE_DICOMWEB_USERNAME", "RADFORGE_DICOMWEB_PASSWORD"
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_LEVELS = ("studies", "series", "instances")


class DicomwebError(RuntimeError):
    """A DICOMweb request that failed for good. The message names the host and the kind of
    request and the status, never a UID, a credential or the server's text."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def is_dicomweb(url: str) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0].lower() in SCHEMES


# ---------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Client settings (the recipe's `dicomweb` section; defaults there)."""

    page_size: int = 1000
    concurrency: int = 8
    retries: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 60.0
    credentials_file: str | None = None


_SETTING_TYPES = {f.name: (float if f.name.endswith("_s") else int if f.name != "credentials_file" else str) for f in fields(Settings)}


@dataclass(frozen=True)
class Source:
    """A parsed dicomweb URL: the service root, the resource below it, filters and settings."""

    scheme: str  # http | https
    netloc: str  # host:port
    root: str  # service path, e.g. /dicom-web
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    filters: tuple[tuple[str, str], ...] = ()  # study-level QIDO keys; series-level ones prefixed "series."
    settings: Settings = field(default_factory=Settings)

    @classmethod
    def parse(cls, url: str) -> "Source":
        parts = urlsplit(url)
        if parts.scheme.lower() not in SCHEMES:
            raise ConfigError(f"not a DICOMweb URL (dicomweb+http:// or dicomweb+https://): {parts.scheme}://…")
        if parts.username or parts.password or "@" in parts.netloc:
            raise ConfigError("credentials may not be part of a DICOMweb URL: use dicomweb.credentials_file or "
                              f"{TOKEN_ENV} / {USER_ENV} + {PASSWORD_ENV}")
        if not parts.hostname:
            raise ConfigError("a DICOMweb URL needs a host: dicomweb+http://HOST:PORT/PATH")
        segs = [unquote(s) for s in parts.path.split("/") if s]
        res: dict[str, str] = {}
        for i, seg in enumerate(segs):  # root[/studies/S[/series/SE[/instances/I]]]
            names, uids = segs[i::2], segs[i + 1::2]
            if seg == "studies" and len(names) == len(uids) and names == list(_LEVELS[:len(names)]):
                res, segs = dict(zip(names, uids)), segs[:i]
                break
        settings, filters = {}, []
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if k in _SETTING_TYPES:
                try:
                    settings[k] = _SETTING_TYPES[k](v)
                except ValueError:
                    raise ConfigError(f"DICOMweb URL setting {k} must be a number, got {v!r}") from None
            else:
                filters.append((k, v))
        return cls(parts.scheme.split("+", 1)[1].lower(), parts.netloc, "/" + "/".join(segs),
                   res.get("studies"), res.get("series"), res.get("instances"), tuple(filters), Settings(**settings))

    def url(self, *, filters: bool = True) -> str:
        """The dicomweb URL again (settings that differ from the defaults in the query)."""
        path = self.root.rstrip("/")
        for name, uid in (("studies", self.study), ("series", self.series), ("instances", self.instance)):
            if uid is None:
                break
            path += f"/{name}/{quote(uid, safe='')}"
        query = [(f.name, str(getattr(self.settings, f.name))) for f in fields(Settings)
                 if getattr(self.settings, f.name) != f.default]
        if filters:
            query += list(self.filters)
        return f"dicomweb+{self.scheme}://{self.netloc}{path or '/'}" + (f"?{urlencode(query)}" if query else "")

    def http(self, *parts: str) -> str:
        """The plain http(s) URL of a resource below the service root."""
        return f"{self.scheme}://{self.netloc}{self.root.rstrip('/')}/" + "/".join(parts)

    def below(self, **uids: str) -> "Source":
        return replace(self, **uids)

    @property
    def where(self) -> str:
        """What an error message may name: the server, never a UID."""
        return f"{self.scheme}://{self.netloc}{self.root}"

    def study_filters(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.filters if not k.startswith("series.")]

    def series_filters(self) -> list[tuple[str, str]]:
        return [(k[len("series."):], v) for k, v in self.filters if k.startswith("series.")]


def resolve(url: str, cfg) -> str:
    """SOURCE with the recipe's `dicomweb` section (config.DicomwebConfig) in its query string;
    values already in the URL win. Raises ConfigError for a malformed URL."""
    src = Source.parse(url)
    given = dict(src.filters)
    filters: list[tuple[str, str]] = list(src.filters)

    def add(key: str, value) -> None:
        if value not in (None, "", []) and key not in given:
            filters.append((key, ",".join(value) if isinstance(value, list) else str(value)))

    add("StudyDate", cfg.study_date)
    add("ModalitiesInStudy", cfg.modalities_in_study)
    for k, v in sorted(cfg.query.items()):
        add(k, v)
    add("series.Modality", cfg.modality)
    add("series.BodyPartExamined", cfg.body_part)
    ours = {f.name: getattr(cfg, f.name) for f in fields(Settings)}
    in_url = {f.name for f in fields(Settings) if getattr(src.settings, f.name) != f.default}
    settings = replace(src.settings, **{k: v for k, v in ours.items() if k not in in_url})
    return replace(src, filters=tuple(filters), settings=settings).url()


# ---------------------------------------------------------------------------------------------
# HTTP client: one pool per process and settings, retries with backoff, counters
# ---------------------------------------------------------------------------------------------


class _Stats:
    """Per-process counters, flushed as delta files (a Ray worker outlives runs: deltas, not
    totals, so a new run's reset cannot be undone by an old process)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: dict[str, dict[str, int]] = {}

    def add(self, where: str, key: str, n: int = 1) -> None:
        with self.lock:
            d = self.pending.setdefault(where, {})
            d[key] = d.get(key, 0) + n

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
        for where, counts in pending.items():
            d = stats_dir(where)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{uuid.uuid4().hex}")
            with open(tmp, "w") as f:
                json.dump(counts, f)
            os.replace(tmp, os.path.join(d, f"{os.getpid()}-{uuid.uuid4().hex[:12]}.json"))


_STATS = _Stats()


def stats_dir(where: str) -> str:
    import hashlib

    return os.path.join(tempfile.gettempdir(), "radforge-dicomweb-stats", hashlib.sha256(where.encode()).hexdigest()[:16])


def reset_stats(url: str) -> None:
    import shutil

    where = Source.parse(url).where
    with _STATS.lock:  # this process's counts not flushed yet belong to before the reset too
        _STATS.pending.pop(where, None)
    shutil.rmtree(stats_dir(where), ignore_errors=True)


def read_stats(url: str) -> dict[str, int]:
    """The counters every process on this node flushed since `reset_stats`: requests, bytes,
    retries and retry_<cause> (http_503, timeout, connection, …)."""
    _STATS.flush()
    d = stats_dir(Source.parse(url).where)
    out: dict[str, int] = {}
    if os.path.isdir(d):
        for name in os.listdir(d):
            if name.endswith(".json"):
                with open(os.path.join(d, name)) as f:
                    for k, v in json.load(f).items():
                        out[k] = out.get(k, 0) + int(v)
    return dict(sorted(out.items()))


_pools: dict[tuple, object] = {}
_pools_lock = threading.Lock()


def _pool(src: Source):
    import urllib3

    key = (os.getpid(), src.scheme, src.netloc, src.settings.concurrency)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            # Our loop retries (counted, Retry-After honoured); urllib3's own retries are off.
            pool = _pools[key] = urllib3.PoolManager(maxsize=max(2, src.settings.concurrency), block=False,
                                                     retries=False)
    return pool


def _auth_headers(settings: Settings) -> dict[str, str]:
    """The Authorization header from the secrets file or the environment ({} when neither)."""
    cred: dict = {}
    path = settings.credentials_file or os.environ.get("RADFORGE_DICOMWEB_CREDENTIALS")
    if path:
        import yaml

        from radforge import storage

        try:
            cred = yaml.safe_load(storage.read_bytes(path)) or {}
        except FileNotFoundError:
            raise ConfigError("the DICOMweb credentials file does not exist (dicomweb.credentials_file)") from None
        except yaml.YAMLError:
            raise ConfigError("the DICOMweb credentials file is not YAML/JSON (dicomweb.credentials_file)") from None
        if not isinstance(cred, dict):
            raise ConfigError("the DICOMweb credentials file must hold {token: …} or {username: …, password: …}")
    else:
        cred = {"token": os.environ.get(TOKEN_ENV), "username": os.environ.get(USER_ENV),
                "password": os.environ.get(PASSWORD_ENV)}
    if cred.get("token"):
        return {"Authorization": f"Bearer {cred['token']}"}
    if cred.get("username"):
        raw = f"{cred['username']}:{cred.get('password') or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    return {}


def _backoff(settings: Settings, attempt: int, retry_after: str | None) -> float:
    cap = min(MAX_BACKOFF_S, settings.backoff_s * (2 ** attempt))
    if retry_after:
        try:
            return min(MAX_BACKOFF_S, max(0.0, float(retry_after)))
        except ValueError:
            pass
    return random.uniform(0, cap)


def request(src: Source, url: str, what: str, headers: dict[str, str] | None = None):
    """GET `url` with retries → (status, content type, body). Statuses other than 2xx, after
    the retries, raise DicomwebError; so do timeouts and connection errors."""
    import urllib3

    s = src.settings
    hdrs = {**_auth_headers(s), **(headers or {})}
    timeout = urllib3.Timeout(connect=s.timeout_s, read=s.timeout_s)
    where = src.where
    for attempt in range(s.retries + 1):
        cause = None
        try:
            _STATS.add(where, "requests")
            r = _pool(src).request("GET", url, headers=hdrs, timeout=timeout, redirect=False, preload_content=True)
        except urllib3.exceptions.SSLError:
            raise DicomwebError(f"TLS verification with the DICOMweb server {where} failed ({what})") from None
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError) as e:
            # NewConnectionError is a ConnectTimeoutError in urllib3: a refused connection is not a timeout
            timed_out = isinstance(e, urllib3.exceptions.TimeoutError) and not isinstance(e, urllib3.exceptions.NewConnectionError)
            cause = "timeout" if timed_out else "connection"
            status, retry_after = None, None
        except urllib3.exceptions.HTTPError as e:  # e.g. MaxRetryError wrapping a connect failure
            cause, status, retry_after = "connection", None, None
            if not isinstance(getattr(e, "reason", None), Exception):
                raise DicomwebError(f"{what} on {where} failed ({type(e).__name__})") from None
        else:
            status, retry_after = r.status, r.headers.get("Retry-After")
            if 200 <= status < 300:
                _STATS.add(where, "bytes", len(r.data))
                return status, r.headers.get("Content-Type", ""), r.data
            if status not in RETRY_STATUS:
                raise DicomwebError(_status_message(status, what, where), status)
            cause = f"http_{status}"
        if attempt == s.retries:
            _STATS.flush()
            last = f"HTTP {status}" if status else cause
            raise DicomwebError(f"{what} on {where} failed after {s.retries} retries (last: {last})", status)
        _STATS.add(where, "retries")
        _STATS.add(where, f"retry_{cause}")
        _STATS.flush()
        log.info("%s on %s: %s, retry %d/%d", what, where, cause, attempt + 1, s.retries)
        time.sleep(_backoff(s, attempt, retry_after))
    raise AssertionError("unreachable")


def _status_message(status: int, what: str, where: str) -> str:
    if status == 401:
        return (f"the DICOMweb server {where} wants credentials or refused them (HTTP 401; set "
                f"dicomweb.credentials_file or {TOKEN_ENV} / {USER_ENV} + {PASSWORD_ENV})")
    if status == 403:
        return f"the DICOMweb server {where} denied {what} for these credentials (HTTP 403)"
    if status == 404:
        return f"{what} on {where}: not found (HTTP 404; is the path the DICOMweb root?)"
    return f"{what} on {where} failed (HTTP {status})"


# ---------------------------------------------------------------------------------------------
# QIDO-RS: listing
# ---------------------------------------------------------------------------------------------


def _qido(src: Source, path: list[str], params: list[tuple[str, str]], attr: str, what: str) -> Iterator[str]:
    """Every value of `attr` the paged QIDO query `path?params` returns, in server order."""
    offset = 0
    limit = src.settings.page_size
    while True:
        q = urlencode(params + [("limit", str(limit)), ("offset", str(offset))])
        status, ctype, body = request(src, src.http(*path) + "?" + q, what, {"Accept": "application/dicom+json"})
        rows = json.loads(body) if status != 204 and body.strip() else []
        if not isinstance(rows, list):
            raise DicomwebError(f"{what} on {src.where}: the answer is not a DICOM JSON list")
        for row in rows:
            v = (row.get(attr) or {}).get("Value") or []
            if v:
                yield str(v[0])
        if len(rows) < limit:
            return
        offset += len(rows)


def _split_values(filters: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """A comma-separated value of a non-UID attribute is OR: one query per value (servers
    disagree on multi-value matching); UID lists are passed as they are."""
    queries: list[list[tuple[str, str]]] = [[]]
    for k, v in filters:
        values = [v] if "UID" in k or "," not in v else [p for p in v.split(",") if p]
        queries = [q + [(k, one)] for q in queries for one in values]
    return queries


def studies(src: Source) -> list[str]:
    """Study URLs (with the filters, for the series-level ones) matching the study filters."""
    uids: set[str] = set()
    for params in _split_values(src.study_filters()):
        uids.update(_qido(src, ["studies"], params, _STUDY_UID, "QIDO-RS study search"))
    return sorted(src.below(study=u).url() for u in uids)


def instances(src: Source) -> list[str]:
    """Instance URLs (settings kept, filters dropped) of one study, or of one series."""
    series = [src.series] if src.series else sorted({
        u for params in _split_values(src.series_filters())
        for u in _qido(src, ["studies", src.study, "series"], params, _SERIES_UID, "QIDO-RS series search")})
    out = []
    for se in series:
        for sop in _qido(src, ["studies", src.study, "series", se, "instances"], [], _SOP_UID, "QIDO-RS instance search"):
            out.append(src.below(series=se, instance=sop).url(filters=False))
    return sorted(set(out))


def walk(url: str) -> list[str]:
    """Every instance URL below `url` (root: all matching studies; study; series; instance)."""
    src = Source.parse(url)
    if src.instance:
        return [src.url(filters=False)]
    if src.study:
        return instances(src)
    return [u for s in studies(src) for u in instances(Source.parse(s))]


def check_readable(url: str) -> None:
    """One small QIDO request; a one-line ConfigError (no secret, no server text) on failure."""
    src = Source.parse(url)
    _auth_headers(src.settings)  # a missing/malformed secrets file is a ConfigError here
    quick = replace(src, settings=replace(src.settings, retries=min(1, src.settings.retries)))
    path = ["studies"] if not src.study else ["studies", src.study, "series"]
    try:
        request(quick, quick.http(*path) + "?limit=1", "QIDO-RS search", {"Accept": "application/dicom+json"})
    except DicomwebError as e:
        raise ConfigError(f"cannot read the DICOMweb source: {e}") from None


# ---------------------------------------------------------------------------------------------
# WADO-RS: retrieval
# ---------------------------------------------------------------------------------------------


def _multipart_parts(ctype: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related answer (RFC 2046), in order."""
    boundary = None
    for param in ctype.split(";")[1:]:
        k, _, v = param.strip().partition("=")
        if k.lower() == "boundary":
            boundary = v.strip().strip('"')
    if not boundary:
        raise DicomwebError("WADO-RS answer without a multipart boundary")
    delim = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        parts.append(data)
    return parts


def read(url: str) -> bytes:
    """One instance's bytes via WADO-RS (stored transfer syntax; the server's default if refused)."""
    src = Source.parse(url)
    if not src.instance:
        raise IsADirectoryError("a DICOMweb study or root URL is not an instance")
    target = src.http("studies", src.study, "series", src.series, "instances", src.instance)
    what = "WADO-RS instance retrieval"
    try:
        _, ctype, body = request(src, target, what, {"Accept": WADO_ACCEPT})
    except DicomwebError as e:
        if e.status not in (400, 406):
            raise
        _, ctype, body = request(src, target, what, {"Accept": WADO_ACCEPT_DEFAULT})
    if ctype.lower().startswith("multipart/"):
        parts = _multipart_parts(ctype, body)
        if len(parts) != 1:
            raise DicomwebError(f"{what} on {src.where}: expected one part, got {len(parts)}")
        return parts[0]
    return body  # a server answering application/dicom directly


class _ReadAhead:
    """Instances fetched by a bounded pool ahead of the consumer, in the consumer's order; at
    most `concurrency` requests in flight and 2 × `concurrency` answers held."""

    def __init__(self, urls: list[str]):
        self.urls = [u for u in urls if is_dicomweb(u) and not _CACHE.has(u)]  # kept by the scan: no fetch
        n = Source.parse(self.urls[0]).settings.concurrency if self.urls else 1
        self.window = 2 * n
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="radforge-wado")
        self.futures: dict[str, Future] = {}
        self.next = 0
        self.lock = threading.Lock()
        self._fill()

    def _fill(self) -> None:
        while self.next < len(self.urls) and len(self.futures) < self.window:
            u = self.urls[self.next]
            self.next += 1
            if u not in self.futures:
                self.futures[u] = self.pool.submit(read, u)

    def take(self, url: str) -> bytes | None:
        with self.lock:
            fut = self.futures.pop(url, None)
            self._fill()
        return fut.result() if fut is not None else None

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        _STATS.flush()


_local = threading.local()


@contextlib.contextmanager
def read_ahead(urls: list[str]):
    """While open, `open_input`/`read_bytes` of these URLs are served by a bounded pool that
    fetches them in this order (the scan batch's files, a series' slices)."""
    ra = _ReadAhead(list(urls))
    prev = getattr(_local, "ra", None)
    _local.ra = ra
    try:
        yield
    finally:
        _local.ra = prev
        ra.close()


def read_bytes(url: str) -> bytes:
    """An instance's bytes: kept by this node's header scan (`open_head`; each is taken once),
    else from the read-ahead pool, else one WADO-RS retrieval."""
    data = _CACHE.take(url)
    if data is not None:
        return data
    ra = getattr(_local, "ra", None)
    data = ra.take(url) if ra is not None else None
    return data if data is not None else read(url)


def open_input(url: str) -> io.BytesIO:
    return io.BytesIO(read_bytes(url))


def open_head(url: str) -> io.BytesIO:
    """The header scan's read: WADO-RS has no byte ranges, so it is the whole instance, which is
    kept on this node's disk for the build (`read_bytes`) where `_InstanceCache` has room."""
    data = read_bytes(url)
    _CACHE.put(url, data)
    return io.BytesIO(data)


# ---------------------------------------------------------------------------------------------
# Instances kept from the scan for the build
# ---------------------------------------------------------------------------------------------

CACHE_MAX_BYTES = 2 * 1024**3  # per process
CACHE_MIN_FREE_BYTES = 4 * 1024**3  # left free on the temp filesystem


def cache_dir(where: str) -> str:
    import hashlib

    return os.path.join(tempfile.gettempdir(), "radforge-dicomweb-cache", hashlib.sha256(where.encode()).hexdigest()[:16])


class _InstanceCache:
    """The instances a header scan retrieved, as files under `cache_dir` (mode 0700), so that the
    build reads each instance once from the server, not twice (scan and build run in the same
    node's Ray workers). Bounded: at most CACHE_MAX_BYTES put by one process, and none while the
    temp filesystem has less than CACHE_MIN_FREE_BYTES free; past that the build fetches again.
    A file is removed when the build takes it; `drop_cache` removes what is left (ingest calls it
    at the start and the end of a run). Known limits: an instance scanned on one node and built on
    another is fetched again (the request counters show it); the driver's exit removes its own
    node's files (atexit, also when the run failed), other nodes' stay until the next run from the
    same server there, or a reboot, clears them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = 0

    @staticmethod
    def _path(url: str) -> str:
        import hashlib

        return os.path.join(cache_dir(Source.parse(url).where), hashlib.sha256(url.encode()).hexdigest())

    def put(self, url: str, data: bytes) -> None:
        import shutil

        path = self._path(url)
        with self.lock:
            if self.held + len(data) > CACHE_MAX_BYTES:
                return
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            if shutil.disk_usage(os.path.dirname(path)).free < CACHE_MIN_FREE_BYTES + len(data):
                return
            self.held += len(data)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def has(self, url: str) -> bool:
        return os.path.exists(self._path(url))

    def take(self, url: str) -> bytes | None:
        path = self._path(url)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.remove(path)
        except FileNotFoundError:
            return None
        with self.lock:
            self.held = max(0, self.held - len(data))
        where = Source.parse(url).where
        _STATS.add(where, "cache_hits")
        _STATS.add(where, "cache_bytes", len(data))
        return data


_CACHE = _InstanceCache()


def drop_cache(url: str) -> None:
    """Remove the instances kept for `url`'s server on this node."""
    import shutil

    shutil.rmtree(cache_dir(Source.parse(url).where), ignore_errors=True)
