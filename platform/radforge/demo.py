"""`make demo`: the main job on the embedded default (local Ray, local file store).

Builds a small sample corpus (real DICOM shipped by installed packages + generated CT phantoms and
X-rays with reports and labels, some deliberately broken), ingests it with the public demo key,
prints the summary and writes a montage picture. Later stages (train, serve) extend this script.

    python -m radforge.demo [--out var/demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m radforge.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="var/demo", help="artifact folder (default var/demo)")
    p.add_argument("--patients", type=int, default=6)
    a = p.parse_args(argv)

    from radforge import config, ingest, phantoms, shardspec, viz
    from radforge.config import IngestRecipe

    out = os.path.abspath(a.out)
    corpus_dir = os.path.join(out, "corpus")
    shards = os.path.join(out, "shards")
    # A fresh run every time: the demo shows the whole pipeline, not the no-op path.
    for d in (corpus_dir, shards, shards + ".private"):
        shutil.rmtree(d, ignore_errors=True)
    print(f"[1/3] building the sample corpus in {corpus_dir}")
    corpus = phantoms.build_corpus(corpus_dir, n_patients=a.patients)
    n_files = corpus.expected["files"]
    print(f"      {n_files} files: {len(corpus.series)} generated CT series, {len(corpus.images)} X-rays, "
          f"{len(corpus.bad)} broken files, {len(corpus.package)} real files from installed packages")

    print(f"[2/3] ingesting {corpus.dicom_dir} → {shards}")
    recipe = config.load(IngestRecipe, None, ["deid.demo_key=true"])
    result = ingest.run(corpus.dicom_dir, shards, recipe, reports=corpus.reports_csv, labels=corpus.labels_csv)
    print(shardspec.format_summary(result.manifest, wall_s=result.wall_s, title="radforge ingest"))

    print("[3/3] drawing a montage")
    items = []
    for raw in shardspec.iter_samples(shards, result.manifest, limit=12):
        arr, meta, _ = shardspec.decode_sample({k: v for k, v in raw.items() if not k.startswith("__")})
        items.append(({"__key__": raw["__key__"], **meta}, arr))
    png = os.path.join(out, "montage.png")
    viz.save_png(viz.montage(items, title=f"radforge demo: {len(items)} samples"), png)
    print(f"\nshards + manifest:    {shards}/manifest.json")
    print(f"private index/ledger: {result.private}")
    print(f"montage picture:      {png}")
    print(f"inspect:              .venv/bin/radforge inspect {shards} --samples 5 --json")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
