"""radforge.evaluate: AUROC, bootstrap CIs, recall@K, linear probe, and whole evaluations of
tiny MAE / CLIP models on synthetic data whose findings are visible and stated in the text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from radforge.transforms import Profile
from radforge import evaluate, kinds
from radforge.config import EvalConfig, TextConfig
from radforge.models import text as text_mod
from radforge.models.clip import CLIP
from radforge.models.mae import MAE
from radforge.models.vit import ViT

FINDINGS = ["nodule", "effusion", "cardiomegaly"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; spinning OpenMP threads only hurt on a shared 2-core box
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ metrics


def _brute_auroc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auroc_known_values():
    assert evaluate.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert evaluate.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert evaluate.auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    assert evaluate.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert evaluate.auroc([0.1, 0.9, 0.3, 0.8], [0, float("nan"), 1, 1]) == 1.0  # NaN label ignored
    assert math.isnan(evaluate.auroc([0.1, 0.2], [1, 1]))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for n in (5, 40, 200):
        s = rng.integers(0, 8, n).astype(float)  # many ties
        y = rng.integers(0, 2, n)
        y[0], y[1] = 0, 1
        assert evaluate.auroc(s, y) == pytest.approx(_brute_auroc(s, y), abs=1e-12)


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    s = y + rng.normal(0, 1.0, 120)
    a = evaluate.auroc(s, y)
    lo, hi = evaluate.bootstrap_ci(s, y, n=300, seed=3)
    assert lo < a < hi and 0.5 < lo and hi - lo < 0.3
    assert (lo, hi) == evaluate.bootstrap_ci(s, y, n=300, seed=3)
    assert all(math.isnan(v) for v in evaluate.bootstrap_ci(s, y, n=0))
    assert all(math.isnan(v) for v in evaluate.bootstrap_ci([1, 2], [0, 0]))


def test_recall_at_k():
    r = evaluate.recall_at_k(np.eye(12), ks=(1, 5, 10))
    assert r == {"image_to_text": {"1": 1.0, "5": 1.0, "10": 1.0}, "text_to_image": {"1": 1.0, "5": 1.0, "10": 1.0}}
    # constant similarity: ties count against the model, so no free perfect score
    flat = evaluate.recall_at_k(np.ones((12, 12)), ks=(1, 12))
    assert flat["image_to_text"] == {"1": 0.0, "12": 1.0}
    # image 0 prefers text 1; text 1 is the same report as text 0 -> still a hit with groups
    sim = np.eye(4)
    sim[0, 1] = 2.0
    assert evaluate.recall_at_k(sim, ks=(1,))["image_to_text"]["1"] == 0.75
    assert evaluate.recall_at_k(sim, ks=(1,), groups=["a", "a", "b", "c"])["image_to_text"]["1"] == 1.0
    # asymmetric: rows = images; text 2's best image is 3
    sim = np.eye(4)
    sim[3, 2] = 5.0
    r = evaluate.recall_at_k(sim, ks=(1, 2))
    assert r["image_to_text"]["1"] == 0.75 and r["text_to_image"]["1"] == 0.75 and r["text_to_image"]["2"] == 1.0
    with pytest.raises(ValueError):
        evaluate.recall_at_k(np.ones((2, 3)))


def test_linear_probe_separates_linear_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0)], 1).astype(float)
    y[::7, 1] = np.nan  # missing labels are masked out of the fit
    scores = evaluate.linear_probe(x[:150], y[:150], x[150:], y[150:])
    assert scores.shape == (50, 2)
    assert evaluate.auroc(scores[:, 0], y[150:, 0]) > 0.95 and evaluate.auroc(scores[:, 1], y[150:, 1]) > 0.95


# ------------------------------------------------------------------------------------ models

SIZE = 16


def _synthetic(n: int, seed: int):
    """Images where each finding has its own look (nodule: small bright blob, effusion: dark
    basal band, cardiomegaly: large central block), reports that state every finding as the
    prompts phrase it (random order), labels with some NaN (uncertain)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, len(FINDINGS))).astype(float)
    images = rng.normal(0, 0.3, (n, 1, SIZE, SIZE)).astype(np.float32)
    texts = []
    for i in range(n):
        if labels[i, 0]:
            r, c = rng.integers(1, 5, 2)
            images[i, 0, r:r + 3, c:c + 3] += 1.5
        if labels[i, 1]:
            images[i, 0, 12:, :] -= 1.5
        if labels[i, 2]:
            images[i, 0, 5:13, 6:14] += 1.0
        parts = [f"{f} is present." if labels[i, j] else f"no {f}." for j, f in enumerate(FINDINGS)]
        rng.shuffle(parts)
        texts.append(" ".join(parts))
    labels[rng.random(labels.shape) < 0.05] = np.nan
    return torch.from_numpy(images), texts, torch.from_numpy(labels)


def _batches(images, texts, labels, bs=16):
    for s in range(0, len(images), bs):
        yield {"image": images[s:s + bs], "text": texts[s:s + bs], "labels": labels[s:s + bs],
               "key": [f"k{i}" for i in range(s, min(s + bs, len(images)))], "modality": ["DX"] * len(images[s:s + bs])}


