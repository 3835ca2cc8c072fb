"""Evaluation: zero-shot AUROC with bootstrap CIs, retrieval recall@K, validation reconstruction
loss and linear-probe AUROC — each run for the models whose capabilities allow it (CLIP: the
first two; MAE: the last two), as the model's `evaluations` say (radforge.models.objective).

Layers, from the bottom:

* metric functions on arrays (`auroc`, `bootstrap_ci`, `recall_at_k`, `linear_probe`), no model;
* `run_on_batches(loaded, batches, cfg)`: a model over an iterable of loader batches -> result;
  radforge.train calls this in the loop with its own validation loader;
* `run(model, shards, split=, cfg=)`: loads an exported model (radforge.checkpoint) and streams
  the split with radforge.loader in evaluation mode (one pass, centre crops), then the above.

AUROC is the Mann-Whitney statistic on mid-ranks (ties count one half), so no sklearn. Labels
follow the loader: 1 positive, 0 negative, NaN uncertain/missing; NaN rows are left out per
finding ("U-ignore"), and a finding whose evaluation split lacks either class gets no AUROC and
is left out of `mean_auroc` (it is still listed, with its counts). Bootstrap CIs resample
samples with replacement (seeded; resamples with one class only are redrawn by skipping) and
report the 2.5 / 97.5 percentiles.

The result is a JSON-able dict (see `run_on_batches`); it never holds report text or sample
keys, only aggregate numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from radforge.config import EvalConfig

KS = (1, 5, 10)
EVAL_BATCH = 16  # samples per forward pass in evaluation (memory, not results, depends on it)


# ---------------------------------------------------------------------------------------------
# metrics on arrays


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based mid-ranks (ties get the mean of their ranks)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # group boundaries of equal values
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    mid = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mid, ends - starts)
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + P(tie)/2. NaN labels are ignored;
    NaN when either class is absent."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    keep = ~np.isnan(y)
    s, y = s[keep], y[keep] > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(scores, labels, *, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of the AUROC. (nan, nan) if n == 0 or one class only."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    keep = ~np.isnan(y)
    s, y = s[keep], y[keep]
    if n <= 0 or math.isnan(auroc(s, y)):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        idx = rng.integers(0, len(s), len(s))
        a = auroc(s[idx], y[idx])
        if not math.isnan(a):
            stats.append(a)
    if not stats:
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


def linear_probe(train_x, train_y, eval_x, eval_y, *, steps: int = 300, l2: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Per-column logistic regression on frozen features (full-batch L-BFGS in torch, features
    standardised with the training statistics, NaN labels masked out). -> eval scores [N, F]
    (logits; AUROC only needs their order). Columns without both classes in train score 0."""
    torch.manual_seed(seed)
    xt = torch.as_tensor(np.asarray(train_x), dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(train_y), dtype=torch.float64)
    xe = torch.as_tensor(np.asarray(eval_x), dtype=torch.float64)
    mu, sd = xt.mean(0), xt.std(0).clamp(min=1e-6)
    xt, xe = (xt - mu) / sd, (xe - mu) / sd
    known = ~torch.isnan(yt)
    y0 = torch.nan_to_num(yt)
    w = torch.zeros(xt.shape[1], yt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(yt.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")
    # callers (the training loop's in-loop evaluation) may run under torch.no_grad()

    def closure():
        opt.zero_grad()
        logits = xt @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y0, reduction="none")
        loss = (loss * known).sum() / known.sum().clamp(min=1) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (xe @ w + b).numpy()


# ---------------------------------------------------------------------------------------------
# model over batches


def _per_finding(scores: np.ndarray, labels: np.ndarray, findings: Sequence[str], cfg: EvalConfig) -> dict:
    out = {}
    for j, f in enumerate(findings):
        y = labels[:, j]
        known = ~np.isnan(y)
        a = auroc(scores[:, j], y)
        lo, hi = bootstrap_ci(scores[:, j], y, n=cfg.bootstrap, seed=j)
        out[f] = {"auroc": _num(a), "ci95": [_num(lo), _num(hi)],
                  "n_pos": int((y[known] > 0.5).sum()), "n_neg": int((y[known] <= 0.5).sum())}
    return out


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _mean_auroc(per_finding: Mapping) -> float | None:
    vals = [v["auroc"] for v in per_finding.values() if v["auroc"] is not None]
    return float(np.mean(vals)) if vals else None


def _take(batches: Iterable[dict], max_samples: int) -> Iterable[dict]:
    seen = 0
    for batch in batches:
        if max_samples and seen >= max_samples:
            return
        if max_samples and seen + len(batch["image"]) > max_samples:
            cut = max_samples - seen
            batch = {k: v[:cut] for k, v in batch.items()}
        seen += len(batch["image"])
        yield batch


def _model_of(loaded):
    """The objective module of a checkpoint.LoadedModel, or the module itself."""
    return getattr(loaded, "model", loaded)


@torch.no_grad()
def _embed_images(model, batches, max_samples: int, with_recon: bool = False):
    """One pass: image embeddings [N, D], labels [N, F], reports, and the mean seeded
    reconstruction loss (when `with_recon`; else None)."""
    param = next(model.parameters())
    device, dtype = param.device, (param.dtype if param.dtype.is_floating_point else torch.float32)
    feats, labels, texts, recon, n_recon = [], [], [], 0.0, 0
    gen = torch.Generator(device="cpu").manual_seed(0)  # the same masks every evaluation
    for batch in _take(batches, max_samples):
        images = batch["image"].to(device=device, dtype=dtype)  # bf16/fp16 engines take their own dtype
        feats.append(model.embed_image(images).float().cpu())
        if with_recon:
            recon += float(model.reconstruction_loss(images, gen)) * len(images)
            n_recon += len(images)
        if "labels" in batch:
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.float64))
        texts += list(batch.get("text", [""] * len(images)))
    x = torch.cat(feats).numpy() if feats else np.zeros((0, 0))
    y = torch.cat(labels).numpy() if labels else np.zeros((len(x), 0))
    return x, y, texts, (recon / n_recon if n_recon else None)


