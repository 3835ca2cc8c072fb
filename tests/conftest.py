"""Shared pytest fixtures, and the two test tiers.

Tiers: a test is `slow` when its module says so (`pytestmark`) or when it needs a Ray cluster
(`ray_cluster` anywhere in its fixture closure: marked here at collection, so no module has to
remember). `make test-fast` runs `-m "not slow"`; `make test` runs everything (that, then `-m slow`,
on pytest-xdist processes too: one test module per work unit, see `_RAY_TIER_MODULE_S`). A test that is not
`slow` and still starts Ray (in this process or in a child) fails: every Ray session of the test
run lives under one private RAY_TMPDIR, and a new session appearing there during a fast test is
reported. A Ray test cannot sneak into the fast tier unnoticed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- tiers

# Fixtures that make a test `slow` wherever they appear in its closure.
_SLOW_FIXTURES = frozenset({"ray_cluster"})


# Ray Train settings for the test run, in os.environ before any Ray process starts (its controller
# and workers read them; subprocess tests and `make cluster-local` inherit them). Each of the tier's
# ~20 Ray Train jobs otherwise spends up to 2 s noticing that its workers finished (the controller
# polls them every 2 s) and starts a spot-preemption watcher actor (one more process importing Ray
# on 2 cores) that no test uses. Users' runs keep Ray's defaults.
_RAY_TRAIN_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def pytest_configure(config):
    for k, v in _RAY_TRAIN_TEST_ENV.items():
        os.environ.setdefault(k, v)
    if config.getoption("dist", "no") == "loadscope":  # the controller, before it starts its workers
        os.environ[_ORDER_ENV] = "1"
    # pytest-xdist workers share the cores; torch/OpenMP in each would start one thread per core
    # (-n 2 on 2 cores: 4 busy threads). One core's share each, set before any torch import (the
    # DINO learning test measured 71.5 CPU s with 2 threads, 16.6 with 1, at load ~8).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # Ray keeps its sessions in $RAY_TMPDIR/ray; children inherit the variable. A private one per
    # test run lets the guard below see exactly this run's clusters (not another user's). Under
    # pytest-xdist each worker process gets its own (workers inherit the controller's): a Ray
    # test on one worker must not look like a Ray start to a fast test running on another.
    worker, parent = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("_RADFORGE_TEST_RAY_TMPDIR")
    if worker and parent and os.environ.get("RAY_TMPDIR") == parent:  # inside the controller's (it removes it)
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"{worker}-", dir=parent)
    elif "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = config._radforge_ray_tmp = tempfile.mkdtemp(prefix="rft-", dir="/tmp")
        os.environ["_RADFORGE_TEST_RAY_TMPDIR"] = config._radforge_ray_tmp


def pytest_unconfigure(config):
    if config.getoption("dist", "no") == "loadscope":
        os.environ.pop(_ORDER_ENV, None)
    tmp = getattr(config, "_radforge_ray_tmp", None)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.environ.get("RAY_TMPDIR") == tmp:
            del os.environ["RAY_TMPDIR"]
        if os.environ.get("_RADFORGE_TEST_RAY_TMPDIR") == tmp:
            del os.environ["_RADFORGE_TEST_RAY_TMPDIR"]


# The Ray tier on pytest-xdist (`make test`: -n RAY_TIER_WORKERS --dist loadscope
# --no-loadscope-reorder; xdist's loadgroup cannot be used: it renames items through
# `item._nodeid`, which pytest 9 no longer reads). A work unit is a test module, so its
# module-scoped fixtures (trained runs, a Serve app, `make cluster-local`'s head) are built once;
# each worker has its own session fixtures (moto, Ray cluster, RAY_TMPDIR, basetemp: the
# stock-reader check reads the worker's own shard sets), except `ingested_corpus`, built once per
# run (`_once_per_run`). Units go out longest first, so the workers finish close together:
# seconds each module took in one process on this 2-core host (test_train with the corpus
# ingest), load < 1; a module not listed counts 30 s.
_RAY_TIER_MODULE_S = {"test_train.py": 530, "test_demo.py": 137, "test_cluster.py": 135, "test_ingest.py": 121,
                      "test_serve.py": 108, "test_finetune.py": 35, "test_bench_gpu.py": 34, "test_archives.py": 30,
                      "test_dicomweb.py": 18, "test_listing.py": 9, "test_scale.py": 3, "test_loader.py": 1}
_ORDER_ENV = "_RADFORGE_TEST_LONGEST_MODULES_FIRST"  # set by the controller, read by its workers


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if os.environ.get(_ORDER_ENV) and os.environ.get("PYTEST_XDIST_WORKER"):
        # stable: a module's tests keep their order; every worker sorts the same collection alike
        items.sort(key=lambda it: -_RAY_TIER_MODULE_S.get(it.path.name, 30))


def _ray_sessions() -> set[str]:
    d = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    try:
        return {p.name for p in d.iterdir() if p.name.startswith("session_") and p.name != "session_latest"}
    except OSError:
        return set()


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request):
    """Fail a test outside the `slow` tier that starts a Ray cluster (in-process or a child)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    sessions, connected = _ray_sessions(), _ray_connected()
    yield
    started = sorted(_ray_sessions() - sessions)
    if not connected and _ray_connected():
        sys.modules["ray"].shutdown()  # keep the rest of the fast tier Ray-free
        started = started or ["(in-process ray.init)"]
    if started:
        pytest.fail(f"{request.node.nodeid} started Ray ({', '.join(started)}) but is not marked slow: "
                    "request the `ray_cluster` fixture or mark it `slow`", pytrace=False)


