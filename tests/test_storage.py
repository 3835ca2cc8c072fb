"""radforge.storage against real backends: local disk, memory://, and S3 via moto's server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import socket
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radforge import storage
from radforge.errors import ConfigError

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    """An empty directory-like URL on each backend."""
    if request.param == "local":
        yield str(tmp_path / "root")
    elif request.param == "memory":
        url = f"memory://rf-{uuid.uuid4().hex[:12]}/root"
        yield url
        storage.remove(storage.parent(url), recursive=True)
    else:
        yield request.getfixturevalue("s3_bucket") + "/root"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- URL helpers


@pytest.mark.parametrize(
    "url, parts, expected",
    [
        ("s3://bkt", ("a", "b.tar"), "s3://bkt/a/b.tar"),
        ("s3://bkt/", ("/a/", "/b.tar"), "s3://bkt/a/b.tar"),
        ("s3://", ("bkt", "k"), "s3://bkt/k"),
        ("/tmp/x/", ("y",), "/tmp/x/y"),
        ("/", ("tmp",), "/tmp"),
        ("file:///tmp/x", ("y", "", "z"), "file:///tmp/x/y/z"),
        ("memory://root", ("a",), "memory://root/a"),
        ("gs://b/p", (), "gs://b/p"),
    ],
)
def test_join(url, parts, expected):
    assert storage.join(url, *parts) == expected


@pytest.mark.parametrize(
    "url, par, base",
    [
        ("s3://bkt/a/b.tar", "s3://bkt/a", "b.tar"),
        ("s3://bkt/a/", "s3://bkt", "a"),
        ("/tmp/x/y", "/tmp/x", "y"),
        ("file:///tmp/x", "file:///tmp", "x"),
        ("memory://root/a", "memory://root", "a"),
    ],
)
def test_parent_basename(url, par, base):
    assert storage.parent(url) == par
    assert storage.basename(url) == base


def test_is_local():
    assert storage.is_local("/tmp/x")
    assert storage.is_local("relative/dir")
    assert storage.is_local("file:///tmp/x")
    assert not storage.is_local("s3://bkt/x")
    assert not storage.is_local("memory://x")


# --------------------------------------------------------------------------- round trips


def test_round_trip(root):
    url = storage.join(root, "sub", "blob.bin")
    data = bytes(range(256)) * 64
    assert not storage.exists(url)
    storage.write_bytes_atomic(url, data)
    assert storage.exists(url)
    assert storage.read_bytes(url) == data
    assert storage.read_head(url, 10) == data[:10]
    assert storage.read_head(url, 10 * len(data)) == data
    assert storage.read_head(url, 0) == b""
    with storage.open_input(url, block_size=1024) as f:
        f.seek(1000)
        assert f.read(24) == data[1000:1024]
    with storage.open_input(url) as f:
        assert f.read() == data

    storage.write_bytes_atomic(url, b"second")  # overwrite
    assert storage.read_bytes(url) == b"second"

    storage.remove(url)
    assert not storage.exists(url)
    storage.remove(url)  # removing what is gone is not an error


def test_empty_object(root):
    url = storage.join(root, "empty")
    storage.write_bytes_atomic(url, b"")
    assert storage.read_bytes(url) == b""
    assert storage.read_head(url, 100) == b""  # S3 answers 416 to a range on an empty object
    with storage.open_head(url, 0) as f:
        assert f.read(132) == b"" and f.requests == 0


def test_head_first_range_is_a_share_of_the_object_between_bounds():
    assert storage.head_first_range(-1) == storage.HEAD_FIRST_MAX  # size unknown
    for size in (0, 132, storage.HEAD_WHOLE_MAX):  # a small object: whole, in the one request
        assert storage.head_first_range(size) == size
    assert storage.head_first_range(storage.HEAD_WHOLE_MAX + 1) == storage.HEAD_FIRST_MIN
    assert storage.head_first_range(72_476) == 72_476 // 32  # a 256² RLE CT slice: ≈ 3 %
    assert storage.head_first_range(10**9) == storage.HEAD_FIRST_MAX


def test_open_head_reads_by_ranges_on_every_backend(root):
    url = storage.join(root, "slice.dcm")
    data = os.urandom(400_000)
    storage.write_bytes_atomic(url, data)
    first = storage.head_first_range(len(data))
    assert first == len(data) // 32  # between HEAD_FIRST_MIN and HEAD_FIRST_MAX
    for size in (len(data), -1):  # the listed size, or asked of the store
        with storage.open_head(url, size) as f:
            assert f.read(132) == data[:132] and (f.requests, f.bytes_fetched) == (1, first)
            f.seek(first - 4)  # onward: one extension of at least 3× the window
            assert f.read(8) == data[first - 4:first + 4] and (f.requests, f.bytes_fetched) == (2, 4 * first)
            assert f.seek(-8, os.SEEK_END) == len(data) - 8  # far: exactly the bytes asked for
            assert f.read(8) == data[-8:] and (f.requests, f.bytes_fetched) == (3, 4 * first + 8)
            assert f.read(8) == b""  # at the end: no request
            assert f.requests == 3


def test_put_file_atomic(root, tmp_path):
    src = tmp_path / "shard-000000.tar"
    src.write_bytes(os.urandom(300_000))
    url = storage.join(root, "shards", "shard-000000.tar")
    storage.put_file_atomic(str(src), url)
    assert storage.read_bytes(url) == src.read_bytes()
    assert src.exists()  # an upload, not a move
    assert [u for u, _ in storage.find_files(root)] == [url]


# --------------------------------------------------------------------------- listings


def _make_tree(root: str) -> dict[str, bytes]:
    files = {
        "b.dcm": b"bb",
        "a/2.dcm": b"2222",
        "a/10.dcm": b"10",
        "a/deep/er/x.dcm": b"x" * 7,
        "c d/space.dcm": b"s",
    }
    for rel, data in files.items():
        storage.write_bytes_atomic(storage.join(root, rel), data)
    # A sibling whose name shares the prefix must not leak into the listing.
    storage.write_bytes_atomic(root + "-other/stray.dcm", b"no")
    return files


def test_find_files_recursive_sorted(root):
    files = _make_tree(root)
    if storage.is_local(root):
        os.makedirs(os.path.join(root, "empty-dir"))  # directories never appear
    listed = storage.find_files(root)
    expected = sorted((storage.join(root, rel), len(data)) for rel, data in files.items())
    assert listed == expected
    assert storage.find_files(root + "/") == expected
    for url, size in listed:  # URLs go straight back into the module
        assert len(storage.read_bytes(url)) == size


def test_find_files_on_a_file(root):
    url = storage.join(root, "one.dcm")
    storage.write_bytes_atomic(url, b"123")
    assert storage.find_files(url) == [(url, 3)]


def test_list_dir_one_level(root):
    _make_tree(root)
    dirs, files = storage.list_dir(root)
    assert dirs == [storage.join(root, "a"), storage.join(root, "c d")]
    assert files == [(storage.join(root, "b.dcm"), 2)]
    dirs, files = storage.list_dir(storage.join(root, "a"))
    assert dirs == [storage.join(root, "a", "deep")]
    assert files == [(storage.join(root, "a", "10.dcm"), 2), (storage.join(root, "a", "2.dcm"), 4)]


def test_walk_and_scan_dir_on_every_backend(root):
    """Object stores have only objects: the same listing as before, nothing skipped; a local
    tree of plain files lists the same way (tests/test_listing.py has the hostile trees)."""
    _make_tree(root)
    assert [(e.url, e.size) for e in storage.walk(root)] == storage.find_files(root)
    assert all(e.skip is None for e in storage.walk(root))
    dirs, entries = storage.scan_dir(root)
    assert (dirs, [(e.url, e.size) for e in entries]) == storage.list_dir(root)
    assert storage.walk(storage.join(root, "b.dcm")) == [storage.Entry(storage.join(root, "b.dcm"), 2)]


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes_atomic("rel/x.bin", b"1")
    assert storage.find_files("rel") == [(str(tmp_path / "rel" / "x.bin"), 1)]


def test_s3_listing_sees_writes_by_other_clients(s3_server, s3_bucket):
    """Ray workers write through their own clients; the driver's view must not be stale."""
    root = s3_bucket + "/out"
    storage.write_bytes_atomic(root + "/a", b"1")
    assert [u for u, _ in storage.find_files(root)] == [root + "/a"]
    assert not storage.exists(root + "/b")

    other = s3_server.client()
    bucket = s3_bucket.removeprefix("s3://")
    other.put_object(Bucket=bucket, Key="out/b", Body=b"22")
    assert storage.exists(root + "/b")
    assert storage.find_files(root) == [(root + "/a", 1), (root + "/b", 2)]
    assert storage.list_dir(root)[1] == [(root + "/a", 1), (root + "/b", 2)]

    other.delete_object(Bucket=bucket, Key="out/a")
    assert not storage.exists(root + "/a")
    assert storage.find_files(root) == [(root + "/b", 2)]


