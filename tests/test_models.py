"""radforge.models: ViT 2D/3D, MAE, CLIP (incl. all-gather across 2 gloo processes), text towers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from radforge import models
from radforge.config import ModelConfig, TextConfig
from radforge.models import text as text_mod
from radforge.models.clip import CLIP
from radforge.models.mae import MAE, load_encoder_state
from radforge.models.vit import ViT, sincos_pos_embed

REPORTS = [
    "A solid pulmonary nodule is present.", "No pulmonary nodule.", "There is a pleural effusion layering posteriorly.",
    "No pleural effusion.", "The heart is enlarged, consistent with cardiomegaly.", "Heart size is normal.",
    "Possible trace pleural effusion.", "Lungs and heart unremarkable.",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: one intra-op thread is as fast, and on a shared 2-core machine OpenMP
    # workers spinning for a busy core cost far more than they give.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_vit(input_shape, patch, width=32, depth=2, heads=2, **kw):
    return ViT(input_shape, patch, width, depth, heads, **kw)


@pytest.fixture(scope="module")
def tokenizer():
    return text_mod.train_tokenizer(REPORTS * 4, TextConfig(vocab_size=300, max_len=24))


def _clip(tokenizer, image_shape=(1, 16, 16), patch=(8, 8), width=32):
    torch.manual_seed(0)
    visual = _tiny_vit(image_shape, patch, width)
    txt = text_mod.SmallTextEncoder(tokenizer, TextConfig(width=32, depth=1, heads=2, max_len=24))
    return CLIP(visual, txt, embed_dim=16, init_temperature=0.07)


# --------------------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("shape,patch,n", [((1, 32, 32), (8, 8), 16), ((2, 16, 32, 32), (8, 16, 16), 8)])
def test_vit_shapes_and_patchify_roundtrip(shape, patch, n):
    v = _tiny_vit(shape, patch)
    x = torch.randn(3, *shape)
    assert v(x).shape == (3, n, 32)
    assert v.pool(x).shape == (3, 32)
    pe = v.patch_embed
    p = pe.patchify(x)
    assert p.shape == (3, n, shape[0] * patch[0] * patch[1] * (patch[2] if len(patch) == 3 else 1))
    assert torch.equal(pe.unpatchify(p), x)
    # patchify's token order is the conv's: patch k of the patchified image is token k
    lin = p @ pe.proj.weight.reshape(32, shape[0], -1).movedim(1, -1).reshape(32, -1).T + pe.proj.bias
    assert torch.allclose(lin, pe(x), atol=1e-4)


def test_vit_presets_via_build_and_bad_shapes():
    m = models.build(ModelConfig(kind="mae", preset="tiny"), "xray", (1, 32, 32))
    assert m.encoder.width == models.PRESETS["tiny"][0] and len(m.encoder.transformer.blocks) == models.PRESETS["tiny"][1]
    assert {"mae", "clip", "finetune"} <= set(models.REGISTRY)
    with pytest.raises(ValueError, match="does not fit"):
        models.build(ModelConfig(kind="mae"), "ct", (1, 32, 32))
    with pytest.raises(ValueError, match="must divide"):
        models.build(ModelConfig(kind="mae", patch_xray=7), "xray", (1, 32, 32))


def test_position_embeddings():
    table = sincos_pos_embed((2, 4, 4), 48)
    assert table.shape == (32, 48)
    assert len(torch.unique(table, dim=0)) == 32  # every position distinct
    assert torch.allclose(table.norm(dim=1), table.norm(dim=1)[0])  # sin²+cos² per frequency
    fixed = _tiny_vit((1, 16, 16), (8, 8))
    assert "pos_embed" not in fixed.state_dict() and not fixed.pos_embed.requires_grad
    learned = _tiny_vit((1, 16, 16), (8, 8), pos_embed="learned")
    assert "pos_embed" in dict(learned.named_parameters())
    # position matters: permuting the patches changes the (pre-pool) tokens beyond a permutation
    x = torch.randn(1, 1, 16, 16)
    swapped = torch.cat([x[..., 8:, :], x[..., :8, :]], dim=-2)
    assert not torch.allclose(fixed.pool(x), fixed.pool(swapped), atol=1e-5)


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    v = _tiny_vit((1, 16, 16), (8, 8), depth=3)
    v(torch.randn(2, 1, 16, 16))
    assert len(calls) == 3 and calls[0] == (2, 2, 4, 16)  # [B, heads, N, head_dim]


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = models.build(ModelConfig(kind="mae", decoder_width=32, decoder_depth=1), "xray", (1, 32, 32))
    x = torch.randn(2, 1, 32, 32)
    grads = []
    for on in (False, True):
        models.set_activation_checkpointing(m, on)
        m.zero_grad()
        m({"image": x}, generator=torch.Generator().manual_seed(1))["loss"].backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert m.encoder.activation_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# --------------------------------------------------------------------------------------- MAE


def test_mae_masking_ratio_exact_and_per_sample():
    m = MAE(_tiny_vit((2, 16, 32, 32), (4, 8, 8)), mask_ratio=0.75, decoder_width=32, decoder_depth=1)
    n = m.num_patches
    assert n == 64
    out = m.predict(torch.randn(5, 2, 16, 32, 32))
    assert out["pred"].shape == (5, 64, 2 * 4 * 8 * 8)
    assert out["mask"].sum(1).tolist() == [48.0] * 5
    assert len({tuple(r.tolist()) for r in out["mask"]}) == 5  # each sample its own mask
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    x = torch.randn(2, 2, 16, 32, 32)
    assert torch.equal(m(x, generator=g1)["loss"], m(x, generator=g2)["loss"])  # seeded = reproducible
    assert m.encode(x).shape == (2, 32)
    rec = m.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert rec["reconstruction"].shape == x.shape
    visible = rec["mask"] == 0
    assert torch.equal(rec["reconstruction"][visible], x[visible])  # visible patches come from the input
    assert (rec["masked"][~visible] == 0).all()


def _fit(model, batch, steps=30, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("image,shape", [("xray", (1, 32, 32)), ("ct", (1, 16, 32, 32))])
def test_mae_loss_decreases(image, shape):
    torch.manual_seed(0)
    cfg = ModelConfig(kind="mae", patch_ct=(8, 16, 16), patch_xray=8, decoder_width=32, decoder_depth=1)
    m = MAE(_tiny_vit(shape, cfg.patch_ct if image == "ct" else (8, 8), width=48), mask_ratio=0.5,
            decoder_width=32, decoder_depth=1)
    # smooth images: blobs whose masked patches are predictable from the visible ones
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape[1:]], indexing="ij"))
    centres = torch.rand(8, len(shape) - 1) - 0.5
    x = torch.exp(-((grid[None] - centres.view(8, -1, *[1] * (len(shape) - 1))) ** 2).sum(1) * 3)[:, None]
    losses = _fit(m, {"image": x}, steps=30)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_load_encoder_state_into_clip(tokenizer):
    mae = MAE(_tiny_vit((1, 16, 16), (8, 8)), decoder_width=32, decoder_depth=1)
    clip = _clip(tokenizer)
    state = {"module." + k: v for k, v in mae.state_dict().items()}  # as DeepSpeed saves it
    keys = load_encoder_state(clip, state)
    assert keys and all(torch.equal(clip.visual.state_dict()[k], mae.encoder.state_dict()[k]) for k in keys)
    other = MAE(_tiny_vit((1, 16, 16), (8, 8), width=64, heads=2), decoder_width=32, decoder_depth=1)
    with pytest.raises(ValueError, match="shape"):
        load_encoder_state(clip, other.state_dict())
    with pytest.raises(ValueError, match="no MAE encoder"):
        load_encoder_state(clip, {"foo": torch.zeros(1)})


def test_build_clip_init_from_an_mae_encoder(tokenizer):
    cfg = ModelConfig(kind="mae", preset="tiny", patch_xray=8)
    mae = models.build(cfg, "xray", (1, 16, 16))
    clip = models.build(ModelConfig(kind="clip", patch_xray=8), "xray", (1, 16, 16), tokenizer, init_encoder=mae.state_dict())
    assert torch.equal(clip.visual.patch_embed.proj.weight, mae.encoder.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="CLIP image tower"):
        models.build(cfg, "xray", (1, 16, 16), init_encoder=mae.state_dict())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        models.build(ModelConfig(kind="clip"), "xray", (1, 16, 16))


# --------------------------------------------------------------------------------------- text


def test_tokenizer_train_save_load_roundtrip(tmp_path, tokenizer):
    assert tokenizer.vocab_size <= 300
    ids, mask = tokenizer(["No pleural effusion.", "", "nodule " * 100])
    assert ids.shape == mask.shape and ids.shape[0] == 3 and ids.shape[1] == 24  # truncated to max_len
    assert mask[1].sum() == 2 and ids[1, 2] == tokenizer.pad_id  # [CLS] [SEP] then padding
    assert mask[0].sum() < 24
    tokenizer.save(str(tmp_path / "tok"))
    again = text_mod.Tokenizer.load(str(tmp_path / "tok"))
    ids2, mask2 = again(["No pleural effusion.", "", "nodule " * 100])
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2) and again.max_len == 24
    # fsspec URLs work too (export may write to object storage)
    tokenizer.save("memory://rf-test-tok")
    assert torch.equal(text_mod.Tokenizer.load("memory://rf-test-tok")(["No pleural effusion."])[0], ids[:1, : mask[0].sum()])


def test_text_encoder_ignores_padding(tokenizer):
    torch.manual_seed(0)
    enc = text_mod.SmallTextEncoder(tokenizer, TextConfig(width=32, depth=1, heads=2, max_len=24)).eval()
    alone = enc(["No pleural effusion."])
    padded = enc(["No pleural effusion.", "The heart is enlarged, consistent with cardiomegaly."])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_bert):
    return tiny_bert(tmp_path_factory.mktemp("hf") / "model", REPORTS, layers=2, max_positions=64)


def test_load_hf_local_and_fsspec(hf_dir):
    import fsspec

    path, ref, tok = hf_dir
    model, tok2 = text_mod.load_hf(str(path))
    enc = tok(["no pleural effusion."], return_tensors="pt")
    want = ref(**enc).last_hidden_state
    assert torch.allclose(model.eval()(**tok2(["no pleural effusion."], return_tensors="pt")).last_hidden_state, want, atol=1e-5)
    mem = fsspec.filesystem("memory")
    for f in path.iterdir():
        mem.pipe(f"/rf-test-hf/{f.name}", f.read_bytes())
    model3, _ = text_mod.load_hf("memory://rf-test-hf")
    assert torch.equal(model3.state_dict()["embeddings.word_embeddings.weight"], ref.state_dict()["embeddings.word_embeddings.weight"])
    with pytest.raises(FileNotFoundError):
        text_mod.load_hf(str(path / "missing"))


def test_clip_with_hf_text_tower(hf_dir, tmp_path):
    path, _, _ = hf_dir
    cfg = ModelConfig(kind="clip", patch_xray=8, text=TextConfig(kind="hf", path=str(path), max_len=16))
    clip = models.build(cfg, "xray", (1, 16, 16))
    out = clip({"image": torch.randn(3, 1, 16, 16), "text": REPORTS[:3]})
    out["loss"].backward()
    assert clip.text.model.embeddings.word_embeddings.weight.grad is not None
    clip.save_tokenizer(str(tmp_path / "tok"))  # tokenizer + config: rebuildable without the source dir
    again = models.build(ModelConfig(kind="clip", patch_xray=8, text=TextConfig(kind="hf", path=str(tmp_path / "tok"))),
                         "xray", (1, 16, 16), pretrained=False)
    again.load_state_dict(clip.state_dict())
    clip.eval(), again.eval()
    assert torch.allclose(clip.embed_text(REPORTS[:2]), again.embed_text(REPORTS[:2]), atol=1e-5)


# --------------------------------------------------------------------------------------- CLIP


def test_clip_embeddings_normalised_and_loss_decreases(tokenizer):
    clip = _clip(tokenizer)
    torch.manual_seed(1)
    images = torch.randn(8, 1, 16, 16)
    batch = {"image": images, "text": REPORTS}
    assert torch.allclose(clip.embed_image(images).norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(clip.embed_text(REPORTS).norm(dim=1), torch.ones(8), atol=1e-5)
    assert abs(float(clip.scale().detach()) - 1 / 0.07) < 1e-3 and clip.logit_scale.shape == (1,)
    losses = _fit(clip, batch, steps=30)
    assert losses[-1] < 0.5 * losses[0]
    p = clip.zero_shot(images[:2], ["nodule", "effusion"])
    assert p.shape == (2, 2) and ((p > 0) & (p < 1)).all()


# ------------------------------------------------------------------------------- protocol


def test_every_objective_answers_the_protocol(tokenizer):
    """Each registry entry builds a model whose capabilities say which protocol methods work:
    those return what objective.py promises, the others raise Unsupported (a ValueError)."""
    images = torch.randn(2, 1, 16, 16)
    for kind, spec in models.REGISTRY.items():
        cfg = ModelConfig(kind=kind, preset="tiny", patch_xray=8, decoder_width=32, decoder_depth=1, findings=["nodule"])
        m = models.build(cfg, "xray", (1, 16, 16), tokenizer).eval()
        assert isinstance(m, models.Objective) and m.name == kind
        assert m.capabilities == spec.capabilities and m.capabilities <= models.CAPABILITIES
        assert set(m.evaluations) <= set(models.EVALUATIONS) and m.evaluations == spec.evaluations
        assert "embed_image" in m.capabilities  # every objective so far; serve's /v1/embed relies on it
        emb = m.embed_image(images)
        assert emb.shape[0] == 2 and torch.allclose(emb.float().norm(dim=1), torch.ones(2), atol=1e-5)
        batch = {"image": images, "text": REPORTS[:2], "labels": torch.tensor([[1.0], [float("nan")]]), "key": ["a", "b"]}
        if spec.multicrop:  # what the trainer adds for objectives that train on multi-crop views (DINO)
            from radforge import transforms

            batch = transforms.RandMultiCrop(cfg.dino, (1, 16, 16), (8, 8)).apply(batch, 0)
        out = m(batch)
        assert set(out) == {"loss", *m.metrics} and all(v.numel() == 1 for v in out.values())
        assert spec.text_tower == spec.require_report == ("embed_text" in m.capabilities)
        calls = {"embed_text": lambda: m.embed_text(REPORTS[:3]),
                 "zero_shot": lambda: m.zero_shot(images, ["nodule"], "{finding}.", "no {finding}."),
                 "reconstruct": lambda: m.reconstruct(images, torch.Generator().manual_seed(0)),
                 "classify": lambda: m.classify(images)}
        for cap, call in calls.items():
            if cap in m.capabilities:
                call()
            else:
                with pytest.raises(models.Unsupported, match=f"a {kind} model cannot"):
                    call()
    frozen = ("knn", "linear_probe", "few_shot")
    assert models.REGISTRY["clip"].evaluations == ("zero_shot", "retrieval", *frozen, "fairness", "robustness", "calibration")
    assert models.REGISTRY["mae"].evaluations == ("recon_loss", *frozen, "fairness", "robustness", "calibration")
    with pytest.raises(ValueError, match="unknown model kind"):
        models.get("byol")


def test_loaded_model_methods_are_the_protocols(tokenizer):
    from radforge import checkpoint, kinds
    from radforge.config import ViewConfig
    from radforge.transforms import Profile

    clip = _clip(tokenizer).eval()
    prompts = {"positive": "{finding} is present.", "negative": "no {finding}."}
    lm = checkpoint.LoadedModel(model=clip, kind="clip", image=kinds.XRAY, view=ViewConfig(), profile=Profile(),
                                model_id="c", findings=["nodule"], prompts=prompts)
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(lm.embed_images(images), clip.embed_image(images))
        assert torch.equal(lm.embed_texts(REPORTS[:2]), clip.embed_text(REPORTS[:2]))
        assert torch.allclose(lm.zero_shot(images, ["nodule", "effusion"]),
                              clip.zero_shot(images, ["nodule", "effusion"], **prompts))
    mae = models.build(ModelConfig(kind="mae", preset="tiny", patch_xray=8, decoder_width=32, decoder_depth=1),
                       "xray", (1, 16, 16)).eval()
    lm = checkpoint.LoadedModel(model=mae, kind="mae", image=kinds.XRAY, view=ViewConfig(), profile=Profile(),
                                model_id="m", findings=[], prompts={})
    with pytest.raises(models.Unsupported, match="cannot embed text"):
        lm.embed_texts(["no nodule."])


def _ddp_worker(rank: int, world: int, tok_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store rather than MASTER_PORT: no free-port race with other tests on the machine.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        clip = _clip(text_mod.Tokenizer.load(tok_dir))
        images = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
        half = slice(rank * 4, rank * 4 + 4)
        out = clip({"image": images[half], "text": REPORTS[half]})
        out["loss"].backward()
        loss = out["loss"].detach().clone()
        dist.all_reduce(loss)
        grads = [p.grad.clone() for p in clip.parameters()]
        for g in grads:  # what DDP / DeepSpeed do: average the ranks' gradients
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save({"loss": loss / world, "grads": grads}, os.path.join(out_dir, "ddp.pt"))
        # Both ranks leave together: a rank that tears gloo down while its peer is still busy
        # makes the peer abort at exit ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: inside a busy pytest session, static destructors of the libraries
    # the child imported (gloo, tokenizers) have aborted the spawned process after its work was
    # done. Errors above still propagate: this line is reached only on success.
    os._exit(0)


def test_clip_all_gather_two_processes_matches_single(tmp_path, tokenizer):
    import torch.multiprocessing as mp

    tokenizer.save(str(tmp_path / "tok"))
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "tok"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")
    clip = _clip(text_mod.Tokenizer.load(str(tmp_path / "tok")))
    images = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    loss = clip({"image": images, "text": REPORTS})["loss"]
    loss.backward()
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-5)
    for p, g in zip(clip.parameters(), got["grads"]):
        assert g.abs().sum() > 0 or p.grad.abs().sum() == 0
        assert torch.allclose(p.grad, g, atol=1e-5), "gathered negatives must carry gradients back to their rank"


def test_sample_sentences_keeps_true_statements():
    import numpy as np

    rng = np.random.default_rng(0)
    report = "No pleural effusion. Heart size is normal. A solid pulmonary nodule is present."
    sentences = {"No pleural effusion.", "Heart size is normal.", "A solid pulmonary nodule is present."}
    seen = set()
    for _ in range(50):
        out = text_mod.sample_sentences(report, rng)
        parts = {p.strip() + "." for p in out.split(".") if p.strip()}
        assert parts and parts <= sentences and len(out.split(".")) - 1 == len(parts)
        seen.add(len(parts))
    assert seen == {1, 2, 3}
    assert text_mod.sample_sentences("", rng) == ""


REPORT = ("EXAMINATION: Chest imaging, accession [REDACTED].\nPATIENT: [REDACTED] [REDACTED], MRN [REDACTED], 071Y F.\n"
          "Referred by Dr. [REDACTED] to [REDACTED].\nFINDINGS: No pulmonary nodule. There is a pleural effusion\n"
          "layering posteriorly. The heart is enlarged, consistent with cardiomegaly.\nIMPRESSION: Effusion; cardiomegaly.\n")


def test_report_sections_keep_the_findings_and_impression_in_the_asked_order():
    got = text_mod.report_sections(REPORT, ("findings", "impression"))
    assert got == ("No pulmonary nodule. There is a pleural effusion layering posteriorly. The heart is enlarged, "
                   "consistent with cardiomegaly. Effusion; cardiomegaly.")
    assert text_mod.report_sections(REPORT, ("impression", "findings")).startswith("Effusion; cardiomegaly. No pul")
    assert text_mod.report_sections(REPORT, ()) == REPORT  # off: the whole report
    assert text_mod.report_sections("Heart size is normal.", ("findings",)) == "Heart size is normal."  # no headers


def test_report_view_samples_sentences_only_with_a_generator_and_reproducibly():
    import numpy as np

    view = text_mod.ReportView.from_config(TextConfig(sections=["findings", "impression"], sample_sentences=True))
    whole = text_mod.report_sections(REPORT, ("findings", "impression"))
    assert view(REPORT) == whole  # evaluation: sections only
    draws = [view(REPORT, np.random.default_rng([7, i])) for i in range(40)]
    assert draws == [view(REPORT, np.random.default_rng([7, i])) for i in range(40)]  # seeded
    sentences = lambda t: {p.strip() for p in t.split(".") if p.strip()}  # noqa: E731
    assert len(set(draws)) > 5 and all(sentences(d) <= sentences(whole) for d in draws)
    assert text_mod.ReportView()(REPORT, np.random.default_rng(0)) == REPORT  # both off: unchanged


def test_truncation_is_counted_with_its_figure(tokenizer):
    lengths = text_mod.token_lengths(tokenizer, [REPORT, "No pleural effusion."])
    assert lengths[0] > 24 >= lengths[1] > 2
    line = text_mod.truncation_warning(lengths, 24)
    assert "1 of 2 training reports (50%)" in line and f"longest {lengths[0]} tokens" in line
    assert text_mod.truncation_warning(lengths, max(lengths)) is None


def test_text_towers_read_the_configured_sections(tokenizer):
    torch.manual_seed(0)
    cfg = TextConfig(width=32, depth=1, heads=2, max_len=24, sections=["findings", "impression"])
    tower = text_mod.SmallTextEncoder(tokenizer, cfg).eval()
    with torch.no_grad():
        a, b = tower([REPORT, text_mod.report_sections(REPORT, cfg.sections)])
    assert torch.allclose(a, b)


def test_a_3d_clip_learns_ct_findings_from_report_sections():
    """The CT CLIP path in miniature: phantom chest volumes through the CT model view, reports read
    through their findings/impression sections; after a short fit the loss has fallen and zero-shot
    AUROC of the two large findings (read from prompts the model never saw) is well above chance,
    where the untrained model is not."""
    import numpy as np

    from radforge import phantoms
    from radforge.config import ViewConfig
    from radforge.evaluate import auroc
    from radforge.transforms import CTView

    view = CTView(ViewConfig(ct_size=(8, 32, 32)))
    studies = [phantoms.make_study(phantoms.make_patient(i), findings={
        "nodule": 0, "effusion": i % 2, "cardiomegaly": (i // 2) % 2}) for i in range(16)]
    vols = torch.from_numpy(np.stack([view(phantoms.chest_volume((8, 32, 32), s, seed=i), {}, None)
                                      for i, s in enumerate(studies)])).float()
    sections = ["findings", "impression"]
    reports = [s.report for s in studies]
    tok = text_mod.train_tokenizer([text_mod.report_sections(r, sections) for r in reports * 2],
                                   TextConfig(vocab_size=300, max_len=32))
    torch.manual_seed(0)
    tower = text_mod.SmallTextEncoder(tok, TextConfig(width=32, depth=1, heads=2, max_len=32, sections=sections))
    clip = CLIP(_tiny_vit(tuple(vols.shape[1:]), (4, 8, 8), width=32), tower, embed_dim=16)
    labels = np.array([[s.findings["effusion"], s.findings["cardiomegaly"]] for s in studies])

    def mean_auroc():
        clip.eval()
        p = clip.zero_shot(vols, ["effusion", "cardiomegaly"]).numpy()
        clip.train()
        return np.mean([auroc(p[:, j], labels[:, j]) for j in range(2)])

    before = mean_auroc()
    losses = _fit(clip, {"image": vols, "text": reports}, steps=60, lr=2e-3)
    after = mean_auroc()
    # 4 distinct section texts among 16 pairs: the loss cannot go below ~log(4) = 1.39 (from ~3.5)
    assert losses[-1] < 0.8 * losses[0], losses[::10]
    assert after >= 0.8 and after > before + 0.3, (before, after)


def test_attention_pool_clip_exports_and_loads_the_same_embeddings(tmp_path, tokenizer):
    """model.image_pool: attention — a learned query over the patch tokens: the pool is part of the
    model, saved and restored with it (export → load gives the same embeddings)."""
    from radforge import checkpoint
    from radforge.config import IngestRecipe, ViewConfig, from_dict
    from radforge.transforms import Profile

    cfg = ModelConfig(kind="clip", patch_ct=(4, 8, 8), embed_dim=16, image_pool="attention",
                      text=TextConfig(width=32, depth=1, heads=2, max_len=24, sections=["findings"]))
    view = ViewConfig(ct_size=(8, 32, 32))
    torch.manual_seed(0)
    model = models.build(cfg, "ct", (2, 8, 32, 32), tokenizer).eval()
    assert model.attn_pool is not None and any(k.startswith("attn_pool.") for k in model.state_dict())
    images = torch.rand(3, 2, 8, 32, 32)
    profile = Profile.from_recipe(from_dict(IngestRecipe, {"name": "pool-test"}))
    out = checkpoint.write_model(str(tmp_path / "m"), model, image="ct", model_cfg=cfg, view=view, profile=profile,
                                 model_id="pool-test", findings=["nodule"])
    lm = checkpoint.load_for_inference(out)
    assert torch.allclose(lm.embed_images(images), model.embed_image(images).float(), atol=1e-5)
    assert lm.model.text.sections == ("findings",)
    with pytest.raises(ValueError, match="image pool"):
        CLIP(model.visual, model.text, 16, pool="max")
