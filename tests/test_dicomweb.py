"""DICOMweb sources against a real Orthanc (QIDO-RS / WADO-RS, auth on), a fault-injecting proxy,
and incremental ingest (`--append`).

Orthanc (Debian's `orthanc` + `orthanc-dicomweb`, installed by `make sysdeps`) runs on 127.0.0.1
on free ports with a temp storage dir and a test user; the corpus goes in through its REST API
(POST /instances). The fast tests talk to it without Ray; one slow test ingests through it.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import os
import random
import shutil
import socket
import threading
import time
from base64 import b64encode
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from radforge import config, dicomweb, storage
from radforge.bench import ORTHANC_BIN, ORTHANC_DICOMWEB_PLUGIN, Orthanc
from radforge.config import IngestRecipe
from radforge.errors import ConfigError

USER, PASSWORD = "radforge-test", "pw-" + "s3cr3t" * 4  # the password is grepped for below

pytestmark = pytest.mark.skipif(not (os.path.exists(ORTHANC_BIN) and os.path.exists(ORTHANC_DICOMWEB_PLUGIN)),
                                reason="Orthanc + DICOMweb plugin not installed (make sysdeps)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    o = Orthanc(str(tmp_path_factory.mktemp("orthanc")), USER, PASSWORD)
    try:
        yield o
    finally:
        o.proc.kill()  # a throw-away server: its graceful shutdown (SIGTERM) took ~2 s of teardown
        o.stop()


def _files(root) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*.dcm"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 patients (CT 8 × 32² + DX 64² each: 12 studies), uploaded by the tests that need them."""
    from radforge import phantoms

    root = tmp_path_factory.mktemp("dw-corpus")
    return phantoms.training_corpus(root / "src", n_patients=6, ct_slices=8, ct_matrix=32, xray_size=64)


# --------------------------------------------------------------------------- a fault-injecting proxy


