"""Evaluation protocols of the field, chosen from the model's capabilities
(`radforge.models.objective.EVALUATION_NEEDS`), in one command:

    zero_shot     AUROC of the prompt probabilities (the model's saved prompts, see below)
    retrieval     image <-> report recall@K
    recon_loss    seeded masked-reconstruction loss
    knn           cosine kNN on frozen embeddings, k = 20, neighbours weighted exp(cos / 0.07) (DINO)
    linear_probe  scikit-learn logistic regression per finding on standardised frozen embeddings,
                  fit on the train split, C chosen on val by AUROC
    few_shot      that probe on 1 / 10 / 100 % of the train labels and on k = 1 / 5 / 10 positives
                  + negatives per finding, `few_shot_seeds` draws each: mean ± 95% CI (t) over draws
    fine_tune     AUROC of the model's classifier head (`classify`)
    fairness      per sex / age band: AUROC + CI, gap, ES-AUC, equal-opportunity and statistical-
                  parity differences at the operating threshold (Youden's J unless eval.threshold)
    robustness    the same scorer on the split corrupted at load time (radforge.corruptions),
                  per corruption and severity, and the relative drop vs clean
    calibration   ECE and reliability curves of every probability the model yields (zero-shot,
                  probe, classifier)

Fairness, robustness and calibration use the model's best scorer: its classifier, else its
zero-shot probabilities, else the linear probe on its embeddings.

Layers, from the bottom: metric functions on arrays (`auroc`, `bootstrap_ci`, `recall_at_k`,
`knn_scores`, `fit_probe`, `ece`) — scikit-learn where it is the reference (roc_auc_score,
roc_curve, LogisticRegression, calibration_curve), our code for what is ours (the DINO kNN, the
bootstrap — a vectorised mid-rank AUROC over resamples, checked against roc_auc_score — and the
fairness gaps); `run_on_batches` (the training loop's in-loop evaluation: "quick"); `run`
(an exported model over a shard set, streamed with radforge.loader in evaluation mode, and the
HTML report through radforge.viz).

Labels follow the loader: 1 positive, 0 negative, NaN uncertain/missing ("U-ignore" per
finding). A finding without both classes gets no AUROC. Bootstrap CIs resample samples with
replacement (seeded), one-class resamples are skipped, percentiles 2.5 / 97.5.

Prompts: zero-shot uses the prompts saved in model.json (what Serve uses), unless the
EvalConfig's prompts differ from its defaults (an explicit choice); the JSON says which.

The result is a JSON-able dict; it never holds report text or sample keys, only aggregates.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from radforge.config import EvalConfig
from radforge.errors import ConfigError
from radforge.models.objective import EVALUATION_NEEDS, EVALUATIONS

KS = (1, 5, 10)
EVAL_BATCH = 16  # samples per forward pass in evaluation (memory, not results, depends on it)
QUICK = ("zero_shot", "retrieval", "recon_loss", "linear_probe")  # in-loop; the probe only without zero-shot
LABEL_FREE = ("retrieval", "recon_loss")
SCORERS = ("fine_tune", "zero_shot", "linear_probe")  # best first


# ---------------------------------------------------------------------------------------------
# metrics on arrays


def _known(scores, labels):
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    keep = ~np.isnan(y) & np.isfinite(s)  # a NaN score: nothing scored that finding (a head without it)
    return s[keep], y[keep] > 0.5


def auroc(scores, labels) -> float:
    """scikit-learn's roc_auc_score on the samples with a label (NaN ignored); NaN when either
    class is absent."""
    from sklearn.metrics import roc_auc_score

    s, y = _known(scores, labels)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def _auroc_per_row(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUROC of every row of s [R, N] against y [R, N] (bool): the Mann-Whitney statistic on
    mid-ranks, vectorised over rows (the bootstrap's resamples); NaN for one-class rows. The
    same figure as roc_auc_score (tests/test_evaluate.py checks it), without its per-call cost."""
    from scipy.stats import rankdata

    r = rankdata(s, axis=1)
    n_pos = y.sum(1)
    n_neg = y.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_ci(scores, labels, *, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of the AUROC: `n` resamples of the labelled samples
    with replacement (seeded), one-class resamples left out. (nan, nan) if n == 0 or one class."""
    s, y = _known(scores, labels)
    if n <= 0 or y.all() or not y.any():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n, 256):  # bounded memory: 256 resamples at a time
        idx = rng.integers(0, len(s), (min(256, n - start), len(s)))
        a = _auroc_per_row(s[idx], y[idx])
        stats.append(a[~np.isnan(a)])
    stats = np.concatenate(stats)
    if not len(stats):
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def recall_at_k(sim, ks: Sequence[int] = KS, groups: Sequence | None = None) -> dict:
    """Recall@K both ways from a similarity matrix sim[i, j] = image i vs text j (pair i <-> i).

    `groups` (optional, one id per pair, e.g. a hash of the report): pairs in the same group are
    interchangeable, so two identical reports do not count as misses of each other. The rank of
    the true partner is 1 + the number of non-equivalent candidates scoring >= it (ties count
    against the model, so a constant similarity scores chance, never perfect).
    -> {"image_to_text": {"1": r, ...}, "text_to_image": {...}}
    """
    sim = np.asarray(sim, dtype=np.float64)
    n = sim.shape[0]
    if sim.shape != (n, n) or n == 0:
        raise ValueError(f"recall_at_k needs a square, non-empty similarity matrix, got {sim.shape}")
    g = np.asarray(groups if groups is not None else np.arange(n))
    same = g[:, None] == g[None, :]

    def ranks(m: np.ndarray) -> np.ndarray:
        true = np.diag(m)[:, None]
        return 1 + ((m >= true) & ~same).sum(axis=1)

    out = {}
    for name, m in (("image_to_text", sim), ("text_to_image", sim.T)):
        r = ranks(m)
        out[name] = {str(k): float((r <= k).mean()) for k in ks}
    return out


def knn_scores(train_x, train_y, eval_x, *, k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """DINO's weighted kNN, per finding: cosine similarity to the train embeddings, the k nearest
    train samples WITH a label for that finding vote with weight exp(cos / T).
    -> P(finding) [N, F] (NaN where a finding has no labelled train sample)."""
    def unit(a):
        a = np.asarray(a, dtype=np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    xt, xe, yt = unit(train_x), unit(eval_x), np.asarray(train_y, dtype=np.float64)
    sim = xe @ xt.T
    out = np.full((len(xe), yt.shape[1]), np.nan)
    for j in range(yt.shape[1]):
        known = np.flatnonzero(~np.isnan(yt[:, j]))
        if not len(known):
            continue
        kk = min(k, len(known))
        s = sim[:, known]
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        w = np.exp(np.take_along_axis(s, top, 1) / temperature)
        out[:, j] = (w * yt[known][top, j]).sum(1) / w.sum(1)
    return out


@dataclass
class Probe:
    """One finding's logistic regression on standardised embeddings (None model: one class only)."""

    c: float | None
    model: object | None  # sklearn Pipeline
    constant: float = 0.5

    def predict(self, x) -> np.ndarray:
        if self.model is None:
            return np.full(len(x), self.constant)
        return self.model.predict_proba(np.asarray(x, dtype=np.float64))[:, 1]


def fit_probe(x, y, c: float, seed: int = 0) -> Probe:
    """scikit-learn StandardScaler + LogisticRegression(C=c, lbfgs) on the rows with a label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y)
    yk = y[keep] > 0.5
    if yk.all() or not yk.any():
        return Probe(None, None, float(yk.mean()) if len(yk) else 0.5)
    m = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    m.fit(np.asarray(x, dtype=np.float64)[keep], yk)
    return Probe(c, m)


def select_probes(xt, yt, xv, yv, grid: Sequence[float]) -> tuple[list[Probe], bool]:
    """Per finding, the probe whose C scores the best val AUROC (ties: the smaller C); without
    val labels of both classes, C = 1 (or the grid's middle). -> (probes, chosen_on_val)."""
    probes, on_val = [], xv is not None and len(xv) > 0
    default = 1.0 if 1.0 in grid else sorted(grid)[len(grid) // 2]
    for j in range(yt.shape[1]):
        if on_val and not math.isnan(auroc(np.zeros(len(yv)), yv[:, j])):
            fits = [fit_probe(xt, yt[:, j], c) for c in sorted(grid)]
            scores = [auroc(p.predict(xv), yv[:, j]) for p in fits]
            best = int(np.nanargmax([(-1 if math.isnan(s) else s) for s in scores]))
            probes.append(fits[best])
        else:
            probes.append(fit_probe(xt, yt[:, j], default))
    return probes, on_val


def linear_probe(train_x, train_y, eval_x, eval_y=None, *, c: float = 1.0, seed: int = 0) -> np.ndarray:
    """Per-column probes (fixed C) fit on (train_x, train_y) -> eval probabilities [N, F]."""
    ty = np.asarray(train_y, dtype=np.float64)
    return np.stack([fit_probe(train_x, ty[:, j], c, seed).predict(eval_x) for j in range(ty.shape[1])], 1)


def ece(probs, labels, bins: int = 10) -> tuple[float, dict]:
    """Expected calibration error over `bins` equal-width bins (NaN labels ignored), and the
    reliability diagram (scikit-learn's calibration_curve: mean confidence and observed
    frequency per non-empty bin, with the bin counts)."""
    from sklearn.calibration import calibration_curve

    p, y = _known(probs, labels)
    if not len(p):
        return float("nan"), {"confidence": [], "accuracy": [], "count": []}
    p = np.clip(p, 0, 1)
    acc, conf = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    counts = np.bincount(np.minimum((p * bins).astype(int), bins - 1), minlength=bins)
    counts = counts[counts > 0]
    value = float(np.sum(counts / len(p) * np.abs(acc - conf)))
    return value, {"confidence": conf.tolist(), "accuracy": acc.tolist(), "count": counts.tolist()}


def _ece_binned(p: np.ndarray, y: np.ndarray, bins: int) -> float:
    """ECE of one sample set by bin counts (the bootstrap's inner loop; equals `ece`)."""
    b = np.minimum((p * bins).astype(int), bins - 1)
    conf = np.bincount(b, weights=p, minlength=bins)
    acc = np.bincount(b, weights=y.astype(float), minlength=bins)
    return float(np.abs(acc - conf).sum() / len(p))


def ece_ci(probs, labels, bins: int = 10, *, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the ECE (resampling samples, seeded)."""
    p, y = _known(probs, labels)
    if n <= 0 or not len(p):
        return float("nan"), float("nan")
    p = np.clip(p, 0, 1)
    rng = np.random.default_rng(seed)
    stats = [_ece_binned(p[idx], y[idx], bins) for idx in rng.integers(0, len(p), (n, len(p)))]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _per_finding(scores: np.ndarray, labels: np.ndarray, findings: Sequence[str], n_boot: int) -> dict:
    out = {}
    for j, f in enumerate(findings):
        y = labels[:, j]
        known = ~np.isnan(y)
        lo, hi = bootstrap_ci(scores[:, j], y, n=n_boot, seed=j)
        out[f] = {"auroc": _num(auroc(scores[:, j], y)), "ci95": [_num(lo), _num(hi)],
                  "n_pos": int((y[known] > 0.5).sum()), "n_neg": int((y[known] <= 0.5).sum())}
    return out


def _mean_auroc(per_finding: Mapping) -> float | None:
    vals = [v["auroc"] for v in per_finding.values() if v.get("auroc") is not None]
    return float(np.mean(vals)) if vals else None


def _mean_ci(values: Sequence[float]) -> tuple[float | None, list]:
    """Mean and 95% t-interval over seeds, clipped to [0, 1] (AUROCs); one value: no interval."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return None, [None, None]
    m = float(v.mean())
    if len(v) < 2:
        return m, [None, None]
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, [max(0.0, m - h), min(1.0, m + h)]


# ---------------------------------------------------------------------------------------------
# one pass of a model over batches


@dataclass
class Pass:
    """What one pass over a split yields: embeddings, labels, reports, classifier probabilities."""

    x: np.ndarray  # [N, D] image embeddings (empty [N, 0] without embed_image)
    y: np.ndarray  # [N, F] labels (NaN = unknown)
    texts: list[str]
    keys: list[str]
    probs: np.ndarray | None = None  # [N, F'] model.classify, in model.findings order
    recon: float | None = None


def _take(batches: Iterable[dict], max_samples: int) -> Iterable[dict]:
    seen = 0
    for batch in batches:
        if "image" not in batch:
            continue
        if max_samples and seen >= max_samples:
            return
        if max_samples and seen + len(batch["image"]) > max_samples:
            cut = max_samples - seen
            batch = {k: v[:cut] for k, v in batch.items() if k != "_stats"}
        seen += len(batch["image"])
        yield batch


def _model_of(loaded):
    """The objective module of a checkpoint.LoadedModel, or the module itself."""
    return getattr(loaded, "model", loaded)


@torch.no_grad()
def embed_pass(model, batches, max_samples: int = 0, *, recon: bool = False) -> Pass:
    """One pass: image embeddings, labels, reports, keys, classifier probabilities (models with
    `classify`) and the mean seeded reconstruction loss (when `recon`)."""
    param = next(model.parameters())
    device, dtype = param.device, (param.dtype if param.dtype.is_floating_point else torch.float32)
    caps = model.capabilities
    feats, probs, labels, texts, keys, total, n_recon = [], [], [], [], [], 0.0, 0
    gen = torch.Generator(device="cpu").manual_seed(0)  # the same masks every evaluation
    for batch in _take(batches, max_samples):
        images = batch["image"].to(device=device, dtype=dtype)  # bf16/fp16 engines take their own dtype
        if "embed_image" in caps:
            feats.append(model.embed_image(images).float().cpu())
        if "classify" in caps:
            probs.append(model.classify(images).float().cpu())
        if recon:
            total += float(model.reconstruction_loss(images, gen)) * len(images)
            n_recon += len(images)
        if "labels" in batch:
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.float64))
        texts += list(batch.get("text", [""] * len(images)))
        keys += list(batch.get("key", [""] * len(images)))
    n = len(texts)
    x = torch.cat(feats).numpy() if feats else np.zeros((n, 0))
    y = torch.cat(labels).numpy() if labels else np.zeros((n, 0))
    return Pass(x, y, texts, keys, torch.cat(probs).numpy() if probs else None, total / n_recon if n_recon else None)


# ---------------------------------------------------------------------------------------------
# the protocols


@dataclass
class Context:
    """Everything the protocols share: the model, the passes, the fitted probes, the settings."""

    model: object  # the objective (nn.Module)
    cfg: EvalConfig
    findings: list[str]
    prompts: dict
    test: Pass
    train: Pass | None = None
    val: Pass | None = None
    kind: str = "xray"
    stream: Callable[..., Pass] | None = None  # (split, corruption=None, severity=None) -> Pass
    groups: dict | None = None  # attribute -> [group label or None per test sample]
    model_findings: list[str] = field(default_factory=list)
    train_missing: str = "the shard set has no train split to fit on"
    probes: list[Probe] | None = None
    probe_on_val: bool = False
    curves: dict = field(default_factory=dict)  # scorer -> finding -> (fpr, tpr): the report's ROC
    say: Callable[[str], None] = lambda m: None

    def fitted_probes(self) -> list[Probe]:
        if self.probes is None:
            self.say("fitting linear probes (C chosen on val)" if self.val is not None else "fitting linear probes")
            v = self.val if self.val is not None and len(self.val.x) else None
            self.probes, self.probe_on_val = select_probes(self.train.x, self.train.y, v and v.x, v and v.y,
                                                           self.cfg.probe_c)
        return self.probes

    def scorers(self) -> list[str]:
        caps = self.model.capabilities
        out = []
        if "classify" in caps:
            out.append("fine_tune")
        if "zero_shot" in caps:
            out.append("zero_shot")
        if "embed_image" in caps and self.train is not None:
            out.append("linear_probe")
        return out

    def scores(self, scorer: str, p: Pass) -> np.ndarray:
        """P(finding) [N, F] of `scorer` on pass `p`, columns in self.findings order."""
        if scorer == "fine_tune":
            idx = [self.model_findings.index(f) if f in self.model_findings else -1 for f in self.findings]
            cols = [p.probs[:, i] if i >= 0 else np.full(len(p.y), np.nan) for i in idx]
            return np.stack(cols, 1) if cols else np.zeros((len(p.y), 0))
        if scorer == "zero_shot":
            if not len(p.x):
                return np.zeros((0, len(self.findings)))
            with torch.no_grad():
                return self.model.zero_shot_from_embeddings(torch.as_tensor(p.x), self.findings, self.prompts["positive"],
                                                            self.prompts["negative"]).float().numpy()
        return np.stack([pr.predict(p.x) for pr in self.fitted_probes()], 1)

    def auroc_block(self, scorer: str, scores: np.ndarray) -> dict:
        from sklearn.metrics import roc_curve

        per = _per_finding(scores, self.test.y, self.findings, self.cfg.bootstrap)
        for j, f in enumerate(self.findings):
            s, y = _known(scores[:, j], self.test.y[:, j])
            if per[f]["auroc"] is not None:
                fpr, tpr, _ = roc_curve(y, s)
                self.curves.setdefault(scorer, {})[f] = (fpr, tpr)
        return {"per_finding": per, "mean_auroc": _mean_auroc(per)}


def _zero_shot(ctx: Context) -> dict:
    return {**ctx.auroc_block("zero_shot", ctx.scores("zero_shot", ctx.test)), "prompts": dict(ctx.prompts)}


def _fine_tune(ctx: Context) -> dict:
    missing = [f for f in ctx.findings if f not in ctx.model_findings]
    out = ctx.auroc_block("fine_tune", ctx.scores("fine_tune", ctx.test))
    return {**out, "head_findings": list(ctx.model_findings), "findings_without_head": missing}


@torch.no_grad()
def _retrieval(ctx: Context) -> dict:
    texts, x = ctx.test.texts, ctx.test.x
    has = [i for i, t in enumerate(texts) if t]
    out: dict = {"n_with_report": len(has), "ks": list(KS)}
    if has:
        t_emb = torch.cat([ctx.model.embed_text([texts[i] for i in has[s:s + EVAL_BATCH]]).float().cpu()
                           for s in range(0, len(has), EVAL_BATCH)]).numpy()
        groups = [hash(texts[i]) for i in has]  # identical reports are interchangeable
        out["recall"] = recall_at_k(x[has] @ t_emb.T, KS, groups)
    return out


def _recon_loss(ctx: Context) -> dict:
    return {"recon_loss": ctx.test.recon, "masks_seed": 0}


def _knn(ctx: Context) -> dict:
    c = ctx.cfg
    s = knn_scores(ctx.train.x, ctx.train.y, ctx.test.x, k=c.knn_k, temperature=c.knn_temperature)
    return {**ctx.auroc_block("knn", s), "k": c.knn_k, "temperature": c.knn_temperature, "n_train": len(ctx.train.x)}


def _linear_probe(ctx: Context) -> dict:
    probes = ctx.fitted_probes()
    out = ctx.auroc_block("linear_probe", ctx.scores("linear_probe", ctx.test))
    for pr, f in zip(probes, ctx.findings):
        out["per_finding"][f]["C"] = pr.c
    return {**out, "n_train": len(ctx.train.x), "n_val": len(ctx.val.x) if ctx.val else 0,
            "c_grid": list(ctx.cfg.probe_c), "c_chosen_on": "val" if ctx.probe_on_val else None}


def _few_shot_rows(y: np.ndarray, j: int, setting: tuple[str, float], rng) -> np.ndarray:
    kind, v = setting
    if kind == "fraction":
        n = len(y)
        return rng.choice(n, size=max(1, int(round(v * n))), replace=False)
    col = y[:, j]
    pos, neg = np.flatnonzero(col == 1), np.flatnonzero(col == 0)
    k = int(v)
    return np.r_[rng.choice(pos, min(k, len(pos)), replace=False), rng.choice(neg, min(k, len(neg)), replace=False)]


def _few_shot(ctx: Context) -> dict:
    c = ctx.cfg
    probes = ctx.fitted_probes()
    settings = [(f"{v * 100:g}%", ("fraction", v)) for v in c.few_shot_fractions] + \
               [(f"{k}-shot", ("shots", k)) for k in c.few_shot_shots]
    out: dict = {}
    for name, setting in settings:
        seeds = 1 if setting == ("fraction", 1.0) else c.few_shot_seeds  # all labels: one draw is all draws
        per, n_used = {}, []
        for j, f in enumerate(ctx.findings):
            vals = []
            for seed in range(seeds):
                rows = _few_shot_rows(ctx.train.y, j, setting, np.random.default_rng([seed, j]))
                n_used.append(len(rows))
                pr = fit_probe(ctx.train.x[rows], ctx.train.y[rows, j], probes[j].c or 1.0, seed)
                vals.append(_num(auroc(pr.predict(ctx.test.x), ctx.test.y[:, j])) if pr.model is not None else None)
            m, ci = _mean_ci(vals)
            per[f] = {"auroc": m, "ci95": ci, "seeds": vals}
        means = [_mean_auroc({f: {"auroc": v["seeds"][s]} for f, v in per.items()}) for s in range(seeds)]
        m, ci = _mean_ci(means)
        out[name] = {"per_finding": per, "mean_auroc": m, "ci95": ci, "n_seeds": seeds,
                     "mean_train_samples": float(np.mean(n_used)) if n_used else 0}
    return {"settings": out, "seeds": list(range(c.few_shot_seeds)), "fractions": list(c.few_shot_fractions),
            "shots": list(c.few_shot_shots), "c_from": "linear_probe"}


def _youden(scores, labels) -> float:
    from sklearn.metrics import roc_curve

    s, y = _known(scores, labels)
    fpr, tpr, thr = roc_curve(y, s)
    return float(np.clip(thr[int(np.argmax(tpr - fpr))], 0, 1))


def _group_stats(s: np.ndarray, y: np.ndarray, pred: np.ndarray, n_boot: int, seed: int) -> dict:
    known = ~np.isnan(y)
    yk, pk = y[known] > 0.5, pred[known]
    lo, hi = bootstrap_ci(s, y, n=n_boot, seed=seed)
    return {"auroc": _num(auroc(s, y)), "ci95": [_num(lo), _num(hi)], "n_pos": int(yk.sum()), "n_neg": int((~yk).sum()),
            "tpr": _num(float(pk[yk].mean())) if yk.any() else None, "positive_rate": _num(float(pk.mean())) if len(pk) else None}


def _fairness(ctx: Context) -> dict:
    c = ctx.cfg
    scorer = ctx.scorers()[0]
    scores, y = ctx.scores(scorer, ctx.test), ctx.test.y
    thresholds = {f: (c.threshold if c.threshold is not None else
                      (_youden(scores[:, j], y[:, j]) if not math.isnan(auroc(scores[:, j], y[:, j])) else 0.5))
                  for j, f in enumerate(ctx.findings)}
    overall = {f: _num(auroc(scores[:, j], y[:, j])) for j, f in enumerate(ctx.findings)}
    attrs = {}
    for attr, labels in ctx.groups.items():
        labels = np.asarray(labels, dtype=object)
        groups: dict = {}
        for g in sorted({v for v in labels if v is not None}):
            rows = labels == g
            n = int((rows[:, None] & ~np.isnan(y)).any(1).sum())
            if n < c.min_group:
                groups[g] = {"n": n, "too_small": True}
                continue
            per = {f: _group_stats(scores[rows, j], y[rows, j], scores[rows, j] >= thresholds[f], c.bootstrap, j)
                   for j, f in enumerate(ctx.findings)}
            groups[g] = {"n": n, "too_small": False, "per_finding": per}
        attrs[attr] = {"groups": groups, "n_unknown": int(sum(v is None for v in labels)),
                       "per_finding": _gaps(groups, overall)}
    return {"scorer": scorer, "threshold": thresholds, "threshold_rule": "fixed" if c.threshold is not None else "youden",
            "min_group": c.min_group, "overall_auroc": overall, "attributes": attrs}


def _gaps(groups: dict, overall: dict) -> dict:
    """Per finding over the groups large enough: AUROC gap (max - min), ES-AUC = AUC / (1 + Σ|AUC -
    AUC_g|), equal-opportunity (TPR) and statistical-parity (positive rate) differences."""
    out = {}
    for f, auc in overall.items():
        rows = [g["per_finding"][f] for g in groups.values() if not g["too_small"]]
        aucs = [r["auroc"] for r in rows if r["auroc"] is not None]
        tprs = [r["tpr"] for r in rows if r["tpr"] is not None]
        rates = [r["positive_rate"] for r in rows if r["positive_rate"] is not None]
        out[f] = {"groups_compared": len(rows),
                  "auroc_gap": max(aucs) - min(aucs) if len(aucs) > 1 else None,
                  "es_auc": auc / (1 + sum(abs(auc - a) for a in aucs)) if auc is not None and len(aucs) > 1 else None,
                  "equal_opportunity_diff": max(tprs) - min(tprs) if len(tprs) > 1 else None,
                  "statistical_parity_diff": max(rates) - min(rates) if len(rates) > 1 else None}
    return out


def _robustness(ctx: Context) -> dict:
    from radforge import corruptions

    c = ctx.cfg
    scorer = ctx.scorers()[0]
    names = list(c.corruptions) or corruptions.for_kind(ctx.kind)
    for n in names:
        if ctx.kind not in corruptions.get(n).kinds:
            raise ConfigError(f"eval.corruptions: {n!r} does not apply to {ctx.kind} images "
                              f"(these do: {', '.join(corruptions.for_kind(ctx.kind))})")
    n_boot = min(c.bootstrap, 200)

    def figures(p: Pass) -> dict:
        per = _per_finding(ctx.scores(scorer, p), p.y, ctx.findings, n_boot)
        return {"per_finding": {f: {"auroc": v["auroc"], "ci95": v["ci95"]} for f, v in per.items()},
                "mean_auroc": _mean_auroc(per)}

    clean = figures(ctx.test)
    out: dict = {}
    total, done = len(names) * len(c.severities), 0
    for name in names:
        out[name] = {}
        for sev in c.severities:
            done += 1
            ctx.say(f"robustness: {name} severity {sev} ({done}/{total})")
            fig = figures(ctx.stream(corruption=name, severity=sev))
            m0, m = clean["mean_auroc"], fig["mean_auroc"]
            fig["relative_drop"] = (m0 - m) / m0 if m0 and m is not None else None
            out[name][str(sev)] = fig
    levels = {n: list(corruptions.get(n).levels[ctx.kind]) for n in names}
    return {"scorer": scorer, "clean": clean, "corruptions": out, "severities": list(c.severities),
            "levels": levels, "seed": c.corruption_seed, "bootstrap": n_boot}


def _calibration(ctx: Context) -> dict:
    sources = {}
    for scorer in ctx.scorers():
        probs = ctx.scores(scorer, ctx.test)
        per = {}
        for j, f in enumerate(ctx.findings):
            value, diagram = ece(probs[:, j], ctx.test.y[:, j], ctx.cfg.ece_bins)
            lo, hi = ece_ci(probs[:, j], ctx.test.y[:, j], ctx.cfg.ece_bins, n=ctx.cfg.bootstrap, seed=j)
            per[f] = {"ece": _num(value), "ci95": [_num(lo), _num(hi)], "reliability": diagram}
        vals = [v["ece"] for v in per.values() if v["ece"] is not None]
        sources[scorer] = {"per_finding": per, "mean_ece": float(np.mean(vals)) if vals else None}
    return {"bins": ctx.cfg.ece_bins, "sources": sources}


PROTOCOLS: dict[str, Callable[[Context], dict]] = {
    "zero_shot": _zero_shot, "retrieval": _retrieval, "recon_loss": _recon_loss, "knn": _knn,
    "linear_probe": _linear_probe, "few_shot": _few_shot, "fine_tune": _fine_tune, "fairness": _fairness,
    "robustness": _robustness, "calibration": _calibration,
}
assert tuple(PROTOCOLS) == EVALUATIONS, "one function per protocol of models.objective.EVALUATIONS"
_NEEDS_TRAIN = {"knn", "linear_probe", "few_shot"}


def _capability_message(model, name: str) -> str:
    needs = " or ".join("+".join(sorted(n)) for n in EVALUATION_NEEDS[name])
    return (f"a {model.name} model cannot run {name}: it needs {needs} "
            f"(it can: {', '.join(sorted(model.capabilities)) or 'nothing but train'})")


def resolve_protocols(requested: Sequence[str], model) -> tuple[list[str], dict]:
    """Names (or "all", or "quick") -> (protocols to run, {skipped protocol: reason})."""
    names: list[str] = []
    for r in requested:
        for n in (x.strip() for x in str(r).split(",")):
            if n == "all":
                names += list(EVALUATIONS)
            elif n == "quick":
                names += [p for p in QUICK if p != "linear_probe" or "zero_shot" not in model.capabilities]
            elif n in PROTOCOLS:
                names.append(n)
            elif n:
                raise ConfigError(f"unknown evaluation protocol {n!r} (known: {', '.join(EVALUATIONS)}, all)")
    names = list(dict.fromkeys(names))
    ok = set(model.evaluations)
    return [n for n in names if n in ok], {n: _capability_message(model, n) for n in names if n not in ok}


def _execute(ctx: Context, names: Sequence[str], skipped: dict) -> tuple[dict, dict]:
    """Run `names` on ctx; protocols whose inputs are missing are skipped with the reason."""
    labelled = ctx.test.y.shape[1] > 0 and bool((~np.isnan(ctx.test.y)).any())
    results, seconds = {}, {}
    for name in names:
        why = None
        if not labelled and name not in LABEL_FREE:
            why = "the split has no labels: only the label-free protocols (retrieval, recon_loss) ran"
        elif name in _NEEDS_TRAIN and ctx.train is None:
            why = ctx.train_missing
        elif name in ("fairness", "robustness", "calibration") and not ctx.scorers():
            why = "no scorer: the model has no classifier or zero-shot, and there is no train split for a probe"
        elif name == "fairness" and not ctx.groups:
            why = "the shards carry no sex or age (ingest with deid.keep_age_sex: true)"
        elif name == "robustness" and ctx.stream is None:
            why = "robustness needs the shard set (run, not run_on_batches)"
        if why:
            skipped[name] = why
            continue
        t0 = time.perf_counter()
        ctx.say(f"{name} …")
        # Small dense fits: BLAS threads only contend (lbfgs 8x slower with 2 threads on 2 busy cores).
        with threadpool_limits(1):
            results[name] = PROTOCOLS[name](ctx)
        seconds[name] = round(time.perf_counter() - t0, 3)
    return results, seconds


def _headline(results: dict) -> dict:
    """The legacy top-level keys: the best scorer's per_finding / mean_auroc, recall, recon_loss."""
    out: dict = {"per_finding": {}, "mean_auroc": None}
    for s in SCORERS:
        if s in results:
            out["per_finding"], out["mean_auroc"] = results[s]["per_finding"], results[s]["mean_auroc"]
            break
    if "linear_probe" in results:
        out["linear_probe"] = results["linear_probe"]
    if "retrieval" in results:
        out["n_with_report"] = results["retrieval"]["n_with_report"]
        if "recall" in results["retrieval"]:
            out["recall"] = results["retrieval"]["recall"]
    if "recon_loss" in results:
        out["recon_loss"] = results["recon_loss"]["recon_loss"]
    return out


def _prompts(loaded, cfg: EvalConfig) -> dict:
    """The model's saved prompts (model.json), unless cfg's differ from the defaults."""
    default = EvalConfig()
    explicit = (cfg.positive_prompt, cfg.negative_prompt) != (default.positive_prompt, default.negative_prompt)
    saved = getattr(loaded, "prompts", None) or {}
    if not explicit and saved.get("positive") and saved.get("negative"):
        return {"positive": saved["positive"], "negative": saved["negative"], "source": "model.json"}
    return {"positive": cfg.positive_prompt, "negative": cfg.negative_prompt, "source": "eval config"}


def _config(cfg: EvalConfig, ctx: Context, names: Sequence[str], split: str) -> dict:
    from radforge import corruptions
    from radforge.config import to_dict

    out = {"split": split, "protocols": list(names), "findings": list(ctx.findings), "prompts": dict(ctx.prompts),
           "eval": to_dict(cfg), "bootstrap_seeds": "finding index", "batch": EVAL_BATCH}
    if "robustness" in names:
        out["corruptions"] = list(cfg.corruptions) or corruptions.for_kind(ctx.kind)
    return out


def run_on_batches(loaded, batches: Iterable[dict], cfg: EvalConfig, *, findings: Sequence[str] | None = None,
                   train_batches: Iterable[dict] | None = None, protocols: Sequence[str] = ("quick",)) -> dict:
    """Evaluate `loaded` (a checkpoint.LoadedModel, or a bare radforge.models objective) on
    `batches`; by default the in-loop set ("quick": zero-shot or, without it, the linear probe;
    retrieval; reconstruction loss). train_batches: the probes are fitted on them (else those
    protocols are skipped). -> {"kind", "n", "protocols", "skipped", "per_finding", "mean_auroc",
    "recall", "recon_loss", "linear_probe" (legacy keys), "seconds"}."""
    t0 = time.perf_counter()
    model = _model_of(loaded)
    was_training = model.training
    model.eval()
    findings = list(findings if findings is not None else (getattr(loaded, "findings", None) or cfg.findings))
    names, skipped = resolve_protocols(protocols, model)
    try:
        test = embed_pass(model, batches, cfg.max_samples, recon="recon_loss" in names)
        if test.y.shape[1] != len(findings):
            raise ValueError(f"batches carry {test.y.shape[1]} label columns, findings names {len(findings)}")
        train = None
        if train_batches is not None and set(names) & (_NEEDS_TRAIN | {"fairness", "robustness", "calibration"}):
            train = embed_pass(model, train_batches, cfg.max_samples)
        ctx = Context(model=model, cfg=cfg, findings=findings, prompts=_prompts(loaded, cfg), test=test, train=train,
                      model_findings=list(getattr(loaded, "findings", None) or findings))
        results, seconds = _execute(ctx, names, skipped)
    finally:
        model.train(was_training)
    result = {"kind": model.name, "n": len(test.texts), "protocols": results, "skipped": skipped,
              **_headline(results), "protocol_seconds": seconds}
    if "linear_probe" in results:
        result["linear_probe"] = results["linear_probe"]
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _group_labels(shards: str, split: str, keys: Sequence[str], age_edges: Sequence[int]) -> dict:
    """attribute -> group per key, from the samples' metadata: `acquisition.sex` / `.age`
    (shards/SPEC.md; ingest keeps them only with deid.keep_age_sex), an `age_band` used as it
    is; top-level keys of those names are read too."""
    import json

    from radforge import shardspec

    manifest = shardspec.read_manifest(shards)
    want, meta = set(keys), {}
    for raw in shardspec.iter_samples(shardspec.shards_root(shards), manifest, split=split):
        if raw["__key__"] in want and "json" in raw:
            m = json.loads(raw["json"])
            m = {**m, **(m.get("acquisition") or {})}
            meta[raw["__key__"]] = (m.get("sex"), m.get("age_band") or age_band(m.get("age"), age_edges))
    sex = [_sex(meta.get(k, (None, None))[0]) for k in keys]
    band = [meta.get(k, (None, None))[1] for k in keys]
    out = {}
    if any(s is not None for s in sex):
        out["sex"] = sex
    if any(b is not None for b in band):
        out["age_band"] = band
    return out


def _sex(v) -> str | None:
    return {"M": "M", "F": "F", "O": "O"}.get(str(v).strip().upper()[:1]) if v else None


def age_band(age, edges: Sequence[int] = (18, 40, 60, 80)) -> str | None:
    """A DICOM AS age ("067Y", "006M", "010W", "003D") or a number of years -> its band label
    ("60-79", "80+"); None when absent or unreadable. Never sees a date."""
    if age is None or age == "":
        return None
    if isinstance(age, str) and re.fullmatch(r"\d+-\d+|\d+\+", age.strip()):
        return age.strip()  # already a band (an ingest that stores bands)
    try:
        if isinstance(age, (int, float)):
            years = float(age)
        else:
            s = str(age).strip().upper()
            unit = s[-1] if s[-1] in "YMWD" else "Y"
            years = float(s.rstrip("YMWD")) / {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[unit]
    except (ValueError, IndexError):
        return None
    lows = [0, *edges]
    for lo, hi in zip(lows, [*edges, None]):
        if hi is None or years < hi:
            return f"{lo}+" if hi is None else f"{lo}-{hi - 1}"
    return None


def _reference_passes(stream, names, obj, split: str, splits, say) -> tuple[Pass | None, Pass | None]:
    """The train pass (probes, kNN) and the val pass (the probes' C), when a protocol needs them."""
    need = set(names) & (_NEEDS_TRAIN | {"fairness", "robustness", "calibration"})
    if not need or "embed_image" not in obj.capabilities or split == "train" or "train" not in splits:
        return None, None
    say("embedding split train")
    train = stream("train")
    if "val" not in splits or split == "val":
        return train, None
    say("embedding split val")
    return train, stream("val")


def run(model, shards: str, split: str = "test", protocols: Sequence[str] = ("all",), report_dir: str | None = None,
        cfg: EvalConfig | None = None, *, progress: bool = False) -> dict:
    """Evaluate an exported model (dir URL, or a checkpoint.LoadedModel) on `split` of `shards`
    with `protocols` (names, "all": every protocol the model supports, "quick": the in-loop set).

    The loader runs in evaluation mode (one pass, deterministic centre view); probes are fitted
    on the "train" split, C chosen on "val"; robustness re-streams `split` through corrupted
    views. `report_dir`: also write the HTML report there (radforge.viz.write_report).
    -> {"model_id", "kind", "split", "n", "protocols": {name: figures}, "skipped": {name: why},
        "config": everything needed to repeat the run, "protocol_seconds", "seconds",
        "per_finding" / "mean_auroc" / "recall" / "recon_loss" (the headline, legacy keys)}."""
    import tempfile

    from radforge import corruptions, shardspec, storage
    from radforge.config import DataConfig
    from radforge.loader import build_loader

    t0 = time.perf_counter()
    cfg = cfg or EvalConfig()
    say = (lambda m: print(f"evaluate: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    if isinstance(model, str):
        from radforge.checkpoint import load_for_inference

        model = load_for_inference(model)
    obj = _model_of(model)
    names, skipped = resolve_protocols(protocols, obj)
    for name, why in skipped.items():
        say(f"skipping {name}: {why}")
    findings = list(cfg.findings) or list(model.findings) or None
    kind = model.image.name
    splits = shardspec.read_manifest(shards)["totals"].get("by_split", {})
    if split not in splits:
        raise ConfigError(f"split {split!r} is not in {shards} (it has: {', '.join(sorted(splits)) or 'none'})")

    # Remote shards are read once per pass (robustness: 1 + corruptions x severities passes), so a
    # run-scoped local cache turns the repeats into disk reads (removed when the run ends).
    cache = None if storage.is_local(shards) else tempfile.TemporaryDirectory(prefix="radforge-eval-")

    def loader(which: str, corruption: str | None = None, severity: int | None = None):
        data = DataConfig(shards=shards, image=kind, num_workers=0, require_report=False,
                          cache_dir=cache.name if cache else None)
        wrap = (lambda v: corruptions.CorruptedView(v, kind, corruption, severity, cfg.corruption_seed)) if corruption else None
        return build_loader(data, model.view, split=which, batch_size=EVAL_BATCH, train=False, findings=findings, corrupt=wrap)

    def stream(which: str, corruption: str | None = None, severity: int | None = None) -> Pass:
        return embed_pass(obj, loader(which, corruption, severity), cfg.max_samples,
                          recon=corruption is None and which == split and "recon_loss" in names)

    was_training = obj.training
    obj.eval()
    try:
        findings = loader(split).findings  # the split's label columns when neither cfg nor model names them
        say(f"embedding split {split}")
        test = stream(split)
        train, val = _reference_passes(stream, names, obj, split, splits, say)
        groups = _group_labels(shards, split, test.keys, cfg.age_bands) if "fairness" in names else None
        ctx = Context(model=obj, cfg=cfg, findings=list(findings or []), prompts=_prompts(model, cfg), test=test,
                      train=train, val=val, kind=kind, stream=lambda corruption, severity: stream(split, corruption, severity),
                      groups=groups, model_findings=list(getattr(model, "findings", None) or []), say=say)
        if split == "train":
            ctx.train_missing = "probes are fitted on the train split: evaluate another split (val, test)"
        results, seconds = _execute(ctx, names, skipped)
    finally:
        obj.train(was_training)
        if cache is not None:
            cache.cleanup()
    result = {"model_id": getattr(model, "model_id", None), "kind": obj.name, "split": split, "n": len(test.texts),
              "protocols": results, "skipped": skipped, "config": _config(cfg, ctx, names, split), **_headline(results),
              "protocol_seconds": seconds, "seconds": round(time.perf_counter() - t0, 3)}
    if report_dir:
        from radforge import viz

        result["report"] = viz.write_report(result, ctx.curves, report_dir)
        say(f"report written to {result['report']}")
    return result


# ---------------------------------------------------------------------------------------------
# presentation


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def _ci(ci) -> str:
    lo, hi = (ci or [None, None])[:2]
    return "-" if lo is None else f"[{lo:.3f}, {hi:.3f}]"


def _auroc_rows(title: str, block: Mapping, w: int) -> list[str]:
    lines = [f"{title}", f"  {'finding':<{w}}  {'AUROC':>7}  {'95% CI':>17}  {'pos':>5}  {'neg':>5}"]
    for f, v in block["per_finding"].items():
        lines.append(f"  {f:<{w}}  {_fmt(v['auroc']):>7}  {_ci(v.get('ci95')):>17}  {v.get('n_pos', ''):>5}  {v.get('n_neg', ''):>5}")
    lines.append(f"  {'mean':<{w}}  {_fmt(block.get('mean_auroc')):>7}")
    return lines


def format_table(result: Mapping) -> str:
    """A plain-text summary of a result dict (what `radforge evaluate` prints without --json)."""
    lines = [f"{result.get('kind', '?')} evaluation on {result.get('split', '?')}: n={result.get('n')}"]
    prot = result.get("protocols") or {}
    per = result.get("per_finding") or {}
    w = max([12, *(len(f) for f in per)])
    titles = {"zero_shot": "zero-shot AUROC", "knn": "kNN AUROC", "linear_probe": "linear-probe AUROC",
              "fine_tune": "fine-tuned head AUROC"}
    for name, title in titles.items():
        if name in prot:
            lines += _auroc_rows(title, prot[name], w)
    if not any(n in prot for n in titles) and per:  # a legacy-shaped result
        lines += _auroc_rows("linear-probe AUROC" if "linear_probe" in result else "zero-shot AUROC", result, w)
    if "few_shot" in prot:
        lines.append("few-shot mean AUROC (95% CI over seeds)")
        for s, v in prot["few_shot"]["settings"].items():
            lines.append(f"  {s:<10} {_fmt(v['mean_auroc'])}  {_ci(v['ci95'])}  seeds={v['n_seeds']}")
    if "fairness" in prot:
        fr = prot["fairness"]
        lines.append(f"fairness ({fr['scorer']}, threshold {fr['threshold_rule']})")
        for attr, a in fr["attributes"].items():
            for g, v in a["groups"].items():
                desc = "too small" if v["too_small"] else "  ".join(
                    f"{f}={_fmt(x['auroc']).strip()}" for f, x in v["per_finding"].items())
                lines.append(f"  {attr}={g:<8} n={v['n']:<5} {desc}")
            for f, gap in a["per_finding"].items():
                lines.append(f"  {attr} {f}: gap {_fmt(gap['auroc_gap']).strip()}  ES-AUC {_fmt(gap['es_auc']).strip()}  "
                             f"EOD {_fmt(gap['equal_opportunity_diff']).strip()}  SPD {_fmt(gap['statistical_parity_diff']).strip()}")
    if "robustness" in prot:
        rb = prot["robustness"]
        lines.append(f"robustness ({rb['scorer']}): mean AUROC by severity {rb['severities']}, clean {_fmt(rb['clean']['mean_auroc']).strip()}")
        for name, sev in rb["corruptions"].items():
            lines.append(f"  {name:<15} " + "  ".join(_fmt(v["mean_auroc"]) for v in sev.values()))
    if "calibration" in prot:
        for s, v in prot["calibration"]["sources"].items():
            lines.append(f"calibration {s}: mean ECE {_fmt(v['mean_ece']).strip()}")
    rec = result.get("recall")
    if rec:
        for name in ("image_to_text", "text_to_image"):
            ks = "  ".join(f"R@{k}={rec[name][k]:.3f}" for k in rec[name])
            lines.append(f"{name.replace('_', ' '):<14} {ks}")
    if result.get("recon_loss") is not None:
        lines.append(f"reconstruction loss (masked patches): {result['recon_loss']:.4f}")
    for name, why in (result.get("skipped") or {}).items():
        lines.append(f"skipped {name}: {why}")
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    return "\n".join(lines)