# --------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    """moto's S3 protocol server, reachable from this process and any child (Ray workers)."""

    endpoint: str

    def client(self, service: str = "s3", **kwargs):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **kwargs)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket and return its URL, ``s3://<name>``."""
        name = name or f"rf-test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 endpoint on 127.0.0.1 (moto), with the standard AWS env pointing at it
    (`storage.s3_endpoint_env`).

    The variables go into os.environ, not just into fsspec options, because a local Ray
    cluster started later inherits them for its worker processes.
    """
    from moto.server import ThreadedMotoServer

    from radforge import storage

    werkzeug_log = logging.getLogger("werkzeug")
    old_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one INFO line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    try:
        with storage.s3_endpoint_env(endpoint, key="testing"):
            yield S3Server(endpoint=endpoint)
    finally:
        server.stop()
        werkzeug_log.setLevel(old_level)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for this test: ``s3://<unique-name>``."""
    return s3_server.create_bucket()


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server, tmp_path_factory) -> Iterator[str]:
    """One real local Ray cluster (2 CPUs) for the session; yields its address.

    It depends on `s3_server` so that the AWS environment is in place before Ray starts its
    workers: they inherit os.environ at start-up. Before it goes, every shard set the session
    wrote is read with `ray.data.read_webdataset` (`_read_every_shard_set`).
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
        _read_every_shard_set(tmp_path_factory.getbasetemp(), "ray.data")
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- shards read by stock tools


def _read_every_shard_set(root: Path, reader: str) -> dict:
    """Read every shard listed by every manifest.json under `root` (the session's tmp_path
    trees) with a stock reader, `webdataset.WebDataset` or `ray.data.read_webdataset`: both refuse
    a tar with a duplicate key, and each must yield exactly the samples the manifest counts.
    Shards a test altered on purpose (sha256 no longer the manifest's, or deleted) are left out.
    The figures go to `<root>/shard-readability.json` (and the terminal summary)."""
    sets, tars, expected, altered = 0, [], 0, 0
    for mpath in sorted(root.rglob("manifest.json")):
        try:
            m = json.loads(mpath.read_text())
        except (OSError, ValueError):
            continue
        if m.get("schema") != "radforge.shards" or not m.get("shards"):
            continue
        sets += 1
        for s in m["shards"]:
            tar = mpath.parent / s["path"]
            if not tar.is_file() or hashlib.sha256(tar.read_bytes()).hexdigest() != s["sha256"]:
                altered += 1
                continue
            tars.append(str(tar))
            expected += s["samples"]
    if reader == "ray.data" and tars:
        import ray

        got = ray.data.read_webdataset(tars, decoder=None).count()
    elif tars:
        import webdataset as wds

        got = sum(1 for _ in wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    else:
        got = 0
    out = root / "shard-readability.json"
    figures = json.loads(out.read_text()) if out.exists() else {}
    figures[reader] = {"shard_sets": sets, "tars": len(tars), "samples": got, "altered_left_out": altered}
    out.write_text(json.dumps(figures, sort_keys=True))
    assert got == expected, f"{reader} read {got} samples from {len(tars)} shards; the manifests list {expected}"
    return figures[reader]


@pytest.fixture(scope="session", autouse=True)
def _every_shard_set_reads_with_stock_webdataset(tmp_path_factory):
    """At the end of the session (after the Ray cluster, which checks with ray.data first)."""
    yield
    _read_every_shard_set(tmp_path_factory.getbasetemp(), "webdataset")


def pytest_terminal_summary(terminalreporter, config):
    base = getattr(config, "_tmp_path_factory", None)
    if base is None:
        return
    root = base.getbasetemp()
    # this process's figures, or each pytest-xdist worker's (their basetemps are root/<worker>)
    paths = [root / "shard-readability.json"] + sorted(root.glob("*/shard-readability.json"))
    totals: dict[str, dict] = {}
    for path in paths:
        if path.exists():
            for reader, f in json.loads(path.read_text()).items():
                t = totals.setdefault(reader, dict.fromkeys(f, 0))
                for k, v in f.items():
                    t[k] += v
    for reader, f in sorted(totals.items()):
        terminalreporter.write_line(f"stock readers: {reader} read {f['samples']} samples from {f['tars']} tars "
                                    f"of {f['shard_sets']} shard sets ({f['altered_left_out']} listed shards absent or changed by their tests)")


@pytest.fixture
def deid_secret(monkeypatch) -> str:
    """A real (non-demo) pseudonym secret in the standard variable."""
    secret = "test-secret-" + "x" * 32
    monkeypatch.setenv("RADFORGE_DEID_SECRET", secret)
    return secret


# --------------------------------------------------------------------------- one ingested corpus


@dataclass
class IngestedCorpus:
    """The phantom training corpus and its shard set (read-only: tests write their own copies)."""

    corpus: "phantoms.TrainingCorpus"  # noqa: F821 (imported lazily: collection stays Ray-free)
    shards: str
    manifest: dict


@contextlib.contextmanager
def _once_per_run(tmp_path_factory, name: str) -> Iterator[Path]:
    """`<run root>/<name>.pickle`, with `<name>.lock` held: a session fixture built under it by one
    pytest-xdist worker is loaded by the others (their basetemps are `<run root>/<worker>`; one
    process: the root is its basetemp). Whoever finds no pickle builds, while the others wait."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield root / f"{name}.pickle"


@pytest.fixture(scope="session")
def ingested_corpus(tmp_path_factory, ray_cluster) -> IngestedCorpus:
    """Built once and ingested once per test run, with the real ingest on the session's Ray:
    240 patients × (CT 16×48² + DX 128²), findings drawn in the pixels and stated in the reports,
    public demo key, 1 MB shards, the default splits (~80/10/10 by patient). Shared by the train
    and cluster tests (and whoever needs a learnable corpus). Under pytest-xdist the first worker
    that needs it builds it in its basetemp (its stock-reader check reads it); the others load it."""
    from radforge import config, ingest, phantoms
    from radforge.config import IngestRecipe

    with _once_per_run(tmp_path_factory, "ingested-corpus") as shared:
        if shared.exists():
            return IngestedCorpus(**pickle.loads(shared.read_bytes()))
        root = tmp_path_factory.mktemp("ingested-corpus")
        corpus = phantoms.training_corpus(root / "src", n_patients=240)
        recipe = config.load(IngestRecipe, None, ["deid.demo_key=true", "shards.target_mb=1"])
        res = ingest.run(corpus.dicom_dir, str(root / "shards"), recipe, reports=corpus.reports_csv,
                         labels=corpus.labels_csv, progress=False)
        assert res.ok, res.manifest.get("inputs")
        fields = {"corpus": corpus, "shards": res.dest, "manifest": res.manifest}
        tmp = shared.with_suffix(f".{os.getpid()}")
        tmp.write_bytes(pickle.dumps(fields))
        tmp.replace(shared)
        return IngestedCorpus(**fields)


# --------------------------------------------------------------------------- a tiny Hugging Face encoder


def _save_tiny_bert(out: Path, texts: list[str], *, layers: int = 1, max_positions: int = 32):
    """A tiny BERT + tokenizer whose vocabulary holds the words of `texts`, saved the Hugging Face
    way into `out` (nothing from a model hub). Returns (out, model in eval mode, tokenizer)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".,").lower() for t in texts for w in t.split()})
    vocab = out.parent / f"{out.name}-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers,
                                 num_attention_heads=2, intermediate_size=37, max_position_embeddings=max_positions))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model.eval(), tok


@pytest.fixture(scope="session")
def tiny_bert():
    """`tiny_bert(out_dir, texts, layers=1, max_positions=32) -> (dir, model, tokenizer)`."""
    return _save_tiny_bert
