"""The `radforge` command: its frozen surface, exit codes, one-line errors, and the plumbing from
arguments to library calls (the Ray pipeline itself is replaced here; test_ingest runs it)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radforge import cli, config, shardspec
from radforge.transforms import Profile
from radforge.config import IngestRecipe

ROOT = Path(__file__).resolve().parents[1]

# The frozen CLI surface. Changing it is a deliberate act: edit this literal in the same change.
# Positionals are listed by their metavar (upper case), options by all their spellings.
EXPECTED_SURFACE = {
    "ingest": {
        "SOURCE", "DEST", "-h", "--help", "--recipe", "--reports", "--labels", "--set", "--demo",
        "--no-progress", "--append",
    },
    "inspect": {"DEST", "-h", "--help", "--samples", "--json", "--split", "--png", "--montage"},
    "bench": {"what", "-h", "--help", "--json", "--workdir", "--series", "--slices", "--size", "--syntax", "--hostile",
              "--cpu-dry-run", "--peak-tflops", "--max-rows"},
    "train": {"RECIPE", "-h", "--help", "--set", "--resume", "--no-progress"},
    "export": {"CHECKPOINT", "OUT", "-h", "--help"},
    "evaluate": {"MODEL", "SHARDS", "-h", "--help", "--split", "--set", "--json", "--protocol", "--report", "--no-progress"},
    "index": {"MODEL", "SHARDS", "OUT", "-h", "--help", "--split", "--no-progress"},
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _surface(parser: argparse.ArgumentParser) -> set[str]:
    out = set()
    for a in parser._actions:
        out |= set(a.option_strings) if a.option_strings else {a.metavar or a.dest}
    return out


def test_the_cli_surface_is_frozen():
    parser = cli._build_parser()
    subs = _subparsers(parser)
    assert set(subs) == set(EXPECTED_SURFACE) == set(cli.COMMANDS)
    assert {name: _surface(p) for name, p in subs.items()} == EXPECTED_SURFACE
    top = {s for a in parser._actions for s in a.option_strings}
    assert top == {"-h", "--help"}


def test_help_lists_every_command_and_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPECTED_SURFACE)
    for name, options in EXPECTED_SURFACE.items():
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        shown = [o for o in options if o.startswith("-") or o.isupper()]  # `what` shows as {ingest}
        assert all(opt in out for opt in shown), (name, out)


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_bench_choices_are_part_of_the_surface():
    bench = _subparsers(cli._build_parser())["bench"]
    choices = {a.dest: a.choices for a in bench._actions if a.choices}
    assert choices == {"what": ["ingest", "train", "stream", "serve", "dicomweb", "gpu", "scale"], "syntax": ["explicit", "rle", "jpegls", "j2k"]}


def test_bench_hostile_is_a_serve_option(monkeypatch, capsys):
    from radforge import bench

    calls = []
    monkeypatch.setattr(bench, "bench_serve_hostile", lambda **kw: calls.append(kw) or {"benchmark": "serve-hostile"})
    assert cli.main(["bench", "serve", "--hostile", "--json"]) == 0
    assert calls == [{"workdir": None}] and json.loads(capsys.readouterr().out) == {"benchmark": "serve-hostile"}
    assert cli.main(["bench", "ingest", "--hostile"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--hostile" in err[0] and not calls[1:]


def test_bench_scale_max_rows(monkeypatch, capsys):
    from radforge import bench

    calls = []
    monkeypatch.setattr(bench, "bench_scale", lambda **kw: calls.append(kw) or {"benchmark": "scale"})
    assert cli.main(["bench", "scale", "--max-rows", "10M", "--json"]) == 0
    assert cli.main(["bench", "scale", "--max-rows", "250k", "--json"]) == 0
    assert cli.main(["bench", "scale", "--json"]) == 0
    assert [c["max_rows"] for c in calls] == [10_000_000, 250_000, 1_000_000]
    capsys.readouterr()
    assert cli.main(["bench", "ingest", "--max-rows", "1M"]) == 2 and len(calls) == 3
    with pytest.raises(SystemExit):
        cli.main(["bench", "scale", "--max-rows", "lots"])
    assert "not a row count" in capsys.readouterr().err


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "platform") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_python_dash_m_radforge_help_works(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "radforge", "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: radforge") and all(name in r.stdout for name in EXPECTED_SURFACE)


def test_config_error_in_a_subprocess_exits_2_with_one_line(tmp_path):
    """A bad --set fails in config, before any work: exit 2, exactly one stderr line, no DEST."""
    src = tmp_path / "src"
    src.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "radforge", "ingest", str(src), str(tmp_path / "dest"), "--set", "nope=1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("radforge: error: unknown recipe key nope"), r.stderr
    assert not (tmp_path / "dest").exists() and not (tmp_path / "dest.private").exists()


# ----------------------------------------------------------------------------- ingest plumbing


@pytest.fixture
def fake_ingest(monkeypatch):
    """Replace the Ray pipeline by a recorder that returns a finished manifest."""
    from radforge import ingest

    calls = []
    samples = {"n": 3}

    def run(source, dest, recipe, *, reports=None, labels=None, progress=True):
        calls.append(dict(source=source, dest=dest, recipe=recipe, reports=reports, labels=labels, progress=progress))
        m = shardspec.new_manifest(profile=Profile.from_recipe(recipe), recipe=config.to_dict(recipe),
                                   deid={"demo_key": recipe.deid.demo_key}, plan_digest="x")
        n = samples["n"]
        records = [{"path": "train/train-000000.tar", "split": "train", "samples": n, "bytes": 10 * n,
                    "sha256": "", "modalities": {"CT": n}}]
        shardspec.finalize(m, records, {"seen": 4, "used": n, "skipped": {}, "rejected": {"not_dicom": 4 - n}})
        return ingest.Result(dest=dest, private=dest + ".private", manifest=m, wall_s=1.0)

    monkeypatch.setattr(ingest, "run", run)
    return calls, samples


def test_ingest_passes_arguments_through(fake_ingest, tmp_path, capsys):
    calls, _ = fake_ingest
    recipe = ROOT / "shards" / "recipes" / "cxr.yaml"
    rc = cli.main([
        "ingest", "SRC", "DEST", "--recipe", str(recipe), "--set", "xray.longest_side=256", "--set", "ct.min_slices=3",
        "--reports", "r.csv", "--labels", "l.parquet", "--demo", "--no-progress",
    ])
    assert rc == 0
    (call,) = calls
    r = call["recipe"]
    assert isinstance(r, IngestRecipe) and r.name == "cxr" and r.modalities == ["CR", "DX"]
    assert r.xray.longest_side == 256 and r.ct.min_slices == 3 and r.deid.demo_key is True
    assert (call["source"], call["dest"], call["reports"], call["labels"], call["progress"]) == (
        "SRC", "DEST", "r.csv", "l.parquet", False
    )
    out = capsys.readouterr().out
    assert "radforge ingest" in out and "DEMO KEY" in out and "DEST.private" in out


def test_ingest_defaults(fake_ingest, capsys):
    calls, _ = fake_ingest
    assert cli.main(["ingest", "SRC", "DEST"]) == 0
    assert calls[0]["recipe"] == IngestRecipe() and calls[0]["progress"] is True
    assert calls[0]["reports"] is None and calls[0]["labels"] is None


def test_ingest_that_produced_nothing_exits_1(fake_ingest, capsys):
    _, samples = fake_ingest
    samples["n"] = 0
    assert cli.main(["ingest", "SRC", "DEST", "--demo"]) == 1
    assert "nothing could be ingested" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "nope=1"], "unknown recipe key nope"),
        (["--set", "ct.spacing_mm=[1,2]"], "ct.spacing_mm"),
        (["--set", "splits.train=0.5"], "splits"),
        (["--set", "novalue"], "key=value"),
        (["--recipe", "/definitely/not/here.yaml"], "recipe not found"),
    ],
)
def test_config_errors_exit_2_with_one_line_before_any_work(fake_ingest, capsys, args, needle):
    calls, _ = fake_ingest
    rc = cli.main(["ingest", "SRC", "DEST", *args])
    assert rc == 2 and calls == []  # the pipeline was never called
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("radforge: error: ") and needle in lines[0], captured.err
    assert captured.out == ""


# ----------------------------------------------------------------------------- inspect


@pytest.fixture
def shard_set(tmp_path):
    import webdataset as wds

    dest = tmp_path / "shards"
    rng = np.random.default_rng(0)
    written = []
    records = []
    for split, modality, n in (("train", "CT", 3), ("val", "DX", 2)):
        path = dest / shardspec.shard_name(split, 0)
        path.parent.mkdir(parents=True)
        with wds.TarWriter(str(path)) as w:
            for i in range(n):
                key = f"{split}{i:019d}"
                if modality == "CT":
                    arr = rng.integers(-1024, 2000, size=(4, 8, 8)).astype(np.int16)
                else:
                    arr = rng.integers(0, 65535, size=(16, 12)).astype(np.uint16)
                meta = {"modality": modality, "shape": list(arr.shape), "split": split}
                w.write({"__key__": key, **shardspec.encode_sample(key, arr, meta, report=f"report {key}")})
                written.append((key, meta))
        records.append({"path": shardspec.shard_name(split, 0), "split": split, "samples": n,
                        "bytes": path.stat().st_size, "sha256": "", "modalities": {modality: n}})
    recipe = IngestRecipe()
    m = shardspec.new_manifest(profile=Profile.from_recipe(recipe), recipe=config.to_dict(recipe),
                               deid={"demo_key": False}, plan_digest="x")
    shardspec.finalize(m, records, {"seen": 6, "used": 5, "skipped": {"localizer": 1}, "rejected": {}})
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest, written


def test_inspect_summary(shard_set, capsys):
    dest, _ = shard_set
    assert cli.main(["inspect", str(dest)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"radforge shards: {dest}")
    assert "localizer 1" in out and "yes" in out
    # The manifest's own URL works as well.
    assert cli.main(["inspect", str(dest / "manifest.json")]) == 0
    assert capsys.readouterr().out.startswith(f"radforge shards: {dest}")


def test_inspect_samples_and_json(shard_set, capsys):
    dest, written = shard_set
    assert cli.main(["inspect", str(dest), "--samples", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == [k for k, _ in written[:2]]
    assert cli.main(["inspect", str(dest), "--json", "--split", "val"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["__key__"] for r in rows] == [k for k, m in written if m["split"] == "val"]
    assert all(r["report"] == f"report {r['__key__']}" and r["modality"] == "DX" for r in rows)


def test_inspect_png_montage(shard_set, tmp_path, capsys):
    dest, _ = shard_set
    png = tmp_path / "montage.png"
    assert cli.main(["inspect", str(dest), "--png", str(png), "--montage", "4"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "montage of 4 samples" in capsys.readouterr().out
    # --split reaches the montage: val holds 2 samples, fewer than --montage asks for
    assert cli.main(["inspect", str(dest), "--png", str(png), "--montage", "4", "--split", "val"]) == 0
    assert "montage of 2 samples" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(png).size[0] == 2 * 256  # the two val X-rays, one cell each, side by side


def test_inspect_missing_manifest_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nothing-here")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("radforge: error: no manifest at ") and captured.out == ""