def test_s3_folder_markers_are_not_files(s3_server, s3_bucket):
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="in/", Body=b"")  # what consoles create for "folders"
    client.put_object(Bucket=bucket, Key="in/sub/", Body=b"")
    client.put_object(Bucket=bucket, Key="in/sub/x.dcm", Body=b"xyz")
    assert storage.find_files(s3_bucket + "/in") == [(s3_bucket + "/in/sub/x.dcm", 3)]
    assert storage.list_dir(s3_bucket + "/in") == ([s3_bucket + "/in/sub"], [])


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "out" / "manifest.json")
    for i in range(20):
        storage.write_bytes_atomic(url, json.dumps({"i": i}).encode())
    assert os.listdir(tmp_path / "out") == ["manifest.json"]
    assert json.loads(storage.read_bytes(url)) == {"i": 19}


def test_failed_atomic_write_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    url = str(tmp_path / "manifest.json")
    storage.write_bytes_atomic(url, b"old")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_bytes_atomic(url, b"new-but-never-complete")
    with pytest.raises(OSError):
        storage.put_file_atomic(url, str(tmp_path / "copy.json"))
    monkeypatch.undo()
    assert storage.read_bytes(url) == b"old"
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_readers_never_see_a_partial_local_file(tmp_path):
    url = str(tmp_path / "shard.tar")
    a, b = b"A" * (2 << 20), b"B" * (2 << 20)
    storage.write_bytes_atomic(url, a)
    seen, done = set(), threading.Event()

    def reader():
        while not done.is_set():
            seen.add(hash(storage.read_bytes(url)))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(40):
            storage.write_bytes_atomic(url, b if i % 2 == 0 else a)
    finally:
        done.set()
        t.join()
    assert seen <= {hash(a), hash(b)}