@dataclass
class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of Orthanc: per request, with a seeded draw, answers 503,
    429 (Retry-After: 0), drops the connection, stalls past the client timeout, or forwards."""

    upstream_port: int
    rates: dict = field(default_factory=lambda: {"503": 0.12, "429": 0.04, "drop": 0.04, "stall": 0.03})
    stall_s: float = 1.5
    seed: int = 0
    faults: Counter = field(default_factory=Counter)
    forwarded: int = 0

    def start(self) -> "FaultProxy":
        rng, lock, proxy = random.Random(self.seed), threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                with lock:
                    x, fault = rng.random(), None
                    for kind, p in proxy.rates.items():
                        if x < p:
                            fault = kind
                            break
                        x -= p
                    if fault:
                        proxy.faults[fault] += 1
                    else:
                        proxy.forwarded += 1
                if fault in ("503", "429"):
                    body = b"injected"
                    self.send_response(int(fault))
                    self.send_header("Content-Length", str(len(body)))
                    if fault == "429":
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                if fault in ("drop", "stall"):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                up = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                up.request("GET", self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                r = up.getresponse()
                body = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                up.close()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"


def _recipe(*sets: str) -> IngestRecipe:
    return config.load(IngestRecipe, None, list(sets))


def _source(url: str, credentials: str, *sets: str) -> str:
    return dicomweb.resolve(url, _recipe(f"dicomweb.credentials_file={credentials}", *sets).dicomweb)


# --------------------------------------------------------------------------- fast tier (no Ray)


def test_urls_parse_and_resolve_round_trip():
    src = dicomweb.Source.parse("dicomweb+https://pacs.example:443/wado/rs/studies/1.2.3/series/4.5/instances/6.7?retries=2")
    assert (src.scheme, src.netloc, src.root, src.study, src.series, src.instance) == (
        "https", "pacs.example:443", "/wado/rs", "1.2.3", "4.5", "6.7")
    assert src.settings.retries == 2 and src.http("studies") == "https://pacs.example:443/wado/rs/studies"
    assert dicomweb.Source.parse(src.url()) == src
    cfg = _recipe("dicomweb.modalities_in_study=[CT,DX]", "dicomweb.body_part=CHEST", "dicomweb.study_date=20240101-",
                  "dicomweb.page_size=7").dicomweb
    resolved = dicomweb.Source.parse(dicomweb.resolve("dicomweb+http://h:1/dicom-web?StudyDate=2023", cfg))
    assert dict(resolved.study_filters()) == {"StudyDate": "2023", "ModalitiesInStudy": "CT,DX"}  # the URL's own wins
    assert dict(resolved.series_filters()) == {"BodyPartExamined": "CHEST"}
    assert resolved.settings.page_size == 7
    with pytest.raises(ConfigError) as e:
        dicomweb.Source.parse(f"dicomweb+http://{USER}:{PASSWORD}@h:1/dicom-web")
    assert PASSWORD not in str(e.value)
    with pytest.raises(Exception):
        _recipe("dicomweb.study_date=2024-01-01")


def test_qido_pages_over_more_studies_than_one_page(orthanc, corpus):
    orthanc.clear()
    orthanc.upload(_files(corpus.dicom_dir))
    src = _source(orthanc.url, orthanc.credentials, "dicomweb.page_size=3")
    dicomweb.reset_stats(src)
    paged, _ = storage.scan_dir(src)
    requests = dicomweb.read_stats(src)["requests"]
    whole, _ = storage.scan_dir(_source(orthanc.url, orthanc.credentials))
    assert len(paged) == 12 and [dicomweb.Source.parse(u).study for u in paged] == [
        dicomweb.Source.parse(u).study for u in whole]
    assert requests == 12 // 3 + 1  # 4 full pages, then an empty one ends the listing
    instances = [e for s in paged for e in storage.walk(s)]
    assert len(instances) == len(_files(corpus.dicom_dir)) and all(e.size == -1 and e.skip is None for e in instances)
    # Filters reach the server: a study-level and a series-level one.
    ct_studies, _ = storage.scan_dir(_source(orthanc.url, orthanc.credentials, "dicomweb.modalities_in_study=[CT]"))
    assert len(ct_studies) == 6
    dx = storage.walk(_source(orthanc.url, orthanc.credentials, "dicomweb.modality=[DX]", "dicomweb.page_size=2"))
    assert len(dx) == 6


def test_the_scan_retrieves_each_instance_once_and_the_build_reads_it_from_the_node(orthanc, corpus):
    """WADO-RS has no byte ranges: the scan's one retrieval is the whole instance, kept on this
    node's disk, so the build's read (storage.read_bytes) costs the server no request."""
    files = _files(corpus.dicom_dir)
    orthanc.clear()
    orthanc.upload(files)
    src = _source(orthanc.url, orthanc.credentials)
    instances = [e.url for e in storage.walk(src)]
    dicomweb.reset_stats(src)
    dicomweb.drop_cache(src)
    try:
        _scan_then_build(src, instances, files)
    finally:
        dicomweb.drop_cache(src)  # the phantoms' planted PHI must not stay in the temp dir


def _scan_then_build(src: str, instances: list[str], files: list[str]) -> None:
    from radforge import dicom

    rows = []
    for u in instances:
        with storage.open_head(u) as f:
            rows.append(dicom.scan(u, ingest_size(f), f))
    scanned = dicomweb.read_stats(src)
    assert scanned["requests"] == len(instances) == len(files), scanned
    assert all(r["status"] == "ok" for r in rows)
    with storage.read_ahead(instances):  # the build's read-ahead asks nothing of what is kept
        data = {u: storage.read_bytes(u) for u in instances}
    built = dicomweb.read_stats(src)
    assert built["requests"] == scanned["requests"] and built["cache_hits"] == len(instances)
    assert built["cache_bytes"] == sum(map(len, data.values()))
    assert 0 <= scanned["bytes"] - built["cache_bytes"] <= 512 * len(data)  # multipart boundaries and part headers
    by_sop = {r["sop_uid"]: u for r, u in zip(rows, instances)}
    for path in files[::9]:  # the bytes the build got are the archive's (a sample of them)
        import pydicom

        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dicom.pixel_digest(data[by_sop[sop]], 1 << 30) == dicom.pixel_digest(Path(path).read_bytes(), 1 << 30)
    assert not os.listdir(dicomweb.cache_dir(dicomweb.Source.parse(src).where))  # each taken once
    storage.read_bytes(instances[0])  # a second read is a retrieval again
    assert dicomweb.read_stats(src)["requests"] == scanned["requests"] + 1


def ingest_size(f) -> int:
    from radforge import ingest

    return ingest._size_of(f)


def test_retries_under_faults_return_the_same_bytes(orthanc, corpus):
    """Through the proxy (503, 429, dropped connections, stalls past a 1 s timeout), listing and
    WADO-RS reads finish with the bytes read directly; every injected fault is one counted retry."""
    orthanc.clear()
    orthanc.upload(_files(corpus.dicom_dir)[:20])
    direct = {dicomweb.Source.parse(e.url).instance: storage.read_bytes(e.url)
              for e in storage.walk(_source(orthanc.url, orthanc.credentials))}
    proxy = FaultProxy(orthanc.port, seed=1).start()
    try:
        src = _source(proxy.url, orthanc.credentials, "dicomweb.timeout_s=1", "dicomweb.backoff_s=0.01",
                      "dicomweb.retries=8", "dicomweb.concurrency=4", "dicomweb.page_size=2")
        dicomweb.reset_stats(src)
        urls = [e.url for e in storage.walk(src)]
        with storage.read_ahead(urls):
            got = {dicomweb.Source.parse(u).instance: storage.read_bytes(u) for u in urls}
    finally:
        proxy.stop()
    stats = dicomweb.read_stats(src)
    assert got == direct
    assert sum(proxy.faults.values()) > 0 and stats["retries"] == sum(proxy.faults.values()), (stats, proxy.faults)
    assert stats["requests"] == proxy.forwarded + stats["retries"]
    assert stats.get("retry_http_503", 0) == proxy.faults["503"]


def test_credentials_never_reach_messages_or_logs(orthanc, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(f"username: {USER}\npassword: not-{PASSWORD}\n")
    with pytest.raises(ConfigError) as e:
        storage.check_readable(_source(orthanc.url, str(wrong)))
    assert "HTTP 401" in str(e.value)
    # A bearer token from the environment (Orthanc refuses it: it is not a registered user).
    token = "tok-" + "z9" * 16
    monkeypatch.setenv(dicomweb.TOKEN_ENV, token)
    with pytest.raises(dicomweb.DicomwebError) as e2:
        dicomweb.read(dicomweb.Source.parse(orthanc.url).below(study="1", series="2", instance="3").url())
    proxy = FaultProxy(orthanc.port, rates={"503": 1.0}).start()
    try:
        with pytest.raises(dicomweb.DicomwebError) as e3:
            dicomweb.walk(_source(proxy.url, orthanc.credentials, "dicomweb.retries=2", "dicomweb.backoff_s=0"))
    finally:
        proxy.stop()
    assert "after 2 retries" in str(e3.value)
    texts = [str(e.value), str(e2.value), str(e3.value), repr(e3.value), caplog.text]
    for secret in (PASSWORD, token, b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        assert not any(secret in t for t in texts)


# --------------------------------------------------------------------------- slow tier: one Ray ingest module


def _samples(dest: str) -> dict[str, tuple]:
    from radforge import shardspec

    m = shardspec.read_manifest(dest)
    out = {}
    for raw in shardspec.iter_samples(dest, m):
        array, meta, report = shardspec.decode_sample({k: v for k, v in raw.items() if not k.startswith("__")})
        out[raw["__key__"]] = (array, meta, raw["__url__"].split(dest, 1)[1])
    return out


def _growing_series(root: Path) -> tuple[list[str], list[str]]:
    """A 12-slice CT series of a 7th patient split into its first 9 slices (by position) and the
    last 3, which arrive with the append."""
    import pydicom

    from radforge import phantoms

    info = phantoms.ct_series(root, phantoms.make_study(phantoms.make_patient(50)), n_slices=12, rows=32, cols=32,
                              keep_volume=False)
    paths = sorted(info.paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    return paths[:9], paths[9:]


def test_ingest_through_dicomweb_equals_the_folder_and_appends(ray_cluster, orthanc, corpus, tmp_path, deid_secret):
    """One Orthanc-backed Ray module: (1) the shards ingested through DICOMweb, behind the fault
    proxy, equal those of the same files ingested from a folder, and the retries are counted;
    (2) `--append` after new studies and new slices arrive writes only new shards, supersedes
    the series that grew, keeps version 1 readable, and reconciles per version and in total."""
    import numpy as np

    from radforge import ingest, shardspec

    files = _files(corpus.dicom_dir)
    grown_first, grown_later = _growing_series(tmp_path / "grown")
    first = [f for f in files if "/pt00005/" not in f] + grown_first  # patient 5 arrives later
    later = [f for f in files if "/pt00005/" in f] + grown_later
    orthanc.clear()
    orthanc.upload(first)
    folder = tmp_path / "folder-src"
    for i, f in enumerate(first):
        (folder / f"{i:04d}.dcm").parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f"{i:04d}.dcm")
    recipe = _recipe("shards.target_mb=0.05", f"dicomweb.credentials_file={orthanc.credentials}",
                     "dicomweb.timeout_s=1", "dicomweb.backoff_s=0.01", "dicomweb.retries=8", "dicomweb.page_size=4")
    t = time.time()
    from_folder = ingest.run(str(folder), str(tmp_path / "folder"), recipe, progress=False)
    folder_s = time.time() - t
    proxy = FaultProxy(orthanc.port, seed=3).start()
    try:
        t = time.time()
        web = ingest.run(proxy.url, str(tmp_path / "web"), recipe, progress=False)
        web_s = time.time() - t
    finally:
        proxy.stop()
    a, b = _samples(from_folder.dest), _samples(web.dest)
    assert sorted(a) == sorted(b) and len(a) == 11
    for k in a:
        assert np.array_equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] and a[k][2] == b[k][2]
    assert web.manifest["inputs"] == from_folder.manifest["inputs"]
    assert web.source_stats["retries"] == sum(proxy.faults.values()) > 0, (web.source_stats, proxy.faults)
    # one retrieval per instance: every file the build used came from the scan's copy on this node
    assert web.source_stats["cache_hits"] == web.manifest["inputs"]["used"] > 0, web.source_stats
    print(f"\nFIGURES folder {len(first) / folder_s:.1f} instances/s ({folder_s:.1f} s); dicomweb via fault proxy "
          f"{len(first) / web_s:.1f} instances/s ({web_s:.1f} s); faults {dict(proxy.faults)}; stats {web.source_stats}")

    # (2) Append: patient 5's two studies and the grown series' last 3 slices arrive.
    v1 = web.manifest
    old_bytes = {s["path"]: (Path(web.dest) / s["path"]).read_bytes() for s in v1["shards"]}
    orthanc.upload(later)
    t = time.time()
    v2 = ingest.run(orthanc.url, web.dest, recipe, progress=False, append=True).manifest
    append_s = time.time() - t
    assert v2["version"] == 2 and shardspec.read_manifest(web.dest, version=1) == v1
    assert shardspec.read_manifest(web.dest, version=2) == v2 == shardspec.read_manifest(web.dest)
    assert v2["shards"][: len(v1["shards"])] == v1["shards"]  # old shards listed unchanged…
    assert all((Path(web.dest) / p).read_bytes() == data for p, data in old_bytes.items())  # …and never rewritten
    added = v2["shards"][len(v1["shards"]):]
    assert added and all("-v0002-" in s["path"] and s["version"] == 2 for s in added)
    mine = v2["versions"][-1]["inputs"]
    assert (mine["new"], mine["replanned"]) == (len(later), len(grown_first)) and mine["seen"] == len(later) + len(grown_first)
    assert shardspec.reconciles(mine) and shardspec.reconciles(v2["inputs"])
    assert v2["inputs"]["seen"] == v1["inputs"]["seen"] + len(later)
    assert v2["inputs"]["used"] == v1["inputs"]["used"] + len(later)
    (gone,) = v2["superseded"]
    after = _samples(web.dest)
    old_sample, new_sample = b[gone["key"]], after[gone["key"]]
    assert old_sample[1]["source_shape"][0] == 9 and new_sample[1]["source_shape"][0] == 12
    # same patient → same pseudonym and split; every key once; totals count live samples
    assert (old_sample[1]["patient"], old_sample[1]["split"]) == (new_sample[1]["patient"], new_sample[1]["split"])
    assert len(after) == v2["totals"]["samples"] == 11 + 2
    again = ingest.run(orthanc.url, web.dest, recipe, progress=False, append=True)
    assert again.noop and again.manifest == v2
    print(f"FIGURES append: {len(later)} new + {len(grown_first)} re-planned files in {append_s:.1f} s, "
          f"{len(added)} new shard(s), {len(v2['superseded'])} superseded, inputs v2 {mine}, total {v2['inputs']}")
