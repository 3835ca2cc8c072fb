"""The `radforge` command: a dict of sub-commands → library calls. Parsing only; no logic here.

Exit status: 0 success, 1 the job ran but produced nothing usable, 2 bad configuration (one line
on stderr, before any work).
"""

from __future__ import annotations

import argparse
import json
import sys

from radforge.errors import ConfigError


def _ingest(a) -> int:
    from radforge import config, ingest, shardspec
    from radforge.config import IngestRecipe

    sets = list(a.set or [])
    if a.demo:
        sets.append("deid.demo_key=true")
    recipe = config.load(IngestRecipe, a.recipe, sets)
    result = ingest.run(a.source, a.dest, recipe, reports=a.reports, labels=a.labels, progress=not a.no_progress,
                        **({"append": True} if a.append else {}))
    title = "radforge ingest: already complete (no-op)" if result.noop else "radforge ingest"
    print(shardspec.format_summary(result.manifest, wall_s=None if result.noop else result.wall_s, title=title))
    if result.source_stats:  # DICOMweb: how hard the archive was to read
        st = result.source_stats
        causes = ", ".join(f"{k[6:]} {v}" for k, v in st.items() if k.startswith("retry_"))
        print(f"  DICOMweb: {st.get('requests', 0):,} requests, {st.get('retries', 0):,} retries" + (f" ({causes})" if causes else ""))
    if result.ok:
        print(f"\n  shards + manifest: {result.dest}\n  private index + rejects ledger: {result.private}")
    else:  # no manifest was written: DEST holds nothing to read
        print(f"\n  no shards or manifest written\n  private index + rejects ledger: {result.private}")
    if not result.ok:
        print("radforge: nothing could be ingested (see the rejects ledger)", file=sys.stderr)
        return 1
    return 0


def _inspect(a) -> int:
    from radforge import shardspec

    m = shardspec.read_manifest(a.dest)
    dest = shardspec.shards_root(a.dest)
    if a.samples or a.json:
        for raw in shardspec.iter_samples(dest, m, limit=a.samples or None, split=a.split):
            _, meta, report = shardspec.decode_sample(_suffixes(raw))
            meta = {"__key__": raw["__key__"], **meta, "report": report} if a.json else meta
            print(json.dumps(meta, sort_keys=True) if a.json else f"{raw['__key__']}  {meta['modality']}  {meta['shape']}  {meta['split']}")
    elif not a.png:
        print(shardspec.format_summary(m, title=f"radforge shards: {dest}"))
        sel = _selection(dest)
        if sel and sel.get("studies"):
            print("\n" + shardspec.format_selection(sel))
    if a.png:
        from radforge import viz

        sheet, n = viz.shard_montage(dest, m, limit=a.montage, split=a.split)
        viz.save_png(sheet, a.png)
        print(f"montage of {n} samples written to {a.png}")
    return 0


def _selection(dest: str) -> dict | None:
    from radforge import shardspec, storage

    url = storage.join(dest, shardspec.SELECTION)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def _suffixes(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if not k.startswith("__")}


