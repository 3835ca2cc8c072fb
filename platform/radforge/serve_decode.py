"""Request decoding of `radforge.serve`, importable without Ray Serve or FastAPI: the errors an
upload can get (`ApiError`, fixed details), the parsing of an upload (media type, .npy header,
zips, DICOM through `dicom.canonical_from_files`, the model's view) and `DecodePool`, the
replica's decode worker processes.

A decode worker is a fresh (spawned) process that unpickles the functions it runs by module
name, so it imports this module and, through it, only what decoding needs (numpy, pydicom,
radforge.dicom / transforms / kinds, torch for the view), never ray.serve or FastAPI, which would
cost every new worker about a CPU second more (`DecodePool` replaces a worker after each
timeout or abort, so hostile input pays it again and again).
"""

from __future__ import annotations

import asyncio
import io
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from radforge import config

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

