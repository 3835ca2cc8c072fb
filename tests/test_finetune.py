"""Fine-tuning (`kind: finetune`, radforge.models.finetune): a multi-label head on a ViT, full or
LoRA through peft. Fast tier: the recipe, the parameter counts, learning on a small synthetic
task in a few CPU steps, NaN-masked BCE, export → load. One slow test trains the recipe on Ray
Train + DeepSpeed on the session's ingested corpus and evaluates the export on its val split."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from radforge import checkpoint, config, kinds, models
from radforge.config import FinetuneConfig, ModelConfig, TrainRecipe, ViewConfig
from radforge.errors import ConfigError
from radforge.models.finetune import FineTune, merge_lora, trainable_parameters
from radforge.transforms import Profile

RECIPE = Path(__file__).resolve().parents[1] / "jobs" / "recipes" / "tiny-finetune-xray.yaml"
FINDINGS = ["left", "right"]


def _model(method: str, **kw) -> FineTune:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="finetune", patch_xray=8, findings=FINDINGS, finetune=FinetuneConfig(method=method, **kw))
    return models.build(cfg, "xray", (1, 32, 32))


def _task(n: int, seed: int) -> dict:
    """Noise images with a bright square in the left and/or right half (the two findings);
    a quarter of the labels unknown (NaN), as uncertain labels in the shards."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n, 2), generator=g).float()
    x = torch.randn(n, 1, 32, 32, generator=g) * 0.5
    x[y[:, 0] == 1, :, 12:20, 4:12] += 2.0
    x[y[:, 1] == 1, :, 12:20, 20:28] += 2.0
    labels = y.clone()
    labels[torch.rand(n, 2, generator=g) < 0.25] = float("nan")
    return {"image": x, "labels": labels, "truth": y}


def _auroc(model, data) -> list[float]:
    from sklearn.metrics import roc_auc_score  # here, not at collection: every xdist worker collects

    p = model.eval().classify(data["image"]).numpy()
    model.train()
    return [roc_auc_score(data["truth"][:, j].numpy(), p[:, j]) for j in range(p.shape[1])]


def _fit(model, data, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for s in range(steps):
        i = torch.arange(s * 16, s * 16 + 16) % data["image"].shape[0]
        loss = model({"image": data["image"][i], "labels": data["labels"][i]})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_recipe_loads_and_head_findings_are_one_list():
    r = config.load(TrainRecipe, str(RECIPE))
    assert r.model.kind == "finetune" and r.model.finetune.method == "lora"
    assert r.model.findings == r.eval.findings == ["nodule", "effusion", "cardiomegaly"]
    r2 = config.load(TrainRecipe, str(RECIPE), ["eval.findings=[]", "model.findings=[effusion]"])
    assert r2.eval.findings == ["effusion"]  # the loader reads what the head predicts
    with pytest.raises(ConfigError, match="needs its head's findings"):
        config.load(TrainRecipe, str(RECIPE), ["eval.findings=[]"])
    with pytest.raises(ConfigError, match="differ"):
        config.load(TrainRecipe, str(RECIPE), ["model.findings=[effusion]"])
    with pytest.raises(ConfigError, match="lora_targets"):
        config.load(TrainRecipe, str(RECIPE), ["model.finetune.lora_targets=[]"])


def test_lora_trains_only_the_adapters_and_the_head():
    """Trainable counts: full = every weight; LoRA = r × (in + out) per adapted Linear + the head."""
    full, lora = _model("full"), _model("lora", lora_r=4)
    total = sum(p.numel() for p in full.parameters())
    assert trainable_parameters(full) == total
    width, depth, f = 128, 4, len(FINDINGS)
    adapters = depth * 4 * ((width + 3 * width) + (width + width))  # attn.qkv 128→384, attn.proj 128→128
    head = width * f + f
    assert trainable_parameters(lora) == adapters + head
    assert {n.split(".")[-3] for n, p in lora.named_parameters() if p.requires_grad and n != "head.weight"
            and n != "head.bias"} == {"lora_A", "lora_B"}
    assert {n for n, p in lora.named_parameters() if p.requires_grad and "lora_" not in n} == {"head.weight", "head.bias"}
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    _fit(lora, _task(64, 0), steps=2, lr=1e-2)
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="no module named 'qkv_proj'"):
        _model("lora", lora_targets=["qkv_proj"])


def test_nan_labels_are_masked_out_of_the_loss():
    m = _model("full")
    data = _task(8, 1)
    out = m({"image": data["image"], "labels": data["labels"]})
    known = ~torch.isnan(data["labels"])
    logits = m.logits(data["image"])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], data["labels"][known])
    assert torch.allclose(out["loss"], ref) and math.isclose(float(out["labelled"]), float(known.float().mean()))
    none = m({"image": data["image"], "labels": torch.full((8, 2), float("nan"))})
    assert float(none["loss"].detach()) == 0.0 and none["loss"].requires_grad


@pytest.mark.parametrize("method,lr", [("full", 1e-3), ("lora", 1e-2)])
def test_finetune_learns_in_a_few_cpu_steps(method, lr):
    """Loss falls and classify's AUROC on held-out images rises (before: the zero head's 0.5)."""
    m = _model(method)
    train, held_out = _task(256, 0), _task(64, 1)
    before = _auroc(m, held_out)
    losses = _fit(m, train, steps=25, lr=lr)
    after = _auroc(m, held_out)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert min(after) > 0.8 and min(after) > max(before) + 0.2, (before, after)


