"""radforge.checkpoint without Ray: a one-process DeepSpeed engine writes a checkpoint in the
layout radforge.train uses; export consolidates it and load_for_inference rebuilds the model with
no DeepSpeed, bit-for-bit. (Multi-rank ZeRO-2/3 exports run in test_train on Ray Train.)"""

from __future__ import annotations

import json
import os

import pytest
import torch

from radforge import checkpoint, config, kinds, models
from radforge.transforms import Profile
from radforge.config import TrainRecipe
from radforge.errors import ConfigError


@pytest.fixture
def one_process_group(monkeypatch):
    """A world of one (gloo), torn down after the test so no other test sees it."""
    import torch.distributed as dist

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_export_and_load_for_inference_round_trip(tmp_path, one_process_group):
    """ZeRO-1: export goes through zero_to_fp32 (the fp32 partitions), like ZeRO-2/3 runs. One
    engine per process: DeepSpeed caches its process groups globally."""
    import deepspeed

    from radforge import train

    stage = 1
    r = config.load(TrainRecipe, None, ["view.ct_size=[8,16,16]", "model.patch_ct=[4,8,8]", "scale.num_workers=1",
                                        f"deepspeed.zero_stage={stage}", "deepspeed.micro_batch=2"])
    view = kinds.CT.view(r.view)
    torch.manual_seed(0)
    model = models.build(r.model, "ct", view.input_shape)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                      config=train.deepspeed_config(r))
    images = torch.rand(2, *view.input_shape)
    loss = engine({"image": images})["loss"]
    engine.backward(loss)
    engine.step()
    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(str(ckpt / "ds"), tag="step00000001")
    (ckpt / "state.json").write_text(json.dumps({
        "step": 1, "tag": "step00000001", "world_size": 1, "recipe": config.to_dict(r), "profile": Profile().to_dict(),
        "findings": ["nodule"], "kind": "mae", "image": "ct", "zero_stage": stage, "scalar_params": []}))
    out = checkpoint.export(str(ckpt), str(tmp_path / "model"))
    lm = checkpoint.load_for_inference(out)
    assert (lm.kind, lm.image, lm.findings, lm.profile) == ("mae", kinds.CT, ["nodule"], Profile())
    assert lm.view == r.view and not lm.model.training
    engine.module.eval()
    with torch.no_grad():
        live = torch.nn.functional.normalize(engine.module.encode(images), dim=-1)
    assert torch.equal(lm.embed_images(images), live)
    with pytest.raises(ValueError):
        lm.zero_shot(images, ["nodule"])  # MAE has no text tower


def test_clear_errors_for_things_that_are_not_checkpoints_or_models(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a radforge training checkpoint"):
        checkpoint.export(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        checkpoint.export(str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="not an exported radforge model"):
        checkpoint.load_for_inference(str(tmp_path / "empty"))