def test_clip_learns_zero_shot_on_synthetic_pairs():
    torch.manual_seed(0)
    images, texts, labels = _synthetic(256, seed=0)
    tok = text_mod.train_tokenizer(texts, TextConfig(vocab_size=200, max_len=24))
    model = CLIP(ViT((1, SIZE, SIZE), (8, 8), 32, 2, 2), text_mod.SmallTextEncoder(tok, TextConfig(width=32, depth=1, heads=2, max_len=24)),
                 embed_dim=32)
    cfg = EvalConfig(bootstrap=50)
    test_images, test_texts, test_labels = _synthetic(96, seed=1)
    before = evaluate.run_on_batches(model, _batches(test_images, test_texts, test_labels), cfg, findings=FINDINGS)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(150):  # measured mean AUROC 0.264 untrained -> 0.977 (0.932 at 100 steps, 1.000 at 300)
        idx = torch.randint(0, len(images), (32,), generator=g)
        loss = model({"image": images[idx], "text": [text_mod.sample_sentences(texts[i], rng) for i in idx]})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = evaluate.run_on_batches(model, _batches(test_images, test_texts, test_labels), cfg, findings=FINDINGS)
    assert model.training  # restored after evaluation
    assert result["kind"] == "clip" and result["n"] == 96
    assert result["mean_auroc"] > 0.85, (before["mean_auroc"], result["per_finding"])
    for f, v in result["per_finding"].items():
        assert v["ci95"][0] <= v["auroc"] <= v["ci95"][1]
        assert v["n_pos"] + v["n_neg"] <= 96
    assert result["recall"]["image_to_text"]["10"] > before["recall"]["image_to_text"]["10"]
    json.dumps(result)  # JSON-able
    table = evaluate.format_table({**result, "split": "test"})
    assert "nodule" in table and "mean" in table and "R@1" in table
    assert not any(t in table for t in test_texts)  # aggregate numbers only


def test_mae_recon_loss_and_linear_probe():
    torch.manual_seed(0)
    model = MAE(ViT((1, SIZE, SIZE), (4, 4), 32, 2, 2), decoder_width=32, decoder_depth=1)
    train = _synthetic(128, seed=2)
    test = _synthetic(64, seed=3)
    cfg = EvalConfig(bootstrap=20, max_samples=48)
    r1 = evaluate.run_on_batches(model, _batches(*test), cfg, findings=FINDINGS, train_batches=_batches(*train))
    r2 = evaluate.run_on_batches(model, _batches(*test), cfg, findings=FINDINGS, train_batches=_batches(*train))
    assert r1["kind"] == "mae" and r1["n"] == 48  # max_samples caps the split
    assert r1["recon_loss"] == r2["recon_loss"] > 0  # seeded masks: reproducible
    # bright blocks are linearly readable even from a random encoder's mean-pooled features
    assert r1["linear_probe"]["mean_auroc"] > 0.8 and r1["mean_auroc"] == r1["linear_probe"]["mean_auroc"]
    json.dumps(r1)
    assert "reconstruction loss" in evaluate.format_table(r1)
    with pytest.raises(ValueError, match="label columns"):
        evaluate.run_on_batches(model, _batches(*test), cfg, findings=["nodule"])


# ------------------------------------------------------------------------------- run on shards


