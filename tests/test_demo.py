"""The `make demo` path end to end, in its small `--quick` variant: sample corpus → ingest → tiny
CLIP (X-ray) and 3D CLIP (CT) (DeepSpeed ZeRO-2, one Ray Train worker each in --quick; the full demo runs 2 and adds the
MAE and DINO) → export → indexes → evaluation (every protocol, reports) → Ray Serve with both
CLIPs queried over HTTP (an X-ray file, a zipped CT series). One subprocess, as a user runs it.

It builds and ingests its own corpus rather than the session's `ingested_corpus`: stages 1-2 (the
showcase corpus with every ingest edge case, the ingest summary, the montage) are part of what it
checks, and the demo is a separate process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from radforge import phantoms

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    proc = subprocess.run([sys.executable, "-m", "radforge.demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    # Both tests need a finished demo: a failed run errors them (with its output), never lets the
    # privacy scan pass over a half-written folder.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_demo_runs_every_stage_and_writes_every_artifact(demo):
    out, proc = demo
    n = int(re.search(r"\[1/(\d+)\]", proc.stdout).group(1))
    for stage in range(1, n + 1):
        assert f"[{stage}/{n}]" in proc.stdout
    assert "accounting                       yes" in proc.stdout
    for line in ("POST /v1/embed      → 200", "POST /v1/zero-shot  → 200", "POST /v1/retrieve   → 200",
                 "POST /v1/embed (garbage) → 400", "CT CLIP nodule zero-shot AUROC by lesion diameter",
                 "targets on the test split"):
        assert line in proc.stdout
    # The CT CLIP answers a zipped CT series with the three CT findings.
    ct = re.search(r"POST /v1/zero-shot \(CT series zip, [^)]+\) → (\d+): (.*)", proc.stdout)
    assert ct and ct.group(1) == "200", proc.stdout[-2000:]
    assert {p.split()[0] for p in ct.group(2).split(", ")} == {"nodule", "effusion", "cardiomegaly"}
    for name in ("clip-xray", "clip-ct"):  # --quick trains the two CLIPs (MAE and DINO in the full demo)
        for rel in (f"model-{name}/model.safetensors", f"model-{name}/model.json", f"reports/{name}"):
            assert (out / rel).exists(), rel
        assert f"report: {out / 'reports' / name}" in proc.stdout
    for rel in ("shards/manifest.json", "montage.png", "model-clip-xray/tokenizer", "model-clip-ct/tokenizer",
                "index-clip-xray", "index-clip-ct", "runs/tiny-clip-xray/loss.png", "runs/tiny-clip-ct/loss.png"):
        assert (out / rel).exists(), rel
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    for name, image in (("clip-xray", "xray"), ("clip-ct", "ct")):
        model = json.loads((out / f"model-{name}" / "model.json").read_text())
        assert model["kind"] == "clip" and model["image"] == image
        assert model["profile"]["profile_id"] == manifest["profile"]["profile_id"]


def test_nothing_the_demo_prints_or_publishes_identifies_a_patient(demo):
    """Every identifying text value in the generated corpus carries the PHI marker; outside the
    source corpus and the private ledger, no byte the demo wrote or printed may contain it."""
    out, proc = demo
    marker = phantoms.PHI_MARKER.encode()
    assert marker not in proc.stdout.encode() and marker not in proc.stderr.encode()
    private = {out / "corpus", out / "shards.private"}
    checked = 0
    for p in out.rglob("*"):
        if p.is_file() and not any(parent in private for parent in p.parents):
            assert marker not in p.read_bytes(), p.relative_to(out)
            checked += 1
    assert checked > 20