def test_in_flight_temp_files_are_not_listed(tmp_path):
    (tmp_path / "done.tar").write_bytes(b"1")
    (tmp_path / f"{storage._TMP_PREFIX}abc.next.tar").write_bytes(b"partial")
    assert storage.find_files(str(tmp_path)) == [(str(tmp_path / "done.tar"), 1)]
    assert storage.list_dir(str(tmp_path)) == ([], [(str(tmp_path / "done.tar"), 1)])


def test_atomic_write_keeps_umask_permissions(tmp_path):
    url = str(tmp_path / "x")
    storage.write_bytes_atomic(url, b"1")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------- S3 specifics


def test_makedirs_never_creates_buckets(s3_server):
    storage.makedirs("s3://rf-never-created/prefix")
    with pytest.raises(ConfigError, match="does not exist"):
        storage.check_readable("s3://rf-never-created")


def test_read_head_s3_is_a_range_request(s3_bucket, monkeypatch):
    url = s3_bucket + "/big.dcm"
    data = os.urandom(1 << 20)
    storage.write_bytes_atomic(url, data)
    fs, _ = storage.url_to_fs(url)
    calls = []
    real = fs._call_s3

    async def spy(method, *args, **kwargs):
        out = await real(method, *args, **kwargs)
        calls.append((method, kwargs.get("Range"), out.get("ContentLength")))
        return out

    monkeypatch.setattr(fs, "_call_s3", spy)
    assert storage.read_head(url, 132) == data[:132]
    gets = [c for c in calls if c[0] == "get_object"]
    assert gets == [("get_object", "bytes=0-131", 132)]  # the server sent 132 bytes, not 1 MiB

    calls.clear()  # a header-style read through open_input is bounded by block_size
    with storage.open_input(url, block_size=64 * 1024) as f:
        assert f.read(132) == data[:132]
        f.seek(4096)
        assert f.read(10) == data[4096:4106]
    fetched = sum(c[2] for c in calls if c[0] == "get_object")
    assert 0 < fetched <= 2 * 64 * 1024


def test_s3_endpoint_from_env(s3_server, s3_bucket, monkeypatch):
    url = s3_bucket + "/x"
    storage.write_bytes_atomic(url, b"1")
    # The S3-specific variable wins over the global one, as in the AWS CLI.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    assert storage.url_to_fs(url)[0].endpoint_url == s3_server.endpoint
    assert storage.read_bytes(url) == b"1"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.url_to_fs(url)[0].endpoint_url is None


def test_filesystem_cache_follows_environment(s3_bucket, monkeypatch):
    fs1, _ = storage.url_to_fs(s3_bucket + "/a")
    fs2, _ = storage.url_to_fs(s3_bucket + "/b")
    assert fs1 is fs2
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert storage.url_to_fs(s3_bucket + "/a")[0] is not fs1