def _write_shards(dest, splits: dict[str, int], *, extra=None, labelled: bool = True, ct: bool = False) -> str:
    """X-ray shards in the shard format (shardspec) from `_synthetic`: uint16 images, reports,
    labels (none when `labelled` is false); one shard per split. `extra(k, split)`: more metadata."""
    import hashlib
    import io
    import os
    import tarfile

    from radforge import shardspec

    recs, k = [], 0
    for si, (split, n) in enumerate(splits.items()):
        images, texts, labels = _synthetic(n, seed=10 + si)
        os.makedirs(os.path.join(dest, split), exist_ok=True)
        path = shardspec.shard_name(split, 0)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(n):
                arr = np.clip((images[i, 0].numpy() + 2) * 10000, 0, 65535).astype(np.uint16)
                if ct:  # `ct`: the same picture as a 4-slice HU volume (soft tissue ± 150 HU)
                    arr = np.repeat(np.rint(40 + images[i, 0].numpy() * 150).astype(np.int16)[None], 4, 0)
                lab = {f: (None if math.isnan(v) else int(v)) for f, v in zip(FINDINGS, labels[i].tolist())}
                meta = {"modality": "CT" if ct else "DX", "shape": list(arr.shape), "split": split, "has_report": True,
                        **({"labels": lab} if labelled else {}), **(extra(k, split) if extra else {})}
                for suffix, data in shardspec.encode_sample(f"{k:024x}", arr, meta, texts[i]).items():
                    info = tarfile.TarInfo(f"{k:024x}.{suffix}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                k += 1
        data = buf.getvalue()
        with open(os.path.join(dest, path), "wb") as f:
            f.write(data)
        recs.append({"path": path, "split": split, "samples": n, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "modalities": {"CT" if ct else "DX": n}})
    manifest = shardspec.new_manifest(profile=Profile(), recipe={}, deid={}, plan_digest="t")
    shardspec.finalize(manifest, recs, {"seen": 0, "used": 0, "skipped": {}, "rejected": {}})
    with open(os.path.join(dest, shardspec.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return str(dest)


def test_run_streams_the_split_through_the_loader(tmp_path):
    from types import SimpleNamespace

    from radforge.config import ViewConfig
    from radforge.loader import build_loader  # noqa: F401  (run's dependency; fail here if absent)

    shards = _write_shards(tmp_path / "shards", {"train": 40, "test": 24})
    view = ViewConfig(xray_size=SIZE, xray_mean=0.5, xray_std=0.25, rand_crop=False)
    torch.manual_seed(0)
    mae = MAE(ViT((1, SIZE, SIZE), (4, 4), 32, 2, 2), decoder_width=32, decoder_depth=1)
    loaded = SimpleNamespace(model=mae, kind="mae", image=kinds.XRAY, view=view, findings=FINDINGS, model_id="t")
    with torch.no_grad():  # as the training loop calls it: the linear probe still fits
        r = evaluate.run(loaded, shards, split="test", protocols=("quick",), cfg=EvalConfig(bootstrap=10))
    assert r["kind"] == "mae" and r["n"] == 24 and r["split"] == "test" and r["recon_loss"] > 0
    assert r["linear_probe"]["n_train"] == 40 and set(r["per_finding"]) == set(FINDINGS)
    tok = text_mod.train_tokenizer(["no nodule.", "effusion is present."], TextConfig(vocab_size=100, max_len=24))
    clip = CLIP(ViT((1, SIZE, SIZE), (8, 8), 32, 2, 2), text_mod.SmallTextEncoder(tok, TextConfig(width=32, depth=1, heads=2, max_len=24)), 16)
    loaded = SimpleNamespace(model=clip, kind="clip", image=kinds.XRAY, view=view, findings=FINDINGS, model_id="c")
    with torch.no_grad():  # as the training loop calls it
        r = evaluate.run(loaded, shards, split="test", protocols=("quick",), cfg=EvalConfig(bootstrap=10, max_samples=20))
    assert r["n"] == 20 and r["n_with_report"] == 20 and set(r["recall"]) == {"image_to_text", "text_to_image"}
    assert all(0 <= v <= 1 for d in r["recall"].values() for v in d.values())
    json.dumps(r)


# ------------------------------------------------------------- scikit-learn reference checks


def test_auroc_and_the_bootstraps_vectorised_auroc_equal_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    for n in (6, 50, 300):
        s = rng.integers(0, 6, (40, n)).astype(float)  # ties
        y = rng.random((40, n)) < 0.4
        y[:, 0], y[:, 1] = True, False
        ours = evaluate._auroc_per_row(s, y)
        ref = [roc_auc_score(y[i], s[i]) for i in range(len(s))]
        np.testing.assert_allclose(ours, ref, atol=1e-12)
        assert evaluate.auroc(s[0], y[0]) == pytest.approx(ref[0], abs=1e-12)
    assert np.isnan(evaluate._auroc_per_row(np.ones((1, 4)), np.ones((1, 4), dtype=bool))).all()


def test_knn_equals_sklearn_weighted_cosine_knn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(5)
    xt, xe = rng.normal(size=(120, 16)), rng.normal(size=(30, 16))
    yt = np.stack([(xt[:, 0] > 0), (xt[:, 1] > 0.5)], 1).astype(float)
    k, t = 20, 0.07
    ours = evaluate.knn_scores(xt, yt, xe, k=k, temperature=t)
    for j in range(2):
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                   weights=lambda d: np.exp((1 - d) / t)).fit(xt, yt[:, j]).predict_proba(xe)[:, 1]
        np.testing.assert_allclose(ours[:, j], ref, atol=1e-9)
    # unknown labels are not neighbours: the vote is over the k nearest LABELLED samples
    yn = yt.copy()
    yn[::3, 0] = np.nan
    keep = ~np.isnan(yn[:, 0])
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / t)).fit(xt[keep], yn[keep, 0]).predict_proba(xe)[:, 1]
    np.testing.assert_allclose(evaluate.knn_scores(xt, yn, xe, k=k, temperature=t)[:, 0], ref, atol=1e-9)


def test_probe_is_sklearns_logistic_regression_with_c_chosen_on_val():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(6)
    x = rng.normal(size=(260, 12))
    y = ((x[:, 0] + 0.5 * x[:, 1] + rng.normal(0, 1.0, 260)) > 0).astype(float)[:, None]
    y[::9] = np.nan
    xt, yt, xv, yv, xe = x[:160], y[:160], x[160:220], y[160:220], x[220:]
    grid = [0.001, 0.1, 10.0]
    probes, on_val = evaluate.select_probes(xt, yt, xv, yv, grid)
    assert on_val
    keep = ~np.isnan(yt[:, 0])
    sc = StandardScaler().fit(xt[keep])
    fits = {c: LogisticRegression(C=c, max_iter=2000).fit(sc.transform(xt[keep]), yt[keep, 0]) for c in grid}
    kv = ~np.isnan(yv[:, 0])
    val_auc = {c: roc_auc_score(yv[kv, 0], fits[c].predict_proba(sc.transform(xv[kv]))[:, 1]) for c in grid}
    best = max(grid, key=lambda c: (val_auc[c], -c))
    assert probes[0].c == best
    np.testing.assert_allclose(probes[0].predict(xe), fits[best].predict_proba(sc.transform(xe))[:, 1], atol=1e-8)
    # one class in train: a constant, no crash
    assert evaluate.fit_probe(xt, np.ones(160), 1.0).predict(xe).tolist() == [1.0] * len(xe)


