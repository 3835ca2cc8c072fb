"""`radforge bench gpu` (make bench-gpu): the refusal without CUDA, the CPU dry run of the same
code path, and the bf16 pieces of the GPU path that a CPU can check."""

from __future__ import annotations

import math

import pytest
import torch

from radforge import cli, config, kinds, models, train
from radforge.bench import gpu
from radforge.bench.train import RECIPES_DIR
from radforge.config import TrainRecipe


def test_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device:" in err and "--cpu-dry-run" in err
    assert cli.main(["bench", "train", "--cpu-dry-run"]) == 2  # an option of `bench gpu` only


def test_peak_table_matches_cuda_names():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0  # not the A10's
    assert gpu.peak_tflops("NVIDIA A10G") == 125.0 and gpu.peak_tflops("NVIDIA L4") == 121.0
    assert gpu.peak_tflops("NVIDIA L40S") == 362.0 and gpu.peak_tflops("Tesla T4") is None


@pytest.mark.parametrize("name", ["mae-vitb-ct", "cxr-clip"])
def test_bf16_batches_reach_the_model_in_its_dtype(name):
    """DeepSpeed's bf16 engine turns the weights to bf16 and casts no input: the trainer's cast
    (train._cast_floats) is what lets a loader's float32 batch through, for both GPU recipes'
    objectives (tiny sizes, same code)."""
    from radforge.models import text

    tiny = [s for s in gpu.DRY_RUN_SETS if s.startswith(("model.", "view."))] + ["view.ct_size=[8,16,16]", "view.xray_size=32"]
    r = config.load(TrainRecipe, f"{RECIPES_DIR}/{name}.yaml", tiny)
    assert r.deepspeed.precision == "bf16" and r.scale.use_gpu
    shapes = {k: tuple(kinds.get(k).view(r.view).input_shape) for k in r.data.images()}
    tok = text.train_tokenizer(["no acute finding"] * 10 + ["large left effusion"] * 10, r.model.text) \
        if models.get(r.model.kind).text_tower else None
    model = models.build_multi(r.model, shapes, tok, pretrained=False).bfloat16()
    shape = next(iter(shapes.values()))
    batch = {"image": torch.rand(2, *shape), "text": ["no acute finding", "large left effusion"], "key": ["a", "b"]}
    cast = train._cast_floats(batch, r.deepspeed.precision)
    assert cast["image"].dtype == torch.bfloat16 and cast["key"] == batch["key"]
    assert train._cast_floats(batch, "fp32") is batch  # CPU training: untouched
    loss = model(cast)["loss"]
    loss.backward()
    assert math.isfinite(float(loss))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_cpu_dry_run_measures_the_train_path(ingested_corpus, tmp_path):
    """The CLIP GPU recipe through Ray Train + DeepSpeed (fp32, gloo, tiny model) on the session
    corpus: the figures are present and sane. One recipe only: each Ray Train run costs ~10 s of
    start-up on 2 cores, and CLIP's path (the run's tokenizer, a text batch) covers MAE's."""
    r = gpu.bench_gpu(workdir=str(tmp_path), cpu_dry_run=True, shards=ingested_corpus.shards, peak_tflops_override=1.0,
                      recipes=("cxr-clip",), decode_slices=4)
    assert r["mode"] == "cpu-dry-run" and set(r["recipes"]) == {"cxr-clip"}
    for name, v in r["recipes"].items():
        assert v["steps"] == gpu.DRY_RUN_STEPS and v["backend"] == "gloo" and v["precision"] == "fp32", name
        assert v["zero_stage"] == 3  # the recipes' own stage, not a dry-run default
        assert 0.0 <= v["data_wait_frac"] <= 1.0 and v["step_time_s"] > 0
        assert v["model_flops_per_step_per_gpu"] > 0 and 0 < v["mfu"] < 1  # 1 TFLOP/s "peak": a CPU's order
        assert v["ds_estimate_mb"] > 0 and v["peak_mem_mb"] > 0
    assert r["decode"]["slices"] == 4 and r["decode"]["cpu_slices_per_s"] > 0 and r["decode"]["gpu"].startswith("skipped")
    text = gpu.format_gpu(r)
    assert "cxr-clip" in text and "nvImageCodec" in text
