"""What an ingest reads from SOURCE, per stage, counted by the S3 server itself.

`bench_source_reads` (part of `radforge bench ingest`, key `source_reads`): small CT corpora
(default 2 series × 64 slices of each slice size) are uploaded to moto's S3 server on 127.0.0.1
and ingested into a local DEST on a fresh local Ray cluster. The server runs in a child process behind a WSGI
middleware that logs every request (method, key, Range header, response body bytes), so the
figures are what the endpoint sent, not our own arithmetic. The ingest's stage functions
(`ingest._list_and_scan`, `_plan`, `_build`) are wrapped in the driver only to take a snapshot of
the server's log at each stage boundary; they run unchanged.

Two corpora in one run (`by_size`), on one server and one Ray cluster: slices of 512² (281 KB
each, RLE) and of 256² (72 KB), since the scan's first range is a share of the file with a floor
that weighs most on small files. Reported per size and stage (scan = list + header scan, plan,
build): object GETs, their body bytes ÷ the corpus bytes, GETs per file, HEADs and LISTs; and for
the build, how many files were read exactly once, whole. Target (issue 14): all stages together
≤ 1.05 × the corpus bytes, at both sizes (`met`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

_LOG_PATH = "/__radforge_requests__"


def _counting_app():
    """moto's S3 WSGI app behind a middleware that logs every request; GET `_LOG_PATH` returns
    the log as JSON ([method, path, query, range, body bytes] per request)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    log: list[list] = []

    def counting(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == _LOG_PATH:
            with lock:
                body = json.dumps(log).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        chunks = list(app(environ, start_response))
        with lock:
            log.append([environ["REQUEST_METHOD"], path, environ.get("QUERY_STRING", ""),
                        environ.get("HTTP_RANGE"), sum(len(c) for c in chunks)])
        return chunks

    return counting


def _serve() -> None:
    """The child process: serve the counting app on 127.0.0.1, print the port, stop when stdin closes."""
    import logging

    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", 0, _counting_app(), threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()
    server.shutdown()


@contextmanager
def counting_s3(bucket: str = "reads") -> Iterator["RequestLog"]:
    """A counting moto S3 server in a child process (run by file path, so that this module also
    measures an older checkout), the standard AWS env pointing at it, a fresh bucket."""
    import boto3

    from radforge.bench._common import s3_child

    code = f"import runpy; runpy.run_path({os.path.abspath(__file__)!r})['_serve']()"
    with s3_child(["-c", code], key="reads") as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield RequestLog(endpoint, bucket)


class RequestLog:
    """The server's request log, read over HTTP; `since(n)` → requests after the first n."""

    def __init__(self, endpoint: str, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket

    def entries(self) -> list[list]:
        with urllib.request.urlopen(self.endpoint + _LOG_PATH, timeout=30) as r:
            return json.loads(r.read())

    def summary(self, entries: list[list], prefix: str, sizes: dict[str, int]) -> dict:
        """Requests on keys under `prefix` of this bucket: GETs, bytes, HEADs, LISTs, and per key
        (GETs, bytes) in `per_key`."""
        base = f"/{self.bucket}/{prefix.strip('/')}/"
        out = {"get_requests": 0, "get_bytes": 0, "head_requests": 0, "list_requests": 0}
        per_key: dict[str, list[int]] = {}
        for method, path, query, _range, nbytes in entries:
            if path.rstrip("/") == f"/{self.bucket}":
                out["list_requests"] += "list-type" in query or "prefix" in query
                continue
            if not path.startswith(base):
                continue
            if method == "HEAD":
                out["head_requests"] += 1
            elif method == "GET":
                out["get_requests"] += 1
                out["get_bytes"] += nbytes
                k = per_key.setdefault(path[len(base):], [0, 0])
                k[0] += 1
                k[1] += nbytes
        out["per_key"] = per_key
        return out


def bench_source_reads(root: str, *, series: int = 2, slices: int = 64, sizes: tuple[int, ...] = (512, 256),
                       syntax: str = "rle", cpus: int = 2) -> dict:
    """Ingest a generated CT corpus of each slice size (512²: 281 KB RLE slices, 256²: 72 KB) from
    one counting S3 server on one local Ray cluster → bytes and requests per stage, per size."""
    import ray

    from radforge import config, ingest, storage
    from radforge.bench._common import _ct_corpus
    from radforge.config import IngestRecipe

    recipe = config.load(IngestRecipe, None, ["deid.demo_key=true", "shards.target_mb=8"])
    by_size = {}
    with counting_s3() as server:
        ray.shutdown()  # a cluster started now inherits the endpoint env
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        try:
            for size in sizes:
                work = os.path.join(root, "source-reads", f"{size}")
                corpus, files = _ct_corpus(work, series=series, slices=slices, size=size, syntax=syntax)
                dest = os.path.join(work, "shards")
                for d in (dest, dest + ".private"):
                    shutil.rmtree(d, ignore_errors=True)
                src = f"s3://{server.bucket}/corpus-{size}"
                file_sizes = {}
                for f in files:
                    rel = os.path.relpath(f, corpus)
                    storage.put_file_atomic(f, f"{src}/{rel}")
                    file_sizes[rel] = os.path.getsize(f)
                marks: list[tuple[str, int]] = []
                start = len(server.entries())
                with _stage_marks(ingest, server, marks):
                    t = time.perf_counter()
                    res = ingest.run(src, dest, recipe, progress=False)
                    wall = time.perf_counter() - t
                log = server.entries()[start:]
                marks = [(name, n - start) for name, n in marks]
                by_size[f"{size}x{size}"] = _report(server, log, marks, file_sizes, src, res, wall)
        finally:
            ray.shutdown()
    return {"by_size": by_size, "target": {"bytes / corpus": 1.05},
            "met": all(r["total"]["bytes / corpus"] <= 1.05 for r in by_size.values()),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


@contextmanager
def _stage_marks(ingest, server: RequestLog, marks: list):
    """Wrap the driver's stage functions to note the server's log length as each one starts and ends."""
    saved = {name: getattr(ingest, name) for name in ("_list_and_scan", "_plan", "_build")}

    def wrap(name, fn):
        def staged(*a, **kw):
            marks.append((name + ":start", len(server.entries())))
            try:
                return fn(*a, **kw)
            finally:
                marks.append((name + ":end", len(server.entries())))
        return staged

    for name, fn in saved.items():
        setattr(ingest, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ingest, name, fn)


_STAGES = {"scan": "_list_and_scan", "plan": "_plan", "build": "_build"}


def _report(server: RequestLog, log: list, marks: list, sizes: dict, src: str, res, wall: float) -> dict:
    at = dict(marks)
    corpus = sum(sizes.values())
    n = len(sizes)
    prefix = src.split("://", 1)[1].split("/", 1)[1]
    stages = {}
    covered = 0
    for stage, fn in _STAGES.items():
        s = server.summary(log[at[fn + ":start"]:at[fn + ":end"]], prefix, sizes)
        covered += at[fn + ":end"] - at[fn + ":start"]
        per_key = s.pop("per_key")
        s["bytes / corpus"] = round(s["get_bytes"] / corpus, 4)
        s["gets / file"] = round(s["get_requests"] / n, 3)
        if stage == "build":
            s["files read once, whole"] = sum(1 for k, (g, b) in per_key.items() if g == 1 and b == sizes.get(k))
            s["files read more than once"] = sum(1 for g, _ in per_key.values() if g > 1)
        stages[stage] = s
    total = server.summary(log, prefix, sizes)
    total.pop("per_key")
    return {
        "corpus": {"files": n, "bytes": corpus, "url": "s3://<moto on 127.0.0.1>/corpus"},
        "stages": stages,
        "total": {**total, "bytes / corpus": round(total["get_bytes"] / corpus, 4),
                  "gets / file": round(total["get_requests"] / n, 3),
                  "requests outside the stages": len(log) - covered},
        "target": {"bytes / corpus": 1.05},
        "samples": res.manifest["totals"].get("samples"),
        "wall_s": round(wall, 1),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def format_source_reads(r: dict) -> list[str]:
    """Report lines for `radforge bench ingest`."""
    lines = []
    for shape, one in r["by_size"].items():
        c = one["corpus"]
        lines.append(f"bytes read from SOURCE (moto S3, counted by the server), {shape} slices: {c['files']} files,"
                     f" {c['bytes'] / 1e6:.1f} MB ({c['bytes'] / c['files'] / 1e3:.0f} KB each), {one['samples']} samples,"
                     f" load avg {one['loadavg_1min']}")
        for stage, s in [*one["stages"].items(), ("total", one["total"])]:
            extra = ""
            if "files read once, whole" in s:
                extra = f"  read once whole {s['files read once, whole']}/{c['files']}"
            lines.append(f"  {stage:<6} GET {s['get_requests']:>5} ({s['gets / file']:.2f}/file)  {s['bytes / corpus']:.4f} × corpus"
                         f"  HEAD {s['head_requests']}  LIST {s['list_requests']}{extra}")
    totals = ", ".join(f"{shape} {one['total']['bytes / corpus']:.4f}" for shape, one in r["by_size"].items())
    lines.append(f"  target: bytes ÷ corpus ≤ {r['target']['bytes / corpus']} at every size ({totals}):"
                 f" {'met' if r['met'] else 'NOT met'}")
    return lines


if __name__ == "__main__":  # pragma: no cover — `python reads.py` measures the checkout it is imported from
    import tempfile

    with tempfile.TemporaryDirectory(prefix="radforge-reads-") as d:
        print(json.dumps(bench_source_reads(d), indent=1))
