"""radforge.checkpoint without Ray: a one-process DeepSpeed engine is saved through the checkpoint
API (the layout radforge.train writes); export consolidates it and load_for_inference rebuilds
the model with no DeepSpeed, bit-for-bit, and with no file outside the model directory (a Hugging
Face text tower included). (Multi-rank ZeRO-2/3 exports run in test_train on Ray Train.)"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from radforge import checkpoint, config, kinds, models
from radforge.transforms import Profile
from radforge.config import TrainRecipe
from radforge.errors import ConfigError

REPORTS = ["No pleural effusion.", "A small nodule in the right upper lobe.", "The heart is enlarged."]


@pytest.fixture(scope="module")
def one_process_group():
    """A world of one (gloo) for this module's tests, torn down after them so no other module sees
    it. One group for all: DeepSpeed caches the world group it first saw."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000),
                     "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            mp.setenv(k, v)
        # as the trainer's CPU workers do: no JIT build of DeepSpeed's inference-only shm all-reduce
        import deepspeed.ops

        mp.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _one_step(r: TrainRecipe, model, batch: dict):
    """A DeepSpeed engine for `model` after one optimizer step on `batch`."""
    import deepspeed

    from radforge import train

    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=train.deepspeed_config(r))
    engine.backward(engine(batch)["loss"])
    engine.step()
    engine.module.eval()
    return engine


def test_export_and_load_for_inference_round_trip(tmp_path, one_process_group):
    """ZeRO-1: export goes through zero_to_fp32 (the fp32 partitions), like ZeRO-2/3 runs."""
    r = config.load(TrainRecipe, None, ["view.ct_size=[8,16,16]", "model.patch_ct=[4,8,8]", "scale.num_workers=1",
                                        "deepspeed.zero_stage=1", "deepspeed.micro_batch=2"])
    view = kinds.CT.view(r.view)
    torch.manual_seed(0)
    images = torch.rand(2, *view.input_shape)
    engine = _one_step(r, models.build(r.model, "ct", view.input_shape), {"image": images})
    ckpt = str(tmp_path / "ckpt")
    state = checkpoint.RunState(step=1, world_size=1, recipe=r, profile=Profile(), findings=["nodule"], loader={"pos": 7})
    checkpoint.save(ckpt, state, engine, rank=0)
    back = checkpoint.load(ckpt)
    assert (back.step, back.tag, back.world_size, back.findings, back.loader) == (1, "step00000001", 1, ["nodule"], {"pos": 7})
    assert back.recipe == r and back.profile == Profile() and back.image is kinds.CT and back.tokenizer is None
    assert checkpoint.find(str(tmp_path)) == [ckpt] and checkpoint.saved_loader_ranks(ckpt) == [0]
    _newest_complete(tmp_path, ckpt)
    # elastic: any worker count resumes; a rank the writer did not have gets rank 0's position
    assert checkpoint.load(ckpt, rank=3, world_size=4).loader == {"pos": 7}
    assert not checkpoint.needs_universal(back, 1) and checkpoint.needs_universal(back, 2)

    out = checkpoint.export(ckpt, str(tmp_path / "model"))
    lm = checkpoint.load_for_inference(out)
    assert (lm.kind, lm.image, lm.findings, lm.profile) == ("mae", kinds.CT, ["nodule"], Profile())
    assert lm.view == r.view and not lm.model.training
    with torch.no_grad():
        live = torch.nn.functional.normalize(engine.module.encode(images), dim=-1)
    assert torch.equal(lm.embed_images(images), live)
    with pytest.raises(ValueError):
        lm.zero_shot(images, ["nodule"])  # MAE has no text tower
    _elastic_engine_load(r, ckpt, back, engine, images)  # last: it trains `engine` one more step


def _newest_complete(tmp_path, ckpt: str) -> None:
    """A worker group restarted after a failure resumes `checkpoint.newest`: the most steps among
    the complete checkpoints, so a later one with a rank's part missing (its upload cut off) is
    passed over, and taken once whole."""
    import json

    later = str(tmp_path / "later")
    shutil.copytree(ckpt, later)
    with open(os.path.join(later, "state.json")) as f:
        raw = json.load(f)
    with open(os.path.join(later, "state.json"), "w") as f:
        json.dump({**raw, "step": 2}, f)  # same DeepSpeed tag folder
    assert checkpoint.complete(later) and checkpoint.newest(str(tmp_path)) == later
    tag = os.path.join(later, "ds", raw["tag"])
    (optim,) = [n for n in os.listdir(tag) if n.endswith("zero_pp_rank_0_mp_rank_00_optim_states.pt")]
    for part in (os.path.join(tag, optim), os.path.join(later, "loader", "rank-00000.json")):
        away = str(tmp_path / "away")
        os.rename(part, away)
        assert not checkpoint.complete(later) and checkpoint.newest(str(tmp_path)) == ckpt, part
        os.rename(away, part)
    assert checkpoint.newest(str(tmp_path)) == later
    shutil.rmtree(later)
    assert checkpoint.newest(str(tmp_path / "none")) is None


