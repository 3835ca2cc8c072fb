"""DICOMweb vs folder (`radforge bench dicomweb`): the same corpus ingested from a folder and
through a real Orthanc's DICOMweb plugin, alternately, on one warm local Ray
"""

from __future__ import annotations

import os
import shutil
import time

from radforge.bench._common import _ct_corpus, _warm_ray, _workdir


ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    """A throw-away Orthanc on 127.0.0.1 (free port, storage under `root`, DICOMweb plugin on,
    HTTP basic auth with one user, whose credentials file is `credentials`). Debian packages
    `orthanc` + `orthanc-dicomweb` (`make sysdeps`). Used by this benchmark and the tests."""

    def __init__(self, root: str, user: str = "radforge-bench", password: str = "bench-" + "pw" * 8):
        import json
        import socket
        import subprocess

        if not (os.path.exists(ORTHANC_BIN) and os.path.exists(ORTHANC_DICOMWEB_PLUGIN)):
            from radforge.errors import ConfigError

            raise ConfigError("Orthanc and its DICOMweb plugin are not installed (apt-get install orthanc orthanc-dicomweb; make sysdeps)")
        os.makedirs(root, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.user, self.password = user, password
        cfg = {"Name": "radforge", "StorageDirectory": os.path.join(root, "db"), "IndexDirectory": os.path.join(root, "db"),
               "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
               "AuthenticationEnabled": True, "RegisteredUsers": {user: password}, "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
               "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpThreadsCount": 16, "StableAge": 1, "SaveJobs": False}
        with open(os.path.join(root, "orthanc.json"), "w") as f:
            json.dump(cfg, f)
        self.credentials = os.path.join(root, "dicomweb-credentials.yaml")
        with open(self.credentials, "w") as f:
            f.write(f"username: {user}\npassword: {password}\n")
        self._log_path = os.path.join(root, "orthanc.log")
        self._log = open(self._log_path, "wb")
        self.proc = subprocess.Popen([ORTHANC_BIN, os.path.join(root, "orthanc.json")], stdout=self._log, stderr=self._log)
        deadline = time.time() + 30
        while True:
            try:
                self.rest("GET", "/system")
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    with open(self._log_path, errors="replace") as f:
                        raise RuntimeError(f"Orthanc did not start: {f.read()[-2000:]}") from None
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"

    def rest(self, method: str, path: str, data: bytes | None = None):
        import base64
        import json
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def upload(self, paths) -> int:
        """POST /instances, one file at a time (Orthanc's REST API) → files uploaded."""
        n = 0
        for p in paths:
            with open(p, "rb") as f:
                self.rest("POST", "/instances", f.read())
            n += 1
        return n

    def clear(self) -> None:
        for study in self.rest("GET", "/studies"):
            self.rest("DELETE", f"/studies/{study}")

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def bench_dicomweb(*, workdir: str | None, series: int, slices: int, size: int, syntax: str, repeats: int = 2) -> dict:
    """Instances/s of one corpus ingested from a folder and over DICOMweb (Orthanc), alternately,
    `repeats` times each on one warm 2-CPU local Ray; the best of each side and their ratio."""
    import ray

    from radforge import config, ingest
    from radforge.config import IngestRecipe

    with _workdir(workdir) as root:
        corpus, files = _ct_corpus(root, series=series, slices=slices, size=size, syntax=syntax)
        server = Orthanc(os.path.join(root, "orthanc"))
        try:
            t = time.perf_counter()
            server.upload(files)
            upload_s = time.perf_counter() - t
            os.environ.setdefault("RADFORGE_DEID_SECRET", "bench-secret-" + "x" * 32)
            recipe = config.load(IngestRecipe, None, [f"dicomweb.credentials_file={server.credentials}"])
            started = not ray.is_initialized()
            if started:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            try:
                cold = _warm_ray(2, root, recipe)
                runs: dict[str, list] = {"folder": [], "dicomweb": []}
                for i in range(repeats):
                    for side, src in (("folder", corpus), ("dicomweb", server.url)):
                        dest = os.path.join(root, f"{side}-{i}")
                        t = time.perf_counter()
                        r = ingest.run(src, dest, recipe, progress=False)
                        runs[side].append({"s": time.perf_counter() - t, "samples": r.manifest["totals"]["samples"],
                                           "stats": r.source_stats})
                        shutil.rmtree(dest, ignore_errors=True)
                        shutil.rmtree(dest + ".private", ignore_errors=True)
            finally:
                if started:
                    ray.shutdown()
        finally:
            server.stop()
    best = {side: min(r["s"] for r in rs) for side, rs in runs.items()}
    return {"benchmark": "dicomweb", "instances": len(files), "series": series, "slices": slices, "size": size,
            "syntax": syntax, "upload_s": round(upload_s, 2), "cold_start_s": round(cold, 2),
            "folder_instances_per_s": round(len(files) / best["folder"], 1),
            "dicomweb_instances_per_s": round(len(files) / best["dicomweb"], 1),
            "dicomweb_vs_folder": round(best["folder"] / best["dicomweb"], 3),
            "requests": runs["dicomweb"][-1]["stats"].get("requests", 0),
            # build reads served by the copy the header scan retrieved (radforge.dicomweb._InstanceCache)
            "build_reads_from_scan": runs["dicomweb"][-1]["stats"].get("cache_hits", 0),
            "retries": runs["dicomweb"][-1]["stats"].get("retries", 0),
            "runs": {side: [round(r["s"], 2) for r in rs] for side, rs in runs.items()},
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def format_dicomweb(r: dict) -> str:
    return "\n".join([
        f"radforge bench dicomweb: {r['instances']} instances ({r['series']} CT series × {r['slices']} slices, "
        f"{r['size']}², {r['syntax']}), Orthanc on 127.0.0.1, 2-CPU local Ray (warm-up {r['cold_start_s']} s)",
        f"  folder     {r['folder_instances_per_s']:>8.1f} instances/s   runs {r['runs']['folder']} s",
        f"  DICOMweb   {r['dicomweb_instances_per_s']:>8.1f} instances/s   runs {r['runs']['dicomweb']} s "
        f"({r['requests']} requests, {r['retries']} retries; {r.get('build_reads_from_scan', 0)} build reads served by "
        f"the scan's retrieval)",
        f"  ratio      {r['dicomweb_vs_folder']:.3f}× (DICOMweb / folder throughput)   load avg {r['load_avg']}",
    ])
