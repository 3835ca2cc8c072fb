"""Shared pieces of the benchmarks: memory samplers, best-of timing, the generated CT corpus,
a warm local Ray, a moto S3 server on 127.0.0.1 and report formatting."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "j2k": "1.2.840.10008.1.2.4.90",
}


def _rss_pss(p) -> tuple[int, int]:
    """(RSS, PSS) bytes of psutil process `p`. smaps_rollup is one cheap read; psutil's
    memory_full_info parses all of smaps, which costs a sampler tens of ms per Ray process and
    would skew the timings. Without smaps_rollup, PSS is reported as RSS."""
    rss = pss = None
    try:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    if pss is None:
        rss = pss = p.memory_info().rss
    return rss or pss, pss


class _Sampler:
    """Calls `sample()` every 0.2 s on a background thread while the `with` block runs.
    `own_s`: the CPU seconds those calls took (thread time), which a caller that measures the
    whole process takes off as the measurement's own cost."""

    def __init__(self):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self.own_s = 0.0

    def sample(self) -> None:
        raise NotImplementedError

    def _timed_sample(self) -> None:
        t0 = time.thread_time()
        self.sample()
        self.own_s += time.thread_time() - t0

    def _loop(self):
        while not self._stop.is_set():
            self._timed_sample()
            self._stop.wait(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class _PeakRSS(_Sampler):
    """Samples the memory of this process and its Ray worker processes.

    PSS, not RSS: every worker maps the shared object store, which RSS counts once per process
    (5+ GB "peaks" for a 300 MB corpus). Only this process's descendants count (the local
    cluster `ray.init` started), not other Ray users on the machine.
    """

    def __init__(self):
        super().__init__()
        self.peak = 0

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        total = _rss_pss(me)[1]
        for p in me.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if "ray::" in cmd or "default_worker.py" in cmd:
                    total += _rss_pss(p)[1]
            except (psutil.Error, OSError):
                continue
        self.peak = max(self.peak, total)


@contextmanager
def _workdir(workdir: str | None) -> Iterator[str]:
    """`workdir`, or a fresh temp dir that is removed after."""
    if workdir is not None:
        yield workdir
        return
    root = tempfile.mkdtemp(prefix="radforge-bench-")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Best:
    """Best (least disturbed) wall and CPU seconds per named measurement over repeated runs: on a
    shared machine the minimum is the run that other load hit least; CPU seconds of this process
    do not depend on other load at all."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @staticmethod
    def keep(table: dict[str, float], name: str, seconds: float) -> None:
        table[name] = min(table.get(name, float("inf")), seconds)

    def __call__(self, name: str, fn, per: int = 1):
        """Run fn(), record its seconds (divided by `per`, e.g. passes in a block); fn's result."""
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        self.keep(self.wall, name, (time.perf_counter() - t) / per)
        self.keep(self.cpu, name, (time.process_time() - c) / per)
        return out


def _ct_corpus(root: str, *, series: int, slices: int, size: int, syntax: str) -> tuple[str, list[str]]:
    """The generated CT corpus under root/corpus (kept across runs with --workdir) and its files."""
    from radforge import phantoms, storage

    corpus = os.path.join(root, "corpus")
    if not os.path.isdir(corpus):
        phantoms.ct_slices_corpus(corpus, n_series=series, n_slices=slices, rows=size, cols=size,
                                  transfer_syntax=SYNTAXES[syntax])
    return corpus, [p for p, _ in storage.find_files(corpus)]


def _tree_cpu_s(since: dict | None = None, *, root=None):
    """CPU seconds (user + system) of `root` (a psutil.Process; default this process) and its
    descendants (the local Ray cluster: raylet, GCS, workers). Without `since`: a snapshot by
    pid (empty when `root` is gone); with it: seconds used since then (processes that exited in
    between are not counted). Robust to other load on the machine, unlike wall time."""
    import psutil

    me = root or psutil.Process()
    try:
        tree = [me, *me.children(recursive=True)]
    except psutil.Error:
        tree = []
    now = {}
    for p in tree:
        try:
            c = p.cpu_times()
            now[p.pid] = c.user + c.system
        except psutil.Error:
            continue
    if since is None:
        return now
    return sum(v - since.get(pid, 0.0) for pid, v in now.items())


def _process_class(p, me_pid: int) -> str:
    """What a process of the local Ray cluster is, from its command line: "driver", "gcs_server",
    "raylet", "ray daemons" (dashboard agent, runtime-env agent, log monitor, monitor),
    "decoder child" (a spawned multiprocessing child of a worker), or "ray::<title>" for a Ray
    worker (its title names the task or actor it runs now, e.g. ray::IDLE, ray::MapBatches(…))."""
    if p.pid == me_pid:
        return "driver"
    cmd = " ".join(p.cmdline())
    if cmd.startswith("ray::"):
        title = cmd.split(" ", 1)[0]
        return title if len(title) <= 60 else title[:57] + "…"
    for needle, name in (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("multiprocessing", "decoder child"),
                         ("default_worker.py", "ray::(starting)")):
        if needle in cmd:
            return name
    return "ray daemons" if ("ray" in cmd or "dashboard" in cmd) else "other"


class _CpuByProcess(_Sampler):
    """CPU seconds per process class (`_process_class`) of this process and its descendants while
    the `with` block runs. Every 0.2 s each process's CPU time since the last sample goes to the
    class it has now, so a Ray worker's seconds go to the task title it ran (to the nearest
    0.2 s; IDLE where it switched in between). The sampler's own CPU (`own_s`) is taken off the
    driver's, as is that of the `others` samplers running beside it, and none is in `seconds`:
    the caller reports it apart. Processes that start and end between samples are missed."""

    def __init__(self, others: tuple[_Sampler, ...] = ()):
        super().__init__()
        self._last: dict[int, float] = {}
        self.seconds: dict[str, float] = {}
        self._others = others

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                c = p.cpu_times()
                now = c.user + c.system
                cls = _process_class(p, me.pid)
            except (psutil.Error, OSError):
                continue
            if p.pid in self._last:  # the first sample is the baseline
                self.seconds[cls] = self.seconds.get(cls, 0.0) + now - self._last[p.pid]
            elif self._started:
                self.seconds[cls] = self.seconds.get(cls, 0.0) + now  # started during the run
            self._last[p.pid] = now
        self._started = True

    def __enter__(self):
        self._started = False
        self._timed_sample()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._timed_sample()
        own = self.own_s + sum(o.own_s for o in self._others)
        self.seconds["driver"] = self.seconds.get("driver", 0.0) - own
        return False


def _warm_ray(cpus: int, root: str, recipe) -> float:
    """What a long-running cluster has already paid, so the timed runs measure throughput: one
    worker process per CPU with the ingest's imports done (pydicom, torch, webdataset, Ray Data:
    seconds per process), then a tiny ingest for Ray Data's own first-execution set-up.
    Returns the seconds spent, reported as `cold_start_s`."""
    import ray

    from radforge import ingest, phantoms

    @ray.remote(num_cpus=1)
    def warm():
        import pydicom  # noqa: F401
        import ray.data  # noqa: F401
        import torch  # noqa: F401
        import webdataset  # noqa: F401

        from radforge import ingest  # noqa: F401

        time.sleep(0.5)  # held, so the `cpus` tasks start one worker process each

    t = time.perf_counter()
    ray.get([warm.remote() for _ in range(cpus)])
    tiny = os.path.join(root, "warmup-corpus")
    if not os.path.isdir(tiny):
        phantoms.ct_slices_corpus(tiny, n_series=2, n_slices=8, rows=32, cols=32, transfer_syntax=SYNTAXES["rle"])
    dest = os.path.join(root, "warmup-shards")
    for d in (dest, dest + ".private"):
        shutil.rmtree(d, ignore_errors=True)
    ingest.run(tiny, dest, recipe, progress=False)
    return time.perf_counter() - t


def _block(title: str, rows: dict, row) -> list[str]:
    """One titled block of a report: the title, then `row(key, value)` per entry, indented."""
    return [title, *(f"  {row(k, v)}" for k, v in rows.items())]


def _met(value: float, target) -> str:
    return f"target ≥ {target}: {'met' if value >= target else 'NOT met'}"


def _met_below(value: float, target) -> str:
    return f"target ≤ {target:.0%}: {'met' if value <= target else 'NOT met'}"


_MOTO_CHILD = """
import logging, sys, threading
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes the pipe (or dies)
server.stop()
"""


@contextmanager
def s3_child(argv: list[str], key: str) -> Iterator[str]:
    """An S3 server in a child process (`python argv…`, which prints its port on its first line
    and stops when its stdin closes), the standard AWS env pointing at it (restored after) →
    its endpoint URL. A child, not a thread: in-process, its request threads would compete with
    the reader under test for this interpreter's GIL, which a real object store never does."""
    import subprocess
    import sys

    from radforge import storage

    proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        with storage.s3_endpoint_env(endpoint, key=key):
            yield endpoint
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def _moto_s3() -> Iterator[str]:
    """moto's S3 server (ThreadedMotoServer) on 127.0.0.1 in a child (`s3_child`) → a fresh
    bucket's URL."""
    import boto3

    with s3_child(["-c", _MOTO_CHILD], key="bench") as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        yield "s3://bench"