def _elastic_engine_load(r: TrainRecipe, ckpt: str, state, engine, images) -> None:
    """The universal path of load_engine (what a resume on another worker count takes), in this
    one-process world: the state claims 2 writers, so the ZeRO-1 shards go through
    ds_to_universal; the new engine then has the trained weights and the optimizer's step."""
    import dataclasses

    import deepspeed

    from radforge import train

    two = dataclasses.replace(state, world_size=2)
    with pytest.raises(ConfigError, match="load_universal=True"):  # refused before touching the engine
        checkpoint.load_engine(ckpt, two, engine)
    fresh = models.build(r.model, "ct", images.shape[1:])
    uni, *_ = deepspeed.initialize(model=fresh, model_parameters=list(fresh.parameters()),
                                   config=train.deepspeed_config(r, load_universal=True))
    checkpoint.load_engine(ckpt, two, uni)
    want, got = engine.module.state_dict(), uni.module.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert uni.global_steps == engine.global_steps == 1
    # the Adam moments and the step count came along: one more identical step stays identical
    for e in (engine, uni):
        e.module.train()
        torch.manual_seed(1)  # the same MAE mask
        e.backward(e({"image": images})["loss"])
        e.step()
    want, got = engine.module.state_dict(), uni.module.state_dict()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    assert not any(n.startswith("radforge-universal-") for n in os.listdir(ckpt))  # scratch removed


@pytest.fixture
def hf_dir(tmp_path, tiny_bert):
    """A tiny BERT + tokenizer saved the Hugging Face way (no hub access needed)."""
    return tiny_bert(tmp_path / "bert", REPORTS)[0]


def test_a_hugging_face_text_tower_travels_with_the_exported_model(tmp_path, one_process_group, hf_dir):
    """The checkpoint keeps the tower's tokenizer + config, the weights hold its trained weights:
    with the source directory gone, the loaded model embeds text exactly like the live one.
    ZeRO-0: the other consolidation path (the module state is complete)."""
    r = config.load(TrainRecipe, None, ["model.kind=clip", "model.text.kind=hf", f"model.text.path={hf_dir}",
                                        "model.text.max_len=16", "data.image=xray", "view.xray_size=16",
                                        "model.patch_xray=8", "scale.num_workers=1", "deepspeed.zero_stage=0",
                                        "deepspeed.micro_batch=3"])
    view = kinds.XRAY.view(r.view)
    torch.manual_seed(0)
    images = torch.rand(3, *view.input_shape)
    engine = _one_step(r, models.build(r.model, "xray", view.input_shape), {"image": images, "text": REPORTS})
    ckpt = str(tmp_path / "ckpt")
    files = checkpoint.tokenizer_files(engine.module)
    assert files and "config.json" in files
    checkpoint.save(ckpt, checkpoint.RunState(step=1, world_size=1, recipe=r, profile=Profile(), findings=["nodule"],
                                              tokenizer=files), engine, rank=0)
    shutil.rmtree(hf_dir)  # load_for_inference must not need model.text.path
    lm = checkpoint.load_for_inference(checkpoint.export(ckpt, str(tmp_path / "model")))
    with torch.no_grad():
        live_text = engine.module.embed_text(REPORTS)
        live_image = engine.module.embed_image(images)
    assert torch.allclose(lm.embed_texts(REPORTS), live_text, atol=1e-6)
    assert torch.allclose(lm.embed_images(images), live_image, atol=1e-6)


def test_clear_errors_for_things_that_are_not_checkpoints_or_models(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a radforge training checkpoint"):
        checkpoint.export(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        checkpoint.export(str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="not an exported radforge model"):
        checkpoint.load_for_inference(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not a radforge training checkpoint"):
        checkpoint.load(str(tmp_path / "empty"))


def test_write_model_makes_a_directory_load_for_inference_rebuilds(tmp_path):
    """A live model (no training run) in the export layout: a small-tower CLIP keeps its tokenizer."""
    from radforge.config import ModelConfig, TextConfig, ViewConfig
    from radforge.models import text

    cfg = ModelConfig(kind="clip", patch_xray=8, embed_dim=16, text=TextConfig(vocab_size=100, max_len=16, width=32, depth=1, heads=2))
    view = ViewConfig(xray_size=16, rand_crop=False)
    torch.manual_seed(0)
    model = models.build(cfg, kinds.XRAY, kinds.XRAY.view(view).input_shape, text.train_tokenizer(REPORTS * 4, cfg.text)).eval()
    out = checkpoint.write_model(str(tmp_path / "m"), model, image="xray", model_cfg=cfg, view=view, profile=Profile(),
                                 model_id="live", findings=["nodule"], prompts={"positive": "{finding}.", "negative": "no {finding}."})
    lm = checkpoint.load_for_inference(out)
    assert (lm.model_id, lm.image, lm.findings, lm.view) == ("live", kinds.XRAY, ["nodule"], view)
    images = torch.rand(2, *kinds.XRAY.view(view).input_shape)
    with torch.no_grad():
        assert torch.equal(lm.embed_texts(REPORTS), model.embed_text(REPORTS))
        assert torch.equal(lm.embed_images(images), model.embed_image(images))