def test_lora_export_merges_adapters_and_loads_exactly(tmp_path):
    """Export writes the adapters folded into the weights (method full in model.json): the
    loaded model is a plain ViT + head, loads strict, and classifies like the live LoRA model."""
    m = _model("lora", lora_r=4)
    _fit(m, _task(64, 0), steps=3, lr=1e-2)
    m.eval()
    cfg = ModelConfig(kind="finetune", patch_xray=8, findings=FINDINGS, finetune=FinetuneConfig(method="lora", lora_r=4))
    view = ViewConfig(xray_size=32)
    profile = Profile()
    out = checkpoint.write_model(str(tmp_path / "model"), m, image="xray", model_cfg=cfg, view=view, profile=profile,
                                 model_id="ft", findings=FINDINGS)
    meta = checkpoint.read_model_meta(out)
    assert meta["kind"] == "finetune" and meta["findings"] == FINDINGS and meta["model"]["findings"] == FINDINGS
    assert meta["model"]["finetune"]["method"] == "full"
    assert not any("lora_" in k or "base_layer" in k for k in checkpoint.read_weights(out))
    lm = checkpoint.load_for_inference(out)
    x = _task(16, 2)["image"]
    with torch.no_grad():
        assert torch.allclose(lm.model.classify(x), m.classify(x), atol=1e-5)
        assert torch.allclose(lm.embed_images(x), m.embed_image(x), atol=1e-5)
    assert set(lm.model.capabilities) == {"classify", "embed_image"}
    # the export's tower initialises another model like any export's encoder
    again = models.build(ModelConfig(kind="finetune", patch_xray=8, findings=["x"]), "xray", (1, 32, 32),
                         init_encoder=checkpoint.read_weights(out))
    assert torch.equal(again.encoder.patch_embed.proj.weight, lm.model.encoder.patch_embed.proj.weight)


@pytest.mark.parametrize("kind", ["mae", "clip"])
def test_starts_from_an_exported_models_image_encoder(tmp_path, kind):
    """`model.init_from` = an MAE export (`encoder.*`) or a CLIP export (`visual.*`): the tower's
    weights are the export's, the adapters start at zero (same function as the source tower)."""
    from radforge.models import text

    cfg = ModelConfig(kind=kind, patch_xray=8, decoder_width=32, decoder_depth=1)
    tok = text.train_tokenizer(["no effusion.", "a nodule is present."] * 10, cfg.text) if kind == "clip" else None
    src = models.build(cfg, "xray", (1, 32, 32), tok)
    out = checkpoint.write_model(str(tmp_path / kind), src, image="xray", model_cfg=cfg, view=ViewConfig(xray_size=32),
                                 profile=Profile(), model_id=kind)
    ft = models.build(ModelConfig(kind="finetune", patch_xray=8, findings=FINDINGS), "xray", (1, 32, 32),
                      init_encoder=checkpoint.read_weights(out)).eval()
    tower = src.encoder if kind == "mae" else src.visual
    x = _task(4, 3)["image"]
    with torch.no_grad():
        assert torch.allclose(ft.encoder.pool(x), tower.pool(x), atol=1e-6)


def test_merge_lora_is_the_adapted_layer():
    lin = torch.nn.Linear(6, 5)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    state = {"x.base_layer.weight": lin.weight, "x.base_layer.bias": lin.bias,
             "x.lora_A.default.weight": a, "x.lora_B.default.weight": b}
    merged = merge_lora(state, scaling=1.5)
    v = torch.randn(3, 6)
    ref = lin(v) + 1.5 * (v @ a.T @ b.T)
    assert set(merged) == {"x.weight", "x.bias"}
    assert torch.allclose(v @ merged["x.weight"].T + merged["x.bias"], ref, atol=1e-5)


@pytest.mark.slow
def test_lora_finetune_on_ray_deepspeed_learns_the_corpus_findings(ingested_corpus, ray_cluster, tmp_path):
    """tiny-finetune-xray (LoRA, 2 workers, ZeRO-2) on the session's corpus, shrunk to seconds:
    the loss falls, the export (adapters merged, ZeRO shards consolidated) loads strict and its
    `classify` AUROC on the val split beats the untrained model's (its zero head: 0.5)."""
    from radforge import evaluate, train

    r = config.load(TrainRecipe, str(RECIPE), [
        f"data.shards={ingested_corpus.shards}", "steps=30", "log_every=5", "data.num_workers=0", "optim.lr=0.003",
        "optim.warmup_steps=3", "checkpoint.every_steps=1000", "eval.every_steps=0",
        "eval.split=none",  # no in-loop evaluation at the last step: the test evaluates the export
        "eval.bootstrap=50", f"checkpoint.storage_path={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'runs'}"])
    res = train.run(r, resume="never", progress=False)
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < 0.85 * losses[0], losses
    out = checkpoint.export(res.checkpoint, str(tmp_path / "model"))
    meta = checkpoint.read_model_meta(out)
    assert meta["findings"] == r.eval.findings and meta["model"]["finetune"]["method"] == "full"
    after = evaluate.run(out, ingested_corpus.shards, split="val", protocols=["fine_tune"], cfg=r.eval)
    lm = checkpoint.load_for_inference(out)
    torch.manual_seed(r.seed)  # the run's initial weights (the head starts at zero: p = 0.5)
    fresh = models.build(config.from_dict(ModelConfig, meta["model"]), "xray", kinds.get("xray").view(lm.view).input_shape)
    before = evaluate.run(dataclasses.replace(lm, model=fresh.eval()), ingested_corpus.shards, split="val",
                          protocols=["fine_tune"], cfg=r.eval)
    a, b = after["protocols"]["fine_tune"]["mean_auroc"], before["protocols"]["fine_tune"]["mean_auroc"]
    assert a > b + 0.15 and a > 0.7, (b, a, after["protocols"]["fine_tune"]["per_finding"])
