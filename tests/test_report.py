"""The evaluation report (`radforge evaluate --report DIR`): index.html opened in headless
Chromium (Debian's `chromium`; `make test` installs it), every section rendered, every picture
decoded, nothing fetched from the network."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from radforge import cli, evaluate, viz
from radforge.config import EvalConfig

from test_evaluate import _demographics, _loaded, _tiny_mae, _write_shards

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Refs(html.parser.HTMLParser):
    """Every URL the page references (src, href, srcset) and every element id."""

    def __init__(self):
        super().__init__()
        self.urls, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "srcset", "data", "action", "poster") and v:
                self.urls.append(v)
            if k == "id":
                self.ids.add(v)


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # No network: an unroutable proxy for every scheme, and host resolution off, so a stray
    # external reference would fail rather than silently load (and the static check names it).
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
                           f"--user-data-dir={cwd / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    shards = _write_shards(root / "shards", {"train": 64, "val": 24, "test": 80}, extra=_demographics)
    cfg = EvalConfig(bootstrap=30, few_shot_seeds=2, corruptions=["gaussian_noise", "gamma"], severities=[1, 3, 5])
    result = evaluate.run(_loaded(_tiny_mae()), shards, split="test", protocols=("all",), report_dir=str(root / "out"), cfg=cfg)
    return root, result


def test_report_files_are_self_contained(report):
    root, result = report
    index = Path(result["report"])
    assert index == root / "out" / "index.html"
    page = index.read_text()
    refs = _Refs()
    refs.feed(page)
    assert set(viz.REPORT_SECTIONS) <= refs.ids
    assert refs.urls, "the report links its pictures"
    for url in refs.urls:  # relative files beside index.html, never a URL with a scheme or host
        assert "://" not in url and not url.startswith("//") and not url.startswith("/"), url
        assert (index.parent / url).is_file(), url
    assert "url(" not in page and "@import" not in page
    pngs = {p.name for p in index.parent.glob("*.png")}
    assert {"robustness.png", "fairness_sex.png", "fairness_age_band.png", "reliability_linear_probe.png"} <= pngs
    assert {f"roc_{f}.png" for f in ("nodule", "effusion", "cardiomegaly")} <= pngs


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it: make sysdeps)")
def test_report_renders_in_headless_chromium(report):
    root, result = report
    index = Path(result["report"])
    r = _chromium("--dump-dom", index.as_uri(), cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    refs = _Refs()
    refs.feed(dom)
    assert set(viz.REPORT_SECTIONS) <= refs.ids, refs.ids
    n_img = dom.count("<img ")
    assert n_img >= 7 and f"{n_img}/{n_img} images rendered" in dom  # the page's own load-time count
    for text in ("Subgroup fairness", "too small", "Corruption robustness", "gaussian_noise", "ROC curves per finding",
                 "Calibration", "few_shot", "knn_k"):
        assert text in dom, text
    shot = root / "shot.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1200,2400", index.as_uri(), cwd=root)
    assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]


def test_cli_writes_the_report_and_json(report, tmp_path, capsys):
    """The CLI on an exported model: --protocol list, --report, --json (one object on stdout)."""
    from radforge import checkpoint, kinds
    from radforge.config import ModelConfig
    from radforge.transforms import Profile

    from radforge import models

    root, _ = report
    lm = _loaded(_tiny_mae())  # for its view
    torch.manual_seed(0)
    cfg = ModelConfig(kind="mae", preset="tiny", patch_xray=8, decoder_width=32, decoder_depth=1)
    mae = models.build(cfg, "xray", kinds.XRAY.view(lm.view).input_shape, None, pretrained=False)
    out = checkpoint.write_model(str(tmp_path / "mae"), mae, image="xray", model_cfg=cfg, view=lm.view, profile=Profile(),
                                 model_id="mae-t", findings=[])
    rc = cli.main(["evaluate", out, str(root / "shards"), "--protocol", "knn,calibration,zero_shot", "--report",
                   str(tmp_path / "rep"), "--json", "--no-progress", "--set", "bootstrap=20"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["protocols"]) == {"knn", "calibration"} and "zero_shot" in result["skipped"]
    assert os.path.isfile(result["report"]) and "zero_shot not run" in Path(result["report"]).read_text()
    assert cli.main(["evaluate", out, str(root / "shards"), "--protocol", "bogus"]) == 2  # one line, exit 2
