# radforge — set-up, tests, demo, benchmarks, cluster targets.
# `make test`, `make test-fast` and `make demo` work on a fresh clone: both create .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU machines pin the CPU torch build through constraints.txt (never a multi-GB CUDA wheel).
# GPU users: `make setup CONSTRAINTS=` and install their CUDA build of torch first.
CONSTRAINTS ?= constraints.txt
STAMP  := $(VENV)/.installed
# PIP_CONSTRAINT (not -c) so that build environments of source packages honour the pin too.
PIN    := $(if $(CONSTRAINTS),PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)))

DEMO_DIR ?= var/demo
PYTEST_ARGS ?=
# test-fast's pytest-xdist processes (the Ray-free tier's tests are isolated; 1 = one process).
TEST_WORKERS ?= 2

.PHONY: setup sysdeps test test-fast demo bench bench-gpu lint clean ray-job-ingest help
.PHONY: cluster-local submit-ingest submit-train deploy status stop image-cpu image-cuda images

help:
	@echo "make setup      create .venv and install radforge with test extras"
	@echo "make test-fast  the Ray-free unit tier (pytest -m 'not slow' on TEST_WORKERS=2 processes; under 2 minutes on 2 cores)"
	@echo "make test       everything, Ray / DeepSpeed / Serve end to end included (what CI runs; under 15 minutes on 2 cores)"
	@echo "make demo       sample corpus → ingest → tiny MAE + CLIP → evaluation → export → Serve + HTTP queries ($(DEMO_DIR))"
	@echo "make bench      run the ingest, stream, train and serve benchmarks (ratios measured side by side)"
	@echo "make bench-gpu  on a CUDA machine: the GPU recipes' bf16 + nccl path (MFU, data-wait, memory vs DeepSpeed's estimate, GPU decode), a few minutes"
	@echo "make cluster-local | submit-ingest | submit-train | deploy | status | stop   (see cluster/README.md)"

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, from the pinned build, so nothing else can pull a different one.
	$(PIN) $(PIP) install --quiet torch
	$(PIN) $(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

# System packages the full tier drives as real peers: Chromium (the evaluation report is opened
# headless) and Orthanc with its DICOMweb plugin (the DICOMweb source is ingested from it).
# Installed with apt-get when missing and running as root; otherwise a clear message and the
# tests that need them fail naming the package.
SYSDEPS_BIN := chromium:chromium Orthanc:orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb
sysdeps:
	@missing=""; for pair in $(SYSDEPS_BIN); do f=$${pair%%:*}; pkg=$${pair##*:}; \
	  if ! command -v $$f >/dev/null 2>&1 && [ ! -e $$f ]; then missing="$$missing $$pkg"; fi; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	  else \
	    echo "radforge: system packages missing:$$missing — install them (Debian/Ubuntu: sudo apt-get install$$missing);" \
	         "the tests that drive them will fail until then" >&2; \
	  fi; \
	fi

# Tiers (tests/conftest.py): `slow` = needs Ray (the ray_cluster fixture, or marked by its module);
# a test outside `slow` that starts Ray fails, so nothing slow hides in the fast tier.
# `make test` = the fast tier on TEST_WORKERS processes, then the Ray tier on RAY_TIER_WORKERS
# (1 = one process): a test module is one work unit, longest first; each worker has its own
# session Ray cluster, the corpus is ingested once per run (tests/conftest.py): the union is every test.
XDIST := $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal)
RAY_TIER_WORKERS ?= 2
RAY_XDIST := $(if $(filter-out 1,$(RAY_TIER_WORKERS)),-n $(RAY_TIER_WORKERS) --dist loadscope --no-loadscope-reorder)
# Bytecode is written during tests even where the environment says not to (PYTHONDONTWRITEBYTECODE):
# otherwise every pytest process re-rewrites the test modules and the plugins' (hypothesis, anyio),
# ~8-10 CPU s per process, and every Ray worker recompiles each radforge module changed since install.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest
test: $(STAMP) sysdeps
	$(PYTEST) -m "not slow" $(XDIST) $(PYTEST_ARGS)
	$(PYTEST) -m slow $(RAY_XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(XDIST) $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m radforge.demo --out $(DEMO_DIR)

bench: $(STAMP)
	for b in ingest stream train serve; do $(VENV)/bin/radforge bench $$b || exit 1; done

# Needs a CUDA build of torch (`make setup CONSTRAINTS=`); refuses with "no CUDA device" otherwise.
# BENCH_GPU_ARGS: e.g. --json, --peak-tflops 989, --cpu-dry-run (the same path on CPU, for CI).
BENCH_GPU_ARGS ?=
bench-gpu: $(STAMP)
	$(VENV)/bin/radforge bench gpu $(BENCH_GPU_ARGS)

lint: $(STAMP)
	$(PY) -m compileall -q platform jobs tests

# --------------------------------------------------------------------------- cluster
# Thin wrappers over `ray job submit` / `serve deploy` (cluster/README.md). RAY_ADDRESS is the
# dashboard URL of any Ray cluster: `make cluster-local`, one GPU box, or KubeRay behind a
# port-forward. Jobs run `python` on the cluster, so local paths are made absolute here (the job's
# working directory is an uploaded copy of this one); URLs (s3://…) pass through unchanged.
VERSION        := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' platform/radforge/__init__.py)
IMAGE          ?= ghcr.io/radforge/radforge
IMAGE_TAG      ?= $(VERSION)
RAY            := $(abspath $(VENV))/bin/ray
SERVE          := $(abspath $(VENV))/bin/serve
DASHBOARD_PORT ?= 8265
RAY_PORT       ?= 6379
RAY_ADDRESS    ?= http://127.0.0.1:$(DASHBOARD_PORT)
# cluster-local's state (sockets, logs, head.pid); short, since unix socket paths are limited.
RAY_TMP        ?= /tmp/radforge-ray
NUM_CPUS       ?=
RAY_START_ARGS ?=
SOURCE         ?=
DEST           ?=
RECIPE         ?= jobs/recipes/tiny-clip-xray.yaml
# Training data / outputs (override the recipe when set; local paths become absolute, see above).
SHARDS         ?=
CHECKPOINTS    ?=
RUNS           ?=
MODEL          ?= $(DEMO_DIR)/model
SERVE_CONFIG   ?= cluster/serve-config.yaml
SERVE_HOST     ?= 127.0.0.1
SERVE_PORT     ?= 8000
INGEST_ARGS    ?= $(ARGS)
TRAIN_ARGS     ?=
# extra `ray job submit` options, e.g. --no-wait or --runtime-env-json='{"env_vars": {...}}'
JOB_ARGS       ?=
# New Ray heads turn token auth on (token in ~/.ray/auth_token); clients must send it too.
export RAY_AUTH_MODE ?= token
url = $(if $(findstring ://,$(1)),$(1),$(abspath $(1)))
# True when head.pid names our `ray start` (a stale file's pid may belong to anything else now).
# (-ww: the whole command line even where COLUMNS is set, as in pytest-xdist workers: ps cuts to it)
head_alive = test -f $(RAY_TMP)/head.pid && ps -ww -o args= -p $$(cat $(RAY_TMP)/head.pid) 2>/dev/null | grep -q -- '--temp-dir=$(RAY_TMP)'
need = $(if $($(1)),,$(error $(1)= is required, e.g. make $@ $(1)=$(2)))

# A Ray head on this machine, in the background, with the venv's python first on PATH (job
# entrypoints say `python`). `stop` ends exactly this head (its pid), never other Ray instances
# (`ray stop` would kill every Ray on the machine). No drain wait on SIGTERM: nothing to drain to.
# RAY_ADDRESS in its environment: Ray's own helpers inside jobs (Train's placement-group cleaner,
# state API calls) look for "the" local cluster and fail when a machine runs several.
# Serve's ingress: HAProxy when its binary is installed (radforge.serve.ingress_env prints which,
# and why), else Serve's proxy actor; INGRESS=proxy opts out, INGRESS=haproxy requires it.
INGRESS        ?= auto
cluster-local:
	@test -x $(RAY) || { echo "no $(RAY): run make setup first"; exit 2; }
	@mkdir -p $(RAY_TMP)
	@$(RAY) get-auth-token --generate > /dev/null  # creates ~/.ray/auth_token only if there is none
	@if $(head_alive); then \
	  echo "a head is already running (pid $$(cat $(RAY_TMP)/head.pid)); make stop first"; exit 2; fi
	ingress=$$(RADFORGE_INGRESS=$(INGRESS) $(PY) -m radforge.serve ingress-env) || exit 2; \
	env $$ingress PATH=$(abspath $(VENV))/bin:$$PATH RAY_ADDRESS=127.0.0.1:$(RAY_PORT) RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
	  setsid nohup $(RAY) start --head --block --disable-usage-stats \
	  --port=$(RAY_PORT) --dashboard-port=$(DASHBOARD_PORT) --include-dashboard=true \
	  --temp-dir=$(RAY_TMP) $(if $(NUM_CPUS),--num-cpus=$(NUM_CPUS)) $(RAY_START_ARGS) \
	  > $(RAY_TMP)/head.log 2>&1 < /dev/null & echo $$! > $(RAY_TMP)/head.pid
	@for i in $$(seq 90); do \
	  if $(RAY) job list --address $(RAY_ADDRESS) > /dev/null 2>&1; then echo "Ray head up: RAY_ADDRESS=$(RAY_ADDRESS)"; exit 0; fi; \
	  kill -0 $$(cat $(RAY_TMP)/head.pid) 2>/dev/null || break; sleep 1; done; \
	  tail -n 20 $(RAY_TMP)/head.log; echo "Ray head did not come up (log: $(RAY_TMP)/head.log)"; exit 1

submit-ingest:
	$(call need,SOURCE,s3://archive/ct/)$(call need,DEST,s3://lake/shards/ct)
	$(RAY) job submit --address $(RAY_ADDRESS) --working-dir . $(JOB_ARGS) -- \
	  python -m jobs.ingest $(call url,$(SOURCE)) $(call url,$(DEST)) $(INGEST_ARGS)

# Kept for old scripts: same as submit-ingest (ARGS = INGEST_ARGS).
ray-job-ingest: submit-ingest

submit-train:
	$(RAY) job submit --address $(RAY_ADDRESS) --working-dir . $(JOB_ARGS) -- \
	  python -m jobs.train --recipe $(RECIPE) $(if $(SHARDS),--set data.shards=$(call url,$(SHARDS))) \
	  $(if $(CHECKPOINTS),--set checkpoint.storage_path=$(call url,$(CHECKPOINTS))) \
	  $(if $(RUNS),--set output_dir=$(call url,$(RUNS))) $(TRAIN_ARGS)

# serve deploy of SERVE_CONFIG with MODEL, SERVE_HOST and SERVE_PORT filled in (rendered to
# $(RAY_TMP)); it returns once the cluster accepted the config: `make status` shows it come up.
deploy:
	@mkdir -p $(RAY_TMP)
	$(PY) -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); m, h, p = sys.argv[2:]; \
	  c["http_options"].update(host=h, port=int(p)); [a["args"].update(model=m) for a in c["applications"]]; \
	  yaml.safe_dump(c, sys.stdout, sort_keys=False)' \
	  $(SERVE_CONFIG) $(call url,$(MODEL)) $(SERVE_HOST) $(SERVE_PORT) > $(RAY_TMP)/serve-config.yaml
	$(SERVE) deploy --address $(RAY_ADDRESS) $(RAY_TMP)/serve-config.yaml

# One line per job (`ray job list` prints every failed job's whole log), then Serve's status.
status:
	@$(PY) -c 'import sys; from ray.job_submission import JobSubmissionClient as C; \
	  [print(j.submission_id, j.status.value, j.entrypoint[:110]) for j in sorted(C(sys.argv[1]).list_jobs(), key=lambda j: j.start_time or 0)]' \
	  $(RAY_ADDRESS)
	@$(SERVE) status --address $(RAY_ADDRESS)

# The head cluster-local started: SIGTERM to its `ray start --block`, which takes its gcs, raylet,
# workers and Serve with it. Without one (a remote RAY_ADDRESS): Serve's applications down.
stop:
	@if $(head_alive); then pid=$$(cat $(RAY_TMP)/head.pid); \
	  kill -TERM $$pid; for i in $$(seq 30); do kill -0 $$pid 2>/dev/null || break; sleep 1; done; \
	  rm -f $(RAY_TMP)/head.pid; echo "stopped the local Ray head (pid $$pid) and everything on it"; \
	  else rm -f $(RAY_TMP)/head.pid; $(SERVE) shutdown --yes --address $(RAY_ADDRESS); fi

# Container images (cluster/Dockerfile): the names the manifests in cluster/ use.
image-cpu:
	docker build -f cluster/Dockerfile --build-arg FLAVOR=cpu \
	  --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t $(IMAGE):$(IMAGE_TAG)-cpu .

image-cuda:
	docker build -f cluster/Dockerfile --build-arg FLAVOR=cu128 \
	  --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t $(IMAGE):$(IMAGE_TAG)-cuda .

images: image-cpu image-cuda

clean:
	rm -rf $(VENV) var .pytest_cache