def test_ece_and_reliability_follow_sklearns_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(7)
    p = rng.random(4000)
    y_cal = (rng.random(4000) < p).astype(float)  # calibrated by construction
    y_over = (rng.random(4000) < 0.5).astype(float)  # p carries no information: badly calibrated
    e_cal, d = evaluate.ece(p, y_cal, 10)
    e_over, _ = evaluate.ece(p, y_over, 10)
    assert e_cal < 0.03 < 0.2 < e_over
    acc, conf = calibration_curve(y_cal, p, n_bins=10)
    np.testing.assert_allclose(d["accuracy"], acc)
    np.testing.assert_allclose(d["confidence"], conf)
    assert sum(d["count"]) == 4000
    manual = sum(((np.minimum((p * 10).astype(int), 9) == b).sum() / 4000) * abs(a - c)
                 for b, a, c in zip(range(10), acc, conf))  # every bin is populated here
    assert e_cal == pytest.approx(manual, abs=1e-12)
    assert evaluate._ece_binned(p, y_cal > 0.5, 10) == pytest.approx(e_cal, abs=1e-12)  # the bootstrap's ECE
    lo, hi = evaluate.ece_ci(p, y_over, 10, n=200)
    assert lo <= e_over <= hi and hi - lo < 0.1


def test_fairness_figures_by_hand():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(8)
    n = 300
    sex = np.array(["F", "M"] * (n // 2), dtype=object)
    y = (rng.random(n) < 0.4).astype(float)
    noise = np.where(sex == "F", 0.3, 1.0)  # the model is better on F
    s = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1, n) * noise)))
    band = np.array(["40-59"] * (n - 10) + ["80+"] * 10, dtype=object)
    test = evaluate.Pass(np.zeros((n, 0)), y[:, None], [""] * n, [str(i) for i in range(n)])

    class Fixed:  # the model's scorer is its classifier: fixed probabilities
        capabilities = frozenset({"classify"})

    ctx = evaluate.Context(model=Fixed(), cfg=EvalConfig(bootstrap=50, min_group=20, threshold=0.5), findings=["f"],
                           prompts={}, test=dataclasses_replace(test, probs=s[:, None]), groups={"sex": list(sex), "age_band": list(band)},
                           model_findings=["f"])
    r = evaluate._fairness(ctx)
    a = r["attributes"]["sex"]
    auc = {g: roc_auc_score(y[sex == g], s[sex == g]) for g in ("F", "M")}
    tpr = {g: ((s >= 0.5) & (y == 1) & (sex == g)).sum() / ((y == 1) & (sex == g)).sum() for g in ("F", "M")}
    rate = {g: (s[sex == g] >= 0.5).mean() for g in ("F", "M")}
    overall = roc_auc_score(y, s)
    assert a["groups"]["F"]["per_finding"]["f"]["auroc"] == pytest.approx(auc["F"])
    g = a["per_finding"]["f"]
    assert g["auroc_gap"] == pytest.approx(abs(auc["F"] - auc["M"])) and auc["F"] > auc["M"]
    assert g["es_auc"] == pytest.approx(overall / (1 + abs(overall - auc["F"]) + abs(overall - auc["M"])))
    assert g["equal_opportunity_diff"] == pytest.approx(abs(tpr["F"] - tpr["M"]))
    assert g["statistical_parity_diff"] == pytest.approx(abs(rate["F"] - rate["M"]))
    lo, hi = a["groups"]["F"]["per_finding"]["f"]["ci95"]
    assert lo <= auc["F"] <= hi
    ages = r["attributes"]["age_band"]
    assert ages["groups"]["80+"] == {"n": 10, "too_small": True}  # reported as too small, no numbers
    assert ages["per_finding"]["f"]["auroc_gap"] is None  # one group left: no gap
    json.dumps(r)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_age_bands_from_dicom_ages():
    assert [evaluate.age_band(a) for a in ("067Y", "006M", "085Y", "018Y", "017Y", 45, "010W", "", None, "abcY")] == \
        ["60-79", "0-17", "80+", "18-39", "0-17", "40-59", "0-17", None, None, None]
    assert evaluate.age_band("60-69") == "60-69" and evaluate.age_band("90+") == "90+"  # stored bands pass through


# ------------------------------------------------------------------------------ corruptions