def test_s3_filesystem_pickles_with_its_endpoint(s3_server, s3_bucket):
    """What a Ray worker gets: endpoint in the options, credentials from its own env."""
    url = s3_bucket + "/p"
    storage.write_bytes_atomic(url, b"pickled")
    fs, path = storage.url_to_fs(url)
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.endpoint_url == s3_server.endpoint
    assert "key" not in clone.storage_options and "secret" not in clone.storage_options
    assert clone.cat_file(path) == b"pickled"


def _read_in_child(url, queue):
    queue.put(storage.read_bytes(url))


@pytest.mark.timeout(60)
def test_forked_child_gets_its_own_client(s3_bucket):
    """A client is bound to its process's event loop; a fork must not inherit it."""
    import multiprocessing

    url = s3_bucket + "/f"
    storage.write_bytes_atomic(url, b"parent")
    assert storage.read_bytes(url) == b"parent"  # the parent's client is now live
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(url, queue))
    child.start()
    assert queue.get(timeout=30) == b"parent"
    child.join(30)
    assert child.exitcode == 0


# --------------------------------------------------------------------------- check_readable


def test_check_readable_ok(root):
    storage.write_bytes_atomic(storage.join(root, "x", "f.dcm"), b"1")
    storage.check_readable(root)
    storage.check_readable(storage.join(root, "x"))
    storage.check_readable(storage.join(root, "x", "f.dcm"))


def test_check_readable_missing(root):
    missing = storage.join(root, "nope")
    with pytest.raises(ConfigError) as exc:
        storage.check_readable(missing)
    msg = _one_line(exc)
    assert missing.split("://")[-1] in msg
    assert "does not exist" in msg or "no object or prefix" in msg


def test_check_readable_empty_bucket_is_fine(s3_bucket):
    storage.check_readable(s3_bucket)


@pytest.mark.timeout(30)
def test_check_readable_missing_bucket(s3_server):
    with pytest.raises(ConfigError) as exc:
        storage.check_readable("s3://rf-no-such-bucket/in")
    assert "bucket 'rf-no-such-bucket' does not exist" in _one_line(exc)


@pytest.mark.timeout(30)
def test_check_readable_unreachable_endpoint(s3_server, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError) as exc:
        storage.check_readable("s3://bkt/in")
    msg = _one_line(exc)
    assert "cannot reach the S3 endpoint" in msg and str(port) in msg


@pytest.mark.timeout(30)
def test_check_readable_no_credentials(s3_server, s3_bucket, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError) as exc:
        storage.check_readable(s3_bucket)
    assert "no AWS credentials found" in _one_line(exc)


@pytest.fixture
def iam(s3_server, s3_bucket):
    """Turn on moto's IAM enforcement; returns a factory of (key id, secret) per policy.

    moto runs in this process, so enforcement is a process-global switch held for the test.
    """
    from moto.core import enable_iam_authentication

    client = s3_server.client("iam")

    def user(actions: list[str]) -> tuple[str, str]:
        name = f"u-{uuid.uuid4().hex[:10]}"
        client.create_user(UserName=name)
        if actions:
            policy = {"Version": "2012-10-17",
                      "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            client.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = client.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    users = {
        "admin": user(["s3:*"]),
        "reader": user(["s3:GetObject", "s3:ListBucket"]),
        "nobody": user([]),
    }
    storage.write_bytes_atomic(s3_bucket + "/in/a.dcm", b"1")
    with enable_iam_authentication():
        yield users


def _use(monkeypatch, key_id: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "who, expected",
    [
        ("unknown-key", "access key is not recognised"),
        ("wrong-secret", "secret key does not match"),
        ("nobody", "access denied"),
    ],
)
def test_check_readable_bad_credentials(iam, s3_bucket, monkeypatch, who, expected):
    if who == "unknown-key":
        _use(monkeypatch, "AKIAIOSFODNN7EXAMPLE", "x" * 40)
    elif who == "wrong-secret":
        _use(monkeypatch, iam["admin"][0], "x" * 40)
    else:
        _use(monkeypatch, *iam[who])
    with pytest.raises(ConfigError) as exc:
        storage.check_readable(s3_bucket + "/in")
    msg = _one_line(exc)
    assert expected in msg and s3_bucket + "/in" in msg
    assert "x" * 40 not in msg