def _row_count(text: str) -> int:
    """'100k', '1M', '10M' or a plain number → rows (argparse type of `bench --max-rows`)."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a row count: {text!r} (e.g. 100k, 1M, 10M)") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--max-rows must be at least 1")
    return n


def _bench(a) -> int:
    from radforge import bench

    result = bench.run(a.what, **{k: v for k, v in vars(a).items() if k in ("workdir", "series", "slices", "size", "syntax", "hostile",
                                                                               "cpu_dry_run", "peak_tflops", "max_rows")})
    print(json.dumps(result, indent=1) if a.json else bench.format_result(result))
    return 0


def _train(a) -> int:
    from radforge import config, train
    from radforge.config import TrainRecipe

    recipe = config.load(TrainRecipe, a.recipe, list(a.set or []))
    result = train.run(recipe, resume=a.resume, progress=not a.no_progress)
    m = result.metrics
    print(f"radforge train {result.name}: {result.steps} steps, final loss {m.get('loss', float('nan')):.4f}")
    for k in sorted(k for k in m if k.startswith("eval_")):
        print(f"  {k[5:]}: {m[k]:.4f}")
    print(f"  checkpoint: {result.checkpoint}\n  metrics: {result.run_dir}  (TensorBoard: tb/, loss curve: {result.curve_png})")
    return 0 if result.checkpoint else 1


def _export(a) -> int:
    from radforge import checkpoint

    out = checkpoint.export(a.checkpoint, a.out)
    print(f"model written to {out}")
    return 0


def _evaluate(a) -> int:
    from radforge import config, evaluate
    from radforge.config import EvalConfig

    cfg = config.load(EvalConfig, None, list(a.set or []))
    result = evaluate.run(a.model, a.shards, split=a.split, protocols=[a.protocol], report_dir=a.report, cfg=cfg,
                          progress=not a.no_progress)
    print(json.dumps(result, sort_keys=True) if a.json else evaluate.format_table(result))
    return 0


def _index(a) -> int:
    from radforge import index

    info = index.build(a.model, a.shards, a.out, split=a.split, progress=not a.no_progress)
    print(f"index of {info.n} {info.image} samples ({info.split}, model {info.model_id}) written to {info.out}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radforge", description="CT and X-ray DICOM corpora → foundation models")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("ingest", help="DICOM on any fsspec URL → de-identified WebDataset shards + manifest")
    s.add_argument("source", metavar="SOURCE", help="folder or URL holding DICOM files (s3://, gs://, file://, memory://, local)")
    s.add_argument("dest", metavar="DEST", help="where shards and manifest.json go")
    s.add_argument("--recipe", help="ingest recipe YAML (default: built-in defaults = shards/recipes/default.yaml)")
    s.add_argument("--reports", metavar="TABLE", help="reports table (CSV, Parquet or JSONL)")
    s.add_argument("--labels", metavar="TABLE", help="labels table (CSV, Parquet or JSONL), CheXpert 1/0/-1/blank")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value, e.g. ct.spacing_mm=[2,1,1]")
    s.add_argument("--demo", action="store_true", help="use the public demo pseudonym key (not for real data)")
    s.add_argument("--append", action="store_true",
                   help="add the inputs not yet in DEST as a new manifest version (old shards untouched; manifests/vN.json kept)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(fn=_ingest)

    s = sub.add_parser("inspect", help="summarise a shard set; print samples; draw a montage")
    s.add_argument("dest", metavar="DEST", help="shard set (directory URL or its manifest.json)")
    s.add_argument("--samples", type=int, default=0, metavar="N", help="print the first N samples")
    s.add_argument("--json", action="store_true", help="print per-sample metadata as JSON lines")
    s.add_argument("--split", help="only this split")
    s.add_argument("--png", metavar="FILE", help="write a montage picture (CT in three planes, X-rays)")
    s.add_argument("--montage", type=int, default=12, metavar="N", help="samples in the montage (default 12)")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("bench", help="benchmarks, printed as ratios measured side by side")
    s.add_argument("what", choices=["ingest", "train", "stream", "serve", "dicomweb", "gpu", "scale"])
    s.add_argument("--json", action="store_true")
    s.add_argument("--workdir", help="where the generated corpus goes (default: a temp dir)")
    s.add_argument("--series", type=int, help="CT series in the generated corpus (default: per benchmark, ingest 8, stream 4)")
    s.add_argument("--slices", type=int, help="slices per series (default: per benchmark, ingest 128, stream 64)")
    s.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    s.add_argument("--syntax", default="rle", choices=["explicit", "rle", "jpegls", "j2k"], help="transfer syntax of the corpus")
    s.add_argument("--hostile", action="store_true",
                   help="serve only: valid DICOM uploads mixed with 25%% crafted ones (bombs, stalls, garbage) vs a clean run")
    s.add_argument("--cpu-dry-run", action="store_true",
                   help="gpu only: the same code path on CPU (fp32, gloo, 3 steps, a tiny model) to check the script without a GPU")
    s.add_argument("--peak-tflops", type=float, metavar="TFLOPS",
                   help="gpu only: the GPU's dense bf16 peak for MFU (default: from the table of known GPUs by device name)")
    s.add_argument("--max-rows", type=_row_count, metavar="N",
                   help="scale only: the largest synthetic index (10k, 100k, 1M, 10M or a number; default 1M)")
    s.set_defaults(fn=_bench)

    s = sub.add_parser("train", help="train a model from a recipe on the Ray cluster (Ray Train + DeepSpeed)")
    s.add_argument("recipe", metavar="RECIPE", help="training recipe YAML (jobs/recipes/*.yaml)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value, e.g. deepspeed.zero_stage=3")
    s.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue the run NAME from its latest checkpoint if there is one (default); never: start over")
    s.add_argument("--no-progress", action="store_true", help="no per-step log lines")
    s.set_defaults(fn=_train)

    s = sub.add_parser("export", help="training checkpoint → model dir (safetensors + model.json + tokenizer)")
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory URL (printed by radforge train)")
    s.add_argument("out", metavar="OUT", help="where the model directory goes (any fsspec URL)")
    s.set_defaults(fn=_export)

    s = sub.add_parser("evaluate", help="evaluation protocols (kNN, probes, few-shot, zero-shot, fairness, robustness, "
                                        "calibration, ...) chosen from the model's capabilities; an HTML report")
    _model_and_shards(s, "evaluate")
    s.add_argument("--protocol", default="all", metavar="P[,P...]",
                   help="protocols to run, comma-separated, or 'all' (every one the model supports; default)")
    s.add_argument("--report", metavar="DIR", help="also write DIR/index.html (self-contained, PNGs beside it)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an eval setting, e.g. bootstrap=200")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    s.set_defaults(fn=_evaluate)

    s = sub.add_parser("index", help="embeddings of a split's samples → a retrieval index for the serve app (/v1/retrieve)")
    _model_and_shards(s, "index", out="where the index goes (embeddings.npy + index.json; any fsspec URL)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=_index)
    return p


def _model_and_shards(s: argparse.ArgumentParser, verb: str, out: str | None = None) -> None:
    """MODEL SHARDS [OUT] --split: what `evaluate` and `index` both take."""
    s.add_argument("model", metavar="MODEL", help="exported model directory URL")
    s.add_argument("shards", metavar="SHARDS", help="shard set (directory URL holding manifest.json)")
    if out:
        s.add_argument("out", metavar="OUT", help=out)
    s.add_argument("--split", default="test", help=f"split to {verb} (default: test)")


# The frozen CLI surface (tests compare against it): sub-command → its options.
COMMANDS = ("ingest", "inspect", "bench", "train", "export", "evaluate", "index")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"radforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("radforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