def test_corruptions_are_seeded_keep_the_stored_form_and_grow_with_severity():
    from radforge import corruptions

    rng = np.random.default_rng(9)
    xr = (rng.random((128, 144)) * 30000 + 15000).astype(np.uint16)  # blur's sigma: 0.4 % of the short side and up
    ct = rng.normal(0, 60, (6, 24, 24)).astype(np.int16)
    for kind, arr in (("xray", xr), ("ct", ct)):
        for name in corruptions.for_kind(kind):
            outs = [corruptions.apply(arr, kind, name, s) for s in corruptions.SEVERITIES]
            assert all(o.dtype == arr.dtype and o.shape == arr.shape for o in outs), name
            np.testing.assert_array_equal(outs[2], corruptions.apply(arr.copy(), kind, name, 3))  # seeded by content
            dist = [np.abs(o.astype(float) - arr).mean() for o in outs]
            assert dist[0] > 0 and dist[-1] > dist[0], (kind, name, dist)
    np.testing.assert_array_equal(corruptions.apply(ct, "ct", "hu_offset", 4), ct + 75)  # stored units: HU
    assert not np.array_equal(corruptions.apply(xr, "xray", "gaussian_noise", 3, seed=1),
                              corruptions.apply(xr, "xray", "gaussian_noise", 3, seed=0))
    assert set(corruptions.for_kind("ct")) == {"dose_noise", "blur", "contrast", "bias_field", "downsample", "hu_offset"}
    with pytest.raises(ValueError, match="does not apply to ct"):
        corruptions.apply(ct, "ct", "jpeg", 1)
    with pytest.raises(ValueError, match="severity"):
        corruptions.CorruptedView(None, "xray", "blur", 6)


def test_the_loader_hands_corrupted_views_in_evaluation_only(tmp_path):
    from radforge import corruptions, shardspec
    from radforge.config import DataConfig, ViewConfig
    from radforge.errors import ConfigError
    from radforge.loader import build_loader

    shards = _write_shards(tmp_path / "shards", {"test": 8})
    view = ViewConfig(xray_size=SIZE, rand_crop=False)
    data = DataConfig(shards=shards, image="xray", num_workers=0, require_report=False)
    wrap = lambda v: corruptions.CorruptedView(v, "xray", "jpeg", 5)  # noqa: E731
    got = next(iter(build_loader(data, view, split="test", batch_size=8, train=False, corrupt=wrap)))["image"].numpy()
    manifest = shardspec.read_manifest(shards)
    plain = kinds.XRAY.view(view)
    want = [plain(corruptions.apply(shardspec.decode_sample(raw)[0], "xray", "jpeg", 5), None, None)
            for raw in shardspec.iter_samples(shards, manifest, split="test")]
    np.testing.assert_allclose(got, np.stack(want), atol=1e-6)
    with pytest.raises(ConfigError, match="evaluation"):
        build_loader(data, view, split="test", batch_size=8, train=True, corrupt=wrap)


# ------------------------------------------------------------------- whole runs on shard sets


def _demographics(k: int, split: str) -> dict:
    """Sex and age as ingest keeps them (deid.keep_age_sex: under `acquisition`, DICOM AS ages,
    never dates); a small 80+ group."""
    return {"acquisition": {"sex": "MF"[k % 2], "age": "083Y" if k % 17 == 0 else f"{30 + (k * 7) % 45:03d}Y"}}


def _tiny_mae():
    torch.manual_seed(0)
    return MAE(ViT((1, SIZE, SIZE), (4, 4), 32, 2, 2), decoder_width=32, decoder_depth=1)


def _loaded(model, kind="mae", prompts=None):
    from types import SimpleNamespace

    from radforge.config import ViewConfig

    view = ViewConfig(xray_size=SIZE, xray_mean=0.5, xray_std=0.25, rand_crop=False)
    return SimpleNamespace(model=model, kind=kind, image=kinds.XRAY, view=view, findings=FINDINGS, model_id="t",
                           prompts=prompts or {})


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("demo-shards"), {"train": 96, "val": 40, "test": 120}, extra=_demographics)