@pytest.mark.timeout(30)
def test_permissions_with_real_iam_users(iam, s3_bucket, monkeypatch):
    _use(monkeypatch, *iam["reader"])
    storage.check_readable(s3_bucket + "/in")
    storage.check_readable(s3_bucket + "/in/a.dcm")
    with pytest.raises(ConfigError) as exc:
        storage.check_writable(s3_bucket + "/out")
    assert "cannot write to" in _one_line(exc) and "access denied" in str(exc.value)

    _use(monkeypatch, *iam["admin"])
    storage.check_writable(s3_bucket + "/out")
    assert storage.read_bytes(s3_bucket + "/in/a.dcm") == b"1"


# --------------------------------------------------------------------------- check_writable


def test_check_writable_creates_and_leaves_nothing(root):
    dest = storage.join(root, "new", "dest")
    storage.check_writable(dest)
    if storage.is_local(dest):
        assert os.path.isdir(dest)
    assert storage.find_files(root) == []


@pytest.mark.timeout(30)
def test_check_writable_missing_bucket(s3_server):
    with pytest.raises(ConfigError) as exc:
        storage.check_writable("s3://rf-no-such-bucket/out")
    assert "bucket 'rf-no-such-bucket' does not exist" in _one_line(exc)


def test_check_writable_under_a_regular_file(tmp_path):
    # chmod cannot stop root, but nothing can make a directory below a regular file.
    blocker = tmp_path / "file"
    blocker.write_bytes(b"1")
    with pytest.raises(ConfigError) as exc:
        storage.check_writable(str(blocker / "dest"))
    msg = _one_line(exc)
    assert str(blocker / "dest") in msg and "Not a directory" in msg

    with pytest.raises(ConfigError) as exc:
        storage.check_writable(str(blocker))
    assert "existing file" in _one_line(exc)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_check_writable_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError) as exc:
            storage.check_writable(str(ro))
        assert "Permission denied" in _one_line(exc)
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------- pyarrow bridge


def test_pyarrow_filesystem_round_trip(root):
    table = pa.table({"path": ["a", "b", "c"], "size": [1, 2, 3]})
    pafs, path = storage.pyarrow_filesystem(root)
    pafs.create_dir(path, recursive=True)
    pq.write_table(table, path + "/index.parquet", filesystem=pafs)

    url = storage.join(root, "index.parquet")
    assert [u for u, _ in storage.find_files(root)] == [url]
    assert pq.read_table(io.BytesIO(storage.read_bytes(url))).equals(table)
    assert pq.read_table(path + "/index.parquet", filesystem=pafs).equals(table)


def test_pyarrow_filesystem_local_is_native(tmp_path):
    import pyarrow.fs as pafs

    fs, path = storage.pyarrow_filesystem(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)


# --------------------------------------------------------------------------- whole reads into one buffer


@pytest.mark.parametrize("size", [0, 5, storage.READ_PIECE * 2 + 12345])
def test_read_into_is_the_object_in_one_read_only_buffer_with_its_sha256(root, size):
    url = storage.join(root, "whole.bin")
    data = os.urandom(size)
    storage.write_bytes_atomic(url, data)
    body = storage.read_into(url, sha256=True)
    assert bytes(body.data) == data == storage.read_bytes(url)
    assert body.data.readonly and body.sha256 == hashlib.sha256(data).hexdigest()
    plain = storage.read_into(url)
    assert bytes(plain.data) == data and plain.sha256 is None


def test_read_into_missing_object_is_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        storage.read_into(storage.join(root, "absent.bin"), sha256=True)


def test_read_into_s3_is_one_get_and_only_a_hashed_read_skips_botocores_crc32(s3_bucket, monkeypatch):
    """One GET per read, no HEAD. botocore asks S3 for the object's CRC32 (and checks the body
    against it) on every read but one that checks its own sha256 (`read_into(sha256=True)`)."""
    import s3fs

    url = s3_bucket + "/shard.tar"
    data = os.urandom(3 * storage.READ_PIECE + 7)
    storage.write_bytes_atomic(url, data)
    calls = []
    real = s3fs.S3FileSystem._call_s3

    async def spy(self, method, *args, **kwargs):
        out = await real(self, method, *args, **kwargs)
        calls.append((method, "ChecksumCRC32" in out))
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    assert storage.read_bytes(url) == data
    assert calls == [("get_object", True)]
    calls.clear()
    body = storage.read_into(url, sha256=True)
    assert bytes(body.data) == data and body.sha256 == hashlib.sha256(data).hexdigest()
    assert calls == [("get_object", False)]
    calls.clear()
    assert bytes(storage.read_into(url).data) == data
    assert calls == [("get_object", True)]
