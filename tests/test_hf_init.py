"""Image towers from public Hugging Face weights, offline (radforge.models.hf, ViT.load_pretrained,
checkpoint.read_weights): tiny random Dinov2Model / Dinov2WithRegistersModel / ViTModel /
CLIPVisionModel configs saved here with `save_pretrained` (no hub at any time), read back through
the real `from_pretrained` path, and compared with the source model on a fixed input. Fast tier."""

from __future__ import annotations

import pytest
import torch

from radforge import checkpoint, models
from radforge.config import FinetuneConfig, ModelConfig

transformers = pytest.importorskip("transformers")

# the `tiny` preset's structure (128 wide, 4 blocks, 4 heads, MLP 4×), 32 px at patch 8 = a 4×4 grid
_SIZE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8)
SOURCES = {
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**_SIZE)), "dinov2", 0),
    "dinov2_registers": (lambda: transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=2, **_SIZE)), "dinov2", 2),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(intermediate_size=512, **_SIZE)), "vit", 0),
    "clip": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=512, **_SIZE)), "clip", 0),
}
# Float32 reorderings only (fused qkv, SDPA vs eager attention, the class position folded into the token): the
# towers' 17–39 tokens of width 128 agree to ~2e-6 when measured; 1e-4 leaves room for BLAS differences
# and fails on any mapping error (a swapped q/k, a missing layer scale, a wrong eps: >= 1e-2).
TOL = 1e-4


def _save(tmp_path, name: str):
    build, style, registers = SOURCES[name]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # move every norm/scale/bias off its init, so a dropped or swapped one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / name
    model.save_pretrained(out)
    return out, model, style, registers


def _reference(model, gray: torch.Tensor) -> torch.Tensor:
    """The source's tokens [B, 1 + R + N, D] for a gray image (the same on its 3 RGB channels);
    CLIP's post_layernorm applied to every token (HF applies it to the pooled class token)."""
    kw = {} if isinstance(model, (transformers.Dinov2Model, transformers.Dinov2WithRegistersModel)) \
        else {"interpolate_pos_encoding": True}  # DINOv2 always resizes its positions to the input
    with torch.no_grad():
        out = model(pixel_values=gray.repeat(1, 3, 1, 1), **kw).last_hidden_state
        if isinstance(model, transformers.CLIPVisionModel):
            out = model.post_layernorm(out)
    return out


def _ours(style: str, registers: int, size: int, url: str):
    cfg = ModelConfig(kind="finetune", backbone=style, registers=registers, patch_xray=8, findings=["nodule"],
                      finetune=FinetuneConfig(method="full"))
    return models.build(cfg, "xray", (1, size, size), init_encoder=checkpoint.read_weights(url)).eval()


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("size", [32, 48])
def test_hf_tower_reproduces_the_source_model(tmp_path, name, size):
    """Same input size: the source's tokens exactly (float tolerance). Another size (48 px: a
    6×6 grid from the source's 4×4): positions resized as HF's interpolate_pos_encoding does,
    and again the source's own output at that size."""
    path, src, style, registers = _save(tmp_path, name)
    ours = _ours(style, registers, size, str(path))
    torch.manual_seed(1)
    x = torch.randn(2, 1, size, size)
    ref = _reference(src, x)
    with torch.no_grad():
        prefix, patches = ours.encoder.tokens(x)
        got = torch.cat([prefix, patches], dim=1)
        pooled = ours.encoder.pool(x)
    grid = (size // 8) ** 2
    assert got.shape == ref.shape == (2, 1 + registers + grid, 128)
    assert ours.encoder.pos_embed.shape == (1, grid, 128)
    assert (got - ref).abs().max() < TOL
    assert (pooled - ref[:, 0]).abs().max() < TOL  # the pooled output is the class token


def test_hf_init_through_an_fsspec_url(tmp_path):
    path, src, style, registers = _save(tmp_path, "dinov2")
    a = _ours(style, registers, 32, f"file://{path}")
    b = _ours(style, registers, 32, str(path))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_mismatched_structure_is_refused_naming_the_tensors(tmp_path):
    path, _, _, _ = _save(tmp_path, "dinov2")
    state = checkpoint.read_weights(str(path))
    # our own structure has no class token, layer scale or learned positions
    with pytest.raises(ValueError, match=r"unexpected \d+: .*cls_token"):
        models.build(ModelConfig(kind="finetune", patch_xray=8, findings=["nodule"]), "xray", (1, 32, 32),
                     init_encoder=state)
    # another patch size: the patch embedding's shape
    with pytest.raises(ValueError, match=r"mismatched shape .*patch_embed\.proj\.weight"):
        models.build(ModelConfig(kind="finetune", backbone="dinov2", patch_xray=16, findings=["nodule"]), "xray",
                     (1, 32, 32), init_encoder=state)
    # another preset: missing blocks and mismatched widths
    with pytest.raises(ValueError, match="mismatched shape"):
        models.build(ModelConfig(kind="finetune", backbone="dinov2", preset="small", patch_xray=8, findings=["nodule"]),
                     "xray", (1, 32, 32), init_encoder=state)
    # a 2D tower never initialises a 3D one
    with pytest.raises(ValueError, match="does not inflate"):
        models.build(ModelConfig(kind="finetune", backbone="dinov2", patch_ct=(4, 8, 8), findings=["nodule"]), "ct",
                     (2, 8, 32, 32), init_encoder=state)


def test_an_init_from_that_is_no_model_says_so(tmp_path):
    from radforge.errors import ConfigError

    with pytest.raises(ConfigError, match="neither an exported radforge model .* nor a Hugging Face"):
        checkpoint.read_weights(str(tmp_path))


def test_structures_radforge_cannot_express_are_refused(tmp_path):
    gelu_clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=512, hidden_act="gelu", **_SIZE))
    gelu_clip.save_pretrained(tmp_path / "clip-gelu")
    with pytest.raises(ValueError, match="activation 'gelu'"):
        checkpoint.read_weights(str(tmp_path / "clip-gelu"))
    odd = transformers.ViTModel(transformers.ViTConfig(**{**_SIZE, "num_attention_heads": 8}, intermediate_size=512))
    odd.save_pretrained(tmp_path / "vit-8-heads")
    with pytest.raises(ValueError, match="no radforge preset"):
        checkpoint.read_weights(str(tmp_path / "vit-8-heads"))


def test_clip_init_from_hf_and_radforge_exports_keep_working(tmp_path):
    """An HF tower initialises a CLIP image tower too (the same `encoder.*` state an MAE export gives)."""
    from radforge.models import text

    path, src, _, _ = _save(tmp_path, "clip")
    tok = text.train_tokenizer(["no effusion.", "a nodule is present."] * 10, ModelConfig().text)
    clip = models.build(ModelConfig(kind="clip", backbone="clip", patch_xray=8), "xray", (1, 32, 32), tok,
                        init_encoder=checkpoint.read_weights(str(path))).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert (clip.visual.pool(x) - _reference(src, x)[:, 0]).abs().max() < TOL