def test_run_all_protocols_on_an_mae(demo_shards):
    cfg = EvalConfig(bootstrap=40, few_shot_seeds=3, corruptions=["gaussian_noise", "blur"], severities=[1, 5])
    r = evaluate.run(_loaded(_tiny_mae()), demo_shards, split="test", protocols=("all",), cfg=cfg)
    p = r["protocols"]
    assert set(p) == {"recon_loss", "knn", "linear_probe", "few_shot", "fairness", "robustness", "calibration"}
    assert set(r["skipped"]) == {"zero_shot", "retrieval", "fine_tune"}
    assert "a mae model cannot run zero_shot: it needs zero_shot" in r["skipped"]["zero_shot"]
    for name in ("knn", "linear_probe"):
        assert set(p[name]["per_finding"]) == set(FINDINGS) and p[name]["mean_auroc"] > 0.7, (name, p[name])
        for v in p[name]["per_finding"].values():
            assert v["ci95"][0] <= v["auroc"] <= v["ci95"][1]
    assert p["linear_probe"]["c_chosen_on"] == "val" and p["linear_probe"]["n_train"] == 96
    fs = p["few_shot"]["settings"]
    assert list(fs) == ["1%", "10%", "100%", "1-shot", "5-shot", "10-shot"]
    assert fs["10-shot"]["n_seeds"] == 3 and fs["100%"]["n_seeds"] == 1
    # all labels: the probe again (rows permuted: lbfgs lands a hair apart)
    assert fs["100%"]["mean_auroc"] == pytest.approx(p["linear_probe"]["mean_auroc"], abs=5e-3)
    fr = p["fairness"]
    assert fr["scorer"] == "linear_probe" and set(fr["attributes"]) == {"sex", "age_band"}
    assert set(fr["attributes"]["sex"]["groups"]) == {"F", "M"}
    assert fr["attributes"]["age_band"]["groups"]["80+"]["too_small"] is True
    rb = p["robustness"]
    assert set(rb["corruptions"]) == {"gaussian_noise", "blur"} and set(rb["corruptions"]["blur"]) == {"1", "5"}
    worst = rb["corruptions"]["gaussian_noise"]["5"]
    assert worst["relative_drop"] == pytest.approx((rb["clean"]["mean_auroc"] - worst["mean_auroc"]) / rb["clean"]["mean_auroc"])
    assert rb["clean"]["mean_auroc"] == pytest.approx(p["linear_probe"]["mean_auroc"])
    assert set(p["calibration"]["sources"]) == {"linear_probe"}
    c = r["config"]
    assert c["eval"]["knn_k"] == 20 and c["corruptions"] == ["gaussian_noise", "blur"] and c["eval"]["few_shot_seeds"] == 3
    assert r["mean_auroc"] == p["linear_probe"]["mean_auroc"]  # the headline: the best scorer
    text = evaluate.format_table(r)
    assert "kNN AUROC" in text and "few-shot" in text and "too small" in text and "skipped zero_shot" in text
    json.dumps(r)


def test_zero_shot_uses_the_prompts_saved_in_model_json(tmp_path, demo_shards):
    from radforge import checkpoint, models
    from radforge.config import ModelConfig, ViewConfig

    cfg = ModelConfig(kind="clip", preset="tiny", patch_xray=8, embed_dim=16,
                      text=TextConfig(vocab_size=120, max_len=16, width=32, depth=1, heads=2))
    tok = text_mod.train_tokenizer(["there is a nodule.", "no effusion.", "cardiomegaly is present."] * 4, cfg.text)
    view = ViewConfig(xray_size=SIZE, xray_mean=0.5, xray_std=0.25, rand_crop=False)
    torch.manual_seed(1)
    model = models.build(cfg, "xray", kinds.XRAY.view(view).input_shape, tok, pretrained=False)
    saved = {"positive": "there is {finding}.", "negative": "there is no {finding}."}
    out = checkpoint.write_model(str(tmp_path / "clip"), model, image="xray", model_cfg=cfg, view=view,
                                 profile=Profile(), model_id="clip-t", findings=FINDINGS, prompts=saved)
    ecfg = EvalConfig(bootstrap=0, max_samples=40)
    r = evaluate.run(out, demo_shards, split="test", protocols=["zero_shot"], cfg=ecfg)
    zs = r["protocols"]["zero_shot"]
    assert zs["prompts"] == {**saved, "source": "model.json"} and r["config"]["prompts"]["source"] == "model.json"
    # the same figures as the model's own zero-shot with those prompts (what Serve computes)
    lm = checkpoint.load_for_inference(out)
    images, labels = [], []
    from radforge.config import DataConfig
    from radforge.loader import build_loader

    for b in build_loader(DataConfig(shards=demo_shards, image="xray", num_workers=0, require_report=False), lm.view,
                          split="test", batch_size=40, train=False, findings=FINDINGS):
        images.append(b["image"]), labels.append(b["labels"])
        break
    with torch.no_grad():
        probs = lm.zero_shot(images[0], FINDINGS).numpy()
    for j, f in enumerate(FINDINGS):
        assert zs["per_finding"][f]["auroc"] == pytest.approx(evaluate.auroc(probs[:, j], labels[0][:, j].numpy()), abs=1e-6)
    # an explicit eval prompt wins, and says so
    r2 = evaluate.run(out, demo_shards, split="test", protocols=["zero_shot"],
                      cfg=EvalConfig(bootstrap=0, max_samples=40, positive_prompt="{finding}.", negative_prompt="not {finding}."))
    assert r2["protocols"]["zero_shot"]["prompts"]["source"] == "eval config"


def test_unlabelled_split_runs_only_label_free_protocols(tmp_path):
    shards = _write_shards(tmp_path / "s", {"train": 24, "test": 16}, labelled=False)
    r = evaluate.run(_loaded(_tiny_mae()), shards, split="test", protocols=["all"], cfg=EvalConfig(bootstrap=10))
    assert set(r["protocols"]) == {"recon_loss"} and r["protocols"]["recon_loss"]["recon_loss"] > 0
    assert "no labels" in r["skipped"]["knn"] and "no labels" in r["skipped"]["robustness"]
    from radforge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown evaluation protocol 'knnn'"):
        evaluate.run(_loaded(_tiny_mae()), shards, split="test", protocols=["knn,knnn"])
    with pytest.raises(ConfigError, match="split 'val' is not in"):
        evaluate.run(_loaded(_tiny_mae()), shards, split="val")