def _zero_shot(model, x, y, findings, cfg: EvalConfig) -> dict:
    scores = model.zero_shot_from_embeddings(torch.as_tensor(x), findings, cfg.positive_prompt,
                                             cfg.negative_prompt).numpy() if findings and len(x) else np.zeros(y.shape)
    per = _per_finding(scores, y, findings, cfg)
    return {"per_finding": per, "mean_auroc": _mean_auroc(per)}


@torch.no_grad()
def _retrieval(model, x, texts) -> dict:
    has = [i for i, t in enumerate(texts) if t]
    out: dict = {"n_with_report": len(has)}
    if has:
        t_emb = torch.cat([model.embed_text([texts[i] for i in has[s:s + EVAL_BATCH]]).float().cpu()
                           for s in range(0, len(has), EVAL_BATCH)]).numpy()
        groups = [hash(texts[i]) for i in has]  # identical reports are interchangeable
        out["recall"] = recall_at_k(x[has] @ t_emb.T, KS, groups)
    return out


def _linear_probe(model, x, y, findings, train_batches, cfg: EvalConfig) -> dict:
    xt, yt, _, _ = _embed_images(model, train_batches, cfg.max_samples)
    per = _per_finding(linear_probe(xt, yt, x, y), y, findings, cfg)
    probe = {"per_finding": per, "mean_auroc": _mean_auroc(per), "n_train": int(len(xt))}
    return {"linear_probe": probe, "per_finding": per, "mean_auroc": probe["mean_auroc"]}


