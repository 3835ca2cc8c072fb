"""Listing that names and trees cannot break (storage.walk / scan_dir, and ingest's list stage).

Real local trees in tmp_path: 1,100 nested folders, a name that is not UTF-8, FIFOs (top and
nested), a socket, symlinks in and out of SOURCE, symlink loops. The unit tests are Ray-free;
the one real ingest (marked slow by `ray_cluster`) checks the accounting end to end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from radforge import storage

BAD_NAME = b"caf\xe9-50%.bin"  # Latin-1 é: not UTF-8; and a '%' that the escape must keep


def _write(path, data=b"x"):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _reasons(entries) -> Counter:
    return Counter(e.skip for e in entries if e.skip)


@pytest.fixture
def hostile(tmp_path):
    """SOURCE with one of everything, and an outside directory its links point at."""
    src, out = tmp_path / "src", tmp_path / "outside"
    (src / "sub" / "deeper").mkdir(parents=True)
    out.mkdir()
    _write(src / "a.bin", b"aa")
    _write(src / "sub" / "b.bin", b"bbb")
    _write(out / "secret.bin", b"s")
    os.mkfifo(src / "top.fifo")
    os.mkfifo(src / "sub" / "deeper" / "nested.fifo")
    os.symlink(out / "secret.bin", src / "sub" / "out-file")
    os.symlink(out, src / "sub" / "out-dir")
    os.symlink(src / "a.bin", src / "sub" / "in-file")
    os.symlink("../..", src / "sub" / "deeper" / "up")  # a directory link to an ancestor
    os.symlink("self", src / "sub" / "self")  # ELOOP
    os.symlink(tmp_path / "missing", src / "dangling")
    _write(os.path.join(os.fsencode(src / "sub"), BAD_NAME), b"latin")
    sock = socket.socket(socket.AF_UNIX)
    sock_path = str(src / "sub" / "s.sock")
    if len(os.fsencode(sock_path)) < 100:  # AF_UNIX path limit
        sock.bind(sock_path)
    yield src
    sock.close()


def test_every_entry_that_is_not_a_directory_is_listed_once(hostile):
    entries = storage.walk(str(hostile))
    urls = [e.url for e in entries]
    assert urls == sorted(urls) and len(set(urls)) == len(urls)
    regular = {storage.basename(e.url): e.size for e in entries if e.skip is None}
    assert regular.pop("a.bin") == 2 and regular.pop("b.bin") == 3
    (escaped,) = regular  # the non-UTF-8 one, escaped
    assert regular[escaped] == 5
    expected = {
        "not_regular_file": 2 + (1 if (hostile / "sub" / "s.sock").exists() else 0),
        "symlink_outside_source": 2,
        "symlink_inside_source": 1,
        "symlink_loop": 2,
        "broken_symlink": 1,
    }
    assert _reasons(entries) == expected
    assert set(expected) <= set(storage.SKIP_REASONS)
    # what everyone else uses: regular files only
    assert [u for u, _ in storage.find_files(str(hostile))] == [e.url for e in entries if e.skip is None]


def test_symlinks_are_never_followed(hostile):
    by_name = {storage.basename(e.url): e for e in storage.walk(str(hostile))}
    assert "secret.bin" not in by_name  # out-dir was not walked
    assert by_name["out-file"].skip == "symlink_outside_source" and by_name["out-file"].size == 0
    assert by_name["out-dir"].skip == "symlink_outside_source"
    assert by_name["in-file"].skip == "symlink_inside_source"  # a.bin is listed under its own path
    assert by_name["up"].skip == "symlink_loop" and by_name["self"].skip == "symlink_loop"
    assert by_name["dangling"].skip == "broken_symlink"


def test_inside_is_the_whole_source_when_fanned_out(hostile):
    """ingest walks each top sub-directory on its own; a link to a sibling is still inside."""
    os.symlink(hostile / "a.bin", hostile / "sub" / "deeper" / "to-top")
    alone = {storage.basename(e.url): e.skip for e in storage.walk(str(hostile / "sub" / "deeper"))}
    fanned = {storage.basename(e.url): e.skip for e in storage.walk(str(hostile / "sub" / "deeper"), within=str(hostile))}
    assert alone["to-top"] == "symlink_outside_source"
    assert fanned["to-top"] == "symlink_inside_source"


def test_non_utf8_name_is_escaped_reversibly_and_read_correctly(hostile):
    (entry,) = [e for e in storage.walk(str(hostile)) if e.skip is None and "caf" in e.url]
    entry.url.encode("utf-8")  # what pyarrow and the JSON ledger need
    assert entry.url.endswith("/caf%E9-50%25.bin")
    assert storage._unescape(entry.url) == os.path.join(os.fsencode(hostile / "sub"), BAD_NAME)
    assert storage.read_bytes(entry.url) == b"latin"
    assert storage.read_head(entry.url, 3) == b"lat"
    with storage.open_input(entry.url) as f:
        assert f.read() == b"latin"
    import pyarrow as pa

    assert pa.array([entry.url], pa.string()).to_pylist() == [entry.url]


def test_escape_round_trips_and_leaves_utf8_alone(tmp_path):
    for raw in [b"\xff", b"a%b\x80", "日本".encode() + b"\xe6", b"%E9\xe9", b"\xed\xb2\x80"]:
        assert storage._unescape(storage._escape(raw)) == raw
    assert storage._unescape("/data/100%25 done") is None  # escapes only ever mean non-UTF-8
    _write(tmp_path / "caf%E9.bin", b"literal")  # a real UTF-8 name that looks like an escape
    assert storage.read_bytes(str(tmp_path / "caf%E9.bin")) == b"literal"
    assert storage.find_files(str(tmp_path)) == [(str(tmp_path / "caf%E9.bin"), 7)]


def test_escape_colliding_with_a_real_name_is_counted_not_misread(tmp_path):
    _write(tmp_path / "caf%E9.bin", b"literal")
    _write(os.path.join(os.fsencode(tmp_path), b"caf\xe9.bin"), b"latin")
    entries = storage.walk(str(tmp_path))
    assert _reasons(entries) == {"unrepresentable_name": 1}
    assert [(e.url, e.size) for e in entries if e.skip is None] == [(str(tmp_path / "caf%E9.bin"), 7)]


def _unwind(root: str) -> None:
    """Remove a one-path-deep tree bottom-up (rmtree, pytest's clean-up included, recurses)."""
    p = root
    while os.path.isdir(os.path.join(p, "d")):
        p = os.path.join(p, "d")
    while True:
        for name in os.listdir(p):
            os.unlink(os.path.join(p, name))
        os.rmdir(p)
        if p == root:
            return
        p = os.path.dirname(p)


@contextlib.contextmanager
def _deep_tree(root: str, depth: int = 1100):
    """`depth` nested folders under `root` with one file at the bottom, removed afterwards
    (os.makedirs and pytest's own tmp_path cleanup would recurse)."""
    p = root
    os.mkdir(root)
    try:
        for _ in range(depth):
            p = os.path.join(p, "d")
            os.mkdir(p)
        _write(os.path.join(p, "leaf.bin"), b"deep")
        yield root
    finally:
        _unwind(root)


@pytest.fixture
def deep(tmp_path):
    """1,100 nested folders and one file at the bottom."""
    with _deep_tree(str(tmp_path / "deep")) as root:
        yield root


def test_1100_nested_folders(deep):
    t = time.perf_counter()
    entries = storage.walk(deep)
    took = time.perf_counter() - t
    assert len(entries) == 1 and entries[0].skip is None and entries[0].size == 4
    assert entries[0].url.split("/deep/")[1].split("/").count("d") == 1100
    assert storage.read_bytes(entries[0].url) == b"deep"
    assert took < 10, took  # measured ~0.1 s on 2 cores


def test_fifo_at_the_top_is_never_opened(tmp_path):
    """In a subprocess with a deadline: a walk that opened the FIFO would block forever."""
    os.mkfifo(tmp_path / "pipe")
    _write(tmp_path / "ok.bin")
    code = (
        "import sys; from radforge import storage\n"
        "d, e = storage.scan_dir(sys.argv[1]); w = storage.walk(sys.argv[1])\n"
        "print(sorted((x.url.rsplit('/',1)[1], x.skip) for x in e) == sorted((x.url.rsplit('/',1)[1], x.skip) for x in w))\n"
        "print(sorted((x.url.rsplit('/',1)[1], x.skip) for x in w))\n"
        "try:\n    storage.open_input(sys.argv[1] + '/pipe')\nexcept OSError as exc:\n    print('refused', exc.strerror)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["True", "[('ok.bin', None), ('pipe', 'not_regular_file')]", "refused not a regular file"]


def test_fifo_as_source_is_refused_by_preflight(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    from radforge.errors import ConfigError

    with pytest.raises(ConfigError, match="not a regular file"):
        storage.check_readable(str(tmp_path / "pipe"))
    assert storage.walk(str(tmp_path / "pipe")) == [storage.Entry(str(tmp_path / "pipe"), 0, "not_regular_file")]


def test_scan_dir_is_one_level_with_skips(hostile):
    dirs, entries = storage.scan_dir(str(hostile))
    assert dirs == [str(hostile / "sub")]
    assert [(storage.basename(e.url), e.skip) for e in entries] == [
        ("a.bin", None), ("dangling", "broken_symlink"), ("top.fifo", "not_regular_file")]
    assert storage.list_dir(str(hostile)) == (dirs, [(str(hostile / "a.bin"), 2)])


def test_unreadable_directory_is_counted(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    (tmp_path / "locked").mkdir()
    _write(tmp_path / "locked" / "x.bin")
    os.chmod(tmp_path / "locked", 0)
    try:
        assert _reasons(storage.walk(str(tmp_path))) == {"unreadable_directory": 1}
    finally:
        os.chmod(tmp_path / "locked", 0o755)


# --------------------------------------------------------------------------- a real ingest


@pytest.mark.timeout(300)  # a FIFO that was opened would hang the run: the test fails instead
def test_ingest_counts_every_entry_and_reads_the_non_utf8_file(hostile, tmp_path, ray_cluster):
    import json

    from radforge import config, ingest, phantoms, shardspec
    from radforge.config import IngestRecipe

    st = phantoms.make_study(phantoms.make_patient(0))
    phantoms.xray(hostile / "dx.dcm", st, rows=64, cols=64)
    phantoms.xray(tmp_path / "tmp.dcm", phantoms.make_study(phantoms.make_patient(1)), rows=64, cols=64)
    latin = os.path.join(os.fsencode(hostile / "sub"), b"r\xf6ntgen.dcm")  # not UTF-8
    os.rename(tmp_path / "tmp.dcm", latin)
    with _deep_tree(str(hostile / "deep")):  # 1,100 nested folders (a RecursionError before)
        recipe = config.load(IngestRecipe, None, ["deid.demo_key=true"])
        t = time.perf_counter()
        res = ingest.run(str(hostile), str(tmp_path / "shards"), recipe, progress=False)
        took = time.perf_counter() - t
        listed = storage.walk(str(hostile))
    inputs = res.manifest["inputs"]
    assert shardspec.reconciles(inputs), inputs
    assert inputs["seen"] == len(listed)  # every directory entry that is not a directory
    assert inputs["used"] == 2, inputs  # both radiographs, the non-UTF-8 one included
    assert inputs["skipped"] == dict(_reasons(listed)), inputs
    assert inputs["rejected"] == {"not_dicom": 4}, inputs  # a.bin, b.bin, caf\xe9-50%.bin, the deep leaf
    ledger = [json.loads(line) for line in storage.read_bytes(storage.join(res.private, "rejects.jsonl")).splitlines()]
    assert Counter((r["status"], r["reason"]) for r in ledger) == Counter(
        {("skipped", k): v for k, v in inputs["skipped"].items()} | {("rejected", k): v for k, v in inputs["rejected"].items()})
    assert any(r["path"].endswith("/sub/caf%E9-50%25.bin") for r in ledger)  # escaped, reversible
    print(f"hostile ingest: {took:.1f} s, inputs {inputs}")
