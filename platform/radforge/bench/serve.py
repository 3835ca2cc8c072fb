"""radforge bench serve

/v1/embed of radforge.serve over HTTP on 127.0.0.1, side by side in one run on one local Ray.
Two applications run at once, each one replica with the same resources: "batched"
(max_batch_size=16, batch_wait_timeout_s=0.01) and "unbatched" (max_batch_size=1). They are
measured in alternating rounds and the best round of each counts, so load from other processes
on the machine hits both alike.

  in_process    np.load → ModelView → LoadedModel.embed_images in this process with the
                replica's thread count; at concurrency 1 each in-process call is interleaved
                with one HTTP request, so "Serve overhead" = p50(HTTP, unbatched) − p50(in-process)
                compares like with like
  healthz_get   an empty GET through the same path: the floor of any Serve request here (a POST
                costs more: the replica pulls the body from the proxy with extra RPCs)
  ingress_healthz_get  GET /-/healthz, answered by the ingress itself (Serve's proxy, or HAProxy):
                client + ingress, no replica
  direct_*      (HAProxy only) the POST and the empty GET sent straight to the replica's own HTTP
                server, so HAProxy's hop is the difference
  unbatched_interleaved_requests  the same POST with the `requests` library (see the client below)
  post_refused  the same POST answered 404 (unknown model) before its body is pulled: the floor
                of a POST without the body transfer
  replica phases  the unbatched POSTs' Server-Timing (radforge.serve.Phases): load, body (the
                pull from the proxy), decode, model, total; "outside the handler" = client p50 −
                total (proxy, actor calls, HTTP, ASGI)
  model_only    embed_images per item at batch 1 vs batch 16: the most batching can give on this
                device (a compute-bound CPU forward gains little; a GPU gains a lot), wall and
                thread CPU, as the median of interleaved pairs measured half before and half after
                the Serve runs (one pass of 2 + 32 calls read 1.03-1.87 on the shared CPU)
  c16 rounds    per round and app: req/s, the replica's CPU per request (psutil, decode workers
                included) and, batched, the batch sizes formed and the queue/model p50 read from
                Server-Timing (`batch;desc=N`, `queue`); the batched ÷ unbatched ratio is the
                median of paired rounds, and unbatched ÷ batched replica CPU per request its
                steadier twin, set against the model-only CPU ceiling

Payload: one X-ray in the stored form (.npy uint16 [256, 256], raw body, Content-Type
application/x-npy) for a freshly initialised tiny MAE X-ray model at the default 224 px view
(weights do not change the cost); cuda when present. Everything Serve-side runs three times, each
on a fresh local Ray started with that mode's cluster-wide env (`serve_modes`), every request with
the API key (as on a non-loopback deployment): `default` (what build_app gives a deployment,
radforge.serve.REPLICA_ENV, behind Ray's default ingress, Serve's proxy actor: radforge's fallback
where no HAProxy binary is installed), `tuned` (Serve's documented throughput
settings on top, SERVE_TUNED_ENV, still through the proxy) and `haproxy` (radforge.serve.INGRESS_ENV:
HAProxy on the same port forwarding to the replicas' own HTTP servers, no proxy actor, no body
pull). The client is http.client, one keep-alive connection per thread (`_Http`): `requests`
costs about 2 ms of CPU per request on these cores, which the figures would count as Serve's
(`serve overhead p50 ms @1 (requests client)` shows it). Ray's processes run at nice 0 here (Ray's default
for workers is 15), like the in-process call, and the nice values seen are printed. Targets:
Serve overhead p50 ≤ 5 ms; batched ÷ unbatched requests/s at concurrency 16 ≥ 0.9 × the
model-only ceiling, and ≥ 3 where that ceiling allows it (≥ 3.3). The client runs on the same
machine as the server.

Reading the figures: batching pays where a forward of 16 costs much less than 16 forwards
(`model_only` ceiling ≫ 1: accelerators, small models). The replica's batcher
(radforge.serve.Batcher) forms a batch when the model is free, so at concurrency 16 batches settle
near 8 (half the clients wait on the running forward while the other half queue for the next);
Serve's own `@serve.batch` formed 2-3 through the proxy, queued behind each other (queue p50
150-280 ms on 7a6b8a8). A CPU forward of this ViT is compute-bound, per-item cost about flat in
batch size, so batched ≈ unbatched there. Serve's per-request cost is the empty-GET floor plus, for
a POST behind the proxy actor, the replica pulling the body from the proxy (actor calls); both grow
with scheduling delay on a loaded machine. Behind HAProxy the body arrives on the replica's socket
("body" ≈ 0.1 ms) and the floor is HTTP + ASGI in the replica. The overhead is a difference of two
~30 ms forwards, one in the replica's process: above load ≈ 5 they differ by ± 3 ms (one run
measured −1.5 ms), so read it beside "outside the handler" and the floors, which do not contain a
forward.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time

from radforge.bench._common import _Sampler, _block, _rss_pss, _tree_cpu_s


def _bench_model(root: str) -> str:
    """A tiny MAE X-ray model dir in the exported format, random weights (cost only)."""
    import torch

    from radforge import checkpoint, kinds, models
    from radforge.config import IngestRecipe, ModelConfig, ViewConfig
    from radforge.transforms import Profile

    torch.manual_seed(0)
    view, cfg = ViewConfig(rand_crop=False), ModelConfig(kind="mae", preset="tiny")
    model = models.build(cfg, kinds.XRAY, kinds.XRAY.view(view).input_shape, pretrained=False)
    return checkpoint.write_model(os.path.join(root, "bench-model"), model, image=kinds.XRAY, model_cfg=cfg, view=view,
                                  profile=Profile.from_recipe(IngestRecipe()), model_id="bench-mae-xray")


class _Http:
    """One keep-alive HTTP/1.1 connection (the standard library's http.client) for one client
    thread. The client is on the same 2 cores as the server and its own cost is inside every
    latency measured here: `requests` spends about 2 ms of CPU per request (sessions, adapters,
    cookie and header merging; measured against a bare uvicorn app: 2.1-2.4 ms vs 0.3-0.5 ms), more
    than Serve's whole overhead budget, so the figures use this client, and `requests` is kept
    for one interleaved series (`unbatched_interleaved_requests`) to compare."""

    def __init__(self, url: str):
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.path = u.path
        self._conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._conn.close()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """→ (status, response headers (lower-case names), body)."""
        self._conn.request(method, path, body=body, headers=headers or {})
        r = self._conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def _load(url: str, payload: bytes, concurrency: int, n: int, headers: dict | None = None) -> dict:
    """`n` POSTs of `payload` by `concurrency` client threads (one keep-alive connection each,
    `_Http`) → rps, p50, p99."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    per = max(1, n // concurrency)

    def worker(_):
        lat, timing = [], []
        with _Http(url) as c:
            for _ in range(per):
                t = time.perf_counter()
                status, h, body = c.request("POST", c.path, payload, headers)
                lat.append(time.perf_counter() - t)
                timing.append(h.get("server-timing", ""))
                if status != 200:
                    raise RuntimeError(f"bench request failed: HTTP {status} {body[:200]!r}")
        return lat, timing

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        parts = list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - t0
    lats = [x for part, _ in parts for x in part]
    a = np.array(lats) * 1000
    out = {"n": len(lats), "rps": round(len(lats) / wall, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
           "p99_ms": round(float(np.percentile(a, 99)), 2)}
    timings = [_server_timing(h) for _, hs in parts for h in hs]
    sizes = [t["batch"] for t in timings if "batch" in t]
    if sizes:  # what the batcher formed: the size of the batch each request ran in
        out["batch_size_mean"] = round(float(np.mean(sizes)), 2)
        out["batch_sizes"] = {int(b): sizes.count(b) for b in sorted(set(sizes))}
    for phase in ("decode", "queue", "model", "total"):
        vals = [t[phase] for t in timings if phase in t]
        if vals:
            out[f"{phase}_p50_ms"] = round(float(np.median(vals)), 2)
    return out


def _percentiles(lat_s: list[float], wall_s: float) -> dict:
    import numpy as np

    a = np.array(lat_s) * 1000
    return {"n": len(lat_s), "rps": round(len(lat_s) / wall_s, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2)}


# Serve's own documented tuning (ray/serve/_private/constants.py) on top of what build_app sets
# (radforge.serve.REPLICA_ENV): the proxy's router on its main loop, buffered request logs, gRPC
# between proxy and replica. Direct ingress (also part of it) stays off: the proxy is what a
# cluster deployment runs. Note RAY_SERVE_THROUGHPUT_OPTIMIZED alone does not switch the proxy to
# gRPC in Ray 2.60 (RAY_SERVE_PROXY_USE_GRPC is computed before it): it is named here.
SERVE_TUNED_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                   "RAY_SERVE_PROXY_USE_GRPC": "1"}

# mode → (cluster-wide env, Serve's HTTP host). "haproxy" is radforge.serve.INGRESS_ENV: HAProxy on
# the Serve port in front of the replicas' own HTTP servers; HAProxy reaches them at the node's IP,
# so Serve binds all interfaces there (every mode requires the API key).
def serve_modes() -> dict[str, tuple[dict, str]]:
    from radforge.serve import INGRESS_ENV  # imports Ray Serve: not at bench import

    return {"default": ({}, "127.0.0.1"), "tuned": (SERVE_TUNED_ENV, "127.0.0.1"), "haproxy": (INGRESS_ENV, "0.0.0.0")}


def _server_timing(header: str) -> dict[str, float]:
    """`Server-Timing: body;dur=0.12, total;dur=3.4, batch;desc=5` → {"body": 0.12, "total": 3.4,
    "batch": 5.0}."""
    out = {}
    for part in header.split(","):
        name, _, value = part.strip().partition(";dur=")
        if not value:
            name, _, value = part.strip().partition(";desc=")
        if value:
            out[name] = float(value)
    return out


def _c1_breakdown(urls: dict, payload: bytes, in_process, n: int, acc: dict, auth: dict, direct: str | None) -> None:
    """Concurrency 1, interleaved so load hits all alike: an in-process call, the same POST over
    HTTP (its replica phases from Server-Timing), the same POST with `requests`, an empty GET, the
    ingress's own health answer (`/-/healthz`: Serve's proxy, or HAProxy itself, no replica), a POST
    refused before its body is pulled (404 unknown model), and with HAProxy the POST and the empty
    GET sent straight to the replica's own HTTP server (`direct`: its port) to split HAProxy off."""
    import requests

    hdr = {"Content-Type": "application/x-npy", **auth}
    url = urls["unbatched"]
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(_Http(url))
        sess = stack.enter_context(requests.Session())
        d = stack.enter_context(_Http(direct)) if direct else None
        base = c.path.removesuffix("/v1/embed")

        def timed(key: str, fn, want: int = 200):
            t = time.perf_counter()
            status, headers, _ = fn()
            acc[key].append(time.perf_counter() - t)
            if status != want:
                raise RuntimeError(f"bench request {key} got HTTP {status}, not {want}")
            return headers

        for _ in range(n):
            t = time.perf_counter()
            in_process()
            acc["in_process"].append(time.perf_counter() - t)
            headers = timed("unbatched_interleaved", lambda: c.request("POST", c.path, payload, hdr))
            acc["phases"].append(_server_timing(headers.get("server-timing", "")))

            def via_requests():
                r = sess.post(url, data=payload, headers=hdr, timeout=120)
                return r.status_code, r.headers, r.content

            timed("unbatched_interleaved_requests", via_requests)
            timed("healthz_get", lambda: c.request("GET", base + "/healthz"))
            timed("ingress_healthz_get", lambda: c.request("GET", "/-/healthz"))
            timed("post_refused", lambda: c.request("POST", c.path, payload, {"X-Model": "-", **hdr}), want=404)
            if d is not None:
                timed("direct_unbatched", lambda: d.request("POST", c.path, payload, hdr))
                timed("direct_healthz_get", lambda: d.request("GET", base + "/healthz"))


def _replica_port(route_prefix: str) -> int | None:
    """The port of the replica's own HTTP server (Serve's direct ingress, 30000-31000) serving
    `route_prefix`, found among this run's replica processes; None when there is none."""
    import http.client

    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if "ServeReplica" not in " ".join(p.cmdline()):
                continue
            ports = [c.laddr.port for c in p.net_connections("tcp") if c.status == "LISTEN" and 30000 <= c.laddr.port <= 31000]
        except (psutil.Error, OSError):
            continue
        for port in ports:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", route_prefix + "/healthz")
                if conn.getresponse().status == 200:
                    return port
            except OSError:
                continue
            finally:
                conn.close()
    return None


def _replica_processes() -> dict[str, object]:
    """This run's replica processes (psutil) by app: "batched" / "unbatched" (Ray's proctitle
    `ray::ServeReplica:bench-<app>:RadforgeServer`)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.Error, OSError):
            continue
        for name in ("unbatched", "batched"):
            if f"ServeReplica:bench-{name}:" in cmd:
                out[name] = p
    return out


def _cpu_s(p) -> float:
    """CPU seconds of `p` (psutil) and its children so far; 0 when it is gone or None."""
    return 0.0 if p is None else float(sum(_tree_cpu_s(root=p).values()))


def _serve_niceness() -> dict[str, int]:
    """Nice value of this run's Serve processes (proxy, replicas), by role."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            for role in ("ProxyActor", "ServeReplica", "ServeController"):
                if role in cmd:
                    out[role] = max(out.get(role, -99), p.nice())
        except (psutil.Error, OSError):
            continue
    return out


def _serve_side(model_url: str, payload: bytes, in_process, *, cuda: bool, ncpu: int, replica_cpus: int,
                requests_c16: int, requests_c1: int, rounds: int, env: dict, host: str, keys_file: str, key: str) -> dict:
    """One local Ray (started with `env`), Serve on `host`, both apps up (API key required),
    alternating rounds; best round counts."""
    import socket
    import sys

    import numpy as np
    import ray
    from ray import serve

    from radforge import serve as rserve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray starts its workers at nice 15; the in-process call runs at 0. Serve's processes (proxy,
    # controller) at 0 too, so on a shared machine both sides queue for the CPU alike.
    env = {"RAY_worker_niceness": "0", **env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # Ray's processes inherit the environment of the ray.init call
    best: dict[str, dict] = {}
    per_round: dict[str, list[dict]] = {}
    series = ("in_process", "unbatched_interleaved", "unbatched_interleaved_requests", "healthz_get", "ingress_healthz_get",
              "post_refused", "direct_unbatched", "direct_healthz_get")
    acc: dict[str, list] = {k: [] for k in (*series, "phases")}
    loadavg = []
    # Ray prints raylet notices (e.g. the killed controller's retried shutdown task) on stdout,
    # which would corrupt `--json`; they go to stderr until ray.shutdown() stops the printer.
    with contextlib.redirect_stdout(sys.stderr):
        ray.shutdown()
        ray.init(num_cpus=ncpu, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        try:
            serve.start(http_options={"host": host, "port": port})
            auth = {"Authorization": f"Bearer {key}"}
            urls = {}
            for name, batch in (("unbatched", 1), ("batched", 16)):
                # replica_memory_mb: the default declaration (8 GB, sized for 512 MB DICOM uploads)
                # twice would not fit a small machine's Ray memory, and the second app never starts.
                app = rserve.build_app({"model": model_url, "max_batch_size": batch, "batch_wait_timeout_s": 0.01,
                                        "num_cpus": replica_cpus, "num_gpus": 0.5 if cuda else 0, "replica_memory_mb": 2048,
                                        "api_keys_file": keys_file})
                serve.run(app, name=f"bench-{name}", route_prefix=f"/{name}", blocking=False)
                urls[name] = f"http://127.0.0.1:{port}/{name}/v1/embed"
                _load(urls[name], payload, 4, 32, auth)  # warm-up: model load, connections
            nice = _serve_niceness()
            replicas = _replica_processes()
            direct = _replica_port("/unbatched") if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else None
            for _ in range(rounds):
                loadavg.append(round(os.getloadavg()[0], 2))
                _c1_breakdown(urls, payload, in_process, requests_c1, acc, auth,
                              f"http://127.0.0.1:{direct}/unbatched/v1/embed" if direct else None)
                for name in ("unbatched", "batched"):
                    for c in (1, 16):
                        cpu0 = _cpu_s(replicas.get(name))
                        res = _load(urls[name], payload, c, requests_c16 if c == 16 else requests_c1, auth)
                        if replicas.get(name) is not None:  # the replica's own CPU (its decode workers too)
                            res["replica_cpu_ms_per_request"] = round((_cpu_s(replicas[name]) - cpu0) / res["n"] * 1e3, 2)
                        key = f"{name}/c{c}"
                        per_round.setdefault(key, []).append(res)
                        if key not in best or res["rps"] > best[key]["rps"]:
                            best[key] = res
            loadavg.append(round(os.getloadavg()[0], 2))
        finally:
            serve.shutdown()
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    runs = {k: {"c1": _percentiles(acc[k], sum(acc[k]))} for k in series if acc[k]}
    runs |= {"unbatched": {"c1": best["unbatched/c1"], "c16": best["unbatched/c16"]},
             "batched": {"c1": best["batched/c1"], "c16": best["batched/c16"]}}
    names = sorted({k for ph in acc["phases"] for k in ph})
    phases = {k: round(float(np.median([ph.get(k, 0.0) for ph in acc["phases"]])), 2) for k in names}
    p50 = runs["unbatched_interleaved"]["c1"]["p50_ms"]
    if "total" in phases:  # what neither the handler nor the model is: proxy, actor calls, HTTP, ASGI
        phases["outside the handler (client p50 - total)"] = round(p50 - phases["total"], 2)
    paired = [b["rps"] / u["rps"] for b, u in zip(per_round["batched/c16"], per_round["unbatched/c16"])]
    ratios = {"batched / unbatched rps @16": round(best["batched/c16"]["rps"] / best["unbatched/c16"]["rps"], 2),
              "batched / unbatched rps @16, median of paired rounds": round(float(np.median(paired)), 2)}
    cpu = [u.get("replica_cpu_ms_per_request", 0) / b["replica_cpu_ms_per_request"]
           for b, u in zip(per_round["batched/c16"], per_round["unbatched/c16"]) if b.get("replica_cpu_ms_per_request")]
    if cpu:  # CPU per request, unbatched ÷ batched: steadier than rps on a shared machine
        ratios["unbatched / batched replica CPU per request @16"] = round(float(np.median(cpu)), 2)
    return {
        "runs": runs,
        "c16_rounds": {k: v for k, v in per_round.items() if k.endswith("/c16")},
        "replica_phases_p50_ms": phases,
        "loadavg_1min": loadavg,
        "niceness": nice,
        "ratios": {
            **ratios,
            "serve overhead p50 ms @1": round(p50 - runs["in_process"]["c1"]["p50_ms"], 2),
            "serve overhead p50 ms @1 (requests client)":
                round(runs["unbatched_interleaved_requests"]["c1"]["p50_ms"] - runs["in_process"]["c1"]["p50_ms"], 2),
        },
    }


def _model_only(lm, x1, cuda: bool, reps: int) -> dict[str, list[float]]:
    """ms per item of `lm.embed_images` at batch 1 and 16, wall and this thread's CPU: the most
    batching can give here. `reps` interleaved pairs (16 calls of one image, one call of 16, the
    order alternating), so load that comes and goes hits both sides of each pair alike."""
    import torch

    xs = {b: x1.expand(b, *x1.shape[1:]).contiguous() for b in (1, 16)}
    for xb in xs.values():
        lm.embed_images(xb)
    out: dict[str, list[float]] = {"wall_1": [], "wall_16": [], "cpu_1": [], "cpu_16": []}
    for r in range(reps):
        for b in ((1, 16) if r % 2 == 0 else (16, 1)):
            n = 16 // b
            c, t = time.thread_time(), time.perf_counter()
            for _ in range(n):
                lm.embed_images(xs[b])
            if cuda:
                torch.cuda.synchronize()
            out[f"wall_{b}"].append((time.perf_counter() - t) / 16 * 1000)
            out[f"cpu_{b}"].append((time.thread_time() - c) / 16 * 1000)
    return out


def _ceilings(samples: dict[str, list[float]]) -> dict:
    """Medians of the per-item figures and of the pairs' batch-1 ÷ batch-16 ratios (wall, CPU)."""
    import numpy as np

    med = {k: round(float(np.median(v)), 2) for k, v in samples.items()}
    wall = [a / b for a, b in zip(samples["wall_1"], samples["wall_16"])]
    cpu = [a / b for a, b in zip(samples["cpu_1"], samples["cpu_16"])]
    return {"ms_per_item_median": med, "pairs": len(wall),
            "ceiling": round(float(np.median(wall)), 3), "ceiling_min_max": [round(min(wall), 2), round(max(wall), 2)],
            "cpu_ceiling": round(float(np.median(cpu)), 3)}


def bench_serve(*, workdir: str | None = None, requests_c16: int = 256, requests_c1: int = 60, rounds: int = 3,
                ceiling_pairs: int = 8) -> dict:
    import io

    import numpy as np
    import torch

    from radforge import checkpoint, serve_decode
    from radforge import serve as rserve

    own = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="radforge-bench-serve-")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # One replica per app; on CPU each gets half the cores (both apps are up at once).
    ncpu = max(2, os.cpu_count() or 2)
    replica_cpus = 1 if cuda else max(1, ncpu // 2)
    try:
        model_url = _bench_model(root)
        img = (np.random.default_rng(0).random((256, 256)) * 65535).astype(np.uint16)
        buf = io.BytesIO()
        np.save(buf, img)
        payload = buf.getvalue()

        torch.set_num_threads(replica_cpus)  # what Ray gives a replica (OMP_NUM_THREADS = num_cpus)
        lm = checkpoint.load_for_inference(model_url, device)
        view = lm.image.view(lm.view)

        def in_process():
            x = view(serve_decode.load_npy(payload, lm.image), {})
            e = lm.embed_images(torch.from_numpy(x[None]))
            if cuda:
                torch.cuda.synchronize()
            return e

        x1 = torch.from_numpy(view(serve_decode.load_npy(payload, lm.image), {})[None])
        # The ceiling is measured before and after the Serve runs (half the pairs each), so a
        # load that changes over the run is in it; the median of the pairs counts.
        samples = _model_only(lm, x1, cuda, ceiling_pairs // 2)
        key = "bench-" + os.urandom(16).hex()
        keys_file = os.path.join(root, "api-keys")
        with open(keys_file, "w") as f:
            f.write(key + "\n")
        modes = {}
        for mode, (env, host) in serve_modes().items():
            modes[mode] = _serve_side(model_url, payload, in_process, cuda=cuda, ncpu=ncpu, replica_cpus=replica_cpus,
                                      requests_c16=requests_c16, requests_c1=requests_c1, rounds=rounds, env=env,
                                      host=host, keys_file=keys_file, key=key)
        for k, v in _model_only(lm, x1, cuda, ceiling_pairs - ceiling_pairs // 2).items():
            samples[k] += v
        model_only = _ceilings(samples)
        ceiling, cpu_ceiling = model_only["ceiling"], model_only["cpu_ceiling"]
        for mode in modes:
            r = modes[mode]["ratios"]
            r["batched / unbatched ÷ model-only ceiling"] = round(
                r["batched / unbatched rps @16, median of paired rounds"] / ceiling, 2)
            if "unbatched / batched replica CPU per request @16" in r:
                r["replica CPU ratio ÷ model-only CPU ceiling"] = round(
                    r["unbatched / batched replica CPU per request @16"] / cpu_ceiling, 2)
        # batched ≥ 3× unbatched only where the model itself gains that much from a batch (GPU).
        speedup_target = ">= 3" if ceiling >= 3 / 0.9 else f"- (ceiling {ceiling:.2f} < 3.3 on {device})"
        return {
            "benchmark": "serve",
            "setup": {"model": "mae tiny, xray 224 px (random weights)", "payload": "npy uint16 [256, 256]",
                      "device": device, "cpus": ncpu, "replica_cpus": replica_cpus, "torch_threads": torch.get_num_threads(),
                      "rounds": rounds, "modes": {m: env for m, (env, _) in serve_modes().items()},
                      "replica_env": rserve.REPLICA_ENV},
            "model_only": model_only,
            "modes": modes,
            "ratios": {
                "model-only batching ceiling": round(ceiling, 2),
                "model-only batching ceiling (CPU)": round(cpu_ceiling, 2),
                **{f"{k} [{m}]": v for m, r in modes.items() for k, v in r["ratios"].items()},
            },
            "targets": {"model-only batching ceiling": "-", "model-only batching ceiling (CPU)": "-",
                        **{f"{k} [{m}]": t for m in modes for k, t in (
                            ("batched / unbatched rps @16", "-"),
                            ("batched / unbatched rps @16, median of paired rounds", speedup_target),
                            ("unbatched / batched replica CPU per request @16", "-"),
                            ("serve overhead p50 ms @1", "<= 5"),
                            ("serve overhead p50 ms @1 (requests client)", "-"),
                            ("batched / unbatched ÷ model-only ceiling", ">= 0.9"),
                            ("replica CPU ratio ÷ model-only CPU ceiling", ">= 0.9"))
                            if k in modes[m]["ratios"]}},
        }
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def format_serve(r: dict) -> str:
    lines = ["radforge bench serve", "=" * 20, f"setup: {r['setup']}"]
    m = r["model_only"]
    lines.append(f"model only, ms per item (medians of {m['pairs']} interleaved pairs): {m['ms_per_item_median']}; "
                 f"ceiling {m['ceiling']:.2f} (pairs {m['ceiling_min_max'][0]:.2f}-{m['ceiling_min_max'][1]:.2f}), "
                 f"CPU ceiling {m['cpu_ceiling']:.2f}")
    for mode, res in r["modes"].items():
        lines += ["", f"Serve settings: {mode} (1-min load average per round: {res['loadavg_1min']})",
                  f"  {'run':<24}{'conc':>5}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}"]
        for name, by_c in res["runs"].items():
            for c, v in by_c.items():
                lines.append(f"  {name:<24}{c[1:]:>5}{v['rps']:>10.1f}{v['p50_ms']:>10.2f}{v['p99_ms']:>10.2f}")
        for key, rounds_ in res["c16_rounds"].items():
            lines.append(f"  {key} per round: " + "; ".join(
                f"{v['rps']:.1f} req/s, replica CPU {v.get('replica_cpu_ms_per_request', float('nan')):.2f} ms/req"
                + (f", batch mean {v['batch_size_mean']:.1f} {v['batch_sizes']}, queue p50 {v.get('queue_p50_ms', 0):.1f} ms,"
                   f" model p50 {v.get('model_p50_ms', 0):.1f} ms" if "batch_sizes" in v else "") for v in rounds_))
        lines.append(f"  nice of Serve's processes: {res['niceness']}")
        lines.append("  replica phases of unbatched_interleaved, p50 ms (Server-Timing): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in res["replica_phases_p50_ms"].items()))
    lines += ["", *_block("ratios (target)", r["ratios"], lambda k, v: f"{k:<50}{v:>8.2f}  (target {r['targets'][k]})")]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# radforge bench serve --hostile
#
# One app (the bench model, default budgets of config.ServeConfig, API keys from a file) on one
# local Ray, bound to 127.0.0.1. Two kinds of runs alternate (`rounds` each), the same client code
# at concurrency 16 on both:
#
#   clean     valid DICOM uploads only (a 1024² DX, 2 MB, through the decode workers)
#   hostile   the same valid uploads with every 4th request crafted (25 %), cycling through
#               bomb      RLE pixel data, a 3 KB file declaring 65535² × 16 bit (8.6 GB)
#               stall     a zero-filled 32 MB file after the 'DICM' preamble (header parse stall)
#               garbage   200 kB of random bytes
#               oversized the valid file declaring 400 frames (840 MB of pixels, body 2 MB)
#
# Reported: status counts per kind (target: no 5xx, no client-side error), the valid requests'
# p50/p99 on each side, pooled over rounds (target: hostile p99 ≤ 2 × clean p99), and the replica's
# memory sampled every 0.2 s (RSS and PSS of the replica process and of its decode workers), with
# the replica and decode-worker pids seen (a replica restart would show as a second replica pid).


HOSTILE_KINDS = ("bomb", "stall", "garbage", "oversized")


def _hostile_payloads(valid: bytes) -> dict[str, bytes]:
    """The crafted uploads, made from the valid file (see the table above)."""
    import io
    import struct

    import numpy as np
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    bomb = pydicom.dcmread(io.BytesIO(valid))
    bomb.Rows = bomb.Columns = 65535
    bomb.file_meta.TransferSyntaxUID = RLELossless
    # one RLE frame of 2 segments, each of 400 replicate runs (0x81, 0): 128 output bytes per 2 input
    seg = b"\x81\x00" * 400
    frame = struct.pack("<16I", 2, 64, 64 + len(seg), *[0] * 13) + seg * 2
    bomb.PixelData = encapsulate([frame])
    bomb["PixelData"].VR = "OB"
    oversized = pydicom.dcmread(io.BytesIO(valid))
    oversized.NumberOfFrames = 400
    out = {}
    for name, ds in (("bomb", bomb), ("oversized", oversized)):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out[name] = buf.getvalue()
    out["stall"] = b"\0" * 128 + b"DICM" + b"\0" * (32 << 20)
    out["garbage"] = np.random.default_rng(0).bytes(200_000)
    return {k: out[k] for k in HOSTILE_KINDS}


def _mixed_load(url: str, schedule: list[tuple[str, bytes]], concurrency: int, headers: dict) -> tuple[list[tuple], float]:
    """`schedule` (kind, payload) POSTed in order by `concurrency` client threads (keep-alive
    sessions) → ([(kind, status or exception name, error code, seconds)], wall seconds). Unlike
    `_load`, a non-200 is a result, not a failure."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    import requests

    nxt, lock = itertools.count(), threading.Lock()

    def worker(_):
        out = []
        with requests.Session() as s:
            while True:
                with lock:
                    i = next(nxt)
                if i >= len(schedule):
                    return out
                kind, payload = schedule[i]
                t = time.perf_counter()
                try:
                    r = s.post(url, data=payload, headers={"Content-Type": "application/dicom", **headers}, timeout=120)
                    status = r.status_code
                    try:
                        code = r.json().get("error") if status != 200 else None
                    except ValueError:
                        code = "not-json"
                except requests.RequestException as e:
                    status, code = type(e).__name__, None
                    s.close()
                out.append((kind, status, code, time.perf_counter() - t))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = [x for part in pool.map(worker, range(concurrency)) for x in part]
    return res, time.perf_counter() - t0


class _ReplicaMemory(_Sampler):
    """Samples, every 0.2 s, RSS and PSS of the Serve replica processes under this process (Ray's
    proctitle `ray::ServeReplica:…`) and of their children (the decode workers and
    multiprocessing's resource tracker). Keeps the peaks of: replica alone, largest decode worker,
    replica + all its children; and every replica and decode-worker pid seen."""

    def __init__(self):
        super().__init__()
        self.peak = {"replica_rss": 0, "replica_pss": 0, "worker_rss": 0, "worker_pss": 0, "total_rss": 0, "total_pss": 0}
        self.replicas: set[int] = set()
        self.workers: set[int] = set()
        self.samples = 0

    def sample(self) -> None:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                if "ServeReplica" not in " ".join(p.cmdline()):
                    continue
                r_rss, r_pss = _rss_pss(p)
                t_rss, t_pss = r_rss, r_pss
                self.replicas.add(p.pid)
                for c in p.children(recursive=True):
                    try:
                        c_rss, c_pss = _rss_pss(c)
                    except (psutil.Error, OSError):
                        continue
                    t_rss, t_pss = t_rss + c_rss, t_pss + c_pss
                    if "multiprocessing.spawn" in " ".join(c.cmdline()):  # not the resource tracker
                        self.workers.add(c.pid)
                        self._keep(worker_rss=c_rss, worker_pss=c_pss)
                self._keep(replica_rss=r_rss, replica_pss=r_pss, total_rss=t_rss, total_pss=t_pss)
            except (psutil.Error, OSError):
                continue
        self.samples += 1

    def _keep(self, **kw: int) -> None:
        for k, v in kw.items():
            self.peak[k] = max(self.peak[k], v)

    def report(self) -> dict:
        return {**{f"peak_{k}_mb": round(v / 2**20) for k, v in self.peak.items()},
                "replica_pids_seen": len(self.replicas), "decode_worker_pids_seen": len(self.workers),
                "samples": self.samples}


def bench_serve_hostile(*, workdir: str | None = None, requests_per_round: int = 128, rounds: int = 3,
                        concurrency: int = 16) -> dict:
    """See the table above. Bounded: 2 × `rounds` runs of `requests_per_round` requests each
    (default 768 in all, about 2 minutes on 2 cores), every request under a 120 s client timeout."""
    import contextlib
    import socket
    import sys

    import ray
    import requests
    from ray import serve

    from radforge import phantoms
    from radforge import serve as rserve

    own = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="radforge-bench-serve-hostile-")
    ncpu = max(2, os.cpu_count() or 2)
    key = "bench-" + os.urandom(16).hex()
    try:
        model_url = _bench_model(root)
        path = os.path.join(root, "valid-dx.dcm")
        phantoms.xray(path, phantoms.make_study(phantoms.make_patient(0)), rows=1024, cols=1024)
        with open(path, "rb") as f:
            valid = f.read()
        crafted = _hostile_payloads(valid)
        keys_file = os.path.join(root, "api-keys")
        with open(keys_file, "w") as f:
            f.write(key + "\n")
        settings = {"model": model_url, "api_keys_file": keys_file, "num_cpus": max(1, ncpu // 2), "max_models_per_replica": 1}
        hostile = []
        for i in range(requests_per_round):  # every 4th crafted, cycling through the kinds
            kind = HOSTILE_KINDS[(i // 4) % len(HOSTILE_KINDS)] if i % 4 == 3 else "valid"
            hostile.append((kind, crafted.get(kind, valid)))
        schedules = {"clean": [("valid", valid)] * requests_per_round, "hostile": hostile}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results: dict[str, list] = {"clean": [], "hostile": []}
        walls = {"clean": 0.0, "hostile": 0.0}
        loadavg = [round(os.getloadavg()[0], 2)]
        mem = _ReplicaMemory()
        with contextlib.redirect_stdout(sys.stderr):  # Ray's raylet notices would corrupt --json
            ray.shutdown()
            ray.init(address="local", num_cpus=ncpu, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                serve.run(rserve.build_app(settings), name="bench-hostile", route_prefix="/", blocking=False)
                base = f"http://127.0.0.1:{port}"
                hdr = {"Authorization": f"Bearer {key}"}
                _load(base + "/v1/embed", valid, 4, 16, headers=hdr)  # warm-up: model load, decode workers, connections
                mem.sample()
                idle = dict(mem.peak)
                with mem:
                    for _ in range(rounds):
                        for side in ("clean", "hostile"):
                            res, wall = _mixed_load(base + "/v1/embed", schedules[side], concurrency, hdr)
                            results[side] += res
                            walls[side] += wall
                            loadavg.append(round(os.getloadavg()[0], 2))
                healthz = requests.get(base + "/healthz", timeout=30).status_code
            finally:
                serve.shutdown()
                ray.shutdown()
        summary = {side: _side_summary(res, walls[side]) for side, res in results.items()}
        c, h = summary["clean"]["valid"], summary["hostile"]["valid"]
        ratio = round(h["p99_ms"] / c["p99_ms"], 2) if c and h else None
        return {
            "benchmark": "serve-hostile",
            "setup": {"model": "mae tiny, xray 224 px (random weights)", "valid": f"DX 1024² 16-bit DICOM, {len(valid) / 1e6:.1f} MB",
                      "crafted": {k: len(v) for k, v in crafted.items()}, "crafted_fraction": 0.25,
                      "concurrency": concurrency, "requests_per_round": requests_per_round, "rounds": rounds,
                      "cpus": ncpu, "replica_cpus": settings["num_cpus"], "budgets": _budgets(settings)},
            "sides": summary,
            "memory": {"idle_before": {k + "_mb": round(v / 2**20) for k, v in idle.items()}, "during": mem.report()},
            "healthz_after": healthz,
            "ratios": {"5xx (hostile)": summary["hostile"]["5xx"],
                       "connection errors (hostile)": summary["hostile"]["client_errors"],
                       "hostile p99 / clean p99 (valid requests)": ratio},
            "targets": {"5xx (hostile)": "== 0", "connection errors (hostile)": "== 0",
                        "hostile p99 / clean p99 (valid requests)": "<= 2"},
            "loadavg_1min": loadavg,
        }
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _side_summary(res: list[tuple], wall: float) -> dict:
    """One side's (kind, status, code, seconds) results → counts per kind and status, 5xx, client
    errors, and the valid requests' latency percentiles."""
    by_kind: dict[str, dict] = {}
    for kind, status, code, _ in res:
        k = f"{status} {code}" if code else str(status)
        by_kind.setdefault(kind, {}).setdefault(k, 0)
        by_kind[kind][k] += 1
    ok = [t for kind, status, _, t in res if kind == "valid" and status == 200]
    crafted = sorted(t for kind, _, _, t in res if kind != "valid")
    return {
        "requests": len(res), "crafted": len(crafted), "status_by_kind": by_kind,
        "5xx": sum(1 for _, s, _, _ in res if isinstance(s, int) and s >= 500),
        "client_errors": sum(1 for _, s, _, _ in res if not isinstance(s, int)),
        "valid_not_200": sum(1 for kind, s, _, _ in res if kind == "valid" and s != 200),
        "rps_all": round(len(res) / wall, 1),
        "valid": _percentiles(ok, wall) if ok else None,
        "crafted_p99_ms": round(float(crafted[round(0.99 * (len(crafted) - 1))]) * 1000, 1) if crafted else None,
    }


def _budgets(settings: dict) -> dict:
    from radforge import config

    cfg = config.from_dict(config.ServeConfig, settings)
    return {k: getattr(cfg, k) for k in ("max_upload_mb", "max_image_mb", "decode_timeout_s", "body_timeout_s", "decode_workers")} | {
        "declared_memory_mb": cfg.declared_memory_mb()}


def format_serve_hostile(r: dict) -> str:
    s = r["setup"]
    lines = ["radforge bench serve --hostile", "=" * 30,
             f"valid: {s['valid']}; crafted ({s['crafted_fraction']:.0%} of the hostile side): "
             + ", ".join(f"{k} {v / 1e6:.3g} MB" for k, v in s["crafted"].items()),
             f"concurrency {s['concurrency']}, {s['requests_per_round']} requests per run, {s['rounds']} rounds of clean + hostile, "
             f"{s['cpus']} CPUs (replica {s['replica_cpus']}); budgets {s['budgets']}", ""]
    lines.append(f"  {'run':<10}{'requests':>9}{'crafted':>9}{'5xx':>5}{'errors':>8}{'req/s':>8}"
                 f"{'valid req/s':>13}{'valid p50 ms':>14}{'valid p99 ms':>14}")
    for side, v in r["sides"].items():
        ok = v["valid"] or {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
        lines.append(f"  {side:<10}{v['requests']:>9}{v['crafted']:>9}{v['5xx']:>5}{v['client_errors']:>8}{v['rps_all']:>8.1f}"
                     f"{ok['rps']:>13.1f}{ok['p50_ms']:>14.1f}{ok['p99_ms']:>14.1f}")
    lines += ["", "status by kind:"]
    for side, v in r["sides"].items():
        for kind, counts in v["status_by_kind"].items():
            lines.append(f"  {side:<8}{kind:<10}" + ", ".join(f"{k}: {n}" for k, n in counts.items()))
    m = r["memory"]["during"]
    lines += ["", f"replica memory over the run ({m['samples']} samples every 0.2 s), peaks in MB:",
              f"  replica RSS {m['peak_replica_rss_mb']} / PSS {m['peak_replica_pss_mb']}; largest decode worker RSS "
              f"{m['peak_worker_rss_mb']} / PSS {m['peak_worker_pss_mb']}; replica + workers RSS {m['peak_total_rss_mb']} / "
              f"PSS {m['peak_total_pss_mb']} (declared to Ray: {s['budgets']['declared_memory_mb']:.0f})",
              f"  idle before: {r['memory']['idle_before']}",
              f"  replica pids seen {m['replica_pids_seen']} (1 = no restart), decode worker pids seen {m['decode_worker_pids_seen']}; "
              f"/healthz after: {r['healthz_after']}", ""]
    lines += _block("ratios (target)", r["ratios"], lambda k, v: f"{k:<44}{v!s:>8}  (target {r['targets'][k]})")
    lines.append(f"1-min load average during the run: {r['loadavg_1min']}")
    return "\n".join(lines)