def test_fine_tune_protocol_scores_the_models_classifier(demo_shards):
    """A model with `classify` (a fine-tuned one): the protocol's AUROC is sklearn's on its own
    probabilities, columns matched by finding name (the head's order may differ)."""

    from radforge.models.objective import Objective

    class Head(Objective):
        name = "head"

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def classify(self, images):  # cardiomegaly, nodule: mean brightness of their regions
            return torch.sigmoid(torch.stack([images[:, 0, 5:13, 6:14].mean((1, 2)), images[:, 0, 1:8, 1:8].amax((1, 2))], 1))

    Head.capabilities = frozenset({"classify"})  # set after class creation: whether or not CAPABILITIES lists it yet
    loaded = _loaded(Head())
    loaded.findings = ["cardiomegaly", "nodule"]
    r = evaluate.run(loaded, demo_shards, split="test", protocols=["fine_tune", "calibration", "knn"],
                     cfg=EvalConfig(bootstrap=20, findings=FINDINGS))
    ft = r["protocols"]["fine_tune"]
    assert ft["findings_without_head"] == ["effusion"] and ft["per_finding"]["effusion"]["auroc"] is None
    assert ft["per_finding"]["cardiomegaly"]["auroc"] > 0.8
    assert "knn" in r["skipped"] and set(r["protocols"]["calibration"]["sources"]) == {"fine_tune"}
    assert r["mean_auroc"] == ft["mean_auroc"]


def test_ct_robustness_corrupts_in_hounsfield_units_before_the_windows(tmp_path):
    """A 3D MAE on CT shards: every CT corruption at severities 1 and 5, through the CT view."""
    from types import SimpleNamespace

    from radforge import corruptions
    from radforge.config import ViewConfig

    shards = _write_shards(tmp_path / "ct", {"train": 40, "val": 16, "test": 32}, ct=True)
    view = ViewConfig(ct_size=(4, SIZE, SIZE), ct_windows=[(40.0, 400.0)], rand_crop=False, rand_flip=False)
    torch.manual_seed(0)
    mae = MAE(ViT((1, 4, SIZE, SIZE), (2, 4, 4), 32, 2, 2), decoder_width=32, decoder_depth=1)
    loaded = SimpleNamespace(model=mae, kind="mae", image=kinds.CT, view=view, findings=FINDINGS, model_id="ct", prompts={})
    r = evaluate.run(loaded, shards, split="test", protocols=["robustness", "linear_probe"],
                     cfg=EvalConfig(bootstrap=20, severities=[1, 5]))
    rb = r["protocols"]["robustness"]
    assert list(rb["corruptions"]) == corruptions.for_kind("ct") == r["config"]["corruptions"]
    assert rb["levels"]["hu_offset"] == [10, 25, 50, 75, 100] and rb["clean"]["mean_auroc"] > 0.7
    for name, sev in rb["corruptions"].items():
        assert set(sev) == {"1", "5"} and all(v["mean_auroc"] is not None for v in sev.values()), name
    with pytest.raises(Exception, match="does not apply to ct"):
        evaluate.run(loaded, shards, split="test", protocols=["robustness"], cfg=EvalConfig(bootstrap=0, corruptions=["jpeg"]))


def test_an_exported_finetune_model_gets_every_protocol(tmp_path, demo_shards):
    """engineer D's `kind: finetune` (capability classify) from its model dir: fine_tune is
    scikit-learn's AUROC of its own probabilities, and it is the scorer of fairness/robustness."""
    from sklearn.metrics import roc_auc_score

    from radforge import checkpoint, models
    from radforge.config import DataConfig, ModelConfig, ViewConfig
    from radforge.loader import build_loader

    head = ["effusion", "nodule"]
    cfg = ModelConfig(kind="finetune", patch_xray=8, findings=head)
    view = ViewConfig(xray_size=SIZE, xray_mean=0.5, xray_std=0.25, rand_crop=False)
    torch.manual_seed(2)
    model = models.build(cfg, "xray", (1, SIZE, SIZE))
    out = checkpoint.write_model(str(tmp_path / "ft"), model, image="xray", model_cfg=cfg, view=view, profile=Profile(),
                                 model_id="ft-t", findings=head)
    ecfg = EvalConfig(bootstrap=20, few_shot_seeds=2, corruptions=["blur"], severities=[3])
    r = evaluate.run(out, demo_shards, split="test", protocols=["all"], cfg=ecfg)
    assert set(r["protocols"]) >= {"fine_tune", "knn", "linear_probe", "fairness", "robustness", "calibration"}, r["protocol_seconds"]
    assert r["protocols"]["fairness"]["scorer"] == r["protocols"]["robustness"]["scorer"] == "fine_tune"
    assert set(r["protocols"]["calibration"]["sources"]) == {"fine_tune", "linear_probe"}
    lm = checkpoint.load_for_inference(out)
    data = DataConfig(shards=demo_shards, image="xray", num_workers=0, require_report=False)
    probs, labels = [], []
    with torch.no_grad():
        for b in build_loader(data, lm.view, split="test", batch_size=64, train=False, findings=head):
            probs.append(lm.model.classify(b["image"]).numpy()), labels.append(b["labels"].numpy())
    p, y = np.concatenate(probs), np.concatenate(labels)
    for j, f in enumerate(head):
        k = ~np.isnan(y[:, j])
        assert r["protocols"]["fine_tune"]["per_finding"][f]["auroc"] == pytest.approx(roc_auc_score(y[k, j], p[k, j]), abs=1e-9)