def run_on_batches(loaded, batches: Iterable[dict], cfg: EvalConfig, *, findings: Sequence[str] | None = None,
                   train_batches: Iterable[dict] | None = None) -> dict:
    """Evaluate `loaded` (a checkpoint.LoadedModel, or a bare radforge.models objective) on `batches`
    with the protocols its `evaluations` name (radforge.models.objective):

        zero_shot     "per_finding", "mean_auroc" from the model's prompt probabilities
        retrieval     "recall" (when any sample has a report), "n_with_report"
        recon_loss    "recon_loss" (seeded masks: reproducible)
        linear_probe  "linear_probe", and its "per_finding" / "mean_auroc" (with train_batches)

    findings: the label columns of the batches (default: `loaded.findings`, else cfg.findings).
    train_batches: the linear probe is fitted on them (skipped when None).
    -> {"kind" (the objective's name), "n", "per_finding", "mean_auroc", ... as above, "seconds"}
    `recall` holds only {"image_to_text": {k: r}, "text_to_image": {k: r}} (k = "1", "5", "10").
    """
    t0 = time.perf_counter()
    model = _model_of(loaded)
    was_training = model.training
    model.eval()
    findings = list(findings if findings is not None else (getattr(loaded, "findings", None) or cfg.findings))
    protocols = model.evaluations
    try:
        x, y, texts, recon = _embed_images(model, batches, cfg.max_samples, with_recon="recon_loss" in protocols)
        result: dict = {"kind": model.name, "n": int(len(x)), "per_finding": {}, "mean_auroc": None}
        if y.shape[1] != len(findings):
            raise ValueError(f"batches carry {y.shape[1]} label columns, findings names {len(findings)}")
        if "zero_shot" in protocols:
            result.update(_zero_shot(model, x, y, findings, cfg))
        if "retrieval" in protocols:
            result.update(_retrieval(model, x, texts))
        if "recon_loss" in protocols:
            result["recon_loss"] = recon
        if "linear_probe" in protocols and train_batches is not None and findings and len(x):
            result.update(_linear_probe(model, x, y, findings, train_batches, cfg))
    finally:
        model.train(was_training)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def run(model, shards: str, *, split: str = "test", cfg: EvalConfig | None = None) -> dict:
    """Evaluate an exported model (dir URL, or a checkpoint.LoadedModel) on `split` of `shards`.

    The loader runs in evaluation mode (one pass, deterministic centre view). A linear probe
    (models without zero-shot) is fitted on the shard set's training split ("train") and scored
    on `split`."""
    from radforge.config import DataConfig
    from radforge.loader import build_loader

    cfg = cfg or EvalConfig()
    if isinstance(model, str):
        from radforge.checkpoint import load_for_inference

        model = load_for_inference(model)
    findings = list(cfg.findings) or list(model.findings) or None

    def loader(which: str):
        data = DataConfig(shards=shards, image=model.image.name, num_workers=0, require_report=False)
        return build_loader(data, model.view, split=which, batch_size=EVAL_BATCH, train=False, findings=findings)

    batches = loader(split)
    probe = "linear_probe" in _model_of(model).evaluations and split != "train" and batches.findings
    result = run_on_batches(model, batches, cfg, findings=batches.findings, train_batches=loader("train") if probe else None)
    result["split"] = split
    result["model_id"] = getattr(model, "model_id", None)
    return result


# ---------------------------------------------------------------------------------------------
# presentation


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def format_table(result: Mapping) -> str:
    """A plain-text table of a result dict (what `radforge evaluate` prints without --json)."""
    lines = [f"{result.get('kind', '?')} evaluation on {result.get('split', '?')}: n={result.get('n')}"]
    per = result.get("per_finding") or {}
    if per:
        title = "linear-probe AUROC" if "linear_probe" in result else "zero-shot AUROC"
        w = max(12, *(len(f) for f in per))
        lines.append(f"{'finding':<{w}}  {title:>18}  {'95% CI':>17}  {'pos':>5}  {'neg':>5}")
        for f, v in per.items():
            lo, hi = v["ci95"]
            ci = f"[{_fmt(lo).strip()}, {_fmt(hi).strip()}]" if lo is not None else "-"
            lines.append(f"{f:<{w}}  {_fmt(v['auroc']):>18}  {ci:>17}  {v['n_pos']:>5}  {v['n_neg']:>5}")
        lines.append(f"{'mean':<{w}}  {_fmt(result.get('mean_auroc')):>18}")
    rec = result.get("recall")
    if rec:
        for name in ("image_to_text", "text_to_image"):
            ks = "  ".join(f"R@{k}={rec[name][k]:.3f}" for k in rec[name])
            lines.append(f"{name.replace('_', ' '):<14} {ks}")
    if result.get("recon_loss") is not None:
        lines.append(f"reconstruction loss (masked patches): {result['recon_loss']:.4f}")
    return "\n".join(lines)
