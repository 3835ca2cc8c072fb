"""`make demo`: the main job on the embedded default (local Ray, local file store), end to end.

    python -m radforge.demo [--out var/demo] [--patients 6] [--cohort 100] [--quick]

1. a sample corpus: real DICOM shipped by installed packages, generated CT phantoms and X-rays with
   every ingest edge case (broken files, gaps, tilt, localizers…), plus a clean cohort of small
   CT + X-ray studies whose findings are drawn in the pixels and stated in the reports;
2. ingest (public demo key) → `shards/` + a montage picture;
3. a tiny 3D MAE on the CT volumes (2 workers, DeepSpeed ZeRO-2);
4. a tiny CLIP on X-ray ↔ report (2 workers, DeepSpeed ZeRO-2);
5. export → `model/` (CLIP) and `model-mae/` (loadable without DeepSpeed), retrieval index → `index/`;
6. evaluation of the exported CLIP on the held-out split: zero-shot AUROC per finding with 95% CIs,
   recall@K;
7. Ray Serve on 127.0.0.1: real HTTP requests with a DICOM file, answers printed, Serve shut down.

Every artifact lands under --out. `--quick` shrinks the cohort and the step counts (what `make
test` runs); the full demo takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time


def _stage(i: int, n: int, text: str) -> None:
    print(f"\n[{i}/{n}] {text}", flush=True)


def build_corpus(corpus_dir: str, *, patients: int, cohort: int) -> tuple:
    """The ingest showcase (`phantoms.build_corpus`) and the learnable cohort in one source folder,
    with one merged pair of report/label tables beside it."""
    from radforge import phantoms

    corpus = phantoms.build_corpus(corpus_dir, n_patients=patients)
    tmp = os.path.join(corpus_dir, "_cohort")
    # Patient numbers after the showcase's (it also uses `patients` for its broken-file patient).
    tc = phantoms.training_corpus(tmp, n_patients=cohort, first_patient=patients + 1)
    shutil.move(os.path.join(tmp, "dicom"), os.path.join(corpus.dicom_dir, "cohort"))
    shutil.rmtree(tmp)
    reports, labels = phantoms.write_tables(corpus_dir, corpus.studies + tc.studies)
    return corpus, tc, reports, labels


def _recipe(path: str, out: str, shards: str, sets: list[str]):
    from radforge import config
    from radforge.config import TrainRecipe

    return config.load(TrainRecipe, path, [f"data.shards={shards}", f"output_dir={os.path.join(out, 'runs')}",
                                           f"checkpoint.storage_path={os.path.join(out, 'checkpoints')}", *sets])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_query(model_dir: str, index_dir: str, dicom_file: str) -> None:
    """Start the Serve app on 127.0.0.1, send real HTTP requests, print the answers, shut down."""
    import requests
    from ray import serve

    from radforge import serve as rserve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = rserve.build_app({"model": model_dir, "index": index_dir})
        serve.run(app, name="radforge", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):  # the replica loads the model on start
            try:
                if requests.get(f"{base}/healthz", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        models = requests.get(f"{base}/v1/models", timeout=30).json()
        print(f"      GET  /v1/models     → {json.dumps(models)[:160]}")
        with open(dicom_file, "rb") as f:
            body = f.read()
        r = requests.post(f"{base}/v1/embed", data=body, timeout=60)
        emb = r.json()
        print(f"      POST /v1/embed      → {r.status_code}: {len(emb.get('embedding', []))}-d embedding, model {emb.get('model')}")
        r = requests.post(f"{base}/v1/zero-shot", params={"findings": "nodule,effusion,cardiomegaly"}, data=body, timeout=60)
        probs = r.json().get("probabilities", r.json())
        print(f"      POST /v1/zero-shot  → {r.status_code}: " + ", ".join(f"{k} {v:.2f}" for k, v in probs.items()))
        r = requests.post(f"{base}/v1/retrieve", params={"k": 3}, data=body, timeout=60)
        hits = r.json().get("results", [])
        print(f"      POST /v1/retrieve   → {r.status_code}: " + ", ".join(f"{h['key'][:8]}… {h['score']:.3f}" for h in hits))
        r = requests.post(f"{base}/v1/embed", data=b"not a dicom file", timeout=60)
        print(f"      POST /v1/embed (garbage) → {r.status_code}: {r.json()}")
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m radforge.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="var/demo", help="artifact folder (default var/demo)")
    p.add_argument("--patients", type=int, default=6, help="patients in the ingest showcase corpus")
    p.add_argument("--cohort", type=int, default=240, help="patients in the learnable CT + X-ray cohort")
    p.add_argument("--quick", action="store_true", help="small cohort and few steps (the `make test` variant)")
    a = p.parse_args(argv)

    import ray

    from radforge import checkpoint, config, evaluate, index, ingest, shardspec, train, viz
    from radforge.config import IngestRecipe

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    recipes = os.path.join(here, "jobs", "recipes")
    out = os.path.abspath(a.out)
    corpus_dir, shards = os.path.join(out, "corpus"), os.path.join(out, "shards")
    cohort = 24 if a.quick else a.cohort
    steps = (["steps=6", "log_every=2", "checkpoint.every_steps=3", "eval.bootstrap=50", "deepspeed.micro_batch=4"]
             if a.quick else [])
    n = 7
    t0 = time.perf_counter()
    # A fresh run every time: the demo shows the whole pipeline, not the resume / no-op paths.
    for d in ("corpus", "shards", "shards.private", "runs", "checkpoints", "model", "model-mae", "index"):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)

    _stage(1, n, f"building the sample corpus in {corpus_dir}")
    corpus, tc, reports, labels = build_corpus(corpus_dir, patients=a.patients, cohort=cohort)
    print(f"      {corpus.expected['files']} showcase files ({len(corpus.series)} CT series, {len(corpus.images)} X-rays, "
          f"{len(corpus.bad)} broken, {len(corpus.package)} real files from installed packages) + "
          f"{tc.files} cohort files ({cohort} patients, CT + X-ray, findings in pixels and reports)")

    _stage(2, n, f"ingesting {corpus.dicom_dir} → {shards}")
    if not ray.is_initialized():
        ray.init(logging_level="WARNING", log_to_driver=False, include_dashboard=False)
    # A larger test split than the default 10% so that the demo's AUROC table means something.
    ingest_recipe = config.load(IngestRecipe, None, ["deid.demo_key=true", "splits={train: 0.75, val: 0.05, test: 0.2}"])
    result = ingest.run(corpus.dicom_dir, shards, ingest_recipe, reports=reports, labels=labels)
    print(shardspec.format_summary(result.manifest, wall_s=result.wall_s, title="radforge ingest"))
    if not result.ok:
        return 1
    montage = os.path.join(out, "montage.png")
    viz.save_png(viz.shard_montage(shards, result.manifest, limit=12, title="radforge demo")[0], montage)

    _stage(3, n, "training a tiny 3D MAE on the CT volumes (2 workers, DeepSpeed ZeRO-2)")
    mae = train.run(_recipe(os.path.join(recipes, "tiny-mae-ct.yaml"), out, shards, steps), resume="never")
    print(f"      {mae.steps} steps, loss {mae.history[0]['loss']:.4f} → {mae.metrics.get('loss', float('nan')):.4f}"
          if mae.history else f"      {mae.steps} steps")

    _stage(4, n, "training a tiny CLIP on X-ray ↔ report (2 workers, DeepSpeed ZeRO-2)")
    clip = train.run(_recipe(os.path.join(recipes, "tiny-clip-xray.yaml"), out, shards, steps), resume="never")
    print(f"      {clip.steps} steps, loss {clip.history[0]['loss']:.4f} → {clip.metrics.get('loss', float('nan')):.4f}"
          if clip.history else f"      {clip.steps} steps")

    _stage(5, n, "exporting both models; building the retrieval index of the test split")
    model_dir, mae_dir, index_dir = (os.path.join(out, d) for d in ("model", "model-mae", "index"))
    checkpoint.export(clip.checkpoint, model_dir)
    checkpoint.export(mae.checkpoint, mae_dir)
    info = index.build(model_dir, shards, index_dir, split="test")
    print(f"      {model_dir}  {mae_dir}  index of {info.n} test images")

    _stage(6, n, "evaluating the CLIP model on the held-out test split")
    clip_recipe = _recipe(os.path.join(recipes, "tiny-clip-xray.yaml"), out, shards, steps)
    res = evaluate.run(model_dir, shards, split="test", cfg=clip_recipe.eval)
    print(evaluate.format_table(res))

    _stage(7, n, "serving the model with Ray Serve on 127.0.0.1 and querying it over HTTP")
    cohort_dir = os.path.join(corpus.dicom_dir, "cohort")
    sample = next(os.path.join(d, f) for d, _, fs in sorted(os.walk(cohort_dir)) for f in fs if f == "xr.dcm")
    _serve_and_query(model_dir, index_dir, sample)

    print(f"\nall done in {time.perf_counter() - t0:,.0f} s. Artifacts under {out}:")
    for label, path in (("shards + manifest", os.path.join(shards, "manifest.json")), ("montage", montage),
                        ("MAE loss curve", mae.curve_png), ("CLIP loss curve", clip.curve_png),
                        ("CLIP model", model_dir), ("MAE model", mae_dir), ("retrieval index", index_dir),
                        ("checkpoints", os.path.join(out, "checkpoints")), ("TensorBoard", os.path.join(out, "runs"))):
        print(f"  {label:<18} {path}")
    print(f"  serve it yourself:  .venv/bin/serve run radforge.serve:build_app model={model_dir} index={index_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