def test_remote_shards_give_the_same_figures_as_local_ones(tmp_path):
    """memory:// stands for object storage: the run-scoped shard cache (robustness re-reads the
    split once per corruption and severity) changes no figure."""
    import fsspec

    local = _write_shards(tmp_path / "s", {"train": 32, "test": 24})
    fs = fsspec.filesystem("memory")
    for p in sorted((tmp_path / "s").rglob("*")):
        if p.is_file():
            fs.pipe(f"/evalremote/{p.relative_to(tmp_path / 's')}", p.read_bytes())
    cfg = EvalConfig(bootstrap=10, corruptions=["jpeg"], severities=[2, 4])
    a = evaluate.run(_loaded(_tiny_mae()), local, split="test", protocols=["robustness"], cfg=cfg)
    b = evaluate.run(_loaded(_tiny_mae()), "memory://evalremote", split="test", protocols=["robustness"], cfg=cfg)
    assert a["protocols"]["robustness"]["corruptions"] == b["protocols"]["robustness"]["corruptions"]


def _shard_set(dest, by_split: dict) -> str:
    """A shard set from shardspec.Sample objects, one shard per split (the manifest by shardspec)."""
    import hashlib
    import io
    import os
    import tarfile

    from radforge import shardspec

    recs = []
    for split, samples in by_split.items():
        os.makedirs(os.path.join(dest, split), exist_ok=True)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for s in samples:
                for suffix, data in s.members().items():
                    info = tarfile.TarInfo(f"{s.key}.{suffix}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        path, data = shardspec.shard_name(split, 0), buf.getvalue()
        with open(os.path.join(dest, path), "wb") as f:
            f.write(data)
        mods: dict = {}
        for s in samples:
            mods[s.meta["modality"]] = mods.get(s.meta["modality"], 0) + 1
        recs.append({"path": path, "split": split, "samples": len(samples), "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "modalities": mods})
    manifest = shardspec.new_manifest(profile=Profile(), recipe={}, deid={"keep_age_sex": True}, plan_digest="t")
    shardspec.finalize(manifest, recs, {"seen": 0, "used": 0, "skipped": {}, "rejected": {}})
    with open(os.path.join(dest, shardspec.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return str(dest)


def test_fairness_and_report_on_phantom_dicom_built_by_ingests_own_sample_path(tmp_path):
    """Phantom radiographs (planted PHI, sex and DICOM AS ages) → dicom.scan → plan_group →
    ingest.make_sample with deid.keep_age_sex (Ray-free: the per-sample path of the real ingest)
    → shards → fairness by sex and age band; no identifying value reaches the JSON or the report."""
    import os

    from radforge import config, deid, dicom, ingest, phantoms
    from radforge.config import IngestRecipe

    corpus = phantoms.training_corpus(tmp_path / "src", n_patients=40, with_ct=False, xray_size=64)
    recipe = config.load(IngestRecipe, None, ["deid.demo_key=true", "deid.keep_age_sex=true",
                                              "splits={train: 0.5, val: 0.2, test: 0.3}"])
    tables = ingest._TablesSpec.load(corpus.reports_csv, recipe.reports, corpus.labels_csv, recipe.labels).read()
    ctx = dicom.PlanContext(recipe, deid.Pseudonymizer(deid.DEMO_KEY))
    by_split: dict = {}
    for d, _, names in os.walk(corpus.dicom_dir):
        for n in sorted(names):
            path = os.path.join(d, n)
            with open(path, "rb") as f:
                row = dicom.scan(path, os.path.getsize(path), f)
            for item in dicom.plan_group([row], ctx):
                if item.status == "planned":
                    by_split.setdefault(item.split, []).append(ingest.make_sample(item, recipe, tables))
    shards = _shard_set(tmp_path / "shards", by_split)
    r = evaluate.run(_loaded(_tiny_mae()), shards, split="test", protocols=["fairness", "calibration"],
                     report_dir=str(tmp_path / "report"), cfg=EvalConfig(bootstrap=20, min_group=4))
    fr = r["protocols"]["fairness"]
    assert set(fr["attributes"]) == {"sex", "age_band"} and set(fr["attributes"]["sex"]["groups"]) <= {"F", "M"}
    bands = set(fr["attributes"]["age_band"]["groups"])
    assert bands and all(b[0].isdigit() for b in bands), bands  # bands, never an AS string or a date
    text = json.dumps(r) + open(r["report"]).read()
    assert phantoms.PHI_MARKER not in text
    for study in corpus.studies[:20]:
        assert study.patient.birth_date not in text and study.patient.patient_id not in text
